/* DINO self-distillation (Caron et al., ICCV 2021) and EsViT (Li et al.,
 * ICLR 2022), as facebookresearch/dino main_dino.py and microsoft/esvit
 * main_esvit.py run them (METHODS.md sections 8 and 15): two registry rows
 * over one implementation; esvit adds the region term.
 *
 *     teacher = EMA of the student backbone and heads (ctx->ema and the
 *               buffers "teacher_head.*", "teacher_head_dense.*"), its batch
 *               norm on batch statistics as the official teacher (never put
 *               in eval mode) but without stochastic depth (the official
 *               teachers have none), forwarded on the 2 global crops only;
 *     student: the 2 global crops in one forward, the local crops in another
 *               (MultiCropWrapper: one forward per resolution);
 *     head = Linear-GELU-Linear-GELU-Linear, L2 normalise, weight-normalised
 *               Linear without bias ("head.mlp.{0,2,4}", "head.last_layer.
 *               weight_g/weight_v"; weight_g fixed at 1 with norm_last_layer);
 *     dino : L = mean over pairs (teacher global q, student view v != q) of
 *               mean_b CE(softmax((t_q - c) / tau_t), s_v / tau_s);
 *     esvit: per pair 0.5 view CE + 0.5 mean over student tokens i of
 *               CE(softmax((r_t[j*] - c_grid) / tau_t), r_s,i / tau_s),
 *               j* = argmax_j cos(student token i, teacher token j of q),
 *               region tokens = feat[n_feat - 2] (N, C, H, W) as (N H W, C)
 *               rows through the dense head ("head_dense.*");
 *     after the optimiser step: teacher <- m teacher + (1 - m) student with
 *               m cosine 0.996 -> 1 over all steps, then the centres
 *               c <- 0.9 c + 0.1 (batch mean of the teacher's outputs; the
 *               global batch's under data parallelism).
 * Before the optimiser step (before_update): weight decay cosine
 * weight_decay -> dino.weight_decay_end, DINO's per-tensor gradient clip
 * (utils.clip_gradients: each tensor's norm at most clip_grad), and the last
 * layers held still during the first freeze_last_layer epochs
 * (cancel_gradients_last_layer: no update, no decay, no AdamW state).
 *
 * The loss hook works on given outputs: the last feature of each side is
 * pooled, the student's of every view stacked view after view (V B, D), the
 * teacher's (2 B, D); for esvit the student's feat[0] is the global crops'
 * last map (2 B, C, Hg, Wg) and, when there are local crops, feat[1] theirs
 * (L B, C, Hl, Wl); the teacher's feat[0] its map of the global crops. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/dino.h"
#include "distill/methods.h"
#include "kd/dist.h"
#include "kd/transforms.h"

typedef struct {
    int out_dim;
    int hidden;
    int bottleneck;
    int norm_last_layer;
    double momentum_teacher;
    double warmup_teacher_temp;
    double teacher_temp;
    int warmup_teacher_temp_epochs;
    double student_temp;
    double center_momentum;
    double weight_decay_end;
    double clip_grad;
    int freeze_last_layer;
    int local_crops_number;
    int global_size;
    int local_size;
    float global_scale_min;
    float local_scale_min;
    float local_scale_max;
} kd__dino_args;

#define A(field, type, def, help) KD__ARG(kd__dino_args, field, type, def, help)
static const kd_method_arg kd__dino_arg_table[] = {
    A(out_dim, KD_ARG_INT, "65536", "output size K of the DINO head(s) (--out_dim)"),
    A(hidden, KD_ARG_INT, "2048", "hidden size of the head's MLP"),
    A(bottleneck, KD_ARG_INT, "256", "bottleneck size before the weight-normalised last layer"),
    A(norm_last_layer, KD_ARG_BOOL, "1", "weight_g of the last layer fixed at 1 (--norm_last_layer)"),
    A(momentum_teacher, KD_ARG_DOUBLE, "0.996", "teacher EMA momentum at the first step, cosine to 1 (--momentum_teacher)"),
    A(warmup_teacher_temp, KD_ARG_DOUBLE, "0.04", "teacher temperature at epoch 1 (--warmup_teacher_temp)"),
    A(teacher_temp, KD_ARG_DOUBLE, "0.07", "teacher temperature after the warm-up (--teacher_temp; EsViT's recipe)"),
    A(warmup_teacher_temp_epochs, KD_ARG_INT, "30", "epochs of the linear teacher-temperature warm-up"),
    A(student_temp, KD_ARG_DOUBLE, "0.1", "student temperature"),
    A(center_momentum, KD_ARG_DOUBLE, "0.9", "EMA momentum of the centre(s)"),
    A(weight_decay_end, KD_ARG_DOUBLE, "0.4", "weight decay at the end: cosine from the run's weight_decay (--weight_decay_end)"),
    A(clip_grad, KD_ARG_DOUBLE, "3.0", "per-tensor gradient-norm clip (utils.clip_gradients; 0: off)"),
    A(freeze_last_layer, KD_ARG_INT, "1", "epochs the heads' last layers stay fixed (--freeze_last_layer)"),
    A(local_crops_number, KD_ARG_INT, "8", "local crops per image besides the 2 global ones"),
    A(global_size, KD_ARG_INT, "0", "side of the global crops (0: the run's image size)"),
    A(local_size, KD_ARG_INT, "0", "side of the local crops (0: global side * 96 / 224, rounded)"),
    A(global_scale_min, KD_ARG_FLOAT, "0.4", "smallest area fraction of a global crop (scale (min, 1))"),
    A(local_scale_min, KD_ARG_FLOAT, "0.05", "smallest area fraction of a local crop"),
    A(local_scale_max, KD_ARG_FLOAT, "0.4", "largest area fraction of a local crop"),
};
#undef A

/* DINOHead without batch norm: mlp.0, mlp.2, mlp.4 and the weight-normalised
 * last layer. */
