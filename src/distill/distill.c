/* The method registry, method settings ("<method>.<setting>" values parsed
 * against each method's table), method instances, and the default
 * RepDistiller step: gamma * CE + alpha * KL_T + beta * method term. */
#include "kd/distill.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/methods.h"

struct kd_method {
    kd_distill_cfg cfg;
    const kd_method_def *def;
    kd_param_list params;
    void *args;  /* def->args_size bytes */
    void *state; /* def->state_size bytes */
    int training;
};

static const kd_method_def *const kd__methods[] = {
    &kd__method_none,
    &kd__method_kd,
    &kd__method_fitnet,
    &kd__method_at,
    &kd__method_sp,
    &kd__method_cc,
    &kd__method_vid,
    &kd__method_rkd,
    &kd__method_pkt,
    &kd__method_nst,
    &kd__method_pad,
    &kd__method_dkd,
    &kd__method_dist,
    &kd__method_lskd,
    &kd__method_crd,
    &kd__method_sskd,
    &kd__method_simclr,
    &kd__method_moco,
    &kd__method_seed,
    &kd__method_simclrv2,
    &kd__method_dogo,
    &kd__method_ssld,
    &kd__method_dino,
    &kd__method_esvit,
};
#define KD__NMETHODS ((int)(sizeof kd__methods / sizeof kd__methods[0]))

const kd_method_def *const *kd_method_defs(int *n) {
    *n = KD__NMETHODS;
    return kd__methods;
}

const char *const *kd_distill_names(int *n) {
    static const char *names[KD__NMETHODS];
    for (int i = 0; i < KD__NMETHODS; i++) names[i] = kd__methods[i]->name;
    *n = KD__NMETHODS;
    return names;
}

const kd_method_def *kd_method_find(const char *name) {
    for (int i = 0; name && i < KD__NMETHODS; i++)
        if (strcmp(kd__methods[i]->name, name) == 0) return kd__methods[i];
    return NULL;
}

void kd_method_names_str(char *buf, size_t n) {
    size_t off = 0;
    if (n) buf[0] = '\0';
    for (int i = 0; i < KD__NMETHODS && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, "%s%s", i ? ", " : "", kd__methods[i]->name);
}

static kd_status kd__unknown_method(const char *name) {
    char list[1024];
    kd_method_names_str(list, sizeof list);
    return kd_error(KD_ERR_NOT_FOUND, "unknown distillation method '%s' (known: %s)", name, list);
}

kd_distill_cfg kd_distill_defaults(const char *method) {
    kd_distill_cfg c;
    memset(&c, 0, sizeof c);
    snprintf(c.method, sizeof c.method, "%s", method ? method : "");
    const kd_method_def *m = kd_method_find(method);
    if (m) {
        c.gamma = m->gamma;
        c.alpha = m->alpha;
        c.beta = m->beta;
        c.T = m->T;
    }
    return c;
}

int kd_distill_needs_teacher(const kd_distill_cfg *cfg) {
    return kd_method_def_needs_teacher(kd_method_find(cfg->method), cfg);
}

int kd_method_def_needs_teacher(const kd_method_def *m, const kd_distill_cfg *cfg) {
    if (!m || m->teacher == KD_TEACHER_NONE) return 0;
    /* A method with its own step or loss decides its forwards; the default step
     * needs the teacher for the KL term or the method term. */
    if (m->step || m->loss) return 1;
    return cfg->alpha != 0 || (cfg->beta != 0 && m->term);
}

const char *kd__shape_text(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t off = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < ndim && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (off < n) snprintf(buf + off, n - off, ")");
    return buf;
}

kd_status kd__need_contiguous(const char *what, kd_tensor *const *in, int n_in) {
    for (int i = 0; i < n_in; i++)
        if (!kd_tensor_is_contiguous(in[i])) return kd_error(KD_ERR_INVALID, "%s: input %d is not contiguous", what, i);
    return KD_OK;
}

kd_status kd__feat_indices(const kd_method_shapes *shp, int k, const char *setting, int *ks, int *kt) {
    const kd_net_shapes *ns[2] = {&shp->student, &shp->teacher};
    int *out[2] = {ks, kt};
    for (int i = 0; i < 2; i++) {
        int r = k < 0 ? k + ns[i]->n_feat : k;
        if (r < 0 || r >= ns[i]->n_feat)
            return kd_error(KD_ERR_INVALID, "%s %d is out of range: the %s exposes %d features", setting, k,
                            i ? "teacher" : "student", ns[i]->n_feat);
        if (out[i]) *out[i] = r;
    }
    return KD_OK;
}

