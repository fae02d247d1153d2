/* Packed 2-bit ternary weights times int8 activations -> exact int32 (DESIGN section 2).
 *
 * Weights are read in the checkpoint's own packing (DESIGN section 3: element k of a row at byte
 * k / 4, bits 2 (k % 4)), so loading copies nothing. One 32-byte load holds 128 in-features;
 * plane j of it, (byte >> 2j) & 3, holds the codes of in-features 4b + j (b = 0..31). Rather than
 * shuffle every weight, each call permutes the activations once into that order (in-feature
 * 4b + j of a 128-group moves to 32j + b), so every plane lines up with 32 contiguous bytes.
 *
 * Codes are t + 1 in {0, 1, 2}: unsigned, so vpmaddubsw(code, a) multiplies them with the signed
 * activations into int16 pairs, and sum(t * a) = sum(code * a) - sum(a). A pair is at most
 * 2 * 2 * 128 = 512 in magnitude, a group's four planes at most 2048, so eight groups fit an int16
 * lane before vpmaddwd widens them to int32. Everything is integer: the result is exact.
 *
 * Threads split the output rows (OpenMP; in a process that imported torch first this is torch's
 * own libgomp, same soname, so both share one pool and never spin against each other). Built by
 * engine/kernels/native/__init__.py. CPUs without AVX2 take the portable loop.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "ternary.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define GROUP 128        /* in-features per 32-byte load */
#define GROUP_BYTES 32
#define FLUSH_GROUPS 8   /* groups summed in int16 before widening to int32 */
#define MR 4             /* activation rows per pass over a weight row */
/* Each weight load asks for the bytes this far ahead (four rows at K = 2048): in a block's
 * products at M = 1 the loop otherwise stalls on its weight loads (perf). Passes of four weight
 * rows side by side (each activation load serving four) were tried too: slower, the interleaved
 * streams defeat the hardware prefetcher. */
#ifndef PREFETCH
#define PREFETCH 2048
#endif
#define NC 16            /* output rows per tile: their packed rows stay in L1 across passes */
/* Below this a call runs on one thread: waking another costs more, and on a busy machine the
 * woken thread may wait for a time slice while the region waits for it (~100-200 us of work). */
#define PARALLEL_MACS (1 << 21)

/* A pass: one weight row against mr activation rows (rows m0..m0+mr-1). */
typedef struct {
    const uint8_t *row;
    const uint8_t *tail;          /* the row's last, partial group, zero-padded (or NULL) */
    int64_t full_groups, groups;
} Pass;

typedef void (*pass_fn)(const Pass *, const TernaryActs *, int64_t, int, int32_t *, int64_t, int64_t);

static inline const uint8_t *pass_group(const Pass *p, int64_t g) {
    return g < p->full_groups ? p->row + g * GROUP_BYTES : p->tail;
}

/* The portable path: the same planes, one code at a time. */
static void pass_portable(const Pass *p, const TernaryActs *x, int64_t m0, int mr, int32_t *out,
                          int64_t ldo, int64_t n) {
    for (int i = 0; i < mr; i++) {
        const int8_t *a = x->a + (m0 + i) * x->stride;
        int32_t acc = 0;
        for (int64_t g = 0; g < p->groups; g++) {
            const uint8_t *wb = pass_group(p, g);
            const int8_t *ag = a + g * GROUP;
            for (int b = 0; b < GROUP_BYTES; b++)
                for (int q = 0; q < 4; q++) acc += ((wb[b] >> (2 * q)) & 3) * ag[32 * q + b];
        }
        out[(m0 + i) * ldo + n] = acc - x->sum[m0 + i];
    }
}

#ifdef HAVE_X86
__attribute__((target("avx2"))) static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* One activation row (M = 1, the steady state of decoding) against rows whose width is whole
 * groups. Unpacking is cheaper than pass_avx2_n's: one shift serves two planes, and planes 1 and 3
 * are taken in place (the and-mask 0x0C leaves 4 * code, so no shift), summed in their own int16
 * lanes and divided by 4 once per eight groups: 1 shift and 4 ands per group instead of 3 and 4.
 * Range: a pair of 4 * code * a is at most 2 * 8 * 128 = 2048 in magnitude, two planes over eight
 * groups 16 * 2048 = 32768: 32512 for |a| <= 127, and -32768 (still an int16) for a = -128. */
