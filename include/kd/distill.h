/*
 * kd/distill.h: one interface for every distillation method ("methods own
 * the step; the trainer owns time and persistence").
 *
 * A method is a kd_method_def (one file per method under src/distill/). It
 * declares what it needs: whether it uses a teacher, whether labels are
 * required, optional or absent, how many views of each image (and, through
 * an optional hook, each view's transform), which features
 * (pre-activation too) it reads, and its own settings table with the
 * published defaults. At setup it builds what it owns (regressors, embeddings,
 * variance branches, banks, queues) sized from a probe forward of both nets.
 * Every step it runs whatever forwards it needs and returns named loss terms,
 * already weighted; the trainer sums, logs and back-propagates them. Hooks run
 * after each optimiser step and at each epoch, and an optional prepare hook
 * runs a stage before the first epoch (SSKD's teacher head). Everything a method owns is a
 * named tensor in its parameter list (trainable modules, and buffers for
 * state), saved in the run's last.safetensors under "distill.<name>".
 *
 * Most RepDistiller methods share one step: teacher forward (no gradient,
 * eval mode), student forward, then
 *
 *     L = gamma * CE(student, labels) + alpha * KL_T(teacher || student) + beta * term
 *
 * A method that provides only `term` gets that step; a method with its own
 * `step` (two peers, rotated views, EMA teachers) replaces it.
 *
 * Settings of a method are named "<method>.<setting>" everywhere: on the
 * command line (`--set vid.init_scale=5`), as top-level keys of a YAML
 * config (`vid.init_scale: 5`) and in each run's config.yaml.
 *
 * Usage (the trainer, include/kd/train.h, does all of this):
 *     kd_distill_cfg dc = kd_distill_defaults("fitnet");     // gamma 1, beta 100
 *     kd_distill_cfg_set_arg(&dc, "fitnet.hint_layer", "2");
 *     kd_method *m;
 *     kd_method_create(&dc, &shapes, &m);                     // builds the regressor
 *     kd_method_step(m, &ctx, &terms);                        // forwards + named terms
 *     ... backward, optimiser step ...
 *     kd_method_after_step(m, &ctx);
 */
#ifndef KD_DISTILL_H
#define KD_DISTILL_H

#include "kd/data.h"
#include "kd/models.h"
#include "kd/nn.h"
#include "kd/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Method settings given as "key=value" lines (key "<method>.<setting>"). */
#define KD_METHOD_ARGS_CHARS 2048

typedef struct {
    char method[32];
    float gamma; /* cross-entropy weight */
    float alpha; /* KL (soft-label) weight */
    float beta;  /* method-term weight */
    float T;     /* temperature of the KL term */
    float label_smoothing;
    uint64_t seed;
    char args[KD_METHOD_ARGS_CHARS]; /* "fitnet.hint_layer=2\n..." overrides of the method's table */
} kd_distill_cfg;

/* ------------------------------------------------------------ declarations */

typedef enum {
    KD_LABELS_REQUIRED = 0, /* every training sample must have a label */
    KD_LABELS_OPTIONAL,     /* labelled and unlabeled samples (label -1) */
    KD_LABELS_ABSENT        /* labels are never read */
} kd_label_use;

typedef enum {
    KD_TEACHER_NONE = 0, /* no teacher (supervised training, self-supervision) */
    KD_TEACHER_FROZEN    /* a frozen teacher: eval mode, no gradient, not optimised */
} kd_teacher_use;

typedef enum {
    KD_SAMPLER_SHUFFLE = 0 /* a fresh permutation of the training set each epoch */
} kd_sampler_kind;

/* Types of method settings. KD_ARG_DOUBLE stores a double where the value
 * enters double arithmetic as the official code's Python float does (MoCo's
 * momentum: 1 - m in double). KD_ARG_CHOICE stores the index (int) of the
 * value among `choices` ("exact|relax"). KD_ARG_STRING stores the text (a
 * path, a list "30,45") in a char[KD_METHOD_ARG_STR] field; a longer value
 * fails naming the setting. */
typedef enum { KD_ARG_FLOAT = 0, KD_ARG_INT, KD_ARG_BOOL, KD_ARG_CHOICE, KD_ARG_STRING, KD_ARG_DOUBLE } kd_arg_type;
#define KD_METHOD_ARG_STR 512

