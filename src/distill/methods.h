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
extern const kd_method_def kd__method_sskd;   /* Xu et al.: SSKD, rotations and self-supervised similarities */
extern const kd_method_def kd__method_simclr; /* Chen et al.: SimCLR(v2) self-supervised pretraining, NT-Xent */
extern const kd_method_def kd__method_moco;   /* He et al. / Chen et al.: MoCo v2, EMA key encoder and queue */
extern const kd_method_def kd__method_dogo;   /* Bhat et al.: DoGo, two self-supervised peers distilling online */
extern const kd_method_def kd__method_ssld;   /* PaddleClas SSLD: symmetric KL on labeled + unlabeled images */
extern const kd_method_def kd__method_simclrv2; /* Chen et al.: SimCLRv2's distillation on unlabeled data */
extern const kd_method_def kd__method_dino;   /* Caron et al.: DINO self-distillation, EMA teacher, multi-crop */
extern const kd_method_def kd__method_esvit;  /* Li et al.: EsViT, DINO's view term + region matching */
extern const kd_method_def kd__method_seed;   /* Fang et al.: SEED, similarity distribution over a teacher queue */

/* SSKD internals (sskd.c), for tests/test_sskd.c. kd__sskd_keep: the keep
 * rule on scores (R, K) with the true entry target[r] of each row: keep[r] =
 * 1 for rows whose target ranks first (ties by index) and for the
 * floor(ratio * #wrong) wrong rows of best rank (ties by row); work holds R
 * int64; returns the number kept. kd__sskd_head_loss: stage 1's loss on the
 * teacher's feat[-1] of an interleaved 4B batch through the head (l0, ReLU,
 * l2), and the rows whose best match is their source (hits, may be NULL). */
int64_t kd__sskd_keep(const float *scores, int64_t R, int64_t K, const int32_t *target, double ratio, uint8_t *keep,
                      int64_t *work);
kd_status kd__sskd_head_loss(kd_graph *g, const kd_linear_layer *l0, const kd_linear_layer *l2, kd_tensor *feat,
                             kd_tensor **loss, int64_t *hits);

#endif
