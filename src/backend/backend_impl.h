/*
 * backend_impl.h: internal constructors of the built-in backends, used by the
 * registry (src/backend/registry.c) and by backends that borrow kernels from
 * each other.
 *
 * Each constructor returns a process-wide object that lives until exit. The
 * ref kernels never read their `be` argument, so another backend may call
 * them with its own pointer, e.g. `kd__backend_ref()->gemm(be, ...)`, to cover
 * an op its library lacks.
 */
#ifndef KD_BACKEND_IMPL_H
#define KD_BACKEND_IMPL_H

#include "kd/backend.h"

/* Plain-C float32 kernels: src/backend/ref/ref.c. Always built. */
kd_backend *kd__backend_ref(void);

/* oneDNN kernels: src/backend/cpu/. Built only with KD_WITH_DNNL. */
kd_backend *kd__backend_cpu(void);

#endif /* KD_BACKEND_IMPL_H */
