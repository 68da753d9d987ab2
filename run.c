/* run.c - the command line: load a model, turn the prompt into ids, run it through the model, sample
 * new tokens one at a time and print them as they come. */
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "batch.h"
#include "explore.h"
#include "files.h"
#include "model.h"
#include "study.h"

/* ---------------------------------------------------------------------------------------------
 * errors: one line, exit status 1 */

static void die(const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    make_printable(msg); /* arguments and file names stay on one line */
    fprintf(stderr, "error: %s\n", msg);
    exit(1);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------------------------------------
 * sampling: greedy, or temperature + top-p (nucleus) with a seeded generator */

typedef struct {
    float temperature; /* 0: greedy */
    float top_p;       /* keep the smallest set of tokens whose probability reaches top_p */
    uint64_t rng;
    int *order;        /* scratch: token ids sorted by probability */
} Sampler;

static uint32_t random_u32(uint64_t *state) { /* xorshift64* */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1DULL) >> 32);
}
static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static const float *sort_probs; /* comparator context; sampling is single-threaded */
static int by_prob_desc(const void *a, const void *b) {
    float pa = sort_probs[*(const int *)a], pb = sort_probs[*(const int *)b];
    return (pa < pb) - (pa > pb);
}

static int sample(Sampler *s, float *logits, int n) {
    if (s->temperature == 0.0f) return argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= s->temperature;
    softmax(logits, n);
    float r = random_f32(&s->rng);
    if (s->top_p <= 0.0f || s->top_p >= 1.0f) { /* plain sampling from the whole distribution */
        float cdf = 0.0f;
        for (int i = 0; i < n; i++) {
            cdf += logits[i];
            if (r < cdf) return i;
        }
        return n - 1;
    }
    /* top-p: tokens below (1 - top_p) / (n - 1) can never be in the nucleus, so sort only the rest */
    float cutoff = (1.0f - s->top_p) / (float)(n - 1 > 0 ? n - 1 : 1);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (logits[i] >= cutoff) s->order[m++] = i;
    if (m == 0) return argmax(logits, n); /* no finite probabilities (NaN weights): nothing to sample from */
    sort_probs = logits;
    qsort(s->order, (size_t)m, sizeof *s->order, by_prob_desc);
    float mass = 0.0f;
    int last = m - 1;
    for (int i = 0; i < m; i++) {
        mass += logits[s->order[i]];
        if (mass > s->top_p) {
            last = i;
            break;
        }
    }
    float target = r * mass, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += logits[s->order[i]];
        if (target < cdf) return s->order[i];
    }
    return s->order[last];
}

/* ---------------------------------------------------------------------------------------------
 * command line */

typedef struct {
    const char *model_path;
    const char *prompt;
    const char *tokens;     /* --tokens: comma-separated ids, or @FILE: ids read from FILE */
    const char *logits_path;
    const char *encode_text;
    const char *decode_ids; /* --decode: comma-separated ids */
    int n_generate;
    float temperature, top_p;
    uint64_t seed;
    int print_ids, no_bos;
    int threads, batch;
    /* the attention study options (study.c) */
    const char *prompt_file;   /* -f: prompt text from a file */
    int info, ppl;
    AttentionOverrides overrides;
    const char *attn_map, *attn_map_layers, *attn_dump;
    const char *explore;       /* --explore: the page (explore.c) */
    /* many sequences (batch.c) */
    int samples, parallel;
    const char *prompts_path, *kv_map;
} Options;

