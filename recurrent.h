/* recurrent.h - what the recurrent mixers (ssm.c: Mamba, Mamba-2; deltanet.c: Gated DeltaNet; rwkv.c: RWKV)
 * share: the size of the state each layer keeps, their scratch space, the causal convolution in front of
 * their scans, and a few scalar functions.
 *
 * Linear attention in one line (Katharopoulos et al. 2020): drop the softmax, and attention over every
 * earlier token  o_t = sum_{j<=t} (q_t . k_j) v_j  becomes  o_t = S_t q_t  with  S_t = S_{t-1} + v_t k_t^T:
 * a state of fixed size updated once per token, instead of a cache that grows. Each kind here is such a
 * recurrence with a different update of S (docs/ATTENTION.md, "Beyond attention"):
 *   Mamba      S_t = exp(dt_t A) * S_t-1 + dt_t x_t B_t^T     per channel, a decay per state dimension
 *   Mamba-2    S_t = exp(dt_t a) S_t-1 + dt_t x_t B_t^T       per head, one scalar decay
 *   DeltaNet   S_t = g_t S_t-1 (I - b_t k_t k_t^T) + b_t v_t k_t^T   the delta rule: overwrite, not add
 *   RWKV-4     num_t = e^w num_t-1 + e^k_t v_t, den likewise  per channel, a softmax-like weighted mean */
#ifndef ATTN_RECURRENT_H
#define ATTN_RECURRENT_H

#include <math.h>

#include "model.h"

#define MAX_CONV_KERNEL 64           /* causal convolution widths (real models: 4) */
#define MAX_STATE_SIZE 1024          /* Mamba's / Mamba-2's state dimension N (real models: 16 .. 256) */
#define MAX_SCAN_CHUNK 1024          /* chunk of the chunked scans (real models: 64 .. 256) */
#define MAX_STATE_FLOATS (1u << 26)  /* one layer's state, at most (Qwen3-Next-80B: 2^19 floats) */

/* The sizes tensors.def names for a recurrent mixer (0 where the kind has no such size):
 *   inner     channels between the input and the output projection (Mamba-2: heads x head_dim; Gated
 *             DeltaNet: the value width, v_heads x v_head_dim; RWKV: the time-mix width)
 *   state     Mamba / Mamba-2: N, the state dimension of a channel / of each head's row
 *   conv      taps of the causal convolution;  conv_dim: the channels it runs over
 *   dt_rank   Mamba: the bottleneck of dt;  heads, head_dim: Mamba-2, Gated DeltaNet (value heads) */
typedef struct {
    int inner, state, conv, conv_dim, dt_rank, heads, head_dim;
} RecurrentDims;
RecurrentDims recurrent_dims(const LayerConfig *l);

/* 1 if the layer's mixer is a recurrence rather than attention (softmax or latent) */
int is_recurrent(const LayerConfig *l);
/* "mamba", "mamba2", "gated_deltanet", "rwkv", "latent attention" (or "attention") */
const char *mixer_name(MixerKind kind);
/* The state the layer keeps between tokens (all zero for an attention layer without an RWKV FFN) */
StateShape layer_state_shape(const Config *c, const LayerConfig *l);
/* Floats of RunState.mixer_scratch the layer's mixer (and an RWKV channel mix) needs for n tokens at once */
size_t mixer_scratch_floats(const Config *c, const LayerConfig *l, int n);
/* Gated DeltaNet's part of it (deltanet.c) */
size_t deltanet_scratch_floats(const DeltaNetConfig *c, int n);
/* The widest input of the layer's matrix products besides dim (matmul_scratch_reserve) */
int mixer_widest_input(const LayerConfig *l);

/* Causal depthwise convolution over n tokens of `channels`, each channel with its own K taps (weight
 * [channels][K], the newest input last), then SiLU (Mamba, Mamba-2, Gated DeltaNet):
 *     out_t[c] = silu(b[c] + sum_k w[c][k] x_{t-K+1+k}[c])
 * The K-1 inputs before the chunk come from window ([K-1][channels], zeros before the first token), which is
 * left holding the chunk's last K-1 inputs. x and out are [n][channels]. */
void causal_conv_silu(float *out, const float *x, int n, int channels, float *window, const Tensor *weight,
                      const Tensor *bias);

/* The floats of an F32 tensor (vectors, convolution taps, A_log: tensors.def stores them as f32) */
static inline const float *f32_data(const Tensor *t) { return (const float *)t->data; }

static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
static inline float silu_f32(float x) { return x / (1.0f + exp_f32(-x)); }
/* softplus(x) = log(1 + e^x), as torch computes it (x itself above 20) */
static inline float softplus_f32(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

#endif
