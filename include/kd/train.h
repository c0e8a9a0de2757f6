/*
 * kd/train.h: the training loop (supervised training and distillation share
 * it), evaluation, checkpoints, resume, and the run settings.
 *
 * Every run writes a run directory:
 *   config.yaml        the fully resolved settings (`--config` reads it back)
 *   metrics.jsonl      one JSON object per logged step and per epoch
 *   summary.json       final metrics, throughput, wall time, versions
 *   last.safetensors   model + optimiser state after the last epoch (for --resume)
 *   best.safetensors   model weights with the best test top-1
 *   curves.svg         loss and accuracy per epoch (from metrics.jsonl)
 * Checkpoints are written to a temporary file, fsynced and renamed.
 *
 * Usage:
 *     kd_train_cfg c;
 *     kd_train_cfg_defaults(&c);
 *     kd_train_cfg_set(&c, "model", "resnet8");
 *     kd_train_cfg_set(&c, "data", "/usr/share/datasets/fashion-mnist");
 *     kd_train_result r;
 *     if (kd_train_run(&c, &r) != KD_OK) fprintf(stderr, "kd: %s\n", kd_last_error());
 */
#ifndef KD_TRAIN_H
#define KD_TRAIN_H

#include "kd/data.h"
#include "kd/distill.h"
#include "kd/io.h"
#include "kd/models.h"
#include "kd/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    /* data */
    char data[512];       /* dataset directory or spec (idx:DIR, cifar10:DIR, stl10:DIR, folder:DIR, ...) */
    int64_t train_subset; /* 0: whole training set; n: class-balanced subset of n */
    char train_indices[512]; /* "" all; else a file of dataset indices (kd select's output): the training
                                set becomes those images, after `labels` marked the labeled ones */
    char labels[512];     /* label subset: "" all labels, "P%", "N" per class or a file of indices
                             (kd_dataset_label_subset); see kd_train_run */
    char unlabeled[512];  /* "" none; else a dataset spec or directory (as `data`) whose unlabeled split
                             (STL-10 unlabeled_X.bin, a folder's unlabeled/, else its training images
                             without labels) joins every epoch (kd_dataset_concat), labels -1 */
    int pad_crop;         /* random-crop padding; -1: 4 for 32x32 images, 2 for smaller */
    int hflip;            /* random horizontal flip */
    int workers;          /* loader threads; 0 = in the training thread */
    int image_size;       /* output side for variable-size images (0: the dataset's own size) */
    int resize;           /* shorter side before the centre crop (0: image_size) */
    int skip_bad_images;  /* 1: replace unreadable training images (loader skip_bad) */
    /* models */
    char model[48];         /* student (or the model trained by `kd train`) */
    char teacher[48];       /* teacher architecture; empty: read from the checkpoint */
    char teacher_ckpt[512]; /* teacher weights (safetensors) */
    char init_ckpt[512];    /* optional initial weights for the student */
    int ft_proj_selector;   /* SimCLRv2: classifier on head layer k of init_ckpt's projection head (0: the embedding) */
    /* method and loss weights (NaN: the method's published default) */
    kd_distill_cfg distill;
    /* optimisation */
    int epochs;
    int batch_size;
    float lr;
    /* Optimiser hyperparameters are doubles, as PyTorch's (kd_optim_cfg). */
    double momentum, weight_decay;
    int nesterov;
    kd_optim_kind optimizer;  /* sgd, adamw, lars */
    double adam_beta1, adam_beta2, adam_eps;
    double lars_trust;        /* LARS trust coefficient eta */
    int no_decay_bn_bias;     /* no weight decay on batch-norm parameters and biases */
    double clip_grad_norm;    /* > 0: clip the global gradient norm */
    int sync_bn;              /* data parallelism: batch norm with the global batch's statistics */
    kd_sched sched; /* kind, milestones, gamma, warmup, min_lr (base_lr and epochs come from lr/epochs) */
    /* runtime */
    uint64_t seed;
    int threads;      /* 0: all cores */
    char backend[16]; /* "cpu" or "ref" */
    char precision[8]; /* convolutions: "f32" or "bf16" (float32 master weights either way) */
    char out[512];    /* run directory */
    int progress;     /* -1: a bar on a terminal, log lines otherwise; 0: lines; 1: bar */
    int log_every;    /* steps between step lines in metrics.jsonl (0: epochs only) */
    int eval_batch;
    int eval_every;   /* test-split evaluation every N epochs and after the last (1) */
    int64_t max_steps_per_epoch; /* 0: whole epochs (tests use small values) */
    int stop_after;              /* >0: stop (resumably) after this many epochs of this invocation */
    int allow_thread_change;     /* 1: a resume may use another compute thread count than the
                                    checkpoint's (refused otherwise: the result is then no longer
                                    bit-identical to an uninterrupted run) */
} kd_train_cfg;