static void usage(FILE *out) {
    fputs("usage: ./run MODEL [options]\n"
          "  -p TEXT         prompt text\n"
          "  -n N            tokens to generate (default 256; 0 = only process the prompt)\n"
          "  -t TEMP         temperature (default 1.0; 0 = greedy)\n"
          "  --top-p P       nucleus sampling threshold in (0, 1] (default 0.9)\n"
          "  -s SEED         random seed (default: from the clock)\n"
          "  --tokens LIST   comma-separated token ids used as the prompt instead of -p (no BOS added);\n"
          "                  @FILE reads them from FILE (separated by commas, spaces or newlines)\n"
          "  --logits FILE   write float32 little-endian logits for every prompt position, [n_prompt][vocab]\n"
          "  --print-ids     print the generated ids (space-separated, one line) instead of text\n"
          "  --encode TEXT   print the ids TEXT encodes to as a prompt, then exit; --no-bos drops the BOS\n"
          "  --decode LIST   print the text the comma-separated token ids decode to, then exit\n"
          "  --no-bos        do not add the tokenizer's BOS to -p / --encode text\n"
          "  --threads N     threads (default: all cores)\n"
          "  --batch N       prompt tokens per forward pass (default 256; 1 = token by token)\n"
          "  --help          this text\n"
          "many sequences on one paged KV cache:\n"
          "  --samples N     N continuations of the prompt (1..1024): prefilled once, decoded together; sample i\n"
          "                  uses seed -s + i\n"
          "  --prompts FILE  one prompt per line (- : standard input; blank lines skipped; ids as in --tokens for a\n"
          "                  model without a tokenizer), decoded together with continuous batching; shared\n"
          "                  prefixes computed once; --logits gets each prompt's last position, [n_prompts][vocab]\n"
          "  --parallel P    --prompts: sequences decoding at once (1..1024, default 8)\n"
          "  --kv-map SVG    --samples: draw the samples' KV block tables (which blocks they share) at the end\n"
          "attention study (docs/ATTENTION.md):\n"
          "  --info          print the attention wiring, per layer, and what its KV cache costs; then exit\n"
          "  -f FILE         prompt text from a file\n"
          "  --ppl           print the perplexity of the prompt (each token given the ones before it), then exit\n"
          "  --window LIST   make layers slide: L=W[,L=W...] or all=W (W = 0: full attention)\n"
          "  --sinks N       the first N positions stay visible in every sliding layer (attention sinks)\n"
          "  --sparse LIST   block-sparse layers: strided:S, fixed:B or chunked:C for all, or L=strided:S[,L=fixed:B...]\n"
          "                  (after --window: it wins where both name a layer)\n"
          "  --attn KERNEL   naive (scores, softmax, sum; the default) or flash (tiled, online softmax)\n"
          "  --mla FORM      latent attention (DeepSeek): absorbed (in latent space), expanded (per-head keys and\n"
          "                  values decompressed) or auto (the cheaper at each position; the default)\n"
          "  --attn-map PNG  draw every head's attention weights over the sequence (naive kernel)\n"
          "  --attn-map-layer L[,L...]  only these layers, drawn larger\n"
          "  --attn-dump FILE  the recorded weights as float32 [layer][head][query][key]\n"
          "  --explore HTML  one self-contained page of the run: where each head looks from each token, the\n"
          "                  wiring, the KV cache at each position (at most 2048 positions; opens offline)\n",
          out);
}

static long parse_long(const char *opt, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end) die("%s expects an integer, got '%s'", opt, v);
    if (x < lo || x > hi) die("%s must be between %ld and %ld, got %ld", opt, lo, hi, x);
    return x;
}

static float parse_float(const char *opt, const char *v, float lo, float hi) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !isfinite(x)) die("%s expects a number, got '%s'", opt, v);
    if (x < lo || x > hi) die("%s must be between %g and %g, got %g", opt, lo, hi, x);
    return (float)x;
}

