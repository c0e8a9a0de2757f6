/* Internal: the registered methods, one file per method under src/distill/.
 * A new method adds its extern here and its row in kd__methods (distill.c). */
#ifndef KD_DISTILL_METHODS_H
#define KD_DISTILL_METHODS_H

#include "distill/method_impl.h"

extern const kd_method_def kd__method_none; /* supervised training, no teacher */
extern const kd_method_def kd__method_kd;   /* Hinton et al.: soft labels at temperature T */

#endif
