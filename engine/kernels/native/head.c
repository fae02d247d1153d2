/* The shared head's float32 product: out[m, v] = sum_k x[m, k] * w[v, k] (x already normed).
 *
 * It reads the whole head (vocab x hidden float32) once per step, for every row at once: a task
 * of HEAD_ROWS head rows stays in L2 while each activation row passes over it. Each dot product
 * sums in one fixed order whatever the number of rows, the thread count or the task split, so a
 * row's logits do not depend on the batch:
 *
 *   LANES = 32 partial sums p[j] over k = j (mod 32) for k < body = K - K % 32, each a chain of
 *   fused multiply-adds p[j] = fma(x[k], w[k], p[j]) from 0; then the fixed tree
 *   r[i] = (p[i] + p[8 + i]) + (p[16 + i] + p[24 + i]),
 *   s = ((r[0] + r[4]) + (r[2] + r[6])) + ((r[1] + r[5]) + (r[3] + r[7]));
 *   then the tail in order: s = s + x[k] * w[k] (product rounded, then the sum) for k >= body.
 *
 * The AVX2 path keeps the 32 partial sums in four registers and does the tree in registers (the
 * lane-wise adds, then the high and low 128-bit halves, then two shuffles), several head rows per
 * pass sharing each activation load. The portable path computes the same order with fmaf, so the
 * two paths give the same bits (where fmaf has no hardware instruction it is slow: a fallback).
 */
#include <math.h>
#include <stdint.h>
#include "head.h"
#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define LANES 32         /* partial sums per dot product: four 8-float registers */
#define HEAD_ROWS 32     /* head rows per task (32 x 8 KB at hidden 2048: in L2) */
#define NR_MAX 3         /* head rows per AVX2 pass: 12 accumulators and the activation load */
#define PARALLEL_MACS (1 << 21)  /* as in ternary.c: smaller products stay on one thread */

/* One head row's dot with x in the fixed order, in portable C. */
static float dot_portable(const float *x, const float *w, int64_t K) {
    int64_t body = K - K % LANES, k;
    float p[LANES] = {0}, r[8];
    for (k = 0; k < body; k += LANES)
        for (int j = 0; j < LANES; j++) p[j] = fmaf(x[k + j], w[k + j], p[j]);
    for (int i = 0; i < 8; i++) r[i] = (p[i] + p[8 + i]) + (p[16 + i] + p[24 + i]);
    float s = ((r[0] + r[4]) + (r[2] + r[6])) + ((r[1] + r[5]) + (r[3] + r[7]));
    for (; k < K; k++) s += x[k] * w[k];  /* -ffp-contract=off: the product is rounded first */
    return s;
}

static void rows_portable(const float *x, int64_t K, const float *const *w, int n, float *out) {
    for (int i = 0; i < n; i++) out[i] = dot_portable(x, w[i], K);
}

#ifdef HAVE_X86
/* The fixed tree over four registers of partial sums (lane i of register j is p[8j + i]). */
__attribute__((target("avx2,fma"), always_inline)) static inline float
tree(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 r = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1)); /* r[i] + r[i+4] */
    __m128 g = _mm_add_ps(h, _mm_movehl_ps(h, h));                                 /* h[i] + h[i+2] */
    return _mm_cvtss_f32(_mm_add_ss(g, _mm_movehdup_ps(g)));                       /* g[0] + g[1] */
}

/* NR head rows against one activation row, each in the fixed order. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
pass_avx2(const float *x, int64_t K, const float *const *w, const int NR, float *out) {
    int64_t body = K - K % LANES, k;
    __m256 acc[NR_MAX][4];
    for (int n = 0; n < NR; n++)
        for (int j = 0; j < 4; j++) acc[n][j] = _mm256_setzero_ps();
    for (k = 0; k < body; k += LANES)
        for (int j = 0; j < 4; j++) {
            __m256 xv = _mm256_loadu_ps(x + k + 8 * j);
            for (int n = 0; n < NR; n++)
                acc[n][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w[n] + k + 8 * j), acc[n][j]);
        }
    for (int n = 0; n < NR; n++) {
        float s = tree(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
        for (int64_t t = body; t < K; t++) s += x[t] * w[n][t];
        out[n] = s;
    }
}

__attribute__((target("avx2,fma"))) static void
rows_avx2(const float *x, int64_t K, const float *const *w, int n, float *out) {
    int i = 0;
    for (; i + NR_MAX <= n; i += NR_MAX) pass_avx2(x, K, w + i, NR_MAX, out + i);
    if (n - i == 2)
        pass_avx2(x, K, w + i, 2, out + i);
    else if (n - i == 1)
        pass_avx2(x, K, w + i, 1, out + i);
}
#endif

static int force_portable = 0;

void bitskip_head_force_portable(int on) { force_portable = on; }

int bitskip_head_avx2(void) {
#ifdef HAVE_X86
    return !force_portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

head_rows_fn bitskip_head_rows_kernel(void) {
#ifdef HAVE_X86
    if (bitskip_head_avx2()) return rows_avx2;
#endif
    return rows_portable;
}

int bitskip_head_threads(int64_t M, int64_t K, int64_t V, int nthreads) {
    return (double)M * (double)V * (double)K < PARALLEL_MACS ? 1 : nthreads;
}

/* x float32 [M, K] (rows contiguous), w float32 [V, K] -> out float32 [M, V]. */
void bitskip_head(const float *x, int64_t M, int64_t K, const float *w, int64_t V, float *out, int nthreads) {
    head_rows_fn rows = bitskip_head_rows_kernel();
    int64_t tasks = (V + HEAD_ROWS - 1) / HEAD_ROWS;
    nthreads = bitskip_head_threads(M, K, V, nthreads);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t v0 = t * HEAD_ROWS, n = V - v0 < HEAD_ROWS ? V - v0 : HEAD_ROWS;
        const float *wr[HEAD_ROWS];
        for (int i = 0; i < n; i++) wr[i] = w + (v0 + i) * K;
        for (int64_t m = 0; m < M; m++) rows(x + m * K, K, wr, (int)n, out + m * V + v0);
    }
}
