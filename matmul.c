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
 * q8_0 / q4_0 (weights: int8 or 4-bit in groups of 32, one f16 scale per group): the activations of each
 * token are quantized per group of 32 too (quantize_token: scale max|x|/127, round to nearest even), and
 * each group's dot product S_g is an exact integer sum. The output is sum_g (S_g x w_scale) x x_scale, the
 * groups in lane g mod 16 and the lanes by the same tree: since S_g is exact, it does not matter how the
 * hardware forms it. VPDPBUSD multiplies unsigned by signed bytes: q8_0 weights are flipped to unsigned by
 * adding 128 (w ^ 0x80) and 128 x sum(x group) is subtracted from the sum (q4_0's 4-bit values are unsigned
 * already, their offset 8). Products of 6 tokens or more (prefill, --samples steps) run on AMX-INT8 tiles where
 * the CPU has them (TDPBSSD: the exact S_g of 16 rows x 16 tokens), the same float steps after. Without
 * tiles, AVX-512 products of 2 tokens or more use rows transposed so that VPDPBUSD leaves S_g in lane g
 * (rows_many: no shuffle per token; measured on Zen 5, 110M q8_0: prefill 512 +45%, --samples 8 +50%).
 *
 * Kernels: AVX-512 (VNNI for q8_0 / q4_0; AMX detected at run time), AVX2 + FMA + F16C, and portable C
 * (make PORTABLE=1), chosen at build time from the compiler's target. They follow the same lane scheme and
 * give the same bits, except that portable C on a target without a fused multiply-add rounds a*b+c twice
 * (tests/test_speed.py bounds the difference). --bf16-prefill puts f32 / bf16 prompts on AMX-BF16 tiles, which
 * round the activations to bf16: faster, not the same bits (docs/FORMAT.md).
 *
 * Decode also prefetches the weights a tile ahead (PREFETCH_AHEAD): the hardware prefetchers alone leave
 * much of the bandwidth unused.
 *
 * Threads (parallel.c): the rows of each weight are cut into items of 16 rows that the threads claim in
 * chunks as they come free, and matmul_many() runs several weights with the same input (q, k, v; gate, up)
 * as one job. Products too small to be worth waking the threads for run on the calling thread. make BLAS=1
 * hands f32 prefill products to cblas_sgemm.
 *
 * Attention's inner loops (dot_product4, dot_product16, add_scaled_rows) are here too, beside the SIMD they
 * share. */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <math.h>
#if defined(__linux__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#ifdef USE_BLAS
#include <cblas.h>
#endif

#include "ops.h"
#include "profile.h"

/* Decode prefetches the weights (a one-token bf16 product over a 49 MB matrix streamed 9 GB/s without, 21-25
 * GB/s with) */
#ifndef PREFETCH_TILES
#define PREFETCH_TILES 1
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif
/* where decode prefetches, ahead of a place in a row of row_bytes: the same place PREFETCH_TILES tiles of 4
 * rows on (the rows of a tile lie one after the other), into L2. Measured on the 1B shape under load, against
 * 2-16 KiB ahead in the same row into L1 (the old way): +20-70% q8_0 and bf16 decode. */
#define PREFETCH_AHEAD(row_bytes) ((size_t)(row_bytes) * 4 * PREFETCH_TILES)

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
#define WIDE_TILE_TOKENS 8     /* AVX-512: products of 7 or 8 tokens in one tile (tile_float_wide) */
#define Q8_TOKENS_PER_TILE 3   /* q8_0 tiles: 4 rows x up to 3 tokens */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* a*b+c rounded once where the target has a fused multiply-add (FP_FAST_FMAF: aarch64, x86 with -mfma), as the
 * SIMD kernels do; elsewhere (plain x86-64) rounded twice, and the last bits differ */
#ifdef FP_FAST_FMAF
#define MULTIPLY_ADD(a, b, c) fmaf(a, b, c)
#else
#define MULTIPLY_ADD(a, b, c) ((a) * (b) + (c))
#endif


/* ---------------------------------------------------------------------------------------------
 * q8_0 activations: x[n][cols] quantized per group of 32, in the caller's MatmulScratch, shared by all threads */

static size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }

typedef struct {
    int cols, groups;          /* groups = cols / 32 */
    size_t stride;             /* bytes per token */
    int8_t *q;                 /* [cols] values, padded with zeros to a whole number of group pairs */
    float *scale;              /* [groups rounded up to 16]: max|x| / 127 of each group, zero padded */
    int32_t *sum;              /* [groups rounded up to 16]: sum of each group's q, zero padded */
    int8_t *qt;                /* AVX-512: the values again, per block of 16 groups as transpose_groups lays
                                  them out, zero padded, before tile_token copies them; [groups rounded up to 16][32] */
    unsigned char *tiles;      /* AVX-512, the first token's row only: qt, sum and scale of every token again,
                                  by tile of TILE_TOKENS tokens (tile_token) for rows_many and rows_packed, or NULL */
} QuantizedRow;

/* rows_many's and rows_packed's tokens: per tile of TILE_TOKENS tokens, per block of 16 groups, per token a TILE_SLOT-byte slot
 * of its 8 transposed vectors (512 bytes), then the 16 group sums and the 16 scales. A block's tokens lie at
 * fixed distances from one pointer, so the kernel's 8 tokens take one address register instead of three each
 * (with a stride per token, gcc spilled the addresses to the stack: Zen 5, 8 tokens x 768 x 2048 in L2, one
 * thread, 131 -> 157 GMAC/s; --samples 8 q8_0 on the 110M shape +12-24%, prefill 512 +29%). */
#define TILE_TOKENS 8
#define TILE_SLOT 640
static size_t tile_bytes(int n, int cols) {
    return round_up((size_t)n, TILE_TOKENS) * (size_t)((cols / Q8_GROUP + 15) / 16) * TILE_SLOT;
}

/* a token's bytes: values, scales, sums, each a multiple of 64 bytes */
static size_t value_bytes(int cols) { return round_up((size_t)cols, 2 * Q8_GROUP); }
static size_t group_bytes(int cols) { return round_up((size_t)(cols / Q8_GROUP), LANES) * 4; }
static size_t quantized_stride(int cols) { return value_bytes(cols) + 2 * group_bytes(cols) + 8 * group_bytes(cols); }

static QuantizedRow quantized_row(unsigned char *base, int cols) {
    QuantizedRow r;
    r.cols = cols;
    r.groups = cols / Q8_GROUP;
    r.stride = quantized_stride(cols);
    r.q = (int8_t *)base;
    r.scale = (float *)(base + value_bytes(cols));
    r.sum = (int32_t *)(base + value_bytes(cols) + group_bytes(cols));
    r.qt = (int8_t *)(base + value_bytes(cols) + 2 * group_bytes(cols));
    r.tiles = NULL;
    return r;
}

static QuantizedRow token_row(const QuantizedRow *first, int t) {
    return quantized_row((unsigned char *)first->q + (size_t)t * first->stride, first->cols);
}

/* Bytes of one row's values (q8_0: cols int8, q4_0: cols / 2), and where its f16 scales start */
static size_t quantized_row_bytes(const Tensor *w) { return w->dtype == DTYPE_Q4_0 ? (size_t)w->cols / 2 : (size_t)w->cols; }
static const uint16_t *quantized_scales(const Tensor *w) {
    return (const uint16_t *)((const uint8_t *)w->data + (size_t)w->rows * quantized_row_bytes(w));
}

float quantize_q8_group(int8_t *q, const float *x, int n) {
    float amax = 0.0f;
    int finite = 1;
    for (int j = 0; j < n; j++) {
        float a = fabsf(x[j]);
        if (!(a <= FLT_MAX)) finite = 0;
        else if (a > amax) amax = a;
    }
    float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int j = 0; j < n; j++) {
        float v = x[j] * inv;
        q[j] = (int8_t)(v >= 127.0f ? 127 : v <= -127.0f ? -127 : v == v ? (int)nearbyintf(v) : 0);
    }
    return finite ? amax / 127.0f : NAN;
}

/* One group of a token, with the sum of its q (the SIMD version below gives the same bits) */
static void quantize_group(QuantizedRow *r, int g, const float *xg) {
    int8_t *q = r->q + g * Q8_GROUP;
    r->scale[g] = quantize_q8_group(q, xg, Q8_GROUP);
    int sum = 0;
    for (int j = 0; j < Q8_GROUP; j++) sum += q[j];
    r->sum[g] = sum;
}

#if !defined(KERNELS_AVX512) /* AVX-512 has its own, below */
static void quantize_token(QuantizedRow *r, const float *x) {
    memset(r->q, 0, r->stride);
    for (int g = 0; g < r->groups; g++) quantize_group(r, g, x + g * Q8_GROUP);
}
#endif

/* ---------------------------------------------------------------------------------------------
 * q8_0 activations for the tile matrix units (AMX, below) */

/* q8_0 / q4_0 products of this many tokens or more go to the AMX-INT8 tiles (the same bits): fewer leave most of
 * a 16-token tile empty. Against the row-by-row kernel (--samples N of the 110M q8_0 model) N = 6-16 ran
 * +20-35% faster on the tiles, N = 4 slower; against the packed rows (matmul_pack), which take the products of
 * fewer tokens, the tiles win from 32 tokens (prefill 512 in turns of --batch B: B = 8 0.65x, 16 0.90x, 32 1.0x,
 * 64 1.2x; with store_tile B = 16 and --samples 12 / 16 tie). --bf16-prefill's tiles, which change the bits,
 * take prompts of 16 tokens or more only. */
#define AMX_MIN_TOKENS 6
#define AMX_PACKED_MIN_TOKENS 32
#define AMX_BF16_MIN_TOKENS 16

/* The VNNI layout of quantized tokens: per block of 16 tokens and group g, 8 rows (4-byte column pieces
 * k = 0 .. 7 of the group) of 16 tokens x 4 bytes; then per block and group the 16 tokens' scales. Tokens
 * past n are zeros. */
typedef struct {
    int blocks, groups;
    int8_t *q;      /* [blocks][groups][8][16][4] */
    float *scale;   /* [blocks][groups][16] */
} VnniTokens;

static size_t vnni_bytes(int n, int cols) {
    size_t blocks = (size_t)(n + 15) / 16, groups = (size_t)(cols / Q8_GROUP);
    return blocks * groups * (512 + 64);
}

typedef struct {
    const VnniTokens *v;
    const QuantizedRow *xq;
    int n;
} VnniJob;

/* blocks [begin, end) of 16 tokens */
static void vnni_blocks(void *arg, int begin, int end) {
    const VnniJob *job = arg;
    const VnniTokens *v = job->v;
    for (int t = begin * 16; t < end * 16 && t < job->n; t++) {
        QuantizedRow r = token_row(job->xq, t);
        int b = t / 16, m = t % 16;
        for (int g = 0; g < v->groups; g++) {
            int8_t *dst = v->q + ((size_t)b * v->groups + g) * 512 + m * 4;
            for (int k = 0; k < 8; k++) memcpy(dst + k * 64, r.q + g * Q8_GROUP + k * 4, 4);
            v->scale[((size_t)b * v->groups + g) * 16 + m] = r.scale[g];
        }
    }
}

