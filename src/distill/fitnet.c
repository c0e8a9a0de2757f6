/* FitNet hints (Romero et al., ICLR 2015) as RepDistiller runs it
 * (distiller_zoo/FitNet.py HintLoss, models/util.py ConvReg, train_student.py
 * and helper/loops.py for the wiring, scripts/run_cifar_distill.sh for the
 * weights):
 *
 *     term = MSE(relu(bn(conv(f_s[hint_layer]))), f_t[hint_layer])
 *
 * with L = 1 * CE + 100 * term. The regressor ("regressor.conv",
 * "regressor.bn", RepDistiller's ConvReg) is trained jointly with the student
 * from the first step; its batch norm runs in the method's train/eval mode.
 * ConvReg picks the convolution from the map heights, as the official code:
 *   s_H == 2 t_H: Conv2d(s_C, t_C, 3, stride 2, pad 1);
 *   2 s_H == t_H: ConvTranspose2d(s_C, t_C, 4, stride 2, pad 1);
 *   s_H >= t_H:   Conv2d(s_C, t_C, (1 + s_H - t_H, 1 + s_W - t_W));
 * any other pair is refused (RepDistiller raises NotImplemented). kd has no
 * transposed-convolution op, so the transposed case is a kd_function built on
 * the backend's convolution kernels: its forward is conv2d backward-data, its
 * input gradient conv2d forward and its weight gradient conv2d
 * backward-weights with the roles of input and gradient swapped.
 * RepDistiller's separate "init" stage (--init_epochs) serves only AB, FT and
 * FSP (helper/pretrain.py), never FitNet, so there is none here. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "distill/methods.h"

typedef struct {
    int hint_layer; /* feature index on both nets (negative counts from the end) */
} kd__fitnet_args;

static const kd_method_arg kd__fitnet_arg_table[] = {
    KD__ARG(kd__fitnet_args, hint_layer, KD_ARG_INT, "2",
            "feature index of the hint on both nets (RepDistiller --hint_layer; negative counts from the end)"),
};

typedef enum { KD__FITNET_CONV = 0, KD__FITNET_CONVT } kd__fitnet_kind;

typedef struct {
    kd__fitnet_kind kind;
    int s_layer, t_layer;  /* resolved feature indices */
    int64_t s_shape[3];    /* (C, H, W) of the student's hint map */
    int64_t t_shape[3];    /* (C, H, W) of the teacher's hint map */
    kd_tensor *conv_w;     /* conv (t_C, s_C, KH, KW); transposed conv (s_C, t_C, 4, 4) */
    kd_tensor *conv_b;     /* (t_C) */
    kd_conv2d_params conv; /* stride/pad of the conv (or of the conv the transposed one inverts) */
    kd_bn_layer bn;        /* BatchNorm2d(t_C) */
} kd__fitnet_state;

/* ------------------------------------------------ transposed convolution */

/* Parameters of the transposed convolution: those of the convolution whose
 * data gradient it is (that convolution maps (N, t_C, OH, OW) to
 * (N, s_C, H, W) with weight (s_C, t_C, KH, KW)). */
typedef struct {
    kd_conv2d_params p;
} kd__convt_params;

/* y (N, O, OH, OW) = conv_transpose(x (N, C, H, W), w (C, O, KH, KW)) + b (O). */
static kd_status kd__convt_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                               void **saved) {
    (void)n_in, (void)saved;
    const kd__convt_params *cp = params;
    kd_backend *be = kd_graph_backend(g);
    KD_TRY(be->conv2d_backward_data(be, &cp->p, in[0], in[1], out, 0));
    int64_t N = out->shape[0], O = out->shape[1], HW = out->shape[2] * out->shape[3];
    const float *b = kd_f32(in[2]);
    float *y = kd_f32(out);
#pragma omp parallel for collapse(2) schedule(static) if (N * O * HW >= 32768)
    for (int64_t n = 0; n < N; n++)
        for (int64_t o = 0; o < O; o++) {
            float *row = y + (n * O + o) * HW;
            for (int64_t i = 0; i < HW; i++) row[i] += b[o];
        }
    return KD_OK;
}

