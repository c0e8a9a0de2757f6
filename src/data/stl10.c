/* STL-10 binary-version reader. Each images file is a sequence of 27648-byte
 * records, one 96x96 RGB image each, stored as three planes in column-major
 * order (the byte of pixel (ch, y, x) is at ch * 9216 + x * 96 + y); label
 * files hold one byte per image, 1..10. The labels are read when the
 * dataset is opened; images stay in the file and are read record by record
 * with pread (safe from any number of threads), so the 2.7 GB unlabeled
 * split costs no memory. */
#include "data_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KD__STL_SIDE 96
#define KD__STL_PLANE (KD__STL_SIDE * KD__STL_SIDE)
#define KD__STL_RECORD (3 * KD__STL_PLANE)

static const char *const kd__stl10_classes[10] = {"airplane", "bird",  "car",    "cat",  "deer",
                                                  "dog",      "horse", "monkey", "ship", "truck"};

kd_status kd__pread_full(int fd, void *buf, size_t n, int64_t off, const char *path,
                         int64_t record) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)buf + got, n - got, (off_t)(off + (int64_t)got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0)
            return kd_error(KD_ERR_IO, "%s: record %lld: read error: %s", path, (long long)record,
                            strerror(errno));
        if (r == 0)
            return kd_error(KD_ERR_FORMAT,
                            "%s: record %lld: file ends after %zu of its %zu bytes (truncated "
                            "since it was opened?)",
                            path, (long long)record, got, n);
        got += (size_t)r;
    }
    return KD_OK;
}

kd_status kd__stl10_read(const kd_dataset *ds, int64_t r, uint8_t *dst) {
    uint8_t raw[KD__STL_RECORD];
    KD_TRY(kd__pread_full(ds->fd, raw, sizeof raw, r * KD__STL_RECORD, ds->path, r));
    /* Column-major planes to row-major (C, H, W). */
    for (int ch = 0; ch < 3; ch++) {
        const uint8_t *p = raw + ch * KD__STL_PLANE;
        uint8_t *o = dst + ch * KD__STL_PLANE;
        for (int x = 0; x < KD__STL_SIDE; x++)
            for (int y = 0; y < KD__STL_SIDE; y++) o[y * KD__STL_SIDE + x] = p[x * KD__STL_SIDE + y];
    }
    return KD_OK;
}

/* Opens the images file and checks its size; *n = number of records. */
static kd_status kd__stl10_open_images(const char *path, int *fd, int64_t *n) {
    *fd = open(path, O_RDONLY | O_CLOEXEC);
    if (*fd < 0) {
        if (errno == ENOENT) return kd_error(KD_ERR_NOT_FOUND, "%s: no such file", path);
        return kd_error(KD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    struct stat sb;
    kd_status st = KD_OK;
    if (fstat(*fd, &sb) != 0)
        st = kd_error(KD_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(sb.st_mode))
        st = kd_error(KD_ERR_IO, "%s: not a regular file", path);
    else if (sb.st_size == 0 || sb.st_size % KD__STL_RECORD != 0)
        st = kd_error(KD_ERR_FORMAT,
                      "%s: size %lld bytes is not a positive multiple of the %d-byte STL-10 record "
                      "(96x96x3 image)",
                      path, (long long)sb.st_size, KD__STL_RECORD);
    if (st != KD_OK) {
        close(*fd);
        *fd = -1;
        return st;
    }
    *n = (int64_t)(sb.st_size / KD__STL_RECORD);
    return KD_OK;
}

kd_status kd_dataset_open_stl10(const char *dir, kd_split split, kd_dataset **out) {
    if (!dir || !out) return kd_error(KD_ERR_INVALID, "kd_dataset_open_stl10: NULL argument");
    *out = NULL;
    if (!kd__is_dir(dir)) return kd_error(KD_ERR_NOT_FOUND, "%s: no such directory", dir);
    static const char *const prefix[3] = {"train", "test", "unlabeled"};
    if ((int)split < 0 || (int)split > 2)
        return kd_error(KD_ERR_INVALID, "%s: unknown split %d", dir, (int)split);
    char ipath[4096], lpath[4096];
    snprintf(ipath, sizeof ipath, "%s/%s_X.bin", dir, prefix[split]);
    snprintf(lpath, sizeof lpath, "%s/%s_y.bin", dir, prefix[split]);
    if (!kd__is_file(ipath))
        return kd_error(KD_ERR_NOT_FOUND, "%s: no such file (STL-10 %s split)", ipath,
                        prefix[split]);

    int fd = -1;
    int64_t n = 0;
    KD_TRY(kd__stl10_open_images(ipath, &fd, &n));
    kd_status st = KD_OK;
    kd_dataset *ds = NULL;
    uint8_t *lb = NULL;
    size_t ll = 0;
    /* The labels file must hold one byte per image: checked from its size
     * before anything is allocated, so a sparse or lying images file costs
     * nothing. */
    struct stat lsb;
    if (split != KD_SPLIT_UNLABELED) {
        if (stat(lpath, &lsb) != 0) {
            st = errno == ENOENT ? kd_error(KD_ERR_NOT_FOUND, "%s: no such file (STL-10 %s labels)",
                                            lpath, prefix[split])
                                 : kd_error(KD_ERR_IO, "%s: %s", lpath, strerror(errno));
            goto fail;
        }
        if ((int64_t)lsb.st_size != n) {
            st = kd_error(KD_ERR_FORMAT, "%s: %lld labels, but %s holds %lld images", lpath,
                          (long long)lsb.st_size, ipath, (long long)n);
            goto fail;
        }
    }
    /* The index costs 12 bytes a record. */
    st = kd__check_fits_memory(ipath, (uint64_t)n * 12, "the index of its records");
    if (st != KD_OK) goto fail;
    st = kd__dataset_alloc_lazy("stl-10", n, 3, KD__STL_SIDE, KD__STL_SIDE, KD__SRC_STL10, &ds);
    if (st != KD_OK) goto fail;
    ds->fd = fd;
    fd = -1;
    snprintf(ds->path, sizeof ds->path, "%s", ipath);
    ds->split = split;
    ds->train = split != KD_SPLIT_TEST;
    ds->num_classes = 10;
    ds->recs = malloc((size_t)n * sizeof *ds->recs);
    if (!ds->recs) {
        st = kd_error(KD_ERR_NOMEM, "%s: out of memory for %lld records", ipath, (long long)n);
        goto fail;
    }
    for (int64_t i = 0; i < n; i++) ds->recs[i] = i;
    st = kd__dataset_set_classes(ds, kd__stl10_classes, 10);
    if (st != KD_OK) goto fail;

    if (split == KD_SPLIT_UNLABELED) {
        for (int64_t i = 0; i < n; i++) ds->labels[i] = -1;
    } else {
        st = kd__read_whole_file(lpath, 0, NULL, NULL, &lb, &ll);
        if (st != KD_OK) goto fail;
        if ((int64_t)ll != n) {
            st = kd_error(KD_ERR_FORMAT, "%s: %zu labels, but %s holds %lld images", lpath, ll, ipath,
                          (long long)n);
            goto fail;
        }
        for (int64_t i = 0; i < n; i++) {
            if (lb[i] < 1 || lb[i] > 10) {
                st = kd_error(KD_ERR_FORMAT, "%s: label %d of image %lld is outside 1..10", lpath,
                              lb[i], (long long)i);
                goto fail;
            }
            ds->labels[i] = lb[i] - 1;
        }
    }
    free(lb);
    *out = ds;
    return KD_OK;
fail:
    if (fd >= 0) close(fd);
    free(lb);
    kd_dataset_free(ds);
    return st;
}
