/* model.h - the model: config (model-wide + one record per layer), weights in the mapped file, forward().
 *
 * A layer is data: a MIXER (how the positions exchange information - softmax attention today; latent attention
 * and recurrent kinds are other kinds of the same slot) and an FFN (dense gated, dense plain, mixture of
 * experts, or none), each with its own parameter block, and the norms around them:
 *     x += mixer_post_norm(mixer(mixer_norm(x)))
 *     x += ffn_post_norm(ffn(ffn_norm(x)))
 * The file layout is docs/FORMAT.md; model.c reads it in that order, tensors.def lists every tensor. */
#ifndef ATTN_MODEL_H
#define ATTN_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "attention.h"
#include "chat.h"
#include "kvcache.h"
#include "ops.h"
#include "tokenizer.h"

#define MODEL_MAGIC "ATNC"
#define MODEL_VERSION 2

enum { NORM_RMS = 0, NORM_LAYER = 1 };
enum { POS_ROPE = 0, POS_LEARNED = 1 };

/* What mixes the positions (the "token mixer" of the layer): softmax attention over a cache that grows with
 * the tokens (or its latent form), or a recurrence over a state of fixed size (recurrent.h). */
typedef enum {
    MIXER_ATTENTION = 1,
    MIXER_LATENT_ATTENTION = 2, /* DeepSeek's multi-head latent attention, MLA (mla.c) */
    MIXER_MAMBA = 3,          /* Mamba's selective scan, S6 (Gu & Dao 2023) */
    MIXER_MAMBA2 = 4,         /* Mamba-2's state space duality, SSD (Dao & Gu 2024; Granite-4.0-H) */
    MIXER_GATED_DELTANET = 5, /* the gated delta rule (Yang et al. 2024; Qwen3-Next) */
    MIXER_RWKV = 6,           /* RWKV-4's time mixing, the WKV recurrence (Peng et al. 2023) */
} MixerKind;
#define MIXER_KIND_COUNT 7
/* What transforms each position on its own (RWKV's channel mix also sees the previous position). */
typedef enum { FFN_NONE = 0, FFN_GATED = 1, FFN_PLAIN = 2, FFN_MOE = 3, FFN_RWKV = 4 } FfnKind;
#define FFN_KIND_COUNT 5

/* Flag bits. Each record has its own range, so that one word (layer | mixer | FFN | model flags) says which
 * tensors a layer has (tensors.def). */
