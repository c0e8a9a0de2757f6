/*
 * kd/autograd.h: define-by-run reverse-mode differentiation.
 *
 * A kd_graph owns an arena (activations of one step) and a tape (the ops run
 * so far). Every op below computes its output at once on the graph's backend
 * and, when gradients are enabled and an input requires them, records itself
 * on the tape. kd_backward() walks the tape in reverse. Parameters are heap
 * tensors with persistent .grad buffers that accumulate (+=) across backward
 * calls until the optimiser zeroes them (gradient accumulation).
 *
 * Errors are sticky: an op that fails records the status on the graph and
 * returns NULL; an op given a NULL input returns NULL at once. Check
 * kd_graph_status() (or the result of kd_backward) once per step.
 *
 * Memory: op outputs live in the graph's arena until kd_graph_reset, unless
 * a scope releases them earlier (kd_graph_scope_begin/_end below, the C
 * analogue of Python variables going out of scope): a released buffer is
 * reused by later op outputs and gradients of the same size, so a no-grad
 * forward holds one block's intermediates at a time, and a training forward
 * holds only what backward rules read.
 *
 * Usage:
 *     kd_graph *g; kd_graph_init(&g, kd_backend_default());
 *     for (step...) {
 *         kd_graph_reset(g);                       // reuses the arena, no malloc
 *         kd_tensor *x = kd_graph_input(g, batch); // wraps caller memory
 *         kd_tensor *h = kd_relu(g, kd_conv2d(g, x, w, NULL, &p));
 *         kd_tensor *loss = kd_cross_entropy(g, kd_linear(g, kd_flatten(g, h), fc_w, fc_b),
 *                                            labels, 0.0f);
 *         if (kd_backward(g, loss) != KD_OK) ...;
 *     }
 *     kd_graph_free(g);
 */
#ifndef KD_AUTOGRAD_H
#define KD_AUTOGRAD_H

#include "kd/backend.h"
#include "kd/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One enum for every differentiable op. Keep kd__op_table in src/autograd in
 * the same order; a static assertion checks the count. */
