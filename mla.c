/* mla.c - multi-head latent attention (DeepSeek-V2, 2024; DeepSeek-V3 and R1, Kimi K2, Moonlight).
 *
 * MHA caches a key and a value for every head; MLA caches one latent row per position and gets each head's
 * key and value back from it through that head's up-projections (H heads, r = kv_rank):
 *
 *   queries    q_h = [q_nope_h | q_rope_h]  = W_q x, or W_qb rmsnorm(W_qa x)   (a low-rank pair: V2, V3)
 *   latent     [c | k_rope]                 = W_kva x,  c <- rmsnorm(c)        (the cache: r + rope floats)
 *   positions  RoPE on every q_rope_h and on k_rope, one rotary key shared by all heads (as in MQA)
 *   keys       k_h,j = [W_kb[h] c_j | k_rope_j]
 *   values     v_h,j = W_vb[h] c_j
 *   attention  o_h = sum_j softmax_j(q_h . k_h,j * scale) v_h,j,   y = W_o [o_0 | ... | o_H-1]
 *
 * A key's nope part and a value exist only as products with the latent, and matrix products associate:
 *   q_h . k_h,j = (W_kb[h]^T q_nope_h) . c_j + q_rope_h . k_rope_j
 *   o_h         = W_vb[h] (sum_j w_j c_j)
 * so there are two exact forms of the same attention (--mla):
 *   expanded   decompress every k_h,j and v_h,j, then ordinary attention             attend_expanded
 *              (what the reference code does; it pays r (nope + v) per latent and head)
 *   absorbed   W_kb[h] folded into the query, W_vb[h] applied after the weighted sum:  attend_absorbed
 *              scores and sums in latent space, each latent read once for all heads -- MQA with one kv head
 *              of r + rope dimensions (DeepSeek's own inference, FlashMLA)
 * The exporter splits kv_b_proj into W_kb and W_vb, stacked per head (tensors.def). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blocks.h"

#define MLA_TOKENS 64 /* absorbed: tokens whose latent queries are held at once */
#define MLA_PASS 256  /* expanded: tokens that share one decompression of each span */
#define MLA_SPAN 128  /* expanded: positions decompressed at once (a multiple of KV_BLOCK_TOKENS) */
#define SUM_COLUMNS 64 /* absorbed: latent columns and heads summed at a time (a 16 KiB block, in L1) */
#define SUM_HEADS 64

/* The working space, sized for the widest latent layer (H heads, r = kv_rank) */
struct LatentScratch {
    float *latent;      /* [T][r + rope] this pass's cache rows: c_kv | k_rope */
    float *q_low;       /* [T][q_rank] the queries before q_b */
    /* absorbed form */
    float *q_latent;    /* [MLA_TOKENS][H][r + rope] each head's query against a whole cache row: W_kb^T q_nope | q_rope */
    float *sums;        /* [H][MLA_TOKENS][r] each head's weighted sum of latents */
    float *heads;       /* [H][MLA_TOKENS][v_dim] W_vb of the sums, before the heads are put side by side */
    /* expanded form */
    float *queries;     /* [H][MLA_PASS][nope + rope] each head's queries */
    float *span;        /* [MLA_SPAN][r] the latents of a span of positions */
    float *span_nope;   /* [MLA_SPAN][nope] one head's k_nope, as decompressed */
    float *span_keys;   /* [H][MLA_SPAN][nope + rope] every head's keys: k_nope | k_rope */
    float *span_values; /* [H][MLA_SPAN][v_dim] */
    float *span_scores; /* [H][MLA_SPAN][n <= MLA_PASS] q.k of every key of the span and every token of the pass */
    OnlineSoftmax *states; /* [MLA_PASS][H] each (token, head)'s running softmax */
};

/* One attention pass of a latent layer: rows first .. first + n - 1 of the forward pass, of one sequence, at
 * positions pos + first .. (pos: the position of row 0 were the sequence's run to start there), whose rows
 * are in its cache */
