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
#define MLA_SPAN 128  /* expanded: positions decompressed at once (a multiple of KV_BLOCK_TOKENS) */

/* One attention pass of a latent layer: tokens first .. first + n - 1 of the forward pass, at positions
 * pos + first .., whose rows are in the cache */
typedef struct {
    const LatentAttentionConfig *a;
    const LatentAttentionWeights *w;
    const AttentionSpec *spec;
    const KVLayer *cache;
    RunState *s;
    float *out; /* [n_pass][H * v_dim] of the forward pass */
    int first, n, pos;
    int lo, hi;            /* expanded: the span of positions decompressed */
    const int *row_of;     /* expanded: span row of position lo + i, -1 if not held */
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
    LatentScratch *x = &s->mla;
    if (a->q_rank) {
        matmul_many((Projection[]){{x->q_low, &w->wq_a}, {x->latent, &w->wkv_a}}, 2, s->xb, n);
        for (int t = 0; t < n; t++)
            rmsnorm(x->q_low + (size_t)t * a->q_rank, x->q_low + (size_t)t * a->q_rank, w->q_a_norm.data, a->q_rank,
                    a->norm_eps);
        matmul(s->q, x->q_low, &w->wq_b, n);
    } else {
        matmul_many((Projection[]){{s->q, &w->wq}, {x->latent, &w->wkv_a}}, 2, s->xb, n);
    }
    for (int t = 0; t < n; t++) {
        float *c = x->latent + (size_t)t * row_width(a);
        rmsnorm(c, c, w->kv_a_norm.data, a->kv_rank, a->norm_eps);
    }
}

/* RoPE on the rope part of every query head and on the shared k_rope, token t at position pos + t. The
 * exporter permutes DeepSeek's interleaved pairs into attn.c's halves (export.py interleaved_to_halves). */
static void rotate(const LatentAttentionConfig *a, const float *inv_freq, RunState *s, int n, int pos) {
    if (a->rope.dim == 0) return;
    for (int t = 0; t < n; t++) {
        rope_heads(s->q + (size_t)t * a->n_heads * q_width(a) + a->nope_dim, a->n_heads, q_width(a), a->rope.dim, pos + t,
                   inv_freq, a->rope.attn_factor);
        rope_heads(s->mla.latent + (size_t)t * row_width(a) + a->kv_rank, 1, a->rope.dim, a->rope.dim, pos + t, inv_freq,
                   a->rope.attn_factor);
    }
}

/* ---------------------------------------------------------------------------------------------
 * the absorbed form */

/* out[r] += w * v */
static void add_scaled(float *out, float w, const float *v, int r) {
    for (int i = 0; i < r; i++) out[i] += w * v[i];
}

/* The rope part's share of a score: q_rope . k_rope (nothing without rotary dimensions) */
static float rope_dot(const float *q_rope, const float *k_rope, int rope_dim) {
    return rope_dim ? dot_product(q_rope, k_rope, rope_dim) : 0.0f;
}

/* W_kb[h] folded into the queries: absorbed[h][t] = W_kb[h]^T q_nope_h,t  ([nope][r]^T [nope] -> [r]).
 * A row of W_kb[h] at a time, for all tokens, so each weight is converted once. Items: heads. */
static void absorb_queries(void *arg, int h0, int h1) {
    const Pass *p = arg;
    const LatentAttentionConfig *a = p->a;
    int r = a->kv_rank;
    float row[MAX_LATENT_RANK];
    for (int h = h0; h < h1; h++) {
        Tensor wk = tensor_matrix(&p->w->wk_b, h);
        float *q_latent = p->s->mla.absorbed + (size_t)h * MLA_TOKENS * r;
        memset(q_latent, 0, (size_t)p->n * r * sizeof(float));
        for (int i = 0; i < a->nope_dim; i++) {
            tensor_row(row, &wk, i);
            for (int t = 0; t < p->n; t++) add_scaled(q_latent + (size_t)t * r, query(p, t, h)[i], row, r);
        }
    }
}

/* Attention in latent space, for heads h0 .. h1-1 (items: heads, a few per thread):
 *   s_j = (absorbed_h . c_j + q_rope_h . k_rope_j) * scale,  w = softmax(s),  absorbed_h <- sum_j w_j c_j
 * Each cached row is read once for all the heads of the range. The weights stay in s->scores (the
 * observer's rows, as the naive kernel leaves them). */
