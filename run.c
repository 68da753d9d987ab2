/* run.c - the command line: load a model, turn the prompt (or a conversation, through the model's chat
 * template) into ids, run them through the model, sample new tokens one at a time and print them as they
 * come; or score a text (--ppl) window by window. */
#include <ctype.h>
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
#include <unistd.h>

#include "batch.h"
#include "explore.h"
#include "files.h"
#include "model.h"
#include "profile.h"
#include "sample.h"
#include "study.h"

/* ---------------------------------------------------------------------------------------------
 * errors: one line, exit status 1 */

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    make_printable(msg); /* arguments and file names stay on one line */
    fflush(stdout);
    fprintf(stderr, "error: %s\n", msg);
    exit(1);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------------------------------------
 * command line */

typedef struct {
    const char *model_path;
    const char *prompt;
    const char *tokens;     /* --tokens: ids, or @FILE: ids read from FILE */
    const char *logits_path;
    const char *encode_text;
    const char *decode_ids; /* --decode: ids */
    int n_generate, n_generate_given;
    SamplerSettings sampling;
    int seed_given;
    int print_ids, no_bos, echo, profile, bf16_prefill;
    int threads, batch;
    /* chat (chat.c) */
    int chat;
    const char *system, *render_chat;
    /* the attention study options (study.c) */
    const char *prompt_file; /* -f: prompt text from a file, "-" for standard input */
    int info, ppl, ppl_ctx, ppl_stride;
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
          "  -f FILE         prompt text from a file (- reads standard input)\n"
          "  -n N            tokens to generate (default 256; 0 = only process the prompt; --chat: per reply, default\n"
          "                  until the end of the turn)\n"
          "  --echo          print the prompt before the continuation\n"
          "sampling (llama.cpp's chain, in its order: repeat penalty, top-k, top-p, min-p, temperature):\n"
          "  -t TEMP         temperature (default 1.0; 0 = greedy)\n"
          "  --top-k K       keep the K most likely tokens (default 0 = off)\n"
          "  --top-p P       keep the most likely tokens up to probability P, in (0, 1] (default 0.9)\n"
          "  --min-p P       keep tokens at least P times as likely as the most likely one (default 0 = off)\n"
          "  --repeat-penalty R   divide the positive logits (multiply the negative ones) of the last N tokens by R\n"
          "                  (default 1 = off)\n"
          "  --repeat-last-n N    the tokens the penalty looks at, prompt included (default 64; -1 = the context)\n"
          "  -s SEED         random seed (default: from the clock; the stats line shows the one used)\n"
          "chat (the model's chat template, docs/CHAT.md):\n"
          "  --chat          with -p / -f: one user message; alone: a conversation, one user message per line of\n"
          "                  standard input (end a line with \\ to continue it), the KV cache kept between turns\n"
          "  --system TEXT   a system message first\n"
          "  --render-chat FILE  print the prompt the template renders for a JSON list of {\"role\", \"content\"}\n"
          "                  messages (- reads standard input), then exit\n"
          "ids:\n"
          "  --tokens LIST   token ids (commas and/or spaces between them) used as the prompt (no BOS added);\n"
          "                  @FILE reads them from FILE (separated by commas, spaces or newlines)\n"
          "  --print-ids     print the generated ids (comma-separated, one line) instead of text\n"
          "  --encode TEXT   print the ids TEXT encodes to as a prompt (comma-separated; - reads standard input),\n"
          "                  then exit; --no-bos drops the BOS\n"
          "  --decode LIST   print the text the token ids (commas and/or spaces) decode to, then exit\n"
          "  --no-bos        do not add the tokenizer's BOS to -p / -f / --encode text\n"
          "  --logits FILE   write float32 little-endian logits for every prompt position, [n_prompt][vocab]\n"
          "  --threads N     threads (default: all cores)\n"
          "  --batch N       prompt tokens per forward pass (default 256; 1 = token by token)\n"
          "  --profile       after the stats line, where prefill's and decode's time went, step by step\n"
          "  --bf16-prefill  f32 / bf16 weights: prompts on AMX-BF16 tiles where the CPU has them, activations\n"
          "                  rounded to bf16 (faster; the logits then differ from token by token's: docs/FORMAT.md)\n"
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
          "  --ppl           print the perplexity of the prompt (each token given the ones before it), then exit\n"
          "  --ctx N         --ppl: windows of N tokens (default: the model's context)\n"
          "  --stride S      --ppl: each window starts S tokens after the previous one and scores the tokens the\n"
          "                  previous did not (default N/2; less than N)\n"
          "  --window LIST   make layers slide: L=W[,L=W...] or all=W (W = 0: full attention)\n"
          "  --sinks N       the first N positions stay visible in every sliding layer (attention sinks)\n"
          "  --sparse LIST   block-sparse layers: strided:S, fixed:B or chunked:C for all, or L=strided:S[,L=fixed:B...]\n"
          "                  (after --window: it wins where both name a layer)\n"
          "  --attn KERNEL   naive (scores, softmax, sum; the default) or flash (tiled, online softmax)\n"
          "  --mla FORM      latent attention (DeepSeek): absorbed (in latent space), expanded (per-head keys and\n"
          "                  values decompressed) or auto (the cheaper at each position; the default)\n"
          "  --kv-type T     how the KV cache keeps keys and values: f32 (the default), bf16 (half the bytes) or\n"
          "                  q8_0 (int8 in groups of 32, about a quarter); latent attention layers keep f32\n"
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
    o.sampling = (SamplerSettings){.temperature = 1.0f, .top_p = 0.9f, .repeat_penalty = 1.0f, .repeat_last_n = 64};
    o.sampling.seed = (uint64_t)time(NULL);
    o.batch = 256;
    static const char *const flags[] = {"--print-ids", "--no-bos", "--info", "--ppl", "--echo", "--chat", "--profile",
                                        "--bf16-prefill"};
    int *flag_of[] = {&o.print_ids, &o.no_bos, &o.info, &o.ppl, &o.echo, &o.chat, &o.profile, &o.bf16_prefill};
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
        int f = 0;
        while (f < (int)(sizeof flags / sizeof *flags) && strcmp(a, flags[f])) f++;
        if (f < (int)(sizeof flags / sizeof *flags)) {
            *flag_of[f] = 1;
            continue;
        }
        /* every other option takes a value */
        static const char *const known[] = {"-p", "-n", "-t", "-s", "--top-p", "--top-k", "--min-p", "--repeat-penalty",
                                            "--repeat-last-n", "--tokens", "--logits", "--encode", "--decode",
                                            "--threads", "--batch", "-f", "--system", "--render-chat", "--ctx",
                                            "--stride", "--window", "--sinks", "--sparse", "--attn", "--attn-map",
                                            "--attn-map-layer", "--attn-dump", "--explore", "--mla", "--kv-type", "--samples",
                                            "--parallel", "--prompts", "--kv-map"};
        int k = 0;
        while (k < (int)(sizeof known / sizeof *known) && strcmp(a, known[k])) k++;
        if (k == (int)(sizeof known / sizeof *known)) die("unknown option '%s' (see --help)", a);
        if (i + 1 >= argc) die("%s needs a value", a);
        const char *v = argv[++i];
        SamplerSettings *s = &o.sampling;
        if (!strcmp(a, "-p")) o.prompt = v;
        else if (!strcmp(a, "-n")) o.n_generate = (int)parse_long(a, v, 0, 1 << 24), o.n_generate_given = 1;
        else if (!strcmp(a, "-t")) {
            s->temperature = parse_float(a, v, 0.0f, 100.0f);
            /* logits / t must stay finite: tiny temperatures are greedy in all but name */
            if (s->temperature > 0.0f && s->temperature < 1e-3f) die("-t must be 0 (greedy) or at least 0.001, got %s", v);
        }
        else if (!strcmp(a, "-s")) s->seed = (uint64_t)parse_long(a, v, 0, LONG_MAX), o.seed_given = 1;
        else if (!strcmp(a, "--top-p")) {
            s->top_p = parse_float(a, v, 0.0f, 1.0f);
            if (s->top_p == 0.0f) die("--top-p must be in (0, 1], got %s", v);
        }
        else if (!strcmp(a, "--top-k")) s->top_k = (int)parse_long(a, v, 0, INT_MAX);
        else if (!strcmp(a, "--min-p")) s->min_p = parse_float(a, v, 0.0f, 1.0f);
        else if (!strcmp(a, "--repeat-penalty")) {
            s->repeat_penalty = parse_float(a, v, 0.0f, 100.0f);
            if (s->repeat_penalty == 0.0f) die("--repeat-penalty must be positive (1 = off), got %s", v);
        }
        else if (!strcmp(a, "--repeat-last-n")) s->repeat_last_n = (int)parse_long(a, v, -1, 1 << 24);
        else if (!strcmp(a, "--tokens")) o.tokens = v;
        else if (!strcmp(a, "--logits")) o.logits_path = v;
        else if (!strcmp(a, "--encode")) o.encode_text = v;
        else if (!strcmp(a, "--decode")) o.decode_ids = v;
        else if (!strcmp(a, "--threads")) o.threads = (int)parse_long(a, v, 1, 1024);
        else if (!strcmp(a, "--batch")) o.batch = (int)parse_long(a, v, 1, 4096);
        else if (!strcmp(a, "-f")) o.prompt_file = v;
        else if (!strcmp(a, "--system")) o.system = v;
        else if (!strcmp(a, "--render-chat")) o.render_chat = v;
        else if (!strcmp(a, "--ctx")) o.ppl_ctx = (int)parse_long(a, v, 2, 1 << 24);
        else if (!strcmp(a, "--stride")) o.ppl_stride = (int)parse_long(a, v, 1, 1 << 24);
        else if (!strcmp(a, "--window")) o.overrides.window = v;
        else if (!strcmp(a, "--sinks")) o.overrides.n_sinks = (int)parse_long(a, v, 0, 1 << 20);
        else if (!strcmp(a, "--sparse")) o.overrides.sparse = v;
        else if (!strcmp(a, "--attn")) o.overrides.kernel = v;
        else if (!strcmp(a, "--attn-map")) o.attn_map = v;
        else if (!strcmp(a, "--attn-map-layer")) o.attn_map_layers = v;
        else if (!strcmp(a, "--attn-dump")) o.attn_dump = v;
        else if (!strcmp(a, "--explore")) o.explore = v;
        else if (!strcmp(a, "--mla")) o.overrides.latent = v;
        else if (!strcmp(a, "--kv-type")) o.overrides.kv_type = v;
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
    if ((o.ppl_ctx || o.ppl_stride) && !o.ppl) die("--ctx and --stride set the windows of --ppl");
    if (o.system && !o.chat) die("--system is a message of --chat");
    if (o.chat && (o.tokens || o.ppl)) die("--chat renders text through the chat template: it takes -p / -f, not %s",
                                         o.tokens ? "--tokens" : "--ppl");
    if (o.chat && (o.attn_map || o.attn_dump || o.logits_path || o.explore))
        die("--chat does not record --attn-map / --logits / --explore");
    if ((o.attn_map || o.attn_dump || o.explore) && o.overrides.latent && !strcmp(o.overrides.latent, "expanded"))
        die("%s needs the absorbed form of latent attention: expanded never materialises the weights",
            o.explore ? "--explore" : "--attn-map");
    if (o.samples && o.prompts_path) die("give --samples N or --prompts FILE, not both");
    if (o.parallel && !o.prompts_path) die("--parallel needs --prompts FILE");
    if (o.prompts_path && (o.prompt || o.tokens || o.prompt_file)) die("--prompts FILE gives the prompts: drop -p, -f and --tokens");
    if ((o.samples || o.prompts_path) && (o.ppl || o.attn_map || o.attn_dump || o.explore || o.chat || o.echo || o.profile))
        die("--ppl, --attn-map, --attn-dump, --explore, --chat, --echo and --profile work on one sequence: drop --samples / "
            "--prompts");
    if (o.kv_map && !o.samples) die("--kv-map draws the block tables of --samples N");
    if (!o.parallel) o.parallel = 8;
    return o;
}

