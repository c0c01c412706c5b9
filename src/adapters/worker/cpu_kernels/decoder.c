/* One decode position through every decoder layer of a Llama, in a single call.
 *
 * Why: at batch 1 a decoder layer is five weight-streaming matmuls plus a dozen tiny ops
 * (norms, rotary, the cache write, residual adds, SiLU). Dispatched from Python each tiny op
 * costs more than its arithmetic: about 250 us per layer, 8 ms per token at the 2.7B shape,
 * while the weights stream. Chaining the same kernels here leaves only the matmuls' time.
 *
 * Numerics follow the PyTorch bf16 path step by step (every op computes in fp32 and rounds to
 * bf16 once): RMSNorm, rotary and attention are the very kernels that path uses; residual adds,
 * Qwen2's q/k/v biases and SiLU * up round like torch's elementwise ops.
 *
 * Layouts: hidden [B, hidden] (updated in place); row b sits at position positions[b] of cache
 * row rows[b], where keys[l] / values[l] point at layer l's cache [rows, kv_heads, max_len,
 * head_dim] (strides given); cos / sin [B, head_dim] hold each row's rotary row. Rows of one call
 * may sit at different positions (a batch of running sequences).
 * Scratch: B * (2 hidden + (heads + 2 kv_heads) head_dim + 2 heads head_dim + 3 intermediate).
 */
#include <string.h>

#include "kernels.h"

#include "plan.h"

static int run_linears(const vs_linear *parts, int count, const uint16_t *x, int64_t rows,
                       uint16_t *out, int64_t ldo, int threads) {
    int64_t col = 0;
    for (int i = 0; i < count && parts[i].kind != VS_LINEAR_NONE; i++) {
        const vs_linear *l = &parts[i];
        int status;
        if (l->kind == VS_LINEAR_INT4) {
            status = vs_int4_matmul_ld(x, rows, (const uint8_t *)l->weight, l->scales, l->zeros,
                                       l->n, l->k, l->group, out + col, ldo, 0, threads);
        } else if (l->kind == VS_LINEAR_BF16) {
            status = vs_bf16_matmul_ld(x, rows, (const uint16_t *)l->weight, l->n, l->k,
                                       out + col, ldo, 0, threads);
        } else {
            return 3;
        }
        if (status) return status;
        col += l->n;
    }
    return col == ldo ? 0 : 4; /* the parts must fill the row exactly */
}

/* acc = bf16(acc + delta), `count` % 16 == 0 */
static void add_residual(uint16_t *acc, const uint16_t *delta, int64_t count) {
    for (int64_t i = 0; i < count; i += 16) {
        store_bf16x16(acc + i, _mm512_add_ps(bf16x16_to_ps(acc + i), bf16x16_to_ps(delta + i)));
    }
}

/* Each q/k/v part's bias onto its columns of every row, rounded like the per-op path's
 * `out + bias` on the part's bf16 output. */
static int add_qkv_bias(const vs_layer *layer, uint16_t *qkv, int64_t rows, int64_t width) {
    int64_t col = 0;
    for (int i = 0; i < 3 && layer->qkv[i].kind != VS_LINEAR_NONE; i++) {
        const uint16_t *bias = layer->qkv_bias[i];
        const int64_t n = layer->qkv[i].n;
        if (bias && n % 16) return 5;
        for (int64_t r = 0; bias && r < rows; r++) add_residual(qkv + r * width + col, bias, n);
        col += n;
    }
    return 0;
}

/* act[r] = bf16(bf16(silu(gate[r])) * up[r]) with gate_up rows [gate | up] of 2 * width. */
static void silu_times_up(const uint16_t *gate_up, int64_t rows, int64_t width, uint16_t *act) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * width, *up = gate + width;
        for (int64_t i = 0; i < width; i += 16) {
            const __m512 g = bf16x16_to_ps(gate + i);
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, e)));
            store_bf16x16(act + r * width + i, _mm512_mul_ps(silu, bf16x16_to_ps(up + i)));
        }
    }
}

