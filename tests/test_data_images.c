/* Tests of the image datasets: PNG (every colour type the decoder converts)
 * and JPEG decoding against the pixels written with libpng / libjpeg, the
 * resampler and Resize + CenterCrop, ImageFolder class and file order,
 * unlabeled folders, file lists, STL-10 binaries (layout, labels, lazy
 * reads, subsets), every bad-input case (truncated, corrupt, not an image,
 * missing, a directory, empty class, wrong record size) with the message
 * naming the file, skip-and-count with deterministic substitution, the
 * geometry hook, and bit-identical batches for any number of workers. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h>
#include <png.h>

#include "kd/data.h"

/* ----------------------------------------------------------------- helpers */

static char *tmpdir(const char *tag) {
    static char buf[16][1024];
    static int k;
    char *p = buf[k++ % 16];
    snprintf(p, 1024, "%s", kd_test_tmpdir(tag));
    return p;
}

static void mkdir_p(const char *path) {
    char cmd[2200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", path);
    assert_int_equal(system(cmd), 0);
}

static void write_bytes(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(fwrite(b, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static uint8_t *read_bytes(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*n + 1);
    assert_int_equal(fread(b, 1, *n, f), *n);
    fclose(f);
    return b;
}

/* Smooth synthetic RGB (3, h, w) image number `id` (JPEG-friendly). */
static uint8_t *smooth_rgb(int h, int w, int id) {
    uint8_t *p = malloc((size_t)3 * h * w);
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) {
                double v = 128 + 100 * sin(0.11 * (x + 3 * c) + 0.07 * id) * cos(0.09 * (y - c) + 0.05 * id);
                p[((size_t)c * h + y) * w + x] = (uint8_t)lround(v);
            }
    return p;
}

/* Arbitrary (non-smooth) pixels: misplaced bytes are caught. */
static uint8_t *busy_rgb(int h, int w, int id) {
    uint8_t *p = malloc((size_t)3 * h * w);
    for (size_t j = 0; j < (size_t)3 * h * w; j++) p[j] = (uint8_t)((j * 131 + id * 29 + (j * j) % 7) & 255);
    return p;
}

/* PNG variants: how the pixels are stored, and what kd must return. */
typedef enum { P_RGB8, P_RGB16, P_GRAY8, P_GRAY16, P_GRAY4, P_GA8, P_RGBA8, P_PALETTE, P_RGB8_ADAM7 } png_kind;

/* Writes rgb (3, h, w) as a PNG of `kind`; *want gets the (3, h, w) pixels a
 * correct RGB 8-bit decoder returns. */
static void write_png(const char *path, const uint8_t *rgb, int h, int w, png_kind kind, uint8_t *want) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    assert_non_null(png);
    assert_non_null(info);
    if (setjmp(png_jmpbuf(png))) fail_msg("libpng error writing %s", path);
    png_init_io(png, f);
    int ct = PNG_COLOR_TYPE_RGB, depth = 8, spp = 3, interlace = PNG_INTERLACE_NONE;
    switch (kind) {
    case P_RGB16: depth = 16; break;
    case P_GRAY8: ct = PNG_COLOR_TYPE_GRAY, spp = 1; break;
    case P_GRAY16: ct = PNG_COLOR_TYPE_GRAY, spp = 1, depth = 16; break;
    case P_GRAY4: ct = PNG_COLOR_TYPE_GRAY, spp = 1, depth = 4; break;
    case P_GA8: ct = PNG_COLOR_TYPE_GRAY_ALPHA, spp = 2; break;
    case P_RGBA8: ct = PNG_COLOR_TYPE_RGBA, spp = 4; break;
    case P_PALETTE: ct = PNG_COLOR_TYPE_PALETTE, spp = 1; break;
    case P_RGB8_ADAM7: interlace = PNG_INTERLACE_ADAM7; break;
    default: break;
    }
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, depth, ct, interlace, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    png_color pal[16];
    png_byte trns[16];
    if (kind == P_PALETTE) {
        for (int i = 0; i < 16; i++) {
            pal[i] = (png_color){(png_byte)(i * 16), (png_byte)(255 - i * 9), (png_byte)(i * i)};
            trns[i] = (png_byte)(i * 17);
        }
        png_set_PLTE(png, info, pal, 16);
        png_set_tRNS(png, info, trns, 16, NULL);
    }
    png_write_info(png, info);
    size_t plane = (size_t)h * w;
    size_t rowbytes = (size_t)w * spp * (depth == 16 ? 2 : 1);
    uint8_t *img = calloc((size_t)h, rowbytes);
    png_bytep *rows = malloc((size_t)h * sizeof *rows);
    for (int y = 0; y < h; y++) {
        rows[y] = img + (size_t)y * rowbytes;
        for (int x = 0; x < w; x++) {
            size_t o = (size_t)y * w + x;
            uint8_t r = rgb[o], g = rgb[plane + o], b = rgb[2 * plane + o], lo = (uint8_t)(x * 7 + y);
            uint8_t wr = r, wg = g, wb = b;
            uint8_t *p = rows[y];
            switch (kind) {
            case P_RGB8:
            case P_RGB8_ADAM7: p[3 * x] = r, p[3 * x + 1] = g, p[3 * x + 2] = b; break;
            case P_RGB16:
                p[6 * x] = r, p[6 * x + 1] = lo, p[6 * x + 2] = g, p[6 * x + 3] = lo, p[6 * x + 4] = b, p[6 * x + 5] = lo;
                break;
            case P_GRAY8: p[x] = r, wg = wb = r; break;
            case P_GRAY16: p[2 * x] = r, p[2 * x + 1] = lo, wg = wb = r; break;
            case P_GRAY4: {
                uint8_t v = r >> 4;
                p[x / 2] |= (uint8_t)(x % 2 ? v : v << 4);
                wr = wg = wb = (uint8_t)(v * 17);
                break;
            }
            case P_GA8: p[2 * x] = r, p[2 * x + 1] = b, wg = wb = r; break;
            case P_RGBA8: p[4 * x] = r, p[4 * x + 1] = g, p[4 * x + 2] = b, p[4 * x + 3] = lo; break;
            case P_PALETTE: {
                int i = (r + g) % 16;
                p[x] = (uint8_t)i;
                wr = pal[i].red, wg = pal[i].green, wb = pal[i].blue;
                break;
            }
            }
            want[o] = wr, want[plane + o] = wg, want[2 * plane + o] = wb;
        }
    }
    if (interlace == PNG_INTERLACE_ADAM7) png_set_interlace_handling(png);
    png_write_image(png, rows);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    fclose(f);
    free(rows);
    free(img);
}

static void write_png_rgb(const char *path, const uint8_t *rgb, int h, int w) {
    uint8_t *want = malloc((size_t)3 * h * w);
    write_png(path, rgb, h, w, P_RGB8, want);
    free(want);
}

/* Writes rgb (3, h, w) as a baseline JPEG (gray: the first channel only). */
static void write_jpeg(const char *path, const uint8_t *rgb, int h, int w, int gray, int quality) {
    struct jpeg_compress_struct ci;
    struct jpeg_error_mgr jerr;
    ci.err = jpeg_std_error(&jerr);
    jpeg_create_compress(&ci);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    jpeg_stdio_dest(&ci, f);
    ci.image_width = (JDIMENSION)w;
    ci.image_height = (JDIMENSION)h;
    ci.input_components = gray ? 1 : 3;
    ci.in_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_set_defaults(&ci);
    jpeg_set_quality(&ci, quality, TRUE);
    jpeg_start_compress(&ci, TRUE);
    uint8_t *row = malloc((size_t)w * 3);
    size_t plane = (size_t)h * w;
    while (ci.next_scanline < ci.image_height) {
        size_t y = ci.next_scanline;
        for (int x = 0; x < w; x++)
            for (int c = 0; c < (gray ? 1 : 3); c++) row[x * (gray ? 1 : 3) + c] = rgb[c * plane + y * w + x];
        JSAMPROW rp = row;
        jpeg_write_scanlines(&ci, &rp, 1);
    }
    jpeg_finish_compress(&ci);
    jpeg_destroy_compress(&ci);
    fclose(f);
    free(row);
}

/* An independent decode with libjpeg's defaults to RGB, as (3, h, w). */
static uint8_t *ref_jpeg_decode(const char *path, int *h, int *w) {
    struct jpeg_decompress_struct ci;
    struct jpeg_error_mgr jerr;
    ci.err = jpeg_std_error(&jerr);
    jpeg_create_decompress(&ci);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    jpeg_stdio_src(&ci, f);
    jpeg_read_header(&ci, TRUE);
    ci.out_color_space = JCS_RGB;
    jpeg_start_decompress(&ci);
    *h = (int)ci.output_height;
    *w = (int)ci.output_width;
    size_t plane = (size_t)*h * *w;
    uint8_t *out = malloc(3 * plane), *row = malloc((size_t)*w * 3);
    while (ci.output_scanline < ci.output_height) {
        size_t y = ci.output_scanline;
        JSAMPROW rp = row;
        jpeg_read_scanlines(&ci, &rp, 1);
        for (int x = 0; x < *w; x++)
            for (int c = 0; c < 3; c++) out[c * plane + y * *w + x] = row[3 * x + c];
    }
    jpeg_finish_decompress(&ci);
    jpeg_destroy_decompress(&ci);
    fclose(f);
    free(row);
    return out;
}

#define ASSERT_MSG_HAS(needle)                                                                 \
    do {                                                                                       \
        if (!strstr(kd_last_error(), (needle)))                                                \
            fail_msg("message \"%s\" lacks \"%s\"", kd_last_error(), (needle));                \
    } while (0)

/* Every batch of one epoch, copied out. */
typedef struct {
    int64_t total, nb;
    float *x;
    int32_t *y;
    int64_t *index;
    int64_t *n;
} dump;

static void dump_free(dump *d) {
    free(d->x);
    free(d->y);
    free(d->index);
    free(d->n);
}

static dump run_epoch(kd_loader *l, const kd_dataset *ds, int64_t epoch) {
    int c, h, w;
    kd_loader_sample_shape(l, &c, &h, &w);
    int64_t per = (int64_t)c * h * w, N = kd_dataset_size(ds);
    dump d = {0};
    d.x = malloc((size_t)(N * per) * sizeof *d.x);
    d.y = malloc((size_t)N * sizeof *d.y);
    d.index = malloc((size_t)N * sizeof *d.index);
    d.n = calloc((size_t)kd_loader_num_batches(l) + 1, sizeof *d.n);
    KD_ASSERT_OK(kd_loader_start_epoch(l, epoch));
    kd_batch b;
    int r;
    while ((r = kd_loader_next(l, &b)) == 1) {
        memcpy(d.x + d.total * per, b.x, (size_t)(b.n * per) * sizeof *b.x);
        memcpy(d.y + d.total, b.y, (size_t)b.n * sizeof *b.y);
        memcpy(d.index + d.total, b.index, (size_t)b.n * sizeof *b.index);
        d.n[d.nb++] = b.n;
        d.total += b.n;
    }
    if (r != 0) fail_msg("kd_loader_next: %s", kd_last_error());
    return d;
}

static void assert_dumps_equal(const dump *a, const dump *b, int64_t per) {
    assert_int_equal(a->total, b->total);
    assert_memory_equal(a->y, b->y, (size_t)a->total * sizeof *a->y);
    assert_memory_equal(a->index, b->index, (size_t)a->total * sizeof *a->index);
    assert_memory_equal(a->x, b->x, (size_t)(a->total * per) * sizeof *a->x);
}

/* ------------------------------------------------------------------- PNG */

static void test_png_formats(void **state) {
    (void)state;
    const char *dir = tmpdir("png");
    const int h = 13, w = 17; /* odd sizes: packed 4-bit rows, Adam7 passes */
    uint8_t *rgb = busy_rgb(h, w, 5), *want = malloc((size_t)3 * h * w);
    static const char *names[] = {"rgb8", "rgb16", "gray8", "gray16", "gray4", "ga8", "rgba8", "palette", "adam7"};
    kd_image im = {0};
    for (int k = P_RGB8; k <= P_RGB8_ADAM7; k++) {
        char path[2048];
        snprintf(path, sizeof path, "%s/%s.png", dir, names[k]);
        write_png(path, rgb, h, w, (png_kind)k, want);
        KD_ASSERT_OK(kd_image_read(path, &im));
        assert_int_equal(im.c, 3);
        assert_int_equal(im.h, h);
        assert_int_equal(im.w, w);
        for (int j = 0; j < 3 * h * w; j++)
            if (im.data[j] != want[j]) fail_msg("%s: byte %d: %d != %d", names[k], j, im.data[j], want[j]);
        int c, ph, pw;
        KD_ASSERT_OK(kd_image_probe(path, &c, &ph, &pw));
        assert_int_equal(ph, h);
        assert_int_equal(pw, w);
    }
    kd_image_free(&im);
    free(rgb);
    free(want);
}

/* ------------------------------------------------------------------ JPEG */

static void test_jpeg_decode(void **state) {
    (void)state;
    const char *dir = tmpdir("jpeg");
    const int h = 40, w = 56;
    uint8_t *rgb = smooth_rgb(h, w, 1);
    char path[2048], gpath[2048];
    snprintf(path, sizeof path, "%s/a.jpg", dir);
    snprintf(gpath, sizeof gpath, "%s/g.JPEG", dir);
    write_jpeg(path, rgb, h, w, 0, 95);
    write_jpeg(gpath, rgb, h, w, 1, 95);
    kd_image im = {0};
    KD_ASSERT_OK(kd_image_read(path, &im));
    assert_int_equal(im.c, 3);
    assert_int_equal(im.h, h);
    assert_int_equal(im.w, w);
    /* Within the codec's tolerance of the source... */
    double sum = 0;
    int maxd = 0;
    for (int j = 0; j < 3 * h * w; j++) {
        int d = abs((int)im.data[j] - rgb[j]);
        sum += d;
        if (d > maxd) maxd = d;
    }
    assert_true(sum / (3 * h * w) < 2.0);
    assert_true(maxd <= 24);
    /* ...and exactly an independent libjpeg decode. */
    int rh, rw;
    uint8_t *ref = ref_jpeg_decode(path, &rh, &rw);
    assert_int_equal(rh, h);
    assert_memory_equal(im.data, ref, (size_t)3 * h * w);
    free(ref);
    /* Grayscale: three equal channels, equal to the reference's gray->RGB. */
    KD_ASSERT_OK(kd_image_read(gpath, &im));
    ref = ref_jpeg_decode(gpath, &rh, &rw);
    assert_memory_equal(im.data, ref, (size_t)3 * h * w);
    assert_memory_equal(im.data, im.data + h * w, (size_t)h * w);
    assert_memory_equal(im.data, im.data + 2 * h * w, (size_t)h * w);
    for (int j = 0; j < h * w; j++) assert_true(abs((int)im.data[j] - rgb[j]) <= 24);
    free(ref);
    kd_image_free(&im);
    free(rgb);
}

/* ------------------------------------------------------------- resampling */

static void test_resample(void **state) {
    (void)state;
    kd_scratch sc = {0};
    /* Identity: same size, whole box. */
    uint8_t *src = busy_rgb(9, 11, 2), dst[3 * 9 * 11];
    KD_ASSERT_OK(kd_image_resample(src, 3, 9, 11, 0, 0, 11, 9, dst, 9, 11, 0, 0, 9, 11, &sc));
    assert_memory_equal(dst, src, sizeof dst);
    free(src);
    /* A horizontal ramp 2x + 10 halved: the antialiasing tent is symmetric,
     * so interior outputs are the ramp at the new pixel centres: 4x + 11. */
    int h = 4, w = 64;
    uint8_t ramp[4 * 64], half[4 * 32];
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) ramp[y * w + x] = (uint8_t)(2 * x + 10);
    KD_ASSERT_OK(kd_image_resample(ramp, 1, h, w, 0, 0, w, h, half, h, 32, 0, 0, h, 32, &sc));
    for (int y = 0; y < h; y++)
        for (int x = 1; x < 31; x++) assert_int_equal(half[y * 32 + x], 4 * x + 11);
    /* A constant image stays constant at any scale, up or down. */
    uint8_t cst[3 * 20 * 30], big[3 * 45 * 7];
    memset(cst, 77, sizeof cst);
    KD_ASSERT_OK(kd_image_resample(cst, 3, 20, 30, 1.5, 2.25, 29, 19.5, big, 45, 7, 0, 0, 45, 7, &sc));
    for (size_t j = 0; j < sizeof big; j++) assert_int_equal(big[j], 77);
    /* Resize(16) + CenterCrop(16) of a 20x40 image: the shorter side becomes
     * 16, the longer 32, and the crop takes columns [8, 24) of the resized
     * image, i.e. the box x in [10, 30) of the source. */
    uint8_t *s2 = smooth_rgb(20, 40, 3), a[3 * 16 * 16], b[3 * 16 * 16];
    KD_ASSERT_OK(kd_image_resize_center_crop(s2, 3, 20, 40, 0, a, 16, 16, &sc));
    KD_ASSERT_OK(kd_image_resample(s2, 3, 20, 40, 10, 0, 30, 20, b, 16, 16, 0, 0, 16, 16, &sc));
    assert_memory_equal(a, b, sizeof a);
    /* A crop larger than the resized image is zero-padded around it:
     * Resize(8) of 20x40 -> 8x16, CenterCrop(12, 12): rows 2..9 hold it. */
    uint8_t p[3 * 12 * 12], q[3 * 8 * 12];
    KD_ASSERT_OK(kd_image_resize_center_crop(s2, 3, 20, 40, 8, p, 12, 12, &sc));
    KD_ASSERT_OK(kd_image_resample(s2, 3, 20, 40, 5, 0, 35, 20, q, 8, 12, 0, 0, 8, 12, &sc));
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < 12; y++)
            for (int x = 0; x < 12; x++) {
                int v = p[(c * 12 + y) * 12 + x];
                if (y < 2 || y >= 10) assert_int_equal(v, 0);
                else assert_int_equal(v, q[(c * 8 + y - 2) * 12 + x]);
            }
    free(s2);
    /* Bad boxes are refused. */
    ASSERT_ERR(kd_image_resample(cst, 3, 20, 30, 0, 0, 31, 20, big, 45, 7, 0, 0, 45, 7, &sc), KD_ERR_INVALID, "box");
    kd_scratch_free(&sc);
}

