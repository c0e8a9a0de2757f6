/* Learning-rate schedules: constant, multi-step (RepDistiller), cosine
 * (SEED/EsViT style), each with optional linear warm-up per step. */
#include <math.h>
#include <string.h>

#include "kd/optim.h"

float kd_sched_lr(const kd_sched *s, int epoch, int64_t step, int64_t steps_per_epoch) {
    if (steps_per_epoch < 1) steps_per_epoch = 1;
    double t = epoch + (double)step / (double)steps_per_epoch; /* epochs done */
    if (s->warmup_epochs > 0 && t < s->warmup_epochs) {
        double done = (double)epoch * steps_per_epoch + step + 1;
        return (float)(s->base_lr * done / ((double)s->warmup_epochs * steps_per_epoch));
    }
    switch (s->kind) {
    case KD_SCHED_MULTISTEP: {
        double lr = s->base_lr;
        for (int i = 0; i < s->n_milestones; i++)
            if (epoch >= s->milestones[i]) lr *= s->gamma;
        return (float)lr;
    }
    case KD_SCHED_COSINE: {
        double span = (double)s->epochs - s->warmup_epochs;
        double u = span > 0 ? (t - s->warmup_epochs) / span : 1.0;
        if (u > 1) u = 1;
        return (float)(s->min_lr + 0.5 * (s->base_lr - s->min_lr) * (1.0 + cos(M_PI * u)));
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
