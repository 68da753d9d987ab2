/* tokenizer.c - BPE tokenizers (byte-level and SentencePiece-style), special tokens, streaming decode.
 *
 * encode(text):
 *   1. SentencePiece's remove_extra_whitespaces, where asked for, trims and squeezes the spaces;
 *   2. special tokens written in the text are cut out and kept as single ids; what lies between them are
 *      "stretches" of plain text. SentencePiece-style tokenizers write spaces as "▁" (with a dummy "▁"
 *      in front): the sentencepiece library writes the whole text so before it looks for its user-defined
 *      pieces, the tokenizers library writes each stretch after cutting out its added tokens;
 *   3. each stretch is split into pre-tokens ("words") by the family's rule: Metaspace, or a sequence of
 *      regex Split steps (GPT-2, Llama 3 and Qwen2 have hand-written matchers for theirs);
 *   4. each word starts as one symbol per byte (byte-level) or per character (SentencePiece-style), and
 *      BPE joins the adjacent pair with the best merge rank (or the best-scoring joined piece) until no
 *      pair can merge; characters outside the vocabulary fall back to <0xNN> byte pieces or <unk>. */
#include "tokenizer.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "regex.h"
#include "unicode.h"

#define SPACE_MARK "\xE2\x96\x81" /* "▁" (U+2581): SentencePiece's spelling of a space */
#define SPACE_MARK_LEN 3

/* ---------------------------------------------------------------------------------------------
 * a small open-addressing hash map from byte strings to ints */

static uint64_t hash_bytes(const unsigned char *s, int n) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (int i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ULL;
    return h;
}

static int hashmap_init(HashMap *m, int n_keys) {
    size_t size = 16;
    while (size < (size_t)n_keys * 2) size *= 2;
    m->slots = calloc(size, sizeof *m->slots);
    m->mask = size - 1;
    return m->slots ? 0 : -1;
}

/* Inserts key -> value unless the key is present; returns the value stored for key. */
static int hashmap_put(HashMap *m, const unsigned char *key, int len, int value) {
    size_t i = hash_bytes(key, len) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        HashEntry *e = &m->slots[i];
        if (!e->key) {
            e->key = key;
            e->key_len = len;
            e->value = value;
            return value;
        }
        if (e->key_len == len && memcmp(e->key, key, (size_t)len) == 0) return e->value;
    }
}

static int hashmap_get(const HashMap *m, const unsigned char *key, int len) {
    if (!m->slots) return -1;
    size_t i = hash_bytes(key, len) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        const HashEntry *e = &m->slots[i];
        if (!e->key) return -1;
        if (e->key_len == len && memcmp(e->key, key, (size_t)len) == 0) return e->value;
    }
}

/* ---------------------------------------------------------------------------------------------
 * loading the record (docs/FORMAT.md, "Tokenizer"), every count and length checked */

typedef struct {
    const unsigned char *p;
    size_t left;
} Reader;

static int read_u32(Reader *r, uint32_t *out) {
    if (r->left < 4) return -1;
    *out = (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8 | (uint32_t)r->p[2] << 16 | (uint32_t)r->p[3] << 24;
    r->p += 4;
    r->left -= 4;
    return 0;
}

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); tokenizer_free(t); return -1; } while (0)

static int starts_with_mark(const unsigned char *s, size_t n) {
    return n >= SPACE_MARK_LEN && memcmp(s, SPACE_MARK, SPACE_MARK_LEN) == 0;
}

/* "<0xNN>" -> NN, or -1 */
static int byte_of_piece(const unsigned char *p, int len) {
    static const char hex[] = "0123456789ABCDEF0123456789abcdef";
    if (len != 6 || memcmp(p, "<0x", 3) != 0 || p[5] != '>') return -1;
    const char *hi = memchr(hex, p[3], 32), *lo = memchr(hex, p[4], 32);
    if (!hi || !lo) return -1;
    return (int)((hi - hex) % 16 * 16 + (lo - hex) % 16);
}

/* What each token prints as: SentencePiece-style pieces with "▁" as a space, byte pieces as their byte,
 * control pieces (and ids the tokenizer lacks) as nothing. */
static int build_texts(Tokenizer *t) {
    size_t total = 256;
    for (int i = 0; i < t->n_pieces; i++) total += (size_t)t->piece_len[i];
    t->text = calloc((size_t)t->n_pieces, sizeof *t->text);
    t->text_len = calloc((size_t)t->n_pieces, sizeof *t->text_len);
    t->text_storage = malloc(total);
    if (!t->text || !t->text_len || !t->text_storage) return -1;
    unsigned char *bytes = t->text_storage, *out = t->text_storage + 256;
    for (int b = 0; b < 256; b++) bytes[b] = (unsigned char)b;
    for (int i = 0; i < t->n_pieces; i++) {
        const unsigned char *p = t->piece[i];
        int n = t->piece_len[i];
        t->text[i] = out;
        if (t->type[i] == PIECE_CONTROL) continue;
        if (t->type[i] == PIECE_BYTE) {
            t->text[i] = bytes + byte_of_piece(p, n);
            t->text_len[i] = 1;
            continue;
        }
        if (t->kind != TOKENIZER_SENTENCEPIECE_BPE || t->type[i] == PIECE_UNKNOWN) {
            t->text[i] = p; /* printed as stored */
            t->text_len[i] = n;
            continue;
        }
        for (int k = 0; k < n;) {
            if (starts_with_mark(p + k, (size_t)(n - k))) {
                *out++ = ' ';
                k += SPACE_MARK_LEN;
            } else {
                *out++ = p[k++];
            }
        }
        t->text_len[i] = (int)(out - t->text[i]);
    }
    return 0;
}

/* The regexes the hand-written matchers below implement, as tokenizer.json files write them (export.py
 * writes a record that names one of them as pretokenizer 1-3). */
