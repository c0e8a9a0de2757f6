/* SSLD's selection of unlabeled data (PaddleClas docs/ssld.md, METHODS.md
 * section 16): the teacher scores every candidate image (eval mode, the
 * evaluation transform); for each class the k candidates with the highest
 * probability of that class are kept (an image may be chosen by several
 * classes; it is listed once). The selected images and the labeled ones are
 * written as one file of dataset indices, the training set of the SSLD
 * distillation (the run setting train_indices). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "kd/train.h"
#include "train/train_impl.h"

/* A min-heap of (p, index) per class: the root is the weakest kept entry.
 * Order: higher p is stronger; at equal p the smaller index is stronger. */
typedef struct {
    float p;
    int64_t idx;
} kd__cand;

static int kd__weaker(kd__cand a, kd__cand b) { return a.p < b.p || (a.p == b.p && a.idx > b.idx); }

static void kd__heap_push(kd__cand *h, int64_t *n, int64_t k, kd__cand c) {
    if (*n < k) {
        int64_t i = (*n)++;
        h[i] = c;
        while (i > 0 && kd__weaker(h[i], h[(i - 1) / 2])) {
            kd__cand t = h[i];
            h[i] = h[(i - 1) / 2];
            h[(i - 1) / 2] = t;
            i = (i - 1) / 2;
        }
        return;
    }
    if (!kd__weaker(h[0], c)) return;
    h[0] = c;
    for (int64_t i = 0;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && kd__weaker(h[l], h[m])) m = l;
        if (r < k && kd__weaker(h[r], h[m])) m = r;
        if (m == i) break;
        kd__cand t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

kd_status kd_select_topk(const float *probs, const int64_t *index, int64_t n, int classes, int64_t k,
                         int64_t **out, int64_t *n_out) {
    *out = NULL;
    *n_out = 0;
    if (k < 1 || classes < 1) return kd_error(KD_ERR_INVALID, "select: per_class %lld must be >= 1", (long long)k);
    kd__cand *heaps = malloc(sizeof(kd__cand) * (size_t)(classes * k));
    int64_t *fill = calloc((size_t)classes, sizeof *fill);
    if (!heaps || !fill) {
        free(heaps);
        free(fill);
        return kd_error(KD_ERR_NOMEM, "select: out of memory for %d x %lld candidates", classes, (long long)k);
    }
    for (int64_t i = 0; i < n; i++)
        for (int c = 0; c < classes; c++)
            kd__heap_push(heaps + (int64_t)c * k, &fill[c], k, (kd__cand){probs[i * classes + c], index[i]});
    int64_t total = 0;
    for (int c = 0; c < classes; c++) total += fill[c];
    int64_t *sel = malloc(sizeof(int64_t) * (size_t)(total ? total : 1));
    if (!sel) {
        free(heaps);
        free(fill);
        return kd_error(KD_ERR_NOMEM, "select: out of memory");
    }
    int64_t m = 0;
    for (int c = 0; c < classes; c++)
        for (int64_t j = 0; j < fill[c]; j++) sel[m++] = heaps[(int64_t)c * k + j].idx;
    free(heaps);
    free(fill);
    *out = sel;
    *n_out = m;
    return KD_OK;
}

typedef struct {
    float *probs; /* (n, classes) */
    int64_t classes;
    int64_t n;
} kd__sel_acc;

static kd_status kd__sel_batch(void *user, const kd_batch *b, kd_graph *g, const kd_model_out *o) {
    kd__sel_acc *a = user;
    kd_tensor *lg = kd_graph_to_strided(g, o->logits);
    KD_TRY(kd_graph_status(g));
    if (lg->shape[1] != a->classes)
        return kd_error(KD_ERR_SHAPE, "select: the teacher has %lld classes, the data %lld", (long long)lg->shape[1],
                        (long long)a->classes);
    const float *x = kd_f32(lg);
    for (int64_t i = 0; i < b->n; i++) { /* softmax per row */
        const float *r = x + i * a->classes;
        float *p = a->probs + b->index[i] * a->classes;
        double mx = r[0], s = 0;
        for (int64_t c = 1; c < a->classes; c++) mx = r[c] > mx ? r[c] : mx;
        for (int64_t c = 0; c < a->classes; c++) s += exp((double)r[c] - mx);
        for (int64_t c = 0; c < a->classes; c++) p[c] = (float)(exp((double)r[c] - mx) / s);
    }
    return KD_OK;
}

static int kd__cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* FNV-1a over an image's shape and bytes. */
static uint64_t kd__image_hash(const kd_image *im) {
    uint64_t h = 1469598103934665603ull;
    const int dims[3] = {im->c, im->h, im->w};
    const unsigned char *d = (const unsigned char *)dims;
    for (size_t i = 0; i < sizeof dims; i++) h = (h ^ d[i]) * 1099511628211ull;
    const size_t n = (size_t)im->c * (size_t)im->h * (size_t)im->w;
    for (size_t i = 0; i < n; i++) h = (h ^ im->data[i]) * 1099511628211ull;
    return h;
}

static int kd__cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* SSLD removes the evaluation images from the unlabeled candidates (PaddleClas
 * ssld.md): drops from cidx[0..*nc) every candidate of ds whose pixels equal
 * an image of `test` (same shape and bytes: a hash, then a byte comparison),
 * keeping the order; *dropped gets the count. Near-duplicates (resized,
 * re-encoded) are not detected. */
static kd_status kd__drop_test_duplicates(const kd_dataset *ds, const kd_dataset *test, int64_t *cidx, int64_t *nc,
                                         int64_t *dropped) {
    *dropped = 0;
    const int64_t nt = kd_dataset_size(test);
    if (nt == 0 || *nc == 0) return KD_OK;
    uint64_t *h = malloc(sizeof *h * (size_t)nt);
    kd_image im = {0}, tim = {0};
    kd_status s = h ? KD_OK : kd_error(KD_ERR_NOMEM, "select: out of memory hashing %lld test images",
                                                   (long long)nt);
    for (int64_t i = 0; s == KD_OK && i < nt; i++) {
        if ((s = kd_dataset_read(test, i, &im)) == KD_OK) h[i] = kd__image_hash(&im);
    }
    uint64_t *sorted = NULL;
    if (s == KD_OK && !(sorted = malloc(sizeof *sorted * (size_t)nt)))
        s = kd_error(KD_ERR_NOMEM, "select: out of memory");
    if (s == KD_OK) {
        memcpy(sorted, h, sizeof *sorted * (size_t)nt);
        qsort(sorted, (size_t)nt, sizeof *sorted, kd__cmp_u64);
    }
    int64_t kept = 0;
    for (int64_t k = 0; s == KD_OK && k < *nc; k++) {
        if ((s = kd_dataset_read(ds, cidx[k], &im)) != KD_OK) break;
        uint64_t hk = kd__image_hash(&im);
        int dup = 0;
        if (bsearch(&hk, sorted, (size_t)nt, sizeof *sorted, kd__cmp_u64)) {
            /* Confirm byte for byte against every test image of that hash. */
            size_t n = (size_t)im.c * (size_t)im.h * (size_t)im.w;
            for (int64_t i = 0; s == KD_OK && i < nt && !dup; i++) {
                if (h[i] != hk) continue;
                if ((s = kd_dataset_read(test, i, &tim)) != KD_OK) break;
                dup = tim.c == im.c && tim.h == im.h && tim.w == im.w && !memcmp(tim.data, im.data, n);
            }
        }
        if (dup) ++*dropped;
        else cidx[kept++] = cidx[k];
    }
    if (s == KD_OK) *nc = kept;
    kd_image_free(&im);
    kd_image_free(&tim);
    free(sorted);
    free(h);
    return s;
}

kd_status kd_select_run(const kd_select_cfg *cfg, kd_select_result *res) {
    memset(res, 0, sizeof *res);
    kd_status s = KD_OK;
    kd_backend *be = NULL;
    kd_dataset *full = NULL, *cand = NULL;
    kd_model *t = NULL;
    int64_t *lab = NULL, *cidx = NULL, *sel = NULL, *all = NULL;
    float *probs = NULL;
    int64_t n_lab = 0, n_sel = 0;
    if (cfg->per_class < 1) return kd_error(KD_ERR_INVALID, "per_class %lld must be >= 1", (long long)cfg->per_class);
    kd_set_num_threads(cfg->threads);
    KD_TRY(kd_backend_get(cfg->backend[0] ? cfg->backend : "cpu", &be));
    KD_TRY(kd_dataset_open(cfg->data, 1, &full));
    int64_t N = kd_dataset_size(full);
    if (cfg->labels[0]) {
        s = kd_dataset_label_subset(full, cfg->labels, cfg->seed, &lab, &n_lab);
        if (s != KD_OK) {
            res->config_error = 1;
            goto done;
        }
    }
    /* The normalisation of the training split (kd train's, with or without unlabeled). */
    kd_transform_cfg tf;
    memset(&tf, 0, sizeof tf);
    tf.normalize = 1;
    kd_dataset_norm(full, tf.mean, tf.std);
    if (cfg->unlabeled[0]) {
        kd_dataset *un = NULL, *both = NULL;
        s = kd_dataset_open_split(cfg->unlabeled, KD_SPLIT_UNLABELED, &un);
        if (s == KD_OK) s = kd_dataset_concat(full, un, 1, &both);
        kd_dataset_free(un);
        if (s != KD_OK) {
            s = kd_error(s, "unlabeled %s: %s", cfg->unlabeled, kd_last_error());
            res->config_error = 1;
            goto done;
        }
        kd_dataset_free(full);
        full = both;
        N = kd_dataset_size(full);
    }
    /* Candidates: the images outside the labeled subset. */
    uint8_t *is_lab = calloc((size_t)N, 1);
    cidx = malloc(sizeof(int64_t) * (size_t)(N ? N : 1));
    if (!is_lab || !cidx) {
        free(is_lab);
        s = kd_error(KD_ERR_NOMEM, "select: out of memory");
        goto done;
    }
    for (int64_t i = 0; i < n_lab; i++) is_lab[lab[i]] = 1;
    int64_t nc = 0;
    for (int64_t i = 0; i < N; i++)
        if (!is_lab[i]) cidx[nc++] = i;
    free(is_lab);
    /* The evaluation split's images are no candidates (when the data has one). */
    kd_dataset *test = NULL;
    if (kd_dataset_open(cfg->data, 0, &test) == KD_OK) {
        s = kd__drop_test_duplicates(full, test, cidx, &nc, &res->test_duplicates);
        kd_dataset_free(test);
        if (s != KD_OK) goto done;
        if (res->test_duplicates)
            kd_log_msg(KD_LOG_INFO, "select: %lld candidates are copies of test images of %s: not selectable",
                       (long long)res->test_duplicates, cfg->data);
    } else {
        kd_clear_error();
    }
    if (nc == 0) {
        s = kd_error(KD_ERR_INVALID, "select: every training image of %s is labeled: nothing to select", cfg->data);
        res->config_error = 1;
        goto done;
    }
    int classes = kd_dataset_num_classes(full);
    kd_model_cfg mc = {.in_channels = kd_dataset_channels(full), .num_classes = classes, .seed = 0};
    s = kd_model_load_new(cfg->teacher_ckpt, NULL, &mc, &t);
    if (s != KD_OK) {
        s = kd_error(s, "teacher: %s", kd_last_error());
        res->config_error = 1;
        goto done;
    }
    if ((s = kd_dataset_select(full, cidx, nc, &cand)) != KD_OK) goto done;
    probs = malloc(sizeof(float) * (size_t)(nc * classes));
    if (!probs) {
        s = kd_error(KD_ERR_NOMEM, "select: out of memory for %lld x %d probabilities", (long long)nc, classes);
        goto done;
    }
    kd__sel_acc acc = {probs, classes, nc};
    if ((s = kd__eval_pass(t, be, cand, cfg->batch > 0 ? cfg->batch : 256, &tf, 0, kd__sel_batch, &acc)) != KD_OK)
        goto done;
    if ((s = kd_select_topk(probs, cidx, nc, classes, cfg->per_class, &sel, &n_sel)) != KD_OK) goto done;
    all = malloc(sizeof(int64_t) * (size_t)(n_lab + n_sel + 1));
    if (!all) {
        s = kd_error(KD_ERR_NOMEM, "select: out of memory");
        goto done;
    }
    memcpy(all, sel, sizeof(int64_t) * (size_t)n_sel);
    qsort(all, (size_t)n_sel, sizeof *all, kd__cmp_i64);
    int64_t u = 0;
    for (int64_t i = 0; i < n_sel; i++)
        if (u == 0 || all[u - 1] != all[i]) all[u++] = all[i];
    res->selected = u;
    res->labeled = n_lab;
    if (n_lab) memcpy(all + u, lab, sizeof(int64_t) * (size_t)n_lab); /* lab is NULL without labels */
    int64_t n_all = u + n_lab;
    qsort(all, (size_t)n_all, sizeof *all, kd__cmp_i64);
    res->total = n_all;
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) {
        s = kd_error(KD_ERR_NOMEM, "select: out of memory");
        goto done;
    }
    fprintf(f, "# kd select: %lld images of %s (training split%s%s): %lld labeled (labels %s, seed %llu) and %lld "
            "selected by %s, the %lld most probable of each class (%lld copies of test images excluded); one "
            "dataset index per line\n",
            (long long)n_all, cfg->data, cfg->unlabeled[0] ? ", then the unlabeled images of " : "",
            cfg->unlabeled, (long long)n_lab, cfg->labels[0] ? cfg->labels : "none",
            (unsigned long long)cfg->seed, (long long)u, cfg->teacher_ckpt, (long long)cfg->per_class,
            (long long)res->test_duplicates);
    for (int64_t i = 0; i < n_all; i++) fprintf(f, "%lld\n", (long long)all[i]);
    fclose(f);
    s = kd_file_write_atomic(cfg->out, text, len);
    free(text);
done:
    free(lab);
    free(cidx);
    free(sel);
    free(all);
    free(probs);
    kd_model_free(t);
    kd_dataset_free(cand);
    kd_dataset_free(full);
    return s;
}