void kd_train_cfg_defaults(kd_train_cfg *c);
/* Sets one setting by name ("lr", "model", "milestones" = "150,180,210", ...).
 * A malformed value fails with a message naming the setting and the value. */
kd_status kd_train_cfg_set(kd_train_cfg *c, const char *key, const char *value);
/* Reads a YAML mapping of settings (as written by kd_train_cfg_save). */
kd_status kd_train_cfg_load(kd_train_cfg *c, const char *path);
/* Fills method defaults for unset loss weights, checks the settings. */
kd_status kd_train_cfg_resolve(kd_train_cfg *c);
/* The optimiser settings of c (optimizer, lr, momentum, ...). */
kd_optim_cfg kd_train_cfg_optim(const kd_train_cfg *c);
/* Writes every setting as YAML, atomically. */
kd_status kd_train_cfg_save(const kd_train_cfg *c, const char *path);

/* One help line per setting, for `--help`. */
typedef struct {
    const char *key;
    const char *help;
} kd_setting_doc;
const kd_setting_doc *kd_train_settings(int *n);
/* The current value of a setting as text (for --help defaults and configs). */
kd_status kd_train_cfg_get(const kd_train_cfg *c, const char *key, char *buf, size_t n);

/* ------------------------------------------------------------ one step
 * kd_train_step is the training step, written once: the CLI's loop, bench/
 * and the tests all call it. A kd_trainer holds what a step needs besides
 * the batch: the graph, the method (sized by a probe forward of both nets at
 * init), the optimiser over the student's and the method's parameter groups,
 * and the schedule.
 *
 *     kd_trainer_cfg tc = {.student = s, .teacher = t, .method = kd_distill_defaults("kd"),
 *                          .optim = kd_optim_defaults(KD_OPTIM_SGD), .sched = sched, .be = be,
 *                          .precision = KD_F32, .in_channels = 3, .height = 32, .width = 32,
 *                          .num_classes = 100, .n_train = 50000};
 *     kd_trainer *tr;
 *     kd_trainer_init(&tr, &tc);
 *     kd_step_result r;
 *     kd_train_step(tr, &batch, epoch, step, steps_per_epoch, &r);   // r.loss, r.term_values[]
 */
typedef struct {
    kd_model *student;    /* borrowed, trained */
    kd_model *teacher;    /* borrowed, frozen; NULL when the method needs none */
    kd_distill_cfg method;
    const kd_method_def *method_def; /* NULL: the registered method named method.method; else a
                                        method of the caller's own */
    kd_optim_cfg optim;   /* optim.lr is the base learning rate */
    kd_sched sched;       /* base_lr and epochs included */
    kd_backend *be;
    kd_dtype precision;   /* KD_F32 or KD_BF16 convolutions */
    int in_channels, height, width; /* the shape of view 0's images (the probe forward's) */
    int num_classes;
    int64_t n_train;      /* training-set size */
    const int32_t *train_labels; /* (n_train) training labels (-1: none) for methods that sample by
                                    class (CRD); NULL when unknown; read during kd_trainer_init only */
    uint64_t seed;        /* dropout masks and the method's initialisation */
    /* Data parallelism (kd/dist.h, docs/DISTRIBUTED.md): 1 when this process is
     * one rank of several that train one model, each on its shard of every
     * global batch (kd_loader_cfg.shard_*): kd_train_step sums the gradients
     * over the ranks, each rank's scaled by its share of the global batch.
     * sync_bn: batch norm with the global batch's statistics. */
    int data_parallel, sync_bn;
} kd_trainer_cfg;