typedef enum {
    KD_OP_CONV2D = 0,
    KD_OP_BATCHNORM,     /* 1d (N, C) and 2d (N, C, H, W) */
    KD_OP_LINEAR,        /* y = x W^T + b, W (out, in) as in PyTorch */
    KD_OP_MATMUL,        /* (M, K) @ (K, N) */
    KD_OP_RELU,
    KD_OP_LEAKY_RELU,
    KD_OP_ADD,
    KD_OP_MUL,
    KD_OP_SCALE,         /* y = s * x, s a constant */
    KD_OP_AVGPOOL2D,
    KD_OP_MAXPOOL2D,
    KD_OP_GLOBAL_AVGPOOL, /* (N, C, H, W) -> (N, C) */
    KD_OP_RESHAPE,       /* also flatten */
    KD_OP_TRANSPOSE,     /* swap two axes */
    KD_OP_CONCAT,
    KD_OP_SLICE,
    KD_OP_SOFTMAX,       /* over the last axis */
    KD_OP_LOG_SOFTMAX,   /* over the last axis */
    KD_OP_CROSS_ENTROPY, /* mean over the batch, label smoothing */
    KD_OP_KL_DIV,        /* KL(softmax(t/T) || softmax(s/T)) * T^2, batch-mean */
    KD_OP_MSE,           /* mean((a - b)^2) */
    KD_OP_L2_NORMALIZE,  /* x / max(||x||_2, eps) over the last axis */
    KD_OP_MEAN,          /* over all elements -> scalar */
    KD_OP_SUM,           /* over all elements -> scalar */
    KD_OP_EXP,
    KD_OP_LOG,
    KD_OP_DROPOUT,       /* inverted dropout, counter-based mask */
    KD_OP_SIGMOID,       /* 1 / (1 + exp(-x)) */
    KD_OP_HARDSWISH,     /* x * relu6(x + 3) / 6 (PyTorch nn.Hardswish) */
    KD_OP_HARDSIGMOID,   /* relu6(x + 3) / 6 (PyTorch nn.Hardsigmoid) */
    KD_OP_SILU,          /* x * sigmoid(x) (swish) */
    KD_OP_RELU6,         /* min(max(x, 0), 6) */
    KD_OP_MUL_CHANNEL,   /* x (N, C, H, W) * s (N, C) or (N, 1) broadcast over H, W */
    KD_OP_TO_STRIDED,    /* layout conversion (values unchanged): NCHW16C -> strided
                          * before ops that need plain tensors (and the reverse for
                          * kd_graph_to_blocked), and bf16 activations widened to
                          * float32; the backward reorders the gradient */
    KD_OP_FUNCTION,      /* a kd_function: plain-C forward and backward given by the caller */
    /* Transformer ops (Swin, DINO heads). */
    KD_OP_LAYERNORM,     /* over the last axis, affine (PyTorch nn.LayerNorm) */
    KD_OP_GELU,          /* exact (erf) GELU, PyTorch nn.GELU() */
    KD_OP_BMM,           /* batched matmul over leading dims, optional transposes */
    KD_OP_PERMUTE,       /* general axis permutation (copy) */
    KD_OP_ROLL,          /* cyclic shift along axes (torch.roll) */
    KD_OP_INDEX_SELECT,  /* rows of a table by int64 index; backward scatter-adds */
    KD_OP_ADD_BCAST,     /* x + b, b broadcast (numpy rules, same ndim) */
    KD_OP_DROP_PATH,     /* stochastic depth: one keep/drop per sample (dim 0) */
    KD_OP_WEIGHT_NORM,   /* w = g * v / ||v|| per row (torch weight_norm, dim 0) */
    KD_OP_WINDOW_ATTENTION, /* fused multi-head (window) self-attention from packed qkv */
    KD_OP_COUNT
} kd_op;

typedef struct {
    const char *name;
    int has_forward;   /* a plain-C reference forward exists (own code or the ref backend) */
    int has_backward;  /* a backward rule exists */
} kd_op_info;

/* Introspection for tests and `kd info`: one entry per kd_op. */
const kd_op_info *kd_op_get_info(kd_op op);

typedef struct kd_graph kd_graph;

kd_status kd_graph_init(kd_graph **out, kd_backend *be);
void kd_graph_free(kd_graph *g);
/* Clears the tape, the arena and the sticky status; keeps the memory. */
void kd_graph_reset(kd_graph *g);
kd_status kd_graph_status(const kd_graph *g);
kd_backend *kd_graph_backend(const kd_graph *g);
kd_arena *kd_graph_arena(const kd_graph *g);
/* With gradients disabled no op is recorded (teachers, evaluation). Returns
 * the previous setting. */
int kd_graph_set_grad_enabled(kd_graph *g, int enabled);
int kd_graph_grad_enabled(const kd_graph *g);
/* Seed and stream key for dropout masks drawn in this step. */
void kd_graph_set_rng(kd_graph *g, uint64_t seed, uint64_t step_key);
/* Activation layout optimisation: with it on (only on backends with
 * `blocked_channels`, e.g. "cpu"; off by default for now, KD_LAYOUT_OPT=1 in
 * the environment turns the default on) conv2d writes KD_LAYOUT_NCHW16C outputs when O % 16 == 0,
 * and batch norm, pooling, the activations, add/mul, scale, dropout,
 * mul_channel and global_avgpool keep that layout; every other op converts
 * a blocked input to strided first (a recorded KD_OP_TO_STRIDED node).
 * Tensors a caller reads directly (features, kd_model_out) may therefore be
 * blocked: use kd_graph_to_strided. Returns the previous setting; has no
 * effect on backends without blocked layouts. */
