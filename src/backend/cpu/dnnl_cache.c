/* The cpu backend's state (src/backend/cpu/dnnl_impl.h): one oneDNN engine
 * and stream per process, the primitive cache (a hash map from a prim_key to
 * the primitive descriptor, the primitive and its memory objects; rejected
 * configurations cached too), the one growable scratch buffer every
 * primitive runs on (user-managed scratchpads, then the kernels'
 * temporaries), trim, and the counters tests read. */
#include "backend/cpu/dnnl_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Turns a failing dnnl_status_t into kd_error(KD_ERR_BACKEND) naming the
 * oneDNN call (the text of `expr` up to its '(') and the status. */
kd_status kd__dnnl_check(dnnl_status_t st, const char *expr) {
    if (st == dnnl_success) return KD_OK;
    int n = (int)strcspn(expr, "(");
    return kd_error(KD_ERR_BACKEND, "oneDNN %.*s failed: %s", n, expr, dnnl_status2str(st));
}

cpu_state kd__cpu_st = {.lock = PTHREAD_MUTEX_INITIALIZER};

kd_status kd__cpu_state_init_locked(cpu_state *st) {
    if (st->stream) return KD_OK;
    if (!st->engine) KD_TRY(KD_DNNL_CHECK(dnnl_engine_create(&st->engine, dnnl_cpu, 0)));
    KD_TRY(KD_DNNL_CHECK(dnnl_stream_create(&st->stream, st->engine, dnnl_stream_default_flags)));
    return KD_OK;
}

/* Makes the scratch buffer at least `bytes` long. Invalidates earlier
 * pointers into it, so each kernel reserves once, before carving. */
static kd_status scratch_reserve(cpu_state *st, size_t bytes) {
    if (bytes <= st->scratch_cap) return KD_OK;
    size_t cap = st->scratch_cap + st->scratch_cap / 2;
    if (cap < bytes) cap = bytes;
    cap = (cap + 4095) & ~(size_t)4095;
    kd_aligned_free(st->scratch);
    st->scratch = kd_aligned_alloc(cap);
    if (!st->scratch) {
        st->scratch_cap = 0;
        return kd_error(KD_ERR_NOMEM, "cpu backend: cannot allocate %zu bytes of scratch", cap);
    }
    st->scratch_cap = cap;
    return KD_OK;
}

/* Temporary floats after the scratchpad part of the buffer; `off` in floats. */
float *kd__cpu_scratch_floats(cpu_state *st, const prim_entry *e, size_t off) {
    return (float *)((char *)st->scratch + align64(e ? e->scratch_bytes : 0)) + off;
}

kd_status kd__cpu_scratch_reserve_for(cpu_state *st, const prim_entry *e, size_t nfloats) {
    return scratch_reserve(st, align64(e ? e->scratch_bytes : 0) + nfloats * sizeof(float));
}

/* ------------------------------------------------------------------ cache */

void kd__cpu_key_init(prim_key *k, prim_kind kind) {
    memset(k, 0, sizeof *k);
    k->kind = kind;
}

