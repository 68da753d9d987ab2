/* matmul.c - out[n][rows] = x[n][cols] . W^T, where nearly all of the time goes.
 *
 * Decode (n = 1) reads every weight once per token and does one multiply-add with it, so it is bound by
 * memory bandwidth: the kernels stream each thread's share of the rows once, converting bf16 / f16 to f32 or
 * multiplying int8 by int8 on the fly. Prefill (n > 1) does n multiply-adds per weight: tiles of
 * ROWS_PER_TILE weight rows x up to TOKENS_PER_TILE tokens keep the rows in L1 while every token of the chunk
 * passes over them, so a weight is fetched from memory once per chunk, not once per token.
 *
 * One summation order for every output, whatever n, the tile it falls in or the thread count: lane l of 16
 * accumulates the products at columns k = l mod 16 in increasing k, then the 16 lanes are added as a fixed
 * tree (lane_sum). So a prompt gives bit-identical logits in chunks of any size and with any --threads.
 *
 * q8_0 (weights: int8 in groups of 32, one f16 scale per group): the activations of each token are quantized
 * per group of 32 too (quantize_token: scale max|x|/127, round to nearest even), and each group's dot product
 * is an exact integer sum, scaled by (weight scale x activation scale). The integer sums come from VPDPBUSD,
 * which multiplies unsigned by signed bytes: the weights are flipped to unsigned by adding 128 (w ^ 0x80) and
 * 128 * sum(activation group) is subtracted afterwards (the `correction` term below).
 *
 * Kernels: AVX-512 (VNNI for q8_0), AVX2 + FMA + F16C, and portable C (make PORTABLE=1), chosen at build time
 * from the compiler's target. They follow the same lane scheme and give the same bits, except that portable C
 * on a target without a fused multiply-add rounds a*b+c twice (tests/test_speed.py bounds the difference).
 *
 * Decode also prefetches each stream of weights PREFETCH_BYTES ahead: the hardware prefetchers alone leave
 * much of the bandwidth unused.
 *
 * Threads (parallel.c): the rows of each weight are cut into items of 16 rows that the threads claim in
 * chunks as they come free, and matmul_many() runs several weights with the same input (q, k, v; gate, up)
 * as one job. Products
 * too small to be worth waking the threads for run on the calling thread. make BLAS=1 hands f32 prefill
 * products to cblas_sgemm. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <math.h>
#ifdef USE_BLAS
#include <cblas.h>
#endif

#include "ops.h"

/* How far ahead of its reads, in each stream of weights, decode prefetches (a one-token bf16 product over a
 * 49 MB matrix streamed 9 GB/s without, 21-25 GB/s with) */
#define PREFETCH_BYTES 4096

#if defined(ATTN_PORTABLE_KERNELS) /* make KERNELS=portable: the C kernels even where SIMD ones would build */
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define KERNELS_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KERNELS_AVX2 1
#include <immintrin.h>
#endif

#define LANES 16
#define ROWS_PER_TILE 4
#define TOKENS_PER_TILE 6      /* f32 / f16 / bf16 tiles: 4 rows x up to 6 tokens */
#define Q8_TOKENS_PER_TILE 3   /* q8_0 tiles: 4 rows x up to 3 tokens */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ---------------------------------------------------------------------------------------------
 * q8_0 activations: x[n][cols] quantized per group of 32, in a scratch buffer shared by all threads */

typedef struct {
    int cols, groups;          /* groups = cols / 32 */
    size_t stride;             /* bytes per token */
    int8_t *q;                 /* [cols] values, padded with zeros to a whole number of group pairs */
    float *scale_pairs;        /* [groups/2 rounded up][16]: lanes 0-7 scale of group 2p, 8-15 of group 2p+1 */
    float *correction;         /* [groups rounded up to 16]: 128 * sum(q of group) * scale, zero padded */
} QuantizedRow;

static struct {
    unsigned char *data;
    size_t size;
} scratch;

static size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }

/* a token's bytes: values, scale pairs, corrections, each a multiple of 64 bytes */
static size_t value_bytes(int cols) { return round_up((size_t)cols, 2 * Q8_GROUP); }
static size_t scale_pair_bytes(int cols) { return value_bytes(cols) / (2 * Q8_GROUP) * LANES * sizeof(float); }
static size_t correction_bytes(int cols) { return round_up((size_t)(cols / Q8_GROUP), LANES) * sizeof(float); }
static size_t quantized_stride(int cols) { return value_bytes(cols) + scale_pair_bytes(cols) + correction_bytes(cols); }

