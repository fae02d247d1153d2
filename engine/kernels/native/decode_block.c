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
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ternary.h"

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

/* rms_norm: x / sqrt(mean(x^2) + eps) * w, the mean in float64 and the sqrt of a float32 taken
 * in float64. */
static void rms_norm(const float *x, const float *w, int64_t k, double eps, float *out) {
    double sq = 0.0;
    for (int64_t i = 0; i < k; i++) sq += (double)x[i] * (double)x[i];
    float mean_sq = (float)(sq / (double)k);
    float denom = (float)sqrt((double)(mean_sq + (float)eps));
    for (int64_t i = 0; i < k; i++) out[i] = x[i] / denom * w[i];
}

/* hadamard_transform: zero-pad to n, butterflies of a + b, a - b, then times float(1/sqrt(n)). */
static void hadamard(const float *x, int64_t k, int64_t n, float *out) {
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

/* quantize_activations: s = max(max|x|, 1e-5); q = clamp(round(x * ((1 / s) * Q)), -Q, Q), torch's
 * evaluation of x * (Q / s) (a reciprocal, then a product), rounding half to even. */
static float quantize(const float *x, int64_t k, int64_t qmax, int8_t *q) {
    float s = 0.0f;
    for (int64_t i = 0; i < k; i++) s = fabsf(x[i]) > s ? fabsf(x[i]) : s;
    if (!(s >= 1e-5f)) s = 1e-5f;
    float scale = (1.0f / s) * (float)qmax;
    for (int64_t i = 0; i < k; i++) {
        float r = nearbyintf(x[i] * scale);
        q[i] = (int8_t)(r > (float)qmax ? (float)qmax : r < -(float)qmax ? -(float)qmax : r);
    }
    return s;
}

/* Optional timers (bench/profile_decode.py): seconds in the ternary products, in attention
 * (RoPE, the KV write, attending), and in whole blocks; off unless asked for. */
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

/* Buffers for one call, sized for its widest block and allocated once for all its blocks. */
typedef struct {
    float *x, *y, *attn, *rot, *scales;
    int8_t *codes;
    int32_t *acc;
    int64_t *slots;
    double *scores;
    void *ws;                     /* the ternary product's permuted activations */
} Scratch;

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static int scratch_alloc(Scratch *s, const Block *blocks, int64_t nblocks, int64_t n, int64_t max_len) {
    int64_t wide = 0, kin = 0, inner = 0, hidden = 0;
    for (int64_t l = 0; l < nblocks; l++) {
        const Block *b = &blocks[l];
        const Proj *ps[4] = {&b->qkv, &b->o, &b->gate_up, &b->down};
        for (int i = 0; i < 4; i++) {
            wide = max64(wide, ps[i]->out_features);
            kin = max64(kin, ps[i]->in_features);
        }
        inner = max64(inner, max64(b->heads * b->head_dim, b->inter));
        hidden = max64(hidden, b->hidden);
    }
    s->x = malloc(sizeof(float) * (size_t)(n * hidden));
    s->y = malloc(sizeof(float) * (size_t)(n * wide));
    s->attn = malloc(sizeof(float) * (size_t)(n * inner));
    s->rot = malloc(sizeof(float) * (size_t)kin);
    s->scales = malloc(sizeof(float) * (size_t)n);
    s->codes = malloc((size_t)(n * kin));
    s->acc = malloc(sizeof(int32_t) * (size_t)(n * wide));
    s->slots = malloc(sizeof(int64_t) * (size_t)max_len);
    s->scores = malloc(sizeof(double) * (size_t)max_len);
    s->ws = malloc(bitskip_ternary_workspace(n, kin));
    return s->x && s->y && s->attn && s->rot && s->scales && s->codes && s->acc && s->slots
           && s->scores && s->ws ? 0 : -1;
}

static void scratch_free(Scratch *s) {
    void *all[] = {s->x, s->y, s->attn, s->rot, s->scales, s->codes, s->acc, s->slots, s->scores, s->ws};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) free(all[i]);
}

