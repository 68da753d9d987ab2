"""Kernels and masks end to end: the flash kernel gives the naive kernel's logits (1e-5) on every fixture and
on kjv-5m; --window reproduces the Hugging Face sliding-window logits on checkpoints exported as full
attention; sinks, strided and fixed patterns match a numpy forward pass with the same mask."""
import json
import os

import numpy as np

from harness import relative_error
from study_support import ONE_THREAD, fixture_with_config, llama_logits, mask_matrix
from test_fixtures import FIXTURES

FLASH_TOLERANCE = 1e-5


def run(t):
    # flash = naive on every fixture (prefill in chunks of 64, so chunked prefill is covered too)
    for name in FIXTURES:
        src = os.path.join(t.data, "fixtures", name)
        model = t.export(src, f"{name}.bin")
        ids = json.load(open(os.path.join(src, "ref.json")))["input_ids"]
        naive = t.logits(model, ids, "--attn", "naive", *ONE_THREAD)
        flash = t.logits(model, ids, "--attn", "flash", *ONE_THREAD)
        err = relative_error(flash, naive)
        t.check(f"{name}: --attn flash gives the naive kernel's logits (max rel diff {err:.1e})", err <= FLASH_TOLERANCE)

    kjv = os.path.join(t.root, "models", "kjv-5m.bin")
    ids = json.load(open(os.path.join(t.data, "kjv-5m", "ref.json")))["input_ids"]
    # (as wired: with the default threads, so the heads of the flash kernel also run in parallel)
    for extra in ((), ("--window", "all=16,1=0", "--sinks", "4", "--sparse", "0=strided:8,2=fixed:16") + ONE_THREAD):
        err = relative_error(t.logits(kjv, ids, "--attn", "flash", *extra), t.logits(kjv, ids, *extra))
        t.check(f"kjv-5m {' '.join(extra[:-2]) or '(as wired)'}: flash = naive over 300 tokens (max rel diff {err:.1e})",
                err <= FLASH_TOLERANCE)

    # --window turns full layers into the very sliding layers Hugging Face computes
    for fixture, edit, window in (
            ("mistral_swa", lambda c: c.update(sliding_window=None), "all=16"),
            ("qwen3_mixed", lambda c: c.update(layer_types=["full_attention"] * 4), "0=16,2=16"),
            ("gemma2", lambda c: c.update(layer_types=["full_attention"] * 4), "0=16,2=16")):
        d = fixture_with_config(t, fixture, f"{fixture}_all_full", edit)
        model = t.export(d, f"{fixture}_all_full.bin")
        ref = np.load(os.path.join(d, "ref_logits.npy"))
        ids = json.load(open(os.path.join(d, "ref.json")))["input_ids"]
        full = relative_error(t.logits(model, ids, *ONE_THREAD), ref)
        err = relative_error(t.logits(model, ids, "--window", window, "--batch", "1", *ONE_THREAD), ref)
        t.check(f"{fixture} exported with full attention + --window {window} matches the reference (max rel err "
                f"{err:.1e}; without it {full:.1e})", err <= 1e-4 and full > 1e-3)

    # sinks and the block-sparse patterns against a numpy forward pass with the same masks
    src = os.path.join(t.data, "fixtures", "llama_gqa")
    model = t.export(src, "llama_gqa.bin")
    ref = json.load(open(os.path.join(src, "ref.json")))
    ids = ref["input_ids"]
    n = len(ids)
    causal = llama_logits(src, ids, [mask_matrix("causal", 0, 0, n)] * 3)
    err = relative_error(causal.astype(np.float32), np.load(os.path.join(src, "ref_logits.npy")))
    t.check(f"llama_gqa: the numpy reference forward reproduces the Hugging Face logits (max rel err {err:.1e})", err <= 1e-4)
    cases = [(("--window", "all=12", "--sinks", "3"), [("sliding", 12, 3)] * 3),
             (("--sparse", "strided:5"), [("strided", 5, 0)] * 3),
             (("--sparse", "fixed:7"), [("fixed", 7, 0)] * 3),
             (("--window", "0=9", "--sinks", "2", "--sparse", "1=fixed:16,2=strided:3"),
              [("sliding", 9, 2), ("fixed", 16, 0), ("strided", 3, 0)])]
    for flags, layers in cases:
        want = llama_logits(src, ids, [mask_matrix(kind, span, sinks, n) for kind, span, sinks in layers])
        for kernel in ("naive", "flash"):
            err = relative_error(t.logits(model, ids, "--attn", kernel, *flags, *ONE_THREAD), want.astype(np.float32))
            t.check(f"llama_gqa {' '.join(flags)} ({kernel}): logits equal a numpy forward with that mask "
                    f"(max rel err {err:.1e})", err <= 1e-4)
