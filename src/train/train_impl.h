/* Internal helpers shared by the train-layer files. */
#ifndef KD_TRAIN_IMPL_H
#define KD_TRAIN_IMPL_H

#include "kd/io.h"
#include "kd/train.h"

kd_status kd__ckpt_add_model(kd_st_writer *w, kd_model *m);
/* Every tensor of pl as "<prefix><name>" (the writer keeps pointers: pl must
 * outlive the save), and back. */
kd_status kd__save_params(kd_st_writer *w, const kd_param_list *pl, const char *prefix);
kd_status kd__load_params(kd_param_list *pl, const kd_st_file *f, const char *prefix);
kd_status kd__model_load_from(kd_model *m, const kd_st_file *f);

/* Writes DIR/curves.svg from DIR/metrics.jsonl (loss and accuracy per epoch). */
kd_status kd__write_curves(const char *dir);

#endif
