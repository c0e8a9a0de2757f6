/* CRD's contrastive sampler (RepDistiller dataset/cifar100.py,
 * CIFAR100InstanceSample.__getitem__): for each training image one positive
 * and K negatives, the negatives drawn without replacement from the images
 * of the other classes (np.random.choice(cls_negative[target], K,
 * replace=False)); the positive is the image itself ("exact") or a random
 * image of its class ("relax"). The official code builds a full list of
 * negatives per class (N - n_c indices each, N x classes in all); here the
 * negatives of class c are the positions [0, N - n_c) of the by-class order
 * with class c's block cut out, so one sorted index array serves every
 * class. */
#include <stdlib.h>
#include <string.h>

#include "distill/crd.h"

kd_status kd__crd_sampler_init(kd__crd_sampler *s, const int32_t *labels, int64_t n, int classes) {
    memset(s, 0, sizeof *s);
    if (classes < 1) return kd_error(KD_ERR_INVALID, "crd: the sampler needs at least one class");
    s->n = n;
    s->classes = classes;
    s->by_class = malloc(sizeof *s->by_class * (size_t)(n > 0 ? n : 1));
    s->offset = calloc((size_t)classes + 1, sizeof *s->offset);
    if (!s->by_class || !s->offset) {
        kd__crd_sampler_free(s);
        return kd_error(KD_ERR_NOMEM, "crd: out of memory for the class lists of %lld images", (long long)n);
    }
    for (int64_t i = 0; i < n; i++) {
        if (labels[i] < 0 || labels[i] >= classes) {
            kd_status st = kd_error(KD_ERR_INVALID, "crd: training image %lld has label %d, outside [0, %d)",
                                    (long long)i, labels[i], classes);
            kd__crd_sampler_free(s);
            return st;
        }
        s->offset[labels[i] + 1]++;
    }
    for (int c = 0; c < classes; c++) s->offset[c + 1] += s->offset[c];
    int64_t *fill = malloc(sizeof *fill * (size_t)classes);
    if (!fill) {
        kd__crd_sampler_free(s);
        return kd_error(KD_ERR_NOMEM, "crd: out of memory");
    }
    memcpy(fill, s->offset, sizeof *fill * (size_t)classes);
    for (int64_t i = 0; i < n; i++) s->by_class[fill[labels[i]]++] = i;
    free(fill);
    return KD_OK;
}

void kd__crd_sampler_free(kd__crd_sampler *s) {
    free(s->by_class);
    free(s->offset);
    memset(s, 0, sizeof *s);
}

/* A uniform draw in [0, n) for n up to 2^63 (two words when n >= 2^32). */
static int64_t kd__below64(kd_rng *r, int64_t n) {
    if (n <= (int64_t)UINT32_MAX) return (int64_t)kd_rng_below(r, (uint32_t)n);
    uint64_t lim = (uint64_t)(-(uint64_t)n) % (uint64_t)n;
    for (;;) {
        uint64_t x = ((uint64_t)kd_rng_u32(r) << 32) | kd_rng_u32(r);
        if (x >= lim) return (int64_t)(x % (uint64_t)n);
    }
}

kd_status kd__crd_draw(const kd__crd_sampler *s, uint64_t seed, uint64_t key, const int64_t *index,
                       const int32_t *y, int64_t B, int64_t K, int relax, int64_t *out) {
    for (int64_t i = 0; i < B; i++)
        if (y[i] < 0 || y[i] >= s->classes || K > s->n - kd__crd_class_size(s, y[i]) ||
            (relax && kd__crd_class_size(s, y[i]) == 0))
            return kd_error(KD_ERR_INVALID, "crd: sample %lld of the batch (label %d) cannot draw %lld negatives",
                            (long long)i, y[i], (long long)K);
    size_t words = (size_t)((s->n + 63) / 64) + 1;
    int oom = 0;
#pragma omp parallel if (B * K >= 65536)
    {
        uint64_t *seen = calloc(words, sizeof *seen);
        if (!seen) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B; i++) {
            if (!seen) continue;
            kd_rng r;
            kd_rng_init(&r, seed, kd_rng_key(key, (uint64_t)i));
            int c = y[i];
            int64_t lo = s->offset[c], nc = kd__crd_class_size(s, c), m = s->n - nc;
            int64_t *row = out + i * (K + 1);
            row[0] = relax ? s->by_class[lo + kd__below64(&r, nc)] : index[i];
            /* Floyd: for j = m - K .. m - 1 take t uniform in [0, j]; t if
             * unseen, else j. Each K-subset of [0, m) is equally likely. */
            int64_t *neg = row + 1;
            for (int64_t j = m - K, n_out = 0; j < m; j++) {
                int64_t t = kd__below64(&r, j + 1);
                if (seen[t >> 6] >> (t & 63) & 1) t = j;
                seen[t >> 6] |= 1ull << (t & 63);
                neg[n_out++] = t;
            }
            /* Positions to dataset indices, clearing the bitmap as we go. */
            for (int64_t j = 0; j < K; j++) {
                int64_t t = neg[j];
                seen[t >> 6] &= ~(1ull << (t & 63));
                neg[j] = s->by_class[t < lo ? t : t + nc];
            }
        }
        free(seen);
    }
    return oom ? kd_error(KD_ERR_NOMEM, "crd: out of memory in the sampler") : KD_OK;
}
