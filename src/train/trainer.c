/* kd_train_step: the one training step. The trainer knows nothing
 * method-specific: it wraps the batch (every view the method declared, each
 * at its own size), lets the method run its forwards and return named
 * weighted terms, sums them, checks that each is finite, back-propagates,
 * applies the optimiser at the scheduled learning rate and calls the
 * method's after-step hook. At init a probe forward of both nets at view 0's
 * size gives the method its feature shapes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "kd/train.h"
#include "train/dp_impl.h"
#include "train/train_impl.h"

struct kd_trainer {
    kd_trainer_cfg c;
    kd_graph *g;
    kd_method *method;
    kd_model *ema;        /* the EMA copy of the student, when the method asks for one */
    kd_optim *opt;
    kd_loss_terms terms;
    double *values;       /* (terms.cap) */
    int values_cap;
    int cur_epoch;        /* last epoch whose epoch_begin hook ran */
    int n_views;          /* views of each image the method takes (>= 1) */
    kd_tensor **views;    /* (n_views) this step's views as graph tensors */
    kd__dp *dp;           /* data parallelism: the gradient all-reduce (data_parallel.c) */
};

/* Shapes of m's outputs on a no-grad eval-mode forward of 2 zero images. */
static kd_status kd__probe(kd_graph *g, kd_model *m, int C, int H, int W, kd_net_shapes *out) {
    memset(out, 0, sizeof *out);
    if (!m) return KD_OK;
    int was = kd_model_training(m);
    kd_model_set_training(m, 0);
    int prev = kd_graph_set_grad_enabled(g, 0);
    kd_graph_reset(g);
    int64_t xs[4] = {2, C, H, W};
    kd_tensor *x = kd_graph_zeros(g, KD_F32, 4, xs);
    kd_model_out o;
    kd_status s = x ? kd_model_forward(m, g, x, 0, &o) : kd_graph_status(g);
    if (s == KD_OK) {
        out->n_feat = o.n_feat;
        out->num_classes = o.logits->shape[1];
        for (int k = 0; k < o.n_feat; k++) {
            out->feat_ndim[k] = o.feat[k]->ndim;
            for (int d = 0; d < o.feat[k]->ndim && d < 4; d++) out->feat[k][d] = o.feat[k]->shape[d];
        }
    }
    kd_graph_set_grad_enabled(g, prev);
    kd_model_set_training(m, was);
    kd_graph_reset(g);
    return s;
}

