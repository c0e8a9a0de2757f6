/* Internal to the data layer: the dataset struct shared by the format readers,
 * whole-file reading (plain or gzip) with errors naming the file, and the
 * per-sample pipeline shared by the loader and kd_transform_sample. */
#ifndef KD_DATA_INTERNAL_H
#define KD_DATA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kd/core.h"
#include "kd/data.h"

/* Where a dataset's images live. */
typedef enum {
    KD__SRC_MEMORY = 0, /* images[] */
    KD__SRC_STL10,      /* records of `path`, read with pread(fd) */
    KD__SRC_FILES,      /* one image file per sample */
    KD__SRC_CONCAT,     /* parts[] (concat.c): sample i is part k's sample i - part_start[k] */
} kd__source;

struct kd_dataset {
    char name[128];
    int64_t n;
    int c, h, w; /* h = w = 0: samples differ in size */
    int num_classes;
    int train;
    kd_split split;
    kd__source source;
    uint8_t *images; /* (N, C, H, W), malloc'd; KD__SRC_MEMORY only */
    int32_t *labels; /* (N), malloc'd; -1 = unlabeled */
    /* KD__SRC_STL10 */
    int fd;          /* open images file, -1 if none */
    int64_t *recs;   /* (N) record of each sample in the file */
    /* KD__SRC_FILES: sample i is pool + offs[i] */
    char *pool;
    int64_t *offs;
    /* Class names (folders, STL-10): class k is cpool + coffs[k]. */
    char *cpool;
    int64_t *coffs;
    /* KD__SRC_CONCAT: owned copies of the parts (never themselves concats;
     * their labels are unused: labels[] above is the concat's) */
    struct kd_dataset **parts;
    int nparts;
    int64_t *part_start; /* (nparts + 1) */
    char path[4096]; /* images file (STL-10) or root folder / list, for messages */
};

/* An empty dataset with room for n images of (c, h, w); contents unset. */
kd_status kd__dataset_alloc(const char *name, int64_t n, int c, int h, int w, int train,
                            kd_dataset **out);

/* The header check of kd__read_whole_file: given the first n bytes of the
 * content (inflated when gzipped; n may be short), sets *limit to the length
 * the header implies for the whole content and describes it in `what` (e.g.
 * "16-byte header + 10 images of 28x28"), or returns an error naming path. */
typedef kd_status (*kd__size_fn)(void *ctx, const char *path, const uint8_t *head, size_t n,
                                 uint64_t *limit, char *what, size_t what_n);

/* Reads the whole file at path into a malloc'd buffer (*buf, *len). With a
 * size_fn, the first head_len (<= 64) bytes go to it (with ctx) and nothing past the
 * limit it sets is inflated or read: a gzip stream or file that goes on is
 * an error ("trailing data"), and a limit beyond the machine's memory is
 * refused before any allocation. gzip files (detected by content) are
 * inflated only with a size_fn; without one, the file must be plain and is
 * read as it is. Errors: KD_ERR_NOT_FOUND (missing), KD_ERR_IO,
 * KD_ERR_FORMAT (corrupt or lying gzip, gzip without a header check),
 * KD_ERR_NOMEM, each naming the path. */
kd_status kd__read_whole_file(const char *path, size_t head_len, kd__size_fn size_fn,
                              void *ctx, uint8_t **buf, size_t *len);

/* The machine's physical memory in bytes (UINT64_MAX when unknown). */
uint64_t kd__physical_memory(void);
/* An error naming path when `bytes` (needed for `what`) exceed it. */
kd_status kd__check_fits_memory(const char *path, uint64_t bytes, const char *what);

/* A lazy dataset shell (no images, labels allocated, fd = -1). */
kd_status kd__dataset_alloc_lazy(const char *name, int64_t n, int c, int h, int w,
                                 kd__source source, kd_dataset **out);

/* Copies class names (k of them) into ds. */
kd_status kd__dataset_set_classes(kd_dataset *ds, const char *const *names, int k);

/* Sets every label to -1 and the split to UNLABELED (num_classes kept). */
void kd__dataset_drop_labels(kd_dataset *ds);

/* Class-balanced picks, shared by kd_dataset_subset and the label subsets
 * (labels.c): the samples grouped by class, class k's indices in dataset
 * order at order[start[k] .. start[k + 1]) (count[k] of them). by_label 0:
 * every sample is class 0 (K = 1); 1: class = label, K = num_classes, and
 * samples whose label is outside [0, K) (unlabeled, -1) are left out. */
typedef struct {
    int K;
    int64_t *count, *start, *order;
} kd__class_groups;
kd_status kd__class_groups_init(kd__class_groups *g, const kd_dataset *ds, int by_label);
void kd__class_groups_free(kd__class_groups *g);
/* Sets keep[i] = 1 for min(quota[k], count[k]) samples of each class k: the
 * first quota[k] steps of a Fisher-Yates shuffle of the class's indices
 * (step i swaps positions i and i + kd_rng_below(count[k] - i)) drawn from
 * kd_rng_init(seed, kd_rng_key(tag, k)). Deterministic in (ds, quota, seed,
 * tag); step i does not depend on quota[k], so with one seed a smaller quota
 * picks a subset of a larger one's picks. Reorders g->order. */
