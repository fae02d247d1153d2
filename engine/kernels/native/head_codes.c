/* The screened head's two-level copy of the float32 head (layout: head_codes.h): built once from
 * the head, and the integer dots head_screen.c takes over it, in AVX2 and in portable C (the same
 * exact integers either way). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "head.h"
#include "head_codes.h"
#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define MARGIN (1 + 0x1p-20)

static double gamma_n(int64_t K) {
    double nu = (double)(K + 40) * 0x1p-24;
    return nu / (1 - nu);
}

/* Rows v0 .. v0 + n - 1 of the copy of a V-row head, from w (those rows, [n, K]): their codes,
 * scale and bounds (per level: r = (||w - s c|| + gamma ||w||) MARGIN, p = s ||c|| MARGIN, with
 * c = 4 hi - 126.5 at level 1, c = q at level 2: head_screen.c); *norm_max raised to the largest
 * ||w_v||. Returns -1 when a weight is not finite (nothing can be bounded), else 0. */
int bitskip_head_screen_build(const float *w, int64_t v0, int64_t n, int64_t K, int64_t V, uint8_t *codes,
                              float *scale, double *bounds, double *norm_max, int nthreads) {
    int bad = 0;
    const int64_t kp = head_codes_padded(K), rec = head_codes_level1_bytes(kp);
    double g = gamma_n(K), top = *norm_max;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1) \
    reduction(| : bad) reduction(max : top)
    for (int64_t r = 0; r < n; r++) {
        const float *wv = w + r * K;
        uint8_t *one = codes + (v0 + r) * rec, *two = codes + V * rec + (v0 + r) * (kp / 4);
        float mx = 0;
        for (int64_t k = 0; k < K; k++) {
            float a = fabsf(wv[k]);
            if (!(a <= 3.4028234663852886e38f)) bad = 1;
            mx = a > mx ? a : mx;
        }
        float s = mx / 127.0f;
        double e1 = 0, e2 = 0, w2 = 0, c1 = 0, c2 = 0;
        for (int64_t b = 0; b < kp; b += 64) {
            uint8_t u[64];
            for (int i = 0; i < 64; i++) {
                int64_t k = b + i;
                /* any codes will do (the bounds measure what they miss): nearest, within +-127 */
                float c = s > 0 && k < K ? rintf(wv[k] / s) : 0;
                c = c > 127 ? 127 : c < -127 ? -127 : c;
                u[i] = (uint8_t)(c + 128);
                if (k >= K) continue;
                double h = 4 * (u[i] >> 2) - 126.5, d1 = (double)wv[k] - (double)s * h, d2 = (double)wv[k] - (double)s * c;
                e1 += d1 * d1, e2 += d2 * d2, w2 += (double)wv[k] * wv[k], c1 += h * h, c2 += (double)c * c;
            }
            uint8_t *six = one + b * 3 / 4, *nib = six + 32, *lo = two + b / 4;
            for (int i = 0; i < 32; i++) six[i] = (uint8_t)((u[i] >> 2) | (u[i + 32] >> 2 << 6));
            for (int i = 0; i < 16; i++) {
                nib[i] = (uint8_t)((u[32 + i] >> 4) | (u[48 + i] >> 4 << 4));
                lo[i] = 0;
                for (int f = 0; f < 4; f++) lo[i] |= (uint8_t)((u[16 * f + i] & 3) << (2 * f));
            }
        }
        double *bd = bounds + 4 * (v0 + r);
        scale[v0 + r] = s;
        bd[0] = (sqrt(e1) + g * sqrt(w2)) * MARGIN, bd[1] = s * sqrt(c1) * MARGIN;
        bd[2] = (sqrt(e2) + g * sqrt(w2)) * MARGIN, bd[3] = s * sqrt(c2) * MARGIN;
        top = sqrt(w2) > top ? sqrt(w2) : top;
    }
    *norm_max = top;
    return bad ? -1 : 0;
}