const char *const tokenizer_known_regex[4] = {
    NULL,
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

/* Compiles one Split step; its hand-written matcher is used where the step isolates the matches of a known
 * regex. Returns 0, or -1 with a message in err. */
static int add_split(Tokenizer *t, const unsigned char *pattern, size_t len, int behavior, unsigned flags, char *err,
                     size_t errlen) {
    char why[256];
    PreSplit *p = &t->splits[t->n_splits];
    if (!(p->regex = regex_compile((const char *)pattern, len, why, sizeof why))) {
        snprintf(err, errlen, "tokenizer pre-tokenizer step %d: %s", t->n_splits, why);
        return -1;
    }
    p->behavior = behavior;
    p->flags = flags;
    for (int k = PRETOKENIZE_GPT2; k <= PRETOKENIZE_QWEN2; k++)
        if (behavior == SPLIT_ISOLATED && !flags && strlen(tokenizer_known_regex[k]) == len &&
            memcmp(tokenizer_known_regex[k], pattern, len) == 0)
            p->fast = k;
    t->n_splits++;
    return 0;
}

/* The pre-tokenizer's Split steps: read from the record (pretokenizer 5: u32 count, then per step u32
 * behavior, u32 flags, u32 length, the regex), or the one step a named pretokenizer 1-3 stands for. */
static int load_splits(Tokenizer *t, Reader *r, char *err, size_t errlen) {
    if (t->pretokenizer >= PRETOKENIZE_GPT2 && t->pretokenizer <= PRETOKENIZE_QWEN2) {
        const char *known = tokenizer_known_regex[t->pretokenizer];
        if (add_split(t, (const unsigned char *)known, strlen(known), SPLIT_ISOLATED, 0, err, errlen)) goto fail;
        return 0;
    }
    if (t->pretokenizer != PRETOKENIZE_SPLITS) return 0;
    uint32_t n;
    if (read_u32(r, &n)) FAIL("tokenizer record truncated before its pre-tokenizer steps");
    if (n < 1 || n > TOKENIZER_MAX_SPLITS) FAIL("tokenizer has %u pre-tokenizer steps (1 .. %d)", n, TOKENIZER_MAX_SPLITS);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t behavior, flags, len;
        if (read_u32(r, &behavior) || read_u32(r, &flags) || read_u32(r, &len))
            FAIL("tokenizer record truncated in pre-tokenizer step %u", i);
        if (behavior > SPLIT_CONTIGUOUS) FAIL("tokenizer pre-tokenizer step %u has unknown behavior %u", i, behavior);
        if (flags & ~(uint32_t)SPLIT_INVERT) FAIL("tokenizer pre-tokenizer step %u has unknown flags 0x%x", i, flags);
        if (len == 0 || len > 65536 || len > r->left)
            FAIL("tokenizer pre-tokenizer step %u has a regex of %u bytes (1 .. 65536, inside the record)", i, len);
        if (add_split(t, r->p, len, (int)behavior, flags, err, errlen)) goto fail;
        r->p += len;
        r->left -= len;
    }
    return 0;
fail:
    tokenizer_free(t);
    return -1;
}

void tokenizer_use_regex_only(Tokenizer *t) {
    for (int i = 0; i < t->n_splits; i++) t->splits[i].fast = 0;
}

