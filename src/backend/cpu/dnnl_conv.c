/* Convolutions on oneDNN (dnnl_impl.h): forward, backward data and backward
 * weights (+ bias), activations in their tensors' layouts (plain NCHW,
 * NCHW16C or NHWC), weights kd's OIHW reordered to and from the format
 * oneDNN picks (format_tag_any) through a cached reorder. Precision bf16:
 * the kernels read bf16 operands (float32 ones are rounded in scratch; bf16
 * activations, NCHW16C or NHWC, are read as they are) and write float32
 * gradients; the forward writes a bf16 y when y is a bf16 tensor.
 * Configurations oneDNN rejects go to the ref kernels. */
#include "backend/cpu/dnnl_impl.h"
#include <string.h>

static kd_status ref_conv_fwd(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *x,
                              const kd_tensor *w, const kd_tensor *b, kd_tensor *y) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *px = kd__cpu_ps_plain(&ps, x, 0, &s), *py = kd__cpu_ps_plain(&ps, y, 1, &s);
    if (s == KD_OK) s = ref_be()->conv2d_forward(be, p, px, w, b, py);
    return kd__cpu_ps_finish(&ps, s);
}

static kd_status ref_conv_bwd_data(kd_backend *be, const kd_conv2d_params *p,
                                   const kd_tensor *dy, const kd_tensor *w, kd_tensor *dx,
                                   int accumulate) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = kd__cpu_ps_plain(&ps, dy, 0, &s), *pdx = kd__cpu_ps_plain(&ps, dx, 1, &s);
    if (s == KD_OK) s = ref_be()->conv2d_backward_data(be, p, pdy, w, pdx, accumulate);
    return kd__cpu_ps_finish(&ps, s);
}

static kd_status ref_conv_bwd_weights(kd_backend *be, const kd_conv2d_params *p,
                                      const kd_tensor *dy, const kd_tensor *x, kd_tensor *dw,
                                      kd_tensor *db, int accumulate) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = kd__cpu_ps_plain(&ps, dy, 0, &s), *px = kd__cpu_ps_plain(&ps, x, 0, &s);
    if (s == KD_OK) s = ref_be()->conv2d_backward_weights(be, p, pdy, px, dw, db, accumulate);
    return kd__cpu_ps_finish(&ps, s);
}

/* ------------------------------------------------------------ convolution */

typedef struct {
    int64_t N, C, H, W, O, KH, KW, OH, OW, G;
    kd_layout xl, yl; /* of x (dx) / y (dy): STRIDED, NCHW16C or NHWC */
    int x16;    /* x is a bf16 tensor */
    int y16;    /* forward: y is a bf16 tensor (a bf16 kernel writes bf16; a
                 * float32 one, a stem's, writes float32 in scratch, rounded) */
    int bf16;   /* bf16 operands (float32 ones converted in scratch) */
    /* (h, w) in dnnl_dims_t, the array type oneDNN reads; dil is (dilation - 1). */
    dnnl_dims_t stride, pad_l, pad_r, dil;
} conv_shape;

static void conv_shape_init(conv_shape *c, const kd_conv2d_params *p, const kd_tensor *x,
                            const kd_tensor *w, const kd_tensor *y) {
    memset(c, 0, sizeof *c);
    c->N = x->shape[0], c->C = x->shape[1], c->H = x->shape[2], c->W = x->shape[3];
    c->O = w->shape[0], c->KH = w->shape[2], c->KW = w->shape[3];
    c->OH = y->shape[2], c->OW = y->shape[3];
    c->G = p->groups > 0 ? p->groups : 1;
    c->xl = x->layout;
    c->yl = y->layout;
    c->x16 = x->dtype == KD_BF16;
    c->y16 = y->dtype == KD_BF16;
    c->bf16 = (p->bf16 && kd__backend_cpu()->bf16 == 1) || c->x16;
    int64_t in[2] = {c->H, c->W}, out[2] = {c->OH, c->OW}, k[2] = {c->KH, c->KW};
    for (int i = 0; i < 2; i++) {
        c->stride[i] = p->stride[i];
        c->pad_l[i] = p->pad[i];
        c->dil[i] = p->dilation[i] - 1;
        c->pad_r[i] = right_pad(in[i], out[i], p->dilation[i] * (k[i] - 1) + 1, p->stride[i],
                                p->pad[i]);
    }
}

