/* Datasets of image files: torchvision-style ImageFolder (one folder per
 * class), unlabeled folders (every image below a directory) and file lists
 * ("PATH LABEL" lines). Only paths and labels are kept; the loader decodes
 * the images (image.c) when it needs them. */
#include "data_internal.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#define KD__WALK_MAX_DEPTH 64

int kd__is_image_name(const char *name) {
    if (name[0] == '.') return 0;
    const char *dot = strrchr(name, '.');
    if (!dot) return 0;
    return strcasecmp(dot, ".jpg") == 0 || strcasecmp(dot, ".jpeg") == 0 ||
           strcasecmp(dot, ".png") == 0;
}

/* ------------------------------------------------------------ path lists */

/* A growing list of paths with labels: path i is pool + off[i]; dlen[i] is
 * the length of its directory part (for torchvision's (dir, name) order). */
typedef struct {
    char *pool;
    size_t pool_len, pool_cap;
    int64_t *off;
    int32_t *dlen;
    int32_t *label;
    int64_t n, cap;
} kd__paths;

static void kd__paths_free(kd__paths *p) {
    free(p->pool);
    free(p->off);
    free(p->dlen);
    free(p->label);
    memset(p, 0, sizeof *p);
}

static kd_status kd__paths_add(kd__paths *p, const char *dir, const char *name, int32_t label) {
    size_t dl = strlen(dir), nl = strlen(name), need = dl + 1 + nl + 1;
    if (p->pool_len + need > p->pool_cap) {
        size_t cap = p->pool_cap ? p->pool_cap * 2 : 1 << 16;
        while (cap < p->pool_len + need) cap *= 2;
        char *q = realloc(p->pool, cap);
        if (!q) return kd_error(KD_ERR_NOMEM, "%s: out of memory listing images", dir);
        p->pool = q;
        p->pool_cap = cap;
    }
    if (p->n == p->cap) {
        int64_t cap = p->cap ? p->cap * 2 : 1024;
        int64_t *o = realloc(p->off, (size_t)cap * sizeof *o);
        if (o) p->off = o;
        int32_t *d = realloc(p->dlen, (size_t)cap * sizeof *d);
        if (d) p->dlen = d;
        int32_t *l = realloc(p->label, (size_t)cap * sizeof *l);
        if (l) p->label = l;
        if (!o || !d || !l) return kd_error(KD_ERR_NOMEM, "%s: out of memory listing images", dir);
        p->cap = cap;
    }
    char *s = p->pool + p->pool_len;
    memcpy(s, dir, dl);
    s[dl] = '/';
    memcpy(s + dl + 1, name, nl + 1);
    p->off[p->n] = (int64_t)p->pool_len;
    p->dlen[p->n] = (int32_t)dl;
    p->label[p->n] = label;
    p->n++;
    p->pool_len += need;
    return KD_OK;
}

typedef struct {
    const char *path;
    int32_t dlen;
    int32_t label;
} kd__entry;

/* torchvision's order: sorted(os.walk(...)) by directory path, then
 * sorted file names, both by code point (byte order for UTF-8). */
static int kd__entry_cmp(const void *a, const void *b) {
    const kd__entry *x = a, *y = b;
    size_t n = (size_t)(x->dlen < y->dlen ? x->dlen : y->dlen);
    int c = memcmp(x->path, y->path, n);
    if (c) return c;
    if (x->dlen != y->dlen) return x->dlen < y->dlen ? -1 : 1;
    return strcmp(x->path + x->dlen + 1, y->path + y->dlen + 1);
}

/* Appends every image file below dir (following links, skipping hidden
 * entries). A name that cannot be stat'ed (a dangling link) is kept: reading
 * it later reports the problem. */
