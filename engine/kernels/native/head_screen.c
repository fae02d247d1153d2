/* The screened head: the argmax of the float32 head (head.c) without reading all of it.
 *
 * A greedy row needs only the argmax of its logits. An int8 copy of the head (q_v = round(w_v /
 * s_v), s_v = max_k |w_vk| / 127 per row: a quarter of the bytes) and the row's activations as
 * int16 (xq = round(x / t), t = max_k |x_k| / Q) give each head row an exact integer dot
 * A_v = sum_k q_vk xq_k and an approximate logit a_v = s_v t A_v, and per-row bounds built at
 * load give an interval [a_v - B_v, a_v + B_v] that surely holds the exact float32 logit L_v (the
 * bits bitskip_head computes). Every row whose upper end reaches the largest lower end is a
 * candidate; the candidates' exact logits are computed with head.c's own dot (the same bits),
 * every other row gets -inf. The head's argmax (first index on ties) is a candidate: for any u,
 * L_argmax >= L_u >= lower_u, and upper_argmax >= L_argmax; so is every row tied with it. Hence
 * the argmax of the output equals the full head's, whatever the input.
 *
 * The bound. Let D_v = sum_k w_vk x_k exactly, u = 2^-24, n = K + 40, gamma = n u / (1 - n u).
 * head.c's dot (32-lane chains of K / 32 fused multiply-adds, 5 tree levels, a tail of at most 31
 * rounded products and sums: at most n roundings on any term's path) obeys the classic bound
 * |L_v - D_v| <= gamma sum_k |w_vk x_k| when nothing underflows, plus at most n 2^-149 when
 * something does (an underflowing product or sum is off by at most 2^-150). Then
 *   D_v - s_v t A_v = sum_k (w_vk - s_v q_vk) x_k + s_v sum_k q_vk (x_k - t xq_k),
 * so with Cauchy-Schwarz, writing e_v = ||w_v - s_v q_v|| and ex = ||x - t xq||:
 *   |L_v - s_v t A_v| <= ||x|| (e_v + gamma ||w_v||) + ex s_v ||q_v|| + n 2^-149.
 * A_v is exact (|A_v| <= 127 Q K < 2^31 by the choice of Q), so a_v = (s_v t) A_v in double is off
 * by at most 2^-52 |a_v|. At load, per row: r_v = (e_v + 2 gamma ||w_v||)(1 + 2^-20) and
 * p_v = s_v ||q_v|| (1 + 2^-20), in double (every square exact, the sums off by a relative
 * K 2^-53); per call ||x|| and ex in double, times 1 + 2^-30. B_v = ||x|| r_v + ex p_v + n 2^-149.
 * The doubled gamma and the factors cover every double rounding: a_v +- B_v and a_v itself are off
 * by a relative 2^-52 of |a_v| + B_v, and B_v >= 2 gamma ||w_v|| ||x|| >= 2^-19 |a_v| (while
 * |a_v| <= 2 ||w_v|| ||x||), so by less than 2^-32 B_v. The classic bound assumes no overflow: a
 * row is screened only when ||x|| times the largest ||w_v|| is below 2^100, so no partial sum
 * comes near FLT_MAX; a row with a non-finite x, and every row when the head has a non-finite
 * weight (the build says so), gets the full head instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "head.h"
#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define SCREEN_ROWS 64   /* head rows per task: 64 x 2 KB of int8 at hidden 2048 */
#define NR 6             /* int8 head rows per AVX2 pass */
#define PREFETCH 2048    /* bytes past the next pass's rows at the same k */
#define MARGIN (1 + 0x1p-20)

static double gamma_n(int64_t K) {
    double nu = (double)(K + 40) * 0x1p-24;
    return nu / (1 - nu);
}

/* Rows of the copy: q [n, K], scale [n], bounds [n, 2] = (r_v, p_v); *norm_max raised to the
 * largest ||w_v||. Returns -1 when a weight is not finite (nothing can be bounded), else 0. */
