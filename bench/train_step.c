/* Training-step benchmark: times kd's real training step, inference and the
 * distillation step on one fixed random batch, and prints one JSON line.
 *
 *   build/bench/bench_train_step --model resnet8x4 --mode train|infer
 *   build/bench/bench_train_step --model resnet8x4 --teacher resnet32x4 --mode kd
 *       [--batch 64] [--threads 2] [--classes 100] [--warmup 5] [--repeats 5]
 *       [--steps 10] [--backend cpu] [--lr 0.01] [--precision f32|bf16] [--method NAME]
 *       [--n-train N] [--size 32]
 *
 * What one step is: kd_train_step (include/kd/train.h), the step `kd train`
 * and `kd distill` run, minus data loading:
 *   train  method "none": student forward (train mode), cross-entropy, zero
 *          grads, backward, SGD (momentum 0.9, weight decay 5e-4);
 *   infer  graph reset, forward in eval mode with gradients disabled;
 *   kd     method "kd" (or --method NAME): teacher forward in eval mode
 *          without gradients, then the student's step with the method's loss
 *          (kd: 0.1 CE + 0.9 KL, T 4). --n-train sets the training-set size
 *          the method sees (CRD: its two N x 128 memory banks; default the
 *          batch); image i < N of the batch is training image i, and image
 *          j has label j mod classes beyond the batch. CRD's sampler draws
 *          its 16384 negatives per sample inside the timed step.
 * The input is one batch of (N, 3, S, S) uniform noise (S = --size, 32 by
 * default; 224 for the ImageNet-size rows such as swin_t) with random labels in
 * [0, classes), made once: the benchmark measures compute, not the loader.
 * After `warmup` steps it times `repeats` runs of `steps` steps each; each run
 * gives images/s = steps * N / seconds, and the line reports their median, min
 * and max.
 *
 * FLOP convention (also used by bench/torch_step.py): a forward pass costs
 * 2 * MACs of every convolution and linear layer (MACs = output elements *
 * input channels per group * KH * KW for a convolution, N * in * out for a
 * linear layer); batch norm, ReLU, pooling, additions, the loss and SGD count
 * nothing. A training step counts 3x the forward (forward, backward to the
 * data, backward to the weights); the kd step counts the teacher's forward
 * (1x) plus the student's training step (3x). The forward count is measured,
 * not assumed: one eval-mode forward of a single image runs on a copy of the
 * backend whose conv2d_forward and gemm entries add up those figures.
 *
 * Peak memory is getrusage's ru_maxrss of this process (MiB), so run each
 * measurement in its own process (bench/run.sh does). rss_start_mib is the
 * resident size before any model exists.
 *
 * OpenMP: like the kd program (src/cli/main.c), the binary re-executes itself
 * once with GOMP_SPINCOUNT=10000 unless OMP_WAIT_POLICY, GOMP_SPINCOUNT or
 * KD_OMP_TUNED is already set, so it measures what `kd train` runs.
 *
 * Kernels: with the cpu backend the line ends with "impls", the distinct
 * oneDNN implementations of the row's convolutions ({"fwd", "bwd_data",
 * "bwd_weights"}: names such as "jit:avx512_core" joined by '+', "" where the
 * row has none; kd__cpu_conv_impls). The FLOP-counting forward's batch-1
 * primitives are trimmed from the cache first, so only the timed step's count. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "kd/distill.h"
#include "kd/models.h"
#include "kd/optim.h"
#include "kd/train.h"
#ifdef KD_WITH_DNNL
#include "backend/cpu/dnnl_backend.h"
#endif

typedef struct {
    const char *model, *teacher, *mode, *backend, *precision, *method;
    int batch, threads, classes, warmup, repeats, steps, size;
    int64_t n_train;
    float lr;
} bench_cfg;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double peak_rss_mib(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss / 1024.0; /* Linux reports KiB */
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void die(const char *what) {
    fprintf(stderr, "bench_train_step: %s: %s\n", what, kd_last_error());
    exit(1);
}

#define CHECK(expr, what)                  \
    do {                                   \
        if ((expr) != KD_OK) die(what);    \
    } while (0)

/* ------------------------------------------------------------ FLOP counter */

/* The counting backend: a copy of the real one whose conv2d_forward and gemm
 * add 2 * MACs to g_flops before calling the original. */
static kd_backend g_count_be;
static kd_backend *g_real_be;
static double g_flops;

