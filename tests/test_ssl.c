/* The self-supervised methods inside a real training step (the losses
 * themselves are checked against PyTorch in test_distill):
 *   - MoCo: the key encoder (the trainer's EMA copy) and the key head move
 *     by ema * m + (1 - m) * query BEFORE the keys are computed, i.e. with
 *     the query weights from before this step's optimiser update
 *     (builder.py's order), exactly in float32; the queue's columns ptr ..
 *     ptr + B - 1 take the step's keys (unit vectors), the others stay, and
 *     the pointer advances (FIFO, wrapping);
 *   - SimCLR: one step lowers NT-Xent on a fixed batch from its value at
 *     initialisation, which is near log(2B - 1) * 2 for an untrained
 *     encoder; a batch with one view is refused. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd/train.h"
#include "testutil.h"

#define SIDE 12
#define B 8
#define CLASSES 4

static kd_model *make_student(void) {
    kd_model_cfg mc = {.in_channels = 1, .num_classes = CLASSES, .seed = 3};
    kd_model *m = NULL;
    KD_ASSERT_OK(kd_model_create("resnet8", &mc, &m));
    kd_model_set_training(m, 1);
    return m;
}

static kd_trainer *make_trainer(kd_model *student, const char *method, const char *k1, const char *v1,
                                const char *k2, const char *v2) {
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get("ref", &be));
    kd_distill_cfg dc = kd_distill_defaults(method);
    dc.seed = 5;
    if (k1) KD_ASSERT_OK(kd_distill_cfg_set_arg(&dc, k1, v1));
    if (k2) KD_ASSERT_OK(kd_distill_cfg_set_arg(&dc, k2, v2));
    kd_optim_cfg oc = kd_optim_defaults(KD_OPTIM_SGD);
    oc.lr = 0.1;
    oc.momentum = 0.9;
    kd_trainer_cfg tc = {.student = student,
                         .method = dc,
                         .optim = oc,
                         .sched = {.kind = KD_SCHED_CONSTANT, .base_lr = 0.1f, .epochs = 1},
                         .be = be,
                         .precision = KD_F32,
                         .in_channels = 1,
                         .height = SIDE,
                         .width = SIDE,
                         .num_classes = CLASSES,
                         .n_train = 100,
                         .seed = 5};
    kd_trainer *tr = NULL;
    KD_ASSERT_OK(kd_trainer_init(&tr, &tc));
    return tr;
}

/* Two random views of B images. */
typedef struct {
    float *v[2];
    int32_t y[B];
    int64_t index[B];
    kd_view_shape shp[2];
    kd_batch b;
} views2;

static void views_init(views2 *w, uint64_t seed) {
    kd_rng r;
    kd_rng_init(&r, seed, 1);
    for (int v = 0; v < 2; v++) {
        w->v[v] = malloc(sizeof(float) * B * SIDE * SIDE);
        for (int i = 0; i < B * SIDE * SIDE; i++) w->v[v][i] = kd_rng_normal(&r);
        w->shp[v] = (kd_view_shape){1, SIDE, SIDE};
    }
    for (int i = 0; i < B; i++) {
        w->y[i] = -1;
        w->index[i] = i;
    }
    w->b = (kd_batch){.n = B, .x = w->v[0], .y = w->y, .index = w->index, .n_views = 2, .views = w->v,
                      .view_shape = w->shp};
}

static void views_free(views2 *w) {
    free(w->v[0]);
    free(w->v[1]);
}

/* Copies of the float tensors of pl. */
static float **snap(const kd_param_list *pl) {
    float **s = calloc((size_t)pl->n, sizeof *s);
    for (int i = 0; i < pl->n; i++) {
        if (pl->items[i].t->dtype != KD_F32) continue;
        size_t n = (size_t)kd_tensor_numel(pl->items[i].t);
        s[i] = malloc(n * sizeof(float));
        memcpy(s[i], pl->items[i].t->data, n * sizeof(float));
    }
    return s;
}

