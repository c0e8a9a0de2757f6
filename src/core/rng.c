/* Philox4x32-10 counter-based RNG (Salmon et al., SC'11). */
#include "kd/core.h"

#include <math.h>

#define KD__PHILOX_M0 0xD2511F53u
#define KD__PHILOX_M1 0xCD9E8D57u
#define KD__PHILOX_W0 0x9E3779B9u
#define KD__PHILOX_W1 0xBB67AE85u

static inline uint32_t kd__mulhilo(uint32_t a, uint32_t b, uint32_t *hi) {
    uint64_t p = (uint64_t)a * b;
    *hi = (uint32_t)(p >> 32);
    return (uint32_t)p;
}

void kd_philox4x32(uint64_t seed, uint64_t key, uint64_t counter, uint32_t out[4]) {
    /* Counter words: (counter, key) ; key words: seed. */
    uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32);
    uint32_t c2 = (uint32_t)key, c3 = (uint32_t)(key >> 32);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint32_t hi0, hi1;
        uint32_t lo0 = kd__mulhilo(KD__PHILOX_M0, c0, &hi0);
        uint32_t lo1 = kd__mulhilo(KD__PHILOX_M1, c2, &hi1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += KD__PHILOX_W0;
        k1 += KD__PHILOX_W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

void kd_rng_init(kd_rng *r, uint64_t seed, uint64_t key) {
    r->seed = seed;
    r->key = key;
    r->counter = 0;
    r->buf_left = 0;
}

uint32_t kd_rng_u32(kd_rng *r) {
    if (r->buf_left == 0) {
        kd_philox4x32(r->seed, r->key, r->counter++, r->buf);
        r->buf_left = 4;
    }
    return r->buf[4 - r->buf_left--];
}

float kd_rng_uniform(kd_rng *r) { return (float)(kd_rng_u32(r) >> 8) * (1.0f / 16777216.0f); }

float kd_rng_normal(kd_rng *r) {
    double u1 = ((double)kd_rng_u32(r) + 1.0) / 4294967297.0; /* (0, 1) */
    double u2 = (double)kd_rng_u32(r) / 4294967296.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

uint32_t kd_rng_below(kd_rng *r, uint32_t n) {
    if (n <= 1) return 0;
    uint32_t lim = (uint32_t)(-n) % n; /* reject the low 2^32 mod n values */
    for (;;) {
        uint32_t x = kd_rng_u32(r);
        if (x >= lim) return x % n;
    }
}

static uint64_t kd__splitmix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

uint64_t kd_rng_key(uint64_t a, uint64_t b) { return kd__splitmix(kd__splitmix(a) ^ b); }
