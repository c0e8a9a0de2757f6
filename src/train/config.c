/* Run settings: one table drives command-line flags, YAML config files, the
 * resolved config.yaml of each run, and the --help text. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "kd/io.h"
#include "kd/train.h"

typedef enum { KD__T_STR, KD__T_INT, KD__T_I64, KD__T_U64, KD__T_FLOAT, KD__T_BOOL, KD__T_SCHED, KD__T_LIST, KD__T_OPTIM, KD__T_DOUBLE } kd__type;

typedef struct {
    const char *key;
    kd__type type;
    size_t off;
    size_t size; /* for strings */
    const char *help;
} kd__setting;

#define KD__S(key, type, field, help) {key, type, offsetof(kd_train_cfg, field), sizeof(((kd_train_cfg *)0)->field), help}

static const kd__setting kd__settings[] = {
    KD__S("data", KD__T_STR, data, "dataset directory or spec (idx:, cifar10:, cifar100:, stl10:, folder:DIR, list:FILE)"),
    KD__S("train_subset", KD__T_I64, train_subset, "use a class-balanced subset of N training images (0: all)"),
    KD__S("labels", KD__T_STR, labels,
          "labeled subset of the training set, seeded and class-balanced: P% of each class, N per class, or a "
          "file of dataset indices (a run's labels.txt); methods that need labels train on it, those with "
          "optional labels see the rest unlabeled (empty: all labels)"),
    KD__S("train_indices", KD__T_STR, train_indices,
          "train on these training images only: a file of dataset indices (kd select's output; empty: all), "
          "after labels marked the labeled ones; with unlabeled, its images are numbered after the training "
          "split's"),
    KD__S("unlabeled", KD__T_STR, unlabeled,
          "extra unlabeled images in every epoch: a dataset spec or directory as for data (stl10:DIR reads its "
          "unlabeled_X.bin, an image folder its unlabeled/ or all its images, any other dataset its training "
          "images without labels); for methods with optional or no labels; normalisation stays that of the "
          "labeled training split (empty: none)"),
    KD__S("pad_crop", KD__T_INT, pad_crop, "random-crop padding in pixels (-1: 4 for 32x32, 2 for smaller)"),
    KD__S("hflip", KD__T_BOOL, hflip, "random horizontal flip (0/1)"),
    KD__S("workers", KD__T_INT, workers, "data-loading threads (0: in the training thread)"),
    KD__S("image_size", KD__T_INT, image_size, "output side for image folders of varying size (0: the images' own size)"),
    KD__S("resize", KD__T_INT, resize, "shorter side before the centre crop (0: image_size)"),
    KD__S("skip_bad_images", KD__T_BOOL, skip_bad_images, "replace unreadable training images by the next readable one (0/1)"),
    KD__S("model", KD__T_STR, model, "model to train (the student when distilling)"),
    KD__S("teacher", KD__T_STR, teacher, "teacher architecture (default: from the checkpoint)"),
    KD__S("teacher_ckpt", KD__T_STR, teacher_ckpt, "teacher weights (safetensors, PyTorch names)"),
    KD__S("init_ckpt", KD__T_STR, init_ckpt, "initial weights for the model (optional)"),
    KD__S("ft_proj_selector", KD__T_INT, ft_proj_selector,
          "SimCLRv2 fine-tuning: the classifier sits on layer k of the SimCLRv2 projection head that init_ckpt "
          "(kd pretrain's encoder.safetensors) holds, the head layers train with the network; 0: on the "
          "embedding, 1: the paper's 1% labels setting, 2"),
    KD__S("method", KD__T_STR, distill.method, "distillation method (`kd distill --method list`); its settings are <method>.<name>"),
    KD__S("gamma", KD__T_FLOAT, distill.gamma, "cross-entropy weight (default: the method's)"),
    KD__S("alpha", KD__T_FLOAT, distill.alpha, "KL soft-label weight (default: the method's)"),
    KD__S("beta", KD__T_FLOAT, distill.beta, "method-term weight (default: the method's)"),
    KD__S("T", KD__T_FLOAT, distill.T, "distillation temperature (default: the method's)"),
    KD__S("label_smoothing", KD__T_FLOAT, distill.label_smoothing, "label smoothing of the cross-entropy"),
    KD__S("epochs", KD__T_INT, epochs, "training epochs"),
    KD__S("batch_size", KD__T_INT, batch_size, "mini-batch size; the global batch: under mpirun -np N each rank takes batch_size/N of it"),
    KD__S("lr", KD__T_FLOAT, lr, "base learning rate"),
    KD__S("momentum", KD__T_DOUBLE, momentum, "SGD momentum"),
    KD__S("weight_decay", KD__T_DOUBLE, weight_decay, "L2 weight decay"),
    KD__S("nesterov", KD__T_BOOL, nesterov, "Nesterov momentum (0/1)"),
    KD__S("optimizer", KD__T_OPTIM, optimizer, "sgd, adamw or lars"),
    KD__S("adam_beta1", KD__T_DOUBLE, adam_beta1, "AdamW beta1"),
    KD__S("adam_beta2", KD__T_DOUBLE, adam_beta2, "AdamW beta2"),
    KD__S("adam_eps", KD__T_DOUBLE, adam_eps, "AdamW epsilon"),
    KD__S("lars_trust", KD__T_DOUBLE, lars_trust, "LARS trust coefficient (eta)"),
    KD__S("no_decay_bn_bias", KD__T_BOOL, no_decay_bn_bias, "no weight decay (nor LARS adaptation) on batch-norm parameters and biases (0/1)"),
    KD__S("clip_grad_norm", KD__T_DOUBLE, clip_grad_norm, "clip the global gradient L2 norm to this (0: off)"),
    KD__S("sync_bn", KD__T_BOOL, sync_bn, "under mpirun: batch norm with the statistics of the global batch, not each rank's share (0/1)"),
    KD__S("schedule", KD__T_SCHED, sched.kind, "learning-rate schedule: constant, multistep, cosine"),
    KD__S("milestones", KD__T_LIST, sched.milestones, "multistep epochs, comma-separated (e.g. 150,180,210)"),
    KD__S("lr_decay", KD__T_FLOAT, sched.gamma, "multistep factor"),
    KD__S("warmup_epochs", KD__T_INT, sched.warmup_epochs, "linear warm-up epochs"),
    KD__S("min_lr", KD__T_FLOAT, sched.min_lr, "cosine floor"),
    KD__S("seed", KD__T_U64, seed, "random seed (weights, data order, augmentation)"),
    KD__S("threads", KD__T_INT, threads, "compute threads (0: all cores)"),
    KD__S("backend", KD__T_STR, backend, "compute backend: cpu (oneDNN) or ref (plain C)"),
    KD__S("precision", KD__T_STR, precision, "convolution arithmetic and activations: f32, or bf16 (AVX-512-BF16/AMX; float32 weights, gradients, evaluation and stems on fewer than 16 channels)"),
    KD__S("out", KD__T_STR, out, "run directory"),
    KD__S("progress", KD__T_INT, progress, "-1: bar on a terminal; 0: log lines; 1: bar"),
    KD__S("log_every", KD__T_INT, log_every, "steps between step records in metrics.jsonl (0: none)"),
    KD__S("eval_batch", KD__T_INT, eval_batch, "evaluation batch size"),
    KD__S("eval_every", KD__T_INT, eval_every,
          "evaluate on the test split every N epochs and after the last one (training is the same for any N)"),
    KD__S("max_steps_per_epoch", KD__T_I64, max_steps_per_epoch, "cut epochs short (0: whole epochs)"),
    KD__S("stop_after", KD__T_INT, stop_after, "pause after N epochs of this invocation; --resume continues (0: never)"),
    KD__S("allow_thread_change", KD__T_BOOL, allow_thread_change,
          "let --resume use another thread count than the checkpoint's; the result is then NOT bit-identical "
          "to an uninterrupted run (0/1)"),
};
#define KD__NSET ((int)(sizeof kd__settings / sizeof kd__settings[0]))

