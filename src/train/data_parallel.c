/* Data parallelism over the processes of kd/dist.h, as PyTorch's
 * DistributedDataParallel does it: every rank holds a replica, trains on its
 * rows of each global batch, and before the optimiser step the gradients of
 * the student and of the method's trainable tensors become the global
 * batch's: each rank scales its own by its share of the batch (rows / global
 * rows, since its loss is a mean over its rows) and they are summed over the
 * ranks. The sum runs in buckets of about KD_DIST_BUCKET_KB KiB over the
 * tensors in reverse registration order; the backward's gradient hook
 * (kd_graph_set_grad_hook) posts a bucket's non-blocking all-reduce as soon
 * as backward has finished all its tensors, so communication overlaps the
 * rest of backward. Frozen teachers have no gradients and are never
 * synchronised. With sync_bn, batch norm uses the global batch's statistics
 * (kd_graph_set_sync_bn). docs/DISTRIBUTED.md has the figures. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "train/dp_impl.h"
#include "train/train_impl.h"

typedef struct {
    int lo, hi;        /* tensors [lo, hi) of d->p */
    int64_t off, n;    /* floats of d->flat */
    int pending;       /* tensors not final yet in this step's backward */
    int posted;
    kd_dist_req rq;
} kd__bucket;

struct kd__dp {
    kd_tensor **p;     /* (np) trainable tensors, in bucket order */
    int64_t *off;      /* (np) offset in flat */
    int *bucket_of;    /* (np) */
    int np;
    kd__bucket *b;
    int nb;
    float *flat;       /* (total) the gradients as sent and received */
    int64_t total;
    int sync_bn;
    int overlap;       /* post buckets from the backward hook (KD_DIST_OVERLAP=0: after backward) */
    double scale;
    kd_status err;     /* first failure inside the hook */
    char err_msg[512];
};

static kd_status kd__dp_sum(double *buf, int64_t n, void *user) {
    (void)user;
    return kd_dist_allreduce_f64(buf, n);
}

kd_status kd__dp_create(kd__dp **out, kd_param_list *const *lists, int n_lists, int sync_bn) {
    *out = NULL;
    kd__dp *d = calloc(1, sizeof *d);
    if (!d) return kd_error(KD_ERR_NOMEM, "out of memory");
    int cap = 0;
    for (int l = 0; l < n_lists; l++) cap += lists[l] ? lists[l]->n : 0;
    d->p = calloc((size_t)cap + 1, sizeof *d->p);
    d->off = calloc((size_t)cap + 1, sizeof *d->off);
    d->bucket_of = calloc((size_t)cap + 1, sizeof *d->bucket_of);
    d->b = calloc((size_t)cap + 1, sizeof *d->b);
    if (!d->p || !d->off || !d->bucket_of || !d->b) {
        kd__dp_free(d);
        return kd_error(KD_ERR_NOMEM, "out of memory");
    }
    /* Reverse registration order: the last layers' gradients are final first. */
    for (int l = n_lists - 1; l >= 0; l--) {
        if (!lists[l]) continue;
        for (int i = lists[l]->n - 1; i >= 0; i--) {
            const kd_param *pp = &lists[l]->items[i];
            if (pp->kind == KD_PARAM_BUFFER || !pp->t->grad || pp->t->dtype != KD_F32) continue;
            d->off[d->np] = d->total;
            d->p[d->np++] = pp->t;
            d->total += kd_tensor_numel(pp->t);
        }
    }
    const char *v = getenv("KD_DIST_BUCKET_KB");
    int64_t bucket = (v && atoll(v) > 0 ? atoll(v) : 1024) * 1024 / (int64_t)sizeof(float);
    v = getenv("KD_DIST_OVERLAP");
    d->overlap = !(v && strcmp(v, "0") == 0);
    for (int i = 0; i < d->np; i++) {
        kd__bucket *bk = &d->b[d->nb];
        if (bk->hi == 0) {
            bk->lo = i;
            bk->off = d->off[i];
        }
        bk->hi = i + 1;
        bk->n += kd_tensor_numel(d->p[i]);
        d->bucket_of[i] = d->nb;
        if (bk->n >= bucket) d->nb++;
    }
    if (d->np > 0 && d->b[d->nb].hi > 0) d->nb++;
    d->flat = d->total ? kd_aligned_alloc((size_t)d->total * sizeof *d->flat) : NULL;
    if (d->total && !d->flat) {
        const long long total = (long long)d->total;
        kd__dp_free(d);
        return kd_error(KD_ERR_NOMEM, "out of memory allocating the %lld-float gradient buffer", total);
    }
    d->sync_bn = sync_bn;
    *out = d;
    return KD_OK;
}

