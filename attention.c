/* attention.c - attention, the way the article builds it up, one short function per variant.
 *
 *   scaled dot-product   Attention(q, K, V) = softmax(q K^T * scale) V        attention_head
 *   multi-head           each head has its own q, k, v slices of head_dim     attention_layer
 *   causal mask          the query at p sees keys 0 .. p                      causal_mask
 *   cross-attention      queries from one sequence, keys/values from another  cross_attention
 *   MQA / GQA            several query heads share one key/value head         kv_head_of
 *   block-sparse         strided and fixed patterns (Child et al. 2019)       strided_mask, fixed_mask
 *   sliding window       the last W keys, in a rolling buffer (+ sinks)       sliding_window_mask
 *   chunked attention    only the keys of the query's own chunk               chunked_mask
 *   flash attention      tiles over the cache with an online softmax          attention_head_flash
 *   learned sinks        a per-head logit that takes a share of the softmax   softmax_with_sink (ops.c)
 *
 * Keys and values come from the layer's KV cache (kvcache.c), written one position at a time; each mask
 * also says which cache it needs (attention_cache_init), so a layer keeps only what it can still read. */
#include "attention.h"

#include <math.h>
#include <string.h>

#include "ops.h"

/* ---------------------------------------------------------------------------------------------
 * MQA / GQA: which kv head a query head reads */

/* n_heads / n_kv_heads consecutive query heads form a group that reads one kv head.
 *   MHA (GPT-2, Llama 2 7B):          n_kv_heads = n_heads, groups of 1
 *   GQA (Llama 3, Mistral, Qwen, Gemma 2; Ainslie et al. 2023): in between, e.g. 32 query / 8 kv heads
 *   MQA (StarCoder, Falcon 7B, PaLM, Gemma 3 1B; Shazeer 2019): n_kv_heads = 1
 * The cache holds only n_kv_heads heads per position: that is the whole memory saving. */
int kv_head_of(int q_head, int n_heads, int n_kv_heads) { return q_head / (n_heads / n_kv_heads); }

/* ---------------------------------------------------------------------------------------------
 * masks: the set of keys the query at position p may see, as runs of positions */

static KeyRun run_of(int first, int count, int step) {
    KeyRun r = {first, count > 0 ? count : 0, step};
    return r;
}

/* Causal mask: p sees 0 .. p, never the future. Every decoder-only model: GPT-2, Llama, Mistral, Qwen. */
static VisibleKeys causal_mask(int p) {
    VisibleKeys v = {1, {run_of(0, p + 1, 1)}};
    return v;
}

/* Sliding window: p sees p-W+1 .. p (W positions, itself included), plus the first n_sinks positions
 * (attention sinks, StreamingLLM: Xiao et al. 2023 - the first tokens soak up attention that has nowhere
 * else to go, so keeping them lets a windowed model run far past its window).
 * Mistral 7B v0.1 (W 4096 on every layer), Phi-3 (2047), Gemma 2 (4096 on every other layer), Gemma 3 (512 or
 * 1024, on five layers of six), Qwen2/3 when enabled. The cache is a rolling buffer of n_sinks + W slots. */
static VisibleKeys sliding_window_mask(int p, int W, int n_sinks) {
    int first = p - W + 1 > 0 ? p - W + 1 : 0;
    int sinks_seen = n_sinks < first ? n_sinks : first; /* sinks still in the window are counted there */
    VisibleKeys v = {2, {run_of(0, sinks_seen, 1), run_of(first, p - first + 1, 1)}};
    return v;
}

/* Strided pattern (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"): p sees the
 * last S positions p-S+1 .. p and every S-th position before them, p-S, p-2S, ... (j with (p - j) mod S = 0).
 * With S = sqrt(n) every query reads about 2 sqrt(n) keys, yet any key reaches any query in two layers.
 * The Sparse Transformer used it for images and audio (one head local, one strided; here their union).
 * The stride column reaches back to the start, so the cache stays paged (every key is read again). */
static VisibleKeys strided_mask(int p, int S) {
    int first = p - S + 1 > 0 ? p - S + 1 : 0;
    VisibleKeys v = {2, {run_of(p % S, p / S, S), run_of(first, p - first + 1, 1)}};
    return v;
}

/* Fixed pattern (Child et al. 2019): positions are cut into blocks of B; p sees its own block up to itself,
 * and the last position of every earlier block (the "summary" column, c = 1 in the paper), which the
 * model learns to use as a digest of its block. The Sparse Transformer used it for text; GPT-3 alternates
 * dense layers with locally banded sparse ones "similar to the Sparse Transformer".
 * Only the summaries outlive their block, so the cache keeps the current block plus one row per block. */
