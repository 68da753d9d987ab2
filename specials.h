/* specials.h - finding special tokens written in a prompt, in time that does not grow with their number.
 *
 * A tokenizer may list many special or user-defined tokens (a vocabulary of 2^20 of them fits the format),
 * and the prompt must be cut at the longest one that starts at each position. Trying every token at every
 * byte costs (prompt bytes x tokens); an Aho-Corasick automaton (Aho & Corasick 1975) over the tokens'
 * bytes finds, in one pass, every token that ends at each position. Run over the text backwards with the
 * tokens spelled backwards, "ends at" becomes "starts at", and the longest token starting at each byte
 * comes out in one pass, whatever the number of tokens. */
#ifndef ATTN_SPECIALS_H
#define ATTN_SPECIALS_H

#include <stddef.h>

typedef struct {
    int n_nodes;        /* trie nodes; node 0 is the root (the empty string) */
    int *first_child;   /* [n_nodes] first child, -1 if none; children of one node are linked by next_sibling */
    int *next_sibling;  /* [n_nodes] */
    unsigned char *byte;/* [n_nodes] the byte on the edge into the node */
    int *fail;          /* [n_nodes] the node of the longest proper suffix of this node's string */
    int *longest;       /* [n_nodes] id of the longest token that is a suffix of this node's string, -1 if none */
    int root_child[256];/* children of the root by byte (the root is where most steps start) */
} SpecialMatcher;

/* Builds the automaton of the tokens ids[0..n) (their bytes piece[id][0 .. piece_len[id]), none empty).
 * Between tokens of identical bytes the smaller id wins. Returns 0, or -1 when out of memory or when the
 * tokens' bytes together exceed INT_MAX. */
int specials_build(SpecialMatcher *m, const int *ids, int n, const unsigned char *const *piece, const int *piece_len);
/* out[i] = id of the longest token that starts at s[i] and ends inside s[0..n), or -1, for every i < n. */
void specials_longest_at(const SpecialMatcher *m, const unsigned char *s, size_t n, int *out);
void specials_free(SpecialMatcher *m);

#endif
