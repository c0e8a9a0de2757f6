/* Image files and resampling: JPEG (libjpeg-turbo) and PNG (libpng) decoding
 * to RGB (3, H, W) uint8 with errors that name the file and the problem,
 * header-only size probes, and a separable bilinear resampler with PIL's
 * antialiasing (the filter widens by the shrink factor) used for
 * Resize + CenterCrop and available to other geometry steps. */
#include "data_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

/* Images beyond KD_IMAGE_MAX_SIDE / KD_IMAGE_MAX_PIXELS (kd/data.h) are
 * refused from their header, before any allocation. Ancillary PNG chunks
 * (ICC profiles, text) are skipped by kd but libpng still buffers one at a
 * time: each is limited to 8 MB, libpng's own default, set here explicitly.
 * A progressive JPEG needs its whole coefficient array (2 bytes per sample):
 * libjpeg's memory is limited to 10 bytes a pixel of the header's size plus
 * 16 MB of tables and buffers, and to KD__JPEG_MAX_SCANS scans (the limit
 * libjpeg-turbo's own fuzzers and TurboJPEG use against scan bombs). */
#define KD__PNG_CHUNK_MAX 8000000
#define KD__JPEG_MAX_SCANS 500
#define KD__JPEG_MEM_SLACK ((int64_t)16 << 20)

/* ---------------------------------------------------------------- buffers */

void *kd_scratch_get(kd_scratch *s, size_t bytes) {
    if (s->cap >= bytes && s->p) return s->p;
    size_t cap = s->cap ? s->cap : 4096;
    while (cap < bytes) cap *= 2;
    void *p = kd_aligned_alloc(cap);
    if (!p) return NULL;
    kd_aligned_free(s->p);
    s->p = p;
    s->cap = cap;
    return p;
}

void kd_scratch_free(kd_scratch *s) {
    if (!s) return;
    kd_aligned_free(s->p);
    s->p = NULL;
    s->cap = 0;
}

void kd_image_free(kd_image *im) {
    if (!im) return;
    free(im->data);
    free(im->raw.p);
    free(im->row.p);
    memset(im, 0, sizeof *im);
}

static int kd__grow(uint8_t **p, size_t *cap, size_t bytes) {
    if (*cap >= bytes) return 1;
    size_t c = *cap ? *cap : 4096;
    while (c < bytes) c *= 2;
    uint8_t *q = realloc(*p, c);
    if (!q) return 0;
    *p = q;
    *cap = c;
    return 1;
}

/* Opens path for decoding: a non-empty regular file, with its first bytes
 * in sig (*nsig of them, up to 8) and its size in *size; the stream is left
 * at the start. Nothing is read into memory beyond that: the decoders stream
 * from the file, so a huge or sparse file costs no more than its image. */
