/* `kd eval --knn` and `kd eval --linear` as a library run: settings checked
 * and the checkpoint's architecture known before any feature is computed,
 * features of both splits with the evaluation transform, the kNN vote or the
 * linear classifier (knn.c, linear_eval.c), and the run directory
 * (config.yaml, metrics.jsonl, summary.json, labels.txt), each file written
 * atomically. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kd/eval.h"
#include "kd/io.h"
#include "train/train_impl.h"

static double kd__now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void kd_eval_cfg_defaults(kd_eval_cfg *c) {
    memset(c, 0, sizeof *c);
    c->mode = KD_EVAL_KNN;
    snprintf(c->data, sizeof c->data, "/usr/share/datasets/fashion-mnist");
    snprintf(c->backend, sizeof c->backend, "cpu");
    c->eval_batch = 256;
    c->n_k = 2;
    c->k[0] = 20;
    c->k[1] = 200;
    c->temperature = 0.07;
    c->linear = kd_linear_defaults();
}

static const char *kd__mode_name(kd_eval_mode m) { return m == KD_EVAL_LINEAR ? "linear" : "knn"; }

static void kd__k_text(const kd_eval_cfg *c, char *buf, size_t n) {
    size_t off = 0;
    buf[0] = '\0';
    for (int j = 0; j < c->n_k && off < n; j++) off += (size_t)snprintf(buf + off, n - off, j ? ",%d" : "%d", c->k[j]);
}

/* The settings as YAML (JSON strings are YAML double-quoted scalars). */
static kd_status kd__eval_save_cfg(const kd_eval_cfg *c, const char *arch, const char *path) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return kd_error(KD_ERR_NOMEM, "out of memory writing %s", path);
    char v[64];
    fprintf(f, "# kd %s evaluation settings (kd eval --%s)\n", kd_version(), kd__mode_name(c->mode));
#define KD__KV(k, s)                  \
    fprintf(f, "%s: ", k);            \
    kd_json_write_string(f, s);       \
    fputc('\n', f);
    KD__KV("mode", kd__mode_name(c->mode));
    KD__KV("ckpt", c->ckpt);
    KD__KV("model", arch);
    KD__KV("data", c->data);
    if (c->mode == KD_EVAL_KNN) {
        kd__k_text(c, v, sizeof v);
        KD__KV("k", v);
        snprintf(v, sizeof v, "%.17g", c->temperature);
        KD__KV("temperature", v);
    } else {
        KD__KV("labels", c->labels);
        snprintf(v, sizeof v, "%d", c->linear.epochs);
        KD__KV("epochs", v);
        snprintf(v, sizeof v, "%.17g", c->linear.lr);
        KD__KV("lr", v);
        snprintf(v, sizeof v, "%d", c->linear.batch_size);
        KD__KV("batch_size", v);
        snprintf(v, sizeof v, "%.17g", c->linear.momentum);
        KD__KV("momentum", v);
        snprintf(v, sizeof v, "%.17g", c->linear.weight_decay);
        KD__KV("weight_decay", v);
        KD__KV("schedule", "cosine");
        KD__KV("features", "computed once with the evaluation transform");
        snprintf(v, sizeof v, "%llu", (unsigned long long)c->linear.seed);
        KD__KV("seed", v);
    }
    snprintf(v, sizeof v, "%d", c->eval_batch);
    KD__KV("eval_batch", v);
    snprintf(v, sizeof v, "%d", kd_get_num_threads());
    KD__KV("threads", v);
    KD__KV("backend", c->backend);
#undef KD__KV
    fclose(f);
    kd_status s = kd_file_write_atomic(path, text, len);
    free(text);
    return s;
}

