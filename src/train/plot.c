/* Training curves as a self-contained SVG (no dependency): reads the epoch
 * records of a run's metrics.jsonl, so a resumed run plots its whole history,
 * and writes curves.svg with two panels: losses, and accuracies. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "train/train_impl.h"

#define KD__MAX_EPOCHS 4096

typedef struct {
    int n;
    double epoch[KD__MAX_EPOCHS];
    double train_loss[KD__MAX_EPOCHS], test_loss[KD__MAX_EPOCHS];
    double train_top1[KD__MAX_EPOCHS], test_top1[KD__MAX_EPOCHS];
} kd__curves;

/* The number after "key": on the line, or NAN. */
static double kd__field(const char *line, size_t len, const char *key) {
    char pat[48];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(line, pat);
    if (!p || p >= line + len) return NAN;
    return strtod(p + strlen(pat), NULL);
}

typedef struct {
    const char *name, *color;
    const double *y;
} kd__series;

static void kd__panel(FILE *f, const kd__curves *c, int x0, int y0, int w, int h, const char *title,
                      const kd__series *s, int ns) {
    double ymin = INFINITY, ymax = -INFINITY, xmax = 1;
    for (int k = 0; k < ns; k++)
        for (int i = 0; i < c->n; i++)
            if (isfinite(s[k].y[i])) ymin = fmin(ymin, s[k].y[i]), ymax = fmax(ymax, s[k].y[i]);
    for (int i = 0; i < c->n; i++) xmax = fmax(xmax, c->epoch[i]);
    if (!isfinite(ymin)) ymin = 0, ymax = 1;
    if (ymax - ymin < 1e-9) ymax = ymin + 1;
    double pad = 0.05 * (ymax - ymin);
    ymin -= pad, ymax += pad;
    fprintf(f, "<rect x='%d' y='%d' width='%d' height='%d' fill='none' stroke='#999'/>\n", x0, y0, w, h);
    fprintf(f, "<text x='%d' y='%d' font-size='14' font-family='sans-serif'>%s</text>\n", x0, y0 - 8, title);
    for (int t = 0; t <= 4; t++) {
        double v = ymin + (ymax - ymin) * t / 4.0;
        int y = y0 + h - (int)lround(h * t / 4.0);
        fprintf(f, "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='#eee'/>", x0, y, x0 + w, y);
        fprintf(f, "<text x='%d' y='%d' font-size='10' font-family='sans-serif' text-anchor='end'>%.4g</text>\n",
                x0 - 4, y + 3, v);
    }
    fprintf(f, "<text x='%d' y='%d' font-size='10' font-family='sans-serif' text-anchor='middle'>epoch</text>"
               "<text x='%d' y='%d' font-size='10' font-family='sans-serif'>1</text>"
               "<text x='%d' y='%d' font-size='10' font-family='sans-serif' text-anchor='end'>%g</text>\n",
            x0 + w / 2, y0 + h + 14, x0, y0 + h + 14, x0 + w, y0 + h + 14, xmax);
    for (int k = 0; k < ns; k++) {
        fprintf(f, "<polyline fill='none' stroke='%s' stroke-width='2' points='", s[k].color);
        for (int i = 0; i < c->n; i++) {
            if (!isfinite(s[k].y[i])) continue;
            double px = x0 + (xmax > 1 ? w * (c->epoch[i] - 1) / (xmax - 1) : w / 2.0), py = y0 + h - h * (s[k].y[i] - ymin) / (ymax - ymin);
            fprintf(f, "%.1f,%.1f ", px, py);
        }
        fprintf(f, "'/>\n<text x='%d' y='%d' font-size='11' font-family='sans-serif' fill='%s'>%s</text>\n",
                x0 + w - 230 + 120 * k, y0 - 8, s[k].color, s[k].name);
    }
}

kd_status kd__write_curves(const char *dir) {
    char path[600];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    void *data = NULL;
    size_t n = 0;
    KD_TRY(kd_file_read_all(path, &data, &n));
    kd__curves *c = calloc(1, sizeof *c);
    if (!c) {
        free(data);
        return kd_error(KD_ERR_NOMEM, "out of memory plotting %s", path);
    }
    const char *text = data;
    for (const char *line = text; line < text + n && c->n < KD__MAX_EPOCHS;) {
        const char *end = memchr(line, '\n', (size_t)(text + n - line));
        size_t len = end ? (size_t)(end - line) : (size_t)(text + n - line);
        const char *t = strstr(line, "\"type\": \"epoch\"");
        if (t && t < line + len) {
            int i = c->n++;
            c->epoch[i] = kd__field(line, len, "epoch");
            c->train_loss[i] = kd__field(line, len, "train_loss");
            c->test_loss[i] = kd__field(line, len, "test_loss");
            c->train_top1[i] = kd__field(line, len, "train_top1");
            c->test_top1[i] = kd__field(line, len, "test_top1");
        }
        line += len + 1;
    }
    free(data);
    char *svg = NULL;
    size_t svg_len = 0;
    FILE *f = open_memstream(&svg, &svg_len);
    if (!f) {
        free(c);
        return kd_error(KD_ERR_NOMEM, "out of memory plotting %s", path);
    }
    fprintf(f, "<svg xmlns='http://www.w3.org/2000/svg' width='960' height='360' viewBox='0 0 960 360'>\n"
               "<rect width='960' height='360' fill='white'/>\n");
    kd__series loss[2] = {{"train loss", "#1f77b4", c->train_loss}, {"test loss", "#d62728", c->test_loss}};
    kd__series acc[2] = {{"train top-1 %", "#1f77b4", c->train_top1}, {"test top-1 %", "#d62728", c->test_top1}};
    kd__panel(f, c, 60, 40, 380, 270, "loss", loss, 2);
    kd__panel(f, c, 540, 40, 380, 270, "accuracy (%)", acc, 2);
    fprintf(f, "</svg>\n");
    fclose(f);
    free(c);
    snprintf(path, sizeof path, "%s/curves.svg", dir);
    kd_status s = kd_file_write_atomic(path, svg, svg_len);
    free(svg);
    return s;
}
