/* The float32 head's dot products (head.c), shared with the screened head (head_screen.c), and
 * the screened head's entry point. */
#ifndef BITSKIP_HEAD_H
#define BITSKIP_HEAD_H
#include <stdint.h>

/* out[i] = the fixed-order float32 dot of x [K] with head row w[i] [K], for i < n. */
typedef void (*head_rows_fn)(const float *x, int64_t K, const float *const *w, int n, float *out);

head_rows_fn bitskip_head_rows_kernel(void);
/* Whether that kernel is the AVX2 one (else portable C: no AVX2 or bitskip_head_force_portable). */
int bitskip_head_avx2(void);
/* The threads a product of M x V x K multiply-adds gets (small ones stay on one). */
int bitskip_head_threads(int64_t M, int64_t K, int64_t V, int nthreads);

/* out [M, V] = x [M, K] @ w [V, K].T, every logit by the kernel above (head.c), threads over w's rows. */
void bitskip_head(const float *x, int64_t M, int64_t K, const float *w, int64_t V, float *out, int nthreads);

/* The screened head (head_screen.c; its copy: head_codes.h, built by screened_head.py): out [M, V]
 * gets the exact logits of the rows that could be the argmax, -inf elsewhere. Returns the number
 * of exact logits computed, or -1 without memory. */
int64_t bitskip_head_screened(const float *x, int64_t M, int64_t K, const float *w, const uint8_t *codes,
                              const float *scale, const double *bounds, double norm_max, int64_t V,
                              float *out, int nthreads);

#endif