int kd_graph_set_layout_opt(kd_graph *g, int on);
int kd_graph_layout_opt(const kd_graph *g);
/* x as a plain strided float32 tensor: x itself when it is one, else a
 * converted copy (differentiable; a bf16 activation is widened exactly).
 * NULL in, NULL out. */
kd_tensor *kd_graph_to_strided(kd_graph *g, kd_tensor *x);
/* x in KD_LAYOUT_NCHW16C when the backend supports it and x is a 4-d float32
 * tensor with C % 16 == 0 (differentiable); otherwise x itself. */
kd_tensor *kd_graph_to_blocked(kd_graph *g, kd_tensor *x);

/* Compute precision of the graph's convolutions: KD_F32 (default) or KD_BF16
 * (bf16 multiplies, float32 accumulation). In a bf16 graph blocked conv
 * outputs are bf16 activations (KD_BF16, in the graph's bf16 layout: see
 * kd_graph_set_bf16_layout), which batch norm, ReLU /
 * leaky ReLU and the add of two of them keep; every other op widens them to
 * float32 first (kd_graph_to_strided gives float32 too). Gradients and the
 * parameters stay float32, so the optimiser keeps float32 master weights.
 * KD_BF16 needs a backend with native bf16 (`be->bf16`): otherwise
 * KD_ERR_UNSUPPORTED with a message, and the setting is unchanged. On a
 * backend whose bf16 is known to be slower than float32 (`be->bf16_slow`)
 * KD_BF16 is set and a warning (once per process) is logged that says so. */
kd_status kd_graph_set_precision(kd_graph *g, kd_dtype compute);
kd_dtype kd_graph_precision(const kd_graph *g);
/* Layout of the bf16 activations of a bf16 graph: KD_LAYOUT_NCHW16C or
 * KD_LAYOUT_NHWC (channels-last). The default is the backend's
 * `bf16_layout` (the cpu backend: NHWC on CPUs with AMX, whose bf16
 * backward convolutions oneDNN runs only channels-last, NCHW16C elsewhere);
 * KD_BF16_LAYOUT=nhwc or =nchw16c in the environment overrides it (to
 * compare). Either way an NHWC activation is widened to plain float32 for
 * every op but conv, batch norm, ReLU / leaky ReLU and add. Returns
 * KD_ERR_INVALID for another layout. */
kd_status kd_graph_set_bf16_layout(kd_graph *g, kd_layout layout);
kd_layout kd_graph_bf16_layout(const kd_graph *g);

/* A sum over the processes of a data-parallel run, in place on n doubles;
 * every process calls it at the same points with the same n. */
typedef kd_status (*kd_sum_fn)(double *buf, int64_t n, void *user);
/* Synchronised batch norm (PyTorch's SyncBatchNorm). With sum set, every
 * training-mode kd_batchnorm of g normalises with the statistics of the
 * global batch: the per-channel counts, sums and squared deviations are
 * summed over the processes in the forward (two calls of sum), and so are
 * the backward's sums of dy and dy * xhat (one call), each process's scaled
 * by grad_scale, the factor that turns its gradients into those of the
 * global loss (its rows over the global batch's when its loss is a mean over
 * its rows). The running statistics move toward the global ones. gamma and
 * beta get this process's share (the caller sums parameter gradients).
 * sum NULL (the default): statistics of this process's batch. */
void kd_graph_set_sync_bn(kd_graph *g, kd_sum_fn sum, void *user, double grad_scale);
/* Gradient readiness (data parallelism: a bucket's all-reduce starts while
 * backward goes on). During kd_backward, fn(user, i) is called for watch[i]
 * as soon as its gradient is final: right after the rule of the earliest
 * tape node that has watch[i] among its inputs ran. Tensors no recorded
 * node reads are not reported. watch must stay valid while set; fn NULL
 * clears the hook. Only the backward rules of recorded nodes may write the
 * gradients of watched tensors. */
