"""Byte-level BPE tokenizers: every reference encoding, through export.py and ./run --encode."""
import json
import os

from harness import tiny_llama_dir

FOLDERS = ["bytelevel_gpt2_style", "bytelevel_llama3_style"]


def run(t):
    for folder in FOLDERS:
        src = os.path.join(t.data, "tokenizers", folder)
        tok = json.load(open(os.path.join(src, "tokenizer.json")))
        vocab = max(list(tok["model"]["vocab"].values()) + [a["id"] for a in tok["added_tokens"]]) + 1
        model = t.export(tiny_llama_dir(t.tmp(f"tiny_{folder}"), vocab, [os.path.join(src, "tokenizer.json")]),
                         f"tiny_{folder}.bin")
        ref = json.load(open(os.path.join(src, "ref.json")))
        good = 0
        for s in ref["strings"]:
            r = t.run([model, "--encode", s["text"], "--no-bos"])
            ids = [int(x) for x in r.stdout.split()]
            ok = r.returncode == 0 and ids == s["ids"]
            good += ok
            if not ok:
                t.check(f"{folder}: encode {s['text'][:40]!r}", False, f"got {ids[:16]}, want {s['ids'][:16]}")
        t.check(f"{folder}: {good}/{len(ref['strings'])} reference encodings exact", good == len(ref["strings"]))