static QuantizedRow quantized_row(unsigned char *base, int cols) {
    QuantizedRow r;
    r.cols = cols;
    r.groups = cols / Q8_GROUP;
    r.stride = quantized_stride(cols);
    r.q = (int8_t *)base;
    r.scale_pairs = (float *)(base + value_bytes(cols));
    r.correction = (float *)(base + value_bytes(cols) + scale_pair_bytes(cols));
    return r;
}

static QuantizedRow token_row(const QuantizedRow *first, int t) {
    return quantized_row((unsigned char *)first->q + (size_t)t * first->stride, first->cols);
}

/* One token: q = round(x / scale) with scale = max|x| / 127 per group of 32. Plain C in every build, so the
 * quantized activations are the same bits everywhere. A group holding an inf or NaN gets q = 0 and a NaN
 * scale: the NaN reaches the output, as it would in f32. q is clamped to [-127, 127] before it becomes an int
 * (127 / amax overflows to inf when amax is subnormal). */
static void quantize_token(QuantizedRow *r, const float *x) {
    memset(r->q, 0, r->stride);
    for (int g = 0; g < r->groups; g++) {
        const float *xg = x + (size_t)g * Q8_GROUP;
        float amax = 0.0f;
        int finite = 1;
        for (int j = 0; j < Q8_GROUP; j++) {
            float a = fabsf(xg[j]);
            if (!(a <= FLT_MAX)) finite = 0;
            else if (a > amax) amax = a;
        }
        float scale = finite ? amax / 127.0f : NAN, inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < Q8_GROUP; j++) {
            float v = xg[j] * inv;
            int q = v >= 127.0f ? 127 : v <= -127.0f ? -127 : v == v ? (int)nearbyintf(v) : 0;
            r->q[g * Q8_GROUP + j] = (int8_t)q;
            sum += q;
        }
        for (int l = 0; l < LANES / 2; l++) r->scale_pairs[(g / 2) * LANES + (g % 2) * (LANES / 2) + l] = scale;
        r->correction[g] = (float)(128 * sum) * scale;
    }
}

#if defined(KERNELS_AVX512)
/* ---------------------------------------------------------------------------------------------
 * AVX-512 */

/* The lane sums of four accumulators at once, in lanes 0, 4, 8, 12. The tree: lanes (l, l+8) added, then
 * (l, l+4), (l, l+2), (l, l+1), as lane_sum16 (ops.h) in the portable kernels. */
ALWAYS_INLINE __m512 lane_sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));
    return _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));
}

ALWAYS_INLINE void store4(float *out, __m512 s) {
    out[0] = _mm512_cvtss_f32(s);
    out[1] = _mm_cvtss_f32(_mm512_extractf32x4_ps(s, 1));
    out[2] = _mm_cvtss_f32(_mm512_extractf32x4_ps(s, 2));
    out[3] = _mm_cvtss_f32(_mm512_extractf32x4_ps(s, 3));
}

/* 16 weights from column k as f32 (mask: the columns that exist) */
ALWAYS_INLINE __m512 load_weights(DType d, const void *row, int k, __mmask16 m) {
    if (d == DTYPE_F32) return _mm512_maskz_loadu_ps(m, (const float *)row + k);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + k);
    if (d == DTYPE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); /* bf16: the top half of an f32 */
}

/* out[t][r] for 4 rows (w[r] rows of `cols` weights) x T tokens (x[t] rows, stride ldx), over columns
 * [k0, k1): the running sums start from `sums` if k0 > 0, and are left there if k1 < cols (see rows_float).
 * stream: these rows come from memory (decode, or prefill's first tile of tokens): prefetch ahead. */