/* ---------------------------------------------------------- image folders */

/* root/<cls>/<rel>: a 6x8 PNG whose pixels encode `id`. */
static void put_png(const char *root, const char *rel, int id) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    char dir[2048];
    snprintf(dir, sizeof dir, "%s", path);
    *strrchr(dir, '/') = '\0';
    mkdir_p(dir);
    uint8_t *rgb = busy_rgb(6, 8, id);
    write_png_rgb(path, rgb, 6, 8);
    free(rgb);
}

static void test_image_folder(void **state) {
    (void)state;
    const char *root = tmpdir("folder");
    /* Classes in byte order: "Zebra" < "ant" < "cat". Within cat: the
     * directory path first ("cat" < "cat/a-dir" < "cat/sub"), then names. */
    put_png(root, "cat/b.png", 1);
    put_png(root, "cat/a.png", 2);
    put_png(root, "cat/sub/0.png", 3);
    put_png(root, "cat/a-dir/z.png", 4);
    put_png(root, "cat/C.PNG", 5);
    put_png(root, "ant/x.png", 6);
    put_png(root, "Zebra/q.png", 7);
    put_png(root, "cat/.hidden.png", 8);
    put_png(root, ".git/junk.png", 9);
    char p[2048];
    snprintf(p, sizeof p, "%s/cat/notes.txt", root);
    write_bytes(p, "x", 1);
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open_folder(root, &ds));
    static const char *want[] = {"Zebra/q.png", "ant/x.png", "cat/C.PNG", "cat/a.png", "cat/b.png",
                                 "cat/a-dir/z.png", "cat/sub/0.png"};
    static const int want_label[] = {0, 1, 2, 2, 2, 2, 2}, want_id[] = {7, 6, 5, 2, 1, 4, 3};
    assert_int_equal(kd_dataset_size(ds), 7);
    assert_int_equal(kd_dataset_num_classes(ds), 3);
    assert_int_equal(kd_dataset_channels(ds), 3);
    assert_int_equal(kd_dataset_height(ds), 0); /* sizes unknown until decoded */
    assert_true(kd_dataset_is_lazy(ds));
    assert_null(kd_dataset_image(ds, 0));
    assert_string_equal(kd_dataset_class_name(ds, 0), "Zebra");
    assert_string_equal(kd_dataset_class_name(ds, 1), "ant");
    assert_string_equal(kd_dataset_class_name(ds, 2), "cat");
    kd_image im = {0};
    for (int i = 0; i < 7; i++) {
        snprintf(p, sizeof p, "%s/%s", root, want[i]);
        assert_string_equal(kd_dataset_path(ds, i), p);
        assert_int_equal(kd_dataset_label(ds, i), want_label[i]);
        KD_ASSERT_OK(kd_dataset_read(ds, i, &im));
        uint8_t *rgb = busy_rgb(6, 8, want_id[i]);
        assert_memory_equal(im.data, rgb, 3 * 6 * 8);
        free(rgb);
    }
    kd_dataset_free(ds);

    /* Through kd_dataset_open: a plain class folder is a training split only. */
    KD_ASSERT_OK(kd_dataset_open(root, 1, &ds));
    assert_int_equal(kd_dataset_size(ds), 7);
    kd_dataset_free(ds);
    ds = NULL;
    ASSERT_ERR(kd_dataset_open(root, 0, &ds), KD_ERR_NOT_FOUND, "no test split");
    assert_null(ds);
    char spec[2048];
    snprintf(spec, sizeof spec, "folder:%s", root);
    KD_ASSERT_OK(kd_dataset_open(spec, 0, &ds));
    assert_int_equal(kd_dataset_split(ds), KD_SPLIT_TEST);
    kd_dataset_free(ds);
    /* The unlabeled split of a class folder: all images below it, label -1. */
    KD_ASSERT_OK(kd_dataset_open_split(root, KD_SPLIT_UNLABELED, &ds));
    assert_int_equal(kd_dataset_size(ds), 7);
    for (int i = 0; i < 7; i++) assert_int_equal(kd_dataset_label(ds, i), -1);
    kd_dataset_free(ds);

    /* train/ + val/ layout, named after the parent folder. */
    const char *r2 = tmpdir("layout");
    put_png(r2, "train/a/1.png", 1);
    put_png(r2, "train/b/1.png", 2);
    put_png(r2, "train/b/2.png", 3);
    put_png(r2, "val/a/1.png", 4);
    put_png(r2, "val/b/1.png", 5);
    put_png(r2, "unlabeled/u1.png", 6);
    put_png(r2, "unlabeled/more/u2.png", 7);
    kd_dataset *tr = NULL, *te = NULL, *un = NULL;
    KD_ASSERT_OK(kd_dataset_open(r2, 1, &tr));
    KD_ASSERT_OK(kd_dataset_open(r2, 0, &te));
    KD_ASSERT_OK(kd_dataset_open_split(r2, KD_SPLIT_UNLABELED, &un));
    assert_int_equal(kd_dataset_size(tr), 3);
    assert_int_equal(kd_dataset_size(te), 2);
    assert_int_equal(kd_dataset_size(un), 2);
    assert_int_equal(kd_dataset_label(tr, 2), 1);
    assert_int_equal(kd_dataset_label(un, 1), -1);
    assert_int_equal(kd_dataset_num_classes(un), 0);
    assert_int_equal(kd_dataset_split(un), KD_SPLIT_UNLABELED);
    char base[256];
    snprintf(base, sizeof base, "%s", strrchr(r2, '/') + 1);
    assert_string_equal(kd_dataset_name(tr), base);
    kd_dataset_free(tr);
    kd_dataset_free(te);
    kd_dataset_free(un);
    kd_image_free(&im);
}

