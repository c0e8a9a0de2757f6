/* The trainer's optimiser: parameter groups, SGD (torch.optim.SGD), AdamW
 * (torch.optim.AdamW), LARS (google-research/simclr tf2/lars_optimizer.py,
 * classic momentum) and global gradient-norm clipping
 * (torch.nn.utils.clip_grad_norm_). The element updates follow torch's
 * operation order in float32; hyperparameters and the constants derived from
 * them (1 - beta, 1 - lr * wd, bias corrections) are computed in double and
 * rounded once, as torch does with its Python-float hyperparameters.
 * tests/test_optim.c checks every update step by step against PyTorch 1.13
 * (tools/gen_optim_fixtures.py). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/optim.h"

typedef struct {
    kd_tensor *p;      /* the parameter (owned by its model or method) */
    kd_tensor *buf[2]; /* SGD/LARS: momentum; AdamW: exp_avg, exp_avg_sq */
    char *name[2];     /* state names, "<prefix><param><suffix>" */
    float lr_scale;
    int decay;         /* weight decay (and LARS adaptation) applies */
    int64_t hold;      /* not updated during the first `hold` steps (kd_optim_hold) */
} kd__slot;

struct kd_optim {
    kd_optim_cfg cfg;
    kd__slot *slots;
    int n;
    int nbuf; /* state tensors per slot */
    int buf_ready;
    int64_t steps;
    double last_norm;
    double wd0; /* the configured weight decay */
};

static const char *const kd__optim_names[] = {"sgd", "adamw", "lars"};

kd_status kd_optim_kind_parse(const char *name, kd_optim_kind *out) {
    for (int i = 0; i < 3; i++)
        if (strcmp(name, kd__optim_names[i]) == 0) {
            *out = (kd_optim_kind)i;
            return KD_OK;
        }
    return kd_error(KD_ERR_NOT_FOUND, "unknown optimizer '%s' (known: sgd, adamw, lars)", name);
}

const char *kd_optim_kind_name(kd_optim_kind k) { return (unsigned)k < 3 ? kd__optim_names[k] : "?"; }

kd_optim_cfg kd_optim_defaults(kd_optim_kind kind) {
    kd_optim_cfg c;
    memset(&c, 0, sizeof c);
    c.kind = kind;
    c.lr = kind == KD_OPTIM_ADAMW ? 1e-3 : 0.1;
    c.momentum = kind == KD_OPTIM_ADAMW ? 0.0 : 0.9;
    c.weight_decay = kind == KD_OPTIM_ADAMW ? 1e-2 : 0.0;
    c.beta1 = 0.9;
    c.beta2 = 0.999;
    c.eps = 1e-8;
    c.trust_coef = 1e-3;
    return c;
}

kd_status kd_optim_init(kd_optim **out, const kd_param_group *groups, int n_groups, const kd_optim_cfg *cfg) {
    *out = NULL;
    if (!(cfg->lr >= 0) || !(cfg->momentum >= 0) || !(cfg->weight_decay >= 0) || !(cfg->clip_grad_norm >= 0))
        return kd_error(KD_ERR_INVALID, "optimizer: lr %g, momentum %g, weight_decay %g and clip_grad_norm %g must be >= 0",
                        cfg->lr, cfg->momentum, cfg->weight_decay, cfg->clip_grad_norm);
    if (cfg->kind == KD_OPTIM_SGD && cfg->nesterov && (cfg->momentum <= 0 || cfg->dampening != 0))
        return kd_error(KD_ERR_INVALID, "optimizer sgd: nesterov needs momentum > 0 and zero dampening");
    if (cfg->kind == KD_OPTIM_ADAMW &&
        (!(cfg->beta1 >= 0 && cfg->beta1 < 1) || !(cfg->beta2 >= 0 && cfg->beta2 < 1) || !(cfg->eps > 0)))
        return kd_error(KD_ERR_INVALID, "optimizer adamw: betas (%g, %g) must be in [0, 1) and eps %g > 0", cfg->beta1,
                        cfg->beta2, cfg->eps);
    if (cfg->kind == KD_OPTIM_LARS && !(cfg->trust_coef > 0))
        return kd_error(KD_ERR_INVALID, "optimizer lars: trust coefficient %g must be > 0", cfg->trust_coef);
    kd_optim *o = calloc(1, sizeof *o);
    if (!o) return kd_error(KD_ERR_NOMEM, "out of memory creating the optimiser");
    o->cfg = *cfg;
    o->wd0 = cfg->weight_decay;
    o->nbuf = cfg->kind == KD_OPTIM_ADAMW ? 2 : (cfg->momentum > 0 ? 1 : 0);
    int total = 1;
    for (int gi = 0; gi < n_groups; gi++) total += groups[gi].params->n;
    o->slots = calloc((size_t)total, sizeof *o->slots);
    if (!o->slots) {
        free(o);
        return kd_error(KD_ERR_NOMEM, "out of memory creating the optimiser");
    }
    static const char *const suffix[3][2] = {{".momentum_buffer", ""}, {".exp_avg", ".exp_avg_sq"},
                                             {".momentum_buffer", ""}};
    for (int gi = 0; gi < n_groups; gi++) {
        const kd_param_group *gr = &groups[gi];
        for (int i = 0; i < gr->params->n; i++) {
            kd_param *pp = &gr->params->items[i];
            if (pp->kind == KD_PARAM_BUFFER) continue;
            kd__slot *s = &o->slots[o->n++];
            s->p = pp->t;
            s->lr_scale = gr->lr_scale;
            s->decay = !(cfg->no_decay_norm_bias && pp->kind == KD_PARAM_NO_DECAY);
            for (int b = 0; b < o->nbuf; b++) {
                const char *pre = gr->prefix ? gr->prefix : "";
                size_t len = strlen(pre) + strlen(pp->name) + strlen(suffix[cfg->kind][b]) + 1;
                s->name[b] = malloc(len);
                if (!s->name[b]) {
                    kd_optim_free(o);
                    return kd_error(KD_ERR_NOMEM, "out of memory creating the optimiser");
                }
                snprintf(s->name[b], len, "%s%s%s", pre, pp->name, suffix[cfg->kind][b]);
                kd_status st = kd_tensor_new(KD_F32, pp->t->ndim, pp->t->shape, &s->buf[b]);
                if (st != KD_OK) {
                    kd_optim_free(o);
                    return st;
                }
                memset(s->buf[b]->data, 0, kd_tensor_nbytes(s->buf[b]));
            }
        }
    }
    *out = o;
    return KD_OK;
}

