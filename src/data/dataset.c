/* The dataset: construction (in memory or lazy), accessors, reading one
 * sample, channel statistics, class-balanced subsets, whole-file reading
 * (plain or gzip), and format autodetection for kd_dataset_open_split. The
 * format readers live in idx.c, cifar.c, stl10.c and folder.c. */
#include "data_internal.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

/* ------------------------------------------------------------ construction */

kd_status kd__dataset_alloc(const char *name, int64_t n, int c, int h, int w, int train,
                            kd_dataset **out) {
    *out = NULL;
    if (n <= 0 || c <= 0 || h <= 0 || w <= 0)
        return kd_error(KD_ERR_INVALID, "dataset %s: bad shape (%lld, %d, %d, %d)", name,
                        (long long)n, c, h, w);
    int64_t per = (int64_t)c * h * w;
    if (per > INT64_MAX / n)
        return kd_error(KD_ERR_INVALID, "dataset %s: shape (%lld, %d, %d, %d) overflows", name,
                        (long long)n, c, h, w);
    kd_dataset *ds = calloc(1, sizeof *ds);
    if (!ds) goto fail_nomem;
    snprintf(ds->name, sizeof ds->name, "%s", name);
    ds->n = n;
    ds->c = c;
    ds->h = h;
    ds->w = w;
    ds->train = train;
    ds->split = train ? KD_SPLIT_TRAIN : KD_SPLIT_TEST;
    ds->source = KD__SRC_MEMORY;
    ds->fd = -1;
    ds->images = malloc((size_t)(n * per));
    if (!ds->images) goto fail_nomem;
    ds->labels = malloc((size_t)n * sizeof *ds->labels);
    if (!ds->labels) goto fail_nomem;
    *out = ds;
    return KD_OK;
fail_nomem:
    kd_dataset_free(ds);
    return kd_error(KD_ERR_NOMEM, "dataset %s: cannot allocate %lld images of %dx%dx%d", name,
                    (long long)n, c, h, w);
}

kd_status kd__dataset_alloc_lazy(const char *name, int64_t n, int c, int h, int w,
                                 kd__source source, kd_dataset **out) {
    *out = NULL;
    if (n <= 0 || c <= 0 || h < 0 || w < 0)
        return kd_error(KD_ERR_INVALID, "dataset %s: bad shape (%lld, %d, %d, %d)", name,
                        (long long)n, c, h, w);
    kd_dataset *ds = calloc(1, sizeof *ds);
    if (!ds) goto fail_nomem;
    snprintf(ds->name, sizeof ds->name, "%s", name);
    ds->n = n;
    ds->c = c;
    ds->h = h;
    ds->w = w;
    ds->train = 1;
    ds->split = KD_SPLIT_TRAIN;
    ds->source = source;
    ds->fd = -1;
    ds->labels = malloc((size_t)n * sizeof *ds->labels);
    if (!ds->labels) goto fail_nomem;
    *out = ds;
    return KD_OK;
fail_nomem:
    kd_dataset_free(ds);
    return kd_error(KD_ERR_NOMEM, "dataset %s: cannot allocate the index of %lld samples", name,
                    (long long)n);
}

kd_status kd__dataset_set_classes(kd_dataset *ds, const char *const *names, int k) {
    size_t total = 0;
    for (int i = 0; i < k; i++) total += strlen(names[i]) + 1;
    free(ds->cpool);
    free(ds->coffs);
    ds->cpool = malloc(total ? total : 1);
    ds->coffs = malloc((size_t)(k ? k : 1) * sizeof *ds->coffs);
    if (!ds->cpool || !ds->coffs) {
        free(ds->cpool);
        free(ds->coffs);
        ds->cpool = NULL;
        ds->coffs = NULL;
        return kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for class names", ds->name);
    }
    size_t o = 0;
    for (int i = 0; i < k; i++) {
        size_t l = strlen(names[i]) + 1;
        memcpy(ds->cpool + o, names[i], l);
        ds->coffs[i] = (int64_t)o;
        o += l;
    }
    return KD_OK;
}

void kd__dataset_drop_labels(kd_dataset *ds) {
    for (int64_t i = 0; i < ds->n; i++) ds->labels[i] = -1;
    ds->split = KD_SPLIT_UNLABELED;
    ds->train = 1;
}

kd_status kd_dataset_from_memory(const char *name, int64_t n, int c, int h, int w,
                                 const uint8_t *images, const int32_t *labels, int num_classes,
                                 kd_dataset **out) {
    if (!out || !images || !labels || !name)
        return kd_error(KD_ERR_INVALID, "kd_dataset_from_memory: NULL argument");
    *out = NULL;
    if (num_classes <= 0)
        return kd_error(KD_ERR_INVALID, "dataset %s: num_classes %d must be positive", name,
                        num_classes);
    for (int64_t i = 0; i < n; i++)
        if (labels[i] < 0 || labels[i] >= num_classes)
            return kd_error(KD_ERR_INVALID, "dataset %s: label %d of sample %lld is outside [0, %d)",
                            name, labels[i], (long long)i, num_classes);
    kd_dataset *ds = NULL;
    KD_TRY(kd__dataset_alloc(name, n, c, h, w, 1, &ds));
    memcpy(ds->images, images, (size_t)(n * c * h * w));
    memcpy(ds->labels, labels, (size_t)n * sizeof *labels);
    ds->num_classes = num_classes;
    *out = ds;
    return KD_OK;
}