typedef void (*kd_grad_ready_fn)(void *user, int index);
void kd_graph_set_grad_hook(kd_graph *g, kd_grad_ready_fn fn, void *user, kd_tensor *const *watch, int n);

/* Number of ops currently on the tape. */
int kd_graph_tape_size(const kd_graph *g);
/* Heap allocations made on behalf of the graph so far (arena chunks, tape
 * and buffer-table growth, leaf .grad buffers). Constant across steps of an
 * unchanged shape. */
size_t kd_graph_heap_allocs(const kd_graph *g);

/* Scopes. Every op output (and kd_graph_tensor) whose data takes at least
 * 64 KiB is a tracked buffer. kd_graph_scope_end releases each tracked
 * buffer allocated since the matching kd_graph_scope_begin unless
 *   (a) it is the data of one of the `keep` tensors (NULL entries are
 *       skipped; a view made by kd_reshape/kd_flatten keeps its base), or
 *   (b) the backward rule of a recorded op reads it (a conv's input, a batch
 *       norm's input, a ReLU's output, ...): then it is released during
 *       kd_backward, right after the last rule that reads it has run.
 * Kept buffers belong to the enclosing scope from then on (or to the step,
 * at top level). Tensors allocated before the scope began are not affected.
 * With gradients off nothing is retained by (b). A released tensor's
 * descriptor stays valid, but its data must not be read again (under
 * AddressSanitizer doing so is reported). Scopes nest and must end in
 * reverse order; small tensors are never released before kd_graph_reset.
 * After a backward that released saved buffers, the tape cannot be walked
 * a second time (kd_backward fails): record the step again.
 *
 *     size_t s = kd_graph_scope_begin(g);
 *     kd_tensor *h = kd_relu(g, kd_batchnorm(g, kd_conv2d(g, x, w, NULL, &p), ...));
 *     h = kd_graph_scope_return(g, s, h);   // conv and BN outputs released
 */
size_t kd_graph_scope_begin(kd_graph *g);
void kd_graph_scope_end(kd_graph *g, size_t scope, int n_keep, kd_tensor *const *keep);
/* kd_graph_scope_end keeping only `keep`; returns keep (NULL stays NULL). */
kd_tensor *kd_graph_scope_return(kd_graph *g, size_t scope, kd_tensor *keep);
/* Scopes release buffers (the default) or, with 0, do nothing, so that
 * every activation lives until kd_graph_reset (KD_MEM_RELEASE=0 in the
 * environment sets the default). Results are bit-identical either way.
 * Returns the previous setting. */
int kd_graph_set_mem_release(kd_graph *g, int on);
int kd_graph_mem_release(const kd_graph *g);
/* The most arena bytes (activations, gradients, descriptors, saved values)
 * in use at any time since kd_graph_init. */
size_t kd_graph_peak_bytes(const kd_graph *g);

/* A new arena tensor (uninitialised data, no grad); NULL with the status set on failure. */
kd_tensor *kd_graph_tensor(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape);
/* A zero-filled arena tensor. */
kd_tensor *kd_graph_zeros(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape);
/* An arena descriptor that views caller memory (not copied, not owned). */
kd_tensor *kd_graph_wrap(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape, void *data);

/* Seeds d(loss)/d(loss) = 1 (loss must have one element) and runs the tape
 * backwards, accumulating into every .grad that requires it. Gradients of
 * op outputs other than the loss are recycled as soon as their op's rule has
 * used them: afterwards only leaves' (parameters') .grad can be read. Saved
 * activations whose scope has ended are recycled after the last rule that
 * reads them; a tape that had any cannot be walked again (KD_ERR_INVALID). */
kd_status kd_backward(kd_graph *g, kd_tensor *loss);

/* ---------------------------------------------------------------- ops
 * Shapes: x (N, C, H, W) for images; (N, D) for vectors. */

kd_tensor *kd_conv2d(kd_graph *g, kd_tensor *x, kd_tensor *w, kd_tensor *b,
                     const kd_conv2d_params *p);
