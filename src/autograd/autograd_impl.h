/*
 * autograd_impl.h: the graph, the tape node and the helpers shared by the
 * files of src/autograd. Internal to libkd (and its tests).
 *
 * A node records one op: its inputs, its output, its constant parameters and
 * the values its backward rule needs (saved in the graph's arena). The tape is
 * a growable array of nodes whose capacity survives kd_graph_reset(), so a
 * step of a shape already seen allocates nothing.
 *
 * Memory: the data of every op output of at least `track_min` bytes is a
 * tracked buffer (an entry of g->mem). kd_graph_scope_end releases the
 * tracked buffers of a scope that the caller does not keep: to the free list
 * of their size at once, or, when a recorded node's backward rule reads them
 * (the op's `retain` flags), once kd_backward has run the first such node.
 */
#ifndef KD_AUTOGRAD_IMPL_H
#define KD_AUTOGRAD_IMPL_H

#include "kd/autograd.h"

#include <stddef.h>
#include <stdint.h>

#define KD__NODE_MAX_IN 3
#define KD__NODE_MAX_RET 6 /* in[0..2], out, saved[0..1] */

typedef struct {
    kd_op op;
    int n_in;
    kd_tensor *in[KD__NODE_MAX_IN]; /* NULL for an absent optional input (bias) */
    kd_tensor **in_list;            /* concat: n_in inputs, arena array */
    kd_tensor *out;
    kd_tensor *saved[2]; /* bn mean/rstd (C), maxpool argmax, kl log-probabilities */
    float *aux;          /* per-row values: logsumexp (cross_entropy), norms (l2_normalize) */
    /* Tracked buffers (g->mem indices) that this node is the first on the
     * tape to retain: the last backward rule that reads them is this one. */
    int32_t ret[KD__NODE_MAX_RET];
    int n_ret;
    union {
        kd_conv2d_params conv;
        struct {
            kd_bn_params p;
            int view4d; /* 1 when x was (N, C, L), run as (N, C, L, 1) */
            int sync;   /* statistics of the global batch (kd_graph_set_sync_bn) */
            double count, scale; /* sync: values per channel in the global batch; grad_scale */
        } bn;
        kd_pool2d_params pool;
        struct {
            float a, b; /* slope, scale, T, eps, label smoothing, dropout p */
            uint64_t seed, key; /* dropout stream */
        } f;
        struct {
            int d0, d1;
            int64_t start, end;
        } dims;
        struct {
            int32_t *labels; /* (N), arena copy */
            float smoothing;
        } ce;
        struct {
            const kd_function *fn;
            void *params; /* arena copy of the caller's block */
            void *saved;  /* what the forward kept for the backward */
        } fn;
        struct {
            int64_t v[KD_MAX_DIMS]; /* permute: perm; roll: shift per axis in [0, n) */
        } lay;
    } p;
} kd__node;

/* Free list of released buffers (activations and intermediate gradients)
 * of one rounded byte size, singly linked through the first bytes of each
 * free buffer; poisoned under AddressSanitizer while free. */
typedef struct {
    size_t bytes;
    void *head;
} kd__bin;

#define KD__BINS 256 /* distinct sizes recycled per step; further sizes are not */

/* Activation data from this many (rounded) bytes up is tracked and
 * released by scopes; smaller tensors stay plain arena allocations. */
#define KD__TRACK_MIN ((size_t)64 << 10)

typedef enum {
    KD__MEM_LIVE = 0, /* reachable by the caller: inside an open scope, kept, or top level */
    KD__MEM_ORPHAN,   /* its scope ended; only a recorded node still reads it */
    KD__MEM_FREE      /* back on a free list (the buffer may serve a newer entry) */
} kd__mem_state;

/* One tracked activation buffer. The table is append-only within a step
 * (indices stay valid until kd_graph_reset) and keeps its capacity. */
typedef struct {
    unsigned char *p;
    size_t bytes;       /* rounded size, the free-list class */
    int32_t first_node; /* lowest tape index of a node whose rule reads it; -1 none */
    uint8_t state;      /* kd__mem_state */
    uint8_t keep;       /* mark during kd_graph_scope_end */
} kd__mem;

typedef kd_status (*kd__backward_fn)(kd_graph *g, kd__node *n);

/* Which of a node's tensors its backward rule reads (retains). */
enum {
    KD__RET_IN0 = 1,
    KD__RET_IN1 = 2,
    KD__RET_IN2 = 4,
    KD__RET_OUT = 8,
    KD__RET_SAVED = 16 /* saved[0] and saved[1] */
};

