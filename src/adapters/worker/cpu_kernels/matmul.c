/* The dense bf16 kernels of a decode step on x86 CPUs with AVX-512 BF16: the 16-bit matmul for
 * few rows (LM head, 16-bit models), attention over the cache, RMSNorm and RoPE. The 4-bit
 * matmul lives in int4_matmul.c.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define ROWS_PER_TILE 4
#define PREFETCH_BYTES 2048

int vs_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("fma");
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
 * (src_b, D); dst rows with strides (dst_b, dst_h) -- e.g. straight into a KV-cache row. */
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
