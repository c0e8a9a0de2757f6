/* Bump arena for per-step activations. After the first step it holds one block
 * of the high-water size, so steady-state steps perform no heap allocation. */
#include "kd/core.h"

#include <stdlib.h>

typedef struct kd__chunk {
    struct kd__chunk *next;
    size_t cap, used;
    unsigned char *mem;
} kd__chunk;

struct kd_arena {
    kd__chunk *head; /* current chunk; older chunks follow */
    size_t high_water, total_used, grows;
};

static kd__chunk *kd__chunk_new(size_t cap) {
    kd__chunk *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->mem = kd_aligned_alloc(cap);
    if (!c->mem) {
        free(c);
        return NULL;
    }
    c->cap = cap;
    return c;
}

kd_status kd_arena_init(kd_arena **out, size_t initial_bytes) {
    *out = NULL;
    kd_arena *a = calloc(1, sizeof *a);
    if (!a) return kd_error(KD_ERR_NOMEM, "out of memory creating an arena");
    if (initial_bytes) {
        a->head = kd__chunk_new(initial_bytes);
        if (!a->head) {
            free(a);
            return kd_error(KD_ERR_NOMEM, "out of memory reserving %zu arena bytes", initial_bytes);
        }
        a->grows = 1;
    }
    *out = a;
    return KD_OK;
}

static void kd__chunks_free(kd__chunk *c) {
    while (c) {
        kd__chunk *n = c->next;
        kd_aligned_free(c->mem);
        free(c);
        c = n;
    }
}

void kd_arena_free(kd_arena *a) {
    if (!a) return;
    kd__chunks_free(a->head);
    free(a);
}

void *kd_arena_alloc(kd_arena *a, size_t bytes) {
    bytes = (bytes + 63) & ~(size_t)63;
    if (bytes == 0) bytes = 64;
    kd__chunk *c = a->head;
    if (!c || c->used + bytes > c->cap) {
        size_t cap = c ? c->cap * 2 : ((size_t)1 << 20);
        if (cap < bytes) cap = bytes;
        kd__chunk *n = kd__chunk_new(cap);
        if (!n) return NULL;
        n->next = c;
        a->head = n;
        a->grows++;
        c = n;
    }
    void *p = c->mem + c->used;
    c->used += bytes;
    a->total_used += bytes;
    if (a->total_used > a->high_water) a->high_water = a->total_used;
    return p;
}

void kd_arena_reset(kd_arena *a) {
    if (a->head && a->head->next) {
        /* Several chunks: replace them by one block of the high-water size. */
        kd__chunks_free(a->head);
        a->head = kd__chunk_new(a->high_water);
        if (a->head) a->grows++;
    }
    if (a->head) a->head->used = 0;
    a->total_used = 0;
}

size_t kd_arena_used(const kd_arena *a) { return a->total_used; }

size_t kd_arena_capacity(const kd_arena *a) {
    size_t s = 0;
    for (kd__chunk *c = a->head; c; c = c->next) s += c->cap;
    return s;
}

size_t kd_arena_grow_count(const kd_arena *a) { return a->grows; }

size_t kd_arena_high_water(const kd_arena *a) { return a->high_water; }
