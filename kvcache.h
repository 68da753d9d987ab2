/* kvcache.h - where each layer keeps the keys and values of the tokens it has seen, for one sequence or many.
 *
 * Storage is BLOCKS of KV_BLOCK_TOKENS rows, taken from a POOL (one per row shape) and named by id; a layer
 * of a sequence holds a BLOCK TABLE: the pool id of each of its blocks, allocated when a slot first lands in
 * it. How positions map to slots depends on what the layer's mask can still read:
 *   Full-attention layers keep every position: slot = position, the table grows with the tokens (memory
 *   follows the tokens held, not the maximum context).
 *   Sliding-window layers can only ever read their last W positions (plus any attention sinks): a ROLLING
 *   BUFFER, slot n_sinks + (p - n_sinks) mod W, overwriting the position W back; memory stops growing once the
 *   window is full.
 *   Layers with the fixed block-sparse pattern keep SUMMARIES: only the last position of each block of B
 *   outlives its block, so they hold the current block in a ring of B - 1 slots plus one row per block.
 * A row holds one position's keys (or values) for all kv heads of that layer: n_kv_heads * head_dim (latent
 * attention: one row of its latent and rotary key, no value row).
 *
 * Many sequences share blocks (vLLM's PagedAttention, Kwon et al. 2023): a FORK gives the new sequence the
 * same block ids, each block counts the tables that hold it, and a block is copied only when a sequence
 * writes into one that another table still holds (COPY-ON-WRITE): the partial last block of a shared prompt
 * on the first decode step, a rolling buffer's blocks one by one as the window moves on. A block whose count
 * falls to zero goes back to the pool. The attention kernels read a layer only through kvlayer_key_row,
 * kvlayer_value_row (then kv_row_f32) and kvlayer_slot_of (or, block by block, k_blocks / v_blocks).
 *
 * Recurrent layers (Mamba, Mamba-2, Gated DeltaNet, RWKV) keep no keys at all but a STATE of fixed size,
 * the same after ten tokens as after a million: the last few inputs of their causal convolution (the
 * window; RWKV: the previous token), the recurrent state proper (SSM, delta-rule or WKV state), and for
 * RWKV's channel mix the previous token once more. One StateLayer per layer of each sequence, one allocation
 * each: a fork copies it whole (it is small). */
#ifndef ATTN_KVCACHE_H
#define ATTN_KVCACHE_H

#include <stddef.h>

#define KV_BLOCK_TOKENS 16

/* How each stored key / value element is kept (--kv-type). Rounding happens once, when a row is stored; every
 * reader sees the same floats, so every kernel and split gives the same bits for a given type.
 *   KV_F32:  4 bytes an element, exact.
 *   KV_BF16: 2 bytes: the float rounded to bf16 (8 bits of mantissa, round to nearest even).
 *   KV_Q8_0: 1.125 bytes: per group of 32 elements of a row, one f32 scale d = max|x| / 127 and 32 int8
 *            q = round(x / d); element = d * q. The scale stays f32 (not f16 as in GGUF's Q8_0): 6% more bytes,
 *            but no f16 encoder, no overflow or underflow of the scale, and the same rule as the q8_0
 *            activations of matmul.c. */
typedef enum { KV_F32 = 0, KV_BF16 = 1, KV_Q8_0 = 2 } KVType;
#define KV_Q8_GROUP 32
/* "f32", "bf16", "q8_0" */
const char *kv_type_name(KVType t);
/* 0 and the type in *t, or -1 for a name that is none of them */
int kv_type_parse(const char *name, KVType *t);
/* Bytes of a row of n elements (q8_0: whole groups of 32, the last one padded) */
size_t kv_row_bytes(int n, KVType t);
/* Stores src[n] as a row of type t at dst (kv_row_bytes(n, t) bytes) */
void kv_row_store(void *dst, const float *src, int n, KVType t);
/* out[0 .. n-1] = elements off .. off+n-1 of a stored row of type t, as floats */
void kv_row_load(float *out, const void *row, KVType t, int off, int n);
/* out[i] = a . (elements off .. off+n-1 of stored row i) for 4 rows: dot_product4's bits on the converted rows
 * (converted in registers where the build can, else through scratch[4 * n]) */
void kv_dot_product4(float out[4], const float *a, const void *const rows[4], KVType t, int off, int n, float *scratch);
/* out[k] += w[i] * (element off + k of stored row i) for i = 0 .. m-1 in turn: add_scaled_rows' bits (scratch:
 * KV_BLOCK_TOKENS * n floats, used where the rows must be converted first) */
void kv_add_scaled_rows(float *out, const float *w, const void *const *rows, int m, KVType t, int off, int n, float *scratch);
/* The same into out0 (weights w0) and out1 (w1) over the same rows, each row read once for both where the build
 * can (add_scaled_rows_pair): the bits of two kv_add_scaled_rows calls */
