/* model.c - loading a model file (docs/FORMAT.md) with every field validated, and forward(): the layer recipe.
 * The blocks a layer is made of (attention, dense FFN, mixture of experts) are in blocks.c / moe.c. */
#include "model.h"
#include "profile.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blocks.h"
#include "recurrent.h"

/* ---------------------------------------------------------------------------------------------
 * loading: read every field through a bounds-checked cursor, check it, and only then use it */

#define HEADER_SIZE 128
#define CONFIG_SIZE 128
#define LAYER_HEADER_SIZE 16     /* record_size, flags, mixer kind, mixer payload size */
#define ATTENTION_RECORD_SIZE 56 /* payload sizes of each kind (docs/FORMAT.md) */
#define LATENT_RECORD_SIZE 48
#define MAMBA_RECORD_SIZE 20
#define MAMBA2_RECORD_SIZE 36
#define DELTANET_RECORD_SIZE 28
#define RWKV_RECORD_SIZE 8
#define RWKV_FFN_RECORD_SIZE 8
#define DENSE_RECORD_SIZE 12
#define MOE_RECORD_SIZE 48
#define TENSOR_RECORD_SIZE 128
#define TENSOR_NAME_SIZE 80
#define DATA_ALIGN 64

/* sane limits: far beyond any real model, small enough that products cannot overflow */
#define MAX_LAYERS 4096
#define MAX_DIM (1 << 16)
#define MAX_HIDDEN (1 << 20)
#define MAX_VOCAB (1 << 22)
#define MAX_CONTEXT (1 << 24)
#define MAX_HEAD_DIM 1024
#define MAX_LAYER_RECORD 1024
#define MAX_TENSORS (64 * MAX_LAYERS + 64)

typedef struct {
    const unsigned char *p;
} Cursor;

