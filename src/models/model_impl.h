/* Internal: the model object shared by the architecture files and the registry. */
#ifndef KD_MODEL_IMPL_H
#define KD_MODEL_IMPL_H

#include "kd/models.h"

typedef struct {
    kd_status (*forward)(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out);
    void (*free_impl)(void *impl);
} kd__model_vt;

struct kd_model {
    char arch[48];
    kd_model_cfg cfg;
    kd_param_list params; /* owns every tensor, in state_dict order */
    int training;
    int64_t feat_dim;
    const kd__model_vt *vt;
    void *impl;
};

/* Constructors: fill m->params, m->impl, m->vt, m->feat_dim. `arg` comes from
 * the registry row (e.g. depth and widths). */
typedef struct {
    int depth;
    int widths[4];
} kd__arch_arg;

kd_status kd__resnet_cifar_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
kd_status kd__wrn_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);

#endif
