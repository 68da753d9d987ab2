"""Mutated copies of a real model file, for the corpus test (tests/test_hostile.py).

layout(blob) walks a file the way docs/FORMAT.md lays it out and returns every field's offset and width,
so the mutations below can aim at each structure: truncations at every boundary (with the header's size
fields left alone, or patched to match so the cut reaches the deeper checks), each header / config /
layer / tensor-record / tokenizer field set to absurd values, random byte flips per section, wrong magic
and version. mutants(blob, rng) yields (label, bytes)."""
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from export import CHAT_HEADER, HEADER, read_tensor_directory  # noqa: E402

# (name, offset, width) of the header fields after the magic
HEADER_FIELDS = [("version", 4, 4), ("file_size", 8, 8), ("config_offset", 16, 8), ("config_size", 24, 8),
                 ("layers_offset", 32, 8), ("n_layers", 40, 4), ("layers_size", 44, 4),
                 ("tokenizer_offset", 48, 8), ("tokenizer_size", 56, 8), ("tensors_offset", 64, 8),
                 ("n_tensors", 72, 4), ("tensor_record_size", 76, 4), ("data_offset", 80, 8), ("data_size", 88, 8),
                 ("chat_offset", 96, 8), ("chat_size", 104, 8)]
CONFIG_FIELDS = ["dim", "vocab_size", "context_length", "norm_kind", "norm_eps", "position_kind", "embed_scale",
                 "residual_scale", "logit_scale", "final_softcap", "flags", "n_rope_tables"]
# a layer record (docs/FORMAT.md): its header, then each kind's payload, field by field (4 bytes each)
LAYER_HEADER_FIELDS = ["record_size", "flags", "mixer_kind", "mixer_size"]
MIXER_FIELDS = {1: ["n_heads", "n_kv_heads", "head_dim", "window", "chunk", "rope_dim", "rope_table", "rope_theta",
                    "rope_attn_factor", "attn_scale", "attn_softcap", "temperature_floor", "temperature_scale", "flags"],
                2: ["n_heads", "q_rank", "kv_rank", "nope_dim", "rope_dim", "v_dim", "rope_table", "rope_theta",
                    "rope_attn_factor", "attn_scale", "norm_eps", "flags"],
                3: ["inner", "state", "conv", "dt_rank", "flags"],
                4: ["n_heads", "head_dim", "n_groups", "state", "conv", "chunk", "dt_min", "dt_max", "flags"],
                5: ["n_k_heads", "n_v_heads", "k_head_dim", "v_head_dim", "conv", "chunk", "flags"],
                6: ["inner", "flags"]}
DENSE_FIELDS = ["hidden_dim", "activation", "flags"]
FFN_FIELDS = {0: [], 1: DENSE_FIELDS, 2: DENSE_FIELDS,
              3: ["n_experts", "top_k", "hidden_dim", "activation", "router", "n_groups", "topk_groups",
                  "shared_hidden", "routed_scale", "act_alpha", "act_limit", "flags"],
             4: ["hidden_dim", "flags"]}
F32 = lambda x: struct.unpack("<I", struct.pack("<f", x))[0]  # noqa: E731
ODD_U32 = [0, 1, 2, 3, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFF, 1 << 16, 1 << 20, 1 << 24, (1 << 24) + 1,
           F32(float("nan")), F32(float("inf")), F32(float("-inf")), F32(-1.0), F32(1e30), F32(1e-30), F32(0.5)]
ODD_U64 = [0, 1, 127, 128, 0xFFFFFFFFFFFFFFFF, 1 << 63, 1 << 32, 0xFFFFFFFF]


