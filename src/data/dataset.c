/* The in-memory dataset: construction, accessors, class-balanced subsets,
 * whole-file reading (plain or gzip), and format autodetection for
 * kd_dataset_open. The format readers live in idx.c and cifar.c. */
#include "data_internal.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
    free(ds->images);
    free(ds->labels);
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

const uint8_t *kd_dataset_image(const kd_dataset *ds, int64_t i) {
    return ds->images + i * (int64_t)ds->c * ds->h * ds->w;
}

/* ------------------------------------------------------------------ subset */

#define KD__SUBSET_TAG 0x535542534554ull /* "SUBSET" */

kd_status kd_dataset_subset(const kd_dataset *ds, int64_t n, uint64_t seed, kd_dataset **out) {
    *out = NULL;
    if (n <= 0 || n > ds->n)
        return kd_error(KD_ERR_INVALID, "dataset %s: subset of %lld samples out of %lld", ds->name,
                        (long long)n, (long long)ds->n);
    kd_status st = KD_OK;
    int K = ds->num_classes;
    int64_t *count = calloc((size_t)K, sizeof *count);
    int64_t *quota = calloc((size_t)K, sizeof *quota);
    int64_t *start = calloc((size_t)K + 1, sizeof *start);
    int64_t *order = malloc((size_t)ds->n * sizeof *order); /* indices grouped by class */
    uint8_t *keep = calloc((size_t)ds->n, 1);
    kd_dataset *sub = NULL;
    if (!count || !quota || !start || !order || !keep) {
        st = kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for a subset", ds->name);
        goto cleanup;
    }
    for (int64_t i = 0; i < ds->n; i++) count[ds->labels[i]]++;
    for (int k = 0; k < K; k++) start[k + 1] = start[k] + count[k];
    {
        int64_t *fill = quota; /* reuse as a cursor before computing quotas */
        for (int k = 0; k < K; k++) fill[k] = start[k];
        for (int64_t i = 0; i < ds->n; i++) order[fill[ds->labels[i]]++] = i;
    }
    /* Quotas: an even split, capped by what each class has; the shortfall is
     * handed out one sample at a time, in class order, to classes with spare. */
    int64_t short_by = 0;
    for (int k = 0; k < K; k++) {
        int64_t q = n / K + (k < n % K);
        quota[k] = q < count[k] ? q : count[k];
        short_by += q - quota[k];
    }
    while (short_by > 0)
        for (int k = 0; k < K && short_by > 0; k++)
            if (quota[k] < count[k]) quota[k]++, short_by--;
    /* Per class, a partial Fisher-Yates shuffle picks quota[k] samples. */
    for (int k = 0; k < K; k++) {
        kd_rng r;
        kd_rng_init(&r, seed, kd_rng_key(KD__SUBSET_TAG, (uint64_t)k));
        int64_t *cls = order + start[k];
        for (int64_t i = 0; i < quota[k]; i++) {
            int64_t j = i + (int64_t)kd_rng_below(&r, (uint32_t)(count[k] - i));
            int64_t t = cls[i];
            cls[i] = cls[j];
            cls[j] = t;
            keep[cls[i]] = 1;
        }
    }
    char name[160];
    snprintf(name, sizeof name, "%s[%lld]", ds->name, (long long)n);
    st = kd__dataset_alloc(name, n, ds->c, ds->h, ds->w, ds->train, &sub);
    if (st != KD_OK) goto cleanup;
    sub->num_classes = ds->num_classes;
    int64_t per = (int64_t)ds->c * ds->h * ds->w, m = 0;
    for (int64_t i = 0; i < ds->n; i++) {
        if (!keep[i]) continue;
        memcpy(sub->images + m * per, ds->images + i * per, (size_t)per);
        sub->labels[m++] = ds->labels[i];
    }
    *out = sub;
cleanup:
    free(count);
    free(quota);
    free(start);
    free(order);
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

kd_status kd__read_whole_file(const char *path, uint8_t **buf, size_t *len) {
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
    gzbuffer(f, 1 << 18);
    kd_status st = KD_OK;
    size_t cap = (size_t)sb.st_size * (kd__ends_with(path, ".gz") ? 4 : 1) + 4096, n = 0;
    uint8_t *p = malloc(cap);
    if (!p) {
        st = kd_error(KD_ERR_NOMEM, "%s: cannot allocate %zu bytes", path, cap);
        goto cleanup;
    }
    for (;;) {
        if (n == cap) {
            size_t ncap = cap * 2;
            uint8_t *q = realloc(p, ncap);
            if (!q) {
                st = kd_error(KD_ERR_NOMEM, "%s: cannot allocate %zu bytes", path, ncap);
                goto cleanup;
            }
            p = q;
            cap = ncap;
        }
        size_t want = cap - n;
        if (want > (1u << 30)) want = 1u << 30;
        int got = gzread(f, p + n, (unsigned)want);
        if (got < 0) break; /* reported below from gzerror */
        if (got == 0) break;
        n += (size_t)got;
    }
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

kd_status kd_dataset_open(const char *spec, int train, kd_dataset **out) {
    if (!spec || !out) return kd_error(KD_ERR_INVALID, "kd_dataset_open: NULL argument");
    *out = NULL;
    if (strncmp(spec, "idx:", 4) == 0) return kd_dataset_open_idx(spec + 4, train, out);
    if (strncmp(spec, "cifar10:", 8) == 0) return kd_dataset_open_cifar(spec + 8, 10, train, out);
    if (strncmp(spec, "cifar100:", 9) == 0) return kd_dataset_open_cifar(spec + 9, 100, train, out);
    if (!kd__is_dir(spec)) {
        if (kd__is_idx_prefix(spec)) return kd_dataset_open_idx(spec, train, out);
        return kd_error(KD_ERR_NOT_FOUND, "%s: no such directory", spec);
    }
    if (kd__dir_has_idx(spec)) return kd_dataset_open_idx(spec, train, out);
    if (kd__dir_has(spec, "data_batch_1.bin") || kd__dir_has(spec, "test_batch.bin"))
        return kd_dataset_open_cifar(spec, 10, train, out);
    if (kd__dir_has(spec, "train.bin") || kd__dir_has(spec, "test.bin"))
        return kd_dataset_open_cifar(spec, 100, train, out);
    static const char *subdirs[] = {"cifar-10-batches-bin", "cifar-100-binary"};
    for (size_t i = 0; i < sizeof subdirs / sizeof subdirs[0]; i++) {
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%s", spec, subdirs[i]);
        if (kd__is_dir(sub)) return kd_dataset_open_cifar(sub, i == 0 ? 10 : 100, train, out);
    }
    return kd_error(KD_ERR_NOT_FOUND,
                    "%s: no dataset found (looked for MNIST-style IDX files "
                    "*train-images-idx3-ubyte[.gz] etc., CIFAR-10 data_batch_1..5.bin / "
                    "test_batch.bin, CIFAR-100 train.bin / test.bin, and the subdirectories "
                    "cifar-10-batches-bin, cifar-100-binary)",
                    spec);
}