void kd_dataset_free(kd_dataset *ds) {
    if (!ds) return;
    if (ds->source == KD__SRC_STL10 && ds->fd >= 0) close(ds->fd);
    if (ds->source == KD__SRC_CONCAT) kd__concat_free_parts(ds);
    free(ds->images);
    free(ds->labels);
    free(ds->recs);
    free(ds->pool);
    free(ds->offs);
    free(ds->cpool);
    free(ds->coffs);
    free(ds);
}

/* --------------------------------------------------------------- accessors */

int64_t kd_dataset_size(const kd_dataset *ds) { return ds->n; }
int kd_dataset_channels(const kd_dataset *ds) { return ds->c; }
int kd_dataset_height(const kd_dataset *ds) { return ds->h; }
int kd_dataset_width(const kd_dataset *ds) { return ds->w; }
int kd_dataset_num_classes(const kd_dataset *ds) { return ds->num_classes; }
int32_t kd_dataset_label(const kd_dataset *ds, int64_t i) { return ds->labels[i]; }
const int32_t *kd_dataset_labels(const kd_dataset *ds) { return ds->labels; }
const char *kd_dataset_name(const kd_dataset *ds) { return ds->name; }
int kd_dataset_is_train(const kd_dataset *ds) { return ds->train; }
kd_split kd_dataset_split(const kd_dataset *ds) { return ds->split; }
int kd_dataset_is_lazy(const kd_dataset *ds) { return ds->source != KD__SRC_MEMORY; }

const uint8_t *kd_dataset_image(const kd_dataset *ds, int64_t i) {
    if (ds->source != KD__SRC_MEMORY) return NULL;
    return ds->images + i * (int64_t)ds->c * ds->h * ds->w;
}

const char *kd_dataset_class_name(const kd_dataset *ds, int k) {
    if (!ds->cpool || k < 0 || k >= ds->num_classes) return NULL;
    return ds->cpool + ds->coffs[k];
}

const char *kd_dataset_path(const kd_dataset *ds, int64_t i) {
    if (i < 0 || i >= ds->n) return NULL;
    if (ds->source == KD__SRC_FILES) return ds->pool + ds->offs[i];
    if (ds->source == KD__SRC_STL10) return ds->path;
    if (ds->source == KD__SRC_CONCAT) {
        int64_t j;
        const kd_dataset *part = kd__concat_locate(ds, i, &j);
        return kd_dataset_path(part, j);
    }
    return NULL;
}

/* ------------------------------------------------------------------ labels */

int64_t kd_dataset_label_range(const kd_dataset *ds, int32_t *lo, int32_t *hi) {
    int64_t m = 0;
    int32_t a = -1, b = -1;
    for (int64_t i = 0; i < ds->n; i++) {
        int32_t y = ds->labels[i];
        if (y < 0) continue;
        if (!m || y < a) a = y;
        if (!m || y > b) b = y;
        m++;
    }
    *lo = a;
    *hi = b;
    return m;
}

/* Appends text to buf (length *len of n); once it no longer fits, ends buf
 * with "..." and returns 0. */
static int kd__append(char *buf, size_t n, size_t *len, const char *text) {
    size_t t = strlen(text);
    if (*len + t + 4 > n) {
        if (*len + 4 <= n) {
            memcpy(buf + *len, "...", 4);
            *len += 3;
        }
        return 0;
    }
    memcpy(buf + *len, text, t + 1);
    *len += t;
    return 1;
}

int kd_dataset_missing_classes(const kd_dataset *ds, int num_classes, char *buf, size_t n) {
    if (buf && n) buf[0] = '\0';
    if (num_classes <= 0) return 0;
    uint8_t *seen = calloc((size_t)num_classes, 1);
    if (!seen) return 0;
    for (int64_t i = 0; i < ds->n; i++)
        if (ds->labels[i] >= 0 && ds->labels[i] < num_classes) seen[ds->labels[i]] = 1;
    int missing = 0, room = buf && n >= 4;
    size_t len = 0;
    for (int k = 0; k < num_classes;) {
        if (seen[k]) {
            k++;
            continue;
        }
        int e = k;
        while (e + 1 < num_classes && !seen[e + 1]) e++;
        missing += e - k + 1;
        if (room) {
            char part[48];
            if (e == k) snprintf(part, sizeof part, "%s%d", len ? ", " : "", k);
            else snprintf(part, sizeof part, "%s%d-%d", len ? ", " : "", k, e);
            room = kd__append(buf, n, &len, part);
        }
        k = e + 1;
    }
    free(seen);
    return missing;
}

