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

/* ------------------------------------------------ the test kd_function */

static kd_status polymul_fwd(kd_graph *g, const void *p, kd_tensor *const *in, int n_in, kd_tensor *out,
                             void **saved) {
    (void)g, (void)p, (void)n_in, (void)saved;
    const float *a = kd_f32(in[0]), *b = kd_f32(in[1]);
    float *y = kd_f32(out);
    for (int64_t i = 0; i < kd_tensor_numel(out); i++) y[i] = a[i] * b[i] * b[i] + 0.5f * a[i];
    return KD_OK;
}

static kd_status polymul_bwd(kd_graph *g, const void *p, void *saved, kd_tensor *const *in, int n_in,
                             const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)p, (void)saved, (void)n_in;
    const float *a = kd_f32(in[0]), *b = kd_f32(in[1]), *gy = kd_f32(gout);
    for (int64_t i = 0; i < kd_tensor_numel(out); i++) {
        if (gin[0]) kd_f32(gin[0])[i] += gy[i] * (b[i] * b[i] + 0.5f);
        if (gin[1]) kd_f32(gin[1])[i] += gy[i] * 2.0f * a[i] * b[i];
    }
    return KD_OK;
}

const kd_function kd_test_fn_polymul = {"polymul", polymul_fwd, polymul_bwd};
