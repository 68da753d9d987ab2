/* study.c - looking at a model's attention: the wiring table (--info), experiments on the wiring
 * (--window, --sinks, --sparse, --attn), attention maps (--attn-map) and perplexity (--ppl). */
#include "study.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "png.h"

static int fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* ---------------------------------------------------------------------------------------------
 * overrides */

#define MAX_SPAN (1 << 24) /* windows, strides and blocks: as long as the longest context a file may declare */

/* A whole decimal number in lo .. hi, or -1 */
static long parse_count(const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    return errno || end == s || *end || v < lo || v > hi ? -1 : v;
}

/* Splits "L=V,L=V" / "all=V" / "V" (= all) into value_of[layer]: pointers into buf (a copy of list).
 * Later items win, so "all=16,2=0" means every layer but 2. */
static int split_layer_list(const char *opt, const char *list, int n_layers, char *buf, const char **value_of,
                            char *err, size_t errlen) {
    if (!*list) return fail(err, errlen, "%s needs L=V[,L=V...] or all=V", opt);
    strcpy(buf, list);
    for (char *item = strtok(buf, ","); item; item = strtok(NULL, ",")) {
        char *eq = strchr(item, '=');
        const char *value = eq ? eq + 1 : item;
        int first = 0, last = n_layers - 1;
        if (eq) {
            *eq = '\0';
            if (strcmp(item, "all") != 0) {
                long l = parse_count(item, 0, n_layers - 1);
                if (l < 0)
                    return fail(err, errlen, "%s: '%s' is not a layer (the model has %d layers: 0 .. %d, or all)", opt,
                                item, n_layers, n_layers - 1);
                first = last = (int)l;
            }
        }
        for (int l = first; l <= last; l++) value_of[l] = value;
    }
    return 0;
}

/* --window value: W >= 1 slides, 0 is full causal attention */
static int window_spec(AttentionSpec *a, const char *v, char *err, size_t errlen) {
    long w = parse_count(v, 0, MAX_SPAN);
    if (w < 0) return fail(err, errlen, "--window: '%s' is not a window size (0 .. %d; 0 = full attention)", v, MAX_SPAN);
    a->mask = w ? MASK_SLIDING : MASK_CAUSAL;
    a->span = (int)w;
    a->n_sinks = 0;
    return 0;
}

/* --sparse value: strided:S, fixed:B or chunked:C */
static int sparse_spec(AttentionSpec *a, const char *v, char *err, size_t errlen) {
    const char *colon = strchr(v, ':');
    long n = colon ? parse_count(colon + 1, 1, MAX_SPAN) : -1;
    if (n > 0 && (size_t)(colon - v) == 7 && !strncmp(v, "strided", 7)) a->mask = MASK_STRIDED;
    else if (n > 0 && (size_t)(colon - v) == 5 && !strncmp(v, "fixed", 5)) a->mask = MASK_FIXED;
    else if (n > 0 && (size_t)(colon - v) == 7 && !strncmp(v, "chunked", 7)) a->mask = MASK_CHUNKED;
    else
        return fail(err, errlen, "--sparse: '%s' is not a pattern (strided:S, fixed:B or chunked:C, each in 1 .. %d)", v,
                    MAX_SPAN);
    a->span = (int)n;
    a->n_sinks = 0;
    return 0;
}