/* Checks what can be checked without data; a failure is a bad command line. */
static kd_status kd__eval_check(const kd_eval_cfg *c) {
    if (c->mode != KD_EVAL_KNN && c->mode != KD_EVAL_LINEAR) return kd_error(KD_ERR_INVALID, "evaluation mode %d", c->mode);
    if (!c->ckpt[0]) return kd_error(KD_ERR_INVALID, "ckpt (the checkpoint to evaluate) is empty");
    if (!strcmp(c->ckpt, KD_EVAL_RANDOM_INIT) && !c->arch[0])
        return kd_error(KD_ERR_INVALID, "ckpt '%s' (the network at random initialisation) needs model", KD_EVAL_RANDOM_INIT);
    if (!c->out[0]) return kd_error(KD_ERR_INVALID, "out (run directory) is empty");
    if (c->eval_batch < 1) return kd_error(KD_ERR_INVALID, "eval_batch must be >= 1, got %d", c->eval_batch);
    if (c->mode == KD_EVAL_KNN) {
        if (c->n_k < 1 || c->n_k > KD_KNN_MAX_K)
            return kd_error(KD_ERR_INVALID, "k: between 1 and %d values, got %d", KD_KNN_MAX_K, c->n_k);
        for (int j = 0; j < c->n_k; j++)
            if (c->k[j] < 1) return kd_error(KD_ERR_INVALID, "k must be >= 1, got %d", c->k[j]);
        if (!(c->temperature > 0) || !isfinite(c->temperature))
            return kd_error(KD_ERR_INVALID, "temperature must be > 0, got %g", c->temperature);
    } else {
        if (c->linear.epochs < 1) return kd_error(KD_ERR_INVALID, "epochs must be >= 1, got %d", c->linear.epochs);
        if (c->linear.batch_size < 1)
            return kd_error(KD_ERR_INVALID, "batch_size must be >= 1, got %d", c->linear.batch_size);
        if (!(c->linear.lr > 0) || !isfinite(c->linear.lr))
            return kd_error(KD_ERR_INVALID, "lr must be > 0, got %g", c->linear.lr);
    }
    KD_TRY(kd_label_spec_parse(c->labels, NULL));
    char path[600];
    snprintf(path, sizeof path, "%s/summary.json", c->out);
    if (kd_file_exists(path))
        return kd_error(KD_ERR_INVALID, "%s already holds a result (%s); choose another out", c->out, path);
    return KD_OK;
}

/* The architecture to build: c->arch, or the checkpoint's; an unknown name
 * is a bad command line (*config_error). */
static kd_status kd__eval_arch(const kd_eval_cfg *c, char *arch, size_t n, int *config_error) {
    if (c->arch[0]) {
        snprintf(arch, n, "%s", c->arch);
    } else {
        kd_st_file *f = NULL;
        KD_TRY(kd_st_open(c->ckpt, &f));
        const char *a = kd_st_meta(f, "arch");
        if (a) snprintf(arch, n, "%s", a);
        kd_st_close(f);
        if (!a) {
            *config_error = 1;
            return kd_error(KD_ERR_INVALID, "%s does not name its architecture: give it (model)", c->ckpt);
        }
    }
    if (!kd_model_exists(arch)) {
        *config_error = 1;
        kd_model_cfg mc = {.in_channels = 1, .num_classes = 1, .seed = 0};
        kd_model *tmp = NULL;
        kd_model_create(arch, &mc, &tmp); /* the message lists the known names */
        return kd_error(KD_ERR_NOT_FOUND, "%s: architecture '%s' is unknown: %s", c->ckpt, arch, kd_last_error());
    }
    return KD_OK;
}

static kd_status kd__eval_write(const kd_eval_cfg *c, const char *arch, const kd_eval_result *r,
                                const double *epoch_loss, int64_t n_labeled, const kd__run_labels_out *lo) {
    KD_TRY(kd_mkdirs(c->out));
    char path[600];
    snprintf(path, sizeof path, "%s/config.yaml", c->out);
    KD_TRY(kd__eval_save_cfg(c, arch, path));
    if (lo && lo->idx) {
        snprintf(path, sizeof path, "%s/labels.txt", c->out);
        KD_TRY(kd__labels_write(path, lo, c->labels, c->linear.seed));
    }
    /* metrics.jsonl */
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return kd_error(KD_ERR_NOMEM, "out of memory writing the metrics");
    if (c->mode == KD_EVAL_KNN) {
        for (int j = 0; j < c->n_k; j++) {
            fprintf(f, "{\"k\": %d, \"temperature\": ", c->k[j]);
            kd_json_write_number(f, c->temperature);
            fprintf(f, ", \"top1\": ");
            kd_json_write_number(f, r->knn.top1[j]);
            fprintf(f, ", \"top5\": ");
            kd_json_write_number(f, r->knn.top5[j]);
            fprintf(f, "}\n");
        }
    } else {
        for (int e = 0; e < c->linear.epochs; e++) {
            fprintf(f, "{\"epoch\": %d, \"train_loss\": ", e + 1);
            kd_json_write_number(f, epoch_loss[e]);
            fprintf(f, "}\n");
        }
        fprintf(f, "{\"epoch\": %d, \"top1\": ", c->linear.epochs);
        kd_json_write_number(f, r->linear.top1);
        fprintf(f, ", \"top5\": ");
        kd_json_write_number(f, r->linear.top5);
        fprintf(f, ", \"test_loss\": ");
        kd_json_write_number(f, r->linear.test_loss);
        fprintf(f, "}\n");
    }
    fclose(f);
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->out);
    kd_status s = kd_file_write_atomic(path, text, len);
    free(text);
    KD_TRY(s);
    /* summary.json */
    text = NULL;
    len = 0;
    f = open_memstream(&text, &len);
    if (!f) return kd_error(KD_ERR_NOMEM, "out of memory writing the summary");
    fprintf(f, "{\n  \"mode\": ");
    kd_json_write_string(f, kd__mode_name(c->mode));
    fprintf(f, ",\n  \"ckpt\": ");
    kd_json_write_string(f, c->ckpt);
    fprintf(f, ",\n  \"model\": ");
    kd_json_write_string(f, arch);
    fprintf(f, ",\n  \"data\": ");
    kd_json_write_string(f, c->data);
