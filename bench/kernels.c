/* Kernel lab: times each backend kernel on the layer shapes of the CIFAR/MNIST
 * ResNets, for every backend given, and checks each against the ref backend.
 *   build/bench/bench_kernels [N C H] [backends...]     e.g. 64 16 28 cpu ref
 * Prints milliseconds per call (median of repeats) and GFLOP/s for convs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kd/backend.h"

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

int main(int argc, char **argv) {
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
