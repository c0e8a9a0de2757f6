/* Which oneDNN convolution kernels each activation layout reaches, and how
 * fast: the 3x3 convolutions of the CIFAR ResNets (resnet8x4 / resnet32x4:
 * 64 channels at 32x32, 128 at 16x16, 256 at 8x8; wrn_16_2: 32, 64, 128),
 * batch 64, with activations in nChw16c (kd's layout), nhwc (PyTorch's
 * channels_last) and format `any` (oneDNN's own choice), in the passes and
 * data types kd's training step runs:
 *   fwd     src, weights, dst in the precision (bf16: bf16 in and out)
 *   bwd_d   diff_dst and weights in the precision, diff_src float32
 *   bwd_w   src and diff_dst in the precision, diff_weights float32
 * Weights are always `any`, as in kd. For each it prints the implementation
 * oneDNN picked (its name ends in _amx or _amx_bf16 exactly when AMX tiles
 * are used), the layout it settled on, and the median time of --repeats
 * runs after one warm-up.
 *
 *   build/bench/bench_conv_layouts [--precision bf16|f32] [--threads 2]
 *                                  [--repeats 9] [--batch 64]
 *
 * This is the first thing to run on a new kind of CPU (AMX, for instance):
 * it tells whether kd's blocked layout keeps a convolution off the fastest
 * kernels before any change to kd's layout policy is made. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef KD_WITH_DNNL
#include <dnnl.h>
#include <omp.h>

#define CK(x)                                                                         \
    do {                                                                              \
        dnnl_status_t s_ = (x);                                                       \
        if (s_ != dnnl_success) {                                                     \
            fprintf(stderr, "bench_conv_layouts: %s failed (%d)\n", #x, (int)s_);    \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static dnnl_engine_t eng;
static dnnl_stream_t strm;
static int repeats = 9;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e3 * (double)t.tv_sec + 1e-6 * (double)t.tv_nsec;
}

/* A memory object of md, filled with a small normal value in every element
 * (the bytes 00 3c repeated: bf16 0.0078125, or about 0.0078 as float32). */
static dnnl_memory_t mem(const dnnl_memory_desc_t *md) {
    dnnl_memory_t m;
    CK(dnnl_memory_create(&m, md, eng, DNNL_MEMORY_ALLOCATE));
    void *p;
    CK(dnnl_memory_get_data_handle(m, &p));
    size_t n = dnnl_memory_desc_get_size(md);
    for (size_t i = 0; i + 1 < n; i += 2) ((unsigned char *)p)[i] = 0x00, ((unsigned char *)p)[i + 1] = 0x3c;
    return m;
}

static const char *impl(const_dnnl_primitive_desc_t pd) {
    const char *s = "?";
    CK(dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &s));
    return s;
}