void kv_add_scaled_rows_pair(float *out0, const float *w0, float *out1, const float *w1, const void *const *rows, int m,
                             KVType t, int off, int n, float *scratch);
/* Elements off .. off+n-1 of a stored row as floats: a pointer into the row when it is f32 (no copy), else
 * scratch[n] holding them converted (what the attention kernels call right before use, a tile at a time) */
static inline const float *kv_row_f32(const void *row, KVType t, int off, int n, float *scratch) {
    if (t == KV_F32) return (const float *)row + off;
    kv_row_load(scratch, row, t, off, n);
    return scratch;
}

/* The blocks of one row shape (key and value widths): ids, reference counts, a free list of ids. */
typedef struct {
    int key_width, value_width; /* elements per row of keys / of values */
    KVType type;                /* how the elements are stored */
    size_t key_bytes, value_bytes; /* bytes per row of keys / of values */
    int n_ids, capacity;        /* ids handed out so far (in use or free), and room for */
    unsigned char **storage;    /* per id: its rows of keys (rows * key_bytes), cut from a slab; a free id keeps
                                 * them for the next block of as many rows */
    unsigned char **values;     /* per id: its rows of values: right after the keys, or (a layer's reserved run,
                                 * kvcache_reserve) after the keys of every block of the run */
    int *rows;                  /* per id: rows of the block (a rolling buffer's last block may be short) */
    unsigned char **slabs;      /* huge_alloc'd runs of blocks (KV_SLAB_BYTES, or one block if larger) */
    size_t *slab_bytes, slab_used; /* each slab's size; bytes cut from the last one so far */
    int n_slabs;
    int *refs;                  /* per id: the block tables holding it; 0 = free */
    int *free_ids, n_free;      /* ids whose count fell to zero, handed out again first */
    size_t bytes_held;          /* storage of the blocks in use */
} KVPool;

void kvpool_init(KVPool *p, int key_width, int value_width, KVType type);
/* A new block of `rows` rows with one reference: its id, or -1 when memory runs out. A free id whose rows serve
 * as many is taken first (a reserved block, say: kvcache_reserve); another size gets a new id. Blocks are cut
 * from slabs of 2 MiB huge pages (ops.h: huge_alloc) rather than malloc'd one by one: --samples 8 on the 110M
 * shape decoded ~15% faster (no page fault per 4 KiB of a new block, fewer TLB misses as attention walks the
 * blocks). */
int kvpool_alloc(KVPool *p, int rows);
void kvpool_ref(KVPool *p, int id);
/* Drops one reference; when none is left the id goes on the free list, its rows kept for the next block of the
 * same size (the pool's memory goes back at kvpool_free). */
void kvpool_unref(KVPool *p, int id);
/* Ids with a reference (0 once every table holding a block has let go of it). */
int kvpool_blocks_in_use(const KVPool *p);
void kvpool_free(KVPool *p);

