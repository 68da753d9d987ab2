/* moe.c - the mixture-of-experts FFN (Shazeer et al. 2017; Switch, Mixtral, Qwen3-MoE, gpt-oss, Llama 4,
 * DeepSeek): a router scores every expert for every token, each token goes through its top k experts only,
 * and their outputs are summed, weighted by the scores:
 *     s      = route(router . x + b)         softmax, softmax over the top k, or sigmoid
 *     E      = top k experts by s (+ a selection-only bias), from the best groups when experts are grouped
 *     y      = sum_{e in E} w_e expert_e(x)  [+ shared(x), gated by sigmoid(g . x)]
 * Only the chosen experts' weights are read: a 30B-parameter model with 3B active costs per token what a 3B
 * dense model costs. A chunk of tokens is grouped by expert, so each expert's weights are read once per chunk. */
#include <math.h>
#include <string.h>

#include "blocks.h"

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* ---------------------------------------------------------------------------------------------
 * choosing the top k as the reference does, ties included
 *
 * transformers routes with torch.topk, which on a CPU selects with the C++ library: std::partial_sort when
 * 64 k <= n, else std::nth_element; both take equal scores in an order of their own (not "lowest index
 * first"). Routers do tie - a zero router row, a bf16 checkpoint's rounded logits, sigmoid saturating at 1 -
 * and a tie decides which experts run, so these functions select exactly as libstdc++'s algorithms do
 * (introselect: median-of-three quicksort partitions down to 3 elements, then insertion sort; a heap when
 * the partitions go too deep). Only the set chosen matters: the experts' outputs are summed in ascending id
 * order afterwards. Scores compare as torch's "largest": greater first, NaN above everything. */

typedef struct {
    float value;
    int index;
} Scored;

static int before(Scored a, Scored b) { return (isnan(a.value) && !isnan(b.value)) || a.value > b.value; }
static void swap_scored(Scored *a, Scored *b) {
    Scored t = *a;
    *a = *b, *b = t;
}

/* the heap of std::make_heap / std::pop_heap, ordered by before() */
static void heap_push(Scored *h, int hole, int top, Scored value) {
    for (int parent = (hole - 1) / 2; hole > top && before(h[parent], value); parent = (hole - 1) / 2)
        h[hole] = h[parent], hole = parent;
    h[hole] = value;
}
static void heap_adjust(Scored *h, int hole, int len, Scored value) {
    int top = hole, child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (before(h[child], h[child - 1])) child--;
        h[hole] = h[child], hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        h[hole] = h[child - 1], hole = child - 1;
    }
    heap_push(h, hole, top, value);
}
/* the k best of h[0..n) into h[0..k): a heap of k, each later element that beats its top replaces it */
static void heap_select(Scored *h, int k, int n) {
    for (int parent = (k - 2) / 2; k >= 2 && parent >= 0; parent--) heap_adjust(h, parent, k, h[parent]);
    for (int i = k; i < n; i++)
        if (before(h[i], h[0])) {
            Scored value = h[i];
            h[i] = h[0];
            heap_adjust(h, 0, k, value);
        }
}

static void insertion_sort(Scored *first, Scored *last) {
    for (Scored *i = first + 1; i < last; i++) {
        Scored value = *i;
        if (before(value, *first)) {
            memmove(first + 1, first, (size_t)(i - first) * sizeof *first);
            *first = value;
        } else {
            Scored *hole = i;
            for (; before(value, hole[-1]); hole--) *hole = hole[-1];
            *hole = value;
        }
    }
}

/* quicksort's partition around the median of (first + 1, middle, last - 1), moved to *first */
static Scored *partition(Scored *first, Scored *last) {
    Scored *a = first + 1, *b = first + (last - first) / 2, *c = last - 1;
    if (before(*a, *b)) swap_scored(first, before(*b, *c) ? b : before(*a, *c) ? c : a);
    else swap_scored(first, before(*a, *c) ? a : before(*b, *c) ? c : b);
    Scored *lo = first + 1, *hi = last;
    for (;; lo++) {
        while (before(*lo, *first)) lo++;
        for (hi--; before(*first, *hi);) hi--;
        if (lo >= hi) return lo;
        swap_scored(lo, hi);
    }
}

