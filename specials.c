/* specials.c - an Aho-Corasick automaton over the special tokens, spelled backwards (specials.h). */
#include "specials.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* The child of node u along byte c, or -1. The root's children are a table; others a list of at most 256. */
static int child(const SpecialMatcher *m, int u, unsigned char c) {
    if (u == 0) return m->root_child[c];
    for (int v = m->first_child[u]; v >= 0; v = m->next_sibling[v])
        if (m->byte[v] == c) return v;
    return -1;
}

static int add_child(SpecialMatcher *m, int u, unsigned char c) {
    int v = m->n_nodes++;
    m->byte[v] = c;
    m->first_child[v] = -1;
    m->fail[v] = 0;
    m->longest[v] = -1;
    if (u == 0) {
        m->root_child[c] = v;
        m->next_sibling[v] = -1;
    } else {
        m->next_sibling[v] = m->first_child[u];
        m->first_child[u] = v;
    }
    return v;
}

/* One step of the automaton: from node u, read byte c (following fail links where u has no such child). */
static int step(const SpecialMatcher *m, int u, unsigned char c) {
    for (;;) {
        int v = child(m, u, c);
        if (v >= 0) return v;
        if (u == 0) return 0;
        u = m->fail[u];
    }
}

void specials_free(SpecialMatcher *m) {
    free(m->first_child);
    free(m->next_sibling);
    free(m->byte);
    free(m->fail);
    free(m->longest);
    memset(m, 0, sizeof *m);
}

int specials_build(SpecialMatcher *m, const int *ids, int n, const unsigned char *const *piece, const int *piece_len) {
    memset(m, 0, sizeof *m);
    long long total = 1;
    for (int k = 0; k < n; k++) total += piece_len[ids[k]];
    if (total > INT_MAX) return -1;
    size_t cap = (size_t)total;
    m->first_child = malloc(cap * sizeof *m->first_child);
    m->next_sibling = malloc(cap * sizeof *m->next_sibling);
    m->byte = malloc(cap);
    m->fail = malloc(cap * sizeof *m->fail);
    m->longest = malloc(cap * sizeof *m->longest);
    if (!m->first_child || !m->next_sibling || !m->byte || !m->fail || !m->longest) {
        specials_free(m);
        return -1;
    }
    for (int c = 0; c < 256; c++) m->root_child[c] = -1;
    m->n_nodes = 1;
    m->first_child[0] = m->next_sibling[0] = m->longest[0] = -1;
    m->fail[0] = 0;
    /* the trie of the tokens spelled backwards; a node where a token ends keeps its id */
    for (int k = 0; k < n; k++) {
        int id = ids[k], u = 0;
        for (int i = piece_len[id] - 1; i >= 0; i--) {
            int v = child(m, u, piece[id][i]);
            u = v >= 0 ? v : add_child(m, u, piece[id][i]);
        }
        if (m->longest[u] < 0 || id < m->longest[u]) m->longest[u] = id;
    }
    /* fail links breadth first (every node after its fail node): the longest proper suffix of a node's string
     * that is in the trie; longest[] then inherits the longest token ending there from the fail node */
    int *queue = malloc(cap * sizeof *queue), head = 0, tail = 0;
    if (!queue) {
        specials_free(m);
        return -1;
    }
    for (int c = 0; c < 256; c++)
        if (m->root_child[c] >= 0) queue[tail++] = m->root_child[c];
    while (head < tail) {
        int u = queue[head++];
        if (m->longest[u] < 0) m->longest[u] = m->longest[m->fail[u]];
        for (int v = m->first_child[u]; v >= 0; v = m->next_sibling[v]) {
            m->fail[v] = step(m, m->fail[u], m->byte[v]);
            queue[tail++] = v;
        }
    }
    free(queue);
    return 0;
}

void specials_longest_at(const SpecialMatcher *m, const unsigned char *s, size_t n, int *out) {
    int u = 0;
    for (size_t i = n; i-- > 0;) {
        u = step(m, u, s[i]);
        out[i] = m->longest[u];
    }
}
