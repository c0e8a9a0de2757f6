/* SGD with momentum, dampening, Nesterov and L2 weight decay, following
 * torch.optim.SGD exactly (the first step copies the gradient into the buffer). */
#include "kd/optim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    kd_tensor *p;   /* the parameter (owned by the model) */
    kd_tensor *buf; /* momentum buffer, same shape; NULL when momentum == 0 */
    char name[160];
    int decay;
} kd__sgd_slot;

struct kd_sgd {
    kd_sgd_cfg cfg;
    kd__sgd_slot *slots;
    int n;
    int buf_ready;
    int64_t steps;
};

kd_status kd_sgd_init(kd_sgd **out, kd_param_list *const *lists, int n_lists, const kd_sgd_cfg *cfg) {
    *out = NULL;
    if (!(cfg->lr >= 0) || !(cfg->momentum >= 0) || !(cfg->weight_decay >= 0))
        return kd_error(KD_ERR_INVALID, "sgd: lr %g, momentum %g and weight decay %g must be >= 0",
                        cfg->lr, cfg->momentum, cfg->weight_decay);
    if (cfg->nesterov && (cfg->momentum <= 0 || cfg->dampening != 0))
        return kd_error(KD_ERR_INVALID, "sgd: Nesterov needs momentum > 0 and zero dampening");
    kd_sgd *o = calloc(1, sizeof *o);
    if (!o) return kd_error(KD_ERR_NOMEM, "out of memory creating the optimiser");
    o->cfg = *cfg;
    int total = 1;
    for (int l = 0; l < n_lists; l++) total += lists[l]->n;
    o->slots = calloc((size_t)total, sizeof *o->slots);
    if (!o->slots) {
        free(o);
        return kd_error(KD_ERR_NOMEM, "out of memory creating the optimiser");
    }
    for (int l = 0; l < n_lists; l++)
    for (int i = 0; i < lists[l]->n; i++) {
        kd_param *pp = &lists[l]->items[i];
        if (pp->kind == KD_PARAM_BUFFER) continue;
        kd__sgd_slot *s = &o->slots[o->n++];
        s->p = pp->t;
        s->decay = !(cfg->no_decay_norm_bias && pp->kind == KD_PARAM_NO_DECAY);
        snprintf(s->name, sizeof s->name, "%s.momentum_buffer", pp->name);
        if (cfg->momentum > 0) {
            kd_status st = kd_tensor_new(KD_F32, pp->t->ndim, pp->t->shape, &s->buf);
            if (st != KD_OK) {
                kd_sgd_free(o);
                return st;
            }
        }
    }
    *out = o;
    return KD_OK;
}

void kd_sgd_free(kd_sgd *o) {
    if (!o) return;
    for (int i = 0; i < o->n; i++) kd_tensor_free(o->slots[i].buf);
    free(o->slots);
    free(o);
}

void kd_sgd_set_lr(kd_sgd *o, float lr) { o->cfg.lr = lr; }
float kd_sgd_get_lr(const kd_sgd *o) { return o->cfg.lr; }
int64_t kd_sgd_steps(const kd_sgd *o) { return o->steps; }

void kd_sgd_zero_grad(kd_sgd *o) {
    for (int i = 0; i < o->n; i++) {
        kd_tensor *g = o->slots[i].p->grad;
        if (g) memset(g->data, 0, kd_tensor_nbytes(g));
    }
}

kd_status kd_sgd_step(kd_sgd *o) {
    const float lr = o->cfg.lr, mom = o->cfg.momentum, damp = o->cfg.dampening;
    const int first = !o->buf_ready;
    for (int i = 0; i < o->n; i++) {
        kd__sgd_slot *s = &o->slots[i];
        if (!s->p->grad) continue;
        float *p = kd_f32(s->p);
        const float *g = kd_f32(s->p->grad);
        float *b = s->buf ? kd_f32(s->buf) : NULL;
        const float wd = s->decay ? o->cfg.weight_decay : 0.0f;
        const int64_t n = kd_tensor_numel(s->p);
        for (int64_t j = 0; j < n; j++) {
            float d = g[j] + wd * p[j];
            if (b) {
                b[j] = first ? d : mom * b[j] + (1.0f - damp) * d;
                d = o->cfg.nesterov ? d + mom * b[j] : b[j];
            }
            p[j] -= lr * d;
        }
    }
    o->buf_ready = 1;
    o->steps++;
    return KD_OK;
}

int kd_sgd_state_count(const kd_sgd *o) { return o->cfg.momentum > 0 ? o->n : 0; }

kd_status kd_sgd_state_get(const kd_sgd *o, int i, const char **name, kd_tensor **t) {
    if (i < 0 || i >= kd_sgd_state_count(o))
        return kd_error(KD_ERR_INVALID, "optimiser state index %d out of range", i);
    *name = o->slots[i].name;
    *t = o->slots[i].buf;
    return KD_OK;
}

void kd_sgd_state_loaded(kd_sgd *o, int64_t steps) {
    o->steps = steps;
    o->buf_ready = steps > 0;
}
