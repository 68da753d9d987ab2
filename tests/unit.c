/* tests/unit.c - C unit tests: KV cache (paged blocks, rolling buffer), recurrent state (fixed size, copied
 * whole for a fork), the causal convolution's window across chunks, GQA/MQA head mapping, attention
 * against a naive reference written out in full here, ops, UTF-8 and the tokenizer's streaming output.
 * Prints "ok NAME" or "FAIL NAME: why" per check; exits 1 if any failed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "blocks.h"
#include "explore.h"
#include "kvcache.h"
#include "ops.h"
#include "png.h"
#include "regex.h"
#include "recurrent.h"
#include "sample.h"
#include "tokenizer.h"
#include "unicode.h"

static int failures = 0;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
static void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs(ok ? "ok " : "FAIL ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
    if (!ok) failures++;
}

static unsigned rng_state = 12345;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float)((rng_state >> 8) & 0xFFFFFF) / 8388608.0f - 1.0f;
}

/* ------------------------------------------------------------------------------------------- */

/* --kv-type's rows: bf16 within half a unit in the last place (2^-8 relative), q8_0 within half a step of its
 * group's scale, a NaN stays a NaN (its whole q8_0 group turns NaN), the bytes as kv_row_bytes says, and a
 * slice read from the middle of a row (a head of 16 inside a group of 32) equals the same part of the whole row */
static void test_kv_types(void) {
    enum { N = 80 }; /* two whole groups of 32 and a partial one */
    float x[N], back[N], part[16], scale = 1.0f;
    for (int i = 0; i < N; i++) x[i] = 5 * frand() * (i < 32 ? 1e-3f : 1.0f);
    unsigned char row[4 * N];
    int ok_bf16 = 1, ok_q8 = 1;
    kv_row_store(row, x, N, KV_BF16);
    kv_row_load(back, row, KV_BF16, 0, N);
    for (int i = 0; i < N; i++) ok_bf16 &= fabsf(back[i] - x[i]) <= fabsf(x[i]) * (1.0f / 256);
    kv_row_store(row, x, N, KV_Q8_0);
    kv_row_load(back, row, KV_Q8_0, 0, N);
    for (int i = 0; i < N; i++) {
        if (i % 32 == 0) {
            scale = 0.0f;
            for (int j = i; j < i + 32 && j < N; j++) scale = fmaxf(scale, fabsf(x[j]) / 127);
        }
        ok_q8 &= fabsf(back[i] - x[i]) <= scale * 0.5001f;
    }
    kv_row_load(part, row, KV_Q8_0, 40, 16);
    ok_q8 &= !memcmp(part, back + 40, sizeof part);
    x[5] = NAN;
    kv_row_store(row, x, N, KV_BF16);
    kv_row_load(back, row, KV_BF16, 0, N);
    ok_bf16 &= isnan(back[5]) && !isnan(back[4]);
    kv_row_store(row, x, N, KV_Q8_0);
    kv_row_load(back, row, KV_Q8_0, 0, N);
    ok_q8 &= isnan(back[0]) && isnan(back[31]) && !isnan(back[32]);
    check(ok_bf16 && kv_row_bytes(N, KV_BF16) == 2 * N, "kv type bf16: a row of %d rounds to within 2^-8 (relative), NaN kept, %zu bytes",
          N, kv_row_bytes(N, KV_BF16));
    check(ok_q8 && kv_row_bytes(N, KV_Q8_0) == 3 * 36, "kv type q8_0: within half a step of each group's scale, a slice "
          "equals the row's part, a NaN spoils only its group, %zu bytes for %d elements", kv_row_bytes(N, KV_Q8_0), N);
    KVType t;
    check(kv_type_parse("q8_0", &t) == 0 && t == KV_Q8_0 && kv_type_parse("bf16", &t) == 0 && t == KV_BF16 &&
          kv_type_parse("f16", &t) == -1, "kv type names: f32, bf16, q8_0; anything else refused");
}

static void test_paged_cache(void) {
    KVLayer l;
    int kv_dim = 8;
    kvlayer_init(&l, kv_dim, 0, 0);
    float k[8], v[8];
    check(kvlayer_bytes_held(&l) == 0, "paged cache: nothing allocated before the first token");
    size_t block_bytes = (size_t)KV_BLOCK_TOKENS * kv_dim * sizeof(float) * 2;
    int ok_growth = 1, ok_content = 1;
    for (int pos = 0; pos < 5 * KV_BLOCK_TOKENS + 3; pos++) {
        for (int i = 0; i < kv_dim; i++) k[i] = pos * 100.0f + i, v[i] = -(pos * 100.0f + i);
        kvlayer_store(&l, pos, k, v);
        size_t want_blocks = (size_t)(pos / KV_BLOCK_TOKENS + 1);
        if (kvlayer_bytes_held(&l) != want_blocks * block_bytes) ok_growth = 0;
    }
    check(ok_growth, "paged cache: a new block is allocated exactly when a position crosses a block boundary");
    for (int pos = 0; pos < 5 * KV_BLOCK_TOKENS + 3; pos++) {
        const float *kk = kvlayer_key(&l, pos), *vv = kvlayer_value(&l, pos);
        for (int i = 0; i < kv_dim; i++)
            if (kk[i] != pos * 100.0f + i || vv[i] != -(pos * 100.0f + i)) ok_content = 0;
    }
    check(ok_content, "paged cache: every position reads back its own key and value across block boundaries");
    check(kvlayer_holds(&l, 0) && kvlayer_holds(&l, 5 * KV_BLOCK_TOKENS + 2) && !kvlayer_holds(&l, 5 * KV_BLOCK_TOKENS + 3),
          "paged cache: holds every written position and nothing beyond");
    kvlayer_free(&l);
}

/* Latent attention keeps one row per position (c_kv | k_rope) and no value rows: half the blocks, its own width */
static void test_single_row_cache(void) {
    KVLayer l;
    int row_dim = 12;
    float row[12];
    kvlayer_init(&l, row_dim, 4, 0);
    kvlayer_set_value_width(&l, 0);
    int ok = 1;
    for (int pos = 0; pos < 10; pos++) {
        for (int i = 0; i < row_dim; i++) row[i] = pos * 100.0f + i;
        ok &= kvlayer_store(&l, pos, row, NULL) == 0;
    }
    for (int pos = 6; pos < 10; pos++) ok &= kvlayer_key(&l, pos)[row_dim - 1] == pos * 100.0f + row_dim - 1;
    check(ok && kvlayer_bytes_held(&l) == 4 * (size_t)row_dim * sizeof(float) && kvlayer_bytes_for(&l, 1000) == kvlayer_bytes_held(&l),
          "single-row cache (latent attention): a rolling buffer of 4 rows of 12 floats, no value rows, 192 bytes");
    kvlayer_free(&l);
    kvlayer_init(&l, row_dim, 0, 0);
    kvlayer_set_value_width(&l, 0);
    for (int pos = 0; pos < KV_BLOCK_TOKENS + 1; pos++) kvlayer_store(&l, pos, row, NULL);
    check(kvlayer_bytes_held(&l) == 2 * KV_BLOCK_TOKENS * (size_t)row_dim * sizeof(float),
          "single-row cache: paged, two blocks of 16 rows after 17 positions");
    kvlayer_free(&l);
}

static void test_rolling_buffer(void) {
    int kv_dim = 4, W = 20; /* not a multiple of the block size: the last block is cut short */
    KVLayer l;
    kvlayer_init(&l, kv_dim, W, 0);
    float k[4], v[4];
    size_t bytes_at_w = 0;
    int constant = 1, content = 1, holds = 1;
    for (int pos = 0; pos < 10 * W; pos++) {
        for (int i = 0; i < kv_dim; i++) k[i] = (float)pos, v[i] = (float)-pos;
        kvlayer_store(&l, pos, k, v);
        if (pos == W - 1) bytes_at_w = kvlayer_bytes_held(&l);
        if (pos >= W && kvlayer_bytes_held(&l) != bytes_at_w) constant = 0;
        /* the last W positions are readable and hold their own values */
        for (int p = pos - W + 1; p <= pos; p++)
            if (p >= 0 && (kvlayer_key(&l, p)[0] != (float)p || kvlayer_value(&l, p)[3] != (float)-p)) content = 0;
        if (pos >= W && (kvlayer_holds(&l, pos - W) || !kvlayer_holds(&l, pos - W + 1))) holds = 0;
    }
    check(bytes_at_w == (size_t)W * kv_dim * sizeof(float) * 2,
          "rolling buffer: holds exactly W positions of keys and values once full (%zu bytes)", bytes_at_w);
    check(constant, "rolling buffer: memory stays constant after W tokens (10 W written)");
    check(content, "rolling buffer: wraps at W and the last W positions read back correctly");
    check(holds, "rolling buffer: position p - W is gone, p - W + 1 is still held");
    check(kvlayer_slot_of(&l, W) == 0 && kvlayer_slot_of(&l, W + 1) == 1 && kvlayer_slot_of(&l, 2 * W - 1) == W - 1,
          "rolling buffer: position p lives in slot p mod W");
    kvlayer_free(&l);

    /* growth before the window is full: memory follows the tokens, one block at a time */
    kvlayer_init(&l, kv_dim, 64, 0);
    kvlayer_store(&l, 0, k, v);
    check(kvlayer_bytes_held(&l) == (size_t)KV_BLOCK_TOKENS * kv_dim * sizeof(float) * 2,
          "rolling buffer: allocates block by block while filling");
    kvlayer_free(&l);

    /* sinks: the first positions stay, the rest rolls */
    kvlayer_init(&l, kv_dim, 8, 2);
    for (int pos = 0; pos < 50; pos++) {
        for (int i = 0; i < kv_dim; i++) k[i] = (float)pos, v[i] = (float)pos;
        kvlayer_store(&l, pos, k, v);
    }
    int sinks_ok = kvlayer_key(&l, 0)[0] == 0.0f && kvlayer_key(&l, 1)[0] == 1.0f && kvlayer_holds(&l, 0) &&
                   kvlayer_holds(&l, 1) && !kvlayer_holds(&l, 2) && !kvlayer_holds(&l, 41) && kvlayer_holds(&l, 42);
    for (int p = 42; p < 50; p++) sinks_ok &= kvlayer_key(&l, p)[0] == (float)p;
    check(sinks_ok && kvlayer_bytes_held(&l) == 10 * (size_t)kv_dim * sizeof(float) * 2,
          "rolling buffer with 2 sinks: keeps positions 0, 1 and the last 8, in 10 slots");
    kvlayer_free(&l);

    /* summaries (fixed pattern, B = 5): the current block and the last position of every earlier block */
    kvlayer_init_summaries(&l, kv_dim, 5);
    int summaries_ok = 1, bytes_ok = 1;
    for (int pos = 0; pos < 200; pos++) {
        for (int i = 0; i < kv_dim; i++) k[i] = (float)pos, v[i] = (float)-pos;
        kvlayer_store(&l, pos, k, v);
        for (int p = 0; p <= pos; p++) {
            int want = p % 5 == 4 || p / 5 == pos / 5;
            if (kvlayer_holds(&l, p) != want || (want && (kvlayer_key(&l, p)[0] != (float)p || kvlayer_value(&l, p)[1] != (float)-p)))
                summaries_ok = 0;
        }
        if (kvlayer_bytes_held(&l) != kvlayer_bytes_for(&l, pos + 1)) bytes_ok = 0;
    }
    check(summaries_ok, "summaries (B=5): holds each block's last position and the current block, all reading back");
    check(bytes_ok && kvlayer_bytes_held(&l) == (size_t)3 * KV_BLOCK_TOKENS * kv_dim * sizeof(float) * 2,
          "summaries (B=5): 200 positions fit in 4 + 40 rows (3 blocks), as kvlayer_bytes_for predicts");
    kvlayer_free(&l);

    /* kvlayer_bytes_for predicts what storing really allocates, for every layout */
    int layouts[][3] = {{0, 0, 0}, {20, 0, 0}, {8, 3, 0}, {64, 0, 0}, {0, 0, 16}, {0, 0, 1}};
    int predicted = 1;
    for (size_t i = 0; i < sizeof layouts / sizeof *layouts; i++) {
        if (layouts[i][2]) kvlayer_init_summaries(&l, kv_dim, layouts[i][2]);
        else kvlayer_init(&l, kv_dim, layouts[i][0], layouts[i][1]);
        for (int pos = 0; pos < 300; pos++) {
            kvlayer_store(&l, pos, k, v);
            predicted &= kvlayer_bytes_held(&l) == kvlayer_bytes_for(&l, pos + 1);
        }
        kvlayer_free(&l);
    }
    check(predicted, "kvlayer_bytes_for equals the bytes really held after every position (paged, rolling, sinks, summaries)");
}

/* ------------------------------------------------------------------------------------------- */