void kd_optim_free(kd_optim *o) {
    if (!o) return;
    for (int i = 0; i < o->n; i++)
        for (int b = 0; b < 2; b++) {
            kd_tensor_free(o->slots[i].buf[b]);
            free(o->slots[i].name[b]);
        }
    free(o->slots);
    free(o);
}

void kd_optim_set_lr(kd_optim *o, double lr) { o->cfg.lr = lr; }
void kd_optim_set_weight_decay(kd_optim *o, double wd) { o->cfg.weight_decay = wd; }
double kd_optim_base_weight_decay(const kd_optim *o) { return o->wd0; }

kd_status kd_optim_hold(kd_optim *o, const kd_tensor *p, int64_t steps) {
    for (int i = 0; i < o->n; i++)
        if (o->slots[i].p == p) {
            o->slots[i].hold = steps > 0 ? steps : 0;
            return KD_OK;
        }
    return kd_error(KD_ERR_NOT_FOUND, "optimiser: the tensor to hold is not optimised");
}
double kd_optim_get_lr(const kd_optim *o) { return o->cfg.lr; }
int64_t kd_optim_steps(const kd_optim *o) { return o->steps; }
double kd_optim_last_grad_norm(const kd_optim *o) { return o->last_norm; }

void kd_optim_zero_grad(kd_optim *o) {
    for (int i = 0; i < o->n; i++) {
        kd_tensor *g = o->slots[i].p->grad;
        if (g) memset(g->data, 0, kd_tensor_nbytes(g));
    }
}

/* Sum of squares in double, fixed order. */
static double kd__sumsq(const float *x, int64_t n) {
    double s = 0;
    for (int64_t j = 0; j < n; j++) s += (double)x[j] * (double)x[j];
    return s;
}

/* torch.optim.SGD (_single_tensor_sgd): d = g + wd * p; buf = d at the first
 * step, else buf = m * buf + (1 - dampening) * d; d = d + m * buf (Nesterov)
 * or buf; p = p - lr * d. */
static void kd__sgd(const kd_optim_cfg *c, kd__slot *s, double lr, int first) {
    float *p = kd_f32(s->p);
    const float *g = kd_f32(s->p->grad);
    float *b = s->buf[0] ? kd_f32(s->buf[0]) : NULL;
    const float wd = s->decay ? (float)c->weight_decay : 0.0f, mom = (float)c->momentum,
                damp1 = (float)(1.0 - c->dampening), lrf = (float)lr;
    const int nesterov = c->nesterov;
    const int64_t n = kd_tensor_numel(s->p);
    for (int64_t j = 0; j < n; j++) {
        float d = g[j] + wd * p[j];
        if (b) {
            b[j] = first ? d : mom * b[j] + damp1 * d;
            d = nesterov ? d + mom * b[j] : b[j];
        }
        p[j] -= lrf * d;
    }
}

/* torch.optim.AdamW (_single_tensor_adamw, step t from 1): p *= 1 - lr * wd;
 * m = beta1 * m + (1 - beta1) * g; v = beta2 * v + (1 - beta2) * g * g;
 * p += -(lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps). */
