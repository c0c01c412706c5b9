/* Decode kernels for CPUs without native bf16 arithmetic, in fp32: x86 with AVX2 + FMA + F16C
 * (Intel Haswell on, AMD Zen 1-3; AVX-512 machines too) and ARM64 with NEON (with or without
 * the dot-product extension: Graviton, Ampere, Apple silicon, Jetson). One source; the compiler
 * flags pick the ISA sections (`-mavx2 -mfma -mf16c`, or aarch64 with `+dotprod` or without).
 *
 * Activations are fp32 (or bf16 in, `x_fp32 == 0`), outputs fp32 or bf16: where bf16 arithmetic
 * is emulated the worker computes in fp32, while the weights stay 4-bit or 16-bit in memory,
 * which is what decode streams.
 *
 * W4A16, y[M, N] = x[M, K] @ W[N, K]^T, with the very packing of the AVX-512 kernel
 * (int4_matmul.c: tiles of 16 rows, uint8 [N/16][K/8][16][4], fp16 scales and uint8 zeros
 * [N/16][K/group][16]) and its numerics: each (row, group) of x becomes exact 16-bit integers
 * split into two signed bytes, x = 256 * major + minor, so the dot products run on integers:
 *   AVX2:          `vpmaddubsw` (nibbles x signed bytes -> int16 pairs, |sum| <= 3840, so
 *                  eight add up without overflow), one `vpmaddwd` per 32 columns to widen;
 *   NEON dotprod:  `sdot`, four columns per int32 lane, as VNNI;
 *   NEON:          `smull` + `sadalp`, the same sums in two steps.
 * On ARM CPUs with the BF16 extension (`+bf16` builds) the dense bf16 matmul below uses
 * `bfdot` on x rounded to bf16 once per call (the precision of the bf16 worker path).
 *
 * Dense, y = x @ W^T with W bf16 or fp16 [N, K] (16-bit models, the LM head): W streamed once
 * per call, widened to fp32 in registers, 4 rows of W sharing each load of x. The same with W
 * in int8 and one fp32 scale per row (the tied embedding table that is also the LM head of a
 * W4A16 model, `--embedding-bits 8`): half the bytes of the 16-bit head.
 *
 * The decoder, `vsf_decode_layers`: one decode position through every layer in one call (as
 * decoder.c does in bf16 on AVX-512), in fp32 as PyTorch's fp32 path computes it: RMSNorm,
 * rotary, the cache write, attention, SiLU * up, the residual adds and Qwen2's q/k/v biases,
 * around the matmuls.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include "plan.h"
#include "w4a16.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include "avx2_rows.h"
#define VS_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define VS_NEON 1
#else
#error "fp32_kernels.c needs AVX2 + FMA + F16C (x86-64) or NEON (aarch64)"
#endif

#define PREFETCH_BYTES 4096
#define DENSE_ROWS 4

/* ------------------------------------------------------------------ vector primitives (ISA) */
#if VS_AVX2
typedef __m256 vf;
enum { VL = 8 };
static inline vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vf_set1(float x) { return _mm256_set1_ps(x); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); } /* a * b + c */
static inline vf vf_abs(vf v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
static inline float vf_sum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static inline float vf_hmax(vf v) { return hmax8(v); }
static inline vf vf_round(vf v) {
    return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vf vf_pow2i(vf n) { /* 2^n for integral n in [-126, 127] */
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
static inline vf vf_load_bf16(const uint16_t *p) { return load_bf16x8(p); }
static inline vf vf_load_fp16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline void vf_store_bf16(uint16_t *p, vf v) { store_bf16x8(p, v); }
static inline vf vf_load_i8(const int8_t *p) { /* VL int8 values, widened */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline void prefetch(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }
#elif VS_NEON
typedef float32x4_t vf;
enum { VL = 4 };
static inline vf vf_load(const float *p) { return vld1q_f32(p); }
static inline void vf_store(float *p, vf v) { vst1q_f32(p, v); }
static inline vf vf_set1(float x) { return vdupq_n_f32(x); }
static inline vf vf_add(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vf_sub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vf_mul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vf_div(vf a, vf b) { return vdivq_f32(a, b); }
static inline vf vf_max(vf a, vf b) { return vmaxq_f32(a, b); }
static inline vf vf_min(vf a, vf b) { return vminq_f32(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline vf vf_abs(vf v) { return vabsq_f32(v); }
static inline float vf_sum(vf v) { return vaddvq_f32(v); }
static inline float vf_hmax(vf v) { return vmaxvq_f32(v); }
static inline vf vf_round(vf v) { return vrndnq_f32(v); }
static inline vf vf_pow2i(vf n) {
    const int32x4_t e = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(e, 23));
}
static inline vf vf_load_bf16(const uint16_t *p) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
}
static inline vf vf_load_fp16(const uint16_t *p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}
static inline void vf_store_bf16(uint16_t *p, vf v) {
    uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    u = vshrq_n_u32(vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7FFF)), odd), 16);
    vst1_u16(p, vmovn_u32(u));
}
static inline vf vf_load_i8(const int8_t *p) {
    int32_t four;
    memcpy(&four, p, 4); /* exactly VL bytes: never past the end of a row */
    const int16x8_t wide = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
}
static inline void prefetch(const void *p) { __builtin_prefetch(p); }
#endif

static inline vf vf_zero(void) { return vf_set1(0.0f); }

/* exp(x) = 2^n * exp(r), |r| <= ln2/2; degree-6 Taylor: relative error < 3e-7. */
static inline vf vf_exp(vf x) {
    x = vf_min(vf_max(x, vf_set1(-87.0f)), vf_set1(88.0f));
    const vf n = vf_round(vf_mul(x, vf_set1(1.44269504f)));
    vf r = vf_sub(x, vf_mul(n, vf_set1(0.693145752f)));
    r = vf_sub(r, vf_mul(n, vf_set1(1.42860677e-6f)));
    vf p = vf_set1(1.0f / 720);
    p = vf_fma(p, r, vf_set1(1.0f / 120));
    p = vf_fma(p, r, vf_set1(1.0f / 24));
    p = vf_fma(p, r, vf_set1(1.0f / 6));
    p = vf_fma(p, r, vf_set1(0.5f));
    p = vf_fma(p, r, vf_set1(1.0f));
    p = vf_fma(p, r, vf_set1(1.0f));
    return vf_mul(p, vf_pow2i(n));
}

/* VL activations from fp32 or bf16 storage. */
static inline vf vf_load_x(const void *x, int x_fp32, int64_t i) {
    return x_fp32 ? vf_load((const float *)x + i) : vf_load_bf16((const uint16_t *)x + i);
}

static inline void vf_store_y(void *out, int out_fp32, int64_t at, vf v) {
    if (out_fp32) {
        vf_store((float *)out + at, v);
    } else {
        vf_store_bf16((uint16_t *)out + at, v);
    }
}

static inline uint16_t to_bf16(float f) { /* round to nearest even (inputs are finite) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline float fp16_to_float(uint16_t h) {
#if VS_AVX2
    return _cvtsh_ss(h);
#else
    __fp16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#endif
}

int vsf_cpu_supported(void) {
#if VS_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return 1; /* NEON is part of every aarch64 CPU; the dotprod build is chosen by HWCAP */
#endif
}

int vsf_int4_fits(int64_t n, int64_t k, int64_t group) { return vs_w4a16_fits(n, k, group); }

/* ------------------------------------------------------------------------ W4A16 matmul */

#if VS_AVX2
static void quantize_rows(const void *x, int x_fp32, int64_t m_rows, int64_t k, int64_t group,
                          vs_int16_rows *xq) {
    const int64_t groups = k / group;
    for (int64_t m = 0; m < m_rows; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t base = m * k + g * group;
            vf amax = vf_zero();
            for (int64_t i = 0; i < group; i += VL) {
                amax = vf_max(amax, vf_abs(vf_load_x(x, x_fp32, base + i)));
            }
            const float top = vf_hmax(amax);
            const vf inverse = vf_set1(top > 0.0f ? X_LEVELS / top : 0.0f);
            __m256i sum = _mm256_setzero_si256();
            for (int64_t i = 0; i < group; i += VL) {
                const __m256i v = _mm256_cvtps_epi32(vf_mul(vf_load_x(x, x_fp32, base + i), inverse));
                /* minor = ((v + 128) & 255) - 128, major = (v - minor) >> 8: both in [-128, 127] */
                const __m256i minor = _mm256_sub_epi32(
                    _mm256_and_si256(_mm256_add_epi32(v, _mm256_set1_epi32(128)),
                                     _mm256_set1_epi32(255)),
                    _mm256_set1_epi32(128));
                const __m256i major = _mm256_srai_epi32(_mm256_sub_epi32(v, minor), 8);
                const __m128i minor16 = _mm_packs_epi32(_mm256_castsi256_si128(minor),
                                                        _mm256_extracti128_si256(minor, 1));
                const __m128i major16 = _mm_packs_epi32(_mm256_castsi256_si128(major),
                                                        _mm256_extracti128_si256(major, 1));
                _mm_storel_epi64((__m128i *)(xq->minor + base + i), _mm_packs_epi16(minor16, minor16));
                _mm_storel_epi64((__m128i *)(xq->major + base + i), _mm_packs_epi16(major16, major16));
                sum = _mm256_add_epi32(sum, v);
            }
            xq->scale[m * groups + g] = top / X_LEVELS;
            xq->sum[m * groups + g] = hsum8i(sum);
        }
    }
}
#else
static void quantize_rows(const void *x, int x_fp32, int64_t m_rows, int64_t k, int64_t group,
                          vs_int16_rows *xq) {
    const int64_t groups = k / group;
    for (int64_t m = 0; m < m_rows; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t base = m * k + g * group;
            vf amax = vf_zero();
            for (int64_t i = 0; i < group; i += VL) {
                amax = vf_max(amax, vf_abs(vf_load_x(x, x_fp32, base + i)));
            }
            const float top = vf_hmax(amax);
            const float inverse = top > 0.0f ? X_LEVELS / top : 0.0f;
            int32_t sum = 0;
            for (int64_t i = 0; i < group; i += VL) {
                float lane[VL];
                vf_store(lane, vf_round(vf_mul(vf_load_x(x, x_fp32, base + i), vf_set1(inverse))));
                for (int j = 0; j < VL; j++) {
                    /* minor = ((v + 128) & 255) - 128, major = (v - minor) >> 8: both int8 */
                    const int32_t v = (int32_t)lane[j];
                    const int32_t minor = ((v + 128) & 255) - 128;
                    xq->minor[base + i + j] = (int8_t)minor;
                    xq->major[base + i + j] = (int8_t)((v - minor) >> 8);
                    sum += v;
                }
            }
            xq->scale[m * groups + g] = top / X_LEVELS;
            xq->sum[m * groups + g] = sum;
        }
    }
}
#endif

