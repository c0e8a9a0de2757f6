/* Measured fp32 peak of this machine: every thread runs a loop of independent
 * fused multiply-adds on registers (AVX-512 when the build targets it, else
 * AVX2+FMA, else scalar), and the line reports the best of several runs.
 *
 *   build/bench/bench_peak [--threads 2] [--ms 200] [--repeats 5]
 *
 * One FMA on a vector of L floats counts 2 * L FLOPs. The figure is the
 * arithmetic ceiling kd's GFLOP/s are compared with in bench/run.sh and the
 * normaliser of the CI regression guard (bench/guard.sh): it moves with the
 * clock and with other load on the machine, which is the point. It needs the
 * library's build flags (-march=native by default, KD_NATIVE) to reach the
 * widest vector unit. Prints one JSON line. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#define NACC 16 /* independent accumulators: covers FMA latency x issue width */

#if defined(__AVX512F__)
#define ISA "avx512"
#define LANES 16
typedef __m512 vec;
#define VSET1(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
static float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__FMA__)
#define ISA "avx2-fma"
#define LANES 8
typedef __m256 vec;
#define VSET1(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
static float vsum(vec v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
#else
#define ISA "scalar"
#define LANES 1
typedef float vec;
#define VSET1(x) (x)
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VADD(a, b) ((a) + (b))
static float vsum(vec v) { return v; }
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* iters * NACC FMAs on one thread; the result keeps the compiler honest. */
static float fma_loop(long iters, float seed) {
    vec acc[NACC];
    for (int j = 0; j < NACC; j++) acc[j] = VSET1(seed + 0.001f * (float)j);
    const vec a = VSET1(0.999999f), b = VSET1(1e-7f);
    /* Fully unrolled so the accumulators live in registers: without it gcc
     * -O2 keeps acc[] in memory and every FMA waits on a load and a store
     * (measured 86 GFLOP/s instead of ~270 on 2 cores). */
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 16
        for (int j = 0; j < NACC; j++) acc[j] = VFMA(acc[j], a, b);
    }
    vec s = acc[0];
    for (int j = 1; j < NACC; j++) s = VADD(s, acc[j]);
    return vsum(s);
}

/* GFLOP/s of `threads` threads each running `iters` iterations. */
static double run(int threads, long iters) {
    volatile float sink = 0.0f;
    double t0 = now_s();
#pragma omp parallel num_threads(threads)
    {
        float r = fma_loop(iters, 1.0f + (float)omp_get_thread_num());
#pragma omp critical
        sink += r;
    }
    double dt = now_s() - t0;
    (void)sink;
    return (double)threads * (double)iters * NACC * LANES * 2.0 / dt * 1e-9;
}

int main(int argc, char **argv) {
    int threads = 2, repeats = 5;
    double ms = 200.0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--ms")) ms = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--repeats")) repeats = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench_peak [--threads 2] [--ms 200] [--repeats 5]\n");
            return 2;
        }
    }
    if (threads < 1 || repeats < 1 || ms <= 0) return 2;
    /* Calibrate the iteration count to about `ms` milliseconds per run. */
    long iters = 1 << 16;
    for (;;) {
        double t0 = now_s();
        (void)run(threads, iters);
        double dt = now_s() - t0;
        if (dt * 1e3 > ms * 0.25 || iters > (1L << 40)) {
            iters = (long)((double)iters * ms / (dt * 1e3)) + 1;
            break;
        }
        iters *= 4;
    }
    double best = 0.0, worst = 1e300;
    for (int r = 0; r < repeats; r++) {
        double g = run(threads, iters);
        if (g > best) best = g;
        if (g < worst) worst = g;
    }
    printf("{\"peak_gflops\": %.2f, \"min_gflops\": %.2f, \"per_thread_gflops\": %.2f, \"threads\": %d, "
           "\"isa\": \"%s\", \"lanes\": %d, \"repeats\": %d, \"ms\": %.0f}\n",
           best, worst, best / threads, threads, ISA, LANES, repeats, ms);
    return 0;
}