static VisibleKeys fixed_mask(int p, int B) {
    int block_start = p / B * B;
    VisibleKeys v = {2, {run_of(B - 1, p / B, B), run_of(block_start, p - block_start + 1, 1)}};
    return v;
}

/* Chunked attention (Llama 4's local layers, "iRoPE"): positions are cut into chunks of C; p sees only its
 * own chunk, from the chunk's start up to itself. Unlike a sliding window, the first query of a chunk sees
 * only itself: the chunks are independent, and the layers without positions (NoPE, full attention) carry
 * information across them. The cache keeps the current chunk: a rolling buffer of C slots. */
static VisibleKeys chunked_mask(int p, int C) {
    int chunk_start = p / C * C;
    VisibleKeys v = {1, {run_of(chunk_start, p - chunk_start + 1, 1)}};
    return v;
}

VisibleKeys visible_keys(const AttentionSpec *a, int pos) {
    switch (a->mask) {
    case MASK_SLIDING: return sliding_window_mask(pos, a->span, a->n_sinks);
    case MASK_STRIDED: return strided_mask(pos, a->span);
    case MASK_FIXED: return fixed_mask(pos, a->span);
    case MASK_CHUNKED: return chunked_mask(pos, a->span);
    default: return causal_mask(pos);
    }
}

int visible_count(const AttentionSpec *a, int pos) {
    VisibleKeys v = visible_keys(a, pos);
    return v.runs[0].count + (v.n_runs > 1 ? v.runs[1].count : 0);
}

/* Every mask sees the most at the last position, except fixed and chunked: they see the most at the end of a
 * block. */
int most_visible(const AttentionSpec *a, int n_positions) {
    int most = visible_count(a, n_positions - 1);
    if ((a->mask == MASK_FIXED || a->mask == MASK_CHUNKED) && n_positions >= a->span) {
        int end_of_last_full_block = n_positions / a->span * a->span - 1;
        int there = visible_count(a, end_of_last_full_block);
        if (there > most) most = there;
    }
    return most;
}

void attention_cache_init(KVLayer *l, int kv_dim, const AttentionSpec *a) {
    if (a->mask == MASK_SLIDING || a->mask == MASK_CHUNKED) kvlayer_init(l, kv_dim, a->span, a->n_sinks);
    else if (a->mask == MASK_FIXED) kvlayer_init_summaries(l, kv_dim, a->span);
    else kvlayer_init(l, kv_dim, 0, 0); /* causal and strided: paged, every position kept */
}

/* ---------------------------------------------------------------------------------------------
 * scaled dot-product attention, the naive kernel */

static float dot(const float *a, const float *b, int n) { return dot_product(a, b, n); /* SIMD, ops.h */ }

/* out += w * v */
static void add_scaled(float *out, float w, const float *v, int n) {
    for (int i = 0; i < n; i++) out[i] += w * v[i];
}

/* s_j = softcap(q . k_j * scale): Gemma 2 squashes scores into (-c, c) so no logit can run away */
static float score(const float *q, const float *key, const AttentionSpec *a) {
    return softcap(dot(q, key, a->head_dim) * a->scale, a->softcap);
}

/* Scaled dot-product attention of one query head over its visible cached keys ("Attention Is All You
 * Need", Vaswani et al. 2017):
 *   s_j = q . k_j * scale   (scale = 1/sqrt(head_dim) keeps the dot products' variance near 1)
 *   w   = softmax(s)        over the visible j only: the mask
 *   out = sum_j w_j v_j
 * With a learned sink (gpt-oss: one logit per head, Xiao et al.'s attention sink made a parameter) the softmax
 * has one more term in its denominator, e^(sink - max): a head can give most of its attention to "nothing"
 * instead of to the first token, and its weights then sum to less than 1.
 * The naive kernel: it materialises the whole score row (which is what --attn-map records). */
void attention_head(float *out, const float *q, const KVLayer *kv, int kv_head, int pos, const AttentionSpec *a,
                    float sink, float *weights) {
    int hd = a->head_dim, off = kv_head * hd, n = 0;
    VisibleKeys v = visible_keys(a, pos);
    FOR_EACH_VISIBLE_KEY(v, j) weights[n++] = score(q, kvlayer_key(kv, j) + off, a);
    softmax_with_sink(weights, n, sink);
    memset(out, 0, (size_t)hd * sizeof(float));
    n = 0;
    FOR_EACH_VISIBLE_KEY(v, j) add_scaled(out, weights[n++], kvlayer_value(kv, j) + off, hd);
}

