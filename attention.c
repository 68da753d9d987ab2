/* attention.c - attention, the way the article builds it up.
 *
 *   scaled dot-product   Attention(q, K, V) = softmax(q K^T * scale) V
 *   multi-head           each head has its own q, k, v slices of head_dim; outputs are concatenated
 *   causal mask          a query at position p sees keys 0 .. p only (decoders: GPT-2, Llama, ...)
 *   MQA / GQA            several query heads share one key/value head (kv_head_of)
 *   sliding window       a query sees only the last W keys (Mistral, Gemma 2/3, Qwen2/3, Phi-3)
 *
 * Keys and values come from the layer's KV cache (kvcache.c), written one position at a time. */
#include "attention.h"

#include <math.h>
#include <string.h>

#include "ops.h"

/* GQA / MQA: n_heads / n_kv_heads query heads form a group that reads one kv head.
 * MHA: group of 1. MQA (StarCoder, Gemma 3 1B): one kv head for all. GQA (Llama 3, Mistral): in between.
 * The cache holds only n_kv_heads heads per position: that is the whole memory saving. */
int kv_head_of(int q_head, int n_heads, int n_kv_heads) { return q_head / (n_heads / n_kv_heads); }

/* Masks, as the set of positions a query at `pos` may see:
 *   causal:          0 .. pos
 *   sliding window:  pos-W+1 .. pos (W positions, itself included), plus the first n_sinks positions
 *                    if sinks are on (StreamingLLM). */
VisibleKeys visible_keys(const AttentionSpec *a, int pos) {
    VisibleKeys v = {0, 0};
    if (a->window > 0 && pos - a->window + 1 > 0) {
        v.first = pos - a->window + 1;
        v.n_sinks_seen = a->n_sinks < v.first ? a->n_sinks : v.first;
    }
    return v;
}

int visible_count(const AttentionSpec *a, int pos) {
    VisibleKeys v = visible_keys(a, pos);
    return v.n_sinks_seen + (pos - v.first + 1);
}

static float dot(const float *a, const float *b, int n) { return dot_product(a, b, n); /* SIMD, ops.h */ }

/* Scaled dot-product attention of one query head over the visible cached positions:
 *   s_j = softcap(q . k_j * scale)     for each visible position j
 *   w   = softmax(s)
 *   out = sum_j w_j v_j
 * This is the naive kernel: it materialises the whole score row. */
void attention_head(float *out, const float *q, const KVLayer *kv, int kv_head, int pos, const AttentionSpec *a,
                    float *scores) {
    int hd = a->head_dim, off = kv_head * hd, n = 0;
    VisibleKeys v = visible_keys(a, pos);
    for (int j = 0; j < v.n_sinks_seen; j++) scores[n++] = softcap(dot(q, kvlayer_key(kv, j) + off, hd) * a->scale, a->softcap);
    for (int j = v.first; j <= pos; j++) scores[n++] = softcap(dot(q, kvlayer_key(kv, j) + off, hd) * a->scale, a->softcap);
    softmax(scores, n);
    memset(out, 0, (size_t)hd * sizeof(float));
    n = 0;
    for (int j = 0; j < v.n_sinks_seen; j++) {
        const float *val = kvlayer_value(kv, j) + off;
        float w = scores[n++];
        for (int i = 0; i < hd; i++) out[i] += w * val[i];
    }
    for (int j = v.first; j <= pos; j++) {
        const float *val = kvlayer_value(kv, j) + off;
        float w = scores[n++];
        for (int i = 0; i < hd; i++) out[i] += w * val[i];
    }
}

/* Multi-head attention for one token: every query head attends independently, through its kv head. */
typedef struct {
    float *out;
    const float *q;
    const KVLayer *kv;
    int n_heads, n_kv_heads, pos, scores_stride;
    const AttentionSpec *a;
    float *scores;
} HeadsJob;

static void attend_heads(void *arg, int first, int end) {
    const HeadsJob *j = arg;
    int hd = j->a->head_dim;
    for (int h = first; h < end; h++)
        attention_head(j->out + (size_t)h * hd, j->q + (size_t)h * hd, j->kv, kv_head_of(h, j->n_heads, j->n_kv_heads),
                       j->pos, j->a, j->scores + (size_t)h * j->scores_stride);
}

void attention_layer(float *out, const float *q, const KVLayer *kv, int n_heads, int n_kv_heads, int pos,
                     const AttentionSpec *a, float *scores, int scores_stride) {
    HeadsJob job = {out, q, kv, n_heads, n_kv_heads, pos, scores_stride, a, scores};
    parallel_for(n_heads, 1, 2LL * n_heads * visible_count(a, pos) * a->head_dim, attend_heads, &job); /* ops.h */
}