enum {
    /* layer record: the norms around the two blocks */
    LAYER_MIXER_NORM = 1u << 0,      /* norm before the mixer (every pre-norm model) */
    LAYER_MIXER_POST_NORM = 1u << 1, /* norm of the mixer's output before the residual add (Gemma 2/3, OLMo 2/3) */
    LAYER_FFN_NORM = 1u << 2,
    LAYER_FFN_POST_NORM = 1u << 3,
    LAYER_FLAGS = 0xfu,
    /* the mixer record (attention) */
    ATTN_QK_NORM = 1u << 4,        /* RMSNorm of each query / key head, with weights (Qwen3, Gemma 3, EXAONE 4) */
    ATTN_QKV_BIAS = 1u << 5,       /* biases on the q, k, v projections (Qwen2, GPT-2, gpt-oss) */
    ATTN_O_BIAS = 1u << 6,         /* bias on the output projection (GPT-2, gpt-oss) */
    ATTN_QK_NORM_FULL = 1u << 7,   /* RMSNorm of the whole q and k projections, before the head split (OLMo 2/3) */
    ATTN_QK_NORM_PLAIN = 1u << 8,  /* RMSNorm of each query / key head without weights (Llama 4's L2 norm) */
    ATTN_SINKS = 1u << 9,          /* a learned logit per head joins every softmax (gpt-oss) */
    ATTN_OUTPUT_GATE = 1u << 10,   /* each head's output is multiplied by sigmoid(g), g a second projection (Qwen3-Next) */
    /* the recurrent mixers' records (a layer has one mixer: they reuse the mixer bits) */
    SSM_CONV_BIAS = 1u << 4,       /* the causal convolution has a bias (Mamba, Mamba-2) */
    SSM_PROJ_BIAS = 1u << 5,       /* the input and output projections have biases (Mamba's use_bias) */
    /* the mixer record (latent attention: a layer has one mixer, so these reuse the attention bits) */
    MLA_Q_LORA = 1u << 4,          /* queries through a low-rank pair q_a -> RMSNorm -> q_b (DeepSeek-V2/V3; not V2-Lite) */
    MIXER_FLAGS = 0xff0u,
    /* the FFN record */
    FFN_BIAS = 1u << 12,         /* dense: biases on its projections (GPT-2) */
    MOE_NORM_TOPK = 1u << 13,    /* the chosen experts' weights are renormalised to sum to 1 */
    MOE_ROUTER_BIAS = 1u << 14,  /* the router has a bias (gpt-oss) */
    MOE_EXPERT_BIAS = 1u << 15,  /* the experts' projections have biases (gpt-oss) */
    MOE_SCORE_BIAS = 1u << 16,   /* a bias added to the scores for choosing only (DeepSeek-V3) */
    MOE_SHARED = 1u << 17,       /* a shared expert every token goes through (Llama 4, Qwen3-Next, DeepSeek) */
    MOE_SHARED_GATE = 1u << 18,  /* the shared expert's output is scaled by sigmoid(g . x) (Qwen3-Next) */
    MOE_SCALE_INPUT = 1u << 19,  /* the routing weight scales the expert's input, not its output (Llama 4) */
    MOE_GROUP_TOP2 = 1u << 20,   /* a group's score is the sum of its two best scores (DeepSeek-V3), else its best */
    FFN_FLAGS = 0xfff000u,
    /* the model config */
    MODEL_TIED_EMBEDDINGS = 1u << 24, /* the classifier is the embedding table */
    MODEL_FLAGS = 0xf000000u,
    /* derived from the config, never stored: they only say which tensors exist */
    PRESENT_LEARNED_POSITIONS = 1u << 29,
    PRESENT_LAYERNORM = 1u << 30,
};

#define MAX_EXPERTS 4096 /* experts of a mixture, at most */
#define MAX_HEADS 1024      /* query heads of a layer, at most */
#define MAX_LATENT_RANK 4096 /* latent attention's kv_rank, at most (DeepSeek-V2/V3: 512) */

/* How the experts' scores come out of the router's logits */
enum {
    ROUTER_SOFTMAX = 0,      /* softmax over all experts, then the top k (Mixtral, Qwen3-MoE, DeepSeek-V2) */
    ROUTER_TOPK_SOFTMAX = 1, /* the top k logits, then a softmax over those k (gpt-oss) */
    ROUTER_SIGMOID = 2,      /* sigmoid of each logit (Llama 4, DeepSeek-V3) */
};
#define ROUTER_KIND_COUNT 3

/* Rotary positions of an attention layer. */
typedef struct {
    int dim;           /* rotated dimensions per head; 0: the layer has no positions at all (NoPE) */
    int table;         /* -1: inverse frequencies theta^(-2i/dim); N >= 0: the tensor rope_inv_freq.N */
    float theta;
    float attn_factor; /* cos and sin are multiplied by it (YaRN's attention factor); 1 otherwise */
} RopeConfig;

/* MIXER_ATTENTION: softmax attention over the cached keys and values */
typedef struct {
    int n_heads;     /* query heads */
    int n_kv_heads;  /* key/value heads: n_heads (MHA), 1 (MQA) or in between (GQA) */
    int head_dim;
    int window;      /* 0: full causal; W: the query at p sees keys p-W+1 .. p */
    int chunk;       /* 0, or C: the query at p sees only its own chunk of C positions (Llama 4) */
    RopeConfig rope;
    float scale;     /* multiplies q.k */
    float softcap;   /* 0: none, else scores <- c * tanh(score / c) */
    float temperature_floor, temperature_scale; /* Llama 4 on NoPE layers: q *= 1 + scale * log(1 + floor((p + 1) / floor)); 0: off */
    unsigned flags;  /* ATTN_* */
} AttentionConfig;