int vs_decode_layers(const vs_dims *d, const vs_layer *layers, uint16_t *hidden, int64_t batch,
                     const int64_t *positions, const int64_t *rows, const uint16_t *cos,
                     const uint16_t *sin, uint16_t *const *keys, uint16_t *const *values,
                     int64_t kv_batch_stride, int64_t kv_head_stride, uint16_t *scratch,
                     int threads) {
    const int64_t width = d->hidden, dim = d->head_dim, inner = d->intermediate;
    const int64_t q_width = d->heads * dim, kv_width = d->kv_heads * dim;
    const int64_t qkv_width = q_width + 2 * kv_width;
    if (width % 16 || inner % 16 || dim % 32 || batch < 1 || batch > VS_MAX_DECODE_ROWS) return 1;
    for (int64_t b = 0; b < batch; b++) {
        if (positions[b] < 0 || rows[b] < 0) return 1;
    }
    uint16_t *normed = scratch;                   /* [B, hidden] */
    uint16_t *qkv = normed + batch * width;       /* [B, q | k | v] */
    uint16_t *q = qkv + batch * qkv_width;        /* [B, heads, dim] after rotary */
    uint16_t *attended = q + batch * q_width;     /* [B, heads, dim] */
    uint16_t *projected = attended + batch * q_width; /* [B, hidden] */
    uint16_t *gate_up = projected + batch * width;    /* [B, gate | up] */
    uint16_t *act = gate_up + batch * 2 * inner;      /* [B, intermediate] */
    int status;
    for (int64_t l = 0; l < d->layers; l++) {
        const vs_layer *layer = &layers[l];
        uint16_t *layer_keys = keys[l], *layer_values = values[l];
        if ((status = vs_rms_norm(hidden, batch, width, layer->input_norm, d->eps, normed))) {
            return 10 + status;
        }
        if ((status = run_linears(layer->qkv, 3, normed, batch, qkv, qkv_width, threads)) ||
            (status = add_qkv_bias(layer, qkv, batch, qkv_width))) {
            return 20 + status;
        }
        for (int64_t b = 0; b < batch; b++) {
            const uint16_t *row_qkv = qkv + b * qkv_width, *c = cos + b * dim, *s = sin + b * dim;
            const int64_t at = rows[b] * kv_batch_stride + positions[b] * dim;
            vs_rope(row_qkv, 1, d->heads, dim, 0, c, s, q + b * q_width, 0, dim);
            vs_rope(row_qkv + q_width, 1, d->kv_heads, dim, 0, c, s, layer_keys + at, 0,
                    kv_head_stride);
            for (int64_t h = 0; h < d->kv_heads; h++) {
                memcpy(layer_values + at + h * kv_head_stride,
                       row_qkv + q_width + kv_width + h * dim, sizeof(uint16_t) * dim);
            }
            /* One row at a time: each reads its own cache row over its own length. */
            const int64_t base = rows[b] * kv_batch_stride;
            if ((status = vs_decode_attention(q + b * q_width, layer_keys + base,
                                              layer_values + base, 1, d->heads, d->kv_heads,
                                              positions[b] + 1, dim, kv_batch_stride,
                                              kv_head_stride, d->scale, attended + b * q_width,
                                              threads))) {
                return 30 + status;
            }
        }
        if ((status = run_linears(&layer->o, 1, attended, batch, projected, width, threads))) {
            return 40 + status;
        }
        add_residual(hidden, projected, batch * width);
        vs_rms_norm(hidden, batch, width, layer->post_norm, d->eps, normed);
        if ((status = run_linears(layer->gate_up, 2, normed, batch, gate_up, 2 * inner,
                                  threads))) {
            return 50 + status;
        }
        silu_times_up(gate_up, batch, inner, act);
        if ((status = run_linears(&layer->down, 1, act, batch, projected, width, threads))) {
            return 60 + status;
        }
        add_residual(hidden, projected, batch * width);
    }
    return 0;
}