/* The rows a store writes: key[i] = tag * 100 + i, value[i] = -(tag * 100 + i) */
static void tagged_rows(float *k, float *v, int kv_dim, int tag) {
    for (int i = 0; i < kv_dim; i++) k[i] = tag * 100.0f + i, v[i] = -(tag * 100.0f + i);
}

static int reads_tag(const KVLayer *l, int pos, int tag) {
    const float *k = kvlayer_key(l, pos), *v = kvlayer_value(l, pos);
    for (int i = 0; i < l->kv_dim; i++)
        if (k[i] != tag * 100.0f + i || v[i] != -(tag * 100.0f + i)) return 0;
    return 1;
}

/* A cache of four layers: full (8 floats a row), rolling W=20 (8: the same pool), summaries B=5 (4: a pool of
 * its own), and one without a cache (a mixer that keeps none). */
static void init_test_cache(KVCache *c) {
    KVLayer layout[4];
    kvlayer_init(&layout[0], 8, 0, 0);
    kvlayer_init(&layout[1], 8, 20, 0);
    kvlayer_init_summaries(&layout[2], 4, 5);
    memset(&layout[3], 0, sizeof layout[3]);
    kvcache_init(c, 4, layout, NULL);
}

static void store_all(KVCache *c, int seq, int pos, int tag) {
    float k[8], v[8];
    for (int l = 0; l < 3; l++) {
        tagged_rows(k, v, kvcache_layer(c, seq, l)->kv_dim, tag);
        kvlayer_store(kvcache_layer(c, seq, l), pos, k, v);
    }
}

static void test_shared_blocks(void) {
    KVCache c;
    init_test_cache(&c);
    check(c.n_pools == 2 && kvcache_layer(&c, kvcache_add_sequence(&c), 0)->pool == &c.pools[0] &&
              kvcache_layer(&c, 0, 1)->pool == &c.pools[0] && kvcache_layer(&c, 0, 2)->pool == &c.pools[1],
          "block pools: one per row shape (two layers of 8 floats share one, 4 floats get another)");
    for (int pos = 0; pos < 20; pos++) store_all(&c, 0, pos, pos);
    size_t before = kvcache_bytes_held(&c);
    int b = kvcache_fork(&c, 0);
    const KVLayer *a0 = kvcache_layer(&c, 0, 0), *b0 = kvcache_layer(&c, b, 0), *a1 = kvcache_layer(&c, 0, 1);
    int shared = 1;
    for (int l = 0; l < 3; l++) {
        const KVLayer *x = kvcache_layer(&c, 0, l), *y = kvcache_layer(&c, b, l);
        for (int blk = 0; blk < x->n_blocks; blk++)
            if (x->block_ids[blk] >= 0) shared &= y->block_ids[blk] == x->block_ids[blk] && x->pool->refs[x->block_ids[blk]] == 2;
    }
    check(shared && kvcache_bytes_held(&c) == before && kvcache_sequence_bytes(&c, b) == before,
          "fork: the new sequence holds the same block ids (each counted twice); nothing is copied");

    /* position 20 lands in the full layer's partial block 1 (rows 0-3 written): the first writer copies it */
    int old_partial = a0->block_ids[1], old_ring = a1->block_ids[0];
    store_all(&c, 0, 20, 1000);
    int copied = a0->block_ids[1] != old_partial && b0->block_ids[1] == old_partial && c.pools[0].refs[old_partial] == 1 &&
                 a0->block_ids[0] == b0->block_ids[0] && c.pools[0].refs[a0->block_ids[0]] == 2;
    for (int pos = 16; pos < 20; pos++) copied &= reads_tag(a0, pos, pos) && reads_tag(b0, pos, pos);
    copied &= reads_tag(a0, 20, 1000) && a1->block_ids[0] != old_ring && reads_tag(a1, 20, 1000);
    check(copied, "copy-on-write: the first write after a fork copies the partial block (its 4 rows), the full block "
                  "before it stays shared; the rolling buffer's overwritten block is copied too");
    int in_place = b0->block_ids[1];
    store_all(&c, b, 20, 2000);
    check(b0->block_ids[1] == in_place && reads_tag(b0, 20, 2000) && reads_tag(a0, 20, 1000) &&
              reads_tag(kvcache_layer(&c, b, 1), 20, 2000) && reads_tag(kvcache_layer(&c, b, 1), 19, 19),
          "copy-on-write: the last holder of a block writes in place; each sequence reads its own position 20");
    kvcache_drop_sequence(&c, 0);
    kvcache_drop_sequence(&c, b);
    check(kvpool_blocks_in_use(&c.pools[0]) == 0 && kvpool_blocks_in_use(&c.pools[1]) == 0 && kvcache_bytes_held(&c) == 0 &&
              c.pools[0].n_free == c.pools[0].n_ids,
          "drop: every block's count returns to zero and its id goes back on the free list");
    kvcache_free(&c);

    /* the pool's memory: blocks cut from 2 MiB slabs; a free id's rows serve the next block of as many rows */
    KVPool p;
    kvpool_init(&p, 64, 64, KV_F32);
    int bx = kvpool_alloc(&p, 16), by = kvpool_alloc(&p, 16);
    unsigned char *x_rows = p.storage[bx];
    int slabbed = p.n_slabs == 1 && (uintptr_t)p.slabs[0] % (2u << 20) == 0 && p.storage[by] == x_rows + 16 * 2 * 64 * 4;
    kvpool_unref(&p, bx);
    int again = kvpool_alloc(&p, 16), reused = again == bx && p.storage[again] == x_rows && p.bytes_held == 2 * 16 * 2 * 64 * 4;
    kvpool_unref(&p, again);
    int shorter = kvpool_alloc(&p, 5), fresh = shorter != bx && p.storage[shorter] != x_rows && p.storage[bx] == x_rows;
    int big = kvpool_alloc(&p, 5000); /* 5 MB: a slab of its own */
    int own = big >= 0 && p.n_slabs == 2 && p.slab_bytes[1] >= (size_t)5000 * 2 * 64 * 4;
    kvpool_unref(&p, shorter), kvpool_unref(&p, by), kvpool_unref(&p, big);
    check(slabbed && reused && fresh && own && p.bytes_held == 0 && kvpool_blocks_in_use(&p) == 0,
          "block pool memory: blocks cut one after another from a 2 MiB-aligned slab; a freed id's rows reused by a "
          "block of as many rows, a block of other rows cut anew under a new id; a block larger than a slab gets one of "
          "its own");
    kvpool_free(&p);

    /* kvcache_reserve: free blocks set aside up front, which the stores then take (no new slab), the counts as
     * before. The test cache: a full layer and a rolling buffer of 20 (8 floats: pool 0), summaries (pool 1). */
    init_test_cache(&c);
    int s0 = kvcache_add_sequence(&c);
    size_t reserved = kvcache_reserve(&c, 3, 20, 40); /* full: 2 shared + 3 x (3 own + 1 copy); ring: 3 x 1 */
    int want = 2 + 3 * 4 + 3 * 1, slabs = c.pools[0].n_slabs;
    KVLayer *full = kvcache_layer(&c, s0, 0), *ring = kvcache_layer(&c, s0, 1);
    int set_aside = reserved == (size_t)want * 16 * 2 * 8 * 4 && c.pools[0].n_free == want - 5 && c.pools[0].n_ids == want &&
                    full->reserved_end - full->reserved_next == 4 && ring->reserved_end - ring->reserved_next == 1 &&
                    c.pools[1].n_ids == 0 && kvcache_bytes_held(&c) == 0 && kvpool_blocks_in_use(&c.pools[0]) == 0;
    for (int pos = 0; pos < 20; pos++) store_all(&c, s0, pos, pos);
    /* sequence 0's run (a prompt of 20 and 40 more: 4 blocks): keys of one block after the other's, then values */
    int run = full->k_blocks[1] == full->k_blocks[0] + 16 * 8 * 4 && full->v_blocks[0] == full->k_blocks[0] + 4 * 16 * 8 * 4 &&
              full->v_blocks[1] == full->v_blocks[0] + 16 * 8 * 4;
    int forks[3] = {s0, kvcache_fork(&c, s0), kvcache_fork(&c, s0)};
    for (int i = 0; i < 3; i++)
        for (int pos = 20; pos < 60; pos++) store_all(&c, forks[i], pos, 100 * i + pos);
    /* used: the full layer 4 + 2 x 3 blocks, the rings 3 x 1 (and their short blocks of 4 rows, new ids cut from
     * a new slab) */
    int taken = c.pools[0].n_slabs == slabs + 1 && c.pools[0].n_ids == want + 3 && c.pools[0].n_free == want - 13 &&
                reads_tag(kvcache_layer(&c, forks[2], 0), 59, 259) && reads_tag(kvcache_layer(&c, forks[1], 0), 5, 5);
    for (int i = 0; i < 3; i++) kvcache_drop_sequence(&c, forks[i]);
    check(set_aside && run && taken && kvpool_blocks_in_use(&c.pools[0]) == 0 && kvcache_bytes_held(&c) == 0 &&
              kvcache_reserve(&c, 0, 0, 0) == 0,
          "kvcache_reserve: a prompt's blocks once and each sample's own, set aside (held bytes 0): sequence 0's as a "
          "run per layer, keys then values, the others' as free ids; the stores take them (only the rolling buffers' "
          "short blocks are cut anew); counts back to zero");
    kvcache_free(&c);

    /* latent attention's rows (a key row, no value row) get a pool of their own shape and copy on write too */
    KVLayer shapes[2];
    kvlayer_init(&shapes[0], 8, 0, 0);
    kvlayer_init(&shapes[1], 8, 0, 0);
    kvlayer_set_value_width(&shapes[1], 0);
    kvcache_init(&c, 2, shapes, NULL);
    int x = kvcache_add_sequence(&c);
    float k[8], v[8];
    for (int pos = 0; pos < 20; pos++) {
        tagged_rows(k, v, 8, pos);
        kvlayer_store(kvcache_layer(&c, x, 0), pos, k, v);
        kvlayer_store(kvcache_layer(&c, x, 1), pos, k, NULL);
    }
    int y = kvcache_fork(&c, x), latent_ok = c.n_pools == 2 && c.pools[1].value_width == 0;
    tagged_rows(k, v, 8, 500);
    kvlayer_store(kvcache_layer(&c, y, 1), 20, k, NULL);
    const KVLayer *lx = kvcache_layer(&c, x, 1), *ly = kvcache_layer(&c, y, 1);
    for (int pos = 0; pos < 20; pos++)
        latent_ok &= kvlayer_key(lx, pos)[3] == pos * 100.0f + 3 && kvlayer_key(ly, pos)[3] == pos * 100.0f + 3;
    latent_ok &= kvlayer_key(ly, 20)[0] == 50000.0f && ly->block_ids[1] != lx->block_ids[1] && ly->v_blocks[1] == NULL &&
                 kvcache_bytes_held(&c) == (size_t)(2 * 32 + 32 + 16) * 8 * sizeof(float);
    check(latent_ok, "latent rows (no value row): a pool of their own shape; a fork copies the partial block, keys only");
    kvcache_drop_sequence(&c, x);
    kvcache_drop_sequence(&c, y);
    check(kvcache_bytes_held(&c) == 0, "latent rows: every block returns to the pool");
    kvcache_free(&c);

    /* recurrent states: one per layer and sequence, zero when a sequence starts, copied whole by a fork */
    KVLayer none[2];
    memset(none, 0, sizeof none);
    StateShape shape[2] = {{4, 8, 2}, {0, 0, 0}};
    kvcache_init(&c, 2, none, shape);
    int sa = kvcache_add_sequence(&c);
    StateLayer *st = kvcache_state(&c, sa, 0);
    int states_ok = st->window && st->state[7] == 0.0f && kvcache_state(&c, sa, 1)->window == NULL;
    for (int i = 0; i < 8; i++) st->state[i] = (float)i + 1;
    int sb = kvcache_fork(&c, sa);
    StateLayer *sbs = kvcache_state(&c, sb, 0);
    states_ok &= sbs->state != st->state && sbs->state[7] == 8.0f;
    sbs->state[7] = -1.0f;
    states_ok &= st->state[7] == 8.0f && kvcache_state_bytes(&c) == 2 * 14 * sizeof(float) &&
                 kvcache_sequence_bytes(&c, sb) == 14 * sizeof(float);
    kvcache_drop_sequence(&c, sa);
    int sc = kvcache_add_sequence(&c); /* takes sa's id back, with a fresh zero state */
    states_ok &= sc == sa && kvcache_state(&c, sc, 0)->state[0] == 0.0f && kvcache_state(&c, sb, 0)->state[7] == -1.0f;
    check(states_ok, "recurrent states: one per sequence, zero at the start, a fork copies, writes stay its own");
    kvcache_free(&c);

    /* many sequences: random forks, stores and drops against a record of what each one wrote where */
    enum { SEQS = 12, POSITIONS = 120 };
    static int wrote[SEQS][POSITIONS];
    int live[SEQS] = {0}, length[SEQS] = {0}, tag = 1, reads = 1, counts = 1;
    init_test_cache(&c);
    unsigned r = 7;
    for (int step = 0; step < 3000; step++) {
        r = r * 1103515245u + 12345u;
        int op = (int)(r >> 16) % 10, i = (int)(r >> 8) % SEQS;
        if (!live[i]) { /* a new sequence, or a fork of a live one */
            int src = -1;
            for (int j = 0; j < SEQS; j++)
                if (live[j] && (src < 0 || (r >> 4) % 3 == 0)) src = j;
            int id = src >= 0 && op < 7 ? kvcache_fork(&c, src) : kvcache_add_sequence(&c);
            if (id >= SEQS) break;
            live[id] = 1;
            length[id] = src >= 0 && op < 7 ? length[src] : 0;
            if (src >= 0 && op < 7) memcpy(wrote[id], wrote[src], sizeof wrote[id]);
        } else if (op < 8 && length[i] < POSITIONS) {
            store_all(&c, i, length[i], tag);
            wrote[i][length[i]++] = tag++;
        } else if (op == 9) {
            kvcache_drop_sequence(&c, i);
            live[i] = 0;
        }
        for (int j = 0; j < SEQS; j++)
            for (int l = 0; live[j] && l < 3; l++)
                for (int pos = 0; pos < length[j]; pos++)
                    if (kvlayer_holds(kvcache_layer(&c, j, l), pos)) reads &= reads_tag(kvcache_layer(&c, j, l), pos, wrote[j][pos]);
        size_t refs = 0, held = 0;
        for (int j = 0; j < SEQS; j++)
            for (int l = 0; live[j] && l < 3; l++)
                for (int blk = 0; blk < kvcache_layer(&c, j, l)->n_blocks; blk++) refs += kvcache_layer(&c, j, l)->block_ids[blk] >= 0;
        for (int p = 0; p < c.n_pools; p++)
            for (int id = 0; id < c.pools[p].n_ids; id++) held += (size_t)c.pools[p].refs[id];
        counts &= refs == held;
    }
    check(reads, "many sequences (random forks, stores, drops): every sequence reads back what it wrote, at every layer");
    check(counts, "many sequences: each block's count equals the tables that hold it, after every step");
    for (int j = 0; j < SEQS; j++)
        if (live[j]) kvcache_drop_sequence(&c, j);
    check(kvpool_blocks_in_use(&c.pools[0]) == 0 && kvpool_blocks_in_use(&c.pools[1]) == 0 && kvcache_bytes_held(&c) == 0,
          "many sequences: once all are dropped every count is zero and no byte is held");
    kvcache_free(&c);
}

