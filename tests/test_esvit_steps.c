/* Three training steps of EsViT and DINO with a tiny Swin student and its EMA
 * teacher, through the public kd_train_step, against PyTorch
 * (tests/fixtures/esvit_steps.safetensors, made by tools/gen_esvit_steps.py:
 * torchvision's SwinTransformer with swin_mnist's settings and the official
 * train_one_epoch order: loss with the old centres, backward, per-tensor
 * clip 3, last layers cancelled in epoch 0, AdamW at the cosine lr and wd,
 * EMA of every teacher tensor at the cosine momentum, centre updates).
 *
 * Both sides start from the same hash-generated values (the generator's
 * init_value, regenerated here bit for bit: kd_test_gen_weight keyed by the
 * 32-bit FNV-1a of the tensor's name; the teacher is the student's copy) and
 * feed the same hash-generated views (2 global crops 28x28, 2 local 12x12,
 * B = 2), so no data loader or augmentation takes part. 2 epochs of 2 steps:
 * the 3 steps cover the teacher-temperature warm-up (0.04, then 0.07 in
 * epoch 1), the last layers held in epoch 0 and first updated at step 3
 * (AdamW's bias correction counting from their own first step), the weight
 * decay and teacher momentum cosines; esvit keeps weight_g fixed
 * (norm_last_layer 1), dino trains it (0).
 *
 * The student runs in eval mode: swin_mnist has no batch norm and no dropout,
 * so that only turns off its stochastic depth, whose random masks PyTorch
 * cannot replay (the reference has stochastic_depth_prob 0). The teacher
 * must run without it anyway (the official teachers have none).
 *
 * After each step: every loss term, both centres, and for every tensor of the
 * student, of its EMA copy and of the method (heads and teacher heads) two
 * projections of its move from the start, d = p - p0: dot(d, R) with a
 * generated R and ||d|| (the key third of attn.qkv.bias left out: see the
 * generator). Tolerances: PyTorch's own float32 run ends within 2e-6 of its
 * float64 one in the terms, 3e-7 in the centres and 1e-4 of ||d|| in the
 * projections (the latter from AdamW: an element whose gradient is ~1e-8,
 * near AdamW's eps, moves by an amount float32 rounding decides); the test
 * allows 1e-4, 1e-4 and 1e-3 (and checks the fixture's measured spread
 * stays 5x below them). A wrong momentum, temperature, clip, hold, decay or
 * argmax moves the step-2 and step-3 values by percents. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "kd/train.h"
#include "testutil.h"

#define FIXTURE KD_FIXTURE("esvit_steps.safetensors")
#define TOL_TERM 1e-4
#define TOL_CENTER 1e-4
#define TOL_PROJ 1e-3
#define MAX_VIEWS 8

/* tools/gen_esvit_steps.py key(): 32-bit FNV-1a of the name's bytes. */
static uint32_t name_key(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

/* The student's name of a method tensor ("teacher_head.x" -> "head.x"). */
static const char *student_name(const char *name) {
    return strncmp(name, "teacher_", 8) == 0 ? name + 8 : name;
}

/* tools/gen_esvit_steps.py init_value(). */
static void init_tensor(kd_tensor *t, const char *name) {
    const char *base = student_name(name);
    const int64_t n = kd_tensor_numel(t);
    const size_t L = strlen(base);
    float *w = kd_f32(t);
    if (L >= 19 && !strcmp(base + L - 19, "last_layer.weight_g")) {
        for (int64_t i = 0; i < n; i++) w[i] = 1.0f;
    } else if (strstr(base, "relative_position_bias_table")) {
        kd_test_gen_weight(w, n, name_key(base), 300);
    } else if (t->ndim >= 2) {
        kd_test_gen_weight(w, n, name_key(base), n / t->shape[0]);
    } else {
        kd_test_gen_weight(w, n, name_key(base), 3);
        const int is_weight = L >= 7 && !strcmp(base + L - 7, ".weight");
        for (int64_t i = 0; i < n; i++) w[i] = is_weight ? 1.0f + 0.1f * w[i] : 0.1f * w[i];
    }
}

static const kd_json *member(const kd_json *o, const char *key, kd_json_type type, const char *what) {
    const kd_json *v = kd_json_get(o, key);
    if (!v || v->type != type) fail_msg("%s: no \"%s\" of the expected type", what, key);
    return v;
}

static double num(const kd_json *o, const char *key, const char *what) {
    return member(o, key, KD_JSON_NUMBER, what)->number;
}

/* One compared tensor: its kd tensor, initial copy and projection vector. */
typedef struct {
    const char *name; /* the fixture's: student.<n>, teacher.<n>, distill.<n> */
    kd_tensor *t;
    float *p0, *r;
    int64_t skip0, skip1; /* elements [skip0, skip1) left out (the key bias) */
    double norm0;
} tracked;

static kd_tensor *find_tensor(kd_param_list *pl, const char *name, const char *what) {
    kd_param *p = kd_params_find(pl, name);
    if (!p || p->t->dtype != KD_F32) fail_msg("%s: kd has no float tensor %s", what, name);
    return p->t;
}

static void run(const char *method, const char *backend) {
    kd_backend *be = NULL;
    if (kd_backend_get(backend, &be) != KD_OK) {
        printf("  backend %s not built: skipped\n", backend);
        return;
    }
    kd_st_file *f = kd_test_st_open(FIXTURE);
    kd_json *mj = kd_test_st_meta_json(f, method);
    const int steps = (int)num(mj, "steps", method), spe = (int)num(mj, "steps_per_epoch", method);
    const int epochs = (int)num(mj, "epochs", method), B = (int)num(mj, "batch", method);
    const int V = (int)num(mj, "views", method), gside = (int)num(mj, "global", method);
    const int lside = (int)num(mj, "local", method);
    assert_true(V >= 2 && V <= MAX_VIEWS && B >= 1 && steps >= 1);

    /* Measured float32 spread of the reference: the tolerances stand. */
    const kd_json *sp = member(mj, "f32_spread", KD_JSON_OBJECT, method);
    const char *sk[3] = {"terms", "center", "proj"};
    const double st[3] = {TOL_TERM, TOL_CENTER, TOL_PROJ};
    for (int i = 0; i < 3; i++) {
        const kd_json *a = member(sp, sk[i], KD_JSON_ARRAY, method);
        for (int64_t k = 0; k < a->count; k++)
            if (!(a->items[k].number <= st[i] / 5))
                fail_msg("%s: PyTorch's float32 run is %g off its float64 run in the %s at step %lld, too close to "
                         "the tolerance %g", method, a->items[k].number, sk[i], (long long)k + 1, st[i]);
    }

    kd_model_cfg mc = {.in_channels = 1, .num_classes = 10, .seed = 1};
    kd_model *student = NULL;
    KD_ASSERT_OK(kd_model_create("swin_mnist", &mc, &student));
    kd_param_list *sp_l = kd_model_params(student);
    for (int i = 0; i < sp_l->n; i++)
        if (sp_l->items[i].t->dtype == KD_F32) init_tensor(sp_l->items[i].t, sp_l->items[i].name);
    kd_model_set_training(student, 0); /* no stochastic depth (see the header) */

    kd_distill_cfg dc = kd_distill_defaults(method);
    const kd_json *args = member(mj, "args", KD_JSON_OBJECT, method);
    for (int64_t i = 0; i < args->count; i++) {
        char k[128];
        snprintf(k, sizeof k, "%s.%s", method, args->keys[i]);
        KD_ASSERT_OK(kd_distill_cfg_set_arg(&dc, k, args->items[i].string));
    }
    kd_optim_cfg oc = kd_optim_defaults(KD_OPTIM_ADAMW);
    oc.lr = num(mj, "lr", method);
    oc.weight_decay = num(mj, "weight_decay", method);
    oc.no_decay_norm_bias = 1; /* utils.get_params_groups: biases and 1-d tensors */
    kd_trainer_cfg tc = {.student = student,
                         .method = dc,
                         .optim = oc,
                         .sched = {.kind = KD_SCHED_COSINE, .base_lr = (float)oc.lr, .epochs = epochs,
                                   .min_lr = (float)num(mj, "min_lr", method)},
                         .be = be,
                         .precision = KD_F32,
                         .in_channels = 1,
                         .height = gside,
                         .width = gside,
                         .num_classes = 10,
                         .n_train = (int64_t)B * steps,
                         .seed = 1};
    kd_trainer *tr = NULL;
    KD_ASSERT_OK(kd_trainer_init(&tr, &tc)); /* the EMA teacher: a copy of the initialised student */
    assert_int_equal(kd_trainer_num_views(tr), V);
    kd_param_list *ep = kd_model_params(kd_trainer_ema(tr));
    kd_param_list *mp = kd_method_params(kd_trainer_method(tr));
    for (int i = 0; i < mp->n; i++)
        if (mp->items[i].t->dtype == KD_F32 && strncmp(mp->items[i].name, "dino_loss.", 10) != 0)
            init_tensor(mp->items[i].t, mp->items[i].name);

    /* The compared tensors: all of the fixture's, and every float tensor of
     * kd's but the centres (compared whole) and the unused classifier. */
    const kd_json *names = member(mj, "names", KD_JSON_ARRAY, method);
    const int64_t P = names->count;
    int n_expect = 0;
    for (int i = 0; i < sp_l->n; i++)
        n_expect += sp_l->items[i].t->dtype == KD_F32 && strncmp(sp_l->items[i].name, "head.", 5) != 0;
    n_expect *= 2; /* and the EMA copy */
    for (int i = 0; i < mp->n; i++)
        n_expect += mp->items[i].t->dtype == KD_F32 && strncmp(mp->items[i].name, "dino_loss.", 10) != 0;
    if (P != n_expect) fail_msg("%s: the fixture tracks %lld tensors, kd has %d", method, (long long)P, n_expect);
    tracked *tk = calloc((size_t)P, sizeof *tk);
    assert_non_null(tk);
    for (int64_t i = 0; i < P; i++) {
        const char *fn = names->items[i].string, *dot = strchr(fn, '.');
        if (!dot) fail_msg("%s: bad tensor name %s", method, fn);
        kd_param_list *pl = !strncmp(fn, "student.", 8) ? sp_l : !strncmp(fn, "teacher.", 8) ? ep
                          : !strncmp(fn, "distill.", 8) ? mp : NULL;
        if (!pl) fail_msg("%s: bad tensor name %s", method, fn);
        tracked *x = &tk[i];
        x->name = fn;
        x->t = find_tensor(pl, dot + 1, method);
        const int64_t n = kd_tensor_numel(x->t);
        x->p0 = malloc(sizeof(float) * (size_t)n);
        x->r = malloc(sizeof(float) * (size_t)n);
        assert_non_null(x->p0);
        assert_non_null(x->r);
        memcpy(x->p0, kd_f32(x->t), sizeof(float) * (size_t)n);
        const char *sn = student_name(dot + 1);
        char pk[192];
        snprintf(pk, sizeof pk, "proj.%s", sn);
        kd_test_gen_weight(x->r, n, name_key(pk), 3);
        const size_t L = strlen(sn);
        x->skip0 = x->skip1 = 0;
        if (L >= 13 && !strcmp(sn + L - 13, "attn.qkv.bias")) {
            x->skip0 = n / 3;
            x->skip1 = 2 * n / 3;
        }
        double ss = 0;
        for (int64_t j = 0; j < n; j++) ss += (double)x->p0[j] * x->p0[j];
        x->norm0 = sqrt(ss);
    }

    /* The views: generated, as the reference's. */
    float *vx[MAX_VIEWS];
    kd_view_shape vs[MAX_VIEWS];
    for (int v = 0; v < V; v++) {
        const int side = v < 2 ? gside : lside;
        vs[v] = (kd_view_shape){1, side, side};
        vx[v] = malloc(sizeof(float) * (size_t)(B * side * side));
        assert_non_null(vx[v]);
    }
    int64_t *index = calloc((size_t)B, sizeof *index);
    assert_non_null(index);
    const kd_json *tnames = member(mj, "terms", KD_JSON_ARRAY, method);
    double worst_term = 0, worst_center = 0, worst_proj = 0;
    for (int s = 1; s <= steps; s++) {
        for (int v = 0; v < V; v++) {
            char k[64];
            snprintf(k, sizeof k, "step%d.view%d", s, v);
            kd_test_gen_weight(vx[v], (int64_t)B * vs[v].h * vs[v].w, name_key(k), 3);
        }
        kd_batch b = {.n = B, .batch = (s - 1) % spe, .x = vx[0], .y = NULL, .index = index, .n_views = V,
                      .views = vx, .view_shape = vs};
        kd_step_result r;
        KD_ASSERT_OK(kd_train_step(tr, &b, (s - 1) / spe, (s - 1) % spe, spe, &r));
        /* The loss terms, by name. */
        const kd_st_entry *et = kd_test_st_entry(f, "%s.step%d.terms", method, s);
        if (r.n_terms != tnames->count || (int64_t)(et->nbytes / sizeof(float)) != tnames->count)
            fail_msg("%s step %d: %d terms, PyTorch %lld", method, s, r.n_terms, (long long)tnames->count);
        for (int i = 0; i < r.n_terms; i++) {
            if (strcmp(r.term_names[i], tnames->items[i].string) != 0)
                fail_msg("%s: term %d is %s, PyTorch's %s", method, i, r.term_names[i], tnames->items[i].string);
            const double want = ((const float *)et->data)[i], got = r.term_values[i];
            const double rel = fabs(got - want) / fabs(want);
            printf("  %s %s step %d: %s %.7g (PyTorch %.7g, rel %.2g)\n", backend, method, s, r.term_names[i], got,
                   want, rel);
            if (!(rel <= TOL_TERM)) fail_msg("%s step %d: %s %.8g, PyTorch %.8g", method, s, r.term_names[i], got, want);
            if (rel > worst_term) worst_term = rel;
        }
        /* The centres. */
        const char *cn[2] = {"center", "center_grid"};
        for (int c = 0; c < 2; c++) {
            char ck[64];
            snprintf(ck, sizeof ck, "%s.step%d.%s", method, s, cn[c]);
            const kd_st_entry *ec = kd_st_find(f, ck);
            char pn[64];
            snprintf(pn, sizeof pn, "dino_loss.%s", cn[c]);
            kd_param *cp = kd_params_find(mp, pn);
            if (!ec && !cp) continue;
            if (!ec || !cp) fail_msg("%s: %s is in only one of kd and the fixture", method, pn);
            const int64_t K = kd_tensor_numel(cp->t);
            assert_int_equal(ec->nbytes, sizeof(float) * (size_t)K);
            const float *want = ec->data, *got = kd_f32(cp->t);
            double scale = 0, dev = 0;
            for (int64_t k = 0; k < K; k++) scale = fmax(scale, fabs(want[k]));
            for (int64_t k = 0; k < K; k++) dev = fmax(dev, fabs((double)got[k] - want[k]));
            if (!(dev <= TOL_CENTER * scale))
                fail_msg("%s step %d: %s is %.3g off PyTorch's (largest element %.3g)", method, s, pn, dev, scale);
            if (dev / scale > worst_center) worst_center = dev / scale;
        }
        /* Every tensor's move since the start. */
        const kd_st_entry *ep_e = kd_test_st_entry(f, "%s.step%d.proj", method, s);
        assert_int_equal(ep_e->nbytes, sizeof(float) * 2 * (size_t)P);
        const float *pw = ep_e->data;
        int moved = 0;
        for (int64_t i = 0; i < P; i++) {
            const tracked *x = &tk[i];
            const float *p = kd_f32(x->t);
            double d_dot = 0, d_ss = 0;
            for (int64_t j = 0; j < kd_tensor_numel(x->t); j++) {
                if (j >= x->skip0 && j < x->skip1) continue;
                const double d = (double)p[j] - (double)x->p0[j];
                d_dot += d * x->r[j];
                d_ss += d * d;
            }
            const double d_norm = sqrt(d_ss), want_dot = pw[2 * i], want_norm = pw[2 * i + 1];
            /* relative to the move, with a floor of float32 rounding of p */
            const double tol = TOL_PROJ * want_norm + 1e-6 * x->norm0;
            const double dev = fmax(fabs(d_dot - want_dot), fabs(d_norm - want_norm));
            if (!(dev <= tol))
                fail_msg("%s step %d: %s moved by dot %.7g, norm %.7g; PyTorch %.7g, %.7g (tolerance %.2g)", method,
                         s, x->name, d_dot, d_norm, want_dot, want_norm, tol);
            if (want_norm > 0) {
                moved++;
                if (dev / want_norm > worst_proj) worst_proj = dev / want_norm;
            }
        }
        assert_true(moved > P / 2);
    }
    printf("  %s %s: %lld tensors over %d steps; largest deviations: terms %.2g, centres %.2g, moves %.2g (of the "
           "move's norm)\n", backend, method, (long long)P, steps, worst_term, worst_center, worst_proj);
    for (int v = 0; v < V; v++) free(vx[v]);
    free(index);
    for (int64_t i = 0; i < P; i++) {
        free(tk[i].p0);
        free(tk[i].r);
    }
    free(tk);
    kd_trainer_free(tr);
    kd_model_free(student);
    kd_json_free(mj);
    kd_st_close(f);
}

static void test_esvit_cpu(void **state) {
    (void)state;
    run("esvit", "cpu");
}
static void test_dino_cpu(void **state) {
    (void)state;
    run("dino", "cpu");
}
static void test_esvit_ref(void **state) {
    (void)state;
    run("esvit", "ref");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_esvit_cpu),
        cmocka_unit_test(test_dino_cpu),
        cmocka_unit_test(test_esvit_ref),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
