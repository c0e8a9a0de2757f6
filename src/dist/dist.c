/* The process group of a data-parallel run: Open MPI when kd is built with
 * it (KD_WITH_MPI) and a launcher started the process, else one process.
 * Every collective is posted non-blocking and polled with MPI_Test until it
 * completes or kd_dist_timeout() passes, so a rank that stops turns into an
 * error on the others rather than a hang; MPI errors come back as kd_status
 * (MPI_ERRORS_RETURN). Only the thread that called kd_dist_init calls MPI
 * (MPI_THREAD_FUNNELED). include/kd/dist.h documents the contract. */
#include "kd/dist.h"

#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef KD_WITH_MPI
#include <mpi.h>
#endif

static int kd__rank = 0, kd__size = 1, kd__inited = 0, kd__collective = 0, kd__reporter = 0;
static const char *kd__launcher = "none";
static double kd__timeout = 1800.0;
static int64_t kd__bytes = 0;
static double kd__wait_s = 0;

/* The launcher that started this process and the size it asked for (0 when
 * the environment does not say). */
static const char *kd__detect(int *want) {
    const char *v;
    *want = 0;
    if ((v = getenv("OMPI_COMM_WORLD_SIZE"))) {
        *want = atoi(v);
        return "mpirun";
    }
    if ((v = getenv("PMI_SIZE"))) {
        *want = atoi(v);
        return "pmi";
    }
    if (getenv("PMI_RANK")) return "pmi";
    if (getenv("PMIX_RANK")) {
        if ((v = getenv("SLURM_STEP_NUM_TASKS"))) *want = atoi(v);
        return "pmix";
    }
    /* srun sets SLURM_STEP_NUM_TASKS in every task of a step (not in a batch
     * script itself); without PMIx or PMI variables beside it (srun
     * --mpi=none, Slurm's default MpiDefault) the tasks cannot find each
     * other: kd_dist_init refuses rather than train N unrelated copies. */
    if ((v = getenv("SLURM_STEP_NUM_TASKS")) && atoi(v) > 1) {
        *want = atoi(v);
        return "srun";
    }
    return NULL;
}

int kd_dist_rank(void) { return kd__rank; }
int kd_dist_size(void) { return kd__size; }
const char *kd_dist_launcher(void) { return kd__launcher; }
void kd_dist_set_timeout(double seconds) { kd__timeout = seconds > 0 ? seconds : 0; }
double kd_dist_timeout(void) { return kd__timeout; }
int64_t kd_dist_bytes_reduced(void) { return kd__bytes; }
double kd_dist_wait_seconds(void) { return kd__wait_s; }
int kd_dist_error_quiet(void) { return kd__collective && kd__reporter != kd__rank; }
int kd_dist_error_collective(void) { return kd__collective; }
void kd_dist_mark_collective(int reporter) {
    kd__collective = 1;
    kd__reporter = reporter;
}

#ifdef KD_WITH_MPI
int kd_dist_built(void) { return 1; }

static int kd__joined = 0; /* kd_dist_init called MPI_Init (or found it called) */

static double kd__now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static kd_status kd__mpi_err(int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "MPI error %d", rc);
    return kd_error(KD_ERR_IO, "rank %d of %d: %s failed: %s", kd__rank, kd__size, what, msg);
}

#define KD__MAXREQ 64
static MPI_Request kd__reqs[KD__MAXREQ];
static int kd__req_used[KD__MAXREQ]; /* 1: posted; 2: completed by kd_dist_progress */

/* Polls rq until it completes or the deadline passes. */
static kd_status kd__wait_req(MPI_Request *rq, const char *what) {
    double t0 = kd__now(), deadline = kd__timeout > 0 ? t0 + kd__timeout : 0;
    kd_status s = KD_OK;
    for (unsigned it = 0;; it++) {
        int done = 0;
        int rc = MPI_Test(rq, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            s = kd__mpi_err(rc, what);
            break;
        }
        if (done) break;
        if ((it & 255) == 255) {
            double t = kd__now();
            if (deadline > 0 && t > deadline) {
                s = kd_error(KD_ERR_IO,
                             "rank %d of %d: %s did not complete within %g s: another rank stopped or hangs "
                             "(KD_DIST_TIMEOUT sets the limit)",
                             kd__rank, kd__size, what, kd__timeout);
                break;
            }
            /* Past the first millisecond, let the other ranks' work have the core. */
            if (t - t0 > 1e-3) {
                struct timespec ts = {0, 20000};
                nanosleep(&ts, NULL);
            }
        }
    }
    kd__wait_s += kd__now() - t0;
    return s;
}

