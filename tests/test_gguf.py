"""GGUF model files: every fixture family written as llama.cpp's convert_hf_to_gguf.py would write it (with
llama.cpp's gguf-py, read from $ATTN_SHARED), exported by export.py and compared with the safetensors export:
F32 GGUFs give the same logits (f32 rounding: the Llama 3.1 rope table is computed another way), Q8_0 GGUFs
stay within q8_0's error and keep their blocks, F16 / BF16 GGUFs keep their dtype; Q4_0 and the k-quants
dequantize exactly as gguf-py does (block by block, and through a whole model of Q4_K / Q6_K matrices as a
Q4_K_M file mixes them); damaged GGUFs end in one error line."""
import json
import os

import numpy as np

from gguf_support import add_tensor, finish, import_gguf, write_fixture_gguf
from harness import relative_error, ROOT

import sys
sys.path.insert(0, ROOT)
import gguf_reader  # noqa: E402

FIXTURES = ["llama_gqa", "llama_mqa", "llama_mha_rope31", "mistral_swa", "qwen2_mixed", "qwen3_mixed", "gemma2", "gemma3",
            "gpt2", "phi3", "starcoder_mqa"]
F32_TOLERANCE = 1e-5   # max |delta| / max(1, max |ref|) between the GGUF and the safetensors exports, both f32
Q8_TOLERANCE = 5e-2    # q8_0's tolerance (tests/test_speed.py holds kjv-5m to it): against the reference logits, and
                       # between the GGUF's Q8_0 (gguf-py's rounding) and export.py's own q8_0 of the same weights
Q4_0_FIXTURES = ["llama_gqa", "qwen3_mixed", "gemma2", "gpt2"]


def run(t):
    gguf = import_gguf(t, "GGUF fixtures (llama.cpp's gguf-py)")
    if gguf is None:
        return
    dequantizers(t, gguf)
    for name in FIXTURES:
        fixture(t, gguf, name)
    for name in Q4_0_FIXTURES:
        exact_dequantization(t, gguf, name, gguf.GGMLQuantizationType.Q4_0)
    for name in ("llama_gqa", "gemma3"):
        q8_0_kept(t, gguf, name)
    for name, qtype in (("qwen3_mixed", gguf.GGMLQuantizationType.F16), ("phi3", gguf.GGMLQuantizationType.BF16)):
        half_kept(t, gguf, name, qtype)
    kquant_model(t, gguf)
    damaged(t)


def logits_of(t, model, name):
    ref = json.load(open(os.path.join(t.data, "fixtures", name, "ref.json")))
    return t.logits(model, ref["input_ids"])


def fixture(t, gguf, name):
    src = os.path.join(t.data, "fixtures", name)
    want = np.load(os.path.join(src, "ref_logits.npy"))
    st_f32 = t.export(src, f"{name}.bin")
    path = t.tmp(f"{name}.f32.gguf")
    write_fixture_gguf(gguf, src, path)
    model = t.export(path, f"{name}_gguf_f32.bin")
    err = relative_error(logits_of(t, model, name), logits_of(t, st_f32, name))
    same = open(model, "rb").read() == open(st_f32, "rb").read()
    t.check(f"{name}: F32 GGUF exports the same model as the safetensors (max rel err {err:.1e}, "
            f"{'identical file' if same else 'files differ'})", err <= F32_TOLERANCE)

    path = t.tmp(f"{name}.q8_0.gguf")
    write_fixture_gguf(gguf, src, path, gguf.GGMLQuantizationType.Q8_0)
    model = t.export(path, f"{name}_gguf_q8_0.bin")  # without --dtype: Q8_0 stays q8_0
    got = logits_of(t, model, name)
    err = relative_error(got, logits_of(t, t.export(src, f"{name}_q8_0.bin", "--dtype", "q8_0"), name))
    err_ref = relative_error(got, want)
    t.check(f"{name}: Q8_0 GGUF within q8_0 error of the safetensors q8_0 export ({err:.1e}) and of the reference "
            f"({err_ref:.1e})", err <= Q8_TOLERANCE and err_ref <= Q8_TOLERANCE)