/* ---------------------------------------------------------------------------------------------
 * flash attention: the same sum, tile by tile, with an online softmax */

/* The running state of an online softmax (Milakov & Gimelshein 2018): the largest score seen so far and
 * the sum of e^(s - max) over the scores seen; the output accumulates e^(s - max) v alongside. */
typedef struct {
    float max, sum;
} OnlineSoftmax;

/* Folds one tile of n scores and their value rows into the running state:
 *   m' = max(m, max_t s_t)
 *   l' = l e^(m - m') + sum_t e^(s_t - m')
 *   o' = o e^(m - m') + sum_t e^(s_t - m') v_t
 * Rescaling by e^(m - m') is what lets the max change without revisiting earlier tiles. */
static void online_softmax_tile(float *acc, OnlineSoftmax *st, const float *scores, const float *const *values,
                                int n, int hd) {
    float tile_max = scores[0];
    for (int t = 1; t < n; t++)
        if (scores[t] > tile_max) tile_max = scores[t];
    if (tile_max > st->max) {
        float rescale = expf(st->max - tile_max); /* 0 before the first tile (max = -inf) */
        st->sum *= rescale;
        for (int i = 0; i < hd; i++) acc[i] *= rescale;
        st->max = tile_max;
    }
    for (int t = 0; t < n; t++) {
        float p = expf(scores[t] - st->max);
        st->sum += p;
        add_scaled(acc, p, values[t], hd);
    }
}

/* Nothing seen yet: max -inf, sum 0. A learned sink starts the state as one score already seen that carries
 * no value: max = sink, sum = e^0 = 1. */
static OnlineSoftmax online_softmax_start(float *acc, int hd, float sink) {
    memset(acc, 0, (size_t)hd * sizeof(float));
    OnlineSoftmax st = {sink, sink == -INFINITY ? 0.0f : 1.0f};
    return st;
}

/* out = o / l: the softmax's normalisation, applied once at the end */
static void online_softmax_finish(float *acc, const OnlineSoftmax *st, int hd) {
    for (int i = 0; i < hd; i++) acc[i] /= st->sum;
}

/* Flash attention (Dao et al. 2022), on a CPU and for one query: the same result as attention_head, but
 * the keys are taken one KV-cache block at a time (the visible keys that share a block of KV_BLOCK_TOKENS
 * rows form a tile) and folded in with an online softmax, so no score row is ever materialised: memory
 * O(KV_BLOCK_TOKENS) whatever the context. Exact, not an approximation: any model can use it (llama.cpp's
 * -fa, vLLM, gemma.cpp). */
void attention_head_flash(float *out, const float *q, const KVLayer *kv, int kv_head, int pos,
                          const AttentionSpec *a, float sink) {
    int hd = a->head_dim, off = kv_head * hd, n = 0, tile_block = -1;
    float tile_scores[KV_BLOCK_TOKENS];
    const float *tile_values[KV_BLOCK_TOKENS];
    OnlineSoftmax st = online_softmax_start(out, hd, sink);
    VisibleKeys v = visible_keys(a, pos);
    FOR_EACH_VISIBLE_KEY(v, j) {
        int block = kvlayer_slot_of(kv, j) / KV_BLOCK_TOKENS;
        if (n > 0 && (block != tile_block || n == KV_BLOCK_TOKENS)) { /* the tile ends with its cache block */
            online_softmax_tile(out, &st, tile_scores, tile_values, n, hd);
            n = 0;
        }
        tile_block = block;
        tile_scores[n] = score(q, kvlayer_key(kv, j) + off, a);
        tile_values[n++] = kvlayer_value(kv, j) + off;
    }
    if (n > 0) online_softmax_tile(out, &st, tile_scores, tile_values, n, hd);
    online_softmax_finish(out, &st, hd);
}

/* ---------------------------------------------------------------------------------------------
 * multi-head attention */

/* Multi-head attention (Vaswani et al. 2017; every transformer - GPT-2 small: 12 heads of 64):
 *   head_h = Attention(q_h, K_kv(h), V_kv(h)),   out = concat(head_0 .. head_{H-1})
 * Every query head attends on its own, through its kv head, over the keys the layer's mask shows it; the
 * heads' outputs sit side by side in out and the output projection (in forward) mixes them.
 * For n tokens at once (a prompt chunk whose keys are all in the cache already), each head does all n
 * tokens in a row, so its slice of the cache stays in the CPU's caches from one token to the next. */
typedef struct {
    float *out, *weights;
    const float *q;
    const KVLayer *kv;
    int n_heads, n_kv_heads, pos, n_tokens, weights_stride;
    const AttentionSpec *a;
} HeadsJob;

