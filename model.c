/* model.c - loading a model file (docs/FORMAT.md) with every field validated, and forward(). */
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

#include "attention.h"
#include "study.h"

/* ---------------------------------------------------------------------------------------------
 * loading: read every field through a bounds-checked cursor, check it, and only then use it */

#define HEADER_SIZE 128
#define CONFIG_SIZE 128
#define LAYER_RECORD_SIZE 64
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
#define MAX_TENSORS (16 * MAX_LAYERS + 64)

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
    uint32_t dim = next_u32(&cur), hidden = next_u32(&cur), vocab = next_u32(&cur), context = next_u32(&cur);
    uint32_t norm_kind = next_u32(&cur);
    float eps = next_f32(&cur);
    uint32_t mlp = next_u32(&cur), act = next_u32(&cur), pos_kind = next_u32(&cur);
    float embed_scale = next_f32(&cur), final_softcap = next_f32(&cur);
    uint32_t flags = next_u32(&cur), n_tables = next_u32(&cur);
    if (in_range(ctx, "config dim", dim, 1, MAX_DIM) || in_range(ctx, "config hidden_dim", hidden, 1, MAX_HIDDEN) ||
        in_range(ctx, "config vocab_size", vocab, 1, MAX_VOCAB) ||
        in_range(ctx, "config context_length", context, 1, MAX_CONTEXT) ||
        in_range(ctx, "config norm_kind", norm_kind, NORM_RMS, NORM_LAYER) ||
        in_range(ctx, "config mlp_kind", mlp, MLP_GATED, MLP_PLAIN) ||
        in_range(ctx, "config activation", act, ACTIVATION_SILU, ACTIVATION_GELU) ||
        in_range(ctx, "config position_kind", pos_kind, POS_ROPE, POS_LEARNED) ||
        in_range(ctx, "config n_rope_tables", n_tables, 0, MAX_LAYERS))
        return -1;
    if (!(eps > 0.0f && eps < 1.0f)) return fail(ctx, "config norm_eps %g is not in (0, 1)", eps);
    if (!isfinite(embed_scale) || !isfinite(final_softcap) || final_softcap < 0.0f)
        return fail(ctx, "config embed_scale %g / final_softcap %g is not valid", embed_scale, final_softcap);
    if (flags & ~(uint32_t)MODEL_TIED_EMBEDDINGS) return fail(ctx, "config has unknown flags 0x%x", flags);
    c->dim = (int)dim;
    c->hidden_dim = (int)hidden;
    c->vocab_size = (int)vocab;
    c->context_length = (int)context;
    c->norm_kind = (int)norm_kind;
    c->norm_eps = eps;
    c->mlp_kind = (int)mlp;
    c->activation = (int)act;
    c->position_kind = (int)pos_kind;
    c->embed_scale = embed_scale;
    c->final_softcap = final_softcap;
    c->flags = flags;
    c->n_rope_tables = (int)n_tables;
    return 0;
}

static int parse_layer(LoadContext *ctx, const Config *c, LayerConfig *l, const unsigned char *p, int i) {
    Cursor cur = {p};
    uint32_t heads = next_u32(&cur), kv_heads = next_u32(&cur), head_dim = next_u32(&cur), window = next_u32(&cur);
    float theta = next_f32(&cur);
    uint32_t rope_dim = next_u32(&cur);
    int32_t table = (int32_t)next_u32(&cur);
    float scale = next_f32(&cur), softcap_ = next_f32(&cur);
    uint32_t flags = next_u32(&cur);
    char what[64];
#define CHECK(field, v, lo, hi) \
    (snprintf(what, sizeof what, "layer %d " field, i), in_range(ctx, what, (long long)(v), lo, hi))
    if (CHECK("n_heads", heads, 1, MAX_HEADS) || CHECK("n_kv_heads", kv_heads, 1, heads) ||
        CHECK("head_dim", head_dim, 1, MAX_HEAD_DIM) || CHECK("window", window, 0, MAX_CONTEXT) ||
        CHECK("rope_dim", rope_dim, 0, head_dim) || CHECK("rope_table", table, -1, c->n_rope_tables - 1))
        return -1;
#undef CHECK
    if (heads % kv_heads)
        return fail(ctx, "layer %d: %u query heads do not split into groups over %u kv heads", i, heads, kv_heads);
    if (rope_dim % 2) return fail(ctx, "layer %d: rope_dim %u is odd", i, rope_dim);
    if (c->position_kind == POS_ROPE && rope_dim > 0 && table < 0 && !(theta > 1.0f && isfinite(theta)))
        return fail(ctx, "layer %d: rope_theta %g is not valid", i, theta);
    if (!(scale > 0.0f) || !isfinite(scale) || !(softcap_ >= 0.0f) || !isfinite(softcap_))
        return fail(ctx, "layer %d: attn_scale %g / attn_softcap %g is not valid", i, scale, softcap_);
    if (flags & ~31u) return fail(ctx, "layer %d has unknown flags 0x%x", i, flags);
    l->n_heads = (int)heads;
    l->n_kv_heads = (int)kv_heads;
    l->head_dim = (int)head_dim;
    l->window = (int)window;
    l->rope_theta = theta;
    l->rope_dim = c->position_kind == POS_ROPE ? (int)rope_dim : 0;
    l->rope_table = table;
    l->attn_scale = scale;
    l->attn_softcap = softcap_;
    l->flags = flags;
    return 0;
}

