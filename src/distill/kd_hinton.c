/* Vanilla knowledge distillation (Hinton et al., 2015) as RepDistiller runs it
 * (distiller_zoo/KD.py, scripts/run_cifar_distill.sh):
 *     L = 0.1 * CE(s, y) + 0.9 * KL(softmax(t/4) || softmax(s/4)) * 4^2
 * The whole loss is the shared gamma/alpha terms; there is no extra module.
 * "none" is plain supervised training with the same machinery. */
#include "distill/methods.h"

const kd_distill_method kd__method_kd = {
    .name = "kd",
    .summary = "Hinton KD: gamma*CE + alpha*T^2*KL(teacher || student) at temperature T",
    .gamma = 0.1f,
    .alpha = 0.9f,
    .beta = 0.0f,
    .T = 4.0f,
    .needs_teacher = 1,
};

const kd_distill_method kd__method_none = {
    .name = "none",
    .summary = "supervised training with cross-entropy only (no teacher)",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 0.0f,
    .T = 1.0f,
    .needs_teacher = 0,
};
