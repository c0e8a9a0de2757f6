/*
 * kd/distill.h: one interface for every distillation method.
 *
 * A method is a row of the method table: the extra modules it trains (heads,
 * embeddings, variance branches), its state (memory banks, queues, centres),
 * its loss from the teacher's and the student's outputs, and hooks. The total
 * loss follows RepDistiller:
 *
 *     L = gamma * CE(student, labels) + alpha * KL_T(student || teacher) + beta * L_method
 *
 * with each weight defaulting to the method's published value. The trainer
 * calls kd_distiller_loss() and knows nothing method-specific.
 *
 * Usage:
 *     kd_distill_cfg dc = kd_distill_defaults("kd");   // gamma 0.1, alpha 0.9, T 4
 *     kd_distiller *d;
 *     kd_distiller_create(&dc, &shapes, &d);
 *     ... kd_distiller_loss(d, g, &s_out, &t_out, labels, idx, &loss, &terms);
 */
#ifndef KD_DISTILL_H
#define KD_DISTILL_H

#include "kd/models.h"
#include "kd/nn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char method[32];
    float gamma; /* cross-entropy weight */
    float alpha; /* KL (soft-label) weight */
    float beta;  /* method-specific term weight */
    float T;     /* temperature of the KL term */
    float label_smoothing;
    uint64_t seed;
} kd_distill_cfg;

/* What a method may need to size its modules. */
typedef struct {
    int num_classes;
    int64_t s_feat_dim, t_feat_dim; /* pooled embeddings */
    int64_t n_train;                /* training-set size (memory banks) */
} kd_distill_shapes;

/* The weighted parts of the last loss, for logging. */
typedef struct {
    float ce, kl, method, total;
} kd_distill_terms;

typedef struct kd_distiller kd_distiller;

typedef struct {
    const char *name;
    const char *summary;
    float gamma, alpha, beta, T; /* published defaults */
    int needs_teacher;           /* 0 for plain supervised training ("none") */
    /* Optional: create extra modules in d's parameter list and the state. */
    kd_status (*init)(kd_distiller *d, const kd_distill_shapes *shapes);
    /* Optional: the method term (unweighted); NULL output means "no term". */
    kd_status (*loss)(kd_distiller *d, kd_graph *g, const kd_model_out *s, const kd_model_out *t,
                      const kd_tensor *labels, const int64_t *indices, kd_tensor **out);
    void (*free_state)(kd_distiller *d);
} kd_distill_method;

/* The published defaults of a method (unknown names give an empty method). */
kd_distill_cfg kd_distill_defaults(const char *method);
const kd_distill_method *kd_distill_find(const char *method);
/* Names of the registered methods. */
const char *const *kd_distill_names(int *n);

kd_status kd_distiller_create(const kd_distill_cfg *cfg, const kd_distill_shapes *shapes,
                              kd_distiller **out);
void kd_distiller_free(kd_distiller *d);
const kd_distill_cfg *kd_distiller_config(const kd_distiller *d);
const kd_distill_method *kd_distiller_method(const kd_distiller *d);
int kd_distiller_needs_teacher(const kd_distiller *d);
/* Extra trainable modules (may be empty); the optimiser must include them. */
kd_param_list *kd_distiller_params(kd_distiller *d);
/* Private state of the method. */
void *kd_distiller_state(kd_distiller *d);
void kd_distiller_set_state(kd_distiller *d, void *state);
/* Total loss (scalar) and its terms. t may be NULL when no teacher is used. */
kd_status kd_distiller_loss(kd_distiller *d, kd_graph *g, const kd_model_out *s,
                            const kd_model_out *t, const kd_tensor *labels,
                            const int64_t *indices, kd_tensor **loss, kd_distill_terms *terms);

#ifdef __cplusplus
}
#endif
#endif /* KD_DISTILL_H */
