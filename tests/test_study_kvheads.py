"""export.py --kv-heads: duplicating kv heads is exact (the reference logits still match); mean-pooling
writes the mean of each group's k/v projections and biases, and is exact when a group's heads are equal;
a file whose layers have different kv-head counts (1, 8, 4) runs and gives the expected logits; --info
shows the new grouping and its cache; impossible counts are one error line."""
import json
import os
import shutil
import subprocess

import numpy as np

from harness import relative_error, write_safetensors
from study_support import ONE_THREAD, export, read_model_tensor


def export_with(t, src, name, kv_heads):
    return t.export(src, name, "--dtype", "f32", "--kv-heads", kv_heads)


def fixture(t, name):
    src = os.path.join(t.data, "fixtures", name)
    ref = json.load(open(os.path.join(src, "ref.json")))
    return src, ref["input_ids"], np.load(os.path.join(src, "ref_logits.npy"))


def equal_heads_copy(t, name, group):
    """The fixture with each group of `group` consecutive kv heads made equal (k and v, weights and biases):
    pooling those groups then loses nothing."""
    src = os.path.join(t.data, "fixtures", name)
    d = t.tmp(f"{name}_equal_kv_heads")
    os.makedirs(d, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "config.json")))
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    st = export.SafeTensors(src)
    tensors = {}
    for n in st.names():
        a = st.get(n)
        if any(p in n for p in ("k_proj", "v_proj")):
            heads = a.reshape((-1, group, hd) + a.shape[1:])
            a = np.repeat(heads[:, :1], group, axis=1).reshape(a.shape)
        tensors[n] = a
    write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    shutil.copy(os.path.join(src, "config.json"), d)
    return d


def run(t):
    # duplication is exact: MHA from GQA, MHA from MQA (Gemma 3, StarCoder's fused c_attn with biases), q/k-norm
    for name, kv_heads in (("llama_gqa", "all=8"), ("gemma3", "all=4"), ("starcoder_mqa", "all=4"),
                           ("qwen3_mixed", "all=8"), ("qwen2_mixed", "1=4")):
        src, ids, ref = fixture(t, name)
        model = export_with(t, src, f"{name}_kv_dup.bin", kv_heads)
        err = relative_error(t.logits(model, ids, *ONE_THREAD), ref)
        t.check(f"{name} --kv-heads {kv_heads} (duplicated): reference logits still match (max rel err {err:.1e})",
                err <= 1e-4)

    # a mixed file: layer 0 pooled to MQA, layer 1 duplicated to 8, layer 2 duplicated to 4 (biases: Qwen2)
    src, ids, ref = fixture(t, "qwen2_mixed")
    mixed = export_with(t, src, "qwen2_kv_mixed.bin", "0=1,1=8,2=4")
    pooled_only = export_with(t, src, "qwen2_kv_pooled0.bin", "0=1")
    err = relative_error(t.logits(mixed, ids, *ONE_THREAD), t.logits(pooled_only, ids, *ONE_THREAD))
    t.check(f"qwen2_mixed --kv-heads 0=1,1=8,2=4 runs with 1, 8 and 4 kv heads and equals the file with only "
            f"layer 0 pooled (max rel diff {err:.1e})", err <= 1e-5)
    moved = relative_error(t.logits(pooled_only, ids, *ONE_THREAD), ref)
    t.check(f"qwen2_mixed: pooling layer 0 to MQA does change the logits ({moved:.1e})", moved > 1e-3)
    info = t.run([mixed, "--info"]).stdout.decode()
    t.check("--info of the mixed file: 8 (MQA), 1 (MHA), 2 (GQA-4) and their bytes per token",
            all(s in info for s in ("8 (MQA)", "1 (MHA)", "2 (GQA-4)", " 64 B", " 512 B", " 256 B")), info)
    r = t.run([mixed, "--tokens", ",".join(map(str, ids)), "-n", "0", *ONE_THREAD])
    t.check("the mixed file's cache rows follow each layer's kv heads (80 x 1, 16 x 8 and 16 x 4 heads of 8)",
            b"kv %d bytes" % ((80 * 8 * 1 + 16 * 8 * 8 + 16 * 8 * 4) * 4 * 2) in r.stderr, r.stderr.decode())

    # pooling writes the mean of each group's projections and biases
    st = export.SafeTensors(src)
    ok = True
    for ours, theirs in (("wk", "k_proj.weight"), ("wv", "v_proj.weight"), ("bk", "k_proj.bias"), ("bv", "v_proj.bias")):
        hf = st.get(f"model.layers.0.self_attn.{theirs}")
        want = hf.reshape((1, 2, -1) + hf.shape[1:]).mean(axis=1).reshape((-1,) + hf.shape[1:])
        ok &= bool(np.allclose(read_model_tensor(mixed, f"layers.0.attn.{ours}"), want, atol=1e-7))
    t.check("qwen2_mixed --kv-heads 0=1: layer 0's k/v weights and biases are the mean of the two heads", ok)

    # and is exact when the heads it merges are equal (plain Llama, and q/k-norm Qwen3)
    for name, group, kv_heads in (("llama_gqa", 2, "all=1"), ("qwen3_mixed", 2, "all=2")):
        d = equal_heads_copy(t, name, group)
        _, ids, _ = fixture(t, name)
        plain = t.logits(t.export(d, f"{name}_equal.bin"), ids, *ONE_THREAD)
        pooled = t.logits(export_with(t, d, f"{name}_equal_pooled.bin", kv_heads), ids, *ONE_THREAD)
        err = relative_error(pooled, plain)
        t.check(f"{name} with equal heads in each group: --kv-heads {kv_heads} pools them without changing the "
                f"logits (max rel diff {err:.1e})", err <= 1e-5)

    # impossible counts
    for bad in ("all=3", "all=16", "9=1", "0=0", "x"):
        r = subprocess.run([t.python, os.path.join(t.root, "export.py"), os.path.join(t.data, "fixtures", "llama_gqa"),
                            t.tmp("bad_kv.bin"), "--kv-heads", bad], capture_output=True, text=True)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        t.check(f"--kv-heads {bad} on 8 query / 2 kv heads: an error line, exit 1, nothing written",
                r.returncode == 1 and last.startswith("error: --kv-heads") and "Traceback" not in r.stderr
                and not os.path.exists(t.tmp("bad_kv.bin")), last)
