/* deltanet.c - the gated delta rule (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"; Qwen3-Next's
 * linear-attention layers, three of every four).
 *
 * Linear attention adds every token's v k^T to its state S and reads S q; the state fills up and old
 * associations blur. The delta rule first asks what S already returns for the key, S k, and writes only
 * the correction, as one step of online regression (Widrow & Hoff 1960; Schlag et al. 2021):
 *     S <- S + beta (v - S k) k^T  =  S (I - beta k k^T) + beta v k^T
 * and the gate decays the whole state first, S <- alpha S, so that the layer can also forget:
 *     S_t = alpha_t S_t-1 (I - beta_t k_t k_t^T) + beta_t v_t k_t^T        o_t = S_t q_t
 * Per value head S is [k_head_dim][v_head_dim] (stored as S^T: row i belongs to key dimension i). q and k
 * come through a causal convolution and are L2-normalised (so |k| = 1 and beta in (0, 1) keeps the update
 * contracting); alpha = exp(-exp(A_log) softplus(a + dt_bias)) and beta = sigmoid(b) come from the token.
 * Prefill runs the chunked form of the reference (transformers' torch_chunk_gated_delta_rule): within a
 * chunk, the products (I - beta k k^T) are folded into one triangular solve (the WY representation), so a
 * chunk costs matrix products instead of one state update per token. */
#include "blocks.h"
#include "recurrent.h"

typedef struct {
    const DeltaNetConfig *cfg;
    float *S;                  /* [v_heads][k_head_dim][v_head_dim] */
    const float *u;            /* [n][conv_dim] = q | k | v after the convolution, q and k normalised */
    const float *beta, *g;     /* [n][v_heads]: beta_t, and log alpha_t */
    float *o;                  /* [n][v_heads * v_head_dim] */
    float *work;               /* per value head: deltanet_work_floats() */
    int n, conv_dim;
} DeltaScan;

/* Value head h's query, key (those of its key head) and value at token t */
static const float *head_q(const DeltaScan *s, int t, int h) {
    const DeltaNetConfig *c = s->cfg;
    return s->u + (size_t)t * s->conv_dim + (size_t)(h / (c->n_v_heads / c->n_k_heads)) * c->k_head_dim;
}
static const float *head_k(const DeltaScan *s, int t, int h) {
    return head_q(s, t, h) + (size_t)s->cfg->n_k_heads * s->cfg->k_head_dim;
}
static const float *head_v(const DeltaScan *s, int t, int h) {
    const DeltaNetConfig *c = s->cfg;
    return s->u + (size_t)t * s->conv_dim + 2 * (size_t)c->n_k_heads * c->k_head_dim + (size_t)h * c->v_head_dim;
}

/* x <- x / sqrt(|x|^2 + 1e-6) (the reference's l2norm, as in the FLA library), then * scale */
static void l2_normalize(float *x, int n, float scale) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss + 1e-6f);
    for (int i = 0; i < n; i++) x[i] = x[i] * inv * scale;
}

/* Floats of work space a value head needs for a chunk of Q tokens: the triangular matrix [Q][Q], the
 * decay sums G [Q], U = T (beta v) [Q][V], W = T (beta k exp G) [Q][K], the corrected values [Q][V] */
static size_t delta_work_floats(const DeltaNetConfig *c) {
    size_t Q = (size_t)c->chunk;
    return Q * Q + Q + Q * (2 * (size_t)c->v_head_dim + c->k_head_dim);
}

/* One token, value head h: the recurrence (decode)
 *     S <- alpha S;   d = beta (v - S k);   S <- S + k d^T;   o = S q     (S stored [k][v]) */
static void delta_step(const DeltaScan *s, int h) {
    const DeltaNetConfig *c = s->cfg;
    int K = c->k_head_dim, V = c->v_head_dim;
    const float *q = head_q(s, 0, h), *k = head_k(s, 0, h), *v = head_v(s, 0, h);
    float *S = s->S + (size_t)h * K * V, *o = s->o + (size_t)h * V, *d = s->work + (size_t)h * delta_work_floats(c);
    float alpha = exp_f32(s->g[h]), beta = s->beta[h];
    for (size_t x = 0; x < (size_t)K * V; x++) S[x] *= alpha;
    for (int j = 0; j < V; j++) d[j] = 0.0f;
    for (int i = 0; i < K; i++)
        for (int j = 0; j < V; j++) d[j] += S[(size_t)i * V + j] * k[i];
    for (int j = 0; j < V; j++) d[j] = (v[j] - d[j]) * beta;
    for (int j = 0; j < V; j++) o[j] = 0.0f;
    for (int i = 0; i < K; i++)
        for (int j = 0; j < V; j++) {
            S[(size_t)i * V + j] += k[i] * d[j];
            o[j] += S[(size_t)i * V + j] * q[i];
        }
}

