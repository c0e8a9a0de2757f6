/* Internal helpers shared by the train-layer files. */
#ifndef KD_TRAIN_IMPL_H
#define KD_TRAIN_IMPL_H

#include "kd/io.h"
#include "kd/train.h"

kd_status kd__ckpt_add_model(kd_st_writer *w, kd_model *m);
/* Every tensor of pl as "<prefix><name>" (the writer keeps pointers: pl must
 * outlive the save), and back. */
kd_status kd__save_params(kd_st_writer *w, const kd_param_list *pl, const char *prefix);
kd_status kd__load_params(kd_param_list *pl, const kd_st_file *f, const char *prefix);
kd_status kd__model_load_from(kd_model *m, const kd_st_file *f);

/* Writes DIR/curves.svg from DIR/metrics.jsonl (loss and accuracy per epoch). */
kd_status kd__write_curves(const char *dir);

/* The `labels` setting applied to a run's training set (labels_run.c).
 * *train: in, the whole training split; out, what the method trains on:
 * the labeled images alone (KD_LABELS_REQUIRED, and `kd train`), every
 * image with the others' labels -1 (KD_LABELS_OPTIONAL), or unchanged with
 * a warning (KD_LABELS_ABSENT, or labels empty: idx NULL). A resumed run
 * reads OUT/labels.txt when present. config_error: the spec could not be
 * met on this dataset (a bad command line). */
typedef struct {
    int64_t *idx, n; /* the labeled dataset indices (malloc'd), or NULL */
    int64_t n_split; /* images of the whole training split */
    char split_name[128];
    int from_file;
    int config_error;
} kd__run_labels_out;
kd_status kd__run_labels(const kd_train_cfg *c, int resume, kd_dataset **train, kd__run_labels_out *o);
/* Writes o's indices to path (a '#' line naming spec, seed and dataset, then
 * one index per line), atomically. */
kd_status kd__labels_write(const char *path, const kd__run_labels_out *o, const char *spec, uint64_t seed);

/* Top-1 and top-5 hits of logits (n, k) against labels; a class ranks ahead
 * of the label when its logit is larger, or equal with a smaller index
 * (torch.topk on CPU). */
void kd__count_hits(const float *logits, const int32_t *y, int64_t n, int64_t k, int64_t *top1, int64_t *top5,
                    int64_t *counted);

/* The evaluation pass (kd_evaluate, kd_extract_features): ds in dataset
 * order, batches of `batch`, transform tf without its crop and flip, m in
 * eval mode with gradients off (its mode restored after); fn gets each
 * batch, the graph and the forward's outputs (valid until it returns).
 * sharded: this process's shard of each batch in a data-parallel run (the
 * loader's shard_rank/count from kd_dist; an empty share is skipped). */
typedef kd_status (*kd__eval_fn)(void *user, const kd_batch *b, kd_graph *g, const kd_model_out *o);
kd_status kd__eval_pass(kd_model *m, kd_backend *be, const kd_dataset *ds, int batch, const kd_transform_cfg *tf,
                        int sharded, kd__eval_fn fn, void *user);
/* kd_evaluate; sharded: each process evaluates its shard and the hits, loss
 * sums and counts are summed over the processes (every rank gets the result). */
kd_status kd__evaluate(kd_model *m, kd_backend *be, const kd_dataset *ds, int batch, const kd_transform_cfg *tf,
                       int sharded, double *top1, double *top5, double *loss);

#endif
