/* SSKD (src/distill/sskd.c) beyond the generic loss test of test_distill.c:
 *   - the views: 4 views of one image share one flip (the loader's
 *     hflip_shared), are its exact quarter turns, and draw their own crops;
 *   - the keep rule on hand-made scores whose ranks are known;
 *   - stage 1: the teacher head's loss and gradients against PyTorch
 *     (tests/fixtures/sskd.safetensors, tools/gen_sskd_fixtures.py);
 *   - stage 2: a 3-step trajectory resnet20 -> resnet8 on fixed 4-view
 *     batches through kd_train_step against PyTorch (float64 reference),
 *     every term of every step and every final tensor. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/methods.h"
#include "kd/data.h"
#include "kd/io.h"
#include "kd/train.h"
#include "kd/transforms.h"
#include "testutil.h"
#include "train/train_impl.h"

#define SSKD_FIXTURE KD_FIXTURE("sskd.safetensors")

/* ------------------------------------------------------------ views */

static void test_views(void **state) {
    (void)state;
    enum { N = 6, C = 2, S = 8 };
    uint8_t img[N * C * S * S];
    int32_t lab[N];
    for (int i = 0; i < N * C * S * S; i++) img[i] = (uint8_t)(i * 37 + (i >> 3) * 11);
    for (int i = 0; i < N; i++) lab[i] = i % 2;
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_from_memory("views", N, C, S, S, img, lab, 2, &ds));
    const kd_method_def *def = kd_method_find("sskd");
    assert_non_null(def);
    assert_int_equal(def->views, 4);
    for (int pad = 0; pad <= 2; pad += 2) {
        kd_transform_cfg base = {.pad_crop = pad, .hflip = 1}, tfs[4];
        for (int v = 0; v < 4; v++) {
            tfs[v] = base;
            KD_ASSERT_OK(def->view_transform(NULL, v, &tfs[v]));
            assert_int_equal(tfs[v].hflip, 0);
            assert_int_equal(tfs[v].hflip_shared, 1);
        }
        kd_loader_cfg lc = {.batch_size = N, .seed = 5, .num_workers = 1, .n_views = 4, .view_transforms = tfs};
        kd_loader *ld = NULL;
        KD_ASSERT_OK(kd_loader_init(&ld, ds, &lc));
        int flips[2] = {0, 0}, crops_differ = 0;
        for (int64_t epoch = -2; epoch < 4; epoch++) {
            KD_ASSERT_OK(kd_loader_start_epoch(ld, epoch));
            kd_batch b;
            assert_int_equal(kd_loader_next(ld, &b), 1);
            assert_int_equal(b.n_views, 4);
            for (int64_t i = 0; i < b.n; i++) {
                int64_t idx = b.index[i];
                const uint8_t *src = img + idx * C * S * S;
                int f = kd_transform_shared_flip(5, epoch, idx);
                flips[f]++;
                /* The flipped image as floats, and its quarter turns. */
                float fl[C * S * S], rot[C * S * S];
                uint8_t flu[C * S * S], rotu[C * S * S];
                for (int r = 0; r < C * S; r++)
                    for (int x = 0; x < S; x++) {
                        flu[r * S + x] = src[r * S + (f ? S - 1 - x : x)];
                        fl[r * S + x] = (float)flu[r * S + x];
                    }
                int tops[4];
                for (int v = 0; v < 4; v++) {
                    kd_tf_rot90(fl, C, S, S, v, rot);
                    for (int k = 0; k < C * S * S; k++) rotu[k] = (uint8_t)rot[k];
                    /* The crop draws come from the view's own stream. */
                    kd_rng r;
                    kd_rng_init(&r, 5, kd_data_view_key(5, epoch, idx, v));
                    kd_transform_draw d = kd_transform_draw_from(&tfs[v], &r);
                    assert_int_equal(d.flip, 0);
                    tops[v] = d.top * 16 + d.left;
                    float want[C * S * S];
                    kd_transform_apply(&tfs[v], &d, rotu, C, S, S, want);
                    const float *got = b.views[v] + i * C * S * S;
                    if (memcmp(got, want, sizeof want) != 0)
                        fail_msg("pad %d epoch %lld sample %lld view %d: not the %d-quarter turn of the %sflipped "
                                 "image with the view's crop", pad, (long long)epoch, (long long)idx, v, v,
                                 f ? "" : "un");
                    /* kd_transform_sample_view makes the same view. */
                    float one[C * S * S];
                    KD_ASSERT_OK(kd_transform_sample_view(&tfs[v], ds, idx, 5, epoch, v, one));
                    assert_memory_equal(one, got, sizeof one);
                }
                crops_differ += pad && (tops[0] != tops[1] || tops[1] != tops[2] || tops[2] != tops[3]);
            }
        }
        kd_loader_free(ld);
        /* Both flips happen, and views draw their own crops. */
        assert_true(flips[0] > 0 && flips[1] > 0);
        if (pad) assert_true(crops_differ > 0);
    }
    /* A transform without hflip_shared is unchanged: view 0 of a one-view
     * loader equals kd_transform_sample (the pre-views pipeline). */
    kd_loader_cfg one = {.batch_size = N, .seed = 5, .transform = {.pad_crop = 2, .hflip = 1}};
    kd_loader *ld = NULL;
    KD_ASSERT_OK(kd_loader_init(&ld, ds, &one));
    KD_ASSERT_OK(kd_loader_start_epoch(ld, 1));
    kd_batch b;
    assert_int_equal(kd_loader_next(ld, &b), 1);
    for (int64_t i = 0; i < b.n; i++) {
        float want[C * S * S];
        kd_rng r;
        kd_rng_init(&r, 5, kd_data_sample_key(5, 1, b.index[i]));
        kd_transform_draw d = kd_transform_draw_from(&one.transform, &r);
        kd_transform_apply(&one.transform, &d, img + b.index[i] * C * S * S, C, S, S, want);
        assert_memory_equal(b.x + i * C * S * S, want, sizeof want);
    }
    kd_loader_free(ld);
    kd_dataset_free(ds);
}

