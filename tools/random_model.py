#!/usr/bin/env python3
"""Write an attn.c model file with random weights for a DeepSeek-architecture config.json, to look at the wiring
of checkpoints far too large for this machine (DeepSeek-V3 / R1, Kimi K2: ~700 GB to 1 TB) with ./run --info.

    python3 tools/random_model.py CONFIG.json OUT.bin [--set KEY=VALUE ...] [--dtype q8_0] [--seed N]

CONFIG.json is the checkpoint's own config.json (model_type deepseek_v2, deepseek_v3 or kimi_k2; only that
file is needed, no weights). --set changes a config key first (VALUE is JSON), e.g. num_hidden_layers=4 to keep
the first four layers, vocab_size=1024: what it changed is printed, and the file's family name says
"random". Every width the wiring depends on (heads, latent and rope dims, experts, FFN widths) comes from
the config, so --info shows the real rows; its parameter count and KV table are those of the layers kept.
Weights: norm weights 1, matrices N(0, 1/columns), other vectors N(0, 0.01^2). No tokenizer (prompts are
--tokens). The benchmark (bench/bench.py) makes its DeepSeek-V2-Lite-shaped stack with it.
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export as E  # noqa: E402

FAMILIES = ("deepseek_v2", "deepseek_v3", "kimi_k2")


def random_weights(m, seed):
    """Every tensor the tensor table asks of m, drawn when it is written (one at a time)."""
    rng = np.random.default_rng(seed)

    def draw(name, shape):
        if len(shape) == 1:
            return (np.ones(shape) if name.endswith("norm") else rng.standard_normal(shape) * 0.01).astype(np.float32)
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)).astype(np.float32)

    for name, (shape, _) in E.expected_tensors(m).items():
        m.add(name, shape, lambda name=name, shape=shape: draw(name, shape))
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="a config.json of model_type " + ", ".join(FAMILIES))
    ap.add_argument("out", help="output model file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a config key first (VALUE is JSON), e.g. num_hidden_layers=4")
    ap.add_argument("--dtype", choices=sorted(E.DTYPES), default="q8_0", help="weight dtype (default q8_0)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        cfg = E.load_json(args.config)
        family = cfg.get("model_type") if isinstance(cfg, dict) else None
        if family not in FAMILIES:
            raise E.ExportError(f"{args.config}: model_type {family!r} is not one of {', '.join(FAMILIES)}")
        for item in args.set:
            key, eq, value = item.partition("=")
            try:
                new = json.loads(value)
            except ValueError:
                raise E.ExportError(f"--set {item}: VALUE is not JSON")
            if not eq or not key:
                raise E.ExportError(f"--set {item}: expected KEY=VALUE")
            E.log(f"random_model: {key}: {cfg.get(key)!r} -> {new!r}")
            cfg[key] = new
        m = E.deepseek_model(cfg, family, bool(cfg.get("tie_word_embeddings", False)))
        m.family = (family + " (random)")[:31]
        E.write_model(random_weights(m, args.seed), args.out, E.DTYPES[args.dtype])
    except E.ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
