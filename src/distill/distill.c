/* The method table and the shared RepDistiller loss:
 * gamma * CE + alpha * KL_T + beta * method term. */
#include "kd/distill.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/methods.h"

struct kd_distiller {
    kd_distill_cfg cfg;
    const kd_distill_method *m;
    kd_param_list params;
    void *state;
};

static const kd_distill_method *const kd__methods[] = {
    &kd__method_none,
    &kd__method_kd,
};
#define KD__NMETHODS ((int)(sizeof kd__methods / sizeof kd__methods[0]))

const char *const *kd_distill_names(int *n) {
    static const char *names[KD__NMETHODS];
    for (int i = 0; i < KD__NMETHODS; i++) names[i] = kd__methods[i]->name;
    *n = KD__NMETHODS;
    return names;
}

const kd_distill_method *kd_distill_find(const char *method) {
    for (int i = 0; method && i < KD__NMETHODS; i++)
        if (strcmp(kd__methods[i]->name, method) == 0) return kd__methods[i];
    return NULL;
}

kd_distill_cfg kd_distill_defaults(const char *method) {
    kd_distill_cfg c;
    memset(&c, 0, sizeof c);
    snprintf(c.method, sizeof c.method, "%s", method ? method : "");
    const kd_distill_method *m = kd_distill_find(method);
    if (m) {
        c.gamma = m->gamma;
        c.alpha = m->alpha;
        c.beta = m->beta;
        c.T = m->T;
    }
    return c;
}

kd_status kd_distiller_create(const kd_distill_cfg *cfg, const kd_distill_shapes *shapes,
                              kd_distiller **out) {
    *out = NULL;
    const kd_distill_method *m = kd_distill_find(cfg->method);
    if (!m) {
        char list[256] = "";
        size_t off = 0;
        for (int i = 0; i < KD__NMETHODS && off < sizeof list; i++)
            off += (size_t)snprintf(list + off, sizeof list - off, "%s%s", i ? ", " : "", kd__methods[i]->name);
        return kd_error(KD_ERR_NOT_FOUND, "unknown distillation method '%s' (known: %s)", cfg->method, list);
    }
    if (m->needs_teacher && cfg->alpha != 0 && !(cfg->T > 0))
        return kd_error(KD_ERR_INVALID, "method '%s': temperature %g must be > 0", m->name, cfg->T);
    kd_distiller *d = calloc(1, sizeof *d);
    if (!d) return kd_error(KD_ERR_NOMEM, "out of memory creating distiller '%s'", m->name);
    d->cfg = *cfg;
    d->m = m;
    if (m->init) {
        kd_status s = m->init(d, shapes);
        if (s != KD_OK) {
            kd_distiller_free(d);
            return s;
        }
    }
    *out = d;
    return KD_OK;
}

void kd_distiller_free(kd_distiller *d) {
    if (!d) return;
    if (d->m && d->m->free_state) d->m->free_state(d);
    kd_params_free(&d->params);
    free(d);
}

const kd_distill_cfg *kd_distiller_config(const kd_distiller *d) { return &d->cfg; }
const kd_distill_method *kd_distiller_method(const kd_distiller *d) { return d->m; }
int kd_distiller_needs_teacher(const kd_distiller *d) {
    return d->m->needs_teacher && (d->cfg.alpha != 0 || d->cfg.beta != 0);
}
kd_param_list *kd_distiller_params(kd_distiller *d) { return &d->params; }
void *kd_distiller_state(kd_distiller *d) { return d->state; }
void kd_distiller_set_state(kd_distiller *d, void *state) { d->state = state; }

/* Reads a one-element tensor. */
static float kd__scalar(const kd_tensor *t) { return t ? kd_f32(t)[0] : 0.0f; }

kd_status kd_distiller_loss(kd_distiller *d, kd_graph *g, const kd_model_out *s,
                            const kd_model_out *t, const kd_tensor *labels,
                            const int64_t *indices, kd_tensor **loss, kd_distill_terms *terms) {
    *loss = NULL;
    const kd_distill_cfg *c = &d->cfg;
    kd_tensor *total = NULL, *ce = NULL, *kl = NULL, *mt = NULL;
    if (c->gamma != 0) {
        ce = kd_cross_entropy(g, s->logits, labels, c->label_smoothing);
        total = kd_scale(g, ce, c->gamma);
    }
    if (c->alpha != 0) {
        if (!t || !t->logits)
            return kd_error(KD_ERR_INVALID, "method '%s' with alpha %g needs a teacher", d->m->name, c->alpha);
        kl = kd_kl_div(g, s->logits, t->logits, c->T);
        kd_tensor *w = kd_scale(g, kl, c->alpha);
        total = total ? kd_add(g, total, w) : w;
    }
    if (c->beta != 0 && d->m->loss) {
        KD_TRY(d->m->loss(d, g, s, t, labels, indices, &mt));
        if (mt) {
            kd_tensor *w = kd_scale(g, mt, c->beta);
            total = total ? kd_add(g, total, w) : w;
        }
    }
    KD_TRY(kd_graph_status(g));
    if (!total)
        return kd_error(KD_ERR_INVALID, "method '%s': gamma, alpha and beta are all zero: nothing to train",
                        d->m->name);
    if (terms) {
        terms->ce = kd__scalar(ce);
        terms->kl = kd__scalar(kl);
        terms->method = kd__scalar(mt);
        terms->total = kd__scalar(total);
    }
    *loss = total;
    return KD_OK;
}