/* One layer of one sequence: how positions map to slots, and its block table. */
typedef struct {
    int kv_dim;     /* floats per key row: this layer's n_kv_heads * head_dim */
    int v_dim;      /* floats per value row: kv_dim, or 0 when a position is one row (latent attention's c_kv | k_rope) */
    int window;     /* 0: full attention, paged and unbounded; W: rolling buffer of the last W positions */
    int n_sinks;    /* rolling buffers only: the first n_sinks positions stay (StreamingLLM sinks) */
    KVType type;    /* how its elements are stored (--kv-type); KV_F32 unless kvlayer_set_type says otherwise */
    int summary_every; /* 0, or B: only positions B-1, 2B-1, ... and the current block of B are kept */
    KVPool *pool;   /* where its blocks live; NULL until a layer on its own first stores (then it owns one) */
    int owns_pool;
    int n_blocks;   /* entries in the block table */
    int *block_ids; /* the table: pool id of block b, -1 where none yet */
    unsigned char **k_blocks, **v_blocks; /* the same blocks' keys and values (NULL where none; v_blocks all NULL
                                   * when v_dim is 0): block b holds slots b*KV_BLOCK_TOKENS .. +KV_BLOCK_TOKENS-1 */
    int n_positions;/* positions stored so far: 0 .. n_positions-1 have been written */
    int reserved_next, reserved_end; /* ids set aside for this table's next full blocks, in order
                                   * (kvcache_reserve: keys of consecutive blocks adjacent in memory) */
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

void kvlayer_init(KVLayer *l, int kv_dim, int window, int n_sinks);
/* A layer that keeps the current block of `block` positions and the last position of each earlier one. */
void kvlayer_init_summaries(KVLayer *l, int kv_dim, int block);
/* dst = src with every block shared (one more reference each; src's pool must outlive dst).
 * Returns 0, or -1 when out of memory. */
int kvlayer_fork(KVLayer *dst, const KVLayer *src);
/* Lets go of every block (and of the pool, if the layer owns it). */
void kvlayer_free(KVLayer *l);
/* Value rows of v_dim floats instead of kv_dim; 0: the layer keeps one row per position, read with kvlayer_key
 * (latent attention). Before the first store. */
void kvlayer_set_value_width(KVLayer *l, int v_dim);

/* Elements stored as type t from now on. Before the first store. */
void kvlayer_set_type(KVLayer *l, KVType t);

/* Slots a rolling buffer holds (n_sinks + window); 0 for a paged layer (unbounded). */
int kvlayer_capacity(const KVLayer *l);
/* 1 for a paged layer: no position it stores is ever overwritten. */
int kvlayer_keeps_every_position(const KVLayer *l);
/* The slot position pos occupies. */
int kvlayer_slot_of(const KVLayer *l, int pos);
/* 1 if pos is still held (written and not yet overwritten by the rolling buffer). */
int kvlayer_holds(const KVLayer *l, int pos);
/* Stores the key and value rows of position pos (positions are written in order, starting at 0; value is
 * ignored when the layer has no value rows), copying the block first if another table holds it too.
 * Returns 0, or -1 when memory runs out. */
int kvlayer_store(KVLayer *l, int pos, const float *key, const float *value);
/* The key / value row of a held position, as stored: kv_row_f32 reads it. */
const void *kvlayer_key_row(const KVLayer *l, int pos);
const void *kvlayer_value_row(const KVLayer *l, int pos);
/* The same rows as floats, for f32 layers only (latent attention, tests) */
float *kvlayer_key(const KVLayer *l, int pos);
float *kvlayer_value(const KVLayer *l, int pos);
/* Rows of block b that hold a stored position (0 .. KV_BLOCK_TOKENS; 0 past the last one written). */
int kvlayer_rows_written(const KVLayer *l, int b);
/* Bytes of key and value storage this layer's table holds right now (shared blocks counted in full): what
 * the layer would hold on its own. */
size_t kvlayer_bytes_held(const KVLayer *l);
/* Bytes it will hold once positions 0 .. n_positions-1 have been stored (what --info reports). */
size_t kvlayer_bytes_for(const KVLayer *l, long n_positions);

/* The caches of a model: one pool per row shape, and the layers of each sequence (block tables, recurrent
 * states). */
typedef struct {
    int n_layers;
    KVLayer *layout;  /* per layer: row widths and the slot mapping every new sequence starts with (kv_dim 0: no cache) */
    StateShape *state_layout; /* per layer: the state a recurrent layer keeps (all zero: none) */
    int n_pools;
    KVPool *pools;
    int n_seqs;       /* ids 0 .. n_seqs-1; a dropped id is handed out again */
    KVLayer **seqs;   /* seqs[id]: that sequence's n_layers layers; NULL when the id is free */
    StateLayer **states; /* states[id]: that sequence's n_layers states (empty for attention layers) */
} KVCache;

/* layout[n_layers]: each layer as attention_cache_init sets it up (zeroed: a layer without a cache);
 * states[n_layers]: each layer's recurrent state (NULL: none anywhere). Returns 0, or -1 when out of memory.
 * No sequence exists yet. */
int kvcache_init(KVCache *c, int n_layers, const KVLayer *layout, const StateShape *states);
/* A new empty sequence (recurrent states at zero): its id, or -1 when out of memory. */
int kvcache_add_sequence(KVCache *c);
/* A new sequence sharing every block of sequence src (its prompt, say) and a copy of its recurrent states:
 * its id, or -1 when out of memory. */
int kvcache_fork(KVCache *c, int src);
/* Sequence id lets go of its blocks and states; the id is free again. */
void kvcache_drop_sequence(KVCache *c, int id);
KVLayer *kvcache_layer(const KVCache *c, int seq, int layer);
StateLayer *kvcache_state(const KVCache *c, int seq, int layer);
/* Memory set aside now, pages touched, for n_seqs sequences that share their first `shared` positions and then
 * write `own` positions each (a prompt and its --samples; one run: 1, 0, positions): free blocks that the
 * stores then take without waiting for the kernel to zero new pages, as llama.cpp and vLLM allocate their
 * cache before the first token. Sequence 0 (the prompt's writer, and the first sample) gets a run per layer:
 * its blocks' keys one after another, then their values, so that attention streams a layer's keys and values
 * as two runs of memory (the others take free ids). At most 1 GiB and a quarter of the machine's free memory; a
 * best effort (what is not reserved is cut when reached). Returns the bytes reserved; kvcache_bytes_held counts
 * blocks in use only. */
size_t kvcache_reserve(KVCache *c, int n_seqs, long shared, long own);
/* Bytes of storage in use, every shared block counted once: what the cache really holds (KV blocks only). */
size_t kvcache_bytes_held(const KVCache *c);
/* Bytes sequence id's tables hold, shared blocks counted in full, and its states: what it would hold run on
 * its own. */
size_t kvcache_sequence_bytes(const KVCache *c, int id);
/* Bytes of the recurrent layers' states, every sequence's. */
size_t kvcache_state_bytes(const KVCache *c);

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
void kvcache_free(KVCache *c);

#endif
