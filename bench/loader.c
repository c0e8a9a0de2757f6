/* Loader throughput: images per second that kd_loader delivers (read,
 * decode, geometry, crop, flip, normalise into float batches) with 0, 1 and
 * 2 workers, for
 *   - a generated folder of 96x96 JPEGs at their own size (decode + augment),
 *   - a generated folder of 256x256 JPEGs to 224x224 (Resize(256) +
 *     CenterCrop(224): decode + resample + augment),
 *   - a generated STL-10 images file (pread + transpose + augment),
 *   - Fashion-MNIST in memory (the direct path), when installed.
 * The caller only touches each batch, so this is the loader's ceiling; the
 * training loop consumes batches at its own rate (kd train reports images/s).
 * Besides wall-clock images/s, the table gives images per CPU-second (the
 * process's CPU time, workers included): the cost, which stays meaningful
 * on a shared machine where wall-clock rates do not.
 *
 *   bench_loader [N96 [N256 [DIR]]]   defaults: 2000 500 /tmp/kd_bench_loader */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <jpeglib.h>

#include "kd/data.h"

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static double now(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu_now(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

/* A photo-like JPEG (smooth gradients plus texture), quality 90. */
static int write_jpeg(const char *path, int h, int w, int id) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    struct jpeg_compress_struct ci;
    struct jpeg_error_mgr jerr;
    ci.err = jpeg_std_error(&jerr);
    jpeg_create_compress(&ci);
    jpeg_stdio_dest(&ci, f);
    ci.image_width = (JDIMENSION)w;
    ci.image_height = (JDIMENSION)h;
    ci.input_components = 3;
    ci.in_color_space = JCS_RGB;
    jpeg_set_defaults(&ci);
    jpeg_set_quality(&ci, 90, TRUE);
    jpeg_start_compress(&ci, TRUE);
    unsigned char *row = malloc((size_t)w * 3);
    uint32_t s = (uint32_t)id * 2654435761u + 1;
    while (ci.next_scanline < ci.image_height) {
        int y = (int)ci.next_scanline;
        for (int x = 0; x < w; x++) {
            s = s * 1664525u + 1013904223u;
            int noise = (int)(s >> 28) - 8;
            for (int c = 0; c < 3; c++) {
                double v = 128 + 90 * sin(0.05 * x * (c + 1) + 0.3 * id) * cos(0.04 * y + 0.2 * c) + noise;
                row[3 * x + c] = (unsigned char)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
        }
        JSAMPROW rp = row;
        jpeg_write_scanlines(&ci, &rp, 1);
    }
    jpeg_finish_compress(&ci);
    jpeg_destroy_compress(&ci);
    free(row);
    return fclose(f);
}

/* DIR/c<k>/<i>.jpg for n images of h x w in 10 classes (kept if present). */
static int make_folder(const char *dir, int n, int side) {
    char p[4096];
    for (int i = 0; i < n; i++) {
        snprintf(p, sizeof p, "%s/c%d", dir, i % 10);
        mkdir(dir, 0755);
        mkdir(p, 0755);
        snprintf(p, sizeof p, "%s/c%d/%05d.jpg", dir, i % 10, i);
        struct stat sb;
        if (stat(p, &sb) == 0) continue;
        if (write_jpeg(p, side, side, i) != 0) return -1;
    }
    return 0;
}

static int make_stl(const char *dir, int n) {
    char p[4200];
    mkdir(dir, 0755);
    snprintf(p, sizeof p, "%s/train_X.bin", dir);
    struct stat sb;
    if (stat(p, &sb) == 0 && sb.st_size == (off_t)n * 27648) return 0;
    FILE *f = fopen(p, "wb");
    if (!f) return -1;
    unsigned char *rec = malloc(27648);
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < 27648; j++) rec[j] = (unsigned char)(j * 7 + i * 13 + (j >> 7));
        fwrite(rec, 1, 27648, f);
    }
    free(rec);
    fclose(f);
    snprintf(p, sizeof p, "%s/train_y.bin", dir);
    f = fopen(p, "wb");
    for (int i = 0; i < n; i++) fputc(1 + i % 10, f);
    return fclose(f);
}

