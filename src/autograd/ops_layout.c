/*
 * ops_layout.c: data movement and elementwise transformer ops in plain C,
 * device-independent like kd_transpose (they run the same on every backend):
 * permute, roll, index_select, add_bcast, drop_path, weight_norm, and the
 * Swin helpers composed of reshapes and permutes (window_partition,
 * window_reverse, patch_merge). Loops are OpenMP-parallel above KD__PAR_MIN
 * elements; the reductions (index_select's and add_bcast's backward,
 * weight_norm's row sums) add in a fixed order, so results do not depend on
 * the thread count.
 */
#include "autograd/autograd_impl.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define SHP(t, buf) kd_shape_str((t), (buf), sizeof(buf))

/* ------------------------------------------------------------ permute */

/* The same permutation on fewer axes: axes of size 1 dropped, and input axes
 * that stay adjacent and in order in the output merged. x of shape s
 * (nd axes) permuted by perm equals x viewed as ms (returned count) permuted
 * by mp. */
static int kd__perm_merge(int nd, const int64_t *s, const int64_t *perm, int64_t *ms, int *mp) {
    int idx[KD_MAX_DIMS], k = 0, p[KD_MAX_DIMS], np = 0;
    int64_t ks[KD_MAX_DIMS];
    for (int i = 0; i < nd; i++) {
        idx[i] = s[i] == 1 ? -1 : k;
        if (s[i] != 1) ks[k++] = s[i];
    }
    for (int i = 0; i < nd; i++)
        if (idx[perm[i]] >= 0) p[np++] = idx[perm[i]];
    int gs[KD_MAX_DIMS], gl[KD_MAX_DIMS], ng = 0; /* groups in output order */
    for (int i = 0; i < np; i++) {
        if (ng && p[i] == gs[ng - 1] + gl[ng - 1]) {
            gl[ng - 1]++;
        } else {
            gs[ng] = p[i];
            gl[ng++] = 1;
        }
    }
    for (int a = 0; a < ng; a++) {
        int r = 0; /* the group's position in input order */
        for (int b = 0; b < ng; b++) r += gs[b] < gs[a];
        mp[a] = r;
        ms[r] = 1;
        for (int j = 0; j < gl[a]; j++) ms[r] *= ks[gs[a] + j];
    }
    return ng;
}

/* dst (+)= src permuted by perm; src contiguous of shape s (nd axes), dst
 * contiguous of the permuted shape. */
static void kd__permute_run(float *dst, const float *src, int nd, const int64_t *s,
                            const int64_t *perm, int acc) {
    int64_t ms[KD_MAX_DIMS], n = 1;
    int mp[KD_MAX_DIMS];
    for (int i = 0; i < nd; i++) n *= s[i];
    if (n == 0) return;
    int m = kd__perm_merge(nd, s, perm, ms, mp);
    if (m <= 1) { /* the identity on memory */
        kd__axpy(dst, src, 1.0f, n, acc);
        return;
    }
    int64_t is[KD_MAX_DIMS], os[KD_MAX_DIMS], ss[KD_MAX_DIMS];
    is[m - 1] = 1;
    for (int i = m - 2; i >= 0; i--) is[i] = is[i + 1] * ms[i + 1];
    for (int i = 0; i < m; i++) {
        os[i] = ms[mp[i]]; /* output axis i and its stride in src */
        ss[i] = is[mp[i]];
    }
    const int64_t L = os[m - 1], sl = ss[m - 1], rows = n / L;
#pragma omp parallel for schedule(static) if (n >= KD__PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        int64_t t = r, off = 0;
        for (int i = m - 2; i >= 0; i--) {
            off += (t % os[i]) * ss[i];
            t /= os[i];
        }
        const float *sp = src + off;
        float *dp = dst + r * L;
        if (acc)
            for (int64_t j = 0; j < L; j++) dp[j] += sp[j * sl];
        else
            for (int64_t j = 0; j < L; j++) dp[j] = sp[j * sl];
    }
}

