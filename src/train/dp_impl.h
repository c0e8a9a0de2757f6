/* Data-parallel training (data_parallel.c): the gradient all-reduce of the
 * trainer, and the run-level steps of kd_train_run under mpirun (start-up
 * agreement, parameter broadcast, sharded evaluation, metric sums).
 * docs/DISTRIBUTED.md describes the scheme. Internal to the train layer. */
#ifndef KD_DP_IMPL_H
#define KD_DP_IMPL_H

#include "kd/dist.h"
#include "kd/train.h"

/* ---- the trainer's gradient synchronisation */

typedef struct kd__dp kd__dp;

/* Gradient buckets over the trainable tensors (those with a grad) of the
 * n_lists parameter lists, in reverse registration order (the order
 * backward finishes them), each about bucket_bytes (KD_DIST_BUCKET_KB in the
 * environment, default 1024 KiB). sync_bn: batch norm of the global batch. */
kd_status kd__dp_create(kd__dp **out, kd_param_list *const *lists, int n_lists, int sync_bn);
void kd__dp_free(kd__dp *d);
/* The factor that turns this process's gradients (of a loss that is a mean
 * over its b->n rows) into those of the global batch's mean loss: n /
 * global_n (1 / size for a batch made by hand). */
double kd__dp_scale(const kd_batch *b);
/* Before the step's forward: SyncBN on g (when asked for) with `scale`,
 * and the backward hook that posts each bucket's all-reduce as soon as
 * backward has finished its gradients. */
kd_status kd__dp_step_begin(kd__dp *d, kd_graph *g, double scale);
/* After backward: posts the buckets not posted yet, waits for all, and
 * leaves every gradient as the global batch's (sum over the processes of
 * scale * gradient). Clears what step_begin set on g. */
kd_status kd__dp_step_end(kd__dp *d, kd_graph *g);
/* The trainer's (trainer.c; NULL without data parallelism). */
const kd__dp *kd__trainer_dp(const kd_trainer *t);
/* Floats all-reduced per step, and the number of buckets (0 for NULL). */
int64_t kd__dp_floats(const kd__dp *d);
int kd__dp_buckets(const kd__dp *d);

/* ---- the run */

/* FNV-1a over n bytes, continuing from h (start with KD__FNV_INIT). */
#define KD__FNV_INIT 1469598103934665603ull
uint64_t kd__fnv1a(uint64_t h, const void *p, size_t n);
/* The hash of a resolved configuration, its settings and the method's
 * (kd_train_settings, kd_distill_cfg_visit), leaving out those that may
 * differ between ranks (threads, workers, progress). */
uint64_t kd__dp_config_hash(const kd_train_cfg *c);
/* Every rank passes its own hash of what must agree (what names it for the
 * message); an error naming the first rank whose hash differs from rank 0's,
 * reported on rank 0 (the others' error is quiet). A collective. */
kd_status kd__dp_check_same(uint64_t hash, const char *what);
/* Every tensor of pl (parameters and buffers) from rank root to the others. */
kd_status kd__dp_bcast_params(kd_param_list *pl, int root);
/* The hash of every tensor of pl (values, names, shapes). */
uint64_t kd__dp_params_hash(const kd_param_list *pl);
/* A step's figures for the global batch: *n (this rank's images in, the
 * global batch's out), sr's loss and term values (this rank's means in, the
 * global batch's means out; term_values then points to a buffer of this
 * file, valid until the next call), the top-1/top-5 hits and the count of
 * labeled images they were counted on (summed). */
kd_status kd__dp_reduce_step(kd_step_result *sr, int64_t *n, int64_t *hits1, int64_t *hits5, int64_t *labeled);

#endif