const kd_setting_doc *kd_train_settings(int *n) {
    static kd_setting_doc docs[KD__NSET];
    for (int i = 0; i < KD__NSET; i++) docs[i] = (kd_setting_doc){kd__settings[i].key, kd__settings[i].help};
    *n = KD__NSET;
    return docs;
}

void kd_train_cfg_defaults(kd_train_cfg *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->data, sizeof c->data, "/usr/share/datasets/fashion-mnist");
    c->pad_crop = -1;
    c->hflip = 1;
    c->workers = 1;
    snprintf(c->model, sizeof c->model, "resnet8");
    snprintf(c->distill.method, sizeof c->distill.method, "none");
    c->distill.gamma = c->distill.alpha = c->distill.beta = c->distill.T = NAN;
    c->epochs = 240;
    c->batch_size = 64;
    c->lr = 0.05f;
    c->momentum = 0.9;
    c->weight_decay = 5e-4;
    c->optimizer = KD_OPTIM_SGD;
    c->adam_beta1 = 0.9;
    c->adam_beta2 = 0.999;
    c->adam_eps = 1e-8;
    c->lars_trust = 1e-3;
    c->sched.kind = KD_SCHED_MULTISTEP;
    c->sched.milestones[0] = 150;
    c->sched.milestones[1] = 180;
    c->sched.milestones[2] = 210;
    c->sched.n_milestones = 3;
    c->sched.gamma = 0.1f;
    c->seed = 0;
    c->threads = 0;
    snprintf(c->backend, sizeof c->backend, "cpu");
    snprintf(c->precision, sizeof c->precision, "f32");
    snprintf(c->out, sizeof c->out, "runs/latest");
    c->progress = -1;
    c->log_every = 50;
    c->eval_batch = 256;
    c->eval_every = 1;
}

