/* ops.h - the neural-net building blocks forward() is written in: matmul, norms, RoPE, softmax,
 * activations. Weights may be f32, f16, bf16 or q8_0 (int8 in groups of 32 with one f16 scale each);
 * activations are f32 (q8_0 products quantize them to int8 per group of 32 on the fly).
 * The matmul kernels (SIMD, threads, tiling) are in matmul.c; the rest is in ops.c. */
#ifndef ATTN_OPS_H
#define ATTN_OPS_H

#include <stddef.h>
#include <stdint.h>

typedef enum { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2, DTYPE_Q8_0 = 3 } DType;
#define DTYPE_COUNT 4

/* q8_0: a matrix [rows][cols] is rows*cols int8 values (row-major), then rows*cols/32 f16 scales (row-major:
 * one per group of 32 consecutive values of a row). Value = q * scale. cols must be a multiple of 32. */
#define Q8_GROUP 32

/* A weight in the mapped file: a matrix [rows][cols] (row-major, one row per output) or a vector (rows 1), or
 * a stack of `stack` such matrices (the experts of a mixture), each starting on a 64-byte boundary
 * (tensor_stack_stride bytes apart). data == NULL means "not in this model" (a bias the family does not use). */
typedef struct {
    const void *data;
    DType dtype;
    int rows, cols;
    int stack;      /* matrices in the stack; 0 or 1: a single matrix */
} Tensor;

float f16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t b);
const char *dtype_name(DType d);
/* Bytes a [rows][cols] tensor of dtype d takes in the file (a vector is 1 row), or 0 if d cannot hold that
 * shape (q8_0 needs cols to be a multiple of Q8_GROUP). */
uint64_t tensor_nbytes(DType d, uint64_t rows, uint64_t cols);

/* Bytes from one matrix of a stack to the next: its size rounded up to 64 */
uint64_t tensor_stack_stride(DType d, uint64_t rows, uint64_t cols);
/* Matrix i of a stack */
Tensor tensor_matrix(const Tensor *t, int i);

/* out[cols] = row `row` of t, in f32 */
void tensor_row(float *out, const Tensor *t, int row);

/* out[n][w.rows] = x[n][w.cols] . W^T   (n tokens at once; n = 1 is the decode step).
 * Every output is computed the same way whatever n and the thread count, so a prompt gives the same
 * logits in chunks of any size (matmul.c). */
void matmul(float *out, const float *x, const Tensor *w, int n);
/* One product of several weights with the same input x[n][cols], in a single parallel pass:
 * out_i[n][w_i.rows] = x . W_i^T  (q, k, v together; gate and up together) */
typedef struct {
    float *out;
    const Tensor *w;
} Projection;
void matmul_many(const Projection *p, int count, const float *x, int n);
/* Threads (parallel.c): a pool started on first use. body(ctx, begin, end) runs over [0, n) in chunks of
 * `grain` items, which the calling thread and the pool's threads claim as they come free. work: an estimate
 * of the multiply-adds in the whole job; below PARALLEL_MIN_WORK it runs on the calling thread alone
 * (waking the others would cost more than it saves). */
#define PARALLEL_MIN_WORK 65536
typedef void (*ParallelRange)(void *ctx, int begin, int end);
void parallel_for(int n, int grain, long long work, ParallelRange body, void *ctx);
/* --threads N (0: all online cores; never more than those); takes effect if called before the first job */
void parallel_set_threads(int n);
int parallel_threads(void);

/* a . b over n floats, vectorised (the same 16-lane order as matmul: results do not depend on the build) */
float dot_product(const float *a, const float *b, int n);
/* The fixed summation tree over 16 lanes that every sum uses: (l, l+8), then (l, l+4), (l, l+2), (l, l+1).
 * Adds into a. */
static inline float lane_sum16(float a[16]) {
    for (int i = 0; i < 8; i++) a[i] += a[i + 8];
    for (int i = 0; i < 4; i++) a[i] += a[i + 4];
    return (a[0] + a[2]) + (a[1] + a[3]);
}

/* Sets aside the scratch memory matmul needs for up to max_tokens rows of max_cols (q8_0 activations), so
 * that matmul itself never allocates. Returns 0, or -1 when out of memory. */
int matmul_reserve(int max_tokens, int max_cols);
/* x[n][b.cols] += b, or nothing when the model has no such bias */
void add_bias(float *x, const Tensor *b, int n);

/* out = x / sqrt(mean(x^2) + eps) * w   (w NULL: no weights, Llama 4's L2 norm) */
void rmsnorm(float *out, const float *x, const float *w, int dim, float eps);
/* out = (x - mean) / sqrt(var + eps) * w + b   (b may be NULL) */
void layernorm(float *out, const float *x, const float *w, const float *b, int dim, float eps);

/* Rotates the pairs (x[i], x[i + rope_dim/2]) of each of n_heads heads of head_dim floats by angle
 * pos * inv_freq[i] (the angles are computed once for all heads); cos and sin are multiplied by mscale
 * (YaRN's attention factor, 1 otherwise). */
void rope_heads(float *heads, int n_heads, int head_dim, int rope_dim, int pos, const float *inv_freq, float mscale);
/* inv_freq[i] = theta^(-2i / rope_dim), i < rope_dim / 2 */
void rope_frequencies(float *inv_freq, float theta, int rope_dim);

void softmax(float *x, int n);
/* softmax over x[0..n) and one more logit, the sink, which takes its share of the mass but has no output:
 * x_i <- e^(x_i - m) / (e^(sink - m) + sum_j e^(x_j - m)). sink = -inf is plain softmax. */
void softmax_with_sink(float *x, int n, float sink);

/* ACTIVATION_SWIGLU_CLAMPED (gpt-oss): gate clamped to (-inf, limit], up to [-limit, limit], then
 * (up + 1) * gate * sigmoid(alpha * gate). */
enum { ACTIVATION_SILU = 0, ACTIVATION_GELU_TANH = 1, ACTIVATION_GELU = 2, ACTIVATION_SWIGLU_CLAMPED = 3 };
#define ACTIVATION_COUNT 4
float activation(float x, int kind);
/* up[i] *= act(gate[i]) (gated MLP: SwiGLU, GeGLU); gate NULL: up[i] = act(up[i]) (plain MLP). Threaded. */
void activate(float *up, const float *gate, size_t n, int kind);
/* up[i] = (clamp(up[i], -limit, limit) + 1) * g sigmoid(alpha g), g = min(gate[i], limit) (gpt-oss) */
void activate_clamped(float *up, const float *gate, size_t n, float alpha, float limit);
/* c * tanh(x / c): squashes x smoothly into (-c, c) (Gemma 2) */
float softcap(float x, float cap);

#endif
