/* One decoder block for rows that each bring one cached token (the steady state of decoding), in
 * one call: RMSNorm, activation quantizer (and Walsh-Hadamard rotation), packed ternary
 * projections, RoPE, the KV write into the paged cache, grouped-query attention over it, residuals,
 * the gated MLP.
 *
 * The float operations are models/functional.py's and models/quant.py's, in the same order and
 * precision (built with -ffp-contract=off, so no FMA merges two roundings): float32 elementwise
 * steps give the same bits as torch; float64 reductions (the RMSNorm mean, attention, the gated
 * activation) sum in their own order, so their float32 results agree with torch's except when a
 * value sits within a float64 rounding of a float32 boundary. The integer projections are exact.
 * Every row is computed on its own: a row's numbers do not depend on the batch.
 *
 * Threads (team.h) share each phase of a block: rows for the norms and quantizers, ranges of
 * output features for the products (scaled, and added to the residual, as each range is done),
 * (row, KV head) pairs for attention (attention.c), ranges of features for the gated activation.
 * Each item is computed by one thread in one order, so the numbers do not depend on the thread
 * count either.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention.h"
#include "gate.h"
#include "simd.h"
#include "team.h"
#include "ternary.h"
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const uint8_t *const *parts;  /* packed rows of the fused parts (DESIGN section 3 layout) */
    const int64_t *part_rows;
    int64_t nparts;
    int64_t in_features;          /* the weight's width (Hadamard: the padded power of two) */
    int64_t out_features;
    const float *gamma;           /* per output feature */
    int64_t qmax;                 /* activation codes in -qmax..qmax */
    int64_t hadamard;             /* rotate the activations first */
} Proj;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter;
    int64_t relu2;                /* the gate's activation: 1 ReLU squared, 0 SiLU */
    double eps;                   /* rms_norm_eps */
    const float *input_norm, *post_norm, *attn_sub_norm, *ffn_sub_norm;  /* sub-norms may be NULL */
    Proj qkv, o, gate_up, down;
} Block;

/* The elementwise float loops below (norms, quantizer, scaling) are built for AVX2 too (WIDE). */
/* Rows normed together at most: each row's sum of squares is one chain of dependent float64 adds
 * (an add's latency an element); several rows' chains side by side overlap. */
#define NORM_ROWS 4

/* rms_norm of `rows` (<= NORM_ROWS) rows of x [rows, k]: x / sqrt(mean(x^2) + eps) * w, the mean
 * in float64 (each row's in its own order) and the sqrt of a float32 taken in float64. */
WIDE static void rms_norm_rows(const float *x, const float *w, int64_t k, double eps, float *out, int64_t rows) {
    double sq[NORM_ROWS] = {0};
    for (int64_t i = 0; i < k; i++)
        for (int64_t r = 0; r < rows; r++) sq[r] += (double)x[r * k + i] * (double)x[r * k + i];
    for (int64_t r = 0; r < rows; r++) {
        float mean_sq = (float)(sq[r] / (double)k);
        float denom = (float)sqrt((double)(mean_sq + (float)eps));
        for (int64_t i = 0; i < k; i++) out[r * k + i] = x[r * k + i] / denom * w[i];
    }
}

static void rms_norm(const float *x, const float *w, int64_t k, double eps, float *out) {
    rms_norm_rows(x, w, k, eps, out, 1);
}

/* The same, for the final norm before the head (draft_loop.c). */
void bitskip_rms_norm(const float *x, const float *w, int64_t k, double eps, float *out) {
    rms_norm(x, w, k, eps, out);
}