static uint32_t u32_at(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t u64_at(const unsigned char *p) { return (uint64_t)u32_at(p) | (uint64_t)u32_at(p + 4) << 32; }
static uint32_t next_u32(Cursor *c) {
    uint32_t v = u32_at(c->p);
    c->p += 4;
    return v;
}
static uint64_t next_u64(Cursor *c) {
    uint64_t v = u64_at(c->p);
    c->p += 8;
    return v;
}
static float next_f32(Cursor *c) {
    uint32_t v = next_u32(c);
    float f;
    memcpy(&f, &v, 4);
    return f;
}

typedef struct {
    const char *path;
    char *err;
    size_t errlen;
} LoadContext;

void make_printable(char *s) {
    for (unsigned char *p = (unsigned char *)s; *p; p++)
        if (*p < 0x20 || *p == 0x7f) *p = '?';
}

int error_line(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* Writes "PATH: what is wrong (where)" to ctx->err. Names in the message come from the file, so control
 * characters are shown as '?': the error stays one line and cannot drive the terminal. */
static int fail(LoadContext *ctx, const char *fmt, ...) {
    if (ctx->errlen == 0) return -1;
    int n = snprintf(ctx->err, ctx->errlen, "%s: ", ctx->path);
    va_list ap;
    va_start(ap, fmt);
    if (n >= 0 && (size_t)n < ctx->errlen) vsnprintf(ctx->err + n, ctx->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    make_printable(ctx->err);
    return -1;
}

/* A section [offset, offset+size) must lie after the header and inside the file. */
static int check_section(LoadContext *ctx, const char *what, uint64_t offset, uint64_t size, uint64_t file_size) {
    if (offset < HEADER_SIZE || offset > file_size || size > file_size - offset)
        return fail(ctx, "%s section (offset %llu, size %llu) lies outside the file (%llu bytes)", what,
                    (unsigned long long)offset, (unsigned long long)size, (unsigned long long)file_size);
    return 0;
}

static int in_range(LoadContext *ctx, const char *what, long long v, long long lo, long long hi) {
    if (v < lo || v > hi) return fail(ctx, "%s is %lld (must be %lld .. %lld)", what, v, lo, hi);
    return 0;
}

static int parse_config(LoadContext *ctx, Config *c, const unsigned char *p) {
    Cursor cur = {p};
    memcpy(c->family, cur.p, 32);
    c->family[31] = '\0';
    make_printable(c->family); /* shown by --info: no control characters from the file */
    cur.p += 32;
    uint32_t dim = next_u32(&cur), vocab = next_u32(&cur), context = next_u32(&cur), norm_kind = next_u32(&cur);
    float eps = next_f32(&cur);
    uint32_t pos_kind = next_u32(&cur);
    float embed_scale = next_f32(&cur), residual_scale = next_f32(&cur), logit_scale = next_f32(&cur);
    float final_softcap = next_f32(&cur);
    uint32_t flags = next_u32(&cur), n_tables = next_u32(&cur);
    if (in_range(ctx, "config dim", dim, 1, MAX_DIM) || in_range(ctx, "config vocab_size", vocab, 1, MAX_VOCAB) ||
        in_range(ctx, "config context_length", context, 1, MAX_CONTEXT) ||
        in_range(ctx, "config norm_kind", norm_kind, NORM_RMS, NORM_LAYER) ||
        in_range(ctx, "config position_kind", pos_kind, POS_ROPE, POS_LEARNED) ||
        in_range(ctx, "config n_rope_tables", n_tables, 0, MAX_LAYERS))
        return -1;
    if (!(eps > 0.0f && eps < 1.0f)) return fail(ctx, "config norm_eps %g is not in (0, 1)", eps);
    if (!isfinite(embed_scale) || !isfinite(final_softcap) || final_softcap < 0.0f || !isfinite(residual_scale) ||
        !isfinite(logit_scale))
        return fail(ctx, "config embed_scale %g / residual_scale %g / logit_scale %g / final_softcap %g is not valid",
                    embed_scale, residual_scale, logit_scale, final_softcap);
    if (flags & ~(uint32_t)MODEL_TIED_EMBEDDINGS) return fail(ctx, "config has unknown flags 0x%x", flags);
    c->dim = (int)dim;
    c->vocab_size = (int)vocab;
    c->context_length = (int)context;
    c->norm_kind = (int)norm_kind;
    c->norm_eps = eps;
    c->position_kind = (int)pos_kind;
    c->embed_scale = embed_scale;
    c->residual_scale = residual_scale;
    c->logit_scale = logit_scale;
    c->final_softcap = final_softcap;
    c->flags = flags;
    c->n_rope_tables = (int)n_tables;
    return 0;
}

/* The rotary settings of an attention record (rope_dim and table already in range) */
static int check_rope(LoadContext *ctx, const Config *c, int i, uint32_t rope_dim, int32_t table, float theta,
                      float attn_factor) {
    if (rope_dim % 2) return fail(ctx, "layer %d: rope_dim %u is odd", i, rope_dim);
    if (c->position_kind == POS_ROPE && rope_dim > 0 && table < 0 && !(theta > 1.0f && isfinite(theta)))
        return fail(ctx, "layer %d: rope_theta %g is not valid", i, theta);
    if (!(attn_factor > 0.0f) || !isfinite(attn_factor))
        return fail(ctx, "layer %d: rope attention factor %g is not valid", i, attn_factor);
    return 0;
}

/* CHECK(i, "n_heads", v, lo, hi): in_range with the layer named in the message */
#define CHECK(field, v, lo, hi) \
    (snprintf(what, sizeof what, "layer %d " field, i), in_range(ctx, what, (long long)(v), lo, hi))

static int parse_attention(LoadContext *ctx, const Config *c, AttentionConfig *a, const unsigned char *p, int i) {
    Cursor cur = {p};
    uint32_t heads = next_u32(&cur), kv_heads = next_u32(&cur), head_dim = next_u32(&cur), window = next_u32(&cur);
    uint32_t chunk = next_u32(&cur), rope_dim = next_u32(&cur);
    int32_t table = (int32_t)next_u32(&cur);
    float theta = next_f32(&cur), attn_factor = next_f32(&cur), scale = next_f32(&cur), softcap_ = next_f32(&cur);
    float t_floor = next_f32(&cur), t_scale = next_f32(&cur);
    uint32_t flags = next_u32(&cur);
    char what[64];
    if (CHECK("n_heads", heads, 1, MAX_HEADS) || CHECK("n_kv_heads", kv_heads, 1, heads) ||
        CHECK("head_dim", head_dim, 1, MAX_HEAD_DIM) || CHECK("window", window, 0, MAX_CONTEXT) ||
        CHECK("chunk", chunk, 0, MAX_CONTEXT) || CHECK("rope_dim", rope_dim, 0, head_dim) ||
        CHECK("rope_table", table, -1, c->n_rope_tables - 1))
        return -1;
    if (heads % kv_heads)
        return fail(ctx, "layer %d: %u query heads do not split into groups over %u kv heads", i, heads, kv_heads);
    if (window && chunk) return fail(ctx, "layer %d: both a sliding window and chunks", i);
    if (check_rope(ctx, c, i, rope_dim, table, theta, attn_factor)) return -1;
    if (!(scale > 0.0f) || !isfinite(scale) || !(softcap_ >= 0.0f) || !isfinite(softcap_))
        return fail(ctx, "layer %d: attn_scale %g / attn_softcap %g is not valid", i, scale, softcap_);
    if (!(t_floor >= 0.0f) || !isfinite(t_floor) || !isfinite(t_scale))
        return fail(ctx, "layer %d: temperature floor %g / scale %g is not valid", i, t_floor, t_scale);
    if (flags & ~(uint32_t)(ATTN_QK_NORM | ATTN_QKV_BIAS | ATTN_O_BIAS | ATTN_QK_NORM_FULL | ATTN_QK_NORM_PLAIN | ATTN_SINKS |
                            ATTN_OUTPUT_GATE))
        return fail(ctx, "layer %d attention has unknown flags 0x%x", i, flags);
    unsigned norms = flags & (ATTN_QK_NORM | ATTN_QK_NORM_FULL | ATTN_QK_NORM_PLAIN);
    if (norms & (norms - 1)) return fail(ctx, "layer %d attention has more than one kind of q/k norm (flags 0x%x)", i, flags);
    a->n_heads = (int)heads;
    a->n_kv_heads = (int)kv_heads;
    a->head_dim = (int)head_dim;
    a->window = (int)window;
    a->chunk = (int)chunk;
    a->rope.dim = c->position_kind == POS_ROPE ? (int)rope_dim : 0;
    a->rope.table = table;
    a->rope.theta = theta;
    a->rope.attn_factor = attn_factor;
    a->scale = scale;
    a->softcap = softcap_;
    a->temperature_floor = t_floor;
    a->temperature_scale = t_scale;
    a->flags = flags;
    return 0;
}

/* The latent attention payload: every width must fit the others (the tensors' shapes follow from them) */
static int parse_latent_attention(LoadContext *ctx, const Config *c, LatentAttentionConfig *a, const unsigned char *p,
                                  int i) {
    Cursor cur = {p};
    uint32_t heads = next_u32(&cur), q_rank = next_u32(&cur), kv_rank = next_u32(&cur), nope = next_u32(&cur);
    uint32_t rope_dim = next_u32(&cur), v_dim = next_u32(&cur);
    int32_t table = (int32_t)next_u32(&cur);
    float theta = next_f32(&cur), attn_factor = next_f32(&cur), scale = next_f32(&cur), eps = next_f32(&cur);
    uint32_t flags = next_u32(&cur);
    char what[64];
    if (CHECK("n_heads", heads, 1, MAX_HEADS) || CHECK("q_rank", q_rank, 0, MAX_HIDDEN) ||
        CHECK("kv_rank", kv_rank, 1, MAX_LATENT_RANK) || CHECK("nope_dim", nope, 1, MAX_HEAD_DIM) ||
        CHECK("rope_dim", rope_dim, 0, MAX_HEAD_DIM) || CHECK("v_dim", v_dim, 1, MAX_HEAD_DIM) ||
        CHECK("rope_table", table, -1, c->n_rope_tables - 1))
        return -1;
    if (flags & ~(uint32_t)MLA_Q_LORA) return fail(ctx, "layer %d latent attention has unknown flags 0x%x", i, flags);
    if (!!(flags & MLA_Q_LORA) != (q_rank > 0))
        return fail(ctx, "layer %d: latent attention flags 0x%x do not match its q_rank %u", i, flags, q_rank);
    if (rope_dim > 0 && c->position_kind != POS_ROPE)
        return fail(ctx, "layer %d: latent attention rotates %u dimensions but the model has no rotary positions", i, rope_dim);
    if (check_rope(ctx, c, i, rope_dim, table, theta, attn_factor)) return -1;
    if (!(scale > 0.0f) || !isfinite(scale) || !(eps > 0.0f && eps < 1.0f))
        return fail(ctx, "layer %d: attn_scale %g / latent norm_eps %g is not valid", i, scale, eps);
    a->n_heads = (int)heads;
    a->q_rank = (int)q_rank;
    a->kv_rank = (int)kv_rank;
    a->nope_dim = (int)nope;
    a->v_dim = (int)v_dim;
    a->rope.dim = (int)rope_dim;
    a->rope.table = table;
    a->rope.theta = theta;
    a->rope.attn_factor = attn_factor;
    a->scale = scale;
    a->norm_eps = eps;
    a->flags = flags;
    return 0;
}

/* What every recurrent record must keep to: a state this build can hold, no flag beyond `known` */
static int check_recurrent(LoadContext *ctx, int i, const char *kind, uint64_t state_floats, uint32_t flags, uint32_t known) {
    if (state_floats > MAX_STATE_FLOATS)
        return fail(ctx, "layer %d: a %s state of %llu floats is larger than this build allows (%u)", i, kind,
                    (unsigned long long)state_floats, MAX_STATE_FLOATS);
    if (flags & ~known) return fail(ctx, "layer %d %s has unknown flags 0x%x", i, kind, flags);
    return 0;
}

/* Mamba: inner, state, conv, dt_rank, flags */
static int parse_mamba(LoadContext *ctx, MambaConfig *a, const unsigned char *p, int i) {
    Cursor cur = {p};
    uint32_t inner = next_u32(&cur), state = next_u32(&cur), conv = next_u32(&cur), rank = next_u32(&cur);
    uint32_t flags = next_u32(&cur);
    char what[64];
    if (CHECK("mamba inner", inner, 1, MAX_HIDDEN) || CHECK("mamba state", state, 1, MAX_STATE_SIZE) ||
        CHECK("mamba conv", conv, 1, MAX_CONV_KERNEL) || CHECK("mamba dt_rank", rank, 1, MAX_HIDDEN))
        return -1;
    if (check_recurrent(ctx, i, "mamba", (uint64_t)inner * state, flags, SSM_CONV_BIAS | SSM_PROJ_BIAS)) return -1;
    *a = (MambaConfig){(int)inner, (int)state, (int)conv, (int)rank, flags};
    return 0;
}

/* Mamba-2: n_heads, head_dim, n_groups, state, conv, chunk, dt_min, dt_max, flags */
static int parse_mamba2(LoadContext *ctx, Mamba2Config *a, const unsigned char *p, int i) {
    Cursor cur = {p};
    uint32_t heads = next_u32(&cur), head_dim = next_u32(&cur), groups = next_u32(&cur), state = next_u32(&cur);
    uint32_t conv = next_u32(&cur), chunk = next_u32(&cur);
    float dt_min = next_f32(&cur), dt_max = next_f32(&cur);
    uint32_t flags = next_u32(&cur);
    char what[64];
    if (CHECK("mamba2 n_heads", heads, 1, MAX_HEADS) || CHECK("mamba2 head_dim", head_dim, 1, MAX_HEAD_DIM) ||
        CHECK("mamba2 n_groups", groups, 1, heads) || CHECK("mamba2 state", state, 1, MAX_STATE_SIZE) ||
        CHECK("mamba2 conv", conv, 1, MAX_CONV_KERNEL) || CHECK("mamba2 chunk", chunk, 1, MAX_SCAN_CHUNK))
        return -1;
    if (heads % groups) return fail(ctx, "layer %d: %u mamba2 heads do not split into %u groups", i, heads, groups);
    if (!(dt_min >= 0.0f) || !(dt_max > dt_min)) /* dt_max may be infinite (no limit) */
        return fail(ctx, "layer %d: mamba2 dt limits %g .. %g are not valid", i, dt_min, dt_max);
    if (check_recurrent(ctx, i, "mamba2", (uint64_t)heads * head_dim * state, flags, SSM_CONV_BIAS | SSM_PROJ_BIAS)) return -1;
    *a = (Mamba2Config){(int)heads, (int)head_dim, (int)groups, (int)state, (int)conv, (int)chunk, dt_min, dt_max, flags};
    return 0;
}

/* Gated DeltaNet: n_k_heads, n_v_heads, k_head_dim, v_head_dim, conv, chunk, flags */
static int parse_deltanet(LoadContext *ctx, DeltaNetConfig *a, const unsigned char *p, int i) {
    Cursor cur = {p};
    uint32_t k_heads = next_u32(&cur), v_heads = next_u32(&cur), k_dim = next_u32(&cur), v_dim = next_u32(&cur);
    uint32_t conv = next_u32(&cur), chunk = next_u32(&cur), flags = next_u32(&cur);
    char what[64];
    if (CHECK("deltanet n_k_heads", k_heads, 1, MAX_HEADS) || CHECK("deltanet n_v_heads", v_heads, 1, MAX_HEADS) ||
        CHECK("deltanet k_head_dim", k_dim, 1, MAX_HEAD_DIM) || CHECK("deltanet v_head_dim", v_dim, 1, MAX_HEAD_DIM) ||
        CHECK("deltanet conv", conv, 1, MAX_CONV_KERNEL) || CHECK("deltanet chunk", chunk, 1, MAX_SCAN_CHUNK))
        return -1;
    if (v_heads % k_heads) return fail(ctx, "layer %d: %u value heads do not share %u key heads evenly", i, v_heads, k_heads);
    if (check_recurrent(ctx, i, "gated_deltanet", (uint64_t)v_heads * k_dim * v_dim, flags, SSM_CONV_BIAS)) return -1;
    *a = (DeltaNetConfig){(int)k_heads, (int)v_heads, (int)k_dim, (int)v_dim, (int)conv, (int)chunk, flags};
    return 0;
}

/* RWKV time mixing: inner, flags */
static int parse_rwkv(LoadContext *ctx, RwkvConfig *a, const unsigned char *p, int i) {
    Cursor cur = {p};
    uint32_t inner = next_u32(&cur), flags = next_u32(&cur);
    char what[64];
    if (CHECK("rwkv inner", inner, 1, MAX_HIDDEN) || check_recurrent(ctx, i, "rwkv", 3 * (uint64_t)inner, flags, 0)) return -1;
    *a = (RwkvConfig){(int)inner, flags};
    return 0;
}

/* The mixer's payload, by kind */
static int parse_mixer(LoadContext *ctx, const Config *c, LayerConfig *l, const unsigned char *p, int i) {
    switch (l->mixer) {
    case MIXER_ATTENTION: return parse_attention(ctx, c, &l->attn, p, i);
    case MIXER_LATENT_ATTENTION: return parse_latent_attention(ctx, c, &l->mla, p, i);
    case MIXER_MAMBA: return parse_mamba(ctx, &l->mamba, p, i);
    case MIXER_MAMBA2: return parse_mamba2(ctx, &l->mamba2, p, i);
    case MIXER_GATED_DELTANET: return parse_deltanet(ctx, &l->deltanet, p, i);
    case MIXER_RWKV: return parse_rwkv(ctx, &l->rwkv, p, i);
    default: return fail(ctx, "layer %d: mixer kind %d cannot be read", i, l->mixer);
    }
}

/* dense (gated or plain), mixture-of-experts and RWKV channel-mix payloads */
static int parse_ffn(LoadContext *ctx, FfnConfig *f, int kind, const unsigned char *p, int i) {
    Cursor cur = {p};
    char what[64];
    memset(f, 0, sizeof *f);
    if (kind == FFN_RWKV) { /* hidden, flags */
        uint32_t hidden = next_u32(&cur), flags = next_u32(&cur);
        if (CHECK("rwkv channel-mix hidden_dim", hidden, 1, MAX_HIDDEN)) return -1;
        if (flags) return fail(ctx, "layer %d rwkv channel mix has unknown flags 0x%x", i, flags);
        f->hidden = (int)hidden;
        return 0;
    }
    if (kind == FFN_GATED || kind == FFN_PLAIN) {
        uint32_t hidden = next_u32(&cur), act = next_u32(&cur), flags = next_u32(&cur);
        if (CHECK("hidden_dim", hidden, 1, MAX_HIDDEN) ||
            CHECK("activation", act, ACTIVATION_SILU, ACTIVATION_GELU))
            return -1;
        if (flags & ~(uint32_t)FFN_BIAS) return fail(ctx, "layer %d FFN has unknown flags 0x%x", i, flags);
        f->hidden = (int)hidden, f->activation = (int)act, f->flags = flags;
        f->n_experts = f->top_k = 0;
        return 0;
    }
    uint32_t experts = next_u32(&cur), top_k = next_u32(&cur), hidden = next_u32(&cur), act = next_u32(&cur);
    uint32_t router = next_u32(&cur), groups = next_u32(&cur), topk_groups = next_u32(&cur), shared = next_u32(&cur);
    float routed_scale = next_f32(&cur), alpha = next_f32(&cur), limit = next_f32(&cur);
    uint32_t flags = next_u32(&cur);
    if (CHECK("n_experts", experts, 1, MAX_EXPERTS) || CHECK("top_k", top_k, 1, experts) ||
        CHECK("expert hidden_dim", hidden, 1, MAX_HIDDEN) || CHECK("expert activation", act, 0, ACTIVATION_COUNT - 1) ||
        CHECK("router", router, 0, ROUTER_KIND_COUNT - 1) || CHECK("expert groups", groups, 1, experts) ||
        CHECK("top groups", topk_groups, 1, groups) || CHECK("shared expert hidden_dim", shared, 0, MAX_HIDDEN))
        return -1;
    if (experts % groups) return fail(ctx, "layer %d: %u experts do not split into %u groups", i, experts, groups);
    if (top_k > topk_groups * (experts / groups))
        return fail(ctx, "layer %d: top %u experts cannot come from %u groups of %u", i, top_k, topk_groups, experts / groups);
    if (flags & ~(uint32_t)(MOE_NORM_TOPK | MOE_ROUTER_BIAS | MOE_EXPERT_BIAS | MOE_SCORE_BIAS | MOE_SHARED |
                            MOE_SHARED_GATE | MOE_SCALE_INPUT | MOE_GROUP_TOP2))
        return fail(ctx, "layer %d mixture of experts has unknown flags 0x%x", i, flags);
    if (!!(flags & MOE_SHARED) != (shared > 0) || ((flags & MOE_SHARED_GATE) && !(flags & MOE_SHARED)))
        return fail(ctx, "layer %d: shared expert flags 0x%x do not match its width %u", i, flags, shared);
    if (!(routed_scale > 0.0f) || !isfinite(routed_scale) || !isfinite(alpha) || !isfinite(limit) ||
        (act == ACTIVATION_SWIGLU_CLAMPED && !(alpha > 0.0f && limit > 0.0f)))
        return fail(ctx, "layer %d: routed scale %g / activation alpha %g / limit %g is not valid", i, routed_scale, alpha, limit);
    f->n_experts = (int)experts, f->top_k = (int)top_k, f->hidden = (int)hidden, f->activation = (int)act;
    f->router = (int)router, f->n_groups = (int)groups, f->topk_groups = (int)topk_groups;
    f->shared_hidden = (int)shared, f->routed_scale = routed_scale, f->act_alpha = alpha, f->act_limit = limit;
    f->flags = flags;
    return 0;
}

/* One layer record: [record_size, flags, mixer kind, mixer size, mixer payload, FFN kind, FFN size, FFN
 * payload, padding to 8]. Every kind's payload has one size; a kind this build does not know is refused by
 * name, so a newer file never runs half-understood. Returns the record's size, or -1. */
static long parse_layer(LoadContext *ctx, const Config *c, LayerConfig *l, const unsigned char *p, uint64_t left, int i) {
    if (left < LAYER_HEADER_SIZE + 8) return fail(ctx, "layer %d: record runs past the layers section", i);
    Cursor cur = {p};
    uint32_t size = next_u32(&cur), flags = next_u32(&cur), mixer = next_u32(&cur), mixer_size = next_u32(&cur);
    if (size > left || size % 8 || size < LAYER_HEADER_SIZE + 8 || size > MAX_LAYER_RECORD)
        return fail(ctx, "layer %d: record size %u is not valid (%llu bytes left in the layers section)", i, size,
                    (unsigned long long)left);
    if (flags & ~(uint32_t)LAYER_FLAGS) return fail(ctx, "layer %d has unknown flags 0x%x", i, flags);
    l->flags = flags;
    static const uint32_t mixer_sizes[MIXER_KIND_COUNT] = {[MIXER_ATTENTION] = ATTENTION_RECORD_SIZE,
                                                           [MIXER_LATENT_ATTENTION] = LATENT_RECORD_SIZE,
                                                           [MIXER_MAMBA] = MAMBA_RECORD_SIZE,
                                                           [MIXER_MAMBA2] = MAMBA2_RECORD_SIZE,
                                                           [MIXER_GATED_DELTANET] = DELTANET_RECORD_SIZE,
                                                           [MIXER_RWKV] = RWKV_RECORD_SIZE};
    if (mixer >= MIXER_KIND_COUNT || mixer_sizes[mixer] == 0) {
        char known[160] = "";
        for (int k = 0, n = 0; k < MIXER_KIND_COUNT; k++)
            if (mixer_sizes[k]) n += snprintf(known + n, sizeof known - (size_t)n, "%s%d = %s", n ? ", " : "", k, mixer_name((MixerKind)k));
        return fail(ctx, "layer %d: mixer kind %u is not one this build knows (%s); a newer attn.c may read it", i, mixer, known);
    }
    if (mixer_size != mixer_sizes[mixer])
        return fail(ctx, "layer %d: %s record is %u bytes, this build reads %u", i, mixer_name((MixerKind)mixer), mixer_size,
                    mixer_sizes[mixer]);
    if ((uint64_t)LAYER_HEADER_SIZE + mixer_size + 8 > size) return fail(ctx, "layer %d: mixer record runs past the layer record", i);
    l->mixer = (MixerKind)mixer;
    if (parse_mixer(ctx, c, l, p + LAYER_HEADER_SIZE, i)) return -1;
    cur.p = p + LAYER_HEADER_SIZE + mixer_size;
    uint32_t ffn = next_u32(&cur), ffn_size = next_u32(&cur);
    static const uint32_t ffn_sizes[FFN_KIND_COUNT] = {0, DENSE_RECORD_SIZE, DENSE_RECORD_SIZE, MOE_RECORD_SIZE,
                                                       RWKV_FFN_RECORD_SIZE};
    static const char *ffn_names[FFN_KIND_COUNT] = {"no FFN", "gated FFN", "plain FFN", "mixture of experts",
                                                    "rwkv channel mix"};
    if (ffn >= FFN_KIND_COUNT)
        return fail(ctx, "layer %d: FFN kind %u is not one this build knows (0 .. %d); a newer attn.c may read it", i, ffn,
                    FFN_KIND_COUNT - 1);
    if (ffn_size != ffn_sizes[ffn])
        return fail(ctx, "layer %d: %s record is %u bytes, this build reads %u", i, ffn_names[ffn], ffn_size, ffn_sizes[ffn]);
    uint64_t end = (uint64_t)LAYER_HEADER_SIZE + mixer_size + 8 + ffn_size;
    if (end > size || size - end >= 8) return fail(ctx, "layer %d: record size %u does not match its parts (%llu bytes)", i,
                                                   size, (unsigned long long)end);
    l->ffn_kind = (FfnKind)ffn;
    if (ffn != FFN_NONE && parse_ffn(ctx, &l->ffn, (int)ffn, cur.p, i)) return -1;
    if (ffn == FFN_NONE) memset(&l->ffn, 0, sizeof l->ffn);
    return size;
}
#undef CHECK

AttentionSpec attention_of_layer(const Model *m, int layer) {
    const LayerConfig *l = &m->config.layers[layer];
    const AttentionConfig *a = &l->attn;
    if (l->mixer == MIXER_LATENT_ATTENTION) { /* full causal attention; head_dim is the q.k width */
        AttentionSpec s = {l->mla.nope_dim + l->mla.rope.dim, l->mla.scale, 0.0f, MASK_CAUSAL, 0, 0, NULL, KERNEL_NAIVE,
                           LATENT_AUTO, KV_F32};
        return s;
    }
    AttentionSpec s = {a->head_dim, a->scale, a->softcap, MASK_CAUSAL, 0, 0, NULL, KERNEL_NAIVE, LATENT_AUTO, KV_F32};
    if (a->window) s.mask = MASK_SLIDING, s.span = a->window;
    if (a->chunk) s.mask = MASK_CHUNKED, s.span = a->chunk;
    if (a->flags & ATTN_SINKS) s.sink_logits = m->weights.layers[layer].attn.sinks.data;
    return s;
}

/* One entry of the tensor directory, checked against the file. */
typedef struct {
    char name[TENSOR_NAME_SIZE];
    DType dtype;
    int ndim;
    uint32_t shape[4];
    uint64_t offset, nbytes;
    int used;
} TensorEntry;

static int parse_tensor(LoadContext *ctx, TensorEntry *e, const unsigned char *p, int i, uint64_t data_off,
                        uint64_t file_size) {
    Cursor cur = {p};
    memcpy(e->name, cur.p, TENSOR_NAME_SIZE);
    cur.p += TENSOR_NAME_SIZE;
    if (!memchr(e->name, '\0', TENSOR_NAME_SIZE)) return fail(ctx, "tensor %d: name is not NUL-terminated", i);
    uint32_t dtype = next_u32(&cur), ndim = next_u32(&cur);
    for (int d = 0; d < 4; d++) e->shape[d] = next_u32(&cur);
    e->offset = next_u64(&cur);
    e->nbytes = next_u64(&cur);
    if (dtype >= DTYPE_COUNT) return fail(ctx, "tensor '%s' has unknown dtype %u", e->name, dtype);
    if (ndim < 1 || ndim > 3) return fail(ctx, "tensor '%s' has %u dimensions (1, 2 or 3 expected)", e->name, ndim);
    for (uint32_t d = 0; d < ndim; d++)
        if (e->shape[d] == 0 || e->shape[d] > MAX_CONTEXT)
            return fail(ctx, "tensor '%s' has dimension %u of size %u", e->name, d, e->shape[d]);
    e->dtype = (DType)dtype;
    e->ndim = (int)ndim;
    /* a 3-D tensor is a stack of shape[0] matrices [shape[1]][shape[2]], each starting 64-byte aligned */
    uint64_t stack = ndim == 3 ? e->shape[0] : 1, cols = e->shape[ndim - 1];
    uint64_t rows = ndim == 1 ? 1 : e->shape[ndim - 2];
    uint64_t one = tensor_nbytes(e->dtype, rows, cols), need = ndim == 3 ? stack * tensor_stack_stride(e->dtype, rows, cols) : one;
    if (one == 0)
        return fail(ctx, "tensor '%s' is %s but its %llu columns are not a multiple of %d", e->name,
                    dtype_name(e->dtype), (unsigned long long)cols, dtype_column_multiple(e->dtype));
    if (e->nbytes != need)
        return fail(ctx, "tensor '%s' has %llu bytes, its shape and dtype need %llu", e->name,
                    (unsigned long long)e->nbytes, (unsigned long long)need);
    if (e->offset % DATA_ALIGN || e->offset < data_off)
        return fail(ctx, "tensor '%s' offset %llu is not a %d-aligned offset in the data section", e->name,
                    (unsigned long long)e->offset, DATA_ALIGN);
    if (e->offset > file_size || e->nbytes > file_size - e->offset)
        return fail(ctx, "tensor '%s' extends past end of file (offset %llu, size %llu, file %llu)", e->name,
                    (unsigned long long)e->offset, (unsigned long long)e->nbytes, (unsigned long long)file_size);
    return 0;
}

typedef struct {
    LoadContext *ctx;
    const unsigned char *map;
    TensorEntry *entries;
    int n;
} Directory;

static int by_name(const void *a, const void *b) {
    return strcmp(((const TensorEntry *)a)->name, ((const TensorEntry *)b)->name);
}

/* Sorts the directory by name so each lookup is a binary search; a name listed twice is an error. */
static int index_directory(Directory *d) {
    qsort(d->entries, (size_t)d->n, sizeof *d->entries, by_name);
    for (int i = 1; i < d->n; i++)
        if (strcmp(d->entries[i - 1].name, d->entries[i].name) == 0)
            return fail(d->ctx, "tensor '%s' appears twice", d->entries[i].name);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * the tensor table (tensors.def): which tensors each part of the model has, and their shapes */

enum { PART_MODEL = 1, PART_LAYER = 2, PART_ATTENTION = 4, PART_GATED = 8, PART_PLAIN = 16, PART_MOE = 32, PART_LATENT = 64,
       PART_MAMBA = 128, PART_MAMBA2 = 256, PART_DELTANET = 512, PART_RWKV = 1024, PART_RWKV_FFN = 2048 };
enum { STORAGE_MATRIX, STORAGE_F32 };
/* the dimensions a table row can name */
enum { DIM_NONE, DIM_DIM, DIM_VOCAB, DIM_CONTEXT, DIM_Q_DIM, DIM_KV_DIM, DIM_HEAD_DIM, DIM_N_HEADS, DIM_HIDDEN,
       DIM_N_EXPERTS, DIM_EXPERTS, DIM_SHARED_HIDDEN, DIM_LATENT_Q, DIM_Q_RANK, DIM_KV_RANK, DIM_LATENT_KV_A,
       DIM_LATENT_HEADS, DIM_NOPE, DIM_V_DIM, DIM_LATENT_OUT, DIM_INNER, DIM_STATE, DIM_CONV, DIM_CONV_DIM, DIM_DT_RANK,
       DIM_SSM_HEADS, DIM_SSM_HEAD_DIM };

typedef struct {
    int part;
    const char *name;
    size_t field; /* offset of its Tensor in Weights (model rows) or LayerWeights (per-layer rows) */
    int dims[3];
    int storage;
    unsigned needs, unless;
} TensorRow;

/* the C spelling of the table's names */
#define MODEL PART_MODEL
#define LAYER PART_LAYER
#define ATTENTION PART_ATTENTION
#define GATED PART_GATED
#define PLAIN PART_PLAIN
#define MOE PART_MOE
#define LATENT PART_LATENT
#define MAMBA PART_MAMBA
#define MAMBA2 PART_MAMBA2
#define DELTANET PART_DELTANET
#define RWKV PART_RWKV
#define RWKV_FFN PART_RWKV_FFN
#define MATRIX STORAGE_MATRIX
#define F32 STORAGE_F32
#define DIM DIM_DIM
#define VOCAB DIM_VOCAB
#define CONTEXT DIM_CONTEXT
#define Q_DIM DIM_Q_DIM
#define KV_DIM DIM_KV_DIM
#define HEAD_DIM DIM_HEAD_DIM
#define N_HEADS DIM_N_HEADS
#define HIDDEN DIM_HIDDEN
#define N_EXPERTS DIM_N_EXPERTS
#define EXPERTS DIM_EXPERTS
#define SHARED_HIDDEN DIM_SHARED_HIDDEN
#define LATENT_Q DIM_LATENT_Q
#define Q_RANK DIM_Q_RANK
#define KV_RANK DIM_KV_RANK
#define LATENT_KV_A DIM_LATENT_KV_A
#define LATENT_HEADS DIM_LATENT_HEADS
#define NOPE DIM_NOPE
#define V_DIM DIM_V_DIM
#define LATENT_OUT DIM_LATENT_OUT
#define INNER DIM_INNER
#define STATE DIM_STATE
#define CONV DIM_CONV
#define CONV_DIM DIM_CONV_DIM
#define DT_RANK DIM_DT_RANK
#define SSM_HEADS DIM_SSM_HEADS
#define SSM_HEAD_DIM DIM_SSM_HEAD_DIM
#define MODEL_TENSOR(part, name, field, d0, d1, d2, storage, needs, unless) \
    {part, name, offsetof(Weights, field), {d0, d1, d2}, storage, needs, unless},
#define TENSOR(part, name, field, d0, d1, d2, storage, needs, unless) \
    {part, name, offsetof(LayerWeights, field), {d0, d1, d2}, storage, needs, unless},
static const TensorRow TENSOR_TABLE[] = {
#include "tensors.def"
};
#undef MODEL_TENSOR
#undef TENSOR
#undef MODEL
#undef LAYER
#undef ATTENTION
#undef GATED
#undef PLAIN
#undef MOE
#undef LATENT
#undef MAMBA
#undef MAMBA2
#undef DELTANET
#undef RWKV
#undef RWKV_FFN
#undef MATRIX
#undef F32
#undef DIM
#undef VOCAB
#undef CONTEXT
#undef Q_DIM
#undef KV_DIM
#undef HEAD_DIM
#undef N_HEADS
#undef HIDDEN
#undef N_EXPERTS
#undef EXPERTS
#undef SHARED_HIDDEN
#undef LATENT_Q
#undef Q_RANK
#undef KV_RANK
#undef LATENT_KV_A
#undef LATENT_HEADS
#undef NOPE
#undef V_DIM
#undef LATENT_OUT
#undef INNER
#undef STATE
#undef CONV
#undef CONV_DIM
#undef DT_RANK
#undef SSM_HEADS
#undef SSM_HEAD_DIM
#define N_TENSOR_ROWS ((int)(sizeof TENSOR_TABLE / sizeof *TENSOR_TABLE))

static int dim_value(int d, const Config *c, const LayerConfig *l) {
    switch (d) {
    case DIM_DIM: return c->dim;
    case DIM_VOCAB: return c->vocab_size;
    case DIM_CONTEXT: return c->context_length;
    case DIM_Q_DIM: return l->attn.n_heads * l->attn.head_dim;
    case DIM_KV_DIM: return l->attn.n_kv_heads * l->attn.head_dim;
    case DIM_HEAD_DIM: return l->attn.head_dim;
    case DIM_N_HEADS: return l->attn.n_heads;
    case DIM_HIDDEN: return l->ffn.hidden;
    case DIM_N_EXPERTS:
    case DIM_EXPERTS: return l->ffn.n_experts;
    case DIM_SHARED_HIDDEN: return l->ffn.shared_hidden;
    case DIM_LATENT_Q: return l->mla.n_heads * (l->mla.nope_dim + l->mla.rope.dim);
    case DIM_Q_RANK: return l->mla.q_rank;
    case DIM_KV_RANK: return l->mla.kv_rank;
    case DIM_LATENT_KV_A: return l->mla.kv_rank + l->mla.rope.dim;
    case DIM_LATENT_HEADS: return l->mla.n_heads;
    case DIM_NOPE: return l->mla.nope_dim;
    case DIM_V_DIM: return l->mla.v_dim;
    case DIM_LATENT_OUT: return l->mla.n_heads * l->mla.v_dim;
    case DIM_INNER: return recurrent_dims(l).inner;
    case DIM_STATE: return recurrent_dims(l).state;
    case DIM_CONV: return recurrent_dims(l).conv;
    case DIM_CONV_DIM: return recurrent_dims(l).conv_dim;
    case DIM_DT_RANK: return recurrent_dims(l).dt_rank;
    case DIM_SSM_HEADS: return recurrent_dims(l).heads;
    case DIM_SSM_HEAD_DIM: return recurrent_dims(l).head_dim;
    default: return 0;
    }
}

/* The parts a layer is made of, and the flag bits that say which optional tensors it has */
static int parts_of(const LayerConfig *l) {
    static const int ffn_parts[FFN_KIND_COUNT] = {0, PART_GATED, PART_PLAIN, PART_MOE, PART_RWKV_FFN};
    static const int mixer_parts[MIXER_KIND_COUNT] = {[MIXER_ATTENTION] = PART_ATTENTION, [MIXER_LATENT_ATTENTION] = PART_LATENT,
                                                      [MIXER_MAMBA] = PART_MAMBA,
                                                      [MIXER_MAMBA2] = PART_MAMBA2, [MIXER_GATED_DELTANET] = PART_DELTANET,
                                                      [MIXER_RWKV] = PART_RWKV};
    return PART_LAYER | mixer_parts[l->mixer] | ffn_parts[l->ffn_kind];
}
/* The flags of the layer's mixer record */
static unsigned mixer_flags(const LayerConfig *l) {
    switch (l->mixer) {
    case MIXER_ATTENTION: return l->attn.flags;
    case MIXER_LATENT_ATTENTION: return l->mla.flags;
    case MIXER_MAMBA: return l->mamba.flags;
    case MIXER_MAMBA2: return l->mamba2.flags;
    case MIXER_GATED_DELTANET: return l->deltanet.flags;
    default: return 0;
    }
}
static unsigned model_present(const Config *c) {
    return c->flags | (c->norm_kind == NORM_LAYER ? PRESENT_LAYERNORM : 0u) |
           (c->position_kind == POS_LEARNED ? PRESENT_LEARNED_POSITIONS : 0u);
}
static unsigned present_bits(const Config *c, const LayerConfig *l) {
    return model_present(c) | l->flags | mixer_flags(l) | l->ffn.flags;
}
static int row_present(const TensorRow *r, int parts, unsigned bits) {
    return (r->part & parts) && (bits & r->needs) == r->needs && !(bits & r->unless);
}

/* Binds the tensor a table row asks for: present, with its shape; F32 rows must be f32. */
static int bind(Directory *d, const TensorRow *row, Tensor *t, const Config *c, const LayerConfig *l, int layer) {
    TensorEntry key;
    if (layer < 0) snprintf(key.name, sizeof key.name, "%s", row->name);
    else snprintf(key.name, sizeof key.name, "layers.%d.%s", layer, row->name);
    const char *name = key.name;
    TensorEntry *e = bsearch(&key, d->entries, (size_t)d->n, sizeof *d->entries, by_name);
    if (!e) return fail(d->ctx, "tensor '%s' is missing", name);
    int want[3] = {0, 0, 0}, ndim = 0;
    for (; ndim < 3 && row->dims[ndim] != DIM_NONE; ndim++) want[ndim] = dim_value(row->dims[ndim], c, l);
    int same = e->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = e->shape[i] == (uint32_t)want[i];
    if (!same) {
        char shape[64];
        int n = snprintf(shape, sizeof shape, "[%d", want[0]);
        for (int i = 1; i < ndim; i++) n += snprintf(shape + n, sizeof shape - (size_t)n, ", %d", want[i]);
        return fail(d->ctx, "tensor '%s' should have shape %s]", name, shape);
    }
    if (row->storage == STORAGE_F32 && e->dtype != DTYPE_F32) return fail(d->ctx, "tensor '%s' must be f32", name);
    e->used = 1;
    t->data = d->map + e->offset;
    t->dtype = e->dtype;
    t->stack = ndim == 3 ? want[0] : 1;
    t->rows = ndim == 1 ? 1 : want[ndim - 2];
    t->cols = want[ndim - 1];
    return 0;
}

static int bind_part(Directory *d, const Config *c, int layer, void *weights) {
    const LayerConfig *l = layer >= 0 ? &c->layers[layer] : NULL;
    static const LayerConfig none; /* model-wide rows name no layer dimension */
    int parts = l ? parts_of(l) : PART_MODEL;
    unsigned bits = l ? present_bits(c, l) : model_present(c);
    for (int i = 0; i < N_TENSOR_ROWS; i++)
        if (row_present(&TENSOR_TABLE[i], parts, bits) &&
            bind(d, &TENSOR_TABLE[i], (Tensor *)((char *)weights + TENSOR_TABLE[i].field), c, l ? l : &none, layer))
            return -1;
    return 0;
}

/* The rotary settings of a layer's mixer (either kind of attention) */
static const RopeConfig *rope_of(const LayerConfig *l) {
    return l->mixer == MIXER_LATENT_ATTENTION ? &l->mla.rope : &l->attn.rope;
}

/* The precomputed rope tables (rope_inv_freq.N, linear / llama3 / YaRN scaling), shared by the layers that
 * name them; every other rotary layer gets theta^(-2i/dim) computed here. */
static int bind_rope(Directory *d, Model *m) {
    Config *c = &m->config;
    Weights *w = &m->weights;
    for (int l = 0; l < c->n_layers; l++) { /* frequencies from rope_theta; layers with a table point at it below */
        const RopeConfig *r = rope_of(&c->layers[l]);
        w->layers[l].rope_inv_freq = w->rope_computed + (size_t)l * (MAX_HEAD_DIM / 2);
        if (r->dim > 0 && r->table < 0)
            rope_frequencies(w->rope_computed + (size_t)l * (MAX_HEAD_DIM / 2), r->theta, r->dim);
    }
    for (int i = 0; i < c->n_rope_tables; i++) {
        /* every layer that uses table i must agree on its length */
        int len = -1;
        for (int l = 0; l < c->n_layers; l++)
            if (rope_of(&c->layers[l])->table == i) {
                if (len >= 0 && len != rope_of(&c->layers[l])->dim / 2)
                    return fail(d->ctx, "rope table %d is shared by layers with different rope_dim", i);
                len = rope_of(&c->layers[l])->dim / 2;
            }
        if (len <= 0) return fail(d->ctx, "rope table %d is not used by any layer with rotary dimensions", i);
        TensorEntry key;
        snprintf(key.name, sizeof key.name, "rope_inv_freq.%d", i);
        TensorEntry *e = bsearch(&key, d->entries, (size_t)d->n, sizeof *d->entries, by_name);
        if (!e) return fail(d->ctx, "tensor '%s' is missing", key.name);
        if (e->ndim != 1 || e->shape[0] != (uint32_t)len) return fail(d->ctx, "tensor '%s' should have shape [%d]", key.name, len);
        if (e->dtype != DTYPE_F32) return fail(d->ctx, "tensor '%s' must be f32", key.name);
        e->used = 1;
        for (int l = 0; l < c->n_layers; l++)
            if (rope_of(&c->layers[l])->table == i) w->layers[l].rope_inv_freq = (const float *)(d->map + e->offset);
    }
    return 0;
}

static int bind_weights(Directory *d, Model *m) {
    Config *c = &m->config;
    Weights *w = &m->weights;
    w->layers = calloc((size_t)c->n_layers, sizeof *w->layers);
    w->rope_computed = calloc((size_t)c->n_layers * (MAX_HEAD_DIM / 2), sizeof *w->rope_computed);
    if (!w->layers || !w->rope_computed) return fail(d->ctx, "out of memory");
    if (bind_part(d, c, -1, w) || bind_rope(d, m)) return -1;
    for (int l = 0; l < c->n_layers; l++)
        if (bind_part(d, c, l, &w->layers[l])) return -1;
    if (c->flags & MODEL_TIED_EMBEDDINGS) w->output = w->tok_embeddings;
    for (int i = 0; i < d->n; i++)
        if (!d->entries[i].used) return fail(d->ctx, "tensor '%s' is not used by this config", d->entries[i].name);
    m->weight_dtype = c->layers[0].mixer == MIXER_ATTENTION ? w->layers[0].attn.wq.dtype : w->layers[0].mla.wkv_a.dtype;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * whole-file checks: every byte belongs to one structure, tables hold usable numbers, the run fits */

/* A stretch of the file that one structure claims: a section or a tensor's data. */
typedef struct {
    uint64_t start, end;
    const char *what; /* "header", "config", ... or a tensor's name */
    int is_tensor;
} FileRange;

static int by_start(const void *a, const void *b) {
    const FileRange *x = a, *y = b;
    return (x->start > y->start) - (x->start < y->start);
}

/* Every byte of the file belongs to exactly one section or tensor, apart from the padding before an
 * aligned start (fewer than DATA_ALIGN bytes). Two tensors that share bytes would let a small file stand
 * for huge matrices (and the memory the config implies); bytes no tensor claims are a file larger than
 * its contents (a sparse tail the prefault would read in). */
static int check_file_layout(LoadContext *ctx, const FileRange *sections, int n_sections, const TensorEntry *entries,
                             int n_tensors, uint64_t file_size) {
    int n = 0;
    FileRange *r = malloc((size_t)(n_sections + n_tensors) * sizeof *r);
    if (!r) return fail(ctx, "out of memory");
    for (int i = 0; i < n_sections; i++)
        if (sections[i].end > sections[i].start) r[n++] = sections[i];
    for (int i = 0; i < n_tensors; i++)
        r[n++] = (FileRange){entries[i].offset, entries[i].offset + entries[i].nbytes, entries[i].name, 1};
    qsort(r, (size_t)n, sizeof *r, by_start);
    int bad = 0;
    uint64_t covered = 0; /* every byte before this belongs to r[0 .. i-1] or is padding */
    for (int i = 0; i < n && !bad; i++) {
        if (i > 0 && r[i].start < r[i - 1].end)
            bad = r[i].is_tensor && r[i - 1].is_tensor
                      ? fail(ctx, "tensors '%s' and '%s' share bytes (offsets %llu and %llu): tensors may not overlap",
                             r[i - 1].what, r[i].what, (unsigned long long)r[i - 1].start, (unsigned long long)r[i].start)
                      : fail(ctx, "%s%s%s overlaps %s%s%s (offsets %llu and %llu)", r[i - 1].is_tensor ? "tensor '" : "the ",
                             r[i - 1].what, r[i - 1].is_tensor ? "'" : " section", r[i].is_tensor ? "tensor '" : "the ",
                             r[i].what, r[i].is_tensor ? "'" : " section", (unsigned long long)r[i - 1].start,
                             (unsigned long long)r[i].start);
        else if (r[i].start - covered >= DATA_ALIGN)
            bad = fail(ctx, "bytes %llu .. %llu belong to no section or tensor (only padding shorter than %d bytes may)",
                       (unsigned long long)covered, (unsigned long long)r[i].start - 1, DATA_ALIGN);
        covered = r[i].end;
    }
    if (!bad && file_size - covered >= DATA_ALIGN)
        bad = fail(ctx, "bytes %llu .. %llu at the end belong to no tensor (only padding shorter than %d bytes may)",
                   (unsigned long long)covered, (unsigned long long)file_size - 1, DATA_ALIGN);
    free(r);
    return bad ? -1 : 0;
}

/* The precomputed RoPE tables (rope_inv_freq.N) hold inverse frequencies: each finite and positive. A NaN
 * or an infinity there (a rope scaling factor of 0 or NaN in the checkpoint) makes every rotated query and
 * key NaN or zero. */
static int check_rope_tables(LoadContext *ctx, const Model *m) {
    const Config *c = &m->config;
    for (int l = 0; l < c->n_layers; l++) {
        const RopeConfig *r = rope_of(&c->layers[l]);
        if (r->dim == 0 || r->table < 0) continue;
        const float *f = m->weights.layers[l].rope_inv_freq;
        for (int i = 0; i < r->dim / 2; i++)
            if (!(f[i] > 0.0f) || !isfinite(f[i]))
                return fail(ctx, "rope table %d (layer %d) holds %g at %d: inverse frequencies must be finite and positive",
                            r->table, l, f[i], i);
    }
    return 0;
}

/* A window (or a chunk) that covers the whole context hides nothing: the layer is full attention, and
 * positions stop at the context as in any layer that sees every position. */
static void normalize_windows(Config *c) {
    for (int l = 0; l < c->n_layers; l++) {
        AttentionConfig *a = &c->layers[l].attn;
        if (a->window >= c->context_length) a->window = 0;
        if (a->chunk >= c->context_length) a->chunk = 0;
    }
}

/* The weights stay in the mapped file (no copy). Once the file has passed every check, map all of its pages
 * in now, so that the first forward pass does not take ~one page fault per 4 KiB of weights. Advisory: if
 * the kernel cannot, pages are faulted in as they are first read. */
static void prefault(const void *data, size_t size) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), start = (uintptr_t)data / page * page;
#ifdef MADV_POPULATE_READ
    if (madvise((void *)start, (uintptr_t)data + size - start, MADV_POPULATE_READ) == 0) return;
#endif
    madvise((void *)start, (uintptr_t)data + size - start, MADV_WILLNEED);
}

/* Whether p[0 .. size) begins like a llama2.c version-0 checkpoint: 7 int32 (dim, hidden, layers, heads, kv heads,
 * vocab (negative: own classifier), context) that make sense, and exactly the bytes their float32 arrays take. */
static int looks_like_llama2c_legacy(const unsigned char *p, uint64_t size) {
    if (size < 28) return 0;
    int64_t v[7];
    for (int i = 0; i < 7; i++) v[i] = (int32_t)u32_at(p + 4 * i);
    int64_t dim = v[0], hidden = v[1], layers = v[2], heads = v[3], kv = v[4], vocab = v[5] < 0 ? -v[5] : v[5], ctx = v[6];
    for (int i = 0; i < 7; i++)
        if ((i == 5 ? vocab : v[i]) <= 0 || (i == 5 ? vocab : v[i]) > (1 << 22)) return 0;
    if (dim % heads || heads % kv || layers > 4096) return 0;
    int64_t head = dim / heads, kv_dim = kv * head;
    uint64_t floats = (uint64_t)vocab * dim * (v[5] < 0 ? 2 : 1) + (uint64_t)layers * (2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * dim * hidden) +
                      (uint64_t)dim + (uint64_t)ctx * head;
    return 28 + 4 * floats == size;
}

/* What a file that is not an attn.c model is, and how to convert it: "" when it is none of those. */
static const char *foreign_format(const unsigned char *p, uint64_t size) {
    if (size >= 4 && memcmp(p, "GGUF", 4) == 0) return "a GGUF file (llama.cpp)";
    if (size >= 8 && memcmp(p, "24ka", 4) == 0) return "a llama2.c checkpoint (version 1 or 2)";
    if (looks_like_llama2c_legacy(p, size)) return "a llama2.c checkpoint (version 0)";
    return "";
}

/* Parses and validates a whole model file held in memory at p[0 .. size). The weights point into p. */
static int parse_model(LoadContext *ctx, Model *m, const unsigned char *p, uint64_t file_size) {
    if (file_size >= 4 && memcmp(p, MODEL_MAGIC, 4) != 0) {
        const char *foreign = foreign_format(p, file_size);
        if (*foreign)
            return fail(ctx, "%s, not an attn.c model file: convert it with `python3 export.py %s out.bin`", foreign, ctx->path);
        if (file_size >= 9 && p[8] == '{' && u64_at(p) <= file_size - 8)
            return fail(ctx, "a safetensors file, not an attn.c model file: convert the model's directory with "
                             "`python3 export.py MODEL_DIR out.bin`");
    }
    if (file_size < HEADER_SIZE)
        return fail(ctx, "too short for a model file (%llu bytes, the header alone is %d)", (unsigned long long)file_size,
                    HEADER_SIZE);

    /* header */
    if (memcmp(p, MODEL_MAGIC, 4) != 0) return fail(ctx, "not an attn.c model file (bad magic)");
    uint32_t version = u32_at(p + 4);
    if (version != MODEL_VERSION)
        return fail(ctx, "file format version %u, this build reads version %d (re-export it with export.py)", version,
                    MODEL_VERSION);
    uint64_t declared = u64_at(p + 8), config_off = u64_at(p + 16), config_size = u64_at(p + 24);
    uint64_t layers_off = u64_at(p + 32), tok_off = u64_at(p + 48), tok_size = u64_at(p + 56);
    uint32_t n_layers = u32_at(p + 40), layers_size = u32_at(p + 44), n_tensors = u32_at(p + 72), tensor_rec = u32_at(p + 76);
    uint64_t tensors_off = u64_at(p + 64), data_off = u64_at(p + 80), data_size = u64_at(p + 88);
    uint64_t chat_off = u64_at(p + 96), chat_size = u64_at(p + 104);
    Config *c = &m->config;
    if (declared != file_size)
        return fail(ctx, "header says %llu bytes but the file has %llu (truncated or padded?)",
                    (unsigned long long)declared, (unsigned long long)file_size);
    if (config_size != CONFIG_SIZE)
        return fail(ctx, "config record is %llu bytes (expected %d)", (unsigned long long)config_size, CONFIG_SIZE);
    if (tensor_rec != TENSOR_RECORD_SIZE)
        return fail(ctx, "tensor records are %u bytes (expected %d)", tensor_rec, TENSOR_RECORD_SIZE);
    if (in_range(ctx, "n_layers", n_layers, 1, MAX_LAYERS) || in_range(ctx, "n_tensors", n_tensors, 1, MAX_TENSORS) ||
        in_range(ctx, "layers section size", layers_size, (long long)n_layers * (LAYER_HEADER_SIZE + 8),
                 (long long)n_layers * MAX_LAYER_RECORD) ||
        check_section(ctx, "config", config_off, CONFIG_SIZE, file_size) ||
        check_section(ctx, "layers", layers_off, layers_size, file_size) ||
        check_section(ctx, "tokenizer", tok_off, tok_size, file_size) ||
        check_section(ctx, "tensor directory", tensors_off, (uint64_t)n_tensors * TENSOR_RECORD_SIZE, file_size) ||
        check_section(ctx, "data", data_off, data_size, file_size))
        return -1;
    if (data_off % DATA_ALIGN || data_off + data_size != file_size)
        return fail(ctx, "data section (offset %llu, size %llu) is not aligned or does not end the file",
                    (unsigned long long)data_off, (unsigned long long)data_size);
    if (tensors_off + (uint64_t)n_tensors * TENSOR_RECORD_SIZE > data_off)
        return fail(ctx, "tensor directory overlaps the data section");
    if (chat_size == 0 && chat_off != 0)
        return fail(ctx, "chat section has offset %llu but size 0 (0 and 0 mean no chat template)", (unsigned long long)chat_off);
    if (chat_size && check_section(ctx, "chat", chat_off, chat_size, file_size)) return -1;
    if (chat_size && chat_off + chat_size > data_off) return fail(ctx, "chat section overlaps the data section");

    /* config and layer records */
    c->n_layers = (int)n_layers;
    c->layers = calloc(n_layers, sizeof *c->layers);
    if (!c->layers) return fail(ctx, "out of memory");
    if (parse_config(ctx, c, p + config_off)) return -1;
    uint64_t at = 0;
    for (int i = 0; i < c->n_layers; i++) {
        long size = parse_layer(ctx, c, &c->layers[i], p + layers_off + at, layers_size - at, i);
        if (size < 0) return -1;
        at += (uint64_t)size;
    }
    if (at != layers_size)
        return fail(ctx, "layer records take %llu bytes, the header says %u", (unsigned long long)at, layers_size);
    normalize_windows(c);

    /* tensor directory, then bind what the config asks for */
    TensorEntry *entries = calloc(n_tensors, sizeof *entries);
    if (!entries) return fail(ctx, "out of memory");
    Directory dir = {ctx, p, entries, (int)n_tensors};
    int bad = 0;
    for (uint32_t i = 0; i < n_tensors && !bad; i++)
        bad = parse_tensor(ctx, &entries[i], p + tensors_off + (uint64_t)i * TENSOR_RECORD_SIZE, (int)i, data_off,
                           file_size);
    FileRange sections[] = {{0, HEADER_SIZE, "header", 0}, {config_off, config_off + CONFIG_SIZE, "config", 0},
                            {layers_off, layers_off + layers_size, "layers", 0},
                            {tok_off, tok_off + tok_size, "tokenizer", 0}, {chat_off, chat_off + chat_size, "chat", 0},
                            {tensors_off, tensors_off + (uint64_t)n_tensors * TENSOR_RECORD_SIZE, "tensor directory", 0}};
    if (!bad) bad = check_file_layout(ctx, sections, 6, entries, (int)n_tensors, file_size);
    if (!bad) bad = index_directory(&dir);
    if (!bad) bad = bind_weights(&dir, m);
    if (!bad) bad = check_rope_tables(ctx, m);
    free(entries);
    if (bad) return -1;

    /* how each attention layer attends, as the file says (run.c may override it before runstate_init) */
    m->attention = calloc(n_layers, sizeof *m->attention);
    if (!m->attention) return fail(ctx, "out of memory");
    for (int i = 0; i < c->n_layers; i++) m->attention[i] = attention_of_layer(m, i);

    /* tokenizer */
    char tok_err[200];
    if (tokenizer_load(&m->tokenizer, p + tok_off, (size_t)tok_size, c->vocab_size, tok_err, sizeof tok_err) != 0)
        return fail(ctx, "%s", tok_err);
    if (chat_section_load(&m->chat, p + chat_off, (size_t)chat_size, tok_err, sizeof tok_err) != 0) return fail(ctx, "%s", tok_err);
    return 0;
}

/* Calls fn on every matrix the products read: each layer's tensors, and the output (tied or not; the token
 * embeddings are read a row at a time and stay as they are). Stops at the first that returns nonzero. */
static int for_each_projection(Model *m, int (*fn)(Model *m, Tensor *t)) {
    const Config *c = &m->config;
    for (int l = 0; l < c->n_layers && m->weights.layers; l++)
        for (int i = 0; i < N_TENSOR_ROWS; i++) {
            const TensorRow *r = &TENSOR_TABLE[i];
            if (r->part == PART_MODEL || !row_present(r, parts_of(&c->layers[l]), present_bits(c, &c->layers[l]))) continue;
            Tensor *t = (Tensor *)((char *)&m->weights.layers[l] + r->field);
            if (t->data && fn(m, t)) return -1;
        }
    return m->weights.output.data ? fn(m, &m->weights.output) : 0;
}

/* Packing (matmul_pack_into): every matrix the kernel reads packed goes into one huge_alloc, in two passes --
 * the bytes, then the copies -- so that the products stream 2 MiB pages (fewer TLB misses: decode of the 110M
 * shape in q8_0 measured ~7% faster). Where nothing reads them again (no AMX tiles: matmul_pack_replaces), the
 * copied matrices' pages of the mapped file are let go (MADV_DONTNEED: the kernel drops them, and would read
 * them back from the file if asked); with the tiles, prefill reads them. */
static size_t packed_size(const Tensor *t) { return (matmul_pack_bytes(t) + 63) / 64 * 64; }

static int count_packed(Model *m, Tensor *t) {
    m->packed_bytes += packed_size(t);
    return 0;
}

static int pack_projection(Model *m, Tensor *t) {
    size_t bytes = packed_size(t);
    if (bytes == 0) return 0;
    matmul_pack_into(t, (char *)m->packed + m->packed_used);
    m->packed_used += bytes;
    if (!m->map || !matmul_pack_replaces()) return 0;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), from = ((uintptr_t)t->data + page - 1) / page * page;
    uintptr_t to = ((uintptr_t)t->data + (size_t)(t->stack > 1 ? t->stack : 1) *
                    tensor_stack_stride(t->dtype, (uint64_t)t->rows, (uint64_t)t->cols)) / page * page;
    if (to > from) madvise((void *)from, to - from, MADV_DONTNEED);
    return 0;
}

static int unpack_projection(Model *m, Tensor *t) {
    (void)m;
    t->packed = NULL;
    return 0;
}

/* the projections packed for this machine's kernel, once every check has passed */
static int pack_weights(LoadContext *ctx, Model *m) {
    m->packed_bytes = m->packed_used = 0;
    for_each_projection(m, count_packed);
    if (m->packed_bytes == 0) return 0;
    if (!(m->packed = huge_alloc(m->packed_bytes))) return fail(ctx, "out of memory packing the weights");
    return for_each_projection(m, pack_projection);
}

int model_load_buffer(Model *m, const void *data, size_t size, const char *name, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    LoadContext ctx = {name, err, errlen};
    m->file_size = size;
    if (parse_model(&ctx, m, data, size) != 0 || pack_weights(&ctx, m) != 0) {
        model_free(m);
        return -1;
    }
    return 0;
}

int model_load(Model *m, const char *path, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    LoadContext ctx = {path, err, errlen};
    /* O_NONBLOCK: opening a FIFO for reading would wait for a writer; it is refused below as not a regular file */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return fail(&ctx, "cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fail(&ctx, "not a regular file");
    }
    uint64_t file_size = (uint64_t)st.st_size;
    if (file_size < HEADER_SIZE) { /* also keeps an empty file away from mmap */
        close(fd);
        return fail(&ctx, "too short for a model file (%llu bytes, the header alone is %d)",
                    (unsigned long long)file_size, HEADER_SIZE);
    }
    if (file_size > SIZE_MAX) {
        close(fd);
        return fail(&ctx, "too large to map (%llu bytes)", (unsigned long long)file_size);
    }
    void *map = mmap(NULL, (size_t)file_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return fail(&ctx, "cannot map: %s", strerror(errno));
    m->map = map;
    m->file_size = (size_t)file_size;
    if (parse_model(&ctx, m, map, file_size) != 0) {
        model_free(m);
        return -1;
    }
    uint64_t data_off = u64_at(map + 80); /* every byte of the data section belongs to a tensor (check_file_layout) */
    prefault((const unsigned char *)map + data_off, (size_t)(file_size - data_off)); /* every check passed: bring the weights in now */
    if (pack_weights(&ctx, m) != 0) {
        model_free(m);
        return -1;
    }
    return 0;
}

/* 1 if an element of one matrix (rows x cols) holds an infinity or a NaN (all exponent bits set); q8_0 / q4_0:
 * in its scales, the integer values are always finite */
static int matrix_has_nonfinite(const unsigned char *data, DType dtype, uint64_t rows, uint64_t cols) {
    uint64_t count = rows * cols;
    if (dtype == DTYPE_F32) {
        for (uint64_t i = 0; i < count; i++)
            if ((u32_at(data + 4 * i) & 0x7F800000u) == 0x7F800000u) return 1;
        return 0;
    }
    if (dtype == DTYPE_Q8_0) data += count, count /= Q8_GROUP;
    if (dtype == DTYPE_Q4_0) data += count / 2, count /= Q8_GROUP;
    uint16_t mask = dtype == DTYPE_BF16 ? 0x7F80 : 0x7C00;
    for (uint64_t i = 0; i < count; i++)
        if (((data[2 * i] | data[2 * i + 1] << 8) & mask) == mask) return 1;
    return 0;
}

/* The same for a tensor: a vector, a matrix, or a stack of matrices (tensor_stack_stride bytes apart) */
static int tensor_has_nonfinite(const unsigned char *data, const TensorEntry *e) {
    uint64_t stack = e->ndim == 3 ? e->shape[0] : 1, cols = e->shape[e->ndim - 1];
    uint64_t rows = e->ndim == 1 ? 1 : e->shape[e->ndim - 2], stride = tensor_stack_stride(e->dtype, rows, cols);
    for (uint64_t s = 0; s < stack; s++)
        if (matrix_has_nonfinite(data + s * stride, e->dtype, rows, cols)) return 1;
    return 0;
}

int model_find_nonfinite_tensor(const Model *m, char *name, size_t len) {
    if (!m->map) return 0;
    const unsigned char *p = m->map;
    uint64_t tensors_off = u64_at(p + 64), data_off = u64_at(p + 80);
    uint32_t n_tensors = u32_at(p + 72);
    char err[1];
    LoadContext quiet = {"", err, 0};
    for (uint32_t i = 0; i < n_tensors; i++) {
        TensorEntry e;
        if (parse_tensor(&quiet, &e, p + tensors_off + (uint64_t)i * TENSOR_RECORD_SIZE, (int)i, data_off, m->file_size))
            return 0;
        if (tensor_has_nonfinite(p + e.offset, &e)) {
            snprintf(name, len, "%s", e.name);
            make_printable(name);
            return 1;
        }
    }
    return 0;
}

void model_free(Model *m) {
    for_each_projection(m, unpack_projection);
    huge_free(m->packed, m->packed_bytes);
    tokenizer_free(&m->tokenizer);
    free(m->config.layers);
    free(m->attention);
    free(m->weights.rope_computed);
    free(m->weights.layers);
    if (m->map) munmap(m->map, m->file_size);
    memset(m, 0, sizeof *m);
}

/* Elements of a bound tensor, all of its stacked matrices */
static long long elements(const Tensor *t) {
    return t->data ? (long long)t->rows * t->cols * (t->stack > 1 ? t->stack : 1) : 0;
}

int mixer_heads(const LayerConfig *l) {
    return l->mixer == MIXER_ATTENTION ? l->attn.n_heads : l->mixer == MIXER_LATENT_ATTENTION ? l->mla.n_heads : 0;
}

void model_parameters(const Model *m, long long *total, long long *active) {
    const Config *c = &m->config;
    *total = *active = 0;
    for (int i = 0; i < N_TENSOR_ROWS; i++) {
        const TensorRow *r = &TENSOR_TABLE[i];
        if (r->part != PART_MODEL || !row_present(r, PART_MODEL, model_present(c))) continue;
        long long n = elements((const Tensor *)((const char *)&m->weights + r->field));
        *total += n, *active += n;
    }
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        for (int i = 0; i < N_TENSOR_ROWS; i++) {
            const TensorRow *r = &TENSOR_TABLE[i];
            if (r->part == PART_MODEL || !row_present(r, parts_of(lc), present_bits(c, lc))) continue;
            const Tensor *t = (const Tensor *)((const char *)&m->weights.layers[l] + r->field);
            long long n = elements(t);
            *total += n;
            *active += r->dims[0] == DIM_EXPERTS ? n / lc->ffn.n_experts * lc->ffn.top_k : n; /* top_k of the experts */
        }
    }
}

/* A layer's cache can stay bounded: a rolling buffer (sliding window, chunks) */
static int keeps_bounded_cache(const AttentionSpec *a) { return a->mask == MASK_SLIDING || a->mask == MASK_CHUNKED; }

int model_can_roll(const Model *m) {
    if (m->config.position_kind != POS_ROPE) return 0;
    for (int l = 0; l < m->config.n_layers; l++)
        if (!is_recurrent(&m->config.layers[l]) && !keeps_bounded_cache(&m->attention[l])) return 0;
    return 1;
}

/* ---------------------------------------------------------------------------------------------
 * run state */

/* The longest score row any layer needs: positions stop at the context, except in a model that rolls */
static int max_visible(const Model *m) {
    int most = 1, n_positions = m->config.context_length;
    for (int l = 0; l < m->config.n_layers; l++) {
        const AttentionSpec *a = &m->attention[l];
        if (is_recurrent(&m->config.layers[l])) continue;
        int n = a->mask == MASK_SLIDING ? a->n_sinks + a->span : most_visible(a, n_positions);
        if (n > most) most = n;
    }
    return most;
}

void layer_cache_init(KVLayer *cache, const Model *m, int l) {
    const LayerConfig *lc = &m->config.layers[l];
    if (lc->mixer == MIXER_LATENT_ATTENTION) /* one row per position: c_kv | k_rope */
        attention_cache_init(cache, lc->mla.kv_rank + lc->mla.rope.dim, 0, &m->attention[l]);
    else if (lc->mixer == MIXER_ATTENTION)
        attention_cache_init(cache, lc->attn.n_kv_heads * lc->attn.head_dim, lc->attn.n_kv_heads * lc->attn.head_dim,
                             &m->attention[l]);
    else /* a recurrent layer keeps a state (KVCache.states), no keys and values */
        kvlayer_init(cache, 0, 0, 0);
}

/* The widest rows of any layer: what the scratch buffers hold */
typedef struct {
    int q_dim, kv_dim, heads; /* attention: query (or heads' output) and kv rows, query heads */
    int hidden;               /* the widest FFN inner width (an expert's, a shared expert's) */
    int experts, top_k;       /* mixture of experts: the most experts, the most chosen per token */
    int mixer_input;          /* the widest input of a recurrent mixer's own products */
    size_t mixer_scratch;     /* floats of the recurrent mixers' work space for max_tokens tokens */
} Widths;

static Widths widest_layer(const Config *c, int max_tokens) {
    Widths w = {0, 1, 0, 1, 0, 0, 0, 0}; /* kv_dim 1: a model of latent or recurrent layers only */
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        const AttentionConfig *a = &lc->attn;
        const LatentAttentionConfig *la = &lc->mla;
        int q_width = lc->mixer == MIXER_ATTENTION ? a->n_heads * a->head_dim : la->n_heads * (la->nope_dim + la->rope.dim);
        int out_width = lc->mixer == MIXER_ATTENTION ? q_width : la->n_heads * la->v_dim; /* the heads side by side */
        if (q_width > w.q_dim) w.q_dim = q_width;
        if (out_width > w.q_dim) w.q_dim = out_width;
        if (a->n_kv_heads * a->head_dim > w.kv_dim) w.kv_dim = a->n_kv_heads * a->head_dim;
        if (mixer_heads(lc) > w.heads) w.heads = mixer_heads(lc);
        if (lc->ffn.hidden > w.hidden) w.hidden = lc->ffn.hidden;
        if (lc->ffn.shared_hidden > w.hidden) w.hidden = lc->ffn.shared_hidden;
        if (lc->ffn.n_experts > w.experts) w.experts = lc->ffn.n_experts;
        if (lc->ffn.top_k > w.top_k) w.top_k = lc->ffn.top_k;
        size_t need = mixer_scratch_floats(c, lc, max_tokens);
        if (need > w.mixer_scratch) w.mixer_scratch = need;
        if (mixer_widest_input(lc) > w.mixer_input) w.mixer_input = mixer_widest_input(lc);
    }
    return w;
}

static const char *gib(double bytes, char *buf, size_t n) {
    snprintf(buf, n, "%.1f GiB", bytes / (1u << 30));
    return buf;
}

int model_check_memory(const Model *m, int max_tokens, long n_positions, char *err, size_t errlen) {
    const Config *c = &m->config;
    Widths w = widest_layer(c, max_tokens);
    double T = max_tokens, wide = w.q_dim > c->dim ? w.q_dim : c->dim, widest = wide > w.hidden ? wide : w.hidden;
    /* runstate_init's buffers (the expert ones too), the quantized activations (at most 2 bytes a value), the
     * longest score rows */
    double scratch = 4.0 * T * (2.0 * c->dim + wide + w.q_dim + 2.0 * w.kv_dim + 2.0 * w.hidden + c->vocab_size) +
                     (w.experts ? 4.0 * T * (2.0 * w.top_k + w.experts + 1 + 2.0 * c->dim) : 0) + 2.0 * T * widest +
                     4.0 * w.heads * (double)(n_positions < max_visible(m) ? n_positions : max_visible(m)) +
                     4.0 * (double)w.mixer_scratch;
    double kv = 0; /* the KV cache of the attention layers, the states of the recurrent ones */
    for (int l = 0; l < c->n_layers; l++) {
        KVLayer cache;
        layer_cache_init(&cache, m, l);
        kv += (double)kvlayer_bytes_for(&cache, n_positions) + (double)statelayer_bytes_of(layer_state_shape(c, &c->layers[l]));
    }
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    double machine = pages > 0 && page > 0 ? (double)pages * page : INFINITY;
    if (scratch + kv <= machine) return 0;
    char b1[32], b2[32], b3[32], b4[32];
    snprintf(err, errlen, "this run needs %s of memory (KV cache %s for %ld positions, scratch %s), more than the "
             "machine's %s: give a smaller -n or a shorter prompt", gib(scratch + kv, b1, sizeof b1), gib(kv, b2, sizeof b2),
             n_positions, gib(scratch, b3, sizeof b3), gib(machine, b4, sizeof b4));
    return -1;
}
/* n bytes at a cache-line boundary (free() releases them): rows of activations that start on a line are read by
 * the matmuls' 64-byte loads whole, never split across two lines (malloc's large blocks start 16 bytes in) */
static void *line_aligned(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, n ? n : 1) == 0 ? p : NULL;
}


