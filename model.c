/* model.c - loading a model file (docs/FORMAT.md) with every field validated, and forward(): the layer recipe.
 * The blocks a layer is made of (attention, dense FFN, mixture of experts) are in blocks.c / moe.c. */
#include "model.h"

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

/* ---------------------------------------------------------------------------------------------
 * loading: read every field through a bounds-checked cursor, check it, and only then use it */

#define HEADER_SIZE 128
#define CONFIG_SIZE 128
#define LAYER_HEADER_SIZE 16     /* record_size, flags, mixer kind, mixer payload size */
#define ATTENTION_RECORD_SIZE 56 /* payload sizes of each kind (docs/FORMAT.md) */
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
#define MAX_HEADS 1024
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
    if (rope_dim % 2) return fail(ctx, "layer %d: rope_dim %u is odd", i, rope_dim);
    if (c->position_kind == POS_ROPE && rope_dim > 0 && table < 0 && !(theta > 1.0f && isfinite(theta)))
        return fail(ctx, "layer %d: rope_theta %g is not valid", i, theta);
    if (!(attn_factor > 0.0f) || !isfinite(attn_factor))
        return fail(ctx, "layer %d: rope attention factor %g is not valid", i, attn_factor);
    if (!(scale > 0.0f) || !isfinite(scale) || !(softcap_ >= 0.0f) || !isfinite(softcap_))
        return fail(ctx, "layer %d: attn_scale %g / attn_softcap %g is not valid", i, scale, softcap_);
    if (!(t_floor >= 0.0f) || !isfinite(t_floor) || !isfinite(t_scale))
        return fail(ctx, "layer %d: temperature floor %g / scale %g is not valid", i, t_floor, t_scale);
    if (flags & ~(uint32_t)(ATTN_QK_NORM | ATTN_QKV_BIAS | ATTN_O_BIAS | ATTN_QK_NORM_FULL | ATTN_QK_NORM_PLAIN | ATTN_SINKS))
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

/* dense (gated or plain) and mixture-of-experts payloads */
static int parse_ffn(LoadContext *ctx, FfnConfig *f, int kind, const unsigned char *p, int i) {
    Cursor cur = {p};
    char what[64];
    memset(f, 0, sizeof *f);
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
    if (mixer != MIXER_ATTENTION)
        return fail(ctx, "layer %d: mixer kind %u is not one this build knows (1 = attention); a newer attn.c may read it",
                    i, mixer);
    if (mixer_size != ATTENTION_RECORD_SIZE)
        return fail(ctx, "layer %d: attention record is %u bytes, this build reads %d", i, mixer_size, ATTENTION_RECORD_SIZE);
    if ((uint64_t)LAYER_HEADER_SIZE + mixer_size + 8 > size) return fail(ctx, "layer %d: mixer record runs past the layer record", i);
    l->mixer = (MixerKind)mixer;
    if (parse_attention(ctx, c, &l->attn, p + LAYER_HEADER_SIZE, i)) return -1;
    cur.p = p + LAYER_HEADER_SIZE + mixer_size;
    uint32_t ffn = next_u32(&cur), ffn_size = next_u32(&cur);
    static const uint32_t ffn_sizes[FFN_KIND_COUNT] = {0, DENSE_RECORD_SIZE, DENSE_RECORD_SIZE, MOE_RECORD_SIZE};
    static const char *ffn_names[FFN_KIND_COUNT] = {"no FFN", "gated FFN", "plain FFN", "mixture of experts"};
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
    const AttentionConfig *a = &m->config.layers[layer].attn;
    AttentionSpec s = {a->head_dim, a->scale, a->softcap, MASK_CAUSAL, 0, 0, NULL, KERNEL_NAIVE};
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
                    dtype_name(e->dtype), (unsigned long long)cols, Q8_GROUP);
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