/* Images/s over `epochs` epochs after one warm-up epoch. */
static double measure(const kd_dataset *ds, const kd_transform_cfg *tf, int workers, int epochs, double *ms_batch,
                      double *per_cpu_s) {
    kd_loader_cfg cfg = {.batch_size = 128, .shuffle = 1, .seed = 1, .num_workers = workers, .transform = *tf};
    kd_loader *l = NULL;
    if (kd_loader_init(&l, ds, &cfg) != KD_OK) {
        fprintf(stderr, "bench_loader: %s\n", kd_last_error());
        exit(1);
    }
    double t0 = 0, c0 = 0, sink = 0;
    int64_t images = 0, batches = 0;
    for (int e = 0; e <= epochs; e++) {
        if (e == 1) t0 = now(), c0 = cpu_now();
        kd_loader_start_epoch(l, e);
        kd_batch b;
        int r;
        while ((r = kd_loader_next(l, &b)) == 1) {
            sink += b.x[0];
            if (e > 0) images += b.n, batches++;
        }
        if (r < 0) {
            fprintf(stderr, "bench_loader: %s\n", kd_last_error());
            exit(1);
        }
    }
    double dt = now() - t0, dc = cpu_now() - c0;
    kd_loader_free(l);
    if (sink == 12345.678) printf(" ");
    *ms_batch = 1e3 * dt / (double)batches;
    *per_cpu_s = (double)images / dc;
    return (double)images / dt;
}

static void row(const char *name, const kd_dataset *ds, const kd_transform_cfg *tf, int epochs) {
    int c = kd_dataset_channels(ds), h = tf->out_h ? tf->out_h : kd_dataset_height(ds),
        w = tf->out_w ? tf->out_w : kd_dataset_width(ds);
    char out[32];
    snprintf(out, sizeof out, "%dx%dx%d", c, h, w);
    for (int nw = 0; nw <= 2; nw++) {
        double ms, cpu, ips = measure(ds, tf, nw, epochs, &ms, &cpu);
        printf("| %-34s | %6lld | %-9s | %7d | %10.0f | %8.2f | %12.0f |\n", name, (long long)kd_dataset_size(ds), out,
               nw, ips, ms, cpu);
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    int n96 = argc > 1 ? atoi(argv[1]) : 2000, n256 = argc > 2 ? atoi(argv[2]) : 500;
    const char *root = argc > 3 ? argv[3] : "/tmp/kd_bench_loader";
    char d96[4096], d256[4096], dstl[4096];
    mkdir(root, 0755);
    snprintf(d96, sizeof d96, "%s/jpeg96_%d", root, n96);
    snprintf(d256, sizeof d256, "%s/jpeg256_%d", root, n256);
    snprintf(dstl, sizeof dstl, "%s/stl_%d", root, n96);
    fprintf(stderr, "bench_loader: generating %s, %s, %s (kept for later runs)\n", d96, d256, dstl);
    if (make_folder(d96, n96, 96) || make_folder(d256, n256, 256) || make_stl(dstl, n96)) {
        fprintf(stderr, "bench_loader: cannot write the generated data under %s\n", root);
        return 1;
    }
    kd_transform_cfg aug = {.pad_crop = 4, .hflip = 1, .normalize = 1,
                            .mean = {0.5f, 0.5f, 0.5f}, .std = {0.25f, 0.25f, 0.25f}};
    printf("batch 128, shuffle, crop+flip+normalise; images/s delivered to a caller that only touches batches\n\n");
    printf("| %-34s | %6s | %-9s | %7s | %10s | %8s | %12s |\n", "data", "N", "out", "workers", "images/s", "ms/batch",
           "img/CPU-s");
    printf("|%s|%s|%s|%s|%s|%s|%s|\n", "------------------------------------", "--------", "-----------", "---------",
           "------------", "----------", "--------------");
    kd_dataset *ds = NULL;
    if (kd_dataset_open_folder(d96, &ds) != KD_OK) goto fail;
    kd_transform_cfg t96 = aug;
    t96.out_h = t96.out_w = 96;
    row("JPEG folder 96x96 (decode)", ds, &t96, 2);
    kd_dataset_free(ds);
    if (kd_dataset_open_folder(d256, &ds) != KD_OK) goto fail;
    kd_transform_cfg t224 = aug;
    t224.out_h = t224.out_w = 224;
    t224.resize = 256;
    row("JPEG folder 256->224 (resize+crop)", ds, &t224, 1);
    kd_dataset_free(ds);
    if (kd_dataset_open_stl10(dstl, KD_SPLIT_TRAIN, &ds) != KD_OK) goto fail;
    row("STL-10 binary 96x96 (pread)", ds, &aug, 2);
    kd_dataset_free(ds);
    ds = NULL;
    if (kd_dataset_open("/usr/share/datasets/fashion-mnist", 1, &ds) == KD_OK) {
        kd_transform_cfg fm = {.pad_crop = 2, .hflip = 1, .normalize = 1, .mean = {0.2860f}, .std = {0.3530f}};
        row("Fashion-MNIST in memory", ds, &fm, 2);
        kd_dataset_free(ds);
    } else {
        printf("(Fashion-MNIST not installed: %s)\n", kd_last_error());
    }
    return 0;
fail:
    fprintf(stderr, "bench_loader: %s\n", kd_last_error());
    return 1;
}
