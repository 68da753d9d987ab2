/* regex.c - the pre-tokenizer regex matcher (regex.h): a parser to a syntax tree, a compiler to a small
 * program, and a backtracking machine that runs it, leftmost-first like Oniguruma and Perl.
 *
 * Program instructions (one per node, except repeats):
 *   CHAR c / ANY / CLASS k     one character that is c (case-folded under (?i)), not '\n', in class k
 *   RUN test min max mode      a repeat of one single-character test: greedy, lazy or possessive
 *   SPLIT x y                  try x; on failure come back and try y
 *   JMP x
 *   LOOP_SET r / LOOP_CHECK r  the start of one iteration of a general * or + loop, and the check that it
 *                              consumed something (an empty iteration ends the loop, as in Oniguruma)
 *   LOOK / ATOMIC ... SUCCEED  a sub-program run on its own: lookahead (consumes nothing), atomic group
 *                              (keeps its first match, forgets its backtracking points)
 *   ASSERT kind                ^ $ \A \z \Z \b \B
 *   MATCH */
#include "regex.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unicode.h"

#define MAX_PATTERN_BYTES 65536
#define MAX_NESTING 64        /* groups inside groups */
#define MAX_PROGRAM 200000    /* instructions, after repeats are expanded */
#define MAX_REPEAT 100000     /* the largest {n,m} count (Oniguruma's limit) */
#define UNBOUNDED (-1)

/* items (n of `size` bytes, room for *cap) with room for one more: moved and *cap doubled when full; NULL when
 * out of memory (items is then still valid). */
static void *with_room(void *items, size_t n, size_t *cap, size_t size) {
    if (n < *cap) return items;
    size_t more = *cap ? 2 * *cap : 256;
    void *p = realloc(items, more * size);
    if (p) *cap = more;
    return p;
}

/* ---------------------------------------------------------------------------------------------
 * character classes: explicit ranges, properties (general categories, White_Space, scripts) and
 * complemented properties (\S, \P{L}, \W inside a class), the whole optionally negated */

enum { PROP_WHITE_SPACE = UNICODE_N_CATEGORIES, PROP_SCRIPT0 = 32 }; /* bits after the 30 categories */
#define CAT(c) (1ULL << (c))
#define PROPS_L (CAT(UC_Lu) | CAT(UC_Ll) | CAT(UC_Lt) | CAT(UC_Lm) | CAT(UC_Lo))
#define PROPS_M (CAT(UC_Mn) | CAT(UC_Mc) | CAT(UC_Me))
#define PROPS_N (CAT(UC_Nd) | CAT(UC_Nl) | CAT(UC_No))
#define PROPS_P (CAT(UC_Pc) | CAT(UC_Pd) | CAT(UC_Ps) | CAT(UC_Pe) | CAT(UC_Pi) | CAT(UC_Pf) | CAT(UC_Po))
#define PROPS_S (CAT(UC_Sm) | CAT(UC_Sc) | CAT(UC_Sk) | CAT(UC_So))
#define PROPS_Z (CAT(UC_Zs) | CAT(UC_Zl) | CAT(UC_Zp))
#define PROPS_C (CAT(UC_Cc) | CAT(UC_Cf) | CAT(UC_Cs) | CAT(UC_Co) | CAT(UC_Cn))
#define PROPS_WORD (PROPS_L | PROPS_M | PROPS_N | CAT(UC_Pc)) /* \w, as Oniguruma defines it for Unicode */
#define PROPS_SPACE (1ULL << PROP_WHITE_SPACE)
#define PROPS_SCRIPTS (((1ULL << UNICODE_N_SCRIPTS) - 1) << PROP_SCRIPT0)
#define MAX_COMPLEMENTS 8

typedef struct {
    uint32_t (*ranges)[2];
    int n_ranges;
    size_t cap_ranges;
    uint64_t props;                       /* in the class if it has any of these */
    uint64_t complements[MAX_COMPLEMENTS]; /* ... or has none of one of these */
    int n_complements;
    int negated;
    uint64_t ascii[2];                    /* membership of code points 0..127, computed once */
} Class;

/* the properties of a code point, as bits: its category, White_Space, and those of `wanted` scripts */
static uint64_t properties(uint32_t cp, uint64_t wanted) {
    uint64_t p = CAT(unicode_category(cp));
    if ((wanted & PROPS_SPACE) && (cp == ' ' || (cp >= 9 && cp <= 13) || (cp > 127 && unicode_in(&unicode_space, cp))))
        p |= PROPS_SPACE;
    for (int s = 0; (wanted & PROPS_SCRIPTS) && s < UNICODE_N_SCRIPTS; s++)
        if ((wanted >> (PROP_SCRIPT0 + s) & 1) && unicode_in(unicode_scripts[s].members, cp)) p |= 1ULL << (PROP_SCRIPT0 + s);
    return p;
}

static int class_has_slow(const Class *c, uint32_t cp) {
    int in = 0;
    for (int i = 0; i < c->n_ranges && !in; i++) in = cp >= c->ranges[i][0] && cp <= c->ranges[i][1];
    if (!in && (c->props || c->n_complements)) {
        uint64_t wanted = c->props;
        for (int i = 0; i < c->n_complements; i++) wanted |= c->complements[i];
        uint64_t p = properties(cp, wanted);
        in = (p & c->props) != 0;
        for (int i = 0; i < c->n_complements && !in; i++) in = (p & c->complements[i]) == 0;
    }
    return in != c->negated;
}

static int class_has(const Class *c, uint32_t cp) {
    if (cp < 128) return (int)(c->ascii[cp >> 6] >> (cp & 63) & 1);
    return class_has_slow(c, cp);
}

