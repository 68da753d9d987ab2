/* blocks.h - the blocks a layer is made of, one function per kind (model.h says which kinds exist).
 * Each reads its input, the normed residual stream [n][dim], from s->xb and writes its output [n][dim] to
 * s->xb2; forward() (model.c) does the norms and the residual adds around them. */
#ifndef ATTN_BLOCKS_H
#define ATTN_BLOCKS_H

#include "model.h"

/* mixers: the positions of each sequence exchange information (0, or -1 when the KV cache cannot grow) */
int attention_block(const Model *m, int layer, RunState *s, const Batch *b);

/* FFNs: each position on its own */
void dense_ffn_block(const Model *m, int layer, RunState *s, int n);
void moe_block(const Model *m, int layer, RunState *s, int n);

#endif
