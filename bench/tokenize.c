/* bench/tokenize.c - how fast the tokenizer encodes a large text, with the hand-written GPT-2 / Llama 3 / Qwen2
 * pre-tokenizers and with the regex matcher doing their work (tokenizer_use_regex_only); checks that both give
 * the same ids. Run by bench/bench.py:
 *     build/bench/tokenize MODEL TEXT_FILE REPEATS
 * prints "fast MB/s regex MB/s tokens". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* the best of `repeats` encodes of text, in MB/s; the ids of the last one in ids */
static double encode_speed(const Tokenizer *t, const char *text, size_t len, int repeats, int *ids, int *n) {
    double best = 0.0;
    for (int r = 0; r < repeats; r++) {
        double t0 = now();
        *n = tokenizer_encode(t, text, len, 0, ids);
        double mbs = (double)len / 1e6 / (now() - t0);
        if (mbs > best) best = mbs;
    }
    return best;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL TEXT_FILE REPEATS\n", argv[0]);
        return 1;
    }
    Model m;
    char err[512];
    if (model_load(&m, argv[1], err, sizeof err) != 0) {
        fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        fprintf(stderr, "error: cannot read %s\n", argv[2]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    size_t len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc(len + 1);
    int *fast_ids = malloc(tokenizer_max_ids(len) * sizeof *fast_ids), *regex_ids = malloc(tokenizer_max_ids(len) * sizeof *regex_ids);
    if (!text || !fast_ids || !regex_ids || fread(text, 1, len, f) != len) {
        fprintf(stderr, "error: out of memory or short read\n");
        return 1;
    }
    fclose(f);
    int repeats = atoi(argv[3]), n_fast, n_regex;
    double fast = encode_speed(&m.tokenizer, text, len, repeats, fast_ids, &n_fast);
    tokenizer_use_regex_only(&m.tokenizer);
    double regex = encode_speed(&m.tokenizer, text, len, repeats, regex_ids, &n_regex);
    if (n_fast != n_regex || memcmp(fast_ids, regex_ids, (size_t)n_fast * sizeof *fast_ids) != 0) {
        fprintf(stderr, "error: the hand-written pre-tokenizer and the regex give different ids\n");
        return 1;
    }
    printf("%.2f %.2f %d\n", fast, regex, n_fast);
    free(text);
    free(fast_ids);
    free(regex_ids);
    model_free(&m);
    return 0;
}
