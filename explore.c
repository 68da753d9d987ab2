/* explore.c - ./run --explore FILE.html: the run as one self-contained page.
 *
 * The page is explore/page.html, compiled in (build/explore_page.h, made by explore/embed.sh) so that ./run
 * works from any directory. It is a template with one line "@ATTN_DATA@", where this file writes the run as
 * JSON (format 1):
 *   - the tokens (prompt, then generated) and the --info text;
 *   - every layer as a mixer kind with a free-form list of properties (layer_wiring() in study.c), and for
 *     attention layers the numbers the diagram draws (q / kv heads, mask kind, span, sinks);
 *   - each layer's mask at each position as its visible keys (VisibleKeys: at most two runs);
 *   - each layer's KV cache simulated through kvcache.c: the slot each position takes, the position at which
 *     it leaves the cache, the rows held after each position, and what MHA with full attention would hold;
 *   - every recorded head's attention weights, quantised. A row (one head, one query) over its visible keys
 *     in FOR_EACH_VISIBLE_KEY order is
 *         m       the row's largest weight (float32)
 *         bitmap  one bit per visible key, least significant first, each row starting on a new byte:
 *                 1 = stored, i.e. w >= threshold and code >= 1
 *         codes   one byte per stored weight, code = round(255 w / m), read back as code * m / 255
 *     so a stored weight is within m/510 of the recorded one and a weight left out is below
 *     max(threshold, m/510); the stored weights of a row sum to 1 - (the weights left out) within
 *     (stored keys) * m/510. The threshold is the lowest of THRESHOLDS that keeps the data within
 *     EXPLORE_MAX_DATA_BYTES.
 * Arrays are little-endian int32 / float32 / bytes in base64; JSON strings escape <, > and & so that nothing
 * in them can close the <script> element that holds them. */
#include "explore.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "build/explore_page.h" /* explore_page_lines[]: explore/page.html, one string per line */
#include "unicode.h"

/* Weights below the threshold are left out; it rises only when the lowest would not fit. */
static const float THRESHOLDS[] = {1e-3f, 2e-3f, 5e-3f, 1e-2f, 2e-2f, 5e-2f};
#define N_THRESHOLDS (int)(sizeof THRESHOLDS / sizeof *THRESHOLDS)
#define MOST_CODES_PER_ROW 20 /* weights >= the highest threshold, 0.05, in a row summing to 1 */
#define ROW_SUM_TOLERANCE 1e-4 /* |sum of a recorded row - 1|: float32 softmax over up to 2k keys is ~1e-6 */
#define RUN_INTS 7            /* a position's VisibleKeys: n_runs, then first, count, step of two runs */
#define CACHE_ARRAYS 4        /* slot, evicted_at, rows, mha_rows */

static int fail(char *err, size_t errlen, const char *msg) {
    snprintf(err, errlen, "%s", msg);
    return -1;
}

/* ---------------------------------------------------------------------------------------------
 * quantising a row of weights */

/* 1 if weight w of a row whose largest is m is stored, with its code */
static int is_stored(float w, float m, float threshold, int *code) {
    *code = (int)lround((double)w / m * 255.0);
    return *code >= 1 && w >= threshold;
}

/* The recorded row is a distribution over the visible keys: finite, in [0, 1], 0 at every hidden key (they
 * come in increasing order, so the hidden ones are the gaps), summing to 1 - or, in a layer with learned
 * sinks (gpt-oss), to at most 1: the sink took the rest. Sets *max_weight. */
static int check_recorded_row(const float *row, const AttentionSpec *a, int pos, float *max_weight, char *err,
                              size_t errlen) {
    VisibleKeys v = visible_keys(a, pos);
    double sum = 0.0;
    float m = 0.0f;
    int next = 0, hidden_nonzero = 0, bad = 0;
    FOR_EACH_VISIBLE_KEY(v, j) {
        for (; next < j; next++) hidden_nonzero |= row[next] != 0.0f;
        next = j + 1;
        bad |= !isfinite(row[j]) || row[j] < 0.0f || row[j] > 1.0f;
        sum += row[j];
        if (row[j] > m) m = row[j];
    }
    for (; next <= pos; next++) hidden_nonzero |= row[next] != 0.0f;
    if (bad) return fail(err, errlen, "a recorded attention weight is not a finite number in [0, 1]");
    if (hidden_nonzero) return fail(err, errlen, "a key the mask hides has a recorded weight");
    if (a->sink_logits ? sum > 1.0 + ROW_SUM_TOLERANCE : fabs(sum - 1.0) > ROW_SUM_TOLERANCE)
        return fail(err, errlen, "a recorded row of weights does not sum to 1");
    *max_weight = m;
    return 0;
}

