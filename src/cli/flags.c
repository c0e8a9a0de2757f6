/* The parser and help printer of the flag tables in flags.h: one pass over the
 * arguments, every value checked against its row (kind, range, buffer size),
 * and --help lines generated from the same rows with the defaults they have. */
#include "cli/flags.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define KD__FLAGS_EXIT_USAGE 2
#define KD__FLAGS_WIDTH 100 /* help and usage lines are wrapped at this column */

static const kd__flag *kd__flags_find(const kd__flag *tab, int n, const char *name, size_t len) {
    for (int i = 0; i < n; i++)
        if (strlen(tab[i].name) == len && !strncmp(tab[i].name, name, len)) return &tab[i];
    return NULL;
}

/* Stores value into the destination of f in opts; returns 0 after printing the message. */
static int kd__flags_store(const char *cmd, const kd__flag *f, const char *value, void *opts) {
    char *dst = (char *)opts + f->off;
    char err[1024] = "";
    char *end;
    errno = 0;
    switch (f->kind) {
    case KD__FLAG_STRING: {
        size_t len = strlen(value);
        if (len >= f->size) {
            fprintf(stderr, "kd %s: the value of %s is too long (%zu characters, at most %zu)\n", cmd, f->name, len,
                    f->size - 1);
            return 0;
        }
        memcpy(dst, value, len + 1);
        break;
    }
    case KD__FLAG_INT:
    case KD__FLAG_I64: {
        long long x = strtoll(value, &end, 10);
        if (!*value || *end || errno || x < f->lo || x > f->hi) {
            fprintf(stderr, "kd %s: invalid value '%s' for %s: expected an integer in %lld..%lld\n", cmd, value,
                    f->name, f->lo, f->hi);
            return 0;
        }
        if (f->kind == KD__FLAG_INT) *(int *)dst = (int)x;
        else *(int64_t *)dst = (int64_t)x;
        break;
    }
    case KD__FLAG_POS: {
        double x = strtod(value, &end);
        if (!*value || *end || errno || !isfinite(x) || !(x > 0)) {
            fprintf(stderr, "kd %s: invalid value '%s' for %s: expected a number > 0\n", cmd, value, f->name);
            return 0;
        }
        *(double *)dst = x;
        break;
    }
    case KD__FLAG_U64: {
        unsigned long long x = strtoull(value, &end, 10);
        if (!*value || *end || errno || value[0] == '-' || value[0] == '+') {
            fprintf(stderr, "kd %s: invalid value '%s' for %s: expected an unsigned integer\n", cmd, value, f->name);
            return 0;
        }
        *(uint64_t *)dst = (uint64_t)x;
        break;
    }
    case KD__FLAG_SWITCH: *(int *)dst = 1; break;
    case KD__FLAG_CUSTOM:
        if (!f->parse(f, value, opts, err, sizeof err)) {
            fprintf(stderr, "kd %s: %s\n", cmd, err);
            return 0;
        }
        break;
    }
    if (f->check && !f->check(value, err, sizeof err)) {
        fprintf(stderr, "kd %s: %s\n", cmd, err);
        return 0;
    }
    return 1;
}

int kd__flags_parse(const char *cmd, const kd__flag *tab, int n, int argc, char **argv, void *opts,
                    unsigned char *given) {
    memset(given, 0, (size_t)n);
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return KD__FLAGS_HELP;
        if (strncmp(a, "--", 2) != 0 || !a[2]) {
            fprintf(stderr, "kd %s: unexpected argument '%s' (see --help)\n", cmd, a);
            return KD__FLAGS_EXIT_USAGE;
        }
        const char *eq = strchr(a, '=');
        size_t len = eq ? (size_t)(eq - a) : strlen(a);
        const kd__flag *f = kd__flags_find(tab, n, a, len);
        if (!f) {
            fprintf(stderr, "kd %s: unknown option '%.*s' (see --help)\n", cmd, (int)len, a);
            return KD__FLAGS_EXIT_USAGE;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (f->kind == KD__FLAG_SWITCH) {
            if (value) {
                fprintf(stderr, "kd %s: %s takes no value (got '%s')\n", cmd, f->name, value);
                return KD__FLAGS_EXIT_USAGE;
            }
        } else if (!value) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kd %s: %s needs a value (%s)\n", cmd, f->name, f->metavar);
                return KD__FLAGS_EXIT_USAGE;
            }
            value = argv[++i];
        }
        if (!kd__flags_store(cmd, f, value, opts)) return KD__FLAGS_EXIT_USAGE;
        given[f - tab] = 1;
    }
    return KD__FLAGS_GO_ON;
}

