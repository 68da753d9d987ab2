/* kvcache.c - block pools with reference counts; paged blocks for full-attention layers, rolling buffers for
 * sliding-window layers, summaries for fixed block-sparse layers, fixed states for recurrent layers; sequences
 * that share blocks and copy one only when they write into it. */
#include "kvcache.h"

#include "ops.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------------
 * element types: f32, bf16, q8_0 rows */

const char *kv_type_name(KVType t) { return t == KV_BF16 ? "bf16" : t == KV_Q8_0 ? "q8_0" : "f32"; }

int kv_type_parse(const char *name, KVType *t) {
    for (int i = KV_F32; i <= KV_Q8_0; i++)
        if (!strcmp(name, kv_type_name((KVType)i))) {
            *t = (KVType)i;
            return 0;
        }
    return -1;
}

/* a q8_0 group as stored: its scale, then its 32 values */
typedef struct {
    float scale;
    int8_t q[KV_Q8_GROUP];
} KVGroup;

size_t kv_row_bytes(int n, KVType t) {
    if (t == KV_BF16) return (size_t)n * 2;
    if (t == KV_Q8_0) return (size_t)(n + KV_Q8_GROUP - 1) / KV_Q8_GROUP * sizeof(KVGroup);
    return (size_t)n * sizeof(float);
}

/* One group of n <= 32 elements (the rest zero), by q8_0's rule (quantize_q8_group, ops.h) */
static void to_q8_group(KVGroup *g, const float *x, int n) {
    memset(g->q, 0, sizeof g->q);
    g->scale = quantize_q8_group(g->q, x, n);
}

void kv_row_store(void *dst, const float *src, int n, KVType t) {
    if (t == KV_F32) memcpy(dst, src, (size_t)n * sizeof(float));
    else if (t == KV_BF16)
        for (int i = 0; i < n; i++) ((uint16_t *)dst)[i] = bf16_round(src[i]);
    else
        for (int i = 0; i < n; i += KV_Q8_GROUP)
            to_q8_group((KVGroup *)dst + i / KV_Q8_GROUP, src + i, n - i < KV_Q8_GROUP ? n - i : KV_Q8_GROUP);
}

/* q8_0: element = d * q, one rounding (a product of a float and a small integer) */
static void load_q8(float *out, const KVGroup *groups, int off, int n) {
    if (off % KV_Q8_GROUP == 0 && n % KV_Q8_GROUP == 0) { /* whole groups (head_dim 64, 128, ...): vectorises */
        const KVGroup *g = groups + off / KV_Q8_GROUP;
        for (int i = 0; i < n / KV_Q8_GROUP; i++, out += KV_Q8_GROUP) {
            float d = g[i].scale;
            for (int j = 0; j < KV_Q8_GROUP; j++) out[j] = d * (float)g[i].q[j];
        }
        return;
    }
    for (int i = 0; i < n;) {
        const KVGroup *g = &groups[(off + i) / KV_Q8_GROUP];
        int j0 = (off + i) % KV_Q8_GROUP, m = KV_Q8_GROUP - j0 < n - i ? KV_Q8_GROUP - j0 : n - i;
        float d = g->scale;
        for (int j = 0; j < m; j++) out[i + j] = d * (float)g->q[j0 + j];
        i += m;
    }
}

void kv_row_load(float *out, const void *row, KVType t, int off, int n) {
    if (t == KV_F32) memcpy(out, (const float *)row + off, (size_t)n * sizeof(float));
    else if (t == KV_BF16) {
        const uint16_t *b = (const uint16_t *)row + off;
        for (int i = 0; i < n; i++) {
            uint32_t u = (uint32_t)b[i] << 16;
            memcpy(&out[i], &u, 4);
        }
    } else load_q8(out, row, off, n);
}

void kv_dot_product4(float out[4], const float *a, const void *const rows[4], KVType t, int off, int n, float *scratch) {
    if (t != KV_F32 && dot_product4_packed(out, a, rows, t, off, n)) return;
    const float *f[4];
    for (int i = 0; i < 4; i++) f[i] = kv_row_f32(rows[i], t, off, n, scratch + (size_t)i * n);
    dot_product4(out, a, f, n);
}

