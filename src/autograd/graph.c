/*
 * graph.c: the define-by-run tape. Graph lifecycle, arena tensors, recording,
 * scopes and buffer recycling, gradient buffers, kd_backward() and the op
 * table that holds every backward rule and what it retains (the rules
 * themselves live in ops_*.c, one function per op).
 */
#include "autograd/autograd_impl.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend_impl.h"

/* Under AddressSanitizer a released buffer (activation or gradient) is
 * poisoned while it sits on a free list, so reading it is caught. */
#if defined(__SANITIZE_ADDRESS__)
#define KD__ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KD__ASAN 1
#endif
#endif
#ifdef KD__ASAN
#include <sanitizer/asan_interface.h>
#define KD__POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define KD__UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define KD__POISON(p, n) ((void)(p), (void)(n))
#define KD__UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* ------------------------------------------------------------- op table */

/* `retain`: the tensors each backward rule reads besides gradients and
 * parameters. A tracked buffer listed here outlives its scope until
 * kd_backward has run the rule; anything else is released at scope end.
 * ReLU and leaky ReLU with slope >= 0 read their output (kd__relu_uses_out),
 * otherwise their input; kd__retain_flush applies that exception.
 * `fwd` is the op's public entry point and `k` the backend kernels it calls:
 * kd_op_get_info derives has_forward and has_backward from these pointers
 * (and the reference backend's kernels), so an entry that loses its forward or
 * backward shows up in the coverage tests. */
#define KD__OP(op, name, fwd, bwd, k, ret) [op] = {name, (kd__op_fn)(fwd), bwd, k, ret}
#define I0 KD__RET_IN0
#define I1 KD__RET_IN1
#define OUT KD__RET_OUT
#define SAVED KD__RET_SAVED

/* Sized by its initialisers, so the assertion below catches a kd_op added
 * after the last entry; a hole in the middle leaves an entry without a name,
 * which kd__op_table_check reports. */
const kd__op_entry kd__op_table[] = {
    KD__OP(KD_OP_CONV2D, "conv2d", kd_conv2d, kd__conv2d_backward, KD__K_CONV2D,
           I0 | I1), /* x (dw), w (dx) */
    KD__OP(KD_OP_BATCHNORM, "batchnorm", kd_batchnorm, kd__batchnorm_backward, KD__K_BN,
           I0 | I1 | SAVED),
    KD__OP(KD_OP_LINEAR, "linear", kd_linear, kd__linear_backward, KD__K_GEMM, I0 | I1),
    KD__OP(KD_OP_MATMUL, "matmul", kd_matmul, kd__matmul_backward, KD__K_GEMM, I0 | I1),
    KD__OP(KD_OP_RELU, "relu", kd_relu, kd__relu_backward, KD__K_ELTWISE, OUT),
    KD__OP(KD_OP_LEAKY_RELU, "leaky_relu", kd_leaky_relu, kd__relu_backward, KD__K_ELTWISE, OUT),
    KD__OP(KD_OP_ADD, "add", kd_add, kd__add_backward, 0, 0),
    KD__OP(KD_OP_MUL, "mul", kd_mul, kd__mul_backward, 0, I0 | I1),
    KD__OP(KD_OP_SCALE, "scale", kd_scale, kd__scale_backward, 0, 0),
    KD__OP(KD_OP_AVGPOOL2D, "avgpool2d", kd_avgpool2d, kd__pool2d_backward, KD__K_POOL2D, 0),
    KD__OP(KD_OP_MAXPOOL2D, "maxpool2d", kd_maxpool2d, kd__pool2d_backward, KD__K_POOL2D,
           SAVED), /* argmax */
    KD__OP(KD_OP_GLOBAL_AVGPOOL, "global_avgpool", kd_global_avgpool,
           kd__global_avgpool_backward, 0, 0),
    KD__OP(KD_OP_RESHAPE, "reshape", kd_reshape, kd__reshape_backward, 0, 0),
    KD__OP(KD_OP_TRANSPOSE, "transpose", kd_transpose, kd__transpose_backward, 0, 0),
    KD__OP(KD_OP_CONCAT, "concat", kd_concat, kd__concat_backward, 0, 0),
    KD__OP(KD_OP_SLICE, "slice", kd_slice, kd__slice_backward, 0, 0),
    KD__OP(KD_OP_SOFTMAX, "softmax", kd_softmax, kd__softmax_backward, KD__K_SOFTMAX, OUT),
    KD__OP(KD_OP_LOG_SOFTMAX, "log_softmax", kd_log_softmax, kd__log_softmax_backward, 0, OUT),
    KD__OP(KD_OP_CROSS_ENTROPY, "cross_entropy", kd_cross_entropy, kd__cross_entropy_backward, 0,
           I0),
    KD__OP(KD_OP_KL_DIV, "kl_div", kd_kl_div, kd__kl_div_backward, 0,
           SAVED), /* both log-probabilities */
    KD__OP(KD_OP_MSE, "mse", kd_mse, kd__mse_backward, 0, I0 | I1),
    KD__OP(KD_OP_L2_NORMALIZE, "l2_normalize", kd_l2_normalize, kd__l2_normalize_backward, 0, OUT),
    KD__OP(KD_OP_MEAN, "mean", kd_mean, kd__mean_backward, 0, 0),
    KD__OP(KD_OP_SUM, "sum", kd_sum, kd__sum_backward, 0, 0),
    KD__OP(KD_OP_EXP, "exp", kd_exp, kd__exp_backward, KD__K_ELTWISE, OUT),
    KD__OP(KD_OP_LOG, "log", kd_log, kd__log_backward, KD__K_ELTWISE, I0),
    KD__OP(KD_OP_DROPOUT, "dropout", kd_dropout, kd__dropout_backward, 0, 0), /* mask recomputed */
    KD__OP(KD_OP_SIGMOID, "sigmoid", kd_sigmoid, kd__act_backward, 0, OUT),
    KD__OP(KD_OP_HARDSWISH, "hardswish", kd_hardswish, kd__act_backward, 0, I0),
    KD__OP(KD_OP_HARDSIGMOID, "hardsigmoid", kd_hardsigmoid, kd__act_backward, 0, I0),
    KD__OP(KD_OP_SILU, "silu", kd_silu, kd__act_backward, 0, I0),
    KD__OP(KD_OP_RELU6, "relu6", kd_relu6, kd__act_backward, 0, OUT),
    KD__OP(KD_OP_MUL_CHANNEL, "mul_channel", kd_mul_channel, kd__mul_channel_backward, 0, I0 | I1),
    KD__OP(KD_OP_TO_STRIDED, "to_strided", kd_graph_to_strided, kd__to_strided_backward, 0, 0),
    KD__OP(KD_OP_FUNCTION, "function", kd_function_apply, kd__function_backward, 0,
           I0 | I1 | KD__RET_IN2 | OUT),
    /* transformer ops: ops_norm.c (layernorm, gelu, bmm), ops_layout.c (the rest) */
    KD__OP(KD_OP_LAYERNORM, "layernorm", kd_layernorm, kd__layernorm_backward, KD__K_LN,
           I0 | I1 | SAVED), /* x, gamma, row mean/rstd */
    KD__OP(KD_OP_GELU, "gelu", kd_gelu, kd__gelu_backward, KD__K_ELTWISE, I0),
    KD__OP(KD_OP_BMM, "bmm", kd_bmm, kd__bmm_backward, KD__K_GEMM_BATCH, I0 | I1),
    KD__OP(KD_OP_PERMUTE, "permute", kd_permute, kd__permute_backward, 0, 0),
    KD__OP(KD_OP_ROLL, "roll", kd_roll, kd__roll_backward, 0, 0),
    KD__OP(KD_OP_INDEX_SELECT, "index_select", kd_index_select, kd__index_select_backward, 0,
           I1), /* the index */
    KD__OP(KD_OP_ADD_BCAST, "add_bcast", kd_add_bcast, kd__add_bcast_backward, 0, 0),
    KD__OP(KD_OP_DROP_PATH, "drop_path", kd_drop_path, kd__drop_path_backward, 0,
           0), /* mask recomputed */
    KD__OP(KD_OP_WEIGHT_NORM, "weight_norm", kd_weight_norm, kd__weight_norm_backward, 0,
           I0 | I1), /* v, gain (norms recomputed) */
    KD__OP(KD_OP_WINDOW_ATTENTION, "window_attention", kd_window_attention, kd__window_attention_backward, 0,
           I0 | SAVED), /* qkv, the probabilities */
};

