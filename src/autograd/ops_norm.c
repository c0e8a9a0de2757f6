/*
 * ops_norm.c: the transformer ops that run on backend kernels: layer norm
 * (layernorm_forward / layernorm_backward), exact GELU (eltwise GELU) and
 * batched matmul with optional transposes (gemm_batch). Each forward checks
 * shapes (the kernels assume them), runs the kernel and records a node; each
 * backward rule calls the backend with the accumulate flag of the gradient
 * buffer.
 */
#include "autograd/autograd_impl.h"

#include <math.h>
#include <string.h>

#define SHP(t, buf) kd_shape_str((t), (buf), sizeof(buf))

/* ---------------------------------------------------------- layer norm */

static int kd__ln_check_vec(kd_graph *g, const char *what, const kd_tensor *t, int64_t D,
                            const kd_tensor *x) {
    char bt[96], bx[96];
    if (!kd__check_f32(g, "layernorm", what, t)) return 0;
    if (t->ndim != 1 || t->shape[0] != D) {
        kd__fail(g, kd_error(KD_ERR_SHAPE, "layernorm: %s %s does not match input %s with %lld "
                                           "features (expected (%lld))",
                             what, SHP(t, bt), SHP(x, bx), (long long)D, (long long)D));
        return 0;
    }
    return 1;
}

kd_tensor *kd_layernorm(kd_graph *g, kd_tensor *x, kd_tensor *gamma, kd_tensor *beta, float eps) {
    kd_tensor *in[3] = {x, gamma, beta};
    char bx[96];
    if (!g || !kd__ok_inputs(g, "layernorm", 1, in)) return NULL;
    if (!(x = in[0] = kd__to_strided(g, x))) return NULL;
    if (!kd__check_f32(g, "layernorm", "input", x)) return NULL;
    if (x->ndim < 1)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "layernorm: input %s needs a feature axis",
                                    SHP(x, bx)));
    if (!gamma != !beta)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "layernorm: weight and bias must both be "
                                                    "given or both be NULL (weight %s, bias %s)",
                                    gamma ? "given" : "NULL", beta ? "given" : "NULL"));
    if (!(eps >= 0.0f) || !isfinite(eps))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "layernorm: eps %g must be finite and >= 0",
                                    (double)eps));
    int64_t D = x->shape[x->ndim - 1], R = D ? kd_tensor_numel(x) / D : 0;
    if (gamma && (!kd__ln_check_vec(g, "weight", gamma, D, x) ||
                  !kd__ln_check_vec(g, "bias", beta, D, x)))
        return NULL;
    kd_tensor *y = kd__new_like(g, x);
    if (!y) return NULL;
    /* Row statistics only when a backward rule will need them. */
    int rec = g->grad_enabled && (kd__needs_grad(g, x) || kd__needs_grad(g, gamma) ||
                                  kd__needs_grad(g, beta));
    kd_tensor *sm = NULL, *sr = NULL;
    if (rec && (!(sm = kd__new(g, KD_F32, 1, &R)) || !(sr = kd__new(g, KD_F32, 1, &R))))
        return NULL;
    if (R > 0 && D > 0) {
        kd_status s = g->be->layernorm_forward(g->be, eps, x, gamma, beta, y, sm, sr);
        if (s != KD_OK) return kd__fail(g, s);
    }
    kd__node *n = kd__record(g, KD_OP_LAYERNORM, y, 3, in);
    if (n) {
        n->p.f.a = eps;
        n->saved[0] = sm;
        n->saved[1] = sr;
    }
    return g->status == KD_OK ? y : NULL;
}

/* dx is written by the kernel with x's own accumulate flag; the parameter
 * gradients (leaves: they always accumulate) land in D-sized temporaries
 * first and are added afterwards, so a fresh dx (the usual case: x is an
 * intermediate) is never zeroed and re-read. */