static void conv_key(prim_key *k, prim_kind kind, const conv_shape *c, int has_bias) {
    kd__cpu_key_init(k, kind);
    k->flags = has_bias;
    k->lay = (int)c->xl | (int)c->yl << 2 | c->bf16 << 4 | (c->bf16 && c->y16) << 5;
    int64_t v[] = {c->N, c->C, c->H, c->W, c->O, c->KH, c->KW, c->OH, c->OW, c->G,
                   c->stride[0], c->stride[1], c->pad_l[0], c->pad_l[1], c->dil[0], c->dil[1]};
    memcpy(k->d, v, sizeof v);
}

/* The one place that picks conv memory layouts: activations in their
 * tensors' layouts; weights plain when both activations are plain, else
 * dnnl_format_tag_any (oneDNN's blocked kernels want blocked weights, and
 * each of forward / backward data / backward weights picks its own: forcing
 * the forward's format on the backward passes falls back to ref:any). */
static void conv_layout_tags(const conv_shape *c, dnnl_format_tag_t *src, dnnl_format_tag_t *dst,
                             dnnl_format_tag_t *wei) {
    *src = act_tag_of(c->xl);
    *dst = act_tag_of(c->yl);
    *wei = (c->xl != KD_LAYOUT_STRIDED || c->yl != KD_LAYOUT_STRIDED) ? dnnl_format_tag_any
           : c->G > 1                                                 ? dnnl_goihw
                                                                      : dnnl_oihw;
}

/* kd's weight layout: OIHW, or GOIHW for grouped convs. */
static dnnl_status_t conv_plain_wmd(const conv_shape *c, dnnl_memory_desc_t *wei) {
    if (c->G > 1) {
        dnnl_dims_t wd = {c->G, c->O / c->G, c->C / c->G, c->KH, c->KW};
        return dnnl_memory_desc_init_by_tag(wei, 5, wd, dnnl_f32, dnnl_goihw);
    }
    dnnl_dims_t wd = {c->O, c->C, c->KH, c->KW};
    return dnnl_memory_desc_init_by_tag(wei, 4, wd, dnnl_f32, dnnl_oihw);
}

/* Memory descriptors of a conv of `kind`: src (N, C, H, W), weights
 * (O, C/G, KH, KW) or (G, O/G, C/G, KH, KW), bias (O), dst (N, O, OH, OW).
 * All float32, except in bf16 mode, where what the kernel reads is bf16
 * (forward: src, weights; backward data: diff_dst, weights; backward
 * weights: src, diff_dst) and what it writes stays float32 but for a bf16
 * forward y. kind 0 gives the
 * all-bf16 forward that backward pds are hinted with. */
static dnnl_status_t conv_mds(const conv_shape *c, int kind, dnnl_memory_desc_t *src,
                              dnnl_memory_desc_t *wei, dnnl_memory_desc_t *bias,
                              dnnl_memory_desc_t *dst) {
    dnnl_format_tag_t src_tag, dst_tag, wei_tag;
    conv_layout_tags(c, &src_tag, &dst_tag, &wei_tag);
    dnnl_data_type_t ts = dnnl_f32, tw = dnnl_f32, td = dnnl_f32;
    if (c->bf16) {
        ts = kind == PK_CONV_BWD_DATA ? dnnl_f32 : dnnl_bf16;
        tw = kind == PK_CONV_BWD_WEIGHTS ? dnnl_f32 : dnnl_bf16;
        td = kind == PK_CONV_FWD ? (c->y16 ? dnnl_bf16 : dnnl_f32) : dnnl_bf16; /* bf16 kernels only */
    }
    dnnl_dims_t sd = {c->N, c->C, c->H, c->W}, dd = {c->N, c->O, c->OH, c->OW}, bd = {c->O};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(src, 4, sd, ts, src_tag);
    if (s == dnnl_success) s = dnnl_memory_desc_init_by_tag(dst, 4, dd, td, dst_tag);
    if (s == dnnl_success) s = dnnl_memory_desc_init_by_tag(bias, 1, bd, dnnl_f32, dnnl_x);
    if (s != dnnl_success) return s;
    if (c->G > 1) {
        dnnl_dims_t wd = {c->G, c->O / c->G, c->C / c->G, c->KH, c->KW};
        return dnnl_memory_desc_init_by_tag(wei, 5, wd, tw, wei_tag);
    }
    dnnl_dims_t wd = {c->O, c->C, c->KH, c->KW};
    return dnnl_memory_desc_init_by_tag(wei, 4, wd, tw, wei_tag);
}

