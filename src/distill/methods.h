/* Internal: the registered methods, one file per method under src/distill/.
 * A new method adds its extern here and its row in kd__methods (distill.c). */
#ifndef KD_DISTILL_METHODS_H
#define KD_DISTILL_METHODS_H

#include "distill/method_impl.h"

extern const kd_method_def kd__method_none; /* supervised training, no teacher */
extern const kd_method_def kd__method_kd;   /* Hinton et al.: soft labels at temperature T */
extern const kd_method_def kd__method_fitnet; /* Romero et al.: hints through a ConvReg regressor */
extern const kd_method_def kd__method_at;     /* Zagoruyko, Komodakis: attention transfer */
extern const kd_method_def kd__method_sp;     /* Tung, Mori: similarity preserving */
extern const kd_method_def kd__method_cc;     /* Peng et al.: correlation congruence */
extern const kd_method_def kd__method_vid;    /* Ahn et al.: variational information distillation */
extern const kd_method_def kd__method_rkd;    /* Park et al.: relational KD (distances and angles) */
extern const kd_method_def kd__method_pkt;    /* Passalis, Tefas: probabilistic knowledge transfer */
extern const kd_method_def kd__method_nst;    /* Huang, Wang: neuron selectivity transfer (kernel MMD) */
extern const kd_method_def kd__method_pad;    /* Zhang et al.: prime-aware adaptive distillation (variance branch) */
extern const kd_method_def kd__method_dkd;    /* Zhao et al.: decoupled KD (TCKD + NCKD) */
extern const kd_method_def kd__method_dist;   /* Huang et al.: DIST, inter/intra-class Pearson relations */
extern const kd_method_def kd__method_lskd;   /* Sun et al.: KD on standardised logits */
extern const kd_method_def kd__method_crd;    /* Tian et al.: contrastive representation distillation (memory banks) */

#endif