ALWAYS_INLINE void tile_float(DType d, int T, const void *const w[4], int k0, int k1, int cols, const float *x,
                              size_t ldx, float *sums, float *out, size_t ldo, int stream) {
    __m512 acc[4][TOKENS_PER_TILE];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < T; t++) acc[r][t] = k0 ? _mm512_loadu_ps(sums + (r * T + t) * LANES) : _mm512_setzero_ps();
    int k = k0, size = d == DTYPE_F32 ? 4 : 2;
    for (; k + LANES <= k1; k += LANES) {
        __m512 xv[TOKENS_PER_TILE];
        for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_ps(x + t * ldx + k);
        if (stream && (size == 4 || k % 32 == 0)) /* the weights come from memory: ask for them early */
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)w[r] + (size_t)k * size + PREFETCH_BYTES, _MM_HINT_T0);
        for (int r = 0; r < 4; r++) {
            __m512 wv = load_weights(d, w[r], k, 0xFFFF);
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    if (k < k1) {
        __mmask16 m = (__mmask16)((1u << (k1 - k)) - 1);
        __m512 xv[TOKENS_PER_TILE];
        for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(m, x + t * ldx + k);
        for (int r = 0; r < 4; r++) {
            __m512 wv = load_weights(d, w[r], k, m);
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    if (k1 < cols) {
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < T; t++) _mm512_storeu_ps(sums + (r * T + t) * LANES, acc[r][t]);
        return;
    }
    for (int t = 0; t < T; t++) {
        float s[4];
        store4(s, lane_sum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
        for (int r = 0; r < 4; r++) out[t * ldo + r] = s[r];
    }
}

float dot_product(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int k = 0;
    for (; k + LANES <= n; k += LANES) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc);
    }
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))); /* the tree of lane_sum4 */
}

/* VPDPBUSD: per 32-bit lane, sum of 4 products unsigned byte x signed byte */
ALWAYS_INLINE __m512i dot_u8s8(__m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#else /* the same lanes from 16-bit products: pairs with VPMADDWD, then adjacent pairs added */
    __m512i lo = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(u)),
                                   _mm512_cvtepi8_epi16(_mm512_castsi512_si256(s)));
    __m512i hi = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(u, 1)),
                                   _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(s, 1)));
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    return _mm512_add_epi32(_mm512_permutex2var_epi32(lo, even, hi), _mm512_permutex2var_epi32(lo, odd, hi));
#endif
}

/* q8_0 weights: out[t][r] for 4 rows x T tokens.  w[r]: int8 values of a row; ws[r]: its f16 scales. */
ALWAYS_INLINE void tile_q8(int T, const int8_t *const w[4], const uint16_t *const ws[4], int cols,
                           const QuantizedRow *xq, float *out, size_t ldo) {
    __m512 acc[4][Q8_TOKENS_PER_TILE];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int groups = cols / Q8_GROUP;
    QuantizedRow xr[Q8_TOKENS_PER_TILE];
    for (int t = 0; t < T; t++) xr[t] = token_row(xq, t);
    for (int g0 = 0; g0 < groups; g0 += 16) { /* 16 groups: one vector of scales per row */
        int gn = groups - g0 < 16 ? groups - g0 : 16;
        __mmask16 gm = (__mmask16)((1u << gn) - 1);
        __m512 scales[4];
        for (int r = 0; r < 4; r++) scales[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, ws[r] + g0));
        if (T == 1) /* decode: the scales come 16 to a 32-byte load, from a stream of their own */
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(ws[r] + g0) + PREFETCH_BYTES / 16, _MM_HINT_T0);
        /* pick: lanes 0-7 take scale 2p, lanes 8-15 scale 2p+1 */
        __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        for (int p = 0; p < (gn + 1) / 2; p++, pick = _mm512_add_epi32(pick, _mm512_set1_epi32(2))) {
            int g = g0 + 2 * p;
            __m512i xv[Q8_TOKENS_PER_TILE];
            __m512 xs[Q8_TOKENS_PER_TILE];
            for (int t = 0; t < T; t++) {
                xv[t] = _mm512_load_si512((const void *)(xr[t].q + g * Q8_GROUP));
                xs[t] = _mm512_loadu_ps(xr[t].scale_pairs + (size_t)(g / 2) * LANES);
            }
            if (T == 1)
                for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(w[r] + g * Q8_GROUP) + PREFETCH_BYTES, _MM_HINT_T0);
            for (int r = 0; r < 4; r++) {
                __m512i wv = g + 1 < groups ? _mm512_loadu_si512((const void *)(w[r] + g * Q8_GROUP))
                                            : _mm512_zextsi256_si512(_mm256_loadu_si256((const void *)(w[r] + g * Q8_GROUP)));
                wv = _mm512_xor_si512(wv, flip);
                __m512 ws2 = _mm512_permutexvar_ps(pick, scales[r]);
                for (int t = 0; t < T; t++) {
                    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dot_u8s8(wv, xv[t])), ws2);
                    acc[r][t] = _mm512_fmadd_ps(f, xs[t], acc[r][t]);
                }
            }
        }
    }
    /* subtract 128 * sum(q) * scales for the +128 on the weights: sum over groups of w_scale * correction */
    __m512 corr[4][Q8_TOKENS_PER_TILE];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < T; t++) corr[r][t] = _mm512_setzero_ps();
    for (int g0 = 0; g0 < groups; g0 += 16) {
        __mmask16 gm = (__mmask16)((1u << (groups - g0 < 16 ? groups - g0 : 16)) - 1);
        for (int r = 0; r < 4; r++) {
            __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, ws[r] + g0));
            for (int t = 0; t < T; t++) corr[r][t] = _mm512_fmadd_ps(s, _mm512_loadu_ps(xr[t].correction + g0), corr[r][t]);
        }
    }
    for (int t = 0; t < T; t++) {
        __m512 s = _mm512_sub_ps(lane_sum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]),
                                 lane_sum4(corr[0][t], corr[1][t], corr[2][t], corr[3][t]));
        float v[4];
        store4(v, s);
        for (int r = 0; r < 4; r++) out[t * ldo + r] = v[r];
    }
}
#define COLUMN_BLOCK 1024 /* columns per pass: 6 tokens x 1024 f32 = 24 KiB of activations stay in L1 */

