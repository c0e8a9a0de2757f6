/* Crash anywhere: `kd train` and `kd distill` killed with SIGKILL at random
 * moments, then continued with `--resume DIR`, end bit-identical to the same
 * run left uninterrupted, and metrics.jsonl holds each record exactly once.
 *
 * For each scenario (plain training; vid, a method with trainable state;
 * plain training with bf16 convolutions where the CPU has AVX512-BF16) one
 * uninterrupted run gives the reference, then KD_CRASH_POINTS (default 20; 4
 * under AddressSanitizer) runs are each killed once and resumed. The kill
 * points come from a seeded stream (KD_CRASH_SEED, default 1; the seed is
 * printed) and cycle through four kinds:
 *   - time:    a uniform moment in [0, 0.9 D] of the uninterrupted run's
 *              duration D (mostly mid-epoch);
 *   - tmpfile: the k-th creation of a temporary file in the run directory
 *              (inotify): mid-checkpoint, mid-summary, mid-config;
 *   - metrics: the k-th write to metrics.jsonl (inotify; one per epoch: the
 *              epoch's step records and its epoch record): mid-metrics,
 *              between an epoch's record and its checkpoint;
 *   - rename:  the k-th rename of a new last.safetensors into place: right
 *              after a checkpoint, before its directory fsync and the rest of
 *              the epoch's files.
 * After each kill: `--resume DIR` (or, when the kill came before config.yaml
 * existed, the original command again: nothing had started), then
 *   - last.safetensors (every tensor, optimiser and method state included)
 *     and best.safetensors equal the uninterrupted run's byte for byte;
 *   - metrics.jsonl has the uninterrupted run's records, in order, each once
 *     (timing fields images_per_s, epoch_s, wall_s removed before comparing;
 *     every other field, losses included, must match exactly);
 *   - no temporary file ("*.tmp.*") is left in the run directory.
 * A summary line gives how many kills landed in each phase.
 *
 * Data: the first 256 training and 128 test images of Fashion-MNIST
 * (/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist),
 * written as an uncompressed IDX subset; resnet8, 3 epochs of 8 steps, the
 * default cpu backend (ref where oneDNN is not built in).
 *
 * Also: a resume with another thread count is refused with a message naming
 * both counts, and allowed with --allow-thread-change 1 with a warning that
 * bit-identity is lost; a stale temporary file of a dead process is removed. */
#define _GNU_SOURCE 1
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "kd/backend.h"
#include "kd/io.h"
#include "testutil.h"

#define KD_EXE KD_BINARY_DIR "/kd"
#define FASHION "/usr/share/datasets/fashion-mnist"
#define N_TRAIN 256
#define N_TEST 128
#define EPOCHS 3

#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif

static char g_root[600];
static char g_data[700];
static char g_teacher[800];
static const char *g_backend = "cpu";
static uint64_t g_seed = 1;
static int g_points = 20;

#define RUN(...) kd_test_run_kd(g_root, (const char *const[]){__VA_ARGS__, NULL})

/* Copies the first n images of one Fashion-MNIST split (gzip IDX) into an
 * uncompressed IDX file pair under g_data. Returns 0, or -1 when the dataset
 * is not there. */
static int copy_split(const char *prefix, int n) {
    const char *kinds[2] = {"images-idx3-ubyte", "labels-idx1-ubyte"};
    for (int k = 0; k < 2; k++) {
        char src[900], dst[900];
        snprintf(src, sizeof src, "%s/%s-%s.gz", FASHION, prefix, kinds[k]);
        snprintf(dst, sizeof dst, "%s/%s-%s", g_data, prefix, kinds[k]);
        gzFile gz = gzopen(src, "rb");
        if (!gz) return -1;
        size_t head = k == 0 ? 16 : 8, item = k == 0 ? 28 * 28 : 1;
        size_t len = head + (size_t)n * item;
        unsigned char *buf = malloc(len);
        if (!buf) fail_msg("out of memory");
        int got = gzread(gz, buf, (unsigned)len);
        gzclose(gz);
        if (got != (int)len) {
            free(buf);
            return -1;
        }
        buf[4] = (unsigned char)(n >> 24);
        buf[5] = (unsigned char)(n >> 16);
        buf[6] = (unsigned char)(n >> 8);
        buf[7] = (unsigned char)n;
        FILE *f = fopen(dst, "wb");
        if (!f || fwrite(buf, 1, len, f) != len || fclose(f) != 0) fail_msg("cannot write %s", dst);
        free(buf);
    }
    return 0;
}

