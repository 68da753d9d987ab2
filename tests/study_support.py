"""Helpers for the attention-study tests (tests/test_study_*.py): the masks written as the article defines
them, a PNG reader, a reader for tensors in an attn.c file, perplexity from reference logits, and a small
numpy Llama forward pass that takes any mask."""
import json
import os
import re
import struct
import sys
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export  # noqa: E402  (export.py: SafeTensors, the safetensors reader)
from harness import fixture_dir  # noqa: E402


# These tests check numbers, not speed: their tiny models run on one thread, which also keeps them quick
# on a machine whose cores are shared (OpenMP threads that wait for a busy core make every step slow).
ONE_THREAD = ("--threads", "1")


def visible(kind, span, sinks, i, j):
    """1 if the query at position i may see key j - each mask's definition, independent of attention.c."""
    if j > i:
        return False
    if kind == "sliding":
        return i - j < span or j < sinks
    if kind == "strided":
        return i - j < span or (i - j) % span == 0
    if kind == "fixed":
        return j // span == i // span or j % span == span - 1
    return True


def mask_matrix(kind, span, sinks, n):
    return np.array([[visible(kind, span, sinks, i, j) for j in range(n)] for i in range(n)])


def png_chunks(path):
    """[(type, data)] of a PNG file after checking its signature, every chunk's CRC-32 and the chunk order."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "bad PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body), f"bad CRC in chunk {kind}"
        chunks.append((kind, body))
        pos += 12 + n
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND", "chunk order"
    return chunks


def png_panels(path):
    """{(layer, head): (x, y)} and the cell size, from the layout study.c writes into the PNG's tEXt chunk."""
    text = next(b for k, b in png_chunks(path) if k == b"tEXt").split(b"\0", 1)[1].decode("latin-1")
    cell = int(re.search(r"cells of (\d+) px", text).group(1))
    panels = {(int(m[0]), int(m[1])): (int(m[2]), int(m[3]))
              for m in re.findall(r"panel layer (\d+) head (\d+) x (\d+) y (\d+)", text)}
    return panels, cell


def read_png(path):
    """(width, height, rows as a uint8 array [height][width] of palette indices, palette [n][3]) after checking
    the signature, every chunk's CRC-32, IHDR, and the zlib stream (Adler-32 checked by zlib) of one IDAT."""
    chunks = png_chunks(path)
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 3, 0, 0, 0), "not an 8-bit palette PNG"
    palette = np.frombuffer(b"".join(b for k, b in chunks if k == b"PLTE"), dtype=np.uint8).reshape(-1, 3)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == h * (w + 1), f"{len(raw)} bytes of image data for {w}x{h}"
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all(), "filter types other than 0"
    return w, h, rows[:, 1:], palette


def read_model_tensor(path, name):
    """A tensor of an attn.c model file (docs/FORMAT.md), as float32."""
    data = open(path, "rb").read()
    for _, n, dtype, shape, offset, nbytes in export.read_tensor_directory(data):
        if n != name:
            continue
        raw = data[offset:offset + nbytes]
        if dtype == export.DTYPES["f32"]:
            return np.frombuffer(raw, dtype="<f4").reshape(shape)
        if dtype == export.DTYPES["f16"]:
            return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(shape)
        if dtype == export.DTYPES["bf16"]:
            return export.bf16_to_f32(np.frombuffer(raw, dtype="<u2")).reshape(shape)
        raise ValueError(f"{name}: dtype {dtype} is not read here")
    raise KeyError(name)


def reference_ppl(logits, ids):
    """exp(mean NLL of ids[t+1] under logits[t]), in float64."""
    l = logits.astype(np.float64)[:-1]
    m = l.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(l - m).sum(axis=1)) + m[:, 0]
    return float(np.exp(np.mean(log_z - l[np.arange(len(ids) - 1), ids[1:]])))


