"""gguf_reader.py - llama.cpp's GGUF files (version 2 and 3), read by hand with numpy, turned into what the
Hugging Face path of export.py takes: a config dict in Hugging Face terms, tensors under Hugging Face names
(GGUFTensors, like export.SafeTensors), and the tokenizer as a tokenizer.json dict. The family converters
of export.py then run unchanged.

    magic "GGUF", u32 version, u64 tensor count, u64 metadata count
    metadata: (string key, u32 type, value) ...      strings are u64 length + UTF-8 bytes; arrays are
                                                     u32 element type, u64 count, elements
    tensor infos: (string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type, u64 offset)
    padding to general.alignment (32), then the tensor data, each at its offset from there

What convert_hf_to_gguf.py changed on the way in is undone here: Llama-family q/k rows were permuted into
interleaved rotary pairs, Gemma's RMSNorm weights had 1 added, GPT-2's Conv1D weights were transposed, and
Llama 3.1's rope scaling became a `rope_freqs` tensor of per-frequency divisors. Quantized tensors (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K) are dequantized to float32 block by block (the block layouts of ggml-quants).
"""
import math
import os
import struct

import numpy as np

import pretokenizers


class GGUFError(Exception):
    """A GGUF file that cannot be read or converted (one line, naming the file)."""


def shown(name):
    """A key or tensor name from the file as a message may show it: printable, at most 80 characters."""
    text = "".join(c if c.isprintable() else "?" for c in name)
    return text if len(text) <= 80 else text[:77] + "..."


GGUF_MAGIC = b"GGUF"

# metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALARS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?",
           UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}

# ggml tensor types: name, elements per block, bytes per block
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
              7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
              12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2)}
OTHER_GGML_TYPES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


# ----------------------------------------------------------------------------
# the container


