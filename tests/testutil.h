/* Shared helpers for the cmocka tests: tolerance checks with a readable report,
 * fixture paths, deterministic random fills, and a scratch directory. */
#ifndef KD_TESTUTIL_H
#define KD_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "kd/core.h"

#define KD_FIXTURE(name) (KD_SOURCE_DIR "/tests/fixtures/" name)

/* Fails the current cmocka test (with the worst element reported) unless
 * |a - b| <= atol + rtol * |b| elementwise. Returns the max abs error. */
double kd_test_check_close(const float *a, const float *b, int64_t n, double atol, double rtol,
                           const char *what, const char *file, int line);
#define KD_ASSERT_CLOSE(a, b, n, atol, rtol, what) \
    kd_test_check_close((a), (b), (n), (atol), (rtol), (what), __FILE__, __LINE__)

/* Fails the test with kd_last_error() unless s == KD_OK. */
#define KD_ASSERT_OK(expr)                                                        \
    do {                                                                          \
        kd_status kd__ts = (expr);                                                \
        if (kd__ts != KD_OK) fail_msg("%s -> %s: %s", #expr, kd_status_str(kd__ts), \
                                      kd_last_error());                           \
    } while (0)

/* Uniform [lo, hi) fill from a counter-based stream (reproducible). */
void kd_test_fill_uniform(float *x, int64_t n, float lo, float hi, uint64_t seed);

/* A fresh empty directory under the build tree for this test program; the
 * returned string is static. */
const char *kd_test_tmpdir(const char *tag);

/* A custom function (kd_function) for the op-table tests: y = a * b^2 + a / 2
 * elementwise on two float32 tensors of one shape (PyTorch: a * b * b + 0.5 * a). */
#include "kd/autograd.h"
extern const kd_function kd_test_fn_polymul;

#endif
