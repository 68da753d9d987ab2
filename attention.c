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

#include <limits.h>
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

void attention_cache_init(KVLayer *l, int k_dim, int v_dim, const AttentionSpec *a) {
    if (a->mask == MASK_SLIDING || a->mask == MASK_CHUNKED) kvlayer_init(l, k_dim, a->span, a->n_sinks);
    else if (a->mask == MASK_FIXED) kvlayer_init_summaries(l, k_dim, a->span);
    else kvlayer_init(l, k_dim, 0, 0); /* causal and strided: paged, every position kept */
    kvlayer_set_value_width(l, v_dim);
    kvlayer_set_type(l, v_dim ? a->kv_type : KV_F32); /* mla.c reads latent rows as floats */
}

/* ---------------------------------------------------------------------------------------------
 * scaled dot-product attention, the naive kernel */

static float dot(const float *a, const float *b, int n) { return dot_product(a, b, n); /* SIMD, ops.h */ }

/* out += w * v  (each element rounded once: a fused multiply-add) */
static void add_scaled(float *out, float w, const float *v, int n) {
    for (int i = 0; i < n; i++) out[i] = fmaf(w, v[i], out[i]);
}

/* Elements off .. off+n-1 of the key / value row of position j as floats: in place for an f32 cache, else
 * converted into scratch[n] (bf16, q8_0: the cache is read at its own size, converted right before use) */
static const float *key_of(const KVLayer *kv, int j, int off, int n, float *scratch) {
    return kv_row_f32(kvlayer_key_row(kv, j), kv->type, off, n, scratch);
}

static const float *value_of(const KVLayer *kv, int j, int off, int n, float *scratch) {
    return kv_row_f32(kvlayer_value_row(kv, j), kv->type, off, n, scratch);
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
    float row[1024]; /* head_dim <= 1024 (model.c) */
    VisibleKeys v = visible_keys(a, pos);
    FOR_EACH_VISIBLE_KEY(v, j) weights[n++] = score(q, key_of(kv, j, off, hd, row), a);
    softmax_with_sink(weights, n, sink);
    memset(out, 0, (size_t)hd * sizeof(float));
    n = 0;
    FOR_EACH_VISIBLE_KEY(v, j) add_scaled(out, weights[n++], value_of(kv, j, off, hd, row), hd);
}

/* ---------------------------------------------------------------------------------------------
 * flash attention: the same sum, tile by tile, with an online softmax */

/* The running state of an online softmax (Milakov & Gimelshein 2018, OnlineSoftmax in attention.h): the
 * largest score seen so far and the sum of e^(s - max) over the scores seen; the output accumulates
 * e^(s - max) v alongside. */

/* Folds one tile of n scores and their value rows into the running state:
 *   m' = max(m, max_t s_t)
 *   l' = l e^(m - m') + sum_t e^(s_t - m')
 *   o' = o e^(m - m') + sum_t e^(s_t - m') v_t
 * Rescaling by e^(m - m') is what lets the max change without revisiting earlier tiles. */
void online_softmax_tile(float *acc, OnlineSoftmax *st, const float *scores, const float *const *values, int n, int hd) {
    float tile_max = scores[0], p[KV_BLOCK_TOKENS];
    for (int t = 1; t < n; t++)
        if (scores[t] > tile_max) tile_max = scores[t];
    if (tile_max > st->max) {
        float rescale = exp_f32(st->max - tile_max); /* 0 before the first tile (max = -inf) */
        st->sum *= rescale;
        for (int i = 0; i < hd; i++) acc[i] *= rescale;
        st->max = tile_max;
    }
    for (int t = 0; t < n; t++) {
        p[t] = exp_f32(scores[t] - st->max);
        st->sum += p[t];
    }
    add_scaled_rows(acc, p, values, n, hd); /* acc += p_t v_t for each t in turn: add_scaled's bits (ops.h) */
}

/* Nothing seen yet: max -inf, sum 0. A learned sink starts the state as one score already seen that carries
 * no value: max = sink, sum = e^0 = 1. */
OnlineSoftmax online_softmax_start(float *acc, int hd, float sink) {
    memset(acc, 0, (size_t)hd * sizeof(float));
    OnlineSoftmax st = {sink, sink == -INFINITY ? 0.0f : 1.0f};
    return st;
}

