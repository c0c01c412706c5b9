/* Prefill GEMM for 4-bit weights on AVX2: y[M, N] = x[M, K] @ W[N, K]^T with 8-bit activations.
 *
 * The decode kernel (fp32_kernels.c) runs x as exact 16-bit integers and unpacks the nibbles of a
 * tile again for every row of x; it is built to stream W once for a few rows. A prompt has many
 * rows, and there the arithmetic, not the weight stream, is the limit. So this kernel:
 *   - quantizes x once per call to signed bytes in blocks of 32 columns (one fp32 scale per row and
 *     block, as llama.cpp's Q8_0 activations), so one `vpmaddubsw` does 32 multiply-adds;
 *   - unpacks each 16-row tile of W once per call into a per-thread buffer of bytes (16 * K bytes,
 *     L2-resident) and reuses it for every row of x;
 *   - keeps the integer sums in int16 for a 32-column block: nibble (<= 15) x byte (|x| <= 127)
 *     pairs stay within 3,810, and eight of them within int16 (30,480 < 32,767);
 *   - widens each block once (`vpmaddwd`), scales it by the block's x scale and the group's weight
 *     scale into fp32, and subtracts the zero point once per group: (q - z) * s summed over a
 *     group is s * (sum q x - z * sum x).
 * Same packed layout as the decode kernels (int4_matmul.c): tiles of 16 rows of W, uint8
 * [N/16][K/8][16][4], byte j of a row holding column j in its low nibble and j + 4 in its high
 * nibble; fp16 scales and uint8 zeros [N/16][K/group][16].
 *
 * Returns 0 on success, 1 for shapes the layout does not hold, 2 when memory runs out and 3 where
 * this build has no GEMM (non-AVX2): the caller then uses the decode kernel or a dense GEMM.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "w4a16.h"

#define X_BLOCK 32       /* columns per activation scale */
#define ROW_BLOCK 4      /* rows of x sharing each load of the unpacked weights */

int vsf_gemm_supported(void) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include "avx2_rows.h"

/* x as signed bytes in blocks of X_BLOCK columns: q [M, K], scale [M, K / X_BLOCK], and per
 * (row, group) the sum over the group of scale * q, for the zero points. */
typedef struct {
    int8_t *q;
    float *scale;
    float *group_sum;
} x_bytes;

static void quantize_row(const void *x, int x_fp32, int64_t row, int64_t k, int64_t group,
                         const x_bytes *xq) {
    const int64_t blocks = k / X_BLOCK, per_group = group / X_BLOCK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t base = row * k + b * X_BLOCK;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = load8(x, x_fp32, base + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        const float top = hmax8(amax);
        const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        __m256i q[4], sum = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)); /* round to nearest */
            sum = _mm256_add_epi32(sum, q[i]);
        }
        /* int32 -> int8 keeping the column order (the packs interleave 128-bit lanes). */
        const __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23),
                                                          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq->q + base), bytes);
        const float scale = top / 127.0f;
        xq->scale[row * blocks + b] = scale;
        const int64_t g = row * (k / group) + b / per_group;
        if (b % per_group == 0) xq->group_sum[g] = 0.0f;
        xq->group_sum[g] += scale * (float)hsum8i(sum);
    }
}

/* One tile's nibbles as bytes, per chunk of 8 columns four vectors: rows 0-7 columns 0-3, rows
 * 8-15 columns 0-3, rows 0-7 columns 4-7, rows 8-15 columns 4-7 (a row's 4 columns per int32). */
static void unpack_tile(const uint8_t *w, int64_t k, uint8_t *out) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int64_t c = 0; c < k / CHUNK; c++) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + 64 * c));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + 64 * c + 32));
        __m256i *dst = (__m256i *)(out + 128 * c);
        _mm256_store_si256(dst, _mm256_and_si256(v0, nibble));
        _mm256_store_si256(dst + 1, _mm256_and_si256(v1, nibble));
        _mm256_store_si256(dst + 2, _mm256_and_si256(_mm256_srli_epi16(v0, 4), nibble));
        _mm256_store_si256(dst + 3, _mm256_and_si256(_mm256_srli_epi16(v1, 4), nibble));
    }
}

/* ROWS rows of x (m0..) against all 16 rows of an unpacked tile. Measured on the AVX2 EPYC
 * (6912x2560, 128 rows, paired runs): 4 rows x 16 columns runs 1.16x faster than 4 rows x 8
 * columns twice (each x broadcast feeds four products instead of two), 3, 5 and 6 rows slower. */
static inline __attribute__((always_inline)) void rows_x_tile(
    const x_bytes *xq, int64_t m0, const int ROWS, const uint8_t *tile,
    const uint16_t *scales, const uint8_t *zeros, int64_t k, int64_t group, float *y,
    int64_t ldy) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t blocks = k / X_BLOCK, groups = k / group, per_group = group / X_BLOCK;
    __m256 acc[ROW_BLOCK][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint16_t *s = scales + g * TILE_ROWS;
        const __m256 ws0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s));
        const __m256 ws1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 8)));
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            __m256i dot[ROW_BLOCK][2];
            for (int r = 0; r < ROWS; r++) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