static int kd__flags_applies(const kd__flag *f, unsigned mode) { return !f->modes || (f->modes & mode); }

/* "--knn", "--knn and --linear", "the accuracy mode, --knn and --linear". */
static void kd__flags_mode_list(char *buf, size_t n, unsigned modes, const char *const *mode_names) {
    int count = 0, total = 0;
    for (unsigned b = 0; b < 32; b++) total += (modes >> b) & 1u;
    size_t off = 0;
    buf[0] = '\0';
    for (unsigned b = 0; b < 32 && off < n; b++) {
        if (!((modes >> b) & 1u)) continue;
        const char *sep = count == 0 ? "" : count == total - 1 ? " and " : ", ";
        off += (size_t)snprintf(buf + off, n - off, "%s%s", sep, mode_names[b]);
        count++;
    }
}

int kd__flags_check(const char *cmd, const kd__flag *tab, int n, const unsigned char *given, unsigned mode,
                    const char *const *mode_names) {
    char list[512];
    for (int i = 0; i < n; i++) {
        if (!given[i] || kd__flags_applies(&tab[i], mode)) continue;
        kd__flags_mode_list(list, sizeof list, tab[i].modes, mode_names);
        fprintf(stderr, "kd %s: %s applies to %s only\n", cmd, tab[i].name, list);
        return KD__FLAGS_EXIT_USAGE;
    }
    /* A missing required flag: the sentence names all the mode's required values. */
    int missing = 0, total = 0, moded = 0;
    for (int i = 0; i < n; i++) {
        const kd__flag *f = &tab[i];
        if (!f->required || f->kind == KD__FLAG_SWITCH || !kd__flags_applies(f, mode)) continue;
        total++;
        moded |= f->modes != 0;
        missing |= !given[i];
    }
    if (!missing) return KD__FLAGS_GO_ON;
    size_t off = 0;
    int k = 0;
    list[0] = '\0';
    for (int i = 0; i < n && off < sizeof list; i++) {
        const kd__flag *f = &tab[i];
        if (!f->required || f->kind == KD__FLAG_SWITCH || !kd__flags_applies(f, mode)) continue;
        const char *sep = k == 0 ? "" : k == total - 1 ? " and " : ", ";
        off += (size_t)snprintf(list + off, sizeof list - off, "%s%s %s", sep, f->name, f->metavar);
        k++;
    }
    int bit = 0;
    while (mode && !((mode >> bit) & 1u)) bit++;
    fprintf(stderr, "kd %s: %s %s required%s%s\n", cmd, list, total == 1 ? "is" : "are", moded ? " with " : "",
            moded ? mode_names[bit] : "");
    return KD__FLAGS_EXIT_USAGE;
}

/* Appends word to the line being printed at *col, wrapping under indent. */
static void kd__flags_word(FILE *fp, const char *word, size_t len, int *col, int indent, int *first) {
    if (!*first && *col + 1 + (int)len > KD__FLAGS_WIDTH) {
        fprintf(fp, "\n%*s", indent, "");
        *col = indent;
    } else if (!*first) {
        fputc(' ', fp);
        (*col)++;
    }
    fwrite(word, 1, len, fp);
    *col += (int)len;
    *first = 0;
}

/* Prints text word by word from column *col, wrapping under indent. */
static void kd__flags_words(FILE *fp, const char *text, int *col, int indent, int *first) {
    for (const char *p = text; *p;) {
        while (*p == ' ') p++;
        size_t len = strcspn(p, " ");
        if (len) kd__flags_word(fp, p, len, col, indent, first);
        p += len;
    }
}

