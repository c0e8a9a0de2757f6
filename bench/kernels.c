/* Kernel lab: times each backend kernel on the layer shapes of the CIFAR/MNIST
 * ResNets, for every backend given, and checks each against the ref backend.
 *   build/bench/bench_kernels [N C H] [backends...]     e.g. 64 16 28 cpu ref
 *   build/bench/bench_kernels swin [B] [backends...]     Swin-T stage-1 shapes, batch B (8)
 * Prints milliseconds per call (median of repeats) and GFLOP/s for convs and
 * batched matmuls. The swin rows: layer norm over (B*56*56, 96) tokens, GELU
 * on the MLP hidden (B*3136, 384), window attention's q k^T and attn @ v as
 * batched matmuls over B*64 windows * 3 heads of (49, 32) (cpu: oneDNN's
 * matmul primitive and a loop of sgemm), and softmax over the (B*64, 3, 49,
 * 49) scores (kd_softmax forward + backward; on cpu also oneDNN's softmax
 * primitive for comparison). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kd/autograd.h"
#include "kd/backend.h"
#ifdef KD_WITH_DNNL
#include <dnnl.h>

#include "backend/cpu/dnnl_backend.h"
#endif

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

static kd_tensor *mk(int nd, int64_t a, int64_t b, int64_t c, int64_t d, uint64_t seed) {
    int64_t s[4] = {a, b, c, d};
    kd_tensor *t = NULL;
    if (kd_tensor_new(KD_F32, nd, s, &t) != KD_OK) {
        fprintf(stderr, "bench: %s\n", kd_last_error());
        exit(1);
    }
    kd_rng r;
    kd_rng_init(&r, seed, 1);
    for (int64_t i = 0; i < kd_tensor_numel(t); i++) kd_f32(t)[i] = kd_rng_uniform(&r) - 0.5f;
    return t;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define REPS 9
#define TIME(label, flops, expr)                                                         \
    do {                                                                                 \
        double t[REPS];                                                                  \
        for (int warm_ = 0; warm_ < 2; warm_++) (void)(expr);                                        \
        for (int r = 0; r < REPS; r++) {                                                 \
            double t0 = now_ms();                                                        \
            kd_status s_ = (expr);                                                       \
            t[r] = now_ms() - t0;                                                        \
            if (s_ != KD_OK) { fprintf(stderr, "%s: %s\n", label, kd_last_error()); exit(1); } \
        }                                                                                \
        qsort(t, REPS, sizeof t[0], cmp_d);                                              \
        printf("  %-5s %-34s %9.3f ms  (min %.3f max %.3f)", be->name, label, t[REPS / 2], t[0], t[REPS - 1]); \
        if (flops > 0) printf("  %6.1f GFLOP/s", (flops) / (t[REPS / 2] * 1e6));         \
        printf("\n");                                                                    \
    } while (0)

static void bench_backend(kd_backend *be, int64_t N, int64_t C, int64_t H) {
    kd_conv2d_params p = {{1, 1}, {1, 1}, {1, 1}, 1, 0};
    kd_tensor *x = mk(4, N, C, H, H, 1), *w = mk(4, C, C, 3, 3, 2), *y = mk(4, N, C, H, H, 3);
    kd_tensor *dx = mk(4, N, C, H, H, 4), *dw = mk(4, C, C, 3, 3, 5), *dy = mk(4, N, C, H, H, 6);
    double cf = 2.0 * N * C * H * H * C * 9;
    char label[64];
    snprintf(label, sizeof label, "conv3x3 %lldx%lld fwd", (long long)C, (long long)H);
    TIME(label, cf, be->conv2d_forward(be, &p, x, w, NULL, y));
    snprintf(label, sizeof label, "conv3x3 %lldx%lld bwd data", (long long)C, (long long)H);
    TIME(label, cf, be->conv2d_backward_data(be, &p, dy, w, dx, 0));
    snprintf(label, sizeof label, "conv3x3 %lldx%lld bwd weights", (long long)C, (long long)H);
    TIME(label, cf, be->conv2d_backward_weights(be, &p, dy, x, dw, NULL, 0));
    kd_tensor *g = mk(1, C, 1, 1, 1, 7), *b = mk(1, C, 1, 1, 1, 8), *rm = mk(1, C, 1, 1, 1, 9), *rv = mk(1, C, 1, 1, 1, 10);
    for (int64_t i = 0; i < C; i++) kd_f32(rv)[i] = 1.0f;
    kd_tensor *sm = mk(1, C, 1, 1, 1, 11), *sr = mk(1, C, 1, 1, 1, 12), *dg = mk(1, C, 1, 1, 1, 13), *db = mk(1, C, 1, 1, 1, 14);
    kd_bn_params bp = {1e-5f, 0.1f, 1};
    TIME("batchnorm train fwd", 0, be->batchnorm_forward(be, &bp, x, g, b, rm, rv, y, sm, sr));
    TIME("batchnorm train bwd", 0, be->batchnorm_backward(be, &bp, dy, x, g, sm, sr, dx, dg, db, 0));
    TIME("relu fwd", 0, be->eltwise_forward(be, KD_ELTWISE_RELU, 0.0f, x, y));
    TIME("relu bwd", 0, be->eltwise_backward(be, KD_ELTWISE_RELU, 0.0f, dy, x, dx, 0));
    kd_tensor *a = mk(2, N, C * 4, 1, 1, 15), *wl = mk(2, 10, C * 4, 1, 1, 16), *o = mk(2, N, 10, 1, 1, 17);
    TIME("gemm fc fwd", 0, be->gemm(be, 0, 1, N, 10, C * 4, 1.0f, kd_f32(a), C * 4, kd_f32(wl), C * 4, 0.0f, kd_f32(o), 10));
    kd_tensor *ts[] = {x, w, y, dx, dw, dy, g, b, rm, rv, sm, sr, dg, db, a, wl, o};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) kd_tensor_free(ts[i]);
}

/* oneDNN's softmax primitive over the last axis of (rows, C), forward and
 * backward, for comparison with kd_softmax (plain C in ops_loss.c). */
