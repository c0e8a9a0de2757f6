/*
 * test_memory.c: scopes and buffer recycling (src/autograd/graph.c) and their
 * use in the model zoo.
 *
 *   - Under AddressSanitizer a released buffer is poisoned: reading it is
 *     reported (a forked child that does so dies; one that reads a kept
 *     tensor exits normally).
 *   - Scope semantics on small graphs: released buffers are reused by the
 *     next output of their size; kept tensors and views of them survive;
 *     tensors from before the scope are untouched; a buffer a backward rule
 *     reads outlives its scope and is freed during kd_backward, after which
 *     a second walk of the tape is refused; kd_graph_set_mem_release(g, 0)
 *     turns releasing off.
 *   - A no-grad forward of resnet32x4 with the zoo's scopes peaks below a
 *     third of the arena of the same forward without releasing, with
 *     bit-identical logits.
 *   - Training steps (resnet8, mobile_half, ShuffleV2, wrn_16_1 with
 *     pre-activation features, and a distillation step with a no-grad
 *     resnet8x4 teacher) give bit-identical losses, parameters and running
 *     statistics with and without releasing, in a smaller arena, and
 *     allocate nothing on the heap once the arena is one block. The plain
 *     and distillation steps are kd_train_step itself (src/train/trainer.c).
 */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "autograd/autograd_impl.h"
#include "kd/autograd.h"
#include "kd/models.h"
#include "kd/optim.h"
#include "kd/train.h"

#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif
#ifdef TEST_ASAN
#include <sanitizer/asan_interface.h>
#endif

/* 64 KiB of floats: the smallest tracked tensor. */
#define BIG ((int64_t)16384)

static kd_backend *backend(const char *name) {
    kd_backend *be = NULL;
    if (kd_backend_get(name, &be) != KD_OK) fail_msg("backend %s: %s", name, kd_last_error());
    return be;
}

static kd_graph *graph_new(kd_backend *be) {
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, be));
    kd_graph_set_mem_release(g, 1); /* whatever KD_MEM_RELEASE says */
    return g;
}

static kd_tensor *big_input(kd_graph *g, float v) {
    int64_t n = BIG;
    kd_tensor *t = kd_graph_tensor(g, KD_F32, 1, &n);
    assert_non_null(t);
    for (int64_t i = 0; i < n; i++) kd_f32(t)[i] = v + (float)(i % 7);
    return t;
}

/* ----------------------------------------------------- use after release */

#ifdef TEST_ASAN
/* In a child: builds a released tensor (or a kept one) and reads it. */
static int child_read(int released) {
    kd_graph *g = NULL;
    if (kd_graph_init(&g, backend("ref")) != KD_OK) return 3;
    kd_graph_set_mem_release(g, 1);
    kd_tensor *x = big_input(g, 1.0f);
    size_t s = kd_graph_scope_begin(g);
    kd_tensor *a = kd_scale(g, x, 2.0f);
    kd_tensor *b = kd_scale(g, a, 3.0f);
    kd_graph_scope_end(g, s, 1, &b);
    volatile float v = kd_f32(released ? a : b)[5];
    (void)v;
    kd_graph_free(g);
    return 0;
}

static int run_child(int released) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) fail_msg("fork failed");
    if (pid == 0) {
        /* The report of the expected error would only clutter the log. */
        if (released && !freopen("/dev/null", "w", stderr)) _exit(4);
        _exit(child_read(released));
    }
    int st = 0;
    if (waitpid(pid, &st, 0) != pid) fail_msg("waitpid failed");
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
#endif

/* Registered only in AddressSanitizer builds (make asan, CI): elsewhere
 * there is nothing to check, and a case that always skips would mark the
 * whole program skipped. */
