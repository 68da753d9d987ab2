/* kvcache.h - where each layer keeps the keys and values of the tokens it has seen.
 *
 * Full-attention layers must keep every position, so they use PAGED storage: fixed blocks of
 * KV_BLOCK_TOKENS rows, allocated only when a position first lands in them (memory follows the tokens
 * actually held, not the maximum context). Sliding-window layers can only ever read their last W
 * positions (plus any attention sinks), so they use a ROLLING BUFFER: position p goes to slot p mod W,
 * overwriting the position W back, and the memory stops growing once the window is full.
 * Layers with the fixed block-sparse pattern keep SUMMARIES: only the last position of each block of B
 * outlives its block, so they hold the current block in a ring of B - 1 slots plus one row per block.
 * A row holds one position's keys (or values) for all kv heads of that layer: n_kv_heads * head_dim.
 *
 * Recurrent layers (Mamba, Mamba-2, Gated DeltaNet, RWKV) keep no keys at all but a STATE of fixed size,
 * the same after ten tokens as after a million: the last few inputs of their causal convolution (the
 * window; RWKV: the previous token), the recurrent state proper (SSM, delta-rule or WKV state), and for
 * RWKV's channel mix the previous token once more. One StateLayer per layer, one allocation each, so that
 * a sequence's state can be copied whole (a fork). */
#ifndef ATTN_KVCACHE_H
#define ATTN_KVCACHE_H

#include <stddef.h>

#define KV_BLOCK_TOKENS 16

typedef struct {
    int kv_dim;     /* floats per key row: this layer's n_kv_heads * head_dim */
    int v_dim;      /* floats per value row: kv_dim, or 0 when a position is one row (latent attention's c_kv | k_rope) */
    int window;     /* 0: full attention, paged and unbounded; W: rolling buffer of the last W positions */
    int n_sinks;    /* rolling buffers only: the first n_sinks positions stay (StreamingLLM sinks) */
    int summary_every; /* 0, or B: only positions B-1, 2B-1, ... and the current block of B are kept */
    int n_blocks;   /* entries in the block tables (allocated blocks are non-NULL) */
    float **k_blocks, **v_blocks; /* block b holds slots b*KV_BLOCK_TOKENS .. +KV_BLOCK_TOKENS-1 */
    int n_positions;/* positions stored so far: 0 .. n_positions-1 have been written */
} KVLayer;

/* Floats of each part of a recurrent layer's state */
typedef struct {
    size_t window, state, ffn;
} StateShape;

typedef struct {
    StateShape shape;
    float *window; /* [shape.window]: the causal convolution's last inputs (oldest first); RWKV: previous token */
    float *state;  /* [shape.state]: the recurrent state */
    float *ffn;    /* [shape.ffn]: RWKV's channel mix: the previous token */
} StateLayer;

typedef struct {
    int n_layers;
    KVLayer *layers;
    StateLayer *states; /* per layer; all NULL and zero for an attention layer */
} KVCache;

void kvlayer_init(KVLayer *l, int kv_dim, int window, int n_sinks);
/* A layer that keeps the current block of `block` positions and the last position of each earlier one. */
void kvlayer_init_summaries(KVLayer *l, int kv_dim, int block);
void kvlayer_free(KVLayer *l);
/* Value rows of v_dim floats instead of kv_dim; 0: the layer keeps one row per position, read with kvlayer_key
 * (latent attention). Before the first store. */
void kvlayer_set_value_width(KVLayer *l, int v_dim);

/* Slots a rolling buffer holds (n_sinks + window); 0 for a paged layer (unbounded). */
int kvlayer_capacity(const KVLayer *l);
/* 1 for a paged layer: no position it stores is ever overwritten. */
int kvlayer_keeps_every_position(const KVLayer *l);
/* The slot position pos occupies. */
int kvlayer_slot_of(const KVLayer *l, int pos);
/* 1 if pos is still held (written and not yet overwritten by the rolling buffer). */
int kvlayer_holds(const KVLayer *l, int pos);
/* Stores the key and value rows of position pos (positions are written in order, starting at 0; value is
 * ignored when the layer has no value rows). Returns 0, or -1 when memory runs out. */
int kvlayer_store(KVLayer *l, int pos, const float *key, const float *value);
/* The key / value row of a held position. */
float *kvlayer_key(const KVLayer *l, int pos);
float *kvlayer_value(const KVLayer *l, int pos);
/* Bytes of key and value storage this layer holds right now. */
size_t kvlayer_bytes_held(const KVLayer *l);
/* Bytes it will hold once positions 0 .. n_positions-1 have been stored (what --info reports). */
size_t kvlayer_bytes_for(const KVLayer *l, long n_positions);

/* A state of the given shape, all zeros (a recurrent layer before its first token). Returns 0, or -1 when
 * out of memory. */
int statelayer_init(StateLayer *l, StateShape shape);
void statelayer_free(StateLayer *l);
/* Back to zeros: a new sequence */
void statelayer_reset(StateLayer *l);
/* dst (initialised with the same shape) takes src's state: a forked sequence goes on from where src is. */
void statelayer_copy(StateLayer *dst, const StateLayer *src);
/* Bytes of the state: the same whatever the number of tokens seen. */
size_t statelayer_bytes(const StateLayer *l);
size_t statelayer_bytes_of(StateShape shape);

size_t kvcache_bytes_held(const KVCache *c);
/* Bytes of the recurrent layers' states */
size_t kvcache_state_bytes(const KVCache *c);
void kvcache_free(KVCache *c);

#endif