/* One group of one tile (16 rows) for one x row: the 16 exact integer sums sum_k q_k x_k (x in
 * its 16-bit integer form), then  y += s_w * s_x * (sum_k q_k x_k - z * sum_k x_k). */
#if VS_AVX2
static void tile_group(const int8_t *major, const int8_t *minor, const uint8_t *w,
                       int64_t k_first, int64_t group, const uint16_t *scales,
                       const uint8_t *zeros, int32_t xsum, float sx, float y[TILE_ROWS]) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1), shift8 = _mm256_set1_epi16(256);
    __m256i dot0 = _mm256_setzero_si256(), dot1 = _mm256_setzero_si256();
    for (int64_t k0 = k_first; k0 < k_first + group; k0 += 4 * CHUNK) {
        __m256i hi0 = _mm256_setzero_si256(), lo0 = hi0, hi1 = hi0, lo1 = hi0;
        const uint8_t *p = w + k0 * TILE_ROWS / 2;
        for (int c = 0; c < 4; c++) prefetch(p + PREFETCH_BYTES + 64 * c);
        for (int c = 0; c < 4; c++) {
            const int64_t kc = k0 + c * CHUNK;
            const __m256i a_lo = _mm256_set1_epi32(load4(major + kc));
            const __m256i a_hi = _mm256_set1_epi32(load4(major + kc + 4));
            const __m256i b_lo = _mm256_set1_epi32(load4(minor + kc));
            const __m256i b_hi = _mm256_set1_epi32(load4(minor + kc + 4));
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(p + c * 64));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + c * 64 + 32));
            const __m256i l0 = _mm256_and_si256(v0, nibble);
            const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), nibble);
            const __m256i l1 = _mm256_and_si256(v1, nibble);
            const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), nibble);
            hi0 = _mm256_add_epi16(hi0, _mm256_maddubs_epi16(l0, a_lo));
            hi0 = _mm256_add_epi16(hi0, _mm256_maddubs_epi16(h0, a_hi));
            lo0 = _mm256_add_epi16(lo0, _mm256_maddubs_epi16(l0, b_lo));
            lo0 = _mm256_add_epi16(lo0, _mm256_maddubs_epi16(h0, b_hi));
            hi1 = _mm256_add_epi16(hi1, _mm256_maddubs_epi16(l1, a_lo));
            hi1 = _mm256_add_epi16(hi1, _mm256_maddubs_epi16(h1, a_hi));
            lo1 = _mm256_add_epi16(lo1, _mm256_maddubs_epi16(l1, b_lo));
            lo1 = _mm256_add_epi16(lo1, _mm256_maddubs_epi16(h1, b_hi));
        }
        dot0 = _mm256_add_epi32(dot0, _mm256_add_epi32(_mm256_madd_epi16(hi0, shift8),
                                                       _mm256_madd_epi16(lo0, ones)));
        dot1 = _mm256_add_epi32(dot1, _mm256_add_epi32(_mm256_madd_epi16(hi1, shift8),
                                                       _mm256_madd_epi16(lo1, ones)));
    }
    const __m256i xs = _mm256_set1_epi32(xsum);
    const __m256 sxv = _mm256_set1_ps(sx);
    __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)zeros));
    dot0 = _mm256_sub_epi32(dot0, _mm256_mullo_epi32(z, xs));
    z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + 8)));
    dot1 = _mm256_sub_epi32(dot1, _mm256_mullo_epi32(z, xs));
    const __m256 s0 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)scales)), sxv);
    const __m256 s1 =
        _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 8))), sxv);
    _mm256_storeu_ps(y, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot0), s0, _mm256_loadu_ps(y)));
    _mm256_storeu_ps(y + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot1), s1, _mm256_loadu_ps(y + 8)));
}
#elif VS_NEON
/* acc[i] += four int8 products of row i's 4 nibble bytes (as int8) and the 4 x bytes. */
static inline int32x4_t dot4(int32x4_t acc, int8x16_t w, int8x16_t x) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, w, x);
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(w), vget_low_s8(x));
    const int16x8_t hi = vmull_high_s8(w, x);
    return vpadalq_s16(acc, vpaddq_s16(lo, hi));