static void test_head_mapping(void) {
    int ok = 1;
    for (int h = 0; h < 8; h++) ok &= kv_head_of(h, 8, 8) == h; /* MHA */
    check(ok, "head mapping: MHA maps each query head to its own kv head");
    ok = 1;
    for (int h = 0; h < 8; h++) ok &= kv_head_of(h, 8, 1) == 0; /* MQA */
    check(ok, "head mapping: MQA maps every query head to kv head 0");
    int want[8] = {0, 0, 0, 0, 1, 1, 1, 1};
    ok = 1;
    for (int h = 0; h < 8; h++) ok &= kv_head_of(h, 8, 2) == want[h]; /* GQA */
    check(ok, "head mapping: GQA 8/2 maps heads 0-3 to kv 0 and 4-7 to kv 1");
}

/* The masks as the article defines them, one predicate each (independent of attention.c's runs). */
static int reference_visible(MaskKind mask, int span, int sinks, int i, int j) {
    if (j > i) return 0;
    switch (mask) {
    case MASK_SLIDING: return i - j < span || j < sinks;
    case MASK_STRIDED: return i - j < span || (i - j) % span == 0;
    case MASK_FIXED: return j / span == i / span || j % span == span - 1;
    case MASK_CHUNKED: return j / span == i / span;
    default: return 1;
    }
}

/* The attention formula written out with full matrices: S = Q K^T * scale, mask, softmax, S V. */
static void reference_attention(float *out, const float *q, const float *keys, const float *values, int n_pos, int pos,
                                int head_dim, int kv_stride, float scale, float cap, MaskKind mask, int span, int sinks,
                                double sink_logit) {
    double *s = malloc(sizeof(double) * (size_t)n_pos);
    double max = sink_logit > -1e300 ? sink_logit : -1e300, sum = 0.0;
    for (int j = 0; j < n_pos; j++) {
        int visible = reference_visible(mask, span, sinks, pos, j);
        if (!visible) {
            s[j] = -INFINITY;
            continue;
        }
        double d = 0.0;
        for (int i = 0; i < head_dim; i++) d += (double)q[i] * keys[(size_t)j * kv_stride + i];
        d *= scale;
        if (cap > 0) d = cap * tanh(d / cap);
        s[j] = d;
        if (d > max) max = d;
    }
    for (int j = 0; j < n_pos; j++) sum += s[j] == -INFINITY ? 0.0 : exp(s[j] - max);
    if (sink_logit > -1e300) sum += exp(sink_logit - max); /* a learned sink: its share of the mass, no value */
    for (int i = 0; i < head_dim; i++) {
        double acc = 0.0;
        for (int j = 0; j < n_pos; j++)
            if (s[j] != -INFINITY) acc += exp(s[j] - max) / sum * values[(size_t)j * kv_stride + i];
        out[i] = (float)acc;
    }
    free(s);
}

/* rows[n][width] replaced by what a cache of type t gives back: the reference then sees the cache's values */
static void round_trip_rows(float *rows, int n, int width, KVType t) {
    unsigned char *stored = malloc(kv_row_bytes(width, t));
    for (int r = 0; r < n; r++) {
        kv_row_store(stored, rows + (size_t)r * width, width, t);
        kv_row_load(rows + (size_t)r * width, stored, t, 0, width);
    }
    free(stored);
}

/* Every attention case with each KV type: the kernels must see the rounded values the cache holds and give the
 * formula's result on them (and each other's bits) */
static void test_attention_case(KVType kv_type);
static void test_attention(void) {
    for (int t = KV_F32; t <= KV_Q8_0; t++) test_attention_case((KVType)t);
}

static void test_attention_case(KVType kv_type) {
    struct {
        const char *name;
        int n_heads, n_kv_heads;
        MaskKind mask;
        int span, sinks;
        float cap;
        int learned_sinks;
    } cases[] = {{"MHA causal", 4, 4, MASK_CAUSAL, 0, 0, 0, 0},
                 {"GQA 8/2 causal", 8, 2, MASK_CAUSAL, 0, 0, 0, 0},
                 {"MQA sliding W=7", 4, 1, MASK_SLIDING, 7, 0, 0, 0},
                 {"GQA sliding W=5 + 2 sinks", 4, 2, MASK_SLIDING, 5, 2, 0, 0},
                 {"GQA sliding W=20 + 3 sinks (window over block edges)", 4, 2, MASK_SLIDING, 20, 3, 0, 0},
                 {"MHA soft-capped 5", 2, 2, MASK_CAUSAL, 0, 0, 5.0f, 0},
                 {"GQA strided S=6", 4, 2, MASK_STRIDED, 6, 0, 0, 0},
                 {"MQA strided S=1", 2, 1, MASK_STRIDED, 1, 0, 0, 0},
                 {"GQA fixed B=7", 4, 2, MASK_FIXED, 7, 0, 0, 0},
                 {"MHA fixed B=16 (cache blocks = pattern blocks)", 2, 2, MASK_FIXED, 16, 0, 0, 0},
                 {"MHA fixed B=1", 2, 2, MASK_FIXED, 1, 0, 0, 0},
                 {"GQA chunked C=16 (chunks = cache blocks)", 4, 2, MASK_CHUNKED, 16, 0, 0, 0},
                 {"MQA chunked C=7", 4, 1, MASK_CHUNKED, 7, 0, 0, 0},
                 {"GQA causal + learned sinks", 4, 2, MASK_CAUSAL, 0, 0, 0, 1},
                 {"GQA sliding W=9 + learned sinks", 4, 2, MASK_SLIDING, 9, 0, 0, 1}};
    int head_dim = 16, n_pos = 70;
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int H = cases[c].n_heads, KV = cases[c].n_kv_heads, kv_dim = KV * head_dim;
        float *keys = malloc(sizeof(float) * (size_t)n_pos * kv_dim), *vals = malloc(sizeof(float) * (size_t)n_pos * kv_dim);
        float *q = malloc(sizeof(float) * (size_t)H * head_dim), *out = malloc(sizeof(float) * (size_t)H * head_dim);
        float *flash = malloc(sizeof(float) * (size_t)H * head_dim);
        float *scores = malloc(sizeof(float) * (size_t)H * ATTENTION_QUERY_TILE * n_pos), ref[64];
        for (int i = 0; i < n_pos * kv_dim; i++) keys[i] = 3 * frand(), vals[i] = frand();
        float sink_logits[8];
        for (int h = 0; h < 8; h++) sink_logits[h] = 2 * frand();
        AttentionSpec spec = {head_dim, 1.0f / sqrtf((float)head_dim), cases[c].cap, cases[c].mask, cases[c].span,
                              cases[c].sinks, cases[c].learned_sinks ? sink_logits : NULL, KERNEL_NAIVE, LATENT_AUTO, kv_type};
        char name[128];
        snprintf(name, sizeof name, "%s, %s KV", cases[c].name, kv_type_name(kv_type));
        AttentionSpec flash_spec = spec;
        flash_spec.kernel = KERNEL_FLASH;
        float *rkeys = malloc(sizeof(float) * (size_t)n_pos * kv_dim), *rvals = malloc(sizeof(float) * (size_t)n_pos * kv_dim);
        memcpy(rkeys, keys, sizeof(float) * (size_t)n_pos * kv_dim);
        memcpy(rvals, vals, sizeof(float) * (size_t)n_pos * kv_dim);
        round_trip_rows(rkeys, n_pos, kv_dim, kv_type);
        round_trip_rows(rvals, n_pos, kv_dim, kv_type);
        KVLayer l;
        attention_cache_init(&l, kv_dim, kv_dim, &spec);
        double worst = 0.0, worst_flash = 0.0;
        int counts_ok = 1, most = 0, readable = 1;
        for (int pos = 0; pos < n_pos; pos++) {
            kvlayer_store(&l, pos, keys + (size_t)pos * kv_dim, vals + (size_t)pos * kv_dim);
            for (int i = 0; i < H * head_dim; i++) q[i] = frand();
            attention_layer(out, q, &l, H, KV, pos, 1, &spec, scores, n_pos);
            attention_layer(flash, q, &l, H, KV, pos, 1, &flash_spec, NULL, 0);
            int visible = 0;
            for (int j = 0; j <= pos; j++) visible += reference_visible(spec.mask, spec.span, spec.n_sinks, pos, j);
            counts_ok &= visible == visible_count(&spec, pos);
            if (visible > most) most = visible;
            for (int h = 0; h < H; h++) { /* attention_layer's fast path against the formula as written */
                float one[64], sink = spec.sink_logits ? spec.sink_logits[h] : -INFINITY;
                attention_head(one, q + h * head_dim, &l, h / (H / KV), pos, &spec, sink, scores + (size_t)H * n_pos);
                readable &= !memcmp(one, out + h * head_dim, sizeof(float) * head_dim);
                attention_head_flash(one, q + h * head_dim, &l, h / (H / KV), pos, &spec, sink);
                readable &= !memcmp(one, flash + h * head_dim, sizeof(float) * head_dim);
            }
            for (int h = 0; h < H; h++) {
                int kvh = h / (H / KV);
                reference_attention(ref, q + h * head_dim, rkeys + kvh * head_dim, rvals + kvh * head_dim, n_pos, pos,
                                    head_dim, kv_dim, spec.scale, spec.softcap, spec.mask, spec.span, spec.n_sinks,
                                    spec.sink_logits ? spec.sink_logits[h] : -INFINITY);
                for (int i = 0; i < head_dim; i++) {
                    double d = fabs(out[h * head_dim + i] - ref[i]), df = fabs(flash[h * head_dim + i] - ref[i]);
                    if (d > worst) worst = d;
                    if (df > worst_flash) worst_flash = df;
                }
            }
        }
        check(worst < 1e-5, "attention %s: naive kernel equals the full-matrix formula at all %d positions (max |d| %.1e)",
              name, n_pos, worst);
        check(worst_flash < 1e-5, "attention %s: flash kernel equals the full-matrix formula (max |d| %.1e)",
              name, worst_flash);
        check(readable, "attention %s: attention_layer gives attention_head's and attention_head_flash's bits "
              "(the fast paths against the formulas as written)", name);
        check(counts_ok && most_visible(&spec, n_pos) == most,
              "attention %s: visible_count and most_visible agree with the mask's definition", name);
        if (kvlayer_keeps_every_position(&l)) { /* a prompt chunk: every key cached first, then all tokens at once */
            size_t q_dim = (size_t)H * head_dim;
            float *qs = malloc(sizeof(float) * n_pos * q_dim), *all = malloc(sizeof(float) * n_pos * q_dim);
            int same = 1;
            for (size_t i = 0; i < n_pos * q_dim; i++) qs[i] = frand();
            for (int k = 0; k < 2; k++) {
                AttentionSpec *sp = k ? &flash_spec : &spec;
                attention_layer(all, qs, &l, H, KV, 0, n_pos, sp, scores, n_pos);
                for (int pos = 0; pos < n_pos; pos++) {
                    attention_layer(out, qs + pos * q_dim, &l, H, KV, pos, 1, sp, scores, n_pos);
                    same &= !memcmp(out, all + pos * q_dim, sizeof(float) * q_dim);
                }
            }
            check(same, "attention %s: %d tokens in one call (keys cached first) give the bits of one call each",
                  name, n_pos);
            free(qs), free(all);
        }
        kvlayer_free(&l);
        free(keys), free(vals), free(rkeys), free(rvals), free(q), free(out), free(flash), free(scores);
    }
}

