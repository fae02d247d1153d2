/* The screened head: the argmax of the float32 head (head.c) without reading all of it.
 *
 * A greedy row needs only the argmax of its logits. A copy of the head at 8 bits a weight (q_v =
 * round(w_v / s_v), s_v = max_k |w_vk| / 127 per row), read in two levels (head_codes.c: the top
 * 6 bits of each code u = q + 128 in one stream, the low 2 bits in another), and the row's
 * activations as int16 (xq = round(x / t), t = max_k |x_k| / Q) give each head row an exact
 * integer dot and an approximate logit a_v, and per-row bounds built at load give an interval
 * [a_v - B_v, a_v + B_v] that surely holds the exact float32 logit L_v (the bits bitskip_head
 * computes). Level 1 reads the 6-bit codes of every row: 3/4 of the int8 copy's bytes. Rows whose
 * level-1 upper end reaches the largest level-1 lower end read their low 2 bits (level 2: the
 * int8 code, a bound ~4x tighter); rows whose level-2 upper end reaches the largest lower end of
 * both levels are candidates; their exact logits are computed with head.c's own dot (the same
 * bits), every other row gets -inf. The head's argmax (first index on ties) passes every test:
 * for any u, L_argmax >= L_u >= lower_u, and upper_argmax >= L_argmax; so does every row tied
 * with it. Hence the argmax of the output equals the full head's, whatever the input.
 *
 * The bound, for any codes c_v and scale s_v (level 1: c = 4 (u >> 2) - 126.5, the dropped bits
 * taken at their mean; level 2: c = q). Let D_v = sum_k w_vk x_k exactly, u = 2^-24, n = K + 40,
 * gamma = n u / (1 - n u). head.c's dot (32-lane chains of K / 32 fused multiply-adds, 5 tree
 * levels, a tail of at most 31 rounded products and sums: at most n roundings on any term's path)
 * obeys the classic bound |L_v - D_v| <= gamma sum_k |w_vk x_k| when nothing underflows, plus at
 * most n 2^-149 when something does (an underflowing product or sum is off by at most 2^-150).
 * Then
 *   D_v - s_v t C_v = sum_k (w_vk - s_v c_vk) x_k + s_v sum_k c_vk (x_k - t xq_k),  C_v = c_v . xq
 * so with Cauchy-Schwarz, writing e_v = ||w_v - s_v c_v|| and ex = ||x - t xq||:
 *   |L_v - s_v t C_v| <= ||x|| (e_v + gamma ||w_v||) + ex s_v ||c_v|| + n 2^-149.
 * C_v is an exact integer (2 C_v at level 1) in int64. At load, per row and level, in double:
 * r_v = (e_v + gamma ||w_v||)(1 + 2^-20), p_v = s_v ||c_v|| (1 + 2^-20) (every square exact, the
 * sums off by a relative K 2^-53); per call ||x|| and ex in double, times 1 + 2^-30. The double
 * a_v = (s_v t) C_v is off by at most 2^-51 |a_v|, B_v = ||x|| r_v + ex p_v + n 2^-149 by a
 * relative 2^-51, and a_v +- B_v rounds by 2^-53 (|a_v| + B_v): so B_v + 2^-48 |a_v| (the margins
 * taking the rest) is a sound half-width. The classic bound assumes no overflow: a row is screened
 * only when ||x|| times the largest ||w_v|| is below 2^100, so no partial sum comes near FLT_MAX; a
 * row with a non-finite x, and every row when the head has a non-finite weight (the build says so),
 * gets the full head instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "head.h"
#include "head_codes.h"
#include "team.h"

#define SCREEN_ROWS 64   /* head rows per task: 64 x 1.5 KB of level-1 codes at hidden 2048 */
#define STATS 4          /* per activation row: t, ||x||, ex, sum xq */

/* A row's activations for the screen: xq = round(x / t) within +-Q (zero past K up to kp), t =
 * max |x_k| / Q; st[1], st[2] bound ||x|| and ||x - t xq|| from above, st[3] = sum xq. Returns t,
 * or -1 when the row cannot be screened. */
static double quantize(const float *x, int64_t K, int64_t kp, double norm_max, int16_t *xq, double *st) {
    double Q = head_codes_qmax(kp), mx = 0, ss = 0, es = 0, sum = 0;
    for (int64_t k = 0; k < K; k++) {
        double a = fabs((double)x[k]);
        mx = a > mx ? a : mx;
        ss += (double)x[k] * x[k];
    }
    st[1] = sqrt(ss) * (1 + 0x1p-30);
    if (Q < 1 || !(st[1] * norm_max < 0x1p100)) return -1;  /* NaN, Inf, too large, absurd K */
    double t = mx / Q;
    for (int64_t k = 0; k < kp; k++) {
        double c = t > 0 && k < K ? nearbyint(x[k] / t) : 0;
        c = c > Q ? Q : c < -Q ? -Q : c;
        xq[k] = (int16_t)c;
        sum += c;
        if (k < K) es += (x[k] - t * c) * (x[k] - t * c);
    }
    /* each x - t c is off by at most 2^-52 |x_k|: the sum's root by 2^-52 ||x|| */
    st[2] = (sqrt(es) + 0x1p-50 * st[1]) * (1 + 0x1p-30);
    st[3] = sum;
    return t;
}

