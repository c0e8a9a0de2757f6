/* SSKD: Knowledge Distillation Meets Self-Supervision (Xu et al., ECCV 2020),
 * as the official code runs it (xuguodong03/SSKD: cifar.py, wrapper.py,
 * student.py; METHODS.md section 3).
 *
 * Data (cifar.py): each image is flipped with probability 0.5 once, then
 * turned by 0, 90, 180 and 270 degrees (np.rot90), and each of the four gets
 * its own RandomCrop(32, padding 4) and no further flip. Here: 4 views, the
 * shared flip of the loader (kd_transform_cfg.hflip_shared) and the rotation
 * geometry kd_geometry_rot90. A batch of B images becomes the 4B batch
 * interleaved per image (image 0 at 0, 90, 180, 270, then image 1, ...),
 * which both nets see at once (the student in train mode: its batch norms
 * take the statistics of all 4B).
 *
 * Heads (wrapper.py): proj_head = Linear(d, d) -> ReLU -> Linear(d, d) on
 * the flattened feat[-1], "ss_s.proj_head.{0,2}.{weight,bias}" on the
 * student (trained with it, a module of the method) and
 * "ss_t.proj_head.{0,2}.*" on the teacher (buffers: frozen in stage 2).
 *
 * Stage 1 (student.py, the loop before the student's): the teacher's head
 * alone, backbone frozen and in eval mode, SGD lr 0.05 momentum 0.9 weight
 * decay 5e-4 for 60 epochs, lr x0.1 at 30 and 45; loss CE(simi, source),
 * simi (3B, B) the cosine similarities between the projections of the 3B
 * rotated views and of the B unrotated ones, source = the image index, no
 * temperature. The prepare hook runs it, writes the head to
 * <run>/sskd_teacher_head.safetensors (atomically) and reuses that file, or
 * the one named by sskd.teacher_head, when present.
 *
 * Stage 2 (student.py), with nor = unrotated rows, aug = rotated rows:
 *     L = 0.1 CE(s_nor, y) + 0.9 KL_4(s_nor || t_nor)
 *       + 2.7 KL_4(s_aug || t_aug)[tf-kept rows] + 10 KL_0.5(s_simi || t_simi)[ss-kept rows]
 * each KL F.kl_div(batchmean) * T^2, the batch mean over the rows it is
 * given (B, then the kept rows). Keeping: the rank of the true label in the
 * teacher's aug output (of the source index in t_simi's row); every row the
 * teacher gets right (rank 0) is kept, plus the floor(ratio * #wrong)
 * best-ranked wrong rows (ratio_tf 1.0, ratio_ss 0.75).
 *
 * Weights: gamma = 0.1 (CE), alpha = 0.9 (KL at T = 4), and beta = 1
 * multiplies the two self-supervised terms, whose own weights are
 * sskd.tf_weight (2.7) and sskd.ss_weight (10). Terms: "ce", "kl",
 * "sskd_tf", "sskd_ss".
 *
 * Deviations (documented where they act): ranks break ties by class (row)
 * index, where torch.argsort's order is unspecified; a KL over no kept row
 * is 0 (torch: NaN); ratios and stage-1 hyperparameters are read back as
 * the decimal the user wrote (float settings, %.6g) so that floor(ratio *
 * #wrong) and the SGD constants equal Python's. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/methods.h"
#include "kd/io.h"
#include "kd/optim.h"

typedef struct {
    float tf_weight, ss_weight; /* weights of the two self-supervised terms (times beta) */
    float tf_T, ss_T;           /* their temperatures */
    float ratio_tf, ratio_ss;   /* share of the teacher's wrong rows kept */
    int head_epochs;            /* stage 1 */
    float head_lr, head_momentum, head_weight_decay, head_gamma;
    char head_milestones[KD_METHOD_ARG_STR];
    char teacher_head[KD_METHOD_ARG_STR]; /* a trained teacher head to use instead of stage 1 */
} kd__sskd_args;

