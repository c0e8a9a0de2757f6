/* Label subsets: the spec ("10%", "25" per class, or a file of indices),
 * the seeded class-balanced pick (the class grouping and partial
 * Fisher-Yates shuffle of kd_dataset_subset, dataset.c, with its own stream
 * tag), index files, and the datasets a run trains on: the labeled samples
 * alone (kd_dataset_select) or every sample with the other labels dropped
 * (kd_dataset_keep_labels). */
#include "data_internal.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KD__LABELS_TAG 0x4c4142454c53ull /* "LABELS" */
/* Decimals a percentage may have (num / den stays exact in int64). */
#define KD__PCT_DECIMALS 6

static kd_status kd__bad_spec(const char *text, const char *why) {
    return kd_error(KD_ERR_INVALID,
                    "invalid value '%s' for labels: %s (expected a percentage of each class such as 1%% or "
                    "0.5%%, a number of labeled images per class such as 25, or a file of dataset indices)",
                    text, why);
}

kd_status kd_label_spec_parse(const char *text, kd_label_spec *out) {
    kd_label_spec sp;
    memset(&sp, 0, sizeof sp);
    if (!text) return kd_error(KD_ERR_INVALID, "labels: NULL spec");
    if (strlen(text) >= sizeof sp.text)
        return kd_error(KD_ERR_INVALID, "value for labels is too long (%zu characters, at most %zu)", strlen(text),
                        sizeof sp.text - 1);
    memcpy(sp.text, text, strlen(text) + 1);
    if (!text[0]) {
        sp.num = sp.den = 1; /* every label */
        if (out) *out = sp;
        return KD_OK;
    }
    char c0 = text[0];
    if (!isdigit((unsigned char)c0) && c0 != '.' && c0 != '+' && c0 != '-' && text[strlen(text) - 1] != '%') {
        sp.is_file = 1;
        if (out) *out = sp;
        return KD_OK;
    }
    if (c0 == '+' || c0 == '-') return kd__bad_spec(text, "no sign is allowed");
    size_t len = strlen(text);
    if (text[len - 1] == '%') {
        /* Digits, an optional point and up to KD__PCT_DECIMALS decimals. */
        int64_t whole = 0, frac = 0;
        int ndig = 0, ndec = 0, point = 0;
        for (size_t i = 0; i + 1 < len; i++) {
            char ch = text[i];
            if (ch == '.' && !point) {
                point = 1;
            } else if (isdigit((unsigned char)ch)) {
                if (point) {
                    if (++ndec > KD__PCT_DECIMALS) return kd__bad_spec(text, "at most 6 decimals");
                    frac = frac * 10 + (ch - '0');
                } else {
                    if (whole > 1000) return kd__bad_spec(text, "more than 100%");
                    whole = whole * 10 + (ch - '0');
                }
                ndig++;
            } else {
                return kd__bad_spec(text, "not a number before '%'");
            }
        }
        if (!ndig) return kd__bad_spec(text, "no number before '%'");
        int64_t scale = 1;
        for (int i = 0; i < KD__PCT_DECIMALS; i++) scale *= 10;
        for (int i = ndec; i < KD__PCT_DECIMALS; i++) frac *= 10;
        sp.num = whole * scale + frac;
        sp.den = 100 * scale;
        if (sp.num <= 0) return kd__bad_spec(text, "the percentage must be > 0");
        if (sp.num > sp.den) return kd__bad_spec(text, "more than 100%");
    } else {
        for (size_t i = 0; i < len; i++)
            if (!isdigit((unsigned char)text[i])) return kd__bad_spec(text, "not a whole number");
        errno = 0;
        long long v = strtoll(text, NULL, 10);
        if (errno || v <= 0) return kd__bad_spec(text, "the number per class must be > 0");
        sp.per_class = v;
    }
    if (out) *out = sp;
    return KD_OK;
}

/* " (NAME)" when class k has a name. */
static const char *kd__cls_name(const kd_dataset *ds, int k, char *buf, size_t n) {
    const char *nm = kd_dataset_class_name(ds, k);
    if (nm) snprintf(buf, n, " (%s)", nm);
    else buf[0] = '\0';
    return buf;
}