kd_tensor *kd_permute(kd_graph *g, kd_tensor *x, const int *perm) {
    char bx[96];
    if (!g || !kd__ok_inputs(g, "permute", 1, &x)) return NULL;
    if (!(x = kd__to_strided(g, x))) return NULL;
    if (!kd__check_f32(g, "permute", "input", x)) return NULL;
    const int nd = x->ndim;
    if (nd > 0 && !perm)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "permute: perm is NULL for %s", SHP(x, bx)));
    int64_t p[KD_MAX_DIMS], ys[KD_MAX_DIMS];
    int seen[KD_MAX_DIMS] = {0};
    for (int i = 0; i < nd; i++) {
        int a = perm[i] < 0 ? perm[i] + nd : perm[i];
        if (a < 0 || a >= nd || seen[a])
            return kd__fail(g, kd_error(KD_ERR_INVALID, "permute: perm[%d] = %d is %s for %s "
                                                        "(perm must order the axes 0..%d)",
                                        i, perm[i], a < 0 || a >= nd ? "out of range" : "repeated",
                                        SHP(x, bx), nd - 1));
        seen[a] = 1;
        p[i] = a;
        ys[i] = x->shape[a];
    }
    kd_tensor *y = kd__new(g, KD_F32, nd, ys);
    if (!y) return NULL;
    kd__permute_run(kd_f32(y), kd_f32(x), nd, x->shape, p, 0);
    kd__node *n = kd__record(g, KD_OP_PERMUTE, y, 1, &x);
    if (n) memcpy(n->p.lay.v, p, sizeof p);
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__permute_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *y = n->out;
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int64_t inv[KD_MAX_DIMS];
    for (int i = 0; i < y->ndim; i++) inv[n->p.lay.v[i]] = i;
    kd__permute_run(kd_f32(dx), kd_f32(y->grad), y->ndim, y->shape, inv, acc);
    return KD_OK;
}

/* --------------------------------------------------------------- roll */

/* dst (+)= src rolled by sh[d] in [0, s[d]) along each axis d:
 * dst[i] = src[(i - sh) mod s]. Axes of size 1 are dropped and an unshifted
 * axis merges into the axis before it (rolling (a, b) by (k, 0) is rolling
 * the merged axis by k * b), so the innermost rows are two memcpy's. */
static void kd__roll_run(float *dst, const float *src, int nd, const int64_t *s,
                         const int64_t *sh, int acc) {
    int64_t ms[KD_MAX_DIMS], msh[KD_MAX_DIMS], n = 1;
    int m = 0;
    for (int d = 0; d < nd; d++) {
        n *= s[d];
        if (s[d] == 1) continue;
        if (m > 0 && sh[d] == 0) {
            ms[m - 1] *= s[d];
            msh[m - 1] *= s[d];
        } else {
            ms[m] = s[d];
            msh[m++] = sh[d];
        }
    }
    if (n == 0) return;
    if (m == 0) {
        kd__axpy(dst, src, 1.0f, n, acc);
        return;
    }
    int64_t is[KD_MAX_DIMS];
    is[m - 1] = 1;
    for (int i = m - 2; i >= 0; i--) is[i] = is[i + 1] * ms[i + 1];
    const int64_t L = ms[m - 1], k = msh[m - 1], rows = n / L;
#pragma omp parallel for schedule(static) if (n >= KD__PAR_MIN && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        int64_t t = r, off = 0;
        for (int i = m - 2; i >= 0; i--) {
            int64_t j = t % ms[i] - msh[i];
            off += (j < 0 ? j + ms[i] : j) * is[i];
            t /= ms[i];
        }
        const float *sp = src + off;
        float *dp = dst + r * L;
        /* dp[k..L) = sp[0..L-k), dp[0..k) = sp[L-k..L) */
        if (acc) {
            for (int64_t j = 0; j < L - k; j++) dp[k + j] += sp[j];
            for (int64_t j = 0; j < k; j++) dp[j] += sp[L - k + j];
        } else {
            memcpy(dp + k, sp, (size_t)(L - k) * sizeof *dp);
            memcpy(dp, sp + L - k, (size_t)k * sizeof *dp);
        }
    }
}

