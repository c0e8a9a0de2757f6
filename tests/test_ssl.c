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
#include "train/train_impl.h"

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

/* SimCLRv2's fine-tuning from the projection head (ft_proj_selector, the
 * model's head_layers): a resnet8 with head_layers 1 loads an encoder of
 * `kd pretrain --method simclr` (its head.0 / head.1 become the layer before
 * the classifier), computes fc(relu(bn(W emb))) (checked against a double
 * reference built from the model's own embedding), keeps the layers in its
 * checkpoints (metadata head_layers, read back by kd_model_load_new), and
 * refuses the files it cannot start from. */
static kd_model *make_ft(int head_layers, uint64_t seed) {
    kd_model_cfg mc = {.in_channels = 1, .num_classes = CLASSES, .seed = seed, .head_layers = head_layers};
    kd_model *m = NULL;
    KD_ASSERT_OK(kd_model_create("resnet8", &mc, &m));
    return m;
}

static kd_tensor *eval_logits(kd_model *m, kd_graph *g, const float *x, kd_tensor **emb) {
    kd_model_set_training(m, 0);
    kd_graph_reset(g);
    int64_t xs[4] = {B, 1, SIDE, SIDE};
    kd_tensor *xt = kd_graph_wrap(g, KD_F32, 4, xs, (void *)x);
    kd_model_out o;
    KD_ASSERT_OK(kd_model_forward(m, g, xt, 0, &o));
    if (emb) *emb = kd_graph_to_strided(g, o.feat[o.n_feat - 1]);
    return kd_graph_to_strided(g, o.logits);
}

static const float *param(kd_model *m, const char *name) {
    kd_param *p = kd_params_find(kd_model_params(m), name);
    if (!p) fail_msg("model has no tensor %s", name);
    return kd_f32(p->t);
}

static void test_ft_proj_selector(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("ft_proj");
    char enc[600], ft_path[600], plain_path[600], mlp[600];
    snprintf(enc, sizeof enc, "%s/encoder.safetensors", dir);
    snprintf(ft_path, sizeof ft_path, "%s/ft.safetensors", dir);
    snprintf(plain_path, sizeof plain_path, "%s/plain.safetensors", dir);
    snprintf(mlp, sizeof mlp, "%s/moco.safetensors", dir);
    /* The encoders: SimCLR's (SimCLRv2 head) and MoCo's (MLP head). */
    kd_model *pre = make_student();
    kd_trainer *tr = make_trainer(pre, "simclr", NULL, NULL, NULL, NULL);
    KD_ASSERT_OK(kd_encoder_save(pre, kd_trainer_method(tr), enc));
    const kd_param_list *hp = kd_method_params(kd_trainer_method(tr));
    const kd_param *h0 = kd_params_find(hp, "head.0.weight");
    assert_non_null(h0);
    kd_model *pre2 = make_student();
    kd_trainer *tr2 = make_trainer(pre2, "moco", NULL, NULL, NULL, NULL);
    KD_ASSERT_OK(kd_encoder_save(pre2, kd_trainer_method(tr2), mlp));

    kd_model *ft = make_ft(1, 9);
    const int64_t d = kd_model_feat_dim(ft);
    assert_non_null(kd_params_find(kd_model_params(ft), "head.1.running_var"));
    assert_null(kd_params_find(kd_model_params(ft), "head.3.weight"));
    KD_ASSERT_OK(kd_model_load(ft, enc));
    assert_memory_equal(param(ft, "head.0.weight"), kd_f32(h0->t), (size_t)(d * d) * sizeof(float));
    /* Non-trivial running statistics and affine parameters of head.1. */
    float *bn[4] = {(float *)param(ft, "head.1.weight"), (float *)param(ft, "head.1.bias"),
                    (float *)param(ft, "head.1.running_mean"), (float *)param(ft, "head.1.running_var")};
    kd_test_fill_uniform(bn[0], d, 0.5f, 1.5f, 31);
    kd_test_fill_uniform(bn[1], d, -0.2f, 0.2f, 32);
    kd_test_fill_uniform(bn[2], d, -0.05f, 0.05f, 33);
    kd_test_fill_uniform(bn[3], d, 0.001f, 0.01f, 34);

    float x[B * SIDE * SIDE];
    kd_test_fill_uniform(x, B * SIDE * SIDE, -1.0f, 1.0f, 35);
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get("ref", &be));
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, be));
    kd_tensor *emb = NULL, *lg = eval_logits(ft, g, x, &emb);
    assert_non_null(lg);
    assert_int_equal(emb->shape[1], d);
    /* Reference: logits = fc.W relu(gamma (W0 e - mu) / sqrt(var + 1e-5) + beta) + fc.b, in double. */
    const float *w0 = param(ft, "head.0.weight"), *fw = param(ft, "fc.weight"), *fb = param(ft, "fc.bias");
    float want[B * CLASSES];
    double *h = malloc((size_t)d * sizeof *h);
    for (int i = 0; i < B; i++) {
        const float *e = kd_f32(emb) + i * d;
        for (int64_t j = 0; j < d; j++) {
            double z = 0;
            for (int64_t k = 0; k < d; k++) z += (double)w0[j * d + k] * e[k];
            z = bn[0][j] * (z - bn[2][j]) / sqrt((double)bn[3][j] + 1e-5) + bn[1][j];
            h[j] = z > 0 ? z : 0;
        }
        for (int c = 0; c < CLASSES; c++) {
            double z = fb[c];
            for (int64_t j = 0; j < d; j++) z += (double)fw[c * d + j] * h[j];
            want[i * CLASSES + c] = (float)z;
        }
    }
    free(h);
    KD_ASSERT_CLOSE(kd_f32(lg), want, B * CLASSES, 1e-5, 1e-4, "logits through head layer 1");
    float got[B * CLASSES];
    memcpy(got, kd_f32(lg), sizeof got);

    /* The fine-tuned checkpoint keeps the layer: loaded without saying so. */
    KD_ASSERT_OK(kd_model_save(ft, ft_path));
    kd_model_cfg mc0 = {.in_channels = 1, .num_classes = CLASSES, .seed = 0};
    kd_model *back = NULL;
    KD_ASSERT_OK(kd_model_load_new(ft_path, NULL, &mc0, &back));
    assert_int_equal(kd_model_config(back)->head_layers, 1);
    kd_tensor *lg2 = eval_logits(back, g, x, NULL);
    assert_memory_equal(kd_f32(lg2), got, sizeof got);

    /* Files it cannot start from. */
    kd_model *plain = make_ft(0, 9);
    ASSERT_ERR(kd_model_load(plain, ft_path), KD_ERR_SHAPE, "1 projection-head layer before its classifier");
    KD_ASSERT_OK(kd_model_save(plain, plain_path));
    ASSERT_ERR(kd_model_load(ft, plain_path), KD_ERR_INVALID, "no SimCLRv2 head (head.0, head.1)");
    ASSERT_ERR(kd_model_load(ft, mlp), KD_ERR_INVALID, "has a 'mlp' projection head");
    kd_model *ft2 = make_ft(2, 9);
    KD_ASSERT_OK(kd_model_load(ft2, enc)); /* head.3 / head.4 from the encoder too */
    assert_non_null(kd_params_find(kd_model_params(ft2), "head.4.running_mean"));
    kd_model_cfg bad = {.in_channels = 1, .num_classes = CLASSES, .head_layers = 3};
    kd_model *m3 = NULL;
    ASSERT_ERR(kd_model_create("resnet8", &bad, &m3), KD_ERR_INVALID, "must be 0, 1 or 2");

    kd_graph_free(g);
    kd_model_free(ft2);
    kd_model_free(plain);
    kd_model_free(back);
    kd_model_free(ft);
    kd_trainer_free(tr2);
    kd_model_free(pre2);
    kd_trainer_free(tr);
    kd_model_free(pre);
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

