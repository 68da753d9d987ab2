/* study.c - looking at a model's attention: the wiring table (--info), experiments on the wiring
 * (--window, --sinks, --sparse, --attn), attention maps (--attn-map) and perplexity (--ppl). */
#include "study.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "png.h"
#include "recurrent.h"

#define fail error_line /* model.h */

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
 * Later items win, so "all=16,2=0" means every layer but 2. Only attention layers have a mask to change:
 * "all" means every attention layer, and naming a recurrent layer is an error. */
static int split_layer_list(const char *opt, const char *list, const Config *c, char *buf, const char **value_of,
                            char *err, size_t errlen) {
    int n_layers = c->n_layers, attention_layers = 0;
    for (int l = 0; l < n_layers; l++) attention_layers += !is_recurrent(&c->layers[l]);
    if (!*list) return fail(err, errlen, "%s needs L=V[,L=V...] or all=V", opt);
    if (!attention_layers)
        return fail(err, errlen, "%s: no layer of this model has attention (every layer is %s)", opt,
                    mixer_name(c->layers[0].mixer));
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
                if (is_recurrent(&c->layers[l]))
                    return fail(err, errlen, "%s: layer %ld is a %s layer: it has no attention", opt, l,
                                mixer_name(c->layers[l].mixer));
                first = last = (int)l;
            }
        }
        for (int l = first; l <= last; l++)
            if (!is_recurrent(&c->layers[l])) value_of[l] = value;
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
    if (!bad && o->window) bad = split_layer_list("--window", o->window, &m->config, buf, window_of, err, errlen);
    if (!bad && o->sparse)
        bad = split_layer_list("--sparse", o->sparse, &m->config, buf + strlen(o->window ? o->window : "") + 1, sparse_of,
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
    LatentKernel form = LATENT_AUTO;
    if (o->latent && !strcmp(o->latent, "absorbed")) form = LATENT_ABSORBED;
    else if (o->latent && !strcmp(o->latent, "expanded")) form = LATENT_EXPANDED;
    else if (o->latent && strcmp(o->latent, "auto") != 0)
        return fail(err, errlen, "--mla: '%s' is not a form of latent attention (auto, absorbed or expanded)", o->latent);
    int latent = 0;
    for (int l = 0; l < n_layers; l++)
        if (m->config.layers[l].mixer == MIXER_LATENT_ATTENTION) m->attention[l].latent_kernel = form, latent = 1;
    if (o->latent && !latent) return fail(err, errlen, "--mla: the model has no latent attention layer");
    KVType kv_type = KV_F32;
    if (o->kv_type && kv_type_parse(o->kv_type, &kv_type) != 0)
        return fail(err, errlen, "--kv-type: '%s' is not a KV cache type (f32, bf16 or q8_0)", o->kv_type);
    for (int l = 0; l < n_layers; l++) m->attention[l].kv_type = kv_type; /* latent layers keep f32 (attention_cache_init) */
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

/* The bytes one position costs in a latent layer, and over the same heads with MHA (a key of nope + rope and a
 * value of v_dim per head) */
static size_t latent_bytes(const LatentAttentionConfig *a) { return (size_t)(a->kv_rank + a->rope.dim) * sizeof(float); }
static size_t latent_mha_bytes(const LatentAttentionConfig *a) {
    return (size_t)a->n_heads * (a->nope_dim + a->rope.dim + a->v_dim) * sizeof(float);
}

/* Norms after the blocks: "post-norms" (Gemma 2/3: also before), "post-norms-only" (OLMo 3, EXAONE 4) */
static void post_norm_extras(unsigned layer_flags, char *buf) {
    if (layer_flags & (LAYER_MIXER_POST_NORM | LAYER_FFN_POST_NORM))
        strcat(buf, layer_flags & (LAYER_MIXER_NORM | LAYER_FFN_NORM) ? "post-norms " : "post-norms-only ");
}

/* Latent attention: "latent 512 + rope 64 (1/71.1 of MHA) q-rank 1536" and the rope settings */
static void latent_extras(const Model *m, int l, char *buf) {
    const LatentAttentionConfig *a = &m->config.layers[l].mla;
    sprintf(buf, "latent %d + rope %d (1/%.1f of MHA) ", a->kv_rank, a->rope.dim,
            (double)latent_mha_bytes(a) / (double)latent_bytes(a));
    if (a->q_rank) sprintf(buf + strlen(buf), "q-rank %d ", a->q_rank);
    if (a->rope.table >= 0) strcat(buf, "rope-table ");
    if (a->rope.dim > 0 && a->rope.attn_factor != 1.0f) sprintf(buf + strlen(buf), "rope x%.3g ", a->rope.attn_factor);
    post_norm_extras(m->config.layers[l].flags, buf);
}

/* Softmax attention: q/k norms, sinks, soft-cap, biases, post-norms, partial or no rotary positions */
static void attention_extras(const Model *m, int l, char *buf) {
    const AttentionConfig *a = &m->config.layers[l].attn;
    if (a->flags & ATTN_QK_NORM) strcat(buf, "q/k-norm ");
    if (a->flags & ATTN_QK_NORM_FULL) strcat(buf, "q/k-norm(whole) ");
    if (a->flags & ATTN_QK_NORM_PLAIN) strcat(buf, "q/k-norm(no weights) ");
    if (a->flags & ATTN_SINKS) strcat(buf, "learned-sinks ");
    if (a->flags & ATTN_OUTPUT_GATE) strcat(buf, "output-gate ");
    if (a->softcap > 0) sprintf(buf + strlen(buf), "soft-cap %g ", a->softcap);
    if (a->flags & ATTN_QKV_BIAS) strcat(buf, "qkv-bias ");
    post_norm_extras(m->config.layers[l].flags, buf);
    if (m->config.position_kind == POS_ROPE && a->rope.dim == 0) strcat(buf, "NoPE ");
    if (a->rope.dim > 0 && a->rope.dim < a->head_dim) sprintf(buf + strlen(buf), "rope %d/%d dims ", a->rope.dim, a->head_dim);
    if (a->rope.table >= 0) strcat(buf, "rope-table ");
    if (a->rope.dim > 0 && a->rope.attn_factor != 1.0f) sprintf(buf + strlen(buf), "rope x%.3g ", a->rope.attn_factor);
    if (a->temperature_floor > 0) strcat(buf, "temperature ");
}

static void extras_of(const Model *m, int l, char *buf) {
    buf[0] = '\0';
    if (m->config.layers[l].mixer == MIXER_LATENT_ATTENTION) latent_extras(m, l, buf);
    else attention_extras(m, l, buf);
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
    case FFN_RWKV: sprintf(buf, "rwkv channel mix %d", f->hidden); break;
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

/* A recurrent layer's row: what its state is made of, where attention rows show heads and the cache.
 * "mamba state 16 x 128 channels", "mamba2 state 16 x 8 heads" (each head: head_dim x 16),
 * "gated_deltanet state 16x16 x 4 heads" (k x v per value head), "rwkv-4 wkv 64 channels" */
static void print_recurrent_row(const Model *m, int l, int width, FILE *out) {
    const LayerConfig *lc = &m->config.layers[l];
    char kind[48], extras[96], head_dim[16] = "-", b1[32], b2[48], ffn[96];
    switch (lc->mixer) {
    case MIXER_MAMBA: {
        const MambaConfig *a = &lc->mamba;
        snprintf(kind, sizeof kind, "mamba state %d x %d channels", a->state, a->inner);
        snprintf(extras, sizeof extras, "conv %d, dt rank %d", a->conv, a->dt_rank);
        break;
    }
    case MIXER_MAMBA2: {
        const Mamba2Config *a = &lc->mamba2;
        snprintf(kind, sizeof kind, "mamba2 state %d x %d heads", a->state, a->n_heads);
        snprintf(head_dim, sizeof head_dim, "%d", a->head_dim);
        snprintf(extras, sizeof extras, "%d group%s, conv %d, chunk %d", a->n_groups, a->n_groups > 1 ? "s" : "", a->conv,
                 a->chunk);
        break;
    }
    case MIXER_GATED_DELTANET: {
        const DeltaNetConfig *a = &lc->deltanet;
        snprintf(kind, sizeof kind, "gated_deltanet state %dx%d x %d heads", a->k_head_dim, a->v_head_dim, a->n_v_heads);
        snprintf(head_dim, sizeof head_dim, "%d", a->v_head_dim);
        snprintf(extras, sizeof extras, "%d key heads, conv %d, chunk %d", a->n_k_heads, a->conv, a->chunk);
        break;
    }
    case MIXER_RWKV: /* per channel: the weighted sums of values and of weights, and their common exponent */
        snprintf(kind, sizeof kind, "rwkv state 3 x %d channels", lc->rwkv.inner);
        strcpy(extras, "token shift");
        break;
    default: strcpy(kind, mixer_name(lc->mixer)), strcpy(extras, "-");
    }
    snprintf(b2, sizeof b2, "state %s B", grouped((long long)statelayer_bytes_of(layer_state_shape(&m->config, lc)), b1));
    fprintf(out, "%5d  %-*s %3s %3s  %-10s %8s  %9s  %-22s %6d B  %-15s %s\n", l, width, kind, "-", "-", "-", head_dim, "-",
            extras, 0, b2, ffn_name(lc, ffn));
}

/* --kv-type as the tables name it */
static const char *kv_cache_type_text(const Model *m) {
    switch (m->attention[0].kv_type) {
    case KV_BF16: return "bf16";
    case KV_Q8_0: return "q8_0";
    default: return "float32";
    }
}

static int has_latent(const Model *m) {
    for (int l = 0; l < m->config.n_layers; l++)
        if (m->config.layers[l].mixer == MIXER_LATENT_ATTENTION) return 1;
    return 0;
}

static int is_overridden(const Model *m, int l) {
    const AttentionSpec *a = &m->attention[l], own = attention_of_layer(m, l);
    return a->mask != own.mask || a->span != own.span || a->n_sinks != own.n_sinks;
}

/* The KV cache of the attention layers (as kvcache.c would lay it out) beside the recurrent layers' states,
 * which stay the same at every length */
static void print_state_table(const Model *m, int recurrent, FILE *out) {
    const Config *c = &m->config;
    char b1[32], b2[32], text[3][96];
    size_t state = 0;
    int attention_layers = 0;
    for (int l = 0; l < c->n_layers; l++) {
        state += statelayer_bytes_of(layer_state_shape(c, &c->layers[l]));
        attention_layers += !is_recurrent(&c->layers[l]);
    }
    fprintf(out, "\nKV cache of %d attention layer%s (%s, blocks of %d positions), state of %d recurrent layer%s "
            "(float32):\n", attention_layers, attention_layers == 1 ? "" : "s", kv_cache_type_text(m), KV_BLOCK_TOKENS, recurrent,
            recurrent == 1 ? "" : "s");
    fprintf(out, "%7s  %28s  %28s  %28s\n", "tokens", "KV cache", "recurrent state", "total");
    const long lengths[] = {1024, 8192, 32768, 131072};
    for (int i = 0; i < 4; i++) {
        size_t kv = 0;
        for (int l = 0; l < c->n_layers; l++)
            if (!is_recurrent(&c->layers[l])) {
                KVLayer cache;
                layer_cache_init(&cache, m, l);
                kv += kvlayer_bytes_for(&cache, lengths[i]);
            }
        size_t parts[3] = {kv, state, kv + state};
        for (int k = 0; k < 3; k++)
            snprintf(text[k], sizeof text[k], "%s B (%s)", grouped((long long)parts[k], b1), human_bytes((double)parts[k], b2));
        fprintf(out, "%6ldk  %28s  %28s  %28s\n", lengths[i] / 1024, text[0], text[1], text[2]);
    }
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
    int attention_layers = 0, recurrent = 0, width = 22; /* the mixer column: recurrent rows say more */
    for (int l = 0; l < c->n_layers; l++) {
        attention_layers += !is_recurrent(&c->layers[l]);
        recurrent += statelayer_bytes_of(layer_state_shape(c, &c->layers[l])) > 0;
    }
    if (recurrent) width = 36;
    if (attention_layers)
        fprintf(out, "dim %d, %d layers, context %d, %s positions, %s%s\n", c->dim, c->n_layers, c->context_length,
                c->position_kind == POS_ROPE ? "rotary" : "learned", c->norm_kind == NORM_RMS ? "RMSNorm" : "LayerNorm",
                c->flags & MODEL_TIED_EMBEDDINGS ? ", tied embeddings" : "");
    else /* the state carries the order of the tokens: nothing limits the length */
        fprintf(out, "dim %d, %d layers, no attention: no positions, no context limit, %s%s\n", c->dim, c->n_layers,
                c->norm_kind == NORM_RMS ? "RMSNorm" : "LayerNorm", c->flags & MODEL_TIED_EMBEDDINGS ? ", tied embeddings" : "");
    if (c->embed_scale != 1.0f || c->residual_scale != 1.0f || c->logit_scale != 1.0f || c->final_softcap > 0)
        fprintf(out, "embeddings x%g, block outputs x%g, logits x%g%s\n", c->embed_scale, c->residual_scale,
                c->logit_scale, c->final_softcap > 0 ? ", logits soft-capped" : "");
    if (attention_layers) {
        fprintf(out, "attention kernel: %s", m->attention[0].kernel == KERNEL_FLASH ? "flash" : "naive");
        for (int l = 0; l < c->n_layers; l++)
            if (c->layers[l].mixer == MIXER_LATENT_ATTENTION) {
                static const char *forms[] = {"auto (the cheaper form at each position)", "absorbed", "expanded"};
                fprintf(out, "; latent attention: %s", forms[m->attention[l].latent_kernel]);
                break;
            }
        if (m->attention[0].kv_type != KV_F32)
            fprintf(out, "; KV cache: %s%s", m->attention[0].kv_type == KV_Q8_0 ? "q8_0 (int8 in groups of 32, an f32 scale each)"
                    : kv_cache_type_text(m), has_latent(m) ? "; latent attention layers keep f32" : "");
        fprintf(out, "\n");
    }
    fprintf(out, "\n%5s  %-*s %3s %3s  %-10s %8s  %9s  %-22s %8s  %-15s %s\n", "layer", width,
            recurrent ? "mixer" : "attention", "q", "kv", "group", "head_dim", "rope base", "extras", "KV/token", "keeps", "FFN");
    int overridden = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        if (is_recurrent(lc)) {
            print_recurrent_row(m, l, width, out);
            continue;
        }
        const AttentionConfig *at = &lc->attn;
        const AttentionSpec *a = &m->attention[l];
        const LatentAttentionConfig *la = &lc->mla;
        int latent = lc->mixer == MIXER_LATENT_ATTENTION, heads = mixer_heads(lc), kv_heads = latent ? 1 : at->n_kv_heads;
        const RopeConfig *rope = latent ? &la->rope : &at->rope;
        char kind[48], group[24], head_dim[24], rope_base[24], extras[200], ffn[96];
        int changed = is_overridden(m, l);
        snprintf(kind, sizeof kind, "%s%s", mask_name(a, b1), changed ? " *" : "");
        overridden |= changed;
        /* latent attention: every query head reads the one latent (MQA in its absorbed form); q.k / v widths */
        snprintf(group, sizeof group, "%d (%s)", heads / kv_heads, latent ? "MLA" : sharing_name(heads, kv_heads, b2));
        if (latent) snprintf(head_dim, sizeof head_dim, "%d/%d", la->nope_dim + la->rope.dim, la->v_dim);
        else snprintf(head_dim, sizeof head_dim, "%d", at->head_dim);
        if (rope->dim > 0) snprintf(rope_base, sizeof rope_base, "%g", rope->theta);
        else strcpy(rope_base, "-");
        extras_of(m, l, extras);
        size_t per_token = latent ? latent_bytes(la) : 2 * kv_row_bytes(at->n_kv_heads * at->head_dim, a->kv_type);
        fprintf(out, "%5d  %-*s %3d %3d  %-10s %8s  %9s  %-22s %6zu B  %-15s %s\n", l, width, kind, heads, kv_heads, group,
                head_dim, rope_base, extras, per_token, keeps(a, b3), ffn_name(lc, ffn));
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

    if (recurrent) {
        print_state_table(m, recurrent, out);
        return;
    }
    /* the cache as kvcache.c would lay it out, and the same model as plain MHA with full attention */
    fprintf(out, "\nKV cache (%s keys + values, blocks of %d positions; %d-token context):\n", kv_cache_type_text(m),
            KV_BLOCK_TOKENS, c->context_length);
    fprintf(out, "%7s  %28s  %32s  %6s\n", "tokens", "as wired", "MHA + full attention everywhere", "ratio");
    const long lengths[] = {1024, 8192, 32768, 131072};
    for (int i = 0; i < 4; i++) {
        size_t wired = 0, plain = 0;
        for (int l = 0; l < c->n_layers; l++) {
            const LayerConfig *lc = &c->layers[l];
            KVLayer cache, mha;
            layer_cache_init(&cache, m, l);
            if (lc->mixer == MIXER_LATENT_ATTENTION) { /* the same heads with MHA: keys of nope + rope, values of v_dim */
                kvlayer_init(&mha, lc->mla.n_heads * (lc->mla.nope_dim + lc->mla.rope.dim), 0, 0);
                kvlayer_set_value_width(&mha, lc->mla.n_heads * lc->mla.v_dim);
            } else {
                kvlayer_init(&mha, lc->attn.n_heads * lc->attn.head_dim, 0, 0);
            }
            kvlayer_set_type(&mha, cache.type); /* the same element type: the ratio is the wiring's */
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
    const LayerConfig *layer = &m->config.layers[l];
    const AttentionConfig *lc = &layer->attn;
    const AttentionSpec *a = &m->attention[l], own = attention_of_layer(m, l);
    int latent = layer->mixer == MIXER_LATENT_ATTENTION, heads = mixer_heads(layer), kv_heads = latent ? 1 : lc->n_kv_heads;
    const RopeConfig *rope = latent ? &layer->mla.rope : &lc->rope;
    char b[160];
    memset(w, 0, sizeof *w);
    w->kind = latent ? "latent attention" : "attention";
    w->has_attention_weights = 1;
    w->overridden = is_overridden(m, l);
    if (w->overridden) mask_name(&own, w->in_file);
    add_property(w, "mask", "%s", mask_name(a, b));
    add_property(w, "q heads", "%d", heads);
    add_property(w, "kv heads", latent ? "%d (one latent for every head)" : "%d", kv_heads);
    add_property(w, "group", "%d (%s)", heads / kv_heads, latent ? "MLA" : sharing_name(heads, kv_heads, b));
    if (latent) add_property(w, "head_dim", "%d/%d", layer->mla.nope_dim + layer->mla.rope.dim, layer->mla.v_dim);
    else add_property(w, "head_dim", "%d", lc->head_dim);
    if (rope->dim > 0) add_property(w, "rope base", "%g", rope->theta);
    else add_property(w, "rope base", "%s", m->config.position_kind == POS_ROPE ? "- (NoPE)" : "- (learned positions)");
    extras_of(m, l, b);
    add_property(w, "extras", "%s", b);
    add_property(w, "KV/token", "%d B", (int)(latent ? latent_bytes(&layer->mla) : 2 * lc->n_kv_heads * lc->head_dim * sizeof(float)));
    add_property(w, "keeps", "%s", keeps(a, b));
    add_property(w, "FFN", "%s", ffn_name(layer, b));
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

/* "note: --attn-map: layers 0, 2, 3 (mamba2) have no attention weights: not drawn" on stderr */
static void note_recurrent_layers(const Config *c) {
    int first = 1;
    fprintf(stderr, "note: --attn-map: layers");
    for (int l = 0; l < c->n_layers; l++)
        if (is_recurrent(&c->layers[l])) {
            fprintf(stderr, "%s %d (%s)", first ? "" : ",", l, mixer_name(c->layers[l].mixer));
            first = 0;
        }
    fprintf(stderr, " have no attention weights: not drawn\n");
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
    if (!layers) { /* every layer that has attention weights; the recurrent ones have none to draw */
        for (int l = 0; l < n_layers; l++)
            if (!is_recurrent(&m->config.layers[l])) map->index_of_layer[l] = map->n_recorded, map->layers[map->n_recorded++] = l;
        if (map->n_recorded == 0)
            return fail(err, errlen, "--attn-map: no layer of this model has attention weights to draw (every layer is %s)",
                        mixer_name(m->config.layers[0].mixer)), attention_map_free(map), NULL;
        if (map->n_recorded < n_layers) note_recurrent_layers(&m->config);
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
            if (is_recurrent(&m->config.layers[l])) {
                fail(err, errlen, "--attn-map-layer: layer %ld is a %s layer: it has no attention weights", l,
                     mixer_name(m->config.layers[l].mixer));
                return attention_map_free(map), NULL;
            }
            if (map->index_of_layer[l] < 0) map->index_of_layer[l] = map->n_recorded, map->layers[map->n_recorded++] = (int)l;
            p = *end ? end + 1 : end;
        }
        if (map->n_recorded == 0) return fail(err, errlen, "--attn-map-layer: no layer given"), attention_map_free(map), NULL;
    }
    double bytes = 0;
    for (int i = 0; i < map->n_recorded; i++)
        bytes += (double)mixer_heads(&m->config.layers[map->layers[i]]) * n_positions * n_positions * sizeof(float);
    if (bytes > MAP_MAX_BYTES) {
        fail(err, errlen, "--attn-map: %d positions x %d layers would need %.0f MiB; use --attn-map-layer, a shorter "
             "prompt or a smaller -n", n_positions, map->n_recorded, bytes / (1 << 20));
        return attention_map_free(map), NULL;
    }
    if (!(map->weights = calloc((size_t)n_layers, sizeof *map->weights)))
        return fail(err, errlen, "out of memory"), attention_map_free(map), NULL;
    for (int i = 0; i < map->n_recorded; i++) {
        size_t n = (size_t)mixer_heads(&m->config.layers[map->layers[i]]) * n_positions * n_positions;
        if (!(map->weights[i] = calloc(n, sizeof(float))))
            return fail(err, errlen, "out of memory"), attention_map_free(map), NULL;
    }
    return map;
}

void attention_map_record(void *ctx, int layer, int pos, const float *weights, int weights_stride) {
    AttentionMap *map = ctx;
    int i = map->index_of_layer[layer], T = map->n_positions;
    if (i < 0 || pos >= T) return;
    int n_heads = mixer_heads(&map->model->config.layers[layer]);
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
        for (int h = 0; h < mixer_heads(&map->model->config.layers[map->layers[i]]); h++)
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
        if (mixer_heads(&map->model->config.layers[map->layers[i]]) > g.columns) g.columns = mixer_heads(&map->model->config.layers[map->layers[i]]);
    int target = 128, rows_per_layer = 1; /* pixels per panel, never less than one per cell */
    if (map->n_recorded == 1) {
        rows_per_layer = (int)sqrt((double)g.columns);
        g.columns = (g.columns + rows_per_layer - 1) / rows_per_layer;
        target = 384;
    }
    for (int i = 0; i < map->n_recorded; i++)
        g.rows += (mixer_heads(&map->model->config.layers[map->layers[i]]) + g.columns - 1) / g.columns;
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
        int layer = map->layers[r], heads = mixer_heads(&map->model->config.layers[layer]);
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

/* ---------------------------------------------------------------------------------------------
 * the paged cache as a picture: block tables of sequences that share blocks */

#define MAP_CELL 34  /* a block, in pixels */
#define MAP_GAP 4
#define MAP_ROW 26
#define MAP_LABEL 96 /* width of "sample 12" */

/* Writes s with &, < and > escaped (a title may hold a file name) */
static void svg_text(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '&') fputs("&amp;", f);
        else if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else fputc(*s, f);
    }
}

/* The first layer of each kind of cache (paged, rolling, summaries): the layers drawn */
static int layers_to_draw(const KVCache *c, int *layers) {
    int n = 0, seen[3] = {0};
    for (int l = 0; l < c->n_layers && n < 3; l++) {
        const KVLayer *x = &c->layout[l];
        int kind = x->kv_dim == 0 ? -1 : x->summary_every ? 2 : x->window ? 1 : 0;
        if (kind >= 0 && !seen[kind]) seen[kind] = 1, layers[n++] = l;
    }
    return n;
}

/* Sharing colours: held by every sequence drawn, by some of them, by this one alone */
static const char *block_colour(int refs, int n_seqs) {
    return refs >= n_seqs && n_seqs > 1 ? "#4e79a7" : refs > 1 ? "#76b7b2" : "#f28e2b";
}

int kv_map_write_svg(const Model *m, const KVCache *c, const int *seqs, int n_seqs, const char *title, const char *path) {
    int layers[3], n_layers = layers_to_draw(c, layers), most = 1;
    for (int i = 0; i < n_layers; i++)
        for (int s = 0; s < n_seqs; s++) {
            const KVLayer *x = kvcache_layer(c, seqs[s], layers[i]);
            for (int b = 0; b < x->n_blocks; b++)
                if (x->block_ids[b] >= 0 && b + 1 > most) most = b + 1;
        }
    int width = MAP_LABEL + most * (MAP_CELL + MAP_GAP) + 20, height = 40 + n_layers * (n_seqs + 1) * MAP_ROW + 70;
    if (width < 640) width = 640; /* room for the text lines */
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
               "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" "
               "font-size=\"14\">", width, height);
    svg_text(f, title);
    fputs("</text>\n", f);
    int y = 40;
    for (int i = 0; i < n_layers; i++) {
        char kind[64], kept[64];
        int l = layers[i];
        fprintf(f, "<text x=\"10\" y=\"%d\" font-weight=\"bold\">layer %d: %s, keeps %s (block ids; a bar shows the rows "
                   "written)</text>\n", y + 16, l, mask_name(&m->attention[l], kind), keeps(&m->attention[l], kept));
        y += MAP_ROW;
        for (int s = 0; s < n_seqs; s++, y += MAP_ROW) {
            const KVLayer *x = kvcache_layer(c, seqs[s], l);
            fprintf(f, "<text x=\"10\" y=\"%d\">sample %d</text>\n", y + 16, s);
            for (int b = 0; b < x->n_blocks; b++) {
                int id = x->block_ids[b], cx = MAP_LABEL + b * (MAP_CELL + MAP_GAP);
                if (id < 0) continue;
                int filled = MAP_CELL * kvlayer_rows_written(x, b) / KV_BLOCK_TOKENS;
                fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"20\" fill=\"%s\" fill-opacity=\"0.35\" "
                           "stroke=\"#333\"/>\n<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"20\" fill=\"%s\"/>\n"
                           "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%d</text>\n",
                        cx, y + 2, MAP_CELL, block_colour(x->pool->refs[id], n_seqs), cx, y + 2, filled,
                        block_colour(x->pool->refs[id], n_seqs), cx + MAP_CELL / 2, y + 16, id);
            }
        }
    }
    const char *legend[] = {"shared by every sample", "shared by some", "this sample's own (copied or new)"};
    const char *colour[] = {"#4e79a7", "#76b7b2", "#f28e2b"};
    for (int k = 0, x = 10; k < 3; x += 60 + 7 * (int)strlen(legend[k]), k++)
        fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"14\" height=\"14\" fill=\"%s\"/><text x=\"%d\" y=\"%d\">%s</text>\n", x,
                y + 8, colour[k], x + 20, y + 20, legend[k]);
    size_t alone = 0;
    for (int s = 0; s < n_seqs; s++) alone += kvcache_sequence_bytes(c, seqs[s]);
    char a[32], b[32];
    fprintf(f, "<text x=\"10\" y=\"%d\">KV cache held: %s bytes; %d separate runs would hold %s bytes</text>\n</svg>\n",
            y + 48, grouped((long long)kvcache_bytes_held(c), a), n_seqs, grouped((long long)alone, b));
    return fclose(f) == 0 ? 0 : -1;
}