static kd_status kd__walk(const char *dir, int32_t label, int depth, kd__paths *p) {
    if (depth > KD__WALK_MAX_DEPTH)
        return kd_error(KD_ERR_FORMAT, "%s: directories nested more than %d deep (a link loop?)",
                        dir, KD__WALK_MAX_DEPTH);
    DIR *d = opendir(dir);
    if (!d) return kd_error(KD_ERR_IO, "%s: cannot list directory: %s", dir, strerror(errno));
    kd_status st = KD_OK;
    struct dirent *e;
    while (st == KD_OK && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char sub[4096];
        if (snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name) >= (int)sizeof sub) {
            st = kd_error(KD_ERR_INVALID, "%s/%s: path too long", dir, e->d_name);
            break;
        }
        struct stat sb;
        if (stat(sub, &sb) == 0 && S_ISDIR(sb.st_mode)) st = kd__walk(sub, label, depth + 1, p);
        else if (kd__is_image_name(e->d_name)) st = kd__paths_add(p, dir, e->d_name, label);
    }
    closedir(d);
    return st;
}

/* Sorts p[from, n) in torchvision's order. */
static kd_status kd__paths_sort(kd__paths *p, int64_t from) {
    int64_t m = p->n - from;
    if (m < 2) return KD_OK;
    kd__entry *e = malloc((size_t)m * sizeof *e);
    int64_t *off = malloc((size_t)m * sizeof *off);
    if (!e || !off) {
        free(e);
        free(off);
        return kd_error(KD_ERR_NOMEM, "out of memory sorting %lld paths", (long long)m);
    }
    for (int64_t i = 0; i < m; i++)
        e[i] = (kd__entry){p->pool + p->off[from + i], p->dlen[from + i], p->label[from + i]};
    qsort(e, (size_t)m, sizeof *e, kd__entry_cmp);
    for (int64_t i = 0; i < m; i++) {
        off[i] = (int64_t)(e[i].path - p->pool);
        p->dlen[from + i] = e[i].dlen;
        p->label[from + i] = e[i].label;
    }
    memcpy(p->off + from, off, (size_t)m * sizeof *off);
    free(e);
    free(off);
    return KD_OK;
}

/* Moves the paths into a new lazy dataset of RGB images. */
static kd_status kd__paths_to_dataset(kd__paths *p, const char *name, const char *root,
                                      int num_classes, kd_dataset **out) {
    kd_dataset *ds = NULL;
    KD_TRY(kd__dataset_alloc_lazy(name, p->n, 3, 0, 0, KD__SRC_FILES, &ds));
    memcpy(ds->labels, p->label, (size_t)p->n * sizeof *ds->labels);
    ds->pool = p->pool;
    ds->offs = p->off;
    p->pool = NULL;
    p->off = NULL;
    ds->num_classes = num_classes;
    snprintf(ds->path, sizeof ds->path, "%s", root);
    *out = ds;
    return KD_OK;
}

/* The dataset name of a folder: its base name, or its parent's when it is a
 * split folder (imagenette/train -> "imagenette"). */
static void kd__folder_name(const char *dir, char *name, size_t n) {
    char base[256];
    kd__path_basename(dir, base, sizeof base);
    if (strcmp(base, "train") && strcmp(base, "val") && strcmp(base, "test") &&
        strcmp(base, "unlabeled")) {
        snprintf(name, n, "%s", base);
        return;
    }
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", dir);
    size_t l = strlen(parent);
    while (l > 1 && parent[l - 1] == '/') parent[--l] = '\0';
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = '\0';
        kd__path_basename(parent, name, n);
    } else {
        snprintf(name, n, "%s", base);
    }
}

static int kd__strcmp_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* ------------------------------------------------------------ the readers */