static Options parse_args(int argc, char **argv) {
    Options o = {0};
    o.n_generate = 256;
    o.temperature = 1.0f;
    o.top_p = 0.9f;
    o.seed = (uint64_t)time(NULL);
    o.batch = 256;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (a[0] != '-' || a[1] == '\0') {
            if (o.model_path) die("unexpected argument '%s' (the model is '%s')", a, o.model_path);
            o.model_path = a;
            continue;
        }
        /* every other option takes a value */
        int is_flag = !strcmp(a, "--print-ids") || !strcmp(a, "--no-bos") || !strcmp(a, "--info") || !strcmp(a, "--ppl");
        if (is_flag) {
            if (!strcmp(a, "--print-ids")) o.print_ids = 1;
            else if (!strcmp(a, "--info")) o.info = 1;
            else if (!strcmp(a, "--ppl")) o.ppl = 1;
            else o.no_bos = 1;
            continue;
        }
        const char *known[] = {"-p", "-n", "-t", "-s", "--top-p", "--tokens", "--logits", "--encode", "--decode", "--threads",
                               "--batch", "-f", "--window", "--sinks", "--sparse", "--attn", "--attn-map", "--attn-map-layer",
                               "--attn-dump", "--explore", "--mla",
                               "--samples", "--parallel", "--prompts", "--kv-map"};
        int k = 0;
        while (k < (int)(sizeof known / sizeof *known) && strcmp(a, known[k])) k++;
        if (k == (int)(sizeof known / sizeof *known)) die("unknown option '%s' (see --help)", a);
        if (i + 1 >= argc) die("%s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "-p")) o.prompt = v;
        else if (!strcmp(a, "-n")) o.n_generate = (int)parse_long(a, v, 0, 1 << 24);
        else if (!strcmp(a, "-t")) {
            o.temperature = parse_float(a, v, 0.0f, 100.0f);
            /* logits / t must stay finite: tiny temperatures are greedy in all but name */
            if (o.temperature > 0.0f && o.temperature < 1e-3f) die("-t must be 0 (greedy) or at least 0.001, got %s", v);
        }
        else if (!strcmp(a, "-s")) o.seed = (uint64_t)parse_long(a, v, 0, LONG_MAX);
        else if (!strcmp(a, "--top-p")) {
            o.top_p = parse_float(a, v, 0.0f, 1.0f);
            if (o.top_p == 0.0f) die("--top-p must be in (0, 1], got %s", v);
        }
        else if (!strcmp(a, "--tokens")) o.tokens = v;
        else if (!strcmp(a, "--logits")) o.logits_path = v;
        else if (!strcmp(a, "--encode")) o.encode_text = v;
        else if (!strcmp(a, "--decode")) o.decode_ids = v;
        else if (!strcmp(a, "--threads")) o.threads = (int)parse_long(a, v, 1, 1024);
        else if (!strcmp(a, "--batch")) o.batch = (int)parse_long(a, v, 1, 4096);
        else if (!strcmp(a, "-f")) o.prompt_file = v;
        else if (!strcmp(a, "--window")) o.overrides.window = v;
        else if (!strcmp(a, "--sinks")) o.overrides.n_sinks = (int)parse_long(a, v, 0, 1 << 20);
        else if (!strcmp(a, "--sparse")) o.overrides.sparse = v;
        else if (!strcmp(a, "--attn")) o.overrides.kernel = v;
        else if (!strcmp(a, "--mla")) o.overrides.latent = v;
        else if (!strcmp(a, "--attn-map")) o.attn_map = v;
        else if (!strcmp(a, "--attn-map-layer")) o.attn_map_layers = v;
        else if (!strcmp(a, "--attn-dump")) o.attn_dump = v;
        else if (!strcmp(a, "--explore")) o.explore = v;
        else if (!strcmp(a, "--samples")) o.samples = (int)parse_long(a, v, 1, 1024);
        else if (!strcmp(a, "--parallel")) o.parallel = (int)parse_long(a, v, 1, 1024);
        else if (!strcmp(a, "--prompts")) o.prompts_path = v;
        else if (!strcmp(a, "--kv-map")) o.kv_map = v;
    }
    if (!o.model_path) die("no model file given (usage: ./run MODEL [options]; ./run --help lists them)");
    if (!!o.prompt + !!o.tokens + !!o.prompt_file > 1) die("give the prompt as one of -p TEXT, -f FILE or --tokens LIST");
    if (o.attn_map_layers && !o.attn_map && !o.attn_dump && !o.explore)
        die("--attn-map-layer needs --attn-map, --attn-dump or --explore");
    if ((o.attn_map || o.attn_dump || o.explore) && o.overrides.kernel && !strcmp(o.overrides.kernel, "flash"))
        die("%s needs the naive kernel: flash never materialises the weights", o.explore ? "--explore" : "--attn-map");
    if ((o.attn_map || o.attn_dump || o.explore) && o.overrides.latent && !strcmp(o.overrides.latent, "expanded"))
        die("%s needs the absorbed form of latent attention: expanded never materialises the weights",
            o.explore ? "--explore" : "--attn-map");
    if (o.samples && o.prompts_path) die("give --samples N or --prompts FILE, not both");
    if (o.parallel && !o.prompts_path) die("--parallel needs --prompts FILE");
    if (o.prompts_path && (o.prompt || o.tokens || o.prompt_file)) die("--prompts FILE gives the prompts: drop -p, -f and --tokens");
    if ((o.samples || o.prompts_path) && (o.ppl || o.attn_map || o.attn_dump || o.explore))
        die("--ppl, --attn-map, --attn-dump and --explore study one sequence: drop --samples / --prompts");
    if (o.kv_map && !o.samples) die("--kv-map draws the block tables of --samples N");
    if (!o.parallel) o.parallel = 8;
    return o;
}