/* The ends of row v's interval at a level from its integer dot C (2 C at level 1). */
static inline double centre(const double *st, float scale, double C) { return ((double)scale * st[0]) * C; }
static inline double width(const double *st, const double *b, double a, double eta) {
    return st[1] * b[0] + st[2] * b[1] + eta + 0x1p-48 * fabs(a);
}

/* An int32 kept in a float's storage between the phases (out is the scratch). */
static inline void put32(float *o, int32_t v) { memcpy(o, &v, 4); }
static inline int32_t get32(const float *o) { int32_t v; memcpy(&v, o, 4); return v; }

/* The smallest float >= a double (the upper ends kept between phases: rounding up only admits more). */
static inline float float_up(double d) {
    float f = (float)d;
    return (double)f < d ? nextafterf(f, INFINITY) : f;
}

/* The rows of task t: v0 and their number. */
static inline int64_t task_rows(int64_t t, int64_t V, int64_t *v0) {
    *v0 = t * SCREEN_ROWS;
    return V - *v0 < SCREEN_ROWS ? V - *v0 : SCREEN_ROWS;
}

/* The largest of column j over the tasks' rows of lows [tasks, ns]. */
static double largest(const double *lows, int64_t tasks, int64_t ns, int64_t j) {
    double top = -INFINITY;
    for (int64_t t = 0; t < tasks; t++) top = lows[t * ns + j] > top ? lows[t * ns + j] : top;
    return top;
}

/* x float32 [M, K] -> out float32 [M, V]: per row, the exact logits (bitskip_head's bits) of the
 * candidates, -inf elsewhere; rows that cannot be screened get every exact logit. The copy: codes
 * (head_codes.h's layout), scale [V], bounds [V + 1, 4], norm_max as built. Returns the number of
 * exact logits computed, or -1 without memory.
 *
 * Phases (team.h: items claimed by whichever thread comes, a phase over when its items are done):
 * the full head of the rows that cannot be screened; level 1 over tasks of SCREEN_ROWS head rows
 * (each writes its rows' 6-bit dots into out, kept as int32 bits, and its largest lower end per
 * row of x); level 2 (each task's rows that pass read their low bits: out then holds their upper
 * end, a float rounded up, or -inf); the candidates' exact logits. */