void kv_add_scaled_rows(float *out, const float *w, const void *const *rows, int m, KVType t, int off, int n, float *scratch) {
    if (t != KV_F32 && add_scaled_rows_packed(out, w, rows, m, t, off, n)) return;
    const float *f[KV_BLOCK_TOKENS];
    for (int i0 = 0; i0 < m; i0 += KV_BLOCK_TOKENS) {
        int k = m - i0 < KV_BLOCK_TOKENS ? m - i0 : KV_BLOCK_TOKENS;
        for (int i = 0; i < k; i++) f[i] = kv_row_f32(rows[i0 + i], t, off, n, scratch + (size_t)i * n);
        add_scaled_rows(out, w + i0, f, k, n);
    }
}

void kv_add_scaled_rows_pair(float *out0, const float *w0, float *out1, const float *w1, const void *const *rows, int m,
                             KVType t, int off, int n, float *scratch) {
    if (add_scaled_rows_pair(out0, w0, out1, w1, rows, m, t, off, n)) return;
    kv_add_scaled_rows(out0, w0, rows, m, t, off, n, scratch);
    kv_add_scaled_rows(out1, w1, rows, m, t, off, n, scratch);
}

/* ---------------------------------------------------------------------------------------------
 * the pool: block ids, reference counts, a free list */

void kvpool_init(KVPool *p, int key_width, int value_width, KVType type) {
    memset(p, 0, sizeof *p);
    p->key_width = key_width;
    p->value_width = value_width;
    p->type = type;
    p->key_bytes = kv_row_bytes(key_width, type);
    p->value_bytes = kv_row_bytes(value_width, type);
}

static size_t block_bytes(const KVPool *p, int rows) { return (size_t)rows * (p->key_bytes + p->value_bytes); }

/* Room for one more id in every per-id array. */
static int grow_ids(KVPool *p) {
    if (p->n_ids < p->capacity) return 0;
    int n = p->capacity ? 2 * p->capacity : 64;
    unsigned char **storage = realloc(p->storage, (size_t)n * sizeof *storage);
    if (!storage) return -1;
    p->storage = storage;
    unsigned char **values = realloc(p->values, (size_t)n * sizeof *values);
    if (!values) return -1;
    p->values = values;
    int *rows = realloc(p->rows, (size_t)n * sizeof *rows);
    if (!rows) return -1;
    p->rows = rows;
    int *refs = realloc(p->refs, (size_t)n * sizeof *refs);
    if (!refs) return -1;
    p->refs = refs;
    int *free_ids = realloc(p->free_ids, (size_t)n * sizeof *free_ids);
    if (!free_ids) return -1;
    p->free_ids = free_ids;
    p->capacity = n;
    return 0;
}

#define KV_SLAB_BYTES ((size_t)2 << 20)

/* a new last slab of `size` bytes, nothing cut from it yet; NULL when out of memory */
static unsigned char *add_slab(KVPool *p, size_t size) {
    unsigned char **slabs = realloc(p->slabs, (size_t)(p->n_slabs + 1) * sizeof *slabs);
    if (!slabs) return NULL;
    p->slabs = slabs;
    size_t *sizes = realloc(p->slab_bytes, (size_t)(p->n_slabs + 1) * sizeof *sizes);
    if (!sizes) return NULL;
    p->slab_bytes = sizes;
    if (!(p->slabs[p->n_slabs] = huge_alloc(size))) return NULL;
    p->slab_bytes[p->n_slabs++] = size;
    p->slab_used = 0;
    return p->slabs[p->n_slabs - 1];
}

static size_t round64(size_t n) { return (n + 63) / 64 * 64; }

