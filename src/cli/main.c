/* The `kd` program: turns command lines into library calls, and library
 * statuses into one clear sentence on stderr and a non-zero exit.
 *   kd train    train a model (a teacher, or a student alone)
 *   kd distill  train a student from a teacher with a distillation method
 *   kd pretrain self-supervised pretraining (SimCLR, MoCo v2) without labels
 *   kd eval     accuracy of a checkpoint on a dataset's test split; --knn, --linear:
 *               kNN and linear evaluation of its features
 *   kd info     what a checkpoint or dataset holds
 * Exit status: 0 success, 1 failure while running, 2 bad command line. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd/dist.h"
#include "kd/eval.h"
#include "kd/io.h"
#include "kd/train.h"

#include "cli/flags.h"

#define KD_EXIT_FAIL 1
#define KD_EXIT_USAGE 2

static int kd__fail(const char *cmd) {
    const char *e = kd_last_error();
    if (kd_dist_size() > 1 && !kd_dist_error_collective() && strncmp(e, "rank ", 5) != 0)
        fprintf(stderr, "kd %s: rank %d of %d: %s\n", cmd, kd_dist_rank(), kd_dist_size(), e);
    else
        fprintf(stderr, "kd %s: %s\n", cmd, e);
    return KD_EXIT_FAIL;
}

/* Under mpirun every rank parses the same command line: the ranks other than
 * 0 keep stderr quiet until training starts, so a bad command line is
 * reported once. */
static int kd__saved_stderr = -1;
static void kd__quiet_begin(void) {
    if (kd_dist_rank() == 0 || kd__saved_stderr >= 0) return;
    fflush(stderr);
    kd__saved_stderr = dup(2);
    int fd = open("/dev/null", O_WRONLY);
    if (fd >= 0) {
        dup2(fd, 2);
        close(fd);
    }
}
static void kd__quiet_end(void) {
    if (kd__saved_stderr < 0) return;
    fflush(stderr);
    dup2(kd__saved_stderr, 2);
    close(kd__saved_stderr);
    kd__saved_stderr = -1;
}

static void kd__print_settings(const kd_train_cfg *c) {
    int n;
    const kd_setting_doc *d = kd_train_settings(&n);
    for (int i = 0; i < n; i++) {
        char flag[64], v[600];
        snprintf(flag, sizeof flag, "--%s", d[i].key);
        for (char *p = flag + 2; *p; p++)
            if (*p == '_') *p = '-';
        kd_train_cfg_get(c, d[i].key, v, sizeof v);
        fprintf(stdout, "  %-24s %s [%s]\n", flag, d[i].help, v);
    }
}

static void kd__print_arg(void *user, const char *key, const char *value, const char *help) {
    (void)user;
    char flag[96];
    snprintf(flag, sizeof flag, "%s=", key);
    printf("  --set %-30s %s [%s]\n", flag, help, value);
}

/* The settings table of the chosen method, generated from its kd_method_def. */
static void kd__print_method(const kd_train_cfg *c) {
    const kd_method_def *m = kd_method_find(c->distill.method);
    if (!m || !strcmp(m->name, "none")) return;
    printf("\nmethod %s: %s\n  paper: %s\n  loss weights: gamma %g, alpha %g, beta %g, T %g%s\n", m->name,
           m->summary, m->paper ? m->paper : "-", m->gamma, m->alpha, m->beta, m->T,
           m->teacher == KD_TEACHER_NONE ? "; no teacher" : "");
    if (m->n_args == 0) {
        printf("  (no settings of its own)\n");
        return;
    }
    printf("  settings [default] (--set %s.NAME=VALUE, or %s.NAME: VALUE in a YAML config):\n", m->name, m->name);
    kd_distill_cfg_visit(&c->distill, kd__print_arg, NULL);
}

/* `kd distill --method list`: every method, its summary and paper. */
static void kd__list_methods(void) {
    int n;
    const kd_method_def *const *defs = kd_method_defs(&n);
    for (int i = 0; i < n; i++)
        printf("%-8s %s\n         %s\n", defs[i]->name, defs[i]->summary, defs[i]->paper ? defs[i]->paper : "-");
}

/* The methods `kd pretrain` takes (no teacher, no labels), from the registry. */
static void kd__ssl_method_names(char *buf, size_t n, const char *sep) {
    int nm;
    const kd_method_def *const *defs = kd_method_defs(&nm);
    buf[0] = '\0';
    for (int i = 0; i < nm; i++)
        if (defs[i]->teacher == KD_TEACHER_NONE && defs[i]->labels == KD_LABELS_ABSENT)
            snprintf(buf + strlen(buf), n - strlen(buf), "%s%s", buf[0] ? sep : "", defs[i]->name);
}

