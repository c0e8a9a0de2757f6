/* Data-parallel training over Open MPI (include/kd/dist.h,
 * src/train/data_parallel.c, docs/DISTRIBUTED.md).
 *
 * In process (no MPI needed): synchronised batch norm of two "ranks" (two
 * threads, each with its own graph and half of the batch, joined by a
 * barrier-based sum) against batch norm of the whole batch in one graph:
 * outputs, running statistics, and the input and gamma/beta gradients of a
 * mean loss; equal and unequal halves; the ref backend and the cpu backend's
 * blocked layout (NCHW16C).
 *
 * Under mpirun (skipped, exit 77, when kd was built without MPI or mpirun is
 * missing; over loopback/shared memory, --oversubscribe):
 *  - the kd_dist API on 3 ranks (this program started by mpirun in child
 *    mode): sums, non-blocking sums, broadcast, all-gather, barrier, agree;
 *  - `mpirun -np 2` and `-np 3` runs of a tiny `kd train` (sync_bn 1, small
 *    gradient buckets overlapped with backward) against one process with the
 *    same global batch: every step's loss in metrics.jsonl and every tensor
 *    of last.safetensors within the tolerance below; buckets posted from
 *    the backward hook equal, bit for bit, buckets posted after backward;
 *    without sync_bn the runs differ by far more than the tolerance (so the
 *    comparison can fail); `kd distill --method kd` (frozen teacher) -np 2;
 *  - `--resume` with the same number of ranks continues bit-identically;
 *    with another, one error line and exit 2;
 *  - a rank killed mid-run (KD_DIST_TEST_DIE=1:STEP) ends the job within
 *    seconds with mpirun naming the rank; a rank that hangs makes the others
 *    fail with the collective timeout (KD_DIST_TIMEOUT) instead of waiting;
 *  - bad input, one error line from rank 0 and a non-zero exit: a batch not
 *    divisible by the ranks, ranks with different settings, ranks with
 *    different data behind the same path;
 *  - two hosts for real: rank 0 and rank 1 in two network namespaces joined by
 *    a veth pair (10.x.y.1 and .2), mpirun reaching the second through `ip
 *    netns exec` (its rsh agent, no ssh), MPI over TCP only (no shared
 *    memory): the -np 2 run equals one process as above, and the gradient
 *    bytes of every step crossed the veth interface (its counters). Skipped
 *    where network namespaces cannot be made (not root, no iproute2, a
 *    container without CAP_SYS_ADMIN);
 *  - Slurm: `srun -n 2 --mpi=pmix` of the same run equals `mpirun -np 2` bit
 *    for bit (step losses, every tensor of last.safetensors); `srun -n 2
 *    --mpi=none` fails with one error line. Skipped where `srun -n 1 true`
 *    does not run within 20 s (no Slurm cluster, as in CI).
 *
 * Tolerance of the equality tests. A rank's gradient is (rows / global
 * rows) times the gradient of the mean loss over its rows, and the ranks'
 * are summed in float32; one process sums the same per-sample terms in
 * another order. The two differ in the last bits of each step's gradient
 * (float32 epsilon 6e-8 relative, a few ulps per sum), and SGD with momentum
 * carries that over the steps. The runs use learning rates at which the
 * tiny trajectory is not chaotic: at lr 0.1 (train) or 0.05 (distill) a
 * 1e-6 relative change of the learning rate of ONE process already moves
 * the step losses by 1e-4..1e-3 within 16 steps (the same figures a -np 3
 * run shows there), at lr 0.05 (train) and 0.02 (distill) by at most 6e-7
 * and 2e-6. Measured here, -np N against one process: at most ~3e-6 absolute
 * on any weight or buffer of the model (-np 2; -np 3 with shards of 5 and
 * 2/3/3 rows), ~1e-6 relative on the step losses. The tests allow |a - b| <=
 * 2e-5 + 1e-4 |b| on the model's tensors and 1e-5 relative on losses, about
 * 10x that, while the same runs without sync_bn differ by O(1). Momentum
 * buffers are sums of the latest gradients, and a gradient is not smooth in
 * the weights: a ReLU input within rounding of 0 takes the other side in one
 * run (the -np 2 run's last step here moves 18 of 78k momentum elements by
 * up to 4e-5, 2e-4 relative to their tensors' norms, its loss by 2e-7). They
 * are compared in relative L2 norm per tensor, within 1e-3: a missing, doubled
 * or misscaled share of a gradient is off by 0.3 or more. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kd/autograd.h"
#include "kd/backend.h"
#include "kd/dist.h"
#include "kd/io.h"
#include "testutil.h"

extern char **environ;

#define KD_EXE KD_BINARY_DIR "/kd"
#define W_ATOL 2e-5
#define W_RTOL 1e-4
#define LOSS_RTOL 1e-5
#define MOM_RTOL 1e-3

#if defined(KD_WITH_MPI) && defined(KD_MPIEXEC)
#define HAVE_MPI 1
#else
#define HAVE_MPI 0
#define KD_MPIEXEC "mpirun"
#endif

static char g_self[1024]; /* this program, for the API child */
static char g_root[600];
static char g_data[700];

/* ------------------------------------------------- synchronised batch norm */

/* Two threads summing through shared slots. */
typedef struct {
    pthread_barrier_t bar;
    double *slot[2];
    int64_t n;
} kd__pair;

typedef struct {
    kd__pair *pair;
    int rank;
} kd__pair_user;

static kd_status pair_sum(double *buf, int64_t n, void *user) {
    kd__pair_user *u = user;
    kd__pair *p = u->pair;
    p->slot[u->rank] = buf;
    p->n = n;
    pthread_barrier_wait(&p->bar);
    double *tmp = malloc((size_t)n * sizeof *tmp);
    for (int64_t i = 0; i < n; i++) tmp[i] = p->slot[0][i] + p->slot[1][i];
    pthread_barrier_wait(&p->bar);
    memcpy(buf, tmp, (size_t)n * sizeof *tmp);
    free(tmp);
    pthread_barrier_wait(&p->bar);
    return KD_OK;
}

/* One process's batch norm: x rows [lo, hi) of the full input, its own
 * copies of gamma, beta and the running statistics; loss = mse(y, target)
 * over its rows (a mean). Outputs y, dx (rows), dgamma, dbeta, running. */
typedef struct {
    const char *backend;
    int blocked;
    int64_t N, C, H, W, lo, hi;
    const float *x, *target, *gamma, *beta;
    kd__pair_user *sum; /* NULL: no synchronisation */
    double scale;
    float *y, *dx, *dgamma, *dbeta, *rmean, *rvar; /* outputs */
    kd_status status;
    char msg[512];
} kd__bn_job;

