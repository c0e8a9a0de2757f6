/* libFuzzer target: the STL-10 reader (kd_dataset_open_stl10). Byte 0 gives
 * the number of image records (1-4, or a size that is not a multiple of the
 * record when bit 3 is set) and the split; the rest is the labels file. The
 * images file is sparse, so its records read as zeros. */
#include "fuzz_common.h"

#include <fcntl.h>

#include "kd/data.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *dir = kd_fuzz_dir();
    int recs = 1 + (data[0] & 3), odd = data[0] & 8, test = data[0] & 16;
    kd_split split = data[0] & 32 ? KD_SPLIT_UNLABELED : test ? KD_SPLIT_TEST : KD_SPLIT_TRAIN;
    static const char *pre[3] = {"train", "test", "unlabeled"};
    char rel[64], path[256];
    snprintf(rel, sizeof rel, "%s_X.bin", pre[split]);
    kd_fuzz_write(rel, "", 0, path, sizeof path);
    if (truncate(path, (off_t)recs * 27648 + (odd ? 100 : 0)) != 0) return 0;
    snprintf(rel, sizeof rel, "%s_y.bin", pre[split]);
    kd_fuzz_write(rel, data + 1, size - 1, path, sizeof path);
    kd_dataset *ds = NULL;
    if (kd_dataset_open_stl10(dir, split, &ds) == KD_OK) {
        kd_image im = {0};
        for (int64_t i = 0; i < kd_dataset_size(ds); i++) kd_dataset_read(ds, i, &im);
        kd_image_free(&im);
        kd_dataset *sub = NULL;
        if (kd_dataset_subset(ds, 1, data[0], &sub) == KD_OK) kd_dataset_free(sub);
    }
    kd_dataset_free(ds);
    return 0;
}
