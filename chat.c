/* chat.c - chat templates: the Jinja subset Hugging Face chat templates are written in, interpreted the way
 * jinja2 runs them inside transformers' apply_chat_template (docs/CHAT.md lists the subset).
 *
 * A template is lexed (with jinja2's whitespace rules: "-" trims, trim_blocks drops the newline after a block
 * tag, lstrip_blocks drops the indentation before one), parsed into a tree of statements and expressions, and
 * run against the conversation. Values follow Python: strings, integers, floats, booleans, None, lists,
 * dicts, jinja2's namespace() and Undefined. Everything one render allocates lives in an arena freed at the
 * end; an error anywhere (a construct outside the subset, raise_exception, a limit) jumps out with one line. */
#include "chat.h"

#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "unicode.h"

/* limits: far beyond any real chat template, small enough that a hostile one cannot exhaust the machine */
#define MAX_TEMPLATE_BYTES (1 << 20)
#define MAX_VARIABLE_BYTES (1 << 16)
#define MAX_ARENA_BYTES ((size_t)256 << 20)
#define MAX_STEPS 2000000L   /* expression evaluations and statements run (a long conversation through a
                                    * template with tools: tens of thousands) */
#define MAX_DEPTH 200        /* nesting of parsed constructs and of JSON values */
#define MAX_RUN_DEPTH 600    /* nesting of evaluations at run time (macros that call macros) */
#define MAX_RANGE 1000000

/* ---------------------------------------------------------------------------------------------
 * the arena and the interpreter's state */

typedef struct Chunk {
    struct Chunk *next;
    size_t used, size;
    max_align_t data[];
} Chunk;

typedef struct Node Node;
typedef struct Value Value;
typedef struct Dict Dict;

typedef struct Scope {
    Dict *vars;
    struct Scope *parent;
} Scope;

typedef struct {
    char *p;
    size_t n, cap;
} Buf;

typedef struct {
    int kind, line;
    const char *text; /* names, operators, data, decoded string literals */
    size_t len;
    long long i;
    double f;
} Token;

typedef struct {
    Chunk *chunks;
    size_t allocated;
    jmp_buf fail_jump;
    char *err;
    size_t errlen;
    long steps;
    int depth, run_depth; /* parsing nesting; evaluation nesting */
    Token *tokens;
    int n_tokens, pos; /* parser cursor */
    Scope *root, *scope;
    Buf *out;
} Interp;

static void fail(Interp *I, int line, const char *fmt, ...) __attribute__((noreturn, format(printf, 3, 4)));
static void fail(Interp *I, int line, const char *fmt, ...) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (line > 0) snprintf(I->err, I->errlen, "chat template line %d: %s", line, msg);
    else snprintf(I->err, I->errlen, "chat template: %s", msg);
    for (char *p = I->err; *p; p++) /* one line, whatever the template's text held */
        if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '?';
    longjmp(I->fail_jump, 1);
}

static void *alloc(Interp *I, size_t n) {
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    Chunk *c = I->chunks;
    if (!c || c->size - c->used < n) {
        size_t size = n > 65536 ? n : 65536;
        if (I->allocated + size > MAX_ARENA_BYTES) fail(I, 0, "the template needs more than %zu MiB", MAX_ARENA_BYTES >> 20);
        c = malloc(sizeof *c + size);
        if (!c) fail(I, 0, "out of memory");
        c->next = I->chunks, c->used = 0, c->size = size;
        I->chunks = c;
        I->allocated += size;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    memset(p, 0, n);
    return p;
}

static void arena_free(Interp *I) {
    while (I->chunks) {
        Chunk *next = I->chunks->next;
        free(I->chunks);
        I->chunks = next;
    }
}

static void buf_put(Interp *I, Buf *b, const char *s, size_t n) {
    if (n > MAX_ARENA_BYTES || b->n > MAX_ARENA_BYTES) fail(I, 0, "the template builds a text of more than %zu MiB", MAX_ARENA_BYTES >> 20);
    if (b->cap - b->n < n + 1) { /* the old storage stays in the arena: at most as much again as the final size */
        size_t cap = (b->cap + n + 1) * 2;
        char *p = alloc(I, cap);
        if (b->n) memcpy(p, b->p, b->n);
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}
static void buf_str(Interp *I, Buf *b, const char *s) { buf_put(I, b, s, strlen(s)); }

static void step(Interp *I, int line) {
    if (++I->steps > MAX_STEPS) fail(I, line, "the template runs too long (more than %ld steps)", MAX_STEPS);
}

/* ---------------------------------------------------------------------------------------------
 * values, as in Python */

enum { V_UNDEFINED, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STRING, V_LIST, V_DICT, V_NAMESPACE, V_BUILTIN, V_MACRO, V_METHOD };

typedef struct {
    Value *items;
    int n, cap;
    int is_tuple;
} List;

struct Value {
    int kind;
    union {
        long long i; /* V_BOOL, V_INT; V_BUILTIN: which */
        double f;
        struct {
            const char *s; /* V_STRING: s[0..n); V_UNDEFINED: the name that was looked up (or NULL) */
            size_t n;
        };
        List *list;
        Dict *dict; /* V_DICT, V_NAMESPACE */
        const Node *macro;
        struct {
            Value *self; /* V_METHOD: the object the method belongs to, and which method */
            int which;
        } m;
    };
};

struct Dict {
    Value *keys, *vals;
    int n, cap;
};

static Value undefined(const char *name) {
    Value v = {.kind = V_UNDEFINED};
    v.s = name;
    return v;
}
static Value none(void) { return (Value){.kind = V_NONE}; }
static Value boolean(int b) {
    Value v = {.kind = V_BOOL};
    v.i = !!b;
    return v;
}
static Value integer(long long i) {
    Value v = {.kind = V_INT};
    v.i = i;
    return v;
}
static Value floating(double f) {
    Value v = {.kind = V_FLOAT};
    v.f = f;
    return v;
}
static Value string(const char *s, size_t n) {
    Value v = {.kind = V_STRING};
    v.s = s, v.n = n;
    return v;
}
static Value string_copy(Interp *I, const char *s, size_t n) {
    char *p = alloc(I, n + 1);
    memcpy(p, s, n);
    return string(p, n);
}
static Value cstring(const char *s) { return string(s, strlen(s)); }
static Value buf_value(Buf *b) { return string(b->p ? b->p : "", b->n); }

static List *list_new(Interp *I) { return alloc(I, sizeof(List)); }
static void list_push(Interp *I, List *l, Value v) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 8;
        Value *items = alloc(I, (size_t)cap * sizeof *items);
        if (l->n) memcpy(items, l->items, (size_t)l->n * sizeof *items);
        l->items = items, l->cap = cap;
    }
    l->items[l->n++] = v;
}
static Value list_value(List *l) {
    Value v = {.kind = V_LIST};
    v.list = l;
    return v;
}

static Dict *dict_new(Interp *I) { return alloc(I, sizeof(Dict)); }
static Value dict_value(Dict *d, int kind) {
    Value v = {.kind = kind};
    v.dict = d;
    return v;
}

static int values_equal(const Value *a, const Value *b);

static int dict_find(const Dict *d, const Value *key) {
    for (int i = 0; i < d->n; i++)
        if (values_equal(&d->keys[i], key)) return i;
    return -1;
}
static int dict_find_str(const Dict *d, const char *s, size_t n) {
    for (int i = 0; i < d->n; i++)
        if (d->keys[i].kind == V_STRING && d->keys[i].n == n && memcmp(d->keys[i].s, s, n) == 0) return i;
    return -1;
}
static void dict_set(Interp *I, Dict *d, Value key, Value val) {
    int i = dict_find(d, &key);
    if (i >= 0) {
        d->vals[i] = val;
        return;
    }
    if (d->n == d->cap) {
        int cap = d->cap ? 2 * d->cap : 8;
        Value *keys = alloc(I, (size_t)cap * sizeof *keys), *vals = alloc(I, (size_t)cap * sizeof *vals);
        if (d->n) memcpy(keys, d->keys, (size_t)d->n * sizeof *keys), memcpy(vals, d->vals, (size_t)d->n * sizeof *vals);
        d->keys = keys, d->vals = vals, d->cap = cap;
    }
    d->keys[d->n] = key, d->vals[d->n] = val;
    d->n++;
}
static void dict_set_str(Interp *I, Dict *d, const char *name, Value val) { dict_set(I, d, cstring(name), val); }

static int is_number(const Value *v) { return v->kind == V_INT || v->kind == V_BOOL || v->kind == V_FLOAT; }
static double number_of(const Value *v) { return v->kind == V_FLOAT ? v->f : (double)v->i; }

/* Python's truth value */
static int truthy(const Value *v) {
    switch (v->kind) {
    case V_UNDEFINED:
    case V_NONE: return 0;
    case V_BOOL:
    case V_INT: return v->i != 0;
    case V_FLOAT: return v->f != 0.0;
    case V_STRING: return v->n > 0;
    case V_LIST: return v->list->n > 0;
    case V_DICT: return v->dict->n > 0;
    default: return 1;
    }
}

/* ==: numbers by value, strings by bytes, lists and dicts item by item; Undefined equals Undefined */
static int values_equal(const Value *a, const Value *b) {
    if (is_number(a) && is_number(b)) {
        if (a->kind != V_FLOAT && b->kind != V_FLOAT) return a->i == b->i;
        return number_of(a) == number_of(b);
    }
    if (a->kind != b->kind) return 0;
    switch (a->kind) {
    case V_UNDEFINED:
    case V_NONE: return 1;
    case V_STRING: return a->n == b->n && memcmp(a->s, b->s, a->n) == 0;
    case V_LIST:
        if (a->list->n != b->list->n || a->list->is_tuple != b->list->is_tuple) return 0;
        for (int i = 0; i < a->list->n; i++)
            if (!values_equal(&a->list->items[i], &b->list->items[i])) return 0;
        return 1;
    case V_DICT:
        if (a->dict->n != b->dict->n) return 0;
        for (int i = 0; i < a->dict->n; i++) {
            int j = dict_find(b->dict, &a->dict->keys[i]);
            if (j < 0 || !values_equal(&a->dict->vals[i], &b->dict->vals[j])) return 0;
        }
        return 1;
    case V_NAMESPACE: return a->dict == b->dict;
    case V_BUILTIN: return a->i == b->i;
    case V_MACRO: return a->macro == b->macro;
    default: return 0;
    }
}

static const char *kind_name(const Value *v) {
    static const char *names[] = {"Undefined", "NoneType", "bool", "int", "float", "str", "list", "dict",
                                  "Namespace", "function", "macro", "method"};
    return v->kind == V_LIST && v->list->is_tuple ? "tuple" : names[v->kind];
}

/* ---------------------------------------------------------------------------------------------
 * text: UTF-8 code points (Python strings count and index characters), Python's whitespace */

/* Python's str.isspace() (and the \s of its re module): Unicode White_Space plus the separators \x1c-\x1f */
static int py_space(uint32_t c) {
    if (c < 128) return c == ' ' || (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x1f);
    return unicode_in(&unicode_space, c);
}

static uint32_t char_at(const char *s, size_t n, size_t i, int *len) {
    uint32_t c;
    *len = utf8_decode((const unsigned char *)s + i, n - i, &c);
    return c;
}

static size_t n_chars(const char *s, size_t n) {
    size_t count = 0;
    for (size_t i = 0; i < n; count++) {
        int len;
        char_at(s, n, i, &len);
        i += (size_t)len;
    }
    return count;
}

/* byte offset of character k (k <= number of characters) */
static size_t char_offset(const char *s, size_t n, size_t k) {
    size_t i = 0;
    while (k-- > 0 && i < n) {
        int len;
        char_at(s, n, i, &len);
        i += (size_t)len;
    }
    return i;
}

/* Whether the character c (bytes at p, len long) is one strip() removes: whitespace, or one of chars */
static int strippable(uint32_t c, const char *p, int len, const Value *chars) {
    if (!chars) return py_space(c);
    for (size_t k = 0; k < chars->n;) {
        int l2;
        uint32_t d = char_at(chars->s, chars->n, k, &l2);
        if (d == c && (c != 0xFFFD || (l2 == len && memcmp(p, chars->s + k, (size_t)len) == 0))) return 1;
        k += (size_t)l2;
    }
    return 0;
}

/* s.strip(chars) / lstrip / rstrip: chars NULL means whitespace */
static Value strip(const Value *s, const Value *chars, int left, int right) {
    const char *p = s->s;
    size_t a = 0, b = s->n;
    while (left && a < b) {
        int len;
        uint32_t c = char_at(p, b, a, &len);
        if (!strippable(c, p + a, len, chars)) break;
        a += (size_t)len;
    }
    while (right && b > a) {
        size_t start = b - 1; /* back to the lead byte of the last character */
        while (start > a && ((unsigned char)p[start] & 0xC0) == 0x80 && b - start < 4) start--;
        int len;
        uint32_t c = char_at(p, b, start, &len);
        if (start + (size_t)len != b) start = b - 1, c = char_at(p, b, start, &len); /* not one character */
        if (!strippable(c, p + start, len, chars)) break;
        b = start;
    }
    return string(p + a, b - a);
}

static const char *find_bytes(const char *h, size_t hn, const char *needle, size_t nn) {
    if (nn == 0) return h;
    for (size_t i = 0; i + nn <= hn; i++)
        if (h[i] == needle[0] && memcmp(h + i, needle, nn) == 0) return h + i;
    return NULL;
}

static Value case_mapped(Interp *I, const Value *s, int mode) { /* 0 lower, 1 upper, 2 capitalize, 3 str.title() */
    char *p = alloc(I, s->n + 1);
    int word_start = 1;
    for (size_t i = 0; i < s->n; i++) {
        char c = s->s[i];
        int up = mode == 1 || (mode == 2 && i == 0) || (mode == 3 && word_start);
        if (c >= 'a' && c <= 'z' && up) c = (char)(c - 32);
        else if (c >= 'A' && c <= 'Z' && !up) c = (char)(c + 32);
        word_start = !((c | 32) >= 'a' && (c | 32) <= 'z');
        p[i] = c;
    }
    return string(p, s->n);
}

/* ---------------------------------------------------------------------------------------------
 * printing values: str(), repr() and json.dumps as transformers' tojson calls it */

/* Python's repr of a float: the shortest digits that read back the same, positional between 1e-4 and 1e16 */
static void format_float(double x, char *out, size_t size) {
    if (isnan(x)) {
        snprintf(out, size, "nan");
        return;
    }
    if (isinf(x)) {
        snprintf(out, size, x < 0 ? "-inf" : "inf");
        return;
    }
    char digits[40];
    int prec = 1;
    for (; prec < 17; prec++) {
        snprintf(digits, sizeof digits, "%.*e", prec - 1, x);
        if (strtod(digits, NULL) == x) break;
    }
    snprintf(digits, sizeof digits, "%.*e", prec - 1, x);
    int exponent = atoi(strchr(digits, 'e') + 1);
    if (exponent < -4 || exponent >= 16) {
        char *e = strchr(digits, 'e');
        *e = '\0';
        snprintf(out, size, "%se%c%02d", digits, exponent < 0 ? '-' : '+', abs(exponent));
        return;
    }
    int decimals = prec - 1 - exponent;
    snprintf(out, size, "%.*f", decimals > 0 ? decimals : 0, x);
    if (!strchr(out, '.')) strncat(out, ".0", size - strlen(out) - 1);
}

static void put_repr(Interp *I, Buf *b, const Value *v);

static void put_str(Interp *I, Buf *b, const Value *v) {
    char num[64];
    switch (v->kind) {
    case V_UNDEFINED: return;
    case V_NONE: buf_str(I, b, "None"); return;
    case V_BOOL: buf_str(I, b, v->i ? "True" : "False"); return;
    case V_INT: snprintf(num, sizeof num, "%lld", v->i), buf_str(I, b, num); return;
    case V_FLOAT: format_float(v->f, num, sizeof num), buf_str(I, b, num); return;
    case V_STRING: buf_put(I, b, v->s, v->n); return;
    case V_LIST: {
        buf_str(I, b, v->list->is_tuple ? "(" : "[");
        for (int i = 0; i < v->list->n; i++) {
            if (i) buf_str(I, b, ", ");
            put_repr(I, b, &v->list->items[i]);
        }
        buf_str(I, b, v->list->is_tuple ? (v->list->n == 1 ? ",)" : ")") : "]");
        return;
    }
    case V_DICT:
    case V_NAMESPACE:
        buf_str(I, b, v->kind == V_NAMESPACE ? "<Namespace {" : "{");
        for (int i = 0; i < v->dict->n; i++) {
            if (i) buf_str(I, b, ", ");
            put_repr(I, b, &v->dict->keys[i]);
            buf_str(I, b, ": ");
            put_repr(I, b, &v->dict->vals[i]);
        }
        buf_str(I, b, v->kind == V_NAMESPACE ? "}>" : "}");
        return;
    default: buf_str(I, b, "<function>"); return;
    }
}