static const kd__setting *kd__find(const char *key) {
    for (int i = 0; i < KD__NSET; i++)
        if (strcmp(kd__settings[i].key, key) == 0) return &kd__settings[i];
    return NULL;
}

static kd_status kd__parse_i64(const char *key, const char *v, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    while (end && isspace((unsigned char)*end)) end++;
    if (!*v || errno || *end || x < lo || x > hi)
        return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s: expected an integer in %lld..%lld", v, key, lo, hi);
    *out = x;
    return KD_OK;
}

static kd_status kd__parse_float(const char *key, const char *v, float *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    while (end && isspace((unsigned char)*end)) end++;
    if (!*v || errno || *end || !isfinite(x))
        return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s: expected a finite number", v, key);
    *out = (float)x;
    return KD_OK;
}

kd_optim_cfg kd_train_cfg_optim(const kd_train_cfg *c) {
    kd_optim_cfg o = kd_optim_defaults(c->optimizer);
    o.lr = c->lr;
    o.momentum = c->momentum;
    o.nesterov = c->nesterov;
    o.weight_decay = c->weight_decay;
    o.beta1 = c->adam_beta1;
    o.beta2 = c->adam_beta2;
    o.eps = c->adam_eps;
    o.trust_coef = c->lars_trust;
    o.no_decay_norm_bias = c->no_decay_bn_bias;
    o.clip_grad_norm = c->clip_grad_norm;
    return o;
}