/* bytes for a block of `rows`, cut from the last slab, or from a new one when it has no room left */
static unsigned char *cut_block(KVPool *p, int rows) {
    size_t bytes = round64(block_bytes(p, rows));
    if ((p->n_slabs == 0 || p->slab_used + bytes > p->slab_bytes[p->n_slabs - 1]) &&
        !add_slab(p, bytes > KV_SLAB_BYTES ? bytes : KV_SLAB_BYTES))
        return NULL;
    unsigned char *data = p->slabs[p->n_slabs - 1] + p->slab_used;
    p->slab_used += bytes;
    return data;
}

/* id, now held by one table (its rows set) */
static int hold(KVPool *p, int id) {
    p->refs[id] = 1;
    p->bytes_held += block_bytes(p, p->rows[id]);
    return id;
}

int kvpool_alloc(KVPool *p, int rows) {
    int id = -1;
    for (int i = p->n_free - 1; i >= 0 && id < 0; i--) { /* a free id whose rows serve a block of as many, or none */
        int f = p->free_ids[i];
        if (!p->storage[f] || p->rows[f] == rows) id = f, p->free_ids[i] = p->free_ids[--p->n_free];
    }
    if (id < 0) { /* none: a new id, so that no free block's rows (a reserved one's, say) are left unused */
        if (grow_ids(p) != 0) return -1;
        id = p->n_ids++, p->storage[id] = NULL;
    }
    if (!p->storage[id]) {
        unsigned char *data = cut_block(p, rows);
        if (!data) {
            p->free_ids[p->n_free++] = id;
            return -1;
        }
        p->storage[id] = data;
        p->values[id] = data + (size_t)rows * p->key_bytes;
    }
    p->rows[id] = rows;
    return hold(p, id);
}

/* Reservations take at most this much memory, and a quarter of what the machine has free */
#define KV_RESERVE_BYTES ((size_t)1 << 30)

/* a byte of each 4 KiB page [begin, end) of the memory at arg: the kernel maps (and zeroes) it now */
static void touch_pages(void *arg, int begin, int end) {
    for (long i = begin; i < end; i++) ((unsigned char *)arg)[i * 4096] = 0;
}

/* A new id of a full block (KV_BLOCK_TOKENS rows) whose keys and values are at `keys` and `values`, no reference */
static int reserved_id(KVPool *p, unsigned char *keys, unsigned char *values) {
    if (grow_ids(p) != 0) return -1;
    int id = p->n_ids++;
    p->storage[id] = keys, p->values[id] = values;
    p->rows[id] = KV_BLOCK_TOKENS;
    p->refs[id] = 0;
    return id;
}

/* Full blocks set aside in one new slab whose pages are touched now, by every thread: the kernel hands out
 * zeroed pages on the first write, which took a step's KV store (one thread, the others waiting) 5-15% of a
 * --samples step on a VM that zeroes memory at ~1 GB/s.
 *   For each of the n tables owners[i], a RUN of runs[i] blocks that the table takes in order as it reaches new
 *   blocks: the keys of the run one after another, then its values, as a llama.cpp layer keeps its K and V
 *   tensors. Attention then reads a layer's keys (or values) as one stream: on the Intel Xeon, two threads
 *   read 13.8 KB blocks at 33 GB/s laid end to end, at 21 GB/s with keys and values alternating.
 *   Then `extra` free ids, handed out in id and address order to whoever needs a block (other samples).
 * Returns the bytes reserved (0: none, out of memory). */