/* hadamard_transform: zero-pad to n, butterflies of a + b, a - b, then times float(1/sqrt(n)). */
WIDE static void hadamard(const float *x, int64_t k, int64_t n, float *out) {
    memcpy(out, x, sizeof(float) * (size_t)k);
    memset(out + k, 0, sizeof(float) * (size_t)(n - k));
    for (int64_t h = 1; h < n; h *= 2)
        for (int64_t blk = 0; blk < n; blk += 2 * h)
            for (int64_t i = blk; i < blk + h; i++) {
                float a = out[i], b = out[i + h];
                out[i] = a + b;
                out[i + h] = a - b;
            }
    float c = (float)(1.0 / sqrt((double)n));
    for (int64_t i = 0; i < n; i++) out[i] = out[i] * c;
}

/* max(|x_i|) (0 for k = 0, NaNs skipped) in eight independent chains: one chain waits a compare's
 * latency per element; the maximum is the same in any order. */
static float abs_max(const float *x, int64_t k) {
    enum { W = 8 };
    float m[W] = {0};
    int64_t i = 0;
    for (; i + W <= k; i += W)
        for (int j = 0; j < W; j++) m[j] = fabsf(x[i + j]) > m[j] ? fabsf(x[i + j]) : m[j];
    for (; i < k; i++) m[0] = fabsf(x[i]) > m[0] ? fabsf(x[i]) : m[0];
    float s = 0.0f;
    for (int j = 0; j < W; j++) s = m[j] > s ? m[j] : s;
    return s;
}

/* quantize_activations: s = max(max|x|, 1e-5); q = clamp(round(x * ((1 / s) * Q)), -Q, Q), torch's
 * evaluation of x * (Q / s) (a reciprocal, then a product), rounding half to even (adding and
 * subtracting 1.5 * 2^23 rounds a float32 below 2^22 to the nearest integer, ties to even, as
 * nearbyintf does, and vectorizes). The codes go out in the kernel's plane order (`dst`, zeroed
 * padding) with their sum; `tmp` holds k codes in order. */
WIDE static float quantize(const float *x, int64_t k, int64_t qmax, int8_t *tmp, int8_t *dst, int32_t *sum) {
    float s = abs_max(x, k), magic = 12582912.0f, top = (float)qmax;
    if (!(s >= 1e-5f)) s = 1e-5f;
    float scale = (1.0f / s) * top;
    for (int64_t i = 0; i < k; i++) {
        float r = (x[i] * scale + magic) - magic;
        tmp[i] = (int8_t)(r > top ? top : r < -top ? -top : r);
    }
    int32_t total = 0;
    for (int64_t i = 0; i < k; i++) total += tmp[i];
    bitskip_plane_order(tmp, k, dst);
    *sum = total;
    return s;
}

/* Optional timers (bench/profile_decode.py): seconds in the ternary products, in attention
 * (RoPE, the KV write, attending), and in whole blocks, as the first thread of the team sees
 * them (waits for the others included); off unless asked for. */
static int profiling = 0;
static double spent[3];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Copy the timers into out[3] (when given), zero them, and turn them on or off. */
void bitskip_decode_profile(int on, double *out) {
    if (out) memcpy(out, spent, sizeof(spent));
    memset(spent, 0, sizeof(spent));
    profiling = on;
}

/* Rows attended together (attention.c): consecutive tokens of one sequence, at most this many. */
#define RUN 8

/* Buffers for one call, sized for its widest block and allocated once for all its blocks;
 * rot, tmp, scores and qd are per thread. */
