/* The shared head as a decode step calls it, from the blocks' hidden states in one call: the final
 * RMSNorm (decode_block.c's, the blocks' own float operations), then the float32 head (head.c) or,
 * for greedy rows, the screened head (head_screen.c) and each row's argmax. Nothing of it passes
 * through torch: on a small model the torch norm and argmax cost more than the head's product.
 */
#include <math.h>
#include <stdint.h>
#include "head.h"
#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

void bitskip_rms_norm(const float *x, const float *w, int64_t k, double eps, float *out);  /* decode_block.c */

/* torch.argmax of a row: the first NaN if there is one, else the first index of the largest. */
static int64_t argmax_portable(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(x[i])) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}

#ifdef HAVE_X86
/* The same answer in two vector passes: the largest value (and whether any lane is NaN), then the
 * first index holding it. */
__attribute__((target("avx2"))) static int64_t argmax_avx2(const float *x, int64_t n) {
    int64_t body = n - n % 8, i;
    if (body == 0) return argmax_portable(x, n);
    __m256 top = _mm256_loadu_ps(x), nan = _mm256_cmp_ps(top, top, _CMP_UNORD_Q);
    for (i = 8; i < body; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        top = _mm256_max_ps(top, v);
    }
    if (!_mm256_testz_ps(nan, nan)) return argmax_portable(x, n);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float best = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    for (i = body; i < n; i++) {  /* the tail: a NaN or a larger value there decides alone */
        if (isnan(x[i])) return argmax_portable(x, n);
        best = x[i] > best ? x[i] : best;
    }
    __m256 b = _mm256_set1_ps(best);
    for (i = 0; i < body; i += 8) {
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), b, _CMP_EQ_OQ));
        if (mask) return i + __builtin_ctz(mask);
    }
    for (; x[i] != best; i++) {}
    return i;
}
#endif

static int64_t argmax(const float *x, int64_t n) {
#ifdef HAVE_X86
    if (bitskip_head_avx2()) return argmax_avx2(x, n);
#endif
    return argmax_portable(x, n);
}

static void norm_rows(const Head *head, const float *h, int64_t M, int64_t K, float *x) {
    for (int64_t m = 0; m < M; m++) bitskip_rms_norm(h + m * K, head->norm, K, head->eps, x + m * K);
}

int64_t bitskip_head_greedy(const Head *head, const float *h, int64_t M, int64_t K, float *x, float *out,
                            int64_t *tokens, int nthreads) {
    int64_t computed = M * head->vocab;
    norm_rows(head, h, M, K, x);
    if (head->codes == NULL)
        bitskip_head(x, M, K, head->weight, head->vocab, out, nthreads);
    else if ((computed = bitskip_head_screened(x, M, K, head->weight, head->codes, head->scale, head->bounds,
                                               head->norm_max, head->vocab, out, nthreads)) < 0)
        return -1;
    for (int64_t m = 0; m < M; m++) tokens[m] = argmax(out + m * head->vocab, head->vocab);
    return computed;
}

void bitskip_head_logits(const Head *head, const float *h, int64_t M, int64_t K, float *x, float *out,
                         int nthreads) {
    norm_rows(head, h, M, K, x);
    bitskip_head(x, M, K, head->weight, head->vocab, out, nthreads);
}