static kd_status kd__open_image(const char *path, FILE **out, uint8_t sig[8], size_t *nsig,
                                int64_t *size) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return kd_error(KD_ERR_NOT_FOUND, "%s: no such file", path);
        return kd_error(KD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    struct stat sb;
    kd_status st = KD_OK;
    if (fstat(fd, &sb) != 0) {
        st = kd_error(KD_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    } else if (!S_ISREG(sb.st_mode)) {
        st = kd_error(KD_ERR_IO, "%s: not a regular file%s", path,
                      S_ISDIR(sb.st_mode) ? " (a directory)" : "");
    } else if (sb.st_size == 0) {
        st = kd_error(KD_ERR_FORMAT, "%s: empty file, not an image", path);
    }
    FILE *f = st == KD_OK ? fdopen(fd, "rb") : NULL;
    if (st == KD_OK && !f) st = kd_error(KD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (st != KD_OK) {
        close(fd);
        return st;
    }
    *nsig = fread(sig, 1, 8, f);
    if (ferror(f) || fseek(f, 0, SEEK_SET) != 0) {
        st = kd_error(KD_ERR_IO, "%s: read error: %s", path, strerror(errno));
        fclose(f);
        return st;
    }
    *size = (int64_t)sb.st_size;
    *out = f;
    return KD_OK;
}

static int kd__is_jpeg(const uint8_t *b, size_t n) { return n >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF; }
static int kd__is_png(const uint8_t *b, size_t n) { return n >= 8 && png_sig_cmp(b, 0, 8) == 0; }

static kd_status kd__not_an_image(const char *path, const uint8_t *b, size_t nb, int64_t size) {
    char hex[40] = "";
    for (size_t i = 0; i < nb && i < 8; i++) snprintf(hex + 3 * i, sizeof hex - 3 * i, "%02x ", b[i]);
    return kd_error(KD_ERR_FORMAT, "%s: not a JPEG or PNG image (%lld bytes starting %s)", path,
                    (long long)size, hex);
}

static kd_status kd__check_size(const char *path, const char *kind, int64_t h, int64_t w) {
    if (h <= 0 || w <= 0)
        return kd_error(KD_ERR_FORMAT, "%s: %s of %lldx%lld pixels is empty", path, kind,
                        (long long)w, (long long)h);
    if (h > KD_IMAGE_MAX_SIDE || w > KD_IMAGE_MAX_SIDE || h * w > KD_IMAGE_MAX_PIXELS)
        return kd_error(KD_ERR_FORMAT,
                        "%s: %s of %lldx%lld pixels is larger than kd decodes (sides up to %d, "
                        "%lld pixels in all: KD_IMAGE_MAX_SIDE, KD_IMAGE_MAX_PIXELS)",
                        path, kind, (long long)w, (long long)h, KD_IMAGE_MAX_SIDE,
                        (long long)KD_IMAGE_MAX_PIXELS);
    return KD_OK;
}

/* ------------------------------------------------------------------- JPEG */

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jb;
    char msg[JMSG_LENGTH_MAX];
    int bad_warning; /* a warning that means corrupt or truncated data */
} kd__jpeg_err;

static void kd__jpeg_error_exit(j_common_ptr ci) {
    kd__jpeg_err *e = (kd__jpeg_err *)ci->err;
    ci->err->format_message(ci, e->msg);
    longjmp(e->jb, 1);
}

/* libjpeg reports truncated or damaged data as warnings and fills the rest
 * of the image with grey; kd treats them as errors (as PIL does), except
 * extraneous bytes before a marker, which are harmless and common. The
 * first such warning ends decoding at once, as an error would: left to go
 * on, libjpeg answers every read past the end of the file with a fake end
 * marker and another warning, so skipping a marker segment that claims
 * 64 KB beyond the end costs some 32,000 reads. */
static void kd__jpeg_emit(j_common_ptr ci, int level) {
    kd__jpeg_err *e = (kd__jpeg_err *)ci->err;
    if (level >= 0) return; /* trace messages */
    if (ci->err->msg_code == JWRN_EXTRANEOUS_DATA) return;
    ci->err->format_message(ci, e->msg);
    e->bad_warning = 1;
    longjmp(e->jb, 1);
}

/* Interleaved row (w pixels of nc = 3 RGB or 4 inverted CMYK bytes) to
 * the planes r, g, b. Kept out of the functions that call setjmp, where the
 * compiler may keep nothing in registers. */
static __attribute__((noinline)) void kd__row_to_planes(const uint8_t *restrict s, int w, int nc,
                                                         uint8_t *restrict r, uint8_t *restrict g,
                                                         uint8_t *restrict b) {
    if (nc == 3) {
        for (int x = 0; x < w; x++, s += 3) r[x] = s[0], g[x] = s[1], b[x] = s[2];
        return;
    }
    /* Adobe CMYK JPEGs store inverted values: R = C * K / 255. */
    for (int x = 0; x < w; x++, s += 4) {
        r[x] = (uint8_t)((s[0] * s[3] + 127) / 255);
        g[x] = (uint8_t)((s[1] * s[3] + 127) / 255);
        b[x] = (uint8_t)((s[2] * s[3] + 127) / 255);
    }
}

/* Stops a progressive JPEG with more than KD__JPEG_MAX_SCANS scans. */
static void kd__jpeg_progress(j_common_ptr ci) {
    j_decompress_ptr d = (j_decompress_ptr)ci;
    if (d->is_decompressor && d->input_scan_number > KD__JPEG_MAX_SCANS) {
        kd__jpeg_err *e = (kd__jpeg_err *)ci->err;
        snprintf(e->msg, sizeof e->msg, "more than %d scans (a scan bomb?)", KD__JPEG_MAX_SCANS);
        longjmp(e->jb, 1);
    }
}

static kd_status kd__jpeg_decode(const char *path, kd_image *im, FILE *fp, int header_only) {
    struct jpeg_decompress_struct ci;
    struct jpeg_progress_mgr prog = {.progress_monitor = kd__jpeg_progress};
    kd__jpeg_err err;
    memset(&err, 0, sizeof err);
    ci.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = kd__jpeg_error_exit;
    err.pub.emit_message = kd__jpeg_emit;
    if (setjmp(err.jb)) {
        jpeg_destroy_decompress(&ci);
        if (err.bad_warning)
            return kd_error(KD_ERR_FORMAT, "%s: corrupt or truncated JPEG data: %s", path, err.msg);
        return kd_error(KD_ERR_FORMAT, "%s: corrupt JPEG: %s", path, err.msg);
    }
    jpeg_create_decompress(&ci);
    ci.progress = &prog;
    jpeg_stdio_src(&ci, fp);
    jpeg_read_header(&ci, TRUE);
    kd_status st = kd__check_size(path, "JPEG", ci.image_height, ci.image_width);
    if (st != KD_OK || header_only) {
        im->c = 3;
        im->h = (int)ci.image_height;
        im->w = (int)ci.image_width;
        jpeg_destroy_decompress(&ci);
        return st;
    }
    ci.mem->max_memory_to_use =
        (long)(10 * (int64_t)ci.image_height * (int64_t)ci.image_width + KD__JPEG_MEM_SLACK);
    int cmyk = ci.jpeg_color_space == JCS_CMYK || ci.jpeg_color_space == JCS_YCCK;
    ci.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
    jpeg_start_decompress(&ci);
    int h = (int)ci.output_height, w = (int)ci.output_width, nc = ci.output_components;
    size_t plane = (size_t)h * (size_t)w;
    if (!kd__grow(&im->data, &im->cap, 3 * plane) ||
        !kd__grow(&im->row.p, &im->row.cap, (size_t)w * (size_t)nc)) {
        jpeg_destroy_decompress(&ci);
        return kd_error(KD_ERR_NOMEM, "%s: cannot allocate a %dx%d image", path, w, h);
    }
    uint8_t *r = im->data, *g = r + plane, *b = g + plane;
    /* A sign of damage longjmps out of any of these calls (kd__jpeg_emit). */
    while (ci.output_scanline < ci.output_height) {
        JSAMPROW row = im->row.p;
        size_t y = ci.output_scanline;
        if (jpeg_read_scanlines(&ci, &row, 1) != 1) break;
        size_t o = y * (size_t)w;
        kd__row_to_planes(im->row.p, w, nc, r + o, g + o, b + o);
    }
    unsigned rows = ci.output_scanline;
    if (rows == ci.output_height) jpeg_finish_decompress(&ci);
    jpeg_destroy_decompress(&ci);
    if (rows != (unsigned)h)
        return kd_error(KD_ERR_FORMAT, "%s: truncated JPEG data: %u of %d rows", path, rows, h);
    im->c = 3;
    im->h = h;
    im->w = w;
    return KD_OK;
}

/* -------------------------------------------------------------------- PNG */

typedef struct {
    FILE *f;
    char msg[256];
    char limit[128]; /* libpng's warning when the IHDR exceeds the user limits */
} kd__png_src;

static void kd__png_read(png_structp png, png_bytep out, png_size_t n) {
    kd__png_src *s = png_get_io_ptr(png);
    if (fread(out, 1, n, s->f) != n)
        png_error(png, ferror(s->f) ? "read error" : "unexpected end of file (truncated)");
}

static void kd__png_error(png_structp png, png_const_charp msg) {
    kd__png_src *s = png_get_error_ptr(png);
    snprintf(s->msg, sizeof s->msg, "%s", msg);
    png_longjmp(png, 1);
}

/* Warnings are ignored, except the one that explains an IHDR beyond the
 * user limits (libpng then fails with "Invalid IHDR data"). */
static void kd__png_warning(png_structp png, png_const_charp msg) {
    kd__png_src *s = png_get_error_ptr(png);
    if (!s->limit[0] && strstr(msg, "exceeds user limit"))
        snprintf(s->limit, sizeof s->limit, "%s", msg);
}

static kd_status kd__png_decode(const char *path, kd_image *im, FILE *fp, int header_only) {
    kd__png_src src = {fp, "", ""};
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &src, kd__png_error, kd__png_warning);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_read_struct(&png, &info, NULL);
        return kd_error(KD_ERR_NOMEM, "%s: cannot create a PNG reader", path);
    }
    /* Set before setjmp and not changed after it, so safe to use after a longjmp. */
    png_bytep *volatile rows = NULL;
    if (setjmp(png_jmpbuf(png))) {
        free(rows);
        png_destroy_read_struct(&png, &info, NULL);
        if (src.limit[0])
            return kd_error(KD_ERR_FORMAT,
                            "%s: PNG larger than kd decodes (%s; sides up to %d, %lld pixels in "
                            "all: KD_IMAGE_MAX_SIDE, KD_IMAGE_MAX_PIXELS)",
                            path, src.limit, KD_IMAGE_MAX_SIDE, (long long)KD_IMAGE_MAX_PIXELS);
        return kd_error(KD_ERR_FORMAT, "%s: corrupt PNG: %s", path, src.msg);
    }
    png_set_read_fn(png, &src, kd__png_read);
    /* Dimensions beyond the limits stop png_read_info at the IHDR chunk. */
    png_set_user_limits(png, KD_IMAGE_MAX_SIDE, KD_IMAGE_MAX_SIDE);
    png_set_chunk_malloc_max(png, KD__PNG_CHUNK_MAX);
    png_read_info(png, info);
    png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    kd_status st = kd__check_size(path, "PNG", h, w);
    if (st != KD_OK || header_only) {
        png_destroy_read_struct(&png, &info, NULL);
        im->c = 3;
        im->h = (int)h;
        im->w = (int)w;
        return st;
    }
    /* To 8-bit RGB: palettes and low bit depths expanded, 16-bit reduced to
     * the high byte, alpha dropped (PIL's convert("RGB")), gray replicated. */
    png_set_expand(png);
    png_set_strip_16(png);
    png_set_strip_alpha(png);
    png_set_gray_to_rgb(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    if (png_get_channels(png, info) != 3 || png_get_bit_depth(png, info) != 8) {
        png_destroy_read_struct(&png, &info, NULL);
        return kd_error(KD_ERR_UNSUPPORTED, "%s: PNG did not convert to 8-bit RGB", path);
    }
    size_t plane = (size_t)h * w, rowbytes = png_get_rowbytes(png, info);
    /* A plain PNG is decoded row by row into the planes; an interlaced one
     * needs the whole interleaved image first. */
    int interlaced = png_get_interlace_type(png, info) != PNG_INTERLACE_NONE;
    if (!kd__grow(&im->row.p, &im->row.cap, rowbytes * (interlaced ? h : 1)) ||
        (interlaced && !(rows = malloc(h * sizeof *rows)))) {
        png_destroy_read_struct(&png, &info, NULL);
        return kd_error(KD_ERR_NOMEM, "%s: cannot allocate a %ux%u image", path, w, h);
    }
    /* The first row before the image: a stream that cannot give one row
     * fails without the image's memory ever being allocated. */
    if (!interlaced) png_read_row(png, im->row.p, NULL);
    if (!kd__grow(&im->data, &im->cap, 3 * plane)) {
        free(rows);
        rows = NULL;
        png_destroy_read_struct(&png, &info, NULL);
        return kd_error(KD_ERR_NOMEM, "%s: cannot allocate a %ux%u image", path, w, h);
    }
    uint8_t *r = im->data, *g = r + plane, *b = g + plane;
    if (interlaced) {
        for (png_uint_32 y = 0; y < h; y++) rows[y] = im->row.p + y * rowbytes;
        png_read_image(png, rows);
        for (size_t y = 0; y < h; y++)
            kd__row_to_planes(im->row.p + y * rowbytes, (int)w, 3, r + y * w, g + y * w,
                              b + y * w);
    } else {
        for (size_t y = 0; y < h; y++) {
            if (y > 0) png_read_row(png, im->row.p, NULL);
            kd__row_to_planes(im->row.p, (int)w, 3, r + y * w, g + y * w, b + y * w);
        }
    }
    png_read_end(png, NULL);
    free(rows);
    rows = NULL;
    png_destroy_read_struct(&png, &info, NULL);
    im->c = 3;
    im->h = (int)h;
    im->w = (int)w;
    return KD_OK;
}

