/* Logging to stderr and the thread-count setting shared with OpenMP/oneDNN. */
#include "kd/core.h"

#include <omp.h>
#include <stdio.h>
#include <time.h>

static kd_log_level kd__level = KD_LOG_INFO;

void kd_log_set_level(kd_log_level lvl) { kd__level = lvl; }
kd_log_level kd_log_get_level(void) { return kd__level; }

void kd_log_msg(kd_log_level lvl, const char *fmt, ...) {
    if (lvl < kd__level) return;
    static const char *tags[] = {"debug", "info", "warn", "error"};
    fprintf(stderr, "[kd %s] ", tags[lvl < KD_LOG_QUIET ? lvl : KD_LOG_ERROR]);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void kd_set_num_threads(int n) {
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
}

int kd_get_num_threads(void) { return omp_get_max_threads(); }