/* The FFN of a layer: a dense MLP or a mixture of experts (hidden is then each expert's width). */
typedef struct {
    int hidden;
    int activation;     /* ACTIVATION_* (ops.h) */
    float act_alpha, act_limit; /* ACTIVATION_SWIGLU_CLAMPED only */
    int n_experts, top_k;
    int router;         /* ROUTER_* */
    int n_groups, topk_groups; /* experts in n_groups groups; the top k are chosen from the best topk_groups (1, 1: no groups) */
    int shared_hidden;  /* width of the shared expert (MOE_SHARED) */
    float routed_scale; /* the routed experts' sum is multiplied by it */
    unsigned flags;     /* FFN_BIAS, MOE_* */
} FfnConfig;

/* MIXER_LATENT_ATTENTION: multi-head latent attention (DeepSeek-V2/V3, Kimi K2, Moonlight). Keys and values of
 * every head are up-projections of one shared latent c_kv (kv_rank floats, after its RMSNorm); a key also has
 * rope_dim rotated dimensions k_rope shared by all heads. The cache keeps [c_kv | k_rope] per position (mla.c). */
typedef struct {
    int n_heads;
    int q_rank;      /* 0: one q projection (DeepSeek-V2-Lite); else q = q_b(norm(q_a(x))) through q_rank floats */
    int kv_rank;     /* width of the latent c_kv */
    int nope_dim;    /* per-head key dimensions without positions (k_nope, from the latent) */
    int v_dim;       /* per-head value dimensions (from the latent) */
    RopeConfig rope; /* rope.dim: the rotated dimensions of each query head and of the shared key (qk_rope_head_dim) */
    float scale;     /* multiplies q.k (DeepSeek's YaRN correction mscale^2 folded in by the exporter) */
    float norm_eps;  /* of the RMSNorms on q_a and c_kv */
    unsigned flags;  /* MLA_* */
} LatentAttentionConfig;

/* MIXER_MAMBA: x and z = projections of the input (inner wide), a causal convolution of width conv over x,
 * then the selective scan over a state of `state` numbers per channel; dt comes through a rank dt_rank bottleneck */
typedef struct {
    int inner, state, conv, dt_rank;
    unsigned flags; /* SSM_CONV_BIAS, SSM_PROJ_BIAS */
} MambaConfig;

/* MIXER_MAMBA2: n_heads heads of head_dim channels, each with a scalar decay; B and C shared by the heads of
 * each of n_groups groups; a state of head_dim x state per head. Prefill runs the chunked form, chunk tokens
 * at a time (the reference's chunk_size); dt is clamped to [dt_min, dt_max]. */
typedef struct {
    int n_heads, head_dim, n_groups, state, conv, chunk;
    float dt_min, dt_max;
    unsigned flags; /* SSM_CONV_BIAS, SSM_PROJ_BIAS */
} Mamba2Config;

/* MIXER_GATED_DELTANET: n_v_heads value heads of v_head_dim, each reading key/query head h / (n_v / n_k) of
 * k_head_dim; a state of k_head_dim x v_head_dim per value head. Prefill runs the chunked form. */
typedef struct {
    int n_k_heads, n_v_heads, k_head_dim, v_head_dim, conv, chunk;
    unsigned flags; /* SSM_CONV_BIAS */
} DeltaNetConfig;

/* MIXER_RWKV: time mixing with `inner` channels (RWKV-4's attention_hidden_size) */
typedef struct {
    int inner;
    unsigned flags;
} RwkvConfig;