/* ------------------------------------------------------------ keep rule */

static void check_keep(const float *scores, int64_t R, int64_t K, const int32_t *target, double ratio,
                       const char *want) {
    uint8_t keep[16];
    int64_t work[16];
    int64_t n = kd__sskd_keep(scores, R, K, target, ratio, keep, work);
    char got[17];
    int64_t cnt = 0;
    for (int64_t r = 0; r < R; r++) {
        got[r] = keep[r] ? '1' : '0';
        cnt += keep[r];
    }
    got[R] = '\0';
    if (strcmp(got, want) != 0) fail_msg("ratio %g: kept %s, expected %s", ratio, got, want);
    assert_int_equal(n, cnt);
}

static void test_keep_rule(void **state) {
    (void)state;
    /* 8 rows of 4 classes and each row's target; the target's rank (the
     * classes scoring above it; 0: the teacher is right) is in the comment.
     * Wrong rows by (rank, row): 3, 5, 1, 7, 4. */
    const float s[8 * 4] = {
        9, 1, 2, 3, /* target 0: rank 0 */
        5, 9, 1, 7, /* target 0: rank 2 */
        0, 0, 9, 1, /* target 2: rank 0 */
        8, 1, 9, 0, /* target 0: rank 1 */
        1, 2, 3, 4, /* target 0: rank 3 */
        3, 1, 2, 4, /* target 0: rank 1 */
        0, 5, 1, 2, /* target 1: rank 0 */
        2, 1, 7, 3, /* target 0: rank 2 */
    };
    const int32_t t[8] = {0, 0, 2, 0, 0, 0, 1, 0};
    check_keep(s, 8, 4, t, 1.0, "11111111");
    check_keep(s, 8, 4, t, 0.0, "10100010");
    check_keep(s, 8, 4, t, 0.75, "11110110"); /* floor(0.75 * 5) = 3: rows 3, 5, 1 */
    check_keep(s, 8, 4, t, 0.5, "10110110");  /* floor(2.5) = 2: rows 3, 5 */
    check_keep(s, 8, 4, t, 0.8, "11110111");  /* floor(4.0) = 4: rows 3, 5, 1, 7 */
    /* Ties: the target tied with a class of smaller index ranks behind it. */
    const float tie[2 * 3] = {4, 4, 1, 4, 4, 1};
    const int32_t tt[2] = {0, 1};
    check_keep(tie, 2, 3, tt, 0.0, "10");
}

/* ------------------------------------------------------------ stage 1 */