/* Queries of one sequence against keys and values of another, no mask: the same full-matrix formula with
 * every key visible (reference_attention at the last key position, causal). */
/* A decode step of several sequences (attention_rows): forks of one 37-token prompt (its last block partial, so
 * copied on the first write) that have gone on by 0 .. 40 tokens each, and one sequence of its own; every row
 * must get the bits attention_layer gives it alone, whatever the mask, kernel path, KV type and company. */
static void test_attention_rows(void) {
    struct {
        const char *name;
        int n_heads, n_kv_heads, head_dim;
        MaskKind mask;
        int span;
        float cap;
        int learned_sinks;
    } cases[] = {{"MHA causal", 4, 4, 16, MASK_CAUSAL, 0, 0, 0},
                 {"GQA causal, head_dim 32", 8, 2, 32, MASK_CAUSAL, 0, 0, 0},
                 {"MQA causal + softcap", 4, 1, 16, MASK_CAUSAL, 0, 30.0f, 0},
                 {"GQA causal + learned sinks", 4, 2, 16, MASK_CAUSAL, 0, 0, 1},
                 {"GQA strided S=5", 4, 2, 16, MASK_STRIDED, 5, 0, 0},
                 {"MHA fixed B=7", 2, 2, 16, MASK_FIXED, 7, 0, 0},
                 {"GQA chunked C=16", 4, 2, 16, MASK_CHUNKED, 16, 0, 0}};
    enum { PROMPT = 37, ROWS = 12 };
    int grown[ROWS] = {0, 1, 3, 11, 12, 27, 40, 5, 5, 0, 19, 2}, n_pos = PROMPT + 41;
    for (int kt = 0; kt < 3; kt++)
        for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
            int H = cases[c].n_heads, KV = cases[c].n_kv_heads, hd = cases[c].head_dim, kv_dim = KV * hd, q_dim = H * hd;
            float sink_logits[8], *kv = malloc(sizeof(float) * (size_t)2 * kv_dim);
            for (int h = 0; h < 8; h++) sink_logits[h] = 2 * frand();
            AttentionSpec spec = {hd, 1.0f / sqrtf((float)hd), cases[c].cap, cases[c].mask, cases[c].span, 0,
                                  cases[c].learned_sinks ? sink_logits : NULL, KERNEL_NAIVE, LATENT_AUTO, (KVType)kt};
            KVLayer prompt, seqs[ROWS];
            const KVLayer *tables[ROWS];
            int pos[ROWS];
            attention_cache_init(&prompt, kv_dim, kv_dim, &spec);
            for (int p = 0; p < PROMPT; p++) {
                for (int i = 0; i < 2 * kv_dim; i++) kv[i] = frand();
                kvlayer_store(&prompt, p, kv, kv + kv_dim);
            }
            for (int r = 0; r < ROWS; r++) {
                if (r == ROWS - 1) attention_cache_init(&seqs[r], kv_dim, kv_dim, &spec); /* a sequence of its own */
                else kvlayer_fork(&seqs[r], &prompt);
                int first = r == ROWS - 1 ? 0 : PROMPT;
                pos[r] = PROMPT + grown[r];
                for (int p = first; p <= pos[r]; p++) {
                    for (int i = 0; i < 2 * kv_dim; i++) kv[i] = frand();
                    kvlayer_store(&seqs[r], p, kv, kv + kv_dim);
                }
                tables[r] = &seqs[r];
            }
            float *q = malloc(sizeof(float) * (size_t)ROWS * q_dim), *out = malloc(sizeof(float) * (size_t)ROWS * q_dim);
            float *one = malloc(sizeof(float) * (size_t)q_dim), *scores = malloc(sizeof(float) * (size_t)H * ROWS * n_pos);
            for (int i = 0; i < ROWS * q_dim; i++) q[i] = frand();
            int same = 1;
            for (int n = 1; n <= ROWS; n += ROWS - 1) { /* one row alone, then all of them */
                attention_rows(out, q, tables, pos, n, H, KV, &spec, scores, n_pos);
                for (int r = 0; r < n; r++) {
                    attention_layer(one, q + (size_t)r * q_dim, tables[r], H, KV, pos[r], 1, &spec, scores, n_pos);
                    same &= !memcmp(one, out + (size_t)r * q_dim, sizeof(float) * q_dim);
                }
            }
            check(same, "attention_rows, %s, %s KV: %d rows of forked and separate sequences, each with attention_layer's "
                  "bits alone", cases[c].name, kv_type_name((KVType)kt), ROWS);
            for (int r = 0; r < ROWS; r++) kvlayer_free(&seqs[r]);
            kvlayer_free(&prompt);
            free(kv), free(q), free(out), free(one), free(scores);
        }
}

/* Few heads, many keys: attention_layer splits the naive kernel over keys and over head_dim (two heads on the
 * threads of this machine); the bits must still be attention_head's */
static void test_attention_split(void) {
    int H = 2, KV = 1, head_dim = 48, n_pos = 1100, same = 1;
    float *keys = malloc(sizeof(float) * (size_t)n_pos * head_dim), *vals = malloc(sizeof(float) * (size_t)n_pos * head_dim);
    float q[96], out[96], one[48], *scores = malloc(sizeof(float) * (size_t)H * n_pos);
    for (int i = 0; i < n_pos * head_dim; i++) keys[i] = 3 * frand(), vals[i] = frand();
    for (int i = 0; i < H * head_dim; i++) q[i] = frand();
    for (int m = 0; m < 2 * 3; m++) { /* each mask with each KV type */
        AttentionSpec spec = {head_dim, 1.0f / sqrtf((float)head_dim), 0, m % 2 ? MASK_SLIDING : MASK_CAUSAL, m % 2 ? 700 : 0,
                              m % 2 ? 4 : 0, NULL, KERNEL_NAIVE, LATENT_AUTO, (KVType)(m / 2)};
        KVLayer l;
        attention_cache_init(&l, head_dim, head_dim, &spec);
        for (int pos = 0; pos < n_pos; pos++) {
            kvlayer_store(&l, pos, keys + (size_t)pos * head_dim, vals + (size_t)pos * head_dim);
            if (pos < 520 || pos % 97) continue;
            attention_layer(out, q, &l, H, KV, pos, 1, &spec, scores, n_pos);
            for (int h = 0; h < H; h++) {
                attention_head(one, q + h * head_dim, &l, 0, pos, &spec, -INFINITY, scores);
                same &= !memcmp(one, out + h * head_dim, sizeof one);
            }
        }
        kvlayer_free(&l);
    }
    check(same, "attention, 2 heads over 520 .. 1100 keys (causal; sliding 700 + 4 sinks): split over keys and "
          "head_dim on %d threads, attention_head's bits (f32, bf16 and q8_0 KV)", parallel_threads());
    free(keys), free(vals), free(scores);
}

static void test_cross_attention(void) {
    int n_queries = 5, n_keys = 37, H = 8, KV = 2, head_dim = 16, q_dim = H * head_dim, kv_dim = KV * head_dim;
    float *queries = malloc(sizeof(float) * (size_t)n_queries * q_dim), *out = malloc(sizeof(float) * (size_t)n_queries * q_dim);
    float *keys = malloc(sizeof(float) * (size_t)n_keys * kv_dim), *vals = malloc(sizeof(float) * (size_t)n_keys * kv_dim);
    float ref[64], scale = 1.0f / sqrtf((float)head_dim);
    for (int i = 0; i < n_queries * q_dim; i++) queries[i] = frand();
    for (int i = 0; i < n_keys * kv_dim; i++) keys[i] = 3 * frand(), vals[i] = frand();
    cross_attention(out, queries, n_queries, keys, vals, n_keys, H, KV, head_dim, scale);
    double worst = 0.0;
    for (int i = 0; i < n_queries; i++)
        for (int h = 0; h < H; h++) {
            int kvh = h / (H / KV);
            reference_attention(ref, queries + (size_t)i * q_dim + h * head_dim, keys + kvh * head_dim, vals + kvh * head_dim,
                                n_keys, n_keys - 1, head_dim, kv_dim, scale, 0.0f, MASK_CAUSAL, 0, 0, -INFINITY);
            for (int d = 0; d < head_dim; d++)
                if (fabs(out[(size_t)i * q_dim + h * head_dim + d] - ref[d]) > worst) worst = fabs(out[(size_t)i * q_dim + h * head_dim + d] - ref[d]);
        }
    check(worst < 1e-5, "cross-attention: %d queries x %d keys (GQA 8/2) equal the unmasked formula (max |d| %.1e)",
          n_queries, n_keys, worst);
    free(queries), free(out), free(keys), free(vals);
}

static void test_ops(void) {
    check(bf16_to_f32(0x3F80) == 1.0f && bf16_to_f32(0xC000) == -2.0f, "bf16 -> f32");
    check(f16_to_f32(0x3C00) == 1.0f && f16_to_f32(0xC000) == -2.0f && f16_to_f32(0x0001) == ldexpf(1.0f, -24) &&
              isinf(f16_to_f32(0x7C00)),
          "f16 -> f32 (normal, negative, subnormal, infinity)");
    float x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 1, 1}, out[4];
    rmsnorm(out, x, w, 4, 0.0f);
    check(fabsf(out[3] - 4.0f / sqrtf(7.5f)) < 1e-6f, "rmsnorm");
    float b[4] = {0, 0, 0, 1};
    layernorm(out, x, w, b, 4, 0.0f);
    check(fabsf(out[0] + 1.5f / sqrtf(1.25f)) < 1e-6f && fabsf(out[3] - (1.0f + 1.5f / sqrtf(1.25f))) < 1e-6f, "layernorm");
    float head[4] = {1, 0, 0, 1}, inv[2] = {1.0f, 0.5f};
    rope_heads(head, 1, 4, 4, 2, inv, 1.0f); /* pairs (0,2) by angle 2, (1,3) by angle 1 */
    check(fabsf(head[0] - cosf(2)) < 1e-6f && fabsf(head[2] - sinf(2)) < 1e-6f && fabsf(head[1] + sinf(1)) < 1e-6f &&
              fabsf(head[3] - cosf(1)) < 1e-6f,
          "rope rotates the pairs (i, i + d/2)");
    float s[3] = {1, 2, 3};
    softmax(s, 3);
    check(fabsf(s[0] + s[1] + s[2] - 1.0f) < 1e-6f && s[2] > s[1], "softmax");
    float wide[3] = {-INFINITY, 0.0f, -1e30f}, bad[3] = {1.0f, NAN, 2.0f};
    softmax(wide, 3);
    softmax(bad, 3);
    check(wide[0] == 0.0f && wide[1] == 1.0f && wide[2] == 0.0f && isnan(bad[1]) && isnan(bad[2]),
          "softmax: -inf and far-below-max scores weigh 0; a NaN score stays NaN (no NaN converted to an int)");
    check(fabsf(softcap(1000.0f, 30.0f) - 30.0f) < 1e-4f && softcap(1.0f, 0.0f) == 1.0f, "softcap");
    float with_sink[3] = {1, 2, 3}, plain[3] = {1, 2, 3};
    softmax_with_sink(with_sink, 3, 2.5f);
    softmax_with_sink(plain, 3, -INFINITY);
    double denominator = exp(1.0) + exp(2.0) + exp(3.0) + exp(2.5);
    check(fabs(with_sink[2] - exp(3.0) / denominator) < 1e-6 && fabs(with_sink[0] - exp(1.0) / denominator) < 1e-6 &&
              !memcmp(plain, s, sizeof plain),
          "softmax with a learned sink: the sink takes its share of the denominator; -inf is plain softmax (same bits)");
    float up[4] = {-9, 0.5f, 9, 1}, gate[4] = {1, 9, -2, 0};
    activate_clamped(up, gate, 4, 1.702f, 7.0f);
    double want[4] = {(-7 + 1) * (1 / (1 + exp(-1.702))), (0.5 + 1) * 7 / (1 + exp(-1.702 * 7)),
                      (7 + 1) * -2 / (1 + exp(1.702 * 2)), 0};
    int clamped_ok = 1;
    for (int i = 0; i < 4; i++) clamped_ok &= fabs(up[i] - want[i]) < 1e-5 * (1 + fabs(want[i]));
    check(clamped_ok, "clamped SwiGLU (gpt-oss): gate <= 7, up in [-7, 7], (up + 1) * gate * sigmoid(1.702 gate)");
}

