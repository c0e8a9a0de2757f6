/* Concatenated datasets (kd_dataset_concat): a's samples, then b's. Two
 * in-memory datasets become one in-memory dataset (images copied); any
 * other mix is a KD__SRC_CONCAT dataset holding copies of its parts (record
 * indices or paths for lazy parts, never their images) and its own labels,
 * and it reads, probes and names each sample through the part that holds
 * it. Subsets of a concat (kd__dataset_keep: kd_dataset_subset,
 * kd_dataset_select, kd_dataset_keep_labels) keep each part's share. */
#include "data_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const kd_dataset *kd__concat_locate(const kd_dataset *ds, int64_t i, int64_t *j) {
    int lo = 0, hi = ds->nparts - 1;
    while (lo < hi) { /* the last part that starts at or before i */
        int mid = (lo + hi + 1) / 2;
        if (ds->part_start[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    *j = i - ds->part_start[lo];
    return ds->parts[lo];
}

void kd__concat_free_parts(kd_dataset *ds) {
    for (int k = 0; k < ds->nparts; k++) kd_dataset_free(ds->parts[k]);
    free(ds->parts);
    free(ds->part_start);
    ds->parts = NULL;
    ds->part_start = NULL;
    ds->nparts = 0;
}

/* Gives dst the class names of src (or none). */
static kd_status kd__copy_classes(kd_dataset *dst, const kd_dataset *src) {
    free(dst->cpool);
    free(dst->coffs);
    dst->cpool = NULL;
    dst->coffs = NULL;
    if (!src->cpool || src->num_classes <= 0) return KD_OK;
    const char **names = malloc((size_t)src->num_classes * sizeof *names);
    if (!names) return kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for class names", dst->name);
    for (int k = 0; k < src->num_classes; k++) names[k] = src->cpool + src->coffs[k];
    kd_status st = kd__dataset_set_classes(dst, names, src->num_classes);
    free(names);
    return st;
}

/* A copy of every sample of a dataset that is not a concat. */
static kd_status kd__copy_all(const kd_dataset *ds, kd_dataset **out) {
    uint8_t *all = malloc((size_t)ds->n);
    if (!all) return kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for a copy", ds->name);
    memset(all, 1, (size_t)ds->n);
    kd_status st = kd__dataset_keep(ds, ds->name, all, ds->n, out);
    free(all);
    return st;
}

/* A concat dataset of parts[0..np) (the array and the parts are taken over,
 * and freed on failure), with the labels (n of them) copied, shape (c, h, w),
 * and the class count, class names, split and path of `like`. */
static kd_status kd__concat_build(const char *name, kd_dataset **parts, int np, const int32_t *labels,
                                  const kd_dataset *like, int c, int h, int w, kd_dataset **out) {
    *out = NULL;
    int64_t n = 0;
    for (int k = 0; k < np; k++) n += parts[k]->n;
    kd_dataset *ds = NULL;
    int64_t *start = malloc((size_t)(np + 1) * sizeof *start);
    kd_status st = start ? kd__dataset_alloc_lazy(name, n, c, h, w, KD__SRC_CONCAT, &ds)
                         : kd_error(KD_ERR_NOMEM, "dataset %s: out of memory", name);
    if (st != KD_OK) {
        for (int k = 0; k < np; k++) kd_dataset_free(parts[k]);
        free(parts);
        free(start);
        return st;
    }
    ds->parts = parts;
    ds->nparts = np;
    ds->part_start = start;
    start[0] = 0;
    for (int k = 0; k < np; k++) start[k + 1] = start[k] + parts[k]->n;
    memcpy(ds->labels, labels, (size_t)n * sizeof *labels);
    ds->num_classes = like->num_classes;
    ds->split = like->split;
    ds->train = like->train;
    memcpy(ds->path, like->path, sizeof ds->path);
    st = kd__copy_classes(ds, like);
    if (st != KD_OK) {
        kd_dataset_free(ds);
        return st;
    }
    *out = ds;
    return KD_OK;
}

/* Appends copies of ds's parts (ds itself when it is not a concat). */
static kd_status kd__add_parts(const kd_dataset *ds, kd_dataset **parts, int *np) {
    if (ds->source != KD__SRC_CONCAT) return kd__copy_all(ds, &parts[(*np)++]);
    for (int k = 0; k < ds->nparts; k++) KD_TRY(kd__copy_all(ds->parts[k], &parts[(*np)++]));
    return KD_OK;
}

kd_status kd_dataset_concat(const kd_dataset *a, const kd_dataset *b, int drop_b_labels, kd_dataset **out) {
    if (!a || !b || !out) return kd_error(KD_ERR_INVALID, "kd_dataset_concat: NULL argument");
    *out = NULL;
    char da[4300], db[4300];
    snprintf(da, sizeof da, "%s%s%s%s", a->name, a->path[0] ? " (" : "", a->path, a->path[0] ? ")" : "");
    snprintf(db, sizeof db, "%s%s%s%s", b->name, b->path[0] ? " (" : "", b->path, b->path[0] ? ")" : "");
    if (a->c != b->c)
        return kd_error(KD_ERR_SHAPE,
                        "cannot combine datasets %s and %s: their images have %d and %d channels", da, db, a->c,
                        b->c);
    if (a->h && b->h && (a->h != b->h || a->w != b->w))
        return kd_error(KD_ERR_SHAPE, "cannot combine datasets %s and %s: their images are %dx%d and %dx%d", da,
                        db, a->h, a->w, b->h, b->w);
    if (!drop_b_labels)
        for (int64_t i = 0; i < b->n; i++)
            if (b->labels[i] >= a->num_classes)
                return kd_error(KD_ERR_INVALID,
                                "cannot combine datasets %s and %s: label %d of sample %lld of %s is outside the %d "
                                "classes of %s",
                                a->name, b->name, b->labels[i], (long long)i, b->name, a->num_classes, a->name);
    if (b->n > INT64_MAX / 2 - a->n)
        return kd_error(KD_ERR_INVALID, "cannot combine datasets %s and %s: too many samples", a->name, b->name);
    int64_t n = a->n + b->n;
    char name[300];
    snprintf(name, sizeof name, "%s+%s", a->name, b->name);
    int32_t *labels = malloc((size_t)n * sizeof *labels);
    if (!labels) return kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for %lld labels", name, (long long)n);
    memcpy(labels, a->labels, (size_t)a->n * sizeof *labels);
    for (int64_t i = 0; i < b->n; i++) labels[a->n + i] = drop_b_labels ? -1 : b->labels[i];
    kd_status st;
    if (a->source == KD__SRC_MEMORY && b->source == KD__SRC_MEMORY) {
        /* Same fixed size (checked above): one in-memory dataset. */
        kd_dataset *ds = NULL;
        st = kd__dataset_alloc(name, n, a->c, a->h, a->w, a->train, &ds);
        if (st == KD_OK) {
            size_t per = (size_t)a->c * (size_t)a->h * (size_t)a->w;
            memcpy(ds->images, a->images, (size_t)a->n * per);
            memcpy(ds->images + (size_t)a->n * per, b->images, (size_t)b->n * per);
            memcpy(ds->labels, labels, (size_t)n * sizeof *labels);
            ds->num_classes = a->num_classes;
            ds->split = a->split;
            st = kd__copy_classes(ds, a);
            if (st != KD_OK) kd_dataset_free(ds);
            else *out = ds;
        }
        free(labels);
        return st;
    }
    int cap = (a->source == KD__SRC_CONCAT ? a->nparts : 1) + (b->source == KD__SRC_CONCAT ? b->nparts : 1);
    kd_dataset **parts = calloc((size_t)cap, sizeof *parts);
    int np = 0;
    st = parts ? KD_OK : kd_error(KD_ERR_NOMEM, "dataset %s: out of memory", name);
    if (st == KD_OK) st = kd__add_parts(a, parts, &np);
    if (st == KD_OK) st = kd__add_parts(b, parts, &np);
    if (st != KD_OK) {
        for (int k = 0; parts && k < cap; k++) kd_dataset_free(parts[k]);
        free(parts);
        free(labels);
        return st;
    }
    int h = a->h && b->h ? a->h : 0, w = a->h && b->h ? a->w : 0;
    st = kd__concat_build(name, parts, np, labels, a, a->c, h, w, out);
    free(labels);
    return st;
}

kd_status kd__concat_keep(const kd_dataset *ds, const char *name, const uint8_t *keep, int64_t n,
                          kd_dataset **out) {
    *out = NULL;
    if (n <= 0) return kd_error(KD_ERR_INVALID, "dataset %s: an empty selection", ds->name);
    kd_dataset **parts = calloc((size_t)ds->nparts, sizeof *parts);
    int32_t *labels = malloc((size_t)n * sizeof *labels);
    kd_status st = parts && labels ? KD_OK : kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for a subset", ds->name);
    int np = 0;
    for (int k = 0; st == KD_OK && k < ds->nparts; k++) {
        const uint8_t *kk = keep + ds->part_start[k];
        int64_t m = 0;
        for (int64_t i = 0; i < ds->parts[k]->n; i++) m += kk[i] != 0;
        if (m) st = kd__dataset_keep(ds->parts[k], name, kk, m, &parts[np++]);
    }
    int64_t m = 0;
    for (int64_t i = 0; st == KD_OK && i < ds->n; i++)
        if (keep[i]) {
            if (m == n) break;
            labels[m++] = ds->labels[i];
        }
    if (st == KD_OK && m != n)
        st = kd_error(KD_ERR_INVALID, "dataset %s: a selection of %lld samples marks %lld", ds->name, (long long)n,
                      (long long)m);
    if (st != KD_OK) {
        for (int k = 0; parts && k < np; k++) kd_dataset_free(parts[k]);
        free(parts);
        free(labels);
        return st;
    }
    if (np == 1) { /* one part left: a plain dataset with the concat's labels and classes */
        kd_dataset *sub = parts[0];
        free(parts);
        memcpy(sub->labels, labels, (size_t)n * sizeof *labels);
        free(labels);
        sub->num_classes = ds->num_classes;
        sub->split = ds->split;
        sub->train = ds->train;
        snprintf(sub->name, sizeof sub->name, "%s", name);
        st = kd__copy_classes(sub, ds);
        if (st != KD_OK) kd_dataset_free(sub);
        else *out = sub;
        return st;
    }
    st = kd__concat_build(name, parts, np, labels, ds, ds->c, ds->h, ds->w, out);
    free(labels);
    return st;
}
