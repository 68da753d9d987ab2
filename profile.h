/* profile.h - where the time goes: ./run --profile prints, for prefill and for decode, the wall time of each
 * step of forward() (and of sampling) per token, and how busy the threads were during it. Off by default: then
 * each call below is one test of a flag. */
#ifndef ATTN_PROFILE_H
#define ATTN_PROFILE_H

#include <stdio.h>

typedef enum {
    PROFILE_OTHER,      /* embeddings, residual adds, biases, anything not named below */
    PROFILE_NORM,       /* RMSNorm / LayerNorm (and the q/k norms) */
    PROFILE_QKV,        /* matmul: q, k, v projections */
    PROFILE_ROPE,       /* rotary embeddings */
    PROFILE_ATTENTION,  /* KV cache store, scores, softmax, weighted sum */
    PROFILE_WO,         /* matmul: output projection */
    PROFILE_GATE_UP,    /* matmul: MLP gate and up (or up alone) */
    PROFILE_ACTIVATION, /* SiLU / GELU (and the gate product) */
    PROFILE_DOWN,       /* matmul: MLP down */
    PROFILE_CLASSIFIER, /* matmul: logits */
    PROFILE_QUANTIZE,   /* q8_0 / q4 products: quantizing the activations (inside the matmul steps above) */
    PROFILE_SAMPLING,   /* choosing the next token from the logits */
    PROFILE_SECTIONS
} ProfileSection;

enum { PROFILE_PREFILL, PROFILE_DECODE };

extern int profile_on;

void profile_start(void);
/* prefill or decode: the sections that follow count there */
void profile_phase(int phase);
/* Ends the running section and starts s; returns the one that was running (to come back to it). */
ProfileSection profile_section(ProfileSection s);
/* parallel.c: a worker thread ran a chunk for this long; the calling thread waited this long for the others */
void profile_worker_busy(long long nanoseconds);
void profile_caller_waited(long long nanoseconds);
long long profile_now_ns(void);
/* The table: per section, ms per token (prefill: per prompt token; decode: per step), share of the phase,
 * and the threads' busy fraction (1 - the time they sat idle at barriers or beside one-thread work). */
void profile_report(FILE *f, int prefill_tokens, int decode_steps, int threads);

#endif