int kd_dataset_check_labels(const kd_dataset *train, const kd_dataset *eval, int num_classes,
                            char *buf, size_t n) {
    int warnings = 0;
    size_t len = 0;
    char msg[1024];
    if (buf && n) buf[0] = '\0';
    int32_t tlo, thi, elo, ehi;
    int64_t tn = kd_dataset_label_range(train, &tlo, &thi);
    int64_t en = eval ? kd_dataset_label_range(eval, &elo, &ehi) : 0;
    if (tn > 0 && en > 0 && (tlo < elo || thi > ehi)) {
        snprintf(msg, sizeof msg,
                 "training labels of %s span %d..%d, outside the evaluation labels of %s "
                 "(%d..%d): check that both splits come from the same dataset",
                 train->name, tlo, thi, eval->name, elo, ehi);
        kd_log_msg(KD_LOG_WARN, "%s", msg);
        warnings++;
        if (buf) {
            kd__append(buf, n, &len, msg);
            kd__append(buf, n, &len, "\n");
        }
    }
    if (tn > 0) {
        char list[512];
        int missing = kd_dataset_missing_classes(train, num_classes, list, sizeof list);
        if (missing) {
            snprintf(msg, sizeof msg, "%d of the %d classes have no training image in %s: %s",
                     missing, num_classes, train->name, list);
            kd_log_msg(KD_LOG_WARN, "%s", msg);
            warnings++;
            if (buf) {
                kd__append(buf, n, &len, msg);
                kd__append(buf, n, &len, "\n");
            }
        }
    }
    return warnings;
}

/* ------------------------------------------------------- reading a sample */

static kd_status kd__image_reserve(kd_image *im, size_t bytes, const char *what) {
    if (im->cap >= bytes) return KD_OK;
    uint8_t *p = realloc(im->data, bytes);
    if (!p) return kd_error(KD_ERR_NOMEM, "%s: cannot allocate %zu bytes for an image", what, bytes);
    im->data = p;
    im->cap = bytes;
    return KD_OK;
}

kd_status kd_dataset_read(const kd_dataset *ds, int64_t i, kd_image *im) {
    if (i < 0 || i >= ds->n)
        return kd_error(KD_ERR_INVALID, "dataset %s: sample %lld outside [0, %lld)", ds->name,
                        (long long)i, (long long)ds->n);
    size_t per = (size_t)ds->c * (size_t)ds->h * (size_t)ds->w;
    switch (ds->source) {
    case KD__SRC_MEMORY:
        KD_TRY(kd__image_reserve(im, per, ds->name));
        memcpy(im->data, kd_dataset_image(ds, i), per);
        break;
    case KD__SRC_STL10:
        KD_TRY(kd__image_reserve(im, per, ds->path));
        KD_TRY(kd__stl10_read(ds, ds->recs[i], im->data));
        break;
    case KD__SRC_FILES:
        return kd_image_read(ds->pool + ds->offs[i], im);
    case KD__SRC_CONCAT: {
        int64_t j;
        const kd_dataset *part = kd__concat_locate(ds, i, &j);
        return kd_dataset_read(part, j, im);
    }
    }
    im->c = ds->c;
    im->h = ds->h;
    im->w = ds->w;
    return KD_OK;
}

kd_status kd_dataset_probe(const kd_dataset *ds, int64_t i, int *c, int *h, int *w) {
    if (i < 0 || i >= ds->n)
        return kd_error(KD_ERR_INVALID, "dataset %s: sample %lld outside [0, %lld)", ds->name,
                        (long long)i, (long long)ds->n);
    if (ds->source == KD__SRC_FILES) return kd_image_probe(ds->pool + ds->offs[i], c, h, w);
    if (ds->source == KD__SRC_CONCAT) {
        int64_t j;
        const kd_dataset *part = kd__concat_locate(ds, i, &j);
        return kd_dataset_probe(part, j, c, h, w);
    }
    *c = ds->c;
    *h = ds->h;
    *w = ds->w;
    return KD_OK;
}

kd_status kd_dataset_channel_stats(const kd_dataset *ds, int64_t max_samples, float mean[4],
                                   float std[4]) {
    int64_t m = max_samples > 0 && max_samples < ds->n ? max_samples : ds->n;
    double s[4] = {0}, s2[4] = {0}, cnt = 0;
    kd_image im = {0};
    int used = 0;
    for (int64_t k = 0; k < m; k++) {
        int64_t i = m == ds->n ? k : (int64_t)((double)k * (double)ds->n / (double)m);
        if (kd_dataset_read(ds, i, &im) != KD_OK) continue; /* unreadable: left out */
        int64_t hw = (int64_t)im.h * im.w;
        for (int ch = 0; ch < im.c && ch < 4; ch++) {
            const uint8_t *p = im.data + ch * hw;
            uint64_t a = 0, a2 = 0;
            for (int64_t j = 0; j < hw; j++) a += p[j], a2 += (uint64_t)p[j] * p[j];
            s[ch] += (double)a;
            s2[ch] += (double)a2;
        }
        cnt += (double)hw;
        used++;
    }
    kd_image_free(&im);
    for (int ch = 0; ch < 4; ch++) mean[ch] = 0.0f, std[ch] = 1.0f;
    if (!used)
        return kd_error(KD_ERR_FORMAT, "dataset %s: none of %lld samples could be read", ds->name,
                        (long long)m);
    for (int ch = 0; ch < ds->c && ch < 4; ch++) {
        double mu = s[ch] / cnt / 255.0, var = s2[ch] / cnt / (255.0 * 255.0) - mu * mu;
        mean[ch] = (float)mu;
        std[ch] = var > 1e-12 ? (float)sqrt(var) : 1.0f;
    }
    return KD_OK;
}