int runstate_init(RunState *s, const Model *m, int max_tokens) {
    const Config *c = &m->config;
    memset(s, 0, sizeof *s);
    Widths w = widest_layer(c, max_tokens);
    int q_dim = w.q_dim, kv_dim = w.kv_dim, heads = w.heads, hidden = w.hidden, experts = w.experts, top_k = w.top_k;
    int mixer_input = w.mixer_input;
    size_t scratch = w.mixer_scratch, T = (size_t)max_tokens, wide = (size_t)(q_dim > c->dim ? q_dim : c->dim);
    s->max_tokens = max_tokens;
    /* the score rows start short and grow with the positions actually reached (grow_scores): a context
     * of millions of positions costs nothing until a prompt gets there */
    int most = max_visible(m);
    s->scores_stride = most < max_tokens ? most : max_tokens;
    s->x = line_aligned(T * c->dim * sizeof(float));
    s->xb = line_aligned(T * wide * sizeof(float));
    s->xb2 = line_aligned(T * c->dim * sizeof(float));
    s->q = line_aligned(T * q_dim * sizeof(float));
    s->k = line_aligned(T * kv_dim * sizeof(float));
    s->v = line_aligned(T * kv_dim * sizeof(float));
    s->hb = line_aligned(T * hidden * sizeof(float));
    s->hb2 = line_aligned(T * hidden * sizeof(float));
    /* a row per query head and token of a tile of queries (attention_layer) */
    s->scores_heads = heads * (max_tokens < ATTENTION_QUERY_TILE ? max_tokens : ATTENTION_QUERY_TILE);
    s->scores = line_aligned((size_t)s->scores_heads * s->scores_stride * sizeof(float));
    s->logits = line_aligned(T * c->vocab_size * sizeof(float));
    s->row_seq = malloc(T * sizeof(int));
    s->row_pos = malloc(T * sizeof(int));
    s->mixer_scratch = line_aligned((scratch ? scratch : 1) * sizeof(float));
    int bad = !s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->hb || !s->hb2 || !s->scores || !s->logits ||
              !s->row_seq || !s->row_pos || !s->mixer_scratch;
    if (experts) { /* mixture of experts: the routing of a chunk and one expert's share of it */
        s->expert_ids = malloc(T * top_k * sizeof(int));
        s->expert_weights = malloc(T * top_k * sizeof(float));
        s->router_logits = malloc(T * experts * sizeof(float));
        s->expert_tokens = malloc(T * sizeof(int));
        s->expert_x = line_aligned(T * c->dim * sizeof(float));
        s->expert_out = line_aligned(T * c->dim * sizeof(float));
        bad |= !s->expert_ids || !s->expert_weights || !s->router_logits || !s->expert_tokens || !s->expert_x ||
               !s->expert_out;
    }
    if (bad || mla_scratch_init(&s->mla, &s->scratch, m, max_tokens) != 0) {
        runstate_free(s);
        return -1;
    }
    int widest_input = (int)wide > hidden ? (int)wide : hidden; /* matmul inputs: dim, q_dim, hidden, a mixer's own */
    if (mixer_input > widest_input) widest_input = mixer_input;
    if (matmul_scratch_reserve(&s->scratch, max_tokens, widest_input) != 0) {
        runstate_free(s);
        return -1;
    }
    /* the cache: each layer's row widths and slot mapping, one pool per row shape, and sequence 0 */
    KVLayer *layout = calloc((size_t)c->n_layers, sizeof *layout);
    StateShape *states = calloc((size_t)c->n_layers, sizeof *states);
    if (!layout || !states) {
        free(layout);
        free(states);
        runstate_free(s);
        return -1;
    }
    for (int l = 0; l < c->n_layers; l++) {
        layer_cache_init(&layout[l], m, l);
        states[l] = layer_state_shape(c, &c->layers[l]);
    }
    bad = kvcache_init(&s->kv, c->n_layers, layout, states) != 0 || kvcache_add_sequence(&s->kv) != 0;
    free(layout);
    free(states);
    if (bad) {
        runstate_free(s);
        return -1;
    }
    return 0;
}

