/* C-level correctness check of fp32_kernels.c against plain scalar references, for every ISA
 * the source builds for: run natively on x86 (AVX2) and under qemu-aarch64 for the NEON builds
 * (with and without the dot-product extension). tests/integration/test_native_kernels_c.py
 * compiles and runs it; it prints one line per check and exits non-zero on the first failure.
 *
 * The references compute in double from the same quantized weights and the same fp16 scales,
 * so they check the packing, the integer dot products (16-bit activations split into two
 * bytes), the bf16 / fp16 / int8 widening and the decoder's glue (RMSNorm, rotary, GQA attention,
 * SiLU, residuals) independently of the kernels' code.
 */
#include "fp32_kernels.c"

#include <stdio.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t next_u32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static float uniform(float lo, float hi) { return lo + (hi - lo) * (next_u32() / 2097152.0f / 1024.0f); }

static float gaussian(void) { /* sum of uniforms: close enough for test data */
    float s = 0.0f;
    for (int i = 0; i < 12; i++) s += uniform(0.0f, 1.0f);
    return s - 6.0f;
}

/* float -> fp16 bits, round to nearest, for normal values in fp16's range (the test's scales) */
static uint16_t to_fp16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000;
    const int32_t exponent = (int32_t)((u >> 23) & 0xFF) - 127 + 15;
    uint32_t mantissa = u & 0x7FFFFF;
    uint32_t half = sign | ((uint32_t)exponent << 10) | (mantissa >> 13);
    const uint32_t rest = mantissa & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++;
    return (uint16_t)half;
}