typedef struct {
    const LatentAttentionConfig *a;
    const LatentAttentionWeights *w;
    const AttentionSpec *spec;
    const KVLayer *cache;
    RunState *s;
    LatentScratch *x;
    float *out; /* [n_pass][H * v_dim] of the forward pass */
    int first, n, pos;
    int lo, hi;        /* expanded: the span of positions decompressed */
    const int *row_of; /* expanded: span row of position lo + i, -1 if not held */
} Pass;

static int q_width(const LatentAttentionConfig *a) { return a->nope_dim + a->rope.dim; } /* per head */
static int row_width(const LatentAttentionConfig *a) { return a->kv_rank + a->rope.dim; } /* a cache row */

/* the query of head h of token t: [q_nope | q_rope] */
static const float *query(const Pass *p, int t, int h) {
    return p->s->q + ((size_t)(p->first + t) * p->a->n_heads + h) * q_width(p->a);
}

/* ---------------------------------------------------------------------------------------------
 * projections */

/* q [n][H][nope + rope] and the latent rows [n][r + rope] from the normed input x (s->xb):
 *   q = W_q x  (DeepSeek-V2-Lite)   or   q = W_qb rmsnorm(W_qa x)  (V2, V3: q_rank 1536)
 *   [c | k_rope] = W_kva x,  c <- rmsnorm(c) */
static void project(const LatentAttentionConfig *a, const LatentAttentionWeights *w, RunState *s, int n) {
    LatentScratch *x = s->mla;
    if (a->q_rank) {
        matmul_many(&s->scratch, (Projection[]){{x->q_low, &w->wq_a}, {x->latent, &w->wkv_a}}, 2, s->xb, n);
        for (int t = 0; t < n; t++)
            rmsnorm(x->q_low + (size_t)t * a->q_rank, x->q_low + (size_t)t * a->q_rank, w->q_a_norm.data, a->q_rank,
                    a->norm_eps);
        matmul(&s->scratch, s->q, x->q_low, &w->wq_b, n);
    } else {
        matmul_many(&s->scratch, (Projection[]){{s->q, &w->wq}, {x->latent, &w->wkv_a}}, 2, s->xb, n);
    }
    for (int t = 0; t < n; t++) {
        float *c = x->latent + (size_t)t * row_width(a);
        rmsnorm(c, c, w->kv_a_norm.data, a->kv_rank, a->norm_eps);
    }
}

/* RoPE on the rope part of every query head and on the shared k_rope, row t at its position pos[t]. The
 * exporter permutes DeepSeek's interleaved pairs into attn.c's halves (export.py interleaved_to_halves). */
static void rotate(const LatentAttentionConfig *a, const float *inv_freq, RunState *s, const Batch *b) {
    if (a->rope.dim == 0) return;
    for (int t = 0; t < b->n; t++) {
        rope_heads(s->q + (size_t)t * a->n_heads * q_width(a) + a->nope_dim, a->n_heads, q_width(a), a->rope.dim, b->pos[t],
                   inv_freq, a->rope.attn_factor);
        rope_heads(s->mla->latent + (size_t)t * row_width(a) + a->kv_rank, 1, a->rope.dim, a->rope.dim, b->pos[t], inv_freq,
                   a->rope.attn_factor);
    }
}

/* ---------------------------------------------------------------------------------------------
 * the absorbed form */

/* out[n] += w * v */
static void add_scaled(float *out, float w, const float *v, int n) {
    for (int i = 0; i < n; i++) out[i] += w * v[i];
}

/* W_kb[h] folded into the queries: q_latent[t][h] = [W_kb[h]^T q_nope_h,t | q_rope_h,t]  ([nope][r]^T [nope] ->
 * [r]), so that a head's score against position j is one dot product with the cached row [c_j | k_rope_j].
 * A row of W_kb[h] at a time, for all tokens, so that each weight is converted once. Items: heads. */
