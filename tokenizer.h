/* tokenizer.h - text <-> token ids, from the tokenizer record embedded in the model file.
 *
 * Two kinds of BPE:
 *  - byte-level (GPT-2, Llama 3, Qwen): the text is split by a pre-tokenizer rule into words, each word's
 *    bytes start as one token per byte, and ranked merges join neighbours until none applies;
 *  - SentencePiece-style (Llama 2, Mistral, TinyLlama, Gemma, Phi-3): spaces are written "▁" (a dummy one
 *    usually put before the text), each character starts as one token, merges join neighbours by rank
 *    (tokenizer.json) or by the score of the joined piece (tokenizer.model), and characters outside the
 *    vocabulary fall back to <0xNN> byte pieces.
 * Special tokens (<|endoftext|>, <s>, ...) written in the prompt are matched first, as themselves, where
 * the tokenizer's own rules say so. */
#ifndef ATTN_TOKENIZER_H
#define ATTN_TOKENIZER_H

#include <stddef.h>
#include <stdio.h>

#include "specials.h"

enum { TOKENIZER_NONE = 0, TOKENIZER_BYTELEVEL_BPE = 1, TOKENIZER_SENTENCEPIECE_BPE = 2 };
enum {
    PRETOKENIZE_NONE = 0, PRETOKENIZE_GPT2 = 1, PRETOKENIZE_LLAMA3 = 2, PRETOKENIZE_QWEN2 = 3, PRETOKENIZE_METASPACE = 4,
    PRETOKENIZE_SPLITS = 5, /* a sequence of regex Split steps, stored after the merges */
};
/* What a Split step keeps of the text its regex matches (the tokenizers library's SplitDelimiterBehavior) */
enum {
    SPLIT_ISOLATED = 0,            /* matches and the text between them, each a piece */
    SPLIT_REMOVED = 1,             /* only the text between matches */
    SPLIT_MERGED_WITH_PREVIOUS = 2, /* each match joins the piece before it */
    SPLIT_MERGED_WITH_NEXT = 3,    /* each match joins the piece after it */
    SPLIT_CONTIGUOUS = 4,          /* adjacent matches become one piece */
};
#define TOKENIZER_MAX_SPLITS 16
#define SPLIT_INVERT 1 /* flag: the text between matches counts as the match, and the matches as the text between */
enum {
    TOKF_ADD_BOS = 1,              /* prompts start with bos_id */
    TOKF_DUMMY_PREFIX = 2,         /* a "▁" is put before the text (SentencePiece add_dummy_prefix) */
    TOKF_BYTE_FALLBACK = 4,        /* characters outside the vocabulary become <0xNN> byte pieces */
    TOKF_IGNORE_MERGES = 8,        /* a whole pre-token that is in the vocabulary is taken as is (Llama 3) */
    TOKF_PREFIX_SPACE = 16,        /* ByteLevel add_prefix_space: a space before each stretch not starting with one */
    TOKF_SCORE_MERGES = 32,        /* SentencePiece .model: merge the pair whose result scores highest */
    TOKF_NORMALIZE_EACH_STRETCH = 64, /* tokenizers library: special tokens are cut out of the raw text, then each
                                       * stretch between them gets its "▁" and dummy prefix; clear: the whole text
                                       * is written first and user-defined pieces are matched in it (sentencepiece) */
    TOKF_PREFIX_FIRST_STRETCH = 128, /* the dummy prefix only before the stretch at the very start of the text */
    TOKF_PREFIX_UNLESS_SPACE = 256,  /* ... and not where the stretch already starts with a space (Metaspace) */
    TOKF_STRIP_LEADING_SPACE = 512,  /* decoding drops the leading space of the first piece printed */
    TOKF_REMOVE_EXTRA_SPACES = 1024, /* SentencePiece remove_extra_whitespaces: trim, and squeeze runs of spaces */
};
enum {
    PIECE_NORMAL = 0,
    PIECE_SPECIAL = 1, /* added special token: matched in the text, printed as its text */
    PIECE_BYTE = 2,    /* <0xNN>: stands for one byte */
    PIECE_UNUSED = 3,
    PIECE_USER = 4,    /* user-defined / added token: matched in the text */
    PIECE_CONTROL = 5, /* SentencePiece control (<s>, </s>): never matched in the text, prints nothing */
    PIECE_UNKNOWN = 6, /* the unknown piece: never matched or merged into; prints its bytes */
};
enum { PIECE_LSTRIP = 0x100, PIECE_RSTRIP = 0x200 }; /* a matched token swallows the whitespace left / right of it */

struct Regex;