#undef I0
#undef I1
#undef OUT
#undef SAVED

_Static_assert(sizeof(kd__op_table) / sizeof(kd__op_table[0]) == KD_OP_COUNT,
               "kd__op_table needs one entry per kd_op, the last one included");

void kd__op_info_derive(const kd__op_entry *e, const kd_backend *be, kd_op_info *out) {
    unsigned k = e->kernels;
    int fwd = e->forward != NULL, bwd = e->backward != NULL;
    if (k & KD__K_CONV2D) {
        fwd = fwd && be->conv2d_forward;
        bwd = bwd && be->conv2d_backward_data && be->conv2d_backward_weights;
    }
    if (k & KD__K_BN) {
        fwd = fwd && be->batchnorm_forward;
        bwd = bwd && be->batchnorm_backward;
    }
    if (k & KD__K_POOL2D) {
        fwd = fwd && be->pool2d_forward;
        bwd = bwd && be->pool2d_backward;
    }
    if (k & KD__K_GEMM) {
        fwd = fwd && be->gemm;
        bwd = bwd && be->gemm;
    }
    if (k & KD__K_ELTWISE) {
        fwd = fwd && be->eltwise_forward;
        bwd = bwd && be->eltwise_backward;
    }
    if (k & KD__K_LN) {
        fwd = fwd && be->layernorm_forward;
        bwd = bwd && be->layernorm_backward;
    }
    if (k & KD__K_GEMM_BATCH) {
        fwd = fwd && be->gemm_batch;
        bwd = bwd && be->gemm_batch;
    }
    if (k & KD__K_SOFTMAX) {
        fwd = fwd && be->softmax_forward;
        bwd = bwd && be->softmax_backward;
    }
    out->name = e->name;
    out->has_forward = fwd;
    out->has_backward = bwd;
}

int kd__op_table_check(const kd__op_entry *t, int n, const kd_backend *be, char *msg, size_t cap) {
    int problems = 0;
    size_t used = 0;
    if (msg && cap) msg[0] = '\0';
    for (int op = 0; op < n; op++) {
        char line[160];
        line[0] = '\0';
        kd_op_info info;
        kd__op_info_derive(&t[op], be, &info);
        if (!info.name) {
            snprintf(line, sizeof line, "op %d has no table entry\n", op);
        } else if (!info.has_forward || !info.has_backward) {
            snprintf(line, sizeof line, "op %s:%s%s\n", info.name,
                     info.has_forward ? "" : " no forward", info.has_backward ? "" : " no backward");
        } else {
            for (int k = 0; k < op; k++)
                if (t[k].name && strcmp(t[k].name, info.name) == 0) {
                    snprintf(line, sizeof line, "ops %d and %d share the name %s\n", k, op,
                             info.name);
                    break;
                }
        }
        if (!line[0]) continue;
        problems++;
        if (msg && used + 1 < cap) {
            snprintf(msg + used, cap - used, "%s", line);
            used += strlen(msg + used);
        }
    }
    return problems;
}

/* Derived once from kd__op_table and the reference backend. */
static kd_op_info kd__op_infos[KD_OP_COUNT];
static pthread_once_t kd__op_infos_once = PTHREAD_ONCE_INIT;