static void test_unlabeled_folder(void **state) {
    (void)state;
    const char *root = tmpdir("unlab");
    put_png(root, "b.png", 1);
    put_png(root, "a.png", 2);
    put_png(root, "deep/er/z.png", 3);
    put_png(root, "deep/y.png", 4);
    kd_dataset *ds = NULL;
    /* A flat folder of images is not a labelled dataset... */
    ASSERT_ERR(kd_dataset_open(root, 1, &ds), KD_ERR_NOT_FOUND, "unlabeled:");
    /* ...but opens as unlabeled data, in torchvision's walk order. */
    KD_ASSERT_OK(kd_dataset_open_split(root, KD_SPLIT_UNLABELED, &ds));
    static const char *want[] = {"a.png", "b.png", "deep/y.png", "deep/er/z.png"};
    assert_int_equal(kd_dataset_size(ds), 4);
    for (int i = 0; i < 4; i++) {
        char p[2048];
        snprintf(p, sizeof p, "%s/%s", root, want[i]);
        assert_string_equal(kd_dataset_path(ds, i), p);
        assert_int_equal(kd_dataset_label(ds, i), -1);
    }
    kd_dataset_free(ds);
    char spec[2048];
    snprintf(spec, sizeof spec, "unlabeled:%s", root);
    KD_ASSERT_OK(kd_dataset_open(spec, 1, &ds));
    assert_int_equal(kd_dataset_size(ds), 4);
    assert_int_equal(kd_dataset_num_classes(ds), 0);
    /* A uniform subset of unlabeled data. */
    kd_dataset *sub = NULL;
    KD_ASSERT_OK(kd_dataset_subset(ds, 2, 3, &sub));
    assert_int_equal(kd_dataset_size(sub), 2);
    assert_int_equal(kd_dataset_label(sub, 1), -1);
    kd_dataset_free(sub);
    kd_dataset_free(ds);
    const char *empty = tmpdir("unlab_empty");
    ASSERT_ERR(kd_dataset_open_unlabeled(empty, &ds), KD_ERR_FORMAT, empty);
}