#elif defined(KERNELS_AVX2)
/* ---------------------------------------------------------------------------------------------
 * AVX2 + FMA: the same 16 lanes as two 8-lane halves */

typedef struct {
    __m256 lo, hi;
} Lanes16;

ALWAYS_INLINE float lane_sum(Lanes16 a) {
    __m256 s8 = _mm256_add_ps(a.lo, a.hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

/* 8 weights as f32 from column k; n < 8: only the first n exist */
ALWAYS_INLINE __m256 load_weights8(DType d, const void *row, int k, int n) {
    if (n < 8) {
        float tmp[8] = {0};
        for (int i = 0; i < n; i++)
            tmp[i] = d == DTYPE_F32 ? ((const float *)row)[k + i]
                   : d == DTYPE_F16 ? f16_to_f32(((const uint16_t *)row)[k + i])
                                    : bf16_to_f32(((const uint16_t *)row)[k + i]);
        return _mm256_loadu_ps(tmp);
    }
    if (d == DTYPE_F32) return _mm256_loadu_ps((const float *)row + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
    if (d == DTYPE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

ALWAYS_INLINE __m256 load_x8(const float *x, int k, int n) {
    if (n >= 8) return _mm256_loadu_ps(x + k);
    float tmp[8] = {0};
    for (int i = 0; i < n; i++) tmp[i] = x[k + i];
    return _mm256_loadu_ps(tmp);
}

float dot_product(const float *a, const float *b, int n) {
    Lanes16 acc = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int k = 0; k < n; k += LANES) {
        acc.lo = _mm256_fmadd_ps(load_x8(a, k, n - k), load_x8(b, k, n - k), acc.lo);
        acc.hi = _mm256_fmadd_ps(load_x8(a, k + 8, n - k - 8), load_x8(b, k + 8, n - k - 8), acc.hi);
    }
    return lane_sum(acc);
}

/* AVX2 has 16 registers: 4 rows x 1 token, or 2 rows x 2 tokens at a time */
ALWAYS_INLINE void block_float(DType d, int R, int T, const void *const *w, int cols, const float *x, size_t ldx,
                               float *out, size_t ldo) {
    Lanes16 acc[4][2];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t].lo = acc[r][t].hi = _mm256_setzero_ps();
    for (int k = 0; k < cols; k += LANES) {
        int left = cols - k;
        __m256 xl[2], xh[2];
        for (int t = 0; t < T; t++) {
            xl[t] = load_x8(x + t * ldx, k, left);
            xh[t] = load_x8(x + t * ldx, k + 8, left - 8);
        }
        if (T == 1) /* decode streams the weights: ask for them early */
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)w[r] + (size_t)k * (d == DTYPE_F32 ? 4 : 2) + PREFETCH_BYTES, _MM_HINT_T0);
        for (int r = 0; r < R; r++) {
            __m256 wl = load_weights8(d, w[r], k, left);
            __m256 wh = left > 8 ? load_weights8(d, w[r], k + 8, left - 8) : _mm256_setzero_ps();
            for (int t = 0; t < T; t++) {
                acc[r][t].lo = _mm256_fmadd_ps(wl, xl[t], acc[r][t].lo);
                acc[r][t].hi = _mm256_fmadd_ps(wh, xh[t], acc[r][t].hi);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[t * ldo + r] = lane_sum(acc[r][t]);
}

/* the whole of every row in one pass (COLUMN_BLOCK is all columns here) */
ALWAYS_INLINE void tile_float(DType d, int T, const void *const w[4], int k0, int k1, int cols, const float *x,
                              size_t ldx, float *sums, float *out, size_t ldo, int stream) {
    (void)k0, (void)k1, (void)sums, (void)stream; /* block_float prefetches for one token */
    if (T == 1) {
        block_float(d, 4, 1, w, cols, x, ldx, out, ldo);
        return;
    }
    for (int t = 0; t < T; t += 2)
        for (int r = 0; r < 4; r += 2)
            if (T - t >= 2) block_float(d, 2, 2, w + r, cols, x + t * ldx, ldx, out + t * ldo + r, ldo);
            else block_float(d, 2, 1, w + r, cols, x + t * ldx, ldx, out + t * ldo + r, ldo);
}

/* lanes of 4 products unsigned x signed byte (as VPDPBUSD) for 32 bytes: 16-bit products, pairs, pairs of pairs */
ALWAYS_INLINE __m256i dot_u8s8_32(__m256i u, __m256i s) {
    __m256i a = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(u)), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(s)));
    __m256i b = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1)),
                                  _mm256_cvtepi8_epi16(_mm256_extracti128_si256(s, 1)));
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0xD8);
}