/* One projection of n rows x [n, k] (already normed) into y: acc * (s / Q) * gamma. */
static void project(const Proj *p, const float *x, int64_t n, int64_t k, float *y, Scratch *s,
                    int nthreads) {
    int64_t kin = p->in_features, nout = p->out_features;
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * k;
        if (p->hadamard) {
            hadamard(xr, k, kin, s->rot);
            xr = s->rot;
        }
        s->scales[r] = quantize(xr, kin, p->qmax, s->codes + r * kin);
    }
    double t0 = profiling ? now() : 0.0;
    bitskip_ternary_gemm_ws(s->codes, n, kin, kin, p->parts, p->part_rows, (int)p->nparts, s->acc,
                            nout, nthreads, s->ws);
    if (profiling) spent[0] += now() - t0;
    for (int64_t r = 0; r < n; r++) {
        float f = s->scales[r] / (float)p->qmax;
        for (int64_t j = 0; j < nout; j++) y[r * nout + j] = (float)s->acc[r * nout + j] * f * p->gamma[j];
    }
}

/* apply_rope, rotate-half: x * cos + rotate_half(x) * sin. */
static void rope(float *x, int64_t heads, int64_t d, const float *cos, const float *sin) {
    int64_t half = d / 2;
    float tmp[d];
    for (int64_t hh = 0; hh < heads; hh++) {
        float *v = x + hh * d;
        for (int64_t i = 0; i < d; i++) {
            float rot = i < half ? -v[i + half] : v[i - half];
            tmp[i] = v[i] * cos[i] + rot * sin[i];
        }
        memcpy(v, tmp, sizeof(float) * (size_t)d);
    }
}

/* One row's query [heads, d] over its cached positions 0..len-1 (slots[t]), in float64. */
static void attend(const Block *b, const float *q, const int64_t *slots, int64_t len,
                   const float *cache_k, const float *cache_v, double *scores, float *out) {
    int64_t d = b->head_dim, hkv = b->kv_heads, group = b->heads / hkv;
    double scale = pow((double)d, -0.5);
    for (int64_t hq = 0; hq < b->heads; hq++) {
        int64_t g = hq / group;
        const float *qh = q + hq * d;
        double mx = -INFINITY;
        for (int64_t t = 0; t < len; t++) {
            const float *kt = cache_k + (slots[t] * hkv + g) * d;
            double dot = 0.0;
            for (int64_t i = 0; i < d; i++) dot += (double)qh[i] * (double)kt[i];
            scores[t] = dot * scale;
            mx = scores[t] > mx ? scores[t] : mx;
        }
        double sum = 0.0;
        for (int64_t t = 0; t < len; t++) {
            scores[t] = exp(scores[t] - mx);
            sum += scores[t];
        }
        double acc[d];
        for (int64_t i = 0; i < d; i++) acc[i] = 0.0;
        for (int64_t t = 0; t < len; t++) {
            double p = scores[t] / sum;
            const float *vt = cache_v + (slots[t] * hkv + g) * d;
            for (int64_t i = 0; i < d; i++) acc[i] += p * (double)vt[i];
        }
        for (int64_t i = 0; i < d; i++) out[hq * d + i] = (float)acc[i];
    }
}

