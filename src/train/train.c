/* The training loop shared by supervised training and every distillation
 * method: data, teacher forward without gradients, student forward and
 * backward, the distiller's loss, SGD, evaluation, checkpoints, resume,
 * metrics.jsonl, summary.json and a progress display. */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kd/io.h"
#include "kd/dist.h"
#include "kd/train.h"
#include "train/dp_impl.h"
#include "train/train_impl.h"

static double kd__now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ----------------------------------------------------------- the run */


/* Per-epoch sums of the named loss terms (each weighted by the batch size),
 * in the order the method returns them; names are the method's static strings. */
typedef struct {
    int n, cap;
    const char **name;
    double *sum;
} kd__term_sums;

static kd_status kd__terms_add(kd__term_sums *ts, const kd_step_result *sr, double w) {
    for (int i = 0; i < sr->n_terms; i++) {
        int k = 0;
        while (k < ts->n && strcmp(ts->name[k], sr->term_names[i])) k++;
        if (k == ts->n) {
            if (ts->n == ts->cap) {
                int nc = ts->cap ? 2 * ts->cap : 8;
                const char **nn = realloc(ts->name, (size_t)nc * sizeof *nn);
                if (!nn) return kd_error(KD_ERR_NOMEM, "out of memory");
                ts->name = nn;
                double *ns = realloc(ts->sum, (size_t)nc * sizeof *ns);
                if (!ns) return kd_error(KD_ERR_NOMEM, "out of memory");
                ts->sum = ns;
                ts->cap = nc;
            }
            ts->name[k] = sr->term_names[i];
            ts->sum[k] = 0;
            ts->n++;
        }
        ts->sum[k] += sr->term_values[i] * w;
    }
    return KD_OK;
}

/* "ce 0.4123 kl 1.2345" of the epoch means. */
static void kd__terms_text(const kd__term_sums *ts, int64_t seen, char *buf, size_t n) {
    size_t off = 0;
    buf[0] = '\0';
    for (int i = 0; i < ts->n && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, "%s%s %.4f", i ? " " : "", ts->name[i],
                                seen ? ts->sum[i] / (double)seen : 0.0);
}

static void kd__terms_free(kd__term_sums *ts) {
    free(ts->name);
    free(ts->sum);
    memset(ts, 0, sizeof *ts);
}

typedef struct {
    kd_train_cfg c;
    kd_backend *be;
    kd_dataset *train, *test;
    kd_model *student, *teacher;
    kd_trainer *tr;
    kd_loader *loader;
    FILE *metrics;
    kd_transform_cfg tf;
    int start_epoch;
    int64_t steps_per_epoch;
    double best_top1, wall_before, train_time_before;
    int best_epoch;
    int64_t images_before;
    int bar;
    kd__term_sums ep_terms;  /* this epoch's term sums (values times images) */
    int64_t ep_seen;         /* images of the last finished epoch (ep_terms stays until the next one starts) */
    int config_error;        /* the method refused the settings or the pair at setup */
    kd__run_labels_out labels; /* the `labels` subset (labels_run.c) */
    int64_t n_unlabeled;       /* images the `unlabeled` setting added to the training set */
    /* Data parallelism (data_parallel.c): ranks, and whether this process
     * writes the run directory (rank 0); no_shard: kd__open_loader makes a
     * loader of whole batches. */
    int nranks, writer, no_shard;
} kd__run;

static void kd__run_free(kd__run *r) {
    if (r->metrics) fclose(r->metrics);
    kd__terms_free(&r->ep_terms);
    kd_trainer_free(r->tr);
    kd_loader_free(r->loader);
    kd_model_free(r->teacher);
    kd_model_free(r->student);
    kd_dataset_free(r->test);
    kd_dataset_free(r->train);
    free(r->labels.idx);
}

static void kd__path(char *buf, size_t n, const char *dir, const char *file) { snprintf(buf, n, "%s/%s", dir, file); }

static kd_status kd__save_last(kd__run *r, int epochs_done, double wall, double train_time, int64_t images) {
    kd_st_writer *w = NULL;
    KD_TRY(kd_st_writer_init(&w));
    kd_status s = kd__ckpt_add_model(w, r->student);
    if (s == KD_OK) s = kd_trainer_save_state(r->tr, w);
    char v[64];
#define KD__META(k, fmt, val)                                   \
    if (s == KD_OK) {                                           \
        snprintf(v, sizeof v, fmt, val);                        \
        s = kd_st_writer_set_meta(w, k, v);                     \
    }
    KD__META("epochs_done", "%d", epochs_done);
    KD__META("best_top1", "%.17g", r->best_top1);
    KD__META("best_epoch", "%d", r->best_epoch);
    KD__META("wall_s", "%.17g", wall);
    KD__META("train_s", "%.17g", train_time);
    KD__META("train_images", "%lld", (long long)images);
    KD__META("threads", "%d", kd_get_num_threads());
    KD__META("ranks", "%d", r->nranks);
#undef KD__META
    char path[600];
    kd__path(path, sizeof path, r->c.out, "last.safetensors");
    if (s == KD_OK) s = kd_st_writer_save(w, path);
    kd_st_writer_free(w);
    return s;
}