#ifdef TEST_ASAN
static void test_use_after_release_asan(void **state) {
    (void)state;
    /* Released data is poisoned, kept data and earlier tensors are not. */
    kd_graph *g = graph_new(backend("ref"));
    kd_tensor *x = big_input(g, 1.0f);
    size_t s = kd_graph_scope_begin(g);
    kd_tensor *a = kd_scale(g, x, 2.0f);
    kd_tensor *b = kd_scale(g, a, 3.0f);
    kd_graph_scope_end(g, s, 1, &b);
    assert_true(__asan_address_is_poisoned(kd_f32(a)));
    assert_true(__asan_address_is_poisoned(kd_f32(a) + BIG - 1));
    assert_false(__asan_address_is_poisoned(kd_f32(b)));
    assert_false(__asan_address_is_poisoned(kd_f32(x)));
    /* A new output of the same size takes the buffer and unpoisons it. */
    kd_tensor *c = kd_scale(g, b, 1.0f);
    assert_ptr_equal(c->data, a->data);
    assert_false(__asan_address_is_poisoned(kd_f32(c)));
    kd_graph_free(g);
    /* And reading a released tensor is reported: the child dies. */
    assert_int_equal(run_child(0), 0);
    int rc = run_child(1);
    if (rc == 0) fail_msg("reading a released tensor went unnoticed under AddressSanitizer");
}
#endif

/* ------------------------------------------------------- scope semantics */

static void test_scope_nograd(void **state) {
    (void)state;
    kd_graph *g = graph_new(backend("ref"));
    kd_graph_set_grad_enabled(g, 0);
    kd_tensor *x = big_input(g, 1.0f);

    /* Intermediates die at scope end; the next output of their size takes
     * the newest released buffer (LIFO). Small tensors are never tracked. */
    size_t s = kd_graph_scope_begin(g);
    kd_tensor *a = kd_scale(g, x, 2.0f);
    kd_tensor *b = kd_scale(g, a, 3.0f);
    kd_tensor *small = kd_sum(g, b);
    kd_graph_scope_end(g, s, 1, &b);
    assert_true(kd_f32(b)[1] == 12.0f);
    assert_true(kd_f32(small)[0] > 0.0f);
    kd_tensor *c = kd_scale(g, b, 1.0f);
    assert_ptr_equal(c->data, a->data);
    assert_ptr_not_equal(c->data, x->data);
    assert_ptr_not_equal(c->data, b->data);

    /* Keeping a view keeps its base; NULL keeps are skipped. */
    s = kd_graph_scope_begin(g);
    int64_t s2[2] = {128, 128};
    kd_tensor *v = kd_reshape(g, kd_scale(g, x, 1.0f), 2, s2);
    kd_tensor *keep[2] = {NULL, v};
    kd_graph_scope_end(g, s, 2, keep);
    kd_tensor *d = kd_scale(g, x, 1.0f);
    assert_ptr_not_equal(d->data, v->data);

    /* Ending one scope after each step of a chain h = f(h) holds only the
     * newest h: two buffers serve the whole chain. */
    s = kd_graph_scope_begin(g);
    kd_tensor *h = x;
    void *seen[2] = {NULL, NULL};
    for (int i = 0; i < 6; i++) {
        h = kd_graph_scope_return(g, s, kd_scale(g, h, 1.0f));
        if (i < 2) seen[i] = h->data;
        else assert_true(h->data == seen[i % 2]);
    }
    assert_true(kd_f32(h)[3] == kd_f32(x)[3]);

    /* Nested scopes: the inner keep belongs to the outer scope. */
    size_t so = kd_graph_scope_begin(g);
    size_t si = kd_graph_scope_begin(g);
    kd_tensor *p = kd_scale(g, x, 1.0f), *q = kd_scale(g, p, 1.0f);
    kd_graph_scope_end(g, si, 1, &q);
    kd_tensor *r = kd_scale(g, q, 1.0f); /* reuses p */
    assert_ptr_equal(r->data, p->data);
    kd_graph_scope_end(g, so, 0, NULL); /* q and r die */
    kd_tensor *t1 = kd_scale(g, x, 1.0f), *t2 = kd_scale(g, x, 1.0f);
    assert_true((t1->data == q->data && t2->data == r->data) ||
                (t1->data == r->data && t2->data == q->data));

    /* With releasing off nothing is reused. */
    kd_graph_set_mem_release(g, 0);
    s = kd_graph_scope_begin(g);
    a = kd_scale(g, x, 1.0f);
    kd_graph_scope_end(g, s, 0, NULL);
    b = kd_scale(g, x, 1.0f);
    assert_ptr_not_equal(a->data, b->data);
    KD_ASSERT_OK(kd_graph_status(g));
    kd_graph_free(g);
}

