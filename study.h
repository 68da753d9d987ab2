/* study.h - tools for looking at how a model wires its attention (./run's --info, --window, --sinks,
 * --sparse, --attn, --attn-map, --ppl). docs/ATTENTION.md walks through them. */
#ifndef ATTN_STUDY_H
#define ATTN_STUDY_H

#include <stdio.h>

#include "model.h"

/* ---- overrides: experiments on top of the file's own wiring */

typedef struct {
    const char *window; /* --window: "L=W[,L=W...]" or "all=W" (W = 0: full causal attention) */
    int n_sinks;        /* --sinks N: the first N positions stay visible in every sliding layer */
    const char *sparse; /* --sparse: "strided:S" / "fixed:B" for every layer, or "L=strided:S[,L=fixed:B...]" */
    const char *kernel; /* --attn: "naive" or "flash"; NULL: naive */
    const char *latent; /* --mla: "auto", "absorbed" or "expanded" (latent attention layers); NULL: auto */
    const char *kv_type; /* --kv-type: "f32", "bf16" or "q8_0" (softmax attention layers' caches); NULL: f32 */
} AttentionOverrides;

/* Rewrites m->attention[] (before runstate_init). On bad input writes one line to err and returns -1. */
int apply_attention_overrides(Model *m, const AttentionOverrides *o, char *err, size_t errlen);

/* --info: the model-wide facts, one row per layer, and the KV cache the wiring costs at 1k .. 128k tokens
 * next to plain MHA with full attention everywhere. */
void print_wiring(const Model *m, const char *path, FILE *out);

/* One layer as --info describes it, for views other than the table (the --explore page): a mixer kind and a
 * free-form list of (name, value) properties, so that a new kind (latent attention, a recurrent mixer)
 * brings its own properties rather than new fields. */
#define WIRING_MAX_PROPS 12
typedef struct {
    const char *kind;          /* "attention" */
    int has_attention_weights; /* 1 when the naive kernel can record the layer's weights (0: recurrent kinds) */
    int overridden;            /* changed on the command line (--window / --sinks / --sparse) */
    char in_file[48];          /* when overridden: what the file says, e.g. "sliding 64" or "full" */
    int n_props;
    struct {
        char name[16];
        char value[64];
    } props[WIRING_MAX_PROPS];
} LayerWiring;

void layer_wiring(const Model *m, int l, LayerWiring *w);

/* ---- attention maps: every head's weights over the processed sequence */

typedef struct AttentionMap AttentionMap;

/* Records the layers in `layers` ("L[,L...]"; NULL: every layer) for positions 0 .. n_positions-1.
 * NULL with a message in err when the list is bad or the map would not fit in memory. */
AttentionMap *attention_map_new(const Model *m, const char *layers, int n_positions, char *err, size_t errlen);
/* The model's AttentionObserver (model.h) with ctx = the map: after the naive kernel, weights holds each
 * head's row (weights_stride apart). */
void attention_map_record(void *map, int layer, int pos, const float *weights, int weights_stride);
/* A grid of heatmaps, one row of panels per layer and one panel per head (a single layer: its heads in
 * floor(sqrt(heads)) rows, drawn larger), each titled with its layer and head: in a panel, rows are query
 * positions and columns key positions; grey where the mask hides the key, a colour scale of log10(weight) from
 * 1e-4 (dark) to 1 elsewhere, shown by a bar on the right. Tokens (ids[0..n_ids) through tok) label the axes
 * of maps up to 64 positions. The panel layout goes into the PNG's tEXt chunk. */
int attention_map_write_png(const AttentionMap *map, const char *path, const Tokenizer *tok, const int *ids, int n_ids);
/* Before the run: 0 if the picture of all n_positions fits the PNG limit, else -1 with one line in err. */
int attention_map_check_png(const AttentionMap *map, char *err, size_t errlen);
/* The recorded weights as little-endian float32 [layer][head][query][key] over the positions processed. */
int attention_map_write_raw(const AttentionMap *map, const char *path);
void attention_map_free(AttentionMap *map);
/* What was recorded, for other writers (explore.c): positions 0 .. attention_map_positions()-1; the row of
 * weights a head gave at a query, by key position 0 .. query (0 where masked), NULL if the layer was not
 * recorded. */
int attention_map_positions(const AttentionMap *map);
const float *attention_map_row(const AttentionMap *map, int layer, int head, int query);

/* ---- the paged cache: which blocks sequences share */

/* An SVG picture of the block tables of sequences seqs[0 .. n_seqs-1] (labelled sample 0, 1, ...) for the
 * first layer of each kind of cache: one row per sequence, one box per block with its pool id, coloured by
 * who holds it, filled as far as rows are written; and the bytes held against separate runs. 0, or -1 when
 * the file cannot be written. */
int kv_map_write_svg(const Model *m, const KVCache *c, const int *seqs, int n_seqs, const char *title, const char *path);

/* ---- perplexity */

/* -log softmax(logits)[target], computed in double */
double token_nll(const float *logits, int vocab_size, int target);

#endif