typedef struct {
    kd_linear_layer mlp[3];
    kd_tensor *g, *v; /* last_layer.weight_g (K, 1), weight_v (K, bottleneck) */
    int fixed_gain;   /* the student's weight_g stays 1 (norm_last_layer) */
    int64_t in;
} kd__dino_head;

typedef struct {
    int region; /* esvit */
    kd__dino_head head, thead, dense, tdense;
    kd_tensor *center, *center_grid; /* (1, K) */
    int64_t d, c;                     /* pooled and token feature sizes */
    int in_h;
    kd_multicrop_cfg mc;
    /* This step's teacher head outputs, for the centre update (graph memory). */
    kd_tensor *t_cls, *t_reg;
} kd__dino_state;

/* ------------------------------------------------------------ schedules */

double kd__dino_cosine(double base, double final, int64_t it, int64_t total) {
    if (total < 1) total = 1;
    return final + 0.5 * (base - final) * (1.0 + cos(M_PI * (double)it / (double)total));
}

double kd__dino_teacher_temp(double warmup, double temp, int warmup_epochs, int epoch) {
    if (epoch >= warmup_epochs) return temp;
    if (warmup_epochs == 1 || epoch == 0) return warmup;
    if (epoch == warmup_epochs - 1) return temp; /* numpy sets the last point exactly */
    return (double)epoch * ((temp - warmup) / (double)(warmup_epochs - 1)) + warmup;
}

/* ------------------------------------------------------------ the head */

static kd_status kd__dino_head_init(kd__dino_head *h, kd_param_list *pl, const char *prefix, const kd__dino_args *a,
                                    int64_t in, int trainable, kd_rng *r) {
    memset(h, 0, sizeof *h);
    h->in = in;
    h->fixed_gain = a->norm_last_layer;
    int first = pl->n;
    char name[160];
    const int64_t dims[4] = {in, a->hidden, a->hidden, a->bottleneck};
    for (int k = 0; k < 3; k++) {
        snprintf(name, sizeof name, "%s.mlp.%d", prefix, 2 * k);
        KD_TRY(kd_linear_layer_init(&h->mlp[k], pl, name, dims[k], dims[k + 1], 1));
        kd_init_trunc_normal(h->mlp[k].weight, 0.02f, r);
        kd_init_constant(h->mlp[k].bias, 0.0f);
    }
    snprintf(name, sizeof name, "%s.last_layer", prefix);
    const int64_t gs[2] = {a->out_dim, 1}, vs[2] = {a->out_dim, a->bottleneck};
    /* utils.get_params_groups: weight_g is 2-d, so it decays when trained. */
    KD_TRY(kd_params_new(pl, name, "weight_g", KD_F32, 2, gs, a->norm_last_layer ? KD_PARAM_BUFFER : KD_PARAM_WEIGHT,
                         &h->g));
    KD_TRY(kd_params_new(pl, name, "weight_v", KD_F32, 2, vs, KD_PARAM_WEIGHT, &h->v));
    kd_init_uniform(h->v, 1.0f / sqrtf((float)a->bottleneck), r); /* nn.Linear's default init */
    kd_init_constant(h->g, 1.0f);                                  /* weight_g.data.fill_(1) */
    if (!trainable)
        for (int i = first; i < pl->n; i++) {
            pl->items[i].kind = KD_PARAM_BUFFER;
            pl->items[i].t->requires_grad = 0;
        }
    else if (a->norm_last_layer)
        h->g->requires_grad = 0;
    return KD_OK;
}

/* x (N, in) -> (N, K). */
static kd_tensor *kd__dino_head_forward(kd_graph *g, const kd__dino_head *h, kd_tensor *x, int use_gain) {
    if (!x) return NULL;
    x = kd_graph_to_strided(g, x);
    if (x && x->ndim != 2) {
        int64_t s2[2] = {x->shape[0], h->in};
        x = kd_reshape(g, x, 2, s2);
    }
    x = kd_gelu(g, kd_linear_layer_forward(g, &h->mlp[0], x));
    x = kd_gelu(g, kd_linear_layer_forward(g, &h->mlp[1], x));
    x = kd_l2_normalize(g, kd_linear_layer_forward(g, &h->mlp[2], x), 1e-12f);
    kd_tensor *gain = NULL;
    if (use_gain) {
        int64_t k = h->g->shape[0];
        gain = kd_reshape(g, h->g, 1, &k);
    }
    return kd_linear(g, x, kd_weight_norm(g, h->v, gain), NULL);
}

/* teacher = m teacher + (1 - m) student over every tensor of the head
 * (main_dino.py zips the parameters, weight_g included), in float32. */
static void kd__ema_t(kd_tensor *k, const kd_tensor *q, float m, float a) {
    float *d = kd_f32(k);
    const float *x = kd_f32(q);
    for (int64_t j = 0; j < kd_tensor_numel(k); j++) d[j] = d[j] * m + a * x[j];
}

static void kd__dino_head_ema(kd__dino_head *t, const kd__dino_head *s, double momentum) {
    const float m = (float)momentum, a = (float)(1.0 - momentum);
    for (int k = 0; k < 3; k++) {
        kd__ema_t(t->mlp[k].weight, s->mlp[k].weight, m, a);
        kd__ema_t(t->mlp[k].bias, s->mlp[k].bias, m, a);
    }
    kd__ema_t(t->g, s->g, m, a);
    kd__ema_t(t->v, s->v, m, a);
}

/* ------------------------------------------------------------ setup */