typedef struct {
    const char *name;    /* "init_scale": the full key is "<method>.init_scale" */
    kd_arg_type type;
    size_t offset;       /* into the method's settings struct */
    const char *def;     /* the published default, as text */
    const char *help;
    const char *choices; /* KD_ARG_CHOICE only: "a|b|c" */
} kd_method_arg;

/* Shapes of one network's outputs, from the probe forward (batch N = 2). */
typedef struct {
    int n_feat;                      /* 0: the net is absent */
    int feat_ndim[KD_MAX_FEATS];     /* 4 for maps (N, C, H, W), 2 for the pooled (N, D) */
    int64_t feat[KD_MAX_FEATS][4];   /* shape of feat[k]; preact[k] has the same shape */
    int64_t num_classes;             /* logits (N, num_classes) */
} kd_net_shapes;

typedef struct {
    kd_net_shapes student, teacher;
    int64_t n_train; /* training-set size (memory banks) */
    int num_classes;
    /* (n_train) label of each training image (-1: unlabeled), for samplers
     * that draw by class (CRD); NULL when unknown. Read during setup only. */
    const int32_t *train_labels;
    int in_channels, in_h, in_w; /* view 0's images, at which the probe ran */
    const char *student_arch;    /* the student's architecture (a method's own copy of it: DoGo's peer) */
} kd_method_shapes;

/* One training batch as a method sees it. */
typedef struct {
    int64_t n;              /* images */
    int n_views;            /* views per image (x[0..n_views-1]): the def's views */
    kd_tensor *const *x;    /* view v is (n, C, H_v, W_v); views may differ in size */
    kd_tensor *y;           /* (n) int32 labels; NULL when the method reads none */
    const int64_t *index;   /* (n) dataset index of each image */
} kd_step_batch;

typedef struct kd_method kd_method;

/* What a method's prepare hook works with (see kd_method_def.prepare). */
typedef struct {
    kd_model *teacher;       /* the frozen teacher (eval mode), or NULL when the method uses none */
    kd_backend *be;
    kd_loader *loader;       /* the run's training loader, making the method's views */
    int64_t steps_per_epoch; /* batches of an epoch the run takes (max_steps_per_epoch applies) */
    const char *run_dir;     /* the run directory; it exists */
    const char *teacher_ckpt; /* the teacher's checkpoint file, or NULL (methods that read more of it: SEED's head) */
    uint64_t seed;           /* the run's seed */
    int threads;             /* the run's thread count (already set) */
    int resume;              /* 1: a resumed run, whose checkpoint is loaded after the hook */
} kd_prepare_ctx;

/* What one step works on. The default step fills s (and t with a teacher). */
typedef struct {
    kd_graph *g;
    kd_model *student;
    kd_model *teacher;     /* NULL when the method uses none */
    kd_model *ema;         /* the EMA copy of the student (ema_student), else NULL */
    const kd_step_batch *batch;
    int epoch;             /* 0-based */
    int epochs;            /* total */
    int64_t step;          /* 0-based step within the epoch */
    int64_t steps_per_epoch;
    int64_t global_step;   /* optimiser steps done before this one */
    kd_model_out s, t;
} kd_step_ctx;

/* Named, weighted loss terms of one step; the trainer sums them. Names are
 * static strings ("ce", "kl", "fitnet"); the list grows as needed. */
typedef struct {
    int n, cap;
    const char **name;
    kd_tensor **t;
} kd_loss_terms;

kd_status kd_loss_terms_add(kd_loss_terms *lt, const char *name, kd_tensor *t);
void kd_loss_terms_clear(kd_loss_terms *lt); /* n = 0, keeps the storage */
void kd_loss_terms_free(kd_loss_terms *lt);

