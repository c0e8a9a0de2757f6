/*
 * kd/io.h: files. safetensors (read and write, PyTorch-compatible names),
 * atomic file replacement, small JSON helpers for metrics and summaries.
 *
 * Usage (write):
 *     kd_st_writer *w; kd_st_writer_init(&w);
 *     kd_st_writer_add(w, "fc.weight", KD_F32, 2, shape, data);  // data must stay valid
 *     kd_st_writer_set_meta(w, "arch", "resnet8");
 *     kd_st_writer_save(w, "run/last.safetensors");  // temp file, fsync, rename
 *     kd_st_writer_free(w);
 * Usage (read):
 *     kd_st_file *f; if (kd_st_open("model.safetensors", &f) != KD_OK) ...;
 *     const kd_st_entry *e = kd_st_find(f, "fc.weight");   // NULL if absent
 *     kd_st_close(f);
 */
#ifndef KD_IO_H
#define KD_IO_H

#include <stdio.h>

#include "kd/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ----------------------------------------------------------- safetensors */

typedef struct {
    const char *name;
    kd_dtype dtype;
    int ndim;
    int64_t shape[KD_MAX_DIMS];
    const void *data; /* points into the loaded file; valid until kd_st_close */
    size_t nbytes;
} kd_st_entry;

typedef struct kd_st_file kd_st_file;

/* Reads and validates the whole file: header JSON, dtypes, shapes, offsets
 * inside the data section, no overlaps. Errors name the path and the fault. */
kd_status kd_st_open(const char *path, kd_st_file **out);
void kd_st_close(kd_st_file *f);
int kd_st_count(const kd_st_file *f);
const kd_st_entry *kd_st_get(const kd_st_file *f, int i);
const kd_st_entry *kd_st_find(const kd_st_file *f, const char *name);
/* __metadata__ value for key, or NULL. */
const char *kd_st_meta(const kd_st_file *f, const char *key);
const char *kd_st_path(const kd_st_file *f);
/* Copies entry `name` into dst, which must have the same dtype and shape;
 * otherwise a KD_ERR_SHAPE/KD_ERR_NOT_FOUND error naming file and tensor. */
kd_status kd_st_read_into(const kd_st_file *f, const char *name, kd_tensor *dst);

typedef struct kd_st_writer kd_st_writer;
kd_status kd_st_writer_init(kd_st_writer **out);
void kd_st_writer_free(kd_st_writer *w);
/* Adds a tensor; `data` is not copied and must stay valid until save. */
kd_status kd_st_writer_add(kd_st_writer *w, const char *name, kd_dtype dt, int ndim,
                           const int64_t *shape, const void *data);
kd_status kd_st_writer_add_tensor(kd_st_writer *w, const char *name, const kd_tensor *t);
kd_status kd_st_writer_set_meta(kd_st_writer *w, const char *key, const char *value);
/* Writes atomically (see kd_file_write_atomic). Tensors are stored sorted by
 * name, as the reference implementation does. */
kd_status kd_st_writer_save(kd_st_writer *w, const char *path);

/* ------------------------------------------------------------ files */

/* Writes `n` bytes to path via path.tmp.<pid>, fsync, rename, fsync of the
 * directory: a crash leaves either the old file or the new one. A failure of
 * any step, the directory fsync included, returns KD_ERR_IO (file systems
 * that cannot fsync a directory at all, EINVAL/ENOTSUP, are not a failure). */
kd_status kd_file_write_atomic(const char *path, const void *data, size_t n);
/* The same, for data gathered from several buffers written one after another
 * (a safetensors header and each tensor, without copying them into one). */
typedef struct {
    const void *data;
    size_t n;
} kd_file_part;
kd_status kd_file_write_atomic_parts(const char *path, const kd_file_part *parts, int nparts);
/* Reads a whole file into a malloc'd buffer (NUL-terminated for text). */
kd_status kd_file_read_all(const char *path, void **data, size_t *n);
/* mkdir -p. */
kd_status kd_mkdirs(const char *path);
int kd_file_exists(const char *path);

/* ------------------------------------------------------------- json */

/* Appends a JSON string literal (quoted, escaped) to f. */
void kd_json_write_string(FILE *f, const char *s);
/* Appends a finite double, or null for NaN/inf (JSON has no NaN). */
void kd_json_write_number(FILE *f, double v);

/* A parsed JSON document (RFC 8259). Strings are NUL-terminated UTF-8; the
 * escape \u0000 is rejected so that every string is a plain C string. Objects
 * keep their members in document order, duplicates included.
 *
 *     kd_json *doc;
 *     if (kd_json_parse(text, n, "summary.json", &doc) != KD_OK) ...;
 *     const kd_json *acc = kd_json_get(doc, "top1");
 *     if (acc && acc->type == KD_JSON_NUMBER) printf("%g\n", acc->number);
 *     kd_json_free(doc);
 */
typedef enum {
    KD_JSON_NULL = 0,
    KD_JSON_FALSE,
    KD_JSON_TRUE,
    KD_JSON_NUMBER,
    KD_JSON_STRING,
    KD_JSON_ARRAY,
    KD_JSON_OBJECT
} kd_json_type;

typedef struct kd_json kd_json;
struct kd_json {
    kd_json_type type;
    double number;   /* KD_JSON_NUMBER */
    int is_int;      /* the literal has no fraction or exponent and fits int64 */
    int64_t integer; /* exact value when is_int */
    char *string;    /* KD_JSON_STRING */
    int64_t count;   /* members of an object or items of an array */
    kd_json *items;  /* (count) values */
    char **keys;     /* (count) member names of an object; NULL for arrays */
};

/* Parses n bytes of text. On failure returns KD_ERR_FORMAT with a message
 * "<what>: malformed JSON at byte B (line L, column C): <reason>". */
kd_status kd_json_parse(const char *text, size_t n, const char *what, kd_json **out);
void kd_json_free(kd_json *v);
/* First member named key of an object, or NULL (also when v is no object). */
const kd_json *kd_json_get(const kd_json *v, const char *key);

#ifdef __cplusplus
}
#endif
#endif /* KD_IO_H */
