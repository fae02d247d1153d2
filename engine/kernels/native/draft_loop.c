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
 * own token after each of them; the round keeps the drafts that agree with it up to the first that
 * does not, then the full model's own token. What the engine does through the runner for a greedy
 * round (a draft call, then a verify row in the step's forward), without the trips through
 * Python: on a small model they cost as much as the blocks.
 *
 * A round may instead be pipelined on two threads, one sequence after another: one thread drafts
 * (blocks 1..E and the draft head, position after position) while the other, the worker
 * (worker.c), verifies (blocks E+1..L and the exact head over every state drafted so far). A
 * verify ends at the first draft the full model rejects, the drafter stopping before its next
 * block, and the next verify drafts from the full model's token, until the round's m + 1 positions
 * are emitted. On a CPU where one row's block is too small to share between threads, this is what
 * a second core can do for a stream: a kept token costs the longer of the two halves, not their
 * sum, and no draft past a rejected one is computed. The arithmetic of every block and head is the
 * same whichever thread runs it, so the tokens and KV are the full model's, as the sequential
 * round's are.
 *
 * The draft head (Head.approx) may be an estimate (draft_head.c): a draft is kept only where the
 * verify's exact argmax equals it, so what the round emits is the full model's output whatever the
 * drafts are. The exact head is the float32 one, or the screened head (the same argmax). The hidden
 * states and KV left are the decode block's, the same bits the runner's native path computes.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "head.h"
#include "head_codes.h"
#include "worker.h"

/* decode_block.c */
int bitskip_decode_blocks(const void *blocks, int64_t nblocks, float *h, int64_t n,
                          const int64_t *positions, const int64_t *tables, int64_t width,
                          int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                          const float *rope_sin, int nthreads);
int64_t bitskip_decode_blocks_until(const void *blocks, int64_t nblocks, float *h, int64_t n,
                                    const int64_t *positions, const int64_t *tables, int64_t width,
                                    int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                                    const float *rope_sin, int nthreads, const atomic_int *stop);
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
    Scratch s = {0};  /* freed whole even when an earlier buffer is missing */
    float *h = malloc(sizeof(float) * (size_t)(n * hidden));
    int rc = h && scratch_alloc(&s, n, hidden, head->vocab) == 0 ? 0 : -1;
    if (rc == 0)
        rc = chain(blocks, depth, n, m, m, tokens, positions, tables, width, block_size, cache_k, cache_v,
                   rope_cos, rope_sin, embed, hidden, head, drafts, states, m, h, &s, nthreads);
    free(h), scratch_free(&s);
    return rc;
}

/* One round: the model's blocks and heads, the sequence(s), and where the outputs go. */
typedef struct {
    const void *blocks, *rest;                   /* blocks 1..E and E+1..L */
    int64_t depth, nrest, n, m, hidden, width, block_size;
    const int64_t *tables;                       /* [depth + nrest, n, width] */
    float *cache_k, *cache_v;
    const float *rope_cos, *rope_sin, *embed;
    const Head *draft_head, *head;
    int64_t *tokens, *emitted, *drafted, *accepted, *verifies, *ran;  /* see bitskip_round_greedy */
} Round;

/* Row r's cache blocks of layers first+1..first+layers into rows at..at+count-1 of dst
 * [layers, rows, width]. */
static void row_tables(const Round *R, int64_t r, int64_t first, int64_t layers, int64_t *dst, int64_t rows,
                       int64_t at, int64_t count) {
    for (int64_t l = 0; l < layers; l++)
        for (int64_t i = at; i < at + count; i++)
            memcpy(dst + (l * rows + i) * R->width, R->tables + ((first + l) * R->n + r) * R->width,
                   sizeof(int64_t) * (size_t)R->width);
}

/* Row r's verify of `m` drafts against `targets` (the full model's tokens after x0 and each
 * draft; `known` of them, up to the first that differs): its tokens (the drafts the full model
 * agrees with, then its own next token) appended to the row's output. Returns the drafts kept. */