static void *bn_job_run(void *arg) {
    kd__bn_job *j = arg;
    kd_backend *be = NULL;
    kd_graph *g = NULL;
    const int64_t n = j->hi - j->lo, per = j->C * j->H * j->W;
    int64_t xs[4] = {n, j->C, j->H, j->W}, cs[1] = {j->C};
    kd_tensor *x = NULL, *gm = NULL, *bt = NULL, *rm = NULL, *rv = NULL;
    kd_status s = kd_backend_get(j->backend, &be);
    if (s == KD_OK) s = kd_graph_init(&g, be);
    if (s == KD_OK) s = kd_tensor_new(KD_F32, 4, xs, &x);
    if (s == KD_OK) s = kd_tensor_new(KD_F32, 1, cs, &gm);
    if (s == KD_OK) s = kd_tensor_new(KD_F32, 1, cs, &bt);
    if (s == KD_OK) s = kd_tensor_new(KD_F32, 1, cs, &rm);
    if (s == KD_OK) s = kd_tensor_new(KD_F32, 1, cs, &rv);
    if (s == KD_OK) s = kd_tensor_require_grad(x);
    if (s == KD_OK) s = kd_tensor_require_grad(gm);
    if (s == KD_OK) s = kd_tensor_require_grad(bt);
    if (s == KD_OK) {
        memcpy(x->data, j->x + j->lo * per, (size_t)(n * per) * sizeof(float));
        memcpy(gm->data, j->gamma, (size_t)j->C * sizeof(float));
        memcpy(bt->data, j->beta, (size_t)j->C * sizeof(float));
        for (int64_t c = 0; c < j->C; c++) kd_f32(rm)[c] = 0.0f, kd_f32(rv)[c] = 1.0f;
        if (j->sum) kd_graph_set_sync_bn(g, pair_sum, j->sum, j->scale);
        kd_bn_params bp = {1e-5f, 0.1f, 1};
        kd_tensor *xin = j->blocked ? kd_graph_to_blocked(g, x) : x;
        kd_tensor *y = kd_batchnorm(g, xin, gm, bt, rm, rv, &bp);
        if (j->blocked && y && y->layout != KD_LAYOUT_NCHW16C && kd_graph_status(g) == KD_OK)
            s = kd_error(KD_ERR_INTERNAL, "the cpu backend kept no blocked layout");
        kd_tensor *ys = kd_graph_to_strided(g, y);
        kd_tensor *t = kd_graph_wrap(g, KD_F32, 4, xs, (void *)(j->target + j->lo * per));
        kd_tensor *loss = kd_mse(g, ys, t);
        if (s == KD_OK) s = kd_graph_status(g);
        if (s == KD_OK) s = kd_backward(g, loss);
        if (s == KD_OK) {
            memcpy(j->y + j->lo * per, ys->data, (size_t)(n * per) * sizeof(float));
            memcpy(j->dx + j->lo * per, kd_f32(x->grad), (size_t)(n * per) * sizeof(float));
            memcpy(j->dgamma, kd_f32(gm->grad), (size_t)j->C * sizeof(float));
            memcpy(j->dbeta, kd_f32(bt->grad), (size_t)j->C * sizeof(float));
            memcpy(j->rmean, rm->data, (size_t)j->C * sizeof(float));
            memcpy(j->rvar, rv->data, (size_t)j->C * sizeof(float));
        }
    }
    if (s != KD_OK) snprintf(j->msg, sizeof j->msg, "%s", kd_last_error());
    j->status = s;
    kd_tensor_free(x);
    kd_tensor_free(gm);
    kd_tensor_free(bt);
    kd_tensor_free(rm);
    kd_tensor_free(rv);
    kd_graph_free(g);
    return NULL;
}

/* SyncBN of rows [0, split) and [split, N) in two threads against plain BN of
 * all N rows. */
static void check_sync_bn(const char *backend, int blocked, int64_t N, int64_t C, int64_t HW, int64_t split) {
    const int64_t per = C * HW * HW, tot = N * per;
    float *x = malloc((size_t)tot * sizeof *x), *target = malloc((size_t)tot * sizeof *target);
    float gamma[64], beta[64];
    kd_test_fill_uniform(x, tot, -2.0f, 3.0f, 11);
    kd_test_fill_uniform(target, tot, -1.0f, 1.0f, 12);
    kd_test_fill_uniform(gamma, C, 0.5f, 1.5f, 13);
    kd_test_fill_uniform(beta, C, -0.5f, 0.5f, 14);
    float *y1 = calloc((size_t)tot, sizeof *y1), *dx1 = calloc((size_t)tot, sizeof *dx1);
    float *y2 = calloc((size_t)tot, sizeof *y2), *dx2 = calloc((size_t)tot, sizeof *dx2);
    float dg1[64], db1[64], rm1[64], rv1[64], dg2[2][64], db2[2][64], rm2[2][64], rv2[2][64];
    kd__bn_job one = {.backend = backend, .blocked = blocked, .N = N, .C = C, .H = HW, .W = HW, .lo = 0, .hi = N,
                      .x = x, .target = target, .gamma = gamma, .beta = beta, .y = y1, .dx = dx1, .dgamma = dg1,
                      .dbeta = db1, .rmean = rm1, .rvar = rv1};
    bn_job_run(&one);
    if (one.status != KD_OK) fail_msg("one graph: %s", one.msg);

    kd__pair pair;
    pthread_barrier_init(&pair.bar, NULL, 2);
    kd__pair_user users[2] = {{&pair, 0}, {&pair, 1}};
    kd__bn_job jobs[2];
    pthread_t th[2];
    for (int r = 0; r < 2; r++) {
        jobs[r] = one;
        jobs[r].lo = r ? split : 0;
        jobs[r].hi = r ? N : split;
        jobs[r].sum = &users[r];
        jobs[r].scale = (double)(jobs[r].hi - jobs[r].lo) / (double)N;
        jobs[r].y = y2;
        jobs[r].dx = dx2;
        jobs[r].dgamma = dg2[r];
        jobs[r].dbeta = db2[r];
        jobs[r].rmean = rm2[r];
        jobs[r].rvar = rv2[r];
        pthread_create(&th[r], NULL, bn_job_run, &jobs[r]);
    }
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    pthread_barrier_destroy(&pair.bar);
    for (int r = 0; r < 2; r++)
        if (jobs[r].status != KD_OK) fail_msg("rank %d: %s", r, jobs[r].msg);
    /* Each rank's input gradient is in its own scale (of its mean loss):
     * the global loss's is scale times it. */
    for (int r = 0; r < 2; r++)
        for (int64_t i = jobs[r].lo * per; i < jobs[r].hi * per; i++) dx2[i] *= (float)jobs[r].scale;
    float dg[64], db[64];
    for (int64_t c = 0; c < C; c++) {
        dg[c] = (float)(jobs[0].scale * dg2[0][c] + jobs[1].scale * dg2[1][c]);
        db[c] = (float)(jobs[0].scale * db2[0][c] + jobs[1].scale * db2[1][c]);
    }
    KD_ASSERT_CLOSE(y2, y1, tot, 2e-6, 1e-5, "y");
    KD_ASSERT_CLOSE(dx2, dx1, tot, 1e-8, 1e-4, "dx");
    KD_ASSERT_CLOSE(dg, dg1, C, 1e-7, 1e-4, "dgamma");
    KD_ASSERT_CLOSE(db, db1, C, 1e-7, 1e-4, "dbeta");
    for (int r = 0; r < 2; r++) {
        KD_ASSERT_CLOSE(rm2[r], rm1, C, 1e-7, 1e-5, "running_mean");
        KD_ASSERT_CLOSE(rv2[r], rv1, C, 1e-7, 1e-5, "running_var");
    }
    free(x), free(target), free(y1), free(dx1), free(y2), free(dx2);
}

static void test_sync_bn_halves(void **state) {
    (void)state;
    check_sync_bn("ref", 0, 8, 3, 5, 4);
}

static void test_sync_bn_unequal(void **state) {
    (void)state;
    check_sync_bn("ref", 0, 8, 3, 5, 3);
}

static void test_sync_bn_blocked(void **state) {
    (void)state;
    kd_backend *be = NULL;
    if (kd_backend_get("cpu", &be) != KD_OK || !be->blocked_channels) {
        skip();
        return;
    }
    check_sync_bn("cpu", 1, 6, 16, 3, 2);
}

/* ------------------------------------------------------------- processes */

static int g_mpi_ok = -1; /* mpirun works here */

static void need_mpi(void) {
#ifdef KD_REQUIRE_MPI
    if (!HAVE_MPI || g_mpi_ok == 0) fail_msg("KD_REQUIRE_MPI=ON, but kd has no MPI or %s does not run", KD_MPIEXEC);
#endif
    if (!HAVE_MPI || g_mpi_ok == 0) skip();
}