/* srun started this process as one of want tasks without a PMI: an error,
 * reported by task 0 alone (SLURM_PROCID); MPI is not started. */
static kd_status kd__srun_without_pmi(int want) {
    const char *v = getenv("SLURM_PROCID");
    kd__rank = v ? atoi(v) : 0;
    kd__size = want;
    kd_dist_mark_collective(0);
    return kd_error(KD_ERR_INVALID,
                    "srun started %d tasks without PMIx (srun --mpi=none, or Slurm's MpiDefault), so they cannot "
                    "join one job and would train %d unrelated copies: start kd with srun --mpi=pmix (or mpirun)",
                    want, want);
}

kd_status kd_dist_init(void) {
    if (kd__inited) return KD_OK;
    kd__inited = 1;
    const char *v = getenv("KD_DIST_TIMEOUT");
    if (v && *v) kd__timeout = atof(v) > 0 ? atof(v) : 0;
    int want = 0;
    const char *l = kd__detect(&want);
    if (!l) return KD_OK;
    if (strcmp(l, "srun") == 0) return kd__srun_without_pmi(want);
    int flag = 0;
    MPI_Initialized(&flag);
    if (!flag) {
        int prov = 0;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &prov) != MPI_SUCCESS)
            return kd_error(KD_ERR_IO, "started by %s, but MPI_Init failed", l);
    }
    kd__joined = 1;
    kd__launcher = l;
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &kd__rank);
    MPI_Comm_size(MPI_COMM_WORLD, &kd__size);
    if (want > 1 && kd__size != want)
        return kd_error(KD_ERR_INVALID,
                        "the launcher (%s) started %d processes but MPI sees %d: kd and the launcher use "
                        "different MPI libraries (under Slurm use srun --mpi=pmix, or mpirun)",
                        l, want, kd__size);
    return KD_OK;
}

void kd_dist_finalize(void) {
    if (!kd__joined) return;
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) MPI_Finalize();
    kd__joined = 0;
}

void kd_dist_abort(int code) {
    if (!kd__joined || kd__size <= 1) return;
    fflush(stdout);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
    _exit(code ? code : 1);
}

static int kd__active(void) { return kd__joined && kd__size > 1; }

static kd_status kd__allreduce(void *buf, int64_t n, MPI_Datatype dt, size_t esz, MPI_Op op, const char *what) {
    if (!kd__active() || n <= 0) return KD_OK;
    char *p = buf;
    while (n > 0) {
        int c = n > INT_MAX ? INT_MAX : (int)n;
        MPI_Request rq;
        int rc = MPI_Iallreduce(MPI_IN_PLACE, p, c, dt, op, MPI_COMM_WORLD, &rq);
        if (rc != MPI_SUCCESS) return kd__mpi_err(rc, what);
        KD_TRY(kd__wait_req(&rq, what));
        kd__bytes += (int64_t)c * (int64_t)esz;
        p += (size_t)c * esz;
        n -= c;
    }
    return KD_OK;
}

kd_status kd_dist_allreduce_f32(float *buf, int64_t n) {
    return kd__allreduce(buf, n, MPI_FLOAT, sizeof(float), MPI_SUM, "all-reduce (float sum)");
}
kd_status kd_dist_allreduce_f64(double *buf, int64_t n) {
    return kd__allreduce(buf, n, MPI_DOUBLE, sizeof(double), MPI_SUM, "all-reduce (double sum)");
}
kd_status kd_dist_allreduce_max_i64(int64_t *buf, int64_t n) {
    return kd__allreduce(buf, n, MPI_INT64_T, sizeof(int64_t), MPI_MAX, "all-reduce (max)");
}

