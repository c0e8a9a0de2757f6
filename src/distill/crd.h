/* Internal pieces of CRD (crd.c), each in its own file so that tests reach
 * them directly:
 *   crd_sampler.c  the contrastive sampler: per class index lists and the draw
 *                  of one positive and K negatives from other classes per
 *                  sample (RepDistiller dataset/cifar100.py
 *                  CIFAR100InstanceSample, modes "exact" and "relax");
 *   crd_nce.c      the NCE loss of one side as a fused gather-and-dot
 *                  kd_function (crd/memory.py ContrastMemory scores and
 *                  crd/criterion.py ContrastLoss), forward and backward,
 *                  without the B x (K+1) x D gathered rows the official code
 *                  materialises; and the bank update (momentum, then
 *                  L2-normalise).
 */
#ifndef KD_DISTILL_CRD_H
#define KD_DISTILL_CRD_H

#include <stdint.h>

#include "kd/autograd.h"
#include "kd/core.h"
#include "kd/distill.h"

/* ------------------------------------------------------------ sampler */

typedef struct {
    int64_t n;         /* training-set size */
    int classes;       /* labels in [0, classes) */
    int64_t *by_class; /* (n) dataset indices sorted by class, stable */
    int64_t *offset;   /* (classes + 1) start of each class in by_class */
} kd__crd_sampler;

/* Builds the class lists of labels[0..n-1]; a label outside [0, classes)
 * is KD_ERR_INVALID naming the index. */
kd_status kd__crd_sampler_init(kd__crd_sampler *s, const int32_t *labels, int64_t n, int classes);
void kd__crd_sampler_free(kd__crd_sampler *s);
/* Size of class c. */
static inline int64_t kd__crd_class_size(const kd__crd_sampler *s, int c) { return s->offset[c + 1] - s->offset[c]; }

/* Row i of out (B x (K+1)): the positive, then K distinct negatives drawn
 * without replacement from the classes other than y[i]. The positive is
 * index[i] (relax 0, RepDistiller "exact") or a uniform index of class y[i]
 * (relax 1). Sample i draws from kd_rng stream (seed, kd_rng_key(key, i)),
 * so a draw depends on (seed, key, i) only, never on the thread count.
 * Negatives are chosen by Floyd's algorithm (O(K) per sample, a bitmap over
 * the other classes' positions); their order within a row is unspecified
 * (the loss sums over them). The caller checks K <= n - size(y[i]). */
kd_status kd__crd_draw(const kd__crd_sampler *s, uint64_t seed, uint64_t key, const int64_t *index,
                       const int32_t *y, int64_t B, int64_t K, int relax, int64_t *out);

/* ------------------------------------------------------------ NCE */

/* One side's ContrastLoss over ContrastMemory's scores, fused:
 *
 *     s_ij = row(i, j) . v_i,   x_ij = exp(s_ij / T) / Z,   c = K / N
 *     L = -(1 / B) sum_i [ log(x_i0 / (x_i0 + c + eps))
 *                          + sum_{j >= 1} log(c / (x_ij + c + eps)) ]
 *
 * with eps = 1e-7 and the rows gathered on the fly, never copied:
 *   row(i, 0) = pos[i] when pos is given (queue mode: the other model's
 *               embedding of the same image), else bank[idx[i][0]];
 *   row(i, j) = bank[idx[i][j]] with idx (B x (K+1)), or bank[j - 1] when
 *               idx is NULL (queue mode: every queue entry is a negative).
 * v is the kd_function's input (B x D, contiguous); bank, pos and idx must
 * stay unchanged until the backward has run. When *z < 0 (the first batch)
 * the forward sets *z = mean(exp(s / T)) * N over the whole B x (K+1) block
 * (RepDistiller's normaliser, then frozen). No gradient reaches bank or pos. */
/* How the scores are computed: AUTO picks DENSE (one GEMM of v against
 * every bank row, then the drawn entries: the rows are mostly reused across
 * the batch, and a GEMM runs near the FMA peak) when the bank has at most
 * KD__CRD_DENSE_RATIO x (K+1) rows (CIFAR: 50000 rows, K 16384) or in queue
 * mode, GATHER (a dot product per drawn row, read in place) otherwise
 * (ImageNet: 1.28M rows). Both give the same loss up to float32 summation
 * order; tests run both. */
enum { KD__CRD_NCE_AUTO = 0, KD__CRD_NCE_GATHER, KD__CRD_NCE_DENSE };
#define KD__CRD_DENSE_RATIO 8

typedef struct {
    int path;          /* KD__CRD_NCE_* */
    const float *bank; /* (rows, D) */
    int64_t bank_rows;
    const float *pos;   /* (B, D) or NULL */
    const int64_t *idx; /* (B, K+1) or NULL */
    int64_t K, D;
    int64_t n_data; /* N of the noise distribution: the training-set size */
    float T;
    float *z; /* the side's normaliser (in the method's state) */
} kd__crd_nce_params;

/* The 0-d loss of v (B x D, contiguous) as a node of g, in *out. */
kd_status kd__crd_nce(kd_graph *g, kd_tensor *v, const kd__crd_nce_params *p, kd_tensor **out);

/* bank[index[i]] <- normalise(momentum * bank[index[i]] + (1 - momentum) * v[i])
 * for i in [0, B), every new row computed from the old bank before any is
 * written (as index_copy_ of rows computed first); a repeated index keeps the
 * last. */
kd_status kd__crd_bank_update(float *bank, int64_t D, const int64_t *index, const float *v, int64_t B, float momentum);

/* ------------------------------------------------------------ method */

/* Tests: replaces the sampler's draw of a crd method (bank modes) by fn,
 * which fills out (B x (K+1)) for the step ctx; NULL restores the sampler. */
typedef kd_status (*kd__crd_draw_fn)(void *user, const kd_step_ctx *ctx, int64_t K, int64_t *out);
void kd__crd_set_draw(kd_method *m, kd__crd_draw_fn fn, void *user);

#endif
