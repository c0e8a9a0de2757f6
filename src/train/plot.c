/* Training curves as a self-contained SVG (no dependency): reads the epoch
 * records of a run's metrics.jsonl, so a resumed run plots its whole history,
 * and writes curves.svg with three panels: losses (train and test),
 * accuracies, and every named loss term of the training step per epoch (the
 * "train_<term>" keys of the epoch records: train_ce, train_kl, train_fitnet,
 * ...), one line per term with a legend. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "train/train_impl.h"

/* One plotted quantity: its name and one value per epoch record (NAN where
 * the record lacks it). */
typedef struct {
    char *name;
    double *y;
} kd__col;

typedef struct {
    int n, cap;        /* epoch records read, and the capacity of every column */
    double *epoch;
    double *train_loss, *test_loss, *train_top1, *test_top1;
    int n_terms, cap_terms;
    kd__col *terms;    /* in order of first appearance */
} kd__curves;

static void kd__curves_free(kd__curves *c) {
    free(c->epoch);
    free(c->train_loss);
    free(c->test_loss);
    free(c->train_top1);
    free(c->test_top1);
    for (int k = 0; k < c->n_terms; k++) {
        free(c->terms[k].name);
        free(c->terms[k].y);
    }
    free(c->terms);
}

/* Grows *p from old_cap to cap doubles, the new part NAN. */
static int kd__grow(double **p, int old_cap, int cap) {
    double *q = realloc(*p, sizeof *q * (size_t)cap);
    if (!q) return 0;
    for (int i = old_cap; i < cap; i++) q[i] = NAN;
    *p = q;
    return 1;
}

/* Room for one more epoch record in every column. */
static int kd__reserve_epoch(kd__curves *c) {
    if (c->n < c->cap) return 1;
    int cap = c->cap ? 2 * c->cap : 64;
    if (!kd__grow(&c->epoch, c->cap, cap) || !kd__grow(&c->train_loss, c->cap, cap) ||
        !kd__grow(&c->test_loss, c->cap, cap) || !kd__grow(&c->train_top1, c->cap, cap) ||
        !kd__grow(&c->test_top1, c->cap, cap))
        return 0;
    for (int k = 0; k < c->n_terms; k++)
        if (!kd__grow(&c->terms[k].y, c->cap, cap)) return 0;
    c->cap = cap;
    return 1;
}

/* The column of term `name` (len characters), created on first sight. */
static kd__col *kd__term(kd__curves *c, const char *name, size_t len) {
    for (int k = 0; k < c->n_terms; k++)
        if (strlen(c->terms[k].name) == len && memcmp(c->terms[k].name, name, len) == 0) return &c->terms[k];
    if (c->n_terms == c->cap_terms) {
        int cap = c->cap_terms ? 2 * c->cap_terms : 8;
        kd__col *t = realloc(c->terms, sizeof *t * (size_t)cap);
        if (!t) return NULL;
        c->terms = t;
        c->cap_terms = cap;
    }
    kd__col *col = &c->terms[c->n_terms];
    col->name = malloc(len + 1);
    col->y = NULL;
    if (!col->name || !kd__grow(&col->y, 0, c->cap)) {
        free(col->name);
        free(col->y);
        return NULL;
    }
    memcpy(col->name, name, len);
    col->name[len] = '\0';
    c->n_terms++;
    return col;
}

/* The number after "key": within line[0..len), or NAN (also for null). */
static double kd__field(const char *line, size_t len, const char *key) {
    char pat[48];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(line, pat);
    if (!p || p >= line + len) return NAN;
    char *end;
    double v = strtod(p + strlen(pat), &end);
    return end == p + strlen(pat) ? NAN : v;
}

/* Reads every "train_<term>": number of one epoch record into record i. The
 * step's summary keys that are not loss terms are skipped. */
static int kd__read_terms(kd__curves *c, int i, const char *line, size_t len) {
    static const char *const not_terms[] = {"loss", "top1", "top5"};
    const char *end = line + len;
    for (const char *p = line; p < end && (p = strstr(p, "\"train_")) && p < end;) {
        const char *name = p + 7, *q = name;
        while (q < end && *q != '"') q++;
        size_t nlen = (size_t)(q - name);
        p = q;
        if (q + 3 > end || q[1] != ':' || q[2] != ' ' || nlen == 0) continue;
        int skip = 0;
        for (size_t k = 0; k < sizeof not_terms / sizeof not_terms[0]; k++)
            if (strlen(not_terms[k]) == nlen && memcmp(not_terms[k], name, nlen) == 0) skip = 1;
        if (skip) continue;
        char *vend;
        double v = strtod(q + 3, &vend);
        if (vend == q + 3) v = NAN;
        kd__col *col = kd__term(c, name, nlen);
        if (!col) return 0;
        col->y[i] = v;
    }
    return 1;
}