/* ----------------------------------------------------------------- public */

static kd_status kd__image_decode(const char *path, kd_image *im, int header_only) {
    FILE *f = NULL;
    uint8_t sig[8];
    size_t nsig = 0;
    int64_t size = 0;
    KD_TRY(kd__open_image(path, &f, sig, &nsig, &size));
    kd_status st;
    if (kd__is_jpeg(sig, nsig)) st = kd__jpeg_decode(path, im, f, header_only);
    else if (kd__is_png(sig, nsig)) st = kd__png_decode(path, im, f, header_only);
    else st = kd__not_an_image(path, sig, nsig, size);
    fclose(f);
    return st;
}

kd_status kd_image_read(const char *path, kd_image *im) {
    if (!path || !im) return kd_error(KD_ERR_INVALID, "kd_image_read: NULL argument");
    return kd__image_decode(path, im, 0);
}

kd_status kd_image_probe(const char *path, int *c, int *h, int *w) {
    kd_image im = {0};
    kd_status st = kd__image_decode(path, &im, 1);
    *c = im.c;
    *h = im.h;
    *w = im.w;
    kd_image_free(&im);
    return st;
}

/* ------------------------------------------------------------- resampling */

/* Filter taps of one axis: output i reads in[lo[i] .. lo[i] + cnt[i]) with
 * weights wt[i * kmax ...], as PIL's precompute_coeffs (bilinear). */
