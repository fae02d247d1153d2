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

#endif
