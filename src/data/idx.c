/* MNIST-format IDX reader (MNIST, Fashion-MNIST, KMNIST, EMNIST): locates the
 * four files (plain or gzipped, exact or suffix-matched names, or DIR/PREFIX),
 * validates magic numbers, dimensions, counts and exact byte lengths. */
#include "data_internal.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KD__IDX_IMAGES_MAGIC 0x00000803u /* unsigned byte, 3 dims */
#define KD__IDX_LABELS_MAGIC 0x00000801u /* unsigned byte, 1 dim */
#define KD__IDX_MAX_CANDIDATES 8

static uint32_t kd__be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static int kd__ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && memcmp(s + a - b, suffix, b) == 0;
}

/* Looks for PATH or PATH.gz; writes the one found (plain preferred) to out. */
static int kd__plain_or_gz(const char *path, char *out, size_t n) {
    snprintf(out, n, "%s", path);
    if (kd__is_file(out)) return 1;
    snprintf(out, n, "%s.gz", path);
    return kd__is_file(out);
}

/* Finds the file for `kind` (e.g. "train-images-idx3-ubyte"). In directory
 * mode: DIR/kind[.gz], else the single file whose name (less ".gz") ends with
 * kind or its "train-images.idx3-ubyte" spelling. In prefix mode (where is not
 * a directory): PREFIX-kind[.gz]. `stem` receives the file-name part before
 * kind (the dataset name for EMNIST-style files), "" if none. */
static kd_status kd__idx_find(const char *where, const char *kind, char *path, size_t n,
                              char *stem, size_t stem_n) {
    char want[1024];
    stem[0] = '\0';
    if (!kd__is_dir(where)) {
        snprintf(want, sizeof want, "%s-%s", where, kind);
        if (kd__plain_or_gz(want, path, n)) {
            kd__path_basename(where, stem, stem_n);
            return KD_OK;
        }
        return kd_error(KD_ERR_NOT_FOUND, "%s[.gz]: no such file", want);
    }
    snprintf(want, sizeof want, "%s/%s", where, kind);
    if (kd__plain_or_gz(want, path, n)) return KD_OK;

    /* The dotted spelling some mirrors use: train-images.idx3-ubyte. */
    char dotted[64];
    snprintf(dotted, sizeof dotted, "%s", kind);
    char *dash = strstr(dotted, "-idx");
    if (dash) *dash = '.';

    DIR *d = opendir(where);
    if (!d) return kd_error(KD_ERR_IO, "%s: cannot list directory", where);
    char cand[KD__IDX_MAX_CANDIDATES][256];
    int nc = 0, more = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        char name[256];
        snprintf(name, sizeof name, "%s", e->d_name);
        if (kd__ends_with(name, ".gz")) name[strlen(name) - 3] = '\0';
        if (!kd__ends_with(name, kind) && !kd__ends_with(name, dotted)) continue;
        int dup = 0;
        for (int i = 0; i < nc; i++) dup |= strcmp(cand[i], name) == 0;
        if (dup) continue;
        if (nc < KD__IDX_MAX_CANDIDATES) memcpy(cand[nc++], name, sizeof name);
        else more++;
    }
    closedir(d);
    if (nc == 0)
        return kd_error(KD_ERR_NOT_FOUND, "%s: no file named %s[.gz] or *%s[.gz]", where, kind,
                        kind);
    if (nc > 1) {
        char list[1024] = "";
        for (int i = 0; i < nc; i++) {
            size_t l = strlen(list);
            snprintf(list + l, sizeof list - l, "%s%s", i ? ", " : "", cand[i]);
        }
        return kd_error(KD_ERR_INVALID,
                        "%s: %d%s files match *%s (%s); pass DIR/PREFIX (e.g. %s/emnist-balanced) "
                        "to choose one set",
                        where, nc + more, more ? "+" : "", kind, list, where);
    }
    snprintf(want, sizeof want, "%s/%s", where, cand[0]);
    if (!kd__plain_or_gz(want, path, n))
        return kd_error(KD_ERR_NOT_FOUND, "%s: vanished while reading", want);
    size_t sl = strlen(cand[0]) - strlen(kind);
    while (sl > 0 && (cand[0][sl - 1] == '-' || cand[0][sl - 1] == '_' || cand[0][sl - 1] == '.'))
        sl--;
    if (sl >= stem_n) sl = stem_n - 1;
    memcpy(stem, cand[0], sl);
    stem[sl] = '\0';
    return KD_OK;
}

/* Header check of an images file: magic, N, H, W (big-endian u32), then
 * N*H*W bytes; *limit = the whole file's length. */
static kd_status kd__idx_images_size(void *ctx, const char *path, const uint8_t *b, size_t n,
                                     uint64_t *limit, char *what, size_t what_n) {
    if (n < 16)
        return kd_error(KD_ERR_FORMAT, "%s: truncated header: expected at least 16 bytes, got %zu",
                        path, n);
    uint32_t magic = kd__be32(b);
    if (magic != KD__IDX_IMAGES_MAGIC)
        return kd_error(KD_ERR_FORMAT, "%s: bad magic 0x%08x, expected 0x%08x (IDX ubyte images)%s",
                        path, magic, KD__IDX_IMAGES_MAGIC,
                        magic == KD__IDX_LABELS_MAGIC ? "; this looks like a labels file" : "");
    uint32_t cnt = kd__be32(b + 4), h = kd__be32(b + 8), w = kd__be32(b + 12);
    if (cnt == 0 || h == 0 || w == 0 || h > 65536 || w > 65536)
        return kd_error(KD_ERR_FORMAT, "%s: bad dimensions %u x %u x %u in the header", path, cnt,
                        h, w);
    (void)ctx;
    /* At most 2^32 * 2^32: fits in 64 bits with the header. */
    *limit = 16 + (uint64_t)cnt * ((uint64_t)h * w);
    snprintf(what, what_n, "16-byte header + %u images of %ux%u", cnt, h, w);
    return KD_OK;
}