void runstate_free(RunState *s) {
    free(s->x);
    free(s->xb);
    free(s->xb2);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->hb);
    free(s->hb2);
    free(s->scores);
    free(s->logits);
    free(s->row_seq);
    free(s->row_pos);
    free(s->expert_ids);
    free(s->expert_weights);
    free(s->router_logits);
    free(s->expert_tokens);
    free(s->expert_x);
    free(s->expert_out);
    mla_scratch_free(s->mla);
    matmul_scratch_free(&s->scratch);
    free(s->mixer_scratch);
    kvcache_free(&s->kv);
    memset(s, 0, sizeof *s);
}

/* ---------------------------------------------------------------------------------------------
 * forward: the layer recipe */

typedef struct {
    float *out;
    const float *x;
    const Tensor *w, *b;
    const Config *c;
} NormJob;

static void norm_range(void *arg, int begin, int end) {
    const NormJob *j = arg;
    const Config *c = j->c;
    for (int t = begin; t < end; t++) {
        const float *xt = j->x + (size_t)t * c->dim;
        float *ot = j->out + (size_t)t * c->dim;
        if (c->norm_kind == NORM_LAYER) layernorm(ot, xt, j->w->data, j->b ? j->b->data : NULL, c->dim, c->norm_eps);
        else rmsnorm(ot, xt, j->w->data, c->dim, c->norm_eps);
    }
}

