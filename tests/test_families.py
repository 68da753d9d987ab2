"""The 2025-26 families (layers as data: mixtures of experts, learned sinks, chunked and NoPE layers,
post-norms, q/k norms of every kind, YaRN): each fixture of $ATTN_SHARED/fixtures, made with transformers
4.57.6, exported with export.py, matches its reference logits at every position fed token by token through
the cache and with --batch, within the tolerance in its ref.json, and its greedy continuation. The same
model from the transformers-5 config dialect, from a multimodal checkpoint's text weights, and gpt-oss's
experts as released (MXFP4 blocks and scales) export the identical file."""
import json
import os
import re

import numpy as np

from harness import relative_error, write_safetensors, ROOT
from test_fixtures import MARGIN_FLOOR

import sys
sys.path.insert(0, ROOT)
from export import SafeTensors, FP4_VALUES  # noqa: E402

FAMILIES = ["gpt_oss", "llama4_text", "qwen3_moe", "smollm3", "olmo3", "exaone4"]
# q8_0 logits against f32, relative to the logit scale: tests/test_speed.py holds kjv-5m (real weights) to
# 5e-2; these random-weight fixtures are looser (dense ones reach 3.4e-2, MoE ones compound it through two
# routed layers of random experts to 5.5e-2)
Q8_TOLERANCE = 1e-1

# what --info must show of each: per layer, and on the first line
INFO = {
    "gpt_oss": (["sliding 16", "full"] * 2, ["learned-sinks", "qkv-bias", "rope x1.35", "MoE 2 of 4 x 64 (top-k softmax)"], "active per token"),
    "llama4_text": (["chunked 16"] * 3 + ["full"], ["q/k-norm(no weights)", "NoPE", "temperature", "MoE 1 of 4 x 64 (sigmoid) + shared 64",
                                                      "gated SiLU 128"], "active per token"),
    "qwen3_moe": (["full"] * 4, ["q/k-norm", "MoE 2 of 8 x 32 (softmax)", "gated SiLU 128"], "active per token"),
    "smollm3": (["full"] * 4, ["NoPE"], "tied embeddings"),
    "olmo3": (["sliding 16"] * 3 + ["full"], ["q/k-norm(whole)", "post-norms-only"], "RMSNorm"),
    "exaone4": (["sliding 16"] * 3 + ["full"], ["q/k-norm", "post-norms-only", "NoPE"], "RMSNorm"),
}


def check_family(t, name, model, ref_dir, batch_invariant=True):
    """The reference logits at every position with several --batch / --threads, bit-identical across --threads
    always and across --batch unless the family prefills in a chunked form of its own (batch_invariant False:
    Mamba-2's SSD, Gated DeltaNet), and the greedy ids; returns the worst relative error."""
    ref = json.load(open(os.path.join(ref_dir, "ref.json")))
    want = np.load(os.path.join(ref_dir, "ref_logits.npy"))
    tol = ref["tolerance"]
    ids = ref["input_ids"]
    runs = {}
    for batch, threads in (("1", "1"), ("7", "2"), ("80", "2"), ("80", "1")):
        got = runs[batch, threads] = t.logits(model, ids, "--batch", batch, "--threads", threads)
        err = relative_error(got, want)
        t.check(f"{name}: logits at all {len(ids)} positions, --batch {batch} --threads {threads} (max rel err "
                f"{err:.1e}, tolerance {tol:g})", got.shape == want.shape and err <= tol)
    if batch_invariant:
        t.check(f"{name}: bit-identical logits whatever --batch and --threads",
                all(np.array_equal(runs["1", "1"], r) for r in runs.values()))
    else:
        t.check(f"{name}: bit-identical logits whatever --threads", np.array_equal(runs["80", "1"], runs["80", "2"]))
    r = t.run([model, "--tokens", ",".join(map(str, ref["prompt_ids"])), "-n", len(ref["greedy_ids"]), "-t", "0",
               "--print-ids"])
    got_ids = [int(x) for x in r.stdout.replace(b",", b" ").split()]
    n = next((i for i, m in enumerate(ref["greedy_top1_top2_margin"]) if m < MARGIN_FLOOR), len(ref["greedy_ids"]))
    t.check(f"{name}: greedy ids ({n} steps compared)", r.returncode == 0 and got_ids[:n] == ref["greedy_ids"][:n],
            f"got {got_ids[:n]}, want {ref['greedy_ids'][:n]}")
    return err


def transformers5_config(cfg):
    """The same config as transformers 5 writes it: rope_theta and rope_scaling folded into rope_parameters."""
    c = dict(cfg)
    params = {"rope_theta": c.pop("rope_theta", 10000.0)}
    scaling = c.pop("rope_scaling", None)
    params.update(scaling or {"rope_type": "default"})
    params.pop("type", None)
    c["rope_parameters"] = params
    c["transformers_version"] = "5.17.0"
    return c


def checkpoint_dir(t, name, cfg, tensors):
    d = t.tmp(name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    return d


def same_file(a, b):
    return open(a, "rb").read() == open(b, "rb").read()


def to_mxfp4(w):
    """[..., cols] float32 -> (blocks [..., cols/32, 16] uint8, scales [..., cols/32] uint8): each group of 32
    scaled by a power of two so that its largest value fits e2m1's 6, each value the nearest of the 16."""
    g = w.reshape(w.shape[:-1] + (-1, 32))
    exponent = np.ceil(np.log2(np.maximum(np.abs(g).max(-1), 1e-30) / 6.0)).astype(np.int32)
    scaled = g / np.ldexp(1.0, exponent)[..., None]
    codes = np.abs(scaled[..., None] - FP4_VALUES).argmin(-1).astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), (exponent + 127).astype(np.uint8)


