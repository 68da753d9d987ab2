/* png.c - the smallest honest PNG writer: signature, IHDR, PLTE, tEXt, one IDAT holding a zlib stream,
 * IEND (RFC 2083). The zlib stream (RFC 1950) wraps this file's own deflate (RFC 1951): LZ77 matches found
 * through hash chains over a 32 KiB window, then blocks coded with dynamic Huffman codes built from each
 * block's symbol counts. Every chunk carries a CRC-32 of its type and data; the zlib stream ends with an
 * Adler-32 of the uncompressed bytes. Also a 5x7 bitmap font for the labels drawn into images. */
#include "png.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * checksums */

/* CRC-32 (polynomial 0xEDB88320, reflected), a byte at a time through a table; start from 0 */
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n) {
    static uint32_t table[256];
    if (!table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
            table[i] = c;
        }
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* Adler-32: two running sums modulo 65521, reduced every 5552 bytes (the most that cannot overflow 32 bits) */
static uint32_t adler32(const unsigned char *p, size_t n) {
    uint32_t a = 1, b = 0;
    while (n > 0) {
        size_t k = n < 5552 ? n : 5552;
        n -= k;
        while (k--) a += *p++, b += a;
        a %= 65521u, b %= 65521u;
    }
    return b << 16 | a;
}

/* ---------------------------------------------------------------------------------------------
 * deflate */

typedef struct {
    unsigned char *p;
    size_t n, cap;
    uint64_t acc; /* bits not yet written, the first in the lowest bit */
    int count;
    int failed;
} BitWriter;

static void put_byte(BitWriter *w, unsigned char b) {
    if (w->n == w->cap) {
        unsigned char *p = w->failed ? NULL : realloc(w->p, w->cap = w->cap ? 2 * w->cap : 1 << 16);
        if (!p) {
            w->failed = 1;
            return;
        }
        w->p = p;
    }
    w->p[w->n++] = b;
}

/* deflate packs a value's bits starting from the least significant bit of each byte */
static void put_bits(BitWriter *w, uint32_t value, int count) {
    w->acc |= (uint64_t)value << w->count;
    w->count += count;
    while (w->count >= 8) {
        put_byte(w, (unsigned char)w->acc);
        w->acc >>= 8;
        w->count -= 8;
    }
}

/* length codes 257..285 and distance codes 0..29: the first value of each and its extra bits (RFC 1951 3.2.5) */
static const uint16_t LENGTH_BASE[29] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59,
                                         67, 83, 99, 115, 131, 163, 195, 227, 258};
