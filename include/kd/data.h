/*
 * kd/data.h: the data layer. Image datasets (MNIST-style IDX files, CIFAR-10/100
 * binary, STL-10 binary, folders of JPEG/PNG images, file lists), per-sample
 * augmentation (an optional geometry step to a fixed output size, random crop
 * with zero padding, horizontal flip, per-channel normalisation) and a
 * threaded batch loader with prefetch whose output does not depend on the
 * number of workers.
 *
 * Usage:
 *     kd_dataset *ds = NULL;
 *     if (kd_dataset_open("/usr/share/datasets/fashion-mnist", 1, &ds) != KD_OK) {
 *         fprintf(stderr, "kd: %s\n", kd_last_error());
 *         return 1;
 *     }
 *     kd_loader_cfg cfg = {.batch_size = 128, .shuffle = 1, .seed = 42,
 *                          .num_workers = 2,
 *                          .transform = {.pad_crop = 2, .hflip = 1, .normalize = 1,
 *                                        .mean = {0.2860f}, .std = {0.3530f}}};
 *     kd_loader *ld = NULL;
 *     if (kd_loader_init(&ld, ds, &cfg) != KD_OK) ...;
 *     for (int64_t epoch = 0; epoch < 10; epoch++) {
 *         kd_loader_start_epoch(ld, epoch);
 *         kd_batch b;
 *         int r;
 *         while ((r = kd_loader_next(ld, &b)) == 1) {
 *             // b.x: (b.n, C, H, W) float32, b.y: (b.n) labels; valid until the next call
 *         }
 *         if (r < 0) ...;  // kd_last_error() says why
 *     }
 *     kd_loader_free(ld);   // before the dataset it reads
 *     kd_dataset_free(ds);
 *
 * Image folders and other variable-size data are opened the same way; the
 * dataset holds paths and labels only, the loader's workers decode each
 * image when its batch is prepared, and transform.out_h/out_w fix the batch
 * shape (resize shorter side + centre crop unless a geometry hook is given):
 *     kd_dataset_open_split("folder:/data/imagenette", KD_SPLIT_TRAIN, &ds);
 *     cfg.transform.out_h = cfg.transform.out_w = 224;
 *     cfg.transform.resize = 256;     // eval: Resize(256) + CenterCrop(224)
 *     cfg.skip_bad = 1;               // substitute unreadable images, count them
 *
 * Several views of each sample (two-view and multi-crop methods): n_views
 * views, view v made by view_transforms[v] (each with its own output size
 * and geometry hook) or, without that array, by `transform` with the view's
 * own random draws:
 *     kd_transform_cfg tfs[2] = {global, local};   // local.out_h = 96, ...
 *     cfg.n_views = 2;
 *     cfg.view_transforms = tfs;                    // copied by kd_loader_init
 *     ... b.views[v]: (b.n, C, b.view_shape[v].h, b.view_shape[v].w); b.x == b.views[0]
 *
 * Reproducibility. Everything random is drawn from the counter-based kd_rng:
 *   - the epoch permutation (shuffle = 1) is a Fisher-Yates shuffle driven by
 *     kd_rng_init(&r, seed, kd_rng_key(KD_DATA_SHUFFLE_TAG, epoch)), drawing
 *     j = kd_rng_below(&r, i + 1) for i = N-1 down to 1;
 *   - sample `index` (its index in the dataset, not its position in the epoch)
 *     is augmented with kd_rng_init(&r, seed, kd_data_sample_key(seed, epoch, index)),
 *     where kd_data_sample_key = kd_rng_key(kd_rng_key(seed, epoch), index);
 *     a geometry hook draws first, then the crop and flip. That is view 0's
 *     stream; view v > 0 of the sample draws from kd_data_view_key(seed,
 *     epoch, index, v) = kd_rng_key(kd_data_sample_key(seed, epoch, index), v),
 *     so a one-view loader gives the same bytes as before views existed and
 *     adding views never changes view 0;
 *   - a decision shared by every view of a sample (hflip_shared: SSKD's one
 *     flip before its four rotations) comes from the sample's shared stream
 *     kd_data_shared_key(seed, epoch, index), so views still draw their own
 *     crops and a transform without hflip_shared is unchanged;
 *   - with skip_bad, an unreadable sample is replaced by the next readable
 *     index (wrapping), augmented with that index's stream.
 * So a batch depends only on (dataset, cfg, seed, epoch), never on num_workers,
 * prefetch or timing; the bytes are identical for any worker count.
 */
