/*
 * kd/backend.h: the device kernels behind the autograd layer, as a vtable.
 *
 * Backends: "ref" (plain C, slow and obviously correct: the oracle of the
 * tests) and "cpu" (oneDNN primitives, cached per shape, with the ref kernels
 * for what oneDNN does not cover). A CUDA backend plugs in the same way.
 *
 * Usage:
 *     kd_backend *be = NULL;
 *     if (kd_backend_get("cpu", &be) != KD_OK) ...;
 *     be->conv2d_forward(be, &p, x, w, b, y);
 *
 * Conventions for every kernel:
 *   - Tensors are float32, contiguous, KD_LAYOUT_STRIDED; on a backend with
 *     `blocked_channels` == 16 the activations of conv2d, batch norm (4-d),
 *     pool2d and eltwise kernels (x, y, dy, dx, and max pooling's ws) may
 *     also be KD_LAYOUT_NCHW16C, each read and written in the layout its own
 *     descriptor says (a conv may take plain x and write blocked y); on a
 *     backend with `bf16`, conv, batch norm and eltwise operands may also be
 *     KD_LAYOUT_NHWC (kd_graph_set_bf16_layout). Weights,
 *     biases, per-channel vectors and their gradients are always plain
 *     (OIHW as in PyTorch). Shapes are checked by the caller (autograd);
 *     kernels may assume them.
 *   - Forward kernels overwrite their outputs.
 *   - Backward kernels take `accumulate`: 0 overwrites the gradient outputs,
 *     1 adds into them (gradient accumulation, several consumers of a tensor).
 *   - A kernel returns KD_OK or a status with kd_error() set; never aborts.
 */
#ifndef KD_BACKEND_H
#define KD_BACKEND_H

#include "kd/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t stride[2];   /* (h, w) */
    int64_t pad[2];      /* (h, w), symmetric as in PyTorch */
    int64_t dilation[2]; /* (h, w); 1 = dense */
    int64_t groups;
    /* Compute precision: 0 float32; 1 bfloat16 multiplies with float32
     * accumulation (backends whose `bf16` is 1). The kernel rounds float32
     * x (dy) and w to bf16 on the way in and writes float32 dx, dw. x may
     * be a bf16 activation (KD_BF16, NCHW16C), read as it is, and y may be
     * one (written in bf16; by a float32 conv, rounded once). Backends
     * without bf16 ignore the flag and never see bf16 tensors. */
    int bf16;
} kd_conv2d_params;

typedef enum { KD_POOL_MAX = 0, KD_POOL_AVG } kd_pool_kind;

typedef struct {
    kd_pool_kind kind;
    int64_t kernel[2], stride[2], pad[2];
    int count_include_pad; /* avg only; PyTorch's default is 1 */
} kd_pool2d_params;

typedef struct {
    float eps;      /* 1e-5 in PyTorch */
    float momentum; /* 0.1 in PyTorch: running = (1-m)*running + m*batch */
    int training;   /* 1: batch statistics, update running stats; 0: running stats */
} kd_bn_params;

typedef enum {
    KD_ELTWISE_RELU = 0,   /* alpha = negative slope: 0 for ReLU, >0 for leaky ReLU */
    KD_ELTWISE_EXP,
    KD_ELTWISE_LOG,
    KD_ELTWISE_GELU,       /* exact GELU x * 0.5 * (1 + erf(x / sqrt(2))); alpha unused */
    KD_ELTWISE_COUNT
} kd_eltwise_kind;