#ifdef KD_WITH_DNNL
static void bench_dnnl_softmax(kd_backend *be, int64_t rows, int64_t C, kd_tensor *x, kd_tensor *y,
                               kd_tensor *dy, kd_tensor *dx) {
    dnnl_engine_t eng;
    dnnl_stream_t st;
    dnnl_memory_desc_t md;
    dnnl_softmax_desc_t fd, bd;
    dnnl_primitive_desc_t fpd, bpd;
    dnnl_primitive_t fp, bp;
    dnnl_dims_t dims = {rows, C};
    dnnl_memory_t mx, my, mdy, mdx;
    if (dnnl_engine_create(&eng, dnnl_cpu, 0) || dnnl_stream_create(&st, eng, dnnl_stream_default_flags) ||
        dnnl_memory_desc_init_by_tag(&md, 2, dims, dnnl_f32, dnnl_ab) ||
        dnnl_softmax_forward_desc_init(&fd, dnnl_forward_training, &md, 1) ||
        dnnl_primitive_desc_create(&fpd, &fd, NULL, eng, NULL) ||
        dnnl_softmax_backward_desc_init(&bd, &md, &md, 1) ||
        dnnl_primitive_desc_create(&bpd, &bd, NULL, eng, fpd) || dnnl_primitive_create(&fp, fpd) ||
        dnnl_primitive_create(&bp, bpd) || dnnl_memory_create(&mx, &md, eng, x->data) ||
        dnnl_memory_create(&my, &md, eng, y->data) || dnnl_memory_create(&mdy, &md, eng, dy->data) ||
        dnnl_memory_create(&mdx, &md, eng, dx->data)) {
        fprintf(stderr, "bench: oneDNN softmax setup failed\n");
        exit(1);
    }
    dnnl_exec_arg_t fa[2] = {{DNNL_ARG_SRC, mx}, {DNNL_ARG_DST, my}};
    dnnl_exec_arg_t ba[3] = {{DNNL_ARG_DST, my}, {DNNL_ARG_DIFF_DST, mdy}, {DNNL_ARG_DIFF_SRC, mdx}};
#define DNNL_RUN(p, n, a) (dnnl_primitive_execute(p, st, n, a) || dnnl_stream_wait(st) ? KD_ERR_BACKEND : KD_OK)
    TIME("softmax attn fwd (oneDNN prim)", 0, DNNL_RUN(fp, 2, fa));
    TIME("softmax attn bwd (oneDNN prim)", 0, DNNL_RUN(bp, 3, ba));
#undef DNNL_RUN
    dnnl_primitive_destroy(fp);
    dnnl_primitive_destroy(bp);
    dnnl_primitive_desc_destroy(fpd);
    dnnl_primitive_desc_destroy(bpd);
    dnnl_memory_destroy(mx);
    dnnl_memory_destroy(my);
    dnnl_memory_destroy(mdy);
    dnnl_memory_destroy(mdx);
    dnnl_stream_destroy(st);
    dnnl_engine_destroy(eng);
}
#endif

