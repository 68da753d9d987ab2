/* batch.c - many sequences on one paged cache (kvcache.c).
 *
 *   --samples N     the prompt is prefilled once; N sequences fork from it, sharing every block of it (a block
 *                   is copied only when one of them first writes into it), and decode together.
 *   --prompts FILE  continuous batching (Orca, Yu et al. 2022): up to P sequences decode together; one that
 *                   finishes leaves, and the next prompt joins at the next step. Prompts that begin with the
 *                   same blocks of tokens start from the state cached at the end of those blocks instead of
 *                   computing it again (prefix caching by block hash, as vLLM; SGLang's radix cache).
 *
 * A decode step runs one row per sequence through forward_batch, so every weight is read from memory once
 * for all of them: decode is bound by that read, so N rows cost little more than one. A row's logits are the
 * bits a run of its sequence alone would give (model.h), so every sequence prints exactly what ./run prints
 * for it alone with the same seed and options. */
#include "batch.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "files.h"
#include "study.h"

static double seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------------------------------------
 * sequences being generated, and the decode step that runs them together */

/* One sequence, from the end of its prompt to its last token. */
typedef struct {
    int seq;             /* its KV cache sequence id */
    int index;           /* sample / prompt number: it samples with seed + index, prints as block index */
    int token, pos;      /* the token to run next, and its position */
    int generated;
    void *sampler;
    DecodeState decoded; /* the text continues the prompt's */
    Utf8Stream utf8;
    FILE *out;           /* what it prints, gathered in the generator's outputs[index] */
} Stream;

typedef struct {
    const Model *m;
    RunState *s;
    const BatchOptions *o;
    const char *what;       /* "sample" or "prompt", for labels */
    const int *lines;       /* prompts: the line of each, for labels; NULL for samples */
    int rolls;              /* positions may run past the context (model_can_roll) */
    int keep_sequences;     /* a finished sequence keeps its blocks (for --kv-map) until the end */
    Stream *active;         /* the sequences decoding, n_active of them */
    int n_active;
    int n_outputs, n_printed;
    char **outputs;         /* per index: its text (open_memstream), printed in index order once finished */
    size_t *output_len;
    char *finished;         /* per index: 1 once its text is complete */
    int *tokens, *seqs, *positions; /* the rows of a decode step */
    int *next;              /* the token each row's sampler drew */
    float *logits;          /* [vocab] a copy of shared logits for one sampler */
    long long generated, prefilled;
    double prefill_seconds, decode_seconds;
    size_t peak_held, peak_alone; /* KV bytes held, and what the sequences would hold as separate runs */
} Generator;

static int generator_init(Generator *g, const Model *m, RunState *s, const BatchOptions *o, int max_active,
                          int n_outputs) {
    memset(g, 0, sizeof *g);
    g->m = m, g->s = s, g->o = o;
    g->rolls = model_can_roll(m);
    g->n_outputs = n_outputs;
    g->active = calloc((size_t)max_active, sizeof *g->active);
    g->outputs = calloc((size_t)n_outputs, sizeof *g->outputs);
    g->output_len = calloc((size_t)n_outputs, sizeof *g->output_len);
    g->finished = calloc((size_t)n_outputs, sizeof *g->finished);
    g->tokens = malloc((size_t)max_active * sizeof *g->tokens);
    g->seqs = malloc((size_t)max_active * sizeof *g->seqs);
    g->positions = malloc((size_t)max_active * sizeof *g->positions);
    g->next = malloc((size_t)max_active * sizeof *g->next);
    g->logits = malloc((size_t)m->config.vocab_size * sizeof *g->logits);
    return g->active && g->outputs && g->output_len && g->finished && g->tokens && g->seqs && g->positions && g->next && g->logits
               ? 0 : -1;
}

/* The KV bytes now held, and what the sequences decoding would hold as separate runs: keep the peaks. */
static void note_memory(Generator *g) {
    size_t held = kvcache_bytes_held(&g->s->kv), alone = 0;
    for (int i = 0; i < g->n_active; i++) alone += kvcache_sequence_bytes(&g->s->kv, g->active[i].seq);
    if (held > g->peak_held) g->peak_held = held;
    if (alone > g->peak_alone) g->peak_alone = alone;
}