static void snap_free(float **s, int n) {
    for (int i = 0; i < n; i++) free(s[i]);
    free(s);
}

static int find(const kd_param_list *pl, const char *name) {
    for (int i = 0; i < pl->n; i++)
        if (!strcmp(pl->items[i].name, name)) return i;
    fail_msg("no tensor %s", name);
    return -1;
}

static void test_moco_step(void **state) {
    (void)state;
    kd_model *student = make_student();
    kd_trainer *tr = make_trainer(student, "moco", "moco.K", "20", "moco.bn_splits", "2");
    kd_param_list *sp = kd_model_params(student), *ep = kd_model_params(kd_trainer_ema(tr));
    kd_param_list *mp = kd_method_params(kd_trainer_method(tr));
    /* Move the query away from the key first, so the update is visible. */
    views2 w;
    views_init(&w, 11);
    kd_step_result res;
    KD_ASSERT_OK(kd_train_step(tr, &w.b, 0, 0, 10, &res));
    float **s0 = snap(sp), **e0 = snap(ep), **m0 = snap(mp);
    int iq = find(mp, "queue"), ip = find(mp, "queue_ptr");
    const int64_t K = 20, D = mp->items[iq].t->shape[0];
    int64_t ptr0 = ((int64_t *)mp->items[ip].t->data)[0];
    assert_int_equal(ptr0, B % K);
    views2 w2;
    views_init(&w2, 12);
    KD_ASSERT_OK(kd_train_step(tr, &w2.b, 0, 1, 10, &res));
    assert_true(isfinite(res.loss));
    const float m = 0.999f, a = (float)(1.0 - 0.999);
    int moved = 0;
    for (int i = 0; i < ep->n; i++) {
        if (ep->items[i].kind == KD_PARAM_BUFFER) continue;
        int j = find(sp, ep->items[i].name);
        const float *e = kd_f32(ep->items[i].t);
        for (int64_t k = 0; k < kd_tensor_numel(ep->items[i].t); k++) {
            float want = e0[i][k] * m + a * s0[j][k];
            if (e[k] != want)
                fail_msg("ema %s[%lld] = %.9g, want %.9g (m * ema + (1 - m) * the query before the step)",
                         ep->items[i].name, (long long)k, e[k], want);
        }
        moved += memcmp(kd_f32(sp->items[j].t), s0[j], sizeof(float) * (size_t)kd_tensor_numel(sp->items[j].t)) != 0;
    }
    assert_true(moved > 0); /* the optimiser moved the query after the EMA read it */
    for (int i = 0; i < mp->n; i++) {
        const char *n = mp->items[i].name;
        if (strncmp(n, "head_k.", 7) != 0) continue;
        char qn[160];
        snprintf(qn, sizeof qn, "head.%s", n + 7);
        int j = find(mp, qn);
        for (int64_t k = 0; k < kd_tensor_numel(mp->items[i].t); k++) {
            float want = m0[i][k] * m + a * m0[j][k];
            if (kd_f32(mp->items[i].t)[k] != want) fail_msg("%s[%lld] is not the EMA of %s", n, (long long)k, qn);
        }
    }
    /* The queue: B new unit columns from ptr0 (wrapping), the rest as before. */
    const float *q = kd_f32(mp->items[iq].t);
    for (int64_t c = 0; c < K; c++) {
        int fresh = (c - ptr0 + K) % K < B;
        double nrm = 0;
        int same = 1;
        for (int64_t d = 0; d < D; d++) {
            nrm += (double)q[d * K + c] * q[d * K + c];
            same &= q[d * K + c] == m0[iq][d * K + c];
        }
        if (fresh && same) fail_msg("queue column %lld should hold a new key", (long long)c);
        if (!fresh && !same) fail_msg("queue column %lld changed", (long long)c);
        if (fabs(nrm - 1.0) > 1e-5) fail_msg("queue column %lld has norm^2 %g", (long long)c, nrm);
    }
    assert_int_equal(((int64_t *)mp->items[ip].t->data)[0], (ptr0 + B) % K);
    snap_free(s0, sp->n);
    snap_free(e0, ep->n);
    snap_free(m0, mp->n);
    views_free(&w);
    views_free(&w2);
    kd_trainer_free(tr);
    kd_model_free(student);
}