static void vnni_tokens(VnniTokens *v, const QuantizedRow *xq, int n, unsigned char *base) {
    v->blocks = (n + 15) / 16;
    v->groups = xq->groups;
    v->q = (int8_t *)base;
    v->scale = (float *)(base + (size_t)v->blocks * v->groups * 512);
    memset(base, 0, vnni_bytes(n, xq->cols));
    VnniJob job = {v, xq, n};
    parallel_for(v->blocks, 1, (long long)n * xq->cols, vnni_blocks, &job);
}

/* The tile units this CPU has and Linux lets this process use (XTILEDATA permission): AMX_INT8 | AMX_BF16 */
enum { AMX_INT8 = 1, AMX_BF16 = 2 };
static int amx_features(void) {
    static int features = -1;
    if (features >= 0) return features;
    features = 0;
#if defined(KERNELS_AVX512) && defined(__linux__) && defined(__x86_64__)
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && getenv("ATTN_NO_AMX") == NULL && /* tests compare */
        syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0)
        features = (d >> 25 & 1 ? AMX_INT8 : 0) | (d >> 22 & 1 ? AMX_BF16 : 0);
#endif
    return features;
}

/* --bf16-prefill: f32 / bf16 products of 16 tokens or more on AMX-BF16 tiles (matmul_bf16_prefill) */
static int bf16_prefill;
void matmul_bf16_prefill(int on) { bf16_prefill = on; }

/* Tokens as bf16 in the tiles' pair layout: per block of 16 tokens and 32 columns, 16 rows (column pairs) of
 * 16 tokens x 2 values; tokens past n are zeros */
static void bf16_tokens(uint16_t *v, const float *x, int n, int cols) {
    int blocks = (n + 15) / 16, chunks = cols / 32;
    memset(v, 0, (size_t)blocks * 16 * cols * 2);
    for (int t = 0; t < n; t++)
        for (int k = 0; k < cols; k++)
            v[(((size_t)(t / 16) * chunks + k / 32) * 16 + k % 32 / 2) * 32 + t % 16 * 2 + k % 2] = bf16_round(x[(size_t)t * cols + k]);
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

/* The tree of lane_sum4 for one accumulator */
ALWAYS_INLINE float lane_sum(__m512 acc) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
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
            for (int r = 0; r < 4; r++)
                _mm_prefetch((const char *)w[r] + (size_t)k * size + PREFETCH_AHEAD((size_t)cols * size), PREFETCH_HINT);
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

/* tile_float's sums for 7 or 8 tokens in one pass: two rows at a time (2 x 8 accumulators, 8 token vectors and
 * a weight vector in registers), so that the rows come from memory once for all the tokens, where 6 + 2 would
 * read them twice (the second time from L2). Each lane adds its products in column order as tile_float's do,
 * and lane_sum has lane_sum4's tree: the same bits. */
ALWAYS_INLINE void pair_float(DType d, int T, const void *w0, const void *w1, int k0, int k1, int cols, const float *x,
                              size_t ldx, float *sums, float *out, size_t ldo, int stream) {
    __m512 acc[2][WIDE_TILE_TOKENS];
    const void *w[2] = {w0, w1};
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < T; t++) acc[r][t] = k0 ? _mm512_loadu_ps(sums + (r * T + t) * LANES) : _mm512_setzero_ps();
    int k = k0, size = d == DTYPE_F32 ? 4 : 2;
    for (; k < k1; k += LANES) {
        __mmask16 m = (__mmask16)(k1 - k >= LANES ? 0xFFFF : (1u << (k1 - k)) - 1);
        if (stream && (size == 4 || k % 32 == 0))
            for (int r = 0; r < 2; r++)
                _mm_prefetch((const char *)w[r] + (size_t)k * size + PREFETCH_AHEAD((size_t)cols * size), PREFETCH_HINT);
        __m512 w0v = load_weights(d, w[0], k, m), w1v = load_weights(d, w[1], k, m);
        for (int t = 0; t < T; t++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + t * ldx + k);
            acc[0][t] = _mm512_fmadd_ps(w0v, xv, acc[0][t]);
            acc[1][t] = _mm512_fmadd_ps(w1v, xv, acc[1][t]);
        }
    }
    if (k1 < cols) {
        for (int r = 0; r < 2; r++)
            for (int t = 0; t < T; t++) _mm512_storeu_ps(sums + (r * T + t) * LANES, acc[r][t]);
        return;
    }
    for (int t = 0; t < T; t++)
        for (int r = 0; r < 2; r++) out[t * ldo + r] = lane_sum(acc[r][t]);
}

ALWAYS_INLINE void tile_float_wide(DType d, int T, const void *const w[4], int k0, int k1, int cols, const float *x,
                                   size_t ldx, float *sums, float *out, size_t ldo, int stream) {
    pair_float(d, T, w[0], w[1], k0, k1, cols, x, ldx, sums, out, ldo, stream);
    pair_float(d, T, w[2], w[3], k0, k1, cols, x, ldx, sums + 2 * T * LANES, out + 2, ldo, stream);
}
#define WIDE_TILE 1

/* Decode's product of one bf16 / f16 row with the token: tile_float's sums for T = 1, one row after another (a
 * lane's products go in column order either way: the same bits). Measured on a Zen 5, the 110M shape in bf16, 2
 * threads, five interleaved rounds: 156 -> 181 tok/s against four rows side by side (and 158 for two). f32 rows,
 * one FMA chain each twice as long for the same work, went the other way (83 -> 73): they keep tile_float. */
ALWAYS_INLINE float row_dot_stream(DType d, const void *w, const float *x, int cols) {
    int size = d == DTYPE_F32 ? 4 : 2, k = 0;
    size_t ahead = PREFETCH_AHEAD((size_t)cols * size);
    __m512 acc = _mm512_setzero_ps();
    for (; k + LANES <= cols; k += LANES) {
        if (size == 4 || k % 32 == 0) _mm_prefetch((const char *)w + (size_t)k * size + ahead, PREFETCH_HINT);
        acc = _mm512_fmadd_ps(load_weights(d, w, k, 0xFFFF), _mm512_loadu_ps(x + k), acc);
    }
    if (k < cols) {
        __mmask16 m = (__mmask16)((1u << (cols - k)) - 1);
        acc = _mm512_fmadd_ps(load_weights(d, w, k, m), _mm512_maskz_loadu_ps(m, x + k), acc);
    }
    return lane_sum(acc);
}
#define HAVE_ROW_DOT_STREAM 1

float dot_product(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int k = 0;
    for (; k + LANES <= n; k += LANES) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc);
    }
    return lane_sum(acc);
}

void dot_product4(float out[4], const float *a, const float *const b[4], int n) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int k = 0;
    for (; k + LANES <= n; k += LANES) {
        __m512 av = _mm512_loadu_ps(a + k);
        for (int i = 0; i < 4; i++) acc[i] = _mm512_fmadd_ps(av, _mm512_loadu_ps(b[i] + k), acc[i]);
    }
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1);
        __m512 av = _mm512_maskz_loadu_ps(m, a + k);
        for (int i = 0; i < 4; i++) acc[i] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, b[i] + k), acc[i]);
    }
    store4(out, lane_sum4(acc[0], acc[1], acc[2], acc[3]));
}

/* 16 elements of a stored KV row (kvcache.c) from element k, a multiple of 16, as floats, converted as
 * kv_row_load converts them: bf16 widened; q8_0 (groups of 36 bytes: an f32 scale d, then 32 int8 q) d * q */
ALWAYS_INLINE __m512 load_kv16(const void *row, int packing, int k) {
    if (packing == 1)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k))), 16));
    const unsigned char *g = (const unsigned char *)row + (size_t)(k / 32) * 36;
    float d;
    memcpy(&d, g, 4);
    return _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(g + 4 + k % 32)))));
}

/* dot_product4's sums, each element converted in a register (packing a constant where it is inlined: one loop
 * per type, no test per load) */
ALWAYS_INLINE void dot4_kv(float out[4], const float *a, const void *const rows[4], int packing, int off, int n) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int k = 0; k < n; k += LANES) {
        __m512 av = _mm512_loadu_ps(a + k);
        for (int i = 0; i < 4; i++) acc[i] = _mm512_fmadd_ps(av, load_kv16(rows[i], packing, off + k), acc[i]);
    }
    store4(out, lane_sum4(acc[0], acc[1], acc[2], acc[3]));
}

int dot_product4_packed(float out[4], const float *a, const void *const rows[4], int packing, int off, int n) {
    if (off % LANES || n % LANES) return 0;
    if (packing == 1) dot4_kv(out, a, rows, 1, off, n);
    else dot4_kv(out, a, rows, 2, off, n);
    return 1;
}

/* add_scaled_rows' order: 64 columns in registers (packing a constant where it is inlined, as dot4_kv) */
ALWAYS_INLINE void add_columns_kv(float *out, const float *w, const void *const *rows, int n, int packing, int off, int vectors) {
    __m512 acc[4];
    for (int c = 0; c < vectors; c++) acc[c] = _mm512_loadu_ps(out + c * LANES);
    for (int i = 0; i < n; i++) {
        __m512 wi = _mm512_set1_ps(w[i]);
        for (int c = 0; c < vectors; c++) acc[c] = _mm512_fmadd_ps(wi, load_kv16(rows[i], packing, off + c * LANES), acc[c]);
    }
    for (int c = 0; c < vectors; c++) _mm512_storeu_ps(out + c * LANES, acc[c]);
}

ALWAYS_INLINE void add_scaled_kv(float *out, const float *w, const void *const *rows, int n, int packing, int off, int len) {
    for (int d = 0; d < len; d += 4 * LANES) {
        if (len - d >= 4 * LANES) add_columns_kv(out + d, w, rows, n, packing, off + d, 4); /* unrolled */
        else add_columns_kv(out + d, w, rows, n, packing, off + d, (len - d) / LANES);
    }
}

int add_scaled_rows_packed(float *out, const float *w, const void *const *rows, int n, int packing, int off, int len) {
    if (off % LANES || len % LANES) return 0;
    if (packing == 1) add_scaled_kv(out, w, rows, n, 1, off, len);
    else add_scaled_kv(out, w, rows, n, 2, off, len);
    return 1;
}

/* 16 elements from k of a row as add_scaled_rows_pair reads it: f32 (packing 0), or load_kv16's bf16 / q8_0 */
ALWAYS_INLINE __m512 load_row16(const void *row, int packing, int k) {
    return packing == 0 ? _mm512_loadu_ps((const float *)row + k) : load_kv16(row, packing, k);
}