__attribute__((target("avx2"))) static inline __m256i row_m1(const uint8_t *w, const int8_t *a,
                                                             int64_t groups) {
    const __m256i three = _mm256_set1_epi8(3), twelve = _mm256_set1_epi8(12);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t g0 = 0; g0 < groups; g0 += FLUSH_GROUPS) {
        int64_t g1 = g0 + FLUSH_GROUPS < groups ? g0 + FLUSH_GROUPS : groups;
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
        for (int64_t g = g0; g < g1; g++) {
            const uint8_t *wg = w + g * GROUP_BYTES;
            const int8_t *ag = a + g * GROUP;
#if PREFETCH
            _mm_prefetch((const char *)wg + PREFETCH, _MM_HINT_T0);
#endif
            __m256i wv = _mm256_loadu_si256((const __m256i *)wg), w4 = _mm256_srli_epi16(wv, 4);
            __m256i s0 = _mm256_maddubs_epi16(_mm256_and_si256(wv, three), _mm256_loadu_si256((const __m256i *)ag));
            __m256i s1 = _mm256_maddubs_epi16(_mm256_and_si256(wv, twelve), _mm256_loadu_si256((const __m256i *)(ag + 32)));
            __m256i s2 = _mm256_maddubs_epi16(_mm256_and_si256(w4, three), _mm256_loadu_si256((const __m256i *)(ag + 64)));
            __m256i s3 = _mm256_maddubs_epi16(_mm256_and_si256(w4, twelve), _mm256_loadu_si256((const __m256i *)(ag + 96)));
            lo = _mm256_add_epi16(lo, _mm256_add_epi16(s0, s2));
            hi = _mm256_add_epi16(hi, _mm256_add_epi16(s1, s3));
        }
        /* hi's lanes are multiples of 4: the shift is exact. */
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(lo, _mm256_srai_epi16(hi, 2)), ones));
    }
    return acc;
}

/* The four rows' sums of r0..r3 (each eight int32 lanes) in one hadd tree. */
__attribute__((target("avx2"), always_inline)) static inline __m128i hsum4(__m256i r0, __m256i r1, __m256i r2,
                                                                            __m256i r3) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(r0, r1), _mm256_hadd_epi32(r2, r3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* out[n] = row n . a - sum for n in [0, count), the rows contiguous from w (row_bytes apart),
 * reduced four rows at a time (one hadd tree for four rows' sums). */
__attribute__((target("avx2"))) static void rows_m1_avx2(const uint8_t *w, int64_t row_bytes,
                                                         const int8_t *a, int32_t sum, int64_t count,
                                                         int32_t *out) {
    int64_t groups = row_bytes / GROUP_BYTES, n = 0;
    for (; n + 4 <= count; n += 4) {
        __m256i r0 = row_m1(w + n * row_bytes, a, groups), r1 = row_m1(w + (n + 1) * row_bytes, a, groups);
        __m256i r2 = row_m1(w + (n + 2) * row_bytes, a, groups), r3 = row_m1(w + (n + 3) * row_bytes, a, groups);
        _mm_storeu_si128((__m128i *)(out + n), _mm_sub_epi32(hsum4(r0, r1, r2, r3), _mm_set1_epi32(sum)));
    }
    for (; n < count; n++) out[n] = hsum_epi32(row_m1(w + n * row_bytes, a, groups)) - sum;
}

/* One weight row (a pass's) against mr activation rows (mr a constant at each call site, so the
 * accumulators live in registers): the row is unpacked once for all of them. acc[i]: row i's
 * int32 lanes, summed by the caller. */
__attribute__((target("avx2"), always_inline)) static inline void
row_mr(const Pass *p, const int8_t *const *rows, const int mr, __m256i *acc) {
    int64_t groups = p->groups;
    const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i part[MR];
    for (int i = 0; i < mr; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t g0 = 0; g0 < groups; g0 += FLUSH_GROUPS) {
        int64_t g1 = g0 + FLUSH_GROUPS < groups ? g0 + FLUSH_GROUPS : groups;
        for (int i = 0; i < mr; i++) part[i] = _mm256_setzero_si256();
        for (int64_t g = g0; g < g1; g++) {
            const uint8_t *wg = pass_group(p, g);
#if PREFETCH
            _mm_prefetch((const char *)wg + PREFETCH, _MM_HINT_T0);
#endif
            __m256i wv = _mm256_loadu_si256((const __m256i *)wg);
            __m256i p0 = _mm256_and_si256(wv, three);
            __m256i p1 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), three);
            __m256i p2 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), three);
            __m256i p3 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), three);
            for (int i = 0; i < mr; i++) {
                const int8_t *a = rows[i] + g * GROUP;
                __m256i s0 = _mm256_maddubs_epi16(p0, _mm256_loadu_si256((const __m256i *)a));
                __m256i s1 = _mm256_maddubs_epi16(p1, _mm256_loadu_si256((const __m256i *)(a + 32)));
                __m256i s2 = _mm256_maddubs_epi16(p2, _mm256_loadu_si256((const __m256i *)(a + 64)));
                __m256i s3 = _mm256_maddubs_epi16(p3, _mm256_loadu_si256((const __m256i *)(a + 96)));
                part[i] = _mm256_add_epi16(part[i], _mm256_add_epi16(_mm256_add_epi16(s0, s1),
                                                                     _mm256_add_epi16(s2, s3)));
            }
        }
        for (int i = 0; i < mr; i++) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(part[i], ones));
    }
}