kd_status kd_trainer_init(kd_trainer **out, const kd_trainer_cfg *cfg) {
    *out = NULL;
    kd_trainer *t = calloc(1, sizeof *t);
    if (!t) return kd_error(KD_ERR_NOMEM, "out of memory creating the trainer");
    t->c = *cfg;
    t->cur_epoch = -1;
    kd_status s = kd_graph_init(&t->g, cfg->be);
    if (s == KD_OK) s = kd_graph_set_precision(t->g, cfg->precision);
    kd_method_shapes shp;
    memset(&shp, 0, sizeof shp);
    shp.n_train = cfg->n_train;
    shp.num_classes = cfg->num_classes;
    shp.train_labels = cfg->train_labels;
    shp.in_channels = cfg->in_channels;
    shp.in_h = cfg->height;
    shp.in_w = cfg->width;
    shp.student_arch = kd_model_arch(cfg->student);
    const kd_method_def *def = cfg->method_def ? cfg->method_def : kd_method_find(cfg->method.method);
    if (s == KD_OK && !def)
        s = kd_error(KD_ERR_NOT_FOUND, "unknown distillation method '%s'", cfg->method.method);
    int use_teacher = kd_method_def_needs_teacher(def, &cfg->method);
    if (s == KD_OK && def->views < 0)
        s = kd_error(KD_ERR_INVALID, "method '%s' declares %d views of each image", def->name, def->views);
    if (s == KD_OK) {
        t->n_views = def->views > 1 ? def->views : 1;
        if (!(t->views = calloc((size_t)t->n_views, sizeof *t->views)))
            s = kd_error(KD_ERR_NOMEM, "out of memory creating the trainer");
    }
    if (s == KD_OK && use_teacher && !cfg->teacher)
        s = kd_error(KD_ERR_INVALID, "method '%s' needs a teacher (set teacher_ckpt)", cfg->method.method);
    if (s == KD_OK) s = kd__probe(t->g, cfg->student, cfg->in_channels, cfg->height, cfg->width, &shp.student);
    if (s == KD_OK && use_teacher)
        s = kd__probe(t->g, cfg->teacher, cfg->in_channels, cfg->height, cfg->width, &shp.teacher);
    if (s == KD_OK && def->ema_student) {
        s = kd_model_create(kd_model_arch(cfg->student), kd_model_config(cfg->student), &t->ema);
        if (s == KD_OK) s = kd_params_copy(kd_model_params(t->ema), kd_model_params(cfg->student));
        if (s == KD_OK) kd_model_set_training(t->ema, 0);
    }
    if (s == KD_OK) s = kd_method_create_def(def, &cfg->method, &shp, &t->method);
    if (s == KD_OK && kd_method_num_views(t->method) != t->n_views) { /* a setting decides them (DINO's crops) */
        t->n_views = kd_method_num_views(t->method);
        kd_tensor **v = realloc(t->views, (size_t)t->n_views * sizeof *v);
        if (v) t->views = v;
        else s = kd_error(KD_ERR_NOMEM, "out of memory creating the trainer");
    }
    if (s == KD_OK) {
        kd_param_group groups[2] = {{"", kd_model_params(cfg->student), 1.0f},
                                    {"distill.", kd_method_params(t->method), 1.0f}};
        s = kd_optim_init(&t->opt, groups, 2, &cfg->optim);
    }
    if (s == KD_OK && cfg->data_parallel) {
        kd_param_list *lists[2] = {kd_model_params(cfg->student), kd_method_params(t->method)};
        s = kd__dp_create(&t->dp, lists, 2, cfg->sync_bn);
    }
    if (s != KD_OK) {
        kd_trainer_free(t);
        return s;
    }
    kd_method_set_training(t->method, kd_model_training(cfg->student));
    *out = t;
    return KD_OK;
}

void kd_trainer_free(kd_trainer *t) {
    if (!t) return;
    kd__dp_free(t->dp);
    kd_optim_free(t->opt);
    kd_method_free(t->method);
    kd_model_free(t->ema);
    kd_graph_free(t->g);
    kd_loss_terms_free(&t->terms);
    free(t->values);
    free(t->views);
    free(t);
}

kd_graph *kd_trainer_graph(kd_trainer *t) { return t->g; }
const kd__dp *kd__trainer_dp(const kd_trainer *t) { return t->dp; }
kd_model *kd_trainer_ema(kd_trainer *t) { return t->ema; }
kd_method *kd_trainer_method(kd_trainer *t) { return t->method; }
kd_optim *kd_trainer_optim(kd_trainer *t) { return t->opt; }
int kd_trainer_num_views(const kd_trainer *t) { return t->n_views; }

kd_status kd_trainer_view_transforms(const kd_trainer *t, const kd_transform_cfg *base, kd_transform_cfg *out) {
    const kd_method_def *def = kd_method_get_def(t->method);
    for (int v = 0; v < t->n_views; v++) {
        out[v] = *base;
        kd_status s = def->view_transform ? def->view_transform(t->method, v, &out[v]) : KD_OK;
        if (s != KD_OK) return kd_error(s, "method '%s', view %d: %s", def->name, v, kd_last_error());
    }
    return KD_OK;
}

/* Wraps the views of b as graph tensors into t->views. A batch made by hand
 * (n_views 0) is one view, x, at the trainer's (C, H, W). */
