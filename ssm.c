/* ssm.c - the selective state space models: Mamba (S6; Gu & Dao 2023) and Mamba-2 (SSD; Dao & Gu 2024).
 *
 * A state space model maps a sequence x_t to y_t through a hidden state h of N numbers per channel:
 *     h_t = exp(dt A) h_t-1 + dt B x_t        y_t = C . h_t + D x_t
 * "Selective": dt, B and C are computed from the token itself, so the model chooses, token by token, what
 * to keep (dt small: h barely moves) and what to let in (dt large: h forgets and takes x). The state is all a
 * layer remembers: its memory is constant in the number of tokens. Both mixers run, per layer,
 *     in_proj -> causal conv1d -> SiLU -> (dt, B, C) -> scan -> gate by z -> out_proj
 * and differ in the shapes of A, dt, B and C. */
#include "blocks.h"
#include "recurrent.h"

/* ---------------------------------------------------------------------------------------------
 * Mamba (state-spaces/mamba-130m ... 2.8b, Falcon-Mamba): every channel of the inner width has its own dt,
 * and A is a matrix [inner][N] (a decay per channel and state dimension); B and C are shared by the channels. */

/* A = -exp(A_log) [inner][N]: negative, so exp(dt A) < 1 is a decay */
static void mamba_decays(float *A, const MambaWeights *w, size_t count) {
    const float *a_log = f32_data(&w->a_log);
    for (size_t i = 0; i < count; i++) A[i] = -expf(a_log[i]);
}

/* dt = softplus(dt_proj . dt_low + b) [n][inner]: a positive step per channel, through a rank-R bottleneck */
static void mamba_steps(MatmulScratch *ws, float *dt, const float *dt_low, const MambaWeights *w, int n) {
    matmul(ws, dt, dt_low, &w->w_dt, n);
    add_bias(dt, &w->dt_bias, n);
    for (size_t i = 0; i < (size_t)n * w->w_dt.rows; i++) dt[i] = softplus_f32(dt[i]);
}

typedef struct {
    const MambaConfig *cfg;
    const MambaWeights *w;
    float *h;                  /* the state [inner][N] */
    const float *A, *u, *z, *dt, *B, *C;
    float *y;
    int n;
} MambaScan;

/* The selective scan, channels [begin, end), token after token (the reference's own loop; decode is n = 1):
 *     h[c][i] = exp(dt[c] A[c][i]) h[c][i] + (dt[c] B[i]) u[c]
 *     y[c]    = (sum_i h[c][i] C[i] + D[c] u[c]) * silu(z[c]) */
static void mamba_scan_channels(void *arg, int begin, int end) {
    const MambaScan *s = arg;
    int N = s->cfg->state, inner = s->cfg->inner;
    const float *D = f32_data(&s->w->d);
    for (int c = begin; c < end; c++) { /* a channel's state stays in the cache while the tokens go by */
        float *h = s->h + (size_t)c * N;
        const float *A = s->A + (size_t)c * N;
        for (int t = 0; t < s->n; t++) {
            size_t tc = (size_t)t * inner + c;
            const float *B = s->B + (size_t)t * N, *C = s->C + (size_t)t * N;
            float dt = s->dt[tc], u = s->u[tc];
            for (int i = 0; i < N; i++) h[i] = exp_f32(A[i] * dt) * h[i] + dt * B[i] * u;
            s->y[tc] = (dot_product(h, C, N) + u * D[c]) * silu_f32(s->z[tc]);
        }
    }
}

