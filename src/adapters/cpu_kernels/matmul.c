/* W4A16 matmul for x86 CPUs with AVX-512 BF16: y[M, N] = x[M, K] (bf16) @ W[N, K]^T.
 *
 * Why this exists: PyTorch's int4 CPU kernel is compute-bound on AVX-512 machines (about a third
 * of DRAM bandwidth at batch 1). Here the inner loop is three integer ops and two `vdpbf16ps`
 * per 64 weights, so a decode step is limited by how fast the packed weights stream in.
 *
 * The trick: for a nibble q in 0..15, the 16-bit pattern 0x4300 | q is exactly bf16(128 + q).
 * Unpacking is then an AND/OR (or shift/OR) per 32 weights, and
 *     sum_k x_k (q_k - z) s  =  s * sum_k x_k (128 + q_k)  -  s (128 + z) * sum_k x_k
 * where the second term needs only the per-group sums of x, computed once per call.
 *
 * Packed layout (made by `pack_for_kernel` in cpu_kernel.py), tiles of 4 output rows:
 *   weights  uint8 [N/4][K/64][4][32]: byte j of row r in block b holds q[k0 + j] in its low
 *            nibble and q[k0 + 32 + j] in its high nibble, k0 = 64 b;
 *   scales   fp16  [N/4][K/group][4];
 *   zeros    uint8 [N/4][K/group][4].
 * Requirements (checked by the caller): N % 4 == 0, K % 64 == 0, group % 64 == 0.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define ROWS_PER_TILE 4
#define BLOCK 64
#define PREFETCH_BYTES 2048

int vs_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

static inline __m512bh low_nibbles(__m512i bytes_as_words) {
    /* (v & 0x000F) | 0x4300: ternary-logic table 0xEA is (A & B) | C. */
    return (__m512bh)_mm512_ternarylogic_epi32(bytes_as_words, _mm512_set1_epi16(0x000F),
                                               _mm512_set1_epi16(0x4300), 0xEA);
}

static inline __m512bh high_nibbles(__m512i bytes_as_words) {
    return (__m512bh)_mm512_or_si512(_mm512_srli_epi16(bytes_as_words, 4),
                                     _mm512_set1_epi16(0x4300));
}

/* Per-group sums of each x row, in fp32: sums[m * groups + g]. */
static void group_sums(const uint16_t *x, int64_t m_rows, int64_t k, int64_t group, float *sums) {
    const int64_t groups = k / group;
    for (int64_t m = 0; m < m_rows; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *p = x + m * k + g * group;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < group; i += 16) {
                __m256i h = _mm256_loadu_si256((const __m256i *)(p + i));
                acc = _mm512_add_ps(acc, _mm512_castsi512_ps(
                                             _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
            }
            sums[m * groups + g] = _mm512_reduce_add_ps(acc);
        }
    }
}

static void tile_rows(const uint16_t *x, int64_t m_rows, const uint8_t *w_tile,
                      const uint16_t *s_tile, const uint8_t *z_tile, const float *sums,
                      int64_t n_first, int64_t ldo, int64_t k, int64_t group, void *out,
                      int out_fp32) {
    const int64_t groups = k / group, blocks_per_group = group / BLOCK;
    for (int64_t m = 0; m < m_rows; m++) {
        const uint16_t *xr = x + m * k;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        __m128 offset = _mm_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            __m512 d0 = _mm512_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
            for (int64_t bb = 0; bb < blocks_per_group; bb++) {
                const int64_t b = g * blocks_per_group + bb;
                const __m512bh xlo = (__m512bh)_mm512_loadu_si512(xr + b * BLOCK);
                const __m512bh xhi = (__m512bh)_mm512_loadu_si512(xr + b * BLOCK + 32);
                const uint8_t *p = w_tile + b * (ROWS_PER_TILE * 32);
                /* Hardware prefetch alone left ~10% of DRAM bandwidth unused (measured). */
                _mm_prefetch((const char *)(p + PREFETCH_BYTES), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + PREFETCH_BYTES + 64), _MM_HINT_T0);
                __m512i v0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
                __m512i v1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32)));
                __m512i v2 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + 64)));
                __m512i v3 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + 96)));
                d0 = _mm512_dpbf16_ps(d0, low_nibbles(v0), xlo);
                d1 = _mm512_dpbf16_ps(d1, low_nibbles(v1), xlo);
                d2 = _mm512_dpbf16_ps(d2, low_nibbles(v2), xlo);
                d3 = _mm512_dpbf16_ps(d3, low_nibbles(v3), xlo);
                d0 = _mm512_dpbf16_ps(d0, high_nibbles(v0), xhi);
                d1 = _mm512_dpbf16_ps(d1, high_nibbles(v1), xhi);
                d2 = _mm512_dpbf16_ps(d2, high_nibbles(v2), xhi);
                d3 = _mm512_dpbf16_ps(d3, high_nibbles(v3), xhi);
            }
            const __m128 s = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(s_tile + g * 4)));
            int32_t z_bytes;
            __builtin_memcpy(&z_bytes, z_tile + g * 4, 4);
            const __m128 z = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(z_bytes)));
            /* s (128 + z) * sum(x over the group), for the 4 rows at once */
            offset = _mm_fmadd_ps(_mm_mul_ps(s, _mm_add_ps(z, _mm_set1_ps(128.0f))),
                                  _mm_set1_ps(sums[m * groups + g]), offset);
            acc0 = _mm512_fmadd_ps(d0, _mm512_broadcastss_ps(s), acc0);
            acc1 = _mm512_fmadd_ps(d1, _mm512_broadcastss_ps(_mm_permute_ps(s, 0x55)), acc1);
            acc2 = _mm512_fmadd_ps(d2, _mm512_broadcastss_ps(_mm_permute_ps(s, 0xAA)), acc2);
            acc3 = _mm512_fmadd_ps(d3, _mm512_broadcastss_ps(_mm_permute_ps(s, 0xFF)), acc3);
        }
        const __m128 y = _mm_sub_ps(
            _mm_setr_ps(_mm512_reduce_add_ps(acc0), _mm512_reduce_add_ps(acc1),
                        _mm512_reduce_add_ps(acc2), _mm512_reduce_add_ps(acc3)),
            offset);
        if (out_fp32) {
            _mm_storeu_ps((float *)out + m * ldo + n_first, y);
        } else {
            __m128bh yb = _mm_cvtneps_pbh(y);
            _mm_storel_epi64((__m128i *)((uint16_t *)out + m * ldo + n_first), (__m128i)yb);
        }
    }
}