static void kd__usage_train(const char *cmd, const kd_train_cfg *defaults) {
    if (strcmp(cmd, "distill") == 0) {
        printf("usage: kd distill --teacher-ckpt FILE --model STUDENT [--method kd] [settings...]\n\n"
               "Trains STUDENT on the data with the teacher's knowledge. The loss is\n"
               "gamma*CE + alpha*T^2*KL(teacher || student) + beta*method-term, each weight\n"
               "defaulting to the method's published value (kd: gamma 0.1, alpha 0.9, T 4).\n"
               "`--method list` lists the methods; `--method NAME --help` shows NAME's settings.\n");
    } else if (strcmp(cmd, "pretrain") == 0) {
        char names[256];
        kd__ssl_method_names(names, sizeof names, "|");
        printf("usage: kd pretrain --model ARCH --data DIR [--method %s] [settings...]\n\n"
               "Self-supervised pretraining without labels (no teacher): each image gives two augmented\n"
               "views and the method's loss (`--method NAME --help`: its paper and settings). Writes\n"
               "encoder.safetensors (the model and its projection head \"head.*\") after every epoch: a\n"
               "teacher for `kd distill --method seed`, or init_ckpt of a fine-tune; `kd eval --knn` /\n"
               "`--linear` measure it.\n",
               names);
    } else {
        printf("usage: kd train --model ARCH --data DIR [settings...]\n\n"
               "Trains ARCH with cross-entropy (a teacher, or a student alone).\n");
    }
    printf("\nEvery run writes a run directory (--out): config.yaml, metrics.jsonl,\n"
           "summary.json, last.safetensors and best.safetensors.\n\n"
           "  --config FILE            read settings from a YAML file (flags override it)\n"
           "  --resume DIR             continue the interrupted run in DIR with its own config\n"
           "  --set METHOD.NAME=VALUE  a setting of the method (see --method NAME --help)\n"
           "  --help                   this text\n\nsettings [default]:\n");
    kd__print_settings(defaults);
    int n;
    const char *const *names = kd_model_names(&n);
    printf("\nmodels:");
    for (int i = 0; i < n; i++) printf(" %s", names[i]);
    names = kd_distill_names(&n);
    printf("\nmethods (kd distill --method list):");
    for (int i = 0; i < n; i++) printf(" %s", names[i]);
    printf("\n");
    kd__print_method(defaults);
}

/* Turns "--batch-size" into "batch_size"; returns 0 if arg is not a flag. */
static int kd__flag_key(const char *arg, char *key, size_t n, const char **inline_value) {
    if (strncmp(arg, "--", 2) != 0 || !arg[2]) return 0;
    const char *eq = strchr(arg, '=');
    size_t len = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
    if (len >= n) len = n - 1;
    memcpy(key, arg + 2, len);
    key[len] = '\0';
    for (char *p = key; *p; p++)
        if (*p == '-') *p = '_';
    *inline_value = eq ? eq + 1 : NULL;
    return 1;
}

/* Parses the arguments of kd train / kd distill into c (config file first,
 * then flags), the run to resume, and the settings given as flags (for a
 * resume). Returns -1 to go on, or the exit code (0 after --method list). */
static int kd__parse_train_args(const char *cmd, int argc, char **argv, kd_train_cfg *c,
                                const char **resume, const char **keys, const char **vals,
                                int *nkv, int *want_help) {
    *resume = NULL;
    *nkv = 0;
    *want_help = 0;
    /* The config file first, so that flags override it wherever they stand. */
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            *want_help = 1;
            continue;
        }
        if ((strcmp(argv[i], "--method") == 0 && i + 1 < argc && strcmp(argv[i + 1], "list") == 0) ||
            strcmp(argv[i], "--method=list") == 0) {
            kd__list_methods();
            return 0;
        }
        if (strcmp(argv[i], "--config") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kd %s: --config needs a file\n", cmd);
                return KD_EXIT_USAGE;
            }
            if (kd_train_cfg_load(c, argv[i + 1]) != KD_OK) {
                fprintf(stderr, "kd %s: %s\n", cmd, kd_last_error());
                return KD_EXIT_USAGE;
            }
        }
    }
    static char keybuf[64][128];
    for (int i = 0; i < argc; i++) {
        char *key = keybuf[*nkv < 64 ? *nkv : 63];
        const char *val;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) continue;
        if (!kd__flag_key(argv[i], key, sizeof keybuf[0], &val)) {
            fprintf(stderr, "kd %s: unexpected argument '%s' (settings are --name value; see --help)\n", cmd, argv[i]);
            return KD_EXIT_USAGE;
        }
        const char *flag = argv[i];
        if (!val) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kd %s: %s needs a value\n", cmd, argv[i]);
                return KD_EXIT_USAGE;
            }
            val = argv[++i];
        }
        if (strcmp(key, "config") == 0) continue;
        if (strcmp(key, "resume") == 0) {
            *resume = val;
            continue;
        }
        if (strcmp(key, "set") == 0) {
            /* --set METHOD.NAME=VALUE; the name goes into this flag's own key
             * slot, which outlives the loop (keys[] is used by a resume). */
            const char *eq = strchr(val, '=');
            if (!eq || eq == val || (size_t)(eq - val) >= sizeof keybuf[0] || !memchr(val, '.', (size_t)(eq - val))) {
                fprintf(stderr, "kd %s: --set needs METHOD.NAME=VALUE, got '%s'\n", cmd, val);
                return KD_EXIT_USAGE;
            }
            memcpy(key, val, (size_t)(eq - val));
            key[eq - val] = '\0';
            val = eq + 1;
        } else if (strchr(key, '.')) {
            fprintf(stderr, "kd %s: method settings are given as --set %s=VALUE\n", cmd, key);
            return KD_EXIT_USAGE;
        }
        kd_status st = kd_train_cfg_set(c, key, val);
        if (st == KD_ERR_NOT_FOUND) {
            fprintf(stderr, "kd %s: unknown option '%.*s' (see kd %s --help)\n", cmd,
                    (int)strcspn(flag, "="), flag, cmd);
            return KD_EXIT_USAGE;
        }
        if (st != KD_OK) {
            fprintf(stderr, "kd %s: %s\n", cmd, kd_last_error());
            return KD_EXIT_USAGE;
        }
        if (*want_help) continue;
        if (*nkv == 64) {
            fprintf(stderr, "kd %s: too many options\n", cmd);
            return KD_EXIT_USAGE;
        }
        keys[*nkv] = key;
        vals[(*nkv)++] = val;
    }
    return -1;
}

