/* Internal: what the self-supervised methods (simclr, moco, seed) share:
 * projection heads with PyTorch names, the NT-Xent and soft cross-entropy
 * losses, the FIFO queue of embeddings, and the augmentation of their views.
 * ssl.c implements them. */
#ifndef KD_DISTILL_SSL_H
#define KD_DISTILL_SSL_H

#include "distill/method_impl.h"
#include "kd/transforms.h"

/* Projection heads, as nn.Sequential modules under `prefix`:
 *   KD__HEAD_MLP     MoCo v2 / SEED: Linear(d, hidden) -> ReLU -> Linear(hidden, out), both with bias
 *                    (prefix.0, prefix.2; PyTorch default Linear init)
 *   KD__HEAD_SIMCLR  SimCLRv2 (tf2/model.py ProjectionHead, 3 layers): Linear(d, d, no bias) -> BN -> ReLU
 *                    -> Linear(d, d, no bias) -> BN -> ReLU -> Linear(d, out, no bias) -> BN without
 *                    centre (prefix.0/1, .3/4, .6/7; weights N(0, 0.01); the last BN's bias is a buffer fixed
 *                    at 0, as Keras' BatchNormalization(center=False))
 *   KD__HEAD_DOGO    DoGo (models/simclr.py): Linear(d, hidden, no bias) -> BN -> ReLU -> Linear(hidden, out)
 *                    (prefix.0, .1, .3; PyTorch default inits) */
typedef enum { KD__HEAD_MLP = 0, KD__HEAD_SIMCLR = 1, KD__HEAD_DOGO = 2 } kd__head_kind;
#define KD__HEAD_KINDS "mlp|simclr"

typedef struct {
    kd__head_kind kind;
    int n_lin;
    kd_linear_layer lin[3];
    kd_bn_layer bn[3];
    int64_t in, out;
} kd__head;

/* Builds the head in pl under prefix (names as above); kind `trainable` 0
 * makes every tensor a buffer (a frozen teacher's head, a key encoder's EMA
 * head). Initialised from r. */
kd_status kd__head_init(kd__head *h, kd_param_list *pl, const char *prefix, kd__head_kind kind, int64_t in,
                        int64_t hidden, int64_t out, int trainable, kd_rng *r);
/* The head on x (N, in) (a pooled feature; (N, C, 1, 1) is viewed (N, C)).
 * training: batch statistics in its batch norms. */
kd_tensor *kd__head_forward(kd_graph *g, kd__head *h, kd_tensor *x, int training);
/* k = m k + (1 - m) q over the heads' parameters (not running statistics),
 * in float32 as kd_ema_update and MoCo's momentum update. */
void kd__head_ema(kd__head *k, const kd__head *q, double m);
/* Copies the head's tensors from a checkpoint's "<prefix>.*" (PyTorch names),
 * every one required with its shape; errors name the file and the tensor and
 * say which method needs it. A file whose metadata "head" names another kind
 * is refused naming `setting`, the method's setting of the kind. */
kd_status kd__head_load(kd__head *h, const kd_param_list *pl, const char *prefix, const char *path,
                        const char *who, const char *setting);

/* SimCLR's NT-Xent (google-research/simclr tf2/objective.py add_contrastive_loss):
 * z (2B, D) holds view a's rows then view b's; after L2 normalisation each
 * row's logits are its similarities to all 2B rows over tau with its own
 * masked (-1e9), its label the other view of its image; the loss is the sum
 * of both views' mean cross-entropies (SimCLR's 2x convention: 2 * the mean
 * over 2B rows). Differentiable; NULL with the graph status on failure. */
kd_tensor *kd__nt_xent(kd_graph *g, kd_tensor *z, float tau);

/* -(1/N) sum_i sum_k p[i][k] log_softmax(s)[i][k], p = softmax(t / t_temp)
 * (no gradient to t), s already scaled: SEED's loss and MoCo's cross-entropy
 * with soft targets. */
kd_tensor *kd__soft_ce(kd_graph *g, kd_tensor *s_logits, kd_tensor *t_logits, float t_temp);

/* MoCo's queue: (D, K) columns of L2-normalised embeddings (randn columns
 * normalised at creation) and the I64 write pointer, as MoCo and SEED
 * register them ("queue", "queue_ptr"). */
typedef struct {
    kd_tensor *q;   /* (D, K) */
    kd_tensor *ptr; /* (1) I64 */
} kd__queue;
kd_status kd__queue_init(kd__queue *q, kd_param_list *pl, int64_t dim, int64_t K, kd_rng *r);
/* _dequeue_and_enqueue: columns ptr .. ptr + B - 1 (mod K) take the rows of
 * keys (B, D); ptr advances by B mod K. In a data-parallel run the keys of
 * every rank are gathered first (MoCo's and SEED's concat_all_gather) and
 * enqueued in rank order, so every rank holds the same queue. */
kd_status kd__queue_push(kd__queue *q, const float *keys, int64_t B);

/* The views' augmentation of the self-supervised methods:
 *   simclr 1: SimCLR's (tf2/data_util.py): random-resized crop area
 *     (crop_min, 1), aspect (3/4, 4/3), colour jitter (0.8 s, 0.8 s, 0.8 s,
 *     0.2 s) p 0.8 with s = strength, grayscale p 0.2, blur p `blur_p`
 *     (sigma 0.1-2, kernel size / 10 made odd), flip;
 *   simclr 0: MoCo v2's "aug+" (kd_ssl_aug_cfg_mocov2: crop area (crop_min,
 *     1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, blur p blur_p).
 * Output side `size`; normalisation from the run's transform base (the
 * dataset's mean and std). */
void kd__ssl_views_cfg(kd_ssl_aug_cfg *out, int size, int simclr, float strength, float blur_p, float crop_min,
                       const kd_transform_cfg *base);
/* The view_transform hook of the self-supervised methods: aug (in the
 * method's state, so it outlives the loader) becomes kd__ssl_views_cfg's
 * pipeline at the run's output side (tf->out_h, or in_h, the images' own),
 * and tf (the run's base) runs it; KD_ERR_INVALID naming `who` when the
 * images differ in size and no image_size is set. */
kd_status kd__ssl_view(const char *who, kd_ssl_aug_cfg *aug, int in_h, int simclr, float strength, float blur_p,
                       float crop_min, kd_transform_cfg *tf);

/* a[i] . b[i] per row of a, b (B, D) as a (B, 1) column (MoCo's l_pos,
 * SEED's z_s.z_t). */
kd_tensor *kd__ssl_rowdot(kd_graph *g, kd_tensor *a, kd_tensor *b);

/* *x = the images of view 0 and view 1 stacked into one (2B, C, H, W)
 * batch, the layout SimCLR's one forward over both views uses; a batch
 * without exactly 2 views is an error naming the method `who`. */
kd_status kd__ssl_stack_views(kd_graph *g, const kd_step_batch *b, const char *who, kd_tensor **x);

#endif