/* For a conv entry created with format_tag_any weights: when the pd's
 * weight format is not kd's OIHW, the cached reorder between the two
 * (OIHW -> pd before forward and backward data; pd -> OIHW after backward
 * weights) and the scratch layout [scratchpads | weights | floats]. */
static kd_status conv_weight_reorder(cpu_state *st, prim_entry *e, prim_kind kind,
                                     const conv_shape *c) {
    const dnnl_memory_desc_t *chosen = dnnl_primitive_desc_query_md(
        e->pd, kind == PK_CONV_BWD_WEIGHTS ? dnnl_query_diff_weights_md : dnnl_query_weights_md,
        0);
    if (!chosen) return kd_error(KD_ERR_BACKEND, "oneDNN: conv pd has no weights descriptor");
    dnnl_memory_desc_t plain;
    KD_TRY(KD_DNNL_CHECK(conv_plain_wmd(c, &plain)));
    if (dnnl_memory_desc_equal(chosen, &plain)) return KD_OK;
    int to_pd = kind != PK_CONV_BWD_WEIGHTS;
    const dnnl_memory_desc_t *from = to_pd ? &plain : chosen, *to = to_pd ? chosen : &plain;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t rpd = NULL;
    kd_status s = KD_DNNL_CHECK(dnnl_primitive_attr_create(&attr));
    if (s == KD_OK)
        s = KD_DNNL_CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
    if (s == KD_OK)
        s = KD_DNNL_CHECK(dnnl_reorder_primitive_desc_create(&rpd, from, st->engine, to,
                                                             st->engine, attr));
    if (s == KD_OK) s = KD_DNNL_CHECK(dnnl_primitive_create(&e->wre, rpd));
    if (s == KD_OK) {
        const dnnl_memory_desc_t *smd = dnnl_primitive_desc_query_md(rpd, dnnl_query_scratchpad_md, 0);
        e->wre_pad = smd ? dnnl_memory_desc_get_size(smd) : 0;
        s = KD_DNNL_CHECK(dnnl_memory_create(&e->wre_mem[0], from, st->engine, DNNL_MEMORY_NONE));
        if (s == KD_OK)
            s = KD_DNNL_CHECK(dnnl_memory_create(&e->wre_mem[1], to, st->engine, DNNL_MEMORY_NONE));
        if (s == KD_OK && e->wre_pad)
            s = KD_DNNL_CHECK(dnnl_memory_create(&e->wre_mem[2], smd, st->engine, DNNL_MEMORY_NONE));
    }
    if (s == KD_OK) {
        size_t pad = e->pad_bytes > e->wre_pad ? e->pad_bytes : e->wre_pad;
        e->wofs = align64(pad);
        e->wbytes = dnnl_memory_desc_get_size(chosen);
        e->scratch_bytes = e->wofs + align64(e->wbytes);
        st->nprims_created++;
    }
    if (rpd) dnnl_primitive_desc_destroy(rpd);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return s;
}

/* Runs e's weight reorder from `from` to `to` (scratch reserved). */
static kd_status conv_run_reorder(cpu_state *st, prim_entry *e, const void *from, void *to) {
    dnnl_exec_arg_t a[3] = {{DNNL_ARG_FROM, e->wre_mem[0]}, {DNNL_ARG_TO, e->wre_mem[1]},
                            {DNNL_ARG_SCRATCHPAD, e->wre_mem[2]}};
    KD_TRY(KD_DNNL_CHECK(dnnl_memory_set_data_handle(e->wre_mem[0], (void *)from)));
    KD_TRY(KD_DNNL_CHECK(dnnl_memory_set_data_handle(e->wre_mem[1], to)));
    if (e->wre_pad)
        KD_TRY(KD_DNNL_CHECK(dnnl_memory_set_data_handle(e->wre_mem[2], st->scratch)));
    KD_TRY(KD_DNNL_CHECK(dnnl_primitive_execute(e->wre, st->stream, e->wre_pad ? 3 : 2, a)));
    return KD_DNNL_CHECK(dnnl_stream_wait(st->stream));
}