static void test_stage1(void **state) {
    (void)state;
    kd_st_file *f = kd_test_st_open(SSKD_FIXTURE);
    const kd_st_entry *ef = kd_test_st_entry(f, "stage1.feat");
    int64_t d = ef->shape[1];
    kd_param_list pl = {0};
    kd_linear_layer l0, l2;
    KD_ASSERT_OK(kd_linear_layer_init(&l0, &pl, "0", d, d, 1));
    KD_ASSERT_OK(kd_linear_layer_init(&l2, &pl, "2", d, d, 1));
    KD_ASSERT_OK(kd__load_params(&pl, f, "stage1.param."));
    const char *backends[2] = {"ref", "cpu"};
    for (int bi = 0; bi < 2; bi++) {
        kd_backend *be;
        if (kd_backend_get(backends[bi], &be) != KD_OK) continue;
        kd_graph *g = NULL;
        KD_ASSERT_OK(kd_graph_init(&g, be));
        kd_tensor *feat = kd_graph_wrap(g, KD_F32, 2, ef->shape, (void *)ef->data);
        kd_tensor *loss = NULL;
        int64_t hits = -1;
        kd_params_zero_grad(&pl);
        KD_ASSERT_OK(kd__sskd_head_loss(g, &l0, &l2, feat, &loss, &hits));
        assert_true(hits >= 0 && hits <= 3 * ef->shape[0] / 4);
        KD_ASSERT_CLOSE(kd_f32(loss), (const float *)kd_test_st_entry(f, "stage1.loss")->data, 1, 1e-6, 1e-5,
                        "stage-1 loss");
        KD_ASSERT_OK(kd_backward(g, loss));
        for (int i = 0; i < pl.n; i++) {
            const kd_st_entry *eg = kd_test_st_entry(f, "stage1.grad.%s", pl.items[i].name);
            KD_ASSERT_CLOSE(kd_f32(pl.items[i].t->grad), (const float *)eg->data, kd_tensor_numel(pl.items[i].t),
                            1e-6, 1e-4, pl.items[i].name);
        }
        printf("stage 1 [%s]: loss %.7g matches PyTorch, with the head's gradients\n", backends[bi],
               (double)kd_f32(loss)[0]);
        kd_graph_free(g);
    }
    kd_params_free(&pl);
    kd_st_close(f);
}

/* ------------------------------------------------------------ stage 2 */

static void compare_all(kd_param_list *pl, const kd_st_file *f, const char *prefix, double atol, const char *what) {
    for (int i = 0; i < pl->n; i++) {
        const kd_st_entry *e = kd_test_st_entry(f, "%s%s", prefix, pl->items[i].name);
        kd_tensor *t = pl->items[i].t;
        if (t->dtype == KD_I64) {
            assert_memory_equal(t->data, e->data, e->nbytes);
            continue;
        }
        char w[256];
        snprintf(w, sizeof w, "%s %s", what, pl->items[i].name);
        KD_ASSERT_CLOSE(kd_f32(t), (const float *)e->data, kd_tensor_numel(t), atol, 1e-3, w);
    }
}