/* ------------------------------------------------------------------ subset */

#define KD__SUBSET_TAG 0x535542534554ull /* "SUBSET" */

/* The kept samples of a lazy dataset: record indices or paths, labels. */
static kd_status kd__subset_lazy(const kd_dataset *ds, const char *name, int64_t n,
                                 const uint8_t *keep, kd_dataset **out) {
    kd_dataset *sub = NULL;
    KD_TRY(kd__dataset_alloc_lazy(name, n, ds->c, ds->h, ds->w, ds->source, &sub));
    sub->num_classes = ds->num_classes;
    sub->train = ds->train;
    sub->split = ds->split;
    memcpy(sub->path, ds->path, sizeof sub->path);
    size_t pool = 0;
    if (ds->source == KD__SRC_FILES)
        for (int64_t i = 0; i < ds->n; i++)
            if (keep[i]) pool += strlen(ds->pool + ds->offs[i]) + 1;
    if (ds->source == KD__SRC_STL10) {
        sub->recs = malloc((size_t)n * sizeof *sub->recs);
        sub->fd = dup(ds->fd);
        if (sub->fd < 0) {
            kd_dataset_free(sub);
            return kd_error(KD_ERR_IO, "%s: cannot duplicate the file descriptor: %s", ds->path,
                            strerror(errno));
        }
    } else {
        sub->pool = malloc(pool ? pool : 1);
        sub->offs = malloc((size_t)n * sizeof *sub->offs);
    }
    if ((ds->source == KD__SRC_STL10 && !sub->recs) ||
        (ds->source == KD__SRC_FILES && (!sub->pool || !sub->offs))) {
        kd_dataset_free(sub);
        return kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for a subset", ds->name);
    }
    if (ds->cpool) {
        const char **names = malloc((size_t)ds->num_classes * sizeof *names);
        kd_status st = names ? KD_OK : kd_error(KD_ERR_NOMEM, "out of memory");
        for (int k = 0; names && k < ds->num_classes; k++) names[k] = ds->cpool + ds->coffs[k];
        if (st == KD_OK) st = kd__dataset_set_classes(sub, names, ds->num_classes);
        free(names);
        if (st != KD_OK) {
            kd_dataset_free(sub);
            return st;
        }
    }
    int64_t m = 0;
    size_t o = 0;
    for (int64_t i = 0; i < ds->n; i++) {
        if (!keep[i]) continue;
        if (ds->source == KD__SRC_STL10) {
            sub->recs[m] = ds->recs[i];
        } else {
            size_t l = strlen(ds->pool + ds->offs[i]) + 1;
            memcpy(sub->pool + o, ds->pool + ds->offs[i], l);
            sub->offs[m] = (int64_t)o;
            o += l;
        }
        sub->labels[m++] = ds->labels[i];
    }
    *out = sub;
    return KD_OK;
}

kd_status kd__class_groups_init(kd__class_groups *g, const kd_dataset *ds, int by_label) {
    memset(g, 0, sizeof *g);
    g->K = by_label ? ds->num_classes : 1;
    if (g->K < 1) g->K = 1;
    g->count = calloc((size_t)g->K, sizeof *g->count);
    g->start = calloc((size_t)g->K + 1, sizeof *g->start);
    g->order = malloc((size_t)ds->n * sizeof *g->order);
    int64_t *fill = calloc((size_t)g->K, sizeof *fill);
    if (!g->count || !g->start || !g->order || !fill) {
        free(fill);
        kd__class_groups_free(g);
        return kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for a subset", ds->name);
    }
#define KD__CLS(i) (by_label ? ds->labels[i] : 0)
    for (int64_t i = 0; i < ds->n; i++)
        if (KD__CLS(i) >= 0 && KD__CLS(i) < g->K) g->count[KD__CLS(i)]++;
    for (int k = 0; k < g->K; k++) g->start[k + 1] = g->start[k] + g->count[k];
    for (int k = 0; k < g->K; k++) fill[k] = g->start[k];
    for (int64_t i = 0; i < ds->n; i++)
        if (KD__CLS(i) >= 0 && KD__CLS(i) < g->K) g->order[fill[KD__CLS(i)]++] = i;
#undef KD__CLS
    free(fill);
    return KD_OK;
}

