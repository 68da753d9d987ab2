/* recurrent.c - the pieces the recurrent mixers share: state shapes, scratch sizes, the causal convolution. */
#include "recurrent.h"

#include <string.h>

int is_recurrent(const LayerConfig *l) { return l->mixer != MIXER_ATTENTION && l->mixer != MIXER_LATENT_ATTENTION; }

const char *mixer_name(MixerKind kind) {
    switch (kind) {
    case MIXER_MAMBA: return "mamba";
    case MIXER_MAMBA2: return "mamba2";
    case MIXER_GATED_DELTANET: return "gated_deltanet";
    case MIXER_RWKV: return "rwkv";
    case MIXER_LATENT_ATTENTION: return "latent attention";
    default: return "attention";
    }
}

RecurrentDims recurrent_dims(const LayerConfig *l) {
    RecurrentDims d = {0, 0, 0, 0, 0, 0, 0};
    switch (l->mixer) {
    case MIXER_MAMBA: {
        const MambaConfig *a = &l->mamba;
        d = (RecurrentDims){a->inner, a->state, a->conv, a->inner, a->dt_rank, 0, 0};
        break;
    }
    case MIXER_MAMBA2: { /* the convolution runs over x | B | C */
        const Mamba2Config *a = &l->mamba2;
        int inner = a->n_heads * a->head_dim;
        d = (RecurrentDims){inner, a->state, a->conv, inner + 2 * a->n_groups * a->state, 0, a->n_heads, a->head_dim};
        break;
    }
    case MIXER_GATED_DELTANET: { /* the convolution runs over q | k | v; inner: the values */
        const DeltaNetConfig *a = &l->deltanet;
        int inner = a->n_v_heads * a->v_head_dim;
        d = (RecurrentDims){inner, 0, a->conv, inner + 2 * a->n_k_heads * a->k_head_dim, 0, a->n_v_heads, a->v_head_dim};
        break;
    }
    case MIXER_RWKV: d.inner = l->rwkv.inner; break;
    default: break;
    }
    return d;
}

StateShape layer_state_shape(const Config *c, const LayerConfig *l) {
    StateShape s = {0, 0, 0};
    RecurrentDims d = recurrent_dims(l);
    if (d.conv) s.window = (size_t)(d.conv - 1) * d.conv_dim; /* the convolution's last conv - 1 inputs */
    if (l->ffn_kind == FFN_RWKV) s.ffn = (size_t)c->dim;      /* RWKV's channel mix: the previous token */
    switch (l->mixer) {
    case MIXER_MAMBA: s.state = (size_t)d.inner * d.state; break; /* h: inner x N */
    case MIXER_MAMBA2: s.state = (size_t)d.inner * d.state; break; /* S: heads x head_dim x N */
    case MIXER_GATED_DELTANET: s.state = (size_t)d.inner * l->deltanet.k_head_dim; break; /* S: v_heads x k x v */
    case MIXER_RWKV: /* the previous token; num, den and their exponent per channel */
        s.window = (size_t)c->dim;
        s.state = 3 * (size_t)d.inner;
        break;
    default: break;
    }
    return s;
}

/* RWKV's channel mix: its two shifted inputs and the receptance, [T][dim] each */
static size_t ffn_scratch_floats(const Config *c, const LayerConfig *l, int n) {
    return l->ffn_kind == FFN_RWKV ? 3 * (size_t)n * c->dim : 0;
}

static size_t mixer_only_scratch_floats(const Config *c, const LayerConfig *l, int n) {
    size_t T = (size_t)n;
    switch (l->mixer) {
    case MIXER_MAMBA: { /* x, z, conv(x), dt, y [T][inner]; dt_low [T][R]; B, C [T][N]; A [inner][N] */
        const MambaConfig *a = &l->mamba;
        return T * (5 * (size_t)a->inner + a->dt_rank + 2 * (size_t)a->state) + (size_t)a->inner * a->state;
    }
    case MIXER_MAMBA2: { /* z, y [T][inner]; xbc, u [T][conv_dim]; dt [T][heads]; running sums [heads][chunk] */
        RecurrentDims d = recurrent_dims(l);
        return T * (2 * (size_t)d.inner + 2 * (size_t)d.conv_dim + d.heads) + (size_t)d.heads * l->mamba2.chunk;
    }
    case MIXER_GATED_DELTANET: return deltanet_scratch_floats(&l->deltanet, n);
    case MIXER_RWKV: /* the shifted x for k, v, r [T][dim]; k, v, r, wkv [T][inner] */
        return T * (3 * (size_t)c->dim + 4 * (size_t)l->rwkv.inner);
    case MIXER_ATTENTION: /* the output gate [T][q_dim] */
        return l->attn.flags & ATTN_OUTPUT_GATE ? T * l->attn.n_heads * l->attn.head_dim : 0;
    default: return 0;
    }
}

size_t mixer_scratch_floats(const Config *c, const LayerConfig *l, int n) {
    size_t mixer = mixer_only_scratch_floats(c, l, n), ffn = ffn_scratch_floats(c, l, n);
    return mixer > ffn ? mixer : ffn;
}

int mixer_widest_input(const LayerConfig *l) {
    switch (l->mixer) {
    case MIXER_MAMBA: return l->mamba.inner > l->mamba.dt_rank ? l->mamba.inner : l->mamba.dt_rank;
    default: return recurrent_dims(l).inner; /* the output projection's input */
    }
}

typedef struct {
    float *out;
    const float *x, *w, *b;
    const float *window;
    int n, channels, K;
} Conv;

/* channels [begin, end) of every token: tap after tap, each over all the channels at once (so it vectorises;
 * every channel still sums b, then the taps in order) */
static void conv_channels(void *arg, int begin, int end) {
    const Conv *c = arg;
    int K = c->K, C = c->channels;
    for (int t = 0; t < c->n; t++) {
        float *out = c->out + (size_t)t * C;
        for (int ch = begin; ch < end; ch++) out[ch] = c->b ? c->b[ch] : 0.0f;
        for (int k = 0; k < K; k++) {
            int src = t - (K - 1) + k; /* input position relative to the chunk: < 0 is in the window */
            const float *x = src >= 0 ? c->x + (size_t)src * C : c->window + (size_t)(src + K - 1) * C;
            for (int ch = begin; ch < end; ch++) out[ch] += c->w[(size_t)ch * K + k] * x[ch];
        }
        for (int ch = begin; ch < end; ch++) out[ch] = silu_f32(out[ch]);
    }
}

void causal_conv_silu(float *out, const float *x, int n, int channels, float *window, const Tensor *weight,
                      const Tensor *bias) {
    int K = weight->cols;
    Conv c = {out, x, f32_data(weight), bias->data ? f32_data(bias) : NULL, window, n, channels, K};
    parallel_for(channels, 64, (long long)n * channels * K, conv_channels, &c);
    /* the window keeps the last K-1 inputs: slide it by n (some of them may still be old ones) */
    int keep = K - 1;
    if (keep == 0) return;
    if (n >= keep) {
        memcpy(window, x + (size_t)(n - keep) * channels, (size_t)keep * channels * sizeof(float));
    } else {
        memmove(window, window + (size_t)n * channels, (size_t)(keep - n) * channels * sizeof(float));
        memcpy(window + (size_t)(keep - n) * channels, x, (size_t)n * channels * sizeof(float));
    }
}
