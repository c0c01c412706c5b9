/* What the W4A16 kernels share on every ISA (int4_matmul.c on AVX-512, fp32_kernels.c on AVX2 or
 * NEON, prefill_gemm.c on AVX2): the shape rules of the packed 4-bit layout (described in
 * int4_matmul.c), and the 16-bit integer form of x the two decode kernels compute with, with its
 * buffers. Scalar C only, no intrinsics. */
#ifndef VILASERVE_W4A16_H
#define VILASERVE_W4A16_H

#include <stdint.h>
#include <stdlib.h>

#define TILE_ROWS 16   /* output rows per tile */
#define CHUNK 8        /* columns per 64-byte block of a tile */
#define MAX_GROUP 2048 /* keeps every int32 partial sum exact */

/* Whether the layout holds an [n, k] weight quantized in groups of `group` columns. */
static inline int vs_w4a16_fits(int64_t n, int64_t k, int64_t group) {
    return n % TILE_ROWS == 0 && k % 64 == 0 && group % 64 == 0 && group <= MAX_GROUP &&
           k % group == 0;
}

/* x as 16-bit integers per (row, group): each group scaled to [-X_LEVELS, X_LEVELS] and split
 * into two signed bytes x = 256 * major + minor; per (row, group) the scale and the integer sum
 * (for the zero points). */
#define X_LEVELS 32639.0f
typedef struct {
    int8_t *major, *minor;
    float *scale;
    int32_t *sum;
} vs_int16_rows;

/* Up to STACK_COLUMNS columns of x (rows x K) live on the caller's stack; more go to the heap. */
#define STACK_COLUMNS 16384
typedef struct {
    int8_t bytes[2 * STACK_COLUMNS];
    float scale[STACK_COLUMNS / 64]; /* groups are at least 64 columns */
    int32_t sum[STACK_COLUMNS / 64];
} vs_int16_rows_stack;

/* Points xq at `stack` when `columns` (rows x K) fit there, else at one malloc'd block that
 * *heap holds for the caller to free (NULL when on the stack). `sums`: rows x groups. Returns 0,
 * or 2 when the memory runs out. */
static inline int vs_int16_rows_at(vs_int16_rows *xq, vs_int16_rows_stack *stack, int64_t columns,
                                   int64_t sums, void **heap) {
    *heap = NULL;
    if (columns <= STACK_COLUMNS) {
        *xq = (vs_int16_rows){stack->bytes, stack->bytes + STACK_COLUMNS, stack->scale, stack->sum};
        return 0;
    }
    *heap = malloc(2 * columns + 8 * sums);
    if (!*heap) return 2;
    xq->major = *heap;
    xq->minor = xq->major + columns;
    xq->scale = (float *)(xq->minor + columns);
    xq->sum = (int32_t *)(xq->scale + sums);
    return 0;
}

#endif