int tokenizer_load(Tokenizer *t, const unsigned char *data, size_t size, int vocab_size, char *err, size_t errlen) {
    memset(t, 0, sizeof *t);
    t->bos_id = t->unk_id = -1;
    for (int b = 0; b < 256; b++) t->byte_piece[b] = -1;
    if (size == 0) return 0; /* no tokenizer: prompts come from --tokens */
    Reader r = {data, size};
    uint32_t kind, pre, flags, bos, unk, n_eos, n_pieces, n_merges;
    if (read_u32(&r, &kind) || read_u32(&r, &pre) || read_u32(&r, &flags) || read_u32(&r, &bos) ||
        read_u32(&r, &unk) || read_u32(&r, &n_eos))
        FAIL("tokenizer record truncated in its header (%zu bytes)", size);
    if (kind != TOKENIZER_BYTELEVEL_BPE && kind != TOKENIZER_SENTENCEPIECE_BPE)
        FAIL("tokenizer kind %u is not supported", kind);
    if (pre > PRETOKENIZE_SPLITS) FAIL("tokenizer pre-tokenizer %u is not supported", pre);
    if (flags & ~2047u) FAIL("tokenizer has unknown flags 0x%x", flags);
    if ((flags & TOKF_SCORE_MERGES) && kind != TOKENIZER_SENTENCEPIECE_BPE)
        FAIL("tokenizer merges by score but is not SentencePiece-style");
    /* ByteLevel's prefix space: in a SentencePiece-style record it would put a "▁" before each stretch of a
     * text already written with its "▁"s, past the room tokenizer_encode sizes for it (found by fuzzing) */
    if ((flags & TOKF_PREFIX_SPACE) && kind != TOKENIZER_BYTELEVEL_BPE)
        FAIL("tokenizer adds ByteLevel's prefix space but is not byte-level");
    if ((uint64_t)n_eos * 4 > r.left) FAIL("tokenizer lists %u eos ids but only %zu bytes remain", n_eos, r.left);
    t->kind = (int)kind;
    t->pretokenizer = (int)pre;
    t->flags = flags;
    t->bos_id = (int32_t)bos;
    t->unk_id = (int32_t)unk;
    t->n_eos = (int)n_eos;
    t->eos_ids = malloc((n_eos + 1) * sizeof *t->eos_ids);
    if (!t->eos_ids) FAIL("out of memory loading the tokenizer");
    for (uint32_t i = 0; i < n_eos; i++) {
        uint32_t e = 0;
        read_u32(&r, &e); /* cannot fail: the length was checked above */
        t->eos_ids[i] = (int32_t)e;
    }
    if (read_u32(&r, &n_pieces) || read_u32(&r, &n_merges)) FAIL("tokenizer record truncated before its pieces");
    if (n_pieces != (uint32_t)vocab_size)
        FAIL("tokenizer has %u pieces but the model's vocabulary is %d", n_pieces, vocab_size);
    if (n_eos > n_pieces) FAIL("tokenizer lists %u eos ids for %u pieces", n_eos, n_pieces);
    if (t->bos_id < -1 || t->bos_id >= vocab_size) FAIL("tokenizer bos id %d outside the vocabulary", t->bos_id);
    if (t->unk_id < -1 || t->unk_id >= vocab_size) FAIL("tokenizer unk id %d outside the vocabulary", t->unk_id);
    t->is_eos = calloc(n_pieces, 1);
    if (!t->is_eos) FAIL("out of memory loading the tokenizer");
    for (int i = 0; i < t->n_eos; i++) {
        if (t->eos_ids[i] < 0 || t->eos_ids[i] >= vocab_size)
            FAIL("tokenizer eos id %d outside the vocabulary", t->eos_ids[i]);
        t->is_eos[t->eos_ids[i]] = 1;
    }
    t->n_pieces = (int)n_pieces;
    t->piece = calloc(n_pieces, sizeof *t->piece);
    t->piece_len = calloc(n_pieces, sizeof *t->piece_len);
    t->score = calloc(n_pieces, sizeof *t->score);
    t->type = calloc(n_pieces, 1);
    t->strip = calloc(n_pieces, 1);
    t->specials = calloc(n_pieces, sizeof *t->specials);
    if (!t->piece || !t->piece_len || !t->score || !t->type || !t->strip || !t->specials ||
        hashmap_init(&t->piece_ids, (int)n_pieces))
        FAIL("out of memory loading the tokenizer");
    for (uint32_t i = 0; i < n_pieces; i++) {
        uint32_t len, score, type;
        if (read_u32(&r, &len)) FAIL("tokenizer record truncated at piece %u", i);
        if (len > 65536 || len > r.left) FAIL("tokenizer piece %u has length %u past the end of the record", i, len);
        t->piece[i] = r.p;
        t->piece_len[i] = (int)len;
        r.p += len;
        r.left -= len;
        if (read_u32(&r, &score) || read_u32(&r, &type)) FAIL("tokenizer record truncated at piece %u", i);
        memcpy(&t->score[i], &score, 4);
        unsigned base = type & 0xFF, strip = type >> 8;
        if (base > PIECE_UNKNOWN || strip > 3) FAIL("tokenizer piece %u has unknown type 0x%x", i, type);
        if (strip && base != PIECE_SPECIAL && base != PIECE_USER)
            FAIL("tokenizer piece %u strips whitespace but is not matched in the text", i);
        t->type[i] = (unsigned char)base;
        t->strip[i] = (unsigned char)strip;
        /* before the empty pieces are skipped: an empty "byte piece" would print the byte before the table */
        int byte = base == PIECE_BYTE ? byte_of_piece(t->piece[i], (int)len) : -1;
        if (base == PIECE_BYTE && byte < 0) FAIL("tokenizer byte piece %u is not of the form <0xNN>", i);
        if (len == 0) continue;
        /* the pieces BPE may produce: SentencePiece's unused pieces too (they are split again afterwards) */
        if (base == PIECE_NORMAL || (base == PIECE_UNUSED && kind == TOKENIZER_SENTENCEPIECE_BPE)) {
            hashmap_put(&t->piece_ids, t->piece[i], (int)len, (int)i);
            if (base == PIECE_UNUSED) t->has_unused_pieces = 1;
        }
        if (base == PIECE_SPECIAL || base == PIECE_USER) t->specials[t->n_specials++] = (int)i;
        if (len == 1 && base == PIECE_NORMAL && t->byte_piece[t->piece[i][0]] < 0 && kind == TOKENIZER_BYTELEVEL_BPE)
            t->byte_piece[t->piece[i][0]] = (int)i;
        if (base == PIECE_BYTE && t->byte_piece[byte] < 0) t->byte_piece[byte] = (int)i;
    }
    /* merges: (left, right) in rank order; the result is the piece spelled by their concatenation */
    if ((uint64_t)n_merges * 8 > r.left) FAIL("tokenizer lists %u merges but only %zu bytes remain", n_merges, r.left);
    t->merge_result = malloc((n_merges + 1) * sizeof *t->merge_result);
    t->merge_keys = malloc((size_t)n_merges * 8 + 1);
    if (!t->merge_result || !t->merge_keys || hashmap_init(&t->merge_ranks, (int)n_merges))
        FAIL("out of memory loading the tokenizer merges");
    unsigned char *joined = malloc(2 * 65536);
    if (!joined) FAIL("out of memory loading the tokenizer merges");
    for (uint32_t m = 0; m < n_merges; m++) {
        uint32_t a = 0, b = 0;
        read_u32(&r, &a); /* cannot fail: the length was checked above */
        read_u32(&r, &b);
        if (a >= n_pieces || b >= n_pieces) {
            free(joined);
            FAIL("tokenizer merge %u refers to token %u outside the vocabulary", m, a >= n_pieces ? a : b);
        }
        memcpy(joined, t->piece[a], (size_t)t->piece_len[a]);
        memcpy(joined + t->piece_len[a], t->piece[b], (size_t)t->piece_len[b]);
        int id = hashmap_get(&t->piece_ids, joined, t->piece_len[a] + t->piece_len[b]);
        if (id < 0) {
            free(joined);
            FAIL("tokenizer merge %u (%u + %u) makes a piece not in the vocabulary", m, a, b);
        }
        t->merge_result[m] = id;
        unsigned char *key = t->merge_keys + (size_t)m * 8;
        memcpy(key, &a, 4);
        memcpy(key + 4, &b, 4);
        hashmap_put(&t->merge_ranks, key, 8, (int)m); /* a repeated pair keeps its first (best) rank */
    }
    free(joined);
    if (load_splits(t, &r, err, errlen) != 0) return -1;
    if (r.left != 0) FAIL("tokenizer record has %zu unexpected trailing bytes", r.left);
    if (specials_build(&t->special_matcher, t->specials, t->n_specials, t->piece, t->piece_len) != 0 ||
        build_texts(t) != 0)
        FAIL("out of memory loading the tokenizer (%d special tokens)", t->n_specials);
    return 0;
}

void tokenizer_free(Tokenizer *t) {
    free(t->piece);
    free(t->piece_len);
    free(t->score);
    free(t->type);
    free(t->strip);
    free(t->text);
    free(t->text_len);
    free(t->text_storage);
    free(t->specials);
    specials_free(&t->special_matcher);
    free(t->eos_ids);
    free(t->is_eos);
    free(t->piece_ids.slots);
    free(t->merge_ranks.slots);
    free(t->merge_result);
    free(t->merge_keys);
    for (int i = 0; i < t->n_splits; i++) regex_free(t->splits[i].regex);
    memset(t, 0, sizeof *t);
    t->bos_id = t->unk_id = -1;
}

/* ---------------------------------------------------------------------------------------------
 * pre-tokenizers: hand-written matchers for the regexes, over the Unicode class tables.
 * Each returns the end of the pre-token that starts at text[i]. */

typedef struct {
    const unsigned char *s;
    size_t n;
} Text;

static uint32_t char_at(Text t, size_t i, int *len) {
    uint32_t cp;
    *len = utf8_decode(t.s + i, t.n - i, &cp);
    return cp;
}

static int is_letter(uint32_t c) { return c < 128 ? ((c | 32) - 'a' < 26) : unicode_in(&unicode_letter, c); }
static int is_number(uint32_t c) { return c < 128 ? (c - '0' < 10) : unicode_in(&unicode_number, c); }
static int is_space(uint32_t c) {
    return c < 128 ? (c == ' ' || (c >= 9 && c <= 13)) : unicode_in(&unicode_space, c);
}
static int is_other(uint32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); } /* [^\s\p{L}\p{N}] */

