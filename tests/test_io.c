/*
 * Tests for the io layer: safetensors round trips and byte-exact layout
 * against bytes derived by hand from the format specification, every
 * corruption that kd_st_open must reject (status and a message naming the
 * file), shape checks of kd_st_read_into, crash-safe file replacement under
 * failing renames and writes, and the JSON parser and writers.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kd/io.h"
#include "testutil.h"

static char g_dir[1024];

static int setup_dir(void **state) {
    (void)state;
    snprintf(g_dir, sizeof g_dir, "%s", kd_test_tmpdir("io"));
    return 0;
}

/* A path under the scratch directory; the buffer is one of a few rotating
 * static ones so that a test can hold several at once. */
static const char *tpath(const char *name) {
    static char bufs[4][1200];
    static int k;
    char *b = bufs[k++ % 4];
    snprintf(b, sizeof bufs[0], "%s/%s", g_dir, name);
    return b;
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* Writes a safetensors file from a header string (length prefix = its exact
 * length, no padding) and a data section. */
static void write_st_raw(const char *path, const char *header, const void *data, size_t ndata) {
    size_t hl = strlen(header);
    unsigned char *buf = malloc(8 + hl + ndata + 1);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (ndata) memcpy(buf + 8 + hl, data, ndata);
    write_bytes(path, buf, 8 + hl + ndata);
    free(buf);
}

static char *read_text(const char *path, size_t *n) {
    void *d = NULL;
    KD_ASSERT_OK(kd_file_read_all(path, &d, n));
    return d;
}

/* Number of entries in dir, and whether any is a leftover temporary file. */
static int count_dir(const char *dir, int *tmp_left) {
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    *tmp_left = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        n++;
        if (strstr(e->d_name, ".tmp.")) *tmp_left = 1;
    }
    closedir(d);
    return n;
}

static void assert_msg_has(const char *needle) {
    const char *msg = kd_last_error();
    if (!strstr(msg, needle)) fail_msg("error message \"%s\" lacks \"%s\"", msg, needle);
}

/* ------------------------------------------------------------- round trip */

