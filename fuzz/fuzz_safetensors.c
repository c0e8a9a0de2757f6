/* libFuzzer target: the safetensors reader (kd_st_open) and its accessors. */
#include "fuzz_common.h"

#include "kd/io.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kd_fuzz_dir();
    char path[256];
    kd_fuzz_write("f.safetensors", data, size, path, sizeof path);
    kd_st_file *f = NULL;
    if (kd_st_open(path, &f) == KD_OK) {
        volatile uint8_t sink = 0;
        for (int i = 0; i < kd_st_count(f); i++) {
            const kd_st_entry *e = kd_st_get(f, i);
            if (e->nbytes) sink ^= ((const uint8_t *)e->data)[0] ^ ((const uint8_t *)e->data)[e->nbytes - 1];
            kd_st_find(f, e->name);
        }
        kd_st_meta(f, "format");
        (void)sink;
    }
    kd_st_close(f);
    return 0;
}