static uint16_t random_half(void) { /* a normal f16 between 2^-6 and 2^2, either sign */
    frand();
    return (uint16_t)((rng_state & 0x80000000u) >> 16 | (9 + (rng_state >> 4) % 8) << 10 | (rng_state >> 12 & 0x3FF));
}

/* A random weight matrix of any dtype. */
static void *random_weights(DType d, int rows, int cols) {
    size_t count = (size_t)rows * cols;
    void *data = malloc(tensor_nbytes(d, (uint64_t)rows, (uint64_t)cols));
    for (size_t i = 0; i < count; i++) {
        float v = frand();
        uint32_t u;
        memcpy(&u, &v, 4);
        if (d == DTYPE_F32) ((float *)data)[i] = v;
        else if (d == DTYPE_BF16) ((uint16_t *)data)[i] = (uint16_t)(u >> 16);
        else if (d == DTYPE_F16) ((uint16_t *)data)[i] = random_half();
        else if (d == DTYPE_Q8_0) ((int8_t *)data)[i] = (int8_t)(v * 127.0f);
        else if (i % 2 == 0) ((uint8_t *)data)[i / 2] = (uint8_t)(u >> 9); /* q4_0: two 4-bit values a byte */
    }
    size_t value_bytes = d == DTYPE_Q4_0 ? count / 2 : count;
    if (DTYPE_IS_QUANTIZED(d)) /* the scales follow the values */
        for (size_t g = 0; g < count / Q8_GROUP; g++) ((uint16_t *)((int8_t *)data + value_bytes))[g] = random_half();
    return data;
}

/* x . row in double; for q8_0 and q4_0, with x quantized per group of 32 as matmul.c does (scale max|x|/127) */
static double reference_dot(const Tensor *w, int row, const float *x, double *magnitude) {
    float *wr = malloc(sizeof(float) * (size_t)w->cols);
    tensor_row(wr, w, row);
    double sum = 0.0, mag = 0.0;
    for (int g = 0; g < w->cols; g += Q8_GROUP) {
        int n = w->cols - g < Q8_GROUP ? w->cols - g : Q8_GROUP;
        float amax = 0.0f;
        for (int j = 0; j < n; j++) amax = fmaxf(amax, fabsf(x[g + j]));
        for (int j = 0; j < n; j++) {
            double xv = x[g + j];
            if (DTYPE_IS_QUANTIZED(w->dtype)) xv = amax > 0 ? nearbyintf(x[g + j] * (127.0f / amax)) * (double)(amax / 127.0f) : 0.0;
            sum += (double)wr[g + j] * xv;
            mag += fabs((double)wr[g + j] * xv);
        }
    }
    free(wr);
    *magnitude = mag;
    return sum;
}

static void test_matmul(void) {
    static const int rows_[] = {1, 3, 4, 5, 37, 300}, cols_float[] = {1, 7, 17, 100, 1500}, cols_q8[] = {32, 96, 256, 544, 768, 1024},
                     cols_q4[] = {64, 128, 256, 576, 768, 1024};
    static const int tokens[] = {1, 2, 6, 7, 13, 40}; /* 40: q8_0 prefill on AMX tiles where the CPU has them */
    for (int d = 0; d < DTYPE_COUNT; d++) {
        const int *cols_ = d == DTYPE_Q8_0 ? cols_q8 : d == DTYPE_Q4_0 ? cols_q4 : cols_float;
        int n_cols = DTYPE_IS_QUANTIZED(d) ? 6 : 5, shapes = 0, exact = 1, packed = 0;
        double worst = 0.0;
        MatmulScratch ws = {0};
        for (int ri = 0; ri < 6; ri++)
            for (int ci = 0; ci < n_cols; ci++)
                for (int ti = 0; ti < 6; ti++) {
                    int rows = rows_[ri], cols = cols_[ci], n = tokens[ti];
                    Tensor w = {random_weights((DType)d, rows, cols), (DType)d, rows, cols, 1, NULL};
                    float *x = malloc(sizeof(float) * (size_t)n * cols), *out = malloc(sizeof(float) * (size_t)n * rows);
                    float *one = malloc(sizeof(float) * (size_t)rows), *twice = malloc(sizeof(float) * (size_t)n * rows);
                    for (int i = 0; i < n * cols; i++) x[i] = frand();
                    matmul_scratch_reserve(&ws, n, cols);
                    matmul(&ws, out, x, &w, n);
                    if (n > 2) { /* a scratch that holds 2 tokens works in turns: the very same bits */
                        MatmulScratch small = {0};
                        matmul_scratch_reserve(&small, 2, cols);
                        matmul(&small, twice, x, &w, n);
                        if (memcmp(twice, out, sizeof(float) * (size_t)n * rows)) exact = 0;
                        matmul_scratch_free(&small);
                    }
                    for (int t = 0; t < n; t++) {
                        matmul(&ws, one, x + (size_t)t * cols, &w, 1); /* token by token: the very same bits */
                        if (memcmp(one, out + (size_t)t * rows, sizeof(float) * (size_t)rows)) exact = 0;
                        for (int r = 0; r < rows; r++) {
                            double mag, want = reference_dot(&w, r, x + (size_t)t * cols, &mag);
                            double err = fabs(out[(size_t)t * rows + r] - want) / (mag + 1e-30);
                            if (err > worst) worst = err;
                        }
                    }
                    if (DTYPE_IS_QUANTIZED(d) && matmul_pack(&w) == 0 && w.packed) { /* packed at load: the same bits */
                        matmul(&ws, twice, x, &w, n);
                        if (memcmp(twice, out, sizeof(float) * (size_t)n * rows)) exact = 0;
                        for (int t = 0; t < n; t++) {
                            matmul(&ws, one, x + (size_t)t * cols, &w, 1);
                            if (memcmp(one, out + (size_t)t * rows, sizeof(float) * (size_t)rows)) exact = 0;
                        }
                        matmul_unpack(&w);
                        packed++;
                    }
                    Projection both[2] = {{twice, &w}, {one, &w}};
                    if (n == 1) {
                        matmul_many(&ws, both, 2, x, 1);
                        if (memcmp(one, out, sizeof(float) * (size_t)rows) || memcmp(twice, out, sizeof(float) * (size_t)rows)) exact = 0;
                    }
                    free((void *)w.data), free(x), free(out), free(one), free(twice);
                    shapes++;
                }
        /* a NaN or inf activation (a damaged model can make them) gives NaN outputs, never undefined behaviour
         * in quantize_token; nor does a subnormal group, whose 127 / max|x| overflows */
        Tensor w = {random_weights((DType)d, 3, cols_[0]), (DType)d, 3, cols_[0], 1, NULL};
        float *x = calloc((size_t)cols_[0], sizeof(float)), out[3];
        for (int v = 0; v < 3; v++) {
            for (int i = 0; i < cols_[0]; i++) x[i] = v == 2 ? 1e-45f : 0.5f;
            if (v < 2) x[cols_[0] - 1] = v ? INFINITY : NAN;
            matmul(&ws, out, x, &w, 1);
            if (v < 2 && !isnan(out[0]) && !isinf(out[0])) exact = 0;
            if (v == 2 && !isfinite(out[0])) exact = 0;
        }
        free((void *)w.data), free(x);
        matmul_scratch_free(&ws);
        check(worst < 1e-5 && exact,
              "matmul %s: %d shapes (rows 1..300, cols %d..%d, 1..40 tokens) match a double-precision reference "
              "(max error %.1e of sum |w x|), n tokens at once give the bits of one at a time (and of a scratch that "
              "holds two), a NaN / inf input gives a NaN / inf output; %d of them packed for this machine (matmul_pack), "
              "the same bits", dtype_name((DType)d), shapes, cols_[0], cols_[n_cols - 1], worst, packed);
    }
}

/* A stack of q8_0 / q4_0 matrices (the experts of a mixture) packed at once: tensor_matrix finds each matrix's
 * packed rows, and every product gives the bits of the file's layout */
static void test_packed_stack(void) {
    for (int d = DTYPE_Q8_0; d <= DTYPE_Q4_0; d++) {
        int rows = 20, cols = 768, stack = 3, same = 1;
        size_t stride = tensor_stack_stride((DType)d, (uint64_t)rows, (uint64_t)cols);
        unsigned char *data = malloc(stride * (size_t)stack);
        for (int i = 0; i < stack; i++) {
            void *one = random_weights((DType)d, rows, cols);
            memcpy(data + (size_t)i * stride, one, tensor_nbytes((DType)d, (uint64_t)rows, (uint64_t)cols));
            free(one);
        }
        Tensor w = {data, (DType)d, rows, cols, stack, NULL};
        float x[5 * 768], out[5 * 20], want[5 * 20];
        for (int i = 0; i < 5 * cols; i++) x[i] = frand();
        MatmulScratch ws = {0};
        matmul_scratch_reserve(&ws, 5, cols);
        same &= matmul_pack(&w) == 0;
        for (int i = 0; i < stack; i++)
            for (int n = 1; n <= 5; n += 4) {
                Tensor m = tensor_matrix(&w, i), plain = m;
                plain.packed = NULL;
                matmul(&ws, out, x, &m, n);
                matmul(&ws, want, x, &plain, n);
                same &= !memcmp(out, want, sizeof(float) * (size_t)n * rows) && (m.packed != NULL) == (w.packed != NULL);
            }
        check(same, "matmul %s: a stack of 3 matrices %s, each one's products with the bits of the file's layout",
              dtype_name((DType)d), w.packed ? "packed at once (matmul_pack)" : "(not packed on this machine)");
        matmul_unpack(&w);
        matmul_scratch_free(&ws);
        free(data);
    }
}

/* parallel_for: many small jobs back to back, as decode posts them (alternately few and more items, a little
 * work each); every item must run exactly once, and all of them before the call returns */
static atomic_int item_runs[64];
static void count_runs(void *ctx, int begin, int end) {
    volatile float sink = 0.0f;
    for (int i = begin; i < end; i++) {
        for (int k = 0; k < 100; k++) sink = sink + (float)k;
        atomic_fetch_add(&item_runs[i], 1);
    }
    (void)ctx;
}

static void test_parallel(void) {
    int ok = 1, jobs = 0;
    for (; jobs < 100000 && ok; jobs++) {
        int n = jobs % 2 ? 8 : 1 + jobs % 4; /* few enough items that each is its own chunk */
        for (int i = 0; i < n; i++) atomic_store(&item_runs[i], 0);
        parallel_for(n, 1, 1 << 24, count_runs, NULL);
        for (int i = 0; i < n; i++) ok &= atomic_load(&item_runs[i]) == 1;
    }
    check(ok, "parallel_for: %d jobs of 1..8 items on %d threads: every item ran exactly once, before the call returned",
          jobs, parallel_threads());
}

static void test_utf8(void) {
    uint32_t cp;
    check(utf8_decode((const unsigned char *)"\xE2\x82\xAC", 3, &cp) == 3 && cp == 0x20AC, "utf8: decodes a 3-byte character");
    check(utf8_decode((const unsigned char *)"\xE2\x82", 2, &cp) == 1 && cp == 0xFFFD, "utf8: a truncated sequence is one invalid byte");
    check(utf8_decode((const unsigned char *)"\xC0\x80", 2, &cp) == 1 && cp == 0xFFFD, "utf8: overlong forms are invalid");
    check(unicode_in(&unicode_letter, 0x3B1) && unicode_in(&unicode_number, 0x0663) && unicode_in(&unicode_space, 0x3000) &&
              !unicode_in(&unicode_letter, 0x200B),
          "unicode classes: Greek alpha is a letter, Arabic-Indic three a number, U+3000 a space, ZWSP none");

    /* streaming decode: a character split over tokens is held back until complete */
    char buf[64] = {0};
    FILE *f = fmemopen(buf, sizeof buf, "w");
    Utf8Stream s = {{0}, 0};
    utf8_stream_write(&s, f, (const unsigned char *)"a\xE2", 2);
    fflush(f);
    int held = strcmp(buf, "a") == 0;
    utf8_stream_write(&s, f, (const unsigned char *)"\x82", 1);
    utf8_stream_write(&s, f, (const unsigned char *)"\xAC!", 2);
    utf8_stream_write(&s, f, (const unsigned char *)"\xF0\x9F", 2);
    utf8_stream_flush(&s, f);
    fclose(f);
    check(held && strcmp(buf, "a\xE2\x82\xAC!\xEF\xBF\xBD") == 0,
          "streaming decode: never prints half a character; an unfinished one ends as U+FFFD");
}

/* ------------------------------------------------------------------------------------------- */

typedef struct {
    const char *text;
    float score;
    unsigned type;
} TestPiece;