/* each row on its own: a prompt's rows on every thread */
static void norm_rows(float *out, const float *x, const Tensor *w, const Tensor *b, int n, const Config *c) {
    NormJob j = {out, x, w, b, c};
    parallel_for(n, 8, 4LL * n * c->dim, norm_range, &j);
}

typedef struct {
    float *x;
    const float *y;
    int dim;
    float scale;
} ResidualJob;

static void residual_range(void *arg, int begin, int end) {
    const ResidualJob *j = arg;
    size_t from = (size_t)begin * j->dim, to = (size_t)end * j->dim;
    if (j->scale == 1.0f)
        for (size_t i = from; i < to; i++) j->x[i] += j->y[i];
    else
        for (size_t i = from; i < to; i++) j->x[i] += j->scale * j->y[i];
}

/* x[n][dim] += scale * y[n][dim] (scale: Granite's residual multiplier, 1 for everyone else); a prompt's rows
 * on every thread */
static void residual(float *x, const float *y, int n, int dim, float scale) {
    ResidualJob j = {x, y, dim, scale};
    parallel_for(n, 8, 2LL * n * dim, residual_range, &j);
}

/* Makes the score rows long enough for every key a query at a position < end can see under its layer's
 * mask (most_visible), growing by doubling up to the longest row any layer needs. Returns 0, or -1 when out
 * of memory. */
