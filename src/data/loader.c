/* The batch loader. The epoch permutation is computed in the caller's thread;
 * batch b always goes to ring slot b % nslots. Workers claim batch numbers in
 * order, fill their slot (gather or read/decode, augment, normalise) without
 * holding the lock, and mark it ready; the caller takes batches in order and
 * releases a slot when it asks for the next batch. Each sample's augmentation
 * is drawn from its own counter-based stream, so the bytes of every batch are
 * the same for any number of workers. In-memory datasets at their own size
 * take a direct path (no copy); other samples are read into the worker's
 * buffers and go through the geometry step first. With several views, a
 * sample is read once and each view is made from it with the view's own
 * transform and stream; every slot holds one buffer per view. */
#include "data_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float **views;   /* (n_views): view v is (batch_size, C, H_v, W_v), 64-byte aligned */
    int32_t *y;      /* (batch_size) */
    int64_t *index;  /* (batch_size) */
    int64_t n;       /* samples filled */
    int64_t global_n; /* rows of the global batch (n without sharding) */
    int64_t ready;   /* batch number held, -1 when none; guarded by mu */
    kd_status status;
    char msg[1024];  /* worker's error message when status != KD_OK */
} kd__slot;

/* A worker thread (or, with num_workers = 0, the caller) and its buffers. */
typedef struct {
    struct kd_loader *l;
    kd__sample_ctx x;
} kd__worker;

/* One view: its transform, tables and output size. */
typedef struct {
    kd_transform_cfg tf;
    kd__transform_tables tables;
    int out_h, out_w; /* output sample size */
    int64_t per;      /* C * out_h * out_w */
} kd__view;

struct kd_loader {
    const kd_dataset *ds;
    kd_loader_cfg cfg; /* view_transforms cleared: the views live in `views` */
    int nviews;        /* >= 1 */
    kd__view *views;   /* (nviews) */
    kd_view_shape *shapes; /* (nviews), handed out with every batch */
    int direct;       /* 1: in-memory images at every view's output size, no geometry hook */
    _Atomic unsigned char *bad; /* (N) with skip_bad: 1 = known unreadable */
    atomic_llong skipped;       /* distinct unreadable samples found */
    kd__worker *workers;        /* max(1, nthreads) */
    int64_t nbatches; /* per epoch */
    int64_t *perm;    /* (N) sample order of the current epoch */
    int64_t epoch;
    int nslots;
    kd__slot *slots;
    /* Caller side. */
    int started;
    int64_t cur; /* next batch to hand out */
    /* Shared with the workers, guarded by mu. */
    pthread_mutex_t mu;
    pthread_cond_t cv_work; /* workers wait: a claim may have become possible */
    pthread_cond_t cv_done; /* caller waits: a slot got ready or a worker went idle */
    int sync_init;          /* 1 once mu and the conditions exist */
    int active;             /* workers may claim batches of the current epoch */
    int shutdown;
    int busy;               /* workers filling a slot right now */
    int64_t next_claim;     /* next batch a worker will take */
    int64_t released;       /* batches < released have been given back by the caller */
    int nthreads;  /* configured workers; 0 = synchronous */
    int nstarted;  /* worker threads running, joined by kd_loader_free */
    pthread_t *threads;
};

static int kd__skippable(kd_status st) {
    return st == KD_ERR_FORMAT || st == KD_ERR_IO || st == KD_ERR_NOT_FOUND ||
           st == KD_ERR_UNSUPPORTED;
}

/* Reads dataset sample idx and writes each view of it, augmented, to row i
 * of the slot's view buffers; with skip_bad, an unreadable sample is
 * replaced by the next readable index (*used). */