static void attend_latent(void *arg, int h0, int h1) {
    const Pass *p = arg;
    const LatentAttentionConfig *a = p->a;
    int r = a->kv_rank, stride = p->s->scores_stride;
    float *scores = p->s->scores;
    for (int t = 0; t < p->n; t++) {
        VisibleKeys v = visible_keys(p->spec, p->pos + p->first + t);
        int k = 0;
        FOR_EACH_VISIBLE_KEY(v, j) {
            const float *row = kvlayer_key(p->cache, j);
            for (int h = h0; h < h1; h++) {
                const float *q_latent = p->s->mla.absorbed + ((size_t)h * MLA_TOKENS + t) * r;
                scores[(size_t)h * stride + k] =
                    (dot_product(q_latent, row, r) + rope_dot(query(p, t, h) + a->nope_dim, row + r, a->rope.dim)) *
                    a->scale;
            }
            k++;
        }
        for (int h = h0; h < h1; h++) {
            softmax(scores + (size_t)h * stride, k);
            memset(p->s->mla.absorbed + ((size_t)h * MLA_TOKENS + t) * r, 0, (size_t)r * sizeof(float));
        }
        k = 0;
        FOR_EACH_VISIBLE_KEY(v, j) {
            const float *row = kvlayer_key(p->cache, j);
            for (int h = h0; h < h1; h++)
                add_scaled(p->s->mla.absorbed + ((size_t)h * MLA_TOKENS + t) * r, scores[(size_t)h * stride + k], row, r);
            k++;
        }
    }
}

/* The absorbed form for up to MLA_TOKENS tokens: absorb W_kb, attend in latent space, then each head's
 * output o_h = W_vb[h] (sum_j w_j c_j), put side by side */
static void attend_absorbed_group(Pass *p) {
    const LatentAttentionConfig *a = p->a;
    int H = a->n_heads, r = a->kv_rank, dv = a->v_dim, threads = parallel_threads();
    long long visible = visible_count(p->spec, p->pos + p->first + p->n - 1);
    parallel_for(H, 1, (long long)H * p->n * a->nope_dim * r, absorb_queries, p);
    parallel_for(H, (H + threads - 1) / threads, 2LL * H * p->n * visible * (r + a->rope.dim), attend_latent, p);
    for (int h = 0; h < H; h++) {
        Tensor wv = tensor_matrix(&p->w->wv_b, h);
        matmul(p->s->mla.heads + (size_t)h * MLA_TOKENS * dv, p->s->mla.absorbed + (size_t)h * MLA_TOKENS * r, &wv, p->n);
    }
    for (int t = 0; t < p->n; t++)
        for (int h = 0; h < H; h++)
            memcpy(p->out + ((size_t)(p->first + t) * H + h) * dv, p->s->mla.heads + ((size_t)h * MLA_TOKENS + t) * dv,
                   (size_t)dv * sizeof(float));
}

static void attend_absorbed(Pass *p) {
    int first = p->first, n = p->n;
    for (int t = 0; t < n; t += MLA_TOKENS) {
        p->first = first + t;
        p->n = n - t < MLA_TOKENS ? n - t : MLA_TOKENS;
        attend_absorbed_group(p);
    }
    p->first = first, p->n = n;
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

/* Folds the span's keys into the running softmax of (token, head) = item (items: n * H). Tiles end with
 * the cache block, as in the flash kernel (attention_head_flash), so the sum does not depend on --batch. */
static void fold_span(void *arg, int begin, int end) {
    const Pass *p = arg;
    const LatentAttentionConfig *a = p->a;
    const LatentScratch *x = &p->s->mla;
    int H = a->n_heads, dn = a->nope_dim, dv = a->v_dim, keys[MLA_SPAN];
    for (int item = begin; item < end; item++) {
        int t = item / H, h = item % H, n_tiles = 0, tile_block = -1;
        const float *q = query(p, t, h);
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
            const float *k_nope = x->span_keys + ((size_t)h * MLA_SPAN + row) * dn;
            tile_scores[n_tiles] =
                (dot_product(q, k_nope, dn) + rope_dot(q + dn, kvlayer_key(p->cache, j) + a->kv_rank, a->rope.dim)) * a->scale;
            tile_values[n_tiles++] = x->span_values + ((size_t)h * MLA_SPAN + row) * dv;
        }
        if (n_tiles > 0) online_softmax_tile(acc, st, tile_scores, tile_values, n_tiles, dv);
    }
}

/* The expanded form: the positions 0 .. last are taken MLA_SPAN at a time; the latents of a span are
 * decompressed into every head's k_nope = W_kb[h] c and v = W_vb[h] c (once for all the tokens of the pass),
 * then folded into each (token, head)'s online softmax. */
