/* Shared declarations of the vilaserve CPU kernels (int4_matmul.c, matmul.c, decoder.c), and the small
 * bf16 helpers both use. Every tensor is bf16 stored as uint16_t unless said otherwise. */
#ifndef VILASERVE_KERNELS_H
#define VILASERVE_KERNELS_H

#include <immintrin.h>
#include <stdint.h>

int vs_int4_fits(int64_t n, int64_t k, int64_t group);
/* y[m, 0:n] = x[m, :] @ W^T into rows of `ldo` elements (a column slice of a wider buffer). */
int vs_int4_matmul_ld(const uint16_t *x, int64_t m_rows, const uint8_t *w, const uint16_t *scales,
                      const uint8_t *zeros, int64_t n, int64_t k, int64_t group, void *out,
                      int64_t ldo, int out_fp32, int threads);
int vs_bf16_matmul_ld(const uint16_t *x, int64_t m_rows, const uint16_t *w, int64_t n, int64_t k,
                      void *out, int64_t ldo, int out_fp32, int threads);
int vs_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t batch,
                        int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,
                        int64_t kv_batch_stride, int64_t kv_head_stride, float scale,
                        uint16_t *out, int threads);
int vs_rms_norm(const uint16_t *x, int64_t rows, int64_t dim, const uint16_t *weight, float eps,
                uint16_t *out);
int vs_rope(const uint16_t *src, int64_t batch, int64_t heads, int64_t dim, int64_t src_b,
            const uint16_t *cos, const uint16_t *sin, uint16_t *dst, int64_t dst_b,
            int64_t dst_h);

static inline __m512 bf16x16_to_ps(const uint16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 exp_ps(__m512 x) {
    /* exp(x) = 2^n * exp(r), |r| <= ln2/2; degree-6 Taylor: relative error < 3e-7. */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 bf16x16_to_ps_reg(__m256bh v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)v), 16));
}

static inline __m512 round_bf16(__m512 v) { return bf16x16_to_ps_reg(_mm512_cvtneps_pbh(v)); }

static inline void store_bf16x16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

#endif