kd_tensor *kd_roll(kd_graph *g, kd_tensor *x, int n, const int *dims, const int64_t *shifts) {
    char bx[96];
    if (!g || !kd__ok_inputs(g, "roll", 1, &x)) return NULL;
    if (!(x = kd__to_strided(g, x))) return NULL;
    if (!kd__check_f32(g, "roll", "input", x)) return NULL;
    if (n < 1 || !dims || !shifts)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "roll: needs at least one axis and its shift "
                                                    "(got %d axes%s)",
                                    n, n >= 1 ? ", dims or shifts NULL" : ""));
    int64_t sh[KD_MAX_DIMS] = {0};
    for (int i = 0; i < n; i++) {
        int d = dims[i] < 0 ? dims[i] + x->ndim : dims[i];
        if (d < 0 || d >= x->ndim)
            return kd__fail(g, kd_error(KD_ERR_INVALID, "roll: axis %d (dims[%d]) is out of range "
                                                        "for %s", dims[i], i, SHP(x, bx)));
        int64_t len = x->shape[d];
        if (len == 0) continue;
        int64_t k = shifts[i] % len; /* repeated axes add up, as in torch.roll */
        sh[d] = ((sh[d] + k) % len + len) % len;
    }
    kd_tensor *y = kd__new(g, KD_F32, x->ndim, x->shape);
    if (!y) return NULL;
    kd__roll_run(kd_f32(y), kd_f32(x), x->ndim, x->shape, sh, 0);
    kd__node *nd = kd__record(g, KD_OP_ROLL, y, 1, &x);
    if (nd) memcpy(nd->p.lay.v, sh, sizeof sh);
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__roll_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int64_t back[KD_MAX_DIMS];
    for (int d = 0; d < x->ndim; d++)
        back[d] = n->p.lay.v[d] ? x->shape[d] - n->p.lay.v[d] : 0;
    kd__roll_run(kd_f32(dx), kd_f32(n->out->grad), x->ndim, x->shape, back, acc);
    return KD_OK;
}

/* ------------------------------------------------------- index_select */

kd_tensor *kd_index_select(kd_graph *g, kd_tensor *table, const kd_tensor *index) {
    char bt[96], bi[96];
    kd_tensor *in[2] = {table, (kd_tensor *)index}; /* the index is read, never written */
    if (!g || !kd__ok_inputs(g, "index_select", 2, in)) return NULL;
    if (!(table = in[0] = kd__to_strided(g, table))) return NULL;
    if (!kd__check_f32(g, "index_select", "table", table)) return NULL;
    if (table->ndim != 2)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "index_select: table %s must be (L, D)",
                                    SHP(table, bt)));
    if (index->dtype != KD_I64 || index->ndim != 1 || index->layout != KD_LAYOUT_STRIDED ||
        !kd_tensor_is_contiguous(index))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "index_select: index %s %s must be a "
                                                    "contiguous 1-d int64 tensor",
                                    kd_dtype_name(index->dtype), SHP(index, bi)));
    const int64_t L = table->shape[0], D = table->shape[1], M = index->shape[0];
    const int64_t *ix = index->data;
    for (int64_t m = 0; m < M; m++)
        if (ix[m] < 0 || ix[m] >= L)
            return kd__fail(g, kd_error(KD_ERR_INVALID, "index_select: index[%lld] = %lld is "
                                                        "outside [0, %lld) (table %s)",
                                        (long long)m, (long long)ix[m], (long long)L,
                                        SHP(table, bt)));
    int64_t ys[2] = {M, D};
    kd_tensor *y = kd__new(g, KD_F32, 2, ys);
    if (!y) return NULL;
    const float *t = kd_f32(table);
    float *yd = kd_f32(y);