static void attend_expanded(Pass *p) {
    const LatentAttentionConfig *a = p->a;
    LatentScratch *x = &p->s->mla;
    int H = a->n_heads, r = a->kv_rank, last = p->pos + p->first + p->n - 1, row_of[MLA_SPAN];
    for (int t = 0; t < p->n; t++)
        for (int h = 0; h < H; h++)
            x->states[(size_t)t * H + h] = online_softmax_start(p->out + ((size_t)(p->first + t) * H + h) * a->v_dim, a->v_dim,
                                                                -INFINITY);
    p->row_of = row_of;
    for (p->lo = 0; p->lo <= last; p->lo += MLA_SPAN) {
        p->hi = p->lo + MLA_SPAN < last + 1 ? p->lo + MLA_SPAN : last + 1;
        int rows = 0;
        for (int j = p->lo; j < p->hi; j++) {
            row_of[j - p->lo] = kvlayer_holds(p->cache, j) ? rows : -1;
            if (row_of[j - p->lo] >= 0) memcpy(x->span + (size_t)rows++ * r, kvlayer_key(p->cache, j), (size_t)r * sizeof(float));
        }
        if (rows == 0) continue;
        for (int h = 0; h < H; h++) {
            Tensor wk = tensor_matrix(&p->w->wk_b, h), wv = tensor_matrix(&p->w->wv_b, h);
            matmul_many((Projection[]){{x->span_keys + (size_t)h * MLA_SPAN * a->nope_dim, &wk},
                                       {x->span_values + (size_t)h * MLA_SPAN * a->v_dim, &wv}},
                        2, x->span, rows);
        }
        parallel_for(p->n * H, 1, 2LL * p->n * H * rows * (q_width(a) + a->v_dim), fold_span, p);
    }
    for (int t = 0; t < p->n; t++)
        for (int h = 0; h < H; h++)
            online_softmax_finish(p->out + ((size_t)(p->first + t) * H + h) * a->v_dim, &x->states[(size_t)t * H + h], a->v_dim);
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
        if (form) attend_absorbed(p);
        else attend_expanded(p);
        t = end;
    }
}

int latent_attention_block(const Model *m, int l, RunState *s, int n, int pos) {
    const LatentAttentionConfig *a = &m->config.layers[l].mla;
    const LatentAttentionWeights *w = &m->weights.layers[l].mla;
    KVLayer *cache = &s->kv.layers[l];
    Pass p = {a, w, &m->attention[l], cache, s, s->xb, 0, 0, pos, 0, 0, NULL};

    /* queries and latents, rotary positions */
    project(a, w, s, n);
    rotate(a, m->weights.layers[l].rope_inv_freq, s, n, pos);

    /* each token stores its latent row, then attends (the observer, --attn-map, gets the weights); a paged cache
     * overwrites nothing, so there the rows of the whole pass go in first and the tokens attend together */
    int rows_first = kvlayer_keeps_every_position(cache) && !s->observer.record;
    for (int t = 0; t < n; t++) {
        if (kvlayer_store(cache, pos + t, s->mla.latent + (size_t)t * row_width(a), NULL) != 0) return -1;
        if (rows_first) continue;
        attend(&p, t, 1);
        if (s->observer.record) s->observer.record(s->observer.ctx, l, pos + t, s->scores, s->scores_stride);
    }
    if (rows_first) attend(&p, 0, n);

    /* the heads' outputs side by side, mixed by the output projection */
    matmul(s->xb2, s->xb, &w->wo, n);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * scratch */

int mla_scratch_init(LatentScratch *x, const Model *m, int max_tokens) {
    size_t T = (size_t)max_tokens, row = 0, q_rank = 0, heads = 0, absorbed = 0, out = 0, keys = 0, r = 0;
    memset(x, 0, sizeof *x);
    for (int l = 0; l < m->config.n_layers; l++) {
        const LatentAttentionConfig *a = &m->config.layers[l].mla;
        if (m->config.layers[l].mixer != MIXER_LATENT_ATTENTION) continue;
        size_t H = (size_t)a->n_heads;
#define AT_LEAST(v, x) if ((size_t)(x) > (v)) (v) = (size_t)(x)
        AT_LEAST(row, row_width(a));
        AT_LEAST(q_rank, a->q_rank);
        AT_LEAST(heads, H);
        AT_LEAST(r, a->kv_rank);
        AT_LEAST(absorbed, H * a->kv_rank);
        AT_LEAST(out, H * a->v_dim);
        AT_LEAST(keys, H * a->nope_dim);
#undef AT_LEAST
    }
    if (row == 0) return 0; /* no latent layer */
    x->latent = malloc(T * row * sizeof(float));
    x->q_low = malloc((T * q_rank + 1) * sizeof(float));
    x->absorbed = malloc(MLA_TOKENS * absorbed * sizeof(float));
    x->heads = malloc(MLA_TOKENS * out * sizeof(float));
    x->span = malloc(MLA_SPAN * r * sizeof(float));
    x->span_keys = malloc(MLA_SPAN * keys * sizeof(float));
    x->span_values = malloc(MLA_SPAN * out * sizeof(float));
    x->states = malloc(T * heads * sizeof *x->states);
    if (!x->latent || !x->q_low || !x->absorbed || !x->heads || !x->span || !x->span_keys || !x->span_values || !x->states)
        return -1;
    /* the matmuls' inputs: q_rank wide for q_b, kv_rank wide for a span (expanded) or the heads' sums (absorbed) */
    return matmul_reserve(max_tokens, (int)(q_rank > r ? q_rank : r)) || matmul_reserve(MLA_SPAN, (int)r) ? -1 : 0;
}

void mla_scratch_free(LatentScratch *x) {
    free(x->latent);
    free(x->q_low);
    free(x->absorbed);
    free(x->heads);
    free(x->span);
    free(x->span_keys);
    free(x->span_values);
    free(x->states);
    memset(x, 0, sizeof *x);
}