/* the end of a run of characters of one class starting at i */
static size_t run_of(Text t, size_t i, int (*cls)(uint32_t)) {
    int len;
    while (i < t.n && cls(char_at(t, i, &len))) i += (size_t)len;
    return i;
}

/* 's 't 're 've 'm 'll 'd: the length of the contraction at i, or 0. Case-insensitively (Llama 3), a
 * letter also matches its upper case, and "s" the long s "ſ" (U+017F), which case-folds to it. */
static size_t contraction(Text t, size_t i, int ignore_case) {
    static const char *forms[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    if (t.s[i] != '\'') return 0;
    for (int f = 0; f < 7; f++) {
        size_t k = strlen(forms[f]);
        if (ignore_case && f == 0 && i + 3 <= t.n && t.s[i + 1] == 0xC5 && t.s[i + 2] == 0xBF) return 3;
        if (i + 1 + k > t.n) continue;
        size_t j = 0;
        for (; j < k; j++) {
            unsigned char c = t.s[i + 1 + j];
            if (c != (unsigned char)forms[f][j] && !(ignore_case && (c | 32) == (unsigned char)forms[f][j])) break;
        }
        if (j == k) return 1 + k;
    }
    return 0;
}

/* \s+(?!\S) then \s+ : a run of spaces, leaving the last one to the next word when a non-space follows */
static size_t spaces(Text t, size_t i) {
    int len;
    size_t end = run_of(t, i, is_space), last = i;
    if (end == t.n) return end;
    for (size_t j = i; j < end; j += (size_t)len) { /* start of the run's last character */
        char_at(t, j, &len);
        last = j;
    }
    return last > i ? last : end;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t gpt2_word(Text t, size_t i) {
    int len, len2;
    size_t k = contraction(t, i, 0);
    if (k) return i + k;
    uint32_t c = char_at(t, i, &len);
    size_t j = i;
    if (c == ' ' && i + 1 < t.n) { /* the optional leading space belongs to the word that follows */
        c = char_at(t, i + 1, &len2);
        if (!is_space(c)) j = i + 1;
    }
    if (is_letter(c)) return run_of(t, j, is_letter);
    if (is_number(c)) return run_of(t, j, is_number);
    if (is_other(c)) return run_of(t, j, is_other);
    return spaces(t, i);
}

/* Llama 3 (digits_max 3) and Qwen2 (digits_max 1):
 * (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static size_t llama3_word(Text t, size_t i, int digits_max) {
    int len, len2;
    size_t k = contraction(t, i, 1);
    if (k) return i + k;
    uint32_t c = char_at(t, i, &len);
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (is_letter(c)) return run_of(t, i, is_letter);
    if (c != '\r' && c != '\n' && !is_number(c) && i + (size_t)len < t.n &&
        is_letter(char_at(t, i + (size_t)len, &len2)))
        return run_of(t, i + (size_t)len, is_letter);
    /* \p{N}{1,3} */
    if (is_number(c)) {
        size_t j = i;
        for (int d = 0; d < digits_max && j < t.n && is_number(char_at(t, j, &len2)); d++) j += (size_t)len2;
        return j;
    }
    /* ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t j = i;
    if (c == ' ' && i + 1 < t.n && is_other(char_at(t, i + 1, &len2))) j = i + 1;
    if (is_other(char_at(t, j, &len2))) {
        j = run_of(t, j, is_other);
        while (j < t.n && (t.s[j] == '\r' || t.s[j] == '\n')) j++;
        return j;
    }
    /* \s*[\r\n]+ : the whitespace run up to and including its last newline */
    size_t end = run_of(t, i, is_space), last_nl = 0;
    for (size_t p = i; p < end; p++)
        if (t.s[p] == '\r' || t.s[p] == '\n') last_nl = p + 1;
    if (last_nl) return last_nl;
    return spaces(t, i);
}

/* Metaspace with split: a word starts at every "▁" (the mark stays with the word it opens) */
static size_t metaspace_word(Text t, size_t i) {
    size_t j = i + (starts_with_mark(t.s + i, t.n - i) ? SPACE_MARK_LEN : 1);
    while (j < t.n && !starts_with_mark(t.s + j, t.n - j)) j++; /* "▁" cannot start inside another character */
    return j;
}

/* the end of the word at i by the hand-written matcher for a known regex */
static size_t fast_word(int which, Text t, size_t i) {
    size_t end = which == PRETOKENIZE_GPT2 ? gpt2_word(t, i) : llama3_word(t, i, which == PRETOKENIZE_LLAMA3 ? 3 : 1);
    return end > i ? end : i + 1; /* cannot happen with the matchers above; keeps progress certain */
}

/* ---------------------------------------------------------------------------------------------
 * BPE over one word: symbols in a linked list, candidate merges in a min-heap keyed by
 * (priority, position) so the best pair merges first and, between equals, the leftmost. */

typedef struct {
    int id;         /* token id; -1 for a character outside the vocabulary (SentencePiece .model) */
    int start, len; /* the bytes of the word it covers; len 0 once merged into its left neighbour */
    int prev, next;
} Symbol;

typedef struct {
    float priority; /* lower merges first: the merge rank, or minus the score of the joined piece */
    int left, right;
    int size;       /* bytes of the joined pair; the candidate is stale once either side has changed */
    int merged;
} Candidate;

typedef struct {
    Candidate *items;
    int n;
} Heap;

static int cand_less(const Candidate *a, const Candidate *b) {
    return a->priority < b->priority || (a->priority == b->priority && a->left < b->left);
}

static void heap_push(Heap *h, Candidate c) {
    int i = h->n++;
    h->items[i] = c;
    while (i > 0 && cand_less(&h->items[i], &h->items[(i - 1) / 2])) {
        Candidate tmp = h->items[i];
        h->items[i] = h->items[(i - 1) / 2];
        h->items[(i - 1) / 2] = tmp;
        i = (i - 1) / 2;
    }
}

static Candidate heap_pop(Heap *h) {
    Candidate top = h->items[0];
    h->items[0] = h->items[--h->n];
    for (int i = 0;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < h->n && cand_less(&h->items[l], &h->items[m])) m = l;
        if (r < h->n && cand_less(&h->items[r], &h->items[m])) m = r;
        if (m == i) break;
        Candidate tmp = h->items[i];
        h->items[i] = h->items[m];
        h->items[m] = tmp;
        i = m;
    }
    return top;
}

/* An unused piece some merge could make, and the two pieces it would be made from: SentencePiece splits
 * such a piece back into them once merging is done (the last pair recorded for a piece wins). */