static void absorb_queries(void *arg, int h0, int h1) {
    const Pass *p = arg;
    const LatentAttentionConfig *a = p->a;
    int r = a->kv_rank, H = a->n_heads;
    float row[MAX_LATENT_RANK];
    for (int h = h0; h < h1; h++) {
        Tensor wk = tensor_matrix(&p->w->wk_b, h);
        for (int t = 0; t < p->n; t++) {
            float *q_latent = p->x->q_latent + ((size_t)t * H + h) * row_width(a);
            memset(q_latent, 0, (size_t)r * sizeof(float));
            memcpy(q_latent + r, query(p, t, h) + a->nope_dim, (size_t)a->rope.dim * sizeof(float));
        }
        for (int i = 0; i < a->nope_dim; i++) {
            const float *w_row = row;
            if (wk.dtype == DTYPE_F32) w_row = (const float *)wk.data + (size_t)i * r;
            else tensor_row(row, &wk, i);
            for (int t = 0; t < p->n; t++)
                add_scaled(p->x->q_latent + ((size_t)t * H + h) * row_width(a), query(p, t, h)[i], w_row, r);
        }
    }
}

/* The scores of heads h0 .. h1-1 of token t, for its visible keys in order, into scores[h][k] (stride apart):
 *   s_h,j = q_latent_h . [c_j | k_rope_j] * scale
 * The keys go in tiles of consecutive rows of one cache block, each tile one product of its rows with the
 * heads' latent queries: every cached row is read once for all the heads (MQA with one kv head of r + rope). */
static void latent_scores(const Pass *p, int t, int h0, int h1, float *scores, int stride) {
    const LatentAttentionConfig *a = p->a;
    int n_heads = h1 - h0, k = 0, tile = 0, first = 0, last_slot = -2;
    Tensor queries = {p->x->q_latent + ((size_t)t * a->n_heads + h0) * row_width(a), DTYPE_F32, n_heads, row_width(a), 1, NULL};
    float tile_scores[KV_BLOCK_TOKENS * MAX_HEADS];
    VisibleKeys v = visible_keys(p->spec, p->pos + p->first + t);
    FOR_EACH_VISIBLE_KEY(v, j) {
        int slot = kvlayer_slot_of(p->cache, j);
        int joins = tile > 0 && slot == last_slot + 1 && slot / KV_BLOCK_TOKENS == last_slot / KV_BLOCK_TOKENS;
        if (tile > 0 && !joins) { /* the tile ends: score it */
            matmul_serial(tile_scores, kvlayer_key(p->cache, first), &queries, tile);
            for (int i = 0; i < tile; i++)
                for (int h = 0; h < n_heads; h++) scores[(size_t)(h0 + h) * stride + k - tile + i] = tile_scores[i * n_heads + h] * a->scale;
            tile = 0;
        }
        if (tile == 0) first = j;
        tile++, k++, last_slot = slot;
    }
    matmul_serial(tile_scores, kvlayer_key(p->cache, first), &queries, tile);
    for (int i = 0; i < tile; i++)
        for (int h = 0; h < n_heads; h++) scores[(size_t)(h0 + h) * stride + k - tile + i] = tile_scores[i * n_heads + h] * a->scale;
}

/* Attention in latent space for heads h0 .. h1-1 (items: heads, a group per thread):
 *   w = softmax(s),  sums_h = sum_j w_j c_j
 * The sums go SUM_COLUMNS latent columns and SUM_HEADS heads at a time, in a block that stays in L1 while the
 * rows stream past. The weights stay in s->scores (the observer's rows, as the naive kernel leaves them). */