/* ---------------------------------------------------------------------------------------------
 * input */

/* --tokens / --decode "1,2,3" or "1 2 3" (what --encode and --print-ids print, and the space-separated
 * lists other tools print) -> ids, each checked against the vocabulary. Commas and whitespace both separate;
 * an empty item between two commas is an error. */
static int parse_token_list(const char *opt, const char *list, int vocab_size, int **out) {
    size_t cap = 1;
    for (const char *p = list; *p; p++) cap += *p == ',' || isspace((unsigned char)*p);
    int *ids = malloc(cap * sizeof *ids), n = 0;
    if (!ids) die("out of memory");
    *out = ids; /* the caller owns it from here, also when an error below ends the program */
    const char *p = list;
    for (;;) {
        while (isspace((unsigned char)*p)) p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || (*end && *end != ',' && !isspace((unsigned char)*end)))
            die("%s expects token ids separated by commas or spaces, got '%.60s%s'", opt, list, strlen(list) > 60 ? "..." : "");
        if (v < 0 || v >= vocab_size) die("%s: id %ld is outside the vocabulary (0 .. %d)", opt, v, vocab_size - 1);
        ids[n++] = (int)v;
        p = end;
        while (isspace((unsigned char)*p)) p++;
        if (*p == ',') {
            do p++;
            while (isspace((unsigned char)*p));
            if (!*p) die("%s: trailing comma in '%.60s%s'", opt, list, strlen(list) > 60 ? "..." : "");
            if (*p == ',') die("%s: an empty item between two commas in '%.60s%s'", opt, list, strlen(list) > 60 ? "..." : "");
        }
    }
    return n;
}

