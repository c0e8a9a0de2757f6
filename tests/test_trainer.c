/* Tests of kd_train_step with methods of the test's own (kd_trainer_cfg.
 * method_def, not registered): multi-view batches from a real loader (tiny
 * generated IDX data) reach the method as graph tensors of their own shapes,
 * a method's view_transform hook decides each view's transform, and the EMA
 * role (ema_student) keeps a copy of the student that the method moves with
 * kd_ema_update, saved as "ema.*" and read back by kd_trainer_load_state. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "kd/train.h"
#include "testutil.h"

enum { SIDE = 8, NTRAIN = 24, NTEST = 8, CLASSES = 4, BATCH = 8 };

/* The tiny IDX training set, written once per process. */
static kd_dataset *open_tiny(void) {
    static char dir[1024];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s", kd_test_tmpdir("trainer_idx"));
        kd_test_write_idx(dir, NTRAIN, NTEST, SIDE);
    }
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open(dir, 1, &ds));
    assert_int_equal(kd_dataset_size(ds), NTRAIN);
    assert_int_equal(kd_dataset_channels(ds), 1);
    return ds;
}

static kd_model *make_student(uint64_t seed) {
    kd_model_cfg mc = {.in_channels = 1, .num_classes = CLASSES, .seed = seed};
    kd_model *m = NULL;
    KD_ASSERT_OK(kd_model_create("resnet8", &mc, &m));
    kd_model_set_training(m, 1);
    return m;
}

static kd_trainer *make_trainer(kd_model *student, const kd_method_def *def) {
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get("ref", &be));
    kd_distill_cfg dc = {.gamma = 1.0f, .alpha = 0.0f, .beta = 1.0f, .T = 4.0f};
    snprintf(dc.method, sizeof dc.method, "%s", def->name);
    kd_optim_cfg oc = kd_optim_defaults(KD_OPTIM_SGD);
    oc.lr = 0.05;
    oc.momentum = 0.9;
    kd_trainer_cfg tc = {.student = student,
                         .method = dc,
                         .method_def = def,
                         .optim = oc,
                         .sched = {.kind = KD_SCHED_CONSTANT, .base_lr = 0.05f, .epochs = 1},
                         .be = be,
                         .precision = KD_F32,
                         .in_channels = 1,
                         .height = SIDE,
                         .width = SIDE,
                         .num_classes = CLASSES,
                         .n_train = NTRAIN,
                         .seed = 5};
    kd_trainer *tr = NULL;
    KD_ASSERT_OK(kd_trainer_init(&tr, &tc));
    return tr;
}

static const kd_transform_cfg base_tf = {.pad_crop = 1, .hflip = 1, .normalize = 1, .mean = {0.3f}, .std = {0.4f}};

/* ------------------------------------------------------------ two views */

/* What the two-view method saw on its last step. */
static struct {
    int steps;
    int n_views;
    int64_t shape[2][4];
    const float *data[2];
    int hook_calls[2];
    int hook_saw_base; /* the hook was handed the run's transform */
} g_seen;

/* "ce" on view 0 and "views": MSE between the student's logits on the two
 * views (a consistency term). */
static kd_status two_view_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    (void)m;
    const kd_step_batch *b = ctx->batch;
    g_seen.steps++;
    g_seen.n_views = b->n_views;
    for (int v = 0; v < 2 && v < b->n_views; v++) {
        memcpy(g_seen.shape[v], b->x[v]->shape, sizeof g_seen.shape[v]);
        g_seen.data[v] = kd_f32(b->x[v]);
    }
    if (b->n_views != 2) return kd_error(KD_ERR_INVALID, "two_view_step: %d views", b->n_views);
    kd_model_out o1;
    KD_TRY(kd_model_forward(ctx->student, ctx->g, b->x[0], 0, &ctx->s));
    KD_TRY(kd_model_forward(ctx->student, ctx->g, b->x[1], 0, &o1));
    KD_TRY(kd_loss_terms_add(terms, "ce", kd_cross_entropy(ctx->g, ctx->s.logits, b->y, 0.0f)));
    KD_TRY(kd_loss_terms_add(terms, "views", kd_mse(ctx->g, ctx->s.logits, o1.logits)));
    return kd_graph_status(ctx->g);
}