typedef struct kd_method_def {
    const char *name;
    const char *summary; /* one line */
    const char *paper;   /* "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015" */
    float gamma, alpha, beta, T; /* published loss weights (RepDistiller's composition) */
    kd_teacher_use teacher;
    kd_label_use labels;
    int views;            /* views per image; 1 (or 0) for the supervised family */
    /* Optional: the transform of view `view` in [0, views). The trainer
     * passes the run's base transform in *tf (normalisation, the run's crop,
     * flip and output size) and the method may change it: a geometry hook
     * (rotations, random resized crops; its context must outlive the method),
     * no flip, another output size. Each view draws from its own random
     * stream (kd_data_view_key), so views with one transform still differ.
     * The probe forward at setup runs at view 0's size. NULL: every view
     * uses the base transform. */
    kd_status (*view_transform)(const kd_method *m, int view, kd_transform_cfg *tf);
    kd_sampler_kind sampler;
    /* The fewest images a batch must hold for the loss to be defined
     * (contrastive losses need a negative: 2); 0 or 1: any. The run refuses
     * a smaller batch_size before training and drops an epoch's last,
     * smaller batch (SimCLR's drop_remainder) when this is above 1. */
    int min_batch;
    int feat_flags;       /* KD_FWD_PREACT when the method reads pre-activation features */
    /* Roles besides the student (trainable), the teacher (`teacher`) and
     * the method's own modules (trainable, a parameter group of their own):
     * ema_student = 1 asks the trainer for an EMA copy of the student
     * (ctx->ema: same architecture, started from the student's weights, eval
     * mode, never optimised, saved as "ema.<name>"); the method moves it
     * with kd_ema_update in after_step (MoCo's key encoder, DINO/EsViT's
     * teacher, mean teachers). */
    int ema_student;
    /* Settings table and the struct it fills (size), NULL/0 when none. */
    const kd_method_arg *args;
    int n_args;
    size_t args_size;
    /* Private state struct, zeroed at creation (size 0: none). */
    size_t state_size;
    /* Optional: checks the shapes (a pair the method cannot bridge is
     * KD_ERR_SHAPE naming both shapes) and builds modules and state tensors
     * in the method's parameter list. */
    kd_status (*setup)(kd_method *m, const kd_method_shapes *shp);
    /* The method term, unweighted (the default step multiplies it by beta);
     * NULL *out means no term this step. */
    kd_status (*term)(kd_method *m, kd_step_ctx *ctx, kd_tensor **out);
    /* Optional: replaces the default step entirely. */
    kd_status (*step)(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms);
    /* Optional: the method's whole loss on outputs already in ctx->s and
     * ctx->t (no forward runs), replacing the default composition gamma CE +
     * alpha KL + beta term in kd_method_loss. A method with its own step
     * (SSKD: forwards on the interleaved rotated views) fills ctx->s and
     * ctx->t and calls kd_method_loss, so that tests/test_distill.c checks
     * its loss on given outputs like any other. */
    kd_status (*loss)(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms);
    /* Optional hooks. after_step runs after the optimiser step (banks,
     * queues, EMA copies); epoch_begin before the first step of an epoch. */
    kd_status (*after_step)(kd_method *m, kd_step_ctx *ctx);
    kd_status (*epoch_begin)(kd_method *m, int epoch);
    /* Optional: runs after the backward (and the data-parallel gradient
     * all-reduce), before the optimiser step: per-step optimiser settings
     * (DINO's weight-decay schedule, kd_optim_set_weight_decay), gradient
     * surgery on the student's and the method's .grad (DINO's per-tensor
     * clipping) and held tensors (kd_optim_hold: DINO's frozen last layer). */
    kd_status (*before_update)(kd_method *m, kd_step_ctx *ctx, kd_optim *opt);
    /* Optional: the views per image when a setting decides them (DINO's
     * 2 + local_crops_number); `views` is then the fewest. */
    int (*num_views)(const kd_method *m);
    /* Optional: a stage before the first training epoch (SSKD trains the
     * teacher's self-supervision head). The training run calls it once per
     * invocation, after the method, the loader and the run directory exist
     * and before the first step (on --resume too, before the checkpoint is
     * loaded over the method's state). It may run ctx->loader over epochs of
     * its own, numbered -1, -2, ... so that their augmentation and order
     * differ from the training epochs' (the training loop restarts the
     * loader at its own epochs). It must be deterministic in the run's seed
     * and not depend on the thread count. Artifacts it writes go to
     * ctx->run_dir, atomically (kd_st_writer_save), and are reused when
     * present: a resumed run never repeats the stage. KD_ERR_INVALID or
     * KD_ERR_SHAPE from it, before it has trained anything, mean bad settings
     * or a mismatched artifact: the CLI exits 2. */
    kd_status (*prepare)(kd_method *m, const kd_prepare_ctx *ctx);
    /* Optional: frees what setup allocated outside the parameter list. */
    void (*free)(kd_method *m);
} kd_method_def;

