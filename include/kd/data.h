/*
 * kd/data.h: the data layer. In-memory image datasets (MNIST-style IDX files,
 * CIFAR-10/100 binary), per-sample augmentation (random crop with zero
 * padding, horizontal flip, per-channel normalisation) and a threaded batch
 * loader with prefetch whose output does not depend on the number of workers.
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
 * Reproducibility. Everything random is drawn from the counter-based kd_rng:
 *   - the epoch permutation (shuffle = 1) is a Fisher-Yates shuffle driven by
 *     kd_rng_init(&r, seed, kd_rng_key(KD_DATA_SHUFFLE_TAG, epoch)), drawing
 *     j = kd_rng_below(&r, i + 1) for i = N-1 down to 1;
 *   - sample `index` (its index in the dataset, not its position in the epoch)
 *     is augmented with kd_rng_init(&r, seed, kd_data_sample_key(seed, epoch, index)),
 *     where kd_data_sample_key = kd_rng_key(kd_rng_key(seed, epoch), index).
 * So a batch depends only on (dataset, cfg, seed, epoch), never on num_workers,
 * prefetch or timing; the bytes are identical for any worker count.
 */
#ifndef KD_DATA_H
#define KD_DATA_H

#include <stdint.h>

#include "kd/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* --------------------------------------------------------------- datasets */

/* An in-memory labelled image dataset: uint8 images (N, C, H, W) and int32
 * labels (N) in [0, num_classes). Immutable once opened, so any number of
 * loaders and threads may read it at the same time. */
typedef struct kd_dataset kd_dataset;

/* MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST). `dir` is a
 * directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte,
 * t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each plain or gzipped
 * (".gz"). When the exact name is absent, a single file in `dir` whose name
 * ends with it (e.g. emnist-balanced-train-images-idx3-ubyte.gz) is taken; if
 * several match, pass "DIR/PREFIX" (e.g. ".../emnist-balanced") to choose the
 * files PREFIX-train-images-idx3-ubyte[.gz] etc. Magic numbers, dimensions,
 * label/image counts and exact byte lengths are checked; num_classes is the
 * largest label + 1. Images get C = 1. EMNIST images are stored transposed;
 * they are returned as stored (as torchvision does). */
kd_status kd_dataset_open_idx(const char *dir, int train, kd_dataset **out);

/* CIFAR binary version. variant 10: data_batch_1..5.bin (train) or
 * test_batch.bin, records of 1 label byte + 3072 image bytes; variant 100:
 * train.bin / test.bin, records of coarse label + fine label + 3072 bytes (the
 * fine label is used). Images are (3, 32, 32); num_classes = variant. */
kd_status kd_dataset_open_cifar(const char *dir, int variant, int train, kd_dataset **out);

/* Opens whatever `spec_or_dir` holds. A spec may force the format:
 * "idx:DIR", "cifar10:DIR", "cifar100:DIR". A plain directory is probed for
 * IDX files (*idx3-ubyte[.gz]), CIFAR-10 (data_batch_1.bin / test_batch.bin),
 * CIFAR-100 (train.bin / test.bin), then the subdirectories the official
 * archives unpack to (cifar-10-batches-bin, cifar-100-binary). A path that is
 * not a directory is tried as an IDX prefix (DIR/PREFIX). Nothing found:
 * KD_ERR_NOT_FOUND naming the directory and what was looked for. */
kd_status kd_dataset_open(const char *spec_or_dir, int train, kd_dataset **out);

/* A dataset from caller memory (copied): images (n, c, h, w), labels (n),
 * each label in [0, num_classes). For synthetic data and tests. */
kd_status kd_dataset_from_memory(const char *name, int64_t n, int c, int h, int w,
                                 const uint8_t *images, const int32_t *labels, int num_classes,
                                 kd_dataset **out);

/* A class-balanced random subset of n samples (copied, kept in dataset
 * order): each class gets n / num_classes samples (the first n % num_classes
 * classes one more); a class with too few samples gives all it has and the
 * shortfall is spread over the others. Deterministic in (ds, n, seed). */
kd_status kd_dataset_subset(const kd_dataset *ds, int64_t n, uint64_t seed, kd_dataset **out);

void kd_dataset_free(kd_dataset *ds); /* NULL is fine */