static const kd_method_def two_view_def = {
    .name = "twoview",
    .summary = "test method: CE on view 0 plus an MSE between the logits of two views",
    .paper = "none",
    .gamma = 1.0f,
    .beta = 1.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_NONE,
    .labels = KD_LABELS_REQUIRED,
    .views = 2,
    .step = two_view_step,
};

/* A deterministic geometry for view 1: the image upside down, then its
 * central 6 x 6 window. */
static kd_status flip_centre(const void *ctx, kd_rng *r, const uint8_t *src, int c, int h, int w, uint8_t *dst,
                             int out_h, int out_w, kd_scratch *scratch) {
    (void)ctx;
    (void)r;
    (void)scratch;
    int oy = (h - out_h) / 2, ox = (w - out_w) / 2;
    for (int ch = 0; ch < c; ch++)
        for (int y = 0; y < out_h; y++)
            for (int x = 0; x < out_w; x++)
                dst[((size_t)ch * out_h + y) * out_w + x] = src[((size_t)ch * h + (h - 1 - (y + oy))) * w + x + ox];
    return KD_OK;
}

/* View 1: no flip, no crop, the geometry above at 6 x 6; view 0 unchanged. */
static kd_status two_view_transform(const kd_method *m, int view, kd_transform_cfg *tf) {
    assert_string_equal(kd_method_get_def(m)->name, "twoview_hook");
    g_seen.hook_calls[view]++;
    g_seen.hook_saw_base += tf->pad_crop == base_tf.pad_crop && tf->hflip == base_tf.hflip &&
                            tf->normalize && tf->mean[0] == base_tf.mean[0] && tf->std[0] == base_tf.std[0];
    if (view == 1) {
        tf->hflip = 0;
        tf->pad_crop = 0;
        tf->out_h = tf->out_w = 6;
        tf->geometry = flip_centre;
    }
    return KD_OK;
}

static kd_loader *two_view_loader(kd_trainer *tr, const kd_dataset *ds, int workers, kd_transform_cfg tfs[2]) {
    assert_int_equal(kd_trainer_num_views(tr), 2);
    KD_ASSERT_OK(kd_trainer_view_transforms(tr, &base_tf, tfs));
    kd_loader_cfg lc = {.batch_size = BATCH, .shuffle = 1, .seed = 11, .num_workers = workers,
                        .transform = base_tf, .n_views = 2, .view_transforms = tfs};
    kd_loader *ld = NULL;
    KD_ASSERT_OK(kd_loader_init(&ld, ds, &lc));
    return ld;
}

static int all_finite(kd_param_list *pl) {
    for (int i = 0; i < pl->n; i++) {
        if (pl->items[i].t->dtype != KD_F32) continue;
        const float *p = kd_f32(pl->items[i].t);
        for (int64_t j = 0; j < kd_tensor_numel(pl->items[i].t); j++)
            if (!isfinite(p[j])) return 0;
    }
    return 1;
}

/* Runs one epoch of two-view steps; checks what the method saw each step. */
static void run_two_view_epoch(kd_trainer *tr, kd_loader *ld, kd_model *student, int h1, int w1) {
    KD_ASSERT_OK(kd_loader_start_epoch(ld, 0));
    kd_batch b;
    int r, steps = 0;
    while ((r = kd_loader_next(ld, &b)) == 1) {
        assert_int_equal(b.n_views, 2);
        kd_step_result res;
        KD_ASSERT_OK(kd_train_step(tr, &b, 0, steps, NTRAIN / BATCH, &res));
        steps++;
        assert_int_equal(g_seen.steps, steps);
        assert_int_equal(g_seen.n_views, 2);
        const int64_t want[2][4] = {{b.n, 1, SIDE, SIDE}, {b.n, 1, h1, w1}};
        assert_memory_equal(g_seen.shape[0], want[0], sizeof want[0]);
        assert_memory_equal(g_seen.shape[1], want[1], sizeof want[1]);
        /* The method got the loader's buffers, two distinct views. */
        assert_ptr_equal(g_seen.data[0], b.views[0]);
        assert_ptr_equal(g_seen.data[1], b.views[1]);
        if (h1 == SIDE && w1 == SIDE)
            assert_memory_not_equal(b.views[0], b.views[1], (size_t)(b.n * SIDE * SIDE) * sizeof(float));
        assert_int_equal(res.n_terms, 2);
        assert_string_equal(res.term_names[0], "ce");
        assert_string_equal(res.term_names[1], "views");
        assert_true(isfinite(res.loss) && res.loss > 0);
        assert_true(res.term_values[1] >= 0);
        assert_true(fabs(res.loss - (res.term_values[0] + res.term_values[1])) <= 1e-5 * res.loss);
        assert_non_null(res.logits);
        assert_int_equal(res.classes, CLASSES);
    }
    assert_int_equal(r, 0);
    assert_int_equal(steps, NTRAIN / BATCH);
    assert_true(all_finite(kd_model_params(student)));
}

