/* A speculative round's greedy drafts, and the whole greedy round, in one call.
 *
 * Drafts (bitskip_draft_greedy): for each row (a sequence drafting m tokens from its last token
 * x0), m times: embed the token, run blocks 1..E (decode_block.c, writing the token's KV at those
 * layers), keep the layer-E hidden state, apply the final RMSNorm and the draft head, and take its
 * argmax (first index on ties, as torch.argmax) as the next draft.
 *
 * A round (bitskip_round_greedy): the drafts, then d_m runs blocks 1..E too, and blocks E+1..L run
 * over the m + 1 kept states (x0, d1, .., d_m in position order: each writes its KV before it
 * attends), then the final norm, the exact head and its argmax at every position: the full model's
 * own token after each of them, which the caller compares with the drafts. What the engine does
 * through the runner for a greedy round (a draft call, then a verify row in the step's forward),
 * without the trips through Python: on a small model they cost as much as the blocks.
 *
 * The draft head (Head.approx) may be an estimate (draft_head.c): a draft is kept only where the
 * verify's exact argmax equals it, so what the round emits is the full model's output whatever the
 * drafts are. The exact head is the float32 one, or the screened head (the same argmax). The hidden
 * states and KV left are the decode block's, the same bits the runner's native path computes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "head.h"
#include "head_codes.h"

/* decode_block.c */
int bitskip_decode_blocks(const void *blocks, int64_t nblocks, float *h, int64_t n,
                          const int64_t *positions, const int64_t *tables, int64_t width,
                          int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                          const float *rope_sin, int nthreads);
void bitskip_rms_norm(const float *x, const float *w, int64_t k, double eps, float *out);
/* draft_head.c */
int64_t bitskip_draft_head_argmax(const float *x, int64_t K, const uint8_t *codes, const float *scale,
                                  int64_t V, int16_t *xq, int8_t *xs);

/* Buffers of a call over at most `rows` hidden states at once. */
typedef struct {
    float *x, *logits;
    int16_t *xq;
    int8_t *xs;
} Scratch;

static int scratch_alloc(Scratch *s, int64_t rows, int64_t hidden, int64_t vocab) {
    int64_t kp = head_codes_padded(hidden);
    s->x = malloc(sizeof(float) * (size_t)(rows * hidden));
    s->logits = malloc(sizeof(float) * (size_t)(rows * vocab));
    s->xq = malloc(sizeof(int16_t) * (size_t)kp);
    s->xs = malloc((size_t)(2 * kp));
    return s->x && s->logits && s->xq && s->xs ? 0 : -1;
}

static void scratch_free(Scratch *s) { free(s->x), free(s->logits), free(s->xq), free(s->xs); }

/* out[r] = the head's argmax for hidden state h[r], r < rows: the estimate's (draft_head.c) with
 * head->approx, else (and for a row the estimate cannot take) the exact one (head_step.c: the
 * screened head's when there is a copy, the float32 head's otherwise; the same argmax). Returns 0,
 * or -1 without memory. */
static int head_argmax(const Head *head, const float *h, int64_t rows, int64_t hidden, Scratch *s,
                       int64_t *out, int nthreads) {
    if (!(head->approx && head->codes))
        return bitskip_head_greedy(head, h, rows, hidden, s->x, s->logits, out, nthreads) < 0 ? -1 : 0;
    for (int64_t r = 0; r < rows; r++) {
        bitskip_rms_norm(h + r * hidden, head->norm, hidden, head->eps, s->x);
        out[r] = bitskip_draft_head_argmax(s->x, hidden, head->codes, head->scale, head->vocab, s->xq, s->xs);
        if (out[r] < 0 && bitskip_head_greedy(head, h + r * hidden, 1, hidden, s->x, s->logits, out + r, nthreads) < 0)
            return -1;
    }
    return 0;
}

/* steps tokens of each of n rows through blocks 1..depth, one position after another: row r's
 * token tokens[r] at positions[r] (both advanced as it goes); the first `heads` steps' draft head
 * argmaxes are the row's next tokens, drafts[r * heads + i]. The layer-depth state of row r's
 * step i goes to states[(r * stride + i) * hidden]. h: n rows of scratch. */