static int grow_scores(RunState *s, const Model *m, int end) {
    int need = 1;
    for (int l = 0; l < m->config.n_layers; l++) {
        if (is_recurrent(&m->config.layers[l])) continue;
        int n = most_visible(&m->attention[l], end);
        if (n > need) need = n;
    }
    if (need <= s->scores_stride) return 0;
    int most = max_visible(m), stride = s->scores_stride > INT_MAX / 2 ? INT_MAX : 2 * s->scores_stride;
    if (stride > most) stride = most;
    if (stride < need) stride = need;
    float *scores = line_aligned((size_t)s->scores_heads * stride * sizeof(float));
    if (!scores) return -1;
    free(s->scores);
    s->scores = scores;
    s->scores_stride = stride;
    return 0;
}

typedef int (*RecurrentBlock)(const Model *m, int layer, RunState *s, int n, int pos);

/* A recurrent block folds a run of one sequence's tokens into that sequence's state: each run of the batch
 * (batch_run_end) in turn, its rows of s->xb and s->xb2 shown to the block as the whole batch. */
static int recurrent_runs(const Model *m, int l, RunState *s, const Batch *b, RecurrentBlock block) {
    size_t dim = (size_t)m->config.dim;
    float *xb = s->xb, *xb2 = s->xb2;
    int rc = 0;
    for (int t = 0, end; t < b->n && rc == 0; t = end) {
        end = batch_run_end(b, t);
        s->xb = xb + t * dim, s->xb2 = xb2 + t * dim, s->state_seq = b->seq[t];
        rc = block(m, l, s, end - t, b->pos[t]);
    }
    s->xb = xb, s->xb2 = xb2;
    return rc;
}

