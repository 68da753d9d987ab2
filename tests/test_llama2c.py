"""llama2.c checkpoints: the llama_gqa fixture in llama2.c's version 1 (float32, 256-byte header with the "ak42"
magic) and version 2 (q8_0 in groups of 64, float32 scales after all the int8 values) layouts, written here from
tests/data/llama2c/llama_gqa_legacy.bin as llama2.c's export.py lays them out, export to the same model as
the legacy file (version 2: its dequantized weights exactly; by default q8_0 within its error); and ./run,
given a file that is not an attn.c model, says in one line what it is and how to convert it."""
import os
import struct

import numpy as np

from harness import relative_error
from test_fixtures import compare_fixture

MAGIC = struct.pack("<I", 0x616B3432)
Q8_TOLERANCE = 5e-2


def legacy_arrays(path):
    """The legacy file's header and arrays in its order (llama2.c's export.py, legacy_export)."""
    data = open(path, "rb").read()
    dim, hidden, layers, heads, kv, vocab, ctx = struct.unpack_from("<7i", data)
    kv_dim = kv * dim // heads
    names = [("tok", abs(vocab) * dim), ("rms_att", layers * dim), ("wq", layers * dim * dim), ("wk", layers * kv_dim * dim),
             ("wv", layers * kv_dim * dim), ("wo", layers * dim * dim), ("rms_ffn", layers * dim),
             ("w1", layers * hidden * dim), ("w2", layers * dim * hidden), ("w3", layers * hidden * dim), ("rms_final", dim),
             ("freqs", ctx * dim // heads)] + ([("wcls", abs(vocab) * dim)] if vocab < 0 else [])
    out, off = {}, 28
    for name, n in names:
        out[name] = np.frombuffer(data, "<f4", n, off)
        off += 4 * n
    return (dim, hidden, layers, heads, kv, abs(vocab), ctx), vocab > 0, out


def header(version, params, shared, group=None):
    h = MAGIC + struct.pack("<i7iB", version, *params, int(shared)) + (struct.pack("<i", group) if group else b"")
    return h + bytes(256 - len(h))


def quantize(w, group):
    """llama2.c's quantize_q80: per group scale = max|w| / 127, q = round(w / scale)."""
    g = w.reshape(-1, group).astype(np.float32)
    scale = (np.abs(g).max(axis=1) / np.float32(127.0)).astype(np.float32)
    q = np.round(g / scale[:, None]).astype(np.int8)
    return q, scale


def run(t):
    params, shared, a = legacy_arrays(os.path.join(t.data, "llama2c", "llama_gqa_legacy.bin"))
    fixture = os.path.join(t.data, "fixtures", "llama_gqa")
    legacy = t.export(os.path.join(t.data, "llama2c", "llama_gqa_legacy.bin"), "llama_gqa_legacy.bin")
    matrices = ["tok", "wq", "wk", "wv", "wo", "w1", "w2", "w3"] + ([] if shared else ["wcls"])

    v1 = t.tmp("llama_gqa_v1.bin")
    with open(v1, "wb") as f:
        f.write(header(1, params, shared))
        for name in ["rms_att", "rms_ffn", "rms_final"] + matrices:
            f.write(a[name].tobytes())
    model = t.export(v1, "llama_gqa_v1_attn.bin")
    t.check("llama2.c version 1: exports the same model file as the legacy layout",
            open(model, "rb").read() == open(legacy, "rb").read())
    compare_fixture(t, "llama2.c version 1 llama_gqa", model, fixture)

    group = 64
    q = {name: quantize(a[name], group) for name in matrices}
    v2 = t.tmp("llama_gqa_v2.bin")
    with open(v2, "wb") as f:
        f.write(header(2, params, shared, group))
        for name in ("rms_att", "rms_ffn", "rms_final"):
            f.write(a[name].tobytes())
        for name in matrices:
            f.write(q[name][0].tobytes())
        for name in matrices:
            f.write(q[name][1].tobytes())
    dequantized = t.tmp("llama_gqa_v2_dequantized_legacy.bin")  # the same weights, as a legacy file
    with open(dequantized, "wb") as f:
        f.write(struct.pack("<7i", *params[:5], params[5] if shared else -params[5], params[6]))
        for name in ["tok", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final", "freqs"] + \
                ([] if shared else ["wcls"]):
            w = a[name] if name not in q else (q[name][0].reshape(-1, group) * q[name][1][:, None]).reshape(-1)
            f.write(w.astype("<f4").tobytes())
    exact = t.export(v2, "llama_gqa_v2_f32.bin", "--dtype", "f32")
    t.check("llama2.c version 2: exported to f32, its weights are exactly the dequantized q8_0 groups",
            open(exact, "rb").read() == open(t.export(dequantized, "llama_gqa_v2_ref.bin"), "rb").read())
    ids = list(range(1, 60))
    default = t.export(v2, "llama_gqa_v2_attn.bin")
    err = relative_error(t.logits(default, ids), t.logits(legacy, ids))
    t.check(f"llama2.c version 2: without --dtype it stays 8-bit (q8_0), logits within {err:.1e} of the f32 model",
            err <= Q8_TOLERANCE and os.path.getsize(default) < os.path.getsize(legacy) / 2)
    conversion_hints(t, v1)


def conversion_hints(t, v1):
    cases = [(os.path.join(t.data, "llama2c", "llama_gqa_legacy.bin"), "llama2.c checkpoint (version 0)"),
             (v1, "llama2.c checkpoint (version 1 or 2)"),
             (os.path.join(t.data, "fixtures", "gpt2", "model.safetensors"), "safetensors file")]
    gguf = t.tmp("llama_gqa.f32.gguf")
    with open(gguf, "wb") as f:  # enough of a GGUF header for ./run to recognise it
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + bytes(1000))
    cases.append((gguf, "GGUF file"))
    for path, what in cases:
        r = t.run([path, "-p", "hi"])
        err = r.stderr.decode(errors="replace").strip().splitlines()
        t.check(f"./run on a {what} says what it is and how to convert it, in one line",
                r.returncode == 1 and len(err) == 1 and what in err[0] and "export.py" in err[0], err)