static const kd_method_arg kd__sskd_arg_table[] = {
    KD__ARG(kd__sskd_args, tf_weight, KD_ARG_FLOAT, "2.7",
            "weight of KL on the rotated views (student.py --tf-weight; times beta)"),
    KD__ARG(kd__sskd_args, ss_weight, KD_ARG_FLOAT, "10",
            "weight of KL on the similarity rows (student.py --ss-weight; times beta)"),
    KD__ARG(kd__sskd_args, tf_T, KD_ARG_FLOAT, "4", "temperature of the rotated-view KL (--tf-T)"),
    KD__ARG(kd__sskd_args, ss_T, KD_ARG_FLOAT, "0.5", "temperature of the similarity KL (--ss-T)"),
    KD__ARG(kd__sskd_args, ratio_tf, KD_ARG_FLOAT, "1.0",
            "share of the teacher's wrong rotated rows kept, best-ranked first (--ratio-tf)"),
    KD__ARG(kd__sskd_args, ratio_ss, KD_ARG_FLOAT, "0.75",
            "share of the teacher's wrong similarity rows kept, best-ranked first (--ratio-ss)"),
    KD__ARG(kd__sskd_args, head_epochs, KD_ARG_INT, "60",
            "stage 1: epochs of the teacher's self-supervision head (--t-epoch); 0 needs a trained head"),
    KD__ARG(kd__sskd_args, head_lr, KD_ARG_FLOAT, "0.05", "stage 1: SGD learning rate (--t-lr)"),
    KD__ARG(kd__sskd_args, head_momentum, KD_ARG_FLOAT, "0.9", "stage 1: SGD momentum (--momentum)"),
    KD__ARG(kd__sskd_args, head_weight_decay, KD_ARG_FLOAT, "5e-4", "stage 1: SGD weight decay (--weight-decay)"),
    KD__ARG(kd__sskd_args, head_milestones, KD_ARG_STRING, "30,45",
            "stage 1: epochs at which the learning rate is multiplied by head_gamma (--t-milestones)"),
    KD__ARG(kd__sskd_args, head_gamma, KD_ARG_FLOAT, "0.1", "stage 1: learning-rate decay factor (--gamma)"),
    KD__ARG(kd__sskd_args, teacher_head, KD_ARG_STRING, "",
            "a trained teacher head (safetensors, ss_t.proj_head.*) to use instead of stage 1"),
};

typedef struct {
    kd_linear_layer s0, s2; /* student head: (d_s, d_s) twice */
    kd_linear_layer t0, t2; /* teacher head: (d_t, d_t) twice, buffers */
    int64_t d_s, d_t;
    int milestones[KD_MAX_MILESTONES];
    int n_milestones;
} kd__sskd_state;

#define KD__SSKD_ARTIFACT "sskd_teacher_head.safetensors"
/* torch.nn.functional.cosine_similarity's eps: each norm is clamped to it. */
#define KD__SSKD_COS_EPS 1e-8f

/* The decimal a float setting was written as (0.7f -> 0.7), for constants
 * Python uses as doubles. */
static double kd__sskd_dec(float x) {
    char buf[32];
    snprintf(buf, sizeof buf, "%.6g", (double)x);
    return strtod(buf, NULL);
}

static int64_t kd__sskd_dim(const kd_net_shapes *ns) {
    int64_t d = 1;
    for (int i = 1; i < ns->feat_ndim[ns->n_feat - 1]; i++) d *= ns->feat[ns->n_feat - 1][i];
    return d;
}

/* A Linear(d, d) -> ReLU -> Linear(d, d) head registered as "<prefix>.proj_head.{0,2}",
 * trainable or as buffers, with PyTorch's default initialisation. */
static kd_status kd__sskd_head_init(kd_method *m, kd_param_list *pl, const char *prefix, int64_t d, int buffers,
                                    kd_linear_layer *l0, kd_linear_layer *l2) {
    kd_linear_layer *ls[2] = {l0, l2};
    const char *names[2] = {"proj_head.0", "proj_head.2"};
    for (int i = 0; i < 2; i++) {
        char p[64];
        snprintf(p, sizeof p, "%s.%s", prefix, names[i]);
        if (!buffers) {
            KD_TRY(kd_linear_layer_init(ls[i], pl, p, d, d, 1));
        } else {
            int64_t ws[2] = {d, d};
            KD_TRY(kd_params_new(pl, p, "weight", KD_F32, 2, ws, KD_PARAM_BUFFER, &ls[i]->weight));
            KD_TRY(kd_params_new(pl, p, "bias", KD_F32, 1, &d, KD_PARAM_BUFFER, &ls[i]->bias));
        }
    }
    if (m) {
        kd_rng r;
        kd__method_rng(m, prefix, &r);
        kd_linear_layer_default_init(l0, &r);
        kd_linear_layer_default_init(l2, &r);
    }
    return KD_OK;
}

static kd_tensor *kd__sskd_head(kd_graph *g, const kd_linear_layer *l0, const kd_linear_layer *l2, kd_tensor *f) {
    return kd_linear_layer_forward(g, l2, kd_relu(g, kd_linear_layer_forward(g, l0, f)));
}