static int rwkv_ffn_runs(const Model *m, int l, RunState *s, int n, int pos) {
    (void)pos;
    rwkv_ffn_block(m, l, s, n);
    return 0;
}

/* Each block reads its input from s->xb and writes its output, [n][dim], to s->xb2. */
static int mixer(const Model *m, int l, RunState *s, const Batch *b) {
    switch (m->config.layers[l].mixer) {
    case MIXER_ATTENTION: return attention_block(m, l, s, b);
    case MIXER_LATENT_ATTENTION: return latent_attention_block(m, l, s, b);
    case MIXER_MAMBA: return recurrent_runs(m, l, s, b, mamba_block);
    case MIXER_MAMBA2: return recurrent_runs(m, l, s, b, mamba2_block);
    case MIXER_GATED_DELTANET: return recurrent_runs(m, l, s, b, deltanet_block);
    case MIXER_RWKV: return recurrent_runs(m, l, s, b, rwkv_block);
    default: return -1;
    }
}

static void ffn(const Model *m, int l, RunState *s, const Batch *b) {
    switch (m->config.layers[l].ffn_kind) {
    case FFN_GATED:
    case FFN_PLAIN: dense_ffn_block(m, l, s, b->n); break;
    case FFN_MOE: moe_block(m, l, s, b->n); break;
    case FFN_RWKV: recurrent_runs(m, l, s, b, rwkv_ffn_runs); break; /* sees its sequence's previous token */
    case FFN_NONE: break;
    }
}