kd_status kd__layernorm_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *gamma = n->in[1], *beta = n->in[2], *dy = n->out->grad;
    int64_t D = x->shape[x->ndim - 1], R = D ? kd_tensor_numel(x) / D : 0;
    int acc = 0;
    kd_tensor *dx = NULL;
    if (kd__needs_grad(g, x) && !(dx = kd__grad(g, x, &acc))) return g->status;
    int ng = gamma && kd__needs_grad(g, gamma), nb = beta && kd__needs_grad(g, beta);
    kd_tensor *tg = ng ? kd__new(g, KD_F32, 1, &D) : NULL, *tb = nb ? kd__new(g, KD_F32, 1, &D) : NULL;
    if ((ng && !tg) || (nb && !tb)) return g->status;
    /* The kernel's one accumulate flag is dx's: the temporaries start at 0
     * when it adds (or when there is nothing to compute). */
    if (tg && (acc || R == 0 || D == 0)) memset(tg->data, 0, kd_tensor_nbytes(tg));
    if (tb && (acc || R == 0 || D == 0)) memset(tb->data, 0, kd_tensor_nbytes(tb));
    if (R == 0 || D == 0) {
        if (dx && !acc) memset(dx->data, 0, kd_tensor_nbytes(dx));
    } else if (dx || tg || tb) {
        KD_TRY(g->be->layernorm_backward(g->be, n->p.f.a, dy, x, gamma, n->saved[0], n->saved[1],
                                         dx, tg, tb, acc));
    }
    kd_tensor *pairs[2][2] = {{gamma, tg}, {beta, tb}};
    for (int i = 0; i < 2; i++) {
        if (!pairs[i][1]) continue;
        kd_tensor *d = kd__grad_acc(g, pairs[i][0]);
        if (!d) return g->status;
        kd__axpy(kd_f32(d), kd_f32(pairs[i][1]), 1.0f, D, 1);
    }
    return KD_OK;
}

/* ---------------------------------------------------------------- GELU */

kd_tensor *kd_gelu(kd_graph *g, kd_tensor *x) {
    if (!g || !kd__ok_inputs(g, "gelu", 1, &x)) return NULL;
    if (!(x = kd__to_f32(g, x)) || !kd__check_f32_any(g, "gelu", "input", x)) return NULL;
    kd_tensor *y = kd__new_like(g, x);
    if (!y) return NULL;
    if (kd_tensor_numel(x) > 0) {
        kd_status s = g->be->eltwise_forward(g->be, KD_ELTWISE_GELU, 0.0f, x, y);
        if (s != KD_OK) return kd__fail(g, s);
    }
    kd__record(g, KD_OP_GELU, y, 1, &x);
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__gelu_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    if (kd_tensor_numel(x) == 0) return KD_OK;
    return g->be->eltwise_backward(g->be, KD_ELTWISE_GELU, 0.0f, n->out->grad, x, dx, acc);
}

/* ------------------------------------------------------- batched matmul */

/* Sizes of kd_bmm(a, b, ta, tb): op(a) (M, K), op(b) (K, N), batch = the
 * product of the leading dims. */
typedef struct {
    int64_t batch, M, N, K;
    int64_t lda, ldb; /* row strides of a and b as stored */
} kd__bmm_dims;

static kd__bmm_dims kd__bmm_sizes(const kd_tensor *a, const kd_tensor *b, int ta, int tb) {
    kd__bmm_dims d;
    int na = a->ndim;
    d.M = ta ? a->shape[na - 1] : a->shape[na - 2];
    d.K = ta ? a->shape[na - 2] : a->shape[na - 1];
    d.N = tb ? b->shape[na - 2] : b->shape[na - 1];
    d.batch = 1;
    for (int i = 0; i < na - 2; i++) d.batch *= a->shape[i];
    d.lda = a->shape[na - 1];
    d.ldb = b->shape[na - 1];
    return d;
}

