/* Internal: DINO's pieces that tests reach directly (dino.c implements
 * them): the schedules of facebookresearch/dino utils.cosine_scheduler and
 * DINOLoss' teacher-temperature warm-up. */
#ifndef KD_DISTILL_DINO_H
#define KD_DISTILL_DINO_H

#include <stdint.h>

/* utils.cosine_scheduler(base, final, epochs, niter) without warm-up, at
 * iteration it of total = epochs * niter: final + 0.5 (base - final)
 * (1 + cos(pi it / total)), in double as numpy. */
double kd__dino_cosine(double base, double final, int64_t it, int64_t total);

/* DINOLoss.teacher_temp_schedule[epoch]: np.linspace(warmup, temp, W) for
 * the first W epochs (W = 1 gives warmup), then temp. */
double kd__dino_teacher_temp(double warmup, double temp, int warmup_epochs, int epoch);

#endif