#endif
}

static void tile_group(const int8_t *major, const int8_t *minor, const uint8_t *w,
                       int64_t k_first, int64_t group, const uint16_t *scales,
                       const uint8_t *zeros, int32_t xsum, float sx, float y[TILE_ROWS]) {
    const uint8x16_t nibble = vdupq_n_u8(0x0F);
    int32x4_t big[4], small[4]; /* rows 4r..4r+3: major and minor sums */
    for (int r = 0; r < 4; r++) big[r] = small[r] = vdupq_n_s32(0);
    for (int64_t kc = k_first; kc < k_first + group; kc += CHUNK) {
        const uint8_t *p = w + kc * TILE_ROWS / 2;
        prefetch(p + PREFETCH_BYTES);
        const int8x16_t a_lo = vreinterpretq_s8_s32(vdupq_n_s32(load4(major + kc)));
        const int8x16_t a_hi = vreinterpretq_s8_s32(vdupq_n_s32(load4(major + kc + 4)));
        const int8x16_t b_lo = vreinterpretq_s8_s32(vdupq_n_s32(load4(minor + kc)));
        const int8x16_t b_hi = vreinterpretq_s8_s32(vdupq_n_s32(load4(minor + kc + 4)));
        for (int r = 0; r < 4; r++) {
            const uint8x16_t v = vld1q_u8(p + 16 * r);
            const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, nibble));
            const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
            big[r] = dot4(dot4(big[r], lo, a_lo), hi, a_hi);
            small[r] = dot4(dot4(small[r], lo, b_lo), hi, b_hi);
        }
    }
    const uint16x8_t z16[2] = {vmovl_u8(vld1_u8(zeros)), vmovl_u8(vld1_u8(zeros + 8))};
    const int32x4_t xs = vdupq_n_s32(xsum);
    for (int r = 0; r < 4; r++) {
        const uint16x8_t zr = z16[r / 2];
        const int32x4_t z = vreinterpretq_s32_u32(
            vmovl_u16(r % 2 ? vget_high_u16(zr) : vget_low_u16(zr)));
        const int32x4_t dot = vmlsq_s32(vaddq_s32(vshlq_n_s32(big[r], 8), small[r]), z, xs);
        const float32x4_t s =
            vmulq_n_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(scales + 4 * r))), sx);
        vst1q_f32(y + 4 * r, vfmaq_f32(vld1q_f32(y + 4 * r), vcvtq_f32_s32(dot), s));
    }
}
#endif