typedef struct {
    int *lo, *cnt;
    float *wt;
    int kmax;
} kd__taps;

static size_t kd__taps_bytes(int out, double x0, double x1) {
    double scale = (x1 - x0) / out, fs = scale < 1.0 ? 1.0 : scale;
    int kmax = (int)ceil(fs) * 2 + 1;
    size_t b = (size_t)out * (2 * sizeof(int) + (size_t)kmax * sizeof(float));
    return (b + 63) & ~(size_t)63;
}

static void kd__taps_init(kd__taps *t, void *mem, int in, int out, double x0, double x1) {
    double scale = (x1 - x0) / out, fs = scale < 1.0 ? 1.0 : scale, support = fs;
    t->kmax = (int)ceil(fs) * 2 + 1;
    t->lo = mem;
    t->cnt = t->lo + out;
    t->wt = (float *)(t->cnt + out);
    for (int i = 0; i < out; i++) {
        double center = x0 + (i + 0.5) * scale;
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in) hi = in;
        if (hi - lo > t->kmax) hi = lo + t->kmax;
        double wsum = 0;
        float *o = t->wt + (size_t)i * t->kmax;
        for (int j = lo; j < hi; j++) {
            double x = fabs((j - center + 0.5) / fs);
            double v = x < 1.0 ? 1.0 - x : 0.0;
            o[j - lo] = (float)v;
            wsum += v;
        }
        if (wsum <= 0) { /* no tap with weight: the nearest pixel */
            int j = (int)center;
            if (j >= in) j = in - 1;
            if (j < 0) j = 0;
            lo = j, hi = j + 1;
            o[0] = 1.0f;
        } else {
            for (int j = 0; j < hi - lo; j++) o[j] = (float)(o[j] / wsum);
        }
        t->lo[i] = lo;
        t->cnt[i] = hi - lo;
    }
}