/* With gradients on, what a backward rule reads outlives its scope and is
 * freed during kd_backward; what no rule reads dies at scope end. */
static void test_scope_retention(void **state) {
    (void)state;
    kd_graph *g = graph_new(backend("ref"));
    int64_t n = BIG;
    kd_tensor *w = NULL;
    KD_ASSERT_OK(kd_tensor_new(KD_F32, 1, &n, &w));
    KD_ASSERT_OK(kd_tensor_require_grad(w));
    for (int64_t i = 0; i < n; i++) kd_f32(w)[i] = (float)(i % 5) - 2.0f;

    for (int release = 1; release >= 0; release--) {
        kd_graph_reset(g);
        kd_graph_set_mem_release(g, release);
        size_t s = kd_graph_scope_begin(g);
        kd_tensor *a = kd_scale(g, w, 1.5f); /* add reads nothing: dies */
        kd_tensor *b = kd_add(g, a, a);
        kd_tensor *y = kd_relu(g, b);        /* relu reads y, not b: b dies */
        kd_tensor *m = kd_mul(g, y, y);      /* mul reads y: y outlives the scope */
        kd_graph_scope_end(g, s, 1, &m);
        /* Three released buffers of this size (a, b, then the out-of-scope
         * ones) are available now only with releasing on. */
        kd_tensor *f1 = kd_graph_tensor(g, KD_F32, 1, &n);
        kd_tensor *f2 = kd_graph_tensor(g, KD_F32, 1, &n);
        assert_non_null(f1);
        assert_non_null(f2);
        int reused = (f1->data == a->data || f1->data == b->data) +
                     (f2->data == a->data || f2->data == b->data);
        assert_int_equal(reused, release ? 2 : 0);
        assert_true(f1->data != y->data && f2->data != y->data);
        size_t live_before = g->live_bytes;
        KD_ASSERT_OK(kd_backward(g, kd_sum(g, m)));
        /* dL/dw = 1.5 * 2 * 2y * [b > 0] */
        for (int64_t i = 0; i < n; i++) {
            float bv = 3.0f * ((float)(i % 5) - 2.0f), yv = bv > 0 ? bv : 0.0f;
            float want = bv > 0 ? 1.5f * 2.0f * 2.0f * yv : 0.0f;
            if (kd_f32(w->grad)[i] != want) fail_msg("grad[%lld] = %g, want %g", (long long)i,
                                                    kd_f32(w->grad)[i], want);
        }
        memset(w->grad->data, 0, (size_t)n * sizeof(float));
        if (release) {
            /* y went back to the free lists after mul's rule ran ... */
            assert_true(g->live_bytes < live_before);
            /* ... so this tape cannot be walked again. */
            assert_int_not_equal(kd_backward(g, kd_sum(g, m)), KD_OK);
        } else {
            assert_true(g->live_bytes == live_before);
            KD_ASSERT_OK(kd_backward(g, kd_sum(g, m)));
        }
    }
    kd_tensor_free(w);
    kd_graph_free(g);
}

/* ------------------------------------------------------------- models */

static kd_model *model_new(const char *arch, uint64_t seed) {
    kd_model *m = NULL;
    kd_model_cfg mc = {.in_channels = 3, .num_classes = 10, .seed = seed};
    KD_ASSERT_OK(kd_model_create(arch, &mc, &m));
    return m;
}

