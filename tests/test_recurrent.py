"""Linear-time layers beside attention: each recurrent family of $ATTN_SHARED/fixtures (made with transformers
4.57.6) exported with export.py matches its reference logits at every position, token by token (the
recurrence) and with --batch (prefill chunks: the chunked scans where a kind has one), within its ref.json's
tolerance, and its greedy ids; the logits do not depend on --threads; a recurrent-only model keeps a state of
the same size after 10 tokens as after 1,000 and runs past its context; --info shows each layer's state;
the attention study options refuse layers without attention in one line."""
import json
import os
import re
import subprocess

import numpy as np

from harness import relative_error
from hostile_corpus import Layout, put
from test_families import check_family

FAMILIES = ["mamba", "mamba2", "rwkv", "granitemoehybrid", "qwen3_next"]
# variants made the same way (shared/hfref, --override; tests/data/fixtures/*/ref.json has the command): Granite
# with rope, dense (the shared MLP alone), 2 groups and projection biases; Mamba with projection biases and no
# convolution bias; Mamba-2 with dt limits, one group, biases and chunks of 16; Qwen3-Next with as many value as
# key heads and MoE on every other layer
VARIANTS = ["granite_rope_dense", "mamba_bias", "mamba2_limits", "qwen3_next_mha"]
RECURRENT_ONLY = {"mamba", "mamba2", "rwkv"}
CHUNKED = {"mamba2": 1e-5, "qwen3_next": 1e-4}  # prefill runs a chunked form, decode the recurrence: max difference
HYBRIDS = {"granitemoehybrid": ([0, 2, 3], "mamba2"), "qwen3_next": ([0, 1, 2], "gated_deltanet")}  # recurrent layers


def state_bytes(stderr):
    m = re.search(rb"state (\d+) bytes", stderr)
    return int(m.group(1)) if m else None


def constant_state(t, name, model, vocab):
    """The stats line's state bytes after 10 and after 1,000 tokens; the KV cache stays empty."""
    held = []
    for n in (10, 1000):
        ids = np.random.default_rng(n).integers(0, vocab, n)
        r = t.run([model, "--tokens", ",".join(map(str, ids)), "-n", "0", "--threads", "1"])
        held.append((state_bytes(r.stderr), b"kv 0 bytes" in r.stderr))
    t.check(f"{name}: the recurrent state holds the same bytes after 10 and 1,000 tokens, and no KV cache ({held})",
            held[0][0] and held[0] == held[1] and held[0][1])
    return held[0][0]


def info_rows(t, name, model, state):
    r = t.run([model, "--info"])
    out = r.stdout.decode(errors="replace")
    totals = re.findall(r"^\s+\d+k\s+([\d,]+) B .*?\s([\d,]+) B \(.*?\)\s+([\d,]+) B", out, re.M)
    t.check(f"{name} --info: a row per layer naming its mixer, its state constant at 1k .. 128k tokens",
            r.returncode == 0 and re.search(rf"^\s+0  {name} state", out, re.M) is not None and len(totals) == 4
            and all(int(s.replace(",", "")) == state for _, s, _ in totals), out)


def same_logits_any_threads(t, name, model, ids):
    a = t.logits(model, ids, "--batch", "80", "--threads", "1")
    b = t.logits(model, ids, "--batch", "80", "--threads", "2")
    t.check(f"{name}: logits bit-identical with 1 and 2 threads", np.array_equal(a, b))
    if name not in CHUNKED and name not in HYBRIDS:  # the same scan token by token in prefill and decode
        c = t.logits(model, ids, "--batch", "1")
        t.check(f"{name}: logits bit-identical with --batch 80 and --batch 1", np.array_equal(a, c))


def chunked_equals_recurrence(t, name, model, ids, tolerance):
    """Prefill in one chunk (the chunked scan) against token by token (the recurrence)."""
    err = relative_error(t.logits(model, ids, "--batch", "80"), t.logits(model, ids, "--batch", "1"))
    t.check(f"{name}: prefill in one chunk equals the token-by-token recurrence (max rel diff {err:.1e}, "
            f"tolerance {tolerance:g})", err <= tolerance)