/* An op's public forward entry point (kd_conv2d, kd_add, ...), type-erased:
 * the table only tests it for NULL and never calls it through this type. */
typedef void (*kd__op_fn)(void);

/* Which backend kernels an op's forward and backward call through g->be;
 * kd__op_info_derive requires them from the reference backend. */
enum {
    KD__K_CONV2D = 1,  /* conv2d_forward; conv2d_backward_data, conv2d_backward_weights */
    KD__K_BN = 2,      /* batchnorm_forward; batchnorm_backward */
    KD__K_POOL2D = 4,  /* pool2d_forward; pool2d_backward */
    KD__K_GEMM = 8,    /* gemm (forward and backward) */
    KD__K_ELTWISE = 16, /* eltwise_forward; eltwise_backward */
    KD__K_LN = 32,      /* layernorm_forward; layernorm_backward */
    KD__K_GEMM_BATCH = 64, /* gemm_batch (forward and backward) */
    KD__K_SOFTMAX = 128    /* softmax_forward; softmax_backward */
};

typedef struct {
    const char *name;
    kd__op_fn forward;        /* public forward entry point */
    kd__backward_fn backward; /* the backward rule kd_backward calls */
    unsigned kernels;         /* KD__K_* */
    unsigned retain;          /* KD__RET_* */
} kd__op_entry;

/* One entry per kd_op, in enum order (graph.c; sized there by its entries). */
extern const kd__op_entry kd__op_table[];

/* kd_op_info of one table entry, derived from the function pointers:
 * has_forward when e->forward is set and `be` has every forward kernel the op
 * calls, has_backward likewise for e->backward and the backward kernels.
 * kd_op_get_info applies it with the reference backend. */
void kd__op_info_derive(const kd__op_entry *e, const kd_backend *be, kd_op_info *out);

/* Checks a table of n entries against backend `be`: every entry has a name
 * (no hole in the designated initialisers), a name no other entry has, a
 * forward and a backward (kd__op_info_derive). Writes one line per problem
 * into msg (cap bytes, truncated, may be NULL) and returns the number of
 * problems. The tests run it on kd__op_table and on broken copies of it. */
int kd__op_table_check(const kd__op_entry *t, int n, const kd_backend *be, char *msg, size_t cap);

struct kd_graph {
    kd_backend *be;
    kd_arena *arena;  /* descriptors, data and saved values of one step */
    kd__node *tape;   /* (cap) */
    int n_nodes, cap; /* cap kept across resets */
    kd_status status; /* sticky: first failure of the step */
    int grad_enabled;
    int layout_opt;   /* blocked activations (backend has blocked_channels) */
    int conv_bf16;    /* kd_graph_set_precision(KD_BF16): convs in bf16 */
    kd_layout bf16_layout; /* of bf16 activations: NCHW16C or NHWC (kd_graph_set_bf16_layout) */
    uint64_t seed, step_key; /* dropout streams */
    uint32_t n_dropout;      /* dropout calls this step (stream index) */
    size_t heap_allocs;      /* tape and mem-table growth, leaf .grad allocations */
    /* Free lists, by rounded size, of released buffers: activations released
     * by scopes (at scope end, or during kd_backward once the last rule that
     * reads them ran) and intermediate gradients (once the rule of the node
     * that produced the tensor ran). Op outputs and gradients take a buffer
     * of their size from here before bump-allocating in the arena. Cleared
     * by kd_graph_reset. */
    kd__bin bin[KD__BINS];
    int n_bin;
    kd__mem *mem;          /* (cap_mem) tracked activation buffers of this step */
    int n_mem, cap_mem;    /* cap_mem kept across resets */
    size_t track_min;      /* KD__TRACK_MIN; tests lower it to track every tensor */
    int mem_release;       /* scopes release buffers (KD_MEM_RELEASE=0: never) */
    int scribble;          /* tests: fill released buffers with 0xFF (NaN) */
    int n_flushed;         /* tape nodes whose retained buffers are registered */
    int tape_consumed;     /* kd_backward freed buffers the tape reads: no second walk */
    size_t live_bytes, live_peak; /* tracked bytes not on a free list, and their peak */
    kd_sum_fn bn_sum;      /* kd_graph_set_sync_bn: NULL, or the sum over processes */
    void *bn_sum_user;
    double bn_scale;
    kd_grad_ready_fn grad_hook; /* kd_graph_set_grad_hook */
    void *grad_hook_user;
    kd_tensor *const *grad_watch;
    int n_grad_watch;
};

/* ---- helpers (graph.c) */