static void test_roundtrip_dtypes(void **state) {
    (void)state;
    const char *path = tpath("rt.safetensors");
    float w[6] = {1.5f, -2.25f, 3.0f, 0.0f, -0.0f, 1e-30f};
    uint16_t bf[4] = {0x3f80, 0xbf80, 0x7f80, 0x0001};
    uint16_t hf[4] = {0x3c00, 0xc000, 0x7bff, 0x0400};
    int64_t scalar = -1234567890123LL;
    int32_t i32[6] = {1, -2, 3, -4, 2147483647, -2147483647 - 1};
    uint8_t u8[5] = {0, 1, 127, 128, 255};
    float six[8];
    for (int i = 0; i < 8; i++) six[i] = (float)i * 0.5f;
    int64_t s_w[2] = {2, 3}, s_4[1] = {4}, s_hf[2] = {2, 2}, s_i32[3] = {3, 1, 2}, s_u8[1] = {5};
    int64_t s_empty[2] = {0, 4}, s_six[6] = {1, 2, 1, 2, 1, 2};

    kd_st_writer *wr;
    KD_ASSERT_OK(kd_st_writer_init(&wr));
    KD_ASSERT_OK(kd_st_writer_add(wr, "fc.weight", KD_F32, 2, s_w, w));
    KD_ASSERT_OK(kd_st_writer_add(wr, "emb.bf16", KD_BF16, 1, s_4, bf));
    KD_ASSERT_OK(kd_st_writer_add(wr, "half", KD_F16, 2, s_hf, hf));
    KD_ASSERT_OK(kd_st_writer_add(wr, "bn.num_batches_tracked", KD_I64, 0, NULL, &scalar));
    KD_ASSERT_OK(kd_st_writer_add(wr, "idx", KD_I32, 3, s_i32, i32));
    KD_ASSERT_OK(kd_st_writer_add(wr, "bytes", KD_U8, 1, s_u8, u8));
    KD_ASSERT_OK(kd_st_writer_add(wr, "empty", KD_F32, 2, s_empty, NULL));
    KD_ASSERT_OK(kd_st_writer_add(wr, "six.d", KD_F32, 6, s_six, six));
    KD_ASSERT_OK(kd_st_writer_set_meta(wr, "arch", "resnet8"));
    KD_ASSERT_OK(kd_st_writer_set_meta(wr, "note", "quote \" backslash \\ tab \t newline \n"));
    KD_ASSERT_OK(kd_st_writer_set_meta(wr, "arch", "resnet8x4")); /* replaces */
    /* Invalid additions are refused and leave the writer usable. */
    assert_int_equal(kd_st_writer_add(wr, "idx", KD_I32, 3, s_i32, i32), KD_ERR_INVALID);
    assert_int_equal(kd_st_writer_add(wr, "__metadata__", KD_U8, 1, s_u8, u8), KD_ERR_INVALID);
    int64_t s7[7] = {1, 1, 1, 1, 1, 1, 1};
    assert_int_equal(kd_st_writer_add(wr, "seven", KD_U8, 7, s7, u8), KD_ERR_INVALID);
    KD_ASSERT_OK(kd_st_writer_save(wr, path));
    kd_st_writer_free(wr);

    kd_st_file *f;
    KD_ASSERT_OK(kd_st_open(path, &f));
    assert_string_equal(kd_st_path(f), path);
    assert_int_equal(kd_st_count(f), 8);
    for (int i = 1; i < kd_st_count(f); i++)
        assert_true(strcmp(kd_st_get(f, i - 1)->name, kd_st_get(f, i)->name) < 0);
    assert_null(kd_st_get(f, 8));
    assert_string_equal(kd_st_meta(f, "arch"), "resnet8x4");
    assert_string_equal(kd_st_meta(f, "note"), "quote \" backslash \\ tab \t newline \n");
    assert_null(kd_st_meta(f, "missing"));

    struct {
        const char *name;
        kd_dtype dt;
        int ndim;
        const int64_t *shape;
        const void *data;
        size_t nbytes;
    } want[] = {
        {"fc.weight", KD_F32, 2, s_w, w, sizeof w},
        {"emb.bf16", KD_BF16, 1, s_4, bf, sizeof bf},
        {"half", KD_F16, 2, s_hf, hf, sizeof hf},
        {"bn.num_batches_tracked", KD_I64, 0, NULL, &scalar, sizeof scalar},
        {"idx", KD_I32, 3, s_i32, i32, sizeof i32},
        {"bytes", KD_U8, 1, s_u8, u8, sizeof u8},
        {"empty", KD_F32, 2, s_empty, NULL, 0},
        {"six.d", KD_F32, 6, s_six, six, sizeof six},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const kd_st_entry *e = kd_st_find(f, want[i].name);
        if (!e) fail_msg("tensor %s missing", want[i].name);
        assert_int_equal(e->dtype, want[i].dt);
        assert_int_equal(e->ndim, want[i].ndim);
        for (int d = 0; d < e->ndim; d++) assert_int_equal(e->shape[d], want[i].shape[d]);
        assert_int_equal(e->nbytes, want[i].nbytes);
        if (e->nbytes) assert_memory_equal(e->data, want[i].data, e->nbytes);
        /* Data is aligned to its element size in memory (64-byte base). */
        assert_int_equal((uintptr_t)e->data % kd_dtype_size(e->dtype), 0);
    }
    assert_null(kd_st_find(f, "nope"));

    /* kd_st_read_into with matching tensors, the 0-d scalar included. */
    kd_tensor *t;
    KD_ASSERT_OK(kd_tensor_new(KD_F32, 2, s_w, &t));
    KD_ASSERT_OK(kd_st_read_into(f, "fc.weight", t));
    KD_ASSERT_CLOSE(kd_f32(t), w, 6, 0, 0, "fc.weight");
    kd_tensor_free(t);
    KD_ASSERT_OK(kd_tensor_new(KD_I64, 0, NULL, &t));
    KD_ASSERT_OK(kd_st_read_into(f, "bn.num_batches_tracked", t));
    assert_int_equal(*(int64_t *)t->data, scalar);
    kd_tensor_free(t);
    KD_ASSERT_OK(kd_tensor_new(KD_F32, 2, s_empty, &t));
    KD_ASSERT_OK(kd_st_read_into(f, "empty", t));
    kd_tensor_free(t);
    kd_st_close(f);

    /* Saving again over the file replaces it atomically. */
    KD_ASSERT_OK(kd_st_writer_init(&wr));
    KD_ASSERT_OK(kd_st_writer_add(wr, "only", KD_U8, 1, s_u8, u8));
    KD_ASSERT_OK(kd_st_writer_save(wr, path));
    kd_st_writer_free(wr);
    KD_ASSERT_OK(kd_st_open(path, &f));
    assert_int_equal(kd_st_count(f), 1);
    assert_null(kd_st_meta(f, "arch"));
    kd_st_close(f);
}

static void test_empty_file_roundtrip(void **state) {
    (void)state;
    const char *path = tpath("empty.safetensors");
    kd_st_writer *wr;
    KD_ASSERT_OK(kd_st_writer_init(&wr));
    KD_ASSERT_OK(kd_st_writer_save(wr, path));
    kd_st_writer_free(wr);
    /* Spec: no tensors, no metadata -> header "{}" padded to 8 bytes. */
    static const unsigned char want[] = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ',
                                         ' ', ' ', ' ', ' '};
    size_t n;
    char *got = read_text(path, &n);
    assert_int_equal(n, sizeof want);
    assert_memory_equal(got, want, sizeof want);
    free(got);
    kd_st_file *f;
    KD_ASSERT_OK(kd_st_open(path, &f));
    assert_int_equal(kd_st_count(f), 0);
    kd_st_close(f);
}

/* ------------------------------------------------------------- byte exact */

/* One F32 tensor of shape (1, 1, 2, 3) holding 0..5. The compact header is 65
 * bytes, so 7 spaces pad it to 72 = 0x48; the data follows at offsets [0, 24). */