static void attend_heads(void *arg, int first, int end) {
    const HeadsJob *j = arg;
    int hd = j->a->head_dim;
    size_t q_dim = (size_t)j->n_heads * hd;
    for (int h = first; h < end; h++) {
        int kv_head = kv_head_of(h, j->n_heads, j->n_kv_heads);
        float sink = j->a->sink_logits ? j->a->sink_logits[h] : -INFINITY;
        for (int t = 0; t < j->n_tokens; t++) {
            float *out = j->out + t * q_dim + (size_t)h * hd;
            const float *q = j->q + t * q_dim + (size_t)h * hd;
            if (j->a->kernel == KERNEL_FLASH) attention_head_flash(out, q, j->kv, kv_head, j->pos + t, j->a, sink);
            else attention_head(out, q, j->kv, kv_head, j->pos + t, j->a, sink, j->weights + (size_t)h * j->weights_stride);
        }
    }
}

void attention_layer(float *out, const float *q, const KVLayer *kv, int n_heads, int n_kv_heads, int pos,
                     int n_tokens, const AttentionSpec *a, float *weights, int weights_stride) {
    HeadsJob job = {out, weights, q, kv, n_heads, n_kv_heads, pos, n_tokens, weights_stride, a};
    long long work = 2LL * n_heads * n_tokens * visible_count(a, pos + n_tokens - 1) * a->head_dim;
    parallel_for(n_heads, 1, work, attend_heads, &job); /* ops.h */
}

void weights_by_position(float *row, const float *weights, const AttentionSpec *a, int pos) {
    memset(row, 0, (size_t)(pos + 1) * sizeof(float));
    VisibleKeys v = visible_keys(a, pos);
    int n = 0;
    FOR_EACH_VISIBLE_KEY(v, j) row[j] = weights[n++];
}

/* ---------------------------------------------------------------------------------------------
 * cross-attention */

/* Cross-attention: the decoder's queries read the encoder's keys and values, all of them - there is no
 * mask, the source sequence is complete before decoding starts:
 *   out_i = softmax(q_i K_src^T * scale) V_src
 * The original Transformer's encoder-decoder (translation), T5, BART, Whisper's decoder reading the audio
 * encoder, Llama 3.2 Vision's image layers. Computed like the flash kernel, KV_BLOCK_TOKENS keys at a time. */
typedef struct {
    float *out;
    const float *queries, *keys, *values;
    int n_keys, n_heads, n_kv_heads, head_dim;
    float scale;
} CrossJob;

/* items = (query, head) pairs */
static void cross_attend(void *arg, int begin, int end) {
    const CrossJob *j = arg;
    int head_dim = j->head_dim, n_keys = j->n_keys, q_dim = j->n_heads * head_dim, kv_dim = j->n_kv_heads * head_dim;
    const float *keys = j->keys, *values = j->values;
    float scale = j->scale;
    for (int item = begin; item < end; item++) {
        int i = item / j->n_heads, h = item % j->n_heads;
        const float *q = j->queries + (size_t)i * q_dim + (size_t)h * head_dim;
        float *acc = j->out + (size_t)i * q_dim + (size_t)h * head_dim;
        size_t off = (size_t)kv_head_of(h, j->n_heads, j->n_kv_heads) * head_dim;
        float tile_scores[KV_BLOCK_TOKENS];
        const float *tile_values[KV_BLOCK_TOKENS];
        OnlineSoftmax st = online_softmax_start(acc, head_dim, -INFINITY);
        for (int first = 0; first < n_keys; first += KV_BLOCK_TOKENS) {
            int n = n_keys - first < KV_BLOCK_TOKENS ? n_keys - first : KV_BLOCK_TOKENS;
            for (int t = 0; t < n; t++) {
                tile_scores[t] = dot(q, keys + (size_t)(first + t) * kv_dim + off, head_dim) * scale;
                tile_values[t] = values + (size_t)(first + t) * kv_dim + off;
            }
            online_softmax_tile(acc, &st, tile_scores, tile_values, n, head_dim);
        }
        online_softmax_finish(acc, &st, head_dim);
    }
}

void cross_attention(float *out, const float *queries, int n_queries, const float *keys, const float *values,
                     int n_keys, int n_heads, int n_kv_heads, int head_dim, float scale) {
    CrossJob job = {out, queries, keys, values, n_keys, n_heads, n_kv_heads, head_dim, scale};
    parallel_for(n_queries * n_heads, 1, 2LL * n_queries * n_heads * n_keys * head_dim, cross_attend, &job); /* ops.h */
}