/* Not unrolled: unrolled, gcc hoists the block's products and spills them. */
#pragma GCC unroll 1
            for (int c = 0; c < X_BLOCK / CHUNK; c++) {
                const int64_t kc = b * X_BLOCK + c * CHUNK;
                const __m256i *wv = (const __m256i *)(tile + 16 * kc);
                const __m256i l0 = _mm256_load_si256(wv), l1 = _mm256_load_si256(wv + 1);
                const __m256i h0 = _mm256_load_si256(wv + 2), h1 = _mm256_load_si256(wv + 3);
                for (int r = 0; r < ROWS; r++) {
                    const int8_t *xr = xq->q + (m0 + r) * k + kc;
                    const __m256i lo = _mm256_set1_epi32(load4(xr));
                    const __m256i hi = _mm256_set1_epi32(load4(xr + 4));
                    dot[r][0] = _mm256_add_epi16(dot[r][0], _mm256_maddubs_epi16(l0, lo));
                    dot[r][1] = _mm256_add_epi16(dot[r][1], _mm256_maddubs_epi16(l1, lo));
                    dot[r][0] = _mm256_add_epi16(dot[r][0], _mm256_maddubs_epi16(h0, hi));
                    dot[r][1] = _mm256_add_epi16(dot[r][1], _mm256_maddubs_epi16(h1, hi));
                }
            }
            for (int r = 0; r < ROWS; r++) {
                const __m256 sx = _mm256_broadcast_ss(xq->scale + (m0 + r) * blocks + b);
                for (int h = 0; h < 2; h++) {
                    const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot[r][h], ones));
                    acc[r][h] = _mm256_fmadd_ps(sum, _mm256_mul_ps(h ? ws1 : ws0, sx), acc[r][h]);
                }
            }
        }
        /* minus s * z * sum(x) over the group */
        const uint8_t *z = zeros + g * TILE_ROWS;
        const __m256 sz0 = _mm256_mul_ps(
            ws0, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)z))));
        const __m256 sz1 = _mm256_mul_ps(
            ws1, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(z + 8)))));
        for (int r = 0; r < ROWS; r++) {
            const __m256 xs = _mm256_broadcast_ss(xq->group_sum + (m0 + r) * groups + g);
            acc[r][0] = _mm256_fnmadd_ps(sz0, xs, acc[r][0]);
            acc[r][1] = _mm256_fnmadd_ps(sz1, xs, acc[r][1]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(y + r * ldy, acc[r][0]);
        _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
    }
}

static void tile_times_rows(const x_bytes *xq, int64_t m_rows, const uint8_t *tile,
                            const uint16_t *scales, const uint8_t *zeros, int64_t k, int64_t group,
                            float *y, int64_t ldy) {
    int64_t m = 0;
    for (; m + ROW_BLOCK <= m_rows; m += ROW_BLOCK) {
        rows_x_tile(xq, m, ROW_BLOCK, tile, scales, zeros, k, group, y + m * ldy, ldy);
    }
    for (; m < m_rows; m++) rows_x_tile(xq, m, 1, tile, scales, zeros, k, group, y + m * ldy, ldy);
}

static inline void store_out(void *out, int out_fp32, int64_t at, const float *y) {
    if (out_fp32) {
        memcpy((float *)out + at, y, TILE_ROWS * sizeof(float));
        return;
    }
    for (int i = 0; i < TILE_ROWS; i += 8) {
        store_bf16x8((uint16_t *)out + at + i, _mm256_loadu_ps(y + i));
    }
}
#endif

/* y = x @ W^T. x: fp32 or bf16 [m_rows, k]; out: fp32 or bf16 rows of `ldo` elements, columns
 * [0, n) written. */
int vsf_int4_gemm(const void *x, int x_fp32, int64_t m_rows, const uint8_t *w,
                  const uint16_t *scales, const uint8_t *zeros, int64_t n, int64_t k,
                  int64_t group, void *out, int64_t ldo, int out_fp32, int threads) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (!vs_w4a16_fits(n, k, group)) return 1;
    const int64_t groups = k / group, tiles = n / TILE_ROWS;
    x_bytes xq;
    void *heap = malloc(m_rows * k + 4 * m_rows * (k / X_BLOCK) + 4 * m_rows * groups);
    if (!heap) return 2;
    xq.q = heap;
    xq.scale = (float *)(xq.q + m_rows * k);
    xq.group_sum = xq.scale + m_rows * (k / X_BLOCK);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < m_rows; m++) quantize_row(x, x_fp32, m, k, group, &xq);
        uint8_t *tile = aligned_alloc(64, (size_t)TILE_ROWS * k);
        float *y = malloc(sizeof(float) * TILE_ROWS * m_rows);
        if (!tile || !y) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tiles; t++) {
                unpack_tile(w + t * TILE_ROWS * (k / 2), k, tile);
                tile_times_rows(&xq, m_rows, tile, scales + t * groups * TILE_ROWS,
                                zeros + t * groups * TILE_ROWS, k, group, y, TILE_ROWS);
                for (int64_t m = 0; m < m_rows; m++) {
                    store_out(out, out_fp32, m * ldo + t * TILE_ROWS, y + m * TILE_ROWS);
                }
            }
        }
        free(tile);
        free(y);
    }
    free(heap);
    return failed ? 2 : 0;
#else
    (void)x, (void)x_fp32, (void)m_rows, (void)w, (void)scales, (void)zeros, (void)n, (void)k;
    (void)group, (void)out, (void)ldo, (void)out_fp32, (void)threads;
    return 3;
#endif
}
