"""The default model: models/kjv-5m.bin prints the five reference greedy continuations exactly, encodes
the prompts to the reference ids, matches the reference logits over 300 held-out tokens, and is what
export.py makes from ../shared/models/kjv-5m today."""
import json
import os
import subprocess

import numpy as np

from harness import ids_of, relative_error

MODEL = "models/kjv-5m.bin"


# models/kjv-5m.bin is made with:  python3 export.py ../shared/models/kjv-5m models/kjv-5m.bin --bf16-rope
# (the model was trained, and its references computed, with RoPE frequencies rounded to bf16)


def run(t):
    model = os.path.join(t.root, MODEL)
    ref = json.load(open(os.path.join(t.data, "kjv-5m", "ref.json")))
    for g in ref["greedy"]:
        r = t.run([model, "-p", g["prompt"], "-t", "0", "-n", len(g["greedy_ids"])])
        text = r.stdout.decode("utf-8", "replace")
        t.check(f"kjv-5m: greedy continuation of {g['prompt']!r}", r.returncode == 0 and text == g["greedy_text"] + "\n",
                f"got {text[:80]!r}")
        r = t.run([model, "--encode", g["prompt"]])
        ids = ids_of(r.stdout)
        t.check(f"kjv-5m: --encode {g['prompt']!r} gives the reference prompt ids (BOS included)", ids == g["prompt_ids"],
                f"got {ids}")
        r = t.run([model, "-p", g["prompt"], "-t", "0", "-n", len(g["greedy_ids"]), "--print-ids"])
        t.check(f"kjv-5m: greedy ids of {g['prompt']!r}", ids_of(r.stdout) == g["greedy_ids"])

    logits_path = t.shared_file("models/kjv-5m/ref_logits.npy", "kjv-5m: logits over 300 held-out tokens")
    if logits_path:
        got = t.logits(model, ref["input_ids"], "--batch", "1")
        err = relative_error(got, np.load(logits_path))
        t.check(f"kjv-5m: logits over {len(ref['input_ids'])} held-out tokens (max rel err {err:.1e})", err <= 1e-4)

    src = t.shared_file("models/kjv-5m/model.safetensors", "kjv-5m: committed model equals a fresh export")
    if src:
        fresh = t.export(os.path.dirname(src), "kjv-5m.bin", "--bf16-rope")
        t.check("kjv-5m: committed models/kjv-5m.bin equals a fresh export (format and exporter in step)",
                open(fresh, "rb").read() == open(model, "rb").read())