static void test_two_views(void **state) {
    (void)state;
    kd_dataset *ds = open_tiny();
    kd_model *student = make_student(1);
    kd_trainer *tr = make_trainer(student, &two_view_def);
    memset(&g_seen, 0, sizeof g_seen);
    /* Without a hook, every view gets the run's transform (own draws). */
    kd_transform_cfg tfs[2];
    kd_loader *ld = two_view_loader(tr, ds, 2, tfs);
    for (int v = 0; v < 2; v++) assert_memory_equal(&tfs[v], &base_tf, sizeof base_tf);
    run_two_view_epoch(tr, ld, student, SIDE, SIDE);
    /* The views are the loader's documented per-view transforms. */
    KD_ASSERT_OK(kd_loader_start_epoch(ld, 0));
    kd_batch b;
    assert_int_equal(kd_loader_next(ld, &b), 1);
    float want[SIDE * SIDE];
    for (int64_t i = 0; i < b.n; i++)
        for (int v = 0; v < 2; v++) {
            KD_ASSERT_OK(kd_transform_sample_view(&base_tf, ds, b.index[i], 11, 0, v, want));
            assert_memory_equal(b.views[v] + i * SIDE * SIDE, want, sizeof want);
        }
    /* A batch made by hand with one view (x only) is refused. */
    kd_batch one = {.n = b.n, .x = b.x, .y = b.y, .index = b.index};
    kd_step_result res;
    kd_clear_error();
    assert_int_equal(kd_train_step(tr, &one, 0, 0, 3, &res), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "takes 2 views of each image; the batch has 1"));
    /* View 0 must come at the size the trainer probed. */
    kd_batch bad = b;
    const kd_view_shape wrong[2] = {{1, 6, 6}, b.view_shape[1]};
    bad.view_shape = wrong;
    kd_clear_error();
    assert_int_equal(kd_train_step(tr, &bad, 0, 0, 3, &res), KD_ERR_SHAPE);
    assert_non_null(strstr(kd_last_error(), "batch view 0 is (1, 6, 6) but the trainer was set up (probed) for (1, 8, 8)"));
    kd_loader_free(ld);
    kd_trainer_free(tr);
    kd_model_free(student);
    kd_dataset_free(ds);
}

static void test_view_transform_hook(void **state) {
    (void)state;
    kd_method_def def = two_view_def;
    def.name = "twoview_hook";
    def.view_transform = two_view_transform;
    kd_dataset *ds = open_tiny();
    kd_model *student = make_student(2);
    kd_trainer *tr = make_trainer(student, &def);
    memset(&g_seen, 0, sizeof g_seen);
    kd_transform_cfg tfs[2];
    kd_loader *ld = two_view_loader(tr, ds, 0, tfs);
    assert_int_equal(g_seen.hook_calls[0], 1);
    assert_int_equal(g_seen.hook_calls[1], 1);
    assert_int_equal(g_seen.hook_saw_base, 2);
    assert_memory_equal(&tfs[0], &base_tf, sizeof base_tf);
    int c, h, w;
    kd_loader_view_shape(ld, 1, &c, &h, &w);
    assert_true(c == 1 && h == 6 && w == 6);
    run_two_view_epoch(tr, ld, student, 6, 6);
    /* View 1 is the upside-down centre window, normalised, with no random
     * crop or flip; view 0 keeps the run's transform. */
    KD_ASSERT_OK(kd_loader_start_epoch(ld, 0));
    kd_batch b;
    while (kd_loader_next(ld, &b) == 1) {
        for (int64_t i = 0; i < b.n; i++) {
            const uint8_t *src = kd_dataset_image(ds, b.index[i]);
            for (int y = 0; y < 6; y++)
                for (int x = 0; x < 6; x++) {
                    float u = (float)src[(SIDE - 1 - (y + 1)) * SIDE + x + 1] / 255.0f;
                    float e = (u - base_tf.mean[0]) / base_tf.std[0];
                    if (b.views[1][i * 36 + y * 6 + x] != e)
                        fail_msg("sample %lld view 1 at (%d, %d): %g, want %g", (long long)b.index[i], y, x,
                                 (double)b.views[1][i * 36 + y * 6 + x], (double)e);
                }
            float want[SIDE * SIDE];
            KD_ASSERT_OK(kd_transform_sample_view(&base_tf, ds, b.index[i], 11, 0, 0, want));
            assert_memory_equal(b.views[0] + i * SIDE * SIDE, want, sizeof want);
        }
    }
    kd_loader_free(ld);
    kd_trainer_free(tr);
    kd_model_free(student);
    kd_dataset_free(ds);
}

