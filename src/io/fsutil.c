/*
 * File-system helpers: crash-safe replacement of a file (temp file, fsync,
 * rename, fsync of the directory), whole-file reads, mkdir -p, existence.
 *
 * kd_file_write_atomic_parts is what checkpoints and summaries go through: a
 * crash or a failed write at any point leaves either the old file or the new
 * one under `path`, never a mixture, and never a stray temporary file after an
 * error this process could see (a killed process leaves "<path>.tmp.<pid>",
 * which the training loop removes when it next starts in that directory). A
 * failed fsync of the directory after the rename is an error (KD_ERR_IO).
 */
#include "kd/io.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif
#ifndef O_DIRECTORY
#define O_DIRECTORY 0
#endif

/* Writes all n bytes, retrying on EINTR and short writes. Returns 0 or errno. */
static int kd__write_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n > 0) {
        size_t chunk = n > (size_t)1 << 30 ? (size_t)1 << 30 : n;
        ssize_t w = write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (w == 0) return EIO;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Opens and fsyncs the directory holding `path` so that a rename into it is
 * durable. Returns 0 or errno. */
static int kd__fsync_parent(const char *path) {
    char *dir = strdup(path);
    if (!dir) return ENOMEM;
    char *slash = strrchr(dir, '/');
    if (!slash) {
        strcpy(dir, ".");
    } else if (slash == dir) {
        dir[1] = '\0';
    } else {
        *slash = '\0';
    }
    int err = 0;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        err = errno;
    } else {
        /* Some file systems cannot fsync directories; that is not a failure. */
        if (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP) err = errno;
        close(fd);
    }
    free(dir);
    return err;
}

kd_status kd_file_write_atomic_parts(const char *path, const kd_file_part *parts, int nparts) {
    kd_status st = KD_OK;
    char *tmp = NULL;
    int fd = -1, err;
    const char *step;

    if (!path || !*path || nparts < 0 || (nparts > 0 && !parts))
        return kd_error(KD_ERR_INVALID, "kd_file_write_atomic: invalid arguments for '%s'",
                        path ? path : "(null)");
    size_t tlen = strlen(path) + 32;
    tmp = malloc(tlen);
    if (!tmp) return kd_error(KD_ERR_NOMEM, "%s: out of memory", path);
    snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());

    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) {
        st = kd_error(KD_ERR_IO, "%s: cannot create temporary file %s: %s", path, tmp,
                      strerror(errno));
        goto done; /* nothing was created, so nothing to remove */
    }
    for (int i = 0; i < nparts; i++) {
        if (parts[i].n == 0) continue;
        if (!parts[i].data) {
            st = kd_error(KD_ERR_INVALID, "%s: part %d has %zu bytes but no data", path, i,
                          parts[i].n);
            goto fail;
        }
        err = kd__write_all(fd, parts[i].data, parts[i].n);
        if (err) {
            step = "write to";
            goto fail_errno;
        }
    }
    if (fsync(fd) != 0) {
        err = errno;
        step = "fsync of";
        goto fail_errno;
    }
    err = close(fd) != 0 ? errno : 0;
    fd = -1;
    if (err) {
        step = "close of";
        goto fail_errno;
    }
    if (rename(tmp, path) != 0) {
        err = errno;
        step = "rename of";
        goto fail_errno;
    }
    /* The new file is in place, but until its directory is synced the rename
     * may not survive a power loss (or a crash of the machine): a caller that
     * goes on (deletes what the file replaces, reports a checkpoint as saved)
     * must learn of it, so a failed directory fsync is an error. */
    err = kd__fsync_parent(path);
    if (err)
        st = kd_error(KD_ERR_IO,
                      "%s: written, but fsync of its directory failed: %s; the file may not survive a "
                      "crash of the machine",
                      path, strerror(err));
    goto done;

fail_errno:
    st = kd_error(KD_ERR_IO, "%s: %s %s failed: %s; the previous file, if any, is unchanged",
                  path, step, tmp, strerror(err));
fail:
    if (fd >= 0) close(fd);
    unlink(tmp);
done:
    free(tmp);
    return st;
}

kd_status kd_file_write_atomic(const char *path, const void *data, size_t n) {
    kd_file_part part = {data, n};
    return kd_file_write_atomic_parts(path, &part, 1);
}

kd_status kd_file_read_all(const char *path, void **data, size_t *n) {
    kd_status st = KD_OK;
    char *buf = NULL;
    size_t len = 0, cap;
    struct stat sb;
    int fd;

    *data = NULL;
    if (n) *n = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kd_error(KD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (fstat(fd, &sb) != 0) {
        st = kd_error(KD_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (S_ISDIR(sb.st_mode)) {
        st = kd_error(KD_ERR_IO, "%s: is a directory, not a file", path);
        goto fail;
    }
    /* The size is only a hint: pipes and /proc files report 0. */
    cap = (S_ISREG(sb.st_mode) && sb.st_size > 0 ? (size_t)sb.st_size : 4096) + 1;
    buf = malloc(cap);
    if (!buf) goto nomem;
    for (;;) {
        if (len + 1 >= cap) {
            if (cap > SIZE_MAX / 2) goto nomem;
            char *nb = realloc(buf, cap * 2);
            if (!nb) goto nomem;
            buf = nb;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + len, cap - 1 - len);
        if (r < 0) {
            if (errno == EINTR) continue;
            st = kd_error(KD_ERR_IO, "%s: read failed: %s", path, strerror(errno));
            goto fail;
        }
        if (r == 0) break;
        len += (size_t)r;
    }
    buf[len] = '\0';
    close(fd);
    *data = buf;
    if (n) *n = len;
    return KD_OK;

nomem:
    st = kd_error(KD_ERR_NOMEM, "%s: out of memory reading the file", path);
fail:
    free(buf);
    close(fd);
    return st;
}

/* Creates one directory; an existing directory is fine. Returns 0 or errno. */
static int kd__mkdir_one(const char *dir) {
    struct stat sb;
    if (mkdir(dir, 0777) == 0) return 0;
    int err = errno;
    if (stat(dir, &sb) == 0) return S_ISDIR(sb.st_mode) ? 0 : ENOTDIR;
    return err;
}

kd_status kd_mkdirs(const char *path) {
    if (!path || !*path) return kd_error(KD_ERR_INVALID, "kd_mkdirs: empty path");
    char *p = strdup(path);
    if (!p) return kd_error(KD_ERR_NOMEM, "%s: out of memory", path);
    kd_status st = KD_OK;
    /* Create each prefix that ends before a '/', then the whole path. */
    for (char *s = p + 1; *s; s++) {
        if (*s != '/' || s[-1] == '/') continue;
        *s = '\0';
        int err = kd__mkdir_one(p);
        *s = '/';
        if (err) {
            st = kd_error(KD_ERR_IO, "cannot create directory %.*s (for %s): %s", (int)(s - p), p,
                          path, strerror(err));
            goto done;
        }
    }
    int err = kd__mkdir_one(p);
    if (err) st = kd_error(KD_ERR_IO, "cannot create directory %s: %s", path, strerror(err));
done:
    free(p);
    return st;
}

int kd_file_exists(const char *path) {
    struct stat sb;
    return path && stat(path, &sb) == 0;
}