static void attend_latent(void *arg, int h0, int h1) {
    const Pass *p = arg;
    const LatentAttentionConfig *a = p->a;
    int r = a->kv_rank, stride = p->s->scores_stride;
    float *scores = p->s->scores, block[SUM_HEADS][SUM_COLUMNS];
    for (int t = 0; t < p->n; t++) {
        latent_scores(p, t, h0, h1, scores, stride);
        VisibleKeys v = visible_keys(p->spec, p->pos + p->first + t);
        int n_keys = visible_count(p->spec, p->pos + p->first + t);
        for (int h = h0; h < h1; h++) softmax(scores + (size_t)h * stride, n_keys);
        for (int g = h0; g < h1; g += SUM_HEADS)
            for (int c = 0; c < r; c += SUM_COLUMNS) {
                int heads = h1 - g < SUM_HEADS ? h1 - g : SUM_HEADS, width = r - c < SUM_COLUMNS ? r - c : SUM_COLUMNS, k = 0;
                memset(block, 0, sizeof block);
                FOR_EACH_VISIBLE_KEY(v, j) {
                    const float *row = kvlayer_key(p->cache, j) + c;
                    for (int h = 0; h < heads; h++) add_scaled(block[h], scores[(size_t)(g + h) * stride + k], row, width);
                    k++;
                }
                for (int h = 0; h < heads; h++)
                    memcpy(p->x->sums + ((size_t)(g + h) * MLA_TOKENS + t) * r + c, block[h], (size_t)width * sizeof(float));
            }
    }
}

/* The absorbed form for up to MLA_TOKENS tokens: absorb W_kb, attend in latent space, then each head's
 * output o_h = W_vb[h] (sum_j w_j c_j), put side by side */
static void attend_absorbed(Pass *p) {
    const LatentAttentionConfig *a = p->a;
    int H = a->n_heads, r = a->kv_rank, dv = a->v_dim, threads = parallel_threads();
    long long visible = visible_count(p->spec, p->pos + p->first + p->n - 1);
    parallel_for(H, 1, (long long)H * p->n * a->nope_dim * r, absorb_queries, p);
    parallel_for(H, (H + threads - 1) / threads, 2LL * H * p->n * visible * (r + row_width(a)), attend_latent, p);
    for (int h = 0; h < H; h++) {
        Tensor wv = tensor_matrix(&p->w->wv_b, h);
        matmul(&p->s->scratch, p->x->heads + (size_t)h * MLA_TOKENS * dv, p->x->sums + (size_t)h * MLA_TOKENS * r, &wv, p->n);
    }
    for (int t = 0; t < p->n; t++)
        for (int h = 0; h < H; h++)
            memcpy(p->out + ((size_t)(p->first + t) * H + h) * dv, p->x->heads + ((size_t)h * MLA_TOKENS + t) * dv,
                   (size_t)dv * sizeof(float));
}

/* ---------------------------------------------------------------------------------------------
 * the expanded form */

/* The keys of v at positions lo .. hi-1, in increasing order, into keys[]; returns how many */
static int keys_in_range(const VisibleKeys *v, int lo, int hi, int *keys) {
    int n = 0;
    for (int i = 0; i < v->n_runs; i++) {
        const KeyRun *run = &v->runs[i];
        int k = run->first >= lo ? 0 : (lo - run->first + run->step - 1) / run->step;
        for (; k < run->count && run->first + k * run->step < hi; k++) keys[n++] = run->first + k * run->step;
    }
    return n;
}

/* Folds the span's keys into the running softmax of (token, head) = item (items: n * H), in tiles that end
 * with the cache block, as in the flash kernel (attention_head_flash): the sum does not depend on --batch. */
