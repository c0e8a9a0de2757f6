/* Vanilla knowledge distillation (Hinton et al., 2015) as RepDistiller runs it
 * (distiller_zoo/KD.py, scripts/run_cifar_distill.sh):
 *     L = 0.1 * CE(s, y) + 0.9 * KL(softmax(t/4) || softmax(s/4)) * 4^2
 * The whole loss is the default step's gamma/alpha terms; there is no module
 * and no method term. "none" is plain supervised training on the same step.
 * This is the smallest method file: a table row and nothing else. */
#include "distill/methods.h"

const kd_method_def kd__method_kd = {
    .name = "kd",
    .summary = "Hinton KD: gamma*CE + alpha*T^2*KL(teacher || student) at temperature T",
    .paper = "Hinton, Vinyals, Dean: Distilling the Knowledge in a Neural Network, 2015",
    .gamma = 0.1f,
    .alpha = 0.9f,
    .beta = 0.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
};

const kd_method_def kd__method_none = {
    .name = "none",
    .summary = "supervised training with cross-entropy only (no teacher)",
    .paper = "-",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 0.0f,
    .T = 1.0f,
    .teacher = KD_TEACHER_NONE,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
};
