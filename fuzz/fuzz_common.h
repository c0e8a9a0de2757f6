/* Shared by the libFuzzer targets: a per-process scratch directory under
 * /dev/shm where it is writable (a memory file system: no journal or disk
 * traffic per input), else /tmp (created on first use, emptied before each
 * input, removed at exit) and
 * helpers that write the input (or parts of it) there for the parsers that
 * take paths. kd's own logging is silenced. */
#ifndef KD_FUZZ_COMMON_H
#define KD_FUZZ_COMMON_H

#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd/core.h"

static char kd_fuzz_root[64];

static int kd__fuzz_rm(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    if (ftw->level > 0) remove(p);
    return 0;
}

/* Empties the scratch directory (keeps it). */
static void kd_fuzz_clear(void) {
    if (kd_fuzz_root[0]) nftw(kd_fuzz_root, kd__fuzz_rm, 16, FTW_DEPTH | FTW_PHYS);
}

static void kd__fuzz_cleanup(void) {
    kd_fuzz_clear();
    if (kd_fuzz_root[0]) rmdir(kd_fuzz_root);
}

/* The scratch directory, emptied. */
static const char *kd_fuzz_dir(void) {
    if (!kd_fuzz_root[0]) {
        const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        snprintf(kd_fuzz_root, sizeof kd_fuzz_root, "%s/kdfuzz.%d.XXXXXX", base, (int)getpid());
        if (!mkdtemp(kd_fuzz_root)) abort();
        atexit(kd__fuzz_cleanup);
        kd_log_set_level(KD_LOG_QUIET);
    }
    kd_fuzz_clear();
    return kd_fuzz_root;
}

/* Writes n bytes to DIR/rel (parent directories created); path receives the
 * full path. */
__attribute__((unused)) static void kd_fuzz_write(const char *rel, const void *data, size_t n, char *path, size_t pn) {
    snprintf(path, pn, "%s/%s", kd_fuzz_root, rel);
    for (char *s = path + strlen(kd_fuzz_root) + 1; (s = strchr(s, '/')) != NULL; s++) {
        *s = '\0';
        mkdir(path, 0755);
        *s = '/';
    }
    FILE *f = fopen(path, "wb");
    if (!f) return;
    if (n) fwrite(data, 1, n, f);
    fclose(f);
}

#endif
