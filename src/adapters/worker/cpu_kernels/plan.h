/* The decoder plan's C structs, shared by decoder.c (AVX-512, bf16) and fp32_kernels.c (AVX2
 * or NEON, fp32): one model's layers described once (cpu_kernels/decoder.py builds them; its ctypes
 * Structures must match these field by field). No intrinsics here: both ISAs include it. */
#ifndef VILASERVE_PLAN_H
#define VILASERVE_PLAN_H

#include <stdint.h>

/* The most rows one decode call takes (the engine's largest decode batch). */
#define VS_MAX_DECODE_ROWS 256

enum { VS_LINEAR_NONE = 0, VS_LINEAR_INT4 = 1, VS_LINEAR_BF16 = 2, VS_LINEAR_FP16 = 3 };

/* One linear layer without bias: packed 4-bit (int4_matmul.c's layout) or dense 16-bit [n, k]
 * (bf16; fp16 on the fp32 paths only). */
typedef struct {
    int64_t kind;
    const void *weight;
    const uint16_t *scales; /* int4 only: fp16 */
    const uint8_t *zeros;   /* int4 only */
    int64_t n, k, group;
} vs_linear;

/* A decoder layer. q|k|v come as one fused linear (parts 1-2 unused) or three; gate|up as one
 * or two. Each part writes its columns next to the previous part's. qkv_bias[i] (Qwen2) is
 * added to part i's output before the rotary, or NULL for none. */
typedef struct {
    const void *input_norm, *post_norm; /* bf16 on the AVX-512 path, fp32 on the fp32 paths */
    vs_linear qkv[3];
    vs_linear gate_up[2];
    vs_linear o, down;
    const void *qkv_bias[3]; /* [n] of part i, in the activations' dtype (as the norms) */
} vs_layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
} vs_dims;

#endif
