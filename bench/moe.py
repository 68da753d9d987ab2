#!/usr/bin/env python3
"""bench/moe.py - part of `make bench`: how close a mixture-of-experts model decodes to the bandwidth roofline
of the bytes it actually reads.

A random-weight Qwen3-MoE-shaped checkpoint (dim 1024, 6 layers, 16 query / 4 kv heads, 32 experts of width
768, top 4, vocab 32000; 0.9 GB in bf16) is exported with export.py. A decode step reads the attention and
router weights of every layer, the 4 chosen experts of each (of 32: an eighth of the expert weights), the
final norm and the classifier - about 210 MB - so its roofline is read bandwidth / those bytes. The router's
choices vary from token to token (random weights), so the experts come from memory, not from the 105 MB L3.
Measured in the same run: the bandwidth (bench/roofline.c), the decode rate (median of --runs), and, as a
baseline, the same layers with one dense FFN of the active width (4 x 768) in place of the experts.

    python3 bench/moe.py [--runs N] [--threads N] [--quick]
"""
import argparse
import json
import mmap
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BUILD, ROOT, build_tools, log, run_stats, tokens, write_random_safetensors  # noqa: E402

sys.path.insert(0, ROOT)
from export import read_tensor_directory  # noqa: E402

DIM, LAYERS, HEADS, KV_HEADS, VOCAB = 1024, 6, 16, 4, 32000
EXPERTS, TOP_K, EXPERT_HIDDEN = 32, 4, 768


def write_checkpoint(directory, moe, seed=3):
    """A Hugging Face checkpoint in bf16: qwen3_moe with EXPERTS experts, or (moe False) qwen3 with a dense
    FFN of width TOP_K * EXPERT_HIDDEN (the same active bytes)."""
    os.makedirs(directory, exist_ok=True)
    head_dim = DIM // HEADS
    cfg = {"model_type": "qwen3_moe" if moe else "qwen3", "hidden_size": DIM, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": head_dim, "vocab_size": VOCAB,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
           "intermediate_size": TOP_K * EXPERT_HIDDEN}
    if moe:
        cfg.update(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_HIDDEN, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[])
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), "model.norm.weight": (DIM,), "lm_head.weight": (VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (DIM,), p + "post_attention_layernorm.weight": (DIM,),
                       p + "self_attn.q_proj.weight": (HEADS * head_dim, DIM), p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, DIM),
                       p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, DIM), p + "self_attn.o_proj.weight": (DIM, HEADS * head_dim),
                       p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)})
        experts = [f"mlp.experts.{e}." for e in range(EXPERTS)] if moe else ["mlp."]
        width = EXPERT_HIDDEN if moe else TOP_K * EXPERT_HIDDEN
        for e in experts:
            shapes.update({p + e + "gate_proj.weight": (width, DIM), p + e + "up_proj.weight": (width, DIM),
                           p + e + "down_proj.weight": (DIM, width)})
        if moe:
            shapes[p + "mlp.gate.weight"] = (EXPERTS, DIM)
    write_random_safetensors(os.path.join(directory, "model.safetensors"), shapes, np.random.default_rng(seed), bf16=True)


def active_bytes(path):
    """Bytes one decode step reads: every tensor, top_k / n_experts of each stack of experts, and one row of
    the embedding table."""
    total = 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for _, name, _, shape, _, nbytes in read_tensor_directory(data):
            if name == "tok_embeddings":
                continue
            total += nbytes * TOP_K // EXPERTS if len(shape) == 3 or name.endswith(("moe.b_gate", "moe.b_up", "moe.b_down")) else nbytes
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    runs, n_decode = (1, 16) if args.quick else (args.runs, 64)
    build_tools()
    models = {}
    for moe in (True, False):
        name = "moe32x4" if moe else "dense-active"
        src = os.path.join(BUILD, name)
        out = os.path.join(BUILD, f"{name}-bf16.bin")
        if not os.path.exists(os.path.join(src, "model.safetensors")):
            log(f"bench: writing random {name} checkpoint")
            write_checkpoint(src, moe)
        if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(os.path.join(ROOT, "export.py")):
            log(f"bench: exporting {name}")
            subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), src, out], check=True, stderr=subprocess.DEVNULL)
        models[name] = out
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    roofline = os.path.join(BUILD, "roofline")
    bandwidth = []
    prompt = tokens(16, VOCAB, 5)
    results = {name: [] for name in models}
    for i in range(runs):
        bandwidth.append(float(subprocess.run([roofline, "bandwidth", "1024", "5"], env=env, capture_output=True, text=True,
                                              check=True).stdout.split()[1]) * 1e9)
        for name, path in models.items():
            results[name].append(run_stats([path, "--tokens", prompt, "-n", n_decode, "-t", "0"], args.threads)[1])
    bw = max(bandwidth)
    print(f"\nmixture of experts (bf16, {EXPERTS} experts of {EXPERT_HIDDEN}, top {TOP_K}, dim {DIM}, {LAYERS} layers; "
          f"--threads {args.threads}, median of {runs}; read bandwidth {bw / 1e9:.1f} GB/s)")
    print("| model | file | bytes read per token | decode tok/s | roofline tok/s | % of roofline |")
    print("|---|---|---|---|---|---|")
    for name, path in models.items():
        nbytes = active_bytes(path)
        rate = float(np.median(results[name]))
        print(f"| {name} | {os.path.getsize(path) / 1e9:.2f} GB | {nbytes / 1e6:.0f} MB | {rate:.1f} | {bw / nbytes:.1f} | "
              f"{100 * rate * nbytes / bw:.0f}% |")


if __name__ == "__main__":
    main()