/* columns d .. d + 16 * V - 1 of both outputs, V vectors in registers (a compile-time count, as is packing) */
ALWAYS_INLINE void scaled_pair(float *out0, const float *w0, float *out1, const float *w1, const void *const *rows, int n,
                               int packing, int off, int d, int V) {
    __m512 a0[4], a1[4];
    for (int c = 0; c < V; c++) a0[c] = _mm512_loadu_ps(out0 + d + c * LANES), a1[c] = _mm512_loadu_ps(out1 + d + c * LANES);
    for (int i = 0; i < n; i++) {
        __m512 x0 = _mm512_set1_ps(w0[i]), x1 = _mm512_set1_ps(w1[i]);
        for (int c = 0; c < V; c++) {
            __m512 v = load_row16(rows[i], packing, off + d + c * LANES); /* one load (and conversion) for both */
            a0[c] = _mm512_fmadd_ps(x0, v, a0[c]);
            a1[c] = _mm512_fmadd_ps(x1, v, a1[c]);
        }
    }
    for (int c = 0; c < V; c++) _mm512_storeu_ps(out0 + d + c * LANES, a0[c]), _mm512_storeu_ps(out1 + d + c * LANES, a1[c]);
}

ALWAYS_INLINE void scaled_pair_rows(float *out0, const float *w0, float *out1, const float *w1, const void *const *rows,
                                    int n, int packing, int off, int len) {
    int d = 0;
    for (; d + 4 * LANES <= len; d += 4 * LANES) scaled_pair(out0, w0, out1, w1, rows, n, packing, off, d, 4);
    switch ((len - d) / LANES) { /* add_scaled_rows' order: 64 columns of each output at a time, then the rest */
    case 3: scaled_pair(out0, w0, out1, w1, rows, n, packing, off, d, 3); break;
    case 2: scaled_pair(out0, w0, out1, w1, rows, n, packing, off, d, 2); break;
    case 1: scaled_pair(out0, w0, out1, w1, rows, n, packing, off, d, 1); break;
    }
}

int add_scaled_rows_pair(float *out0, const float *w0, float *out1, const float *w1, const void *const *rows, int n,
                         int packing, int off, int len) {
    if (off % LANES || len % LANES) return 0;
    switch (packing) { /* one specialised kernel per storage */
    case 0: scaled_pair_rows(out0, w0, out1, w1, rows, n, 0, off, len); break;
    case 1: scaled_pair_rows(out0, w0, out1, w1, rows, n, 1, off, len); break;
    default: scaled_pair_rows(out0, w0, out1, w1, rows, n, 2, off, len); break;
    }
    return 1;
}

/* dot_product16 for two queries over one kt: the classes l (columns l mod 16) in two halves, {0-3, 8-11} then
 * {4-7, 12-15}, so that both queries' sums fit in registers; each half ends with the tree's first level (l, l+8),
 * the second (l, l+4) joins the halves, then (l, l+2), (l, l+1) as dot_product16 does: its bits. */
ALWAYS_INLINE void dot16_half(__m512 s0[4], __m512 s1[4], const float *q0, const float *q1, const float *kt, int len, int h) {
    __m512 a0[8], a1[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) a0[i] = a1[i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < len; c += LANES)
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            int l = h + (i < 4 ? i : i + 4); /* h + 0..3, h + 8..11 */
            __m512 k = _mm512_loadu_ps(kt + (size_t)(c + l) * LANES);
            a0[i] = _mm512_fmadd_ps(_mm512_set1_ps(q0[c + l]), k, a0[i]);
            a1[i] = _mm512_fmadd_ps(_mm512_set1_ps(q1[c + l]), k, a1[i]);
        }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) s0[i] = _mm512_add_ps(a0[i], a0[i + 4]), s1[i] = _mm512_add_ps(a1[i], a1[i + 4]);
}

/* both halves, then the tree; the first half's sums wait in a small buffer on the stack (a register for each would
 * leave too few for the second half's accumulators, and the compiler's spills cost more than these 8 stores) */
ALWAYS_INLINE void dot16_pair(float out0[16], const float *q0, float out1[16], const float *q1, const float *kt, int len) {
    __m512 s0[4], s1[4];
    float lo[2][4][16] __attribute__((aligned(64)));
    dot16_half(s0, s1, q0, q1, kt, len, 0);
#pragma GCC unroll 4
    for (int l = 0; l < 4; l++) _mm512_store_ps(lo[0][l], s0[l]), _mm512_store_ps(lo[1][l], s1[l]);
    dot16_half(s0, s1, q0, q1, kt, len, 4);
#pragma GCC unroll 4
    for (int l = 0; l < 4; l++) s0[l] = _mm512_add_ps(_mm512_load_ps(lo[0][l]), s0[l]), s1[l] = _mm512_add_ps(_mm512_load_ps(lo[1][l]), s1[l]);
    _mm512_storeu_ps(out0, _mm512_add_ps(_mm512_add_ps(s0[0], s0[2]), _mm512_add_ps(s0[1], s0[3])));
    _mm512_storeu_ps(out1, _mm512_add_ps(_mm512_add_ps(s1[0], s1[2]), _mm512_add_ps(s1[1], s1[3])));
}

void dot_product16_pair(float out0[16], const float *q0, float out1[16], const float *q1, const float *kt, int len) {
    switch (len) { /* the common head sizes unrolled whole */
    case 64: dot16_pair(out0, q0, out1, q1, kt, 64); break;
    case 128: dot16_pair(out0, q0, out1, q1, kt, 128); break;
    default: dot16_pair(out0, q0, out1, q1, kt, len); break;
    }
}

/* r[i] <- column i of the 16 x 16 block r, except that columns 1 and 2 of each 4 come out swapped */
ALWAYS_INLINE void transpose16x16(__m512 r[16]) {
    __m512 t[16], u[16], v[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 2; j++) {
            __m512d a = _mm512_castps_pd(t[4 * i + j]), b = _mm512_castps_pd(t[4 * i + 2 + j]);
            u[4 * i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            u[4 * i + 2 + j] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            v[8 * i + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0x88);
            v[8 * i + 4 + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(v[j], v[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(v[j], v[8 + j], 0xDD);
    }
}

void transpose_rows16(float *kt, const float *const rows[16], int len) {
    static const int column[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
    for (int c = 0; c < len; c += LANES) {
        __m512 r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(rows[i] + c);
        transpose16x16(r);
        for (int i = 0; i < 16; i++) _mm512_storeu_ps(kt + (size_t)(c + column[i]) * LANES, r[i]);
    }
}

void dot_product16(float out[16], const float *q, const float *kt, int len) {
    __m512 acc[16];
    for (int l = 0; l < 16; l++) acc[l] = _mm512_setzero_ps();
    for (int c = 0; c < len; c += LANES)
        for (int l = 0; l < 16; l++)
            acc[l] = _mm512_fmadd_ps(_mm512_set1_ps(q[c + l]), _mm512_loadu_ps(kt + (size_t)(c + l) * LANES), acc[l]);
    for (int l = 0; l < 8; l++) acc[l] = _mm512_add_ps(acc[l], acc[l + 8]); /* lane_sum16's tree, key by key */
    for (int l = 0; l < 4; l++) acc[l] = _mm512_add_ps(acc[l], acc[l + 4]);
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3])));
}

void add_scaled_rows(float *out, const float *w, const float *const *rows, int n, int len) {
    for (int d = 0; d < len; d += 4 * LANES) { /* 64 columns in registers while the rows go by */
        __mmask16 m[4];
        __m512 acc[4];
        for (int c = 0; c < 4; c++) {
            int left = len - d - c * LANES;
            m[c] = left >= LANES ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
            acc[c] = _mm512_maskz_loadu_ps(m[c], out + d + c * LANES);
        }
        for (int i = 0; i < n; i++) {
            __m512 wi = _mm512_set1_ps(w[i]);
            for (int c = 0; c < 4; c++) acc[c] = _mm512_fmadd_ps(wi, _mm512_maskz_loadu_ps(m[c], rows[i] + d + c * LANES), acc[c]);
        }
        for (int c = 0; c < 4; c++) _mm512_mask_storeu_ps(out + d + c * LANES, m[c], acc[c]);
    }
}

/* A block of 16 groups (512 values) transposed for VPDPBUSD: a[p] holds groups 2p, 2p+1 in column order (lanes
 * 0-7, 8-15: 4 values a lane), b[j] the 4 values 4j .. 4j+3 of group g in lane g. Three rounds of 8 two-vector
 * permutes, each halving the groups a vector spans and doubling its groups:
 *   c[q][h]:    groups 4q .. 4q+3, values 16h .. 16h+15 (lane 4 * (piece mod 4) + group mod 4)
 *   e[r][h][k]: groups 8r .. 8r+7, pieces 4h+2k, 4h+2k+1 (lane 8 * (piece mod 2) + group mod 8)
 *   b[j]:       all 16 groups, piece j */
ALWAYS_INLINE void transpose_groups(__m512i b[8], const __m512i a[8]) {
    const __m512i i1[2] = {_mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27),
                           _mm512_setr_epi32(4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31)};
    const __m512i i2[2] = {_mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                           _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31)};
    const __m512i i3[2] = {_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                           _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31)};
    __m512i c[4][2], e[2][2][2];
    for (int q = 0; q < 4; q++)
        for (int h = 0; h < 2; h++) c[q][h] = _mm512_permutex2var_epi32(a[2 * q], i1[h], a[2 * q + 1]);
    for (int r = 0; r < 2; r++)
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 2; k++) e[r][h][k] = _mm512_permutex2var_epi32(c[2 * r][h], i2[k], c[2 * r + 1][h]);
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 2; k++)
            for (int m = 0; m < 2; m++) b[4 * h + 2 * k + m] = _mm512_permutex2var_epi32(e[0][h][k], i3[m], e[1][h][k]);
}

/* One token's groups (quantize_group, with the same bits): the largest |x| of each group, then x * 127 / amax
 * rounded to nearest even (VCVTPS2DQ in the default rounding mode, as nearbyintf). A group with an inf or NaN
 * is left to quantize_group. */
static void quantize_token(QuantizedRow *r, const float *x) {
    memset(r->q, 0, r->stride);
    const __m512 big = _mm512_set1_ps(FLT_MAX), limit = _mm512_set1_ps(127.0f);
    for (int g = 0; g < r->groups; g++) {
        __m512 a = _mm512_loadu_ps(x + g * Q8_GROUP), b = _mm512_loadu_ps(x + g * Q8_GROUP + 16);
        __m512 aa = _mm512_abs_ps(a), ab = _mm512_abs_ps(b);
        if ((_mm512_cmp_ps_mask(aa, big, _CMP_LE_OQ) & _mm512_cmp_ps_mask(ab, big, _CMP_LE_OQ)) != 0xFFFF) {
            quantize_group(r, g, x + g * Q8_GROUP);
            continue;
        }
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ab)), inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512 vinv = _mm512_set1_ps(inv), neg = _mm512_set1_ps(-127.0f);
        __m512i qa = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(a, vinv), neg), limit));
        __m512i qb = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(b, vinv), neg), limit));
        _mm_storeu_si128((__m128i *)(r->q + g * Q8_GROUP), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(r->q + g * Q8_GROUP + 16), _mm512_cvtepi32_epi8(qb));
        r->scale[g] = amax / 127.0f;
        r->sum[g] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}

/* A quantized token's values again, transposed for rows_many (products of 2 tokens or more; decode's single
 * token does not need them) */
