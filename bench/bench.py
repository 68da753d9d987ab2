#!/usr/bin/env python3
"""bench/bench.py - `make bench`: how fast ./run decodes and prefills, against what this machine can do.

Builds random-weight models shaped like stories110M (dim 768, 12 layers, 12 heads, hidden 2048, vocab 32000)
and stories15M (dim 288, 6 layers, 6 heads, hidden 768, vocab 32000) as llama2.c checkpoints, exports them
through export.py (f32, bf16, q8_0), and measures in the same run:
  - the machine's read bandwidth (bench/roofline.c, --threads threads): decode reads every weight once per
    token, so its roofline is bandwidth / bytes of weights;
  - the f32 FMA peak (bench/roofline.c): prefill does ~2 FLOPs per weight per token;
  - decode tok/s, prefill tok/s of a 512-token prompt (and token by token, --batch 1, as the baseline),
    peak RSS; each the median of several runs;
  - decode ms/token at positions 100 and 4000 of a model whose layers all slide with a window of 256;
  - a DeepSeek-V2-Lite-shaped stack of latent attention layers (16 heads, latent 512 + rope 64, nope 128, v 128;
    MLA_LAYERS layers with a dense FFN of 1408, random weights, f32; tools/random_model.py): decode tok/s of the
    absorbed and the expanded form at positions 100 and 4000, and the cache bytes against MHA over the same
    heads. One run each (the 4,000-token prompt costs far more than the decode it leads to).
  - the same for a random model shaped like state-spaces/mamba-130m (no attention: a fixed state per layer),
    and its prefill of 512 tokens against token by token.
With LLAMA_BENCH=path/to/llama-bench (a llama.cpp build), then attn.c and llama.cpp side by side on the same
random weights, stories110M- and Llama-3.2-1B-shaped, with attn.c's per-step profile (bench/llamacpp.py).
Timings on a shared machine are noisy: run it when the machine is quiet. Never a pass/fail test.

    python3 bench/bench.py [--runs N] [--threads N] [--quick] [--only mamba] [--llama-only] [--shapes 110M,1B]
"""
import argparse
import json
import mmap
import os
import re
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "bench")
RUN = os.path.join(ROOT, "run")
sys.path.insert(0, ROOT)
from export import f32_to_bf16, read_tensor_directory  # noqa: E402

SHAPES = {  # name: (dim, hidden, layers, heads, vocab, context)
    "110M": (768, 2048, 12, 12, 32000, 1024),
    "15M": (288, 768, 6, 6, 32000, 1024),
}
WINDOW = 256
# deepseek-ai/DeepSeek-V2-Lite's config.json (the fields the wiring reads), and what the benchmark stack changes
V2_LITE = {"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944, "num_hidden_layers": 27,
           "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
           "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400,
           "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
           "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
           "first_k_dense_replace": 1, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
           "moe_intermediate_size": 1408, "topk_method": "greedy", "norm_topk_prob": False,
           "routed_scaling_factor": 1.0, "hidden_act": "silu", "tie_word_embeddings": False}
MLA_LAYERS = 2
MLA_STACK = {"num_hidden_layers": MLA_LAYERS, "first_k_dense_replace": MLA_LAYERS, "intermediate_size": 1408,
             "vocab_size": 4096}
MAMBA = dict(hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4, time_step_rank=48,
             vocab_size=50280)  # state-spaces/mamba-130m-hf


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build_tools():
    os.makedirs(BUILD, exist_ok=True)
    for name in ("roofline", "peak_rss"):
        exe = os.path.join(BUILD, name)
        src = os.path.join(ROOT, "bench", name + ".c")
        if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
            subprocess.run(["cc", "-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-Wall", "-Wextra", "-std=c11",
                            "-D_POSIX_C_SOURCE=200809L", "-D_DEFAULT_SOURCE", src, "-o", exe], check=True)


def random_matrix(rng, rows, cols):
    return (rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)).astype("<f4")