kd_status kd_dataset_open_folder(const char *dir, kd_dataset **out) {
    if (!dir || !out) return kd_error(KD_ERR_INVALID, "kd_dataset_open_folder: NULL argument");
    *out = NULL;
    if (!kd__is_dir(dir)) return kd_error(KD_ERR_NOT_FOUND, "%s: no such directory", dir);
    DIR *d = opendir(dir);
    if (!d) return kd_error(KD_ERR_IO, "%s: cannot list directory: %s", dir, strerror(errno));
    kd_status st = KD_OK;
    char **classes = NULL;
    int nc = 0, cap = 0;
    kd__paths p = {0};
    kd_dataset *ds = NULL;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name);
        if (!kd__is_dir(sub)) continue;
        if (nc == cap) {
            cap = cap ? cap * 2 : 64;
            char **q = realloc(classes, (size_t)cap * sizeof *q);
            if (!q) {
                st = kd_error(KD_ERR_NOMEM, "%s: out of memory listing classes", dir);
                break;
            }
            classes = q;
        }
        if (!(classes[nc] = strdup(e->d_name))) {
            st = kd_error(KD_ERR_NOMEM, "%s: out of memory listing classes", dir);
            break;
        }
        nc++;
    }
    closedir(d);
    if (st != KD_OK) goto cleanup;
    if (nc == 0) {
        st = kd_error(KD_ERR_FORMAT, "%s: no class folders (expected DIR/<class>/*.jpg|png)", dir);
        goto cleanup;
    }
    qsort(classes, (size_t)nc, sizeof *classes, kd__strcmp_ptr);
    for (int k = 0; k < nc; k++) {
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%s", dir, classes[k]);
        int64_t before = p.n;
        st = kd__walk(sub, k, 0, &p);
        if (st != KD_OK) goto cleanup;
        if (p.n == before) {
            st = kd_error(KD_ERR_FORMAT,
                          "%s: class folder '%s' holds no .jpg, .jpeg or .png image (every class "
                          "needs at least one)",
                          sub, classes[k]);
            goto cleanup;
        }
        st = kd__paths_sort(&p, before);
        if (st != KD_OK) goto cleanup;
    }
    char name[256];
    kd__folder_name(dir, name, sizeof name);
    st = kd__paths_to_dataset(&p, name, dir, nc, &ds);
    if (st != KD_OK) goto cleanup;
    st = kd__dataset_set_classes(ds, (const char *const *)classes, nc);
    if (st != KD_OK) goto cleanup;
    *out = ds;
    ds = NULL;
cleanup:
    kd_dataset_free(ds);
    kd__paths_free(&p);
    for (int k = 0; k < nc; k++) free(classes[k]);
    free(classes);
    return st;
}

kd_status kd_dataset_open_unlabeled(const char *dir, kd_dataset **out) {
    if (!dir || !out) return kd_error(KD_ERR_INVALID, "kd_dataset_open_unlabeled: NULL argument");
    *out = NULL;
    if (!kd__is_dir(dir)) return kd_error(KD_ERR_NOT_FOUND, "%s: no such directory", dir);
    kd__paths p = {0};
    kd_status st = kd__walk(dir, -1, 0, &p);
    if (st == KD_OK && p.n == 0)
        st = kd_error(KD_ERR_FORMAT, "%s: no .jpg, .jpeg or .png image in it or below it", dir);
    if (st == KD_OK) st = kd__paths_sort(&p, 0);
    char name[256];
    kd__folder_name(dir, name, sizeof name);
    if (st == KD_OK) st = kd__paths_to_dataset(&p, name, dir, 0, out);
    if (st == KD_OK) (*out)->split = KD_SPLIT_UNLABELED;
    kd__paths_free(&p);
    return st;
}