int64_t bitskip_head_screened(const float *x, int64_t M, int64_t K, const float *w, const uint8_t *codes,
                              const float *scale, const double *bounds, double norm_max, int64_t V,
                              float *out, int nthreads) {
    head_rows_fn exact = bitskip_head_rows_kernel();
    const head_codes_kernels *kern = bitskip_head_codes_kernels();
    const int64_t kp = head_codes_padded(K), rec = head_codes_level1_bytes(kp);
    const int64_t tasks = (V + SCREEN_ROWS - 1) / SCREEN_ROWS;
    const uint8_t *low = codes + V * rec;
    double *st = malloc(STATS * M * sizeof(double));          /* per screened row, see STATS */
    int16_t *xq = malloc(M * kp * sizeof(int16_t));            /* the screened rows' codes */
    int8_t *xs = malloc(M * 2 * kp);                            /* the same as bytes: head_codes.h */
    int64_t *which = malloc(M * sizeof(int64_t));              /* their indices in x */
    double *lows = malloc(2 * tasks * M * sizeof(double));     /* per level, task and row: the largest lower end */
    int64_t *counts = calloc(tasks, sizeof(int64_t));          /* exact logits per task */
    nthreads = bitskip_head_threads(M, K, V, nthreads);
    double *tops = malloc(nthreads * M * sizeof(double));      /* per thread: the bar a row's logits must reach */
    if (st == NULL || xq == NULL || xs == NULL || which == NULL || lows == NULL || counts == NULL || tops == NULL) {
        free(st), free(xq), free(xs), free(which), free(lows), free(counts), free(tops);
        return -1;
    }
    int64_t ns = 0;
    for (int64_t m = 0; m < M; m++) {
        double *s = st + STATS * ns;
        s[0] = quantize(x + m * K, K, kp, norm_max, xq + ns * kp, s);
        if (s[0] < 0) continue;
        head_codes_split(xq + ns * kp, kp, xs + 2 * ns * kp);
        which[ns++] = m;
    }
    const double eta = (double)(K + 40) * 0x1p-149;
    double *lows2 = lows + tasks * ns;
    Team team;
    team_init(&team);
    atomic_int ids = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        Member me = {.team = &team, .id = atomic_fetch_add(&ids, 1)};
        double *top = tops + me.id * ns;
        int64_t t, v0, n;
        team_phase(&me, ns < M ? tasks : 0);  /* the full head for the rows that cannot be screened */
        while ((t = team_claim(&me)) >= 0) {
            const float *wr[SCREEN_ROWS];
            n = task_rows(t, V, &v0);
            for (int i = 0; i < n; i++) wr[i] = w + (v0 + i) * K;
            for (int64_t m = 0, j = 0; m < M; m++) {
                if (j < ns && which[j] == m) j++;
                else exact(x + m * K, K, wr, (int)n, out + m * V + v0);
            }
            team_done(&me);
        }
        /* Level 1: HEAD_CODES_MB rows of x a pass over a task's codes. */
        team_phase(&me, (ns + HEAD_CODES_MB - 1) / HEAD_CODES_MB * tasks);
        int64_t item;
        while ((item = team_claim(&me)) >= 0) {
            int32_t C[HEAD_CODES_MB * SCREEN_ROWS];
            int64_t g = item / tasks * HEAD_CODES_MB;
            int mb = (int)(ns - g < HEAD_CODES_MB ? ns - g : HEAD_CODES_MB);
            t = item % tasks;
            n = task_rows(t, V, &v0);
            kern->level1(xq + g * kp, xs + 2 * g * kp, mb, kp, codes + v0 * rec, (int)n, C, SCREEN_ROWS);
            for (int j = 0; j < mb; j++) {
                const double *s = st + STATS * (g + j);
                float *o = out + which[g + j] * V + v0;
                double bar = -INFINITY;
                for (int i = 0; i < n; i++) {
                    int32_t h = C[j * SCREEN_ROWS + i];
                    double a = centre(s, scale[v0 + i], 0.5 * (8.0 * h - 253.0 * s[3]));
                    if (a > bar) {  /* else its lower end cannot be the largest */
                        double lo = a - width(s, bounds + 4 * (v0 + i), a, eta);
                        bar = lo > bar ? lo : bar;
                    }
                    put32(o + i, h);
                }
                lows[t * ns + g + j] = bar;
            }
            team_done(&me);
        }
        team_wait(&me);
        for (int64_t j = 0; j < ns; j++) top[j] = largest(lows, tasks, ns, j);
        /* Level 2: the rows level 1 keeps read their low bits. */
        team_phase(&me, tasks);
        while ((t = team_claim(&me)) >= 0) {
            n = task_rows(t, V, &v0);
            for (int64_t j = 0; j < ns; j++) {
                const double *s = st + STATS * j;
                float *o = out + which[j] * V + v0;
                double bar = -INFINITY;
                int keep[SCREEN_ROWS], c = 0;
                for (int i = 0; i < n; i++) {
                    double a = centre(s, scale[v0 + i], 0.5 * (8.0 * get32(o + i) - 253.0 * s[3]));
                    /* the widest level-1 interval first (bounds[V]: each column's largest), then its own */
                    if (a + width(s, bounds + 4 * V, a, eta) * (1 + 0x1p-40) >= top[j]
                            && a + width(s, bounds + 4 * (v0 + i), a, eta) >= top[j]) {
                        keep[c++] = i;  /* its low bits fetched now, all of them in flight at once */
                        head_codes_prefetch(low + (v0 + i) * (kp / 4), kp / 4);
                    } else {
                        o[i] = -INFINITY;
                    }
                }
                for (int r = 0; r < c; r++) {
                    int i = keep[r];
                    int64_t lo2 = kern->level2(xq + j * kp, kp, low + (v0 + i) * (kp / 4));
                    double a = centre(s, scale[v0 + i], (double)(4 * (int64_t)get32(o + i) + lo2 - 128 * (int64_t)s[3]));
                    double half = width(s, bounds + 4 * (v0 + i) + 2, a, eta);
                    bar = a - half > bar ? a - half : bar;
                    o[i] = float_up(a + half);
                }
                lows2[t * ns + j] = bar > top[j] ? bar : top[j];
            }
            team_done(&me);
        }
        team_wait(&me);
        for (int64_t j = 0; j < ns; j++) top[j] = largest(lows2, tasks, ns, j);  /* of either level */
        /* The candidates: a level-2 upper end at or above it. */
        team_phase(&me, tasks);
        while ((t = team_claim(&me)) >= 0) {
            const float *wr[SCREEN_ROWS];
            int idx[SCREEN_ROWS];
            float got[SCREEN_ROWS];
            n = task_rows(t, V, &v0);
            for (int64_t j = 0; j < ns; j++) {
                float *o = out + which[j] * V + v0;
                int c = 0;
                for (int i = 0; i < n; i++) {
                    if ((double)o[i] >= top[j]) idx[c] = i, wr[c++] = w + (v0 + i) * K;
                    o[i] = -INFINITY;
                }
                exact(x + which[j] * K, K, wr, c, got);
                for (int i = 0; i < c; i++) o[idx[i]] = got[i];
                counts[t] += c;
            }
            team_done(&me);
        }
        team_wait(&me);
    }
    int64_t computed = (M - ns) * V;
    for (int64_t t = 0; t < tasks; t++) computed += counts[t];
    free(st), free(xq), free(xs), free(which), free(lows), free(counts), free(tops);
    return computed;
}