#define KD__NUM(k, v)               \
    fprintf(f, ",\n  \"" k "\": "); \
    kd_json_write_number(f, (double)(v));
    if (c->mode == KD_EVAL_KNN) {
        KD__NUM("top1", r->knn.top1[0]);
        KD__NUM("top5", r->knn.top5[0]);
        KD__NUM("k", c->k[0]);
        KD__NUM("temperature", c->temperature);
        fprintf(f, ",\n  \"knn\": [");
        for (int j = 0; j < c->n_k; j++) {
            fprintf(f, "%s{\"k\": %d, \"top1\": ", j ? ", " : "", c->k[j]);
            kd_json_write_number(f, r->knn.top1[j]);
            fprintf(f, ", \"top5\": ");
            kd_json_write_number(f, r->knn.top5[j]);
            fprintf(f, "}");
        }
        fprintf(f, "]");
    } else {
        KD__NUM("top1", r->linear.top1);
        KD__NUM("top5", r->linear.top5);
        KD__NUM("test_loss", r->linear.test_loss);
        KD__NUM("train_loss", r->linear.train_loss);
        KD__NUM("epochs", c->linear.epochs);
        KD__NUM("lr", c->linear.lr);
        KD__NUM("batch_size", c->linear.batch_size);
        KD__NUM("seed", c->linear.seed);
        KD__NUM("labeled_images", n_labeled);
    }
    KD__NUM("train_images", r->n_train);
    KD__NUM("test_images", r->n_test);
    KD__NUM("feature_dim", r->dim);
    KD__NUM("feature_s", r->feature_s);
    KD__NUM("wall_s", r->wall_s);
    KD__NUM("threads", kd_get_num_threads());
#undef KD__NUM
    fprintf(f, ",\n  \"backend\": ");
    kd_json_write_string(f, c->backend);
    fprintf(f, ",\n  \"kd_version\": ");
    kd_json_write_string(f, kd_version());
    fprintf(f, "\n}\n");
    fclose(f);
    snprintf(path, sizeof path, "%s/summary.json", c->out);
    s = kd_file_write_atomic(path, text, len);
    free(text);
    return s;
}