static void put_u32(unsigned char **p, uint32_t v) {
    memcpy(*p, &v, 4);
    *p += 4;
}

/* A tokenizer record (docs/FORMAT.md) with no eos ids and no merges; returns its size. */
static size_t pack_tokenizer(unsigned char *buf, unsigned kind, unsigned flags, int unk, const TestPiece *pieces, int n) {
    unsigned char *p = buf;
    uint32_t header[] = {kind, 0, flags, (uint32_t)-1, (uint32_t)unk, 0, (uint32_t)n, 0};
    for (int i = 0; i < 8; i++) put_u32(&p, header[i]);
    for (int i = 0; i < n; i++) {
        uint32_t len = (uint32_t)strlen(pieces[i].text), score;
        put_u32(&p, len);
        memcpy(p, pieces[i].text, len);
        p += len;
        memcpy(&score, &pieces[i].score, 4);
        put_u32(&p, score);
        put_u32(&p, pieces[i].type);
    }
    return (size_t)(p - buf);
}

/* Decodes ids as one stream into buf (through Utf8Stream, as ./run prints them). */
static void decode_all(const Tokenizer *t, const int *ids, int n, char *buf, size_t size) {
    memset(buf, 0, size);
    FILE *f = fmemopen(buf, size, "w");
    Utf8Stream out = {{0}, 0};
    DecodeState state = {0, 0};
    for (int i = 0, len; i < n; i++) {
        const unsigned char *bytes = tokenizer_decode(t, &state, ids[i], &len);
        utf8_stream_write(&out, f, bytes, len);
    }
    utf8_stream_flush(&out, f);
    fclose(f);
}

static void test_tokenizer_records(void) {
    static unsigned char buf[4096];
    char err[256], text[64];
    Tokenizer t;
    const TestPiece bad_strip[] = {{"a", 0, PIECE_NORMAL | PIECE_RSTRIP}};
    const TestPiece bad_byte[] = {{"<0xZZ>", 0, PIECE_BYTE}};
    const TestPiece bad_type[] = {{"a", 0, 7}};
    check(tokenizer_load(&t, buf, pack_tokenizer(buf, 1, 0, -1, bad_strip, 1), 1, err, sizeof err) != 0 && strstr(err, "strips"),
          "tokenizer record: whitespace stripping on a piece not matched in the text is rejected (%s)", err);
    check(tokenizer_load(&t, buf, pack_tokenizer(buf, 2, 0, -1, bad_byte, 1), 1, err, sizeof err) != 0 && strstr(err, "<0xNN>"),
          "tokenizer record: a byte piece not of the form <0xNN> is rejected (%s)", err);
    check(tokenizer_load(&t, buf, pack_tokenizer(buf, 2, 0, -1, bad_type, 1), 1, err, sizeof err) != 0 && strstr(err, "type"),
          "tokenizer record: an unknown piece type is rejected (%s)", err);
    check(tokenizer_load(&t, buf, pack_tokenizer(buf, 1, TOKF_SCORE_MERGES, -1, bad_type, 1), 1, err, sizeof err) != 0,
          "tokenizer record: merging by score is for SentencePiece-style tokenizers only (%s)", err);

    /* SentencePiece-style: "▁" pieces, byte fallback, a control BOS, merges by score */
    const TestPiece sp[] = {{" \xE2\x81\x87 ", 0, PIECE_UNKNOWN}, {"<s>", 0, PIECE_CONTROL}, {"<0xE2>", 0, PIECE_BYTE},
                            {"<0x82>", 0, PIECE_BYTE}, {"<0xAC>", 0, PIECE_BYTE}, {"\xE2\x96\x81", -5, PIECE_NORMAL},
                            {"a", -1, PIECE_NORMAL}, {"\xE2\x96\x81" "a", -2, PIECE_NORMAL}};
    unsigned flags = TOKF_SCORE_MERGES | TOKF_DUMMY_PREFIX | TOKF_BYTE_FALLBACK | TOKF_STRIP_LEADING_SPACE;
    int ok = tokenizer_load(&t, buf, pack_tokenizer(buf, 2, flags, 0, sp, 8), 8, err, sizeof err) == 0;
    check(ok, "tokenizer record: a SentencePiece-style record loads%s%s", ok ? "" : ": ", ok ? "" : err);
    if (!ok) return;
    int ids[32], n = tokenizer_encode(&t, "a \xE2\x82\xAC", 5, 0, ids);
    check(n == 5 && ids[0] == 7 && ids[1] == 5 && ids[2] == 2 && ids[3] == 3 && ids[4] == 4,
          "sentencepiece encode: dummy prefix, \"▁a\" by score, a character outside the vocabulary as its bytes");
    int euro[] = {1, 7, 5, 2, 3, 4};
    decode_all(&t, euro, 6, text, sizeof text);
    check(strcmp(text, "a \xE2\x82\xAC") == 0,
          "sentencepiece decode: BOS prints nothing, the dummy space after it is dropped, byte pieces join into one character");
    int spaces[] = {5, 7};
    decode_all(&t, spaces, 2, text, sizeof text);
    check(strcmp(text, " a") == 0, "sentencepiece decode: only the first piece loses its dummy space (\"▁\" \"▁a\" -> \" a\")");
    tokenizer_free(&t);
    ok = tokenizer_load(&t, buf, pack_tokenizer(buf, 2, flags | TOKF_REMOVE_EXTRA_SPACES, 0, sp, 8), 8, err, sizeof err) == 0;
    decode_all(&t, spaces, 2, text, sizeof text);
    check(ok && strcmp(text, "a") == 0, "sentencepiece decode: with remove_extra_whitespaces leading spaces go until text is printed");
    n = ok ? tokenizer_encode(&t, "  a   a  ", 9, 0, ids) : 0;
    check(n == 2 && ids[0] == 7 && ids[1] == 7, "sentencepiece encode: remove_extra_whitespaces trims and squeezes spaces");
    tokenizer_free(&t);
}

/* ------------------------------------------------------------------------------------------- */

/* how often each of n tokens comes out of `draws` samples of logits (copied fresh each time) */
static void sample_counts(const SamplerSettings *set, const float *logits, int n, int draws, int *counts) {
    Sampler s;
    float work[8];
    if (sampler_init(&s, set, n) != 0) abort();
    memset(counts, 0, (size_t)n * sizeof *counts);
    for (int d = 0; d < draws; d++) {
        memcpy(work, logits, (size_t)n * sizeof *work);
        counts[sampler_sample(&s, work)]++;
    }
    sampler_free(&s);
}

static void test_sampler(void) {
    /* p = softmax(l) = 0.5, 0.3, 0.15, 0.05 */
    const float l[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    int c[4], draws = 40000;
    SamplerSettings base = {.temperature = 1.0f, .top_p = 1.0f, .repeat_penalty = 1.0f, .repeat_last_n = 64, .seed = 7};

    SamplerSettings k = base;
    k.top_k = 2;
    sample_counts(&k, l, 4, draws, c);
    check(c[2] == 0 && c[3] == 0 && fabs((double)c[0] / (c[0] + c[1]) - 0.5 / 0.8) < 0.015,
          "sampler: top-k 2 draws only the two most likely, in proportion 5:3 (%d %d %d %d)", c[0], c[1], c[2], c[3]);
    SamplerSettings p = base;
    p.top_p = 0.79f; /* 0.5 + 0.3 passes 0.79: the nucleus stops there */
    sample_counts(&p, l, 4, draws, c);
    check(c[2] == 0 && c[3] == 0 && c[0] > 0 && c[1] > 0, "sampler: top-p 0.79 keeps the tokens up to the one that reaches it");
    p.top_p = 0.81f;
    sample_counts(&p, l, 4, draws, c);
    check(c[2] > 0 && c[3] == 0, "sampler: top-p 0.81 needs the third token too");
    p.top_p = 0.79f, p.temperature = 5.0f; /* llama.cpp's order: the nucleus is chosen before the temperature */
    sample_counts(&p, l, 4, draws, c);
    check(c[2] == 0 && c[3] == 0 && fabs((double)c[0] / (c[0] + c[1]) - 1.0 / (1.0 + pow(0.3 / 0.5, 0.2))) < 0.015,
          "sampler: temperature 5 after top-p 0.79 flattens the two kept tokens only (%d %d)", c[0], c[1]);
    SamplerSettings m = base;
    m.min_p = 0.35f; /* keeps p >= 0.35 * 0.5 = 0.175 */
    sample_counts(&m, l, 4, draws, c);
    check(c[2] == 0 && c[3] == 0 && c[1] > 0, "sampler: min-p 0.35 keeps the tokens at least 0.35 times as likely as the first");
    m.min_p = 0.29f; /* 0.145: the third stays */
    sample_counts(&m, l, 4, draws, c);
    check(c[2] > 0 && c[3] == 0, "sampler: min-p 0.29 keeps the third token too");
    SamplerSettings all = base;
    sample_counts(&all, l, 4, draws, c);
    check(fabs(c[3] / (double)draws - 0.05) < 0.006 && fabs(c[0] / (double)draws - 0.5) < 0.015,
          "sampler: without filters, draws follow softmax (%d %d %d %d of %d)", c[0], c[1], c[2], c[3], draws);

    /* repeat penalty: positive logits divided by R, negative multiplied, only for tokens in the window */
    SamplerSettings r = base;
    r.temperature = 0.0f, r.repeat_penalty = 2.0f, r.repeat_last_n = 2;
    Sampler s;
    if (sampler_init(&s, &r, 4) != 0) abort();
    float x[4] = {2.0f, -2.0f, 1.5f, 0.5f};
    sampler_accept(&s, 3); /* pushed out of the window of 2 by the next two */
    sampler_accept(&s, 0);
    sampler_accept(&s, 1);
    sampler_accept(&s, 0);
    int best = sampler_sample(&s, x);
    check(x[0] == 1.0f && x[1] == -4.0f && x[2] == 1.5f && x[3] == 0.5f && best == 2,
          "sampler: --repeat-penalty 2 over the last 2 tokens: 2 -> 1, -2 -> -4, others unchanged; greedy picks the "
          "unpenalized token (%g %g %g %g, picked %d)", x[0], x[1], x[2], x[3], best);
    sampler_free(&s);
}

/* deflate_bytes against the format: a small inflater written from RFC 1951 (dynamic blocks only, which is all
 * deflate_bytes writes) must give the bytes back */
typedef struct {
    const unsigned char *p;
    size_t n, pos;
    int bit;
} BitReader;

static int get_bits(BitReader *r, int count) {
    int v = 0;
    for (int i = 0; i < count; i++) {
        if (r->pos >= r->n) return -1;
        v |= ((r->p[r->pos] >> r->bit) & 1) << i;
        if (++r->bit == 8) r->bit = 0, r->pos++;
    }
    return v;
}

/* decodes one symbol with canonical code lengths len[0..n): the codes of each length are consecutive, in
 * symbol order, after those of the shorter lengths (RFC 1951 3.2.2); a code arrives first bit first */
static int get_symbol(BitReader *r, const unsigned char *len, int n) {
    int code = 0, first = 0;
    for (int bits = 1; bits <= 15; bits++) {
        int b = get_bits(r, 1), count = 0;
        if (b < 0) return -1;
        code |= b;
        for (int i = 0; i < n; i++) count += len[i] == bits;
        if (code - first < count)
            for (int i = 0, k = 0; i < n; i++)
                if (len[i] == bits && k++ == code - first) return i;
        first = (first + count) << 1;
        code <<= 1;
    }
    return -1;
}

static long inflate_all(const unsigned char *z, size_t n, unsigned char *out, size_t cap) {
    static const int lbase[29] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
                                  131, 163, 195, 227, 258};
    static const int lextra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
    static const int dbase[30] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
                                  1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
    static const int dextra[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
    static const int order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
    BitReader r = {z, n, 0, 0};
    size_t o = 0;
    for (int final = 0; !final;) {
        final = get_bits(&r, 1);
        if (get_bits(&r, 2) != 2) return -1; /* deflate_bytes writes dynamic blocks only */
        int hlit = get_bits(&r, 5) + 257, hdist = get_bits(&r, 5) + 1, hclen = get_bits(&r, 4) + 4;
        unsigned char cl[19] = {0}, lens[320] = {0};
        for (int i = 0; i < hclen; i++) cl[order[i]] = (unsigned char)get_bits(&r, 3);
        for (int i = 0; i < hlit + hdist;) {
            int sym = get_symbol(&r, cl, 19), rep = 0, val = 0;
            if (sym < 0) return -1;
            if (sym < 16) lens[i++] = (unsigned char)sym;
            else {
                if (sym == 16) { if (i == 0) return -1; val = lens[i - 1], rep = 3 + get_bits(&r, 2); }
                else if (sym == 17) rep = 3 + get_bits(&r, 3);
                else rep = 11 + get_bits(&r, 7);
                if (i + rep > hlit + hdist) return -1;
                while (rep--) lens[i++] = (unsigned char)val;
            }
        }
        for (;;) {
            int sym = get_symbol(&r, lens, hlit);
            if (sym < 0) return -1;
            if (sym == 256) break;
            if (sym < 256) {
                if (o == cap) return -1;
                out[o++] = (unsigned char)sym;
                continue;
            }
            int len = lbase[sym - 257] + get_bits(&r, lextra[sym - 257]);
            int dc = get_symbol(&r, lens + hlit, hdist);
            if (dc < 0) return -1;
            size_t dist = (size_t)(dbase[dc] + get_bits(&r, dextra[dc]));
            if (dist > o || o + (size_t)len > cap) return -1;
            for (int k = 0; k < len; k++, o++) out[o] = out[o - dist];
        }
    }
    return (long)o;
}

static void test_deflate(void) {
    size_t n = 200000;
    unsigned char *data = malloc(n), *back = malloc(n);
    for (size_t i = 0; i < n; i++) /* runs, repeats at many distances, and noise */
        data[i] = i % 5000 < 2000 ? (unsigned char)(i / 700) : i % 7 == 0 ? (unsigned char)(frand() * 100) : data[i - 1 - (i % 300)];
    size_t z_len;
    unsigned char *z = deflate_bytes(data, n, &z_len);
    long got = z ? inflate_all(z, z_len, back, n) : -1;
    check(got == (long)n && memcmp(data, back, n) == 0 && z_len < n / 4,
          "deflate: 200 kB of runs, repeats and noise come back through an inflater written from RFC 1951 (%zu bytes)", z_len);
    free(z);
    z = deflate_bytes(data, 1, &z_len);
    got = z ? inflate_all(z, z_len, back, 1) : -1;
    check(got == 1 && back[0] == data[0], "deflate: one byte");
    free(z), free(data), free(back);
}

/* special tokens: the automaton against trying every token at every byte, longest first (smaller id
 * between identical ones), over random tokens and texts of a 3-letter alphabet (many shared prefixes,
 * suffixes and overlaps) */

static int longest_special_by_hand(const unsigned char *const *piece, const int *len, int n, const unsigned char *s,
                                   size_t left) {
    int best = -1;
    for (int id = 0; id < n; id++)
        if ((size_t)len[id] <= left && memcmp(s, piece[id], (size_t)len[id]) == 0 &&
            (best < 0 || len[id] > len[best]))
            best = id;
    return best;
}

static void test_special_matcher(void) {
    enum { N = 60, MAX_LEN = 7, TEXT = 400 };
    unsigned char storage[N][MAX_LEN], text[TEXT];
    const unsigned char *piece[N];
    int len[N], ids[N], at[TEXT], bad = 0;
    for (int round = 0; round < 50; round++) {
        int n = 1 + round % N;
        for (int id = 0; id < n; id++) {
            len[id] = 1 + (int)((frand() + 1.0f) * 0.5f * MAX_LEN) % MAX_LEN;
            for (int k = 0; k < len[id]; k++) storage[id][k] = (unsigned char)('a' + (int)((frand() + 1.0f) * 1.5f) % 3);
            piece[id] = storage[id];
            ids[id] = id;
        }
        SpecialMatcher m;
        if (specials_build(&m, ids, n, piece, len) != 0) {
            check(0, "specials_build: out of memory");
            return;
        }
        for (int i = 0; i < TEXT; i++) text[i] = (unsigned char)('a' + (int)((frand() + 1.0f) * 1.5f) % 3);
        specials_longest_at(&m, text, TEXT, at);
        for (int i = 0; i < TEXT; i++)
            bad += at[i] != longest_special_by_hand(piece, len, n, text + i, TEXT - i);
        specials_free(&m);
    }
    check(bad == 0, "special tokens: the automaton finds the longest token at each of 50 x 400 bytes (%d wrong)", bad);
}

/* torch.topk's choice among tied scores (tests/data/router_ties.txt, from tools/make_router_ties.py): the
experts moe.c routes to must be the very same set. */
static void test_router_ties(void) {
    FILE *f = fopen("tests/data/router_ties.txt", "r");
    if (!f) {
        check(0, "router ties: tests/data/router_ties.txt is readable");
        return;
    }
    char line[16384];
    int cases = 0, same = 0;
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#') continue;
        char *p = line, *end;
        int n = (int)strtol(p, &end, 10), k = (int)strtol(end, &p, 10), want[64], got[64];
        float scores[512];
        for (int i = 0; i < n; i++) scores[i] = strtof(p, &p);
        p = strchr(p, '|') + 1;
        for (int i = 0; i < k; i++) want[i] = (int)strtol(p, &p, 10);
        router_top_k(scores, NULL, n, k, got);
        int all = 1;
        for (int i = 0; i < k; i++) {
            int found = 0;
            for (int j = 0; j < k; j++) found |= got[j] == want[i];
            all &= found;
        }
        same += all, cases++;
    }
    fclose(f);
    check(cases >= 300 && same == cases, "router ties: the experts chosen among tied scores are torch.topk's, in %d of %d cases",
          same, cases);
}

