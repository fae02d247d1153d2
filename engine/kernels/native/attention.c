/* RoPE and grouped-query attention for the native decoder block, in models/functional.py's
 * arithmetic: float32 RoPE (the same products and sum as apply_rope), attention in float64 rounded
 * once to float32 (scores scaled by d^-0.5, softmax with the max subtracted, weighted sum of the
 * values).
 *
 * A (rows, KV head) pair is the unit of work, the rows consecutive tokens of one sequence (a
 * decode row alone, or a speculative verify's tokens): their query heads of the group share each
 * key and value load, and a query's numbers depend on nothing else (not the other rows, the batch,
 * or the thread that runs it). Sums run in one fixed order per head dimension d: a score is four float64 vector partial
 * sums over d (chunk c of four lanes into sum c % 4), combined ((s0 + s1) + (s2 + s3)), then lanes
 * (l0 + l2) + (l1 + l3), then the d % 4 leftovers in order; the weighted values sum over positions
 * in order for each lane. The vector type is GCC's, so the AVX2 build and the portable one do
 * the same IEEE operations in the same order: identical results.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attention.h"
#include "simd.h"


void bitskip_rope(float *x, int64_t heads, int64_t d, const float *cos, const float *sin) {
    int64_t half = d / 2;
    for (int64_t hh = 0; hh < heads; hh++) {
        float *v = x + hh * d, tmp[d];
        for (int64_t i = 0; i < d; i++) {
            float rot = i < half ? -v[i + half] : v[i - half];
            tmp[i] = v[i] * cos[i] + rot * sin[i];
        }
        memcpy(v, tmp, sizeof(float) * (size_t)d);
    }
}

__attribute__((always_inline)) static inline v4d widen(const float *p) {
    return __builtin_convertvector(*(const v4f *)p, v4d);
}

/* x . y over d (both float64), in the fixed order above. */
__attribute__((always_inline)) static inline double dot(const double *x, const double *y, int64_t d) {
    v4d s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    const v4d *a = (const v4d *)x, *b = (const v4d *)y;
    int64_t chunks = d / 4, c = 0;
    for (; c + 4 <= chunks; c += 4) {
        s0 += a[c] * b[c];
        s1 += a[c + 1] * b[c + 1];
        s2 += a[c + 2] * b[c + 2];
        s3 += a[c + 3] * b[c + 3];
    }
    if (c < chunks) s0 += a[c] * b[c];
    if (c + 1 < chunks) s1 += a[c + 1] * b[c + 1];
    if (c + 2 < chunks) s2 += a[c + 2] * b[c + 2];
    v4d t = (s0 + s1) + (s2 + s3);
    double r = (t[0] + t[2]) + (t[1] + t[3]);
    for (int64_t i = 4 * chunks; i < d; i++) r += x[i] * y[i];
    return r;
}

/* A cached row (d floats) in float64, once for the group's query heads (exact: every float is
 * a double). */
__attribute__((always_inline)) static inline void widen_row(const float *x, int64_t d, double *out) {
    int64_t chunks = d / 4;
    for (int64_t c = 0; c < chunks; c++) ((v4d *)out)[c] = widen(x + 4 * c);
    for (int64_t i = 4 * chunks; i < d; i++) out[i] = (double)x[i];
}

/* A position's row of a cache (d floats), asked for ahead of its use: positions sit kv_heads * d
 * floats apart, a stride the hardware prefetcher does not follow far, and after a step's weights
 * have streamed through, the cache's rows come from memory: the keys are asked for KV_AHEAD
 * positions ahead (one position ahead left each load waiting ~ a memory latency), the values
 * while the scores are computed. */
#define KV_AHEAD 8
__attribute__((always_inline)) static inline void prefetch_row(const float *row, int64_t d) {
    for (int64_t i = 0; i < d; i += 16) __builtin_prefetch(row + i);
}

/* Query heads g * group .. (g + 1) * group - 1 of `rows` consecutive rows of one sequence (see
 * bitskip_attend_rows): each cached key and value row is loaded and widened once for all
 * rows * group queries; each query's scores, softmax and weighted sum are the one-row ones, in
 * the same order. */