kd_status kd_eval_run(const kd_eval_cfg *c, kd_eval_result *res) {
    memset(res, 0, sizeof *res);
    const double t0 = kd__now_s();
    kd_status s = kd__eval_check(c);
    if (s != KD_OK) {
        res->config_error = 1;
        return s;
    }
    kd_set_num_threads(c->threads);
    kd_backend *be = NULL;
    kd_dataset *train = NULL, *test = NULL;
    kd_model *m = NULL;
    float *ftr = NULL, *fte = NULL;
    double *epoch_loss = NULL;
    kd__run_labels_out lo;
    memset(&lo, 0, sizeof lo);
    char arch[48] = "";
    if ((s = kd_backend_get(c->backend, &be)) != KD_OK) {
        res->config_error = 1;
        goto done;
    }
    if ((s = kd__eval_arch(c, arch, sizeof arch, &res->config_error)) != KD_OK) goto done;
    if ((s = kd_dataset_open(c->data, 1, &train)) != KD_OK) goto done;
    if ((s = kd_dataset_open(c->data, 0, &test)) != KD_OK) goto done;
    int classes = kd_dataset_num_classes(train);
    if (kd_dataset_num_classes(test) > classes) classes = kd_dataset_num_classes(test);
    /* The normalisation of the whole training split, as training and the
     * accuracy mode of kd eval use. */
    kd_transform_cfg tf = {.normalize = 1};
    kd_dataset_norm(train, tf.mean, tf.std);
    int64_t unl = 0;
    for (int64_t i = 0; i < kd_dataset_size(train); i++) unl += kd_dataset_label(train, i) < 0;
    if (unl) {
        res->config_error = 1;
        s = kd_error(KD_ERR_INVALID, "%s: %lld of the %lld training images have no label; %s evaluation needs labels",
                     c->data, (long long)unl, (long long)kd_dataset_size(train), kd__mode_name(c->mode));
        goto done;
    }
    if (c->labels[0]) { /* the classifier's training set, or kNN's bank */
        lo.n_split = kd_dataset_size(train);
        snprintf(lo.split_name, sizeof lo.split_name, "%s", kd_dataset_name(train));
        s = kd_dataset_label_subset(train, c->labels, c->linear.seed, &lo.idx, &lo.n);
        if (s != KD_OK) {
            res->config_error = 1;
            goto done;
        }
        kd_dataset *sub = NULL;
        if ((s = kd_dataset_select(train, lo.idx, lo.n, &sub)) != KD_OK) goto done;
        kd_dataset_free(train);
        train = sub;
    }
    if (c->mode == KD_EVAL_KNN) {
        for (int j = 0; j < c->n_k; j++)
            if (c->k[j] > kd_dataset_size(train)) {
                res->config_error = 1;
                s = kd_error(KD_ERR_INVALID, "k %d is larger than the training set of %s (%lld images%s)", c->k[j],
                             c->data, (long long)kd_dataset_size(train), c->labels[0] ? ", the labeled ones" : "");
                goto done;
            }
    }
    kd_model_cfg mc = {.in_channels = kd_dataset_channels(test), .num_classes = classes, .seed = 0};
    if (!strcmp(c->ckpt, KD_EVAL_RANDOM_INIT)) {
        mc.seed = c->linear.seed;
        if ((s = kd_model_create(arch, &mc, &m)) != KD_OK) goto done;
    } else if ((s = kd_model_load_new(c->ckpt, arch, &mc, &m)) != KD_OK) {
        goto done;
    }
    const double tf0 = kd__now_s();
    int64_t d1 = 0, d2 = 0;
    if ((s = kd_extract_features(m, be, train, c->eval_batch, &tf, &ftr, &d1)) != KD_OK) goto done;
    if ((s = kd_extract_features(m, be, test, c->eval_batch, &tf, &fte, &d2)) != KD_OK) goto done;
    res->feature_s = kd__now_s() - tf0;
    res->n_train = kd_dataset_size(train);
    res->n_test = kd_dataset_size(test);
    res->dim = d1;
    kd_log_msg(KD_LOG_INFO, "features of %lld training and %lld test images (%lld values each) in %.1f s",
               (long long)res->n_train, (long long)res->n_test, (long long)d1, res->feature_s);
    if (c->mode == KD_EVAL_KNN) {
        if ((s = kd_l2_normalize_rows(ftr, res->n_train, d1)) != KD_OK) goto done;
        if ((s = kd_l2_normalize_rows(fte, res->n_test, d1)) != KD_OK) goto done;
        kd_knn_cfg kc = {.train = ftr, .train_labels = kd_dataset_labels(train), .n_train = res->n_train, .dim = d1,
                         .classes = classes, .n_k = c->n_k, .temperature = c->temperature};
        memcpy(kc.k, c->k, sizeof kc.k);
        s = kd_knn_eval(&kc, fte, kd_dataset_labels(test), res->n_test, &res->knn);
    } else {
        epoch_loss = calloc((size_t)c->linear.epochs, sizeof *epoch_loss);
        if (!epoch_loss) {
            s = kd_error(KD_ERR_NOMEM, "out of memory");
            goto done;
        }
        s = kd_linear_eval(&c->linear, be, ftr, kd_dataset_labels(train), res->n_train, fte, kd_dataset_labels(test),
                           res->n_test, d1, classes, epoch_loss, NULL, NULL, &res->linear);
    }
    if (s != KD_OK) goto done;
    res->wall_s = kd__now_s() - t0;
    s = kd__eval_write(c, arch, res, epoch_loss, res->n_train, &lo);
done:
    free(lo.idx);
    free(epoch_loss);
    free(ftr);
    free(fte);
    kd_model_free(m);
    kd_dataset_free(test);
    kd_dataset_free(train);
    return s;
}
