/* Shared helpers for the cmocka tests. */
#include "testutil.h"

#include "kd/io.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

int kd_test_skipped;

int kd_test_group_rc(int cmocka_rc) {
    if (cmocka_rc != 0) return cmocka_rc;
    if (kd_test_skipped > 0) {
        fprintf(stderr, "%d case(s) skipped: exit status %d (ctest reports the test as skipped)\n",
                kd_test_skipped, KD_TEST_SKIP_CODE);
        return KD_TEST_SKIP_CODE;
    }
    return 0;
}

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

kd_optim *kd_test_sgd_new(kd_param_list *pl, double lr, double momentum, double weight_decay, int nesterov) {
    kd_optim_cfg c = kd_optim_defaults(KD_OPTIM_SGD);
    c.lr = lr;
    c.momentum = momentum;
    c.weight_decay = weight_decay;
    c.nesterov = nesterov;
    kd_param_group grp = {"", pl, 1.0f};
    kd_optim *o = NULL;
    KD_ASSERT_OK(kd_optim_init(&o, &grp, 1, &c));
    return o;
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

/* ------------------------------------------ generated data and the kd program */

void kd_test_write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) fail_msg("cannot write %s: %s", path, strerror(errno));
    size_t w = fwrite(data, 1, n, f);
    int closed = fclose(f);
    if (w != n || closed != 0) fail_msg("short write to %s", path);
}

void kd_test_put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

uint8_t kd_test_stl10_pix(int tag, int64_t i, int c, int y, int x) {
    return (uint8_t)((i * 37 + c * 101 + y * 3 + x * 7 + tag * 11 + (x * y) % 5) & 255);
}

void kd_test_write_stl10_split(const char *dir, const char *split, int tag, int64_t n, int labels) {
    char path[2048];
    const int S = KD_TEST_STL;
    size_t rec = 3 * (size_t)S * S;
    uint8_t *b = malloc((size_t)n * rec);
    if (!b) fail_msg("out of memory writing %s/%s_X.bin", dir, split);
    for (int64_t i = 0; i < n; i++)
        for (int c = 0; c < 3; c++)
            for (int y = 0; y < S; y++)
                for (int x = 0; x < S; x++) /* column-major per channel */
                    b[(size_t)i * rec + (size_t)c * S * S + (size_t)x * S + y] = kd_test_stl10_pix(tag, i, c, y, x);
    snprintf(path, sizeof path, "%s/%s_X.bin", dir, split);
    kd_test_write_file(path, b, (size_t)n * rec);
    free(b);
    if (!labels) return;
    uint8_t *l = malloc((size_t)n);
    if (!l) fail_msg("out of memory writing %s/%s_y.bin", dir, split);
    for (int64_t i = 0; i < n; i++) l[i] = (uint8_t)(1 + (i * 3 + tag) % 10);
    snprintf(path, sizeof path, "%s/%s_y.bin", dir, split);
    kd_test_write_file(path, l, (size_t)n);
    free(l);
}

static void kd__test_write_cifar_file(const char *path, int n, uint64_t seed) {
    const size_t rec = 2 + 3072;
    unsigned char *b = malloc(rec * (size_t)n);
    if (!b) fail_msg("out of memory writing %s", path);
    kd_rng r;
    kd_rng_init(&r, seed, 0xc1fa);
    for (int i = 0; i < n; i++) {
        unsigned char *p = b + (size_t)i * rec;
        int fine = i % 100;
        p[0] = (unsigned char)(fine / 5);
        p[1] = (unsigned char)fine;
        /* A ramp whose direction and level depend on the class, over noise. */
        for (int c = 0; c < 3; c++)
            for (int y = 0; y < 32; y++)
                for (int x = 0; x < 32; x++) {
                    int ramp = ((fine % 4) < 2 ? y : x) * (1 + fine % 7) + 9 * c + (fine / 4) * 3;
                    p[2 + (size_t)c * 1024 + (size_t)y * 32 + (size_t)x] =
                        (unsigned char)((ramp + (int)kd_rng_below(&r, 60)) % 256);
                }
    }
    kd_test_write_file(path, b, rec * (size_t)n);
    free(b);
}