/* --explore's rows: a stored weight reads back within m/510, one left out is below the threshold, and a row
 * that is not a distribution over the mask's keys is refused */
static void test_explore_rows(void) {
    AttentionSpec a = {8, 1.0f, 0.0f, MASK_SLIDING, 4, 0, NULL, KERNEL_NAIVE, 0, KV_F32}; /* query 9 sees keys 6 .. 9 */
    float row[10] = {0, 0, 0, 0, 0, 0, 0.5f, 0.25f, 0.2495f, 0.0005f}, m;
    unsigned char bitmap[4], codes[16];
    char err[128];
    int n;
    int rc = explore_quantise_row(row, &a, 9, 1e-3f, bitmap, codes, &m, &n, err, sizeof err);
    check(rc == 0 && m == 0.5f && n == 3 && bitmap[0] == 7 && codes[0] == 255 && codes[1] == 128 && codes[2] == 127,
          "explore: a row is stored as its largest weight, a bitmap of the keys kept, and 8-bit codes (%d)", rc);
    float bad[10];
    memcpy(bad, row, sizeof row);
    bad[7] = NAN;
    check(explore_quantise_row(bad, &a, 9, 1e-3f, bitmap, codes, &m, &n, err, sizeof err) != 0 && strstr(err, "finite"),
          "explore: a weight that is not finite is refused (%s)", err);
    memcpy(bad, row, sizeof row);
    bad[2] = 0.25f, bad[7] = 0.0f;
    check(explore_quantise_row(bad, &a, 9, 1e-3f, bitmap, codes, &m, &n, err, sizeof err) != 0 && strstr(err, "hides"),
          "explore: weight on a key the mask hides is refused (%s)", err);
    memcpy(bad, row, sizeof row);
    bad[6] = 0.4f;
    check(explore_quantise_row(bad, &a, 9, 1e-3f, bitmap, codes, &m, &n, err, sizeof err) != 0 && strstr(err, "sum"),
          "explore: a row that does not sum to 1 is refused (%s)", err);

    /* a causal row of 300 random weights: every stored one within m/510, every other below the threshold */
    enum { N = 300 };
    AttentionSpec causal = {8, 1.0f, 0.0f, MASK_CAUSAL, 0, 0, NULL, KERNEL_NAIVE, 0, KV_F32};
    static float w[N];
    static unsigned char big_codes[N], big_bitmap[(N + 7) / 8];
    float sum = 0.0f;
    for (int j = 0; j < N; j++) sum += w[j] = expf(4.0f * frand());
    for (int j = 0; j < N; j++) w[j] /= sum;
    rc = explore_quantise_row(w, &causal, N - 1, 1e-3f, big_bitmap, big_codes, &m, &n, err, sizeof err);
    int ok = rc == 0, k = 0, left_out = 0;
    for (int j = 0; ok && j < N; j++)
        if (big_bitmap[j / 8] >> (j % 8) & 1) ok &= fabsf(big_codes[k++] * m / 255.0f - w[j]) <= m / 510.0f + 1e-7f;
        else ok &= w[j] < 1e-3f || w[j] < m / 510.0f, left_out++;
    check(ok && k == n && left_out > 0 && n > 0, "explore: 300 random weights: %d stored within m/510, %d below the threshold", n,
          left_out);
}

/* ------------------------------------------------------------------------------------------- */

/* the matches of pattern in text, as "start-end " pairs in buf ("!" + the error if it does not compile) */
static const char *matches_of(const char *pattern, const char *text, size_t len, char *buf, size_t size) {
    char err[256];
    Regex *re = regex_compile(pattern, strlen(pattern), err, sizeof err);
    if (!re) {
        snprintf(buf, size, "!%s", err);
        return buf;
    }
    RegexScratch *sc = regex_scratch_new();
    RegexIterator it = {0, 0, 0};
    size_t a, b, used = 0;
    buf[0] = '\0';
    while (regex_next_match(re, sc, (const unsigned char *)text, len, &it, &a, &b) > 0 && used + 24 < size)
        used += (size_t)snprintf(buf + used, size - used, "%zu-%zu ", a, b);
    regex_scratch_free(sc);
    regex_free(re);
    return buf;
}

static int matches_are(const char *pattern, const char *text, const char *want) {
    char buf[512];
    return strcmp(matches_of(pattern, text, strlen(text), buf, sizeof buf), want) == 0;
}

static int refuses(const char *pattern, const char *why) {
    char buf[512];
    matches_of(pattern, "", 0, buf, sizeof buf);
    return buf[0] == '!' && strstr(buf, why) != NULL;
}

static void test_regex(void) {
    check(matches_are("(a|ab)(c|bcd)", "abcd", "0-4 "), "regex: alternatives are tried left to right, backtracking into the first");
    check(matches_are("x*", "axxb", "0-0 1-3 4-4 "),
          "regex: an empty match right after a match is skipped, as the tokenizers library's Oniguruma iterator does");
    check(matches_are("a+?b|a", "aab", "0-3 "), "regex: a lazy repeat grows until the rest matches");
    check(matches_are("a++a|b", "aaab", "3-4 "), "regex: a possessive repeat gives nothing back");
    check(matches_are("(?>a+)b|a+", "aaa", "0-3 "), "regex: an atomic group keeps its first match");
    check(matches_are("(?i:'s|'t)", "'S 'T 'ſ 's", "0-2 3-5 6-9 10-12 "),
          "regex: (?i:...) folds case, the long s (U+017F) included");
    check(matches_are("(?i)k", "kK\xE2\x84\xAA", "0-1 1-2 2-5 "), "regex: (?i) to the end of the group; the Kelvin sign folds to k");
    check(matches_are("[^\\s\\p{L}]+", "ab, \xE4\xB8\xAD!", "2-3 7-8 "), "regex: a negated class with \\s and \\p{L}");
    check(matches_are("\\p{Han}+|\\p{Lu}\\p{Ll}*", "\xE4\xB8\xAD\xE6\x96\x87" "Ab", "0-6 6-8 "), "regex: a script and categories");
    check(matches_are("\\s+$", "a  \n b ", "1-3 6-7 "), "regex: $ matches before each newline and at the end");
    check(matches_are("(?=(\\d{3})+(?!\\d))", "1234567", "1-1 4-4 "), "regex: lookahead that matches empty (digit groups)");
    check(matches_are("\\bfoo\\b", "foo foobar barfoo foo", "0-3 18-21 "), "regex: word boundaries");
    check(matches_are("x{2,3}|y{,1}z|a{", "xxxxyzza{", "0-3 4-6 6-7 7-9 "), "regex: counted repeats, {,m}, and a brace that is no repeat");
    check(matches_are("(?:ab)*c", "ababcabc", "0-5 5-8 "), "regex: a group repeated");
    check(matches_are("(?:a*)*b", "aab", "0-3 "), "regex: a loop whose body can match empty still ends");
    const char *refused[][2] = {{"(?<=a)b", "lookbehind"}, {"(a)\\1", "backreference"}, {"[a[b]]", "nested"},
                                {"[a&&b]", "intersection"}, {"\\p{Klingon}", "property"}, {"(?m)a", "flag"}, {"a)", "unmatched"},
                                {"(a", "missing"}, {"[a", "unterminated"}, {"a**", "nested quantifier"}, {"\\X", "escape"},
                                {"x{3,2}", "m < n"}, {"\xff", "UTF-8"}, {"^*", "anchor"}};
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
        check(refuses(refused[i][0], refused[i][1]), "regex: %s is refused, naming %s",
              (unsigned char)refused[i][0][0] < 0x80 ? refused[i][0] : "a byte that is not UTF-8", refused[i][1]);
    /* (a*)*b tries every way to cut a run of a's: exponential, so the search gives up instead of hanging */
    char err[256];
    Regex *slow = regex_compile("(a*)*b", 6, err, sizeof err);
    RegexScratch *sc = regex_scratch_new();
    size_t a, b;
    const char *as = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaac";
    check(slow && sc && regex_search(slow, sc, (const unsigned char *)as, strlen(as), 0, &a, &b) == REGEX_TOO_SLOW,
          "regex: a search that backtracks without end stops with REGEX_TOO_SLOW");
    regex_free(slow);
    regex_scratch_free(sc);
    /* a megabyte of letters through a greedy run and a general loop: the backtracking lives on the heap */
    size_t n = 1 << 20;
    char *big = malloc(n + 1), buf[64];
    for (size_t i = 0; i < n; i++) big[i] = "ab"[i % 2];
    big[n] = '\0';
    check(strcmp(matches_of("\\p{L}+(?!\\S)|(?:a|b)+c", big, n, buf, sizeof buf), "0-1048576 ") == 0,
          "regex: a 1 MiB run of letters matches without deep recursion");
    free(big);
}

