#!/usr/bin/env python3
"""export.py - turn a Hugging Face checkpoint, a llama.cpp GGUF file or a llama2.c checkpoint into one attn.c model file.

    python3 export.py SRC OUT [--dtype f32|bf16|f16|q8_0|q4_0] [--tokenizer FILE] [--bf16-rope] [--kv-heads L=N[,L=N...] | all=N]
                      [--no-tokenizer] [--no-softmax-mscale]

SRC is a Hugging Face model directory (config.json + *.safetensors + tokenizer files), a llama.cpp GGUF file
(gguf_reader.py), or a llama2.c checkpoint (.bin, versions 0, 1 and 2). Needs only Python 3 and numpy:
safetensors, GGUF, JSON and SentencePiece's protobuf are read by hand.
The file layout is documented in docs/FORMAT.md; write_model() below writes the fields in that order.
"""
import argparse
import contextlib
import functools
import gc
import json
import math
import os
import re
import stat
import struct
import sys
import tempfile

try:
    import numpy as np
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("error: export.py needs numpy (Debian: apt-get install python3-numpy)")

import gguf_reader
from pretokenizers import GPT2_REGEX, LLAMA3_REGEX, QWEN2_REGEX, PretokenizerError, split_steps

FORMAT_VERSION = 2
ALIGN = 64

DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4}
Q8_GROUP = 32  # q8_0 / q4_0: int8 / 4-bit values in groups of 32 along a row, one f16 scale per group
Q4_PAIR = 64   # q4_0: a row's columns come in pairs of groups, 32 bytes each (docs/FORMAT.md)

NORM_RMS, NORM_LAYER = 0, 1
ACT_SILU, ACT_GELU_TANH, ACT_GELU, ACT_SWIGLU_CLAMPED = 0, 1, 2, 3
POS_ROPE, POS_LEARNED = 0, 1
MIXER_ATTENTION, MIXER_LATENT_ATTENTION, MIXER_MAMBA, MIXER_MAMBA2, MIXER_GATED_DELTANET, MIXER_RWKV = 1, 2, 3, 4, 5, 6
FFN_NONE, FFN_GATED, FFN_PLAIN, FFN_MOE, FFN_RWKV = 0, 1, 2, 3, 4
ROUTER_SOFTMAX, ROUTER_TOPK_SOFTMAX, ROUTER_SIGMOID = 0, 1, 2
# flag bits (model.h): each record has its own range, so one word says which tensors a layer has (tensors.def)
FLAG_BITS = dict(
    LAYER_MIXER_NORM=1 << 0, LAYER_MIXER_POST_NORM=1 << 1, LAYER_FFN_NORM=1 << 2, LAYER_FFN_POST_NORM=1 << 3,
    ATTN_QK_NORM=1 << 4, ATTN_QKV_BIAS=1 << 5, ATTN_O_BIAS=1 << 6, ATTN_QK_NORM_FULL=1 << 7, ATTN_QK_NORM_PLAIN=1 << 8,
    ATTN_SINKS=1 << 9, ATTN_OUTPUT_GATE=1 << 10, MLA_Q_LORA=1 << 4, SSM_CONV_BIAS=1 << 4, SSM_PROJ_BIAS=1 << 5,
    FFN_BIAS=1 << 12, MOE_NORM_TOPK=1 << 13, MOE_ROUTER_BIAS=1 << 14, MOE_EXPERT_BIAS=1 << 15, MOE_SCORE_BIAS=1 << 16,
    MOE_SHARED=1 << 17, MOE_SHARED_GATE=1 << 18, MOE_SCALE_INPUT=1 << 19, MOE_GROUP_TOP2=1 << 20,
    MODEL_TIED_EMBEDDINGS=1 << 24, PRESENT_LEARNED_POSITIONS=1 << 29, PRESENT_LAYERNORM=1 << 30)
globals().update(FLAG_BITS)

TOK_BYTELEVEL_BPE, TOK_SENTENCEPIECE_BPE = 1, 2
PRE_NONE, PRE_GPT2, PRE_LLAMA3, PRE_QWEN2, PRE_METASPACE, PRE_SPLITS = 0, 1, 2, 3, 4, 5
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
# reading inputs: regular files only, text of a bounded size, and a record of what was read

MAX_JSON_BYTES = 64 << 20        # config.json, tokenizer_config.json, generation_config.json, an index
MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json / .model / .bin (Gemma 3's 262k-token tokenizer.json: 33 MB)
INPUTS = set()                   # (st_dev, st_ino) of every file this export has read: the output may be none of them


def open_input(path, limit=None):
    """path opened for reading in binary, if it is a regular file (of at most limit bytes). A FIFO would block
    and /dev/zero never ends, so the type is checked before anything is read (O_NONBLOCK: opening a FIFO
    waits for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ExportError(f"{path}: {e.strerror}")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (limit is not None and st.st_size > limit):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ExportError(f"{path}: {os.strerror(21)}")  # EISDIR: "Is a directory"
        if not stat.S_ISREG(st.st_mode):
            raise ExportError(f"{path}: not a regular file (a FIFO, a device or a socket cannot be an input)")
        raise ExportError(f"{path}: {st.st_size} bytes, more than the {limit >> 20} MiB such a file may have")
    os.set_blocking(fd, True)
    INPUTS.add((st.st_dev, st.st_ino))
    return os.fdopen(fd, "rb")


class DuplicateKey(ValueError):
    pass


def unique_keys(pairs):
    """json object_pairs_hook: an object that names a key twice is refused (which one would count?)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
    return obj


def parse_json(path, raw, what=""):
    """raw bytes of a JSON file -> its value; an error names the file (and never quotes its bytes)."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise ExportError(f"{path}: key {e.args[0]!r} appears twice in one JSON object")
    except UnicodeDecodeError:
        raise ExportError(f"{path}: {what}not valid JSON (not UTF-8 text)")
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{path}: {what}not valid JSON ({e})")


def load_json(path, limit=MAX_JSON_BYTES):
    with open_input(path, limit) as f:
        return parse_json(path, f.read())


# ----------------------------------------------------------------------------
# reading safetensors by hand: 8-byte header length, JSON header, raw little-endian data

ST_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "U8": ("<u1", 1)}  # U8: MXFP4 blocks, scales


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


MAX_SAFETENSORS_HEADER = 16 << 20  # bytes of JSON: room for ~100k tensor entries, more than any real file holds


def shard_path(directory, index, name):
    """The file a weight_map entry names, which must lie inside the model directory: a relative path without
    "..", whose real path (symbolic links resolved) is inside the directory's -- or, for a snapshot of the
    Hugging Face cache (.../snapshots/REV/, whose files link to ../../blobs/), inside that cache's blobs."""
    inside = [os.path.realpath(directory)]
    if os.path.basename(os.path.dirname(inside[0])) == "snapshots":
        inside.append(os.path.join(os.path.dirname(os.path.dirname(inside[0])), "blobs"))
    real = os.path.realpath(os.path.join(directory, name))
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or ".." in parts or not any(real.startswith(d + os.sep) for d in inside):
        raise ExportError(f"{index}: weight_map names {name!r}, which lies outside the model directory")
    return os.path.join(directory, name)


class SafeTensors:
    """All tensors of a checkpoint (one file or shards), read lazily through numpy memmaps."""

    def __init__(self, directory):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(single):
            files = [single]
        elif os.path.exists(index):
            weight_map = load_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ExportError(f"{index}: no weight_map of tensor names to file names")
            files = [shard_path(directory, index, f) for f in sorted(set(weight_map.values()))]
        else:
            files = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise ExportError(f"{directory}: no model.safetensors, no model.safetensors.index.json, no *.safetensors")
        self.entries = {}
        self.file_of = {}  # tensor name -> the file that holds it
        gc.disable()  # a header of 200k entries is 1M small objects: the cycle collector would walk them again and again
        try:
            for path in files:
                self._read_header(path)
        finally:
            gc.enable()

    def _read_header(self, path):
        with open_input(path) as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise ExportError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
                raise ExportError(f"{path}: safetensors header length does not fit the file ({size} bytes) or the "
                                  f"{MAX_SAFETENSORS_HEADER >> 20} MiB limit: not a safetensors file?")
            header = parse_json(path, f.read(n), "safetensors header is ")
            if not isinstance(header, dict):
                raise ExportError(f"{path}: safetensors header is not a JSON object")
            meta = header.pop("__metadata__", {})
            if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
                raise ExportError(f"{path}: safetensors __metadata__ is not an object of strings")
            mm = np.memmap(f, dtype=np.uint8, mode="r") if header else None
        base, spans = 8 + n, []
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
                if not isinstance(dtype, str) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                         for x in shape + [begin, end]):
                    raise TypeError("dtype must be a string, shape and data_offsets non-negative integers")
            except (KeyError, TypeError, ValueError):
                raise ExportError(f"{path}: tensor '{name}' has a malformed header entry")
            if dtype not in ST_DTYPES:
                raise ExportError(f"{path}: tensor '{name}' has dtype {dtype}; only F32, BF16, F16 (and U8 for MXFP4) are supported")
            np_dtype, width = ST_DTYPES[dtype]
            count = math.prod(shape)
            if end - begin != count * width or base + end > size:
                raise ExportError(f"{path}: tensor '{name}' data ({begin}..{end}) does not match its shape or lies past the end of the file")
            if name in self.entries:
                raise ExportError(f"tensor '{name}' is in both {self.file_of[name]} and {path}")
            self.entries[name] = (mm, base + begin, count, np_dtype, dtype, shape)
            self.file_of[name] = path
            if end > begin:
                spans.append((begin, end, name))
        spans.sort()
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise ExportError(f"{path}: tensors '{a}' and '{b}' share bytes (their data_offsets overlap)")

    def __contains__(self, name):
        return name in self.entries

    def names(self):
        return self.entries.keys()

    def shape(self, name):
        return self.entries[name][5]

    def dtype(self, name):
        return self.entries[name][4]

    def get_raw(self, name):
        """The tensor as stored (uint16 for bf16), in its stored shape."""
        if name not in self.entries:
            raise ExportError(f"missing tensor '{name}' in the checkpoint")
        mm, offset, count, np_dtype, dtype, shape = self.entries[name]
        return np.frombuffer(mm, dtype=np_dtype, count=count, offset=offset).reshape(shape)

    def get(self, name):
        """The tensor as float32, in its stored shape."""
        arr = self.get_raw(name)
        return bf16_to_f32(arr) if self.dtype(name) == "BF16" else arr.astype(np.float32)


# ----------------------------------------------------------------------------
# the model description every converter produces


class Attention:
    """A softmax-attention mixer (docs/FORMAT.md, "attention record")."""
    kind = MIXER_ATTENTION

    def __init__(self, n_heads, n_kv_heads, head_dim, window=0, chunk=0, rope_theta=10000.0, rope_dim=None,
                 rope_table=-1, rope_attn_factor=1.0, attn_scale=None, attn_softcap=0.0, temperature_floor=0.0,
                 temperature_scale=0.0, flags=0):
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ExportError(f"bad head counts: {n_heads} query heads, {n_kv_heads} kv heads")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.chunk = int(window or 0), int(chunk or 0)
        self.rope_theta = float(rope_theta)
        self.rope_dim = head_dim if rope_dim is None else rope_dim
        self.rope_table = rope_table
        self.rope_attn_factor = float(rope_attn_factor)
        self.attn_scale = head_dim ** -0.5 if attn_scale is None else attn_scale
        self.attn_softcap = float(attn_softcap or 0.0)
        self.temperature_floor, self.temperature_scale = float(temperature_floor), float(temperature_scale)
        self.flags = flags

    def dims(self):
        return dict(Q_DIM=self.n_heads * self.head_dim, KV_DIM=self.n_kv_heads * self.head_dim, HEAD_DIM=self.head_dim,
                    N_HEADS=self.n_heads)

    def pack(self):
        return struct.pack("<7I 6f I", self.n_heads, self.n_kv_heads, self.head_dim, self.window, self.chunk,
                           self.rope_dim, self.rope_table & 0xFFFFFFFF, self.rope_theta, self.rope_attn_factor,
                           self.attn_scale, self.attn_softcap, self.temperature_floor, self.temperature_scale, self.flags)


class LatentAttention:
    """A multi-head latent attention mixer, DeepSeek's MLA (docs/FORMAT.md, "latent attention record").

    The softmax scale is (nope + rope)^-0.5 times softmax_mscale: DeepSeek's YaRN correction mscale^2, which
    the exporter folds in (1 without YaRN)."""
    kind = MIXER_LATENT_ATTENTION

    def __init__(self, n_heads, q_rank, kv_rank, nope_dim, rope_dim, v_dim, rope_theta=10000.0, rope_table=-1,
                 rope_attn_factor=1.0, softmax_mscale=1.0, norm_eps=1e-6):
        self.n_heads, self.q_rank, self.kv_rank = n_heads, q_rank, kv_rank
        self.nope_dim, self.rope_dim, self.v_dim = nope_dim, rope_dim, v_dim
        self.rope_theta, self.rope_table, self.rope_attn_factor = float(rope_theta), rope_table, float(rope_attn_factor)
        self.softmax_mscale, self.norm_eps = float(softmax_mscale), float(norm_eps)
        self.flags = MLA_Q_LORA if q_rank else 0

    @property
    def attn_scale(self):
        return (self.nope_dim + self.rope_dim) ** -0.5 * self.softmax_mscale

    def dims(self):
        return dict(LATENT_Q=self.n_heads * (self.nope_dim + self.rope_dim), Q_RANK=self.q_rank, KV_RANK=self.kv_rank,
                    LATENT_KV_A=self.kv_rank + self.rope_dim, LATENT_HEADS=self.n_heads, NOPE=self.nope_dim,
                    V_DIM=self.v_dim, LATENT_OUT=self.n_heads * self.v_dim)

    def check(self, where):
        for v, what, lo, hi in ((self.n_heads, "n_heads", 1, LIMITS["heads"]), (self.q_rank, "q_lora_rank", 0, LIMITS["hidden_dim"]),
                                (self.kv_rank, "kv_lora_rank", 1, LIMITS["latent_rank"]),
                                (self.nope_dim, "qk_nope_head_dim", 1, LIMITS["head_dim"]),
                                (self.v_dim, "v_head_dim", 1, LIMITS["head_dim"]),
                                (self.rope_dim, "rotary dimensions", 0, LIMITS["head_dim"])):
            whole_number(v, f"{where}: {what}", lo, hi)
        if self.rope_dim % 2:
            raise ExportError(f"{where}: {self.rope_dim} rotary dimensions is odd")
        if self.rope_dim and self.rope_table < 0 and not self.rope_theta > 1.0:
            raise ExportError(f"{where}: rope_theta {self.rope_theta} is not valid")
        if not (math.isfinite(self.attn_scale) and self.attn_scale > 0 and math.isfinite(self.rope_attn_factor)
                and self.rope_attn_factor > 0):
            raise ExportError(f"{where}: attention scale {self.attn_scale} / rope factor {self.rope_attn_factor} is not valid")

    def pack(self):
        return struct.pack("<7I 4f I", self.n_heads, self.q_rank, self.kv_rank, self.nope_dim, self.rope_dim, self.v_dim,
                           self.rope_table & 0xFFFFFFFF, self.rope_theta, self.rope_attn_factor, self.attn_scale,
                           self.norm_eps, self.flags)