/* Runs argv (argv[0] a path) with stdout/stderr captured under g_root;
 * kills it after timeout_s (then the test fails: a hang). */
static kd_test_proc run_argv(const char *const *argv, double timeout_s) {
    static int id;
    kd_test_child c;
    memset(&c, 0, sizeof c);
    id++;
    snprintf(c.out_path, sizeof c.out_path, "%s/run%d.out", g_root, id);
    snprintf(c.err_path, sizeof c.err_path, "%s/run%d.err", g_root, id);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, c.out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, c.err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    /* Under AddressSanitizer (make asan): Open MPI's MPI_Init/MPI_Finalize
     * leave allocations LeakSanitizer reports, many in components it has
     * dlclose'd ("unknown module": no suppression file can name them), so
     * processes started by mpirun run without leak detection; kd's own code
     * is leak-checked by the single-process runs (here and in test_cli). */
    int mpi = 0;
    for (int i = 0; argv[i]; i++) mpi |= strcmp(argv[i], KD_MPIEXEC) == 0 || strcmp(argv[i], "srun") == 0;
    char *asan_old = getenv("ASAN_OPTIONS") ? strdup(getenv("ASAN_OPTIONS")) : NULL;
    if (mpi) {
        char v[1200];
        snprintf(v, sizeof v, "%s%sdetect_leaks=0", asan_old ? asan_old : "", asan_old ? ":" : "");
        setenv("ASAN_OPTIONS", v, 1);
    }
    c.t0 = kd_test_now();
    int rc = posix_spawnp(&c.pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (mpi) {
        if (asan_old) setenv("ASAN_OPTIONS", asan_old, 1);
        else unsetenv("ASAN_OPTIONS");
    }
    free(asan_old);
    if (rc != 0) fail_msg("cannot start %s: %s", argv[0], strerror(rc));
    int ws = 0, killed = 0;
    for (;;) {
        pid_t w = waitpid(c.pid, &ws, WNOHANG);
        if (w == c.pid) break;
        if (w < 0 && errno != EINTR) fail_msg("waitpid: %s", strerror(errno));
        if (!killed && kd_test_now() - c.t0 > timeout_s) {
            kill(c.pid, SIGTERM);
            killed = 1;
        }
        usleep(20000);
    }
    kd_test_proc p = kd_test_collect(&c, ws);
    if (killed) {
        kd_test_proc_dump(&p, "hung");
        fail_msg("%s did not finish within %g s", argv[0], timeout_s);
    }
    return p;
}

#define TIMEOUT 240.0
#define MAXARG 96

/* argv of `mpirun [-q] --oversubscribe -np NP [pre...] kd args...`. */
static void mpi_argv(const char **av, int quiet, const char *np, const char *const *pre, const char *const *args) {
    int k = 0;
    av[k++] = KD_MPIEXEC;
    if (quiet) av[k++] = "-q";
    av[k++] = "--oversubscribe";
    av[k++] = "-np";
    av[k++] = np;
    for (int i = 0; pre && pre[i]; i++) av[k++] = pre[i];
    av[k++] = KD_EXE;
    for (int i = 0; args[i] && k < MAXARG - 1; i++) av[k++] = args[i];
    av[k] = NULL;
}

static kd_test_proc run_mpi(const char *np, const char *const *pre, const char *const *args) {
    const char *av[MAXARG];
    mpi_argv(av, 1, np, pre, args);
    return run_argv(av, TIMEOUT);
}

static kd_test_proc run_one(const char *const *args) {
    const char *av[MAXARG];
    int k = 0;
    av[k++] = KD_EXE;
    for (int i = 0; args[i] && k < MAXARG - 1; i++) av[k++] = args[i];
    av[k] = NULL;
    return run_argv(av, TIMEOUT);
}

/* The tiny run: 128 images of 8x8, 2 epochs, one compute thread per
 * process, the ref backend, a log line per step. */
#define TRAIN(out, batch, syncbn)                                                                                  \
    "train", "--data", g_data, "--model", "resnet8", "--epochs", "2", "--batch-size", (batch), "--backend", "ref", \
        "--threads", "1", "--workers", "1", "--progress", "0", "--lr", "0.05", "--schedule", "cosine",              \
        "--log-every", "1", "--sync-bn", (syncbn), "--out", (out)

static const char *run_dir(char *buf, size_t n, const char *name) {
    snprintf(buf, n, "%s/%s", g_root, name);
    return buf;
}

/* The step losses of DIR/metrics.jsonl; returns the count. */
static int step_losses(const char *dir, double *out, int cap) {
    char path[900];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    char *text = kd_test_slurp(path, NULL);
    if (!text) fail_msg("cannot read %s", path);
    int n = 0;
    for (char *l = text; l && *l;) {
        char *e = strchr(l, '\n');
        if (e) *e = '\0';
        const char *q;
        if (strstr(l, "\"type\": \"step\"") && (q = strstr(l, "\"loss\": ")) && n < cap) out[n++] = strtod(q + 8, NULL);
        l = e ? e + 1 : NULL;
    }
    free(text);
    return n;
}

/* Largest |a - b| - (atol + rtol |b|) over the float32 tensors of the
 * model in two checkpoints (> 0: outside the tolerance); *worst the largest
 * |a - b|. With check, the test fails on a model tensor outside the
 * tolerance, or on an optimiser state tensor (momentum: a sum of recent
 * gradients) further than MOM_RTOL from the other in relative L2 norm. */
static double ckpt_excess(const char *pa, const char *pb, double atol, double rtol, double *worst, int check) {
    kd_st_file *a = kd_test_st_open(pa), *b = kd_test_st_open(pb);
    double excess = -1e300;
    *worst = 0;
    int compared = 0;
    for (int i = 0; i < kd_st_count(a); i++) {
        const kd_st_entry *ea = kd_st_get(a, i);
        if (ea->dtype != KD_F32) continue;
        const kd_st_entry *eb = kd_st_find(b, ea->name);
        if (!eb) fail_msg("%s lacks %s", pb, ea->name);
        int64_t n = 1;
        for (int d = 0; d < ea->ndim; d++) n *= ea->shape[d];
        const float *x = ea->data, *y = eb->data;
        if (strncmp(ea->name, "optim.", 6) == 0) {
            double dd = 0, yy = 0;
            for (int64_t k = 0; k < n; k++) {
                dd += ((double)x[k] - y[k]) * ((double)x[k] - y[k]);
                yy += (double)y[k] * y[k];
            }
            if (check && sqrt(dd) > MOM_RTOL * sqrt(yy) + 1e-12)
                fail_msg("%s differs by %.3g in relative L2 norm (tolerance %g)", ea->name, sqrt(dd / (yy + 1e-300)),
                         MOM_RTOL);
            continue;
        }
        if (check) KD_ASSERT_CLOSE(x, y, n, atol, rtol, ea->name);
        for (int64_t k = 0; k < n; k++) {
            double d = fabs((double)x[k] - (double)y[k]);
            if (d > *worst) *worst = d;
            if (d - (atol + rtol * fabs((double)y[k])) > excess) excess = d - (atol + rtol * fabs((double)y[k]));
        }
        compared++;
    }
    if (compared < 10) fail_msg("%s: only %d tensors compared", pa, compared);
    kd_st_close(a);
    kd_st_close(b);
    return excess;
}

static void compare_runs(const char *one, const char *many, const char *what) {
    double la[256], lb[256];
    int na = step_losses(one, la, 256), nb = step_losses(many, lb, 256);
    if (na != nb || na < 10) fail_msg("%s: %d step records against %d", what, nb, na);
    double worst = 0;
    for (int i = 0; i < na; i++) {
        double rel = fabs(la[i] - lb[i]) / fabs(la[i]);
        if (rel > worst) worst = rel;
        if (rel > LOSS_RTOL) fail_msg("%s: step %d loss %.9g, one process %.9g", what, i + 1, lb[i], la[i]);
    }
    char pa[900], pb[900];
    snprintf(pa, sizeof pa, "%s/last.safetensors", many);
    snprintf(pb, sizeof pb, "%s/last.safetensors", one);
    double wmax;
    ckpt_excess(pa, pb, W_ATOL, W_RTOL, &wmax, 1);
    fprintf(stderr, "[test_dist] %s: %d steps, worst loss difference %.3g relative, worst weight difference %.3g\n",
            what, na, worst, wmax);
}

static void expect_one_error(const kd_test_proc *p, int want_status, const char *needle) {
    if (p->signal || p->status != want_status) {
        kd_test_proc_dump(p, NULL);
        fail_msg("expected exit status %d, got %d (signal %d)", want_status, p->status, p->signal);
    }
    int n = 0;
    const char *line = NULL;
    for (const char *l = p->err; *l;) {
        const char *e = strchr(l, '\n');
        if (strncmp(l, "kd ", 3) == 0 || strncmp(l, "kd:", 3) == 0) {
            n++;
            line = l;
        }
        l = e ? e + 1 : l + strlen(l);
    }
    if (n != 1 || !strstr(line, needle)) {
        kd_test_proc_dump(p, NULL);
        fail_msg("expected one error line from kd containing '%s', got %d", needle, n);
    }
}

/* ----------------------------------------------------- the API under mpirun */

static int api_child(void) {
    int bad = 0;
#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "rank %d: check failed: %s (%s)\n", kd_dist_rank(), #cond, kd_last_error()); \
            bad++;                                                                             \
        }                                                                                      \
    } while (0)
    CHECK(kd_dist_init() == KD_OK);
    const int r = kd_dist_rank(), n = kd_dist_size();
    CHECK(n == 3 && r >= 0 && r < n);
    CHECK(kd_dist_built() == 1 && strcmp(kd_dist_launcher(), "mpirun") == 0);
    float f[2] = {(float)(r + 1), 1.0f};
    CHECK(kd_dist_allreduce_f32(f, 2) == KD_OK && f[0] == 6.0f && f[1] == 3.0f);
    double d[3] = {0.5 * r, 1e300, -1};
    CHECK(kd_dist_allreduce_f64(d, 3) == KD_OK && d[0] == 1.5 && d[2] == -3);
    int64_t m[2] = {r, -r};
    CHECK(kd_dist_allreduce_max_i64(m, 2) == KD_OK && m[0] == 2 && m[1] == 0);
    enum { NB = 3, LEN = 100000 };
    float *big = malloc((size_t)NB * LEN * sizeof *big);
    kd_dist_req rq[NB];
    for (int b = 0; b < NB; b++) {
        for (int i = 0; i < LEN; i++) big[b * LEN + i] = (float)(r * 1000 + b + (i % 7));
        CHECK(kd_dist_iallreduce_f32(big + b * LEN, LEN, &rq[b]) == KD_OK);
        CHECK(kd_dist_progress() == KD_OK);
    }
    for (int b = NB - 1; b >= 0; b--) CHECK(kd_dist_wait(&rq[b], "test") == KD_OK);
    for (int b = 0; b < NB; b++)
        for (int i = 0; i < LEN; i += 997) CHECK(big[b * LEN + i] == (float)(3000 + 3 * (b + i % 7)));
    free(big);
    char msg[16];
    snprintf(msg, sizeof msg, "from %d", r);
    CHECK(kd_dist_bcast(msg, sizeof msg, 1) == KD_OK && strcmp(msg, "from 1") == 0);
    int32_t me = 10 + r, all[3] = {0, 0, 0};
    CHECK(kd_dist_allgather(&me, all, sizeof me) == KD_OK && all[0] == 10 && all[1] == 11 && all[2] == 12);
    CHECK(kd_dist_barrier() == KD_OK);
    int flag = r == 1;
    CHECK(kd_dist_agree(KD_OK, &flag) == KD_OK && flag == 1 && !kd_dist_error_collective());
    kd_status mine = r == 2 ? kd_error(KD_ERR_IO, "rank two failed") : KD_OK;
    kd_status got = kd_dist_agree(mine, NULL);
    CHECK(got == KD_ERR_IO && kd_dist_error_collective());
    CHECK(kd_dist_error_quiet() == (r != 2));
    if (r == 2) CHECK(strcmp(kd_last_error(), "rank two failed") == 0);
    CHECK(kd_dist_bytes_reduced() >= (int64_t)(NB * LEN * 4));
    kd_dist_finalize();
    printf("rank %d: %s\n", r, bad ? "FAILED" : "ok");
    return bad ? 1 : 0;
