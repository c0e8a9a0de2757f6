/*
 * dnnl_backend.c: the "cpu" backend, on oneDNN 2.x through its C API.
 *
 * What runs where:
 *   conv2d forward / backward data / backward weights (+bias)  oneDNN convolution
 *   batch norm forward (train, eval) and backward             oneDNN batch normalization,
 *       running statistics and save_rstd computed here (oneDNN does not update them)
 *   average pooling forward and backward                      oneDNN pooling
 *   max pooling forward and backward                          here, in C: kd's argmax `ws`
 *       (flat h*W+w per plane) is not oneDNN's workspace format, and one pass that
 *       writes y and ws costs less than oneDNN's pass plus an argmax pass
 *   gemm                                                      dnnl_sgemm (row-major)
 *   batched gemm                                              oneDNN matmul with a batch
 *       dimension (transposes as strides), or a loop of dnnl_sgemm (kd__cpu_set_bmm_mode)
 *   layer norm forward and backward                           oneDNN layer normalization,
 *       rstd computed here from oneDNN's variance (and the variance rebuilt for backward)
 *   softmax over the last axis forward and backward           oneDNN softmax
 *   eltwise relu / leaky relu, exp, log, gelu (erf) fwd/bwd   oneDNN eltwise (log forward: libm)
 * A configuration oneDNN rejects (dnnl_unimplemented or invalid arguments at
 * descriptor creation) runs on the ref kernels, with a debug log line.
 *
 * Files (shared declarations in dnnl_impl.h): dnnl_cache.c (engine, stream,
 * primitive cache, scratch buffer, trim, counters), dnnl_layout.c (bf16
 * rounding, accumulation, plain copies of blocked operands), dnnl_conv.c,
 * dnnl_norm.c (batch and layer norm), dnnl_pool.c, dnnl_matmul.c (gemm,
 * batched gemm), dnnl_eltwise.c (softmax, eltwise), and this file: the
 * vtable and the detection of native bf16.
 *
 * Performance design:
 *   - One engine and one stream per process, created on first use.
 *   - A hash map from a key (op kind, every shape and parameter) to the
 *     primitive descriptor, the primitive and its memory objects, so a shape
 *     costs one primitive creation; later calls only swap data handles.
 *     Rejected configurations are cached too (pd == NULL).
 *   - User-managed scratchpad: every primitive is created with
 *     dnnl_scratchpad_mode_user and runs on one growable buffer owned by the
 *     backend. Kernels that need temporaries (accumulate=1, statistics) take
 *     them from the same buffer, after the scratchpad part.
 *   - Activations are plain NCHW or kd's blocked NCHW16C (oneDNN nChw16c),
 *     each operand in its own tensor's layout (blocked_channels = 16); the
 *     bf16 activations of a bf16 graph may be NHWC instead (oneDNN nhwc:
 *     `bf16_layout`, picked below, on AMX CPUs). A conv
 *     with a packed operand is created with dnnl_format_tag_any weights:
 *     kd's weights stay OIHW, and a cached reorder (OIHW -> the pd's format
 *     before forward / backward data; the pd's format -> OIHW after backward
 *     weights) runs into the scratch buffer every call (weights change every
 *     step; they are small). All-plain convs keep plain OIHW weights. The
 *     formats are chosen in one place (conv_layout_tags).
 *   - A configuration that ends on the ref kernels with packed operands
 *     runs them on plain heap copies (a rare path: shapes oneDNN rejects).
 *
 * Threading and determinism: oneDNN runs on OpenMP with kd's thread count;
 * every reduction here is either done by oneDNN (fixed partition for a fixed
 * thread count) or by one thread per output in a fixed order. One mutex
 * guards the cache, the cached memory objects and the scratch buffer for the
 * whole of a kernel call (one graph uses a backend at a time anyway).
 */
#include "backend/cpu/dnnl_impl.h"

#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

static kd_backend g_cpu_backend = {
    .name = "cpu",
    .device = KD_DEVICE_CPU,
    .blocked_channels = KD_LAYOUT_BLOCK,
    .bf16 = -1, /* resolved by kd__backend_cpu() */
    .bf16_layout = KD_LAYOUT_NCHW16C,
    .conv2d_forward = kd__cpu_conv2d_forward,
    .conv2d_backward_data = kd__cpu_conv2d_backward_data,
    .conv2d_backward_weights = kd__cpu_conv2d_backward_weights,
    .batchnorm_forward = kd__cpu_batchnorm_forward,
    .batchnorm_backward = kd__cpu_batchnorm_backward,
    .pool2d_forward = kd__cpu_pool2d_forward,
    .pool2d_backward = kd__cpu_pool2d_backward,
    .gemm = kd__cpu_gemm,
    .gemm_batch = kd__cpu_gemm_batch,
    .layernorm_forward = kd__cpu_layernorm_forward,
    .layernorm_backward = kd__cpu_layernorm_backward,
    .softmax_forward = kd__cpu_softmax_forward,
    .softmax_backward = kd__cpu_softmax_backward,
    .eltwise_forward = kd__cpu_eltwise_forward,
    .eltwise_backward = kd__cpu_eltwise_backward,
    .trim = kd__cpu_trim,
    .impl = &kd__cpu_st,
};

/* bf16 convolutions run natively when oneDNN finds AVX-512-BF16 (or AMX,
 * which includes it); elsewhere oneDNN would emulate them slowly, so kd
 * reports no bf16 and the graph refuses the setting. KD_BF16=0 in the
 * environment hides it (to compare). */
static void cpu_detect_bf16(void) {
    const char *env = getenv("KD_BF16");
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    int native = ((int)isa & (int)dnnl_cpu_isa_avx512_core_bf16) ==
                 (int)dnnl_cpu_isa_avx512_core_bf16;
    g_cpu_backend.bf16 = native && !(env && env[0] == '0');
    /* oneDNN's AMX backward-data and backward-weights convolutions take
     * only nhwc activations (jit_avx512_core_amx_conv_kernel.cpp: "TODO:
     * enable support for nChw16c"), and its brgemm convolutions need nhwc
     * in every pass; with nChw16c an AMX CPU would run AMX in the forward
     * at most. Without AMX, nChw16c is as fast or faster
     * (bench/conv_layouts.c, docs/PERFORMANCE.md). */
    int amx = ((int)isa & (int)dnnl_cpu_isa_avx512_core_amx) == (int)dnnl_cpu_isa_avx512_core_amx;
    g_cpu_backend.bf16_layout = amx ? KD_LAYOUT_NHWC : KD_LAYOUT_NCHW16C;
    /* Without AMX, an Intel core's bf16 dot product (one `vdpbf16ps` port,
     * 32 multiply-adds a cycle) does not beat its two fp32 FMA ports, and
     * oneDNN's avx512_core_bf16 convolutions ran 0.43-0.67x its fp32 ones on
     * a Xeon (bench/results/conv-layouts-*-intel-20261206.md); AMD's Zen 4
     * runs them about twice as fast as fp32 (docs/PERFORMANCE.md). */
    char vendor[13] = "";
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (__get_cpuid(0, &a, &b, &c, &d)) {
        memcpy(vendor, &b, 4);
        memcpy(vendor + 4, &d, 4);
        memcpy(vendor + 8, &c, 4);
    }
#endif
    g_cpu_backend.bf16_slow = g_cpu_backend.bf16 == 1 && !amx && !strcmp(vendor, "GenuineIntel");
}

kd_backend *kd__backend_cpu(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, cpu_detect_bf16);
    return &g_cpu_backend;
}