/* One pre-tokenizer step: every piece of text so far is split at the matches of a regex. */
typedef struct {
    int behavior;        /* SPLIT_* */
    unsigned flags;      /* SPLIT_INVERT */
    struct Regex *regex;
    int fast;            /* PRETOKENIZE_GPT2 / LLAMA3 / QWEN2: an isolating step whose regex is one of those,
                          * run by its hand-written matcher (same pieces, faster); 0: by the regex */
} PreSplit;

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
    int n_eos;                   /* 0 .. n_pieces: every id the record lists (tokenizers list many end tokens) */
    int *eos_ids;
    unsigned char *is_eos;       /* [n_pieces] 1 for an eos id: one look-up per generated token */
    int n_pieces;
    const unsigned char **piece; /* bytes of each token, pointing into the mapped file */
    int *piece_len;
    float *score;
    unsigned char *type;         /* PIECE_* */
    unsigned char *strip;        /* PIECE_LSTRIP / PIECE_RSTRIP, shifted down by 8 */
    const unsigned char **text;  /* what each token prints as: "▁" as a space, a byte piece as its byte */
    int *text_len;
    unsigned char *text_storage;
    HashMap piece_ids;           /* bytes -> id of the pieces BPE may produce */
    HashMap merge_ranks;         /* (left id, right id) as 8 bytes -> rank */
    int *merge_result;           /* rank -> merged id */
    unsigned char *merge_keys;   /* storage for merge_ranks' keys */
    int byte_piece[256];         /* id of the piece for one raw byte (-1 if none) */
    int *specials;               /* ids matched in text (special and user-defined pieces) */
    int n_specials;
    SpecialMatcher special_matcher; /* finds the longest of them starting at each byte of a prompt */
    int has_unused_pieces;       /* SentencePiece unused pieces that merges may make and must split again */
    PreSplit splits[TOKENIZER_MAX_SPLITS]; /* the pre-tokenizer as Split steps (one for GPT-2 / Llama 3 / Qwen2) */
    int n_splits;
} Tokenizer;

/* Parses and validates the tokenizer record (docs/FORMAT.md). Returns 0, or -1 with a message in err. */
int tokenizer_load(Tokenizer *t, const unsigned char *data, size_t size, int vocab_size, char *err, size_t errlen);
void tokenizer_free(Tokenizer *t);

/* Runs every pre-tokenizer step through the regex matcher, never a hand-written one (the tests and the
 * benchmark compare the two). */
void tokenizer_use_regex_only(Tokenizer *t);

/* The words the pre-tokenizer splits text[0..len) into, as if it were one stretch between special tokens
 * (byte-level tokenizers: the text as it is; SentencePiece-style: as written with "▁"): word i is
 * [spans[2i], spans[2i+1]) (room for 2 len entries). Returns how many, or -1 when out of memory. For tests. */
int tokenizer_pretokenize(const Tokenizer *t, const char *text, size_t len, size_t *spans);

/* The regexes of the hand-written pre-tokenizers, exactly as tokenizer.json files write them */
extern const char *const tokenizer_known_regex[4]; /* indexed by PRETOKENIZE_GPT2 .. QWEN2; [0] is NULL */

/* Room encoding len bytes of text may need: a BOS and, per byte, at most 4 ids (a space written "▁" that
 * falls back to its 3 byte pieces, or a 1-byte special token and the prefix of the stretch after it). */
static inline size_t tokenizer_max_ids(size_t len) { return 4 * len + 4; }

/* Encodes len bytes of text into ids (room for tokenizer_max_ids(len) entries). Adds the BOS when add_bos
 * and the tokenizer asks for one. Returns the number of ids, -1 when out of memory, or TOKENIZER_REGEX_TOO_SLOW
 * when a pre-tokenizer regex backtracked without end on this text (regex.h). */
#define TOKENIZER_REGEX_TOO_SLOW (-2)
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int add_bos, int *ids);

/* Encodes the text a chat template rendered (no BOS added: the template writes it). Control tokens written in
 * it (<s>, </s> of a SentencePiece tokenizer.model, which the sentencepiece library never matches in text) are
 * cut out first and become their ids, as transformers' tokenizers split out special tokens; each stretch
 * between them is encoded as a prompt. *ids is malloc'd; returns the count, or tokenizer_encode's error. */
int tokenizer_encode_chat(const Tokenizer *t, const char *text, size_t len, int **ids);

/* Where one stream of decoded tokens stands: whether the dummy-prefix space of the next piece is dropped. */
typedef struct {
    int printed;       /* some text has been printed (a prompt being continued counts) */
    int dropped_space; /* the previous piece's leading space was dropped */
} DecodeState;

/* The bytes token id prints as next in the stream d (start with all zero; feed a prompt being continued
 * through it first): "▁" becomes a space, byte pieces give their byte, control tokens nothing, and the
 * dummy-prefix space of the first piece is dropped where the tokenizer's decoder drops it (SentencePiece:
 * the first piece printed; the tokenizers library's Strip decoder: the first character of the output). */
const unsigned char *tokenizer_decode(const Tokenizer *t, DecodeState *d, int id, int *len);

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