typedef struct {
    int id, left_start, left_len, right_start, right_len;
} UnusedSplit;

/* One encode call: scratch sized for its longest stretch, and the ids written so far. */
typedef struct {
    size_t start, end;
} Span;

typedef struct {
    size_t start, end;
    int is_match;
} Segment;

typedef struct {
    const Tokenizer *t;
    Span *words, *next_words;  /* the pre-tokens of a stretch, and room for the next Split step's */
    Segment *segments;         /* one piece's matches and the text between them */
    RegexScratch *regex;
    int failed;                /* -1: out of memory; TOKENIZER_REGEX_TOO_SLOW */
    const unsigned char *word; /* the word being merged */
    Symbol *sym;
    Heap heap;
    UnusedSplit *splits;
    int n_splits;
    unsigned char *stretch;    /* a stretch with its prefix, spaces written "▁" where the tokenizer does */
    int *ids;
    int count;
    int prev_unknown;          /* the last id written is an <unk> standing for text outside the vocabulary */
} Encoder;

static void emit(Encoder *e, int id) {
    e->ids[e->count++] = id;
    e->prev_unknown = 0;
}

/* The merge of two neighbouring symbols, if the tokenizer has one: sets priority and merged id. */
static int find_merge(Encoder *e, const Symbol *a, const Symbol *b, float *priority, int *merged) {
    const Tokenizer *t = e->t;
    if (t->flags & TOKF_SCORE_MERGES) { /* SentencePiece .model: the pair whose joined piece scores best */
        int id = hashmap_get(&t->piece_ids, e->word + a->start, a->len + b->len);
        if (id < 0) return 0;
        *priority = -t->score[id];
        *merged = id;
        if (t->type[id] == PIECE_UNUSED) e->splits[e->n_splits++] = (UnusedSplit){id, a->start, a->len, b->start, b->len};
        return 1;
    }
    if (a->id < 0 || b->id < 0) return 0;
    unsigned char key[8];
    memcpy(key, &a->id, 4);
    memcpy(key + 4, &b->id, 4);
    int rank = hashmap_get(&t->merge_ranks, key, 8);
    if (rank < 0) return 0;
    *priority = (float)rank;
    *merged = t->merge_result[rank];
    return 1;
}

static void push_pair(Encoder *e, int left) {
    const Symbol *a = &e->sym[left];
    Candidate c;
    if (a->next < 0 || !find_merge(e, a, &e->sym[a->next], &c.priority, &c.merged)) return;
    c.left = left;
    c.right = a->next;
    c.size = a->len + e->sym[a->next].len;
    heap_push(&e->heap, c);
}

/* Merges the word's symbols sym[0..n) (id, start and len set) until no pair can merge. */
static void bpe(Encoder *e, int n) {
    Symbol *sym = e->sym;
    for (int i = 0; i < n; i++) {
        sym[i].prev = i - 1;
        sym[i].next = i + 1 < n ? i + 1 : -1;
    }
    e->heap.n = 0;
    e->n_splits = 0;
    for (int i = 0; i + 1 < n; i++) push_pair(e, i);
    while (e->heap.n > 0) {
        Candidate c = heap_pop(&e->heap);
        Symbol *a = &sym[c.left], *b = &sym[c.right];
        /* skip candidates made stale by an earlier merge: a side that grew or was swallowed */
        if (a->len == 0 || b->len == 0 || a->next != c.right || a->len + b->len != c.size) continue;
        a->id = c.merged;
        a->len += b->len;
        b->len = 0;
        a->next = b->next;
        if (b->next >= 0) sym[b->next].prev = c.left;
        if (a->prev >= 0) push_pair(e, a->prev);
        push_pair(e, c.left);
    }
}

/* Byte-level BPE of one word: one symbol per byte, then merges. */
static void encode_word_bytelevel(Encoder *e, const unsigned char *w, int len) {
    const Tokenizer *t = e->t;
    int n = 0;
    for (int i = 0; i < len; i++) {
        int id = t->byte_piece[w[i]];
        if (id < 0) id = t->unk_id;
        if (id >= 0) e->sym[n++] = (Symbol){id, i, 1, 0, 0}; /* a byte the vocabulary lacks (and no unk) is dropped, as HF does */
    }
    e->word = w;
    bpe(e, n);
    for (int i = 0; n > 0 && i >= 0; i = e->sym[i].next) emit(e, e->sym[i].id);
}

static int bytes_have_pieces(const Tokenizer *t, const unsigned char *s, int n) {
    if (!(t->flags & TOKF_BYTE_FALLBACK)) return 0;
    for (int i = 0; i < n; i++)
        if (t->byte_piece[s[i]] < 0) return 0;
    return 1;
}

/* Writes the piece a SentencePiece (.model) merge left over word[start, start + len): an unused piece
 * splits back into the pieces it was made from, text outside the vocabulary becomes its byte pieces,
 * or without byte fallback one <unk> for a whole run. */
static void emit_sentencepiece(Encoder *e, int start, int len, int id) {
    const Tokenizer *t = e->t;
    if (id >= 0 && t->type[id] == PIECE_UNUSED) {
        for (int k = e->n_splits - 1; k >= 0; k--) {
            const UnusedSplit *s = &e->splits[k];
            if (s->id != id) continue;
            emit_sentencepiece(e, start, s->left_len, hashmap_get(&t->piece_ids, e->word + s->left_start, s->left_len));
            emit_sentencepiece(e, start + s->left_len, s->right_len,
                               hashmap_get(&t->piece_ids, e->word + s->right_start, s->right_len));
            return;
        }
    }
    if (id >= 0) {
        emit(e, id);
    } else if (bytes_have_pieces(t, e->word + start, len)) {
        for (int k = 0; k < len; k++) emit(e, t->byte_piece[e->word[start + k]]);
    } else if (t->unk_id >= 0 && !e->prev_unknown) {
        emit(e, t->unk_id);
        e->prev_unknown = 1;
    }
}

/* SentencePiece-style BPE of one word (its spaces already "▁"): one symbol per character. A character
 * outside the vocabulary becomes its byte pieces (or <unk>) before merging as the tokenizers library does,
 * or, merging by score as the sentencepiece library does, stays a symbol and falls back afterwards. */