void kd_test_write_cifar100(const char *dir, int n_train, int n_test, uint64_t seed) {
    char path[1200];
    snprintf(path, sizeof path, "%s/train.bin", dir);
    kd__test_write_cifar_file(path, n_train, seed);
    snprintf(path, sizeof path, "%s/test.bin", dir);
    kd__test_write_cifar_file(path, n_test, seed + 1);
}

char *kd_test_slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, len = 0, got;
    char *buf = malloc(cap + 1);
    while (buf && (got = fread(buf + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap) {
            char *nb = realloc(buf, (cap *= 2) + 1);
            if (!nb) free(buf);
            buf = nb;
        }
    }
    fclose(f);
    if (!buf) return NULL;
    buf[len] = '\0';
    if (n) *n = len;
    return buf;
}

char *kd_test_capture_stderr(void (*fn)(void *arg), void *arg) {
    fflush(stderr);
    FILE *t = tmpfile();
    assert_non_null(t);
    int saved = dup(2);
    assert_true(saved >= 0);
    assert_true(dup2(fileno(t), 2) >= 0);
    fn(arg);
    fflush(stderr);
    assert_true(dup2(saved, 2) >= 0);
    close(saved);
    assert_int_equal(fseek(t, 0, SEEK_END), 0);
    long n = ftell(t);
    assert_true(n >= 0);
    char *out = malloc((size_t)n + 1);
    assert_non_null(out);
    rewind(t);
    size_t got = fread(out, 1, (size_t)n, t);
    out[got] = '\0';
    fclose(t);
    return out;
}

double kd_test_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