static void test_byte_exact_single(void **state) {
    (void)state;
    const char *path = tpath("attn0.safetensors");
    float v[6] = {0, 1, 2, 3, 4, 5};
    int64_t shape[4] = {1, 1, 2, 3};
    kd_st_writer *wr;
    KD_ASSERT_OK(kd_st_writer_init(&wr));
    KD_ASSERT_OK(kd_st_writer_add(wr, "attn0", KD_F32, 4, shape, v));
    KD_ASSERT_OK(kd_st_writer_save(wr, path));
    kd_st_writer_free(wr);

    static const char header[] =
        "{\"attn0\":{\"dtype\":\"F32\",\"shape\":[1,1,2,3],\"data_offsets\":[0,24]}}"
        "       ";
    static const unsigned char prefix[8] = {0x48, 0, 0, 0, 0, 0, 0, 0};
    /* IEEE-754 little endian: 0.0, 1.0 = 0x3f800000, 2.0 = 0x40000000,
     * 3.0 = 0x40400000, 4.0 = 0x40800000, 5.0 = 0x40a00000. */
    static const unsigned char data[24] = {0, 0, 0, 0,    0, 0, 0x80, 0x3f, 0, 0, 0,    0x40,
                                           0, 0, 0x40, 0x40, 0, 0, 0x80, 0x40, 0, 0, 0xa0, 0x40};
    assert_int_equal(sizeof header - 1, 72);
    size_t n;
    unsigned char *got = (unsigned char *)read_text(path, &n);
    assert_int_equal(n, 8 + 72 + 24);
    assert_memory_equal(got, prefix, 8);
    assert_memory_equal(got + 8, header, 72);
    assert_memory_equal(got + 80, data, 24);
    free(got);
}

/* A BatchNorm-like checkpoint as PyTorch's safetensors writes it: the I64
 * scalar num_batches_tracked (shape []), an F32 vector and a U8 vector, plus
 * metadata. Order: descending dtype alignment (I64, F32, U8), then name; the
 * header lists "__metadata__" first and tensors in offset order. The compact
 * header is 225 bytes: 7 spaces pad it to 232 = 0xe8. */
static void test_byte_exact_mixed(void **state) {
    (void)state;
    const char *path = tpath("bn.safetensors");
    int64_t nbt = 7;
    float wgt[2] = {1.0f, -2.0f};
    uint8_t masks[3] = {1, 2, 3};
    int64_t s2[1] = {2}, s3[1] = {3};
    kd_st_writer *wr;
    KD_ASSERT_OK(kd_st_writer_init(&wr));
    KD_ASSERT_OK(kd_st_writer_add(wr, "masks", KD_U8, 1, s3, masks));
    KD_ASSERT_OK(kd_st_writer_add(wr, "bn.weight", KD_F32, 1, s2, wgt));
    KD_ASSERT_OK(kd_st_writer_add(wr, "bn.num_batches_tracked", KD_I64, 0, NULL, &nbt));
    KD_ASSERT_OK(kd_st_writer_set_meta(wr, "format", "pt"));
    KD_ASSERT_OK(kd_st_writer_save(wr, path));
    kd_st_writer_free(wr);

    static const char header[] =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"bn.num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]},"
        "\"bn.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
        "\"masks\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[16,19]}}"
        "       ";
    static const unsigned char prefix[8] = {0xe8, 0, 0, 0, 0, 0, 0, 0};
    static const unsigned char data[19] = {7,    0, 0, 0, 0,    0, 0, 0,    /* I64 7 */
                                           0,    0, 0x80, 0x3f,           /* 1.0f */
                                           0,    0, 0, 0xc0,              /* -2.0f */
                                           1,    2, 3};
    assert_int_equal(sizeof header - 1, 232);
    size_t n;
    unsigned char *got = (unsigned char *)read_text(path, &n);
    assert_int_equal(n, 8 + 232 + 19);
    assert_memory_equal(got, prefix, 8);
    if (memcmp(got + 8, header, 232) != 0) fail_msg("header differs:\n%.232s\n%s", got + 8, header);
    assert_memory_equal(got + 8 + 232, data, 19);
    free(got);

    kd_st_file *f;
    KD_ASSERT_OK(kd_st_open(path, &f));
    const kd_st_entry *e = kd_st_find(f, "bn.num_batches_tracked");
    assert_non_null(e);
    assert_int_equal(e->dtype, KD_I64);
    assert_int_equal(e->ndim, 0);
    assert_int_equal(*(const int64_t *)e->data, 7);
    assert_string_equal(kd_st_meta(f, "format"), "pt");
    kd_st_close(f);
}

/* Files from other writers: header entries in any order, extra fields and
 * whitespace, tensors not sorted by name in the data section. */
static void test_foreign_layout(void **state) {
    (void)state;
    const char *path = tpath("foreign.safetensors");
    float d[3] = {1, 2, 3};
    write_st_raw(path,
                 " { \"b\" : {\"shape\":[1],\"dtype\":\"F32\",\"data_offsets\":[0,4],\"x\":null},\n"
                 "   \"a\": {\"data_offsets\":[4,12],\"dtype\":\"F32\",\"shape\":[2]},\n"
                 "   \"__metadata__\": {\"k\": \"caf\\u00e9\"} }  ",
                 d, sizeof d);
    kd_st_file *f;
    KD_ASSERT_OK(kd_st_open(path, &f));
    assert_int_equal(kd_st_count(f), 2);
    assert_string_equal(kd_st_get(f, 0)->name, "a");
    assert_int_equal(((const float *)kd_st_find(f, "a")->data)[1], 3);
    assert_int_equal(((const float *)kd_st_find(f, "b")->data)[0], 1);
    assert_string_equal(kd_st_meta(f, "k"), "caf\xc3\xa9");
    kd_st_close(f);
}

/* ------------------------------------------------------------- corruption */

/* kd_st_open must fail with `want` and a message that names the file and
 * contains `needle`, and leave *out NULL. */
