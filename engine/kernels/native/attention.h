/* RoPE and grouped-query attention over the paged KV cache for the native decoder block
 * (attention.c). */
#ifndef BITSKIP_ATTENTION_H
#define BITSKIP_ATTENTION_H
#include <stdint.h>

/* apply_rope, rotate-half, in place: x [heads, d] at one position's cos, sin [d]. */
void bitskip_rope(float *x, int64_t heads, int64_t d, const float *cos, const float *sin);

/* Query heads g * group .. (g + 1) * group - 1 of `rows` consecutive tokens of one sequence
 * (row i: q + i * q_stride [heads, d], into out + i * out_stride [heads, d]), row i attending to
 * its cached positions 0..len + i - 1 at slots[t] of cache_k, cache_v [slots, kv_heads, d].
 * Scratch: scores [rows * group * (len + rows - 1)], qd [rows * group * d] doubles. */
void bitskip_attend_rows(const float *q, int64_t q_stride, int64_t rows, int64_t g, int64_t group,
                         int64_t kv_heads, int64_t d, const int64_t *slots, int64_t len,
                         const float *cache_k, const float *cache_v, double *scores, double *qd,
                         float *out, int64_t out_stride);

/* Force the portable path (tests compare it with the AVX2 one). */
void bitskip_attention_force_portable(int on);

#endif