static int64_t accept(const Round *R, int64_t r, const int64_t *drafts, const int64_t *targets, int64_t m,
                      int64_t known) {
    int64_t a = 0, *out = R->tokens + r * (R->m + 1) + R->emitted[r];
    while (a < known - 1 && drafts[a] == targets[a]) a++;  /* a pipelined verify stops at a mismatch */
    memcpy(out, drafts, sizeof(int64_t) * (size_t)a);
    out[a] = targets[a];
    int64_t v = R->verifies[r]++;
    R->drafted[r * (R->m + 1) + v] = known <= m ? known : m;  /* a pipelined verify reads up to the rejection */
    R->accepted[r * (R->m + 1) + v] = a;
    R->emitted[r] += a + 1;
    return a;
}

/* Rows of a pipelined verify's exact head per call. */
#define VERIFY_HEAD_ROWS 4

/* Blocks E+1..L and the exact head over `rows` consecutive positions of row r, the first of
 * them at `position`: states [rows, hidden] (in place) -> targets [rows]. */
static int verify(const Round *R, int64_t r, int64_t rows, int64_t position, float *states, Scratch *s,
                  int64_t *vpos, int64_t *vtab, int64_t *targets) {
    for (int64_t i = 0; i < rows; i++) vpos[i] = position + i;
    row_tables(R, r, R->depth, R->nrest, vtab, rows, 0, rows);
    if (bitskip_decode_blocks_until(R->rest, R->nrest, states, rows, vpos, vtab, R->width, R->block_size,
                                    R->cache_k, R->cache_v, R->rope_cos, R->rope_sin, 1, NULL) < 0)
        return -1;
    for (int64_t l = R->depth; l < R->depth + R->nrest; l++) R->ran[l] += rows;
    /* The head a few rows at a time: its logits buffer stays small (a round's m + 1 rows of a 4096
     * vocabulary were a fresh 0.3 MB and its page faults every round). */
    for (int64_t i = 0; i < rows; i += VERIFY_HEAD_ROWS) {
        int64_t some = rows - i < VERIFY_HEAD_ROWS ? rows - i : VERIFY_HEAD_ROWS;
        if (head_argmax(R->head, states + i * R->hidden, some, R->hidden, s, targets + i, 1) != 0) return -1;
    }
    return 0;
}

/* The sequential round (any n): every draft, then one verify over all n (m + 1) positions. */
static int round_sequential(const Round *R, int64_t *tokens, int64_t *positions, int nthreads) {
    int64_t n = R->n, m = R->m, rows = n * (m + 1), hidden = R->hidden;
    Scratch s = {0};  /* freed whole even when an earlier buffer is missing */
    float *h = malloc(sizeof(float) * (size_t)(n * hidden)), *states = malloc(sizeof(float) * (size_t)(rows * hidden));
    int64_t *vpos = malloc(sizeof(int64_t) * (size_t)rows);
    int64_t *vtab = malloc(sizeof(int64_t) * (size_t)(R->nrest * rows * R->width));
    int64_t *drafts = malloc(sizeof(int64_t) * (size_t)(n * m + 1)), *targets = malloc(sizeof(int64_t) * (size_t)rows);
    int rc = h && states && vpos && vtab && drafts && targets && scratch_alloc(&s, rows, hidden, R->head->vocab) == 0
             ? 0 : -1;
    /* Position i of row r is verify row r (m + 1) + i, with row r's cache blocks at every layer. */
    for (int64_t r = 0; rc == 0 && r < n; r++) {
        for (int64_t i = 0; i <= m; i++) vpos[r * (m + 1) + i] = positions[r] + i;
        row_tables(R, r, R->depth, R->nrest, vtab, rows, r * (m + 1), m + 1);
    }
    if (rc == 0)
        rc = chain(R->blocks, R->depth, n, m + 1, m, tokens, positions, R->tables, R->width, R->block_size,
                   R->cache_k, R->cache_v, R->rope_cos, R->rope_sin, R->embed, hidden, R->draft_head, drafts,
                   states, m + 1, h, &s, nthreads);
    if (rc == 0)
        rc = bitskip_decode_blocks(R->rest, R->nrest, states, rows, vpos, vtab, R->width, R->block_size,
                                   R->cache_k, R->cache_v, R->rope_cos, R->rope_sin, nthreads);
    if (rc == 0) rc = head_argmax(R->head, states, rows, hidden, &s, targets, nthreads);
    for (int64_t l = 0; rc == 0 && l < R->depth + R->nrest; l++) R->ran[l] += rows;
    for (int64_t r = 0; rc == 0 && r < n; r++) accept(R, r, drafts + r * m, targets + r * (m + 1), m, m + 1);
    free(h), free(states), free(vpos), free(vtab), free(drafts), free(targets), scratch_free(&s);
    return rc;
}