/* y = x @ W^T. x: bf16 [m_rows, k]; out: bf16 or fp32 rows of `ldo` elements, columns
 * [0, n) written. Returns 0 on success. */
int vs_int4_matmul_ld(const uint16_t *x, int64_t m_rows, const uint8_t *w, const uint16_t *scales,
                       const uint8_t *zeros, int64_t n, int64_t k, int64_t group, void *out,
                       int64_t ldo, int out_fp32, int threads) {
    if (n % ROWS_PER_TILE || k % BLOCK || group % BLOCK || k % group) return 1;
    const int64_t groups = k / group, tiles = n / ROWS_PER_TILE;
    float stack_sums[2048];
    float *sums = m_rows * groups <= 2048 ? stack_sums : malloc(sizeof(float) * m_rows * groups);
    if (!sums) return 2;
    group_sums(x, m_rows, k, group, sums);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        tile_rows(x, m_rows, w + t * ROWS_PER_TILE * (k / 2), scales + t * groups * 4,
                  zeros + t * groups * 4, sums, t * ROWS_PER_TILE, ldo, k, group, out, out_fp32);
    }
    if (sums != stack_sums) free(sums);
    return 0;
}

int vs_int4_matmul(const uint16_t *x, int64_t m_rows, const uint8_t *w, const uint16_t *scales,
                   const uint8_t *zeros, int64_t n, int64_t k, int64_t group, void *out,
                   int out_fp32, int threads) {
    return vs_int4_matmul_ld(x, m_rows, w, scales, zeros, n, k, group, out, n, out_fp32, threads);
}

/* The dense weight W[n, k] = (q - z) * s, as bf16 or fp32 (prefill: one dequant + a GEMM). */
int vs_int4_dequantize(const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int64_t n,
                       int64_t k, int64_t group, void *out, int out_fp32, int threads) {
    if (n % ROWS_PER_TILE || k % BLOCK || group % BLOCK || k % group) return 1;
    const int64_t groups = k / group, blocks = k / BLOCK, tiles = n / ROWS_PER_TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *w_tile = w + t * ROWS_PER_TILE * (k / 2);
        for (int64_t r = 0; r < ROWS_PER_TILE; r++) {
            const int64_t row = t * ROWS_PER_TILE + r;
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t g = b * BLOCK / group;
                const float s = _cvtsh_ss(scales[(t * groups + g) * 4 + r]);
                const __m512 sv = _mm512_set1_ps(s);
                const __m512 offset = _mm512_set1_ps(-s * zeros[(t * groups + g) * 4 + r]);
                const __m512i v = _mm512_cvtepu8_epi16(
                    _mm256_loadu_si256((const __m256i *)(w_tile + b * ROWS_PER_TILE * 32 + r * 32)));
                const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi16(0x000F));
                const __m512i hi = _mm512_srli_epi16(v, 4);
                /* 16 values per step: lo[0:16], lo[16:32], hi[0:16], hi[16:32] */
                const __m256i parts[4] = {_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1),
                                          _mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1)};
                for (int p = 0; p < 4; p++) {
                    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(parts[p]));
                    const __m512 wv = _mm512_fmadd_ps(q, sv, offset);
                    const int64_t col = b * BLOCK + p * 16;
                    if (out_fp32) {
                        _mm512_storeu_ps((float *)out + row * k + col, wv);
                    } else {
                        _mm256_storeu_si256((__m256i *)((uint16_t *)out + row * k + col),
                                            (__m256i)_mm512_cvtneps_pbh(wv));
                    }
                }
            }
        }
    }
    return 0;
}