static void expect_open_fail(const char *path, kd_status want, const char *needle) {
    kd_st_file *f = (kd_st_file *)&f; /* must be reset to NULL */
    kd_clear_error();
    kd_status st = kd_st_open(path, &f);
    if (st != want)
        fail_msg("%s: got %s (%s), want %s", path, kd_status_str(st), kd_last_error(),
                 kd_status_str(want));
    assert_null(f);
    assert_msg_has(path);
    assert_msg_has(needle);
}

static void test_corrupt_files(void **state) {
    (void)state;
    float d[4] = {1, 2, 3, 4};
    char buf[256];

    const char *p = tpath("missing.safetensors");
    snprintf(buf, sizeof buf, "%s", strerror(ENOENT));
    expect_open_fail(p, KD_ERR_IO, buf);

    p = tpath("short.safetensors");
    write_bytes(p, "\x10\0\0\0\0", 5);
    expect_open_fail(p, KD_ERR_FORMAT, "too short");

    p = tpath("hlen.safetensors");
    unsigned char big[18] = {0xe8, 0x03, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_bytes(p, big, sizeof big);
    expect_open_fail(p, KD_ERR_FORMAT, "header length 1000 is larger");

    p = tpath("hlen_huge.safetensors");
    unsigned char huge[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, '{', '}'};
    write_bytes(p, huge, sizeof huge);
    expect_open_fail(p, KD_ERR_FORMAT, "larger than the rest of the file");

    p = tpath("json.safetensors");
    write_st_raw(p, "{\"a\":{\"dtype\":\"F32\" \"shape\":[1],\"data_offsets\":[0,4]}}", d, 4);
    expect_open_fail(p, KD_ERR_FORMAT, "malformed JSON at byte 20");

    p = tpath("json_trunc.safetensors");
    write_st_raw(p, "{\"a\":{\"dtype\":\"F3", NULL, 0);
    expect_open_fail(p, KD_ERR_FORMAT, "unterminated string");

    p = tpath("notobj.safetensors");
    write_st_raw(p, "[1, 2]", NULL, 0);
    expect_open_fail(p, KD_ERR_FORMAT, "not a JSON object");

    p = tpath("f64.safetensors");
    write_st_raw(p, "{\"fc.weight\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]}}", d,
                 16);
    expect_open_fail(p, KD_ERR_UNSUPPORTED, "tensor 'fc.weight' has dtype F64");

    p = tpath("bool.safetensors");
    write_st_raw(p, "{\"m\":{\"dtype\":\"BOOL\",\"shape\":[2],\"data_offsets\":[0,2]}}", d, 2);
    expect_open_fail(p, KD_ERR_UNSUPPORTED, "dtype BOOL");

    p = tpath("xyz.safetensors");
    write_st_raw(p, "{\"w\":{\"dtype\":\"XYZ\",\"shape\":[1],\"data_offsets\":[0,4]}}", d, 4);
    expect_open_fail(p, KD_ERR_FORMAT, "unknown dtype \"XYZ\"");

    p = tpath("nodtype.safetensors");
    write_st_raw(p, "{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", d, 4);
    expect_open_fail(p, KD_ERR_FORMAT, "'w' has no \"dtype\"");

    p = tpath("mismatch.safetensors");
    write_st_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,16]}}", d, 16);
    expect_open_fail(p, KD_ERR_FORMAT, "shape (2, 3) need 24 bytes");

    p = tpath("reversed.safetensors");
    write_st_raw(p, "{\"w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,0]}}", d, 4);
    expect_open_fail(p, KD_ERR_FORMAT, "data_offsets [4, 0]");

    p = tpath("outside.safetensors");
    write_st_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", d, 12);
    expect_open_fail(p, KD_ERR_FORMAT, "outside the data section (12 bytes)");

    p = tpath("overlap.safetensors");
    write_st_raw(p,
                 "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                 d, 12);
    expect_open_fail(p, KD_ERR_FORMAT, "'a' [0, 8] and 'b' [4, 12] overlap");

    p = tpath("contained.safetensors");
    write_st_raw(p,
                 "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                 "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[4,5]},"
                 "\"c\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[8,9]}}",
                 d, 16);
    expect_open_fail(p, KD_ERR_FORMAT, "overlap");

    p = tpath("dup.safetensors");
    write_st_raw(p,
                 "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                 d, 8);
    expect_open_fail(p, KD_ERR_FORMAT, "'a' appears twice");

    p = tpath("dims.safetensors");
    write_st_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
                 d, 4);
    expect_open_fail(p, KD_ERR_UNSUPPORTED, "7 dimensions");

    p = tpath("negdim.safetensors");
    write_st_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", d, 4);
    expect_open_fail(p, KD_ERR_FORMAT, "not a non-negative integer");

    p = tpath("floatoff.safetensors");
    write_st_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4.0]}}", d, 4);
    expect_open_fail(p, KD_ERR_FORMAT, "\"data_offsets\" item 1");

    p = tpath("threeoff.safetensors");
    write_st_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", d, 8);
    expect_open_fail(p, KD_ERR_FORMAT, "must have 2 items");

    p = tpath("overflow.safetensors");
    write_st_raw(p,
                 "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
                 "\"data_offsets\":[0,4]}}",
                 d, 4);
    expect_open_fail(p, KD_ERR_FORMAT, "overflows");

    p = tpath("meta.safetensors");
    write_st_raw(p, "{\"__metadata__\":{\"epoch\":3}}", NULL, 0);
    expect_open_fail(p, KD_ERR_FORMAT, "value of 'epoch' is not a string");

    p = tpath("utf8.safetensors");
    write_st_raw(p, "{\"\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", d, 4);
    expect_open_fail(p, KD_ERR_FORMAT, "invalid UTF-8");

    /* A directory is not a safetensors file. */
    expect_open_fail(g_dir, KD_ERR_IO, "not a regular file");
}

