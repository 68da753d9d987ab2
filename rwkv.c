/* rwkv.c - RWKV-4 (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era"; RWKV/rwkv-4-169m-pile ...
 * 14b-pile), as transformers runs it. Each layer is a time mix (the mixer) and a channel mix (the FFN); both
 * blend every input with the previous token's ("token shift", a convolution of width 2):
 *     mix(x) = x * mu + x_prev * (1 - mu)          mu learned per channel and per use
 *
 * Time mixing replaces attention by a weighted mean of the values, per channel c, with weights that decay
 * by e^w per step back (w = -exp(time_decay) < 0) and a bonus u (time_first) for the token itself:
 *     wkv_t = (sum_{j<t} e^((t-1-j) w + k_j) v_j + e^(u + k_t) v_t) / (same sums without v)
 * It runs as a recurrence over num, den (the two sums) and their common exponent p, kept so that no e^x
 * overflows (the "numerically stable WKV"). out = W_o (sigmoid(r) * wkv): the receptance r gates it.
 * Channel mixing: out = sigmoid(W_r mix_r(x)) * W_v (relu(W_k mix_k(x)))^2. */
#include "blocks.h"
#include "recurrent.h"

/* out[n][dim] = x * mu + prev * (1 - mu), prev the token before (row t-1, or `last` before the first) */
static void token_shift(float *out, const float *x, const float *last, const Tensor *mu, int n, int dim) {
    const float *m = f32_data(mu);
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim, *prev = t ? xt - dim : last;
        for (int c = 0; c < dim; c++) out[(size_t)t * dim + c] = xt[c] * m[c] + prev[c] * (1.0f - m[c]);
    }
}

typedef struct {
    float *num, *den, *p;       /* the state: [inner] each */
    const float *k, *v, *decay, *first;
    float *wkv;                 /* [n][inner] */
    int n, inner;
} Wkv;

/* The WKV recurrence, channels [begin, end), token after token (transformers' rwkv_linear_attention_cpu):
 *   output: q = max(p, u + k);  wkv = (e^(p-q) num + e^(u+k-q) v) / (e^(p-q) den + e^(u+k-q))
 *   state:  q = max(p + w, k);  num = e^(p+w-q) num + e^(k-q) v;  den = e^(p+w-q) den + e^(k-q);  p = q */
static void wkv_channels(void *arg, int begin, int end) {
    const Wkv *s = arg;
    for (int c = begin; c < end; c++) {
        float num = s->num[c], den = s->den[c], p = s->p[c], w = -expf(s->decay[c]), u = s->first[c];
        for (int t = 0; t < s->n; t++) {
            float k = s->k[(size_t)t * s->inner + c], v = s->v[(size_t)t * s->inner + c];
            float q = fmaxf(p, k + u), e1 = exp_f32(p - q), e2 = exp_f32(k + u - q);
            s->wkv[(size_t)t * s->inner + c] = (e1 * num + e2 * v) / (e1 * den + e2);
            q = fmaxf(p + w, k), e1 = exp_f32(p + w - q), e2 = exp_f32(k - q);
            num = e1 * num + e2 * v, den = e1 * den + e2, p = q;
        }
        s->num[c] = num, s->den[c] = den, s->p[c] = p;
    }
}

int rwkv_block(const Model *m, int l, RunState *s, int n, int pos) {
    const RwkvConfig *a = &m->config.layers[l].rwkv;
    const RwkvWeights *w = &m->weights.layers[l].rwkv;
    StateLayer *st = kvcache_state(&s->kv, s->state_seq, l);
    int dim = m->config.dim, A = a->inner;
    size_t T = (size_t)n;
    float *xk = s->mixer_scratch, *xv = xk + T * dim, *xr = xv + T * dim, *k = xr + T * dim, *v = k + T * A;
    float *r = v + T * A, *wkv = r + T * A;
    float *num = st->state, *den = num + A, *p = den + A;
    if (pos == 0) /* no token yet: the exponent of the empty sums is -infinity (the reference's -1e38) */
        for (int c = 0; c < A; c++) p[c] = -1e38f;

    token_shift(xk, s->xb, st->window, &w->mix_k, n, dim);
    token_shift(xv, s->xb, st->window, &w->mix_v, n, dim);
    token_shift(xr, s->xb, st->window, &w->mix_r, n, dim);
    memcpy(st->window, s->xb + (T - 1) * dim, (size_t)dim * sizeof(float)); /* the next chunk's previous token */
    matmul(&s->scratch, k, xk, &w->w_k, n);
    matmul(&s->scratch, v, xv, &w->w_v, n);
    matmul(&s->scratch, r, xr, &w->w_r, n);
    Wkv scan = {num, den, p, k, v, f32_data(&w->decay), f32_data(&w->first), wkv, n, A};
    parallel_for(A, 64, (long long)n * A * 16, wkv_channels, &scan);
    for (size_t i = 0; i < T * A; i++) wkv[i] *= sigmoid_f32(r[i]);
    matmul(&s->scratch, s->xb2, wkv, &w->w_out, n);
    return 0;
}

void rwkv_ffn_block(const Model *m, int l, RunState *s, int n) {
    const RwkvWeights *w = &m->weights.layers[l].rwkv;
    StateLayer *st = kvcache_state(&s->kv, s->state_seq, l);
    int dim = m->config.dim;
    size_t T = (size_t)n, hidden = (size_t)m->config.layers[l].ffn.hidden;
    float *xk = s->mixer_scratch, *xr = xk + T * dim, *r = xr + T * dim;

    token_shift(xk, s->xb, st->ffn, &w->ffn_mix_k, n, dim);
    token_shift(xr, s->xb, st->ffn, &w->ffn_mix_r, n, dim);
    memcpy(st->ffn, s->xb + (T - 1) * dim, (size_t)dim * sizeof(float));
    matmul(&s->scratch, s->hb, xk, &w->ffn_w_k, n);
    for (size_t i = 0; i < T * hidden; i++) s->hb[i] = s->hb[i] > 0.0f ? s->hb[i] * s->hb[i] : 0.0f; /* relu(x)^2 */
    matmul(&s->scratch, r, xr, &w->ffn_w_r, n);
    matmul(&s->scratch, s->xb2, s->hb, &w->ffn_w_v, n);
    for (size_t i = 0; i < T * dim; i++) s->xb2[i] *= sigmoid_f32(r[i]);
}