/* Records `s` (message already set by kd_error) as the sticky status; returns NULL. */
kd_tensor *kd__fail(kd_graph *g, kd_status s);
/* 1 when g may run an op: status ok and every listed input non-NULL. Sets an
 * error naming `op` when an input is NULL while the status was still ok. */
int kd__ok_inputs(kd_graph *g, const char *op, int n, kd_tensor *const *xs);
/* Checks a float32, contiguous, strided tensor; sets the error otherwise. */
int kd__check_f32(kd_graph *g, const char *op, const char *what, const kd_tensor *t);
/* Same, but a KD_LAYOUT_NCHW16C tensor passes too (ops that keep layouts). */
int kd__check_f32_any(kd_graph *g, const char *op, const char *what, const kd_tensor *t);
static inline int kd__blocked(const kd_tensor *t) { return t && t->layout == KD_LAYOUT_NCHW16C; }
/* In one of the activation layouts without strides: NCHW16C or NHWC. */
static inline int kd__packed(const kd_tensor *t) {
    return t && (t->layout == KD_LAYOUT_NCHW16C || t->layout == KD_LAYOUT_NHWC);
}
/* A bf16 activation: what convolutions of a bf16 graph write (in the
 * graph's bf16_layout, NCHW16C or NHWC) and batch norm, ReLU / leaky ReLU
 * and add keep. Every other op widens it to float32 first (kd__to_f32,
 * kd__to_strided); an NHWC one always to plain NCHW, so that no other op
 * meets that layout. */
static inline int kd__bf16_act(const kd_tensor *t) {
    return t && t->dtype == KD_BF16 && kd__packed(t);
}
/* kd__check_f32_any, or a bf16 activation (the ops that keep those). */
int kd__check_act(kd_graph *g, const char *op, const char *what, const kd_tensor *t);
/* x converted to strided float32 (a recorded KD_OP_TO_STRIDED node) when
 * blocked, else x; NULL stays NULL (and a failure returns NULL with the
 * status set). */
kd_tensor *kd__to_strided(kd_graph *g, kd_tensor *x);
/* A bf16 activation x widened to float32 (a recorded KD_OP_TO_STRIDED
 * node) in its layout when NCHW16C, plain when NHWC, else x: what ops
 * without bf16 kernels call on inputs that may be activations. */
kd_tensor *kd__to_f32(kd_graph *g, kd_tensor *x);
/* x in `layout` (a recorded KD_OP_TO_STRIDED node, widening a bf16
 * activation), or x when it already is. */
kd_tensor *kd__to_layout(kd_graph *g, kd_tensor *x, kd_layout layout);
/* 1 when ops of g may produce NCHW16C tensors of C channels. */
int kd__blocked_ok(const kd_graph *g, int64_t C);
/* Arena tensor in `layout` (KD_LAYOUT_NCHW16C: 4-d, C % 16 == 0, strides 0;
 * KD_LAYOUT_NHWC: 4-d, strides 0). */
kd_tensor *kd__new_lay(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape,
                       kd_layout layout);
/* Arena float32 tensor, contiguous, leaf without grad. NULL (status set) on OOM. */
kd_tensor *kd__new(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape);
/* Float32 arena tensor of t's shape and layout (outputs of layout-keeping
 * ops, gradient buffers). */
kd_tensor *kd__new_like(kd_graph *g, const kd_tensor *t);
void *kd__scratch(kd_graph *g, size_t bytes);
/* 1 when t is a parameter (requires_grad leaf) or the output of a recorded node of g. */
int kd__needs_grad(const kd_graph *g, const kd_tensor *t);
/* Appends a node for `out` if gradients are on and some input needs them;
 * returns it (inputs copied in) or NULL when nothing is recorded. On OOM it
 * sets the status and returns NULL; callers check g->status. */
kd__node *kd__record(kd_graph *g, kd_op op, kd_tensor *out, int n_in, kd_tensor *const *in);

/* 1 when the ReLU / leaky ReLU node n takes its backward from its output
 * (slope >= 0: y > 0 exactly where x > 0), so x need not be retained. */
static inline int kd__relu_uses_out(const kd__node *n) { return n->p.f.a >= 0.0f; }

/* A scratch tensor like t for use within one backward rule, from the free
 * lists when possible; give it back with kd__tmp_free. NULL (status set) on OOM. */
kd_tensor *kd__tmp_like(kd_graph *g, const kd_tensor *t);
void kd__tmp_free(kd_graph *g, kd_tensor *t);

/* Gradient buffer of t for writing during backward. *acc is 0 when the
 * caller must overwrite it, 1 when it must add. Marks t->grad_ready. NULL
 * (status set) on OOM. */