int apply_attention_overrides(Model *m, const AttentionOverrides *o, char *err, size_t errlen) {
    int n_layers = m->config.n_layers;
    const char **window_of = calloc((size_t)n_layers, sizeof *window_of);
    const char **sparse_of = calloc((size_t)n_layers, sizeof *sparse_of);
    size_t buf_len = (o->window ? strlen(o->window) : 0) + (o->sparse ? strlen(o->sparse) : 0) + 2;
    char *buf = malloc(buf_len);
    int bad = !window_of || !sparse_of || !buf ? fail(err, errlen, "out of memory") : 0;
    if (!bad && o->window) bad = split_layer_list("--window", o->window, n_layers, buf, window_of, err, errlen);
    if (!bad && o->sparse)
        bad = split_layer_list("--sparse", o->sparse, n_layers, buf + strlen(o->window ? o->window : "") + 1, sparse_of,
                               err, errlen);
    for (int l = 0; l < n_layers && !bad; l++) { /* --sparse after --window: it wins where both name a layer */
        if (window_of[l]) bad = window_spec(&m->attention[l], window_of[l], err, errlen);
        if (!bad && sparse_of[l]) bad = sparse_spec(&m->attention[l], sparse_of[l], err, errlen);
    }
    free(window_of), free(sparse_of), free(buf);
    if (bad) return -1;

    if (o->n_sinks > 0) {
        int sliding = 0;
        for (int l = 0; l < n_layers; l++)
            if (m->attention[l].mask == MASK_SLIDING) m->attention[l].n_sinks = o->n_sinks, sliding++;
        if (!sliding) return fail(err, errlen, "--sinks: no layer slides (make some with --window L=W)");
    }
    KernelKind kernel = KERNEL_NAIVE;
    if (o->kernel && !strcmp(o->kernel, "flash")) kernel = KERNEL_FLASH;
    else if (o->kernel && strcmp(o->kernel, "naive") != 0)
        return fail(err, errlen, "--attn: '%s' is not a kernel (naive or flash)", o->kernel);
    for (int l = 0; l < n_layers; l++) m->attention[l].kernel = kernel;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * --info: the wiring table */

/* 1234567 -> "1,234,567" */
static const char *grouped(long long v, char *buf) {
    char digits[32];
    int n = snprintf(digits, sizeof digits, "%lld", v), o = 0;
    for (int i = 0; i < n; i++) {
        if (i > 0 && (n - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = digits[i];
    }
    buf[o] = '\0';
    return buf;
}

static const char *human_bytes(double b, char *buf) {
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024.0 && u < 4) b /= 1024.0, u++;
    sprintf(buf, u ? "%.1f %s" : "%.0f %s", b, unit[u]);
    return buf;
}

/* "full", "sliding 64", "sliding 16 + 4 sinks", "strided 8", "fixed 16", "chunked 16" */
static const char *mask_name(const AttentionSpec *a, char *buf) {
    switch (a->mask) {
    case MASK_SLIDING:
        if (a->n_sinks) sprintf(buf, "sliding %d + %d sinks", a->span, a->n_sinks);
        else sprintf(buf, "sliding %d", a->span);
        break;
    case MASK_STRIDED: sprintf(buf, "strided %d", a->span); break;
    case MASK_FIXED: sprintf(buf, "fixed %d", a->span); break;
    case MASK_CHUNKED: sprintf(buf, "chunked %d", a->span); break;
    default: strcpy(buf, "full");
    }
    return buf;
}

/* What the layer's cache keeps as the sequence grows */
static const char *keeps(const AttentionSpec *a, char *buf) {
    switch (a->mask) {
    case MASK_SLIDING: sprintf(buf, "last %d%s", a->span, a->n_sinks ? " + sinks" : ""); break;
    case MASK_FIXED: sprintf(buf, "block + 1/%d", a->span); break;
    case MASK_CHUNKED: sprintf(buf, "its chunk of %d", a->span); break;
    default: strcpy(buf, "every position");
    }
    return buf;
}

/* MHA, GQA-G (G = number of kv heads, i.e. of groups, as in Ainslie et al. 2023), MQA */
static const char *sharing_name(int n_heads, int n_kv_heads, char *buf) {
    if (n_kv_heads == n_heads) strcpy(buf, "MHA");
    else if (n_kv_heads == 1) strcpy(buf, "MQA");
    else sprintf(buf, "GQA-%d", n_kv_heads);
    return buf;
}

static void extras_of(const Model *m, int l, char *buf) {
    const AttentionConfig *a = &m->config.layers[l].attn;
    unsigned layer_flags = m->config.layers[l].flags;
    buf[0] = '\0';
    if (a->flags & ATTN_QK_NORM) strcat(buf, "q/k-norm ");
    if (a->flags & ATTN_QK_NORM_FULL) strcat(buf, "q/k-norm(whole) ");
    if (a->flags & ATTN_QK_NORM_PLAIN) strcat(buf, "q/k-norm(no weights) ");
    if (a->flags & ATTN_SINKS) strcat(buf, "learned-sinks ");
    if (a->softcap > 0) sprintf(buf + strlen(buf), "soft-cap %g ", a->softcap);
    if (a->flags & ATTN_QKV_BIAS) strcat(buf, "qkv-bias ");
    if (layer_flags & (LAYER_MIXER_POST_NORM | LAYER_FFN_POST_NORM))
        strcat(buf, layer_flags & (LAYER_MIXER_NORM | LAYER_FFN_NORM) ? "post-norms " : "post-norms-only ");
    if (m->config.position_kind == POS_ROPE && a->rope.dim == 0) strcat(buf, "NoPE ");
    if (a->rope.dim > 0 && a->rope.dim < a->head_dim) sprintf(buf + strlen(buf), "rope %d/%d dims ", a->rope.dim, a->head_dim);
    if (a->rope.table >= 0) strcat(buf, "rope-table ");
    if (a->rope.dim > 0 && a->rope.attn_factor != 1.0f) sprintf(buf + strlen(buf), "rope x%.3g ", a->rope.attn_factor);
    if (a->temperature_floor > 0) strcat(buf, "temperature ");
    size_t n = strlen(buf);
    if (n) buf[n - 1] = '\0';
    else strcpy(buf, "-");
}

/* "gated SiLU 1024", "plain GELU 3072", "MoE 2 of 8 x 32 (softmax) + shared 128", "-" */
static const char *ffn_name(const LayerConfig *l, char *buf) {
    static const char *acts[ACTIVATION_COUNT] = {"SiLU", "GELU(tanh)", "GELU", "SwiGLU(clamped)"};
    static const char *routers[ROUTER_KIND_COUNT] = {"softmax", "top-k softmax", "sigmoid"};
    const FfnConfig *f = &l->ffn;
    switch (l->ffn_kind) {
    case FFN_GATED: sprintf(buf, "gated %s %d", acts[f->activation], f->hidden); break;
    case FFN_PLAIN: sprintf(buf, "plain %s %d", acts[f->activation], f->hidden); break;
    case FFN_MOE: {
        int n = sprintf(buf, "MoE %d of %d x %d (%s", f->top_k, f->n_experts, f->hidden, routers[f->router]);
        if (f->n_groups > 1) n += sprintf(buf + n, ", %d of %d groups", f->topk_groups, f->n_groups);
        n += sprintf(buf + n, ")");
        if (f->flags & MOE_SHARED) sprintf(buf + n, " + shared %d%s", f->shared_hidden, f->flags & MOE_SHARED_GATE ? " gated" : "");
        break;
    }
    default: strcpy(buf, "-");
    }
    return buf;
}

static int is_overridden(const Model *m, int l) {
    const AttentionSpec *a = &m->attention[l], own = attention_of_layer(m, l);
    return a->mask != own.mask || a->span != own.span || a->n_sinks != own.n_sinks;
}

void print_wiring(const Model *m, const char *path, FILE *out) {
    const Config *c = &m->config;
    char b1[64], b2[64], b3[64], b4[96];
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    long long total, active;
    model_parameters(m, &total, &active);
    fprintf(out, "%s: %s, %s parameters", base, c->family, grouped(total, b1));
    if (active != total) fprintf(out, " (%s active per token)", grouped(active, b1));
    fprintf(out, ", vocab %d, %s weights, file %s\n", c->vocab_size, dtype_name(m->weight_dtype),
            human_bytes((double)m->file_size, b2));
    fprintf(out, "dim %d, %d layers, context %d, %s positions, %s%s\n", c->dim, c->n_layers, c->context_length,
            c->position_kind == POS_ROPE ? "rotary" : "learned", c->norm_kind == NORM_RMS ? "RMSNorm" : "LayerNorm",
            c->flags & MODEL_TIED_EMBEDDINGS ? ", tied embeddings" : "");
    if (c->embed_scale != 1.0f || c->residual_scale != 1.0f || c->logit_scale != 1.0f || c->final_softcap > 0)
        fprintf(out, "embeddings x%g, block outputs x%g, logits x%g%s\n", c->embed_scale, c->residual_scale,
                c->logit_scale, c->final_softcap > 0 ? ", logits soft-capped" : "");
    fprintf(out, "attention kernel: %s\n\n", m->attention[0].kernel == KERNEL_FLASH ? "flash" : "naive");

    fprintf(out, "%5s  %-22s %3s %3s  %-10s %8s  %9s  %-22s %8s  %-15s %s\n", "layer", "attention", "q", "kv", "group",
            "head_dim", "rope base", "extras", "KV/token", "keeps", "FFN");
    int overridden = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        const AttentionConfig *at = &lc->attn;
        const AttentionSpec *a = &m->attention[l];
        char kind[48], group[24], rope_base[24], extras[160], ffn[96];
        int changed = is_overridden(m, l);
        snprintf(kind, sizeof kind, "%s%s", mask_name(a, b1), changed ? " *" : "");
        overridden |= changed;
        snprintf(group, sizeof group, "%d (%s)", at->n_heads / at->n_kv_heads, sharing_name(at->n_heads, at->n_kv_heads, b2));
        if (at->rope.dim > 0) snprintf(rope_base, sizeof rope_base, "%g", at->rope.theta);
        else strcpy(rope_base, "-");
        extras_of(m, l, extras);
        fprintf(out, "%5d  %-22s %3d %3d  %-10s %8d  %9s  %-22s %6d B  %-15s %s\n", l, kind, at->n_heads, at->n_kv_heads,
                group, at->head_dim, rope_base, extras, (int)(2 * at->n_kv_heads * at->head_dim * sizeof(float)),
                keeps(a, b3), ffn_name(lc, ffn));
    }
    if (overridden) {
        fprintf(out, "* set on the command line; in the file");
        for (int l = 0, first = 1; l < c->n_layers; l++)
            if (is_overridden(m, l)) {
                const AttentionConfig *at = &c->layers[l].attn;
                if (at->window) fprintf(out, "%s layer %d slides %d", first ? "" : ",", l, at->window);
                else if (at->chunk) fprintf(out, "%s layer %d is chunked %d", first ? "" : ",", l, at->chunk);
                else fprintf(out, "%s layer %d is full", first ? "" : ",", l);
                first = 0;
            }
        fprintf(out, "\n");
    }

    /* the cache as kvcache.c would lay it out, and the same model as plain MHA with full attention */
    fprintf(out, "\nKV cache (float32 keys + values, blocks of %d positions; %d-token context):\n", KV_BLOCK_TOKENS,
            c->context_length);
    fprintf(out, "%7s  %28s  %32s  %6s\n", "tokens", "as wired", "MHA + full attention everywhere", "ratio");
    const long lengths[] = {1024, 8192, 32768, 131072};
    for (int i = 0; i < 4; i++) {
        size_t wired = 0, plain = 0;
        for (int l = 0; l < c->n_layers; l++) {
            const AttentionConfig *at = &c->layers[l].attn;
            KVLayer cache, mha;
            attention_cache_init(&cache, at->n_kv_heads * at->head_dim, &m->attention[l]);
            kvlayer_init(&mha, at->n_heads * at->head_dim, 0, 0);
            wired += kvlayer_bytes_for(&cache, lengths[i]);
            plain += kvlayer_bytes_for(&mha, lengths[i]);
        }
        snprintf(b4, sizeof b4, "%s B (%s)", grouped((long long)wired, b1), human_bytes((double)wired, b2));
        char plain_text[96];
        snprintf(plain_text, sizeof plain_text, "%s B (%s)", grouped((long long)plain, b1), human_bytes((double)plain, b3));
        fprintf(out, "%6ldk  %28s  %32s  %5.1f%%\n", lengths[i] / 1024, b4, plain_text, 100.0 * (double)wired / (double)plain);
    }
}

static void add_property(LayerWiring *w, const char *name, const char *fmt, ...) {
    if (w->n_props == WIRING_MAX_PROPS) return;
    va_list ap;
    va_start(ap, fmt);
    snprintf(w->props[w->n_props].name, sizeof w->props[0].name, "%s", name);
    vsnprintf(w->props[w->n_props].value, sizeof w->props[0].value, fmt, ap);
    va_end(ap);
    w->n_props++;
}

/* The columns of print_wiring's row, as properties */
void layer_wiring(const Model *m, int l, LayerWiring *w) {
    const AttentionConfig *lc = &m->config.layers[l].attn;
    const AttentionSpec *a = &m->attention[l], own = attention_of_layer(m, l);
    char b[160];
    memset(w, 0, sizeof *w);
    w->kind = "attention";
    w->has_attention_weights = 1;
    w->overridden = is_overridden(m, l);
    if (w->overridden) mask_name(&own, w->in_file);
    add_property(w, "mask", "%s", mask_name(a, b));
    add_property(w, "q heads", "%d", lc->n_heads);
    add_property(w, "kv heads", "%d", lc->n_kv_heads);
    add_property(w, "group", "%d (%s)", lc->n_heads / lc->n_kv_heads, sharing_name(lc->n_heads, lc->n_kv_heads, b));
    add_property(w, "head_dim", "%d", lc->head_dim);
    if (lc->rope.dim > 0) add_property(w, "rope base", "%g", lc->rope.theta);
    else add_property(w, "rope base", "%s", m->config.position_kind == POS_ROPE ? "- (NoPE)" : "- (learned positions)");
    extras_of(m, l, b);
    add_property(w, "extras", "%s", b);
    add_property(w, "KV/token", "%d B", (int)(2 * lc->n_kv_heads * lc->head_dim * sizeof(float)));
    add_property(w, "keeps", "%s", keeps(a, b));
    add_property(w, "FFN", "%s", ffn_name(&m->config.layers[l], b));
}

/* ---------------------------------------------------------------------------------------------
 * attention maps */

struct AttentionMap {
    const Model *model;
    int n_positions;     /* capacity: positions 0 .. n_positions-1 */
    int positions_seen;  /* 1 + the last position recorded */
    int n_recorded;      /* 0 .. n_layers */
    int *layers;         /* [n_recorded] the layers recorded, in order */
    int *index_of_layer; /* [n_layers] index into layers / weights, -1 if not recorded */
    float **weights;     /* [n_recorded] -> [n_heads][n_positions][n_positions] */
};

#define MAP_MAX_BYTES (512u << 20) /* recorded weights */
#define MAP_MAX_PIXELS (64u << 20)

void attention_map_free(AttentionMap *map) {
    if (!map) return;
    for (int i = 0; map->weights && i < map->n_recorded; i++) free(map->weights[i]);
    free(map->weights), free(map->layers), free(map->index_of_layer), free(map);
}

AttentionMap *attention_map_new(const Model *m, const char *layers, int n_positions, char *err, size_t errlen) {
    int n_layers = m->config.n_layers;
    AttentionMap *map = calloc(1, sizeof *map);
    if (!map || !(map->layers = malloc((size_t)n_layers * sizeof(int))) ||
        !(map->index_of_layer = malloc((size_t)n_layers * sizeof(int))))
        return attention_map_free(map), fail(err, errlen, "out of memory"), NULL;
    map->model = m;
    map->n_positions = n_positions;
    for (int l = 0; l < n_layers; l++) map->index_of_layer[l] = -1;
    if (!layers) {
        for (int l = 0; l < n_layers; l++) map->index_of_layer[l] = map->n_recorded, map->layers[map->n_recorded++] = l;
    } else {
        const char *p = layers;
        while (*p) {
            char *end;
            errno = 0;
            long l = strtol(p, &end, 10);
            if (end == p || errno || (*end && *end != ',') || l < 0 || l >= n_layers) {
                fail(err, errlen, "--attn-map-layer: '%s' is not a list of layers (0 .. %d)", layers, n_layers - 1);
                return attention_map_free(map), NULL;
            }
            if (map->index_of_layer[l] < 0) map->index_of_layer[l] = map->n_recorded, map->layers[map->n_recorded++] = (int)l;
            p = *end ? end + 1 : end;
        }
        if (map->n_recorded == 0) return fail(err, errlen, "--attn-map-layer: no layer given"), attention_map_free(map), NULL;
    }
    double bytes = 0;
    for (int i = 0; i < map->n_recorded; i++)
        bytes += (double)m->config.layers[map->layers[i]].attn.n_heads * n_positions * n_positions * sizeof(float);
    if (bytes > MAP_MAX_BYTES) {
        fail(err, errlen, "--attn-map: %d positions x %d layers would need %.0f MiB; use --attn-map-layer, a shorter "
             "prompt or a smaller -n", n_positions, map->n_recorded, bytes / (1 << 20));
        return attention_map_free(map), NULL;
    }
    if (!(map->weights = calloc((size_t)n_layers, sizeof *map->weights)))
        return fail(err, errlen, "out of memory"), attention_map_free(map), NULL;
    for (int i = 0; i < map->n_recorded; i++) {
        size_t n = (size_t)m->config.layers[map->layers[i]].attn.n_heads * n_positions * n_positions;
        if (!(map->weights[i] = calloc(n, sizeof(float))))
            return fail(err, errlen, "out of memory"), attention_map_free(map), NULL;
    }
    return map;
}

void attention_map_record(void *ctx, int layer, int pos, const float *weights, int weights_stride) {
    AttentionMap *map = ctx;
    int i = map->index_of_layer[layer], T = map->n_positions;
    if (i < 0 || pos >= T) return;
    int n_heads = map->model->config.layers[layer].attn.n_heads;
    for (int h = 0; h < n_heads; h++)
        weights_by_position(map->weights[i] + ((size_t)h * T + pos) * T, weights + (size_t)h * weights_stride,
                            &map->model->attention[layer], pos);
    if (pos + 1 > map->positions_seen) map->positions_seen = pos + 1;
}

int attention_map_positions(const AttentionMap *map) { return map->positions_seen; }

const float *attention_map_row(const AttentionMap *map, int layer, int head, int query) {
    int i = map->index_of_layer[layer], T = map->n_positions;
    return i < 0 ? NULL : map->weights[i] + ((size_t)head * T + query) * T;
}

int attention_map_write_raw(const AttentionMap *map, const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int T = map->n_positions, seen = map->positions_seen, bad = 0;
    for (int i = 0; i < map->n_recorded; i++)
        for (int h = 0; h < map->model->config.layers[map->layers[i]].attn.n_heads; h++)
            for (int q = 0; q < seen; q++)
                bad |= fwrite(map->weights[i] + ((size_t)h * T + q) * T, sizeof(float), (size_t)seen, f) != (size_t)seen;
    return fclose(f) != 0 || bad ? -1 : 0;
}

/* palette: 0 background, 1 masked (grey), 2 text, 3 .. 255 a viridis-like scale from dark purple to yellow */
enum { COLOR_BACKGROUND = 0, COLOR_MASKED = 1, COLOR_TEXT = 2, COLOR_SCALE = 3, N_COLORS = 256 };

static void make_palette(unsigned char (*pal)[3]) {
    static const unsigned char anchors[5][3] = {{68, 1, 84}, {59, 82, 139}, {33, 145, 140}, {94, 201, 98}, {253, 231, 37}};
    memset(pal, 0, N_COLORS * 3);
    pal[COLOR_BACKGROUND][0] = pal[COLOR_BACKGROUND][1] = pal[COLOR_BACKGROUND][2] = 255;
    pal[COLOR_MASKED][0] = pal[COLOR_MASKED][1] = pal[COLOR_MASKED][2] = 200;
    for (int i = COLOR_SCALE; i < N_COLORS; i++) {
        double t = (double)(i - COLOR_SCALE) / (N_COLORS - 1 - COLOR_SCALE) * 4.0;
        int k = t >= 4.0 ? 3 : (int)t;
        double f = t - k;
        for (int ch = 0; ch < 3; ch++) pal[i][ch] = (unsigned char)lround(anchors[k][ch] * (1 - f) + anchors[k + 1][ch] * f);
    }
}

/* Weights span decades: colour by t = (log10(w) + 4) / 4, from 1e-4 (dark, t = 0) to 1 (bright, t = 1) */
static unsigned char color_of_fraction(double t) {
    return (unsigned char)(COLOR_SCALE + lround((t < 0 ? 0 : t > 1 ? 1 : t) * (N_COLORS - 1 - COLOR_SCALE)));
}
static unsigned char color_of_weight(float w) { return color_of_fraction((log10(w > 1e-4f ? w : 1e-4f) + 4.0) / 4.0); }

/* Where things go. One row of panels per layer, one panel per head (a single layer's heads in a grid of
 * floor(sqrt(heads)) rows, drawn larger); above each row a line naming its layer and heads; a prompt of up to
 * MAX_LABELLED tokens gets each token written beside its row (queries, left) and above its column (keys);
 * the colour bar is on the right. Panels are T cells of cell x cell pixels, GAP pixels apart. */
#define GAP 3
#define MAX_LABELLED 64
#define LABEL_CHARS 8                  /* token labels are cut to this many characters */
#define LABEL_CELL (FONT_HEIGHT + 1)   /* labelled cells are at least this tall */
#define TITLE (FONT_HEIGHT + 3)        /* the line above each row of panels */
#define BAR_WIDTH 12
#define BAR_AREA (BAR_WIDTH + 3 + 4 * FONT_ADVANCE) /* the bar and its labels ("1e-4") */

typedef struct {
    int columns, rows, cell, panel, labelled;
    int left, top;  /* the first panel's title line */
    long width, height;
    int bar_x, bar_y, bar_h;
} MapLayout;

static MapLayout map_layout(const AttentionMap *map, int T) {
    MapLayout g = {0};
    for (int i = 0; i < map->n_recorded; i++)
        if (map->model->config.layers[map->layers[i]].attn.n_heads > g.columns) g.columns = map->model->config.layers[map->layers[i]].attn.n_heads;
    int target = 128, rows_per_layer = 1; /* pixels per panel, never less than one per cell */
    if (map->n_recorded == 1) {
        rows_per_layer = (int)sqrt((double)g.columns);
        g.columns = (g.columns + rows_per_layer - 1) / rows_per_layer;
        target = 384;
    }
    for (int i = 0; i < map->n_recorded; i++)
        g.rows += (map->model->config.layers[map->layers[i]].attn.n_heads + g.columns - 1) / g.columns;
    g.cell = T < target ? target / T : 1;
    g.labelled = T <= MAX_LABELLED;
    if (g.labelled && g.cell < LABEL_CELL) g.cell = LABEL_CELL;
    g.panel = T * g.cell;
    int label_room = g.labelled ? LABEL_CHARS * FONT_ADVANCE + GAP : 0;
    g.left = GAP + label_room, g.top = GAP + label_room;
    long grid_w = (long)g.columns * g.panel + (long)(g.columns - 1) * GAP;
    long grid_h = (long)g.rows * (TITLE + g.panel) + (long)(g.rows - 1) * GAP;
    g.bar_x = (int)(g.left + grid_w + 3 * GAP), g.bar_y = g.top + TITLE;
    g.bar_h = grid_h - TITLE < 64 ? 64 : grid_h - TITLE > N_COLORS - COLOR_SCALE ? N_COLORS - COLOR_SCALE : (int)(grid_h - TITLE);
    g.width = g.bar_x + BAR_AREA + GAP;
    g.height = g.top + grid_h + GAP;
    long bar_bottom = g.bar_y + g.bar_h + 2 * TITLE + GAP; /* the bar, then the masked swatch */
    if (bar_bottom > g.height) g.height = bar_bottom;
    return g;
}

/* A token as a label: printable ASCII, a space as '_', a line break as '/', other characters as '?' */
static void token_label(const Tokenizer *tok, const int *ids, int n_ids, int pos, char *out) {
    if (pos >= n_ids || !tok || tok->kind == TOKENIZER_NONE) {
        snprintf(out, LABEL_CHARS + 1, "%d", pos < n_ids ? ids[pos] : pos);
        return;
    }
    DecodeState d = {1, 0}; /* as text inside the prompt: no leading space dropped */
    int len, k = 0;
    const unsigned char *b = tokenizer_decode(tok, &d, ids[pos], &len);
    for (int i = 0; i < len && k < LABEL_CHARS; i++) {
        unsigned char c = b[i];
        if ((c & 0xC0) == 0x80) continue; /* one '?' per character, not per byte */
        out[k++] = c == ' ' ? '_' : c == '\n' ? '/' : c >= 32 && c < 127 ? (char)c : '?';
    }
    out[k] = '\0';
}

/* "layer 3 head 5", or shorter where the panel is narrow */
static void panel_title(int layer, int head, int room, char *out, size_t size) {
    snprintf(out, size, "layer %d head %d", layer, head);
    if ((int)strlen(out) * FONT_ADVANCE > room) snprintf(out, size, "L%d H%d", layer, head);
    if ((int)strlen(out) * FONT_ADVANCE > room) snprintf(out, size, "%d", head);
}

/* The scale: 1 at the top to 1e-4 at the bottom, a label each decade, and the grey of a masked key below */
static void draw_color_bar(unsigned char *pixels, const MapLayout *g) {
    static const char *const decades[5] = {"1", "0.1", "0.01", "1e-3", "1e-4"};
    long w = g->width;
    draw_text(pixels, (int)w, (int)g->height, g->bar_x, g->top + 1, "weight", COLOR_TEXT, 0);
    for (int y = 0; y < g->bar_h; y++)
        memset(pixels + (size_t)(g->bar_y + y) * w + g->bar_x, color_of_fraction(1.0 - (double)y / (g->bar_h - 1)), BAR_WIDTH);
    for (int d = 0; d < 5; d++) {
        int y = g->bar_y + (int)lround(d / 4.0 * (g->bar_h - 1));
        memset(pixels + (size_t)y * w + g->bar_x + BAR_WIDTH, COLOR_TEXT, 2);
        draw_text(pixels, (int)w, (int)g->height, g->bar_x + BAR_WIDTH + 3, y - FONT_HEIGHT / 2, decades[d], COLOR_TEXT, 0);
    }
    int swatch = g->bar_y + g->bar_h + TITLE;
    for (int y = 0; y < FONT_HEIGHT; y++) memset(pixels + (size_t)(swatch + y) * w + g->bar_x, COLOR_MASKED, BAR_WIDTH);
    draw_text(pixels, (int)w, (int)g->height, g->bar_x + BAR_WIDTH + 3, swatch, "mask", COLOR_TEXT, 0);
}

/* One head's panel at (x0, y0): row i is query i, column j key j */
static void draw_panel(unsigned char *pixels, long width, const AttentionMap *map, int r, int h, long x0, long y0,
                       int cell, int T) {
    int layer = map->layers[r], N = map->n_positions;
    const AttentionSpec *a = &map->model->attention[layer];
    for (int i = 0; i < T; i++) {
        VisibleKeys v = visible_keys(a, i); /* the keys query i sees in this layer */
        unsigned char *row = pixels + (size_t)(y0 + (long)i * cell) * width + x0;
        memset(row, COLOR_MASKED, (size_t)T * cell);
        FOR_EACH_VISIBLE_KEY(v, j)
            if (j < T) memset(row + (size_t)j * cell, color_of_weight(map->weights[r][((size_t)h * N + i) * N + j]), (size_t)cell);
        for (int dy = 1; dy < cell; dy++) memcpy(row + (size_t)dy * width, row, (size_t)T * cell);
    }
}

int attention_map_check_png(const AttentionMap *map, char *err, size_t errlen) {
    /* a run that stops early has fewer positions, and cells as large as target / T (or labelled ones): the
     * largest picture is the one of all positions or of the most that are labelled */
    int T = map->n_positions, labelled = T < MAX_LABELLED ? T : MAX_LABELLED;
    MapLayout all = map_layout(map, T), most = map_layout(map, labelled);
    MapLayout g = (double)all.width * all.height >= (double)most.width * most.height ? all : most;
    if ((double)g.width * g.height <= MAP_MAX_PIXELS) return 0;
    return fail(err, errlen, "--attn-map: %d positions x %d layers would make a picture of %ld x %ld pixels (at most "
                "%u in all); use --attn-map-layer, a shorter prompt or a smaller -n", T, map->n_recorded, g.width,
                g.height, MAP_MAX_PIXELS);
}

int attention_map_write_png(const AttentionMap *map, const char *path, const Tokenizer *tok, const int *ids, int n_ids) {
    int T = map->positions_seen;
    MapLayout g = map_layout(map, T);
    if (T == 0 || (double)g.width * g.height > MAP_MAX_PIXELS) {
        errno = T == 0 ? EINVAL : EFBIG;
        return -1;
    }
    size_t comment_size = 128 + (size_t)g.rows * g.columns * 64;
    unsigned char *pixels = malloc((size_t)g.width * g.height), palette[N_COLORS][3];
    char *comment = malloc(comment_size), label[LABEL_CHARS + 1], title[48];
    if (!pixels || !comment) {
        free(pixels), free(comment);
        return -1;
    }
    memset(pixels, COLOR_BACKGROUND, (size_t)g.width * g.height);
    make_palette(palette);
    /* the layout, for programs that read the image: one line per panel */
    size_t used = (size_t)snprintf(comment, comment_size, "attn.c attention map: %d positions, cells of %d px\n", T, g.cell);
    int W = (int)g.width, H = (int)g.height;
    for (int r = 0, row = 0; r < map->n_recorded; r++) {
        int layer = map->layers[r], heads = map->model->config.layers[layer].attn.n_heads;
        for (int h = 0; h < heads; h++, row += (h % g.columns == 0 || h == heads)) {
            long x0 = g.left + (long)(h % g.columns) * (g.panel + GAP);
            long y0 = g.top + (long)row * (TITLE + g.panel + GAP) + TITLE;
            draw_panel(pixels, g.width, map, r, h, x0, y0, g.cell, T);
            panel_title(layer, h, g.panel + GAP, title, sizeof title);
            draw_text(pixels, W, H, (int)x0, (int)y0 - TITLE + 1, title, COLOR_TEXT, 0);
            for (int i = 0; g.labelled && i < T; i++) {
                token_label(tok, ids, n_ids, i, label);
                if (h % g.columns == 0) /* queries beside the first panel of a row, keys above the first row */
                    draw_text(pixels, W, H, GAP, (int)y0 + i * g.cell + (g.cell - FONT_HEIGHT) / 2, label, COLOR_TEXT, 0);
                if (row == 0)
                    draw_text(pixels, W, H, (int)x0 + i * g.cell + (g.cell - FONT_HEIGHT) / 2, g.top - GAP - 1, label, COLOR_TEXT, 1);
            }
            used += (size_t)snprintf(comment + used, comment_size - used, "panel layer %d head %d x %ld y %ld\n", layer, h, x0, y0);
        }
    }
    draw_color_bar(pixels, &g);
    int rc = png_write_indexed(path, W, H, pixels, (const unsigned char(*)[3])palette, N_COLORS, comment);
    free(pixels), free(comment);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * perplexity */

/* -log softmax(logits)[target] = log sum_i e^(l_i - max) + max - l_target, in double so that the sum over
 * a long text does not drift */
double token_nll(const float *logits, int vocab_size, int target) {
    double max = logits[0], sum = 0.0;
    for (int i = 1; i < vocab_size; i++)
        if (logits[i] > max) max = logits[i];
    for (int i = 0; i < vocab_size; i++) sum += exp((double)logits[i] - max);
    return log(sum) + max - (double)logits[target];
}
