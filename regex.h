/* regex.h - a small backtracking regular-expression matcher over UTF-8 text, for the pre-tokenizer patterns
 * of tokenizer.json files (Split) and of the pre-tokenizers GGUF files name.
 *
 * The tokenizers library compiles those patterns with Oniguruma (Ruby syntax) and splits text at every
 * match, leftmost first; this matcher follows the same rules for the subset the published patterns use
 * (docs/FORMAT.md, "Pre-tokenizer regexes"): literals and escapes (\t \n \r \xHH \x{HHHH} \uHHHH ...), `.`,
 * classes [...] and [^...] with ranges, \s \S \d \D \w \W \h \H and \p{..} / \P{..} (general categories such
 * as L, Lu, Ll, Lt, Lm, Lo, M, N, P, S, Z, C and their long names, White_Space, and the scripts Han,
 * Hiragana, Katakana, Hangul, Latin, Greek, Cyrillic, Arabic, Hebrew, Thai, Devanagari), alternation,
 * groups (...) and (?:...), case-insensitive groups (?i:...) and (?i), lookahead (?=...) and (?!...), atomic
 * groups (?>...), the quantifiers ? * + {n} {n,} {n,m} {,m} greedy, lazy (??, *?, ...) or possessive (?+,
 * *+, ++), and the anchors ^ $ \A \z \Z \b \B (^ and $ at line ends, as in Ruby). Anything else (lookbehind,
 * backreferences, nested classes, class intersections, other flags) is refused when the pattern is
 * compiled, with a message naming it and where it is.
 *
 * Matching keeps its backtracking points on a heap stack (never the C stack), so a long run of text costs
 * memory, not recursion. */
#ifndef ATTN_REGEX_H
#define ATTN_REGEX_H

#include <stddef.h>

typedef struct Regex Regex;
typedef struct RegexScratch RegexScratch;

/* Compiles pattern[0..len). Returns NULL with a one-line reason in err when the pattern is malformed, uses a
 * construct outside the subset above, or is too large. */
Regex *regex_compile(const char *pattern, size_t len, char *err, size_t errlen);
void regex_free(Regex *re);

/* Working memory for searches (the backtracking stack); reusable across patterns and calls. */
RegexScratch *regex_scratch_new(void);
void regex_scratch_free(RegexScratch *sc);

/* The leftmost match in s[0..n) that starts at or after byte `from` (a character boundary): returns 1 and
 * sets [*start, *end), 0 if there is none, -1 when out of memory, REGEX_TOO_SLOW when the search backtracked
 * more than REGEX_STEPS_PER_BYTE times the bytes searched (a pattern such as (a*)*b is exponential on some
 * texts: a hostile file's regex must not hang the program). Anchors and lookahead see all of s[0..n). */
#define REGEX_TOO_SLOW (-2)
#define REGEX_STEPS_PER_BYTE 100000
int regex_search(const Regex *re, RegexScratch *sc, const unsigned char *s, size_t n, size_t from, size_t *start,
                 size_t *end);

/* Every match in s[0..n), left to right, as the tokenizers library's Oniguruma iterator finds them: each
 * search starts where the previous match ended, and an empty match right where the previous match ended
 * is skipped (the search moves on one character). Start with RegexIterator it = {0}; returns 1 per match,
 * 0 when there are no more, or regex_search's negative codes. */
typedef struct {
    size_t at;           /* where the next search starts */
    size_t last_end;     /* where the previous match ended */
    int has_last;
} RegexIterator;

int regex_next_match(const Regex *re, RegexScratch *sc, const unsigned char *s, size_t n, RegexIterator *it,
                     size_t *start, size_t *end);

#endif