ALWAYS_INLINE void tile_q8(int T, const int8_t *const w[4], const uint16_t *const ws[4], int cols,
                           const QuantizedRow *xq, float *out, size_t ldo) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    int groups = cols / Q8_GROUP;
    for (int t = 0; t < T; t++) {
        QuantizedRow xr = token_row(xq, t);
        for (int r = 0; r < 4; r++) {
            Lanes16 acc = {_mm256_setzero_ps(), _mm256_setzero_ps()}, corr = acc;
            for (int g = 0; g < groups; g++) {
                if (T == 1 && g % 2 == 0) _mm_prefetch((const char *)(w[r] + g * Q8_GROUP) + PREFETCH_BYTES, _MM_HINT_T0);
                __m256i wv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w[r] + g * Q8_GROUP)), flip);
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xr.q + g * Q8_GROUP));
                __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_u8s8_32(wv, xv)), _mm256_set1_ps(f16_to_f32(ws[r][g])));
                __m256 xs = _mm256_set1_ps(xr.scale_pairs[(g / 2) * LANES + (g % 2) * 8]);
                if (g % 2 == 0) acc.lo = _mm256_fmadd_ps(f, xs, acc.lo);
                else acc.hi = _mm256_fmadd_ps(f, xs, acc.hi);
            }
            for (int g0 = 0; g0 < groups; g0 += 16) {
                float s[16] = {0};
                for (int i = 0; i < 16 && g0 + i < groups; i++) s[i] = f16_to_f32(ws[r][g0 + i]);
                corr.lo = _mm256_fmadd_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(xr.correction + g0), corr.lo);
                corr.hi = _mm256_fmadd_ps(_mm256_loadu_ps(s + 8), _mm256_loadu_ps(xr.correction + g0 + 8), corr.hi);
            }
            out[t * ldo + r] = lane_sum(acc) - lane_sum(corr);
        }
    }
}
#define COLUMN_BLOCK (1 << 30)

#else
/* ---------------------------------------------------------------------------------------------
 * portable C: the same lanes and order. Where the target has a fused multiply-add (FP_FAST_FMAF: aarch64,
 * x86 with -mfma) it is used and the results are the SIMD kernels' bit for bit; elsewhere (plain x86-64)
 * a*b+c is rounded twice and the last bits differ. */

#ifdef FP_FAST_FMAF
#define MULTIPLY_ADD(a, b, c) fmaf(a, b, c)
#else
#define MULTIPLY_ADD(a, b, c) ((a) * (b) + (c))
#endif

static float weight_at(DType d, const void *row, int k) {
    if (d == DTYPE_F32) return ((const float *)row)[k];
    if (d == DTYPE_F16) return f16_to_f32(((const uint16_t *)row)[k]);
    return bf16_to_f32(((const uint16_t *)row)[k]);
}