/* ---- the integer dots, portable ------------------------------------------------------------ */
static inline int field(const uint8_t *bytes, int i) { return (bytes[i & 15] >> (2 * (i >> 4))) & 3; }

/* The top 6 bits of code k (0..63) of a block's level-1 bytes. */
static inline int hi6(const uint8_t *r, int k) {
    return k < 32 ? r[k] & 63 : ((r[32 + (k & 15)] >> (k & 16 ? 4 : 0)) & 15) * 4 + (r[k - 32] >> 6);
}

static void level1_portable(const int16_t *xq, const int8_t *xs, int mb, int64_t kp, const uint8_t *rec, int n,
                            int32_t *C, int ldc) {
    (void)xs;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < mb; j++) {
            const uint8_t *r = rec + i * head_codes_level1_bytes(kp);
            const int16_t *x = xq + j * kp;
            int32_t s = 0;
            for (int64_t b = 0; b < kp; b += 64, r += 48)
                for (int k = 0; k < 64; k++) s += hi6(r, k) * x[b + k];
            C[j * ldc + i] = s;
        }
}

static int64_t level2_portable(const int16_t *xq, int64_t kp, const uint8_t *lo) {
    int64_t s = 0;
    for (int64_t b = 0; b < kp; b += 64, lo += 16)
        for (int k = 0; k < 64; k++) s += field(lo, k) * xq[b + k];
    return s;
}

/* ---- AVX2 --------------------------------------------------------------------------------- */
#ifdef HAVE_X86
/* 64 2-bit fields (16 bytes, head_codes.h's order) as two vectors of 32 bytes in weight order. */
__attribute__((target("avx2"), always_inline)) static inline void
fields(const uint8_t *p, __m256i *f0, __m256i *f1) {
    const __m256i three = _mm256_set1_epi8(3);
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    *f0 = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), three);
    *f1 = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), three);
}

/* sum over 64 weights of code (bytes h0: weights 0..31, h1: 32..63) times x, into 8 int32 lanes */
__attribute__((target("avx2"), always_inline)) static inline __m256i
dot64(const __m256i w[4], const int16_t *x) {
    __m256i a = _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256((const __m256i *)x)),
                                 _mm256_madd_epi16(w[1], _mm256_loadu_si256((const __m256i *)(x + 16))));
    __m256i b = _mm256_add_epi32(_mm256_madd_epi16(w[2], _mm256_loadu_si256((const __m256i *)(x + 32))),
                                 _mm256_madd_epi16(w[3], _mm256_loadu_si256((const __m256i *)(x + 48))));
    return _mm256_add_epi32(a, b);
}

__attribute__((target("avx2"), always_inline)) static inline void
widen(__m256i h0, __m256i h1, __m256i w[4]) {
    w[0] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(h0));
    w[1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(h0, 1));
    w[2] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(h1));
    w[3] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(h1, 1));
}

__attribute__((target("avx2"), always_inline)) static inline int32_t hsum(__m256i a) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1)));
}

#define PREFETCH 1536  /* bytes ahead in the level-1 stream: one record at hidden 2048 */

/* A block's 64 six-bit codes as bytes: h0 weights 0..31, h1 32..63 (4 * nibble + the top bits). */
__attribute__((target("avx2"), always_inline)) static inline void
unpack6(const uint8_t *r, __m256i *h0, __m256i *h1) {
    __m256i six = _mm256_loadu_si256((const __m256i *)r);
    __m256i nib = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(r + 32)));
    /* low nibbles (lane 0) up 2 bits, high nibbles (lane 1) down 2: both at bits 2-5 */
    nib = _mm256_srlv_epi32(_mm256_sllv_epi32(nib, _mm256_setr_epi32(2, 2, 2, 2, 0, 0, 0, 0)),
                            _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
    *h0 = _mm256_and_si256(six, _mm256_set1_epi8(0x3f));
    *h1 = _mm256_or_si256(_mm256_and_si256(nib, _mm256_set1_epi8(0x3c)),
                          _mm256_and_si256(_mm256_srli_epi16(six, 6), _mm256_set1_epi8(3)));
}

