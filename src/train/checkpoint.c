/* Model and training checkpoints in safetensors with PyTorch state_dict names.
 * A training checkpoint adds the optimiser state ("optim.<param>.momentum_buffer",
 * ...), the method's modules and state ("distill.<param>") and an EMA copy of
 * the student ("ema.<param>") to the model's tensors (kd_trainer_save_state), and
 * its progress to the metadata; PyTorch loads the model part with
 * load_state_dict(strict=False) or after filtering those prefixes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "kd/train.h"
#include "train/train_impl.h"

kd_status kd__save_params(kd_st_writer *w, const kd_param_list *pl, const char *prefix) {
    for (int i = 0; i < pl->n; i++) {
        char name[256];
        snprintf(name, sizeof name, "%s%s", prefix, pl->items[i].name);
        KD_TRY(kd_st_writer_add_tensor(w, name, pl->items[i].t));
    }
    return KD_OK;
}

kd_status kd__ckpt_add_model(kd_st_writer *w, kd_model *m) {
    KD_TRY(kd__save_params(w, kd_model_params(m), ""));
    const kd_model_cfg *mc = kd_model_config(m);
    char v[32];
    KD_TRY(kd_st_writer_set_meta(w, "format", "kd-checkpoint-1"));
    KD_TRY(kd_st_writer_set_meta(w, "arch", kd_model_arch(m)));
    snprintf(v, sizeof v, "%d", mc->in_channels);
    KD_TRY(kd_st_writer_set_meta(w, "in_channels", v));
    snprintf(v, sizeof v, "%d", mc->num_classes);
    KD_TRY(kd_st_writer_set_meta(w, "num_classes", v));
    if (mc->head_layers > 0) {
        snprintf(v, sizeof v, "%d", mc->head_layers);
        KD_TRY(kd_st_writer_set_meta(w, "head_layers", v));
    }
    KD_TRY(kd_st_writer_set_meta(w, "kd_version", kd_version()));
    return KD_OK;
}

kd_status kd_model_save(kd_model *m, const char *path) {
    kd_st_writer *w = NULL;
    KD_TRY(kd_st_writer_init(&w));
    kd_status s = kd__ckpt_add_model(w, m);
    if (s == KD_OK) s = kd_st_writer_save(w, path);
    kd_st_writer_free(w);
    return s;
}

kd_status kd_encoder_save(kd_model *m, const kd_method *method, const char *path) {
    kd_st_writer *w = NULL;
    KD_TRY(kd_st_writer_init(&w));
    kd_status s = kd__ckpt_add_model(w, m);
    kd_param_list *pl = kd_method_params((kd_method *)method);
    int heads = 0;
    for (int i = 0; s == KD_OK && i < pl->n; i++)
        if (!strncmp(pl->items[i].name, "head.", 5)) {
            s = kd_st_writer_add_tensor(w, pl->items[i].name, pl->items[i].t);
            heads++;
        }
    if (s == KD_OK) s = kd_st_writer_set_meta(w, "ssl_method", kd_method_get_def(method)->name);
    /* SimCLRv2's head has a batch norm at index 1; the MLP head a ReLU. */
    if (s == KD_OK && heads)
        s = kd_st_writer_set_meta(w, "head", kd_params_find(pl, "head.1.weight") ? "simclr" : "mlp");
    if (s == KD_OK) s = kd_st_writer_save(w, path);
    kd_st_writer_free(w);
    return s;
}

kd_status kd__load_params(kd_param_list *pl, const kd_st_file *f, const char *prefix) {
    for (int i = 0; i < pl->n; i++) {
        char name[256];
        snprintf(name, sizeof name, "%s%s", prefix, pl->items[i].name);
        KD_TRY(kd_st_read_into(f, name, pl->items[i].t));
    }
    return KD_OK;
}

/* A model with head layers before its classifier (kd_model_cfg.head_layers,
 * the ft_proj_selector setting) loads a checkpoint of the same kind (its
 * metadata "head_layers"), or, to start a fine-tune, an encoder whose
 * projection head is SimCLRv2's (metadata "head" simclr, tensors head.0.*). */