#undef CHECK
}

static void test_api(void **state) {
    (void)state;
    need_mpi();
    const char *av[] = {KD_MPIEXEC, "-q", "--oversubscribe", "-np", "3", g_self, "--api-child", NULL};
    kd_test_proc p = run_argv(av, 120);
    int oks = 0;
    for (const char *q = p.out; (q = strstr(q, ": ok")); q++) oks++;
    if (p.status != 0 || oks != 3) {
        kd_test_proc_dump(&p, "api child");
        fail_msg("the kd_dist API checks failed on some rank");
    }
    kd_test_proc_free(&p);
}

/* ------------------------------------------------ equality with one process */

static char g_one16[900]; /* one process, batch 16, sync_bn 1 */
static int g_one16_state;

static const char *one16(void) {
    if (g_one16_state == 0) {
        g_one16_state = -1;
        run_dir(g_one16, sizeof g_one16, "one16");
        kd_test_proc p = run_one((const char *const[]){TRAIN(g_one16, "16", "1"), NULL});
        kd_test_expect_ok(&p, "one process");
        kd_test_proc_free(&p);
        g_one16_state = 1;
    }
    if (g_one16_state != 1) fail_msg("the one-process reference run failed");
    return g_one16;
}

static const char *const g_small_buckets[] = {"-x", "KD_DIST_BUCKET_KB=16", NULL};

static void test_np2_equals_one(void **state) {
    (void)state;
    need_mpi();
    char out[900];
    run_dir(out, sizeof out, "np2");
    kd_test_proc p = run_mpi("2", g_small_buckets, (const char *const[]){TRAIN(out, "16", "1"), NULL});
    kd_test_expect_ok(&p, "mpirun -np 2");
    kd_test_proc_free(&p);
    compare_runs(one16(), out, "-np 2");
    /* The same with every bucket posted after backward: bit-identical. */
    char late[900];
    run_dir(late, sizeof late, "np2_late");
    const char *const pre[] = {"-x", "KD_DIST_BUCKET_KB=16", "-x", "KD_DIST_OVERLAP=0", NULL};
    p = run_mpi("2", pre, (const char *const[]){TRAIN(late, "16", "1"), NULL});
    kd_test_expect_ok(&p, "mpirun -np 2, no overlap");
    kd_test_proc_free(&p);
    char a[1000], b[1000], msg[512];
    snprintf(a, sizeof a, "%s/last.safetensors", out);
    snprintf(b, sizeof b, "%s/last.safetensors", late);
    if (kd_test_ckpts_differ(a, b, KD_TEST_CKPT_ALL, msg, sizeof msg))
        fail_msg("buckets posted during backward give other weights than after it: %s", msg);
}

