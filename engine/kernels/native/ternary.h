/* The native kernels' shared entry points (see ternary.c and decode_block.c). */
#ifndef BITSKIP_TERNARY_H
#define BITSKIP_TERNARY_H
#include <stddef.h>
#include <stdint.h>

int bitskip_ternary_gemm(const int8_t *a, int64_t M, int64_t K, int64_t lda,
                         const uint8_t *const *parts, const int64_t *part_rows, int nparts,
                         int32_t *out, int64_t ldo, int nthreads);

/* Bytes of scratch one product of M rows of width K needs (bitskip_ternary_gemm_ws). */
size_t bitskip_ternary_workspace(int64_t M, int64_t K);
void bitskip_ternary_gemm_ws(const int8_t *a, int64_t M, int64_t K, int64_t lda,
                             const uint8_t *const *parts, const int64_t *part_rows, int nparts,
                             int32_t *out, int64_t ldo, int nthreads, void *ws);

/* The pieces, for callers that schedule the work themselves (decode_block.c): activations in
 * plane order (bitskip_plane_index: where in-feature k goes; rows of bitskip_ternary_stride(K)
 * bytes, zero-padded) with each row's sum, and any range of output rows of the product. */
static inline int64_t bitskip_plane_index(int64_t k) {
    int64_t r = k & 127;
    return (k - r) + 32 * (r & 3) + (r >> 2);
}
static inline int64_t bitskip_ternary_stride(int64_t K) { return (K + 127) / 128 * 128; }

/* a [K] into dst [bitskip_ternary_stride(K)] in plane order, the padding zeros. */
void bitskip_plane_order(const int8_t *a, int64_t K, int8_t *dst);

typedef struct {
    const uint8_t *const *parts;  /* each part's packed rows, [part_rows[p], K / 4] */
    const int64_t *part_rows;
    int nparts;
    int64_t K;
} TernaryWeights;

typedef struct {
    const int8_t *a;              /* [M, stride] in plane order */
    const int32_t *sum;           /* [M] */
    int64_t M, stride;
} TernaryActs;

/* out[m * ldo + n] for every row m and n in [n0, n1). */
void bitskip_ternary_rows(const TernaryActs *x, const TernaryWeights *w, int64_t n0, int64_t n1,
                          int32_t *out, int64_t ldo);

#endif