AttentionSpec attention_of_layer(const LayerConfig *l) {
    AttentionSpec a = {l->head_dim, l->attn_scale, l->attn_softcap, l->window ? MASK_SLIDING : MASK_CAUSAL, l->window,
                       0, KERNEL_NAIVE};
    return a;
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
    if (ndim < 1 || ndim > 2) return fail(ctx, "tensor '%s' has %u dimensions (1 or 2 expected)", e->name, ndim);
    uint64_t count = 1;
    for (uint32_t d = 0; d < ndim; d++) {
        if (e->shape[d] == 0 || e->shape[d] > MAX_CONTEXT)
            return fail(ctx, "tensor '%s' has dimension %u of size %u", e->name, d, e->shape[d]);
        count *= e->shape[d]; /* at most 2^48: no overflow */
    }
    e->dtype = (DType)dtype;
    e->ndim = (int)ndim;
    uint64_t cols = e->shape[ndim - 1], need = tensor_nbytes(e->dtype, count / cols, cols);
    if (need == 0)
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

/* Binds a tensor the config requires: present, with this shape; vectors must be f32. */
static int bind(Directory *d, Tensor *t, int rows, int cols, const char *fmt, ...) {
    TensorEntry key;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key.name, sizeof key.name, fmt, ap);
    va_end(ap);
    const char *name = key.name;
    TensorEntry *e = bsearch(&key, d->entries, (size_t)d->n, sizeof *d->entries, by_name);
    if (!e) return fail(d->ctx, "tensor '%s' is missing", name);
    int is_vector = rows == 0;
    uint32_t want0 = is_vector ? (uint32_t)cols : (uint32_t)rows;
    if (e->ndim != (is_vector ? 1 : 2) || e->shape[0] != want0 || (!is_vector && e->shape[1] != (uint32_t)cols)) {
        if (is_vector) return fail(d->ctx, "tensor '%s' should have shape [%d]", name, cols);
        return fail(d->ctx, "tensor '%s' should have shape [%d, %d]", name, rows, cols);
    }
    if (is_vector && e->dtype != DTYPE_F32) return fail(d->ctx, "tensor '%s' is a vector and must be f32", name);
    e->used = 1;
    t->data = d->map + e->offset;
    t->dtype = e->dtype;
    t->rows = is_vector ? 1 : rows;
    t->cols = cols;
    return 0;
}

#define VECTOR 0 /* rows argument of bind() for a 1-D tensor */