/* ids as --encode and --print-ids print them: comma-separated, the form --tokens and --decode take */
static void print_ids(const int *ids, int n, int continues) {
    for (int i = 0; i < n; i++) printf(i || continues ? ",%d" : "%d", ids[i]);
}

/* A prompt file: at most the text 2^24 positions (the longest context the format allows) would hold at a
 * few bytes a token. */
#define MAX_PROMPT_FILE_BYTES ((size_t)64 << 20)

/* -f FILE, --tokens @FILE, --render-chat FILE, --encode -: the whole file ("-": standard input) as text
 * (NUL-terminated), a regular file of at most 64 MiB; what names it in errors; its length in *size */
static char *read_text_file(const char *what, const char *path, size_t *size) {
    char err[256];
    size_t len;
    char *text = read_whole_file(path, MAX_PROMPT_FILE_BYTES, &len, err, sizeof err);
    if (!text) die("cannot read %s '%s': %s", what, path, err);
    if (strlen(text) != len) die("%s '%s' contains a NUL byte: not a text file", what, path);
    if (size) *size = len;
    return text;
}

/* tokenizer_encode's count, or the line why there is none */
static void tokenized_or_die(int n) {
    if (n == TOKENIZER_REGEX_TOO_SLOW)
        die("the tokenizer's pre-tokenizer regex backtracks without end on this prompt (a pathological pattern)");
    if (n < 0) die("out of memory while tokenizing");
}

static int encode_text(const Model *m, const char *text, int add_bos, int **out) {
    if (m->tokenizer.kind == TOKENIZER_NONE) die("%s has no tokenizer: give the prompt as --tokens LIST", "this model");
    size_t len = strlen(text);
    int *ids = malloc(tokenizer_max_ids(len) * sizeof *ids);
    if (!ids) die("out of memory");
    int n = tokenizer_encode(&m->tokenizer, text, len, add_bos, ids);
    tokenized_or_die(n);
    *out = ids;
    return n;
}

/* ---------------------------------------------------------------------------------------------
 * outputs are checked before the run: each can be written, none is an input or another output */

