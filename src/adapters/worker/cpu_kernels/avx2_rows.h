/* AVX2 helpers the two many-row GEMMs share (prefill_gemm.c, w8a8_gemm.c): reading rows of
 * activations stored as fp32 or bf16, and the reductions their per-row scales need. */
#ifndef VILASERVE_AVX2_ROWS_H
#define VILASERVE_AVX2_ROWS_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* Eight activations from fp32 or bf16 storage, as fp32. */
static inline __m256 load8(const void *x, int x_fp32, int64_t i) {
    if (x_fp32) return _mm256_loadu_ps((const float *)x + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55));
    return _mm_cvtss_f32(m);
}

/* Four bytes as one int32, to broadcast to every lane (a row's 4 columns for vpmaddubsw). */
static inline int32_t load4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#endif