static void *conv_wbuf(cpu_state *st, const prim_entry *e) { return (char *)st->scratch + e->wofs; }

/* Finds or creates the conv primitive of `kind` for c. */
static kd_status conv_entry(cpu_state *st, prim_kind kind, const conv_shape *c, int has_bias,
                            prim_entry **out) {
    prim_key k;
    conv_key(&k, kind, c, has_bias);
    uint64_t h = kd__cpu_key_hash(&k);
    if ((*out = kd__cpu_cache_find(st, &k, h))) return KD_OK;

    dnnl_memory_desc_t src, wei, bias, dst, hsrc, hwei, hbias, hdst;
    dnnl_convolution_desc_t op, hint;
    dnnl_status_t s = conv_mds(c, kind, &src, &wei, &bias, &dst);
    if (s == dnnl_success)
        s = conv_mds(c, c->bf16 ? 0 : PK_CONV_FWD, &hsrc, &hwei, &hbias, &hdst);
    const dnnl_memory_desc_t *bmd = has_bias ? &bias : NULL;
    if (s == dnnl_success && kind == PK_CONV_FWD)
        s = dnnl_dilated_convolution_forward_desc_init(
            &op, dnnl_forward_training, dnnl_convolution_direct, &src, &wei, bmd, &dst,
            c->stride, c->dil, c->pad_l, c->pad_r);
    if (s == dnnl_success && kind != PK_CONV_FWD)
        s = dnnl_dilated_convolution_forward_desc_init(
            &hint, dnnl_forward_training, dnnl_convolution_direct, &hsrc, &hwei,
            has_bias ? &hbias : NULL, &hdst, c->stride, c->dil, c->pad_l, c->pad_r);
    if (s == dnnl_success && kind == PK_CONV_BWD_DATA)
        s = dnnl_dilated_convolution_backward_data_desc_init(
            &op, dnnl_convolution_direct, &src, &wei, &dst, c->stride, c->dil, c->pad_l, c->pad_r);
    if (s == dnnl_success && kind == PK_CONV_BWD_WEIGHTS)
        s = dnnl_dilated_convolution_backward_weights_desc_init(
            &op, dnnl_convolution_direct, &src, &wei, bmd, &dst, c->stride, c->dil, c->pad_l,
            c->pad_r);
    KD_TRY(kd__cpu_cache_insert(st, &k, h, s, &op, kind == PK_CONV_FWD ? NULL : &hint, out));
    if ((*out)->pd && (c->xl != KD_LAYOUT_STRIDED || c->yl != KD_LAYOUT_STRIDED || c->bf16)) {
        kd_status ks = conv_weight_reorder(st, *out, kind, c);
        if (ks != KD_OK) {
            /* Keep the cache consistent: the entry stays, rejected. */
            dnnl_primitive_destroy((*out)->prim);
            dnnl_primitive_desc_destroy((*out)->pd);
            (*out)->prim = NULL;
            (*out)->pd = NULL;
            return ks;
        }
    }
    return KD_OK;
}

static kd_status conv_fwd_locked(cpu_state *st, const kd_conv2d_params *p, const kd_tensor *x,
                                 const kd_tensor *w, const kd_tensor *b, kd_tensor *y,
                                 int *use_ref) {
    conv_shape c;
    conv_shape_init(&c, p, x, w, y);
    prim_entry *e;
    KD_TRY(conv_entry(st, PK_CONV_FWD, &c, b != NULL, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    int64_t nx = kd_tensor_numel(x), ny = kd_tensor_numel(y);
    const int cvt = c.bf16 && !c.x16;    /* a float32 x read as bf16 */
    const int round_y = c.y16 && !c.bf16; /* a float32 kernel's y stored as bf16 */
    size_t nxs = cvt ? bf16_floats(nx) : 0;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, nxs + (round_y ? (size_t)ny : 0)));
    const void *xp = x->data, *wp = w->data;
    void *yp = y->data;
    if (cvt) {
        xp = kd__cpu_scratch_floats(st, e, 0);
        kd_bf16_from_f32((uint16_t *)xp, kd_f32(x), nx);
    }
    if (round_y) yp = kd__cpu_scratch_floats(st, e, nxs);
    if (e->wre) {
        wp = conv_wbuf(st, e);
        KD_TRY(conv_run_reorder(st, e, w->data, (void *)wp));
    }
    exec_arg a[4] = {{DNNL_ARG_SRC, xp}, {DNNL_ARG_WEIGHTS, wp}, {DNNL_ARG_DST, yp},
                     {DNNL_ARG_BIAS, b ? b->data : NULL}};
    KD_TRY(kd__cpu_entry_execute(st, e, a, b ? 4 : 3));
    if (round_y) kd_bf16_from_f32((uint16_t *)y->data, (const float *)yp, ny);
    return KD_OK;
}