static kd_status kd__sskd_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__sskd_args *a = kd_method_args(m);
    kd__sskd_state *st = kd_method_state(m);
    if (!(a->tf_T > 0) || !(a->ss_T > 0))
        return kd_error(KD_ERR_INVALID, "sskd.tf_T %g and sskd.ss_T %g must be > 0", a->tf_T, a->ss_T);
    if (!(a->ratio_tf >= 0 && a->ratio_tf <= 1) || !(a->ratio_ss >= 0 && a->ratio_ss <= 1))
        return kd_error(KD_ERR_INVALID, "sskd.ratio_tf %g and sskd.ratio_ss %g must be in [0, 1]", a->ratio_tf,
                        a->ratio_ss);
    if (a->head_epochs < 0) return kd_error(KD_ERR_INVALID, "sskd.head_epochs %d must be >= 0", a->head_epochs);
    /* Milestones "30,45": increasing non-negative epochs. */
    st->n_milestones = 0;
    for (const char *p = a->head_milestones; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 1000000000L || st->n_milestones == KD_MAX_MILESTONES ||
            (st->n_milestones && v <= st->milestones[st->n_milestones - 1]) || (*end && *end != ','))
            return kd_error(KD_ERR_INVALID,
                            "invalid sskd.head_milestones '%s': expected up to %d increasing epochs such as 30,45",
                            a->head_milestones, KD_MAX_MILESTONES);
        st->milestones[st->n_milestones++] = (int)v;
        p = *end ? end + 1 : end;
    }
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    if (s->n_feat < 1 || t->n_feat < 1)
        return kd_error(KD_ERR_SHAPE, "sskd: needs the pooled embedding feat[-1] of both nets");
    st->d_s = kd__sskd_dim(s);
    st->d_t = kd__sskd_dim(t);
    kd_param_list *pl = kd_method_params(m);
    KD_TRY(kd__sskd_head_init(m, pl, "ss_s", st->d_s, 0, &st->s0, &st->s2));
    KD_TRY(kd__sskd_head_init(m, pl, "ss_t", st->d_t, 1, &st->t0, &st->t2));
    return KD_OK;
}

/* ------------------------------------------------------------ views */

static const int kd__sskd_quarters[4] = {0, 1, 2, 3};

/* View v: the image after the shared flip, turned v quarter turns, then the
 * run's crop without a flip of its own. */
static kd_status kd__sskd_view_transform(const kd_method *m, int view, kd_transform_cfg *tf) {
    (void)m;
    if (view < 0 || view > 3) return kd_error(KD_ERR_INVALID, "sskd has 4 views, not view %d", view);
    tf->hflip_shared = tf->hflip;
    tf->hflip = 0;
    if (view > 0) {
        tf->geometry = kd_geometry_rot90;
        tf->geometry_ctx = &kd__sskd_quarters[view];
    }
    return KD_OK;
}

/* The 4B batch (4B, C, H, W) of views x[0..3], each (B, C, H, W),
 * interleaved per image: row 4i + v is view v of image i. */
static kd_tensor *kd__sskd_interleave(kd_graph *g, kd_tensor *const *x) {
    if (!x[0]) return NULL;
    int64_t B = x[0]->shape[0], C = x[0]->shape[1], H = x[0]->shape[2], W = x[0]->shape[3];
    kd_tensor *parts[4];
    int64_t ps[3] = {B, 1, C * H * W};
    for (int v = 0; v < 4; v++) parts[v] = kd_reshape(g, kd_graph_to_strided(g, x[v]), 3, ps);
    int64_t os[4] = {4 * B, C, H, W};
    return kd_reshape(g, kd_concat(g, parts, 4, 1), 4, os);
}

/* Rows of x (4B, D) into the unrotated ones (B, D) and the rotated ones
 * (3B, D), in order (student.py's nor_index and aug_index). */
static void kd__sskd_split(kd_graph *g, kd_tensor *x, kd_tensor **nor, kd_tensor **aug) {
    *nor = *aug = NULL;
    if (!x) return;
    int64_t B = x->shape[0] / 4, D = x->shape[1];
    int64_t s3[3] = {B, 4, D};
    kd_tensor *r = kd_reshape(g, x, 3, s3);
    int64_t sn[2] = {B, D}, sa[2] = {3 * B, D};
    *nor = kd_reshape(g, kd_slice(g, r, 1, 0, 1), 2, sn);
    *aug = kd_reshape(g, kd_slice(g, r, 1, 1, 4), 2, sa);
}

/* cosine_similarity(aug_i, nor_j) for aug (3B, d), nor (B, d): (3B, B). */
static kd_tensor *kd__sskd_simi(kd_graph *g, kd_tensor *aug, kd_tensor *nor) {
    return kd_matmul(g, kd_l2_normalize(g, aug, KD__SSKD_COS_EPS),
                     kd_transpose(g, kd_l2_normalize(g, nor, KD__SSKD_COS_EPS), 0, 1));
}

/* ------------------------------------------------------------ keeping */

