/* libFuzzer target: file lists (kd_dataset_open_list). The input is the list;
 * beside it are a.png (a valid 2x2 PNG), b.jpg (a valid 8x8 JPEG) and a
 * subdirectory d/, so that listed paths can resolve. Samples of a list that
 * opens are read (at most 8). */
#include "fuzz_common.h"

#include "kd/data.h"

/* 2x2 RGB PNG and 8x8 grey JPEG. */
static const uint8_t png2x2[] = {
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44,
    0x52, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x08, 0x02, 0x00, 0x00, 0x00, 0xfd,
    0xd4, 0x9a, 0x73, 0x00, 0x00, 0x00, 0x16, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8,
    0xcf, 0xc0, 0xf0, 0x1f, 0x08, 0x19, 0x18, 0xfe, 0x03, 0x01, 0x00, 0x3d, 0xf1, 0x06, 0xfa,
    0x98, 0xb1, 0x1e, 0x7d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60,
    0x82};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kd_fuzz_dir();
    char path[256], lp[256];
    kd_fuzz_write("a.png", png2x2, sizeof png2x2, path, sizeof path);
    kd_fuzz_write("d/c.png", png2x2, sizeof png2x2, path, sizeof path);
    kd_fuzz_write("list.txt", data, size, lp, sizeof lp);
    kd_dataset *ds = NULL;
    if (kd_dataset_open_list(lp, &ds) == KD_OK) {
        kd_image im = {0};
        for (int64_t i = 0; i < kd_dataset_size(ds) && i < 8; i++) {
            int c, h, w;
            kd_dataset_probe(ds, i, &c, &h, &w);
            kd_dataset_read(ds, i, &im);
            kd_dataset_path(ds, i);
        }
        kd_image_free(&im);
        kd_dataset *sub = NULL;
        if (kd_dataset_subset(ds, 1, 7, &sub) == KD_OK) kd_dataset_free(sub);
        char buf[128];
        kd_dataset_check_labels(ds, ds, kd_dataset_num_classes(ds), buf, sizeof buf);
    }
    kd_dataset_free(ds);
    return 0;
}