/* repr(str): single quotes unless the text holds one and no double quote; control characters escaped */
static void put_repr(Interp *I, Buf *b, const Value *v) {
    if (v->kind != V_STRING) {
        put_str(I, b, v);
        return;
    }
    int has_single = memchr(v->s, '\'', v->n) != NULL, has_double = memchr(v->s, '"', v->n) != NULL;
    char quote = has_single && !has_double ? '"' : '\'';
    buf_put(I, b, &quote, 1);
    for (size_t i = 0; i < v->n; i++) {
        unsigned char c = (unsigned char)v->s[i];
        char esc[8];
        if (c == '\\' || c == (unsigned char)quote) snprintf(esc, sizeof esc, "\\%c", c);
        else if (c == '\n') strcpy(esc, "\\n");
        else if (c == '\r') strcpy(esc, "\\r");
        else if (c == '\t') strcpy(esc, "\\t");
        else if (c < 0x20 || c == 0x7f) snprintf(esc, sizeof esc, "\\x%02x", c);
        else {
            buf_put(I, b, (const char *)&c, 1);
            continue;
        }
        buf_str(I, b, esc);
    }
    buf_put(I, b, &quote, 1);
}

static Value str_of(Interp *I, const Value *v) {
    if (v->kind == V_STRING) return *v;
    Buf b = {0};
    put_str(I, &b, v);
    return buf_value(&b);
}

static void put_json_string(Interp *I, Buf *b, const char *s, size_t n, int ascii) {
    buf_str(I, b, "\"");
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        char esc[16];
        if (c == '"' || c == '\\') snprintf(esc, sizeof esc, "\\%c", c);
        else if (c == '\n') strcpy(esc, "\\n");
        else if (c == '\r') strcpy(esc, "\\r");
        else if (c == '\t') strcpy(esc, "\\t");
        else if (c == '\b') strcpy(esc, "\\b");
        else if (c == '\f') strcpy(esc, "\\f");
        else if (c < 0x20) snprintf(esc, sizeof esc, "\\u%04x", c);
        else if (c >= 0x80 && ascii) {
            int len;
            uint32_t cp = char_at(s, n, i, &len);
            if (cp >= 0x10000) {
                cp -= 0x10000;
                snprintf(esc, sizeof esc, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", cp);
            }
            buf_str(I, b, esc);
            i += (size_t)len;
            continue;
        } else {
            buf_put(I, b, s + i, 1);
            i++;
            continue;
        }
        buf_str(I, b, esc);
        i++;
    }
    buf_str(I, b, "\"");
}

/* json.dumps(v, ensure_ascii=ascii, indent=indent, sort_keys=sort): ", " and ": " between items without an
 * indent, "," and a new line with one */
static void put_json(Interp *I, Buf *b, const Value *v, int indent, int level, int ascii, int sort, int line) {
    char num[64];
    if (level > MAX_DEPTH) fail(I, line, "tojson: the value nests too deeply");
    switch (v->kind) {
    case V_NONE: buf_str(I, b, "null"); return;
    case V_BOOL: buf_str(I, b, v->i ? "true" : "false"); return;
    case V_INT: snprintf(num, sizeof num, "%lld", v->i), buf_str(I, b, num); return;
    case V_FLOAT:
        if (isnan(v->f)) buf_str(I, b, "NaN");
        else if (isinf(v->f)) buf_str(I, b, v->f < 0 ? "-Infinity" : "Infinity");
        else format_float(v->f, num, sizeof num), buf_str(I, b, num);
        return;
    case V_STRING: put_json_string(I, b, v->s, v->n, ascii); return;
    case V_LIST:
    case V_DICT:
    case V_NAMESPACE: {
        int is_list = v->kind == V_LIST, n = is_list ? v->list->n : v->dict->n;
        buf_str(I, b, is_list ? "[" : "{");
        if (n == 0) {
            buf_str(I, b, is_list ? "]" : "}");
            return;
        }
        int *order = alloc(I, (size_t)n * sizeof *order);
        for (int i = 0; i < n; i++) order[i] = i;
        if (!is_list && sort) /* insertion sort by key (keys are strings in every JSON a template makes) */
            for (int i = 1; i < n; i++)
                for (int j = i; j > 0; j--) {
                    const Value *x = &v->dict->keys[order[j - 1]], *y = &v->dict->keys[order[j]];
                    size_t m = x->n < y->n ? x->n : y->n;
                    int c = x->kind == V_STRING && y->kind == V_STRING ? memcmp(x->s, y->s, m) : 0;
                    if (c > 0 || (c == 0 && x->n > y->n)) {
                        int t = order[j];
                        order[j] = order[j - 1], order[j - 1] = t;
                    } else {
                        break;
                    }
                }
        for (int k = 0; k < n; k++) {
            if (k) buf_str(I, b, indent >= 0 ? "," : ", ");
            if (indent >= 0) {
                buf_str(I, b, "\n");
                for (int s = 0; s < indent * (level + 1); s++) buf_str(I, b, " ");
            }
            if (is_list) {
                put_json(I, b, &v->list->items[order[k]], indent, level + 1, ascii, sort, line);
            } else {
                const Value *key = &v->dict->keys[order[k]];
                if (key->kind == V_STRING) put_json_string(I, b, key->s, key->n, ascii);
                else {
                    Buf kb = {0};
                    put_json(I, &kb, key, -1, level + 1, ascii, sort, line);
                    if (key->kind == V_NONE || key->kind == V_BOOL || is_number(key)) put_json_string(I, b, kb.p, kb.n, ascii);
                    else fail(I, line, "tojson: keys must be str, int, float, bool or None, not %s", kind_name(key));
                }
                buf_str(I, b, ": ");
                put_json(I, b, &v->dict->vals[order[k]], indent, level + 1, ascii, sort, line);
            }
        }
        if (indent >= 0) {
            buf_str(I, b, "\n");
            for (int s = 0; s < indent * level; s++) buf_str(I, b, " ");
        }
        buf_str(I, b, is_list ? "]" : "}");
        return;
    }
    default: fail(I, line, "tojson: Object of type %s is not JSON serializable", kind_name(v));
    }
}

/* ---------------------------------------------------------------------------------------------
 * lexing, with jinja2's whitespace control (trim_blocks and lstrip_blocks on, as transformers sets them) */

enum { T_EOF, T_DATA, T_VAR_BEGIN, T_VAR_END, T_BLOCK_BEGIN, T_BLOCK_END, T_NAME, T_STRING, T_INT, T_FLOAT, T_OP };

static void add_token(Interp *I, int *cap, Token t) {
    if (I->n_tokens == *cap) {
        int n = *cap ? 2 * *cap : 256;
        Token *tokens = alloc(I, (size_t)n * sizeof *tokens);
        if (I->n_tokens) memcpy(tokens, I->tokens, (size_t)I->n_tokens * sizeof *tokens);
        I->tokens = tokens, *cap = n;
    }
    I->tokens[I->n_tokens++] = t;
}

static size_t skip_py_space(const char *s, size_t n, size_t i) {
    while (i < n) {
        int len;
        uint32_t c = char_at(s, n, i, &len);
        if (!py_space(c)) break;
        i += (size_t)len;
    }
    return i;
}

/* length of text after removing trailing whitespace (Python's str.rstrip()) */
static size_t rstrip_len(const char *s, size_t n) {
    Value v = strip(&(Value){.kind = V_STRING, .s = s, .n = n}, NULL, 0, 1);
    return v.n;
}

static int count_lines(const char *s, size_t n) {
    int k = 0;
    for (size_t i = 0; i < n; i++) k += s[i] == '\n';
    return k;
}

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if ((c | 32) >= 'a' && (c | 32) <= 'f') return (c | 32) - 'a' + 10;
    return -1;
}

static void put_code_point(Interp *I, Buf *b, uint32_t cp) {
    char u[4];
    int n;
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD; /* a lone surrogate cannot be written as UTF-8 */
    if (cp < 0x80) u[0] = (char)cp, n = 1;
    else if (cp < 0x800) u[0] = (char)(0xC0 | cp >> 6), u[1] = (char)(0x80 | (cp & 63)), n = 2;
    else if (cp < 0x10000) u[0] = (char)(0xE0 | cp >> 12), u[1] = (char)(0x80 | ((cp >> 6) & 63)), u[2] = (char)(0x80 | (cp & 63)), n = 3;
    else u[0] = (char)(0xF0 | cp >> 18), u[1] = (char)(0x80 | ((cp >> 12) & 63)), u[2] = (char)(0x80 | ((cp >> 6) & 63)), u[3] = (char)(0x80 | (cp & 63)), n = 4;
    buf_put(I, b, u, (size_t)n);
}

/* A string literal's value: Python's unicode-escape rules (\n \t \\ \' \" \xNN \uNNNN \UNNNNNNNN, octal;
 * a backslash before anything else stays) */
static Value decode_string(Interp *I, const char *s, size_t n, int line) {
    Buf b = {0};
    buf_put(I, &b, "", 0);
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '\\' || i + 1 == n) {
            buf_put(I, &b, s + i, 1);
            continue;
        }
        char c = s[++i];
        const char *simple = strchr("nrtabfv\\'\"\n", c);
        if (c && simple) {
            static const char out[] = "\n\r\t\a\b\f\v\\'\"";
            if (c != '\n') buf_put(I, &b, out + (simple - "nrtabfv\\'\"\n"), 1); /* backslash-newline: nothing */
        } else if (c == 'x' || c == 'u' || c == 'U') {
            int digits = c == 'x' ? 2 : c == 'u' ? 4 : 8;
            uint32_t cp = 0;
            for (int k = 0; k < digits; k++) {
                int h = i + 1 + (size_t)k < n ? hex_value(s[i + 1 + k]) : -1;
                if (h < 0) fail(I, line, "a \\%c escape in a string needs %d hex digits", c, digits);
                cp = cp * 16 + (uint32_t)h;
            }
            if (cp > 0x10FFFF) fail(I, line, "\\U escape beyond U+10FFFF in a string");
            put_code_point(I, &b, cp);
            i += (size_t)digits;
        } else if (c >= '0' && c <= '7') {
            uint32_t cp = 0;
            int k = 0;
            while (k < 3 && i < n && s[i] >= '0' && s[i] <= '7') cp = cp * 8 + (uint32_t)(s[i++] - '0'), k++;
            i--;
            put_code_point(I, &b, cp);
        } else if (c == 'N') {
            fail(I, line, "\\N{...} escapes are not in attn.c's Jinja subset");
        } else {
            buf_put(I, &b, s + i - 1, 2);
        }
    }
    return buf_value(&b);
}

static const char *const OPERATORS[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[", "]",
                                        "(", ")", "{", "}", ">", "<", "=", ".", ":", "|", ",", ";"};

/* One token inside {{ }} or {% %} at src[i]; returns where it ends. */
static size_t lex_one(Interp *I, const char *src, size_t n, size_t i, int line, Token *t) {
    char c = src[i];
    t->line = line;
    if (c >= '0' && c <= '9') {
        size_t j = i;
        int is_float = 0;
        if (c == '0' && i + 1 < n && strchr("xXoObB", src[i + 1])) {
            int base = (src[i + 1] | 32) == 'x' ? 16 : (src[i + 1] | 32) == 'o' ? 8 : 2;
            j = i + 2;
            long long v = 0;
            while (j < n && (src[j] == '_' || (hex_value(src[j]) >= 0 && hex_value(src[j]) < base))) {
                if (src[j] != '_') {
                    if (v > (LLONG_MAX - hex_value(src[j])) / base) fail(I, line, "integer literal too large");
                    v = v * base + hex_value(src[j]);
                }
                j++;
            }
            t->kind = T_INT, t->i = v;
            return j;
        }
        while (j < n && ((src[j] >= '0' && src[j] <= '9') || src[j] == '_')) j++;
        if (j + 1 < n && src[j] == '.' && src[j + 1] >= '0' && src[j + 1] <= '9') {
            is_float = 1;
            for (j++; j < n && ((src[j] >= '0' && src[j] <= '9') || src[j] == '_'); j++) {}
        }
        if (j < n && (src[j] | 32) == 'e') {
            size_t k = j + 1;
            if (k < n && (src[k] == '+' || src[k] == '-')) k++;
            if (k < n && src[k] >= '0' && src[k] <= '9') {
                is_float = 1;
                for (j = k; j < n && ((src[j] >= '0' && src[j] <= '9') || src[j] == '_'); j++) {}
            }
        }
        char digits[64];
        size_t m = 0;
        for (size_t k = i; k < j && m < sizeof digits - 1; k++)
            if (src[k] != '_') digits[m++] = src[k];
        digits[m] = '\0';
        if (is_float) t->kind = T_FLOAT, t->f = strtod(digits, NULL);
        else {
            char *end;
            unsigned long long v = strtoull(digits, &end, 10);
            if (m >= sizeof digits - 1 || v > LLONG_MAX) fail(I, line, "integer literal too large");
            t->kind = T_INT, t->i = (long long)v;
        }
        return j;
    }
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
        size_t j = i;
        while (j < n && ((src[j] | 32) >= 'a' && (src[j] | 32) <= 'z' ? 1 : (src[j] >= '0' && src[j] <= '9') || src[j] == '_'))
            j++;
        t->kind = T_NAME, t->text = src + i, t->len = j - i;
        return j;
    }
    if (c == '\'' || c == '"') {
        size_t j = i + 1;
        while (j < n && src[j] != c) j += src[j] == '\\' ? 2 : 1;
        if (j >= n) fail(I, line, "unterminated string");
        Value v = decode_string(I, src + i + 1, j - i - 1, line);
        t->kind = T_STRING, t->text = v.s, t->len = v.n;
        return j + 1;
    }
    for (size_t k = 0; k < sizeof OPERATORS / sizeof *OPERATORS; k++) {
        size_t len = strlen(OPERATORS[k]);
        if (i + len <= n && memcmp(src + i, OPERATORS[k], len) == 0) {
            t->kind = T_OP, t->text = OPERATORS[k], t->len = len;
            return i + len;
        }
    }
    fail(I, line, "unexpected character '%c'", c);
}

/* The end of a tag at src[i] ("%}", "-%}", "+%}" / "}}", "-}}"), or 0. trim_blocks: "%}" eats one newline. */
static size_t tag_end(const char *src, size_t n, size_t i, char kind) {
    char close = kind == '{' ? '}' : kind;
    if (i + 3 <= n && (src[i] == '-' || (src[i] == '+' && kind != '{')) && src[i + 1] == close && src[i + 2] == '}')
        return src[i] == '-' ? skip_py_space(src, n, i + 3) : i + 3;
    if (i + 2 <= n && src[i] == close && src[i + 1] == '}') {
        size_t end = i + 2;
        if (kind != '{' && end < n && src[end] == '\n') end++;
        return end;
    }
    return 0;
}