/* A pass of the general loop (any K: the last group from the pass's zero-padded tail). */
__attribute__((target("avx2"), always_inline)) static inline void
pass_avx2_n(const Pass *p, const TernaryActs *x, int64_t m0, const int mr, int32_t *out, int64_t ldo,
            int64_t n) {
    const int8_t *rows[MR];
    __m256i acc[MR];
    for (int i = 0; i < mr; i++) rows[i] = x->a + (m0 + i) * x->stride;
    row_mr(p, rows, mr, acc);
    for (int i = 0; i < mr; i++) out[(m0 + i) * ldo + n] = hsum_epi32(acc[i]) - x->sum[m0 + i];
}

__attribute__((target("avx2"))) static void
pass_avx2(const Pass *p, const TernaryActs *x, int64_t m0, int mr, int32_t *out, int64_t ldo, int64_t n) {
    switch (mr) {
    case 4: pass_avx2_n(p, x, m0, 4, out, ldo, n); break;
    case 3: pass_avx2_n(p, x, m0, 3, out, ldo, n); break;
    case 2: pass_avx2_n(p, x, m0, 2, out, ldo, n); break;
    default: pass_avx2_n(p, x, m0, 1, out, ldo, n); break;
    }
}

/* out[i * ldo + n] = row n . a_i - sum_i for the mr activation rows a_i and n in [0, count), the
 * weight rows contiguous from w: four weight rows at a time, each unpacked once for all mr
 * activation rows, each activation row's four sums in one hadd tree (at small K the per-sum
 * reduction, not the products, was what a row cost). */
__attribute__((target("avx2"), always_inline)) static inline void
rows_mr_n(const uint8_t *w, int64_t row_bytes, const int8_t *const *rows, const int32_t *sum,
          const int mr, int64_t count, int32_t *out, int64_t ldo) {
    int64_t groups = row_bytes / GROUP_BYTES, n = 0;
    __m256i acc[4][MR];
    for (; n + 4 <= count; n += 4) {
        for (int j = 0; j < 4; j++) {
            Pass p = {w + (n + j) * row_bytes, NULL, groups, groups};
            row_mr(&p, rows, mr, acc[j]);
        }
        for (int i = 0; i < mr; i++)
            _mm_storeu_si128((__m128i *)(out + i * ldo + n),
                             _mm_sub_epi32(hsum4(acc[0][i], acc[1][i], acc[2][i], acc[3][i]), _mm_set1_epi32(sum[i])));
    }
    for (; n < count; n++) {
        Pass p = {w + n * row_bytes, NULL, groups, groups};
        row_mr(&p, rows, mr, acc[0]);
        for (int i = 0; i < mr; i++) out[i * ldo + n] = hsum_epi32(acc[0][i]) - sum[i];
    }
}