typedef struct {
    unsigned flags;     /* LAYER_* */
    MixerKind mixer;
    AttentionConfig attn; /* MIXER_ATTENTION */
    LatentAttentionConfig mla; /* MIXER_LATENT_ATTENTION */
    MambaConfig mamba;    /* MIXER_MAMBA */
    Mamba2Config mamba2;  /* MIXER_MAMBA2 */
    DeltaNetConfig deltanet; /* MIXER_GATED_DELTANET */
    RwkvConfig rwkv;      /* MIXER_RWKV */
    FfnKind ffn_kind;
    FfnConfig ffn;        /* FFN_GATED, FFN_PLAIN, FFN_MOE; FFN_RWKV: hidden and flags */
} LayerConfig;

typedef struct {
    char family[32];  /* informational (shown by --info); never used to choose code */
    int dim;          /* residual stream width */
    int n_layers;
    int vocab_size;
    int context_length;
    int norm_kind;    /* NORM_* */
    float norm_eps;
    int position_kind;/* POS_* */
    float embed_scale;    /* the embedding row is multiplied by it (Gemma: sqrt(dim); Granite's embedding multiplier) */
    float residual_scale; /* every block's output is multiplied by it before the residual add (Granite) */
    float logit_scale;    /* the logits are multiplied by it (Granite: 1 / logits_scaling) */
    float final_softcap;
    unsigned flags;   /* MODEL_* */
    int n_rope_tables;
    LayerConfig *layers; /* n_layers records */
} Config;

typedef struct {
    Tensor wq, wk, wv, wo, bq, bk, bv, bo;
    Tensor q_norm, k_norm, q_norm_full, k_norm_full;
    Tensor sinks;
    Tensor wg; /* ATTN_OUTPUT_GATE */
} AttentionWeights;

/* Latent attention. The exporter splits kv_b_proj into its key and value halves, stacked per head, so that
 * each head's [nope_dim][kv_rank] and [v_dim][kv_rank] matrices stand alone (tensor_matrix) in any dtype. */
typedef struct {
    Tensor wq, wq_a, q_a_norm, wq_b; /* wq [H*(nope+rope)][dim], or wq_a [q_rank][dim] and wq_b [H*(nope+rope)][q_rank] */
    Tensor wkv_a, kv_a_norm;         /* [kv_rank + rope][dim]: the latent and the shared rotary key */
    Tensor wk_b, wv_b;               /* [H][nope][kv_rank], [H][v_dim][kv_rank] */
    Tensor wo;                       /* [dim][H*v_dim] */
} LatentAttentionWeights;

/* A dense FFN, or the experts of a mixture (stacked: Tensor.stack matrices each) with its router */
typedef struct {
    Tensor w_gate, w_up, w_down, b_gate, b_up, b_down;
    Tensor router, router_bias, score_bias;
    Tensor shared_w_gate, shared_w_up, shared_w_down, shared_gate;
} FfnWeights;

/* The recurrent mixers (tensors.def gives each tensor's shape and what it is) */
typedef struct {
    Tensor w_x, w_z, b_x, b_z, conv, conv_bias, w_dt_low, w_b, w_c, w_dt, dt_bias, a_log, d, w_out, b_out;
} MambaWeights;
typedef struct {
    Tensor w_z, w_xbc, w_dt, b_z, b_xbc, b_dt, conv, conv_bias, dt_bias, a_log, d, norm, w_out, b_out;
} Mamba2Weights;
typedef struct {
    Tensor w_qkv, w_z, w_beta, w_decay, conv, conv_bias, dt_bias, a_log, norm, w_out;
} DeltaNetWeights;
typedef struct {
    Tensor mix_k, mix_v, mix_r, w_k, w_v, w_r, decay, first, w_out; /* time mixing */
    Tensor ffn_mix_k, ffn_mix_r, ffn_w_k, ffn_w_r, ffn_w_v;         /* channel mixing (FFN_RWKV) */
} RwkvWeights;