typedef struct {
    float *x, *y, *attn, *scales, *rot;
    int8_t *codes, *tmp;
    int32_t *acc, *sums;
    int64_t *slots, *runs, codes_stride, kin, max_len, group, head_dim, threads;
    double *scores, *qd;
} Scratch;

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static int scratch_alloc(Scratch *s, const Block *blocks, int64_t nblocks, int64_t n, int64_t max_len,
                         int threads) {
    int64_t wide = 0, kin = 0, inner = 0, hidden = 0, group = 1, d = 1;
    for (int64_t l = 0; l < nblocks; l++) {
        const Block *b = &blocks[l];
        const Proj *ps[4] = {&b->qkv, &b->o, &b->gate_up, &b->down};
        for (int i = 0; i < 4; i++) {
            wide = max64(wide, ps[i]->out_features);
            kin = max64(kin, ps[i]->in_features);
        }
        inner = max64(inner, max64(b->heads * b->head_dim, b->inter));
        hidden = max64(hidden, b->hidden);
        group = max64(group, b->heads / b->kv_heads);
        d = max64(d, b->head_dim);
    }
    *s = (Scratch){0};
    s->codes_stride = bitskip_ternary_stride(kin);
    s->kin = kin, s->max_len = max_len, s->group = group, s->head_dim = d, s->threads = threads;
    s->x = malloc(sizeof(float) * (size_t)(n * hidden));
    s->y = malloc(sizeof(float) * (size_t)(n * wide));
    s->attn = malloc(sizeof(float) * (size_t)(n * inner));
    s->scales = malloc(sizeof(float) * (size_t)n);
    s->rot = malloc(sizeof(float) * (size_t)(threads * kin));
    s->codes = malloc((size_t)(n * s->codes_stride));
    s->tmp = malloc((size_t)(threads * kin));
    s->acc = malloc(sizeof(int32_t) * (size_t)(n * wide));
    s->sums = malloc(sizeof(int32_t) * (size_t)n);
    s->slots = malloc(sizeof(int64_t) * (size_t)(n * max_len));
    s->runs = malloc(sizeof(int64_t) * (size_t)(threads * (n + 1)));
    s->scores = malloc(sizeof(double) * (size_t)(threads * RUN * group * max_len));
    s->qd = malloc(sizeof(double) * (size_t)(threads * RUN * group * d));
    return s->x && s->y && s->attn && s->scales && s->rot && s->codes && s->tmp && s->acc && s->sums
           && s->slots && s->runs && s->scores && s->qd ? 0 : -1;
}

static void scratch_free(Scratch *s) {
    void *all[] = {s->x, s->y, s->attn, s->scales, s->rot, s->codes, s->tmp, s->acc, s->sums,
                   s->slots, s->runs, s->scores, s->qd};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) free(all[i]);
}

/* Row r of x [.., k] (already normed) quantized for p: codes, their sum and the row's scale. */
static void prepare(const Proj *p, const float *x, int64_t k, int64_t r, Scratch *s, const Member *m) {
    const float *xr = x + r * k;
    if (p->hadamard) {
        float *rot = s->rot + m->id * s->kin;
        hadamard(xr, k, p->in_features, rot);
        xr = rot;
    }
    s->scales[r] = quantize(xr, p->in_features, p->qmax, s->tmp + m->id * s->kin,
                            s->codes + r * bitskip_ternary_stride(p->in_features), &s->sums[r]);
}

/* The rows of x [n, k], through `norm` (when given) into `normed`, quantized for p; up to
 * NORM_ROWS rows an item, a few items a thread. */
static void normed_codes(const Proj *p, const float *x, const float *norm, int64_t k, double eps,
                         float *normed, int64_t n, Scratch *s, Member *m) {
    int64_t per = n / s->threads < 1 ? 1 : n / s->threads < NORM_ROWS ? n / s->threads : NORM_ROWS;
    team_phase(m, (n + per - 1) / per);
    for (int64_t c = team_claim(m); c >= 0; team_done(m), c = team_claim(m)) {
        int64_t r0 = c * per, r1 = r0 + per < n ? r0 + per : n;
        if (norm) rms_norm_rows(x + r0 * k, norm, k, eps, normed + r0 * k, r1 - r0);
        for (int64_t r = r0; r < r1; r++) prepare(p, norm ? normed : x, k, r, s, m);
    }
    team_wait(m);
}

/* Bytes of a product's packed weights a waiting thread prefetches ahead (team_ahead): about the
 * first two ranges of a paper-1b product, well inside a core's L2. */
#define AHEAD (256 << 10)
int team_prefetch = 1;

/* Turn team_ahead's prefetching on or off (bench/profile_decode.py compares the two). */
void bitskip_decode_prefetch(int on) { team_prefetch = on; }