static void encode_word_spacemark(Encoder *e, const unsigned char *w, int len) {
    const Tokenizer *t = e->t;
    int by_score = (t->flags & TOKF_SCORE_MERGES) != 0;
    int n = 0;
    for (int i = 0; i < len;) {
        uint32_t cp;
        int clen = utf8_decode(w + i, (size_t)(len - i), &cp);
        int id = hashmap_get(&t->piece_ids, w + i, clen);
        if (id >= 0 || by_score) {
            e->sym[n++] = (Symbol){id, i, clen, 0, 0};
        } else if (bytes_have_pieces(t, w + i, clen)) {
            for (int k = 0; k < clen; k++) e->sym[n++] = (Symbol){t->byte_piece[w[i + k]], i + k, 1, 0, 0};
        } else if (t->unk_id >= 0) {
            if (n > 0 && e->sym[n - 1].id == t->unk_id) e->sym[n - 1].len += clen; /* fuse_unk: one <unk> per run */
            else e->sym[n++] = (Symbol){t->unk_id, i, clen, 0, 0};
        } /* else dropped, as the tokenizers library does without an unk token */
        i += clen;
    }
    e->word = w;
    bpe(e, n);
    for (int i = 0; n > 0 && i >= 0; i = e->sym[i].next) {
        if (by_score) emit_sentencepiece(e, e->sym[i].start, e->sym[i].len, e->sym[i].id);
        else emit(e, e->sym[i].id);
    }
}

/* ---------------------------------------------------------------------------------------------
 * pre-tokenizing a stretch: Metaspace, or the Split steps one after another, each splitting every piece
 * the step before left (the tokenizers library's Sequence of pre-tokenizers) */

/* A piece's matches and the text between them, in order, as the tokenizers library lists them for a
 * Split (invert: the two swap roles). Returns how many, or -1 when out of memory. */
static int find_segments(Encoder *e, const PreSplit *step, const unsigned char *s, size_t n) {
    RegexIterator it = {0, 0, 0};
    size_t prev = 0, a, b;
    int count = 0, r, invert = (step->flags & SPLIT_INVERT) != 0;
    while ((r = regex_next_match(step->regex, e->regex, s, n, &it, &a, &b)) > 0) {
        if (a != prev) e->segments[count++] = (Segment){prev, a, invert};
        e->segments[count++] = (Segment){a, b, !invert};
        prev = b;
    }
    if (r < 0) return r;
    if (prev != n) e->segments[count++] = (Segment){prev, n, invert};
    return count;
}

/* Joins segments as the step's behavior says (SplitDelimiterBehavior), in place; returns how many remain.
 * Removed drops the matches; Contiguous joins neighbours that are both matches or both not; MergedWith*
 * joins a match to the piece before / after it. */
static int apply_behavior(Segment *seg, int n, int behavior) {
    int out = 0, previous_match = 0;
    if (behavior == SPLIT_MERGED_WITH_NEXT) { /* walked from the end, then put back in order */
        for (int i = n - 1; i >= 0; i--) {
            if (seg[i].is_match && !previous_match && out > 0) seg[n - out].start = seg[i].start;
            else seg[n - ++out] = (Segment){seg[i].start, seg[i].end, 0};
            previous_match = seg[i].is_match;
        }
        memmove(seg, seg + n - out, (size_t)out * sizeof *seg);
        return out;
    }
    for (int i = 0; i < n; i++) {
        int join = behavior == SPLIT_CONTIGUOUS ? seg[i].is_match == previous_match && out > 0
                 : behavior == SPLIT_MERGED_WITH_PREVIOUS ? seg[i].is_match && !previous_match && out > 0 : 0;
        previous_match = seg[i].is_match;
        if (behavior == SPLIT_REMOVED && seg[i].is_match) continue;
        if (join) seg[out - 1].end = seg[i].end;
        else seg[out++] = (Segment){seg[i].start, seg[i].end, 0};
    }
    return out;
}

/* Splits the piece s[span) by one step, appending its non-empty pieces to out; returns how many or -1. */
static int split_piece(Encoder *e, const PreSplit *step, const unsigned char *s, Span span, Span *out) {
    const unsigned char *p = s + span.start;
    size_t n = span.end - span.start;
    int count = 0;
    if (step->fast) {
        Text text = {p, n};
        for (size_t i = 0; i < n;) {
            size_t end = fast_word(step->fast, text, i);
            out[count++] = (Span){span.start + i, span.start + end};
            i = end;
        }
        return count;
    }
    int n_seg = find_segments(e, step, p, n);
    if (n_seg < 0) return n_seg;
    n_seg = apply_behavior(e->segments, n_seg, step->behavior);
    for (int i = 0; i < n_seg; i++)
        if (e->segments[i].end > e->segments[i].start)
            out[count++] = (Span){span.start + e->segments[i].start, span.start + e->segments[i].end};
    return count;
}

/* The words of a stretch s[0..m) into e->words; returns how many, or -1 when out of memory. */
static int split_words(Encoder *e, const unsigned char *s, size_t m) {
    const Tokenizer *t = e->t;
    if (m == 0) return 0;
    int n = 0;
    if (t->pretokenizer == PRETOKENIZE_METASPACE) {
        for (size_t i = 0; i < m; i = e->words[n++].end) e->words[n] = (Span){i, metaspace_word((Text){s, m}, i)};
        return n;
    }
    e->words[n++] = (Span){0, m}; /* no pre-tokenizer: the whole stretch is one word */
    for (int k = 0; k < t->n_splits; k++) {
        int count = 0;
        for (int i = 0; i < n; i++) {
            int r = split_piece(e, &t->splits[k], s, e->words[i], e->next_words + count);
            if (r < 0) return r;
            count += r;
        }
        Span *swap = e->words;
        e->words = e->next_words;
        e->next_words = swap;
        n = count;
    }
    return n;
}

/* ---------------------------------------------------------------------------------------------
 * stretches of plain text, special tokens, the whole prompt */

/* Whether a stretch s[0..n) of plain text, starting at byte `at` of the text, gets a prefix: ByteLevel's
 * space, or the dummy "▁" where the tokenizers library normalizes stretch by stretch. */
static int wants_prefix(const Tokenizer *t, const unsigned char *s, size_t n, size_t at) {
    unsigned f = t->flags;
    if (f & TOKF_PREFIX_SPACE) return n > 0 && s[0] != ' '; /* ByteLevel add_prefix_space, on every stretch */
    if (!(f & TOKF_DUMMY_PREFIX) || !(f & TOKF_NORMALIZE_EACH_STRETCH) || n == 0) return 0;
    if ((f & TOKF_PREFIX_FIRST_STRETCH) && at != 0) return 0;
    return !((f & TOKF_PREFIX_UNLESS_SPACE) && (s[0] == ' ' || starts_with_mark(s, n)));
}

