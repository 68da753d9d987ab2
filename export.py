#!/usr/bin/env python3
"""export.py - turn a Hugging Face checkpoint or a llama2.c checkpoint into one attn.c model file.

    python3 export.py SRC OUT [--dtype f32|bf16|f16|q8_0] [--tokenizer FILE] [--bf16-rope] [--kv-heads L=N[,L=N...] | all=N]

SRC is a Hugging Face model directory (config.json + *.safetensors + tokenizer files) or a llama2.c
legacy checkpoint (.bin). Needs only Python 3 and numpy: safetensors, JSON and SentencePiece's protobuf
are read by hand.
The file layout is documented in docs/FORMAT.md; write_model() below writes the fields in that order.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import re
import struct
import sys
import tempfile

try:
    import numpy as np
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("error: export.py needs numpy (Debian: apt-get install python3-numpy)")

FORMAT_VERSION = 1
ALIGN = 64

DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3}
Q8_GROUP = 32  # q8_0: int8 values in groups of 32 along a row, one f16 scale per group

NORM_RMS, NORM_LAYER = 0, 1
MLP_GATED, MLP_PLAIN = 0, 1
ACT_SILU, ACT_GELU_TANH, ACT_GELU = 0, 1, 2
POS_ROPE, POS_LEARNED = 0, 1
MODEL_TIED_EMBEDDINGS = 1
LAYER_QK_NORM, LAYER_QKV_BIAS, LAYER_O_BIAS, LAYER_POST_ATTN_NORM, LAYER_POST_MLP_NORM = 1, 2, 4, 8, 16

TOK_BYTELEVEL_BPE, TOK_SENTENCEPIECE_BPE = 1, 2
PRE_NONE, PRE_GPT2, PRE_LLAMA3, PRE_QWEN2, PRE_METASPACE = 0, 1, 2, 3, 4
TOKF_ADD_BOS, TOKF_DUMMY_PREFIX, TOKF_BYTE_FALLBACK, TOKF_IGNORE_MERGES, TOKF_PREFIX_SPACE, TOKF_SCORE_MERGES = 1, 2, 4, 8, 16, 32
TOKF_NORMALIZE_EACH_STRETCH, TOKF_PREFIX_FIRST_STRETCH, TOKF_PREFIX_UNLESS_SPACE = 64, 128, 256
TOKF_STRIP_LEADING_SPACE, TOKF_REMOVE_EXTRA_SPACES = 512, 1024
PIECE_NORMAL, PIECE_SPECIAL, PIECE_BYTE, PIECE_UNUSED, PIECE_USER, PIECE_CONTROL, PIECE_UNKNOWN = 0, 1, 2, 3, 4, 5, 6
PIECE_LSTRIP, PIECE_RSTRIP = 0x100, 0x200  # added tokens that swallow the whitespace on their left / right


class ExportError(Exception):
    """A problem with the input: reported as one line, exit status 1."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def progress(msg):
    """A status line that rewrites itself on a terminal (None clears it); nothing when stderr is a file or a pipe,
    so that logs keep only the lines that say something."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[2K" + (msg or ""))
        sys.stderr.flush()


@contextlib.contextmanager
def malformed_input(path):
    """Python errors while reading a damaged input file (a field of an unexpected type, a missing key)
    become one ExportError naming the file, instead of a traceback."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, IndexError, ValueError, struct.error) as e:
        raise ExportError(f"{path}: malformed: a field has an unexpected type or value ({type(e).__name__}: {e})")


def reads_input(read):
    """malformed_input() around a reader whose first argument is the path of the file it reads."""
    @functools.wraps(read)
    def reader(path, *args):
        with malformed_input(path):
            return read(path, *args)
    return reader


# ----------------------------------------------------------------------------
# reading safetensors by hand: 8-byte header length, JSON header, raw little-endian data

ST_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """Round-to-nearest-even, NaN kept as NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


class SafeTensors:
    """All tensors of a checkpoint (one file or shards), read lazily through numpy memmaps."""

    def __init__(self, directory):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(single):
            files = [single]
        elif os.path.exists(index):
            weight_map = load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ExportError(f"{index}: no weight_map")
            files = [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]
        else:
            files = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise ExportError(f"{directory}: no model.safetensors, no model.safetensors.index.json, no *.safetensors")
        self.entries = {}
        for path in files:
            self._read_header(path)

    def _read_header(self, path):
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ExportError(f"{path}: truncated safetensors file (no header length)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8 or n > 100 << 20:
                    raise ExportError(f"{path}: safetensors header length {n} does not fit the file ({size} bytes)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise ExportError(f"{path}: {e.strerror}")
        except (ValueError, UnicodeDecodeError) as e:
            raise ExportError(f"{path}: safetensors header is not valid JSON ({e})")
        if not isinstance(header, dict):
            raise ExportError(f"{path}: safetensors header is not a JSON object")
        base = 8 + n
        mm = None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
                if not isinstance(dtype, str) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                         for x in shape + [begin, end]):
                    raise TypeError("dtype must be a string, shape and data_offsets non-negative integers")
            except (KeyError, TypeError, ValueError):
                raise ExportError(f"{path}: tensor '{name}' has a malformed header entry")
            if dtype not in ST_DTYPES:
                raise ExportError(f"{path}: tensor '{name}' has dtype {dtype}; only F32, BF16 and F16 are supported")
            np_dtype, width = ST_DTYPES[dtype]
            count = int(np.prod(shape)) if shape else 1
            if end - begin != count * width or base + end > size:
                raise ExportError(f"{path}: tensor '{name}' data ({begin}..{end}) does not match its shape or lies past the end of the file")
            if mm is None:
                mm = np.memmap(path, dtype=np.uint8, mode="r")
            self.entries[name] = (mm, base + begin, count, np_dtype, dtype, shape)

    def __contains__(self, name):
        return name in self.entries

    def names(self):
        return self.entries.keys()

    def shape(self, name):
        return self.entries[name][5]

    def dtype(self, name):
        return self.entries[name][4]

    def get(self, name):
        """The tensor as float32, in its stored shape."""
        if name not in self.entries:
            raise ExportError(f"missing tensor '{name}' in the checkpoint")
        mm, offset, count, np_dtype, dtype, shape = self.entries[name]
        arr = np.frombuffer(mm, dtype=np_dtype, count=count, offset=offset)
        arr = bf16_to_f32(arr) if dtype == "BF16" else arr.astype(np.float32)
        return arr.reshape(shape)


def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ExportError(f"{path}: {e.strerror}")
    except ValueError as e:
        raise ExportError(f"{path}: not valid JSON ({e})")


# ----------------------------------------------------------------------------
# the model description every converter produces


class Layer:
    def __init__(self, n_heads, n_kv_heads, head_dim, window=0, rope_theta=10000.0, rope_dim=None,
                 rope_table=-1, attn_scale=None, attn_softcap=0.0, flags=0):
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ExportError(f"bad head counts: {n_heads} query heads, {n_kv_heads} kv heads")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window = int(window or 0)
        self.rope_theta = float(rope_theta)
        self.rope_dim = head_dim if rope_dim is None else rope_dim
        self.rope_table = rope_table
        self.attn_scale = head_dim ** -0.5 if attn_scale is None else attn_scale
        self.attn_softcap = float(attn_softcap or 0.0)
        self.flags = flags


class Model:
    """Config + layer records + an ordered list of (name, shape, producer) for the tensors."""

    def __init__(self, family, dim, hidden_dim, vocab_size, context_length, norm_kind=NORM_RMS, norm_eps=1e-5,
                 mlp_kind=MLP_GATED, activation=ACT_SILU, position_kind=POS_ROPE, embed_scale=1.0,
                 final_softcap=0.0, tied=False):
        self.family = family
        self.dim, self.hidden_dim, self.vocab_size, self.context_length = dim, hidden_dim, vocab_size, context_length
        self.norm_kind, self.norm_eps = norm_kind, float(norm_eps)
        self.mlp_kind, self.activation, self.position_kind = mlp_kind, activation, position_kind
        self.embed_scale, self.final_softcap = float(embed_scale), float(final_softcap or 0.0)
        self.tied = tied
        self.layers = []
        self.rope_tables = []      # float32 arrays of inverse frequencies
        self.tensors = []          # (name, shape, producer() -> float32 array)
        self.tokenizer = None      # bytes of the tokenizer section, or None
        self.chat = b""            # bytes of the chat section (chat_section), or empty
        self.source_dtype = DTYPES["f32"]  # what the weights are stored as without --dtype

    def add(self, name, shape, producer):
        self.tensors.append((name, tuple(int(d) for d in shape), producer))

    def rope_table_for(self, inv_freq):
        """Index of a precomputed inverse-frequency table, shared between layers that use the same one."""
        inv_freq = np.asarray(inv_freq, dtype=np.float32)
        for i, t in enumerate(self.rope_tables):
            if t.shape == inv_freq.shape and np.array_equal(t, inv_freq):
                return i
        self.rope_tables.append(inv_freq)
        return len(self.rope_tables) - 1


# ----------------------------------------------------------------------------
# rotary embeddings: the two config dialects and the scaled variants


def rope_settings(cfg, layer_type=None):
    """(theta, scaling dict or None) for one layer type, from either config dialect.

    transformers 5 writes `rope_parameters` (Gemma 3: one entry per layer type); transformers 4 writes
    `rope_theta` + `rope_scaling` (Gemma 3: `rope_local_base_freq` for sliding layers)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return number(theta, "rope_theta"), scaling
    theta = cfg.get("rope_theta", 10000.0)
    scaling = cfg.get("rope_scaling")
    if layer_type == "sliding_attention" and "rope_local_base_freq" in cfg:
        theta, scaling = cfg["rope_local_base_freq"], None
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = dict(scaling, rope_type=kind) if kind != "default" else None
    else:
        scaling = None
    return number(theta, "rope_theta"), scaling