static void kd__op_infos_init(void) {
    const kd_backend *ref = kd__backend_ref();
    for (int op = 0; op < KD_OP_COUNT; op++)
        kd__op_info_derive(&kd__op_table[op], ref, &kd__op_infos[op]);
}

const kd_op_info *kd_op_get_info(kd_op op) {
    if ((int)op < 0 || op >= KD_OP_COUNT) return NULL;
    pthread_once(&kd__op_infos_once, kd__op_infos_init);
    return &kd__op_infos[op];
}

/* ----------------------------------------------------------- lifecycle */

kd_status kd_graph_init(kd_graph **out, kd_backend *be) {
    *out = NULL;
    if (!be) return kd_error(KD_ERR_INVALID, "kd_graph_init: no backend given");
    kd_graph *g = calloc(1, sizeof *g);
    if (!g) return kd_error(KD_ERR_NOMEM, "out of memory creating a graph");
    kd_status s = kd_arena_init(&g->arena, 0);
    if (s != KD_OK) goto fail_arena;
    g->cap = 256;
    g->tape = malloc((size_t)g->cap * sizeof *g->tape);
    if (!g->tape) {
        s = kd_error(KD_ERR_NOMEM, "out of memory creating a graph tape");
        goto fail_tape;
    }
    g->heap_allocs = 1;
    g->be = be;
    g->grad_enabled = 1;
    g->track_min = KD__TRACK_MIN;
    const char *mr = getenv("KD_MEM_RELEASE");
    /* KD_MEM_RELEASE=0 makes scopes no-ops: every activation then lives
     * until kd_graph_reset (for comparisons and debugging). */
    g->mem_release = !(mr && mr[0] == '0');
    const char *lo = getenv("KD_LAYOUT_OPT");
    /* Blocked activations wherever the backend has them; KD_LAYOUT_OPT=0
     * keeps every activation plain (for comparisons and debugging). */
    g->layout_opt = be->blocked_channels == KD_LAYOUT_BLOCK && !(lo && lo[0] == '0');
    g->bf16_layout = be->bf16_layout == KD_LAYOUT_NHWC ? KD_LAYOUT_NHWC : KD_LAYOUT_NCHW16C;
    const char *bl = getenv("KD_BF16_LAYOUT");
    if (bl && !strcmp(bl, "nhwc")) g->bf16_layout = KD_LAYOUT_NHWC;
    else if (bl && !strcmp(bl, "nchw16c")) g->bf16_layout = KD_LAYOUT_NCHW16C;
    g->status = KD_OK;
    *out = g;
    return KD_OK;

fail_tape:
    kd_arena_free(g->arena);
fail_arena:
    free(g);
    return s;
}

/* Empties the free lists (their buffers die with the arena). */
static void kd__bins_clear(kd_graph *g) {
#ifdef KD__ASAN
    for (int i = 0; i < g->n_bin; i++) {
        for (void *p = g->bin[i].head; p;) {
            KD__UNPOISON(p, g->bin[i].bytes);
            p = *(void **)p;
        }
    }
#endif
    g->n_bin = 0;
}

void kd_graph_free(kd_graph *g) {
    if (!g) return;
    kd__bins_clear(g);
    kd_arena_free(g->arena);
    free(g->mem);
    free(g->tape);
    free(g);
}

void kd_graph_reset(kd_graph *g) {
    if (!g) return;
    /* The tensors of the last step die with the arena; heap tensors never
     * carry a tape index, so nothing else needs clearing. */
    g->n_nodes = 0;
    g->n_flushed = 0;
    g->n_mem = 0;
    g->tape_consumed = 0;
    g->live_bytes = 0;
    kd__bins_clear(g);
    kd_arena_reset(g->arena);
    g->status = KD_OK;
    g->n_dropout = 0;
}

kd_status kd_graph_status(const kd_graph *g) { return g ? g->status : KD_ERR_INVALID; }
kd_backend *kd_graph_backend(const kd_graph *g) { return g->be; }
kd_arena *kd_graph_arena(const kd_graph *g) { return g->arena; }
int kd_graph_tape_size(const kd_graph *g) { return g->n_nodes; }

size_t kd_graph_heap_allocs(const kd_graph *g) {
    return g->heap_allocs + kd_arena_grow_count(g->arena);
}

int kd_graph_set_grad_enabled(kd_graph *g, int enabled) {
    int prev = g->grad_enabled;
    g->grad_enabled = enabled != 0;
    return prev;
}

int kd_graph_grad_enabled(const kd_graph *g) { return g->grad_enabled; }

int kd_graph_set_layout_opt(kd_graph *g, int on) {
    int prev = g->layout_opt;
    g->layout_opt = on && g->be->blocked_channels == KD_LAYOUT_BLOCK;
    return prev;
}

int kd_graph_layout_opt(const kd_graph *g) { return g->layout_opt; }

/* The warning about slow bf16 is logged once per process. */
static atomic_int kd__bf16_slow_warned;

void kd__bf16_slow_warning_rearm(void) { atomic_store(&kd__bf16_slow_warned, 0); }

kd_status kd_graph_set_precision(kd_graph *g, kd_dtype compute) {
    if (compute == KD_F32) {
        g->conv_bf16 = 0;
        return KD_OK;
    }
    if (compute != KD_BF16)
        return kd_error(KD_ERR_INVALID, "precision %s is not supported (use f32 or bf16)",
                        kd_dtype_name(compute));
    if (g->be->bf16 != 1)
        return kd_error(KD_ERR_UNSUPPORTED, "precision bf16 needs native bf16 arithmetic, which "
                                            "backend '%s' does not have on this machine (the cpu "
                                            "backend needs a CPU with AVX-512-BF16 or AMX)",
                        g->be->name);
    if (g->be->bf16_slow && !atomic_exchange(&kd__bf16_slow_warned, 1))
        kd_log_msg(KD_LOG_WARN, "precision bf16: on this CPU (AVX-512-BF16 without AMX) bf16 convolutions run "
                                "slower than float32 ones (0.43-0.67x measured on an Intel Xeon); bf16 saves "
                                "memory here, not time, and precision f32 trains faster");
    g->conv_bf16 = 1;
    return KD_OK;
}