int mamba_block(const Model *m, int l, RunState *s, int n, int pos) {
    const MambaConfig *a = &m->config.layers[l].mamba;
    const MambaWeights *w = &m->weights.layers[l].mamba;
    StateLayer *st = kvcache_state(&s->kv, s->state_seq, l);
    size_t T = (size_t)n, inner = (size_t)a->inner, N = (size_t)a->state;
    float *x = s->mixer_scratch, *z = x + T * inner, *u = z + T * inner, *dt = u + T * inner, *y = dt + T * inner;
    float *dt_low = y + T * inner, *B = dt_low + T * a->dt_rank, *C = B + T * N, *A = C + T * N;
    (void)pos;

    /* x and z: two projections of the input; z only gates the output */
    matmul_many(&s->scratch, (Projection[]){{x, &w->w_x}, {z, &w->w_z}}, 2, s->xb, n);
    add_bias(x, &w->b_x, n);
    add_bias(z, &w->b_z, n);
    /* u = silu(conv(x)): each channel sees its last `conv` inputs */
    causal_conv_silu(u, x, n, a->inner, st->window, &w->conv, &w->conv_bias);
    /* the selection: dt, B and C from u */
    matmul_many(&s->scratch, (Projection[]){{dt_low, &w->w_dt_low}, {B, &w->w_b}, {C, &w->w_c}}, 3, u, n);
    mamba_steps(&s->scratch, dt, dt_low, w, n);
    mamba_decays(A, w, inner * N);
    MambaScan scan = {a, w, st->state, A, u, z, dt, B, C, y, n};
    parallel_for(a->inner, 16, (long long)n * inner * N * 8, mamba_scan_channels, &scan);
    matmul(&s->scratch, s->xb2, y, &w->w_out, n);
    add_bias(s->xb2, &w->b_out, n);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Mamba-2 (mistralai/Mamba-Codestral, Granite-4.0-H, Nemotron-H, Falcon-H1): the channels form heads of
 * head_dim, and A is one scalar per head, so the state of a head is [head_dim][N] and decays as one. B and C
 * are shared by the heads of a group (like keys and queries in GQA). With a scalar decay the scan over a
 * chunk is a matrix product, "state space duality": within a chunk,
 *     y_i = sum_{j<=i} (C_i . B_j) exp(a_j+1 + ... + a_i) dt_j x_j  +  exp(a_1 + ... + a_i) C_i . S
 * is masked attention with C as queries, B as keys and dt x as values under a decaying causal mask, and the
 * state S carries everything before the chunk (Dao & Gu 2024). Prefill runs that chunked form, as the
 * reference does; decode runs the recurrence  S = exp(dt a) S + dt x B^T,  y = S C + D x. */

typedef struct {
    const Mamba2Config *cfg;
    const Mamba2Weights *w;
    float *S;               /* the state [heads][head_dim][N] */
    const float *u, *dt;    /* u [n][conv_dim] = x | B | C after the convolution; dt [n][heads] */
    float *y, *cum;         /* y [n][inner]; cum [heads][chunk]: running sums of a_t = dt_t A */
    int n, conv_dim;
} Mamba2Scan;

/* Head h's inputs at token t: its x (head_dim), and its group's B and C (N each) */
static const float *head_x(const Mamba2Scan *s, int t, int h) { return s->u + (size_t)t * s->conv_dim + (size_t)h * s->cfg->head_dim; }
static const float *group_b(const Mamba2Scan *s, int t, int h) {
    const Mamba2Config *c = s->cfg;
    int g = h / (c->n_heads / c->n_groups);
    return s->u + (size_t)t * s->conv_dim + (size_t)c->n_heads * c->head_dim + (size_t)g * c->state;
}
static const float *group_c(const Mamba2Scan *s, int t, int h) { return group_b(s, t, h) + (size_t)s->cfg->n_groups * s->cfg->state; }

/* One token, head h: the recurrence (decode)
 *     S[p][i] = exp(dt A) S[p][i] + (dt B[i]) x[p]        y[p] = S[p] . C + D x[p] */
static void mamba2_step(const Mamba2Scan *s, int h) {
    const Mamba2Config *c = s->cfg;
    int P = c->head_dim, N = c->state;
    float dt = s->dt[h], decay = exp_f32(dt * -expf(f32_data(&s->w->a_log)[h])), D = f32_data(&s->w->d)[h];
    const float *x = head_x(s, 0, h), *B = group_b(s, 0, h), *C = group_c(s, 0, h);
    float *S = s->S + (size_t)h * P * N, *y = s->y + (size_t)h * P;
    for (int p = 0; p < P; p++) {
        float *row = S + (size_t)p * N;
        for (int i = 0; i < N; i++) row[i] = row[i] * decay + dt * B[i] * x[p];
        y[p] = dot_product(row, C, N) + x[p] * D;
    }
}

/* Tokens t0 .. t0+q-1, head h: the chunked form. cum[i] = a_t0 + ... + a_t0+i with a_t = dt_t A;
 *   y_i   = D x_i + exp(cum[i]) C_i . S  +  sum_{j<=i} (C_i . B_j) exp(cum[i] - cum[j]) dt_j x_j
 *   S    <- exp(cum[q-1]) S  +  sum_j exp(cum[q-1] - cum[j]) dt_j x_j B_j^T
 * exp(cum[i] - cum[j]) is summed as a_j+1 + ... + a_i from i down (no difference of large sums). */
static void mamba2_chunk(const Mamba2Scan *s, int h, int t0, int q) {
    const Mamba2Config *c = s->cfg;
    int P = c->head_dim, N = c->state, H = c->n_heads, inner = H * P;
    float A = -expf(f32_data(&s->w->a_log)[h]), D = f32_data(&s->w->d)[h];
    float *S = s->S + (size_t)h * P * N, *cum = s->cum + (size_t)h * c->chunk;
    for (int i = 0; i < q; i++) cum[i] = (i ? cum[i - 1] : 0.0f) + A * s->dt[(size_t)(t0 + i) * H + h];
    for (int i = 0; i < q; i++) {
        int t = t0 + i;
        const float *x = head_x(s, t, h), *C = group_c(s, t, h);
        float *y = s->y + (size_t)t * inner + (size_t)h * P, from_state = exp_f32(cum[i]);
        for (int p = 0; p < P; p++) y[p] = dot_product(C, S + (size_t)p * N, N) * from_state; /* what came before */
        float seg = 0.0f; /* a_j+1 + ... + a_i */
        for (int j = i; j >= 0; j--) {
            const float *B = group_b(s, t0 + j, h), *xj = head_x(s, t0 + j, h);
            float dt = s->dt[(size_t)(t0 + j) * H + h], weight = dot_product(C, B, N) * exp_f32(seg);
            for (int p = 0; p < P; p++) y[p] += weight * (xj[p] * dt);
            seg += A * dt;
        }
        for (int p = 0; p < P; p++) y[p] += x[p] * D;
    }
    float total = exp_f32(cum[q - 1]);
    for (size_t k = 0; k < (size_t)P * N; k++) S[k] *= total;
    for (int j = 0; j < q; j++) {
        const float *B = group_b(s, t0 + j, h), *xj = head_x(s, t0 + j, h);
        float dt = s->dt[(size_t)(t0 + j) * H + h], decay = exp_f32(cum[q - 1] - cum[j]);
        for (int p = 0; p < P; p++) {
            float v = decay * (xj[p] * dt);
            for (int k = 0; k < N; k++) S[(size_t)p * N + k] += v * B[k];
        }
    }
}

static void mamba2_heads(void *arg, int begin, int end) {
    const Mamba2Scan *s = arg;
    for (int h = begin; h < end; h++) {
        if (s->n == 1) mamba2_step(s, h);
        else
            for (int t0 = 0; t0 < s->n; t0 += s->cfg->chunk)
                mamba2_chunk(s, h, t0, s->n - t0 < s->cfg->chunk ? s->n - t0 : s->cfg->chunk);
    }
}

/* dt = clamp(softplus(dt + dt_bias), dt_min, dt_max), per token and head */
static void mamba2_steps(float *dt, const Mamba2Config *c, const Mamba2Weights *w, int n) {
    const float *bias = f32_data(&w->dt_bias);
    for (int t = 0; t < n; t++)
        for (int h = 0; h < c->n_heads; h++) {
            float v = softplus_f32(dt[(size_t)t * c->n_heads + h] + bias[h]);
            dt[(size_t)t * c->n_heads + h] = fminf(fmaxf(v, c->dt_min), c->dt_max);
        }
}

/* The gated RMSNorm of Mamba-2 as transformers has it: gate first, then one RMSNorm over the whole inner width
 *     y <- rmsnorm(y * silu(z)) * w */
static void gate_then_norm(float *y, const float *z, const Tensor *w, int n, int inner, float eps) {
    for (size_t i = 0; i < (size_t)n * inner; i++) y[i] *= silu_f32(z[i]);
    for (int t = 0; t < n; t++) rmsnorm(y + (size_t)t * inner, y + (size_t)t * inner, f32_data(w), inner, eps);
}

int mamba2_block(const Model *m, int l, RunState *s, int n, int pos) {
    const Mamba2Config *a = &m->config.layers[l].mamba2;
    const Mamba2Weights *w = &m->weights.layers[l].mamba2;
    StateLayer *st = kvcache_state(&s->kv, s->state_seq, l);
    int inner = a->n_heads * a->head_dim, conv_dim = inner + 2 * a->n_groups * a->state;
    size_t T = (size_t)n;
    float *z = s->mixer_scratch, *xbc = z + T * inner, *u = xbc + T * conv_dim, *dt = u + T * conv_dim;
    float *y = dt + T * a->n_heads, *cum = y + T * inner;
    (void)pos;

    /* one input projection in three parts: z (the gate), x | B | C (convolved), dt (one per head) */
    matmul_many(&s->scratch, (Projection[]){{z, &w->w_z}, {xbc, &w->w_xbc}, {dt, &w->w_dt}}, 3, s->xb, n);
    add_bias(z, &w->b_z, n);
    add_bias(xbc, &w->b_xbc, n);
    add_bias(dt, &w->b_dt, n);
    causal_conv_silu(u, xbc, n, conv_dim, st->window, &w->conv, &w->conv_bias);
    mamba2_steps(dt, a, w, n);
    Mamba2Scan scan = {a, w, st->state, u, dt, y, cum, n, conv_dim};
    long long work = (long long)n * inner * a->state * (n > 1 ? 4 + a->chunk / 2 : 3);
    parallel_for(a->n_heads, 1, work, mamba2_heads, &scan);
    gate_then_norm(y, z, &w->norm, n, inner, m->config.norm_eps);
    matmul(&s->scratch, s->xb2, y, &w->w_out, n);
    add_bias(s->xb2, &w->b_out, n);
    return 0;
}
