/*
 * safetensors reading and writing, compatible with the reference
 * implementation (huggingface/safetensors) and so with PyTorch checkpoints.
 *
 * Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
 *     {"__metadata__": {"k": "v", ...},
 *      "name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
 * padded with spaces, then the data section; offsets are relative to its start.
 *
 * Reading loads the whole file into one 64-byte aligned buffer, placed so that
 * the data section itself starts on a 64-byte boundary: tensors stored at
 * multiples of their element size (as every writer does) are then aligned in
 * memory. Every header field is validated before an entry is handed out.
 * Entries are kept sorted by name (kd_st_get order), and found by bisection.
 *
 * Writing follows the reference byte for byte: tensors sorted by descending
 * dtype alignment then by name (byte order), laid out contiguously from offset
 * 0, the header JSON compact with "__metadata__" first (its keys sorted here,
 * where the reference uses hash order) and the tensors in offset order, padded
 * with spaces to a multiple of 8 bytes.
 */
#include "kd/io.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kd's safetensors code assumes a little-endian host"
#endif

/* The reference refuses headers above 100 MB; so do we. */
#define KD__ST_MAX_HEADER 100000000ull

/* ------------------------------------------------------------------ dtypes */

static int kd__dtype_parse(const char *s, kd_dtype *out) {
    for (int d = 0; d < KD_DTYPE_COUNT; d++) {
        if (strcmp(s, kd_dtype_name((kd_dtype)d)) == 0) {
            *out = (kd_dtype)d;
            return 1;
        }
    }
    return 0;
}

/* Valid safetensors dtypes that kd has no kd_dtype for. */
static int kd__dtype_foreign(const char *s) {
    static const char *names[] = {"BOOL", "I8",      "I16",     "U16",     "U32",
                                  "U64",  "F64",     "F8_E5M2", "F8_E4M3", "F8_E8M0",
                                  "F4",   "F6_E2M3", "F6_E3M2", "C64"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(s, names[i]) == 0) return 1;
    return 0;
}

/* Rank of a dtype in the reference's Dtype enum (declared in increasing
 * alignment order); the writer sorts by descending rank. */
static int kd__dtype_rank(kd_dtype dt) {
    switch (dt) {
    case KD_U8: return 1;
    case KD_F16: return 7;
    case KD_BF16: return 8;
    case KD_I32: return 9;
    case KD_F32: return 11;
    case KD_I64: return 13;
    default: return 0;
    }
}

static const char *kd__shape_str(int ndim, const int64_t *shape, char *buf, size_t n) {
    kd_tensor t;
    t.ndim = ndim;
    for (int i = 0; i < ndim; i++) t.shape[i] = shape[i];
    return kd_shape_str(&t, buf, n);
}

/* numel * size into *bytes; 0 on overflow. */
static int kd__nbytes(int ndim, const int64_t *shape, size_t elem, uint64_t *bytes) {
    uint64_t n = elem;
    for (int i = 0; i < ndim; i++) {
        uint64_t d = (uint64_t)shape[i];
        if (d != 0 && n > UINT64_MAX / d) return 0;
        n *= d;
    }
    if (n > (uint64_t)SIZE_MAX) return 0;
    *bytes = n;
    return 1;
}

/* ------------------------------------------------------------------ reader */

struct kd_st_file {
    char *path;
    unsigned char *buf; /* kd_aligned_alloc'd; the file starts at buf + lead */
    int count;
    kd_st_entry *entries; /* (count), sorted by name */
    char **names;         /* (count) owned copies; entries[i].name points here */
    int nmeta;
    char **meta; /* (2 * nmeta) key, value, key, value, ... sorted by key */
};

/* Per-entry offsets kept while validating. */
typedef struct {
    uint64_t begin, end;
    int index;
} kd__st_span;

static int kd__cmp_entry_name(const void *a, const void *b) {
    return strcmp(((const kd_st_entry *)a)->name, ((const kd_st_entry *)b)->name);
}