static kd_status kd__indices_read(const char *path, const kd_dataset *ds, int need_label, int64_t **idx,
                                  int64_t *n) {
    *idx = NULL;
    *n = 0;
    FILE *f = fopen(path, "r");
    if (!f) return kd_error(KD_ERR_NOT_FOUND, "cannot open the index file %s: %s", path, strerror(errno));
    int64_t cap = 1024, m = 0, line_no = 0;
    int64_t *v = malloc((size_t)cap * sizeof *v);
    char line[256];
    kd_status s = v ? KD_OK : kd_error(KD_ERR_NOMEM, "out of memory reading %s", path);
    while (s == KD_OK && fgets(line, sizeof line, f)) {
        line_no++;
        size_t len = strlen(line);
        if (len == sizeof line - 1 && line[len - 1] != '\n') {
            const char *q = line;
            while (isspace((unsigned char)*q)) q++;
            if (*q == '#') { /* a comment of any length: skip the rest of it */
                int ch;
                while ((ch = fgetc(f)) != EOF && ch != '\n') {
                }
                continue;
            }
            s = kd_error(KD_ERR_FORMAT, "%s:%lld: line too long for a dataset index", path, (long long)line_no);
            break;
        }
        while (len && isspace((unsigned char)line[len - 1])) line[--len] = '\0';
        char *p = line;
        while (isspace((unsigned char)*p)) p++;
        if (!*p || *p == '#') continue;
        char *end;
        errno = 0;
        long long x = strtoll(p, &end, 10);
        if (!isdigit((unsigned char)*p) || errno || *end) {
            s = kd_error(KD_ERR_FORMAT, "%s:%lld: '%s' is not a dataset index", path, (long long)line_no, p);
        } else if (x >= kd_dataset_size(ds)) {
            s = kd_error(KD_ERR_FORMAT, "%s:%lld: index %lld is outside the dataset %s (%lld samples)", path,
                         (long long)line_no, x, kd_dataset_name(ds), (long long)kd_dataset_size(ds));
        } else if (m && x <= v[m - 1]) {
            s = kd_error(KD_ERR_FORMAT, "%s:%lld: index %lld does not follow %lld: indices must increase", path,
                         (long long)line_no, x, (long long)v[m - 1]);
        } else if (need_label && kd_dataset_label(ds, x) < 0) {
            s = kd_error(KD_ERR_FORMAT, "%s:%lld: sample %lld of %s has no label", path, (long long)line_no, x,
                         kd_dataset_name(ds));
        } else {
            if (m == cap) {
                int64_t *nv = realloc(v, (size_t)(cap *= 2) * sizeof *nv);
                if (!nv) {
                    s = kd_error(KD_ERR_NOMEM, "out of memory reading %s", path);
                    break;
                }
                v = nv;
            }
            v[m++] = x;
        }
    }
    if (s == KD_OK && ferror(f)) s = kd_error(KD_ERR_IO, "cannot read %s", path);
    fclose(f);
    if (s == KD_OK && m == 0) s = kd_error(KD_ERR_FORMAT, "labels: %s holds no dataset index", path);
    if (s != KD_OK) {
        free(v);
        return s;
    }
    *idx = v;
    *n = m;
    return KD_OK;
}

kd_status kd_label_indices_read(const char *path, const kd_dataset *ds, int64_t **idx, int64_t *n) {
    return kd__indices_read(path, ds, 1, idx, n);
}

kd_status kd_dataset_indices_read(const char *path, const kd_dataset *ds, int64_t **idx, int64_t *n) {
    return kd__indices_read(path, ds, 0, idx, n);
}