static kd_status kd__loader_sample(kd_loader *l, kd__sample_ctx *x, int64_t idx, kd__slot *s,
                                   int64_t i, int64_t *used) {
    const kd_dataset *ds = l->ds;
    for (int64_t k = 0; k < ds->n; k++) {
        int64_t j = idx + k < ds->n ? idx + k : idx + k - ds->n;
        if (l->bad && atomic_load_explicit(&l->bad[j], memory_order_relaxed)) continue;
        const uint8_t *src = kd_dataset_image(ds, j);
        int c = ds->c, h = ds->h, w = ds->w;
        if (!src) {
            kd_status st = kd_dataset_read(ds, j, &x->img);
            if (st != KD_OK) {
                if (!l->bad || !kd__skippable(st))
                    return kd_error(st, "dataset %s, sample %lld: %s", ds->name, (long long)j,
                                    kd_last_error());
                if (!atomic_exchange(&l->bad[j], 1)) {
                    atomic_fetch_add(&l->skipped, 1);
                    kd_log_msg(KD_LOG_WARN, "dataset %s: skipping unreadable sample %lld: %s",
                               ds->name, (long long)j, kd_last_error());
                }
                continue;
            }
            src = x->img.data;
            c = x->img.c, h = x->img.h, w = x->img.w;
            if (c != ds->c)
                return kd_error(KD_ERR_FORMAT, "dataset %s, sample %lld: %d channels, expected %d",
                                ds->name, (long long)j, c, ds->c);
        }
        int shared_flip = -1; /* the sample's shared flip, drawn when a view asks for it */
        for (int v = 0; v < l->nviews; v++) {
            const kd__view *vw = &l->views[v];
            kd_rng r;
            kd_rng_init(&r, l->cfg.seed, kd_data_view_key(l->cfg.seed, l->epoch, j, v));
            if (vw->tf.hflip_shared && shared_flip < 0)
                shared_flip = kd_transform_shared_flip(l->cfg.seed, l->epoch, j);
            KD_TRY(kd__sample_apply(&vw->tf, &vw->tables, &r, vw->tf.hflip_shared && shared_flip == 1, src, c,
                                    h, w, vw->out_h, vw->out_w, x, s->views[v] + i * vw->per));
        }
        *used = j;
        return KD_OK;
    }
    return kd_error(KD_ERR_FORMAT, "dataset %s: none of its %lld samples could be read", ds->name,
                    (long long)ds->n);
}

/* Gathers and augments batch b of the current epoch into slot s. */
static kd_status kd__loader_fill(kd_loader *l, kd__sample_ctx *x, kd__slot *s, int64_t b) {
    const kd_dataset *ds = l->ds;
    int64_t start = b * l->cfg.batch_size, n = ds->n - start;
    if (n > l->cfg.batch_size) n = l->cfg.batch_size;
    s->global_n = n;
    if (l->cfg.shard_count > 1) { /* this process's rows of the global batch */
        const int64_t R = l->cfg.shard_count, r = l->cfg.shard_rank, lo = r * n / R, hi = (r + 1) * n / R;
        start += lo;
        n = hi - lo;
    }
    if (!l->direct) {
        for (int64_t i = 0; i < n; i++) {
            int64_t used = 0;
            KD_TRY(kd__loader_sample(l, x, l->perm[start + i], s, i, &used));
            s->y[i] = ds->labels[used];
            s->index[i] = used;
        }
        s->n = n;
        return KD_OK;
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t idx = l->perm[start + i];
        const int64_t bytes = (int64_t)ds->c * ds->h * ds->w;
        if (i + 1 < n) {
            /* Shuffled reads miss the cache; start fetching the next image. */
            const uint8_t *next = kd_dataset_image(ds, l->perm[start + i + 1]);
            for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(next + o);
        }
        for (int v = 0; v < l->nviews; v++) {
            const kd__view *vw = &l->views[v];
            kd_rng r;
            kd_rng_init(&r, l->cfg.seed, kd_data_view_key(l->cfg.seed, l->epoch, idx, v));
            kd_transform_draw d = kd_transform_draw_from(&vw->tf, &r);
            kd__transform_apply_tables(&vw->tables, vw->tf.pad_crop, &d, kd_dataset_image(ds, idx),
                                       ds->c, ds->h, ds->w, s->views[v] + i * vw->per);
        }
        s->y[i] = ds->labels[idx];
        s->index[i] = idx;
    }
    s->n = n;
    return KD_OK;
}

static int kd__loader_can_claim(const kd_loader *l) {
    return l->active && l->next_claim < l->nbatches && l->next_claim < l->released + l->nslots;
}