static void transpose_token(QuantizedRow *r) {
    for (int g0 = 0; g0 < r->groups; g0 += 16) {
        int pairs = (r->groups - g0 < 16 ? r->groups - g0 + 1 : 16) / 2;
        __m512i a[8], b[8];
        for (int p = 0; p < 8; p++) a[p] = p < pairs ? _mm512_load_si512((const void *)(r->q + (g0 + 2 * p) * Q8_GROUP)) : _mm512_setzero_si512();
        transpose_groups(b, a);
        for (int j = 0; j < 8; j++) _mm512_store_si512((void *)(r->qt + (size_t)g0 * Q8_GROUP + j * 64), b[j]);
    }
}

/* the slots of the tile that holds token t (its first block) */
static unsigned char *token_tile(const QuantizedRow *first, int t) {
    return first->tiles + (size_t)(t / TILE_TOKENS) * ((first->groups + 15) / 16) * TILE_TOKENS * TILE_SLOT;
}

/* token t's transposed values, sums and scales (row r) into its slots of first->tiles */
static void tile_token(const QuantizedRow *first, const QuantizedRow *r, int t) {
    unsigned char *slot = token_tile(first, t) + (size_t)(t % TILE_TOKENS) * TILE_SLOT;
    for (int b = 0; b < (r->groups + 15) / 16; b++, slot += TILE_TOKENS * TILE_SLOT) {
        memcpy(slot, r->qt + (size_t)b * 512, 512);
        memcpy(slot + 512, r->sum + b * 16, 64);
        memcpy(slot + 576, r->scale + b * 16, 64);
    }
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

/* Two VPDPBUSD results of group pairs (lanes 0-7: 4-product sums of group 2i, 8-15: of group 2i+1) -> one
 * vector whose 128-bit block k holds 4 partial sums of group k of the four */
ALWAYS_INLINE __m512i fold_pairs(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD));
}

/* The 16 exact group sums (lane g: group g) of 8 VPDPBUSD results v[i] over groups 2i, 2i+1: integer adds in
 * any order give the same sums, so this only has to be cheap. */
ALWAYS_INLINE __m512i group_sums16(const __m512i v[8]) {
    __m512i u0 = fold_pairs(v[0], v[1]), u1 = fold_pairs(v[2], v[3]), u2 = fold_pairs(v[4], v[5]),
            u3 = fold_pairs(v[6], v[7]); /* u_j: groups 4j .. 4j+3, 4 partial sums each */
    __m512i s0 = _mm512_add_epi32(_mm512_unpacklo_epi64(u0, u1), _mm512_unpackhi_epi64(u0, u1)); /* block k: groups k, 4+k */
    __m512i s1 = _mm512_add_epi32(_mm512_unpacklo_epi64(u2, u3), _mm512_unpackhi_epi64(u2, u3)); /* 8+k, 12+k */
    __m512i x = _mm512_unpacklo_epi32(s0, s1), y = _mm512_unpackhi_epi32(s0, s1);
    __m512i r = _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y)); /* block k: k, 8+k, 4+k, 12+k */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15);
    return _mm512_permutexvar_epi32(order, r);
}

/* 64 weights of groups 2p, 2p+1 of a row as unsigned bytes (u = w + 128 for q8_0, the 4-bit u for q4_0), in
 * column order; a lone last group of q8_0 (p == pairs - 1 of an odd count) fills the low half */
ALWAYS_INLINE __m512i load_pair(DType d, const void *row, int p, int lone) {
    if (d == DTYPE_Q4_0) {
        __m256i b = _mm256_loadu_si256((const __m256i *)((const uint8_t *)row + (size_t)p * 32)), nibble = _mm256_set1_epi8(15);
        return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, nibble)),
                                  _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble), 1);
    }
    const int8_t *src = (const int8_t *)row + (size_t)p * 64;
    __m512i w = lone ? _mm512_zextsi256_si512(_mm256_loadu_si256((const void *)src)) : _mm512_loadu_si512((const void *)src);
    return _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
}

/* q8_0 / q4_0 weights: out[t][r] for 4 rows x T tokens.  w[r]: the values of a row; ws[r]: its f16 scales.
 * Per block of 16 groups: the group sums S_g (VPDPBUSD on the unsigned weights, minus offset * sum(x q), the
 * offset being 128 for q8_0, 8 for q4_0), then in lane g mod 16: acc += (S_g * w_scale) * x_scale. */
ALWAYS_INLINE void tile_quant(DType d, int T, const void *const w[4], const uint16_t *const ws[4], int cols,
                              const QuantizedRow *xq, float *out, size_t ldo) {
    __m512 acc[4][Q8_TOKENS_PER_TILE];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    int groups = cols / Q8_GROUP, pair_bytes = d == DTYPE_Q4_0 ? 32 : 64, offset_shift = d == DTYPE_Q4_0 ? 3 : 7;
    QuantizedRow xr[Q8_TOKENS_PER_TILE];
    for (int t = 0; t < T; t++) xr[t] = token_row(xq, t);
    for (int g0 = 0; g0 < groups; g0 += 16) {
        int gn = groups - g0 < 16 ? groups - g0 : 16, pairs = (gn + 1) / 2;
        __mmask16 gm = (__mmask16)((1u << gn) - 1);
        for (int r = 0; r < 4; r++) {
            const char *row = (const char *)w[r] + (size_t)g0 / 2 * pair_bytes;
            if (T == 1) { /* decode streams the weights: ask for them early */
                for (int p = 0; p < pairs; p += 64 / pair_bytes)
                    _mm_prefetch(row + p * pair_bytes + PREFETCH_AHEAD((size_t)groups * pair_bytes / 2), PREFETCH_HINT);
                _mm_prefetch((const char *)(ws[r] + g0) + PREFETCH_AHEAD((size_t)groups * 2), PREFETCH_HINT);
            }
            __m512 wscale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, ws[r] + g0));
            __m512i wv[8];
            for (int p = 0; p < pairs; p++) wv[p] = load_pair(d, row, p, g0 + 2 * p + 1 == groups);
            for (int t = 0; t < T; t++) {
                __m512i v[8];
                for (int p = 0; p < 8; p++)
                    v[p] = p < pairs ? dot_u8s8(wv[p], _mm512_load_si512((const void *)(xr[t].q + (g0 + 2 * p) * Q8_GROUP)))
                                     : _mm512_setzero_si512();
                __m512i offsets = _mm512_slli_epi32(_mm512_load_si512((const void *)(xr[t].sum + g0)), offset_shift);
                __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(group_sums16(v), offsets)), wscale);
                acc[r][t] = _mm512_fmadd_ps(f, _mm512_load_ps(xr[t].scale + g0), acc[r][t]);
            }
        }
    }
    for (int t = 0; t < T; t++) {
        float v[4];
        store4(v, lane_sum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
        for (int r = 0; r < 4; r++) out[t * ldo + r] = v[r];
    }
}

/* VPDPBUSD into a running sum */
ALWAYS_INLINE __m512i dot_u8s8_add(__m512i acc, __m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, dot_u8s8(u, s));
#endif
}

/* q8_0 / q4_0 products of several tokens (rows_many). tile_quant reduces each token's VPDPBUSD results to
 * group sums with ~17 shuffles per 16 groups; here the row's values are transposed once (transpose_groups, 24
 * permutes per 16 groups) and so are the tokens' (quantize_token), so 8 VPDPBUSD into one accumulator leave
 * group g's exact sum in lane g, for every token with no shuffle at all. From there the float steps are
 * tile_quant's, lane for lane, and the lanes are added by the same tree: the same bits as decode. */
#define MANY_TOKENS 8 /* tokens at a time: 8 running sums, 8 accumulators, the row's 8 vectors */
_Static_assert(MANY_TOKENS == TILE_TOKENS, "rows_packed takes a tile of slots at a time");
#define MANY_BYTES (32 * 1024) /* transposed rows per pass, beside a tile of tokens in L1: one row of up to
                                  32768 columns (512 bytes per 16 groups); wider rows take tile_quant */

/* A block of a row (wv: its 8 transposed vectors, wscale: its 16 scales) against the T tokens of a tile's slots
 * for that block (tile_token): 8 VPDPBUSD give each group's exact sum S_g in lane g (two chains: integer sums,
 * the same S_g in any order), then acc[t] += ((S_g - offset * sum(x q)) * w_scale) * x_scale, lane for lane */
ALWAYS_INLINE void block_slots(int T, int offset_shift, const __m512i wv[8], __m512 wscale, const unsigned char *slots,
                               __m512 *acc) {
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
        const unsigned char *x = slots + t * TILE_SLOT;
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        for (int j = 0; j < 8; j += 2) {
            s0 = dot_u8s8_add(s0, wv[j], _mm512_load_si512((const void *)(x + j * 64)));
            s1 = dot_u8s8_add(s1, wv[j + 1], _mm512_load_si512((const void *)(x + j * 64 + 64)));
        }
        __m512i offsets = _mm512_slli_epi32(_mm512_load_si512((const void *)(x + 512)), offset_shift);
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(s0, s1), offsets)), wscale);
        acc[t] = _mm512_fmadd_ps(f, _mm512_load_ps((const float *)(x + 576)), acc[t]);
    }
}

/* out[t * ldo] = the lanes of acc[t] added (lane_sum; for 8 tokens lane_sum4, whose tree is lane_sum's) */
ALWAYS_INLINE void store_sums(int T, const __m512 *acc, float *out, size_t ldo) {
    if (T == 8) {
        float v[8];
        store4(v, lane_sum4(acc[0], acc[1], acc[2], acc[3]));
        store4(v + 4, lane_sum4(acc[4], acc[5], acc[6], acc[7]));
        for (int t = 0; t < 8; t++) out[t * ldo] = v[t];
        return;
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) out[t * ldo] = lane_sum(acc[t]);
}

ALWAYS_INLINE void tokens_many(int T, int offset_shift, const __m512i (*wt)[8], const __m512 *wscale, int blocks,
                               const unsigned char *tile, float *out, size_t ldo) {
    __m512 acc[MANY_TOKENS];
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m512i wv[8];
        for (int j = 0; j < 8; j++) wv[j] = _mm512_load_si512(&wt[b][j]);
        block_slots(T, offset_shift, wv, wscale[b], tile + (size_t)b * TILE_TOKENS * TILE_SLOT, acc);
    }
    store_sums(T, acc, out, ldo);
}

/* row `row` (values, f16 scales ws) transposed: blocks x 8 vectors into wt, the scales into wscale */
static void transpose_row(DType d, const void *row, const uint16_t *ws, int groups, __m512i (*wt)[8], __m512 *wscale) {
    int pair_bytes = d == DTYPE_Q4_0 ? 32 : 64;
    size_t ahead = PREFETCH_AHEAD((size_t)groups * pair_bytes / 2); /* as decode: 4 rows on, into L2 */
    for (int g0 = 0; g0 < groups; g0 += 16) {
        int gn = groups - g0 < 16 ? groups - g0 : 16, pairs = (gn + 1) / 2;
        const char *src = (const char *)row + (size_t)g0 / 2 * pair_bytes;
        for (int p = 0; p < pairs; p += 64 / pair_bytes) _mm_prefetch(src + p * pair_bytes + ahead, PREFETCH_HINT);
        _mm_prefetch((const char *)(ws + g0) + ahead / (pair_bytes / 4), PREFETCH_HINT);
        __m512i a[8];
        for (int p = 0; p < 8; p++) a[p] = p < pairs ? load_pair(d, src, p, g0 + 2 * p + 1 == groups) : _mm512_setzero_si512();
        transpose_groups(wt[g0 / 16], a);
        wscale[g0 / 16] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << gn) - 1), ws + g0));
    }
}