/* ------------------------------------------------------------ registry */

/* Registered methods, in listing order. */
const kd_method_def *const *kd_method_defs(int *n);
const kd_method_def *kd_method_find(const char *name);
/* Names of the registered methods (static array). */
const char *const *kd_distill_names(int *n);
/* Writes the known method names, comma-separated, into buf. */
void kd_method_names_str(char *buf, size_t n);

/* The published defaults of a method (unknown names give an empty method). */
kd_distill_cfg kd_distill_defaults(const char *method);
/* Adds or replaces one "<method>.<setting>" value in cfg->args (checked at
 * kd_method_create / kd_distill_cfg_check). */
kd_status kd_distill_cfg_set_arg(kd_distill_cfg *cfg, const char *key, const char *value);
/* Checks the method name and every setting in cfg->args: an unknown key, a key
 * of another method or a malformed value fails naming the setting. */
kd_status kd_distill_cfg_check(const kd_distill_cfg *cfg);
/* The value of every setting of cfg's method (override or default), as
 * "key", "value" pairs through the callback, in table order. */
typedef void (*kd_arg_visit_fn)(void *user, const char *key, const char *value, const char *help);
kd_status kd_distill_cfg_visit(const kd_distill_cfg *cfg, kd_arg_visit_fn fn, void *user);

/* Whether the method, with these weights, needs a teacher (the one place
 * that decides it: config checks, setup and the step all ask here). The
 * _def form answers for a method given by its def (not registered). */
int kd_distill_needs_teacher(const kd_distill_cfg *cfg);
int kd_method_def_needs_teacher(const kd_method_def *def, const kd_distill_cfg *cfg);

/* ------------------------------------------------------------ instances */

kd_status kd_method_create(const kd_distill_cfg *cfg, const kd_method_shapes *shp, kd_method **out);
/* The same for a method of the caller's own (a kd_method_def that is not in
 * the registry: an experiment, a test); cfg->args keys use def->name. */
kd_status kd_method_create_def(const kd_method_def *def, const kd_distill_cfg *cfg, const kd_method_shapes *shp,
                               kd_method **out);
void kd_method_free(kd_method *m);
const kd_method_def *kd_method_get_def(const kd_method *m);
const kd_distill_cfg *kd_method_cfg(const kd_method *m);
int kd_method_needs_teacher(const kd_method *m);
/* Modules (trainable) and state (buffers) the method owns, PyTorch-style
 * names without the "distill." prefix the checkpoint adds. */
kd_param_list *kd_method_params(kd_method *m);
/* Parsed settings (the def's args struct) and private state. */
void *kd_method_args(kd_method *m);
const void *kd_method_args_c(const kd_method *m);
void *kd_method_state(kd_method *m);
/* Train/eval mode of the method's own modules (batch norm). */
void kd_method_set_training(kd_method *m, int training);
int kd_method_training(const kd_method *m);

/* One step's forwards and named weighted terms (appended to terms). */
kd_status kd_method_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms);
/* The default RepDistiller step's loss on given outputs: gamma CE + alpha
 * KL + beta term (ctx->s and ctx->t already filled; no forward runs), or the
 * def's own loss hook when it has one. */
kd_status kd_method_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms);
kd_status kd_method_after_step(kd_method *m, kd_step_ctx *ctx);
/* The def's before_update hook, or nothing. */
kd_status kd_method_before_update(kd_method *m, kd_step_ctx *ctx, kd_optim *opt);
/* Views per image: the def's num_views hook, else its `views` (at least 1). */
int kd_method_num_views(const kd_method *m);
kd_status kd_method_epoch_begin(kd_method *m, int epoch);
/* The def's prepare hook, or nothing when it has none. */
kd_status kd_method_prepare(kd_method *m, const kd_prepare_ctx *ctx);

/* Feature k of o in plain strided layout; negative k counts from the end
 * (-1: pooled embedding, -2: last map). preact selects o->preact. */
kd_tensor *kd_method_feat(kd_graph *g, const kd_model_out *o, int k, int preact);

#ifdef __cplusplus
}
#endif
#endif /* KD_DISTILL_H */
