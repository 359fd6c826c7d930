/* CPU kernels for NF4 weights (N, K) with K a multiple of 64, so every row holds whole blocks of 64.
 *
 * Built by tinytis/kernels/nf4_cpu.py with -O3 -march=native -fopenmp -ffp-contract=off: no fused multiply-add is
 * formed behind our back, so each dequantized weight is computed with the roundings of tinytis.nf4.dequantize:
 *     scale = absmax[b], or DYNAMIC_CODE[absmax_u8[b]] * nested_absmax[b / 256] + offset (double quantization)
 *     w     = NF4_CODE[code] * scale, then rounded to bf16 or fp16 when the activations are (round_to 1 or 2)
 * The tables (nf4.BYTE_VALUES: the two values of each byte, high nibble first; nf4.DYNAMIC_CODE) come from Python.
 * Rows are split over OpenMP threads; torch's libgomp is the one loaded, so they share torch's thread pool.
 */
#include <stdint.h>
#include <string.h>

typedef struct {
    const uint8_t *packed;      /* (N * K / 2,) two codes per byte */
    const void *absmax;         /* (N * K / 64,) fp32, or uint8 when nested_absmax is not NULL */
    const float *nested_absmax; /* (ceil(N * K / 64 / 256),) fp32, or NULL */
    float offset;               /* double quantization's offset */
    const float *byte_values;   /* (256, 2) */
    const float *dynamic_code;  /* (256,) */
    int64_t k;                  /* columns, a multiple of 64 */
} nf4_weight;

enum { BLOCK = 64, NESTED_BLOCK = 256, LANES = 16, MAX_M = 8 };

static float round_bf16(float f) { /* round to nearest even, as torch's float -> bfloat16 (finite values) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
}

static float round_to_dtype(float f, int round_to) {
    if (round_to == 1) return round_bf16(f);
    if (round_to == 2) return (float)(_Float16)f;
    return f;
}

/* The 64 weights of block b, in order. Copying each byte's pair of values, then scaling all 64, is the form gcc
 * compiles well (it turns a per-value table lookup into slow emulated gathers). */
static inline __attribute__((always_inline)) void dequantize_block(const nf4_weight *w, int64_t b, int round_to,
                                                                  float out[BLOCK]) {
    float scale;
    if (w->nested_absmax)
        scale = w->dynamic_code[((const uint8_t *)w->absmax)[b]] * w->nested_absmax[b / NESTED_BLOCK] + w->offset;
    else
        scale = ((const float *)w->absmax)[b];
    const uint8_t *bytes = w->packed + b * (BLOCK / 2);
    for (int j = 0; j < BLOCK / 2; j++) memcpy(out + 2 * j, w->byte_values + 2 * bytes[j], 2 * sizeof(float));
    for (int i = 0; i < BLOCK; i++) out[i] *= scale;
    if (round_to)
        for (int i = 0; i < BLOCK; i++) out[i] = round_to_dtype(out[i], round_to);
}

/* out (row1 - row0, K) fp32 = rows row0:row1 of the dense weight. */
void nf4_dequantize_rows(const nf4_weight *w, int64_t row0, int64_t row1, int round_to, float *out, int threads) {
    const int64_t blocks_per_row = w->k / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = row0; n < row1; n++)
        for (int64_t b = 0; b < blocks_per_row; b++)
            dequantize_block(w, n * blocks_per_row + b, round_to, out + (n - row0) * w->k + b * BLOCK);
}

/* y (M, N) fp32 = x (M, K) fp32 @ W.T for M <= MAX_M. Each block of a row is dequantized once, on the stack, and
 * applied to every row of x; LANES partial sums per row of x, added pairwise at the end (a fixed order). */
void nf4_gemv(const nf4_weight *w, int64_t n_rows, const float *x, int64_t m, int round_to, float *y, int threads) {
    const int64_t blocks_per_row = w->k / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < n_rows; n++) {
        float acc[MAX_M][LANES] = {{0}};
        float block[BLOCK];
        for (int64_t b = 0; b < blocks_per_row; b++) {
            dequantize_block(w, n * blocks_per_row + b, round_to, block);
            for (int64_t i = 0; i < m; i++) {
                const float *xb = x + i * w->k + b * BLOCK;
                for (int k0 = 0; k0 < BLOCK; k0 += LANES)
                    for (int l = 0; l < LANES; l++) acc[i][l] += xb[k0 + l] * block[k0 + l];
            }
        }
        for (int64_t i = 0; i < m; i++) {
            for (int width = LANES / 2; width > 0; width /= 2)
                for (int l = 0; l < width; l++) acc[i][l] += acc[i][l + width];
            y[i * n_rows + n] = acc[i][0];
        }
    }
}