/* ------------------------------------------------------------- file lists */

static void test_file_list(void **state) {
    (void)state;
    const char *root = tmpdir("list");
    put_png(root, "imgs/a.png", 1);
    put_png(root, "imgs/with space.png", 2);
    put_png(root, "other/c.png", 3);
    char list[2048], text[4096];
    snprintf(list, sizeof list, "%s/train.txt", root);
    snprintf(text, sizeof text,
             "# comment\n"
             "imgs/a.png 3\n"
             "\n"
             "  imgs/with space.png\t0  \r\n"
             "%s/other/c.png 1\n",
             root);
    write_bytes(list, text, strlen(text));
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open_list(list, &ds));
    assert_int_equal(kd_dataset_size(ds), 3);
    assert_int_equal(kd_dataset_num_classes(ds), 4);
    assert_string_equal(kd_dataset_name(ds), "train");
    int want_label[] = {3, 0, 1}, want_id[] = {1, 2, 3};
    char p[2048];
    snprintf(p, sizeof p, "%s/imgs/with space.png", root);
    assert_string_equal(kd_dataset_path(ds, 1), p);
    kd_image im = {0};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kd_dataset_label(ds, i), want_label[i]);
        KD_ASSERT_OK(kd_dataset_read(ds, i, &im));
        uint8_t *rgb = busy_rgb(6, 8, want_id[i]);
        assert_memory_equal(im.data, rgb, 3 * 6 * 8);
        free(rgb);
    }
    kd_dataset_free(ds);
    /* The same through specs and autodetection of a regular file. */
    char spec[2100];
    snprintf(spec, sizeof spec, "list:%s", list);
    KD_ASSERT_OK(kd_dataset_open(spec, 0, &ds));
    assert_int_equal(kd_dataset_size(ds), 3);
    kd_dataset_free(ds);
    KD_ASSERT_OK(kd_dataset_open(list, 1, &ds));
    kd_dataset_free(ds);
    /* No labels at all: unlabeled. */
    snprintf(text, sizeof text, "imgs/a.png\nother/c.png\n");
    write_bytes(list, text, strlen(text));
    KD_ASSERT_OK(kd_dataset_open_list(list, &ds));
    assert_int_equal(kd_dataset_label(ds, 1), -1);
    assert_int_equal(kd_dataset_split(ds), KD_SPLIT_UNLABELED);
    kd_dataset_free(ds);
    /* Errors name the file and line. */
    snprintf(text, sizeof text, "imgs/a.png 1\nother/c.png\n");
    write_bytes(list, text, strlen(text));
    ASSERT_ERR(kd_dataset_open_list(list, &ds), KD_ERR_FORMAT, "train.txt:2: has no label");
    snprintf(text, sizeof text, "imgs/a.png -4\n");
    write_bytes(list, text, strlen(text));
    ASSERT_ERR(kd_dataset_open_list(list, &ds), KD_ERR_FORMAT, "train.txt:1: negative label");
    snprintf(text, sizeof text, "# nothing\n\n");
    write_bytes(list, text, strlen(text));
    ASSERT_ERR(kd_dataset_open_list(list, &ds), KD_ERR_FORMAT, "no entries");
    char missing[2048];
    snprintf(missing, sizeof missing, "%s/nope.txt", root);
    ASSERT_ERR(kd_dataset_open_list(missing, &ds), KD_ERR_NOT_FOUND, "nope.txt");
    kd_image_free(&im);
}