kd_status kd__feat_pair(kd_step_ctx *ctx, int k, const char *setting, kd_tensor **fs, kd_tensor **ft) {
    *fs = kd_method_feat(ctx->g, &ctx->s, k, 0);
    *ft = kd_method_feat(ctx->g, &ctx->t, k, 0);
    KD_TRY(kd_graph_status(ctx->g));
    if (!*fs || !*ft) return kd_error(KD_ERR_INVALID, "%s %d selects no feature", setting, k);
    if ((*fs)->shape[0] != (*ft)->shape[0]) {
        char bs[96], bt[96];
        return kd_error(KD_ERR_SHAPE, "%s %d: the student's feature %s and the teacher's %s differ in batch size",
                        setting, k, kd_shape_str(*fs, bs, sizeof bs), kd_shape_str(*ft, bt, sizeof bt));
    }
    return KD_OK;
}

/* ---------------------------------------------------------- settings */

/* Finds the table row of key "<method>.<setting>" for method m. */
static kd_status kd__arg_lookup(const kd_method_def *m, const char *key, const kd_method_arg **out) {
    *out = NULL;
    const char *dot = strchr(key, '.');
    if (!dot) return kd_error(KD_ERR_NOT_FOUND, "unknown setting '%s'", key);
    size_t ml = (size_t)(dot - key);
    if (strlen(m->name) != ml || strncmp(m->name, key, ml) != 0) {
        char other[64];
        snprintf(other, sizeof other, "%.*s", (int)(ml < 63 ? ml : 63), key);
        if (kd_method_find(other))
            return kd_error(KD_ERR_INVALID, "setting '%s' belongs to method %s, but the method is %s", key, other,
                            m->name);
        return kd_error(KD_ERR_NOT_FOUND, "unknown setting '%s' (no method '%s')", key, other);
    }
    for (int i = 0; i < m->n_args; i++)
        if (strcmp(m->args[i].name, dot + 1) == 0) {
            *out = &m->args[i];
            return KD_OK;
        }
    char list[1024] = "";
    size_t off = 0;
    for (int i = 0; i < m->n_args && off < sizeof list; i++)
        off += (size_t)snprintf(list + off, sizeof list - off, "%s%s.%s", i ? ", " : "", m->name, m->args[i].name);
    return kd_error(KD_ERR_NOT_FOUND, "unknown setting '%s' for method %s (%s%s)", key, m->name,
                    m->n_args ? "known: " : "it has no settings", list);
}

/* Parses value into dst (or only checks it when dst is NULL). */
static kd_status kd__arg_parse(const kd_method_def *m, const kd_method_arg *a, const char *value, void *dst) {
    char *end;
    errno = 0;
    switch (a->type) {
    case KD_ARG_FLOAT:
    case KD_ARG_DOUBLE: {
        double x = strtod(value, &end);
        while (*end && isspace((unsigned char)*end)) end++;
        if (!*value || errno || *end || !isfinite(x))
            return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s.%s: expected a finite number", value, m->name,
                            a->name);
        if (dst && a->type == KD_ARG_FLOAT) *(float *)dst = (float)x;
        if (dst && a->type == KD_ARG_DOUBLE) *(double *)dst = x;
        return KD_OK;
    }
    case KD_ARG_INT: {
        long long x = strtoll(value, &end, 10);
        while (*end && isspace((unsigned char)*end)) end++;
        if (!*value || errno || *end || x < -1000000000LL || x > 1000000000LL)
            return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s.%s: expected an integer", value, m->name,
                            a->name);
        if (dst) *(int *)dst = (int)x;
        return KD_OK;
    }
    case KD_ARG_BOOL: {
        int v;
        if (!strcmp(value, "1") || !strcmp(value, "true") || !strcmp(value, "yes")) v = 1;
        else if (!strcmp(value, "0") || !strcmp(value, "false") || !strcmp(value, "no")) v = 0;
        else
            return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s.%s: expected 0 or 1", value, m->name,
                            a->name);
        if (dst) *(int *)dst = v;
        return KD_OK;
    }
    case KD_ARG_CHOICE: {
        const char *c = a->choices;
        size_t vl = strlen(value);
        for (int idx = 0; c && *c; idx++) {
            size_t cl = strcspn(c, "|");
            if (cl == vl && strncmp(c, value, vl) == 0) {
                if (dst) *(int *)dst = idx;
                return KD_OK;
            }
            c += cl + (c[cl] == '|');
        }
        return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s.%s: expected one of %s", value, m->name, a->name,
                        a->choices ? a->choices : "");
    }
    case KD_ARG_STRING: {
        size_t vl = strlen(value);
        if (vl >= KD_METHOD_ARG_STR)
            return kd_error(KD_ERR_INVALID, "value of %s.%s is too long (%zu characters; at most %d)", m->name,
                            a->name, vl, KD_METHOD_ARG_STR - 1);
        if (dst) memcpy(dst, value, vl + 1);
        return KD_OK;
    }
    }
    return kd_error(KD_ERR_INTERNAL, "%s.%s has no parser", m->name, a->name);
}