typedef struct kd_backend kd_backend;
struct kd_backend {
    const char *name;
    kd_device device;
    /* Channel block of the blocked activation layout the kernels accept:
     * 16 (KD_LAYOUT_NCHW16C) or 0 (plain tensors only). */
    int blocked_channels;
    /* 1 when conv2d kernels honour kd_conv2d_params.bf16 with native bf16
     * arithmetic (oneDNN on AVX-512-BF16 or AMX); set when the backend is
     * first looked up. Such a backend also takes bf16 activations (KD_BF16,
     * NCHW16C or NHWC) as conv x and y, batch-norm x and y (float32
     * statistics and gradients) and ReLU x, y and backward src (float32 dy,
     * dx), and the float32 gradients and conv inputs of those layouts. */
    int bf16;
    /* The layout of bf16 activations that reaches this machine's fastest
     * bf16 kernels: KD_LAYOUT_NCHW16C, or KD_LAYOUT_NHWC where oneDNN's
     * bf16 backward convolutions run only channels-last (AMX); set with
     * `bf16`. The graph's default (kd_graph_set_bf16_layout). */
    int bf16_layout;
    /* 1 where this machine's bf16 convolutions are known to run slower than
     * its float32 ones, so that bf16 saves memory but costs time: Intel CPUs
     * with AVX-512-BF16 and no AMX, whose `vdpbf16ps` does not outrun two
     * fp32 FMA ports (oneDNN's avx512_core_bf16 kernels measured 0.43-0.67x
     * the fp32 ones on a Xeon, docs/PERFORMANCE.md). 0 otherwise (AMX; AMD
     * Zen 4, where they run about twice as fast). kd_graph_set_precision
     * warns when bf16 is asked for on such a backend. Set with `bf16`. */
    int bf16_slow;

    /* x (N, C, H, W), w (O, C/groups, KH, KW), b (O) or NULL -> y (N, O, OH, OW). */
    kd_status (*conv2d_forward)(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *x,
                                const kd_tensor *w, const kd_tensor *b, kd_tensor *y);
    /* dy, w -> dx (shape of x). */
    kd_status (*conv2d_backward_data)(kd_backend *be, const kd_conv2d_params *p,
                                      const kd_tensor *dy, const kd_tensor *w, kd_tensor *dx,
                                      int accumulate);
    /* dy, x -> dw (shape of w), db (O) or NULL. */
    kd_status (*conv2d_backward_weights)(kd_backend *be, const kd_conv2d_params *p,
                                         const kd_tensor *dy, const kd_tensor *x, kd_tensor *dw,
                                         kd_tensor *db, int accumulate);

    /* Batch norm over axis 1 of x (N, C) or (N, C, H, W). gamma, beta,
     * running_mean, running_var (C). In training mode it writes save_mean and
     * save_rstd (C) = 1/sqrt(biased_var + eps), normalises with the biased
     * variance and updates the running variance with the unbiased one, as
     * PyTorch does. In eval mode save_* may be NULL. */
    kd_status (*batchnorm_forward)(kd_backend *be, const kd_bn_params *p, const kd_tensor *x,
                                   const kd_tensor *gamma, const kd_tensor *beta,
                                   kd_tensor *running_mean, kd_tensor *running_var,
                                   kd_tensor *y, kd_tensor *save_mean, kd_tensor *save_rstd);
    /* Training-mode backward (statistics depend on x). dgamma/dbeta may be NULL. */
    kd_status (*batchnorm_backward)(kd_backend *be, const kd_bn_params *p, const kd_tensor *dy,
                                    const kd_tensor *x, const kd_tensor *gamma,
                                    const kd_tensor *save_mean, const kd_tensor *save_rstd,
                                    kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta,
                                    int accumulate);

    /* x (N, C, H, W) -> y (N, C, OH, OW). For max pooling `ws` is an int32
     * tensor shaped like y that receives the argmax (flat h*W+w index within
     * the input plane); NULL for average pooling. */
    kd_status (*pool2d_forward)(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *x,
                                kd_tensor *y, kd_tensor *ws);
    kd_status (*pool2d_backward)(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *dy,
                                 const kd_tensor *ws, kd_tensor *dx, int accumulate);

