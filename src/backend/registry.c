/*
 * registry.c: looks up the built-in backends by name and picks the default.
 *
 * "ref" is always built; "cpu" (oneDNN) only with KD_WITH_DNNL. The
 * environment variable KD_BACKEND, when set to a valid name, overrides the
 * default backend (e.g. KD_BACKEND=ref to run a model on the oracle kernels).
 */
#include "backend/backend_impl.h"

#include <stdlib.h>
#include <string.h>

#ifdef KD_WITH_DNNL
#define KD__BACKENDS_AVAILABLE "ref, cpu"
#else
#define KD__BACKENDS_AVAILABLE "ref"
#endif

kd_status kd_backend_get(const char *name, kd_backend **out) {
    if (!out) return kd_error(KD_ERR_INVALID, "kd_backend_get: output pointer is NULL");
    *out = NULL;
    if (!name) return kd_error(KD_ERR_INVALID, "kd_backend_get: backend name is NULL");
    if (strcmp(name, "ref") == 0) {
        *out = kd__backend_ref();
        return KD_OK;
    }
#ifdef KD_WITH_DNNL
    if (strcmp(name, "cpu") == 0) {
        *out = kd__backend_cpu();
        return KD_OK;
    }
#else
    if (strcmp(name, "cpu") == 0)
        return kd_error(KD_ERR_NOT_FOUND,
                        "backend 'cpu' is not built in (configure with -DKD_WITH_DNNL=ON; available: "
                        KD__BACKENDS_AVAILABLE ")");
#endif
    return kd_error(KD_ERR_NOT_FOUND, "unknown backend '%s' (available: " KD__BACKENDS_AVAILABLE ")", name);
}

kd_backend *kd_backend_default(void) {
    const char *env = getenv("KD_BACKEND");
    if (env && env[0]) {
        kd_backend *be = NULL;
        if (kd_backend_get(env, &be) == KD_OK) return be;
        /* Warn once per thread, not on every graph. */
        static _Thread_local int warned = 0;
        if (!warned) kd_log_msg(KD_LOG_WARN, "ignoring KD_BACKEND: %s", kd_last_error());
        warned = 1;
    }
#ifdef KD_WITH_DNNL
    return kd__backend_cpu();
#else
    return kd__backend_ref();
#endif
}
