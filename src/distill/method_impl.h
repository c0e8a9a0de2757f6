/* Internal helpers for the method files: everything a method's setup, term and
 * step may call besides the public kd/distill.h. */
#ifndef KD_DISTILL_METHOD_IMPL_H
#define KD_DISTILL_METHOD_IMPL_H

#include <stddef.h>

#include "kd/autograd.h"
#include "kd/distill.h"
#include "kd/nn.h"

/* A method's settings table row: KD__ARG(struct, field, type, "default", "help"). */
#define KD__ARG(st, field, type, def, help) {#field, type, offsetof(st, field), def, help, NULL}
#define KD__ARG_CHOICE(st, field, choices, def, help) \
    {#field, KD_ARG_CHOICE, offsetof(st, field), def, help, choices}
#define KD__ARGS(table) (table), (int)(sizeof(table) / sizeof((table)[0]))

/* Deterministic initialisation stream of the method's modules: the run seed
 * and a key derived from the method name and `what`. */
void kd__method_rng(const kd_method *m, const char *what, kd_rng *r);

/* "(N, C, H, W)" of a shape, for error messages. */
const char *kd__shape_text(int ndim, const int64_t *shape, char *buf, size_t n);

#endif