typedef struct {
    const char *name, *color, *dash;
    const double *y;
} kd__series;

/* A line colour per series; past the palette, the colours repeat dashed. */
static const char *const kd__palette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
#define KD__NPAL ((int)(sizeof kd__palette / sizeof kd__palette[0]))

static void kd__xml_text(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else if (*s == '\'') fputs("&apos;", f);
        else fputc(*s, f);
    }
}

/* One panel. The legend goes above the panel (legend_right 0) or in a column
 * right of it (legend_right 1). With log_y the values are drawn on a log10
 * axis; the caller asks for it only when every value is positive. */
static void kd__panel(FILE *f, const kd__curves *c, int x0, int y0, int w, int h, const char *title,
                      const kd__series *s, int ns, int legend_right, int log_y) {
    double ymin = INFINITY, ymax = -INFINITY, xmax = 1;
    for (int k = 0; k < ns; k++)
        for (int i = 0; i < c->n; i++) {
            double v = s[k].y[i];
            if (!isfinite(v) || (log_y && !(v > 0))) continue;
            if (log_y) v = log10(v);
            ymin = fmin(ymin, v), ymax = fmax(ymax, v);
        }
    for (int i = 0; i < c->n; i++)
        if (isfinite(c->epoch[i])) xmax = fmax(xmax, c->epoch[i]);
    if (!isfinite(ymin)) ymin = 0, ymax = 1;
    if (ymax - ymin < 1e-9) ymax = ymin + 1;
    double pad = 0.05 * (ymax - ymin);
    ymin -= pad, ymax += pad;
    fprintf(f, "<rect x='%d' y='%d' width='%d' height='%d' fill='none' stroke='#999'/>\n", x0, y0, w, h);
    fprintf(f, "<text x='%d' y='%d' font-size='14' font-family='sans-serif'>", x0, y0 - 8);
    kd__xml_text(f, title);
    fprintf(f, "</text>\n");
    for (int t = 0; t <= 4; t++) {
        double v = ymin + (ymax - ymin) * t / 4.0;
        int y = y0 + h - (int)lround(h * t / 4.0);
        fprintf(f, "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='#eee'/>", x0, y, x0 + w, y);
        fprintf(f, "<text x='%d' y='%d' font-size='10' font-family='sans-serif' text-anchor='end'>%.4g</text>\n",
                x0 - 4, y + 3, log_y ? pow(10.0, v) : v);
    }
    fprintf(f, "<text x='%d' y='%d' font-size='10' font-family='sans-serif' text-anchor='middle'>epoch</text>"
               "<text x='%d' y='%d' font-size='10' font-family='sans-serif'>1</text>"
               "<text x='%d' y='%d' font-size='10' font-family='sans-serif' text-anchor='end'>%g</text>\n",
            x0 + w / 2, y0 + h + 14, x0, y0 + h + 14, x0 + w, y0 + h + 14, xmax);
    for (int k = 0; k < ns; k++) {
        fprintf(f, "<polyline fill='none' stroke='%s' stroke-width='2'%s%s%s points='", s[k].color,
                s[k].dash ? " stroke-dasharray='" : "", s[k].dash ? s[k].dash : "", s[k].dash ? "'" : "");
        for (int i = 0; i < c->n; i++) {
            double v = s[k].y[i];
            if (!isfinite(v) || !isfinite(c->epoch[i]) || (log_y && !(v > 0))) continue;
            if (log_y) v = log10(v);
            double px = x0 + (xmax > 1 ? w * (c->epoch[i] - 1) / (xmax - 1) : w / 2.0),
                   py = y0 + h - h * (v - ymin) / (ymax - ymin);
            fprintf(f, "%.1f,%.1f ", px, py);
        }
        fprintf(f, "'/>\n");
        int lx, ly;
        if (legend_right) {
            lx = x0 + w + 16, ly = y0 + 12 + 16 * k;
            fprintf(f, "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='%s' stroke-width='2'%s%s%s/>", lx, ly - 4,
                    lx + 18, ly - 4, s[k].color, s[k].dash ? " stroke-dasharray='" : "", s[k].dash ? s[k].dash : "",
                    s[k].dash ? "'" : "");
            lx += 24;
        } else {
            lx = x0 + w - 230 + 120 * k, ly = y0 - 8;
        }
        fprintf(f, "<text x='%d' y='%d' font-size='11' font-family='sans-serif' fill='%s'>", lx, ly, s[k].color);
        kd__xml_text(f, s[k].name);
        fprintf(f, "</text>\n");
    }
}

