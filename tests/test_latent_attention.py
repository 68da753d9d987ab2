"""Multi-head latent attention (DeepSeek's MLA, mla.c) and DeepSeek's experts (moe.c).

The deepseek_v3 and deepseek_v2 fixtures of $ATTN_SHARED (transformers 4.57.6) match their reference logits at
every position through the cache and with --batch, with each form of the attention (absorbed, expanded, auto),
within ref.json's tolerance, and their greedy continuations; the two forms agree within 1e-5 and each gives the
same bits whatever --batch; the transformers-5 config dialect exports the identical file. The deepseek_v2
fixture carries transformers 4.57.6's softmax scale (no YaRN mscale^2: export.py --no-softmax-mscale); the
default export has DeepSeek's own. The cache holds one row of kv_rank + rope floats per position (the stats
line, --info); --attn-map records MLA layers' weights; tools/random_model.py writes a model from a config alone.

Two more references of ours (tests/data/fixtures, made by $ATTN_SHARED/hfref with transformers 4.57.6: ref.json
holds the command): deepseek_v2_grouped (a low-rank query on V2, nope 8 != v 24, group_limited_greedy over
4 groups, routed scale 1.5) and deepseek_v3_halves (rope_interleave false, rope 8 != nope 16, top 3 from 1 of
2 groups, not renormalised)."""
import json
import os
import re
import struct
import subprocess

import numpy as np

from harness import fixture_dir, relative_error
from hostile_corpus import Layout
from test_families import checkpoint_dir, same_file, transformers5_config
from test_fixtures import MARGIN_FLOOR

import sys
from harness import ROOT
sys.path.insert(0, ROOT)
from export import SafeTensors, yarn_mscale  # noqa: E402

FORMS = ("absorbed", "expanded", "auto")
FIXTURES = {"deepseek_v3": (), "deepseek_v2": ("--no-softmax-mscale",)}  # export options that match the reference
OUR_FIXTURES = {"deepseek_v2_grouped": ("--no-softmax-mscale",), "deepseek_v3_halves": ()}
FORMS_AGREE = 1e-5


def greedy_ids(t, model, ref, *extra):
    r = t.run([model, "--tokens", ",".join(map(str, ref["prompt_ids"])), "-n", len(ref["greedy_ids"]), "-t", "0",
               "--print-ids"] + list(extra))
    return r.returncode, [int(x) for x in r.stdout.replace(b",", b" ").split()]


def check_fixture(t, name, model, src):
    ref = json.load(open(os.path.join(src, "ref.json")))
    want = np.load(os.path.join(src, "ref_logits.npy"))
    tol, ids = ref["tolerance"], ref["input_ids"]
    logits = {}
    for form in FORMS:
        runs = {b: t.logits(model, ids, "--mla", form, "--batch", b) for b in ("1", "7", "80")}
        err = max(relative_error(got, want) for got in runs.values())
        t.check(f"{name}: --mla {form}: logits at all {len(ids)} positions, --batch 1 / 7 / 80 (max rel err {err:.1e}, "
                f"tolerance {tol:g})", all(g.shape == want.shape for g in runs.values()) and err <= tol)
        t.check(f"{name}: --mla {form}: --batch 7 and 80 give --batch 1's bits",
                all(np.array_equal(runs["1"], g) for g in runs.values()))
        logits[form] = runs["1"]
        n = next((i for i, m in enumerate(ref["greedy_top1_top2_margin"]) if m < MARGIN_FLOOR), len(ref["greedy_ids"]))
        rc, got = greedy_ids(t, model, ref, "--mla", form)
        t.check(f"{name}: --mla {form}: greedy ids ({n} steps compared)", rc == 0 and got[:n] == ref["greedy_ids"][:n],
                f"got {got[:n]}, want {ref['greedy_ids'][:n]}")
    err = relative_error(logits["absorbed"], logits["expanded"])
    t.check(f"{name}: the absorbed and expanded forms agree within {FORMS_AGREE:g} (max rel err {err:.1e})",
            err <= FORMS_AGREE)
    t.check(f"{name}: auto agrees with the absorbed form within {FORMS_AGREE:g} (expanded at position 0, where a query "
            "sees one key, absorbed from the second key on)", relative_error(logits["auto"], logits["absorbed"]) <= FORMS_AGREE)
    return ids, want