#pragma omp parallel for schedule(static) if (M * D >= KD__PAR_MIN)
    for (int64_t m = 0; m < M; m++) memcpy(yd + m * D, t + ix[m] * D, (size_t)D * sizeof *yd);
    kd__record(g, KD_OP_INDEX_SELECT, y, 2, in);
    return g->status == KD_OK ? y : NULL;
}

/* d table[l] (+)= sum of dy[m] over the m with index[m] == l, in increasing
 * m: the readers of each row are grouped first (a counting sort), so rows
 * are summed in parallel without races and in a fixed order. */
kd_status kd__index_select_backward(kd_graph *g, kd__node *n) {
    kd_tensor *table = n->in[0];
    const kd_tensor *index = n->in[1];
    int acc;
    if (!kd__needs_grad(g, table)) return KD_OK;
    kd_tensor *dt = kd__grad(g, table, &acc);
    if (!dt) return g->status;
    const int64_t L = table->shape[0], D = table->shape[1], M = index->shape[0];
    const int64_t *ix = index->data;
    int64_t *end = kd__scratch(g, (size_t)(L + 1) * sizeof *end);
    int64_t *order = kd__scratch(g, (size_t)(M > 0 ? M : 1) * sizeof *order);
    if (!end || !order) return g->status;
    memset(end, 0, (size_t)(L + 1) * sizeof *end);
    for (int64_t m = 0; m < M; m++) end[ix[m] + 1]++;
    for (int64_t l = 0; l < L; l++) end[l + 1] += end[l];
    for (int64_t m = 0; m < M; m++) order[end[ix[m]]++] = m; /* end[l]: past row l's readers */
    const float *dy = kd_f32(n->out->grad);
    float *d = kd_f32(dt);
#pragma omp parallel for schedule(static) if (M * D >= KD__PAR_MIN)
    for (int64_t l = 0; l < L; l++) {
        float *row = d + l * D;
        if (!acc) memset(row, 0, (size_t)D * sizeof *row);
        for (int64_t k = l ? end[l - 1] : 0; k < end[l]; k++) {
            const float *s = dy + order[k] * D;
            for (int64_t j = 0; j < D; j++) row[j] += s[j];
        }
    }
    return KD_OK;
}

/* ---------------------------------------------------------- add_bcast */

/* x's shape with axes of size 1 dropped and neighbours merged when b is
 * broadcast along both or along neither (full[i]: b has axis i). */
typedef struct {
    int m;
    int64_t s[KD_MAX_DIMS], xst[KD_MAX_DIMS], bst[KD_MAX_DIMS]; /* bst 0 on broadcast axes */
    int full[KD_MAX_DIMS];
} kd__bcast;

static void kd__bcast_plan(const kd_tensor *x, const kd_tensor *b, kd__bcast *p) {
    p->m = 0;
    for (int d = 0; d < x->ndim; d++) {
        if (x->shape[d] == 1) continue;
        int f = b->shape[d] != 1;
        if (p->m && p->full[p->m - 1] == f) {
            p->s[p->m - 1] *= x->shape[d];
        } else {
            p->s[p->m] = x->shape[d];
            p->full[p->m++] = f;
        }
    }
    int64_t xs = 1, bs = 1;
    for (int i = p->m - 1; i >= 0; i--) {
        p->xst[i] = xs;
        xs *= p->s[i];
        p->bst[i] = p->full[i] ? bs : 0;
        if (p->full[i]) bs *= p->s[i];
    }
}

#define KD__BC_CHUNK 4096