void kd__class_groups_pick(kd__class_groups *g, const int64_t *quota, uint64_t seed, uint64_t tag,
                           uint8_t *keep);
/* A dataset named `name` of the n samples i with keep[i], in dataset order:
 * images copied (in memory) or record indices / paths (lazy); labels, class
 * count, class names and split kept. */
kd_status kd__dataset_keep(const kd_dataset *ds, const char *name, const uint8_t *keep, int64_t n,
                           kd_dataset **out);

/* KD__SRC_CONCAT (concat.c): the part holding sample i of ds, and the
 * sample's index in it. */
const kd_dataset *kd__concat_locate(const kd_dataset *ds, int64_t i, int64_t *j);
/* kd__dataset_keep of a concat: each part keeps its samples, labels from
 * ds; a single remaining part is returned as a plain dataset. */
kd_status kd__concat_keep(const kd_dataset *ds, const char *name, const uint8_t *keep, int64_t n,
                          kd_dataset **out);
/* Frees the parts of a concat (kd_dataset_free). */
void kd__concat_free_parts(kd_dataset *ds);

int kd__is_dir(const char *path);
/* 1 if name ends with .jpg, .jpeg or .png (any case) and is not hidden. */
int kd__is_image_name(const char *name);
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

/* Reads n bytes at offset off of fd (retrying short reads); the messages name
 * `path` and the record. */
kd_status kd__pread_full(int fd, void *buf, size_t n, int64_t off, const char *path,
                         int64_t record);

/* STL-10: record r of ds's images file into dst (3, 96, 96), transposed. */
kd_status kd__stl10_read(const kd_dataset *ds, int64_t r, uint8_t *dst);

/* The work buffers of one loader worker (or of a kd_transform_sample call). */
typedef struct {
    kd_image img;     /* the decoded sample at its own size */
    uint8_t *geo;     /* (C, out_h, out_w) after the geometry step */
    size_t geo_cap;
    uint8_t *pre;     /* (C, H, W): the sample after the shared flip */
    size_t pre_cap;
    float *fsrc;      /* (C, H, W) / 255 for the SSL pipeline (kd_transform_cfg.ssl) */
    size_t fsrc_cap;  /* floats */
    float *fwork;     /* the SSL pipeline's blur workspace */
    size_t fwork_cap; /* floats */
    kd_scratch scratch;
} kd__sample_ctx;

void kd__sample_ctx_free(kd__sample_ctx *x);

/* Runs the per-sample pipeline: the shared flip (when pre_flip, the
 * sample's kd_transform_shared_flip decision under cfg->hflip_shared),
 * geometry (if the sample's size differs from (out_h, out_w) or a hook is
 * set), crop, flip, normalisation, into dst (c, out_h, out_w). src is
 * (c, h, w). */
kd_status kd__sample_apply(const kd_transform_cfg *cfg, const kd__transform_tables *t, kd_rng *r,
                           int pre_flip, const uint8_t *src, int c, int h, int w, int out_h, int out_w,
                           kd__sample_ctx *x, float *dst);

/* np.rot90 / torch.rot90 of one (h, w) plane s into d, k quarter turns
 * counter-clockwise (k in 0..3; odd k gives a (w, h) plane), for any element
 * type: the uint8 geometry hook (kd_geometry_rot90, transform.c) and the
 * float transform (kd_tf_rot90, transform_ssl.c) share it. */
#define KD__ROT90_PLANE(s, d, h, w, k)                                                              \
    do {                                                                                            \
        if ((k) == 0) {                                                                             \
            memcpy((d), (s), (size_t)(h) * (w) * sizeof *(s));                                      \
        } else if ((k) == 2) { /* out[y][x] = in[h-1-y][w-1-x] */                                  \
            for (int y_ = 0; y_ < (h); y_++)                                                        \
                for (int x_ = 0; x_ < (w); x_++)                                                    \
                    (d)[(size_t)y_ * (w) + x_] = (s)[(size_t)((h) - 1 - y_) * (w) + ((w) - 1 - x_)]; \
        } else if ((k) == 1) { /* (w, h): out[y][x] = in[x][w-1-y] */                              \
            for (int y_ = 0; y_ < (w); y_++)                                                        \
                for (int x_ = 0; x_ < (h); x_++) (d)[(size_t)y_ * (h) + x_] = (s)[(size_t)x_ * (w) + ((w) - 1 - y_)]; \
        } else { /* k == 3, (w, h): out[y][x] = in[h-1-x][y] */                                     \
            for (int y_ = 0; y_ < (w); y_++)                                                        \
                for (int x_ = 0; x_ < (h); x_++) (d)[(size_t)y_ * (h) + x_] = (s)[(size_t)((h) - 1 - x_) * (w) + y_]; \
        }                                                                                           \
    } while (0)

#endif