kd_tensor *kd__grad(kd_graph *g, kd_tensor *t, int *acc);
/* Same, but the buffer is zeroed when it held nothing, so callers always add. */
kd_tensor *kd__grad_acc(kd_graph *g, kd_tensor *t);

/* Gradient buffers of up to 4 tensors (NULL entries skipped, out[i] NULL)
 * that one kernel writes with a single accumulate flag, which it returns: 0
 * when all are fresh, else 1 (fresh ones zeroed first). -1 on failure. */
int kd__grads_common(kd_graph *g, int k, kd_tensor *const *ts, kd_tensor **out);

/* kd_graph_set_precision warns about slow bf16 once per process; this lets
 * it warn again (tests). */
void kd__bf16_slow_warning_rearm(void);

/* Elementwise helpers (plain C, OpenMP-parallel). dst (+)= s * src. */
void kd__axpy(float *restrict dst, const float *restrict src, float s, int64_t n, int acc);
/* Deterministic sum in double: fixed blocks summed in parallel, then in order. */
double kd__sum_f64(kd_graph *g, const float *x, int64_t n);

#define KD__PAR_MIN 32768 /* elements below which loops stay serial */

/* ---- backward rules (one per op) */
kd_status kd__conv2d_backward(kd_graph *g, kd__node *n);
kd_status kd__batchnorm_backward(kd_graph *g, kd__node *n);
kd_status kd__linear_backward(kd_graph *g, kd__node *n);
kd_status kd__matmul_backward(kd_graph *g, kd__node *n);
kd_status kd__relu_backward(kd_graph *g, kd__node *n);
kd_status kd__add_backward(kd_graph *g, kd__node *n);
kd_status kd__mul_backward(kd_graph *g, kd__node *n);
kd_status kd__scale_backward(kd_graph *g, kd__node *n);
kd_status kd__pool2d_backward(kd_graph *g, kd__node *n);
kd_status kd__global_avgpool_backward(kd_graph *g, kd__node *n);
kd_status kd__reshape_backward(kd_graph *g, kd__node *n);
kd_status kd__transpose_backward(kd_graph *g, kd__node *n);
kd_status kd__concat_backward(kd_graph *g, kd__node *n);
kd_status kd__slice_backward(kd_graph *g, kd__node *n);
kd_status kd__softmax_backward(kd_graph *g, kd__node *n);
kd_status kd__log_softmax_backward(kd_graph *g, kd__node *n);
kd_status kd__cross_entropy_backward(kd_graph *g, kd__node *n);
kd_status kd__kl_div_backward(kd_graph *g, kd__node *n);
kd_status kd__mse_backward(kd_graph *g, kd__node *n);
kd_status kd__l2_normalize_backward(kd_graph *g, kd__node *n);
kd_status kd__mean_backward(kd_graph *g, kd__node *n);
kd_status kd__sum_backward(kd_graph *g, kd__node *n);
kd_status kd__exp_backward(kd_graph *g, kd__node *n);
kd_status kd__log_backward(kd_graph *g, kd__node *n);
kd_status kd__dropout_backward(kd_graph *g, kd__node *n);
kd_status kd__act_backward(kd_graph *g, kd__node *n); /* sigmoid .. relu6 (ops_act.c) */
kd_status kd__mul_channel_backward(kd_graph *g, kd__node *n);
kd_status kd__to_strided_backward(kd_graph *g, kd__node *n);
kd_status kd__function_backward(kd_graph *g, kd__node *n); /* ops_function.c */
/* transformer ops: the kernel flags and retain flags in graph.c's table are
 * the implementer's to adjust (ops_norm.c, ops_layout.c) */
kd_status kd__layernorm_backward(kd_graph *g, kd__node *n);
kd_status kd__gelu_backward(kd_graph *g, kd__node *n);
kd_status kd__bmm_backward(kd_graph *g, kd__node *n);
kd_status kd__permute_backward(kd_graph *g, kd__node *n);
kd_status kd__roll_backward(kd_graph *g, kd__node *n);
kd_status kd__index_select_backward(kd_graph *g, kd__node *n);
kd_status kd__add_bcast_backward(kd_graph *g, kd__node *n);
kd_status kd__drop_path_backward(kd_graph *g, kd__node *n);
kd_status kd__weight_norm_backward(kd_graph *g, kd__node *n);
kd_status kd__window_attention_backward(kd_graph *g, kd__node *n); /* ops_attention.c */

#endif /* KD_AUTOGRAD_IMPL_H */