kd_dtype kd_graph_precision(const kd_graph *g) { return g->conv_bf16 ? KD_BF16 : KD_F32; }

kd_status kd_graph_set_bf16_layout(kd_graph *g, kd_layout layout) {
    if (layout != KD_LAYOUT_NCHW16C && layout != KD_LAYOUT_NHWC)
        return kd_error(KD_ERR_INVALID, "bf16 layout %d: bf16 activations are NCHW16C or NHWC",
                        (int)layout);
    g->bf16_layout = layout;
    return KD_OK;
}

kd_layout kd_graph_bf16_layout(const kd_graph *g) { return g->bf16_layout; }

int kd_graph_set_mem_release(kd_graph *g, int on) {
    int prev = g->mem_release;
    g->mem_release = on != 0;
    return prev;
}

int kd_graph_mem_release(const kd_graph *g) { return g->mem_release; }

size_t kd_graph_peak_bytes(const kd_graph *g) { return kd_arena_high_water(g->arena); }

void kd_graph_set_rng(kd_graph *g, uint64_t seed, uint64_t step_key) {
    g->seed = seed;
    g->step_key = step_key;
}

/* ------------------------------------------------------------- helpers */

kd_tensor *kd__fail(kd_graph *g, kd_status s) {
    if (g->status == KD_OK) g->status = s;
    return NULL;
}

int kd__ok_inputs(kd_graph *g, const char *op, int n, kd_tensor *const *xs) {
    if (g->status != KD_OK) return 0;
    for (int i = 0; i < n; i++) {
        if (!xs[i]) {
            kd__fail(g, kd_error(KD_ERR_INVALID, "%s: input %d is NULL", op, i));
            return 0;
        }
    }
    return 1;
}

int kd__check_f32(kd_graph *g, const char *op, const char *what, const kd_tensor *t) {
    if (t->dtype != KD_F32) {
        kd__fail(g, kd_error(KD_ERR_INVALID, "%s: %s has dtype %s, expected F32", op, what,
                             kd_dtype_name(t->dtype)));
        return 0;
    }
    if (!kd_tensor_is_contiguous(t)) {
        kd__fail(g, kd_error(KD_ERR_INVALID, "%s: %s is not a contiguous strided tensor", op,
                             what));
        return 0;
    }
    return 1;
}

int kd__check_f32_any(kd_graph *g, const char *op, const char *what, const kd_tensor *t) {
    if (t->layout == KD_LAYOUT_NCHW16C && t->dtype == KD_F32) return 1;
    return kd__check_f32(g, op, what, t);
}

int kd__check_act(kd_graph *g, const char *op, const char *what, const kd_tensor *t) {
    if (kd__bf16_act(t)) return 1;
    return kd__check_f32_any(g, op, what, t);
}

void *kd__scratch(kd_graph *g, size_t bytes) {
    void *p = kd_arena_alloc(g->arena, bytes);
    if (!p) kd__fail(g, kd_error(KD_ERR_NOMEM, "out of memory: the graph arena cannot grow by "
                                               "%zu bytes", bytes));
    return p;
}

/* ------------------------------------------------------ buffer recycling */

/* Bytes an arena block of `bytes` really takes (kd_arena_alloc's rounding). */
static size_t kd__rbytes(size_t bytes) {
    bytes = (bytes + 63) & ~(size_t)63;
    return bytes ? bytes : 64;
}

/* The free list of rounded size `bytes`; created when `create` and a slot
 * is left, else NULL. */
static kd__bin *kd__bin_find(kd_graph *g, size_t bytes, int create) {
    for (int i = 0; i < g->n_bin; i++)
        if (g->bin[i].bytes == bytes) return &g->bin[i];
    if (!create || g->n_bin == KD__BINS) return NULL;
    kd__bin *b = &g->bin[g->n_bin++];
    b->bytes = bytes;
    b->head = NULL;
    return b;
}

/* A free buffer of exactly `bytes` (rounded) bytes, or NULL. */
static void *kd__bin_take(kd_graph *g, size_t bytes) {
    kd__bin *b = kd__bin_find(g, bytes, 0);
    if (!b || !b->head) return NULL;
    void *p = b->head;
    KD__UNPOISON(p, bytes);
    b->head = *(void **)p;
    return p;
}

/* Puts buffer p of `bytes` (rounded) bytes on its free list and poisons it.
 * A size that finds no free slot stays in the arena unused. */
static void kd__bin_put(kd_graph *g, void *p, size_t bytes) {
    kd__bin *b = kd__bin_find(g, bytes, 1);
    if (!b) return;
    if (g->scribble) memset(p, 0xFF, bytes);
    *(void **)p = b->head;
    b->head = p;
    KD__POISON(p, bytes);
}

/* Data for a new tensor of `bytes`: below track_min plain arena memory;
 * otherwise a tracked buffer (a new g->mem entry, LIVE), recycled from the
 * free list of its size when one is there. NULL (status set) on OOM. */
static void *kd__data_alloc(kd_graph *g, size_t bytes) {
    size_t rb = kd__rbytes(bytes);
    if (rb < g->track_min) return kd__scratch(g, bytes);
    if (g->n_mem == g->cap_mem) {
        int cap = g->cap_mem ? 2 * g->cap_mem : 256;
        kd__mem *m = realloc(g->mem, (size_t)cap * sizeof *m);
        if (!m) {
            kd__fail(g, kd_error(KD_ERR_NOMEM, "out of memory growing the graph's buffer table "
                                               "to %d entries", cap));
            return NULL;
        }
        g->mem = m;
        g->cap_mem = cap;
        g->heap_allocs++;
    }
    unsigned char *p = kd__bin_take(g, rb);
    if (!p && !(p = kd__scratch(g, rb))) return NULL;
    g->mem[g->n_mem++] = (kd__mem){p, rb, -1, KD__MEM_LIVE, 0};
    g->live_bytes += rb;
    if (g->live_bytes > g->live_peak) g->live_peak = g->live_bytes;
    return p;
}