static int stream_start(Generator *g, Stream *st, int index, int seq, const int *prompt, int n_prompt) {
    memset(st, 0, sizeof *st);
    st->seq = seq, st->index = index, st->pos = n_prompt;
    st->sampler = g->o->sampler.start(g->o->sampler.ctx, g->o->seed + (uint64_t)index, prompt, n_prompt);
    st->out = open_memstream(&g->outputs[index], &g->output_len[index]);
    const Tokenizer *tok = &g->m->tokenizer;
    for (int i = 0, len; i < n_prompt && tok->kind != TOKENIZER_NONE; i++) tokenizer_decode(tok, &st->decoded, prompt[i], &len);
    return st->sampler && st->out ? 0 : -1;
}

/* The sequence's next token, drawn by its sampler, printed: 1 if it goes on (a row of the next step), 0 when
 * it has finished (its end-of-sequence token, -n tokens, or the end of the context), as ./run decides. */
static int stream_take(Generator *g, Stream *st, int next) {
    const Tokenizer *tok = &g->m->tokenizer;
    if (tok->kind != TOKENIZER_NONE && tokenizer_is_eos(tok, next)) return 0;
    if (g->o->print_ids || tok->kind == TOKENIZER_NONE) {
        fprintf(st->out, st->generated ? ",%d" : "%d", next); /* as ./run --print-ids */
    } else {
        int len;
        const unsigned char *bytes = tokenizer_decode(tok, &st->decoded, next, &len);
        utf8_stream_write(&st->utf8, st->out, bytes, len);
    }
    g->generated++;
    if (++st->generated == g->o->n_generate) return 0;
    if (st->pos >= g->m->config.context_length && !g->rolls) {
        fprintf(stderr, "note: %s %d stopped at the end of the model's context (%d tokens)\n", g->what, st->index,
                g->m->config.context_length);
        return 0;
    }
    st->token = next;
    return 1;
}

/* Its text is complete; its blocks go back to the pool. */
static void stream_finish(Generator *g, Stream *st) {
    if (st->out) {
        utf8_stream_flush(&st->utf8, st->out);
        fclose(st->out);
    }
    g->finished[st->index] = 1;
    if (st->sampler) g->o->sampler.end(st->sampler);
    if (!g->keep_sequences) kvcache_drop_sequence(&g->s->kv, st->seq);
}

/* The first token of a sequence whose prompt is done: it joins the decoding sequences unless it finished. */
static void stream_begin(Generator *g, Stream *st, float *logits) {
    if (g->o->n_generate > 0 && stream_take(g, st, g->o->sampler.next(st->sampler, logits, g->m->config.vocab_size)))
        g->active[g->n_active++] = *st;
    else stream_finish(g, st);
}

typedef struct {
    Generator *g;
    float *logits;
} Drawing;

/* rows [begin, end): each sequence's sampler draws from its row of logits (its own state, its own row) */
static void draw_rows(void *arg, int begin, int end) {
    Drawing *d = arg;
    Generator *g = d->g;
    int vocab = g->m->config.vocab_size;
    for (int i = begin; i < end; i++)
        g->next[i] = g->o->sampler.next(g->active[i].sampler, d->logits + (size_t)i * vocab, vocab);
}

/* One forward pass over one row per decoding sequence; the samplers draw side by side on the threads (each
 * sequence's draw depends only on its own sampler and logits), then each sequence takes its token in order.
 * Returns 0, or -1 when the KV cache cannot grow. */
static int decode_step(Generator *g) {
    double t0 = seconds_now();
    int n = g->n_active, vocab = g->m->config.vocab_size, kept = 0;
    for (int i = 0; i < n; i++) g->tokens[i] = g->active[i].token, g->seqs[i] = g->active[i].seq, g->positions[i] = g->active[i].pos;
    Batch b = {n, g->tokens, g->seqs, g->positions};
    float *logits = forward_batch(g->m, g->s, &b, 1);
    if (!logits) return -1;
    note_memory(g);
    for (int i = 0; i < n && g->o->check_logits; i++) { /* row i alone: the check reads logits row 0 */
        RunState row = *g->s;
        row.logits += (size_t)i * vocab;
        g->o->check_logits(g->m, &row, i, 1, g->active[i].pos);
    }
    Drawing drawing = {g, logits};
    parallel_for(n, 1, (long long)n * vocab * 16, draw_rows, &drawing); /* ~16 operations a logit (softmax, top-p) */
    for (int i = 0; i < n; i++) {
        Stream *st = &g->active[i];
        st->pos++;
        if (stream_take(g, st, g->next[i])) g->active[kept++] = *st;
        else stream_finish(g, st);
    }
    g->n_active = kept;
    g->decode_seconds += seconds_now() - t0;
    return 0;
}