static int kd__cmd_train(const char *cmd, int argc, char **argv) {
    kd_train_cfg c;
    kd_train_cfg_defaults(&c);
    if (strcmp(cmd, "distill") == 0) snprintf(c.distill.method, sizeof c.distill.method, "kd");
    if (strcmp(cmd, "pretrain") == 0) snprintf(c.distill.method, sizeof c.distill.method, "simclr");
    kd__quiet_begin();
    const char *resume = NULL;
    const char *keys[64], *vals[64];
    int nkv = 0, want_help = 0;
    int rc = kd__parse_train_args(cmd, argc, argv, &c, &resume, keys, vals, &nkv, &want_help);
    if (rc >= 0) return rc;
    if (want_help) {
        if (kd_distill_cfg_check(&c.distill) != KD_OK) {
            fprintf(stderr, "kd %s: %s\n", cmd, kd_last_error());
            return KD_EXIT_USAGE;
        }
        kd__usage_train(cmd, &c);
        return 0;
    }
    if (!resume && strcmp(cmd, "pretrain") == 0) {
        const kd_method_def *d = kd_method_find(c.distill.method);
        if (d && (d->teacher != KD_TEACHER_NONE || d->labels != KD_LABELS_ABSENT)) {
            char names[256];
            kd__ssl_method_names(names, sizeof names, ", ");
            fprintf(stderr, "kd pretrain: method '%s' is not self-supervised (it needs %s); pretrain with %s\n",
                    d->name, d->teacher != KD_TEACHER_NONE ? "a teacher" : "labels", names);
            return KD_EXIT_USAGE;
        }
    }
    if (!resume) {
        /* Check the settings now, so a bad command line is reported as one. */
        kd_train_cfg check = c;
        kd_backend *be = NULL;
        if (kd_train_cfg_resolve(&check) != KD_OK || kd_backend_get(check.backend, &be) != KD_OK) {
            fprintf(stderr, "kd %s: %s\n", cmd, kd_last_error());
            return KD_EXIT_USAGE;
        }
    }
    kd__quiet_end();
    kd_train_result r = {0};
    kd_status s = resume ? kd_train_resume(resume, keys, vals, nkv, &r) : kd_train_run(&c, &r);
    if (s != KD_OK) {
        int code = r.config_error ? KD_EXIT_USAGE : KD_EXIT_FAIL;
        /* Under mpirun: a failure every rank knows is reported by one of
         * them; any other ends the job, since the other ranks may be waiting
         * for this one in a collective. */
        if (!kd_dist_error_quiet()) kd__fail(cmd);
        if (!kd_dist_error_collective()) kd_dist_abort(code);
        return code;
    }
    if (strcmp(cmd, "pretrain") == 0) {
        printf("%s: %.0f img/s  %.1fs  -> %s/encoder.safetensors\n", resume ? resume : c.out, r.images_per_s,
               r.wall_s, resume ? resume : c.out);
        return 0;
    }
    printf("%s: top1 %.2f%%  top5 %.2f%%  best %.2f%% (epoch %d)  %.0f img/s  %.1fs  -> %s\n",
           resume ? resume : c.out, r.top1, r.top5, r.best_top1, r.best_epoch, r.images_per_s, r.wall_s,
           resume ? resume : c.out);
    return 0;
}

/* ------------------------------------------------------------------ kd eval */

/* kd eval's modes (the kd__flag.modes bits) and their names in messages. */
enum { KD__EVAL_ACCURACY = 1u, KD__EVAL_KNN = 2u, KD__EVAL_LINEAR = 4u };
static const char *const kd__eval_mode_names[] = {"the accuracy mode", "--knn", "--linear"};

typedef struct {
    kd_eval_cfg ec; /* every setting but the mode */
    int json, knn, linear;
} kd__eval_opts;

static void kd__eval_defaults(kd__eval_opts *o) {
    memset(o, 0, sizeof *o);
    kd_eval_cfg_defaults(&o->ec);
}

/* --k: 1 to KD_KNN_MAX_K comma-separated neighbour counts. */
static int kd__eval_parse_k(const kd__flag *f, const char *v, void *opts, char *err, size_t n) {
    kd_eval_cfg *ec = &((kd__eval_opts *)opts)->ec;
    int k[KD_KNN_MAX_K], n_k = 0;
    for (const char *q = v;;) {
        char *end;
        errno = 0;
        long x = strtol(q, &end, 10);
        if (end == q || (*end && *end != ',') || errno || x < 1 || x > 1000000000L || n_k == KD_KNN_MAX_K) {
            snprintf(err, n, "invalid value '%s' for %s: expected 1 to %d comma-separated neighbour counts, each >= 1",
                     v, f->name, KD_KNN_MAX_K);
            return 0;
        }
        k[n_k++] = (int)x;
        if (!*end) break;
        q = end + 1;
    }
    ec->n_k = n_k;
    memcpy(ec->k, k, sizeof k[0] * (size_t)n_k);
    return 1;
}

