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
  - decode ms/token at positions 100 and 4000 of a model whose layers all slide with a window of 256.
Timings on a shared machine are noisy: run it when the machine is quiet. Never a pass/fail test.

    python3 bench/bench.py [--runs N] [--threads N] [--quick]
"""
import argparse
import json
import mmap
import os
import re
import struct
import subprocess
import sys
import time

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
    """Runs ./run; returns (prefill tok/s, decode tok/s, peak RSS bytes)."""
    cmd = [os.path.join(BUILD, "peak_rss"), RUN] + [str(a) for a in args] + ["--threads", str(threads)]
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    m = re.search(r"prefill \d+ tok ([\d.]+) tok/s \| decode \d+ tok ([\d.]+) tok/s", r.stderr)
    rss = re.search(r"peak_rss_kb (\d+)", r.stderr)
    if r.returncode != 0 or not m or not rss:
        raise RuntimeError(f"{' '.join(cmd[1:3])} ... failed: {r.stderr.strip()[-300:]}")
    return float(m.group(1)), float(m.group(2)), int(rss.group(1)) * 1024


def tokens(n, vocab, seed):
    return ",".join(str(t) for t in np.random.default_rng(seed).integers(1, vocab, n))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (the median is reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for ./run (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and runs (a smoke test of the script)")
    ap.add_argument("--tokenizer", action="store_true", help="only the tokenizer's speed")
    args = ap.parse_args()
    if args.tokenizer:
        return tokenizer_speed(1 if args.quick else args.runs)
    if not os.path.exists(RUN):
        sys.exit("error: ./run is not built (make)")
    runs = 1 if args.quick else args.runs
    n_decode = 16 if args.quick else 128
    build_tools()

    models = {}
    for name, shape in SHAPES.items():
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

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    roofline = os.path.join(BUILD, "roofline")

    def machine_limits():
        out = subprocess.run([roofline, "bandwidth", "1024", "5" if args.quick else "11"], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        fma = subprocess.run([roofline, "fma"], env=env, capture_output=True, text=True, check=True).stdout.split()
        return float(out[1]) * 1e9, float(fma[1]) * 1e9

    # every measurement: (key, ./run arguments); run round-robin, `runs` times, so that a change in the
    # machine's load in the meantime touches all of them alike; the medians are reported
    prompt, short = tokens(512, 32000, 1), tokens(16, 32000, 2)
    plan = []
    for (name, dtype), path in models.items():
        plan.append(((name, dtype, "decode"), [path, "--tokens", short, "-n", n_decode, "-t", "0"]))
        if dtype == "f32" or name == "110M":
            plan.append(((name, dtype, "prefill"), [path, "--tokens", prompt, "-n", 0]))
    for pos in (100, 4000):
        plan.append((("window", pos, "decode"), [sliding, "--tokens", tokens(pos, 32000, 3), "-n", n_decode, "-t", "0"]))
    baselines = [((name, "f32", "prefill --batch 1"), [models[name, "f32"], "--tokens", prompt, "-n", 0, "--batch", 1])
                 for name in SHAPES]

    limits = [machine_limits()]
    results = {key: [] for key, _ in plan + baselines}
    for i in range(runs):
        for key, cmd in plan + (baselines if i < max(1, runs // 2) else []):
            results[key].append(run_stats(cmd, args.threads))
        log(f"bench: round {i + 1} of {runs} done")
    limits.append(machine_limits())
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
                 for pos in (100, 4000)}

    print(f"\nattn.c bench ({os.cpu_count()} cores, --threads {args.threads}, median of {runs} runs; "
          f"kernels: {kernels()})")
    print(f"measured in this run (best of before and after): read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"({args.threads} threads, 1 GiB buffer; {limits[0][0] / 1e9:.1f} / {limits[1][0] / 1e9:.1f}), "
          f"f32 FMA peak {fma_peak / 1e9:.0f} GFLOP/s ({limits[0][1] / 1e9:.0f} / {limits[1][1] / 1e9:.0f})\n")
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
    a, b = window_ms[100], window_ms[4000]
    print(f"\nsliding window {WINDOW} on every layer (stories15M shape, f32): decode {a[0]:.2f} ms/token at position 100, "
          f"{b[0]:.2f} ms/token at position 4000 ({b[0] / a[0]:.2f}x); peak RSS {a[1] / 1e6:.0f} / {b[1] / 1e6:.0f} MB")


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


def kernels():
    """The matmul kernels ./run was built with, read off the compiler's target (matmul.c's rule)."""
    r = subprocess.run(["cc", "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True)
    if "__AVX512F__" in r.stdout:
        return "AVX-512" + (" + VNNI" if "__AVX512VNNI__" in r.stdout else "")
    return "AVX2" if "__AVX2__" in r.stdout else "portable C"


if __name__ == "__main__":
    main()
