/* fuzz/fuzz_model.c - libFuzzer target for the loader: arbitrary bytes as a model file.
 *
 * model_load_buffer() reads them from a heap buffer of exactly their size, so AddressSanitizer sees any read
 * past the end (an mmapped file would hide it in the page's slack). The loader must refuse a bad file with
 * one line naming the problem; a file it accepts must be safe to use: a run state, three tokens through
 * forward() (a prefill of two and one decode step), a prompt through its tokenizer, every id decoded, and a
 * conversation through its chat template (the Jinja interpreter of chat.c).
 *
 *   make fuzz FUZZ_SECONDS=600        (builds build/fuzz/fuzz_model with clang -fsanitize=fuzzer,...)
 *   build/fuzz/fuzz_model CRASH_FILE  (replays one input) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
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

/* A conversation through the model's chat template (chat.c): rendered, or refused with one line */
static void use_chat_template(const Model *m) {
    static const ChatMessage conversation[] = {{"system", "Be brief.", 9}, {"user", "Hello \xff", 7},
                                               {"assistant", "<think>x</think>\n\nHi", 20}, {"user", " Who? ", 6}};
    char err[512], *end;
    size_t len;
    char *text = chat_render(&m->chat, conversation, 4, 1, &len, err, sizeof err);
    if (!text && (err[0] == '\0' || strchr(err, '\n'))) abort();
    if (text) read_bytes((const unsigned char *)text, (int)(len < 1u << 30 ? len : 0));
    free(text);
    if (chat_turn_end(&m->chat, &end, &len, err, sizeof err) == 0) free(end);
}

/* ---------------------------------------------------------------------------------------------
 * A structure-aware mutator: half of the mutations are libFuzzer's own (any bytes anywhere); the other
 * half find the fields of the format in the input (header, config, layer records, tensor records, the
 * tokenizer's header, pieces and merges) and give one of them an interesting value, or cut the file at a
 * field and patch the size fields so the cut gets past the first check. Random bytes alone mostly land in
 * the weights, and the chance of flipping one given flag bit of the tokenizer is tiny. */

size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);

typedef struct {
    uint32_t offset, width;
} Field;

#define MAX_FIELDS 4096