static kd_status kd__dino_setup_common(kd_method *m, const kd_method_shapes *shp, int region) {
    const kd__dino_args *a = kd_method_args(m);
    kd__dino_state *st = kd_method_state(m);
    const char *who = region ? "esvit" : "dino";
    st->region = region;
    if (a->out_dim < 1 || a->hidden < 1 || a->bottleneck < 1)
        return kd_error(KD_ERR_INVALID, "%s.out_dim %d, %s.hidden %d and %s.bottleneck %d must be >= 1", who,
                        a->out_dim, who, a->hidden, who, a->bottleneck);
    if (!(a->momentum_teacher >= 0 && a->momentum_teacher <= 1))
        return kd_error(KD_ERR_INVALID, "%s.momentum_teacher %g must be in [0, 1]", who, a->momentum_teacher);
    if (!(a->warmup_teacher_temp > 0) || !(a->teacher_temp > 0) || !(a->student_temp > 0))
        return kd_error(KD_ERR_INVALID, "%s: the temperatures (warmup_teacher_temp %g, teacher_temp %g, student_temp %g) "
                                        "must be > 0", who, a->warmup_teacher_temp, a->teacher_temp, a->student_temp);
    if (a->warmup_teacher_temp_epochs < 0 || a->freeze_last_layer < 0)
        return kd_error(KD_ERR_INVALID, "%s.warmup_teacher_temp_epochs %d and %s.freeze_last_layer %d must be >= 0", who,
                        a->warmup_teacher_temp_epochs, who, a->freeze_last_layer);
    if (!(a->center_momentum >= 0 && a->center_momentum <= 1))
        return kd_error(KD_ERR_INVALID, "%s.center_momentum %g must be in [0, 1]", who, a->center_momentum);
    if (!(a->weight_decay_end >= 0) || !(a->clip_grad >= 0))
        return kd_error(KD_ERR_INVALID, "%s.weight_decay_end %g and %s.clip_grad %g must be >= 0", who,
                        a->weight_decay_end, who, a->clip_grad);
    if (a->local_crops_number < 0 || a->local_crops_number + 2 > KD_MULTICROP_MAX_VIEWS)
        return kd_error(KD_ERR_INVALID, "%s.local_crops_number %d must be in [0, %d]", who, a->local_crops_number,
                        KD_MULTICROP_MAX_VIEWS - 2);
    if (a->global_size < 0 || a->local_size < 0)
        return kd_error(KD_ERR_INVALID, "%s.global_size %d and %s.local_size %d must be >= 0 (0: derived)", who,
                        a->global_size, who, a->local_size);
    if (!(a->global_scale_min > 0 && a->global_scale_min <= 1) ||
        !(a->local_scale_min > 0 && a->local_scale_min <= a->local_scale_max && a->local_scale_max <= 1))
        return kd_error(KD_ERR_INVALID, "%s: crop scales global (%g, 1), local (%g, %g) must lie in (0, 1] in order", who,
                        (double)a->global_scale_min, (double)a->local_scale_min, (double)a->local_scale_max);
    const kd_net_shapes *n = &shp->student;
    if (n->n_feat < (region ? 2 : 1))
        return kd_error(KD_ERR_SHAPE, "%s: the student needs the pooled feature feat[-1]%s", who,
                        region ? " and the last feature map feat[-2]" : "");
    st->d = kd__last_feat_dim(n);
    if (region) {
        const int k = n->n_feat - 2;
        if (n->feat_ndim[k] != 4) {
            char b[96];
            return kd_error(KD_ERR_SHAPE, "esvit: the region features feat[-2] must be a map (N, C, H, W), the student "
                                          "gives %s", kd__shape_text(n->feat_ndim[k], n->feat[k], b, sizeof b));
        }
        st->c = n->feat[k][1];
    }
    st->in_h = shp->in_h;
    kd_param_list *pl = kd_method_params(m);
    kd_rng r;
    /* teacher_without_ddp.load_state_dict(student.state_dict()): the same draws. */
    kd__method_rng(m, "head", &r);
    KD_TRY(kd__dino_head_init(&st->head, pl, "head", a, st->d, 1, &r));
    kd__method_rng(m, "head", &r);
    KD_TRY(kd__dino_head_init(&st->thead, pl, "teacher_head", a, st->d, 0, &r));
    if (region) {
        kd__method_rng(m, "head_dense", &r);
        KD_TRY(kd__dino_head_init(&st->dense, pl, "head_dense", a, st->c, 1, &r));
        kd__method_rng(m, "head_dense", &r);
        KD_TRY(kd__dino_head_init(&st->tdense, pl, "teacher_head_dense", a, st->c, 0, &r));
    }
    const int64_t cs[2] = {1, a->out_dim};
    KD_TRY(kd_params_new(pl, "dino_loss", "center", KD_F32, 2, cs, KD_PARAM_BUFFER, &st->center));
    kd_init_constant(st->center, 0.0f);
    if (region) {
        KD_TRY(kd_params_new(pl, "dino_loss", "center_grid", KD_F32, 2, cs, KD_PARAM_BUFFER, &st->center_grid));
        kd_init_constant(st->center_grid, 0.0f);
    }
    return KD_OK;
}

static kd_status kd__dino_setup(kd_method *m, const kd_method_shapes *shp) { return kd__dino_setup_common(m, shp, 0); }
static kd_status kd__esvit_setup(kd_method *m, const kd_method_shapes *shp) { return kd__dino_setup_common(m, shp, 1); }

static int kd__dino_num_views(const kd_method *m) {
    return 2 + ((const kd__dino_args *)kd_method_args_c(m))->local_crops_number;
}

/* DataAugmentationDINO (kd_multicrop_cfg_esvit) with the settings' sizes and
 * scales and the run's normalisation. */