static void test_np3_equals_one(void **state) {
    (void)state;
    need_mpi();
    /* Batch 15 over 3 ranks: shards of 5, and a last batch of 8 = 2 + 3 + 3. */
    char one[900], out[900];
    run_dir(one, sizeof one, "one15");
    run_dir(out, sizeof out, "np3");
    kd_test_proc p = run_one((const char *const[]){TRAIN(one, "15", "1"), NULL});
    kd_test_expect_ok(&p, "one process");
    kd_test_proc_free(&p);
    p = run_mpi("3", g_small_buckets, (const char *const[]){TRAIN(out, "15", "1"), NULL});
    kd_test_expect_ok(&p, "mpirun -np 3");
    kd_test_proc_free(&p);
    compare_runs(one, out, "-np 3");
}

/* Without sync_bn each rank normalises with its own 8 rows: far from one
 * process, so the comparison above can fail. */
static void test_np2_without_sync_bn_differs(void **state) {
    (void)state;
    need_mpi();
    char one[900], out[900];
    run_dir(one, sizeof one, "one16_plain");
    run_dir(out, sizeof out, "np2_plain");
    kd_test_proc p = run_one((const char *const[]){TRAIN(one, "16", "0"), NULL});
    kd_test_expect_ok(&p, "one process");
    kd_test_proc_free(&p);
    p = run_mpi("2", NULL, (const char *const[]){TRAIN(out, "16", "0"), NULL});
    kd_test_expect_ok(&p, "mpirun -np 2");
    kd_test_proc_free(&p);
    char a[1000], b[1000];
    snprintf(a, sizeof a, "%s/last.safetensors", out);
    snprintf(b, sizeof b, "%s/last.safetensors", one);
    double worst;
    double excess = ckpt_excess(a, b, W_ATOL, W_RTOL, &worst, 0);
    if (!(excess > 0)) fail_msg("per-rank batch norm matched one process within the tolerance (worst %g)", worst);
    fprintf(stderr, "[test_dist] -np 2 without sync_bn: worst weight difference %.3g\n", worst);
}

/* kd distill --method kd: the frozen teacher runs on each rank's rows. */
static void test_distill_np2(void **state) {
    (void)state;
    need_mpi();
    char teacher[900], tckpt[1000], one[900], out[900];
    run_dir(teacher, sizeof teacher, "teacher");
    kd_test_proc p = run_one((const char *const[]){"train", "--data", g_data, "--model", "resnet14", "--epochs", "1",
                                                   "--batch-size", "16", "--backend", "ref", "--threads", "1",
                                                   "--progress", "0", "--out", teacher, NULL});
    kd_test_expect_ok(&p, "teacher");
    kd_test_proc_free(&p);
    snprintf(tckpt, sizeof tckpt, "%s/last.safetensors", teacher);
    run_dir(one, sizeof one, "distill_one");
    run_dir(out, sizeof out, "distill_np2");
#define DISTILL(o)                                                                                               \
    "distill", "--method", "kd", "--teacher-ckpt", tckpt, "--teacher", "resnet14", "--data", g_data, "--model", \
        "resnet8", "--epochs", "2", "--batch-size", "16", "--backend", "ref", "--threads", "1", "--progress", "0",  \
        "--lr", "0.02", "--log-every", "1", "--sync-bn", "1", "--out", (o)
    p = run_one((const char *const[]){DISTILL(one), NULL});
    kd_test_expect_ok(&p, "one process");
    kd_test_proc_free(&p);
    p = run_mpi("2", g_small_buckets, (const char *const[]){DISTILL(out), NULL});
    kd_test_expect_ok(&p, "mpirun -np 2");
    kd_test_proc_free(&p);
#undef DISTILL
    compare_runs(one, out, "distill kd -np 2");
}

/* Method state across ranks: MoCo's queue takes the keys of every rank
 * (concat_all_gather), so after one step of global batch 16 over 2 ranks its
 * pointer is 16 (8 if each rank enqueued its own), and CRD's memory banks take
 * the rows of every rank: after one step they equal one process's (the
 * embeddings of the first step come from the same initial weights, batch
 * norm synchronised), where a rank-local update would leave half the batch's
 * rows at their initial values. */
static void test_method_state_np2(void **state) {
    (void)state;
    need_mpi();
    char moco[900], path[1000];
    run_dir(moco, sizeof moco, "moco_np2");
    kd_test_proc p = run_mpi("2", NULL, (const char *const[]){"pretrain", "--method", "moco", "--data", g_data,
                                                            "--model", "resnet8", "--epochs", "1", "--batch-size",
                                                            "16", "--max-steps-per-epoch", "1", "--backend", "ref",
                                                            "--threads", "1", "--progress", "0", "--set", "moco.K=64",
                                                            "--sync-bn", "1", "--out", moco, NULL});
    kd_test_expect_ok(&p, "moco -np 2");
    kd_test_proc_free(&p);
    snprintf(path, sizeof path, "%s/last.safetensors", moco);
    kd_st_file *f = kd_test_st_open(path);
    const kd_st_entry *ptr = kd_test_st_entry(f, "distill.queue_ptr");
    if (((const int64_t *)ptr->data)[0] != 16)
        fail_msg("moco -np 2: queue_ptr is %lld after one step of global batch 16, want 16",
                 (long long)((const int64_t *)ptr->data)[0]);
    kd_st_close(f);

    char teacher[900], tckpt[1000], one[900], two[900];
    run_dir(teacher, sizeof teacher, "crd_teacher");
    p = run_one((const char *const[]){"train", "--data", g_data, "--model", "resnet8", "--epochs", "1", "--batch-size",
                                      "16", "--backend", "ref", "--threads", "1", "--progress", "0", "--out", teacher,
                                      NULL});
    kd_test_expect_ok(&p, "teacher");
    kd_test_proc_free(&p);
    snprintf(tckpt, sizeof tckpt, "%s/last.safetensors", teacher);
    run_dir(one, sizeof one, "crd_one");
    run_dir(two, sizeof two, "crd_np2");
#define CRD(o)                                                                                                       \
    "distill", "--method", "crd", "--teacher-ckpt", tckpt, "--teacher", "resnet8", "--data", g_data, "--model",     \
        "resnet8", "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "16", "--backend", "ref",         \
        "--threads", "1", "--progress", "0", "--set", "crd.nce_k=32", "--sync-bn", "1", "--out", (o)
    p = run_one((const char *const[]){CRD(one), NULL});
    kd_test_expect_ok(&p, "crd, one process");
    kd_test_proc_free(&p);
    p = run_mpi("2", NULL, (const char *const[]){CRD(two), NULL});
    kd_test_expect_ok(&p, "crd -np 2");
    kd_test_proc_free(&p);
#undef CRD
    char pa[1000], pb[1000];
    snprintf(pa, sizeof pa, "%s/last.safetensors", one);
    snprintf(pb, sizeof pb, "%s/last.safetensors", two);
    kd_st_file *a = kd_test_st_open(pa), *b = kd_test_st_open(pb);
    const char *banks[2] = {"distill.contrast.memory_v1", "distill.contrast.memory_v2"};
    for (int k = 0; k < 2; k++) {
        const kd_st_entry *ea = kd_test_st_entry(a, "%s", banks[k]), *eb = kd_test_st_entry(b, "%s", banks[k]);
        int64_t n = 1;
        for (int d = 0; d < ea->ndim; d++) n *= ea->shape[d];
        KD_ASSERT_CLOSE((const float *)eb->data, (const float *)ea->data, n, 1e-4, 1e-3, banks[k]);
    }
    kd_st_close(a);
    kd_st_close(b);
}

/* ------------------------------------------------------------------ resume */