kd_status kd__cpu_conv2d_forward(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *x,
                                 const kd_tensor *w, const kd_tensor *b, kd_tensor *y) {
    if (!act_4d_any(x) || !plain_4d(w) || !act_4d_any(y) || (b && !plain_f32(b)) ||
        p->groups < 1 || kd_tensor_numel(y) == 0 || kd_tensor_numel(x) == 0)
        return ref_conv_fwd(be, p, x, w, b, y);
    int use_ref = 0;
    kd_status s;
    CPU_RUN_LOCKED(s, conv_fwd_locked(&kd__cpu_st, p, x, w, b, y, &use_ref));
    if (s == KD_OK && use_ref) return ref_conv_fwd(be, p, x, w, b, y);
    return s;
}

static kd_status conv_bwd_data_locked(cpu_state *st, const kd_conv2d_params *p,
                                      const kd_tensor *dy, const kd_tensor *w, kd_tensor *dx,
                                      int accumulate, int *use_ref) {
    conv_shape c;
    conv_shape_init(&c, p, dx, w, dy);
    prim_entry *e;
    KD_TRY(conv_entry(st, PK_CONV_BWD_DATA, &c, 0, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    int64_t n = kd_tensor_numel(dx), ndy = kd_tensor_numel(dy);
    /* scratch floats: [dx when accumulating | dy in bf16] */
    size_t nacc = accumulate ? align64((size_t)n * sizeof(float)) / sizeof(float) : 0;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, nacc + (c.bf16 ? bf16_floats(ndy) : 0)));
    float *out = accumulate ? kd__cpu_scratch_floats(st, e, 0) : kd_f32(dx);
    const void *dyp = dy->data, *wp = w->data;
    if (c.bf16) {
        dyp = kd__cpu_scratch_floats(st, e, nacc);
        kd_bf16_from_f32((uint16_t *)dyp, kd_f32(dy), ndy);
    }
    if (e->wre) {
        wp = conv_wbuf(st, e);
        KD_TRY(conv_run_reorder(st, e, w->data, (void *)wp));
    }
    exec_arg a[3] = {{DNNL_ARG_DIFF_DST, dyp}, {DNNL_ARG_WEIGHTS, wp},
                     {DNNL_ARG_DIFF_SRC, out}};
    KD_TRY(kd__cpu_entry_execute(st, e, a, 3));
    if (accumulate) kd__cpu_add_into(kd_f32(dx), out, n);
    return KD_OK;
}

kd_status kd__cpu_conv2d_backward_data(kd_backend *be, const kd_conv2d_params *p,
                                       const kd_tensor *dy, const kd_tensor *w, kd_tensor *dx,
                                       int accumulate) {
    if (!act_4d(dy) || !plain_4d(w) || !act_4d(dx) || p->groups < 1 ||
        kd_tensor_numel(dy) == 0 || kd_tensor_numel(dx) == 0)
        return ref_conv_bwd_data(be, p, dy, w, dx, accumulate);
    int use_ref = 0;
    kd_status s;
    CPU_RUN_LOCKED(s, conv_bwd_data_locked(&kd__cpu_st, p, dy, w, dx, accumulate, &use_ref));
    if (s == KD_OK && use_ref) return ref_conv_bwd_data(be, p, dy, w, dx, accumulate);
    return s;
}