static kd_status kd__load_last(kd__run *r) {
    char path[600];
    kd__path(path, sizeof path, r->c.out, "last.safetensors");
    kd_st_file *f = NULL;
    KD_TRY(kd_st_open(path, &f));
    kd_status s = kd__model_load_from(r->student, f);
    if (s == KD_OK) s = kd_trainer_load_state(r->tr, f);
    const char *ed = kd_st_meta(f, "epochs_done");
    if (s == KD_OK && !ed)
        s = kd_error(KD_ERR_FORMAT, "%s is not a training checkpoint (no epochs_done)", path);
    if (s == KD_OK) {
        r->start_epoch = atoi(ed);
        const char *v;
        if ((v = kd_st_meta(f, "best_top1"))) r->best_top1 = atof(v);
        if ((v = kd_st_meta(f, "best_epoch"))) r->best_epoch = atoi(v);
        if ((v = kd_st_meta(f, "wall_s"))) r->wall_before = atof(v);
        if ((v = kd_st_meta(f, "train_s"))) r->train_time_before = atof(v);
        if ((v = kd_st_meta(f, "train_images"))) r->images_before = atoll(v);
    }
    kd_st_close(f);
    return s;
}

static void kd__progress(kd__run *r, int epoch, int64_t step, int64_t steps, double loss, float lr, double ips) {
    if (!r->bar) return;
    int width = 30, fill = (int)(width * (step + 1) / (steps ? steps : 1));
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '=' : (i == fill ? '>' : ' ');
    bar[width] = '\0';
    fprintf(stderr, "\repoch %d/%d [%s] %lld/%lld loss %.4f lr %.4g %.0f img/s ", epoch + 1, r->c.epochs, bar,
            (long long)(step + 1), (long long)steps, loss, lr, ips);
    fflush(stderr);
}

/* Flushes metrics.jsonl to the file system and to the disk. */
static kd_status kd__metrics_sync(FILE *f, const char *dir) {
    if (fflush(f) != 0 || fsync(fileno(f)) != 0)
        return kd_error(KD_ERR_IO, "cannot write %s/metrics.jsonl: %s", dir, strerror(errno));
    return KD_OK;
}

/* On resume, drops the records of epochs after the checkpoint (an
 * interrupted epoch's step lines, the record of an epoch whose checkpoint was
 * not written, or a line cut short by a kill). */
static kd_status kd__metrics_truncate(const char *path, int epochs_done) {
    void *data = NULL;
    size_t n = 0;
    if (!kd_file_exists(path)) return KD_OK;
    KD_TRY(kd_file_read_all(path, &data, &n));
    char *text = data, *out = malloc(n + 1);
    if (!out) {
        free(data);
        return kd_error(KD_ERR_NOMEM, "out of memory reading %s", path);
    }
    size_t m = 0;
    for (char *line = text; line < text + n;) {
        char *end = memchr(line, '\n', (size_t)(text + n - line));
        size_t len = end ? (size_t)(end - line) + 1 : (size_t)(text + n - line);
        const char *e = strstr(line, "\"epoch\": ");
        int keep = e && e < line + len && atoi(e + 9) <= epochs_done;
        if (keep && end) {
            memcpy(out + m, line, len);
            m += len;
        }
        line += len;
    }
    free(data);
    kd_status s = kd_file_write_atomic(path, out, m);
    free(out);
    return s;
}

/* The training loader: the method's views (transforms from its
 * view_transform hook applied to the run's, r->tf) once the trainer exists;
 * before that, its views with the run's transform. */
static kd_status kd__open_loader(kd__run *r) {
    const kd_train_cfg *c = &r->c;
    const kd_method_def *mdef = kd_method_find(c->distill.method);
    kd_loader_cfg lc = {.batch_size = c->batch_size, .shuffle = 1, .drop_last = mdef && mdef->min_batch > 1,
                        .seed = c->seed,
                        .num_workers = c->workers, .skip_bad = c->skip_bad_images, .transform = r->tf};
    if (r->nranks > 1 && !r->no_shard) { /* this rank's rows of every global batch */
        lc.shard_rank = kd_dist_rank();
        lc.shard_count = r->nranks;
    }
    if (!r->tr) {
        const kd_method_def *def = kd_method_find(c->distill.method);
        lc.n_views = def ? def->views : 1;
        return kd_loader_init(&r->loader, r->train, &lc);
    }
    lc.n_views = kd_trainer_num_views(r->tr);
    kd_transform_cfg *tfs = calloc((size_t)lc.n_views, sizeof *tfs);
    if (!tfs) return kd_error(KD_ERR_NOMEM, "out of memory");
    kd_status s = kd_trainer_view_transforms(r->tr, &r->tf, tfs);
    lc.view_transforms = tfs;
    if (s == KD_OK) s = kd_loader_init(&r->loader, r->train, &lc);
    free(tfs); /* the loader keeps its own copy */
    return s;
}

/* kd_trainer_init; a method that refuses its settings or the pair marks the
 * failure as a configuration error (the CLI exits 2). */
static kd_status kd__trainer_init(kd__run *r, const kd_trainer_cfg *tc) {
    kd_status s = kd_trainer_init(&r->tr, tc);
    r->config_error = s == KD_ERR_SHAPE || s == KD_ERR_INVALID;
    return s;
}

/* A resume continues bit-identically only with the thread count the
 * checkpoint was written with (reductions split by thread). Another count is
 * refused unless allow_thread_change is set. Checkpoints without the record
 * (older kd) are accepted. */
static kd_status kd__check_threads(const kd_train_cfg *c) {
    char path[600];
    kd__path(path, sizeof path, c->out, "last.safetensors");
    if (!kd_file_exists(path)) return KD_OK;
    kd_st_file *f = NULL;
    KD_TRY(kd_st_open(path, &f));
    const char *v = kd_st_meta(f, "threads");
    int was = v ? atoi(v) : 0, now = kd_get_num_threads();
    kd_st_close(f);
    if (!v || was == now) return KD_OK;
    if (!c->allow_thread_change)
        return kd_error(KD_ERR_INVALID,
                        "%s was trained with %d compute threads, this resume would use %d: it continues "
                        "bit-identically only with the same count; pass --threads %d, or "
                        "--allow-thread-change 1 to go on with %d threads (the result is then no longer "
                        "bit-identical to an uninterrupted run)",
                        c->out, was, now, was, now);
    kd_log_msg(KD_LOG_WARN,
               "%s: resuming with %d compute threads instead of the checkpoint's %d "
               "(allow_thread_change): the result is no longer bit-identical to an uninterrupted run",
               c->out, now, was);
    return KD_OK;
}

