/* ops.h - the neural-net building blocks forward() is written in: matmul, norms, RoPE, softmax,
 * activations. Weights may be f32, f16 or bf16; everything is computed in f32. */
#ifndef ATTN_OPS_H
#define ATTN_OPS_H

#include <stdint.h>

typedef enum { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2 } DType;

/* A weight in the mapped file: a matrix [rows][cols] (row-major, one row per output) or a vector (rows 1).
 * data == NULL means "not in this model" (a bias the family does not use). */
typedef struct {
    const void *data;
    DType dtype;
    int rows, cols;
} Tensor;

float f16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t b);
int dtype_size(DType d);

/* out[cols] = row `row` of t, in f32 */
void tensor_row(float *out, const Tensor *t, int row);

/* out[n][w.rows] = x[n][w.cols] . W^T   (n tokens at once; n = 1 is the decode step) */
void matmul(float *out, const float *x, const Tensor *w, int n);
/* x[n][b.cols] += b, or nothing when the model has no such bias */
void add_bias(float *x, const Tensor *b, int n);

/* out = x / sqrt(mean(x^2) + eps) * w */
void rmsnorm(float *out, const float *x, const float *w, int dim, float eps);
/* out = (x - mean) / sqrt(var + eps) * w + b   (b may be NULL) */
void layernorm(float *out, const float *x, const float *w, const float *b, int dim, float eps);

/* Rotates the pairs (x[i], x[i + rope_dim/2]) of one head by angle pos * inv_freq[i]. */
void rope(float *head, int rope_dim, int pos, const float *inv_freq);
/* inv_freq[i] = theta^(-2i / rope_dim), i < rope_dim / 2 */
void rope_frequencies(float *inv_freq, float theta, int rope_dim);

void softmax(float *x, int n);

enum { ACTIVATION_SILU = 0, ACTIVATION_GELU_TANH = 1, ACTIVATION_GELU = 2 };
float activation(float x, int kind);
/* c * tanh(x / c): squashes x smoothly into (-c, c) (Gemma 2) */
float softcap(float x, float cap);

#endif
