/*
 * JSON for kd: a small strict parser (RFC 8259) used for safetensors headers
 * and summary files, and the two writers that metrics.jsonl and summary.json
 * are built from.
 *
 * The parser is recursive descent over a length-bounded buffer (the text need
 * not be NUL-terminated). It builds a tree of kd_json values, one malloc per
 * string and per array/object item block, and reports the first fault with its
 * byte offset, line and column. Nesting is limited so that hostile input cannot
 * exhaust the stack.
 */
#include "kd/io.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KD__JSON_MAX_DEPTH 128

/* ---------------------------------------------------------------- writers */

void kd_json_write_string(FILE *f, const char *s) {
    if (!s) {
        fputs("null", f);
        return;
    }
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            fputc('\\', f);
            fputc(*p, f);
        } else if (*p < 0x20) {
            fprintf(f, "\\u%04x", (unsigned)*p);
        } else {
            fputc(*p, f);
        }
    }
    fputc('"', f);
}

void kd_json_write_number(FILE *f, double v) {
    if (!isfinite(v)) {
        fputs("null", f);
        return;
    }
    char buf[64];
    snprintf(buf, sizeof buf, "%.9g", v);
    /* A locale with a decimal comma must not leak into JSON. */
    for (char *p = buf; *p; p++)
        if (*p == ',') *p = '.';
    fputs(buf, f);
}

/* ----------------------------------------------------------------- parser */

typedef struct {
    const char *s;
    size_t n;
    size_t pos;
    const char *what;
} kd__jp;