/* The images file a labels file must match. */
typedef struct {
    uint32_t n;
    const char *path;
} kd__idx_images;

/* Header check of a labels file: magic, N, then N bytes; ctx is the
 * kd__idx_images whose count N must equal. */
static kd_status kd__idx_labels_size(void *ctx, const char *path, const uint8_t *b, size_t n,
                                     uint64_t *limit, char *what, size_t what_n) {
    if (n < 8)
        return kd_error(KD_ERR_FORMAT, "%s: truncated header: expected at least 8 bytes, got %zu",
                        path, n);
    uint32_t magic = kd__be32(b);
    if (magic != KD__IDX_LABELS_MAGIC)
        return kd_error(KD_ERR_FORMAT, "%s: bad magic 0x%08x, expected 0x%08x (IDX ubyte labels)%s",
                        path, magic, KD__IDX_LABELS_MAGIC,
                        magic == KD__IDX_IMAGES_MAGIC ? "; this looks like an images file" : "");
    const kd__idx_images *im = ctx;
    uint32_t cnt = kd__be32(b + 4);
    if (cnt != im->n)
        return kd_error(KD_ERR_FORMAT, "%s: %u labels, but %s has %u images", path, cnt, im->path,
                        im->n);
    *limit = 8 + (uint64_t)cnt;
    snprintf(what, what_n, "8-byte header + %u labels", cnt);
    return KD_OK;
}

kd_status kd_dataset_open_idx(const char *dir, int train, kd_dataset **out) {
    if (!dir || !out) return kd_error(KD_ERR_INVALID, "kd_dataset_open_idx: NULL argument");
    *out = NULL;
    char ipath[4096], lpath[4096], stem[256], lstem[256];
    const char *ikind = train ? "train-images-idx3-ubyte" : "t10k-images-idx3-ubyte";
    const char *lkind = train ? "train-labels-idx1-ubyte" : "t10k-labels-idx1-ubyte";
    if (!kd__is_dir(dir)) {
        /* A prefix needs an existing parent directory; otherwise say so plainly. */
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", dir);
        char *slash = strrchr(parent, '/');
        if (slash) *slash = '\0';
        else snprintf(parent, sizeof parent, ".");
        if (!kd__is_dir(parent))
            return kd_error(KD_ERR_NOT_FOUND, "%s: no such directory", dir);
    }
    KD_TRY(kd__idx_find(dir, ikind, ipath, sizeof ipath, stem, sizeof stem));
    KD_TRY(kd__idx_find(dir, lkind, lpath, sizeof lpath, lstem, sizeof lstem));

    kd_status st = KD_OK;
    uint8_t *ib = NULL, *lb = NULL;
    size_t il = 0, ll = 0;
    kd_dataset *ds = NULL;
    /* The headers are checked from the first bytes, and nothing past what
     * they imply is read or inflated. */
    st = kd__read_whole_file(ipath, 16, kd__idx_images_size, NULL, &ib, &il);
    if (st != KD_OK) goto cleanup;
    uint32_t n = kd__be32(ib + 4), h = kd__be32(ib + 8), w = kd__be32(ib + 12);
    int64_t per = (int64_t)h * w;
    int64_t want = 16 + (int64_t)n * per;
    if ((int64_t)il != want) {
        st = kd_error(KD_ERR_FORMAT,
                      "%s: %s: expected %lld bytes (16-byte header + %u images of %ux%u), got %zu",
                      ipath, (int64_t)il < want ? "truncated" : "trailing data", (long long)want, n,
                      h, w, il);
        goto cleanup;
    }
    kd__idx_images ref = {n, ipath};
    st = kd__read_whole_file(lpath, 8, kd__idx_labels_size, &ref, &lb, &ll);
    if (st != KD_OK) goto cleanup;

    uint32_t nl = kd__be32(lb + 4);
    if (nl != n) {
        st = kd_error(KD_ERR_FORMAT, "%s: %u labels, but %s has %u images", lpath, nl, ipath, n);
        goto cleanup;
    }
    if ((int64_t)ll != 8 + (int64_t)nl) {
        st = kd_error(KD_ERR_FORMAT, "%s: %s: expected %lld bytes (8-byte header + %u labels), got %zu",
                      lpath, (int64_t)ll < 8 + (int64_t)nl ? "truncated" : "trailing data",
                      (long long)(8 + (int64_t)nl), nl, ll);
        goto cleanup;
    }

    char name[256];
    if (!stem[0]) kd__path_basename(dir, stem, sizeof stem);
    snprintf(name, sizeof name, "%s", stem);
    st = kd__dataset_alloc(name, n, 1, (int)h, (int)w, train, &ds);
    if (st != KD_OK) goto cleanup;
    memcpy(ds->images, ib + 16, (size_t)n * (size_t)per);
    int maxl = 0;
    for (uint32_t i = 0; i < n; i++) {
        ds->labels[i] = lb[8 + i]; /* a ubyte, so always < 256 */
        if (ds->labels[i] > maxl) maxl = ds->labels[i];
    }
    ds->num_classes = maxl + 1;
    *out = ds;
    ds = NULL;
cleanup:
    kd_dataset_free(ds);
    free(ib);
    free(lb);
    return st;
}