def rope_inv_freq(theta, rope_dim, scaling):
    """Inverse frequencies for a scaled rope, as transformers computes them (in float32)."""
    try:
        return _rope_inv_freq(theta, rope_dim, scaling)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ExportError(f"config.json: rope scaling {scaling} is incomplete or malformed ({type(e).__name__}: {e})")


def _rope_inv_freq(theta, rope_dim, scaling):
    inv = (1.0 / (theta ** (np.arange(0, rope_dim, 2, dtype=np.int64).astype(np.float32) / rope_dim))).astype(np.float32)
    kind = scaling["rope_type"]
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ExportError(f"rope scaling type '{kind}' is not supported (supported: linear, llama3)")


def round_rope_to_bf16(m):
    """--bf16-rope: give every rotary layer a table of its inverse frequencies rounded to bf16.

    transformers keeps inv_freq in f32, but a model cast with .to(torch.bfloat16) rounds that buffer to
    bf16 (and a later .float() cannot bring the bits back). A model trained that way, like kjv-5m, learned
    with the rounded frequencies, and its reference logits were computed with them."""
    tables = list(m.rope_tables)
    m.rope_tables = []
    for L in m.layers:
        if L.rope_dim == 0:
            continue
        inv = tables[L.rope_table] if L.rope_table >= 0 else rope_inv_freq(L.rope_theta, L.rope_dim, {"rope_type": "default"})
        L.rope_table = m.rope_table_for(bf16_to_f32(f32_to_bf16(inv)))


def layer_rope(model, cfg, rope_dim, layer_type=None):
    """(rope_theta, rope_table) for a layer."""
    theta, scaling = rope_settings(cfg, layer_type)
    if scaling is None:
        return theta, -1
    return theta, model.rope_table_for(rope_inv_freq(theta, rope_dim, scaling))


# ----------------------------------------------------------------------------
# --kv-heads: regroup a layer's key/value heads (MHA -> GQA -> MQA and back)


def parse_kv_heads(text, n_layers):
    """'L=N[,L=N...]' or 'all=N' -> {layer: N}; later items win ('all=1,5=2')."""
    counts = {}
    for item in text.split(","):
        layer, eq, value = item.partition("=")
        if not eq or not value.strip().isdigit() or int(value) < 1:
            raise ExportError(f"--kv-heads: '{item}' is not L=N or all=N (N >= 1)")
        if layer.strip() == "all":
            counts.update({i: int(value) for i in range(n_layers)})
        elif layer.strip().isdigit() and int(layer) < n_layers:
            counts[int(layer)] = int(value)
        else:
            raise ExportError(f"--kv-heads: '{layer}' is not a layer (0 .. {n_layers - 1}, or all)")
    return counts


