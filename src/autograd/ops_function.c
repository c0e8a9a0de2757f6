/* KD_OP_FUNCTION: custom differentiable functions (kd_function), the C
 * analogue of torch.autograd.Function. The graph records the function, an
 * arena copy of its parameters and what its forward saved; the backward rule
 * hands the function zeroed-or-accumulating gradient buffers to add into. */
#include <string.h>

#include "autograd/autograd_impl.h"

void *kd_function_alloc(kd_graph *g, size_t bytes) {
    if (!g || g->status != KD_OK) return NULL;
    return kd__scratch(g, bytes ? bytes : 1);
}

kd_tensor *kd_function_apply(kd_graph *g, const kd_function *fn, const void *params, size_t params_size,
                             int n_in, kd_tensor *const *in, int out_ndim, const int64_t *out_shape) {
    if (!g || g->status != KD_OK) return NULL;
    const char *name = fn && fn->name ? fn->name : "function";
    if (!fn || !fn->forward || !fn->backward)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "function %s: forward and backward are required", name));
    if (n_in < 1 || n_in > KD__NODE_MAX_IN)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "function %s: %d inputs (1 to %d allowed)", name, n_in,
                                    KD__NODE_MAX_IN));
    if (out_ndim < 0 || out_ndim > KD_MAX_DIMS)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "function %s: output rank %d", name, out_ndim));
    if (!kd__ok_inputs(g, name, n_in, in)) return NULL;
    kd_tensor *x[KD__NODE_MAX_IN];
    for (int i = 0; i < n_in; i++) {
        if (!(x[i] = kd__to_strided(g, in[i]))) return NULL;
        if (!kd__check_f32(g, name, "input", x[i])) return NULL;
    }
    void *pcopy = NULL;
    if (params_size) {
        if (!(pcopy = kd__scratch(g, params_size))) return NULL;
        memcpy(pcopy, params, params_size);
    }
    kd_tensor *y = kd__new(g, KD_F32, out_ndim, out_ndim ? out_shape : NULL);
    if (!y) return NULL;
    void *saved = NULL;
    kd_status s = fn->forward(g, pcopy, x, n_in, y, &saved);
    if (s != KD_OK) return kd__fail(g, s);
    if (g->status != KD_OK) return NULL;
    kd__node *nd = kd__record(g, KD_OP_FUNCTION, y, n_in, x);
    if (nd) {
        nd->p.fn.fn = fn;
        nd->p.fn.params = pcopy;
        nd->p.fn.saved = saved;
    }
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__function_backward(kd_graph *g, kd__node *n) {
    const kd_function *fn = n->p.fn.fn;
    kd_tensor *gin[KD__NODE_MAX_IN] = {NULL, NULL, NULL};
    for (int i = 0; i < n->n_in; i++)
        if (kd__needs_grad(g, n->in[i]) && !(gin[i] = kd__grad_acc(g, n->in[i]))) return g->status;
    kd_status s = fn->backward(g, n->p.fn.params, n->p.fn.saved, n->in, n->n_in, n->out, n->out->grad, gin);
    return s;
}