static const uint8_t LENGTH_EXTRA[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const uint16_t DIST_BASE[30] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769,
                                       1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const uint8_t DIST_EXTRA[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11,
                                       12, 12, 13, 13};

static int code_of(const uint16_t *base, int n, unsigned value) { /* the last code whose base is <= value */
    int k = 0;
    while (k + 1 < n && base[k + 1] <= value) k++;
    return k;
}

/* Huffman code lengths for the symbols' counts, none longer than max_bits: build the tree (two least
 * frequent nodes joined, again and again); when it is too deep, halve the counts (keeping them nonzero)
 * and build again - the counts flatten, so the tree gets shallower. */
static void huffman_lengths(const uint32_t *freq, int n, int max_bits, unsigned char *len) {
    uint32_t f[2 * 288], weight[2 * 288];
    int parent[2 * 288], alive[2 * 288];
    memcpy(f, freq, (size_t)n * sizeof *f);
    for (;;) {
        int nodes = 0, used = 0;
        for (int i = 0; i < n; i++) {
            weight[i] = f[i], parent[i] = -1, alive[i] = f[i] > 0;
            used += f[i] > 0;
        }
        memset(len, 0, (size_t)n);
        if (used == 0) return;
        if (used == 1) { /* one symbol still takes one bit */
            for (int i = 0; i < n; i++)
                if (f[i]) len[i] = 1;
            return;
        }
        nodes = n;
        for (int joins = 0; joins < used - 1; joins++) {
            int a = -1, b = -1;
            for (int i = 0; i < nodes; i++) {
                if (!alive[i]) continue;
                if (a < 0 || weight[i] < weight[a]) b = a, a = i;
                else if (b < 0 || weight[i] < weight[b]) b = i;
            }
            weight[nodes] = weight[a] + weight[b], parent[nodes] = -1, alive[nodes] = 1;
            parent[a] = parent[b] = nodes, alive[a] = alive[b] = 0;
            nodes++;
        }
        int deepest = 0;
        for (int i = 0; i < n; i++) {
            if (!f[i]) continue;
            int depth = 0;
            for (int p = i; parent[p] >= 0; p = parent[p]) depth++;
            len[i] = (unsigned char)(depth < 255 ? depth : 255);
            if (depth > deepest) deepest = depth;
        }
        if (deepest <= max_bits) return;
        for (int i = 0; i < n; i++)
            if (f[i]) f[i] = (f[i] + 1) / 2;
    }
}

/* Canonical codes from lengths (RFC 1951 3.2.2), bit-reversed as deflate writes them */
static void canonical_codes(const unsigned char *len, int n, uint16_t *code) {
    int count[16] = {0}, next[16] = {0};
    for (int i = 0; i < n; i++) count[len[i]]++;
    count[0] = 0;
    for (int bits = 1, c = 0; bits < 16; bits++) next[bits] = c = (c + count[bits - 1]) << 1;
    for (int i = 0; i < n; i++) {
        if (!len[i]) continue;
        unsigned c = (unsigned)next[len[i]]++, r = 0;
        for (int k = 0; k < len[i]; k++) r = (r << 1) | ((c >> k) & 1);
        code[i] = (uint16_t)r;
    }
}

typedef struct {
    uint16_t value; /* a literal byte, or a match length 3..258 */
    uint16_t dist;  /* 0: literal */
} Symbol;

/* One block with dynamic Huffman codes (BTYPE 2): the code lengths of both alphabets, run-length coded with
 * symbols 16 (repeat the previous 3-6 times), 17 (3-10 zeros) and 18 (11-138 zeros) and themselves
 * Huffman coded; then the symbols; then end-of-block (256). */
static void write_block(BitWriter *w, const Symbol *s, size_t n, int final) {
    uint32_t lit_freq[286] = {0}, dist_freq[30] = {0}, cl_freq[19] = {0};
    for (size_t i = 0; i < n; i++) {
        if (!s[i].dist) lit_freq[s[i].value]++;
        else lit_freq[257 + code_of(LENGTH_BASE, 29, s[i].value)]++, dist_freq[code_of(DIST_BASE, 30, s[i].dist)]++;
    }
    lit_freq[256] = 1;
    unsigned char lens[286 + 30], cl_len[19];
    uint16_t lit_code[286] = {0}, dist_code[30] = {0}, cl_code[19] = {0};
    huffman_lengths(lit_freq, 286, 15, lens);
    huffman_lengths(dist_freq, 30, 15, lens + 286);
    int hlit = 286, hdist = 30;
    while (hlit > 257 && !lens[hlit - 1]) hlit--;
    while (hdist > 1 && !lens[286 + hdist - 1]) hdist--;
    canonical_codes(lens, 286, lit_code);
    canonical_codes(lens + 286, 30, dist_code);
    unsigned char all[286 + 30];
    memcpy(all, lens, (size_t)hlit);
    memcpy(all + hlit, lens + 286, (size_t)hdist);
    /* run-length code the lengths: (symbol, extra value) pairs */
    unsigned char rle_sym[286 + 30], rle_extra[286 + 30];
    int n_rle = 0, total = hlit + hdist;
    for (int i = 0; i < total;) {
        int run = 1;
        while (i + run < total && all[i + run] == all[i]) run++;
        if (all[i] == 0 && run >= 3) {
            int k = run > 138 ? 138 : run;
            rle_sym[n_rle] = k >= 11 ? 18 : 17, rle_extra[n_rle++] = (unsigned char)(k >= 11 ? k - 11 : k - 3);
            i += k;
        } else if (all[i] != 0 && run >= 4) {
            rle_sym[n_rle] = all[i], rle_extra[n_rle++] = 0;
            int k = run - 1 > 6 ? 6 : run - 1;
            rle_sym[n_rle] = 16, rle_extra[n_rle++] = (unsigned char)(k - 3);
            i += 1 + k;
        } else {
            rle_sym[n_rle] = all[i], rle_extra[n_rle++] = 0;
            i++;
        }
    }
    for (int i = 0; i < n_rle; i++) cl_freq[rle_sym[i]]++;
    int cl_used = 0;
    for (int i = 0; i < 19; i++) cl_used += cl_freq[i] > 0;
    if (cl_used == 1) cl_freq[cl_freq[0] ? 1 : 0] = 1; /* zlib refuses a code-length code of one code */
    huffman_lengths(cl_freq, 19, 7, cl_len);
    canonical_codes(cl_len, 19, cl_code);
    static const unsigned char order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
    int hclen = 19;
    while (hclen > 4 && !cl_len[order[hclen - 1]]) hclen--;

    put_bits(w, (uint32_t)final, 1);
    put_bits(w, 2, 2);
    put_bits(w, (uint32_t)(hlit - 257), 5);
    put_bits(w, (uint32_t)(hdist - 1), 5);
    put_bits(w, (uint32_t)(hclen - 4), 4);
    for (int i = 0; i < hclen; i++) put_bits(w, cl_len[order[i]], 3);
    static const int extra_bits[19] = {[16] = 2, [17] = 3, [18] = 7};
    for (int i = 0; i < n_rle; i++) {
        put_bits(w, cl_code[rle_sym[i]], cl_len[rle_sym[i]]);
        if (rle_sym[i] >= 16) put_bits(w, rle_extra[i], extra_bits[rle_sym[i]]);
    }
    for (size_t i = 0; i < n; i++) {
        if (!s[i].dist) {
            put_bits(w, lit_code[s[i].value], lens[s[i].value]);
            continue;
        }
        int lc = code_of(LENGTH_BASE, 29, s[i].value), dc = code_of(DIST_BASE, 30, s[i].dist);
        put_bits(w, lit_code[257 + lc], lens[257 + lc]);
        put_bits(w, (uint32_t)(s[i].value - LENGTH_BASE[lc]), LENGTH_EXTRA[lc]);
        put_bits(w, dist_code[dc], lens[286 + dc]);
        put_bits(w, (uint32_t)(s[i].dist - DIST_BASE[dc]), DIST_EXTRA[dc]);
    }
    put_bits(w, lit_code[256], lens[256]);
}

#define WINDOW 32768
#define MIN_MATCH 3
#define MAX_MATCH 258
#define HASH_BITS 15
#define MAX_CHAIN 8          /* candidates tried per position (32: 4% slower attention maps, no smaller) */
#define BLOCK_SYMBOLS 65536  /* symbols per Huffman block */

static uint32_t hash3(const unsigned char *p) {
    return ((uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2]) * 2654435761u >> (32 - HASH_BITS);
}

unsigned char *deflate_bytes(const unsigned char *data, size_t n, size_t *out_len) {
    int32_t *head = malloc(sizeof(int32_t) << HASH_BITS), *prev = malloc(sizeof(int32_t) * WINDOW);
    Symbol *block = malloc(sizeof(Symbol) * BLOCK_SYMBOLS);
    BitWriter w = {0};
    if (!head || !prev || !block) w.failed = 1;
    size_t n_block = 0;
    if (n > INT32_MAX) w.failed = 1; /* positions live in int32 chains */
    for (size_t i = 0; !w.failed && i < ((size_t)1 << HASH_BITS); i++) head[i] = -1;
    for (size_t i = 0; i < n && !w.failed;) {
        size_t best_len = 0, best_dist = 0;
        if (i + MIN_MATCH <= n) {
            uint32_t h = hash3(data + i);
            size_t limit = n - i < MAX_MATCH ? n - i : MAX_MATCH;
            int32_t cand = head[h];
            for (int chain = 0; cand >= 0 && i - (size_t)cand <= WINDOW && chain < MAX_CHAIN; chain++) {
                const unsigned char *a = data + cand, *b = data + i;
                if (a[best_len] == b[best_len]) {
                    size_t len = 0;
                    while (len < limit && a[len] == b[len]) len++;
                    if (len > best_len) {
                        best_len = len, best_dist = i - (size_t)cand;
                        if (len == limit) break;
                    }
                }
                cand = prev[cand % WINDOW];
            }
        }
        size_t step = best_len >= MIN_MATCH ? best_len : 1;
        if (best_len >= MIN_MATCH) block[n_block++] = (Symbol){(uint16_t)best_len, (uint16_t)best_dist};
        else block[n_block++] = (Symbol){data[i], 0};
        for (size_t k = i; k < i + step; k++) /* every position enters the chains, inside a match too */
            if (k + MIN_MATCH <= n) {
                uint32_t h = hash3(data + k);
                prev[k % WINDOW] = head[h];
                head[h] = (int32_t)k;
            }
        i += step;
        if (n_block == BLOCK_SYMBOLS) write_block(&w, block, n_block, 0), n_block = 0;
    }
    if (!w.failed) write_block(&w, block, n_block, 1);
    if (w.count > 0) put_bits(&w, 0, 8 - w.count); /* the last byte, padded */
    free(head), free(prev), free(block);
    if (w.failed) {
        free(w.p);
        return NULL;
    }
    *out_len = w.n;
    return w.p;
}

/* ---------------------------------------------------------------------------------------------
 * PNG */

static void put_u32_be(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24), p[1] = (unsigned char)(v >> 16), p[2] = (unsigned char)(v >> 8), p[3] = (unsigned char)v;
}