static kd_status kd__convt_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                               const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)saved, (void)n_in;
    const kd__convt_params *cp = params;
    kd_backend *be = kd_graph_backend(g);
    if (gin[0]) {
        /* d x = conv2d(d y, w): the forward of the convolution the transposed
         * one is the data gradient of. */
        kd_tensor *tmp = kd_graph_tensor(g, KD_F32, 4, in[0]->shape);
        if (!tmp) return kd_graph_status(g);
        KD_TRY(be->conv2d_forward(be, &cp->p, gout, in[1], NULL, tmp));
        float *d = kd_f32(gin[0]);
        const float *t = kd_f32(tmp);
        int64_t n = kd_tensor_numel(tmp);
#pragma omp parallel for schedule(static) if (n >= 32768)
        for (int64_t i = 0; i < n; i++) d[i] += t[i];
    }
    if (gin[1]) /* d w: that convolution's weight gradient, with x as its output gradient and d y as its input. */
        KD_TRY(be->conv2d_backward_weights(be, &cp->p, in[0], gout, gin[1], NULL, 1));
    if (gin[2]) {
        int64_t N = out->shape[0], O = out->shape[1], HW = out->shape[2] * out->shape[3];
        const float *dy = kd_f32(gout);
        float *db = kd_f32(gin[2]);
#pragma omp parallel for schedule(static) if (N * O * HW >= 32768)
        for (int64_t o = 0; o < O; o++) {
            double s = 0;
            for (int64_t n = 0; n < N; n++) {
                const float *row = dy + (n * O + o) * HW;
                for (int64_t i = 0; i < HW; i++) s += row[i];
            }
            db[o] += (float)s;
        }
    }
    return KD_OK;
}

static const kd_function kd__convt_fn = {"fitnet_conv_transpose2d", kd__convt_fwd, kd__convt_bwd};

/* ------------------------------------------------------------ setup */

static kd_status kd__fitnet_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__fitnet_args *a = kd_method_args(m);
    kd__fitnet_state *st = kd_method_state(m);
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    KD_TRY(kd__feat_indices(shp, a->hint_layer, "fitnet.hint_layer", &st->s_layer, &st->t_layer));
    char bs[96], bt[96];
    kd__shape_text(s->feat_ndim[st->s_layer], s->feat[st->s_layer], bs, sizeof bs);
    kd__shape_text(t->feat_ndim[st->t_layer], t->feat[st->t_layer], bt, sizeof bt);
    if (s->feat_ndim[st->s_layer] != 4 || t->feat_ndim[st->t_layer] != 4)
        return kd_error(KD_ERR_SHAPE,
                        "fitnet.hint_layer %d selects student feature %s and teacher feature %s: both must be "
                        "(N, C, H, W) maps",
                        a->hint_layer, bs, bt);
    const int64_t *fs = s->feat[st->s_layer], *ft = t->feat[st->t_layer];
    int64_t sC = fs[1], sH = fs[2], sW = fs[3], tC = ft[1], tH = ft[2], tW = ft[3];
    int64_t kh, kw, oh, ow;
    if (sH == 2 * tH) {
        st->kind = KD__FITNET_CONV;
        kh = kw = 3;
        st->conv = (kd_conv2d_params){{2, 2}, {1, 1}, {1, 1}, 1, 0};
        oh = kd_conv_out_size(sH, 3, 2, 1, 1);
        ow = kd_conv_out_size(sW, 3, 2, 1, 1);
    } else if (2 * sH == tH) {
        st->kind = KD__FITNET_CONVT;
        kh = kw = 4;
        st->conv = (kd_conv2d_params){{2, 2}, {1, 1}, {1, 1}, 1, 0};
        oh = 2 * sH; /* (H - 1) * stride - 2 * pad + kernel */
        ow = 2 * sW;
    } else if (sH >= tH && sW >= tW) {
        st->kind = KD__FITNET_CONV;
        kh = 1 + sH - tH;
        kw = 1 + sW - tW;
        st->conv = (kd_conv2d_params){{1, 1}, {0, 0}, {1, 1}, 1, 0};
        oh = tH;
        ow = tW;
    } else {
        return kd_error(KD_ERR_SHAPE,
                        "fitnet: the student's hint map %s is smaller than the teacher's %s and not half its size "
                        "(fitnet.hint_layer %d): RepDistiller's ConvReg cannot bridge them",
                        bs, bt, a->hint_layer);
    }
    if (oh != tH || ow != tW)
        return kd_error(KD_ERR_SHAPE,
                        "fitnet: the regressor maps the student's hint map %s to %lldx%lld, not the teacher's %s "
                        "(fitnet.hint_layer %d)",
                        bs, (long long)oh, (long long)ow, bt, a->hint_layer);
    st->s_shape[0] = sC, st->s_shape[1] = sH, st->s_shape[2] = sW;
    st->t_shape[0] = tC, st->t_shape[1] = tH, st->t_shape[2] = tW;
    /* PyTorch's default init: weight and bias U(+-1/sqrt(fan_in)), fan_in =
     * size(1) * KH * KW (for a transposed conv size(1) is its output channels). */
    kd_param_list *pl = kd_method_params(m);
    int64_t ws[4] = {tC, sC, kh, kw};
    if (st->kind == KD__FITNET_CONVT) ws[0] = sC, ws[1] = tC;
    KD_TRY(kd_params_new(pl, "regressor.conv", "weight", KD_F32, 4, ws, KD_PARAM_WEIGHT, &st->conv_w));
    KD_TRY(kd_params_new(pl, "regressor.conv", "bias", KD_F32, 1, &tC, KD_PARAM_NO_DECAY, &st->conv_b));
    KD_TRY(kd_bn_layer_init(&st->bn, pl, "regressor.bn", tC));
    kd_rng r;
    kd__method_rng(m, "regressor", &r);
    float bound = 1.0f / sqrtf((float)kd_fan_in(st->conv_w));
    kd_init_uniform(st->conv_w, bound, &r);
    kd_init_uniform(st->conv_b, bound, &r);
    return KD_OK;
}

