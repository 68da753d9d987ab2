/* attention.h - attention kernels and masks (see attention.c for the formulas, docs/ATTENTION.md for the
 * tour with pictures and the ./run flag that shows each one). */
#ifndef ATTN_ATTENTION_H
#define ATTN_ATTENTION_H

#include "kvcache.h"

/* Which keys a query may see (attention.c has one function per mask, with its formula). */
typedef enum {
    MASK_CAUSAL,  /* every position up to the query's own (GPT-2, Llama) */
    MASK_SLIDING, /* the last `span` positions, plus the first n_sinks (Mistral, Gemma 2/3; StreamingLLM) */
    MASK_STRIDED, /* the last `span` positions and every span-th one before them (Child et al. 2019) */
    MASK_FIXED,   /* the query's own block of `span` positions and the last position of every earlier block */
    MASK_CHUNKED, /* the query's own chunk of `span` positions, up to itself (Llama 4's local layers) */
} MaskKind;

typedef enum {
    KERNEL_NAIVE, /* scores, softmax, weighted sum: the score row is materialised (and can be recorded) */
    KERNEL_FLASH, /* the same sum one cache block at a time with an online softmax: no score row */
} KernelKind;

/* Latent attention's two exact forms (mla.c) */
typedef enum {
    LATENT_AUTO,     /* at each query's position, the form with fewer multiply-adds (mla.c: absorbed_is_cheaper) */
    LATENT_ABSORBED, /* scores and weighted sums in latent space: each cached latent read once for all heads */
    LATENT_EXPANDED, /* each head's keys and values decompressed from the latents, then attention */
} LatentKernel;

/* How one layer attends when run, for each of its query heads: derived from the file's layer record, plus
 * any overrides of the mask and kernel (--window, --sinks, --sparse, --attn). */
typedef struct {
    int head_dim;
    float scale;     /* multiplies q.k: 1/sqrt(head_dim) in "Attention Is All You Need" */
    float softcap;   /* 0: none; c: scores squashed into (-c, c) before the softmax (Gemma 2) */
    MaskKind mask;
    int span;        /* the mask's size: window W (sliding), stride S (strided), block B (fixed), chunk C; 0 if causal */
    int n_sinks;     /* sliding only: the first n_sinks positions stay visible (attention sinks, StreamingLLM) */
    const float *sink_logits; /* NULL, or a learned logit per query head that joins its softmax (gpt-oss) */
    KernelKind kernel;
    LatentKernel latent_kernel; /* latent attention layers only */
    KVType kv_type;  /* how its cache stores keys and values (--kv-type); latent attention keeps f32 */
} AttentionSpec;

/* GQA/MQA: the kv head a query head reads. Consecutive query heads share one kv head. */
int kv_head_of(int q_head, int n_heads, int n_kv_heads);

/* Key positions first, first + step, ..., first + (count - 1) * step. */
typedef struct {
    int first, count, step;
} KeyRun;

/* The keys a query at some position may see: at most two runs, in increasing position order.
 * Every mask of the article is a union of two arithmetic progressions. */
typedef struct {
    int n_runs;
    KeyRun runs[2];
} VisibleKeys;

VisibleKeys visible_keys(const AttentionSpec *a, int pos);
int visible_count(const AttentionSpec *a, int pos);
/* Keys no query at position < n_positions sees more of: the score row length attention_head needs. */
int most_visible(const AttentionSpec *a, int n_positions);

/* for (each visible key position j of v, in increasing order) */
#define FOR_EACH_VISIBLE_KEY(v, j)                                                                            \
    for (int run_ = 0; run_ < (v).n_runs; run_++)                                                             \
        for (int i_ = 0, j = (v).runs[run_].first; i_ < (v).runs[run_].count; i_++, j += (v).runs[run_].step)

/* The KV cache this layer's mask needs: it keeps only the positions the mask can still read. Rows of k_dim
 * elements for keys and v_dim for values, of the spec's kv_type (v_dim 0: one f32 row per position, latent
 * attention). */
