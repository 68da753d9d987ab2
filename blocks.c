/* blocks.c - the attention mixer and the dense FFNs: what one layer does to the normed residual stream.
 * The kernels and masks are in attention.c, the mixture of experts in moe.c. */
#include "blocks.h"
#include "profile.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * attention: project, normalise, rotate, cache, attend, project back */

/* RMSNorm of every head_dim slice of x[n][heads * head_dim], with the slice's weights or none */
static void norm_heads(float *x, const float *w, int n, int heads, int head_dim, float eps) {
    for (int i = 0; i < n * heads; i++) rmsnorm(x + (size_t)i * head_dim, x + (size_t)i * head_dim, w, head_dim, eps);
}

/* Queries and keys normalised before they meet, so that no logit can grow without bound:
 *   per head, with weights      Qwen3, Gemma 3, EXAONE 4 (OLMo 2 / Gemma 2 had none)
 *   over the whole projection   OLMo 2/3: one RMSNorm over all heads at once, before the split
 *   per head, no weights        Llama 4's "L2 norm" on its rotary layers */
static void norm_queries_keys(RunState *s, const AttentionConfig *a, const AttentionWeights *w, int n, float eps) {
    int hd = a->head_dim, q_dim = a->n_heads * hd, kv_dim = a->n_kv_heads * hd;
    if (a->flags & (ATTN_QK_NORM | ATTN_QK_NORM_PLAIN)) {
        const float *qw = a->flags & ATTN_QK_NORM ? w->q_norm.data : NULL, *kw = a->flags & ATTN_QK_NORM ? w->k_norm.data : NULL;
        norm_heads(s->q, qw, n, a->n_heads, hd, eps);
        norm_heads(s->k, kw, n, a->n_kv_heads, hd, eps);
    } else if (a->flags & ATTN_QK_NORM_FULL) {
        norm_heads(s->q, w->q_norm_full.data, n, 1, q_dim, eps);
        norm_heads(s->k, w->k_norm_full.data, n, 1, kv_dim, eps);
    }
}

typedef struct {
    RunState *s;
    const AttentionConfig *a;
    const float *inv_freq;
    const Batch *b;
} Rotation;

static void rotate_range(void *arg, int begin, int end) {
    const Rotation *r = arg;
    const AttentionConfig *a = r->a;
    int hd = a->head_dim;
    for (int t = begin; t < end; t++)
        rope_qk(r->s->q + (size_t)t * a->n_heads * hd, a->n_heads, r->s->k + (size_t)t * a->n_kv_heads * hd, a->n_kv_heads, hd,
                a->rope.dim, r->b->pos[t], r->inv_freq, a->rope.attn_factor);
}

/* RoPE on every head of q[n][n_heads*hd] and k[n][n_kv_heads*hd], row t at its position pos[t] (Su et al.
 * 2021): pairs of dimensions rotate by angles that grow with the position, so q.k depends on the distance. */
static void rotate_heads(RunState *s, const AttentionConfig *a, const float *inv_freq, const Batch *b) {
    if (a->rope.dim == 0) return; /* NoPE: this layer sees no positions at all (SmolLM3, Llama 4, EXAONE 4) */
    Rotation r = {s, a, inv_freq, b};
    /* the tokens of a prompt on every thread (a sine and a cosine per pair and position: ~30 multiply-adds) */
    long long work = (long long)b->n * (a->rope.dim / 2 * 30 + (a->n_heads + a->n_kv_heads) * a->rope.dim);
    parallel_for(b->n, 8, work, rotate_range, &r);
}

/* Llama 4's attention temperature on its NoPE layers: far from the start, softmax over many keys flattens,
 * so queries are sharpened by  1 + scale * log(1 + floor((p + 1) / floor_scale)). */
static void sharpen_queries(float *q, const AttentionConfig *a, const Batch *b) {
    int q_dim = a->n_heads * a->head_dim;
    for (int t = 0; t < b->n; t++) {
        float k = log1pf(floorf((float)(b->pos[t] + 1) / a->temperature_floor)) * a->temperature_scale + 1.0f;
        for (int i = 0; i < q_dim; i++) q[(size_t)t * q_dim + i] *= k;
    }
}