/* kd_softmax forward, and forward + backward, on a graph of backend be. */
static kd_status softmax_step(kd_graph *g, kd_tensor *x, kd_tensor *r, int backward) {
    kd_graph_reset(g);
    kd_tensor *y = kd_softmax(g, x);
    if (!backward) return kd_graph_status(g);
    return kd_backward(g, kd_sum(g, kd_mul(g, y, r)));
}

static void bench_swin(kd_backend *be, int64_t B) {
    const int64_t T = B * 56 * 56, D = 96, H = 4 * D;
    const int64_t W = B * 64 * 3, L = 49, dh = 32; /* windows x heads, tokens, head dim */
    char label[64];
    kd_tensor *x = mk(2, T, D, 1, 1, 1), *y = mk(2, T, D, 1, 1, 2), *dy = mk(2, T, D, 1, 1, 3);
    kd_tensor *dx = mk(2, T, D, 1, 1, 4), *g = mk(1, D, 1, 1, 1, 5), *b = mk(1, D, 1, 1, 1, 6);
    kd_tensor *sm = mk(1, T, 1, 1, 1, 7), *sr = mk(1, T, 1, 1, 1, 8), *dg = mk(1, D, 1, 1, 1, 9);
    kd_tensor *db = mk(1, D, 1, 1, 1, 10);
    snprintf(label, sizeof label, "layernorm fwd (%lld, %lld)", (long long)T, (long long)D);
    TIME(label, 0, be->layernorm_forward(be, 1e-5f, x, g, b, y, sm, sr));
    snprintf(label, sizeof label, "layernorm bwd (%lld, %lld)", (long long)T, (long long)D);
    TIME(label, 0, be->layernorm_backward(be, 1e-5f, dy, x, g, sm, sr, dx, dg, db, 0));
    kd_tensor *hx = mk(2, T, H, 1, 1, 11), *hy = mk(2, T, H, 1, 1, 12), *hd = mk(2, T, H, 1, 1, 13);
    snprintf(label, sizeof label, "gelu fwd (%lld, %lld)", (long long)T, (long long)H);
    TIME(label, 0, be->eltwise_forward(be, KD_ELTWISE_GELU, 0.0f, hx, hy));
    snprintf(label, sizeof label, "gelu bwd (%lld, %lld)", (long long)T, (long long)H);
    TIME(label, 0, be->eltwise_backward(be, KD_ELTWISE_GELU, 0.0f, hy, hx, hd, 0));
    kd_tensor *q = mk(3, W, L, dh, 1, 14), *k = mk(3, W, L, dh, 1, 15), *v = mk(3, W, L, dh, 1, 16);
    kd_tensor *s = mk(3, W, L, L, 1, 17), *o = mk(3, W, L, dh, 1, 18);
    double fl = 2.0 * W * L * L * dh;
    int modes = 1;
#ifdef KD_WITH_DNNL
    if (!strcmp(be->name, "cpu")) modes = 2;
#endif
    for (int m = 0; m < modes; m++) {
        const char *tag = modes == 1 ? "" : m == 0 ? " matmul" : " sgemm loop";
#ifdef KD_WITH_DNNL
        if (modes == 2) kd__cpu_set_bmm_mode(m == 0 ? KD_CPU_BMM_MATMUL : KD_CPU_BMM_LOOP);
#endif
        snprintf(label, sizeof label, "bmm q k^T %lldx(%lld,%lld)%s", (long long)W, (long long)L,
                 (long long)dh, tag);
        TIME(label, fl, be->gemm_batch(be, W, 0, 1, L, L, dh, 1.0f, kd_f32(q), dh, L * dh, kd_f32(k),
                                       dh, L * dh, 0.0f, kd_f32(s), L, L * L));
        snprintf(label, sizeof label, "bmm attn v %lldx(%lld,%lld)%s", (long long)W, (long long)L,
                 (long long)L, tag);
        TIME(label, fl, be->gemm_batch(be, W, 0, 0, L, dh, L, 1.0f, kd_f32(s), L, L * L, kd_f32(v),
                                       dh, L * dh, 0.0f, kd_f32(o), dh, L * dh));
        snprintf(label, sizeof label, "bmm attn^T v (a transposed)%s", tag);
        TIME(label, fl, be->gemm_batch(be, W, 1, 0, L, dh, L, 1.0f, kd_f32(s), L, L * L, kd_f32(v),
                                       dh, L * dh, 0.0f, kd_f32(o), dh, L * dh));
        snprintf(label, sizeof label, "bmm attn v (accumulate)%s", tag);
        TIME(label, fl, be->gemm_batch(be, W, 0, 0, L, dh, L, 1.0f, kd_f32(s), L, L * L, kd_f32(v),
                                       dh, L * dh, 1.0f, kd_f32(o), dh, L * dh));
        snprintf(label, sizeof label, "bmm attn^T v (a transposed, acc)%s", tag);
        TIME(label, fl, be->gemm_batch(be, W, 1, 0, L, dh, L, 1.0f, kd_f32(s), L, L * L, kd_f32(v),
                                       dh, L * dh, 1.0f, kd_f32(o), dh, L * dh));
    }
#ifdef KD_WITH_DNNL
    kd__cpu_set_bmm_mode(KD_CPU_BMM_AUTO);
#endif
    /* Softmax over the attention scores (W/3, 3, 49, 49) = (W * 49, 49) rows. */
    kd_graph *gr = NULL;
    if (kd_graph_init(&gr, be) != KD_OK) exit(1);
    int64_t ss[4] = {W / 3, 3, L, L};
    kd_tensor *sx = NULL, *rr = NULL;
    if (kd_tensor_new(KD_F32, 4, ss, &sx) != KD_OK || kd_tensor_new(KD_F32, 4, ss, &rr) != KD_OK) exit(1);
    memcpy(sx->data, s->data, kd_tensor_nbytes(sx));
    memcpy(rr->data, s->data, kd_tensor_nbytes(rr));
    kd_tensor_require_grad(sx);
    TIME("kd_softmax attn fwd", 0, softmax_step(gr, sx, rr, 0));
    TIME("kd_softmax attn fwd+bwd", 0, softmax_step(gr, sx, rr, 1));
#ifdef KD_WITH_DNNL
    if (!strcmp(be->name, "cpu")) {
        kd_tensor *sy = mk(2, W * L, L, 1, 1, 19), *sd = mk(2, W * L, L, 1, 1, 20);
        bench_dnnl_softmax(be, W * L, L, sx, sy, rr, sd);
        kd_tensor_free(sy);
        kd_tensor_free(sd);
    }
#endif
    kd_graph_free(gr);
    kd_tensor *ts[] = {x, y, dy, dx, g, b, sm, sr, dg, db, hx, hy, hd, q, k, v, s, o, sx, rr};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) kd_tensor_free(ts[i]);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "swin")) {
        int first = 2;
        int64_t B = 8;
        if (argc > 2 && argv[2][0] >= '0' && argv[2][0] <= '9') B = atoll(argv[first++]);
        const char *defaults[] = {"cpu", "ref"};
        int nb = argc > first ? argc - first : 2;
        printf("kernel lab (swin stage 1): batch %lld, %d threads\n", (long long)B,
               kd_get_num_threads());
        for (int i = 0; i < nb; i++) {
            kd_backend *be = NULL;
            if (kd_backend_get(argc > first ? argv[first + i] : defaults[i], &be) != KD_OK) {
                fprintf(stderr, "bench: %s\n", kd_last_error());
                return 1;
            }
            bench_swin(be, B);
        }
        return 0;
    }
    int64_t N = argc > 3 ? atoll(argv[1]) : 64, C = argc > 3 ? atoll(argv[2]) : 16, H = argc > 3 ? atoll(argv[3]) : 28;
    int first = argc > 3 ? 4 : 1;
    const char *defaults[] = {"cpu", "ref"};
    int nb = argc > first ? argc - first : 2;
    printf("kernel lab: N %lld, C %lld, H=W %lld, %d threads\n", (long long)N, (long long)C, (long long)H,
           kd_get_num_threads());
    for (int i = 0; i < nb; i++) {
        kd_backend *be = NULL;
        const char *name = argc > first ? argv[first + i] : defaults[i];
        if (kd_backend_get(name, &be) != KD_OK) {
            fprintf(stderr, "bench: %s\n", kd_last_error());
            return 1;
        }
        bench_backend(be, N, C, H);
    }
    return 0;
}
