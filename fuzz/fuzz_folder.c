/* libFuzzer target: image folders (kd_dataset_open_folder, _unlabeled and
 * the autodetection of kd_dataset_open_split). The input is a small archive
 * of files: per entry one byte of name length, the name (a relative path;
 * "..", absolute paths and empty components are dropped), two bytes of data
 * length (little-endian) and the data. The input's size picks one of the
 * five ways to open the directory (size % 5: kd_dataset_open_folder,
 * _unlabeled, or _split with KD_SPLIT_TRAIN, _TEST or _UNLABELED), so that
 * each input costs one directory walk, and whether its samples are read
 * in the caller or through a worker thread (one input in eight: a thread
 * start under ASan costs more than the rest of an input). Every sample of a dataset that opens is read through a
 * loader, with skip_bad. */
#include "fuzz_common.h"

#include "kd/data.h"

/* A safe relative path from the name bytes, or 0. */
static int clean_name(const uint8_t *s, size_t n, char *out, size_t on) {
    size_t o = 0;
    int comp = 0;
    for (size_t i = 0; i < n && o + 2 < on; i++) {
        char ch = (char)s[i];
        if (ch == '/') {
            if (comp == 0) continue;
            comp = 0;
        } else {
            if (ch == '\0' || (unsigned char)ch < 32) ch = '_';
            comp++;
        }
        out[o++] = ch;
    }
    while (o > 0 && out[o - 1] == '/') o--;
    out[o] = '\0';
    if (!o || strstr(out, "..")) return 0;
    return 1;
}

static void read_all(kd_dataset *ds, int workers) {
    kd_loader_cfg cfg = {.batch_size = 2, .num_workers = workers, .skip_bad = 1, .seed = 1};
    cfg.transform.out_h = cfg.transform.out_w = 8;
    kd_loader *ld = NULL;
    if (kd_loader_init(&ld, ds, &cfg) == KD_OK) {
        kd_loader_start_epoch(ld, 0);
        kd_batch b;
        while (kd_loader_next(ld, &b) == 1) {
        }
    }
    kd_loader_free(ld);
    int32_t lo, hi;
    kd_dataset_label_range(ds, &lo, &hi);
    char buf[128];
    kd_dataset_missing_classes(ds, kd_dataset_num_classes(ds), buf, sizeof buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *dir = kd_fuzz_dir();
    size_t pos = 0;
    int files = 0;
    while (pos < size && files < 32) {
        size_t nl = data[pos++];
        if (pos + nl + 2 > size) break;
        char name[300], path[600];
        int ok = clean_name(data + pos, nl, name, sizeof name);
        pos += nl;
        size_t dl = (size_t)data[pos] | (size_t)data[pos + 1] << 8;
        pos += 2;
        if (dl > size - pos) dl = size - pos;
        if (ok) {
            kd_fuzz_write(name, data + pos, dl, path, sizeof path);
            files++;
        }
        pos += dl;
    }
    int how = (int)(size % 5), workers = (size / 5) % 8 == 0;
    kd_dataset *ds = NULL;
    kd_status st = how == 0   ? kd_dataset_open_folder(dir, &ds)
                   : how == 1 ? kd_dataset_open_unlabeled(dir, &ds)
                              : kd_dataset_open_split(dir, (kd_split)(how - 2), &ds);
    if (st == KD_OK) read_all(ds, workers);
    kd_dataset_free(ds);
    return 0;
}