static int is_blank(char ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r'; }

/* --tokens / --decode "1,2,3" (or "1 2 3", as --encode prints them) -> ids, each checked against the
 * vocabulary. Between two ids: a comma, white space, or both. */
static int parse_token_list(const char *opt, const char *list, int vocab_size, int **out) {
    size_t cap = 1;
    for (const char *p = list; *p; p++) cap += *p == ',' || is_blank(*p);
    int *ids = malloc(cap * sizeof *ids), n = 0;
    if (!ids) die("out of memory");
    *out = ids; /* the caller owns it from here, also when an error below ends the program */
    const char *p = list;
    while (is_blank(*p)) p++;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        const char *next = end;
        while (is_blank(*next)) next++;
        if (end == p || errno || (*next && *next != ',' && next == end))
            die("%s expects comma-separated integers, got '%.60s%s'", opt, list, strlen(list) > 60 ? "..." : "");
        if (v < 0 || v >= vocab_size) die("%s: id %ld is outside the vocabulary (0 .. %d)", opt, v, vocab_size - 1);
        ids[n++] = (int)v;
        p = *next == ',' ? next + 1 : next;
        while (*next == ',' && is_blank(*p)) p++;
        if (*next == ',' && !*p) die("%s: trailing comma in '%.60s%s'", opt, list, strlen(list) > 60 ? "..." : "");
    }
    return n;
}

/* A prompt file: at most the text 2^24 positions (the longest context the format allows) would hold at a
 * few bytes a token. */
#define MAX_PROMPT_FILE_BYTES ((size_t)64 << 20)

/* -f FILE / --tokens @FILE: the whole file as text (NUL-terminated); a regular file of at most 64 MiB */
static char *read_text_file(const char *what, const char *path) {
    char err[256];
    size_t len;
    char *text = read_whole_file(path, MAX_PROMPT_FILE_BYTES, &len, err, sizeof err);
    if (!text) die("cannot read %s '%s': %s", what, path, err);
    if (strlen(text) != len) die("%s '%s' contains a NUL byte: not a text file", what, path);
    return text;
}

static int encode_text(const Model *m, const char *text, int add_bos, int **out) {
    if (m->tokenizer.kind == TOKENIZER_NONE) die("%s has no tokenizer: give the prompt as --tokens LIST", "this model");
    size_t len = strlen(text);
    int *ids = malloc(tokenizer_max_ids(len) * sizeof *ids);
    if (!ids) die("out of memory");
    int n = tokenizer_encode(&m->tokenizer, text, len, add_bos, ids);
    if (n == TOKENIZER_REGEX_TOO_SLOW)
        die("the tokenizer's pre-tokenizer regex backtracks without end on this prompt (a pathological pattern)");
    if (n < 0) die("out of memory while tokenizing");
    *out = ids;
    return n;
}