/* Index of the tracked buffer (LIVE or ORPHAN) that holds address p, among
 * entries [from, n_mem), newest first; -1 when none. Views (reshape,
 * flatten) point into their base's buffer, so they resolve to it. */
static int kd__mem_find(const kd_graph *g, const void *p, int from) {
    const unsigned char *a = p;
    for (int i = g->n_mem - 1; i >= from; i--) {
        const kd__mem *e = &g->mem[i];
        if (e->state != KD__MEM_FREE && a >= e->p && a < e->p + e->bytes) return i;
    }
    return -1;
}

static void kd__mem_release(kd_graph *g, kd__mem *e) {
    kd__bin_put(g, e->p, e->bytes);
    e->state = KD__MEM_FREE;
    g->live_bytes -= e->bytes;
}

static kd_tensor *kd__desc(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape) {
    if (ndim < 0 || ndim > KD_MAX_DIMS) {
        kd__fail(g, kd_error(KD_ERR_INVALID, "tensor rank %d is outside 0..%d", ndim,
                             KD_MAX_DIMS));
        return NULL;
    }
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) {
            kd__fail(g, kd_error(KD_ERR_INVALID, "negative dimension %lld",
                                 (long long)shape[i]));
            return NULL;
        }
    }
    kd_tensor *t = kd__scratch(g, sizeof *t);
    if (!t) return NULL;
    memset(t, 0, sizeof *t);
    t->dtype = dt;
    t->device = g->be->device;
    t->layout = KD_LAYOUT_STRIDED;
    t->node = -1;
    kd_tensor_set_shape(t, ndim, shape);
    return t;
}

kd_tensor *kd__new(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape) {
    kd_tensor *t = kd__desc(g, dt, ndim, shape);
    if (!t) return NULL;
    t->data = kd__data_alloc(g, kd_tensor_nbytes(t));
    return t->data ? t : NULL;
}

kd_tensor *kd__new_lay(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape,
                       kd_layout layout) {
    kd_tensor *t = kd__new(g, dt, ndim, shape);
    if (t && (layout == KD_LAYOUT_NCHW16C || layout == KD_LAYOUT_NHWC)) {
        t->layout = layout;
        for (int i = 0; i < ndim; i++) t->stride[i] = 0; /* unused for packed tensors */
    }
    return t;
}

kd_tensor *kd__new_like(kd_graph *g, const kd_tensor *t) {
    return kd__new_lay(g, KD_F32, t->ndim, t->shape, t->layout);
}

int kd__blocked_ok(const kd_graph *g, int64_t C) {
    return g->layout_opt && C > 0 && C % KD_LAYOUT_BLOCK == 0;
}

/* ------------------------------------------------------ layout conversion */

/* x as a float32 tensor in `layout` (strided, NCHW16C or NHWC): reordered,
 * and widened when x is a bf16 activation; recorded as a KD_OP_TO_STRIDED
 * node whose backward brings the gradient back to x's layout. */
static kd_tensor *kd__relayout(kd_graph *g, kd_tensor *x, kd_layout layout) {
    int needs_blocks = layout == KD_LAYOUT_NCHW16C || x->layout == KD_LAYOUT_NCHW16C;
    if ((x->dtype != KD_F32 && !kd__bf16_act(x)) || x->ndim != 4 ||
        (needs_blocks && x->shape[1] % KD_LAYOUT_BLOCK) ||
        (x->layout == KD_LAYOUT_STRIDED && !kd_tensor_is_contiguous(x)))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "to_strided: a relayout takes a contiguous "
                                                    "4-d float32 or bf16 tensor (C %% 16 == 0 "
                                                    "to or from NCHW16C)"));
    kd_tensor *y = kd__new_lay(g, KD_F32, 4, x->shape, layout);
    if (!y) return NULL;
    int64_t N = x->shape[0], C = x->shape[1], HW = x->shape[2] * x->shape[3];
    const float *src = kd_f32(x);
    kd_tensor *wide = NULL;
    if (x->dtype == KD_BF16) {
        if (layout == x->layout) {
            kd_bf16_to_f32(kd_f32(y), (const uint16_t *)x->data, kd_tensor_numel(x));
            src = NULL;
        } else {
            if (!(wide = kd__tmp_like(g, x))) return NULL;
            kd_bf16_to_f32(kd_f32(wide), (const uint16_t *)x->data, kd_tensor_numel(x));
            src = kd_f32(wide);
        }
    }
    if (src) kd_layout_convert(kd_f32(y), layout, src, x->layout, N, C, HW, 0);
    kd__tmp_free(g, wide);
    kd__record(g, KD_OP_TO_STRIDED, y, 1, &x);
    return g->status == KD_OK ? y : NULL;
}

kd_tensor *kd__to_f32(kd_graph *g, kd_tensor *x) {
    if (!x || g->status != KD_OK || x->dtype != KD_BF16) return x;
    return kd__relayout(g, x, x->layout == KD_LAYOUT_NHWC ? KD_LAYOUT_STRIDED : x->layout);
}

kd_tensor *kd__to_strided(kd_graph *g, kd_tensor *x) {
    if (!x || g->status != KD_OK || !kd__packed(x)) return x;
    return kd__relayout(g, x, KD_LAYOUT_STRIDED);
}

/* x in `layout` for a convolution that reads it so (f32 or a bf16
 * activation); x itself when it already is. */
kd_tensor *kd__to_layout(kd_graph *g, kd_tensor *x, kd_layout layout) {
    if (!x || g->status != KD_OK || x->layout == layout) return x;
    return kd__relayout(g, x, layout);
}

