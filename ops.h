/* ops.h - the neural-net building blocks forward() is written in: matmul, norms, RoPE, softmax,
 * activations. Weights may be f32, f16, bf16, q8_0 (int8 in groups of 32 with one f16 scale each) or q4_0
 * (4-bit in groups of 32, one f16 scale each); activations are f32 (q8_0 / q4_0 products quantize them to int8
 * per group of 32 on the fly).
 * The matmul kernels (SIMD, threads, tiling) are in matmul.c; the rest is in ops.c. */
#ifndef ATTN_OPS_H
#define ATTN_OPS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2, DTYPE_Q8_0 = 3, DTYPE_Q4_0 = 4 } DType;
#define DTYPE_COUNT 5

/* q8_0: a matrix [rows][cols] is rows*cols int8 values (row-major), then rows*cols/32 f16 scales (row-major:
 * one per group of 32 consecutive values of a row). Value = q * scale. cols must be a multiple of 32. */
#define Q8_GROUP 32
/* q4_0: rows*cols/2 bytes of 4-bit values u (row-major), then the f16 scales as q8_0's. Value = (u - 8) * scale.
 * Each 64 columns of a row (two groups) are 32 bytes: byte j holds column j in its low 4 bits and column
 * 32 + j in its high 4 bits, so that the low halves, then the high halves, are the 64 columns in order.
 * cols must be a multiple of 64. */
#define Q4_PAIR 64
/* the 4-bit value of column j of a q4_0 row (its bytes at row) */
static inline int q4_value(const uint8_t *row, int j) {
    uint8_t b = row[j / Q4_PAIR * 32 + j % 32];
    return j % Q4_PAIR < 32 ? b & 15 : b >> 4;
}
/* q8_0 or q4_0: the dtypes whose products quantize the activations */
#define DTYPE_IS_QUANTIZED(d) ((d) == DTYPE_Q8_0 || (d) == DTYPE_Q4_0)

/* A weight in the mapped file: a matrix [rows][cols] (row-major, one row per output) or a vector (rows 1), or
 * a stack of `stack` such matrices (the experts of a mixture), each starting on a 64-byte boundary
 * (tensor_stack_stride bytes apart). data == NULL means "not in this model" (a bias the family does not use). */
typedef struct {
    const void *data;
    DType dtype;
    int rows, cols;
    int stack;      /* matrices in the stack; 0 or 1: a single matrix */
    const void *packed; /* NULL, or the same bytes laid out for this machine's product kernel (matmul_pack) */
} Tensor;

float f16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t b);
const char *dtype_name(DType d);
/* Bytes a [rows][cols] tensor of dtype d takes in the file (a vector is 1 row), or 0 if d cannot hold that
 * shape (q8_0 needs cols to be a multiple of Q8_GROUP, q4_0 of Q4_PAIR). */
uint64_t tensor_nbytes(DType d, uint64_t rows, uint64_t cols);
/* The multiple of which a dtype needs the columns to be (1, 32 or 64) */
int dtype_column_multiple(DType d);

/* Bytes from one matrix of a stack to the next: its size rounded up to 64 */
uint64_t tensor_stack_stride(DType d, uint64_t rows, uint64_t cols);
/* Matrix i of a stack */
Tensor tensor_matrix(const Tensor *t, int i);

/* Memory the products and the KV cache stream through (packed weights, KV blocks): anonymous pages aligned to
 * 2 MiB, with transparent huge pages asked for (MADV_HUGEPAGE; the kernel's default is often `madvise`), so
 * that one TLB entry covers 2 MiB instead of 4 KiB and a new block does not fault page by page. Zeroed.
 * Returns NULL when out of memory; huge_free takes the same size. */
void *huge_alloc(size_t bytes);
void huge_free(void *p, size_t bytes);

/* out[cols] = row `row` of t, in f32 */
void tensor_row(float *out, const Tensor *t, int row);

/* The memory the products work in: q8_0 / q4_0 activations quantized per group, their AMX tiles, the bf16
 * tiles of --bf16-prefill. One per RunState, set aside before any product runs (matmul_scratch_reserve), so
 * that a product never allocates and two RunStates never share it. */
typedef struct {
    unsigned char *data;
    size_t size;
} MatmulScratch;
/* Room for up to max_tokens rows of max_cols (grows, never shrinks). Returns 0, or -1 when out of memory. */
int matmul_scratch_reserve(MatmulScratch *ws, int max_tokens, int max_cols);
void matmul_scratch_free(MatmulScratch *ws);

/* out[n][w.rows] = x[n][w.cols] . W^T   (n tokens at once; n = 1 is the decode step), working in ws.
 * Every output is computed the same way whatever n and the thread count, so a prompt gives the same
 * logits in chunks of any size (matmul.c); a scratch reserved for fewer tokens than n is used in turns. */
void matmul(MatmulScratch *ws, float *out, const float *x, const Tensor *w, int n);
/* A q8_0 / q4_0 matrix (or stack) copied once into the layout this machine's product kernel reads fastest, in
 * w->packed (the products then read it; everything else reads w->data): AVX-512, rows of whole groups of 8
 * groups (matmul.c). Elsewhere w->packed stays NULL; ATTN_NO_PACK set in the environment does the same
 * (comparisons). Returns 0, or -1 out of memory. matmul_unpack frees it. The same bits either way. */
int matmul_pack(Tensor *w);
void matmul_unpack(Tensor *w);
/* 1 when every product of a packed matrix reads the packed copy alone, so that w->data's pages can go; 0 where
 * the AMX tiles take the products of many tokens from w->data (prefill) and the packed copy those of few */
int matmul_pack_replaces(void);
/* The same in two steps, into memory the caller holds (model.c packs every matrix into one huge_alloc): the
 * bytes w's packed copy takes (0: this machine or this matrix does not pack), then the copy at dst, which must
 * be 64-byte aligned. */