static void lex(Interp *I, const char *src, size_t n) {
    int cap = 0, line = 1, line_starting = 1;
    size_t pos = 0;
    while (pos < n) {
        size_t tag = pos;
        while (tag + 1 < n && !(src[tag] == '{' && strchr("{%#", src[tag + 1]))) tag++;
        if (tag + 1 >= n) tag = n;
        char kind = tag < n ? src[tag + 1] : 0, sign = tag + 2 < n && (src[tag + 2] == '-' || src[tag + 2] == '+') ? src[tag + 2] : 0;
        size_t text_end = tag;
        if (sign == '-') {
            text_end = pos + rstrip_len(src + pos, tag - pos);
        } else if (sign != '+' && (kind == '%' || kind == '#')) { /* lstrip_blocks */
            size_t line_start = tag;
            while (line_start > pos && src[line_start - 1] != '\n') line_start--;
            if ((line_start > pos || line_starting) && line_start < tag && skip_py_space(src, tag, line_start) == tag)
                text_end = line_start;
        }
        if (text_end > pos) add_token(I, &cap, (Token){T_DATA, line, src + pos, text_end - pos, 0, 0});
        line += count_lines(src + pos, tag - pos);
        if (tag == n) break;
        size_t i = tag + 2 + (sign != 0), end = 0, counted = tag;
#define ADVANCE_LINE(to) (line += count_lines(src + counted, (to) - counted), counted = (to))
        if (kind == '#') {
            while (i < n && !(end = tag_end(src, n, i, '#'))) i++;
            if (!end) fail(I, line, "missing end of comment tag");
        } else {
            add_token(I, &cap, (Token){kind == '{' ? T_VAR_BEGIN : T_BLOCK_BEGIN, line, NULL, 0, 0, 0});
            int depth = 0;
            for (;;) {
                if (depth == 0 && (end = tag_end(src, n, i, kind))) break;
                if (i >= n) fail(I, line, "missing end of %s tag", kind == '{' ? "variable" : "block");
                size_t after = skip_py_space(src, n, i);
                if (after > i) {
                    i = after;
                    continue;
                }
                Token t = {0};
                ADVANCE_LINE(i);
                i = lex_one(I, src, n, i, line, &t);
                if (t.kind == T_OP && strchr("([{", t.text[0])) depth++;
                if (t.kind == T_OP && strchr(")]}", t.text[0]) && --depth < 0) fail(I, line, "unexpected '%s'", t.text);
                add_token(I, &cap, t);
            }
            ADVANCE_LINE(i);
            add_token(I, &cap, (Token){kind == '{' ? T_VAR_END : T_BLOCK_END, line, NULL, 0, 0, 0});
        }
        ADVANCE_LINE(end);
#undef ADVANCE_LINE
        line_starting = src[end - 1] == '\n';
        pos = end;
    }
    add_token(I, &cap, (Token){T_EOF, line, NULL, 0, 0, 0});
}

/* ---------------------------------------------------------------------------------------------
 * parsing: jinja2's grammar, precedence from loosest to tightest:
 *   a if c else b | or | and | not | == != < > <= >= in, not in | + - | ~ | * / // % | ** | unary - + |
 *   postfix: .attr [key] (args) | filter, is test */

enum {
    /* statements */
    S_BODY, S_TEXT, S_OUTPUT, S_IF, S_FOR, S_SET, S_SET_BLOCK, S_MACRO, S_BREAK, S_CONTINUE,
    /* expressions */
    E_CONST, E_NAME, E_ATTR, E_ITEM, E_SLICE, E_CALL, E_FILTER, E_TEST, E_NOT, E_NEG, E_POS, E_BINARY, E_AND, E_OR,
    E_COMPARE, E_CONDITIONAL, E_LIST, E_TUPLE, E_DICT, E_CONCAT, E_KEYWORD
};

struct Node {
    int kind, line;
    const char *op;   /* E_BINARY, E_COMPARE operands: the operator; E_TEST: "not" when negated */
    const char *name; /* names, attributes, filters, tests, keywords, macros */
    size_t name_len;
    Value value;      /* E_CONST, S_TEXT */
    Node *a, *b, *c, *d;
    Node **kids;
    int n_kids;
};

static Node *node(Interp *I, int kind, int line) {
    Node *n = alloc(I, sizeof *n);
    n->kind = kind, n->line = line;
    return n;
}

static void add_kid(Interp *I, Node *n, Node *kid) {
    if ((n->n_kids & (n->n_kids - 1)) == 0) { /* a power of two (or 0): grow */
        Node **kids = alloc(I, (size_t)(n->n_kids ? 2 * n->n_kids : 1) * sizeof *kids);
        if (n->n_kids) memcpy(kids, n->kids, (size_t)n->n_kids * sizeof *kids);
        n->kids = kids;
    }
    n->kids[n->n_kids++] = kid;
}

static Token *peek(Interp *I) { return &I->tokens[I->pos]; }
static Token *peek2(Interp *I) { return &I->tokens[I->pos + 1 < I->n_tokens ? I->pos + 1 : I->pos]; }
static Token *next_token(Interp *I) {
    Token *t = &I->tokens[I->pos];
    if (t->kind != T_EOF) I->pos++;
    return t;
}
static int is_op(const Token *t, const char *op) { return t->kind == T_OP && t->len == strlen(op) && memcmp(t->text, op, t->len) == 0; }
static int is_name(const Token *t, const char *name) {
    return t->kind == T_NAME && t->len == strlen(name) && memcmp(t->text, name, t->len) == 0;
}

static const char *describe(const Token *t, char *buf, size_t size) {
    switch (t->kind) {
    case T_EOF: return "the end of the template";
    case T_DATA: return "text";
    case T_VAR_BEGIN: return "'{{'";
    case T_VAR_END: return "'}}'";
    case T_BLOCK_BEGIN: return "'{%'";
    case T_BLOCK_END: return "'%}'";
    case T_STRING: return "a string";
    case T_INT:
    case T_FLOAT: return "a number";
    default: snprintf(buf, size, "'%.*s'", (int)(t->len < 40 ? t->len : 40), t->text); return buf;
    }
}

static void expect_op(Interp *I, const char *op) {
    Token *t = next_token(I);
    char buf[64];
    if (!is_op(t, op)) fail(I, t->line, "expected '%s', found %s", op, describe(t, buf, sizeof buf));
}
static void expect_kind(Interp *I, int kind, const char *what) {
    Token *t = next_token(I);
    char buf[64];
    if (t->kind != kind) fail(I, t->line, "expected %s, found %s", what, describe(t, buf, sizeof buf));
}
static Token *expect_name(Interp *I) {
    Token *t = next_token(I);
    char buf[64];
    if (t->kind != T_NAME) fail(I, t->line, "expected a name, found %s", describe(t, buf, sizeof buf));
    return t;
}

static void enter(Interp *I, int line) {
    if (++I->depth > MAX_DEPTH) fail(I, line, "the template nests more than %d levels deep", MAX_DEPTH);
}

static Node *parse_expression(Interp *I, int with_conditional);
static Node *parse_or(Interp *I);
static Node *parse_unary(Interp *I, int with_filter);
static Node *parse_primary(Interp *I);
static Node *parse_postfix(Interp *I, Node *n);

static const char *const FILTERS[] = {"trim", "length", "count", "tojson", "string", "list", "first", "last", "join",
                                      "default", "d", "upper", "lower", "title", "capitalize", "replace",
                                      "selectattr", "rejectattr", "select", "reject", "map", "items", "safe", "escape",
                                      "e", "unique", "reverse", "int", "float", "abs", "indent", "sort", "dictsort",
                                      "wordcount", "sum", "min", "max", "batch", "center", "striptags", NULL};
static const char *const TESTS[] = {"defined", "undefined", "none", "string", "number", "integer", "float", "boolean",
                                    "mapping", "iterable", "sequence", "callable", "true", "false", "equalto", "eq",
                                    "==", "ne", "!=", "lt", "<", "le", "<=", "gt", ">", "ge", ">=", "in", "odd",
                                    "even", "divisibleby", "lower", "upper", "sameas", NULL};

static int in_list(const char *const *list, const char *s, size_t n) {
    for (int i = 0; list[i]; i++)
        if (strlen(list[i]) == n && memcmp(list[i], s, n) == 0) return 1;
    return 0;
}

/* keyword or positional arguments in parentheses; a keyword argument is an E_KEYWORD node */
static void parse_call_args(Interp *I, Node *call) {
    expect_op(I, "(");
    while (!is_op(peek(I), ")")) {
        if (call->n_kids) expect_op(I, ",");
        if (is_op(peek(I), ")")) break;
        if (is_op(peek(I), "*") || is_op(peek(I), "**")) fail(I, peek(I)->line, "*args / **kwargs in calls are not in attn.c's Jinja subset");
        if (peek(I)->kind == T_NAME && is_op(peek2(I), "=")) {
            Token *name = next_token(I);
            next_token(I);
            Node *k = node(I, E_KEYWORD, name->line);
            k->name = name->text, k->name_len = name->len;
            k->a = parse_expression(I, 1);
            add_kid(I, call, k);
        } else {
            add_kid(I, call, parse_expression(I, 1));
        }
    }
    expect_op(I, ")");
}

static Node *parse_call(Interp *I, Node *callee, int line) {
    Node *call = node(I, E_CALL, line);
    call->a = callee;
    parse_call_args(I, call);
    return call;
}

static Node *parse_tuple(Interp *I, int with_conditional, int in_parentheses, const char *extra_end) {
    int line = peek(I)->line;
    Node *t = node(I, E_TUPLE, line);
    int is_tuple = 0;
    for (;;) {
        if (t->n_kids) expect_op(I, ",");
        Token *p = peek(I);
        if (p->kind == T_VAR_END || p->kind == T_BLOCK_END || is_op(p, ")") || (extra_end && is_name(p, extra_end))) break;
        add_kid(I, t, parse_expression(I, with_conditional));
        if (is_op(peek(I), ",")) is_tuple = 1;
        else break;
    }
    if (!is_tuple) {
        if (t->n_kids) return t->kids[0];
        if (!in_parentheses) {
            char buf[64];
            fail(I, line, "expected an expression, found %s", describe(peek(I), buf, sizeof buf));
        }
    }
    return t;
}

static Node *parse_primary(Interp *I) {
    Token *t = next_token(I);
    char buf[64];
    Node *n;
    enter(I, t->line);
    switch (t->kind) {
    case T_NAME:
        n = node(I, E_CONST, t->line);
        if (is_name(t, "true") || is_name(t, "True")) n->value = boolean(1);
        else if (is_name(t, "false") || is_name(t, "False")) n->value = boolean(0);
        else if (is_name(t, "none") || is_name(t, "None")) n->value = none();
        else n->kind = E_NAME, n->name = t->text, n->name_len = t->len;
        break;
    case T_STRING: { /* adjacent literals join: 'a' "b" is "ab" */
        n = node(I, E_CONST, t->line);
        Buf b = {0};
        buf_put(I, &b, t->text, t->len);
        while (peek(I)->kind == T_STRING) {
            Token *u = next_token(I);
            buf_put(I, &b, u->text, u->len);
        }
        n->value = buf_value(&b);
        break;
    }
    case T_INT: n = node(I, E_CONST, t->line), n->value = integer(t->i); break;
    case T_FLOAT: n = node(I, E_CONST, t->line), n->value = floating(t->f); break;
    case T_OP:
        if (is_op(t, "(")) {
            n = parse_tuple(I, 1, 1, NULL);
            expect_op(I, ")");
            break;
        }
        if (is_op(t, "[") || is_op(t, "{")) { /* [a, b] or {k: v, ...}, a trailing comma allowed */
            int is_dict = is_op(t, "{");
            const char *close = is_dict ? "}" : "]";
            n = node(I, is_dict ? E_DICT : E_LIST, t->line);
            while (!is_op(peek(I), close)) {
                if (n->n_kids) expect_op(I, ",");
                if (is_op(peek(I), close)) break;
                add_kid(I, n, parse_expression(I, 1));
                if (is_dict) expect_op(I, ":"), add_kid(I, n, parse_expression(I, 1));
            }
            expect_op(I, close);
            break;
        }
        /* fall through */
    default: fail(I, t->line, "unexpected %s", describe(t, buf, sizeof buf));
    }
    I->depth--;
    return n;
}

/* [key], [a:b:c] */
static Node *parse_subscript(Interp *I, Node *target, int line) {
    Node *parts[3] = {NULL, NULL, NULL};
    int k = 0, is_slice = 0;
    for (;;) {
        if (is_op(peek(I), ":")) {
            next_token(I);
            is_slice = 1;
            if (++k > 2) fail(I, line, "a slice has at most three parts");
            continue;
        }
        if (is_op(peek(I), "]")) break;
        if (parts[k]) fail(I, line, "expected ':' or ']' in a subscript");
        if (is_op(peek(I), ",")) fail(I, line, "subscripts with commas are not in attn.c's Jinja subset");
        parts[k] = parse_expression(I, 1);
    }
    expect_op(I, "]");
    if (!is_slice && !parts[0]) fail(I, line, "an empty subscript");
    Node *n = node(I, is_slice ? E_SLICE : E_ITEM, line);
    n->a = target, n->b = parts[0], n->c = parts[1], n->d = parts[2];
    return n;
}

static Node *parse_postfix(Interp *I, Node *n) {
    for (;;) {
        Token *t = peek(I);
        if (is_op(t, ".")) {
            next_token(I);
            Token *attr = next_token(I);
            if (attr->kind == T_INT) {
                Node *item = node(I, E_ITEM, t->line), *key = node(I, E_CONST, t->line);
                key->value = integer(attr->i);
                item->a = n, item->b = key;
                n = item;
                continue;
            }
            if (attr->kind != T_NAME) fail(I, t->line, "expected a name after '.'");
            Node *a = node(I, E_ATTR, t->line);
            a->a = n, a->name = attr->text, a->name_len = attr->len;
            n = a;
        } else if (is_op(t, "[")) {
            next_token(I);
            n = parse_subscript(I, n, t->line);
        } else if (is_op(t, "(")) {
            n = parse_call(I, n, t->line);
        } else {
            return n;
        }
    }
}

static Node *parse_filter_or_test(Interp *I, Node *n) {
    for (;;) {
        Token *t = peek(I);
        if (is_op(t, "|")) {
            next_token(I);
            Token *name = expect_name(I);
            if (is_op(peek(I), ".")) fail(I, name->line, "dotted filter names are not in attn.c's Jinja subset");
            if (!in_list(FILTERS, name->text, name->len))
                fail(I, name->line, "the filter '%.*s' is not in attn.c's Jinja subset", (int)name->len, name->text);
            Node *f = node(I, E_FILTER, name->line);
            f->a = n, f->name = name->text, f->name_len = name->len;
            if (is_op(peek(I), "(")) parse_call_args(I, f);
            n = f;
        } else if (is_name(t, "is")) {
            next_token(I);
            Node *test = node(I, E_TEST, t->line);
            if (is_name(peek(I), "not")) next_token(I), test->op = "not";
            Token *name = expect_name(I);
            if (!in_list(TESTS, name->text, name->len))
                fail(I, name->line, "the test '%.*s' is not in attn.c's Jinja subset", (int)name->len, name->text);
            test->a = n, test->name = name->text, test->name_len = name->len;
            Token *p = peek(I);
            if (is_op(p, "(")) parse_call_args(I, test);
            else if ((p->kind == T_NAME || p->kind == T_STRING || p->kind == T_INT || p->kind == T_FLOAT || is_op(p, "[") ||
                      is_op(p, "{")) &&
                     !is_name(p, "else") && !is_name(p, "or") && !is_name(p, "and") && !is_name(p, "is") &&
                     !is_name(p, "if") && !is_name(p, "in") && !is_name(p, "not"))
                add_kid(I, test, parse_postfix(I, parse_primary(I)));
            n = test;
        } else if (is_op(t, "(")) {
            n = parse_call(I, n, t->line);
        } else {
            return n;
        }
    }
}

static Node *parse_unary(Interp *I, int with_filter) {
    Token *t = peek(I);
    Node *n;
    enter(I, t->line);
    if (is_op(t, "-") || is_op(t, "+")) {
        next_token(I);
        n = node(I, is_op(t, "-") ? E_NEG : E_POS, t->line);
        n->a = parse_unary(I, 0);
    } else {
        n = parse_primary(I);
    }
    n = parse_postfix(I, n);
    if (with_filter) n = parse_filter_or_test(I, n);
    I->depth--;
    return n;
}

static Node *binary(Interp *I, const char *op, Node *a, Node *b, int line) {
    Node *n = node(I, E_BINARY, line);
    n->op = op, n->a = a, n->b = b;
    return n;
}

static Node *parse_pow(Interp *I) {
    Node *n = parse_unary(I, 1);
    while (is_op(peek(I), "**")) {
        int line = next_token(I)->line;
        n = binary(I, "**", n, parse_unary(I, 1), line);
    }
    return n;
}

