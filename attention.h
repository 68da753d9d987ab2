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

/* The KV cache this layer's mask needs: it keeps only the positions the mask can still read. */
void attention_cache_init(KVLayer *l, int kv_dim, const AttentionSpec *a);

/* One query head at position pos against the cached keys/values of kv head kv_head:
 * out[head_dim] = sum_j softmax_j(q.k_j * scale) v_j over the visible keys j; a learned sink logit (-inf:
 * none) joins the softmax's denominator.
 * Naive: weights needs visible_count() floats; on return it holds the attention weights in
 * FOR_EACH_VISIBLE_KEY order. Flash: no score row at all. */
void attention_head(float *out, const float *q, const KVLayer *kv, int kv_head, int pos, const AttentionSpec *a,
                    float sink, float *weights);
void attention_head_flash(float *out, const float *q, const KVLayer *kv, int kv_head, int pos,
                          const AttentionSpec *a, float sink);

/* All query heads of n_tokens tokens at positions pos .. pos + n_tokens - 1, whose keys and values are in
 * the cache: q[n_tokens][n_heads][head_dim] -> out[n_tokens][n_heads][head_dim], with the spec's kernel.
 * weights: n_heads rows of weights_stride floats (naive kernel; row h holds head h's weights of the last
 * token after). */
void attention_layer(float *out, const float *q, const KVLayer *kv, int n_heads, int n_kv_heads, int pos,
                     int n_tokens, const AttentionSpec *a, float *weights, int weights_stride);

/* The weights attention_head left in visible order, laid out by key position: row[0 .. pos], 0 where masked. */
void weights_by_position(float *row, const float *weights, const AttentionSpec *a, int pos);

/* Cross-attention (encoder-decoder): every query sees every key of another sequence, no mask.
 * queries[n_queries][n_heads * head_dim], keys and values [n_keys][n_kv_heads * head_dim]
 * -> out[n_queries][n_heads * head_dim]. */
void cross_attention(float *out, const float *queries, int n_queries, const float *keys, const float *values,
                     int n_keys, int n_heads, int n_kv_heads, int head_dim, float scale);

#endif
