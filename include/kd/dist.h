/*
 * kd/dist.h: the process group of a data-parallel run (Open MPI), and a
 * stub of one process when kd is built without MPI.
 *
 * kd detects its rank and size itself. kd_dist_init calls MPI_Init only when
 * a launcher started the process: Open MPI's mpirun (OMPI_COMM_WORLD_SIZE),
 * a PMIx launcher such as `srun --mpi=pmix` (PMIX_RANK), or a PMI-1/2 one
 * such as `srun --mpi=pmi2` or MPICH's hydra (PMI_SIZE). A plain `kd ...`
 * never touches MPI at run time: rank 0 of 1, and every collective below is
 * a no-op (or a copy). A build without MPI (KD_WITH_MPI undefined) started by
 * a launcher that asks for more than one process fails in kd_dist_init
 * instead of running N unrelated copies that write the same run directory;
 * so does any build started by srun as one of N > 1 tasks without PMIx or
 * PMI (`srun --mpi=none`, Slurm's default MpiDefault: SLURM_STEP_NUM_TASKS
 * alone), task 0 (SLURM_PROCID) printing the error.
 *
 * Every collective is posted non-blocking and waited for with a deadline
 * (kd_dist_set_timeout; KD_DIST_TIMEOUT seconds in the environment, default
 * 1800, 0: none), so a rank that stops without its launcher noticing turns
 * into an error on the others ("... did not complete within N s") instead of
 * a hang. MPI errors come back as kd_status (MPI_ERRORS_RETURN); the caller
 * (the CLI) ends the job with kd_dist_abort. Under mpirun a rank that dies
 * makes mpirun kill the others at once.
 *
 * Usage:
 *     kd_dist_init();                       // once, first thing in main
 *     float g[n]; ... kd_dist_allreduce_f32(g, n);  // in place, sum over ranks
 *     kd_dist_req rq;
 *     kd_dist_iallreduce_f32(bucket, m, &rq);  // overlap with other work
 *     ... kd_dist_wait(&rq);
 *     kd_dist_finalize();
 */
#ifndef KD_DIST_H
#define KD_DIST_H

#include <stdint.h>

#include "kd/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Detects the launcher and joins the job (MPI_Init_thread, FUNNELED: only
 * the thread that called kd_dist_init may call the collectives). Idempotent;
 * a failure leaves a single-process group. */
kd_status kd_dist_init(void);
/* MPI_Finalize when kd_dist_init joined a job; idempotent. */
void kd_dist_finalize(void);
/* Ends every rank of the job with exit status code (MPI_Abort). Without a job
 * (size 1) it returns, and the caller exits as usual. */
void kd_dist_abort(int code);

int kd_dist_rank(void);       /* 0 .. size-1; 0 without a job */
int kd_dist_size(void);       /* 1 without a job */
int kd_dist_built(void);      /* 1 when kd was built with MPI */
const char *kd_dist_launcher(void); /* "mpirun", "pmix", "pmi", or "none" */

/* Seconds a collective may wait before it fails (0: forever). */
void kd_dist_set_timeout(double seconds);
double kd_dist_timeout(void);

/* In-place sums over the ranks (every rank gets the same result). */
kd_status kd_dist_allreduce_f32(float *buf, int64_t n);
kd_status kd_dist_allreduce_f64(double *buf, int64_t n);
/* In-place maximum over the ranks. */
kd_status kd_dist_allreduce_max_i64(int64_t *buf, int64_t n);

/* A posted non-blocking collective. */
typedef struct {
    int id;   /* internal slot + 1; 0: nothing posted (kd_dist_wait returns at once) */
    int64_t n;
} kd_dist_req;
/* Posts an in-place sum of buf (n floats, at most 2^31 - 1); buf must stay
 * untouched until kd_dist_wait(req) returns. At most 64 may be in flight. */
kd_status kd_dist_iallreduce_f32(float *buf, int64_t n, kd_dist_req *req);
/* Waits for req (deadline: kd_dist_timeout); what names the collective in
 * the error message. */
kd_status kd_dist_wait(kd_dist_req *req, const char *what);
/* Lets posted collectives advance (Open MPI moves a non-blocking collective
 * on only inside MPI calls): tests each one in flight, without waiting. */
kd_status kd_dist_progress(void);

/* bytes of buf from root to every rank. */
kd_status kd_dist_bcast(void *buf, int64_t bytes, int root);
/* Rank r's `bytes` bytes of send land at recv + r * bytes on every rank. */
kd_status kd_dist_allgather(const void *send, void *recv, int64_t bytes);
kd_status kd_dist_barrier(void);
/* concat_all_gather of PyTorch's SSL code: every rank's n rows of row_bytes
 * (n equal on all ranks, else an error naming `what` and both counts), in
 * rank order, into a new malloc'd *out of *n_out = size * n rows (a copy
 * with one process). The caller frees *out. */
kd_status kd_dist_gather_rows(const void *rows, int64_t n, int64_t row_bytes, const char *what, void **out,
                              int64_t *n_out);

/* Bytes this process has passed to the all-reduce calls since start (the
 * figure of docs/DISTRIBUTED.md), and seconds spent in kd_dist_wait. */
int64_t kd_dist_bytes_reduced(void);
double kd_dist_wait_seconds(void);

/* Collective failure: every rank passes its own status s (the same number of
 * times, at the same place). KD_OK on every rank when all succeeded; else
 * every rank returns the status of the lowest failing rank, which keeps its
 * own kd_last_error() message, and the failure is marked collective with
 * that rank as its reporter (the CLI prints one message, from that rank,
 * and every rank exits non-zero without MPI_Abort). *flag is an integer
 * maximum over the ranks (e.g. "a configuration error"); may be NULL. */
kd_status kd_dist_agree(kd_status s, int *flag);
/* Marks the current failure as known to every rank (each returns it), with
 * rank `reporter` the one that tells the user. */
void kd_dist_mark_collective(int reporter);
/* 1 after kd_dist_mark_collective (or a failed kd_dist_agree). */
int kd_dist_error_collective(void);
/* 1 when the failure is collective and another rank reports it. */
int kd_dist_error_quiet(void);

/* Test hook: KD_DIST_TEST_DIE="RANK:STEP" makes rank RANK kill itself with
 * SIGKILL when kd_dist_test_point(STEP) is called (the training loop calls it
 * with its global step); "RANK:STEP:hang" makes it sleep instead. Nothing
 * happens when the variable is unset. */
void kd_dist_test_point(int64_t step);

#ifdef __cplusplus
}
#endif
#endif /* KD_DIST_H */
