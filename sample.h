/* sample.h - choosing the next token from the logits: llama.cpp's sampler chain, in llama.cpp's order
 *   repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw
 * (temperature 0: the penalty, then the most likely token). top-k, top-p and min-p look at the
 * distribution at temperature 1, as llama.cpp's chain does; only the final draw is tempered. */
#ifndef ATTN_SAMPLE_H
#define ATTN_SAMPLE_H

#include <stdint.h>

typedef struct {
    float temperature;    /* 0: greedy */
    int top_k;            /* keep the k most likely tokens; 0: off */
    float top_p;          /* keep the smallest set of most likely tokens whose probability reaches top_p; 1: off */
    float min_p;          /* keep tokens at least min_p times as likely as the most likely one; 0: off */
    float repeat_penalty; /* 1: off */
    int repeat_last_n;    /* how many of the last tokens (prompt included) the penalty looks at; 0: off */
    uint64_t seed;
} SamplerSettings;

typedef struct {
    SamplerSettings set;
    int vocab_size;
    uint64_t rng;
    int *recent;           /* ring of the last repeat_last_n tokens */
    int n_recent, next_recent;
    unsigned char *penalized; /* [vocab] scratch: a token already penalized in this step */
    struct Candidate *cand;   /* [vocab] scratch: the tokens still in the running */
} Sampler;

/* 0, or -1 when out of memory */
int sampler_init(Sampler *s, const SamplerSettings *set, int vocab_size);
void sampler_free(Sampler *s);
/* Tells the penalty window about a token of the sequence (each prompt token, then each one generated). */
void sampler_accept(Sampler *s, int token);
/* The next token; logits are changed (penalized). */
int sampler_sample(Sampler *s, float *logits);

#endif
