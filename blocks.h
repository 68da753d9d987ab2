/* blocks.h - the blocks a layer is made of, one function per kind (model.h says which kinds exist).
 * Each reads its input, the normed residual stream [n][dim], from s->xb and writes its output [n][dim] to
 * s->xb2; forward() (model.c) does the norms and the residual adds around them. */
#ifndef ATTN_BLOCKS_H
#define ATTN_BLOCKS_H

#include "model.h"

/* mixers: the positions exchange information (0, or -1 when the KV cache cannot grow) */
int attention_block(const Model *m, int layer, RunState *s, int n, int pos);
/* the recurrent mixers (recurrent.h): they fold the tokens into the layer's state in s->kv.states */
int mamba_block(const Model *m, int layer, RunState *s, int n, int pos);
int mamba2_block(const Model *m, int layer, RunState *s, int n, int pos);
int deltanet_block(const Model *m, int layer, RunState *s, int n, int pos);
int rwkv_block(const Model *m, int layer, RunState *s, int n, int pos);

/* FFNs: each position on its own */
void dense_ffn_block(const Model *m, int layer, RunState *s, int n);
void moe_block(const Model *m, int layer, RunState *s, int n);
/* RWKV's channel mix: an FFN that also sees the previous token (kept in s->kv.states[layer].ffn) */
void rwkv_ffn_block(const Model *m, int layer, RunState *s, int n);

#endif