__attribute__((always_inline)) static inline void
attend_body(const float *q, int64_t q_stride, int64_t rows, int64_t g, int64_t group, int64_t hkv,
            int64_t d, const int64_t *slots, int64_t len, const float *cache_k, const float *cache_v,
            double *scores, double *qd, float *out, int64_t out_stride) {
    double scale = pow((double)d, -0.5), row[d];
    int64_t chunks = d / 4, last = len + rows - 1, queries = rows * group;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < group; j++)
            for (int64_t c = 0; c < d; c++)
                qd[(i * group + j) * d + c] = (double)q[i * q_stride + (g * group + j) * d + c];
    for (int64_t t = 0; t < last && t < KV_AHEAD; t++) prefetch_row(cache_k + (slots[t] * hkv + g) * d, d);
    for (int64_t t = 0; t < last; t++) {
        const float *kt = cache_k + (slots[t] * hkv + g) * d;
        if (t + KV_AHEAD < last) prefetch_row(cache_k + (slots[t + KV_AHEAD] * hkv + g) * d, d);
        prefetch_row(cache_v + (slots[t] * hkv + g) * d, d);  /* for the weighted sums below */
        widen_row(kt, d, row);
        /* Row i attends to positions 0..len + i - 1. */
        for (int64_t u = (t < len ? 0 : t - len + 1) * group; u < queries; u++)
            scores[u * last + t] = dot(qd + u * d, row, d) * scale;
    }
    for (int64_t u = 0; u < queries; u++) {
        double *sc = scores + u * last, mx = -INFINITY, sum = 0.0;
        int64_t n = len + u / group;
        for (int64_t t = 0; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
        for (int64_t t = 0; t < n; t++) {
            sc[t] = exp(sc[t] - mx);
            sum += sc[t];
        }
        for (int64_t t = 0; t < n; t++) sc[t] = sc[t] / sum;
    }
    /* qd is free now: the weighted sums of the values, in position order per lane. */
    double *acc = qd;
    memset(acc, 0, sizeof(double) * (size_t)(queries * d));
    for (int64_t t = 0; t < last; t++) {
        const float *vt = cache_v + (slots[t] * hkv + g) * d;
        widen_row(vt, d, row);
        for (int64_t u = (t < len ? 0 : t - len + 1) * group; u < queries; u++) {
            double p = scores[u * last + t], *a = acc + u * d;
            v4d pv = {p, p, p, p};
            v4d *av = (v4d *)a;
            const v4d *rv = (const v4d *)row;
            for (int64_t c = 0; c < chunks; c++) av[c] += pv * rv[c];
            for (int64_t c = 4 * chunks; c < d; c++) a[c] += p * row[c];
        }
    }
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < group; j++)
            for (int64_t c = 0; c < d; c++)
                out[i * out_stride + (g * group + j) * d + c] = (float)acc[(i * group + j) * d + c];
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static void
attend_avx2(const float *q, int64_t q_stride, int64_t rows, int64_t g, int64_t group, int64_t hkv,
            int64_t d, const int64_t *slots, int64_t len, const float *cache_k, const float *cache_v,
            double *scores, double *qd, float *out, int64_t out_stride) {
    attend_body(q, q_stride, rows, g, group, hkv, d, slots, len, cache_k, cache_v, scores, qd, out, out_stride);
}
#endif

static void attend_portable(const float *q, int64_t q_stride, int64_t rows, int64_t g, int64_t group,
                            int64_t hkv, int64_t d, const int64_t *slots, int64_t len,
                            const float *cache_k, const float *cache_v, double *scores, double *qd,
                            float *out, int64_t out_stride) {
    attend_body(q, q_stride, rows, g, group, hkv, d, slots, len, cache_k, cache_v, scores, qd, out, out_stride);
}

static int force_portable = 0;

void bitskip_attention_force_portable(int on) { force_portable = on; }

void bitskip_attend_rows(const float *q, int64_t q_stride, int64_t rows, int64_t g, int64_t group,
                         int64_t hkv, int64_t d, const int64_t *slots, int64_t len,
                         const float *cache_k, const float *cache_v, double *scores, double *qd,
                         float *out, int64_t out_stride) {
#if defined(__x86_64__)
    if (!force_portable && __builtin_cpu_supports("avx2")) {
        attend_avx2(q, q_stride, rows, g, group, hkv, d, slots, len, cache_k, cache_v, scores, qd, out, out_stride);
        return;
    }
#endif
    attend_portable(q, q_stride, rows, g, group, hkv, d, slots, len, cache_k, cache_v, scores, qd, out, out_stride);
}