typedef struct {
    Tensor mixer_norm, mixer_norm_bias, mixer_post_norm;
    Tensor ffn_norm, ffn_norm_bias, ffn_post_norm;
    AttentionWeights attn;
    LatentAttentionWeights mla;
    MambaWeights mamba;
    Mamba2Weights mamba2;
    DeltaNetWeights deltanet;
    RwkvWeights rwkv;
    FfnWeights ffn;
    const float *rope_inv_freq; /* rope.dim/2 inverse frequencies: a table in the file or computed at load */
} LayerWeights;

typedef struct {
    Tensor tok_embeddings;  /* [vocab][dim] */
    Tensor pos_embeddings;  /* [context][dim], learned positions only */
    Tensor final_norm, final_norm_bias;
    Tensor output;          /* [vocab][dim]; == tok_embeddings when tied */
    LayerWeights *layers;
    float *rope_computed;   /* storage for the frequencies computed from rope theta */
} Weights;

typedef struct {
    Config config;
    Weights weights;
    Tokenizer tokenizer;  /* kind TOKENIZER_NONE when the file has none */
    ChatSection chat;     /* template_text NULL when the file has no chat template */
    void *map;            /* the whole file, mmapped read-only */
    size_t file_size;
    void *packed;         /* the matrices as this machine's kernel reads them (matmul_pack_into), one huge_alloc */
    size_t packed_bytes, packed_used;
    DType weight_dtype;   /* dtype of the matrices (for --info and stats) */
    AttentionSpec *attention; /* per layer, how its attention runs: derived from its record (attention_of_layer),
                               * then changed by any --window / --sinks / --sparse / --attn (study.c); the
                               * loaded config itself is never rewritten */
} Model;

/* Called after the naive attention kernel of a layer for one query position: weights holds each head's
 * attention weights over its visible keys (weights_stride floats apart). The study tools (--attn-map)
 * attach here, so the model knows nothing about them. */
typedef struct {
    void (*record)(void *ctx, int layer, int pos, const float *weights, int weights_stride);
    void *ctx;
} AttentionObserver;

/* The rows of one forward pass: row t is token tokens[t] of sequence seq[t] (a KV cache id) at position
 * pos[t]. A sequence's rows are consecutive, in order of position. A prompt chunk is one sequence at positions
 * p .. p+n-1; a decode step of many sequences is one row each, so every weight is read once for all of them. */
typedef struct {
    int n;
    const int *tokens, *seq, *pos;
} Batch;

typedef struct LatentScratch LatentScratch; /* latent attention's working space (mla.c) */

/* Everything one forward pass over up to max_tokens rows needs besides the weights: scratch buffers
 * (allocated once), the KV cache of every sequence, and the observer. */
typedef struct {
    int max_tokens;
    int *row_seq, *row_pos; /* [T] the rows forward() hands forward_batch(): sequence 0, positions in a row */
    float *x;       /* [T][dim] residual stream */
    float *xb;      /* [T][max(dim, q_dim)] normed input / attention output */
    float *xb2;     /* [T][dim] */
    float *q;       /* [T][q_dim] */
    float *k, *v;   /* [T][kv_dim] */
    float *hb, *hb2;/* [T][widest FFN inner width] */
    float *scores;  /* [n_heads][scores_stride] attention weights of one query */
    int scores_stride; /* keys a row holds: grows with the positions reached, up to the most any query can see */
    int scores_heads;  /* rows: the most query heads of any layer */
    float *logits;  /* [T][vocab] */
    /* mixture of experts: the routing of a chunk, and each expert's share of it */
    int *expert_ids;      /* [T][top_k] chosen experts, ascending ids */
    float *expert_weights;/* [T][top_k] their weights */
    float *router_logits; /* [T][n_experts] */
    int *expert_tokens;   /* [T] rows routed to the expert at hand */
    float *expert_x;      /* [T][dim] their inputs, gathered */
    float *expert_out;    /* [T][dim] its outputs */
    LatentScratch *mla;   /* NULL without latent attention layers */
    MatmulScratch scratch; /* the matrix products' work space (quantized activations, tiles) */
    float *mixer_scratch; /* the recurrent mixers' work space (recurrent.h), and the attention output gate */
    int state_seq;        /* the sequence whose recurrent states the recurrent block at work updates */
    KVCache kv;           /* sequence 0 exists from runstate_init on (the one forward() runs): its KV cache and
                           * the states of its recurrent layers */
    AttentionObserver observer; /* record NULL: nothing watches */
} RunState;