kd_test_child kd_test_spawn_kd(const char *scratch, const char *const *args) {
    static int id;
    kd_test_child c;
    memset(&c, 0, sizeof c);
    id++;
    snprintf(c.out_path, sizeof c.out_path, "%s/kd_run%d.out", scratch, id);
    snprintf(c.err_path, sizeof c.err_path, "%s/kd_run%d.err", scratch, id);
    const char *exe = KD_BINARY_DIR "/kd";
    int argc = 0;
    while (args[argc]) argc++;
    char **argv = calloc((size_t)argc + 2, sizeof *argv);
    if (!argv) fail_msg("out of memory");
    argv[0] = (char *)exe;
    for (int i = 0; i < argc; i++) argv[i + 1] = (char *)args[i];
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, c.out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, c.err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    c.t0 = kd_test_now();
    int rc = posix_spawn(&c.pid, exe, &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    free(argv);
    if (rc != 0) fail_msg("cannot start %s: %s", exe, strerror(rc));
    return c;
}

kd_test_proc kd_test_collect(const kd_test_child *child, int wstatus) {
    kd_test_proc p;
    memset(&p, 0, sizeof p);
    if (WIFEXITED(wstatus)) {
        p.status = WEXITSTATUS(wstatus);
    } else {
        p.status = -1;
        p.signal = WIFSIGNALED(wstatus) ? WTERMSIG(wstatus) : -1;
    }
    p.out = kd_test_slurp(child->out_path, NULL);
    p.err = kd_test_slurp(child->err_path, NULL);
    if (!p.out) p.out = strdup("");
    if (!p.err) p.err = strdup("");
    if (!p.out || !p.err) fail_msg("out of memory");
    p.secs = kd_test_now() - child->t0;
    return p;
}

kd_test_proc kd_test_run_kd(const char *scratch, const char *const *args) {
    kd_test_child c = kd_test_spawn_kd(scratch, args);
    int ws = 0;
    while (waitpid(c.pid, &ws, 0) < 0 && errno == EINTR) {
    }
    return kd_test_collect(&c, ws);
}

void kd_test_proc_free(kd_test_proc *p) {
    free(p->out);
    free(p->err);
    memset(p, 0, sizeof *p);
}

void kd_test_proc_dump(const kd_test_proc *p, const char *what) {
    fprintf(stderr, "---- %s%sexit %d signal %d (%.1fs)\n---- stdout:\n%s---- stderr:\n%s----\n", what ? what : "",
            what ? ": " : "", p->status, p->signal, p->secs, p->out, p->err);
}

void kd_test_expect_ok(const kd_test_proc *p, const char *what) {
    if (p->signal || p->status != 0) {
        kd_test_proc_dump(p, what);
        fail_msg("%s: expected exit 0, got status %d signal %d", what, p->status, p->signal);
    }
}

int kd_test_count_lines(const char *s, int skip_log, const char **first) {
    int n = 0;
    *first = NULL;
    for (const char *l = s; *l;) {
        const char *e = strchr(l, '\n');
        size_t len = e ? (size_t)(e - l) : strlen(l);
        if (len > 0 && !(skip_log && strncmp(l, "[kd ", 4) == 0)) {
            if (!*first) *first = l;
            n++;
        }
        l += len + (e ? 1 : 0);
    }
    return n;
}

int kd_test_contains_ci(const char *hay, size_t len, const char *needle) {
    size_t m = strlen(needle);
    for (size_t i = 0; i + m <= len; i++) {
        size_t j = 0;
        while (j < m && (hay[i + j] | 0x20) == (needle[j] | 0x20)) j++;
        if (j == m) return 1;
    }
    return 0;
}

void kd_test_expect_fail(const kd_test_proc *p, int want, int strict_one_line, const char *const *needles) {
    if (p->signal) {
        kd_test_proc_dump(p, NULL);
        fail_msg("kd died from signal %d", p->signal);
    }
    int status_ok = want >= 0 ? p->status == want : (p->status == 1 || p->status == 2);
    if (!status_ok) {
        kd_test_proc_dump(p, NULL);
        fail_msg("expected exit status %d, got %d", want, p->status);
    }
    const char *first;
    int all = kd_test_count_lines(p->err, 0, &first);
    int errs = kd_test_count_lines(p->err, 1, &first);
    if (errs != 1 || (strict_one_line && all != 1)) {
        kd_test_proc_dump(p, NULL);
        fail_msg("expected exactly one error line on stderr, got %d (%d lines in all)", errs, all);
    }
    size_t len = strcspn(first, "\n");
    if (strncmp(first, "kd", 2) != 0) {
        kd_test_proc_dump(p, NULL);
        fail_msg("the error line does not start with 'kd'");
    }
    for (int i = 0; needles[i]; i++)
        if (!kd_test_contains_ci(first, len, needles[i])) {
            kd_test_proc_dump(p, NULL);
            fail_msg("the error line does not name '%s'", needles[i]);
        }
}

/* ------------------------------------ the tiny IDX dataset and checkpoints */

static void kd__test_write_idx_split(const char *dir, const char *prefix, int n, int side, uint64_t seed) {
    size_t nimg = 16 + (size_t)n * (size_t)side * (size_t)side, nlab = 8 + (size_t)n;
    unsigned char *im = malloc(nimg), *lb = malloc(nlab);
    if (!im || !lb) fail_msg("out of memory writing %s", dir);
    kd_test_put_be32(im, 0x00000803);
    kd_test_put_be32(im + 4, (uint32_t)n);
    kd_test_put_be32(im + 8, (uint32_t)side);
    kd_test_put_be32(im + 12, (uint32_t)side);
    kd_test_put_be32(lb, 0x00000801);
    kd_test_put_be32(lb + 4, (uint32_t)n);
    kd_rng r;
    kd_rng_init(&r, seed, 0xda7a);
    for (int i = 0; i < n; i++) {
        int k = i % 4;
        lb[8 + i] = (unsigned char)k;
        unsigned char *p = im + 16 + (size_t)i * (size_t)side * (size_t)side;
        for (int y = 0; y < side; y++)
            for (int x = 0; x < side; x++) {
                int bright = (y * 8 / side) / 2 == k;
                p[y * side + x] = (unsigned char)(bright ? 190 + kd_rng_below(&r, 66) : kd_rng_below(&r, 70));
            }
    }
    char path[1200];
    snprintf(path, sizeof path, "%s/%s-images-idx3-ubyte", dir, prefix);
    kd_test_write_file(path, im, nimg);
    snprintf(path, sizeof path, "%s/%s-labels-idx1-ubyte", dir, prefix);
    kd_test_write_file(path, lb, nlab);
    free(im);
    free(lb);
}

void kd_test_write_idx(const char *dir, int n_train, int n_test, int side) {
    mkdir(dir, 0755);
    kd__test_write_idx_split(dir, "train", n_train, side, 1);
    kd__test_write_idx_split(dir, "t10k", n_test, side, 2);
}

kd_st_file *kd_test_st_open(const char *path) {
    kd_st_file *f = NULL;
    if (kd_st_open(path, &f) != KD_OK) fail_msg("kd_st_open(%s): %s", path, kd_last_error());
    return f;
}

const kd_st_entry *kd_test_st_entry(const kd_st_file *f, const char *fmt, ...) {
    char name[512];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    if (len < 0 || (size_t)len >= sizeof name) fail_msg("tensor name too long (%s)", fmt);
    const kd_st_entry *e = kd_st_find(f, name);
    if (!e) fail_msg("%s has no tensor %s", kd_st_path(f), name);
    return e;
}

int kd_test_st_count_prefixed(const kd_st_file *f, const char *prefix) {
    int n = 0;
    size_t len = strlen(prefix);
    for (int i = 0; i < kd_st_count(f); i++)
        if (strncmp(kd_st_get(f, i)->name, prefix, len) == 0) n++;
    return n;
}

int kd_test_ckpts_differ(const char *pa, const char *pb, int which, char *msg, size_t msgn) {
    kd_st_file *a = kd_test_st_open(pa), *b = NULL;
    if (kd_st_open(pb, &b) != KD_OK) {
        kd_st_close(a);
        fail_msg("kd_st_open(%s): %s", pb, kd_last_error());
    }
    msg[0] = '\0';
    int compared = 0, optim = 0;
    for (int i = 0; i < kd_st_count(a) && !msg[0]; i++) {
        const kd_st_entry *ea = kd_st_get(a, i);
        int is_opt = strncmp(ea->name, "optim.", 6) == 0;
        if (is_opt && which == KD_TEST_CKPT_MODEL) continue;
        const kd_st_entry *eb = kd_st_find(b, ea->name);
        if (!eb) {
            snprintf(msg, msgn, "%s lacks tensor %s", pb, ea->name);
            break;
        }
        int same_shape = ea->dtype == eb->dtype && ea->ndim == eb->ndim && ea->nbytes == eb->nbytes;
        for (int d = 0; same_shape && d < ea->ndim; d++) same_shape = ea->shape[d] == eb->shape[d];
        if (!same_shape) {
            snprintf(msg, msgn, "tensor %s differs in dtype/shape", ea->name);
            break;
        }
        if (memcmp(ea->data, eb->data, ea->nbytes) != 0) {
            double worst = 0;
            if (ea->dtype == KD_F32)
                for (size_t k = 0; k < ea->nbytes / 4; k++) {
                    double d = fabs((double)((const float *)ea->data)[k] - (double)((const float *)eb->data)[k]);
                    if (d > worst || d != d) worst = d;
                }
            snprintf(msg, msgn, "tensor %s differs (max abs diff %.3g) between %s and %s", ea->name, worst, pa, pb);
            break;
        }
        compared++;
        optim += is_opt;
    }
    /* The same set of tensors on both sides. */
    if (!msg[0]) {
        int nb = 0;
        for (int i = 0; i < kd_st_count(b); i++)
            if (which != KD_TEST_CKPT_MODEL || strncmp(kd_st_get(b, i)->name, "optim.", 6) != 0)
                nb++;
        if (nb != compared) snprintf(msg, msgn, "%s has %d tensors, %s has %d", pa, compared, pb, nb);
    }
    if (!msg[0] && which == KD_TEST_CKPT_WITH_OPTIM && optim == 0)
        snprintf(msg, msgn, "%s holds no optim. tensors", pa);
    kd_st_close(a);
    kd_st_close(b);
    return msg[0] != 0;
}

/* ------------------------------------------------ hostile input (test_hostile) */

#include <sys/resource.h>
#include <zlib.h>
#include <jpeglib.h>

kd_test_measured kd_test_measure(kd_status (*fn)(void *arg), void *arg) {
    kd_test_measured m;
    memset(&m, 0, sizeof m);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        long start = ru.ru_maxrss;
        kd_test_measured c;
        memset(&c, 0, sizeof c);
        c.status = fn(arg);
        snprintf(c.error, sizeof c.error, "%s", c.status == KD_OK ? "" : kd_last_error());
        getrusage(RUSAGE_SELF, &ru);
        c.peak_kib = ru.ru_maxrss;
        c.growth_kib = ru.ru_maxrss - start;
        ssize_t w = write(fds[1], &c, sizeof c);
        _exit(w == (ssize_t)sizeof c ? 0 : 3);
    }
    close(fds[1]);
    size_t got = 0;
    while (got < sizeof m) {
        ssize_t r = read(fds[0], (char *)&m + got, sizeof m - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fds[0]);
    int ws = 0;
    while (waitpid(pid, &ws, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0 || got != sizeof m)
        fail_msg("measured child %s (status 0x%x, %zu of %zu result bytes)",
                 WIFSIGNALED(ws) ? "was killed by a signal" : "failed", ws, got, sizeof m);
    return m;
}

void kd_test_write_gz(const char *path, const void *data, size_t n) {
    gzFile f = gzopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(gzwrite(f, data, (unsigned)n), (int)n);
    assert_int_equal(gzclose(f), Z_OK);
}

void kd_test_write_gz_bomb(const char *path, const void *data, size_t n, uint64_t zeros) {
    gzFile f = gzopen(path, "wb9");
    assert_non_null(f);
    if (n) assert_int_equal(gzwrite(f, data, (unsigned)n), (int)n);
    static const unsigned char z[1 << 16];
    while (zeros > 0) {
        unsigned k = zeros > sizeof z ? (unsigned)sizeof z : (unsigned)zeros;
        assert_int_equal(gzwrite(f, z, k), (int)k);
        zeros -= k;
    }
    assert_int_equal(gzclose(f), Z_OK);
}

void kd_test_write_sparse(const char *path, const void *data, size_t n, uint64_t size) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    if (n) assert_int_equal(write(fd, data, n), (ssize_t)n);
    assert_int_equal(ftruncate(fd, (off_t)size), 0);
    close(fd);
}

/* One PNG chunk: length, type, data, CRC over type and data. */
static size_t kd__png_chunk(unsigned char *o, const char *type, const unsigned char *d, uint32_t n) {
    kd_test_put_be32(o, n);
    memcpy(o + 4, type, 4);
    if (n) memcpy(o + 8, d, n);
    kd_test_put_be32(o + 8 + n, (uint32_t)crc32(0, o + 4, 4 + n));
    return 12 + n;
}

void kd_test_write_png_claiming(const char *path, uint32_t w, uint32_t h) {
    unsigned char b[256];
    size_t n = 0;
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    memcpy(b, sig, 8);
    n = 8;
    unsigned char ihdr[13];
    kd_test_put_be32(ihdr, w);
    kd_test_put_be32(ihdr + 4, h);
    ihdr[8] = 8; /* bit depth */
    ihdr[9] = 2; /* RGB */
    ihdr[10] = ihdr[11] = ihdr[12] = 0;
    n += kd__png_chunk(b + n, "IHDR", ihdr, 13);
    /* A zlib stream of a few zero bytes: far less than w * h pixels. */
    unsigned char raw[64] = {0}, z[128];
    uLongf zn = sizeof z;
    assert_int_equal(compress(z, &zn, raw, sizeof raw), Z_OK);
    n += kd__png_chunk(b + n, "IDAT", z, (uint32_t)zn);
    n += kd__png_chunk(b + n, "IEND", NULL, 0);
    kd_test_write_file(path, b, n);
}

/* A baseline (or progressive) RGB JPEG of the w x h pixels px (w * h * 3
 * bytes, row-major), in memory from malloc: *mem, *mn bytes. */
static void kd__jpeg_encode_scans(const unsigned char *px, int w, int h, int progressive, const jpeg_scan_info *scans,
                                  int n_scans, unsigned char **mem, unsigned long *mn) {
    struct jpeg_compress_struct ci;
    struct jpeg_error_mgr jerr;
    ci.err = jpeg_std_error(&jerr);
    jpeg_create_compress(&ci);
    *mem = NULL;
    *mn = 0;
    jpeg_mem_dest(&ci, mem, mn);
    ci.image_width = (JDIMENSION)w;
    ci.image_height = (JDIMENSION)h;
    ci.input_components = 3;
    ci.in_color_space = JCS_RGB;
    jpeg_set_defaults(&ci);
    if (progressive) jpeg_simple_progression(&ci);
    if (scans) {
        ci.scan_info = scans;
        ci.num_scans = n_scans;
    }
    jpeg_start_compress(&ci, TRUE);
    while (ci.next_scanline < (JDIMENSION)h) {
        JSAMPROW rp = (JSAMPROW)(px + (size_t)ci.next_scanline * (size_t)w * 3);
        jpeg_write_scanlines(&ci, &rp, 1);
    }
    jpeg_finish_compress(&ci);
    jpeg_destroy_compress(&ci);
}

static void kd__jpeg_encode(const unsigned char *px, int w, int h, int progressive, unsigned char **mem,
                            unsigned long *mn) {
    kd__jpeg_encode_scans(px, w, h, progressive, NULL, 0, mem, mn);
}

int kd_test_write_jpeg_scan_bomb(const char *path) {
    /* One interleaved DC scan, then for every component and AC coefficient
     * k a first scan at Al 2 and two refinements (Ah 2 -> Al 1 -> Al 0):
     * 1 + 3 * 63 * 3 = 568 valid scans of one 8x8 image. */
    static jpeg_scan_info scans[1 + 3 * 63 * 3];
    int n = 0;
    scans[n++] = (jpeg_scan_info){.comps_in_scan = 3, .component_index = {0, 1, 2}, .Ss = 0, .Se = 0, .Ah = 0, .Al = 0};
    for (int c = 0; c < 3; c++)
        for (int k = 1; k <= 63; k++) {
            const int ah[3] = {0, 2, 1}, al[3] = {2, 1, 0};
            for (int p = 0; p < 3; p++)
                scans[n++] = (jpeg_scan_info){.comps_in_scan = 1, .component_index = {c}, .Ss = k, .Se = k,
                                              .Ah = ah[p], .Al = al[p]};
        }
    unsigned char px[8 * 8 * 3], *mem;
    unsigned long mn;
    for (int i = 0; i < 8 * 8 * 3; i++) px[i] = (unsigned char)(i * 37);
    kd__jpeg_encode_scans(px, 8, 8, 0, scans, n, &mem, &mn);
    kd_test_write_file(path, mem, mn);
    free(mem);
    return n;
}

void kd_test_write_jpeg_claiming(const char *path, uint32_t w, uint32_t h, int progressive) {
    unsigned char px[8 * 8 * 3], *mem;
    unsigned long mn;
    for (int i = 0; i < 8 * 8 * 3; i++) px[i] = (unsigned char)(i % 24 * 10);
    kd__jpeg_encode(px, 8, 8, progressive, &mem, &mn);
    /* SOF0 or SOF2: FF C0/C2, length (2), precision (1), height (2), width (2). */
    int patched = 0;
    for (unsigned long i = 0; i + 9 < mn && !patched; i++) {
        if (mem[i] == 0xFF && (mem[i + 1] == 0xC0 || mem[i + 1] == 0xC2)) {
            mem[i + 5] = (unsigned char)(h >> 8);
            mem[i + 6] = (unsigned char)h;
            mem[i + 7] = (unsigned char)(w >> 8);
            mem[i + 8] = (unsigned char)w;
            patched = 1;
        }
    }
    assert_true(patched);
    kd_test_write_file(path, mem, mn);
    free(mem);
}

void kd_test_write_jpeg(const char *path, int w, int h, uint64_t seed) {
    unsigned char *px = malloc((size_t)w * (size_t)h * 3), *mem;
    unsigned long mn;
    assert_non_null(px);
    kd_rng r;
    kd_rng_init(&r, seed, 0x6a7067);
    for (size_t i = 0; i < (size_t)w * (size_t)h * 3; i++) px[i] = (unsigned char)kd_rng_below(&r, 256);
    kd__jpeg_encode(px, w, h, 0, &mem, &mn);
    kd_test_write_file(path, mem, mn);
    free(mem);
    free(px);
}

/* ------------------------------------------------ torchvision state_dict fixtures */

void kd_test_gen_weight(float *w, int64_t n, uint64_t k, int64_t fan_in) {
    const uint64_t golden = 0x9E3779B97F4A7C15ull;
    float bound = (float)sqrt(3.0 / (double)fan_in);
    for (int64_t i = 0; i < n; i++) {
        uint64_t z = (k + 1) * golden + (uint64_t)i;
        z += golden;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)((double)(z >> 40) * 0x1p-23 - 1.0);
        w[i] = u * bound;
    }
}