def parse_ppl(stdout):
    m = re.search(rb"perplexity: ([0-9.]+) over (\d+) tokens", stdout)
    return (float(m.group(1)), int(m.group(2))) if m else (None, None)


def kv_bytes(stderr):
    m = re.search(rb"kv (\d+) bytes", stderr)
    return int(m.group(1)) if m else None


def llama_logits(src, ids, masks):
    """Logits of a Hugging Face Llama checkpoint (no rope scaling) over ids, written out in numpy, with
    masks[layer] a boolean [n][n] matrix of the keys each query may see."""
    cfg = json.load(open(os.path.join(src, "config.json")))
    st = export.SafeTensors(src)
    g = lambda name: st.get(name).astype(np.float64)
    dim, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or dim // H
    eps, theta = cfg["rms_norm_eps"], (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 1e4))
    n = len(ids)
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rope(x):  # x [heads][n][hd], rotate-half layout
        half = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + half * sin

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    x = g("model.embed_tokens.weight")[ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, g(p + "input_layernorm.weight"))
        q = (h @ g(p + "self_attn.q_proj.weight").T).reshape(n, H, hd).transpose(1, 0, 2)
        k = (h @ g(p + "self_attn.k_proj.weight").T).reshape(n, KV, hd).transpose(1, 0, 2)
        v = (h @ g(p + "self_attn.v_proj.weight").T).reshape(n, KV, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, H // KV, axis=0), np.repeat(v, H // KV, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        s = np.where(masks[layer][None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = (w @ v).transpose(1, 0, 2).reshape(n, H * hd)
        x = x + o @ g(p + "self_attn.o_proj.weight").T
        h = rms(x, g(p + "post_attention_layernorm.weight"))
        gate, up = h @ g(p + "mlp.gate_proj.weight").T, h @ g(p + "mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g(p + "mlp.down_proj.weight").T
    head = "lm_head.weight" if "lm_head.weight" in st else "model.embed_tokens.weight"
    return rms(x, g("model.norm.weight")) @ g(head).T


def fixture_with_config(t, fixture, name, edit):
    """A checkpoint directory with a fixture's weights and its config.json passed through edit(cfg)."""
    cfg = json.load(open(os.path.join(t.data, "fixtures", fixture, "config.json")))
    edit(cfg)
    return fixture_dir(t, fixture, name, cfg)


def kjv_word_salad(t, kjv, n_tokens, seed=5):
    """(path of a text file, its ids as ./run encodes it) of n_tokens or a few more: words of kjv-5m's held-out
    text and reference continuations in a seeded random order, a line break every 12 to 30 of them."""
    ref = json.load(open(os.path.join(t.data, "kjv-5m", "ref.json")))
    held_out = t.run([kjv, "--decode", ",".join(map(str, ref["input_ids"][1:]))]).stdout.decode()
    words = (held_out + " " + " ".join(g["greedy_text"] for g in ref["greedy"])).split()
    rng = np.random.default_rng(seed)

    def encode(text):
        return [int(x) for x in t.run([kjv, "--encode", "-"], input=text.encode()).stdout.replace(b",", b" ").split()]

    sample = "\n".join(" ".join(rng.choice(words, size=int(rng.integers(12, 31)))) for _ in range(5)) + "\n"
    per_line = len(encode(sample)) / 5
    lines = sample.splitlines() + [" ".join(rng.choice(words, size=int(rng.integers(12, 31))))
                                   for _ in range(max(0, int(n_tokens / per_line * 1.02) - 5))]
    while True:
        text = "\n".join(lines) + "\n"
        ids = encode(text)
        if len(ids) >= n_tokens:
            break
        lines += [" ".join(rng.choice(words, size=20)) for _ in range(int((n_tokens - len(ids)) / per_line) + 1)]
    path = t.tmp(f"kjv-salad-{n_tokens}.txt")
    with open(path, "w") as f:
        f.write(text)
    return path, ids