static int kd__sskd_cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int64_t kd__sskd_keep(const float *scores, int64_t R, int64_t K, const int32_t *target, double ratio, uint8_t *keep,
                      int64_t *work) {
    int64_t n_wrong = 0;
    for (int64_t r = 0; r < R; r++) {
        const float *row = scores + r * K;
        int32_t y = target[r];
        float sy = row[y];
        int64_t rank = 0; /* the true entry's place in a descending sort, ties by index */
        for (int64_t j = 0; j < K; j++) rank += row[j] > sy || (row[j] == sy && j < y);
        keep[r] = rank == 0;
        if (rank) work[n_wrong++] = rank * R + r; /* sorts by rank, then row */
    }
    int64_t n_keep = (int64_t)floor((double)n_wrong * ratio);
    if (n_keep > n_wrong) n_keep = n_wrong;
    qsort(work, (size_t)n_wrong, sizeof *work, kd__sskd_cmp_i64);
    for (int64_t i = 0; i < n_keep; i++) keep[work[i] % R] = 1;
    return R - n_wrong + n_keep;
}

/* ------------------------------------------------------------ kept KL */

typedef struct {
    float T;
    int64_t n_keep;
    const uint8_t *keep; /* (R), arena memory of the step */
} kd__sskd_kl_params;

/* Row r of z (K): log-softmax(z / T) into out (K), in double. */
static void kd__sskd_log_softmax(const float *z, int64_t K, double T, double *out) {
    double mx = -INFINITY;
    for (int64_t j = 0; j < K; j++) mx = fmax(mx, (double)z[j] / T);
    double s = 0;
    for (int64_t j = 0; j < K; j++) s += exp((double)z[j] / T - mx);
    double ls = mx + log(s);
    for (int64_t j = 0; j < K; j++) out[j] = (double)z[j] / T - ls;
}

/* F.kl_div(log_softmax(s / T)[keep], softmax(t / T)[keep], 'batchmean') * T^2
 * for s, t (R, K): the sum over kept rows divided by their number. */
static kd_status kd__sskd_kl_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                                 void **saved) {
    (void)n_in, (void)saved;
    const kd__sskd_kl_params *p = params;
    KD_TRY(kd__need_contiguous("sskd kept KL", in, 2));
    int64_t R = in[0]->shape[0], K = in[0]->shape[1];
    double *ls = kd_function_alloc(g, 2 * (size_t)K * sizeof *ls);
    if (!ls) return kd_graph_status(g);
    double *lt = ls + K, T = p->T, sum = 0;
    for (int64_t r = 0; r < R; r++) {
        if (!p->keep[r]) continue;
        kd__sskd_log_softmax(kd_f32(in[0]) + r * K, K, T, ls);
        kd__sskd_log_softmax(kd_f32(in[1]) + r * K, K, T, lt);
        for (int64_t j = 0; j < K; j++) {
            double pt = exp(lt[j]);
            if (pt > 0) sum += pt * (lt[j] - ls[j]);
        }
    }
    kd_f32(out)[0] = p->n_keep ? (float)(sum / (double)p->n_keep * T * T) : 0.0f;
    return KD_OK;
}

static kd_status kd__sskd_kl_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                                 const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)saved, (void)n_in, (void)out;
    const kd__sskd_kl_params *p = params;
    if (!p->n_keep) return KD_OK;
    int64_t R = in[0]->shape[0], K = in[0]->shape[1];
    double *ls = kd_function_alloc(g, 2 * (size_t)K * sizeof *ls);
    if (!ls) return kd_graph_status(g);
    double *lt = ls + K, T = p->T;
    /* d/dz of T^2 / n * sum_j p_j (log p_j - log q_j) with q = softmax(s/T), p = softmax(t/T):
     * d/ds_j = T / n * (q_j - p_j); d/dt_j = T / n * p_j (log p_j - log q_j - KL_row). */
    double c = (double)kd_f32((kd_tensor *)gout)[0] * T / (double)p->n_keep;
    for (int64_t r = 0; r < R; r++) {
        if (!p->keep[r]) continue;
        kd__sskd_log_softmax(kd_f32(in[0]) + r * K, K, T, ls);
        kd__sskd_log_softmax(kd_f32(in[1]) + r * K, K, T, lt);
        if (gin[0]) {
            float *gs = kd_f32(gin[0]) + r * K;
            for (int64_t j = 0; j < K; j++) gs[j] += (float)(c * (exp(ls[j]) - exp(lt[j])));
        }
        if (gin[1]) {
            double kl = 0;
            for (int64_t j = 0; j < K; j++) {
                double pt = exp(lt[j]);
                if (pt > 0) kl += pt * (lt[j] - ls[j]);
            }
            float *gt = kd_f32(gin[1]) + r * K;
            for (int64_t j = 0; j < K; j++) {
                double pt = exp(lt[j]);
                gt[j] += (float)(c * pt * (lt[j] - ls[j] - kl));
            }
        }
    }
    return KD_OK;
}

static const kd_function kd__sskd_kl_fn = {"sskd_kept_kl", kd__sskd_kl_fwd, kd__sskd_kl_bwd};

/* The kept KL of s against t (R, K) at T, the rows kept by ranking target
 * in t's rows with ratio. t is an op output of this step (contiguous). */
