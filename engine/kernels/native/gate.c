/* The gated MLP's activation, a[i] = act(g[i]) * u[i] in float64 rounded once to float32, as
 * models/functional.py computes it: act = ReLU squared, or SiLU = g / (1 + exp(-g)) with libm's
 * exp (what this code always called).
 *
 * SiLU's exp is most of a small model's elementwise time (one call a feature a row, ~40 cycles).
 * Four lanes at a time take a short exp instead (exp4: within 2^-51 of exp, measured; libm's is
 * within 2^-52) through the same three float64 operations (1 + e, a quotient and a product pass a
 * relative error on about unchanged): their float64 result is within ~2^-48 of the libm path's,
 * and rounds to the same float32 unless it sits within 2^-44 (16 times that) of a rounding
 * boundary. Such lanes (about one in 2^19), and any lane out of the checked range (huge, tiny,
 * non-finite), are computed again with libm's exp: the result is libm's to the bit, whatever the
 * path or the CPU.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "gate.h"
#include "simd.h"

/* The libm path, for a lane the short one cannot vouch for. */
static float silu_exact(float g, float u) {
    double gd = g;
    return (float)(gd / (1.0 + exp(-gd)) * (double)u);
}

/* exp(x) for |x| <= 708: x = k ln2 + r (ln2's high part has 11 trailing zero bits: k ln2_hi is
 * exact for |k| < 2^11), |r| <= ln2 / 2, exp(r) as its Taylor polynomial to r^13 (truncation
 * < 2^-57) in Estrin's scheme (a quarter of Horner's latency), times 2^k built in the exponent
 * bits (k + 1023 in 1..2046). Measured within 2^-51 of expl (4M draws over the whole range). */
__attribute__((always_inline)) static inline v4d exp4(v4d x) {
    const v4d shift = {0x1.8p52, 0x1.8p52, 0x1.8p52, 0x1.8p52};
    v4d kd = x * 0x1.71547652b82fep0 + shift;
    v4l ki = (v4l)kd;
    kd = kd - shift;
    v4d r = (x - kd * 0x1.62e42fefa3800p-1) - kd * 0x1.ef35793c7673p-45;
    v4d r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    v4d p01 = 1.0 + r, p23 = 0.5 + r * (1.0 / 6), p45 = 1.0 / 24 + r * (1.0 / 120);
    v4d p67 = 1.0 / 720 + r * (1.0 / 5040), p89 = 1.0 / 40320 + r * (1.0 / 362880);
    v4d pab = 1.0 / 3628800 + r * (1.0 / 39916800), pcd = 1.0 / 479001600 + r * (1.0 / 6227020800);
    v4d q0 = p01 + r2 * p23, q1 = p45 + r2 * p67, q2 = p89 + r2 * pab;
    v4d p = (q0 + r4 * q1) + r8 * (q2 + r4 * pcd);
    return p * (v4d)((ki + 1023) << 52);
}

__attribute__((always_inline)) static inline v4d absd(v4d x) {
    return (v4d)((v4l)x & 0x7fffffffffffffffLL);
}

/* SiLU(g) * u for four lanes into a; a lane the check cannot vouch for is nonzero in the mask
 * returned. Rounding is monotonic: when v - 2^-44 |v| and v + 2^-44 |v| round to the same float,
 * so does everything between them, libm's result among it. */
__attribute__((always_inline)) static inline v4l silu4(const float *g, const float *u, float *a) {
    v4d gd = __builtin_convertvector(*(const v4f *)g, v4d), ud = __builtin_convertvector(*(const v4f *)u, v4d);
    v4d x = -gd;
    v4l inside = absd(x) <= 708.0;            /* false for NaN */
    x = (v4d)((v4l)x & inside);               /* the other lanes are redone: exp(0) here */
    v4d v = gd / (1.0 + exp4(x)) * ud, margin = absd(v) * 0x1p-44;
    v4f r = __builtin_convertvector(v, v4f);
    v4f lo = __builtin_convertvector(v - margin, v4f), hi = __builtin_convertvector(v + margin, v4f);
    memcpy(a, &r, sizeof(r));
    /* Tiny results: float subnormals, or float64 ones on the way (outside the error bound); but a
     * zero is exact (g or u zero, the other finite: the signs decide it; or a product far below
     * float32's range, which is a zero of that sign on either path). */
    return ~(inside & ((absd(v) >= 0x1p-120) | (v == 0.0)) & __builtin_convertvector(lo == hi, v4l));
}

WIDE void bitskip_gate(const float *g, const float *u, int64_t count, int64_t relu2, float *a) {
    if (relu2) {
        for (int64_t i = 0; i < count; i++) {
            double gd = g[i], pos = gd > 0.0 ? gd : 0.0;
            a[i] = (float)(pos * pos * (double)u[i]);
        }
        return;
    }
    int64_t full = count / 4 * 4;
    v4l redo = {0};
    for (int64_t i = 0; i < full; i += 4) redo |= silu4(g + i, u + i, a + i);
    if (redo[0] | redo[1] | redo[2] | redo[3])  /* rare: find the lanes again */
        for (int64_t i = 0; i < full; i += 4) {
            v4l lanes = silu4(g + i, u + i, a + i);
            for (int j = 0; j < 4; j++)
                if (lanes[j]) a[i + j] = silu_exact(g[i + j], u[i + j]);
        }
    for (int64_t i = full; i < count; i++) a[i] = silu_exact(g[i], u[i]);
}