/* ---------------------------------------------------------------- STL-10 */

#define STL KD_TEST_STL

static void check_stl(const kd_dataset *ds, int tag, int64_t n, int labels) {
    assert_int_equal(kd_dataset_size(ds), n);
    assert_int_equal(kd_dataset_channels(ds), 3);
    assert_int_equal(kd_dataset_height(ds), 96);
    assert_int_equal(kd_dataset_width(ds), 96);
    assert_int_equal(kd_dataset_num_classes(ds), 10);
    assert_true(kd_dataset_is_lazy(ds));
    assert_string_equal(kd_dataset_class_name(ds, 7), "monkey");
    kd_image im = {0};
    for (int64_t i = 0; i < n; i++) {
        assert_int_equal(kd_dataset_label(ds, i), labels ? (int)((i * 3 + tag) % 10) : -1);
        KD_ASSERT_OK(kd_dataset_read(ds, i, &im));
        assert_int_equal(im.h, 96);
        for (int c = 0; c < 3; c++)
            for (int y = 0; y < STL; y++)
                for (int x = 0; x < STL; x++)
                    if (im.data[(c * STL + y) * STL + x] != kd_test_stl10_pix(tag, i, c, y, x))
                        fail_msg("image %lld (%d, %d, %d)", (long long)i, c, y, x);
    }
    kd_image_free(&im);
}

static void test_stl10(void **state) {
    (void)state;
    const char *root = tmpdir("stl");
    char dir[2048];
    snprintf(dir, sizeof dir, "%s/stl10_binary", root);
    mkdir_p(dir);
    kd_test_write_stl10_split(dir, "train", 1, 7, 1);
    kd_test_write_stl10_split(dir, "test", 2, 5, 1);
    kd_test_write_stl10_split(dir, "unlabeled", 3, 11, 0);
    kd_dataset *tr = NULL, *te = NULL, *un = NULL;
    KD_ASSERT_OK(kd_dataset_open(root, 1, &tr)); /* finds stl10_binary/ */
    char spec[2100];
    snprintf(spec, sizeof spec, "stl10:%s", dir);
    KD_ASSERT_OK(kd_dataset_open(spec, 0, &te));
    KD_ASSERT_OK(kd_dataset_open_split(dir, KD_SPLIT_UNLABELED, &un));
    assert_string_equal(kd_dataset_name(tr), "stl-10");
    check_stl(tr, 1, 7, 1);
    check_stl(te, 2, 5, 1);
    check_stl(un, 3, 11, 0);
    assert_int_equal(kd_dataset_split(un), KD_SPLIT_UNLABELED);
    char p[2100];
    snprintf(p, sizeof p, "%s/unlabeled_X.bin", dir);
    assert_string_equal(kd_dataset_path(un, 3), p);

    /* A subset reads the same records. */
    kd_dataset *sub = NULL;
    KD_ASSERT_OK(kd_dataset_subset(tr, 5, 9, &sub));
    kd_image a = {0}, b = {0};
    int64_t j = 0;
    for (int64_t i = 0; i < 5; i++) {
        KD_ASSERT_OK(kd_dataset_read(sub, i, &a));
        while (j < 7) {
            KD_ASSERT_OK(kd_dataset_read(tr, j, &b));
            if (!memcmp(a.data, b.data, 3 * 96 * 96)) break;
            j++;
        }
        assert_true(j < 7);
        assert_int_equal(kd_dataset_label(sub, i), kd_dataset_label(tr, j));
    }
    kd_image_free(&a);
    kd_image_free(&b);
    kd_dataset_free(tr); /* the subset keeps its own file descriptor */
    check_stl(un, 3, 11, 0);
    kd_image im = {0};
    KD_ASSERT_OK(kd_dataset_read(sub, 4, &im));
    kd_image_free(&im);

    /* Loader over the unlabeled split: bit-identical for 0..3 workers, and
     * equal to kd_transform_sample. */
    kd_loader_cfg cfg = {.batch_size = 4, .shuffle = 1, .seed = 5,
                         .transform = {.pad_crop = 4, .hflip = 1, .normalize = 1,
                                       .mean = {0.4f, 0.4f, 0.4f}, .std = {0.25f, 0.25f, 0.25f}}};
    dump d[4];
    for (int nw = 0; nw < 4; nw++) {
        cfg.num_workers = nw;
        kd_loader *l = NULL;
        KD_ASSERT_OK(kd_loader_init(&l, un, &cfg));
        d[nw] = run_epoch(l, un, 3);
        kd_loader_free(l);
        assert_int_equal(d[nw].total, 11);
        if (nw) assert_dumps_equal(&d[0], &d[nw], 3 * 96 * 96);
    }
    float *x = malloc(3 * 96 * 96 * sizeof *x);
    for (int64_t i = 0; i < 11; i++) {
        KD_ASSERT_OK(kd_transform_sample(&cfg.transform, un, d[0].index[i], 5, 3, x));
        assert_memory_equal(x, d[0].x + i * 3 * 96 * 96, 3 * 96 * 96 * sizeof *x);
        assert_int_equal(d[0].y[i], -1);
    }
    free(x);
    for (int nw = 0; nw < 4; nw++) dump_free(&d[nw]);
    /* Channel statistics read the records. */
    float mean[4], std[4];
    KD_ASSERT_OK(kd_dataset_channel_stats(un, 0, mean, std));
    assert_true(mean[0] > 0.2f && mean[0] < 0.8f && std[0] > 0.1f);
    kd_dataset_free(sub);
    kd_dataset_free(te);
    kd_dataset_free(un);
}