def exact_dequantization(t, gguf, name, qtype):
    """A quantized GGUF exported to f32 is exactly the GGUF of gguf-py's dequantized values."""
    src = os.path.join(t.data, "fixtures", name)
    qname = qtype.name.lower()
    write_fixture_gguf(gguf, src, t.tmp(f"{name}.{qname}.gguf"), qtype)
    write_fixture_gguf(gguf, src, t.tmp(f"{name}.{qname}_ref.gguf"), qtype, dequantized=True)
    a = t.export(t.tmp(f"{name}.{qname}.gguf"), f"{name}_gguf_{qname}.bin", "--dtype", "f32")
    b = t.export(t.tmp(f"{name}.{qname}_ref.gguf"), f"{name}_gguf_{qname}_ref.bin", "--dtype", "f32")
    t.check(f"{name}: {qtype.name} GGUF dequantizes to exactly gguf-py's values (identical f32 export)",
            open(a, "rb").read() == open(b, "rb").read())


def q8_0_kept(t, gguf, name):
    """Q8_0 blocks (32 int8 values, one f16 scale) are attn.c's q8_0 groups: exported as q8_0 they come through
    unchanged, so the file equals a q8_0 export of their dequantized values."""
    src = os.path.join(t.data, "fixtures", name)
    Q8 = gguf.GGMLQuantizationType.Q8_0
    write_fixture_gguf(gguf, src, t.tmp(f"{name}.q8_0_ref.gguf"), Q8, dequantized=True)
    a = t.export(t.tmp(f"{name}.q8_0.gguf"), f"{name}_gguf_q8_0.bin")
    b = t.export(t.tmp(f"{name}.q8_0_ref.gguf"), f"{name}_gguf_q8_0_ref.bin", "--dtype", "q8_0")
    t.check(f"{name}: Q8_0 GGUF blocks are kept as they are (identical to re-quantizing their exact values)",
            open(a, "rb").read() == open(b, "rb").read())


def half_kept(t, gguf, name, qtype):
    """An F16 or BF16 GGUF keeps its dtype: the same file as the safetensors exported with --dtype f16 / bf16."""
    src = os.path.join(t.data, "fixtures", name)
    kind = qtype.name.lower()
    write_fixture_gguf(gguf, src, t.tmp(f"{name}.{kind}.gguf"), qtype)
    a = t.export(t.tmp(f"{name}.{kind}.gguf"), f"{name}_gguf_{kind}.bin")
    b = t.export(src, f"{name}_{kind}.bin", "--dtype", kind)
    t.check(f"{name}: {qtype.name} GGUF keeps its dtype (the same file as the safetensors exported to {kind})",
            open(a, "rb").read() == open(b, "rb").read())