static void check_outputs(const Options *o) {
    const char *outputs[][2] = {{"--logits", o->logits_path}, {"--attn-map", o->attn_map}, {"--attn-dump", o->attn_dump},
                                {"--explore", o->explore}};
    const char *tokens_file = o->tokens && o->tokens[0] == '@' ? o->tokens + 1 : NULL;
    const char *inputs[][2] = {{"the model file", o->model_path}, {"the -f file", o->prompt_file},
                               {"the --tokens file", tokens_file}, {"the --render-chat file", o->render_chat}};
    char err[256];
    for (int i = 0; i < (int)(sizeof outputs / sizeof *outputs); i++) {
        const char *opt = outputs[i][0], *path = outputs[i][1];
        if (!path) continue;
        if (check_output_path(path, err, sizeof err) != 0) die("cannot write %s file '%s': %s", opt, path, err);
        for (int k = 0; k < 4; k++)
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
 * positions first_pos .. (their logits too when the pass made them); names the tensor at fault when there is one. */
static void check_finite(const Model *m, const RunState *s, int t0, int rows, int first_pos, int have_logits) {
    int vocab = m->config.vocab_size, dim = m->config.dim;
    const float *logits = s->logits;
    for (int r = 0; r < rows; r++) {
        const float *x = s->x + (size_t)(t0 + r) * dim, *l = logits + (size_t)r * vocab;
        double squares = 0.0;
        for (int i = 0; i < dim; i++) squares += (double)x[i] * x[i];
        unsigned all_ones = 0; /* a non-finite float's exponent bits are all ones: an OR over the row vectorises */
        for (int i = 0; i < vocab && have_logits; i++) {
            uint32_t u;
            memcpy(&u, &l[i], sizeof u);
            all_ones |= (u & 0x7f800000u) == 0x7f800000u;
        }
        int finite = !all_ones;
        if (finite && squares <= FLT_MAX) continue;
        char name[96];
        if (model_find_nonfinite_tensor(m, name, sizeof name))
            die("the logits at position %d are not finite: tensor '%s' of the model holds a NaN or an infinity",
                first_pos + r, name);
        die("the activations at position %d overflow float32 (the last hidden state reaches a norm of %.3g): its "
            "logits are %s (weights too large?)", first_pos + r, sqrt(squares), finite ? "meaningless" : "not finite");
    }
}

static void check_outputs_finite(const Model *m, const RunState *s, int t0, int rows, int first_pos) {
    check_finite(m, s, t0, rows, first_pos, 1);
}

/* ---------------------------------------------------------------------------------------------
 * samplers for batch.c: one per sequence, each what a run of its own would use */

typedef struct {
    const SamplerSettings *settings;
    int vocab;
} SamplerContext;

static void *sampler_start(void *ctx, uint64_t seed, const int *prompt, int n_prompt) {
    const SamplerContext *c = ctx;
    SamplerSettings set = *c->settings;
    set.seed = seed;
    Sampler *s = malloc(sizeof *s);
    if (s && sampler_init(s, &set, c->vocab) != 0) {
        free(s);
        return NULL;
    }
    for (int i = 0; s && i < n_prompt; i++) sampler_accept(s, prompt[i]); /* the penalty sees the prompt */
    return s;
}

static int sampler_next(void *sampler, float *logits, int vocab) {
    (void)vocab;
    int next = sampler_sample(sampler, logits);
    sampler_accept(sampler, next);
    return next;
}

static void sampler_end(void *sampler) {
    sampler_free(sampler);
    free(sampler);
}

/* ---------------------------------------------------------------------------------------------
 * a session: the model, its KV cache and where the sequence has got to */

typedef struct {
    Model *model;
    RunState state;
    int batch;          /* prompt tokens per forward pass */
    int rows;           /* rows the run state holds: batch, or more for --samples' decode steps */
    int pos;            /* tokens in the KV cache */
    float *logits;      /* what forward() left for the next token */
    Sampler sampler;
    int rolls;          /* every layer slides: positions may run past the context */
    int *sequence;      /* --explore: every id fed or generated, in order (NULL: not kept) */
    int n_sequence;
    long n_prefilled, n_decoded;
    double t_prefill, t_decode;
} Session;

/* A run state for batches of `batch` tokens (rows of them at once, at least batch), after checking that the
 * memory the run can reach (positions: the most it may go to) fits the machine. */
static void session_start(Session *s, Model *m, int batch, int rows, long positions) {
    char err[512];
    if (!s->rolls && positions > m->config.context_length) positions = m->config.context_length;
    if (rows < batch) rows = batch;
    if (model_check_memory(m, rows, positions, err, sizeof err) != 0) die("%s", err);
    s->model = m;
    s->batch = batch;
    s->rows = rows;
    s->pos = 0;
    s->logits = NULL;
    if (runstate_init(&s->state, m, rows) != 0) die("out of memory allocating the run state");
}

/* Drops the KV cache: the next token is at position 0 again. */
static void session_restart(Session *s) {
    AttentionObserver observer = s->state.observer;
    runstate_free(&s->state);
    if (runstate_init(&s->state, s->model, s->rows) != 0) die("out of memory allocating the run state");
    s->state.observer = observer;
    s->pos = 0;
    s->logits = NULL;
}

static int context_left(const Session *s) { return s->rolls ? INT_MAX : s->model->config.context_length - s->pos; }

/* Feeds ids[0..n) at the next positions, `batch` at a time. When nll is given, adds -log p(ids[t]) for every
 * t >= score_from (each token given the ones before it; t >= 1); logits_file gets every position's logits. */
static void feed(Session *s, const int *ids, int n, int score_from, double *nll, FILE *logits_file, const char *logits_path) {
    const Config *c = &s->model->config;
    double t0 = now_seconds();
    profile_phase(PROFILE_PREFILL);
    for (int start = 0; start < n; start += s->batch) {
        int k = n - start < s->batch ? n - start : s->batch, all = nll != NULL || logits_file != NULL;
        int last = start + k == n; /* the chunks before the last need no logits unless they are scored or written */
        float *logits = forward(s->model, &s->state, ids + start, k, s->pos, all ? LOGITS_ALL : last ? LOGITS_LAST : LOGITS_NONE);
        if (!logits) die("out of memory at position %d (KV cache or attention scores)", s->pos);
        check_finite(s->model, &s->state, all ? 0 : k - 1, all ? k : 1, all ? s->pos : s->pos + k - 1, all || last);
        for (int t = 0; nll && t < k; t++) /* the logits at t score the token at t + 1 */
            if (start + t + 1 >= score_from && start + t + 1 < n)
                *nll += token_nll(logits + (size_t)t * c->vocab_size, c->vocab_size, ids[start + t + 1]);
        if (logits_file && fwrite(logits, sizeof(float), (size_t)k * c->vocab_size, logits_file) != (size_t)k * c->vocab_size)
            die("writing --logits file '%s' failed", logits_path);
        s->logits = all ? logits + (size_t)(k - 1) * c->vocab_size : logits; /* the last position's logits */
        s->pos += k;
    }
    for (int i = 0; i < n; i++) sampler_accept(&s->sampler, ids[i]);
    if (s->sequence) memcpy(s->sequence + s->n_sequence, ids, (size_t)n * sizeof *ids), s->n_sequence += n;
    s->n_prefilled += n;
    s->t_prefill += now_seconds() - t0;
}

/* Where generated text goes: printed as it comes (text or ids), and kept when reply is set */
typedef struct {
    int print_ids;
    Utf8Stream out;
    DecodeState decode;
    int printed_ids;
    char *reply; /* the generated text (chat keeps it as the assistant's message) */
    size_t reply_len, reply_cap;
} Printer;

static void print_token(Session *s, Printer *p, int id) {
    const Tokenizer *tok = &s->model->tokenizer;
    int len = 0;
    const unsigned char *bytes = tok->kind != TOKENIZER_NONE ? tokenizer_decode(tok, &p->decode, id, &len) : NULL;
    if (p->print_ids || tok->kind == TOKENIZER_NONE) { /* without a tokenizer, ids are all we can show */
        print_ids(&id, 1, p->printed_ids++);
    } else {
        utf8_stream_write(&p->out, stdout, bytes, len);
    }
    if (bytes && p->reply_cap) {
        while (p->reply_len + (size_t)len + 1 > p->reply_cap)
            if (!(p->reply = realloc(p->reply, p->reply_cap *= 2))) die("out of memory");
        memcpy(p->reply + p->reply_len, bytes, (size_t)len);
        p->reply_len += (size_t)len;
        p->reply[p->reply_len] = '\0';
    }
    if (fflush(stdout) != 0) check_stdout(0); /* a full disk ends the run now, not after -n tokens */
}

enum { STOP_LIMIT, STOP_END, STOP_CONTEXT };

/* Samples up to n_max tokens after what was fed, printing each; stops at a stop token (not printed, not
 * fed) or at the end of the context. */
static int generate(Session *s, Printer *p, int n_max, const int *stops, int n_stops) {
    double t0 = now_seconds();
    int reason = STOP_LIMIT;
    profile_phase(PROFILE_DECODE);
    for (int generated = 0; generated < n_max; generated++) {
        profile_section(PROFILE_SAMPLING);
        int next = sampler_sample(&s->sampler, s->logits);
        profile_section(PROFILE_OTHER);
        int stop = s->model->tokenizer.kind != TOKENIZER_NONE && tokenizer_is_eos(&s->model->tokenizer, next);
        for (int k = 0; k < n_stops; k++) stop |= stops[k] == next;
        if (stop) {
            reason = STOP_END;
            break;
        }
        print_token(s, p, next);
        s->n_decoded++;
        sampler_accept(&s->sampler, next);
        if (s->sequence) s->sequence[s->n_sequence++] = next;
        if (generated + 1 == n_max) break;
        if (context_left(s) <= 0) {
            reason = STOP_CONTEXT;
            break;
        }
        s->logits = forward(s->model, &s->state, &next, 1, s->pos, 0);
        if (!s->logits) die("out of memory at position %d (KV cache or attention scores)", s->pos);
        check_outputs_finite(s->model, &s->state, 0, 1, s->pos);
        s->pos++;
    }
    utf8_stream_flush(&p->out, stdout);
    s->t_decode += now_seconds() - t0;
    return reason;
}

static void print_stats(const Session *s, const SamplerSettings *set) {
    check_stdout(1); /* every byte written; and the text ends before the stats line on one terminal or pipe */
    fprintf(stderr, "stats: prefill %ld tok %.1f tok/s | decode %ld tok %.1f tok/s | kv %zu bytes | seed %llu",
            s->n_prefilled, s->n_prefilled / (s->t_prefill > 0 ? s->t_prefill : 1e-9), s->n_decoded,
            s->n_decoded / (s->t_decode > 0 ? s->t_decode : 1e-9), kvcache_bytes_held(&s->state.kv),
            (unsigned long long)set->seed);
    if (kvcache_state_bytes(&s->state.kv)) /* recurrent layers: a state of fixed size */
        fprintf(stderr, " | state %zu bytes", kvcache_state_bytes(&s->state.kv));
    fprintf(stderr, "\n");
}

/* ---------------------------------------------------------------------------------------------
 * perplexity over any length: windows of ctx tokens, each starting stride after the last; a window scores
 * the tokens the one before it did not reach, each given the rest of its window before it - every token
 * but the first scored exactly once (the transformers perplexity guide's strided evaluation) */

static void perplexity(Session *s, const int *ids, int n, int ctx, int stride, int progress) {
    double nll = 0.0;
    int windows = 0, scored_to = 1; /* tokens 1 .. scored_to-1 are scored */
    for (int begin = 0;; begin += stride) {
        int end = begin + ctx < n ? begin + ctx : n;
        if (windows > 0) session_restart(s);
        feed(s, ids + begin, end - begin, scored_to - begin, &nll, NULL, NULL);
        windows++;
        scored_to = end;
        if (progress) {
            fprintf(stderr, "\r\033[2Kppl: window %d of %d (tokens %d .. %d of %d), perplexity so far %.4f", windows,
                    n <= ctx ? 1 : 1 + (n - ctx + stride - 1) / stride, begin, end - 1, n, exp(nll / (end - 1)));
            fflush(stderr);
        }
        if (end == n) break;
    }
    if (progress) fprintf(stderr, "\r\033[2K");
    printf("perplexity: %.6f over %d tokens", exp(nll / (n - 1)), n - 1);
    if (windows > 1) printf(" (%d windows of %d tokens, stride %d)", windows, ctx, stride);
    printf("\n");
}

/* ---------------------------------------------------------------------------------------------
 * chat (chat.c renders the model's template; docs/CHAT.md) */

typedef struct {
    ChatMessage *messages;
    int n, cap;
    char *cached;        /* the text the KV cache holds: the last render, then the reply */
    size_t cached_len;
    int stops[1], n_stops; /* the template's end of an assistant turn (the tokenizer's EOS ids stop it too) */
} Conversation;

static void add_message(Conversation *c, const char *role, const char *content, size_t len) {
    if (c->n == c->cap && !(c->messages = realloc(c->messages, (size_t)(c->cap = c->cap ? 2 * c->cap : 8) * sizeof *c->messages)))
        die("out of memory");
    char *copy = malloc(len + 1);
    if (!copy) die("out of memory");
    memcpy(copy, content, len);
    copy[len] = '\0';
    c->messages[c->n++] = (ChatMessage){role, copy, len};
}

/* The token that ends an assistant turn: the first special token in what the template puts after the
 * assistant's words (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, </s>, ...), whitespace skipped. A
 * template that shows no assistant message leaves the tokenizer's EOS ids alone to end a reply (one that
 * cannot render at all fails with the conversation's first render). */
static void find_turn_end(const Model *m, Conversation *c) {
    char err[512], *text;
    size_t len;
    if (chat_turn_end(&m->chat, &text, &len, err, sizeof err) != 0) return;
    size_t i = 0;
    while (i < len && isspace((unsigned char)text[i])) i++;
    const Tokenizer *t = &m->tokenizer;
    int best = -1;
    for (int id = 0; id < t->n_pieces; id++) {
        int type = t->type[id];
        size_t n = (size_t)t->piece_len[id];
        if ((type == PIECE_SPECIAL || type == PIECE_CONTROL || type == PIECE_USER) && n > 0 && n <= len - i &&
            memcmp(text + i, t->piece[id], n) == 0 && (best < 0 || t->piece_len[id] > t->piece_len[best]))
            best = id;
    }
    free(text);
    if (best >= 0) c->stops[c->n_stops++] = best;
}

static char *render(const Model *m, const Conversation *c, size_t *len) {
    char err[512];
    char *text = chat_render(&m->chat, c->messages, c->n, 1, len, err, sizeof err);
    if (!text) die("%s", err);
    return text;
}

/* One turn: the conversation as the template renders it now, fed after what the cache holds (all of it when
 * the template rewrote the past, e.g. dropping a reply's reasoning); then the reply. 0, or STOP_CONTEXT when
 * the context is full. */
static int chat_turn(Session *s, Conversation *c, const Options *o) {
    size_t len;
    char *text = render(s->model, c, &len);
    size_t from = c->cached_len;
    if (from > len || (from > 0 && memcmp(text, c->cached, from) != 0)) { /* the past reads differently now: start over */
        session_restart(s);
        from = 0;
    }
    int *ids, n = tokenizer_encode_chat(&s->model->tokenizer, text + from, len - from, &ids);
    tokenized_or_die(n);
    if (n == 0) die("the chat template renders nothing new for this message");
    if (n >= context_left(s)) {
        free(ids), free(text);
        return STOP_CONTEXT;
    }
    if (o->echo) {
        if (o->print_ids) print_ids(ids, n, 0), printf("\n");
        else fwrite(text + from, 1, len - from, stdout);
    }
    feed(s, ids, n, 0, NULL, NULL, NULL);
    free(ids);
    Printer p = {.print_ids = o->print_ids, .decode = {1, 0}, .reply = malloc(256), .reply_cap = 256};
    if (!p.reply) die("out of memory");
    p.reply[0] = '\0';
    int limit = o->n_generate_given ? o->n_generate : INT_MAX;
    int reason = generate(s, &p, limit, c->stops, c->n_stops);
    printf("\n");
    add_message(c, "assistant", p.reply, p.reply_len);
    free(c->cached);
    c->cached = text;
    c->cached_len = len;
    /* the cache now also holds the reply: its text follows the render */
    if (!(c->cached = realloc(c->cached, len + p.reply_len + 1))) die("out of memory");
    memcpy(c->cached + len, p.reply, p.reply_len + 1);
    c->cached_len = len + p.reply_len;
    free(p.reply);
    return reason == STOP_CONTEXT ? STOP_CONTEXT : 0;
}

/* A line of standard input ("" at the end); a line ending in a backslash continues on the next */
static char *read_message(int *eof) {
    char *msg = NULL, *line = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        ssize_t got = getline(&line, &cap, stdin);
        if (got < 0) {
            *eof = 1;
            break;
        }
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) got--;
        int more = got > 0 && line[got - 1] == '\\';
        if (more) line[--got] = '\n', got++;
        if (!(msg = realloc(msg, len + (size_t)got + 1))) die("out of memory");
        memcpy(msg + len, line, (size_t)got);
        len += (size_t)got;
        msg[len] = '\0';
        if (!more) break;
    }
    free(line);
    return msg;
}

