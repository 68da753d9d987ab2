#!/usr/bin/env python3
"""bench/samples.py - part of `make bench`: many sequences decoding together on one paged KV cache.

The stories110M-shaped random model of bench.py (dim 768, 12 layers, 12 heads, hidden 2048, vocab 32000; f32
and q8_0) continues a 128-token prompt by 128 tokens at temperature 1 (without top-p: see below), as one
sequence (the baseline, plain ./run) and as --samples N for N = 1, 4, 8, 16: one forward pass per step over N
rows, so each weight is read once for all N. Reported: the aggregate decode rate (every sample's tokens over
the decode time) against the single sequence's, measured round-robin in the same run (median of --runs), and
the KV bytes the N samples hold, the prompt's blocks shared, against N separate runs.

    python3 bench/samples.py [--runs N] [--threads N] [--quick]
"""
import os
import re
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BUILD, RUN, SHAPES, bench_arguments, build_tools, export, log, tokens, write_llama2c  # noqa: E402

COUNTS = (1, 4, 8, 16)


def decode_stats(args, threads):
    """Runs ./run; returns (decode tok/s, KV bytes held, KV bytes of separate runs or None)."""
    r = subprocess.run([RUN] + [str(a) for a in args] + ["--threads", str(threads)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    m = re.search(r"decode \d+ tok ([\d.]+) tok/s.*\| kv (\d+) bytes(?:, \d+ separate runs (\d+) bytes)?", r.stderr)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"./run {' '.join(map(str, args[1:]))[:80]} ... failed: {r.stderr.strip()[-300:]}")
    return float(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else None


def main():
    args = bench_arguments(__doc__)
    runs = 1 if args.quick else args.runs
    n_decode = 16 if args.quick else 128
    build_tools()
    ckpt = os.path.join(BUILD, "stories110M-random.bin")
    if not os.path.exists(ckpt):
        log("bench: writing random 110M checkpoint")
        write_llama2c(ckpt, SHAPES["110M"])
    models = {dtype: export(ckpt, os.path.join(BUILD, f"stories110M-{dtype}.bin"), dtype) for dtype in ("f32", "q8_0")}

    prompt = tokens(128, 32000, 4)
    plan = []
    for dtype, path in models.items():
        # --top-p 1: random weights give near-uniform logits, whose nucleus would be 90% of the vocabulary to
        # sort for every token; a trained model's is a few dozen tokens
        common = [path, "--tokens", prompt, "-n", n_decode, "-t", "1", "--top-p", "1", "-s", "1"]
        plan.append(((dtype, "single"), common))
        plan += [((dtype, n), common + ["--samples", n]) for n in COUNTS]
    results = {key: [] for key, _ in plan}
    for i in range(runs):
        for key, cmd in plan:
            results[key].append(decode_stats(cmd, args.threads))
        log(f"bench: samples round {i + 1} of {runs} done")

    def median(key, field):
        return float(np.median([r[field] for r in results[key]]))

    print(f"\n--samples N on stories110M ({os.cpu_count()} cores, --threads {args.threads}, median of {runs} runs): "
          f"a {len(prompt.split(','))}-token prompt, {n_decode} tokens per sample")
    print("| dtype | sequences | aggregate decode tok/s | vs one sequence | KV bytes held | N separate runs |")
    print("|---|---|---|---|---|---|")
    for dtype in models:
        single = median((dtype, "single"), 0)
        print(f"| {dtype} | one (./run) | {single:.1f} | 1.0x | {results[dtype, 'single'][0][1]:,} | - |")
        for n in COUNTS:
            held, alone = results[dtype, n][0][1], results[dtype, n][0][2]
            rate = median((dtype, n), 0)
            print(f"| {dtype} | --samples {n} | {rate:.1f} | {rate / single:.1f}x | {held:,} ({100 * held / alone:.0f}%) "
                  f"| {alone:,} |")


if __name__ == "__main__":
    main()