int explore_quantise_row(const float *row, const AttentionSpec *a, int pos, float threshold, unsigned char *bitmap,
                         unsigned char *codes, float *max_weight, int *n_codes, char *err, size_t errlen) {
    float m;
    if (check_recorded_row(row, a, pos, &m, err, errlen) != 0) return -1;
    VisibleKeys v = visible_keys(a, pos);
    int i = 0, n = 0, code;
    memset(bitmap, 0, (size_t)(visible_count(a, pos) + 7) / 8);
    FOR_EACH_VISIBLE_KEY(v, j) {
        if (is_stored(row[j], m, threshold, &code)) bitmap[i >> 3] |= (unsigned char)(1u << (i & 7)), codes[n++] = (unsigned char)code;
        i++;
    }
    /* read back as the page does */
    double step = m / 510.0, slack = 1e-9, shown = 0.0, left_out = 0.0, total = 0.0;
    int k = 0, bad = 0;
    i = 0;
    FOR_EACH_VISIBLE_KEY(v, j) {
        if (bitmap[i >> 3] >> (i & 7) & 1) {
            double w = codes[k++] * (double)m / 255.0;
            bad |= fabs(w - row[j]) > step + slack;
            shown += w;
        } else {
            bad |= row[j] >= (threshold > step ? threshold : step) + slack;
            left_out += row[j];
        }
        total += row[j];
        i++;
    }
    if (bad || k != n || fabs(shown + left_out - total) > n * step + ROW_SUM_TOLERANCE)
        return fail(err, errlen, "a quantised row of weights reads back outside the stated error");
    *max_weight = m;
    *n_codes = n;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * the data's size */

static int layer_recorded(const AttentionMap *map, int l) { return attention_map_row(map, l, 0, 0) != NULL; }

/* Bytes of everything but the codes: masks, cache arrays, and per row its scale and bitmap */
static double fixed_bytes(const Model *m, const AttentionMap *map, int T, double *n_rows) {
    double bytes = (double)m->config.n_layers * T * (RUN_INTS + CACHE_ARRAYS) * 4, rows = 0;
    for (int l = 0; l < m->config.n_layers; l++) {
        if (!layer_recorded(map, l)) continue;
        int heads = m->config.layers[l].attn.n_heads;
        for (int q = 0; q < T; q++) bytes += heads * (4.0 + (visible_count(&m->attention[l], q) + 7) / 8);
        rows += (double)heads * T;
    }
    *n_rows = rows;
    return bytes;
}

int explore_check_size(const Model *m, const AttentionMap *map, int n_positions, char *err, size_t errlen) {
    double rows, bytes = fixed_bytes(m, map, n_positions, &rows) + rows * MOST_CODES_PER_ROW;
    if (bytes > EXPLORE_MAX_DATA_BYTES) {
        snprintf(err, errlen, "--explore: %.0f rows of weights over %d positions would need %.1f MiB in the page "
                 "(at most %.0f); record fewer layers with --attn-map-layer, or use fewer tokens",
                 rows, n_positions, bytes / (1 << 20), (double)EXPLORE_MAX_DATA_BYTES / (1 << 20));
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * the weights, quantised */

typedef struct {
    float threshold;
    size_t n_rows, bitmap_len, n_codes;
    float *scales;         /* [n_rows] the largest weight of each row */
    unsigned char *bitmap; /* [bitmap_len] */
    unsigned char *codes;  /* [n_codes] */
} PageWeights;

static void page_weights_free(PageWeights *p) { free(p->scales), free(p->bitmap), free(p->codes); }

/* Says which row err is about: "--explore: layer L head H position P: ..." */
static int row_failed(int l, int h, int q, char *err, size_t errlen) {
    char why[256];
    snprintf(why, sizeof why, "%s", err);
    snprintf(err, errlen, "--explore: layer %d head %d position %d: %s", l, h, q, why);
    return -1;
}

/* Rows in the order the page reads them: recorded layers, their heads, queries 0 .. T-1 */
#define FOR_EACH_ROW(m, map, T, l, h, q)                                                                          \
    for (int l = 0; l < (m)->config.n_layers; l++)                                                                \
        if (layer_recorded(map, l))                                                                               \
            for (int h = 0; h < (m)->config.layers[l].attn.n_heads; h++)                                               \
                for (int q = 0; q < (T); q++)

/* The lowest threshold whose codes fit next to the fixed part: counts what each would store */
static int choose_threshold(const Model *m, const AttentionMap *map, int T, float *threshold, char *err, size_t errlen) {
    double rows, fixed = fixed_bytes(m, map, T, &rows), codes[N_THRESHOLDS] = {0};
    FOR_EACH_ROW(m, map, T, l, h, q) {
        const float *row = attention_map_row(map, l, h, q);
        const AttentionSpec *a = &m->attention[l];
        float max = 0.0f;
        if (check_recorded_row(row, a, q, &max, err, errlen) != 0) return row_failed(l, h, q, err, errlen);
        VisibleKeys v = visible_keys(a, q);
        int code;
        FOR_EACH_VISIBLE_KEY(v, j)
            if (is_stored(row[j], max, THRESHOLDS[0], &code))
                for (int t = 0; t < N_THRESHOLDS && row[j] >= THRESHOLDS[t]; t++) codes[t]++;
    }
    for (int t = 0; t < N_THRESHOLDS; t++)
        if (fixed + codes[t] <= EXPLORE_MAX_DATA_BYTES) return *threshold = THRESHOLDS[t], 0;
    return fail(err, errlen, "--explore: the weights do not fit in a page even at the highest threshold");
}

static int quantise_weights(const Model *m, const AttentionMap *map, int T, PageWeights *p, char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    if (choose_threshold(m, map, T, &p->threshold, err, errlen) != 0) return -1;
    size_t rows = 0, bitmap_cap = 0, codes_cap = 0;
    FOR_EACH_ROW(m, map, T, l, h, q) {
        size_t n = (size_t)visible_count(&m->attention[l], q);
        rows++, bitmap_cap += (n + 7) / 8, codes_cap += n;
    }
    p->scales = malloc((rows + 1) * sizeof *p->scales);
    p->bitmap = malloc(bitmap_cap + 1);
    p->codes = malloc(codes_cap + 1);
    if (!p->scales || !p->bitmap || !p->codes) return page_weights_free(p), fail(err, errlen, "out of memory");
    FOR_EACH_ROW(m, map, T, l, h, q) {
        const AttentionSpec *a = &m->attention[l];
        int n_codes;
        if (explore_quantise_row(attention_map_row(map, l, h, q), a, q, p->threshold, p->bitmap + p->bitmap_len,
                                 p->codes + p->n_codes, &p->scales[p->n_rows], &n_codes, err, errlen) != 0)
            return page_weights_free(p), row_failed(l, h, q, err, errlen);
        p->n_rows++;
        p->bitmap_len += (size_t)(visible_count(a, q) + 7) / 8;
        p->n_codes += (size_t)n_codes;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * each layer's KV cache, simulated */

/* The cache kvcache.c gives the layer, with one-float rows (the bytes scale with kv_dim, nothing else does):
 * per position j the slot it takes and the first position at which it is no longer held (T: never), per
 * position p the rows allocated once p is stored, and the rows of plain MHA with full attention (paged). */
static int simulate_cache(const AttentionSpec *a, int T, int32_t *slot, int32_t *evicted_at, int32_t *rows,
                          int32_t *mha_rows) {
    KVLayer cache, mha;
    attention_cache_init(&cache, 1, 1, a);
    kvlayer_set_type(&cache, KV_F32); /* rows counted as floats, whatever --kv-type */
    kvlayer_init(&mha, 1, 0, 0);
    int *held = malloc((size_t)T * sizeof *held), n_held = 0, rc = held ? 0 : -1;
    const float zero = 0.0f;
    for (int p = 0; p < T && rc == 0; p++) {
        if ((rc = kvlayer_store(&cache, p, &zero, &zero)) != 0) break;
        slot[p] = kvlayer_slot_of(&cache, p);
        evicted_at[p] = T;
        held[n_held++] = p;
        int kept = 0;
        for (int i = 0; i < n_held; i++)
            if (kvlayer_holds(&cache, held[i])) held[kept++] = held[i];
            else evicted_at[held[i]] = p;
        n_held = kept;
        rows[p] = (int32_t)(kvlayer_bytes_held(&cache) / (2 * sizeof(float)));
        mha_rows[p] = (int32_t)(kvlayer_bytes_for(&mha, p + 1) / (2 * sizeof(float)));
    }
    free(held);
    kvlayer_free(&cache);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * writing JSON and base64 */

static void json_char(FILE *f, unsigned c) {
    if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
    else if (c == '\n') fputs("\\n", f);
    else if (c < 0x20 || c == '<' || c == '>' || c == '&' || c == 0x7f) fprintf(f, "\\u%04x", c);
    else fputc((int)c, f);
}

/* A JSON string of n bytes: valid UTF-8 is kept, a byte that is not part of any is written <0xNN> (as
 * SentencePiece names byte pieces), so a token holding half a character still shows what it is. */
static void json_bytes(FILE *f, const unsigned char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int len = utf8_decode(s + i, n - i, &cp);
        if (cp == 0xFFFD && len == 1) fprintf(f, "\\u003c0x%02X\\u003e", s[i]);
        else if (len == 1) json_char(f, s[i]);
        else fwrite(s + i, 1, (size_t)len, f);
        i += (size_t)len;
    }
    fputc('"', f);
}

static void json_string(FILE *f, const char *s) { json_bytes(f, (const unsigned char *)s, strlen(s)); }

typedef struct {
    FILE *f;
    unsigned char pending[3];
    int n;
} Base64;

static void base64_flush(Base64 *b) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if (!b->n) return;
    unsigned v = (unsigned)b->pending[0] << 16 | (unsigned)(b->n > 1 ? b->pending[1] : 0) << 8 | (b->n > 2 ? b->pending[2] : 0);
    char out[4] = {alphabet[v >> 18], alphabet[v >> 12 & 63], b->n > 1 ? alphabet[v >> 6 & 63] : '=', b->n > 2 ? alphabet[v & 63] : '='};
    fwrite(out, 1, 4, b->f);
    b->n = 0;
}

static void base64_bytes(Base64 *b, const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        b->pending[b->n++] = s[i];
        if (b->n == 3) base64_flush(b);
    }
}

static void base64_u32(Base64 *b, uint32_t v) {
    unsigned char le[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16), (unsigned char)(v >> 24)};
    base64_bytes(b, le, 4);
}

/* "name":"<base64 of n little-endian int32>" */
static void json_int32s(FILE *f, const char *name, const int32_t *v, size_t n) {
    Base64 b = {f, {0}, 0};
    fprintf(f, "\"%s\":\"", name);
    for (size_t i = 0; i < n; i++) base64_u32(&b, (uint32_t)v[i]);
    base64_flush(&b);
    fputs("\",\n", f);
}

/* ---------------------------------------------------------------------------------------------
 * gathering the page's data: what the lead adapts when layers gain kinds (one function per part) */

/* The tokens as they print (each on its own: the stream's state carries the dummy-prefix rule); a token
 * that prints nothing (BOS, control) shows its piece and is flagged special. Flags: 1 generated, 2 special. */
static void write_tokens(FILE *f, const Model *m, const ExploreRun *run) {
    const Tokenizer *t = &m->tokenizer;
    DecodeState d = {0, 0};
    fputs("\"tokens\":[", f);
    for (int i = 0; i < run->n_ids; i++) {
        int len = 0, id = run->ids[i], special = 0;
        char name[24];
        const unsigned char *s = (const unsigned char *)name;
        if (t->kind == TOKENIZER_NONE) {
            len = snprintf(name, sizeof name, "#%d", id);
        } else {
            s = tokenizer_decode(t, &d, id, &len);
            if (len == 0) s = t->piece[id], len = t->piece_len[id], special = 1;
        }
        fprintf(f, "%s[", i ? "," : "");
        json_bytes(f, s, (size_t)len);
        fprintf(f, ",%d,%d]", id, (i >= run->n_prompt) | special << 1);
    }
    fputs("],\n", f);
}

/* A layer as the page shows it: kind, properties, and for attention the numbers the diagram draws */
static void write_layer(FILE *f, const Model *m, const AttentionMap *map, int l) {
    const LayerConfig *lc = &m->config.layers[l];
    const AttentionSpec *a = &m->attention[l];
    static const char *masks[] = {"causal", "sliding", "strided", "fixed", "chunked"};
    LayerWiring w;
    layer_wiring(m, l, &w);
    KVLayer cache;
    layer_cache_init(&cache, m, l);
    int latent = lc->mixer == MIXER_LATENT_ATTENTION, heads = mixer_heads(lc);
    int kv_heads = latent ? 1 : lc->attn.n_kv_heads, head_dim = latent ? lc->mla.nope_dim + lc->mla.rope.dim : lc->attn.head_dim;
    size_t mha_row = latent ? (size_t)heads * (head_dim + lc->mla.v_dim) : 2 * (size_t)heads * head_dim;
    const char *layout = cache.summary_every ? "summaries" : kvlayer_capacity(&cache) ? "rolling buffer" : "paged";
    fprintf(f, "{\"index\":%d,\"kind\":", l);
    json_string(f, w.kind);
    fprintf(f, ",\"has_weights\":%d,\"recorded\":%d,\"overridden\":%d,\"in_file\":", w.has_attention_weights,
            layer_recorded(map, l), w.overridden);
    json_string(f, w.in_file);
    fputs(",\"props\":[", f);
    for (int i = 0; i < w.n_props; i++) {
        fprintf(f, "%s[", i ? "," : "");
        json_string(f, w.props[i].name);
        fputc(',', f);
        json_string(f, w.props[i].value);
        fputc(']', f);
    }
    fprintf(f, "],\"q_heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"mask\":{\"kind\":\"%s\",\"span\":%d,\"sinks\":%d},",
            heads, kv_heads, head_dim, masks[a->mask], a->span, a->n_sinks);
    fprintf(f, "\"cache\":{\"layout\":\"%s\",\"capacity\":%d,\"summary_every\":%d,\"block\":%d,\"row_bytes\":%zu,"
            "\"mha_row_bytes\":%zu}}",
            layout, kvlayer_capacity(&cache), cache.summary_every, KV_BLOCK_TOKENS,
            (size_t)(cache.kv_dim + cache.v_dim) * sizeof(float), mha_row * sizeof(float));
}

/* Per layer and position: the visible keys (RUN_INTS each), and the cache simulation */
static int write_positions(FILE *f, const Model *m, int T) {
    int L = m->config.n_layers;
    int32_t *runs = calloc((size_t)L * T * RUN_INTS, sizeof *runs), *cache = malloc((size_t)L * T * CACHE_ARRAYS * sizeof *cache);
    int rc = runs && cache ? 0 : -1;
    for (int l = 0; l < L && rc == 0; l++) {
        for (int q = 0; q < T; q++) {
            VisibleKeys v = visible_keys(&m->attention[l], q);
            int32_t *r = runs + ((size_t)l * T + q) * RUN_INTS;
            r[0] = v.n_runs;
            for (int k = 0; k < v.n_runs; k++) r[1 + 3 * k] = v.runs[k].first, r[2 + 3 * k] = v.runs[k].count, r[3 + 3 * k] = v.runs[k].step;
        }
        int32_t *c = cache + (size_t)l * T * CACHE_ARRAYS;
        rc = simulate_cache(&m->attention[l], T, c, c + T, c + 2 * (size_t)T, c + 3 * (size_t)T);
    }
    if (rc == 0) {
        json_int32s(f, "runs", runs, (size_t)L * T * RUN_INTS);
        json_int32s(f, "cache", cache, (size_t)L * T * CACHE_ARRAYS);
    }
    free(runs), free(cache);
    return rc;
}

static void write_weights(FILE *f, const PageWeights *p) {
    Base64 b = {f, {0}, 0};
    fprintf(f, "\"weights\":{\"threshold\":%g,\"lowest_threshold\":%g,\"n_rows\":%zu,\"scales\":\"", p->threshold,
            THRESHOLDS[0], p->n_rows);
    for (size_t i = 0; i < p->n_rows; i++) {
        uint32_t u;
        memcpy(&u, &p->scales[i], 4);
        base64_u32(&b, u);
    }
    base64_flush(&b);
    fputs("\",\n\"bitmap\":\"", f);
    base64_bytes(&b, p->bitmap, p->bitmap_len);
    base64_flush(&b);
    fputs("\",\n\"codes\":\"", f);
    base64_bytes(&b, p->codes, p->n_codes);
    base64_flush(&b);
    fputs("\"}\n", f);
}

/* The --info text, as ./run MODEL --info prints it for this run */
static int write_info(FILE *f, const Model *m, const char *model_path) {
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    if (!mem) return -1;
    print_wiring(m, model_path, mem);
    if (fclose(mem) != 0) return free(text), -1;
    fputs("\"info\":", f);
    json_string(f, text);
    fputs(",\n", f);
    free(text);
    return 0;
}

static int write_data(FILE *f, const Model *m, const AttentionMap *map, const ExploreRun *run, const PageWeights *p, int T) {
    const char *base = strrchr(run->model_path, '/') ? strrchr(run->model_path, '/') + 1 : run->model_path;
    fprintf(f, "{\"format\":1,\n\"model\":");
    json_string(f, base);
    fputs(",\n\"command\":", f);
    json_string(f, run->command);
    fprintf(f, ",\n\"n_positions\":%d,\"n_prompt\":%d,\"n_layers\":%d,\"block\":%d,\n", T, run->n_prompt,
            m->config.n_layers, KV_BLOCK_TOKENS);
    fprintf(f, "\"limits\":{\"max_positions\":%d,\"max_data_bytes\":%u},\n", EXPLORE_MAX_POSITIONS, EXPLORE_MAX_DATA_BYTES);
    if (write_info(f, m, run->model_path) != 0) return -1;
    write_tokens(f, m, run);
    fputs("\"layers\":[\n", f);
    for (int l = 0; l < m->config.n_layers; l++) {
        write_layer(f, m, map, l);
        fputs(l + 1 < m->config.n_layers ? ",\n" : "\n],\n", f);
    }
    if (write_positions(f, m, T) != 0) return -1;
    write_weights(f, p);
    fputs("}\n", f);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * the page */

int explore_write(const char *path, const Model *m, const AttentionMap *map, const ExploreRun *run, char *err,
                  size_t errlen) {
    int T = attention_map_positions(map);
    if (T == 0) return fail(err, errlen, "--explore: no position was run");
    PageWeights p;
    if (quantise_weights(m, map, T, &p, err, errlen) != 0) return -1;

    size_t n = strlen(path);
    char *tmp = malloc(n + 16);
    if (!tmp) return page_weights_free(&p), fail(err, errlen, "out of memory");
    snprintf(tmp, n + 16, "%s.tmp-XXXXXX", path);
    int fd = mkstemp(tmp);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        snprintf(err, errlen, "cannot write --explore '%s': %s", path, strerror(errno));
        if (fd >= 0) close(fd), unlink(tmp);
        return free(tmp), page_weights_free(&p), -1;
    }
    mode_t mask = umask(0);
    umask(mask);
    fchmod(fd, 0666 & ~mask); /* mkstemp makes 0600; give the page the usual permissions */
    int rc = 0;
    for (int i = 0; explore_page_lines[i] && rc == 0; i++)
        if (!strcmp(explore_page_lines[i], "@ATTN_DATA@\n")) rc = write_data(f, m, map, run, &p, T);
        else fputs(explore_page_lines[i], f);
    rc |= ferror(f) ? -1 : 0;
    rc |= fclose(f) != 0 ? -1 : 0;
    if (rc == 0 && rename(tmp, path) != 0) rc = -1;
    if (rc != 0) {
        snprintf(err, errlen, "cannot write --explore '%s': %s", path, errno ? strerror(errno) : "out of memory");
        unlink(tmp);
    }
    free(tmp);
    page_weights_free(&p);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * the command line, for the page's header */

/* An argument as the shell would need it: as is when it is plain, else in single quotes ('\'' inside) */
static size_t quote_argument(const char *a, char *out) {
    int plain = *a != '\0';
    for (const char *c = a; *c; c++) plain &= !!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=,:+@%", *c);
    size_t n = 0;
    if (plain) {
        n = strlen(a);
        if (out) memcpy(out, a, n);
        return n;
    }
    if (out) out[n] = '\'';
    n++;
    for (const char *c = a; *c; c++) {
        if (*c == '\'') {
            if (out) memcpy(out + n, "'\\''", 4);
            n += 4;
        } else {
            if (out) out[n] = *c;
            n++;
        }
    }
    if (out) out[n] = '\'';
    return n + 1;
}

char *explore_command_line(int argc, char **argv) {
    size_t n = 1;
    for (int i = 0; i < argc; i++) n += quote_argument(argv[i], NULL) + 1;
    char *s = malloc(n), *p = s;
    if (!s) return NULL;
    for (int i = 0; i < argc; i++) {
        if (i) *p++ = ' ';
        p += quote_argument(argv[i], p);
    }
    *p = '\0';
    return s;
}