    /* Row-major C (M, N) = alpha * op(A) @ op(B) + beta * C, op = transpose
     * when trans_* is 1. A is (M, K) (or (K, M) transposed) with leading
     * dimension lda, likewise B (K, N) and C. */
    kd_status (*gemm)(kd_backend *be, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                      float alpha, const float *A, int64_t lda, const float *B, int64_t ldb,
                      float beta, float *C, int64_t ldc);

    /* Batched gemm: for i in [0, batch), C_i = alpha * op(A_i) @ op(B_i) +
     * beta * C_i as in gemm, with A_i = A + i * stride_a (floats), likewise
     * B_i and C_i. */
    kd_status (*gemm_batch)(kd_backend *be, int64_t batch, int trans_a, int trans_b, int64_t M,
                            int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                            int64_t stride_a, const float *B, int64_t ldb, int64_t stride_b,
                            float beta, float *C, int64_t ldc, int64_t stride_c);

    /* Layer norm over the last axis: x and y (..., D) seen as (R, D) rows;
     * y = (x - mean) * rstd * gamma + beta per row, rstd = 1/sqrt(var + eps)
     * with the biased variance (PyTorch nn.LayerNorm). gamma and beta (D) or
     * both NULL (no affine). save_mean and save_rstd (R elements) receive the
     * row statistics; both NULL for inference. */
    kd_status (*layernorm_forward)(kd_backend *be, float eps, const kd_tensor *x,
                                   const kd_tensor *gamma, const kd_tensor *beta, kd_tensor *y,
                                   kd_tensor *save_mean, kd_tensor *save_rstd);
    /* With xhat = (x - mean) * rstd and g = dy * gamma: dx = rstd * (g -
     * mean_D(g) - xhat * mean_D(g * xhat)), dgamma = sum_R(dy * xhat), dbeta =
     * sum_R(dy). dx, dgamma, dbeta may each be NULL (dgamma/dbeta need gamma). */
    kd_status (*layernorm_backward)(kd_backend *be, float eps, const kd_tensor *dy,
                                    const kd_tensor *x, const kd_tensor *gamma,
                                    const kd_tensor *save_mean, const kd_tensor *save_rstd,
                                    kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta,
                                    int accumulate);

    /* Softmax over the last axis: x and y (..., C) seen as (R, C) rows, y =
     * exp(x - max) / sum(exp(x - max)) per row. */
    kd_status (*softmax_forward)(kd_backend *be, const kd_tensor *x, kd_tensor *y);
    /* dx (+)= y * (dy - sum_C(y * dy)) per row, from the forward's y. */
    kd_status (*softmax_backward)(kd_backend *be, const kd_tensor *y, const kd_tensor *dy,
                                  kd_tensor *dx, int accumulate);

    /* y = f(x) elementwise; alpha as documented per kind. */
    kd_status (*eltwise_forward)(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                 const kd_tensor *x, kd_tensor *y);
    /* dx (+)= dy * f'(.) where `src` is x for LOG and GELU, y for EXP, and for RELU x or,
     * when alpha >= 0, y (only its sign is used; autograd passes y then). */
    kd_status (*eltwise_backward)(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                  const kd_tensor *dy, const kd_tensor *src, kd_tensor *dx,
                                  int accumulate);

    /* Releases cached primitives and scratch memory (not the backend itself). */
    void (*trim)(kd_backend *be);
    void *impl; /* backend-private state (primitive cache, engine, stream) */
};

/* Looks up a built-in backend by name ("ref", "cpu"). The returned object is
 * process-wide and thread-compatible (one graph at a time per backend). */
kd_status kd_backend_get(const char *name, kd_backend **out);

/* Default backend for new graphs ("cpu" when oneDNN is built in). */
kd_backend *kd_backend_default(void);

/* Output spatial size of a convolution or pooling window. */
static inline int64_t kd_conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad,
                                       int64_t dil) {
    return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

#ifdef __cplusplus
}
#endif
#endif /* KD_BACKEND_H */