static kd_status kd__read_curves(const char *path, kd__curves *c) {
    void *data = NULL;
    size_t n = 0;
    KD_TRY(kd_file_read_all(path, &data, &n));
    const char *text = data;
    kd_status s = KD_OK;
    for (const char *line = text; line < text + n;) {
        const char *end = memchr(line, '\n', (size_t)(text + n - line));
        size_t len = end ? (size_t)(end - line) : (size_t)(text + n - line);
        const char *t = strstr(line, "\"type\": \"epoch\"");
        if (t && t < line + len) {
            if (!kd__reserve_epoch(c)) {
                s = kd_error(KD_ERR_NOMEM, "out of memory plotting %s", path);
                break;
            }
            int i = c->n++;
            c->epoch[i] = kd__field(line, len, "epoch");
            c->train_loss[i] = kd__field(line, len, "train_loss");
            c->test_loss[i] = kd__field(line, len, "test_loss");
            c->train_top1[i] = kd__field(line, len, "train_top1");
            c->test_top1[i] = kd__field(line, len, "test_top1");
            if (!kd__read_terms(c, i, line, len)) {
                s = kd_error(KD_ERR_NOMEM, "out of memory plotting %s", path);
                break;
            }
        }
        line += len + 1;
    }
    free(data);
    return s;
}

kd_status kd__write_curves(const char *dir) {
    char path[600];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    kd__curves c;
    memset(&c, 0, sizeof c);
    kd_status st = kd__read_curves(path, &c);
    kd__series *terms = NULL;
    char *svg = NULL;
    size_t svg_len = 0;
    FILE *f = NULL;
    if (st != KD_OK) goto done;
    terms = calloc((size_t)c.n_terms + 1, sizeof *terms);
    f = terms ? open_memstream(&svg, &svg_len) : NULL;
    if (!f) {
        st = kd_error(KD_ERR_NOMEM, "out of memory plotting %s", path);
        goto done;
    }
    /* The terms panel below the two others, with its legend in a column on
     * the right: as tall as the legend needs. */
    int terms_h = 270;
    if (16 * c.n_terms + 12 > terms_h) terms_h = 16 * c.n_terms + 12;
    int height = c.n_terms ? 360 + 60 + terms_h + 40 : 360;
    fprintf(f, "<svg xmlns='http://www.w3.org/2000/svg' width='960' height='%d' viewBox='0 0 960 %d'>\n"
               "<rect width='960' height='%d' fill='white'/>\n", height, height, height);
    kd__series loss[2] = {{"train loss", "#1f77b4", NULL, c.train_loss}, {"test loss", "#d62728", NULL, c.test_loss}};
    kd__series acc[2] = {{"train top-1 %", "#1f77b4", NULL, c.train_top1}, {"test top-1 %", "#d62728", NULL, c.test_top1}};
    kd__panel(f, &c, 60, 40, 380, 270, "loss", loss, 2, 0, 0);
    kd__panel(f, &c, 540, 40, 380, 270, "accuracy (%)", acc, 2, 0, 0);
    if (c.n_terms) {
        /* Weighted terms differ by orders of magnitude (CE near 4, a hint
         * term near 0.01): a log axis when every value is positive and the
         * range is wide. */
        double lo = INFINITY, hi = -INFINITY;
        int positive = 1;
        for (int k = 0; k < c.n_terms; k++) {
            terms[k] = (kd__series){c.terms[k].name, kd__palette[k % KD__NPAL], k >= KD__NPAL ? "6,3" : NULL,
                                    c.terms[k].y};
            for (int i = 0; i < c.n; i++) {
                double v = c.terms[k].y[i];
                if (!isfinite(v)) continue;
                if (!(v > 0)) positive = 0;
                lo = fmin(lo, v), hi = fmax(hi, v);
            }
        }
        int log_y = positive && lo > 0 && hi / lo > 30;
        kd__panel(f, &c, 60, 420, 760, terms_h,
                  log_y ? "loss terms per epoch (weighted train_<term> means; log scale)"
                        : "loss terms per epoch (weighted train_<term> means)",
                  terms, c.n_terms, 1, log_y);
    }
    fprintf(f, "</svg>\n");
    fclose(f);
    f = NULL;
    snprintf(path, sizeof path, "%s/curves.svg", dir);
    st = kd_file_write_atomic(path, svg, svg_len);
done:
    free(svg);
    free(terms);
    kd__curves_free(&c);
    return st;
}