static int64_t weight_bytes(const Proj *p) { return p->out_features * p->in_features / 4; }

/* y[j] = acc[j] * f * gamma[j], or y[j] + that, for j < count. */
WIDE static void scaled(const int32_t *restrict acc, float f, const float *restrict gamma, int64_t count,
                        int residual, float *restrict y) {
    if (residual)
        for (int64_t j = 0; j < count; j++) y[j] = y[j] + (float)acc[j] * f * gamma[j];
    else
        for (int64_t j = 0; j < count; j++) y[j] = (float)acc[j] * f * gamma[j];
}

/* The prepared rows times p's weights, ranges of output features handed out to the team, each
 * range scaled as it is done: y[r, j] = acc * (s / Q) * gamma[j], or with `residual` added to it:
 * y[r, j] = y[r, j] + acc * (s / Q) * gamma[j]. */
static void product(const Proj *p, int64_t n, float *y, int64_t ldy, int residual, const Proj *next,
                    Scratch *s, Member *m) {
    /* About eight ranges a thread: few claims, and a late thread's share is taken by the others. */
    int64_t N = p->out_features, per = 8 * s->threads;
    int64_t chunk = ((N + per - 1) / per + 15) / 16 * 16, items = (N + chunk - 1) / chunk;
    TernaryWeights w = {p->parts, p->part_rows, (int)p->nparts, p->in_features};
    TernaryActs x = {s->codes, s->sums, n, bitskip_ternary_stride(p->in_features)};
    double t0 = profiling && m->id == 0 ? now() : 0.0;
    /* While waiting for this product's last range and through the phases up to the next product,
     * ask for the start of the next product's weights (its first ranges; the parts sit one after
     * another in huge pages, hugepages.py; a prefetch past a part never faults). */
    if (next)
        team_ahead(m, next->parts[0], AHEAD < weight_bytes(next) ? AHEAD : weight_bytes(next));
    team_phase(m, items);
    for (int64_t c = team_claim(m); c >= 0; team_done(m), c = team_claim(m)) {
        int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        bitskip_ternary_rows(&x, &w, n0, n1, s->acc, N);
        for (int64_t r = 0; r < n; r++)
            scaled(s->acc + r * N + n0, s->scales[r] / (float)p->qmax, p->gamma + n0, n1 - n0, residual,
                   y + r * ldy + n0);
    }
    team_wait(m);
    if (profiling && m->id == 0) spent[0] += now() - t0;
}

/* The rows in runs: consecutive rows at consecutive positions with the same cache blocks (one
 * sequence's tokens, a speculative verify), at most RUN a run; start[k] is run k's first row,
 * start[count] = n. Returns the count. */
static int64_t runs(int64_t n, const int64_t *positions, const int64_t *tables, int64_t width, int64_t *start) {
    int64_t count = 0;
    for (int64_t r = 0; r < n; r++)
        if (r == 0 || r - start[count - 1] == RUN || positions[r] != positions[r - 1] + 1
            || memcmp(tables + r * width, tables + (r - 1) * width, sizeof(int64_t) * (size_t)width) != 0)
            start[count++] = r;
    start[count] = n;
    return count;
}

