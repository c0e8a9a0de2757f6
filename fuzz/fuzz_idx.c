/* libFuzzer target: the IDX reader (kd_dataset_open_idx), plain and gzip.
 * Byte 0 chooses: bit 0 the file under test is the labels file (else the
 * images file); bit 1 it is written gzip-compressed (zlib, so the fuzzer
 * mutates the IDX content); bit 2 the rest is written as is under a .gz name
 * (the fuzzer mutates the gzip stream). The other file is a valid match for
 * the counts in the fuzzed header, when they are small. */
#include "fuzz_common.h"

#include <zlib.h>

#include "kd/data.h"

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *dir = kd_fuzz_dir();
    int mode = data[0];
    data++, size--;
    int labels = mode & 1;
    char path[256];
    const char *name = labels ? "train-labels-idx1-ubyte" : "train-images-idx3-ubyte";
    char gzname[64];
    snprintf(gzname, sizeof gzname, "%s.gz", name);
    if (mode & 4) {
        kd_fuzz_write(gzname, data, size, path, sizeof path);
    } else if (mode & 2) {
        snprintf(path, sizeof path, "%s/%s", dir, gzname);
        gzFile f = gzopen(path, "wb");
        if (f) {
            if (size) gzwrite(f, data, (unsigned)size);
            gzclose(f);
        }
    } else {
        kd_fuzz_write(name, data, size, path, sizeof path);
    }
    /* The partner file, matching the fuzzed header's count when small. */
    uint32_t n = 2, h = 2, w = 2;
    if (!labels && size >= 16) n = be32(data + 4);
    if (labels && size >= 8) n = be32(data + 4);
    if (n > 4096) n = 2;
    if (labels) {
        uint8_t *b = calloc(1, 16 + (size_t)n * h * w);
        put_be32(b, 0x803), put_be32(b + 4, n), put_be32(b + 8, h), put_be32(b + 12, w);
        kd_fuzz_write("train-images-idx3-ubyte", b, 16 + (size_t)n * h * w, path, sizeof path);
        free(b);
    } else {
        uint8_t *b = calloc(1, 8 + (size_t)n);
        put_be32(b, 0x801), put_be32(b + 4, n);
        for (uint32_t i = 0; i < n; i++) b[8 + i] = (uint8_t)(i % 10);
        kd_fuzz_write("train-labels-idx1-ubyte", b, 8 + (size_t)n, path, sizeof path);
        free(b);
    }
    kd_dataset *ds = NULL;
    if (kd_dataset_open_idx(dir, 1, &ds) == KD_OK) {
        kd_image im = {0};
        int64_t N = kd_dataset_size(ds);
        for (int64_t i = 0; i < N && i < 4; i++) kd_dataset_read(ds, N - 1 - i, &im);
        kd_image_free(&im);
        int32_t lo, hi;
        kd_dataset_label_range(ds, &lo, &hi);
    }
    kd_dataset_free(ds);
    return 0;
}