static void run_trajectory(const char *backend) {
    kd_backend *be = NULL;
    if (kd_backend_get(backend, &be) != KD_OK) return;
    kd_st_file *f = kd_test_st_open(SSKD_FIXTURE);
    const int steps = atoi(kd_st_meta(f, "steps")), classes = atoi(kd_st_meta(f, "classes"));
    const int64_t n = atoll(kd_st_meta(f, "batch"));
    kd_distill_cfg dc = kd_distill_defaults("sskd");
    kd_json *w = NULL;
    KD_ASSERT_OK(kd_json_parse(kd_st_meta(f, "weights"), strlen(kd_st_meta(f, "weights")), "weights", &w));
    assert_true(fabs(dc.gamma - kd_json_get(w, "gamma")->number) < 1e-7);
    assert_true(fabs(dc.alpha - kd_json_get(w, "alpha")->number) < 1e-7);
    assert_true(fabs(dc.beta - kd_json_get(w, "beta")->number) < 1e-7);
    assert_true(fabs(dc.T - kd_json_get(w, "T")->number) < 1e-7);
    kd_json_free(w);
    kd_json *sp = NULL;
    KD_ASSERT_OK(kd_json_parse(kd_st_meta(f, "f32_spread"), strlen(kd_st_meta(f, "f32_spread")), "spread", &sp));
    kd_model_cfg mc = {.in_channels = 3, .num_classes = classes, .seed = 0};
    kd_model *student = NULL, *teacher = NULL;
    KD_ASSERT_OK(kd_model_create(kd_st_meta(f, "student"), &mc, &student));
    KD_ASSERT_OK(kd_model_create(kd_st_meta(f, "teacher"), &mc, &teacher));
    KD_ASSERT_OK(kd__load_params(kd_model_params(student), f, "student."));
    KD_ASSERT_OK(kd__load_params(kd_model_params(teacher), f, "teacher."));
    kd_model_set_training(teacher, 0);
    kd_model_set_training(student, 1);
    kd_optim_cfg oc = kd_optim_defaults(KD_OPTIM_SGD);
    oc.lr = strtod(kd_st_meta(f, "lr"), NULL);
    oc.momentum = strtod(kd_st_meta(f, "momentum"), NULL);
    oc.weight_decay = strtod(kd_st_meta(f, "weight_decay"), NULL);
    kd_sched sc = {.kind = KD_SCHED_CONSTANT, .base_lr = (float)oc.lr, .epochs = 1};
    kd_trainer_cfg tc = {.student = student, .teacher = teacher, .method = dc, .optim = oc, .sched = sc,
                         .be = be, .precision = KD_F32, .in_channels = 3, .height = 32, .width = 32,
                         .num_classes = classes, .n_train = n * steps, .seed = 0};
    kd_trainer *tr = NULL;
    KD_ASSERT_OK(kd_trainer_init(&tr, &tc));
    assert_int_equal(kd_trainer_num_views(tr), 4);
    kd_param_list *mp = kd_method_params(kd_trainer_method(tr));
    assert_int_equal(mp->n, kd_test_st_count_prefixed(f, "param."));
    KD_ASSERT_OK(kd__load_params(mp, f, "param."));
    const size_t per = (size_t)n * 3 * 32 * 32;
    float *views[4];
    for (int v = 0; v < 4; v++) assert_non_null(views[v] = malloc(per * sizeof(float)));
    int32_t y[64];
    int64_t index[64];
    kd_view_shape shapes[4] = {{3, 32, 32}, {3, 32, 32}, {3, 32, 32}, {3, 32, 32}};
    const kd_json *lrel = kd_json_get(sp, "loss_rel");
    for (int k = 1; k <= steps; k++) {
        for (int v = 0; v < 4; v++) memcpy(views[v], kd_test_st_entry(f, "batch%d.view%d", k, v)->data, per * 4);
        const kd_st_entry *ey = kd_test_st_entry(f, "batch%d.y", k);
        for (int64_t i = 0; i < n; i++) {
            y[i] = (int32_t)((const int64_t *)ey->data)[i];
            index[i] = (k - 1) * n + i;
        }
        kd_batch b = {.n = n, .batch = k - 1, .x = views[0], .y = y, .index = index, .n_views = 4,
                      .views = views, .view_shape = shapes};
        kd_step_result r;
        KD_ASSERT_OK(kd_train_step(tr, &b, 0, k - 1, steps, &r));
        double tol = fmax(1e-4, 10 * lrel->items[k - 1].number);
        double want = ((const float *)kd_test_st_entry(f, "step%d.total", k)->data)[0];
        printf("  %s sskd step %d: loss %.7g (PyTorch %.7g)\n", backend, k, r.loss, want);
        if (!(fabs(r.loss - want) <= tol * fabs(want))) fail_msg("step %d: loss %.8g, PyTorch %.8g", k, r.loss, want);
        assert_int_equal(r.n_terms, 4);
        for (int i = 0; i < r.n_terms; i++) {
            double tw = ((const float *)kd_test_st_entry(f, "step%d.term.%s", k, r.term_names[i])->data)[0];
            /* Each term within tol of itself, or within 1e-5 of the total:
             * a KL near zero (the student close to the teacher) loses
             * relative precision to float32 cancellation. */
            if (!(fabs(r.term_values[i] - tw) <= tol * fabs(tw) + 1e-5 * fabs(want)))
                fail_msg("step %d: term %s %.8g, PyTorch %.8g", k, r.term_names[i], r.term_values[i], tw);
        }
        /* The trainer's accuracy reads the unrotated views' logits. */
        assert_non_null(r.logits);
        assert_int_equal(r.classes, classes);
    }
    double atol = fmax(1e-3, 10 * kd_json_get(sp, "param_abs")->number);
    compare_all(kd_model_params(student), f, "final.", atol, "student");
    compare_all(mp, f, "final.distill.", atol, "method");
    printf("  %s sskd: %d steps and the final student and heads match PyTorch\n", backend, steps);
    for (int v = 0; v < 4; v++) free(views[v]);
    kd_json_free(sp);
    kd_trainer_free(tr);
    kd_model_free(student);
    kd_model_free(teacher);
    kd_st_close(f);
}

static void test_trajectory_cpu(void **state) {
    (void)state;
    run_trajectory("cpu");
}

static void test_trajectory_ref(void **state) {
    (void)state;
    run_trajectory("ref");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_views),          cmocka_unit_test(test_keep_rule),
        cmocka_unit_test(test_stage1),         cmocka_unit_test(test_trajectory_cpu),
        cmocka_unit_test(test_trajectory_ref),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