/* Prints the finished outputs that come next in order: a labelled block of text each, or one line of ids. */
static void print_finished(Generator *g) {
    for (; g->n_printed < g->n_outputs && g->finished[g->n_printed]; g->n_printed++) {
        int i = g->n_printed;
        if (g->o->n_generate > 0 && !g->o->print_ids && g->m->tokenizer.kind != TOKENIZER_NONE) {
            if (g->lines) printf("--- %s %d, line %d (seed %llu)\n", g->what, i, g->lines[i], (unsigned long long)(g->o->seed + i));
            else printf("--- %s %d (seed %llu)\n", g->what, i, (unsigned long long)(g->o->seed + i));
        }
        if (g->o->n_generate > 0 && g->outputs[i]) {
            fwrite(g->outputs[i], 1, g->output_len[i], stdout);
            printf("\n");
        }
        free(g->outputs[i]);
        g->outputs[i] = NULL;
    }
    if (fflush(stdout) != 0) check_stdout(0); /* a full disk ends the run now */
}

static void generator_free(Generator *g) {
    for (int i = 0; i < g->n_active; i++) stream_finish(g, &g->active[i]);
    for (int i = 0; i < g->n_outputs; i++) free(g->outputs[i]);
    free(g->active);
    free(g->outputs);
    free(g->output_len);
    free(g->finished);
    free(g->tokens);
    free(g->seqs);
    free(g->positions);
    free(g->next);
    free(g->logits);
    memset(g, 0, sizeof *g);
}