kd_tensor *kd_add_bcast(kd_graph *g, kd_tensor *x, kd_tensor *b) {
    char bx[96], bb[96];
    kd_tensor *in[2] = {x, b};
    if (!g || !kd__ok_inputs(g, "add_bcast", 2, in)) return NULL;
    if (!(x = in[0] = kd__to_strided(g, x)) || !(b = in[1] = kd__to_strided(g, b))) return NULL;
    if (!kd__check_f32(g, "add_bcast", "x", x) || !kd__check_f32(g, "add_bcast", "b", b))
        return NULL;
    int ok = x->ndim == b->ndim;
    for (int d = 0; ok && d < x->ndim; d++) ok = b->shape[d] == 1 || b->shape[d] == x->shape[d];
    if (!ok)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "add_bcast: b %s does not broadcast to x %s "
                                                  "(same rank, each b axis 1 or x's)",
                                    SHP(b, bb), SHP(x, bx)));
    kd_tensor *y = kd__new(g, KD_F32, x->ndim, x->shape);
    if (!y) return NULL;
    kd__bcast p;
    kd__bcast_plan(x, b, &p);
    const int64_t n = kd_tensor_numel(x);
    const float *xd = kd_f32(x), *bd = kd_f32(b);
    float *yd = kd_f32(y);
    if (p.m == 0) {
        if (n) yd[0] = xd[0] + bd[0];
    } else {
        /* Flat chunks of y (parallel whatever the row count), row by row within. */
        const int m = p.m;
        const int64_t L = p.s[m - 1], ib = p.bst[m - 1], nchunk = (n + KD__BC_CHUNK - 1) / KD__BC_CHUNK;
#pragma omp parallel for schedule(static) if (n >= KD__PAR_MIN)
        for (int64_t c = 0; c < nchunk; c++) {
            int64_t i = c * KD__BC_CHUNK, hi = i + KD__BC_CHUNK < n ? i + KD__BC_CHUNK : n;
            while (i < hi) {
                int64_t r = i / L, j0 = i % L, j1 = j0 + (hi - i) < L ? j0 + (hi - i) : L;
                int64_t t = r, boff = 0;
                for (int a = m - 2; a >= 0; a--) {
                    boff += (t % p.s[a]) * p.bst[a];
                    t /= p.s[a];
                }
                const float *xr = xd + r * L, *br = bd + boff;
                float *yr = yd + r * L;
                if (ib)
                    for (int64_t j = j0; j < j1; j++) yr[j] = xr[j] + br[j];
                else
                    for (int64_t j = j0; j < j1; j++) yr[j] = xr[j] + br[0];
                i += j1 - j0;
            }
        }
    }
    kd__record(g, KD_OP_ADD_BCAST, y, 2, in);
    return g->status == KD_OK ? y : NULL;
}

#define KD__BC_RED 512 /* b elements summed together (double accumulators on the stack) */

kd_status kd__add_bcast_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *b = n->in[1];
    const float *dy = kd_f32(n->out->grad);
    const int64_t cnt = kd_tensor_numel(x);
    int acc;
    if (kd__needs_grad(g, x)) {
        kd_tensor *dx = kd__grad(g, x, &acc);
        if (!dx) return g->status;
        kd__axpy(kd_f32(dx), dy, 1.0f, cnt, acc);
    }
    if (!kd__needs_grad(g, b)) return KD_OK;
    kd_tensor *dbt = kd__grad(g, b, &acc);
    if (!dbt) return g->status;
    float *db = kd_f32(dbt);
    kd__bcast p;
    kd__bcast_plan(x, b, &p);
    /* db[j] = sum over the broadcast axes of dy; b's axes F (row-major, j)
     * and the reduced axes R (row-major, k) of the merged shape. */
    int F[KD_MAX_DIMS], R[KD_MAX_DIMS], nf = 0, nr = 0;
    int64_t nb = 1, nred = 1;
    for (int i = 0; i < p.m; i++) {
        if (p.full[i]) {
            F[nf++] = i;
            nb *= p.s[i];
        } else {
            R[nr++] = i;
            nred *= p.s[i];
        }
    }
    if (cnt == 0) {
        if (!acc) memset(db, 0, kd_tensor_nbytes(dbt));
        return KD_OK;
    }
    const int64_t nchunk = (nb + KD__BC_RED - 1) / KD__BC_RED;