/* ---------------------------------------------------------------------------------------------
 * outputs are checked before the run: each can be written, none is an input or another output */

static void check_outputs(const Options *o) {
    const char *outputs[][2] = {{"--logits", o->logits_path}, {"--attn-map", o->attn_map}, {"--attn-dump", o->attn_dump},
                                {"--explore", o->explore}, {"--kv-map", o->kv_map}};
    const char *tokens_file = o->tokens && o->tokens[0] == '@' ? o->tokens + 1 : NULL;
    const char *inputs[][2] = {{"the model file", o->model_path}, {"the -f file", o->prompt_file},
                               {"the --tokens file", tokens_file}, {"the --prompts file", o->prompts_path}};
    char err[256];
    for (int i = 0; i < (int)(sizeof outputs / sizeof *outputs); i++) {
        const char *opt = outputs[i][0], *path = outputs[i][1];
        if (!path) continue;
        if (check_output_path(path, err, sizeof err) != 0) die("cannot write %s file '%s': %s", opt, path, err);
        for (int k = 0; k < (int)(sizeof inputs / sizeof *inputs); k++)
            if (inputs[k][1] && strcmp(inputs[k][1], "-") != 0 && same_file(path, inputs[k][1]))
                die("%s '%s' is %s '%s': an output may not overwrite an input", opt, path, inputs[k][0], inputs[k][1]);
        for (int k = 0; k < i; k++)
            if (outputs[k][1] && same_file(path, outputs[k][1]))
                die("%s '%s' and %s '%s' are the same file", outputs[k][0], outputs[k][1], opt, path);
    }
}

/* Logits that stopped being finite (a NaN or an infinity in the weights), or a residual stream too large for
 * the final norm (its sum of squares overflows float32, so the norm returns zeros and every logit is 0: weights
 * of 1e30): sampling and perplexity would make nothing of them. Checks the rows of tokens x[t0 .. t0+rows) at
 * positions first_pos ..; names the tensor at fault when there is one. */
static void check_outputs_finite(const Model *m, const RunState *s, int t0, int rows, int first_pos) {
    int vocab = m->config.vocab_size, dim = m->config.dim;
    const float *logits = s->logits;
    for (int r = 0; r < rows; r++) {
        const float *x = s->x + (size_t)(t0 + r) * dim, *l = logits + (size_t)r * vocab;
        double squares = 0.0;
        for (int i = 0; i < dim; i++) squares += (double)x[i] * x[i];
        int finite = 1;
        for (int i = 0; i < vocab && finite; i++) finite = isfinite(l[i]);
        if (finite && squares <= FLT_MAX) continue;
        char name[96];
        if (model_find_nonfinite_tensor(m, name, sizeof name))
            die("the logits at position %d are not finite: tensor '%s' of the model holds a NaN or an infinity",
                first_pos + r, name);
        die("the activations at position %d overflow float32 (the last hidden state reaches a norm of %.3g): its "
            "logits are %s (weights too large?)", first_pos + r, sqrt(squares), finite ? "meaningless" : "not finite");
    }
}

/* ---------------------------------------------------------------------------------------------
 * samplers for batch.c: one per sequence, each what a run of its own would use */

typedef struct {
    const Options *o;
    int vocab;
} SamplerContext;

static Sampler sampler_new(const Options *o, uint64_t seed, int vocab) {
    Sampler s = {o->temperature, o->top_p, seed * 2654435761ULL + 1, malloc((size_t)vocab * sizeof(int))};
    return s;
}

static void *sampler_start(void *ctx, uint64_t seed) {
    const SamplerContext *c = ctx;
    Sampler *s = malloc(sizeof *s);
    if (s && !(*s = sampler_new(c->o, seed, c->vocab)).order) {
        free(s);
        s = NULL;
    }
    return s;
}

