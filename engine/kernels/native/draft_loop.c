/* A speculative round's greedy drafts in one call: for each row (a sequence drafting m tokens
 * from its last token x0), m times: embed the token, run blocks 1..E (decode_block.c, writing the
 * token's KV at those layers), keep the layer-E hidden state, apply the final RMSNorm and the head
 * (the screened head's argmax when its 8-bit copy is given, else the float32 head's), and take the
 * argmax (first index on ties, as torch.argmax) as the next draft.
 *
 * The same steps the engine takes through the runner for a greedy draft, without a trip through
 * Python per draft: on a small model that trip costs as much as the blocks. A draft's tokens never
 * reach the output unverified, so nothing here decides what the model emits; the hidden states
 * and KV it leaves are the decode block's, the same bits the runner's native path computes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "head.h"

/* decode_block.c */
int bitskip_decode_blocks(const void *blocks, int64_t nblocks, float *h, int64_t n,
                          const int64_t *positions, const int64_t *tables, int64_t width,
                          int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                          const float *rope_sin, int nthreads);
void bitskip_rms_norm(const float *x, const float *w, int64_t k, double eps, float *out);

/* The head, shared by every exit. codes NULL: the float32 head, every logit computed. */
typedef struct {
    const float *norm;            /* the final RMSNorm's weight [hidden] */
    double eps;
    const float *weight;          /* float32 [vocab, hidden] */
    int64_t vocab;
    const uint8_t *codes;         /* the screened head's 8-bit copy (screened_head.py), or NULL */
    const float *scale;
    const double *bounds;
    double norm_max;
} Head;

static int64_t argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* n rows, each drafting m tokens: row r's token tokens[r] (in: x0; out: its last draft) sits at
 * positions[r] (in: x0's; out: past the last draft), its cache blocks of layers 1..nblocks in
 * tables [nblocks, n, width]. Writes drafts [n, m] and the layer-E states [n, m, hidden] (the
 * state of the token each draft was predicted from: x0, d1, .., d_{m-1}). embed float32
 * [vocab, hidden]. Returns 0, or -1 without memory. */
int bitskip_draft_greedy(const void *blocks, int64_t nblocks, int64_t n, int64_t m,
                         int64_t *tokens, int64_t *positions, const int64_t *tables, int64_t width,
                         int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                         const float *rope_sin, const float *embed, int64_t hidden, const Head *head,
                         int64_t *drafts, float *states, int nthreads) {
    size_t row_bytes = sizeof(float) * (size_t)hidden;
    float *h = malloc(row_bytes * (size_t)n), *x = malloc(row_bytes * (size_t)n);
    float *logits = malloc(sizeof(float) * (size_t)(n * head->vocab));
    int rc = h && x && logits ? 0 : -1;
    for (int64_t i = 0; rc == 0 && i < m; i++) {
        for (int64_t r = 0; r < n; r++) memcpy(h + r * hidden, embed + tokens[r] * hidden, row_bytes);
        rc = bitskip_decode_blocks(blocks, nblocks, h, n, positions, tables, width, block_size,
                                   cache_k, cache_v, rope_cos, rope_sin, nthreads);
        if (rc != 0) break;
        for (int64_t r = 0; r < n; r++) {
            memcpy(states + (r * m + i) * hidden, h + r * hidden, row_bytes);
            bitskip_rms_norm(h + r * hidden, head->norm, hidden, head->eps, x + r * hidden);
        }
        if (head->codes == NULL)
            bitskip_head(x, n, hidden, head->weight, head->vocab, logits, nthreads);
        else if (bitskip_head_screened(x, n, hidden, head->weight, head->codes, head->scale,
                                       head->bounds, head->norm_max, head->vocab, logits, nthreads) < 0)
            rc = -1;
        for (int64_t r = 0; rc == 0 && r < n; r++) {
            tokens[r] = drafts[r * m + i] = argmax(logits + r * head->vocab, head->vocab);
            positions[r] += 1;
        }
    }
    free(h), free(x), free(logits);
    return rc;
}
