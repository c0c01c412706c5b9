/* W8A8 GEMM on AVX2 for the vision tower: y[M, N] = x[M, K] @ W[N, K]^T + b, W in int8 with one
 * fp32 scale per output channel, x rounded per row (per token) to 7 bits at run time.
 *
 * AVX2 multiplies bytes with `vpmaddubsw` only: unsigned bytes times signed bytes, pairs summed
 * into int16 with saturation. Two products of an 8-bit x and an 8-bit w can reach 64,770 and
 * saturate, so x takes 7 bits (|q| <= 63, stored as u = q + 64 in [1, 127]: pairs stay within
 * 2 * 127 * 127 = 32,258), as FBGEMM's "reduce range" does on such CPUs. Each int16 pair sum is
 * widened at once (`vpmaddwd` by ones) into int32, exact over any K. The offset comes back out
 * with the weight's column sums: sum u w = sum q w + 64 sum w.
 *
 * Layout: tiles of 8 output channels, int8 [N/8][K/4][8][4] (a channel's 4 consecutive columns
 * per int32, as VNNI reads them); `pack_int8` in packing.py builds it. K % 4 == 0, N % 8 == 0.
 * Returns 0 on success, 1 for shapes it does not take, 2 when memory runs out, 3 where this build
 * has no AVX2 (the caller computes in floating point).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 8        /* output channels per vector */
#define ROW_BLOCK 4   /* rows of x sharing each weight load */
#define X_LEVELS 63.0f

int vsf_w8a8_supported(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "avx2_rows.h"

/* One row of x as u = round(x / s) + 64 (s = max|x| / 63); returns s. K % 8 == 0 here. */
static float quantize_row(const void *x, int x_fp32, int64_t row, int64_t k, uint8_t *u) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) {
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load8(x, x_fp32, row * k + i)));
    }
    const float top = hmax8(amax);
    const __m256 inverse = _mm256_set1_ps(top > 0.0f ? X_LEVELS / top : 0.0f);
    const __m256i offset = _mm256_set1_epi32(64);
    for (int64_t i = 0; i < k; i += 8) {
        const __m256i q = _mm256_add_epi32(
            _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, x_fp32, row * k + i), inverse)), offset);
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64((__m128i *)(u + i), _mm_packus_epi16(q16, q16));
    }
    return top / X_LEVELS;
}

/* ROWS rows of x (u, row stride k) against two tiles (16 channels) starting at `w`. */
static inline __attribute__((always_inline)) void rows_x_tiles(
    const uint8_t *u, const int ROWS, const int8_t *w0, const int8_t *w1, int64_t k,
    __m256i acc[ROW_BLOCK][2]) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
    for (int64_t kk = 0; kk < k; kk += 4) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(w0 + 8 * kk));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(w1 + 8 * kk));
        for (int r = 0; r < ROWS; r++) {
            const __m256i x = _mm256_set1_epi32(load4(u + r * k + kk));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, a), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b), ones));
        }
    }
}

static inline void finish(__m256i acc, __m256i offset_sum, float sx, const float *sw,
                          const float *bias, float *y) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc, offset_sum));
    const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(sw), _mm256_set1_ps(sx));
    const __m256 b = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    _mm256_storeu_ps(y, _mm256_fmadd_ps(v, s, b));
}
#endif

/* y (fp32, rows of n) = x @ W^T + bias. x: fp32 or bf16 [m_rows, k]; w: packed int8; w_scale and
 * w_sum (the column sums of each channel's int8 weights, int32) [n]; bias fp32 [n] or NULL. */
int vsf_w8a8_gemm(const void *x, int x_fp32, int64_t m_rows, const int8_t *w,
                  const float *w_scale, const int32_t *w_sum, const float *bias, int64_t n,
                  int64_t k, float *y, int threads) {
#if defined(__AVX2__) && defined(__FMA__)
    if (n % (2 * TILE) || k % 8) return 1;
    uint8_t *u = malloc((size_t)m_rows * k + sizeof(float) * m_rows);
    if (!u) return 2;
    float *sx = (float *)(u + m_rows * k);
    const int64_t pairs = n / (2 * TILE);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < m_rows; m++) sx[m] = quantize_row(x, x_fp32, m, k, u + m * k);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) {
            const int64_t n0 = p * 2 * TILE;
            const int8_t *w0 = w + n0 * k, *w1 = w0 + TILE * k;
            const __m256i off0 = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(w_sum + n0)), 6);
            const __m256i off1 =
                _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(w_sum + n0 + TILE)), 6);
            const float *b0 = bias ? bias + n0 : NULL, *b1 = bias ? bias + n0 + TILE : NULL;
            __m256i acc[ROW_BLOCK][2];
            int64_t m = 0;
            for (; m + ROW_BLOCK <= m_rows; m += ROW_BLOCK) {
                rows_x_tiles(u + m * k, ROW_BLOCK, w0, w1, k, acc);
                for (int r = 0; r < ROW_BLOCK; r++) {
                    finish(acc[r][0], off0, sx[m + r], w_scale + n0, b0, y + (m + r) * n + n0);
                    finish(acc[r][1], off1, sx[m + r], w_scale + n0 + TILE, b1,
                           y + (m + r) * n + n0 + TILE);
                }
            }
            for (; m < m_rows; m++) {
                rows_x_tiles(u + m * k, 1, w0, w1, k, acc);
                finish(acc[0][0], off0, sx[m], w_scale + n0, b0, y + m * n + n0);
                finish(acc[0][1], off1, sx[m], w_scale + n0 + TILE, b1, y + m * n + n0 + TILE);
            }
        }
    }
    free(u);
    return 0;
#else
    (void)x, (void)x_fp32, (void)m_rows, (void)w, (void)w_scale, (void)w_sum, (void)bias;
    (void)n, (void)k, (void)y, (void)threads;
    return 3;
#endif
}