/* std::nth_element(first, first + k - 1, first + n): the k best land in first[0..k) */
static void nth_element(Scored *first, int k, int n) {
    Scored *nth = first + k - 1, *last = first + n;
    int depth = 0;
    for (int m = n; m > 1; m >>= 1) depth += 2;
    while (last - first > 3) {
        if (depth-- == 0) {
            heap_select(first, (int)(nth - first) + 1, (int)(last - first));
            swap_scored(first, nth);
            return;
        }
        Scored *cut = partition(first, last);
        if (cut <= nth) first = cut;
        else last = cut;
    }
    insertion_sort(first, last);
}

void router_top_k(const float *scores, const unsigned char *allowed, int n, int k, int *ids) {
    Scored pairs[MAX_EXPERTS];
    for (int i = 0; i < n; i++) pairs[i] = (Scored){!allowed || allowed[i] ? scores[i] : 0.0f, i};
    if ((long)k * 64 <= n) heap_select(pairs, k, n);
    else nth_element(pairs, k, n);
    for (int i = 0; i < k; i++) ids[i] = pairs[i].index;
    for (int i = 1; i < k; i++) /* ascending ids: every token sums its experts in the same order */
        for (int j = i; j > 0 && ids[j - 1] > ids[j]; j--) {
            int t = ids[j];
            ids[j] = ids[j - 1], ids[j - 1] = t;
        }
}

/* Grouped routing (DeepSeek): the experts form n_groups groups; a group scores by its best expert (V2's
 * group_limited_greedy) or the sum of its two best (V3), and only the topk_groups best groups may supply
 * experts. The others are out of the running, as in DeepSeek's inference code (-inf); transformers fills their
 * scores with 0 instead, which differs only when a biased score is negative. */
static void allow_best_groups(const FfnConfig *f, const float *choice, unsigned char *allowed) {
    int per = f->n_experts / f->n_groups, best[2], groups[MAX_EXPERTS];
    float group_score[MAX_EXPERTS];
    for (int g = 0; g < f->n_groups; g++) {
        int two = f->flags & MOE_GROUP_TOP2 && per > 1;
        router_top_k(choice + g * per, NULL, per, two ? 2 : 1, best);
        group_score[g] = choice[g * per + best[0]] + (two ? choice[g * per + best[1]] : 0.0f);
    }
    router_top_k(group_score, NULL, f->n_groups, f->topk_groups, groups);
    memset(allowed, 0, (size_t)f->n_experts);
    for (int i = 0; i < f->topk_groups; i++) memset(allowed + groups[i] * per, 1, (size_t)per);
}

/* One token's routing: ids[top_k] (ascending) and their weights, from its router logits (overwritten). */
static void route_token(const FfnConfig *f, const FfnWeights *w, float *logits, int *ids, float *weights) {
    int E = f->n_experts, K = f->top_k;
    float choice[MAX_EXPERTS];
    unsigned char allowed[MAX_EXPERTS];
    if (f->router == ROUTER_SOFTMAX) softmax(logits, E);
    else if (f->router == ROUTER_SIGMOID)
        for (int e = 0; e < E; e++) logits[e] = sigmoid(logits[e]);
    for (int e = 0; e < E; e++) choice[e] = logits[e] + (w->score_bias.data ? ((const float *)w->score_bias.data)[e] : 0.0f);
    if (f->n_groups > 1) allow_best_groups(f, choice, allowed);
    router_top_k(choice, f->n_groups > 1 ? allowed : NULL, E, K, ids);
    float sum = 0.0f;
    for (int k = 0; k < K; k++) weights[k] = logits[ids[k]];
    if (f->router == ROUTER_TOPK_SOFTMAX) softmax(weights, K);
    for (int k = 0; k < K; k++) sum += weights[k];
    for (int k = 0; k < K; k++) {
        if (f->flags & MOE_NORM_TOPK) weights[k] /= sum + 1e-20f;
        weights[k] *= f->routed_scale;
    }
}

/* Row r of a matrix of biases [rows][cols], as a vector */
static Tensor bias_row(const Tensor *t, int r) {
    Tensor b = *t;
    if (t->data) b.data = (const float *)t->data + (size_t)r * t->cols, b.rows = 1, b.packed = NULL;
    return b;
}