class Mamba:
    """Mamba's selective scan (docs/FORMAT.md, "mamba record"): x, z = in_proj(u); conv over x (`conv` taps);
    dt, B, C from the conv's output (dt through a rank dt_rank bottleneck); a state of `state` per channel."""
    kind = MIXER_MAMBA

    def __init__(self, inner, state, conv, dt_rank, flags=0):
        self.inner, self.state, self.conv, self.dt_rank, self.flags = inner, state, conv, dt_rank, flags

    def dims(self):
        return dict(INNER=self.inner, STATE=self.state, CONV=self.conv, CONV_DIM=self.inner, DT_RANK=self.dt_rank)

    def check(self, where):
        for v, what, hi in ((self.inner, "inner width", LIMITS["hidden_dim"]), (self.state, "state size", LIMITS["state"]),
                            (self.conv, "convolution width", LIMITS["conv"]), (self.dt_rank, "dt rank", LIMITS["hidden_dim"])):
            whole_number(v, f"{where}: mamba {what}", 1, hi)

    def pack(self):
        return struct.pack("<5I", self.inner, self.state, self.conv, self.dt_rank, self.flags)


class Mamba2:
    """Mamba-2's state space duality (docs/FORMAT.md, "mamba2 record"): z | x B C | dt = in_proj(u); conv over
    x B C; n_heads heads of head_dim, B and C per group of heads; the chunked scan takes `chunk` tokens at a time;
    dt clamped to [dt_min, dt_max]."""
    kind = MIXER_MAMBA2

    def __init__(self, n_heads, head_dim, n_groups, state, conv, chunk, dt_min=0.0, dt_max=math.inf, flags=0):
        self.n_heads, self.head_dim, self.n_groups, self.state = n_heads, head_dim, n_groups, state
        self.conv, self.chunk, self.dt_min, self.dt_max, self.flags = conv, chunk, float(dt_min), float(dt_max), flags

    def dims(self):
        inner = self.n_heads * self.head_dim
        return dict(INNER=inner, STATE=self.state, CONV=self.conv, CONV_DIM=inner + 2 * self.n_groups * self.state,
                    SSM_HEADS=self.n_heads, SSM_HEAD_DIM=self.head_dim)

    def check(self, where):
        for v, what, lo, hi in ((self.n_heads, "heads", 1, LIMITS["heads"]), (self.head_dim, "head_dim", 1, LIMITS["head_dim"]),
                                (self.n_groups, "groups", 1, self.n_heads), (self.state, "state size", 1, LIMITS["state"]),
                                (self.conv, "convolution width", 1, LIMITS["conv"]), (self.chunk, "chunk", 1, LIMITS["chunk"]),
                                (self.n_heads * self.head_dim * self.state, "state", 1, LIMITS["state_floats"])):
            whole_number(v, f"{where}: mamba2 {what}", lo, hi)
        if self.n_heads % self.n_groups or not 0 <= self.dt_min < self.dt_max:
            raise ExportError(f"{where}: mamba2 {self.n_heads} heads in {self.n_groups} groups, dt limits "
                              f"{self.dt_min} .. {self.dt_max}: not valid")

    def pack(self):
        return struct.pack("<6I 2f I", self.n_heads, self.head_dim, self.n_groups, self.state, self.conv, self.chunk,
                           self.dt_min, self.dt_max, self.flags)


class DeltaNet:
    """The gated delta rule (docs/FORMAT.md, "gated_deltanet record"): q | k | v = in_proj(u) then a causal conv,
    n_v_heads value heads of v_head_dim each reading key head h / (n_v / n_k) of k_head_dim; the chunked scan
    takes `chunk` tokens at a time."""
    kind = MIXER_GATED_DELTANET

    def __init__(self, n_k_heads, n_v_heads, k_head_dim, v_head_dim, conv, chunk, flags=0):
        self.n_k_heads, self.n_v_heads, self.k_head_dim, self.v_head_dim = n_k_heads, n_v_heads, k_head_dim, v_head_dim
        self.conv, self.chunk, self.flags = conv, chunk, flags

    def dims(self):
        inner = self.n_v_heads * self.v_head_dim
        return dict(INNER=inner, CONV=self.conv, CONV_DIM=inner + 2 * self.n_k_heads * self.k_head_dim,
                    SSM_HEADS=self.n_v_heads, SSM_HEAD_DIM=self.v_head_dim)

    def check(self, where):
        for v, what, lo, hi in ((self.n_k_heads, "key heads", 1, LIMITS["heads"]),
                                (self.n_v_heads, "value heads", 1, LIMITS["heads"]),
                                (self.k_head_dim, "key head_dim", 1, LIMITS["head_dim"]),
                                (self.v_head_dim, "value head_dim", 1, LIMITS["head_dim"]),
                                (self.conv, "convolution width", 1, LIMITS["conv"]), (self.chunk, "chunk", 1, LIMITS["chunk"]),
                                (self.n_v_heads * self.k_head_dim * self.v_head_dim, "state", 1, LIMITS["state_floats"])):
            whole_number(v, f"{where}: gated deltanet {what}", lo, hi)
        if self.n_v_heads % self.n_k_heads:
            raise ExportError(f"{where}: {self.n_v_heads} value heads cannot share {self.n_k_heads} key heads evenly")

    def pack(self):
        return struct.pack("<7I", self.n_k_heads, self.n_v_heads, self.k_head_dim, self.v_head_dim, self.conv, self.chunk,
                           self.flags)


class Rwkv:
    """RWKV-4's time mixing (docs/FORMAT.md, "rwkv record"): k, v, r projections to `inner` channels."""
    kind = MIXER_RWKV

    def __init__(self, inner):
        self.inner, self.flags = inner, 0

    def dims(self):
        return dict(INNER=self.inner)

    def check(self, where):
        whole_number(self.inner, f"{where}: rwkv time-mix width", 1, LIMITS["hidden_dim"])

    def pack(self):
        return struct.pack("<2I", self.inner, self.flags)


class RwkvChannelMix:
    """RWKV-4's channel mixing, an FFN that also sees the previous token (docs/FORMAT.md, "rwkv channel-mix
    record")."""
    kind = FFN_RWKV

    def __init__(self, hidden):
        self.hidden, self.flags = hidden, 0

    def dims(self):
        return dict(HIDDEN=self.hidden)

    def pack(self):
        return struct.pack("<2I", self.hidden, self.flags)


class Dense:
    """A dense FFN: gated down(act(gate x) * up x) or plain down(act(up x))."""

    def __init__(self, hidden, activation=ACT_SILU, gated=True, flags=0):
        self.kind = FFN_GATED if gated else FFN_PLAIN
        self.hidden, self.activation, self.flags = hidden, activation, flags

    def dims(self):
        return dict(HIDDEN=self.hidden)

    def pack(self):
        return struct.pack("<3I", self.hidden, self.activation, self.flags)


class MoE:
    """A mixture of experts: a router, n_experts gated experts of width hidden, top_k per token."""
    kind = FFN_MOE

    def __init__(self, n_experts, top_k, hidden, activation=ACT_SILU, router=ROUTER_SOFTMAX, n_groups=1,
                 topk_groups=1, shared_hidden=0, routed_scale=1.0, act_alpha=0.0, act_limit=0.0, flags=0):
        self.n_experts, self.top_k, self.hidden, self.activation = n_experts, top_k, hidden, activation
        self.router, self.n_groups, self.topk_groups, self.shared_hidden = router, n_groups, topk_groups, shared_hidden
        self.routed_scale, self.act_alpha, self.act_limit = float(routed_scale), float(act_alpha), float(act_limit)
        self.flags = flags | (MOE_SHARED if shared_hidden else 0)

    def dims(self):
        return dict(HIDDEN=self.hidden, N_EXPERTS=self.n_experts, EXPERTS=self.n_experts, SHARED_HIDDEN=self.shared_hidden)

    def pack(self):
        return struct.pack("<8I 3f I", self.n_experts, self.top_k, self.hidden, self.activation, self.router,
                           self.n_groups, self.topk_groups, self.shared_hidden, self.routed_scale, self.act_alpha,
                           self.act_limit, self.flags)


class Layer:
    """One layer record: the norms around its two blocks, its mixer and its FFN (None: no FFN)."""

    def __init__(self, mixer, ffn, flags=LAYER_MIXER_NORM | LAYER_FFN_NORM):
        self.mixer, self.ffn, self.flags = mixer, ffn, flags
        if ffn is None:
            self.flags &= ~(LAYER_FFN_NORM | LAYER_FFN_POST_NORM)

    @property
    def attn(self):
        return self.mixer

    def pack(self):
        mixer = self.mixer.pack()
        ffn = self.ffn.pack() if self.ffn else b""
        body = struct.pack("<2I", self.mixer.kind, len(mixer)) + mixer + \
            struct.pack("<2I", self.ffn.kind if self.ffn else FFN_NONE, len(ffn)) + ffn
        size = pad_to(8 + len(body), 8)
        return (struct.pack("<2I", size, self.flags) + body).ljust(size, b"\0")


class Model:
    """Config + layer records + an ordered list of (name, shape, producer) for the tensors."""

    def __init__(self, family, dim, vocab_size, context_length, norm_kind=NORM_RMS, norm_eps=1e-5,
                 position_kind=POS_ROPE, embed_scale=1.0, residual_scale=1.0, logit_scale=1.0, final_softcap=0.0,
                 tied=False):
        self.family = family
        self.dim, self.vocab_size, self.context_length = dim, vocab_size, context_length
        self.norm_kind, self.norm_eps, self.position_kind = norm_kind, float(norm_eps), position_kind
        self.embed_scale, self.residual_scale, self.logit_scale = float(embed_scale), float(residual_scale), float(logit_scale)
        self.final_softcap = float(final_softcap or 0.0)
        self.tied = tied
        self.layers = []
        self.rope_tables = []      # float32 arrays of inverse frequencies
        self.tensors = []          # (name, shape, producer() -> float32 array)
        self.tokenizer = None      # bytes of the tokenizer section, or None
        self.chat = b""            # bytes of the chat section (chat_section), or empty
        self.source_dtype = DTYPES["f32"]  # what the weights are stored as without --dtype
        self.hf_config = {}        # the (Hugging Face) config it was converted from

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

    def flags(self):
        return MODEL_TIED_EMBEDDINGS if self.tied else 0


# ----------------------------------------------------------------------------
# the tensor table (tensors.def, shared with model.c): what each part of a model holds


TABLE_ROW = re.compile(r"^(MODEL_TENSOR|TENSOR)\(\s*([\w|]+)\s*,\s*\"([^\"]+)\"\s*,\s*[\w.]+\s*,\s*(\w+)\s*,\s*(\w+)\s*,"
                       r"\s*(\w+)\s*,\s*(\w+)\s*,\s*([\w| ]+?)\s*,\s*([\w| ]+?)\s*\)", re.M)