static Node *parse_math2(Interp *I) {
    Node *n = parse_pow(I);
    for (;;) {
        Token *t = peek(I);
        const char *op = is_op(t, "*") ? "*" : is_op(t, "/") ? "/" : is_op(t, "//") ? "//" : is_op(t, "%") ? "%" : NULL;
        if (!op) return n;
        next_token(I);
        n = binary(I, op, n, parse_pow(I), t->line);
    }
}

static Node *parse_concat(Interp *I) {
    Node *first = parse_math2(I);
    if (!is_op(peek(I), "~")) return first;
    Node *n = node(I, E_CONCAT, peek(I)->line);
    add_kid(I, n, first);
    while (is_op(peek(I), "~")) {
        next_token(I);
        add_kid(I, n, parse_math2(I));
    }
    return n;
}

static Node *parse_math1(Interp *I) {
    Node *n = parse_concat(I);
    for (;;) {
        Token *t = peek(I);
        const char *op = is_op(t, "+") ? "+" : is_op(t, "-") ? "-" : NULL;
        if (!op) return n;
        next_token(I);
        n = binary(I, op, n, parse_concat(I), t->line);
    }
}

static Node *parse_compare(Interp *I) {
    Node *first = parse_math1(I), *n = NULL;
    for (;;) {
        Token *t = peek(I);
        const char *op = NULL;
        static const char *const ops[] = {"==", "!=", "<", ">", "<=", ">="};
        for (int k = 0; k < 6 && !op; k++)
            if (is_op(t, ops[k])) op = ops[k];
        if (op) next_token(I);
        else if (is_name(t, "in")) next_token(I), op = "in";
        else if (is_name(t, "not") && is_name(peek2(I), "in")) next_token(I), next_token(I), op = "not in";
        else break;
        if (!n) {
            n = node(I, E_COMPARE, t->line);
            n->a = first;
        }
        Node *operand = node(I, E_COMPARE, t->line);
        operand->op = op, operand->a = parse_math1(I);
        add_kid(I, n, operand);
    }
    return n ? n : first;
}

static Node *parse_not(Interp *I) {
    if (is_name(peek(I), "not")) {
        Token *t = next_token(I);
        enter(I, t->line);
        Node *n = node(I, E_NOT, t->line);
        n->a = parse_not(I);
        I->depth--;
        return n;
    }
    return parse_compare(I);
}

static Node *parse_and(Interp *I) {
    Node *n = parse_not(I);
    while (is_name(peek(I), "and")) {
        Node *a = node(I, E_AND, next_token(I)->line);
        a->a = n, a->b = parse_not(I);
        n = a;
    }
    return n;
}

static Node *parse_or(Interp *I) {
    Node *n = parse_and(I);
    while (is_name(peek(I), "or")) {
        Node *o = node(I, E_OR, next_token(I)->line);
        o->a = n, o->b = parse_and(I);
        n = o;
    }
    return n;
}

static Node *parse_expression(Interp *I, int with_conditional) {
    enter(I, peek(I)->line);
    Node *n = parse_or(I);
    while (with_conditional && is_name(peek(I), "if")) {
        Node *c = node(I, E_CONDITIONAL, next_token(I)->line);
        c->a = n, c->b = parse_or(I);
        if (is_name(peek(I), "else")) {
            next_token(I);
            c->c = parse_expression(I, 1);
        }
        n = c;
    }
    I->depth--;
    return n;
}

/* ---- statements */

static Node *parse_body(Interp *I, const char *const *ends);

/* after "{%": the statement's name is the next token */
static int at_tag(Interp *I, const char *const *names) {
    if (peek(I)->kind != T_BLOCK_BEGIN) return 0;
    Token *t = peek2(I);
    for (int i = 0; names && names[i]; i++)
        if (is_name(t, names[i])) return 1;
    return 0;
}

/* "{% name" ... "%}" already at the name: consume the end */
static void end_tag(Interp *I) { expect_kind(I, T_BLOCK_END, "'%}'"); }

static Node *parse_if(Interp *I, int line) {
    static const char *const ends[] = {"elif", "else", "endif", NULL};
    Node *n = node(I, S_IF, line);
    n->a = parse_tuple(I, 1, 0, NULL);
    end_tag(I);
    n->b = parse_body(I, ends);
    next_token(I); /* "{%" */
    Token *t = next_token(I);
    if (is_name(t, "elif")) {
        n->c = parse_if(I, t->line);
    } else if (is_name(t, "else")) {
        static const char *const endif[] = {"endif", NULL};
        end_tag(I);
        n->c = parse_body(I, endif);
        next_token(I), next_token(I);
        end_tag(I);
    } else {
        end_tag(I);
    }
    return n;
}

/* names (a, b) on the left of "in" or "=", or ns.attr for set */
static void parse_targets(Interp *I, Node *n, const char *end_name, int allow_attr) {
    for (;;) {
        Token *t = expect_name(I);
        Node *target = node(I, E_NAME, t->line);
        target->name = t->text, target->name_len = t->len;
        if (allow_attr && is_op(peek(I), ".")) {
            next_token(I);
            Token *attr = expect_name(I);
            Node *a = node(I, E_ATTR, t->line);
            a->a = target, a->name = attr->text, a->name_len = attr->len;
            target = a;
        }
        add_kid(I, n, target);
        if (!is_op(peek(I), ",")) break;
        next_token(I);
        if (end_name && is_name(peek(I), end_name)) break;
    }
}

static Node *parse_statement(Interp *I) {
    Token *t = next_token(I); /* the name after "{%" */
    char buf[64];
    if (t->kind != T_NAME) fail(I, t->line, "expected a statement name after '{%%', found %s", describe(t, buf, sizeof buf));
    int line = t->line;
    if (is_name(t, "if")) return parse_if(I, line);
    if (is_name(t, "for")) {
        static const char *const ends[] = {"endfor", "else", NULL}, *const endfor[] = {"endfor", NULL};
        Node *n = node(I, S_FOR, line);
        parse_targets(I, n, "in", 0);
        if (!is_name(next_token(I), "in")) fail(I, line, "expected 'in' in a for loop");
        n->a = parse_tuple(I, 0, 0, "recursive");
        if (is_name(peek(I), "if")) {
            next_token(I);
            n->d = parse_expression(I, 1);
        }
        if (is_name(peek(I), "recursive")) fail(I, line, "recursive loops are not in attn.c's Jinja subset");
        end_tag(I);
        n->b = parse_body(I, ends);
        next_token(I);
        if (is_name(next_token(I), "else")) {
            end_tag(I);
            n->c = parse_body(I, endfor);
            next_token(I), next_token(I);
        }
        end_tag(I);
        return n;
    }
    if (is_name(t, "set")) {
        Node *n = node(I, S_SET, line);
        parse_targets(I, n, NULL, 1);
        if (is_op(peek(I), "=")) {
            next_token(I);
            n->b = parse_tuple(I, 1, 0, NULL);
            end_tag(I);
            return n;
        }
        static const char *const endset[] = {"endset", NULL};
        if (n->n_kids != 1 || n->kids[0]->kind != E_NAME) fail(I, line, "a block set assigns one name");
        if (is_op(peek(I), "|")) fail(I, line, "filters on a block set are not in attn.c's Jinja subset");
        end_tag(I);
        n->kind = S_SET_BLOCK;
        n->b = parse_body(I, endset);
        next_token(I), next_token(I);
        end_tag(I);
        return n;
    }
    if (is_name(t, "macro")) {
        static const char *const ends[] = {"endmacro", NULL};
        Node *n = node(I, S_MACRO, line);
        Token *name = expect_name(I);
        n->name = name->text, n->name_len = name->len;
        expect_op(I, "(");
        while (!is_op(peek(I), ")")) {
            if (n->n_kids) expect_op(I, ",");
            Token *p = expect_name(I);
            Node *param = node(I, E_KEYWORD, p->line);
            param->name = p->text, param->name_len = p->len;
            if (is_op(peek(I), "=")) {
                next_token(I);
                param->a = parse_expression(I, 1);
            }
            add_kid(I, n, param);
        }
        expect_op(I, ")");
        end_tag(I);
        n->b = parse_body(I, ends);
        next_token(I), next_token(I);
        if (peek(I)->kind == T_NAME) next_token(I); /* {% endmacro name %} */
        end_tag(I);
        return n;
    }
    if (is_name(t, "break") || is_name(t, "continue")) {
        end_tag(I);
        return node(I, is_name(t, "break") ? S_BREAK : S_CONTINUE, line);
    }
    if (is_name(t, "generation")) { /* transformers' marker of the assistant's tokens: renders its body */
        static const char *const ends[] = {"endgeneration", NULL};
        end_tag(I);
        Node *n = parse_body(I, ends);
        next_token(I), next_token(I);
        end_tag(I);
        return n;
    }
    static const char *const ends[] = {"endif", "endfor", "endset", "endmacro", "endgeneration", "elif", "else", NULL};
    for (int i = 0; ends[i]; i++)
        if (is_name(t, ends[i])) fail(I, line, "unexpected '%s'", ends[i]);
    fail(I, line, "the '%.*s' statement is not in attn.c's Jinja subset", (int)(t->len < 40 ? t->len : 40), t->text);
}

static Node *parse_body(Interp *I, const char *const *ends) {
    Node *body = node(I, S_BODY, peek(I)->line);
    enter(I, peek(I)->line);
    for (;;) {
        Token *t = peek(I);
        if (t->kind == T_EOF) {
            if (ends) fail(I, t->line, "the template ends inside a block ('%s' expected)", ends[0]);
            break;
        }
        if (t->kind == T_DATA) {
            next_token(I);
            Node *text = node(I, S_TEXT, t->line);
            text->value = string(t->text, t->len);
            add_kid(I, body, text);
        } else if (t->kind == T_VAR_BEGIN) {
            next_token(I);
            Node *out = node(I, S_OUTPUT, t->line);
            out->a = parse_tuple(I, 1, 0, NULL);
            expect_kind(I, T_VAR_END, "'}}'");
            add_kid(I, body, out);
        } else if (t->kind == T_BLOCK_BEGIN) {
            if (at_tag(I, ends)) break;
            next_token(I);
            add_kid(I, body, parse_statement(I));
        } else {
            char buf[64];
            fail(I, t->line, "unexpected %s", describe(t, buf, sizeof buf));
        }
    }
    I->depth--;
    return body;
}

/* ---------------------------------------------------------------------------------------------
 * evaluation */

enum { FLOW_NORMAL, FLOW_BREAK, FLOW_CONTINUE };

static Value eval(Interp *I, const Node *e);
static int exec(Interp *I, const Node *s);

static Value *lookup(Interp *I, const char *name, size_t n) {
    for (Scope *s = I->scope; s; s = s->parent) {
        int i = dict_find_str(s->vars, name, n);
        if (i >= 0) return &s->vars->vals[i];
    }
    return NULL;
}

static void assign(Interp *I, const char *name, size_t n, Value v) {
    dict_set(I, I->scope->vars, string(name, n), v);
}

/* the builtins and methods a call may name */
enum { B_RAISE_EXCEPTION, B_NAMESPACE, B_RANGE, B_STRFTIME_NOW, B_DICT };
enum {
    M_STRIP, M_LSTRIP, M_RSTRIP, M_SPLIT, M_RSPLIT, M_STARTSWITH, M_ENDSWITH, M_UPPER, M_LOWER, M_TITLE, M_CAPITALIZE,
    M_REPLACE, M_FIND, M_COUNT, M_JOIN, M_ISDIGIT, M_ISSPACE, M_ITEMS, M_KEYS, M_VALUES, M_GET
};
static const char *const STRING_METHODS[] = {"strip", "lstrip", "rstrip", "split", "rsplit", "startswith", "endswith",
                                             "upper", "lower", "title", "capitalize", "replace", "find", "count",
                                             "join", "isdigit", "isspace", NULL};
static const char *const DICT_METHODS[] = {"items", "keys", "values", "get", NULL};

static int index_in(const char *const *list, const char *s, size_t n) {
    for (int i = 0; list[i]; i++)
        if (strlen(list[i]) == n && memcmp(list[i], s, n) == 0) return i;
    return -1;
}

static Value method(Interp *I, const Value *self, int which) {
    Value m = {.kind = V_METHOD};
    m.m.self = alloc(I, sizeof(Value));
    *m.m.self = *self;
    m.m.which = which;
    return m;
}

/* obj.name: a method of a string or dict, a namespace attribute, else the dict item; Undefined when missing */
static Value get_attr(Interp *I, const Value *obj, const char *name, size_t n, int line) {
    if (obj->kind == V_UNDEFINED)
        fail(I, line, "'%s' is undefined (reading .%.*s)", obj->s ? obj->s : "value", (int)n, name);
    if (obj->kind == V_STRING) {
        int k = index_in(STRING_METHODS, name, n);
        if (k >= 0) return method(I, obj, M_STRIP + k);
    }
    if (obj->kind == V_DICT) {
        int k = index_in(DICT_METHODS, name, n);
        if (k >= 0) return method(I, obj, M_ITEMS + k);
    }
    if (obj->kind == V_DICT || obj->kind == V_NAMESPACE) {
        int i = dict_find_str(obj->dict, name, n);
        if (i >= 0) return obj->dict->vals[i];
    }
    char *copy = alloc(I, n + 1);
    memcpy(copy, name, n);
    return undefined(copy);
}

/* Python index i of a sequence of n items (negative from the end), or -1 when outside */
static long long seq_index(long long i, long long n) {
    if (i < 0) i += n;
    return i >= 0 && i < n ? i : -1;
}

static Value get_item(Interp *I, const Value *obj, const Value *key, int line) {
    if (obj->kind == V_UNDEFINED) fail(I, line, "'%s' is undefined (reading an item of it)", obj->s ? obj->s : "value");
    if (obj->kind == V_DICT) {
        int i = dict_find(obj->dict, key);
        if (i >= 0) return obj->dict->vals[i];
    }
    if ((obj->kind == V_LIST || obj->kind == V_STRING) && (key->kind == V_INT || key->kind == V_BOOL)) {
        if (obj->kind == V_LIST) {
            long long i = seq_index(key->i, obj->list->n);
            return i >= 0 ? obj->list->items[i] : undefined(NULL);
        }
        long long i = seq_index(key->i, (long long)n_chars(obj->s, obj->n));
        if (i < 0) return undefined(NULL);
        size_t a = char_offset(obj->s, obj->n, (size_t)i), b = char_offset(obj->s, obj->n, (size_t)i + 1);
        return string(obj->s + a, b - a);
    }
    if (key->kind == V_STRING) return get_attr(I, obj, key->s, key->n, line);
    return undefined(NULL);
}

/* Python slice [start:stop:step] of a list or string */
static Value slice(Interp *I, const Value *obj, const Value *start, const Value *stop, const Value *stride, int line) {
    if (obj->kind != V_LIST && obj->kind != V_STRING) fail(I, line, "cannot slice a %s", kind_name(obj));
    long long n = obj->kind == V_LIST ? obj->list->n : (long long)n_chars(obj->s, obj->n);
    const Value *parts[3] = {start, stop, stride};
    long long v[3] = {0, 0, 1};
    int given[3];
    for (int k = 0; k < 3; k++) {
        given[k] = parts[k] && parts[k]->kind != V_NONE && parts[k]->kind != V_UNDEFINED;
        if (given[k] && parts[k]->kind != V_INT && parts[k]->kind != V_BOOL) fail(I, line, "slice indices must be integers");
        if (given[k]) v[k] = parts[k]->i;
    }
    long long st = v[2];
    if (st == 0) fail(I, line, "slice step cannot be zero");
    long long a, b;
    if (st > 0) {
        a = given[0] ? (v[0] < 0 ? (v[0] + n < 0 ? 0 : v[0] + n) : (v[0] > n ? n : v[0])) : 0;
        b = given[1] ? (v[1] < 0 ? (v[1] + n < 0 ? 0 : v[1] + n) : (v[1] > n ? n : v[1])) : n;
    } else {
        a = given[0] ? (v[0] < 0 ? (v[0] + n < 0 ? -1 : v[0] + n) : (v[0] >= n ? n - 1 : v[0])) : n - 1;
        b = given[1] ? (v[1] < 0 ? (v[1] + n < 0 ? -1 : v[1] + n) : (v[1] >= n ? n - 1 : v[1])) : -1;
    }
    if (obj->kind == V_LIST) {
        List *l = list_new(I);
        l->is_tuple = obj->list->is_tuple;
        for (long long i = a; st > 0 ? i < b : i > b; i += st) list_push(I, l, obj->list->items[i]);
        return list_value(l);
    }
    Buf out = {0};
    buf_put(I, &out, "", 0);
    if (st == 1) {
        if (b > a) {
            size_t x = char_offset(obj->s, obj->n, (size_t)a), y = char_offset(obj->s, obj->n, (size_t)b);
            return string(obj->s + x, y - x);
        }
        return buf_value(&out);
    }
    for (long long i = a; st > 0 ? i < b : i > b; i += st) {
        size_t x = char_offset(obj->s, obj->n, (size_t)i), y = char_offset(obj->s, obj->n, (size_t)i + 1);
        buf_put(I, &out, obj->s + x, y - x);
    }
    return buf_value(&out);
}

