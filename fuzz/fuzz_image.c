/* libFuzzer target: image decoding (kd_image_read, kd_image_probe) of the
 * input as a file; built twice, as fuzz_png and fuzz_jpeg, which differ only
 * in their seed corpora (decoding detects the format by content). Decoded
 * images go through the default Resize + CenterCrop geometry as well.
 * Images whose header declares more than 2^16 pixels are probed, not
 * decoded. A few hundred mutated bytes can declare a progressive JPEG of
 * 10^8 pixels, whose coefficient buffers libjpeg allocates and zeroes
 * before it reads any data (hundreds of MB under ASan, about 1 ms a MB):
 * that held fuzz_jpeg to some 900 inputs a second. A grown corpus then
 * learns to build complete images of millions of pixels from a few hundred
 * bytes, whose per-pixel copies under ASan held it to 400 (at 2^22 pixels)
 * and 1,700 (at 2^20, libjpeg-turbo's own fuzzers' limit) a second. The
 * decoding code is the same for every size, and a side can still reach
 * 65535; kd's own size limits (KD_IMAGE_MAX_SIDE, KD_IMAGE_MAX_PIXELS) and
 * the memory they bound are tested with crafted files in test_hostile. */
#include "fuzz_common.h"

#include "kd/data.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kd_fuzz_dir();
    char path[256];
    kd_fuzz_write("img", data, size, path, sizeof path);
    int c = 0, h = 0, w = 0;
    kd_image_probe(path, &c, &h, &w);
    if ((int64_t)h * w > (int64_t)1 << 16) return 0;
    kd_image im = {0};
    if (kd_image_read(path, &im) == KD_OK) {
        uint8_t dst[3 * 12 * 10];
        kd_scratch sc = {0};
        kd_image_resize_center_crop(im.data, im.c, im.h, im.w, 0, dst, 12, 10, &sc);
        kd_scratch_free(&sc);
    }
    kd_image_free(&im);
    return 0;
}