/* Qwen3-Next's output gate: each channel of the heads' output times sigmoid(g), g = W_g x another projection of
 * the layer's input, so a head can switch itself off for a token (Qiu et al. 2025, "Gated Attention") */
static void gate_heads(float *out, const float *gate, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] *= 1.0f / (1.0f + exp_f32(-gate[i]));
}

int batch_run_end(const Batch *b, int first) {
    int end = first + 1;
    while (end < b->n && b->seq[end] == b->seq[first] && b->pos[end] == b->pos[end - 1] + 1) end++;
    return end;
}

/* The n tokens of one sequence at positions pos .. pos+n-1 store their keys and values in its cache, then
 * attend over what their mask lets them see (q, k, v, out: the run's rows; an observer, --attn-map, gets the
 * weights). A paged cache overwrites nothing, so there all the keys go in first and the heads then attend
 * for every token in one pass. */
static int attend_run(RunState *s, int l, const AttentionConfig *a, const AttentionSpec *spec, KVLayer *cache,
                      float *out, const float *q, const float *k, const float *v, int n, int pos) {
    int q_dim = a->n_heads * a->head_dim, kv_dim = a->n_kv_heads * a->head_dim;
    int keys_first = kvlayer_keeps_every_position(cache) && !s->observer.record;
    for (int t = 0; t < n; t++) {
        if (kvlayer_store(cache, pos + t, k + (size_t)t * kv_dim, v + (size_t)t * kv_dim) != 0) return -1;
        if (keys_first) continue;
        attention_layer(out + (size_t)t * q_dim, q + (size_t)t * q_dim, cache, a->n_heads, a->n_kv_heads, pos + t, 1,
                        spec, s->scores, s->scores_stride);
        if (s->observer.record) s->observer.record(s->observer.ctx, l, pos + t, s->scores, s->scores_stride);
    }
    if (keys_first) attention_layer(out, q, cache, a->n_heads, a->n_kv_heads, pos, n, spec, s->scores, s->scores_stride);
    return 0;
}

/* The end of the rows from `first` on that are one token each of a sequence over a paged cache, which
 * attention_rows takes together (at most a tile of them); first + 1 where they cannot go together: another
 * kernel, a rolling buffer, or an observer that wants each row's weights. */
static int decode_rows_end(const RunState *s, int l, const AttentionConfig *a, const AttentionSpec *spec, const Batch *b,
                           int first) {
    if (spec->kernel != KERNEL_NAIVE || spec->head_dim % 16 || s->observer.record ||
        !kvlayer_keeps_every_position(kvcache_layer(&s->kv, b->seq[first], l)))
        return first + 1;
    int most = s->scores_heads / a->n_heads, end = first + 1;
    most = most < ATTENTION_QUERY_TILE ? most : ATTENTION_QUERY_TILE;
    while (end < b->n && end - first < most && batch_run_end(b, end) == end + 1) end++;
    return end;
}

/* Rows first .. end-1, one token each of as many sequences: their keys and values go into their caches, then
 * they attend in one pass, each block they share read once (attention_rows). */
static int attend_rows(RunState *s, int l, const AttentionConfig *a, const AttentionSpec *spec, const Batch *b,
                       int first, int end) {
    int q_dim = a->n_heads * a->head_dim, kv_dim = a->n_kv_heads * a->head_dim;
    const KVLayer *caches[ATTENTION_QUERY_TILE];
    for (int t = first; t < end; t++) {
        KVLayer *cache = kvcache_layer(&s->kv, b->seq[t], l);
        if (kvlayer_store(cache, b->pos[t], s->k + (size_t)t * kv_dim, s->v + (size_t)t * kv_dim) != 0) return -1;
        caches[t - first] = cache;
    }
    attention_rows(s->xb + (size_t)first * q_dim, s->q + (size_t)first * q_dim, caches, b->pos + first, end - first,
                   a->n_heads, a->n_kv_heads, spec, s->scores, s->scores_stride);
    return 0;
}