static kd_tensor *kd__sskd_kept_kl(kd_graph *g, kd_tensor *s, kd_tensor *t, const int32_t *target, double ratio,
                                   float T) {
    if (!s || !t) return NULL;
    int64_t R = t->shape[0], K = t->shape[1];
    uint8_t *keep = kd_function_alloc(g, (size_t)R);
    int64_t *work = kd_function_alloc(g, (size_t)R * sizeof *work);
    if (!keep || !work) return NULL;
    kd__sskd_kl_params p = {T, 0, keep};
    p.n_keep = kd__sskd_keep(kd_f32(t), R, K, target, ratio, keep, work);
    kd_tensor *in[2] = {s, t};
    return kd_function_apply(g, &kd__sskd_kl_fn, &p, sizeof p, 2, in, 0, NULL);
}

/* ------------------------------------------------------------ stage 2 */

/* The loss on the 4B outputs in ctx->s and ctx->t (logits (4B, K), feat[-1]
 * (4B, ...)) and the B labels. */
static kd_status kd__sskd_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    const kd__sskd_args *a = kd_method_args(m);
    kd__sskd_state *st = kd_method_state(m);
    const kd_distill_cfg *c = kd_method_cfg(m);
    kd_graph *g = ctx->g;
    const int64_t B = ctx->batch->n;
    if (!ctx->s.logits || !ctx->t.logits) return kd_error(KD_ERR_INVALID, "sskd needs the student and the teacher");
    if (!ctx->batch->y) return kd_error(KD_ERR_INVALID, "sskd needs labels");
    kd_tensor *sl = kd_graph_to_strided(g, ctx->s.logits), *tl = kd_graph_to_strided(g, ctx->t.logits);
    kd_tensor *sf = kd_method_feat(g, &ctx->s, -1, 0), *tf = kd_method_feat(g, &ctx->t, -1, 0);
    KD_TRY(kd_graph_status(g));
    if (sl->shape[0] != 4 * B || tl->shape[0] != 4 * B || sf->shape[0] != 4 * B || tf->shape[0] != 4 * B)
        return kd_error(KD_ERR_SHAPE, "sskd: outputs have %lld rows; 4 views of %lld images make %lld",
                        (long long)sl->shape[0], (long long)B, (long long)(4 * B));
    int64_t fs[2] = {4 * B, st->d_s}, ft[2] = {4 * B, st->d_t};
    kd_tensor *s_rep = kd__sskd_head(g, &st->s0, &st->s2, kd_reshape(g, sf, 2, fs));
    int prev = kd_graph_set_grad_enabled(g, 0);
    kd_tensor *t_rep = kd__sskd_head(g, &st->t0, &st->t2, kd_reshape(g, tf, 2, ft));
    kd_graph_set_grad_enabled(g, prev);
    kd_tensor *s_nor, *s_aug, *t_nor, *t_aug, *sr_nor, *sr_aug, *tr_nor, *tr_aug;
    kd__sskd_split(g, sl, &s_nor, &s_aug);
    kd__sskd_split(g, tl, &t_nor, &t_aug);
    kd__sskd_split(g, s_rep, &sr_nor, &sr_aug);
    prev = kd_graph_set_grad_enabled(g, 0);
    kd__sskd_split(g, t_rep, &tr_nor, &tr_aug);
    kd_tensor *t_simi = kd__sskd_simi(g, tr_aug, tr_nor);
    kd_graph_set_grad_enabled(g, prev);
    kd_tensor *s_simi = kd__sskd_simi(g, sr_aug, sr_nor);
    KD_TRY(kd_graph_status(g));
    /* Targets of the rotated rows: the image's label (tf), its index (ss). */
    int32_t *tgt = kd_function_alloc(g, 6 * (size_t)B * sizeof *tgt);
    if (!tgt) return kd_graph_status(g);
    const int32_t *y = (const int32_t *)ctx->batch->y->data;
    for (int64_t r = 0; r < 3 * B; r++) {
        tgt[r] = y[r / 3];
        tgt[3 * B + r] = (int32_t)(r / 3);
    }
    const double beta = c->beta;
    if (c->gamma != 0)
        KD_TRY(kd_loss_terms_add(terms, "ce",
                                 kd_scale(g, kd_cross_entropy(g, s_nor, ctx->batch->y, c->label_smoothing), c->gamma)));
    if (c->alpha != 0) KD_TRY(kd_loss_terms_add(terms, "kl", kd_scale(g, kd_kl_div(g, s_nor, t_nor, c->T), c->alpha)));
    if (beta != 0 && a->tf_weight != 0)
        KD_TRY(kd_loss_terms_add(
            terms, "sskd_tf",
            kd_scale(g, kd__sskd_kept_kl(g, s_aug, t_aug, tgt, kd__sskd_dec(a->ratio_tf), a->tf_T),
                     (float)(beta * a->tf_weight))));
    if (beta != 0 && a->ss_weight != 0)
        KD_TRY(kd_loss_terms_add(
            terms, "sskd_ss",
            kd_scale(g, kd__sskd_kept_kl(g, s_simi, t_simi, tgt + 3 * B, kd__sskd_dec(a->ratio_ss), a->ss_T),
                     (float)(beta * a->ss_weight))));
    return kd_graph_status(g);
}