/* One row of x (xs: its low and high bytes, xq = 256 xh + xl): vpmaddubsw on the code bytes, no
 * widening. Pairs stay within int16: 2 * 2 * 63 * 128 < 2^15. */
__attribute__((target("avx2"))) static void
level1_one(const int8_t *xs, int64_t kp, const uint8_t *rec, int n, int32_t *C) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xl = xs, *xh = xs + kp;
    for (int i = 0; i < n; i++) {
        __m256i accl = _mm256_setzero_si256(), acch = _mm256_setzero_si256(), h0, h1;
        const uint8_t *r = rec + i * head_codes_level1_bytes(kp);
        for (int64_t b = 0; b < kp; b += 64, r += 48) {
            _mm_prefetch((const char *)(r + PREFETCH), _MM_HINT_T0);
            unpack6(r, &h0, &h1);
            __m256i l = _mm256_add_epi16(_mm256_maddubs_epi16(h0, _mm256_loadu_si256((const __m256i *)(xl + b))),
                                         _mm256_maddubs_epi16(h1, _mm256_loadu_si256((const __m256i *)(xl + b + 32))));
            __m256i h = _mm256_add_epi16(_mm256_maddubs_epi16(h0, _mm256_loadu_si256((const __m256i *)(xh + b))),
                                         _mm256_maddubs_epi16(h1, _mm256_loadu_si256((const __m256i *)(xh + b + 32))));
            accl = _mm256_add_epi32(accl, _mm256_madd_epi16(l, ones));
            acch = _mm256_add_epi32(acch, _mm256_madd_epi16(h, ones));
        }
        C[i] = (int32_t)(256 * (int64_t)hsum(acch) + hsum(accl));
    }
}

/* Several rows of x: each block's codes widened once, then one vpmaddwd per 16 codes and row. */
__attribute__((target("avx2"))) static void
level1_avx2(const int16_t *xq, const int8_t *xs, int mb, int64_t kp, const uint8_t *rec, int n, int32_t *C,
            int ldc) {
    if (mb == 1) {
        level1_one(xs, kp, rec, n, C);
        return;
    }
    for (int i = 0; i < n; i++) {
        __m256i acc[HEAD_CODES_MB], h0, h1, w[4];
        for (int j = 0; j < mb; j++) acc[j] = _mm256_setzero_si256();
        const uint8_t *r = rec + i * head_codes_level1_bytes(kp);
        for (int64_t b = 0; b < kp; b += 64, r += 48) {
            _mm_prefetch((const char *)(r + PREFETCH), _MM_HINT_T0);
            unpack6(r, &h0, &h1);
            widen(h0, h1, w);
            for (int j = 0; j < mb; j++) acc[j] = _mm256_add_epi32(acc[j], dot64(w, xq + j * kp + b));
        }
        for (int j = 0; j < mb; j++) C[j * ldc + i] = hsum(acc[j]);
    }
}

__attribute__((target("avx2"))) static int64_t level2_avx2(const int16_t *xq, int64_t kp, const uint8_t *lo) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t b = 0; b < kp; b += 64, lo += 16) {
        __m256i f0, f1, w[4];
        fields(lo, &f0, &f1);
        widen(f0, f1, w);
        acc = _mm256_add_epi32(acc, dot64(w, xq + b));
    }
    return hsum(acc);
}

static const head_codes_kernels avx2 = {level1_avx2, level2_avx2};
#endif

static const head_codes_kernels portable = {level1_portable, level2_portable};

const head_codes_kernels *bitskip_head_codes_kernels(void) {
#ifdef HAVE_X86
    if (bitskip_head_avx2()) return &avx2;  /* bitskip_head_force_portable decides for both */
#endif
    return &portable;
}
