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

/* The head, shared by every exit (head_step.c, draft_loop.c): the final RMSNorm's weight, the
 * float32 head, and the screened head's 8-bit copy. codes NULL: the float32 head, every logit
 * computed; codes set: the screened head's exact argmax, or with approx its level-1 estimate's
 * (draft_loop.c's drafts only). */
typedef struct {
    const float *norm;            /* the final RMSNorm's weight [hidden] */
    double eps;
    const float *weight;          /* float32 [vocab, hidden] */
    int64_t vocab;
    const uint8_t *codes;         /* the screened head's 8-bit copy (screened_head.py), or NULL */
    const float *scale;
    const double *bounds;
    double norm_max;
    int64_t approx;
} Head;

/* Each row's greedy token from hidden states h [M, K] (approx ignored): the final RMSNorm into x
 * [M, K], the head (screened when the copy is there) into out [M, vocab] (scratch), then each row's argmax (first
 * index on ties, a NaN first of all: torch.argmax's answer) into tokens [M]. Returns the number of
 * exact logits computed, or -1 without memory. */
int64_t bitskip_head_greedy(const Head *head, const float *h, int64_t M, int64_t K, float *x, float *out,
                        int64_t *tokens, int nthreads);

/* Every logit: the final RMSNorm into x [M, K], the float32 head into out [M, vocab]. */
void bitskip_head_logits(const Head *head, const float *h, int64_t M, int64_t K, float *x, float *out,
                         int nthreads);

#endif