void kd__class_groups_free(kd__class_groups *g) {
    free(g->count);
    free(g->start);
    free(g->order);
    memset(g, 0, sizeof *g);
}

void kd__class_groups_pick(kd__class_groups *g, const int64_t *quota, uint64_t seed, uint64_t tag, uint8_t *keep) {
    for (int k = 0; k < g->K; k++) {
        kd_rng r;
        kd_rng_init(&r, seed, kd_rng_key(tag, (uint64_t)k));
        int64_t *cls = g->order + g->start[k];
        for (int64_t i = 0; i < quota[k] && i < g->count[k]; i++) {
            int64_t j = i + (int64_t)kd_rng_below(&r, (uint32_t)(g->count[k] - i));
            int64_t t = cls[i];
            cls[i] = cls[j];
            cls[j] = t;
            keep[cls[i]] = 1;
        }
    }
}

kd_status kd__dataset_keep(const kd_dataset *ds, const char *name, const uint8_t *keep, int64_t n,
                           kd_dataset **out) {
    *out = NULL;
    if (ds->source == KD__SRC_CONCAT) return kd__concat_keep(ds, name, keep, n, out);
    if (ds->source != KD__SRC_MEMORY) return kd__subset_lazy(ds, name, n, keep, out);
    kd_dataset *sub = NULL;
    KD_TRY(kd__dataset_alloc(name, n, ds->c, ds->h, ds->w, ds->train, &sub));
    sub->num_classes = ds->num_classes;
    sub->split = ds->split;
    int64_t per = (int64_t)ds->c * ds->h * ds->w, m = 0;
    for (int64_t i = 0; i < ds->n; i++) {
        if (!keep[i]) continue;
        memcpy(sub->images + m * per, ds->images + i * per, (size_t)per);
        sub->labels[m++] = ds->labels[i];
    }
    *out = sub;
    return KD_OK;
}

kd_status kd_dataset_subset(const kd_dataset *ds, int64_t n, uint64_t seed, kd_dataset **out) {
    *out = NULL;
    if (n <= 0 || n > ds->n)
        return kd_error(KD_ERR_INVALID, "dataset %s: subset of %lld samples out of %lld", ds->name,
                        (long long)n, (long long)ds->n);
    /* Unlabeled data is one class: a uniform subset. */
    int labeled = ds->labels[0] >= 0 && ds->num_classes > 0;
    kd__class_groups g;
    KD_TRY(kd__class_groups_init(&g, ds, labeled));
    int K = g.K;
    kd_status st = KD_OK;
    int64_t *quota = calloc((size_t)K, sizeof *quota);
    uint8_t *keep = calloc((size_t)ds->n, 1);
    if (!quota || !keep) {
        st = kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for a subset", ds->name);
        goto cleanup;
    }
    /* Quotas: an even split, capped by what each class has; the shortfall is
     * handed out one sample at a time, in class order, to classes with spare. */
    int64_t short_by = 0, avail = 0;
    for (int k = 0; k < K; k++) {
        int64_t q = n / K + (k < n % K);
        quota[k] = q < g.count[k] ? q : g.count[k];
        short_by += q - quota[k];
        avail += g.count[k];
    }
    if (n > avail) {
        st = kd_error(KD_ERR_INVALID, "dataset %s: subset of %lld samples out of %lld labeled", ds->name,
                      (long long)n, (long long)avail);
        goto cleanup;
    }
    while (short_by > 0)
        for (int k = 0; k < K && short_by > 0; k++)
            if (quota[k] < g.count[k]) quota[k]++, short_by--;
    /* Per class, a partial Fisher-Yates shuffle picks quota[k] samples. */
    kd__class_groups_pick(&g, quota, seed, KD__SUBSET_TAG, keep);
    char name[160];
    snprintf(name, sizeof name, "%s[%lld]", ds->name, (long long)n);
    st = kd__dataset_keep(ds, name, keep, n, out);
cleanup:
    kd__class_groups_free(&g);
    free(quota);
    free(keep);
    return st;
}

/* ------------------------------------------------------------------- files */

int kd__is_dir(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

int kd__is_file(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

const char *kd__path_basename(const char *path, char *buf, size_t n) {
    size_t end = strlen(path);
    while (end > 1 && path[end - 1] == '/') end--;
    size_t beg = end;
    while (beg > 0 && path[beg - 1] != '/') beg--;
    size_t len = end - beg;
    if (len >= n) len = n - 1;
    memcpy(buf, path + beg, len);
    buf[len] = '\0';
    return buf;
}

static int kd__ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && memcmp(s + a - b, suffix, b) == 0;
}

uint64_t kd__physical_memory(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0) return UINT64_MAX; /* unknown: no limit */
    return (uint64_t)pages * (uint64_t)page;
}

