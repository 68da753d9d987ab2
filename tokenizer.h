/* tokenizer.h - text <-> token ids, from the tokenizer record embedded in the model file.
 *
 * Byte-level BPE (GPT-2, Llama 3, Qwen): the text is split by a pre-tokenizer rule into words, each word's
 * bytes start as one token per byte, and ranked merges join neighbours until none applies.
 * Special tokens (<|endoftext|>, <s>, ...) written in the prompt text are matched first, as themselves. */
#ifndef ATTN_TOKENIZER_H
#define ATTN_TOKENIZER_H

#include <stddef.h>
#include <stdio.h>

enum { TOKENIZER_NONE = 0, TOKENIZER_BYTELEVEL_BPE = 1, TOKENIZER_SENTENCEPIECE_BPE = 2 };
enum { PRETOKENIZE_NONE = 0, PRETOKENIZE_GPT2 = 1, PRETOKENIZE_LLAMA3 = 2, PRETOKENIZE_QWEN2 = 3 };
enum {
    TOKF_ADD_BOS = 1,         /* prompts start with bos_id */
    TOKF_DUMMY_PREFIX = 2,    /* SentencePiece: a space is put before the text */
    TOKF_BYTE_FALLBACK = 4,   /* characters outside the vocabulary become <0xNN> byte pieces */
    TOKF_IGNORE_MERGES = 8,   /* a whole pre-token that is in the vocabulary is taken as is (Llama 3) */
    TOKF_PREFIX_SPACE = 16,   /* ByteLevel add_prefix_space: a space is put before the text */
    TOKF_SCORE_MERGES = 32,   /* SentencePiece .model: merge the pair whose result scores highest */
};
enum { PIECE_NORMAL = 0, PIECE_SPECIAL = 1, PIECE_BYTE = 2, PIECE_UNUSED = 3, PIECE_USER = 4 };

#define TOKENIZER_MAX_EOS 16

typedef struct {
    int key_len;
    const unsigned char *key;
    int value;
} HashEntry;

typedef struct {
    HashEntry *slots;
    size_t mask; /* slots - 1; a power of two minus one */
} HashMap;

typedef struct {
    int kind;          /* TOKENIZER_* */
    int pretokenizer;  /* PRETOKENIZE_* */
    unsigned flags;    /* TOKF_* */
    int bos_id, unk_id;
    int n_eos;
    int eos_ids[TOKENIZER_MAX_EOS];
    int n_pieces;
    const unsigned char **piece; /* bytes of each token, pointing into the mapped file */
    int *piece_len;
    float *score;
    unsigned char *type;         /* PIECE_* */
    int n_merges;
    HashMap piece_ids;           /* bytes -> id of the normal pieces */
    HashMap merge_ranks;         /* (left id, right id) as 8 bytes -> rank */
    int *merge_result;           /* rank -> merged id */
    unsigned char *merge_keys;   /* storage for merge_ranks' keys */
    int byte_piece[256];         /* id of the piece for one raw byte (-1 if none) */
    int *specials;               /* ids matched in text, longest first */
    int n_specials;
} Tokenizer;

/* Parses and validates the tokenizer record (docs/FORMAT.md). Returns 0, or -1 with a message in err. */
int tokenizer_load(Tokenizer *t, const unsigned char *data, size_t size, int vocab_size, char *err, size_t errlen);
void tokenizer_free(Tokenizer *t);

/* Encodes len bytes of text. ids must have room for len + 3 entries. Adds the BOS when add_bos and the
 * tokenizer asks for one. Returns the number of ids, or -1 when out of memory. */
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int add_bos, int *ids);

/* The bytes token id stands for when printed (byte pieces give their byte; specials their text). */
const unsigned char *tokenizer_decode(const Tokenizer *t, int prev_id, int id, int *len);

int tokenizer_is_eos(const Tokenizer *t, int id);

/* Streaming output that never prints half a UTF-8 character: bytes of an unfinished character wait
 * for the next token; a sequence that cannot complete is printed as U+FFFD. */
typedef struct {
    unsigned char pending[4];
    int n_pending;
} Utf8Stream;

void utf8_stream_write(Utf8Stream *s, FILE *out, const unsigned char *bytes, int len);
void utf8_stream_flush(Utf8Stream *s, FILE *out);

#endif