static void test_stl10_errors(void **state) {
    (void)state;
    const char *dir = tmpdir("stl_err");
    kd_test_write_stl10_split(dir, "train", 1, 3, 1);
    char p[2048];
    kd_dataset *ds = NULL;
    /* Images file not a whole number of records. */
    snprintf(p, sizeof p, "%s/train_X.bin", dir);
    FILE *f = fopen(p, "ab");
    fputc(0, f);
    fclose(f);
    ASSERT_ERR(kd_dataset_open_stl10(dir, KD_SPLIT_TRAIN, &ds), KD_ERR_FORMAT, "train_X.bin: size 82945 bytes is not a positive multiple of the 27648-byte");
    assert_null(ds);
    write_bytes(p, "", 0);
    ASSERT_ERR(kd_dataset_open_stl10(dir, KD_SPLIT_TRAIN, &ds), KD_ERR_FORMAT, "train_X.bin: size 0 bytes");
    /* Label count and range. */
    kd_test_write_stl10_split(dir, "train", 1, 3, 1);
    snprintf(p, sizeof p, "%s/train_y.bin", dir);
    write_bytes(p, "\x01\x02", 2);
    ASSERT_ERR(kd_dataset_open_stl10(dir, KD_SPLIT_TRAIN, &ds), KD_ERR_FORMAT, "train_y.bin: 2 labels, but");
    write_bytes(p, "\x01\x0b\x02", 3);
    ASSERT_ERR(kd_dataset_open_stl10(dir, KD_SPLIT_TRAIN, &ds), KD_ERR_FORMAT, "train_y.bin: label 11 of image 1 is outside 1..10");
    write_bytes(p, "\x00\x01\x02", 3);
    ASSERT_ERR(kd_dataset_open_stl10(dir, KD_SPLIT_TRAIN, &ds), KD_ERR_FORMAT, "label 0 of image 0");
    unlink(p);
    ASSERT_ERR(kd_dataset_open_stl10(dir, KD_SPLIT_TRAIN, &ds), KD_ERR_NOT_FOUND, "train_y.bin");
    ASSERT_ERR(kd_dataset_open_stl10(dir, KD_SPLIT_TEST, &ds), KD_ERR_NOT_FOUND, "test_X.bin: no such file");
    /* Truncated after opening: the read names the file and record. */
    kd_test_write_stl10_split(dir, "train", 1, 3, 1);
    KD_ASSERT_OK(kd_dataset_open_stl10(dir, KD_SPLIT_TRAIN, &ds));
    snprintf(p, sizeof p, "%s/train_X.bin", dir);
    assert_int_equal(truncate(p, 27648 + 100), 0);
    kd_image im = {0};
    ASSERT_ERR(kd_dataset_read(ds, 1, &im), KD_ERR_FORMAT, "train_X.bin: record 1: file ends");
    kd_image_free(&im);
    kd_dataset_free(ds);
}

/* ------------------------------------------------------------- bad input */

/* A folder of 12 JPEGs/PNGs of different sizes; the indices in `bad` are
 * broken in different ways. Returns the root. */
static const char *bad_folder(const char *tag, const int *bad, int nbad) {
    const char *root = tmpdir(tag);
    for (int i = 0; i < 12; i++) {
        char path[2100];
        snprintf(path, sizeof path, "%s/%s", root, i < 6 ? "c0" : "c1");
        mkdir_p(path);
        int h = 20 + 3 * i, w = 28 - i;
        snprintf(path, sizeof path, "%s/%s/img%02d.%s", root, i < 6 ? "c0" : "c1", i, i % 2 ? "png" : "jpg");
        uint8_t *rgb = smooth_rgb(h, w, i);
        if (i % 2) write_png_rgb(path, rgb, h, w);
        else write_jpeg(path, rgb, h, w, 0, 90);
        free(rgb);
        int k = -1;
        for (int j = 0; j < nbad; j++)
            if (bad[j] == i) k = j;
        if (k < 0) continue;
        size_t n;
        uint8_t *b = read_bytes(path, &n);
        switch (k % 3) {
        case 0: write_bytes(path, b, n / 2); break;                /* truncated */
        case 1: write_bytes(path, "hello, world\n", 13); break;     /* not an image */
        case 2: unlink(path); assert_int_equal(symlink("/nonexistent/x.jpg", path), 0); break; /* missing */
        }
        free(b);
    }
    return root;
}