static kd_status count_conv2d_forward(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *x,
                                      const kd_tensor *w, const kd_tensor *b, kd_tensor *y) {
    /* y (N, O, OH, OW); w (O, C/groups, KH, KW). */
    g_flops += 2.0 * (double)kd_tensor_numel(y) * (double)(w->shape[1] * w->shape[2] * w->shape[3]);
    return g_real_be->conv2d_forward(be, p, x, w, b, y);
}

static kd_status count_gemm(kd_backend *be, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                            float alpha, const float *A, int64_t lda, const float *B, int64_t ldb,
                            float beta, float *C, int64_t ldc) {
    g_flops += 2.0 * (double)M * (double)N * (double)K;
    return g_real_be->gemm(be, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* Forward FLOPs per image of m (eval mode, one 3 x size x size image). kd_bmm
 * (the attention products of transformers) goes through gemm_batch and is not
 * counted, as PyTorch's hooks on Conv2d and Linear do not count it. */
static double forward_flops_per_image(kd_model *m, int size) {
    g_count_be = *g_real_be;
    g_count_be.conv2d_forward = count_conv2d_forward;
    g_count_be.gemm = count_gemm;
    kd_graph *g;
    CHECK(kd_graph_init(&g, &g_count_be), "graph");
    kd_graph_set_grad_enabled(g, 0);
    int was = kd_model_training(m);
    kd_model_set_training(m, 0);
    float *img = calloc((size_t)(3 * size * size), sizeof(float));
    if (!img) die("out of memory");
    int64_t xs[4] = {1, 3, size, size};
    kd_tensor *x = kd_graph_wrap(g, KD_F32, 4, xs, img);
    kd_model_out o;
    g_flops = 0;
    CHECK(kd_model_forward(m, g, x, 0, &o), "counting forward");
    CHECK(kd_graph_status(g), "counting forward");
    kd_model_set_training(m, was);
    kd_graph_free(g);
    free(img);
    return g_flops;
}

/* ------------------------------------------------------------------- main */

static void usage(void) {
    fprintf(stderr,
            "usage: bench_train_step --model NAME [--mode train|infer|kd] [--teacher NAME]\n"
            "       [--batch 64] [--threads 2] [--classes 100] [--warmup 5] [--repeats 5]\n"
            "       [--steps 10] [--backend cpu] [--lr 0.01] [--precision f32|bf16] [--method NAME]\n"
            "       [--n-train N] [--size 32]\n");
    exit(2);
}

static void parse(int argc, char **argv, bench_cfg *c) {
    *c = (bench_cfg){.model = NULL, .teacher = "resnet32x4", .mode = "train", .backend = "cpu", .precision = "f32", .method = NULL,
                     .batch = 64, .threads = 2, .classes = 100, .warmup = 5, .repeats = 5, .steps = 10,
                     .size = 32, .lr = 0.01f};
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(k, "--model")) c->model = v;
        else if (!strcmp(k, "--teacher")) c->teacher = v;
        else if (!strcmp(k, "--mode")) c->mode = v;
        else if (!strcmp(k, "--backend")) c->backend = v;
        else if (!strcmp(k, "--precision")) c->precision = v;
        else if (!strcmp(k, "--method")) c->method = v;
        else if (!strcmp(k, "--batch")) c->batch = atoi(v);
        else if (!strcmp(k, "--threads")) c->threads = atoi(v);
        else if (!strcmp(k, "--classes")) c->classes = atoi(v);
        else if (!strcmp(k, "--warmup")) c->warmup = atoi(v);
        else if (!strcmp(k, "--repeats")) c->repeats = atoi(v);
        else if (!strcmp(k, "--steps")) c->steps = atoi(v);
        else if (!strcmp(k, "--lr")) c->lr = (float)atof(v);
        else if (!strcmp(k, "--n-train")) c->n_train = atoll(v);
        else if (!strcmp(k, "--size")) c->size = atoi(v);
        else usage();
    }
    if (!c->model || c->batch < 1 || c->classes < 2 || c->warmup < 0 || c->repeats < 1 || c->steps < 1 || c->size < 1 ||
        (strcmp(c->mode, "train") && strcmp(c->mode, "infer") && strcmp(c->mode, "kd")) ||
        (strcmp(c->precision, "f32") && strcmp(c->precision, "bf16")))
        usage();
    if (c->n_train < c->batch) c->n_train = c->batch;
    /* --mode kd runs Hinton KD unless --method names another method. */
    if (!c->method) c->method = strcmp(c->mode, "kd") ? "none" : "kd";
}