kd_status kd__check_fits_memory(const char *path, uint64_t bytes, const char *what) {
    uint64_t phys = kd__physical_memory();
    if (bytes > phys)
        return kd_error(KD_ERR_FORMAT,
                        "%s: %s needs %llu bytes of memory, more than this machine has (%llu); "
                        "the file is corrupt or not meant for this machine",
                        path, what, (unsigned long long)bytes, (unsigned long long)phys);
    return KD_OK;
}

/* Grows p to hold at least `need` bytes (doubling, capped at `max`). */
static int kd__grow_to(uint8_t **p, size_t *cap, size_t need, size_t max) {
    if (*cap >= need) return 1;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c = c > max / 2 ? max : c * 2;
    if (c < need) c = need;
    uint8_t *q = realloc(*p, c);
    if (!q) return 0;
    *p = q;
    *cap = c;
    return 1;
}

kd_status kd__read_whole_file(const char *path, size_t head_len, kd__size_fn size_fn,
                              void *ctx, uint8_t **buf, size_t *len) {
    *buf = NULL;
    *len = 0;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        if (errno == ENOENT) return kd_error(KD_ERR_NOT_FOUND, "%s: no such file", path);
        return kd_error(KD_ERR_IO, "%s: %s", path, strerror(errno));
    }
    if (!S_ISREG(sb.st_mode)) return kd_error(KD_ERR_IO, "%s: not a regular file", path);
    gzFile f = gzopen(path, "rb");
    if (!f) return kd_error(KD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    /* 256 KiB buffers for large files (fewer reads), but no larger than the
     * file: zlib allocates 3x this per open, which small files (a short list
     * or a test split of a few records) would pay in page faults. */
    const off_t big = (off_t)1 << 18, small = 8192;
    gzbuffer(f, (unsigned)(sb.st_size > big ? big : sb.st_size < small ? small : sb.st_size));
    kd_status st = KD_OK;
    uint8_t *p = NULL;
    size_t cap = 0, n = 0;
    /* The header first (inflated when gzipped): it says how long the whole
     * content may be. Without a header check only plain files are read, and
     * never more than their size. */
    uint8_t head[64];
    if (head_len > sizeof head) head_len = sizeof head;
    int got = head_len ? gzread(f, head, (unsigned)head_len) : gzread(f, head, 1);
    int plain = gzdirect(f);
    uint64_t limit;
    char what[160] = "";
    if (got < 0) goto zerror;
    if (size_fn) {
        st = size_fn(ctx, path, head, (size_t)got, &limit, what, sizeof what);
        if (st != KD_OK) goto cleanup;
        st = kd__check_fits_memory(path, limit, what);
        if (st != KD_OK) goto cleanup;
        if (plain && (uint64_t)sb.st_size > limit) {
            st = kd_error(KD_ERR_FORMAT,
                          "%s: trailing data: expected %llu bytes (%s), the file holds %lld",
                          path, (unsigned long long)limit, what, (long long)sb.st_size);
            goto cleanup;
        }
    } else {
        if (!plain) {
            st = kd_error(KD_ERR_FORMAT,
                          "%s: gzip-compressed; only IDX files are read compressed (gunzip it "
                          "first)",
                          path);
            goto cleanup;
        }
        limit = (uint64_t)sb.st_size;
        snprintf(what, sizeof what, "the whole file");
        st = kd__check_fits_memory(path, limit, "reading it");
        if (st != KD_OK) goto cleanup;
    }
    if (limit > (uint64_t)SIZE_MAX - 4096) {
        st = kd_error(KD_ERR_NOMEM, "%s: %llu bytes do not fit in memory", path,
                      (unsigned long long)limit);
        goto cleanup;
    }
    /* One byte past the limit detects a stream that goes on. */
    size_t max = (size_t)limit + 1;
    size_t first = plain ? (size_t)sb.st_size + 1 : (size_t)sb.st_size * 4 + 65536;
    if (first > max) first = max;
    if (first < (size_t)got) first = (size_t)got;
    if (!kd__grow_to(&p, &cap, first ? first : 1, max)) goto nomem;
    memcpy(p, head, (size_t)got);
    n = (size_t)got;
    while (got > 0 && n < max) {
        if (n == cap && !kd__grow_to(&p, &cap, n + 1, max)) goto nomem;
        size_t want = cap - n;
        if (want > (1u << 30)) want = 1u << 30;
        got = gzread(f, p + n, (unsigned)want);
        if (got > 0) n += (size_t)got;
    }
    if (got < 0) goto zerror;
    if (n > limit) {
        st = kd_error(KD_ERR_FORMAT,
                      "%s: trailing data: %s goes on past the %llu bytes its header allows (%s)",
                      path, plain ? "the file" : "the gzip stream", (unsigned long long)limit,
                      what);
        goto cleanup;
    }
zerror:;
    int zerr = Z_OK;
    const char *zmsg = gzerror(f, &zerr);
    if (zerr == Z_BUF_ERROR) {
        st = kd_error(KD_ERR_FORMAT,
                      "%s: gzip stream is truncated (unexpected end of file after %zu "
                      "decompressed bytes)",
                      path, n);
        goto cleanup;
    }
    if (zerr == Z_ERRNO) {
        st = kd_error(KD_ERR_IO, "%s: read error: %s", path, strerror(errno));
        goto cleanup;
    }
    if (zerr != Z_OK) {
        st = kd_error(KD_ERR_FORMAT, "%s: corrupt gzip data: %s", path, zmsg);
        goto cleanup;
    }
    if (n < cap) {
        uint8_t *q = realloc(p, n ? n : 1);
        if (q) p = q;
    }
    *buf = p;
    *len = n;
    p = NULL;
    goto cleanup;
nomem:
    st = kd_error(KD_ERR_NOMEM, "%s: cannot allocate %zu bytes", path, cap * 2);
cleanup:
    free(p);
    gzclose(f);
    return st;
}