size_t matmul_pack_bytes(const Tensor *w);
void matmul_pack_into(Tensor *w, void *dst);
/* The same product on the calling thread alone, never through BLAS: for small products inside a parallel job
 * (mla.c). f32, f16 and bf16 weights only (q8_0 / q4_0 activations need a scratch). */
void matmul_serial(float *out, const float *x, const Tensor *w, int n);
/* One product of several weights with the same input x[n][cols], in a single parallel pass:
 * out_i[n][w_i.rows] = x . W_i^T  (q, k, v together; gate and up together) */
typedef struct {
    float *out;
    const Tensor *w;
} Projection;
void matmul_many(MatmulScratch *ws, const Projection *p, int count, const float *x, int n);
/* --bf16-prefill: f32 and bf16 products of 16 tokens or more on AMX-BF16 tiles where the CPU has them, the
 * activations (and f32 weights) rounded to bf16: faster prompts, but the logits are no longer decode's */
void matmul_bf16_prefill(int on);
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
/* out[i] = dot_product(a, b[i], n) for i < 4, with its bits (AVX-512: the four sums share one lane tree) */
void dot_product4(float out[4], const float *a, const float *const b[4], int n);
/* kt[d][i] = rows[i][d]: 16 rows of len floats (len a multiple of 16) transposed, for dot_product16 */
void transpose_rows16(float *kt, const float *const rows[16], int len);
/* out[i] = dot_product(a, row i, len) for the 16 rows transposed in kt, with dot_product's bits: one vector
 * of 16 keys' sums per lane, no sum across a vector until the tree (a tile of queries shares one kt) */
void dot_product16(float out[16], const float *q, const float *kt, int len);
/* out[k] = fmaf(w[i], rows[i][k], out[k]) for i = 0 .. n-1 in turn (attention's weighted sum of value rows) */
void add_scaled_rows(float *out, const float *w, const float *const *rows, int n, int len);
/* The same two on rows of the KV cache as kvcache.c stores them (packing 1: bf16; 2: q8_0 groups of an f32 scale
 * and 32 int8), elements off .. off+len-1 of each, converted in registers with kv_row_load's bits. Return 0,
 * having done nothing, where the build has no such kernel or off / len are not multiples of 16. */
int dot_product4_packed(float out[4], const float *a, const void *const rows[4], int packing, int off, int n);
int add_scaled_rows_packed(float *out, const float *w, const void *const *rows, int n, int packing, int off, int len);
/* Two queries of a tile at once, with the bits of two separate calls: dot_product16 of q0 and q1 over one kt; and
 * add_scaled_rows(_packed) into out0 (weights w0) and out1 (w1) over the same rows (packing 0: f32), each row
 * loaded and converted once for both (0 where the build has no such kernel or off / len are not multiples of 16) */
void dot_product16_pair(float out0[16], const float *q0, float out1[16], const float *q1, const float *kt, int len);
int add_scaled_rows_pair(float *out0, const float *w0, float *out1, const float *w1, const void *const *rows, int n,
                         int packing, int off, int len);
/* The fixed summation tree over 16 lanes that every sum uses: (l, l+8), then (l, l+4), (l, l+2), (l, l+1).
 * Adds into a. */
/* f32 -> bf16, rounded to nearest even (a NaN stays a NaN): --bf16-prefill's activations, --kv-type bf16 */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(u >> 16 | 0x40);
    return (uint16_t)((u + 0x7FFFu + (u >> 16 & 1)) >> 16);
}

/* q8_0's rule for one group of n <= 32 values (q8_0 activations, --kv-type q8_0): q[j] = round(x[j] / scale),
 * scale = max|x| / 127, returned. A group holding an inf or NaN gets q = 0 and a NaN scale, so the NaN reaches
 * the output as it would in f32; q is clamped to [-127, 127] before it becomes an int (127 / max|x| overflows
 * to inf when max|x| is subnormal). */
float quantize_q8_group(int8_t *q, const float *x, int n);

static inline float lane_sum16(float a[16]) {
    for (int i = 0; i < 8; i++) a[i] += a[i + 8];
    for (int i = 0; i < 4; i++) a[i] += a[i + 4];
    return (a[0] + a[2]) + (a[1] + a[3]);
}

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
/* The same for the query heads and the key heads of one position (k may be NULL): the angles computed once */
void rope_qk(float *q, int n_q_heads, float *k, int n_k_heads, int head_dim, int rope_dim, int pos, const float *inv_freq,
             float mscale);
/* inv_freq[i] = theta^(-2i / rope_dim), i < rope_dim / 2 */
void rope_frequencies(float *inv_freq, float theta, int rope_dim);

/* e^x in f32 without a libm call, so that loops over it vectorise: x = n ln2 + r with |r| <= ln2/2, then
 * e^r by its Taylor polynomial (Cephes' expf coefficients) and 2^n put into the exponent bits. Within 2 ulp
 * of expf; 0 below -87.3 (where e^x would be subnormal); NaN stays NaN. The same operations in every
 * build, so the same bits. */
static inline float exp_f32(float x) {
    float clamped = x < 88.0f ? x : 88.0f; /* a NaN becomes 88 here (so n converts to int) and is returned below */
    clamped = clamped > -87.3f ? clamped : -87.3f;
    float n = clamped * 1.44269504f + 12582912.0f - 12582912.0f; /* round(x / ln2): 1.5 * 2^23 drops the fraction */
    float r = clamped - n * 0.693359375f - n * -2.12194440e-4f;  /* ln2 in two parts, so r is exact */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < -87.3f ? 0.0f : x == x ? p * scale : x;
}

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