/* Loads and validates a model file. On failure writes one line to err and returns -1. */
int model_load(Model *m, const char *path, char *err, size_t errlen);
/* The same from a file already in memory (size bytes at data, which must outlive the model); name is used
 * in error messages. The fuzz targets load through it, so every read is checked against the exact size. */
int model_load_buffer(Model *m, const void *data, size_t size, const char *name, char *err, size_t errlen);
void model_free(Model *m);
/* Looks through the weights of a loaded file for a NaN or an infinity: 1 with the first such tensor's name
 * in name, else 0. Reads every weight: for explaining non-finite logits, not for every run. */
int model_find_nonfinite_tensor(const Model *m, char *name, size_t len);
/* How an attention layer attends as its record says (causal, a sliding window of W, chunks of C), before any
 * study override. */
AttentionSpec attention_of_layer(const Model *m, int layer);
/* Replaces control characters with '?', so that text from a file or the command line stays on one line. */
void make_printable(char *s);
/* Writes one line, printf-style, to err (errlen bytes) and returns -1: `return error_line(err, len, ...)`. */
int error_line(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The query heads of a layer's mixer (the rows an AttentionObserver gets), 0 if it has none */
int mixer_heads(const LayerConfig *l);
/* Parameters of the model: all of them, and those one token goes through (a mixture of experts uses top_k of
 * its n_experts). Tied embeddings count once. */
void model_parameters(const Model *m, long long *total, long long *active);

/* Before runstate_init: 0 if the scratch for max_tokens tokens and the KV cache for n_positions positions fit
 * in the machine's physical memory, else -1 with one line in err saying what the config implies. */
int model_check_memory(const Model *m, int max_tokens, long n_positions, char *err, size_t errlen);
int runstate_init(RunState *s, const Model *m, int max_tokens);
/* The KV cache layer l runs with (as m->attention[l] says): empty, laid out for its mask and mixer */
void layer_cache_init(KVLayer *cache, const Model *m, int l);
void runstate_free(RunState *s);

/* Runs the rows of b (b->n <= s->max_tokens) through the model, appending their keys and values to their
 * sequences' caches (recurrent layers fold them into their state; a sequence at position 0 starts from the zero
 * state). Writes logits for every row to s->logits when all_logits is LOGITS_ALL (1), only for the last one
 * (s->logits row 0) when LOGITS_LAST (0), none with LOGITS_NONE (a chunk of a prompt before its last: the
 * classifier, a whole pass over the largest matrix, is skipped; s->x holds the last hidden states). Returns
 * s->logits, or NULL when the KV cache cannot grow (out of memory). Each row's logits are the same bits
 * whatever the other rows are. */
enum { LOGITS_LAST = 0, LOGITS_ALL = 1, LOGITS_NONE = 2 };
float *forward_batch(const Model *m, RunState *s, const Batch *b, int all_logits);
/* forward_batch for n tokens (n <= s->max_tokens) of sequence 0 at positions pos .. pos+n-1. */
float *forward(const Model *m, RunState *s, const int *tokens, int n, int pos, int all_logits);

/* 1 if positions can go on past the context (every layer keeps a bounded cache or a fixed recurrent state,
 * and positions are rotary or absent). */
int model_can_roll(const Model *m);

#endif
