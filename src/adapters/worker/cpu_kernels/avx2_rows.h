/* AVX2 helpers of the AVX2 builds' sources (fp32_kernels.c's AVX2 section, prefill_gemm.c,
 * w8a8_gemm.c): reading rows of activations stored as fp32 or bf16, rounding fp32 to bf16, and
 * the reductions their per-row scales need. */
#ifndef VILASERVE_AVX2_ROWS_H
#define VILASERVE_AVX2_ROWS_H

#include <immintrin.h>
#include <stdint.h>

#include "bytes.h"

/* Eight bf16 values as fp32. */
static inline __m256 load_bf16x8(const uint16_t *p) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Eight activations from fp32 or bf16 storage, as fp32. */
static inline __m256 load8(const void *x, int x_fp32, int64_t i) {
    if (x_fp32) return _mm256_loadu_ps((const float *)x + i);
    return load_bf16x8((const uint16_t *)x + i);
}

/* Eight fp32 values stored as bf16, rounded to nearest even (inputs are finite). */
static inline void store_bf16x8(uint16_t *p, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd),
                          16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(u),
                                                    _mm256_extracti128_si256(u, 1)));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55));
    return _mm_cvtss_f32(m);
}

static inline int32_t hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

#endif