/* rows lo..hi x n tokens (n >= 2): up to 16 rows transposed at a time (MANY_BYTES), then per tile of 8 tokens
 * each of those rows, so that the tile's values stay in L1 across the rows */
static void rows_many(float *out, const QuantizedRow *xq, const Tensor *w, int n, int lo, int hi) {
    static _Thread_local __m512i wt[MANY_BYTES / 512][8];
    static _Thread_local __m512 wscale[MANY_BYTES / 512];
    size_t row_bytes = quantized_row_bytes(w);
    const uint16_t *scales = quantized_scales(w);
    int groups = w->cols / Q8_GROUP, blocks = (groups + 15) / 16, per = MANY_BYTES / 512 / blocks;
    int shift = w->dtype == DTYPE_Q4_0 ? 3 : 7;
    if (per > 16) per = 16;
    for (int r0 = lo; r0 < hi; r0 += per) {
        int r1 = hi - r0 < per ? hi : r0 + per;
        for (int r = r0; r < r1; r++)
            transpose_row(w->dtype, (const uint8_t *)w->data + (size_t)r * row_bytes, scales + (size_t)r * groups, groups,
                          wt + (r - r0) * blocks, wscale + (r - r0) * blocks);
        for (int t = 0; t < n; t += MANY_TOKENS) {
            const unsigned char *xt = token_tile(xq, t);
            int T = n - t < MANY_TOKENS ? n - t : MANY_TOKENS;
            for (int r = r0; r < r1; r++) {
                const __m512i(*rw)[8] = wt + (r - r0) * blocks;
                const __m512 *rs = wscale + (r - r0) * blocks;
                float *o = out + (size_t)t * w->rows + r;
                switch (T) { /* one specialised kernel per width */
                case 1: tokens_many(1, shift, rw, rs, blocks, xt, o, w->rows); break;
                case 2: tokens_many(2, shift, rw, rs, blocks, xt, o, w->rows); break;
                case 3: tokens_many(3, shift, rw, rs, blocks, xt, o, w->rows); break;
                case 4: tokens_many(4, shift, rw, rs, blocks, xt, o, w->rows); break;
                case 5: tokens_many(5, shift, rw, rs, blocks, xt, o, w->rows); break;
                case 6: tokens_many(6, shift, rw, rs, blocks, xt, o, w->rows); break;
                case 7: tokens_many(7, shift, rw, rs, blocks, xt, o, w->rows); break;
                default: tokens_many(8, shift, rw, rs, blocks, xt, o, w->rows); break;
                }
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * q8_0 / q4_0 rows packed once at load (matmul_pack; AVX-512, AMX tiles or not). rows_many transposes each row's
 * blocks every time a product uses them, and decode's tile_quant shuffles every row's sums into groups; packed,
 * a row's blocks lie as transpose_groups leaves them, so every product -- decode's single token included -- takes
 * the exact group sums straight from VPDPBUSD (tokens_packed). The same sums and float steps: the same bits.
 *   q8_0: per block of 16 groups, 8 vectors of 64 bytes: vector j, lane g = values 4j .. 4j+3 of group g, +128
 *         (unsigned, as load_pair makes them)
 *   q4_0: the same 4-bit values, vectors j and j+4 in the low and high nibbles of 64 bytes (j = 0 .. 3)
 * A last block of 8 groups keeps lanes 0-7 of each vector (half the bytes), so a row takes the bytes it takes
 * in the file; the f16 scales follow the rows as in the file. Rows whose groups are not a multiple of 8 stay as
 * they are. */

/* bytes of one packed block of gn (16 or 8) groups */
static size_t packed_block_bytes(DType d, int gn) { return (size_t)gn * (d == DTYPE_Q4_0 ? 16 : 32); }

static void pack_row(DType d, uint8_t *dst, const void *row, int groups) {
    int pair_bytes = d == DTYPE_Q4_0 ? 32 : 64;
    for (int g0 = 0; g0 < groups; g0 += 16) {
        int gn = groups - g0 < 16 ? groups - g0 : 16, half = gn == 8;
        const char *src = (const char *)row + (size_t)g0 / 2 * pair_bytes;
        __m512i a[8], b[8];
        for (int p = 0; p < 8; p++) a[p] = p < gn / 2 ? load_pair(d, src, p, 0) : _mm512_setzero_si512();
        transpose_groups(b, a);
        int vectors = d == DTYPE_Q4_0 ? 4 : 8;
        for (int j = 0; j < vectors; j++) {
            __m512i v = d == DTYPE_Q4_0 ? _mm512_or_si512(b[j], _mm512_slli_epi16(b[j + 4], 4)) : b[j];
            if (half) _mm256_storeu_si256((__m256i *)(dst + j * 32), _mm512_castsi512_si256(v));
            else _mm512_storeu_si512((void *)(dst + j * 64), v);
        }
        dst += packed_block_bytes(d, gn);
    }
}

/* out[t * ldo] for T tokens of one packed row (ws: its f16 scales; tile: the tokens' slots): tokens_many's steps
 * on blocks read as they lie */
ALWAYS_INLINE void tokens_packed(int T, DType d, const uint8_t *row, const uint16_t *ws, int groups, size_t ahead,
                                 const unsigned char *tile, float *out, size_t ldo) {
    __m512 acc[MANY_TOKENS];
    int shift = d == DTYPE_Q4_0 ? 3 : 7;
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int g0 = 0, b = 0; g0 < groups; g0 += 16, b++) {
        int gn = groups - g0 < 16 ? groups - g0 : 16;
        size_t bytes = packed_block_bytes(d, gn);
        if (ahead)
            for (size_t k = 0; k < bytes; k += 64) _mm_prefetch((const char *)row + ahead + k, PREFETCH_HINT);
        __m512i wv[8];
        if (d == DTYPE_Q4_0) {
            const __m512i nibble = _mm512_set1_epi8(15);
            for (int j = 0; j < 4; j++) {
                __m512i v = gn == 16 ? _mm512_loadu_si512((const void *)(row + j * 64))
                                     : _mm512_zextsi256_si512(_mm256_loadu_si256((const void *)(row + j * 32)));
                wv[j] = _mm512_and_si512(v, nibble);
                wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            }
        } else
            for (int j = 0; j < 8; j++)
                wv[j] = gn == 16 ? _mm512_loadu_si512((const void *)(row + j * 64))
                                 : _mm512_zextsi256_si512(_mm256_loadu_si256((const void *)(row + j * 32)));
        __m512 wscale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << gn) - 1), ws + g0));
        row += bytes;
        block_slots(T, shift, wv, wscale, tile + (size_t)b * TILE_TOKENS * TILE_SLOT, acc);
    }
    store_sums(T, acc, out, ldo);
}

/* rows lo..hi x n tokens of packed weights: 16 rows at a time for each tile of 8 tokens, so that the tile's
 * values stay in L1 across the rows; the first tile streams the rows in from memory, prefetching ahead */
