/* model.h - the model: config (model-wide + one record per layer), weights in the mapped file, forward().
 * The file layout is docs/FORMAT.md; load_model() reads it in that order. */
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
#define MODEL_VERSION 1

enum { NORM_RMS = 0, NORM_LAYER = 1 };
enum { MLP_GATED = 0, MLP_PLAIN = 1 };
enum { POS_ROPE = 0, POS_LEARNED = 1 };
enum { MODEL_TIED_EMBEDDINGS = 1 };
enum {
    LAYER_QK_NORM = 1,        /* RMSNorm on each query and key head before RoPE (Qwen3, Gemma 3) */
    LAYER_QKV_BIAS = 2,       /* biases on the q, k, v projections (Qwen2, GPT-2) */
    LAYER_O_BIAS = 4,         /* bias on the output projection (GPT-2) */
    LAYER_POST_ATTN_NORM = 8, /* norm the attention output before the residual add (Gemma 2/3) */
    LAYER_POST_MLP_NORM = 16, /* norm the MLP output before the residual add (Gemma 2/3) */
};

/* How one layer wires its attention. Every field comes from the file. */
typedef struct {
    int n_heads;      /* query heads */
    int n_kv_heads;   /* key/value heads: n_heads (MHA), 1 (MQA) or in between (GQA) */
    int head_dim;
    int window;       /* 0: full causal; W: the query at p sees keys p-W+1 .. p */
    float rope_theta; /* RoPE base */
    int rope_dim;     /* rotated dimensions per head (0: no RoPE in this layer) */
    int rope_table;   /* -1: frequencies from rope_theta, else index of a precomputed table */
    float attn_scale; /* multiplies q.k */
    float attn_softcap; /* 0: none, else scores <- c * tanh(score / c) */
    unsigned flags;   /* LAYER_* */
} LayerConfig;

typedef struct {
    char family[32];  /* informational (shown by --info); never used to choose code */
    int dim;          /* residual stream width */
    int hidden_dim;   /* MLP inner width */
    int n_layers;
    int vocab_size;
    int context_length;
    int norm_kind;    /* NORM_* */
    float norm_eps;
    int mlp_kind;     /* MLP_* */
    int activation;   /* ACTIVATION_* (ops.h) */
    int position_kind;/* POS_* */
    float embed_scale;
    float final_softcap;
    unsigned flags;   /* MODEL_* */
    int n_rope_tables;
    LayerConfig *layers; /* n_layers records */
} Config;

typedef struct {
    Tensor attn_norm, attn_norm_bias;
    Tensor wq, wk, wv, bq, bk, bv;
    Tensor q_norm, k_norm;
    Tensor wo, bo;
    Tensor attn_post_norm;
    Tensor mlp_norm, mlp_norm_bias;
    Tensor w_gate, w_up, w_down, b_up, b_down;
    Tensor mlp_post_norm;
    const float *rope_inv_freq; /* rope_dim/2 inverse frequencies: a table in the file or computed at load */
} LayerWeights;

typedef struct {
    Tensor tok_embeddings;  /* [vocab][dim] */
    Tensor pos_embeddings;  /* [context][dim], learned positions only */
    Tensor final_norm, final_norm_bias;
    Tensor output;          /* [vocab][dim]; == tok_embeddings when tied */
    LayerWeights *layers;
    float *rope_computed;   /* storage for the frequencies computed from rope_theta */
} Weights;

typedef struct {
    Config config;
    Weights weights;
    Tokenizer tokenizer;  /* kind TOKENIZER_NONE when the file has none */
    ChatSection chat;     /* template_text NULL when the file has no chat template */
    void *map;            /* the whole file, mmapped read-only */
    size_t file_size;
    DType weight_dtype;   /* dtype of the matrices (for --info and stats) */
    AttentionSpec *attention; /* per layer, how it attends when run: its record in the file, then any
                               * --window / --sinks / --sparse / --attn override (study.c) */
} Model;

/* Scratch buffers for one forward pass over up to max_tokens tokens, allocated once. */
typedef struct {
    int max_tokens;
    float *x;       /* [T][dim] residual stream */
    float *xb;      /* [T][max(dim, q_dim)] normed input / attention output */
    float *xb2;     /* [T][dim] */
    float *q;       /* [T][q_dim] */
    float *k, *v;   /* [T][kv_dim] */
    float *hb, *hb2;/* [T][hidden_dim] */
    float *scores;  /* [n_heads][scores_stride] attention weights of one query */
    int scores_stride; /* keys a row holds: grows with the positions reached, up to the most any query can see */
    int scores_heads;  /* rows: the most query heads of any layer */
    float *logits;  /* [T][vocab] */
    KVCache kv;
    struct AttentionMap *attention_map; /* --attn-map: forward records the weights here (NULL: off) */
} RunState;

/* Loads and validates a model file. On failure writes one line to err and returns -1. */
int model_load(Model *m, const char *path, char *err, size_t errlen);
/* The same from a file already in memory (size bytes at data, which must outlive the model); name is used
 * in error messages. The fuzz targets load through it, so every read is checked against the exact size. */
int model_load_buffer(Model *m, const void *data, size_t size, const char *name, char *err, size_t errlen);
void model_free(Model *m);
/* How a layer attends as its record says (causal, or a sliding window of W), before any study override. */
AttentionSpec attention_of_layer(const LayerConfig *l);
/* Replaces control characters with '?', so that text from a file or the command line stays on one line. */
void make_printable(char *s);

int runstate_init(RunState *s, const Model *m, int max_tokens);
void runstate_free(RunState *s);

/* Runs n tokens (n <= s->max_tokens) at positions pos .. pos+n-1 through the model, appending their keys
 * and values to the cache. Writes logits for all n tokens to s->logits when all_logits, else only for the
 * last one (s->logits row 0). Returns s->logits, or NULL when the KV cache cannot grow (out of memory). */
float *forward(const Model *m, RunState *s, const int *tokens, int n, int pos, int all_logits);

/* 1 if positions can go on past the context (every layer slides and positions are rotary). */
int model_can_roll(const Model *m);

#endif