static float from_fp16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exponent = ((h >> 10) & 0x1F) - 15 + 127;
    const uint32_t u = sign | (exponent << 23) | ((uint32_t)(h & 0x3FF) << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float from_bf16(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static int failures = 0;

#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
/* the bf16-dot build rounds x to bf16 for bf16 weights: the bf16 path's precision */
#define DENSE_BF16_TOL 2e-3
#define DECODER_TOL 1e-2
#else
#define DENSE_BF16_TOL 1e-5
#define DECODER_TOL 1e-3
#endif

static void report(const char *what, double err, double tol) {
    const int ok = err <= tol;
    printf("%-44s rel err %.3g (tol %.1g) %s\n", what, err, tol, ok ? "ok" : "FAILED");
    if (!ok) failures++;
}

/* A 4-bit weight in canonical form and in the kernels' packed layout. */
typedef struct {
    int64_t n, k, group;
    uint8_t *q, *zeros_rows;  /* [n][k], [n][k / group] */
    uint16_t *scales_rows;    /* fp16 [n][k / group] */
    uint8_t *packed;          /* [n/16][k/8][16][4] */
    uint16_t *scales;         /* fp16 [n/16][k/group][16] */
    uint8_t *zeros;           /* [n/16][k/group][16] */
} qweight;

static qweight random_qweight(int64_t n, int64_t k, int64_t group) {
    qweight w = {n, k, group, malloc(n * k), malloc(n * (k / group)), malloc(2 * n * (k / group)),
                 malloc(n * k / 2), malloc(2 * n * (k / group)), malloc(n * (k / group))};
    const int64_t groups = k / group;
    for (int64_t i = 0; i < n * k; i++) w.q[i] = next_u32() % 16;
    for (int64_t i = 0; i < n * groups; i++) {
        w.zeros_rows[i] = next_u32() % 16;
        w.scales_rows[i] = to_fp16(uniform(0.001f, 0.021f));
    }
    for (int64_t r = 0; r < n; r++) {
        const int64_t tile = r / 16, row = r % 16;
        for (int64_t k0 = 0; k0 < k; k0 += 8) {
            uint8_t *bytes = w.packed + tile * 16 * (k / 2) + k0 * 8 + row * 4;
            for (int j = 0; j < 4; j++) {
                bytes[j] = (uint8_t)(w.q[r * k + k0 + j] | (w.q[r * k + k0 + 4 + j] << 4));
            }
        }
        for (int64_t g = 0; g < groups; g++) {
            w.scales[(tile * groups + g) * 16 + row] = w.scales_rows[r * groups + g];
            w.zeros[(tile * groups + g) * 16 + row] = w.zeros_rows[r * groups + g];
        }
    }
    return w;
}

static double weight_at(const qweight *w, int64_t r, int64_t c) {
    const int64_t g = r * (w->k / w->group) + c / w->group;
    return ((double)w->q[r * w->k + c] - w->zeros_rows[g]) * from_fp16(w->scales_rows[g]);
}

static double rel_err(const float *got, const double *want, int64_t count) {
    double worst = 0.0, top = 1e-30;
    for (int64_t i = 0; i < count; i++) {
        const double d = fabs((double)got[i] - want[i]);
        worst = d > worst ? d : worst;
        top = fabs(want[i]) > top ? fabs(want[i]) : top;
    }
    return worst / top;
}

static void check_int4(int64_t n, int64_t k, int64_t group) {
    qweight w = random_qweight(n, k, group);
    char what[96];
    /* dequantize: exactly (q - z) * s */
    float *dense = malloc(sizeof(float) * n * k);
    double *want_dense = malloc(sizeof(double) * n * k);
    vsf_int4_dequantize(w.packed, w.scales, w.zeros, n, k, group, dense, 1, 1);
    for (int64_t r = 0; r < n; r++) {
        for (int64_t c = 0; c < k; c++) want_dense[r * k + c] = weight_at(&w, r, c);
    }
    snprintf(what, sizeof what, "int4 dequantize %ldx%ld g%ld", (long)n, (long)k, (long)group);
    report(what, rel_err(dense, want_dense, n * k), 0.0);
    const int64_t row_counts[] = {1, 3, 16};
    for (int i = 0; i < 3; i++) {
        const int64_t m = row_counts[i];
        float *x = malloc(sizeof(float) * m * k), *y = malloc(sizeof(float) * m * n);
        uint16_t *y16 = malloc(2 * m * n);
        double *want = malloc(sizeof(double) * m * n);
        for (int64_t j = 0; j < m * k; j++) x[j] = 3.0f * gaussian();
        x[0] = 1e4f; /* an outlier in the first group of row 0 */
        for (int64_t r = 0; r < m; r++) {
            for (int64_t c = 0; c < n; c++) {
                double s = 0.0;
                for (int64_t j = 0; j < k; j++) s += (double)x[r * k + j] * want_dense[c * k + j];
                want[r * n + c] = s;
            }
        }
        vsf_int4_matmul(x, 1, m, w.packed, w.scales, w.zeros, n, k, group, y, n, 1, 1);
        snprintf(what, sizeof what, "int4 matmul %ldx%ld g%ld, %ld rows", (long)n, (long)k,
                 (long)group, (long)m);
        /* per row: the outlier row is checked against its own scale */
        double worst = 0.0;
        for (int64_t r = 0; r < m; r++) {
            const double e = rel_err(y + r * n, want + r * n, n);
            worst = e > worst ? e : worst;
        }
        report(what, worst, 5e-4); /* x in 16-bit integer form: its error, not a bug's */
        vsf_int4_matmul(x, 1, m, w.packed, w.scales, w.zeros, n, k, group, y16, n, 0, 1);
        for (int64_t j = 0; j < m * n; j++) y[j] = from_bf16(y16[j]);
        snprintf(what, sizeof what, "  ... bf16 out");
        report(what, rel_err(y, want, m * n), 8e-3);
        free(x), free(y), free(y16), free(want);
    }
    free(dense), free(want_dense);
}

static void check_dense(int64_t n, int64_t k, int fp16) {
    uint16_t *w = malloc(2 * n * k);
    for (int64_t i = 0; i < n * k; i++) {
        const float v = gaussian();
        w[i] = fp16 ? to_fp16(v) : (uint16_t)to_bf16(v);
    }
    for (int64_t m = 1; m <= 3; m++) {
        float *x = malloc(sizeof(float) * m * k), *y = malloc(sizeof(float) * m * n);
        double *want = malloc(sizeof(double) * m * n);
        for (int64_t j = 0; j < m * k; j++) x[j] = gaussian();
        for (int64_t r = 0; r < m; r++) {
            for (int64_t c = 0; c < n; c++) {
                double s = 0.0;
                for (int64_t j = 0; j < k; j++) {
                    const uint16_t b = w[c * k + j];
                    s += (double)x[r * k + j] * (fp16 ? from_fp16(b) : from_bf16(b));
                }
                want[r * n + c] = s;
            }
        }
        vsf_dense_matmul(x, 1, m, w, fp16, n, k, y, n, 1, 1);
        char what[96];
        snprintf(what, sizeof what, "dense %s %ldx%ld, %ld rows", fp16 ? "fp16" : "bf16", (long)n,
                 (long)k, (long)m);
        report(what, rel_err(y, want, m * n), fp16 ? 1e-5 : DENSE_BF16_TOL);
        free(x), free(y), free(want);
    }
    free(w);
}

static void check_int8(int64_t n, int64_t k) {
    int8_t *w = malloc(n * k);
    float *scale = malloc(sizeof(float) * n);
    for (int64_t i = 0; i < n * k; i++) w[i] = (int8_t)((int32_t)(next_u32() % 255) - 127);
    for (int64_t r = 0; r < n; r++) scale[r] = uniform(0.001f, 0.02f);
    for (int64_t m = 1; m <= 3; m++) {
        float *x = malloc(sizeof(float) * m * k), *y = malloc(sizeof(float) * m * n);
        double *want = malloc(sizeof(double) * m * n);
        for (int64_t j = 0; j < m * k; j++) x[j] = gaussian();
        for (int64_t r = 0; r < m; r++) {
            for (int64_t c = 0; c < n; c++) {
                double s = 0.0;
                for (int64_t j = 0; j < k; j++) s += (double)x[r * k + j] * w[c * k + j];
                want[r * n + c] = s * scale[c];
            }
        }
        vsf_int8_matmul(x, m, w, scale, n, k, y, n, 1);
        char what[96];
        snprintf(what, sizeof what, "int8 head %ldx%ld, %ld rows", (long)n, (long)k, (long)m);
        report(what, rel_err(y, want, m * n), 1e-5);
        free(x), free(y), free(want);
    }
    free(w), free(scale);
}

/* ---------------------------------------------------------------- the decoder, end to end */

enum { LAYERS = 2, HIDDEN = 64, HEADS = 4, KV_HEADS = 2, DIM = 16, INNER = 128, POSITIONS = 6 };

typedef struct {
    qweight qkv, o, gate_up;
    uint16_t *down; /* a dense bf16 linear [HIDDEN][INNER], to cover both kinds */
    float input_norm[HIDDEN], post_norm[HIDDEN];
} ref_layer;

static void ref_linear(const qweight *w, const double *x, double *y) {
    for (int64_t r = 0; r < w->n; r++) {
        double s = 0.0;
        for (int64_t c = 0; c < w->k; c++) s += x[c] * weight_at(w, r, c);
        y[r] = s;
    }
}

static void ref_norm(const double *x, const float *w, double *out) {
    double ss = 0.0;
    for (int i = 0; i < HIDDEN; i++) ss += x[i] * x[i];
    const double inv = 1.0 / sqrt(ss / HIDDEN + 1e-5);
    for (int i = 0; i < HIDDEN; i++) out[i] = w[i] * (x[i] * inv);
}

static void ref_rope(double *v, const float *cos, const float *sin) {
    double r[DIM];
    for (int i = 0; i < DIM / 2; i++) {
        r[i] = v[i] * cos[i] - v[i + DIM / 2] * sin[i];
        r[i + DIM / 2] = v[i + DIM / 2] * cos[i + DIM / 2] + v[i] * sin[i + DIM / 2];
    }
    memcpy(v, r, sizeof r);
}

static void check_decoder(void) {
    ref_layer ref[LAYERS];
    vs_layer layers[LAYERS];
    memset(layers, 0, sizeof layers);
    for (int l = 0; l < LAYERS; l++) {
        ref[l].qkv = random_qweight((HEADS + 2 * KV_HEADS) * DIM, HIDDEN, 64);
        ref[l].o = random_qweight(HIDDEN, HEADS * DIM, 64);
        ref[l].gate_up = random_qweight(2 * INNER, HIDDEN, 64);
        ref[l].down = malloc(2 * HIDDEN * INNER);
        for (int i = 0; i < HIDDEN * INNER; i++) ref[l].down[i] = to_bf16(0.05f * gaussian());
        for (int i = 0; i < HIDDEN; i++) {
            ref[l].input_norm[i] = uniform(0.5f, 1.5f);
            ref[l].post_norm[i] = uniform(0.5f, 1.5f);
        }
        const qweight *parts[3] = {&ref[l].qkv, &ref[l].o, &ref[l].gate_up};
        vs_linear *targets[3] = {&layers[l].qkv[0], &layers[l].o, &layers[l].gate_up[0]};
        for (int p = 0; p < 3; p++) {
            *targets[p] = (vs_linear){VS_LINEAR_INT4, parts[p]->packed, parts[p]->scales,
                                    parts[p]->zeros, parts[p]->n, parts[p]->k, 64};
        }
        layers[l].down = (vs_linear){VS_LINEAR_BF16, ref[l].down, NULL, NULL, HIDDEN, INNER, 0};
        layers[l].input_norm = ref[l].input_norm;
        layers[l].post_norm = ref[l].post_norm;
    }
    const vs_dims dims = {LAYERS, HIDDEN, HEADS, KV_HEADS, DIM, INNER, 1e-5f, 0.25f};
    static float keys[LAYERS][KV_HEADS * POSITIONS * DIM], values[LAYERS][KV_HEADS * POSITIONS * DIM];
    static double ref_keys[LAYERS][KV_HEADS][POSITIONS][DIM], ref_values[LAYERS][KV_HEADS][POSITIONS][DIM];
    float *key_ptrs[LAYERS] = {keys[0], keys[1]}, *value_ptrs[LAYERS] = {values[0], values[1]};
    static float scratch[2 * HIDDEN + (HEADS + 2 * KV_HEADS) * DIM + 2 * HEADS * DIM + 3 * INNER];
    double worst = 0.0;
    for (int pos = 0; pos < POSITIONS; pos++) {
        float hidden[HIDDEN], cos[DIM], sin[DIM];
        double h[HIDDEN];
        for (int i = 0; i < HIDDEN; i++) h[i] = hidden[i] = gaussian();
        for (int i = 0; i < DIM; i++) {
            const double angle = pos * pow(10000.0, -(double)(2 * (i % (DIM / 2))) / DIM);
            cos[i] = (float)cosl(angle);
            sin[i] = (float)sinl(angle);
        }
        /* the cache is [1, KV_HEADS, POSITIONS, DIM]: batch stride, head stride */
        const int64_t position = pos, cache_row = 0;
        if (vsf_decode_layers(&dims, layers, hidden, 1, &position, &cache_row, cos, sin, key_ptrs,
                              value_ptrs,
                              KV_HEADS * POSITIONS * DIM, POSITIONS * DIM, scratch, 1)) {
            report("decoder refused its inputs", 1.0, 0.0);
            return;
        }
        for (int l = 0; l < LAYERS; l++) {
            double normed[HIDDEN], qkv[(HEADS + 2 * KV_HEADS) * DIM], att[HEADS * DIM];
            double proj[HIDDEN], gu[2 * INNER], act[INNER];
            ref_norm(h, ref[l].input_norm, normed);
            ref_linear(&ref[l].qkv, normed, qkv);
            for (int hd = 0; hd < HEADS + KV_HEADS; hd++) ref_rope(qkv + hd * DIM, cos, sin);
            for (int kv = 0; kv < KV_HEADS; kv++) {
                for (int i = 0; i < DIM; i++) {
                    ref_keys[l][kv][pos][i] = qkv[(HEADS + kv) * DIM + i];
                    ref_values[l][kv][pos][i] = qkv[(HEADS + KV_HEADS + kv) * DIM + i];
                }
            }
            for (int hd = 0; hd < HEADS; hd++) {
                const int kv = hd / (HEADS / KV_HEADS);
                double scores[POSITIONS], top = -1e300, total = 0.0;
                for (int t = 0; t <= pos; t++) {
                    double s = 0.0;
                    for (int i = 0; i < DIM; i++) s += qkv[hd * DIM + i] * ref_keys[l][kv][t][i];
                    scores[t] = s * 0.25;
                    top = scores[t] > top ? scores[t] : top;
                }
                for (int t = 0; t <= pos; t++) total += (scores[t] = exp(scores[t] - top));
                for (int i = 0; i < DIM; i++) {
                    double s = 0.0;
                    for (int t = 0; t <= pos; t++) s += scores[t] * ref_values[l][kv][t][i];
                    att[hd * DIM + i] = s / total;
                }
            }
            ref_linear(&ref[l].o, att, proj);
            for (int i = 0; i < HIDDEN; i++) h[i] += proj[i];
            ref_norm(h, ref[l].post_norm, normed);
            ref_linear(&ref[l].gate_up, normed, gu);
            for (int i = 0; i < INNER; i++) act[i] = gu[i] / (1.0 + exp(-gu[i])) * gu[INNER + i];
            for (int r = 0; r < HIDDEN; r++) {
                double s = 0.0;
                for (int c = 0; c < INNER; c++) s += act[c] * from_bf16(ref[l].down[r * INNER + c]);
                h[r] += s;
            }
        }
        const double e = rel_err(hidden, h, HIDDEN);
        worst = e > worst ? e : worst;
    }
    report("decoder, 2 layers x 6 positions (GQA)", worst, DECODER_TOL);
}

int main(void) {
    check_int4(64, 128, 64);
    check_int4(48, 256, 128);
    check_int4(32, 2048, 2048);
    check_dense(37, 64, 0);
    check_dense(37, 64, 1);
    check_dense(8, 576, 0);
    check_int8(37, 64);
    check_int8(5, 40); /* K % 16 != 0: the 4-wide loop */
    check_int8(300, 576);
    check_decoder();
    printf("%s\n", failures ? "FAILED" : "all kernel checks passed");
    return failures ? 1 : 0;
}