#pragma omp parallel for schedule(static) if (cnt >= KD__PAR_MIN)
    for (int64_t c = 0; c < nchunk; c++) {
        int64_t j0 = c * KD__BC_RED, j1 = j0 + KD__BC_RED < nb ? j0 + KD__BC_RED : nb;
        int64_t xo[KD__BC_RED];
        double s[KD__BC_RED];
        for (int64_t j = j0; j < j1; j++) {
            int64_t t = j, off = 0;
            for (int a = nf - 1; a >= 0; a--) {
                off += (t % p.s[F[a]]) * p.xst[F[a]];
                t /= p.s[F[a]];
            }
            xo[j - j0] = off;
            s[j - j0] = 0.0;
        }
        for (int64_t k = 0; k < nred; k++) {
            int64_t t = k, ro = 0;
            for (int a = nr - 1; a >= 0; a--) {
                ro += (t % p.s[R[a]]) * p.xst[R[a]];
                t /= p.s[R[a]];
            }
            for (int64_t j = 0; j < j1 - j0; j++) s[j] += dy[xo[j] + ro];
        }
        for (int64_t j = j0; j < j1; j++) db[j] = acc ? db[j] + (float)s[j - j0] : (float)s[j - j0];
    }
    return KD_OK;
}

/* ---------------------------------------------------------- drop_path */

/* Sample i is kept when the i-th uniform draw of the node's Philox stream
 * is >= p: the draw kd_dropout makes for element i (ops_tensor.c), from a
 * stream key taken from the same per-step counter. Returns the multiplier. */
static inline float kd__drop_path_mult(uint64_t seed, uint64_t key, int64_t i, float p,
                                       float inv) {
    uint32_t blk[4];
    kd_philox4x32(seed, key, (uint64_t)(i >> 2), blk);
    float u = (float)(blk[i & 3] >> 8) * (1.0f / 16777216.0f);
    return u >= p ? inv : 0.0f;
}

/* dst (+)= mult(sample) * src for N samples of `per` contiguous elements
 * (also in NCHW16C, whose samples are contiguous too). */
static void kd__drop_path_apply(float *dst, const float *src, int64_t N, int64_t per,
                                uint64_t seed, uint64_t key, float p, int acc) {
    float inv = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
#pragma omp parallel for schedule(static) if (N * per >= KD__PAR_MIN)
    for (int64_t i = 0; i < N; i++) {
        float mu = kd__drop_path_mult(seed, key, i, p, inv);
        float *d = dst + i * per;
        const float *s = src + i * per;
        if (acc)
            for (int64_t j = 0; j < per; j++) d[j] += mu * s[j];
        else
            for (int64_t j = 0; j < per; j++) d[j] = mu * s[j];
    }
}

kd_tensor *kd_drop_path(kd_graph *g, kd_tensor *x, float p, int training) {
    if (!g || !kd__ok_inputs(g, "drop_path", 1, &x)) return NULL;
    if (!(p >= 0.0f && p <= 1.0f))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "drop_path: probability %g is outside [0, 1]",
                                    (double)p));
    if (!training || p == 0.0f) return x;
    if (!(x = kd__to_f32(g, x)) || !kd__check_f32_any(g, "drop_path", "input", x)) return NULL;
    if (x->ndim < 1)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "drop_path: input is a scalar (samples are "
                                                  "indexed along axis 0)"));
    kd_tensor *y = kd__new_like(g, x);
    if (!y) return NULL;
    const int64_t N = x->shape[0], per = N ? kd_tensor_numel(x) / N : 0;
    uint64_t key = kd_rng_key(g->step_key, g->n_dropout++);
    kd__drop_path_apply(kd_f32(y), kd_f32(x), N, per, g->seed, key, p, 0);
    kd__node *n = kd__record(g, KD_OP_DROP_PATH, y, 1, &x);
    if (n) {
        n->p.f.a = p;
        n->p.f.key = key;
        n->p.f.seed = g->seed;
    }
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__drop_path_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    const int64_t N = x->shape[0], per = N ? kd_tensor_numel(x) / N : 0;
    kd__drop_path_apply(kd_f32(dx), kd_f32(n->out->grad), N, per, n->p.f.seed, n->p.f.key,
                        n->p.f.a, acc);
    return KD_OK;
}