/* Removes the temporary files ("<name>.tmp.<pid>", kd_file_write_atomic) that
 * a killed process left in the run directory: those of a process that no
 * longer runs. */
static kd_status kd__remove_stale_tmp(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return kd_error(KD_ERR_IO, "cannot list %s: %s", dir, strerror(errno));
    kd_status s = KD_OK;
    struct dirent *e;
    while (s == KD_OK && (e = readdir(d))) {
        const char *t = strstr(e->d_name, ".tmp.");
        if (!t || t == e->d_name) continue;
        const char *p = t + 5;
        char *end;
        errno = 0;
        long pid = strtol(p, &end, 10);
        if (p[0] < '0' || p[0] > '9' || *end || errno || pid <= 0) continue;
        if (pid != (long)getpid() && (kill((pid_t)pid, 0) == 0 || errno != ESRCH)) continue;
        char path[1200];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (unlink(path) != 0 && errno != ENOENT)
            s = kd_error(KD_ERR_IO, "cannot remove the stale temporary file %s: %s", path, strerror(errno));
        else
            kd_log_msg(KD_LOG_INFO, "removed %s, left by an interrupted run", path);
    }
    closedir(d);
    return s;
}

/* A resume continues with the number of ranks the checkpoint was written
 * with (the shards of every batch, and so the trajectory, depend on it);
 * checkpoints without the record were written by one process. */
static kd_status kd__check_ranks(kd__run *r) {
    char path[600];
    kd__path(path, sizeof path, r->c.out, "last.safetensors");
    if (!kd_file_exists(path)) return KD_OK;
    kd_st_file *f = NULL;
    KD_TRY(kd_st_open(path, &f));
    const char *v = kd_st_meta(f, "ranks");
    int was = v ? atoi(v) : 1;
    kd_st_close(f);
    if (was == r->nranks) return KD_OK;
    r->config_error = 1;
    return kd_error(KD_ERR_INVALID,
                    "%s was trained by %d rank%s, this resume runs %d: a run continues only with the number of "
                    "ranks it started with (its batches are split over them); resume it with mpirun -np %d%s",
                    r->c.out, was, was == 1 ? "" : "s", r->nranks, was, was == 1 ? " (or without mpirun)" : "");
}