typedef struct {
    double loss;                     /* sum of the terms */
    int n_terms;
    const char *const *term_names;   /* "ce", "kl", "<method>", ... (valid until the next step) */
    const double *term_values;       /* weighted values */
    float lr;
    const float *logits;             /* student logits (n, classes) of view 0, or NULL */
    int64_t classes;
} kd_step_result;

typedef struct kd_trainer kd_trainer;

kd_status kd_trainer_init(kd_trainer **out, const kd_trainer_cfg *cfg);
void kd_trainer_free(kd_trainer *t);
/* One optimiser step on batch b (b->y may be NULL for methods without labels).
 * b carries the method's views (b->n_views = kd_trainer_num_views, each view
 * at its own size, view 0 at the trainer's); the method sees them as
 * ctx->batch->x[0..n_views-1]. */
kd_status kd_train_step(kd_trainer *t, const kd_batch *b, int epoch, int64_t step, int64_t steps_per_epoch,
                        kd_step_result *res);
kd_graph *kd_trainer_graph(kd_trainer *t);
/* The EMA copy of the student when the method asks for one (ema_student), else NULL. */
kd_model *kd_trainer_ema(kd_trainer *t);
kd_method *kd_trainer_method(kd_trainer *t);
/* Views of each image the method takes (its def's views, at least 1): a
 * batch for kd_train_step carries that many (kd_batch.views; a batch with
 * n_views 0 is one view, x). */
int kd_trainer_num_views(const kd_trainer *t);
/* The loader transforms of the method's views for a run whose own transform
 * is base (normalisation, crop, flip, output size): out[v], v in [0,
 * kd_trainer_num_views(t)), is base as the method's view_transform hook
 * changes it for view v (base itself without a hook). For
 * kd_loader_cfg.view_transforms; view 0's output size must be the trainer's
 * (in_channels, height, width), at which the probe ran. */
kd_status kd_trainer_view_transforms(const kd_trainer *t, const kd_transform_cfg *base, kd_transform_cfg *out);
kd_optim *kd_trainer_optim(kd_trainer *t);
/* Train (1) or eval (0) mode of the student and the method's modules. */
void kd_trainer_set_training(kd_trainer *t, int training);
/* Adds the optimiser state ("optim.*"), the method's modules and state
 * ("distill.*"), the EMA copy of the student ("ema.*") and the step count (metadata "opt_steps") to w; the tensors
 * must stay alive until w is saved. */
kd_status kd_trainer_save_state(kd_trainer *t, kd_st_writer *w);
/* Reads back what kd_trainer_save_state wrote; every tensor must be there. */
kd_status kd_trainer_load_state(kd_trainer *t, const kd_st_file *f);

typedef struct {
    double top1, top5, test_loss; /* last epoch, on the test split */
    double best_top1;
    int best_epoch;
    int epochs_done;
    double images_per_s; /* training throughput over the run */
    double wall_s;
    int64_t params;
    int config_error; /* the run failed at setup, before reading any training image, because the
                         method refused its settings or the teacher/student pair (KD_ERR_SHAPE,
                         KD_ERR_INVALID): a bad command line, not a failure while running */
} kd_train_result;

/* Trains cfg->model with cfg->distill.method ("none" = plain training),
 * writing the run directory cfg->out. With cfg->labels set, the labeled
 * subset of the whole training split (kd_dataset_label_subset with
 * cfg->seed) is recorded in OUT/labels.txt (read back on resume) and, by the
 * method's kd_method_def.labels: REQUIRED trains on those images only,
 * OPTIONAL on every image with the others' labels -1, ABSENT ignores the
 * setting (a warning). The normalisation is the whole split's either way. A
 * spec the data cannot meet is a configuration error (res->config_error). */
kd_status kd_train_run(const kd_train_cfg *cfg, kd_train_result *res);
/* Continues the run in `dir` from its last checkpoint with its own
 * config.yaml; the final weights equal those of an uninterrupted run, also
 * after a kill -9 at any moment (a run killed before its first checkpoint
 * starts again from epoch 0; metrics.jsonl keeps each record once; stale
 * temporary files are removed). `overrides` holds n key/value pairs (keys[i],
 * values[i]) of settings that do not change the result: workers, progress,
 * log_every, stop_after, threads; any other key is refused. A compute thread
 * count (after `threads` 0 = all cores is resolved) other than the
 * checkpoint's is refused with a message naming both, unless
 * allow_thread_change is 1 (then the result is no longer bit-identical). */
