/* libFuzzer target: the command-line parser of kd train / kd distill
 * (kd__parse_train_args in src/cli/main.c, included here with its main
 * renamed), then kd_train_cfg_resolve and kd_distill_cfg_check of the
 * result, as the CLI does before a run. The input is the argument list,
 * NUL-separated; the first byte picks train or distill. A --config path is
 * whatever the input names. Nothing is trained. The CLI's messages go to
 * stderr: run with -close_fd_mask=2 (fuzz/run.sh does) to silence them. */
#include "fuzz_common.h"

#define main kd__cli_main
#include "../src/cli/main.c"
#undef main

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    kd_fuzz_dir();
    static int quiet;
    if (!quiet) {
        quiet = 1;
        if (!freopen("/dev/null", "w", stdout)) abort();
    }
    const char *cmd = data[0] & 1 ? "distill" : "train";
    char *text = malloc(size);
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    char *argv[65];
    int argc = 0;
    for (size_t i = 0; i < size - 1 && argc < 64;) {
        argv[argc++] = text + i;
        i += strlen(text + i) + 1;
    }
    argv[argc] = NULL;
    kd_train_cfg c;
    kd_train_cfg_defaults(&c);
    if (data[0] & 1) snprintf(c.distill.method, sizeof c.distill.method, "kd");
    const char *resume = NULL, *keys[64], *vals[64];
    int nkv = 0, want_help = 0;
    if (kd__parse_train_args(cmd, argc, argv, &c, &resume, keys, vals, &nkv, &want_help) < 0) {
        for (int i = 0; i < nkv; i++) (void)(strlen(keys[i]) + strlen(vals[i]));
        kd_train_cfg check = c;
        kd_train_cfg_resolve(&check);
        kd_distill_cfg_check(&c.distill);
    }
    free(text);
    return 0;
}