def layer_scale(path, layer):
    """attn_scale of a latent attention record (docs/FORMAT.md)"""
    blob = open(path, "rb").read()
    fields = dict(Layout(blob).layers[layer]["fields"])
    return struct.unpack_from("<f", blob, fields["mixer attn_scale"])[0]


def kv_bytes(stderr):
    m = re.search(rb"kv (\d+) bytes", stderr)
    return int(m.group(1)) if m else None


def export_errors(t):
    """DeepSeek configs export.py refuses: one error line, no output file"""
    cfg = json.load(open(os.path.join(t.data, "fixtures", "deepseek_v2_grouped", "config.json")))
    cases = [("attention_bias", {"attention_bias": True}, (), "attention_bias is not supported"),
             ("odd rope dims", {"qk_rope_head_dim": 15}, (), "qk_rope_head_dim 15 is odd"),
             ("a kv_lora_rank the weights lack", {"kv_lora_rank": 16}, (), "has shape [128, 32], config implies [128, 16]"),
             ("a v_head_dim the weights lack", {"v_head_dim": 16}, (), "kv_b_proj.weight' has shape"),
             ("V3's topk_method on V2", {"topk_method": "noaux_tc"}, (), "topk_method 'noaux_tc' is not supported"),
             ("moe_layer_freq 2", {"moe_layer_freq": 2}, (), "moe_layer_freq other than 1"),
             ("--kv-heads on latent layers", {}, ("--kv-heads", "all=1"), "layer 0 is latent attention")]
    for label, change, options, want in cases:
        d = fixture_dir(t, "deepseek_v2_grouped", "mla_export_" + label.replace(" ", "_"), dict(cfg, **change))
        out = t.tmp("mla_export_error.bin")
        if os.path.exists(out):
            os.unlink(out)
        r = subprocess.run([t.python, os.path.join(t.root, "export.py"), d, out] + list(options), capture_output=True,
                           text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        t.check(f"export.py refuses a DeepSeek config with {label}: one line `error: ...{want}...`, no file",
                r.returncode == 1 and lines and lines[-1].startswith("error: ") and want in lines[-1]
                and not os.path.exists(out), r.stderr.strip()[-300:])


def run(t):
    export_errors(t)
    models = {}
    for name, options in FIXTURES.items():
        src = t.shared_file(os.path.join("fixtures", name, "ref.json"), f"{name} fixture")
        if not src:
            continue
        src = os.path.dirname(src)
        model = models[name] = t.export(src, f"{name}.bin", *options)
        ids, want = check_fixture(t, name, model, src)
        cfg = json.load(open(os.path.join(src, "config.json")))
        st = SafeTensors(src)
        d5 = checkpoint_dir(t, f"{name}_t5", transformers5_config(cfg), {n: st.get(n) for n in st.names()})
        t.check(f"{name}: the transformers-5 config dialect (rope_parameters) exports the identical model file",
                same_file(model, t.export(d5, f"{name}_t5.bin", *options)))

        if name == "deepseek_v2":  # DeepSeek's own softmax scale: x mscale(40, 0.707)^2, which transformers 4.57.6 lacks
            deepseek = t.export(src, "deepseek_v2_deepseek_scale.bin")
            ratio = layer_scale(deepseek, 0) / layer_scale(model, 0)
            got = t.logits(deepseek, ids)
            t.check(f"deepseek_v2: the default export multiplies the softmax scale by mscale(40, 0.707)^2 = "
                    f"{yarn_mscale(40, 0.707) ** 2:.4f} (got {ratio:.4f}); position 0 (one key) is unchanged, later ones are not",
                    abs(ratio - yarn_mscale(40, 0.707) ** 2) < 1e-5 and relative_error(got[:1], want[:1]) <= 1e-5
                    and relative_error(got, want) > 1e-2)

    for name, options in OUR_FIXTURES.items():
        src = os.path.join(t.data, "fixtures", name)
        check_fixture(t, name, t.export(src, f"{name}.bin", *options), src)

    if "deepseek_v3" in models:
        model = models["deepseek_v3"]
        ref_ids = json.load(open(os.path.join(t.shared, "fixtures", "deepseek_v3", "ref.json")))["input_ids"]
        # the cache: one row of kv_rank + rope = 32 + 16 floats per position and layer, in blocks of 16 positions
        r = t.run([model, "--tokens", ",".join(map(str, ref_ids)), "-n", "0"])
        info = t.run([model, "--info"]).stdout.decode()
        t.check("deepseek_v3: the stats line counts the latent rows, 3 layers x 80 positions x 48 floats x 4 bytes = 46,080",
                r.returncode == 0 and kv_bytes(r.stderr) == 3 * 80 * 48 * 4, r.stderr.decode()[-200:])
        t.check("deepseek_v3: --info rows show the latent (32 + rope 16, 1/4.0 of MHA), 192 B per token, q.k / v widths",
                info.count("latent 32 + rope 16 (1/4.0 of MHA) q-rank 48") == 3 and info.count("   192 B  ") == 3
                and "4 (MLA)       32/16" in info and "MoE 2 of 8 x 32 (sigmoid, 2 of 4 groups) + shared 32" in info, info)
        # --attn-map: ordinary softmax weights of every head
        dump = t.tmp("mla_attn.f32")
        r = t.run([model, "--tokens", "5,6,7,8,9,10", "-n", "0", "--attn-dump", dump])
        w = np.fromfile(dump, dtype="<f4").reshape(3, 4, 6, 6) if r.returncode == 0 else np.zeros(1)
        t.check("deepseek_v3: --attn-dump records every MLA head's weights: causal rows that sum to 1",
                r.returncode == 0 and np.allclose(w.sum(-1), 1, atol=1e-5) and not np.triu(w, 1).any())
        r = t.run([model, "--tokens", "5,6", "--attn-map", t.tmp("mla.png"), "--mla", "expanded"])
        t.check("--attn-map with --mla expanded: one error line (the expanded form never materialises the weights)",
                r.returncode == 1 and b"needs the absorbed form" in r.stderr and r.stderr.count(b"\n") == 1)
        r = t.run([model, "--tokens", "5,6", "--mla", "folded"])
        t.check("--mla with an unknown form: one error line", r.returncode == 1 and b"'folded' is not a form" in r.stderr)
        r = t.run([os.path.join(t.root, "models", "kjv-5m.bin"), "--tokens", "5,6", "--mla", "absorbed"])
        t.check("--mla on a model without latent attention: one error line",
                r.returncode == 1 and b"no latent attention layer" in r.stderr)
        # --window on latent layers: a rolling buffer of latent rows, and the forms still agree
        a = t.logits(model, ref_ids, "--window", "all=16", "--mla", "absorbed")
        e = t.logits(model, ref_ids, "--window", "all=16", "--mla", "expanded", "--batch", "7")
        t.check("deepseek_v3 --window all=16: both forms slide alike (rolling latent rows)", relative_error(a, e) <= FORMS_AGREE)

    # a random-weight model from a config alone (the README's DeepSeek-V3 / Kimi K2 commands, at tiny widths)
    src = os.path.join(t.shared, "fixtures", "deepseek_v3", "config.json")
    if os.path.exists(src):
        out = t.tmp("random_v3.bin")
        r = subprocess.run([t.python, os.path.join(t.root, "tools", "random_model.py"), src, out, "--set",
                            "num_hidden_layers=2", "--dtype", "f32"], capture_output=True, timeout=300)
        info = t.run([out, "--info"]).stdout.decode()
        gen = t.run([out, "--tokens", "1,2,3", "-n", "4", "-t", "0"])
        t.check("tools/random_model.py: a deepseek_v3 config with 2 layers becomes a model whose --info shows its wiring "
                "and that generates", r.returncode == 0 and "deepseek_v3 (random)" in info and info.count("(MLA)") == 2
                and "(sigmoid, 2 of 4 groups) + shared 32" in info and gen.returncode == 0, info[-300:])
