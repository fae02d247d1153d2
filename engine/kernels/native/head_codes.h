/* The screened head's copy of the float32 head (head_codes.c): per head row v an 8-bit code
 * u = q + 128 per weight (q = round(w / s_v) within +-127, s_v = max |w_v| / 127), stored as two
 * levels that head_screen.c reads apart:
 *
 *   level 1, one record of kp * 3 / 4 bytes per row (kp = K rounded up to 64, codes past K are
 *   128): the top 6 bits hi = u >> 2 of each block of 64 weights as 32 bytes (byte b: hi of
 *   weight b in bits 0-5, hi & 3 of weight b + 32 in bits 6-7) then 16 bytes of nibbles (byte b:
 *   hi >> 2 of weight 32 + b in bits 0-3, of weight 48 + b in bits 4-7);
 *   level 2, kp / 4 bytes per row after all the records: the low bits u & 3 in the same 2-bit
 *   arrangement.
 *
 * codes [V * kp] bytes in all (the int8 copy's size), scale [V], bounds [V + 1, 4] (per row r, p
 * of level 1, then of level 2: head_screen.c; row V: each column's largest). */
#ifndef BITSKIP_HEAD_CODES_H
#define BITSKIP_HEAD_CODES_H
#include <stdint.h>

#define HEAD_CODES_MB 8  /* activation rows a level-1 pass serves */

static inline int64_t head_codes_padded(int64_t K) { return (K + 63) / 64 * 64; }
static inline int64_t head_codes_level1_bytes(int64_t kp) { return kp * 3 / 4; }

typedef struct {
    /* C[j * ldc + i] = sum_k hi(row i, k) xq[j * kp + k] for mb <= HEAD_CODES_MB rows of xq and
     * n level-1 records; exact (|C| <= 63 Q kp < 2^31 for head_screen.c's Q). xs: the same rows
     * as bytes [mb, 2, kp], xq = 256 xh + xl with xl in -128..127 (for one row of x). */
    void (*level1)(const int16_t *xq, const int8_t *xs, int mb, int64_t kp, const uint8_t *rec, int n, int32_t *C,
                   int ldc);
    /* sum_k lo(k) xq[k] over one row's level-2 bytes. */
    int64_t (*level2)(const int16_t *xq, int64_t kp, const uint8_t *lo);
} head_codes_kernels;

/* The largest activation code Q for rows of kp: |C| <= 127 Q kp fits int32, and xq + 128 fits
 * int16 (its high byte fits int8). */
static inline double head_codes_qmax(int64_t kp) {
    double Q = __builtin_floor(2147483647.0 / (127.0 * (double)kp));
    return Q < 32639 ? Q : 32639;
}

/* xq [kp] as the level-1 kernels' bytes xs [2, kp]: xq = 256 xh + xl exactly, xl in -128..127. */
static inline void head_codes_split(const int16_t *xq, int64_t kp, int8_t *xs) {
    for (int64_t k = 0; k < kp; k++) {
        int8_t lo = (int8_t)(((xq[k] + 128) & 255) - 128);
        xs[k] = lo, xs[kp + k] = (int8_t)((xq[k] - lo) / 256);
    }
}

/* Ask for n bytes from p into the cache (one row's level-2 bytes before its dot). */
static inline void head_codes_prefetch(const uint8_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(p + i);
}

/* The AVX2 kernels, or the portable ones (no AVX2, or bitskip_head_force_portable). */
const head_codes_kernels *bitskip_head_codes_kernels(void);

#endif