static void kd__eval_show_k(const void *opts, char *buf, size_t n) {
    const kd_eval_cfg *ec = &((const kd__eval_opts *)opts)->ec;
    size_t off = 0;
    buf[0] = '\0';
    for (int j = 0; j < ec->n_k && off < n; j++) off += (size_t)snprintf(buf + off, n - off, j ? ",%d" : "%d", ec->k[j]);
}

static int kd__eval_check_labels(const char *v, char *err, size_t n) {
    if (kd_label_spec_parse(v, NULL) == KD_OK) return 1;
    snprintf(err, n, "%s", kd_last_error());
    return 0;
}

#define KD__EV kd__eval_opts
#define KD__EV_FEATURES (KD__EVAL_KNN | KD__EVAL_LINEAR)
static const kd__flag kd__eval_flags[] = {
    /* The mode switches first: the usage lines name them first. */
    KD__FLAG_ROW_SWITCH("--knn", KD__EV, knn, .modes = KD__EVAL_KNN, .required = 1, .help = "evaluate by kNN"),
    KD__FLAG_ROW_SWITCH("--linear", KD__EV, linear, .modes = KD__EVAL_LINEAR, .required = 1,
                        .help = "evaluate by a linear classifier"),
    KD__FLAG_ROW_STR("--ckpt", KD__EV, ec.ckpt, "FILE", .required = 1, .help = "the checkpoint (.safetensors)"),
    KD__FLAG_ROW_STR("--data", KD__EV, ec.data, "DIR", .help = "the dataset, evaluated on its test split"),
    KD__FLAG_ROW_STR("--model", KD__EV, ec.arch, "ARCH", .empty = "the checkpoint's own", .help = "the architecture"),
    KD__FLAG_ROW_INT("--batch", KD__EV, ec.eval_batch, 1, 1000000000, "N",
                     .help = "evaluation batch (--knn, --linear: the feature-extraction batch)"),
    KD__FLAG_ROW_INT("--threads", KD__EV, ec.threads, 0, 1000000000, "N", .help = "compute threads (0: all cores)"),
    KD__FLAG_ROW_STR("--backend", KD__EV, ec.backend, "cpu|ref", .help = "compute backend"),
    KD__FLAG_ROW_SWITCH("--json", KD__EV, json, .help = "print the result as JSON (--knn, --linear: summary.json)"),
    KD__FLAG_ROW_CUSTOM("--k", "LIST", kd__eval_parse_k, kd__eval_show_k, .modes = KD__EVAL_KNN,
                        .help = "neighbour counts, comma-separated, each <= the training set"),
    KD__FLAG_ROW_POS("--temperature", KD__EV, ec.temperature, "T", .modes = KD__EVAL_KNN,
                     .help = "vote temperature"),
    KD__FLAG_ROW_INT("--epochs", KD__EV, ec.linear.epochs, 1, 1000000, "N", .modes = KD__EVAL_LINEAR,
                     .help = "epochs of the classifier"),
    KD__FLAG_ROW_POS("--lr", KD__EV, ec.linear.lr, "X", .modes = KD__EVAL_LINEAR,
                     .help = "learning rate of the classifier"),
    KD__FLAG_ROW_INT("--batch-size", KD__EV, ec.linear.batch_size, 1, 1000000000, "N", .modes = KD__EVAL_LINEAR,
                     .help = "batch size of the classifier"),
    KD__FLAG_ROW_STR("--out", KD__EV, ec.out, "DIR", .modes = KD__EV_FEATURES, .required = 1,
                     .help = "the run directory to write"),
    KD__FLAG_ROW_STR("--labels", KD__EV, ec.labels, "SPEC", .modes = KD__EV_FEATURES, .empty = "all",
                     .check = kd__eval_check_labels,
                     .help = "the labeled training images, a seeded class-balanced subset (P% or N per class, or a "
                             "file of dataset indices, labels.txt): the classifier's data (--linear) or the kNN "
                             "bank (--knn)"),
    KD__FLAG_ROW_U64("--seed", KD__EV, ec.linear.seed, "N", .modes = KD__EV_FEATURES,
                     .help = "the label subset, and the classifier's initialisation and data order"),
};
#undef KD__EV
#define KD__EVAL_NFLAGS ((int)(sizeof kd__eval_flags / sizeof kd__eval_flags[0]))