kd_tensor *kd_graph_to_strided(kd_graph *g, kd_tensor *x) {
    if (!g || !kd__ok_inputs(g, "to_strided", 1, &x)) return NULL;
    return kd__to_strided(g, x);
}

kd_tensor *kd_graph_to_blocked(kd_graph *g, kd_tensor *x) {
    if (!g || !kd__ok_inputs(g, "to_blocked", 1, &x)) return NULL;
    if (x->layout != KD_LAYOUT_STRIDED || g->be->blocked_channels != KD_LAYOUT_BLOCK ||
        x->dtype != KD_F32 || x->ndim != 4 || x->shape[1] % KD_LAYOUT_BLOCK ||
        !kd_tensor_is_contiguous(x))
        return x;
    return kd__relayout(g, x, KD_LAYOUT_NCHW16C);
}

kd_status kd__to_strided_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *dy = n->out->grad;
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int64_t N = x->shape[0], C = x->shape[1], HW = x->shape[2] * x->shape[3];
    if (x->layout == dy->layout) /* a bf16 activation widened in place */
        kd__axpy(kd_f32(dx), kd_f32(dy), 1.0f, kd_tensor_numel(dx), acc);
    else
        kd_layout_convert(kd_f32(dx), x->layout, kd_f32(dy), dy->layout, N, C, HW, acc);
    return KD_OK;
}

kd_tensor *kd_graph_tensor(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape) {
    if (!g || g->status != KD_OK) return NULL;
    return kd__new(g, dt, ndim, shape);
}

kd_tensor *kd_graph_zeros(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape) {
    kd_tensor *t = kd_graph_tensor(g, dt, ndim, shape);
    if (t) memset(t->data, 0, kd_tensor_nbytes(t));
    return t;
}

kd_tensor *kd_graph_wrap(kd_graph *g, kd_dtype dt, int ndim, const int64_t *shape, void *data) {
    if (!g || g->status != KD_OK) return NULL;
    kd_tensor *t = kd__desc(g, dt, ndim, shape);
    if (t) t->data = data;
    return t;
}

int kd__needs_grad(const kd_graph *g, const kd_tensor *t) {
    if (!t) return 0;
    if (t->node >= 0)
        return t->node < g->n_nodes && g->tape[t->node].out == t;
    return t->requires_grad;
}

kd__node *kd__record(kd_graph *g, kd_op op, kd_tensor *out, int n_in, kd_tensor *const *in) {
    if (!g->grad_enabled || g->status != KD_OK) return NULL;
    int any = 0;
    for (int i = 0; i < n_in && !any; i++) any = kd__needs_grad(g, in[i]);
    if (!any) return NULL;
    if (g->n_nodes == g->cap) {
        int cap = g->cap * 2;
        kd__node *t = realloc(g->tape, (size_t)cap * sizeof *t);
        if (!t) {
            kd__fail(g, kd_error(KD_ERR_NOMEM, "out of memory growing the tape to %d ops", cap));
            return NULL;
        }
        g->tape = t;
        g->cap = cap;
        g->heap_allocs++;
    }
    kd__node *n = &g->tape[g->n_nodes];
    memset(n, 0, sizeof *n);
    n->op = op;
    n->out = out;
    if (op == KD_OP_CONCAT) {
        n->in_list = kd__scratch(g, (size_t)n_in * sizeof *n->in_list);
        if (!n->in_list) return NULL;
        memcpy(n->in_list, in, (size_t)n_in * sizeof *in);
    } else {
        for (int i = 0; i < n_in && i < KD__NODE_MAX_IN; i++) n->in[i] = in[i];
    }
    n->n_in = n_in;
    out->node = g->n_nodes++;
    out->grad = NULL;
    out->grad_ready = 0;
    return n;
}

/* ------------------------------------------------------------- scopes */

size_t kd_graph_scope_begin(kd_graph *g) { return g ? (size_t)g->n_mem : 0; }

/* Registers the tracked buffers that nodes recorded since the last call
 * retain (the op table's `retain`): each buffer remembers the first node
 * that reads it, and that node lists it in ret[]. */
static void kd__retain_one(kd_graph *g, kd__node *n, int node, const kd_tensor *t) {
    if (!t || !t->data || t->owns_data) return; /* parameters and NULL inputs */
    int i = kd__mem_find(g, t->data, 0);
    if (i < 0 || g->mem[i].first_node >= 0) return;
    g->mem[i].first_node = node;
    n->ret[n->n_ret++] = i;
}

static void kd__retain_flush(kd_graph *g) {
    for (; g->n_flushed < g->n_nodes; g->n_flushed++) {
        int i = g->n_flushed;
        kd__node *n = &g->tape[i];
        unsigned r = kd__op_table[n->op].retain;
        if ((n->op == KD_OP_RELU || n->op == KD_OP_LEAKY_RELU) && !kd__relu_uses_out(n))
            r = KD__RET_IN0;
        for (int k = 0; k < KD__NODE_MAX_IN; k++)
            if (r & (KD__RET_IN0 << k)) kd__retain_one(g, n, i, n->in[k]);
        if (r & KD__RET_OUT) kd__retain_one(g, n, i, n->out);
        if (r & KD__RET_SAVED) {
            kd__retain_one(g, n, i, n->saved[0]);
            kd__retain_one(g, n, i, n->saved[1]);
        }
    }
}