kd_tensor *kd_bmm(kd_graph *g, kd_tensor *a, kd_tensor *b, int trans_a, int trans_b) {
    kd_tensor *in[2] = {a, b};
    char ba[96], bb[96];
    if (!g || !kd__ok_inputs(g, "bmm", 2, in)) return NULL;
    if (!(a = in[0] = kd__to_strided(g, a)) || !(b = in[1] = kd__to_strided(g, b))) return NULL;
    if (!kd__check_f32(g, "bmm", "a", a) || !kd__check_f32(g, "bmm", "b", b)) return NULL;
    int ta = trans_a != 0, tb = trans_b != 0;
    int ok = a->ndim >= 3 && b->ndim == a->ndim;
    for (int i = 0; ok && i < a->ndim - 2; i++) ok = a->shape[i] == b->shape[i];
    if (!ok)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "bmm: a %s and b %s need the same number (>= 3) "
                                                  "of dims and equal batch (leading) dims",
                                    SHP(a, ba), SHP(b, bb)));
    kd__bmm_dims d = kd__bmm_sizes(a, b, ta, tb);
    int64_t Kb = tb ? b->shape[b->ndim - 1] : b->shape[b->ndim - 2];
    if (d.K != Kb)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "bmm: cannot multiply a %s%s by b %s%s: inner "
                                                  "sizes %lld and %lld differ",
                                    SHP(a, ba), ta ? " (transposed)" : "", SHP(b, bb),
                                    tb ? " (transposed)" : "", (long long)d.K, (long long)Kb));
    int64_t ys[KD_MAX_DIMS];
    for (int i = 0; i < a->ndim - 2; i++) ys[i] = a->shape[i];
    ys[a->ndim - 2] = d.M;
    ys[a->ndim - 1] = d.N;
    kd_tensor *y = kd__new(g, KD_F32, a->ndim, ys);
    if (!y) return NULL;
    if (d.K == 0) memset(y->data, 0, kd_tensor_nbytes(y));
    if (d.batch > 0 && d.M > 0 && d.N > 0 && d.K > 0) {
        kd_status s = g->be->gemm_batch(g->be, d.batch, ta, tb, d.M, d.N, d.K, 1.0f, kd_f32(a),
                                        d.lda, d.M * d.K, kd_f32(b), d.ldb, d.K * d.N, 0.0f,
                                        kd_f32(y), d.N, d.M * d.N);
        if (s != KD_OK) return kd__fail(g, s);
    }
    kd__node *n = kd__record(g, KD_OP_BMM, y, 2, in);
    if (n) {
        n->p.dims.d0 = ta;
        n->p.dims.d1 = tb;
    }
    return g->status == KD_OK ? y : NULL;
}

/* With C = op(A) op(B) per matrix, dC (M, N):
 *   d op(A) = dC op(B)^T, so dA = dC op(B)^T (M, K), or its transpose
 *             op(B) dC^T (K, M) when A is stored transposed;
 *   d op(B) = op(A)^T dC, so dB = op(A)^T dC (K, N), or dC^T op(A) (N, K). */
kd_status kd__bmm_backward(kd_graph *g, kd__node *n) {
    kd_tensor *a = n->in[0], *b = n->in[1], *dy = n->out->grad;
    int ta = n->p.dims.d0, tb = n->p.dims.d1;
    kd__bmm_dims d = kd__bmm_sizes(a, b, ta, tb);
    const int64_t sa = d.M * d.K, sb = d.K * d.N, sc = d.M * d.N;
    const int empty = d.batch == 0 || d.M == 0 || d.N == 0 || d.K == 0;
    int acc;
    if (kd__needs_grad(g, a)) {
        kd_tensor *da = kd__grad(g, a, &acc);
        if (!da) return g->status;
        if (empty) {
            if (!acc) memset(da->data, 0, kd_tensor_nbytes(da));
        } else if (!ta) { /* (M, K) = dC (M, N) @ op(B)^T */
            KD_TRY(g->be->gemm_batch(g->be, d.batch, 0, !tb, d.M, d.K, d.N, 1.0f, kd_f32(dy), d.N,
                                     sc, kd_f32(b), d.ldb, sb, acc ? 1.0f : 0.0f, kd_f32(da),
                                     d.K, sa));
        } else { /* (K, M) = op(B) (K, N) @ dC^T */
            KD_TRY(g->be->gemm_batch(g->be, d.batch, tb, 1, d.K, d.M, d.N, 1.0f, kd_f32(b), d.ldb,
                                     sb, kd_f32(dy), d.N, sc, acc ? 1.0f : 0.0f, kd_f32(da),
                                     d.M, sa));
        }
    }
    if (kd__needs_grad(g, b)) {
        kd_tensor *db = kd__grad(g, b, &acc);
        if (!db) return g->status;
        if (empty) {
            if (!acc) memset(db->data, 0, kd_tensor_nbytes(db));
        } else if (!tb) { /* (K, N) = op(A)^T (K, M) @ dC */
            KD_TRY(g->be->gemm_batch(g->be, d.batch, !ta, 0, d.K, d.N, d.M, 1.0f, kd_f32(a), d.lda,
                                     sa, kd_f32(dy), d.N, sc, acc ? 1.0f : 0.0f, kd_f32(db),
                                     d.N, sb));
        } else { /* (N, K) = dC^T (N, M) @ op(A) */
            KD_TRY(g->be->gemm_batch(g->be, d.batch, 1, ta, d.N, d.K, d.M, 1.0f, kd_f32(dy), d.N,
                                     sc, kd_f32(a), d.lda, sa, acc ? 1.0f : 0.0f, kd_f32(db),
                                     d.K, sb));
        }
    }
    return KD_OK;
}