static float *batch_new(int64_t n, int64_t hw, int32_t *labels) {
    float *x = malloc(sizeof(float) * (size_t)(n * 3 * hw * hw));
    assert_non_null(x);
    kd_test_fill_uniform(x, n * 3 * hw * hw, -1.0f, 1.0f, 11);
    for (int64_t i = 0; i < n; i++) labels[i] = (int32_t)((i * 7 + 3) % 10);
    return x;
}

/* No-grad forward of resnet32x4 (batch 8): the zoo's scopes keep the arena
 * peak below a third of holding every activation, with identical logits. */
static void test_nograd_forward_peak(void **state) {
    (void)state;
    kd_model *m = model_new("resnet32x4", 1);
    kd_model_set_training(m, 0);
    int32_t y[8];
    float *xb = batch_new(8, 32, y);
    size_t peak[2];
    float logits[2][80];
    for (int release = 0; release < 2; release++) {
        kd_graph *g = graph_new(kd_backend_default());
        kd_graph_set_mem_release(g, release);
        kd_graph_set_grad_enabled(g, 0);
        int64_t xs[4] = {8, 3, 32, 32};
        kd_model_out o;
        KD_ASSERT_OK(kd_model_forward(m, g, kd_graph_wrap(g, KD_F32, 4, xs, xb), 0, &o));
        kd_tensor *l = kd_graph_to_strided(g, o.logits);
        assert_non_null(l);
        memcpy(logits[release], l->data, sizeof logits[0]);
        peak[release] = kd_graph_peak_bytes(g);
        kd_graph_free(g);
    }
    fprintf(stderr, "  resnet32x4 no-grad forward, batch 8: arena peak %.1f MiB, %.1f MiB "
                    "without releasing\n", peak[1] / 1048576.0, peak[0] / 1048576.0);
    if (memcmp(logits[0], logits[1], sizeof logits[0]))
        fail_msg("logits differ with and without releasing");
    if (peak[1] * 3 > peak[0])
        fail_msg("arena peak %zu bytes is not below a third of %zu", peak[1], peak[0]);
    free(xb);
    kd_model_free(m);
}

/* The precision of the trainer's graph in train_steps. */
static kd_dtype g_precision = KD_F32;