static void *kd__loader_worker(void *arg) {
    kd__worker *wk = arg;
    kd_loader *l = wk->l;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        while (!l->shutdown && !kd__loader_can_claim(l)) pthread_cond_wait(&l->cv_work, &l->mu);
        if (l->shutdown) break;
        int64_t b = l->next_claim++;
        kd__slot *s = &l->slots[b % l->nslots];
        l->busy++;
        pthread_mutex_unlock(&l->mu);

        kd_status st = kd__loader_fill(l, &wk->x, s, b);
        s->status = st;
        if (st != KD_OK) snprintf(s->msg, sizeof s->msg, "%s", kd_last_error());

        pthread_mutex_lock(&l->mu);
        l->busy--;
        s->ready = b;
        pthread_cond_broadcast(&l->cv_done);
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

int64_t kd_loader_num_batches(const kd_loader *l) { return l->nbatches; }

void kd_loader_sample_shape(const kd_loader *l, int *c, int *h, int *w) {
    kd_loader_view_shape(l, 0, c, h, w);
}

int kd_loader_num_views(const kd_loader *l) { return l->nviews; }

void kd_loader_view_shape(const kd_loader *l, int v, int *c, int *h, int *w) {
    if (v < 0 || v >= l->nviews) {
        *c = *h = *w = 0;
        return;
    }
    *c = l->shapes[v].c;
    *h = l->shapes[v].h;
    *w = l->shapes[v].w;
}

int64_t kd_loader_skipped(const kd_loader *l) {
    return (int64_t)atomic_load(&((kd_loader *)l)->skipped);
}

/* The output size of a view with transform tc: its own, or the dataset's. */
static kd_status kd__view_check(const kd_dataset *ds, const kd_transform_cfg *tc, int v, int nviews,
                                int *out_h, int *out_w) {
    kd_status st = kd_transform_check(tc, ds->c);
    if (st != KD_OK)
        return nviews > 1 ? kd_error(st, "loader: view %d: %s", v, kd_last_error()) : st;
    *out_h = tc->out_h ? tc->out_h : ds->h;
    *out_w = tc->out_w ? tc->out_w : ds->w;
    if (*out_h > 0 && *out_w > 0) return KD_OK;
    if (nviews > 1)
        return kd_error(KD_ERR_INVALID,
                        "loader: view %d: dataset %s has images of different sizes; set an output "
                        "size for the view (its transform's out_h, out_w)",
                        v, ds->name);
    return kd_error(KD_ERR_INVALID,
                    "loader: dataset %s has images of different sizes; set an output size "
                    "(transform out_h, out_w)",
                    ds->name);
}

kd_status kd_loader_init(kd_loader **out, const kd_dataset *ds, const kd_loader_cfg *cfg) {
    if (!out || !ds || !cfg) return kd_error(KD_ERR_INVALID, "kd_loader_init: NULL argument");
    *out = NULL;
    if (cfg->batch_size <= 0)
        return kd_error(KD_ERR_INVALID, "loader: batch_size %lld must be positive",
                        (long long)cfg->batch_size);
    if (cfg->num_workers < 0 || cfg->num_workers > 256)
        return kd_error(KD_ERR_INVALID, "loader: num_workers %d outside [0, 256]", cfg->num_workers);
    if (cfg->prefetch < 0 || cfg->prefetch > 1024)
        return kd_error(KD_ERR_INVALID, "loader: prefetch %d outside [0, 1024]", cfg->prefetch);
    if (cfg->n_views < 0)
        return kd_error(KD_ERR_INVALID, "loader: n_views %d is negative (0 or 1: one view)",
                        cfg->n_views);
    if (cfg->shard_count < 0 || (cfg->shard_count > 1 && (cfg->shard_rank < 0 || cfg->shard_rank >= cfg->shard_count)))
        return kd_error(KD_ERR_INVALID, "loader: shard_rank %d outside [0, shard_count %d)", cfg->shard_rank,
                        cfg->shard_count);
    if (cfg->view_transforms && cfg->n_views == 0)
        return kd_error(KD_ERR_INVALID,
                        "loader: view_transforms is set but n_views is 0; set n_views to its "
                        "number of entries");
    if (ds->n > (int64_t)UINT32_MAX)
        return kd_error(KD_ERR_UNSUPPORTED, "loader: dataset %s has %lld samples, more than 2^32",
                        ds->name, (long long)ds->n);
    const int nviews = cfg->n_views > 1 ? cfg->n_views : 1;
    for (int v = 0; v < nviews; v++) {
        int oh, ow;
        KD_TRY(kd__view_check(ds, cfg->view_transforms ? &cfg->view_transforms[v] : &cfg->transform,
                              v, nviews, &oh, &ow));
    }

    kd_status st = KD_OK;
    int64_t per_max = 0; /* floats per sample of the largest view (bytes of its geometry output) */
    kd_loader *l = calloc(1, sizeof *l);
    if (!l) return kd_error(KD_ERR_NOMEM, "loader: out of memory");
    l->ds = ds;
    l->cfg = *cfg;
    l->cfg.view_transforms = NULL;
    l->nviews = nviews;
    atomic_init(&l->skipped, 0);
    int64_t bs = cfg->batch_size < ds->n ? cfg->batch_size : ds->n; /* rows ever needed */
    l->nbatches = cfg->drop_last ? ds->n / cfg->batch_size
                                 : (ds->n + cfg->batch_size - 1) / cfg->batch_size;
    l->nthreads = cfg->num_workers;
    l->nslots = l->nthreads == 0 ? 1 : 1 + (cfg->prefetch ? cfg->prefetch : 2 * l->nthreads);
    l->views = calloc((size_t)nviews, sizeof *l->views);
    l->shapes = calloc((size_t)nviews, sizeof *l->shapes);
    if (!l->views || !l->shapes) goto fail_nomem;
    l->direct = !kd_dataset_is_lazy(ds);
    for (int v = 0; v < nviews; v++) {
        kd__view *vw = &l->views[v];
        vw->tf = cfg->view_transforms ? cfg->view_transforms[v] : cfg->transform;
        vw->out_h = vw->tf.out_h ? vw->tf.out_h : ds->h;
        vw->out_w = vw->tf.out_w ? vw->tf.out_w : ds->w;
        vw->per = (int64_t)ds->c * vw->out_h * vw->out_w;
        kd__transform_tables_init(&vw->tf, ds->c, &vw->tables);
        l->shapes[v] = (kd_view_shape){ds->c, vw->out_h, vw->out_w};
        l->direct &= !vw->tf.geometry && !vw->tf.hflip_shared && !vw->tf.ssl && vw->out_h == ds->h &&
                     vw->out_w == ds->w;
        if (vw->per > per_max) per_max = vw->per;
    }

    l->perm = malloc((size_t)ds->n * sizeof *l->perm);
    l->slots = calloc((size_t)l->nslots, sizeof *l->slots);
    l->workers = calloc((size_t)(l->nthreads ? l->nthreads : 1), sizeof *l->workers);
    if (!l->perm || !l->slots || !l->workers) goto fail_nomem;
    for (int i = 0; i < (l->nthreads ? l->nthreads : 1); i++) {
        kd__worker *wk = &l->workers[i];
        wk->l = l;
        if (!l->direct) { /* the geometry output buffer, at the largest view's size */
            wk->x.geo_cap = (size_t)per_max;
            if (!(wk->x.geo = malloc(wk->x.geo_cap))) goto fail_nomem;
        }
    }
    if (cfg->skip_bad) {
        l->bad = calloc((size_t)ds->n, sizeof *l->bad);
        if (!l->bad) goto fail_nomem;
    }
    if (bs > INT64_MAX / 4 / per_max) goto fail_nomem;
    for (int i = 0; i < l->nslots; i++) {
        kd__slot *s = &l->slots[i];
        s->ready = -1;
        s->views = calloc((size_t)nviews, sizeof *s->views);
        s->y = malloc((size_t)bs * sizeof *s->y);
        s->index = malloc((size_t)bs * sizeof *s->index);
        if (!s->views || !s->y || !s->index) goto fail_nomem;
        for (int v = 0; v < nviews; v++)
            if (!(s->views[v] = kd_aligned_alloc((size_t)(bs * l->views[v].per) * sizeof(float))))
                goto fail_nomem;
    }

    if (pthread_mutex_init(&l->mu, NULL) != 0) goto fail_sync;
    if (pthread_cond_init(&l->cv_work, NULL) != 0) {
        pthread_mutex_destroy(&l->mu);
        goto fail_sync;
    }
    if (pthread_cond_init(&l->cv_done, NULL) != 0) {
        pthread_cond_destroy(&l->cv_work);
        pthread_mutex_destroy(&l->mu);
        goto fail_sync;
    }
    l->sync_init = 1;
    if (l->nthreads > 0) {
        l->threads = calloc((size_t)l->nthreads, sizeof *l->threads);
        if (!l->threads) goto fail_nomem;
        for (int i = 0; i < l->nthreads; i++) {
            if (pthread_create(&l->threads[i], NULL, kd__loader_worker, &l->workers[i]) != 0) {
                st = kd_error(KD_ERR_INTERNAL, "loader: cannot start worker thread %d of %d", i + 1,
                              cfg->num_workers);
                goto fail;
            }
            l->nstarted++;
        }
    }
    *out = l;
    return KD_OK;

fail_sync:
    st = kd_error(KD_ERR_INTERNAL, "loader: cannot create mutex or condition variables");
    goto fail;
fail_nomem:
    st = kd_error(KD_ERR_NOMEM,
                  "loader: cannot allocate %d batch buffers of %lld samples x %d views (%lld floats "
                  "per sample in the largest)",
                  l->nslots, (long long)bs, nviews, (long long)per_max);
fail:
    kd_loader_free(l);
    return st;
}

kd_status kd_loader_start_epoch(kd_loader *l, int64_t epoch) {
    if (l->nthreads > 0) {
        /* Stop new claims and let running fills finish before touching perm. */
        pthread_mutex_lock(&l->mu);
        l->active = 0;
        while (l->busy > 0) pthread_cond_wait(&l->cv_done, &l->mu);
        pthread_mutex_unlock(&l->mu);
    }
    int64_t n = l->ds->n;
    for (int64_t i = 0; i < n; i++) l->perm[i] = i;
    if (l->cfg.shuffle) {
        kd_rng r;
        kd_rng_init(&r, l->cfg.seed, kd_rng_key(KD_DATA_SHUFFLE_TAG, (uint64_t)epoch));
        for (int64_t i = n - 1; i > 0; i--) {
            int64_t j = (int64_t)kd_rng_below(&r, (uint32_t)(i + 1));
            int64_t t = l->perm[i];
            l->perm[i] = l->perm[j];
            l->perm[j] = t;
        }
    }
    l->epoch = epoch;
    l->cur = 0;
    l->started = 1;
    pthread_mutex_lock(&l->mu);
    for (int i = 0; i < l->nslots; i++) l->slots[i].ready = -1;
    l->next_claim = 0;
    l->released = 0;
    l->active = 1;
    pthread_cond_broadcast(&l->cv_work);
    pthread_mutex_unlock(&l->mu);
    return KD_OK;
}

int kd_loader_next(kd_loader *l, kd_batch *out) {
    if (!l->started)
        return kd_error(KD_ERR_INVALID, "loader: call kd_loader_start_epoch before kd_loader_next");
    int64_t b = l->cur;
    kd__slot *s = &l->slots[b % l->nslots];
    if (l->nthreads == 0) {
        if (b >= l->nbatches) return 0;
        s->status = kd__loader_fill(l, &l->workers[0].x, s, b);
        if (s->status != KD_OK) return s->status;
    } else {
        pthread_mutex_lock(&l->mu);
        /* The caller is done with every batch before b. */
        if (l->released < b) {
            l->released = b;
            pthread_cond_broadcast(&l->cv_work);
        }
        if (b >= l->nbatches) {
            pthread_mutex_unlock(&l->mu);
            return 0;
        }
        while (s->ready != b) pthread_cond_wait(&l->cv_done, &l->mu);
        pthread_mutex_unlock(&l->mu);
        if (s->status != KD_OK) return kd_error(s->status, "%s", s->msg);
    }
    out->n = s->n;
    out->global_n = s->global_n;
    out->batch = b;
    out->x = s->views[0];
    out->y = s->y;
    out->index = s->index;
    out->n_views = l->nviews;
    out->views = s->views;
    out->view_shape = l->shapes;
    l->cur = b + 1;
    return 1;
}

void kd_loader_free(kd_loader *l) {
    if (!l) return;
    if (l->sync_init) {
        pthread_mutex_lock(&l->mu);
        l->shutdown = 1;
        pthread_cond_broadcast(&l->cv_work);
        pthread_mutex_unlock(&l->mu);
        for (int i = 0; i < l->nstarted; i++) pthread_join(l->threads[i], NULL);
        pthread_cond_destroy(&l->cv_done);
        pthread_cond_destroy(&l->cv_work);
        pthread_mutex_destroy(&l->mu);
    }
    free(l->threads);
    if (l->slots) {
        for (int i = 0; i < l->nslots; i++) {
            if (l->slots[i].views)
                for (int v = 0; v < l->nviews; v++) kd_aligned_free(l->slots[i].views[v]);
            free(l->slots[i].views);
            free(l->slots[i].y);
            free(l->slots[i].index);
        }
    }
    free(l->slots);
    if (l->workers)
        for (int i = 0; i < (l->nthreads ? l->nthreads : 1); i++) kd__sample_ctx_free(&l->workers[i].x);
    free(l->workers);
    free((void *)l->bad);
    free(l->perm);
    free(l->views);
    free(l->shapes);
    free(l);
}