/* A pipelined verify of row r: its buffers, and what the drafter has handed the verifier so far. */
typedef struct {
    const Round *R;
    int64_t r, x0, position, m;  /* the row, its token x0, x0's position, the drafts at most */
    int64_t *tables;             /* the row's cache blocks of layers 1..E [depth, 1, width] */
    float *h, *states;           /* the drafter's row; the layer-E states of x0, d1, .. [m + 1, hidden] */
    int64_t *vpos, *vtab;        /* the verify's positions and tables */
    int64_t *drafts, *targets;   /* d1, d2, ..; the full model's token after x0, d1, .. */
    int64_t known;               /* targets known: m + 1, or up to the first that rejects its draft */
    Scratch draft, verify;       /* each side's head buffers */
    atomic_llong ready;          /* positions whose layer-E state is in `states` */
    atomic_llong made;           /* drafts made */
    atomic_int stop;             /* the verify is over (a draft rejected, or every position verified) */
    atomic_int failed;           /* a side had no memory */
} Pipe;

/* Wait until *counter > after, or the round has failed (worker_relax: a drafted position takes a
 * few hundred microseconds). */
static void pipe_wait(const atomic_llong *counter, int64_t after, const atomic_int *failed) {
    for (int spins = 0; atomic_load_explicit(counter, memory_order_acquire) <= after; spins++) {
        if (atomic_load_explicit(failed, memory_order_relaxed)) return;
        worker_relax(spins);
    }
}

/* x0, d1, .., d_m through blocks 1..E, each state handed to the verifier as soon as it is
 * computed, then the draft head's next token; stops before a block once the verify is over. */
static void drafter(Pipe *p) {
    const Round *R = p->R;
    int64_t token = p->x0, position = p->position;
    for (int64_t i = 0; i <= p->m; i++, position++) {
        memcpy(p->h, R->embed + token * R->hidden, sizeof(float) * (size_t)R->hidden);
        int64_t done = bitskip_decode_blocks_until(R->blocks, R->depth, p->h, 1, &position, p->tables, R->width,
                                                   R->block_size, R->cache_k, R->cache_v, R->rope_cos,
                                                   R->rope_sin, 1, &p->stop);
        if (done < 0) break;
        for (int64_t l = 0; l < done; l++) R->ran[l] += 1;
        if (done < R->depth) return;  /* stopped */
        memcpy(p->states + i * R->hidden, p->h, sizeof(float) * (size_t)R->hidden);
        atomic_store_explicit(&p->ready, i + 1, memory_order_release);
        if (i == p->m) return;
        if (head_argmax(R->draft_head, p->h, 1, R->hidden, &p->draft, &token, 1) != 0) break;
        p->drafts[i] = token;
        atomic_store_explicit(&p->made, i + 1, memory_order_release);
    }
    atomic_store(&p->failed, 1);
}

/* Verifies whatever the drafter has handed over, in order, until a draft differs from the full
 * model's token or all m + 1 positions are verified; then stops the drafter. */
static void verifier(void *arg) {
    Pipe *p = arg;
    const Round *R = p->R;
    int64_t v = 0, m = p->m;
    while (v <= m) {
        pipe_wait(&p->ready, v, &p->failed);
        if (atomic_load(&p->failed)) break;
        int64_t ready = atomic_load_explicit(&p->ready, memory_order_acquire);
        if (verify(R, p->r, ready - v, p->position + v, p->states + v * R->hidden, &p->verify, p->vpos, p->vtab,
                   p->targets + v) != 0) {
            atomic_store(&p->failed, 1);
            break;
        }
        for (; v < ready; v++) {
            if (v == m) goto over;
            pipe_wait(&p->made, v, &p->failed);
            if (atomic_load(&p->failed)) goto over;
            if (p->drafts[v] != p->targets[v]) {
                p->known = v + 1;
                goto over;
            }
        }
    }
over:
    atomic_store(&p->stop, 1);
}

/* Row r's round, pipelined: verifies one after another, each drafting from the last token it
 * emitted as far as the round's m + 1 positions reach, until they are all used. In each, the
 * drafter runs on this thread and the verifier on the worker (worker.c), or one after the other
 * when the worker is busy. Returns 0, or -1 without memory. */