static kd_status kd__dino_view_transform(const kd_method *m, int view, kd_transform_cfg *tf) {
    const kd__dino_args *a = kd_method_args_c(m);
    kd__dino_state *st = kd_method_state((kd_method *)m); /* the views' config lives in the method */
    const char *who = kd_method_get_def(m)->name;
    int gs = a->global_size ? a->global_size : (tf->out_h ? tf->out_h : st->in_h);
    if (gs < 1) return kd_error(KD_ERR_INVALID, "%s: the images differ in size; set image_size or %s.global_size", who, who);
    int ls = a->local_size ? a->local_size : (int)floor(gs * 96.0 / 224.0 + 0.5);
    if (ls < 1) ls = 1;
    if (view == 0) {
        st->mc = kd_multicrop_cfg_esvit(gs, a->local_crops_number, ls);
        st->mc.global[0].scale[0] = st->mc.global[1].scale[0] = a->global_scale_min;
        st->mc.local.scale[0] = a->local_scale_min;
        st->mc.local.scale[1] = a->local_scale_max;
        kd_ssl_aug_cfg *cs[3] = {&st->mc.global[0], &st->mc.global[1], &st->mc.local};
        for (int i = 0; i < 3; i++) {
            cs[i]->normalize = tf->normalize;
            for (int k = 0; k < 3; k++) {
                cs[i]->mean[k] = tf->mean[k];
                cs[i]->std[k] = tf->std[k] != 0.0f ? tf->std[k] : 1.0f;
            }
        }
    }
    const kd_ssl_aug_cfg *vc = kd_multicrop_view_cfg(&st->mc, view);
    tf->ssl = vc;
    tf->out_h = tf->out_w = vc->size;
    tf->pad_crop = 0;
    tf->hflip = 0;
    tf->geometry = NULL;
    return KD_OK;
}

/* ------------------------------------------------------------ the losses */

/* log_softmax(x * s) of one row, in double, into out (n). */
static void kd__log_softmax_row(const float *x, int64_t n, double s, double *out) {
    double mx = -INFINITY;
    for (int64_t k = 0; k < n; k++) {
        out[k] = (double)x[k] * s;
        if (out[k] > mx) mx = out[k];
    }
    double z = 0;
    for (int64_t k = 0; k < n; k++) z += exp(out[k] - mx);
    const double lse = mx + log(z);
    for (int64_t k = 0; k < n; k++) out[k] -= lse;
}

/* softmax((x - c) / temp) of rows x (n, K) into q (float). */
static void kd__teacher_probs(const float *x, const float *c, int64_t n, int64_t K, double temp, float *q,
                              double *work) {
    for (int64_t r = 0; r < n; r++) {
        double mx = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            work[k] = ((double)x[r * K + k] - (double)c[k]) / temp;
            if (work[k] > mx) mx = work[k];
        }
        double z = 0;
        for (int64_t k = 0; k < K; k++) z += (work[k] = exp(work[k] - mx));
        for (int64_t k = 0; k < K; k++) q[r * K + k] = (float)(work[k] / z);
    }
}

/* The view term: in[0] = the student head outputs of every view (V B, K).
 * Row r is view v = r / B, image b = r % B; its pairs are the teacher's
 * global views iq != v. */
typedef struct {
    const float *q; /* (2 B, K) teacher probabilities */
    int64_t B, V, K, npairs;
    double inv_ts, w;
} kd__view_ce_p;

static kd_status kd__view_ce_fwd(kd_graph *g, const void *pp, kd_tensor *const *in, int n_in, kd_tensor *out,
                                 void **saved) {
    (void)n_in;
    (void)saved;
    const kd__view_ce_p *p = pp;
    double *ls = kd_function_alloc(g, sizeof(double) * (size_t)p->K);
    if (!ls) return kd_graph_status(g);
    const float *s = kd_f32(in[0]);
    double total = 0;
    for (int64_t r = 0; r < p->V * p->B; r++) {
        const int64_t v = r / p->B, b = r % p->B;
        kd__log_softmax_row(s + r * p->K, p->K, p->inv_ts, ls);
        for (int64_t iq = 0; iq < 2; iq++) {
            if (iq == v) continue;
            const float *q = p->q + (iq * p->B + b) * p->K;
            double ce = 0;
            for (int64_t k = 0; k < p->K; k++) ce -= (double)q[k] * ls[k];
            total += ce;
        }
    }
    kd_f32(out)[0] = (float)(p->w * total / (double)p->B / (double)p->npairs);
    return KD_OK;
}

/* d/ds of -sum_k q_k log_softmax(s / ts)_k summed over a row's pairs:
 * (softmax(s / ts) * sum(q) - sum q) / ts. */
static kd_status kd__view_ce_bwd(kd_graph *g, const void *pp, void *saved, kd_tensor *const *in, int n_in,
                                 const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)saved;
    (void)n_in;
    (void)out;
    const kd__view_ce_p *p = pp;
    if (!gin[0]) return KD_OK;
    double *ls = kd_function_alloc(g, sizeof(double) * (size_t)p->K * 2);
    if (!ls) return kd_graph_status(g);
    double *gq = ls + p->K;
    const float *s = kd_f32(in[0]);
    float *gs = kd_f32(gin[0]);
    const double scale = (double)kd_f32(gout)[0] * p->w / (double)p->B / (double)p->npairs * p->inv_ts;
    for (int64_t r = 0; r < p->V * p->B; r++) {
        const int64_t v = r / p->B, b = r % p->B;
        kd__log_softmax_row(s + r * p->K, p->K, p->inv_ts, ls);
        memset(gq, 0, sizeof(double) * (size_t)p->K);
        double sq = 0;
        for (int64_t iq = 0; iq < 2; iq++) {
            if (iq == v) continue;
            const float *q = p->q + (iq * p->B + b) * p->K;
            for (int64_t k = 0; k < p->K; k++) {
                gq[k] += q[k];
                sq += q[k];
            }
        }
        for (int64_t k = 0; k < p->K; k++) gs[r * p->K + k] += (float)(scale * (exp(ls[k]) * sq - gq[k]));
    }
    return KD_OK;
}

static const kd_function kd__view_ce_fn = {"dino_view_ce", kd__view_ce_fwd, kd__view_ce_bwd};