double kd_test_compare_scaled(const char *what, const kd_tensor *t, const kd_st_entry *e, double tol) {
    if (t->ndim != e->ndim) fail_msg("%s: rank %d, want %d", what, t->ndim, e->ndim);
    for (int i = 0; i < e->ndim; i++)
        if (t->shape[i] != e->shape[i])
            fail_msg("%s: dim %d is %lld, want %lld", what, i, (long long)t->shape[i], (long long)e->shape[i]);
    const float *got = kd_f32(t), *want = e->data;
    int64_t n = kd_tensor_numel(t);
    double scale = 1, mx = 0;
    for (int64_t i = 0; i < n; i++) scale = fmax(scale, fabs((double)want[i]));
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= tol * scale))
            fail_msg("%s: element %lld got %.8g want %.8g (|diff| %.3g > %.3g)", what, (long long)i, got[i],
                     want[i], d, tol * scale);
        if (d > mx) mx = d;
    }
    return mx;
}

kd_json *kd_test_st_meta_json(kd_st_file *fx, const char *key) {
    const char *js = kd_st_meta(fx, key);
    if (!js) fail_msg("fixture has no metadata for %s", key);
    kd_json *j = NULL;
    KD_ASSERT_OK(kd_json_parse(js, strlen(js), key, &j));
    return j;
}