/* Decodes until every sequence has finished. */
static int decode_all(Generator *g, char *err, size_t errlen) {
    while (g->n_active > 0) {
        if (decode_step(g) != 0)
            return error_line(err, errlen, "out of memory: the KV cache of %d sequences cannot grow (%zu bytes held)", g->n_active,
                        kvcache_bytes_held(&g->s->kv));
        print_finished(g);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * --samples: N continuations of one prompt */

int generate_samples(const Model *m, RunState *s, const float *logits, const int *prompt, int n_prompt, int n_samples,
                     double prefill_seconds, const BatchOptions *o, char *err, size_t errlen) {
    Generator g;
    int n_started = 0, bad = generator_init(&g, m, s, o, n_samples, n_samples) != 0;
    Stream *started = malloc((size_t)n_samples * sizeof *started);
    bad |= !started;
    g.what = "sample";
    g.keep_sequences = o->kv_map != NULL;
    int *seqs = malloc((size_t)n_samples * sizeof *seqs);
    bad |= !seqs;
    /* every sample starts as sequence 0, the prompt: its blocks are shared, not copied */
    for (int i = 0; i < n_samples && !bad; i++) {
        int seq = seqs[i] = i == 0 ? 0 : kvcache_fork(&s->kv, 0);
        if (seq < 0) bad = 1;
        else bad = stream_start(&g, &started[n_started++], i, seq, prompt, n_prompt) != 0;
    }
    if (bad) {
        g.keep_sequences = 0;
        for (int i = 0; i < n_started; i++) stream_finish(&g, &started[i]);
        free(started);
        free(seqs);
        generator_free(&g);
        return error_line(err, errlen, "out of memory starting %d samples", n_samples);
    }
    g.peak_held = kvcache_bytes_held(&s->kv);
    g.peak_alone = (size_t)n_samples * kvcache_sequence_bytes(&s->kv, 0);
    double t1 = seconds_now();
    for (int i = 0; i < n_samples; i++) {
        memcpy(g.logits, logits, (size_t)m->config.vocab_size * sizeof *g.logits); /* a sampler may scale them */
        stream_begin(&g, &started[i], g.logits);
    }
    free(started);
    g.decode_seconds = seconds_now() - t1;
    bad = decode_all(&g, err, errlen);
    print_finished(&g);
    if (g.keep_sequences) {
        char title[128];
        snprintf(title, sizeof title, "%d samples of a %d-token prompt, %lld tokens generated in all", n_samples, n_prompt,
                 g.generated);
        if (!bad && kv_map_write_svg(m, &s->kv, seqs, n_samples, title, o->kv_map) != 0)
            bad = error_line(err, errlen, "cannot write --kv-map '%s': %s", o->kv_map, strerror(errno));
        for (int i = 0; i < n_samples; i++) kvcache_drop_sequence(&s->kv, seqs[i]);
    }
    free(seqs);
    if (!bad)
        fprintf(stderr, "stats: prefill %d tok %.1f tok/s | decode %lld tok %.1f tok/s, %d samples | kv %zu bytes, "
                "%d separate runs %zu bytes | seed %llu\n", n_prompt, n_prompt / (prefill_seconds > 0 ? prefill_seconds : 1e-9),
                g.generated, g.generated / (g.decode_seconds > 0 ? g.decode_seconds : 1e-9), n_samples, g.peak_held,
                n_samples, g.peak_alone, (unsigned long long)o->seed);
    generator_free(&g);
    return bad;
}

/* ---------------------------------------------------------------------------------------------
 * --prompts: the prompt file */

typedef struct {
    int n;
    int **ids;
    int *len;
    int *line; /* in the file, from 1 */
} Prompts;

static void prompts_free(Prompts *p) {
    for (int i = 0; i < p->n; i++) free(p->ids[i]);
    free(p->ids);
    free(p->len);
    free(p->line);
    memset(p, 0, sizeof *p);
}

static int is_blank(const char *s) {
    while (*s && isspace((unsigned char)*s)) s++;
    return *s == '\0';
}

/* "1,2,3" -> ids (room for strlen + 1), each in the vocabulary; -1 if it is not such a list */
static int parse_ids(const char *text, int vocab, int *ids) {
    int n = 0;
    for (const char *p = text;;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v >= vocab || (*end && *end != ',')) return -1;
        ids[n++] = (int)v;
        if (!*end) return n;
        p = end + 1;
    }
}

/* Reads one prompt per line: text through the tokenizer, or ids when the model has none. */
static int read_prompts(const Model *m, const char *path, int add_bos, Prompts *p, char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin; /* "-": standard input */
    if (!f) return error_line(err, errlen, "cannot read --prompts file '%s': %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    int bad = 0, line_no = 0, room = 0, ctx = m->config.context_length, rolls = model_can_roll(m);
    const Tokenizer *tok = &m->tokenizer;
    while (!bad && (got = getline(&line, &cap, f)) >= 0) {
        line_no++;
        size_t len = (size_t)got;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if (strlen(line) != len) {
            bad = error_line(err, errlen, "%s line %d contains a NUL byte: not a text file", path, line_no);
            break;
        }
        if (is_blank(line)) continue;
        if (p->n == room) {
            room = room ? 2 * room : 64;
            int **ids = realloc(p->ids, (size_t)room * sizeof *ids);
            int *lens = ids ? realloc(p->len, (size_t)room * sizeof *lens) : NULL;
            int *lines = lens ? realloc(p->line, (size_t)room * sizeof *lines) : NULL;
            if (ids) p->ids = ids;
            if (lens) p->len = lens;
            if (lines) p->line = lines;
            if (!lines) {
                bad = error_line(err, errlen, "out of memory reading '%s' (line %d)", path, line_no);
                break;
            }
        }
        int *ids = malloc((tok->kind == TOKENIZER_NONE ? len + 1 : tokenizer_max_ids(len)) * sizeof *ids), n;
        if (!ids) {
            bad = error_line(err, errlen, "out of memory reading '%s' (line %d)", path, line_no);
            break;
        }
        p->ids[p->n] = ids, p->line[p->n] = line_no;
        p->len[p->n++] = n = tok->kind == TOKENIZER_NONE ? parse_ids(line, m->config.vocab_size, ids)
                                                         : tokenizer_encode(tok, line, len, add_bos, ids);
        if (n < 0 && tok->kind == TOKENIZER_NONE)
            bad = error_line(err, errlen, "%s line %d: the model has no tokenizer, so each line must be comma-separated ids "
                       "below %d", path, line_no, m->config.vocab_size);
        else if (n < 0) bad = error_line(err, errlen, "out of memory tokenizing '%s' line %d", path, line_no);
        else if (n == 0) bad = error_line(err, errlen, "%s line %d encodes to no tokens (and the tokenizer has no BOS)", path, line_no);
        else if (n > ctx && !rolls)
            bad = error_line(err, errlen, "%s line %d has %d tokens but the model's context is %d", path, line_no, n, ctx);
    }
    if (!bad && ferror(f)) bad = error_line(err, errlen, "cannot read --prompts file '%s'", path);
    if (!bad && p->n == 0) bad = error_line(err, errlen, "--prompts file '%s' has no prompts (every line is blank)", path);
    free(line);
    if (f != stdin) fclose(f);
    if (bad) prompts_free(p);
    return bad ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * the prefix cache: the state of a sequence at a block boundary, found by a hash of every token before it
 *
 * Prompt i's boundaries are b = 1 .. usable(i), the ends of its whole blocks that leave at least one token to
 * compute (the last position's logits start the sampling). Each boundary's key is a hash of the prompt's
 * first b * KV_BLOCK_TOKENS tokens, chained block by block, so two prompts share a key where they share every
 * token before it. Since the whole file is known, each key counts the prompts that hold it (uses) and
 * those not started yet (demand). A prompt leaves a snapshot (a forked, frozen sequence) at the boundaries
 * where later prompts part from it: where the next key has fewer uses, or at its last boundary. A later
 * prompt starts from the deepest snapshot it matches (its deepest boundary shared with an earlier prompt is
 * always one: where they part), and a snapshot is dropped once no prompt still to start holds its key.
 * For full-attention layers a snapshot is the prefix's blocks themselves; rolling buffers, which only the
 * boundary's own state can continue, share their blocks too and are copied block by block as they move on. */

typedef struct {
    uint64_t key;  /* hash of the prefix's tokens */
    int prompt;    /* -1: an empty slot; else a prompt with this prefix (keys may collide: compared on use) */
    int boundary;  /* the prefix is tokens 0 .. boundary * KV_BLOCK_TOKENS - 1 */
    int uses;      /* prompts that begin with it */
    int demand;    /* of those, the ones not started yet */
    int snapshot;  /* KV cache sequence frozen at the boundary, or -1 */
} PrefixEntry;

typedef struct {
    PrefixEntry *slots;
    size_t mask;     /* slots - 1, a power of two minus one */
    uint64_t *keys;  /* every prompt's keys, boundary 1 first */
    size_t *first;   /* per prompt: where its keys start */
    int *usable;     /* per prompt: its boundaries */
} PrefixCache;

static uint64_t mix64(uint64_t x) { /* splitmix64's finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static PrefixEntry *prefix_slot(const PrefixCache *pc, uint64_t key, int boundary) {
    size_t i = (size_t)key & pc->mask;
    while (pc->slots[i].prompt >= 0 && (pc->slots[i].key != key || pc->slots[i].boundary != boundary)) i = (i + 1) & pc->mask;
    return &pc->slots[i];
}

/* The entry of prompt i's boundary b (1 <= b <= usable(i)) */
static PrefixEntry *prefix_entry(const PrefixCache *pc, int i, int b) {
    return prefix_slot(pc, pc->keys[pc->first[i] + (size_t)b - 1], b);
}

static int prefix_init(PrefixCache *pc, const Prompts *p) {
    memset(pc, 0, sizeof *pc);
    pc->first = malloc((size_t)p->n * sizeof *pc->first);
    pc->usable = malloc((size_t)p->n * sizeof *pc->usable);
    if (!pc->first || !pc->usable) return -1;
    size_t total = 0, n_slots = 16;
    for (int i = 0; i < p->n; i++) {
        pc->first[i] = total;
        pc->usable[i] = (p->len[i] - 1) / KV_BLOCK_TOKENS;
        total += (size_t)pc->usable[i];
    }
    while (n_slots < 2 * total + 1) n_slots *= 2;
    pc->mask = n_slots - 1;
    pc->keys = malloc((total ? total : 1) * sizeof *pc->keys);
    pc->slots = malloc(n_slots * sizeof *pc->slots);
    if (!pc->keys || !pc->slots) return -1;
    for (size_t s = 0; s < n_slots; s++) pc->slots[s] = (PrefixEntry){0, -1, 0, 0, 0, -1};
    for (int i = 0; i < p->n; i++) {
        uint64_t h = 0x9e3779b97f4a7c15ULL;
        for (int b = 1; b <= pc->usable[i]; b++) {
            for (int t = (b - 1) * KV_BLOCK_TOKENS; t < b * KV_BLOCK_TOKENS; t++) h = mix64(h ^ (uint32_t)p->ids[i][t]);
            uint64_t key = pc->keys[pc->first[i] + (size_t)b - 1] = mix64(h + (uint64_t)b);
            PrefixEntry *e = prefix_slot(pc, key, b);
            if (e->prompt < 0) *e = (PrefixEntry){key, i, b, 0, 0, -1};
            e->uses++, e->demand++;
        }
    }
    return 0;
}

/* The deepest boundary of prompt i with a snapshot of the same tokens, or 0 */
static int prefix_lookup(const PrefixCache *pc, const Prompts *p, int i) {
    for (int b = pc->usable[i]; b > 0; b--) {
        const PrefixEntry *e = prefix_entry(pc, i, b);
        if (e->snapshot >= 0 && !memcmp(p->ids[i], p->ids[e->prompt], (size_t)b * KV_BLOCK_TOKENS * sizeof(int))) return b;
    }
    return 0;
}

/* Prompt i has started: the snapshots no prompt still to start can use go back to the pool. */
static void prefix_started(PrefixCache *pc, KVCache *kv, int i) {
    for (int b = 1; b <= pc->usable[i]; b++) {
        PrefixEntry *e = prefix_entry(pc, i, b);
        if (--e->demand == 0 && e->snapshot >= 0) {
            kvcache_drop_sequence(kv, e->snapshot);
            e->snapshot = -1;
        }
    }
}

/* 1 if prompt i should leave a snapshot at boundary b: a prompt still to start holds it, and it is where
 * some of them part from i (fewer prompts hold the next boundary), or i's last. */
static int prefix_wanted(const PrefixCache *pc, int i, int b) {
    const PrefixEntry *e = prefix_entry(pc, i, b);
    return e->demand > 0 && e->snapshot < 0 && (b == pc->usable[i] || prefix_entry(pc, i, b + 1)->uses < e->uses);
}

static void prefix_free(PrefixCache *pc) {
    free(pc->slots);
    free(pc->keys);
    free(pc->first);
    free(pc->usable);
    memset(pc, 0, sizeof *pc);
}

/* ---------------------------------------------------------------------------------------------
 * --prompts: continuous batching */

typedef struct {
    Generator g;
    Prompts prompts;
    PrefixCache prefix;
    int hits;
    long long reused_tokens;
    size_t shared_bytes;
} PromptRun;

/* Runs tokens from .. to-1 (from < to) of sequence seq in chunks of --batch; the last one's logits, or NULL
 * when out of memory. */
static float *prefill(Generator *g, int seq, const int *tokens, int from, int to) {
    double t0 = seconds_now();
    float *logits = NULL;
    for (int pos = from; pos < to; pos += g->o->batch) {
        int n = to - pos < g->o->batch ? to - pos : g->o->batch;
        for (int t = 0; t < n; t++) g->s->row_seq[t] = seq, g->s->row_pos[t] = pos + t;
        Batch b = {n, tokens + pos, g->s->row_seq, g->s->row_pos};
        if (!(logits = forward_batch(g->m, g->s, &b, pos + n == to ? LOGITS_LAST : LOGITS_NONE))) return NULL;
        if (g->o->check_logits && pos + n == to) g->o->check_logits(g->m, g->s, n - 1, 1, to - 1);
    }
    g->prefilled += to - from;
    g->prefill_seconds += seconds_now() - t0;
    return logits;
}

/* Prompt i joins: from the deepest cached prefix it shares, or from nothing; its other tokens are computed,
 * leaving snapshots where later prompts will want them. Returns 0, or -1 with a line in err. */
static int admit(PromptRun *r, int i, char *err, size_t errlen) {
    Generator *g = &r->g;
    KVCache *kv = &g->s->kv;
    const int *ids = r->prompts.ids[i];
    int n = r->prompts.len[i], hit = prefix_lookup(&r->prefix, &r->prompts, i);
    int seq = hit ? kvcache_fork(kv, prefix_entry(&r->prefix, i, hit)->snapshot) : kvcache_add_sequence(kv);
    if (seq < 0) return error_line(err, errlen, "out of memory starting prompt %d (line %d)", i, r->prompts.line[i]);
    if (hit) {
        r->hits++;
        r->reused_tokens += (long long)hit * KV_BLOCK_TOKENS;
        r->shared_bytes += kvcache_sequence_bytes(kv, seq);
    }
    prefix_started(&r->prefix, kv, i);
    int from = hit * KV_BLOCK_TOKENS;
    float *logits = NULL;
    for (int b = hit + 1; b <= r->prefix.usable[i] && from >= 0; b++) {
        if (!prefix_wanted(&r->prefix, i, b)) continue;
        PrefixEntry *e = prefix_entry(&r->prefix, i, b);
        if (!prefill(g, seq, ids, from, b * KV_BLOCK_TOKENS) || (e->snapshot = kvcache_fork(kv, seq)) < 0) from = -1;
        else from = b * KV_BLOCK_TOKENS, e->prompt = i;
    }
    if (from >= 0) logits = prefill(g, seq, ids, from, n);
    Stream st;
    if (!logits || stream_start(g, &st, i, seq, ids, n) != 0) {
        if (logits) stream_finish(g, &st);
        else kvcache_drop_sequence(kv, seq);
        return error_line(err, errlen, "out of memory at prompt %d (line %d): %zu bytes of KV cache held", i,
                    r->prompts.line[i], kvcache_bytes_held(kv));
    }
    size_t vocab = (size_t)g->m->config.vocab_size;
    if (g->o->logits_file && fwrite(logits, sizeof(float), vocab, g->o->logits_file) != vocab) {
        stream_finish(g, &st);
        return error_line(err, errlen, "writing the --logits file failed");
    }
    stream_begin(g, &st, logits);
    note_memory(g);
    return 0;
}

int generate_prompts(const Model *m, const char *path, const BatchOptions *o, char *err, size_t errlen) {
    PromptRun r;
    memset(&r, 0, sizeof r);
    if (read_prompts(m, path, o->add_bos, &r.prompts, err, errlen) != 0) return -1;
    int longest = 1;
    for (int i = 0; i < r.prompts.n; i++)
        if (r.prompts.len[i] > longest) longest = r.prompts.len[i];
    int chunk = o->batch < longest ? o->batch : longest, rows = chunk > o->parallel ? chunk : o->parallel;
    long positions = (long)longest + o->n_generate; /* the most one sequence can reach */
    if (!model_can_roll(m) && positions > m->config.context_length) positions = m->config.context_length;
    RunState s;
    int bad = model_check_memory(m, rows, positions, err, errlen) != 0;
    if (!bad && runstate_init(&s, m, rows) != 0) bad = error_line(err, errlen, "out of memory allocating the run state");
    if (bad) {
        prompts_free(&r.prompts);
        return -1;
    }
    kvcache_drop_sequence(&s.kv, 0); /* every prompt gets a sequence of its own */
    BatchOptions opts = *o;
    opts.batch = chunk;
    bad = generator_init(&r.g, m, &s, &opts, o->parallel, r.prompts.n) != 0 || prefix_init(&r.prefix, &r.prompts) != 0;
    if (bad) error_line(err, errlen, "out of memory preparing %d prompts", r.prompts.n);
    r.g.what = "prompt";
    r.g.lines = r.prompts.line;
    for (int next = 0; !bad && (next < r.prompts.n || r.g.n_active > 0);) {
        while (!bad && r.g.n_active < o->parallel && next < r.prompts.n) bad = admit(&r, next++, err, errlen) != 0;
        print_finished(&r.g);
        if (!bad && r.g.n_active > 0 && decode_step(&r.g) != 0)
            bad = error_line(err, errlen, "out of memory: the KV cache of %d sequences cannot grow (%zu bytes held)",
                       r.g.n_active, kvcache_bytes_held(&s.kv));
        print_finished(&r.g);
    }
    if (!bad && kvcache_bytes_held(&s.kv) != 0)
        bad = error_line(err, errlen, "internal error: %zu bytes of KV cache still held after the last prompt",
                   kvcache_bytes_held(&s.kv));
    if (!bad)
        fprintf(stderr, "stats: %d prompts, parallel %d | prefill %lld tok %.1f tok/s | decode %lld tok %.1f tok/s | "
                "prefix hits %d, %lld tok reused, %zu bytes shared | kv %zu bytes, separately %zu bytes | seed %llu\n",
                r.prompts.n, o->parallel, r.g.prefilled, r.g.prefilled / (r.g.prefill_seconds > 0 ? r.g.prefill_seconds : 1e-9),
                r.g.generated, r.g.generated / (r.g.decode_seconds > 0 ? r.g.decode_seconds : 1e-9), r.hits,
                r.reused_tokens, r.shared_bytes, r.g.peak_held, r.g.peak_alone, (unsigned long long)o->seed);
    generator_free(&r.g);
    prefix_free(&r.prefix);
    prompts_free(&r.prompts);
    runstate_free(&s);
    return bad ? -1 : 0;
}