class GGUFFile:
    """The metadata (key -> value; arrays of numbers as numpy arrays, of strings as lists of bytes) and the
    tensor directory (name -> (ggml type, numpy shape, absolute offset, bytes)) of one GGUF file."""

    def __init__(self, path):
        self.path = path
        try:
            self.size = os.path.getsize(path)
            self.data = np.memmap(path, dtype=np.uint8, mode="r") if self.size else np.zeros(0, np.uint8)
        except OSError as e:
            raise GGUFError(f"{path}: {e.strerror}")
        self.pos = 0
        if self.take(4).tobytes() != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
        (self.version,) = self.unpack("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self.unpack("<QQ")
        if n_tensors > self.size or n_kv > self.size:
            raise GGUFError(f"{path}: implausible counts ({n_tensors} tensors, {n_kv} metadata entries)")
        self.meta = {}
        for _ in range(n_kv):
            key = self.string().decode("utf-8", "replace")
            (vtype,) = self.unpack("<I")
            self.meta[key] = self.value(vtype, key)
        alignment = self.meta.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{path}: general.alignment {alignment!r} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name = self.string().decode("utf-8", "replace")
            (n_dims,) = self.unpack("<I")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{path}: tensor '{shown(name)}' has {n_dims} dimensions")
            dims = self.unpack(f"<{n_dims}Q")
            ggml_type, offset = self.unpack("<IQ")
            infos.append((name, dims, ggml_type, offset))
        start = (self.pos + alignment - 1) // alignment * alignment
        self.tensors = {}
        for name, dims, ggml_type, offset in infos:
            if ggml_type not in GGML_TYPES:
                what = OTHER_GGML_TYPES.get(ggml_type, f"type {ggml_type}")
                raise GGUFError(f"{path}: tensor '{shown(name)}' is {what}, which export.py cannot dequantize "
                                f"(supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
            type_name, block, block_bytes = GGML_TYPES[ggml_type]
            count = math.prod(dims)
            if dims[0] % block:
                raise GGUFError(f"{path}: tensor '{shown(name)}' has rows of {dims[0]} values, not whole {type_name} blocks of {block}")
            nbytes = count // block * block_bytes
            if offset % alignment or start + offset + nbytes > self.size:
                raise GGUFError(f"{path}: tensor '{shown(name)}' data (offset {offset}, {nbytes} bytes) is misaligned or past the end")
            if name in self.tensors:
                raise GGUFError(f"{path}: tensor '{shown(name)}' appears twice")
            self.tensors[name] = (type_name, tuple(reversed(dims)), start + offset, nbytes)

    def take(self, n):
        if n > self.size - self.pos:
            raise GGUFError(f"{self.path}: truncated GGUF file (metadata or tensor directory runs past the end)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)).tobytes())

    def string(self):
        (n,) = self.unpack("<Q")
        return self.take(n).tobytes()

    def value(self, vtype, key):
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype])[0]
        if vtype == STRING:
            return self.string().decode("utf-8", "replace")
        if vtype == ARRAY:
            etype, n = self.unpack("<IQ")
            if n > self.size - self.pos:
                raise GGUFError(f"{self.path}: metadata array '{shown(key)}' of {n} entries runs past the end")
            if etype in SCALARS:
                width = struct.calcsize(SCALARS[etype])
                return np.frombuffer(self.take(n * width).tobytes(), dtype=SCALARS[etype])
            if etype == STRING:
                return [self.string() for _ in range(n)]
            raise GGUFError(f"{self.path}: metadata array '{shown(key)}' holds type {etype}")
        raise GGUFError(f"{self.path}: metadata '{shown(key)}' has unknown type {vtype}")

    def tensor(self, name):
        """A tensor as float32 in its numpy shape ([rows, cols] for a matrix)."""
        type_name, shape, offset, nbytes = self.tensors[name]
        raw = self.data[offset:offset + nbytes]
        return dequantize(raw, type_name, math.prod(shape)).reshape(shape)


# ----------------------------------------------------------------------------
# dequantization, one block layout each (ggml-quants.h): the f16 scales first, then the packed values


def f16(raw):
    return raw.copy().view("<f2").astype(np.float32)


def nibbles(qs):
    """[blocks, n] bytes -> [blocks, 2n]: the low nibbles, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def dequantize(raw, type_name, count):
    if type_name == "F32":
        return raw.view("<f4").astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    if type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    _, block, block_bytes = next(t for t in GGML_TYPES.values() if t[0] == type_name)
    b = np.asarray(raw).reshape(count // block, block_bytes)
    return DEQUANTIZERS[type_name](b).reshape(-1)


def dequantize_q8_0(b):  # d, 32 x int8: x = d q
    return f16(b[:, :2]) * b[:, 2:].copy().view(np.int8).astype(np.float32)


def dequantize_q4_0(b):  # d, 16 bytes of nibbles: x = d (q - 8)
    return f16(b[:, :2]) * (nibbles(b[:, 2:]) - 8)


def dequantize_q4_1(b):  # d, m, nibbles: x = d q + m
    return f16(b[:, :2]) * nibbles(b[:, 4:]) + f16(b[:, 2:4])


def fifth_bits(qh):
    """Q5: the 32 fifth bits of a block, bit j of the little-endian u32 for value j, as 0 or 16."""
    bits = qh.copy().view("<u4")
    return (((bits >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.float32)


def dequantize_q5_0(b):  # d, 4 bytes of fifth bits, nibbles: x = d (q - 16)
    return f16(b[:, :2]) * (nibbles(b[:, 6:]) + fifth_bits(b[:, 2:6]) - 16)


def dequantize_q5_1(b):  # d, m, fifth bits, nibbles: x = d q + m
    return f16(b[:, :2]) * (nibbles(b[:, 8:]) + fifth_bits(b[:, 4:8])) + f16(b[:, 2:4])


def k_scales_mins(s):
    """Q4_K / Q5_K: 8 six-bit scales and 8 six-bit mins packed in 12 bytes."""
    s = s.astype(np.uint8)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([d & 63, (md & 0x0F) | ((d >> 6) << 4)], axis=-1)
    mins = np.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def dequantize_q4_k(b):  # d, dmin, 12 bytes of scales/mins, 128 bytes: 4 groups of 32 bytes = 64 values
    n = len(b)
    d, dmin = f16(b[:, 0:2]), f16(b[:, 2:4])
    sc, mn = k_scales_mins(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)  # sub-block 2j: low, 2j+1: high
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, 256)


def dequantize_q5_k(b):  # d, dmin, scales/mins, 32 bytes of fifth bits, 128 bytes of nibbles
    n = len(b)
    d, dmin = f16(b[:, 0:2]), f16(b[:, 2:4])
    sc, mn = k_scales_mins(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:].reshape(n, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # sub-block i takes bit i
    q = (low | (high << 4)).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, 256)


def dequantize_q6_k(b):  # 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d
    n = len(b)
    ql, qh = b[:, :128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = f16(b[:, 208:210])
    low = np.concatenate([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32).reshape(n, 16, 16)
    return ((d * sc)[:, :, None] * q).reshape(n, 256)


def dequantize_q2_k(b):  # 16 bytes of 4-bit scale | 4-bit min, 64 bytes of 2-bit values, d, dmin
    n = len(b)
    scales, qs = b[:, :16], b[:, 16:80].reshape(n, 2, 32)
    d, dmin = f16(b[:, 80:82]), f16(b[:, 82:84])
    q = np.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], axis=2).reshape(n, 16, 16).astype(np.float32)
    dl = d * (scales & 0x0F).astype(np.float32)
    ml = dmin * (scales >> 4).astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, 256)


def q3_k_scales(s):
    """Q3_K: 16 six-bit scales (minus 32) packed in 12 bytes."""
    s = s.astype(np.uint8)
    low, high = s[:, :8], s[:, 8:12]
    lows = np.concatenate([low & 0x0F, low >> 4], axis=-1)              # scales 0-7, then 8-15
    highs = np.concatenate([(high >> sft) & 3 for sft in (0, 2, 4, 6)], axis=-1)  # 2 high bits: byte i%4, pair i//4
    return ((lows | (highs << 4)).astype(np.int8) - 32).astype(np.float32)


def dequantize_q3_k(b):  # 32 bytes high-bit mask, 64 bytes of 2-bit values, 12 bytes of scales, d
    n = len(b)
    hmask, qs = b[:, :32], b[:, 32:96].reshape(n, 2, 32)
    sc, d = q3_k_scales(b[:, 96:108]), f16(b[:, 108:110])
    low = np.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], axis=2).reshape(n, 8, 32)  # group g = 4 half + shift
    high = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1    # group g takes mask bit g
    q = (low.astype(np.int8) - np.where(high, 0, 4).astype(np.int8)).astype(np.float32).reshape(n, 16, 16)
    return ((d * sc)[:, :, None] * q).reshape(n, 256)


DEQUANTIZERS = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1, "Q5_0": dequantize_q5_0,
                "Q5_1": dequantize_q5_1, "Q2_K": dequantize_q2_k, "Q3_K": dequantize_q3_k, "Q4_K": dequantize_q4_k,
                "Q5_K": dequantize_q5_k, "Q6_K": dequantize_q6_k}


# ----------------------------------------------------------------------------
# architectures: GGUF metadata -> config.json, GGUF tensor names -> Hugging Face names

# GGUF general.architecture -> Hugging Face model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text",
                 "phi3": "phi3", "gpt2": "gpt2", "starcoder": "gpt_bigcode"}
GEMMA = ("gemma2", "gemma3")
LAYER_NAMES = {  # blk.N.<gguf> -> model.layers.N.<hf> (Llama-like families)
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GEMMA_LAYER_NAMES = dict(LAYER_NAMES, ffn_norm="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
                         post_ffw_norm="post_feedforward_layernorm")
PHI3_LAYER_NAMES = dict(LAYER_NAMES, ffn_up="mlp.gate_up_proj")  # Phi-3's fused gate+up, as in its checkpoint
GPT2_LAYER_NAMES = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                    "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


class GGUFTensors:
    """The tensors of a GGUF file under Hugging Face names, with the interface of export.SafeTensors: names(),
    shape(name) and dtype(name) (the GGUF type: F32, F16, BF16, Q8_0, Q4_K, ...) and get(name) as float32
    in the Hugging Face layout."""

    def __init__(self, gguf, arch, n_heads, n_kv_heads):
        self.gguf = gguf
        self.entries = {}  # hf name -> (gguf name, transform name or None)
        gpt = arch in ("gpt2", "starcoder")
        names = GPT2_LAYER_NAMES if gpt else GEMMA_LAYER_NAMES if arch in GEMMA else \
            PHI3_LAYER_NAMES if arch == "phi3" else LAYER_NAMES
        prefix = "transformer." if gpt else "model."
        top = {"token_embd": "wte" if gpt else "embed_tokens", "position_embd": "wpe", "output_norm": "ln_f" if gpt else "norm"}
        self.heads = {"q": n_heads, "k": n_kv_heads}
        for name in gguf.tensors:
            parts = name.split(".")
            hf, transform = None, None
            if len(parts) == 2 and parts[0] in top:
                hf = f"{prefix}{top[parts[0]]}.{parts[1]}"
            elif name == "output.weight":
                hf = "lm_head.weight"
            elif len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
                layers = "h" if gpt else "layers"
                hf = f"{prefix}{layers}.{parts[1]}.{names[parts[2]]}.{parts[3]}"
                if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
                    transform = "unpermute_" + parts[2][-1]  # convert_hf_to_gguf permuted them for interleaved rope
                elif arch == "gpt2" and parts[3] == "weight" and parts[2] in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
                    transform = "transpose"  # back to GPT-2's Conv1D [in, out]
            if hf is None:
                continue  # rope_freqs and the like: read as config; anything else is not the decoder's
            if arch in GEMMA and name.endswith("norm.weight"):
                transform = "minus_one"  # convert_hf_to_gguf stored Gemma's (1 + w)
            self.entries[hf] = (name, transform)

    def __contains__(self, name):
        return name in self.entries

    def names(self):
        return self.entries.keys()

    def shape(self, name):
        gguf_name, transform = self.entries[name]
        shape = list(self.gguf.tensors[gguf_name][1])
        return shape[::-1] if transform == "transpose" else shape

    def dtype(self, name):
        return self.gguf.tensors[self.entries[name][0]][0]

    def get(self, name):
        gguf_name, transform = self.entries[name]
        w = self.gguf.tensor(gguf_name)
        if transform == "transpose":
            return np.ascontiguousarray(w.T)
        if transform == "minus_one":
            return w - np.float32(1.0)
        if transform and transform.startswith("unpermute"):
            heads = self.heads[transform[-1]]
            half = w.shape[0] // heads // 2  # rows of a head were (pair i, member j) at i*2 + j: back to j*half + i
            return np.ascontiguousarray(w.reshape((heads, half, 2) + w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
        return w


def meta_int(g, key, default=None):
    v = g.meta.get(key, default)
    if isinstance(v, np.ndarray):  # a per-layer array: attn.c's converters take one value for the model
        if v.size == 0 or not np.all(v == v.flat[0]):
            raise GGUFError(f"{g.path}: {key} differs between layers ({list(v)[:8]}...), which is not supported")
        v = int(v.flat[0])
    if v is None:
        raise GGUFError(f"{g.path}: missing metadata {key}")
    return int(v)


def meta_float(g, key, default=None):
    v = g.meta.get(key, default)
    if v is None:
        raise GGUFError(f"{g.path}: missing metadata {key}")
    return float(v)


def layer_types(g, arch, n_layers):
    """'sliding_attention' / 'full_attention' per layer: {arch}.attention.sliding_window_pattern (a period N, layer i
    sliding unless i % N == N - 1, or one bool per layer), else llama.cpp's rule for the family (Gemma 2: every
    other layer; Gemma 3: five of six), else every layer slides when a window is given."""
    pattern = g.meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, np.ndarray):
        if len(pattern) != n_layers:
            raise GGUFError(f"{g.path}: sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    period = int(pattern) if pattern is not None else {"gemma2": 2, "gemma3": 6}.get(arch, 1)
    return ["sliding_attention" if period <= 1 or i % period < period - 1 else "full_attention" for i in range(n_layers)]


def hf_config(g, arch):
    """config.json for the GGUF's decoder, in the transformers-4 dialect the converters read."""
    a = arch
    n_heads = meta_int(g, f"{a}.attention.head_count")
    if "token_embd.weight" not in g.tensors:
        raise GGUFError(f"{g.path}: no token_embd.weight tensor (a vocabulary-only file? give it to --tokenizer)")
    vocab, dim = g.tensors["token_embd.weight"][1]
    cfg = {"model_type": ARCHITECTURES[arch], "vocab_size": vocab, "hidden_size": meta_int(g, f"{a}.embedding_length"),
           "num_hidden_layers": meta_int(g, f"{a}.block_count"), "num_attention_heads": n_heads,
           "intermediate_size": meta_int(g, f"{a}.feed_forward_length"),
           "max_position_embeddings": meta_int(g, f"{a}.context_length", 2048)}
    if arch in ("gpt2", "starcoder"):
        n_kv = meta_int(g, f"{a}.attention.head_count_kv", n_heads)
        cfg.update(n_embd=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], n_head=n_heads,
                   n_positions=cfg["max_position_embeddings"], n_inner=cfg["intermediate_size"],
                   layer_norm_epsilon=meta_float(g, f"{a}.attention.layer_norm_epsilon", 1e-5),
                   activation_function="gelu_new" if arch == "gpt2" else "gelu_pytorch_tanh",
                   multi_query=n_kv == 1)
        if arch == "starcoder" and n_kv not in (1, n_heads):
            raise GGUFError(f"{g.path}: {n_kv} kv heads for {n_heads} query heads is not a StarCoder layout")
        return cfg
    head_dim = meta_int(g, f"{a}.attention.key_length", cfg["hidden_size"] // n_heads)
    if meta_int(g, f"{a}.attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{g.path}: key and value head sizes differ, which is not supported")
    cfg.update(num_key_value_heads=meta_int(g, f"{a}.attention.head_count_kv", n_heads), head_dim=head_dim,
               rms_norm_eps=meta_float(g, f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
               rope_theta=meta_float(g, f"{a}.rope.freq_base", 10000.0),
               hidden_act="gelu_pytorch_tanh" if arch in GEMMA else "silu",
               tie_word_embeddings="output.weight" not in g.tensors)
    rope_dim = meta_int(g, f"{a}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        cfg["partial_rotary_factor"] = rope_dim / head_dim
    scaling = g.meta.get(f"{a}.rope.scaling.type", "none")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": meta_float(g, f"{a}.rope.scaling.factor")}
    elif scaling not in ("none", None):
        raise GGUFError(f"{g.path}: rope scaling '{scaling}' is not supported (supported: linear, Llama 3's rope_freqs)")
    if "rope_freqs.weight" in g.tensors:  # Llama 3.1: inverse frequencies divided by these factors
        cfg["rope_scaling"] = {"rope_type": "freq_factors", "factors": g.tensor("rope_freqs.weight").tolist()}
    if any(n in g.tensors for n in ("rope_factors_long.weight", "rope_factors_short.weight")):
        raise GGUFError(f"{g.path}: LongRoPE scaling (rope_factors_long/short) is not supported")
    window = g.meta.get(f"{a}.attention.sliding_window")
    if window:
        cfg["sliding_window"] = int(window)
        cfg["layer_types"] = layer_types(g, arch, cfg["num_hidden_layers"])
    if arch in GEMMA:
        # llama.cpp scales scores by attention.scale when given, else 1/sqrt(head_dim), or for the 27B models
        # (46 / 62 layers) 1/sqrt(hidden / heads): query_pre_attn_scalar in the Hugging Face config
        if f"{a}.attention.scale" in g.meta:
            cfg["query_pre_attn_scalar"] = 1.0 / meta_float(g, f"{a}.attention.scale") ** 2
        else:
            big = cfg["num_hidden_layers"] == {"gemma2": 46, "gemma3": 62}[arch]
            cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // n_heads if big else head_dim
        cfg["attn_logit_softcapping"] = g.meta.get(f"{a}.attn_logit_softcapping")
        cfg["final_logit_softcapping"] = g.meta.get(f"{a}.final_logit_softcapping")
        if arch == "gemma3":
            cfg["rope_local_base_freq"] = meta_float(g, f"{a}.rope.freq_base_swa", 10000.0)
    return cfg


class GGUFCheckpoint:
    """A GGUF model file as export.py's Hugging Face path takes it: config (dict), tensors (GGUFTensors),
    tokenizer (a tokenizer.json dict, or None) and its eos ids."""

    def __init__(self, path):
        self.gguf = g = GGUFFile(path)
        arch = g.meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{path}: GGUF architecture '{shown(str(arch))}' is not supported (supported: {', '.join(ARCHITECTURES)})")
        self.arch = arch
        self.config = hf_config(g, arch)
        self.tensors = GGUFTensors(g, arch, self.config["num_attention_heads"],
                                   self.config.get("num_key_value_heads", self.config["num_attention_heads"]))
        if self.config.get("tie_word_embeddings") is False and tied_copy(g):
            self.config["tie_word_embeddings"] = True  # GPT-2 conversions store the tied classifier twice
        if tied_copy(g):
            del self.tensors.entries["lm_head.weight"]
        self.tokenizer, self.eos = (tokenizer_json(g) if "tokenizer.ggml.model" in g.meta else (None, []))


def tied_copy(g):
    """Whether output.weight is a byte-for-byte copy of token_embd.weight."""
    a, b = g.tensors.get("output.weight"), g.tensors.get("token_embd.weight")
    if not a or not b or a[:2] != b[:2]:
        return False
    return np.array_equal(g.data[a[2]:a[2] + a[3]], g.data[b[2]:b[2] + b[3]])


# ----------------------------------------------------------------------------
# the vocabulary: tokenizer.ggml.* -> a tokenizer.json (what the tokenizers library would load)

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
# control tokens that end a turn, which llama.cpp also stops at (its end-of-generation set)
END_OF_TURN = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
               "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>"}
SPACE_MARK = "\u2581"


def sentencepiece_merges(vocab, scores, mergeable):
    """BPE merges for a vocabulary that has only scores, as the tokenizers library's converter derives them from
    a SentencePiece model (SentencePieceExtractor): every split of a piece into two pieces of the vocabulary,
    ordered by the score of the joined piece, best first (stably, so equal scores keep vocabulary order)."""
    merges = []
    for piece, i in vocab.items():
        if not mergeable[i]:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        local = [(l, r) for l, r in local if l in vocab and r in vocab and mergeable[vocab[l]] and mergeable[vocab[r]]]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((l, r, scores[i]) for l, r in local)
    merges.sort(key=lambda m: m[2], reverse=True)
    return [[l, r] for l, r, _ in merges]


def tokenizer_json(g):
    """(tokenizer.json dict, eos ids) for the vocabulary of a GGUF file."""
    path, meta = g.path, g.meta
    model = meta.get("tokenizer.ggml.model")
    if model in ("bert", "t5", "rwkv", "plamo2", "no_vocab", "none"):
        what = {"bert": "WordPiece (BERT)", "t5": "Unigram (T5)", "rwkv": "RWKV's trie tokenizer",
                "plamo2": "PLaMo-2's Aho-Corasick tokenizer"}.get(model, "no vocabulary")
        raise GGUFError(f"{path}: tokenizer.ggml.model '{model}' is {what}, which attn.c does not implement "
                        f"(it runs byte-level BPE 'gpt2' and SentencePiece-style BPE 'llama')")
    if model not in ("gpt2", "llama"):
        raise GGUFError(f"{path}: tokenizer.ggml.model '{shown(str(model))}' is not supported (supported: gpt2, llama)")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{path}: no tokenizer.ggml.tokens")
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if isinstance(types, np.ndarray) and len(types) == n else [TOKEN_NORMAL] * n
    text = [t.decode("utf-8", "replace") for t in tokens]

    def special_id(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        return int(v) if isinstance(v, int) and 0 <= v < n else None

    bos, eos, unk = special_id("bos_token_id"), special_id("eos_token_id"), special_id("unknown_token_id")
    added = [{"id": i, "content": text[i], "special": types[i] == TOKEN_CONTROL, "normalized": False,
              "lstrip": False, "rstrip": False, "single_word": False}
             for i in range(n) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    if model == "llama":
        tok, add_bos = sentencepiece_json(g, text, types, unk)
    else:
        tok, add_bos = bytelevel_json(g, text, types)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
    tok["added_tokens"] = added
    if add_bos and bos is not None:
        tok["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": text[bos], "type_id": 0}},
                                                                        {"Sequence": {"id": "A", "type_id": 0}}],
                                 "special_tokens": {text[bos]: {"id": text[bos], "ids": [bos], "tokens": [text[bos]]}}}
    eos_ids = [i for i in (eos, special_id("eot_token_id"), special_id("eom_token_id")) if i is not None]
    eos_ids += [i for i in range(n) if types[i] == TOKEN_CONTROL and text[i] in END_OF_TURN and i not in eos_ids]
    return tok, eos_ids


def sentencepiece_json(g, text, types, unk):
    """A SentencePiece vocabulary (pieces with "▁", scores, <0xNN> byte pieces) as the tokenizers library's
    Llama converter writes it: merges derived from the scores, a "▁" put before each stretch of text and spaces
    written "▁" (unless tokenizer.ggml.add_space_prefix says no prefix), byte fallback."""
    scores = g.meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, np.ndarray) or len(scores) != len(text):
        raise GGUFError(f"{g.path}: a SentencePiece ('llama') vocabulary without one tokenizer.ggml.scores per token")
    if g.meta.get("tokenizer.ggml.remove_extra_whitespaces"):
        raise GGUFError(f"{g.path}: tokenizer.ggml.remove_extra_whitespaces is not supported for GGUF vocabularies")
    vocab = {}
    for i, t in enumerate(text):
        vocab.setdefault(t, i)
    mergeable = [t in (TOKEN_NORMAL, TOKEN_UNUSED) or (t == TOKEN_UNKNOWN and i != unk) for i, t in enumerate(types)]
    normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK}]
    if g.meta.get("tokenizer.ggml.add_space_prefix", True):
        normalizers.insert(0, {"type": "Prepend", "prepend": SPACE_MARK})
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": sentencepiece_merges(vocab, [float(s) for s in scores], mergeable),
                     "byte_fallback": True, "fuse_unk": True, "unk_token": text[unk] if unk is not None else None},
           "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
           "decoder": {"type": "Sequence", "decoders": [
               {"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}}
    return tok, True


def bytelevel_json(g, text, types):
    """A byte-level BPE vocabulary (GPT-2's byte alphabet, ranked merges) with the pre-tokenizer its
    tokenizer.ggml.pre names."""
    pre = g.meta.get("tokenizer.ggml.pre", "default")
    if pre not in pretokenizers.NAMED:
        raise GGUFError(f"{g.path}: pre-tokenizer '{shown(str(pre))}' (tokenizer.ggml.pre) is not known to export.py "
                        f"(known: {', '.join(sorted(pretokenizers.NAMED))})")
    steps, ignore_merges, add_bos = pretokenizers.NAMED[pre]
    merges = g.meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise GGUFError(f"{g.path}: a byte-level BPE ('gpt2') vocabulary without tokenizer.ggml.merges")
    vocab = {}
    for i, (t, kind) in enumerate(zip(text, types)):
        if kind not in (TOKEN_CONTROL, TOKEN_USER_DEFINED):  # those are added tokens, stored as plain text
            vocab.setdefault(t, i)
    pretokenizer = [{"type": "Split", "pattern": {"Regex": regex}, "invert": invert,
                     "behavior": [b for b, v in pretokenizers.BEHAVIORS.items() if v == behavior][0]}
                    for regex, behavior, invert in steps]
    pretokenizer.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": [m.decode("utf-8", "replace") for m in merges],
                     "ignore_merges": ignore_merges, "byte_fallback": False},
           "normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizer},
           "decoder": {"type": "ByteLevel"}}
    return tok, add_bos


def read_vocabulary(path):
    """(tokenizer.json dict, eos ids) of any GGUF file that has a vocabulary (model files and vocab-only ones)."""
    g = GGUFFile(path)
    if "tokenizer.ggml.model" not in g.meta:
        raise GGUFError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.model)")
    return tokenizer_json(g)