@functools.lru_cache(maxsize=None)
def tensor_table():
    """[(parts, name, dims, storage, needs, unless)] from tensors.def, in table order."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tensors.def")) as f:
        text = f.read()
    bits = lambda expr: functools.reduce(lambda a, b: a | b, (0 if w == "0" else FLAG_BITS[w] for w in expr.replace(" ", "").split("|")))  # noqa: E731
    return [(set(parts.split("|")), name, [d for d in (d0, d1, d2) if d != "0"], storage, bits(needs), bits(unless))
            for _, parts, name, d0, d1, d2, storage, needs, unless in TABLE_ROW.findall(text)]


def expected_tensors(m):
    """{name: (shape, storage)} of every tensor the table asks of model m (the rope tables apart)."""
    present = m.flags() | (PRESENT_LAYERNORM if m.norm_kind == NORM_LAYER else 0) | \
        (PRESENT_LEARNED_POSITIONS if m.position_kind == POS_LEARNED else 0)
    model_dims = dict(DIM=m.dim, VOCAB=m.vocab_size, CONTEXT=m.context_length)
    mixer_parts = {MIXER_ATTENTION: "ATTENTION", MIXER_LATENT_ATTENTION: "LATENT", MIXER_MAMBA: "MAMBA",
                   MIXER_MAMBA2: "MAMBA2", MIXER_GATED_DELTANET: "DELTANET", MIXER_RWKV: "RWKV"}
    ffn_parts = {FFN_GATED: "GATED", FFN_PLAIN: "PLAIN", FFN_MOE: "MOE", FFN_RWKV: "RWKV_FFN"}
    out = {}
    for parts, name, dims, storage, needs, unless in tensor_table():
        if "MODEL" in parts and present & needs == needs and not present & unless:
            out[name] = (tuple(model_dims[d] for d in dims), storage)
    for i, L in enumerate(m.layers):
        have = {"LAYER", mixer_parts[L.mixer.kind]} | ({ffn_parts[L.ffn.kind]} if L.ffn else set())
        bits = present | L.flags | L.mixer.flags | (L.ffn.flags if L.ffn else 0)
        dims = dict(model_dims, **L.mixer.dims(), **(L.ffn.dims() if L.ffn else {}))
        for parts, name, shape, storage, needs, unless in tensor_table():
            if parts & have and bits & needs == needs and not bits & unless:
                out[f"layers.{i}.{name}"] = (tuple(dims[d] for d in shape), storage)
    return out


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


def rope_inv_freq(theta, rope_dim, scaling, context=None):
    """(inverse frequencies, attention factor) of a scaled rope, as transformers computes them (in float32);
    the attention factor multiplies cos and sin (YaRN), 1 otherwise. The frequencies must come out finite and
    positive (a factor of 0 or NaN, or a rope_theta <= 0, would give NaN or infinite tables)."""
    try:
        with np.errstate(all="ignore"):
            inv, attention = _rope_inv_freq(theta, rope_dim, scaling, context)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ExportError(f"config.json: rope scaling {scaling} is incomplete or malformed ({type(e).__name__}: {e})")
    if not (np.isfinite(inv).all() and (inv > 0).all() and math.isfinite(attention) and attention > 0):
        raise ExportError(f"config.json: rope_theta {theta} with rope scaling {scaling} gives inverse frequencies (or an "
                          f"attention factor) that are not finite and positive")
    return inv, attention


def yarn_mscale(factor, mscale=1.0):
    """YaRN's attention temperature: 0.1 m ln(s) + 1 for a context stretched s times (Peng et al. 2023)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_inv_freq(theta, rope_dim, scaling, context):
    inv = (1.0 / (theta ** (np.arange(0, rope_dim, 2, dtype=np.int64).astype(np.float32) / rope_dim))).astype(np.float32)
    kind = scaling["rope_type"]
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if kind == "freq_factors":  # GGUF's rope_freqs (Llama 3.1 conversions): each frequency divided by its factor
        factors = np.asarray(scaling["factors"], dtype=np.float32)
        if factors.shape != inv.shape or not np.all(factors > 0):
            raise ValueError(f"{len(factors)} rope frequency factors for {len(inv)} frequencies, or one not positive")
        return (inv / factors).astype(np.float32), 1.0
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
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        # low frequencies (long wavelengths) are interpolated by the factor, high ones kept, a linear ramp
        # between the dimensions that turn beta_fast and beta_slow times over the original context
        factor = float(scaling["factor"])
        attention = scaling.get("attention_factor")
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attention is None:
            attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
                else yarn_mscale(factor)
        fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
        old_ctx = scaling.get("original_max_position_embeddings") or context
        turns = lambda rot: rope_dim * math.log(old_ctx / (rot * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
        low, high = turns(fast), turns(slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        pos_freqs = (np.float32(theta) ** (np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim))).astype(np.float32)
        keep = (np.float32(1) - ramp).astype(np.float32)
        inv = (np.float32(1) / (np.float32(factor) * pos_freqs)) * (np.float32(1) - keep) + (np.float32(1) / pos_freqs) * keep
        return inv.astype(np.float32), float(attention)
    raise ExportError(f"rope scaling type '{kind}' is not supported (supported: linear, llama3, yarn)")


def full_attention_windows(m):
    """A sliding window (or a chunk) that covers the whole context hides nothing: such a layer is stored as full
    attention (0), so that ./run keeps positions inside the context as it does for any layer that sees
    everything."""
    for i, L in enumerate(m.layers):
        a = L.attn
        if not isinstance(a, Attention):  # a recurrent kind's `chunk` is its scan's, not a mask
            continue
        for what in ("window", "chunk"):
            if getattr(a, what) >= m.context_length:
                log(f"export: layer {i}: {what} {getattr(a, what)} covers the context of {m.context_length}: full attention")
                setattr(a, what, 0)


def round_rope_to_bf16(m):
    """--bf16-rope: give every rotary layer a table of its inverse frequencies rounded to bf16.

    transformers keeps inv_freq in f32, but a model cast with .to(torch.bfloat16) rounds that buffer to
    bf16 (and a later .float() cannot bring the bits back). A model trained that way, like kjv-5m, learned
    with the rounded frequencies, and its reference logits were computed with them."""
    tables = list(m.rope_tables)
    m.rope_tables = []
    for L in m.layers:
        a = L.attn
        if not isinstance(a, Attention) or a.rope_dim == 0:
            continue
        inv = tables[a.rope_table] if a.rope_table >= 0 else rope_inv_freq(a.rope_theta, a.rope_dim, {"rope_type": "default"})[0]
        a.rope_table = m.rope_table_for(bf16_to_f32(f32_to_bf16(inv)))


def layer_rope(model, cfg, rope_dim, layer_type=None, scaled=True):
    """(rope_theta, rope_table, attention factor) for a layer; scaled=False: the base frequencies even where the
    config scales them (OLMo 3's sliding layers)."""
    theta, scaling = rope_settings(cfg, layer_type)
    if scaling is None or not scaled:
        return theta, -1, 1.0
    inv, factor = rope_inv_freq(theta, rope_dim, scaling, cfg.get("max_position_embeddings"))
    return theta, model.rope_table_for(inv), factor


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
        layer = layer.attn
        if not isinstance(layer, Attention):
            if i in counts and isinstance(layer, LatentAttention):
                raise ExportError(f"--kv-heads: layer {i} is latent attention: it caches one latent row per position, "
                                  "shared by all heads, and has no kv heads to regroup")
            if i in counts:
                raise ExportError(f"--kv-heads: layer {i} is a {type(layer).__name__} layer: it has no key/value heads")
            continue
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
        names = {f"layers.{i}.attn.{t}" for t in ("wk", "wv", "bk", "bv")}
        for j, (name, shape, producer) in enumerate(m.tensors):
            if name in names:
                m.tensors[j] = (name, (n * hd,) + shape[1:], lambda p=producer, f=regroup: f(np.asarray(p())))
        log(f"export: layer {i}: {old} -> {n} kv heads ({'duplicated' if n > old else 'mean-pooled'})")


# ----------------------------------------------------------------------------
# layer kinds: which layers slide, from either dialect


LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "mamba", "linear_attention")
RECURRENT_LAYER_TYPES = ("mamba", "linear_attention")  # Granite-4.0-H's Mamba-2 layers, Qwen3-Next's Gated DeltaNet


def layer_types(cfg, n_layers, family):
    """'full_attention' / 'sliding_attention' / 'chunked_attention' for each layer."""
    types = cfg.get("layer_types")
    window = cfg.get("sliding_window")
    if family == "granitemoehybrid":  # "mamba" or "attention" (full), every layer mamba when not given
        types = ["full_attention" if t == "attention" else t for t in (types or ["mamba"] * n_layers)]
    if family == "qwen3_next" and types is None:  # every full_attention_interval-th layer is full attention
        every = config_int(cfg, "full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n_layers)]
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise ExportError(f"config.json: layer_types has {len(types) if isinstance(types, list) else '?'} entries for {n_layers} layers")
        for t in types:
            if t not in LAYER_TYPES:
                raise ExportError(f"config.json: layer type '{t}' is not supported (supported: {', '.join(LAYER_TYPES)})")
        if family == "smollm3" and not cfg.get("use_sliding_window"):  # its layers slide only when this is set
            return ["full_attention" if t == "sliding_attention" else t for t in types]
        return list(types)
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        # transformers 4: layers from max_window_layers on slide, when use_sliding_window is set
        if not cfg.get("use_sliding_window", False) or not window:
            return ["full_attention"] * n_layers
        first = cfg.get("max_window_layers", n_layers)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if family in ("gemma2", "gpt_oss"):
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if family in ("gemma3_text", "olmo3", "exaone4"):
        default = {"gemma3_text": 6, "olmo3": 4, "exaone4": 4}[family]
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", default))
        if family == "exaone4" and not window:
            return ["full_attention"] * n_layers
        if isinstance(pattern, str):  # EXAONE 4 may spell it "LLLG": L local (sliding), G global
            return ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention" for i in range(n_layers)]
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    if family == "llama4_text":
        return ["chunked_attention" if rope else "full_attention" for rope in rope_layers(cfg, n_layers, family)]
    if family == "smollm3":
        slide = cfg.get("use_sliding_window") and window
        return ["sliding_attention" if slide and not rope else "full_attention" for rope in rope_layers(cfg, n_layers, family)]
    return ["sliding_attention" if window else "full_attention"] * n_layers


def rope_layers(cfg, n_layers, family):
    """Which layers rotate positions (1) and which have none (0, NoPE): SmolLM3 and Llama 4's
    `no_rope_layers` (despite the name, 1 means rope), else every `no_rope_layer_interval`-th layer is NoPE."""
    flags = cfg.get("no_rope_layers")
    if flags:
        if not isinstance(flags, list) or len(flags) != n_layers or any(f not in (0, 1) for f in flags):
            raise ExportError(f"config.json: no_rope_layers must list 0 or 1 for each of the {n_layers} layers")
        return list(flags)
    interval = config_int(cfg, "no_rope_layer_interval", 4)
    return [int((i + 1) % interval != 0) for i in range(n_layers)]


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
    top = LIMITS.get(KEY_LIMITS.get(key), 2 ** 31 - 1)  # sizes the format bounds: refused before anything is built
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= top:
        raise ExportError(f"config.json: '{key}' is {v!r}, expected an integer from {minimum} to {top}")
    return v


# config.json keys that size what export builds, and the limit of the format (LIMITS) each is held to
KEY_LIMITS = {"num_hidden_layers": "layers", "n_layer": "layers", "hidden_size": "dim", "n_embd": "dim",
              "intermediate_size": "hidden_dim", "n_inner": "hidden_dim", "num_attention_heads": "heads",
              "n_head": "heads", "num_key_value_heads": "heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
              "sliding_window": "context_length", "attention_chunk_size": "context_length",
              "moe_intermediate_size": "hidden_dim", "shared_expert_intermediate_size": "hidden_dim",
              "num_experts": "experts", "num_local_experts": "experts", "n_routed_experts": "experts",
              "num_experts_per_tok": "experts"}


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


# The decoder families whose layers are variations of [norm, attention, norm, FFN]: what differs is data
# (which norms, which q/k norm, which positions, which FFN), set here per family from its config.
POST_NORMS_ONLY = ("olmo3", "exaone4")      # x += post_norm(block(x)), no norm before the blocks
SANDWICH_NORMS = ("gemma2", "gemma3_text")  # x += post_norm(block(norm(x)))


def convert_llama_like(cfg, st, family):
    """llama, mistral, qwen2, qwen3, qwen3_moe, gemma2, gemma3_text, phi3, smollm3, olmo3, exaone4, gpt_oss,
    llama4_text, and the hybrids whose other layers are recurrent: granitemoehybrid (Mamba-2), qwen3_next (Gated
    DeltaNet)."""
    prefix = text_prefix(st)
    dim, n_layers, n_heads, vocab = require(cfg, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    n_kv = config_int(cfg, "num_key_value_heads", n_heads)
    head_dim = config_int(cfg, "head_dim", dim // n_heads or None)  # None: an error, hidden_size < heads
    gemma = family in SANDWICH_NORMS
    head = next((n for n in ("lm_head.weight", "language_model.lm_head.weight") if n in st), None)
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = head is None
    if not tied and head is None:
        raise ExportError("missing tensor 'lm_head.weight' (config says the classifier is not tied)")
    m = Model(family, dim, vocab, config_int(cfg, "max_position_embeddings", 2048),
              norm_eps=config_float(cfg, "rms_norm_eps", 1e-6), tied=tied,
              embed_scale=math.sqrt(dim) if gemma else config_float(cfg, "embedding_multiplier", 1.0),
              residual_scale=config_float(cfg, "residual_multiplier", 1.0),  # Granite's multipliers
              logit_scale=1.0 / config_float(cfg, "logits_scaling", 1.0),
              final_softcap=config_float(cfg, "final_logit_softcapping", 0.0))
    types = layer_types(cfg, n_layers, family)
    partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    rope_dim = int(head_dim * number(partial, "partial_rotary_factor"))
    scale = config_float(cfg, "query_pre_attn_scalar", head_dim) ** -0.5 if gemma else \
        config_float(cfg, "attention_multiplier", head_dim ** -0.5)
    ropes = rope_layers(cfg, n_layers, family) if family in ("smollm3", "llama4_text") else [1] * n_layers
    if family == "granitemoehybrid" and cfg.get("position_embedding_type") != "rope":  # NoPE unless it says rope
        ropes = [0] * n_layers
    if family == "exaone4" and "sliding_attention" in types:  # EXAONE 4's global layers see no positions
        ropes = [int(t == "sliding_attention") for t in types]
    p = prefix
    for i in range(n_layers):
        a = f"{p}layers.{i}."
        if types[i] in RECURRENT_LAYER_TYPES:
            m.layers.append(Layer(recurrent_mixer(cfg, family, dim), ffn_of(cfg, st, family, i, a)))
            continue
        flags = 0
        if f"{a}self_attn.q_norm.weight" in st:
            flags |= ATTN_QK_NORM_FULL if family == "olmo3" else ATTN_QK_NORM
        if family == "llama4_text" and cfg.get("use_qk_norm") and ropes[i]:
            flags |= ATTN_QK_NORM_PLAIN
        if f"{a}self_attn.q_proj.bias" in st:
            flags |= ATTN_QKV_BIAS
        if f"{a}self_attn.o_proj.bias" in st:
            flags |= ATTN_O_BIAS
        if f"{a}self_attn.sinks" in st:
            flags |= ATTN_SINKS
        if family == "qwen3_next":
            flags |= ATTN_OUTPUT_GATE
        window = chunk = 0
        if types[i] == "sliding_attention":
            if not cfg.get("sliding_window"):
                raise ExportError(f"config.json: layer {i} slides but sliding_window is not set")
            window = config_int(cfg, "sliding_window")
        elif types[i] == "chunked_attention":
            chunk = config_int(cfg, "attention_chunk_size")
        if window >= m.context_length:  # a window over the whole context is full attention
            window = 0
        theta, table, attn_factor = layer_rope(m, cfg, rope_dim, types[i] if family == "gemma3_text" else None,
                                               scaled=not (family == "olmo3" and types[i] == "sliding_attention"))
        temperature = (config_float(cfg, "floor_scale", 8192.0), config_float(cfg, "attn_scale", 0.1)) \
            if family == "llama4_text" and cfg.get("attn_temperature_tuning") and not ropes[i] else (0.0, 0.0)
        attention = Attention(n_heads, n_kv, head_dim, window=window, chunk=chunk, rope_theta=theta,
                              rope_dim=rope_dim if ropes[i] else 0, rope_table=table if ropes[i] else -1,
                              rope_attn_factor=attn_factor, attn_scale=scale,
                              attn_softcap=config_float(cfg, "attn_logit_softcapping", 0.0),
                              temperature_floor=temperature[0], temperature_scale=temperature[1], flags=flags)
        norms = LAYER_MIXER_POST_NORM | LAYER_FFN_POST_NORM if family in POST_NORMS_ONLY else \
            LAYER_MIXER_NORM | LAYER_FFN_NORM | (LAYER_MIXER_POST_NORM | LAYER_FFN_POST_NORM if gemma else 0)
        m.layers.append(Layer(attention, ffn_of(cfg, st, family, i, a), norms))

    def norm(name):  # Gemma's and Qwen3-Next's RMSNorm multiplies by (1 + w): fold the 1 in here
        return (lambda: st.get(name) + 1.0) if gemma or family == "qwen3_next" else getter(st, name)

    m.add("tok_embeddings", (vocab, dim), getter(st, f"{p}embed_tokens.weight"))
    qd, kd = n_heads * head_dim, n_kv * head_dim
    for i, layer in enumerate(m.layers):
        a, o, at = f"{p}layers.{i}.", f"layers.{i}.", layer.attn
        if family in POST_NORMS_ONLY:
            m.add(o + "mixer_post_norm", (dim,), norm(a + "post_attention_layernorm.weight"))
            m.add(o + "ffn_post_norm", (dim,), norm(a + "post_feedforward_layernorm.weight"))
        else:
            m.add(o + "mixer_norm", (dim,), norm(a + "input_layernorm.weight"))
            m.add(o + "ffn_norm", (dim,), norm(a + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")))
        if gemma:
            m.add(o + "mixer_post_norm", (dim,), norm(a + "post_attention_layernorm.weight"))
            m.add(o + "ffn_post_norm", (dim,), norm(a + "post_feedforward_layernorm.weight"))
        if not isinstance(at, Attention):
            add_recurrent(m, st, at, a, o, dim)
            add_ffn(m, st, layer.ffn, a, o, dim)
            continue
        # Llama 4 rotates interleaved pairs (2i, 2i+1); attn.c rotates (i, i + d/2): reorder the q and k rows
        qk = (lambda g, heads: interleaved_to_halves(g, heads, head_dim)) if family == "llama4_text" else (lambda g, heads: g)
        if f"{a}self_attn.qkv_proj.weight" in st:  # Phi-3: q, k, v stacked in one matrix
            fused = a + "self_attn.qkv_proj.weight"
            m.add(o + "attn.wq", (qd, dim), rows(st, fused, 0, qd))
            m.add(o + "attn.wk", (kd, dim), rows(st, fused, qd, qd + kd))
            m.add(o + "attn.wv", (kd, dim), rows(st, fused, qd + kd, qd + 2 * kd))
        else:
            if at.flags & ATTN_OUTPUT_GATE:  # Qwen3-Next: q_proj gives each head's query, then its gate
                wq, wg = query_and_gate(st, f"{a}self_attn.q_proj.weight", n_heads, head_dim, dim)
                m.add(o + "attn.wg", (qd, dim), wg)
            else:
                wq = qk(getter(st, f"{a}self_attn.q_proj.weight"), n_heads)
            m.add(o + "attn.wq", (qd, dim), wq)
            m.add(o + "attn.wk", (kd, dim), qk(getter(st, f"{a}self_attn.k_proj.weight"), n_kv))
            m.add(o + "attn.wv", (kd, dim), getter(st, f"{a}self_attn.v_proj.weight"))
        if at.flags & ATTN_QKV_BIAS:
            for n, proj, d in (("q", "q_proj", qd), ("k", "k_proj", kd), ("v", "v_proj", kd)):
                m.add(o + "attn.b" + n, (d,), getter(st, f"{a}self_attn.{proj}.bias"))
        if at.flags & ATTN_QK_NORM:
            m.add(o + "attn.q_norm", (head_dim,), norm(a + "self_attn.q_norm.weight"))
            m.add(o + "attn.k_norm", (head_dim,), norm(a + "self_attn.k_norm.weight"))
        if at.flags & ATTN_QK_NORM_FULL:
            m.add(o + "attn.q_norm_full", (qd,), norm(a + "self_attn.q_norm.weight"))
            m.add(o + "attn.k_norm_full", (kd,), norm(a + "self_attn.k_norm.weight"))
        if at.flags & ATTN_SINKS:
            m.add(o + "attn.sinks", (n_heads,), getter(st, a + "self_attn.sinks"))
        m.add(o + "attn.wo", (dim, qd), getter(st, a + "self_attn.o_proj.weight"))
        if at.flags & ATTN_O_BIAS:
            m.add(o + "attn.bo", (dim,), getter(st, a + "self_attn.o_proj.bias"))
        add_ffn(m, st, layer.ffn, a, o, dim)
    m.add("final_norm", (dim,), norm(f"{p}norm.weight"))
    if not tied:
        m.add("output", (vocab, dim), getter(st, head))
    return m


def query_and_gate(st, name, heads, head_dim, dim):
    """Qwen3-Next's q_proj [heads][query | gate][dim] split into the queries and the gates, [heads * head_dim][dim]
    each."""
    g = checked(st, name, (heads * 2 * head_dim, dim))
    half = lambda lo: lambda: g().reshape(heads, 2 * head_dim, dim)[:, lo:lo + head_dim].reshape(-1, dim)  # noqa: E731
    return half(0), half(head_dim)


def deepseek_model(cfg, family, tied):
    """The description of a deepseek_v2 / deepseek_v3 config, without weights (convert_deepseek adds them from
    the checkpoint, tools/random_model.py at random): multi-head latent attention on every layer; the first
    first_k_dense_replace layers dense, then DeepSeek's mixture of experts."""
    dim, n_layers, n_heads, vocab = require(cfg, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    kv_rank, nope, rope_dim, v_dim = require(cfg, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    q_rank = config_int(cfg, "q_lora_rank", 0, 0)  # null: one q_proj (DeepSeek-V2-Lite, Moonlight)
    if cfg.get("attention_bias"):
        raise ExportError("config.json: attention_bias is not supported with latent attention (no DeepSeek checkpoint has it)")
    if rope_dim % 2:
        raise ExportError(f"config.json: qk_rope_head_dim {rope_dim} is odd")
    m = Model(family, dim, vocab, config_int(cfg, "max_position_embeddings", 4096),
              norm_eps=config_float(cfg, "rms_norm_eps", 1e-6), tied=tied)
    theta, scaling = rope_settings(cfg)
    table, attn_factor, mscale2 = -1, 1.0, 1.0
    if scaling is not None:
        inv, attn_factor = rope_inv_freq(theta, rope_dim, scaling, cfg.get("max_position_embeddings"))
        table = m.rope_table_for(inv)
        # DeepSeek's softmax correction for a YaRN-stretched context: scale * mscale(factor, mscale_all_dim)^2
        if scaling.get("mscale_all_dim"):
            mscale2 = yarn_mscale(number(scaling.get("factor"), "rope_scaling.factor"),
                                  number(scaling["mscale_all_dim"], "rope_scaling.mscale_all_dim")) ** 2
    for i in range(n_layers):
        mla = LatentAttention(n_heads, q_rank, kv_rank, nope, rope_dim, v_dim, rope_theta=theta, rope_table=table,
                              rope_attn_factor=attn_factor, softmax_mscale=mscale2)
        m.layers.append(Layer(mla, deepseek_ffn(cfg, family, i)))
    return m


def convert_deepseek(cfg, st, family):
    """deepseek_v2 (DeepSeek-V2, V2-Lite, V2.5, Coder-V2), deepseek_v3 (V3, R1, Moonlight) and kimi_k2."""
    p = text_prefix(st)
    head = "lm_head.weight" if "lm_head.weight" in st else None
    tied = cfg.get("tie_word_embeddings")
    tied = head is None if tied is None else tied
    if not tied and head is None:
        raise ExportError("missing tensor 'lm_head.weight' (config says the classifier is not tied)")
    m = deepseek_model(cfg, family, tied)
    dim, vocab, a0 = m.dim, m.vocab_size, m.layers[0].mixer
    n_heads, q_rank, kv_rank, nope, rope_dim, v_dim = a0.n_heads, a0.q_rank, a0.kv_rank, a0.nope_dim, a0.rope_dim, a0.v_dim
    # DeepSeek-V2 rotates interleaved pairs (complex numbers), V3 too unless rope_interleave is false: rows of the
    # rope part of each query head and of k_rope reordered to attn.c's halves
    interleaved = family == "deepseek_v2" or cfg.get("rope_interleave", True)
    dq = nope + rope_dim
    rope_rows = (lambda g, heads, width: interleaved_to_halves(g, heads, width, width - rope_dim, rope_dim)) \
        if interleaved else (lambda g, heads, width: g)

    m.add("tok_embeddings", (vocab, dim), getter(st, f"{p}embed_tokens.weight"))
    for i, layer in enumerate(m.layers):
        a, o = f"{p}layers.{i}.self_attn.", f"layers.{i}."
        m.add(o + "mixer_norm", (dim,), getter(st, f"{p}layers.{i}.input_layernorm.weight"))
        if q_rank:
            m.add(o + "mla.wq_a", (q_rank, dim), getter(st, a + "q_a_proj.weight"))
            m.add(o + "mla.q_a_norm", (q_rank,), getter(st, a + "q_a_layernorm.weight"))
            m.add(o + "mla.wq_b", (n_heads * dq, q_rank), rope_rows(getter(st, a + "q_b_proj.weight"), n_heads, dq))
        else:
            m.add(o + "mla.wq", (n_heads * dq, dim), rope_rows(getter(st, a + "q_proj.weight"), n_heads, dq))
        m.add(o + "mla.wkv_a", (kv_rank + rope_dim, dim),
              rope_rows(getter(st, a + "kv_a_proj_with_mqa.weight"), 1, kv_rank + rope_dim))
        m.add(o + "mla.kv_a_norm", (kv_rank,), getter(st, a + "kv_a_layernorm.weight"))
        # kv_b_proj [H * (nope + v)][kv_rank]: each head's key rows, then its value rows
        kv_b = getter(st, a + "kv_b_proj.weight")
        if tuple(st.shape(kv_b.source)) != (n_heads * (nope + v_dim), kv_rank):
            raise ExportError(f"tensor '{kv_b.source}' has shape {st.shape(kv_b.source)}, config implies "
                              f"{[n_heads * (nope + v_dim), kv_rank]}")
        m.add(o + "mla.wk_b", (n_heads, nope, kv_rank), lambda g=kv_b: g().reshape(n_heads, nope + v_dim, kv_rank)[:, :nope])
        m.add(o + "mla.wv_b", (n_heads, v_dim, kv_rank), lambda g=kv_b: g().reshape(n_heads, nope + v_dim, kv_rank)[:, nope:])
        m.add(o + "mla.wo", (dim, n_heads * v_dim), getter(st, a + "o_proj.weight"))
        m.add(o + "ffn_norm", (dim,), getter(st, f"{p}layers.{i}.post_attention_layernorm.weight"))
        add_ffn(m, st, layer.ffn, f"{p}layers.{i}.", o, dim)
    m.add("final_norm", (dim,), getter(st, f"{p}norm.weight"))
    if not tied:
        m.add("output", (vocab, dim), getter(st, head))
    return m


def deepseek_ffn(cfg, family, i):
    """Layer i's FFN: dense for i < first_k_dense_replace, else DeepSeek's mixture of experts:
      V2  softmax over all experts; top k (greedy), or from the topk_group groups with the best expert
          (group_limited_greedy); weights x routed_scaling_factor, or renormalised instead (norm_topk_prob)
      V3  sigmoid scores; the choice adds e_score_correction_bias and takes the top k from the topk_group
          groups with the best two-expert sums; weights from the unbiased scores, renormalised (norm_topk_prob),
          x routed_scaling_factor
    both plus n_shared_experts shared experts, run as one of width n_shared_experts * moe_intermediate_size."""
    act = activation_of(cfg.get("hidden_act", "silu"))
    if config_int(cfg, "moe_layer_freq", 1) != 1:
        raise ExportError("config.json: moe_layer_freq other than 1 is not supported (transformers ignores it too)")
    n_experts = config_int(cfg, "n_routed_experts", 0, 0)
    if i < config_int(cfg, "first_k_dense_replace", 0, 0) or not n_experts:
        return Dense(config_int(cfg, "intermediate_size"), act)
    top_k, width = config_int(cfg, "num_experts_per_tok"), config_int(cfg, "moe_intermediate_size")
    shared = config_int(cfg, "n_shared_experts", 0, 0) * width
    scale = config_float(cfg, "routed_scaling_factor", 1.0)
    if family != "deepseek_v2":  # V3's router (Kimi K2's too)
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise ExportError(f"config.json: scoring_func '{cfg['scoring_func']}' is not supported for {family} (sigmoid)")
        flags = MOE_SCORE_BIAS | MOE_GROUP_TOP2 | (MOE_NORM_TOPK if cfg.get("norm_topk_prob", True) else 0)
        return MoE(n_experts, top_k, width, act, ROUTER_SIGMOID, config_int(cfg, "n_group", 1),
                   config_int(cfg, "topk_group", 1), shared, scale, flags=flags)
    method = cfg.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ExportError(f"config.json: topk_method '{method}' is not supported (greedy, group_limited_greedy)")
    groups = (config_int(cfg, "n_group"), config_int(cfg, "topk_group")) if method == "group_limited_greedy" else (1, 1)
    norm = bool(cfg.get("norm_topk_prob")) and top_k > 1  # DeepSeek's V2 code: renormalised, then not scaled
    return MoE(n_experts, top_k, width, act, ROUTER_SOFTMAX, groups[0], groups[1], shared, 1.0 if norm else scale,
               flags=MOE_NORM_TOPK if norm else 0)


def interleaved_to_halves(get, heads, head_dim, first=0, rope_dim=None):
    """q/k rows of each head reordered from rotary pairs (2i, 2i+1) to (i, i + rope_dim/2), for the rope_dim rows
    from `first` on (default: the whole head): the scores q.k do not change (both sides move alike), and one
    rope kernel serves both layouts."""
    rope_dim = head_dim if rope_dim is None else rope_dim

    def f():
        w = get()
        heads_rows = w.reshape(heads, head_dim, -1).copy()
        part = heads_rows[:, first:first + rope_dim]
        heads_rows[:, first:first + rope_dim] = part.reshape(heads, rope_dim // 2, 2, -1).transpose(0, 2, 1, 3).reshape(part.shape)
        return heads_rows.reshape(w.shape)
    f.source = getattr(get, "source", None)
    return f


def ffn_of(cfg, st, family, i, a):
    """The FFN record of layer i: dense (its width), or a mixture of experts where the family's config puts one."""
    act = ACT_GELU_TANH if family in SANDWICH_NORMS else activation_of(cfg.get("hidden_act", "silu"))
    dense_width = cfg.get("intermediate_size_mlp") if family == "llama4_text" else cfg.get("intermediate_size")
    dense = lambda: Dense(config_int({"intermediate_size": dense_width}, "intermediate_size"), act,  # noqa: E731
                          flags=FFN_BIAS if cfg.get("mlp_bias") else 0)
    if family == "granitemoehybrid":  # the shared MLP alone (dense), or beside the experts
        shared = config_int(cfg, "shared_intermediate_size")
        if config_int(cfg, "num_local_experts", 0, 0) == 0:
            return Dense(shared, act)
        return MoE(config_int(cfg, "num_local_experts"), config_int(cfg, "num_experts_per_tok"),
                   config_int(cfg, "intermediate_size"), act, ROUTER_TOPK_SOFTMAX, shared_hidden=shared)
    if family in ("qwen3_moe", "qwen3_next"):
        sparse = i not in (cfg.get("mlp_only_layers") or []) and config_int(cfg, "num_experts", 0, 0) > 0 and \
            (i + 1) % config_int(cfg, "decoder_sparse_step", 1) == 0
        if not sparse:
            return dense()
        shared = config_int(cfg, "shared_expert_intermediate_size") if family == "qwen3_next" else 0  # gated
        return MoE(config_int(cfg, "num_experts"), config_int(cfg, "num_experts_per_tok"),
                   config_int(cfg, "moe_intermediate_size"), act, ROUTER_SOFTMAX, shared_hidden=shared,
                   flags=(MOE_NORM_TOPK if cfg.get("norm_topk_prob", family == "qwen3_next") else 0) |
                   (MOE_SHARED_GATE if shared else 0))
    if family == "gpt_oss":
        return MoE(config_int(cfg, ("num_local_experts", "num_experts")), config_int(cfg, "num_experts_per_tok"),
                   config_int(cfg, "intermediate_size"), ACT_SWIGLU_CLAMPED, ROUTER_TOPK_SOFTMAX,
                   act_alpha=1.702, act_limit=config_float(cfg, "swiglu_limit", 7.0),
                   flags=MOE_ROUTER_BIAS | MOE_EXPERT_BIAS)
    if family == "llama4_text":
        step = config_int(cfg, "interleave_moe_layer_step", 1)
        moe_layers = cfg.get("moe_layers")
        if moe_layers is None:
            moe_layers = list(range(step - 1, config_int(cfg, "num_hidden_layers"), step))
        if i not in moe_layers:
            return dense()
        width = config_int(cfg, "intermediate_size")
        return MoE(config_int(cfg, "num_local_experts"), config_int(cfg, "num_experts_per_tok"), width, act,
                   ROUTER_SIGMOID, shared_hidden=width, flags=MOE_SCALE_INPUT)
    return dense()


def add_ffn(m, st, ffn, a, o, dim):
    """The FFN's tensors of layer prefix a (checkpoint) / o (file)."""
    hidden = ffn.hidden
    if isinstance(ffn, Dense):
        mlp = a + ("feed_forward." if f"{a}feed_forward.gate_proj.weight" in st else "mlp.")
        if f"{a}shared_mlp.input_linear.weight" in st:  # Granite: gate | up stacked in input_linear
            granite_shared_mlp(m, st, a, o + "ffn.", hidden, dim)
            return
        if f"{mlp}gate_up_proj.weight" in st:  # Phi-3: gate and up stacked
            m.add(o + "ffn.w_gate", (hidden, dim), rows(st, mlp + "gate_up_proj.weight", 0, hidden))
            m.add(o + "ffn.w_up", (hidden, dim), rows(st, mlp + "gate_up_proj.weight", hidden, 2 * hidden))
        else:
            m.add(o + "ffn.w_gate", (hidden, dim), getter(st, mlp + "gate_proj.weight"))
            m.add(o + "ffn.w_up", (hidden, dim), getter(st, mlp + "up_proj.weight"))
        m.add(o + "ffn.w_down", (dim, hidden), getter(st, mlp + "down_proj.weight"))
        if ffn.flags & FFN_BIAS:
            m.add(o + "ffn.b_gate", (hidden,), getter(st, mlp + "gate_proj.bias"))
            m.add(o + "ffn.b_up", (hidden,), getter(st, mlp + "up_proj.bias"))
            m.add(o + "ffn.b_down", (dim,), getter(st, mlp + "down_proj.bias"))
        return
    E = ffn.n_experts
    experts = ExpertSource(st, a, E, hidden, dim)
    m.add(o + "moe.router", (E, dim), getter(st, experts.router))
    if ffn.flags & MOE_ROUTER_BIAS:
        m.add(o + "moe.router_bias", (E,), getter(st, experts.router_bias))
    if ffn.flags & MOE_SCORE_BIAS:
        m.add(o + "moe.score_bias", (E,), getter(st, experts.score_bias))
    for name, shape in (("w_gate", (E, hidden, dim)), ("w_up", (E, hidden, dim)), ("w_down", (E, dim, hidden))):
        m.add(o + "moe." + name, shape, experts.producer(name))
    if ffn.flags & MOE_EXPERT_BIAS:
        for name, shape in (("b_gate", (E, hidden)), ("b_up", (E, hidden)), ("b_down", (E, dim))):
            m.add(o + "moe." + name, shape, experts.producer(name))
    if ffn.flags & MOE_SHARED and f"{a}shared_mlp.input_linear.weight" in st:
        granite_shared_mlp(m, st, a, o + "moe.shared.", ffn.shared_hidden, dim)
    elif ffn.flags & MOE_SHARED:
        sh, s = ffn.shared_hidden, experts.shared
        m.add(o + "moe.shared.w_gate", (sh, dim), getter(st, s + "gate_proj.weight"))
        m.add(o + "moe.shared.w_up", (sh, dim), getter(st, s + "up_proj.weight"))
        m.add(o + "moe.shared.w_down", (dim, sh), getter(st, s + "down_proj.weight"))
    if ffn.flags & MOE_SHARED_GATE:  # Qwen3-Next: sigmoid(g . x) scales the shared expert
        m.add(o + "moe.shared_gate", (dim,), reshaped(st, experts.mlp + "shared_expert_gate.weight", (1, dim), (dim,)))


def granite_shared_mlp(m, st, a, o, hidden, dim):
    """Granite's shared MLP: input_linear [2 hidden][dim] holds gate | up, output_linear is down."""
    gate, up = row_blocks(st, a + "shared_mlp.input_linear.weight", (2 * hidden, dim), (0, hidden, 2 * hidden))
    m.add(o + "w_gate", (hidden, dim), gate)
    m.add(o + "w_up", (hidden, dim), up)
    m.add(o + "w_down", (dim, hidden), getter(st, a + "shared_mlp.output_linear.weight"))


FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def mxfp4(blocks, scales):
    """MXFP4 (OCP microscaling, gpt-oss's experts): blocks [..., G, 16] of two 4-bit e2m1 values per byte (low
    nibble first), scales [..., G] of e8m0 exponents (2^(s - 127)) for each group of 32 -> float32 [..., G * 32].
    Every value is a small power-of-two multiple, exact in bf16 as in f32."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1).reshape(blocks.shape[:-1] + (32,))
    values = np.ldexp(values, (scales.astype(np.int32) - 127)[..., None]).astype(np.float32)
    return values.reshape(blocks.shape[:-2] + (-1,))


class ExpertSource:
    """The experts of one MoE layer in whatever layout the checkpoint keeps them, as the stacks attn.c stores:
    w_gate, w_up [E][hidden][dim], w_down [E][dim][hidden] (and biases [E][...]).
      per expert      experts.{e}.gate_proj / up_proj / down_proj (Qwen3-MoE, Mixtral-style)
      fused, halves   experts.gate_up_proj [E][dim][2 hidden]: gate | up (Llama 4)
      interleaved     experts.gate_up_proj [E][dim][2 hidden]: gate, up alternating (gpt-oss), + biases
      MXFP4           experts.gate_up_proj_blocks / _scales, rows interleaved (gpt-oss as released)
      parallel        block_sparse_moe.input_linear [E][2 hidden][dim]: gate | up, output_linear (Granite)"""

    def __init__(self, st, a, E, hidden, dim):
        self.st, self.E, self.hidden, self.dim = st, E, hidden, dim
        for mlp in (a + "mlp.", a + "feed_forward.", a + "block_sparse_moe."):
            if any(n in st for n in (mlp + "experts.gate_up_proj", mlp + "experts.gate_up_proj_blocks",
                                     mlp + "experts.0.gate_proj.weight", mlp + "experts.0.w1.weight",
                                     mlp + "input_linear.weight")):
                break
        else:
            raise ExportError(f"missing tensor '{a}mlp.experts.*' (the experts of a mixture-of-experts layer)")
        self.mlp = mlp
        self.shared = mlp + ("shared_experts." if mlp + "shared_experts.gate_proj.weight" in st else "shared_expert.")  # DeepSeek
        self.score_bias = mlp + "gate.e_score_correction_bias"  # DeepSeek-V3: added to the scores for choosing only
        self.router = next((mlp + n for n in ("router.weight", "gate.weight", "router.layer.weight") if mlp + n in st),
                           mlp + "router.weight")
        self.router_bias = mlp + "router.bias"
        self.interleaved = mlp + "experts.gate_up_proj_bias" in st or mlp + "experts.gate_up_proj_blocks" in st

    def producer(self, name):
        f = lambda: self.get(name)  # noqa: E731
        return f

    def get(self, name):
        st, mlp, H = self.st, self.mlp + "experts.", self.hidden
        if self.mlp + "input_linear.weight" in st:  # Granite: already [out][in]
            if name == "w_down":
                return st.get(self.mlp + "output_linear.weight")
            gate_up = st.get(self.mlp + "input_linear.weight")
            return gate_up[:, :H] if name == "w_gate" else gate_up[:, H:]
        if mlp + "0.gate_proj.weight" in st or mlp + "0.w1.weight" in st:  # one tensor per expert
            mixtral = mlp + "0.w1.weight" in st
            part = {"w_gate": "w1" if mixtral else "gate_proj", "w_up": "w3" if mixtral else "up_proj",
                    "w_down": "w2" if mixtral else "down_proj"}[name]
            return np.stack([st.get(f"{mlp}{e}.{part}.weight") for e in range(self.E)])
        if name.startswith("b_"):
            if name == "b_down":
                return st.get(mlp + "down_proj_bias")
            bias = st.get(mlp + "gate_up_proj_bias")
            return bias[:, 0::2] if name == "b_gate" else bias[:, 1::2]
        if mlp + "gate_up_proj_blocks" in st:  # MXFP4, already [out][in]
            if name == "w_down":
                return mxfp4(st.get_raw(mlp + "down_proj_blocks"), st.get_raw(mlp + "down_proj_scales"))
            gate_up = mxfp4(st.get_raw(mlp + "gate_up_proj_blocks"), st.get_raw(mlp + "gate_up_proj_scales"))
            return gate_up[:, 0::2] if name == "w_gate" else gate_up[:, 1::2]
        if name == "w_down":  # [E][hidden][dim] as x @ W: transpose to [E][dim][hidden]
            return np.ascontiguousarray(st.get(mlp + "down_proj").transpose(0, 2, 1))
        gate_up = st.get(mlp + "gate_up_proj")
        if self.interleaved:
            half = gate_up[:, :, 0::2] if name == "w_gate" else gate_up[:, :, 1::2]
        else:
            half = gate_up[:, :, :H] if name == "w_gate" else gate_up[:, :, H:]
        return np.ascontiguousarray(half.transpose(0, 2, 1))


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
    m = Model(family, dim, vocab, ctx, norm_kind=NORM_LAYER, norm_eps=config_float(cfg, "layer_norm_epsilon", 1e-5),
              position_kind=POS_LEARNED, tied=tied)
    act = activation_of(cfg.get("activation_function", "gelu_new"))
    for _ in range(n_layers):
        m.layers.append(Layer(Attention(n_heads, n_kv, head_dim, rope_dim=0, attn_scale=scale,
                                        flags=ATTN_QKV_BIAS | ATTN_O_BIAS),
                              Dense(hidden, act, gated=False, flags=FFN_BIAS)))
    # Conv1D (GPT-2) stores [in, out]: transpose to [out, in]. nn.Linear (GPTBigCode) is already [out, in].
    lin = (lambda name: getter(st, name)) if bigcode else (lambda name: transposed(st, name))
    p = prefix
    m.add("tok_embeddings", (vocab, dim), getter(st, p + "wte.weight"))
    m.add("pos_embeddings", (ctx, dim), getter(st, p + "wpe.weight"))
    qd, kd = n_heads * head_dim, n_kv * head_dim
    for i in range(n_layers):
        a, o = f"{p}h.{i}.", f"layers.{i}."
        m.add(o + "mixer_norm", (dim,), getter(st, a + "ln_1.weight"))
        m.add(o + "mixer_norm_bias", (dim,), getter(st, a + "ln_1.bias"))
        w = lin(a + "attn.c_attn.weight")
        b = getter(st, a + "attn.c_attn.bias")
        for n, lo, hi in (("q", 0, qd), ("k", qd, qd + kd), ("v", qd + kd, qd + 2 * kd)):
            m.add(o + "attn.w" + n, (hi - lo, dim), (lambda w=w, lo=lo, hi=hi: w()[lo:hi]))
            m.add(o + "attn.b" + n, (hi - lo,), (lambda b=b, lo=lo, hi=hi: b()[lo:hi]))
        m.add(o + "attn.wo", (dim, qd), lin(a + "attn.c_proj.weight"))
        m.add(o + "attn.bo", (dim,), getter(st, a + "attn.c_proj.bias"))
        m.add(o + "ffn_norm", (dim,), getter(st, a + "ln_2.weight"))
        m.add(o + "ffn_norm_bias", (dim,), getter(st, a + "ln_2.bias"))
        m.add(o + "ffn.w_up", (hidden, dim), lin(a + "mlp.c_fc.weight"))
        m.add(o + "ffn.b_up", (hidden,), getter(st, a + "mlp.c_fc.bias"))
        m.add(o + "ffn.w_down", (dim, hidden), lin(a + "mlp.c_proj.weight"))
        m.add(o + "ffn.b_down", (dim,), getter(st, a + "mlp.c_proj.bias"))
    m.add("final_norm", (dim,), getter(st, p + "ln_f.weight"))
    m.add("final_norm_bias", (dim,), getter(st, p + "ln_f.bias"))
    if not tied:
        m.add("output", (vocab, dim), getter(st, "lm_head.weight"))
    return m


# ----------------------------------------------------------------------------
# recurrent families: a state of fixed size per layer instead of a KV cache (recurrent.h)


def checked(st, name, shape):
    """A producer of checkpoint tensor `name`, after checking that it has `shape` (for the tensors a converter
    cuts or reshapes, which check_shapes cannot compare)."""
    g = getter(st, name)
    if tuple(st.shape(name)) != tuple(shape):
        raise ExportError(f"tensor '{name}' has shape {st.shape(name)}, config implies {list(shape)}")
    return g


def row_blocks(st, name, shape, bounds):
    """Producers of rows [b_i, b_i+1) of a fused projection (its shape checked first)."""
    g = checked(st, name, shape)
    return [(lambda lo=lo, hi=hi: g()[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]


def reshaped(st, name, shape, new_shape):
    """A checkpoint tensor of `shape` as `new_shape` (conv1d weights [C][1][K] -> [C][K])."""
    g = checked(st, name, shape)
    return lambda: g().reshape(new_shape)


def unbounded_context(cfg):
    """A model without attention has no positions: its context is what the format allows, unless the config
    names one."""
    return config_int(cfg, ("max_position_embeddings", "context_length"), LIMITS["context_length"])


def add_embeddings(st, m, embeddings, head="lm_head.weight"):
    """The embeddings, and the classifier unless tied (tie_word_embeddings, else: tied when there is no head)."""
    m.add("tok_embeddings", (m.vocab_size, m.dim), getter(st, embeddings))
    if not m.tied:
        m.add("output", (m.vocab_size, m.dim), getter(st, head))


def mamba_record(cfg, dim):
    """Mamba's record from a MambaConfig."""
    inner = config_int(cfg, "intermediate_size", dim * config_int(cfg, "expand", 2))
    rank = math.ceil(dim / 16) if cfg.get("time_step_rank", "auto") == "auto" else config_int(cfg, "time_step_rank")
    flags = (SSM_CONV_BIAS if cfg.get("use_conv_bias", True) else 0) | (SSM_PROJ_BIAS if cfg.get("use_bias") else 0)
    return Mamba(inner, config_int(cfg, "state_size", 16), config_int(cfg, "conv_kernel", 4), rank, flags)


def add_mamba(m, st, mixer, a, o, dim):
    """Mamba's tensors from mixer prefix a: in_proj [2 inner][dim] holds x | z, x_proj [R + 2N][inner] holds
    dt_low | B | C, conv1d [inner][1][K]."""
    inner, N, K, R = mixer.inner, mixer.state, mixer.conv, mixer.dt_rank
    w_x, w_z = row_blocks(st, a + "in_proj.weight", (2 * inner, dim), (0, inner, 2 * inner))
    m.add(o + "mamba.w_x", (inner, dim), w_x)
    m.add(o + "mamba.w_z", (inner, dim), w_z)
    if mixer.flags & SSM_PROJ_BIAS:
        b_x, b_z = row_blocks(st, a + "in_proj.bias", (2 * inner,), (0, inner, 2 * inner))
        m.add(o + "mamba.b_x", (inner,), b_x)
        m.add(o + "mamba.b_z", (inner,), b_z)
        m.add(o + "mamba.b_out", (dim,), getter(st, a + "out_proj.bias"))
    m.add(o + "mamba.conv", (inner, K), reshaped(st, a + "conv1d.weight", (inner, 1, K), (inner, K)))
    if mixer.flags & SSM_CONV_BIAS:
        m.add(o + "mamba.conv_bias", (inner,), getter(st, a + "conv1d.bias"))
    w_dt_low, w_b, w_c = row_blocks(st, a + "x_proj.weight", (R + 2 * N, inner), (0, R, R + N, R + 2 * N))
    m.add(o + "mamba.w_dt_low", (R, inner), w_dt_low)
    m.add(o + "mamba.w_b", (N, inner), w_b)
    m.add(o + "mamba.w_c", (N, inner), w_c)
    m.add(o + "mamba.w_dt", (inner, R), getter(st, a + "dt_proj.weight"))
    m.add(o + "mamba.dt_bias", (inner,), getter(st, a + "dt_proj.bias"))
    m.add(o + "mamba.a_log", (inner, N), getter(st, a + "A_log"))
    m.add(o + "mamba.d", (inner,), getter(st, a + "D"))
    m.add(o + "mamba.w_out", (dim, inner), getter(st, a + "out_proj.weight"))


def dt_limits(cfg):
    """Mamba-2's time_step_limit: (min, max), max possibly infinite (JSON's Infinity)."""
    limit = cfg.get("time_step_limit", (0.0, math.inf))
    if not isinstance(limit, (list, tuple)) or len(limit) != 2 or not all(isinstance(v, (int, float)) for v in limit) \
            or not 0 <= limit[0] < limit[1] or math.isnan(limit[1]):
        raise ExportError(f"config.json: time_step_limit {limit!r} is not [min, max] with 0 <= min < max")
    return float(limit[0]), float(limit[1])


def mamba2_record(cfg, dim, prefix=""):
    """Mamba-2's record from a Mamba2Config (prefix "") or from Granite-4.0-H's mamba_* keys (prefix "mamba_")."""
    key = (lambda name: name) if not prefix else \
        (lambda name: {"num_heads": "mamba_n_heads", "head_dim": "mamba_d_head", "n_groups": "mamba_n_groups",
                       "state_size": "mamba_d_state", "conv_kernel": "mamba_d_conv", "chunk_size": "mamba_chunk_size",
                       "use_conv_bias": "mamba_conv_bias", "use_bias": "mamba_proj_bias", "expand": "mamba_expand"}[name])
    inner = dim * config_int(cfg, key("expand"), 2)
    heads = config_int(cfg, key("num_heads"))
    head_dim = inner // heads if cfg.get(key("head_dim"), "auto") == "auto" else config_int(cfg, key("head_dim"))
    if heads * head_dim != inner:
        raise ExportError(f"config.json: {heads} mamba heads of {head_dim} do not make the inner width {inner}")
    flags = (SSM_CONV_BIAS if cfg.get(key("use_conv_bias"), True) else 0) | (SSM_PROJ_BIAS if cfg.get(key("use_bias")) else 0)
    lo, hi = dt_limits(cfg) if not prefix else (0.0, math.inf)  # Granite's layer fixes (0, inf)
    return Mamba2(heads, head_dim, config_int(cfg, key("n_groups"), 1), config_int(cfg, key("state_size"), 128),
                  config_int(cfg, key("conv_kernel"), 4), config_int(cfg, key("chunk_size"), 256), lo, hi, flags)


def add_mamba2(m, st, mixer, a, o, dim):
    """Mamba-2's tensors from mixer prefix a: in_proj [inner + conv_dim + heads][dim] holds z | x B C | dt."""
    d = mixer.dims()
    inner, cd, H, K = d["INNER"], d["CONV_DIM"], d["SSM_HEADS"], mixer.conv
    bounds = (0, inner, inner + cd, inner + cd + H)
    for name, shape, producer in zip(("w_z", "w_xbc", "w_dt"), ((inner, dim), (cd, dim), (H, dim)),
                                     row_blocks(st, a + "in_proj.weight", (inner + cd + H, dim), bounds)):
        m.add(o + "mamba2." + name, shape, producer)
    if mixer.flags & SSM_PROJ_BIAS:
        for name, n, producer in zip(("b_z", "b_xbc", "b_dt"), (inner, cd, H),
                                     row_blocks(st, a + "in_proj.bias", (inner + cd + H,), bounds)):
            m.add(o + "mamba2." + name, (n,), producer)
        m.add(o + "mamba2.b_out", (dim,), getter(st, a + "out_proj.bias"))
    m.add(o + "mamba2.conv", (cd, K), reshaped(st, a + "conv1d.weight", (cd, 1, K), (cd, K)))
    if mixer.flags & SSM_CONV_BIAS:
        m.add(o + "mamba2.conv_bias", (cd,), getter(st, a + "conv1d.bias"))
    for name, source in (("dt_bias", "dt_bias"), ("a_log", "A_log"), ("d", "D")):
        m.add(o + "mamba2." + name, (H,), getter(st, a + source))
    m.add(o + "mamba2.norm", (inner,), getter(st, a + "norm.weight"))
    m.add(o + "mamba2.w_out", (dim, inner), getter(st, a + "out_proj.weight"))


def deltanet_record(cfg):
    """Qwen3-Next's Gated DeltaNet record; the chunk is the reference's (torch_chunk_gated_delta_rule: 64)."""
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ExportError(f"config.json: hidden_act '{cfg.get('hidden_act')}' is not supported by qwen3_next (silu)")
    return DeltaNet(config_int(cfg, "linear_num_key_heads"), config_int(cfg, "linear_num_value_heads"),
                    config_int(cfg, "linear_key_head_dim"), config_int(cfg, "linear_value_head_dim"),
                    config_int(cfg, "linear_conv_kernel_dim", 4), 64)


def add_deltanet(m, st, mixer, a, o, dim):
    """Gated DeltaNet's tensors from mixer prefix a. in_proj_qkvz keeps, per key head, [q, k, the v of its value
    heads, their z]; in_proj_ba per key head [b of its value heads, a of its value heads]: regrouped into
    q | k | v (the convolution's channels, heads in order), z, beta's b and the decay's a."""
    Hk, Hv, dk, dv, K = mixer.n_k_heads, mixer.n_v_heads, mixer.k_head_dim, mixer.v_head_dim, mixer.conv
    r = Hv // Hk
    qkvz = checked(st, a + "in_proj_qkvz.weight", (Hk * (2 * dk + 2 * r * dv), dim))
    ba = checked(st, a + "in_proj_ba.weight", (Hk * 2 * r, dim))
    part = lambda g, width, lo, hi: lambda: g().reshape(Hk, width, dim)[:, lo:hi].reshape(-1, dim)  # noqa: E731
    q, k, v, z = (part(qkvz, 2 * dk + 2 * r * dv, lo, hi) for lo, hi in
                  ((0, dk), (dk, 2 * dk), (2 * dk, 2 * dk + r * dv), (2 * dk + r * dv, 2 * dk + 2 * r * dv)))
    cd = 2 * Hk * dk + Hv * dv
    m.add(o + "deltanet.w_qkv", (cd, dim), lambda: np.concatenate([q(), k(), v()]))
    m.add(o + "deltanet.w_z", (Hv * dv, dim), z)
    m.add(o + "deltanet.w_beta", (Hv, dim), part(ba, 2 * r, 0, r))
    m.add(o + "deltanet.w_decay", (Hv, dim), part(ba, 2 * r, r, 2 * r))
    m.add(o + "deltanet.conv", (cd, K), reshaped(st, a + "conv1d.weight", (cd, 1, K), (cd, K)))
    if mixer.flags & SSM_CONV_BIAS:
        m.add(o + "deltanet.conv_bias", (cd,), getter(st, a + "conv1d.bias"))
    m.add(o + "deltanet.dt_bias", (Hv,), getter(st, a + "dt_bias"))
    m.add(o + "deltanet.a_log", (Hv,), getter(st, a + "A_log"))
    m.add(o + "deltanet.norm", (dv,), getter(st, a + "norm.weight"))
    m.add(o + "deltanet.w_out", (dim, Hv * dv), getter(st, a + "out_proj.weight"))


def recurrent_mixer(cfg, family, dim):
    """The record of a hybrid's recurrent layer: Granite-4.0-H's Mamba-2, Qwen3-Next's Gated DeltaNet."""
    if family == "granitemoehybrid":
        return mamba2_record(cfg, dim, "mamba_")
    if family == "qwen3_next":
        return deltanet_record(cfg)
    raise ExportError(f"config.json: {family} has no recurrent layers this exporter knows")


def add_recurrent(m, st, mixer, a, o, dim):
    """A hybrid's recurrent layer's tensors, from its layer prefix a."""
    if isinstance(mixer, Mamba2):
        add_mamba2(m, st, mixer, a + "mamba.", o, dim)
    else:
        add_deltanet(m, st, mixer, a + "linear_attn.", o, dim)


def convert_mamba(cfg, st, family):
    """Mamba (state-spaces/mamba-130m-hf ... 2.8b-hf) and Mamba-2 (mistralai/Mamba-Codestral-7B-v0.1): each layer
    is RMSNorm -> mixer, no FFN, no positions."""
    dim, n_layers, vocab = require(cfg, "hidden_size", "num_hidden_layers", "vocab_size")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ExportError(f"config.json: hidden_act '{cfg.get('hidden_act')}' is not supported by {family} (silu)")
    if family == "mamba2" and not cfg.get("rms_norm", True):
        raise ExportError("config.json: rms_norm false (Mamba-2 without its gated norm) is not supported")
    p = "backbone." if "backbone.norm_f.weight" in st else ""
    embeddings = p + ("embeddings.weight" if p + "embeddings.weight" in st else "embedding.weight")
    tied = cfg.get("tie_word_embeddings", "lm_head.weight" not in st)
    m = Model(family, dim, vocab, unbounded_context(cfg), norm_eps=config_float(cfg, "layer_norm_epsilon", 1e-5),
              tied=tied)
    mixer, add = (mamba_record(cfg, dim), add_mamba) if family == "mamba" else (mamba2_record(cfg, dim), add_mamba2)
    m.layers = [Layer(mixer, None, LAYER_MIXER_NORM) for _ in range(n_layers)]
    add_embeddings(st, m, embeddings)
    for i in range(n_layers):
        m.add(f"layers.{i}.mixer_norm", (dim,), getter(st, f"{p}layers.{i}.norm.weight"))
        add(m, st, mixer, f"{p}layers.{i}.mixer.", f"layers.{i}.", dim)
    m.add("final_norm", (dim,), getter(st, p + "norm_f.weight"))
    return m


def layernorm_rows(x, w, b, eps):
    """LayerNorm of each row of x, in float64, rounded to float32 once."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps) * np.asarray(w, np.float64) + np.asarray(b, np.float64)).astype(np.float32)


def convert_rwkv(cfg, st, family):
    """RWKV-4 (RWKV/rwkv-4-169m-pile ... rwkv-4-14b-pile, rwkv-raven): LayerNorm with bias, each block a time mix
    and a channel mix. Block 0's extra LayerNorm of the embeddings (ln0) depends on the token alone: it is
    applied to the embedding table here. transformers' inference rescaling (weights / 2^(i // rescale_every),
    hidden / 2 every rescale_every blocks: an fp16 overflow guard) is left out: LayerNorm does not see the
    scale, only its epsilon does (a difference far below the logits' rounding in f32)."""
    dim, n_layers, vocab = require(cfg, "hidden_size", "num_hidden_layers", "vocab_size")
    inner = config_int(cfg, "attention_hidden_size", dim)
    hidden = config_int(cfg, "intermediate_size", 4 * dim)
    eps = config_float(cfg, "layer_norm_epsilon", 1e-5)
    p = "rwkv." if "rwkv.embeddings.weight" in st else ""
    tied = cfg.get("tie_word_embeddings", "head.weight" not in st)
    m = Model(family, dim, vocab, unbounded_context(cfg), norm_kind=NORM_LAYER, norm_eps=eps, tied=tied)
    m.layers = [Layer(Rwkv(inner), RwkvChannelMix(hidden)) for _ in range(n_layers)]
    emb, ln0 = getter(st, p + "embeddings.weight"), p + "blocks.0.pre_ln."
    m.add("tok_embeddings", (vocab, dim), lambda: layernorm_rows(emb(), st.get(ln0 + "weight"), st.get(ln0 + "bias"), eps))
    if not tied:
        m.add("output", (vocab, dim), getter(st, "head.weight"))
    for i in range(n_layers):
        a, o = f"{p}blocks.{i}.", f"layers.{i}."
        for norm, ln in (("mixer_norm", "ln1"), ("ffn_norm", "ln2")):
            m.add(o + norm, (dim,), getter(st, a + ln + ".weight"))
            m.add(o + norm + "_bias", (dim,), getter(st, a + ln + ".bias"))
        t = a + "attention."
        for mix in ("k", "v", "r"):
            name = {"k": "key", "v": "value", "r": "receptance"}[mix]
            m.add(o + "rwkv.mix_" + mix, (dim,), reshaped(st, t + "time_mix_" + name, (1, 1, dim), (dim,)))
            m.add(o + "rwkv.w_" + mix, (inner, dim), getter(st, t + name + ".weight"))
        m.add(o + "rwkv.decay", (inner,), getter(st, t + "time_decay"))
        m.add(o + "rwkv.first", (inner,), getter(st, t + "time_first"))
        m.add(o + "rwkv.w_out", (dim, inner), getter(st, t + "output.weight"))
        f = a + "feed_forward."
        m.add(o + "rwkv_ffn.mix_k", (dim,), reshaped(st, f + "time_mix_key", (1, 1, dim), (dim,)))
        m.add(o + "rwkv_ffn.mix_r", (dim,), reshaped(st, f + "time_mix_receptance", (1, 1, dim), (dim,)))
        m.add(o + "rwkv_ffn.w_k", (hidden, dim), getter(st, f + "key.weight"))
        m.add(o + "rwkv_ffn.w_r", (dim, dim), getter(st, f + "receptance.weight"))
        m.add(o + "rwkv_ffn.w_v", (dim, hidden), getter(st, f + "value.weight"))
    m.add("final_norm", (dim,), getter(st, p + "ln_out.weight"))
    m.add("final_norm_bias", (dim,), getter(st, p + "ln_out.bias"))
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
    "qwen3_moe": convert_llama_like,
    "gemma2": convert_llama_like,
    "gemma3_text": convert_llama_like,
    "phi3": convert_llama_like,
    "smollm3": convert_llama_like,
    "olmo3": convert_llama_like,
    "exaone4": convert_llama_like,
    "gpt_oss": convert_llama_like,
    "llama4_text": convert_llama_like,
    "granitemoehybrid": convert_llama_like,
    "qwen3_next": convert_llama_like,
    "gpt2": convert_gpt2,
    "gpt_bigcode": convert_gpt2,
    "deepseek_v2": convert_deepseek,
    "deepseek_v3": convert_deepseek,
    "kimi_k2": convert_deepseek,  # DeepSeek-V3's architecture under its own name
    "mamba": convert_mamba,
    "mamba2": convert_mamba,
    "rwkv": convert_rwkv,
}


def convert_hf(src, args):
    cfg = load_json(os.path.join(src, "config.json"))
    if not isinstance(cfg, dict):
        raise ExportError(f"{os.path.join(src, 'config.json')}: not a JSON object")
    log(f"export: reading {src} ({cfg.get('model_type')})")
    m = convert_checkpoint(cfg, SafeTensors(src), os.path.join(src, "config.json"))
    if args.tokenizer:
        m.tokenizer = read_tokenizer(args.tokenizer, m.vocab_size, m.hf_config, src)
    elif not args.no_tokenizer:
        m.tokenizer = hf_tokenizer(src, m.hf_config, m.vocab_size)
    m.chat = chat_section(([os.path.dirname(os.path.abspath(args.tokenizer))] if args.tokenizer else []) + [src],
                          args.chat_template)
    return m


def convert_checkpoint(cfg, st, where):
    """The model description of a checkpoint given as a config in Hugging Face terms and its tensors under
    Hugging Face names (a safetensors directory, or a GGUF file through gguf_reader)."""
    family = cfg.get("model_type")
    wrappers = {"gemma3": "gemma3_text", "llama4": "llama4_text"}  # multimodal checkpoints: keep the text model
    if isinstance(family, str) and family in wrappers and isinstance(cfg.get("text_config"), dict):
        family = wrappers[family]
        cfg = dict(cfg["text_config"], model_type=family)
    if not isinstance(family, str) or family not in FAMILIES:
        raise ExportError(f"config.json: model_type '{family}' is not supported (supported: {', '.join(sorted(FAMILIES))})")
    cfg = {**FAMILY_DEFAULTS.get(family, {}), **cfg}
    with malformed_input(where):
        m = FAMILIES[family](cfg, st, family)
    check_shapes(m, st)
    m.hf_config = cfg
    m.source_dtype = default_dtype({st.dtype(n) for n in st.names() if len(st.shape(n)) >= 2 and st.dtype(n) != "U8"})
    return m


def default_dtype(matrix_dtypes):
    """The dtype matrices keep without --dtype: the checkpoint's own where attn.c has it (bf16 stays bf16), q8_0
    where a GGUF holds other quantized types (Q4_K ...: 8 bits keep what they hold), else f32 (mixed floats)."""
    if len(matrix_dtypes) == 1 and next(iter(matrix_dtypes)).lower() in DTYPES:
        return DTYPES[next(iter(matrix_dtypes)).lower()]
    if any(d.lower() not in ("f32", "f16", "bf16") for d in matrix_dtypes):
        return DTYPES["q8_0"]
    return DTYPES["f32"]


def convert_gguf(path, args):
    """A llama.cpp GGUF model file, through the Hugging Face converters (gguf_reader gives them the config and
    tensors in Hugging Face terms)."""
    try:
        ck = gguf_reader.GGUFCheckpoint(path)
    except gguf_reader.GGUFError as e:
        raise ExportError(str(e))
    log(f"export: reading {path} (GGUF, {ck.arch} -> {ck.config['model_type']})")
    m = convert_checkpoint(ck.config, ck.tensors, path)
    if args.tokenizer:
        m.tokenizer = read_tokenizer(args.tokenizer, m.vocab_size, m.hf_config)
    elif ck.tokenizer is not None:
        m.tokenizer = tokenizer_from_json(path, ck.tokenizer, {"eos_token_id": ck.eos}, m.vocab_size, [])
    else:
        log("export: the GGUF file has no tokenizer: the model will run from --tokens")
    m.chat = chat_section([], args.chat_template) if args.chat_template else gguf_chat_section(ck, path)
    return m


def check_shapes(m, st):
    """Fail before writing anything if a checkpoint tensor's shape disagrees with the config."""
    for name, shape, producer in m.tensors:
        src = getattr(producer, "source", None)
        if src is not None and tuple(st.shape(src)) != shape:
            raise ExportError(f"tensor '{src}' has shape {st.shape(src)}, config implies {list(shape)}")


# ----------------------------------------------------------------------------
# llama2.c checkpoints: the legacy layout (version 0: 7 int32, then float32 arrays) and, after a 256-byte header
# that starts with the magic "ak42", version 1 (float32) and version 2 (q8_0 in groups, float32 scales)

LLAMA2C_MAGIC = struct.pack("<I", 0x616B3432)  # llama2.c writes the uint32 "ak42"; on disk: b"24ka"


class Llama2cArray:
    """One of a llama2.c file's arrays (all layers back to back): float32, or (version 2) int8 values in groups of
    group_size with one float32 scale each, w = q * scale."""

    def __init__(self, mm, offset, count, scales_offset=None, group_size=0):
        self.mm, self.offset, self.count, self.scales_offset, self.group_size = mm, offset, count, scales_offset, group_size

    def take(self, start, n):
        if self.scales_offset is None:
            return np.frombuffer(self.mm, dtype="<f4", count=n, offset=self.offset + 4 * start)
        g = self.group_size
        q = np.frombuffer(self.mm, dtype=np.int8, count=n, offset=self.offset + start).astype(np.float32)
        scale = np.frombuffer(self.mm, dtype="<f4", count=n // g, offset=self.scales_offset + 4 * (start // g))
        return (q.reshape(-1, g) * scale[:, None]).reshape(-1)


def llama2c_arrays(path):
    """(header dims, shared classifier, {name: Llama2cArray}, version) of a llama2.c checkpoint."""
    with open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(256)
        mm = np.memmap(f, dtype=np.uint8, mode="r") if size else None
    version = struct.unpack_from("<i", head, 4)[0] if head[:4] == LLAMA2C_MAGIC and len(head) >= 8 else 0
    if version not in (0, 1, 2):
        raise ExportError(f"{path}: llama2.c checkpoint version {version} is not supported (0, 1 and 2 are)")
    if len(head) < (28 if version == 0 else 256):
        raise ExportError(f"{path}: too short for a llama2.c header")
    dims = struct.unpack_from("<7i", head, 0 if version == 0 else 8)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = dims
    shared = vocab > 0 if version == 0 else bool(head[36])
    vocab = abs(vocab)
    group = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
    limits = (LIMITS["dim"], LIMITS["hidden_dim"], LIMITS["layers"], LIMITS["heads"], LIMITS["heads"],
              LIMITS["vocab_size"], LIMITS["context_length"])
    if not all(0 < x <= hi for x, hi in zip((dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len), limits)) or \
            dim % n_heads or n_heads % n_kv or (version == 2 and (group <= 0 or dim % group)):
        # the numbers are not shown: a file that is not a checkpoint would have its first bytes printed
        raise ExportError(f"{path}: implausible llama2.c header (not a llama2.c checkpoint, or sizes past the format's limits)")
    head_dim, kv_dim = dim // n_heads, n_kv * (dim // n_heads)
    counts = dict(tok=vocab * dim, rms_att=n_layers * dim, wq=n_layers * dim * dim, wk=n_layers * kv_dim * dim,
                  wv=n_layers * kv_dim * dim, wo=n_layers * dim * dim, rms_ffn=n_layers * dim, w1=n_layers * hidden * dim,
                  w2=n_layers * dim * hidden, w3=n_layers * hidden * dim, rms_final=dim, freqs=seq_len * head_dim,
                  wcls=0 if shared else vocab * dim)
    if version == 0:    # legacy: float32 arrays in model order, the unused rope tables before the classifier
        order, quantized = ["tok", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final", "freqs", "wcls"], []
    elif version == 1:  # float32: the norms first, then the matrices
        order, quantized = ["rms_att", "rms_ffn", "rms_final", "tok", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"], []
    else:               # the norms in float32, every matrix's int8 values, then every matrix's scales
        order, quantized = ["rms_att", "rms_ffn", "rms_final"], ["tok", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"]
        if any(counts[n] % group for n in quantized):
            raise ExportError(f"{path}: a matrix does not fill whole groups of {group}")
    offset = 28 if version == 0 else 256
    need = offset + 4 * sum(counts[n] for n in order) + sum(counts[n] * (1 + 4 / max(group, 1)) for n in quantized)
    if size < need:
        raise ExportError(f"{path}: truncated llama2.c checkpoint ({size} bytes, header implies {int(need)})")
    log(f"export: reading {path} (llama2.c version {version}: dim {dim}, {n_layers} layers, {n_heads}/{n_kv} heads, "
        f"vocab {vocab}{f', q8_0 in groups of {group}' if version == 2 else ''})")
    arrays = {}
    for name in order:
        arrays[name] = Llama2cArray(mm, offset, counts[name])
        offset += 4 * counts[name]
    scales = offset + sum(counts[n] for n in quantized)
    for name in quantized:
        arrays[name] = Llama2cArray(mm, offset, counts[name], scales, group)
        offset += counts[name]
        scales += 4 * counts[name] // group
    return (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len), shared, arrays, version


def convert_llama2c(path, args):
    (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len), shared, arrays, version = llama2c_arrays(path)
    head, kv_dim = dim // n_heads, n_kv * (dim // n_heads)
    m = Model("llama", dim, vocab, seq_len, norm_eps=1e-5, tied=shared)
    for _ in range(n_layers):
        m.layers.append(Layer(Attention(n_heads, n_kv, head, rope_theta=10000.0), Dense(hidden)))

    def mat(name, layer, r, c):
        return lambda: arrays[name].take(layer * r * c, r * c).reshape(r, c)

    m.add("tok_embeddings", (vocab, dim), mat("tok", 0, vocab, dim))
    for i in range(n_layers):
        o = f"layers.{i}."
        m.add(o + "mixer_norm", (dim,), lambda i=i: arrays["rms_att"].take(i * dim, dim))
        m.add(o + "attn.wq", (dim, dim), interleaved_to_halves(mat("wq", i, dim, dim), n_heads, head))
        m.add(o + "attn.wk", (kv_dim, dim), interleaved_to_halves(mat("wk", i, kv_dim, dim), n_kv, head))
        m.add(o + "attn.wv", (kv_dim, dim), mat("wv", i, kv_dim, dim))
        m.add(o + "attn.wo", (dim, dim), mat("wo", i, dim, dim))
        m.add(o + "ffn_norm", (dim,), lambda i=i: arrays["rms_ffn"].take(i * dim, dim))
        m.add(o + "ffn.w_gate", (hidden, dim), mat("w1", i, hidden, dim))
        m.add(o + "ffn.w_up", (hidden, dim), mat("w3", i, hidden, dim))
        m.add(o + "ffn.w_down", (dim, hidden), mat("w2", i, dim, hidden))
    m.add("final_norm", (dim,), lambda: arrays["rms_final"].take(0, dim))
    if not shared:
        m.add("output", (vocab, dim), mat("wcls", 0, vocab, dim))
    if args.chat_template:
        m.chat = chat_section([os.path.dirname(os.path.abspath(args.tokenizer))] if args.tokenizer else [],
                              args.chat_template)
    if args.tokenizer:
        m.tokenizer = read_tokenizer(args.tokenizer, vocab)
    else:
        log("export: no tokenizer (give --tokenizer tokenizer.bin for text prompts): the model will run from --tokens")
    if version == 2:
        m.source_dtype = DTYPES["q8_0"]  # 8-bit weights stay 8-bit (regrouped: 32 per scale, along rows)
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
        self.steps = []                        # (regex, behavior, invert) when pretokenizer is PRE_SPLITS
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
        eos = self.eos
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
        if self.pretokenizer == PRE_SPLITS:  # the Split steps: u32 count, then behavior, flags, length, regex each
            out.append(struct.pack("<I", len(self.steps)))
            for regex, behavior, invert in self.steps:
                data = regex.encode("utf-8")
                out.append(struct.pack("<3I", behavior, 1 if invert else 0, len(data)) + data)
        return b"".join(out)


def read_tokenizer(path, vocab_size, cfg=None, model_dir=None):
    """The tokenizer record for a tokenizer.json, a SentencePiece tokenizer.model or a llama2.c tokenizer.bin.
    tokenizer_config.json and generation_config.json are looked for beside the tokenizer and in model_dir."""
    with open_input(path, MAX_TOKENIZER_BYTES) as f:
        head = f.read(1)
    dirs = [os.path.dirname(os.path.abspath(path))] + ([model_dir] if model_dir else [])
    if head == gguf_reader.GGUF_MAGIC[:1] and file_magic(path) == gguf_reader.GGUF_MAGIC:  # a GGUF's vocabulary
        try:
            tok, eos = gguf_reader.read_vocabulary(path)
        except gguf_reader.GGUFError as e:
            raise UnsupportedTokenizer(str(e))
        return tokenizer_from_json(path, tok, {"eos_token_id": eos}, vocab_size, [])
    if path.endswith(".json"):
        return json_tokenizer(path, cfg or {}, vocab_size, dirs)
    if path.endswith(".bin"):
        return llama2c_tokenizer(path, vocab_size)
    if path.endswith(".model") or head == b"\x0a":  # a protobuf starting with field 1 (the pieces)
        return sentencepiece_tokenizer(path, vocab_size, dirs)
    raise ExportError(f"{path}: not a tokenizer.json, a SentencePiece tokenizer.model, a llama2.c tokenizer.bin or a GGUF file")


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


# the regexes the record names by number (the engine has hand-written matchers for them)
KNOWN_REGEXES = {GPT2_REGEX: PRE_GPT2, LLAMA3_REGEX: PRE_LLAMA3, QWEN2_REGEX: PRE_QWEN2}


def steps_of(block, list_key):
    """The steps of a normalizer / pre_tokenizer / decoder block: a Sequence's list, or the block itself."""
    if block is None:
        return []
    return list(block.get(list_key) or []) if block.get("type") == "Sequence" else [block]


def bytelevel_rules(tok, path):
    """(pretokenizer id, Split steps, flags) of a byte-level tokenizer.json, or an error naming what is unsupported."""
    if tok.get("normalizer") is not None:
        raise UnsupportedTokenizer(f"{path}: normalizer '{tok['normalizer'].get('type')}' is not supported with byte-level BPE")
    if not tok.get("pre_tokenizer"):
        raise UnsupportedTokenizer(f"{path}: byte-level BPE without a pre_tokenizer is not supported")
    try:
        steps, prefix_space, saw_bytelevel = split_steps(tok.get("pre_tokenizer"))
    except PretokenizerError as e:
        raise UnsupportedTokenizer(f"{path}: {e}")
    if not saw_bytelevel:
        raise UnsupportedTokenizer(f"{path}: BPE without a ByteLevel step or byte_fallback is not supported")
    if len(steps) > 16:
        raise UnsupportedTokenizer(f"{path}: {len(steps)} pre-tokenizer steps (the record holds at most 16)")
    return pretokenizer_of(steps) + (TOKF_PREFIX_SPACE if prefix_space else 0,)


def pretokenizer_of(steps):
    """(pretokenizer id, steps to store): a single isolating step with a known regex is named by its number."""
    if not steps:
        return PRE_NONE, []
    if len(steps) == 1 and steps[0][1:] == (0, False) and steps[0][0] in KNOWN_REGEXES:
        return KNOWN_REGEXES[steps[0][0]], []
    return PRE_SPLITS, steps


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


def json_tokenizer(path, cfg, vocab_size, dirs):
    return tokenizer_from_json(path, load_json(path, MAX_TOKENIZER_BYTES), cfg, vocab_size, dirs)


@reads_input
def tokenizer_from_json(path, tok, cfg, vocab_size, dirs):
    """The tokenizer record of a tokenizer.json (the dict; path names it in messages)."""
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
        rec.pretokenizer, rec.steps, rec.flags = bytelevel_rules(tok, path)
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
        f"{len(vocab)} tokens, {len(rec.merges)} merges, bos {rec.bos} (added: {add_bos}), eos {shown_ids(rec.eos)}")
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
    """Every end-of-sequence id the checkpoint names (generation_config.json, config.json, the tokenizer's
    eos_token), each once, in the order found; the record keeps them all (the loader checks each id)."""
    candidates = []
    for source in (config_file(dirs, "generation_config.json"), cfg):
        e = source.get("eos_token_id")
        candidates += [x for x in (e if isinstance(e, list) else [e]) if isinstance(x, int) and not isinstance(x, bool)]
    candidates += [t for t in [token_id(tcfg.get("eos_token"), special_id)] + list(extra) if t is not None and t >= 0]
    return list(dict.fromkeys(candidates))  # each once, in order (a set for membership: linear in the count)


def shown_ids(ids, most=8):
    """A list of ids for a log line: the first few and how many."""
    return f"{ids}" if len(ids) <= most else f"[{', '.join(map(str, ids[:most]))}, ... ({len(ids)} ids)]"


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
    with open_input(path, MAX_TOKENIZER_BYTES) as f:
        data = f.read()
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
        f"bos {rec.bos} (added: {bool(rec.flags & TOKF_ADD_BOS)}), eos {shown_ids(rec.eos)}")
    return rec.pack()


# -- llama2.c tokenizer.bin: i32 max_token_length, then per token f32 score, i32 length, bytes


@reads_input
def llama2c_tokenizer(path, vocab_size):
    """llama2.c's export of the Llama 2 vocabulary: pieces with "▁" written as a space, BOS as "\\n<s>\\n",
    EOS as "\\n</s>\\n", bytes as <0xNN>. llama2.c encodes like SentencePiece (a dummy-prefix space, merges
    by score, byte fallback), decodes dropping the space after BOS, and stops at BOS as well as EOS."""
    with open_input(path, MAX_TOKENIZER_BYTES) as f:
        data = f.read()
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
    return checked_chat_section(template, variables, where)


def checked_chat_section(template, variables, where):
    """pack_chat_section after the checks of the loader (sizes, NUL bytes, valid text), each failure one line."""
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


def gguf_chat_section(ck, path):
    """The chat section of a GGUF file: its tokenizer.chat_template, with the texts of its BOS and EOS tokens."""
    meta = ck.gguf.meta
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, bytes):
        template = template.decode("utf-8", "replace")
    if not isinstance(template, str) or not template:
        return b""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    variables = []
    for name, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        i = meta.get(key)
        if isinstance(i, int) and 0 <= i < len(tokens):
            variables.append((name, tokens[i].decode("utf-8", "replace")))
    return checked_chat_section(template, variables, path)


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
    if len(shape) == 3:  # a stack of matrices, each padded to 64 bytes
        return shape[0] * stack_stride(dtype, shape[1:])
    count = int(np.prod(shape))
    if dtype == DTYPES["q8_0"]:  # the int8 values, then one f16 scale per group
        return count + count // Q8_GROUP * 2
    if dtype == DTYPES["q4_0"]:  # the 4-bit values, two a byte, then one f16 scale per group
        return count // 2 + count // Q8_GROUP * 2
    return count * (4 if dtype == DTYPES["f32"] else 2)


def stack_stride(dtype, shape):
    return pad_to(tensor_nbytes(dtype, tuple(shape)))


def quantize_q8_0(arr):
    """[rows][cols] -> rows*cols int8 values (row-major), then rows*cols/32 f16 scales (row-major): each group of
    32 values of a row is round(w / scale) with scale = max|w| / 127, so value * scale approximates w.

    The scale is rounded up to an f16, never down: w / scale then stays within +-127 (no value is clipped),
    and a group of tiny weights (max|w| below 127 x 2^-25, ~4e-6) keeps a scale of at least 2^-24, the
    smallest f16, instead of one rounded to 0 that would make the whole group vanish."""
    rows, cols = arr.shape
    groups = arr.reshape(rows, cols // Q8_GROUP, Q8_GROUP)
    exact = np.abs(groups).max(axis=-1) / np.float32(127.0)
    with np.errstate(over="ignore"):
        scale = exact.astype(np.float16)
        scale = np.where(scale.astype(np.float32) < exact, np.nextafter(scale, np.float16(np.inf)), scale)
    if not np.isfinite(scale).all():
        raise ExportError("a weight exceeds the q8_0 range (its scale overflows f16); export with --dtype bf16 or f32")
    s32 = scale.astype(np.float32)
    inv = np.divide(np.float32(1.0), s32, out=np.zeros_like(s32), where=s32 > 0)
    q = np.clip(np.rint(groups * inv[..., None]), -127, 127).astype(np.int8)
    return q.tobytes() + scale.astype("<f2").tobytes()


def quantize_q4_0(arr):
    """[rows][cols] -> rows*cols/2 bytes of 4-bit values u, then rows*cols/32 f16 scales, as GGML's Q4_0: per group
    of 32, scale = the value of largest magnitude / -8 and u = round(w / scale) + 8 clamped to 0 .. 15, so that
    (u - 8) * scale approximates w. The 32 bytes of each pair of groups hold columns j (low 4 bits) and 32 + j
    (high 4 bits)."""
    rows, cols = arr.shape
    groups = arr.reshape(rows, cols // Q8_GROUP, Q8_GROUP)
    biggest = np.take_along_axis(groups, np.abs(groups).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    with np.errstate(over="ignore"):
        scale = (biggest / np.float32(-8.0)).astype(np.float16)
    if not np.isfinite(scale).all():
        raise ExportError("a weight exceeds the q4_0 range (its scale overflows f16); export with --dtype bf16 or f32")
    s32 = scale.astype(np.float32)
    inv = np.divide(np.float32(1.0), s32, out=np.zeros_like(s32), where=s32 != 0)
    u = np.clip(np.rint(groups * inv[..., None]) + 8, 0, 15).astype(np.uint8).reshape(rows, cols // Q4_PAIR, 2, 32)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).tobytes() + scale.astype("<f2").tobytes()


def matrix_dtype(dtype, name, shape):
    """The dtype a matrix (or stack of matrices) is stored in: the export dtype, except that q8_0 needs whole
    groups of 32 columns and q4_0 whole pairs of groups (64): a matrix without them is stored as q8_0 if it can
    be, else f32."""
    if dtype == DTYPES["q4_0"] and shape[-1] % Q4_PAIR:
        log(f"export: {name} {list(shape)} has columns that do not fill pairs of groups ({Q4_PAIR}): not q4_0")
        dtype = DTYPES["q8_0"]
    if dtype == DTYPES["q8_0"] and shape[-1] % Q8_GROUP:
        log(f"export: {name} {list(shape)} has columns that do not fill groups of {Q8_GROUP}: stored as f32, not q8_0")
        return DTYPES["f32"]
    return dtype


def encode_tensor(arr, dtype):
    """The bytes of a float32 array in dtype. A NaN or an infinity (in the checkpoint, or a value past the
    range of the dtype) is refused: ./run would turn it into logits that are NaN everywhere."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))
        raise ExportError(f"holds {bad.size} NaN or infinite values (the first at flat index {bad[0]})")
    if arr.ndim == 3:  # a stack: each matrix on its own, starting 64-byte aligned
        return b"".join(encode_tensor(a, dtype).ljust(stack_stride(dtype, a.shape), b"\0") for a in arr)
    if dtype == DTYPES["q8_0"]:
        return quantize_q8_0(arr)
    if dtype == DTYPES["q4_0"]:
        return quantize_q4_0(arr)
    if dtype == DTYPES["f32"]:
        return arr.astype("<f4").tobytes()
    if dtype == DTYPES["f16"]:
        if np.abs(arr).max(initial=0.0) > 65504.0:
            raise ExportError("a weight exceeds the f16 range; export with --dtype bf16 or f32")
        return arr.astype("<f2").tobytes()
    bf16 = f32_to_bf16(arr)
    if ((bf16 & 0x7F80) == 0x7F80).any():  # rounded past the largest bf16 (3.39e38): infinity
        raise ExportError("a weight exceeds the bf16 range; export with --dtype f32")
    return bf16.astype("<u2").tobytes()


# The loader's limits (model.c): a file outside them would be written only to be refused by ./run.
LIMITS = dict(dim=1 << 16, hidden_dim=1 << 20, vocab_size=1 << 22, context_length=1 << 24, layers=4096, heads=1024,
              head_dim=1024, experts=4096, latent_rank=4096, state=1024, conv=64, chunk=1024, state_floats=1 << 26)


def whole_number(v, what, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ExportError(f"{what} is {v!r} (the format allows {lo} .. {hi})")


def check_model(m):
    """Fail before writing if the model description breaks a rule of the format (docs/FORMAT.md), or if its
    tensors are not exactly those the tensor table asks for."""
    whole = whole_number

    for f in ("dim", "vocab_size", "context_length"):
        whole(getattr(m, f), f, 1, LIMITS[f])
    whole(len(m.layers), "the number of layers", 1, LIMITS["layers"])
    if not 0.0 < m.norm_eps < 1.0:
        raise ExportError(f"norm epsilon {m.norm_eps} is not in (0, 1)")
    if not all(math.isfinite(v) for v in (m.embed_scale, m.residual_scale, m.logit_scale, m.final_softcap)) or m.final_softcap < 0:
        raise ExportError(f"embed / residual / logit scale {m.embed_scale} / {m.residual_scale} / {m.logit_scale} or "
                          f"final softcap {m.final_softcap} is not valid")
    for i, L in enumerate(m.layers):
        a = L.attn
        if not isinstance(a, Attention):
            a.check(f"layer {i}")
        else:
            whole(a.n_heads, f"layer {i}: n_heads", 1, LIMITS["heads"])
            whole(a.head_dim, f"layer {i}: head_dim", 1, LIMITS["head_dim"])
            whole(a.window, f"layer {i}: sliding window", 0, LIMITS["context_length"])
            whole(a.chunk, f"layer {i}: attention chunk", 0, LIMITS["context_length"])
            whole(a.rope_dim, f"layer {i}: rotary dimensions", 0, a.head_dim)
            if a.rope_dim % 2:
                raise ExportError(f"layer {i}: {a.rope_dim} rotary dimensions is odd (head_dim {a.head_dim})")
            if m.position_kind == POS_ROPE and a.rope_dim and a.rope_table < 0 and not a.rope_theta > 1.0:
                raise ExportError(f"layer {i}: rope_theta {a.rope_theta} is not valid")
            if not (math.isfinite(a.attn_scale) and a.attn_scale > 0 and math.isfinite(a.attn_softcap) and a.attn_softcap >= 0
                    and math.isfinite(a.rope_attn_factor) and a.rope_attn_factor > 0):
                raise ExportError(f"layer {i}: attention scale {a.attn_scale} / softcap {a.attn_softcap} / rope factor "
                                  f"{a.rope_attn_factor} is not valid")
        if L.ffn is not None:
            whole(L.ffn.hidden, f"layer {i}: FFN width", 1, LIMITS["hidden_dim"])
        if isinstance(L.ffn, MoE):
            whole(L.ffn.n_experts, f"layer {i}: experts", 1, LIMITS["experts"])
            whole(L.ffn.top_k, f"layer {i}: experts per token", 1, L.ffn.n_experts)
    for t in m.rope_tables:
        if not (np.isfinite(t).all() and (t > 0).all()):
            raise ExportError("a rope table has frequencies that are not finite and positive (check rope_scaling)")
    want = expected_tensors(m)
    have = {name: shape for name, shape, _ in m.tensors}
    for name, (shape, _) in want.items():
        if name not in have:
            raise ExportError(f"the converter gave no tensor '{name}' (tensors.def asks for it)")
        if have[name] != shape:
            raise ExportError(f"tensor '{name}' has shape {list(have[name])}, tensors.def asks for {list(shape)}")
    extra = [n for n in have if n not in want and not n.startswith("rope_inv_freq.")]
    if extra:
        raise ExportError(f"tensor '{extra[0]}' is not one tensors.def lists for this model")
    return want


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
    table = check_model(m)
    for i, t in enumerate(m.rope_tables):
        m.add(f"rope_inv_freq.{i}", t.shape, lambda t=t: t)
    n_layers, n_tensors = len(m.layers), len(m.tensors)
    tok, chat = m.tokenizer or b"", m.chat
    layers = b"".join(L.pack() for L in m.layers)
    config_off = 128
    layers_off = config_off + 128
    tok_off = layers_off + len(layers)
    chat_off = tok_off + len(tok) if chat else 0
    tensors_off = pad_to(tok_off + len(tok) + len(chat), 8)
    data_off = pad_to(tensors_off + 128 * n_tensors)
    directory, offset = [], data_off
    for name, shape, _ in m.tensors:
        if len(name.encode()) >= 80:
            raise ExportError(f"tensor name too long: {name}")
        storage = table[name][1] if name in table else "F32"
        dt = matrix_dtype(dtype, name, shape) if storage == "MATRIX" else DTYPES["f32"]
        nbytes = tensor_nbytes(dt, shape)
        directory.append((name, dt, shape, offset, nbytes))
        offset = pad_to(offset + nbytes)
    file_size = offset

    header = HEADER.pack(b"ATNC", FORMAT_VERSION, file_size, config_off, 128, layers_off,
                         n_layers, len(layers), tok_off, len(tok), tensors_off, n_tensors, 128, data_off, file_size - data_off)
    header += CHAT_HEADER.pack(chat_off, len(chat))
    header += bytes(128 - len(header))
    config = struct.pack("<32s 3I I f I 4f 2I", m.family.encode()[:31], m.dim, m.vocab_size, m.context_length,
                         m.norm_kind, m.norm_eps, m.position_kind, m.embed_scale, m.residual_scale, m.logit_scale,
                         m.final_softcap, m.flags(), len(m.rope_tables))
    config += bytes(128 - len(config))
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
                try:
                    data = encode_tensor(arr, dt)
                except ExportError as e:
                    raise ExportError(f"tensor '{name}' (from the checkpoint): {e}")
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


def output_stat(out):
    """os.stat of the output path (through a symbolic link), or None if nothing is there yet."""
    try:
        return os.stat(out)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ExportError(f"{out}: {e.strerror}")


def check_output(out, inputs):
    """Before any work: out can be written the way write_model writes it (a temporary file in its directory,
    renamed over it) and is none of the inputs named on the command line. An existing out that is not a
    regular file is refused: the rename would replace a device node, a FIFO or a socket with a regular file."""
    st = output_stat(out)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ExportError(f"{out}: {os.strerror(21)}")  # EISDIR
        if not stat.S_ISREG(st.st_mode):
            raise ExportError(f"{out}: exists and is not a regular file (a device, a FIFO or a socket): export would "
                              f"replace it with a regular file; give another output path")
        for path in inputs:
            other = output_stat(path)
            if other is not None and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                raise ExportError(f"{out}: is the input {path}: export would replace its own input")
    d = os.path.dirname(os.path.abspath(out))
    try:
        fd, probe = tempfile.mkstemp(prefix=".export-", suffix=".tmp", dir=d)
    except OSError as e:
        raise ExportError(f"{out}: cannot create a file in {d} ({e.strerror})")
    os.close(fd)
    os.unlink(probe)


def check_output_is_no_input(out):
    """After the inputs are open, before any weight is read: out is none of the files this export reads
    (model.safetensors, a shard, config.json, ... through any symbolic or hard link)."""
    st = output_stat(out)
    if st is not None and (st.st_dev, st.st_ino) in INPUTS:
        raise ExportError(f"{out}: is one of the files this export reads: it would replace its own input")


def file_magic(path):
    """The first 4 bytes of an input file (regular files only: a FIFO is refused, never waited on)."""
    with open_input(path) as f:
        return f.read(4)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a Hugging Face, GGUF or llama2.c checkpoint to an attn.c model file.")
    ap.add_argument("src", help="Hugging Face model directory, a llama.cpp .gguf file, or a llama2.c .bin checkpoint")
    ap.add_argument("out", help="output model file")
    ap.add_argument("--dtype", choices=sorted(DTYPES),
                    help="weight dtype (default: the checkpoint's own); q8_0: int8 in groups of 32 with an f16 scale "
                         "each; q4_0: 4-bit in groups of 32 with an f16 scale each")
    ap.add_argument("--tokenizer", metavar="FILE",
                    help="take the tokenizer from FILE: a tokenizer.json, a SentencePiece tokenizer.model, a llama2.c "
                         "tokenizer.bin or a GGUF file's vocabulary (default: the model directory's tokenizer.json, else "
                         "its tokenizer.model; a GGUF's own)")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="leave the checkpoint's tokenizer out (one attn.c lacks, such as tiktoken's): prompts are --tokens")
    ap.add_argument("--chat-template", metavar="FILE",
                    help="the chat template to store: a .jinja file, or a .json holding chat_template (default: the "
                         "checkpoint's chat_template.jinja, tokenizer_config.json or chat_template.json; a GGUF's "
                         "tokenizer.chat_template)")
    ap.add_argument("--bf16-rope", action="store_true",
                    help="round RoPE inverse frequencies to bf16, as a model cast with .to(torch.bfloat16) computes "
                         "them (for checkpoints trained that way, such as kjv-5m)")
    ap.add_argument("--kv-heads", metavar="L=N[,L=N...]|all=N",
                    help="regroup key/value heads per layer: N a multiple of the layer's kv heads duplicates them "
                         "(exact), a divisor mean-pools each group's k/v projections (GQA/MQA from MHA, Ainslie et al. 2023)")
    ap.add_argument("--no-softmax-mscale", action="store_true",
                    help="latent attention: leave DeepSeek's YaRN correction mscale(factor, mscale_all_dim)^2 out of the "
                         "softmax scale, as transformers' deepseek_v2 did up to 5.2 (its PR #47435 adds it; DeepSeek's "
                         "own code always had it)")
    args = ap.parse_args(argv)
    INPUTS.clear()
    try:
        check_output(args.out, [p for p in (args.src, args.tokenizer) if p])
        if os.path.isdir(args.src):
            m = convert_hf(args.src, args)
        elif os.path.lexists(args.src) and file_magic(args.src) == gguf_reader.GGUF_MAGIC:
            m = convert_gguf(args.src, args)
        elif os.path.lexists(args.src):
            m = convert_llama2c(args.src, args)
        else:
            raise ExportError(f"{args.src}: no such file or directory")
        dtype = DTYPES[args.dtype] if args.dtype else m.source_dtype
        full_attention_windows(m)
        if args.bf16_rope:
            round_rope_to_bf16(m)
        if args.kv_heads:
            regroup_kv_heads(m, parse_kv_heads(args.kv_heads, len(m.layers)))
        check_output_is_no_input(args.out)
        if args.no_softmax_mscale:
            for layer in m.layers:
                if isinstance(layer.mixer, LatentAttention):
                    layer.mixer.softmax_mscale = 1.0
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