static void test_bad_images(void **state) {
    (void)state;
    const char *dir = tmpdir("bad");
    char p[2048];
    kd_image im = {0};
    uint8_t *rgb = busy_rgb(30, 40, 0);
    size_t n;
    /* Truncated JPEG: the scan data ends early. */
    snprintf(p, sizeof p, "%s/t.jpg", dir);
    write_jpeg(p, rgb, 30, 40, 0, 90);
    uint8_t *b = read_bytes(p, &n);
    write_bytes(p, b, n * 3 / 4);
    ASSERT_ERR(kd_image_read(p, &im), KD_ERR_FORMAT, "t.jpg: corrupt or truncated JPEG");
    /* Only the first bytes of the header: the end of the file is an error
     * at once (libjpeg would only warn, and go on reading past the end). */
    write_bytes(p, b, 12);
    ASSERT_ERR(kd_image_read(p, &im), KD_ERR_FORMAT,
               "t.jpg: corrupt or truncated JPEG data: Premature end of JPEG file");
    /* A header libjpeg refuses outright (its error_exit): 7-bit samples. */
    size_t sof = 0;
    for (size_t i = 2; i + 4 < n && !sof; i++)
        if (b[i] == 0xFF && b[i + 1] == 0xC0) sof = i;
    assert_true(sof > 0);
    b[sof + 4] = 7; /* the precision byte after the marker and its length */
    write_bytes(p, b, n);
    ASSERT_ERR(kd_image_read(p, &im), KD_ERR_FORMAT, "t.jpg: corrupt JPEG: Unsupported JPEG data precision 7");
    free(b);
    /* Truncated PNG, and a PNG with a damaged chunk. */
    snprintf(p, sizeof p, "%s/t.png", dir);
    write_png_rgb(p, rgb, 30, 40);
    b = read_bytes(p, &n);
    write_bytes(p, b, n - 30);
    ASSERT_ERR(kd_image_read(p, &im), KD_ERR_FORMAT, "t.png: corrupt PNG");
    b[40] ^= 0xff; /* inside IHDR/IDAT: a CRC error */
    write_bytes(p, b, n);
    ASSERT_ERR(kd_image_read(p, &im), KD_ERR_FORMAT, "t.png: corrupt PNG");
    free(b);
    /* Not an image; empty; a directory; missing. */
    snprintf(p, sizeof p, "%s/text.jpg", dir);
    write_bytes(p, "GIF89a not really", 17);
    ASSERT_ERR(kd_image_read(p, &im), KD_ERR_FORMAT, "text.jpg: not a JPEG or PNG image (17 bytes starting 47 49 46");
    snprintf(p, sizeof p, "%s/empty.png", dir);
    write_bytes(p, "", 0);
    ASSERT_ERR(kd_image_read(p, &im), KD_ERR_FORMAT, "empty.png: empty file");
    snprintf(p, sizeof p, "%s/dir.jpg", dir);
    mkdir_p(p);
    ASSERT_ERR(kd_image_read(p, &im), KD_ERR_IO, "dir.jpg: not a regular file (a directory)");
    snprintf(p, sizeof p, "%s/missing.png", dir);
    ASSERT_ERR(kd_image_read(p, &im), KD_ERR_NOT_FOUND, "missing.png: no such file");
    free(rgb);

    /* An empty class folder. */
    const char *root = tmpdir("bad_empty_class");
    put_png(root, "a/1.png", 1);
    snprintf(p, sizeof p, "%s/b", root);
    mkdir_p(p);
    put_png(root, "b/readme.txt.png.txt", 2); /* not an image name */
    kd_dataset *ds = NULL;
    ASSERT_ERR(kd_dataset_open_folder(root, &ds), KD_ERR_FORMAT, "/b: class folder 'b' holds no .jpg");
    const char *noclass = tmpdir("bad_noclass");
    ASSERT_ERR(kd_dataset_open_folder(noclass, &ds), KD_ERR_FORMAT, "no class folders");

    /* A list naming a directory and a missing file: opening succeeds (paths
     * are not checked), the loader's error names the sample and the file. */
    const char *lr = tmpdir("bad_list");
    put_png(lr, "ok.png", 1);
    snprintf(p, sizeof p, "%s/adir.png", lr);
    mkdir_p(p);
    snprintf(p, sizeof p, "%s/l.txt", lr);
    write_bytes(p, "ok.png 0\nadir.png 1\ngone.png 1\n", 31);
    KD_ASSERT_OK(kd_dataset_open_list(p, &ds));
    kd_loader_cfg cfg = {.batch_size = 1, .transform = {.out_h = 6, .out_w = 8}};
    kd_loader *l = NULL;
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    KD_ASSERT_OK(kd_loader_start_epoch(l, 0));
    kd_batch bt;
    assert_int_equal(kd_loader_next(l, &bt), 1);
    kd_clear_error();
    assert_int_equal(kd_loader_next(l, &bt), KD_ERR_IO);
    ASSERT_MSG_HAS("sample 1");
    ASSERT_MSG_HAS("adir.png: not a regular file");
    kd_loader_free(l);
    cfg.num_workers = 2;
    cfg.batch_size = 3;
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    KD_ASSERT_OK(kd_loader_start_epoch(l, 0));
    kd_clear_error();
    assert_true(kd_loader_next(l, &bt) < 0);
    ASSERT_MSG_HAS("adir.png");
    kd_loader_free(l);
    kd_dataset_free(ds);

    /* In a folder: truncated JPEG (0), text (3: a .png), missing (8). */
    static const int badi[] = {0, 3, 8};
    root = bad_folder("bad_folder", badi, 3);
    KD_ASSERT_OK(kd_dataset_open_folder(root, &ds));
    assert_int_equal(kd_dataset_size(ds), 12); /* the dangling link is listed */
    cfg = (kd_loader_cfg){.batch_size = 4, .num_workers = 1, .transform = {.out_h = 16, .out_w = 16}};
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    KD_ASSERT_OK(kd_loader_start_epoch(l, 0));
    kd_clear_error();
    assert_int_equal(kd_loader_next(l, &bt), KD_ERR_FORMAT);
    ASSERT_MSG_HAS("sample 0");
    ASSERT_MSG_HAS("img00.jpg: corrupt or truncated JPEG data");
    kd_loader_free(l);
    kd_image_free(&im);
    /* A variable-size dataset needs an output size. */
    cfg.transform.out_h = cfg.transform.out_w = 0;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "set an output size");
    cfg.transform.out_h = 4;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "output size 4x0");
    kd_dataset_free(ds);
}

static void test_skip_bad(void **state) {
    (void)state;
    /* 3 and 4 are replaced by 5; 11 (the last) wraps around to 0. */
    static const int badi[] = {3, 4, 11};
    const char *root = bad_folder("skip", badi, 3);
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open_folder(root, &ds));
    kd_loader_cfg cfg = {.batch_size = 5, .shuffle = 1, .seed = 77, .skip_bad = 1,
                         .transform = {.out_h = 16, .out_w = 12, .pad_crop = 2, .hflip = 1, .normalize = 1,
                                       .mean = {0.5f, 0.5f, 0.5f}, .std = {0.2f, 0.2f, 0.2f}}};
    dump d[3], e[3];
    int64_t per = 3 * 16 * 12;
    for (int nw = 0; nw < 3; nw++) {
        cfg.num_workers = nw;
        kd_loader *l = NULL;
        KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
        kd_log_set_level(nw ? KD_LOG_ERROR : KD_LOG_INFO); /* show the warnings once */
        d[nw] = run_epoch(l, ds, 0);
        assert_int_equal(kd_loader_skipped(l), 3);
        e[nw] = run_epoch(l, ds, 1);
        assert_int_equal(kd_loader_skipped(l), 3); /* each counted once */
        kd_loader_free(l);
        assert_int_equal(d[nw].total, 12);
        assert_int_equal(d[nw].n[0], 5); /* batches keep their size */
        assert_int_equal(d[nw].n[1], 5);
        if (nw) {
            assert_dumps_equal(&d[0], &d[nw], per);
            assert_dumps_equal(&e[0], &e[nw], per);
        }
    }
    kd_log_set_level(KD_LOG_INFO);
    /* Substitutes: every bad index is replaced by the next readable one. */
    int count[12] = {0};
    for (int64_t i = 0; i < 12; i++) count[d[0].index[i]]++;
    assert_int_equal(count[3] + count[4] + count[11], 0);
    assert_int_equal(count[5], 3);
    assert_int_equal(count[0], 2);
    for (int i = 0; i < 12; i++)
        if (i != 0 && i != 3 && i != 4 && i != 5 && i != 11) assert_int_equal(count[i], 1);
    /* A substitute carries its own label, and its own augmentation stream. */
    float *x = malloc((size_t)per * sizeof *x);
    for (int64_t i = 0; i < 12; i++) {
        assert_int_equal(d[0].y[i], kd_dataset_label(ds, d[0].index[i]));
        KD_ASSERT_OK(kd_transform_sample(&cfg.transform, ds, d[0].index[i], 77, 0, x));
        assert_memory_equal(x, d[0].x + i * per, (size_t)per * sizeof *x);
    }
    free(x);
    for (int nw = 0; nw < 3; nw++) dump_free(&d[nw]), dump_free(&e[nw]);
    kd_dataset_free(ds);
}

/* --------------------------------------------- geometry and determinism */

/* A stand-in for random-resized-crop: a random box, resampled. */
typedef struct {
    int calls_expected_c;
} hook_ctx;