static int bind_layer(Directory *d, const Config *c, const LayerConfig *l, LayerWeights *w, int i) {
    int dim = c->dim, hidden = c->hidden_dim, q_dim = l->n_heads * l->head_dim, kv_dim = l->n_kv_heads * l->head_dim;
    int layernorm = c->norm_kind == NORM_LAYER;
    if (bind(d, &w->attn_norm, VECTOR, dim, "layers.%d.attn_norm", i)) return -1;
    if (layernorm && bind(d, &w->attn_norm_bias, VECTOR, dim, "layers.%d.attn_norm_bias", i)) return -1;
    if (bind(d, &w->wq, q_dim, dim, "layers.%d.wq", i) || bind(d, &w->wk, kv_dim, dim, "layers.%d.wk", i) ||
        bind(d, &w->wv, kv_dim, dim, "layers.%d.wv", i) || bind(d, &w->wo, dim, q_dim, "layers.%d.wo", i))
        return -1;
    if ((l->flags & LAYER_QKV_BIAS) &&
        (bind(d, &w->bq, VECTOR, q_dim, "layers.%d.bq", i) || bind(d, &w->bk, VECTOR, kv_dim, "layers.%d.bk", i) ||
         bind(d, &w->bv, VECTOR, kv_dim, "layers.%d.bv", i)))
        return -1;
    if ((l->flags & LAYER_QK_NORM) && (bind(d, &w->q_norm, VECTOR, l->head_dim, "layers.%d.q_norm", i) ||
                                       bind(d, &w->k_norm, VECTOR, l->head_dim, "layers.%d.k_norm", i)))
        return -1;
    if ((l->flags & LAYER_O_BIAS) && bind(d, &w->bo, VECTOR, dim, "layers.%d.bo", i)) return -1;
    if ((l->flags & LAYER_POST_ATTN_NORM) && bind(d, &w->attn_post_norm, VECTOR, dim, "layers.%d.attn_post_norm", i))
        return -1;
    if (bind(d, &w->mlp_norm, VECTOR, dim, "layers.%d.mlp_norm", i)) return -1;
    if (layernorm && bind(d, &w->mlp_norm_bias, VECTOR, dim, "layers.%d.mlp_norm_bias", i)) return -1;
    if (c->mlp_kind == MLP_GATED && bind(d, &w->w_gate, hidden, dim, "layers.%d.w_gate", i)) return -1;
    if (bind(d, &w->w_up, hidden, dim, "layers.%d.w_up", i) || bind(d, &w->w_down, dim, hidden, "layers.%d.w_down", i))
        return -1;
    if (c->mlp_kind == MLP_PLAIN &&
        (bind(d, &w->b_up, VECTOR, hidden, "layers.%d.b_up", i) || bind(d, &w->b_down, VECTOR, dim, "layers.%d.b_down", i)))
        return -1;
    if ((l->flags & LAYER_POST_MLP_NORM) && bind(d, &w->mlp_post_norm, VECTOR, dim, "layers.%d.mlp_post_norm", i))
        return -1;
    return 0;
}

