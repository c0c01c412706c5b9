/* W4A16 matmul for x86 CPUs with AVX-512 VNNI: y[M, N] = x[M, K] (bf16) @ W[N, K]^T.
 *
 * Why integers: with bf16 dot products (`vdpbf16ps`) every 32 weights also cost a widening and
 * two or three bit operations to turn nibbles into bf16, and a decode step was bound by those
 * instructions, not by DRAM (~35 GB/s of int4 on a core that reads 58 GB/s). `vpdpbusd`
 * multiplies 64 unsigned bytes by 64 signed bytes, so 4-bit weights need only an AND (or a shift
 * and an AND) per 64 of them.
 *
 * The activations stay 16-bit. Each (row, group) of x is scaled to integers in [-32639, 32639]
 * (scale = max|x| / 32639), which is finer than bf16's 8-bit mantissa for every element above
 * 1/128 of the group maximum, and split into two signed bytes: x = 256 * major + minor with
 * minor in [-128, 127]. Then, exactly in int32,
 *     sum_k q_k x_k  =  256 * sum_k q_k major_k  +  sum_k q_k minor_k
 * and the group's output is  s_w * s_x * (sum_k q_k x_k  -  z * sum_k x_k).
 *
 * Packed layout (made by `pack_for_kernel` in packing.py), tiles of 16 output rows:
 *   weights  uint8 [N/16][K/8][16][4]: the 4 bytes of row r for the 8 columns k0..k0+7 hold
 *            q[k0 + j] in their low nibble and q[k0 + 4 + j] in their high nibble (j = 0..3),
 *            so one 64-byte load feeds `vpdpbusd` with 16 rows x 4 columns twice;
 *   scales   fp16  [N/16][K/group][16];
 *   zeros    uint8 [N/16][K/group][16].
 * Requirements (checked here and by the caller): N % 16 == 0, K % 64 == 0, group % 64 == 0,
 * group <= 2048 (keeps every int32 partial sum exact).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "bytes.h"
#include "kernels.h"
#include "w4a16.h"

#define PREFETCH_BYTES 2048

int vs_int4_fits(int64_t n, int64_t k, int64_t group) { return vs_w4a16_fits(n, k, group); }

static void quantize_rows(const uint16_t *x, int64_t m_rows, int64_t k, int64_t group,
                          vs_int16_rows *xq) {
    const int64_t groups = k / group;
    for (int64_t m = 0; m < m_rows; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t base = m * k + g * group;
            __m512 amax = _mm512_setzero_ps();
            for (int64_t i = 0; i < group; i += 16) {
                amax = _mm512_max_ps(amax, _mm512_abs_ps(bf16x16_to_ps(x + base + i)));
            }
            const float top = _mm512_reduce_max_ps(amax);
            const __m512 inverse = _mm512_set1_ps(top > 0.0f ? X_LEVELS / top : 0.0f);
            __m512i sum = _mm512_setzero_si512();
            for (int64_t i = 0; i < group; i += 16) {
                const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(bf16x16_to_ps(x + base + i), inverse));
                /* minor = ((v + 128) & 255) - 128, major = (v - minor) >> 8: both in [-128, 127] */
                const __m512i minor = _mm512_sub_epi32(
                    _mm512_and_si512(_mm512_add_epi32(v, _mm512_set1_epi32(128)),
                                     _mm512_set1_epi32(255)),
                    _mm512_set1_epi32(128));
                const __m512i major = _mm512_srai_epi32(_mm512_sub_epi32(v, minor), 8);
                _mm_storeu_si128((__m128i *)(xq->minor + base + i), _mm512_cvtepi32_epi8(minor));
                _mm_storeu_si128((__m128i *)(xq->major + base + i), _mm512_cvtepi32_epi8(major));
                sum = _mm512_add_epi32(sum, v);
            }
            xq->scale[m * groups + g] = top / X_LEVELS;
            xq->sum[m * groups + g] = _mm512_reduce_add_epi32(sum);
        }
    }
}

static inline __m512i broadcast4(const int8_t *p) { return _mm512_set1_epi32(load4(p)); }

/* One tile: rows [n_first, n_first + 16) for every x row. Two column chunks per iteration give
 * the core 8 independent accumulator chains, enough to hide `vpdpbusd`'s latency; a single
 * weight stream per thread kept DRAM reads faster than two tiles side by side (measured). */