float dot_product(const float *a, const float *b, int n) {
    float acc[LANES] = {0};
    for (int k = 0; k < n; k += LANES)
        for (int l = 0; l < LANES && k + l < n; l++) acc[l] = MULTIPLY_ADD(a[k + l], b[k + l], acc[l]);
    return lane_sum16(acc);
}

/* the whole of every row in one pass (COLUMN_BLOCK is all columns here) */
static void tile_float(DType d, int T, const void *const w[4], int k0, int k1, int cols, const float *x, size_t ldx,
                       float *sums, float *out, size_t ldo, int stream) {
    (void)k0, (void)k1, (void)sums, (void)stream;
    float wrow[LANES];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < T; t++) {
            float acc[LANES] = {0};
            const float *xt = x + t * ldx;
            for (int k = 0; k < cols; k += LANES) {
                int n = cols - k < LANES ? cols - k : LANES;
                for (int l = 0; l < n; l++) wrow[l] = weight_at(d, w[r], k + l);
                for (int l = 0; l < n; l++) acc[l] = MULTIPLY_ADD(wrow[l], xt[k + l], acc[l]);
            }
            out[t * ldo + r] = lane_sum16(acc);
        }
}

static void tile_q8(int T, const int8_t *const w[4], const uint16_t *const ws[4], int cols, const QuantizedRow *xq,
                    float *out, size_t ldo) {
    int groups = cols / Q8_GROUP;
    for (int t = 0; t < T; t++) {
        QuantizedRow xr = token_row(xq, t);
        for (int r = 0; r < 4; r++) {
            float acc[LANES] = {0}, corr[LANES] = {0};
            for (int g = 0; g < groups; g++) {
                float wscale = f16_to_f32(ws[r][g]), xscale = xr.scale_pairs[(g / 2) * LANES + (g % 2) * 8];
                for (int l = 0; l < 8; l++) { /* lane (g % 2) * 8 + l: 4 products of (w + 128) and x */
                    int s = 0;
                    for (int j = 0; j < 4; j++) s += (w[r][g * Q8_GROUP + 4 * l + j] + 128) * xr.q[g * Q8_GROUP + 4 * l + j];
                    float f = (float)s * wscale;
                    acc[(g % 2) * 8 + l] = MULTIPLY_ADD(f, xscale, acc[(g % 2) * 8 + l]);
                }
            }
            for (int g = 0; g < groups; g++) corr[g % LANES] = MULTIPLY_ADD(f16_to_f32(ws[r][g]), xr.correction[g], corr[g % LANES]);
            out[t * ldo + r] = lane_sum16(acc) - lane_sum16(corr);
        }
    }
}
#define COLUMN_BLOCK (1 << 30)
#endif

/* ---------------------------------------------------------------------------------------------
 * rows lo..hi of one weight for all n tokens, tile by tile */

/* The 4 rows of a tile starting at row r; past the last row, repeat it (its outputs are dropped). */
static void tile_rows(const void *rows[4], const Tensor *w, int r, int hi, size_t row_bytes) {
    for (int i = 0; i < 4; i++) rows[i] = (const char *)w->data + (size_t)(r + i < hi ? r + i : hi - 1) * row_bytes;
}

/* Prefill order: a block of weight rows small enough to stay in L2 (ROW_BLOCK_BYTES); for each tile of
 * tokens, the columns in passes of COLUMN_BLOCK (the tokens' slice stays in L1), each pass over every 4-row
 * tile of the block. Weights come from memory once per call, activations from L1. Between passes a tile's
 * running sums wait in `sums`; each lane still adds its products in column order, so the passes change
 * nothing in the result. */
#define ROW_BLOCK_BYTES (512 * 1024)
#define MAX_BLOCK_TILES 64 /* with several column passes, rows are >= 2 KiB: a block has <= 256 rows */

