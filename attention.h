/* attention.h - attention kernels and masks (see attention.c for the formulas). */
#ifndef ATTN_ATTENTION_H
#define ATTN_ATTENTION_H

#include "kvcache.h"

/* What one layer's attention does for one query head. */
typedef struct {
    int head_dim;
    float scale;   /* multiplies q.k: 1/sqrt(head_dim) in "Attention Is All You Need" */
    float softcap; /* 0: none; c: scores squashed into (-c, c) before the softmax (Gemma 2) */
    int window;    /* 0: causal, every earlier position; W: only the last W positions (sliding window) */
    int n_sinks;   /* with a window: the first n_sinks positions stay visible too (attention sinks) */
} AttentionSpec;

/* GQA/MQA: the kv head a query head reads. Consecutive query heads share one kv head. */
int kv_head_of(int q_head, int n_heads, int n_kv_heads);

/* The keys a query at position pos may see: sinks 0 .. n_sinks_seen-1, then first .. pos. */
typedef struct {
    int n_sinks_seen;
    int first;
} VisibleKeys;
VisibleKeys visible_keys(const AttentionSpec *a, int pos);
int visible_count(const AttentionSpec *a, int pos);

/* One query head at position pos against the cached keys/values of kv head kv_head.
 * out[head_dim] = sum_j softmax_j(q.k_j * scale) v_j.  scores needs visible_count() floats; on return it
 * holds the attention weights, in the order sinks then first .. pos. */
void attention_head(float *out, const float *q, const KVLayer *kv, int kv_head, int pos, const AttentionSpec *a,
                    float *scores);

/* All query heads of one token: q[n_heads][head_dim] -> out[n_heads][head_dim].
 * scores: n_heads rows of scores_stride floats. */
void attention_layer(float *out, const float *q, const KVLayer *kv, int n_heads, int n_kv_heads, int pos,
                     const AttentionSpec *a, float *scores, int scores_stride);

#endif