static int group_setup(void **state) {
    (void)state;
    snprintf(g_root, sizeof g_root, "%s", kd_test_tmpdir("test_crash_resume"));
    snprintf(g_data, sizeof g_data, "%s/fashion_subset", g_root);
    mkdir(g_data, 0755);
    if (copy_split("train", N_TRAIN) != 0 || copy_split("t10k", N_TEST) != 0) {
        fprintf(stderr, "%s is missing (Debian package dataset-fashion-mnist): using generated data\n",
                FASHION);
        kd_test_write_idx(g_data, N_TRAIN, N_TEST, 28);
    }
    kd_backend *be = NULL;
    if (kd_backend_get("cpu", &be) != KD_OK) g_backend = "ref";
    const char *v = getenv("KD_CRASH_SEED");
    if (v && *v) g_seed = strtoull(v, NULL, 10);
#ifdef TEST_ASAN
    g_points = 4;
#endif
    v = getenv("KD_CRASH_POINTS");
    if (v && *v) g_points = atoi(v);
    if (access(KD_EXE, X_OK) != 0) {
        fprintf(stderr, "%s is not built\n", KD_EXE);
        return -1;
    }
    printf("crash points per scenario %d, seed %llu (KD_CRASH_SEED), backend %s\n", g_points,
           (unsigned long long)g_seed, g_backend);
    return 0;
}

/* ------------------------------------------------------------- helpers */

static int has_tmp_files(const char *dir, char *name, size_t n) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *e;
    int found = 0;
    while ((e = readdir(d)))
        if (strstr(e->d_name, ".tmp.")) {
            if (!found && name) snprintf(name, n, "%s", e->d_name);
            found++;
        }
    closedir(d);
    return found;
}

static void rm_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char p[1400];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

/* metrics.jsonl without the timing fields; NULL when unreadable. */
static char *metrics_normalised(const char *dir) {
    char path[900];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    size_t n = 0;
    char *m = kd_test_slurp(path, &n);
    if (!m) return NULL;
    static const char *const timing[] = {", \"images_per_s\": ", ", \"epoch_s\": ", ", \"wall_s\": "};
    char *out = malloc(n + 1);
    if (!out) fail_msg("out of memory");
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        int skipped = 0;
        for (int t = 0; t < 3 && !skipped; t++) {
            size_t tl = strlen(timing[t]);
            if (!strncmp(m + i, timing[t], tl)) {
                i += tl;
                while (i < n && m[i] != ',' && m[i] != '}') i++;
                skipped = 1;
            }
        }
        if (!skipped) out[o++] = m[i++];
    }
    out[o] = '\0';
    free(m);
    return out;
}

static int count_records(const char *dir, const char *type) {
    char path[900], pat[64];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    snprintf(pat, sizeof pat, "\"type\": \"%s\"", type);
    char *m = kd_test_slurp(path, NULL);
    if (!m) return 0;
    int c = 0;
    for (char *q = m; (q = strstr(q, pat)); q++) c++;
    free(m);
    return c;
}

static int epochs_done(const char *dir) {
    char path[900];
    snprintf(path, sizeof path, "%s/last.safetensors", dir);
    kd_st_file *f = NULL;
    if (kd_st_open(path, &f) != KD_OK) return -1; /* none yet */
    const char *ed = kd_st_meta(f, "epochs_done");
    int d = ed ? atoi(ed) : -2;
    kd_st_close(f);
    return d;
}

/* The teacher for the vid scenario: resnet8, a few steps of `kd train`. */
static void need_teacher(void) {
    if (g_teacher[0]) return;
    char out[700];
    snprintf(out, sizeof out, "%s/teacher", g_root);
    kd_test_proc p = RUN("train", "--data", g_data, "--model", "resnet8", "--epochs", "1", "--batch-size", "32",
                         "--max-steps-per-epoch", "4", "--backend", g_backend, "--threads", "1", "--workers", "0",
                         "--progress", "0", "--lr", "0.05", "--out", out);
    kd_test_expect_ok(&p, "kd train (teacher)");
    kd_test_proc_free(&p);
    snprintf(g_teacher, sizeof g_teacher, "%s/best.safetensors", out);
}