/* Truncating a valid checkpoint anywhere is always caught. */
static void test_truncated_everywhere(void **state) {
    (void)state;
    const char *path = tpath("full.safetensors"), *cut = tpath("cut.safetensors");
    float w[10];
    int64_t shape[1] = {10};
    for (int i = 0; i < 10; i++) w[i] = (float)i;
    kd_st_writer *wr;
    KD_ASSERT_OK(kd_st_writer_init(&wr));
    KD_ASSERT_OK(kd_st_writer_add(wr, "w", KD_F32, 1, shape, w));
    KD_ASSERT_OK(kd_st_writer_save(wr, path));
    kd_st_writer_free(wr);
    size_t n;
    char *full = read_text(path, &n);
    for (size_t len = 0; len < n; len++) {
        write_bytes(cut, full, len);
        kd_st_file *f = NULL;
        kd_status st = kd_st_open(cut, &f);
        if (st != KD_ERR_FORMAT) fail_msg("length %zu: got %s", len, kd_status_str(st));
        assert_null(f);
        assert_msg_has(cut);
    }
    free(full);
}

/* ---------------------------------------------------------- read_into */

static void test_read_into_checks(void **state) {
    (void)state;
    const char *path = tpath("model.safetensors");
    float w[10 * 64];
    memset(w, 0, sizeof w);
    int64_t shape[2] = {10, 64};
    kd_st_writer *wr;
    KD_ASSERT_OK(kd_st_writer_init(&wr));
    KD_ASSERT_OK(kd_st_writer_add(wr, "fc.weight", KD_F32, 2, shape, w));
    KD_ASSERT_OK(kd_st_writer_save(wr, path));
    kd_st_writer_free(wr);

    kd_st_file *f;
    KD_ASSERT_OK(kd_st_open(path, &f));
    char want[2048];
    kd_tensor *t;

    int64_t other[2] = {100, 64};
    KD_ASSERT_OK(kd_tensor_new(KD_F32, 2, other, &t));
    assert_int_equal(kd_st_read_into(f, "fc.weight", t), KD_ERR_SHAPE);
    snprintf(want, sizeof want, "%s: tensor 'fc.weight' has shape (10, 64), expected (100, 64)",
             path);
    assert_string_equal(kd_last_error(), want);
    kd_tensor_free(t);

    int64_t flat[1] = {640};
    KD_ASSERT_OK(kd_tensor_new(KD_F32, 1, flat, &t));
    assert_int_equal(kd_st_read_into(f, "fc.weight", t), KD_ERR_SHAPE);
    assert_msg_has("has shape (10, 64), expected (640)");
    kd_tensor_free(t);

    KD_ASSERT_OK(kd_tensor_new(KD_BF16, 2, shape, &t));
    assert_int_equal(kd_st_read_into(f, "fc.weight", t), KD_ERR_SHAPE);
    snprintf(want, sizeof want, "%s: tensor 'fc.weight' has dtype F32, expected BF16", path);
    assert_string_equal(kd_last_error(), want);
    kd_tensor_free(t);

    KD_ASSERT_OK(kd_tensor_new(KD_F32, 2, shape, &t));
    assert_int_equal(kd_st_read_into(f, "fc.bias", t), KD_ERR_NOT_FOUND);
    snprintf(want, sizeof want, "%s: no tensor 'fc.bias'", path);
    assert_string_equal(kd_last_error(), want);
    /* A transposed (non-contiguous) view is refused rather than misfilled. */
    t->stride[0] = 1;
    t->stride[1] = 10;
    assert_int_equal(kd_st_read_into(f, "fc.weight", t), KD_ERR_INVALID);
    kd_tensor_free(t);
    kd_st_close(f);
}

/* ----------------------------------------------------------- atomic write */

static void expect_content(const char *path, const char *want) {
    size_t n;
    char *got = read_text(path, &n);
    assert_int_equal(n, strlen(want));
    assert_string_equal(got, want);
    free(got);
}

static void test_atomic_write_basic(void **state) {
    (void)state;
    const char *dir = tpath("atomic_basic");
    KD_ASSERT_OK(kd_mkdirs(dir));
    char path[1300];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    KD_ASSERT_OK(kd_file_write_atomic(path, "old\n", 4));
    expect_content(path, "old\n");
    KD_ASSERT_OK(kd_file_write_atomic(path, "new content\n", 12));
    expect_content(path, "new content\n");
    KD_ASSERT_OK(kd_file_write_atomic(path, NULL, 0));
    expect_content(path, "");
    kd_file_part parts[3] = {{"ab", 2}, {NULL, 0}, {"cd", 2}};
    KD_ASSERT_OK(kd_file_write_atomic_parts(path, parts, 3));
    expect_content(path, "abcd");
    int tmp_left;
    assert_int_equal(count_dir(dir, &tmp_left), 1);
    assert_false(tmp_left);
}

/* The target is a non-empty directory: the rename fails after the temp file
 * was fully written. The error names the path, the directory and its content
 * survive, and the temp file is gone. */