/* the items a for loop, list() or a filter walks: a list's items, a dict's keys, a string's characters */
static List *iterate(Interp *I, const Value *v, int line) {
    List *l = list_new(I);
    switch (v->kind) {
    case V_UNDEFINED: return l;
    case V_LIST: return v->list;
    case V_DICT:
        for (int i = 0; i < v->dict->n; i++) list_push(I, l, v->dict->keys[i]);
        return l;
    case V_STRING:
        for (size_t i = 0; i < v->n;) {
            int len;
            char_at(v->s, v->n, i, &len);
            list_push(I, l, string(v->s + i, (size_t)len));
            i += (size_t)len;
        }
        return l;
    default: fail(I, line, "'%s' object is not iterable", kind_name(v));
    }
}

static long long length_of(Interp *I, const Value *v, int line) {
    switch (v->kind) {
    case V_UNDEFINED: return 0;
    case V_STRING: return (long long)n_chars(v->s, v->n);
    case V_LIST: return v->list->n;
    case V_DICT: return v->dict->n;
    default: fail(I, line, "object of type '%s' has no len()", kind_name(v));
    }
}

static int contains(Interp *I, const Value *haystack, const Value *needle, int line) {
    switch (haystack->kind) {
    case V_STRING:
        if (needle->kind != V_STRING) fail(I, line, "'in <string>' requires a string on the left, not %s", kind_name(needle));
        return find_bytes(haystack->s, haystack->n, needle->s, needle->n) != NULL;
    case V_LIST:
        for (int i = 0; i < haystack->list->n; i++)
            if (values_equal(&haystack->list->items[i], needle)) return 1;
        return 0;
    case V_DICT:
    case V_NAMESPACE: return dict_find(haystack->dict, needle) >= 0;
    case V_UNDEFINED: return 0;
    default: fail(I, line, "argument of type '%s' is not iterable", kind_name(haystack));
    }
}

/* <, <=, >, >=: numbers, strings (by code point, which is UTF-8 byte order), lists item by item */
static int compare_order(Interp *I, const Value *a, const Value *b, int line) {
    if (is_number(a) && is_number(b)) {
        double x = number_of(a), y = number_of(b);
        return (x > y) - (x < y);
    }
    if (a->kind == V_STRING && b->kind == V_STRING) {
        size_t m = a->n < b->n ? a->n : b->n;
        int c = memcmp(a->s, b->s, m);
        return c ? (c > 0) - (c < 0) : (a->n > b->n) - (a->n < b->n);
    }
    if (a->kind == V_LIST && b->kind == V_LIST) {
        for (int i = 0; i < a->list->n && i < b->list->n; i++)
            if (!values_equal(&a->list->items[i], &b->list->items[i])) return compare_order(I, &a->list->items[i], &b->list->items[i], line);
        return (a->list->n > b->list->n) - (a->list->n < b->list->n);
    }
    fail(I, line, "'<' not supported between instances of '%s' and '%s'", kind_name(a), kind_name(b));
}

static long long checked(Interp *I, int overflow, long long v, int line) {
    if (overflow) fail(I, line, "integer result too large");
    return v;
}

static Value repeat(Interp *I, const Value *seq, long long times, int line) {
    if (times < 0) times = 0;
    size_t unit = seq->kind == V_STRING ? seq->n : (size_t)seq->list->n;
    if (unit && (unsigned long long)times > (MAX_ARENA_BYTES / 16) / unit) fail(I, line, "repetition too large");
    if (seq->kind == V_STRING) {
        Buf b = {0};
        buf_put(I, &b, "", 0);
        for (long long k = 0; k < times; k++) buf_put(I, &b, seq->s, seq->n);
        return buf_value(&b);
    }
    List *l = list_new(I);
    l->is_tuple = seq->list->is_tuple;
    for (long long k = 0; k < times; k++)
        for (int i = 0; i < seq->list->n; i++) list_push(I, l, seq->list->items[i]);
    return list_value(l);
}

static Value arithmetic(Interp *I, const char *op, const Value *a, const Value *b, int line) {
    if (a->kind == V_UNDEFINED || b->kind == V_UNDEFINED)
        fail(I, line, "'%s' is undefined (in '%s')", (a->kind == V_UNDEFINED ? a : b)->s ? (a->kind == V_UNDEFINED ? a : b)->s : "value", op);
    if (op[0] == '+' && a->kind == V_STRING && b->kind == V_STRING) {
        Buf out = {0};
        buf_put(I, &out, a->s, a->n);
        buf_put(I, &out, b->s, b->n);
        return buf_value(&out);
    }
    if (op[0] == '+' && a->kind == V_LIST && b->kind == V_LIST && a->list->is_tuple == b->list->is_tuple) {
        List *l = list_new(I);
        l->is_tuple = a->list->is_tuple;
        for (int i = 0; i < a->list->n; i++) list_push(I, l, a->list->items[i]);
        for (int i = 0; i < b->list->n; i++) list_push(I, l, b->list->items[i]);
        return list_value(l);
    }
    if (op[0] == '*' && op[1] == '\0' && (a->kind == V_STRING || a->kind == V_LIST) && (b->kind == V_INT || b->kind == V_BOOL))
        return repeat(I, a, b->i, line);
    if (op[0] == '*' && op[1] == '\0' && (b->kind == V_STRING || b->kind == V_LIST) && (a->kind == V_INT || a->kind == V_BOOL))
        return repeat(I, b, a->i, line);
    if (!is_number(a) || !is_number(b))
        fail(I, line, "unsupported operand types for %s: '%s' and '%s'", op, kind_name(a), kind_name(b));
    int ints = a->kind != V_FLOAT && b->kind != V_FLOAT;
    long long x = a->i, y = b->i, r;
    double p = number_of(a), q = number_of(b);
    if (!strcmp(op, "/")) {
        if (q == 0.0) fail(I, line, "division by zero");
        return floating(p / q);
    }
    if ((!strcmp(op, "//") || !strcmp(op, "%")) && q == 0.0) fail(I, line, "integer division or modulo by zero");
    if (ints) {
        int overflow = op[0] == '+' ? __builtin_add_overflow(x, y, &r)
                     : op[0] == '-' ? __builtin_sub_overflow(x, y, &r)
                     : op[0] == '*' && !op[1] ? __builtin_mul_overflow(x, y, &r) : -1;
        if (overflow >= 0) return integer(checked(I, overflow, r, line));
        if (x == LLONG_MIN && y == -1) fail(I, line, "integer result too large");
        if (!strcmp(op, "//")) return integer(x / y - ((x % y != 0) && ((x < 0) != (y < 0))));
        if (!strcmp(op, "%")) return integer(x % y + ((x % y != 0) && ((x < 0) != (y < 0)) ? y : 0));
        if (!strcmp(op, "**")) {
            if (y < 0) return floating(pow(p, q));
            long long acc = 1;
            for (long long k = 0; k < y; k++) {
                if (__builtin_mul_overflow(acc, x, &acc)) fail(I, line, "integer result too large");
                if (acc == 0 || acc == 1) break;
            }
            return integer(acc);
        }
    }
    if (!strcmp(op, "+")) return floating(p + q);
    if (!strcmp(op, "-")) return floating(p - q);
    if (!strcmp(op, "*")) return floating(p * q);
    if (!strcmp(op, "//")) return floating(floor(p / q));
    if (!strcmp(op, "%")) {
        double m = fmod(p, q);
        return floating(m != 0.0 && ((m < 0) != (q < 0)) ? m + q : m);
    }
    return floating(pow(p, q));
}

/* ---- calls: evaluated arguments, positional and keyword */

#define MAX_ARGS 16

typedef struct {
    int n, n_kw;
    Value pos[MAX_ARGS];
    const char *kw_name[MAX_ARGS];
    size_t kw_len[MAX_ARGS];
    Value kw[MAX_ARGS];
} Args;

static void eval_args(Interp *I, const Node *call, Args *a) {
    memset(a, 0, sizeof *a);
    for (int i = 0; i < call->n_kids; i++) {
        const Node *k = call->kids[i];
        if (k->kind == E_KEYWORD) {
            if (a->n_kw == MAX_ARGS) fail(I, k->line, "too many arguments");
            a->kw_name[a->n_kw] = k->name, a->kw_len[a->n_kw] = k->name_len;
            a->kw[a->n_kw++] = eval(I, k->a);
        } else {
            if (a->n == MAX_ARGS) fail(I, k->line, "too many arguments");
            a->pos[a->n++] = eval(I, k);
        }
    }
}

/* argument i, or the keyword name, or NULL */
static const Value *arg(const Args *a, int i, const char *name) {
    if (i >= 0 && i < a->n) return &a->pos[i];
    for (int k = 0; name && k < a->n_kw; k++)
        if (a->kw_len[k] == strlen(name) && memcmp(a->kw_name[k], name, a->kw_len[k]) == 0) return &a->kw[k];
    return NULL;
}

static const Value *string_arg(Interp *I, const Args *a, int i, const char *name, const char *what, int line) {
    const Value *v = arg(a, i, name);
    if (v && v->kind == V_NONE) return NULL;
    if (v && v->kind != V_STRING) fail(I, line, "%s expects a string, not %s", what, kind_name(v));
    return v;
}

static long long int_arg(Interp *I, const Args *a, int i, const char *name, long long dflt, const char *what, int line) {
    const Value *v = arg(a, i, name);
    if (!v || v->kind == V_NONE) return dflt;
    if (v->kind != V_INT && v->kind != V_BOOL) fail(I, line, "%s expects an integer, not %s", what, kind_name(v));
    return v->i;
}

/* str.split(sep, maxsplit) and rsplit: sep None splits at runs of whitespace and drops empty pieces */
static Value split(Interp *I, const Value *s, const Value *sep, long long maxsplit, int from_right, int line) {
    List *l = list_new(I);
    if (sep && sep->n == 0) fail(I, line, "empty separator");
    if (!sep) {
        size_t i = 0, n = s->n;
        List *parts = list_new(I);
        for (;;) {
            i = skip_py_space(s->s, n, i);
            if (i >= n) break;
            size_t j = i;
            while (j < n) {
                int len;
                if (py_space(char_at(s->s, n, j, &len))) break;
                j += (size_t)len;
            }
            list_push(I, parts, string(s->s + i, j - i));
            i = j;
        }
        if (maxsplit < 0 || maxsplit >= parts->n - 1) return list_value(parts);
        /* at most maxsplit splits: the rest of the text stays whole, its whitespace included */
        if (!from_right) {
            for (long long k = 0; k < maxsplit; k++) list_push(I, l, parts->items[k]);
            const char *rest = parts->items[maxsplit].s;
            Value tail = strip(&(Value){.kind = V_STRING, .s = rest, .n = (size_t)(s->s + n - rest)}, NULL, 0, 1);
            list_push(I, l, tail);
            return list_value(l);
        }
        long long keep = parts->n - maxsplit;
        const Value *last = &parts->items[keep - 1];
        Value head = strip(&(Value){.kind = V_STRING, .s = s->s, .n = (size_t)(last->s + last->n - s->s)}, NULL, 1, 0);
        list_push(I, l, head);
        for (long long k = keep; k < parts->n; k++) list_push(I, l, parts->items[k]);
        return list_value(l);
    }
    if (!from_right) {
        size_t i = 0;
        long long splits = 0;
        for (;;) {
            const char *hit = maxsplit >= 0 && splits >= maxsplit ? NULL : find_bytes(s->s + i, s->n - i, sep->s, sep->n);
            if (!hit) {
                list_push(I, l, string(s->s + i, s->n - i));
                return list_value(l);
            }
            list_push(I, l, string(s->s + i, (size_t)(hit - (s->s + i))));
            i = (size_t)(hit - s->s) + sep->n;
            splits++;
        }
    }
    /* rsplit with a separator: find from the right, then reverse */
    List *rev = list_new(I);
    size_t end = s->n;
    long long splits = 0;
    for (;;) {
        const char *hit = NULL;
        if (maxsplit < 0 || splits < maxsplit)
            for (size_t i = end >= sep->n ? end - sep->n + 1 : 0; i-- > 0;)
                if (memcmp(s->s + i, sep->s, sep->n) == 0) {
                    hit = s->s + i;
                    break;
                }
        if (!hit) {
            list_push(I, rev, string(s->s, end));
            break;
        }
        list_push(I, rev, string(hit + sep->n, end - (size_t)(hit - s->s) - sep->n));
        end = (size_t)(hit - s->s);
        splits++;
    }
    for (int k = rev->n - 1; k >= 0; k--) list_push(I, l, rev->items[k]);
    return list_value(l);
}

static Value replace(Interp *I, const Value *s, const Value *old, const Value *new_, long long count) {
    Buf b = {0};
    buf_put(I, &b, "", 0);
    size_t i = 0;
    long long done = 0;
    if (old->n == 0) { /* Python puts new_ between every character (and at both ends) */
        for (size_t k = 0; k <= s->n; done++) {
            if (count < 0 || done < count) buf_put(I, &b, new_->s, new_->n);
            if (k == s->n) break;
            int len;
            char_at(s->s, s->n, k, &len);
            buf_put(I, &b, s->s + k, (size_t)len);
            k += (size_t)len;
        }
        return buf_value(&b);
    }
    for (;;) {
        const char *hit = count >= 0 && done >= count ? NULL : find_bytes(s->s + i, s->n - i, old->s, old->n);
        if (!hit) break;
        buf_put(I, &b, s->s + i, (size_t)(hit - (s->s + i)));
        buf_put(I, &b, new_->s, new_->n);
        i = (size_t)(hit - s->s) + old->n;
        done++;
    }
    buf_put(I, &b, s->s + i, s->n - i);
    return buf_value(&b);
}

static int affix_matches(Interp *I, const Value *s, const Value *affix, int at_end, int line) {
    if (affix->kind == V_LIST) { /* a tuple of choices */
        for (int k = 0; k < affix->list->n; k++)
            if (affix_matches(I, s, &affix->list->items[k], at_end, line)) return 1;
        return 0;
    }
    if (affix->kind != V_STRING) fail(I, line, "startswith / endswith expects a string or a tuple of strings");
    if (affix->n > s->n) return 0;
    return memcmp(at_end ? s->s + s->n - affix->n : s->s, affix->s, affix->n) == 0;
}

static Value join(Interp *I, const Value *items, const Value *sep, int line) {
    List *l = iterate(I, items, line);
    Buf b = {0};
    buf_put(I, &b, "", 0);
    for (int i = 0; i < l->n; i++) {
        if (i && sep) buf_put(I, &b, sep->s, sep->n);
        put_str(I, &b, &l->items[i]);
    }
    return buf_value(&b);
}