static void free_conversation(Conversation *c) {
    for (int i = 0; i < c->n; i++) free((char *)c->messages[i].content);
    free(c->messages);
    free(c->cached);
}

static void context_full_note(const Session *s) {
    fflush(stdout);
    fprintf(stderr, "chat: the model's context (%d tokens) is full: the conversation ends here\n",
            s->model->config.context_length);
}

/* --chat: one user message from -p / -f, or one per line of standard input until its end */
static void chat(Session *s, const Options *o, const char *first) {
    const Model *m = s->model;
    if (!m->chat.template_text)
        die("%s has no chat template (export an instruct checkpoint whose tokenizer_config.json has one, or give "
            "export.py --chat-template FILE)", o->model_path);
    if (m->tokenizer.kind == TOKENIZER_NONE) die("%s has no tokenizer to chat with", o->model_path);
    Conversation c = {0};
    find_turn_end(m, &c);
    if (o->system) add_message(&c, "system", o->system, strlen(o->system));
    int interactive = first == NULL, prompt = interactive && isatty(0) && isatty(1);
    for (;;) {
        char *msg = NULL;
        if (first) {
            msg = strdup(first);
            if (!msg) die("out of memory");
        } else {
            int eof = 0;
            if (prompt) printf("> "), fflush(stdout);
            msg = read_message(&eof);
            if (eof && (!msg || !*msg)) {
                free(msg);
                if (prompt) printf("\n");
                break;
            }
        }
        const char *text = msg;
        while (isspace((unsigned char)*text)) text++;
        if (!*text) { /* an empty (or blank) line asks nothing */
            free(msg);
            if (first) break;
            continue;
        }
        add_message(&c, "user", msg, strlen(msg));
        free(msg);
        if (chat_turn(s, &c, o) == STOP_CONTEXT) {
            context_full_note(s);
            break;
        }
        if (first) break;
    }
    free_conversation(&c);
}