static kd_status kd__jp_fail(const kd__jp *p, const char *reason) {
    int line = 1, col = 1;
    size_t end = p->pos < p->n ? p->pos : p->n;
    for (size_t i = 0; i < end; i++) {
        if (p->s[i] == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    return kd_error(KD_ERR_FORMAT, "%s: malformed JSON at byte %zu (line %d, column %d): %s",
                    p->what ? p->what : "input", p->pos, line, col, reason);
}

static void kd__jp_skip_ws(kd__jp *p) {
    while (p->pos < p->n) {
        char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int kd__jp_peek(const kd__jp *p) {
    return p->pos < p->n ? (unsigned char)p->s[p->pos] : -1;
}

static void kd__json_clear(kd_json *v) {
    if (v->type == KD_JSON_STRING) {
        free(v->string);
    } else if (v->type == KD_JSON_ARRAY || v->type == KD_JSON_OBJECT) {
        for (int64_t i = 0; i < v->count; i++) {
            kd__json_clear(&v->items[i]);
            if (v->keys) free(v->keys[i]);
        }
        free(v->items);
        free(v->keys);
    }
    memset(v, 0, sizeof *v);
}

void kd_json_free(kd_json *v) {
    if (!v) return;
    kd__json_clear(v);
    free(v);
}

const kd_json *kd_json_get(const kd_json *v, const char *key) {
    if (!v || v->type != KD_JSON_OBJECT) return NULL;
    for (int64_t i = 0; i < v->count; i++)
        if (strcmp(v->keys[i], key) == 0) return &v->items[i];
    return NULL;
}

/* Appends code point cp as UTF-8. */
static size_t kd__utf8_put(char *o, unsigned cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid UTF-8 sequence at s (at most n bytes), or 0. */
static size_t kd__utf8_valid(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned min, cp;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; min = 0x80; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; min = 0x800; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; min = 0x10000; cp = c & 0x07; }
    else return 0;
    if (len > n) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

static int kd__hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

/* Parses a string literal at p->pos (which is '"') into a malloc'd C string.
 * The decoded text is never longer than the literal, which sizes the buffer. */
static kd_status kd__jp_string(kd__jp *p, char **out) {
    size_t start = ++p->pos, end = start;
    while (end < p->n && p->s[end] != '"') end += (p->s[end] == '\\') ? 2 : 1;
    if (end >= p->n) {
        p->pos = p->n;
        return kd__jp_fail(p, "unterminated string");
    }
    char *o = malloc(end - start + 1);
    if (!o) return kd_error(KD_ERR_NOMEM, "%s: out of memory parsing JSON", p->what);
    size_t k = 0;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c < 0x20) {
            free(o);
            return kd__jp_fail(p, "control character in string (must be escaped)");
        }
        if (c >= 0x80) {
            size_t len = kd__utf8_valid((const unsigned char *)p->s + p->pos, end - p->pos);
            if (!len) {
                free(o);
                return kd__jp_fail(p, "invalid UTF-8 in string");
            }
            memcpy(o + k, p->s + p->pos, len);
            k += len;
            p->pos += len;
            continue;
        }
        if (c != '\\') {
            o[k++] = (char)c;
            p->pos++;
            continue;
        }
        char e = p->s[p->pos + 1];
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            static const char map[] = "\"\\/\b\f\n\r\t";
            o[k++] = map[simple - "\"\\/bfnrt"];
            p->pos += 2;
            continue;
        }
        unsigned cp, lo;
        if (e != 'u' || p->pos + 6 > end || kd__hex4(p->s + p->pos + 2, &cp) != 0) {
            free(o);
            return kd__jp_fail(p, "invalid escape sequence in string");
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (p->pos + 12 > end || p->s[p->pos + 6] != '\\' || p->s[p->pos + 7] != 'u' ||
                kd__hex4(p->s + p->pos + 8, &lo) != 0 || lo < 0xDC00 || lo > 0xDFFF) {
                free(o);
                return kd__jp_fail(p, "unpaired UTF-16 surrogate in \\u escape");
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            p->pos += 6;
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            free(o);
            return kd__jp_fail(p, "unpaired UTF-16 surrogate in \\u escape");
        } else if (cp == 0) {
            free(o);
            return kd__jp_fail(p, "\\u0000 in strings is not supported");
        }
        k += kd__utf8_put(o + k, cp);
        p->pos += 6;
    }
    o[k] = '\0';
    p->pos = end + 1;
    *out = o;
    return KD_OK;
}

static kd_status kd__jp_number(kd__jp *p, kd_json *v) {
    size_t start = p->pos, i = p->pos;
    int neg = 0, is_int = 1;
    if (i < p->n && p->s[i] == '-') {
        neg = 1;
        i++;
    }
    if (i >= p->n || p->s[i] < '0' || p->s[i] > '9') {
        p->pos = i;
        return kd__jp_fail(p, "expected a digit");
    }
    /* Accumulate the integer part as a negative number so INT64_MIN fits. */
    int64_t acc = 0;
    int overflow = 0;
    if (p->s[i] == '0') {
        i++;
    } else {
        while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') {
            int d = p->s[i] - '0';
            if (acc < (INT64_MIN + d) / 10) overflow = 1;
            else acc = acc * 10 - d;
            i++;
        }
    }
    if (i < p->n && p->s[i] == '.') {
        is_int = 0;
        i++;
        if (i >= p->n || p->s[i] < '0' || p->s[i] > '9') {
            p->pos = i;
            return kd__jp_fail(p, "expected a digit after the decimal point");
        }
        while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++;
    }
    if (i < p->n && (p->s[i] == 'e' || p->s[i] == 'E')) {
        is_int = 0;
        i++;
        if (i < p->n && (p->s[i] == '+' || p->s[i] == '-')) i++;
        if (i >= p->n || p->s[i] < '0' || p->s[i] > '9') {
            p->pos = i;
            return kd__jp_fail(p, "expected a digit in the exponent");
        }
        while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++;
    }
    char buf[128];
    size_t len = i - start;
    if (len >= sizeof buf) return kd__jp_fail(p, "number literal too long");
    memcpy(buf, p->s + start, len);
    buf[len] = '\0';
    v->type = KD_JSON_NUMBER;
    v->number = strtod(buf, NULL);
    if (is_int && !overflow && (neg || acc != INT64_MIN)) {
        v->is_int = 1;
        v->integer = neg ? acc : -acc;
    }
    p->pos = i;
    return KD_OK;
}

static kd_status kd__jp_value(kd__jp *p, kd_json *v, int depth);

/* Parses the items of an array or members of an object (p->pos is at the
 * opening bracket). Items are appended to growing blocks. */
static kd_status kd__jp_container(kd__jp *p, kd_json *v, int depth, int is_obj) {
    kd_status st = KD_OK;
    char close = is_obj ? '}' : ']';
    int64_t cap = 0;
    v->type = is_obj ? KD_JSON_OBJECT : KD_JSON_ARRAY;
    if (depth >= KD__JSON_MAX_DEPTH) return kd__jp_fail(p, "nesting too deep");
    p->pos++;
    kd__jp_skip_ws(p);
    if (kd__jp_peek(p) == close) {
        p->pos++;
        return KD_OK;
    }
    for (;;) {
        char *key = NULL;
        kd__jp_skip_ws(p);
        if (is_obj) {
            if (kd__jp_peek(p) != '"') return kd__jp_fail(p, "expected a string key");
            st = kd__jp_string(p, &key);
            if (st != KD_OK) return st;
            kd__jp_skip_ws(p);
            if (kd__jp_peek(p) != ':') {
                free(key);
                return kd__jp_fail(p, "expected ':' after object key");
            }
            p->pos++;
        }
        if (v->count == cap) {
            int64_t ncap = cap ? cap * 2 : 4;
            kd_json *items = realloc(v->items, (size_t)ncap * sizeof *items);
            if (items) v->items = items;
            char **keys = NULL;
            if (items && is_obj) {
                keys = realloc(v->keys, (size_t)ncap * sizeof *keys);
                if (keys) v->keys = keys;
            }
            if (!items || (is_obj && !keys)) {
                free(key);
                return kd_error(KD_ERR_NOMEM, "%s: out of memory parsing JSON", p->what);
            }
            cap = ncap;
        }
        kd_json *item = &v->items[v->count];
        memset(item, 0, sizeof *item);
        if (is_obj) v->keys[v->count] = key;
        v->count++; /* counted before parsing so that cleanup frees partial items */
        st = kd__jp_value(p, item, depth + 1);
        if (st != KD_OK) return st;
        kd__jp_skip_ws(p);
        int c = kd__jp_peek(p);
        if (c == ',') {
            p->pos++;
            continue;
        }
        if (c == close) {
            p->pos++;
            return KD_OK;
        }
        return kd__jp_fail(p, is_obj ? "expected ',' or '}' in object" : "expected ',' or ']' in array");
    }
}

static int kd__jp_literal(kd__jp *p, const char *word) {
    size_t len = strlen(word);
    if (p->n - p->pos < len || memcmp(p->s + p->pos, word, len) != 0) return 0;
    p->pos += len;
    return 1;
}

static kd_status kd__jp_value(kd__jp *p, kd_json *v, int depth) {
    kd__jp_skip_ws(p);
    int c = kd__jp_peek(p);
    switch (c) {
    case -1: return kd__jp_fail(p, "unexpected end of input");
    case '{': return kd__jp_container(p, v, depth, 1);
    case '[': return kd__jp_container(p, v, depth, 0);
    case '"':
        v->type = KD_JSON_STRING;
        return kd__jp_string(p, &v->string);
    case 't':
        if (!kd__jp_literal(p, "true")) break;
        v->type = KD_JSON_TRUE;
        return KD_OK;
    case 'f':
        if (!kd__jp_literal(p, "false")) break;
        v->type = KD_JSON_FALSE;
        return KD_OK;
    case 'n':
        if (!kd__jp_literal(p, "null")) break;
        v->type = KD_JSON_NULL;
        return KD_OK;
    default:
        if (c == '-' || (c >= '0' && c <= '9')) return kd__jp_number(p, v);
        break;
    }
    return kd__jp_fail(p, "expected a value");
}

kd_status kd_json_parse(const char *text, size_t n, const char *what, kd_json **out) {
    kd_status st;
    kd__jp p = {text, n, 0, what ? what : "input"};
    kd_json *root;

    *out = NULL;
    if (!text && n) return kd_error(KD_ERR_INVALID, "%s: NULL JSON text", p.what);
    root = calloc(1, sizeof *root);
    if (!root) return kd_error(KD_ERR_NOMEM, "%s: out of memory parsing JSON", p.what);
    st = kd__jp_value(&p, root, 0);
    if (st != KD_OK) goto fail;
    kd__jp_skip_ws(&p);
    if (p.pos != p.n) {
        st = kd__jp_fail(&p, "unexpected data after the JSON value");
        goto fail;
    }
    *out = root;
    return KD_OK;

fail:
    kd_json_free(root);
    return st;
}
