/* Internal to the data layer: the dataset struct shared by the format readers,
 * and whole-file reading (plain or gzip) with errors naming the file. */
#ifndef KD_DATA_INTERNAL_H
#define KD_DATA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kd/core.h"
#include "kd/data.h"

struct kd_dataset {
    char name[128];
    int64_t n;
    int c, h, w;
    int num_classes;
    int train;
    uint8_t *images; /* (N, C, H, W), malloc'd */
    int32_t *labels; /* (N), malloc'd */
};

/* An empty dataset with room for n images of (c, h, w); contents unset. */
kd_status kd__dataset_alloc(const char *name, int64_t n, int c, int h, int w, int train,
                            kd_dataset **out);

/* Reads the whole file at path into a malloc'd buffer (*buf, *len). gzip files
 * are inflated (zlib detects them by content; plain files pass through).
 * Errors: KD_ERR_NOT_FOUND (missing), KD_ERR_IO, KD_ERR_FORMAT (corrupt gzip),
 * KD_ERR_NOMEM, each naming the path. */
kd_status kd__read_whole_file(const char *path, uint8_t **buf, size_t *len);

int kd__is_dir(const char *path);
int kd__is_file(const char *path);

/* The last path component without trailing slashes, into buf. */
const char *kd__path_basename(const char *path, char *buf, size_t n);

/* Transform lookup tables: lut[ch * 256 + v] is the output value of byte v in
 * channel ch ((v / 255 - mean) / std in float32, as torchvision computes it).
 * Without normalisation all channels share one table (lut_stride 0). */
typedef struct {
    float lut[4 * 256];
    int lut_stride; /* 256 or 0 */
} kd__transform_tables;

void kd__transform_tables_init(const kd_transform_cfg *cfg, int c, kd__transform_tables *t);
void kd__transform_apply_tables(const kd__transform_tables *t, int pad, const kd_transform_draw *d,
                                const uint8_t *src, int c, int h, int w, float *dst);

#endif