void kd_graph_scope_end(kd_graph *g, size_t scope, int n_keep, kd_tensor *const *keep) {
    /* A scope index past the table comes from before a reset: nothing to do. */
    if (!g || !g->mem_release || scope >= (size_t)g->n_mem) return;
    kd__retain_flush(g);
    int from = (int)scope;
    for (int k = 0; k < n_keep; k++) {
        if (!keep || !keep[k] || !keep[k]->data) continue;
        int i = kd__mem_find(g, keep[k]->data, from);
        if (i < 0) continue;
        g->mem[i].keep = 1;
        g->mem[i].state = KD__MEM_LIVE; /* an orphan of an inner scope kept here lives on */
    }
    for (int i = from; i < g->n_mem; i++) {
        kd__mem *e = &g->mem[i];
        if (e->keep) {
            e->keep = 0; /* now belongs to the enclosing scope */
            continue;
        }
        if (e->state != KD__MEM_LIVE) continue;
        if (e->first_node >= 0)
            e->state = KD__MEM_ORPHAN; /* kd_backward frees it after its last reader */
        else
            kd__mem_release(g, e);
    }
}

kd_tensor *kd_graph_scope_return(kd_graph *g, size_t scope, kd_tensor *keep) {
    kd_graph_scope_end(g, scope, 1, &keep);
    return keep;
}

/* A gradient-like tensor like t: a fresh arena descriptor whose data is a
 * recycled buffer of the same rounded size when one is free, else new arena
 * memory. Contents are undefined (callers overwrite or zero). */
static kd_tensor *kd__grad_new(kd_graph *g, const kd_tensor *t) {
    kd_tensor *d = kd__desc(g, KD_F32, t->ndim, t->shape);
    if (!d) return NULL;
    if (t->layout == KD_LAYOUT_NCHW16C || t->layout == KD_LAYOUT_NHWC) {
        d->layout = t->layout;
        for (int i = 0; i < d->ndim; i++) d->stride[i] = 0; /* as kd__new_lay */
    }
    size_t bytes = kd__rbytes(kd_tensor_nbytes(d));
    d->data = kd__bin_take(g, bytes);
    if (!d->data) d->data = kd__scratch(g, bytes);
    return d->data ? d : NULL;
}

kd_tensor *kd__tmp_like(kd_graph *g, const kd_tensor *t) { return kd__grad_new(g, t); }

void kd__tmp_free(kd_graph *g, kd_tensor *t) {
    if (t) kd__bin_put(g, t->data, kd__rbytes(kd_tensor_nbytes(t)));
}

/* Returns t's gradient buffer to the free list of its size; t->grad becomes
 * NULL (grad_ready stays 1: t did get its gradient in this backward). */
static void kd__grad_release(kd_graph *g, kd_tensor *t) {
    kd__bin_put(g, t->grad->data, kd__rbytes(kd_tensor_nbytes(t->grad)));
    t->grad = NULL;
}

kd_tensor *kd__grad(kd_graph *g, kd_tensor *t, int *acc) {
    int leaf = t->node < 0;
    if (!t->grad) {
        if (leaf && t->owns_data) {
            /* A heap leaf (parameter) gets a persistent, zeroed .grad once. */
            kd_status s = kd_tensor_require_grad(t);
            if (s != KD_OK) return kd__fail(g, s);
            g->heap_allocs++;
        } else {
            t->grad = kd__grad_new(g, t);
            if (!t->grad) return NULL;
            if (leaf) memset(t->grad->data, 0, kd_tensor_nbytes(t->grad));
        }
        t->grad_ready = 0;
    }
    *acc = leaf ? 1 : t->grad_ready;
    t->grad_ready = 1;
    return t->grad;
}

kd_tensor *kd__grad_acc(kd_graph *g, kd_tensor *t) {
    int acc;
    kd_tensor *d = kd__grad(g, t, &acc);
    if (d && !acc) memset(d->data, 0, kd_tensor_nbytes(d));
    return d;
}

int kd__grads_common(kd_graph *g, int k, kd_tensor *const *ts, kd_tensor **out) {
    int acc[4], any0 = 0, any1 = 0;
    for (int i = 0; i < k; i++) {
        out[i] = NULL;
        if (!ts[i]) continue;
        out[i] = kd__grad(g, ts[i], &acc[i]);
        if (!out[i]) return -1;
        any0 |= !acc[i];
        any1 |= acc[i];
    }
    if (!(any0 && any1)) return any1;
    for (int i = 0; i < k; i++)
        if (out[i] && !acc[i]) memset(out[i]->data, 0, kd_tensor_nbytes(out[i]));
    return 1;
}

void kd__axpy(float *restrict dst, const float *restrict src, float s, int64_t n, int acc) {
    if (acc && s == 1.0f) {
#pragma omp parallel for simd schedule(static) if (n >= KD__PAR_MIN)
        for (int64_t i = 0; i < n; i++) dst[i] += src[i];
    } else if (acc) {
#pragma omp parallel for simd schedule(static) if (n >= KD__PAR_MIN)
        for (int64_t i = 0; i < n; i++) dst[i] += s * src[i];
    } else if (s == 1.0f) {
        memcpy(dst, src, (size_t)n * sizeof *dst);
    } else {
#pragma omp parallel for simd schedule(static) if (n >= KD__PAR_MIN)
        for (int64_t i = 0; i < n; i++) dst[i] = s * src[i];
    }
}

#define KD__SUM_BLOCK 4096

double kd__sum_f64(kd_graph *g, const float *x, int64_t n) {
    int64_t nb = (n + KD__SUM_BLOCK - 1) / KD__SUM_BLOCK;
    if (nb <= 1) {
        double s = 0;
        for (int64_t i = 0; i < n; i++) s += x[i];
        return s;
    }
    /* Block partials do not depend on the thread count, nor does their order. */
    double *part = kd__scratch(g, (size_t)nb * sizeof *part);
    if (!part) return 0;
#pragma omp parallel for schedule(static) if (n >= KD__PAR_MIN)
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * KD__SUM_BLOCK, hi = lo + KD__SUM_BLOCK < n ? lo + KD__SUM_BLOCK : n;
        double s = 0;
        for (int64_t i = lo; i < hi; i++) s += x[i];
        part[b] = s;
    }
    double s = 0;
    for (int64_t b = 0; b < nb; b++) s += part[b];
    return s;
}

/* ------------------------------------------------------------ backward */