/* The activation layout a pd settled on, by comparing with the two tags. */
static const char *layout_of(const dnnl_memory_desc_t *md) {
    static const struct { dnnl_format_tag_t tag; const char *name; } tags[] = {
        {dnnl_nChw16c, "nChw16c"}, {dnnl_nhwc, "nhwc"}, {dnnl_nchw, "nchw"}, {dnnl_nChw8c, "nChw8c"}};
    for (size_t i = 0; i < sizeof tags / sizeof *tags; i++) {
        dnnl_memory_desc_t t;
        if (dnnl_memory_desc_init_by_tag(&t, 4, md->dims, md->data_type, tags[i].tag) == dnnl_success &&
            dnnl_memory_desc_equal(&t, md))
            return tags[i].name;
    }
    return "other";
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median milliseconds of `repeats` runs after one warm-up. */
static double timed(const_dnnl_primitive_desc_t pd, int nargs, const dnnl_exec_arg_t *args) {
    dnnl_primitive_t p;
    CK(dnnl_primitive_create(&p, pd));
    double *t = malloc(sizeof *t * (size_t)repeats);
    if (!t) exit(1);
    for (int r = -1; r < repeats; r++) {
        double a = now_ms();
        CK(dnnl_primitive_execute(p, strm, nargs, args));
        CK(dnnl_stream_wait(strm));
        if (r >= 0) t[r] = now_ms() - a;
    }
    dnnl_primitive_destroy(p);
    qsort(t, (size_t)repeats, sizeof *t, cmp_double);
    double m = t[repeats / 2];
    free(t);
    return m;
}

static void row(int N, int C, int H, dnnl_data_type_t dt, dnnl_format_tag_t tag, const char *tag_name) {
    dnnl_dims_t sd = {N, C, H, H}, wd = {C, C, 3, 3}, dd = {N, C, H, H}, st = {1, 1}, pad = {1, 1};
    dnnl_memory_desc_t src, wei, dst, dsrc, dwei, ddst;
    CK(dnnl_memory_desc_init_by_tag(&src, 4, sd, dt, tag));
    CK(dnnl_memory_desc_init_by_tag(&dst, 4, dd, dt, tag));
    CK(dnnl_memory_desc_init_by_tag(&wei, 4, wd, dt, dnnl_format_tag_any));
    CK(dnnl_memory_desc_init_by_tag(&ddst, 4, dd, dt, tag));
    CK(dnnl_memory_desc_init_by_tag(&dsrc, 4, sd, dnnl_f32, tag));
    CK(dnnl_memory_desc_init_by_tag(&dwei, 4, wd, dnnl_f32, dnnl_format_tag_any));
    double gflop = 2.0 * N * C * H * H * C * 9 * 1e-9;

    dnnl_convolution_desc_t fd, bd, wdsc;
    dnnl_primitive_desc_t fpd, bpd, wpd;
    CK(dnnl_convolution_forward_desc_init(&fd, dnnl_forward_training, dnnl_convolution_direct, &src, &wei,
                                          NULL, &dst, st, pad, pad));
    CK(dnnl_primitive_desc_create(&fpd, &fd, NULL, eng, NULL));
    CK(dnnl_convolution_backward_data_desc_init(&bd, dnnl_convolution_direct, &dsrc, &wei, &ddst, st, pad, pad));
    CK(dnnl_primitive_desc_create(&bpd, &bd, NULL, eng, fpd));
    CK(dnnl_convolution_backward_weights_desc_init(&wdsc, dnnl_convolution_direct, &src, &dwei, NULL, &ddst, st,
                                                   pad, pad));
    CK(dnnl_primitive_desc_create(&wpd, &wdsc, NULL, eng, fpd));

    static const struct { dnnl_query_t q[3]; int arg[3]; } pass[3] = {
        {{dnnl_query_src_md, dnnl_query_weights_md, dnnl_query_dst_md}, {DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST}},
        {{dnnl_query_diff_src_md, dnnl_query_weights_md, dnnl_query_diff_dst_md},
         {DNNL_ARG_DIFF_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_DST}},
        {{dnnl_query_src_md, dnnl_query_diff_weights_md, dnnl_query_diff_dst_md},
         {DNNL_ARG_SRC, DNNL_ARG_DIFF_WEIGHTS, DNNL_ARG_DIFF_DST}},
    };
    static const char *pass_name[3] = {"fwd", "bwd_d", "bwd_w"};
    dnnl_primitive_desc_t pds[3] = {fpd, bpd, wpd};
    for (int p = 0; p < 3; p++) {
        dnnl_exec_arg_t args[3];
        dnnl_memory_t m[3];
        for (int a = 0; a < 3; a++) {
            m[a] = mem(dnnl_primitive_desc_query_md(pds[p], pass[p].q[a], 0));
            args[a] = (dnnl_exec_arg_t){pass[p].arg[a], m[a]};
        }
        const dnnl_memory_desc_t *act = dnnl_primitive_desc_query_md(pds[p], pass[p].q[p == 1 ? 2 : 0], 0);
        double ms = timed(pds[p], 3, args);
        printf("| %d@%dx%d | %s | %s | %s | %s | %.2f | %.0f |\n", C, H, H, tag_name, pass_name[p], impl(pds[p]),
               layout_of(act), ms, gflop / ms * 1e3);
        fflush(stdout);
        for (int a = 0; a < 3; a++) dnnl_memory_destroy(m[a]);
    }
    dnnl_primitive_desc_destroy(fpd);
    dnnl_primitive_desc_destroy(bpd);
    dnnl_primitive_desc_destroy(wpd);
}

int main(int argc, char **argv) {
    int threads = 2, batch = 64;
    dnnl_data_type_t dt = dnnl_bf16;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--precision") && v) {
            if (!strcmp(v, "bf16")) dt = dnnl_bf16;
            else if (!strcmp(v, "f32") || !strcmp(v, "fp32")) dt = dnnl_f32;
            else {
                fprintf(stderr, "bench_conv_layouts: --precision %s: expected bf16 or f32\n", v);
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--threads") && v) threads = atoi(v), i++;
        else if (!strcmp(a, "--repeats") && v) repeats = atoi(v), i++;
        else if (!strcmp(a, "--batch") && v) batch = atoi(v), i++;
        else {
            fprintf(stderr, "usage: bench_conv_layouts [--precision bf16|f32] [--threads N] [--repeats N] [--batch N]\n");
            return 2;
        }
    }
    if (threads < 1 || repeats < 1 || batch < 1) {
        fprintf(stderr, "bench_conv_layouts: --threads, --repeats and --batch must be positive\n");
        return 2;
    }
    omp_set_num_threads(threads);
    CK(dnnl_engine_create(&eng, dnnl_cpu, 0));
    CK(dnnl_stream_create(&strm, eng, dnnl_stream_default_flags));
    printf("precision %s, batch %d, %d threads, median of %d runs\n\n", dt == dnnl_bf16 ? "bf16" : "f32", batch,
           threads, repeats);
    printf("| conv | asked | pass | implementation | layout | ms | GFLOP/s |\n|---|---|---|---|---|---|---|\n");
    static const int shapes[][2] = {{32, 32}, {64, 32}, {64, 16}, {128, 16}, {128, 8}, {256, 8}};
    static const struct { dnnl_format_tag_t tag; const char *name; } lay[3] = {
        {dnnl_nChw16c, "nChw16c"}, {dnnl_nhwc, "nhwc"}, {dnnl_format_tag_any, "any"}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int l = 0; l < 3; l++) row(batch, shapes[s][0], shapes[s][1], dt, lay[l].tag, lay[l].name);
    dnnl_stream_destroy(strm);
    dnnl_engine_destroy(eng);
    return 0;
}
#else
int main(void) {
    fprintf(stderr, "bench_conv_layouts: built without oneDNN (KD_WITH_DNNL off)\n");
    return 77;
}
#endif
