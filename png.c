/* png.c - the smallest honest PNG: signature, IHDR, PLTE, one IDAT holding a zlib stream of stored deflate
 * blocks, IEND. Every chunk carries a CRC-32 of its type and data; the zlib stream ends with an Adler-32
 * of the uncompressed bytes (RFC 2083 for PNG, RFC 1950 for zlib, RFC 1951 for deflate). */
#include "png.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* CRC-32 (polynomial 0xEDB88320, reflected), updated over a buffer; start from 0 */
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

/* Adler-32: two running sums modulo 65521 */
static uint32_t adler32(const unsigned char *p, size_t n) {
    uint32_t a = 1, b = 0;
    for (size_t i = 0; i < n; i++) {
        a = (a + p[i]) % 65521u;
        b = (b + a) % 65521u;
    }
    return b << 16 | a;
}

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

/* zlib stream of raw: header 78 01 (deflate, 32K window, no preset dictionary; 0x7801 % 31 == 0), stored
 * blocks of at most 65535 bytes (BFINAL bit, BTYPE 00, LEN, ~LEN little-endian, bytes), Adler-32 */
static unsigned char *zlib_stored(const unsigned char *raw, size_t n, size_t *out_len) {
    size_t n_blocks = n / 65535 + 1, len = 2 + n + 5 * n_blocks + 4;
    unsigned char *z = malloc(len), *p = z;
    if (!z) return NULL;
    *p++ = 0x78, *p++ = 0x01;
    for (size_t b = 0, off = 0; b < n_blocks; b++) {
        size_t k = n - off < 65535 ? n - off : 65535;
        *p++ = b == n_blocks - 1;
        *p++ = (unsigned char)k, *p++ = (unsigned char)(k >> 8);
        *p++ = (unsigned char)~k, *p++ = (unsigned char)(~k >> 8);
        memcpy(p, raw + off, k);
        p += k, off += k;
    }
    put_u32_be(p, adler32(raw, n));
    *out_len = len;
    return z;
}

int png_write_indexed(const char *path, int width, int height, const unsigned char *pixels,
                      const unsigned char (*palette)[3], int n_colors) {
    /* every scanline starts with its filter type: 0, none */
    size_t row = (size_t)width + 1, raw_len = row * (size_t)height, z_len = 0;
    unsigned char *raw = malloc(raw_len);
    if (!raw) return -1;
    for (int y = 0; y < height; y++) {
        raw[y * row] = 0;
        memcpy(raw + y * row + 1, pixels + (size_t)y * width, (size_t)width);
    }
    unsigned char *z = zlib_stored(raw, raw_len, &z_len);
    free(raw);
    if (!z) return -1;
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
        bad |= write_chunk(f, "IDAT", z, z_len) != 0;
        bad |= write_chunk(f, "IEND", NULL, 0) != 0;
        bad |= fclose(f) != 0;
    }
    free(z);
    return bad ? -1 : 0;
}