void kd_graph_set_grad_hook(kd_graph *g, kd_grad_ready_fn fn, void *user, kd_tensor *const *watch, int n) {
    g->grad_hook = fn;
    g->grad_hook_user = user;
    g->grad_watch = fn ? watch : NULL;
    g->n_grad_watch = fn && watch ? n : 0;
}

/* (tape index, watch index) of a watched tensor's earliest reader. */
typedef struct {
    int32_t node, idx;
} kd__ready;

static int kd__ready_cmp(const void *a, const void *b) {
    const kd__ready *x = a, *y = b;
    if (x->node != y->node) return x->node > y->node ? -1 : 1; /* the backward's order */
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* The watched tensors in the order kd_backward finishes them: a hash of the
 * watch list, one pass up the tape noting each one's earliest reader, then
 * sorted by that node, latest first. *n: entries (read by some node). */
static kd__ready *kd__ready_order(kd_graph *g, int *n) {
    *n = 0;
    const int w = g->n_grad_watch;
    int hs = 16;
    while (hs < 2 * w) hs *= 2;
    int32_t *slot = kd__scratch(g, (size_t)hs * sizeof *slot);
    int32_t *first = kd__scratch(g, (size_t)w * sizeof *first);
    kd__ready *out = kd__scratch(g, (size_t)w * sizeof *out);
    if (!slot || !first || !out) return NULL;
    for (int i = 0; i < hs; i++) slot[i] = -1;
#define KD__HASH(t) ((int)((((uintptr_t)(t)) >> 6) * 0x9E3779B1u) & (hs - 1))
    for (int i = 0; i < w; i++) {
        first[i] = -1;
        int h = KD__HASH(g->grad_watch[i]);
        while (slot[h] >= 0) h = (h + 1) & (hs - 1);
        slot[h] = i;
    }
    for (int k = 0; k < g->n_nodes; k++) {
        const kd__node *nd = &g->tape[k];
        for (int j = 0; j < nd->n_in; j++) {
            const kd_tensor *t = nd->in_list ? nd->in_list[j] : (j < KD__NODE_MAX_IN ? nd->in[j] : NULL);
            if (!t || t->node >= 0 || !t->requires_grad) continue;
            for (int h = KD__HASH(t); slot[h] >= 0; h = (h + 1) & (hs - 1))
                if (g->grad_watch[slot[h]] == t) {
                    if (first[slot[h]] < 0) first[slot[h]] = k;
                    break;
                }
        }
    }
#undef KD__HASH
    for (int i = 0; i < w; i++)
        if (first[i] >= 0) out[(*n)++] = (kd__ready){first[i], i};
    qsort(out, (size_t)*n, sizeof *out, kd__ready_cmp);
    return out;
}

kd_status kd_backward(kd_graph *g, kd_tensor *loss) {
    if (!g) return kd_error(KD_ERR_INVALID, "kd_backward: graph is NULL");
    if (g->status != KD_OK) return g->status;
    if (!loss) {
        kd__fail(g, kd_error(KD_ERR_INVALID, "kd_backward: loss is NULL"));
        return g->status;
    }
    if (kd_tensor_numel(loss) != 1 || loss->dtype != KD_F32) {
        char buf[96];
        kd__fail(g, kd_error(KD_ERR_SHAPE, "kd_backward: loss has shape %s, expected a single "
                                           "float32 element", kd_shape_str(loss, buf, sizeof buf)));
        return g->status;
    }
    if (!kd__needs_grad(g, loss)) {
        kd__fail(g, kd_error(KD_ERR_INVALID, "kd_backward: the loss does not depend on any "
                                             "tensor that requires grad (were gradients "
                                             "disabled?)"));
        return g->status;
    }
    if (g->tape_consumed) {
        kd__fail(g, kd_error(KD_ERR_INVALID, "kd_backward: this tape was walked before and "
                                             "the activations it saved were released (scopes); "
                                             "run the forward again"));
        return g->status;
    }
    if (g->mem_release) kd__retain_flush(g);
    /* A second backward over the same tape starts every intermediate afresh. */
    for (int i = 0; i < g->n_nodes; i++) g->tape[i].out->grad_ready = 0;
    int acc;
    kd_tensor *seed = kd__grad(g, loss, &acc);
    if (!seed) return g->status;
    kd_f32(seed)[0] = acc ? kd_f32(seed)[0] + 1.0f : 1.0f;
    int n_ready = 0, next_ready = 0;
    kd__ready *ready = g->grad_hook && g->n_grad_watch > 0 ? kd__ready_order(g, &n_ready) : NULL;
    if (g->grad_hook && g->n_grad_watch > 0 && !ready) return g->status;
    for (int i = g->n_nodes - 1; i >= 0; i--) {
        kd__node *n = &g->tape[i];
        if (n->out->grad_ready) { /* else the loss does not depend on it */
            kd_status s = kd__op_table[n->op].backward(g, n);
            if (s == KD_OK && g->status != KD_OK) s = g->status;
            if (s != KD_OK) {
                kd__fail(g, s);
                return s;
            }
            /* Every consumer of n->out comes later on the tape, so its
             * gradient was complete when this rule ran and is dead now:
             * recycle the buffer (the loss keeps its seed). */
            if (n->out != loss) kd__grad_release(g, n->out);
        }
        /* No rule before this one reads the buffers this node was the first
         * to retain: those whose scope has ended go back to the free lists,
         * where the gradients of earlier nodes find them. */
        for (int k = 0; k < n->n_ret; k++) {
            kd__mem *e = &g->mem[n->ret[k]];
            if (e->state != KD__MEM_ORPHAN) continue;
            kd__mem_release(g, e);
            g->tape_consumed = 1;
        }
        /* Watched tensors whose earliest reader was this node are final. */
        for (; next_ready < n_ready && ready[next_ready].node == i; next_ready++)
            g->grad_hook(g->grad_hook_user, ready[next_ready].idx);
    }
    return KD_OK;
}