/* Every activation row of x against count contiguous weight rows of whole groups (out[m * ldo
 * + n]), in passes of up to four activation rows. */
__attribute__((target("avx2"))) static void rows_avx2(const uint8_t *w, int64_t row_bytes, const TernaryActs *x,
                                                      int64_t count, int32_t *out, int64_t ldo) {
    if (x->M == 1) {
        rows_m1_avx2(w, row_bytes, x->a, x->sum[0], count, out);
        return;
    }
    /* Tiles of 16 weight rows: their packed bytes stay in L1 across the passes. */
    for (int64_t t0 = 0; t0 < count; t0 += NC) {
        int64_t tn = count - t0 < NC ? count - t0 : NC;
        for (int64_t m0 = 0; m0 < x->M; m0 += MR) {
            const int8_t *rows[MR];
            int mr = x->M - m0 < MR ? (int)(x->M - m0) : MR;
            for (int i = 0; i < mr; i++) rows[i] = x->a + (m0 + i) * x->stride;
            const uint8_t *wt = w + t0 * row_bytes;
            int32_t *o = out + m0 * ldo + t0;
            switch (mr) {
            case 4: rows_mr_n(wt, row_bytes, rows, x->sum + m0, 4, tn, o, ldo); break;
            case 3: rows_mr_n(wt, row_bytes, rows, x->sum + m0, 3, tn, o, ldo); break;
            case 2: rows_mr_n(wt, row_bytes, rows, x->sum + m0, 2, tn, o, ldo); break;
            default: rows_mr_n(wt, row_bytes, rows, x->sum + m0, 1, tn, o, ldo); break;
            }
        }
    }
}
#endif

static int force_portable = 0;

static pass_fn pick_kernel(void) {
#ifdef HAVE_X86
    if (!force_portable && __builtin_cpu_supports("avx2")) return pass_avx2;
#endif
    return pass_portable;
}

int bitskip_has_avx2(void) { return pick_kernel() != pass_portable; }

/* Tests run the portable loop on an AVX2 machine too. */
void bitskip_force_portable(int on) { force_portable = on; }

static const uint8_t *weight_row(const TernaryWeights *w, int64_t n) {
    for (int p = 0; p < w->nparts; p++) {
        if (n < w->part_rows[p]) return w->parts[p] + n * (w->K / 4);
        n -= w->part_rows[p];
    }
    return NULL;
}

void bitskip_ternary_rows(const TernaryActs *x, const TernaryWeights *w, int64_t n0, int64_t n1,
                          int32_t *out, int64_t ldo) {
    pass_fn pass = pick_kernel();
    int64_t row_bytes = w->K / 4, full = w->K / GROUP, tail_bytes = row_bytes - full * GROUP_BYTES;
#ifdef HAVE_X86
    if (tail_bytes == 0 && pass == pass_avx2) {
        /* Each part's rows of the range in one contiguous stream. */
        int64_t first = 0;
        for (int p = 0; p < w->nparts && first < n1; first += w->part_rows[p++]) {
            int64_t lo = n0 > first ? n0 : first, hi = n1 < first + w->part_rows[p] ? n1 : first + w->part_rows[p];
            if (lo < hi)
                rows_avx2(w->parts[p] + (lo - first) * row_bytes, row_bytes, x, hi - lo, out + lo, ldo);
        }
        return;
    }
#endif
    uint8_t tails[NC][GROUP_BYTES];
    Pass p[NC];
    for (int64_t t0 = n0; t0 < n1; t0 += NC) {
        int64_t t1 = t0 + NC < n1 ? t0 + NC : n1;
        for (int64_t n = t0; n < t1; n++) {
            Pass *q = &p[n - t0];
            *q = (Pass){weight_row(w, n), NULL, full, tail_bytes > 0 ? full + 1 : full};
            if (tail_bytes > 0) {
                memset(tails[n - t0], 0, GROUP_BYTES);
                memcpy(tails[n - t0], q->row + full * GROUP_BYTES, (size_t)tail_bytes);
                q->tail = tails[n - t0];
            }
        }
        for (int64_t m0 = 0; m0 < x->M; m0 += MR) {
            int mr = x->M - m0 < MR ? (int)(x->M - m0) : MR;
            for (int64_t n = t0; n < t1; n++) pass(&p[n - t0], x, m0, mr, out, ldo, n);
        }
    }
}