static void tile_rows(const vs_int16_rows *xq, int64_t m_rows, const uint8_t *w,
                      const uint16_t *scales, const uint8_t *zeros, int64_t n_first, int64_t ldo,
                      int64_t k, int64_t group, void *out, int out_fp32) {
    const int64_t groups = k / group;
    for (int64_t m = 0; m < m_rows; m++) {
        float y[TILE_ROWS] = {0};
        for (int64_t g = 0; g < groups; g++) {
            tile_group(xq->major + m * k, xq->minor + m * k, w, g * group, group,
                       scales + g * TILE_ROWS, zeros + g * TILE_ROWS, xq->sum[m * groups + g],
                       xq->scale[m * groups + g], y);
        }
        for (int r = 0; r < TILE_ROWS; r += VL) {
            vf_store_y(out, out_fp32, m * ldo + n_first + r, vf_load(y + r));
        }
    }
}

/* y = x @ W^T. x: fp32 or bf16 [m_rows, k]; out: fp32 or bf16 rows of `ldo` elements, columns
 * [0, n) written. Returns 0 on success. */
int vsf_int4_matmul(const void *x, int x_fp32, int64_t m_rows, const uint8_t *w,
                    const uint16_t *scales, const uint8_t *zeros, int64_t n, int64_t k,
                    int64_t group, void *out, int64_t ldo, int out_fp32, int threads) {
    if (!vsf_int4_fits(n, k, group)) return 1;
    const int64_t groups = k / group, tiles = n / TILE_ROWS;
    vs_int16_rows_stack stack;
    vs_int16_rows xq;
    void *heap;
    if (vs_int16_rows_at(&xq, &stack, m_rows * k, m_rows * groups, &heap)) return 2;
    quantize_rows(x, x_fp32, m_rows, k, group, &xq);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        tile_rows(&xq, m_rows, w + t * TILE_ROWS * (k / 2), scales + t * groups * TILE_ROWS,
                  zeros + t * groups * TILE_ROWS, t * TILE_ROWS, ldo, k, group, out, out_fp32);
    }
    free(heap);
    return 0;
}