def write_llama2c(path, shape, seed=0):
    """A llama2.c legacy checkpoint (version 0) with random weights and a shared classifier."""
    dim, hidden, layers, heads, vocab, context = shape
    rng = np.random.default_rng(seed)
    head = dim // heads
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, heads, vocab, context))
        f.write(random_matrix(rng, vocab, dim).tobytes())            # token embeddings (= classifier)
        f.write(np.ones(layers * dim, "<f4").tobytes())               # attention rmsnorm
        for rows, cols in ((dim, dim), (dim, dim), (dim, dim), (dim, dim)):  # wq wk wv wo
            for _ in range(layers):
                f.write(random_matrix(rng, rows, cols).tobytes())
        f.write(np.ones(layers * dim, "<f4").tobytes())               # mlp rmsnorm
        for rows, cols in ((hidden, dim), (dim, hidden), (hidden, dim)):  # w1 w2 w3
            for _ in range(layers):
                f.write(random_matrix(rng, rows, cols).tobytes())
        f.write(np.ones(dim, "<f4").tobytes())                        # final rmsnorm
        f.write(np.zeros(context * head, "<f4").tobytes())            # legacy freq_cis (unused)
    os.replace(path + ".tmp", path)


def write_sliding_checkpoint(directory, shape, window, seed=1):
    """A Hugging Face Mistral-style checkpoint whose every layer slides with the given window."""
    dim, hidden, layers, heads, vocab, context = shape
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    cfg = {"model_type": "mistral", "hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
           "max_position_embeddings": 8192, "sliding_window": window, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": True}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, s in (("self_attn.q_proj", (dim, dim)), ("self_attn.k_proj", (dim, dim)), ("self_attn.v_proj", (dim, dim)),
                     ("self_attn.o_proj", (dim, dim)), ("mlp.gate_proj", (hidden, dim)), ("mlp.up_proj", (hidden, dim)),
                     ("mlp.down_proj", (dim, hidden))):
            tensors[p + n + ".weight"] = s
        tensors[p + "input_layernorm.weight"] = (dim,)
        tensors[p + "post_attention_layernorm.weight"] = (dim,)
    write_random_safetensors(os.path.join(directory, "model.safetensors"), tensors, rng)