static void rows_packed(float *out, const QuantizedRow *xq, const Tensor *w, int n, int lo, int hi) {
    size_t row_bytes = quantized_row_bytes(w);
    const uint8_t *base = w->packed;
    const uint16_t *scales = (const uint16_t *)(base + (size_t)w->rows * row_bytes);
    int groups = w->cols / Q8_GROUP;
    for (int r0 = lo; r0 < hi; r0 += 16) {
        int r1 = hi - r0 < 16 ? hi : r0 + 16;
        for (int t = 0; t < n; t += MANY_TOKENS) {
            const unsigned char *xt = token_tile(xq, t);
            int T = n - t < MANY_TOKENS ? n - t : MANY_TOKENS;
            size_t ahead = t == 0 ? PREFETCH_AHEAD(row_bytes) : 0; /* the first tile reads the rows from memory */
            for (int r = r0; r < r1; r++) {
                const uint8_t *row = base + (size_t)r * row_bytes;
                const uint16_t *ws = scales + (size_t)r * groups;
                float *o = out + (size_t)t * w->rows + r;
#define PACKED(T_) w->dtype == DTYPE_Q4_0 ? tokens_packed(T_, DTYPE_Q4_0, row, ws, groups, ahead, xt, o, w->rows) \
                                          : tokens_packed(T_, DTYPE_Q8_0, row, ws, groups, ahead, xt, o, w->rows)
                switch (T) { /* one specialised kernel per width */
                case 1: PACKED(1); break;
                case 2: PACKED(2); break;
                case 3: PACKED(3); break;
                case 4: PACKED(4); break;
                case 5: PACKED(5); break;
                case 6: PACKED(6); break;
                case 7: PACKED(7); break;
                default: PACKED(8); break;
                }
#undef PACKED
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * AMX-INT8 (Intel Xeon since Sapphire Rapids): q8_0 prefill on the tile matrix unit, detected at run time.
 *
 * TDPBSSD multiplies a tile of 16 weight rows x 32 int8 values (one group, as it lies in the file) by a tile of
 * the same 32 activations of 16 tokens ("VNNI" layout: 8 rows of 16 tokens x 4 bytes) into 16 x 16 exact int32
 * group sums S_g; the AVX-512 units then scale and add them exactly as tile_q8 does: in class g mod 16,
 * acc += (S_g * w_scale) * x_scale, and the classes are added by lane_sum16's tree. Same sums, same float
 * operations in the same order: prefill on the tiles gives decode's bits. */


typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* tmm0, tmm1: 16 x 16 int32 sums (of groups g, g + 1); tmm2, tmm3: 16 weight rows x 32 bytes; tmm4, tmm5: 8 x 64
 * bytes, a group of 16 tokens */
static const TileConfig amx_tiles __attribute__((aligned(64))) = {
    .palette = 1, .colsb = {64, 64, 32, 32, 64, 64}, .rows = {16, 16, 16, 16, 8, 8}};

#define AMX_TARGET __attribute__((target("amx-tile,amx-int8")))
#define AMX_MAX_GROUPS 1024 /* rows of up to 32768 columns; wider ones take the AVX-512 kernel */
#define COMPILER_BARRIER() __asm__ volatile("" ::: "memory") /* the tile instructions are asm without memory operands */

/* out[m * ldo + i] = sum[i][m] for 16 rows i and the first `tokens` (up to 16) tokens m: a token's 16 rows as
 * one line. Stored one by one, a token at a time, the 16 tokens' lines lie a multiple of 4 KiB apart when the
 * rows are (2048: gate and up), share one set of the L1 cache and miss it one after another: gathered, the
 * 110M shape's gate and up took half the time in prefill. */
ALWAYS_INLINE void store_tile(float *out, size_t ldo, const float sum[16][16], int tokens) {
    const __m512i column = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
    for (int m = 0; m < 16 && m < tokens; m++) _mm512_storeu_ps(out + (size_t)m * ldo, _mm512_i32gather_ps(column, &sum[0][m], 4));
}

/* One group g into tile c from weight tile a and activation tile b: C = A . B, exact int32 */
#define AMX_GROUP_PRODUCT(c, a, b, w, cols, x, g)                                                                 \
    do {                                                                                                      \
        _tile_zero(c);                                                                                        \
        _tile_loadd(a, (w) + (g) * Q8_GROUP, cols);                                                           \
        _tile_loadd(b, (x) + (size_t)(g) * 512, 64);                                                          \
        _tile_dpbssd(c, a, b);                                                                                \
    } while (0)

/* the sums of group g (16 rows x 16 tokens) into class g mod 16: acc += (S_g * w_scale) * x_scale; the first
 * group of a class (g < 16) adds to zero */
ALWAYS_INLINE void amx_scale_add(__m512 acc[16], const int32_t sums[16][16], const float wscale[16], __m512 xs, int g) {
    for (int i = 0; i < 16; i++) {
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[i])), _mm512_set1_ps(wscale[i]));
        acc[i] = _mm512_fmadd_ps(f, xs, g < 16 ? _mm512_setzero_ps() : acc[i]);
    }
}

/* rows r0 .. r0+15 of a q8_0 weight (values w, f16 scales ws, `groups` per row) x all n tokens, a block of 16
 * tokens at a time. The tile unit works on group g + 1 (tiles 1, 3, 5) while the vector units scale and add
 * the sums of group g (from tiles 0, 2, 4), and the other way round. */
AMX_TARGET static void amx_rows16(float *out, size_t ldo, const int8_t *w, const uint16_t *ws, int cols,
                                  const VnniTokens *v, int n) {
    int groups = cols / Q8_GROUP;
    static _Thread_local float wscale[AMX_MAX_GROUPS][16]; /* [group][row] in f32, read as broadcasts below */
    static _Thread_local __m512 acc[16][16];                 /* [class][row]: 16 tokens each */
    static _Thread_local int32_t sums[2][16][16] __attribute__((aligned(64)));
    for (int g = 0; g < groups; g += 16) { /* 16 groups of the 16 rows at a time: converted, then transposed */
        __mmask16 gm = (__mmask16)(groups - g < 16 ? (1u << (groups - g)) - 1 : 0xFFFF);
        float t[16][16] __attribute__((aligned(64)));
        for (int i = 0; i < 16; i++) _mm512_store_ps(t[i], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, ws + (size_t)i * groups + g)));
        for (int k = 0; k < 16 && g + k < groups; k++)
            for (int i = 0; i < 16; i++) wscale[g + k][i] = t[i][k];
    }
    for (int b = 0; b < v->blocks; b++) {
        const int8_t *x = v->q + (size_t)b * groups * 512;
        const float *xs = v->scale + (size_t)b * groups * 16;
        if (groups < 16) memset(acc, 0, sizeof acc); /* classes no group reaches */
        COMPILER_BARRIER();
        AMX_GROUP_PRODUCT(0, 2, 4, w, cols, x, 0);
        for (int g = 0; g < groups; g += 2) { /* group g's sums are read one step after they were stored */
            _tile_stored(0, sums[0], 64);
            if (g + 1 < groups) AMX_GROUP_PRODUCT(1, 3, 5, w, cols, x, g + 1);
            COMPILER_BARRIER();
            if (g > 0) amx_scale_add(acc[(g - 1) % 16], sums[1], wscale[g - 1], _mm512_loadu_ps(xs + (size_t)(g - 1) * 16), g - 1);
            COMPILER_BARRIER();
            if (g + 1 < groups) {
                _tile_stored(1, sums[1], 64);
                if (g + 2 < groups) AMX_GROUP_PRODUCT(0, 2, 4, w, cols, x, g + 2);
            }
            COMPILER_BARRIER();
            amx_scale_add(acc[g % 16], sums[0], wscale[g], _mm512_loadu_ps(xs + (size_t)g * 16), g);
            COMPILER_BARRIER();
        }
        if (groups % 2 == 0)
            amx_scale_add(acc[(groups - 1) % 16], sums[1], wscale[groups - 1], _mm512_loadu_ps(xs + (size_t)(groups - 1) * 16),
                          groups - 1);
        float sum[16][16] __attribute__((aligned(64))); /* [row][token], then stored a token's 16 rows at a time */
        for (int i = 0; i < 16; i++) {
            __m512 c[16];
            for (int l = 0; l < 16; l++) c[l] = acc[l][i];
            for (int l = 0; l < 8; l++) c[l] = _mm512_add_ps(c[l], c[l + 8]); /* lane_sum16's tree */
            for (int l = 0; l < 4; l++) c[l] = _mm512_add_ps(c[l], c[l + 4]);
            _mm512_store_ps(sum[i], _mm512_add_ps(_mm512_add_ps(c[0], c[2]), _mm512_add_ps(c[1], c[3])));
        }
        store_tile(out + (size_t)b * 16 * ldo, ldo, sum, n - b * 16);
    }
}

/* 16 rows of q4_0 values as int8 u - 8, row-major [16][cols] */
static void unpack_q4_rows16(int8_t *dst, const uint8_t *src, int cols) {
    const __m256i nibble = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
    for (int i = 0; i < 16; i++)
        for (int k = 0; k < cols; k += Q4_PAIR) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(src + (size_t)i * cols / 2 + k / 2));
            _mm256_storeu_si256((__m256i *)(dst + (size_t)i * cols + k), _mm256_sub_epi8(_mm256_and_si256(b, nibble), eight));
            _mm256_storeu_si256((__m256i *)(dst + (size_t)i * cols + k + 32),
                                _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), nibble), eight));
        }
}

/* every whole block of 16 rows in [lo, hi) on the tiles; returns the first row left for tile_quant. q4_0 rows
 * are first unpacked to int8 (u - 8), 16 at a time, into this thread's buffer. */
AMX_TARGET static int amx_rows(float *out, const Tensor *w, const VnniTokens *v, int n, int lo, int hi) {
    static _Thread_local int8_t *unpacked;
    static _Thread_local size_t unpacked_size;
    size_t row_bytes = quantized_row_bytes(w), need = (size_t)16 * w->cols;
    const uint16_t *scales = quantized_scales(w);
    int groups = w->cols / Q8_GROUP, q4 = w->dtype == DTYPE_Q4_0;
    if (groups > AMX_MAX_GROUPS) return lo;
    if (q4 && unpacked_size < need) {
        free(unpacked);
        unpacked_size = (unpacked = aligned_alloc(64, need)) ? need : 0;
        if (!unpacked) return lo; /* no memory for it: the AVX-512 kernel needs none */
    }
    _tile_loadconfig(&amx_tiles);
    int r = lo;
    for (; r + 16 <= hi; r += 16) {
        const uint8_t *rows = (const uint8_t *)w->data + (size_t)r * row_bytes;
        if (q4) unpack_q4_rows16(unpacked, rows, w->cols);
        amx_rows16(out + r, (size_t)w->rows, q4 ? unpacked : (const int8_t *)rows, scales + (size_t)r * groups, w->cols, v, n);
    }
    _tile_release();
    return r;
}

/* ---------------------------------------------------------------------------------------------
 * AMX-BF16, on request (--bf16-prefill): f32 and bf16 products of 16 tokens or more on the tiles. TDPBF16PS
 * multiplies bf16 by bf16 and adds pairs of products into f32 with its own rounding, so the activations (and
 * f32 weights) are rounded to bf16 and the sums are not decode's: docs/FORMAT.md says by how much. */

#define AMX_BF16_TARGET __attribute__((target("amx-tile,amx-bf16")))

/* tmm0, tmm1: 16 x 16 f32 sums (two blocks of 16 tokens); tmm2: 16 weight rows x 32 bf16; tmm3, tmm4: 16 column
 * pairs x 16 tokens */
static const TileConfig bf16_tiles __attribute__((aligned(64))) = {
    .palette = 1, .colsb = {64, 64, 64, 64, 64}, .rows = {16, 16, 16, 16, 16}};

/* every whole block of 16 rows in [lo, hi) on the tiles; returns the first row left for rows_float */
AMX_BF16_TARGET static int amx_bf16_rows(float *out, const Tensor *w, const uint16_t *v, int n, int lo, int hi) {
    static _Thread_local uint16_t *rounded; /* f32 weights: 16 rows at a time, as bf16 */
    static _Thread_local size_t rounded_size;
    int cols = w->cols, chunks = cols / 32, blocks = (n + 15) / 16;
    size_t need = (size_t)16 * cols * 2;
    if (w->dtype == DTYPE_F32 && rounded_size < need) {
        free(rounded);
        rounded_size = (rounded = aligned_alloc(64, need)) ? need : 0;
        if (!rounded) return lo;
    }
    _tile_loadconfig(&bf16_tiles);
    float sums[2][16][16] __attribute__((aligned(64)));
    int r = lo;
    for (; r + 16 <= hi; r += 16) {
        const uint16_t *a = (const uint16_t *)w->data + (size_t)r * cols;
        if (w->dtype == DTYPE_F32) {
            for (size_t i = 0; i < (size_t)16 * cols; i++) rounded[i] = bf16_round(((const float *)w->data)[(size_t)r * cols + i]);
            a = rounded;
        }
        for (int b0 = 0; b0 < blocks; b0 += 2) {
            int nb = blocks - b0 < 2 ? 1 : 2;
            COMPILER_BARRIER();
            _tile_zero(0);
            _tile_zero(1);
            for (int c = 0; c < chunks; c++) {
                const uint16_t *x0 = v + ((size_t)b0 * chunks + c) * 512;
                _tile_loadd(2, a + c * 32, cols * 2);
                _tile_loadd(3, x0, 64);
                _tile_dpbf16ps(0, 2, 3);
                if (nb == 2) {
                    _tile_loadd(4, x0 + (size_t)chunks * 512, 64);
                    _tile_dpbf16ps(1, 2, 4);
                }
            }
            _tile_stored(0, sums[0], 64);
            _tile_stored(1, sums[1], 64);
            COMPILER_BARRIER();
            for (int j = 0; j < nb; j++) store_tile(out + (size_t)(b0 + j) * 16 * w->rows + r, (size_t)w->rows, sums[j], n - (b0 + j) * 16);
        }
    }
    _tile_release();
    return r;
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
                _mm_prefetch((const char *)w[r] + (size_t)k * (d == DTYPE_F32 ? 4 : 2) + PREFETCH_AHEAD((size_t)cols * (d == DTYPE_F32 ? 4 : 2)),
                             PREFETCH_HINT);
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

/* 8 lanes whose sum is the exact dot product of 32 unsigned by 32 signed bytes (16-bit products, pairs) */
ALWAYS_INLINE __m256i dot_u8s8_32(__m256i u, __m256i s) {
    __m256i a = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(u)), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(s)));
    __m256i b = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1)),
                                  _mm256_cvtepi8_epi16(_mm256_extracti128_si256(s, 1)));
    return _mm256_add_epi32(a, b);
}