/* The region term: in[0] the dense-head outputs of the global crops' tokens
 * (2 B Ng, K), in[1] (when L > 0) the local crops' (L B Nl, K). For student
 * view v with T_v tokens, image b, token i and teacher view iq != v, the
 * teacher token is idx[...] (argmax of the cosine similarity), in the order
 * v, iq, b, i. */
typedef struct {
    const float *q;     /* (2 B Ng, K) teacher probabilities */
    const int32_t *idx; /* matched teacher token of every (v, iq, b, i) */
    int64_t B, V, K, Ng, Nl, npairs;
    double inv_ts;
} kd__region_ce_p;

/* Calls fn for each student token row: its tensor (0 global, 1 local), row,
 * and the coefficient of its CE terms; the teacher rows are idx-matched. */
static kd_status kd__region_ce_walk(kd_graph *g, const kd__region_ce_p *p, kd_tensor *const *in, const float *gout,
                                    kd_tensor *const *gin, double *total) {
    double *ls = kd_function_alloc(g, sizeof(double) * (size_t)p->K * 2);
    if (!ls) return kd_graph_status(g);
    double *gq = ls + p->K;
    int64_t off = 0;
    for (int64_t v = 0; v < p->V; v++) {
        const int loc = v >= 2;
        const int64_t T = loc ? p->Nl : p->Ng, base = (loc ? v - 2 : v) * p->B * T;
        const float *s = kd_f32(in[loc]);
        float *gs = gin && gin[loc] ? kd_f32(gin[loc]) : NULL;
        const double coef = 0.5 / (double)(p->B * T) / (double)p->npairs;
        const int nq = loc ? 2 : 1;
        for (int64_t b = 0; b < p->B; b++)
            for (int64_t i = 0; i < T; i++) {
                const int64_t row = base + b * T + i;
                kd__log_softmax_row(s + row * p->K, p->K, p->inv_ts, ls);
                memset(gq, 0, sizeof(double) * (size_t)p->K);
                double sq = 0, ce = 0;
                for (int qi = 0, iq = 0; qi < nq; iq++) {
                    if (iq == v) continue;
                    const int32_t j = p->idx[off + (int64_t)qi * p->B * T + b * T + i];
                    const float *q = p->q + ((int64_t)iq * p->B * p->Ng + b * p->Ng + j) * p->K;
                    for (int64_t k = 0; k < p->K; k++) {
                        ce -= (double)q[k] * ls[k];
                        gq[k] += q[k];
                        sq += q[k];
                    }
                    qi++;
                }
                if (total) *total += coef * ce;
                if (gs) {
                    const double sc = (double)gout[0] * coef * p->inv_ts;
                    for (int64_t k = 0; k < p->K; k++) gs[row * p->K + k] += (float)(sc * (exp(ls[k]) * sq - gq[k]));
                }
            }
        off += (int64_t)nq * p->B * T;
    }
    return KD_OK;
}

static kd_status kd__region_ce_fwd(kd_graph *g, const void *pp, kd_tensor *const *in, int n_in, kd_tensor *out,
                                   void **saved) {
    (void)n_in;
    (void)saved;
    double total = 0;
    KD_TRY(kd__region_ce_walk(g, pp, in, NULL, NULL, &total));
    kd_f32(out)[0] = (float)total;
    return KD_OK;
}

static kd_status kd__region_ce_bwd(kd_graph *g, const void *pp, void *saved, kd_tensor *const *in, int n_in,
                                   const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)saved;
    (void)n_in;
    (void)out;
    return kd__region_ce_walk(g, pp, in, kd_f32(gout), gin, NULL);
}

static const kd_function kd__region_ce_fn = {"esvit_region_ce", kd__region_ce_fwd, kd__region_ce_bwd};

/* Rows of x (n, C) L2-normalised as F.normalize (eps 1e-12), in double. */
static void kd__normalize_rows(const float *x, int64_t n, int64_t C, double *out) {
    for (int64_t r = 0; r < n; r++) {
        double ss = 0;
        for (int64_t c = 0; c < C; c++) ss += (double)x[r * C + c] * x[r * C + c];
        double nrm = sqrt(ss);
        if (nrm < 1e-12) nrm = 1e-12;
        for (int64_t c = 0; c < C; c++) out[r * C + c] = x[r * C + c] / nrm;
    }
}

/* idx (order v, iq, b, i): the teacher token of global view iq most similar
 * (cosine) to student token i of view v, image b; ties to the smaller index. */
static kd_status kd__region_match(kd_graph *g, const kd__region_ce_p *p, const float *sg, const float *sl,
                                  const float *tf, int64_t C, int32_t *idx) {
    const int64_t L = p->V - 2, ng = 2 * p->B * p->Ng, nl = L * p->B * p->Nl;
    double *ns = kd_function_alloc(g, sizeof(double) * (size_t)((ng + nl + ng) * C));
    if (!ns) return kd_graph_status(g);
    double *nsl = ns + ng * C, *nt = nsl + nl * C;
    kd__normalize_rows(sg, ng, C, ns);
    if (nl) kd__normalize_rows(sl, nl, C, nsl);
    kd__normalize_rows(tf, ng, C, nt);
    int64_t off = 0;
    for (int64_t v = 0; v < p->V; v++) {
        const int loc = v >= 2;
        const int64_t T = loc ? p->Nl : p->Ng;
        const double *sv = (loc ? nsl : ns) + (loc ? v - 2 : v) * p->B * T * C;
        for (int64_t iq = 0, qi = 0; iq < 2; iq++) {
            if (iq == v) continue;
            for (int64_t b = 0; b < p->B; b++)
                for (int64_t i = 0; i < T; i++) {
                    const double *x = sv + (b * T + i) * C;
                    double best = -INFINITY;
                    int32_t bj = 0;
                    for (int64_t j = 0; j < p->Ng; j++) {
                        const double *y = nt + ((iq * p->B + b) * p->Ng + j) * C;
                        double d = 0;
                        for (int64_t c = 0; c < C; c++) d += x[c] * y[c];
                        if (d > best) {
                            best = d;
                            bj = (int32_t)j;
                        }
                    }
                    idx[off + qi * p->B * T + b * T + i] = bj;
                }
            qi++;
        }
        off += (loc ? 2 : 1) * p->B * T;
    }
    return KD_OK;
}