/* ------------------------------------------------------------ scenario */

#define MAX_ARGS 48

typedef struct {
    const char *args[MAX_ARGS]; /* the command without --out */
    int n;
} argv_t;

static void argv_push(argv_t *a, const char *s) {
    if (a->n >= MAX_ARGS - 3) fail_msg("too many arguments");
    a->args[a->n++] = s;
}

static kd_test_proc run_args(const argv_t *a, const char *out) {
    const char *v[MAX_ARGS];
    int n = 0;
    for (int i = 0; i < a->n; i++) v[n++] = a->args[i];
    v[n++] = "--out";
    v[n++] = out;
    v[n] = NULL;
    return kd_test_run_kd(g_root, v);
}

enum { K_TIME, K_TMPFILE, K_METRICS, K_RENAME, K_KINDS };
static const char *const kind_name[K_KINDS] = {"time", "tmpfile", "metrics", "rename"};

/* Phases a kill landed in (from what the directory held right after it). */
enum { P_BEFORE_CONFIG, P_BEFORE_CKPT, P_MID_EPOCH, P_MID_TMPFILE, P_RECORD_NO_CKPT, P_FINISHED, P_COUNT };
static const char *const phase_name[P_COUNT] = {
    "before config.yaml", "first epoch (no checkpoint yet)", "mid-epoch", "mid-write of a temporary file",
    "epoch record written, its checkpoint not yet", "after the run finished"};

/* Starts the command into dir, kills it at the kill point, and returns the
 * phase it was in. */
static int kill_once(const argv_t *a, const char *dir, int kind, double at, int nth, double *when) {
    mkdir(dir, 0755);
    int in = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (in < 0) fail_msg("inotify_init1: %s", strerror(errno));
    if (inotify_add_watch(in, dir, IN_CREATE | IN_MODIFY | IN_MOVED_TO) < 0) fail_msg("inotify_add_watch: %s", strerror(errno));
    const char *v[MAX_ARGS];
    int n = 0;
    for (int i = 0; i < a->n; i++) v[n++] = a->args[i];
    v[n++] = "--out";
    v[n++] = dir;
    v[n] = NULL;
    kd_test_child child = kd_test_spawn_kd(g_root, v);
    int ws = 0, finished = 0, seen = 0;
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    for (;;) {
        pid_t w = waitpid(child.pid, &ws, WNOHANG);
        if (w == child.pid) {
            finished = 1;
            break;
        }
        double now = kd_test_now() - child.t0;
        if (kind == K_TIME && now >= at) break;
        if (now > 300) break;
        struct pollfd pfd = {in, POLLIN, 0};
        int timeout = 1;
        if (poll(&pfd, 1, timeout) > 0) {
            ssize_t len = read(in, buf, sizeof buf);
            int hit = 0;
            for (char *p = buf; len > 0 && p < buf + len;) {
                struct inotify_event *e = (struct inotify_event *)p;
                if (e->len > 0) {
                    if (kind == K_TMPFILE && (e->mask & IN_CREATE) && strstr(e->name, ".tmp.") && ++seen >= nth)
                        hit = 1;
                    if (kind == K_METRICS && (e->mask & IN_MODIFY) && !strcmp(e->name, "metrics.jsonl") &&
                        ++seen >= nth)
                        hit = 1;
                    if (kind == K_RENAME && (e->mask & IN_MOVED_TO) && !strcmp(e->name, "last.safetensors") &&
                        ++seen >= nth)
                        hit = 1;
                }
                p += sizeof *e + e->len;
            }
            if (hit) break;
        }
    }
    if (!finished) {
        kill(child.pid, SIGKILL);
        while (waitpid(child.pid, &ws, 0) < 0 && errno == EINTR) {
        }
    }
    *when = kd_test_now() - child.t0;
    close(in);
    kd_test_proc p = kd_test_collect(&child, ws);
    int killed = p.signal == SIGKILL;
    if (!killed && (p.status != 0 || p.signal)) {
        kd_test_proc_dump(&p, NULL);
        kd_test_proc_free(&p);
        fail_msg("the run failed before it could be killed");
    }
    kd_test_proc_free(&p);
    if (!killed) return P_FINISHED;
    char cfg[900];
    snprintf(cfg, sizeof cfg, "%s/config.yaml", dir);
    if (access(cfg, F_OK) != 0) return P_BEFORE_CONFIG;
    if (has_tmp_files(dir, NULL, 0)) return P_MID_TMPFILE;
    int ed = epochs_done(dir);
    if (count_records(dir, "epoch") > (ed < 0 ? 0 : ed)) return P_RECORD_NO_CKPT;
    if (ed < 0) return P_BEFORE_CKPT;
    return P_MID_EPOCH;
}