static void kd__eval_help(void) {
    kd__eval_opts d;
    kd__eval_defaults(&d);
    const kd__flag *t = kd__eval_flags;
    kd__flags_usage(stdout, "usage: kd eval", t, KD__EVAL_NFLAGS, KD__EVAL_ACCURACY, 0);
    kd__flags_usage(stdout, "       kd eval", t, KD__EVAL_NFLAGS, KD__EVAL_KNN, 1);
    kd__flags_usage(stdout, "       kd eval", t, KD__EVAL_NFLAGS, KD__EVAL_LINEAR, 1);
    printf("\nTop-1, top-5 and cross-entropy of the checkpoint on the test split of DIR\n"
           "(default %s). ARCH defaults to the checkpoint's own.\n\n",
           d.ec.data);
    kd__flags_help(stdout, t, KD__EVAL_NFLAGS, &d, 0, 0);
    printf("\n--knn: kNN classification of the checkpoint's pooled features (the input of its\n"
           "  classifier) as DINO's eval_knn: features of the training and test splits with the\n"
           "  evaluation transform, L2-normalised; each test image's k most cosine-similar\n"
           "  training images vote for their class with weight exp(sim / T); top-1 and top-5 for\n"
           "  each k. Ties: the smaller training index is nearer, the smaller class wins.\n");
    kd__flags_help(stdout, t, KD__EVAL_NFLAGS, &d, KD__EVAL_KNN, 0);
    printf("--linear: linear evaluation: the backbone frozen in eval mode, its pooled features\n"
           "  computed once with the evaluation transform (no augmentation); a linear classifier\n"
           "  (weight N(0,0.01), bias 0) trained on them with SGD (momentum 0.9, weight decay 0,\n"
           "  cosine schedule per step) on the labeled training set; test top-1 and top-5.\n"
           "  Deterministic in the seed.\n");
    kd__flags_help(stdout, t, KD__EVAL_NFLAGS, &d, KD__EVAL_LINEAR, 0);
    printf("Both:\n");
    kd__flags_help(stdout, t, KD__EVAL_NFLAGS, &d, KD__EV_FEATURES, 0);
    printf("  --ckpt random --model ARCH   the network at random initialisation (seeded by\n"
           "                     --seed): the baseline a pretrained encoder is measured against\n"
           "Both write the run directory --out DIR: config.yaml, metrics.jsonl, summary.json\n"
           "(and labels.txt with --labels); --batch is the feature-extraction batch.\n");
}

static int kd__cmd_eval(int argc, char **argv) {
    kd__eval_opts o;
    kd__eval_defaults(&o);
    unsigned char given[KD__EVAL_NFLAGS];
    int r = kd__flags_parse("eval", kd__eval_flags, KD__EVAL_NFLAGS, argc, argv, &o, given);
    if (r == KD__FLAGS_HELP) {
        kd__eval_help();
        return 0;
    }
    if (r != KD__FLAGS_GO_ON) return r;
    if (o.knn && o.linear) {
        fprintf(stderr, "kd eval: choose one of --knn and --linear\n");
        return KD_EXIT_USAGE;
    }
    int knn = o.knn, linear = o.linear, json = o.json;
    unsigned mode = knn ? KD__EVAL_KNN : linear ? KD__EVAL_LINEAR : KD__EVAL_ACCURACY;
    r = kd__flags_check("eval", kd__eval_flags, KD__EVAL_NFLAGS, given, mode, kd__eval_mode_names);
    if (r != KD__FLAGS_GO_ON) return r;
    kd_eval_cfg ec = o.ec;
    const char *ckpt = ec.ckpt, *data = ec.data, *arch = ec.arch[0] ? ec.arch : NULL, *backend = ec.backend;
    int batch = ec.eval_batch, threads = ec.threads;
    if (knn || linear) {
        ec.mode = knn ? KD_EVAL_KNN : KD_EVAL_LINEAR;
        kd_eval_result er;
        if (kd_eval_run(&ec, &er) != KD_OK) {
            fprintf(stderr, "kd eval: %s\n", kd_last_error());
            return er.config_error ? KD_EXIT_USAGE : KD_EXIT_FAIL;
        }
        if (json) {
            char path[600];
            snprintf(path, sizeof path, "%s/summary.json", ec.out);
            void *text = NULL;
            size_t n = 0;
            if (kd_file_read_all(path, &text, &n) != KD_OK) return kd__fail("eval");
            fwrite(text, 1, n, stdout);
            free(text);
        } else if (knn) {
            for (int j = 0; j < ec.n_k; j++)
                printf("%s kNN (k %d, T %g) on %lld test images, %lld training images: top1 %.2f%%  top5 %.2f%%\n",
                       ckpt, ec.k[j], ec.temperature, (long long)er.n_test, (long long)er.n_train, er.knn.top1[j],
                       er.knn.top5[j]);
        } else {
            printf("%s linear evaluation (%d epochs, lr %g, %lld training images) on %lld test images: top1 %.2f%%  "
                   "top5 %.2f%%\n",
                   ckpt, ec.linear.epochs, ec.linear.lr, (long long)er.n_train, (long long)er.n_test, er.linear.top1,
                   er.linear.top5);
        }
        return 0;
    }
    kd_set_num_threads(threads);
    kd_backend *be = NULL;
    kd_dataset *train = NULL, *test = NULL;
    kd_model *m = NULL;
    int rc = KD_EXIT_FAIL;
    if (kd_backend_get(backend, &be) != KD_OK) goto done;
    if (kd_dataset_open(data, 1, &train) != KD_OK) goto done;
    if (kd_dataset_open(data, 0, &test) != KD_OK) goto done;
    int classes = kd_dataset_num_classes(train);
    if (kd_dataset_num_classes(test) > classes) classes = kd_dataset_num_classes(test);
    kd_model_cfg mc = {.in_channels = kd_dataset_channels(test), .num_classes = classes, .seed = 0};
    if (kd_model_load_new(ckpt, arch, &mc, &m) != KD_OK) goto done;
    kd_transform_cfg tf = {.normalize = 1};
    kd_dataset_norm(train, tf.mean, tf.std);
    double t1, t5, loss;
    if (kd_evaluate(m, be, test, batch, &tf, &t1, &t5, &loss) != KD_OK) goto done;
    if (json)
        printf("{\"ckpt\": \"%s\", \"arch\": \"%s\", \"top1\": %.4f, \"top5\": %.4f, \"loss\": %.6f, \"n\": %lld}\n",
               ckpt, kd_model_arch(m), t1, t5, loss, (long long)kd_dataset_size(test));
    else
        printf("%s (%s) on %s test (%lld images): top1 %.2f%%  top5 %.2f%%  loss %.4f\n", ckpt, kd_model_arch(m),
               kd_dataset_name(test), (long long)kd_dataset_size(test), t1, t5, loss);
    rc = 0;
done:
    if (rc) kd__fail("eval");
    kd_model_free(m);
    kd_dataset_free(test);
    kd_dataset_free(train);
    return rc;
}