/* Batch norm; in training mode it updates running_mean/var in place. */
kd_tensor *kd_batchnorm(kd_graph *g, kd_tensor *x, kd_tensor *gamma, kd_tensor *beta,
                        kd_tensor *running_mean, kd_tensor *running_var, const kd_bn_params *p);
kd_tensor *kd_linear(kd_graph *g, kd_tensor *x, kd_tensor *w, kd_tensor *b);
kd_tensor *kd_matmul(kd_graph *g, kd_tensor *a, kd_tensor *b);
kd_tensor *kd_relu(kd_graph *g, kd_tensor *x);
kd_tensor *kd_leaky_relu(kd_graph *g, kd_tensor *x, float slope);
kd_tensor *kd_add(kd_graph *g, kd_tensor *a, kd_tensor *b); /* same shape */
kd_tensor *kd_mul(kd_graph *g, kd_tensor *a, kd_tensor *b); /* same shape */
kd_tensor *kd_scale(kd_graph *g, kd_tensor *x, float s);
kd_tensor *kd_avgpool2d(kd_graph *g, kd_tensor *x, int64_t kernel, int64_t stride, int64_t pad);
kd_tensor *kd_maxpool2d(kd_graph *g, kd_tensor *x, int64_t kernel, int64_t stride, int64_t pad);
kd_tensor *kd_pool2d(kd_graph *g, kd_tensor *x, const kd_pool2d_params *p);
kd_tensor *kd_global_avgpool(kd_graph *g, kd_tensor *x);
kd_tensor *kd_reshape(kd_graph *g, kd_tensor *x, int ndim, const int64_t *shape);
kd_tensor *kd_flatten(kd_graph *g, kd_tensor *x); /* (N, ...) -> (N, rest) */
kd_tensor *kd_transpose(kd_graph *g, kd_tensor *x, int dim0, int dim1);
kd_tensor *kd_concat(kd_graph *g, kd_tensor *const *xs, int n, int dim);
kd_tensor *kd_slice(kd_graph *g, kd_tensor *x, int dim, int64_t start, int64_t end);
kd_tensor *kd_softmax(kd_graph *g, kd_tensor *x);
kd_tensor *kd_log_softmax(kd_graph *g, kd_tensor *x);
/* logits (N, C), labels I32 or I64 (N) -> scalar mean over N. */
kd_tensor *kd_cross_entropy(kd_graph *g, kd_tensor *logits, const kd_tensor *labels,
                            float label_smoothing);
/* RepDistiller DistillKL: sum KL(softmax(t/T) || softmax(s/T)) * T^2 / N.
 * Gradients flow to both inputs when they require them. */
kd_tensor *kd_kl_div(kd_graph *g, kd_tensor *student_logits, kd_tensor *teacher_logits, float T);
kd_tensor *kd_mse(kd_graph *g, kd_tensor *a, kd_tensor *b);
kd_tensor *kd_l2_normalize(kd_graph *g, kd_tensor *x, float eps);
kd_tensor *kd_mean(kd_graph *g, kd_tensor *x);
kd_tensor *kd_sum(kd_graph *g, kd_tensor *x);
kd_tensor *kd_exp(kd_graph *g, kd_tensor *x);
kd_tensor *kd_log(kd_graph *g, kd_tensor *x);
/* Inverted dropout with keep-probability 1-p; identity when !training or p == 0. */
kd_tensor *kd_dropout(kd_graph *g, kd_tensor *x, float p, int training);

/* Smooth and piecewise-linear activations of the mobile networks (plain C,
 * any shape). At the kinks of the piecewise ones the gradient follows
 * PyTorch: hardswish uses (2x + 3) / 6 on [-3, 3]; hardsigmoid and relu6
 * have zero gradient at and outside the ends of their linear pieces. */