ALWAYS_INLINE void rows_float(DType d, float *out, const float *x, const Tensor *w, int n, int lo, int hi) {
    static _Thread_local float sums[MAX_BLOCK_TILES][4 * TOKENS_PER_TILE * LANES];
    size_t row_bytes = (size_t)w->cols * (d == DTYPE_F32 ? 4 : 2);
    int block = (int)(ROW_BLOCK_BYTES / row_bytes) / 4 * 4;
    block = block < 4 ? 4 : block > 4 * MAX_BLOCK_TILES ? 4 * MAX_BLOCK_TILES : block;
    for (int r0 = lo; r0 < hi; r0 += block) {
        int r1 = hi - r0 < block ? hi : r0 + block;
        for (int t = 0; t < n; t += TOKENS_PER_TILE) {
            int T = n - t < TOKENS_PER_TILE ? n - t : TOKENS_PER_TILE;
            const float *xt = x + (size_t)t * w->cols;
            for (int k0 = 0; k0 < w->cols; k0 += COLUMN_BLOCK) {
                int k1 = w->cols - k0 > COLUMN_BLOCK ? k0 + COLUMN_BLOCK : w->cols;
                for (int r = r0; r < r1; r += ROWS_PER_TILE) {
                    const void *rows[4];
                    tile_rows(rows, w, r, r1, row_bytes);
                    float part[TOKENS_PER_TILE][4], *tile_sums = sums[(r - r0) / 4];
                    int full = r1 - r >= 4;
                    float *dst = full ? out + (size_t)t * w->rows + r : &part[0][0];
                    size_t ldo = full ? (size_t)w->rows : 4;
                    int stream = t == 0; /* the first tile of tokens brings the block of rows in from memory */
                    switch (T) { /* one specialised kernel per tile width */
                    case 1: tile_float(d, 1, rows, k0, k1, w->cols, xt, w->cols, tile_sums, dst, ldo, stream); break;
                    case 2: tile_float(d, 2, rows, k0, k1, w->cols, xt, w->cols, tile_sums, dst, ldo, stream); break;
                    case 3: tile_float(d, 3, rows, k0, k1, w->cols, xt, w->cols, tile_sums, dst, ldo, stream); break;
                    case 4: tile_float(d, 4, rows, k0, k1, w->cols, xt, w->cols, tile_sums, dst, ldo, stream); break;
                    case 5: tile_float(d, 5, rows, k0, k1, w->cols, xt, w->cols, tile_sums, dst, ldo, stream); break;
                    default: tile_float(d, TOKENS_PER_TILE, rows, k0, k1, w->cols, xt, w->cols, tile_sums, dst, ldo, stream); break;
                    }
                    if (!full && k1 == w->cols)
                        for (int i = 0; i < T; i++)
                            for (int j = 0; j < r1 - r; j++) out[(size_t)(t + i) * w->rows + r + j] = part[i][j];
                }
            }
        }
    }
}

static void rows_q8(float *out, const QuantizedRow *xq, const Tensor *w, int n, int lo, int hi) {
    const int8_t *values = w->data;
    const uint16_t *scales = (const uint16_t *)(values + (size_t)w->rows * w->cols);
    int groups = w->cols / Q8_GROUP;
    for (int r = lo; r < hi; r += ROWS_PER_TILE) {
        const int8_t *rows[4];
        const uint16_t *row_scales[4];
        for (int i = 0; i < 4; i++) {
            int ri = r + i < hi ? r + i : hi - 1;
            rows[i] = values + (size_t)ri * w->cols;
            row_scales[i] = scales + (size_t)ri * groups;
        }
        float part[Q8_TOKENS_PER_TILE][4];
        int full = hi - r >= 4;
        for (int t = 0; t < n; t += Q8_TOKENS_PER_TILE) {
            int T = n - t < Q8_TOKENS_PER_TILE ? n - t : Q8_TOKENS_PER_TILE;
            float *dst = full ? out + (size_t)t * w->rows + r : &part[0][0];
            size_t ldo = full ? (size_t)w->rows : 4;
            QuantizedRow xt = token_row(xq, t);
            switch (T) {
            case 1: tile_q8(1, rows, row_scales, w->cols, &xt, dst, ldo); break;
            case 2: tile_q8(2, rows, row_scales, w->cols, &xt, dst, ldo); break;
            default: tile_q8(Q8_TOKENS_PER_TILE, rows, row_scales, w->cols, &xt, dst, ldo); break;
            }
            if (!full)
                for (int i = 0; i < T; i++)
                    for (int j = 0; j < hi - r; j++) out[(size_t)(t + i) * w->rows + r + j] = part[i][j];
        }
    }
}

static void matmul_rows(float *out, const float *x, const QuantizedRow *xq, const Tensor *w, int n, int lo, int hi) {
    if (lo >= hi) return;
    switch (w->dtype) {
    case DTYPE_F32: rows_float(DTYPE_F32, out, x, w, n, lo, hi); break;
    case DTYPE_F16: rows_float(DTYPE_F16, out, x, w, n, lo, hi); break;
    case DTYPE_BF16: rows_float(DTYPE_BF16, out, x, w, n, lo, hi); break;
    case DTYPE_Q8_0: rows_q8(out, xq, w, n, lo, hi); break;
    }
}