static int kd__cmd_info(int argc, char **argv) {
    if (argc < 1 || !strcmp(argv[0], "--help") || !strcmp(argv[0], "-h")) {
        printf("usage: kd info PATH\n\nDescribes a checkpoint (.safetensors: architecture, parameters,\n"
               "tensors) or a dataset directory (format, classes, counts, image size).\n");
        return argc < 1 ? KD_EXIT_USAGE : 0;
    }
    const char *path = argv[0];
    size_t len = strlen(path);
    if (len > 12 && strcmp(path + len - 12, ".safetensors") == 0) {
        kd_st_file *f = NULL;
        if (kd_st_open(path, &f) != KD_OK) return kd__fail("info");
        const char *arch = kd_st_meta(f, "arch");
        int64_t total = 0;
        for (int i = 0; i < kd_st_count(f); i++) {
            const kd_st_entry *e = kd_st_get(f, i);
            if (strncmp(e->name, "optim.", 6) == 0 || strstr(e->name, "running_") || strstr(e->name, "num_batches"))
                continue;
            int64_t n = 1;
            for (int d = 0; d < e->ndim; d++) n *= e->shape[d];
            total += n;
        }
        printf("%s: %d tensors, %lld parameters%s%s\n", path, kd_st_count(f), (long long)total,
               arch ? ", architecture " : "", arch ? arch : "");
        const char *keys[] = {"num_classes", "in_channels", "epochs_done", "best_top1", "kd_version"};
        for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++)
            if (kd_st_meta(f, keys[k])) printf("  %s: %s\n", keys[k], kd_st_meta(f, keys[k]));
        for (int i = 0; i < kd_st_count(f); i++) {
            const kd_st_entry *e = kd_st_get(f, i);
            printf("  %-48s %-4s (", e->name, kd_dtype_name(e->dtype));
            for (int d = 0; d < e->ndim; d++) printf(d ? ", %lld" : "%lld", (long long)e->shape[d]);
            printf(")\n");
        }
        kd_st_close(f);
        return 0;
    }
    kd_dataset *tr = NULL, *te = NULL, *un = NULL;
    kd_status st = kd_dataset_open(path, 1, &tr);
    if (st != KD_OK) {
        /* No labelled data: maybe a folder of unlabeled images. */
        char why[1024];
        snprintf(why, sizeof why, "%s", kd_last_error());
        if (st != KD_ERR_NOT_FOUND || kd_dataset_open_split(path, KD_SPLIT_UNLABELED, &un) != KD_OK) {
            kd_error(st, "%s", why);
            return kd__fail("info");
        }
    }
    if (tr && kd_dataset_open(path, 0, &te) != KD_OK && !kd_dataset_is_lazy(tr)) {
        kd_dataset_free(tr);
        return kd__fail("info");
    }
    /* Datasets read from files: their unlabeled split, when they have their own. */
    if (tr && kd_dataset_is_lazy(tr) && kd_dataset_open_split(path, KD_SPLIT_UNLABELED, &un) == KD_OK &&
        kd_dataset_path(un, 0) && strcmp(kd_dataset_path(un, 0), kd_dataset_path(tr, 0)) == 0 &&
        kd_dataset_size(un) == kd_dataset_size(tr)) {
        kd_dataset_free(un); /* only the training images without labels */
        un = NULL;
    }
    const kd_dataset *d = tr ? tr : un;
    char size[160];
    if (kd_dataset_height(d) > 0) {
        snprintf(size, sizeof size, "%dx%dx%d (C x H x W)", kd_dataset_channels(d), kd_dataset_height(d),
                 kd_dataset_width(d));
    } else {
        /* Differing sizes: the range over an even sample of up to 200 headers. */
        int64_t n = kd_dataset_size(d), m = n < 200 ? n : 200, bad = 0;
        int hmin = 0, hmax = 0, wmin = 0, wmax = 0, c = 0, h, w, seen = 0;
        for (int64_t k = 0; k < m; k++) {
            if (kd_dataset_probe(d, k * n / m, &c, &h, &w) != KD_OK) {
                bad++;
                continue;
            }
            if (!seen++ || h < hmin) hmin = h;
            if (seen == 1 || h > hmax) hmax = h;
            if (seen == 1 || w < wmin) wmin = w;
            if (seen == 1 || w > wmax) wmax = w;
        }
        snprintf(size, sizeof size, "variable, %d channels; H %d..%d, W %d..%d in a sample of %lld%s", kd_dataset_channels(d),
                 hmin, hmax, wmin, wmax, (long long)m, bad ? " (some unreadable)" : "");
    }
    printf("%s: %s, %d classes, images %s", path, kd_dataset_name(d), kd_dataset_num_classes(d), size);
    if (tr) printf(", train %lld", (long long)kd_dataset_size(tr));
    if (te) printf(", test %lld", (long long)kd_dataset_size(te));
    else if (tr) printf(", no test split");
    if (un) printf(", unlabeled %lld", (long long)kd_dataset_size(un));
    printf("\n");
    if (kd_dataset_class_name(d, 0)) {
        printf("  classes:");
        for (int k = 0; k < kd_dataset_num_classes(d); k++) printf(" %s", kd_dataset_class_name(d, k));
        printf("\n");
    }
    kd_dataset_free(un);
    kd_dataset_free(te);
    kd_dataset_free(tr);
    return 0;
}