static void test_atomic_write_rename_fails(void **state) {
    (void)state;
    const char *dir = tpath("atomic_rename");
    char target[1300], inner[1400];
    snprintf(target, sizeof target, "%s/last.safetensors", dir);
    snprintf(inner, sizeof inner, "%s/keep", target);
    KD_ASSERT_OK(kd_mkdirs(target));
    KD_ASSERT_OK(kd_file_write_atomic(inner, "keep", 4));

    kd_clear_error();
    assert_int_equal(kd_file_write_atomic(target, "payload", 7), KD_ERR_IO);
    assert_msg_has(target);
    assert_msg_has("rename");
    expect_content(inner, "keep");
    int tmp_left;
    assert_int_equal(count_dir(dir, &tmp_left), 1);
    assert_false(tmp_left);

    /* The same through the safetensors writer. */
    kd_st_writer *wr;
    KD_ASSERT_OK(kd_st_writer_init(&wr));
    assert_int_equal(kd_st_writer_save(wr, target), KD_ERR_IO);
    kd_st_writer_free(wr);
    assert_int_equal(count_dir(dir, &tmp_left), 1);
    assert_false(tmp_left);
}

/* The temporary name is taken by a directory, so the temp file cannot be
 * created: the old file stays, and the directory in the way is not removed. */
static void test_atomic_write_create_fails(void **state) {
    (void)state;
    const char *dir = tpath("atomic_create");
    char path[1300], blocker[1400];
    snprintf(path, sizeof path, "%s/ckpt.safetensors", dir);
    snprintf(blocker, sizeof blocker, "%s.tmp.%ld", path, (long)getpid());
    KD_ASSERT_OK(kd_mkdirs(dir));
    KD_ASSERT_OK(kd_file_write_atomic(path, "old", 3));
    KD_ASSERT_OK(kd_mkdirs(blocker));
    assert_int_equal(kd_file_write_atomic(path, "new", 3), KD_ERR_IO);
    assert_msg_has(path);
    expect_content(path, "old");
    struct stat sb;
    assert_int_equal(stat(blocker, &sb), 0);
    assert_true(S_ISDIR(sb.st_mode));
    assert_int_equal(rmdir(blocker), 0);
}

/* A write that fails midway (file-size limit reached, EFBIG) in a child
 * process: the old checkpoint keeps its content and no temp file is left. */
static void test_atomic_write_midway_failure(void **state) {
    (void)state;
    const char *dir = tpath("atomic_efbig");
    char path[1300];
    snprintf(path, sizeof path, "%s/last.safetensors", dir);
    KD_ASSERT_OK(kd_mkdirs(dir));
    KD_ASSERT_OK(kd_file_write_atomic(path, "old checkpoint", 14));

    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {4096, 4096};
        if (setrlimit(RLIMIT_FSIZE, &rl) != 0) _exit(2);
        size_t n = 1 << 16;
        char *big = malloc(n);
        if (!big) _exit(3);
        memset(big, 'x', n);
        kd_status st = kd_file_write_atomic(path, big, n);
        free(big);
        int ok = st == KD_ERR_IO && strstr(kd_last_error(), path) &&
                 strstr(kd_last_error(), strerror(EFBIG));
        if (!ok) fprintf(stderr, "child: %s: %s\n", kd_status_str(st), kd_last_error());
        _exit(ok ? 0 : 1);
    }
    int ws;
    assert_int_equal(waitpid(pid, &ws, 0), pid);
    assert_true(WIFEXITED(ws));
    assert_int_equal(WEXITSTATUS(ws), 0);
    expect_content(path, "old checkpoint");
    int tmp_left;
    assert_int_equal(count_dir(dir, &tmp_left), 1);
    assert_false(tmp_left);
}

/* An unwritable directory. Root may write anyway, so as root (CI) the write
 * runs in a child that first drops to the unprivileged uid/gid 65534
 * ("nobody"); the child reports each check through its exit status. */
static int readonly_write_checks(const char *path) {
    kd_status st = kd_file_write_atomic(path, "new", 3);
    if (st != KD_ERR_IO) return 10;
    if (!strstr(kd_last_error(), path)) return 11;
    if (!strstr(kd_last_error(), strerror(EACCES))) return 12;
    return 0;
}

static void test_atomic_write_readonly_dir(void **state) {
    (void)state;
    const char *dir = tpath("atomic_ro");
    char path[1300];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    KD_ASSERT_OK(kd_mkdirs(dir));
    KD_ASSERT_OK(kd_file_write_atomic(path, "old", 3));
    assert_int_equal(chmod(dir, 0555), 0);
    int rc;
    if (geteuid() != 0) {
        rc = readonly_write_checks(path);
    } else {
        fflush(NULL);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            if (setgid(65534) != 0 || setuid(65534) != 0) _exit(20);
            if (geteuid() == 0) _exit(21);
            _exit(readonly_write_checks(path));
        }
        int ws;
        assert_int_equal(waitpid(pid, &ws, 0), pid);
        rc = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
    }
    chmod(dir, 0755);
    if (rc != 0)
        fail_msg("write into a read-only directory: check %d failed (10 status, 11 path in the "
                 "message, 12 strerror(EACCES), 20-21 dropping root)", rc);
    expect_content(path, "old");
}