/* A byte-level tokenizer record with one piece, the given pretokenizer, and Split steps after the merges. */
static size_t pack_split_record(unsigned char *buf, unsigned pretokenizer, const char **patterns, const unsigned *behaviors,
                                int n_steps) {
    static const TestPiece one[] = {{"a", 0, PIECE_NORMAL}};
    size_t size = pack_tokenizer(buf, 1, 0, -1, one, 1);
    unsigned char *p = buf + 4;
    put_u32(&p, pretokenizer);
    p = buf + size;
    if (n_steps > 0) put_u32(&p, (uint32_t)n_steps);
    for (int i = 0; i < n_steps; i++) {
        put_u32(&p, behaviors[i] & 0xFF);
        put_u32(&p, behaviors[i] >> 8);
        put_u32(&p, (uint32_t)strlen(patterns[i]));
        memcpy(p, patterns[i], strlen(patterns[i]));
        p += strlen(patterns[i]);
    }
    return (size_t)(p - buf);
}

/* the words of text as "word|word|" */
static const char *words_of(const Tokenizer *t, const char *text, char *buf, size_t size) {
    size_t spans[512], used = 0;
    int n = tokenizer_pretokenize(t, text, strlen(text), spans);
    buf[0] = '\0';
    for (int i = 0; i < n && used + strlen(text) + 2 < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%.*s|", (int)(spans[2 * i + 1] - spans[2 * i]), text + spans[2 * i]);
    return buf;
}

static void test_split_steps(void) {
    static unsigned char buf[4096];
    char err[256], words[512];
    Tokenizer t;
    struct {
        unsigned behavior;
        const char *pattern, *want, *name;
    } cases[] = {
        {SPLIT_ISOLATED, "\\d", "ab|1|2|cd|3|", "Isolated"},
        {SPLIT_REMOVED, "\\d+", "ab|cd|", "Removed"},
        {SPLIT_MERGED_WITH_PREVIOUS, "\\d+", "ab12|cd3|", "MergedWithPrevious"},
        {SPLIT_MERGED_WITH_NEXT, "\\d+", "ab|12cd|3|", "MergedWithNext"},
        {SPLIT_CONTIGUOUS, "\\d", "ab|12|cd|3|", "Contiguous"},
        {SPLIT_REMOVED | SPLIT_INVERT << 8, "\\d+", "12|3|", "Removed, inverted"},
        {SPLIT_MERGED_WITH_NEXT | SPLIT_INVERT << 8, "\\d+", "ab12|cd3|", "MergedWithNext, inverted"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int ok = tokenizer_load(&t, buf, pack_split_record(buf, PRETOKENIZE_SPLITS, &cases[i].pattern, &cases[i].behavior, 1), 1,
                                err, sizeof err) == 0;
        check(ok && strcmp(words_of(&t, "ab12cd3", words, sizeof words), cases[i].want) == 0,
              "split step %s: \"ab12cd3\" -> %s (got %s)", cases[i].name, cases[i].want, ok ? words : err);
        tokenizer_free(&t);
    }
    const char *two[] = {"\\p{N}", tokenizer_known_regex[PRETOKENIZE_GPT2]};
    unsigned isolated[] = {SPLIT_ISOLATED, SPLIT_ISOLATED};
    int ok = tokenizer_load(&t, buf, pack_split_record(buf, PRETOKENIZE_SPLITS, two, isolated, 2), 1, err, sizeof err) == 0;
    check(ok && strcmp(words_of(&t, "a 123 b", words, sizeof words), "a| |1|2|3| b|") == 0,
          "split steps in sequence: digits one by one, then the GPT-2 regex on each piece (StarCoder)");
    tokenizer_free(&t);
    const char *bad[] = {"(?<=x)"};
    check(tokenizer_load(&t, buf, pack_split_record(buf, PRETOKENIZE_SPLITS, bad, isolated, 1), 1, err, sizeof err) != 0 &&
              strstr(err, "step 0") && strstr(err, "lookbehind"),
          "split step: a regex that does not compile is a one-line load error (%s)", err);
}

/* The hand-written GPT-2 / Llama 3 / Qwen2 matchers split every text exactly as the regex they stand for. */
static void test_fast_pretokenizers(void) {
    static unsigned char buf[4096];
    static const char *alphabet[] = {"a", "B", "z", "s", "S", "t", "l", "L", "d", "'", " ", "  ", "\t", "\n", "\r", "0",
                                     "7", "!", ".", "-", "/", "\xC5\xBF", "\xC3\xA9", "\xE4\xB8\xAD", "\xE2\x85\xA3",
                                     "\xD9\xA3", "\xC2\xA0", "\xE3\x80\x80", "\xF0\x9F\x98\x80", "\xCC\x81", "\xFF", "\xC3"};
    char err[256], text[128], fast[1024], slow[1024];
    for (int which = PRETOKENIZE_GPT2; which <= PRETOKENIZE_QWEN2; which++) {
        Tokenizer t, regex_only;
        size_t size = pack_split_record(buf, (unsigned)which, NULL, NULL, 0);
        if (tokenizer_load(&t, buf, size, 1, err, sizeof err) || tokenizer_load(&regex_only, buf, size, 1, err, sizeof err)) {
            check(0, "pre-tokenizer %d: record loads (%s)", which, err);
            continue;
        }
        tokenizer_use_regex_only(&regex_only);
        int agree = 0, total = 20000;
        for (int k = 0; k < total; k++) {
            size_t len = 0, pieces = frand() * 8 + 9;
            for (size_t j = 0; j < pieces; j++) {
                const char *c = alphabet[(rng_state >> 8) % (sizeof alphabet / sizeof *alphabet)];
                frand();
                memcpy(text + len, c, strlen(c));
                len += strlen(c);
            }
            text[len] = '\0';
            agree += strcmp(words_of(&t, text, fast, sizeof fast), words_of(&regex_only, text, slow, sizeof slow)) == 0;
        }
        check(agree == total, "pre-tokenizer %s: the hand-written matcher and the regex split %d/%d random texts alike",
              which == PRETOKENIZE_GPT2 ? "GPT-2" : which == PRETOKENIZE_LLAMA3 ? "Llama 3" : "Qwen2", agree, total);
        tokenizer_free(&t);
        tokenizer_free(&regex_only);
    }
}

/* tests/unit --regex-matches: for each input line "PATTERN_HEX TEXT_HEX", prints the byte spans of every match
 * ("start,end" separated by spaces) or "ERR reason" (tests/test_regex.py compares them with another engine) */
static int regex_matches_tool(void) {
    static char line[1 << 20];
    static unsigned char pattern[1 << 19], text[1 << 19];
    RegexScratch *sc = regex_scratch_new();
    while (fgets(line, sizeof line, stdin)) {
        size_t np = 0, nt = 0;
        char *p = line;
        unsigned v;
        for (; p[0] && p[1] && p[0] != ' ' && sscanf(p, "%2x", &v) == 1; p += 2) pattern[np++] = (unsigned char)v;
        for (p += *p == ' '; p[0] && p[1] && p[0] != '\n' && sscanf(p, "%2x", &v) == 1; p += 2) text[nt++] = (unsigned char)v;
        char err[256];
        Regex *re = regex_compile((const char *)pattern, np, err, sizeof err);
        if (!re) {
            printf("ERR %s\n", err);
            continue;
        }
        RegexIterator it = {0, 0, 0};
        size_t a, b;
        for (int first = 1; regex_next_match(re, sc, text, nt, &it, &a, &b) > 0; first = 0) printf(first ? "%zu,%zu" : " %zu,%zu", a, b);
        printf("\n");
        regex_free(re);
    }
    regex_scratch_free(sc);
    return 0;
}

/* A recurrent layer's state: zeros at first, the same bytes whatever is written, copied whole (a forked
 * sequence goes on from the same state), zeros again after a reset. */
static void test_recurrent_state(void) {
    StateShape shape = {3 * 8, 8 * 16, 8};
    StateLayer a, b;
    check(statelayer_init(&a, shape) == 0 && statelayer_init(&b, shape) == 0, "state: allocated");
    check(statelayer_bytes(&a) == (3 * 8 + 8 * 16 + 8) * sizeof(float) && statelayer_bytes_of(shape) == statelayer_bytes(&a),
          "state: bytes = (window + state + ffn) floats");
    int zero = 1;
    for (size_t i = 0; i < shape.window; i++) zero &= a.window[i] == 0.0f;
    for (size_t i = 0; i < shape.state; i++) zero &= a.state[i] == 0.0f;
    for (size_t i = 0; i < shape.ffn; i++) zero &= a.ffn[i] == 0.0f;
    check(zero, "state: starts at zero");
    for (size_t i = 0; i < shape.window; i++) a.window[i] = frand();
    for (size_t i = 0; i < shape.state; i++) a.state[i] = frand();
    for (size_t i = 0; i < shape.ffn; i++) a.ffn[i] = frand();
    statelayer_copy(&b, &a);
    check(!memcmp(a.window, b.window, statelayer_bytes(&a)) && b.state == b.window + shape.window && b.ffn == b.state + shape.state,
          "state: a copy holds the same window, state and ffn parts");
    statelayer_reset(&a);
    zero = 1;
    for (size_t i = 0; i < shape.window + shape.state + shape.ffn; i++) zero &= a.window[i] == 0.0f;
    check(zero && b.state[3] != 0.0f, "state: a reset clears it, the copy keeps its own");
    statelayer_free(&a);
    statelayer_free(&b);
    StateLayer none;
    check(statelayer_init(&none, (StateShape){0, 0, 0}) == 0 && statelayer_bytes(&none) == 0 && !none.window,
          "state: an attention layer's is empty");
}

/* The causal convolution gives the same bits whether the tokens come in one chunk, one by one, or in chunks
 * shorter than its window, and equals the sum written out here. */
static void test_causal_conv(void) {
    enum { C = 5, K = 4, N = 9 };
    float w[C * K], b[C], x[N * C], whole[N * C], parts[N * C], win_a[(K - 1) * C] = {0}, win_b[(K - 1) * C] = {0};
    for (int i = 0; i < C * K; i++) w[i] = frand();
    for (int i = 0; i < C; i++) b[i] = frand();
    for (int i = 0; i < N * C; i++) x[i] = frand();
    Tensor weight = {w, DTYPE_F32, C, K, 1, NULL}, bias = {b, DTYPE_F32, 1, C, 1, NULL};
    causal_conv_silu(whole, x, N, C, win_a, &weight, &bias);
    int chunks[] = {1, 2, 1, 3, 2}, at = 0;
    for (int i = 0; i < 5; i++) {
        causal_conv_silu(parts + at * C, x + at * C, chunks[i], C, win_b, &weight, &bias);
        at += chunks[i];
    }
    double worst = 0;
    for (int t = 0; t < N; t++)
        for (int c = 0; c < C; c++) {
            double sum = b[c];
            for (int k = 0; k < K; k++)
                if (t - (K - 1) + k >= 0) sum += (double)w[c * K + k] * x[(t - (K - 1) + k) * C + c];
            double want = sum / (1.0 + exp(-sum));
            if (fabs(want - whole[t * C + c]) > worst) worst = fabs(want - whole[t * C + c]);
        }
    check(!memcmp(whole, parts, sizeof whole) && !memcmp(win_a, win_b, sizeof win_a),
          "causal conv: chunks of 1, 2, 1, 3, 2 tokens give the bits of one chunk of 9, and the same window");
    check(worst < 1e-5, "causal conv: equals the sum of the last K inputs, then SiLU (max err %.1e)", worst);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--regex-matches") == 0) return regex_matches_tool();
    test_kv_types();
    test_paged_cache();
    test_single_row_cache();
    test_recurrent_state();
    test_causal_conv();
    test_rolling_buffer();
    test_shared_blocks();
    test_head_mapping();
    test_attention();
    test_attention_split();
    test_attention_rows();
    test_cross_attention();
    test_ops();
    test_router_ties();
    test_matmul();
    test_packed_stack();
    test_parallel();
    test_utf8();
    test_tokenizer_records();
    test_sampler();
    test_deflate();
    test_explore_rows();
    test_special_matcher();
    test_regex();
    test_split_steps();
    test_fast_pretokenizers();
    printf("unit: %d failed\n", failures);
    return failures ? 1 : 0;
}
