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
                 ("layers_offset", 32, 8), ("n_layers", 40, 4), ("layer_record_size", 44, 4),
                 ("tokenizer_offset", 48, 8), ("tokenizer_size", 56, 8), ("tensors_offset", 64, 8),
                 ("n_tensors", 72, 4), ("tensor_record_size", 76, 4), ("data_offset", 80, 8), ("data_size", 88, 8),
                 ("chat_offset", 96, 8), ("chat_size", 104, 8)]
CONFIG_FIELDS = ["dim", "hidden_dim", "vocab_size", "context_length", "norm_kind", "norm_eps", "mlp_kind",
                 "activation", "position_kind", "embed_scale", "final_softcap", "flags", "n_rope_tables"]
LAYER_FIELDS = ["n_heads", "n_kv_heads", "head_dim", "window", "rope_theta", "rope_dim", "rope_table",
                "attn_scale", "attn_softcap", "flags"]
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
        (magic, self.version, self.file_size, self.config_off, _, self.layers_off, self.n_layers, _, self.tok_off,
         self.tok_size, self.tensors_off, self.n_tensors, _, self.data_off, self.data_size) = HEADER.unpack_from(blob)
        assert magic == b"ATNC" and self.file_size == len(blob)
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
        assert q + 8 * n_merges == self.tok_off + self.tok_size
        return fields

    def boundaries(self):
        """Every offset where one structure ends and the next begins."""
        b = {0, 4, 8, 16, 96, 128, self.config_off + 32, self.config_off + 128, self.layers_off,
             self.layers_off + 64 * self.n_layers, self.tok_off, self.tok_off + self.tok_size, self.tensors_off,
             self.data_off, self.file_size - 1}
        b.update(self.layers_off + 64 * i for i in range(self.n_layers))
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
    for v in (0, 2, 0xFFFFFFFF):
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

    # every field of the first and last layer records
    for layer in sorted({0, L.n_layers - 1}):
        for i, name in enumerate(LAYER_FIELDS):
            off = L.layers_off + 64 * layer + 4 * i
            orig = get(blob, off, 4)
            for v in sorted(set(ODD_U32 + [orig + 1, orig - 1, orig * 2])):
                if v != orig:
                    yield f"layer {layer} {name} = {v:#x}", put(blob, off, 4, v)

    # tensor records
    picks = sorted(set([0, len(L.tensors) - 1] + list(rng.integers(0, len(L.tensors), 4))))
    for k in picks:
        rec, name, off, nbytes = L.tensors[int(k)]
        t = f"tensor '{name}'"
        for v in (1, 2, 3, 0xFFFFFFFF):
            yield f"{t} dtype {v}", put(blob, rec + 80, 4, v)
        for v in (0, 2 if get(blob, rec + 84, 4) == 1 else 1, 3, 0xFFFFFFFF):
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
        yield f"{t} renamed to an unknown name", blob[:rec] + b"layers.99.wq".ljust(80, b"\0") + blob[rec + 80:]

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
        # every piece special: each prompt byte is checked against every piece
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
                ("layers", L.layers_off, L.layers_off + 64 * L.n_layers),
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