static size_t kvpool_reserve(KVPool *p, KVLayer *const *owners, const int *runs, int n, int extra) {
    size_t key_run = (size_t)KV_BLOCK_TOKENS * p->key_bytes, value_run = (size_t)KV_BLOCK_TOKENS * p->value_bytes;
    size_t bytes = round64(block_bytes(p, KV_BLOCK_TOKENS)), size = bytes * (size_t)(extra > 0 ? extra : 0);
    for (int i = 0; i < n; i++) size += round64(key_run * (size_t)runs[i]) + round64(value_run * (size_t)runs[i]);
    unsigned char *slab = size ? add_slab(p, size) : NULL;
    if (!slab) return 0;
    parallel_for((int)((size + 4095) / 4096), 512, (long long)size, touch_pages, slab);
    p->slab_used = size; /* every byte is a block now: the next cut_block takes a new slab */
    unsigned char *at = slab;
    for (int i = 0; i < n; i++) {
        unsigned char *values = at + round64(key_run * (size_t)runs[i]);
        int first = p->n_ids, made = 0;
        while (made < runs[i] && reserved_id(p, at + key_run * (size_t)made, values + value_run * (size_t)made) >= 0) made++;
        owners[i]->reserved_next = first, owners[i]->reserved_end = first + made;
        at = values + round64(value_run * (size_t)runs[i]);
    }
    int first = p->n_ids, made = 0;
    while (made < extra && reserved_id(p, at + (size_t)made * bytes, at + (size_t)made * bytes + key_run) >= 0) made++;
    for (int i = made - 1; i >= 0; i--) p->free_ids[p->n_free++] = first + i; /* handed out in id and address order */
    return size;
}

void kvpool_ref(KVPool *p, int id) { p->refs[id]++; }

void kvpool_unref(KVPool *p, int id) {
    if (--p->refs[id] > 0) return;
    p->bytes_held -= block_bytes(p, p->rows[id]);
    p->free_ids[p->n_free++] = id;
}

int kvpool_blocks_in_use(const KVPool *p) {
    int n = 0;
    for (int id = 0; id < p->n_ids; id++) n += p->refs[id] > 0;
    return n;
}

void kvpool_free(KVPool *p) {
    for (int i = 0; i < p->n_slabs; i++) huge_free(p->slabs[i], p->slab_bytes[i]);
    free(p->slabs);
    free(p->slab_bytes);
    free(p->storage);
    free(p->values);
    free(p->rows);
    free(p->refs);
    free(p->free_ids);
    memset(p, 0, sizeof *p);
}

static unsigned char *block_keys(const KVPool *p, int id) { return p->storage[id]; }
static unsigned char *block_values(const KVPool *p, int id) { return p->values[id]; }

/* ---------------------------------------------------------------------------------------------
 * one layer of one sequence: slots, and the block table */

void kvlayer_init(KVLayer *l, int kv_dim, int window, int n_sinks) {
    memset(l, 0, sizeof *l);
    l->kv_dim = l->v_dim = kv_dim;
    l->window = window;
    l->n_sinks = window > 0 ? n_sinks : 0;
}

void kvlayer_init_summaries(KVLayer *l, int kv_dim, int block) {
    kvlayer_init(l, kv_dim, 0, 0);
    l->summary_every = block;
}

void kvlayer_free(KVLayer *l) {
    for (int b = 0; b < l->n_blocks; b++)
        if (l->block_ids[b] >= 0) kvpool_unref(l->pool, l->block_ids[b]);
    for (int id = l->reserved_next; id < l->reserved_end; id++) l->pool->free_ids[l->pool->n_free++] = id; /* unused */
    free(l->block_ids);
    free(l->k_blocks);
    free(l->v_blocks);
    if (l->owns_pool) {
        kvpool_free(l->pool);
        free(l->pool);
    }
    memset(l, 0, sizeof *l);
}

void kvlayer_set_value_width(KVLayer *l, int v_dim) { l->v_dim = v_dim; }

void kvlayer_set_type(KVLayer *l, KVType t) { l->type = t; }

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

/* Slots 0 .. slots_spanned-1 are the ones positions 0 .. n_positions-1 land in (always a contiguous range) */
static long slots_spanned(const KVLayer *l, long n_positions) {
    long cap = kvlayer_capacity(l), B = l->summary_every;
    if (B) return n_positions < B ? n_positions : B - 1 + n_positions / B;
    return cap && n_positions > cap ? cap : n_positions;
}

int kvlayer_rows_written(const KVLayer *l, int b) {
    long written = slots_spanned(l, l->n_positions) - (long)b * KV_BLOCK_TOKENS, rows = block_rows(l, b);
    return (int)(written < 0 ? 0 : written < rows ? written : rows);
}

