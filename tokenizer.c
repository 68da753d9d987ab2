/* tokenizer.c - byte-level BPE (GPT-2 / Llama 3 / Qwen2 pre-tokenizers), special tokens, streaming decode.
 *
 * encode(text):
 *   1. special tokens written in the text are cut out first and kept as single ids;
 *   2. each remaining stretch is split into pre-tokens ("words") by the family's regex rule;
 *   3. each word becomes one token per byte, and BPE joins the adjacent pair with the best merge rank
 *      until no pair can merge. */
#include "tokenizer.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "unicode.h"

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

static int hex_digit(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if ((c | 32) >= 'a' && (c | 32) <= 'f') return (c | 32) - 'a' + 10;
    return -1;
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
    if (pre > PRETOKENIZE_QWEN2) FAIL("tokenizer pre-tokenizer %u is not supported", pre);
    if (flags & ~63u) FAIL("tokenizer has unknown flags 0x%x", flags);
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
    t->specials = calloc(n_pieces, sizeof *t->specials);
    if (!t->piece || !t->piece_len || !t->score || !t->type || !t->specials || hashmap_init(&t->piece_ids, (int)n_pieces))
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
        if (type > PIECE_USER) FAIL("tokenizer piece %u has unknown type %u", i, type);
        t->type[i] = (unsigned char)type;
        if (len == 0) continue;
        if (type == PIECE_NORMAL) hashmap_put(&t->piece_ids, t->piece[i], (int)len, (int)i);
        if (type == PIECE_SPECIAL || type == PIECE_USER) t->specials[t->n_specials++] = (int)i;
        if (len == 1 && (type == PIECE_NORMAL) && t->byte_piece[t->piece[i][0]] < 0 && kind == TOKENIZER_BYTELEVEL_BPE)
            t->byte_piece[t->piece[i][0]] = (int)i;
        if (type == PIECE_BYTE) { /* "<0xNN>": exactly two hex digits (sscanf's %x would take "-1") */
            const unsigned char *s = t->piece[i];
            if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>' || hex_digit(s[3]) < 0 || hex_digit(s[4]) < 0)
                FAIL("tokenizer byte piece %u is not of the form <0xNN>", i);
            t->byte_piece[hex_digit(s[3]) * 16 + hex_digit(s[4])] = (int)i;
        }
    }
    /* merges: (left, right) in rank order; the result is the piece spelled by their concatenation */
    if ((uint64_t)n_merges * 8 > r.left) FAIL("tokenizer lists %u merges but only %zu bytes remain", n_merges, r.left);
    t->n_merges = (int)n_merges;
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
    if (sort_longest_first(t->specials, t->n_specials, t->piece_len) != 0) FAIL("out of memory loading the tokenizer");
    return 0;
}

