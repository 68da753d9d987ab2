/* sample.c - the sampler chain of sample.h. Each stage narrows a list of candidate tokens, as llama.cpp's
 * llama_sampler_* stages do on their llama_token_data_array; the definitions follow llama.cpp's. */
#include "sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct Candidate {
    int id;
    float logit;
    float p; /* probability among the candidates, once computed */
} Candidate;

int sampler_init(Sampler *s, const SamplerSettings *set, int vocab_size) {
    memset(s, 0, sizeof *s);
    s->set = *set;
    s->vocab_size = vocab_size;
    s->rng = set->seed * 2654435761ULL + 1; /* xorshift must not start at 0 */
    int window = set->repeat_last_n > 0 ? set->repeat_last_n : 1;
    s->recent = malloc((size_t)window * sizeof *s->recent);
    s->penalized = calloc((size_t)vocab_size, 1);
    s->cand = malloc((size_t)vocab_size * sizeof *s->cand);
    if (!s->recent || !s->penalized || !s->cand) {
        sampler_free(s);
        return -1;
    }
    return 0;
}

void sampler_free(Sampler *s) {
    free(s->recent), free(s->penalized), free(s->cand);
    memset(s, 0, sizeof *s);
}

void sampler_accept(Sampler *s, int token) {
    if (s->set.repeat_last_n <= 0) return;
    s->recent[s->next_recent] = token;
    s->next_recent = (s->next_recent + 1) % s->set.repeat_last_n;
    if (s->n_recent < s->set.repeat_last_n) s->n_recent++;
}

static uint32_t random_u32(uint64_t *state) { /* xorshift64* */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1DULL) >> 32);
}
static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }

/* Repetition penalty (Keskar et al. 2019, CTRL), as llama.cpp applies it: each distinct token among the last
 * repeat_last_n has its logit divided by R when positive and multiplied by R otherwise (dividing a negative
 * logit would make the token more likely). */
static void penalize_repeats(Sampler *s, float *logits) {
    float r = s->set.repeat_penalty;
    if (r == 1.0f || s->n_recent == 0) return;
    for (int i = 0; i < s->n_recent; i++) {
        int id = s->recent[i];
        if (id < 0 || id >= s->vocab_size || s->penalized[id]) continue;
        s->penalized[id] = 1;
        logits[id] = logits[id] <= 0.0f ? logits[id] * r : logits[id] / r;
    }
    for (int i = 0; i < s->n_recent; i++)
        if (s->recent[i] >= 0 && s->recent[i] < s->vocab_size) s->penalized[s->recent[i]] = 0;
}

static int by_logit_desc(const void *a, const void *b) {
    float x = ((const Candidate *)a)->logit, y = ((const Candidate *)b)->logit;
    if (x != y) return (x < y) - (x > y);
    return ((const Candidate *)a)->id - ((const Candidate *)b)->id; /* ties: the lower id first, deterministic */
}

/* top-k (Fan et al. 2018): the k largest logits. A min-heap of the k best so far, over one pass: O(n log k). */
static void heap_sift_down(Candidate *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && by_logit_desc(&h[l], &h[m]) > 0) m = l; /* the heap's root is the worst candidate kept */
        if (r < n && by_logit_desc(&h[r], &h[m]) > 0) m = r;
        if (m == i) return;
        Candidate t = h[i];
        h[i] = h[m], h[m] = t;
        i = m;
    }
}

static int keep_top_k(Candidate *c, int n, int k) {
    if (k <= 0 || k >= n) return n;
    for (int i = k / 2 - 1; i >= 0; i--) heap_sift_down(c, k, i);
    for (int i = k; i < n; i++)
        if (by_logit_desc(&c[i], &c[0]) < 0) { /* better than the worst kept */
            c[0] = c[i];
            heap_sift_down(c, k, 0);
        }
    return k;
}

/* p_i = softmax over the candidates' logits (at temperature 1), in double for the sum */
/* The largest logit, as a walk from c[0] keeping the greater finds it, in 8 running maxima (the same value; only
 * a zero's sign could differ, which neither exp(x - max) nor max + log(min_p) sees): no 4-cycle chain a token */