/* RoPE, the KV write and attention (see bitskip_decode_blocks for the rows' order). */
static void attention(const Block *b, int64_t n, const int64_t *positions, const int64_t *tables,
                      int64_t width, int64_t block_size, float *cache_k, float *cache_v,
                      const float *rope_cos, const float *rope_sin, Scratch *s, Member *m) {
    int64_t d = b->head_dim, qs = b->heads * d, kvs = b->kv_heads * d, nq = b->qkv.out_features;
    int64_t *start = s->runs + m->id * (n + 1), count = runs(n, positions, tables, width, start);
    double t0 = profiling && m->id == 0 ? now() : 0.0;
    team_phase(m, count);
    for (int64_t k = team_claim(m); k >= 0; team_done(m), k = team_claim(m)) {
        for (int64_t r = start[k]; r < start[k + 1]; r++) {
            float *q = s->y + r * nq, *kr = q + qs, *v = kr + kvs;
            int64_t pos = positions[r], slot = tables[r * width + pos / block_size] * block_size + pos % block_size;
            bitskip_rope(q, b->heads, d, rope_cos + pos * d, rope_sin + pos * d);
            bitskip_rope(kr, b->kv_heads, d, rope_cos + pos * d, rope_sin + pos * d);
            memcpy(cache_k + slot * kvs, kr, sizeof(float) * (size_t)kvs);
            memcpy(cache_v + slot * kvs, v, sizeof(float) * (size_t)kvs);
        }
        /* The slots of the run's last row's positions (the others' are a prefix of them). */
        int64_t last = start[k + 1] - 1, len = positions[last] + 1, *slots = s->slots + start[k] * s->max_len;
        const int64_t *table = tables + last * width;
        for (int64_t blk = 0, t = 0; t < len; blk++)
            for (int64_t o = 0, base = table[blk] * block_size; o < block_size && t < len; o++) slots[t++] = base + o;
    }
    team_wait(m);
    /* Every row's key and value are in the cache now; a row attends to its own position and
     * before, so rows that are consecutive tokens of one sequence see their predecessors and
     * never a later one. */
    int64_t group = b->heads / b->kv_heads;
    double *scores = s->scores + m->id * RUN * s->group * s->max_len, *qd = s->qd + m->id * RUN * s->group * s->head_dim;
    team_phase(m, count * b->kv_heads);
    for (int64_t i = team_claim(m); i >= 0; team_done(m), i = team_claim(m)) {
        int64_t k = i / b->kv_heads, g = i % b->kv_heads, r = start[k];
        bitskip_attend_rows(s->y + r * nq, nq, start[k + 1] - r, g, group, b->kv_heads, d,
                            s->slots + r * s->max_len, positions[r] + 1, cache_k, cache_v, scores, qd,
                            s->attn + r * qs, qs);
    }
    team_wait(m);
    if (profiling && m->id == 0) spent[1] += now() - t0;
}

/* act(gate) * up in float64, rounded once, in ranges of features handed out to the team. */
static void gated(const Block *b, int64_t n, Scratch *s, Member *m) {
    enum { SPAN = 512 };
    int64_t F = b->inter, spans = (F + SPAN - 1) / SPAN, items = n * spans;
    team_phase(m, items);
    for (int64_t c = team_claim(m); c >= 0; team_done(m), c = team_claim(m)) {
        int64_t r = c / spans, i0 = c % spans * SPAN, i1 = i0 + SPAN < F ? i0 + SPAN : F;
        const float *g = s->y + r * 2 * F;
        bitskip_gate(g + i0, g + F + i0, i1 - i0, b->relu2, s->attn + r * F + i0);
    }
    team_wait(m);
}

/* One block over the rows (see bitskip_decode_blocks), `tables` this block's [n, width], run by
 * every member of the team. */
static void block(const Block *b, const Block *next, float *h, int64_t n, const int64_t *positions, const int64_t *tables,
                  int64_t width, int64_t block_size, float *cache_k, float *cache_v,
                  const float *rope_cos, const float *rope_sin, Scratch *s, Member *m) {
    int64_t H = b->hidden, qs = b->heads * b->head_dim, F = b->inter;
    normed_codes(&b->qkv, h, b->input_norm, H, b->eps, s->x, n, s, m);
    product(&b->qkv, n, s->y, b->qkv.out_features, 0, &b->o, s, m);
    attention(b, n, positions, tables, width, block_size, cache_k, cache_v, rope_cos, rope_sin, s, m);
    normed_codes(&b->o, s->attn, b->attn_sub_norm, qs, b->eps, s->attn, n, s, m);
    product(&b->o, n, h, H, 1, &b->gate_up, s, m);

    normed_codes(&b->gate_up, h, b->post_norm, H, b->eps, s->x, n, s, m);
    product(&b->gate_up, n, s->y, 2 * F, 0, &b->down, s, m);
    gated(b, n, s, m);
    normed_codes(&b->down, s->attn, b->ffn_sub_norm, F, b->eps, s->attn, n, s, m);
    product(&b->down, n, h, H, 1, next ? &next->qkv : NULL, s, m);
}