/* --render-chat FILE.json */
static void render_chat_file(const Model *m, const char *path) {
    size_t json_len, len;
    char *json = read_text_file("--render-chat file", path, &json_len), err[512];
    char *text = chat_render_json(&m->chat, json, json_len, 1, &len, err, sizeof err);
    free(json);
    if (!text) die("%s", err);
    fwrite(text, 1, len, stdout);
    free(text);
}

/* ---------------------------------------------------------------------------------------------
 * main */

static void decode_ids(const Model *m, const char *list) { /* printed as generation would print them */
    if (m->tokenizer.kind == TOKENIZER_NONE) die("this model has no tokenizer to decode with");
    int *ids, n = parse_token_list("--decode", list, m->config.vocab_size, &ids);
    Utf8Stream out = {{0}, 0};
    DecodeState state = {0, 0};
    for (int i = 0, len; i < n; i++) {
        const unsigned char *bytes = tokenizer_decode(&m->tokenizer, &state, ids[i], &len);
        utf8_stream_write(&out, stdout, bytes, len);
    }
    utf8_stream_flush(&out, stdout);
    printf("\n");
    free(ids);
}

/* The prompt as ids: --tokens, -f, -p, or -p / -f as a user message through the chat template */
static int prompt_ids(const Model *m, const Options *o, int **ids) {
    const Config *c = &m->config;
    if (o->tokens && o->tokens[0] == '@') {
        char *text = read_text_file("--tokens file", o->tokens + 1, NULL);
        int n = parse_token_list("--tokens file", text, c->vocab_size, ids);
        if (n == 0) die("--tokens file '%s' holds no ids", o->tokens + 1);
        free(text);
        return n;
    }
    if (o->tokens) {
        int n = parse_token_list("--tokens", o->tokens, c->vocab_size, ids);
        if (n == 0) die("--tokens: no ids given");
        return n;
    }
    char *text = o->prompt_file ? read_text_file("-f file", o->prompt_file, NULL) : strdup(o->prompt ? o->prompt : "");
    if (!text) die("out of memory");
    int n = encode_text(m, text, !o->no_bos, ids);
    free(text);
    return n;
}

