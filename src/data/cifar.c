/* CIFAR-10/100 binary-version reader. Records are label byte(s) followed by
 * 3072 image bytes, stored as the 1024 red, 1024 green, then 1024 blue values
 * of a 32x32 image in row-major order, i.e. already (C, H, W). */
#include "data_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KD__CIFAR_PIXELS 3072

/* Appends the records of one file to (*images, *labels, *n), growing them. */
static kd_status kd__cifar_append(const char *path, int variant, uint8_t **images,
                                  int32_t **labels, int64_t *n) {
    uint8_t *buf = NULL;
    size_t len = 0;
    KD_TRY(kd__read_whole_file(path, 0, NULL, NULL, &buf, &len));
    kd_status st = KD_OK;
    size_t head = variant == 10 ? 1 : 2, rec = head + KD__CIFAR_PIXELS;
    if (len == 0 || len % rec != 0) {
        st = kd_error(KD_ERR_FORMAT,
                      "%s: size %zu bytes is not a positive multiple of the %zu-byte CIFAR-%d "
                      "record (%zu label byte%s + 3072 image bytes)%s",
                      path, len, rec, variant, head, head > 1 ? "s" : "",
                      len % (variant == 10 ? 3074 : 3073) == 0 && len
                          ? (variant == 10 ? "; it looks like a CIFAR-100 file"
                                           : "; it looks like a CIFAR-10 file")
                          : "");
        goto cleanup;
    }
    int64_t m = (int64_t)(len / rec);
    uint8_t *im = realloc(*images, (size_t)(*n + m) * KD__CIFAR_PIXELS);
    if (!im) {
        st = kd_error(KD_ERR_NOMEM, "%s: cannot allocate room for %lld images", path,
                      (long long)(*n + m));
        goto cleanup;
    }
    *images = im;
    int32_t *lb = realloc(*labels, (size_t)(*n + m) * sizeof *lb);
    if (!lb) {
        st = kd_error(KD_ERR_NOMEM, "%s: cannot allocate room for %lld labels", path,
                      (long long)(*n + m));
        goto cleanup;
    }
    *labels = lb;
    for (int64_t i = 0; i < m; i++) {
        const uint8_t *r = buf + (size_t)i * rec;
        if (variant == 100 && r[0] >= 20) {
            st = kd_error(KD_ERR_FORMAT, "%s: record %lld has coarse label %d, expected < 20", path,
                          (long long)i, r[0]);
            goto cleanup;
        }
        int label = r[head - 1];
        if (label >= variant) {
            st = kd_error(KD_ERR_FORMAT, "%s: record %lld has label %d, expected < %d", path,
                          (long long)i, label, variant);
            goto cleanup;
        }
        lb[*n + i] = label;
        memcpy(im + (size_t)(*n + i) * KD__CIFAR_PIXELS, r + head, KD__CIFAR_PIXELS);
    }
    *n += m;
cleanup:
    free(buf);
    return st;
}

kd_status kd_dataset_open_cifar(const char *dir, int variant, int train, kd_dataset **out) {
    if (!dir || !out) return kd_error(KD_ERR_INVALID, "kd_dataset_open_cifar: NULL argument");
    *out = NULL;
    if (variant != 10 && variant != 100)
        return kd_error(KD_ERR_INVALID, "CIFAR variant %d: expected 10 or 100", variant);
    if (!kd__is_dir(dir)) return kd_error(KD_ERR_NOT_FOUND, "%s: no such directory", dir);
    const char *files[5];
    int nf = 0;
    if (variant == 10 && train) {
        static const char *b[5] = {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin",
                                   "data_batch_4.bin", "data_batch_5.bin"};
        for (int i = 0; i < 5; i++) files[nf++] = b[i];
    } else if (variant == 10) {
        files[nf++] = "test_batch.bin";
    } else {
        files[nf++] = train ? "train.bin" : "test.bin";
    }
    /* Check that every file exists before reading any. */
    char path[4096];
    for (int i = 0; i < nf; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (!kd__is_file(path))
            return kd_error(KD_ERR_NOT_FOUND, "%s: no such file (CIFAR-%d %s split)", path,
                            variant, train ? "train" : "test");
    }
    kd_status st = KD_OK;
    uint8_t *images = NULL;
    int32_t *labels = NULL;
    int64_t n = 0;
    kd_dataset *ds = NULL;
    for (int i = 0; i < nf; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        st = kd__cifar_append(path, variant, &images, &labels, &n);
        if (st != KD_OK) goto cleanup;
    }
    ds = calloc(1, sizeof *ds);
    if (!ds) {
        st = kd_error(KD_ERR_NOMEM, "%s: out of memory", dir);
        goto cleanup;
    }
    snprintf(ds->name, sizeof ds->name, "cifar-%d", variant);
    ds->n = n;
    ds->c = 3;
    ds->h = 32;
    ds->w = 32;
    ds->num_classes = variant;
    ds->train = train;
    ds->images = images;
    ds->labels = labels;
    images = NULL;
    labels = NULL;
    *out = ds;
cleanup:
    free(images);
    free(labels);
    return st;
}