kd_tensor *kd_sigmoid(kd_graph *g, kd_tensor *x);
kd_tensor *kd_hardswish(kd_graph *g, kd_tensor *x);
kd_tensor *kd_hardsigmoid(kd_graph *g, kd_tensor *x);
kd_tensor *kd_silu(kd_graph *g, kd_tensor *x);
kd_tensor *kd_relu6(kd_graph *g, kd_tensor *x);
/* Channel scaling for squeeze-and-excitation and stochastic depth:
 * y = x * s[:, :, None, None] for x (N, C, H, W) and s (N, C), or
 * y = x * s[:, 0, None, None, None] for s (N, 1). Gradients flow to both. */
kd_tensor *kd_mul_channel(kd_graph *g, kd_tensor *x, kd_tensor *s);

/* ---------------------------------------------------- transformer ops
 * Tokens are (..., D) with the feature axis last, as in PyTorch. */

/* Layer normalisation over the last axis (D): y = (x - mean) / sqrt(var + eps)
 * * gamma + beta with the biased variance; gamma and beta (D) or both NULL. */
kd_tensor *kd_layernorm(kd_graph *g, kd_tensor *x, kd_tensor *gamma, kd_tensor *beta, float eps);
/* GELU with the exact erf form, x * 0.5 * (1 + erf(x / sqrt(2))) (any shape). */
kd_tensor *kd_gelu(kd_graph *g, kd_tensor *x);
/* Batched matmul: a (..., M, K) @ b (..., K, N) -> (..., M, N), the leading
 * (batch) dims equal in a and b (ndim >= 3). trans_a: a is (..., K, M) and
 * op(a) its transpose; trans_b likewise (q @ k^T is kd_bmm(g, q, k, 0, 1)). */
kd_tensor *kd_bmm(kd_graph *g, kd_tensor *a, kd_tensor *b, int trans_a, int trans_b);
/* y = x.permute(perm) made contiguous; perm a permutation of 0..ndim-1. */
kd_tensor *kd_permute(kd_graph *g, kd_tensor *x, const int *perm);
/* torch.roll(x, shifts, dims) over n axes (shifts may be negative). */
kd_tensor *kd_roll(kd_graph *g, kd_tensor *x, int n, const int *dims, const int64_t *shifts);
/* table (L, D), index (M) int64 in [0, L) -> (M, D), y[m] = table[index[m]];
 * d table accumulates every row that was read (repeats add). */
kd_tensor *kd_index_select(kd_graph *g, kd_tensor *table, const kd_tensor *index);
/* x + b with b broadcast to x: same ndim, each b dim 1 or x's; the gradient
 * of b sums over the broadcast axes. */
kd_tensor *kd_add_bcast(kd_graph *g, kd_tensor *x, kd_tensor *b);
/* Stochastic depth (torchvision StochasticDepth, mode "row"): each sample
 * (index along dim 0) is kept with probability 1-p and scaled by 1/(1-p), or
 * zeroed; counter-based mask from the graph's rng like kd_dropout. Identity
 * when !training or p == 0. */
kd_tensor *kd_drop_path(kd_graph *g, kd_tensor *x, float p, int training);
/* Weight normalisation over rows: v (O, I), gain (O) or NULL for a gain of
 * 1 (DINO's norm_last_layer) -> w (O, I), w[o] = gain[o] * v[o] / ||v[o]||.
 * A weight-normalised linear layer is kd_linear(g, x, kd_weight_norm(...), b). */
kd_tensor *kd_weight_norm(kd_graph *g, kd_tensor *v, kd_tensor *gain);
/* Fused multi-head self-attention over windows (Swin's W-MSA, torchvision's
 * shifted_window_attention after the qkv linear and before proj): qkv (Bw,
 * N, 3C) packed as the qkv linear writes it, (Bw, N, 3, heads, C/heads);
 * per window b and head h, softmax(q k^T * (C/heads)^-0.5 [+ bias[h]]
 * [+ mask[b % nW]]) v, with q scaled first, written to (Bw, N, C) in
 * (N, heads, C/heads) order. bias (heads, N, N) or NULL (differentiable:
 * Swin's gathered relative position bias); mask (nW, N, N) or NULL (a
 * constant: the shifted-window mask), nW dividing Bw. The same as the chain
 * of permute, slice, scale, kd_bmm, kd_add_bcast, kd_softmax, kd_bmm,
 * permute, without its copies. */
