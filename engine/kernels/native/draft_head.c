/* A greedy draft's head: the argmax of an estimate of the logits read from the screened head's
 * level-1 codes (head_codes.h: the top 6 bits of each weight's 8-bit code, 3/16 of the float32
 * head's bytes), with no bound, no second level and no exact rescoring.
 *
 * Why an estimate is enough: a speculative round's verify computes the full model's own token at
 * every drafted position with the exact head and keeps a draft only where the two agree, so a
 * greedy draft never reaches the output unverified. A draft from an estimate that picks another
 * row than the exact head at E costs at most a rejected draft, never a different output. Sampled
 * rounds are not drafted here: their acceptance rule needs the draft distribution q they drew from.
 *
 * The estimate is head_screen.c's level-1 centre, a_v = s_v t (4 hi_v . xq - 126.5 sum xq) (the
 * dropped low 2 bits of each code at their mean), over the same quantized activation (xq =
 * round(x / t) within +-Q, t = max |x_k| / Q), and the common factor t > 0 left out.
 */
#include <math.h>
#include <stdint.h>
#include "head_codes.h"

#define TASK 64  /* head rows per level-1 call */

/* x as the level-1 kernels read it: xq int16 [kp] (zero past K) and its bytes xs [2, kp] (xq =
 * 256 xh + xl). Returns sum xq, or -1 with *ok = 0 when x has no finite, nonzero largest value. */
static double quantize(const float *x, int64_t K, int64_t kp, int16_t *xq, int8_t *xs, int *ok) {
    double Q = head_codes_qmax(kp), mx = 0, total = 0, sum = 0;
    for (int64_t k = 0; k < K; k++) {
        double a = fabs((double)x[k]);
        mx = a > mx ? a : mx;  /* a NaN leaves mx: the total catches it */
        total += x[k];
    }
    *ok = Q >= 1 && mx > 0 && isfinite(mx) && isfinite(total);
    if (!*ok) return -1;
    double t = mx / Q;
    for (int64_t k = 0; k < kp; k++) {
        double c = k < K ? nearbyint(x[k] / t) : 0;
        c = c > Q ? Q : c < -Q ? -Q : c;
        xq[k] = (int16_t)c;
        sum += c;
    }
    head_codes_split(xq, kp, xs);
    return sum;
}

/* The estimate's argmax (first index on ties) over the V head rows for x [K] (normed), from the
 * copy's codes and scale; xq [kp] and xs [2 kp] are scratch (kp = head_codes_padded(K)). Returns
 * -1 when x cannot be quantized (non-finite or all zero): the caller takes the exact head. */
int64_t bitskip_draft_head_argmax(const float *x, int64_t K, const uint8_t *codes, const float *scale,
                                  int64_t V, int16_t *xq, int8_t *xs) {
    const head_codes_kernels *kern = bitskip_head_codes_kernels();
    const int64_t kp = head_codes_padded(K), rec = head_codes_level1_bytes(kp);
    int ok;
    double sum = quantize(x, K, kp, xq, xs, &ok), best = -INFINITY;
    if (!ok) return -1;
    int64_t arg = 0;
    int32_t C[TASK];
    for (int64_t v0 = 0; v0 < V; v0 += TASK) {
        int n = (int)(V - v0 < TASK ? V - v0 : TASK);
        kern->level1(xq, xs, 1, kp, codes + v0 * rec, n, C, TASK);
        for (int i = 0; i < n; i++) {
            double a = (double)scale[v0 + i] * (4.0 * C[i] - 126.5 * sum);
            if (a > best) best = a, arg = v0 + i;
        }
    }
    return arg;
}