static void test_resume_same_ranks(void **state) {
    (void)state;
    need_mpi();
    char whole[900], paused[900];
    run_dir(whole, sizeof whole, "np2_whole");
    run_dir(paused, sizeof paused, "np2_paused");
    kd_test_proc p = run_mpi("2", NULL, (const char *const[]){TRAIN(whole, "16", "1"), NULL});
    kd_test_expect_ok(&p, "uninterrupted");
    kd_test_proc_free(&p);
    p = run_mpi("2", NULL, (const char *const[]){TRAIN(paused, "16", "1"), "--stop-after", "1", NULL});
    kd_test_expect_ok(&p, "paused");
    kd_test_proc_free(&p);
    p = run_mpi("2", NULL, (const char *const[]){"train", "--resume", paused, NULL});
    kd_test_expect_ok(&p, "resumed");
    kd_test_proc_free(&p);
    char a[1000], b[1000], msg[512];
    snprintf(a, sizeof a, "%s/last.safetensors", whole);
    snprintf(b, sizeof b, "%s/last.safetensors", paused);
    if (kd_test_ckpts_differ(a, b, KD_TEST_CKPT_ALL, msg, sizeof msg))
        fail_msg("the resumed -np 2 run differs from the uninterrupted one: %s", msg);
}

static void test_resume_other_ranks(void **state) {
    (void)state;
    need_mpi();
    char dir[900];
    run_dir(dir, sizeof dir, "np1_paused");
    kd_test_proc p = run_one((const char *const[]){TRAIN(dir, "16", "1"), "--stop-after", "1", NULL});
    kd_test_expect_ok(&p, "paused");
    kd_test_proc_free(&p);
    p = run_mpi("2", NULL, (const char *const[]){"train", "--resume", dir, NULL});
    expect_one_error(&p, 2, "trained by 1 rank, this resume runs 2");
    kd_test_proc_free(&p);
}

/* ------------------------------------------------------------------ failures */

static void test_rank_dies(void **state) {
    (void)state;
    need_mpi();
    char out[900];
    run_dir(out, sizeof out, "dies");
    const char *const pre[] = {"-x", "KD_DIST_TEST_DIE=1:5", NULL};
    const char *av[MAXARG];
    mpi_argv(av, 0, "2", pre, (const char *const[]){TRAIN(out, "16", "1"), NULL});
    kd_test_proc p = run_argv(av, 60);
    /* The run takes ~2 s in all; a hang would be killed at 60 s and fail. */
    if (p.status == 0 || !strstr(p.err, "rank 1 dies at step 5") || !strstr(p.err, "rank 1") ||
        !strstr(p.err, "signal 9") || p.secs > 30) {
        kd_test_proc_dump(&p, "rank 1 killed");
        fail_msg("expected mpirun to end the job with an error naming rank 1 within 30 s (status %d, %.1f s)",
                 p.status, p.secs);
    }
    kd_test_proc_free(&p);
}

static void test_rank_hangs(void **state) {
    (void)state;
    need_mpi();
    char out[900];
    run_dir(out, sizeof out, "hangs");
    const char *const pre[] = {"-x", "KD_DIST_TEST_DIE=1:5:hang", "-x", "KD_DIST_TIMEOUT=3", NULL};
    kd_test_proc p = run_mpi("2", pre, (const char *const[]){TRAIN(out, "16", "1"), NULL});
    if (p.status == 0 || !strstr(p.err, "did not complete within 3 s") || p.secs > 30) {
        kd_test_proc_dump(&p, "rank 1 hangs");
        fail_msg("expected rank 0 to give up after 3 s and end the job (status %d, %.1f s)", p.status, p.secs);
    }
    kd_test_proc_free(&p);
}

static void test_batch_not_divisible(void **state) {
    (void)state;
    need_mpi();
    char out[900];
    run_dir(out, sizeof out, "batch16_np3");
    kd_test_proc p = run_mpi("3", NULL, (const char *const[]){TRAIN(out, "16", "1"), NULL});
    expect_one_error(&p, 2, "batch_size 16 is not divisible by the 3 ranks");
    kd_test_proc_free(&p);
    struct stat st;
    char last[1000];
    snprintf(last, sizeof last, "%s/last.safetensors", out);
    if (stat(last, &st) == 0) fail_msg("the refused run wrote %s", last);
}

static void test_ranks_disagree_config(void **state) {
    (void)state;
    need_mpi();
    char out[900];
    run_dir(out, sizeof out, "disagree");
    const char *av[MAXARG];
    int k = 0;
    const char *const a0[] = {TRAIN(out, "16", "1"), NULL};
    av[k++] = KD_MPIEXEC, av[k++] = "-q", av[k++] = "--oversubscribe", av[k++] = "-np", av[k++] = "1";
    av[k++] = KD_EXE;
    for (int i = 0; a0[i]; i++) av[k++] = a0[i];
    av[k++] = ":", av[k++] = "-np", av[k++] = "1", av[k++] = KD_EXE;
    for (int i = 0; a0[i]; i++) av[k++] = a0[i];
    av[k++] = "--lr", av[k++] = "0.2";
    av[k] = NULL;
    kd_test_proc p = run_argv(av, TIMEOUT);
    expect_one_error(&p, 2, "disagree on the configuration: rank 1's");
    kd_test_proc_free(&p);
}

/* The same --data path, other labels behind it on rank 1 (each rank in its
 * own working directory). */
static void test_ranks_disagree_data(void **state) {
    (void)state;
    need_mpi();
    char wa[900], wb[900], out[900];
    run_dir(wa, sizeof wa, "wd_a");
    run_dir(wb, sizeof wb, "wd_b");
    run_dir(out, sizeof out, "disagree_data");
    mkdir(wa, 0755);
    mkdir(wb, 0755);
    char d[1000];
    snprintf(d, sizeof d, "%s/data", wa);
    kd_test_write_idx(d, 128, 32, 8);
    snprintf(d, sizeof d, "%s/data", wb);
    kd_test_write_idx(d, 128, 32, 8);
    char lab[1100];
    snprintf(lab, sizeof lab, "%s/train-labels-idx1-ubyte", d);
    size_t n;
    unsigned char *b = (unsigned char *)kd_test_slurp(lab, &n);
    if (!b || n < 9) fail_msg("cannot read %s", lab);
    b[8] = (unsigned char)((b[8] + 1) % 4);
    kd_test_write_file(lab, b, n);
    free(b);
    const char *av[MAXARG];
    int k = 0;
    const char *const a0[] = {"train", "--data", "data", "--model", "resnet8", "--epochs", "1", "--batch-size", "16",
                              "--backend", "ref", "--threads", "1", "--progress", "0", "--out", out, NULL};
    av[k++] = KD_MPIEXEC, av[k++] = "-q", av[k++] = "--oversubscribe";
    av[k++] = "-np", av[k++] = "1", av[k++] = "-wdir", av[k++] = wa, av[k++] = KD_EXE;
    for (int i = 0; a0[i]; i++) av[k++] = a0[i];
    av[k++] = ":", av[k++] = "-np", av[k++] = "1", av[k++] = "-wdir", av[k++] = wb, av[k++] = KD_EXE;
    for (int i = 0; a0[i]; i++) av[k++] = a0[i];
    av[k] = NULL;
    kd_test_proc p = run_argv(av, TIMEOUT);
    expect_one_error(&p, 2, "disagree on the training data");
    kd_test_proc_free(&p);
}

/* ------------------------------------------------------------- two hosts */

static char g_ns[2][32], g_veth[2][16];
static int g_ns_made;