/* In each whole group, in-feature 4b + j moves to 32j + b (bitskip_plane_index): a 32 x 4 byte
 * transpose, a few instructions a byte; the last, partial group is zero-padded. */
void bitskip_plane_order(const int8_t *a, int64_t K, int8_t *dst) {
    int64_t full = K / GROUP * GROUP;
    for (int64_t g = 0; g < full; g += GROUP)
        for (int64_t b = 0; b < 32; b++)
            for (int64_t j = 0; j < 4; j++) dst[g + 32 * j + b] = a[g + 4 * b + j];
    if (full < K) {
        memset(dst + full, 0, GROUP);
        for (int64_t k = full; k < K; k++) dst[bitskip_plane_index(k)] = a[k];
    }
}

/* Permute a row's activations into plane order and sum them. */
static int32_t permute_row(const int8_t *a, int64_t K, int8_t *dst) {
    int32_t sum = 0;
    for (int64_t k = 0; k < K; k++) sum += a[k];
    bitskip_plane_order(a, K, dst);
    return sum;
}

size_t bitskip_ternary_workspace(int64_t M, int64_t K) {
    return (size_t)(M * bitskip_ternary_stride(K)) + 32 + sizeof(int32_t) * (size_t)(M > 0 ? M : 1);
}

/* bitskip_ternary_gemm with its scratch given: `ws` of bitskip_ternary_workspace(M, K) bytes,
 * aligned for int32 (callers that run many products reuse one buffer). */
void bitskip_ternary_gemm_ws(const int8_t *a, int64_t M, int64_t K, int64_t lda,
                             const uint8_t *const *parts, const int64_t *part_rows, int nparts,
                             int32_t *out, int64_t ldo, int nthreads, void *ws) {
    TernaryWeights w = {parts, part_rows, nparts, K};
    int64_t N = 0, stride = bitskip_ternary_stride(K);
    for (int p = 0; p < nparts; p++) N += part_rows[p];
    int32_t *sum = ws;
    int8_t *ap = (int8_t *)(sum + (M > 0 ? M : 1));
    for (int64_t m = 0; m < M; m++) sum[m] = permute_row(a + m * lda, K, ap + m * stride);
    TernaryActs x = {ap, sum, M, stride};
    int64_t tasks = (N + NC - 1) / NC;
    if ((double)M * (double)N * (double)K < PARALLEL_MACS) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t t = 0; t < tasks; t++)
        bitskip_ternary_rows(&x, &w, t * NC, t * NC + NC < N ? t * NC + NC : N, out, ldo);
}

/* out[m, n] = sum_k a[m, k] * t[n, k] for the ternary t of the concatenated parts' rows.
 * a: int8 [M, K] (row stride lda); out: int32 [M, N] (row stride ldo); K a multiple of 4.
 * Returns 0, or -1 when memory for the permuted activations cannot be had. */
int bitskip_ternary_gemm(const int8_t *a, int64_t M, int64_t K, int64_t lda,
                         const uint8_t *const *parts, const int64_t *part_rows, int nparts,
                         int32_t *out, int64_t ldo, int nthreads) {
    void *ws = malloc(bitskip_ternary_workspace(M, K));
    if (!ws) return -1;
    bitskip_ternary_gemm_ws(a, M, K, lda, parts, part_rows, nparts, out, ldo, nthreads, ws);
    free(ws);
    return 0;
}