kd_status kd_image_resample(const uint8_t *src, int c, int h, int w, double x0, double y0,
                            double x1, double y1, uint8_t *dst, int dst_h, int dst_w, int oy,
                            int ox, int dh, int dw, kd_scratch *scratch) {
    if (dh <= 0 || dw <= 0 || oy < 0 || ox < 0 || oy + dh > dst_h || ox + dw > dst_w || !(x1 > x0) ||
        !(y1 > y0) || x0 < 0 || y0 < 0 || x1 > w || y1 > h)
        return kd_error(KD_ERR_INVALID,
                        "resample: box [%g, %g) x [%g, %g) of a %dx%d image to %dx%d at (%d, %d) "
                        "in %dx%d is invalid",
                        x0, x1, y0, y1, w, h, dw, dh, ox, oy, dst_w, dst_h);
    size_t bx = kd__taps_bytes(dw, x0, x1), by = kd__taps_bytes(dh, y0, y1);
    /* The horizontally filtered rows (at most h) and one accumulator row. */
    size_t tmp = ((size_t)h + 1) * (size_t)dw * sizeof(float);
    uint8_t *mem = kd_scratch_get(scratch, bx + by + tmp);
    if (!mem) return kd_error(KD_ERR_NOMEM, "resample: cannot allocate %zu bytes", bx + by + tmp);
    kd__taps tx, ty;
    kd__taps_init(&tx, mem, w, dw, x0, x1);
    kd__taps_init(&ty, mem + bx, h, dh, y0, y1);
    float *rows = (float *)(mem + bx + by), *acc = rows + (size_t)h * dw;
    /* Source rows the vertical taps touch: [rlo, rhi). */
    int rlo = h, rhi = 0;
    for (int y = 0; y < dh; y++) {
        if (ty.lo[y] < rlo) rlo = ty.lo[y];
        if (ty.lo[y] + ty.cnt[y] > rhi) rhi = ty.lo[y] + ty.cnt[y];
    }
    for (int ch = 0; ch < c; ch++) {
        const uint8_t *plane = src + (size_t)ch * h * w;
        /* Horizontal pass over the rows the vertical pass needs. */
        for (int y = rlo; y < rhi; y++) {
            const uint8_t *in = plane + (size_t)y * w;
            float *o = rows + (size_t)(y - rlo) * dw;
            for (int x = 0; x < dw; x++) {
                const float *k = tx.wt + (size_t)x * tx.kmax;
                const uint8_t *p = in + tx.lo[x];
                float acc = 0;
                for (int j = 0; j < tx.cnt[x]; j++) acc += k[j] * p[j];
                o[x] = acc;
            }
        }
        /* Vertical pass, rounded and clamped to uint8. */
        uint8_t *outp = dst + (size_t)ch * dst_h * dst_w;
        for (int y = 0; y < dh; y++) {
            const float *k = ty.wt + (size_t)y * ty.kmax;
            const float *r0 = rows + (size_t)(ty.lo[y] - rlo) * dw;
            for (int x = 0; x < dw; x++) acc[x] = 0.0f;
            for (int j = 0; j < ty.cnt[y]; j++) {
                const float kj = k[j], *rj = r0 + (size_t)j * dw;
                for (int x = 0; x < dw; x++) acc[x] += kj * rj[x];
            }
            uint8_t *o = outp + (size_t)(oy + y) * dst_w + ox;
            for (int x = 0; x < dw; x++) {
                float v = floorf(acc[x] + 0.5f);
                o[x] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
        }
    }
    return KD_OK;
}

/* torchvision's CenterCrop offset: int(round((size - crop) / 2.0)), with
 * Python's round half to even. */
static int kd__center_offset(int size, int crop) {
    int d = size - crop;
    int q = d / 2;
    if (d % 2 == 0) return q;
    return q % 2 == 0 ? q : q + 1;
}

kd_status kd_image_resize_center_crop(const uint8_t *src, int c, int h, int w, int resize,
                                      uint8_t *dst, int out_h, int out_w, kd_scratch *scratch) {
    if (resize <= 0) resize = out_h > out_w ? out_h : out_w;
    /* Resize: the shorter side to `resize`, the longer one in proportion
     * (int(resize * long / short), as torchvision). */
    int rh, rw;
    if (h <= w) {
        rh = resize;
        rw = (int)((int64_t)resize * w / h);
    } else {
        rw = resize;
        rh = (int)((int64_t)resize * h / w);
    }
    if (rh < 1) rh = 1;
    if (rw < 1) rw = 1;
    /* Per axis: crop a window of the resized image, or centre the whole
     * resized image in a zero-padded output. */
    double sy = (double)h / rh, sx = (double)w / rw;
    int oy = 0, ox = 0, dh = out_h, dw = out_w;
    double y0 = 0, y1 = h, x0 = 0, x1 = w;
    if (rh >= out_h) {
        int top = kd__center_offset(rh, out_h);
        y0 = top * sy;
        y1 = (top + out_h) * sy;
    } else {
        oy = (out_h - rh) / 2;
        dh = rh;
    }
    if (rw >= out_w) {
        int left = kd__center_offset(rw, out_w);
        x0 = left * sx;
        x1 = (left + out_w) * sx;
    } else {
        ox = (out_w - rw) / 2;
        dw = rw;
    }
    if (y1 > h) y1 = h;
    if (x1 > w) x1 = w;
    if (dh != out_h || dw != out_w) memset(dst, 0, (size_t)c * out_h * out_w);
    return kd_image_resample(src, c, h, w, x0, y0, x1, y1, dst, out_h, out_w, oy, ox, dh, dw,
                             scratch);
}