/* Both nets on the interleaved 4B batch (teacher in eval mode without
 * gradient), then the loss; the student's logits of the unrotated views are
 * left in ctx->s.logits for the trainer's accuracy. */
static kd_status kd__sskd_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    kd_graph *g = ctx->g;
    if (ctx->batch->n_views != 4 || !ctx->teacher)
        return kd_error(KD_ERR_INVALID, "sskd needs a teacher and 4 views of each image (the batch has %d)",
                        ctx->batch->n_views);
    memset(&ctx->s, 0, sizeof ctx->s);
    memset(&ctx->t, 0, sizeof ctx->t);
    kd_tensor *x = kd__sskd_interleave(g, ctx->batch->x);
    KD_TRY(kd_graph_status(g));
    int prev = kd_graph_set_grad_enabled(g, 0);
    kd_status s = kd_model_forward(ctx->teacher, g, x, 0, &ctx->t);
    kd_graph_set_grad_enabled(g, prev);
    KD_TRY(s);
    KD_TRY(kd_model_forward(ctx->student, g, x, 0, &ctx->s));
    KD_TRY(kd_method_loss(m, ctx, terms));
    kd_tensor *nor, *aug;
    kd__sskd_split(g, kd_graph_to_strided(g, ctx->s.logits), &nor, &aug);
    ctx->s.logits = nor;
    return kd_graph_status(g);
}

/* ------------------------------------------------------------ stage 1 */

kd_status kd__sskd_head_loss(kd_graph *g, const kd_linear_layer *l0, const kd_linear_layer *l2, kd_tensor *feat,
                             kd_tensor **loss, int64_t *hits) {
    *loss = NULL;
    int64_t N = feat->shape[0], B = N / 4, D = 1;
    for (int i = 1; i < feat->ndim; i++) D *= feat->shape[i];
    int64_t fs[2] = {N, D};
    kd_tensor *rep = kd__sskd_head(g, l0, l2, kd_reshape(g, feat, 2, fs)), *nor, *aug;
    kd__sskd_split(g, rep, &nor, &aug);
    kd_tensor *simi = kd__sskd_simi(g, aug, nor);
    int64_t R = 3 * B;
    kd_tensor *tgt = kd_graph_tensor(g, KD_I32, 1, &R);
    KD_TRY(kd_graph_status(g));
    for (int64_t r = 0; r < R; r++) ((int32_t *)tgt->data)[r] = (int32_t)(r / 3);
    *loss = kd_cross_entropy(g, simi, tgt, 0.0f);
    KD_TRY(kd_graph_status(g));
    if (hits) { /* top-1 of each row, ties by index */
        *hits = 0;
        for (int64_t r = 0; r < R; r++) {
            const float *row = kd_f32(simi) + r * B;
            int64_t best = 0;
            for (int64_t j = 1; j < B; j++)
                if (row[j] > row[best]) best = j;
            *hits += best == r / 3;
        }
    }
    return KD_OK;
}

/* Reads the teacher head from path into the state's ss_t buffers; a missing
 * tensor or a shape other than the teacher's (d_t, d_t) / (d_t) fails
 * naming the file, the setting and both shapes. */
static kd_status kd__sskd_load_head(kd_method *m, const char *path, const char *setting) {
    kd__sskd_state *st = kd_method_state(m);
    kd_st_file *f = NULL;
    kd_status s = kd_st_open(path, &f);
    if (s != KD_OK)
        return kd_error(s == KD_ERR_NOT_FOUND || s == KD_ERR_IO ? KD_ERR_INVALID : s, "%s: %s", setting,
                        kd_last_error());
    kd_tensor *ts[4] = {st->t0.weight, st->t0.bias, st->t2.weight, st->t2.bias};
    const char *names[4] = {"ss_t.proj_head.0.weight", "ss_t.proj_head.0.bias", "ss_t.proj_head.2.weight",
                            "ss_t.proj_head.2.bias"};
    for (int i = 0; i < 4 && s == KD_OK; i++) {
        const kd_st_entry *e = kd_st_find(f, names[i]);
        int same = e && e->dtype == KD_F32 && e->ndim == ts[i]->ndim;
        for (int d = 0; same && d < e->ndim; d++) same = e->shape[d] == ts[i]->shape[d];
        if (!same) {
            char want[64], got[64] = "absent";
            kd__shape_text(ts[i]->ndim, ts[i]->shape, want, sizeof want);
            if (e) kd__shape_text(e->ndim, e->shape, got, sizeof got);
            s = kd_error(KD_ERR_SHAPE,
                         "%s: the teacher head %s does not fit the teacher: %s is %s, the teacher's feat[-1] of "
                         "dimension %lld needs %s (remove the file or set sskd.teacher_head to a matching one)",
                         setting, path, names[i], got, (long long)st->d_t, want);
        } else {
            memcpy(ts[i]->data, e->data, e->nbytes);
        }
    }
    kd_st_close(f);
    return s;
}