void kd__flags_usage(FILE *fp, const char *prefix, const kd__flag *tab, int n, unsigned mode, int brief) {
    int col = (int)strlen(prefix), indent = col + 1, first = 0, shortened = 0;
    char word[256];
    fputs(prefix, fp);
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < n; i++) {
            const kd__flag *f = &tab[i];
            if (f->required != (pass == 0) || !kd__flags_applies(f, mode)) continue;
            if (pass == 1 && brief && !f->modes) {
                shortened = 1;
                continue;
            }
            const char *meta = f->kind == KD__FLAG_SWITCH ? NULL : f->metavar;
            snprintf(word, sizeof word, pass == 0 ? "%s%s%s" : "[%s%s%s]", f->name, meta ? " " : "", meta ? meta : "");
            kd__flags_word(fp, word, strlen(word), &col, indent, &first);
        }
    if (shortened) kd__flags_word(fp, "[...]", 5, &col, indent, &first);
    fputc('\n', fp);
}

/* The default of f in defaults as text ("" when none is shown). */
static void kd__flags_default(const kd__flag *f, const void *defaults, char *buf, size_t n) {
    const char *p = (const char *)defaults + f->off;
    buf[0] = '\0';
    if (f->required) return;
    switch (f->kind) {
    case KD__FLAG_STRING: snprintf(buf, n, "%s", p[0] ? p : f->empty ? f->empty : ""); break;
    case KD__FLAG_INT: snprintf(buf, n, "%d", *(const int *)p); break;
    case KD__FLAG_I64: snprintf(buf, n, "%lld", (long long)*(const int64_t *)p); break;
    case KD__FLAG_U64: snprintf(buf, n, "%llu", (unsigned long long)*(const uint64_t *)p); break;
    case KD__FLAG_POS: {
        /* The shortest text that reads back to the same double. */
        double v = *(const double *)p;
        for (int prec = 6; prec <= 17; prec++) {
            snprintf(buf, n, "%.*g", prec, v);
            if (strtod(buf, NULL) == v) break;
        }
        break;
    }
    case KD__FLAG_SWITCH: break;
    case KD__FLAG_CUSTOM:
        if (f->show) f->show(defaults, buf, n);
        break;
    }
}

void kd__flags_help(FILE *fp, const kd__flag *tab, int n, const void *defaults, unsigned modes, int all) {
    int width = 0;
    for (int i = 0; i < n; i++) {
        int w = (int)strlen(tab[i].name);
        if (tab[i].kind != KD__FLAG_SWITCH && tab[i].metavar) w += 1 + (int)strlen(tab[i].metavar);
        if (w > width) width = w;
    }
    int indent = 2 + width + 3;
    char head[256], dflt[512], bracketed[520];
    for (int i = 0; i < n; i++) {
        const kd__flag *f = &tab[i];
        if (!all && f->modes != modes) continue;
        const char *meta = f->kind == KD__FLAG_SWITCH ? NULL : f->metavar;
        snprintf(head, sizeof head, "%s%s%s", f->name, meta ? " " : "", meta ? meta : "");
        fprintf(fp, "  %-*s", indent - 2, head);
        int col = indent, first = 1;
        kd__flags_words(fp, f->help ? f->help : "", &col, indent, &first);
        kd__flags_default(f, defaults, dflt, sizeof dflt);
        if (dflt[0]) {
            snprintf(bracketed, sizeof bracketed, "[%s]", dflt);
            kd__flags_word(fp, bracketed, strlen(bracketed), &col, indent, &first);
        }
        fputc('\n', fp);
    }
}

int kd__flags_run(const char *cmd, const kd__flag *tab, int n, int argc, char **argv, void *opts,
                  const void *defaults, const char *about) {
    unsigned char *given = malloc((size_t)n + 1);
    if (!given) {
        fprintf(stderr, "kd %s: out of memory\n", cmd);
        return 1;
    }
    int r = kd__flags_parse(cmd, tab, n, argc, argv, opts, given);
    if (r == KD__FLAGS_HELP) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "usage: kd %s", cmd);
        kd__flags_usage(stdout, prefix, tab, n, 0, 0);
        printf("\n%s\n", about);
        kd__flags_help(stdout, tab, n, defaults, 0, 1);
        r = 0;
    } else if (r == KD__FLAGS_GO_ON) {
        r = kd__flags_check(cmd, tab, n, given, 0, NULL);
    }
    free(given);
    return r;
}