void kd__dp_free(kd__dp *d) {
    if (!d) return;
    kd_aligned_free(d->flat);
    free(d->p);
    free(d->off);
    free(d->bucket_of);
    free(d->b);
    free(d);
}

int64_t kd__dp_floats(const kd__dp *d) { return d ? d->total : 0; }
int kd__dp_buckets(const kd__dp *d) { return d ? d->nb : 0; }

double kd__dp_scale(const kd_batch *b) {
    if (b->global_n > 0) return (double)b->n / (double)b->global_n;
    return 1.0 / (double)kd_dist_size();
}

/* Packs bucket k (scaled) and posts its sum. */
static kd_status kd__dp_post(kd__dp *d, int k) {
    kd__bucket *bk = &d->b[k];
    bk->posted = 1;
    const double sc = d->scale;
    for (int i = bk->lo; i < bk->hi; i++) {
        const float *g = kd_f32(d->p[i]->grad);
        float *dst = d->flat + d->off[i];
        const int64_t n = kd_tensor_numel(d->p[i]);
        for (int64_t j = 0; j < n; j++) dst[j] = (float)((double)g[j] * sc);
    }
    return kd_dist_iallreduce_f32(d->flat + bk->off, bk->n, &bk->rq);
}

static void kd__dp_ready(void *user, int i) {
    kd__dp *d = user;
    if (d->err != KD_OK) return;
    kd__bucket *bk = &d->b[d->bucket_of[i]];
    if (--bk->pending > 0 || bk->posted) return;
    kd_status s = kd__dp_post(d, d->bucket_of[i]);
    if (s == KD_OK) s = kd_dist_progress();
    if (s != KD_OK) {
        d->err = s;
        snprintf(d->err_msg, sizeof d->err_msg, "%s", kd_last_error());
    }
}

kd_status kd__dp_step_begin(kd__dp *d, kd_graph *g, double scale) {
    d->scale = scale;
    d->err = KD_OK;
    for (int k = 0; k < d->nb; k++) {
        d->b[k].pending = d->b[k].hi - d->b[k].lo;
        d->b[k].posted = 0;
        d->b[k].rq.id = 0;
    }
    if (d->sync_bn) kd_graph_set_sync_bn(g, kd__dp_sum, NULL, scale);
    if (d->overlap) kd_graph_set_grad_hook(g, kd__dp_ready, d, d->p, d->np);
    return KD_OK;
}

kd_status kd__dp_step_end(kd__dp *d, kd_graph *g) {
    kd_graph_set_sync_bn(g, NULL, NULL, 0);
    kd_graph_set_grad_hook(g, NULL, NULL, NULL, 0);
    kd_status s = d->err;
    if (s != KD_OK) kd_error(s, "%s", d->err_msg);
    /* Buckets with a tensor backward never reached (unused this step), or
     * all of them without the hook: in bucket order, the same on every rank. */
    for (int k = 0; k < d->nb && s == KD_OK; k++)
        if (!d->b[k].posted) s = kd__dp_post(d, k);
    for (int k = 0; k < d->nb; k++) {
        kd_status w = kd_dist_wait(&d->b[k].rq, "the gradient all-reduce");
        if (s == KD_OK) s = w;
    }
    if (s != KD_OK) return s;
    for (int i = 0; i < d->np; i++)
        memcpy(kd_f32(d->p[i]->grad), d->flat + d->off[i], (size_t)kd_tensor_numel(d->p[i]) * sizeof(float));
    return KD_OK;
}

/* ------------------------------------------------------------------ run */

uint64_t kd__fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 1099511628211ull;
    }
    return h;
}

static void kd__hash_arg(void *user, const char *key, const char *value, const char *help) {
    (void)help;
    uint64_t *h = user;
    *h = kd__fnv1a(*h, key, strlen(key) + 1);
    *h = kd__fnv1a(*h, value, strlen(value) + 1);
}