/* Stage 1: trains the teacher head (SGD over a trainable copy, the teacher
 * frozen in eval mode) on the run's views and stores it in the ss_t
 * buffers. */
static kd_status kd__sskd_train_head(kd_method *m, const kd_prepare_ctx *pc) {
    const kd__sskd_args *a = kd_method_args(m);
    kd__sskd_state *st = kd_method_state(m);
    kd_param_list hl = {0};
    kd_linear_layer h0, h2;
    kd_graph *g = NULL;
    kd_optim *opt = NULL;
    kd_status s = kd__sskd_head_init(NULL, &hl, "ss_t", st->d_t, 0, &h0, &h2);
    if (s == KD_OK) s = kd_params_copy(&hl, kd_method_params(m)); /* the head's initial values */
    kd_optim_cfg oc = kd_optim_defaults(KD_OPTIM_SGD);
    oc.lr = kd__sskd_dec(a->head_lr);
    oc.momentum = kd__sskd_dec(a->head_momentum);
    oc.weight_decay = kd__sskd_dec(a->head_weight_decay);
    kd_param_group grp = {"", &hl, 1.0f};
    if (s == KD_OK) s = kd_optim_init(&opt, &grp, 1, &oc);
    if (s == KD_OK) s = kd_graph_init(&g, pc->be);
    kd_sched sc = {.kind = KD_SCHED_MULTISTEP, .base_lr = a->head_lr, .epochs = a->head_epochs,
                   .n_milestones = st->n_milestones, .gamma = a->head_gamma};
    memcpy(sc.milestones, st->milestones, sizeof sc.milestones);
    kd_tensor *views[4];
    for (int e = 0; e < a->head_epochs && s == KD_OK; e++) {
        /* Epochs -1, -2, ...: streams apart from the training epochs'. */
        s = kd_loader_start_epoch(pc->loader, -1 - (int64_t)e);
        double lsum = 0;
        int64_t seen = 0, hits = 0, step = 0;
        kd_batch b;
        int got = 0;
        while (s == KD_OK && step < pc->steps_per_epoch && (got = kd_loader_next(pc->loader, &b)) == 1) {
            kd_graph_reset(g);
            if (b.n_views != 4) {
                s = kd_error(KD_ERR_INVALID, "sskd stage 1: the loader makes %d views, not 4", b.n_views);
                break;
            }
            for (int v = 0; v < 4; v++) {
                int64_t xs[4] = {b.n, b.view_shape[v].c, b.view_shape[v].h, b.view_shape[v].w};
                views[v] = kd_graph_wrap(g, KD_F32, 4, xs, b.views[v]);
            }
            kd_tensor *x = kd__sskd_interleave(g, views);
            kd_model_out o;
            int prev = kd_graph_set_grad_enabled(g, 0);
            s = x ? kd_model_forward(pc->teacher, g, x, 0, &o) : kd_graph_status(g);
            kd_graph_set_grad_enabled(g, prev);
            kd_tensor *loss = NULL;
            int64_t h = 0;
            if (s == KD_OK) s = kd__sskd_head_loss(g, &h0, &h2, kd_method_feat(g, &o, -1, 0), &loss, &h);
            if (s == KD_OK && !isfinite(kd_f32(loss)[0]))
                s = kd_error(KD_ERR_NUMERIC, "sskd stage 1: the head loss became %g at epoch %d step %lld",
                             (double)kd_f32(loss)[0], e + 1, (long long)step + 1);
            if (s != KD_OK) break;
            kd_optim_zero_grad(opt);
            s = kd_backward(g, loss);
            kd_optim_set_lr(opt, kd_sched_lr(&sc, e, step, pc->steps_per_epoch));
            if (s == KD_OK) s = kd_optim_step(opt);
            lsum += (double)kd_f32(loss)[0] * 3.0 * (double)b.n;
            hits += h;
            seen += 3 * b.n;
            step++;
        }
        if (s == KD_OK && got < 0) s = (kd_status)got;
        if (s == KD_OK)
            kd_log_msg(KD_LOG_INFO, "sskd stage 1 (teacher head): epoch %d/%d  loss %.4f  rotation-to-source top1 %.2f%%",
                       e + 1, a->head_epochs, seen ? lsum / (double)seen : 0.0,
                       seen ? 100.0 * (double)hits / (double)seen : 0.0);
    }
    if (s == KD_OK) {
        kd_tensor *src[4] = {h0.weight, h0.bias, h2.weight, h2.bias};
        kd_tensor *dst[4] = {st->t0.weight, st->t0.bias, st->t2.weight, st->t2.bias};
        for (int i = 0; i < 4; i++) memcpy(dst[i]->data, src[i]->data, kd_tensor_nbytes(dst[i]));
    }
    kd_graph_free(g);
    kd_optim_free(opt);
    kd_params_free(&hl);
    return s;
}