int64_t kd_dataset_size(const kd_dataset *ds);
int kd_dataset_channels(const kd_dataset *ds);
int kd_dataset_height(const kd_dataset *ds);
int kd_dataset_width(const kd_dataset *ds);
int kd_dataset_num_classes(const kd_dataset *ds);
int32_t kd_dataset_label(const kd_dataset *ds, int64_t i);
const uint8_t *kd_dataset_image(const kd_dataset *ds, int64_t i); /* (C, H, W) */
const int32_t *kd_dataset_labels(const kd_dataset *ds);            /* (N) */
/* "fashion-mnist", "cifar-10", ... (directory or file-prefix name for IDX). */
const char *kd_dataset_name(const kd_dataset *ds);
int kd_dataset_is_train(const kd_dataset *ds);

/* ------------------------------------------------------------- transforms */

/* Per-sample augmentation, applied in torchvision order: RandomCrop(H x W,
 * padding = pad_crop) with zero padding, RandomHorizontalFlip(0.5),
 * ToTensor (x / 255), Normalize(mean, std). A zeroed config gives x / 255. */
typedef struct {
    int pad_crop;  /* p > 0: pad p zeros on each side, then take an H x W window
                      whose top-left corner is uniform in [0, 2p] x [0, 2p] */
    int hflip;     /* 1: mirror left-right with probability 0.5 */
    int normalize; /* 1: (x / 255 - mean[c]) / std[c]; 0: x / 255 */
    float mean[4]; /* per channel, C <= 4 */
    float std[4];
} kd_transform_cfg;

/* The random choices made for one sample (for tests and debugging). */
typedef struct {
    int top, left; /* window corner in the padded image, in [0, 2 * pad_crop] */
    int flip;
} kd_transform_draw;

/* Draws the choices for one sample from r, in a fixed order: top, left (if
 * pad_crop > 0), then flip (if hflip). */
kd_transform_draw kd_transform_draw_from(const kd_transform_cfg *cfg, kd_rng *r);

/* src: (C, H, W) uint8; dst: (C, H, W) float32. Checks nothing: the config
 * must have passed kd_transform_check for this channel count. */
void kd_transform_apply(const kd_transform_cfg *cfg, const kd_transform_draw *d, const uint8_t *src,
                        int c, int h, int w, float *dst);

/* KD_ERR_INVALID with a message when cfg does not fit images with c channels
 * (negative padding, std == 0, more than 4 channels with normalisation...). */
kd_status kd_transform_check(const kd_transform_cfg *cfg, int c);

/* The augmentation stream key of sample `index` in `epoch`:
 * kd_rng_key(kd_rng_key(seed, epoch), index). */
uint64_t kd_data_sample_key(uint64_t seed, int64_t epoch, int64_t index);

/* What the loader computes for dataset sample `index` in `epoch` under
 * `seed`: draws from the sample's stream, then applies. dst: (C, H, W). */
kd_status kd_transform_sample(const kd_transform_cfg *cfg, const kd_dataset *ds, int64_t index,
                              uint64_t seed, int64_t epoch, float *dst);

/* Stream tag of the epoch permutation, see the header comment. */
#define KD_DATA_SHUFFLE_TAG 0x53485546464c45ull /* "SHUFFLE" */

/* ----------------------------------------------------------------- loader */

typedef struct {
    int64_t batch_size;
    int shuffle;        /* 1: a new permutation every epoch; 0: dataset order */
    int drop_last;      /* 1: drop the last incomplete batch */
    uint64_t seed;
    int num_workers;    /* decoding threads; 0 = synchronous in the caller */
    int prefetch;       /* batches prepared ahead of the one the caller holds;
                           0 = 2 * num_workers. Ignored when num_workers = 0. */
    kd_transform_cfg transform;
} kd_loader_cfg;

/* One batch, owned by the loader, valid until the next kd_loader_next,
 * kd_loader_start_epoch or kd_loader_free. */
typedef struct {
    int64_t n;      /* samples in this batch, <= batch_size */
    int64_t batch;  /* position of the batch in the epoch: 0, 1, ... */
    float *x;       /* (n, C, H, W) */
    int32_t *y;     /* (n) */
    int64_t *index; /* (n) dataset index of each sample */
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

/* Stops and joins the workers (also mid-epoch) and frees the buffers. */
void kd_loader_free(kd_loader *l); /* NULL is fine */

#ifdef __cplusplus
}
#endif
#endif /* KD_DATA_H */