static kd_status kd__wrap_views(kd_trainer *t, const kd_batch *b) {
    const kd_trainer_cfg *c = &t->c;
    const char *name = kd_method_get_def(t->method)->name;
    int nv = b->n_views > 0 ? b->n_views : 1;
    if (nv != t->n_views)
        return kd_error(KD_ERR_INVALID, "method '%s' takes %d view%s of each image; the batch has %d", name,
                        t->n_views, t->n_views == 1 ? "" : "s", nv);
    if (b->n_views > 0 && (!b->views || !b->view_shape))
        return kd_error(KD_ERR_INVALID, "batch with %d views lacks its views or their shapes", b->n_views);
    for (int v = 0; v < nv; v++) {
        kd_view_shape vs = b->n_views > 0 ? b->view_shape[v] : (kd_view_shape){c->in_channels, c->height, c->width};
        if (v == 0 && (vs.c != c->in_channels || vs.h != c->height || vs.w != c->width))
            return kd_error(KD_ERR_SHAPE,
                            "batch view 0 is (%d, %d, %d) but the trainer was set up (probed) for (%d, %d, %d)",
                            vs.c, vs.h, vs.w, c->in_channels, c->height, c->width);
        int64_t xs[4] = {b->n, vs.c, vs.h, vs.w};
        t->views[v] = kd_graph_wrap(t->g, KD_F32, 4, xs, b->n_views > 0 ? b->views[v] : b->x);
    }
    return kd_graph_status(t->g);
}

void kd_trainer_set_training(kd_trainer *t, int training) {
    kd_model_set_training(t->c.student, training);
    kd_method_set_training(t->method, training);
}

kd_status kd_train_step(kd_trainer *t, const kd_batch *b, int epoch, int64_t step, int64_t steps_per_epoch,
                        kd_step_result *res) {
    const kd_trainer_cfg *c = &t->c;
    kd_graph *g = t->g;
    memset(res, 0, sizeof *res);
    if (epoch != t->cur_epoch) {
        KD_TRY(kd_method_epoch_begin(t->method, epoch));
        t->cur_epoch = epoch;
    }
    const float lr = kd_sched_lr(&c->sched, epoch, step, steps_per_epoch);
    kd_graph_reset(g);
    kd_graph_set_rng(g, c->seed, kd_rng_key((uint64_t)epoch, (uint64_t)step));
    if (t->dp) KD_TRY(kd__dp_step_begin(t->dp, g, kd__dp_scale(b)));
    KD_TRY(kd__wrap_views(t, b));
    const kd_method_def *def = kd_method_get_def(t->method);
    kd_tensor *y = def->labels == KD_LABELS_ABSENT || !b->y ? NULL : kd_graph_wrap(g, KD_I32, 1, &b->n, b->y);
    kd_step_batch sb = {.n = b->n, .n_views = t->n_views, .x = t->views, .y = y, .index = b->index};
    kd_step_ctx ctx = {.g = g,
                       .student = c->student,
                       .teacher = kd_method_needs_teacher(t->method) ? c->teacher : NULL,
                       .ema = t->ema,
                       .batch = &sb,
                       .epoch = epoch,
                       .epochs = c->sched.epochs,
                       .step = step,
                       .steps_per_epoch = steps_per_epoch,
                       .global_step = kd_optim_steps(t->opt)};
    kd_loss_terms_clear(&t->terms);
    KD_TRY(kd_method_step(t->method, &ctx, &t->terms));
    KD_TRY(kd_graph_status(g));
    if (t->terms.n == 0)
        return kd_error(KD_ERR_INVALID, "method '%s': gamma, alpha and beta are all zero: nothing to train",
                        def->name);
    if (t->values_cap < t->terms.cap) {
        double *v = realloc(t->values, (size_t)t->terms.cap * sizeof *v);
        if (!v) return kd_error(KD_ERR_NOMEM, "out of memory");
        t->values = v;
        t->values_cap = t->terms.cap;
    }
    kd_tensor *total = NULL;
    double sum = 0;
    for (int i = 0; i < t->terms.n; i++) {
        kd_tensor *term = t->terms.t[i];
        if (kd_tensor_numel(term) != 1)
            return kd_error(KD_ERR_INTERNAL, "loss term '%s' of method '%s' is not a scalar", t->terms.name[i],
                            def->name);
        double v = kd_f32(term)[0];
        if (!isfinite(v))
            return kd_error(KD_ERR_NUMERIC, "loss term '%s' became %s at epoch %d step %lld (lr %g)", t->terms.name[i],
                            isnan(v) ? "NaN" : "infinite", epoch + 1, (long long)step + 1, lr);
        t->values[i] = v;
        total = total ? kd_add(g, total, term) : term;
    }
    KD_TRY(kd_graph_status(g));
    sum = kd_f32(total)[0];
    kd_optim_zero_grad(t->opt);
    kd_status bs = kd_backward(g, total);
    /* Data parallelism: the global batch's gradients (data_parallel.c). */
    if (t->dp && bs == KD_OK) bs = kd__dp_step_end(t->dp, g);
    KD_TRY(bs);
    kd_optim_set_lr(t->opt, lr);
    KD_TRY(kd_method_before_update(t->method, &ctx, t->opt));
    KD_TRY(kd_optim_step(t->opt));
    KD_TRY(kd_method_after_step(t->method, &ctx));
    res->loss = sum;
    res->n_terms = t->terms.n;
    res->term_names = t->terms.name;
    res->term_values = t->values;
    res->lr = lr;
    /* A method that reads no labels trains no classifier (self-supervised,
     * label-free): its logits, if a forward made them, give no accuracy. */
    if (ctx.s.logits && ctx.s.logits->ndim == 2 && kd_method_get_def(t->method)->labels != KD_LABELS_ABSENT) {
        res->logits = kd_f32(ctx.s.logits);
        res->classes = ctx.s.logits->shape[1];
    }
    return KD_OK;
}