static int chain(const void *blocks, int64_t depth, int64_t n, int64_t steps, int64_t heads, int64_t *tokens,
                 int64_t *positions, const int64_t *tables, int64_t width, int64_t block_size, float *cache_k,
                 float *cache_v, const float *rope_cos, const float *rope_sin, const float *embed, int64_t hidden,
                 const Head *head, int64_t *drafts, float *states, int64_t stride, float *h, Scratch *s,
                 int nthreads) {
    size_t row_bytes = sizeof(float) * (size_t)hidden;
    for (int64_t i = 0; i < steps; i++) {
        for (int64_t r = 0; r < n; r++) memcpy(h + r * hidden, embed + tokens[r] * hidden, row_bytes);
        if (bitskip_decode_blocks(blocks, depth, h, n, positions, tables, width, block_size, cache_k, cache_v,
                                  rope_cos, rope_sin, nthreads) != 0)
            return -1;
        for (int64_t r = 0; r < n; r++) {
            memcpy(states + (r * stride + i) * hidden, h + r * hidden, row_bytes);
            positions[r] += 1;
        }
        if (i >= heads) continue;
        if (head_argmax(head, h, n, hidden, s, tokens, nthreads) != 0) return -1;
        for (int64_t r = 0; r < n; r++) drafts[r * heads + i] = tokens[r];
    }
    return 0;
}

/* n rows, each drafting m tokens: row r's token tokens[r] (in: x0; out: its last draft) sits at
 * positions[r] (in: x0's; out: past the last draft), its cache blocks of layers 1..depth in
 * tables [depth, n, width]. Writes drafts [n, m] and the layer-E states [n, m, hidden] (the
 * state of the token each draft was predicted from: x0, d1, .., d_{m-1}). embed float32
 * [vocab, hidden]. Returns 0, or -1 without memory. */
int bitskip_draft_greedy(const void *blocks, int64_t depth, int64_t n, int64_t m, int64_t *tokens,
                         int64_t *positions, const int64_t *tables, int64_t width, int64_t block_size,
                         float *cache_k, float *cache_v, const float *rope_cos, const float *rope_sin,
                         const float *embed, int64_t hidden, const Head *head, int64_t *drafts, float *states,
                         int nthreads) {
    Scratch s;
    float *h = malloc(sizeof(float) * (size_t)(n * hidden));
    int rc = h && scratch_alloc(&s, n, hidden, head->vocab) == 0 ? 0 : -1;
    if (rc == 0)
        rc = chain(blocks, depth, n, m, m, tokens, positions, tables, width, block_size, cache_k, cache_v,
                   rope_cos, rope_sin, embed, hidden, head, drafts, states, m, h, &s, nthreads);
    free(h), scratch_free(&s);
    return rc;
}

/* A whole greedy round of n rows drafting m tokens each at exit `depth` and verified by blocks
 * depth+1..depth+nrest (`rest`: the first of them): tokens and positions as above (out: d_m and
 * the position past it), tables [depth + nrest, n, width]. Writes drafts [n, m] and targets
 * [n, m + 1]: the full model's argmax after x0, d1, .., d_m. Returns 0, or -1 without memory. */
int bitskip_round_greedy(const void *blocks, const void *rest, int64_t depth, int64_t nrest, int64_t n,
                         int64_t m, int64_t *tokens, int64_t *positions, const int64_t *tables, int64_t width,
                         int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                         const float *rope_sin, const float *embed, int64_t hidden, const Head *draft_head,
                         const Head *head, int64_t *drafts, int64_t *targets, int nthreads) {
    int64_t rows = n * (m + 1);
    Scratch s;
    float *h = malloc(sizeof(float) * (size_t)(n * hidden)), *states = malloc(sizeof(float) * (size_t)(rows * hidden));
    int64_t *vpos = malloc(sizeof(int64_t) * (size_t)rows);
    int64_t *vtab = malloc(sizeof(int64_t) * (size_t)(nrest * rows * width));
    int rc = h && states && vpos && vtab && scratch_alloc(&s, rows, hidden, head->vocab) == 0 ? 0 : -1;
    /* Position i of row r is verify row r (m + 1) + i, with row r's cache blocks at every layer. */
    for (int64_t r = 0; rc == 0 && r < n; r++)
        for (int64_t i = 0; i <= m; i++) {
            vpos[r * (m + 1) + i] = positions[r] + i;
            for (int64_t l = 0; l < nrest; l++)
                memcpy(vtab + (l * rows + r * (m + 1) + i) * width, tables + ((depth + l) * n + r) * width,
                       sizeof(int64_t) * (size_t)width);
        }
    if (rc == 0)
        rc = chain(blocks, depth, n, m + 1, m, tokens, positions, tables, width, block_size, cache_k, cache_v,
                   rope_cos, rope_sin, embed, hidden, draft_head, drafts, states, m + 1, h, &s, nthreads);
    if (rc == 0)
        rc = bitskip_decode_blocks(rest, nrest, states, rows, vpos, vtab, width, block_size, cache_k, cache_v,
                                   rope_cos, rope_sin, nthreads);
    if (rc == 0) rc = head_argmax(head, states, rows, hidden, &s, targets, nthreads);
    free(h), free(states), free(vpos), free(vtab), scratch_free(&s);
    return rc;
}