/* ------------------------------------------------------------ the EMA role */

#define EMA_M 0.9

/* Mean teacher: "ce" on the student plus "mt", the MSE between the student's
 * logits and those of its EMA copy (no gradient). */
static kd_status mean_teacher_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    (void)m;
    if (!ctx->ema) return kd_error(KD_ERR_INVALID, "mean_teacher_step: no EMA copy");
    kd_tensor *x = ctx->batch->x[0];
    KD_TRY(kd_model_forward(ctx->student, ctx->g, x, 0, &ctx->s));
    kd_model_out eo;
    int prev = kd_graph_set_grad_enabled(ctx->g, 0);
    kd_status s = kd_model_forward(ctx->ema, ctx->g, x, 0, &eo);
    kd_graph_set_grad_enabled(ctx->g, prev);
    KD_TRY(s);
    KD_TRY(kd_loss_terms_add(terms, "ce", kd_cross_entropy(ctx->g, ctx->s.logits, ctx->batch->y, 0.0f)));
    KD_TRY(kd_loss_terms_add(terms, "mt", kd_mse(ctx->g, ctx->s.logits, eo.logits)));
    return kd_graph_status(ctx->g);
}

static kd_status mean_teacher_after(kd_method *m, kd_step_ctx *ctx) {
    (void)m;
    return kd_ema_update(kd_model_params(ctx->ema), kd_model_params(ctx->student), EMA_M);
}

static const kd_method_def mean_teacher_def = {
    .name = "meanteacher",
    .summary = "test method: CE plus an MSE to the logits of an EMA copy of the student",
    .paper = "none",
    .gamma = 1.0f,
    .beta = 1.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_NONE,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .ema_student = 1,
    .step = mean_teacher_step,
    .after_step = mean_teacher_after,
};

/* A copy of every tensor's bytes of pl. */
static void **snapshot(kd_param_list *pl) {
    void **s = calloc((size_t)pl->n, sizeof *s);
    for (int i = 0; i < pl->n; i++) {
        size_t nb = kd_tensor_nbytes(pl->items[i].t);
        s[i] = malloc(nb);
        memcpy(s[i], pl->items[i].t->data, nb);
    }
    return s;
}

static void snapshot_free(void **s, int n) {
    for (int i = 0; i < n; i++) free(s[i]);
    free(s);
}