static void crash_scenario(const char *tag, const argv_t *a) {
    char full[700], msg[2048];
    snprintf(full, sizeof full, "%s/%s_full", g_root, tag);
    rm_tree(full);
    kd_test_proc p = run_args(a, full);
    kd_test_expect_ok(&p, "uninterrupted run");
    double D = p.secs;
    kd_test_proc_free(&p);
    char *want = metrics_normalised(full);
    assert_non_null(want);
    assert_int_equal(count_records(full, "epoch"), EPOCHS);
    printf("  %s: uninterrupted run %.2f s\n", tag, D);

    kd_rng rng;
    kd_rng_init(&rng, g_seed, 0xc4a5);
    int phases[P_COUNT] = {0}, stale_seen = 0;
    double t0 = kd_test_now();
    for (int i = 0; i < g_points; i++) {
        int kind = i % K_KINDS;
        double at = 0.9 * D * kd_rng_uniform(&rng);
        int nth = 1 + (int)kd_rng_below(&rng, kind == K_TMPFILE ? 3 * EPOCHS + 1 : EPOCHS);
        char dir[700], a_path[900], b_path[900], tmpname[300] = "";
        snprintf(dir, sizeof dir, "%s/%s_kill%02d", g_root, tag, i);
        rm_tree(dir);
        double when = 0;
        int phase = kill_once(a, dir, kind, at, nth, &when);
        phases[phase]++;
        int stale = has_tmp_files(dir, tmpname, sizeof tmpname);
        stale_seen += stale > 0;
        int ed = epochs_done(dir);
        /* Continue: --resume, or the original command when nothing started. */
        if (phase == P_BEFORE_CONFIG) {
            p = run_args(a, dir);
        } else {
            const char *cmd = a->args[0];
            p = RUN(cmd, "--resume", dir);
        }
        if (p.status != 0 || p.signal) {
            kd_test_proc_dump(&p, NULL);
            kd_test_proc_free(&p);
            fail_msg("%s kill %d (%s, %s): the continuation failed", tag, i, kind_name[kind], phase_name[phase]);
        }
        kd_test_proc_free(&p);
        snprintf(a_path, sizeof a_path, "%s/last.safetensors", full);
        snprintf(b_path, sizeof b_path, "%s/last.safetensors", dir);
        if (kd_test_ckpts_differ(a_path, b_path, KD_TEST_CKPT_WITH_OPTIM, msg, sizeof msg))
            fail_msg("%s kill %d (%s at %.3f s, %s): last.safetensors differs: %s", tag, i, kind_name[kind], when,
                     phase_name[phase], msg);
        snprintf(a_path, sizeof a_path, "%s/best.safetensors", full);
        snprintf(b_path, sizeof b_path, "%s/best.safetensors", dir);
        if (kd_test_ckpts_differ(a_path, b_path, KD_TEST_CKPT_MODEL, msg, sizeof msg))
            fail_msg("%s kill %d (%s, %s): best.safetensors differs: %s", tag, i, kind_name[kind],
                     phase_name[phase], msg);
        char *got = metrics_normalised(dir);
        assert_non_null(got);
        if (strcmp(got, want) != 0) {
            fprintf(stderr, "uninterrupted metrics.jsonl (timing removed):\n%s\nafter the kill and resume:\n%s\n",
                    want, got);
            free(got);
            fail_msg("%s kill %d (%s at %.3f s, %s): metrics.jsonl differs (a record lost, repeated or changed)",
                     tag, i, kind_name[kind], when, phase_name[phase]);
        }
        free(got);
        char left[300];
        if (has_tmp_files(dir, left, sizeof left))
            fail_msg("%s kill %d: the temporary file %s was left in %s", tag, i, left, dir);
        printf("  %s kill %2d: %-7s at %6.3f s: %s (checkpoint epochs %d%s%s): resumed, identical\n", tag, i,
               kind_name[kind], when, phase_name[phase], ed < 0 ? 0 : ed, stale ? ", stale " : "",
               stale ? tmpname : "");
        rm_tree(dir);
    }
    free(want);
    printf("  %s: %d kill points in %.1f s, all identical to the uninterrupted run; phases:", tag, g_points,
           kd_test_now() - t0);
    for (int k = 0; k < P_COUNT; k++)
        if (phases[k]) printf(" %s %d;", phase_name[k], phases[k]);
    printf(" stale temporary files found and removed after %d kills\n", stale_seen);
}