void tokenizer_free(Tokenizer *t) {
    free(t->piece);
    free(t->piece_len);
    free(t->score);
    free(t->type);
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

/* 's 't 're 've 'm 'll 'd: the length of the contraction at i, or 0 */
static size_t contraction(Text t, size_t i, int ignore_case) {
    static const char *forms[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    if (t.s[i] != '\'') return 0;
    for (int f = 0; f < 7; f++) {
        size_t k = strlen(forms[f]);
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

static size_t next_word(const Tokenizer *tok, Text t, size_t i) {
    switch (tok->pretokenizer) {
    case PRETOKENIZE_GPT2: return gpt2_word(t, i);
    case PRETOKENIZE_LLAMA3: return llama3_word(t, i, 3);
    case PRETOKENIZE_QWEN2: return llama3_word(t, i, 1);
    default: return t.n; /* no pre-tokenizer: the whole stretch is one word */
    }
}

/* ---------------------------------------------------------------------------------------------
 * BPE over one word: symbols in a linked list, candidate merges in a min-heap keyed by
 * (priority, position) so the best-ranked, leftmost pair merges first. */

typedef struct {
    int id, prev, next;
} Symbol;

typedef struct {
    float priority; /* lower merges first: the merge rank, or minus the score of the merged piece */
    int left, right, merged;
    int left_id, right_id;
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

/* The merge of two neighbouring tokens, if the tokenizer has one: sets priority and merged id. */
static int find_merge(const Tokenizer *t, int a, int b, float *priority, int *merged) {
    if (t->flags & TOKF_SCORE_MERGES) { /* SentencePiece .model: the pair whose joined piece scores best */
        unsigned char buf[512];
        int la = t->piece_len[a], lb = t->piece_len[b];
        if (la + lb > (int)sizeof buf) return 0;
        memcpy(buf, t->piece[a], (size_t)la);
        memcpy(buf + la, t->piece[b], (size_t)lb);
        int id = hashmap_get(&t->piece_ids, buf, la + lb);
        if (id < 0) return 0;
        *priority = -t->score[id];
        *merged = id;
        return 1;
    }
    unsigned char key[8];
    memcpy(key, &a, 4);
    memcpy(key + 4, &b, 4);
    int rank = hashmap_get(&t->merge_ranks, key, 8);
    if (rank < 0) return 0;
    *priority = (float)rank;
    *merged = t->merge_result[rank];
    return 1;
}

static void push_pair(const Tokenizer *t, Heap *h, const Symbol *sym, int left) {
    int right = sym[left].next;
    Candidate c;
    if (right < 0 || !find_merge(t, sym[left].id, sym[right].id, &c.priority, &c.merged)) return;
    c.left = left;
    c.right = right;
    c.left_id = sym[left].id;
    c.right_id = sym[right].id;
    heap_push(h, c);
}

/* Tokenizes one word whose initial symbols are sym[0..n) (ids set); appends the result to ids. */
static int bpe_word(const Tokenizer *t, Symbol *sym, int n, Heap *h, int *ids) {
    for (int i = 0; i < n; i++) {
        sym[i].prev = i - 1;
        sym[i].next = i + 1 < n ? i + 1 : -1;
    }
    h->n = 0;
    for (int i = 0; i + 1 < n; i++) push_pair(t, h, sym, i);
    while (h->n > 0) {
        Candidate c = heap_pop(h);
        /* skip candidates made stale by an earlier merge */
        if (sym[c.left].id != c.left_id || sym[c.left].next != c.right || sym[c.right].id != c.right_id) continue;
        sym[c.left].id = c.merged;
        sym[c.right].id = -1;
        sym[c.left].next = sym[c.right].next;
        if (sym[c.right].next >= 0) sym[sym[c.right].next].prev = c.left;
        if (sym[c.left].prev >= 0) push_pair(t, h, sym, sym[c.left].prev);
        push_pair(t, h, sym, c.left);
    }
    int count = 0;
    for (int i = 0; i >= 0 && n > 0; i = sym[i].next) ids[count++] = sym[i].id;
    return count;
}

/* Byte-level BPE of one word: whole-word lookup (ignore_merges), else one symbol per byte, then merges. */
static int encode_word_bytelevel(const Tokenizer *t, const unsigned char *w, int len, Symbol *sym, Heap *h, int *ids) {
    if (t->flags & TOKF_IGNORE_MERGES) {
        int id = hashmap_get(&t->piece_ids, w, len);
        if (id >= 0) {
            ids[0] = id;
            return 1;
        }
    }
    int n = 0;
    for (int i = 0; i < len; i++) {
        int id = t->byte_piece[w[i]];
        if (id < 0) id = t->unk_id;
        if (id >= 0) sym[n++].id = id; /* a byte the vocabulary lacks (and no unk) is dropped, as HF does */
    }
    return bpe_word(t, sym, n, h, ids);
}

/* Encodes a stretch of text that holds no special token. */
static int encode_plain(const Tokenizer *t, Text text, Symbol *sym, Heap *h, int *ids) {
    int count = 0;
    for (size_t i = 0; i < text.n;) {
        size_t end = next_word(t, text, i);
        if (end <= i) end = i + 1; /* cannot happen with the matchers above; keeps progress certain */
        count += encode_word_bytelevel(t, text.s + i, (int)(end - i), sym, h, ids + count);
        i = end;
    }
    return count;
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

int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int add_bos, int *ids) {
    int count = 0;
    if (add_bos && (t->flags & TOKF_ADD_BOS) && t->bos_id >= 0) ids[count++] = t->bos_id;
    unsigned char *buf = NULL;
    const unsigned char *s = (const unsigned char *)text;
    if ((t->flags & TOKF_PREFIX_SPACE) && len > 0 && text[0] != ' ') { /* ByteLevel add_prefix_space */
        buf = malloc(len + 1);
        if (!buf) return -1;
        buf[0] = ' ';
        memcpy(buf + 1, text, len);
        s = buf;
        len++;
    }
    Symbol *sym = malloc((len + 1) * sizeof *sym);
    Heap heap = {malloc((3 * len + 4) * sizeof(Candidate)), 0};
    if (!sym || !heap.items) {
        free(sym);
        free(heap.items);
        free(buf);
        return -1;
    }
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        int special = i < len && t->n_specials ? special_at(t, s + i, len - i) : -1;
        if (special < 0 && i < len) continue;
        Text plain = {s + start, i - start};
        count += encode_plain(t, plain, sym, &heap, ids + count);
        if (special >= 0) {
            ids[count++] = special;
            i += (size_t)t->piece_len[special] - 1;
        }
        start = i + 1;
    }
    free(sym);
    free(heap.items);
    free(buf);
    return count;
}

/* ---------------------------------------------------------------------------------------------
 * decoding */

const unsigned char *tokenizer_decode(const Tokenizer *t, int prev_id, int id, int *len) {
    (void)prev_id;
    if (id < 0 || id >= t->n_pieces || t->type[id] == PIECE_UNUSED) {
        *len = 0;
        return (const unsigned char *)"";
    }
    *len = t->piece_len[id];
    return t->piece[id];
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