int bitskip_head_screen_build(const float *w, int64_t n, int64_t K, int8_t *q, float *scale,
                              double *bounds, double *norm_max, int nthreads) {
    int bad = 0;
    double g = gamma_n(K), top = *norm_max;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1) \
    reduction(| : bad) reduction(max : top)
    for (int64_t v = 0; v < n; v++) {
        const float *wv = w + v * K;
        int8_t *qv = q + v * K;
        float mx = 0;
        for (int64_t k = 0; k < K; k++) {
            float a = fabsf(wv[k]);
            if (!(a <= 3.4028234663852886e38f)) bad = 1;
            mx = a > mx ? a : mx;
        }
        float s = mx / 127.0f;
        double e2 = 0, w2 = 0, q2 = 0;
        for (int64_t k = 0; k < K; k++) {
            /* any codes will do (the bounds measure what they miss): nearest, within +-127 */
            float c = s > 0 ? rintf(wv[k] / s) : 0;
            c = c > 127 ? 127 : c < -127 ? -127 : c;
            qv[k] = (int8_t)c;
            double d = (double)wv[k] - (double)s * c;
            e2 += d * d, w2 += (double)wv[k] * wv[k], q2 += (double)c * c;
        }
        scale[v] = s;
        bounds[2 * v] = (sqrt(e2) + 2 * g * sqrt(w2)) * MARGIN;
        bounds[2 * v + 1] = s * sqrt(q2) * MARGIN;
        top = sqrt(w2) > top ? sqrt(w2) : top;
    }
    *norm_max = top;
    return bad ? -1 : 0;
}

/* A[i] = sum_k q[i, k] x[k] for n int8 rows, exactly. */
static void approx_portable(const int16_t *x, int64_t K, const int8_t *q, int n, int32_t *A) {
    for (int i = 0; i < n; i++) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += (int32_t)q[i * K + k] * x[k];
        A[i] = s;
    }
}

#ifdef HAVE_X86
__attribute__((target("avx2"), always_inline)) static inline void
approx_pass(const int16_t *x, int64_t K, const int8_t *q, const int nr, int32_t *A) {
    int64_t body = K - K % 16;
    __m256i acc[NR];
    for (int i = 0; i < nr; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t k = 0; k < body; k += 16) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
        if ((k & 63) == 0)  /* PREFETCH bytes past each row of the next pass: ~20% faster from DRAM */
            for (int i = 0; i < nr; i++) _mm_prefetch((const char *)(q + (i + nr) * K + k + PREFETCH), _MM_HINT_T0);
        for (int i = 0; i < nr; i++) {
            __m256i qv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + i * K + k)));
            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(qv, xv));
        }
    }
    for (int i = 0; i < nr; i++) {
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc[i]), _mm256_extracti128_si256(acc[i], 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
        int32_t s = _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1)));
        for (int64_t k = body; k < K; k++) s += (int32_t)q[i * K + k] * x[k];
        A[i] = s;
    }
}

__attribute__((target("avx2"))) static void
approx_avx2(const int16_t *x, int64_t K, const int8_t *q, int n, int32_t *A) {
    int i = 0;
    for (; i + NR <= n; i += NR) approx_pass(x, K, q + i * K, NR, A + i);
    for (; i < n; i++) approx_pass(x, K, q + i * K, 1, A + i);
}
#endif

typedef void (*approx_fn)(const int16_t *, int64_t, const int8_t *, int, int32_t *);

static approx_fn pick_approx(void) {
#ifdef HAVE_X86
    if (bitskip_head_avx2()) return approx_avx2;  /* bitskip_head_force_portable decides for both */
#endif
    return approx_portable;
}

/* A row's activations for the screen: xq = round(x / t) within +-Q, t = max |x_k| / Q; *nx and
 * *ex bound ||x|| and ||x - t xq|| from above. Returns t, or -1 when the row cannot be screened. */
static double quantize(const float *x, int64_t K, double norm_max, int16_t *xq, double *nx, double *ex) {
    double Q = floor(2147483647.0 / (127.0 * (double)K)), mx = 0, ss = 0, es = 0;
    Q = Q < 32767 ? Q : 32767;
    for (int64_t k = 0; k < K; k++) {
        double a = fabs((double)x[k]);
        mx = a > mx ? a : mx;
        ss += (double)x[k] * x[k];
    }
    *nx = sqrt(ss) * (1 + 0x1p-30);
    if (Q < 1 || !(*nx * norm_max < 0x1p100)) return -1;  /* NaN, Inf, too large, absurd K */
    double t = mx / Q;
    for (int64_t k = 0; k < K; k++) {
        double c = t > 0 ? nearbyint(x[k] / t) : 0;
        c = c > Q ? Q : c < -Q ? -Q : c;
        xq[k] = (int16_t)c;
        es += (x[k] - t * c) * (x[k] - t * c);
    }
    /* each x - t c is off by at most 2^-52 |x_k|: the sum's root by 2^-52 ||x|| */
    *ex = (sqrt(es) + 0x1p-50 * *nx) * (1 + 0x1p-30);
    return t;
}

