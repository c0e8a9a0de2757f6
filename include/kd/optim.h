/*
 * kd/optim.h: the optimiser (parameter groups; SGD, AdamW and LARS; global
 * gradient-norm clipping) and the learning-rate schedules (multi-step,
 * cosine, per-step linear warm-up).
 *
 * Usage:
 *     kd_optim_cfg c = kd_optim_defaults(KD_OPTIM_SGD);   // momentum 0.9
 *     c.lr = 0.05;
 *     c.weight_decay = 5e-4;
 *     kd_param_group groups[1] = {{"", kd_model_params(m), 1.0f}};
 *     kd_optim *opt;
 *     kd_optim_init(&opt, groups, 1, &c);
 *     kd_sched s = {.kind = KD_SCHED_MULTISTEP, .base_lr = 0.05f, .gamma = 0.1f,
 *                   .milestones = {150, 180, 210}, .n_milestones = 3, .epochs = 240};
 *     for (...) {
 *         kd_optim_zero_grad(opt); ... kd_backward(g, loss);
 *         kd_optim_set_lr(opt, kd_sched_lr(&s, epoch, step, steps));
 *         kd_optim_step(opt);
 *     }
 */
#ifndef KD_OPTIM_H
#define KD_OPTIM_H

#include "kd/nn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------ kd_optim
 * The trainer's optimiser: parameter groups (one per role: the student, the
 * method's modules, ...), SGD (torch.optim.SGD), AdamW (torch.optim.AdamW)
 * or LARS (SimCLR's lars_optimizer.py: weight decay added to the gradient
 * before the trust ratio eta * ||w|| / ||g||; excluded tensors get neither),
 * and optional clipping of the global gradient norm
 * (torch.nn.utils.clip_grad_norm_, over every group) before the update. */
typedef enum { KD_OPTIM_SGD = 0, KD_OPTIM_ADAMW, KD_OPTIM_LARS } kd_optim_kind;

/* The hyperparameters are doubles, as PyTorch's (Python floats): torch
 * computes derived constants such as 1 - beta2, 1 - lr * weight_decay and
 * lr / (1 - beta1^t) in double and rounds each to float32 once, and kd does
 * the same (with float fields 1 - 0.999f is 1.3e-5 off 0.001). */
typedef struct {
    kd_optim_kind kind;
    double lr;
    double momentum, dampening; /* SGD and LARS (LARS ignores dampening) */
    int nesterov;               /* SGD and LARS */
    double weight_decay;        /* SGD/LARS: L2 added to the gradient; AdamW: decoupled */
    double beta1, beta2, eps;   /* AdamW */
    double trust_coef;          /* LARS eta */
    int no_decay_norm_bias;     /* 1: KD_PARAM_NO_DECAY tensors get no weight decay (LARS: no adaptation) */
    double clip_grad_norm;      /* > 0: scale gradients so their global L2 norm is at most this */
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
/* The base learning rate; group i runs at lr * groups[i].lr_scale. */
void kd_optim_set_lr(kd_optim *o, double lr);
double kd_optim_get_lr(const kd_optim *o);
void kd_optim_zero_grad(kd_optim *o);
/* Clips (if asked) and updates every parameter that has a gradient. */
kd_status kd_optim_step(kd_optim *o);
int64_t kd_optim_steps(const kd_optim *o);
/* The weight decay of the tensors that decay, for the coming steps (a
 * per-step schedule: DINO's cosine 0.04 -> 0.4); kd_optim_base_weight_decay
 * is the configured value (kd_optim_cfg.weight_decay). */
void kd_optim_set_weight_decay(kd_optim *o, double wd);
double kd_optim_base_weight_decay(const kd_optim *o);
/* Holds the optimised tensor p still during the optimiser's first `steps`
 * steps, as torch skips a parameter whose .grad is None (DINO's
 * cancel_gradients_last_layer): no update, no decay, no state change; its
 * AdamW bias correction counts its own updates and SGD's momentum buffer
 * starts at its first one. Stateless given the step count, so a resumed run
 * (which sets it again) holds it the same. KD_ERR_NOT_FOUND when p is not
 * optimised. */
kd_status kd_optim_hold(kd_optim *o, const kd_tensor *p, int64_t steps);
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
    int warmup_epochs;                /* linear warm-up per step, from 0 at the first step */
} kd_sched;

/* Learning rate for step `step` (0-based) of `steps_per_epoch` in `epoch`
 * (0-based). With g = epoch * steps_per_epoch + step and W = warmup_epochs *
 * steps_per_epoch: base_lr * g / W while g < W (SimCLR's
 * WarmUpAndCosineDecay: the first step runs at lr 0), then the schedule;
 * cosine decays per step from base_lr at g = W to min_lr at epochs *
 * steps_per_epoch. */
float kd_sched_lr(const kd_sched *s, int epoch, int64_t step, int64_t steps_per_epoch);
/* Parses "multistep" / "cosine" / "constant"; KD_ERR_NOT_FOUND otherwise. */
kd_status kd_sched_kind_parse(const char *name, kd_sched_kind *out);
const char *kd_sched_kind_name(kd_sched_kind k);

#ifdef __cplusplus
}
#endif
#endif /* KD_OPTIM_H */