/* Writes s[0..n) as the tokenizer reads it into out (room for 3 n + 3 bytes), after a prefix if asked:
 * SentencePiece-style tokenizers write a space as "▁" and a byte that is not UTF-8 as U+FFFD (as the
 * sentencepiece library reads it). Returns the bytes written; text written once is left as it is. */
static size_t write_text(const Tokenizer *t, const unsigned char *s, size_t n, int prefix, unsigned char *out) {
    int spacemark = t->kind == TOKENIZER_SENTENCEPIECE_BPE;
    size_t m = 0;
    if (prefix) {
        if (spacemark) memcpy(out, SPACE_MARK, SPACE_MARK_LEN), m = SPACE_MARK_LEN;
        else out[m++] = ' ';
    }
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int len = spacemark ? utf8_decode(s + i, n - i, &cp) : 1;
        if (spacemark && s[i] == ' ') memcpy(out + m, SPACE_MARK, SPACE_MARK_LEN), m += SPACE_MARK_LEN;
        else if (spacemark && s[i] >= 0x80 && len == 1) memcpy(out + m, "\xEF\xBF\xBD", 3), m += 3;
        else memcpy(out + m, s + i, (size_t)len), m += (size_t)len;
        i += (size_t)len;
    }
    return m;
}

/* Encodes one stretch of text that holds no special token. */
static void encode_stretch(Encoder *e, const unsigned char *s, size_t n, int prefix) {
    const Tokenizer *t = e->t;
    unsigned char *out = e->stretch;
    size_t m = write_text(t, s, n, prefix, out);
    int n_words = split_words(e, out, m);
    if (n_words < 0) {
        e->failed = n_words;
        return;
    }
    for (int w = 0; w < n_words; w++) {
        size_t i = e->words[w].start, end = e->words[w].end;
        int whole = t->flags & TOKF_IGNORE_MERGES ? hashmap_get(&t->piece_ids, out + i, (int)(end - i)) : -1;
        if (whole >= 0) emit(e, whole); /* ignore_merges: a word in the vocabulary is one token */
        else if (t->kind == TOKENIZER_SENTENCEPIECE_BPE) encode_word_spacemark(e, out + i, (int)(end - i));
        else encode_word_bytelevel(e, out + i, (int)(end - i));
    }
}

/* Where the whitespace that ends s[start..end) begins (end if it does not end in whitespace). */
static size_t trailing_space(const unsigned char *s, size_t start, size_t end) {
    size_t after_text = start;
    Text t = {s, end};
    for (size_t i = start; i < end;) {
        int len;
        uint32_t c = char_at(t, i, &len);
        i += (size_t)len;
        if (!is_space(c)) after_text = i;
    }
    return after_text;
}

/* SentencePiece remove_extra_whitespaces: no space at the start, each run of spaces as one, and nothing
 * that would be written "▁" at the end (a "▁" in the text itself included, as SentencePiece strips the
 * written form). */
static size_t squeeze_spaces(const unsigned char *s, size_t n, unsigned char *out) {
    size_t i = 0, m = 0;
    while (i < n && s[i] == ' ') i++;
    for (; i < n; i++)
        if (s[i] != ' ' || out[m - 1] != ' ') out[m++] = s[i]; /* out is not empty: s[i] was not a space first */
    for (;;) {
        if (m > 0 && out[m - 1] == ' ') m--;
        else if (m >= SPACE_MARK_LEN && memcmp(out + m - SPACE_MARK_LEN, SPACE_MARK, SPACE_MARK_LEN) == 0) m -= SPACE_MARK_LEN;
        else return m;
    }
}

int tokenizer_pretokenize(const Tokenizer *t, const char *text, size_t len, size_t *spans) {
    size_t room = 3 * len + 1;
    Encoder e = {.t = t};
    unsigned char *written = malloc(room);
    e.words = malloc((room + 1) * sizeof *e.words);
    e.next_words = malloc((room + 1) * sizeof *e.next_words);
    e.segments = malloc((2 * room + 3) * sizeof *e.segments);
    e.regex = regex_scratch_new();
    int n = -1;
    if (written && e.words && e.next_words && e.segments && e.regex) {
        n = split_words(&e, written, write_text(t, (const unsigned char *)text, len, 0, written));
        for (int i = 0; i < n; i++) spans[2 * i] = e.words[i].start, spans[2 * i + 1] = e.words[i].end;
    }
    free(written);
    free(e.words);
    free(e.next_words);
    free(e.segments);
    regex_scratch_free(e.regex);
    return n;
}

int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int add_bos, int *ids) {
    Encoder e = {.t = t, .ids = ids};
    if (add_bos && (t->flags & TOKF_ADD_BOS) && t->bos_id >= 0) e.ids[e.count++] = t->bos_id;
    const unsigned char *s = (const unsigned char *)text;
    unsigned char *squeezed = NULL, *normalized = NULL;
    if (t->flags & TOKF_REMOVE_EXTRA_SPACES) {
        if (!(squeezed = malloc(len + 1))) return -1;
        len = squeeze_spaces(s, len, squeezed);
        s = squeezed;
    }
    if (t->kind == TOKENIZER_SENTENCEPIECE_BPE && !(t->flags & TOKF_NORMALIZE_EACH_STRETCH)) {
        /* the sentencepiece library writes the whole text ("▁", dummy prefix) before it cuts user-defined
         * pieces out of it; the tokenizers library does it stretch by stretch, below */
        if (!(normalized = malloc(3 * len + SPACE_MARK_LEN + 1))) {
            free(squeezed);
            return -1;
        }
        len = write_text(t, s, len, (t->flags & TOKF_DUMMY_PREFIX) && len > 0, normalized);
        s = normalized;
    }
    /* a stretch is at most len bytes and a prefix; written with "▁" it can triple (unless the whole text is
     * written already), and each of those bytes may become a symbol (byte fallback); each merge pushes at
     * most two candidates */
    size_t max_symbols = normalized ? len + SPACE_MARK_LEN + 1 : 3 * len + SPACE_MARK_LEN + 1;
    e.stretch = malloc(max_symbols);
    e.sym = malloc(max_symbols * sizeof *e.sym);
    e.heap.items = malloc(3 * max_symbols * sizeof *e.heap.items);
    e.splits = malloc((t->has_unused_pieces ? 3 * max_symbols : 1) * sizeof *e.splits);
    /* the longest special token starting at each byte, found for the whole text in one pass (specials.h) */
    int *special_at = t->n_specials ? malloc((len + 1) * sizeof *special_at) : NULL;
    /* a stretch of m bytes splits into at most m words; a regex has at most m + 1 matches there (empty ones
     * included), with the text between them at most 2 m + 3 segments */
    e.words = malloc((max_symbols + 1) * sizeof *e.words);
    e.next_words = malloc((max_symbols + 1) * sizeof *e.next_words);
    e.segments = malloc((2 * max_symbols + 3) * sizeof *e.segments);
    e.regex = regex_scratch_new();
    int ok = e.stretch && e.sym && e.heap.items && e.splits && e.words && e.next_words && e.segments && e.regex &&
             (special_at || !t->n_specials);
    if (ok && special_at) specials_longest_at(&t->special_matcher, s, len, special_at);
    for (size_t start = 0, i = 0; ok && i <= len;) { /* s[start..i) is plain text so far */
        int special = i < len && special_at ? special_at[i] : -1;
        if (special < 0 && i < len) {
            i++;
            continue;
        }
        size_t end = i, next = i; /* the stretch is s[start..end); matching resumes at next */
        if (special >= 0) {
            next = i + (size_t)t->piece_len[special];
            if (t->strip[special] & (PIECE_LSTRIP >> 8)) end = trailing_space(s, start, end);
            if (t->strip[special] & (PIECE_RSTRIP >> 8)) next = run_of((Text){s, len}, next, is_space);
        }
        encode_stretch(&e, s + start, end - start, wants_prefix(t, s + start, end - start, start));
        if (e.failed) ok = 0;
        if (special < 0 || !ok) break;
        emit(&e, special);
        start = i = next;
    }
    free(e.stretch);
    free(e.sym);
    free(e.heap.items);
    free(e.splits);
    free(special_at);
    free(e.words);
    free(e.next_words);
    free(e.segments);
    regex_scratch_free(e.regex);
    free(squeezed);
    free(normalized);
    return ok ? e.count : e.failed ? e.failed : -1;
}