/* The dense weight W[n, k] = (q - z) * s as fp32 or bf16 (prefill: one dequantize + a GEMM). */
int vsf_int4_dequantize(const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int64_t n,
                        int64_t k, int64_t group, void *out, int out_fp32, int threads) {
    if (!vsf_int4_fits(n, k, group)) return 1;
    const int64_t groups = k / group, tiles = n / TILE_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *w_tile = w + t * TILE_ROWS * (k / 2);
        for (int64_t r = 0; r < TILE_ROWS; r++) {
            const int64_t row = t * TILE_ROWS + r;
            for (int64_t k0 = 0; k0 < k; k0 += CHUNK) {
                const int64_t at = (t * groups + k0 / group) * TILE_ROWS + r;
                const float s = fp16_to_float(scales[at]), offset = -s * zeros[at];
                const uint8_t *bytes = w_tile + k0 * TILE_ROWS / 2 + r * 4;
                /* low nibbles: columns k0..k0+3, high nibbles: k0+4..k0+7 */
                float col[CHUNK];
                for (int j = 0; j < 4; j++) {
                    col[j] = (float)(bytes[j] & 15) * s + offset;
                    col[j + 4] = (float)(bytes[j] >> 4) * s + offset;
                }
                for (int j = 0; j < CHUNK; j += VL) {
                    vf_store_y(out, out_fp32, row * k + k0 + j, vf_load(col + j));
                }
            }
        }
    }
    return 0;
}

/* --------------------------------------------------------------------- dense 16-bit matmul */

static inline vf load_w(const uint16_t *w, int w_fp16) {
    return w_fp16 ? vf_load_fp16(w) : vf_load_bf16(w);
}

#if VS_NEON && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
/* bf16 W with BFDOT: eight bf16 products per instruction into four fp32 lanes. */
static int dense_bfdot(const float *x, int64_t m_rows, const uint16_t *w, int64_t n, int64_t k,
                       void *out, int64_t ldo, int out_fp32, int threads) {
    uint16_t *xb = malloc(2 * m_rows * k);
    if (!xb) return 2;
    for (int64_t i = 0; i < m_rows * k; i += VL) vf_store_bf16(xb + i, vf_load(x + i));
    const int64_t tiles = (n + DENSE_ROWS - 1) / DENSE_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * DENSE_ROWS, rows = n - n0 < DENSE_ROWS ? n - n0 : DENSE_ROWS;
        for (int64_t m = 0; m < m_rows; m++) {
            float32x4_t acc[DENSE_ROWS];
            for (int r = 0; r < DENSE_ROWS; r++) acc[r] = vdupq_n_f32(0.0f);
            for (int64_t i = 0; i < k; i += 8) {
                const bfloat16x8_t xv = vreinterpretq_bf16_u16(vld1q_u16(xb + m * k + i));
                for (int r = 0; r < DENSE_ROWS; r++) {
                    const uint16_t *wr = w + (n0 + (r < rows ? r : rows - 1)) * k + i;
                    prefetch(wr + PREFETCH_BYTES / 2);
                    acc[r] = vbfdotq_f32(acc[r], vreinterpretq_bf16_u16(vld1q_u16(wr)), xv);
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                const float y = vaddvq_f32(acc[r]);
                if (out_fp32) {
                    ((float *)out)[m * ldo + n0 + r] = y;
                } else {
                    ((uint16_t *)out)[m * ldo + n0 + r] = to_bf16(y);
                }
            }
        }
    }
    free(xb);
    return 0;
}
#endif

/* Dense y[M, N] = x[M, K] @ W[N, K]^T for few rows; W bf16 (or fp16 with `w_fp16`), x and y
 * fp32 or bf16. Needs K % 8 == 0. Two rows of x share each pass over 4 rows of W. */