static int kd__cmp_meta_key(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int kd__cmp_span(const void *a, const void *b) {
    const kd__st_span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Reads exactly n bytes at offset off. Returns 0, errno, or -1 at end of file. */
static int kd__pread_all(int fd, void *dst, size_t n, off_t off) {
    char *p = dst;
    while (n > 0) {
        size_t chunk = n > (size_t)1 << 30 ? (size_t)1 << 30 : n;
        ssize_t r = pread(fd, p, chunk, off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (r == 0) return -1;
        p += r;
        off += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Reads a JSON array of non-negative integers into out[0..max). */
static kd_status kd__int_array(const char *path, const char *name, const char *field,
                               const kd_json *v, int64_t *out, int max, int *count) {
    if (!v)
        return kd_error(KD_ERR_FORMAT, "%s: tensor '%s' has no \"%s\" in the header", path, name,
                        field);
    if (v->type != KD_JSON_ARRAY)
        return kd_error(KD_ERR_FORMAT, "%s: tensor '%s': \"%s\" is not an array", path, name,
                        field);
    if (v->count > max)
        return kd_error(KD_ERR_UNSUPPORTED,
                        "%s: tensor '%s' has %lld dimensions; kd supports at most %d", path,
                        name, (long long)v->count, max);
    for (int64_t i = 0; i < v->count; i++) {
        const kd_json *x = &v->items[i];
        if (x->type != KD_JSON_NUMBER || !x->is_int || x->integer < 0)
            return kd_error(KD_ERR_FORMAT,
                            "%s: tensor '%s': \"%s\" item %lld is not a non-negative integer",
                            path, name, field, (long long)i);
        out[i] = x->integer;
    }
    *count = (int)v->count;
    return KD_OK;
}

/* Validates one tensor's header record and fills entry e (data still unset). */
static kd_status kd__parse_entry(const char *path, const char *name, const kd_json *info,
                                 uint64_t data_len, kd_st_entry *e, kd__st_span *span) {
    if (info->type != KD_JSON_OBJECT)
        return kd_error(KD_ERR_FORMAT, "%s: header entry '%s' is not an object", path, name);
    if (!*name) return kd_error(KD_ERR_FORMAT, "%s: header has a tensor with an empty name", path);

    const kd_json *dt = kd_json_get(info, "dtype");
    if (!dt || dt->type != KD_JSON_STRING)
        return kd_error(KD_ERR_FORMAT, "%s: tensor '%s' has no \"dtype\" string in the header",
                        path, name);
    if (!kd__dtype_parse(dt->string, &e->dtype)) {
        if (kd__dtype_foreign(dt->string))
            return kd_error(KD_ERR_UNSUPPORTED,
                            "%s: tensor '%s' has dtype %s, which kd does not support "
                            "(F32, BF16, F16, I64, I32, U8)",
                            path, name, dt->string);
        return kd_error(KD_ERR_FORMAT, "%s: tensor '%s' has unknown dtype \"%s\"", path, name,
                        dt->string);
    }

    KD_TRY(kd__int_array(path, name, "shape", kd_json_get(info, "shape"), e->shape, KD_MAX_DIMS,
                         &e->ndim));
    int64_t off[2];
    int noff = 0;
    const kd_json *ov = kd_json_get(info, "data_offsets");
    if (ov && ov->type == KD_JSON_ARRAY && ov->count != 2)
        return kd_error(KD_ERR_FORMAT, "%s: tensor '%s': \"data_offsets\" must have 2 items, not %lld",
                        path, name, (long long)ov->count);
    KD_TRY(kd__int_array(path, name, "data_offsets", ov, off, 2, &noff));

    char sbuf[160];
    uint64_t need;
    if (!kd__nbytes(e->ndim, e->shape, kd_dtype_size(e->dtype), &need))
        return kd_error(KD_ERR_FORMAT, "%s: tensor '%s': shape %s overflows the address space",
                        path, name, kd__shape_str(e->ndim, e->shape, sbuf, sizeof sbuf));
    span->begin = (uint64_t)off[0];
    span->end = (uint64_t)off[1];
    if (span->end < span->begin || span->end - span->begin != need)
        return kd_error(KD_ERR_FORMAT,
                        "%s: tensor '%s' has data_offsets [%llu, %llu] but dtype %s and shape %s "
                        "need %llu bytes",
                        path, name, (unsigned long long)span->begin,
                        (unsigned long long)span->end, kd_dtype_name(e->dtype),
                        kd__shape_str(e->ndim, e->shape, sbuf, sizeof sbuf),
                        (unsigned long long)need);
    if (span->end > data_len)
        return kd_error(KD_ERR_FORMAT,
                        "%s: tensor '%s' has data_offsets [%llu, %llu] outside the data section "
                        "(%llu bytes); the file is truncated or corrupt",
                        path, name, (unsigned long long)span->begin,
                        (unsigned long long)span->end, (unsigned long long)data_len);
    e->nbytes = (size_t)need;
    return KD_OK;
}

static kd_status kd__parse_meta(kd_st_file *f, const kd_json *m) {
    if (m->type != KD_JSON_OBJECT)
        return kd_error(KD_ERR_FORMAT, "%s: \"__metadata__\" is not an object", f->path);
    f->meta = calloc((size_t)m->count * 2 + 1, sizeof *f->meta);
    if (!f->meta) return kd_error(KD_ERR_NOMEM, "%s: out of memory", f->path);
    for (int64_t i = 0; i < m->count; i++) {
        if (m->items[i].type != KD_JSON_STRING)
            return kd_error(KD_ERR_FORMAT, "%s: \"__metadata__\" value of '%s' is not a string",
                            f->path, m->keys[i]);
        f->meta[2 * f->nmeta] = strdup(m->keys[i]);
        f->meta[2 * f->nmeta + 1] = strdup(m->items[i].string);
        f->nmeta++;
        if (!f->meta[2 * f->nmeta - 2] || !f->meta[2 * f->nmeta - 1])
            return kd_error(KD_ERR_NOMEM, "%s: out of memory", f->path);
    }
    qsort(f->meta, (size_t)f->nmeta, 2 * sizeof *f->meta, kd__cmp_meta_key);
    for (int i = 1; i < f->nmeta; i++)
        if (strcmp(f->meta[2 * i - 2], f->meta[2 * i]) == 0)
            return kd_error(KD_ERR_FORMAT, "%s: \"__metadata__\" key '%s' appears twice", f->path,
                            f->meta[2 * i]);
    return KD_OK;
}

/* Validates the parsed header against a data section of data_len bytes at
 * `data` and fills f's entries and metadata. */
static kd_status kd__load_header(kd_st_file *f, const kd_json *root, const unsigned char *data,
                                 uint64_t data_len) {
    kd_status st = KD_OK;
    kd__st_span *spans = NULL;
    int have_meta = 0;

    if (root->type != KD_JSON_OBJECT)
        return kd_error(KD_ERR_FORMAT, "%s: header is not a JSON object", f->path);
    if (root->count > INT32_MAX)
        return kd_error(KD_ERR_FORMAT, "%s: header lists too many tensors", f->path);
    f->entries = calloc((size_t)root->count + 1, sizeof *f->entries);
    f->names = calloc((size_t)root->count + 1, sizeof *f->names);
    spans = calloc((size_t)root->count + 1, sizeof *spans);
    if (!f->entries || !f->names || !spans) {
        st = kd_error(KD_ERR_NOMEM, "%s: out of memory", f->path);
        goto done;
    }
    for (int64_t i = 0; i < root->count; i++) {
        const char *key = root->keys[i];
        if (strcmp(key, "__metadata__") == 0) {
            if (have_meta) {
                st = kd_error(KD_ERR_FORMAT, "%s: \"__metadata__\" appears twice in the header",
                              f->path);
                goto done;
            }
            have_meta = 1;
            st = kd__parse_meta(f, &root->items[i]);
            if (st != KD_OK) goto done;
            continue;
        }
        kd_st_entry *e = &f->entries[f->count];
        kd__st_span *sp = &spans[f->count];
        st = kd__parse_entry(f->path, key, &root->items[i], data_len, e, sp);
        if (st != KD_OK) goto done;
        f->names[f->count] = strdup(key);
        if (!f->names[f->count]) {
            st = kd_error(KD_ERR_NOMEM, "%s: out of memory", f->path);
            goto done;
        }
        e->name = f->names[f->count];
        e->data = data + sp->begin;
        sp->index = f->count;
        f->count++;
    }

    /* Overlaps: sorted by begin, each non-empty span must start at or after
     * the furthest end seen so far. Empty tensors occupy no bytes. */
    qsort(spans, (size_t)f->count, sizeof *spans, kd__cmp_span);
    int last = -1;
    for (int i = 0; i < f->count; i++) {
        if (spans[i].begin == spans[i].end) continue;
        if (last >= 0 && spans[i].begin < spans[last].end) {
            const kd__st_span *a = &spans[last], *b = &spans[i];
            st = kd_error(KD_ERR_FORMAT,
                          "%s: tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap in the "
                          "data section",
                          f->path, f->entries[a->index].name, (unsigned long long)a->begin,
                          (unsigned long long)a->end, f->entries[b->index].name,
                          (unsigned long long)b->begin, (unsigned long long)b->end);
            goto done;
        }
        if (last < 0 || spans[i].end > spans[last].end) last = i;
    }

    qsort(f->entries, (size_t)f->count, sizeof *f->entries, kd__cmp_entry_name);
    for (int i = 1; i < f->count; i++) {
        if (strcmp(f->entries[i - 1].name, f->entries[i].name) == 0) {
            st = kd_error(KD_ERR_FORMAT, "%s: tensor name '%s' appears twice in the header",
                          f->path, f->entries[i].name);
            goto done;
        }
    }

done:
    free(spans);
    return st;
}

/* The largest end offset of the well-formed "data_offsets" in the header
 * (malformed entries are ignored here: kd__load_header rejects them). */
static uint64_t kd__header_data_end(const kd_json *root) {
    uint64_t end = 0;
    if (root->type != KD_JSON_OBJECT) return 0;
    for (int64_t i = 0; i < root->count; i++) {
        const kd_json *ov = kd_json_get(&root->items[i], "data_offsets");
        if (!ov || ov->type != KD_JSON_ARRAY || ov->count != 2) continue;
        const kd_json *x = &ov->items[1];
        if (x->type == KD_JSON_NUMBER && x->is_int && x->integer > 0 && (uint64_t)x->integer > end)
            end = (uint64_t)x->integer;
    }
    return end;
}

kd_status kd_st_open(const char *path, kd_st_file **out) {
    kd_status st = KD_OK;
    kd_st_file *f = NULL;
    kd_json *root = NULL;
    struct stat sb;
    unsigned char lenbuf[8];
    uint64_t hlen, fsize;
    size_t lead;
    int fd = -1, err;
    unsigned char *hbuf = NULL;

    *out = NULL;
    if (!path) return kd_error(KD_ERR_INVALID, "kd_st_open: NULL path");
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kd_error(KD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        st = kd_error(KD_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    if (fstat(fd, &sb) != 0) {
        st = kd_error(KD_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = kd_error(KD_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    fsize = (uint64_t)sb.st_size;
    if (fsize < 8) {
        st = kd_error(KD_ERR_FORMAT,
                      "%s: file is %llu bytes, too short for the 8-byte safetensors header "
                      "length",
                      path, (unsigned long long)fsize);
        goto fail;
    }
    err = kd__pread_all(fd, lenbuf, 8, 0);
    if (err) goto fail_read;
    hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenbuf[i];
    if (hlen > fsize - 8) {
        st = kd_error(KD_ERR_FORMAT,
                      "%s: header length %llu is larger than the rest of the file (%llu bytes); "
                      "the file is truncated or not safetensors",
                      path, (unsigned long long)hlen, (unsigned long long)(fsize - 8));
        goto fail;
    }
    if (hlen > KD__ST_MAX_HEADER) {
        st = kd_error(KD_ERR_FORMAT, "%s: header length %llu exceeds the 100 MB limit", path,
                      (unsigned long long)hlen);
        goto fail;
    }
    /* The header is read and parsed first; then only the data the tensors
     * occupy is loaded, so bytes past the last tensor (or a sparse file's
     * holes) cost nothing, and a header whose tensors need more than the
     * machine's memory is refused before anything of that size is
     * allocated. */
    hbuf = malloc((size_t)hlen + 1);
    if (!hbuf) {
        st = kd_error(KD_ERR_NOMEM, "%s: out of memory for a %llu-byte header", path,
                      (unsigned long long)hlen);
        goto fail;
    }
    err = kd__pread_all(fd, hbuf, (size_t)hlen, 8);
    if (err) goto fail_read;
    char what[64 + 4096];
    snprintf(what, sizeof what, "%s: header", path);
    st = kd_json_parse((const char *)hbuf, (size_t)hlen, what, &root);
    if (st != KD_OK) goto fail;
    uint64_t data_len = fsize - 8 - hlen, used = kd__header_data_end(root);
    if (used > data_len) used = data_len; /* kd__load_header names the tensor */
    uint64_t load = 8 + hlen + used;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if ((pages > 0 && page > 0 && load > (uint64_t)pages * (uint64_t)page) ||
        load > (uint64_t)SIZE_MAX - 128) {
        st = kd_error(KD_ERR_FORMAT,
                      "%s: its tensors need %llu bytes of memory, more than this machine has; "
                      "the file is corrupt or not meant for this machine",
                      path, (unsigned long long)load);
        goto fail;
    }

    /* Place the file so that its data section starts 64-byte aligned. */
    lead = (size_t)((64 - (8 + hlen) % 64) % 64);
    f->buf = kd_aligned_alloc(lead + (size_t)load);
    if (!f->buf) {
        st = kd_error(KD_ERR_NOMEM, "%s: out of memory loading %llu bytes", path,
                      (unsigned long long)load);
        goto fail;
    }
    memcpy(f->buf + lead, lenbuf, 8);
    memcpy(f->buf + lead + 8, hbuf, (size_t)hlen);
    free(hbuf);
    hbuf = NULL;
    err = kd__pread_all(fd, f->buf + lead + 8 + hlen, (size_t)used, (off_t)(8 + hlen));
    if (err) goto fail_read;
    close(fd);
    fd = -1;

    const unsigned char *header = f->buf + lead + 8;
    st = kd__load_header(f, root, header + hlen, data_len);
    if (st != KD_OK) goto fail;
    kd_json_free(root);
    *out = f;
    return KD_OK;

fail_read:
    if (err < 0)
        st = kd_error(KD_ERR_IO, "%s: file shrank while being read", path);
    else
        st = kd_error(KD_ERR_IO, "%s: read failed: %s", path, strerror(err));
fail:
    if (fd >= 0) close(fd);
    free(hbuf);
    kd_json_free(root);
    kd_st_close(f);
    return st;
}

void kd_st_close(kd_st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->count; i++) free(f->names[i]);
    if (f->meta)
        for (int i = 0; i < 2 * f->nmeta; i++) free(f->meta[i]);
    free(f->meta);
    free(f->names);
    free(f->entries);
    kd_aligned_free(f->buf);
    free(f->path);
    free(f);
}

int kd_st_count(const kd_st_file *f) { return f ? f->count : 0; }

const kd_st_entry *kd_st_get(const kd_st_file *f, int i) {
    if (!f || i < 0 || i >= f->count) return NULL;
    return &f->entries[i];
}

const kd_st_entry *kd_st_find(const kd_st_file *f, const char *name) {
    if (!f || !name || f->count == 0) return NULL;
    kd_st_entry key;
    key.name = name;
    return bsearch(&key, f->entries, (size_t)f->count, sizeof *f->entries, kd__cmp_entry_name);
}

const char *kd_st_meta(const kd_st_file *f, const char *key) {
    if (!f || !key || f->nmeta == 0) return NULL;
    char **hit = bsearch(&key, f->meta, (size_t)f->nmeta, 2 * sizeof *f->meta, kd__cmp_meta_key);
    return hit ? hit[1] : NULL;
}

const char *kd_st_path(const kd_st_file *f) { return f ? f->path : NULL; }

kd_status kd_st_read_into(const kd_st_file *f, const char *name, kd_tensor *dst) {
    char a[160], b[160];
    if (!f || !name || !dst) return kd_error(KD_ERR_INVALID, "kd_st_read_into: NULL argument");
    const kd_st_entry *e = kd_st_find(f, name);
    if (!e) return kd_error(KD_ERR_NOT_FOUND, "%s: no tensor '%s'", f->path, name);
    if (e->dtype != dst->dtype)
        return kd_error(KD_ERR_SHAPE, "%s: tensor '%s' has dtype %s, expected %s", f->path, name,
                        kd_dtype_name(e->dtype), kd_dtype_name(dst->dtype));
    int same = e->ndim == dst->ndim;
    for (int i = 0; same && i < e->ndim; i++) same = e->shape[i] == dst->shape[i];
    if (!same)
        return kd_error(KD_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected %s", f->path, name,
                        kd__shape_str(e->ndim, e->shape, a, sizeof a),
                        kd_shape_str(dst, b, sizeof b));
    if (dst->device != KD_DEVICE_CPU || !kd_tensor_is_contiguous(dst) ||
        (e->nbytes && !dst->data))
        return kd_error(KD_ERR_INVALID,
                        "%s: cannot read tensor '%s' into a tensor that is not a contiguous CPU "
                        "tensor with data",
                        f->path, name);
    if (e->nbytes) memcpy(dst->data, e->data, e->nbytes);
    return KD_OK;
}

/* ------------------------------------------------------------------ writer */

typedef struct {
    char *name;
    kd_dtype dtype;
    int ndim;
    int64_t shape[KD_MAX_DIMS];
    const void *data;
    size_t nbytes;
} kd__st_item;

struct kd_st_writer {
    int count, cap;
    kd__st_item *items;
    int nmeta, capmeta;
    char **meta; /* (2 * nmeta) key, value pairs */
};

kd_status kd_st_writer_init(kd_st_writer **out) {
    *out = calloc(1, sizeof **out);
    if (!*out) return kd_error(KD_ERR_NOMEM, "out of memory creating a safetensors writer");
    return KD_OK;
}

void kd_st_writer_free(kd_st_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->count; i++) free(w->items[i].name);
    for (int i = 0; i < 2 * w->nmeta; i++) free(w->meta[i]);
    free(w->items);
    free(w->meta);
    free(w);
}

kd_status kd_st_writer_add(kd_st_writer *w, const char *name, kd_dtype dt, int ndim,
                           const int64_t *shape, const void *data) {
    char sbuf[160];
    uint64_t nbytes;
    if (!w || !name) return kd_error(KD_ERR_INVALID, "kd_st_writer_add: NULL argument");
    if (!*name || strcmp(name, "__metadata__") == 0)
        return kd_error(KD_ERR_INVALID, "safetensors: invalid tensor name '%s'", name);
    if (kd_dtype_size(dt) == 0)
        return kd_error(KD_ERR_INVALID, "safetensors: tensor '%s' has unknown dtype %d", name,
                        (int)dt);
    if (ndim < 0 || ndim > KD_MAX_DIMS || (ndim > 0 && !shape))
        return kd_error(KD_ERR_INVALID, "safetensors: tensor '%s' has rank %d, outside 0..%d",
                        name, ndim, KD_MAX_DIMS);
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0)
            return kd_error(KD_ERR_INVALID, "safetensors: tensor '%s' has negative shape %s",
                            name, kd__shape_str(ndim, shape, sbuf, sizeof sbuf));
    if (!kd__nbytes(ndim, shape, kd_dtype_size(dt), &nbytes))
        return kd_error(KD_ERR_INVALID, "safetensors: tensor '%s' shape %s is too large", name,
                        kd__shape_str(ndim, shape, sbuf, sizeof sbuf));
    if (nbytes && !data)
        return kd_error(KD_ERR_INVALID, "safetensors: tensor '%s' has no data", name);
    for (int i = 0; i < w->count; i++)
        if (strcmp(w->items[i].name, name) == 0)
            return kd_error(KD_ERR_INVALID, "safetensors: tensor '%s' added twice", name);
    if (w->count == w->cap) {
        int ncap = w->cap ? w->cap * 2 : 16;
        kd__st_item *items = realloc(w->items, (size_t)ncap * sizeof *items);
        if (!items) return kd_error(KD_ERR_NOMEM, "out of memory adding tensor '%s'", name);
        w->items = items;
        w->cap = ncap;
    }
    kd__st_item *it = &w->items[w->count];
    memset(it, 0, sizeof *it);
    it->name = strdup(name);
    if (!it->name) return kd_error(KD_ERR_NOMEM, "out of memory adding tensor '%s'", name);
    it->dtype = dt;
    it->ndim = ndim;
    for (int i = 0; i < ndim; i++) it->shape[i] = shape[i];
    it->data = data;
    it->nbytes = (size_t)nbytes;
    w->count++;
    return KD_OK;
}

kd_status kd_st_writer_add_tensor(kd_st_writer *w, const char *name, const kd_tensor *t) {
    if (!t) return kd_error(KD_ERR_INVALID, "kd_st_writer_add_tensor: NULL tensor '%s'", name);
    if (t->device != KD_DEVICE_CPU || !kd_tensor_is_contiguous(t))
        return kd_error(KD_ERR_INVALID,
                        "safetensors: tensor '%s' must be a contiguous CPU tensor to be saved",
                        name ? name : "(null)");
    return kd_st_writer_add(w, name, t->dtype, t->ndim, t->shape, t->data);
}

kd_status kd_st_writer_set_meta(kd_st_writer *w, const char *key, const char *value) {
    if (!w || !key || !value) return kd_error(KD_ERR_INVALID, "kd_st_writer_set_meta: NULL argument");
    char *v = strdup(value);
    if (!v) return kd_error(KD_ERR_NOMEM, "out of memory setting metadata '%s'", key);
    for (int i = 0; i < w->nmeta; i++) {
        if (strcmp(w->meta[2 * i], key) == 0) {
            free(w->meta[2 * i + 1]);
            w->meta[2 * i + 1] = v;
            return KD_OK;
        }
    }
    if (w->nmeta == w->capmeta) {
        int ncap = w->capmeta ? w->capmeta * 2 : 8;
        char **m = realloc(w->meta, (size_t)ncap * 2 * sizeof *m);
        if (!m) goto nomem;
        w->meta = m;
        w->capmeta = ncap;
    }
    char *k = strdup(key);
    if (!k) goto nomem;
    w->meta[2 * w->nmeta] = k;
    w->meta[2 * w->nmeta + 1] = v;
    w->nmeta++;
    return KD_OK;

nomem:
    free(v);
    return kd_error(KD_ERR_NOMEM, "out of memory setting metadata '%s'", key);
}

static int kd__cmp_item(const void *a, const void *b) {
    const kd__st_item *x = *(const kd__st_item *const *)a, *y = *(const kd__st_item *const *)b;
    int rx = kd__dtype_rank(x->dtype), ry = kd__dtype_rank(y->dtype);
    if (rx != ry) return ry - rx;
    return strcmp(x->name, y->name);
}

kd_status kd_st_writer_save(kd_st_writer *w, const char *path) {
    kd_status st = KD_OK;
    kd__st_item **order = NULL;
    char **meta = NULL;
    kd_file_part *parts = NULL;
    char *header = NULL;
    size_t hsize = 0;
    FILE *hf = NULL;
    unsigned char lenbuf[8];

    if (!w || !path) return kd_error(KD_ERR_INVALID, "kd_st_writer_save: NULL argument");
    order = malloc(((size_t)w->count + 1) * sizeof *order);
    meta = malloc(((size_t)w->nmeta + 1) * 2 * sizeof *meta);
    parts = malloc(((size_t)w->count + 2) * sizeof *parts);
    if (!order || !meta || !parts) goto nomem;
    for (int i = 0; i < w->count; i++) order[i] = &w->items[i];
    qsort(order, (size_t)w->count, sizeof *order, kd__cmp_item);
    if (w->nmeta) memcpy(meta, w->meta, (size_t)w->nmeta * 2 * sizeof *meta);
    if (w->nmeta) qsort(meta, (size_t)w->nmeta, 2 * sizeof *meta, kd__cmp_meta_key);

    hf = open_memstream(&header, &hsize);
    if (!hf) goto nomem;
    fputc('{', hf);
    if (w->nmeta) {
        fputs("\"__metadata__\":{", hf);
        for (int i = 0; i < w->nmeta; i++) {
            if (i) fputc(',', hf);
            kd_json_write_string(hf, meta[2 * i]);
            fputc(':', hf);
            kd_json_write_string(hf, meta[2 * i + 1]);
        }
        fputc('}', hf);
    }
    uint64_t offset = 0;
    for (int i = 0; i < w->count; i++) {
        const kd__st_item *it = order[i];
        if (i || w->nmeta) fputc(',', hf);
        kd_json_write_string(hf, it->name);
        fprintf(hf, ":{\"dtype\":\"%s\",\"shape\":[", kd_dtype_name(it->dtype));
        for (int d = 0; d < it->ndim; d++)
            fprintf(hf, d ? ",%lld" : "%lld", (long long)it->shape[d]);
        fprintf(hf, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset,
                (unsigned long long)(offset + it->nbytes));
        offset += it->nbytes;
        parts[i + 2].data = it->data;
        parts[i + 2].n = it->nbytes;
    }
    fputc('}', hf);
    /* Pad with spaces so that the data section starts 8-byte aligned. */
    long pos = ftell(hf);
    if (pos < 0) goto nomem;
    for (long pad = (8 - pos % 8) % 8; pad > 0; pad--) fputc(' ', hf);
    if (fclose(hf) != 0) {
        hf = NULL;
        goto nomem;
    }
    hf = NULL;

    for (int i = 0; i < 8; i++) lenbuf[i] = (unsigned char)((uint64_t)hsize >> (8 * i));
    parts[0].data = lenbuf;
    parts[0].n = 8;
    parts[1].data = header;
    parts[1].n = hsize;
    st = kd_file_write_atomic_parts(path, parts, w->count + 2);
    goto done;

nomem:
    st = kd_error(KD_ERR_NOMEM, "%s: out of memory building the safetensors header", path);
done:
    if (hf) fclose(hf);
    free(header);
    free(parts);
    free(meta);
    free(order);
    return st;
}