const kd_json *kd_test_json_array(const kd_json *j, const char *key) {
    const kd_json *v = kd_json_get(j, key);
    if (!v || v->type != KD_JSON_ARRAY) fail_msg("metadata lacks array %s", key);
    return v;
}

/* torchvision's relative_position_index of a ws x ws window (flattened
 * (ws^2, ws^2)): coords of tokens i, j row-major; (dy + ws - 1) * (2ws - 1) +
 * (dx + ws - 1) with dy = y_i - y_j, dx = x_i - x_j. */
static void kd__test_rel_index(int64_t *p, int64_t n) {
    int64_t N = (int64_t)llround(sqrt((double)n)), ws = (int64_t)llround(sqrt((double)N));
    if (N * N != n || ws * ws != N) fail_msg("relative_position_index of %lld elements is not (ws^2)^2", (long long)n);
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++)
            p[i * N + j] = (i / ws - j / ws + ws - 1) * (2 * ws - 1) + (i % ws - j % ws + ws - 1);
}

void kd_test_write_state_dict(kd_st_file *fx, const char *sd_prefix, const kd_json *meta, const char *path) {
    const kd_json *names = kd_test_json_array(meta, "names"), *shapes = kd_test_json_array(meta, "shapes");
    const kd_json *dtypes = kd_test_json_array(meta, "dtypes"), *gen = kd_test_json_array(meta, "generated");
    kd_st_writer *w = NULL;
    KD_ASSERT_OK(kd_st_writer_init(&w));
    void **bufs = calloc((size_t)names->count, sizeof *bufs);
    assert_non_null(bufs);
    for (int64_t k = 0; k < names->count; k++) {
        const char *name = names->items[k].string;
        const kd_json *sh = &shapes->items[k];
        int64_t shape[KD_MAX_DIMS], n = 1;
        for (int64_t d = 0; d < sh->count; d++) n *= (shape[d] = (int64_t)sh->items[d].number);
        kd_dtype dt = strcmp(dtypes->items[k].string, "I64") == 0 ? KD_I64 : KD_F32;
        int how = (int)gen->items[k].number;
        if (how == 1) {
            bufs[k] = malloc((size_t)n * sizeof(float));
            assert_non_null(bufs[k]);
            kd_test_gen_weight(bufs[k], n, (uint64_t)k, n / shape[0]);
            KD_ASSERT_OK(kd_st_writer_add(w, name, dt, (int)sh->count, shape, bufs[k]));
        } else if (how == 2) {
            bufs[k] = malloc((size_t)n * sizeof(int64_t));
            assert_non_null(bufs[k]);
            kd__test_rel_index(bufs[k], n);
            KD_ASSERT_OK(kd_st_writer_add(w, name, KD_I64, (int)sh->count, shape, bufs[k]));
        } else {
            const kd_st_entry *e = kd_test_st_entry(fx, "%s.sd.%s", sd_prefix, name);
            KD_ASSERT_OK(kd_st_writer_add(w, name, e->dtype, e->ndim, e->shape, e->data));
        }
    }
    KD_ASSERT_OK(kd_st_writer_save(w, path));
    kd_st_writer_free(w);
    for (int64_t k = 0; k < names->count; k++) free(bufs[k]);
    free(bufs);
}