static void fold_span(void *arg, int begin, int end) {
    const Pass *p = arg;
    const LatentAttentionConfig *a = p->a;
    const LatentScratch *x = p->x;
    int H = a->n_heads, dv = a->v_dim, keys[MLA_SPAN];
    for (int item = begin; item < end; item++) {
        int t = item / H, h = item % H, n_tiles = 0, tile_block = -1;
        float *acc = p->out + ((size_t)(p->first + t) * H + h) * dv, tile_scores[KV_BLOCK_TOKENS];
        const float *tile_values[KV_BLOCK_TOKENS];
        OnlineSoftmax *st = &x->states[(size_t)t * H + h];
        VisibleKeys v = visible_keys(p->spec, p->pos + p->first + t);
        int n_keys = keys_in_range(&v, p->lo, p->hi, keys);
        for (int k = 0; k < n_keys; k++) {
            int j = keys[k], row = p->row_of[j - p->lo], block = kvlayer_slot_of(p->cache, j) / KV_BLOCK_TOKENS;
            if (n_tiles > 0 && (block != tile_block || n_tiles == KV_BLOCK_TOKENS)) {
                online_softmax_tile(acc, st, tile_scores, tile_values, n_tiles, dv);
                n_tiles = 0;
            }
            tile_block = block;
            tile_scores[n_tiles] = x->span_scores[(size_t)h * MLA_SPAN * MLA_PASS + (size_t)row * p->n + t] * a->scale;
            tile_values[n_tiles++] = x->span_values + ((size_t)h * MLA_SPAN + row) * dv;
        }
        if (n_tiles > 0) online_softmax_tile(acc, st, tile_scores, tile_values, n_tiles, dv);
    }
}

/* Decompresses the `rows` latents of the span for every head, and scores them against every token's query:
 *   k_h,j = [W_kb[h] c_j | k_rope_j],  v_h,j = W_vb[h] c_j,  span_scores[h][j][t] = q_h,t . k_h,j */
static void decompress_span(const Pass *p, int rows) {
    const LatentAttentionConfig *a = p->a;
    LatentScratch *x = p->x;
    int dn = a->nope_dim, dq = q_width(a);
    for (int h = 0; h < a->n_heads; h++) {
        Tensor wk = tensor_matrix(&p->w->wk_b, h), wv = tensor_matrix(&p->w->wv_b, h);
        float *keys = x->span_keys + (size_t)h * MLA_SPAN * dq;
        matmul_many(&p->s->scratch, (Projection[]){{x->span_nope, &wk}, {x->span_values + (size_t)h * MLA_SPAN * a->v_dim, &wv}}, 2, x->span,
                    rows);
        for (int i = 0, j = p->lo; i < rows; j++)
            if (p->row_of[j - p->lo] >= 0) {
                memcpy(keys + (size_t)i * dq, x->span_nope + (size_t)i * dn, (size_t)dn * sizeof(float));
                memcpy(keys + (size_t)i * dq + dn, kvlayer_key(p->cache, j) + a->kv_rank, (size_t)a->rope.dim * sizeof(float));
                i++;
            }
        Tensor queries = {x->queries + (size_t)h * MLA_PASS * dq, DTYPE_F32, p->n, dq, 1, NULL};
        matmul(&p->s->scratch, x->span_scores + (size_t)h * MLA_SPAN * MLA_PASS, keys, &queries, rows); /* [rows][n] */
    }
}

/* The expanded form for up to MLA_PASS tokens: positions 0 .. last MLA_SPAN at a time; a span's latents are
 * decompressed into every head's keys and values once for all the tokens, scored, and folded into each
 * (token, head)'s online softmax. */
static void attend_expanded(Pass *p) {
    const LatentAttentionConfig *a = p->a;
    LatentScratch *x = p->x;
    int H = a->n_heads, r = a->kv_rank, dq = q_width(a), last = p->pos + p->first + p->n - 1, row_of[MLA_SPAN];
    for (int t = 0; t < p->n; t++)
        for (int h = 0; h < H; h++) {
            memcpy(x->queries + ((size_t)h * MLA_PASS + t) * dq, query(p, t, h), (size_t)dq * sizeof(float));
            x->states[(size_t)t * H + h] = online_softmax_start(p->out + ((size_t)(p->first + t) * H + h) * a->v_dim,
                                                                a->v_dim, -INFINITY);
        }
    p->row_of = row_of;
    for (p->lo = 0; p->lo <= last; p->lo += MLA_SPAN) {
        p->hi = p->lo + MLA_SPAN < last + 1 ? p->lo + MLA_SPAN : last + 1;
        int rows = 0;
        for (int j = p->lo; j < p->hi; j++) {
            row_of[j - p->lo] = kvlayer_holds(p->cache, j) ? rows : -1;
            if (row_of[j - p->lo] >= 0) memcpy(x->span + (size_t)rows++ * r, kvlayer_key(p->cache, j), (size_t)r * sizeof(float));
        }
        if (rows == 0) continue;
        decompress_span(p, rows);
        parallel_for(p->n * H, 1, 2LL * p->n * H * rows * a->v_dim, fold_span, p);
    }
    for (int t = 0; t < p->n; t++)
        for (int h = 0; h < H; h++)
            online_softmax_finish(p->out + ((size_t)(p->first + t) * H + h) * a->v_dim, &x->states[(size_t)t * H + h], a->v_dim);
}