kd_status kd_dist_iallreduce_f32(float *buf, int64_t n, kd_dist_req *req) {
    req->id = 0;
    req->n = n;
    if (!kd__active() || n <= 0) return KD_OK;
    if (n > INT_MAX)
        return kd_error(KD_ERR_INVALID, "non-blocking all-reduce of %lld floats: at most %d per call", (long long)n,
                        INT_MAX);
    int k = 0;
    while (k < KD__MAXREQ && kd__req_used[k]) k++;
    if (k == KD__MAXREQ)
        return kd_error(KD_ERR_INTERNAL, "more than %d non-blocking all-reduces in flight", KD__MAXREQ);
    int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &kd__reqs[k]);
    if (rc != MPI_SUCCESS) return kd__mpi_err(rc, "non-blocking all-reduce");
    kd__req_used[k] = 1;
    kd__bytes += n * (int64_t)sizeof(float);
    req->id = k + 1;
    return KD_OK;
}

kd_status kd_dist_wait(kd_dist_req *req, const char *what) {
    if (!req || req->id <= 0) return KD_OK;
    int k = req->id - 1;
    req->id = 0;
    kd_status s = kd__req_used[k] == 2 ? KD_OK : kd__wait_req(&kd__reqs[k], what ? what : "all-reduce");
    kd__req_used[k] = 0;
    return s;
}

kd_status kd_dist_progress(void) {
    for (int k = 0; k < KD__MAXREQ; k++) {
        if (kd__req_used[k] != 1) continue;
        int done = 0;
        int rc = MPI_Test(&kd__reqs[k], &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) return kd__mpi_err(rc, "all-reduce (progress)");
        if (done) kd__req_used[k] = 2;
    }
    return KD_OK;
}

kd_status kd_dist_bcast(void *buf, int64_t bytes, int root) {
    if (!kd__active() || bytes <= 0) return KD_OK;
    char *p = buf;
    while (bytes > 0) {
        int c = bytes > INT_MAX ? INT_MAX : (int)bytes;
        MPI_Request rq;
        int rc = MPI_Ibcast(p, c, MPI_BYTE, root, MPI_COMM_WORLD, &rq);
        if (rc != MPI_SUCCESS) return kd__mpi_err(rc, "broadcast");
        KD_TRY(kd__wait_req(&rq, "broadcast"));
        p += c;
        bytes -= c;
    }
    return KD_OK;
}

kd_status kd_dist_allgather(const void *send, void *recv, int64_t bytes) {
    if (!kd__active()) {
        if (bytes > 0 && send != recv) memcpy(recv, send, (size_t)bytes);
        return KD_OK;
    }
    if (bytes > INT_MAX) return kd_error(KD_ERR_INVALID, "all-gather of %lld bytes per rank: too large", (long long)bytes);
    MPI_Request rq;
    int rc = MPI_Iallgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, MPI_COMM_WORLD, &rq);
    if (rc != MPI_SUCCESS) return kd__mpi_err(rc, "all-gather");
    return kd__wait_req(&rq, "all-gather");
}

kd_status kd_dist_barrier(void) {
    if (!kd__active()) return KD_OK;
    MPI_Request rq;
    int rc = MPI_Ibarrier(MPI_COMM_WORLD, &rq);
    if (rc != MPI_SUCCESS) return kd__mpi_err(rc, "barrier");
    return kd__wait_req(&rq, "barrier");
}

#else /* one process */

int kd_dist_built(void) { return 0; }

kd_status kd_dist_init(void) {
    if (kd__inited) return KD_OK;
    kd__inited = 1;
    int want = 0;
    const char *l = kd__detect(&want);
    if (l && want > 1)
        return kd_error(KD_ERR_UNSUPPORTED,
                        "this kd was built without MPI, but %s started it as one of %d processes; rebuild kd "
                        "with Open MPI (libopenmpi-dev) for data-parallel training, or run one process",
                        l, want);
    return KD_OK;
}