def from_mxfp4(blocks, scales):
    values = np.stack([FP4_VALUES[blocks & 15], FP4_VALUES[blocks >> 4]], -1).reshape(blocks.shape[:-1] + (32,))
    return np.ldexp(values, scales.astype(np.int32)[..., None] - 127).reshape(blocks.shape[:-2] + (-1,))


def run(t):
    errors = {}
    for name in FAMILIES:
        src = t.shared_file(os.path.join("fixtures", name, "ref.json"), f"{name} fixture")
        if not src:
            continue
        src = os.path.dirname(src)
        model = t.export(src, f"{name}.bin")
        errors[name] = check_family(t, name, model, src)
        info = t.run([model, "--info"]).stdout.decode()
        kinds, extras, first = INFO[name]
        rows = [line.split()[1] + (" " + line.split()[2] if line.split()[1] in ("sliding", "chunked") else "")
                for line in info.splitlines() if re.match(r"^\s+\d+  \S", line)]
        t.check(f"{name} --info: each layer's attention ({', '.join(kinds)}), {'; '.join(extras)}; {first}",
                rows == kinds and all(e in info for e in extras) and first in info.splitlines()[0] + info.splitlines()[1], info)
        cfg = json.load(open(os.path.join(src, "config.json")))
        st = SafeTensors(src)
        tensors = {n: st.get(n) for n in st.names()}
        d5 = checkpoint_dir(t, f"{name}_t5", transformers5_config(cfg), tensors)
        t.check(f"{name}: the transformers-5 config dialect (rope_parameters) exports the identical model file",
                same_file(model, t.export(d5, f"{name}_t5.bin")))

    # q8_0: the stacked experts quantized matrix by matrix, within q8_0's tolerance of f32. Every expert is
    # chosen (top k = n), so that a router near a tie cannot send the two runs to different experts: routing
    # is discontinuous, and on these random weights q8_0's small errors flip close choices.
    for name, key in (("qwen3_moe", "num_experts"), ("gpt_oss", "num_local_experts"), ("llama4_text", "num_local_experts")):
        if name in errors:
            src = os.path.join(t.shared, "fixtures", name)
            cfg = json.load(open(os.path.join(src, "config.json")))
            cfg["num_experts_per_tok"] = cfg[key]
            st = SafeTensors(src)
            d = checkpoint_dir(t, f"{name}_all_experts", cfg, {n: st.get(n) for n in st.names()})
            ids = json.load(open(os.path.join(src, "ref.json")))["input_ids"]
            f32 = t.logits(t.export(d, f"{name}_all_experts.bin"), ids)
            q8 = t.export(d, f"{name}_all_experts-q8_0.bin", "--dtype", "q8_0")
            err = relative_error(t.logits(q8, ids), f32)
            t.check(f"{name} q8_0, every expert chosen: logits within {Q8_TOLERANCE:g} of f32 (max rel err {err:.1e}), "
                    "bit-identical with --batch 1 and 80", err < Q8_TOLERANCE and np.array_equal(
                        t.logits(q8, ids, "--batch", "1"), t.logits(q8, ids, "--batch", "80")))

    # Llama 4 as released is multimodal: text weights under language_model.model., config in text_config
    src = os.path.join(t.shared, "fixtures", "llama4_text")
    if "llama4_text" in errors:
        cfg = json.load(open(os.path.join(src, "config.json")))
        st = SafeTensors(src)
        tensors = {"language_model." + n: st.get(n) for n in st.names()}  # language_model.model.*, .lm_head
        tensors["vision_model.patch_embedding.linear.weight"] = np.zeros((4, 3), np.float32)
        wrapped = {"model_type": "llama4", "text_config": {k: v for k, v in cfg.items() if k != "architectures"},
                   "vision_config": {"model_type": "llama4_vision_model"}}
        d = checkpoint_dir(t, "llama4_multimodal", wrapped, tensors)
        t.check("llama4: a multimodal checkpoint (text_config, language_model.model.*) exports the text model exactly",
                same_file(t.export(src, "llama4_text.bin"), t.export(d, "llama4_multimodal.bin")))

    # gpt-oss as released: every expert matrix in MXFP4 (4-bit e2m1 values, a power-of-two scale per 32).
    # The reference: the same checkpoint with those matrices dequantized (exactly) to float32.
    src = os.path.join(t.shared, "fixtures", "gpt_oss")
    if "gpt_oss" in errors:
        cfg = json.load(open(os.path.join(src, "config.json")))
        st = SafeTensors(src)
        plain, packed = {}, {}
        for n in st.names():
            w = st.get(n)
            if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj"):
                blocks, scales = to_mxfp4(np.ascontiguousarray(w.transpose(0, 2, 1)))  # [E][out][in]
                packed[n + "_blocks"], packed[n + "_scales"] = blocks.reshape(blocks.shape[:-2] + (-1, 16)), scales
                plain[n] = np.ascontiguousarray(from_mxfp4(blocks, scales).transpose(0, 2, 1)).astype(np.float32)
            else:
                plain[n] = packed[n] = w
        a = t.export(checkpoint_dir(t, "gpt_oss_dequantized", cfg, plain), "gpt_oss_dequantized.bin")
        b = t.export(checkpoint_dir(t, "gpt_oss_mxfp4", cfg, packed), "gpt_oss_mxfp4.bin")
        t.check("gpt_oss: MXFP4 experts (blocks + scales) export exactly as their dequantized values", same_file(a, b))
    if errors:
        print("# max relative logit error per family: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
