/* The `labels` setting of a training run: which training images keep their
 * labels (kd_dataset_label_subset), what the method then trains on (its
 * kd_method_def.labels decides), and the record of the choice in the run
 * directory (labels.txt), which a resumed run reads back. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "kd/train.h"
#include "train/train_impl.h"

kd_status kd__labels_write(const char *path, const kd__run_labels_out *o, const char *spec, uint64_t seed) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return kd_error(KD_ERR_NOMEM, "out of memory writing %s", path);
    fprintf(f, "# kd labels %s, seed %llu: %lld labeled images of the %lld of %s (training split), one dataset "
            "index per line\n", spec, (unsigned long long)seed, (long long)o->n, (long long)o->n_split, o->split_name);
    for (int64_t i = 0; i < o->n; i++) fprintf(f, "%lld\n", (long long)o->idx[i]);
    fclose(f);
    kd_status s = kd_file_write_atomic(path, text, len);
    free(text);
    return s;
}

kd_status kd__run_labels(const kd_train_cfg *c, int resume, kd_dataset **train, kd__run_labels_out *o) {
    memset(o, 0, sizeof *o);
    if (!c->labels[0]) return KD_OK;
    const kd_method_def *def = kd_method_find(c->distill.method);
    kd_label_use use = def ? def->labels : KD_LABELS_REQUIRED;
    if (use == KD_LABELS_ABSENT) {
        kd_log_msg(KD_LOG_WARN, "labels %s is ignored: method '%s' reads no labels", c->labels, def->name);
        return KD_OK;
    }
    kd_dataset *full = *train;
    o->n_split = kd_dataset_size(full);
    snprintf(o->split_name, sizeof o->split_name, "%s", kd_dataset_name(full));
    char path[600];
    snprintf(path, sizeof path, "%s/labels.txt", c->out);
    kd_status s;
    if (resume && kd_file_exists(path)) {
        /* The run's own record, whatever the spec would draw today. */
        s = kd_label_indices_read(path, full, &o->idx, &o->n);
        o->from_file = 1;
    } else {
        s = kd_dataset_label_subset(full, c->labels, c->seed, &o->idx, &o->n);
    }
    if (s != KD_OK) {
        o->config_error = 1;
        return s;
    }
    kd_dataset *next = NULL;
    if (use == KD_LABELS_REQUIRED) s = kd_dataset_select(full, o->idx, o->n, &next);
    else s = kd_dataset_keep_labels(full, o->idx, o->n, &next);
    if (s != KD_OK) return s;
    kd_log_msg(KD_LOG_INFO, "labels %s: %lld labeled training images of %lld (%s); %s", c->labels, (long long)o->n,
               (long long)kd_dataset_size(full), use == KD_LABELS_REQUIRED ? "training on them" : "the others unlabeled",
               o->from_file ? "read from labels.txt" : "indices in labels.txt");
    kd_dataset_free(full);
    *train = next;
    return KD_OK;
}