/* Dense bf16 y[M, N] = x[M, K] @ W[N, K]^T for few rows (decode): the 16-bit LM head, and the
 * linears of 16-bit models. PyTorch's bf16 GEMV reaches about half the DRAM bandwidth here;
 * this streams W once per call, 4 rows at a time sharing the x loads. Needs K % 32 == 0. */
static inline float dense_row_dot(const uint16_t *xr, const uint16_t *wr, int64_t k) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 32) {
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(wr + i),
                               (__m512bh)_mm512_loadu_si512(xr + i));
    }
    return _mm512_reduce_add_ps(acc);
}

int vs_bf16_matmul_ld(const uint16_t *x, int64_t m_rows, const uint16_t *w, int64_t n, int64_t k,
                       void *out, int64_t ldo, int out_fp32, int threads) {
    if (k % 32) return 1;
    const int64_t tiles = (n + ROWS_PER_TILE - 1) / ROWS_PER_TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * ROWS_PER_TILE;
        for (int64_t m = 0; m < m_rows; m++) {
            const uint16_t *xr = x + m * k;
            float y[ROWS_PER_TILE];
            if (n0 + ROWS_PER_TILE <= n) {
                const uint16_t *w0 = w + n0 * k;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t i = 0; i < k; i += 32) {
                    _mm_prefetch((const char *)(w0 + i + PREFETCH_BYTES / 2), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w0 + k + i + PREFETCH_BYTES / 2), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w0 + 2 * k + i + PREFETCH_BYTES / 2), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w0 + 3 * k + i + PREFETCH_BYTES / 2), _MM_HINT_T0);
                    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr + i);
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + i), xv);
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w0 + k + i), xv);
                    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w0 + 2 * k + i), xv);
                    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w0 + 3 * k + i), xv);
                }
                y[0] = _mm512_reduce_add_ps(a0);
                y[1] = _mm512_reduce_add_ps(a1);
                y[2] = _mm512_reduce_add_ps(a2);
                y[3] = _mm512_reduce_add_ps(a3);
            } else {
                for (int64_t r = 0; n0 + r < n; r++) y[r] = dense_row_dot(xr, w + (n0 + r) * k, k);
            }
            for (int64_t r = 0; r < ROWS_PER_TILE && n0 + r < n; r++) {
                if (out_fp32) {
                    ((float *)out)[m * ldo + n0 + r] = y[r];
                } else {
                    __m128bh yb = _mm_cvtneps_pbh(_mm_set1_ps(y[r]));
                    ((uint16_t *)out)[m * ldo + n0 + r] = (uint16_t)_mm_extract_epi16((__m128i)yb, 0);
                }
            }
        }
    }
    return 0;
}

int vs_bf16_matmul(const uint16_t *x, int64_t m_rows, const uint16_t *w, int64_t n, int64_t k,
                   void *out, int out_fp32, int threads) {
    return vs_bf16_matmul_ld(x, m_rows, w, n, k, out, n, out_fp32, threads);
}

/* ---------------------------------------------------------------------------------------------
 * Decode attention: one query per (row, head) against T cached keys/values, all bf16, fp32 math.
 * PyTorch's batched matmuls spend ~4x the memory time here (tiny, strided, shape changes every
 * step); this reads K and V once. Scores and the softmax stay fp32 (like the flash kernels).
 * Layouts: q [B, H, D]; k, v: [B, KVH, *, D] with `kv_batch_stride` / `kv_head_stride` elements;
 * out [B, H, D]. Query head h reads KV head h / (H / KVH). Needs D % 32 == 0.
 */


#define MAX_HEAD_DIM 256

