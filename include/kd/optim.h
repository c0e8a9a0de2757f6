/*
 * kd/optim.h: SGD with momentum, Nesterov and weight decay (PyTorch's exact
 * update), and learning-rate schedules (multi-step, cosine, linear warm-up).
 *
 * Usage:
 *     kd_sgd *opt;
 *     kd_sgd_cfg c = {.lr = 0.05f, .momentum = 0.9f, .weight_decay = 5e-4f};
 *     kd_param_list *pl[1] = {kd_model_params(m)};
 *     kd_sgd_init(&opt, pl, 1, &c);
 *     kd_sched s = {.kind = KD_SCHED_MULTISTEP, .base_lr = 0.05f, .gamma = 0.1f,
 *                   .milestones = {150, 180, 210}, .n_milestones = 3, .epochs = 240};
 *     for (...) { kd_sgd_set_lr(opt, kd_sched_lr(&s, epoch, step, steps)); ... kd_sgd_step(opt); }
 */
#ifndef KD_OPTIM_H
#define KD_OPTIM_H

#include "kd/nn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    float lr;
    float momentum;     /* 0 disables the buffer */
    float dampening;    /* PyTorch default 0 */
    float weight_decay; /* L2 added to the gradient, as torch.optim.SGD */
    int nesterov;
    int no_decay_norm_bias; /* 1: no weight decay on KD_PARAM_NO_DECAY tensors */
} kd_sgd_cfg;

typedef struct kd_sgd kd_sgd;

/* The optimiser updates every trainable tensor (not buffers) of the n_lists
 * parameter lists (e.g. the student and the distiller's extra modules). */
kd_status kd_sgd_init(kd_sgd **out, kd_param_list *const *lists, int n_lists, const kd_sgd_cfg *cfg);
void kd_sgd_free(kd_sgd *o);
void kd_sgd_set_lr(kd_sgd *o, float lr);
float kd_sgd_get_lr(const kd_sgd *o);
/* p -= lr * update(grad); grads are left as they are (zero them yourself). */
kd_status kd_sgd_step(kd_sgd *o);
void kd_sgd_zero_grad(kd_sgd *o);
int64_t kd_sgd_steps(const kd_sgd *o);
/* The state as named tensors ("<param>.momentum_buffer") for checkpoints. */
int kd_sgd_state_count(const kd_sgd *o);
kd_status kd_sgd_state_get(const kd_sgd *o, int i, const char **name, kd_tensor **t);
/* Marks the momentum buffers as initialised after loading them, and the step count. */
void kd_sgd_state_loaded(kd_sgd *o, int64_t steps);

/* ------------------------------------------------------------ kd_optim
 * The trainer's optimiser: parameter groups (one per role: the student, the
 * method's modules, ...), SGD (torch.optim.SGD), AdamW (torch.optim.AdamW)
 * or LARS (SimCLR's lars_optimizer.py: weight decay added to the gradient
 * before the trust ratio eta * ||w|| / ||g||; excluded tensors get neither),
 * and optional clipping of the global gradient norm
 * (torch.nn.utils.clip_grad_norm_, over every group) before the update. */
typedef enum { KD_OPTIM_SGD = 0, KD_OPTIM_ADAMW, KD_OPTIM_LARS } kd_optim_kind;

typedef struct {
    kd_optim_kind kind;
    float lr;
    float momentum, dampening; /* SGD and LARS */
    int nesterov;              /* SGD */
    float weight_decay;        /* SGD/LARS: L2 added to the gradient; AdamW: decoupled */
    float beta1, beta2, eps;   /* AdamW */
    float trust_coef;          /* LARS eta */
    int no_decay_norm_bias;    /* 1: KD_PARAM_NO_DECAY tensors get no weight decay (LARS: no adaptation) */
    float clip_grad_norm;      /* > 0: scale gradients so their global L2 norm is at most this */
} kd_optim_cfg;

/* torch defaults: SGD momentum 0.9, AdamW betas (0.9, 0.999) eps 1e-8, LARS eta 0.001. */
kd_optim_cfg kd_optim_defaults(kd_optim_kind kind);

typedef struct {
    const char *prefix;     /* prepended to parameter names in state names: "" or "distill." */
    kd_param_list *params;  /* trainable tensors are optimised; buffers are skipped */
    float lr_scale;         /* this group's lr = lr * lr_scale */
} kd_param_group;

typedef struct kd_optim kd_optim;

kd_status kd_optim_init(kd_optim **out, const kd_param_group *groups, int n_groups, const kd_optim_cfg *cfg);
void kd_optim_free(kd_optim *o);
void kd_optim_set_lr(kd_optim *o, float lr);
float kd_optim_get_lr(const kd_optim *o);
void kd_optim_zero_grad(kd_optim *o);
/* Clips (if asked) and updates every parameter that has a gradient. */
kd_status kd_optim_step(kd_optim *o);
int64_t kd_optim_steps(const kd_optim *o);
/* Global gradient L2 norm measured by the last step (before clipping; 0 when
 * clipping is off). */
double kd_optim_last_grad_norm(const kd_optim *o);
/* The state as named tensors ("<prefix><param>.momentum_buffer", ".exp_avg",
 * ".exp_avg_sq") for checkpoints; after loading them call state_loaded. */
int kd_optim_state_count(const kd_optim *o);
kd_status kd_optim_state_get(const kd_optim *o, int i, const char **name, kd_tensor **t);
void kd_optim_state_loaded(kd_optim *o, int64_t steps);
kd_status kd_optim_kind_parse(const char *name, kd_optim_kind *out);
const char *kd_optim_kind_name(kd_optim_kind k);

typedef enum { KD_SCHED_CONSTANT = 0, KD_SCHED_MULTISTEP, KD_SCHED_COSINE } kd_sched_kind;

#define KD_MAX_MILESTONES 8
typedef struct {
    kd_sched_kind kind;
    float base_lr;
    int epochs;                       /* total, for cosine */
    int milestones[KD_MAX_MILESTONES]; /* epochs at which lr *= gamma (multistep) */
    int n_milestones;
    float gamma;
    float min_lr;                     /* cosine floor */
    int warmup_epochs;                /* linear warm-up from 0, per step */
} kd_sched;

/* Learning rate for step `step` (0-based) of `steps_per_epoch` in `epoch` (0-based). */
float kd_sched_lr(const kd_sched *s, int epoch, int64_t step, int64_t steps_per_epoch);
/* Parses "multistep" / "cosine" / "constant"; KD_ERR_NOT_FOUND otherwise. */
kd_status kd_sched_kind_parse(const char *name, kd_sched_kind *out);
const char *kd_sched_kind_name(kd_sched_kind k);

#ifdef __cplusplus
}
#endif
#endif /* KD_OPTIM_H */