float *forward_batch(const Model *m, RunState *s, const Batch *b, int all_logits) {
    const Config *c = &m->config;
    int n = b->n, end = 0;
    for (int t = 0; t < n; t++)
        if (b->pos[t] + 1 > end) end = b->pos[t] + 1;
    if (grow_scores(s, m, end) != 0) return NULL;
    const Weights *w = &m->weights;
    int dim = c->dim;
    float *x = s->x, *xb = s->xb, *xb2 = s->xb2;
    /* a sequence that starts here: its recurrent layers start from the zero state */
    for (int t = 0; t < n; t = batch_run_end(b, t))
        if (b->pos[t] == 0)
            for (int l = 0; l < c->n_layers; l++) statelayer_reset(kvcache_state(&s->kv, b->seq[t], l));

    profile_section(PROFILE_OTHER);
    /* token embeddings (Gemma scales them by sqrt(dim)); GPT-2 adds a learned position embedding */
    for (int t = 0; t < n; t++) {
        float *xt = x + (size_t)t * dim;
        tensor_row(xt, &w->tok_embeddings, b->tokens[t]);
        if (c->embed_scale != 1.0f)
            for (int j = 0; j < dim; j++) xt[j] *= c->embed_scale;
        if (c->position_kind == POS_LEARNED) {
            tensor_row(xb2, &w->pos_embeddings, b->pos[t]);
            for (int j = 0; j < dim; j++) xt[j] += xb2[j];
        }
    }

    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        const LayerWeights *lw = &w->layers[l];

        /* x += post_norm(mixer(norm(x))): the positions exchange information */
        profile_section(PROFILE_NORM);
        if (lc->flags & LAYER_MIXER_NORM) norm_rows(xb, x, &lw->mixer_norm, &lw->mixer_norm_bias, n, c);
        else memcpy(xb, x, (size_t)n * dim * sizeof(float));
        profile_section(PROFILE_ATTENTION); /* the attention block names its steps; other mixers count here */
        if (mixer(m, l, s, b) != 0) return NULL;
        profile_section(PROFILE_NORM);
        if (lc->flags & LAYER_MIXER_POST_NORM) norm_rows(xb2, xb2, &lw->mixer_post_norm, NULL, n, c);
        profile_section(PROFILE_OTHER);
        residual(x, xb2, n, dim, c->residual_scale);

        /* x += post_norm(ffn(norm(x))): each position on its own */
        if (lc->ffn_kind == FFN_NONE) continue;
        profile_section(PROFILE_NORM);
        if (lc->flags & LAYER_FFN_NORM) norm_rows(xb, x, &lw->ffn_norm, &lw->ffn_norm_bias, n, c);
        else memcpy(xb, x, (size_t)n * dim * sizeof(float));
        profile_section(PROFILE_GATE_UP); /* the dense FFN names its steps; a mixture of experts counts here */
        ffn(m, l, s, b);
        profile_section(PROFILE_NORM);
        if (lc->flags & LAYER_FFN_POST_NORM) norm_rows(xb2, xb2, &lw->ffn_post_norm, NULL, n, c);
        profile_section(PROFILE_OTHER);
        residual(x, xb2, n, dim, c->residual_scale);
    }

    /* final norm and classifier: every token's logits, the last one's, or none */
    if (all_logits == LOGITS_NONE) return s->logits;
    int first = all_logits == LOGITS_ALL ? 0 : n - 1, rows = n - first;
    profile_section(PROFILE_NORM);
    norm_rows(xb, x + (size_t)first * dim, &w->final_norm, &w->final_norm_bias, rows, c);
    profile_section(PROFILE_CLASSIFIER);
    matmul(&s->scratch, s->logits, xb, &w->output, rows);
    size_t n_logits = (size_t)rows * c->vocab_size;
    if (c->logit_scale != 1.0f)
        for (size_t i = 0; i < n_logits; i++) s->logits[i] *= c->logit_scale;
    if (c->final_softcap > 0.0f)
        for (size_t i = 0; i < n_logits; i++) s->logits[i] = softcap(s->logits[i], c->final_softcap);
    profile_section(PROFILE_OTHER);
    return s->logits;
}

float *forward(const Model *m, RunState *s, const int *tokens, int n, int pos, int all_logits) {
    for (int t = 0; t < n; t++) s->row_seq[t] = 0, s->row_pos[t] = pos + t;
    Batch b = {n, tokens, s->row_seq, s->row_pos};
    return forward_batch(m, s, &b, all_logits);
}