static void test_simclr_step(void **state) {
    (void)state;
    kd_model *student = make_student();
    kd_trainer *tr = make_trainer(student, "simclr", NULL, NULL, NULL, NULL);
    assert_int_equal(kd_trainer_num_views(tr), 2);
    views2 w;
    views_init(&w, 21);
    kd_step_result r0, r1;
    KD_ASSERT_OK(kd_train_step(tr, &w.b, 0, 0, 10, &r0));
    assert_null(r0.logits); /* the classifier is not trained */
    double chance = 2.0 * log(2.0 * B - 1.0);
    if (fabs(r0.loss - chance) > 0.5) fail_msg("initial NT-Xent %g, expected near 2 log(2B - 1) = %g", r0.loss, chance);
    for (int k = 1; k < 6; k++) KD_ASSERT_OK(kd_train_step(tr, &w.b, 0, k, 10, &r1));
    if (!(r1.loss < r0.loss - 0.1)) fail_msg("NT-Xent did not fall on a fixed batch: %g -> %g", r0.loss, r1.loss);
    kd_batch one = w.b;
    one.n_views = 1;
    ASSERT_ERR(kd_train_step(tr, &one, 0, 7, 10, &r1), KD_ERR_INVALID, "method 'simclr' takes 2 views of each image");
    views_free(&w);
    kd_trainer_free(tr);
    kd_model_free(student);
}

/* SSLD's per-class top-k against a sort of each class's column (an
 * independent reference), with ties broken by the smaller index. */
static int cmp_cand(const void *a, const void *b) {
    const double *x = a, *y = b; /* {p, index} */
    if (x[0] != y[0]) return x[0] > y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : 1;
}

static void test_select_topk(void **state) {
    (void)state;
    const int64_t n = 300, k = 7;
    const int C = 5;
    float *p = malloc(sizeof(float) * n * C);
    int64_t *index = malloc(sizeof(int64_t) * n);
    kd_rng r;
    kd_rng_init(&r, 3, 4);
    for (int64_t i = 0; i < n; i++) {
        index[i] = 1000 + 3 * i;
        for (int c = 0; c < C; c++) p[i * C + c] = (float)(kd_rng_below(&r, 20)) / 20.0f; /* many ties */
    }
    int64_t *sel = NULL, m = 0;
    KD_ASSERT_OK(kd_select_topk(p, index, n, C, k, &sel, &m));
    assert_int_equal(m, C * k);
    double (*col)[2] = malloc(sizeof *col * n);
    for (int c = 0; c < C; c++) {
        for (int64_t i = 0; i < n; i++) {
            col[i][0] = p[i * C + c];
            col[i][1] = (double)index[i];
        }
        qsort(col, (size_t)n, sizeof *col, cmp_cand);
        for (int64_t j = 0; j < k; j++) {
            int found = 0;
            for (int64_t q = 0; q < k; q++) found |= sel[c * k + q] == (int64_t)col[j][1];
            if (!found) fail_msg("class %d: index %lld (rank %lld) not selected", c, (long long)col[j][1], (long long)j);
        }
    }
    free(sel);
    ASSERT_ERR(kd_select_topk(p, index, n, C, 0, &sel, &m), KD_ERR_INVALID, "per_class 0");
    /* Fewer candidates than k: every candidate, under every class. */
    KD_ASSERT_OK(kd_select_topk(p, index, 3, C, k, &sel, &m));
    assert_int_equal(m, 3 * C);
    free(sel);
    free(col);
    free(p);
    free(index);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_select_topk),
        cmocka_unit_test(test_moco_step),
        cmocka_unit_test(test_simclr_step),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
