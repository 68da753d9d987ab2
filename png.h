/* png.h - a dependency-free PNG writer for 8-bit palette images: scanlines filtered, compressed with this
 * file's own deflate (LZ77 matches and dynamic Huffman codes, RFC 1951), CRC-32 and Adler-32 computed here;
 * and a 5x7 bitmap font to write labels into the image. */
#ifndef ATTN_PNG_H
#define ATTN_PNG_H

#include <stddef.h>

/* Writes pixels[height][width] (palette indices) with palette[n_colors] RGB triples to path; when comment is
 * not NULL it goes into a tEXt chunk under the keyword "Comment". Returns 0, or -1 when the file cannot be
 * written (errno says why). */
int png_write_indexed(const char *path, int width, int height, const unsigned char *pixels,
                      const unsigned char (*palette)[3], int n_colors, const char *comment);

/* deflate (RFC 1951) of n bytes: malloc'd, its length in *out_len; NULL when out of memory. */
unsigned char *deflate_bytes(const unsigned char *data, size_t n, size_t *out_len);

#define FONT_WIDTH 5
#define FONT_HEIGHT 7
#define FONT_ADVANCE 6 /* pixels from one character to the next */

/* Draws text (printable ASCII; other bytes as '?') with its top-left corner at (x, y) in colour; vertical
 * text runs upwards from (x, y) = its bottom-left corner, each glyph turned a quarter left. Pixels outside
 * the image are skipped. */
void draw_text(unsigned char *pixels, int width, int height, int x, int y, const char *text, unsigned char color,
               int vertical);

#endif
