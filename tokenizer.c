/* tokenizer.c - BPE tokenizers (byte-level and SentencePiece-style), special tokens, streaming decode.
 *
 * encode(text):
 *   1. SentencePiece's remove_extra_whitespaces, where asked for, trims and squeezes the spaces;
 *   2. special tokens written in the text are cut out and kept as single ids; what lies between them are
 *      "stretches" of plain text. SentencePiece-style tokenizers write spaces as "▁" (with a dummy "▁"
 *      in front): the sentencepiece library writes the whole text so before it looks for its user-defined
 *      pieces, the tokenizers library writes each stretch after cutting out its added tokens;
 *   3. each stretch is split into pre-tokens ("words") by the family's rule;
 *   4. each word starts as one symbol per byte (byte-level) or per character (SentencePiece-style), and
 *      BPE joins the adjacent pair with the best merge rank (or the best-scoring joined piece) until no
 *      pair can merge; characters outside the vocabulary fall back to <0xNN> byte pieces or <unk>. */
#include "tokenizer.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

typedef struct {
    int len, id;
} LengthId;

static int longer_first(const void *a, const void *b) {
    const LengthId *x = a, *y = b;
    return x->len != y->len ? y->len - x->len : x->id - y->id;
}

/* Orders special ids longest first, so "<|im_start|>" is tried before a shorter token it begins with. */
static int sort_longest_first(int *ids, int n, const int *lens) {
    LengthId *tmp = malloc((size_t)(n > 0 ? n : 1) * sizeof *tmp);
    if (!tmp) return -1;
    for (int i = 0; i < n; i++) tmp[i] = (LengthId){lens[ids[i]], ids[i]};
    qsort(tmp, (size_t)n, sizeof *tmp, longer_first);
    for (int i = 0; i < n; i++) ids[i] = tmp[i].id;
    free(tmp);
    return 0;
}

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
    if (pre > PRETOKENIZE_METASPACE) FAIL("tokenizer pre-tokenizer %u is not supported", pre);
    if (flags & ~2047u) FAIL("tokenizer has unknown flags 0x%x", flags);
    if ((flags & TOKF_SCORE_MERGES) && kind != TOKENIZER_SENTENCEPIECE_BPE)
        FAIL("tokenizer merges by score but is not SentencePiece-style");
    /* ByteLevel's prefix space: in a SentencePiece-style record it would put a "▁" before each stretch of a
     * text already written with its "▁"s, past the room tokenizer_encode sizes for it (found by fuzzing) */
    if ((flags & TOKF_PREFIX_SPACE) && kind != TOKENIZER_BYTELEVEL_BPE)
        FAIL("tokenizer adds ByteLevel's prefix space but is not byte-level");
    if (n_eos > TOKENIZER_MAX_EOS) FAIL("tokenizer lists %u eos ids (at most %d)", n_eos, TOKENIZER_MAX_EOS);
    t->kind = (int)kind;
    t->pretokenizer = (int)pre;
    t->flags = flags;
    t->bos_id = (int32_t)bos;
    t->unk_id = (int32_t)unk;
    t->n_eos = (int)n_eos;
    for (uint32_t i = 0; i < n_eos; i++) {
        uint32_t e;
        if (read_u32(&r, &e)) FAIL("tokenizer record truncated in its eos ids");
        t->eos_ids[i] = (int32_t)e;
    }
    if (read_u32(&r, &n_pieces) || read_u32(&r, &n_merges)) FAIL("tokenizer record truncated before its pieces");
    if (n_pieces != (uint32_t)vocab_size)
        FAIL("tokenizer has %u pieces but the model's vocabulary is %d", n_pieces, vocab_size);
    if (t->bos_id < -1 || t->bos_id >= vocab_size) FAIL("tokenizer bos id %d outside the vocabulary", t->bos_id);
    if (t->unk_id < -1 || t->unk_id >= vocab_size) FAIL("tokenizer unk id %d outside the vocabulary", t->unk_id);
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos_ids[i] < 0 || t->eos_ids[i] >= vocab_size)
            FAIL("tokenizer eos id %d outside the vocabulary", t->eos_ids[i]);
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
    if (r.left != 0) FAIL("tokenizer record has %zu unexpected trailing bytes", r.left);
    if (sort_longest_first(t->specials, t->n_specials, t->piece_len) != 0 || build_texts(t) != 0)
        FAIL("out of memory loading the tokenizer");
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
    free(t->piece_ids.slots);
    free(t->merge_ranks.slots);
    free(t->merge_result);
    free(t->merge_keys);
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

static size_t next_word(const Tokenizer *tok, Text t, size_t i) {
    switch (tok->pretokenizer) {
    case PRETOKENIZE_GPT2: return gpt2_word(t, i);
    case PRETOKENIZE_LLAMA3: return llama3_word(t, i, 3);
    case PRETOKENIZE_QWEN2: return llama3_word(t, i, 1);
    case PRETOKENIZE_METASPACE: return metaspace_word(t, i);
    default: return t.n; /* no pre-tokenizer: the whole stretch is one word */
    }
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
    const Tokenizer *t;
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
    Text text = {out, m};
    for (size_t i = 0; i < m;) {
        size_t end = next_word(t, text, i);
        if (end <= i) end = i + 1; /* cannot happen with the matchers above; keeps progress certain */
        int whole = t->flags & TOKF_IGNORE_MERGES ? hashmap_get(&t->piece_ids, out + i, (int)(end - i)) : -1;
        if (whole >= 0) emit(e, whole); /* ignore_merges: a word in the vocabulary is one token */
        else if (t->kind == TOKENIZER_SENTENCEPIECE_BPE) encode_word_spacemark(e, out + i, (int)(end - i));
        else encode_word_bytelevel(e, out + i, (int)(end - i));
        i = end;
    }
}

/* The longest special token that starts at s[0..n), or -1. */
static int special_at(const Tokenizer *t, const unsigned char *s, size_t n) {
    for (int k = 0; k < t->n_specials; k++) { /* longest first */
        int id = t->specials[k];
        size_t len = (size_t)t->piece_len[id];
        if (len <= n && s[0] == t->piece[id][0] && memcmp(s, t->piece[id], len) == 0) return id;
    }
    return -1;
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
    int ok = e.stretch && e.sym && e.heap.items && e.splits;
    for (size_t start = 0, i = 0; ok && i <= len;) { /* s[start..i) is plain text so far */
        int special = i < len && t->n_specials ? special_at(t, s + i, len - i) : -1;
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
        if (special < 0) break;
        emit(&e, special);
        start = i = next;
    }
    free(e.stretch);
    free(e.sym);
    free(e.heap.items);
    free(e.splits);
    free(squeezed);
    free(normalized);
    return ok ? e.count : -1;
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
            if (k < 0) return free(controls), free(out), -1;
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

int tokenizer_is_eos(const Tokenizer *t, int id) {
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos_ids[i] == id) return 1;
    return 0;
}

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