# templates that must end in one error line, fast: recursion, endless loops, memory and output bombs, nesting,
# arithmetic edges, bad syntax (chat.c's limits)
HOSTILE_TEMPLATES = [
    ("recursive macro", b"{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}"),
    ("nested huge loops", b"{% for i in range(1000000) %}{% for j in range(1000000) %}x{% endfor %}{% endfor %}"),
    ("string repetition bomb", b"{{ 'x' * 100000000000 }}"),
    ("doubling namespace string", b"{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                                  b"{% endfor %}{{ ns.s }}"),
    ("deep parentheses", b"{{ " + b"(" * 400 + b"1" + b")" * 400 + b" }}"),
    ("deep if nesting", b"{% if 1 %}" * 300 + b"x" + b"{% endif %}" * 300),
    ("unclosed block", b"{% if messages %}{% for m in messages %}"),
    ("unterminated string", b"{{ 'abc }}"),
    ("unterminated comment", b"{# never closed"),
    ("stray end tag", b"{% endfor %}"),
    ("unknown statement", b"{% include 'x.j2' %}"),
    ("unknown filter", b"{{ messages | shuffle }}"),
    ("slice step zero", b"{{ messages[::0] }}"),
    ("division by zero", b"{{ 1 // 0 }}"),
    ("integer overflow", b"{{ 9223372036854775807 + 1 }}"),
    ("huge integer literal", b"{{ 99999999999999999999999 }}"),
    ("attribute of undefined", b"{{ nothing.at.all }}"),
    ("raise_exception", b"{{ raise_exception('refused') }}"),
    ("bad unpacking", b"{% for a, b, c in messages %}{% endfor %}"),
    ("unbalanced brackets", b"{{ [1, 2 }}"),
    ("huge range", b"{{ range(2000000) | length }}"),
    ("named escape", b"{{ '\\N{BULLET}' }}"),
]


class Layout:
    """Offsets of the structures of one model file."""

    def __init__(self, blob):
        (magic, self.version, self.file_size, self.config_off, _, self.layers_off, self.n_layers, self.layers_size,
         self.tok_off, self.tok_size, self.tensors_off, self.n_tensors, _, self.data_off, self.data_size) = HEADER.unpack_from(blob)
        assert magic == b"ATNC" and self.file_size == len(blob)
        self.layers = [self._layer(blob, off) for off in self._layer_offsets(blob)]
        # (record offset, name, data offset, nbytes)
        self.tensors = [(rec, name, off, nbytes) for rec, name, _, _, off, nbytes in read_tensor_directory(blob)]
        self.tok = self._tokenizer(blob) if self.tok_size else None
        self.chat_off, self.chat_size = CHAT_HEADER.unpack_from(blob, 96)
        self.chat = self._chat(blob) if self.chat_size else None

    def _chat(self, blob):
        """Offsets inside the chat section: the variable count, each (name length, value length), the
        template's length and text."""
        p = self.chat_off
        fields = {"n_variables": p, "variables": []}
        (n,) = struct.unpack_from("<I", blob, p)
        p += 4
        for _ in range(n):
            (name_len,) = struct.unpack_from("<I", blob, p)
            (value_len,) = struct.unpack_from("<I", blob, p + 4 + name_len)
            fields["variables"].append((p, name_len, p + 4 + name_len, value_len))
            p += 8 + name_len + value_len
        (template_len,) = struct.unpack_from("<I", blob, p)
        fields["template_len"], fields["template"] = p, (p + 4, template_len)
        assert p + 4 + template_len == self.chat_off + self.chat_size
        return fields

    def _layer_offsets(self, blob):
        off = self.layers_off
        for _ in range(self.n_layers):
            yield off
            off += struct.unpack_from("<I", blob, off)[0]

    def _layer(self, blob, off):
        """{"offset", "size", "fields": [(name, offset)], "parts": [offsets where its parts begin]}"""
        size, _, mixer, mixer_size = struct.unpack_from("<4I", blob, off)
        fields = [(n, off + 4 * i) for i, n in enumerate(LAYER_HEADER_FIELDS)]
        fields += [("mixer " + n, off + 16 + 4 * i) for i, n in enumerate(MIXER_FIELDS.get(mixer, []))]
        q = off + 16 + mixer_size
        ffn = struct.unpack_from("<I", blob, q)[0]
        fields += [("ffn_kind", q), ("ffn_size", q + 4)]
        fields += [("ffn " + n, q + 8 + 4 * i) for i, n in enumerate(FFN_FIELDS.get(ffn, []))]
        return {"offset": off, "size": size, "fields": fields, "parts": [off, off + 16, q, q + 8, off + size]}

    def _tokenizer(self, blob):
        """Offsets inside the tokenizer record: its header fields, each piece, the merges."""
        p = self.tok_off
        fields = {n: p + 4 * i for i, n in enumerate(["kind", "pretokenizer", "flags", "bos", "unk", "n_eos"])}
        n_eos = struct.unpack_from("<I", blob, fields["n_eos"])[0]
        fields["eos"] = [p + 24 + 4 * i for i in range(n_eos)]
        q = p + 24 + 4 * n_eos
        fields["n_pieces"], fields["n_merges"] = q, q + 4
        n_pieces, n_merges = struct.unpack_from("<II", blob, q)
        q += 8
        pieces = []  # (offset of len, length)
        for _ in range(n_pieces):
            (n,) = struct.unpack_from("<I", blob, q)
            pieces.append((q, n))
            q += 4 + n + 8
        fields["pieces"] = pieces
        fields["merges"] = q
        fields["n_merges_value"] = n_merges
        fields["n_pieces_value"] = n_pieces
        q += 8 * n_merges
        fields["steps"] = []  # pretokenizer 5: (offset of behavior, regex length) per Split step
        if struct.unpack_from("<I", blob, fields["pretokenizer"])[0] == 5:
            fields["n_steps"] = q
            (n_steps,) = struct.unpack_from("<I", blob, q)
            q += 4
            for _ in range(n_steps):
                (n,) = struct.unpack_from("<I", blob, q + 8)
                fields["steps"].append((q, n))
                q += 12 + n
        assert q == self.tok_off + self.tok_size
        return fields

    def boundaries(self):
        """Every offset where one structure ends and the next begins."""
        b = {0, 4, 8, 16, 96, 128, self.config_off + 32, self.config_off + 128, self.layers_off,
             self.layers_off + self.layers_size, self.tok_off, self.tok_off + self.tok_size, self.tensors_off,
             self.data_off, self.file_size - 1}
        for layer in self.layers:
            b.update(layer["parts"])
        for rec, _, off, nbytes in self.tensors:
            b.update((rec, rec + 80, rec + 104, off, off + nbytes))
        if self.chat:
            b.update((self.chat_off, self.chat_off + self.chat_size, self.chat["template_len"], self.chat["template"][0]))
            b.update(q for v in self.chat["variables"] for q in (v[0], v[2]))
        if self.tok:
            b.update((self.tok["n_pieces"], self.tok["merges"]))
            b.update(q for q, _ in self.tok["pieces"][:8])
            b.update(q for q, _ in self.tok["pieces"][-4:])
        return sorted(x for x in b if 0 <= x < self.file_size)


# regexes regex.c must refuse, and ones it must run without hanging or crashing
BAD_REGEXES = [b"(", b"[a", b"a)", b"\\", b"\\p{Nope}", b"(?<=a)", b"(a)\\1", b"[a[b]]", b"a**", b"x{3,2}", b"\xff\xfe",
               b"(?:a{1000}){1000}", b"a{100001}", b"\\x{110000}"]
HEAVY_REGEXES = [b"(a*)*b", b"(?:\\p{L}|\\w)*+!", b"(?=(?=(?=a)))", b"\\s+$", b"(?i)[^\\S\\P{L}]{0,}", b"$|^|\\b",
                 b"(?:x?){64}y"]


def put(blob, off, width, value):
    out = bytearray(blob)
    out[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(out)


def get(blob, off, width):
    return int.from_bytes(blob[off:off + width], "little")


def truncated(blob, n, consistent):
    """The first n bytes; when consistent, file_size and data_size say n so the cut gets past the size check."""
    out = bytearray(blob[:n])
    if consistent and n >= 96:
        out[8:16] = n.to_bytes(8, "little")
        data_off = get(out, 80, 8)
        out[88:96] = ((n - data_off) & (2 ** 64 - 1)).to_bytes(8, "little")
    return bytes(out)


def mutants(blob, rng, keep=1.0, always=()):
    """(label, bytes) pairs: structural mutations plus random ones; keep < 1 keeps that fraction (by rng),
    and every mutant whose label starts with one of `always`."""
    for label, data in _all_mutants(blob, rng):
        if keep >= 1.0 or rng.random() < keep or label.startswith(tuple(always)):
            yield label, data


def _all_mutants(blob, rng, scale=1.0):
    L = Layout(blob)
    size = len(blob)

    # truncations at every structural boundary (+-1) and at random points
    for b in L.boundaries():
        for n in (b - 1, b, b + 1):
            if 0 <= n < size:
                yield f"truncated at {n}", truncated(blob, n, False)
                if n >= 96:
                    yield f"cut at {n}, header sizes patched", truncated(blob, n, True)
    for n in sorted(rng.integers(0, size, int(40 * scale))):
        yield f"cut at random {n}, header sizes patched", truncated(blob, int(n), True)
    yield "padded by 64 bytes", blob + bytes(64)
    yield "padded by 64 bytes (sizes patched)", put(put(blob + bytes(64), 8, 8, size + 64), 88, 8, L.data_size + 64)

    # magic and version
    for magic in (b"ATNc", b"\0\0\0\0", b"GGUF", b"\x7fELF"):
        yield f"magic {magic!r}", magic + blob[4:]
    for v in (0, 1, 3, 0xFFFFFFFF):
        yield f"version {v}", put(blob, 4, 4, v)

    # every header field set to absurd values
    for name, off, width in HEADER_FIELDS:
        orig = get(blob, off, width)
        values = ODD_U64 if width == 8 else ODD_U32[:11]
        extra = [orig + 1, orig - 1, orig + 64, orig - 64, orig * 2, size, size + 64, size - 64]
        for v in sorted(set(values + [x for x in extra if x >= 0])):
            if v != orig:
                yield f"header {name} = {v}", put(blob, off, width, v)
    for i in range(int(20 * scale)):
        out = bytearray(blob)
        out[8:96] = rng.integers(0, 256, 88, dtype="uint8").tobytes()
        yield f"randomised header bytes #{i}", bytes(out)

    # every config field
    for i, name in enumerate(CONFIG_FIELDS):
        off = L.config_off + 32 + 4 * i
        orig = get(blob, off, 4)
        for v in sorted(set(ODD_U32 + [orig + 1, orig - 1, orig * 2])):
            if v != orig:
                yield f"config {name} = {v:#x}", put(blob, off, 4, v)
    yield "config family not NUL-terminated", blob[:L.config_off] + b"\n" * 32 + blob[L.config_off + 32:]

    # every field of the first and last layer records: the record's header, each kind's payload
    for layer in sorted({0, L.n_layers - 1}):
        for name, off in L.layers[layer]["fields"]:
            orig = get(blob, off, 4)
            for v in sorted(set(ODD_U32 + [orig + 1, orig - 1, orig * 2, orig + 8, orig - 8, 4, 5, 6, 7])):
                if v != orig:
                    yield f"layer {layer} {name} = {v:#x}", put(blob, off, 4, v)
        flags_at = dict(L.layers[layer]["fields"])
        for field in ("flags", "mixer flags", "ffn flags"):
            if field in flags_at:
                orig = get(blob, flags_at[field], 4)
                for bit in range(32):
                    yield f"layer {layer} {field} ^ {1 << bit:#x}", put(blob, flags_at[field], 4, orig ^ (1 << bit))

    # tensor records
    picks = sorted(set([0, len(L.tensors) - 1] + list(rng.integers(0, len(L.tensors), 4))))
    for k in picks:
        rec, name, off, nbytes = L.tensors[int(k)]
        t = f"tensor '{name}'"
        for v in (1, 2, 3, 4, 5, 0xFFFFFFFF):
            yield f"{t} dtype {v}", put(blob, rec + 80, 4, v)
        for v in (0, 1, 2, 3, 4, 0xFFFFFFFF):
            yield f"{t} ndim {v}", put(blob, rec + 84, 4, v)
        for d in (0, 1):
            for v in (0, 1, get(blob, rec + 88 + 4 * d, 4) + 1, 1 << 24, 0xFFFFFFFF):
                yield f"{t} shape[{d}] {v}", put(blob, rec + 88 + 4 * d, 4, v)
        end = (size + 63) // 64 * 64
        for v in (off + 1, off + 64, off - 64, end, end + 64, size - 64, 0, L.tensors_off, 1 << 63, 2 ** 64 - 64):
            yield f"{t} offset {v}", put(blob, rec + 104, 8, v)
        for v in (0, nbytes + 1, nbytes * 2, 2 ** 64 - 1):
            yield f"{t} nbytes {v}", put(blob, rec + 112, 8, v)
        yield f"{t} name without NUL", blob[:rec] + b"x" * 80 + blob[rec + 80:]
        yield f"{t} name with control characters", blob[:rec] + (b"\x1b[2J\nA" + bytes(74)) + blob[rec + 80:]
        yield f"{t} empty name", blob[:rec] + bytes(80) + blob[rec + 80:]
        other = L.tensors[(int(k) + 1) % len(L.tensors)][1].encode()
        yield f"{t} renamed to a duplicate", blob[:rec] + other.ljust(80, b"\0") + blob[rec + 80:]
        yield f"{t} renamed to an unknown name", blob[:rec] + b"layers.99.attn.wq".ljust(80, b"\0") + blob[rec + 80:]
        dims = [get(blob, rec + 88 + 4 * d, 4) for d in range(3)]
        if get(blob, rec + 84, 4) == 3:  # a stack of experts: one matrix more or less
            for v in (dims[0] + 1, dims[0] - 1, 0):
                yield f"{t} stack of {v}", put(blob, rec + 88, 4, v)

    # the tokenizer record
    if L.tok:
        T = L.tok
        for name in ("kind", "pretokenizer", "flags", "bos", "unk", "n_eos"):
            for v in (0, 1, 2, 3, 4, 17, 63, 64, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, T["n_pieces_value"],
                      T["n_pieces_value"] - 1):
                yield f"tokenizer {name} = {v:#x}", put(blob, T[name], 4, v)
        flags = get(blob, T["flags"], 4)
        for bit in range(12):
            yield f"tokenizer flags ^ {1 << bit:#x}", put(blob, T["flags"], 4, flags ^ (1 << bit))
        for v in sorted(set(int(x) for x in rng.integers(0, 2048, int(150 * scale)))):
            yield f"tokenizer flags = {v:#x} (a random combination)", put(blob, T["flags"], 4, v)
        for off in T["eos"]:
            for v in (T["n_pieces_value"], 0xFFFFFFFF, 0x80000000):
                yield f"tokenizer eos id = {v:#x}", put(blob, off, 4, v)
        for v in (0, T["n_pieces_value"] + 1, T["n_pieces_value"] - 1, 0xFFFFFFFF, 1 << 24):
            yield f"tokenizer n_pieces = {v}", put(blob, T["n_pieces"], 4, v)
        n_merges = T["n_merges_value"]
        for v in (0, n_merges + 1, n_merges - 1, 0xFFFFFFFF, 0x20000000):
            yield f"tokenizer n_merges = {v}", put(blob, T["n_merges"], 4, v)
        piece_picks = sorted(set([0, 1, 255, 256, len(T["pieces"]) - 1] + list(rng.integers(0, len(T["pieces"]), 6))))
        for k in piece_picks:
            q, n = T["pieces"][int(k)]
            for v in (0, n + 1, n - 1, 65536, 65537, 0xFFFFFFFF, T["merges"] - q):
                if v >= 0:
                    yield f"tokenizer piece {k} length {v}", put(blob, q, 4, v)
            for v in (1, 2, 3, 4, 5, 0xFFFFFFFF):
                yield f"tokenizer piece {k} type {v}", put(blob, q + 4 + n + 4, 4, v)
            yield f"tokenizer piece {k} score NaN", put(blob, q + 4 + n, 4, F32(float("nan")))
        for k in piece_picks:  # a piece emptied, the record shortened (a gap is left before the directory)
            q, n = T["pieces"][int(k)]
            end = L.tok_off + L.tok_size
            out = bytearray(blob)
            out[q:q + 4] = bytes(4)
            out[q + 4:end] = blob[q + 4 + n:end] + bytes(n)
            yield f"tokenizer piece {k} emptied", put(bytes(out), 56, 8, L.tok_size - n)
        # a byte-fallback piece "<0xNN>" with bad digits (sscanf's %x would read "-1" as 0xFFFFFFFF)
        six = [q for q, n in T["pieces"] if n == 6]
        for text in (b"<0x-1>", b"<0x+f>", b"<0x 1>", b"<0xzz>", b"<0xFF>", b"<0x00>"):
            if six:
                q = six[0]
                yield f"tokenizer byte piece {text!r}", put(blob[:q + 4] + text + blob[q + 10:], q + 14, 4, 2)
        mk = [T["merges"] + 8 * int(i) for i in rng.integers(0, max(1, n_merges), 6)] if n_merges else []
        for off in mk:
            for v in (T["n_pieces_value"], 0xFFFFFFFF, 0):
                yield f"tokenizer merge id {v:#x} at {off}", put(blob, off, 4, v)
        # the Split steps (pretokenizer 5): counts, behaviors, flags, lengths, and regexes that do not compile or
        # that compile to something enormous or pathological (each swapped in, the record shortened or lengthened)
        if T["steps"]:
            for v in (0, 17, 0xFFFFFFFF, len(T["steps"]) + 1):
                yield f"tokenizer n_steps = {v}", put(blob, T["n_steps"], 4, v)
        for k, (q, n) in enumerate(T["steps"]):
            for v in (5, 0xFFFFFFFF):
                yield f"tokenizer step {k} behavior {v:#x}", put(blob, q, 4, v)
            for v in (2, 0xFFFFFFFF):
                yield f"tokenizer step {k} flags {v:#x}", put(blob, q + 4, 4, v)
            for v in (0, n + 1, 65537, 0xFFFFFFFF):
                yield f"tokenizer step {k} regex length {v}", put(blob, q + 8, 4, v)
            for regex in BAD_REGEXES + HEAVY_REGEXES:
                if len(regex) <= n:  # padded to the step's length with an alternative that changes nothing at fault
                    padded = regex + (b"|" + b"x" * (n - len(regex) - 1) if len(regex) < n else b"")
                    yield f"tokenizer step {k} regex {regex[:24]!r}", blob[:q + 12] + padded + blob[q + 12 + n:]
        everything_special = bytearray(blob)
        for q, n in T["pieces"]:
            if n:
                everything_special[q + 4 + n + 4:q + 4 + n + 8] = (1).to_bytes(4, "little")
        yield "tokenizer: every piece special", bytes(everything_special)

    # the chat section
    if L.chat:
        C = L.chat
        for v in (0, 1, 15, 16, 17, 0xFFFFFFFF, len(C["variables"]) + 1):
            yield f"chat n_variables = {v}", put(blob, C["n_variables"], 4, v)
        for k, (q, name_len, r, value_len) in enumerate(C["variables"]):
            for v in (0, 65, name_len + 1, 0xFFFFFFFF):
                yield f"chat variable {k} name length {v}", put(blob, q, 4, v)
            for v in (value_len + 1, 65537, 0xFFFFFFFF):
                yield f"chat variable {k} value length {v}", put(blob, r, 4, v)
            yield f"chat variable {k} name not an identifier", blob[:q + 4] + b"9" + blob[q + 5:]
            if value_len:
                yield f"chat variable {k} value not UTF-8", blob[:r + 4] + b"\xff" + blob[r + 5:]
        tl, (tq, tn) = C["template_len"], C["template"]
        for v in (0, 1, tn - 1, tn + 1, (1 << 20) + 1, 0xFFFFFFFF):
            yield f"chat template length {v}", put(blob, tl, 4, v)
        for label, text in HOSTILE_TEMPLATES:
            if len(text) <= tn:  # the same length: the section keeps its size
                yield f"chat template: {label}", blob[:tq] + text.ljust(tn, b" ") + blob[tq + tn:]
        yield "chat template with a NUL byte", blob[:tq + 3] + b"\0" + blob[tq + 4:]
        yield "chat template not UTF-8", blob[:tq + 3] + b"\xc3\x28" + blob[tq + 5:]
        yield "chat section shares the tensor directory's bytes", put(blob, 96, 8, L.tensors_off)

    # random byte flips, section by section
    sections = [("header", 0, 128), ("config", L.config_off, L.config_off + 128),
                ("layers", L.layers_off, L.layers_off + L.layers_size),
                ("tensor directory", L.tensors_off, L.tensors_off + 128 * L.n_tensors),
                ("data", L.data_off, size)]
    if L.tok:
        sections.append(("tokenizer", L.tok_off, L.tok_off + L.tok_size))
    if L.chat:
        sections.append(("chat", L.chat_off, L.chat_off + L.chat_size))
    counts = {"header": 40, "config": 40, "layers": 40, "tensor directory": 60, "data": 10, "tokenizer": 80, "chat": 120}
    for name, lo, hi in sections:
        for i in range(int(counts[name] * scale)):
            out = bytearray(blob)
            for _ in range(int(rng.integers(1, 9))):
                p = int(rng.integers(lo, hi))
                if rng.random() < 0.5:
                    out[p] ^= 1 << int(rng.integers(0, 8))
                else:
                    out[p] = int(rng.integers(0, 256))
            yield f"{name}: random bytes #{i}", bytes(out)


# What the byte mutations above cannot reach: files whose every field is in range but whose meaning is
# hostile. semantic_mutants(blob) yields (label, bytes, words): words None when the file must run (status
# 0), else the run must end in one error line holding one of the words.
NAN_BITS = {0: (0x7FC00000, 4), 1: (0x7E00, 2), 2: (0x7FC0, 2)}  # f32, f16, bf16


def semantic_mutants(blob):
    L = Layout(blob)
    size = len(blob)
    by_name = {name: (rec, off, nbytes) for rec, name, off, nbytes in L.tensors}
    ordered = sorted(L.tensors, key=lambda x: x[2])
    # a tensor pointed at the bytes of another: one small file standing for more weights than it holds
    for (rec_a, a, off_a, _), (_, b, off_b, nbytes_b) in ((ordered[0], ordered[1]), (ordered[-1], ordered[-2]),
                                                          (ordered[len(ordered) // 2], ordered[0])):
        yield f"semantic: tensor '{a}' aliased onto '{b}'", put(blob, rec_a + 104, 8, off_b), \
            ["share bytes", "extends past end of file", "belong to no"]
    # bytes no tensor claims: a sparse tail, a gap inside the data section
    for extra in (64, 4096, 1 << 20):
        grown = put(put(blob + bytes(extra), 8, 8, size + extra), 88, 8, L.data_size + extra)
        yield f"semantic: a tail of {extra} bytes no tensor claims", grown, ["belong to no"]
    rec_last, last, off_last, nbytes_last = ordered[-1]
    moved = bytearray(blob + bytes(64))
    moved[off_last + 64:off_last + 64 + nbytes_last] = blob[off_last:off_last + nbytes_last]
    moved = put(put(put(bytes(moved), rec_last + 104, 8, off_last + 64), 8, 8, size + 64), 88, 8, L.data_size + 64)
    yield f"semantic: a gap of 64 bytes before '{last}'", moved, ["belong to no"]
    # the tokenizer section laid over the weights (its own bytes left to no one)
    if L.tok_size:
        yield "semantic: the tokenizer section over the tensor data", put(blob, 48, 8, ordered[0][2]), \
            ["overlaps", "outside the file", "belong to no"]
    # rope tables that are not inverse frequencies
    for name in sorted(n for n in by_name if n.startswith("rope_inv_freq.")):
        _, off, _ = by_name[name]
        for label, bits in (("NaN", 0x7FC00000), ("+inf", 0x7F800000), ("0", 0), ("-1", 0xBF800000)):
            yield f"semantic: {label} in {name}", put(blob, off + 4, 4, bits), ["must be finite and positive"]
    # a NaN in a weight every token goes through (the first layer's query projection, of whichever mixer):
    # the run stops at the first logits, naming the tensor
    wq = next((n for n in ("layers.0.attn.wq", "layers.0.mla.wq", "layers.0.mla.wq_a") if n in by_name),
              next((n for n in by_name if n.startswith("layers.0.") and get(blob, by_name[n][0] + 84, 4) == 2), None))
    rec, off, _ = by_name[wq]
    dtype = get(blob, rec + 80, 4)
    if dtype in NAN_BITS:
        bits, width = NAN_BITS[dtype]
        yield f"semantic: NaN in {wq}", put(blob, off, width, bits), ["holds a NaN or an infinity"]
    else:  # q8_0 / q4_0: the first group's f16 scale, after the int8 values / the 4-bit pairs
        rows, cols = get(blob, rec + 88, 4), get(blob, rec + 92, 4)
        values = rows * cols // (2 if dtype == 4 else 1)
        yield f"semantic: NaN scale in {wq}", put(blob, off + values, 2, 0x7E00), ["holds a NaN or an infinity"]
    # a window that covers the context is full attention: such a file runs (a chunked layer keeps its chunks)
    context = get(blob, L.config_off + 32 + 4 * CONFIG_FIELDS.index("context_length"), 4)
    for layer in sorted({0, L.n_layers - 1}):
        fields = dict(L.layers[layer]["fields"])
        if "mixer window" not in fields or get(blob, fields["mixer chunk"], 4):
            continue
        for w in (context, context + 1, (1 << 24) + 1):
            yield f"semantic: layer {layer} window {w} (context {context})", put(blob, fields["mixer window"], 4, w), \
                None if w <= 1 << 24 else ["window"]