/* Calls fn(key, value) for each "key=value" line of args. */
typedef kd_status (*kd__line_fn)(void *user, const char *key, const char *value);
static kd_status kd__each_line(const char *args, kd__line_fn fn, void *user) {
    const char *p = args;
    while (*p) {
        size_t len = strcspn(p, "\n");
        if (len) {
            char line[KD_METHOD_ARGS_CHARS];
            memcpy(line, p, len);
            line[len] = '\0';
            char *eq = strchr(line, '=');
            if (!eq) return kd_error(KD_ERR_INVALID, "method setting '%s' has no value (expected key=value)", line);
            *eq = '\0';
            KD_TRY(fn(user, line, eq + 1));
        }
        p += len + (p[len] == '\n');
    }
    return KD_OK;
}

kd_status kd_distill_cfg_set_arg(kd_distill_cfg *cfg, const char *key, const char *value) {
    if (!strchr(key, '.') || strchr(key, '=') || strchr(key, '\n') || strchr(value, '\n'))
        return kd_error(KD_ERR_INVALID, "invalid method setting '%s' (expected <method>.<setting>)", key);
    /* Drop an earlier value of the same key, then append. */
    char out[KD_METHOD_ARGS_CHARS];
    size_t off = 0, kl = strlen(key);
    const char *p = cfg->args;
    while (*p) {
        size_t len = strcspn(p, "\n");
        if (len && !(len > kl && strncmp(p, key, kl) == 0 && p[kl] == '=')) {
            memcpy(out + off, p, len);
            off += len;
            out[off++] = '\n';
        }
        p += len + (p[len] == '\n');
    }
    int w = snprintf(out + off, sizeof out - off, "%s=%s\n", key, value);
    if (w < 0 || (size_t)w >= sizeof out - off)
        return kd_error(KD_ERR_INVALID, "too many method settings (at most %d characters in all)",
                        KD_METHOD_ARGS_CHARS - 1);
    memcpy(cfg->args, out, off + (size_t)w + 1);
    return KD_OK;
}

typedef struct {
    const kd_method_def *m;
    void *args;
} kd__apply;

static kd_status kd__apply_line(void *user, const char *key, const char *value) {
    kd__apply *a = user;
    const kd_method_arg *row;
    KD_TRY(kd__arg_lookup(a->m, key, &row));
    return kd__arg_parse(a->m, row, value, a->args ? (char *)a->args + row->offset : NULL);
}

/* Defaults from the table, then the overrides of cfg->args. */
static kd_status kd__fill_args(const kd_method_def *m, const kd_distill_cfg *cfg, void *args) {
    for (int i = 0; i < m->n_args; i++)
        KD_TRY(kd__arg_parse(m, &m->args[i], m->args[i].def, args ? (char *)args + m->args[i].offset : NULL));
    kd__apply a = {m, args};
    return kd__each_line(cfg->args, kd__apply_line, &a);
}

kd_status kd_distill_cfg_check(const kd_distill_cfg *cfg) {
    const kd_method_def *m = kd_method_find(cfg->method);
    if (!m) return kd__unknown_method(cfg->method);
    return kd__fill_args(m, cfg, NULL);
}