/* Tokens t0 .. t0+q-1, value head h: the chunked form, step by step as the reference computes it.
 *   G_i = log alpha_t0 + ... + log alpha_t0+i                      (decay from the chunk's start)
 *   T   = (I - A)^-1,  A_ij = -beta_i (k_i . k_j) e^(G_i - G_j) for j < i   (the WY representation)
 *   U   = T (beta v),  W = T (beta k e^G)
 *   v'_i = U_i - W_i S                                             (the values, corrected by what S holds)
 *   o_i  = e^G_i q_i S  +  sum_{j<=i} (q_i . k_j) e^(G_i - G_j) v'_j
 *   S   <- e^G_q-1 S  +  sum_j e^(G_q-1 - G_j) k_j v'_j^T */
static void delta_chunk(const DeltaScan *s, int h, int t0, int q) {
    const DeltaNetConfig *c = s->cfg;
    int K = c->k_head_dim, V = c->v_head_dim, H = c->n_v_heads, Q = c->chunk;
    float *S = s->S + (size_t)h * K * V, *T = s->work + (size_t)h * delta_work_floats(c);
    float *G = T + (size_t)Q * Q, *U = G + Q, *W = U + (size_t)Q * V, *vn = W + (size_t)Q * K;
    for (int i = 0; i < q; i++) G[i] = (i ? G[i - 1] : 0.0f) + s->g[(size_t)(t0 + i) * H + h];
    /* A, strictly below the diagonal, then the forward substitution that turns it into T - I */
    for (int i = 0; i < q; i++) {
        const float *ki = head_k(s, t0 + i, h);
        float beta = s->beta[(size_t)(t0 + i) * H + h];
        for (int j = 0; j < q; j++) {
            float a = 0.0f;
            if (j < i) {
                const float *kj = head_k(s, t0 + j, h);
                for (int x = 0; x < K; x++) a += ki[x] * beta * kj[x];
                a = -(a * exp_f32(G[i] - G[j]));
            }
            T[(size_t)i * Q + j] = a;
        }
    }
    for (int i = 1; i < q; i++) {
        float *row = T + (size_t)i * Q, add[MAX_SCAN_CHUNK];
        for (int j = 0; j < i; j++) {
            add[j] = 0.0f;
            for (int m = j + 1; m < i; m++) add[j] += row[m] * T[(size_t)m * Q + j];
        }
        for (int j = 0; j < i; j++) row[j] += add[j];
    }
    for (int i = 0; i < q; i++) T[(size_t)i * Q + i] += 1.0f;
    /* U = T (beta v), W = T (beta k e^G) */
    for (int i = 0; i < q; i++) {
        float *Ui = U + (size_t)i * V, *Wi = W + (size_t)i * K;
        for (int x = 0; x < V; x++) Ui[x] = 0.0f;
        for (int x = 0; x < K; x++) Wi[x] = 0.0f;
        for (int j = 0; j <= i; j++) {
            float tij = T[(size_t)i * Q + j], beta = s->beta[(size_t)(t0 + j) * H + h], decay = exp_f32(G[j]);
            const float *vj = head_v(s, t0 + j, h), *kj = head_k(s, t0 + j, h);
            for (int x = 0; x < V; x++) Ui[x] += tij * (vj[x] * beta);
            for (int x = 0; x < K; x++) Wi[x] += tij * (kj[x] * beta * decay);
        }
    }
    /* the corrected values and the outputs, against the state before the chunk */
    for (int i = 0; i < q; i++) {
        const float *qi = head_q(s, t0 + i, h);
        float *vi = vn + (size_t)i * V, *o = s->o + (size_t)(t0 + i) * H * V + (size_t)h * V, decay = exp_f32(G[i]);
        for (int x = 0; x < V; x++) vi[x] = 0.0f, o[x] = 0.0f;
        for (int y = 0; y < K; y++) {
            float w = W[(size_t)i * K + y], qd = qi[y] * decay;
            for (int x = 0; x < V; x++) {
                vi[x] += w * S[(size_t)y * V + x];
                o[x] += qd * S[(size_t)y * V + x];
            }
        }
        for (int x = 0; x < V; x++) vi[x] = U[(size_t)i * V + x] - vi[x];
        for (int j = 0; j <= i; j++) {
            const float *kj = head_k(s, t0 + j, h);
            float a = 0.0f;
            for (int y = 0; y < K; y++) a += qi[y] * kj[y];
            a *= exp_f32(G[i] - G[j]);
            for (int x = 0; x < V; x++) o[x] += a * vn[(size_t)j * V + x];
        }
    }
    float total = exp_f32(G[q - 1]);
    for (size_t x = 0; x < (size_t)K * V; x++) S[x] *= total;
    for (int j = 0; j < q; j++) {
        const float *kj = head_k(s, t0 + j, h);
        float decay = exp_f32(G[q - 1] - G[j]);
        for (int y = 0; y < K; y++) {
            float ky = kj[y] * decay;
            for (int x = 0; x < V; x++) S[(size_t)y * V + x] += ky * vn[(size_t)j * V + x];
        }
    }
}