static uint64_t le(const uint8_t *p, int width) {
    uint64_t v = 0;
    for (int i = width - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static void put_le(uint8_t *p, int width, uint64_t v) {
    for (int i = 0; i < width; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static int add_field(Field *f, int n, uint64_t offset, int width, size_t size) {
    /* offsets come from the input: offset + width may wrap around */
    if (n < MAX_FIELDS && offset <= size && (uint64_t)width <= size - offset)
        f[n++] = (Field){(uint32_t)offset, (uint32_t)width};
    return n;
}

/* The fields of one structure of the file, chosen by `which`, as far as the file can be walked. */
static int find_fields(const uint8_t *d, size_t size, unsigned which, unsigned pick, Field *f) {
    int n = 0;
    if (size < 128) return 0;
    uint64_t config = le(d + 16, 8), layers = le(d + 32, 8), tok = le(d + 48, 8), tok_size = le(d + 56, 8);
    uint64_t tensors = le(d + 64, 8), n_layers = le(d + 40, 4), n_tensors = le(d + 72, 4);
    if (which == 6) { /* the chat section: its count, the lengths of its variables, the template's length */
        uint64_t p = le(d + 96, 8), end = p + le(d + 104, 8);
        if (p > size || end > size || end < p) return 0;
        n = add_field(f, n, p, 4, size);
        uint64_t n_vars = p + 4 <= end ? le(d + p, 4) : 0;
        p += 4;
        for (uint64_t k = 0; k < n_vars && k < 16 && p + 4 <= end; k++) {
            n = add_field(f, n, p, 4, size); /* name length */
            p += 4 + le(d + p, 4);
            if (p + 4 > end) break;
            n = add_field(f, n, p, 4, size); /* value length */
            p += 4 + le(d + p, 4);
        }
        return add_field(f, n, p, 4, size); /* template length */
    }
    switch (which % 5) {
    case 0: /* header, the chat section's offset and size included */
        for (int off = 4; off < 112; off += off < 40 || off >= 48 ? (off == 72 || off == 76 ? 4 : 8) : 4)
            n = add_field(f, n, (uint64_t)off, off == 4 || off == 40 || off == 44 || off == 72 || off == 76 ? 4 : 8, size);
        break;
    case 1: /* config, and the records of one layer */
        for (int i = 0; i < 13; i++) n = add_field(f, n, config + 32 + 4 * (uint64_t)i, 4, size);
        if (n_layers)
            for (int i = 0; i < 10; i++) n = add_field(f, n, layers + 64 * (pick % n_layers) + 4 * (uint64_t)i, 4, size);
        break;
    case 2: /* one tensor record */
        if (n_tensors) {
            uint64_t rec = tensors + 128 * (pick % n_tensors);
            for (int i = 0; i < 6; i++) n = add_field(f, n, rec + 80 + 4 * (uint64_t)i, 4, size);
            n = add_field(f, n, rec + 104, 8, size);
            n = add_field(f, n, rec + 112, 8, size);
        }
        break;
    default: { /* the tokenizer: its header, then the length, score and type of one piece, or a merge */
        if (!tok_size || tok > size || tok_size > size - tok) break;
        uint64_t p = tok, end = tok + tok_size;
        for (int i = 0; i < 6; i++) n = add_field(f, n, p + 4 * (uint64_t)i, 4, size);
        if (p + 24 > end) break;
        uint64_t n_eos = le(d + p + 20, 4);
        if (n_eos) n = add_field(f, n, p + 24 + 4 * (pick % n_eos), 4, size); /* one of the eos ids */
        p += 24 + 4 * n_eos;
        n = add_field(f, n, p, 4, size);
        n = add_field(f, n, p + 4, 4, size);
        if (p + 8 > end) break;
        uint64_t n_pieces = le(d + p, 4), target = n_pieces ? pick % n_pieces : 0;
        p += 8;
        for (uint64_t i = 0; i < n_pieces && p + 4 <= end; i++) {
            uint64_t len = le(d + p, 4);
            if (i == target) {
                n = add_field(f, n, p, 4, size);
                n = add_field(f, n, p + 4 + len, 4, size);
                n = add_field(f, n, p + 8 + len, 4, size);
                break;
            }
            p += 12 + len;
        }
        if (which % 5 == 4) n = add_field(f, n, end - 8 - 8 * (pick % 64), 4, size); /* a merge id */
    }
    }
    return n;
}

static uint64_t interesting(unsigned r, uint64_t old, int width) {
    static const uint64_t values[] = {0, 1, 2, 3, 4, 6, 16, 64, 127, 128, 255, 256, 1024, 65535, 65536, 65537,
                                      1u << 20, 1u << 24, (1u << 24) + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                                      0x7FC00000 /* NaN */, 0x7F800000 /* inf */, 0xFF800000, 0xBF800000 /* -1.0f */};
    switch (r % 6) {
    case 0: return old ^ (1ull << (r / 6 % (8 * (unsigned)width)));
    case 1: return old + 1;
    case 2: return old - 1;
    case 3: return old + 64 * (r / 6 % 4 + 1);
    case 4: return width == 8 && r / 6 % 3 == 0 ? ~0ull - r / 6 % 128 : values[r / 6 % (sizeof values / sizeof *values)];
    default: return old * 2;
    }
}

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
    if (seed % 2 == 0 || size < 128) return LLVMFuzzerMutate(data, size, max_size);
    Field fields[MAX_FIELDS];
    unsigned r = seed / 2;
    int n = find_fields(data, size, r % 5 == 1 ? 1 : r % 7, r / 7, fields);
    if (n == 0) return LLVMFuzzerMutate(data, size, max_size);
    Field f = fields[r / 13 % (unsigned)n];
    if (r / 977 % 16 == 0) { /* cut the file at the field, with consistent size fields */
        size_t cut = f.offset;
        if (cut >= 96) {
            put_le(data + 8, 8, cut);
            put_le(data + 88, 8, cut - le(data + 80, 8));
        }
        return cut;
    }
    put_le(data + f.offset, (int)f.width, interesting(r / 31, le(data + f.offset, (int)f.width), (int)f.width));
    return size;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Model m;
    char err[512];
    if (model_load_buffer(&m, data, size, "fuzz.bin", err, sizeof err) != 0) {
        if (err[0] == '\0' || strchr(err, '\n')) abort(); /* the message: one line, never empty */
        return 0;
    }
    RunState s;
    if (model_check_memory(&m, 2, 3, err, sizeof err) == 0 && runstate_init(&s, &m, 2) == 0) {
        int prompt[2] = {0, m.config.vocab_size - 1}, next = m.config.vocab_size / 2;
        if (forward(&m, &s, prompt, 2, 0, 1)) forward(&m, &s, &next, 1, 2, 0);
        runstate_free(&s);
    }
    if (m.tokenizer.kind != TOKENIZER_NONE) use_tokenizer(&m);
    if (m.chat.template_text) use_chat_template(&m);
    model_free(&m);
    return 0;
}