kd_status kd_distill_cfg_visit(const kd_distill_cfg *cfg, kd_arg_visit_fn fn, void *user) {
    const kd_method_def *m = kd_method_find(cfg->method);
    if (!m) return kd__unknown_method(cfg->method);
    KD_TRY(kd_distill_cfg_check(cfg));
    for (int i = 0; i < m->n_args; i++) {
        char key[128];
        snprintf(key, sizeof key, "%s.%s", m->name, m->args[i].name);
        /* The override's text, if any, else the default. */
        const char *v = m->args[i].def;
        size_t kl = strlen(key);
        char val[256];
        for (const char *p = cfg->args; *p;) {
            size_t len = strcspn(p, "\n");
            if (len > kl && strncmp(p, key, kl) == 0 && p[kl] == '=') {
                size_t vl = len - kl - 1 < sizeof val - 1 ? len - kl - 1 : sizeof val - 1;
                memcpy(val, p + kl + 1, vl);
                val[vl] = '\0';
                v = val;
            }
            p += len + (p[len] == '\n');
        }
        fn(user, key, v, m->args[i].help);
    }
    return KD_OK;
}

/* ---------------------------------------------------------- instances */

void kd__method_rng(const kd_method *m, const char *what, kd_rng *r) {
    uint64_t h = 1469598103934665603ull;
    for (const char *p = m->def->name; *p; p++) h = (h ^ (uint8_t)*p) * 1099511628211ull;
    h = (h ^ '.') * 1099511628211ull;
    for (const char *p = what; *p; p++) h = (h ^ (uint8_t)*p) * 1099511628211ull;
    kd_rng_init(r, m->cfg.seed, kd_rng_key(0x6d6574686f64ull, h));
}

kd_status kd_method_create(const kd_distill_cfg *cfg, const kd_method_shapes *shp, kd_method **out) {
    *out = NULL;
    const kd_method_def *def = kd_method_find(cfg->method);
    if (!def) return kd__unknown_method(cfg->method);
    return kd_method_create_def(def, cfg, shp, out);
}

kd_status kd_method_create_def(const kd_method_def *def, const kd_distill_cfg *cfg, const kd_method_shapes *shp,
                               kd_method **out) {
    *out = NULL;
    if (kd_method_def_needs_teacher(def, cfg) && cfg->alpha != 0 && !(cfg->T > 0))
        return kd_error(KD_ERR_INVALID, "method '%s': temperature T %g must be > 0", def->name, cfg->T);
    kd_method *m = calloc(1, sizeof *m);
    if (!m) return kd_error(KD_ERR_NOMEM, "out of memory creating method '%s'", def->name);
    m->cfg = *cfg;
    m->def = def;
    m->training = 1;
    kd_status s = KD_OK;
    if (def->args_size && !(m->args = calloc(1, def->args_size))) s = kd_error(KD_ERR_NOMEM, "out of memory");
    if (s == KD_OK && def->state_size && !(m->state = calloc(1, def->state_size)))
        s = kd_error(KD_ERR_NOMEM, "out of memory");
    if (s == KD_OK) s = kd__fill_args(def, cfg, m->args);
    if (s == KD_OK && kd_method_def_needs_teacher(def, cfg) && shp->teacher.n_feat == 0)
        s = kd_error(KD_ERR_INVALID, "method '%s' needs a teacher (set teacher_ckpt)", def->name);
    if (s == KD_OK && def->setup) s = def->setup(m, shp);
    if (s != KD_OK) {
        kd_method_free(m);
        return s;
    }
    *out = m;
    return KD_OK;
}

void kd_method_free(kd_method *m) {
    if (!m) return;
    if (m->def && m->def->free) m->def->free(m);
    kd_params_free(&m->params);
    free(m->args);
    free(m->state);
    free(m);
}

const kd_method_def *kd_method_get_def(const kd_method *m) { return m->def; }
const kd_distill_cfg *kd_method_cfg(const kd_method *m) { return &m->cfg; }
int kd_method_needs_teacher(const kd_method *m) { return kd_method_def_needs_teacher(m->def, &m->cfg); }
kd_param_list *kd_method_params(kd_method *m) { return &m->params; }
void *kd_method_args(kd_method *m) { return m->args; }
const void *kd_method_args_c(const kd_method *m) { return m->args; }
void *kd_method_state(kd_method *m) { return m->state; }
void kd_method_set_training(kd_method *m, int training) { m->training = training; }
int kd_method_training(const kd_method *m) { return m->training; }

/* ---------------------------------------------------------- loss terms */