/* Same policy as the kd program: a short OpenMP spin unless the user chose one. */
static void tune_openmp(char **argv) {
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || getenv("KD_OMP_TUNED")) return;
    setenv("GOMP_SPINCOUNT", "10000", 1);
    setenv("KD_OMP_TUNED", "1", 1);
    execv("/proc/self/exe", argv);
}

int main(int argc, char **argv) {
    tune_openmp(argv);
    bench_cfg c;
    parse(argc, argv, &c);
    const double rss_start = peak_rss_mib();
    kd_set_num_threads(c.threads);
    CHECK(kd_backend_get(c.backend, &g_real_be), "backend");
    const int kd_mode = !strcmp(c.mode, "kd"), infer = !strcmp(c.mode, "infer");

    kd_model_cfg mc = {.in_channels = 3, .num_classes = c.classes, .seed = 1};
    kd_model *student = NULL, *teacher = NULL;
    CHECK(kd_model_create(c.model, &mc, &student), "student");
    if (kd_mode) {
        mc.seed = 2;
        CHECK(kd_model_create(c.teacher, &mc, &teacher), "teacher");
        kd_model_set_training(teacher, 0);
    }
    double fwd = forward_flops_per_image(student, c.size);
    double t_fwd = teacher ? forward_flops_per_image(teacher, c.size) : 0.0;
    double flops_img = infer ? fwd : 3.0 * fwd + t_fwd;
    /* Drop the counting pass's (batch 1, float32) primitives: "impls" below
     * names those of the timed step only. Untimed; warmup recreates them. */
    if (g_real_be->trim) g_real_be->trim(g_real_be);

    /* One fixed batch: x (N, 3, S, S) in [-1, 1), labels (N) in [0, classes);
     * the training set's labels: the batch's, then j mod classes. */
    const int64_t N = c.batch, S = c.size;
    float *xb = malloc(sizeof(float) * (size_t)(N * 3 * S * S));
    int32_t *yb = malloc(sizeof(int32_t) * (size_t)N);
    int64_t *idx = malloc(sizeof(int64_t) * (size_t)N);
    int32_t *train_labels = malloc(sizeof(int32_t) * (size_t)c.n_train);
    if (!xb || !yb || !idx || !train_labels) {
        fprintf(stderr, "bench_train_step: out of memory\n");
        return 1;
    }
    kd_rng rng;
    kd_rng_init(&rng, 7, 1);
    for (int64_t i = 0; i < N * 3 * S * S; i++) xb[i] = 2.0f * kd_rng_uniform(&rng) - 1.0f;
    for (int64_t i = 0; i < N; i++) {
        yb[i] = (int32_t)(kd_rng_uniform(&rng) * (float)c.classes) % c.classes;
        idx[i] = i;
    }
    for (int64_t j = 0; j < c.n_train; j++) train_labels[j] = j < N ? yb[j] : (int32_t)(j % c.classes);

    kd_trainer *tr = NULL;
    kd_graph *g = NULL;
    if (!infer) {
        kd_trainer_cfg tc = {.student = student,
                             .teacher = teacher,
                             .method = kd_distill_defaults(c.method),
                             .optim = kd_optim_defaults(KD_OPTIM_SGD),
                             .sched = {.kind = KD_SCHED_CONSTANT, .base_lr = c.lr, .epochs = 1},
                             .be = g_real_be,
                             .precision = strcmp(c.precision, "bf16") ? KD_F32 : KD_BF16,
                             .in_channels = 3,
                             .height = c.size,
                             .width = c.size,
                             .num_classes = c.classes,
                             .n_train = c.n_train,
                             .train_labels = train_labels,
                             .seed = 1};
        tc.optim.lr = c.lr;
        tc.optim.momentum = 0.9f;
        tc.optim.weight_decay = 5e-4f;
        CHECK(kd_trainer_init(&tr, &tc), "trainer");
        g = kd_trainer_graph(tr);
    } else {
        CHECK(kd_graph_init(&g, g_real_be), "graph");
        CHECK(kd_graph_set_precision(g, strcmp(c.precision, "bf16") ? KD_F32 : KD_BF16), "precision");
    }

    kd_model_set_training(student, !infer);
    if (tr) kd_trainer_set_training(tr, 1);
    if (infer) kd_graph_set_grad_enabled(g, 0);
    int64_t step = 0;
    double *ips = malloc(sizeof(double) * (size_t)c.repeats);
    if (!ips) return 1;
    for (int r = -1; r < c.repeats; r++) {
        int n = r < 0 ? c.warmup : c.steps;
        double t0 = now_s();
        for (int k = 0; k < n; k++, step++) {
            if (!infer) {
                kd_batch b = {.n = N, .batch = step, .x = xb, .y = yb, .index = idx};
                kd_step_result sr;
                CHECK(kd_train_step(tr, &b, 0, step, 1 << 30, &sr), "train step");
                continue;
            }
            kd_graph_reset(g);
            kd_graph_set_rng(g, 1, (uint64_t)step);
            int64_t xs[4] = {N, 3, S, S};
            kd_tensor *x = kd_graph_wrap(g, KD_F32, 4, xs, xb);
            kd_model_out so;
            CHECK(kd_model_forward(student, g, x, 0, &so), "forward");
            CHECK(kd_graph_status(g), "forward");
        }
        double dt = now_s() - t0;
        if (r >= 0) ips[r] = (double)n * (double)N / dt;
    }
    qsort(ips, (size_t)c.repeats, sizeof ips[0], cmp_d);
    double med = c.repeats % 2 ? ips[c.repeats / 2] : 0.5 * (ips[c.repeats / 2 - 1] + ips[c.repeats / 2]);
    /* The layout of the bf16 activations (kd_graph_bf16_layout: NHWC on AMX
     * CPUs, or as KD_BF16_LAYOUT says). */
    const char *bf16_layout = "none";
    if (!strcmp(c.precision, "bf16")) {
        kd_graph *tg = NULL;
        if (kd_graph_init(&tg, g_real_be) == KD_OK)
            bf16_layout = kd_graph_bf16_layout(tg) == KD_LAYOUT_NHWC ? "nhwc" : "nchw16c";
        kd_graph_free(tg);
    }
    printf("{\"framework\": \"kd\", \"method\": \"%s\", \"n_train\": %lld, \"model\": \"%s\", \"teacher\": %s%s%s, \"mode\": \"%s\", \"layout\": \"nchw\", "
           "\"backend\": \"%s\", \"precision\": \"%s\", \"batch\": %d, \"threads\": %d, \"classes\": %d, \"size\": %d, \"warmup\": %d, \"repeats\": %d, "
           "\"steps\": %d, \"img_s_median\": %.2f, \"img_s_min\": %.2f, \"img_s_max\": %.2f, "
           "\"flops_per_image\": %.0f, \"fwd_flops_per_image\": %.0f, \"gflops_median\": %.3f, "
           "\"gflops_max\": %.3f, \"peak_rss_mib\": %.1f, \"rss_start_mib\": %.1f, \"gomp_spincount\": \"%s\", "
           "\"bf16_layout\": \"%s\"",
           c.method, (long long)c.n_train, c.model, kd_mode ? "\"" : "", kd_mode ? c.teacher : "null", kd_mode ? "\"" : "", c.mode, c.backend, c.precision,
           c.batch, kd_get_num_threads(), c.classes, c.size, c.warmup, c.repeats, c.steps, med, ips[0],
           ips[c.repeats - 1], flops_img, fwd, med * flops_img * 1e-9, ips[c.repeats - 1] * flops_img * 1e-9,
           peak_rss_mib(), rss_start, getenv("GOMP_SPINCOUNT") ? getenv("GOMP_SPINCOUNT") : "default", bf16_layout);
#ifdef KD_WITH_DNNL
    if (!strcmp(c.backend, "cpu")) {
        static const char *keys[3] = {"fwd", "bwd_data", "bwd_weights"};
        char names[512];
        printf(", \"impls\": {");
        for (int i = 0; i < 3; i++) {
            kd__cpu_conv_impls(i, names, sizeof names);
            printf("%s\"%s\": \"%s\"", i ? ", " : "", keys[i], names);
        }
        printf("}");
    }
#endif
    printf("}\n");
    free(ips);
    free(xb);
    free(yb);
    free(idx);
    free(train_labels);
    if (tr) kd_trainer_free(tr);
    else kd_graph_free(g);
    kd_model_free(student);
    kd_model_free(teacher);
    return 0;
}
