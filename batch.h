/* batch.h - many sequences on one paged cache: N samples of one prompt (--samples), and a file of prompts
 * run with continuous batching and prefix caching (--prompts). */
#ifndef ATTN_BATCH_H
#define ATTN_BATCH_H

#include <stdint.h>
#include <stdio.h>

#include "model.h"

/* How logits become tokens: the caller's sampler, one per sequence, seeded. */
typedef struct {
    /* a new sampler for a sequence with this prompt (a repeat penalty sees it); NULL when out of memory */
    void *(*start)(void *ctx, uint64_t seed, const int *prompt, int n_prompt);
    int (*next)(void *sampler, float *logits, int vocab); /* the next token, taken (logits may be overwritten) */
    void (*end)(void *sampler);
    void *ctx;
} SamplerHooks;

typedef struct {
    int n_generate;     /* tokens per sequence, at most (-n) */
    uint64_t seed;      /* sequence i samples with seed + i */
    int print_ids;      /* ids, one line per sequence, instead of labelled text blocks */
    int batch;          /* prompt tokens per forward pass */
    int parallel;       /* --prompts: sequences decoding together, at most */
    int add_bos;        /* --prompts: each line starts with the tokenizer's BOS */
    FILE *logits_file;  /* --prompts: the last prompt position's logits of each prompt, in order; or NULL */
    const char *kv_map; /* --samples: an SVG of the samples' block tables once they are done; or NULL */
    SamplerHooks sampler;
    /* Stops the run with one line if logits rows 0 .. rows-1 (residual stream rows t0 .. t0+rows-1, at positions
     * first_pos ..) are not finite (run.c's check: NaN weights); or NULL */
    void (*check_logits)(const Model *m, const RunState *s, int t0, int rows, int first_pos);
} BatchOptions;

/* --samples N: the prompt has been prefilled into sequence 0 of s (logits: its last position's), in
 * prefill_seconds; n_samples sequences share its blocks and decode together. Prints one block per sample
 * and the stats line. Returns 0, or -1 with one line in err. */
int generate_samples(const Model *m, RunState *s, const float *logits, const int *prompt, int n_prompt, int n_samples,
                     double prefill_seconds, const BatchOptions *o, char *err, size_t errlen);

/* --prompts FILE: one prompt per line (text; comma-separated ids for a model without a tokenizer; blank lines
 * skipped), up to o->parallel decoding at once, a finished one replaced by the next at the next step;
 * prompts that start with the same blocks of tokens share them. Prints one block per prompt, in file order,
 * and the stats line. Returns 0, or -1 with one line in err. */
int generate_prompts(const Model *m, const char *path, const BatchOptions *o, char *err, size_t errlen);

#endif