/* A directory that cannot be opened for its fsync (mode 0300: files can be
 * created and renamed in it, but it cannot be opened for reading) makes
 * kd_file_write_atomic fail with KD_ERR_IO naming the directory fsync: a
 * failed directory fsync is an error, not a warning. As root the write runs
 * in a child that drops to uid/gid 65534, which owns the directory. */
static int dir_fsync_checks(const char *path) {
    kd_status st = kd_file_write_atomic(path, "new", 3);
    if (st != KD_ERR_IO) return 10;
    if (!strstr(kd_last_error(), path)) return 11;
    if (!strstr(kd_last_error(), "fsync of its directory")) return 12;
    return 0;
}

static void test_atomic_write_dir_fsync_fails(void **state) {
    (void)state;
    const char *dir = tpath("atomic_nosync");
    char path[1300];
    snprintf(path, sizeof path, "%s/last.safetensors", dir);
    KD_ASSERT_OK(kd_mkdirs(dir));
    int rc;
    if (geteuid() != 0) {
        assert_int_equal(chmod(dir, 0300), 0);
        rc = dir_fsync_checks(path);
    } else {
        assert_int_equal(chown(dir, 65534, 65534), 0);
        assert_int_equal(chmod(dir, 0300), 0);
        fflush(NULL);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            if (setgid(65534) != 0 || setuid(65534) != 0) _exit(20);
            if (geteuid() == 0) _exit(21);
            _exit(dir_fsync_checks(path));
        }
        int ws;
        assert_int_equal(waitpid(pid, &ws, 0), pid);
        rc = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
    }
    chmod(dir, 0755);
    if (rc != 0)
        fail_msg("failed directory fsync: check %d failed (10 not KD_ERR_IO, 11 path not in the "
                 "message, 12 no mention of the directory fsync, 20-21 dropping root)", rc);
    /* The file itself is complete: only its directory entry is not durable. */
    expect_content(path, "new");
}

/* -------------------------------------------------------------- fs helpers */

static void test_fs_helpers(void **state) {
    (void)state;
    const char *deep = tpath("a/b//c/d/");
    KD_ASSERT_OK(kd_mkdirs(deep));
    KD_ASSERT_OK(kd_mkdirs(deep)); /* already there */
    assert_true(kd_file_exists(deep));
    char file[1300];
    snprintf(file, sizeof file, "%s/a/b/file", g_dir);
    assert_false(kd_file_exists(file));
    KD_ASSERT_OK(kd_file_write_atomic(file, "text", 4));
    assert_true(kd_file_exists(file));

    /* A file in the way of a directory. */
    char under[1400];
    snprintf(under, sizeof under, "%s/x/y", file);
    assert_int_equal(kd_mkdirs(under), KD_ERR_IO);
    assert_msg_has(file);
    assert_int_equal(kd_mkdirs(file), KD_ERR_IO);
    assert_int_equal(kd_mkdirs(""), KD_ERR_INVALID);

    size_t n = 99;
    void *d = (void *)&n;
    KD_ASSERT_OK(kd_file_read_all(file, &d, &n));
    assert_int_equal(n, 4);
    assert_string_equal((char *)d, "text"); /* NUL-terminated */
    free(d);

    const char *missing = tpath("nope.txt");
    assert_int_equal(kd_file_read_all(missing, &d, &n), KD_ERR_IO);
    assert_null(d);
    assert_msg_has(missing);
    assert_msg_has(strerror(ENOENT));
    assert_int_equal(kd_file_read_all(g_dir, &d, &n), KD_ERR_IO);

    /* Larger than the initial guess when the size is unknown (a pipe-like
     * file reports 0): /proc/self/maps if present, else a regular file. */
    if (kd_file_exists("/proc/self/maps")) {
        KD_ASSERT_OK(kd_file_read_all("/proc/self/maps", &d, &n));
        assert_true(n > 0);
        assert_int_equal(strlen(d), n);
        free(d);
    }
}

/* ------------------------------------------------------------------ json */

static char *capture(void (*fn)(FILE *, const void *), const void *arg) {
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    assert_non_null(f);
    fn(f, arg);
    fclose(f);
    return buf;
}

static void put_string(FILE *f, const void *s) { kd_json_write_string(f, s); }
static void put_number(FILE *f, const void *v) { kd_json_write_number(f, *(const double *)v); }