static Value call_method(Interp *I, const Value *m, const Args *a, int line) {
    const Value *self = m->m.self;
    int which = m->m.which;
    if (which >= M_ITEMS) {
        const Dict *d = self->dict;
        List *l = list_new(I);
        switch (which) {
        case M_ITEMS:
            for (int i = 0; i < d->n; i++) {
                List *pair = list_new(I);
                pair->is_tuple = 1;
                list_push(I, pair, d->keys[i]);
                list_push(I, pair, d->vals[i]);
                list_push(I, l, list_value(pair));
            }
            return list_value(l);
        case M_KEYS:
        case M_VALUES:
            for (int i = 0; i < d->n; i++) list_push(I, l, which == M_KEYS ? d->keys[i] : d->vals[i]);
            return list_value(l);
        default: { /* get(key, default=None) */
            const Value *key = arg(a, 0, NULL), *dflt = arg(a, 1, "default");
            if (!key) fail(I, line, "get() needs a key");
            int i = dict_find(d, key);
            return i >= 0 ? d->vals[i] : dflt ? *dflt : none();
        }
        }
    }
    switch (which) {
    case M_STRIP:
    case M_LSTRIP:
    case M_RSTRIP: {
        const Value *chars = string_arg(I, a, 0, NULL, "strip()", line);
        return strip(self, chars, which != M_RSTRIP, which != M_LSTRIP);
    }
    case M_SPLIT:
    case M_RSPLIT:
        return split(I, self, string_arg(I, a, 0, "sep", "split()", line), int_arg(I, a, 1, "maxsplit", -1, "split()", line),
                     which == M_RSPLIT, line);
    case M_STARTSWITH:
    case M_ENDSWITH: {
        const Value *affix = arg(a, 0, NULL);
        if (!affix) fail(I, line, "startswith / endswith needs an argument");
        if (a->n > 1) fail(I, line, "startswith / endswith with start and end is not in attn.c's Jinja subset");
        return boolean(affix_matches(I, self, affix, which == M_ENDSWITH, line));
    }
    case M_UPPER: return case_mapped(I, self, 1);
    case M_LOWER: return case_mapped(I, self, 0);
    case M_TITLE: return case_mapped(I, self, 3);
    case M_CAPITALIZE: return case_mapped(I, self, 2);
    case M_REPLACE: {
        const Value *old = string_arg(I, a, 0, NULL, "replace()", line), *new_ = string_arg(I, a, 1, NULL, "replace()", line);
        if (!old || !new_) fail(I, line, "replace() needs two strings");
        return replace(I, self, old, new_, int_arg(I, a, 2, "count", -1, "replace()", line));
    }
    case M_FIND:
    case M_COUNT: {
        const Value *sub = string_arg(I, a, 0, NULL, which == M_FIND ? "find()" : "count()", line);
        if (!sub) fail(I, line, "find() / count() needs a string");
        if (which == M_FIND) {
            const char *hit = find_bytes(self->s, self->n, sub->s, sub->n);
            return integer(hit ? (long long)n_chars(self->s, (size_t)(hit - self->s)) : -1);
        }
        if (sub->n == 0) return integer((long long)n_chars(self->s, self->n) + 1);
        long long k = 0;
        for (const char *p = self->s; (p = find_bytes(p, self->n - (size_t)(p - self->s), sub->s, sub->n)); p += sub->n) k++;
        return integer(k);
    }
    case M_JOIN: {
        const Value *items = arg(a, 0, NULL);
        if (!items) fail(I, line, "join() needs an iterable");
        List *l = iterate(I, items, line);
        for (int i = 0; i < l->n; i++)
            if (l->items[i].kind != V_STRING) fail(I, line, "join(): item %d is %s, not a string", i, kind_name(&l->items[i]));
        return join(I, items, self, line);
    }
    case M_ISDIGIT:
    case M_ISSPACE: {
        int all = self->n > 0;
        for (size_t i = 0; i < self->n && all;) {
            int len;
            uint32_t c = char_at(self->s, self->n, i, &len);
            all = which == M_ISDIGIT ? (c >= '0' && c <= '9') : py_space(c);
            i += (size_t)len;
        }
        return boolean(all);
    }
    }
    fail(I, line, "unknown method");
}

static Value strftime_now(Interp *I, const Value *format, int line) {
    if (!format || format->kind != V_STRING) fail(I, line, "strftime_now() expects a format string");
    time_t now = time(NULL);
    const char *fixed = getenv("SOURCE_DATE_EPOCH"); /* reproducible builds' convention: a fixed "now" */
    if (fixed && *fixed) now = (time_t)strtoll(fixed, NULL, 10);
    struct tm tm;
    if (!localtime_r(&now, &tm)) fail(I, line, "strftime_now(): the clock is out of range");
    char fmt[256], out[512];
    size_t n = format->n < sizeof fmt - 1 ? format->n : sizeof fmt - 1;
    memcpy(fmt, format->s, n);
    fmt[n] = '\0';
    size_t len = n ? strftime(out, sizeof out, fmt, &tm) : 0;
    return string_copy(I, out, len);
}

static Value call_builtin(Interp *I, int which, const Args *a, int line) {
    switch (which) {
    case B_RAISE_EXCEPTION: {
        const Value *msg = arg(a, 0, NULL);
        Value text = msg ? str_of(I, msg) : cstring("");
        fail(I, line, "the template raised an error: %.*s", (int)(text.n < 300 ? text.n : 300), text.s);
    }
    case B_NAMESPACE:
    case B_DICT: {
        Dict *d = dict_new(I);
        const Value *init = arg(a, 0, NULL);
        if (init && init->kind == V_DICT)
            for (int i = 0; i < init->dict->n; i++) dict_set(I, d, init->dict->keys[i], init->dict->vals[i]);
        else if (init) fail(I, line, "%s() takes keyword arguments (or a dict)", which == B_DICT ? "dict" : "namespace");
        for (int k = 0; k < a->n_kw; k++) dict_set(I, d, string(a->kw_name[k], a->kw_len[k]), a->kw[k]);
        return dict_value(d, which == B_DICT ? V_DICT : V_NAMESPACE);
    }
    case B_RANGE: {
        long long start = 0, stop, stride = 1;
        if (a->n == 1) stop = int_arg(I, a, 0, NULL, 0, "range()", line);
        else if (a->n == 2 || a->n == 3) {
            start = int_arg(I, a, 0, NULL, 0, "range()", line), stop = int_arg(I, a, 1, NULL, 0, "range()", line);
            stride = int_arg(I, a, 2, NULL, 1, "range()", line);
        } else fail(I, line, "range() takes 1 to 3 arguments");
        if (stride == 0) fail(I, line, "range() arg 3 must not be zero");
        List *l = list_new(I);
        for (long long i = start; stride > 0 ? i < stop : i > stop; i += stride) {
            if (l->n >= MAX_RANGE) fail(I, line, "range() of more than %d numbers", MAX_RANGE);
            list_push(I, l, integer(i));
        }
        return list_value(l);
    }
    default: return strftime_now(I, arg(a, 0, NULL), line);
    }
}

static Value call_macro(Interp *I, const Node *macro, const Args *a, int line) {
    if (a->n > macro->n_kids) fail(I, line, "macro '%.*s' takes %d arguments, %d given", (int)macro->name_len, macro->name, macro->n_kids, a->n);
    Scope *saved_scope = I->scope;
    Buf *saved_out = I->out, out = {0};
    Scope *s = alloc(I, sizeof *s);
    s->vars = dict_new(I), s->parent = I->root;
    I->scope = s;
    for (int k = 0; k < macro->n_kids; k++) {
        const Node *p = macro->kids[k];
        const Value *given = k < a->n ? &a->pos[k] : NULL;
        for (int j = 0; !given && j < a->n_kw; j++)
            if (a->kw_len[j] == p->name_len && memcmp(a->kw_name[j], p->name, p->name_len) == 0) given = &a->kw[j];
        assign(I, p->name, p->name_len, given ? *given : p->a ? eval(I, p->a) : undefined(NULL));
    }
    I->out = &out;
    buf_put(I, &out, "", 0);
    exec(I, macro->b);
    I->out = saved_out;
    I->scope = saved_scope;
    return buf_value(&out);
}

static Value call(Interp *I, const Node *e) {
    Value callee = eval(I, e->a);
    Args a;
    eval_args(I, e, &a);
    switch (callee.kind) {
    case V_BUILTIN: return call_builtin(I, (int)callee.i, &a, e->line);
    case V_METHOD: return call_method(I, &callee, &a, e->line);
    case V_MACRO: return call_macro(I, callee.macro, &a, e->line);
    case V_UNDEFINED: fail(I, e->line, "'%s' is undefined (called as a function)", callee.s ? callee.s : "value");
    default: fail(I, e->line, "'%s' object is not callable", kind_name(&callee));
    }
}

/* ---- tests: x is name(args) */

static int apply_test(Interp *I, const char *name, size_t n, const Value *v, const Args *a, int line) {
#define IS(s) (n == strlen(s) && memcmp(name, s, n) == 0)
    const Value *other = arg(a, 0, NULL);
    if (IS("defined")) return v->kind != V_UNDEFINED;
    if (IS("undefined")) return v->kind == V_UNDEFINED;
    if (IS("none")) return v->kind == V_NONE;
    if (IS("string")) return v->kind == V_STRING;
    if (IS("number")) return is_number(v);
    if (IS("integer")) return v->kind == V_INT;
    if (IS("float")) return v->kind == V_FLOAT;
    if (IS("boolean")) return v->kind == V_BOOL;
    if (IS("true")) return v->kind == V_BOOL && v->i;
    if (IS("false")) return v->kind == V_BOOL && !v->i;
    if (IS("mapping")) return v->kind == V_DICT;
    if (IS("iterable")) return v->kind == V_STRING || v->kind == V_LIST || v->kind == V_DICT || v->kind == V_UNDEFINED;
    if (IS("sequence")) return v->kind == V_STRING || v->kind == V_LIST || v->kind == V_DICT;
    if (IS("callable")) return v->kind == V_BUILTIN || v->kind == V_MACRO || v->kind == V_METHOD;
    if (IS("lower") || IS("upper")) {
        if (v->kind != V_STRING) return 0;
        Value mapped = case_mapped(I, v, IS("upper"));
        return mapped.n == v->n && memcmp(mapped.s, v->s, v->n) == 0;
    }
    if (IS("odd") || IS("even") || IS("divisibleby")) {
        if (v->kind != V_INT && v->kind != V_BOOL) fail(I, line, "the '%.*s' test needs an integer", (int)n, name);
        long long d = IS("divisibleby") ? int_arg(I, a, 0, "num", 1, "divisibleby", line) : 2;
        if (d == 0) fail(I, line, "divisibleby 0");
        long long r = d == -1 ? 0 : v->i % d;
        return IS("odd") ? r != 0 : r == 0;
    }
    if (!other) fail(I, line, "the '%.*s' test needs an argument", (int)n, name);
    if (IS("equalto") || IS("eq") || IS("==")) return values_equal(v, other);
    if (IS("ne") || IS("!=")) return !values_equal(v, other);
    if (IS("sameas")) return values_equal(v, other) && v->kind == other->kind;
    if (IS("in")) return contains(I, other, v, line);
    int c = compare_order(I, v, other, line);
    if (IS("lt") || IS("<")) return c < 0;
    if (IS("le") || IS("<=")) return c <= 0;
    if (IS("gt") || IS(">")) return c > 0;
    return c >= 0;
#undef IS
}

/* ---- filters: x | name(args) */

static Value attribute_of(Interp *I, const Value *item, const Value *attr, int line) {
    if (attr->kind == V_INT) return get_item(I, item, attr, line);
    if (attr->kind != V_STRING) fail(I, line, "attribute names must be strings");
    Value v = *item; /* "a.b" walks into nested items */
    const char *p = attr->s, *end = attr->s + attr->n;
    while (p <= end) {
        const char *dot = memchr(p, '.', (size_t)(end - p));
        if (!dot) dot = end;
        Value key = string(p, (size_t)(dot - p));
        if (v.kind == V_UNDEFINED) return v;
        v = get_item(I, &v, &key, line);
        p = dot + 1;
    }
    return v;
}

/* select / reject / selectattr / rejectattr */
static Value select_items(Interp *I, const Value *seq, const Args *a, int by_attr, int keep, int line) {
    List *out = list_new(I);
    if (!truthy(seq)) return list_value(out); /* jinja2 selects from nothing when the value is false (None) */
    List *in = iterate(I, seq, line);
    int first_test = by_attr ? 1 : 0;
    const Value *attr = by_attr ? arg(a, 0, NULL) : NULL, *test = arg(a, first_test, NULL);
    if (by_attr && !attr) fail(I, line, "selectattr / rejectattr need an attribute name");
    if (test && test->kind != V_STRING) fail(I, line, "the test of select / reject must be named by a string");
    if (test && !in_list(TESTS, test->s, test->n)) fail(I, line, "the test '%.*s' is not in attn.c's Jinja subset", (int)test->n, test->s);
    Args rest = {0};
    for (int i = first_test + 1; i < a->n; i++) rest.pos[rest.n++] = a->pos[i];
    for (int i = 0; i < in->n; i++) {
        Value x = by_attr ? attribute_of(I, &in->items[i], attr, line) : in->items[i];
        int ok = test ? apply_test(I, test->s, test->n, &x, &rest, line) : truthy(&x);
        if (ok == keep) list_push(I, out, in->items[i]);
    }
    return list_value(out);
}

static Value apply_filter(Interp *I, const Node *e, Value v);

static Value indent(Interp *I, const Value *s, const Args *a, int line) {
    const Value *w = arg(a, 0, "width");
    Buf pad = {0};
    buf_put(I, &pad, "", 0);
    if (!w || w->kind == V_INT) for (long long k = 0; k < (w ? w->i : 4) && k < 1024; k++) buf_put(I, &pad, " ", 1);
    else if (w->kind == V_STRING) buf_put(I, &pad, w->s, w->n);
    else fail(I, line, "indent(): width must be an integer or a string");
    const Value *first = arg(a, 1, "first"), *blank = arg(a, 2, "blank");
    Buf b = {0};
    buf_put(I, &b, "", 0);
    size_t i = 0;
    for (int line_no = 0; i <= s->n; line_no++) {
        const char *nl = memchr(s->s + i, '\n', s->n - i);
        size_t end = nl ? (size_t)(nl - s->s) : s->n;
        int empty = end == i;
        if ((line_no > 0 || (first && truthy(first))) && (!empty || (blank && truthy(blank)))) buf_put(I, &b, pad.p, pad.n);
        buf_put(I, &b, s->s + i, end - i);
        if (!nl) break;
        buf_put(I, &b, "\n", 1);
        i = end + 1;
    }
    return buf_value(&b);
}