/* out = o / l: the softmax's normalisation, applied once at the end */
void online_softmax_finish(float *acc, const OnlineSoftmax *st, int hd) {
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
    float tile_scores[KV_BLOCK_TOKENS], key[1024], values[KV_BLOCK_TOKENS * 1024]; /* head_dim <= 1024 */
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
        tile_scores[n] = score(q, key_of(kv, j, off, hd, key), a);
        tile_values[n] = value_of(kv, j, off, hd, values + (size_t)n * hd);
        n++;
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
 *
 * attention_head above is the formula; attention_layer runs the same arithmetic for every (query, head) --
 * the same scores, softmax and weighted sum in the same order, so the same bits (tests/unit.c compares
 * them) -- in the order the memory hierarchy wants: a job takes a range of query heads (those of one kv
 * head together), and for a tile of up to ATTENTION_QUERY_TILE consecutive queries reads each cached key and
 * value row once for all of them, instead of once per query and head. The dot products go four keys at a
 * time (dot_product4: the lane sums of four keys share one tree). */
typedef struct {
    float *out, *weights;
    const float *q;
    const KVLayer *kv;
    int n_heads, n_kv_heads, pos, n_tokens, weights_stride;
    const AttentionSpec *a;
    int split_keys; /* decode split by keys (split_scores): keys per item */
} HeadsJob;

/* 1 if key position j is one of v's */
static int is_visible(const VisibleKeys *v, int j) {
    for (int r = 0; r < v->n_runs; r++) {
        const KeyRun *k = &v->runs[r];
        if (k->count > 0 && j >= k->first && j <= k->first + (k->count - 1) * k->step &&
            (k->step == 1 || (j - k->first) % k->step == 0))
            return 1;
    }
    return 0;
}

/* Walks key positions in increasing order, up to four at a time */
typedef struct {
    VisibleKeys v;
    int run, i;
} KeyCursor;

static int next_keys(KeyCursor *c, int keys[4]) {
    int n = 0;
    while (n < 4 && c->run < c->v.n_runs) {
        const KeyRun *k = &c->v.runs[c->run];
        if (c->i < k->count) keys[n++] = k->first + c->i++ * k->step;
        else c->run++, c->i = 0;
    }
    return n;
}

/* [lo, hi) widened to take in every key position of v */
static void widen_span(const VisibleKeys *v, int *lo, int *hi) {
    for (int r = 0; r < v->n_runs; r++)
        if (v->runs[r].count > 0) {
            int first = v->runs[r].first, last = first + (v->runs[r].count - 1) * v->runs[r].step;
            if (first < *lo) *lo = first;
            if (last + 1 > *hi) *hi = last + 1;
        }
}

/* The keys a tile of queries at positions p0 .. p0+T-1 walks: one query walks its own visible keys; several
 * walk the span from the first key any of them sees to the last, each skipping those it does not see, when
 * that span is not much wider than what one of them sees (causal, sliding and chunked masks); otherwise
 * (strided, fixed) the tile is cut to one query. */
static VisibleKeys tile_keys(const AttentionSpec *a, int p0, int *T) {
    VisibleKeys first = visible_keys(a, p0);
    if (*T == 1) return first;
    int lo = p0, hi = 0, most = 0;
    for (int t = 0; t < *T; t++) {
        VisibleKeys v = visible_keys(a, p0 + t);
        int n = v.runs[0].count + (v.n_runs > 1 ? v.runs[1].count : 0);
        widen_span(&v, &lo, &hi);
        if (n > most) most = n;
    }
    if (hi - lo > 2 * most + 64) {
        *T = 1;
        return first;
    }
    VisibleKeys span = {1, {{lo, hi - lo, 1}}};
    return span;
}

/* A tile: queries t0 .. t0+T-1 of a job, its heads h0 .. h1-1, the keys they walk, and how many of them each
 * query has seen so far (its place in its row of weights) */
typedef struct {
    const HeadsJob *j;
    int t0, T, h0, h1;
    VisibleKeys vis[ATTENTION_QUERY_TILE], walk;
    int seen[ATTENTION_QUERY_TILE];
} Tile;

/* query t's row of weights for head h: row (t * n_heads + h) of the job's buffer */
static float *weights_row(const Tile *c, int t, int h) {
    return c->j->weights + ((size_t)t * c->j->n_heads + h) * (size_t)c->j->weights_stride;
}

static const float *query_of(const Tile *c, int t, int h) {
    return c->j->q + ((size_t)(c->t0 + t) * c->j->n_heads + h) * c->j->a->head_dim;
}

static float *output_of(const Tile *c, int t, int h) {
    return c->j->out + ((size_t)(c->t0 + t) * c->j->n_heads + h) * c->j->a->head_dim;
}

/* which of keys k[0 .. n-1] a query that sees v sees, as bits; consecutive keys against runs of step 1 (causal,
 * sliding, chunked masks) by intersecting ranges */
static unsigned visible_bits(const VisibleKeys *v, const int *k, int n) {
    unsigned bits = 0;
    if (k[n - 1] - k[0] == n - 1 && v->runs[0].step == 1 && (v->n_runs == 1 || v->runs[1].step == 1)) {
        for (int r = 0; r < v->n_runs; r++) {
            int lo = v->runs[r].first - k[0], hi = lo + v->runs[r].count; /* the run as key indices lo .. hi-1 */
            lo = lo < 0 ? 0 : lo;
            hi = hi > n ? n : hi;
            if (lo < hi) bits |= ((hi - lo == 32 ? 0u : 1u << (hi - lo)) - 1) << lo;
        }
        return bits;
    }
    for (int i = 0; i < n; i++) bits |= (unsigned)is_visible(v, k[i]) << i;
    return bits;
}

/* which of keys k[0 .. n-1] query t of the tile sees (a lone query walks only its own keys) */
static unsigned seen_bits(const Tile *c, int t, const int *k, int n) {
    return c->T == 1 ? (1u << n) - 1 : visible_bits(&c->vis[t], k, n);
}

/* w[0 ..] = softcap(dot * scale) of the n keys whose bits are set, in order */
static void store_scores(float *w, const AttentionSpec *a, const float *dots, int n, unsigned bits) {
    if (bits == (1u << n) - 1 && a->softcap == 0.0f) { /* every key seen, no cap: a loop that vectorises */
        for (int i = 0; i < n; i++) w[i] = dots[i] * a->scale;
        return;
    }
    for (int i = 0, m = 0; i < n; i++)
        if (bits >> i & 1) w[m++] = a->softcap > 0.0f ? softcap(dots[i] * a->scale, a->softcap) : dots[i] * a->scale;
}

/* the same, appended to query t's row for head h */
static void append_scores(Tile *c, int t, int h, const float *dots, int n, unsigned bits) {
    store_scores(weights_row(c, t, h) + c->seen[t], c->j->a, dots, n, bits);
}

/* Scores four keys at a time: each key row is read once for the tile's queries and heads */
/* Asks for the part of the rows of the keys the cursor gives `skip` steps from now that heads h0 .. h1-1 read
 * (keys, or values), so that it is in cache when their turn comes: a decode step reads each row once, a slice of
 * it per thread, and the blocks lie apart in memory. Measured on the 110M shape at 4,000 positions (2 threads):
 * attention -30% with q8_0 KV, -20% bf16, -3% f32. */
/* bytes from .. to-1 of a cached row, asked for a line at a time */
static void prefetch_row(const char *row, size_t from, size_t to) {
    for (size_t b = from; b < to; b += 64) __builtin_prefetch(row + b, 0, 2);
}

static void prefetch_ahead(const HeadsJob *j, KeyCursor cur, int skip, int h0, int h1, int values) {
    int keys[4], n = 0;
    for (int s = 0; s <= skip && (n = next_keys(&cur, keys)) > 0; s++) {}
    if (n == 0) return;
    int g0 = kv_head_of(h0, j->n_heads, j->n_kv_heads), g1 = kv_head_of(h1 - 1, j->n_heads, j->n_kv_heads) + 1;
    int width = values ? j->kv->v_dim : j->kv->kv_dim, hd = j->a->head_dim;
    size_t from = kv_row_bytes(g0 * hd, j->kv->type), to = kv_row_bytes(g1 * hd < width ? g1 * hd : width, j->kv->type);
    for (int i = 0; i < n; i++) {
        prefetch_row(values ? kvlayer_value_row(j->kv, keys[i]) : kvlayer_key_row(j->kv, keys[i]), from, to);
    }
}

static void scores_by_four(Tile *c) {
    const HeadsJob *j = c->j;
    int hd = j->a->head_dim, keys[4], nk;
    float converted[4 * 1024]; /* head_dim <= 1024 (model.c) */
    KeyCursor cur = {c->walk, 0, 0};
    while ((nk = next_keys(&cur, keys)) > 0) {
        const void *krow[4];
        for (int i = 0; i < 4; i++) krow[i] = kvlayer_key_row(j->kv, keys[i < nk ? i : 0]);
        if (c->T == 1) prefetch_ahead(j, cur, 1, c->h0, c->h1, 0); /* decode: the keys two steps on */
        for (int t = 0; t < c->T; t++) {
            unsigned bits = seen_bits(c, t, keys, nk);
            if (!bits) continue;
            for (int h = c->h0; h < c->h1; h++) {
                float d[4];
                kv_dot_product4(d, query_of(c, t, h), krow, j->kv->type, kv_head_of(h, j->n_heads, j->n_kv_heads) * hd, hd,
                                converted);
                append_scores(c, t, h, d, nk, bits);
            }
            c->seen[t] += __builtin_popcount(bits);
        }
    }
}

/* Scores a block of 16 keys at a time (a tile of queries over a contiguous span, head_dim a multiple of 16):
 * the block's keys of each kv head are transposed once, then every query and head of the tile takes its 16
 * dot products from them without summing across a vector (dot_product16) */
static void scores_by_block(Tile *c) {
    const HeadsJob *j = c->j;
    int hd = j->a->head_dim, lo = c->walk.runs[0].first, hi = lo + c->walk.runs[0].count, group = j->n_heads / j->n_kv_heads;
    float kt[1024 * 16], converted[1024 * 16]; /* head_dim <= 1024 (model.c) */
    for (int k0 = lo; k0 < hi; k0 += 16) {
        int nk = hi - k0 < 16 ? hi - k0 : 16, keys[16];
        const void *krow[16];
        unsigned bits[ATTENTION_QUERY_TILE];
        for (int i = 0; i < 16; i++) keys[i] = k0 + (i < nk ? i : 0), krow[i] = kvlayer_key_row(j->kv, keys[i]);
        for (int t = 0; t < c->T; t++) bits[t] = seen_bits(c, t, keys, nk);
        for (int g = c->h0 / group; g * group < c->h1; g++) { /* each kv head the tile's heads read */
            const float *rows[16];
            for (int i = 0; i < 16; i++) rows[i] = kv_row_f32(krow[i], j->kv->type, g * hd, hd, converted + i * hd);
            transpose_rows16(kt, rows, hd);
            int h_lo = g * group > c->h0 ? g * group : c->h0, h_hi = (g + 1) * group < c->h1 ? (g + 1) * group : c->h1;
            for (int h = h_lo; h < h_hi; h++)
                for (int t = 0; t < c->T; t++) {
                    if (!bits[t]) continue;
                    float d[16], e[16];
                    if (t + 1 < c->T && bits[t + 1]) { /* two queries on one kt: the same bits, half the loads */
                        dot_product16_pair(d, query_of(c, t, h), e, query_of(c, t + 1, h), kt, hd);
                        append_scores(c, t, h, d, nk, bits[t]);
                        t++;
                        append_scores(c, t, h, e, nk, bits[t]);
                        continue;
                    }
                    dot_product16(d, query_of(c, t, h), kt, hd);
                    append_scores(c, t, h, d, nk, bits[t]);
                }
        }
        for (int t = 0; t < c->T; t++) c->seen[t] += __builtin_popcount(bits[t]);
    }
}

/* out = sum_j w_j v_j over each query's keys, in its visible order, 16 keys at a time (32 for a tile of queries):
 * each value row is read once for the tile, each output stays in registers while the rows go by
 * (add_scaled_rows), and two queries that see the same keys take them together (kv_add_scaled_rows_pair: each
 * row loaded once for both, twice the sums in flight). With scores_by_block's pairs, measured on one layer of the
 * 110M shape over a 4,000-token prompt (2 threads, a noisy machine): f32 KV 684 -> 503 ms, bf16 747 -> 500,
 * q8_0 836 -> 535. */
static void weighted_sums(Tile *c) {
    const HeadsJob *j = c->j;
    int hd = j->a->head_dim, keys[4], nk;
    for (int t = 0; t < c->T; t++) {
        for (int h = c->h0; h < c->h1; h++) memset(output_of(c, t, h), 0, (size_t)hd * sizeof(float));
        c->seen[t] = 0;
    }
    float converted[16 * 1024]; /* head_dim <= 1024 (model.c) */
    KeyCursor cur = {c->walk, 0, 0};
    for (;;) {
        const void *vrow[32];
        int chunk[32], n = 0, most = c->T == 1 ? 16 : 32; /* a tile of queries: 32 rows per pass (seen_bits' 32 bits) */
        while (n < most && (nk = next_keys(&cur, keys)) > 0)
            for (int i = 0; i < nk; i++) chunk[n] = keys[i], vrow[n++] = kvlayer_value_row(j->kv, keys[i]);
        if (n == 0) break;
        for (int s = 0; s < 4 && c->T == 1; s++) prefetch_ahead(j, cur, s, c->h0, c->h1, 1); /* decode: the next 16 values */
        for (int t = 0; t < c->T; t++) {
            unsigned bits = seen_bits(c, t, chunk, n);
            int pair = t + 1 < c->T && seen_bits(c, t + 1, chunk, n) == bits; /* two queries, the same keys */
            const void *mine[32];
            int m = 0;
            for (int i = 0; i < n; i++)
                if (bits >> i & 1) mine[m++] = vrow[i];
            for (int h = c->h0; h < c->h1; h++) {
                int off = kv_head_of(h, j->n_heads, j->n_kv_heads) * hd;
                float *out = output_of(c, t, h), *w = weights_row(c, t, h) + c->seen[t];
                if (pair)
                    kv_add_scaled_rows_pair(out, w, output_of(c, t + 1, h), weights_row(c, t + 1, h) + c->seen[t + 1], mine, m,
                                            j->kv->type, off, hd, converted);
                else kv_add_scaled_rows(out, w, mine, m, j->kv->type, off, hd, converted);
            }
            c->seen[t] += m;
            if (pair) c->seen[++t] += m;
        }
    }
}

/* queries t0 .. t0+T-1 of the job (or fewer: tile_keys), heads h0 .. h1-1: scores, softmax, weighted sums,
 * each (query, head) as attention_head. Returns the number of queries done. */
static int naive_tile(const HeadsJob *j, int t0, int T, int h0, int h1) {
    Tile c = {j, t0, T, h0, h1, {{0}}, {0}, {0}};
    for (int t = 0; t < T; t++) c.vis[t] = visible_keys(j->a, j->pos + t0 + t);
    c.walk = tile_keys(j->a, j->pos + t0, &c.T);
    if (c.T > 1 && j->a->head_dim % 16 == 0) scores_by_block(&c);
    else scores_by_four(&c);
    for (int t = 0; t < c.T; t++)
        for (int h = h0; h < h1; h++)
            softmax_with_sink(weights_row(&c, t, h), c.seen[t], j->a->sink_logits ? j->a->sink_logits[h] : -INFINITY);
    weighted_sums(&c);
    return c.T;
}

/* The next tile of the flash kernel's walk: the keys (up to 16) that share a cache block, as
 * attention_head_flash cuts them; for a tile of queries over a paged cache (slot = position), the blocks of 16
 * positions. Returns how many. */
static int next_flash_tile(const Tile *c, KeyCursor *cur, int keys[16], int *pending, int *n_pending) {
    int n = 0, block = -1;
    for (;;) {
        if (*n_pending == 0 && (*n_pending = next_keys(cur, pending)) == 0) return n;
        int k = pending[0], b = kvlayer_slot_of(c->j->kv, k) / KV_BLOCK_TOKENS;
        if (n > 0 && (b != block || n == 16)) return n;
        block = b;
        keys[n++] = k;
        for (int i = 1; i < *n_pending; i++) pending[i - 1] = pending[i];
        (*n_pending)--;
    }
}

/* The flash kernel for a tile of queries and up to 8 heads of one kv head: each tile of keys is scored for
 * all of them (as scores_by_four / scores_by_block), then folded into each (query, head)'s online softmax by
 * online_softmax_tile, the function attention_head_flash calls on the same tiles: its bits. */
static int flash_tile(const HeadsJob *j, int t0, int T, int h0, int h1) {
    Tile c = {j, t0, T, h0, h1, {{0}}, {0}, {0}};
    const AttentionSpec *a = j->a;
    int hd = a->head_dim, n_heads = j->n_heads;
    for (int t = 0; t < T; t++) c.vis[t] = visible_keys(a, j->pos + t0 + t);
    c.walk = tile_keys(a, j->pos + t0, &c.T);
    if (!kvlayer_keeps_every_position(j->kv)) c.T = 1, c.walk = c.vis[0];
    OnlineSoftmax st[ATTENTION_QUERY_TILE][8];
    for (int t = 0; t < c.T; t++)
        for (int h = h0; h < h1; h++)
            st[t][h - h0] = online_softmax_start(output_of(&c, t, h), hd,
                                                 a->sink_logits ? a->sink_logits[h] : -INFINITY);
    int off = kv_head_of(h0, n_heads, j->n_kv_heads) * hd, keys[16], pending[4], n_pending = 0, nk;
    float kt[1024 * 16], scores[16], converted[2][16 * 1024]; /* head_dim <= 1024 (model.c) */
    KeyCursor cur = {c.walk, 0, 0};
    while ((nk = next_flash_tile(&c, &cur, keys, pending, &n_pending)) > 0) {
        const float *krow[16], *vrow[16];
        for (int i = 0; i < 16; i++) {
            int key = keys[i < nk ? i : 0];
            krow[i] = i < nk ? key_of(j->kv, key, off, hd, converted[0] + i * hd) : krow[0];
            vrow[i] = i < nk ? value_of(j->kv, key, off, hd, converted[1] + i * hd) : vrow[0];
        }
        int by_block = c.T > 1 && hd % 16 == 0;
        if (by_block) transpose_rows16(kt, krow, hd);
        for (int t = 0; t < c.T; t++) {
            unsigned bits = seen_bits(&c, t, keys, nk);
            if (!bits) continue;
            const float *values[16];
            int m = 0;
            for (int i = 0; i < nk; i++)
                if (bits >> i & 1) values[m++] = vrow[i];
            for (int h = h0; h < h1; h++) {
                float d[16];
                if (by_block) dot_product16(d, query_of(&c, t, h), kt, hd);
                else
                    for (int i = 0; i < nk; i += 4) dot_product4(d + i, query_of(&c, t, h), krow + i, hd);
                for (int i = 0, k = 0; i < nk; i++)
                    if (bits >> i & 1) scores[k++] = a->softcap > 0.0f ? softcap(d[i] * a->scale, a->softcap) : d[i] * a->scale;
                online_softmax_tile(output_of(&c, t, h), &st[t][h - h0], scores, values, m, hd);
            }
        }
    }
    for (int t = 0; t < c.T; t++)
        for (int h = h0; h < h1; h++) online_softmax_finish(output_of(&c, t, h), &st[t][h - h0], hd);
    return c.T;
}

static void attend_heads(void *arg, int h0, int h1) {
    const HeadsJob *j = arg;
    int group = j->n_heads / j->n_kv_heads;
    for (int t0 = 0; t0 < j->n_tokens;) {
        int T = j->n_tokens - t0 < ATTENTION_QUERY_TILE ? j->n_tokens - t0 : ATTENTION_QUERY_TILE, done = T;
        if (j->a->kernel == KERNEL_FLASH) /* up to 8 heads of one kv head at a time */
            for (int h = h0; h < h1;) {
                int end = (h / group + 1) * group;
                end = end < h1 ? end : h1;
                end = end - h > 8 ? h + 8 : end;
                done = flash_tile(j, t0, T, h, end);
                h = end;
            }
        else done = naive_tile(j, t0, T, h0, h1);
        t0 += done;
    }
}

/* One token against many keys (decode deep into a context): the naive kernel's steps split another way, none of
 * them changing a bit. The scores over runs of SPLIT_KEYS keys, each run for every head: a thread reads whole
 * cached rows, one after another, which the hardware prefetchers stream (split by heads, each thread read a slice
 * of every row: measured on this machine, a core streams half rows of 3 KiB at 11 GB/s, whole ones at 26). Then the
 * softmax per head; then the weighted sum per head (few heads: per 16 columns of head_dim), each output element
 * adding its keys in order as before. (The flash kernel's online softmax would need a merge of partial softmaxes,
 * whose rounding depends on the split: it stays per head.) */
#define SPLIT_KEYS 256   /* at most, keys per item of split_scores */
#define SPLIT_MIN_KEYS 64 /* fewer keys: the per-head tiles (attend_heads) */
#define PF_KEYS 4 /* split_scores asks for the rows this many keys on */

/* the i-th of v's key positions */
static int nth_key(const VisibleKeys *v, int i) {
    if (i < v->runs[0].count) return v->runs[0].first + i * v->runs[0].step;
    i -= v->runs[0].count;
    return v->runs[1].first + i * v->runs[1].step;
}

static void split_scores(void *arg, int begin, int end) {
    const HeadsJob *j = arg;
    VisibleKeys v = visible_keys(j->a, j->pos);
    int n = visible_count(j->a, j->pos), hd = j->a->head_dim;
    Tile c = {j, 0, 1, 0, 0, {v}, v, {0}};
    float converted[4 * 1024]; /* head_dim <= 1024 (model.c) */
    for (int i = begin * j->split_keys, i1 = end * j->split_keys < n ? end * j->split_keys : n; i < i1; i += 4) {
        int nk = i1 - i < 4 ? i1 - i : 4;
        const void *k4[4];
        for (int k = 0; k < 4; k++) k4[k] = kvlayer_key_row(j->kv, nth_key(&v, i + (k < nk ? k : 0)));
        const void *ahead[4];
        int n_ahead = 0;
        for (int k = i + PF_KEYS; k < i + PF_KEYS + 4 && k < i1; k++) ahead[n_ahead++] = kvlayer_key_row(j->kv, nth_key(&v, k));
        c.seen[0] = i;
        for (int h = 0; h < j->n_heads; h++) {
            float d[4];
            int g = kv_head_of(h, j->n_heads, j->n_kv_heads);
            if (h == 0 || g != kv_head_of(h - 1, j->n_heads, j->n_kv_heads)) /* this kv head's part of the rows on */
                for (int k = 0; k < n_ahead; k++)
                    prefetch_row(ahead[k], kv_row_bytes(g * hd, j->kv->type), kv_row_bytes((g + 1) * hd, j->kv->type));
            kv_dot_product4(d, query_of(&c, 0, h), k4, j->kv->type, g * hd, hd, converted);
            append_scores(&c, 0, h, d, nk, (1u << nk) - 1);
        }
    }
}

static void split_softmax(void *arg, int begin, int end) {
    const HeadsJob *j = arg;
    Tile c = {j, 0, 1, 0, 0, {{0}}, {0}, {0}};
    for (int h = begin; h < end; h++)
        softmax_with_sink(weights_row(&c, 0, h), visible_count(j->a, j->pos), j->a->sink_logits ? j->a->sink_logits[h] : -INFINITY);
}

/* items: (head, slice of `width` columns). Each pass of 16 value rows serves every item of the range in turn, and
 * the next pass's rows are asked for first (the part of them the range reads). */
static void sums_by(const HeadsJob *j, int begin, int end, int width) {
    VisibleKeys v = visible_keys(j->a, j->pos);
    int n = visible_count(j->a, j->pos), hd = j->a->head_dim, slices = (hd + width - 1) / width;
    Tile c = {j, 0, 1, 0, 0, {v}, v, {0}};
    float converted[16 * 1024]; /* head_dim <= 1024 (model.c) */
    for (int item = begin; item < end; item++) {
        int h = item / slices, d0 = item % slices * width, w = hd - d0 < width ? hd - d0 : width;
        memset(output_of(&c, 0, h) + d0, 0, (size_t)w * sizeof(float));
    }
    const void *rows[2][16];
    for (int k = 0; k < n && k < 16; k++) rows[0][k] = kvlayer_value_row(j->kv, nth_key(&v, k));
    for (int i = 0, cur = 0; i < n; i += 16, cur ^= 1) {
        int m_next = n - i - 16 < 16 ? n - i - 16 : 16, prefetched = -1;
        for (int k = 0; k < m_next; k++) rows[cur ^ 1][k] = kvlayer_value_row(j->kv, nth_key(&v, i + 16 + k));
        for (int item = begin; item < end; item++) {
            int h = item / slices, d0 = item % slices * width, w = hd - d0 < width ? hd - d0 : width;
            int off = kv_head_of(h, j->n_heads, j->n_kv_heads) * hd + d0;
            if (off + w > prefetched) { /* the part of the next pass's rows this item reads (unless asked for already) */
                size_t from = kv_row_bytes(off > prefetched ? off : prefetched, j->kv->type), to = kv_row_bytes(off + w, j->kv->type);
                for (int k = 0; k < m_next; k++) prefetch_row(rows[cur ^ 1][k], from, to);
                prefetched = off + w;
            }
            kv_add_scaled_rows(output_of(&c, 0, h) + d0, weights_row(&c, 0, h) + i, rows[cur], n - i < 16 ? n - i : 16,
                               j->kv->type, off, w, converted);
        }
    }
}

static void split_sums(void *arg, int begin, int end) { sums_by(arg, begin, end, 16); }
/* whole heads: each head's softmax first, by the thread that then reads its weights (no pass of its own) */
static void head_sums(void *arg, int begin, int end) {
    split_softmax(arg, begin, end);
    sums_by(arg, begin, end, ((const HeadsJob *)arg)->a->head_dim);
}

void attention_layer(float *out, const float *q, const KVLayer *kv, int n_heads, int n_kv_heads, int pos,
                     int n_tokens, const AttentionSpec *a, float *weights, int weights_stride) {
    HeadsJob job = {out, weights, q, kv, n_heads, n_kv_heads, pos, n_tokens, weights_stride, a, 0};
    int n_keys = visible_count(a, pos + n_tokens - 1);
    long long work = 2LL * n_heads * n_tokens * n_keys * a->head_dim;
    if (a->kernel == KERNEL_NAIVE && n_tokens == 1 && n_keys >= SPLIT_MIN_KEYS) {
        int threads = parallel_threads(), per = (n_keys + 4 * threads - 1) / (4 * threads); /* ~4 items a thread */
        job.split_keys = per < 16 ? 16 : per > SPLIT_KEYS ? SPLIT_KEYS : (per + 15) / 16 * 16;
        parallel_for((n_keys + job.split_keys - 1) / job.split_keys, 1, work / 2, split_scores, &job);
        if (n_heads < 2 * threads) { /* few heads: the softmax, then each head's columns in slices */
            parallel_for(n_heads, 1, (long long)n_heads * n_keys * 16, split_softmax, &job);
            parallel_for(n_heads * ((a->head_dim + 15) / 16), 1, work / 2, split_sums, &job);
        } else parallel_for(n_heads, (n_heads + threads - 1) / threads, work / 2, head_sums, &job); /* a share of heads each */
        return;
    }
    /* a job takes whole kv groups while that leaves two jobs per thread; the split changes no result */
    int group = n_heads / n_kv_heads, threads = parallel_threads(), grain = group;
    while (grain > 1 && n_heads / grain < 2 * threads) grain = (grain + 1) / 2;
    /* one token with fewer than SPLIT_MIN_KEYS keys: each thread takes one contiguous share of the heads, reading
     * each cached row (every kv head side by side) in one pass; chunks of one head streamed the whole cache once
     * per head (1.6-2x slower on the 110M shape at 4,000 positions) */
    if (n_tokens == 1) grain = (n_heads + threads - 1) / threads;
    parallel_for(n_heads, grain, work, attend_heads, &job); /* ops.h */
}

/* ---------------------------------------------------------------------------------------------
 * Many sequences in one step: the rows of a shared prefix read once (PagedAttention, Kwon et al. 2023)
 *
 * A decode step of --samples / --prompts holds one query per sequence, each at its own position against its
 * own block table. Sequences forked from one prompt point at the same blocks for it, so the queries walk the
 * keys together, one block of 16 positions at a time. Queries whose tables point at the same rows there and
 * that see the same keys of them form a group: the group's key rows are converted and transposed once and
 * scored for each of its queries (dot_product16, two queries per pass), and its value rows are read once
 * and added into two queries' outputs at a time. N samples of a 1,000-token prompt thus stream the prompt's
 * cache once per step instead of N times; vLLM and SGLang serve shared system prompts this way.
 *
 * Each query's scores, softmax and sums are what attention_layer computes for it alone (dot_product16 has
 * dot_product4's bits; every output element adds its keys in order, whatever the grouping), so a sample's
 * tokens do not depend on the company it decodes in. */
typedef struct {
    float *out, *weights;
    const float *q;
    const KVLayer *const *kv;
    const int *pos;
    int n, n_heads, n_kv_heads, weights_stride;
    const AttentionSpec *a;
} RowsJob;

/* The queries' view of one block of 16 key positions k0 .. k0+15: which keys each sees (bits) and the rows its
 * table gives for them (a key it does not see stands in for by one it does, so that every pointer is a row) */
typedef struct {
    int n_groups, size[ATTENTION_QUERY_TILE], member[ATTENTION_QUERY_TILE][ATTENTION_QUERY_TILE];
    unsigned bits[ATTENTION_QUERY_TILE];
    const void *rows[ATTENTION_QUERY_TILE][16];
} BlockView;

/* Fills v for the block at k0 (values: the value rows, else the keys) and groups the queries that see the same
 * keys through the same rows. */
static void view_block(BlockView *v, const RowsJob *j, const VisibleKeys *vis, int k0, int values) {
    int keys[16];
    for (int i = 0; i < 16; i++) keys[i] = k0 + i;
    v->n_groups = 0;
    for (int r = 0; r < j->n; r++) {
        unsigned bits = v->bits[r] = visible_bits(&vis[r], keys, 16);
        if (!bits) continue;
        int stand_in = k0 + __builtin_ctz(bits);
        for (int i = 0; i < 16; i++) {
            int key = bits >> i & 1 ? keys[i] : stand_in;
            v->rows[r][i] = values ? kvlayer_value_row(j->kv[r], key) : kvlayer_key_row(j->kv[r], key);
        }
        int g = 0;
        while (g < v->n_groups && !(v->bits[v->member[g][0]] == bits &&
                                    !memcmp(v->rows[v->member[g][0]], v->rows[r], sizeof v->rows[r])))
            g++;
        if (g == v->n_groups) v->size[v->n_groups++] = 0;
        v->member[g][v->size[g]++] = r;
    }
}

static float *row_weights(const RowsJob *j, int r, int h) {
    return j->weights + ((size_t)r * j->n_heads + h) * (size_t)j->weights_stride;
}

static const float *row_query(const RowsJob *j, int r, int h) {
    return j->q + ((size_t)r * j->n_heads + h) * j->a->head_dim;
}

static float *row_output(const RowsJob *j, int r, int h) {
    return j->out + ((size_t)r * j->n_heads + h) * j->a->head_dim;
}

/* heads h0 .. h1-1 of every query: scores block by block, softmax, weighted sums block by block */
static void attend_rows(void *arg, int h0, int h1) {
    const RowsJob *j = arg;
    const AttentionSpec *a = j->a;
    KVType type = j->kv[0]->type;
    int hd = a->head_dim, group = j->n_heads / j->n_kv_heads, lo = INT_MAX, hi = 0;
    VisibleKeys vis[ATTENTION_QUERY_TILE];
    int seen[ATTENTION_QUERY_TILE] = {0};
    for (int r = 0; r < j->n; r++) {
        vis[r] = visible_keys(a, j->pos[r]);
        widen_span(&vis[r], &lo, &hi);
    }
    if (hi == 0) lo = 0;
    BlockView v;
    float kt[1024 * 16], converted[1024 * 16]; /* head_dim <= 1024 (model.c) */
    for (int k0 = lo / 16 * 16; k0 < hi; k0 += 16) {
        view_block(&v, j, vis, k0, 0);
        for (int g = 0; g < v.n_groups; g++) {
            const int *member = v.member[g];
            unsigned bits = v.bits[member[0]];
            for (int kvh = h0 / group; kvh * group < h1; kvh++) { /* each kv head these heads read */
                int h_lo = kvh * group > h0 ? kvh * group : h0, h_hi = (kvh + 1) * group < h1 ? (kvh + 1) * group : h1;
                if (v.size[g] * (h_hi - h_lo) == 1) { /* one query, one head: four keys at a time, no transpose */
                    int r = member[0];
                    float d[16];
                    for (int i = 0; i < 16; i += 4) kv_dot_product4(d + i, row_query(j, r, h_lo), v.rows[r] + i, type, kvh * hd, hd, converted);
                    store_scores(row_weights(j, r, h_lo) + seen[r], a, d, 16, bits);
                    continue;
                }
                const float *rows[16];
                for (int i = 0; i < 16; i++) rows[i] = kv_row_f32(v.rows[member[0]][i], type, kvh * hd, hd, converted + i * hd);
                transpose_rows16(kt, rows, hd);
                for (int h = h_lo; h < h_hi; h++)
                    for (int m = 0; m < v.size[g]; m++) {
                        int r = member[m];
                        float d[16], e[16];
                        if (m + 1 < v.size[g]) { /* two queries on one kt: half the loads */
                            int r1 = member[++m];
                            dot_product16_pair(d, row_query(j, r, h), e, row_query(j, r1, h), kt, hd);
                            store_scores(row_weights(j, r1, h) + seen[r1], a, e, 16, bits);
                        } else dot_product16(d, row_query(j, r, h), kt, hd);
                        store_scores(row_weights(j, r, h) + seen[r], a, d, 16, bits);
                    }
            }
            for (int m = 0; m < v.size[g]; m++) seen[member[m]] += __builtin_popcount(bits);
        }
    }
    for (int r = 0; r < j->n; r++) {
        for (int h = h0; h < h1; h++) {
            softmax_with_sink(row_weights(j, r, h), seen[r], a->sink_logits ? a->sink_logits[h] : -INFINITY);
            memset(row_output(j, r, h), 0, (size_t)hd * sizeof(float));
        }
        seen[r] = 0;
    }
    float values[16 * 1024];
    for (int k0 = lo / 16 * 16; k0 < hi; k0 += 16) {
        view_block(&v, j, vis, k0, 1);
        for (int g = 0; g < v.n_groups; g++) {
            const int *member = v.member[g];
            unsigned bits = v.bits[member[0]];
            const void *mine[16];
            int n = 0;
            for (int i = 0; i < 16; i++)
                if (bits >> i & 1) mine[n++] = v.rows[member[0]][i];
            for (int h = h0; h < h1; h++) {
                int off = kv_head_of(h, j->n_heads, j->n_kv_heads) * hd;
                const void *const *rows = mine, *as_f32[16];
                KVType t = type;
                int at = off;
                if (type != KV_F32 && v.size[g] > 2) { /* converted once for the group: the same values, the same bits */
                    for (int i = 0; i < n; i++) as_f32[i] = kv_row_f32(mine[i], type, off, hd, values + i * hd);
                    rows = as_f32, t = KV_F32, at = 0;
                }
                for (int m = 0; m < v.size[g]; m++) {
                    int r = member[m];
                    float *out = row_output(j, r, h), *w = row_weights(j, r, h) + seen[r];
                    if (m + 1 < v.size[g]) {
                        int r1 = member[++m];
                        kv_add_scaled_rows_pair(out, w, row_output(j, r1, h), row_weights(j, r1, h) + seen[r1],
                                                rows, n, t, at, hd, converted);
                    } else kv_add_scaled_rows(out, w, rows, n, t, at, hd, converted);
                }
            }
            for (int m = 0; m < v.size[g]; m++) seen[member[m]] += n;
        }
    }
}

/* queries r0 .. r1-1, every head. Split by heads, each thread read a slice of every cached row (a core streams
 * half rows at less than half the speed of whole ones); split by queries, each sequence's own blocks are read
 * whole by one thread, and a shared block once by each thread whose queries see it. Every (query, head) is the
 * same arithmetic either way: the same bits. */
static void attend_row_range(void *arg, int r0, int r1) {
    const RowsJob *j = arg;
    size_t per_row = (size_t)j->n_heads * j->a->head_dim;
    RowsJob part = {j->out + r0 * per_row, j->weights + (size_t)r0 * j->n_heads * j->weights_stride, j->q + r0 * per_row,
                    j->kv + r0, j->pos + r0, r1 - r0, j->n_heads, j->n_kv_heads, j->weights_stride, j->a};
    attend_rows(&part, 0, j->n_heads);
}

void attention_rows(float *out, const float *q, const KVLayer *const *kv, const int *pos, int n, int n_heads,
                    int n_kv_heads, const AttentionSpec *a, float *weights, int weights_stride) {
    RowsJob job = {out, weights, q, kv, pos, n, n_heads, n_kv_heads, weights_stride, a};
    long long work = 0;
    for (int r = 0; r < n; r++) work += 2LL * n_heads * visible_count(a, pos[r]) * a->head_dim;
    int threads = parallel_threads();
    if (n >= threads && n > 1) /* each thread its share of the queries, every head: whole cached rows */
        parallel_for(n, (n + threads - 1) / threads, work, attend_row_range, &job);
    else parallel_for(n_heads, (n_heads + threads - 1) / threads, work, attend_rows, &job); /* each its share of heads */
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