kd_status kd_dataset_label_subset(const kd_dataset *ds, const char *spec, uint64_t seed, int64_t **idx,
                                  int64_t *n) {
    *idx = NULL;
    *n = 0;
    kd_label_spec sp;
    KD_TRY(kd_label_spec_parse(spec, &sp));
    if (sp.is_file) return kd_label_indices_read(sp.text, ds, idx, n);
    if (kd_dataset_num_classes(ds) <= 0)
        return kd_error(KD_ERR_INVALID, "labels %s: dataset %s has no classes", spec, kd_dataset_name(ds));
    kd__class_groups g;
    KD_TRY(kd__class_groups_init(&g, ds, 1));
    kd_status s = KD_OK;
    int64_t *quota = calloc((size_t)g.K, sizeof *quota);
    uint8_t *keep = calloc((size_t)kd_dataset_size(ds), 1);
    int64_t total = 0;
    if (!quota || !keep) {
        s = kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for a label subset", kd_dataset_name(ds));
        goto done;
    }
    char nm[160];
    for (int k = 0; k < g.K && s == KD_OK; k++) {
        int64_t c = g.count[k];
        if (c == 0) continue; /* a class without images: the run's label check warns */
        if (sp.per_class > 0) {
            if (sp.per_class > c)
                s = kd_error(KD_ERR_INVALID,
                             "labels %s: class %d%s has only %lld labeled images, fewer than %lld per class",
                             sp.text, k, kd__cls_name(ds, k, nm, sizeof nm), (long long)c,
                             (long long)sp.per_class);
            quota[k] = sp.per_class;
        } else {
            /* round(c * num / den), halves up, exactly: c <= 2^31 and num <= den = 1e8. */
            quota[k] = (2 * c * sp.num + sp.den) / (2 * sp.den);
            if (quota[k] == 0)
                s = kd_error(KD_ERR_INVALID,
                             "labels %s: class %d%s would get no labeled image (%s of its %lld rounds to 0); "
                             "use a larger fraction or a number per class",
                             sp.text, k, kd__cls_name(ds, k, nm, sizeof nm), sp.text, (long long)c);
        }
        total += quota[k];
    }
    if (s != KD_OK) goto done;
    if (total == 0) {
        s = kd_error(KD_ERR_INVALID, "labels %s: dataset %s has no labeled sample", sp.text, kd_dataset_name(ds));
        goto done;
    }
    kd__class_groups_pick(&g, quota, seed, KD__LABELS_TAG, keep);
    int64_t *v = malloc((size_t)total * sizeof *v), m = 0;
    if (!v) {
        s = kd_error(KD_ERR_NOMEM, "out of memory for %lld label indices", (long long)total);
        goto done;
    }
    for (int64_t i = 0; i < kd_dataset_size(ds); i++)
        if (keep[i]) v[m++] = i;
    *idx = v;
    *n = m;
done:
    kd__class_groups_free(&g);
    free(quota);
    free(keep);
    return s;
}

/* keep[] of idx, checking that it increases and stays in range. */
static kd_status kd__keep_of(const kd_dataset *ds, const int64_t *idx, int64_t n, uint8_t **keep) {
    *keep = NULL;
    if (n <= 0 || !idx) return kd_error(KD_ERR_INVALID, "dataset %s: an empty selection", ds->name);
    uint8_t *k = calloc((size_t)ds->n, 1);
    if (!k) return kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for a selection", ds->name);
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= ds->n || (i && idx[i] <= idx[i - 1])) {
            free(k);
            return kd_error(KD_ERR_INVALID, "dataset %s: selection index %lld (position %lld) is out of range or "
                            "not increasing", ds->name, (long long)idx[i], (long long)i);
        }
        k[idx[i]] = 1;
    }
    *keep = k;
    return KD_OK;
}

kd_status kd_dataset_select(const kd_dataset *ds, const int64_t *idx, int64_t n, kd_dataset **out) {
    *out = NULL;
    uint8_t *keep;
    KD_TRY(kd__keep_of(ds, idx, n, &keep));
    char name[160];
    snprintf(name, sizeof name, "%s[%lld labeled]", ds->name, (long long)n);
    kd_status s = kd__dataset_keep(ds, name, keep, n, out);
    free(keep);
    return s;
}

kd_status kd_dataset_keep_labels(const kd_dataset *ds, const int64_t *idx, int64_t n, kd_dataset **out) {
    *out = NULL;
    uint8_t *keep;
    KD_TRY(kd__keep_of(ds, idx, n, &keep));
    uint8_t *all = malloc((size_t)ds->n);
    if (!all) {
        free(keep);
        return kd_error(KD_ERR_NOMEM, "dataset %s: out of memory for a copy", ds->name);
    }
    memset(all, 1, (size_t)ds->n);
    char name[160];
    snprintf(name, sizeof name, "%s[%lld labeled]", ds->name, (long long)n);
    kd_status s = kd__dataset_keep(ds, name, all, ds->n, out);
    if (s == KD_OK)
        for (int64_t i = 0; i < ds->n; i++)
            if (!keep[i]) (*out)->labels[i] = -1;
    free(all);
    free(keep);
    return s;
}