int vsf_dense_matmul(const void *x, int x_fp32, int64_t m_rows, const uint16_t *w, int w_fp16,
                     int64_t n, int64_t k, void *out, int64_t ldo, int out_fp32, int threads) {
    if (k % 8) return 1;
    float *xf = NULL;
    if (!x_fp32) { /* widen once: every W row reads x again */
        xf = malloc(sizeof(float) * m_rows * k);
        if (!xf) return 2;
        for (int64_t i = 0; i < m_rows * k; i += VL) vf_store(xf + i, vf_load_x(x, 0, i));
    }
    const float *xs = x_fp32 ? (const float *)x : xf;
#if VS_NEON && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
    if (!w_fp16) {
        const int status = dense_bfdot(xs, m_rows, w, n, k, out, ldo, out_fp32, threads);
        free(xf);
        return status;
    }
#endif
    const int64_t tiles = (n + DENSE_ROWS - 1) / DENSE_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * DENSE_ROWS, rows = n - n0 < DENSE_ROWS ? n - n0 : DENSE_ROWS;
        for (int64_t m0 = 0; m0 < m_rows; m0 += 2) {
            const int64_t mm = m_rows - m0 < 2 ? m_rows - m0 : 2;
            vf acc[2][DENSE_ROWS];
            for (int a = 0; a < 2; a++) {
                for (int r = 0; r < DENSE_ROWS; r++) acc[a][r] = vf_zero();
            }
            const float *x0 = xs + m0 * k, *x1 = xs + (m0 + mm - 1) * k;
            for (int64_t i = 0; i < k; i += VL) {
                const vf xv0 = vf_load(x0 + i), xv1 = vf_load(x1 + i);
                for (int r = 0; r < DENSE_ROWS; r++) {
                    const uint16_t *wr = w + (n0 + (r < rows ? r : rows - 1)) * k + i;
                    prefetch(wr + PREFETCH_BYTES / 2);
                    const vf wv = load_w(wr, w_fp16);
                    acc[0][r] = vf_fma(wv, xv0, acc[0][r]);
                    acc[1][r] = vf_fma(wv, xv1, acc[1][r]);
                }
            }
            for (int64_t a = 0; a < mm; a++) {
                for (int64_t r = 0; r < rows; r++) {
                    const float y = vf_sum(acc[a][r]);
                    const int64_t at = (m0 + a) * ldo + n0 + r;
                    if (out_fp32) {
                        ((float *)out)[at] = y;
                    } else {
                        ((uint16_t *)out)[at] = to_bf16(y);
                    }
                }
            }
        }
    }
    free(xf);
    return 0;
}

/* y[M, N] = x[M, K] @ (scale[n] * W[n, :])^T for few rows; W int8 [N, K], scale fp32 [N];
 * x and y fp32. Needs K % 8 == 0. */
int vsf_int8_matmul(const float *x, int64_t m_rows, const int8_t *w, const float *scale,
                    int64_t n, int64_t k, float *out, int64_t ldo, int threads) {
    if (k % 8) return 1;
    const int64_t tiles = (n + DENSE_ROWS - 1) / DENSE_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * DENSE_ROWS, rows = n - n0 < DENSE_ROWS ? n - n0 : DENSE_ROWS;
        for (int64_t m = 0; m < m_rows; m++) {
            vf acc[DENSE_ROWS];
            for (int r = 0; r < DENSE_ROWS; r++) acc[r] = vf_zero();
            const float *xr = x + m * k;
#if VS_NEON
            /* 16 weights per load: widening 4 bytes at a time cost more than the bytes (the
             * head is instruction-bound on NEON otherwise) */
            for (int64_t i = 0; k % 16 == 0 && i < k; i += 16) {
                const float32x4_t x0 = vld1q_f32(xr + i), x1 = vld1q_f32(xr + i + 4);
                const float32x4_t x2 = vld1q_f32(xr + i + 8), x3 = vld1q_f32(xr + i + 12);
                for (int r = 0; r < DENSE_ROWS; r++) {
                    const int8_t *wr = w + (n0 + (r < rows ? r : rows - 1)) * k + i;
                    prefetch(wr + PREFETCH_BYTES);
                    const int8x16_t b = vld1q_s8(wr);
                    const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_high_s8(b);
                    acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), x0);
                    acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(vmovl_high_s16(lo)), x1);
                    acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), x2);
                    acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(vmovl_high_s16(hi)), x3);
                }
            }
            for (int64_t i = 0; k % 16 != 0 && i < k; i += VL) {
#else
            for (int64_t i = 0; i < k; i += VL) {
#endif
                const vf xv = vf_load(xr + i);
                for (int r = 0; r < DENSE_ROWS; r++) {
                    const int8_t *wr = w + (n0 + (r < rows ? r : rows - 1)) * k + i;
                    prefetch(wr + PREFETCH_BYTES);
                    acc[r] = vf_fma(vf_load_i8(wr), xv, acc[r]);
                }
            }
            for (int64_t r = 0; r < rows; r++) out[m * ldo + n0 + r] = vf_sum(acc[r]) * scale[n0 + r];
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- the one-call decoder (fp32) */

/* HF LlamaRMSNorm in fp32: w * (x * rsqrt(mean(x^2) + eps)). dim % VL == 0. */
static void rms_norm32(const float *x, int64_t rows, int64_t dim, const float *w, float eps,
                       float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        vf ss = vf_zero();
        for (int64_t i = 0; i < dim; i += VL) {
            const vf v = vf_load(xr + i);
            ss = vf_fma(v, v, ss);
        }
        const vf inv = vf_set1(1.0f / sqrtf(vf_sum(ss) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += VL) {
            vf_store(out + r * dim + i, vf_mul(vf_load(w + i), vf_mul(vf_load(xr + i), inv)));
        }
    }
}

/* dst = x * cos + rotate_half(x) * sin per head (rotate-half pairs i, i + dim/2), with the
 * products rounded before the sum as PyTorch does. src rows: [B][heads][dim] with batch stride
 * src_b; dst: any batch/head strides. dim % (2 VL) == 0. */
static void rope32(const float *src, int64_t batch, int64_t heads, int64_t dim, int64_t src_b,
                   const float *cos, const float *sin, float *dst, int64_t dst_b, int64_t dst_h) {
    const int64_t half = dim / 2;
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < heads; h++) {
            const float *x = src + b * src_b + h * dim;
            float *d = dst + b * dst_b + h * dst_h;
            for (int64_t i = 0; i < half; i += VL) {
                const vf x1 = vf_load(x + i), x2 = vf_load(x + half + i);
                vf_store(d + i, vf_sub(vf_mul(x1, vf_load(cos + i)), vf_mul(x2, vf_load(sin + i))));
                vf_store(d + half + i, vf_add(vf_mul(x2, vf_load(cos + half + i)),
                                              vf_mul(x1, vf_load(sin + half + i))));
            }
        }
    }
}