/* out[n][dim] = down(act(gate x + b) * (up x + b)) + b for one expert's (or the shared expert's) weights */
static void expert(float *out, const float *x, int n, const FfnConfig *f, RunState *s, const Tensor *gate,
                   const Tensor *up, const Tensor *down, const Tensor *b_gate, const Tensor *b_up, const Tensor *b_down,
                   int hidden) {
    matmul_many(&s->scratch, (Projection[]){{s->hb, up}, {s->hb2, gate}}, 2, x, n);
    if (b_up) add_bias(s->hb, b_up, n), add_bias(s->hb2, b_gate, n);
    if (f->activation == ACTIVATION_SWIGLU_CLAMPED) activate_clamped(s->hb, s->hb2, (size_t)n * hidden, f->act_alpha, f->act_limit);
    else activate(s->hb, s->hb2, (size_t)n * hidden, f->activation);
    matmul(&s->scratch, out, s->hb, down, n);
    if (b_down) add_bias(out, b_down, n);
}

void moe_block(const Model *m, int l, RunState *s, int n) {
    const FfnConfig *f = &m->config.layers[l].ffn;
    const FfnWeights *w = &m->weights.layers[l].ffn;
    int dim = m->config.dim, E = f->n_experts, K = f->top_k, scale_input = (f->flags & MOE_SCALE_INPUT) != 0;

    /* route every token of the chunk */
    matmul(&s->scratch, s->router_logits, s->xb, &w->router, n);
    add_bias(s->router_logits, &w->router_bias, n);
    for (int t = 0; t < n; t++)
        route_token(f, w, s->router_logits + (size_t)t * E, s->expert_ids + (size_t)t * K, s->expert_weights + (size_t)t * K);

    /* each expert, in ascending order, over the tokens routed to it */
    memset(s->xb2, 0, (size_t)n * dim * sizeof(float));
    for (int e = 0; e < E; e++) {
        int count = 0;
        for (int t = 0; t < n; t++)
            for (int k = 0; k < K; k++)
                if (s->expert_ids[(size_t)t * K + k] == e) {
                    float weight = s->expert_weights[(size_t)t * K + k];
                    float *xe = s->expert_x + (size_t)count * dim;
                    const float *xt = s->xb + (size_t)t * dim;
                    for (int j = 0; j < dim; j++) xe[j] = scale_input ? xt[j] * weight : xt[j];
                    s->expert_tokens[count] = t;
                    s->router_logits[count++] = scale_input ? 1.0f : weight; /* the logits are spent: reuse */
                }
        if (count == 0) continue;
        Tensor gate = tensor_matrix(&w->w_gate, e), up = tensor_matrix(&w->w_up, e), down = tensor_matrix(&w->w_down, e);
        Tensor b_gate = bias_row(&w->b_gate, e), b_up = bias_row(&w->b_up, e), b_down = bias_row(&w->b_down, e);
        int biased = (f->flags & MOE_EXPERT_BIAS) != 0;
        expert(s->expert_out, s->expert_x, count, f, s, &gate, &up, &down, biased ? &b_gate : NULL, biased ? &b_up : NULL,
               biased ? &b_down : NULL, f->hidden);
        for (int i = 0; i < count; i++) {
            float *y = s->xb2 + (size_t)s->expert_tokens[i] * dim, weight = s->router_logits[i];
            const float *ye = s->expert_out + (size_t)i * dim;
            for (int j = 0; j < dim; j++) y[j] += weight * ye[j];
        }
    }

    /* the shared expert sees every token (Qwen3-Next gates it per token) */
    if (!(f->flags & MOE_SHARED)) return;
    expert(s->expert_out, s->xb, n, f, s, &w->shared_w_gate, &w->shared_w_up, &w->shared_w_down, NULL, NULL, NULL,
           f->shared_hidden);
    for (int t = 0; t < n; t++) {
        float g = f->flags & MOE_SHARED_GATE ? sigmoid(dot_product(w->shared_gate.data, s->xb + (size_t)t * dim, dim)) : 1.0f;
        for (int j = 0; j < dim; j++) s->xb2[(size_t)t * dim + j] += g * s->expert_out[(size_t)t * dim + j];
    }
}