/* Rows of a feature as a 2-d strided tensor (N, D). */
static kd_tensor *kd__rows(kd_graph *g, kd_tensor *x) {
    x = kd_graph_to_strided(g, x);
    if (!x || x->ndim == 2) return x;
    int64_t s2[2] = {x->shape[0], kd_tensor_numel(x) / x->shape[0]};
    return kd_reshape(g, x, 2, s2);
}

/* (n, C, H, W) -> (n H W, C) rows, b c h w -> (b h w) c. */
static kd_tensor *kd__tokens(kd_graph *g, kd_tensor *map) {
    map = kd_graph_to_strided(g, map);
    if (!map) return NULL;
    const int64_t n = map->shape[0], C = map->shape[1], hw = map->shape[2] * map->shape[3];
    int64_t s3[3] = {n, C, hw}, s2[2] = {n * hw, C};
    return kd_reshape(g, kd_transpose(g, kd_reshape(g, map, 3, s3), 1, 2), 2, s2);
}

static kd_status kd__dino_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    const kd__dino_args *a = kd_method_args(m);
    kd__dino_state *st = kd_method_state(m);
    const char *who = kd_method_get_def(m)->name;
    kd_graph *g = ctx->g;
    st->t_cls = st->t_reg = NULL;
    const int need = st->region ? 2 : 1;
    if (ctx->s.n_feat < need || ctx->t.n_feat < need)
        return kd_error(KD_ERR_SHAPE, "%s: the loss needs the pooled features%s of student and teacher", who,
                        st->region ? " and the last feature maps" : "");
    kd_tensor *fs = kd__rows(g, ctx->s.feat[ctx->s.n_feat - 1]), *ft = kd__rows(g, ctx->t.feat[ctx->t.n_feat - 1]);
    KD_TRY(kd_graph_status(g));
    const int64_t B = ft->shape[0] / 2, K = a->out_dim;
    if (ft->shape[0] != 2 * B || B < 1 || fs->shape[0] % B || fs->shape[0] / B < 2)
        return kd_error(KD_ERR_SHAPE, "%s: the teacher's rows (%lld) must be 2 global views of B images and the "
                                      "student's (%lld) V >= 2 views of B", who, (long long)ft->shape[0],
                        (long long)fs->shape[0]);
    const int64_t V = fs->shape[0] / B, L = V - 2, npairs = 2 * V - 2;
    const double temp = kd__dino_teacher_temp(a->warmup_teacher_temp, a->teacher_temp, a->warmup_teacher_temp_epochs,
                                              ctx->epoch);
    kd_tensor *hs = kd__dino_head_forward(g, &st->head, fs, !a->norm_last_layer);
    int prev = kd_graph_set_grad_enabled(g, 0);
    kd_tensor *ht = kd__dino_head_forward(g, &st->thead, ft, 1);
    kd_graph_set_grad_enabled(g, prev);
    KD_TRY(kd_graph_status(g));
    double *work = kd_function_alloc(g, sizeof(double) * (size_t)K);
    float *q = kd_function_alloc(g, sizeof(float) * (size_t)(2 * B * K));
    if (!work || !q) return kd_graph_status(g);
    kd__teacher_probs(kd_f32(ht), kd_f32(st->center), 2 * B, K, temp, q, work);
    kd__view_ce_p vp = {.q = q, .B = B, .V = V, .K = K, .npairs = npairs, .inv_ts = 1.0 / a->student_temp,
                        .w = st->region ? 0.5 : 1.0};
    kd_tensor *lv = kd_function_apply(g, &kd__view_ce_fn, &vp, sizeof vp, 1, &hs, 0, NULL);
    const float beta = kd_method_cfg(m)->beta;
    KD_TRY(kd_graph_status(g));
    st->t_cls = ht;
    if (!st->region) return kd_loss_terms_add(terms, "dino", beta == 1.0f ? lv : kd_scale(g, lv, beta));
    /* Region term. */
    if (ctx->s.n_feat != (L > 0 ? 3 : 2))
        return kd_error(KD_ERR_SHAPE, "esvit: the student's maps of the global and the local crops are needed (%lld "
                                      "views)", (long long)V);
    kd_tensor *sg = kd__tokens(g, ctx->s.feat[0]), *sl = L > 0 ? kd__tokens(g, ctx->s.feat[1]) : NULL,
              *tt = kd__tokens(g, ctx->t.feat[0]);
    KD_TRY(kd_graph_status(g));
    const int64_t C = tt->shape[1], Ng = tt->shape[0] / (2 * B);
    const int64_t Nl = L > 0 ? sl->shape[0] / (L * B) : 0;
    if (Ng < 1 || tt->shape[0] != 2 * B * Ng || sg->shape[0] != 2 * B * Ng || sg->shape[1] != C ||
        (L > 0 && (Nl < 1 || sl->shape[0] != L * B * Nl || sl->shape[1] != C)))
        return kd_error(KD_ERR_SHAPE, "esvit: region tokens must be (2 B Ng, C) for the global crops of both nets and "
                                      "(L B Nl, C) for the student's local crops (B %lld, L %lld)", (long long)B,
                        (long long)L);
    kd_tensor *rs[2] = {kd__dino_head_forward(g, &st->dense, sg, !a->norm_last_layer),
                        L > 0 ? kd__dino_head_forward(g, &st->dense, sl, !a->norm_last_layer) : NULL};
    prev = kd_graph_set_grad_enabled(g, 0);
    kd_tensor *rt = kd__dino_head_forward(g, &st->tdense, tt, 1);
    kd_graph_set_grad_enabled(g, prev);
    KD_TRY(kd_graph_status(g));
    float *qr = kd_function_alloc(g, sizeof(float) * (size_t)(2 * B * Ng * K));
    int32_t *idx = kd_function_alloc(g, sizeof(int32_t) * (size_t)(2 * B * Ng + 2 * L * B * Nl));
    if (!qr || !idx) return kd_graph_status(g);
    kd__teacher_probs(kd_f32(rt), kd_f32(st->center_grid), 2 * B * Ng, K, temp, qr, work);
    kd__region_ce_p rp = {.q = qr, .idx = idx, .B = B, .V = V, .K = K, .Ng = Ng, .Nl = Nl, .npairs = npairs,
                          .inv_ts = 1.0 / a->student_temp};
    KD_TRY(kd__region_match(g, &rp, kd_f32(sg), sl ? kd_f32(sl) : NULL, kd_f32(tt), C, idx));
    kd_tensor *lr = kd_function_apply(g, &kd__region_ce_fn, &rp, sizeof rp, L > 0 ? 2 : 1, rs, 0, NULL);
    KD_TRY(kd_graph_status(g));
    st->t_reg = rt;
    KD_TRY(kd_loss_terms_add(terms, "esvit_view", beta == 1.0f ? lv : kd_scale(g, lv, beta)));
    return kd_loss_terms_add(terms, "esvit_region", beta == 1.0f ? lr : kd_scale(g, lr, beta));
}

