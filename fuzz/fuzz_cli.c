/* libFuzzer target: the command-line parsers of kd (src/cli/main.c,
 * included here with its main renamed). The input is the argument list,
 * NUL-separated; the first byte picks the parser: 0 kd train, 1 kd distill
 * (kd__parse_train_args, then kd_train_cfg_resolve and kd_distill_cfg_check
 * of the result, as the CLI does before a run), 2 kd eval, 3 kd select, 4 kd
 * export (their flag tables: kd__flags_parse, kd__flags_check; the eval
 * table in every mode). A --config path is
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
    const int which = data[0] % 5;
    const char *cmd = which == 1 ? "distill" : "train";
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
    if (which >= 2) {
        static const struct {
            const char *cmd;
            const kd__flag *tab;
            int n;
        } t[3] = {{"eval", kd__eval_flags, KD__EVAL_NFLAGS},
                  {"select", kd__select_flags, KD__SELECT_NFLAGS},
                  {"export", kd__export_flags, KD__EXPORT_NFLAGS}};
        union {
            kd__eval_opts e;
            kd_select_cfg s;
            kd__export_opts x;
        } o;
        memset(&o, 0, sizeof o);
        if (which == 2) kd__eval_defaults(&o.e);
        unsigned char given[64];
        int k = which - 2;
        if (t[k].n <= (int)sizeof given &&
            kd__flags_parse(t[k].cmd, t[k].tab, t[k].n, argc, argv, &o, given) == KD__FLAGS_GO_ON) {
            static const unsigned modes[3] = {KD__EVAL_ACCURACY, KD__EVAL_KNN, KD__EVAL_LINEAR};
            for (int m = 0; m < (k == 0 ? 3 : 1); m++)
                kd__flags_check(t[k].cmd, t[k].tab, t[k].n, given, k == 0 ? modes[m] : 0,
                                k == 0 ? kd__eval_mode_names : NULL);
        }
        free(text);
        return 0;
    }
    kd_train_cfg c;
    kd_train_cfg_defaults(&c);
    if (which == 1) snprintf(c.distill.method, sizeof c.distill.method, "kd");
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