void kd_dist_finalize(void) {}
void kd_dist_abort(int code) { (void)code; }
kd_status kd_dist_allreduce_f32(float *buf, int64_t n) { (void)buf, (void)n; return KD_OK; }
kd_status kd_dist_allreduce_f64(double *buf, int64_t n) { (void)buf, (void)n; return KD_OK; }
kd_status kd_dist_allreduce_max_i64(int64_t *buf, int64_t n) { (void)buf, (void)n; return KD_OK; }
kd_status kd_dist_iallreduce_f32(float *buf, int64_t n, kd_dist_req *req) {
    (void)buf;
    req->id = 0;
    req->n = n;
    return KD_OK;
}
kd_status kd_dist_wait(kd_dist_req *req, const char *what) {
    (void)what;
    if (req) req->id = 0;
    return KD_OK;
}
kd_status kd_dist_progress(void) { return KD_OK; }
kd_status kd_dist_bcast(void *buf, int64_t bytes, int root) { (void)buf, (void)bytes, (void)root; return KD_OK; }
kd_status kd_dist_allgather(const void *send, void *recv, int64_t bytes) {
    if (bytes > 0 && send != recv) memcpy(recv, send, (size_t)bytes);
    return KD_OK;
}
kd_status kd_dist_barrier(void) { return KD_OK; }
#endif

kd_status kd_dist_gather_rows(const void *rows, int64_t n, int64_t row_bytes, const char *what, void **out,
                              int64_t *n_out) {
    *out = NULL;
    *n_out = 0;
    int size = kd__size > 1 ? kd__size : 1;
    int64_t *ns = malloc((size_t)size * sizeof *ns);
    if (!ns) return kd_error(KD_ERR_NOMEM, "out of memory gathering %s", what);
    kd_status s = kd_dist_allgather(&n, ns, sizeof n);
    for (int r = 0; s == KD_OK && r < size; r++)
        if (ns[r] != n)
            s = kd_error(KD_ERR_INVALID, "gathering %s: rank %d has %lld rows, rank %d has %lld (every rank must take "
                                         "the same batch)",
                         what, r, (long long)ns[r], kd_dist_rank(), (long long)n);
    free(ns);
    if (s != KD_OK) return s;
    void *all = malloc((size_t)(size * n * row_bytes > 0 ? size * n * row_bytes : 1));
    if (!all) return kd_error(KD_ERR_NOMEM, "out of memory gathering %s", what);
    if ((s = kd_dist_allgather(rows, all, n * row_bytes)) != KD_OK) {
        free(all);
        return s;
    }
    *out = all;
    *n_out = size * n;
    return KD_OK;
}

kd_status kd_dist_agree(kd_status s, int *flag) {
    if (kd__size <= 1) return s;
    int64_t mine[2] = {(int64_t)s, flag ? *flag : 0};
    int64_t *all = calloc((size_t)kd__size * 2, sizeof *all);
    if (!all) return kd_error(KD_ERR_NOMEM, "out of memory");
    char keep[1024];
    snprintf(keep, sizeof keep, "%s", kd_last_error());
    kd_status gs = kd_dist_allgather(mine, all, (int64_t)sizeof mine);
    if (gs != KD_OK) {
        free(all);
        return gs;
    }
    int first = -1;
    int64_t f = 0;
    for (int r = 0; r < kd__size; r++) {
        if (first < 0 && all[2 * r] != KD_OK) first = r;
        if (all[2 * r + 1] > f) f = all[2 * r + 1];
    }
    if (flag) *flag = (int)f;
    kd_status out = first < 0 ? KD_OK : (kd_status)all[2 * first];
    free(all);
    if (first < 0) return KD_OK;
    kd_dist_mark_collective(first);
    if (first == kd__rank) {
        kd_error(out, "%s", keep); /* the message of this rank's own failure */
        return out;
    }
    return kd_error(out, "rank %d of %d stopped the run (its message says why)", first, kd__size);
}

void kd_dist_test_point(int64_t step) {
    static int parsed = 0, die_rank = -1, hang = 0;
    static long long die_step = -1;
    if (!parsed) {
        parsed = 1;
        const char *v = getenv("KD_DIST_TEST_DIE");
        if (v && *v) {
            char mode[16] = "";
            if (sscanf(v, "%d:%lld:%15s", &die_rank, &die_step, mode) >= 2) hang = strcmp(mode, "hang") == 0;
            else die_rank = -1;
        }
    }
    if (die_rank != kd__rank || step != die_step) return;
    fprintf(stderr, "[kd test] KD_DIST_TEST_DIE: rank %d %s at step %lld\n", kd__rank, hang ? "hangs" : "dies",
            (long long)step);
    fflush(stderr);
    if (hang)
        for (;;) pause();
    raise(SIGKILL);
}