/* Generation from -p / -f / --tokens (--samples: N of them, batch.c), or --ppl. Returns 1 when batch.c has
 * printed the stats line, else 0. */
static int run_prompt(Session *s, Model *m, Options *o, const BatchOptions *samples, int argc, char **argv) {
    const Config *c = &m->config;
    char err[512];
    int *prompt, n_prompt = prompt_ids(m, o, &prompt);
    if (n_prompt == 0) die("the prompt is empty and the tokenizer has no BOS to start from: give -p TEXT");
    if (o->ppl && n_prompt < 2) die("--ppl needs a prompt of at least 2 tokens (each token is scored given the ones before it)");
    int ctx = o->ppl_ctx ? o->ppl_ctx : s->rolls && n_prompt > c->context_length ? n_prompt : c->context_length;
    if (o->ppl && ctx > c->context_length && !s->rolls) die("--ctx %d is longer than the model's context (%d)", ctx, c->context_length);
    int windows = o->ppl && n_prompt > ctx;
    if (n_prompt > c->context_length && !s->rolls && !windows)
        die("the prompt has %d tokens but the model's context is %d", n_prompt, c->context_length);
    int stride = o->ppl_stride ? o->ppl_stride : ctx / 2;
    if (windows && stride >= ctx) die("--stride %d must be less than --ctx %d (each window's first token needs one before it)", stride, ctx);
    if (windows && (o->logits_path || o->attn_map || o->attn_dump || o->explore))
        die("--logits / --attn-map / --explore record one pass: the text needs %d-token windows (give a shorter one)", ctx);

    FILE *logits_file = NULL;
    if (o->logits_path && !(logits_file = fopen(o->logits_path, "wb")))
        die("cannot write --logits file '%s': %s", o->logits_path, strerror(errno));
    int first_window = windows ? ctx : n_prompt;
    long positions = windows ? ctx : (long)n_prompt + o->n_generate; /* the most this run can reach */
    if (!s->rolls && positions > c->context_length) positions = c->context_length;
    session_start(s, m, o->batch < first_window ? o->batch : first_window, o->samples, positions);
    if (!windows) /* the KV blocks this run will write, set aside before the prompt (kvcache_reserve) */
        kvcache_reserve(&s->state.kv, o->samples ? o->samples : 1, o->samples ? n_prompt : 0,
                        o->samples ? positions - n_prompt : positions);
    AttentionMap *map = NULL;
    if (o->explore && positions > EXPLORE_MAX_POSITIONS)
        die("--explore: a page holds at most %d positions (prompt + -n), this run has up to %ld; use a shorter prompt "
            "or a smaller -n", EXPLORE_MAX_POSITIONS, positions);
    if (o->attn_map || o->attn_dump || o->explore) {
        if (!(map = attention_map_new(m, o->attn_map_layers, (int)positions, err, sizeof err))) die("%s", err);
        if (o->attn_map && attention_map_check_png(map, err, sizeof err) != 0) die("%s", err);
        s->state.observer = (AttentionObserver){attention_map_record, map};
        if (o->explore && explore_check_size(m, map, (int)positions, err, sizeof err) != 0) die("%s", err);
        if (o->explore && !(s->sequence = malloc(((size_t)n_prompt + o->n_generate) * sizeof *s->sequence)))
            die("out of memory");
    }

    if (o->ppl) {
        if (logits_file) { /* one pass: the logits of every position too */
            double nll = 0.0;
            feed(s, prompt, n_prompt, 1, &nll, logits_file, o->logits_path);
            printf("perplexity: %.6f over %d tokens\n", exp(nll / (n_prompt - 1)), n_prompt - 1);
        } else {
            perplexity(s, prompt, n_prompt, ctx, stride, windows && isatty(2));
        }
    } else {
        /* prefill the prompt; --echo shows it first, as generation will continue it */
        Printer p = {.print_ids = o->print_ids};
        if (o->echo) /* the text of the prompt (the BOS the tokenizer added shows only as an id) */
            for (int i = 0, len; i < n_prompt; i++)
                if (i > 0 || o->print_ids || o->tokens || prompt[0] != m->tokenizer.bos_id) print_token(s, &p, prompt[i]);
                else tokenizer_decode(&m->tokenizer, &p.decode, prompt[i], &len);
        else
            for (int i = 0, len; i < n_prompt && m->tokenizer.kind != TOKENIZER_NONE; i++)
                tokenizer_decode(&m->tokenizer, &p.decode, prompt[i], &len); /* generation continues its text */
        feed(s, prompt, n_prompt, 0, NULL, logits_file, o->logits_path);
        if (o->samples) { /* batch.c: N sequences from this prompt, decoding together; it prints the stats */
            if (logits_file && fclose(logits_file) != 0) die("writing --logits file '%s' failed", o->logits_path);
            if (generate_samples(m, &s->state, s->logits, prompt, n_prompt, o->samples, s->t_prefill, samples, err,
                                 sizeof err) != 0)
                die("%s", err);
            free(prompt);
            return 1;
        }
        if (generate(s, &p, o->n_generate, NULL, 0) == STOP_CONTEXT)
            fprintf(stderr, "\nnote: stopped at the end of the model's context (%d tokens)\n", c->context_length);
        if (o->n_generate > 0 || o->echo) printf("\n");
    }
    if (logits_file && fclose(logits_file) != 0) die("writing --logits file '%s' failed", o->logits_path);
    if (map) {
        if (o->attn_map && attention_map_write_png(map, o->attn_map, &m->tokenizer, prompt, n_prompt) != 0)
            die("cannot write --attn-map '%s': %s", o->attn_map, strerror(errno));
        if (o->attn_dump && attention_map_write_raw(map, o->attn_dump) != 0)
            die("cannot write --attn-dump '%s': %s", o->attn_dump, strerror(errno));
        if (o->explore) {
            char *command = explore_command_line(argc, argv);
            ExploreRun run = {o->model_path, command ? command : "./run", s->sequence, n_prompt, s->n_sequence};
            if (explore_write(o->explore, m, map, &run, err, sizeof err) != 0) die("%s", err);
            free(command);
        }
        attention_map_free(map);
        s->state.observer.record = NULL;
    }
    free(s->sequence);
    s->sequence = NULL;
    free(prompt);
    return 0;
}