kd_status kd_train_cfg_set(kd_train_cfg *c, const char *key, const char *value) {
    /* "<method>.<setting>": the method's own table checks it at resolve. */
    if (strchr(key, '.')) return kd_distill_cfg_set_arg(&c->distill, key, value);
    const kd__setting *s = kd__find(key);
    if (!s) return kd_error(KD_ERR_NOT_FOUND, "unknown setting '%s'", key);
    void *p = (char *)c + s->off;
    long long x;
    switch (s->type) {
    case KD__T_STR:
        if (strlen(value) >= s->size)
            return kd_error(KD_ERR_INVALID, "value for %s is too long (%zu characters, at most %zu)", key,
                            strlen(value), s->size - 1);
        if (!strcmp(key, "precision") && strcmp(value, "f32") && strcmp(value, "bf16"))
            return kd_error(KD_ERR_INVALID, "invalid value '%s' for precision: expected f32 or bf16", value);
        if (!strcmp(key, "labels")) KD_TRY(kd_label_spec_parse(value, NULL));
        memcpy(p, value, strlen(value) + 1);
        return KD_OK;
    case KD__T_INT:
        KD_TRY(kd__parse_i64(key, value, -1, 1000000000LL, &x));
        *(int *)p = (int)x;
        return KD_OK;
    case KD__T_I64:
        KD_TRY(kd__parse_i64(key, value, 0, INT64_MAX, &x));
        *(int64_t *)p = x;
        return KD_OK;
    case KD__T_U64: {
        char *end;
        errno = 0;
        if (!*value || value[0] == '-') return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s: expected an unsigned integer", value, key);
        unsigned long long u = strtoull(value, &end, 10);
        if (errno || *end) return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s: expected an unsigned integer", value, key);
        *(uint64_t *)p = u;
        return KD_OK;
    }
    case KD__T_FLOAT:
        return kd__parse_float(key, value, (float *)p);
    case KD__T_DOUBLE: {
        char *end;
        errno = 0;
        double x = strtod(value, &end);
        while (end && isspace((unsigned char)*end)) end++;
        if (!*value || errno || *end || !isfinite(x))
            return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s: expected a finite number", value, key);
        *(double *)p = x;
        return KD_OK;
    }
    case KD__T_BOOL:
        if (!strcmp(value, "1") || !strcmp(value, "true") || !strcmp(value, "yes")) *(int *)p = 1;
        else if (!strcmp(value, "0") || !strcmp(value, "false") || !strcmp(value, "no")) *(int *)p = 0;
        else return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s: expected 0 or 1", value, key);
        return KD_OK;
    case KD__T_SCHED:
        /* An unknown value is a bad value, not an unknown setting. */
        if (kd_sched_kind_parse(value, (kd_sched_kind *)p) != KD_OK)
            return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s: expected constant, multistep or cosine", value, key);
        return KD_OK;
    case KD__T_OPTIM:
        if (kd_optim_kind_parse(value, (kd_optim_kind *)p) != KD_OK)
            return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s: expected sgd, adamw or lars", value, key);
        return KD_OK;
    case KD__T_LIST: {
        int n = 0, v[KD_MAX_MILESTONES];
        const char *q = value;
        while (*q) {
            if (n == KD_MAX_MILESTONES) return kd_error(KD_ERR_INVALID, "%s: at most %d values", key, KD_MAX_MILESTONES);
            char *end;
            errno = 0;
            long e = strtol(q, &end, 10);
            if (end == q || errno || e < 0 || e > 1000000 || (*end && *end != ','))
                return kd_error(KD_ERR_INVALID, "invalid value '%s' for %s: expected comma-separated epochs", value, key);
            v[n++] = (int)e;
            q = *end ? end + 1 : end;
        }
        memcpy(c->sched.milestones, v, sizeof(int) * (size_t)n);
        c->sched.n_milestones = n;
        return KD_OK;
    }
    }
    return kd_error(KD_ERR_INTERNAL, "setting %s has no parser", key);
}

kd_status kd_train_cfg_get(const kd_train_cfg *c, const char *key, char *buf, size_t n) {
    const kd__setting *s = kd__find(key);
    if (!s) return kd_error(KD_ERR_NOT_FOUND, "unknown setting '%s'", key);
    const void *p = (const char *)c + s->off;
    switch (s->type) {
    case KD__T_STR: snprintf(buf, n, "%s", (const char *)p); break;
    case KD__T_INT: case KD__T_BOOL: snprintf(buf, n, "%d", *(const int *)p); break;
    case KD__T_I64: snprintf(buf, n, "%lld", (long long)*(const int64_t *)p); break;
    case KD__T_U64: snprintf(buf, n, "%llu", (unsigned long long)*(const uint64_t *)p); break;
    case KD__T_FLOAT: {
        float f = *(const float *)p;
        if (isnan(f)) snprintf(buf, n, "default");
        else snprintf(buf, n, "%.9g", f);
        break;
    }
    case KD__T_SCHED: snprintf(buf, n, "%s", kd_sched_kind_name(*(const kd_sched_kind *)p)); break;
    case KD__T_OPTIM: snprintf(buf, n, "%s", kd_optim_kind_name(*(const kd_optim_kind *)p)); break;
    case KD__T_DOUBLE: {
        /* The shortest text that reads back to the same double. */
        double v = *(const double *)p;
        for (int prec = 6; prec <= 17; prec++) {
            snprintf(buf, n, "%.*g", prec, v);
            if (strtod(buf, NULL) == v) break;
        }
        break;
    }
    case KD__T_LIST: {
        size_t off = 0;
        buf[0] = '\0';
        for (int i = 0; i < c->sched.n_milestones && off < n; i++)
            off += (size_t)snprintf(buf + off, n - off, i ? ",%d" : "%d", c->sched.milestones[i]);
        break;
    }
    }
    return KD_OK;
}