void attention_cache_init(KVLayer *l, int k_dim, int v_dim, const AttentionSpec *a);

/* One query head at position pos against the cached keys/values of kv head kv_head:
 * out[head_dim] = sum_j softmax_j(q.k_j * scale) v_j over the visible keys j; a learned sink logit (-inf:
 * none) joins the softmax's denominator.
 * Naive: weights needs visible_count() floats; on return it holds the attention weights in
 * FOR_EACH_VISIBLE_KEY order. Flash: no score row at all. */
void attention_head(float *out, const float *q, const KVLayer *kv, int kv_head, int pos, const AttentionSpec *a,
                    float sink, float *weights);
void attention_head_flash(float *out, const float *q, const KVLayer *kv, int kv_head, int pos,
                          const AttentionSpec *a, float sink);

/* The online softmax of the flash kernel (Milakov & Gimelshein 2018), for kernels that tile keys their own way
 * (mla.c): the largest score seen so far and the sum of e^(s - max); the output accumulates e^(s - max) v. */
typedef struct {
    float max, sum;
} OnlineSoftmax;
/* acc[hd] = 0; a learned sink (-inf: none) counts as one score already seen that carries no value */
OnlineSoftmax online_softmax_start(float *acc, int hd, float sink);
/* Folds n scores (n <= KV_BLOCK_TOKENS) and their value rows (hd floats each) into the running state */
void online_softmax_tile(float *acc, OnlineSoftmax *st, const float *scores, const float *const *values, int n, int hd);
/* acc /= sum: the softmax's normalisation, once at the end */
void online_softmax_finish(float *acc, const OnlineSoftmax *st, int hd);

/* All query heads of n_tokens tokens at positions pos .. pos + n_tokens - 1, whose keys and values are in
 * the cache: q[n_tokens][n_heads][head_dim] -> out[n_tokens][n_heads][head_dim], with the spec's kernel.
 * weights (naive kernel): n_heads * min(n_tokens, ATTENTION_QUERY_TILE) rows of weights_stride floats; for
 * one token, row h holds head h's weights after. */
/* 32 queries a tile: each cached key and value read once for twice the queries of 16 (110M f32, 2 threads:
 * attention of a 4,000-token prompt -8%, of 512 tokens -5%); 64 gains nothing more (its rows of weights
 * outgrow the core's L2) */
#define ATTENTION_QUERY_TILE 32
void attention_layer(float *out, const float *q, const KVLayer *kv, int n_heads, int n_kv_heads, int pos,
                     int n_tokens, const AttentionSpec *a, float *weights, int weights_stride);

/* One query each of n sequences (n <= ATTENTION_QUERY_TILE; a decode step of --samples / --prompts): row r,
 * q[r][n_heads][head_dim] at position pos[r], against its own paged cache kv[r] (kvlayer_keeps_every_position)
 * -> out[r]. Naive kernel, head_dim a multiple of 16. Rows whose tables share blocks (a forked prompt) read
 * them once for all; each row gets the bits attention_layer gives it alone. weights: n_heads * n rows of
 * weights_stride floats. */
void attention_rows(float *out, const float *q, const KVLayer *const *kv, const int *pos, int n, int n_heads,
                    int n_kv_heads, const AttentionSpec *a, float *weights, int weights_stride);

/* The weights attention_head left in visible order, laid out by key position: row[0 .. pos], 0 where masked. */
void weights_by_position(float *row, const float *weights, const AttentionSpec *a, int pos);

/* Cross-attention (encoder-decoder): every query sees every key of another sequence, no mask.
 * queries[n_queries][n_heads * head_dim], keys and values [n_keys][n_kv_heads * head_dim]
 * -> out[n_queries][n_heads * head_dim]. */
void cross_attention(float *out, const float *queries, int n_queries, const float *keys, const float *values,
                     int n_keys, int n_heads, int n_kv_heads, int head_dim, float scale);

#endif