static kd_status random_box(const void *ctx, kd_rng *r, const uint8_t *src, int c, int h, int w, uint8_t *dst,
                            int out_h, int out_w, kd_scratch *scratch) {
    const hook_ctx *hc = ctx;
    if (c != hc->calls_expected_c) return kd_error(KD_ERR_INTERNAL, "hook: %d channels", c);
    double bw = w * (0.5 + 0.5 * kd_rng_uniform(r)), bh = h * (0.5 + 0.5 * kd_rng_uniform(r));
    double x0 = (w - bw) * kd_rng_uniform(r), y0 = (h - bh) * kd_rng_uniform(r);
    return kd_image_resample(src, c, h, w, x0, y0, x0 + bw, y0 + bh, dst, out_h, out_w, 0, 0, out_h, out_w,
                             scratch);
}

static void test_workers_bit_exact_and_hook(void **state) {
    (void)state;
    const char *root = bad_folder("exact", NULL, 0); /* 12 good JPEG/PNG, varying sizes */
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open_folder(root, &ds));
    hook_ctx hc = {3};
    for (int hook = 0; hook < 2; hook++) {
        kd_loader_cfg cfg = {.batch_size = 5, .shuffle = 1, .seed = 3,
                             .transform = {.out_h = 24, .out_w = 20, .resize = 26, .pad_crop = 3, .hflip = 1,
                                           .normalize = 1, .mean = {0.5f, 0.4f, 0.3f}, .std = {0.3f, 0.2f, 0.25f}}};
        if (hook) cfg.transform.geometry = random_box, cfg.transform.geometry_ctx = &hc;
        dump d[4];
        int64_t per = 3 * 24 * 20;
        for (int nw = 0; nw < 4; nw++) {
            cfg.num_workers = nw;
            cfg.prefetch = nw == 3 ? 1 : 0;
            kd_loader *l = NULL;
            KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
            int c, h, w;
            kd_loader_sample_shape(l, &c, &h, &w);
            assert_int_equal(h, 24);
            assert_int_equal(w, 20);
            d[nw] = run_epoch(l, ds, 2);
            kd_loader_free(l);
            if (nw) assert_dumps_equal(&d[0], &d[nw], per);
        }
        /* Equal to the single-sample path; and without a hook, to decode +
         * Resize(26) + CenterCrop(24, 20) + the crop/flip/normalise. */
        float *x = malloc((size_t)per * sizeof *x), *y = malloc((size_t)per * sizeof *y);
        kd_image im = {0};
        kd_scratch sc = {0};
        uint8_t *geo = malloc((size_t)per);
        for (int64_t i = 0; i < 12; i++) {
            int64_t idx = d[0].index[i];
            KD_ASSERT_OK(kd_transform_sample(&cfg.transform, ds, idx, 3, 2, x));
            assert_memory_equal(x, d[0].x + i * per, (size_t)per * sizeof *x);
            if (hook) continue;
            KD_ASSERT_OK(kd_dataset_read(ds, idx, &im));
            KD_ASSERT_OK(kd_image_resize_center_crop(im.data, 3, im.h, im.w, 26, geo, 24, 20, &sc));
            kd_rng r;
            kd_rng_init(&r, 3, kd_data_sample_key(3, 2, idx));
            kd_transform_draw dr = kd_transform_draw_from(&cfg.transform, &r);
            kd_transform_apply(&cfg.transform, &dr, geo, 3, 24, 20, y);
            assert_memory_equal(x, y, (size_t)per * sizeof *x);
        }
        free(geo);
        kd_scratch_free(&sc);
        kd_image_free(&im);
        free(x);
        free(y);
        for (int nw = 0; nw < 4; nw++) dump_free(&d[nw]);
    }
    /* An in-memory dataset with an output size goes through the geometry
     * step as well (the direct path is only for its own size). */
    uint8_t *img = busy_rgb(10, 14, 1);
    int32_t lab = 0;
    kd_dataset *mem = NULL;
    KD_ASSERT_OK(kd_dataset_from_memory("m", 1, 3, 10, 14, img, &lab, 1, &mem));
    kd_loader_cfg cfg = {.batch_size = 1, .transform = {.out_h = 5, .out_w = 7}};
    kd_loader *l = NULL;
    KD_ASSERT_OK(kd_loader_init(&l, mem, &cfg));
    dump d = run_epoch(l, mem, 0);
    uint8_t small[3 * 5 * 7];
    kd_scratch sc = {0};
    KD_ASSERT_OK(kd_image_resize_center_crop(img, 3, 10, 14, 0, small, 5, 7, &sc));
    for (int j = 0; j < 3 * 5 * 7; j++) assert_true(d.x[j] == (float)small[j] / 255.0f);
    dump_free(&d);
    kd_scratch_free(&sc);
    kd_loader_free(l);
    kd_dataset_free(mem);
    free(img);
    kd_dataset_free(ds);
}

/* PNG folder at its own size, through the loader: exact x / 255. */
static void test_folder_loader_exact(void **state) {
    (void)state;
    const char *root = tmpdir("exact_png");
    for (int i = 0; i < 9; i++) {
        char rel[64];
        snprintf(rel, sizeof rel, "k%d/%d.png", i % 3, i);
        put_png(root, rel, i);
    }
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open_folder(root, &ds));
    kd_loader_cfg cfg = {.batch_size = 4, .num_workers = 2, .transform = {.out_h = 6, .out_w = 8}};
    kd_loader *l = NULL;
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    dump d = run_epoch(l, ds, 0);
    assert_int_equal(d.total, 9);
    for (int64_t i = 0; i < 9; i++) {
        assert_int_equal(d.index[i], i); /* no shuffle: dataset order */
        assert_int_equal(d.y[i], kd_dataset_label(ds, i));
        /* Folder order: k0/0, k0/3, k0/6, k1/1, ... */
        int id = (int)(i % 3) * 3 + (int)(i / 3);
        uint8_t *rgb = busy_rgb(6, 8, id);
        for (int j = 0; j < 3 * 6 * 8; j++) assert_true(d.x[i * 144 + j] == (float)rgb[j] / 255.0f);
        free(rgb);
    }
    dump_free(&d);
    kd_loader_free(l);
    float mean[4], std[4];
    KD_ASSERT_OK(kd_dataset_channel_stats(ds, 0, mean, std));
    assert_true(mean[2] > 0.3f && mean[2] < 0.7f);
    kd_dataset_free(ds);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_png_formats),
        cmocka_unit_test(test_jpeg_decode),
        cmocka_unit_test(test_resample),
        cmocka_unit_test(test_image_folder),
        cmocka_unit_test(test_unlabeled_folder),
        cmocka_unit_test(test_file_list),
        cmocka_unit_test(test_stl10),
        cmocka_unit_test(test_stl10_errors),
        cmocka_unit_test(test_bad_images),
        cmocka_unit_test(test_skip_bad),
        cmocka_unit_test(test_workers_bit_exact_and_hook),
        cmocka_unit_test(test_folder_loader_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
