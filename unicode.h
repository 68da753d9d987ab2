/* unicode.h - UTF-8 decoding and the Unicode classes the pre-tokenizers and their regexes need. */
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

/* General categories, in UnicodeData.txt's two-letter names; unassigned code points are Cn. */
enum {
    UC_Lu, UC_Ll, UC_Lt, UC_Lm, UC_Lo, UC_Mn, UC_Mc, UC_Me, UC_Nd, UC_Nl, UC_No, UC_Pc, UC_Pd, UC_Ps, UC_Pe,
    UC_Pi, UC_Pf, UC_Po, UC_Sm, UC_Sc, UC_Sk, UC_So, UC_Zs, UC_Zl, UC_Zp, UC_Cc, UC_Cf, UC_Cs, UC_Co, UC_Cn,
    UNICODE_N_CATEGORIES
};

typedef struct {
    const uint32_t (*ranges)[2]; /* runs of assigned code points with one category */
    const unsigned char *values; /* the category of each run */
    int n;
} UnicodeCategories;

extern const UnicodeCategories unicode_categories;
int unicode_category(uint32_t cp); /* UC_* */

/* The scripts a regex may name with \p{Han} etc. (Scripts.txt) */
#define UNICODE_N_SCRIPTS 11
typedef struct {
    const char *name;
    const UnicodeClass *members;
} UnicodeScript;
extern const UnicodeScript unicode_scripts[UNICODE_N_SCRIPTS];

/* Simple case folding (CaseFolding.txt, statuses C and S): pairs (code point, folded) sorted by code point,
 * and the same pairs as (folded, code point) sorted by the folded one. */
typedef struct {
    const uint32_t (*by_source)[2];
    const uint32_t (*by_target)[2];
    int n;
} UnicodeFolding;
extern const UnicodeFolding unicode_folding;

uint32_t unicode_fold(uint32_t cp);
/* The code points other than folded itself that fold to it (at most 3 in Unicode 15: K, k and the
 * Kelvin sign share one); returns how many were written to out (room for 4). */
int unicode_unfold(uint32_t folded, uint32_t out[4]);

/* Decodes one UTF-8 character at s[0..len). Sets *cp and returns its byte length (1-4). An invalid or
 * truncated sequence decodes as one byte with *cp = 0xFFFD, so every input makes progress. */
int utf8_decode(const unsigned char *s, size_t len, uint32_t *cp);

/* Length of the UTF-8 sequence a lead byte announces (1-4), or 0 for a byte that cannot start one. */
int utf8_sequence_length(unsigned char lead);

#endif