static kd_status kd__setup(kd__run *r, int resume) {
    kd_train_cfg *c = &r->c;
    kd_set_num_threads(c->threads);
    r->nranks = kd_dist_size();
    r->writer = kd_dist_rank() == 0;
    if (r->nranks > 1 && c->batch_size % r->nranks != 0) {
        r->config_error = 1;
        return kd_error(KD_ERR_INVALID,
                        "batch_size %d is not divisible by the %d ranks: batch_size is the global batch, split "
                        "evenly over the ranks; choose a multiple of %d",
                        c->batch_size, r->nranks, r->nranks);
    }
    if (resume) KD_TRY(kd__check_ranks(r));
    if (resume) KD_TRY(kd__check_threads(c));
    KD_TRY(kd_backend_get(c->backend, &r->be));
    KD_TRY(kd_dataset_open(c->data, 1, &r->train));
    KD_TRY(kd_dataset_open(c->data, 0, &r->test));
    if (c->train_subset > 0 && c->train_subset < kd_dataset_size(r->train)) {
        kd_dataset *sub = NULL;
        KD_TRY(kd_dataset_subset(r->train, c->train_subset, c->seed, &sub));
        kd_dataset_free(r->train);
        r->train = sub;
    }
    /* The normalisation, decided here once: the training split's as a whole
     * (as `kd eval` computes it), before labels, unlabeled and train_indices
     * change which images are trained on. */
    kd_dataset_norm(r->train, r->tf.mean, r->tf.std);
    if (c->labels[0]) {
        kd_status ls = kd__run_labels(c, resume, &r->train, &r->labels);
        r->config_error |= r->labels.config_error;
        KD_TRY(ls);
    }
    if (kd_dataset_channels(r->train) != kd_dataset_channels(r->test) ||
        kd_dataset_height(r->train) != kd_dataset_height(r->test))
        return kd_error(KD_ERR_FORMAT, "%s: train and test images differ in shape", c->data);
    if (c->unlabeled[0]) {
        /* Extra images without labels (STL-10's unlabeled_X.bin, a folder, a
         * labeled set's training images) after the training split's, in
         * every epoch; the normalisation stays the training split's; the
         * train_indices below (kd select's) number this concatenation. */
        kd_dataset *un = NULL, *both = NULL;
        kd_status us = kd_dataset_open_split(c->unlabeled, KD_SPLIT_UNLABELED, &un);
        if (us == KD_OK) us = kd_dataset_concat(r->train, un, 1, &both);
        if (us == KD_OK) r->n_unlabeled = kd_dataset_size(un);
        kd_dataset_free(un);
        if (us != KD_OK) {
            r->config_error = 1;
            return kd_error(us, "unlabeled %s: %s", c->unlabeled, kd_last_error());
        }
        if (kd_dataset_height(both) == 0 && kd_dataset_height(r->train) > 0 && !c->image_size) {
            kd_dataset_free(both);
            r->config_error = 1;
            return kd_error(KD_ERR_INVALID, "unlabeled %s: its images differ in size, and those of %s are %dx%d: set "
                            "image_size (e.g. %d) to bring every image to one size", c->unlabeled, c->data,
                            kd_dataset_height(r->train), kd_dataset_width(r->train), kd_dataset_height(r->train));
        }
        kd_log_msg(KD_LOG_INFO, "unlabeled %s: %lld images without labels join the %lld of %s in every epoch",
                   c->unlabeled, (long long)r->n_unlabeled, (long long)(kd_dataset_size(both) - r->n_unlabeled),
                   c->data);
        kd_dataset_free(r->train);
        r->train = both;
    }
    if (c->train_indices[0]) {
        /* kd select's images (labeled + selected), indices of the whole
         * split (and the unlabeled images after it): after labels only where
         * that kept the split whole. */
        int64_t *ti = NULL, nt = 0;
        kd_status ts = kd_dataset_indices_read(c->train_indices, r->train, &ti, &nt);
        kd_dataset *sub = NULL;
        if (ts == KD_OK) ts = kd_dataset_select(r->train, ti, nt, &sub);
        free(ti);
        if (ts != KD_OK) {
            r->config_error = 1;
            return kd_error(ts, "train_indices: %s", kd_last_error());
        }
        kd_dataset_free(r->train);
        r->train = sub;
    }
    int classes = kd_dataset_num_classes(r->train);
    if (kd_dataset_num_classes(r->test) > classes) classes = kd_dataset_num_classes(r->test);
    /* Warns when the training labels leave the evaluation labels' range, and
     * lists the classes with no training image. */
    kd_dataset_check_labels(r->train, r->test, classes, NULL, 0);
    const kd_method_def *def = kd_method_find(c->distill.method);
    if (def && def->labels == KD_LABELS_REQUIRED) {
        int64_t n = kd_dataset_size(r->train), unl = 0;
        for (int64_t i = 0; i < n; i++) unl += kd_dataset_label(r->train, i) < 0;
        if (unl) {
            r->config_error = 1;
            if (c->unlabeled[0])
                return kd_error(KD_ERR_INVALID, "method '%s' needs labels, but the %lld images of unlabeled %s have none",
                                def->name, (long long)r->n_unlabeled, c->unlabeled);
            return kd_error(KD_ERR_INVALID, "method '%s' needs labels, but %lld of the %lld training images of %s have none",
                            def->name, (long long)unl, (long long)n, c->data);
        }
    }
    if (def && def->min_batch > 1 && c->batch_size / r->nranks < def->min_batch) {
        r->config_error = 1;
        return kd_error(KD_ERR_INVALID,
                        "method '%s' needs at least %d images per batch (its loss contrasts each image with the "
                        "others of the batch), but batch_size is %d%s",
                        def->name, def->min_batch, c->batch_size,
                        r->nranks > 1 ? ", split over the ranks" : "");
    }
    if (def && def->min_batch > 1 && kd_dataset_size(r->train) < c->batch_size) {
        r->config_error = 1;
        return kd_error(KD_ERR_INVALID,
                        "method '%s' drops an epoch's last partial batch, and %s has %lld training images, fewer "
                        "than batch_size %d: no batch would remain",
                        def->name, c->data, (long long)kd_dataset_size(r->train), c->batch_size);
    }
    kd_model_cfg mc = {.in_channels = kd_dataset_channels(r->train), .num_classes = classes, .seed = c->seed,
                       .head_layers = c->ft_proj_selector};
    KD_TRY(kd_model_create(c->model, &mc, &r->student));
    if (c->init_ckpt[0] && !resume) KD_TRY(kd_model_load(r->student, c->init_ckpt));

    if (kd_distill_needs_teacher(&c->distill)) {
        kd_status s = kd_model_load_new(c->teacher_ckpt, c->teacher, &mc, &r->teacher);
        if (s != KD_OK) return kd_error(s, "teacher: %s", kd_last_error());
        kd_model_set_training(r->teacher, 0);
    }
    if (strcmp(c->precision, "f32") && strcmp(c->precision, "bf16"))
        return kd_error(KD_ERR_INVALID, "invalid value '%s' for precision: expected f32 or bf16",
                        c->precision);
    /* The method is built (probe forwards, modules sized, the pair checked)
     * before any training image is read, so a pair the method cannot bridge
     * fails at once. Images of varying size know their shape only from the
     * loader. */
    int C = kd_dataset_channels(r->train);
    int H = c->image_size ? c->image_size : kd_dataset_height(r->train);
    int W = c->image_size ? c->image_size : kd_dataset_width(r->train);
    kd_trainer_cfg tc = {.student = r->student,
                         .teacher = r->teacher,
                         .method = c->distill,
                         .optim = kd_train_cfg_optim(c),
                         .sched = c->sched,
                         .be = r->be,
                         .precision = strcmp(c->precision, "bf16") ? KD_F32 : KD_BF16,
                         .in_channels = C,
                         .height = H,
                         .width = W,
                         .num_classes = classes,
                         .n_train = kd_dataset_size(r->train),
                         .train_labels = kd_dataset_labels(r->train),
                         .seed = c->seed,
                         .data_parallel = r->nranks > 1,
                         .sync_bn = c->sync_bn};
    if (H > 0 && W > 0) {
        KD_TRY(kd__trainer_init(r, &tc));
    }
    int side = c->image_size ? c->image_size : kd_dataset_height(r->train);
    r->tf.pad_crop = c->pad_crop >= 0 ? c->pad_crop : (side >= 32 ? 4 : 2);
    r->tf.hflip = c->hflip;
    r->tf.normalize = 1;
    r->tf.out_h = r->tf.out_w = c->image_size;
    r->tf.resize = c->resize;
    KD_TRY(kd__open_loader(r));
    /* The probe runs at view 0's size: images of varying size know it only
     * from the loader, and a method's view_transform may change it. A
     * trainer built before the loader is built again at that size (nothing
     * has been trained yet), and the loader again with the new trainer's
     * views when it was built without them. */
    int C0, H0, W0;
    kd_loader_sample_shape(r->loader, &C0, &H0, &W0);
    if (!r->tr || C0 != tc.in_channels || H0 != tc.height || W0 != tc.width) {
        int had_views = r->tr != NULL;
        kd_trainer_free(r->tr);
        r->tr = NULL;
        tc.in_channels = C0;
        tc.height = H0;
        tc.width = W0;
        KD_TRY(kd__trainer_init(r, &tc));
        if (!had_views && kd_method_get_def(kd_trainer_method(r->tr))->view_transform) {
            kd_loader_free(r->loader);
            r->loader = NULL;
            KD_TRY(kd__open_loader(r));
            kd_loader_sample_shape(r->loader, &C0, &H0, &W0);
            if (C0 != tc.in_channels || H0 != tc.height || W0 != tc.width)
                return kd_error(KD_ERR_INVALID,
                                "method '%s': its view_transform gives view 0 another size (%dx%d) than the run's "
                                "images (%dx%d); set image_size",
                                c->distill.method, H0, W0, tc.height, tc.width);
        }
    }
    r->steps_per_epoch = kd_loader_num_batches(r->loader);
    if (r->nranks > 1) { /* a last batch of fewer images than ranks would leave a rank none */
        int64_t rest = kd_dataset_size(r->train) % c->batch_size;
        int partial = kd_loader_num_batches(r->loader) * (int64_t)c->batch_size > kd_dataset_size(r->train);
        if (partial && rest > 0 && rest < r->nranks && r->steps_per_epoch == kd_loader_num_batches(r->loader)) {
            r->steps_per_epoch--;
            kd_log_msg(KD_LOG_INFO, "the last batch of each epoch (%lld images) has fewer images than the %d ranks: "
                       "it is left out", (long long)rest, r->nranks);
        }
    }
    if (c->max_steps_per_epoch > 0 && c->max_steps_per_epoch < r->steps_per_epoch)
        r->steps_per_epoch = c->max_steps_per_epoch;
    if (c->sched.kind == KD_SCHED_MULTISTEP && c->sched.n_milestones > 0 &&
        c->sched.milestones[c->sched.n_milestones - 1] >= c->epochs) {
        char ms[96];
        kd_train_cfg_get(c, "milestones", ms, sizeof ms);
        kd_log_msg(KD_LOG_WARN, "milestones %s: those at or beyond epochs %d never take effect%s", ms, c->epochs,
                   c->sched.milestones[0] >= c->epochs ? ", so the learning rate never decays (set milestones, or "
                                                          "schedule cosine)" : "");
    }

    KD_TRY(kd_mkdirs(c->out));
    char path[600];
    kd__path(path, sizeof path, c->out, "last.safetensors");
    if (!resume && kd_file_exists(path))
        return kd_error(KD_ERR_INVALID, "%s already holds a run (%s); continue it with --resume %s or choose another --out",
                        c->out, path, c->out);
    if (r->writer) KD_TRY(kd__remove_stale_tmp(c->out));
    if (r->writer && r->labels.idx && !r->labels.from_file) {
        kd__path(path, sizeof path, c->out, "labels.txt");
        KD_TRY(kd__labels_write(path, &r->labels, c->labels, c->seed));
    }
    /* The method's stage before the first epoch (SSKD's teacher head),
     * before a resumed run's checkpoint is loaded over the method's state. */
    kd_prepare_ctx pc = {.teacher = r->teacher, .be = r->be, .loader = r->loader,
                         .steps_per_epoch = r->steps_per_epoch, .run_dir = c->out, .seed = c->seed,
                         .teacher_ckpt = r->teacher ? c->teacher_ckpt : NULL,
                         .threads = c->threads, .resume = resume};
    /* Ranks run the method's stage on whole batches, as one process does. */
    kd_loader *full = NULL;
    kd_status ps = KD_OK;
    if (r->nranks > 1 && kd_method_get_def(kd_trainer_method(r->tr))->prepare) {
        kd_loader *keep = r->loader;
        r->loader = NULL;
        r->no_shard = 1;
        ps = kd__open_loader(r);
        full = r->loader;
        r->loader = keep;
        r->no_shard = 0;
        pc.loader = full;
    }
    if (ps == KD_OK) ps = kd_method_prepare(kd_trainer_method(r->tr), &pc);
    kd_loader_free(full);
    if (ps != KD_OK) {
        r->config_error = ps == KD_ERR_SHAPE || ps == KD_ERR_INVALID;
        return ps;
    }
    if (resume) KD_TRY(kd__load_last(r));
    if (!r->writer) return KD_OK; /* rank 0 alone writes the run directory */
    if (!resume) {
        kd__path(path, sizeof path, c->out, "config.yaml");
        KD_TRY(kd_train_cfg_save(c, path));
    }
    kd__path(path, sizeof path, c->out, "metrics.jsonl");
    if (resume) KD_TRY(kd__metrics_truncate(path, r->start_epoch));
    r->metrics = fopen(path, resume ? "a" : "w");
    if (!r->metrics) return kd_error(KD_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    r->bar = c->progress == 1 || (c->progress < 0 && isatty(2));
    return KD_OK;
}

static kd_status kd__write_summary(kd__run *r, const kd_train_result *res) {
    if (!r->writer) return KD_OK;
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return kd_error(KD_ERR_NOMEM, "out of memory writing the summary");
    fprintf(f, "{\n  \"model\": ");
    kd_json_write_string(f, r->c.model);
    fprintf(f, ",\n  \"method\": ");
    kd_json_write_string(f, r->c.distill.method);
    fprintf(f, ",\n  \"teacher\": ");
    kd_json_write_string(f, r->teacher ? kd_model_arch(r->teacher) : "");
    fprintf(f, ",\n  \"data\": ");
    kd_json_write_string(f, r->c.data);
#define KD__NUM(k, v)                 \
    fprintf(f, ",\n  \"" k "\": ");   \
    kd_json_write_number(f, (double)(v));
    KD__NUM("top1", res->top1);
    KD__NUM("top5", res->top5);
    KD__NUM("test_loss", res->test_loss);
    KD__NUM("best_top1", res->best_top1);
    KD__NUM("best_epoch", res->best_epoch);
    KD__NUM("epochs", res->epochs_done);
    KD__NUM("images_per_s", res->images_per_s);
    KD__NUM("wall_s", res->wall_s);
    KD__NUM("params", res->params);
    KD__NUM("seed", r->c.seed);
    KD__NUM("threads", kd_get_num_threads());
    KD__NUM("train_images", kd_dataset_size(r->train));
    if (r->labels.idx) {
        KD__NUM("labeled_images", r->labels.n);
    }
    if (r->c.unlabeled[0]) {
        fprintf(f, ",\n  \"unlabeled\": ");
        kd_json_write_string(f, r->c.unlabeled);
        KD__NUM("unlabeled_images", r->n_unlabeled);
    }
    fprintf(f, ",\n  \"train_loss_terms\": {");
    for (int i = 0; i < r->ep_terms.n; i++) {
        fprintf(f, "%s\"%s\": ", i ? ", " : "", r->ep_terms.name[i]);
        kd_json_write_number(f, r->ep_seen ? r->ep_terms.sum[i] / (double)r->ep_seen : 0.0);
    }
    fprintf(f, "}");
#undef KD__NUM
    fprintf(f, ",\n  \"backend\": ");
    kd_json_write_string(f, r->be->name);
    fprintf(f, ",\n  \"precision\": ");
    kd_json_write_string(f, kd_graph_precision(kd_trainer_graph(r->tr)) == KD_BF16 ? "bf16" : "f32");
    fprintf(f, ",\n  \"kd_version\": ");
    kd_json_write_string(f, kd_version());
    fprintf(f, "\n}\n");
    fclose(f);
    char path[600];
    kd__path(path, sizeof path, r->c.out, "summary.json");
    kd_status s = kd_file_write_atomic(path, text, len);
    free(text);
    return s;
}

/* Evaluation of the student: with several ranks, each evaluates its shard
 * of the test set with rank 0's weights and buffers, and the sums are added. */
static kd_status kd__run_evaluate(kd__run *r, double *top1, double *top5, double *loss) {
    const kd_train_cfg *c = &r->c;
    if (r->nranks <= 1) return kd_evaluate(r->student, r->be, r->test, c->eval_batch, &r->tf, top1, top5, loss);
    KD_TRY(kd__dp_bcast_params(kd_model_params(r->student), 0));
    return kd__evaluate(r->student, r->be, r->test, c->eval_batch, &r->tf, 1, top1, top5, loss);
}

/* Start-up of a data-parallel run, on every rank once each has set up: the
 * ranks must agree on the configuration, the data and the teacher (hashes
 * compared with rank 0's), and start from rank 0's weights. */
static kd_status kd__dp_start(kd__run *r) {
    kd_status s = kd__dp_check_same(kd__dp_config_hash(&r->c), "the configuration");
    if (s != KD_OK) {
        r->config_error = 1;
        return s;
    }
    uint64_t h = KD__FNV_INIT;
    int64_t dims[6] = {kd_dataset_size(r->train), kd_dataset_size(r->test), kd_dataset_channels(r->train),
                       kd_dataset_height(r->train), kd_dataset_width(r->train), kd_dataset_num_classes(r->train)};
    h = kd__fnv1a(h, dims, sizeof dims);
    if (kd_dataset_labels(r->train)) h = kd__fnv1a(h, kd_dataset_labels(r->train), (size_t)dims[0] * sizeof(int32_t));
    if ((s = kd__dp_check_same(h, "the training data (size, image shape, classes, labels)")) != KD_OK) {
        r->config_error = 1;
        return s;
    }
    if (r->teacher && (s = kd__dp_check_same(kd__dp_params_hash(kd_model_params(r->teacher)),
                                             "the teacher's weights")) != KD_OK) {
        r->config_error = 1;
        return s;
    }
    KD_TRY(kd__dp_bcast_params(kd_model_params(r->student), 0));
    KD_TRY(kd__dp_bcast_params(kd_method_params(kd_trainer_method(r->tr)), 0));
    if (kd_trainer_ema(r->tr)) KD_TRY(kd__dp_bcast_params(kd_model_params(kd_trainer_ema(r->tr)), 0));
    return KD_OK;
}

static kd_status kd__train_loop(kd__run *r, kd_train_result *res) {
    const kd_train_cfg *c = &r->c;
    const double t_start = kd__now();
    double train_time = r->train_time_before;
    int64_t images = r->images_before;
    double top1 = 0, top5 = 0, tloss = 0;
    int last_epoch_done = r->start_epoch;
    if (r->start_epoch >= c->epochs) kd_log_msg(KD_LOG_INFO, "%s: all %d epochs already done", c->out, c->epochs);
    int end_epoch = c->epochs;
    if (c->stop_after > 0 && r->start_epoch + c->stop_after < end_epoch) end_epoch = r->start_epoch + c->stop_after;
    for (int epoch = r->start_epoch; epoch < end_epoch; epoch++) {
        kd_trainer_set_training(r->tr, 1);
        r->ep_terms.n = 0;
        KD_TRY(kd_loader_start_epoch(r->loader, epoch));
        double t0 = kd__now(), lsum = 0;
        int64_t seen = 0, hits = 0, labeled = 0; /* train top-1: hits among the labeled images */
        kd_batch b;
        int got;
        int64_t step = 0;
        float lr = 0;
        while (step < r->steps_per_epoch && (got = kd_loader_next(r->loader, &b)) == 1) {
            kd_step_result sr;
            kd_dist_test_point(epoch * r->steps_per_epoch + step);
            kd_status s = kd_train_step(r->tr, &b, epoch, step, r->steps_per_epoch, &sr);
            if (s == KD_ERR_NUMERIC)
                return kd_error(s, "%s; the last good checkpoint is %s/last.safetensors", kd_last_error(), c->out);
            KD_TRY(s);
            lr = sr.lr;
            int64_t nb = b.n, bh1 = 0, bh5 = 0, bl = 0;
            if (sr.logits && b.y) kd__count_hits(sr.logits, b.y, b.n, sr.classes, &bh1, &bh5, &bl);
            /* Data parallelism: the global batch's loss, terms and hits. */
            if (r->nranks > 1) KD_TRY(kd__dp_reduce_step(&sr, &nb, &bh1, &bh5, &bl));
            hits += bh1;
            labeled += bl;
            KD_TRY(kd__terms_add(&r->ep_terms, &sr, (double)nb));
            lsum += sr.loss * (double)nb;
            seen += nb;
            step++;
            double el = kd__now() - t0;
            kd__progress(r, epoch, step - 1, r->steps_per_epoch, lsum / (double)seen, lr, (double)seen / el);
            if (r->metrics && c->log_every > 0 && step % c->log_every == 0) {
                fprintf(r->metrics,
                        "{\"type\": \"step\", \"epoch\": %d, \"step\": %lld, \"lr\": %.9g, \"loss\": ", epoch + 1,
                        (long long)(epoch * r->steps_per_epoch + step), lr);
                kd_json_write_number(r->metrics, sr.loss);
                for (int i = 0; i < sr.n_terms; i++) {
                    fprintf(r->metrics, ", \"%s\": ", sr.term_names[i]);
                    kd_json_write_number(r->metrics, sr.term_values[i]);
                }
                fprintf(r->metrics, ", \"images_per_s\": %.1f}\n", (double)seen / el);
            }
        }
        if (step < r->steps_per_epoch && got < 0) return (kd_status)got;
        double ep_time = kd__now() - t0;
        train_time += ep_time;
        images += seen;
        if (r->bar) fputc('\n', stderr);
        /* Evaluation every eval_every epochs and at the last epoch of this
         * invocation (it changes no training state: the numbers of the
         * epochs trained are the same for any eval_every). */
        const int evaluated = (epoch + 1) % c->eval_every == 0 || epoch + 1 == end_epoch;
        if (evaluated) KD_TRY(kd__run_evaluate(r, &top1, &top5, &tloss));
        if (evaluated && (top1 > r->best_top1 || r->best_epoch == 0)) {
            r->best_top1 = top1;
            r->best_epoch = epoch + 1;
            char path[600];
            kd__path(path, sizeof path, c->out, "best.safetensors");
            if (r->writer) KD_TRY(kd_model_save(r->student, path));
        }
        double wall = r->wall_before + (kd__now() - t_start);
        double ips = (double)seen / ep_time;
        char terms_text[512];
        kd__terms_text(&r->ep_terms, seen, terms_text, sizeof terms_text);
        /* The epoch's record goes to disk before its checkpoint: a kill in
         * between resumes from the previous checkpoint, whose
         * kd__metrics_truncate drops this epoch's records before the epoch
         * runs again, so every record is written exactly once. */
        if (r->writer) {
            fprintf(r->metrics, "{\"type\": \"epoch\", \"epoch\": %d, \"lr\": %.9g, \"train_loss\": %.9g", epoch + 1, lr,
                    lsum / (double)seen);
            for (int i = 0; i < r->ep_terms.n; i++)
                fprintf(r->metrics, ", \"train_%s\": %.9g", r->ep_terms.name[i], r->ep_terms.sum[i] / (double)seen);
            if (labeled > 0) fprintf(r->metrics, ", \"train_top1\": %.6g", 100.0 * (double)hits / (double)labeled);
            if (evaluated)
                fprintf(r->metrics, ", \"test_top1\": %.6g, \"test_top5\": %.6g, \"test_loss\": %.9g", top1, top5,
                        tloss);
            fprintf(r->metrics, ", \"images_per_s\": %.1f, \"epoch_s\": %.3f, \"wall_s\": %.3f}\n", ips, ep_time,
                    wall);
            KD_TRY(kd__metrics_sync(r->metrics, c->out));
            KD_TRY(kd__save_last(r, epoch + 1, wall, train_time, images));
            if (kd_method_get_def(kd_trainer_method(r->tr))->labels == KD_LABELS_ABSENT) {
                char epath[600];
                kd__path(epath, sizeof epath, c->out, "encoder.safetensors");
                KD_TRY(kd_encoder_save(r->student, kd_trainer_method(r->tr), epath));
            }
            KD_TRY(kd__write_curves(c->out));
        }
        last_epoch_done = epoch + 1;
        char test_text[64] = "test not evaluated (eval_every)";
        if (evaluated) snprintf(test_text, sizeof test_text, "test top1 %.2f%% top5 %.2f%%", top1, top5);
        char train_text[48] = "";
        if (labeled > 0)
            snprintf(train_text, sizeof train_text, "  train %.2f%%", 100.0 * (double)hits / (double)labeled);
        kd_log_msg(KD_LOG_INFO, "epoch %d/%d  loss %.4f (%s)%s  %s  %.0f img/s  %.1fs", epoch + 1, c->epochs,
                   lsum / (double)seen, terms_text, train_text, test_text, ips, ep_time);
        r->ep_seen = seen;
    }
    if (r->nranks > 1 && train_time > r->train_time_before) { /* data parallelism: docs/DISTRIBUTED.md */
        int64_t steps = (int64_t)(end_epoch - r->start_epoch) * r->steps_per_epoch;
        kd_log_msg(KD_LOG_INFO,
                   "data parallel: %d ranks, %.3f MB all-reduced per step (%lld gradient floats in %d buckets), "
                   "%.1f%% of this rank's training time waiting in collectives",
                   r->nranks, steps > 0 ? (double)kd_dist_bytes_reduced() / (double)steps / 1e6 : 0.0,
                   (long long)kd__dp_floats(kd__trainer_dp(r->tr)), kd__dp_buckets(kd__trainer_dp(r->tr)),
                   100.0 * kd_dist_wait_seconds() / (train_time - r->train_time_before));
    }
    if (r->start_epoch >= c->epochs) KD_TRY(kd__run_evaluate(r, &top1, &top5, &tloss));
    res->top1 = top1;
    res->top5 = top5;
    res->test_loss = tloss;
    res->best_top1 = r->best_top1;
    res->best_epoch = r->best_epoch;
    res->epochs_done = last_epoch_done;
    res->images_per_s = train_time > 0 ? (double)images / train_time : 0;
    res->wall_s = r->wall_before + (kd__now() - t_start);
    res->params = kd_model_num_params(r->student);
    return kd__write_summary(r, res);
}

static kd_status kd__run_main(const kd_train_cfg *cfg, int resume, kd_train_result *res) {
    kd__run r;
    memset(&r, 0, sizeof r);
    memset(res, 0, sizeof *res);
    r.c = *cfg;
    kd_status s = kd_train_cfg_resolve(&r.c);
    if (s == KD_OK) s = kd__setup(&r, resume);
    if (kd_dist_size() > 1) { /* every rank set up, and they agree (data_parallel.c) */
        s = kd_dist_agree(s, &r.config_error);
        if (s == KD_OK) s = kd__dp_start(&r);
    }
    if (s == KD_OK) s = kd__train_loop(&r, res);
    else res->config_error = r.config_error;
    if (s != KD_OK && r.bar) fputc('\n', stderr);
    kd__run_free(&r);
    return s;
}

kd_status kd_train_run(const kd_train_cfg *cfg, kd_train_result *res) { return kd__run_main(cfg, 0, res); }

/* The settings of the run in dir, with the runtime changes; *fresh: it has
 * no checkpoint yet and starts again. */
static kd_status kd__resume_cfg(const char *dir, const char *const *keys, const char *const *values, int n,
                                kd_train_cfg *out, int *fresh) {
    static const char *const runtime[] = {"threads", "workers", "progress", "log_every", "eval_every",
                                          "stop_after", "allow_thread_change"};
    kd_train_cfg c;
    kd_train_cfg_defaults(&c);
    char path[600];
    kd__path(path, sizeof path, dir, "config.yaml");
    KD_TRY(kd_train_cfg_load(&c, path));
    /* The run directory may have moved since it was written. */
    if (strlen(dir) >= sizeof c.out) return kd_error(KD_ERR_INVALID, "run directory path %s is too long", dir);
    snprintf(c.out, sizeof c.out, "%s", dir);
    c.stop_after = 0; /* a pause applies to the invocation that asked for it */
    for (int i = 0; i < n; i++) {
        int ok = 0;
        for (size_t k = 0; k < sizeof runtime / sizeof runtime[0]; k++) ok |= strcmp(keys[i], runtime[k]) == 0;
        if (!ok)
            return kd_error(KD_ERR_INVALID,
                            "a resumed run keeps its settings (%s); only threads, workers, progress, log_every, "
                            "eval_every, stop_after and allow_thread_change may change, not %s",
                            path, keys[i]);
        KD_TRY(kd_train_cfg_set(&c, keys[i], values[i]));
    }
    /* Killed before its first checkpoint: nothing was kept, start again. */
    kd__path(path, sizeof path, dir, "last.safetensors");
    if (!kd_file_exists(path)) {
        kd_log_msg(KD_LOG_INFO, "%s: no checkpoint yet (%s): the run starts again from its first epoch", dir,
                   path);
        *fresh = 1;
    }
    *out = c;
    return KD_OK;
}

kd_status kd_train_resume(const char *dir, const char *const *keys, const char *const *values, int n,
                          kd_train_result *res) {
    memset(res, 0, sizeof *res);
    kd_train_cfg c;
    int fresh = 0;
    kd_status s = kd__resume_cfg(dir, keys, values, n, &c, &fresh);
    if (kd_dist_size() > 1) s = kd_dist_agree(s, NULL); /* every rank read dir; one reports */
    if (s != KD_OK) return s;
    return kd__run_main(&c, !fresh, res);
}