/* length, type, data, CRC-32 of type + data */
static int write_chunk(FILE *f, const char *type, const unsigned char *data, size_t n) {
    unsigned char head[8], tail[4];
    put_u32_be(head, (uint32_t)n);
    memcpy(head + 4, type, 4);
    put_u32_be(tail, crc32_update(crc32_update(0, head + 4, 4), data, n));
    return fwrite(head, 1, 8, f) == 8 && (n == 0 || fwrite(data, 1, n, f) == n) && fwrite(tail, 1, 4, f) == 4 ? 0 : -1;
}

int png_write_indexed(const char *path, int width, int height, const unsigned char *pixels,
                      const unsigned char (*palette)[3], int n_colors, const char *comment) {
    /* every scanline starts with its filter type: 0, none (palette indices are names, not intensities) */
    size_t row = (size_t)width + 1, raw_len = row * (size_t)height, deflated_len = 0;
    unsigned char *raw = malloc(raw_len);
    if (!raw) return -1;
    for (int y = 0; y < height; y++) {
        raw[y * row] = 0;
        memcpy(raw + y * row + 1, pixels + (size_t)y * width, (size_t)width);
    }
    unsigned char *deflated = deflate_bytes(raw, raw_len, &deflated_len);
    uint32_t check = adler32(raw, raw_len);
    free(raw);
    /* zlib: CMF 0x78 (deflate, 32 KiB window), FLG 0x9C (0x789C % 31 == 0), the deflate stream, Adler-32 */
    unsigned char *z = deflated ? malloc(deflated_len + 6) : NULL;
    if (!z) {
        free(deflated);
        return -1;
    }
    z[0] = 0x78, z[1] = 0x9C;
    memcpy(z + 2, deflated, deflated_len);
    put_u32_be(z + 2 + deflated_len, check);
    free(deflated);
    unsigned char ihdr[13];
    put_u32_be(ihdr, (uint32_t)width);
    put_u32_be(ihdr + 4, (uint32_t)height);
    ihdr[8] = 8;  /* bits per palette index */
    ihdr[9] = 3;  /* colour type: palette */
    ihdr[10] = ihdr[11] = ihdr[12] = 0; /* deflate, adaptive filtering, no interlace */
    FILE *f = fopen(path, "wb");
    int bad = !f;
    if (f) {
        bad |= fwrite("\x89PNG\r\n\x1a\n", 1, 8, f) != 8;
        bad |= write_chunk(f, "IHDR", ihdr, sizeof ihdr) != 0;
        bad |= write_chunk(f, "PLTE", palette[0], (size_t)n_colors * 3) != 0;
        if (comment) { /* tEXt: keyword, NUL, Latin-1 text */
            size_t len = strlen(comment);
            unsigned char *text = malloc(8 + len);
            bad |= !text;
            if (text) {
                memcpy(text, "Comment", 8);
                memcpy(text + 8, comment, len);
                bad |= write_chunk(f, "tEXt", text, 8 + len) != 0;
                free(text);
            }
        }
        bad |= write_chunk(f, "IDAT", z, deflated_len + 6) != 0;
        bad |= write_chunk(f, "IEND", NULL, 0) != 0;
        bad |= fclose(f) != 0;
    }
    free(z);
    return bad ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * a 5x7 font for printable ASCII: seven rows per glyph, bit 4 the leftmost pixel */

static const unsigned char FONT[95][7] = {
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}, {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04}, {0x0a, 0x0a, 0x0a, 0x00, 0x00, 0x00, 0x00}, {0x0a, 0x0a, 0x1f, 0x0a, 0x1f, 0x0a, 0x0a},
    {0x04, 0x0f, 0x14, 0x0e, 0x05, 0x1e, 0x04}, {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03}, {0x0c, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0d}, {0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00},
    {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}, {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}, {0x00, 0x04, 0x15, 0x0e, 0x15, 0x04, 0x00}, {0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00},
    {0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08}, {0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00}, {0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c}, {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00},
    {0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e}, {0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e}, {0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f}, {0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e},
    {0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02}, {0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e}, {0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e}, {0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08},
    {0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e}, {0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c}, {0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00}, {0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x04, 0x08},
    {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02}, {0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00}, {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08}, {0x0e, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04},
    {0x0e, 0x11, 0x01, 0x0d, 0x15, 0x15, 0x0e}, {0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11}, {0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e}, {0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e},
    {0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c}, {0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f}, {0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10}, {0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f},
    {0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11}, {0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e}, {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c}, {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11},
    {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f}, {0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11}, {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11}, {0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e},
    {0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10}, {0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d}, {0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11}, {0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e},
    {0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}, {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e}, {0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04}, {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a},
    {0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11}, {0x11, 0x11, 0x11, 0x0a, 0x04, 0x04, 0x04}, {0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f}, {0x0e, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0e},
    {0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00}, {0x0e, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0e}, {0x04, 0x0a, 0x11, 0x00, 0x00, 0x00, 0x00}, {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1f},
    {0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00}, {0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f}, {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1e}, {0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e},
    {0x01, 0x01, 0x0d, 0x13, 0x11, 0x11, 0x0f}, {0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e}, {0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08}, {0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e},
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11}, {0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e}, {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0c}, {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12},
    {0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e}, {0x00, 0x00, 0x1a, 0x15, 0x15, 0x11, 0x11}, {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11}, {0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e},
    {0x00, 0x00, 0x1e, 0x11, 0x1e, 0x10, 0x10}, {0x00, 0x00, 0x0d, 0x13, 0x0f, 0x01, 0x01}, {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10}, {0x00, 0x00, 0x0e, 0x10, 0x0e, 0x01, 0x1e},
    {0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06}, {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d}, {0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04}, {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a},
    {0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11}, {0x00, 0x00, 0x11, 0x11, 0x0f, 0x01, 0x0e}, {0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f}, {0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02},
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}, {0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08}, {0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00},
};

void draw_text(unsigned char *pixels, int width, int height, int x, int y, const char *text, unsigned char color,
               int vertical) {
    for (int k = 0; text[k]; k++) {
        unsigned char c = (unsigned char)text[k];
        const unsigned char *glyph = FONT[c >= 32 && c < 127 ? c - 32 : '?' - 32];
        for (int r = 0; r < FONT_HEIGHT; r++)
            for (int col = 0; col < FONT_WIDTH; col++) {
                if (!(glyph[r] >> (FONT_WIDTH - 1 - col) & 1)) continue;
                /* vertical: the glyph's columns go up the image, its rows to the right */
                int px = vertical ? x + r : x + k * FONT_ADVANCE + col;
                int py = vertical ? y - k * FONT_ADVANCE - col : y + r;
                if (px >= 0 && px < width && py >= 0 && py < height) pixels[(size_t)py * width + px] = color;
            }
    }
}