static void delta_heads(void *arg, int begin, int end) {
    const DeltaScan *s = arg;
    for (int h = begin; h < end; h++) {
        if (s->n == 1) delta_step(s, h);
        else
            for (int t0 = 0; t0 < s->n; t0 += s->cfg->chunk)
                delta_chunk(s, h, t0, s->n - t0 < s->cfg->chunk ? s->n - t0 : s->cfg->chunk);
    }
}

/* beta = sigmoid(b), log alpha = g = -exp(A_log) softplus(a + dt_bias), per token and value head */
static void delta_gates(float *beta, float *g, const DeltaNetConfig *c, const DeltaNetWeights *w, int n) {
    const float *a_log = f32_data(&w->a_log), *dt_bias = f32_data(&w->dt_bias);
    for (int t = 0; t < n; t++)
        for (int h = 0; h < c->n_v_heads; h++) {
            size_t i = (size_t)t * c->n_v_heads + h;
            beta[i] = sigmoid_f32(beta[i]);
            g[i] = -expf(a_log[h]) * softplus_f32(g[i] + dt_bias[h]);
        }
}

/* Each value head's output: RMSNorm over its v_head_dim (with weights), then times silu(z) (norm first,
 * then the gate: Qwen3-Next's order, the reverse of Mamba-2's) */
static void norm_then_gate(float *o, const float *z, const Tensor *w, int rows, int width, float eps) {
    for (int r = 0; r < rows; r++) rmsnorm(o + (size_t)r * width, o + (size_t)r * width, f32_data(w), width, eps);
    for (size_t i = 0; i < (size_t)rows * width; i++) o[i] *= silu_f32(z[i]);
}

size_t deltanet_scratch_floats(const DeltaNetConfig *c, int n) {
    size_t T = (size_t)n, inner = (size_t)c->n_v_heads * c->v_head_dim;
    size_t conv_dim = 2 * (size_t)c->n_k_heads * c->k_head_dim + inner;
    return T * (2 * conv_dim + 2 * inner + 2 * (size_t)c->n_v_heads) + c->n_v_heads * delta_work_floats(c);
}

int deltanet_block(const Model *m, int l, RunState *s, int n, int pos) {
    const DeltaNetConfig *a = &m->config.layers[l].deltanet;
    const DeltaNetWeights *w = &m->weights.layers[l].deltanet;
    StateLayer *st = kvcache_state(&s->kv, s->state_seq, l);
    int Hk = a->n_k_heads, Hv = a->n_v_heads, inner = Hv * a->v_head_dim, conv_dim = 2 * Hk * a->k_head_dim + inner;
    size_t T = (size_t)n;
    float *qkv = s->mixer_scratch, *u = qkv + T * conv_dim, *z = u + T * conv_dim, *o = z + T * inner;
    float *beta = o + T * inner, *g = beta + T * Hv, *work = g + T * Hv;
    (void)pos;

    /* q | k | v (convolved), z (the output gate), and per value head b and a (beta and the decay) */
    matmul_many(&s->scratch, (Projection[]){{qkv, &w->w_qkv}, {z, &w->w_z}, {beta, &w->w_beta}, {g, &w->w_decay}}, 4, s->xb, n);
    causal_conv_silu(u, qkv, n, conv_dim, st->window, &w->conv, &w->conv_bias);
    for (int t = 0; t < n; t++) /* |q| = 1 / sqrt(k_head_dim), |k| = 1 */
        for (int h = 0; h < 2 * Hk; h++)
            l2_normalize(u + (size_t)t * conv_dim + (size_t)h * a->k_head_dim, a->k_head_dim,
                         h < Hk ? 1.0f / sqrtf((float)a->k_head_dim) : 1.0f);
    delta_gates(beta, g, a, w, n);
    DeltaScan scan = {a, st->state, u, beta, g, o, work, n, conv_dim};
    long long work_estimate = (long long)n * Hv * a->k_head_dim * a->v_head_dim * (n > 1 ? 4 + a->chunk / 4 : 3);
    parallel_for(Hv, 1, work_estimate, delta_heads, &scan);
    norm_then_gate(o, z, &w->norm, n * Hv, a->v_head_dim, m->config.norm_eps);
    matmul(&s->scratch, s->xb2, o, &w->w_out, n);
    return 0;
}