static int round_pipelined(const Round *R, int64_t r, int64_t token, int64_t position) {
    int64_t m = R->m, hidden = R->hidden, width = R->width, last = position + m;
    Pipe p = {.R = R, .r = r};
    p.tables = malloc(sizeof(int64_t) * (size_t)(R->depth * width));
    p.h = malloc(sizeof(float) * (size_t)hidden);
    p.states = malloc(sizeof(float) * (size_t)((m + 1) * hidden));
    p.vpos = malloc(sizeof(int64_t) * (size_t)(m + 1));
    p.vtab = malloc(sizeof(int64_t) * (size_t)(R->nrest * (m + 1) * width));
    p.drafts = malloc(sizeof(int64_t) * (size_t)(m + 1));
    p.targets = malloc(sizeof(int64_t) * (size_t)(m + 1));
    int ok = p.tables && p.h && p.states && p.vpos && p.vtab && p.drafts && p.targets;
    ok = scratch_alloc(&p.draft, 1, hidden, R->head->vocab) == 0 && ok;
    ok = scratch_alloc(&p.verify, VERIFY_HEAD_ROWS, hidden, R->head->vocab) == 0 && ok;
    atomic_init(&p.failed, !ok);
    if (ok) row_tables(R, r, 0, R->depth, p.tables, 1, 0, 1);
    /* Each verify writes positions position..position + p.m; the next starts at its last token. */
    while (ok && position <= last) {
        p.x0 = token, p.position = position, p.m = last - position, p.known = p.m + 1;
        atomic_init(&p.ready, 0), atomic_init(&p.made, 0), atomic_init(&p.stop, 0);
        int64_t ticket = worker_start(verifier, &p);
        drafter(&p);
        if (ticket < 0)  /* no second thread after all: verify what was drafted */
            verifier(&p);
        else
            worker_wait(ticket);
        if (atomic_load(&p.failed)) break;
        int64_t kept = accept(R, r, p.drafts, p.targets, p.m, p.known);
        token = p.targets[kept];
        position += kept + 1;
    }
    free(p.tables), free(p.h), free(p.states), free(p.vpos), free(p.vtab), free(p.drafts), free(p.targets);
    scratch_free(&p.draft), scratch_free(&p.verify);
    return atomic_load(&p.failed) ? -1 : 0;
}

/* A whole greedy round of n rows, each with room for m drafts (positions x0..x0 + m), at exit
 * `depth`, verified by blocks depth+1..depth+nrest (`rest`: the first of them): tokens [n] x0 and
 * positions [n] x0's, tables [depth + nrest, n, width]. Writes each row's tokens [n, m + 1] (the
 * full model's greedy tokens after x0: emitted[r] of them) and, per verify v < verifies[r], the
 * drafts it read and kept, drafted and accepted [n, m + 1]; adds each block's token-blocks run to
 * ran [depth + nrest]. Without `pipeline` the rows draft m tokens each, then one verify on
 * `nthreads` reads them all; with it, each row in turn is pipelined on two threads and its verifies
 * follow one another (each ends at its first rejected draft) until the round's positions are
 * used. Returns 0, or -1 without memory. */
int bitskip_round_greedy(const void *blocks, const void *rest, int64_t depth, int64_t nrest, int64_t n,
                         int64_t m, int64_t *tokens, int64_t *positions, const int64_t *tables, int64_t width,
                         int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                         const float *rope_sin, const float *embed, int64_t hidden, const Head *draft_head,
                         const Head *head, int64_t *out, int64_t *emitted, int64_t *drafted, int64_t *accepted,
                         int64_t *verifies, int64_t *ran, int pipeline, int nthreads) {
    Round R = {blocks, rest, depth, nrest, n, m, hidden, width, block_size, tables, cache_k, cache_v,
               rope_cos, rope_sin, embed, draft_head, head, out, emitted, drafted, accepted, verifies, ran};
    for (int64_t r = 0; r < n; r++) emitted[r] = verifies[r] = 0;
    if (!pipeline) return round_sequential(&R, tokens, positions, nthreads);
    for (int64_t r = 0; r < n; r++)
        if (round_pipelined(&R, r, tokens[r], positions[r]) != 0) return -1;
    return 0;
}