static void common_flags(argv_t *a, const char *cmd) {
    const char *f[] = {cmd, "--data", g_data, "--model", "resnet8", "--epochs", "3", "--batch-size", "32",
                       "--backend", g_backend, "--threads", "1", "--workers", "0", "--progress", "0", "--lr",
                       "0.05", "--schedule", "cosine", "--log-every", "2", "--eval-batch", "128", "--seed", "3"};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) argv_push(a, f[i]);
}

static void test_crash_train(void **state) {
    (void)state;
    argv_t a = {{0}, 0};
    common_flags(&a, "train");
    crash_scenario("train", &a);
}

static void test_crash_vid(void **state) {
    (void)state;
    need_teacher();
    argv_t a = {{0}, 0};
    common_flags(&a, "distill");
    argv_push(&a, "--method");
    argv_push(&a, "vid");
    argv_push(&a, "--teacher-ckpt");
    argv_push(&a, g_teacher);
    crash_scenario("vid", &a);
}

/* bf16 convolutions: only where the CPU has them (the cpu backend says). */
static void test_crash_bf16(void **state) {
    (void)state;
    kd_backend *be = NULL;
    if (strcmp(g_backend, "cpu") != 0 || kd_backend_get("cpu", &be) != KD_OK || !be->bf16) {
        printf("  no bf16 convolutions on this CPU or build\n");
        skip();
        return;
    }
    argv_t a = {{0}, 0};
    common_flags(&a, "train");
    argv_push(&a, "--precision");
    argv_push(&a, "bf16");
    crash_scenario("bf16", &a);
}

/* A resume with another compute thread count is refused, naming both counts;
 * --allow-thread-change 1 allows it with a warning that bit-identity is lost.
 * A stale temporary file of a dead process is removed on resume. */
static void test_resume_threads_and_stale_tmp(void **state) {
    (void)state;
    char dir[700], stale[900];
    snprintf(dir, sizeof dir, "%s/threads", g_root);
    rm_tree(dir);
    argv_t a = {{0}, 0};
    common_flags(&a, "train");
    argv_push(&a, "--stop-after");
    argv_push(&a, "1");
    kd_test_proc p = run_args(&a, dir);
    kd_test_expect_ok(&p, "kd train --stop-after 1");
    kd_test_proc_free(&p);

    p = RUN("train", "--resume", dir, "--threads", "2");
    if (p.status == 0) fail_msg("a resume with 2 threads instead of 1 was accepted");
    if (!strstr(p.err, "trained with 1 compute threads") || !strstr(p.err, "would use 2") ||
        !strstr(p.err, "--allow-thread-change")) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("the refusal does not name both thread counts and the way out");
    }
    kd_test_proc_free(&p);
    assert_int_equal(epochs_done(dir), 1);

    /* A temporary file left by a process that no longer runs. */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) _exit(0);
    waitpid(pid, NULL, 0);
    snprintf(stale, sizeof stale, "%s/last.safetensors.tmp.%ld", dir, (long)pid);
    FILE *f = fopen(stale, "wb");
    assert_non_null(f);
    fputs("half a checkpoint", f);
    fclose(f);

    p = RUN("train", "--resume", dir, "--threads", "2", "--allow-thread-change", "1", "--stop-after", "1");
    kd_test_expect_ok(&p, "kd train --resume --threads 2 --allow-thread-change 1");
    if (!strstr(p.err, "no longer bit-identical")) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("an allowed thread change does not warn that bit-identity is lost");
    }
    kd_test_proc_free(&p);
    assert_int_equal(epochs_done(dir), 2);
    if (access(stale, F_OK) == 0) fail_msg("the stale temporary file %s was not removed", stale);
    rm_tree(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resume_threads_and_stale_tmp),
        cmocka_unit_test(test_crash_train),
        cmocka_unit_test(test_crash_vid),
        cmocka_unit_test(test_crash_bf16),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}