enum { PART_MODEL = 1, PART_LAYER = 2, PART_ATTENTION = 4, PART_GATED = 8, PART_PLAIN = 16, PART_MOE = 32 };
enum { STORAGE_MATRIX, STORAGE_F32 };
/* the dimensions a table row can name */
enum { DIM_NONE, DIM_DIM, DIM_VOCAB, DIM_CONTEXT, DIM_Q_DIM, DIM_KV_DIM, DIM_HEAD_DIM, DIM_N_HEADS, DIM_HIDDEN,
       DIM_N_EXPERTS, DIM_EXPERTS, DIM_SHARED_HIDDEN };

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
    default: return 0;
    }
}

/* The parts a layer is made of, and the flag bits that say which optional tensors it has */
static int parts_of(const LayerConfig *l) {
    static const int ffn_parts[FFN_KIND_COUNT] = {0, PART_GATED, PART_PLAIN, PART_MOE};
    return PART_LAYER | (l->mixer == MIXER_ATTENTION ? PART_ATTENTION : 0) | ffn_parts[l->ffn_kind];
}
static unsigned model_present(const Config *c) {
    return c->flags | (c->norm_kind == NORM_LAYER ? PRESENT_LAYERNORM : 0u) |
           (c->position_kind == POS_LEARNED ? PRESENT_LEARNED_POSITIONS : 0u);
}
static unsigned present_bits(const Config *c, const LayerConfig *l) {
    return model_present(c) | l->flags | l->attn.flags | l->ffn.flags;
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

/* The precomputed rope tables (rope_inv_freq.N, linear / llama3 / YaRN scaling), shared by the layers that
 * name them; every other rotary layer gets theta^(-2i/dim) computed here. */
static int bind_rope(Directory *d, Model *m) {
    Config *c = &m->config;
    Weights *w = &m->weights;
    for (int l = 0; l < c->n_layers; l++) { /* frequencies from rope_theta; layers with a table point at it below */
        const RopeConfig *r = &c->layers[l].attn.rope;
        w->layers[l].rope_inv_freq = w->rope_computed + (size_t)l * (MAX_HEAD_DIM / 2);
        if (c->layers[l].mixer == MIXER_ATTENTION && r->dim > 0 && r->table < 0)
            rope_frequencies(w->rope_computed + (size_t)l * (MAX_HEAD_DIM / 2), r->theta, r->dim);
    }
    for (int i = 0; i < c->n_rope_tables; i++) {
        /* every layer that uses table i must agree on its length */
        int len = -1;
        for (int l = 0; l < c->n_layers; l++)
            if (c->layers[l].attn.rope.table == i) {
                if (len >= 0 && len != c->layers[l].attn.rope.dim / 2)
                    return fail(d->ctx, "rope table %d is shared by layers with different rope_dim", i);
                len = c->layers[l].attn.rope.dim / 2;
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
            if (c->layers[l].attn.rope.table == i) w->layers[l].rope_inv_freq = (const float *)(d->map + e->offset);
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
    m->weight_dtype = w->tok_embeddings.dtype;
    for (int l = 0; l < c->n_layers; l++)
        if (c->layers[l].mixer == MIXER_ATTENTION) {
            m->weight_dtype = w->layers[l].attn.wq.dtype;
            break;
        }
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
        const RopeConfig *r = &c->layers[l].attn.rope;
        if (c->layers[l].mixer != MIXER_ATTENTION || r->dim == 0 || r->table < 0) continue;
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
    for (int i = 0; i < c->n_layers; i++)
        if (c->layers[i].mixer == MIXER_ATTENTION) m->attention[i] = attention_of_layer(m, i);

    /* tokenizer */
    char tok_err[200];
    if (tokenizer_load(&m->tokenizer, p + tok_off, (size_t)tok_size, c->vocab_size, tok_err, sizeof tok_err) != 0)
        return fail(ctx, "%s", tok_err);
    if (chat_section_load(&m->chat, p + chat_off, (size_t)chat_size, tok_err, sizeof tok_err) != 0) return fail(ctx, "%s", tok_err);
    return 0;
}

int model_load_buffer(Model *m, const void *data, size_t size, const char *name, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    LoadContext ctx = {name, err, errlen};
    m->file_size = size;
    if (parse_model(&ctx, m, data, size) != 0) {
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
    return 0;
}

/* 1 if an element of one matrix (rows x cols) holds an infinity or a NaN (all exponent bits set); q8_0: in
 * its scales, the int8 values are always finite */
static int matrix_has_nonfinite(const unsigned char *data, DType dtype, uint64_t rows, uint64_t cols) {
    uint64_t count = rows * cols;
    if (dtype == DTYPE_F32) {
        for (uint64_t i = 0; i < count; i++)
            if ((u32_at(data + 4 * i) & 0x7F800000u) == 0x7F800000u) return 1;
        return 0;
    }
    if (dtype == DTYPE_Q8_0) data += count, count /= Q8_GROUP;
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
        if (!keeps_bounded_cache(&m->attention[l])) return 0;
    return 1;
}

/* ---------------------------------------------------------------------------------------------
 * run state */

/* The longest score row any layer needs: positions stop at the context, except in a model that rolls */
static int max_visible(const Model *m) {
    int most = 1, n_positions = m->config.context_length;
    for (int l = 0; l < m->config.n_layers; l++) {
        const AttentionSpec *a = &m->attention[l];
        int n = a->mask == MASK_SLIDING ? a->n_sinks + a->span : most_visible(a, n_positions);
        if (n > most) most = n;
    }
    return most;
}

/* The widest rows of any layer: what the scratch buffers hold */
typedef struct {
    int q_dim, kv_dim, heads; /* attention: query and kv rows, query heads */
    int hidden;               /* the widest FFN inner width (an expert's, a shared expert's) */
    int experts, top_k;       /* mixture of experts: the most experts, the most chosen per token */
} Widths;

static Widths widest_layer(const Config *c) {
    Widths w = {0, 0, 0, 1, 0, 0};
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        const AttentionConfig *a = &lc->attn;
        if (a->n_heads * a->head_dim > w.q_dim) w.q_dim = a->n_heads * a->head_dim;
        if (a->n_kv_heads * a->head_dim > w.kv_dim) w.kv_dim = a->n_kv_heads * a->head_dim;
        if (a->n_heads > w.heads) w.heads = a->n_heads;
        if (lc->ffn.hidden > w.hidden) w.hidden = lc->ffn.hidden;
        if (lc->ffn.shared_hidden > w.hidden) w.hidden = lc->ffn.shared_hidden;
        if (lc->ffn.n_experts > w.experts) w.experts = lc->ffn.n_experts;
        if (lc->ffn.top_k > w.top_k) w.top_k = lc->ffn.top_k;
    }
    return w;
}

static const char *gib(double bytes, char *buf, size_t n) {
    snprintf(buf, n, "%.1f GiB", bytes / (1u << 30));
    return buf;
}

int model_check_memory(const Model *m, int max_tokens, long n_positions, char *err, size_t errlen) {
    const Config *c = &m->config;
    Widths w = widest_layer(c);
    double T = max_tokens, wide = w.q_dim > c->dim ? w.q_dim : c->dim, widest = wide > w.hidden ? wide : w.hidden;
    /* runstate_init's buffers (the expert ones too), the quantized activations (at most 2 bytes a value), the
     * longest score rows */
    double scratch = 4.0 * T * (2.0 * c->dim + wide + w.q_dim + 2.0 * w.kv_dim + 2.0 * w.hidden + c->vocab_size) +
                     (w.experts ? 4.0 * T * (2.0 * w.top_k + w.experts + 1 + 2.0 * c->dim) : 0) + 2.0 * T * widest +
                     4.0 * w.heads * (double)(n_positions < max_visible(m) ? n_positions : max_visible(m));
    double kv = 0;
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layers[l].mixer != MIXER_ATTENTION) continue;
        KVLayer cache;
        attention_cache_init(&cache, c->layers[l].attn.n_kv_heads * c->layers[l].attn.head_dim, &m->attention[l]);
        kv += (double)kvlayer_bytes_for(&cache, n_positions);
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

int runstate_init(RunState *s, const Model *m, int max_tokens) {
    const Config *c = &m->config;
    memset(s, 0, sizeof *s);
    Widths w = widest_layer(c);
    int q_dim = w.q_dim, kv_dim = w.kv_dim, heads = w.heads, hidden = w.hidden, experts = w.experts, top_k = w.top_k;
    size_t T = (size_t)max_tokens, wide = (size_t)(q_dim > c->dim ? q_dim : c->dim);
    s->max_tokens = max_tokens;
    /* the score rows start short and grow with the positions actually reached (grow_scores): a context
     * of millions of positions costs nothing until a prompt gets there */
    int most = max_visible(m);
    s->scores_stride = most < max_tokens ? most : max_tokens;
    s->x = malloc(T * c->dim * sizeof(float));
    s->xb = malloc(T * wide * sizeof(float));
    s->xb2 = malloc(T * c->dim * sizeof(float));
    s->q = malloc(T * q_dim * sizeof(float));
    s->k = malloc(T * kv_dim * sizeof(float));
    s->v = malloc(T * kv_dim * sizeof(float));
    s->hb = malloc(T * hidden * sizeof(float));
    s->hb2 = malloc(T * hidden * sizeof(float));
    s->scores_heads = heads;
    s->scores = malloc((size_t)heads * s->scores_stride * sizeof(float));
    s->logits = malloc(T * c->vocab_size * sizeof(float));
    s->kv.n_layers = c->n_layers;
    s->kv.layers = calloc((size_t)c->n_layers, sizeof *s->kv.layers);
    int bad = !s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->hb || !s->hb2 || !s->scores || !s->logits ||
              !s->kv.layers;
    if (experts) { /* mixture of experts: the routing of a chunk and one expert's share of it */
        s->expert_ids = malloc(T * top_k * sizeof(int));
        s->expert_weights = malloc(T * top_k * sizeof(float));
        s->router_logits = malloc(T * experts * sizeof(float));
        s->expert_tokens = malloc(T * sizeof(int));
        s->expert_x = malloc(T * c->dim * sizeof(float));
        s->expert_out = malloc(T * c->dim * sizeof(float));
        bad |= !s->expert_ids || !s->expert_weights || !s->router_logits || !s->expert_tokens || !s->expert_x ||
               !s->expert_out;
    }
    if (bad) {
        runstate_free(s);
        return -1;
    }
    int widest_input = (int)wide > hidden ? (int)wide : hidden; /* matmul inputs: dim, q_dim, hidden */
    if (matmul_reserve(max_tokens, widest_input) != 0) {
        runstate_free(s);
        return -1;
    }
    for (int l = 0; l < c->n_layers; l++)
        if (c->layers[l].mixer == MIXER_ATTENTION)
            attention_cache_init(&s->kv.layers[l], c->layers[l].attn.n_kv_heads * c->layers[l].attn.head_dim, &m->attention[l]);
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
    free(s->expert_ids);
    free(s->expert_weights);
    free(s->router_logits);
    free(s->expert_tokens);
    free(s->expert_x);
    free(s->expert_out);
    kvcache_free(&s->kv);
    memset(s, 0, sizeof *s);
}

/* ---------------------------------------------------------------------------------------------
 * forward: the layer recipe */

static void norm_rows(float *out, const float *x, const Tensor *w, const Tensor *b, int n, const Config *c) {
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * c->dim;
        float *ot = out + (size_t)t * c->dim;
        if (c->norm_kind == NORM_LAYER) layernorm(ot, xt, w->data, b ? b->data : NULL, c->dim, c->norm_eps);
        else rmsnorm(ot, xt, w->data, c->dim, c->norm_eps);
    }
}

/* x[n][dim] += scale * y[n][dim] (scale: Granite's residual multiplier, 1 for everyone else) */
static void residual(float *x, const float *y, int n, int dim, float scale) {
    if (scale == 1.0f)
        for (size_t i = 0; i < (size_t)n * dim; i++) x[i] += y[i];
    else
        for (size_t i = 0; i < (size_t)n * dim; i++) x[i] += scale * y[i];
}

/* Makes the score rows long enough for every key a query at a position < end can see under its layer's
 * mask (most_visible), growing by doubling up to the longest row any layer needs. Returns 0, or -1 when out
 * of memory. */
static int grow_scores(RunState *s, const Model *m, int end) {
    int need = 1;
    for (int l = 0; l < m->config.n_layers; l++) {
        int n = most_visible(&m->attention[l], end);
        if (n > need) need = n;
    }
    if (need <= s->scores_stride) return 0;
    int most = max_visible(m), stride = s->scores_stride > INT_MAX / 2 ? INT_MAX : 2 * s->scores_stride;
    if (stride > most) stride = most;
    if (stride < need) stride = need;
    float *scores = malloc((size_t)s->scores_heads * stride * sizeof(float));
    if (!scores) return -1;
    free(s->scores);
    s->scores = scores;
    s->scores_stride = stride;
    return 0;
}

/* Each block reads its input from s->xb and writes its output, [n][dim], to s->xb2. */
static int mixer(const Model *m, int l, RunState *s, int n, int pos) {
    switch (m->config.layers[l].mixer) {
    case MIXER_ATTENTION: return attention_block(m, l, s, n, pos);
    }
    return -1;
}

static void ffn(const Model *m, int l, RunState *s, int n) {
    switch (m->config.layers[l].ffn_kind) {
    case FFN_GATED:
    case FFN_PLAIN: dense_ffn_block(m, l, s, n); break;
    case FFN_MOE: moe_block(m, l, s, n); break;
    case FFN_NONE: break;
    }
}

float *forward(const Model *m, RunState *s, const int *tokens, int n, int pos, int all_logits) {
    const Config *c = &m->config;
    if (grow_scores(s, m, pos + n) != 0) return NULL;
    const Weights *w = &m->weights;
    int dim = c->dim;
    float *x = s->x, *xb = s->xb, *xb2 = s->xb2;

    /* token embeddings (Gemma scales them by sqrt(dim)); GPT-2 adds a learned position embedding */
    for (int t = 0; t < n; t++) {
        float *xt = x + (size_t)t * dim;
        tensor_row(xt, &w->tok_embeddings, tokens[t]);
        if (c->embed_scale != 1.0f)
            for (int j = 0; j < dim; j++) xt[j] *= c->embed_scale;
        if (c->position_kind == POS_LEARNED) {
            tensor_row(xb2, &w->pos_embeddings, pos + t);
            for (int j = 0; j < dim; j++) xt[j] += xb2[j];
        }
    }

    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        const LayerWeights *lw = &w->layers[l];

        /* x += post_norm(mixer(norm(x))): the positions exchange information */
        if (lc->flags & LAYER_MIXER_NORM) norm_rows(xb, x, &lw->mixer_norm, &lw->mixer_norm_bias, n, c);
        else memcpy(xb, x, (size_t)n * dim * sizeof(float));
        if (mixer(m, l, s, n, pos) != 0) return NULL;
        if (lc->flags & LAYER_MIXER_POST_NORM) norm_rows(xb2, xb2, &lw->mixer_post_norm, NULL, n, c);
        residual(x, xb2, n, dim, c->residual_scale);

        /* x += post_norm(ffn(norm(x))): each position on its own */
        if (lc->ffn_kind == FFN_NONE) continue;
        if (lc->flags & LAYER_FFN_NORM) norm_rows(xb, x, &lw->ffn_norm, &lw->ffn_norm_bias, n, c);
        else memcpy(xb, x, (size_t)n * dim * sizeof(float));
        ffn(m, l, s, n);
        if (lc->flags & LAYER_FFN_POST_NORM) norm_rows(xb2, xb2, &lw->ffn_post_norm, NULL, n, c);
        residual(x, xb2, n, dim, c->residual_scale);
    }

    /* final norm and classifier: every token's logits, or the last one's */
    int first = all_logits ? 0 : n - 1, rows = n - first;
    norm_rows(xb, x + (size_t)first * dim, &w->final_norm, &w->final_norm_bias, rows, c);
    matmul(s->logits, xb, &w->output, rows);
    size_t n_logits = (size_t)rows * c->vocab_size;
    if (c->logit_scale != 1.0f)
        for (size_t i = 0; i < n_logits; i++) s->logits[i] *= c->logit_scale;
    if (c->final_softcap > 0.0f)
        for (size_t i = 0; i < n_logits; i++) s->logits[i] = softcap(s->logits[i], c->final_softcap);
    return s->logits;
}
