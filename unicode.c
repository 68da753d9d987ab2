/* unicode.c - UTF-8 decoding and lookups over the generated tables (unicode_tables.c). */
#include "unicode.h"

/* index of the range of a sorted [first, last] range table holding cp, or -1 */
static int find_range(const uint32_t (*ranges)[2], int n, uint32_t cp) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) { /* binary search over sorted ranges */
        int mid = (lo + hi) / 2;
        if (cp < ranges[mid][0]) hi = mid - 1;
        else if (cp > ranges[mid][1]) lo = mid + 1;
        else return mid;
    }
    return -1;
}

int unicode_in(const UnicodeClass *c, uint32_t cp) { return find_range(c->ranges, c->n, cp) >= 0; }

int unicode_category(uint32_t cp) {
    int i = find_range(unicode_categories.ranges, unicode_categories.n, cp);
    return i < 0 ? UC_Cn : unicode_categories.values[i];
}

/* first index of a pair table sorted by its first column whose first column is >= key */
static int lower_bound(const uint32_t (*pairs)[2], int n, uint32_t key) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (pairs[mid][0] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

uint32_t unicode_fold(uint32_t cp) {
    if (cp < 128) return cp >= 'A' && cp <= 'Z' ? cp + 32 : cp;
    int i = lower_bound(unicode_folding.by_source, unicode_folding.n, cp);
    return i < unicode_folding.n && unicode_folding.by_source[i][0] == cp ? unicode_folding.by_source[i][1] : cp;
}

int unicode_unfold(uint32_t folded, uint32_t out[4]) {
    int n = 0;
    for (int i = lower_bound(unicode_folding.by_target, unicode_folding.n, folded);
         i < unicode_folding.n && unicode_folding.by_target[i][0] == folded && n < 4; i++)
        out[n++] = unicode_folding.by_target[i][1];
    return n;
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