static kd_status kd__check_head_layers(const kd_model *m, const kd_st_file *f) {
    const char *hl = kd_st_meta(f, "head_layers"), *head = kd_st_meta(f, "head");
    const int want = kd_model_config(m)->head_layers, have = hl ? atoi(hl) : 0;
    if (hl && have != want)
        return kd_error(KD_ERR_SHAPE, "%s holds a model with %d projection-head layer%s before its classifier "
                        "(ft_proj_selector %d); this model has %d (ft_proj_selector %d)", kd_st_path(f), have,
                        have == 1 ? "" : "s", have, want, want);
    if (hl || want == 0) return KD_OK;
    if ((head && strcmp(head, "simclr")) || !kd_st_find(f, "head.0.weight") || !kd_st_find(f, "head.1.weight")) {
        char what[64];
        if (head) snprintf(what, sizeof what, "a '%s' projection head", head);
        else snprintf(what, sizeof what, "no SimCLRv2 head (head.0, head.1)");
        return kd_error(KD_ERR_INVALID, "ft_proj_selector %d fine-tunes from the first %s of the SimCLRv2 projection "
                        "head, but %s has %s: give the encoder.safetensors of `kd pretrain --method simclr`, or "
                        "set ft_proj_selector 0", want, want == 1 ? "layer" : "layers", kd_st_path(f), what);
    }
    return KD_OK;
}

kd_status kd__model_load_from(kd_model *m, const kd_st_file *f) {
    const char *arch = kd_st_meta(f, "arch");
    if (arch && strcmp(arch, kd_model_arch(m)) != 0)
        return kd_error(KD_ERR_SHAPE, "%s holds a '%s' model, not a '%s'", kd_st_path(f), arch, kd_model_arch(m));
    KD_TRY(kd__check_head_layers(m, f));
    return kd__load_params(kd_model_params(m), f, "");
}

kd_status kd_model_load(kd_model *m, const char *path) {
    kd_st_file *f = NULL;
    KD_TRY(kd_st_open(path, &f));
    kd_status s = kd__model_load_from(m, f);
    kd_st_close(f);
    return s;
}

kd_status kd_model_load_new(const char *path, const char *arch, const kd_model_cfg *cfg, kd_model **out) {
    *out = NULL;
    kd_st_file *f = NULL;
    KD_TRY(kd_st_open(path, &f));
    const char *a = (arch && arch[0]) ? arch : kd_st_meta(f, "arch");
    kd_status s = KD_OK;
    if (!a) {
        s = kd_error(KD_ERR_INVALID, "%s does not name its architecture: give it (--teacher ARCH)", path);
        goto done;
    }
    kd_model_cfg mc = *cfg;
    const char *hl = kd_st_meta(f, "head_layers");
    mc.head_layers = hl ? atoi(hl) : 0; /* the file's; range-checked by kd_model_create */
    /* A checkpoint's own class count wins, so a mismatch is reported as such. */
    const char *nc = kd_st_meta(f, "num_classes");
    if (nc && atoi(nc) > 0 && atoi(nc) != cfg->num_classes) {
        s = kd_error(KD_ERR_SHAPE, "%s was trained for %s classes, the data has %d", path, nc, cfg->num_classes);
        goto done;
    }
    s = kd_model_create(a, &mc, out);
    if (s != KD_OK) goto done;
    s = kd__model_load_from(*out, f);
    if (s != KD_OK) {
        kd_model_free(*out);
        *out = NULL;
    }
done:
    kd_st_close(f);
    return s;
}

kd_status kd_model_export(const char *ckpt, const char *out, int ema) {
    kd_st_file *f = NULL;
    KD_TRY(kd_st_open(ckpt, &f));
    const char *arch = kd_st_meta(f, "arch"), *ic = kd_st_meta(f, "in_channels"), *nc = kd_st_meta(f, "num_classes");
    const char *hl = kd_st_meta(f, "head_layers");
    kd_model *m = NULL;
    kd_status s = KD_OK;
    if (!arch || !ic || !nc || atoi(ic) < 1 || atoi(nc) < 1) {
        s = kd_error(KD_ERR_FORMAT, "%s is not a checkpoint written by kd (its metadata lacks arch, in_channels or "
                     "num_classes)", ckpt);
        goto done;
    }
    kd_model_cfg mc = {.in_channels = atoi(ic), .num_classes = atoi(nc), .head_layers = hl ? atoi(hl) : 0};
    if ((s = kd_model_create(arch, &mc, &m)) != KD_OK) goto done;
    if (ema) {
        const kd_param_list *pl = kd_model_params(m);
        char first[256];
        snprintf(first, sizeof first, "ema.%s", pl->n ? pl->items[0].name : "");
        if (!kd_st_find(f, first)) {
            s = kd_error(KD_ERR_INVALID, "%s holds no EMA copy of the model (no tensor %s): the run had no EMA "
                         "role; export the model itself (ema 0)", ckpt, first);
            goto done;
        }
        s = kd__load_params(kd_model_params(m), f, "ema.");
    } else {
        s = kd__model_load_from(m, f);
    }
    if (s == KD_OK) s = kd_model_save(m, out);
done:
    kd_model_free(m);
    kd_st_close(f);
    return s;
}
