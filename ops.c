/* ops.c - dtypes, norms, RoPE, softmax, activations (the matmul kernels are in matmul.c). */
#include "ops.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, u;
    if (exp == 0x1F) u = sign | 0x7F800000 | (mant << 13);        /* inf / nan */
    else if (exp != 0) u = sign | ((exp + 112) << 23) | (mant << 13); /* normal: rebias 15 -> 127 */
    else if (mant == 0) u = sign;                                  /* zero */
    else {                                                          /* subnormal: normalise */
        int e = -1;
        do { mant <<= 1; e++; } while (!(mant & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

const char *dtype_name(DType d) {
    static const char *names[DTYPE_COUNT] = {"f32", "f16", "bf16", "q8_0", "q4_0"};
    return (unsigned)d < DTYPE_COUNT ? names[d] : "?";
}

uint64_t tensor_nbytes(DType d, uint64_t rows, uint64_t cols) {
    switch (d) {
    case DTYPE_F32: return rows * cols * 4;
    case DTYPE_F16:
    case DTYPE_BF16: return rows * cols * 2;
    case DTYPE_Q8_0: return cols % Q8_GROUP ? 0 : rows * cols + rows * (cols / Q8_GROUP) * 2; /* values, then scales */
    case DTYPE_Q4_0: return cols % Q4_PAIR ? 0 : rows * cols / 2 + rows * (cols / Q8_GROUP) * 2;
    }
    return 0;
}

int dtype_column_multiple(DType d) { return d == DTYPE_Q8_0 ? Q8_GROUP : d == DTYPE_Q4_0 ? Q4_PAIR : 1; }

uint64_t tensor_stack_stride(DType d, uint64_t rows, uint64_t cols) { return (tensor_nbytes(d, rows, cols) + 63) / 64 * 64; }

Tensor tensor_matrix(const Tensor *t, int i) {
    Tensor m = *t;
    size_t stride = tensor_stack_stride(t->dtype, (uint64_t)t->rows, (uint64_t)t->cols);
    m.data = (const char *)t->data + (size_t)i * stride;
    if (t->packed) m.packed = (const char *)t->packed + (size_t)i * stride;
    m.stack = 1;
    return m;
}

void tensor_row(float *out, const Tensor *t, int row) {
    size_t base = (size_t)row * t->cols;
    if (t->dtype == DTYPE_F32) {
        memcpy(out, (const float *)t->data + base, (size_t)t->cols * sizeof(float));
    } else if (t->dtype == DTYPE_BF16) {
        const uint16_t *w = (const uint16_t *)t->data + base;
        for (int j = 0; j < t->cols; j++) out[j] = bf16_to_f32(w[j]);
    } else if (t->dtype == DTYPE_F16) {
        const uint16_t *w = (const uint16_t *)t->data + base;
        for (int j = 0; j < t->cols; j++) out[j] = f16_to_f32(w[j]);
    } else if (t->dtype == DTYPE_Q8_0) { /* value * its group's scale */
        const int8_t *q = (const int8_t *)t->data + base;
        const uint16_t *scale = (const uint16_t *)((const int8_t *)t->data + (size_t)t->rows * t->cols) + base / Q8_GROUP;
        for (int j = 0; j < t->cols; j++) out[j] = (float)q[j] * f16_to_f32(scale[j / Q8_GROUP]);
    } else { /* q4_0: (4-bit value - 8) * its group's scale */
        const uint8_t *u = (const uint8_t *)t->data + base / 2;
        const uint16_t *scale = (const uint16_t *)((const uint8_t *)t->data + (size_t)t->rows * t->cols / 2) + base / Q8_GROUP;
        for (int j = 0; j < t->cols; j++) out[j] = (float)(q4_value(u, j) - 8) * f16_to_f32(scale[j / Q8_GROUP]);
    }
}

void add_bias(float *x, const Tensor *b, int n) {
    if (!b->data) return;
    const float *bias = b->data;
    for (int t = 0; t < n; t++)
        for (int j = 0; j < b->cols; j++) x[(size_t)t * b->cols + j] += bias[j];
}

void rmsnorm(float *out, const float *x, const float *w, int dim, float eps) {
    double ss = 0.0;
    for (int j = 0; j < dim; j++) ss += (double)x[j] * x[j];
    float inv = (float)(1.0 / sqrt(ss / dim + eps));
    if (!w)
        for (int j = 0; j < dim; j++) out[j] = x[j] * inv;
    else
        for (int j = 0; j < dim; j++) out[j] = x[j] * inv * w[j];
}

void layernorm(float *out, const float *x, const float *w, const float *b, int dim, float eps) {
    double mean = 0.0, var = 0.0;
    for (int j = 0; j < dim; j++) mean += x[j];
    mean /= dim;
    for (int j = 0; j < dim; j++) var += (x[j] - mean) * (x[j] - mean);
    float inv = (float)(1.0 / sqrt(var / dim + eps));
    for (int j = 0; j < dim; j++) out[j] = (float)(x[j] - mean) * inv * w[j] + (b ? b[j] : 0.0f);
}

void rope_frequencies(float *inv_freq, float theta, int rope_dim) {
    for (int i = 0; i < rope_dim / 2; i++) inv_freq[i] = (float)(1.0 / pow(theta, (2.0 * i) / rope_dim));
}

static void rotate_pairs(float *heads, int n_heads, int head_dim, int half, const float *c, const float *s) {
    for (int h = 0; h < n_heads; h++) {
        float *head = heads + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            float a = head[i], b = head[i + half];
            head[i] = a * c[i] - b * s[i];
            head[i + half] = b * c[i] + a * s[i];
        }
    }
}

void rope_qk(float *q, int n_q_heads, float *k, int n_k_heads, int head_dim, int rope_dim, int pos, const float *inv_freq,
             float mscale) {
    int half = rope_dim / 2;
    float c[512], s[512]; /* rope_dim <= head_dim <= 1024 (model.c) */
    for (int i = 0; i < half; i++) {
        float angle = (float)pos * inv_freq[i]; /* f32 product, as the reference computes it */
        c[i] = (float)cos(angle) * mscale;
        s[i] = (float)sin(angle) * mscale;
    }
    rotate_pairs(q, n_q_heads, head_dim, half, c, s);
    if (k) rotate_pairs(k, n_k_heads, head_dim, half, c, s);
}

void rope_heads(float *heads, int n_heads, int head_dim, int rope_dim, int pos, const float *inv_freq, float mscale) {
    rope_qk(heads, n_heads, NULL, 0, head_dim, rope_dim, pos, inv_freq, mscale);
}

/* The largest of start, x[0 .. n-1], NaNs passed over (unless start is one), in 16 lanes so that it vectorises:
 * the same value as one running maximum */
static float max_of(const float *x, int n, float start) {
    float lanes[16];
    for (int l = 0; l < 16; l++) lanes[l] = start;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
    for (; i < n; i++) lanes[0] = x[i] > lanes[0] ? x[i] : lanes[0];
    float max = lanes[0];
    for (int l = 1; l < 16; l++) max = lanes[l] > max ? lanes[l] : max;
    return max;
}

/* x[i] <- e^(x[i] - max) for every i, returning their sum in 16 lanes added by lane_sum16's tree (as the
 * matmuls sum): one pass that vectorises, each lane adding its elements in order */
static float exp_and_sum(float *x, int n, float max) {
    float lanes[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) {
            float e = exp_f32(x[i + l] - max);
            x[i + l] = e;
            lanes[l] += e;
        }
    for (int l = 0; i < n; i++, l++) lanes[l] += x[i] = exp_f32(x[i] - max);
    return lane_sum16(lanes);
}

void softmax(float *x, int n) {
    float inv = 1.0f / exp_and_sum(x, n, max_of(x, n, x[0]));
    for (int k = 0; k < n; k++) x[k] *= inv;
}

void softmax_with_sink(float *x, int n, float sink) {
    if (sink == -INFINITY) {
        softmax(x, n);
        return;
    }
    float max = max_of(x, n, sink);
    float inv = 1.0f / (exp_and_sum(x, n, max) + exp_f32(sink - max));
    for (int k = 0; k < n; k++) x[k] *= inv;
}

float activation(float x, int kind) {
    switch (kind) {
    case ACTIVATION_SILU: return x / (1.0f + exp_f32(-x));
    case ACTIVATION_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    default: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    }
}

typedef struct {
    float *up;
    const float *gate;
    size_t n;
    int kind;
} Activation;

static void activate_range(void *arg, int begin, int end) {
    const Activation *a = arg;
    size_t lo = (size_t)begin * 1024, hi = (size_t)end * 1024 < a->n ? (size_t)end * 1024 : a->n;
    if (a->gate && a->kind == ACTIVATION_SILU) /* SwiGLU, spelled out so that it vectorises */
        for (size_t i = lo; i < hi; i++) a->up[i] *= a->gate[i] / (1.0f + exp_f32(-a->gate[i]));
    else if (a->gate)
        for (size_t i = lo; i < hi; i++) a->up[i] *= activation(a->gate[i], a->kind);
    else
        for (size_t i = lo; i < hi; i++) a->up[i] = activation(a->up[i], a->kind);
}

void activate(float *up, const float *gate, size_t n, int kind) {
    Activation a = {up, gate, n, kind};
    parallel_for((int)((n + 1023) / 1024), 4, (long long)n * 16, activate_range, &a); /* an exp or tanh: ~16 multiply-adds */
}

void activate_clamped(float *up, const float *gate, size_t n, float alpha, float limit) {
    for (size_t i = 0; i < n; i++) {
        float g = gate[i] > limit ? limit : gate[i];
        float u = up[i] > limit ? limit : up[i] < -limit ? -limit : up[i];
        up[i] = (u + 1.0f) * (g / (1.0f + exp_f32(-alpha * g)));
    }
}

float softcap(float x, float cap) { return cap > 0.0f ? cap * tanhf(x / cap) : x; }

/* 2 MiB: the x86-64 huge page, and a harmless alignment elsewhere */
#define HUGE_PAGE ((size_t)2 << 20)

static size_t huge_size(size_t bytes) { return (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE; }

void *huge_alloc(size_t bytes) {
    if (bytes == 0 || bytes > SIZE_MAX - 2 * HUGE_PAGE) return NULL;
    size_t size = huge_size(bytes);
#if defined(MAP_ANONYMOUS)
    /* map a huge page more than asked, then trim both ends to the 2 MiB boundaries inside */
    char *map = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return NULL;
    char *p = (char *)(((uintptr_t)map + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (p > map) munmap(map, (size_t)(p - map));
    if (p + size < map + size + HUGE_PAGE) munmap(p + size, (size_t)(map + size + HUGE_PAGE - (p + size)));
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE); /* a hint: without it (or without THP) the pages are ordinary ones */
#endif
    return p;
#else
    void *p = aligned_alloc(HUGE_PAGE, size);
    if (p) memset(p, 0, size);
    return p;
#endif
}

void huge_free(void *p, size_t bytes) {
    if (!p) return;
#if defined(MAP_ANONYMOUS)
    munmap(p, huge_size(bytes));
#else
    (void)bytes;
    free(p);
#endif
}