/* Runs `ip ARGS...` quietly; returns its exit status. */
static int ip_cmd(const char *const *args, char **out) {
    const char *av[24];
    int k = 0;
    av[k++] = "ip";
    for (int i = 0; args[i] && k < 23; i++) av[k++] = args[i];
    av[k] = NULL;
    kd_test_proc p = run_argv(av, 60);
    int st = p.signal ? -1 : p.status;
    if (out) *out = strdup(p.out);
    kd_test_proc_free(&p);
    return st;
}

static int netns_teardown(void **state) {
    (void)state;
    for (int i = 0; i < 2 && g_ns_made; i++) ip_cmd((const char *const[]){"netns", "del", g_ns[i], NULL}, NULL);
    g_ns_made = 0;
    return 0;
}

static long long veth_rx(int side) {
    char path[128], *out = NULL;
    snprintf(path, sizeof path, "/sys/class/net/%s/statistics/rx_bytes", g_veth[side]);
    if (ip_cmd((const char *const[]){"netns", "exec", g_ns[side], "cat", path, NULL}, &out) != 0)
        fail_msg("cannot read %s in %s", path, g_ns[side]);
    long long v = atoll(out);
    free(out);
    return v;
}

static void test_two_hosts_netns(void **state) {
    (void)state;
    need_mpi();
    const int pid = (int)getpid();
    snprintf(g_ns[0], sizeof g_ns[0], "kd_a%d", pid);
    snprintf(g_ns[1], sizeof g_ns[1], "kd_b%d", pid);
    snprintf(g_veth[0], sizeof g_veth[0], "kdva%d", pid % 100000);
    snprintf(g_veth[1], sizeof g_veth[1], "kdvb%d", pid % 100000);
    if (geteuid() != 0 || system("ip netns list >/dev/null 2>&1") != 0 ||
        ip_cmd((const char *const[]){"netns", "add", g_ns[0], NULL}, NULL) != 0) {
        fprintf(stderr, "[test_dist] no network namespaces here (root and iproute2 needed): two-host case skipped\n");
        skip();
    }
    g_ns_made = 1;
    char net[32], addr[2][32], cidr[2][40];
    snprintf(net, sizeof net, "10.213.%d.0/24", pid % 250);
    for (int i = 0; i < 2; i++) {
        snprintf(addr[i], sizeof addr[i], "10.213.%d.%d", pid % 250, i + 1);
        snprintf(cidr[i], sizeof cidr[i], "%s/24", addr[i]);
    }
    if (ip_cmd((const char *const[]){"netns", "add", g_ns[1], NULL}, NULL) != 0 ||
        ip_cmd((const char *const[]){"link", "add", g_veth[0], "type", "veth", "peer", "name", g_veth[1], NULL},
               NULL) != 0)
        fail_msg("cannot make the second namespace or the veth pair");
    for (int i = 0; i < 2; i++)
        if (ip_cmd((const char *const[]){"link", "set", g_veth[i], "netns", g_ns[i], NULL}, NULL) != 0 ||
            ip_cmd((const char *const[]){"-n", g_ns[i], "addr", "add", cidr[i], "dev", g_veth[i], NULL}, NULL) != 0 ||
            ip_cmd((const char *const[]){"-n", g_ns[i], "link", "set", g_veth[i], "up", NULL}, NULL) != 0 ||
            ip_cmd((const char *const[]){"-n", g_ns[i], "link", "set", "lo", "up", NULL}, NULL) != 0)
            fail_msg("cannot set up %s in %s", g_veth[i], g_ns[i]);
    /* mpirun's launcher for the "remote" host: the command in its namespace. */
    char agent[800];
    snprintf(agent, sizeof agent, "%s/nsrsh", g_root);
    char script[2000];
    snprintf(script, sizeof script,
             "#!/bin/sh\n# plm_rsh_agent: nsrsh HOST COMMAND... runs COMMAND in HOST's network namespace\n"
             "host=$1; shift\ncase \"$host\" in\n  %s) ns=%s ;;\n  %s) ns=%s ;;\n"
             "  *) echo \"nsrsh: unknown host $host\" >&2; exit 1 ;;\nesac\nexec ip netns exec \"$ns\" sh -c \"$*\"\n",
             addr[0], g_ns[0], addr[1], g_ns[1]);
    kd_test_write_file(agent, script, strlen(script));
    chmod(agent, 0755);
    char hosts[100], out[900];
    snprintf(hosts, sizeof hosts, "%s:1,%s:1", addr[0], addr[1]);
    run_dir(out, sizeof out, "np2_netns");
    const long long rx0 = veth_rx(1);
    const char *const args[] = {TRAIN(out, "16", "1"), NULL};
    const char *av[MAXARG];
    int k = 0;
    const char *pre[] = {"netns", "exec", g_ns[0], KD_MPIEXEC, "-q", "--host", hosts, "-np", "2", "--mca",
                         "plm_rsh_agent", agent, "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", net,
                         "--mca", "oob_tcp_if_include", net, KD_EXE, NULL};
    av[k++] = "ip";
    for (int i = 0; pre[i]; i++) av[k++] = pre[i];
    for (int i = 0; args[i]; i++) av[k++] = args[i];
    av[k] = NULL;
    kd_test_proc p = run_argv(av, TIMEOUT);
    kd_test_expect_ok(&p, "mpirun -np 2 over two namespaces");
    long long floats = 0;
    const char *q = strstr(p.err, "gradient floats");
    if (q) {
        while (q > p.err && q[-1] == ' ') q--;
        while (q > p.err && q[-1] >= '0' && q[-1] <= '9') q--;
        floats = atoll(q);
    }
    kd_test_proc_free(&p);
    const long long rx = veth_rx(1) - rx0, want = 16 * 4 * floats;
    fprintf(stderr, "[test_dist] two namespaces: %lld bytes received over %s, %lld gradient floats per step\n", rx,
            g_veth[1], floats);
    if (floats < 10000 || rx < want)
        fail_msg("rank 1 received %lld bytes over its veth, less than 16 steps x %lld gradient floats", rx, floats);
    compare_runs(one16(), out, "-np 2 over two namespaces");
    /* With two ranks every sum is a + b whichever way it travels: the run
     * over TCP equals the run over shared memory bit for bit. */
    char shm[1000], tcp[1000], msg[512];
    snprintf(shm, sizeof shm, "%s/np2/last.safetensors", g_root);
    snprintf(tcp, sizeof tcp, "%s/last.safetensors", out);
    struct stat st;
    if (stat(shm, &st) == 0 && kd_test_ckpts_differ(shm, tcp, KD_TEST_CKPT_ALL, msg, sizeof msg))
        fail_msg("-np 2 over TCP between namespaces differs from -np 2 over shared memory: %s", msg);
}

/* ------------------------------------------------------------------ Slurm */

/* Whether an executable `name` is on PATH. */
static int on_path(const char *name) {
    const char *path = getenv("PATH");
    char buf[1024];
    while (path && *path) {
        const char *e = strchr(path, ':');
        size_t len = e ? (size_t)(e - path) : strlen(path);
        snprintf(buf, sizeof buf, "%.*s/%s", (int)len, path, name);
        if (len && access(buf, X_OK) == 0) return 1;
        path = e ? e + 1 : NULL;
    }
    return 0;
}

/* Whether `srun -n 1 true` finishes with status 0 within 20 s (a Slurm
 * cluster answers here); no srun, or a controller that does not answer: 0. */
static int srun_works(void) {
    const char *av[] = {"srun", "-n", "1", "--immediate=10", "true", NULL};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    pid_t pid;
    int rc = posix_spawnp(&pid, av[0], &fa, NULL, (char *const *)av, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) return 0;
    const double t0 = kd_test_now();
    int ws = 0;
    for (;;) {
        pid_t w = waitpid(pid, &ws, WNOHANG);
        if (w == pid) return WIFEXITED(ws) && WEXITSTATUS(ws) == 0;
        if (w < 0 && errno != EINTR) return 0;
        if (kd_test_now() - t0 > 20) {
            kill(pid, SIGKILL);
            waitpid(pid, &ws, 0);
            return 0;
        }
        usleep(20000);
    }
}

