/* GCC vector types for the native float code (attention.c, gate.c) and the attribute that builds a
 * function for AVX2 beside the baseline. The vector types compile to the same IEEE operations in
 * the same order on any x86-64 (AVX2 or SSE2 registers): the same bits either way. Loads and stores
 * through them may be unaligned (aligned(4) / aligned(8): one vector move). */
#ifndef BITSKIP_SIMD_H
#define BITSKIP_SIMD_H
#include <stdint.h>

typedef double v4d __attribute__((vector_size(32), aligned(8)));
typedef int64_t v4l __attribute__((vector_size(32), aligned(8)));
typedef float v4f __attribute__((vector_size(16), aligned(4)));

/* Built twice, for AVX2 and for any x86-64, the CPU picking at load time: wider vectors for the
 * same operations (no FMA: -ffp-contract=off; sums stay in their written order), so the same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define WIDE __attribute__((target_clones("avx2", "default")))
#else
#define WIDE
#endif

#endif