static void tile_rows(const vs_int16_rows *xq, int64_t m_rows, const uint8_t *w,
                      const uint16_t *scales, const uint8_t *zeros, int64_t n_first, int64_t ldo,
                      int64_t k, int64_t group, void *out, int out_fp32) {
    const int64_t groups = k / group;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int64_t m = 0; m < m_rows; m++) {
        const int8_t *major = xq->major + m * k, *minor = xq->minor + m * k;
        __m512 y = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            /* acc[c][part]: chunk c of the pair; parts: major x low nibbles, major x high,
             * minor x low, minor x high. */
            __m512i acc[2][4];
            for (int c = 0; c < 2; c++) {
                for (int i = 0; i < 4; i++) acc[c][i] = _mm512_setzero_si512();
            }
            for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 2 * CHUNK) {
                const uint8_t *p = w + k0 * TILE_ROWS / 2;
                /* Hardware prefetch alone left DRAM bandwidth unused (measured). */
                _mm_prefetch((const char *)(p + PREFETCH_BYTES), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + PREFETCH_BYTES + 64), _MM_HINT_T0);
                for (int c = 0; c < 2; c++) {
                    const int64_t kc = k0 + c * CHUNK;
                    const __m512i v = _mm512_loadu_si512(p + c * 64);
                    const __m512i lo = _mm512_and_si512(v, nibble);
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                    acc[c][0] = _mm512_dpbusd_epi32(acc[c][0], lo, broadcast4(major + kc));
                    acc[c][1] = _mm512_dpbusd_epi32(acc[c][1], hi, broadcast4(major + kc + 4));
                    acc[c][2] = _mm512_dpbusd_epi32(acc[c][2], lo, broadcast4(minor + kc));
                    acc[c][3] = _mm512_dpbusd_epi32(acc[c][3], hi, broadcast4(minor + kc + 4));
                }
            }
            const __m512i major_dot = _mm512_add_epi32(
                _mm512_add_epi32(acc[0][0], acc[0][1]), _mm512_add_epi32(acc[1][0], acc[1][1]));
            const __m512i minor_dot = _mm512_add_epi32(
                _mm512_add_epi32(acc[0][2], acc[0][3]), _mm512_add_epi32(acc[1][2], acc[1][3]));
            __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(major_dot, 8), minor_dot);
            const __m512i z =
                _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + g * TILE_ROWS)));
            dot = _mm512_sub_epi32(
                dot, _mm512_mullo_epi32(z, _mm512_set1_epi32(xq->sum[m * groups + g])));
            const __m512 s =
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + g * TILE_ROWS)));
            y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                _mm512_mul_ps(s, _mm512_set1_ps(xq->scale[m * groups + g])), y);
        }
        if (out_fp32) {
            _mm512_storeu_ps((float *)out + m * ldo + n_first, y);
        } else {
            store_bf16x16((uint16_t *)out + m * ldo + n_first, y);
        }
    }
}

/* y = x @ W^T. x: bf16 [m_rows, k]; out: bf16 or fp32 rows of `ldo` elements, columns
 * [0, n) written. Returns 0 on success. */
int vs_int4_matmul_ld(const uint16_t *x, int64_t m_rows, const uint8_t *w, const uint16_t *scales,
                      const uint8_t *zeros, int64_t n, int64_t k, int64_t group, void *out,
                      int64_t ldo, int out_fp32, int threads) {
    if (!vs_int4_fits(n, k, group)) return 1;
    const int64_t groups = k / group, tiles = n / TILE_ROWS;
    vs_int16_rows_stack stack;
    vs_int16_rows xq;
    void *heap;
    if (vs_int16_rows_at(&xq, &stack, m_rows * k, m_rows * groups, &heap)) return 2;
    quantize_rows(x, m_rows, k, group, &xq);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        tile_rows(&xq, m_rows, w + t * TILE_ROWS * (k / 2), scales + t * groups * TILE_ROWS,
                  zeros + t * groups * TILE_ROWS, t * TILE_ROWS, ldo, k, group, out, out_fp32);
    }
    free(heap);
    return 0;
}

int vs_int4_matmul(const uint16_t *x, int64_t m_rows, const uint8_t *w, const uint16_t *scales,
                   const uint8_t *zeros, int64_t n, int64_t k, int64_t group, void *out,
                   int out_fp32, int threads) {
    return vs_int4_matmul_ld(x, m_rows, w, scales, zeros, n, k, group, out, n, out_fp32, threads);
}

/* The dense weight W[n, k] = (q - z) * s, as bf16 or fp32 (prefill: one dequant + a GEMM).
 * Row r's 4 bytes of 8 consecutive column-chunks are 64 bytes apart: one gather collects the 64
 * columns of a block, and an interleave of its low and high nibbles puts them in order. */
int vs_int4_dequantize(const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int64_t n,
                       int64_t k, int64_t group, void *out, int out_fp32, int threads) {
    if (!vs_int4_fits(n, k, group)) return 1;
    const int64_t groups = k / group, tiles = n / TILE_ROWS;
    const __m256i chunk_offsets = _mm256_setr_epi32(0, 64, 128, 192, 256, 320, 384, 448);
    const __m512i in_order = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22,
                                               7, 23);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *w_tile = w + t * TILE_ROWS * (k / 2);
        for (int64_t r = 0; r < TILE_ROWS; r++) {
            const int64_t row = t * TILE_ROWS + r;
            for (int64_t k0 = 0; k0 < k; k0 += 64) {
                const int64_t g = k0 / group, at = (t * groups + g) * TILE_ROWS + r;
                const float s = _cvtsh_ss(scales[at]);
                const __m512 sv = _mm512_set1_ps(s), offset = _mm512_set1_ps(-s * zeros[at]);
                const __m256i packed = _mm256_i32gather_epi32(
                    (const int *)(w_tile + k0 * TILE_ROWS / 2 + r * 4), chunk_offsets, 1);
                const __m256i lo = _mm256_and_si256(packed, nibble);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
                const __m512i q = _mm512_permutex2var_epi32(_mm512_castsi256_si512(lo), in_order,
                                                            _mm512_castsi256_si512(hi));
                const __m128i parts[4] = {
                    _mm512_castsi512_si128(q), _mm512_extracti32x4_epi32(q, 1),
                    _mm512_extracti32x4_epi32(q, 2), _mm512_extracti32x4_epi32(q, 3)};
                for (int p = 0; p < 4; p++) {
                    const __m512 wv = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[p])), sv, offset);
                    const int64_t col = row * k + k0 + p * 16;
                    if (out_fp32) {
                        _mm512_storeu_ps((float *)out + col, wv);
                    } else {
                        store_bf16x16((uint16_t *)out + col, wv);
                    }
                }
            }
        }
    }
    return 0;
}