/* A form over any number of tokens, in the groups its scratch holds */
static void in_groups(Pass *p, int group, void (*form)(Pass *)) {
    int first = p->first, n = p->n;
    for (int t = 0; t < n; t += group) {
        p->first = first + t;
        p->n = n - t < group ? n - t : group;
        form(p);
    }
    p->first = first, p->n = n;
}

/* ---------------------------------------------------------------------------------------------
 * choosing the form, and the block */

/* Multiply-adds of one query that sees `visible` keys, per head:
 *   expanded  visible * (r (nope + v) + nope + rope + v)    every latent decompressed, then attention
 *   absorbed  r (nope + v) + visible * (2 r + rope)         W_kb and W_vb once, then two passes in latent space
 * Absorbed is cheaper as soon as a query sees two keys (DeepSeek-V3: r (nope + v) = 131,072 against 2r + rope
 * = 1,088 per key); at one key expanded saves 2r + rope - nope - v. The choice depends on the query's position
 * alone, never on the tokens it shares a pass with, so the logits do not depend on --batch. */
static int absorbed_is_cheaper(const LatentAttentionConfig *a, long long visible) {
    long long r = a->kv_rank, up = r * (a->nope_dim + a->v_dim);
    return up + visible * (2 * r + a->rope.dim) < visible * (up + q_width(a) + a->v_dim);
}

static int uses_absorbed(const Pass *p, int t) {
    if (p->s->observer.record) return 1; /* the observer reads the weights the absorbed form materialises */
    switch (p->spec->latent_kernel) {
    case LATENT_ABSORBED: return 1;
    case LATENT_EXPANDED: return 0;
    default: return absorbed_is_cheaper(p->a, visible_count(p->spec, p->pos + t));
    }
}

/* Tokens first .. first + n - 1, each with its form: runs of tokens that use the same one go together */
static void attend(Pass *p, int first, int n) {
    for (int t = first; t < first + n;) {
        int form = uses_absorbed(p, t), end = t + 1;
        while (end < first + n && uses_absorbed(p, end) == form) end++;
        p->first = t, p->n = end - t;
        if (form) in_groups(p, MLA_TOKENS, attend_absorbed);
        else in_groups(p, MLA_PASS, attend_expanded);
        t = end;
    }
}