def regroup_kv_heads(m, counts):
    """--kv-heads: give layer L N key/value heads, rewriting its k and v projections (and biases).

    N a multiple of the layer's kv heads (and a divisor of its query heads): each kv head is repeated
    N / n_kv times, consecutively, so every query head still reads the same keys and values - exact, the
    logits do not change; it only costs cache. N a divisor: each group of n_kv / N consecutive kv heads,
    the ones whose query heads will share a head, becomes one head whose k and v projections (rows, and
    biases) are the mean of the group's - how Ainslie et al. (2023) initialise GQA/MQA from an MHA
    checkpoint before uptraining; without uptraining it costs quality, which --ppl measures.

    The mean is taken of the projections, before anything per-head happens: RoPE rotates every head the
    same way, so for a plain layer the pooled key is exactly the mean of the group's keys. With q/k-norm
    (Qwen3, Gemma 3) the one k_norm weight is shared by all heads and stays as it is: the pooled head's
    key is RMS-normalised again, so it keeps the scale the layer was trained with instead of shrinking
    where the heads disagree (the mean of normalised keys would not be a projection at all)."""
    for i, layer in enumerate(m.layers):
        n = counts.get(i, layer.n_kv_heads)
        old, hd = layer.n_kv_heads, layer.head_dim
        if n == old:
            continue
        if n % old == 0 and layer.n_heads % n == 0:
            def regroup(w, r=n // old, old=old):  # repeat each head's rows r times
                return np.repeat(w.reshape((old, -1) + w.shape[1:]), r, axis=0).reshape((-1,) + w.shape[1:])
        elif old % n == 0:
            def regroup(w, r=old // n, n=n):  # mean of each group of r consecutive heads
                heads = w.reshape((n, r, -1) + w.shape[1:]).astype(np.float64)
                return heads.mean(axis=1).astype(np.float32).reshape((-1,) + w.shape[1:])
        else:
            raise ExportError(f"--kv-heads: layer {i} has {layer.n_heads} query and {old} kv heads; N must be a "
                              f"multiple of {old} that divides {layer.n_heads}, or a divisor of {old} (got {n})")
        layer.n_kv_heads = n
        names = {f"layers.{i}.{t}" for t in ("wk", "wv", "bk", "bv")}
        for j, (name, shape, producer) in enumerate(m.tensors):
            if name in names:
                m.tensors[j] = (name, (n * hd,) + shape[1:], lambda p=producer, f=regroup: f(np.asarray(p())))
        log(f"export: layer {i}: {old} -> {n} kv heads ({'duplicated' if n > old else 'mean-pooled'})")


# ----------------------------------------------------------------------------
# layer kinds: which layers slide, from either dialect


def layer_types(cfg, n_layers, family):
    """'full_attention' / 'sliding_attention' for each layer."""
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise ExportError(f"config.json: layer_types has {len(types) if isinstance(types, list) else '?'} entries for {n_layers} layers")
        for t in types:
            if t not in ("full_attention", "sliding_attention"):
                raise ExportError(f"config.json: layer type '{t}' is not supported")
        return list(types)
    window = cfg.get("sliding_window")
    if family in ("qwen2", "qwen3"):
        # transformers 4: layers from max_window_layers on slide, when use_sliding_window is set
        if not cfg.get("use_sliding_window", False) or not window:
            return ["full_attention"] * n_layers
        first = cfg.get("max_window_layers", n_layers)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if family == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if family == "gemma3_text":
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    return ["sliding_attention" if window else "full_attention"] * n_layers


def require(cfg, *keys):
    return [config_int(cfg, k) for k in keys]


def config_int(cfg, keys, default=None, minimum=1):
    """The first of keys set in cfg, as an integer >= minimum; default when none is set (error if None)."""
    keys = (keys,) if isinstance(keys, str) else keys
    key = next((k for k in keys if cfg.get(k) is not None), None)
    if key is None:
        if default is None:
            raise ExportError(f"config.json: missing '{keys[0]}'")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v < 2 ** 31:
        raise ExportError(f"config.json: '{key}' is {v!r}, expected an integer from {minimum} to {2 ** 31 - 1}")
    return v


def number(v, what):
    """v as a finite float, or an error naming the config field it came from."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ExportError(f"config.json: '{what}' is {v!r}, expected a finite number")
    return float(v)


def config_float(cfg, key, default):
    v = cfg.get(key)
    return default if v is None else number(v, key)


# ----------------------------------------------------------------------------
# Hugging Face families


def convert_llama_like(cfg, st, family):
    """llama, mistral, qwen2, qwen3 (and gemma2 / gemma3_text, phi3 through the same layer recipe)."""
    prefix = text_prefix(st)
    dim, n_layers, n_heads, vocab, hidden = require(cfg, "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "vocab_size", "intermediate_size")
    n_kv = config_int(cfg, "num_key_value_heads", n_heads)
    head_dim = config_int(cfg, "head_dim", dim // n_heads or None)  # None: an error, hidden_size < heads
    gemma = family in ("gemma2", "gemma3_text")
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = "lm_head.weight" not in st
    if not tied and "lm_head.weight" not in st:
        raise ExportError("missing tensor 'lm_head.weight' (config says the classifier is not tied)")
    m = Model(family, dim, hidden, vocab, config_int(cfg, "max_position_embeddings", 2048),
              norm_eps=config_float(cfg, "rms_norm_eps", 1e-6), tied=tied,
              activation=ACT_GELU_TANH if gemma else activation_of(cfg.get("hidden_act", "silu")),
              embed_scale=math.sqrt(dim) if gemma else 1.0,
              final_softcap=config_float(cfg, "final_logit_softcapping", 0.0))
    types = layer_types(cfg, n_layers, family)
    partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    rope_dim = int(head_dim * number(partial, "partial_rotary_factor"))
    if gemma:
        scale = config_float(cfg, "query_pre_attn_scalar", head_dim) ** -0.5
    else:
        scale = head_dim ** -0.5
    p = prefix
    for i in range(n_layers):
        a = f"{p}layers.{i}."
        flags = 0
        if f"{a}self_attn.q_norm.weight" in st:
            flags |= LAYER_QK_NORM
        if f"{a}self_attn.q_proj.bias" in st:
            flags |= LAYER_QKV_BIAS
        if f"{a}self_attn.o_proj.bias" in st:
            flags |= LAYER_O_BIAS
        if gemma:
            flags |= LAYER_POST_ATTN_NORM | LAYER_POST_MLP_NORM
        sliding = types[i] == "sliding_attention"
        if sliding and not cfg.get("sliding_window"):
            raise ExportError(f"config.json: layer {i} slides but sliding_window is not set")
        window = config_int(cfg, "sliding_window") if sliding else 0
        theta, table = layer_rope(m, cfg, rope_dim, types[i] if family == "gemma3_text" else None)
        m.layers.append(Layer(n_heads, n_kv, head_dim, window=window, rope_theta=theta, rope_dim=rope_dim,
                              rope_table=table, attn_scale=scale,
                              attn_softcap=config_float(cfg, "attn_logit_softcapping", 0.0),
                              flags=flags))

    def norm(name):  # Gemma's RMSNorm multiplies by (1 + w): fold the 1 in here
        return (lambda: st.get(name) + 1.0) if gemma else (lambda: st.get(name))

    m.add("tok_embeddings", (vocab, dim), lambda: st.get(f"{p}embed_tokens.weight"))
    qd, kd = n_heads * head_dim, n_kv * head_dim
    for i, layer in enumerate(m.layers):
        a, o = f"{p}layers.{i}.", f"layers.{i}."
        m.add(o + "attn_norm", (dim,), norm(a + "input_layernorm.weight"))
        if f"{a}self_attn.qkv_proj.weight" in st:  # Phi-3: q, k, v stacked in one matrix
            fused = a + "self_attn.qkv_proj.weight"
            m.add(o + "wq", (qd, dim), rows(st, fused, 0, qd))
            m.add(o + "wk", (kd, dim), rows(st, fused, qd, qd + kd))
            m.add(o + "wv", (kd, dim), rows(st, fused, qd + kd, qd + 2 * kd))
        else:
            for n, proj, d in (("q", "q_proj", qd), ("k", "k_proj", kd), ("v", "v_proj", kd)):
                m.add(o + "w" + n, (d, dim), getter(st, f"{a}self_attn.{proj}.weight"))
        if layer.flags & LAYER_QKV_BIAS:
            for n, proj, d in (("q", "q_proj", qd), ("k", "k_proj", kd), ("v", "v_proj", kd)):
                m.add(o + "b" + n, (d,), getter(st, f"{a}self_attn.{proj}.bias"))
        if layer.flags & LAYER_QK_NORM:
            m.add(o + "q_norm", (head_dim,), norm(a + "self_attn.q_norm.weight"))
            m.add(o + "k_norm", (head_dim,), norm(a + "self_attn.k_norm.weight"))
        m.add(o + "wo", (dim, qd), getter(st, a + "self_attn.o_proj.weight"))
        if layer.flags & LAYER_O_BIAS:
            m.add(o + "bo", (dim,), getter(st, a + "self_attn.o_proj.bias"))
        if gemma:
            m.add(o + "attn_post_norm", (dim,), norm(a + "post_attention_layernorm.weight"))
            m.add(o + "mlp_norm", (dim,), norm(a + "pre_feedforward_layernorm.weight"))
        else:
            m.add(o + "mlp_norm", (dim,), norm(a + "post_attention_layernorm.weight"))
        if f"{a}mlp.gate_up_proj.weight" in st:  # Phi-3: gate and up stacked
            fused = a + "mlp.gate_up_proj.weight"
            m.add(o + "w_gate", (hidden, dim), rows(st, fused, 0, hidden))
            m.add(o + "w_up", (hidden, dim), rows(st, fused, hidden, 2 * hidden))
        else:
            m.add(o + "w_gate", (hidden, dim), getter(st, a + "mlp.gate_proj.weight"))
            m.add(o + "w_up", (hidden, dim), getter(st, a + "mlp.up_proj.weight"))
        m.add(o + "w_down", (dim, hidden), getter(st, a + "mlp.down_proj.weight"))
        if gemma:
            m.add(o + "mlp_post_norm", (dim,), norm(a + "post_feedforward_layernorm.weight"))
    m.add("final_norm", (dim,), norm(f"{p}norm.weight"))
    if not tied:
        m.add("output", (vocab, dim), getter(st, "lm_head.weight"))
    return m


def convert_gpt2(cfg, st, family):
    """GPT-2 (Conv1D weights stored [in, out], fused c_attn) and GPTBigCode (Linear weights, MQA c_attn)."""
    dim = config_int(cfg, ("n_embd", "hidden_size"))
    n_layers = config_int(cfg, ("n_layer", "num_hidden_layers"))
    n_heads = config_int(cfg, ("n_head", "num_attention_heads"))
    vocab, ctx = config_int(cfg, "vocab_size"), config_int(cfg, ("n_positions", "max_position_embeddings"))
    hidden = config_int(cfg, "n_inner", 4 * dim)
    head_dim = dim // n_heads
    if head_dim < 1:
        raise ExportError(f"config.json: {dim} dimensions cannot be split over {n_heads} heads")
    bigcode = family == "gpt_bigcode"
    n_kv = 1 if bigcode and cfg.get("multi_query", True) else n_heads
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
        raise ExportError("config.json: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    scale = head_dim ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
    prefix = "transformer." if "transformer.wte.weight" in st else ""
    tied = "lm_head.weight" not in st
    m = Model(family, dim, hidden, vocab, ctx, norm_kind=NORM_LAYER, norm_eps=config_float(cfg, "layer_norm_epsilon", 1e-5),
              mlp_kind=MLP_PLAIN, activation=activation_of(cfg.get("activation_function", "gelu_new")),
              position_kind=POS_LEARNED, tied=tied)
    for _ in range(n_layers):
        m.layers.append(Layer(n_heads, n_kv, head_dim, rope_dim=0, attn_scale=scale,
                              flags=LAYER_QKV_BIAS | LAYER_O_BIAS))
    # Conv1D (GPT-2) stores [in, out]: transpose to [out, in]. nn.Linear (GPTBigCode) is already [out, in].
    lin = (lambda name: getter(st, name)) if bigcode else (lambda name: transposed(st, name))
    p = prefix
    m.add("tok_embeddings", (vocab, dim), getter(st, p + "wte.weight"))
    m.add("pos_embeddings", (ctx, dim), getter(st, p + "wpe.weight"))
    qd, kd = n_heads * head_dim, n_kv * head_dim
    for i in range(n_layers):
        a, o = f"{p}h.{i}.", f"layers.{i}."
        m.add(o + "attn_norm", (dim,), getter(st, a + "ln_1.weight"))
        m.add(o + "attn_norm_bias", (dim,), getter(st, a + "ln_1.bias"))
        w = lin(a + "attn.c_attn.weight")
        b = getter(st, a + "attn.c_attn.bias")
        for n, lo, hi in (("q", 0, qd), ("k", qd, qd + kd), ("v", qd + kd, qd + 2 * kd)):
            m.add(o + "w" + n, (hi - lo, dim), (lambda w=w, lo=lo, hi=hi: w()[lo:hi]))
            m.add(o + "b" + n, (hi - lo,), (lambda b=b, lo=lo, hi=hi: b()[lo:hi]))
        m.add(o + "wo", (dim, qd), lin(a + "attn.c_proj.weight"))
        m.add(o + "bo", (dim,), getter(st, a + "attn.c_proj.bias"))
        m.add(o + "mlp_norm", (dim,), getter(st, a + "ln_2.weight"))
        m.add(o + "mlp_norm_bias", (dim,), getter(st, a + "ln_2.bias"))
        m.add(o + "w_up", (hidden, dim), lin(a + "mlp.c_fc.weight"))
        m.add(o + "b_up", (hidden,), getter(st, a + "mlp.c_fc.bias"))
        m.add(o + "w_down", (dim, hidden), lin(a + "mlp.c_proj.weight"))
        m.add(o + "b_down", (dim,), getter(st, a + "mlp.c_proj.bias"))
    m.add("final_norm", (dim,), getter(st, p + "ln_f.weight"))
    m.add("final_norm_bias", (dim,), getter(st, p + "ln_f.bias"))
    if not tied:
        m.add("output", (vocab, dim), getter(st, "lm_head.weight"))
    return m


def activation_of(name):
    acts = {"silu": ACT_SILU, "swish": ACT_SILU, "gelu_new": ACT_GELU_TANH, "gelu_pytorch_tanh": ACT_GELU_TANH,
            "gelu_fast": ACT_GELU_TANH, "gelu": ACT_GELU}
    if name not in acts:
        raise ExportError(f"config.json: activation '{name}' is not supported (supported: {', '.join(acts)})")
    return acts[name]


def text_prefix(st):
    """Where the decoder's tensors live: 'model.' or a multimodal checkpoint's language model."""
    for p in ("model.", "model.language_model.", "language_model.model.", ""):
        if p + "embed_tokens.weight" in st:
            return p
    raise ExportError("missing tensor 'model.embed_tokens.weight' (not a decoder checkpoint of this family?)")


def getter(st, name):
    """A producer for a checkpoint tensor as stored; .source lets check_shapes compare shapes up front."""
    if name not in st:
        raise ExportError(f"missing tensor '{name}' in the checkpoint")
    f = lambda: st.get(name)
    f.source = name
    return f


def transposed(st, name):
    g = getter(st, name)
    return lambda: np.ascontiguousarray(g().T)


def rows(st, name, lo, hi):
    g = getter(st, name)
    return lambda: g()[lo:hi]


# What transformers' config classes assume when a config.json leaves a field out (hub configs of these
# families rely on it: a Gemma 3 multimodal text_config lists only a few fields).
FAMILY_DEFAULTS = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True),
}

FAMILIES = {
    "llama": convert_llama_like,
    "mistral": convert_llama_like,
    "qwen2": convert_llama_like,
    "qwen3": convert_llama_like,
    "gemma2": convert_llama_like,
    "gemma3_text": convert_llama_like,
    "phi3": convert_llama_like,
    "gpt2": convert_gpt2,
    "gpt_bigcode": convert_gpt2,
}


def convert_hf(src, args):
    cfg = load_json(os.path.join(src, "config.json"))
    if not isinstance(cfg, dict):
        raise ExportError(f"{os.path.join(src, 'config.json')}: not a JSON object")
    family = cfg.get("model_type")
    if family == "gemma3" and isinstance(cfg.get("text_config"), dict):  # multimodal wrapper: keep the text model
        cfg = dict(cfg["text_config"], model_type="gemma3_text")
        family = "gemma3_text"
    if not isinstance(family, str) or family not in FAMILIES:
        raise ExportError(f"config.json: model_type '{family}' is not supported (supported: {', '.join(sorted(FAMILIES))})")
    cfg = {**FAMILY_DEFAULTS.get(family, {}), **cfg}
    log(f"export: reading {src} ({family})")
    st = SafeTensors(src)
    with malformed_input(os.path.join(src, "config.json")):
        m = FAMILIES[family](cfg, st, family)
    check_shapes(m, st)
    if args.tokenizer:
        m.tokenizer = read_tokenizer(args.tokenizer, m.vocab_size, cfg, src)
    else:
        m.tokenizer = hf_tokenizer(src, cfg, m.vocab_size)
    m.chat = chat_section(([os.path.dirname(os.path.abspath(args.tokenizer))] if args.tokenizer else []) + [src],
                          args.chat_template)
    # without --dtype, keep the checkpoint's own dtype for the matrices (bf16 stays bf16, mixed becomes f32)
    matrix_dtypes = {st.dtype(n) for n in st.names() if len(st.shape(n)) == 2}
    m.source_dtype = DTYPES[matrix_dtypes.pop().lower()] if len(matrix_dtypes) == 1 else DTYPES["f32"]
    return m


def check_shapes(m, st):
    """Fail before writing anything if a checkpoint tensor's shape disagrees with the config."""
    for name, shape, producer in m.tensors:
        src = getattr(producer, "source", None)
        if src is not None and tuple(st.shape(src)) != shape:
            raise ExportError(f"tensor '{src}' has shape {st.shape(src)}, config implies {list(shape)}")


# ----------------------------------------------------------------------------
# llama2.c legacy checkpoints (version 0): 7 int32 header, then float32 arrays in a fixed order


def convert_llama2c(path, args):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(28)
    if len(header) != 28:
        raise ExportError(f"{path}: too short for a llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", header)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise ExportError(f"{path}: implausible llama2.c header {dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len}")
    head = dim // n_heads
    kv_dim = n_kv * head
    sizes = [("tok", vocab * dim), ("rms_att", n_layers * dim), ("wq", n_layers * dim * dim),
             ("wk", n_layers * kv_dim * dim), ("wv", n_layers * kv_dim * dim), ("wo", n_layers * dim * dim),
             ("rms_ffn", n_layers * dim), ("w1", n_layers * hidden * dim), ("w2", n_layers * dim * hidden),
             ("w3", n_layers * hidden * dim), ("rms_final", dim), ("freq_real", seq_len * head // 2),
             ("freq_imag", seq_len * head // 2)]
    if not shared:
        sizes.append(("wcls", vocab * dim))
    need = 28 + 4 * sum(n for _, n in sizes)
    if size < need:
        raise ExportError(f"{path}: truncated llama2.c checkpoint ({size} bytes, header implies {need})")
    log(f"export: reading {path} (llama2.c legacy: dim {dim}, {n_layers} layers, {n_heads}/{n_kv} heads, vocab {vocab})")
    mm = np.memmap(path, dtype=np.float32, mode="r", offset=28, shape=((need - 28) // 4,))
    arrays, off = {}, 0
    for name, n in sizes:
        arrays[name] = mm[off:off + n]
        off += n
    m = Model("llama", dim, hidden, vocab, seq_len, norm_eps=1e-5, tied=shared)
    for _ in range(n_layers):
        m.layers.append(Layer(n_heads, n_kv, head, rope_theta=10000.0))

    def mat(name, layer, r, c):
        return lambda: np.asarray(arrays[name][layer * r * c:(layer + 1) * r * c]).reshape(r, c)

    def unpermute(get, heads):
        # Meta/llama2.c rotate interleaved pairs (2i, 2i+1); attn.c rotates (i, i + d/2): reorder the rows
        def f():
            w = get()
            return w.reshape(heads, head // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)
        return f

    m.add("tok_embeddings", (vocab, dim), mat("tok", 0, vocab, dim))
    for i in range(n_layers):
        o = f"layers.{i}."
        m.add(o + "attn_norm", (dim,), lambda i=i: np.asarray(arrays["rms_att"][i * dim:(i + 1) * dim]))
        m.add(o + "wq", (dim, dim), unpermute(mat("wq", i, dim, dim), n_heads))
        m.add(o + "wk", (kv_dim, dim), unpermute(mat("wk", i, kv_dim, dim), n_kv))
        m.add(o + "wv", (kv_dim, dim), mat("wv", i, kv_dim, dim))
        m.add(o + "wo", (dim, dim), mat("wo", i, dim, dim))
        m.add(o + "mlp_norm", (dim,), lambda i=i: np.asarray(arrays["rms_ffn"][i * dim:(i + 1) * dim]))
        m.add(o + "w_gate", (hidden, dim), mat("w1", i, hidden, dim))
        m.add(o + "w_up", (hidden, dim), mat("w3", i, hidden, dim))
        m.add(o + "w_down", (dim, hidden), mat("w2", i, dim, hidden))
    m.add("final_norm", (dim,), lambda: np.asarray(arrays["rms_final"]))
    if not shared:
        m.add("output", (vocab, dim), mat("wcls", 0, vocab, dim))
    if args.chat_template:
        m.chat = chat_section([os.path.dirname(os.path.abspath(args.tokenizer))] if args.tokenizer else [],
                              args.chat_template)
    if args.tokenizer:
        m.tokenizer = read_tokenizer(args.tokenizer, vocab)
    else:
        log("export: no tokenizer (give --tokenizer tokenizer.bin for text prompts): the model will run from --tokens")
    return m


# ----------------------------------------------------------------------------
# tokenizers: a tokenizer.json (byte-level or SentencePiece-style BPE), a SentencePiece tokenizer.model or a
# llama2.c tokenizer.bin becomes one tokenizer record (docs/FORMAT.md, "Tokenizer")

SPACE_MARK = "\u2581"  # "▁": SentencePiece vocabularies spell a space as this character
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class UnsupportedTokenizer(ExportError):
    """The tokenizer file uses a feature attn.c does not implement (named in the message)."""


class TokenizerRecord:
    """The fields of the tokenizer record, in the order docs/FORMAT.md lists them."""

    def __init__(self, kind, vocab_size, source):
        self.kind, self.pretokenizer, self.flags = kind, PRE_NONE, 0
        self.bos, self.unk, self.eos = None, -1, []
        self.pieces = [b""] * vocab_size       # ids the tokenizer lacks stay empty and unused
        self.scores = [0.0] * vocab_size
        self.types = [PIECE_UNUSED] * vocab_size
        self.merges = []                       # (left id, right id) in rank order
        self.source = source

    def set_piece(self, i, data, piece_type, score=0.0):
        if not 0 <= i < len(self.pieces):
            raise ExportError(f"{self.source}: token id {i} is outside the model's vocabulary ({len(self.pieces)})")
        if len(data) > 65536:
            raise ExportError(f"{self.source}: token {i} is {len(data)} bytes long (at most 65536)")
        if piece_type & 0xFF == PIECE_BYTE and not BYTE_PIECE.fullmatch(data.decode("latin-1")):
            raise ExportError(f"{self.source}: token {i} is a byte piece but is not of the form <0xNN>: {data[:20]!r}")
        self.pieces[i], self.types[i], self.scores[i] = data, piece_type, float(score)

    def ids_by_text(self):
        """piece text -> id, for finding the tokens a config names; special pieces win over normal ones."""
        ids = {}
        for want_special in (True, False):
            for i, (p, t) in enumerate(zip(self.pieces, self.types)):
                if p and ((t & 0xFF) not in (PIECE_NORMAL, PIECE_BYTE)) == want_special:
                    ids.setdefault(p.decode("utf-8", "replace"), i)
        return ids

    def pack(self):
        eos = self.eos[:16]
        n = len(self.pieces)  # the loader's rules for the special ids (tokenizer_load)
        for what, i in [("bos", -1 if self.bos is None else self.bos), ("unk", self.unk)] + [("eos", e) for e in eos]:
            if not (isinstance(i, int) and (-1 <= i < n if what != "eos" else 0 <= i < n)):
                raise ExportError(f"{self.source}: {what} id {i} is outside the vocabulary ({n})")
        out = [struct.pack("<3I2iI", self.kind, self.pretokenizer, self.flags, -1 if self.bos is None else self.bos,
                           self.unk, len(eos))]
        out.append(struct.pack(f"<{len(eos)}i", *eos))
        out.append(struct.pack("<2I", len(self.pieces), len(self.merges)))
        for p, s, t in zip(self.pieces, self.scores, self.types):
            out.append(struct.pack("<I", len(p)) + p + struct.pack("<fI", s, t))
        out.append(np.asarray(self.merges, dtype="<u4").reshape(-1).tobytes())
        return b"".join(out)


def read_tokenizer(path, vocab_size, cfg=None, model_dir=None):
    """The tokenizer record for a tokenizer.json, a SentencePiece tokenizer.model or a llama2.c tokenizer.bin.
    tokenizer_config.json and generation_config.json are looked for beside the tokenizer and in model_dir."""
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as e:
        raise ExportError(f"{path}: {e.strerror}")
    dirs = [os.path.dirname(os.path.abspath(path))] + ([model_dir] if model_dir else [])
    if path.endswith(".json"):
        return json_tokenizer(path, cfg or {}, vocab_size, dirs)
    if path.endswith(".bin"):
        return llama2c_tokenizer(path, vocab_size)
    if path.endswith(".model") or head == b"\x0a":  # a protobuf starting with field 1 (the pieces)
        return sentencepiece_tokenizer(path, vocab_size, dirs)
    raise ExportError(f"{path}: not a tokenizer.json, a SentencePiece tokenizer.model or a llama2.c tokenizer.bin")


def hf_tokenizer(src, cfg, vocab_size):
    """The tokenizer of a Hugging Face model directory: tokenizer.json, else tokenizer.model, else none."""
    json_path, model_path = os.path.join(src, "tokenizer.json"), os.path.join(src, "tokenizer.model")
    if os.path.exists(json_path):
        try:
            return json_tokenizer(json_path, cfg, vocab_size, [src])
        except UnsupportedTokenizer as e:
            if not os.path.exists(model_path):
                raise
            log(f"export: {e}; using tokenizer.model instead")
    if os.path.exists(model_path):
        return sentencepiece_tokenizer(model_path, vocab_size, [src])
    log("export: no tokenizer.json or tokenizer.model: the model will run from --tokens")
    return None


def config_file(dirs, name):
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.exists(path):
            return load_json(path)
    return {}


# -- tokenizer.json


def bytes_to_unicode():
    """GPT-2's map from bytes to printable characters, used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
KNOWN_REGEXES = {GPT2_REGEX: PRE_GPT2, LLAMA3_REGEX: PRE_LLAMA3, QWEN2_REGEX: PRE_QWEN2}


def steps_of(block, list_key):
    """The steps of a normalizer / pre_tokenizer / decoder block: a Sequence's list, or the block itself."""
    if block is None:
        return []
    return list(block.get(list_key) or []) if block.get("type") == "Sequence" else [block]


def bytelevel_rules(tok, path):
    """(pretokenizer id, flags) of a byte-level tokenizer.json, or an error naming what is unsupported."""
    if tok.get("normalizer") is not None:
        raise UnsupportedTokenizer(f"{path}: normalizer '{tok['normalizer'].get('type')}' is not supported with byte-level BPE")
    steps = steps_of(tok.get("pre_tokenizer"), "pretokenizers")
    if not steps:
        raise UnsupportedTokenizer(f"{path}: byte-level BPE without a pre_tokenizer is not supported")
    kind, flags, saw_bytelevel = PRE_NONE, 0, False
    for s in steps:
        t = s.get("type")
        if t == "ByteLevel":
            saw_bytelevel = True
            flags = TOKF_PREFIX_SPACE if s.get("add_prefix_space", False) else 0
            if s.get("use_regex", True):
                if kind != PRE_NONE:
                    raise UnsupportedTokenizer(f"{path}: two splitting regexes in the pre_tokenizer are not supported")
                kind = PRE_GPT2
        elif t == "Split":
            pattern = s.get("pattern", {}).get("Regex")
            if pattern not in KNOWN_REGEXES or s.get("behavior") != "Isolated" or s.get("invert"):
                raise UnsupportedTokenizer(f"{path}: pre-tokenizer Split with pattern {pattern!r} is not supported")
            kind = KNOWN_REGEXES[pattern]
        else:
            raise UnsupportedTokenizer(f"{path}: pre-tokenizer '{t}' is not supported with byte-level BPE")
    if not saw_bytelevel:
        raise UnsupportedTokenizer(f"{path}: BPE without a ByteLevel step or byte_fallback is not supported")
    return kind, flags


def check_tokenizer_json(tok):
    """The shapes of the tokenizer.json fields the converters read: an error names the first one that is wrong."""
    def bad(what):
        raise ExportError(f"tokenizer.json: {what}")

    if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
        bad("not a JSON object with a 'model' object")
    vocab = tok["model"].get("vocab") or {}
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        bad("model.vocab is not an object of token -> integer id")
    for mg in tok["model"].get("merges") or []:
        ok = (isinstance(mg, str) and " " in mg) or (isinstance(mg, list) and len(mg) == 2 and
                                                      all(isinstance(x, str) for x in mg))
        if not ok:
            bad(f"merge {mg!r} is neither 'left right' nor [left, right]")
    for a in tok.get("added_tokens") or []:
        if not (isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str)):
            bad(f"added token {a!r} lacks an integer id or a string content")


def spacemark_rules(tok, path):
    """(pretokenizer id, flags) of a SentencePiece-style tokenizer.json (BPE with byte_fallback).

    Two forms write spaces as "▁": the older normalizer Prepend("▁") + Replace(" ", "▁"), which puts a ▁
    before every stretch of text (even one that starts with a space), and the newer Metaspace pre-tokenizer,
    whose prepend_scheme "always" / "first" puts one only where the stretch does not already start with a
    space ("first": only at the start of the text) and whose split cuts the text before every ▁."""
    flags, pretok, escaped = TOKF_NORMALIZE_EACH_STRETCH, PRE_NONE, False  # added tokens first, then each stretch
    for s in steps_of(tok.get("normalizer"), "normalizers"):
        t = s.get("type")
        if t == "Prepend" and s.get("prepend") == SPACE_MARK:
            flags |= TOKF_DUMMY_PREFIX
        elif t == "Replace" and s.get("pattern") == {"String": " "} and s.get("content") == SPACE_MARK:
            escaped = True
        else:
            raise UnsupportedTokenizer(f"{path}: normalizer {t} {json.dumps(s, ensure_ascii=False)} is not supported")
    for s in steps_of(tok.get("pre_tokenizer"), "pretokenizers"):
        t = s.get("type")
        if t == "Split" and escaped and s.get("pattern") == {"String": " "} and not s.get("invert"):
            continue  # Gemma: splitting at spaces the normalizer has already replaced does nothing
        if t != "Metaspace" or s.get("replacement", SPACE_MARK) != SPACE_MARK:
            raise UnsupportedTokenizer(f"{path}: pre-tokenizer {json.dumps(s, ensure_ascii=False)} is not supported with SentencePiece-style BPE")
        scheme = s.get("prepend_scheme") or ("always" if s.get("add_prefix_space", True) else "never")
        if scheme not in ("always", "first", "never"):
            raise UnsupportedTokenizer(f"{path}: Metaspace prepend_scheme '{scheme}' is not supported")
        if scheme != "never" and not flags & TOKF_DUMMY_PREFIX:
            flags |= TOKF_DUMMY_PREFIX | TOKF_PREFIX_UNLESS_SPACE
            if scheme == "first":
                flags |= TOKF_PREFIX_FIRST_STRETCH
        if s.get("split", True):
            pretok = PRE_METASPACE
        escaped = True
    if not escaped:
        raise UnsupportedTokenizer(f"{path}: BPE with byte_fallback but without a Replace(' ', '▁') normalizer or a Metaspace pre-tokenizer is not supported")
    for s in steps_of(tok.get("decoder"), "decoders"):
        t = s.get("type")
        if t == "Strip" and s.get("content") == " " and s.get("start", 0) <= 1 and s.get("stop", 0) == 0:
            flags |= TOKF_STRIP_LEADING_SPACE if s.get("start", 0) == 1 else 0
        elif t == "Metaspace":  # drops the ▁ of the first token unless prepend_scheme is "never"
            scheme = s.get("prepend_scheme") or ("always" if s.get("add_prefix_space", True) else "never")
            flags |= TOKF_STRIP_LEADING_SPACE if scheme != "never" else 0
        elif not ((t == "Replace" and s.get("pattern") == {"String": SPACE_MARK} and s.get("content") == " ")
                  or t in ("ByteFallback", "Fuse")):
            raise UnsupportedTokenizer(f"{path}: decoder {json.dumps(s, ensure_ascii=False)} is not supported")
    return pretok, flags


@reads_input
def json_tokenizer(path, cfg, vocab_size, dirs):
    tok = load_json(path)
    check_tokenizer_json(tok)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedTokenizer(f"{path}: model type '{model.get('type')}' is not supported (only BPE)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise UnsupportedTokenizer(f"{path}: BPE {key} is not supported")
    if model.get("dropout"):
        raise UnsupportedTokenizer(f"{path}: BPE dropout is not supported (it makes encoding random)")
    spacemark = bool(model.get("byte_fallback"))
    rec = TokenizerRecord(TOK_SENTENCEPIECE_BPE if spacemark else TOK_BYTELEVEL_BPE, vocab_size, path)
    if spacemark:
        rec.pretokenizer, rec.flags = spacemark_rules(tok, path)
        rec.flags |= TOKF_BYTE_FALLBACK

        def spell(piece):
            return piece.encode("utf-8")
    else:
        rec.pretokenizer, rec.flags = bytelevel_rules(tok, path)
        byte_of = {c: b for b, c in bytes_to_unicode().items()}

        def spell(piece):
            try:
                return bytes(byte_of[c] for c in piece)
            except KeyError:
                raise ExportError(f"{path}: vocabulary entry {piece!r} is not in byte-level form")
    if model.get("ignore_merges"):
        rec.flags |= TOKF_IGNORE_MERGES

    vocab = model.get("vocab") or {}
    for piece, i in vocab.items():
        byte = spacemark and BYTE_PIECE.fullmatch(piece)
        rec.set_piece(i, spell(piece), PIECE_BYTE if byte else PIECE_NORMAL)
    for added in tok.get("added_tokens") or []:
        content = added["content"]
        if added.get("single_word"):
            raise UnsupportedTokenizer(f"{path}: added token {content!r} has single_word (matching only whole words) set, which is not supported")
        if added.get("normalized") and spacemark and tok.get("normalizer") is not None:
            raise UnsupportedTokenizer(f"{path}: added token {content!r} is matched in normalized text (normalized: true), which is not supported with a normalizer")
        piece_type = PIECE_SPECIAL if added.get("special") else PIECE_USER
        piece_type |= (PIECE_LSTRIP if added.get("lstrip") else 0) | (PIECE_RSTRIP if added.get("rstrip") else 0)
        rec.set_piece(added["id"], content.encode("utf-8"), piece_type)

    id_of = {p: i for i, p in enumerate(rec.pieces) if p and rec.types[i] == PIECE_NORMAL}
    for rank, mg in enumerate(model.get("merges") or []):
        if isinstance(mg, str):
            if mg.count(" ") != 1:
                raise ExportError(f"{path}: merge {rank} {mg!r} is not two tokens separated by one space")
            mg = mg.split(" ")
        a, b = spell(mg[0]), spell(mg[1])
        if a not in id_of or b not in id_of or a + b not in id_of:
            raise ExportError(f"{path}: merge {rank} ({mg[0]!r} {mg[1]!r}) refers to a token not in the vocabulary")
        rec.merges.append((id_of[a], id_of[b]))

    by_text = rec.ids_by_text()
    if model.get("unk_token") is not None:
        rec.unk = by_text.get(model["unk_token"], -1)
        if rec.unk < 0:
            raise ExportError(f"{path}: unk_token {model['unk_token']!r} is not in the vocabulary")
        if spacemark and not model.get("fuse_unk"):
            raise UnsupportedTokenizer(f"{path}: BPE with byte_fallback and fuse_unk false is not supported")
    tcfg = config_file(dirs, "tokenizer_config.json")
    rec.bos, add_bos = post_processor_bos(tok.get("post_processor"), by_text)
    if rec.bos is None:
        rec.bos = token_id(tcfg.get("bos_token"), by_text)
        add_bos = bool(tcfg.get("add_bos_token", False)) and rec.bos is not None
    if rec.bos is None and isinstance(cfg.get("bos_token_id"), int):
        rec.bos = cfg["bos_token_id"]
    rec.flags |= TOKF_ADD_BOS if add_bos else 0
    rec.eos = eos_ids(dirs, cfg, tcfg, by_text)
    log(f"export: tokenizer: {'SentencePiece-style' if spacemark else 'byte-level'} BPE from {os.path.basename(path)}, "
        f"{len(vocab)} tokens, {len(rec.merges)} merges, bos {rec.bos} (added: {add_bos}), eos {rec.eos}")
    return rec.pack()


def token_id(entry, ids):
    if isinstance(entry, dict):
        entry = entry.get("content")
    return ids.get(entry) if isinstance(entry, str) else None


def post_processor_bos(post, ids):
    """The special token a TemplateProcessing post-processor puts before the text, if any."""
    if not post:
        return None, False
    if post.get("type") == "Sequence":
        for p in post.get("processors", []):
            bos, add = post_processor_bos(p, ids)
            if add:
                return bos, add
        return None, False
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        if single and "SpecialToken" in single[0]:
            name = single[0]["SpecialToken"]["id"]
            spec = (post.get("special_tokens") or {}).get(name, {})
            ids_ = spec.get("ids") or [ids.get(name)]
            if ids_ and ids_[0] is not None:
                return ids_[0], True
    return None, False


def eos_ids(dirs, cfg, tcfg, special_id, extra=()):
    eos = []
    for source in (config_file(dirs, "generation_config.json"), cfg):
        e = source.get("eos_token_id")
        for x in (e if isinstance(e, list) else [e]):
            if isinstance(x, int) and x not in eos:
                eos.append(x)
    for t in [token_id(tcfg.get("eos_token"), special_id)] + list(extra):
        if t is not None and t >= 0 and t not in eos:
            eos.append(t)
    return eos[:16]


# -- SentencePiece tokenizer.model: a protobuf (sentencepiece_model.proto), read by hand


def protobuf_fields(data, where):
    """The (field number, value) pairs of one protobuf message: varints as int, fixed32/fixed64 and
    length-delimited fields as bytes."""
    if not isinstance(data, bytes):  # a message field that a damaged file gives as a number
        raise ExportError(f"{where}: malformed protobuf (a message field is not length-delimited)")
    out, i, n = [], 0, len(data)

    def varint():
        nonlocal i
        x = shift = 0
        while True:
            if i >= n or shift > 63:
                raise ExportError(f"{where}: truncated or malformed protobuf")
            c = data[i]
            i += 1
            x |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return x

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = data[i:i + width], i + width
        elif wire == 2:
            length = varint()
            value, i = data[i:i + length], i + length
        else:
            raise ExportError(f"{where}: protobuf wire type {wire} is not supported")
        if i > n:
            raise ExportError(f"{where}: truncated protobuf")
        out.append((field, value))
    return out


def int32_of(varint):
    """A protobuf int32 (negative ones are written as 64-bit two's complement)."""
    return varint - (1 << 64) if varint >= 1 << 63 else varint


# ModelProto.SentencePiece.Type -> piece type of the record
SP_PIECE_TYPES = {1: PIECE_NORMAL, 2: PIECE_UNKNOWN, 3: PIECE_CONTROL, 4: PIECE_USER, 5: PIECE_UNUSED, 6: PIECE_BYTE}
SP_MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}


def sentencepiece_model(path):
    """(pieces [(text, score, type)], trainer_spec {field: value}, normalizer_spec {field: value})."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ExportError(f"{path}: {e.strerror}")
    pieces, trainer, normalizer = [], {}, {}
    for field, value in protobuf_fields(data, path):
        if field == 1:    # ModelProto.pieces: piece = 1, score = 2, type = 3
            p = {f: v for f, v in protobuf_fields(value, path)}
            if not isinstance(p.get(1), bytes):
                raise ExportError(f"{path}: piece {len(pieces)} has no text")
            if not (isinstance(p.get(2, b"1234"), bytes) and len(p.get(2, b"1234")) == 4 and isinstance(p.get(3, 1), int)):
                raise ExportError(f"{path}: piece {len(pieces)} has a malformed score or type")
            score = struct.unpack("<f", p[2])[0] if 2 in p else 0.0
            pieces.append((p[1], score, p.get(3, 1)))
        elif field == 2:  # trainer_spec
            trainer.update(protobuf_fields(value, path))
        elif field == 3:  # normalizer_spec
            normalizer.update(protobuf_fields(value, path))
    if not pieces:
        raise ExportError(f"{path}: not a SentencePiece model (no pieces)")
    return pieces, trainer, normalizer


@reads_input
def sentencepiece_tokenizer(path, vocab_size, dirs):
    """SentencePiece BPE as the sentencepiece library runs it: the text normalized (spaces to ▁, a dummy ▁
    prefix), user-defined pieces cut out, then the pair whose joined piece scores highest merges first;
    control pieces (<s>, </s>) are never matched in the text."""
    pieces, trainer, normalizer = sentencepiece_model(path)
    model_type = trainer.get(3, 1)  # TrainerSpec.model_type, default unigram
    if model_type != 2:
        raise UnsupportedTokenizer(f"{path}: SentencePiece {SP_MODEL_TYPES.get(model_type, model_type)} models are not supported (only BPE)")
    if trainer.get(24):
        raise UnsupportedTokenizer(f"{path}: SentencePiece treat_whitespace_as_suffix is not supported")
    if normalizer.get(2):
        name = normalizer.get(1, b"?").decode("utf-8", "replace")
        raise UnsupportedTokenizer(f"{path}: SentencePiece normalizer '{name}' (a precompiled character map) is not supported (only identity)")
    if not normalizer.get(5, 1):
        raise UnsupportedTokenizer(f"{path}: SentencePiece without escape_whitespaces is not supported")
    if len(pieces) > vocab_size:
        raise ExportError(f"{path}: {len(pieces)} pieces but the model's vocabulary is {vocab_size}")
    rec = TokenizerRecord(TOK_SENTENCEPIECE_BPE, vocab_size, path)
    unk_surface = trainer.get(44, " \u2047 ".encode())
    for i, (text, score, sp_type) in enumerate(pieces):
        if sp_type not in SP_PIECE_TYPES:
            raise ExportError(f"{path}: piece {i} has unknown type {sp_type}")
        piece_type = SP_PIECE_TYPES[sp_type]
        # the record keeps what the unknown piece prints as (" ⁇ ", SentencePiece's unk_surface)
        rec.set_piece(i, unk_surface if piece_type == PIECE_UNKNOWN else text, piece_type, score)
    add_dummy_prefix, remove_extra = normalizer.get(3, 1), normalizer.get(4, 1)
    rec.flags = TOKF_SCORE_MERGES | (TOKF_BYTE_FALLBACK if trainer.get(35) else 0) | \
        (TOKF_DUMMY_PREFIX if add_dummy_prefix else 0) | (TOKF_REMOVE_EXTRA_SPACES if remove_extra else 0) | \
        (TOKF_STRIP_LEADING_SPACE if add_dummy_prefix or remove_extra else 0)
    rec.unk = int32_of(trainer.get(40, 0))
    bos, eos = int32_of(trainer.get(41, 1)), int32_of(trainer.get(42, 2))
    # the sentencepiece library adds no BOS itself; the models built on it (Llama, Mistral, Gemma) want one
    tcfg = config_file(dirs, "tokenizer_config.json")
    rec.bos = bos if bos >= 0 else None
    if rec.bos is not None and tcfg.get("add_bos_token", True):
        rec.flags |= TOKF_ADD_BOS
    rec.eos = eos_ids(dirs, {}, tcfg, rec.ids_by_text(), extra=[eos])
    log(f"export: tokenizer: SentencePiece BPE from {os.path.basename(path)}, {len(pieces)} pieces, "
        f"bos {rec.bos} (added: {bool(rec.flags & TOKF_ADD_BOS)}), eos {rec.eos}")
    return rec.pack()


# -- llama2.c tokenizer.bin: i32 max_token_length, then per token f32 score, i32 length, bytes


@reads_input
def llama2c_tokenizer(path, vocab_size):
    """llama2.c's export of the Llama 2 vocabulary: pieces with "▁" written as a space, BOS as "\\n<s>\\n",
    EOS as "\\n</s>\\n", bytes as <0xNN>. llama2.c encodes like SentencePiece (a dummy-prefix space, merges
    by score, byte fallback), decodes dropping the space after BOS, and stops at BOS as well as EOS."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ExportError(f"{path}: {e.strerror}")
    if len(data) < 4:
        raise ExportError(f"{path}: too short for a llama2.c tokenizer")
    (max_len,) = struct.unpack_from("<i", data, 0)
    entries, off = [], 4
    while off < len(data):
        if off + 8 > len(data):
            raise ExportError(f"{path}: truncated at token {len(entries)}")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if n < 0 or n > max(max_len, 0) or off + n > len(data):
            raise ExportError(f"{path}: token {len(entries)} has length {n} (max_token_length {max_len}, {len(data) - off} bytes left)")
        entries.append((data[off:off + n], score))
        off += n
    if len(entries) != vocab_size:
        raise ExportError(f"{path}: {len(entries)} tokens but the model's vocabulary is {vocab_size}")
    rec = TokenizerRecord(TOK_SENTENCEPIECE_BPE, vocab_size, path)
    n_bytes = 0
    for i, (text, score) in enumerate(entries):
        if BYTE_PIECE.fullmatch(text.decode("latin-1")):
            rec.set_piece(i, text, PIECE_BYTE, score)
            n_bytes += 1
        elif i == 0 and text == b"<unk>":
            rec.set_piece(i, text, PIECE_UNKNOWN, score)
        elif (i, text) in ((1, b"\n<s>\n"), (2, b"\n</s>\n")):
            rec.set_piece(i, text.strip(), PIECE_CONTROL, score)
        else:
            rec.set_piece(i, text.replace(b" ", SPACE_MARK.encode()), PIECE_NORMAL, score)
    rec.flags = TOKF_SCORE_MERGES | TOKF_DUMMY_PREFIX | TOKF_STRIP_LEADING_SPACE | TOKF_ADD_BOS | \
        (TOKF_BYTE_FALLBACK if n_bytes == 256 else 0)
    rec.bos, rec.unk, rec.eos = 1, 0, [2, 1]
    log(f"export: tokenizer: llama2.c tokenizer.bin, {len(entries)} tokens, {n_bytes} byte pieces, bos 1, eos [2, 1]")
    return rec.pack()


# ----------------------------------------------------------------------------
# writing the file (docs/FORMAT.md, in the same order)


# ----------------------------------------------------------------------------
# chat templates: stored as the checkpoint gives them; chat.c runs them (docs/CHAT.md)

CHAT_VARIABLES = ("bos_token", "eos_token", "unk_token", "pad_token")  # the strings a template may read
MAX_CHAT_TEMPLATE, MAX_CHAT_VARIABLE = 1 << 20, 1 << 16


def chosen_template(value, where):
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (the "default" one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise ExportError(f"{where}: chat_template lists {sorted(map(str, named))} but no 'default' template")
        value = named["default"]
    if not isinstance(value, str) or not value:
        raise ExportError(f"{where}: chat_template is not a string")
    return value


def read_chat_template(dirs, path=None):
    """(template, where it came from), as transformers looks for it: chat_template.jinja, then
    tokenizer_config.json's chat_template, then chat_template.json; or the file given (.jinja text, or a
    .json holding chat_template). (None, None) when there is none."""
    if path:
        if path.endswith(".json"):
            return chosen_template(load_json(path).get("chat_template"), path), path
        try:
            with open(path, encoding="utf-8") as f:
                return f.read(), path
        except (OSError, UnicodeDecodeError) as e:
            raise ExportError(f"{path}: cannot read the chat template ({getattr(e, 'strerror', None) or e})")
    for d in dirs:
        jinja = os.path.join(d, "chat_template.jinja")
        if os.path.exists(jinja):
            return read_chat_template([], jinja)
        for name in ("tokenizer_config.json", "chat_template.json"):
            cfg = config_file([d], name)
            if isinstance(cfg, dict) and cfg.get("chat_template") is not None:
                return chosen_template(cfg["chat_template"], os.path.join(d, name)), os.path.join(d, name)
    return None, None


def chat_section(dirs, path=None):
    """The chat section (docs/FORMAT.md): the template and the special-token strings of tokenizer_config.json
    it may read (bos_token, ...); empty when the checkpoint has no chat template."""
    template, where = read_chat_template(dirs, path)
    if template is None:
        return b""
    tcfg = config_file(dirs, "tokenizer_config.json")
    variables = []
    for name in CHAT_VARIABLES:
        v = tcfg.get(name) if isinstance(tcfg, dict) else None
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            variables.append((name, v))
    for what, text, limit in [("chat template", template, MAX_CHAT_TEMPLATE)] + [(n, v, MAX_CHAT_VARIABLE) for n, v in variables]:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise ExportError(f"{where}: the {what} is not valid Unicode text")
        if "\0" in text or size > limit or (size == 0 and what == "chat template"):
            raise ExportError(f"{where}: the {what} is empty, holds a NUL character or is longer than {limit} bytes")
    log(f"export: chat template from {os.path.basename(where)} ({len(template.encode())} bytes; "
        f"{', '.join(f'{n} {v!r}' for n, v in variables) or 'no special-token strings'})")
    return pack_chat_section(template, variables)


def pack_chat_section(template, variables):
    """docs/FORMAT.md, "Chat section": u32 count, (u32 length, name, u32 length, value) per variable, u32 length,
    template; all text UTF-8"""
    out = [struct.pack("<I", len(variables))]
    for name, value in variables:
        out += [struct.pack("<I", len(name)), name.encode(), struct.pack("<I", len(value.encode())), value.encode()]
    out += [struct.pack("<I", len(template.encode())), template.encode()]
    return b"".join(out)


def pad_to(n, align=ALIGN):
    return (n + align - 1) // align * align


def tensor_nbytes(dtype, shape):
    count = int(np.prod(shape))
    if dtype == DTYPES["q8_0"]:  # the int8 values, then one f16 scale per group
        return count + count // Q8_GROUP * 2
    return count * (4 if dtype == DTYPES["f32"] else 2)


def quantize_q8_0(arr):
    """[rows][cols] -> rows*cols int8 values (row-major), then rows*cols/32 f16 scales (row-major): each group of
    32 values of a row is round(w / scale) with scale = max|w| / 127, so value * scale approximates w."""
    rows, cols = arr.shape
    groups = arr.reshape(rows, cols // Q8_GROUP, Q8_GROUP)
    with np.errstate(over="ignore"):
        scale = (np.abs(groups).max(axis=-1) / np.float32(127.0)).astype(np.float16)
    if not np.isfinite(scale).all():
        raise ExportError("a weight exceeds the q8_0 range (its scale overflows f16); export with --dtype bf16 or f32")
    s32 = scale.astype(np.float32)
    inv = np.divide(np.float32(1.0), s32, out=np.zeros_like(s32), where=s32 > 0)
    q = np.clip(np.rint(groups * inv[..., None]), -127, 127).astype(np.int8)
    return q.tobytes() + scale.astype("<f2").tobytes()


def matrix_dtype(dtype, name, shape):
    """The dtype a matrix is stored in: the export dtype, except that q8_0 needs whole groups of 32 columns
    (matrices that have not stay f32)."""
    if dtype == DTYPES["q8_0"] and shape[1] % Q8_GROUP:
        log(f"export: {name} {list(shape)} has columns that do not fill groups of {Q8_GROUP}: stored as f32, not q8_0")
        return DTYPES["f32"]
    return dtype


def encode_tensor(arr, dtype):
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == DTYPES["q8_0"]:
        return quantize_q8_0(arr)
    if dtype == DTYPES["f32"]:
        return arr.astype("<f4").tobytes()
    if dtype == DTYPES["f16"]:
        if np.abs(arr).max(initial=0.0) > 65504.0:
            raise ExportError("a weight exceeds the f16 range; export with --dtype bf16 or f32")
        return arr.astype("<f2").tobytes()
    return f32_to_bf16(arr).astype("<u2").tobytes()


# The loader's limits (model.c): a file outside them would be written only to be refused by ./run.
LIMITS = dict(dim=1 << 16, hidden_dim=1 << 20, vocab_size=1 << 22, context_length=1 << 24, layers=4096, heads=1024,
              head_dim=1024)


def check_model(m):
    """Fail before writing if the model description breaks a rule of the format (docs/FORMAT.md)."""
    def whole(v, what, lo, hi):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ExportError(f"{what} is {v!r} (the format allows {lo} .. {hi})")

    for f in ("dim", "hidden_dim", "vocab_size", "context_length"):
        whole(getattr(m, f), f, 1, LIMITS[f])
    whole(len(m.layers), "the number of layers", 1, LIMITS["layers"])
    if not 0.0 < m.norm_eps < 1.0:
        raise ExportError(f"norm epsilon {m.norm_eps} is not in (0, 1)")
    if not (math.isfinite(m.embed_scale) and math.isfinite(m.final_softcap) and m.final_softcap >= 0.0):
        raise ExportError(f"embed_scale {m.embed_scale} / final softcap {m.final_softcap} is not valid")
    for i, L in enumerate(m.layers):
        whole(L.n_heads, f"layer {i}: n_heads", 1, LIMITS["heads"])
        whole(L.head_dim, f"layer {i}: head_dim", 1, LIMITS["head_dim"])
        whole(L.window, f"layer {i}: sliding window", 0, LIMITS["context_length"])
        whole(L.rope_dim, f"layer {i}: rotary dimensions", 0, L.head_dim)
        if L.rope_dim % 2:
            raise ExportError(f"layer {i}: {L.rope_dim} rotary dimensions is odd (head_dim {L.head_dim})")
        if m.position_kind == POS_ROPE and L.rope_dim and L.rope_table < 0 and not L.rope_theta > 1.0:
            raise ExportError(f"layer {i}: rope_theta {L.rope_theta} is not valid")
        if not (math.isfinite(L.attn_scale) and L.attn_scale > 0 and math.isfinite(L.attn_softcap) and L.attn_softcap >= 0):
            raise ExportError(f"layer {i}: attention scale {L.attn_scale} / softcap {L.attn_softcap} is not valid")


HEADER = struct.Struct("<4sIQQQQIIQQQIIQQ")  # docs/FORMAT.md, the first bytes of the 128-byte header
CHAT_HEADER = struct.Struct("<QQ")  # at byte 96 of the header: the chat section's offset and size (0, 0: none)
TENSOR_RECORD = struct.Struct("<80s2I4IQQ")  # name, dtype, ndim, shape[4], offset, nbytes (of 128 bytes)


def read_tensor_directory(data):
    """The tensor directory of an attn.c file (bytes, or an mmap: only the header and the directory are
    read): a list of (record offset, name, dtype, shape, data offset, nbytes), in file order."""
    fields = HEADER.unpack_from(data)
    tensors_off, n_tensors = fields[10], fields[11]
    out = []
    for i in range(n_tensors):
        rec = tensors_off + 128 * i
        name, dt, ndim, *dims, off, nbytes = TENSOR_RECORD.unpack_from(data, rec)
        out.append((rec, name.split(b"\0")[0].decode(), dt, tuple(dims[:ndim]), off, nbytes))
    return out


def write_model(m, out, dtype):
    check_model(m)
    for i, t in enumerate(m.rope_tables):
        m.add(f"rope_inv_freq.{i}", t.shape, lambda t=t: t)
    n_layers, n_tensors = len(m.layers), len(m.tensors)
    tok, chat = m.tokenizer or b"", m.chat
    config_off = 128
    layers_off = config_off + 128
    tok_off = layers_off + 64 * n_layers
    chat_off = tok_off + len(tok) if chat else 0
    tensors_off = pad_to(tok_off + len(tok) + len(chat), 8)
    data_off = pad_to(tensors_off + 128 * n_tensors)
    directory, offset = [], data_off
    for name, shape, _ in m.tensors:
        if len(name.encode()) >= 80:
            raise ExportError(f"tensor name too long: {name}")
        dt = matrix_dtype(dtype, name, shape) if len(shape) == 2 else DTYPES["f32"]
        nbytes = tensor_nbytes(dt, shape)
        directory.append((name, dt, shape, offset, nbytes))
        offset = pad_to(offset + nbytes)
    file_size = offset

    header = HEADER.pack(b"ATNC", FORMAT_VERSION, file_size, config_off, 128, layers_off,
                         n_layers, 64, tok_off, len(tok), tensors_off, n_tensors, 128, data_off, file_size - data_off)
    header += CHAT_HEADER.pack(chat_off, len(chat))
    header += bytes(128 - len(header))
    config = struct.pack("<32s4I I f 3I 2f 2I", m.family.encode()[:31], m.dim, m.hidden_dim, m.vocab_size,
                         m.context_length, m.norm_kind, m.norm_eps, m.mlp_kind, m.activation, m.position_kind,
                         m.embed_scale, m.final_softcap, MODEL_TIED_EMBEDDINGS if m.tied else 0, len(m.rope_tables))
    config += bytes(128 - len(config))
    layers = b""
    for L in m.layers:
        rec = struct.pack("<4I f I i 2f I", L.n_heads, L.n_kv_heads, L.head_dim, L.window, L.rope_theta, L.rope_dim,
                          L.rope_table, L.attn_scale, L.attn_softcap, L.flags)
        layers += rec + bytes(64 - len(rec))
    dir_bytes = b""
    for name, dt, shape, off, nbytes in directory:
        dims = list(shape) + [0] * (4 - len(shape))
        rec = TENSOR_RECORD.pack(name.encode(), dt, len(shape), *dims, off, nbytes)
        dir_bytes += rec + bytes(128 - len(rec))

    out_dir = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header + config + layers + tok + chat)
            f.write(bytes(tensors_off - f.tell()))
            f.write(dir_bytes)
            f.write(bytes(data_off - f.tell()))
            for i, ((name, shape, producer), (_, dt, _, off, nbytes)) in enumerate(zip(m.tensors, directory)):
                arr = producer()
                if tuple(arr.shape) != shape:
                    raise ExportError(f"tensor '{name}': expected shape {list(shape)}, checkpoint gives {list(arr.shape)}")
                data = encode_tensor(arr, dt)
                assert len(data) == nbytes and f.tell() == off
                f.write(data)
                f.write(bytes(pad_to(f.tell()) - f.tell()))
                progress(f"export: tensor {i + 1} of {n_tensors} ({f.tell() / 1e6:.0f} of {file_size / 1e6:.0f} MB) {name}")
            progress(None)
            assert f.tell() == file_size
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    log(f"export: wrote {out} ({file_size / 1e6:.1f} MB, {n_layers} layers, {n_tensors} tensors)")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a Hugging Face or llama2.c checkpoint to an attn.c model file.")
    ap.add_argument("src", help="Hugging Face model directory, or a llama2.c .bin checkpoint")
    ap.add_argument("out", help="output model file")
    ap.add_argument("--dtype", choices=sorted(DTYPES),
                    help="weight dtype (default: the checkpoint's own); q8_0: int8 in groups of 32 with an f16 scale each")
    ap.add_argument("--tokenizer", metavar="FILE",
                    help="take the tokenizer from FILE: a tokenizer.json, a SentencePiece tokenizer.model or a llama2.c "
                         "tokenizer.bin (default: the model directory's tokenizer.json, else its tokenizer.model)")
    ap.add_argument("--chat-template", metavar="FILE",
                    help="the chat template to store: a .jinja file, or a .json holding chat_template (default: the "
                         "checkpoint's chat_template.jinja, tokenizer_config.json or chat_template.json)")
    ap.add_argument("--bf16-rope", action="store_true",
                    help="round RoPE inverse frequencies to bf16, as a model cast with .to(torch.bfloat16) computes "
                         "them (for checkpoints trained that way, such as kjv-5m)")
    ap.add_argument("--kv-heads", metavar="L=N[,L=N...]|all=N",
                    help="regroup key/value heads per layer: N a multiple of the layer's kv heads duplicates them "
                         "(exact), a divisor mean-pools each group's k/v projections (GQA/MQA from MHA, Ainslie et al. 2023)")
    args = ap.parse_args(argv)
    try:
        if os.path.isdir(args.src):
            m = convert_hf(args.src, args)
        elif os.path.isfile(args.src):
            m = convert_llama2c(args.src, args)
        else:
            raise ExportError(f"{args.src}: no such file or directory")
        dtype = DTYPES[args.dtype] if args.dtype else m.source_dtype
        if args.bf16_rope:
            round_rope_to_bf16(m)
        if args.kv_heads:
            regroup_kv_heads(m, parse_kv_heads(args.kv_heads, len(m.layers)))
        write_model(m, args.out, dtype)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"error: {args.src}: out of memory (is a size in the config absurd?)", file=sys.stderr)
        return 1
    except Exception as e:  # an input problem no check above names: still one line, still no output file
        print(f"error: {args.src}: cannot export ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