/* the sums of 8 vectors v[0..7] in lanes 0..7 */
ALWAYS_INLINE __m256i sums8(const __m256i v[8]) {
    __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}

/* group g of a row as 32 unsigned bytes: w + 128 (q8_0) or the 4-bit values (q4_0) */
ALWAYS_INLINE __m256i load_group(DType d, const void *row, int g) {
    if (d == DTYPE_Q4_0) {
        __m256i b = _mm256_loadu_si256((const __m256i *)((const uint8_t *)row + (size_t)g / 2 * 32));
        return _mm256_and_si256(g % 2 ? _mm256_srli_epi16(b, 4) : b, _mm256_set1_epi8(15));
    }
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)((const int8_t *)row + (size_t)g * Q8_GROUP)),
                            _mm256_set1_epi8((char)0x80));
}

/* the AVX-512 tile_quant's sums and lanes: groups g0 .. g0+7 in acc.lo, g0+8 .. g0+15 in acc.hi */
ALWAYS_INLINE void tile_quant(DType d, int T, const void *const w[4], const uint16_t *const ws[4], int cols,
                              const QuantizedRow *xq, float *out, size_t ldo) {
    int groups = cols / Q8_GROUP, offset_shift = d == DTYPE_Q4_0 ? 3 : 7, group_bytes = d == DTYPE_Q4_0 ? 16 : 32;
    for (int t = 0; t < T; t++) {
        QuantizedRow xr = token_row(xq, t);
        for (int r = 0; r < 4; r++) {
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int g0 = 0; g0 < groups; g0 += 8) {
                __m256i v[8];
                uint16_t scale[8] = {0};
                for (int i = 0; i < 8; i++) {
                    int g = g0 + i;
                    if (g >= groups) {
                        v[i] = _mm256_setzero_si256();
                        continue;
                    }
                    if (T == 1 && g * group_bytes % 64 == 0)
                        _mm_prefetch((const char *)w[r] + (size_t)g * group_bytes + PREFETCH_AHEAD((size_t)groups * group_bytes),
                                     PREFETCH_HINT);
                    v[i] = dot_u8s8_32(load_group(d, w[r], g), _mm256_load_si256((const __m256i *)(xr.q + g * Q8_GROUP)));
                    scale[i] = ws[r][g];
                }
                __m256i offsets = _mm256_slli_epi32(_mm256_load_si256((const __m256i *)(xr.sum + g0)), offset_shift);
                __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sums8(v), offsets)),
                                         _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)scale)));
                acc[g0 / 8 % 2] = _mm256_fmadd_ps(f, _mm256_load_ps(xr.scale + g0), acc[g0 / 8 % 2]);
            }
            Lanes16 a = {acc[0], acc[1]};
            out[t * ldo + r] = lane_sum(a);
        }
    }
}
#define COLUMN_BLOCK (1 << 30)

#else
/* ---------------------------------------------------------------------------------------------
 * portable C: the same lanes and order. Where the target has a fused multiply-add (FP_FAST_FMAF: aarch64,
 * x86 with -mfma) it is used and the results are the SIMD kernels' bit for bit; elsewhere (plain x86-64)
 * a*b+c is rounded twice and the last bits differ. */


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

/* the exact dot product of one group of weights and activations, then in lane g mod 16 as the SIMD kernels */
static void tile_quant(DType d, int T, const void *const w[4], const uint16_t *const ws[4], int cols,
                       const QuantizedRow *xq, float *out, size_t ldo) {
    int groups = cols / Q8_GROUP;
    for (int t = 0; t < T; t++) {
        QuantizedRow xr = token_row(xq, t);
        for (int r = 0; r < 4; r++) {
            float acc[LANES] = {0};
            for (int g = 0; g < groups; g++) {
                int32_t sum = 0;
                for (int j = g * Q8_GROUP; j < (g + 1) * Q8_GROUP; j++)
                    sum += (d == DTYPE_Q4_0 ? q4_value(w[r], j) - 8 : ((const int8_t *)w[r])[j]) * xr.q[j];
                float f = (float)sum * f16_to_f32(ws[r][g]);
                acc[g % LANES] = MULTIPLY_ADD(f, xr.scale[g], acc[g % LANES]);
            }
            out[t * ldo + r] = lane_sum16(acc);
        }
    }
}
#define COLUMN_BLOCK (1 << 30)
#endif

#if !defined(KERNELS_AVX512)
/* ---------------------------------------------------------------------------------------------
 * attention's helpers (attention.c), in C: the same bits as dot_product and add_scaled */

void dot_product4(float out[4], const float *a, const float *const b[4], int n) {
    for (int i = 0; i < 4; i++) out[i] = dot_product(a, b[i], n);
}

void add_scaled_rows(float *out, const float *w, const float *const *rows, int n, int len) {
    for (int i = 0; i < n; i++)
        for (int k = 0; k < len; k++) out[k] = fmaf(w[i], rows[i][k], out[k]);
}

/* no in-register conversion here: kvcache.c converts the rows first */
int dot_product4_packed(float out[4], const float *a, const void *const rows[4], int packing, int off, int n) {
    (void)out, (void)a, (void)rows, (void)packing, (void)off, (void)n;
    return 0;
}

int add_scaled_rows_packed(float *out, const float *w, const void *const *rows, int n, int packing, int off, int len) {
    (void)out, (void)w, (void)rows, (void)n, (void)packing, (void)off, (void)len;
    return 0;
}

int add_scaled_rows_pair(float *out0, const float *w0, float *out1, const float *w1, const void *const *rows, int n,
                         int packing, int off, int len) {
    (void)out0, (void)w0, (void)out1, (void)w1, (void)rows, (void)n, (void)packing, (void)off, (void)len;
    return 0;
}

void transpose_rows16(float *kt, const float *const rows[16], int len) {
    for (int d = 0; d < len; d++)
        for (int i = 0; i < 16; i++) kt[(size_t)d * LANES + i] = rows[i][d];
}

void dot_product16(float out[16], const float *q, const float *kt, int len) {
    for (int i = 0; i < 16; i++) {
        float acc[LANES] = {0};
        for (int d = 0; d < len; d++) acc[d % LANES] = MULTIPLY_ADD(q[d], kt[(size_t)d * LANES + i], acc[d % LANES]);
        out[i] = lane_sum16(acc);
    }
}

void dot_product16_pair(float out0[16], const float *q0, float out1[16], const float *q1, const float *kt, int len) {
    dot_product16(out0, q0, kt, len);
    dot_product16(out1, q1, kt, len);
}
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
#define ROW_BLOCK_BYTES (1024 * 1024) /* half of Sapphire Rapids' L2 (512 KiB: -10% on rows of 8192 f32) */
#define MAX_BLOCK_TILES 64 /* a block has at most 256 rows (shorter rows make smaller blocks) */

ALWAYS_INLINE void rows_float(DType d, float *out, const float *x, const Tensor *w, int n, int lo, int hi) {
    static _Thread_local float sums[MAX_BLOCK_TILES][4 * WIDE_TILE_TOKENS * LANES];
    size_t row_bytes = (size_t)w->cols * (d == DTYPE_F32 ? 4 : 2);
    int block = (int)(ROW_BLOCK_BYTES / row_bytes) / 4 * 4;
    block = block < 4 ? 4 : block > 4 * MAX_BLOCK_TILES ? 4 * MAX_BLOCK_TILES : block;
#ifdef HAVE_ROW_DOT_STREAM
    if (n == 1 && d != DTYPE_F32) { /* decode of 16-bit weights: one row at a time */
        for (int r = lo; r < hi; r++) out[r] = row_dot_stream(d, (const char *)w->data + (size_t)r * row_bytes, x, w->cols);
        return;
    }
#endif
    for (int r0 = lo; r0 < hi; r0 += block) {
        int r1 = hi - r0 < block ? hi : r0 + block;
        int tile_tokens = TOKENS_PER_TILE;
#ifdef WIDE_TILE
        if (n > TOKENS_PER_TILE && n <= WIDE_TILE_TOKENS) tile_tokens = n; /* one pass over the rows */
#endif
        for (int t = 0; t < n; t += tile_tokens) {
            int T = n - t < tile_tokens ? n - t : tile_tokens;
            const float *xt = x + (size_t)t * w->cols;
            for (int k0 = 0; k0 < w->cols; k0 += COLUMN_BLOCK) {
                int k1 = w->cols - k0 > COLUMN_BLOCK ? k0 + COLUMN_BLOCK : w->cols;
                for (int r = r0; r < r1; r += ROWS_PER_TILE) {
                    const void *rows[4];
                    tile_rows(rows, w, r, r1, row_bytes);
                    float part[WIDE_TILE_TOKENS][4], *tile_sums = sums[(r - r0) / 4];
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
                    case 6: tile_float(d, TOKENS_PER_TILE, rows, k0, k1, w->cols, xt, w->cols, tile_sums, dst, ldo, stream); break;
#ifdef WIDE_TILE
                    case 7: tile_float_wide(d, 7, rows, k0, k1, w->cols, xt, w->cols, tile_sums, dst, ldo, stream); break;
                    default: tile_float_wide(d, WIDE_TILE_TOKENS, rows, k0, k1, w->cols, xt, w->cols, tile_sums, dst, ldo, stream); break;
#endif
                    }
                    if (!full && k1 == w->cols)
                        for (int i = 0; i < T; i++)
                            for (int j = 0; j < r1 - r; j++) out[(size_t)(t + i) * w->rows + r + j] = part[i][j];
                }
            }
        }
    }
}

ALWAYS_INLINE void tile_quant_t(DType d, int T, const void *const w[4], const uint16_t *const ws[4], int cols,
                                const QuantizedRow *xq, float *out, size_t ldo) {
    switch (T) { /* one specialised kernel per tile width */
    case 1: tile_quant(d, 1, w, ws, cols, xq, out, ldo); break;
    case 2: tile_quant(d, 2, w, ws, cols, xq, out, ldo); break;
    default: tile_quant(d, Q8_TOKENS_PER_TILE, w, ws, cols, xq, out, ldo); break;
    }
}