/* ---------------------------------------------------------- autodetection */

/* 1 if dir holds any file whose name ends with idx3-ubyte[.gz]. */
static int kd__dir_has_idx(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d)) != NULL)
        found = kd__ends_with(e->d_name, "idx3-ubyte") || kd__ends_with(e->d_name, "idx3-ubyte.gz");
    closedir(d);
    return found;
}

static int kd__dir_has(const char *dir, const char *name) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return kd__is_file(p);
}

/* 1 if path is DIR/PREFIX with some DIR/PREFIX-*idx* file. */
static int kd__is_idx_prefix(const char *path) {
    char dir[4096], base[256];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0';
    else snprintf(dir, sizeof dir, ".");
    kd__path_basename(path, base, sizeof base);
    size_t bl = strlen(base);
    DIR *d = opendir(dir);
    if (!d) return 0;
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d)) != NULL)
        found = strncmp(e->d_name, base, bl) == 0 && e->d_name[bl] == '-' &&
                strstr(e->d_name + bl, "idx") != NULL;
    closedir(d);
    return found;
}

/* 1 if dir directly holds a .jpg/.jpeg/.png file (a flat folder of images),
 * else 2 if one of its subdirectories does (class folders), else 0. */
static int kd__dir_image_kind(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int direct = 0, nested = 0;
    struct dirent *e;
    while (!direct && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        if (kd__is_image_name(e->d_name)) {
            direct = 1;
            continue;
        }
        char p[4096];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (nested || !kd__is_dir(p)) continue;
        DIR *sd = opendir(p);
        struct dirent *f;
        while (sd && !nested && (f = readdir(sd)) != NULL) nested = kd__is_image_name(f->d_name);
        if (sd) closedir(sd);
    }
    closedir(d);
    return direct ? 1 : nested ? 2 : 0;
}

/* Finishes a dataset opened for `split` from a labelled source: marks the
 * split, or drops the labels for UNLABELED. */
static kd_status kd__as_split(kd_status st, kd_split split, kd_dataset **out) {
    if (st != KD_OK) return st;
    if (split == KD_SPLIT_UNLABELED) kd__dataset_drop_labels(*out);
    else {
        (*out)->split = split;
        (*out)->train = split == KD_SPLIT_TRAIN;
    }
    return KD_OK;
}

/* An image folder with split subdirectories (DIR/train, DIR/val or DIR/test,
 * DIR/unlabeled), or DIR itself for every split when `any_split`. */
static kd_status kd__open_folder_split(const char *dir, kd_split split, int any_split,
                                       kd_dataset **out) {
    char p[4096];
    snprintf(p, sizeof p, "%s/train", dir);
    int has_train = kd__is_dir(p);
    if (split == KD_SPLIT_UNLABELED) {
        snprintf(p, sizeof p, "%s/unlabeled", dir);
        if (kd__is_dir(p)) return kd__as_split(kd_dataset_open_unlabeled(p, out), split, out);
        snprintf(p, sizeof p, "%s%s", dir, has_train ? "/train" : "");
        return kd__as_split(kd_dataset_open_unlabeled(p, out), split, out);
    }
    if (has_train) {
        if (split == KD_SPLIT_TRAIN) {
            snprintf(p, sizeof p, "%s/train", dir);
            return kd__as_split(kd_dataset_open_folder(p, out), split, out);
        }
        static const char *test_dirs[] = {"val", "test"};
        for (int i = 0; i < 2; i++) {
            snprintf(p, sizeof p, "%s/%s", dir, test_dirs[i]);
            if (kd__is_dir(p)) return kd__as_split(kd_dataset_open_folder(p, out), split, out);
        }
        return kd_error(KD_ERR_NOT_FOUND, "%s: image folder has train/ but no val/ or test/ split",
                        dir);
    }
    if (split == KD_SPLIT_TEST && !any_split)
        return kd_error(KD_ERR_NOT_FOUND,
                        "%s: image folder has no test split (no val/ or test/ subdirectory); pass "
                        "folder:%s to use the same images for every split",
                        dir, dir);
    return kd__as_split(kd_dataset_open_folder(dir, out), split, out);
}