def hybrid_study(t, name, model, recurrent_layers, kind):
    """--attn-map draws the attention layers and names the others; --window changes attention layers only."""
    png = t.tmp(f"{name}-map.png")
    r = t.run([model, "--tokens", "1,2,3,4,5", "-n", "0", "--attn-map", png])
    note = "note: --attn-map: layers " + ", ".join(f"{l} ({kind})" for l in recurrent_layers) + " have no attention"
    t.check(f"{name} --attn-map: draws the attention layers, says which layers have no weights", r.returncode == 0
            and os.path.exists(png) and note.encode() in r.stderr, r.stderr.decode(errors="replace"))
    r = t.run([model, "--tokens", "1,2,3", "-n", "0", "--window", f"{recurrent_layers[0]}=4"])
    e = r.stderr.decode(errors="replace")
    t.check(f"{name} --window on a {kind} layer: one error line", r.returncode == 1 and e.count("\n") == 1
            and f"layer {recurrent_layers[0]} is a {kind} layer" in e, e)
    r = t.run([model, "--info", "--window", "all=16"])
    out = r.stdout.decode(errors="replace")
    t.check(f"{name} --info --window all=16: the attention layers slide, the {kind} layers keep their state",
            r.returncode == 0 and "sliding 16 *" in out and all(re.search(rf"^\s+{l}  {kind} state", out, re.M)
                                                                for l in recurrent_layers), out)


def rolls_past_context(t, name, src):
    """With its context cut to 32 positions, a recurrent-only model generates past it: nothing grows."""
    d = t.tmp(f"{name}_context32")
    os.makedirs(d, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "config.json")))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(dict(cfg, max_position_embeddings=32), f)
    link = os.path.join(d, "model.safetensors")
    if not os.path.lexists(link):
        os.symlink(os.path.join(src, "model.safetensors"), link)
    model = t.export(d, f"{name}_context32.bin")
    r = t.run([model, "--tokens", ",".join(map(str, range(1, 41))), "-n", "60", "-t", "0", "--print-ids"])
    t.check(f"{name} with a context of 32: a 40-token prompt and 60 more tokens run past it (status 0, no note)",
            r.returncode == 0 and len(r.stdout.replace(b",", b" ").split()) == 60 and b"note" not in r.stderr, r.stderr.decode(errors="replace"))


# (seed, layer, field, value, the error it must give): recurrent records whose sizes disagree with each other or
# with the tensors
REFUSED = [
    ("mamba_biases_f32", 0, "mixer state", 5, "tensor 'layers.0.mamba.w_b' should have shape [5, 32]"),
    ("mamba_biases_f32", 1, "mixer conv", 65, "layer 1 mamba conv is 65 (must be 1 .. 64)"),
    ("granite_mamba2_hybrid_bf16", 0, "mixer n_groups", 3, "layer 0: 4 mamba2 heads do not split into 3 groups"),
    ("granite_mamba2_hybrid_bf16", 2, "mixer state", 1025, "layer 2 mamba2 state is 1025 (must be 1 .. 1024)"),
    ("granite_mamba2_hybrid_bf16", 0, "mixer dt_max", 0, "layer 0: mamba2 dt limits 0.001 .. 0 are not valid"),
    ("qwen3_next_deltanet_hybrid_q8_0", 0, "mixer n_v_heads", 3, "layer 0: 3 value heads do not share 2 key heads evenly"),
    ("qwen3_next_deltanet_hybrid_q8_0", 2, "mixer k_head_dim", 8,
     "tensor 'layers.2.deltanet.w_qkv' should have shape [32, 32]"),
    ("rwkv_layernorm_f16", 0, "mixer inner", 17, "tensor 'layers.0.rwkv.w_k' should have shape [17, 16]"),
    ("rwkv_layernorm_f16", 1, "ffn hidden_dim", 0, "layer 1 rwkv channel-mix hidden_dim is 0 (must be 1 .. 1048576)"),
]


