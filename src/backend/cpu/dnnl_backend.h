/*
 * dnnl_backend.h: internal hooks of the "cpu" backend (oneDNN), for tests and
 * benchmarks. The backend object itself comes from kd__backend_cpu()
 * (backend/backend_impl.h) or kd_backend_get("cpu", ...).
 *
 * Usage:
 *     int before = kd__cpu_primitive_count();
 *     be->conv2d_forward(be, &p, x, w, b, y);  // same shape twice
 *     be->conv2d_forward(be, &p, x, w, b, y);
 *     // kd__cpu_primitive_count() - before == 1
 */
#ifndef KD_BACKEND_CPU_DNNL_BACKEND_H
#define KD_BACKEND_CPU_DNNL_BACKEND_H

#include "kd/backend.h"

kd_backend *kd__backend_cpu(void);

/* oneDNN primitives created since the process started (monotonic; trim does
 * not reset it). A cache hit creates none. */
int kd__cpu_primitive_count(void);

/* Entries in the primitive cache right now (0 after trim), including entries
 * that record a configuration oneDNN rejected (those run on the ref kernels). */
int kd__cpu_cache_size(void);

/* Bytes held by the backend's scratch buffer (0 after trim). */
size_t kd__cpu_scratch_bytes(void);

/* The distinct oneDNN implementation names (the primitive descriptors'
 * dnnl_query_impl_info_str, e.g. "jit:avx512_core", "jit_bf16:avx512_core_bf16",
 * "brgconv:avx512_core_amx_bf16") of the convolution primitives in the cache
 * now, for `which` = KD_CPU_CONV_FWD, KD_CPU_CONV_BWD_DATA or
 * KD_CPU_CONV_BWD_WEIGHTS: sorted, joined by '+', written to buf (cap bytes,
 * always terminated when cap > 0; truncated at a name boundary when short).
 * "ref" stands for a configuration oneDNN rejected (kd's ref kernel runs).
 * Returns the number of distinct names (0: no such convolution cached; trim
 * empties the cache). For benchmarks (bench/train_step.c) and tests. */
enum { KD_CPU_CONV_FWD = 0, KD_CPU_CONV_BWD_DATA = 1, KD_CPU_CONV_BWD_WEIGHTS = 2 };
int kd__cpu_conv_impls(int which, char *buf, size_t cap);

/* How gemm_batch runs: KD_CPU_BMM_AUTO (default) the matmul primitive unless
 * A is transposed, then the loop; KD_CPU_BMM_MATMUL oneDNN's batched matmul
 * primitive; KD_CPU_BMM_LOOP a loop of dnnl_sgemm. For tests (each path
 * against ref) and the kernel lab; not thread-safe against running kernels. */
enum { KD_CPU_BMM_AUTO = 0, KD_CPU_BMM_MATMUL = 1, KD_CPU_BMM_LOOP = 2 };
void kd__cpu_set_bmm_mode(int mode);

#endif /* KD_BACKEND_CPU_DNNL_BACKEND_H */
