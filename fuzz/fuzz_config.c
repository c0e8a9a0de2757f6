/* libFuzzer target: the YAML run configuration (kd_train_cfg_load, then
 * kd_train_cfg_resolve and kd_train_cfg_save of what loaded). */
#include "fuzz_common.h"

#include "kd/train.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kd_fuzz_dir();
    char path[256], out[256];
    kd_fuzz_write("cfg.yaml", data, size, path, sizeof path);
    kd_train_cfg c;
    kd_train_cfg_defaults(&c);
    if (kd_train_cfg_load(&c, path) == KD_OK) {
        kd_train_cfg r = c;
        kd_train_cfg_resolve(&r);
        snprintf(out, sizeof out, "%s/saved.yaml", kd_fuzz_root);
        if (kd_train_cfg_save(&c, out) == KD_OK) {
            kd_train_cfg d;
            kd_train_cfg_defaults(&d);
            kd_train_cfg_load(&d, out);
        }
    }
    return 0;
}