def random_blocks(gguf, qtype, n_blocks, rng):
    """Valid blocks of a type gguf-py cannot quantize to: random bits, the f16 scales set to small normal values."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    # where each type keeps its f16 scale(s): (byte offset, ...)
    scale_at = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[qtype.name]
    for off in scale_at:
        raw[:, off:off + 2] = (rng.uniform(0.001, 0.02, n_blocks).astype("<f2").view(np.uint8).reshape(n_blocks, 2))
    return raw


def dequantizers(t, gguf):
    rng = np.random.default_rng(3)
    for name in gguf_reader.DEQUANTIZERS:
        qtype = gguf.GGMLQuantizationType[name]
        raw = random_blocks(gguf, qtype, 64, rng)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        got = gguf_reader.dequantize(raw.reshape(-1), name, 64 * block)
        want = gguf.quants.dequantize(raw, qtype).reshape(-1)
        t.check(f"dequantize {name}: 64 random blocks equal gguf-py's dequantization bit for bit",
                got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32)))


def kquant_model(t, gguf):
    """A 2-layer Llama of width 256 (k-quant blocks are 256 wide) stored as a Q4_K_M file mixes it: Q4_K matrices,
    Q6_K for the classifier and the value projections, F32 vectors. Exported to f32 it must equal the same GGUF
    holding gguf-py's dequantization of those blocks; exported without --dtype it becomes q8_0."""
    rng = np.random.default_rng(5)
    dim, hidden, heads, kv, vocab, layers = 256, 512, 4, 2, 256, 2
    hd = dim // heads
    shapes = {"token_embd.weight": (vocab, dim), "output.weight": (vocab, dim), "output_norm.weight": (dim,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.attn_q.weight": (dim, dim),
                       f"blk.{i}.attn_k.weight": (kv * hd, dim), f"blk.{i}.attn_v.weight": (kv * hd, dim),
                       f"blk.{i}.attn_output.weight": (dim, dim), f"blk.{i}.ffn_norm.weight": (dim,),
                       f"blk.{i}.ffn_gate.weight": (hidden, dim), f"blk.{i}.ffn_up.weight": (hidden, dim),
                       f"blk.{i}.ffn_down.weight": (dim, hidden)})
    Q = gguf.GGMLQuantizationType
    files = {kind: gguf.GGUFWriter(t.tmp(f"kquant_{kind}.gguf"), "llama") for kind in ("q", "ref")}
    for w in files.values():
        for key, v in (("context_length", 256), ("embedding_length", dim), ("block_count", layers),
                       ("feed_forward_length", hidden), ("attention.head_count", heads), ("attention.head_count_kv", kv)):
            w.add_uint32(f"llama.{key}", v)
        w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        w.add_float32("llama.rope.freq_base", 10000.0)
    for name, shape in shapes.items():
        if len(shape) == 1:
            arr = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            add_tensor(files["q"], gguf, name, arr, None)
            add_tensor(files["ref"], gguf, name, arr, None)
            continue
        qtype = Q.Q6_K if name.startswith("output") or "attn_v" in name else Q.Q4_K
        raw = random_blocks(gguf, qtype, shape[0] * shape[1] // 256, rng).reshape(shape[0], -1)
        files["q"].add_tensor(name, raw, raw_dtype=qtype)
        files["ref"].add_tensor(name, gguf.quants.dequantize(raw, qtype))
    for w in files.values():
        finish(w)
    a = t.export(t.tmp("kquant_q.gguf"), "kquant_q_f32.bin", "--dtype", "f32")
    b = t.export(t.tmp("kquant_ref.gguf"), "kquant_ref_f32.bin", "--dtype", "f32")
    t.check("Q4_K + Q6_K GGUF (as Q4_K_M mixes them) exports to exactly gguf-py's dequantized values",
            open(a, "rb").read() == open(b, "rb").read())
    ids = list(range(1, 40))
    default = t.export(t.tmp("kquant_q.gguf"), "kquant_q_default.bin")
    err = relative_error(t.logits(default, ids), t.logits(a, ids))
    from export import read_tensor_directory, DTYPES
    dtypes = {dt for _, n, dt, shape, _, _ in read_tensor_directory(open(default, "rb").read()) if len(shape) == 2}
    t.check(f"Q4_K / Q6_K GGUF without --dtype is stored as q8_0 (logits within {err:.1e} of f32)",
            dtypes == {DTYPES["q8_0"]} and err <= Q8_TOLERANCE)


def damaged(t):
    """Cut and corrupted copies of a GGUF end the export with one error line and no output file."""
    import struct
    import subprocess
    blob = open(t.tmp("llama_gqa.q8_0.gguf"), "rb").read()
    copies = [("truncated", blob[:n]) for n in (3, 10, 23, 60, 200, len(blob) // 2, len(blob) - 1)]
    copies += [("version 9", blob[:4] + struct.pack("<I", 9) + blob[8:]),
               ("tensor count 2^40", blob[:8] + struct.pack("<Q", 1 << 40) + blob[16:]),
               ("metadata count 2^40", blob[:16] + struct.pack("<Q", 1 << 40) + blob[24:])]
    rng = np.random.default_rng(9)
    for i in range(12):  # random bytes in the metadata and tensor directory
        b = bytearray(blob)
        for p in rng.integers(24, 3000, 4):
            b[int(p)] = int(rng.integers(0, 256))
        copies.append((f"random bytes #{i}", bytes(b)))
    good = 0
    for label, data in copies:
        path, out = t.tmp("damaged.gguf"), t.tmp("damaged_gguf.bin")
        with open(path, "wb") as f:
            f.write(data)
        r = subprocess.run([t.python, os.path.join(t.root, "export.py"), path, out], capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        ok = (r.returncode == 1 and lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr
              and not os.path.exists(out)) or (r.returncode == 0 and os.path.exists(out))
        good += bool(ok)
        if not ok:
            t.check(f"damaged GGUF ({label})", False, r.stderr.strip()[-300:])
        if os.path.exists(out):
            os.unlink(out)
    t.check(f"damaged GGUF files: {good}/{len(copies)} end in one error line (or a file that loads)", good == len(copies))