/* `kd select`: SSLD's selection of unlabeled images (kd_select_run). */
static void kd__select_defaults(kd_select_cfg *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->data, sizeof c->data, "/usr/share/datasets/fashion-mnist");
    snprintf(c->backend, sizeof c->backend, "cpu");
    c->batch = 256;
}

#define KD__SC kd_select_cfg
static const kd__flag kd__select_flags[] = {
    KD__FLAG_ROW_STR("--teacher-ckpt", KD__SC, teacher_ckpt, "FILE", .required = 1,
                     .help = "the teacher's checkpoint"),
    KD__FLAG_ROW_I64("--per-class", KD__SC, per_class, 1, 1000000000, "K", .required = 1,
                     .help = "images kept per class"),
    KD__FLAG_ROW_STR("--out", KD__SC, out, "FILE", .required = 1, .help = "the index file to write"),
    KD__FLAG_ROW_STR("--data", KD__SC, data, "DIR", .help = "the dataset"),
    KD__FLAG_ROW_STR("--labels", KD__SC, labels, "SPEC", .empty = "none",
                     .help = "the labeled subset, as kd train --labels"),
    KD__FLAG_ROW_STR("--unlabeled", KD__SC, unlabeled, "SPEC", .empty = "none",
                     .help = "a dataset whose unlabeled images join the candidates"),
    KD__FLAG_ROW_U64("--seed", KD__SC, seed, "N", .help = "the seed of the label subset"),
    KD__FLAG_ROW_INT("--threads", KD__SC, threads, 0, 1000000000, "N", .help = "compute threads (0: all cores)"),
    KD__FLAG_ROW_INT("--batch", KD__SC, batch, 1, 1000000000, "N", .help = "the teacher's batch"),
    KD__FLAG_ROW_STR("--backend", KD__SC, backend, "cpu|ref", .help = "compute backend"),
};
#undef KD__SC
#define KD__SELECT_NFLAGS ((int)(sizeof kd__select_flags / sizeof kd__select_flags[0]))

static int kd__cmd_select(int argc, char **argv) {
    kd_select_cfg c;
    kd__select_defaults(&c);
    kd_select_cfg d;
    kd__select_defaults(&d);
    int r = kd__flags_run(
        "select", kd__select_flags, KD__SELECT_NFLAGS, argc, argv, &c, &d,
        "SSLD's data selection: the teacher scores every training image outside the label subset\n"
        "(--labels, seeded by --seed as in kd train) and, with --unlabeled, every image of that\n"
        "source (e.g. stl10:DIR's unlabeled_X.bin), numbered after the training split's; for each\n"
        "class the K images with the highest probability of that class are kept. FILE gets them and\n"
        "the labeled images, one dataset index per line: the train_indices of `kd distill --method\n"
        "ssld --train-indices FILE --labels SPEC --seed N [--unlabeled SPEC]`.\n");
    if (r != KD__FLAGS_GO_ON) return r;
    kd_select_result res;
    if (kd_select_run(&c, &res) != KD_OK) {
        kd__fail("select");
        return res.config_error ? KD_EXIT_USAGE : KD_EXIT_FAIL;
    }
    printf("%s: %lld images (%lld labeled, %lld selected; %lld copies of test images excluded)\n", c.out,
           (long long)res.total, (long long)res.labeled, (long long)res.selected, (long long)res.test_duplicates);
    return 0;
}

/* `kd export`: the student alone from a run's checkpoint (kd_model_export). */
typedef struct {
    char ckpt[1024], out[1024];
    int ema;
} kd__export_opts;

static const kd__flag kd__export_flags[] = {
    KD__FLAG_ROW_STR("--ckpt", kd__export_opts, ckpt, "FILE|RUN_DIR", .required = 1,
                     .help = "the checkpoint, or a run directory (its last.safetensors)"),
    KD__FLAG_ROW_STR("--out", kd__export_opts, out, "FILE", .required = 1, .help = "the file to write"),
    KD__FLAG_ROW_SWITCH("--ema", kd__export_opts, ema, .help = "export the EMA copy instead"),
};
#define KD__EXPORT_NFLAGS ((int)(sizeof kd__export_flags / sizeof kd__export_flags[0]))

