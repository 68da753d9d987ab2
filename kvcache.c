/* kvcache.c - paged blocks for full-attention layers, rolling buffers for sliding-window layers,
 * summaries for fixed block-sparse layers. */
#include "kvcache.h"

#include <stdlib.h>
#include <string.h>

void kvlayer_init(KVLayer *l, int kv_dim, int window, int n_sinks) {
    memset(l, 0, sizeof *l);
    l->kv_dim = kv_dim;
    l->window = window;
    l->n_sinks = window > 0 ? n_sinks : 0;
}

void kvlayer_init_summaries(KVLayer *l, int kv_dim, int block) {
    kvlayer_init(l, kv_dim, 0, 0);
    l->summary_every = block;
}

void kvlayer_free(KVLayer *l) {
    for (int b = 0; b < l->n_blocks; b++) {
        free(l->k_blocks[b]);
        free(l->v_blocks[b]);
    }
    free(l->k_blocks);
    free(l->v_blocks);
    memset(l, 0, sizeof *l);
}

int kvlayer_capacity(const KVLayer *l) { return l->window > 0 ? l->n_sinks + l->window : 0; }

int kvlayer_keeps_every_position(const KVLayer *l) { return l->window == 0 && l->summary_every == 0; }

/* Summaries: slots 0 .. B-2 are a ring for the current block's other positions, then block k's summary
 * (position kB + B - 1) has slot B - 1 + k: the slots in use stay contiguous, so blocks fill in order. */
static int summary_slot_of(int pos, int B) { return pos % B == B - 1 ? B - 1 + pos / B : pos % B; }

int kvlayer_slot_of(const KVLayer *l, int pos) {
    if (l->summary_every) return summary_slot_of(pos, l->summary_every);
    if (l->window == 0 || pos < l->n_sinks) return pos;           /* paged, or a sink: slot = position */
    return l->n_sinks + (pos - l->n_sinks) % l->window;           /* rolling: wrap inside the window */
}

int kvlayer_holds(const KVLayer *l, int pos) {
    if (pos < 0 || pos >= l->n_positions) return 0;
    if (l->summary_every) /* a summary, or in the block being filled */
        return pos % l->summary_every == l->summary_every - 1 || pos / l->summary_every == (l->n_positions - 1) / l->summary_every;
    if (l->window == 0 || pos < l->n_sinks) return 1;
    return pos > l->n_positions - 1 - l->window;                  /* one of the last `window` positions */
}

/* Rows in block b: KV_BLOCK_TOKENS, except the last block of a rolling buffer, cut to its capacity. */
static int block_rows(const KVLayer *l, int b) {
    int cap = kvlayer_capacity(l);
    if (cap == 0) return KV_BLOCK_TOKENS;
    int left = cap - b * KV_BLOCK_TOKENS;
    return left < KV_BLOCK_TOKENS ? left : KV_BLOCK_TOKENS;
}

/* Makes sure block b exists, growing the block tables as needed. */
static int ensure_block(KVLayer *l, int b) {
    if (b >= l->n_blocks) {
        int n = l->n_blocks ? l->n_blocks : 4;
        while (n <= b) n *= 2;
        float **kb = realloc(l->k_blocks, (size_t)n * sizeof *kb);
        if (!kb) return -1;
        l->k_blocks = kb;
        float **vb = realloc(l->v_blocks, (size_t)n * sizeof *vb);
        if (!vb) return -1;
        l->v_blocks = vb;
        for (int i = l->n_blocks; i < n; i++) l->k_blocks[i] = l->v_blocks[i] = NULL;
        l->n_blocks = n;
    }
    if (!l->k_blocks[b]) {
        size_t bytes = (size_t)block_rows(l, b) * l->kv_dim * sizeof(float);
        l->k_blocks[b] = malloc(bytes);
        l->v_blocks[b] = malloc(bytes);
        if (!l->k_blocks[b] || !l->v_blocks[b]) {
            free(l->k_blocks[b]);
            free(l->v_blocks[b]);
            l->k_blocks[b] = l->v_blocks[b] = NULL;
            return -1;
        }
    }
    return 0;
}

int kvlayer_store(KVLayer *l, int pos, const float *key, const float *value) {
    int slot = kvlayer_slot_of(l, pos);
    int b = slot / KV_BLOCK_TOKENS, r = slot % KV_BLOCK_TOKENS;
    if (ensure_block(l, b) != 0) return -1;
    memcpy(l->k_blocks[b] + (size_t)r * l->kv_dim, key, (size_t)l->kv_dim * sizeof(float));
    memcpy(l->v_blocks[b] + (size_t)r * l->kv_dim, value, (size_t)l->kv_dim * sizeof(float));
    if (pos + 1 > l->n_positions) l->n_positions = pos + 1;
    return 0;
}

float *kvlayer_key(const KVLayer *l, int pos) {
    int slot = kvlayer_slot_of(l, pos);
    return l->k_blocks[slot / KV_BLOCK_TOKENS] + (size_t)(slot % KV_BLOCK_TOKENS) * l->kv_dim;
}

float *kvlayer_value(const KVLayer *l, int pos) {
    int slot = kvlayer_slot_of(l, pos);
    return l->v_blocks[slot / KV_BLOCK_TOKENS] + (size_t)(slot % KV_BLOCK_TOKENS) * l->kv_dim;
}

/* keys and values of `rows` positions */
static size_t bytes_of_rows(const KVLayer *l, size_t rows) { return rows * (size_t)l->kv_dim * sizeof(float) * 2; }

size_t kvlayer_bytes_held(const KVLayer *l) {
    size_t rows = 0;
    for (int b = 0; b < l->n_blocks; b++)
        if (l->k_blocks[b]) rows += (size_t)block_rows(l, b);
    return bytes_of_rows(l, rows);
}

/* Slots 0 .. slots_spanned-1 are the ones positions 0 .. n_positions-1 land in (always a contiguous range) */
static long slots_spanned(const KVLayer *l, long n_positions) {
    long cap = kvlayer_capacity(l), B = l->summary_every;
    if (B) return n_positions < B ? n_positions : B - 1 + n_positions / B;
    return cap && n_positions > cap ? cap : n_positions;
}

size_t kvlayer_bytes_for(const KVLayer *l, long n_positions) {
    long blocks = (slots_spanned(l, n_positions) + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS, cap = kvlayer_capacity(l);
    long rows = blocks * KV_BLOCK_TOKENS; /* whole blocks, but a rolling buffer's last block is cut (block_rows) */
    return bytes_of_rows(l, (size_t)(cap && rows > cap ? cap : rows));
}

size_t kvcache_bytes_held(const KVCache *c) {
    size_t total = 0;
    for (int i = 0; i < c->n_layers; i++) total += kvlayer_bytes_held(&c->layers[i]);
    return total;
}

void kvcache_free(KVCache *c) {
    for (int i = 0; i < c->n_layers; i++) kvlayer_free(&c->layers[i]);
    free(c->layers);
    c->layers = NULL;
    c->n_layers = 0;
}