/* x float32 [M, K] -> out float32 [M, V]: per row, the exact logits (bitskip_head's bits) of the
 * candidates, -inf elsewhere; rows that cannot be screened get every exact logit. The copy: q
 * [V, K], scale [V], bounds [V, 2], norm_max as built. Returns the number of exact logits
 * computed, or -1 without memory. */
int64_t bitskip_head_screened(const float *x, int64_t M, int64_t K, const float *w, const int8_t *q,
                              const float *scale, const double *bounds, double norm_max, int64_t V,
                              float *out, int nthreads) {
    head_rows_fn exact = bitskip_head_rows_kernel();
    approx_fn approx = pick_approx();
    double *row = malloc(4 * M * sizeof(double));   /* per row: t, ||x||, ex, the largest lower end */
    int16_t *xq = malloc(M * K * sizeof(int16_t));
    int32_t *A = malloc(M * V * sizeof(int32_t));
    if (row == NULL || xq == NULL || A == NULL) {
        free(row), free(xq), free(A);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) {
        row[4 * m] = quantize(x + m * K, K, norm_max, xq + m * K, row + 4 * m + 1, row + 4 * m + 2);
        row[4 * m + 3] = -INFINITY;
    }
    const double eta = (double)(K + 40) * 0x1p-149;
    int64_t tasks = (V + SCREEN_ROWS - 1) / SCREEN_ROWS, computed = 0;
    nthreads = bitskip_head_threads(M, K, V, nthreads);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        double *low = malloc(M * sizeof(double)); /* this thread's largest lower end per row */
        for (int64_t m = 0; low != NULL && m < M; m++) low[m] = -INFINITY;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t v0 = t * SCREEN_ROWS, n = V - v0 < SCREEN_ROWS ? V - v0 : SCREEN_ROWS;
            const float *wr[SCREEN_ROWS];
            for (int j = 0; j < n; j++) wr[j] = w + (v0 + j) * K;
            for (int64_t m = 0; m < M; m++) {
                const double *r = row + 4 * m;
                if (r[0] < 0 || low == NULL) {  /* the full head: every exact logit */
                    exact(x + m * K, K, wr, (int)n, out + m * V + v0);
                    continue;
                }
                int32_t *a = A + m * V + v0;
                approx(xq + m * K, K, q + v0 * K, (int)n, a);
                for (int j = 0; j < n; j++) {
                    const double *b = bounds + 2 * (v0 + j);
                    double lo = ((double)scale[v0 + j] * r[0]) * a[j] - (r[1] * b[0] + r[2] * b[1] + eta);
                    low[m] = lo > low[m] ? lo : low[m];
                }
            }
        }
#pragma omp critical
        for (int64_t m = 0; m < M; m++) row[4 * m + 3] = low && low[m] > row[4 * m + 3] ? low[m] : row[4 * m + 3];
#pragma omp barrier
#pragma omp for schedule(static) reduction(+ : computed)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t v0 = t * SCREEN_ROWS, n = V - v0 < SCREEN_ROWS ? V - v0 : SCREEN_ROWS;
            const float *wr[SCREEN_ROWS];
            int idx[SCREEN_ROWS];
            float got[SCREEN_ROWS];
            for (int64_t m = 0; m < M; m++) {
                const double *r = row + 4 * m;
                float *o = out + m * V + v0;
                if (r[0] < 0 || low == NULL) {  /* done in the first pass */
                    computed += n;
                    continue;
                }
                const int32_t *a = A + m * V + v0;
                int c = 0;
                for (int j = 0; j < n; j++) {
                    const double *b = bounds + 2 * (v0 + j);
                    double hi = ((double)scale[v0 + j] * r[0]) * a[j] + (r[1] * b[0] + r[2] * b[1] + eta);
                    if (hi >= r[3]) idx[c] = j, wr[c++] = w + (v0 + j) * K;
                    o[j] = -INFINITY;
                }
                exact(x + m * K, K, wr, c, got);
                for (int j = 0; j < c; j++) o[idx[j]] = got[j];
                computed += c;
            }
        }
        free(low);
    }
    free(row), free(xq), free(A);
    return computed;
}
