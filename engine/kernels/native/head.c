/* The shared head's float32 product: out[m, v] = sum_k x[m, k] * w[v, k] (x already normed).
 *
 * It reads the whole head (vocab x hidden float32) once per step, for every row at once: a task
 * of HEAD_ROWS head rows stays in L2 while each pair of activation rows passes over it. Each dot
 * product sums in one fixed order (LANES partial sums over k mod LANES, then a fixed tree, then the
 * tail k >= K - K % LANES in order) whatever the number of rows, the thread count or the task
 * split, so a row's logits do not depend on the batch. AVX2 with FMA where the CPU has it, else
 * the same order in portable C (without FMA, so the two paths may differ in the last bit).
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define LANES 32         /* partial sums per dot product: four 8-float registers */
#define HEAD_ROWS 32     /* head rows per task (32 x 8 KB at hidden 2048: in L2) */
#define PARALLEL_MACS (1 << 21)  /* as in ternary.c: smaller products stay on one thread */

/* The fixed reduction of the LANES partial sums: four registers added pairwise, then the eight
 * lanes as a tree. */
static float reduce(const float *p) {
    float r[8];
    for (int i = 0; i < 8; i++) r[i] = (p[i] + p[8 + i]) + (p[16 + i] + p[24 + i]);
    return ((r[0] + r[4]) + (r[2] + r[6])) + ((r[1] + r[5]) + (r[3] + r[7]));
}

static float tail(const float *x, const float *w, int64_t k0, int64_t K, float s) {
    for (int64_t k = k0; k < K; k++) s += x[k] * w[k];
    return s;
}

static void dot_portable(const float *x, int64_t ldx, int mr, const float *w, int64_t K, float *out,
                         int64_t ldo) {
    int64_t body = K - K % LANES;
    for (int i = 0; i < mr; i++) {
        const float *xi = x + i * ldx;
        float p[LANES] = {0};
        for (int64_t k = 0; k < body; k += LANES)
            for (int j = 0; j < LANES; j++) p[j] += xi[k + j] * w[k + j];
        out[i * ldo] = tail(xi, w, body, K, reduce(p));
    }
}

#ifdef HAVE_X86
/* One head row against mr (1 or 2) activation rows; each row's sums as in dot_portable. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
dot_avx2_n(const float *x, int64_t ldx, const int mr, const float *w, int64_t K, float *out, int64_t ldo) {
    int64_t body = K - K % LANES;
    __m256 acc[2][4];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < body; k += LANES) {
        __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
        __m256 w2 = _mm256_loadu_ps(w + k + 16), w3 = _mm256_loadu_ps(w + k + 24);
        for (int i = 0; i < mr; i++) {
            const float *xi = x + i * ldx + k;
            acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xi), w0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xi + 8), w1, acc[i][1]);
            acc[i][2] = _mm256_fmadd_ps(_mm256_loadu_ps(xi + 16), w2, acc[i][2]);
            acc[i][3] = _mm256_fmadd_ps(_mm256_loadu_ps(xi + 24), w3, acc[i][3]);
        }
    }
    for (int i = 0; i < mr; i++) {
        float p[LANES];
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(p + 8 * j, acc[i][j]);
        out[i * ldo] = tail(x + i * ldx, w, body, K, reduce(p));
    }
}

__attribute__((target("avx2,fma"))) static void
dot_avx2(const float *x, int64_t ldx, int mr, const float *w, int64_t K, float *out, int64_t ldo) {
    if (mr == 2)
        dot_avx2_n(x, ldx, 2, w, K, out, ldo);
    else
        dot_avx2_n(x, ldx, 1, w, K, out, ldo);
}
#endif

typedef void (*dot_fn)(const float *, int64_t, int, const float *, int64_t, float *, int64_t);

static int force_portable = 0;

void bitskip_head_force_portable(int on) { force_portable = on; }

static dot_fn pick(void) {
#ifdef HAVE_X86
    if (!force_portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return dot_avx2;
#endif
    return dot_portable;
}

/* x float32 [M, K] (rows contiguous), w float32 [V, K] -> out float32 [M, V]. */
void bitskip_head(const float *x, int64_t M, int64_t K, const float *w, int64_t V, float *out, int nthreads) {
    dot_fn dot = pick();
    int64_t tasks = (V + HEAD_ROWS - 1) / HEAD_ROWS;
    if ((double)M * (double)V * (double)K < PARALLEL_MACS) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t v0 = t * HEAD_ROWS, v1 = v0 + HEAD_ROWS < V ? v0 + HEAD_ROWS : V;
        for (int64_t m0 = 0; m0 < M; m0 += 2) {
            int mr = M - m0 < 2 ? 1 : 2;
            for (int64_t v = v0; v < v1; v++) dot(x + m0 * K, K, mr, w + v * K, K, out + m0 * V + v, V);
        }
    }
}