kd_tensor *kd_window_attention(kd_graph *g, kd_tensor *qkv, kd_tensor *bias, const kd_tensor *mask, int64_t heads);
/* Swin window helpers, composed of reshapes and kd_permute (so their
 * gradients are the permutes'): x (N, H, W, C) with ws dividing H and W ->
 * (N * H/ws * W/ws, ws*ws, C), windows in row-major order as in Swin's
 * window_partition; kd_window_reverse inverts it given N, H, W. */
kd_tensor *kd_window_partition(kd_graph *g, kd_tensor *x, int64_t ws);
kd_tensor *kd_window_reverse(kd_graph *g, kd_tensor *win, int64_t ws, int64_t N, int64_t H, int64_t W);
/* Swin patch merging's gather (torchvision PatchMerging before its norm and
 * reduction): x (N, H, W, C), H and W even -> (N, H/2, W/2, 4C) =
 * cat(x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]) on C. */
kd_tensor *kd_patch_merge(kd_graph *g, kd_tensor *x);

/* ------------------------------------------------------ custom functions
 * The C analogue of torch.autograd.Function: a fused loss or kernel written
 * in plain C with its own backward, recorded on the tape like any op (as
 * KD_OP_FUNCTION). Distillation methods use it for losses that would be long
 * chains of small ops (RKD's distance and angle terms, DKD's masked
 * softmaxes, CRD's gather-and-dot). Inputs: 1 to 3 float32 tensors (a
 * blocked input is converted to strided first); the backward rule reads the
 * inputs and the output, which are retained for it.
 *
 *     static kd_status sq_fwd(kd_graph *g, const void *p, kd_tensor *const *in, int n_in,
 *                             kd_tensor *out, void **saved) { ...out = sum(in[0]^2)... }
 *     static kd_status sq_bwd(kd_graph *g, const void *p, void *saved, kd_tensor *const *in,
 *                             int n_in, const kd_tensor *out, const kd_tensor *gout,
 *                             kd_tensor *const *gin) { ...gin[0] += 2 x gout... }
 *     static const kd_function sq = {"sumsq", sq_fwd, sq_bwd};
 *     kd_tensor *y = kd_function_apply(g, &sq, NULL, 0, 1, &x, 0, NULL);   // 0-d
 */
typedef struct {
    const char *name;
    /* Writes out (already allocated, out_shape) from in[0..n_in-1]. params
     * is the graph's copy of the caller's parameter block. *saved may be set
     * to memory from kd_function_alloc for the backward. */
    kd_status (*forward)(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                         void **saved);
    /* ADDS d loss / d in[i] into gin[i] (NULL where in[i] needs no
     * gradient), given gout = d loss / d out. */
    kd_status (*backward)(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                          const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin);
} kd_function;

/* Runs fn on in[0..n_in-1] (1 <= n_in <= 3) into a new float32 tensor of
 * out_shape (out_ndim 0: a scalar); params_size bytes of params are copied
 * into the graph for the backward. Sticky errors as every op. */
kd_tensor *kd_function_apply(kd_graph *g, const kd_function *fn, const void *params, size_t params_size,
                             int n_in, kd_tensor *const *in, int out_ndim, const int64_t *out_shape);
/* Arena memory valid until kd_graph_reset (saved values of a function);
 * NULL with the status set on failure. */
void *kd_function_alloc(kd_graph *g, size_t bytes);

#ifdef __cplusplus
}
#endif
#endif /* KD_AUTOGRAD_H */