/* ---------------------------------------------------------------------------------------------
 * scheduling: the rows of the weights as items of 16 rows (a cache line of outputs, so that two threads
 * never write the same line), claimed in chunks by the threads as they come free (parallel.c) */

#define ROWS_PER_ITEM 16

static int uses_blas(const Tensor *w, int n) {
#ifdef USE_BLAS
    return w->dtype == DTYPE_F32 && n > 1;
#else
    (void)w, (void)n;
    return 0;
#endif
}

int matmul_reserve(int max_tokens, int max_cols) {
    size_t need = quantized_stride(max_cols) * (size_t)max_tokens;
    if (need <= scratch.size) return 0;
    free(scratch.data);
    scratch.size = 0;
    scratch.data = aligned_alloc(64, need); /* need is a multiple of 64 */
    if (!scratch.data) return -1;
    scratch.size = need;
    return 0;
}

/* q8_0 weights need x quantized: into the scratch buffer, once for all the weights of this call */
static QuantizedRow quantize_input(const float *x, int n, int cols) {
    if (matmul_reserve(n, cols) != 0) {
        fputs("error: out of memory for the quantized activations\n", stderr);
        exit(1);
    }
    QuantizedRow xq = quantized_row(scratch.data, cols);
    for (int t = 0; t < n; t++) {
        QuantizedRow r = token_row(&xq, t);
        quantize_token(&r, x + (size_t)t * cols);
    }
    return xq;
}

typedef struct {
    const Projection *p;
    int count, n;
    const float *x;
    const QuantizedRow *xq;
    int first_item[5]; /* projection j's items are first_item[j] .. first_item[j + 1] - 1 */
} MatmulJob;

/* items [begin, end): for each projection they cover, its rows in one call */
static void matmul_items(void *arg, int begin, int end) {
    const MatmulJob *job = arg;
    for (int j = 0; j < job->count; j++) {
        int lo = begin > job->first_item[j] ? begin : job->first_item[j];
        int hi = end < job->first_item[j + 1] ? end : job->first_item[j + 1];
        if (lo >= hi) continue;
        const Projection *p = &job->p[j];
        int r0 = (lo - job->first_item[j]) * ROWS_PER_ITEM, r1 = (hi - job->first_item[j]) * ROWS_PER_ITEM;
        matmul_rows(p->out, job->x, job->xq, p->w, job->n, r0, r1 < p->w->rows ? r1 : p->w->rows);
    }
}

void matmul_many(const Projection *p, int count, const float *x, int n) {
    if (count > 4) { /* four at most per job (q, k, v; gate, up) */
        matmul_many(p, 4, x, n);
        matmul_many(p + 4, count - 4, x, n);
        return;
    }
    QuantizedRow xq = {0};
    MatmulJob job = {p, count, n, x, &xq, {0}};
    long long macs = 0;
    int cols = p[0].w->cols, quantized = 0;
    for (int j = 0; j < count; j++) {
        quantized |= p[j].w->dtype == DTYPE_Q8_0;
        int items = uses_blas(p[j].w, n) ? 0 : (p[j].w->rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM; /* BLAS: below */
        job.first_item[j + 1] = job.first_item[j] + items;
        macs += items ? (long long)p[j].w->rows * p[j].w->cols * n : 0;
    }
    if (quantized) xq = quantize_input(x, n, cols);
#ifdef USE_BLAS
    static int blas_threads;
    if (!blas_threads) openblas_set_num_threads(blas_threads = parallel_threads());
    for (int j = 0; j < count; j++)
        if (uses_blas(p[j].w, n))
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, p[j].w->rows, cols, 1.0f, x, cols, p[j].w->data,
                        cols, 0.0f, p[j].out, p[j].w->rows);
#endif
    parallel_for(job.first_item[count], 1, macs, matmul_items, &job);
}

void matmul(float *out, const float *x, const Tensor *w, int n) { matmul_many(&(Projection){out, w}, 1, x, n); }

void matmul_serial(float *out, const float *x, const Tensor *w, int n) { matmul_rows(out, x, NULL, w, n, 0, w->rows); }