static void kd__adamw(const kd_optim_cfg *c, kd__slot *s, double lr, int64_t t) {
    float *p = kd_f32(s->p);
    const float *g = kd_f32(s->p->grad);
    float *m = kd_f32(s->buf[0]), *v = kd_f32(s->buf[1]);
    const double wd = s->decay ? c->weight_decay : 0.0;
    const float shrink = (float)(1.0 - lr * wd);
    const float b1 = (float)c->beta1, b2 = (float)c->beta2;
    const float omb1 = (float)(1.0 - c->beta1), omb2 = (float)(1.0 - c->beta2), eps = (float)c->eps;
    const double bc1 = 1.0 - pow(c->beta1, (double)t), bc2 = 1.0 - pow(c->beta2, (double)t);
    const float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2);
    const int64_t n = kd_tensor_numel(s->p);
    for (int64_t j = 0; j < n; j++) {
        p[j] *= shrink;
        m[j] = m[j] * b1 + omb1 * g[j];
        v[j] = v[j] * b2 + omb2 * g[j] * g[j];
        const float denom = sqrtf(v[j]) / bc2_sqrt + eps;
        p[j] -= step_size * m[j] / denom;
    }
}

/* SimCLR's LARSOptimizer._resource_apply_dense (classic momentum): d = g +
 * wd * w; trust = eta * ||w|| / ||d|| when both norms are positive (else 1),
 * for tensors not excluded from adaptation; v = m * v + lr * trust * d;
 * w -= v, or with Nesterov w -= m * v + lr * trust * d. Excluded
 * (KD_PARAM_NO_DECAY under no_decay_norm_bias) tensors get neither the decay
 * nor the trust ratio: plain momentum SGD at lr. */
static void kd__lars(const kd_optim_cfg *c, kd__slot *s, double lr) {
    float *p = kd_f32(s->p);
    const float *g = kd_f32(s->p->grad);
    float *b = s->buf[0] ? kd_f32(s->buf[0]) : NULL;
    const int64_t n = kd_tensor_numel(s->p);
    const float wd = s->decay ? (float)c->weight_decay : 0.0f, mom = (float)c->momentum;
    double trust = 1.0;
    if (s->decay) {
        double wn = 0, gn = 0;
        for (int64_t j = 0; j < n; j++) {
            const double d = (double)(g[j] + wd * p[j]);
            wn += (double)p[j] * p[j];
            gn += d * d;
        }
        wn = sqrt(wn);
        gn = sqrt(gn);
        if (wn > 0 && gn > 0) trust = c->trust_coef * wn / gn;
    }
    const float slr = (float)(lr * trust);
    const int nesterov = c->nesterov;
    for (int64_t j = 0; j < n; j++) {
        const float u = slr * (g[j] + wd * p[j]);
        if (b) {
            b[j] = mom * b[j] + u;
            p[j] -= nesterov ? mom * b[j] + u : b[j];
        } else {
            p[j] -= u;
        }
    }
}

kd_status kd_optim_step(kd_optim *o) {
    const kd_optim_cfg *c = &o->cfg;
    o->last_norm = 0;
    if (c->clip_grad_norm > 0) {
        double ss = 0;
        for (int i = 0; i < o->n; i++)
            if (o->slots[i].p->grad) ss += kd__sumsq(kd_f32(o->slots[i].p->grad), kd_tensor_numel(o->slots[i].p));
        double norm = sqrt(ss);
        o->last_norm = norm;
        if (!isfinite(norm)) return kd_error(KD_ERR_NUMERIC, "gradient norm is %g: not finite", norm);
        /* torch: clip_coef = max_norm / (total_norm + 1e-6) on float32
         * tensors, clamped to 1 (multiplying by 1 changes nothing). */
        const float cf = (float)c->clip_grad_norm / ((float)norm + 1e-6f);
        if (cf < 1.0f) {
            for (int i = 0; i < o->n; i++) {
                kd_tensor *gt = o->slots[i].p->grad;
                if (!gt) continue;
                float *gd = kd_f32(gt);
                int64_t n = kd_tensor_numel(gt);
                for (int64_t j = 0; j < n; j++) gd[j] *= cf;
            }
        }
    }
    const int first = !o->buf_ready;
    for (int i = 0; i < o->n; i++) {
        kd__slot *s = &o->slots[i];
        if (!s->p->grad || o->steps < s->hold) continue;
        const double lr = c->lr * (double)s->lr_scale;
        switch (c->kind) {
        case KD_OPTIM_SGD: kd__sgd(c, s, lr, s->hold ? o->steps == s->hold : first); break;
        case KD_OPTIM_ADAMW: kd__adamw(c, s, lr, o->steps - s->hold + 1); break;
        case KD_OPTIM_LARS: kd__lars(c, s, lr); break;
        }
    }
    o->buf_ready = 1;
    o->steps++;
    return KD_OK;
}

int kd_optim_state_count(const kd_optim *o) { return o->n * o->nbuf; }

kd_status kd_optim_state_get(const kd_optim *o, int i, const char **name, kd_tensor **t) {
    if (i < 0 || i >= kd_optim_state_count(o))
        return kd_error(KD_ERR_INVALID, "optimiser state index %d out of range", i);
    const kd__slot *s = &o->slots[i / o->nbuf];
    *name = s->name[i % o->nbuf];
    *t = s->buf[i % o->nbuf];
    return KD_OK;
}

void kd_optim_state_loaded(kd_optim *o, int64_t steps) {
    o->steps = steps;
    o->buf_ready = steps > 0;
}