static void test_json_writers(void **state) {
    (void)state;
    char *s = capture(put_string, "a\"b\\c\n\x01\x1f/caf\xc3\xa9");
    assert_string_equal(s, "\"a\\\"b\\\\c\\u000a\\u0001\\u001f/caf\xc3\xa9\"");
    free(s);
    s = capture(put_string, NULL);
    assert_string_equal(s, "null");
    free(s);

    struct {
        double v;
        const char *want;
    } cases[] = {
        {(double)0.1f, "0.100000001"}, {0.1, "0.1"}, {1.0, "1"},       {-3.0, "-3"},          {1e300, "1e+300"},
        {123456789012.0, "1.23456789e+11"},      {0.0, "0"},            {NAN, "null"},
        {INFINITY, "null"},   {-INFINITY, "null"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        s = capture(put_number, &cases[i].v);
        assert_string_equal(s, cases[i].want);
        free(s);
    }

    /* What the writers produce parses back to the same values. */
    const char *text = "{\"k\\u0001\":[0.100000001,1e+300,null]}";
    kd_json *doc;
    KD_ASSERT_OK(kd_json_parse(text, strlen(text), "t", &doc));
    assert_string_equal(doc->keys[0], "k\x01");
    assert_true(fabs(doc->items[0].items[0].number - 0.1) < 1e-9);
    kd_json_free(doc);
}

static void test_json_parser(void **state) {
    (void)state;
    const char *text = " {\"a\": [1, -2, 3.5e1, true, false, null, {}, []],\n"
                       "  \"s\": \"x\\u00e9\\ud83d\\ude00\\n\\/\", \"a\": 0,"
                       "  \"big\": 9223372036854775807, \"min\": -9223372036854775808,"
                       "  \"over\": 9223372036854775808 } ";
    kd_json *doc;
    KD_ASSERT_OK(kd_json_parse(text, strlen(text), "doc", &doc));
    assert_int_equal(doc->type, KD_JSON_OBJECT);
    assert_int_equal(doc->count, 6); /* duplicates kept */
    const kd_json *a = kd_json_get(doc, "a");
    assert_int_equal(a->type, KD_JSON_ARRAY); /* the first "a" */
    assert_int_equal(a->count, 8);
    assert_true(a->items[0].is_int);
    assert_int_equal(a->items[1].integer, -2);
    assert_false(a->items[2].is_int);
    assert_true(a->items[2].number == 35.0);
    assert_int_equal(a->items[3].type, KD_JSON_TRUE);
    assert_int_equal(a->items[4].type, KD_JSON_FALSE);
    assert_int_equal(a->items[5].type, KD_JSON_NULL);
    assert_int_equal(a->items[6].type, KD_JSON_OBJECT);
    assert_int_equal(a->items[7].count, 0);
    assert_string_equal(kd_json_get(doc, "s")->string, "x\xc3\xa9\xf0\x9f\x98\x80\n/");
    assert_true(kd_json_get(doc, "big")->is_int);
    assert_true(kd_json_get(doc, "big")->integer == INT64_MAX);
    assert_true(kd_json_get(doc, "min")->integer == INT64_MIN);
    assert_false(kd_json_get(doc, "over")->is_int);
    assert_null(kd_json_get(doc, "zzz"));
    assert_null(kd_json_get(a, "a"));
    kd_json_free(doc);

    /* Only n bytes are read: the text need not be NUL-terminated. */
    KD_ASSERT_OK(kd_json_parse("[1]xyz", 3, "prefix", &doc));
    kd_json_free(doc);

    struct {
        const char *text;
        const char *needle;
    } bad[] = {
        {"", "byte 0 (line 1, column 1): unexpected end of input"},
        {"{\"a\":1,}", "byte 7 (line 1, column 8): expected a string key"},
        {"[1 2]", "expected ',' or ']'"},
        {"{\"a\" 1}", "expected ':'"},
        {"\n\n  tru", "line 3, column 3"},
        {"01", "unexpected data after"},
        {"1.", "decimal point"},
        {"-", "expected a digit"},
        {"1e+", "exponent"},
        {"\"a\\x\"", "invalid escape"},
        {"\"\\u00zz\"", "invalid escape"},
        {"\"\\ud800\"", "surrogate"},
        {"\"\\udc00x\"", "surrogate"},
        {"\"\\u0000\"", "\\u0000"},
        {"\"tab\there\"", "control character"},
        {"\"\xc0\xaf\"", "invalid UTF-8"},
        {"\"\xed\xa0\x80\"", "invalid UTF-8"},
        {"[1] [2]", "unexpected data"},
        {"nul", "expected a value"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        doc = (kd_json *)&doc;
        kd_status st = kd_json_parse(bad[i].text, strlen(bad[i].text), "cfg.json", &doc);
        if (st != KD_ERR_FORMAT) fail_msg("'%s' parsed", bad[i].text);
        assert_null(doc);
        assert_msg_has("cfg.json: malformed JSON at byte ");
        assert_msg_has(bad[i].needle);
    }

    /* Nesting is bounded, so hostile input cannot exhaust the stack. */
    char deep[1001];
    memset(deep, '[', 1000);
    deep[1000] = '\0';
    assert_int_equal(kd_json_parse(deep, 1000, "deep", &doc), KD_ERR_FORMAT);
    assert_msg_has("nesting too deep");
    memset(deep, '[', 100);
    memset(deep + 100, ']', 100);
    KD_ASSERT_OK(kd_json_parse(deep, 200, "ok", &doc));
    kd_json_free(doc);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_dtypes),
        cmocka_unit_test(test_empty_file_roundtrip),
        cmocka_unit_test(test_byte_exact_single),
        cmocka_unit_test(test_byte_exact_mixed),
        cmocka_unit_test(test_foreign_layout),
        cmocka_unit_test(test_corrupt_files),
        cmocka_unit_test(test_truncated_everywhere),
        cmocka_unit_test(test_read_into_checks),
        cmocka_unit_test(test_atomic_write_basic),
        cmocka_unit_test(test_atomic_write_rename_fails),
        cmocka_unit_test(test_atomic_write_create_fails),
        cmocka_unit_test(test_atomic_write_midway_failure),
        cmocka_unit_test(test_atomic_write_readonly_dir),
        cmocka_unit_test(test_atomic_write_dir_fsync_fails),
        cmocka_unit_test(test_fs_helpers),
        cmocka_unit_test(test_json_writers),
        cmocka_unit_test(test_json_parser),
    };
    return cmocka_run_group_tests(tests, setup_dir, NULL);
}