static int sampler_next(void *sampler, float *logits, int vocab) { return sample(sampler, logits, vocab); }

static void sampler_end(void *sampler) {
    free(((Sampler *)sampler)->order);
    free(sampler);
}

/* ---------------------------------------------------------------------------------------------
 * main: prompt -> prefill -> generate */

int main(int argc, char **argv) {
    int closed = reopen_closed_standard_streams();
    Options o = parse_args(argc, argv);
    if (o.ppl) o.n_generate = 0; /* --ppl scores the prompt and generates nothing */
    if ((closed & 2) && (o.info || o.encode_text || o.decode_ids || o.ppl || o.n_generate > 0))
        die("standard output is closed: there is nowhere to print to");
    check_outputs(&o);
    if (o.threads > 0) parallel_set_threads(o.threads);
    Model model;
    char err[512];
    exit_on_sigbus(o.model_path); /* the model is the only file mapped: a SIGBUS means it was cut short */
    if (model_load(&model, o.model_path, err, sizeof err) != 0) die("%s", err);
    const Config *c = &model.config;
    if (apply_attention_overrides(&model, &o.overrides, err, sizeof err) != 0) die("%s", err);
    if (o.info) {
        print_wiring(&model, o.model_path, stdout);
        check_stdout(1);
        model_free(&model);
        return 0;
    }

    if (o.encode_text) {
        int *ids, n = encode_text(&model, o.encode_text, !o.no_bos, &ids);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        check_stdout(1);
        free(ids);
        model_free(&model);
        return 0;
    }

    if (o.decode_ids) { /* printed as generation would print them, from the start of the output */
        if (model.tokenizer.kind == TOKENIZER_NONE) die("this model has no tokenizer to decode with");
        int *ids, n = parse_token_list("--decode", o.decode_ids, c->vocab_size, &ids);
        Utf8Stream out = {{0}, 0};
        DecodeState state = {0, 0};
        for (int i = 0, len; i < n; i++) {
            const unsigned char *bytes = tokenizer_decode(&model.tokenizer, &state, ids[i], &len);
            utf8_stream_write(&out, stdout, bytes, len);
        }
        utf8_stream_flush(&out, stdout);
        printf("\n");
        check_stdout(1);
        free(ids);
        model_free(&model);
        return 0;
    }

    SamplerContext sampler_context = {&o, c->vocab_size};
    BatchOptions batch_options = {o.n_generate, o.seed, o.print_ids, o.batch, o.parallel, !o.no_bos, NULL, o.kv_map,
                                  {sampler_start, sampler_next, sampler_end, &sampler_context}, check_outputs_finite};
    if (o.prompts_path) {
        if (o.logits_path && !(batch_options.logits_file = fopen(o.logits_path, "wb")))
            die("cannot write --logits file '%s': %s", o.logits_path, strerror(errno));
        int bad = generate_prompts(&model, o.prompts_path, &batch_options, err, sizeof err);
        if (batch_options.logits_file && fclose(batch_options.logits_file) != 0 && !bad)
            die("writing --logits file '%s' failed", o.logits_path);
        model_free(&model);
        if (bad) die("%s", err);
        check_stdout(1);
        return 0;
    }

    /* the prompt as ids */
    int *prompt = NULL, n_prompt;
    if (o.tokens && o.tokens[0] == '@') {
        char *text = read_text_file("--tokens file", o.tokens + 1);
        if ((n_prompt = parse_token_list("--tokens file", text, c->vocab_size, &prompt)) == 0)
            die("--tokens file '%s' holds no ids", o.tokens + 1);
        free(text);
    } else if (o.tokens) {
        if ((n_prompt = parse_token_list("--tokens", o.tokens, c->vocab_size, &prompt)) == 0) die("--tokens: no ids given");
    } else if (o.prompt_file) {
        char *text = read_text_file("-f file", o.prompt_file);
        n_prompt = encode_text(&model, text, !o.no_bos, &prompt);
        free(text);
    } else {
        n_prompt = encode_text(&model, o.prompt ? o.prompt : "", !o.no_bos, &prompt);
    }
    if (n_prompt == 0) die("the prompt is empty and the tokenizer has no BOS to start from: give -p TEXT");
    if (o.ppl && n_prompt < 2) die("--ppl needs a prompt of at least 2 tokens (each token is scored given the ones before it)");
    int rolls = model_can_roll(&model); /* every layer slides: positions may run past the context */
    if (n_prompt > c->context_length && !rolls)
        die("the prompt has %d tokens but the model's context is %d", n_prompt, c->context_length);

    FILE *logits_file = NULL;
    if (o.logits_path && !(logits_file = fopen(o.logits_path, "wb")))
        die("cannot write --logits file '%s': %s", o.logits_path, strerror(errno));

    int batch = o.batch < n_prompt ? o.batch : n_prompt;
    long positions = (long)n_prompt + o.n_generate; /* the most this run can reach */
    if (!rolls && positions > c->context_length) positions = c->context_length;
    int rows = batch > o.samples ? batch : o.samples; /* --samples: one row per sample in a decode step */
    if (model_check_memory(&model, rows, positions, err, sizeof err) != 0) die("%s", err);
    RunState state;
    if (runstate_init(&state, &model, rows) != 0) die("out of memory allocating the run state");
    Sampler sampler = sampler_new(&o, o.seed, c->vocab_size);
    if (!sampler.order) die("out of memory");
    AttentionMap *map = NULL;
    int *sequence = NULL; /* --explore: the prompt's ids, then the generated ones */
    if (o.explore && positions > EXPLORE_MAX_POSITIONS)
        die("--explore: a page holds at most %d positions (prompt + -n), this run has up to %ld; use a shorter prompt "
            "or a smaller -n", EXPLORE_MAX_POSITIONS, positions);
    if (o.attn_map || o.attn_dump || o.explore) {
        if (!(map = attention_map_new(&model, o.attn_map_layers, (int)positions, err, sizeof err))) die("%s", err);
        if (o.attn_map && attention_map_check_png(map, err, sizeof err) != 0) die("%s", err);
        state.observer = (AttentionObserver){attention_map_record, map};
        if (o.explore && explore_check_size(&model, map, (int)positions, err, sizeof err) != 0) die("%s", err);
        if (o.explore && !(sequence = malloc(((size_t)n_prompt + o.n_generate) * sizeof *sequence))) die("out of memory");
        if (sequence) memcpy(sequence, prompt, (size_t)n_prompt * sizeof *sequence);
    }

    /* prefill: the prompt in chunks of `batch` tokens; logits of every position only when asked for
     * (--logits, and --ppl: the logits at p score the token at p + 1) */
    double t0 = now_seconds(), nll = 0.0;
    float *logits = NULL;
    for (int pos = 0; pos < n_prompt; pos += batch) {
        int n = n_prompt - pos < batch ? n_prompt - pos : batch;
        int all_rows = logits_file != NULL || o.ppl;
        logits = forward(&model, &state, prompt + pos, n, pos, all_rows);
        if (!logits) die("out of memory at position %d (KV cache or attention scores)", pos);
        check_outputs_finite(&model, &state, all_rows ? 0 : n - 1, all_rows ? n : 1, all_rows ? pos : pos + n - 1);
        for (int t = 0; o.ppl && t < n && pos + t + 1 < n_prompt; t++)
            nll += token_nll(logits + (size_t)t * c->vocab_size, c->vocab_size, prompt[pos + t + 1]);
        if (logits_file) {
            if (fwrite(logits, sizeof(float), (size_t)n * c->vocab_size, logits_file) != (size_t)n * c->vocab_size)
                die("writing --logits file '%s' failed", o.logits_path);
            logits += (size_t)(n - 1) * c->vocab_size; /* the last position's logits feed generation */
        }
    }
    if (logits_file && fclose(logits_file) != 0) die("writing --logits file '%s' failed", o.logits_path);
    double t1 = now_seconds();
    if (o.ppl) printf("perplexity: %.6f over %d tokens\n", exp(nll / (n_prompt - 1)), n_prompt - 1);
    if (o.samples) { /* batch.c: N sequences from this prompt */
        int bad = generate_samples(&model, &state, logits, prompt, n_prompt, o.samples, t1 - t0, &batch_options, err, sizeof err);
        free(sampler.order);
        free(prompt);
        runstate_free(&state);
        model_free(&model);
        if (bad) die("%s", err);
        check_stdout(1);
        return 0;
    }

    /* generation: sample, print, feed the token back */
    Utf8Stream out = {{0}, 0};
    DecodeState printed = {0, 0}; /* generation continues the prompt's text (its dummy-prefix space included) */
    for (int i = 0, len; i < n_prompt && model.tokenizer.kind != TOKENIZER_NONE; i++)
        tokenizer_decode(&model.tokenizer, &printed, prompt[i], &len);
    int generated = 0, pos = n_prompt;
    while (generated < o.n_generate) {
        int next = sample(&sampler, logits, c->vocab_size);
        if (model.tokenizer.kind != TOKENIZER_NONE && tokenizer_is_eos(&model.tokenizer, next)) break;
        if (sequence) sequence[n_prompt + generated] = next;
        if (o.print_ids || model.tokenizer.kind == TOKENIZER_NONE) { /* without a tokenizer, ids are all we can show */
            printf(generated ? " %d" : "%d", next);
        } else {
            int len;
            const unsigned char *bytes = tokenizer_decode(&model.tokenizer, &printed, next, &len);
            utf8_stream_write(&out, stdout, bytes, len);
        }
        if (fflush(stdout) != 0) check_stdout(0); /* a full disk ends the run now, not after -n tokens */
        if (++generated == o.n_generate) break;
        if (pos >= c->context_length && !rolls) {
            fprintf(stderr, "\nnote: stopped at the end of the model's context (%d tokens)\n", c->context_length);
            break;
        }
        logits = forward(&model, &state, &next, 1, pos++, 0);
        if (!logits) die("out of memory at position %d (KV cache or attention scores)", pos - 1);
        check_outputs_finite(&model, &state, 0, 1, pos - 1);
    }
    utf8_stream_flush(&out, stdout);
    if (o.n_generate > 0) printf("\n");
    check_stdout(1); /* every byte written; and the text ends before the stats line on one terminal or pipe */
    double t2 = now_seconds();
    if (map) {
        if (o.attn_map && attention_map_write_png(map, o.attn_map) != 0)
            die("cannot write --attn-map '%s': %s", o.attn_map, strerror(errno));
        if (o.attn_dump && attention_map_write_raw(map, o.attn_dump) != 0)
            die("cannot write --attn-dump '%s': %s", o.attn_dump, strerror(errno));
        if (o.explore) {
            char *command = explore_command_line(argc, argv);
            ExploreRun run = {o.model_path, command ? command : "./run", sequence, n_prompt, n_prompt + generated};
            if (explore_write(o.explore, &model, map, &run, err, sizeof err) != 0) die("%s", err);
            free(command);
        }
        attention_map_free(map);
        state.observer.record = NULL;
    }

    fprintf(stderr, "stats: prefill %d tok %.1f tok/s | decode %d tok %.1f tok/s | kv %zu bytes", n_prompt,
            n_prompt / (t1 - t0 > 0 ? t1 - t0 : 1e-9), generated, generated / (t2 - t1 > 0 ? t2 - t1 : 1e-9),
            kvcache_bytes_held(&state.kv));
    if (kvcache_state_bytes(&state.kv)) /* recurrent layers: a state of fixed size */
        fprintf(stderr, " | state %zu bytes", kvcache_state_bytes(&state.kv));
    fprintf(stderr, "\n");
    free(sampler.order);
    free(sequence);
    free(prompt);
    runstate_free(&state);
    model_free(&model);
    return 0;
}