static Value apply_filter_named(Interp *I, const char *name, size_t n, Value v, const Args *a, int line) {
#define IS(s) (n == strlen(s) && memcmp(name, s, n) == 0)
    if (IS("safe")) return v;
    if (IS("default") || IS("d")) {
        const Value *dflt = arg(a, 0, "default_value"), *boolean_ = arg(a, 1, "boolean");
        int use = v.kind == V_UNDEFINED || (boolean_ && truthy(boolean_) && !truthy(&v));
        return use ? (dflt ? *dflt : cstring("")) : v;
    }
    if (IS("length") || IS("count")) return integer(length_of(I, &v, line));
    if (IS("tojson")) {
        const Value *ind = arg(a, 0, "indent"), *ascii = arg(a, 1, "ensure_ascii"), *sort = arg(a, 3, "sort_keys");
        if (arg(a, 2, "separators") && arg(a, 2, "separators")->kind != V_NONE)
            fail(I, line, "tojson(separators=...) is not in attn.c's Jinja subset");
        int width = -1;
        if (ind && ind->kind != V_NONE) {
            if (ind->kind != V_INT) fail(I, line, "tojson(indent=...) must be an integer");
            width = ind->i < 0 ? 0 : ind->i > 64 ? 64 : (int)ind->i;
        }
        Buf b = {0};
        buf_put(I, &b, "", 0);
        put_json(I, &b, &v, width, 0, ascii && truthy(ascii), sort && truthy(sort), line);
        return buf_value(&b);
    }
    if (IS("string")) return str_of(I, &v);
    if (IS("list")) {
        List *l = list_new(I), *items = iterate(I, &v, line);
        for (int i = 0; i < items->n; i++) list_push(I, l, items->items[i]);
        return list_value(l);
    }
    if (IS("first") || IS("last")) {
        List *items = iterate(I, &v, line);
        if (items->n == 0) return undefined(NULL);
        return items->items[IS("first") ? 0 : items->n - 1];
    }
    if (IS("reverse")) {
        if (v.kind == V_STRING) return slice(I, &v, NULL, NULL, &(Value){.kind = V_INT, .i = -1}, line);
        List *items = iterate(I, &v, line), *l = list_new(I);
        for (int i = items->n - 1; i >= 0; i--) list_push(I, l, items->items[i]);
        return list_value(l);
    }
    if (IS("unique")) {
        List *items = iterate(I, &v, line), *l = list_new(I);
        for (int i = 0; i < items->n; i++) {
            Value lst = list_value(l);
            if (!contains(I, &lst, &items->items[i], line)) list_push(I, l, items->items[i]);
        }
        return list_value(l);
    }
    if (IS("join")) {
        const Value *sep = string_arg(I, a, 0, "d", "join", line), *attr = arg(a, 1, "attribute");
        if (attr) {
            List *items = iterate(I, &v, line), *l = list_new(I);
            for (int i = 0; i < items->n; i++) list_push(I, l, attribute_of(I, &items->items[i], attr, line));
            Value mapped = list_value(l);
            return join(I, &mapped, sep, line);
        }
        return join(I, &v, sep, line);
    }
    if (IS("items")) {
        if (v.kind == V_UNDEFINED) return list_value(list_new(I));
        if (v.kind != V_DICT) fail(I, line, "items: expected a dict, not %s", kind_name(&v));
        Value m = method(I, &v, M_ITEMS);
        return call_method(I, &m, a, line);
    }
    if (IS("selectattr") || IS("rejectattr")) return select_items(I, &v, a, 1, IS("selectattr"), line);
    if (IS("select") || IS("reject")) return select_items(I, &v, a, 0, IS("select"), line);
    if (IS("map")) {
        List *items = truthy(&v) ? iterate(I, &v, line) : list_new(I), *l = list_new(I);
        const Value *attr = arg(a, -1, "attribute"), *fname = arg(a, 0, NULL);
        if (attr) {
            const Value *dflt = arg(a, -1, "default");
            for (int i = 0; i < items->n; i++) {
                Value x = attribute_of(I, &items->items[i], attr, line);
                list_push(I, l, x.kind == V_UNDEFINED && dflt ? *dflt : x);
            }
            return list_value(l);
        }
        if (!fname || fname->kind != V_STRING || !in_list(FILTERS, fname->s, fname->n))
            fail(I, line, "map() needs attribute=... or the name of a filter in attn.c's Jinja subset");
        Args rest = {0};
        for (int i = 1; i < a->n; i++) rest.pos[rest.n++] = a->pos[i];
        for (int i = 0; i < items->n; i++) list_push(I, l, apply_filter_named(I, fname->s, fname->n, items->items[i], &rest, line));
        return list_value(l);
    }
    if (IS("int")) {
        if (v.kind == V_INT || v.kind == V_BOOL) return integer(v.i);
        if (v.kind == V_FLOAT && isfinite(v.f) && fabs(v.f) < 9e18) return integer((long long)v.f);
        if (v.kind == V_STRING) {
            char tmp[64];
            size_t m = v.n < sizeof tmp - 1 ? v.n : sizeof tmp - 1;
            memcpy(tmp, v.s, m), tmp[m] = '\0';
            char *end;
            double d = strtod(tmp, &end);
            if (end != tmp && isfinite(d) && fabs(d) < 9e18) return integer((long long)d);
        }
        const Value *dflt = arg(a, 0, "default");
        return dflt ? *dflt : integer(0);
    }
    if (IS("float")) {
        if (is_number(&v)) return floating(number_of(&v));
        if (v.kind == V_STRING) {
            char tmp[64];
            size_t m = v.n < sizeof tmp - 1 ? v.n : sizeof tmp - 1;
            memcpy(tmp, v.s, m), tmp[m] = '\0';
            char *end;
            double d = strtod(tmp, &end);
            if (end != tmp) return floating(d);
        }
        const Value *dflt = arg(a, 0, "default");
        return dflt ? *dflt : floating(0.0);
    }
    if (IS("abs")) {
        if (v.kind == V_FLOAT) return floating(fabs(v.f));
        if (v.kind == V_INT || v.kind == V_BOOL) return integer(checked(I, v.i == LLONG_MIN, v.i < 0 ? -v.i : v.i, line));
        fail(I, line, "bad operand type for abs(): '%s'", kind_name(&v));
    }
    /* the rest work on the text of the value */
    Value s = str_of(I, &v);
    if (IS("trim")) return strip(&s, string_arg(I, a, 0, "chars", "trim", line), 1, 1);
    if (IS("upper")) return case_mapped(I, &s, 1);
    if (IS("lower")) return case_mapped(I, &s, 0);
    if (IS("capitalize")) return case_mapped(I, &s, 2);
    if (IS("title")) { /* jinja2's title: a word starts after a space, "-", "(", "{", "[" or "<" */
        Value t = case_mapped(I, &s, 0);
        char *p = (char *)t.s;
        for (size_t i = 0; i < t.n; i++)
            if ((i == 0 || strchr(" \t\n\r\f\v-({[<", p[i - 1])) && p[i] >= 'a' && p[i] <= 'z') p[i] = (char)(p[i] - 32);
        return t;
    }
    if (IS("replace")) {
        const Value *old = arg(a, 0, "old"), *new_ = arg(a, 1, "new");
        if (!old || !new_) fail(I, line, "replace needs two arguments");
        Value o = str_of(I, old), w = str_of(I, new_);
        return replace(I, &s, &o, &w, int_arg(I, a, 2, "count", -1, "replace", line));
    }
    if (IS("indent")) return indent(I, &s, a, line);
    if (IS("escape") || IS("e")) {
        Buf b = {0};
        buf_put(I, &b, "", 0);
        for (size_t i = 0; i < s.n; i++) {
            const char *r = s.s[i] == '&' ? "&amp;" : s.s[i] == '<' ? "&lt;" : s.s[i] == '>' ? "&gt;" : s.s[i] == '"' ? "&#34;" : s.s[i] == '\'' ? "&#39;" : NULL;
            if (r) buf_str(I, &b, r);
            else buf_put(I, &b, s.s + i, 1);
        }
        return buf_value(&b);
    }
    fail(I, line, "the filter '%.*s' is not in attn.c's Jinja subset", (int)n, name);
#undef IS
}

static Value apply_filter(Interp *I, const Node *e, Value v) {
    Args a;
    eval_args(I, e, &a);
    return apply_filter_named(I, e->name, e->name_len, v, &a, e->line);
}

static Value eval_node(Interp *I, const Node *e) {
    switch (e->kind) {
    case E_CONST: return e->value;
    case E_NAME: {
        Value *v = lookup(I, e->name, e->name_len);
        if (v) return *v;
        char *name = alloc(I, e->name_len + 1);
        memcpy(name, e->name, e->name_len);
        return undefined(name);
    }
    case E_ATTR: {
        Value obj = eval(I, e->a);
        return get_attr(I, &obj, e->name, e->name_len, e->line);
    }
    case E_ITEM: {
        Value obj = eval(I, e->a), key = eval(I, e->b);
        return get_item(I, &obj, &key, e->line);
    }
    case E_SLICE: {
        Value obj = eval(I, e->a), p[3];
        const Node *parts[3] = {e->b, e->c, e->d};
        for (int k = 0; k < 3; k++) p[k] = parts[k] ? eval(I, parts[k]) : none();
        return slice(I, &obj, &p[0], &p[1], &p[2], e->line);
    }
    case E_CALL: return call(I, e);
    case E_FILTER: return apply_filter(I, e, eval(I, e->a));
    case E_TEST: {
        Value v = eval(I, e->a);
        Args a;
        eval_args(I, e, &a);
        int r = apply_test(I, e->name, e->name_len, &v, &a, e->line);
        return boolean(e->op ? !r : r);
    }
    case E_NOT: {
        Value v = eval(I, e->a);
        return boolean(!truthy(&v));
    }
    case E_NEG:
    case E_POS: {
        Value v = eval(I, e->a);
        if (v.kind == V_FLOAT) return floating(e->kind == E_NEG ? -v.f : v.f);
        if (v.kind != V_INT && v.kind != V_BOOL) fail(I, e->line, "bad operand type for unary %c: '%s'", e->kind == E_NEG ? '-' : '+', kind_name(&v));
        return integer(e->kind == E_NEG ? checked(I, v.i == LLONG_MIN, -v.i, e->line) : v.i);
    }
    case E_BINARY: {
        Value a = eval(I, e->a), b = eval(I, e->b);
        return arithmetic(I, e->op, &a, &b, e->line);
    }
    case E_AND:
    case E_OR: { /* Python: the operand that decides */
        Value a = eval(I, e->a);
        if (truthy(&a) == (e->kind == E_OR)) return a;
        return eval(I, e->b);
    }
    case E_COMPARE: {
        Value left = eval(I, e->a);
        for (int k = 0; k < e->n_kids; k++) {
            const Node *o = e->kids[k];
            Value right = eval(I, o->a);
            int ok;
            if (!strcmp(o->op, "==")) ok = values_equal(&left, &right);
            else if (!strcmp(o->op, "!=")) ok = !values_equal(&left, &right);
            else if (!strcmp(o->op, "in")) ok = contains(I, &right, &left, o->line);
            else if (!strcmp(o->op, "not in")) ok = !contains(I, &right, &left, o->line);
            else {
                int c = compare_order(I, &left, &right, o->line);
                ok = o->op[0] == '<' ? (o->op[1] ? c <= 0 : c < 0) : (o->op[1] ? c >= 0 : c > 0);
            }
            if (!ok) return boolean(0);
            left = right;
        }
        return boolean(1);
    }
    case E_CONDITIONAL: {
        Value c = eval(I, e->b);
        if (truthy(&c)) return eval(I, e->a);
        return e->c ? eval(I, e->c) : undefined(NULL);
    }
    case E_LIST:
    case E_TUPLE: {
        List *l = list_new(I);
        l->is_tuple = e->kind == E_TUPLE;
        for (int k = 0; k < e->n_kids; k++) list_push(I, l, eval(I, e->kids[k]));
        return list_value(l);
    }
    case E_DICT: {
        Dict *d = dict_new(I);
        for (int k = 0; k + 1 < e->n_kids; k += 2) {
            Value key = eval(I, e->kids[k]);
            dict_set(I, d, key, eval(I, e->kids[k + 1]));
        }
        return dict_value(d, V_DICT);
    }
    case E_CONCAT: {
        Buf b = {0};
        buf_put(I, &b, "", 0);
        for (int k = 0; k < e->n_kids; k++) {
            Value v = eval(I, e->kids[k]);
            put_str(I, &b, &v);
        }
        return buf_value(&b);
    }
    }
    fail(I, e->line, "cannot evaluate this expression");
}

/* Every evaluation and statement counts towards MAX_STEPS; their nesting (macros calling macros) towards
 * MAX_RUN_DEPTH, which keeps the C stack bounded. */
static void enter_run(Interp *I, int line) {
    step(I, line);
    if (++I->run_depth > MAX_RUN_DEPTH) fail(I, line, "the template recurses more than %d levels deep", MAX_RUN_DEPTH);
}

static Value eval(Interp *I, const Node *e) {
    enter_run(I, e->line);
    Value v = eval_node(I, e);
    I->run_depth--;
    return v;
}

/* for a, b in ...: unpack one item into the targets */
static void bind_targets(Interp *I, const Node *s, const Value *item) {
    if (s->n_kids == 1) {
        assign(I, s->kids[0]->name, s->kids[0]->name_len, *item);
        return;
    }
    if (item->kind != V_LIST || item->list->n != s->n_kids)
        fail(I, s->line, "cannot unpack %s into %d names", kind_name(item), s->n_kids);
    for (int k = 0; k < s->n_kids; k++) assign(I, s->kids[k]->name, s->kids[k]->name_len, item->list->items[k]);
}

static int exec_for(Interp *I, const Node *s) {
    Value seq = eval(I, s->a);
    List *all = iterate(I, &seq, s->line), *items = all;
    Scope *outer = I->scope, *inner = alloc(I, sizeof *inner);
    inner->vars = dict_new(I), inner->parent = outer;
    I->scope = inner;
    if (s->d) { /* for x in xs if cond: the loop (and loop.length) sees only the items that pass */
        items = list_new(I);
        for (int i = 0; i < all->n; i++) {
            bind_targets(I, s, &all->items[i]);
            Value ok = eval(I, s->d);
            if (truthy(&ok)) list_push(I, items, all->items[i]);
        }
    }
    /* loop.index, ...: the keys once, their values rewritten in place each iteration */
    static const char *const keys[] = {"index", "index0", "revindex", "revindex0", "first", "last", "length",
                                       "depth", "depth0", "previtem", "nextitem"};
    Dict *loop = dict_new(I);
    for (int k = 0; k < 11; k++) dict_set_str(I, loop, keys[k], none());
    assign(I, "loop", 4, dict_value(loop, V_DICT));
    for (int i = 0; i < items->n; i++) {
        step(I, s->line);
        long long n = items->n;
        Value *v = loop->vals;
        v[0] = integer(i + 1), v[1] = integer(i), v[2] = integer(n - i), v[3] = integer(n - i - 1);
        v[4] = boolean(i == 0), v[5] = boolean(i == n - 1), v[6] = integer(n), v[7] = integer(1), v[8] = integer(0);
        v[9] = i > 0 ? items->items[i - 1] : undefined(NULL);
        v[10] = i + 1 < n ? items->items[i + 1] : undefined(NULL);
        bind_targets(I, s, &items->items[i]);
        if (exec(I, s->b) == FLOW_BREAK) break;
    }
    if (items->n == 0 && s->c) exec(I, s->c);
    I->scope = outer;
    return FLOW_NORMAL;
}

static int exec_node(Interp *I, const Node *s);
static int exec(Interp *I, const Node *s) {
    enter_run(I, s->line);
    int flow = exec_node(I, s);
    I->run_depth--;
    return flow;
}

static int exec_node(Interp *I, const Node *s) {
    switch (s->kind) {
    case S_BODY:
        for (int k = 0; k < s->n_kids; k++) {
            int flow = exec(I, s->kids[k]);
            if (flow != FLOW_NORMAL) return flow;
        }
        return FLOW_NORMAL;
    case S_TEXT:
        buf_put(I, I->out, s->value.s, s->value.n);
        break;
    case S_OUTPUT: {
        Value v = eval(I, s->a);
        if (v.kind == V_BUILTIN || v.kind == V_MACRO || v.kind == V_METHOD) fail(I, s->line, "cannot print a function");
        put_str(I, I->out, &v);
        break;
    }
    case S_IF: {
        Value c = eval(I, s->a);
        if (truthy(&c)) return exec(I, s->b);
        if (s->c) return exec(I, s->c);
        break;
    }
    case S_FOR: return exec_for(I, s);
    case S_SET: {
        Value v = eval(I, s->b);
        if (s->n_kids == 1 && s->kids[0]->kind == E_ATTR) { /* set ns.attr = value */
            const Node *t = s->kids[0];
            Value *ns = lookup(I, t->a->name, t->a->name_len);
            if (!ns || ns->kind != V_NAMESPACE) fail(I, s->line, "cannot assign attribute on non-namespace object");
            dict_set(I, ns->dict, string(t->name, t->name_len), v);
            break;
        }
        for (int k = 0; k < s->n_kids; k++)
            if (s->kids[k]->kind != E_NAME) fail(I, s->line, "only a single namespace attribute can be assigned");
        bind_targets(I, s, &v);
        break;
    }
    case S_SET_BLOCK: {
        Buf *saved = I->out, out = {0};
        buf_put(I, &out, "", 0);
        I->out = &out;
        exec(I, s->b);
        I->out = saved;
        assign(I, s->kids[0]->name, s->kids[0]->name_len, buf_value(&out));
        break;
    }
    case S_MACRO: {
        Value m = {.kind = V_MACRO};
        m.macro = s;
        assign(I, s->name, s->name_len, m);
        break;
    }
    case S_BREAK: return FLOW_BREAK;
    case S_CONTINUE: return FLOW_CONTINUE;
    }
    if (I->out->n > (size_t)16 << 20) fail(I, s->line, "the template's output passes 16 MiB");
    return FLOW_NORMAL;
}

/* ---------------------------------------------------------------------------------------------
 * JSON (the messages of --render-chat) into values */

typedef struct {
    Interp *I;
    const char *start, *p, *end;
    int depth;
} JsonReader;

static void json_fail(JsonReader *r, const char *what) __attribute__((noreturn));
static void json_fail(JsonReader *r, const char *what) {
    fail(r->I, 0, "messages JSON: %s at byte %ld", what, (long)(r->p - r->start));
}