int attention_block(const Model *m, int l, RunState *s, const Batch *b) {
    const AttentionConfig *a = &m->config.layers[l].attn;
    const LayerWeights *lw = &m->weights.layers[l];
    const AttentionWeights *w = &lw->attn;
    const AttentionSpec *spec = &m->attention[l];
    int n = b->n, q_dim = a->n_heads * a->head_dim, kv_dim = a->n_kv_heads * a->head_dim;
    float *xb = s->xb;

    /* q, k, v for these tokens in one pass (+ biases: Qwen2, GPT-2, gpt-oss), and the output gate (Qwen3-Next) */
    profile_section(PROFILE_QKV);
    int gated = (a->flags & ATTN_OUTPUT_GATE) != 0;
    float *gate = s->mixer_scratch;
    matmul_many(&s->scratch, (Projection[]){{s->q, &w->wq}, {s->k, &w->wk}, {s->v, &w->wv}, {gate, &w->wg}}, gated ? 4 : 3, xb, n);
    add_bias(s->q, &w->bq, n);
    add_bias(s->k, &w->bk, n);
    add_bias(s->v, &w->bv, n);

    /* q/k norm, rotary positions, Llama 4's temperature */
    profile_section(PROFILE_ROPE);
    norm_queries_keys(s, a, w, n, m->config.norm_eps);
    rotate_heads(s, a, lw->rope_inv_freq, b);
    if (a->temperature_floor > 0.0f) sharpen_queries(s->q, a, b);

    profile_section(PROFILE_ATTENTION);
    /* each sequence's rows against its own cache: the rows of other sequences never meet them; one token each
     * of several sequences (a decode step of --samples / --prompts) attends together */
    for (int t = 0, end; t < n; t = end) {
        end = batch_run_end(b, t);
        if (end == t + 1 && (end = decode_rows_end(s, l, a, spec, b, t)) > t + 1) {
            if (attend_rows(s, l, a, spec, b, t, end) != 0) return -1;
            continue;
        }
        if (attend_run(s, l, a, spec, kvcache_layer(&s->kv, b->seq[t], l), xb + (size_t)t * q_dim, s->q + (size_t)t * q_dim,
                       s->k + (size_t)t * kv_dim, s->v + (size_t)t * kv_dim, end - t, b->pos[t]) != 0)
            return -1;
    }

    /* the heads' outputs side by side, mixed by the output projection */
    profile_section(PROFILE_WO);
    if (gated) gate_heads(xb, gate, (size_t)n * q_dim);
    matmul(&s->scratch, s->xb2, xb, &w->wo, n);
    add_bias(s->xb2, &w->bo, n);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * dense FFN */

/* gated   down(act(gate x + b) * (up x + b)) + b   (SwiGLU: Llama, Qwen, Mistral; GeGLU: Gemma; Shazeer 2020)
 * plain   down(act(up x + b)) + b                   (GPT-2, StarCoder) */
void dense_ffn_block(const Model *m, int l, RunState *s, int n) {
    const LayerConfig *lc = &m->config.layers[l];
    const FfnWeights *w = &m->weights.layers[l].ffn;
    size_t inner = (size_t)n * lc->ffn.hidden;
    profile_section(PROFILE_GATE_UP);
    if (lc->ffn_kind == FFN_GATED) {
        matmul_many(&s->scratch, (Projection[]){{s->hb, &w->w_up}, {s->hb2, &w->w_gate}}, 2, s->xb, n);
        add_bias(s->hb, &w->b_up, n);
        add_bias(s->hb2, &w->b_gate, n);
        profile_section(PROFILE_ACTIVATION);
        activate(s->hb, s->hb2, inner, lc->ffn.activation);
    } else {
        matmul(&s->scratch, s->hb, s->xb, &w->w_up, n);
        add_bias(s->hb, &w->b_up, n);
        profile_section(PROFILE_ACTIVATION);
        activate(s->hb, NULL, inner, lc->ffn.activation);
    }
    profile_section(PROFILE_DOWN);
    matmul(&s->scratch, s->xb2, s->hb, &w->w_down, n);
    add_bias(s->xb2, &w->b_down, n);
}