/* Block table entries 0 .. n-1 exist (-1: no block yet). */
static int grow_table(KVLayer *l, int n) {
    if (n <= l->n_blocks) return 0;
    int cap = l->n_blocks ? l->n_blocks : 4;
    while (cap < n) cap *= 2;
    int *ids = realloc(l->block_ids, (size_t)cap * sizeof *ids);
    if (!ids) return -1;
    l->block_ids = ids;
    unsigned char **kb = realloc(l->k_blocks, (size_t)cap * sizeof *kb);
    if (!kb) return -1;
    l->k_blocks = kb;
    unsigned char **vb = realloc(l->v_blocks, (size_t)cap * sizeof *vb);
    if (!vb) return -1;
    l->v_blocks = vb;
    for (int i = l->n_blocks; i < cap; i++) l->block_ids[i] = -1, l->k_blocks[i] = l->v_blocks[i] = NULL;
    l->n_blocks = cap;
    return 0;
}

static void set_block(KVLayer *l, int b, int id) {
    l->block_ids[b] = id;
    l->k_blocks[b] = block_keys(l->pool, id);
    l->v_blocks[b] = l->v_dim ? block_values(l->pool, id) : NULL;
}

/* Copy-on-write: block b becomes this table's own, with the rows written so far, before a row of it is
 * overwritten or added. */
static int copy_block(KVLayer *l, int b) {
    int old = l->block_ids[b], id = kvpool_alloc(l->pool, l->pool->rows[old]);
    if (id < 0) return -1;
    size_t rows = (size_t)kvlayer_rows_written(l, b);
    memcpy(block_keys(l->pool, id), block_keys(l->pool, old), rows * l->pool->key_bytes);
    memcpy(block_values(l->pool, id), block_values(l->pool, old), rows * l->pool->value_bytes);
    kvpool_unref(l->pool, old);
    set_block(l, b, id);
    return 0;
}

/* Makes block b exist and belong to this table alone: allocated when first reached, copied when shared. */
static int writable_block(KVLayer *l, int b) {
    if (!l->pool) { /* a layer on its own (study tools, tests): it gets a pool of its own */
        if (!(l->pool = malloc(sizeof *l->pool))) return -1;
        kvpool_init(l->pool, l->kv_dim, l->v_dim, l->type);
        l->owns_pool = 1;
    }
    if (grow_table(l, b + 1) != 0) return -1;
    if (l->block_ids[b] < 0) {
        int rows = block_rows(l, b), id = rows == KV_BLOCK_TOKENS && l->reserved_next < l->reserved_end
                                              ? hold(l->pool, l->reserved_next++) /* the next of its run */
                                              : kvpool_alloc(l->pool, rows);
        if (id < 0) return -1;
        set_block(l, b, id);
        return 0;
    }
    return l->pool->refs[l->block_ids[b]] > 1 ? copy_block(l, b) : 0;
}

int kvlayer_fork(KVLayer *dst, const KVLayer *src) {
    *dst = *src;
    dst->owns_pool = 0;
    dst->n_blocks = 0;
    dst->block_ids = NULL;
    dst->k_blocks = dst->v_blocks = NULL;
    dst->reserved_next = dst->reserved_end = 0; /* src's run stays src's */
    if (grow_table(dst, src->n_blocks) != 0) {
        kvlayer_free(dst);
        return -1;
    }
    for (int b = 0; b < src->n_blocks; b++)
        if (src->block_ids[b] >= 0) {
            kvpool_ref(src->pool, src->block_ids[b]);
            set_block(dst, b, src->block_ids[b]);
        }
    return 0;
}

