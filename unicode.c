/* unicode.c - UTF-8 decoding and class lookups over the generated tables (unicode_tables.c). */
#include "unicode.h"

int unicode_in(const UnicodeClass *c, uint32_t cp) {
    int lo = 0, hi = c->n - 1;
    while (lo <= hi) { /* binary search over sorted ranges */
        int mid = (lo + hi) / 2;
        if (cp < c->ranges[mid][0]) hi = mid - 1;
        else if (cp > c->ranges[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

int utf8_sequence_length(unsigned char lead) {
    if (lead < 0x80) return 1;
    if (lead >= 0xC2 && lead <= 0xDF) return 2;
    if (lead >= 0xE0 && lead <= 0xEF) return 3;
    if (lead >= 0xF0 && lead <= 0xF4) return 4;
    return 0; /* continuation byte, overlong lead (C0, C1) or beyond U+10FFFF */
}

int utf8_decode(const unsigned char *s, size_t len, uint32_t *cp) {
    int n = utf8_sequence_length(s[0]);
    if (n == 1) {
        *cp = s[0];
        return 1;
    }
    if (n == 0 || (size_t)n > len) goto invalid;
    uint32_t c = s[0] & (0x7F >> n);
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) goto invalid;
        c = (c << 6) | (s[i] & 0x3F);
    }
    /* reject overlong forms, surrogates and code points past U+10FFFF */
    if ((n == 3 && c < 0x800) || (n == 4 && (c < 0x10000 || c > 0x10FFFF)) || (c >= 0xD800 && c <= 0xDFFF))
        goto invalid;
    *cp = c;
    return n;
invalid:
    *cp = 0xFFFD;
    return 1;
}