/* Writes the teacher head to path atomically (temp file, fsync, rename). */
static kd_status kd__sskd_save_head(kd_method *m, const kd_prepare_ctx *pc, const char *path) {
    const kd__sskd_args *a = kd_method_args(m);
    kd__sskd_state *st = kd_method_state(m);
    kd_st_writer *w = NULL;
    KD_TRY(kd_st_writer_init(&w));
    kd_status s = KD_OK;
    kd_tensor *ts[4] = {st->t0.weight, st->t0.bias, st->t2.weight, st->t2.bias};
    const char *names[4] = {"ss_t.proj_head.0.weight", "ss_t.proj_head.0.bias", "ss_t.proj_head.2.weight",
                            "ss_t.proj_head.2.bias"};
    for (int i = 0; i < 4 && s == KD_OK; i++) s = kd_st_writer_add_tensor(w, names[i], ts[i]);
    char v[64];
    if (s == KD_OK && pc->teacher) s = kd_st_writer_set_meta(w, "teacher", kd_model_arch(pc->teacher));
    snprintf(v, sizeof v, "%d", a->head_epochs);
    if (s == KD_OK) s = kd_st_writer_set_meta(w, "head_epochs", v);
    snprintf(v, sizeof v, "%llu", (unsigned long long)pc->seed);
    if (s == KD_OK) s = kd_st_writer_set_meta(w, "seed", v);
    if (s == KD_OK) s = kd_st_writer_save(w, path);
    kd_st_writer_free(w);
    return s;
}

/* The teacher head before stage 2: sskd.teacher_head, else the run's
 * artifact, else (not on resume) stage 1 and the artifact. */
static kd_status kd__sskd_prepare(kd_method *m, const kd_prepare_ctx *pc) {
    const kd__sskd_args *a = kd_method_args(m);
    if (a->teacher_head[0]) {
        KD_TRY(kd__sskd_load_head(m, a->teacher_head, "sskd.teacher_head"));
        kd_log_msg(KD_LOG_INFO, "sskd: teacher head from %s (sskd.teacher_head)", a->teacher_head);
        return KD_OK;
    }
    char path[1100];
    snprintf(path, sizeof path, "%s/%s", pc->run_dir, KD__SSKD_ARTIFACT);
    if (kd_file_exists(path)) {
        KD_TRY(kd__sskd_load_head(m, path, "sskd"));
        kd_log_msg(KD_LOG_INFO, "sskd: teacher head from %s (stage 1 not repeated)", path);
        return KD_OK;
    }
    if (pc->resume) {
        kd_log_msg(KD_LOG_WARN, "sskd: %s is missing; the resumed run keeps the teacher head of its checkpoint", path);
        return KD_OK;
    }
    if (a->head_epochs == 0)
        return kd_error(KD_ERR_INVALID,
                        "sskd: the teacher has no trained self-supervision head: %s does not exist and "
                        "sskd.head_epochs is 0; set sskd.head_epochs > 0 to train one (stage 1) or "
                        "sskd.teacher_head=PATH to use a trained one",
                        path);
    if (!pc->teacher || !pc->loader || !pc->be)
        return kd_error(KD_ERR_INVALID, "sskd stage 1 needs the teacher, the backend and the training loader");
    kd_log_msg(KD_LOG_INFO, "sskd stage 1: training the teacher's head for %d epochs", a->head_epochs);
    KD_TRY(kd__sskd_train_head(m, pc));
    return kd__sskd_save_head(m, pc, path);
}

const kd_method_def kd__method_sskd = {
    .name = "sskd",
    .summary = "SSKD: KD + rotation views, kept KL on rotated logits and on self-supervised similarities",
    .paper = "Xu, Liu, Li, Loy: Knowledge Distillation Meets Self-Supervision, ECCV 2020",
    .gamma = 0.1f,
    .alpha = 0.9f,
    .beta = 1.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 4,
    .view_transform = kd__sskd_view_transform,
    .args = KD__ARGS(kd__sskd_arg_table),
    .args_size = sizeof(kd__sskd_args),
    .state_size = sizeof(kd__sskd_state),
    .setup = kd__sskd_setup,
    .step = kd__sskd_step,
    .loss = kd__sskd_loss,
    .prepare = kd__sskd_prepare,
};