def refused(t):
    for seed, layer, field, value, want in REFUSED:
        blob = open(os.path.join(t.root, "fuzz", "corpus", "model", seed + ".bin"), "rb").read()
        path = t.tmp(f"refused-{seed}.bin")
        with open(path, "wb") as f:
            f.write(put(blob, dict(Layout(blob).layers[layer]["fields"])[field], 4, value))
        r = t.run([path, "--tokens", "1,2,3", "-n", "1"])
        got = r.stderr.decode(errors="replace").strip()
        t.check(f"{seed}: layer {layer} {field} = {value}: refused with one line naming it", r.returncode == 1
                and got == f"error: {path}: {want}", got)


def export_refuses(t):
    """Configs that disagree with their checkpoint, or ask for what the layers cannot do: one line, no file."""
    src = os.path.join(t.data, "fixtures", "mamba_bias")
    cfg = json.load(open(os.path.join(src, "config.json")))
    cases = [("a state size the weights do not have", dict(cfg, state_size=8),
              "tensor 'backbone.layers.0.mixer.x_proj.weight' has shape [36, 128], config implies [20, 128]"),
             ("another activation", dict(cfg, hidden_act="gelu"), "hidden_act 'gelu' is not supported by mamba (silu)"),
             ("Mamba-2 dt limits upside down", dict(cfg, model_type="mamba2", num_heads=8, head_dim=16, time_step_limit=[1, 0]),
              "time_step_limit [1, 0] is not [min, max] with 0 <= min < max")]
    for i, (label, c, want) in enumerate(cases):
        d = t.tmp(f"recurrent_export_error{i}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f)
        link = os.path.join(d, "model.safetensors")
        if not os.path.lexists(link):
            os.symlink(os.path.join(src, "model.safetensors"), link)
        out = t.tmp(f"recurrent_export_error{i}.bin")
        if os.path.exists(out):
            os.unlink(out)
        r = subprocess.run([t.python, os.path.join(t.root, "export.py"), d, out], capture_output=True, text=True)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        t.check(f"export.py, {label}: one error line, no file", r.returncode == 1 and last.startswith("error: ")
                and want in last and not os.path.exists(out), last)


def run(t):
    refused(t)
    export_refuses(t)
    errors = {}
    for name in FAMILIES:
        ref = t.shared_file(os.path.join("fixtures", name, "ref.json"), f"{name} fixture")
        if not ref:
            continue
        src = os.path.dirname(ref)
        model = t.export(src, f"{name}.bin")
        errors[name] = check_family(t, name, model, src, batch_invariant=name not in CHUNKED and name not in HYBRIDS)
        ids = json.load(open(ref))["input_ids"]
        same_logits_any_threads(t, name, model, ids)
        if name in CHUNKED:
            chunked_equals_recurrence(t, name, model, ids, CHUNKED[name])
        if name in HYBRIDS:
            hybrid_study(t, name, model, *HYBRIDS[name])
        if name in RECURRENT_ONLY:
            rolls_past_context(t, name, src)
            state = constant_state(t, name, model, 256)
            info_rows(t, name, model, state)
            for flags in (("--window", "all=16"), ("--attn-map", t.tmp("x.png")), ("--sparse", "0=fixed:4")):
                r = t.run([model, "--tokens", "1,2,3", "-n", "1"] + list(flags))
                e = r.stderr.decode(errors="replace")
                t.check(f"{name} {flags[0]}: no attention layer, one error line", r.returncode == 1
                        and e.startswith("error: ") and e.count("\n") == 1 and "attention" in e, e.strip())
    for name in VARIANTS:
        src = os.path.join(t.data, "fixtures", name)
        errors[name] = check_family(t, name, t.export(src, f"{name}.bin"), src, batch_invariant=name == "mamba_bias")
    if errors:
        print("# max relative logit error per recurrent family: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