/* under (?i): the code point, its folded form or anything else that folds to that is in the class */
static int class_has_folded(const Class *c, uint32_t cp) {
    if (class_has(c, cp)) return 1;
    uint32_t f = unicode_fold(cp), others[4];
    if (f != cp && class_has(c, f)) return 1;
    int n = unicode_unfold(f, others);
    for (int i = 0; i < n; i++)
        if (others[i] != cp && class_has(c, others[i])) return 1;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * the syntax tree */

enum { N_EMPTY, N_CHAR, N_ANY, N_CLASS, N_CAT, N_ALT, N_REPEAT, N_LOOK, N_ATOMIC, N_ASSERT };
enum { GREEDY, LAZY, POSSESSIVE };
enum { A_LINE_START, A_LINE_END, A_TEXT_START, A_TEXT_END, A_TEXT_END_NEWLINE, A_WORD_BOUNDARY, A_NOT_WORD_BOUNDARY };

typedef struct {
    int type;
    int value;       /* CHAR: code point (folded under (?i)); CLASS: class index; ASSERT: kind; LOOK: negative */
    int fold;        /* CHAR, CLASS: case-insensitive */
    int min, max, mode; /* REPEAT */
    int child, next; /* first child (CAT, ALT, REPEAT, LOOK, ATOMIC), next sibling; -1 for none */
} Node;

typedef struct {
    const unsigned char *p;
    size_t len, at;
    Node *nodes;
    int n_nodes;
    size_t cap_nodes;
    Class *classes;
    int n_classes;
    size_t cap_classes;
    int depth;
    char *err;
    size_t errlen;
    int failed;
} Parser;

static int parse_error(Parser *ps, const char *what) {
    if (!ps->failed) snprintf(ps->err, ps->errlen, "regex: %s at offset %zu", what, ps->at);
    ps->failed = 1;
    return -1;
}

static int new_node(Parser *ps, int type) {
    Node *nodes = with_room(ps->nodes, (size_t)ps->n_nodes, &ps->cap_nodes, sizeof *nodes);
    if (!nodes) return parse_error(ps, "out of memory");
    ps->nodes = nodes;
    Node *n = &ps->nodes[ps->n_nodes];
    memset(n, 0, sizeof *n);
    n->type = type;
    n->child = n->next = -1;
    return ps->n_nodes++;
}

static int new_class(Parser *ps) {
    Class *classes = with_room(ps->classes, (size_t)ps->n_classes, &ps->cap_classes, sizeof *classes);
    if (!classes) return parse_error(ps, "out of memory");
    ps->classes = classes;
    memset(&ps->classes[ps->n_classes], 0, sizeof(Class));
    return ps->n_classes++;
}

static int class_add_range(Parser *ps, Class *c, uint32_t lo, uint32_t hi) {
    uint32_t (*ranges)[2] = with_room(c->ranges, (size_t)c->n_ranges, &c->cap_ranges, sizeof *ranges);
    if (!ranges) return parse_error(ps, "out of memory");
    c->ranges = ranges;
    c->ranges[c->n_ranges][0] = lo;
    c->ranges[c->n_ranges][1] = hi;
    c->n_ranges++;
    return 0;
}

static int class_add_props(Parser *ps, Class *c, uint64_t props, int complement) {
    if (!complement) {
        c->props |= props;
        return 0;
    }
    if (c->n_complements == MAX_COMPLEMENTS) return parse_error(ps, "too many negated classes inside one class");
    c->complements[c->n_complements++] = props;
    return 0;
}

static void class_finish(Class *c) {
    for (uint32_t cp = 0; cp < 128; cp++)
        if (class_has_slow(c, cp)) c->ascii[cp >> 6] |= 1ULL << (cp & 63);
}

static int at_end(const Parser *ps) { return ps->at >= ps->len; }
static int peek(const Parser *ps) { return at_end(ps) ? -1 : ps->p[ps->at]; }
static int peek_is(const Parser *ps, const char *s) {
    size_t n = strlen(s);
    return ps->at + n <= ps->len && memcmp(ps->p + ps->at, s, n) == 0;
}

/* one UTF-8 character of the pattern as a code point (a pattern that is not UTF-8 is refused) */
static int pattern_char(Parser *ps, uint32_t *cp) {
    int n = utf8_decode(ps->p + ps->at, ps->len - ps->at, cp);
    if (*cp == 0xFFFD && !(n == 3 && memcmp(ps->p + ps->at, "\xEF\xBF\xBD", 3) == 0))
        return parse_error(ps, "the pattern is not valid UTF-8");
    ps->at += (size_t)n;
    return 0;
}

static int hex_digits(Parser *ps, int min, int max, uint32_t *out) {
    uint32_t v = 0;
    int n = 0;
    while (n < max && !at_end(ps)) {
        int c = peek(ps), d = c >= '0' && c <= '9' ? c - '0' : (c | 32) >= 'a' && (c | 32) <= 'f' ? (c | 32) - 'a' + 10 : -1;
        if (d < 0) break;
        v = v * 16 + (uint32_t)d;
        ps->at++;
        n++;
    }
    if (n < min || v > 0x10FFFF) return parse_error(ps, "bad hexadecimal escape");
    *out = v;
    return 0;
}

typedef struct {
    const char *name;
    uint64_t props;
} PropertyName;

static const PropertyName property_names[] = {
    {"L", PROPS_L}, {"Letter", PROPS_L}, {"LC", CAT(UC_Lu) | CAT(UC_Ll) | CAT(UC_Lt)},
    {"L&", CAT(UC_Lu) | CAT(UC_Ll) | CAT(UC_Lt)}, {"Cased_Letter", CAT(UC_Lu) | CAT(UC_Ll) | CAT(UC_Lt)},
    {"Lu", CAT(UC_Lu)}, {"Uppercase_Letter", CAT(UC_Lu)}, {"Ll", CAT(UC_Ll)}, {"Lowercase_Letter", CAT(UC_Ll)},
    {"Lt", CAT(UC_Lt)}, {"Titlecase_Letter", CAT(UC_Lt)}, {"Lm", CAT(UC_Lm)}, {"Modifier_Letter", CAT(UC_Lm)},
    {"Lo", CAT(UC_Lo)}, {"Other_Letter", CAT(UC_Lo)},
    {"M", PROPS_M}, {"Mark", PROPS_M}, {"Combining_Mark", PROPS_M}, {"Mn", CAT(UC_Mn)}, {"Nonspacing_Mark", CAT(UC_Mn)},
    {"Mc", CAT(UC_Mc)}, {"Spacing_Mark", CAT(UC_Mc)}, {"Me", CAT(UC_Me)}, {"Enclosing_Mark", CAT(UC_Me)},
    {"N", PROPS_N}, {"Number", PROPS_N}, {"Nd", CAT(UC_Nd)}, {"Decimal_Number", CAT(UC_Nd)},
    {"Nl", CAT(UC_Nl)}, {"Letter_Number", CAT(UC_Nl)}, {"No", CAT(UC_No)}, {"Other_Number", CAT(UC_No)},
    {"P", PROPS_P}, {"Punctuation", PROPS_P}, {"Pc", CAT(UC_Pc)}, {"Connector_Punctuation", CAT(UC_Pc)},
    {"Pd", CAT(UC_Pd)}, {"Dash_Punctuation", CAT(UC_Pd)}, {"Ps", CAT(UC_Ps)}, {"Open_Punctuation", CAT(UC_Ps)},
    {"Pe", CAT(UC_Pe)}, {"Close_Punctuation", CAT(UC_Pe)}, {"Pi", CAT(UC_Pi)}, {"Initial_Punctuation", CAT(UC_Pi)},
    {"Pf", CAT(UC_Pf)}, {"Final_Punctuation", CAT(UC_Pf)}, {"Po", CAT(UC_Po)}, {"Other_Punctuation", CAT(UC_Po)},
    {"S", PROPS_S}, {"Symbol", PROPS_S}, {"Sm", CAT(UC_Sm)}, {"Math_Symbol", CAT(UC_Sm)}, {"Sc", CAT(UC_Sc)},
    {"Currency_Symbol", CAT(UC_Sc)}, {"Sk", CAT(UC_Sk)}, {"Modifier_Symbol", CAT(UC_Sk)}, {"So", CAT(UC_So)},
    {"Other_Symbol", CAT(UC_So)},
    {"Z", PROPS_Z}, {"Separator", PROPS_Z}, {"Zs", CAT(UC_Zs)}, {"Space_Separator", CAT(UC_Zs)},
    {"Zl", CAT(UC_Zl)}, {"Line_Separator", CAT(UC_Zl)}, {"Zp", CAT(UC_Zp)}, {"Paragraph_Separator", CAT(UC_Zp)},
    {"C", PROPS_C}, {"Other", PROPS_C}, {"Cc", CAT(UC_Cc)}, {"Control", CAT(UC_Cc)}, {"Cf", CAT(UC_Cf)},
    {"Format", CAT(UC_Cf)}, {"Cs", CAT(UC_Cs)}, {"Surrogate", CAT(UC_Cs)}, {"Co", CAT(UC_Co)},
    {"Private_Use", CAT(UC_Co)}, {"Cn", CAT(UC_Cn)}, {"Unassigned", CAT(UC_Cn)},
    {"White_Space", PROPS_SPACE}, {"Space", PROPS_SPACE},
};

static int same_name(const char *a, const unsigned char *b, size_t n) { /* ASCII case-insensitive */
    size_t i = 0;
    for (; i < n && a[i]; i++)
        if ((a[i] | 32) != (b[i] | 32) && !(a[i] == b[i])) return 0;
    return i == n && a[i] == '\0';
}

/* \p{Name} / \p{^Name}: sets the property bits and whether the name was negated with ^ */
static int parse_property(Parser *ps, uint64_t *props, int *negated) {
    if (peek(ps) != '{') return parse_error(ps, "\\p must be followed by {Name}");
    ps->at++;
    *negated = peek(ps) == '^';
    ps->at += (size_t)*negated;
    size_t start = ps->at;
    while (!at_end(ps) && peek(ps) != '}') ps->at++;
    if (at_end(ps)) return parse_error(ps, "unterminated \\p{...}");
    const unsigned char *name = ps->p + start;
    size_t n = ps->at - start;
    ps->at++;
    for (size_t i = 0; i < sizeof property_names / sizeof *property_names; i++)
        if (same_name(property_names[i].name, name, n)) {
            *props = property_names[i].props;
            return 0;
        }
    for (int s = 0; s < UNICODE_N_SCRIPTS; s++)
        if (same_name(unicode_scripts[s].name, name, n)) {
            *props = 1ULL << (PROP_SCRIPT0 + s);
            return 0;
        }
    ps->at = start;
    return parse_error(ps, "unknown property name in \\p{...}");
}

/* An escape that stands for a set of characters (\s \d \w \h, their negations, \p, \P): adds it to c and
 * returns 1; 0 if the escape at ps->at is not one of them; -1 on error. ps->at is just past the backslash. */
static int class_escape(Parser *ps, Class *c) {
    int e = peek(ps), negated = 0;
    uint64_t props = 0;
    switch (e) {
    case 's': case 'S': props = PROPS_SPACE; break;
    case 'd': case 'D': props = CAT(UC_Nd); break;
    case 'w': case 'W': props = PROPS_WORD; break;
    case 'h': case 'H':
        ps->at++;
        if (e == 'h')
            return class_add_range(ps, c, '0', '9') || class_add_range(ps, c, 'a', 'f') || class_add_range(ps, c, 'A', 'F')
                       ? -1 : 1;
        for (uint32_t lo = 0; lo < 128; lo++) /* \H: everything but the hexadecimal digits */
            if (!((lo >= '0' && lo <= '9') || ((lo | 32) >= 'a' && (lo | 32) <= 'f')) && class_add_range(ps, c, lo, lo))
                return -1;
        return class_add_range(ps, c, 128, 0x10FFFF) ? -1 : 1;
    case 'p': case 'P':
        ps->at++;
        if (parse_property(ps, &props, &negated)) return -1;
        return class_add_props(ps, c, props, (e == 'P') != negated) ? -1 : 1;
    default: return 0;
    }
    ps->at++;
    return class_add_props(ps, c, props, e >= 'A' && e <= 'Z') ? -1 : 1;
}

/* A character escape (ps->at just past the backslash): sets *cp. in_class: \b is a backspace there. */
static int char_escape(Parser *ps, uint32_t *cp, int in_class) {
    int e = peek(ps);
    if (e < 0) return parse_error(ps, "the pattern ends with a backslash");
    ps->at++;
    switch (e) {
    case 't': *cp = '\t'; return 0;
    case 'n': *cp = '\n'; return 0;
    case 'r': *cp = '\r'; return 0;
    case 'f': *cp = '\f'; return 0;
    case 'v': *cp = '\v'; return 0;
    case 'a': *cp = 7; return 0;
    case 'e': *cp = 27; return 0;
    case '0': *cp = 0; return 0;
    case 'x':
        if (peek(ps) == '{') {
            ps->at++;
            if (hex_digits(ps, 1, 8, cp)) return -1;
            if (peek(ps) != '}') return parse_error(ps, "unterminated \\x{...}");
            ps->at++;
            return 0;
        }
        return hex_digits(ps, 1, 2, cp);
    case 'u': return hex_digits(ps, 4, 4, cp);
    case 'b':
        if (in_class) {
            *cp = 8;
            return 0;
        }
        break;
    default:
        if (e >= 0x80 || !((e | 32) >= 'a' && (e | 32) <= 'z') ) { /* an escaped symbol stands for itself */
            if (e >= '1' && e <= '9') break; /* a backreference */
            ps->at--;
            return pattern_char(ps, cp);
        }
    }
    ps->at -= 1;
    return parse_error(ps, e >= '1' && e <= '9' ? "backreferences are not supported" : "unsupported escape");
}

/* [...] after the '[' */
static int parse_class(Parser *ps, int fold) {
    int k = new_class(ps);
    if (k < 0) return -1;
    Class *c = &ps->classes[k];
    if (peek(ps) == '^') {
        c->negated = 1;
        ps->at++;
    }
    int first = 1;
    for (;;) {
        if (at_end(ps)) return parse_error(ps, "unterminated character class");
        int ch = peek(ps);
        if (ch == ']' && !first) {
            ps->at++;
            break;
        }
        first = 0;
        if (ch == '[') return parse_error(ps, "nested character classes are not supported");
        if (peek_is(ps, "&&")) return parse_error(ps, "class intersections (&&) are not supported");
        uint32_t lo;
        if (ch == '\\') {
            ps->at++;
            int r = class_escape(ps, c);
            if (r < 0) return -1;
            if (r > 0) continue;
            if (char_escape(ps, &lo, 1)) return -1;
        } else if (pattern_char(ps, &lo)) {
            return -1;
        }
        uint32_t hi = lo;
        if (peek(ps) == '-' && ps->at + 1 < ps->len && ps->p[ps->at + 1] != ']') { /* a range lo-hi */
            ps->at++;
            if (peek(ps) == '\\') {
                ps->at++;
                if (strchr("sSdDwWhHpP", peek(ps))) return parse_error(ps, "a range cannot end in a class escape");
                if (char_escape(ps, &hi, 1)) return -1;
            } else if (peek(ps) == '[') {
                return parse_error(ps, "nested character classes are not supported");
            } else if (pattern_char(ps, &hi)) {
                return -1;
            }
            if (hi < lo) return parse_error(ps, "a character range runs backwards");
        }
        if (class_add_range(ps, &ps->classes[k], lo, hi)) return -1;
        c = &ps->classes[k];
    }
    c = &ps->classes[k];
    class_finish(c);
    int n = new_node(ps, N_CLASS);
    if (n >= 0) ps->nodes[n].value = k, ps->nodes[n].fold = fold;
    return n;
}

/* a class node for an escape like \s or \p{L} outside brackets */
static int escape_class_node(Parser *ps, int fold) {
    int k = new_class(ps);
    if (k < 0) return -1;
    int r = class_escape(ps, &ps->classes[k]);
    if (r <= 0) {
        ps->n_classes--;
        return r < 0 ? -1 : -2; /* -2: not a class escape */
    }
    class_finish(&ps->classes[k]);
    int n = new_node(ps, N_CLASS);
    if (n >= 0) ps->nodes[n].value = k, ps->nodes[n].fold = fold;
    return n;
}

static int assert_node(Parser *ps, int kind) {
    int n = new_node(ps, N_ASSERT);
    if (n >= 0) ps->nodes[n].value = kind;
    return n;
}

static int parse_alternation(Parser *ps, int fold);

/* (...) after the '(': returns the group's node; *flags_only is set for an inline (?i) / (?-i), which
 * changes *fold for the rest of the enclosing group and makes no node */
static int parse_group(Parser *ps, int *fold, int *flags_only) {
    int type = -1, negative = 0, inner_fold = *fold;
    *flags_only = 0;
    if (peek(ps) == '?') {
        ps->at++;
        int c = peek(ps);
        if (c == ':') type = N_CAT, ps->at++;
        else if (c == '=' || c == '!') type = N_LOOK, negative = c == '!', ps->at++;
        else if (c == '>') type = N_ATOMIC, ps->at++;
        else if (c == 'i' || c == '-') {
            int on = c == 'i';
            ps->at++;
            if (!on) {
                if (peek(ps) != 'i') return parse_error(ps, "only the i flag is supported in (?...)");
                ps->at++;
            }
            if (peek(ps) == ')') {
                ps->at++;
                *fold = on;
                *flags_only = 1;
                return 0;
            }
            if (peek(ps) != ':') return parse_error(ps, "only the i flag is supported in (?...)");
            ps->at++;
            inner_fold = on;
            type = N_CAT;
        } else if (c == '<') {
            return parse_error(ps, peek_is(ps, "<=") || peek_is(ps, "<!") ? "lookbehind is not supported"
                                                                        : "named groups are not supported");
        } else {
            return parse_error(ps, (c | 32) >= 'a' && (c | 32) <= 'z' ? "only the i flag is supported in (?...)"
                                                                      : "unsupported group (?...)");
        }
    } else {
        type = N_CAT; /* a capturing group: nothing is captured here, it only groups */
    }
    if (++ps->depth > MAX_NESTING) return parse_error(ps, "groups nested too deeply");
    int body = parse_alternation(ps, inner_fold);
    ps->depth--;
    if (body < 0) return -1;
    if (peek(ps) != ')') return parse_error(ps, "missing )");
    ps->at++;
    if (type == N_CAT) return body;
    int n = new_node(ps, type);
    if (n >= 0) {
        ps->nodes[n].child = body;
        ps->nodes[n].value = negative;
    }
    return n;
}

static int parse_atom(Parser *ps, int *fold, int *flags_only) {
    *flags_only = 0;
    int c = peek(ps);
    if (c == '(') {
        ps->at++;
        return parse_group(ps, fold, flags_only);
    }
    if (c == '[') {
        ps->at++;
        if (++ps->depth > MAX_NESTING) return parse_error(ps, "groups nested too deeply");
        int n = parse_class(ps, *fold);
        ps->depth--;
        return n;
    }
    if (c == '.') {
        ps->at++;
        return new_node(ps, N_ANY);
    }
    if (c == '^' || c == '$') {
        ps->at++;
        return assert_node(ps, c == '^' ? A_LINE_START : A_LINE_END);
    }
    if (c == '*' || c == '+' || c == '?') return parse_error(ps, "a quantifier follows nothing");
    uint32_t cp;
    if (c == '\\') {
        ps->at++;
        int e = peek(ps);
        const char *anchors = "AzZbB";
        const char *at = e > 0 ? strchr(anchors, e) : NULL;
        if (at) {
            ps->at++;
            static const int kinds[] = {A_TEXT_START, A_TEXT_END, A_TEXT_END_NEWLINE, A_WORD_BOUNDARY, A_NOT_WORD_BOUNDARY};
            return assert_node(ps, kinds[at - anchors]);
        }
        int n = escape_class_node(ps, *fold);
        if (n != -2) return n;
        if (char_escape(ps, &cp, 0)) return -1;
    } else if (pattern_char(ps, &cp)) {
        return -1;
    }
    int n = new_node(ps, N_CHAR);
    if (n >= 0) {
        ps->nodes[n].value = (int)(*fold ? unicode_fold(cp) : cp);
        ps->nodes[n].fold = *fold;
    }
    return n;
}

/* {n}, {n,}, {n,m}, {,m} at ps->at; returns 0 and sets min/max, or 1 when the brace is not a valid interval
 * (Ruby syntax then reads it as a literal '{') */
/* a decimal count at ps->p[*i], saturating past MAX_REPEAT; -1 when there are no digits */
static long decimal_at(const Parser *ps, size_t *i) {
    long v = -1;
    for (; *i < ps->len && ps->p[*i] >= '0' && ps->p[*i] <= '9'; (*i)++) {
        v = (v < 0 ? 0 : v) * 10 + (ps->p[*i] - '0');
        if (v > MAX_REPEAT) v = MAX_REPEAT + 1;
    }
    return v;
}

/* {n}, {n,}, {n,m}, {,m} at ps->at: returns 0 and sets min/max (and moves past it), 1 when the brace does not
 * open a valid interval (Ruby syntax then reads it as a literal '{'), -1 on error */
static int parse_interval(Parser *ps, int *min, int *max) {
    size_t i = ps->at + 1;
    long lo = decimal_at(ps, &i), hi = lo;
    if (i < ps->len && ps->p[i] == ',') {
        i++;
        hi = decimal_at(ps, &i);
        if (lo < 0 && hi < 0) return 1;
        if (lo < 0) lo = 0;
    } else if (lo < 0) {
        return 1;
    }
    if (i >= ps->len || ps->p[i] != '}') return 1;
    if (lo > MAX_REPEAT || hi > MAX_REPEAT) return parse_error(ps, "repeat count too large");
    if (hi >= 0 && hi < lo) return parse_error(ps, "a repeat {n,m} has m < n");
    *min = (int)lo;
    *max = hi < 0 ? UNBOUNDED : (int)hi;
    ps->at = i + 1;
    return 0;
}

static int parse_quantified(Parser *ps, int atom) {
    int c = peek(ps), min, max;
    if (c == '?') min = 0, max = 1, ps->at++;
    else if (c == '*') min = 0, max = UNBOUNDED, ps->at++;
    else if (c == '+') min = 1, max = UNBOUNDED, ps->at++;
    else if (c == '{') {
        int r = parse_interval(ps, &min, &max);
        if (r < 0) return -1;
        if (r > 0) return atom;
        c = '}';
    } else {
        return atom;
    }
    int mode = GREEDY;
    if (peek(ps) == '?') mode = LAZY, ps->at++;
    else if (peek(ps) == '+' && c != '}') mode = POSSESSIVE, ps->at++;
    int next = peek(ps), ignored;
    if (next == '*' || next == '+' || next == '?') return parse_error(ps, "nested quantifiers are not supported");
    if (next == '{') {
        size_t at = ps->at;
        int r = parse_interval(ps, &ignored, &ignored);
        ps->at = at;
        if (r <= 0) return parse_error(ps, "nested quantifiers are not supported");
    }
    int n = new_node(ps, N_REPEAT);
    if (n < 0) return -1;
    Node *r = &ps->nodes[n];
    r->child = atom, r->min = min, r->max = max, r->mode = mode;
    return n;
}

/* a sequence of quantified atoms, up to | or ) or the end */
static int parse_sequence(Parser *ps, int *fold) {
    int cat = new_node(ps, N_CAT), last = -1;
    if (cat < 0) return -1;
    while (!at_end(ps) && peek(ps) != '|' && peek(ps) != ')') {
        int flags_only;
        int atom = parse_atom(ps, fold, &flags_only);
        if (atom < 0) return -1;
        if (flags_only) continue;
        int q = parse_quantified(ps, atom);
        if (q < 0) return -1;
        if (q != atom && ps->nodes[atom].type == N_ASSERT) return parse_error(ps, "an anchor cannot be repeated");
        if (last < 0) ps->nodes[cat].child = q;
        else ps->nodes[last].next = q;
        last = q;
    }
    return cat;
}

static int parse_alternation(Parser *ps, int fold) {
    int f = fold; /* (?i) inside a group lasts to its end, across | as in Perl and Ruby */
    int first = parse_sequence(ps, &f);
    if (first < 0 || peek(ps) != '|') return first;
    int alt = new_node(ps, N_ALT);
    if (alt < 0) return -1;
    ps->nodes[alt].child = first;
    int last = first;
    while (peek(ps) == '|') {
        ps->at++;
        int s = parse_sequence(ps, &f);
        if (s < 0) return -1;
        ps->nodes[last].next = s;
        last = s;
    }
    return alt;
}

/* ---------------------------------------------------------------------------------------------
 * the program */

enum { I_CHAR, I_ANY, I_CLASS, I_RUN, I_SPLIT, I_JMP, I_LOOP_SET, I_LOOP_CHECK, I_LOOK, I_ATOMIC, I_SUCCEED, I_ASSERT, I_MATCH };
enum { T_CHAR, T_ANY, T_CLASS }; /* the single-character tests a RUN repeats */

typedef struct {
    unsigned char op, test, fold, mode; /* mode: RUN greedy / lazy / possessive; LOOK: 1 negative */
    int arg;                            /* CHAR / RUN test: code point or class; SPLIT, JMP: target; ASSERT: kind;
                                         * LOOP_*: register; LOOK, ATOMIC: where to go after the sub-program */
    int arg2;                           /* SPLIT: the second target */
    int min, max;                       /* RUN */
} Inst;

struct Regex {
    Inst *prog;
    int n_prog;
    size_t cap_prog;
    Class *classes;
    int n_classes;
    int n_registers;
};

typedef struct {
    Regex *re;
    const Node *nodes;
    Parser *ps;
} Compiler;

static int emit(Compiler *cc, Inst in) {
    Regex *re = cc->re;
    if (re->n_prog >= MAX_PROGRAM) return parse_error(cc->ps, "the pattern is too large once its repeats are expanded");
    Inst *prog = with_room(re->prog, (size_t)re->n_prog, &re->cap_prog, sizeof *prog);
    if (!prog) return parse_error(cc->ps, "out of memory");
    re->prog = prog;
    re->prog[re->n_prog] = in;
    return re->n_prog++;
}

static int single_char(const Node *n) { return n->type == N_CHAR || n->type == N_ANY || n->type == N_CLASS; }

static int compile_node(Compiler *cc, int k);

static int compile_repeat(Compiler *cc, const Node *n) {
    const Node *child = &cc->nodes[n->child];
    if (single_char(child)) {
        int test = child->type == N_CHAR ? T_CHAR : child->type == N_ANY ? T_ANY : T_CLASS;
        return emit(cc, (Inst){I_RUN, (unsigned char)test, (unsigned char)child->fold, (unsigned char)n->mode,
                               child->value, 0, n->min, n->max}) < 0 ? -1 : 0;
    }
    if (n->mode == POSSESSIVE) { /* x*+ is (?>x*) */
        Node greedy = *n;
        greedy.mode = GREEDY;
        int at = emit(cc, (Inst){I_ATOMIC, 0, 0, 0, 0, 0, 0, 0});
        if (at < 0 || compile_repeat(cc, &greedy) || emit(cc, (Inst){I_SUCCEED, 0, 0, 0, 0, 0, 0, 0}) < 0) return -1;
        cc->re->prog[at].arg = cc->re->n_prog;
        return 0;
    }
    for (int i = 0; i < n->min; i++)
        if (compile_node(cc, n->child)) return -1;
    int lazy = n->mode == LAZY;
    if (n->max == UNBOUNDED) { /* L: SPLIT body, out; body: LOOP_SET r; child; LOOP_CHECK r; JMP L; out: */
        int r = cc->re->n_registers++;
        int split = emit(cc, (Inst){I_SPLIT, 0, 0, 0, 0, 0, 0, 0});
        if (split < 0 || emit(cc, (Inst){I_LOOP_SET, 0, 0, 0, r, 0, 0, 0}) < 0 || compile_node(cc, n->child) ||
            emit(cc, (Inst){I_LOOP_CHECK, 0, 0, 0, r, 0, 0, 0}) < 0 || emit(cc, (Inst){I_JMP, 0, 0, 0, split, 0, 0, 0}) < 0)
            return -1;
        Inst *s = &cc->re->prog[split];
        s->arg = lazy ? cc->re->n_prog : split + 1;
        s->arg2 = lazy ? split + 1 : cc->re->n_prog;
        return 0;
    }
    /* up to max - min more, each optional: SPLIT body_k, out ... (all SPLITs leave to the same out) */
    int splits[64], n_splits = 0, optional = n->max - n->min;
    int *pending = optional <= 64 ? splits : malloc((size_t)optional * sizeof *pending);
    if (!pending) return parse_error(cc->ps, "out of memory");
    int rc = 0;
    for (int i = 0; i < optional && !rc; i++) {
        int split = emit(cc, (Inst){I_SPLIT, 0, 0, 0, 0, 0, 0, 0});
        if (split < 0 || compile_node(cc, n->child)) rc = -1;
        else pending[n_splits++] = split;
    }
    for (int i = 0; i < n_splits && !rc; i++) {
        Inst *s = &cc->re->prog[pending[i]];
        s->arg = lazy ? cc->re->n_prog : pending[i] + 1;
        s->arg2 = lazy ? pending[i] + 1 : cc->re->n_prog;
    }
    if (pending != splits) free(pending);
    return rc;
}

static int compile_node(Compiler *cc, int k) {
    const Node *n = &cc->nodes[k];
    switch (n->type) {
    case N_EMPTY: return 0;
    case N_CHAR: return emit(cc, (Inst){I_CHAR, 0, (unsigned char)n->fold, 0, n->value, 0, 0, 0}) < 0 ? -1 : 0;
    case N_ANY: return emit(cc, (Inst){I_ANY, 0, 0, 0, 0, 0, 0, 0}) < 0 ? -1 : 0;
    case N_CLASS: return emit(cc, (Inst){I_CLASS, 0, (unsigned char)n->fold, 0, n->value, 0, 0, 0}) < 0 ? -1 : 0;
    case N_ASSERT: return emit(cc, (Inst){I_ASSERT, 0, 0, 0, n->value, 0, 0, 0}) < 0 ? -1 : 0;
    case N_CAT:
        for (int c = n->child; c >= 0; c = cc->nodes[c].next)
            if (compile_node(cc, c)) return -1;
        return 0;
    case N_ALT: { /* SPLIT a, next; a; JMP end; next: SPLIT b, next2; b; JMP end; ... last */
        int jumps[256], n_jumps = 0, rc = 0;
        int count = 0;
        for (int c = n->child; c >= 0; c = cc->nodes[c].next) count++;
        int *pending = count <= 256 ? jumps : malloc((size_t)count * sizeof *pending);
        if (!pending) return parse_error(cc->ps, "out of memory");
        for (int c = n->child; c >= 0 && !rc; c = cc->nodes[c].next) {
            int last = cc->nodes[c].next < 0, split = -1;
            if (!last && (split = emit(cc, (Inst){I_SPLIT, 0, 0, 0, 0, 0, 0, 0})) < 0) { rc = -1; break; }
            if (compile_node(cc, c)) { rc = -1; break; }
            if (!last) {
                int j = emit(cc, (Inst){I_JMP, 0, 0, 0, 0, 0, 0, 0});
                if (j < 0) { rc = -1; break; }
                pending[n_jumps++] = j;
                cc->re->prog[split].arg = split + 1;
                cc->re->prog[split].arg2 = cc->re->n_prog;
            }
        }
        for (int i = 0; i < n_jumps && !rc; i++) cc->re->prog[pending[i]].arg = cc->re->n_prog;
        if (pending != jumps) free(pending);
        return rc;
    }
    case N_REPEAT: return compile_repeat(cc, n);
    case N_LOOK:
    case N_ATOMIC: {
        int at = emit(cc, (Inst){(unsigned char)(n->type == N_LOOK ? I_LOOK : I_ATOMIC), 0, 0, (unsigned char)n->value, 0, 0, 0, 0});
        if (at < 0 || compile_node(cc, n->child) || emit(cc, (Inst){I_SUCCEED, 0, 0, 0, 0, 0, 0, 0}) < 0) return -1;
        cc->re->prog[at].arg = cc->re->n_prog;
        return 0;
    }
    }
    return parse_error(cc->ps, "internal error: unknown node");
}

void regex_free(Regex *re) {
    if (!re) return;
    for (int i = 0; i < re->n_classes; i++) free(re->classes[i].ranges);
    free(re->classes);
    free(re->prog);
    free(re);
}

Regex *regex_compile(const char *pattern, size_t len, char *err, size_t errlen) {
    Parser ps = {(const unsigned char *)pattern, len, 0, NULL, 0, 0, NULL, 0, 0, 0, err, errlen, 0};
    Regex *re = calloc(1, sizeof *re);
    if (!re) {
        snprintf(err, errlen, "regex: out of memory");
        return NULL;
    }
    int root = -1;
    if (len > MAX_PATTERN_BYTES) parse_error(&ps, "the pattern is too long");
    else root = parse_alternation(&ps, 0);
    if (root >= 0 && !at_end(&ps)) parse_error(&ps, "unmatched )");
    Compiler cc = {re, ps.nodes, &ps};
    if (!ps.failed && !compile_node(&cc, root)) emit(&cc, (Inst){I_MATCH, 0, 0, 0, 0, 0, 0, 0});
    re->classes = ps.classes;
    re->n_classes = ps.n_classes;
    free(ps.nodes);
    if (ps.failed) {
        regex_free(re);
        return NULL;
    }
    return re;
}

/* ---------------------------------------------------------------------------------------------
 * matching */

enum { BT_ALT, BT_REGISTER, BT_GREEDY, BT_LAZY };

typedef struct {
    int kind, pc;
    int count, limit; /* GREEDY: characters past the minimum still to give back; LAZY: taken so far, max */
    size_t pos;       /* ALT, LAZY: where to resume; REGISTER: the value to restore */
    size_t base;      /* GREEDY: first of its positions in the scratch's marks; REGISTER: the register */
} Backtrack;

struct RegexScratch {
    size_t steps_left; /* backtracking steps this search may still take */
    Backtrack *stack;
    size_t top, cap;
    size_t *marks; /* positions a greedy RUN may give back characters to */
    size_t n_marks, cap_marks;
    size_t *registers;
    int n_registers;
};

RegexScratch *regex_scratch_new(void) { return calloc(1, sizeof(RegexScratch)); }

void regex_scratch_free(RegexScratch *sc) {
    if (!sc) return;
    free(sc->stack);
    free(sc->marks);
    free(sc->registers);
    free(sc);
}

static int push(RegexScratch *sc, Backtrack b) {
    Backtrack *stack = with_room(sc->stack, sc->top, &sc->cap, sizeof *stack);
    if (!stack) return -1;
    sc->stack = stack;
    sc->stack[sc->top++] = b;
    return 0;
}

static int push_mark(RegexScratch *sc, size_t pos) {
    size_t *marks = with_room(sc->marks, sc->n_marks, &sc->cap_marks, sizeof *marks);
    if (!marks) return -1;
    sc->marks = marks;
    sc->marks[sc->n_marks++] = pos;
    return 0;
}

typedef struct {
    const Regex *re;
    RegexScratch *sc;
    const unsigned char *s;
    size_t n;
} Match;

/* Whether the character at pos passes a single-character test; sets *len to its bytes. */
static int test_char(const Match *m, int test, int fold, int arg, size_t pos, int *len) {
    if (pos >= m->n) return 0;
    uint32_t cp;
    *len = utf8_decode(m->s + pos, m->n - pos, &cp);
    switch (test) {
    case T_CHAR: return (fold ? unicode_fold(cp) : cp) == (uint32_t)arg;
    case T_ANY: return cp != '\n';
    default: {
        const Class *c = &m->re->classes[arg];
        return fold ? class_has_folded(c, cp) : class_has(c, cp);
    }
    }
}

static int is_word_char(uint32_t cp) { return (CAT(unicode_category(cp)) & PROPS_WORD) != 0; }

/* the character that ends at pos (U+FFFD where the bytes before it are not one UTF-8 character) */
static uint32_t char_before(const Match *m, size_t pos) {
    for (size_t back = 1; back <= 4 && back <= pos; back++) {
        uint32_t cp;
        if (utf8_sequence_length(m->s[pos - back]) == 0 && back < 4) continue; /* a continuation byte */
        return utf8_decode(m->s + pos - back, back, &cp) == (int)back ? cp : 0xFFFD;
    }
    return 0xFFFD;
}

static int assertion_holds(const Match *m, int kind, size_t pos) {
    const unsigned char *s = m->s;
    size_t n = m->n;
    switch (kind) {
    case A_LINE_START: return pos == 0 || s[pos - 1] == '\n';
    case A_LINE_END: return pos == n || s[pos] == '\n';
    case A_TEXT_START: return pos == 0;
    case A_TEXT_END: return pos == n;
    case A_TEXT_END_NEWLINE: return pos == n || (pos + 1 == n && s[pos] == '\n');
    default: {
        uint32_t after = 0;
        int before_word = pos > 0 && is_word_char(char_before(m, pos));
        int after_word = pos < n && (utf8_decode(s + pos, n - pos, &after), is_word_char(after));
        return (before_word != after_word) == (kind == A_WORD_BOUNDARY);
    }
    }
}

/* Runs the program from pc at pos until MATCH or SUCCEED (1, *end set), or until every alternative has
 * failed (0); -1 when out of memory. Leaves the stack and marks as it found them. */
static int run(const Match *m, int pc, size_t pos, size_t *end) {
    RegexScratch *sc = m->sc;
    const Inst *prog = m->re->prog;
    size_t base = sc->top, marks_base = sc->n_marks;
    int len;
    for (;;) {
        const Inst *in = &prog[pc];
        switch (in->op) {
        case I_CHAR:
        case I_ANY:
        case I_CLASS:
            if (!test_char(m, in->op == I_CHAR ? T_CHAR : in->op == I_ANY ? T_ANY : T_CLASS, in->fold, in->arg, pos, &len))
                goto fail;
            pos += (size_t)len;
            pc++;
            continue;
        case I_RUN: {
            int count = 0;
            for (; count < in->min; count++) { /* the minimum, in any mode */
                if (!test_char(m, in->test, in->fold, in->arg, pos, &len)) goto fail;
                pos += (size_t)len;
            }
            if (in->mode == LAZY) {
                if (in->max != count && push(sc, (Backtrack){BT_LAZY, pc, count, in->max, pos, 0})) return -1;
                pc++;
                continue;
            }
            size_t mark = sc->n_marks;
            int extra = 0;
            if (in->mode == GREEDY && push_mark(sc, pos)) return -1;
            while ((in->max == UNBOUNDED || count < in->max) && test_char(m, in->test, in->fold, in->arg, pos, &len)) {
                pos += (size_t)len;
                count++;
                extra++;
                if (in->mode == GREEDY && push_mark(sc, pos)) return -1;
            }
            if (in->mode == GREEDY) {
                if (extra > 0) {
                    if (push(sc, (Backtrack){BT_GREEDY, pc + 1, extra, 0, 0, mark})) return -1;
                } else {
                    sc->n_marks = mark;
                }
            }
            pc++;
            continue;
        }
        case I_SPLIT:
            if (push(sc, (Backtrack){BT_ALT, in->arg2, 0, 0, pos, 0})) return -1;
            pc = in->arg;
            continue;
        case I_JMP: pc = in->arg; continue;
        case I_LOOP_SET:
            if (push(sc, (Backtrack){BT_REGISTER, 0, 0, 0, sc->registers[in->arg], (size_t)in->arg})) return -1;
            sc->registers[in->arg] = pos;
            pc++;
            continue;
        case I_LOOP_CHECK:
            if (sc->registers[in->arg] == pos) goto fail; /* an empty iteration: the loop ends without it */
            pc++;
            continue;
        case I_LOOK:
        case I_ATOMIC: {
            size_t sub_end;
            int r = run(m, pc + 1, pos, &sub_end);
            if (r < 0) return r;
            if (in->op == I_LOOK ? r == in->mode : !r) goto fail; /* LOOK's mode is 1 for (?!...) */
            if (in->op == I_ATOMIC) pos = sub_end;
            pc = in->arg;
            continue;
        }
        case I_ASSERT:
            if (!assertion_holds(m, in->arg, pos)) goto fail;
            pc++;
            continue;
        case I_SUCCEED:
        case I_MATCH:
            *end = pos;
            sc->top = base;
            sc->n_marks = marks_base;
            return 1;
        }
    fail:
        if (sc->steps_left-- == 0) return REGEX_TOO_SLOW;
        for (;;) {
            if (sc->top == base) {
                sc->n_marks = marks_base;
                return 0;
            }
            Backtrack *b = &sc->stack[sc->top - 1];
            if (b->kind == BT_ALT) {
                pc = b->pc;
                pos = b->pos;
                sc->top--;
                break;
            }
            if (b->kind == BT_REGISTER) {
                sc->registers[b->base] = b->pos;
                sc->top--;
                continue;
            }
            if (b->kind == BT_GREEDY) { /* give back one more character */
                b->count--;
                pos = sc->marks[b->base + (size_t)b->count];
                pc = b->pc;
                if (b->count == 0) {
                    sc->n_marks = b->base;
                    sc->top--;
                }
                break;
            }
            /* BT_LAZY: take one more character */
            const Inst *run_in = &prog[b->pc];
            if ((b->limit != UNBOUNDED && b->count >= b->limit) ||
                !test_char(m, run_in->test, run_in->fold, run_in->arg, b->pos, &len)) {
                sc->top--;
                continue;
            }
            b->pos += (size_t)len;
            b->count++;
            pos = b->pos;
            pc = b->pc + 1;
            break;
        }
    }
}

int regex_search(const Regex *re, RegexScratch *sc, const unsigned char *s, size_t n, size_t from, size_t *start,
                 size_t *end) {
    if (sc->n_registers < re->n_registers) {
        size_t *r = realloc(sc->registers, (size_t)re->n_registers * sizeof *r);
        if (!r) return -1;
        sc->registers = r;
        sc->n_registers = re->n_registers;
    }
    Match m = {re, sc, s, n};
    sc->steps_left = (n - from + 1) * (size_t)REGEX_STEPS_PER_BYTE;
    for (size_t at = from;;) {
        int r = run(&m, 0, at, end);
        if (r != 0) {
            *start = at;
            return r;
        }
        if (at >= n) return 0;
        uint32_t cp;
        at += (size_t)utf8_decode(s + at, n - at, &cp);
    }
}

int regex_next_match(const Regex *re, RegexScratch *sc, const unsigned char *s, size_t n, RegexIterator *it,
                     size_t *start, size_t *end) {
    while (it->at <= n) {
        int r = regex_search(re, sc, s, n, it->at, start, end);
        if (r <= 0) return r;
        if (*start == *end && it->has_last && *end == it->last_end) { /* no empty match right after a match */
            uint32_t cp;
            it->at += it->at < n ? (size_t)utf8_decode(s + it->at, n - it->at, &cp) : 1;
            continue;
        }
        it->at = it->last_end = *end;
        it->has_last = 1;
        return 1;
    }
    return 0;
}
