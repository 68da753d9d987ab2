/* png.h - a minimal PNG writer: 8-bit palette images, zlib stream of stored (uncompressed) deflate blocks.
 * No dependency: CRC-32 and Adler-32 are computed here. */
#ifndef ATTN_PNG_H
#define ATTN_PNG_H

/* Writes pixels[height][width] (palette indices) with palette[n_colors] RGB triples to path.
 * Returns 0, or -1 when the file cannot be written (errno says why). */
int png_write_indexed(const char *path, int width, int height, const unsigned char *pixels,
                      const unsigned char (*palette)[3], int n_colors);

#endif