/* softmax(q k^T * scale) v for one query per (row, head); row b reads cache row rows[b] over
 * its own lengths[b] positions (rows of one batch sit at different positions); query heads
 * share KV heads in groups (GQA). dim % VL == 0. */
static int attention32(const float *q, const float *keys, const float *values, int64_t batch,
                       int64_t heads, int64_t kv_heads, const int64_t *rows,
                       const int64_t *lengths, int64_t dim, int64_t kv_b, int64_t kv_h,
                       float scale, float *out, int threads) {
    const int64_t group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed)
    for (int64_t bh = 0; bh < batch * heads; bh++) {
        const int64_t b = bh / heads, h = bh % heads, length = lengths[b];
        const float *qv = q + bh * dim;
        const float *k = keys + rows[b] * kv_b + (h / group) * kv_h;
        const float *v = values + rows[b] * kv_b + (h / group) * kv_h;
        float stack[4096];
        float *scores = length <= 4096 ? stack : malloc(sizeof(float) * length);
        if (!scores) {
            failed = 1;
            continue;
        }
        float top = -INFINITY;
        for (int64_t t = 0; t < length; t++) {
            vf acc = vf_zero();
            for (int64_t i = 0; i < dim; i += VL) {
                acc = vf_fma(vf_load(qv + i), vf_load(k + t * dim + i), acc);
            }
            scores[t] = vf_sum(acc) * scale;
            top = scores[t] > top ? scores[t] : top;
        }
        int64_t t = 0;
        vf total = vf_zero();
        for (; t + VL <= length; t += VL) {
            const vf e = vf_exp(vf_sub(vf_load(scores + t), vf_set1(top)));
            vf_store(scores + t, e);
            total = vf_add(total, e);
        }
        float sum = vf_sum(total);
        for (; t < length; t++) {
            scores[t] = expf(scores[t] - top);
            sum += scores[t];
        }
        const vf inv = vf_set1(1.0f / sum);
        for (int64_t i = 0; i < dim; i += VL) {
            vf acc = vf_zero();
            for (int64_t s = 0; s < length; s++) {
                acc = vf_fma(vf_set1(scores[s]), vf_load(v + s * dim + i), acc);
            }
            vf_store(out + bh * dim + i, vf_mul(acc, inv));
        }
        if (scores != stack) free(scores);
    }
    return failed ? 2 : 0;
}

static int run_linears32(const vs_linear *parts, int count, const float *x, int64_t rows,
                         float *out, int64_t ldo, int threads) {
    int64_t col = 0;
    for (int i = 0; i < count && parts[i].kind != VS_LINEAR_NONE; i++) {
        const vs_linear *l = &parts[i];
        int status;
        if (l->kind == VS_LINEAR_INT4) {
            status = vsf_int4_matmul(x, 1, rows, (const uint8_t *)l->weight, l->scales, l->zeros,
                                     l->n, l->k, l->group, out + col, ldo, 1, threads);
        } else if (l->kind == VS_LINEAR_BF16 || l->kind == VS_LINEAR_FP16) {
            status = vsf_dense_matmul(x, 1, rows, (const uint16_t *)l->weight,
                                      l->kind == VS_LINEAR_FP16, l->n, l->k, out + col, ldo, 1,
                                      threads);
        } else {
            return 3;
        }
        if (status) return status;
        col += l->n;
    }
    return col == ldo ? 0 : 4; /* the parts must fill the row exactly */
}

static void add_into(float *acc, const float *delta, int64_t count) {
    for (int64_t i = 0; i < count; i += VL) vf_store(acc + i, vf_add(vf_load(acc + i), vf_load(delta + i)));
}

/* Each q/k/v part's bias (Qwen2) onto its columns of every row. */
static int add_qkv_bias32(const vs_layer *layer, float *qkv, int64_t rows, int64_t width) {
    int64_t col = 0;
    for (int i = 0; i < 3 && layer->qkv[i].kind != VS_LINEAR_NONE; i++) {
        const float *bias = layer->qkv_bias[i];
        const int64_t n = layer->qkv[i].n;
        if (bias && n % VL) return 5;
        for (int64_t r = 0; bias && r < rows; r++) add_into(qkv + r * width + col, bias, n);
        col += n;
    }
    return 0;
}