#ifndef KD_DATA_H
#define KD_DATA_H

#include <stdint.h>

#include "kd/core.h"
#include "kd/transforms.h"

#ifdef __cplusplus
extern "C" {
#endif

/* --------------------------------------------------------------- datasets */

/* An image dataset: N samples of uint8 images (C, H, W) and int32 labels (N)
 * in [0, num_classes), or -1 for an unlabeled sample. IDX and CIFAR datasets
 * (and those from memory) hold every image in memory; STL-10 reads records
 * on demand from its file (pread), and image folders and file lists hold
 * paths and decode on demand ("lazy" datasets: kd_dataset_image returns NULL,
 * kd_dataset_read fetches a sample). Folder images may differ in size; such
 * a dataset reports height = width = 0. Immutable once opened, so any number
 * of loaders and threads may read it at the same time. */
typedef struct kd_dataset kd_dataset;

/* Which part of a dataset to open. UNLABELED is the dataset's unlabeled data
 * (STL-10 unlabeled_X.bin, an image folder's unlabeled/ subdirectory) or,
 * when it has none, its training images with labels dropped (-1). */
typedef enum { KD_SPLIT_TRAIN = 0, KD_SPLIT_TEST = 1, KD_SPLIT_UNLABELED = 2 } kd_split;

/* MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST). `dir` is a
 * directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte,
 * t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each plain or gzipped
 * (".gz"). When the exact name is absent, a single file in `dir` whose name
 * ends with it (e.g. emnist-balanced-train-images-idx3-ubyte.gz) is taken; if
 * several match, pass "DIR/PREFIX" (e.g. ".../emnist-balanced") to choose the
 * files PREFIX-train-images-idx3-ubyte[.gz] etc. Magic numbers, dimensions,
 * label/image counts and exact byte lengths are checked, from the headers
 * before the rest is read: nothing past the length a header implies is
 * inflated or read (a gzip stream that goes on is "trailing data"), and a
 * header implying more than the machine's memory is refused; num_classes is the
 * largest label + 1. Images get C = 1. EMNIST images are stored transposed;
 * they are returned as stored (as torchvision does). */
kd_status kd_dataset_open_idx(const char *dir, int train, kd_dataset **out);

/* CIFAR binary version. variant 10: data_batch_1..5.bin (train) or
 * test_batch.bin, records of 1 label byte + 3072 image bytes; variant 100:
 * train.bin / test.bin, records of coarse label + fine label + 3072 bytes (the
 * fine label is used). Images are (3, 32, 32); num_classes = variant. Files
 * are read as stored: a gzip-compressed one is refused (it could inflate to
 * anything), and so is one larger than the machine's memory. */
kd_status kd_dataset_open_cifar(const char *dir, int variant, int train, kd_dataset **out);

/* STL-10 binary version: DIR/{train,test}_X.bin with {train,test}_y.bin, and
 * unlabeled_X.bin. Images are 96x96x3 uint8 stored column-major per channel
 * and returned as (3, 96, 96) row-major; labels 1..10 become 0..9, unlabeled
 * samples get -1 (num_classes stays 10). File sizes and label ranges are
 * checked when opening (the labels file's size against the images file's
 * before anything is allocated); records are read with pread when needed. */
kd_status kd_dataset_open_stl10(const char *dir, kd_split split, kd_dataset **out);

/* A torchvision ImageFolder: DIR/<class>/.../NAME.{jpg,jpeg,png} (any case).
 * Classes are the subdirectories sorted by name (byte order), label = rank;
 * each class's images are found recursively and ordered by directory path,
 * then file name, as torchvision does. Other files and hidden entries
 * (names starting with ".") are ignored. A class with
 * no image is an error naming its folder. Images decode to RGB (C = 3). */
kd_status kd_dataset_open_folder(const char *dir, kd_dataset **out);

/* Every *.{jpg,jpeg,png} under dir, recursively, in the same order, with
 * label -1 and num_classes 0. */
kd_status kd_dataset_open_unlabeled(const char *dir, kd_dataset **out);

/* A text file of "PATH LABEL" lines (label a non-negative integer, the last
 * field; PATH may hold spaces; relative paths are relative to the list's
 * directory); empty lines and lines starting with '#' are skipped. A list
 * whose lines have no labels is unlabeled (-1). num_classes = largest label
 * + 1; a label of KD_DATASET_MAX_CLASSES or more is an error naming the file
 * and line. Files are not checked until they are read. */
kd_status kd_dataset_open_list(const char *list_file, kd_dataset **out);

/* Opens a split of whatever `spec_or_dir` holds. A spec may force the
 * format: "idx:DIR", "cifar10:DIR", "cifar100:DIR", "stl10:DIR",
 * "folder:DIR" (DIR/train and DIR/val or DIR/test when present, else DIR for
 * every split), "unlabeled:DIR" (every split: all images, label -1) and
 * "list:FILE" (every split). A plain directory is probed for IDX files
 * (*idx3-ubyte[.gz]), CIFAR-10 (data_batch_1.bin / test_batch.bin),
 * CIFAR-100 (train.bin / test.bin), STL-10 (*_X.bin), the subdirectories the
 * official archives unpack to (cifar-10-batches-bin, cifar-100-binary,
 * stl10_binary), then image folders: DIR/train (+ DIR/val or DIR/test) of
 * class folders, or DIR itself of class folders (its train split only; use
 * "folder:DIR" to evaluate on it), or a flat folder of images (unlabeled
 * split only). A regular file that is not an IDX prefix is read as a file
 * list. Nothing found: KD_ERR_NOT_FOUND naming the path and what was looked
 * for. */
kd_status kd_dataset_open_split(const char *spec_or_dir, kd_split split, kd_dataset **out);

/* kd_dataset_open_split with KD_SPLIT_TRAIN (train != 0) or KD_SPLIT_TEST. */
kd_status kd_dataset_open(const char *spec_or_dir, int train, kd_dataset **out);

/* A dataset from caller memory (copied): images (n, c, h, w), labels (n),
 * each label in [0, num_classes). For synthetic data and tests. */
kd_status kd_dataset_from_memory(const char *name, int64_t n, int c, int h, int w,
                                 const uint8_t *images, const int32_t *labels, int num_classes,
                                 kd_dataset **out);

/* A class-balanced random subset of n samples (copied, kept in dataset
 * order): each class gets n / num_classes samples (the first n % num_classes
 * classes one more); a class with too few samples gives all it has and the
 * shortfall is spread over the others. Unlabeled data: a uniform subset.
 * Lazy datasets copy their record indices or paths, not images.
 * Deterministic in (ds, n, seed). */
kd_status kd_dataset_subset(const kd_dataset *ds, int64_t n, uint64_t seed, kd_dataset **out);

/* Label subsets (the `labels` run setting, `kd eval --linear --labels`).
 * A spec is "P%" (P in (0, 100], up to 6 decimals: each class keeps
 * round(P / 100 * its labeled images), halves rounded up, computed exactly
 * in integers), "N" (N > 0 labeled images per class), or the path of a file
 * of dataset indices (a run directory's labels.txt). A value that starts
 * with a digit, '.', '+' or '-', or ends with '%', is a number spec and must
 * be valid; anything else is a file. "" (and "100%") means every label. */
typedef struct {
    int is_file;       /* 1: text is a file of indices */
    int64_t per_class; /* > 0: N per class */
    int64_t num, den;  /* per_class 0: the fraction num / den of each class */
    char text[512];
} kd_label_spec;
/* KD_ERR_INVALID naming `labels` and the value when text is malformed (0,
 * 0%, more than 100%, "10 %", "5x"). Checks no file. out may be NULL. */
kd_status kd_label_spec_parse(const char *text, kd_label_spec *out);

/* The labeled subset of ds that spec picks with seed: *idx (malloc'd, *n
 * dataset indices in increasing order). Class k of the K classes gets its
 * quota (above) of its labeled samples, drawn per class by a partial
 * Fisher-Yates shuffle keyed by (seed, class) (the stream of
 * kd_dataset_subset with its own tag): deterministic in (ds, spec, seed),
 * single-threaded, and for one seed a smaller spec's picks are a subset of
 * a larger one's (1% inside 10%). Unlabeled samples (-1) are never picked;
 * classes with no sample at all are skipped (kd_dataset_check_labels warns
 * about them). Errors (KD_ERR_INVALID, naming the spec and the class, with
 * its name when the dataset has class names): a class that would get no
 * labeled image ("labels 0.01%: class 3 would get no labeled image (0.01% of
 * its 6000 rounds to 0)"), N larger than a class's labeled images. A file
 * spec is read as by kd_label_indices_read. */
kd_status kd_dataset_label_subset(const kd_dataset *ds, const char *spec, uint64_t seed, int64_t **idx,
                                  int64_t *n);
/* Reads a file of dataset indices: one integer per line, strictly
 * increasing, each in [0, N) and a labeled sample of ds; empty lines and
 * lines starting with '#' are skipped (the run directory's labels.txt, written
 * by the train layer). Errors name the file and line. */
kd_status kd_label_indices_read(const char *path, const kd_dataset *ds, int64_t **idx, int64_t *n);
/* The same without the label requirement: any sample of ds (the run setting
 * train_indices, kd select's output). */
kd_status kd_dataset_indices_read(const char *path, const kd_dataset *ds, int64_t **idx, int64_t *n);

/* A dataset of the samples idx[0..n) of ds (strictly increasing, in range;
 * copied as kd_dataset_subset copies). */
kd_status kd_dataset_select(const kd_dataset *ds, const int64_t *idx, int64_t n, kd_dataset **out);
/* A copy of every sample of ds whose labels are kept for the samples in
 * idx[0..n) (strictly increasing) and -1 for every other sample. */
kd_status kd_dataset_keep_labels(const kd_dataset *ds, const int64_t *idx, int64_t n, kd_dataset **out);

/* A dataset of a's samples, then b's (index a_size + j is b's sample j):
 * labeled and unlabeled images in one epoch (the run setting `unlabeled`).
 * With drop_b_labels every b label reads -1; otherwise b's labels are kept
 * and must lie below a's num_classes. num_classes, class names, split and
 * is_train are a's. Any sources mix: two in-memory datasets give an
 * in-memory copy; otherwise the result is lazy (kd_dataset_image returns
 * NULL) and holds copies of a's and b's record indices or paths, never the
 * images of lazy parts (STL-10's 100000 unlabeled images stay in their
 * file); kd_dataset_read, kd_dataset_probe and kd_dataset_path go to the
 * part that holds the sample. a and b may be freed afterwards. Height and
 * width are a's when both have fixed sizes, else 0. Errors: KD_ERR_SHAPE
 * naming both datasets when their channels differ or both have fixed sizes
 * that differ; KD_ERR_INVALID for a kept b label outside a's classes. */
kd_status kd_dataset_concat(const kd_dataset *a, const kd_dataset *b, int drop_b_labels, kd_dataset **out);

void kd_dataset_free(kd_dataset *ds); /* NULL is fine */

int64_t kd_dataset_size(const kd_dataset *ds);
int kd_dataset_channels(const kd_dataset *ds);
int kd_dataset_height(const kd_dataset *ds); /* 0: images differ in size */
int kd_dataset_width(const kd_dataset *ds);  /* 0: images differ in size */
int kd_dataset_num_classes(const kd_dataset *ds);
int32_t kd_dataset_label(const kd_dataset *ds, int64_t i); /* -1: unlabeled */
/* (C, H, W) in memory, or NULL for a lazy dataset (use kd_dataset_read). */
const uint8_t *kd_dataset_image(const kd_dataset *ds, int64_t i);
const int32_t *kd_dataset_labels(const kd_dataset *ds);            /* (N) */
/* "fashion-mnist", "cifar-10", "stl-10", a folder's or list's base name. */
const char *kd_dataset_name(const kd_dataset *ds);
int kd_dataset_is_train(const kd_dataset *ds);
kd_split kd_dataset_split(const kd_dataset *ds);
int kd_dataset_is_lazy(const kd_dataset *ds); /* 1: samples are read on demand */
/* Class k's name (folder name, STL-10 class), or NULL when unknown. */
const char *kd_dataset_class_name(const kd_dataset *ds, int k);
/* The file sample i is read from (image file, STL-10 images file), or NULL
 * for in-memory datasets. */
const char *kd_dataset_path(const kd_dataset *ds, int64_t i);

/* Limits on hostile input. A file that claims more is refused with an error
 * naming it, before anything of that size is allocated.
 *
 * KD_IMAGE_MAX_SIDE and KD_IMAGE_MAX_PIXELS bound a decoded JPEG or PNG
 * (checked from the header, and given to libpng as its user limits): 16384
 * pixels a side and 2^26 pixels (64 Mpx, e.g. 8192 x 8192) hold every
 * photograph of current cameras and the largest images of ImageNet,
 * OpenImages and COCO (a few thousand pixels a side), while one decode
 * needs at most 3 bytes a pixel of output (192 MiB) plus one row, or as much
 * again for an interlaced PNG or a progressive JPEG's coefficients.
 *
 * KD_DATASET_MAX_CLASSES bounds the labels of a file list: a label is a class
 * index, and 100000 classes is several times ImageNet-21k's 21841 (the
 * largest common classification label set); a larger label is almost
 * certainly a mistake (a file size or a date in the label column) and would
 * make the classifier's last layer that wide. */
#define KD_IMAGE_MAX_SIDE 16384
#define KD_IMAGE_MAX_PIXELS ((int64_t)1 << 26)
#define KD_DATASET_MAX_CLASSES 100000

/* The smallest and largest label of ds (*lo = *hi = -1 when no sample has a
 * label); returns the number of labelled samples. */
int64_t kd_dataset_label_range(const kd_dataset *ds, int32_t *lo, int32_t *hi);

/* Classes in [0, num_classes) that no sample of ds carries, written
 * compactly into buf as ranges ("3, 7-9, 12", cut with "..." when buf is
 * too small); returns how many there are (0: every class has a sample). */
int kd_dataset_missing_classes(const kd_dataset *ds, int num_classes, char *buf, size_t n);

/* The label checks of a training run: a warning (kd_log_msg, KD_LOG_WARN)
 * when train's labels fall outside the range of eval's labels, naming both
 * ranges, and one listing the classes of [0, num_classes) with no training
 * sample. Writes the warnings, newline-separated, into buf when it is not
 * NULL; returns the number of warnings. */
int kd_dataset_check_labels(const kd_dataset *train, const kd_dataset *eval, int num_classes,
                            char *buf, size_t n);

/* A decoded image (C, H, W) in buffers that grow as needed and are reused
 * from call to call. Zero-initialise; release with kd_image_free. */
typedef struct {
    uint8_t *data; /* (c, h, w) */
    int c, h, w;
    size_t cap;    /* bytes allocated at data */
    struct {
        uint8_t *p;
        size_t cap;
    } raw, row;    /* internal: file bytes, one decoded row */
} kd_image;
void kd_image_free(kd_image *im);

/* Decodes the JPEG (libjpeg-turbo) or PNG (libpng) file at path, detected by
 * content, to RGB (3, h, w) uint8: grayscale is replicated, alpha dropped,
 * palettes expanded, 16-bit samples reduced to their high byte. A missing or
 * unreadable file, a truncated or corrupt image, or a file that is not a
 * JPEG or PNG fails with a message naming the path and the problem. */
kd_status kd_image_read(const char *path, kd_image *im);

/* Only the size of the image file at path (header read). */
kd_status kd_image_probe(const char *path, int *c, int *h, int *w);

/* Sample i at its own size into im (copied from memory, read or decoded). */
kd_status kd_dataset_read(const kd_dataset *ds, int64_t i, kd_image *im);
/* Only its size: free for fixed-size datasets, a header read for files. */
kd_status kd_dataset_probe(const kd_dataset *ds, int64_t i, int *c, int *h, int *w);

/* Per-channel mean and standard deviation of pixel values / 255 over up to
 * max_samples samples spread evenly over ds (all when max_samples <= 0);
 * unreadable samples are left out. Channels beyond 4 are ignored. */
kd_status kd_dataset_channel_stats(const kd_dataset *ds, int64_t max_samples, float mean[4],
                                   float std[4]);

/* ------------------------------------------------------------- transforms */

/* A growable scratch buffer for per-sample work (one per loader worker). */
typedef struct {
    void *p;
    size_t cap;
} kd_scratch;
/* At least `bytes` bytes (64-byte aligned), reusing the buffer; NULL when out
 * of memory. The contents are not kept across calls. */
void *kd_scratch_get(kd_scratch *s, size_t bytes);
void kd_scratch_free(kd_scratch *s);

/* The geometry step: maps a sample at its own size, src (c, h, w), to the
 * output size, dst (c, out_h, out_w), drawing any random choices from r
 * (the sample's stream, before the crop and flip draws). The SSL transforms
 * (random-resized-crop, ...) plug in here; scratch is the worker's. Must be
 * thread-safe and deterministic in (ctx, r, src). */
typedef kd_status (*kd_geometry_fn)(const void *ctx, kd_rng *r, const uint8_t *src, int c, int h,
                                    int w, uint8_t *dst, int out_h, int out_w, kd_scratch *scratch);

/* Per-sample augmentation, applied in torchvision order: the shared flip
 * (hflip_shared, before anything else), the geometry step
 * (only when a hook is set or the sample's size differs from out_h x out_w),
 * RandomCrop(H x W, padding = pad_crop) with zero padding,
 * RandomHorizontalFlip(0.5), ToTensor (x / 255), Normalize(mean, std). A
 * zeroed config gives x / 255 at the dataset's own (fixed) size. */
typedef struct {
    int pad_crop;  /* p > 0: pad p zeros on each side, then take an H x W window
                      whose top-left corner is uniform in [0, 2p] x [0, 2p] */
    int hflip;     /* 1: mirror left-right with probability 0.5 */
    /* 1: mirror left-right with probability 0.5 BEFORE the geometry step,
     * with one decision per sample shared by all its views (SSKD flips an
     * image once, then makes its four rotations from it): the decision is
     * kd_transform_shared_flip(seed, epoch, index), drawn from the sample's
     * shared stream, not from the view's, so it draws nothing from the view's
     * stream. 0 (the default) leaves every existing pipeline unchanged. */
    int hflip_shared;
    int normalize; /* 1: (x / 255 - mean[c]) / std[c]; 0: x / 255 */
    float mean[4]; /* per channel, C <= 4 */
    float std[4];
    /* Output size. 0: the dataset's image size (required when its images
     * differ in size). A sample of another size goes through `geometry`, or
     * by default Resize(resize) + CenterCrop(out_h, out_w) as torchvision
     * (bilinear with antialiasing, zero padding where the crop is larger). */
    int out_h, out_w;
    int resize;              /* shorter side before the centre crop; 0: max(out_h, out_w) */
    kd_geometry_fn geometry; /* NULL: the default above */
    const void *geometry_ctx;
    /* The self-supervised pipeline (SimCLR, MoCo v2, SEED views): with it
     * set, a sample at its own size goes through ToTensor (x / 255) and
     * kd_ssl_aug_apply (random-resized crop, colour jitter, grayscale,
     * blur, solarisation, flip, ssl->normalize with ssl->mean/std) into a
     * (C, ssl->size, ssl->size) view, its draws taken from the view's
     * stream (kd_ssl_aug_draw); pad_crop, hflip, geometry, normalize and
     * mean/std are not used, and out_h/out_w must be 0 or ssl->size. The
     * config it points to must outlive the loader. NULL: the pipeline above. */
    const kd_ssl_aug_cfg *ssl;
} kd_transform_cfg;

/* The random choices made for one sample (for tests and debugging). */
typedef struct {
    int top, left; /* window corner in the padded image, in [0, 2 * pad_crop] */
    int flip;
} kd_transform_draw;

/* Draws the choices for one sample from r, in a fixed order: top, left (if
 * pad_crop > 0), then flip (if hflip). */
kd_transform_draw kd_transform_draw_from(const kd_transform_cfg *cfg, kd_rng *r);

/* The crop, flip and normalisation (not the geometry step): src (C, H, W)
 * uint8; dst: (C, H, W) float32. Checks nothing: the config must have
 * passed kd_transform_check for this channel count. */
void kd_transform_apply(const kd_transform_cfg *cfg, const kd_transform_draw *d, const uint8_t *src,
                        int c, int h, int w, float *dst);

/* KD_ERR_INVALID with a message when cfg does not fit images with c channels
 * (negative padding, std == 0, more than 4 channels with normalisation...). */
kd_status kd_transform_check(const kd_transform_cfg *cfg, int c);

/* The augmentation stream key of sample `index` in `epoch`:
 * kd_rng_key(kd_rng_key(seed, epoch), index). */
uint64_t kd_data_sample_key(uint64_t seed, int64_t epoch, int64_t index);

/* The stream key of view `view` of that sample: kd_data_sample_key for view
 * 0, kd_rng_key(kd_data_sample_key(seed, epoch, index), view) for view > 0. */
uint64_t kd_data_view_key(uint64_t seed, int64_t epoch, int64_t index, int view);

/* The shared stream of that sample, read by per-sample decisions that every
 * view shares (hflip_shared): kd_rng_key(kd_data_sample_key(seed, epoch,
 * index), KD_DATA_SHARED_TAG). It differs from every view's stream. */
uint64_t kd_data_shared_key(uint64_t seed, int64_t epoch, int64_t index);

/* The shared flip decision of that sample (1: mirrored): the first uniform u
 * of its shared stream, u < 0.5. */
int kd_transform_shared_flip(uint64_t seed, int64_t epoch, int64_t index);

/* A geometry hook (kd_geometry_fn) that turns the sample by quarter turns:
 * ctx points to an int k, and the output is np.rot90 / torch.rot90(img, k,
 * dims=[1, 2]) (k = 1 a quarter turn counter-clockwise, out[y][x] =
 * in[x][w - 1 - y]; as kd_tf_rot90 on uint8). A sample whose size is not
 * the output's (after the turn) first goes through the default geometry,
 * Resize(max(out_h, out_w)) + CenterCrop, to the output size; odd k then
 * needs a square output (KD_ERR_SHAPE otherwise). Draws nothing. */
kd_status kd_geometry_rot90(const void *ctx, kd_rng *r, const uint8_t *src, int c, int h, int w,
                            uint8_t *dst, int out_h, int out_w, kd_scratch *scratch);

/* Resamples the box [x0, x1) x [y0, y1) of src (c, h, w) (pixel units,
 * fractional allowed, inside the image) to a (c, dh, dw) window of dst, a
 * (c, dst_h, dst_w) image, with top-left corner (oy, ox): bilinear with
 * antialiasing when shrinking (PIL's filter support), rounded to uint8. */
kd_status kd_image_resample(const uint8_t *src, int c, int h, int w, double x0, double y0,
                            double x1, double y1, uint8_t *dst, int dst_h, int dst_w, int oy,
                            int ox, int dh, int dw, kd_scratch *scratch);

/* The default geometry: Resize(resize, shorter side; 0: max(out_h, out_w))
 * then CenterCrop(out_h, out_w), zero-padded where the crop is larger. */
kd_status kd_image_resize_center_crop(const uint8_t *src, int c, int h, int w, int resize,
                                      uint8_t *dst, int out_h, int out_w, kd_scratch *scratch);

/* What the loader computes for dataset sample `index` in `epoch` under
 * `seed`: reads the sample, draws from its stream, then applies (geometry
 * step, crop, flip, normalisation). dst: (C, out_h, out_w). */
kd_status kd_transform_sample(const kd_transform_cfg *cfg, const kd_dataset *ds, int64_t index,
                              uint64_t seed, int64_t epoch, float *dst);

/* The same for view `view` of a multi-view loader whose view has transform
 * cfg: the draws come from kd_data_view_key(seed, epoch, index, view). View 0
 * is kd_transform_sample. */
kd_status kd_transform_sample_view(const kd_transform_cfg *cfg, const kd_dataset *ds, int64_t index,
                                   uint64_t seed, int64_t epoch, int view, float *dst);

/* Stream tag of the epoch permutation, see the header comment. */
#define KD_DATA_SHUFFLE_TAG 0x53485546464c45ull /* "SHUFFLE" */
/* Stream tag of a sample's shared stream (kd_data_shared_key). */
#define KD_DATA_SHARED_TAG 0x534841524544ull /* "SHARED" */

/* ----------------------------------------------------------------- loader */

typedef struct {
    int64_t batch_size;
    int shuffle;        /* 1: a new permutation every epoch; 0: dataset order */
    int drop_last;      /* 1: drop the last incomplete batch */
    uint64_t seed;
    int num_workers;    /* decoding threads; 0 = synchronous in the caller */
    int prefetch;       /* batches prepared ahead of the one the caller holds;
                           0 = 2 * num_workers. Ignored when num_workers = 0. */
    int skip_bad;       /* 1: an unreadable sample (corrupt, truncated, missing
                           image) is replaced by the next readable index, logged
                           once and counted; 0: it fails the batch */
    kd_transform_cfg transform;
    /* Views of each sample. 0 or 1: one view made by `transform` (or by
     * view_transforms[0] when given with n_views 1). V > 1: V views, view v
     * made by view_transforms[v], or by `transform` when view_transforms is
     * NULL; every view draws from its own stream (kd_data_view_key), and each
     * may have its own output size and geometry hook. The array is copied by
     * kd_loader_init; geometry contexts are borrowed and must outlive the
     * loader. */
    int n_views;
    const kd_transform_cfg *view_transforms; /* (n_views) or NULL */
    /* Data parallelism (docs/DISTRIBUTED.md): with shard_count R > 1 this
     * loader is process shard_rank's of R, all with the same settings: of
     * each global batch of n rows of the one permutation of the epoch it
     * takes rows [r*n/R, (r+1)*n/R) (possibly none), so the R shards together
     * are the batch one process would get. 0 or 1: every row. */
    int shard_rank, shard_count;
} kd_loader_cfg;

/* The shape of one view's samples. */
typedef struct {
    int c, h, w;
} kd_view_shape;

/* One batch, owned by the loader, valid until the next kd_loader_next,
 * kd_loader_start_epoch or kd_loader_free. A batch made by hand may fill
 * only n, batch, x, y and index: n_views 0 means one view, x. */
typedef struct {
    int64_t n;      /* samples in this batch, <= batch_size */
    int64_t batch;  /* position of the batch in the epoch: 0, 1, ... */
    float *x;       /* (n, C, H, W): view 0 */
    int32_t *y;     /* (n) */
    int64_t *index; /* (n) dataset index of each sample */
    int n_views;    /* views of each sample (>= 1 from the loader) */
    float *const *views;              /* (n_views): view v is (n, C, H_v, W_v); views[0] == x */
    const kd_view_shape *view_shape;  /* (n_views): (C, H_v, W_v) of each view */
    int64_t global_n; /* rows of the global batch this one is a shard of (shard_count > 1); 0: n */
} kd_batch;

typedef struct kd_loader kd_loader;

/* Checks cfg, allocates every batch buffer (nothing is allocated per batch
 * afterwards) and starts the workers. The dataset must outlive the loader. */
kd_status kd_loader_init(kd_loader **out, const kd_dataset *ds, const kd_loader_cfg *cfg);

/* Begins `epoch` (any value; epochs need not be consecutive). Batches of an
 * unfinished epoch are discarded. Workers start preparing batches at once. */
kd_status kd_loader_start_epoch(kd_loader *l, int64_t epoch);

/* 1 with the next batch in *out, 0 at the end of the epoch, or a negative
 * kd_status (message in kd_last_error()). */
int kd_loader_next(kd_loader *l, kd_batch *out);

int64_t kd_loader_num_batches(const kd_loader *l); /* per epoch */

/* The shape of one output sample (C, out_h, out_w) of view 0. */
void kd_loader_sample_shape(const kd_loader *l, int *c, int *h, int *w);

/* Views of each sample (>= 1) and the sample shape of view v in [0, views). */
int kd_loader_num_views(const kd_loader *l);
void kd_loader_view_shape(const kd_loader *l, int v, int *c, int *h, int *w);

/* Distinct unreadable samples found so far (skip_bad); each is counted and
 * logged once, and not read again. */
int64_t kd_loader_skipped(const kd_loader *l);

/* Stops and joins the workers (also mid-epoch) and frees the buffers. */
void kd_loader_free(kd_loader *l); /* NULL is fine */

#ifdef __cplusplus
}
#endif
#endif /* KD_DATA_H */