static kd_status kd__open_any(const char *spec, kd_split split, kd_dataset **out) {
    int train = split != KD_SPLIT_TEST;
    if (strncmp(spec, "idx:", 4) == 0)
        return kd__as_split(kd_dataset_open_idx(spec + 4, train, out), split, out);
    if (strncmp(spec, "cifar10:", 8) == 0)
        return kd__as_split(kd_dataset_open_cifar(spec + 8, 10, train, out), split, out);
    if (strncmp(spec, "cifar100:", 9) == 0)
        return kd__as_split(kd_dataset_open_cifar(spec + 9, 100, train, out), split, out);
    if (strncmp(spec, "stl10:", 6) == 0) return kd_dataset_open_stl10(spec + 6, split, out);
    if (strncmp(spec, "folder:", 7) == 0) {
        if (!kd__is_dir(spec + 7)) return kd_error(KD_ERR_NOT_FOUND, "%s: no such directory", spec + 7);
        return kd__open_folder_split(spec + 7, split, 1, out);
    }
    if (strncmp(spec, "unlabeled:", 10) == 0) {
        KD_TRY(kd_dataset_open_unlabeled(spec + 10, out));
        (*out)->split = split;
        (*out)->train = split != KD_SPLIT_TEST;
        return KD_OK;
    }
    if (strncmp(spec, "list:", 5) == 0)
        return kd__as_split(kd_dataset_open_list(spec + 5, out), split, out);
    if (!kd__is_dir(spec)) {
        if (kd__is_idx_prefix(spec))
            return kd__as_split(kd_dataset_open_idx(spec, train, out), split, out);
        if (kd__is_file(spec)) return kd__as_split(kd_dataset_open_list(spec, out), split, out);
        return kd_error(KD_ERR_NOT_FOUND, "%s: no such directory", spec);
    }
    if (kd__dir_has_idx(spec)) return kd__as_split(kd_dataset_open_idx(spec, train, out), split, out);
    if (kd__dir_has(spec, "data_batch_1.bin") || kd__dir_has(spec, "test_batch.bin"))
        return kd__as_split(kd_dataset_open_cifar(spec, 10, train, out), split, out);
    if (kd__dir_has(spec, "train.bin") || kd__dir_has(spec, "test.bin"))
        return kd__as_split(kd_dataset_open_cifar(spec, 100, train, out), split, out);
    if (kd__dir_has(spec, "train_X.bin") || kd__dir_has(spec, "test_X.bin") ||
        kd__dir_has(spec, "unlabeled_X.bin"))
        return kd_dataset_open_stl10(spec, split, out);
    static const char *subdirs[] = {"cifar-10-batches-bin", "cifar-100-binary", "stl10_binary"};
    for (size_t i = 0; i < sizeof subdirs / sizeof subdirs[0]; i++) {
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%s", spec, subdirs[i]);
        if (!kd__is_dir(sub)) continue;
        if (i == 2) return kd_dataset_open_stl10(sub, split, out);
        return kd__as_split(kd_dataset_open_cifar(sub, i == 0 ? 10 : 100, train, out), split, out);
    }
    char tr[4096];
    snprintf(tr, sizeof tr, "%s/train", spec);
    int kind = kd__dir_image_kind(spec);
    if (kd__dir_image_kind(tr) == 2 || kind == 2) return kd__open_folder_split(spec, split, 0, out);
    if (kind == 1) {
        if (split != KD_SPLIT_UNLABELED)
            return kd_error(KD_ERR_NOT_FOUND,
                            "%s: holds images but no class folders; it can be opened as unlabeled "
                            "data (unlabeled:%s)",
                            spec, spec);
        return kd_dataset_open_unlabeled(spec, out);
    }
    return kd_error(KD_ERR_NOT_FOUND,
                    "%s: no dataset found (looked for MNIST-style IDX files "
                    "*train-images-idx3-ubyte[.gz] etc., CIFAR-10 data_batch_1..5.bin / "
                    "test_batch.bin, CIFAR-100 train.bin / test.bin, STL-10 *_X.bin, the "
                    "subdirectories cifar-10-batches-bin, cifar-100-binary, stl10_binary, and "
                    "class folders of .jpg/.png images)",
                    spec);
}

kd_status kd_dataset_open_split(const char *spec, kd_split split, kd_dataset **out) {
    if (!spec || !out) return kd_error(KD_ERR_INVALID, "kd_dataset_open_split: NULL argument");
    *out = NULL;
    if (split != KD_SPLIT_TRAIN && split != KD_SPLIT_TEST && split != KD_SPLIT_UNLABELED)
        return kd_error(KD_ERR_INVALID, "%s: unknown split %d", spec, (int)split);
    return kd__open_any(spec, split, out);
}

kd_status kd_dataset_open(const char *spec, int train, kd_dataset **out) {
    return kd_dataset_open_split(spec, train ? KD_SPLIT_TRAIN : KD_SPLIT_TEST, out);
}