/* ------------------------------------------------------------ the step */

/* Whether a net has batch norm (running statistics). */
static int kd__has_batchnorm(const kd_param_list *pl) {
    for (int i = 0; i < pl->n; i++) {
        const size_t L = strlen(pl->items[i].name);
        if (L >= 12 && !strcmp(pl->items[i].name + L - 12, "running_mean")) return 1;
    }
    return 0;
}

/* One forward of `model` over views [v0, v1) stacked. */
static kd_status kd__views_forward(kd_graph *g, kd_model *model, const kd_step_batch *b, int v0, int v1,
                                   kd_model_out *o) {
    kd_tensor *xs[KD_MULTICROP_MAX_VIEWS];
    for (int v = v0; v < v1; v++) xs[v - v0] = kd_graph_to_strided(g, b->x[v]);
    kd_tensor *x = v1 - v0 == 1 ? xs[0] : kd_concat(g, xs, v1 - v0, 0);
    KD_TRY(kd_graph_status(g));
    return kd_model_forward(model, g, x, 0, o);
}

static kd_status kd__dino_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    kd__dino_state *st = kd_method_state(m);
    const char *who = kd_method_get_def(m)->name;
    kd_graph *g = ctx->g;
    const int V = ctx->batch->n_views;
    if (V != kd_method_num_views(m) || V > KD_MULTICROP_MAX_VIEWS || !ctx->ema)
        return kd_error(KD_ERR_INVALID, "%s needs %d views of each image (2 global + %s.local_crops_number) and the "
                                        "EMA teacher (ema_student); the batch has %d", who, kd_method_num_views(m),
                        who, V);
    memset(&ctx->s, 0, sizeof ctx->s);
    memset(&ctx->t, 0, sizeof ctx->t);
    /* Teacher: the 2 global crops, batch statistics (the official teacher
     * stays in training mode), no gradient, and no stochastic depth (DINO
     * builds it without drop_path_rate, EsViT with 0.0): training mode for
     * a net with batch norm, eval mode (only stochastic depth and dropout
     * differ) for one without, such as the Swins. */
    kd_model_out to, sog, sol;
    int prev = kd_graph_set_grad_enabled(g, 0);
    int was = kd_model_training(ctx->ema);
    kd_model_set_training(ctx->ema, kd__has_batchnorm(kd_model_params(ctx->ema)));
    kd_status s = kd__views_forward(g, ctx->ema, ctx->batch, 0, 2, &to);
    kd_model_set_training(ctx->ema, was);
    kd_tensor *tcls = s == KD_OK ? kd_method_feat(g, &to, -1, 0) : NULL;
    kd_tensor *tmap = s == KD_OK && st->region ? kd_method_feat(g, &to, -2, 0) : NULL;
    kd_graph_set_grad_enabled(g, prev);
    KD_TRY(s);
    KD_TRY(kd_graph_status(g));
    /* Student: one forward per resolution (MultiCropWrapper). */
    KD_TRY(kd__views_forward(g, ctx->student, ctx->batch, 0, 2, &sog));
    if (V > 2) KD_TRY(kd__views_forward(g, ctx->student, ctx->batch, 2, V, &sol));
    kd_tensor *pooled[2] = {kd__rows(g, kd_method_feat(g, &sog, -1, 0)),
                            V > 2 ? kd__rows(g, kd_method_feat(g, &sol, -1, 0)) : NULL};
    kd_tensor *spool = V > 2 ? kd_concat(g, pooled, 2, 0) : pooled[0];
    int n = 0;
    if (st->region) {
        ctx->s.feat[n++] = kd_method_feat(g, &sog, -2, 0);
        if (V > 2) ctx->s.feat[n++] = kd_method_feat(g, &sol, -2, 0);
        ctx->t.feat[0] = tmap;
    }
    ctx->s.feat[n++] = spool;
    ctx->s.n_feat = n;
    ctx->t.feat[st->region] = tcls;
    ctx->t.n_feat = st->region ? 2 : 1;
    for (int k = 0; k < ctx->s.n_feat; k++) ctx->s.preact[k] = ctx->s.feat[k];
    for (int k = 0; k < ctx->t.n_feat; k++) ctx->t.preact[k] = ctx->t.feat[k];
    KD_TRY(kd_graph_status(g));
    return kd_method_loss(m, ctx, terms);
}