/* The longest of the control pieces controls[0..n_controls) spelled at s[0..n), or -1 */
static int control_at(const Tokenizer *t, const int *controls, int n_controls, const unsigned char *s, size_t n) {
    int best = -1;
    for (int k = 0; k < n_controls; k++) {
        int id = controls[k];
        size_t len = (size_t)t->piece_len[id];
        if (len <= n && (best < 0 || t->piece_len[id] > t->piece_len[best]) && memcmp(s, t->piece[id], len) == 0) best = id;
    }
    return best;
}

static int grow_ids(int **ids, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    int *grown = realloc(*ids, (*cap = 2 * need) * sizeof **ids);
    if (!grown) return -1;
    *ids = grown;
    return 0;
}

int tokenizer_encode_chat(const Tokenizer *t, const char *text, size_t len, int **ids) {
    const unsigned char *s = (const unsigned char *)text;
    int *controls = malloc(((size_t)t->n_pieces + 1) * sizeof *controls), n_controls = 0;
    size_t cap = tokenizer_max_ids(len), n = 0;
    int *out = malloc(cap * sizeof *out);
    if (!controls || !out) return free(controls), free(out), -1;
    for (int id = 0; id < t->n_pieces; id++)
        if (t->type[id] == PIECE_CONTROL && t->piece_len[id] > 0) controls[n_controls++] = id;
    for (size_t start = 0, i = 0; i <= len; i++) { /* s[start..i) is a stretch of plain text */
        int control = i < len && n_controls ? control_at(t, controls, n_controls, s + i, len - i) : -1;
        if (control < 0 && i < len) continue;
        if (i > start) {
            if (grow_ids(&out, &cap, n + tokenizer_max_ids(i - start)) != 0) return free(controls), free(out), -1;
            int k = tokenizer_encode(t, text + start, i - start, 0, out + n);
            if (k < 0) return free(controls), free(out), k; /* out of memory, or TOKENIZER_REGEX_TOO_SLOW */
            n += (size_t)k;
        }
        if (control < 0) break;
        if (grow_ids(&out, &cap, n + 1) != 0) return free(controls), free(out), -1;
        out[n++] = control;
        start = i + (size_t)t->piece_len[control];
        i = start - 1;
    }
    free(controls);
    *ids = out;
    return (int)n;
}

/* ---------------------------------------------------------------------------------------------
 * decoding */

const unsigned char *tokenizer_decode(const Tokenizer *t, DecodeState *d, int id, int *len) {
    if (id < 0 || id >= t->n_pieces) {
        *len = 0;
        return (const unsigned char *)"";
    }
    const unsigned char *s = t->text[id];
    int n = t->text_len[id], type = t->type[id];
    if (type != PIECE_BYTE) { /* (byte pieces leave the dropped-space mark alone, as SentencePiece does) */
        int drop = (t->flags & TOKF_STRIP_LEADING_SPACE) && !d->printed && !d->dropped_space && n > 0 && s[0] == ' ' &&
                   type != PIECE_UNKNOWN;
        s += drop;
        n -= drop;
        /* with remove_extra_whitespaces SentencePiece keeps dropping until something is printed */
        d->dropped_space = drop && !(t->flags & TOKF_REMOVE_EXTRA_SPACES);
    }
    if (n > 0) d->printed = 1;
    *len = n;
    return s;
}

int tokenizer_is_eos(const Tokenizer *t, int id) { return id >= 0 && id < t->n_pieces && t->is_eos && t->is_eos[id]; }

static void put_replacement(FILE *out) { fputs("\xEF\xBF\xBD", out); }

void utf8_stream_write(Utf8Stream *s, FILE *out, const unsigned char *bytes, int len) {
    for (int i = 0; i < len; i++) {
        unsigned char b = bytes[i];
        if (s->n_pending > 0) {
            if ((b & 0xC0) == 0x80) { /* continues the pending character */
                s->pending[s->n_pending++] = b;
                uint32_t cp;
                int need = utf8_sequence_length(s->pending[0]);
                if (s->n_pending == need) {
                    if (utf8_decode(s->pending, (size_t)need, &cp) == need) fwrite(s->pending, 1, (size_t)need, out);
                    else put_replacement(out);
                    s->n_pending = 0;
                }
                continue;
            }
            put_replacement(out); /* the pending character was cut short */
            s->n_pending = 0;
        }
        int need = utf8_sequence_length(b);
        if (need == 1) fputc(b, out);
        else if (need == 0) put_replacement(out);
        else s->pending[s->n_pending++] = b;
    }
}

void utf8_stream_flush(Utf8Stream *s, FILE *out) {
    if (s->n_pending > 0) put_replacement(out);
    s->n_pending = 0;
}