int vs_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t batch,
                        int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,
                        int64_t kv_batch_stride, int64_t kv_head_stride, float scale,
                        uint16_t *out, int threads) {
    if (dim % 32 || dim > MAX_HEAD_DIM || heads % kv_heads || length < 1) return 1;
    const int64_t groups = heads / kv_heads, pairs = batch * heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (length + 16));
        if (!scores) {
#pragma omp atomic write
            failed = 2;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < pairs; bh++) {
            if (!scores) continue;
            const int64_t b = bh / heads, h = bh % heads;
            const uint16_t *qh = q + bh * dim;
            const uint16_t *kh = k + b * kv_batch_stride + (h / groups) * kv_head_stride;
            const uint16_t *vh = v + b * kv_batch_stride + (h / groups) * kv_head_stride;
            float best = -INFINITY;
            for (int64_t t = 0; t < length; t++) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t i = 0; i < dim; i += 32) {
                    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(kh + t * dim + i),
                                           (__m512bh)_mm512_loadu_si512(qh + i));
                }
                const float s = _mm512_reduce_add_ps(acc) * scale;
                scores[t] = s;
                best = s > best ? s : best;
            }
            /* exp in place, 16 at a time; the tail is padded and masked out of the sum */
            __m512 total = _mm512_setzero_ps();
            for (int64_t t = 0; t < length; t += 16) {
                const __mmask16 live = length - t >= 16 ? 0xFFFF : (__mmask16)((1u << (length - t)) - 1);
                const __m512 s = _mm512_maskz_loadu_ps(live, scores + t);
                const __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(s, _mm512_set1_ps(best))));
                _mm512_mask_storeu_ps(scores + t, live, e);
                total = _mm512_add_ps(total, e);
            }
            const float inv = 1.0f / _mm512_reduce_add_ps(total);
            __m512 acc[MAX_HEAD_DIM / 16];
            for (int64_t j = 0; j < dim / 16; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t t = 0; t < length; t++) {
                const __m512 p = _mm512_set1_ps(scores[t]);
                for (int64_t j = 0; j < dim / 16; j++) {
                    acc[j] = _mm512_fmadd_ps(p, bf16x16_to_ps(vh + t * dim + j * 16), acc[j]);
                }
            }
            for (int64_t j = 0; j < dim / 16; j++) {
                const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[j], _mm512_set1_ps(inv)));
                _mm256_storeu_si256((__m256i *)(out + bh * dim + j * 16), (__m256i)o);
            }
        }
        free(scores);
    }
    return failed;
}

/* ---------------------------------------------------------------------------------------------
 * Small decode-step ops, bit-exact with the PyTorch bf16 expressions they replace (each torch op
 * computes in fp32 and rounds to bf16 once; so do these, step by step). At batch 1 each torch op
 * costs a few microseconds of dispatch for a few kilobytes of work.
 */



/* out = weight * bf16(x * rsqrt(mean(x^2) + eps)) per row of `dim` (HF LlamaRMSNorm). */
int vs_rms_norm(const uint16_t *x, int64_t rows, int64_t dim, const uint16_t *weight, float eps,
                uint16_t *out) {
    if (dim % 16) return 1;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        __m512 sq = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 16) {
            const __m512 v = bf16x16_to_ps(xr + i);
            sq = _mm512_fmadd_ps(v, v, sq);
        }
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / dim + eps));
        for (int64_t i = 0; i < dim; i += 16) {
            const __m512 normed = round_bf16(_mm512_mul_ps(bf16x16_to_ps(xr + i), scale));
            store_bf16x16(out + r * dim + i, _mm512_mul_ps(bf16x16_to_ps(weight + i), normed));
        }
    }
    return 0;
}

/* Rotary embedding, rotate-half layout, for one position: dst[b, h] = x*cos + rot(x)*sin with
 * each product and the sum rounded to bf16 as torch does. src rows are [B, H, D] with strides
 * (src_b, D); dst rows with strides (dst_b, dst_h) -- e.g. straight into a KV-cache slot. */
int vs_rope(const uint16_t *src, int64_t batch, int64_t heads, int64_t dim, int64_t src_b,
            const uint16_t *cos, const uint16_t *sin, uint16_t *dst, int64_t dst_b,
            int64_t dst_h) {
    const int64_t half = dim / 2;
    if (half % 16) return 1;
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *x = src + b * src_b + h * dim;
            uint16_t *y = dst + b * dst_b + h * dst_h;
            for (int64_t i = 0; i < half; i += 16) {
                const __m512 x1 = bf16x16_to_ps(x + i), x2 = bf16x16_to_ps(x + half + i);
                const __m512 c1 = bf16x16_to_ps(cos + i), c2 = bf16x16_to_ps(cos + half + i);
                const __m512 s1 = bf16x16_to_ps(sin + i), s2 = bf16x16_to_ps(sin + half + i);
                /* first half: x1*c1 + (-x2)*s1; second half: x2*c2 + x1*s2 */
                const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, c1)),
                                                round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1)));
                const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, c2)),
                                                round_bf16(_mm512_mul_ps(x1, s2)));
                store_bf16x16(y + i, lo);
                store_bf16x16(y + half + i, hi);
            }
        }
    }
    return 0;
}