/* Slurm's srun starting the ranks through PMIx (`srun --mpi=pmix`, kd's
 * launcher "pmix"): the -np 2 training equals mpirun's -np 2 bit for bit
 * (the same two shards, the same a + b sums), step losses and every tensor
 * of last.safetensors, optimiser state included. srun without a PMI
 * (--mpi=none) fails with one error line from task 0 instead of training two
 * unrelated copies into one run directory. Skipped where srun does not run
 * (CI installs no Slurm; docs/DISTRIBUTED.md "Slurm" sets up one node). */
static void test_srun_np2(void **state) {
    (void)state;
    need_mpi();
    if (!srun_works()) {
        fprintf(stderr, "[test_dist] srun -n 1 true does not run here (no Slurm cluster): the srun case is skipped\n");
        skip();
    }
    char ref[900];
    run_dir(ref, sizeof ref, "np2");
    char ref_ckpt[1000];
    snprintf(ref_ckpt, sizeof ref_ckpt, "%s/last.safetensors", ref);
    struct stat st;
    if (stat(ref_ckpt, &st) != 0) { /* test_np2_equals_one did not run: its mpirun -np 2 run */
        run_dir(ref, sizeof ref, "np2_for_srun");
        snprintf(ref_ckpt, sizeof ref_ckpt, "%s/last.safetensors", ref);
        kd_test_proc p = run_mpi("2", g_small_buckets, (const char *const[]){TRAIN(ref, "16", "1"), NULL});
        kd_test_expect_ok(&p, "mpirun -np 2");
        kd_test_proc_free(&p);
    }
    char out[900];
    run_dir(out, sizeof out, "srun2");
    const char *const srun[] = {"srun", "-n", "2", "--overcommit", "--mpi=pmix", "--kill-on-bad-exit=1", NULL};
    const char *const args[] = {TRAIN(out, "16", "1"), NULL};
    const char *av[MAXARG];
    int k = 0;
    for (int i = 0; srun[i]; i++) av[k++] = srun[i];
    av[k++] = KD_EXE;
    for (int i = 0; args[i] && k < MAXARG - 1; i++) av[k++] = args[i];
    av[k] = NULL;
    setenv("KD_DIST_BUCKET_KB", "16", 1); /* srun passes the environment on (--export=ALL) */
    kd_test_proc p = run_argv(av, TIMEOUT);
    unsetenv("KD_DIST_BUCKET_KB");
    kd_test_expect_ok(&p, "srun -n 2 --mpi=pmix");
    if (!strstr(p.err, "data parallel: 2 ranks")) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("srun -n 2 --mpi=pmix: rank 0 did not report 2 ranks");
    }
    kd_test_proc_free(&p);
    double la[256], lb[256];
    int na = step_losses(ref, la, 256), nb = step_losses(out, lb, 256);
    if (na != nb || na < 10) fail_msg("srun -n 2: %d step records, mpirun -np 2: %d", nb, na);
    for (int i = 0; i < na; i++)
        if (la[i] != lb[i]) fail_msg("srun -n 2: step %d loss %.9g, mpirun -np 2 %.9g", i + 1, lb[i], la[i]);
    char b[1000], msg[512];
    snprintf(b, sizeof b, "%s/last.safetensors", out);
    if (kd_test_ckpts_differ(ref_ckpt, b, KD_TEST_CKPT_ALL, msg, sizeof msg))
        fail_msg("srun -n 2 --mpi=pmix gives other weights than mpirun -np 2: %s", msg);
    fprintf(stderr, "[test_dist] srun -n 2 --mpi=pmix: %d step losses and last.safetensors equal mpirun -np 2 bit for bit\n",
            na);
    /* Without a PMI the two tasks cannot join: one error, no training. */
    char none[900];
    run_dir(none, sizeof none, "srun2_none");
    const char *const args2[] = {TRAIN(none, "16", "1"), NULL};
    k = 0;
    const char *const srun2[] = {"srun", "-n", "2", "--overcommit", "--mpi=none", NULL};
    for (int i = 0; srun2[i]; i++) av[k++] = srun2[i];
    av[k++] = KD_EXE;
    for (int i = 0; args2[i] && k < MAXARG - 1; i++) av[k++] = args2[i];
    av[k] = NULL;
    p = run_argv(av, TIMEOUT);
    expect_one_error(&p, 1, "srun --mpi=pmix");
    kd_test_proc_free(&p);
    snprintf(b, sizeof b, "%s/last.safetensors", none);
    if (stat(b, &st) == 0) fail_msg("srun -n 2 --mpi=none trained into %s", none);
}

/* ------------------------------------------------------------------ main */

static int group_setup(void **state) {
    (void)state;
    snprintf(g_root, sizeof g_root, "%s", kd_test_tmpdir("test_dist"));
    snprintf(g_data, sizeof g_data, "%s/data", g_root);
    kd_test_write_idx(g_data, 128, 32, 8);
    /* CI runs as root; Open MPI's launcher refuses that unless told. */
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    if (HAVE_MPI) {
        const char *av[] = {KD_MPIEXEC, "--version", NULL};
        pid_t pid;
        int ok = posix_spawnp(&pid, av[0], NULL, NULL, (char *const *)av, environ) == 0;
        int ws = 0;
        if (ok) ok = waitpid(pid, &ws, 0) == pid && WIFEXITED(ws) && WEXITSTATUS(ws) == 0;
        g_mpi_ok = ok;
        if (!ok) fprintf(stderr, "[test_dist] %s does not run: the MPI cases are skipped\n", KD_MPIEXEC);
    }
    return 0;
}

int main(int argc, char **argv) {
    snprintf(g_self, sizeof g_self, "%s", argv[0][0] == '/' ? argv[0] : "");
    if (!g_self[0] && !realpath(argv[0], g_self)) snprintf(g_self, sizeof g_self, "%s", argv[0]);
    if (argc > 1 && strcmp(argv[1], "--api-child") == 0) return api_child();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sync_bn_halves),
        cmocka_unit_test(test_sync_bn_unequal),
        cmocka_unit_test(test_sync_bn_blocked),
        cmocka_unit_test(test_api),
        cmocka_unit_test(test_np2_equals_one),
        cmocka_unit_test(test_np3_equals_one),
        cmocka_unit_test(test_np2_without_sync_bn_differs),
        cmocka_unit_test(test_distill_np2),
        cmocka_unit_test(test_method_state_np2),
        cmocka_unit_test(test_resume_same_ranks),
        cmocka_unit_test(test_resume_other_ranks),
        cmocka_unit_test(test_rank_dies),
        cmocka_unit_test(test_rank_hangs),
        cmocka_unit_test(test_batch_not_divisible),
        cmocka_unit_test(test_ranks_disagree_config),
        cmocka_unit_test(test_ranks_disagree_data),
        cmocka_unit_test_teardown(test_two_hosts_netns, netns_teardown),
        cmocka_unit_test(test_srun_np2),
    };
    /* The Slurm case belongs to the suite only where srun is installed
     * (there, a cluster that does not answer skips it); without srun the
     * program runs the other cases, so their passes are not hidden behind a
     * skip. */
    size_t n = sizeof tests / sizeof tests[0];
    if (!on_path("srun")) {
        fprintf(stderr, "[test_dist] srun is not installed: the Slurm case is not part of this run\n");
        n--;
    }
    return _cmocka_run_group_tests("test_dist", tests, n, group_setup, NULL);
}