typedef struct {
    float loss[3];
    size_t peak, heap_after_second, heap_end;
    uint64_t hash;
} run_result;

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++) {
        h ^= c[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* Three SGD steps (lr 0.05, momentum 0.9, weight decay 5e-4) of `arch` from
 * fixed weights on a fixed batch of 8 images of hw x hw pixels; hash of every
 * state tensor. Plain steps go through kd_train_step, the one training step:
 * cross-entropy (method "none"), or with a no-grad `teacher` method "kd" at
 * gamma 1, alpha 1, T 4 (CE + KL). The pre-activation case adds a term no
 * method computes (0.01 * the mean of every pre-activation feature, so that
 * each takes part in the backward), so it builds its step by hand with the
 * same optimiser. */
static run_result train_steps(const char *arch, const char *teacher, int flags, int64_t hw,
                              int release) {
    kd_model *m = model_new(arch, 1), *t = teacher ? model_new(teacher, 2) : NULL;
    if (t) kd_model_set_training(t, 0);
    kd_optim_cfg oc = kd_optim_defaults(KD_OPTIM_SGD);
    oc.lr = 0.05f;
    oc.momentum = 0.9f;
    oc.weight_decay = 5e-4f;
    int64_t N = 8;
    int32_t y[8];
    float *xb = batch_new(N, hw, y);
    int64_t index[8];
    for (int64_t i = 0; i < N; i++) index[i] = i;
    run_result r = {{0}, 0, 0, 0, 0};
    kd_graph *g = NULL;
    kd_trainer *tr = NULL;
    kd_optim *opt = NULL;
    if (flags & KD_FWD_PREACT) {
        kd_param_group grp = {"", kd_model_params(m), 1.0f};
        KD_ASSERT_OK(kd_optim_init(&opt, &grp, 1, &oc));
        g = graph_new(kd_backend_default());
    } else {
        kd_distill_cfg dc = kd_distill_defaults(t ? "kd" : "none");
        dc.gamma = 1.0f;
        if (t) {
            dc.alpha = 1.0f;
            dc.T = 4.0f;
        }
        kd_sched sc = {.kind = KD_SCHED_CONSTANT, .base_lr = 0.05f, .epochs = 1};
        kd_trainer_cfg tc = {.student = m, .teacher = t, .method = dc, .optim = oc, .sched = sc,
                             .be = kd_backend_default(), .precision = g_precision, .in_channels = 3,
                             .height = (int)hw, .width = (int)hw, .num_classes = 10, .n_train = N, .seed = 5};
        KD_ASSERT_OK(kd_trainer_init(&tr, &tc));
        g = kd_trainer_graph(tr);
    }
    kd_graph_set_mem_release(g, release);
    for (int step = 0; step < 3; step++) {
        if (tr) {
            kd_batch b = {.n = N, .batch = step, .x = xb, .y = y, .index = index};
            kd_step_result sr;
            KD_ASSERT_OK(kd_train_step(tr, &b, 0, step, 3, &sr));
            assert_int_equal(sr.n_terms, t ? 2 : 1);
            r.loss[step] = (float)sr.loss;
        } else {
            kd_graph_reset(g);
            kd_graph_set_rng(g, 5, (uint64_t)step);
            int64_t xs[4] = {N, 3, hw, hw};
            kd_tensor *x = kd_graph_wrap(g, KD_F32, 4, xs, xb), *yt = kd_graph_wrap(g, KD_I32, 1, &N, y);
            kd_model_out o;
            KD_ASSERT_OK(kd_model_forward(m, g, x, flags, &o));
            kd_tensor *loss = kd_cross_entropy(g, o.logits, yt, 0.0f);
            for (int k = 0; k < o.n_feat; k++) /* every preact feature takes part in the loss */
                loss = kd_add(g, loss, kd_scale(g, kd_mean(g, o.preact[k]), 0.01f));
            kd_optim_zero_grad(opt);
            KD_ASSERT_OK(kd_backward(g, loss));
            KD_ASSERT_OK(kd_optim_step(opt));
            r.loss[step] = kd_f32(loss)[0];
        }
        if (step == 1) r.heap_after_second = kd_graph_heap_allocs(g);
    }
    r.heap_end = kd_graph_heap_allocs(g);
    r.peak = kd_graph_peak_bytes(g);
    r.hash = 1469598103934665603ull;
    kd_param_list *pl = kd_model_params(m);
    for (int i = 0; i < pl->n; i++) /* parameters and BN running statistics */
        r.hash = fnv(r.hash, pl->items[i].t->data, kd_tensor_nbytes(pl->items[i].t));
    free(xb);
    if (tr) kd_trainer_free(tr);
    else kd_graph_free(g);
    kd_optim_free(opt);
    kd_model_free(m);
    kd_model_free(t);
    return r;
}

static void check_training(const char *arch, const char *teacher, int flags, int64_t hw) {
    run_result off = train_steps(arch, teacher, flags, hw, 0);
    run_result on = train_steps(arch, teacher, flags, hw, 1);
    fprintf(stderr, "  %s%s%s%s: arena peak %.1f MiB, %.1f MiB without releasing\n", arch,
            teacher ? " <- " : "", teacher ? teacher : "",
            flags & KD_FWD_PREACT ? " (preact)" : "", on.peak / 1048576.0, off.peak / 1048576.0);
    for (int s = 0; s < 3; s++)
        if (memcmp(&on.loss[s], &off.loss[s], sizeof(float)))
            fail_msg("%s: loss of step %d is %.9g with releasing, %.9g without", arch, s,
                     on.loss[s], off.loss[s]);
    if (on.hash != off.hash)
        fail_msg("%s: parameters after 3 steps differ with and without releasing", arch);
    if (on.peak * 10 > off.peak * 8)
        fail_msg("%s: arena peak %zu bytes is not 20%% below %zu", arch, on.peak, off.peak);
    /* The first reset folds the arena's chunks into one block; after that a
     * step of the same shape allocates nothing. */
    if (on.heap_end != on.heap_after_second)
        fail_msg("%s: %zu heap allocations in the third step", arch,
                 on.heap_end - on.heap_after_second);
}

/* Precision bf16 keeps activations in bf16 (conv, BN, ReLU and residual
 * outputs): the arena peak of resnet8 training steps, and of a KD step with
 * a no-grad resnet8x4 teacher, must be at least 25% below float32's, with
 * losses within bf16 rounding of float32's and nothing allocated on the heap
 * once the arena is one block. */
static void test_train_bf16_peak(void **state) {
    (void)state;
    kd_backend *be = kd_backend_default();
    if (!be->bf16) {
        fprintf(stderr, "  backend %s has no native bf16 on this CPU: skipped\n", be->name);
        skip();
    }
    const char *teachers[2] = {NULL, "resnet8x4"};
    for (int k = 0; k < 2; k++) {
        run_result r[2];
        for (int bf = 0; bf < 2; bf++) {
            g_precision = bf ? KD_BF16 : KD_F32;
            r[bf] = train_steps("resnet8", teachers[k], 0, 32, 1);
        }
        g_precision = KD_F32;
        fprintf(stderr, "  resnet8%s%s: arena peak f32 %.2f MiB, bf16 %.2f MiB; losses %.5f %.5f / %.5f %.5f\n",
                teachers[k] ? " <- " : "", teachers[k] ? teachers[k] : "", r[0].peak / 1048576.0,
                r[1].peak / 1048576.0, r[0].loss[0], r[0].loss[2], r[1].loss[0], r[1].loss[2]);
        if (r[1].peak * 4 > r[0].peak * 3)
            fail_msg("bf16 arena peak %zu is not 25%% below float32's %zu", r[1].peak, r[0].peak);
        for (int s = 0; s < 3; s++)
            if (!(fabsf(r[1].loss[s] - r[0].loss[s]) <= 0.02f * fabsf(r[0].loss[s])))
                fail_msg("step %d: bf16 loss %.6g against float32 %.6g", s, r[1].loss[s], r[0].loss[s]);
        if (r[1].heap_end != r[1].heap_after_second)
            fail_msg("bf16: %zu heap allocations in the third step", r[1].heap_end - r[1].heap_after_second);
    }
}

static void test_train_resnet8(void **state) {
    (void)state;
    check_training("resnet8", NULL, 0, 32);
}

static void test_train_mobile_half(void **state) {
    (void)state;
    check_training("mobile_half", NULL, 0, 32);
}

static void test_train_shufflev2_wrn_preact(void **state) {
    (void)state;
    check_training("ShuffleV2", NULL, KD_FWD_PREACT, 16); /* 16 x 16: its convs run on ref */
    check_training("wrn_16_1", NULL, KD_FWD_PREACT, 32);
}

static void test_distill_step(void **state) {
    (void)state;
    check_training("resnet8", "resnet8x4", 0, 32);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        /* First, while the process has no OpenMP threads (it forks). */
#ifdef TEST_ASAN
        cmocka_unit_test(test_use_after_release_asan),
#endif
        cmocka_unit_test(test_scope_nograd),
        cmocka_unit_test(test_scope_retention),
        cmocka_unit_test(test_nograd_forward_peak),
        cmocka_unit_test(test_train_resnet8),
        cmocka_unit_test(test_train_bf16_peak),
        cmocka_unit_test(test_train_mobile_half),
        cmocka_unit_test(test_train_shufflev2_wrn_preact),
        cmocka_unit_test(test_distill_step),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