int main(int argc, char **argv) {
    int closed = reopen_closed_standard_streams();
    Options o = parse_args(argc, argv);
    if (o.ppl) o.n_generate = 0; /* --ppl scores the prompt and generates nothing */
    if ((closed & 2) && (o.info || o.encode_text || o.decode_ids || o.ppl || o.render_chat || o.chat || o.n_generate > 0))
        die("standard output is closed: there is nowhere to print to");
    check_outputs(&o);
    if (o.threads > 0) parallel_set_threads(o.threads);
    matmul_bf16_prefill(o.bf16_prefill);
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
        char *text = !strcmp(o.encode_text, "-") ? read_text_file("--encode input", "-", NULL) : strdup(o.encode_text);
        int *ids, n = encode_text(&model, text, !o.no_bos, &ids);
        print_ids(ids, n, 0);
        printf("\n");
        check_stdout(1);
        free(ids), free(text);
        model_free(&model);
        return 0;
    }
    if (o.decode_ids) {
        decode_ids(&model, o.decode_ids);
        check_stdout(1);
        model_free(&model);
        return 0;
    }
    if (o.render_chat) {
        render_chat_file(&model, o.render_chat);
        check_stdout(1);
        model_free(&model);
        return 0;
    }

    if (o.sampling.repeat_last_n < 0) o.sampling.repeat_last_n = c->context_length;
    SamplerContext sampler_context = {&o.sampling, c->vocab_size};
    BatchOptions batch = {o.n_generate, o.sampling.seed, o.print_ids, o.batch, o.parallel, !o.no_bos, NULL, o.kv_map,
                          {sampler_start, sampler_next, sampler_end, &sampler_context}, check_outputs_finite};
    if (o.prompts_path) { /* batch.c: the prompts of a file, decoding together */
        if (o.logits_path && !(batch.logits_file = fopen(o.logits_path, "wb")))
            die("cannot write --logits file '%s': %s", o.logits_path, strerror(errno));
        int bad = generate_prompts(&model, o.prompts_path, &batch, err, sizeof err);
        if (batch.logits_file && fclose(batch.logits_file) != 0 && !bad) die("writing --logits file '%s' failed", o.logits_path);
        if (bad) die("%s", err);
        check_stdout(1);
        model_free(&model);
        return 0;
    }

    if (o.profile) profile_start();
    Session s = {0};
    s.rolls = model_can_roll(&model);
    if (sampler_init(&s.sampler, &o.sampling, c->vocab_size) != 0) die("out of memory");
    int printed = 0;
    if (o.chat) {
        char *file_text = o.prompt_file ? read_text_file("-f file", o.prompt_file, NULL) : NULL;
        session_start(&s, &model, o.batch, o.batch, c->context_length);
        chat(&s, &o, o.prompt ? o.prompt : file_text);
        free(file_text);
    } else {
        printed = run_prompt(&s, &model, &o, &batch, argc, argv);
    }
    if (!printed) print_stats(&s, &o.sampling);
    else check_stdout(1);
    if (o.profile) profile_report(stderr, (int)s.n_prefilled, (int)s.n_decoded, parallel_threads());
    sampler_free(&s.sampler);
    runstate_free(&s.state);
    model_free(&model);
    return 0;
}