kd_status kd_loss_terms_add(kd_loss_terms *lt, const char *name, kd_tensor *t) {
    if (!t) return kd_error(KD_ERR_INVALID, "loss term '%s' is missing", name);
    if (lt->n == lt->cap) {
        int ncap = lt->cap ? 2 * lt->cap : 8;
        const char **nn = realloc(lt->name, (size_t)ncap * sizeof *nn);
        if (!nn) return kd_error(KD_ERR_NOMEM, "out of memory");
        lt->name = nn;
        kd_tensor **nt = realloc(lt->t, (size_t)ncap * sizeof *nt);
        if (!nt) return kd_error(KD_ERR_NOMEM, "out of memory");
        lt->t = nt;
        lt->cap = ncap;
    }
    lt->name[lt->n] = name;
    lt->t[lt->n++] = t;
    return KD_OK;
}

void kd_loss_terms_clear(kd_loss_terms *lt) { lt->n = 0; }

void kd_loss_terms_free(kd_loss_terms *lt) {
    free(lt->name);
    free(lt->t);
    memset(lt, 0, sizeof *lt);
}

/* ---------------------------------------------------------- the step */

kd_tensor *kd_method_feat(kd_graph *g, const kd_model_out *o, int k, int preact) {
    if (k < 0) k += o->n_feat;
    if (k < 0 || k >= o->n_feat) return NULL;
    kd_tensor *f = preact && o->preact[k] ? o->preact[k] : o->feat[k];
    return kd_graph_to_strided(g, f);
}

kd_status kd_method_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    if (m->def->loss) return m->def->loss(m, ctx, terms);
    const kd_distill_cfg *c = &m->cfg;
    kd_graph *g = ctx->g;
    const kd_step_batch *b = ctx->batch;
    if (c->gamma != 0) {
        if (!b->y) return kd_error(KD_ERR_INVALID, "method '%s' with gamma %g needs labels", m->def->name, c->gamma);
        KD_TRY(kd_loss_terms_add(terms, "ce", kd_scale(g, kd_cross_entropy(g, ctx->s.logits, b->y, c->label_smoothing),
                                                       c->gamma)));
    }
    if (c->alpha != 0) {
        if (!ctx->t.logits)
            return kd_error(KD_ERR_INVALID, "method '%s' with alpha %g needs a teacher", m->def->name, c->alpha);
        KD_TRY(kd_loss_terms_add(terms, "kl", kd_scale(g, kd_kl_div(g, ctx->s.logits, ctx->t.logits, c->T), c->alpha)));
    }
    if (c->beta != 0 && m->def->term) {
        kd_tensor *t = NULL;
        KD_TRY(m->def->term(m, ctx, &t));
        KD_TRY(kd_graph_status(g));
        if (t) KD_TRY(kd_loss_terms_add(terms, m->def->name, kd_scale(g, t, c->beta)));
    }
    return kd_graph_status(g);
}

kd_status kd_method_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    if (m->def->step) return m->def->step(m, ctx, terms);
    kd_graph *g = ctx->g;
    kd_tensor *x = ctx->batch->x[0];
    memset(&ctx->s, 0, sizeof ctx->s);
    memset(&ctx->t, 0, sizeof ctx->t);
    if (ctx->teacher && kd_method_needs_teacher(m)) {
        int prev = kd_graph_set_grad_enabled(g, 0);
        kd_status s = kd_model_forward(ctx->teacher, g, x, m->def->feat_flags, &ctx->t);
        kd_graph_set_grad_enabled(g, prev);
        KD_TRY(s);
    }
    KD_TRY(kd_model_forward(ctx->student, g, x, m->def->feat_flags, &ctx->s));
    return kd_method_loss(m, ctx, terms);
}

kd_status kd_method_after_step(kd_method *m, kd_step_ctx *ctx) {
    return m->def->after_step ? m->def->after_step(m, ctx) : KD_OK;
}

kd_status kd_method_before_update(kd_method *m, kd_step_ctx *ctx, kd_optim *opt) {
    return m->def->before_update ? m->def->before_update(m, ctx, opt) : KD_OK;
}

int kd_method_num_views(const kd_method *m) {
    int v = m->def->num_views ? m->def->num_views(m) : m->def->views;
    return v > 1 ? v : 1;
}

kd_status kd_method_epoch_begin(kd_method *m, int epoch) {
    return m->def->epoch_begin ? m->def->epoch_begin(m, epoch) : KD_OK;
}

kd_status kd_method_prepare(kd_method *m, const kd_prepare_ctx *ctx) {
    return m->def->prepare ? m->def->prepare(m, ctx) : KD_OK;
}