static void json_space(JsonReader *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) r->p++;
}

static unsigned json_hex4(JsonReader *r) {
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        int h = r->p < r->end ? hex_value(*r->p) : -1;
        if (h < 0) json_fail(r, "bad \\u escape");
        v = v * 16 + (unsigned)h, r->p++;
    }
    return v;
}

static Value json_value(JsonReader *r);

static Value json_string(JsonReader *r) {
    Buf b = {0};
    buf_put(r->I, &b, "", 0);
    r->p++; /* the opening quote */
    for (;;) {
        if (r->p >= r->end) json_fail(r, "unterminated string");
        char c = *r->p++;
        if (c == '"') break;
        if ((unsigned char)c < 0x20) json_fail(r, "a control character inside a string");
        if (c != '\\') {
            buf_put(r->I, &b, &c, 1);
            continue;
        }
        if (r->p >= r->end) json_fail(r, "unterminated string");
        c = *r->p++;
        const char *simple = strchr("\"\\/bfnrt", c);
        if (c && simple) {
            static const char out[] = "\"\\/\b\f\n\r\t";
            buf_put(r->I, &b, out + (simple - "\"\\/bfnrt"), 1);
        } else if (c == 'u') {
            unsigned cp = json_hex4(r);
            if (cp >= 0xD800 && cp <= 0xDBFF && r->end - r->p >= 6 && r->p[0] == '\\' && r->p[1] == 'u') {
                const char *save = r->p;
                r->p += 2;
                unsigned lo = json_hex4(r);
                if (lo >= 0xDC00 && lo <= 0xDFFF) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                else r->p = save;
            }
            put_code_point(r->I, &b, cp);
        } else {
            json_fail(r, "bad escape in a string");
        }
    }
    return buf_value(&b);
}

static Value json_value(JsonReader *r) {
    json_space(r);
    if (r->p >= r->end) json_fail(r, "unexpected end");
    if (++r->depth > MAX_DEPTH) json_fail(r, "nested too deeply");
    Value v;
    char c = *r->p;
    if (c == '"') v = json_string(r);
    else if (c == '[' || c == '{') {
        int is_list = c == '[';
        List *l = is_list ? list_new(r->I) : NULL;
        Dict *d = is_list ? NULL : dict_new(r->I);
        r->p++;
        json_space(r);
        int first = 1;
        while (r->p < r->end && *r->p != (is_list ? ']' : '}')) {
            if (!first) {
                if (*r->p != ',') json_fail(r, "expected ','");
                r->p++;
            }
            first = 0;
            if (is_list) list_push(r->I, l, json_value(r));
            else {
                json_space(r);
                if (r->p >= r->end || *r->p != '"') json_fail(r, "expected a string key");
                Value key = json_string(r);
                json_space(r);
                if (r->p >= r->end || *r->p != ':') json_fail(r, "expected ':'");
                r->p++;
                dict_set(r->I, d, key, json_value(r));
            }
            json_space(r);
        }
        if (r->p >= r->end) json_fail(r, "unexpected end");
        r->p++;
        v = is_list ? list_value(l) : dict_value(d, V_DICT);
    } else if (r->end - r->p >= 4 && !memcmp(r->p, "true", 4)) v = boolean(1), r->p += 4;
    else if (r->end - r->p >= 5 && !memcmp(r->p, "false", 5)) v = boolean(0), r->p += 5;
    else if (r->end - r->p >= 4 && !memcmp(r->p, "null", 4)) v = none(), r->p += 4;
    else if (c == '-' || (c >= '0' && c <= '9')) {
        char tmp[64];
        size_t n = 0;
        while (r->p < r->end && n < sizeof tmp - 1 && strchr("0123456789+-.eE", *r->p)) tmp[n++] = *r->p++;
        tmp[n] = '\0';
        char *end;
        if (strpbrk(tmp, ".eE")) v = floating(strtod(tmp, &end));
        else {
            long long x = strtoll(tmp, &end, 10);
            v = integer(x);
        }
        if (*end) json_fail(r, "bad number");
    } else {
        json_fail(r, "unexpected character");
    }
    r->depth--;
    return v;
}

/* ---------------------------------------------------------------------------------------------
 * rendering */

static Value variable_value(Interp *I, const ChatVariable *v) { return string_copy(I, v->value, (size_t)v->value_len); }

/* One render of the template for the messages (a list value); the output in *out. */
static Value render(Interp *I, const ChatSection *chat, const Node *root, Value messages, int add_generation_prompt) {
    Scope *globals = alloc(I, sizeof *globals);
    globals->vars = dict_new(I);
    I->root = I->scope = globals;
    static const char *const builtins[] = {"raise_exception", "namespace", "range", "strftime_now", "dict"};
    for (int k = 0; k < 5; k++) {
        Value f = {.kind = V_BUILTIN};
        f.i = k;
        dict_set_str(I, globals->vars, builtins[k], f);
    }
    for (int k = 0; k < chat->n_variables; k++)
        dict_set(I, globals->vars, string_copy(I, chat->variables[k].name, (size_t)chat->variables[k].name_len),
                 variable_value(I, &chat->variables[k]));
    dict_set_str(I, globals->vars, "messages", messages);
    dict_set_str(I, globals->vars, "add_generation_prompt", boolean(add_generation_prompt));
    dict_set_str(I, globals->vars, "tools", none());
    dict_set_str(I, globals->vars, "documents", none());
    Buf *out = alloc(I, sizeof *out);
    buf_put(I, out, "", 0);
    I->out = out;
    exec(I, root);
    return buf_value(out);
}

static Node *parse_template(Interp *I, const ChatSection *chat) {
    if (!chat->template_text) fail(I, 0, "the model has no chat template");
    /* newlines as jinja2 reads them: \r\n and \r become \n, and one newline at the very end is dropped */
    char *src = alloc(I, chat->template_len + 1);
    size_t n = 0;
    for (size_t i = 0; i < chat->template_len; i++) {
        char c = chat->template_text[i];
        if (c == '\r') {
            if (i + 1 < chat->template_len && chat->template_text[i + 1] == '\n') i++;
            c = '\n';
        }
        src[n++] = c;
    }
    if (n > 0 && src[n - 1] == '\n') n--;
    lex(I, src, n);
    I->pos = 0;
    I->depth = 0;
    Node *root = parse_body(I, NULL);
    I->depth = 0;
    return root;
}

static Value message_value(Interp *I, const char *role, const char *content, size_t len) {
    Dict *d = dict_new(I);
    dict_set_str(I, d, "role", cstring(role));
    dict_set_str(I, d, "content", string_copy(I, content, len));
    return dict_value(d, V_DICT);
}

/* Whether the template shows a system message (llama.cpp's probe: a system message, then a user one) */
static int supports_system_role(Interp *I, const ChatSection *chat, const Node *root) {
    static const char needle[] = "<System Needle>";
    Interp probe = *I;
    probe.chunks = NULL, probe.allocated = 0, probe.steps = 0;
    char err[8];
    probe.err = err, probe.errlen = sizeof err;
    volatile int supported = 0;
    if (setjmp(probe.fail_jump) == 0) {
        List *l = list_new(&probe);
        list_push(&probe, l, message_value(&probe, "system", needle, sizeof needle - 1));
        list_push(&probe, l, message_value(&probe, "user", "Hey", 3));
        Value out = render(&probe, chat, root, list_value(l), 0);
        supported = find_bytes(out.s, out.n, needle, sizeof needle - 1) != NULL;
    }
    arena_free(&probe);
    return supported;
}

/* llama.cpp's polyfill for a template without a system role: each system message waits, joined with "\n",
 * and goes before the next user message's content ("\n" between); before any other message, or at the end,
 * it becomes a user message of its own */
static Value fold_system_messages(Interp *I, Value messages) {
    List *in = messages.list, *out = list_new(I);
    Buf pending = {0};
    buf_put(I, &pending, "", 0);
    for (int i = 0; i < in->n; i++) {
        Value m = in->items[i], role = {.kind = V_UNDEFINED}, content = {.kind = V_UNDEFINED};
        if (m.kind == V_DICT) {
            int r = dict_find_str(m.dict, "role", 4), c = dict_find_str(m.dict, "content", 7);
            if (r >= 0) role = m.dict->vals[r];
            if (c >= 0) content = m.dict->vals[c];
        }
        int is_system = role.kind == V_STRING && role.n == 6 && !memcmp(role.s, "system", 6);
        int is_user = role.kind == V_STRING && role.n == 4 && !memcmp(role.s, "user", 4);
        if (content.kind == V_STRING && is_system) {
            if (pending.n) buf_put(I, &pending, "\n", 1);
            buf_put(I, &pending, content.s, content.n);
            continue;
        }
        if (pending.n && content.kind == V_STRING && is_user) {
            Dict *d = dict_new(I);
            for (int k = 0; k < m.dict->n; k++) dict_set(I, d, m.dict->keys[k], m.dict->vals[k]);
            Buf joined = {0};
            buf_put(I, &joined, pending.p, pending.n);
            if (content.n) buf_put(I, &joined, "\n", 1), buf_put(I, &joined, content.s, content.n);
            dict_set_str(I, d, "content", buf_value(&joined));
            m = dict_value(d, V_DICT);
            pending.n = 0;
        } else if (pending.n) {
            list_push(I, out, message_value(I, "user", pending.p, pending.n));
            pending = (Buf){0};
            buf_put(I, &pending, "", 0);
        }
        list_push(I, out, m);
    }
    if (pending.n) list_push(I, out, message_value(I, "user", pending.p, pending.n));
    return list_value(out);
}

static int has_system_message(Value messages) {
    for (int i = 0; i < messages.list->n; i++) {
        Value m = messages.list->items[i];
        if (m.kind != V_DICT) continue;
        int r = dict_find_str(m.dict, "role", 4);
        if (r >= 0 && m.dict->vals[r].kind == V_STRING && m.dict->vals[r].n == 6 && !memcmp(m.dict->vals[r].s, "system", 6))
            return 1;
    }
    return 0;
}

static char *finish(Interp *I, Value out, size_t *len) {
    char *text = malloc(out.n + 1);
    if (text) {
        memcpy(text, out.s, out.n);
        text[out.n] = '\0';
        *len = out.n;
    } else {
        snprintf(I->err, I->errlen, "out of memory");
    }
    arena_free(I);
    return text;
}

typedef struct {
    const ChatMessage *messages;
    int n;
    const char *json;
    size_t json_len;
} Conversation;

static char *render_conversation(const ChatSection *chat, const Conversation *conv, int add_generation_prompt,
                                 size_t *len, char *err, size_t errlen) {
    Interp I = {0};
    I.err = err, I.errlen = errlen;
    if (setjmp(I.fail_jump)) {
        arena_free(&I);
        return NULL;
    }
    Node *root = parse_template(&I, chat);
    Value messages;
    if (conv->json) {
        JsonReader r = {&I, conv->json, conv->json, conv->json + conv->json_len, 0};
        messages = json_value(&r);
        json_space(&r);
        if (r.p != r.end) fail(&I, 0, "messages JSON: text after the list");
        if (messages.kind != V_LIST) fail(&I, 0, "messages JSON: expected a list of {\"role\": ..., \"content\": ...} objects");
    } else {
        List *l = list_new(&I);
        for (int i = 0; i < conv->n; i++)
            list_push(&I, l, message_value(&I, conv->messages[i].role, conv->messages[i].content, conv->messages[i].content_len));
        messages = list_value(l);
    }
    for (int i = 0; i < messages.list->n; i++)
        if (messages.list->items[i].kind != V_DICT) fail(&I, 0, "message %d is not an object", i);
    if (has_system_message(messages) && !supports_system_role(&I, chat, root)) messages = fold_system_messages(&I, messages);
    Value out = render(&I, chat, root, messages, add_generation_prompt);
    return finish(&I, out, len);
}

char *chat_render(const ChatSection *chat, const ChatMessage *messages, int n, int add_generation_prompt, size_t *len,
                  char *err, size_t errlen) {
    Conversation conv = {messages, n, NULL, 0};
    return render_conversation(chat, &conv, add_generation_prompt, len, err, errlen);
}

char *chat_render_json(const ChatSection *chat, const char *json, size_t json_len, int add_generation_prompt,
                       size_t *len, char *err, size_t errlen) {
    Conversation conv = {NULL, 0, json, json_len};
    return render_conversation(chat, &conv, add_generation_prompt, len, err, errlen);
}

int chat_turn_end(const ChatSection *chat, char **text, size_t *len, char *err, size_t errlen) {
    static const char needle[] = "\x02" "assistant words" "\x03";
    ChatMessage probe[2] = {{"user", "Hi", 2}, {"assistant", needle, sizeof needle - 1}};
    size_t n;
    char *out = chat_render(chat, probe, 2, 0, &n, err, errlen);
    if (!out) return -1;
    const char *at = find_bytes(out, n, needle, sizeof needle - 1);
    if (!at) {
        free(out);
        snprintf(err, errlen, "chat template: an assistant message does not appear in what the template renders");
        return -1;
    }
    size_t start = (size_t)(at - out) + sizeof needle - 1;
    memmove(out, out + start, n - start + 1);
    *text = out;
    *len = n - start;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * the chat section of the model file (docs/FORMAT.md) */

static int utf8_valid(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint32_t c;
        int len = utf8_decode((const unsigned char *)s + i, n - i, &c);
        if (c == 0xFFFD && !(n - i >= 3 && !memcmp(s + i, "\xEF\xBF\xBD", 3))) return 0;
        if (c == 0) return 0;
        i += (size_t)len;
    }
    return 1;
}

static int section_fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(err, errlen, "chat section: ");
    if (n >= 0 && (size_t)n < errlen) vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

int chat_section_load(ChatSection *chat, const unsigned char *data, size_t size, char *err, size_t errlen) {
    memset(chat, 0, sizeof *chat);
    if (size == 0) return 0;
    size_t at = 0;
#define READ_U32(v)                                                                                      \
    do {                                                                                                 \
        if (size - at < 4) return section_fail(err, errlen, "truncated at byte %zu of %zu", at, size);   \
        v = (uint32_t)data[at] | (uint32_t)data[at + 1] << 8 | (uint32_t)data[at + 2] << 16 |            \
            (uint32_t)data[at + 3] << 24;                                                                \
        at += 4;                                                                                         \
    } while (0)
    uint32_t n_vars, len;
    READ_U32(n_vars);
    if (n_vars > CHAT_MAX_VARIABLES) return section_fail(err, errlen, "%u variables (at most %d)", n_vars, CHAT_MAX_VARIABLES);
    for (uint32_t k = 0; k < n_vars; k++) {
        ChatVariable *v = &chat->variables[k];
        READ_U32(len);
        if (len < 1 || len > 64 || len > size - at) return section_fail(err, errlen, "variable %u has a name of %u bytes", k, len);
        v->name = (const char *)data + at, v->name_len = (int)len;
        for (uint32_t i = 0; i < len; i++) {
            char c = v->name[i];
            int ok = c == '_' || ((c | 32) >= 'a' && (c | 32) <= 'z') || (i > 0 && c >= '0' && c <= '9');
            if (!ok) return section_fail(err, errlen, "variable %u's name is not an identifier", k);
        }
        at += len;
        READ_U32(len);
        if (len > MAX_VARIABLE_BYTES || len > size - at)
            return section_fail(err, errlen, "variable %u has a value of %u bytes (at most %d, and inside the section)", k, len, MAX_VARIABLE_BYTES);
        v->value = (const char *)data + at, v->value_len = (int)len;
        if (!utf8_valid(v->value, len)) return section_fail(err, errlen, "variable %u's value is not UTF-8 text", k);
        at += len;
    }
    chat->n_variables = (int)n_vars;
    READ_U32(len);
    if (len < 1 || len > MAX_TEMPLATE_BYTES || len > size - at)
        return section_fail(err, errlen, "the template has %u bytes (1 .. %d, and inside the section)", len, MAX_TEMPLATE_BYTES);
    chat->template_text = (const char *)data + at, chat->template_len = len;
    if (!utf8_valid(chat->template_text, len)) return section_fail(err, errlen, "the template is not UTF-8 text");
    at += len;
    if (at != size) return section_fail(err, errlen, "%zu unexpected bytes after the template", size - at);
#undef READ_U32
    return 0;
}
