/* ops.c - matmul, norms, RoPE, softmax, activations. */
#include "ops.h"

#include <math.h>
#include <string.h>

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

int dtype_size(DType d) { return d == DTYPE_F32 ? 4 : 2; }

void tensor_row(float *out, const Tensor *t, int row) {
    size_t base = (size_t)row * t->cols;
    if (t->dtype == DTYPE_F32) {
        memcpy(out, (const float *)t->data + base, (size_t)t->cols * sizeof(float));
    } else if (t->dtype == DTYPE_BF16) {
        const uint16_t *w = (const uint16_t *)t->data + base;
        for (int j = 0; j < t->cols; j++) out[j] = bf16_to_f32(w[j]);
    } else {
        const uint16_t *w = (const uint16_t *)t->data + base;
        for (int j = 0; j < t->cols; j++) out[j] = f16_to_f32(w[j]);
    }
}

static float dot_f32(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int j = 0; j < n; j++) s += a[j] * b[j];
    return s;
}

static float dot_bf16(const uint16_t *w, const float *x, int n) {
    float s = 0.0f;
    for (int j = 0; j < n; j++) s += bf16_to_f32(w[j]) * x[j];
    return s;
}

static float dot_f16(const uint16_t *w, const float *x, int n) {
    float s = 0.0f;
    for (int j = 0; j < n; j++) s += f16_to_f32(w[j]) * x[j];
    return s;
}

void matmul(float *out, const float *x, const Tensor *w, int n) {
    int rows = w->rows, cols = w->cols;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < rows; i++) {
        for (int t = 0; t < n; t++) {
            const float *xt = x + (size_t)t * cols;
            float s;
            if (w->dtype == DTYPE_F32) s = dot_f32((const float *)w->data + (size_t)i * cols, xt, cols);
            else if (w->dtype == DTYPE_BF16) s = dot_bf16((const uint16_t *)w->data + (size_t)i * cols, xt, cols);
            else s = dot_f16((const uint16_t *)w->data + (size_t)i * cols, xt, cols);
            out[(size_t)t * rows + i] = s;
        }
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

void rope(float *head, int rope_dim, int pos, const float *inv_freq) {
    int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        float angle = (float)pos * inv_freq[i]; /* f32 product, as the reference computes it */
        float c = (float)cos(angle), s = (float)sin(angle);
        float a = head[i], b = head[i + half];
        head[i] = a * c - b * s;
        head[i + half] = b * c + a * s;
    }
}

void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

float activation(float x, int kind) {
    switch (kind) {
    case ACTIVATION_SILU: return x / (1.0f + expf(-x));
    case ACTIVATION_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    default: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    }
}

float softcap(float x, float cap) { return cap > 0.0f ? cap * tanhf(x / cap) : x; }