static void rows_quantized(float *out, const QuantizedRow *xq, const VnniTokens *tiles, const Tensor *w, int n, int lo,
                           int hi) {
#if defined(KERNELS_AVX512)
    if (tiles) lo = amx_rows(out, w, tiles, n, lo, hi); /* whole blocks of 16 rows on the tiles, the rest below */
    if (w->packed) {
        if (lo < hi) rows_packed(out, xq, w, n, lo, hi);
        return;
    }
    if (n >= 2 && w->cols / Q8_GROUP <= MANY_BYTES / 512 * 16) {
        rows_many(out, xq, w, n, lo, hi);
        return;
    }
#else
    (void)tiles;
#endif
    size_t row_bytes = quantized_row_bytes(w);
    const uint16_t *scales = quantized_scales(w);
    int groups = w->cols / Q8_GROUP;
    for (int r = lo; r < hi; r += ROWS_PER_TILE) {
        const void *rows[4];
        const uint16_t *row_scales[4];
        for (int i = 0; i < 4; i++) {
            int ri = r + i < hi ? r + i : hi - 1;
            rows[i] = (const uint8_t *)w->data + (size_t)ri * row_bytes;
            row_scales[i] = scales + (size_t)ri * groups;
        }
        float part[Q8_TOKENS_PER_TILE][4];
        int full = hi - r >= 4;
        for (int t = 0; t < n; t += Q8_TOKENS_PER_TILE) {
            int T = n - t < Q8_TOKENS_PER_TILE ? n - t : Q8_TOKENS_PER_TILE;
            float *dst = full ? out + (size_t)t * w->rows + r : &part[0][0];
            size_t ldo = full ? (size_t)w->rows : 4;
            QuantizedRow xt = token_row(xq, t);
            if (w->dtype == DTYPE_Q4_0) tile_quant_t(DTYPE_Q4_0, T, rows, row_scales, w->cols, &xt, dst, ldo);
            else tile_quant_t(DTYPE_Q8_0, T, rows, row_scales, w->cols, &xt, dst, ldo);
            if (!full)
                for (int i = 0; i < T; i++)
                    for (int j = 0; j < hi - r; j++) out[(size_t)(t + i) * w->rows + r + j] = part[i][j];
        }
    }
}

static void matmul_rows(float *out, const float *x, const QuantizedRow *xq, const VnniTokens *tiles,
                        const uint16_t *bf16_x, const Tensor *w, int n, int lo, int hi) {
#if defined(KERNELS_AVX512)
    if (bf16_x && (w->dtype == DTYPE_F32 || w->dtype == DTYPE_BF16) && w->cols % 32 == 0)
        lo = amx_bf16_rows(out, w, bf16_x, n, lo, hi); /* --bf16-prefill: whole blocks of 16 rows on the tiles */
#else
    (void)bf16_x;
#endif
    if (lo >= hi) return;
    switch (w->dtype) {
    case DTYPE_F32: rows_float(DTYPE_F32, out, x, w, n, lo, hi); break;
    case DTYPE_F16: rows_float(DTYPE_F16, out, x, w, n, lo, hi); break;
    case DTYPE_BF16: rows_float(DTYPE_BF16, out, x, w, n, lo, hi); break;
    case DTYPE_Q8_0:
    case DTYPE_Q4_0: rows_quantized(out, xq, tiles, w, n, lo, hi); break;
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

/* bytes of the bf16 tiles of n tokens of cols (--bf16-prefill) */
static size_t bf16_tokens_bytes(int n, int cols) { return round_up((size_t)n, 16) * (size_t)cols * 2; }

/* bytes of scratch n tokens of cols need: quantized rows, their AMX tiles, bf16 tiles (each a multiple of 64) */
static size_t scratch_bytes(int n, int cols) {
    return quantized_stride(cols) * (size_t)n + vnni_bytes(n, cols) + tile_bytes(n, cols) +
           round_up(bf16_tokens_bytes(n, cols), 64);
}

int matmul_scratch_reserve(MatmulScratch *ws, int max_tokens, int max_cols) {
    size_t need = scratch_bytes(max_tokens, max_cols);
    if (need <= ws->size) return 0;
    free(ws->data);
    ws->size = 0;
    ws->data = aligned_alloc(64, need); /* need is a multiple of 64 */
    if (!ws->data) return -1;
    ws->size = need;
    return 0;
}

void matmul_scratch_free(MatmulScratch *ws) {
    free(ws->data);
    ws->data = NULL;
    ws->size = 0;
}

/* The most of n tokens of cols that ws holds at once (0: not even one) */
static int scratch_tokens(const MatmulScratch *ws, int n, int cols) {
    if (scratch_bytes(n, cols) <= ws->size) return n;
    int lo = 0, hi = n; /* scratch_bytes grows with the tokens: lo fits, hi does not */
    while (hi - lo > 1) {
        int mid = lo + (hi - lo) / 2;
        if (scratch_bytes(mid, cols) <= ws->size) lo = mid;
        else hi = mid;
    }
    return lo;
}

typedef struct {
    const QuantizedRow *xq;
    const float *x;
    int transpose; /* also lay the values out for rows_many */
} Quantizing;

static void quantize_tokens(void *arg, int begin, int end) {
    const Quantizing *job = arg;
    for (int t = begin; t < end; t++) {
        QuantizedRow r = token_row(job->xq, t);
        quantize_token(&r, job->x + (size_t)t * job->xq->cols);
#if defined(KERNELS_AVX512)
        if (job->transpose) transpose_token(&r);
        if (job->transpose) tile_token(job->xq, &r, t);
#endif
    }
}

/* q8_0 weights need x quantized: into the scratch, once for all the weights of this call */
static QuantizedRow quantize_input(unsigned char *scratch, const float *x, int n, int cols, int transpose) {
    QuantizedRow xq = quantized_row(scratch, cols);
    if (transpose) xq.tiles = scratch + quantized_stride(cols) * (size_t)n + vnni_bytes(n, cols);
    Quantizing job = {&xq, x, transpose};
    parallel_for(n, 1, (long long)n * cols * 4, quantize_tokens, &job); /* ~4 operations a value */
    return xq;
}

typedef struct {
    const Projection *p;
    int count, n;
    const float *x;
    const QuantizedRow *xq;
    const VnniTokens *tiles; /* the activations in tiles for AMX, or NULL */
    const uint16_t *bf16_x;  /* the activations as bf16 tiles (--bf16-prefill), or NULL */
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
        matmul_rows(p->out, job->x, job->xq, job->tiles, job->bf16_x, p->w, job->n, r0, r1 < p->w->rows ? r1 : p->w->rows);
    }
}

void matmul_many(MatmulScratch *ws, const Projection *p, int count, const float *x, int n) {
    if (count > 4) { /* four at most per job (q, k, v; gate, up) */
        matmul_many(ws, p, 4, x, n);
        matmul_many(ws, p + 4, count - 4, x, n);
        return;
    }
    QuantizedRow xq = {0};
    VnniTokens tiles;
    MatmulJob job = {p, count, n, x, &xq, NULL, NULL, {0}};
    long long macs = 0;
    int cols = p[0].w->cols, quantized = 0;
    for (int j = 0; j < count; j++) {
        quantized |= DTYPE_IS_QUANTIZED(p[j].w->dtype);
        int items = uses_blas(p[j].w, n) ? 0 : (p[j].w->rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM; /* BLAS: below */
        job.first_item[j + 1] = job.first_item[j] + items;
        macs += items ? (long long)p[j].w->rows * p[j].w->cols * n : 0;
    }
    int float_tiles = 0; /* --bf16-prefill: the f32 / bf16 weights go to the AMX-BF16 tiles */
    for (int j = 0; j < count; j++)
        float_tiles |= (p[j].w->dtype == DTYPE_F32 || p[j].w->dtype == DTYPE_BF16) && !uses_blas(p[j].w, n);
    int tiles_bf16 = float_tiles && bf16_prefill && n >= AMX_BF16_MIN_TOKENS && cols % 32 == 0 && amx_features() & AMX_BF16;
    if (quantized || tiles_bf16) { /* the scratch is needed: in turns of the tokens it holds (the same bits) */
        int fit = scratch_tokens(ws, n, cols);
        assert(fit > 0 && "runstate_init reserves the scratch for its widest input");
        if (fit < n) {
            for (int t = 0; t < n; t += fit) {
                Projection part[4];
                for (int j = 0; j < count; j++) part[j] = (Projection){p[j].out + (size_t)t * p[j].w->rows, p[j].w};
                matmul_many(ws, part, count, x + (size_t)t * cols, n - t < fit ? n - t : fit);
            }
            return;
        }
    }
    if (tiles_bf16) {
        ProfileSection was = profile_section(PROFILE_QUANTIZE);
        uint16_t *v = (uint16_t *)(ws->data + ws->size - round_up(bf16_tokens_bytes(n, cols), 64));
        bf16_tokens(v, x, n, cols);
        job.bf16_x = v;
        profile_section(was);
    }
    if (quantized) {
        ProfileSection was = profile_section(PROFILE_QUANTIZE);
        int packed = 0; /* packed weights read the transposed values, for any number of tokens */
        for (int j = 0; j < count; j++) packed |= p[j].w->packed != NULL;
        xq = quantize_input(ws->data, x, n, cols, n >= 2 || packed);
        if (n >= (packed ? AMX_PACKED_MIN_TOKENS : AMX_MIN_TOKENS) && amx_features() & AMX_INT8) {
            vnni_tokens(&tiles, &xq, n, ws->data + quantized_stride(cols) * (size_t)n);
            job.tiles = &tiles;
        }
        profile_section(was);
    }
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

size_t matmul_pack_bytes(const Tensor *w) {
#if defined(KERNELS_AVX512)
    int groups = w->cols / Q8_GROUP, stack = w->stack > 1 ? w->stack : 1;
    if (!w->data || !DTYPE_IS_QUANTIZED(w->dtype) || groups % 8 || getenv("ATTN_NO_PACK"))
        return 0;
    return tensor_stack_stride(w->dtype, (uint64_t)w->rows, (uint64_t)w->cols) * (size_t)stack;
#else
    (void)w;
    return 0;
#endif
}

int matmul_pack_replaces(void) { return !(amx_features() & AMX_INT8); }

void matmul_pack_into(Tensor *w, void *dst) {
#if defined(KERNELS_AVX512)
    int groups = w->cols / Q8_GROUP, stack = w->stack > 1 ? w->stack : 1;
    size_t stride = tensor_stack_stride(w->dtype, (uint64_t)w->rows, (uint64_t)w->cols), row_bytes = quantized_row_bytes(w);
    for (int i = 0; i < stack; i++) {
        const uint8_t *src = (const uint8_t *)w->data + (size_t)i * stride;
        uint8_t *to = (uint8_t *)dst + (size_t)i * stride;
        for (int r = 0; r < w->rows; r++) pack_row(w->dtype, to + (size_t)r * row_bytes, src + (size_t)r * row_bytes, groups);
        size_t values = (size_t)w->rows * row_bytes; /* the scales as they are */
        memcpy(to + values, src + values, (size_t)w->rows * groups * 2);
    }
    w->packed = dst;
#else
    (void)w, (void)dst;
#endif
}

int matmul_pack(Tensor *w) {
    w->packed = NULL;
    size_t bytes = matmul_pack_bytes(w);
    if (bytes == 0) return 0;
    void *packed = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!packed) return -1;
    matmul_pack_into(w, packed);
    return 0;
}

void matmul_unpack(Tensor *w) {
    free((void *)w->packed);
    w->packed = NULL;
}

void matmul(MatmulScratch *ws, float *out, const float *x, const Tensor *w, int n) {
    matmul_many(ws, &(Projection){out, w}, 1, x, n);
}

void matmul_serial(float *out, const float *x, const Tensor *w, int n) { matmul_rows(out, x, NULL, NULL, NULL, w, n, 0, w->rows); }