def write_random_safetensors(path, shapes, rng, bf16=False):
    """A safetensors file of {name: shape}: vectors of ones, matrices N(0, 0.02^2) (bf16: N(0, 1/cols)),
    written tensor by tensor (a GB-sized checkpoint never sits in memory)."""
    width = 2 if bf16 else 4
    header, offset = {}, 0
    for name, s in shapes.items():
        n = int(np.prod(s)) * width
        header[name] = {"dtype": "BF16" if bf16 else "F32", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for name, s in shapes.items():
            if len(s) == 1:
                arr = np.ones(s, "<f4")
            elif bf16:
                arr = rng.standard_normal(s, dtype=np.float32) * np.float32(s[-1] ** -0.5)
            else:
                arr = random_matrix(rng, *s)
            f.write(f32_to_bf16(arr).tobytes() if bf16 else arr.tobytes())
    os.replace(path + ".tmp", path)


def write_mla_stack(path):
    """The DeepSeek-V2-Lite-shaped latent attention stack (MLA_STACK changes to V2_LITE), random weights."""
    tool = os.path.join(ROOT, "tools", "random_model.py")
    newest = max(os.path.getmtime(tool), os.path.getmtime(os.path.join(ROOT, "export.py")))
    if os.path.exists(path) and os.path.getmtime(path) >= newest:
        return path
    log(f"bench: writing {os.path.basename(path)}")
    config = path + ".config.json"
    with open(config, "w") as f:
        json.dump(V2_LITE, f)
    sets = [arg for key, value in MLA_STACK.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    subprocess.run([sys.executable, tool, config, path, "--dtype", "f32"] + sets, check=True, stderr=subprocess.DEVNULL)
    return path


def write_safetensors(directory, tensors):
    """model.safetensors of float32 tensors {name: (shape, producer)}, each produced while it is written."""
    header, offset = {}, 0
    for name, (s, _) in tensors.items():
        n = int(np.prod(s)) * 4
        header[name] = {"dtype": "F32", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(directory, "model.safetensors.tmp"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for name, (s, producer) in tensors.items():
            f.write(np.ascontiguousarray(producer(), "<f4").tobytes())
    os.replace(os.path.join(directory, "model.safetensors.tmp"), os.path.join(directory, "model.safetensors"))


def write_mamba_checkpoint(directory, seed=2):
    """A Hugging Face Mamba checkpoint shaped like mamba-130m, random weights (dt between 0.001 and 0.1, A_log
    = log(1 .. N) as Mamba initialises them), tied embeddings."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    c = MAMBA
    dim, N, R, K = c["hidden_size"], c["state_size"], c["time_step_rank"], c["conv_kernel"]
    inner = c["expand"] * dim
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(c, model_type="mamba", tie_word_embeddings=True), f)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), (c["num_hidden_layers"], inner))).astype(np.float32)
    tensors = {"backbone.embeddings.weight": ((c["vocab_size"], dim), lambda: random_matrix(rng, c["vocab_size"], dim)),
               "backbone.norm_f.weight": ((dim,), lambda: np.ones(dim, "<f4"))}
    for i in range(c["num_hidden_layers"]):
        p = f"backbone.layers.{i}."
        tensors.update({
            p + "norm.weight": ((dim,), lambda: np.ones(dim, "<f4")),
            p + "mixer.in_proj.weight": ((2 * inner, dim), lambda: random_matrix(rng, 2 * inner, dim)),
            p + "mixer.conv1d.weight": ((inner, 1, K), lambda: (rng.standard_normal((inner, 1, K)) * 0.3).astype("<f4")),
            p + "mixer.conv1d.bias": ((inner,), lambda: np.zeros(inner, "<f4")),
            p + "mixer.x_proj.weight": ((R + 2 * N, inner), lambda: random_matrix(rng, R + 2 * N, inner)),
            p + "mixer.dt_proj.weight": ((inner, R), lambda: random_matrix(rng, inner, R)),
            p + "mixer.dt_proj.bias": ((inner,), lambda i=i: np.log(np.expm1(dt[i]))),
            p + "mixer.A_log": ((inner, N), lambda: np.log(np.tile(np.arange(1, N + 1, dtype=np.float32), (inner, 1)))),
            p + "mixer.D": ((inner,), lambda: np.ones(inner, "<f4")),
            p + "mixer.out_proj.weight": ((dim, inner), lambda: random_matrix(rng, dim, inner)),
        })
    write_safetensors(directory, tensors)


def export(src, out, dtype):
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(os.path.join(ROOT, "export.py")):
        log(f"bench: exporting {os.path.basename(out)}")
        subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), src, out, "--dtype", dtype], check=True,
                       stderr=subprocess.DEVNULL)
    return out


def weight_bytes(path):
    """Bytes of weights one decode step reads: every tensor, except the embedding table when a separate
    classifier exists (decode reads one row of it)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        sizes = {name: nbytes for _, name, _, _, _, nbytes in read_tensor_directory(data)}
    total = sum(sizes.values())
    return total - sizes["tok_embeddings"] if "output" in sizes else total


def run_stats(args, threads):
    """Runs ./run; returns (prefill tok/s, decode tok/s, peak RSS bytes, KV cache bytes)."""
    cmd = [os.path.join(BUILD, "peak_rss"), RUN] + [str(a) for a in args] + ["--threads", str(threads)]
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    m = re.search(r"prefill \d+ tok ([\d.]+) tok/s \| decode \d+ tok ([\d.]+) tok/s \| kv (\d+) bytes", r.stderr)
    rss = re.search(r"peak_rss_kb (\d+)", r.stderr)
    if r.returncode != 0 or not m or not rss:
        raise RuntimeError(f"{' '.join(cmd[1:3])} ... failed: {r.stderr.strip()[-300:]}")
    return float(m.group(1)), float(m.group(2)), int(rss.group(1)) * 1024, int(m.group(3))


def tokens(n, vocab, seed):
    return ",".join(str(t) for t in np.random.default_rng(seed).integers(1, vocab, n))


def machine_limits(threads, quick=False):
    """(read bandwidth in bytes/s, f32 FMA peak in FLOP/s), measured now with `threads` threads (bench/roofline.c)"""
    build_tools()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    roofline = os.path.join(BUILD, "roofline")
    out = subprocess.run([roofline, "bandwidth", "1024", "5" if quick else "11"], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    fma = subprocess.run([roofline, "fma"], env=env, capture_output=True, text=True, check=True).stdout.split()
    return float(out[1]) * 1e9, float(fma[1]) * 1e9


def bench_arguments(doc, more=None):
    """The options every bench script takes (--runs, --threads, --quick; more(parser) adds a script's own), once
    ./run is known to exist."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (the median is reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for ./run (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and runs (a smoke test of the script)")
    ap.add_argument("--tokenizer", action="store_true", help="only the tokenizer's speed")
    if more:
        more(ap)
    args = ap.parse_args()
    if args.tokenizer:
        return tokenizer_speed(1 if args.quick else args.runs)
    if not os.path.exists(RUN):
        sys.exit("error: ./run is not built (make)")
    return args


def main():
    def more(ap):
        ap.add_argument("--only", choices=["mamba"], help="measure only the mamba-130m-shaped model")
        ap.add_argument("--llama-only", action="store_true", help="only the side by side with llama.cpp (LLAMA_BENCH)")
        ap.add_argument("--shapes", default="110M,1B", help="shapes for the side by side with llama.cpp (110M, 1B)")
    args = bench_arguments(__doc__, more)
    if args is None:  # --tokenizer: done
        return
    if not args.llama_only:
        own_bench(args)
    llama = os.environ.get("LLAMA_BENCH")
    if not llama:
        print("\nllama.cpp side by side: skipped (set LLAMA_BENCH=path/to/llama-bench, a llama.cpp build)")
    elif not os.access(llama, os.X_OK):
        sys.exit(f"error: LLAMA_BENCH={llama} is not an executable")
    else:
        import llamacpp
        shapes = [x for x in args.shapes.split(",") if x]
        bad = [x for x in shapes if x not in llamacpp.SHAPES]
        if bad:
            sys.exit(f"error: --shapes: unknown shape {bad[0]} (known: {', '.join(llamacpp.SHAPES)})")
        llamacpp.side_by_side(llama, args.threads, 1 if args.quick else max(3, args.runs // 2 * 2 + 1), shapes, args.quick,
                              lambda: machine_limits(args.threads, args.quick)[0])


def own_bench(args):
    runs = 1 if args.quick else args.runs
    n_decode = 16 if args.quick else 128
    build_tools()

    models = {}
    for name, shape in SHAPES.items() if not args.only else ():
        ckpt = os.path.join(BUILD, f"stories{name}-random.bin")
        if not os.path.exists(ckpt):
            log(f"bench: writing random {name} checkpoint")
            write_llama2c(ckpt, shape)
        for dtype in ("f32", "bf16", "q8_0"):
            models[name, dtype] = export(ckpt, os.path.join(BUILD, f"stories{name}-{dtype}.bin"), dtype)
    sliding_dir = os.path.join(BUILD, "sliding15M")
    if not os.path.exists(os.path.join(sliding_dir, "model.safetensors")):
        log("bench: writing random sliding-window checkpoint")
        write_sliding_checkpoint(sliding_dir, SHAPES["15M"], WINDOW)
    sliding = export(sliding_dir, os.path.join(BUILD, "sliding15M-f32.bin"), "f32")
    mla = write_mla_stack(os.path.join(BUILD, "v2lite-mla-f32.bin"))
    mamba_dir = os.path.join(BUILD, "mamba130M")
    if not os.path.exists(os.path.join(mamba_dir, "model.safetensors")):
        log("bench: writing random mamba-130m-shaped checkpoint")
        write_mamba_checkpoint(mamba_dir)
    mamba = export(mamba_dir, os.path.join(BUILD, "mamba130M-f32.bin"), "f32")

    # every measurement: (key, ./run arguments); run round-robin, `runs` times, so that a change in the
    # machine's load in the meantime touches all of them alike; the medians are reported
    prompt, short = tokens(512, 32000, 1), tokens(16, 32000, 2)
    plan = []
    for (name, dtype), path in models.items():
        plan.append(((name, dtype, "decode"), [path, "--tokens", short, "-n", n_decode, "-t", "0"]))
        if dtype == "f32" or name == "110M":
            plan.append(((name, dtype, "prefill"), [path, "--tokens", prompt, "-n", 0]))
    for pos in (100, 4000):
        if not args.only:
            plan.append((("window", pos, "decode"), [sliding, "--tokens", tokens(pos, 32000, 3), "-n", n_decode, "-t", "0"]))
        plan.append((("mamba", pos, "decode"), [mamba, "--tokens", tokens(pos, MAMBA["vocab_size"], 3), "-n", n_decode, "-t", "0"]))
    plan.append((("mamba", "prefill"), [mamba, "--tokens", tokens(512, MAMBA["vocab_size"], 1), "-n", 0]))
    baselines = [((name, "f32", "prefill --batch 1"), [models[name, "f32"], "--tokens", prompt, "-n", 0, "--batch", 1])
                 for name in SHAPES if not args.only]
    baselines.append((("mamba", "prefill --batch 1"), [mamba, "--tokens", tokens(512, MAMBA["vocab_size"], 1), "-n", 0,
                                                       "--batch", 1]))

    limits = [machine_limits(args.threads, args.quick)]
    results = {key: [] for key, _ in plan + baselines}
    for i in range(runs):
        for key, cmd in plan + (baselines if i < max(1, runs // 2) else []):
            results[key].append(run_stats(cmd, args.threads))
        log(f"bench: round {i + 1} of {runs} done")
    # latent attention: each form at each position once (the long prompt's prefill is most of the time)
    mla_runs, positions = {}, (100, 1000 if args.quick else 4000)
    for pos in positions:
        for form in ("absorbed", "expanded"):
            n = 4 if args.quick or (pos > 100 and form == "expanded") else 16
            mla_runs[pos, form] = run_stats([mla, "--tokens", tokens(pos, 4096, 4), "-n", n, "-t", "0", "--mla", form],
                                            args.threads)
            log(f"bench: latent attention, {form}, position {pos} done")
    limits.append(machine_limits(args.threads, args.quick))
    bandwidth, fma_peak = max(l[0] for l in limits), max(l[1] for l in limits)

    def median(key, field):  # field 0: prefill tok/s, 1: decode tok/s, 2: peak RSS
        return float(np.median([r[field] for r in results[key]]))

    rows = []
    for (name, dtype), path in models.items():
        dim, hidden, layers, heads, vocab, context = SHAPES[name]
        nbytes = weight_bytes(path)
        row = {"model": name, "dtype": dtype, "MB": nbytes / 1e6, "decode": median((name, dtype, "decode"), 1),
               "roofline": bandwidth / nbytes, "rss": median((name, dtype, "decode"), 2)}
        if (name, dtype, "prefill") in results:
            # FLOPs per prompt token: the matrices of every layer, and attention (q.k and weights.v, ~256 keys)
            matrix_params = layers * (4 * dim * dim + 3 * dim * hidden)
            row.update(prefill=median((name, dtype, "prefill"), 0), flops=2 * matrix_params + 4 * layers * dim * 513 / 2,
                       rss=max(row["rss"], median((name, dtype, "prefill"), 2)))
        if (name, dtype, "prefill --batch 1") in results:
            row["prefill_b1"] = median((name, dtype, "prefill --batch 1"), 0)
        rows.append(row)
    window_ms = {pos: (1000.0 / median(("window", pos, "decode"), 1), median(("window", pos, "decode"), 2))
                 for pos in (100, 4000) if ("window", pos, "decode") in results}
    mamba_ms = {pos: (1000.0 / median(("mamba", pos, "decode"), 1), median(("mamba", pos, "decode"), 2)) for pos in (100, 4000)}
    state = re.search(r"state (\d+) bytes", subprocess.run([RUN, mamba, "--tokens", "1", "-n", "0"], capture_output=True,
                                                           text=True).stderr)

    print(f"\nattn.c bench ({os.cpu_count()} cores, --threads {args.threads}, median of {runs} runs; "
          f"kernels: {kernels()})")
    print(f"measured in this run (best of before and after): read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"({args.threads} threads, 1 GiB buffer; {limits[0][0] / 1e9:.1f} / {limits[1][0] / 1e9:.1f}), "
          f"f32 FMA peak {fma_peak / 1e9:.0f} GFLOP/s ({limits[0][1] / 1e9:.0f} / {limits[1][1] / 1e9:.0f})\n")
    if rows:
        print("| model | dtype | weights read/token | decode tok/s | % of bandwidth roofline | prefill 512 tok/s "
              "| % of FMA peak | vs --batch 1 | peak RSS |")
        print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pre = pct = ratio = "-"
        if "prefill" in r:
            pre = f"{r['prefill']:.0f}"
            pct = f"{100 * r['prefill'] * r['flops'] / fma_peak:.0f}%"
        if "prefill_b1" in r:
            ratio = f"{r['prefill'] / r['prefill_b1']:.1f}x ({r['prefill_b1']:.0f})"
        print(f"| stories{r['model']} | {r['dtype']} | {r['MB']:.0f} MB | {r['decode']:.1f} | "
              f"{100 * r['decode'] / r['roofline']:.0f}% of {r['roofline']:.0f} | {pre} | {pct} | {ratio} | "
              f"{r['rss'] / 1e6:.0f} MB |")
    print_latent(mla_runs, positions)
    if window_ms:
        a, b = window_ms[100], window_ms[4000]
        print(f"\nsliding window {WINDOW} on every layer (stories15M shape, f32): decode {a[0]:.2f} ms/token at position "
              f"100, {b[0]:.2f} ms/token at position 4000 ({b[0] / a[0]:.2f}x); peak RSS {a[1] / 1e6:.0f} / {b[1] / 1e6:.0f} MB")
    a, b = mamba_ms[100], mamba_ms[4000]
    pre, pre_b1 = median(("mamba", "prefill"), 0), median(("mamba", "prefill --batch 1"), 0)
    print(f"\nmamba-130m shape (24 Mamba layers, random weights, f32; state {int(state.group(1)) if state else '?'} bytes "
          f"at every length): decode {a[0]:.2f} ms/token at position 100, {b[0]:.2f} at position 4000 ({b[0] / a[0]:.2f}x); "
          f"prefill 512 tokens {pre:.0f} tok/s, token by token {pre_b1:.0f} tok/s ({pre / pre_b1:.1f}x); "
          f"peak RSS {a[1] / 1e6:.0f} / {b[1] / 1e6:.0f} MB")


def tokenizer_text(path, size=4 << 20):
    """A large mixed text: the repository's docs and sources, and llama.cpp's test texts in many scripts."""
    parts = []
    for folder, exts in ((ROOT, (".md", ".c", ".h", ".py")), (os.path.join(ROOT, "docs"), (".md",)),
                         (os.path.join(os.environ.get("ATTN_SHARED", os.path.join(ROOT, "..", "shared")), "llamacpp", "vocab"),
                          (".inp",))):
        if os.path.isdir(folder):
            parts += [open(os.path.join(folder, f), encoding="utf-8").read() for f in sorted(os.listdir(folder)) if f.endswith(exts)]
    text = "\n".join(parts)
    with open(path, "w", encoding="utf-8") as f:
        f.write((text * (size // len(text.encode()) + 1))[:size])
    return path


def tokenizer_speed(runs):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from harness import tiny_llama_dir
    subprocess.run(["make", "-s", "build/bench/tokenize"], cwd=ROOT, check=True)
    text = tokenizer_text(os.path.join(BUILD, "tokenizer_text.txt"))
    models = {"GPT-2 (kjv-5m)": os.path.join(ROOT, "models", "kjv-5m.bin")}
    src = os.path.join(ROOT, "tests", "data", "tokenizers", "bytelevel_llama3_style", "tokenizer.json")
    tok = json.load(open(src, encoding="utf-8"))
    vocab = max(tok["model"]["vocab"].values()) + 1
    for name, regex in (("Llama 3", None), ("Qwen2", None)):
        d = os.path.join(BUILD, f"tok_{name.replace(' ', '')}")
        os.makedirs(d, exist_ok=True)
        if name == "Qwen2":  # the same vocabulary behind Qwen2's regex (single digits)
            tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].replace(r"\p{N}{1,3}", r"\p{N}")
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tok, f, ensure_ascii=False)
        tiny_llama_dir(d, vocab)
        models[f"{name} (bytelevel_llama3_style vocabulary)"] = export(d, os.path.join(BUILD, f"tok_{name.replace(' ', '')}.bin"), "f32")
    print(f"\ntokenizer: encoding {os.path.getsize(text) / 1e6:.1f} MB (best of {runs}), the hand-written pre-tokenizer "
          f"against the regex matcher (same ids)\n")
    print("| pre-tokenizer | hand-written MB/s | regex.c MB/s | hand-written / regex | tokens |")
    print("|---|---|---|---|---|")
    for name, model in models.items():
        out = subprocess.run([os.path.join(BUILD, "tokenize"), model, text, str(runs)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr.strip())
        fast, regex, n = out.stdout.split()
        print(f"| {name} | {float(fast):.1f} | {float(regex):.1f} | {float(fast) / float(regex):.2f}x | {n} |")


def print_latent(runs, positions):
    """The latent attention table: decode tok/s of each form, and the cache it keeps against MHA's"""
    c = V2_LITE
    heads, row = c["num_attention_heads"], c["kv_lora_rank"] + c["qk_rope_head_dim"]
    mha = heads * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"])
    print(f"\nlatent attention, DeepSeek-V2-Lite-shaped ({heads} heads, latent {c['kv_lora_rank']} + rope "
          f"{c['qk_rope_head_dim']}, nope {c['qk_nope_head_dim']}, v {c['v_head_dim']}; {MLA_LAYERS} layers, dense FFN "
          f"{MLA_STACK['intermediate_size']}, vocab {MLA_STACK['vocab_size']}, f32; one run each):\n")
    print("| position | absorbed tok/s | expanded tok/s | absorbed / expanded | KV cache | MHA, same heads |")
    print("|---|---|---|---|---|---|")
    for pos in positions:
        a, e = runs[pos, "absorbed"][1], runs[pos, "expanded"][1]
        held = runs[pos, "absorbed"][3]  # the stats line: latent rows after the prompt and the decoded tokens
        print(f"| {pos} | {a:.2f} | {e:.2f} | {a / e:.1f}x | {held / 2 ** 20:.2f} MiB ({row * 4:,} B/token/layer) | "
              f"{held / row * mha / 2 ** 20:.2f} MiB ({mha * 4:,} B, {mha / row:.1f}x) |")


def kernels():
    """The matmul kernels ./run was built with, read off the compiler's target (matmul.c's rule)."""
    r = subprocess.run(["cc", "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True)
    if "__AVX512F__" in r.stdout:
        return "AVX-512" + (" + VNNI" if "__AVX512VNNI__" in r.stdout else "")
    return "AVX2" if "__AVX2__" in r.stdout else "portable C"


if __name__ == "__main__":
    main()