static void test_ema_role(void **state) {
    (void)state;
    kd_dataset *ds = open_tiny();
    kd_model *student = make_student(3);
    kd_trainer *tr = make_trainer(student, &mean_teacher_def);
    kd_model *ema = kd_trainer_ema(tr);
    assert_non_null(ema);
    assert_int_equal(kd_model_training(ema), 0);
    kd_param_list *ep = kd_model_params(ema), *sp = kd_model_params(student);
    assert_int_equal(ep->n, sp->n);
    /* The copy starts from the student's weights and buffers. */
    for (int i = 0; i < ep->n; i++) {
        assert_string_equal(ep->items[i].name, sp->items[i].name);
        assert_memory_equal(ep->items[i].t->data, sp->items[i].t->data, kd_tensor_nbytes(sp->items[i].t));
    }
    void **expect = snapshot(ep);  /* the recurrence, computed here */
    void **buffers = snapshot(ep); /* the EMA's buffers never change */
    const float m = (float)EMA_M, a = (float)(1.0 - EMA_M);

    kd_loader_cfg lc = {.batch_size = BATCH, .shuffle = 1, .seed = 3, .transform = base_tf};
    kd_loader *ld = NULL;
    KD_ASSERT_OK(kd_loader_init(&ld, ds, &lc));
    KD_ASSERT_OK(kd_loader_start_epoch(ld, 0));
    kd_batch b;
    for (int k = 0; k < 3; k++) {
        assert_int_equal(kd_loader_next(ld, &b), 1);
        kd_step_result res;
        KD_ASSERT_OK(kd_train_step(tr, &b, 0, k, 3, &res));
        assert_int_equal(res.n_terms, 2);
        assert_string_equal(res.term_names[1], "mt");
        assert_true(isfinite(res.loss));
        /* Even at the first step (equal weights) the logits differ: the
         * student normalises with batch statistics, its EMA (eval mode) with
         * running ones. */
        assert_true(isfinite(res.term_values[1]) && res.term_values[1] > 0.0);
        for (int i = 0; i < ep->n; i++) {
            kd_tensor *et = ep->items[i].t;
            if (ep->items[i].kind == KD_PARAM_BUFFER) {
                assert_memory_equal(et->data, buffers[i], kd_tensor_nbytes(et));
                continue;
            }
            float *e = expect[i];
            const float *x = kd_f32(sp->items[i].t);
            for (int64_t j = 0; j < kd_tensor_numel(et); j++) e[j] = e[j] * m + a * x[j];
            if (memcmp(et->data, e, kd_tensor_nbytes(et)) != 0)
                fail_msg("step %d: EMA tensor %s differs from ema * %g + (1 - %g) * student", k + 1,
                         ep->items[i].name, EMA_M, EMA_M);
        }
    }
    /* The student moved away from its EMA; the student's batch-norm
     * statistics moved, the EMA's did not. */
    int moved = 0, stats_moved = 0;
    for (int i = 0; i < ep->n; i++) {
        int differ = memcmp(ep->items[i].t->data, sp->items[i].t->data, kd_tensor_nbytes(sp->items[i].t)) != 0;
        if (ep->items[i].kind == KD_PARAM_BUFFER) stats_moved += differ;
        else moved += differ;
    }
    assert_true(moved > 0 && stats_moved > 0);

    /* save_state -> a new trainer (another student, so another initial EMA)
     * -> load_state restores the EMA exactly. */
    char path[1200];
    snprintf(path, sizeof path, "%s/state.safetensors", kd_test_tmpdir("trainer_ema"));
    kd_st_writer *w = NULL;
    KD_ASSERT_OK(kd_st_writer_init(&w));
    KD_ASSERT_OK(kd_trainer_save_state(tr, w));
    KD_ASSERT_OK(kd_st_writer_save(w, path));
    kd_st_writer_free(w);
    kd_st_file *f = kd_test_st_open(path);
    assert_int_equal(kd_test_st_count_prefixed(f, "ema."), ep->n);
    for (int i = 0; i < ep->n; i++) {
        const kd_st_entry *e = kd_test_st_entry(f, "ema.%s", ep->items[i].name);
        assert_int_equal(e->nbytes, kd_tensor_nbytes(ep->items[i].t));
        assert_memory_equal(e->data, ep->items[i].t->data, e->nbytes);
    }
    kd_model *student2 = make_student(4);
    kd_trainer *tr2 = make_trainer(student2, &mean_teacher_def);
    kd_param_list *ep2 = kd_model_params(kd_trainer_ema(tr2));
    int differ = 0;
    for (int i = 0; i < ep2->n; i++)
        differ += memcmp(ep2->items[i].t->data, ep->items[i].t->data, kd_tensor_nbytes(ep->items[i].t)) != 0;
    assert_true(differ > 0);
    KD_ASSERT_OK(kd_trainer_load_state(tr2, f));
    for (int i = 0; i < ep2->n; i++) {
        assert_string_equal(ep2->items[i].name, ep->items[i].name);
        if (memcmp(ep2->items[i].t->data, ep->items[i].t->data, kd_tensor_nbytes(ep->items[i].t)) != 0)
            fail_msg("EMA tensor %s differs after load_state", ep->items[i].name);
    }
    kd_st_close(f);
    kd_trainer_free(tr2);
    kd_model_free(student2);
    snapshot_free(expect, ep->n);
    snapshot_free(buffers, ep->n);
    kd_loader_free(ld);
    kd_trainer_free(tr);
    kd_model_free(student);
    kd_dataset_free(ds);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_views),
        cmocka_unit_test(test_view_transform_hook),
        cmocka_unit_test(test_ema_role),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