uint64_t kd__cpu_key_hash(const prim_key *k) {
    const unsigned char *p = (const unsigned char *)k;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < sizeof *k; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

prim_entry *kd__cpu_cache_find(cpu_state *st, const prim_key *k, uint64_t h) {
    for (prim_entry *e = st->buckets[h & (CPU_BUCKETS - 1)]; e; e = e->next)
        if (e->hash == h && memcmp(&e->key, k, sizeof *k) == 0) return e;
    return NULL;
}

static void entry_free(prim_entry *e) {
    for (int i = 0; i < e->nmem; i++) dnnl_memory_destroy(e->mem[i]);
    for (int i = 0; i < 3; i++)
        if (e->wre_mem[i]) dnnl_memory_destroy(e->wre_mem[i]);
    if (e->wre) dnnl_primitive_destroy(e->wre);
    if (e->prim) dnnl_primitive_destroy(e->prim);
    if (e->pd) dnnl_primitive_desc_destroy(e->pd);
    if (e->hint_pd) dnnl_primitive_desc_destroy(e->hint_pd);
    free(e);
}

static const char *kind_name(int kind) {
    switch (kind) {
    case PK_CONV_FWD: return "convolution forward";
    case PK_CONV_BWD_DATA: return "convolution backward data";
    case PK_CONV_BWD_WEIGHTS: return "convolution backward weights";
    case PK_BN_FWD: return "batch normalization forward";
    case PK_BN_BWD: return "batch normalization backward";
    case PK_POOL_FWD: return "pooling forward";
    case PK_POOL_BWD: return "pooling backward";
    case PK_ELTWISE_FWD: return "eltwise forward";
    case PK_ELTWISE_BWD: return "eltwise backward";
    case PK_LN_FWD: return "layer normalization forward";
    case PK_LN_BWD: return "layer normalization backward";
    case PK_MATMUL: return "matmul";
    case PK_SOFTMAX_FWD: return "softmax forward";
    case PK_SOFTMAX_BWD: return "softmax backward";
    }
    return "primitive";
}

static int status_is_rejection(dnnl_status_t s) {
    return s == dnnl_unimplemented || s == dnnl_invalid_arguments;
}

kd_status kd__cpu_cache_insert(cpu_state *st, const prim_key *k, uint64_t h,
                               dnnl_status_t init_status, const_dnnl_op_desc_t op,
                               const_dnnl_op_desc_t hint_op, prim_entry **out) {
    return kd__cpu_cache_insert_sum(st, k, h, init_status, op, hint_op, 0, out);
}

kd_status kd__cpu_cache_insert_sum(cpu_state *st, const prim_key *k, uint64_t h,
                                   dnnl_status_t init_status, const_dnnl_op_desc_t op,
                                   const_dnnl_op_desc_t hint_op, int post_sum, prim_entry **out) {
    *out = NULL;
    prim_entry *e = calloc(1, sizeof *e);
    if (!e) return kd_error(KD_ERR_NOMEM, "cpu backend: out of memory for a cache entry");
    e->key = *k;
    e->hash = h;
    kd_status s = KD_OK;
    dnnl_status_t ds = init_status;
    dnnl_primitive_attr_t attr = NULL;
    if (ds == dnnl_success) {
        s = KD_DNNL_CHECK(dnnl_primitive_attr_create(&attr));
        if (s != KD_OK) goto fail;
        s = KD_DNNL_CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
        if (s != KD_OK) goto fail;
        if (post_sum) {
            dnnl_post_ops_t po = NULL;
            s = KD_DNNL_CHECK(dnnl_post_ops_create(&po));
            if (s == KD_OK) s = KD_DNNL_CHECK(dnnl_post_ops_append_sum(po, 1.0f));
            if (s == KD_OK) s = KD_DNNL_CHECK(dnnl_primitive_attr_set_post_ops(attr, po));
            if (po) dnnl_post_ops_destroy(po);
            if (s != KD_OK) goto fail;
        }
    }
    if (ds == dnnl_success && hint_op)
        ds = dnnl_primitive_desc_create(&e->hint_pd, hint_op, attr, st->engine, NULL);
    if (ds == dnnl_success)
        ds = dnnl_primitive_desc_create(&e->pd, op, attr, st->engine, e->hint_pd);
    if (ds != dnnl_success) {
        if (!status_is_rejection(ds)) {
            s = kd__dnnl_check(ds, "dnnl_primitive_desc_create");
            goto fail;
        }
        /* Rejected: remember it, the caller runs the ref kernel. */
        if (e->pd) dnnl_primitive_desc_destroy(e->pd);
        if (e->hint_pd) dnnl_primitive_desc_destroy(e->hint_pd);
        e->pd = e->hint_pd = NULL;
        kd_log_msg(KD_LOG_DEBUG, "cpu backend: oneDNN rejects this %s (%s); using the ref kernel",
               kind_name(k->kind), dnnl_status2str(ds));
    } else {
        s = KD_DNNL_CHECK(dnnl_primitive_create(&e->prim, e->pd));
        if (s != KD_OK) goto fail;
        st->nprims_created++;
        const dnnl_memory_desc_t *smd = dnnl_primitive_desc_query_md(e->pd, dnnl_query_scratchpad_md, 0);
        e->pad_bytes = smd ? dnnl_memory_desc_get_size(smd) : 0;
        e->scratch_bytes = e->pad_bytes;
    }
    if (attr) dnnl_primitive_attr_destroy(attr);
    prim_entry **b = &st->buckets[h & (CPU_BUCKETS - 1)];
    e->next = *b;
    *b = e;
    st->nentries++;
    *out = e;
    return KD_OK;
fail:
    if (attr) dnnl_primitive_attr_destroy(attr);
    entry_free(e);
    return s;
}

/* The memory object of argument `arg` of e, created on first use from the
 * pd's own descriptor for it, pointed at `ptr`. */
static kd_status entry_mem(cpu_state *st, prim_entry *e, int arg, const void *ptr,
                           dnnl_memory_t *out) {
    int i = 0;
    while (i < e->nmem && e->mem_arg[i] != arg) i++;
    if (i == e->nmem) {
        if (e->nmem == CPU_MAX_ARGS)
            return kd_error(KD_ERR_INTERNAL, "cpu backend: too many arguments for a primitive");
        const dnnl_memory_desc_t *md = dnnl_primitive_desc_query_md(e->pd, dnnl_query_exec_arg_md, arg);
        if (!md) return kd_error(KD_ERR_BACKEND, "oneDNN dnnl_primitive_desc_query_md failed for argument %d", arg);
        KD_TRY(KD_DNNL_CHECK(dnnl_memory_create(&e->mem[i], md, st->engine, DNNL_MEMORY_NONE)));
        e->mem_arg[i] = arg;
        e->nmem++;
    }
    KD_TRY(KD_DNNL_CHECK(dnnl_memory_set_data_handle(e->mem[i], (void *)ptr)));
    *out = e->mem[i];
    return KD_OK;
}

/* Runs e on (args) plus the scratchpad, which must have been reserved. */
kd_status kd__cpu_entry_execute(cpu_state *st, prim_entry *e, const exec_arg *args, int nargs) {
    dnnl_exec_arg_t a[CPU_MAX_ARGS];
    int n = 0;
    for (int i = 0; i < nargs; i++) {
        a[n].arg = args[i].arg;
        KD_TRY(entry_mem(st, e, args[i].arg, args[i].ptr, &a[n].memory));
        n++;
    }
    if (e->pad_bytes) {
        if (st->scratch_cap < e->scratch_bytes)
            return kd_error(KD_ERR_INTERNAL, "cpu backend: scratchpad not reserved");
        a[n].arg = DNNL_ARG_SCRATCHPAD;
        KD_TRY(entry_mem(st, e, DNNL_ARG_SCRATCHPAD, st->scratch, &a[n].memory));
        n++;
    }
    KD_TRY(KD_DNNL_CHECK(dnnl_primitive_execute(e->prim, st->stream, n, a)));
    KD_TRY(KD_DNNL_CHECK(dnnl_stream_wait(st->stream)));
    return KD_OK;
}

/* ------------------------------------------------------------------- trim */

void kd__cpu_trim(kd_backend *be) {
    (void)be;
    cpu_state *st = &kd__cpu_st;
    pthread_mutex_lock(&st->lock);
    for (int b = 0; b < CPU_BUCKETS; b++) {
        prim_entry *e = st->buckets[b];
        while (e) {
            prim_entry *next = e->next;
            entry_free(e);
            e = next;
        }
        st->buckets[b] = NULL;
    }
    st->nentries = 0;
    kd_aligned_free(st->scratch);
    st->scratch = NULL;
    st->scratch_cap = 0;
    pthread_mutex_unlock(&st->lock);
}

int kd__cpu_primitive_count(void) {
    pthread_mutex_lock(&kd__cpu_st.lock);
    int n = kd__cpu_st.nprims_created;
    pthread_mutex_unlock(&kd__cpu_st.lock);
    return n;
}

int kd__cpu_cache_size(void) {
    pthread_mutex_lock(&kd__cpu_st.lock);
    int n = kd__cpu_st.nentries;
    pthread_mutex_unlock(&kd__cpu_st.lock);
    return n;
}

size_t kd__cpu_scratch_bytes(void) {
    pthread_mutex_lock(&kd__cpu_st.lock);
    size_t n = kd__cpu_st.scratch_cap;
    pthread_mutex_unlock(&kd__cpu_st.lock);
    return n;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int kd__cpu_conv_impls(int which, char *buf, size_t cap) {
    static const prim_kind kinds[3] = {PK_CONV_FWD, PK_CONV_BWD_DATA, PK_CONV_BWD_WEIGHTS};
    if (cap) buf[0] = '\0';
    if (which < 0 || which > 2) return 0;
    enum { MAX_NAMES = 32 };
    const char *names[MAX_NAMES];
    int n = 0;
    pthread_mutex_lock(&kd__cpu_st.lock);
    for (int b = 0; b < CPU_BUCKETS; b++) {
        for (const prim_entry *e = kd__cpu_st.buckets[b]; e; e = e->next) {
            if (e->key.kind != (int32_t)kinds[which]) continue;
            const char *name = "ref";
            if (e->pd && (dnnl_primitive_desc_query(e->pd, dnnl_query_impl_info_str, 0, &name) !=
                              dnnl_success || !name))
                name = "?";
            int seen = 0;
            for (int i = 0; i < n && !seen; i++) seen = !strcmp(names[i], name);
            if (!seen && n < MAX_NAMES) names[n++] = name;
        }
    }
    qsort(names, (size_t)n, sizeof names[0], cmp_str);
    size_t len = 0;
    for (int i = 0; i < n && cap; i++) {
        int w = snprintf(buf + len, cap - len, "%s%s", i ? "+" : "", names[i]);
        if (w < 0 || (size_t)w >= cap - len) { /* no room for this name: drop its part */
            buf[len] = '\0';
            break;
        }
        len += (size_t)w;
    }
    pthread_mutex_unlock(&kd__cpu_st.lock);
    return n;
}