/* Name of optimiser state tensor i in a checkpoint. */
static kd_status kd__optim_entry(kd_trainer *t, int i, char *full, size_t n, kd_tensor **st) {
    const char *name;
    KD_TRY(kd_optim_state_get(t->opt, i, &name, st));
    snprintf(full, n, "optim.%s", name);
    return KD_OK;
}

kd_status kd_trainer_save_state(kd_trainer *t, kd_st_writer *w) {
    for (int i = 0; i < kd_optim_state_count(t->opt); i++) {
        char full[256];
        kd_tensor *st;
        KD_TRY(kd__optim_entry(t, i, full, sizeof full, &st));
        KD_TRY(kd_st_writer_add_tensor(w, full, st));
    }
    KD_TRY(kd__save_params(w, kd_method_params(t->method), "distill."));
    if (t->ema) KD_TRY(kd__save_params(w, kd_model_params(t->ema), "ema."));
    char v[32];
    snprintf(v, sizeof v, "%lld", (long long)kd_optim_steps(t->opt));
    return kd_st_writer_set_meta(w, "opt_steps", v);
}

kd_status kd_trainer_load_state(kd_trainer *t, const kd_st_file *f) {
    for (int i = 0; i < kd_optim_state_count(t->opt); i++) {
        char full[256];
        kd_tensor *st;
        KD_TRY(kd__optim_entry(t, i, full, sizeof full, &st));
        KD_TRY(kd_st_read_into(f, full, st));
    }
    KD_TRY(kd__load_params(kd_method_params(t->method), f, "distill."));
    if (t->ema) KD_TRY(kd__load_params(kd_model_params(t->ema), f, "ema."));
    const char *os = kd_st_meta(f, "opt_steps");
    if (!os) return kd_error(KD_ERR_FORMAT, "%s is not a training checkpoint (no opt_steps)", kd_st_path(f));
    kd_optim_state_loaded(t->opt, atoll(os));
    return KD_OK;
}