kd_status kd_train_resume(const char *dir, const char *const *keys, const char *const *values, int n,
                          kd_train_result *res);

/* ------------------------------------------------------------ kd select
 * SSLD's selection of unlabeled data (METHODS.md section 16): the teacher
 * scores every training image outside the label subset `labels` (eval mode,
 * the evaluation transform); for each class the per_class images with the
 * highest probability of that class are kept (ties: the smaller dataset
 * index); `out` gets the selected and the labeled images, one dataset index
 * per line after a '#' header, sorted, each once: the train_indices of an
 * SSLD run (with the same labels). */
typedef struct {
    char data[512];
    char teacher_ckpt[512];
    char labels[512]; /* the label subset spec or file ("" : no labeled image) */
    /* "" or a dataset spec whose unlabeled images join the candidates, numbered
     * after the training split's (as the run setting `unlabeled` numbers them) */
    char unlabeled[512];
    uint64_t seed;    /* of the label subset */
    int64_t per_class;
    char out[512];    /* the index file to write (atomically) */
    int threads, batch;
    char backend[16];
} kd_select_cfg;

typedef struct {
    int64_t labeled, selected, total;
    int64_t test_duplicates; /* candidates equal to an evaluation image, left out */
    int config_error; /* bad settings, found before the teacher ran */
} kd_select_result;

kd_status kd_select_run(const kd_select_cfg *cfg, kd_select_result *res);
/* The selection itself: probs (n, classes) of the candidates index[0..n-1];
 * *out (malloc'd) gets, class after class, the dataset indices of the at
 * most k candidates of highest probability of that class (ties: the smaller
 * index), *n_out of them (an index may appear under several classes). */
kd_status kd_select_topk(const float *probs, const int64_t *index, int64_t n, int classes, int64_t k,
                         int64_t **out, int64_t *n_out);

/* Top-1/top-5 accuracy (percent) and mean cross-entropy of m on ds, in eval mode. */
kd_status kd_evaluate(kd_model *m, kd_backend *be, const kd_dataset *ds, int batch,
                      const kd_transform_cfg *tf, double *top1, double *top5, double *loss);

/* Model weights from a safetensors file with PyTorch names. Every tensor of
 * the model must be present with its exact shape; extra tensors (optimiser
 * state) are ignored. */
kd_status kd_model_load(kd_model *m, const char *path);
/* Creates the model named in the checkpoint's metadata ("arch") unless arch
 * is given, and loads it; cfg's head_layers is replaced by the checkpoint's
 * ("head_layers", 0 when absent). */
kd_status kd_model_load_new(const char *path, const char *arch, const kd_model_cfg *cfg,
                            kd_model **out);
/* Writes the model of checkpoint `ckpt` (a run's last.safetensors: model,
 * optimiser state, method tensors, EMA copy) alone to `out`: its tensors
 * under their PyTorch state_dict names and the model metadata (arch,
 * in_channels, num_classes, head_layers), nothing else, so that PyTorch
 * loads it with load_state_dict(strict=True). ema 1 exports the EMA copy
 * ("ema.*": MoCo's key encoder, a DINO teacher) instead. `out` is written
 * as every checkpoint (temporary file, fsync, rename). */
kd_status kd_model_export(const char *ckpt, const char *out, int ema);
/* Writes the model's state dict (PyTorch names) with metadata, atomically. */
kd_status kd_model_save(kd_model *m, const char *path);
/* The encoder a self-supervised run gives (encoder.safetensors): the model's
 * state dict plus the method's projection head "head.*" (PyTorch
 * nn.Sequential names), metadata "arch", "ssl_method" and "head"
 * (simclr: 3 layers with batch norm; mlp: Linear-ReLU-Linear). A teacher for
 * SEED, or the start of a fine-tune (init_ckpt: extra tensors are ignored). */
kd_status kd_encoder_save(kd_model *m, const kd_method *method, const char *path);

/* The per-channel normalisation kd uses for a dataset (CIFAR-100 recipe
 * values for CIFAR, measured values for Fashion-MNIST/MNIST). */
void kd_dataset_norm(const kd_dataset *ds, float mean[4], float std[4]);

#ifdef __cplusplus
}
#endif
#endif /* KD_TRAIN_H */