void kd_test_check_state_dict_names(const char *arch, kd_model *m, const kd_json *meta) {
    const kd_json *names = kd_test_json_array(meta, "names"), *shapes = kd_test_json_array(meta, "shapes");
    const kd_json *dtypes = kd_test_json_array(meta, "dtypes");
    kd_param_list *pl = kd_model_params(m);
    if (pl->n != names->count) fail_msg("%s: %d tensors, torchvision has %lld", arch, pl->n, (long long)names->count);
    for (int i = 0; i < pl->n; i++) {
        const kd_param *p = &pl->items[i];
        if (strcmp(p->name, names->items[i].string) != 0)
            fail_msg("%s: tensor %d is %s, torchvision's is %s", arch, i, p->name, names->items[i].string);
        const kd_json *sh = &shapes->items[i];
        int ok = p->t->ndim == sh->count;
        for (int d = 0; ok && d < p->t->ndim; d++) ok = p->t->shape[d] == (int64_t)sh->items[d].number;
        if (!ok) fail_msg("%s: %s has another shape than torchvision's", arch, p->name);
        kd_dtype dt = strcmp(dtypes->items[i].string, "I64") == 0 ? KD_I64 : KD_F32;
        if (p->t->dtype != dt) fail_msg("%s: %s has dtype %s", arch, p->name, kd_dtype_name(p->t->dtype));
    }
}

void kd_test_check_param_grads(const char *who, const kd_param_list *pl) {
    for (int i = 0; i < pl->n; i++) {
        const kd_param *p = &pl->items[i];
        if (p->kind == KD_PARAM_BUFFER) continue;
        if (!p->t->grad) fail_msg("%s: %s has no gradient", who, p->name);
        const float *d = kd_f32(p->t->grad);
        int nz = 0;
        for (int64_t j = 0; j < kd_tensor_numel(p->t); j++) {
            if (!isfinite(d[j])) fail_msg("%s: %s has a non-finite gradient", who, p->name);
            nz |= d[j] != 0.0f;
        }
        if (!nz) fail_msg("%s: the gradient of %s is all zero", who, p->name);
    }
}