/* ------------------------------------------------------------ term */

static kd_status kd__fitnet_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    kd__fitnet_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    kd_tensor *fs = kd_method_feat(g, &ctx->s, st->s_layer, 0);
    kd_tensor *ft = kd_method_feat(g, &ctx->t, st->t_layer, 0);
    KD_TRY(kd_graph_status(g));
    if (!fs || !ft) return kd_error(KD_ERR_INVALID, "fitnet: the hint features are missing");
    int ok = fs->ndim == 4 && ft->ndim == 4 && fs->shape[0] == ft->shape[0];
    for (int d = 0; ok && d < 3; d++) ok = fs->shape[1 + d] == st->s_shape[d] && ft->shape[1 + d] == st->t_shape[d];
    if (!ok) {
        char bs[96], bt[96];
        return kd_error(KD_ERR_SHAPE,
                        "fitnet: hint features %s (student) and %s (teacher) differ from the shapes the regressor "
                        "was built for (fitnet.hint_layer)",
                        kd_shape_str(fs, bs, sizeof bs), kd_shape_str(ft, bt, sizeof bt));
    }
    kd_tensor *y;
    if (st->kind == KD__FITNET_CONVT) {
        kd__convt_params cp = {st->conv};
        cp.p.bf16 = kd_graph_precision(g) == KD_BF16;
        kd_tensor *in[3] = {fs, st->conv_w, st->conv_b};
        int64_t ys[4] = {fs->shape[0], st->t_shape[0], st->t_shape[1], st->t_shape[2]};
        y = kd_function_apply(g, &kd__convt_fn, &cp, sizeof cp, 3, in, 4, ys);
    } else {
        y = kd_conv2d(g, fs, st->conv_w, st->conv_b, &st->conv);
    }
    y = kd_relu(g, kd_bn_layer_forward(g, &st->bn, y, kd_method_training(m)));
    *out = kd_mse(g, kd_graph_to_strided(g, y), ft);
    return kd_graph_status(g);
}

const kd_method_def kd__method_fitnet = {
    .name = "fitnet",
    .summary = "FitNet hints: MSE between ConvReg(student feat[hint_layer]) and the teacher's feat[hint_layer]",
    .paper = "Romero, Ballas, Kahou, Chassang, Gatta, Bengio: FitNets: Hints for Thin Deep Nets, ICLR 2015",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 100.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(kd__fitnet_arg_table),
    .args_size = sizeof(kd__fitnet_args),
    .state_size = sizeof(kd__fitnet_state),
    .setup = kd__fitnet_setup,
    .term = kd__fitnet_term,
};