int kvlayer_store(KVLayer *l, int pos, const float *key, const float *value) {
    int slot = kvlayer_slot_of(l, pos);
    int b = slot / KV_BLOCK_TOKENS, r = slot % KV_BLOCK_TOKENS;
    if (writable_block(l, b) != 0) return -1;
    kv_row_store(l->k_blocks[b] + (size_t)r * l->pool->key_bytes, key, l->kv_dim, l->type);
    if (l->v_dim) kv_row_store(l->v_blocks[b] + (size_t)r * l->pool->value_bytes, value, l->v_dim, l->type);
    if (pos + 1 > l->n_positions) l->n_positions = pos + 1;
    return 0;
}

const void *kvlayer_key_row(const KVLayer *l, int pos) {
    int slot = kvlayer_slot_of(l, pos);
    return l->k_blocks[slot / KV_BLOCK_TOKENS] + (size_t)(slot % KV_BLOCK_TOKENS) * l->pool->key_bytes;
}

const void *kvlayer_value_row(const KVLayer *l, int pos) {
    int slot = kvlayer_slot_of(l, pos);
    return l->v_blocks[slot / KV_BLOCK_TOKENS] + (size_t)(slot % KV_BLOCK_TOKENS) * l->pool->value_bytes;
}

float *kvlayer_key(const KVLayer *l, int pos) { return (float *)kvlayer_key_row(l, pos); }

float *kvlayer_value(const KVLayer *l, int pos) { return (float *)kvlayer_value_row(l, pos); }

/* keys and values of `rows` positions */
static size_t bytes_of_rows(const KVLayer *l, size_t rows) {
    return rows * (kv_row_bytes(l->kv_dim, l->type) + kv_row_bytes(l->v_dim, l->type));
}

size_t kvlayer_bytes_held(const KVLayer *l) {
    size_t rows = 0;
    for (int b = 0; b < l->n_blocks; b++)
        if (l->block_ids[b] >= 0) rows += (size_t)block_rows(l, b);
    return bytes_of_rows(l, rows);
}