/* -------------------------------------------------------- weight_norm */

static double kd__dot_f64(const float *a, const float *b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

kd_tensor *kd_weight_norm(kd_graph *g, kd_tensor *v, kd_tensor *gain) {
    char bv[96], bg[96];
    if (!g || !kd__ok_inputs(g, "weight_norm", 1, &v)) return NULL;
    if (!(v = kd__to_strided(g, v)) || !kd__check_f32(g, "weight_norm", "v", v)) return NULL;
    if (v->ndim != 2)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "weight_norm: v %s must be (O, I)", SHP(v, bv)));
    const int64_t O = v->shape[0], I = v->shape[1];
    if (gain) {
        if (!kd__check_f32(g, "weight_norm", "gain", gain)) return NULL;
        int ok = (gain->ndim == 1 && gain->shape[0] == O) ||
                 (gain->ndim == 2 && gain->shape[0] == O && gain->shape[1] == 1);
        if (!ok)
            return kd__fail(g, kd_error(KD_ERR_SHAPE, "weight_norm: gain %s must be (%lld) or "
                                                      "(%lld, 1) for v %s",
                                        SHP(gain, bg), (long long)O, (long long)O, SHP(v, bv)));
    }
    kd_tensor *w = kd__new(g, KD_F32, 2, v->shape);
    if (!w) return NULL;
    const float *vd = kd_f32(v), *gd = gain ? kd_f32(gain) : NULL;
    float *wd = kd_f32(w);
    /* A zero row divides by zero, as in PyTorch (no epsilon). */
#pragma omp parallel for schedule(static) if (O * I >= KD__PAR_MIN)
    for (int64_t o = 0; o < O; o++) {
        const float *vr = vd + o * I;
        double sc = (gd ? (double)gd[o] : 1.0) / sqrt(kd__dot_f64(vr, vr, I));
        for (int64_t i = 0; i < I; i++) wd[o * I + i] = (float)(sc * vr[i]);
    }
    kd_tensor *in[2] = {v, gain};
    kd__record(g, KD_OP_WEIGHT_NORM, w, 2, in);
    return g->status == KD_OK ? w : NULL;
}

/* With u = v / ||v|| per row and s = <dw, u>: d gain = s and
 * d v = gain / ||v|| * (dw - s u) (torch._weight_norm, dim 0). The norms are
 * recomputed from v (retained), so nothing is saved. */
kd_status kd__weight_norm_backward(kd_graph *g, kd__node *n) {
    kd_tensor *v = n->in[0], *gain = n->in[1];
    kd_tensor *dv = NULL, *dg = NULL;
    int acc_v = 0, acc_g = 0;
    if (kd__needs_grad(g, v) && !(dv = kd__grad(g, v, &acc_v))) return g->status;
    if (kd__needs_grad(g, gain) && !(dg = kd__grad(g, gain, &acc_g))) return g->status;
    const int64_t O = v->shape[0], I = v->shape[1];
    const float *vd = kd_f32(v), *gd = gain ? kd_f32(gain) : NULL, *dw = kd_f32(n->out->grad);
    float *dvd = dv ? kd_f32(dv) : NULL, *dgd = dg ? kd_f32(dg) : NULL;
#pragma omp parallel for schedule(static) if (O * I >= KD__PAR_MIN)
    for (int64_t o = 0; o < O; o++) {
        const float *vr = vd + o * I, *dr = dw + o * I;
        double ss = kd__dot_f64(vr, vr, I), nrm = sqrt(ss), dot = kd__dot_f64(dr, vr, I);
        if (dgd) {
            float d = (float)(dot / nrm);
            dgd[o] = acc_g ? dgd[o] + d : d;
        }
        if (dvd) {
            double gn = (gd ? (double)gd[o] : 1.0) / nrm, c = dot / ss;
            float *out = dvd + o * I;
            for (int64_t i = 0; i < I; i++) {
                float d = (float)(gn * ((double)dr[i] - c * vr[i]));
                out[i] = acc_v ? out[i] + d : d;
            }
        }
    }
    return KD_OK;
}