kd_status kd_dataset_open_list(const char *list_file, kd_dataset **out) {
    if (!list_file || !out) return kd_error(KD_ERR_INVALID, "kd_dataset_open_list: NULL argument");
    *out = NULL;
    uint8_t *buf = NULL;
    size_t len = 0;
    KD_TRY(kd__read_whole_file(list_file, 0, NULL, NULL, &buf, &len));
    char base[4096];
    snprintf(base, sizeof base, "%s", list_file);
    char *slash = strrchr(base, '/');
    if (slash) *slash = '\0';
    else snprintf(base, sizeof base, ".");

    kd_status st = KD_OK;
    kd__paths p = {0};
    int with = 0, without = 0, maxl = -1;
    int64_t line = 0;
    char *text = (char *)buf;
    for (size_t pos = 0; pos < len && st == KD_OK;) {
        size_t end = pos;
        while (end < len && text[end] != '\n') end++;
        line++;
        char *s = text + pos, *e = text + end;
        pos = end + 1;
        while (s < e && isspace((unsigned char)*s)) s++;
        while (e > s && isspace((unsigned char)e[-1])) e--;
        if (s == e || *s == '#') continue;
        if (memchr(s, '\0', (size_t)(e - s))) {
            st = kd_error(KD_ERR_FORMAT, "%s:%lld: NUL byte in the line (not a text file?)",
                          list_file, (long long)line);
            break;
        }
        /* The label is the last field when it is an integer. */
        char *t = e;
        while (t > s && !isspace((unsigned char)t[-1])) t--;
        int label = -1;
        if (t > s) {
            int digits = 1;
            for (char *q = t; q < e; q++) digits &= isdigit((unsigned char)*q) != 0;
            if (t[0] == '-' && e - t > 1) {
                st = kd_error(KD_ERR_FORMAT, "%s:%lld: negative label %.*s", list_file,
                              (long long)line, (int)(e - t), t);
                break;
            }
            if (digits) {
                /* Labels are class indices: at most KD_DATASET_MAX_CLASSES - 1
                 * (checked digit by digit, so no length overflows). */
                int64_t v = 0;
                for (char *q = t; q < e && v < KD_DATASET_MAX_CLASSES; q++) v = v * 10 + (*q - '0');
                if (v >= KD_DATASET_MAX_CLASSES) {
                    st = kd_error(KD_ERR_FORMAT,
                                  "%s:%lld: label %.*s is too large: labels are class indices "
                                  "below %d (KD_DATASET_MAX_CLASSES)",
                                  list_file, (long long)line, (int)(e - t > 40 ? 40 : e - t), t,
                                  KD_DATASET_MAX_CLASSES);
                    break;
                }
                label = (int)v;
                e = t;
                while (e > s && isspace((unsigned char)e[-1])) e--;
            }
        }
        if (label >= 0) with++;
        else without++;
        if (with && without) {
            st = kd_error(KD_ERR_FORMAT,
                          "%s:%lld: %s, but %s (every line needs \"PATH LABEL\", or none has a "
                          "label)",
                          list_file, (long long)line, label >= 0 ? "has a label" : "has no label",
                          label >= 0 ? "earlier lines have none" : "earlier lines have one");
            break;
        }
        if (label > maxl) maxl = label;
        char path[4096];
        size_t pl = (size_t)(e - s);
        if (pl >= sizeof path) {
            st = kd_error(KD_ERR_FORMAT, "%s:%lld: path too long", list_file, (long long)line);
            break;
        }
        memcpy(path, s, pl);
        path[pl] = '\0';
        /* kd__paths_add joins dir + '/' + name; split the path to fit. */
        char full[8192];
        if (path[0] == '/') snprintf(full, sizeof full, "%s", path);
        else snprintf(full, sizeof full, "%s/%s", base, path);
        char *ls = strrchr(full, '/');
        *ls = '\0';
        st = kd__paths_add(&p, full[0] ? full : "", ls + 1, label);
    }
    free(buf);
    if (st == KD_OK && p.n == 0) st = kd_error(KD_ERR_FORMAT, "%s: no entries", list_file);
    char name[256];
    kd__path_basename(list_file, name, sizeof name);
    char *dot = strrchr(name, '.');
    if (dot && dot != name) *dot = '\0';
    if (st == KD_OK) st = kd__paths_to_dataset(&p, name, list_file, maxl + 1, out);
    if (st == KD_OK && !with) (*out)->split = KD_SPLIT_UNLABELED;
    kd__paths_free(&p);
    return st;
}