kd_status kd_train_cfg_resolve(kd_train_cfg *c) {
    KD_TRY(kd_distill_cfg_check(&c->distill));
    const kd_method_def *m = kd_method_find(c->distill.method);
    if (isnan(c->distill.gamma)) c->distill.gamma = m->gamma;
    if (isnan(c->distill.alpha)) c->distill.alpha = m->alpha;
    if (isnan(c->distill.beta)) c->distill.beta = m->beta;
    if (isnan(c->distill.T)) c->distill.T = m->T;
    c->distill.seed = c->seed;
    if (!kd_model_exists(c->model)) {
        kd_model_cfg mc = {.in_channels = 1, .num_classes = 1, .seed = 0};
        kd_model *tmp = NULL;
        return kd_model_create(c->model, &mc, &tmp); /* fails with the list of names */
    }
    if (c->teacher[0] && !kd_model_exists(c->teacher)) {
        kd_model_cfg mc = {.in_channels = 1, .num_classes = 1, .seed = 0};
        kd_model *tmp = NULL;
        kd_model_create(c->teacher, &mc, &tmp);
        return kd_error(KD_ERR_NOT_FOUND, "teacher: %s", kd_last_error());
    }
    if (kd_distill_needs_teacher(&c->distill) && !c->teacher_ckpt[0])
        return kd_error(KD_ERR_INVALID, "method '%s' needs a teacher: set teacher_ckpt (--teacher-ckpt FILE)", m->name);
    if (c->epochs < 1) return kd_error(KD_ERR_INVALID, "epochs must be >= 1, got %d", c->epochs);
    if (c->batch_size < 1) return kd_error(KD_ERR_INVALID, "batch_size must be >= 1, got %d", c->batch_size);
    if (c->eval_batch < 1) return kd_error(KD_ERR_INVALID, "eval_batch must be >= 1, got %d", c->eval_batch);
    if (c->eval_every < 1) return kd_error(KD_ERR_INVALID, "eval_every must be >= 1, got %d", c->eval_every);
    if (!(c->lr > 0)) return kd_error(KD_ERR_INVALID, "lr must be > 0, got %g", c->lr);
    if (c->image_size < 0 || c->resize < 0)
        return kd_error(KD_ERR_INVALID, "image_size %d and resize %d must be >= 0", c->image_size, c->resize);
    if (c->workers < 0) return kd_error(KD_ERR_INVALID, "workers must be >= 0, got %d", c->workers);
    if (!c->out[0]) return kd_error(KD_ERR_INVALID, "out (run directory) is empty");
    if (c->ft_proj_selector < 0 || c->ft_proj_selector > 2)
        return kd_error(KD_ERR_INVALID, "ft_proj_selector %d must be 0 (the classifier on the embedding), 1 or 2 "
                        "(on that layer of the SimCLRv2 projection head)", c->ft_proj_selector);
    if (c->ft_proj_selector > 0 && !c->init_ckpt[0])
        return kd_error(KD_ERR_INVALID, "ft_proj_selector %d fine-tunes from a pretrained projection head: set "
                        "init_ckpt to the encoder.safetensors of `kd pretrain --method simclr`", c->ft_proj_selector);
    const kd_method_def *tid = c->train_indices[0] && c->labels[0] ? kd_method_find(c->distill.method) : NULL;
    if (tid && tid->labels == KD_LABELS_REQUIRED)
        return kd_error(KD_ERR_INVALID, "train_indices %s with labels %s: method '%s' trains on the labeled images "
                        "alone; train_indices serves methods with optional labels (ssld, simclrv2)",
                        c->train_indices, c->labels, tid->name);
    const kd_method_def *um = c->unlabeled[0] ? kd_method_find(c->distill.method) : NULL;
    if (um && um->labels == KD_LABELS_REQUIRED)
        return kd_error(KD_ERR_INVALID, "unlabeled %s: method '%s' needs a label on every training image; the "
                        "unlabeled setting serves methods with optional or no labels (simclrv2, ssld, seed, "
                        "kd pretrain's)", c->unlabeled, um->name);
    if (c->train_indices[0] && c->train_subset > 0)
        return kd_error(KD_ERR_INVALID, "train_subset %lld and train_indices %s cannot be combined: the indices are "
                        "of the whole training split (set train_subset 0)", (long long)c->train_subset,
                        c->train_indices);
    if (c->labels[0] && c->train_subset > 0)
        return kd_error(KD_ERR_INVALID, "train_subset %lld and labels %s cannot be combined: labels picks from the "
                        "whole training split (set train_subset 0)", (long long)c->train_subset, c->labels);
    for (int i = 1; i < c->sched.n_milestones; i++)
        if (c->sched.milestones[i] <= c->sched.milestones[i - 1])
            return kd_error(KD_ERR_INVALID, "milestones must increase, got %d after %d", c->sched.milestones[i],
                            c->sched.milestones[i - 1]);
    c->sched.base_lr = c->lr;
    c->sched.epochs = c->epochs;
    return KD_OK;
}

