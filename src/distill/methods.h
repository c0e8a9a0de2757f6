/* Internal: the method table rows, one file per method under src/distill/. */
#ifndef KD_DISTILL_METHODS_H
#define KD_DISTILL_METHODS_H

#include "kd/distill.h"

extern const kd_distill_method kd__method_none; /* supervised training, no teacher */
extern const kd_distill_method kd__method_kd;   /* Hinton et al.: soft labels at temperature T */

#endif