uint64_t kd__dp_config_hash(const kd_train_cfg *c) {
    static const char *const local[] = {"threads", "workers", "progress", "log_every", "stop_after",
                                        "allow_thread_change"};
    uint64_t h = KD__FNV_INIT;
    int n;
    const kd_setting_doc *d = kd_train_settings(&n);
    for (int i = 0; i < n; i++) {
        int skip = 0;
        for (size_t k = 0; k < sizeof local / sizeof local[0]; k++) skip |= strcmp(d[i].key, local[k]) == 0;
        if (skip) continue;
        char v[1024];
        if (kd_train_cfg_get(c, d[i].key, v, sizeof v) != KD_OK) v[0] = '\0';
        kd__hash_arg(&h, d[i].key, v, NULL);
    }
    kd_distill_cfg_visit(&c->distill, kd__hash_arg, &h);
    return h;
}

kd_status kd__dp_check_same(uint64_t hash, const char *what) {
    const int size = kd_dist_size();
    if (size <= 1) return KD_OK;
    uint64_t *all = calloc((size_t)size, sizeof *all);
    if (!all) return kd_error(KD_ERR_NOMEM, "out of memory");
    kd_status s = kd_dist_allgather(&hash, all, (int64_t)sizeof hash);
    int bad = -1;
    for (int r = 1; s == KD_OK && r < size && bad < 0; r++)
        if (all[r] != all[0]) bad = r;
    if (s == KD_OK && bad >= 0) {
        s = kd_error(KD_ERR_INVALID,
                     "the ranks disagree on %s: rank %d's (hash %016llx) differs from rank 0's (%016llx); start "
                     "every rank with the same command line, kd build and files",
                     what, bad, (unsigned long long)all[bad], (unsigned long long)all[0]);
        kd_dist_mark_collective(0);
    }
    free(all);
    return s;
}

kd_status kd__dp_bcast_params(kd_param_list *pl, int root) {
    for (int i = 0; pl && i < pl->n; i++) {
        kd_tensor *t = pl->items[i].t;
        KD_TRY(kd_dist_bcast(t->data, (int64_t)kd_tensor_nbytes(t), root));
    }
    return KD_OK;
}

uint64_t kd__dp_params_hash(const kd_param_list *pl) {
    uint64_t h = KD__FNV_INIT;
    for (int i = 0; pl && i < pl->n; i++) {
        const kd_tensor *t = pl->items[i].t;
        h = kd__fnv1a(h, pl->items[i].name, strlen(pl->items[i].name) + 1);
        h = kd__fnv1a(h, t->shape, (size_t)t->ndim * sizeof t->shape[0]);
        h = kd__fnv1a(h, t->data, kd_tensor_nbytes(t));
    }
    return h;
}

kd_status kd__dp_reduce_step(kd_step_result *sr, int64_t *n, int64_t *hits1, int64_t *hits5, int64_t *labeled) {
    enum { F = 5 };
    /* The reduced term values live here until the next call (one training
     * loop per process); grown to the largest count of terms seen. */
    static double *terms, *v;
    static int cap;
    if (sr->n_terms + F > cap) {
        int want = sr->n_terms + F;
        double *nt = realloc(terms, sizeof *nt * (size_t)want), *nv = nt ? realloc(v, sizeof *nv * (size_t)want) : NULL;
        if (nt) terms = nt;
        if (nv) v = nv;
        if (!nt || !nv) return kd_error(KD_ERR_NOMEM, "out of memory reducing %d loss terms", sr->n_terms);
        cap = want;
    }
    const double nl = (double)*n;
    v[0] = nl;
    v[1] = (double)*hits1;
    v[2] = (double)*hits5;
    v[3] = sr->loss * nl;
    v[4] = (double)*labeled;
    for (int i = 0; i < sr->n_terms; i++) v[F + i] = sr->term_values[i] * nl;
    KD_TRY(kd_dist_allreduce_f64(v, F + sr->n_terms));
    *n = (int64_t)v[0];
    *hits1 = (int64_t)v[1];
    *hits5 = (int64_t)v[2];
    *labeled = (int64_t)v[4];
    sr->loss = v[3] / v[0];
    for (int i = 0; i < sr->n_terms; i++) terms[i] = v[F + i] / v[0];
    sr->term_values = terms;
    return KD_OK;
}