int latent_attention_block(const Model *m, int l, RunState *s, const Batch *b) {
    const LatentAttentionConfig *a = &m->config.layers[l].mla;
    const LatentAttentionWeights *w = &m->weights.layers[l].mla;
    int n = b->n;

    /* queries and latents, rotary positions */
    project(a, w, s, n);
    rotate(a, m->weights.layers[l].rope_inv_freq, s, b);

    /* each sequence's rows against its own cache: each token stores its latent row, then attends (the observer,
     * --attn-map, gets the weights); a paged cache overwrites nothing, so there the rows of the whole run go in
     * first and the tokens attend together */
    for (int first = 0, end; first < n; first = end) {
        end = batch_run_end(b, first);
        KVLayer *cache = kvcache_layer(&s->kv, b->seq[first], l);
        Pass p = {a, w, &m->attention[l], cache, s, s->mla, s->xb, 0, 0, b->pos[first] - first, 0, 0, NULL};
        int rows_first = kvlayer_keeps_every_position(cache) && !s->observer.record;
        for (int t = first; t < end; t++) {
            if (kvlayer_store(cache, b->pos[t], s->mla->latent + (size_t)t * row_width(a), NULL) != 0) return -1;
            if (rows_first) continue;
            attend(&p, t, 1);
            if (s->observer.record) s->observer.record(s->observer.ctx, l, b->pos[t], s->scores, s->scores_stride);
        }
        if (rows_first) attend(&p, first, end - first);
    }

    /* the heads' outputs side by side, mixed by the output projection */
    matmul(&s->scratch, s->xb2, s->xb, &w->wo, n);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * scratch */

int mla_scratch_init(LatentScratch **scratch, MatmulScratch *ws, const Model *m, int max_tokens) {
    size_t T = (size_t)max_tokens, row = 0, q_rank = 0, heads = 0, r = 0, nope = 0, latent_q = 0, sums = 0, out = 0, keys = 0;
    *scratch = NULL;
    for (int l = 0; l < m->config.n_layers; l++) {
        const LatentAttentionConfig *a = &m->config.layers[l].mla;
        if (m->config.layers[l].mixer != MIXER_LATENT_ATTENTION) continue;
        size_t H = (size_t)a->n_heads;
#define AT_LEAST(v, x) if ((size_t)(x) > (v)) (v) = (size_t)(x)
        AT_LEAST(row, row_width(a));
        AT_LEAST(q_rank, a->q_rank);
        AT_LEAST(heads, H);
        AT_LEAST(r, a->kv_rank);
        AT_LEAST(nope, a->nope_dim);
        AT_LEAST(latent_q, H * row_width(a));
        AT_LEAST(sums, H * a->kv_rank);
        AT_LEAST(out, H * a->v_dim);
        AT_LEAST(keys, H * q_width(a));
#undef AT_LEAST
    }
    if (row == 0) return 0; /* no latent layer */
    LatentScratch *x = calloc(1, sizeof *x);
    if (!x) return -1;
    *scratch = x;
    x->latent = malloc(T * row * sizeof(float));
    x->q_low = malloc((T * q_rank + 1) * sizeof(float));
    x->q_latent = malloc(MLA_TOKENS * latent_q * sizeof(float));
    x->sums = malloc(MLA_TOKENS * sums * sizeof(float));
    x->heads = malloc(MLA_TOKENS * out * sizeof(float));
    x->queries = malloc(MLA_PASS * keys * sizeof(float));
    x->span = malloc(MLA_SPAN * r * sizeof(float));
    x->span_nope = malloc(MLA_SPAN * nope * sizeof(float));
    x->span_keys = malloc(MLA_SPAN * keys * sizeof(float));
    x->span_values = malloc(MLA_SPAN * out * sizeof(float));
    x->span_scores = malloc(MLA_SPAN * heads * MLA_PASS * sizeof(float));
    x->states = malloc(MLA_PASS * heads * sizeof *x->states);
    if (!x->latent || !x->q_low || !x->q_latent || !x->sums || !x->heads || !x->queries || !x->span || !x->span_nope ||
        !x->span_keys || !x->span_values || !x->span_scores || !x->states)
        return -1;
    /* the matmuls' inputs: q_rank wide for q_b, kv_rank wide for a span (expanded) or the heads' sums (absorbed) */
    return matmul_scratch_reserve(ws, max_tokens, (int)(q_rank > r ? q_rank : r)) || matmul_scratch_reserve(ws, MLA_SPAN, (int)r)
               ? -1
               : 0;
}

void mla_scratch_free(LatentScratch *x) {
    if (!x) return;
    free(x->latent);
    free(x->q_low);
    free(x->q_latent);
    free(x->sums);
    free(x->heads);
    free(x->queries);
    free(x->span);
    free(x->span_nope);
    free(x->span_keys);
    free(x->span_values);
    free(x->span_scores);
    free(x->states);
    free(x);
}