size_t kvlayer_bytes_for(const KVLayer *l, long n_positions) {
    long blocks = (slots_spanned(l, n_positions) + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS, cap = kvlayer_capacity(l);
    long rows = blocks * KV_BLOCK_TOKENS; /* whole blocks, but a rolling buffer's last block is cut (block_rows) */
    return bytes_of_rows(l, (size_t)(cap && rows > cap ? cap : rows));
}

/* ---------------------------------------------------------------------------------------------
 * the caches of a model: a pool per row shape, the layers of each sequence */

int kvcache_init(KVCache *c, int n_layers, const KVLayer *layout, const StateShape *states) {
    memset(c, 0, sizeof *c);
    c->n_layers = n_layers;
    c->layout = calloc((size_t)n_layers, sizeof *c->layout);
    c->state_layout = calloc((size_t)n_layers, sizeof *c->state_layout);
    c->pools = calloc((size_t)n_layers, sizeof *c->pools); /* at most one shape per layer */
    if (!c->layout || !c->state_layout || !c->pools) {
        kvcache_free(c);
        return -1;
    }
    for (int l = 0; l < n_layers; l++) {
        c->layout[l] = layout[l];
        if (states) c->state_layout[l] = states[l];
        int kw = layout[l].kv_dim, vw = layout[l].v_dim, p = 0;
        KVType t = layout[l].type;
        if (kw == 0) continue;
        while (p < c->n_pools && (c->pools[p].key_width != kw || c->pools[p].value_width != vw || c->pools[p].type != t)) p++;
        if (p == c->n_pools) kvpool_init(&c->pools[c->n_pools++], kw, vw, t);
        c->layout[l].pool = &c->pools[p];
    }
    return 0;
}

/* A free id, growing the tables of sequences when every id is taken; -1 when out of memory */
static int free_sequence_id(KVCache *c) {
    for (int i = 0; i < c->n_seqs; i++)
        if (!c->seqs[i]) return i;
    KVLayer **seqs = realloc(c->seqs, (size_t)(c->n_seqs + 1) * sizeof *seqs);
    if (!seqs) return -1;
    c->seqs = seqs;
    StateLayer **states = realloc(c->states, (size_t)(c->n_seqs + 1) * sizeof *states);
    if (!states) return -1;
    c->states = states;
    c->seqs[c->n_seqs] = NULL;
    c->states[c->n_seqs] = NULL;
    return c->n_seqs++;
}

/* Sequence id's recurrent states, at zero; 0, or -1 when out of memory */
static int add_states(KVCache *c, int id) {
    if (!(c->states[id] = calloc((size_t)c->n_layers, sizeof **c->states))) return -1;
    for (int l = 0; l < c->n_layers; l++)
        if (statelayer_init(&c->states[id][l], c->state_layout[l]) != 0) return -1;
    return 0;
}

int kvcache_add_sequence(KVCache *c) {
    int id = free_sequence_id(c);
    if (id < 0) return -1;
    if (!(c->seqs[id] = malloc((size_t)c->n_layers * sizeof **c->seqs)) || add_states(c, id) != 0) {
        if (c->seqs[id]) memcpy(c->seqs[id], c->layout, (size_t)c->n_layers * sizeof **c->seqs);
        kvcache_drop_sequence(c, id);
        return -1;
    }
    memcpy(c->seqs[id], c->layout, (size_t)c->n_layers * sizeof **c->seqs);
    return id;
}

int kvcache_fork(KVCache *c, int src) {
    int id = free_sequence_id(c);
    if (id < 0) return -1;
    if (!(c->seqs[id] = calloc((size_t)c->n_layers, sizeof **c->seqs)) || add_states(c, id) != 0) {
        kvcache_drop_sequence(c, id);
        return -1;
    }
    for (int l = 0; l < c->n_layers; l++) {
        statelayer_copy(&c->states[id][l], &c->states[src][l]); /* small: copied whole */
        if (kvlayer_fork(&c->seqs[id][l], &c->seqs[src][l]) != 0) {
            kvcache_drop_sequence(c, id);
            return -1;
        }
    }
    return id;
}

void kvcache_drop_sequence(KVCache *c, int id) {
    for (int l = 0; l < c->n_layers; l++) {
        if (c->seqs[id]) kvlayer_free(&c->seqs[id][l]);
        if (c->states[id]) statelayer_free(&c->states[id][l]);
    }
    free(c->seqs[id]);
    free(c->states[id]);
    c->seqs[id] = NULL;
    c->states[id] = NULL;
}

KVLayer *kvcache_layer(const KVCache *c, int seq, int layer) { return &c->seqs[seq][layer]; }

StateLayer *kvcache_state(const KVCache *c, int seq, int layer) { return &c->states[seq][layer]; }

size_t kvcache_reserve(KVCache *c, int n_seqs, long shared, long own) {
    /* per layer: the blocks all sequences write (need), and of them the run of sequence 0, which writes the shared
     * positions and then its own (the first sample, or the only sequence) */
    long *need = calloc((size_t)(c->n_layers > 0 ? c->n_layers : 1), sizeof *need);
    int *run = calloc((size_t)(c->n_layers > 0 ? c->n_layers : 1), sizeof *run); /* 0: none */
    KVLayer **owners = calloc((size_t)(c->n_layers > 0 ? c->n_layers : 1), sizeof *owners); /* one pool's, in turn */
    int *runs = calloc((size_t)(c->n_layers > 0 ? c->n_layers : 1), sizeof *runs);
    size_t total = 0, reserved = 0;
    int first = c->n_seqs > 0 && c->seqs[0] && n_seqs > 0;
    if (!need || !run || !owners || !runs) goto done;
    for (int l = 0; l < c->n_layers; l++) {
        const KVLayer *L = &c->layout[l];
        if (!L->pool || L->summary_every) continue;
        long held = shared + own, r = (held + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS;
        if (L->window) { /* each sequence its own rolling buffer: its full blocks */
            held = held < kvlayer_capacity(L) ? held : kvlayer_capacity(L);
            need[l] = (long)n_seqs * (held / KV_BLOCK_TOKENS), r = held / KV_BLOCK_TOKENS;
        } else /* the shared blocks once; each sequence its own, and a copy of the shared partial block */
            need[l] = (shared + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS +
                      (long)n_seqs * ((own + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS + (shared % KV_BLOCK_TOKENS != 0));
        const KVLayer *mine = first ? kvcache_layer(c, 0, l) : NULL;
        if (mine && mine->n_positions == 0 && mine->reserved_next == mine->reserved_end)
            run[l] = (int)(r < INT_MAX / 2 ? r : INT_MAX / 2);
        total += (size_t)need[l] * block_bytes(L->pool, KV_BLOCK_TOKENS);
    }
    size_t cap = KV_RESERVE_BYTES;
#ifdef _SC_AVPHYS_PAGES
    long free_pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (free_pages > 0 && page > 0 && (size_t)free_pages / 4 * (size_t)page < cap) cap = (size_t)free_pages / 4 * (size_t)page;
#endif
    double scale = total > cap ? (double)cap / (double)total : 1.0;
    for (int p = 0; p < c->n_pools; p++) {
        int n = 0;
        long extra = -c->pools[p].n_free; /* free ids serve first */
        for (int l = 0; l < c->n_layers; l++) {
            if (c->layout[l].pool != &c->pools[p] || !need[l]) continue;
            int r = (int)(run[l] * scale);
            extra += (long)(need[l] * scale) - r;
            if (r > 0) owners[n] = kvcache_layer(c, 0, l), runs[n++] = r;
        }
        if (extra > INT_MAX / 2) extra = INT_MAX / 2;
        reserved += kvpool_reserve(&c->pools[p], owners, runs, n, (int)extra);
    }
done:
    free(need), free(run), free(owners), free(runs);
    return reserved;
}

size_t kvcache_bytes_held(const KVCache *c) {
    size_t total = 0;
    for (int p = 0; p < c->n_pools; p++) total += c->pools[p].bytes_held;
    return total;
}

size_t kvcache_sequence_bytes(const KVCache *c, int id) {
    size_t total = 0;
    for (int l = 0; l < c->n_layers; l++) total += kvlayer_bytes_held(&c->seqs[id][l]) + statelayer_bytes(&c->states[id][l]);
    return total;
}

size_t kvcache_state_bytes(const KVCache *c) {
    size_t total = 0;
    for (int id = 0; id < c->n_seqs; id++)
        for (int l = 0; c->states[id] && l < c->n_layers; l++) total += statelayer_bytes(&c->states[id][l]);
    return total;
}

size_t statelayer_bytes_of(StateShape shape) { return (shape.window + shape.state + shape.ffn) * sizeof(float); }

int statelayer_init(StateLayer *l, StateShape shape) {
    memset(l, 0, sizeof *l);
    size_t bytes = statelayer_bytes_of(shape);
    if (bytes == 0) return 0;
    float *all = calloc(1, bytes);
    if (!all) return -1;
    l->shape = shape;
    l->window = all;
    l->state = all + shape.window;
    l->ffn = l->state + shape.state;
    return 0;
}

void statelayer_free(StateLayer *l) {
    free(l->window);
    memset(l, 0, sizeof *l);
}

void statelayer_reset(StateLayer *l) {
    if (l->window) memset(l->window, 0, statelayer_bytes(l));
}

void statelayer_copy(StateLayer *dst, const StateLayer *src) {
    if (src->window) memcpy(dst->window, src->window, statelayer_bytes(src));
}

size_t statelayer_bytes(const StateLayer *l) { return statelayer_bytes_of(l->shape); }


void kvcache_free(KVCache *c) {
    for (int i = 0; i < c->n_seqs; i++)
        if (c->seqs[i] || c->states[i]) kvcache_drop_sequence(c, i);
    for (int p = 0; p < c->n_pools; p++) kvpool_free(&c->pools[p]);
    free(c->seqs);
    free(c->states);
    free(c->pools);
    free(c->layout);
    free(c->state_layout);
    memset(c, 0, sizeof *c);
}