/* Every optimised tensor of a list: DINO's per-tensor clip. */
static void kd__clip_each(kd_param_list *pl, double clip) {
    for (int i = 0; i < pl->n; i++) {
        kd_param *p = &pl->items[i];
        if (p->kind == KD_PARAM_BUFFER || !p->t->grad || p->t->dtype != KD_F32) continue;
        float *gd = kd_f32(p->t->grad);
        const int64_t n = kd_tensor_numel(p->t);
        double ss = 0;
        for (int64_t j = 0; j < n; j++) ss += (double)gd[j] * gd[j];
        /* clip_coef = clip / (param_norm + 1e-6) on a float32 norm */
        const float cf = (float)clip / ((float)sqrt(ss) + 1e-6f);
        if (cf < 1.0f)
            for (int64_t j = 0; j < n; j++) gd[j] *= cf;
    }
}

static kd_status kd__dino_before_update(kd_method *m, kd_step_ctx *ctx, kd_optim *opt) {
    const kd__dino_args *a = kd_method_args(m);
    kd__dino_state *st = kd_method_state(m);
    const int64_t total = (int64_t)ctx->epochs * ctx->steps_per_epoch;
    kd_optim_set_weight_decay(opt, kd__dino_cosine(kd_optim_base_weight_decay(opt), a->weight_decay_end,
                                                   ctx->global_step, total));
    if (a->clip_grad > 0) {
        if (ctx->student) kd__clip_each(kd_model_params(ctx->student), a->clip_grad);
        kd__clip_each(kd_method_params(m), a->clip_grad);
    }
    const int64_t hold = (int64_t)a->freeze_last_layer * ctx->steps_per_epoch;
    kd__dino_head *heads[2] = {&st->head, st->region ? &st->dense : NULL};
    for (int i = 0; i < 2; i++) {
        if (!heads[i]) continue;
        KD_TRY(kd_optim_hold(opt, heads[i]->v, hold));
        if (!a->norm_last_layer) KD_TRY(kd_optim_hold(opt, heads[i]->g, hold));
    }
    return KD_OK;
}

/* c = c m + (sum of the rows over every rank / rows) (1 - m). */
static kd_status kd__center_update(kd_tensor *c, const kd_tensor *rows, double momentum) {
    const int64_t n = rows->shape[0], K = c->shape[1];
    double *sum = calloc((size_t)K + 1, sizeof *sum);
    if (!sum) return kd_error(KD_ERR_NOMEM, "out of memory updating the DINO centre");
    const float *x = kd_f32(rows);
    for (int64_t r = 0; r < n; r++)
        for (int64_t k = 0; k < K; k++) sum[k] += x[r * K + k];
    sum[K] = (double)n;
    kd_status s = kd_dist_size() > 1 ? kd_dist_allreduce_f64(sum, K + 1) : KD_OK;
    if (s == KD_OK) {
        float *cd = kd_f32(c);
        const float mm = (float)momentum, om = (float)(1.0 - momentum), cnt = (float)sum[K];
        for (int64_t k = 0; k < K; k++) cd[k] = cd[k] * mm + ((float)sum[k] / cnt) * om;
    }
    free(sum);
    return s;
}

static kd_status kd__dino_after_step(kd_method *m, kd_step_ctx *ctx) {
    const kd__dino_args *a = kd_method_args(m);
    kd__dino_state *st = kd_method_state(m);
    /* EMA of the teacher after the optimiser step, m from the cosine
     * schedule at this step. */
    const double mom = kd__dino_cosine(a->momentum_teacher, 1.0, ctx->global_step,
                                       (int64_t)ctx->epochs * ctx->steps_per_epoch);
    if (ctx->ema && ctx->student)
        KD_TRY(kd_ema_update(kd_model_params(ctx->ema), kd_model_params(ctx->student), mom));
    kd__dino_head_ema(&st->thead, &st->head, mom);
    if (st->region) kd__dino_head_ema(&st->tdense, &st->dense, mom);
    /* The centres, from this step's teacher outputs. */
    if (st->t_cls) KD_TRY(kd__center_update(st->center, st->t_cls, a->center_momentum));
    if (st->t_reg) KD_TRY(kd__center_update(st->center_grid, st->t_reg, a->center_momentum));
    st->t_cls = st->t_reg = NULL;
    return KD_OK;
}

#define KD__DINO_DEF                                                                                                \
    .gamma = 0.0f, .alpha = 0.0f, .beta = 1.0f, .T = 1.0f, .teacher = KD_TEACHER_NONE, .labels = KD_LABELS_ABSENT, \
    .views = 2, .num_views = kd__dino_num_views, .view_transform = kd__dino_view_transform, .ema_student = 1,      \
    .args = KD__ARGS(kd__dino_arg_table), .args_size = sizeof(kd__dino_args),                                      \
    .state_size = sizeof(kd__dino_state), .step = kd__dino_step, .loss = kd__dino_loss,                            \
    .before_update = kd__dino_before_update, .after_step = kd__dino_after_step

const kd_method_def kd__method_dino = {
    .name = "dino",
    .summary = "self-supervised pretraining (kd pretrain): DINO self-distillation from an EMA teacher, multi-crop, "
               "centred and sharpened teacher, weight-normalised head",
    .paper = "Caron et al.: Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021",
    .setup = kd__dino_setup,
    KD__DINO_DEF,
};

const kd_method_def kd__method_esvit = {
    .name = "esvit",
    .summary = "self-supervised pretraining (kd pretrain): EsViT, DINO's view term plus region matching of the last "
               "feature map's tokens through a dense head",
    .paper = "Li et al.: Efficient Self-supervised Vision Transformers for Representation Learning, ICLR 2022",
    .setup = kd__esvit_setup,
    KD__DINO_DEF,
};
