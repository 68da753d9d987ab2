/* blocks.h - the blocks a layer is made of, one function per kind (model.h says which kinds exist).
 * Each reads its input, the normed residual stream [n][dim], from s->xb and writes its output [n][dim] to
 * s->xb2; forward() (model.c) does the norms and the residual adds around them. */
#ifndef ATTN_BLOCKS_H
#define ATTN_BLOCKS_H

#include "model.h"

/* mixers: the positions of each sequence exchange information (0, or -1 when the KV cache cannot grow) */
int attention_block(const Model *m, int layer, RunState *s, const Batch *b);
int latent_attention_block(const Model *m, int layer, RunState *s, const Batch *b); /* mla.c */
/* latent attention's scratch (RunState.mla, NULL when m has no latent layer), sized for every latent layer of
 * m, and room in the products' scratch ws for its own inputs; 0, or -1 when out of memory */
int mla_scratch_init(LatentScratch **x, MatmulScratch *ws, const Model *m, int max_tokens);
void mla_scratch_free(LatentScratch *x);
/* the recurrent mixers (recurrent.h): each folds a run of one sequence's tokens (s->state_seq) into that sequence's state, kvcache_state() */
int mamba_block(const Model *m, int layer, RunState *s, int n, int pos);
int mamba2_block(const Model *m, int layer, RunState *s, int n, int pos);
int deltanet_block(const Model *m, int layer, RunState *s, int n, int pos);
int rwkv_block(const Model *m, int layer, RunState *s, int n, int pos);

/* The end of the run of rows that starts at row first: the rows after it of the same sequence at consecutive
 * positions (a mixer attends each run against its sequence's cache) */
int batch_run_end(const Batch *b, int first);

/* FFNs: each position on its own */
void dense_ffn_block(const Model *m, int layer, RunState *s, int n);
void moe_block(const Model *m, int layer, RunState *s, int n);
/* The k best of scores[0..n) among the allowed ones (allowed NULL: all), chosen exactly as torch.topk does
 * on a CPU, ties included; their ids in ids[0..k), ascending. A score that is not allowed counts as 0, as the
 * reference's masked_fill(~mask, 0.0) makes it (DeepSeek's grouped routing). */
void router_top_k(const float *scores, const unsigned char *allowed, int n, int k, int *ids);
/* RWKV's channel mix: an FFN that also sees the previous token (kept in its sequence's state, .ffn) */
void rwkv_ffn_block(const Model *m, int layer, RunState *s, int n);

#endif
