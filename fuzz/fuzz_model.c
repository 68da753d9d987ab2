/* fuzz/fuzz_model.c - libFuzzer target for the loader: arbitrary bytes as a model file.
 *
 * model_load_buffer() reads them from a heap buffer of exactly their size, so AddressSanitizer sees any read
 * past the end (an mmapped file would hide it in the page's slack). The loader must refuse a bad file with
 * one line naming the problem; a file it accepts must be safe to use: a run state, three tokens through
 * forward() (a prefill of two and one decode step), a prompt through its tokenizer, every id decoded.
 *
 *   make fuzz FUZZ_SECONDS=600        (builds build/fuzz/fuzz_model with clang -fsanitize=fuzzer,...)
 *   build/fuzz/fuzz_model CRASH_FILE  (replays one input) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static volatile unsigned checksum; /* keeps the reads of decoded bytes from being optimised away */

static void read_bytes(const unsigned char *bytes, int len) {
    if (len < 0) abort();
    for (int j = 0; j < len; j++) checksum += bytes[j]; /* every byte it points at must be readable */
}

/* A prompt through the tokenizer, its ids decoded as one stream, then every id of the vocabulary alone. */
static void use_tokenizer(const Model *m) {
    static const char text[] = "Hello, world! caf\xc3\xa9 \xff\xfe <|endoftext|><s> 12345\n\t  x  \xe2\x96\x81the";
    int ids[tokenizer_max_ids(sizeof text)];
    int n = tokenizer_encode(&m->tokenizer, text, sizeof text - 1, 1, ids), len;
    if (n < 0) return; /* out of memory */
    if ((size_t)n > tokenizer_max_ids(sizeof text - 1)) abort();
    DecodeState stream = {0, 0};
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= m->config.vocab_size) abort();
        read_bytes(tokenizer_decode(&m->tokenizer, &stream, ids[i], &len), len);
    }
    for (int id = 0; id < m->config.vocab_size && id < 1 << 16; id++) {
        DecodeState fresh = {0, 0};
        read_bytes(tokenizer_decode(&m->tokenizer, &fresh, id, &len), len);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Model m;
    char err[512];
    if (model_load_buffer(&m, data, size, "fuzz.bin", err, sizeof err) != 0) {
        if (err[0] == '\0' || strchr(err, '\n')) abort(); /* the message: one line, never empty */
        return 0;
    }
    RunState s;
    if (runstate_init(&s, &m, 2) == 0) {
        int prompt[2] = {0, m.config.vocab_size - 1}, next = m.config.vocab_size / 2;
        if (forward(&m, &s, prompt, 2, 0, 1)) forward(&m, &s, &next, 1, 2, 0);
        runstate_free(&s);
    }
    if (m.tokenizer.kind != TOKENIZER_NONE) use_tokenizer(&m);
    model_free(&m);
    return 0;
}