/* The training top-1/top-5 of a run whose batches mix labeled and unlabeled
 * images (label -1, the methods with optional labels): counted on the
 * labeled rows only, none read outside its row (row 0 unlabeled: ASan sees a
 * read before the buffer). Reference: each row sorted (value descending,
 * class ascending, torch.topk's order on CPU), the label's position its rank. */
static const float *g_hits_row;
static int cmp_class_rank(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    float u = g_hits_row[i], v = g_hits_row[j];
    if (u != v) return u > v ? -1 : 1;
    return i - j;
}

static void test_train_hits(void **state) {
    (void)state;
    enum { N = 200, K = 7 };
    float *logits = malloc(sizeof(float) * N * K);
    int32_t y[N];
    kd_rng r;
    kd_rng_init(&r, 5, 6);
    for (int i = 0; i < N; i++) {
        for (int c = 0; c < K; c++) logits[i * K + c] = (float)kd_rng_below(&r, 4); /* many ties */
        y[i] = (int32_t)kd_rng_below(&r, K + 2) - 1; /* -1 .. K: unlabeled, labeled, out of range */
    }
    y[0] = -1;
    y[1] = K;
    int64_t want1 = 0, want5 = 0, want_n = 0;
    int order[K];
    for (int i = 0; i < N; i++) {
        if (y[i] < 0 || y[i] >= K) continue;
        want_n++;
        g_hits_row = logits + i * K;
        for (int c = 0; c < K; c++) order[c] = c;
        qsort(order, K, sizeof order[0], cmp_class_rank);
        int rank = 0;
        while (order[rank] != y[i]) rank++;
        want1 += rank == 0;
        want5 += rank < 5;
    }
    int64_t h1 = 0, h5 = 0, n = 0;
    kd__count_hits(logits, y, N, K, &h1, &h5, &n);
    assert_int_equal(n, want_n);
    assert_int_equal(h1, want1);
    assert_int_equal(h5, want5);
    assert_true(want_n > 100 && want_n < N - 20); /* both kinds of rows are there */
    free(logits);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_select_topk),
        cmocka_unit_test(test_train_hits),
        cmocka_unit_test(test_moco_step),
        cmocka_unit_test(test_simclr_step),
        cmocka_unit_test(test_ft_proj_selector),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
