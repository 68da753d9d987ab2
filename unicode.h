/* unicode.h - UTF-8 decoding and the Unicode classes the pre-tokenizers need. */
#ifndef ATTN_UNICODE_H
#define ATTN_UNICODE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const uint32_t (*ranges)[2]; /* sorted [first, last] code-point ranges */
    int n;
} UnicodeClass;

extern const UnicodeClass unicode_letter; /* \p{L} */
extern const UnicodeClass unicode_number; /* \p{N} */
extern const UnicodeClass unicode_space;  /* \s: the White_Space property */

int unicode_in(const UnicodeClass *c, uint32_t cp);

/* Decodes one UTF-8 character at s[0..len). Sets *cp and returns its byte length (1-4). An invalid or
 * truncated sequence decodes as one byte with *cp = 0xFFFD, so every input makes progress. */
int utf8_decode(const unsigned char *s, size_t len, uint32_t *cp);

/* Length of the UTF-8 sequence a lead byte announces (1-4), or 0 for a byte that cannot start one. */
int utf8_sequence_length(unsigned char lead);

#endif