static int kd__cmd_export(int argc, char **argv) {
    kd__export_opts o = {.ema = 0};
    const kd__export_opts d = {.ema = 0};
    int r = kd__flags_run(
        "export", kd__export_flags, KD__EXPORT_NFLAGS, argc, argv, &o, &d,
        "Writes the model of a checkpoint (RUN_DIR: its last.safetensors) alone: its tensors under\n"
        "PyTorch's state_dict names and the model metadata, without the optimiser state, the\n"
        "method's tensors or the EMA copy, for model.load_state_dict(strict=True) or kd eval.\n"
        "--ema exports the EMA copy instead (MoCo's key encoder, a DINO/EsViT teacher).\n");
    if (r != KD__FLAGS_GO_ON) return r;
    char *ckpt = o.ckpt, *out = o.out;
    int ema = o.ema;
    struct stat st;
    if (stat(ckpt, &st) == 0 && S_ISDIR(st.st_mode)) {
        size_t n = strlen(ckpt);
        if (n + sizeof "/last.safetensors" > sizeof o.ckpt) {
            fprintf(stderr, "kd export: run directory path %s is too long\n", ckpt);
            return KD_EXIT_USAGE;
        }
        snprintf(ckpt + n, sizeof o.ckpt - n, "/last.safetensors");
    }
    char rc[PATH_MAX], ro[PATH_MAX];
    if (realpath(ckpt, rc) && realpath(out, ro) && !strcmp(rc, ro)) {
        fprintf(stderr, "kd export: --out %s is the checkpoint itself: choose another file\n", out);
        return KD_EXIT_USAGE;
    }
    if (kd_model_export(ckpt, out, ema) != KD_OK) {
        kd__fail("export");
        return KD_EXIT_USAGE;
    }
    printf("%s: the model of %s%s\n", out, ckpt, ema ? " (its EMA copy)" : "");
    return 0;
}

static void kd__usage(void) {
    char names[256];
    kd__ssl_method_names(names, sizeof names, ", ");
    printf("kd %s: knowledge distillation in C\n\n"
           "usage: kd COMMAND [options]   (kd COMMAND --help for its options)\n\n"
           "  train     train a model with cross-entropy (a teacher, or a student alone)\n"
           "  distill   train a student from a teacher (--method kd, ...)\n"
           "  pretrain  self-supervised pretraining without labels (--method %s)\n"
           "  select    choose unlabeled images a teacher is surest of, per class (SSLD)\n"
           "  eval      evaluate a checkpoint on a dataset's test split\n"
           "  export    write the model of a run's checkpoint alone (PyTorch state_dict names)\n"
           "  info      describe a checkpoint or a dataset\n",
           kd_version(), names);
}

/* libgomp reads its settings when it is loaded, before main. Its default lets
 * idle OpenMP threads spin for ~300k iterations; on a small machine that
 * starves the data-loading thread and costs up to 9x in training speed
 * (docs/PERFORMANCE.md). Unless the user chose a policy, re-run ourselves once
 * with a short spin. */
static void kd__tune_openmp(char **argv) {
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || getenv("KD_OMP_TUNED")) return;
    setenv("GOMP_SPINCOUNT", "10000", 1);
    setenv("KD_OMP_TUNED", "1", 1);
    execv("/proc/self/exe", argv);
    /* If that failed we simply run with the defaults. */
}

static int kd__main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        kd__usage();
        return argc < 2 ? KD_EXIT_USAGE : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("kd %s\n", kd_version());
        return 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "train") || !strcmp(cmd, "distill") || !strcmp(cmd, "pretrain"))
        return kd__cmd_train(cmd, argc - 2, argv + 2);
    if (!strcmp(cmd, "eval")) return kd__cmd_eval(argc - 2, argv + 2);
    if (!strcmp(cmd, "select")) return kd__cmd_select(argc - 2, argv + 2);
    if (!strcmp(cmd, "info")) return kd__cmd_info(argc - 2, argv + 2);
    if (!strcmp(cmd, "export")) return kd__cmd_export(argc - 2, argv + 2);
    fprintf(stderr, "kd: unknown command '%s' (commands: train, distill, pretrain, select, eval, export, info)\n",
            cmd);
    return KD_EXIT_USAGE;
}

/* Under mpirun or srun (kd/dist.h) each process learns its rank here; the
 * ranks other than 0 print no results and log only errors. */
int main(int argc, char **argv) {
    kd__tune_openmp(argv);
    if (kd_dist_init() != KD_OK) {
        if (!kd_dist_error_quiet()) fprintf(stderr, "kd: %s\n", kd_last_error());
        kd_dist_finalize();
        return KD_EXIT_FAIL;
    }
    if (kd_dist_rank() > 0) {
        kd_log_set_level(KD_LOG_ERROR); /* rank 0 logs what every rank would */
        if (!freopen("/dev/null", "w", stdout)) kd_log_msg(KD_LOG_WARN, "cannot silence stdout of rank %d", kd_dist_rank());
    }
    int rc = kd__main(argc, argv);
    kd_dist_finalize();
    return rc;
}