/* ------------------------------------------------------- Swin helpers */

static const int kd__win_perm[6] = {0, 1, 3, 2, 4, 5}; /* its own inverse */

kd_tensor *kd_window_partition(kd_graph *g, kd_tensor *x, int64_t ws) {
    char bx[96];
    if (!g || !kd__ok_inputs(g, "window_partition", 1, &x)) return NULL;
    if (x->ndim != 4)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "window_partition: x %s must be (N, H, W, C)",
                                    SHP(x, bx)));
    const int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3];
    if (ws < 1 || H % ws || W % ws)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "window_partition: window size %lld does not "
                                                  "divide H = %lld and W = %lld of x %s",
                                    (long long)ws, (long long)H, (long long)W, SHP(x, bx)));
    const int64_t s6[6] = {N, H / ws, ws, W / ws, ws, C};
    const int64_t s3[3] = {N * (H / ws) * (W / ws), ws * ws, C};
    return kd_reshape(g, kd_permute(g, kd_reshape(g, x, 6, s6), kd__win_perm), 3, s3);
}

kd_tensor *kd_window_reverse(kd_graph *g, kd_tensor *win, int64_t ws, int64_t N, int64_t H,
                             int64_t W) {
    char bw[96];
    if (!g || !kd__ok_inputs(g, "window_reverse", 1, &win)) return NULL;
    if (ws < 1 || N < 0 || H < 0 || W < 0 || H % ws || W % ws)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "window_reverse: window size %lld does not "
                                                  "divide H = %lld and W = %lld (N = %lld)",
                                    (long long)ws, (long long)H, (long long)W, (long long)N));
    const int64_t nwin = N * (H / ws) * (W / ws);
    int64_t C = -1;
    if (win->ndim == 3 && win->shape[0] == nwin && win->shape[1] == ws * ws) C = win->shape[2];
    if (win->ndim == 4 && win->shape[0] == nwin && win->shape[1] == ws && win->shape[2] == ws)
        C = win->shape[3];
    if (C < 0)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "window_reverse: windows %s must be (%lld, "
                                                  "%lld, C) for N = %lld, H = %lld, W = %lld and "
                                                  "window size %lld",
                                    SHP(win, bw), (long long)nwin, (long long)(ws * ws),
                                    (long long)N, (long long)H, (long long)W, (long long)ws));
    const int64_t s6[6] = {N, H / ws, W / ws, ws, ws, C};
    const int64_t s4[4] = {N, H, W, C};
    return kd_reshape(g, kd_permute(g, kd_reshape(g, win, 6, s6), kd__win_perm), 4, s4);
}

kd_tensor *kd_patch_merge(kd_graph *g, kd_tensor *x) {
    char bx[96];
    if (!g || !kd__ok_inputs(g, "patch_merge", 1, &x)) return NULL;
    if (x->ndim != 4)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "patch_merge: x %s must be (N, H, W, C)",
                                    SHP(x, bx)));
    const int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3];
    if (H % 2 || W % 2)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "patch_merge: H = %lld and W = %lld of x %s "
                                                  "must both be even",
                                    (long long)H, (long long)W, SHP(x, bx)));
    /* (N, H/2, hp, W/2, wp, C) -> (N, H/2, W/2, wp, hp, C): channel block
     * wp * 2 + hp, i.e. x0 (0, 0), x1 (hp 1), x2 (wp 1), x3 (1, 1). */
    static const int perm[6] = {0, 1, 3, 4, 2, 5};
    const int64_t s6[6] = {N, H / 2, 2, W / 2, 2, C};
    const int64_t s4[4] = {N, H / 2, W / 2, 4 * C};
    return kd_reshape(g, kd_permute(g, kd_reshape(g, x, 6, s6), perm), 4, s4);
}
