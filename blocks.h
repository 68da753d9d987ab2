/* blocks.h - the blocks a layer is made of, one function per kind (model.h says which kinds exist).
 * Each reads its input, the normed residual stream [n][dim], from s->xb and writes its output [n][dim] to
 * s->xb2; forward() (model.c) does the norms and the residual adds around them. */
#ifndef ATTN_BLOCKS_H
#define ATTN_BLOCKS_H

#include "model.h"

/* mixers: the positions exchange information (0, or -1 when the KV cache cannot grow) */
int attention_block(const Model *m, int layer, RunState *s, int n, int pos);

/* FFNs: each position on its own */
void dense_ffn_block(const Model *m, int layer, RunState *s, int n);
void moe_block(const Model *m, int layer, RunState *s, int n);
/* The k best of scores[0..n) among the allowed ones (allowed NULL: all), chosen exactly as torch.topk does
 * on a CPU, ties included; their ids in ids[0..k), ascending. A score that is not allowed counts as 0, as the
 * reference's masked_fill(~mask, 0.0) makes it (DeepSeek's grouped routing). */
void router_top_k(const float *scores, const unsigned char *allowed, int n, int k, int *ids);

#endif
