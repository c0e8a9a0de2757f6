/* libFuzzer target: the CIFAR binary reader (kd_dataset_open_cifar). Byte 0
 * chooses CIFAR-10 (even) or CIFAR-100 (odd); the rest is the test file. */
#include "fuzz_common.h"

#include "kd/data.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *dir = kd_fuzz_dir();
    int variant = data[0] & 1 ? 100 : 10;
    char path[256];
    kd_fuzz_write(variant == 10 ? "test_batch.bin" : "test.bin", data + 1, size - 1, path,
                  sizeof path);
    kd_dataset *ds = NULL;
    if (kd_dataset_open_cifar(dir, variant, 0, &ds) == KD_OK) {
        kd_image im = {0};
        kd_dataset_read(ds, kd_dataset_size(ds) - 1, &im);
        kd_image_free(&im);
        float mean[4], std[4];
        kd_dataset_channel_stats(ds, 4, mean, std);
    }
    kd_dataset_free(ds);
    return 0;
}