/* Below this many multiply-adds per block a call runs on one thread: the phases' hand-offs
 * (eleven a block) and waking a second thread cost more than it saves. */
#define PARALLEL_WORK (1 << 20)

static int team_size(const Block *blocks, int64_t nblocks, int64_t n, const int64_t *positions,
                     int nthreads) {
    const Block *b = &blocks[0];
    int64_t len = 0;
    for (int64_t r = 0; r < n; r++) len += positions[r] + 1;
    double work = (double)n * (double)(b->qkv.out_features * b->qkv.in_features
                                       + b->o.out_features * b->o.in_features
                                       + b->gate_up.out_features * b->gate_up.in_features
                                       + b->down.out_features * b->down.in_features)
                  + 2.0 * (double)len * (double)(b->heads * b->head_dim);
    return nblocks > 0 && work >= PARALLEL_WORK && nthreads > 1 ? nthreads : 1;
}

/* Blocks blocks[0..nblocks-1] in turn over h [n, hidden] (updated in place): rows whose token
 * sits at positions[r] (rows of one sequence consecutive and in position order), each block's
 * cache blocks in tables [nblocks, n, width] (block_size positions each), RoPE tables
 * [positions, head_dim]. One call for many blocks: the scratch is allocated and the threads
 * started once. A call on one thread stops before its next block once *stop is set (stop may be
 * NULL: never; a speculative round's drafter stops so when the verify has rejected what it is
 * drafting, draft_loop.c). Returns the blocks run, or -1 when scratch memory cannot be had. */
int64_t bitskip_decode_blocks_until(const Block *blocks, int64_t nblocks, float *h, int64_t n,
                                    const int64_t *positions, const int64_t *tables, int64_t width,
                                    int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                                    const float *rope_sin, int nthreads, const atomic_int *stop) {
    Scratch s;
    Team team;
    int size = team_size(blocks, nblocks, n, positions, nthreads);
    if (scratch_alloc(&s, blocks, nblocks, n, width * block_size, size) != 0) {
        scratch_free(&s);
        return -1;
    }
    team_init(&team);
    if (size > 1) stop = NULL;  /* every member of a team runs the same blocks */
    int64_t ran = nblocks;
    double t0 = profiling ? now() : 0.0;
#pragma omp parallel num_threads(size) if (size > 1)
    {
        Member m = {.team = &team};
#ifdef _OPENMP
        m.id = omp_get_thread_num();
#endif
        for (int64_t l = 0; l < nblocks; l++) {
            if (stop && atomic_load_explicit(stop, memory_order_relaxed)) {
                ran = l;
                break;
            }
            block(&blocks[l], l + 1 < nblocks ? &blocks[l + 1] : NULL, h, n, positions,
                  tables + l * n * width, width, block_size, cache_k, cache_v, rope_cos, rope_sin, &s, &m);
        }
    }
    if (profiling) spent[2] += now() - t0;
    scratch_free(&s);
    return ran;
}

/* The same, every block. Returns 0, or -1 when scratch memory cannot be had. */
int bitskip_decode_blocks(const Block *blocks, int64_t nblocks, float *h, int64_t n,
                          const int64_t *positions, const int64_t *tables, int64_t width,
                          int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                          const float *rope_sin, int nthreads) {
    return bitskip_decode_blocks_until(blocks, nblocks, h, n, positions, tables, width, block_size, cache_k,
                                       cache_v, rope_cos, rope_sin, nthreads, NULL) < 0 ? -1 : 0;
}