static int bind_weights(Directory *d, Model *m) {
    Config *c = &m->config;
    Weights *w = &m->weights;
    if (bind(d, &w->tok_embeddings, c->vocab_size, c->dim, "tok_embeddings")) return -1;
    if (c->position_kind == POS_LEARNED && bind(d, &w->pos_embeddings, c->context_length, c->dim, "pos_embeddings"))
        return -1;
    w->layers = calloc((size_t)c->n_layers, sizeof *w->layers);
    w->rope_computed = calloc((size_t)c->n_layers * (MAX_HEAD_DIM / 2), sizeof *w->rope_computed);
    if (!w->layers || !w->rope_computed) return fail(d->ctx, "out of memory");
    for (int l = 0; l < c->n_layers; l++) { /* frequencies from rope_theta; layers with a table point at it below */
        const LayerConfig *lc = &c->layers[l];
        w->layers[l].rope_inv_freq = w->rope_computed + (size_t)l * (MAX_HEAD_DIM / 2);
        if (lc->rope_dim > 0 && lc->rope_table < 0) rope_frequencies(w->rope_computed + (size_t)l * (MAX_HEAD_DIM / 2), lc->rope_theta, lc->rope_dim);
    }
    for (int i = 0; i < c->n_rope_tables; i++) {
        /* every layer that uses table i must agree on its length */
        int len = -1;
        for (int l = 0; l < c->n_layers; l++)
            if (c->layers[l].rope_table == i) {
                if (len >= 0 && len != c->layers[l].rope_dim / 2)
                    return fail(d->ctx, "rope table %d is shared by layers with different rope_dim", i);
                len = c->layers[l].rope_dim / 2;
            }
        Tensor t;
        if (len <= 0) return fail(d->ctx, "rope table %d is not used by any layer with rotary dimensions", i);
        if (bind(d, &t, VECTOR, len, "rope_inv_freq.%d", i)) return -1;
        for (int l = 0; l < c->n_layers; l++)
            if (c->layers[l].rope_table == i) w->layers[l].rope_inv_freq = t.data;
    }
    for (int l = 0; l < c->n_layers; l++)
        if (bind_layer(d, c, &c->layers[l], &w->layers[l], l)) return -1;
    if (bind(d, &w->final_norm, VECTOR, c->dim, "final_norm")) return -1;
    if (c->norm_kind == NORM_LAYER && bind(d, &w->final_norm_bias, VECTOR, c->dim, "final_norm_bias")) return -1;
    if (c->flags & MODEL_TIED_EMBEDDINGS) w->output = w->tok_embeddings;
    else if (bind(d, &w->output, c->vocab_size, c->dim, "output")) return -1;
    for (int i = 0; i < d->n; i++)
        if (!d->entries[i].used) return fail(d->ctx, "tensor '%s' is not used by this config", d->entries[i].name);
    m->weight_dtype = w->layers[0].wq.dtype;
    return 0;
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

/* Parses and validates a whole model file held in memory at p[0 .. size). The weights point into p. */
static int parse_model(LoadContext *ctx, Model *m, const unsigned char *p, uint64_t file_size) {
    if (file_size < HEADER_SIZE)
        return fail(ctx, "too short for a model file (%llu bytes, the header alone is %d)", (unsigned long long)file_size,
                    HEADER_SIZE);

    /* header */
    if (memcmp(p, MODEL_MAGIC, 4) != 0) return fail(ctx, "not an attn.c model file (bad magic)");
    uint32_t version = u32_at(p + 4);
    if (version != MODEL_VERSION)
        return fail(ctx, "file format version %u, this build reads version %d (re-export with export.py)", version,
                    MODEL_VERSION);
    uint64_t declared = u64_at(p + 8), config_off = u64_at(p + 16), config_size = u64_at(p + 24);
    uint64_t layers_off = u64_at(p + 32), tok_off = u64_at(p + 48), tok_size = u64_at(p + 56);
    uint32_t n_layers = u32_at(p + 40), layer_rec = u32_at(p + 44), n_tensors = u32_at(p + 72), tensor_rec = u32_at(p + 76);
    uint64_t tensors_off = u64_at(p + 64), data_off = u64_at(p + 80), data_size = u64_at(p + 88);
    uint64_t chat_off = u64_at(p + 96), chat_size = u64_at(p + 104);
    Config *c = &m->config;
    if (declared != file_size)
        return fail(ctx, "header says %llu bytes but the file has %llu (truncated or padded?)",
                    (unsigned long long)declared, (unsigned long long)file_size);
    if (config_size != CONFIG_SIZE)
        return fail(ctx, "config record is %llu bytes (expected %d)", (unsigned long long)config_size, CONFIG_SIZE);
    if (layer_rec != LAYER_RECORD_SIZE)
        return fail(ctx, "layer records are %u bytes (expected %d)", layer_rec, LAYER_RECORD_SIZE);
    if (tensor_rec != TENSOR_RECORD_SIZE)
        return fail(ctx, "tensor records are %u bytes (expected %d)", tensor_rec, TENSOR_RECORD_SIZE);
    if (in_range(ctx, "n_layers", n_layers, 1, MAX_LAYERS) || in_range(ctx, "n_tensors", n_tensors, 1, MAX_TENSORS) ||
        check_section(ctx, "config", config_off, CONFIG_SIZE, file_size) ||
        check_section(ctx, "layers", layers_off, (uint64_t)n_layers * LAYER_RECORD_SIZE, file_size) ||
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
    for (int i = 0; i < c->n_layers; i++)
        if (parse_layer(ctx, c, &c->layers[i], p + layers_off + (uint64_t)i * LAYER_RECORD_SIZE, i)) return -1;

    /* how each layer attends, as the file says (run.c may override it before runstate_init) */
    m->attention = calloc(n_layers, sizeof *m->attention);
    if (!m->attention) return fail(ctx, "out of memory");
    for (int i = 0; i < c->n_layers; i++) m->attention[i] = attention_of_layer(&c->layers[i]);

    /* tensor directory, then bind what the config asks for */
    TensorEntry *entries = calloc(n_tensors, sizeof *entries);
    if (!entries) return fail(ctx, "out of memory");
    Directory dir = {ctx, p, entries, (int)n_tensors};
    int bad = 0;
    for (uint32_t i = 0; i < n_tensors && !bad; i++)
        bad = parse_tensor(ctx, &entries[i], p + tensors_off + (uint64_t)i * TENSOR_RECORD_SIZE, (int)i, data_off,
                           file_size);
    if (!bad) bad = index_directory(&dir);
    if (!bad) bad = bind_weights(&dir, m);
    free(entries);
    if (bad) return -1;

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
    int fd = open(path, O_RDONLY);
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
    prefault(map, (size_t)file_size); /* every check passed: bring the weights in now */
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

int model_can_roll(const Model *m) {
    if (m->config.position_kind != POS_ROPE) return 0;
    for (int l = 0; l < m->config.n_layers; l++)
        if (m->attention[l].mask != MASK_SLIDING) return 0;
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

int runstate_init(RunState *s, const Model *m, int max_tokens) {
    const Config *c = &m->config;
    memset(s, 0, sizeof *s);
    int q_dim = 0, kv_dim = 0, heads = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        if (lc->n_heads * lc->head_dim > q_dim) q_dim = lc->n_heads * lc->head_dim;
        if (lc->n_kv_heads * lc->head_dim > kv_dim) kv_dim = lc->n_kv_heads * lc->head_dim;
        if (lc->n_heads > heads) heads = lc->n_heads;
    }
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
    s->hb = malloc(T * c->hidden_dim * sizeof(float));
    s->hb2 = malloc(T * c->hidden_dim * sizeof(float));
    s->scores_heads = heads;
    s->scores = malloc((size_t)heads * s->scores_stride * sizeof(float));
    s->logits = malloc(T * c->vocab_size * sizeof(float));
    s->kv.n_layers = c->n_layers;
    s->kv.layers = calloc((size_t)c->n_layers, sizeof *s->kv.layers);
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->hb || !s->hb2 || !s->scores || !s->logits ||
        !s->kv.layers) {
        runstate_free(s);
        return -1;
    }
    int widest_input = (int)wide > c->hidden_dim ? (int)wide : c->hidden_dim; /* matmul inputs: dim, q_dim, hidden */
    if (matmul_reserve(max_tokens, widest_input) != 0) {
        runstate_free(s);
        return -1;
    }
    for (int l = 0; l < c->n_layers; l++)
        attention_cache_init(&s->kv.layers[l], c->layers[l].n_kv_heads * c->layers[l].head_dim, &m->attention[l]);
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
    kvcache_free(&s->kv);
    memset(s, 0, sizeof *s);
}

/* ---------------------------------------------------------------------------------------------
 * forward: the layer recipe */

/* out[n][dim] = norm(x[n][dim]): RMSNorm, or LayerNorm with its bias, as the config says */
static void norm(float *out, const float *x, const Tensor *w, const Tensor *b, int n, const Config *c) {
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * c->dim;
        float *ot = out + (size_t)t * c->dim;
        if (c->norm_kind == NORM_LAYER) layernorm(ot, xt, w->data, b ? b->data : NULL, c->dim, c->norm_eps);
        else rmsnorm(ot, xt, w->data, c->dim, c->norm_eps);
    }
}

/* x[n][dim] += y[n][dim] */
static void residual(float *x, const float *y, int n, int dim) {
    for (size_t i = 0; i < (size_t)n * dim; i++) x[i] += y[i];
}

/* RMSNorm of every head_dim slice of x[n][heads * head_dim] (Qwen3 / Gemma 3 q/k norm) */
static void norm_heads(float *x, const Tensor *w, int n, int heads, int head_dim, float eps) {
    for (int i = 0; i < n * heads; i++) rmsnorm(x + (size_t)i * head_dim, x + (size_t)i * head_dim, w->data, head_dim, eps);
}

/* RoPE on every head of q[n][n_heads*hd] and k[n][n_kv_heads*hd], token t at position pos + t */
static void rotate_heads(RunState *s, const LayerConfig *lc, const float *inv_freq, int n, int pos) {
    if (lc->rope_dim == 0) return;
    int hd = lc->head_dim;
    for (int t = 0; t < n; t++) {
        rope_heads(s->q + (size_t)t * lc->n_heads * hd, lc->n_heads, hd, lc->rope_dim, pos + t, inv_freq);
        rope_heads(s->k + (size_t)t * lc->n_kv_heads * hd, lc->n_kv_heads, hd, lc->rope_dim, pos + t, inv_freq);
    }
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

float *forward(const Model *m, RunState *s, const int *tokens, int n, int pos, int all_logits) {
    const Config *c = &m->config;
    if (grow_scores(s, m, pos + n) != 0) return NULL;
    const Weights *w = &m->weights;
    int dim = c->dim, hidden = c->hidden_dim;
    float *x = s->x, *xb = s->xb, *xb2 = s->xb2, *hb = s->hb, *hb2 = s->hb2;

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
        KVLayer *cache = &s->kv.layers[l];
        int hd = lc->head_dim, q_dim = lc->n_heads * hd, kv_dim = lc->n_kv_heads * hd;

        /* attention norm, then q, k, v for these tokens in one pass (+ biases: Qwen2, GPT-2) */
        norm(xb, x, &lw->attn_norm, &lw->attn_norm_bias, n, c);
        matmul_many((Projection[]){{s->q, &lw->wq}, {s->k, &lw->wk}, {s->v, &lw->wv}}, 3, xb, n);
        add_bias(s->q, &lw->bq, n);
        add_bias(s->k, &lw->bk, n);
        add_bias(s->v, &lw->bv, n);

        /* per-head RMSNorm of queries and keys (Qwen3, Gemma 3), then rotary positions */
        if (lc->flags & LAYER_QK_NORM) {
            norm_heads(s->q, &lw->q_norm, n, lc->n_heads, hd, c->norm_eps);
            norm_heads(s->k, &lw->k_norm, n, lc->n_kv_heads, hd, c->norm_eps);
        }
        rotate_heads(s, lc, lw->rope_inv_freq, n, pos);

        /* attention: each token stores its key and value in the cache, then attends over what its mask
         * lets it see (--attn-map keeps the weights). A paged cache overwrites nothing, so there all the
         * chunk's keys go in first and the heads then attend for every token in one pass. */
        const AttentionSpec *spec = &m->attention[l];
        int keys_first = kvlayer_keeps_every_position(cache) && !s->attention_map;
        for (int t = 0; t < n; t++) {
            if (kvlayer_store(cache, pos + t, s->k + (size_t)t * kv_dim, s->v + (size_t)t * kv_dim) != 0) return NULL;
            if (keys_first) continue;
            attention_layer(xb + (size_t)t * q_dim, s->q + (size_t)t * q_dim, cache, lc->n_heads, lc->n_kv_heads,
                            pos + t, 1, spec, s->scores, s->scores_stride);
            if (s->attention_map) attention_map_record(s->attention_map, l, pos + t, s->scores, s->scores_stride);
        }
        if (keys_first)
            attention_layer(xb, s->q, cache, lc->n_heads, lc->n_kv_heads, pos, n, spec, s->scores, s->scores_stride);

        /* output projection, optional post-norm (Gemma), residual connection */
        matmul(xb2, xb, &lw->wo, n);
        add_bias(xb2, &lw->bo, n);
        if (lc->flags & LAYER_POST_ATTN_NORM) norm(xb2, xb2, &lw->attn_post_norm, NULL, n, c);
        residual(x, xb2, n, dim);

        /* MLP: gated  down(act(gate(x)) * up(x))  (SwiGLU, GeGLU)  or plain  down(act(up(x) + b) + b)  (GPT-2) */
        norm(xb, x, &lw->mlp_norm, &lw->mlp_norm_bias, n, c);
        if (c->mlp_kind == MLP_GATED) {
            matmul_many((Projection[]){{hb, &lw->w_up}, {hb2, &lw->w_gate}}, 2, xb, n);
            activate(hb, hb2, (size_t)n * hidden, c->activation);
        } else {
            matmul(hb, xb, &lw->w_up, n);
            add_bias(hb, &lw->b_up, n);
            activate(hb, NULL, (size_t)n * hidden, c->activation);
        }
        matmul(xb2, hb, &lw->w_down, n);
        add_bias(xb2, &lw->b_down, n);
        if (lc->flags & LAYER_POST_MLP_NORM) norm(xb2, xb2, &lw->mlp_post_norm, NULL, n, c);
        residual(x, xb2, n, dim);
    }

    /* final norm and classifier: every token's logits, or the last one's */
    int first = all_logits ? 0 : n - 1, rows = n - first;
    norm(xb, x + (size_t)first * dim, &w->final_norm, &w->final_norm_bias, rows, c);
    matmul(s->logits, xb, &w->output, rows);
    if (c->final_softcap > 0.0f)
        for (size_t i = 0; i < (size_t)rows * c->vocab_size; i++) s->logits[i] = softcap(s->logits[i], c->final_softcap);
    return s->logits;
}
