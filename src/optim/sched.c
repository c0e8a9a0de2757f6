/* Learning-rate schedules: constant, multi-step (RepDistiller), cosine per
 * step (SimCLR tf2/model.py WarmUpAndCosineDecay; DINO utils.py
 * cosine_scheduler for the floor min_lr), each with an optional linear
 * warm-up per step from lr 0 at the very first step (SimCLR: step /
 * warmup_steps * lr). tests/test_optim.c compares against a Python
 * transcription of SimCLR's formula (tools/gen_optim_fixtures.py). */
#include <math.h>
#include <string.h>

#include "kd/optim.h"

float kd_sched_lr(const kd_sched *s, int epoch, int64_t step, int64_t steps_per_epoch) {
    if (steps_per_epoch < 1) steps_per_epoch = 1;
    const double g = (double)epoch * (double)steps_per_epoch + (double)step; /* steps done */
    const double warm = s->warmup_epochs > 0 ? (double)s->warmup_epochs * (double)steps_per_epoch : 0.0;
    if (g < warm) return (float)(s->base_lr * (g / warm));
    switch (s->kind) {
    case KD_SCHED_MULTISTEP: {
        double lr = s->base_lr;
        for (int i = 0; i < s->n_milestones; i++)
            if (epoch >= s->milestones[i]) lr *= s->gamma;
        return (float)lr;
    }
    case KD_SCHED_COSINE: {
        const double span = (double)s->epochs * (double)steps_per_epoch - warm;
        double u = span > 0 ? (g - warm) / span : 1.0;
        if (u > 1) u = 1;
        if (u < 0) u = 0;
        return (float)(s->min_lr + 0.5 * ((double)s->base_lr - s->min_lr) * (1.0 + cos(M_PI * u)));
    }
    case KD_SCHED_CONSTANT:
    default:
        return s->base_lr;
    }
}

static const char *const kd__sched_names[] = {"constant", "multistep", "cosine"};

kd_status kd_sched_kind_parse(const char *name, kd_sched_kind *out) {
    for (int i = 0; i < 3; i++)
        if (strcmp(name, kd__sched_names[i]) == 0) {
            *out = (kd_sched_kind)i;
            return KD_OK;
        }
    return kd_error(KD_ERR_NOT_FOUND, "unknown schedule '%s' (known: constant, multistep, cosine)", name);
}

const char *kd_sched_kind_name(kd_sched_kind k) {
    return (unsigned)k < 3 ? kd__sched_names[k] : "?";
}