static float max_logit(const Candidate *c, int n) {
    float m[8];
    for (int k = 0; k < 8; k++) m[k] = c[0].logit;
    for (int i = 0; i < n; i++)
        if (c[i].logit > m[i % 8]) m[i % 8] = c[i].logit;
    float max = m[0];
    for (int k = 1; k < 8; k++)
        if (m[k] > max) max = m[k];
    return max;
}

static void probabilities(Candidate *c, int n) {
    float max = max_logit(c, n);
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += c[i].p = expf(c[i].logit - max);
    for (int i = 0; i < n; i++) c[i].p = (float)(c[i].p / sum);
}

/* top-p (nucleus, Holtzman et al. 2019): the most likely tokens, in order, up to and including the one where
 * their summed probability first reaches p. Tokens below (1 - p) / (n - 1) can never be in it (were they, all
 * n - 1 others would have to sum to less than p), so only the rest is sorted. */
static int keep_top_p(Candidate *c, int n, float p) {
    if (p >= 1.0f || n <= 1) return n;
    probabilities(c, n);
    float cutoff = (1.0f - p) / (float)(n - 1);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (c[i].p >= cutoff) c[m++] = c[i];
    if (m == 0) return 1; /* no finite probabilities (NaN weights): keep one token */
    qsort(c, (size_t)m, sizeof *c, by_logit_desc);
    float sum = 0.0f;
    for (int i = 0; i < m; i++) {
        sum += c[i].p;
        if (sum >= p) return i + 1;
    }
    return m;
}

/* min-p (Nguyen et al. 2024): tokens whose probability is at least min_p times the largest, i.e. whose logit
 * is at least max logit + ln(min_p) */
static int keep_min_p(Candidate *c, int n, float min_p) {
    if (min_p <= 0.0f || n <= 1) return n;
    float floor_logit = max_logit(c, n) + logf(min_p);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (c[i].logit >= floor_logit) c[m++] = c[i];
    return m > 0 ? m : 1;
}

/* The draw: softmax(logit / T) over what is left, and the token where a uniform number falls in its CDF */
static int draw(Sampler *s, Candidate *c, int n) {
    for (int i = 0; i < n; i++) c[i].logit /= s->set.temperature;
    probabilities(c, n);
    float r = random_f32(&s->rng), cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += c[i].p;
        if (r < cdf) return c[i].id;
    }
    return c[n - 1].id;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* draw() on the whole vocabulary, where no filter removed a token, with its bits (x: vocab floats of room): the
 * tempered logits and their exponentials in a plain array (no candidates copied and divided in place), the
 * largest found as max_logit finds it, and each probability divided out only as far as the cumulative walk
 * goes. 32,000 tokens:
 * ~0.2 -> ~0.1 ms a draw. */
static int draw_all(Sampler *s, const float *logits, float *x, int n) {
    float t = s->set.temperature, m[8];
    for (int i = 0; i < n; i++) x[i] = logits[i] / t;
    for (int k = 0; k < 8; k++) m[k] = x[0];
    for (int i = 0; i < n; i++)
        if (x[i] > m[i % 8]) m[i % 8] = x[i];
    float max = m[0];
    for (int k = 1; k < 8; k++)
        if (m[k] > max) max = m[k];
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += x[i] = expf(x[i] - max);
    float r = random_f32(&s->rng), cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += (float)(x[i] / sum);
        if (r < cdf) return i;
    }
    return n - 1;
}

int sampler_sample(Sampler *s, float *logits) {
    int n = s->vocab_size;
    penalize_repeats(s, logits);
    if (s->set.temperature == 0.0f) return argmax(logits, n);
    if ((s->set.top_k <= 0 || s->set.top_k >= n) && (s->set.top_p >= 1.0f || n <= 1) && (s->set.min_p <= 0.0f || n <= 1))
        return draw_all(s, logits, (float *)s->cand, n); /* cand: room for n Candidates, so for n floats */
    Candidate *c = s->cand;
    for (int i = 0; i < n; i++) c[i].id = i, c[i].logit = logits[i];
    n = keep_top_k(c, n, s->set.top_k);
    n = keep_top_p(c, n, s->set.top_p);
    n = keep_min_p(c, n, s->set.min_p);
    return draw(s, c, n);
}