/* act = silu(gate) * up with gate_up rows [gate | up] of 2 * width. */
static void silu_times_up(const float *gate_up, int64_t rows, int64_t width, float *act) {
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * width, *up = gate + width;
        for (int64_t i = 0; i < width; i += VL) {
            const vf g = vf_load(gate + i);
            const vf silu = vf_div(g, vf_add(vf_set1(1.0f), vf_exp(vf_sub(vf_zero(), g))));
            vf_store(act + r * width + i, vf_mul(silu, vf_load(up + i)));
        }
    }
}

/* One new position per row of hidden [B, hidden] (fp32, updated in place) through every layer.
 * Row b sits at position positions[b] of cache row rows[b]: keys[l] / values[l] point at layer
 * l's fp32 cache [rows, kv_heads, max_len, head_dim] (strides given), and cos / sin [B, head_dim]
 * hold each row's fp32 rotary row. Rows of one call may sit at different positions (a batch of
 * running sequences). Scratch: B * (2 hidden + (heads + 2 kv_heads) head_dim + 2 heads head_dim
 * + 3 intermediate) floats. */
int vsf_decode_layers(const vs_dims *d, const vs_layer *layers, float *hidden, int64_t batch,
                      const int64_t *positions, const int64_t *rows, const float *cos,
                      const float *sin, float *const *keys, float *const *values,
                      int64_t kv_batch_stride, int64_t kv_head_stride, float *scratch,
                      int threads) {
    const int64_t width = d->hidden, dim = d->head_dim, inner = d->intermediate;
    const int64_t q_width = d->heads * dim, kv_width = d->kv_heads * dim;
    const int64_t qkv_width = q_width + 2 * kv_width;
    if (width % 8 || inner % 8 || dim % 16 || batch < 1 || d->heads % d->kv_heads) {
        return 1;
    }
    int64_t lengths[VS_MAX_DECODE_ROWS];
    if (batch > VS_MAX_DECODE_ROWS) return 2;
    for (int64_t b = 0; b < batch; b++) {
        if (positions[b] < 0 || rows[b] < 0) return 1;
        lengths[b] = positions[b] + 1;
    }
    float *normed = scratch;                       /* [B, hidden] */
    float *qkv = normed + batch * width;           /* [B, q | k | v] */
    float *q = qkv + batch * qkv_width;            /* [B, heads, dim] after rotary */
    float *attended = q + batch * q_width;         /* [B, heads, dim] */
    float *projected = attended + batch * q_width; /* [B, hidden] */
    float *gate_up = projected + batch * width;    /* [B, gate | up] */
    float *act = gate_up + batch * 2 * inner;      /* [B, intermediate] */
    int status;
    for (int64_t l = 0; l < d->layers; l++) {
        const vs_layer *layer = &layers[l];
        float *layer_keys = keys[l], *layer_values = values[l];
        rms_norm32(hidden, batch, width, (const float *)layer->input_norm, d->eps, normed);
        if ((status = run_linears32(layer->qkv, 3, normed, batch, qkv, qkv_width, threads)) ||
            (status = add_qkv_bias32(layer, qkv, batch, qkv_width))) {
            return 20 + status;
        }
        for (int64_t b = 0; b < batch; b++) {
            const float *row_qkv = qkv + b * qkv_width, *c = cos + b * dim, *s = sin + b * dim;
            const int64_t at = rows[b] * kv_batch_stride + positions[b] * dim;
            rope32(row_qkv, 1, d->heads, dim, 0, c, s, q + b * q_width, 0, dim);
            rope32(row_qkv + q_width, 1, d->kv_heads, dim, 0, c, s, layer_keys + at, 0,
                   kv_head_stride);
            for (int64_t h = 0; h < d->kv_heads; h++) {
                memcpy(layer_values + at + h * kv_head_stride, row_qkv + q_width + kv_width + h * dim,
                       sizeof(float) * dim);
            }
        }
        if ((status = attention32(q, layer_keys, layer_values, batch, d->heads, d->kv_heads, rows,
                                  lengths, dim, kv_batch_stride, kv_head_stride, d->scale,
                                  attended, threads))) {
            return 30 + status;
        }
        if ((status = run_linears32(&layer->o, 1, attended, batch, projected, width, threads))) {
            return 40 + status;
        }
        add_into(hidden, projected, batch * width);
        rms_norm32(hidden, batch, width, (const float *)layer->post_norm, d->eps, normed);
        if ((status = run_linears32(layer->gate_up, 2, normed, batch, gate_up, 2 * inner,
                                    threads))) {
            return 50 + status;
        }
        silu_times_up(gate_up, batch, inner, act);
        if ((status = run_linears32(&layer->down, 1, act, batch, projected, width, threads))) {
            return 60 + status;
        }
        add_into(hidden, projected, batch * width);
    }
    return 0;
}
