/* Shared helpers for the cmocka tests. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

double kd_test_check_close(const float *a, const float *b, int64_t n, double atol, double rtol,
                           const char *what, const char *file, int line) {
    double worst = 0, maxabs = 0;
    int64_t wi = -1;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d == d) || isinf(a[i]) != isinf(b[i])) { wi = i; worst = INFINITY; break; }
        if (d > maxabs) maxabs = d;
        double excess = d - (atol + rtol * fabs((double)b[i]));
        if (excess > worst) { worst = excess; wi = i; }
    }
    if (wi >= 0 && worst > 0) {
        /* Print first: _fail() jumps out of the test. */
        fprintf(stderr, "%s:%d: %s: element %lld got %.8g want %.8g (atol %g rtol %g, n %lld)\n",
                file, line, what, (long long)wi, a[wi], b[wi], atol, rtol, (long long)n);
        _fail(file, line);
    }
    return maxabs;
}

void kd_test_fill_uniform(float *x, int64_t n, float lo, float hi, uint64_t seed) {
    kd_rng r;
    kd_rng_init(&r, seed, 0x7e57);
    for (int64_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * kd_rng_uniform(&r);
}

const char *kd_test_tmpdir(const char *tag) {
    static char buf[1024];
    snprintf(buf, sizeof buf, "%s/test_tmp/%s.%d", KD_BINARY_DIR, tag, (int)getpid());
    char cmd[2200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", buf, buf);
    if (system(cmd) != 0) fprintf(stderr, "cannot create %s\n", buf);
    return buf;
}
