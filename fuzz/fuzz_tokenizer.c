/* fuzz/fuzz_tokenizer.c - libFuzzer target for the tokenizer, over real tokenizer records: encode arbitrary
 * bytes, decode arbitrary ids (negative, past the vocabulary, anything) and stream the bytes out as UTF-8.
 *
 * The records come from model files: models/kjv-5m.bin (byte-level BPE, GPT-2 rule), the seeds in
 * fuzz/corpus/model with a tokenizer (Llama 3 rule; SentencePiece-style merged by score and by rank) and,
 * when make fuzz could write them, the real Llama 2 tokenizer.model and tokenizer.json -- or the files
 * listed in $FUZZ_TOKENIZER_MODELS (colon-separated). The first input byte picks the record and the
 * mode; the rest is the text, or the ids as little-endian int32.
 *
 * Checked besides memory safety: encode returns at most tokenizer_max_ids(len) ids, each inside the
 * vocabulary; for a byte-level tokenizer that has a piece for every byte (and drops no text), decoding the
 * ids gives back exactly the text; where a record's pre-tokenizer has a hand-written matcher (GPT-2, Llama 3),
 * a second copy running the regex matcher instead gives the same ids. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model.h"

#define MAX_MODELS 8
static Model models[MAX_MODELS];
static Model regex_only[MAX_MODELS]; /* the same records with the hand-written pre-tokenizers off (or unloaded) */
static int n_models;
static FILE *sink;

/* the first input byte's low bits pick one of these (in this order; a '?' marks a file that may be absent:
 * the real Llama 2 tokenizers, which make fuzz writes from $ATTN_SHARED when it has them) */
static const char *default_models =
    "models/kjv-5m.bin:fuzz/corpus/model/llama_llama3_tokenizer_f16.bin:"
    "fuzz/corpus/model/llama_sentencepiece_tokenizer_f32.bin:fuzz/corpus/model/llama_metaspace_tokenizer_f32.bin:"
    "fuzz/corpus/model/llama_split_steps_tokenizer_f32.bin:"
    "?build/fuzz/tok_llama2_sentencepiece.bin:?build/fuzz/tok_llama2_hf_json.bin";

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *list = getenv("FUZZ_TOKENIZER_MODELS");
    char *paths = strdup(list ? list : default_models);
    for (char *p = strtok(paths, ":"); p && n_models < MAX_MODELS; p = strtok(NULL, ":")) {
        char err[512];
        int optional = *p == '?';
        p += optional;
        if (optional && access(p, R_OK) != 0) {
            fprintf(stderr, "fuzz_tokenizer: %s not there: fuzzing without it\n", p);
            continue;
        }
        if (model_load(&models[n_models], p, err, sizeof err) != 0) {
            fprintf(stderr, "fuzz_tokenizer: %s (run from the repository root, or set FUZZ_TOKENIZER_MODELS)\n", err);
            exit(1);
        }
        if (models[n_models].tokenizer.kind == TOKENIZER_NONE) {
            model_free(&models[n_models]);
            continue;
        }
        int has_fast = 0;
        for (int i = 0; i < models[n_models].tokenizer.n_splits; i++) has_fast |= models[n_models].tokenizer.splits[i].fast;
        if (has_fast && model_load(&regex_only[n_models], p, err, sizeof err) == 0)
            tokenizer_use_regex_only(&regex_only[n_models].tokenizer);
        n_models++;
    }
    free(paths);
    if (n_models == 0) {
        fprintf(stderr, "fuzz_tokenizer: no model with a tokenizer\n");
        exit(1);
    }
    sink = fopen("/dev/null", "w");
    return 0;
}

/* 1 if decoding gives back exactly the text encoded: byte-level, a piece for every byte, nothing added */
static int round_trips(const Tokenizer *t) {
    if (t->kind != TOKENIZER_BYTELEVEL_BPE || (t->flags & (TOKF_PREFIX_SPACE | TOKF_STRIP_LEADING_SPACE))) return 0;
    for (int i = 0; i < t->n_splits; i++)
        if (t->splits[i].behavior == SPLIT_REMOVED) return 0; /* the text it removes is gone */
    for (int b = 0; b < 256; b++)
        if (t->byte_piece[b] < 0) return 0;
    return 1;
}

static void encode(const Tokenizer *t, const Tokenizer *slow, int vocab, const uint8_t *text, size_t len, int add_bos) {
    int *ids = malloc(tokenizer_max_ids(len) * sizeof *ids);
    if (!ids) return;
    int n = tokenizer_encode(t, (const char *)text, len, add_bos, ids);
    if (n > (int)tokenizer_max_ids(len)) abort();
    if (slow && slow->kind != TOKENIZER_NONE) { /* the regex matcher must split as the hand-written one */
        int *other = malloc(tokenizer_max_ids(len) * sizeof *other);
        if (other && n >= 0 && (tokenizer_encode(slow, (const char *)text, len, add_bos, other) != n ||
                                memcmp(ids, other, (size_t)n * sizeof *ids) != 0))
            abort();
        free(other);
    }
    size_t at = 0;
    int exact = round_trips(t) && !add_bos;
    DecodeState stream = {0, 0};
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= vocab) abort();
        int piece_len;
        const unsigned char *piece = tokenizer_decode(t, &stream, ids[i], &piece_len);
        if (piece_len < 0) abort();
        if (exact && (at + (size_t)piece_len > len || memcmp(piece, text + at, (size_t)piece_len) != 0)) abort();
        at += (size_t)piece_len;
    }
    if (exact && at != len) abort();
    free(ids);
}

static void decode(const Tokenizer *t, const uint8_t *data, size_t len) {
    Utf8Stream out = {{0}, 0};
    DecodeState stream = {0, 0};
    for (size_t i = 0; i + 4 <= len; i += 4) {
        int32_t id;
        memcpy(&id, data + i, 4);
        int n;
        const unsigned char *bytes = tokenizer_decode(t, &stream, id, &n);
        if (n < 0) abort();
        utf8_stream_write(&out, sink, bytes, n);
        tokenizer_is_eos(t, id);
    }
    utf8_stream_flush(&out, sink);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int k = (data[0] & 0x0F) % n_models;
    const Model *m = &models[k];
    if (data[0] & 0x80) decode(&m->tokenizer, data + 1, size - 1);
    else encode(&m->tokenizer, &regex_only[k].tokenizer, m->config.vocab_size, data + 1, size - 1, (data[0] & 0x40) != 0);
    return 0;
}