static kd_status conv_bwd_weights_locked(cpu_state *st, const kd_conv2d_params *p,
                                         const kd_tensor *dy, const kd_tensor *x, kd_tensor *dw,
                                         kd_tensor *db, int accumulate, int *use_ref) {
    conv_shape c;
    conv_shape_init(&c, p, x, dw, dy);
    /* oneDNN 2.6's bf16 backward-weights kernel (jit_bf16:avx512_core_bf16)
     * is pathological on strided spatial convs: 2-8 GFLOP/s against 30-185
     * in float32 for the stride-2 3x3 convs of the CIFAR ResNets (measured
     * here, same process). Those run in float32; 1x1 and stride-1 stay bf16. */
    if (c.bf16 && (c.stride[0] > 1 || c.stride[1] > 1) && (c.KH > 1 || c.KW > 1)) c.bf16 = 0;
    c.y16 = 0; /* dy is a float32 gradient */
    prim_entry *e;
    KD_TRY(conv_entry(st, PK_CONV_BWD_WEIGHTS, &c, db != NULL, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    /* With accumulate=1 the gradients land in scratch: dw, then db (64-byte aligned). */
    int64_t nw = kd_tensor_numel(dw), nb = db ? kd_tensor_numel(db) : 0;
    size_t nw_pad = align64((size_t)nw * sizeof(float)) / sizeof(float);
    size_t nacc = accumulate ? nw_pad + align64((size_t)nb * sizeof(float)) / sizeof(float) : 0;
    /* scratch floats: [dw, db when accumulating | x converted | dy in bf16].
     * x is converted when its type is not the kernel's: a float32 x read as
     * bf16, or a bf16 x for a float32 kernel (the stride-2 rule above). */
    int64_t nx = kd_tensor_numel(x), ndy = kd_tensor_numel(dy);
    const int cvt_x = c.bf16 != c.x16;
    size_t nxs = !cvt_x ? 0 : c.bf16 ? bf16_floats(nx) : align64((size_t)nx * sizeof(float)) / sizeof(float);
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, nacc + nxs + (c.bf16 ? bf16_floats(ndy) : 0)));
    float *ow = accumulate ? kd__cpu_scratch_floats(st, e, 0) : kd_f32(dw);
    float *ob = !db ? NULL : accumulate ? kd__cpu_scratch_floats(st, e, nw_pad) : kd_f32(db);
    const void *xp = x->data, *dyp = dy->data;
    if (cvt_x) {
        xp = kd__cpu_scratch_floats(st, e, nacc);
        if (c.bf16)
            kd_bf16_from_f32((uint16_t *)xp, kd_f32(x), nx);
        else
            kd_bf16_to_f32((float *)xp, (const uint16_t *)x->data, nx);
    }
    if (c.bf16) {
        dyp = kd__cpu_scratch_floats(st, e, nacc + nxs);
        kd_bf16_from_f32((uint16_t *)dyp, kd_f32(dy), ndy);
    }
    /* Weights in the pd's format land in the weights buffer, then reorder to OIHW. */
    exec_arg a[4] = {{DNNL_ARG_SRC, xp}, {DNNL_ARG_DIFF_DST, dyp},
                     {DNNL_ARG_DIFF_WEIGHTS, e->wre ? conv_wbuf(st, e) : (void *)ow},
                     {DNNL_ARG_DIFF_BIAS, ob}};
    KD_TRY(kd__cpu_entry_execute(st, e, a, db ? 4 : 3));
    if (e->wre) KD_TRY(conv_run_reorder(st, e, conv_wbuf(st, e), ow));
    if (accumulate) {
        kd__cpu_add_into(kd_f32(dw), ow, nw);
        if (db) kd__cpu_add_into(kd_f32(db), ob, nb);
    }
    return KD_OK;
}

kd_status kd__cpu_conv2d_backward_weights(kd_backend *be, const kd_conv2d_params *p,
                                          const kd_tensor *dy, const kd_tensor *x,
                                          kd_tensor *dw, kd_tensor *db, int accumulate) {
    if (!act_4d(dy) || !act_4d_any(x) || !plain_4d(dw) || (db && !plain_f32(db)) ||
        p->groups < 1 || kd_tensor_numel(dy) == 0 || kd_tensor_numel(x) == 0)
        return ref_conv_bwd_weights(be, p, dy, x, dw, db, accumulate);
    int use_ref = 0;
    kd_status s;
    CPU_RUN_LOCKED(s, conv_bwd_weights_locked(&kd__cpu_st, p, dy, x, dw, db, accumulate, &use_ref));
    if (s == KD_OK && use_ref)
        return ref_conv_bwd_weights(be, p, dy, x, dw, db, accumulate);
    return s;
}