static void kd__save_arg(void *user, const char *key, const char *value, const char *help) {
    FILE *f = user;
    fprintf(f, "%s: ", key);
    kd_json_write_string(f, value);
    fputc('\n', f);
}

kd_status kd_train_cfg_save(const kd_train_cfg *c, const char *path) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return kd_error(KD_ERR_NOMEM, "out of memory writing %s", path);
    fprintf(f, "# kd %s run settings; `kd train --config %s` repeats this run.\n", kd_version(), path);
    for (int i = 0; i < KD__NSET; i++) {
        char v[600];
        kd_train_cfg_get(c, kd__settings[i].key, v, sizeof v);
        fprintf(f, "%s: ", kd__settings[i].key);
        kd_json_write_string(f, v); /* a JSON string is a valid YAML double-quoted scalar */
        fputc('\n', f);
    }
    /* The method's own settings, every one resolved (override or default). */
    kd_distill_cfg_visit(&c->distill, kd__save_arg, f);
    fclose(f);
    kd_status s = kd_file_write_atomic(path, text, len);
    free(text);
    return s;
}

kd_status kd_train_cfg_load(kd_train_cfg *c, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return kd_error(KD_ERR_IO, "cannot open config %s: %s", path, strerror(errno));
    yaml_parser_t parser;
    yaml_event_t ev;
    if (!yaml_parser_initialize(&parser)) {
        fclose(f);
        return kd_error(KD_ERR_NOMEM, "cannot initialise the YAML parser");
    }
    yaml_parser_set_input_file(&parser, f);
    kd_status st = KD_OK;
    int depth = 0, expect_key = 1, done = 0;
    char key[128] = "";
    while (!done && st == KD_OK) {
        if (!yaml_parser_parse(&parser, &ev)) {
            st = kd_error(KD_ERR_FORMAT, "%s:%zu: %s", path, parser.problem_mark.line + 1,
                          parser.problem ? parser.problem : "malformed YAML");
            break;
        }
        switch (ev.type) {
        case YAML_MAPPING_START_EVENT:
            if (++depth > 1) st = kd_error(KD_ERR_FORMAT, "%s:%zu: nested mappings are not settings", path, ev.start_mark.line + 1);
            break;
        case YAML_MAPPING_END_EVENT: depth--; break;
        case YAML_SEQUENCE_START_EVENT:
            st = kd_error(KD_ERR_FORMAT, "%s:%zu: write lists as \"a,b,c\"", path, ev.start_mark.line + 1);
            break;
        case YAML_SCALAR_EVENT: {
            const char *v = (const char *)ev.data.scalar.value;
            if (depth != 1) {
                st = kd_error(KD_ERR_FORMAT, "%s: expected a mapping of settings", path);
            } else if (expect_key) {
                snprintf(key, sizeof key, "%s", v);
                expect_key = 0;
            } else {
                expect_key = 1;
                /* "default" keeps a loss weight at the method's value. */
                if (strcmp(v, "default") == 0) break;
                if (kd_train_cfg_set(c, key, v) != KD_OK)
                    st = kd_error(KD_ERR_INVALID, "%s:%zu: %s", path, ev.start_mark.line + 1, kd_last_error());
            }
            break;
        }
        case YAML_STREAM_END_EVENT: done = 1; break;
        default: break;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&parser);
    fclose(f);
    return st;
}
