/* Shared helpers for the cmocka tests: tolerance checks with a readable report,
 * fixture paths, deterministic random fills, a scratch directory, generated
 * datasets (CIFAR-100 binary, tiny IDX), runs of the kd program with their
 * exit status, stdout and stderr, and safetensors look-ups and comparisons. */
#ifndef KD_TESTUTIL_H
#define KD_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "kd/core.h"

/* Skipped cases are reported as skipped, never as passed: skip() counts the
 * skip, and a group run whose cases all passed or skipped, with at least one
 * skip, returns KD_TEST_SKIP_CODE (77), which tests/CMakeLists.txt declares as
 * ctest's SKIP_RETURN_CODE. A failure keeps cmocka's nonzero count. Both
 * cmocka_run_group_tests and direct _cmocka_run_group_tests calls go
 * through kd_test_group_rc. */
#define KD_TEST_SKIP_CODE 77
extern int kd_test_skipped;
int kd_test_group_rc(int cmocka_rc);
#undef skip
#define skip()                            \
    do {                                  \
        kd_test_skipped++;                \
        _skip(__FILE__, __LINE__);        \
    } while (0)
#define _cmocka_run_group_tests(...) kd_test_group_rc(_cmocka_run_group_tests(__VA_ARGS__))

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

/* Asserts that expr returns `status` and that kd_last_error() mentions `needle`. */
#define ASSERT_ERR(expr, status, needle)                                                       \
    do {                                                                                       \
        kd_clear_error();                                                                      \
        kd_status s_ = (expr);                                                                 \
        if (s_ != (status))                                                                    \
            fail_msg("%s -> %s (%s), want %s", #expr, kd_status_str(s_), kd_last_error(),      \
                     kd_status_str(status));                                                   \
        if (!strstr(kd_last_error(), (needle)))                                                \
            fail_msg("%s: message \"%s\" lacks \"%s\"", #expr, kd_last_error(), (needle));     \
    } while (0)

/* Uniform [lo, hi) fill from a counter-based stream (reproducible). */
void kd_test_fill_uniform(float *x, int64_t n, float lo, float hi, uint64_t seed);

/* A fresh empty directory under the build tree for this test program; the
 * returned string is static. */
const char *kd_test_tmpdir(const char *tag);

/* torch.optim.SGD(params, lr, momentum, weight_decay, nesterov) over one
 * parameter list as a kd_optim (one group, prefix "", lr_scale 1, weight
 * decay on every trainable tensor); fails the test on error. */
#include "kd/optim.h"
kd_optim *kd_test_sgd_new(kd_param_list *pl, double lr, double momentum, double weight_decay, int nesterov);

/* A custom function (kd_function) for the op-table tests: y = a * b^2 + a / 2
 * elementwise on two float32 tensors of one shape (PyTorch: a * b * b + 0.5 * a). */
#include "kd/autograd.h"
extern const kd_function kd_test_fn_polymul;

/* ------------------------------------------ generated data and the kd program */

/* Writes n bytes to path (created or truncated); fails the test on error. */
void kd_test_write_file(const char *path, const void *data, size_t n);

/* STL-10's binary format (96x96x3 records): the pixel (c, y, x) of image i
 * of a generated split `tag`, and DIR/<split>_X.bin of n such images
 * (column-major per channel, as STL-10 stores it) with, when labels != 0,
 * DIR/<split>_y.bin holding 1 + (i * 3 + tag) % 10. */
#define KD_TEST_STL 96
uint8_t kd_test_stl10_pix(int tag, int64_t i, int c, int y, int x);
void kd_test_write_stl10_split(const char *dir, const char *split, int tag, int64_t n, int labels);

/* Stores v big-endian (IDX headers) at p[0..3]. */
void kd_test_put_be32(unsigned char *p, uint32_t v);

/* Writes DIR/train.bin and DIR/test.bin in the CIFAR-100 binary format (per
 * image: coarse label, fine label, 3072 bytes of planes R, G, B): image i has
 * fine label i % 100 (coarse label / 5) and a class-dependent brightness ramp
 * over noise from seed. DIR must exist; fails the test on error. */
void kd_test_write_cifar100(const char *dir, int n_train, int n_test, uint64_t seed);

/* The whole file, NUL-terminated, or NULL when unreadable; *n its length. */
char *kd_test_slurp(const char *path, size_t *n);

/* Runs fn(arg) with this process's stderr (fd 2) sent to a temporary file
 * and returns what it wrote there, NUL-terminated (free it). */
char *kd_test_capture_stderr(void (*fn)(void *arg), void *arg);

/* Seconds on a monotonic clock. */
double kd_test_now(void);

/* One finished run of the kd program (KD_BINARY_DIR "/kd"). */
typedef struct {
    int status; /* exit status, or -1 when killed by a signal */
    int signal; /* the signal, or 0 */
    char *out;  /* stdout */
    char *err;  /* stderr */
    double secs;
} kd_test_proc;

/* A started kd program: its pid, start time and the files that capture its
 * stdout and stderr. */
#include <sys/types.h>
typedef struct {
    pid_t pid;
    double t0;
    char out_path[1200];
    char err_path[1200];
} kd_test_child;

/* Starts kd with the NULL-terminated args (stdin /dev/null; stdout and stderr
 * captured in files under scratch) without waiting; fails the test when it
 * cannot start. */
kd_test_child kd_test_spawn_kd(const char *scratch, const char *const *args);
/* The finished run of child from its waitpid status (stdout and stderr read
 * back; secs since it started). */
kd_test_proc kd_test_collect(const kd_test_child *child, int wstatus);
/* Runs kd with the NULL-terminated args (as kd_test_spawn_kd) and waits for it. */
kd_test_proc kd_test_run_kd(const char *scratch, const char *const *args);
void kd_test_proc_free(kd_test_proc *p);
/* Prints the run's exit status, stdout and stderr to stderr, headed by what
 * when not NULL. */
void kd_test_proc_dump(const kd_test_proc *p, const char *what);
/* Fails the test, printing the run's stdout and stderr, unless it exited 0. */
void kd_test_expect_ok(const kd_test_proc *p, const char *what);
/* Lines of s that are not empty (nor log lines "[kd ...]" when skip_log);
 * *first the first of them (NULL when none). */
int kd_test_count_lines(const char *s, int skip_log, const char **first);
/* 1 when the len bytes at hay hold needle, ASCII case-insensitively. */
int kd_test_contains_ci(const char *hay, size_t len, const char *needle);
/* Checks a failed run: the exact exit status (1 or 2 when want < 0), no
 * signal, and exactly one error line on stderr, starting with "kd" and
 * holding every NULL-terminated needle (case-insensitive); log lines
 * ("[kd info] ...") may come before it unless strict_one_line. */
void kd_test_expect_fail(const kd_test_proc *p, int want, int strict_one_line, const char *const *needles);
#define KD_TEST_EXPECT_FAIL(p, want, ...) kd_test_expect_fail((p), (want), 1, (const char *const[]){__VA_ARGS__, NULL})
#define KD_TEST_EXPECT_FAIL_AFTER_LOG(p, want, ...)                                                            \
    kd_test_expect_fail((p), (want), 0, (const char *const[]){__VA_ARGS__, NULL})

/* ------------------------------------ the tiny IDX dataset and checkpoints */

/* Writes an IDX dataset (MNIST file names) into DIR (created if missing):
 * side x side grey images of 4 classes; class k (image i has label i % 4)
 * has a bright horizontal band in the k-th quarter of the rows on dark noise
 * (invariant to horizontal flips, robust to small crop shifts; side 8: rows
 * 2k and 2k+1). Training images come from seed 1, test images from seed 2.
 * Fails the test on error. */
void kd_test_write_idx(const char *dir, int n_train, int n_test, int side);

/* The safetensors file at path, opened; fails the test when it cannot be. */
#include "kd/io.h"
kd_st_file *kd_test_st_open(const char *path);

/* The entry of f named by the printf-style format; fails the test when f has
 * none. */
#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
const kd_st_entry *kd_test_st_entry(const kd_st_file *f, const char *fmt, ...);

/* Number of tensors of f whose names start with prefix. */
int kd_test_st_count_prefixed(const kd_st_file *f, const char *prefix);

/* Which tensors kd_test_ckpts_differ compares. */
enum {
    KD_TEST_CKPT_MODEL = 0,       /* those without the "optim." prefix */
    KD_TEST_CKPT_WITH_OPTIM = 1,  /* all; a file without optimiser state differs */
    KD_TEST_CKPT_ALL = 2          /* all */
};

/* Whether two safetensors files differ in any tensor that `which` (a
 * KD_TEST_CKPT_* value) selects, byte for byte (dtype and shape included), or
 * in their sets of such tensors; msg says where. Metadata (wall time, ...) is
 * not compared. Fails the test when either file cannot be opened (a missing
 * file is neither the same nor different). */
int kd_test_ckpts_differ(const char *pa, const char *pb, int which, char *msg, size_t msgn);

/* ---------------------------------- torchvision state_dict fixtures (zoo tests) */
#include "kd/models.h"
/* tools/gen_imagenet_fixtures.py generated_weight: element i of state_dict
 * entry k, U(-1, 1) * sqrt(3 / fan_in) from splitmix64((k + 1) * golden + i). */
void kd_test_gen_weight(float *w, int64_t n, uint64_t k, int64_t fan_in);
/* Max |got - want| after failing the test when an element differs by more than
 * tol * max(1, max|want|), or the shapes differ. */
double kd_test_compare_scaled(const char *what, const kd_tensor *got, const kd_st_entry *want, double tol);
/* Writes the torchvision state_dict that a fixture's metadata describes
 * ("names", "shapes", "dtypes", "generated": 1 generated by
 * kd_test_gen_weight(k, fan_in = numel / shape[0]), 0 stored in fx as
 * "<sd_prefix>.sd.<name>", 2 a Swin relative_position_index rebuilt from
 * torchvision's formula) to path. */
void kd_test_write_state_dict(kd_st_file *fx, const char *sd_prefix, const kd_json *meta, const char *path);
/* Fails the test unless m's parameter list equals the metadata's state_dict
 * entry for entry (order, names, shapes, dtypes). */
void kd_test_check_state_dict_names(const char *arch, kd_model *m, const kd_json *meta);
/* Fails the test unless every trainable tensor of pl has a gradient that is
 * finite everywhere and not all zero (after one training step of a model). */
void kd_test_check_param_grads(const char *who, const kd_param_list *pl);
/* The metadata entry key of fx parsed as JSON (fails the test otherwise), and
 * one of its arrays. */
kd_json *kd_test_st_meta_json(kd_st_file *fx, const char *key);
const kd_json *kd_test_json_array(const kd_json *j, const char *key);

/* ------------------------------------------------ hostile input (test_hostile) */

/* What a child run by kd_test_measure did: fn's kd_status, kd_last_error()
 * after it, and its peak resident memory: the high-water mark at the end
 * (ru_maxrss) and its growth over the mark at the start, in KiB. */
typedef struct {
    int status;
    char error[1024];
    long peak_kib, growth_kib;
} kd_test_measured;

/* Runs fn(arg) in a forked child (so no other test's allocations count) and
 * returns its status, error and peak memory; fails the test when the child
 * crashes or is killed. */
kd_test_measured kd_test_measure(kd_status (*fn)(void *arg), void *arg);

/* Writes n bytes to path gzip-compressed. */
void kd_test_write_gz(const char *path, const void *data, size_t n);
/* Writes `zeros` zero bytes after n bytes of data to path, gzip-compressed
 * (a small file that inflates to n + zeros bytes). */
void kd_test_write_gz_bomb(const char *path, const void *data, size_t n, uint64_t zeros);
/* A sparse file of `size` bytes (holes, no data) starting with n bytes of
 * data (n may be 0). */
void kd_test_write_sparse(const char *path, const void *data, size_t n, uint64_t size);
/* A PNG (8-bit RGB) whose IHDR claims w x h pixels, followed by one tiny
 * IDAT chunk and IEND: a valid header with far too little data. */
void kd_test_write_png_claiming(const char *path, uint32_t w, uint32_t h);
/* A baseline JPEG of 8x8 pixels whose frame header is patched to claim
 * w x h (each <= 65535) pixels; progressive != 0 makes it progressive. */
void kd_test_write_jpeg_claiming(const char *path, uint32_t w, uint32_t h, int progressive);

/* A valid progressive JPEG of 8x8 pixels made of more scans than kd reads
 * (a scan bomb); returns the number of scans. */
int kd_test_write_jpeg_scan_bomb(const char *path);

/* A baseline RGB JPEG of w x h random pixels (stream seed). */
void kd_test_write_jpeg(const char *path, int w, int h, uint64_t seed);

#endif