/* One block over the rows (see bitskip_decode_blocks), `tables` this block's [n, width]. */
static void block(const Block *b, float *h, int64_t n, const int64_t *positions, const int64_t *tables,
                  int64_t width, int64_t block_size, float *cache_k, float *cache_v,
                  const float *rope_cos, const float *rope_sin, Scratch *s, int nthreads) {
    int64_t H = b->hidden, d = b->head_dim, qs = b->heads * d, kvs = b->kv_heads * d, F = b->inter;
    float *x = s->x, *y = s->y, *attn = s->attn;
    for (int64_t r = 0; r < n; r++) rms_norm(h + r * H, b->input_norm, H, b->eps, x + r * H);
    project(&b->qkv, x, n, H, y, s, nthreads);
    int64_t nq = b->qkv.out_features;
    double t0 = profiling ? now() : 0.0;
    /* In row order: a row's key and value are in the cache before it attends, so rows that are
     * consecutive tokens of one sequence (a verified draft, a prompt chunk) see their
     * predecessors, and never a later one (each attends to its own position and before). */
    for (int64_t r = 0; r < n; r++) {
        float *q = y + r * nq, *k = q + qs, *v = k + kvs;
        int64_t pos = positions[r], len = pos + 1;
        rope(q, b->heads, d, rope_cos + pos * d, rope_sin + pos * d);
        rope(k, b->kv_heads, d, rope_cos + pos * d, rope_sin + pos * d);
        for (int64_t t = 0; t < len; t++)
            s->slots[t] = tables[r * width + t / block_size] * block_size + t % block_size;
        memcpy(cache_k + s->slots[pos] * kvs, k, sizeof(float) * (size_t)kvs);
        memcpy(cache_v + s->slots[pos] * kvs, v, sizeof(float) * (size_t)kvs);
        attend(b, q, s->slots, len, cache_k, cache_v, s->scores, attn + r * qs);
        if (b->attn_sub_norm) rms_norm(attn + r * qs, b->attn_sub_norm, qs, b->eps, attn + r * qs);
    }
    if (profiling) spent[1] += now() - t0;
    project(&b->o, attn, n, qs, y, s, nthreads);
    for (int64_t i = 0; i < n * H; i++) h[i] = h[i] + y[i];

    for (int64_t r = 0; r < n; r++) rms_norm(h + r * H, b->post_norm, H, b->eps, x + r * H);
    project(&b->gate_up, x, n, H, y, s, nthreads);
    for (int64_t r = 0; r < n; r++) {
        const float *g = y + r * 2 * F, *u = g + F;
        float *a = attn + r * F;
        for (int64_t i = 0; i < F; i++) {
            double gd = g[i], act = b->relu2 ? (gd > 0.0 ? gd : 0.0) * (gd > 0.0 ? gd : 0.0)
                                             : gd / (1.0 + exp(-gd));
            a[i] = (float)(act * (double)u[i]);
        }
        if (b->ffn_sub_norm) rms_norm(a, b->ffn_sub_norm, F, b->eps, a);
    }
    project(&b->down, attn, n, F, y, s, nthreads);
    for (int64_t i = 0; i < n * H; i++) h[i] = h[i] + y[i];
}

/* Blocks blocks[0..nblocks-1] in turn over h [n, hidden] (updated in place): rows whose token
 * sits at positions[r] (rows of one sequence consecutive and in position order), each block's
 * cache blocks in tables [nblocks, n, width] (block_size positions each), RoPE tables
 * [positions, head_dim]. One call for many blocks: the scratch is allocated once.
 * Returns 0, or -1 when scratch memory cannot be had. */
int bitskip_decode_blocks(const Block *blocks, int64_t nblocks, float *h, int64_t n,
                          const int64_t *positions, const int64_t *tables, int64_t width,
                          int64_t block_size, float *cache_k, float *cache_v, const float *rope_cos,
                          const float *rope_sin, int nthreads) {
    Scratch s;
    int rc = scratch_alloc(&s, blocks, nblocks, n, width * block_size);
    double t0 = profiling ? now() : 0.0;
    if (rc == 0)
        for (int64_t l = 0; l < nblocks; l++)
            block(&blocks[l], h, n, positions, tables + l * n * width, width, block_size, cache_k,
                  cache_v, rope_cos, rope_sin, &s, nthreads);
    if (profiling) spent[2] += now() - t0;
    scratch_free(&s);
    return rc;
}
