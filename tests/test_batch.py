"""Many sequences on one paged KV cache (batch.c, kvcache.c). --samples N prints what N separate runs print
(seeds s .. s+N-1), for kjv-5m and for fixtures of every layer kind (sliding windows, chunks, learned sinks,
mixtures of experts, learned positions, latent attention), with any --threads and --batch, and holds the
prompt once.
--prompts FILE prints for each prompt what a run of it alone prints; prompts that share a prefix start from
its cached blocks, and their logits equal a cold run's bit for bit. Hostile arguments and files, a prompt
file of 10,000 lines and memory exhaustion end cleanly."""
import json
import os
import re
import resource
import subprocess
import xml.etree.ElementTree as ET

import numpy as np

from harness import tiny_llama_dir, write_safetensors
from hostile_corpus import Layout, put

KJV = "models/kjv-5m.bin"
KJV_PROMPT = ("And God said, Let there be light: and there was light. And God saw the light, that it was good: "
              "and God divided the light from the darkness.")
SAMPLE_FIXTURES = ["mistral_swa", "gemma2", "gpt2"]        # tests/data/fixtures
SAMPLE_FAMILIES = ["qwen3_moe", "llama4_text", "gpt_oss", "deepseek_v3",  # $ATTN_SHARED/fixtures
                   "mamba", "rwkv", "granitemoehybrid", "qwen3_next"]  # recurrent states, one per sequence
PROMPT_FIXTURES = ["mistral_swa", "gemma2", "llama4_text", "deepseek_v3", "mamba", "rwkv"]
# prefill of these runs a chunked form of its own (Mamba-2's SSD, the chunked delta rule): a prompt resumed from a
# cached prefix splits its chunks elsewhere than a cold run, so its logits match to rounding, not bit for bit
PROMPT_CHUNKED = {"granitemoehybrid": 1e-5, "qwen3_next": 1e-4}


def clean_error(r, *words):
    lines = r.stderr.decode("utf-8", "replace").splitlines()
    return (r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ")
            and all(w in lines[0] for w in words))


def stats(r):
    return r.stderr.decode("utf-8", "replace").strip().splitlines()[-1]


_singles = {}


def single(t, model, prompt_args, seed, n, *extra):
    """A separate run (each one once): its output, and the logits of its last prompt position."""
    key = (model, tuple(prompt_args), seed, n) + extra
    if key not in _singles:
        path = t.tmp("batch_single_logits.bin")
        r = t.run([model] + prompt_args + ["-n", n, "-t", "1", "-s", seed, "--logits", path] + list(extra))
        if r.returncode != 0:
            raise RuntimeError(f"./run failed: {r.stderr.decode(errors='replace').strip()}")
        n_prompt = int(re.search(r"prefill (\d+) tok", stats(r)).group(1))
        _singles[key] = r, np.fromfile(path, dtype="<f4").reshape(n_prompt, -1)[-1]
    return _singles[key][0]


def check_samples(t, name, model, prompt_args, n_samples=3, n=24, seed=11, variants=([],)):
    """--samples N --print-ids: line i is the ids a separate run with seed + i prints, for each variant of
    --threads / --batch; returns the separate runs' outputs."""
    want = [single(t, model, prompt_args, seed + i, n, "--print-ids").stdout.decode() for i in range(n_samples)]
    for extra in variants:
        r = t.run([model] + prompt_args + ["-n", n, "-t", "1", "-s", seed, "--samples", n_samples, "--print-ids"] + extra)
        got = r.stdout.decode().splitlines(keepends=True)
        t.check(f"{name}: --samples {n_samples} {' '.join(extra)} prints the ids of {n_samples} separate runs "
                f"(seeds {seed}..{seed + n_samples - 1})", r.returncode == 0 and got == want,
                f"got {got}, want {want}; {r.stderr.decode(errors='replace')[-200:]}")
    t.check(f"{name}: the samples differ from each other (each has its own seed)", len(set(want)) > 1)
    return want


def fixture_model(t, name):
    if name in SAMPLE_FIXTURES:
        src = os.path.join(t.data, "fixtures", name)
    else:
        ref = t.shared_file(os.path.join("fixtures", name, "ref.json"), f"{name} fixture")
        if not ref:
            return None, None
        src = os.path.dirname(ref)
    return t.export(src, f"{name}.bin"), json.load(open(os.path.join(src, "ref.json")))["input_ids"]


def check_prompts(t, name, model, lines, prompt_args_of, seed=5, n=16, variants=(["--parallel", "2"],), tol=None):
    """--prompts FILE: each prompt's ids equal a separate run's with seed + i; its last prompt position's logits
    equal a cold run's bit for bit (tol: within tol of the logit scale, and the ids are not compared); the shared
    prefixes are hits. Returns the stats line of the first variant."""
    path = t.tmp(f"batch_{name}_prompts.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    prompts = [l for l in lines if l.strip()]
    want = [single(t, model, prompt_args_of(p), seed + i, n, "--print-ids").stdout.decode() for i, p in enumerate(prompts)]
    cold = np.stack([_singles[(model, tuple(prompt_args_of(p)), seed + i, n, "--print-ids")][1] for i, p in enumerate(prompts)])
    first = None
    for extra in variants:
        logits_path = t.tmp(f"batch_{name}_logits.bin")
        r = t.run([model, "--prompts", path, "-n", n, "-t", "1", "-s", seed, "--print-ids", "--logits", logits_path] + extra)
        got = r.stdout.decode().splitlines(keepends=True)
        label = f"{name}: --prompts ({len(prompts)} prompts, {len(lines) - len(prompts)} blank lines) {' '.join(extra)}"
        logits = np.fromfile(logits_path, dtype="<f4") if r.returncode == 0 else np.zeros(0, "<f4")
        if tol is None:
            t.check(f"{label} prints each prompt's ids as a separate run with seed + i", r.returncode == 0 and got == want,
                    f"got {got}, want {want}; {r.stderr.decode(errors='replace')[-300:]}")
            t.check(f"{label}: each prompt's last logits equal a cold run's bit for bit (prefix hits included)",
                    logits.size == cold.size and np.array_equal(logits.reshape(cold.shape), cold))
        else:
            err = (float(np.abs(logits.reshape(cold.shape) - cold).max() / max(np.abs(cold).max(), 1.0))
                   if logits.size == cold.size else float("inf"))
            t.check(f"{label}: one block of ids per prompt, each prompt's last logits within {tol:g} of a cold run's "
                    f"(max {err:.2e} of the logit scale)", r.returncode == 0 and len(got) == len(want) and err <= tol,
                    r.stderr.decode(errors='replace')[-300:])
        first = first or stats(r)
    hits = re.search(r"prefix hits (\d+), (\d+) tok reused", first)
    t.check(f"{name}: prompts that share whole blocks reuse them ({hits.group(0) if hits else first})",
            hits is not None and int(hits.group(1)) > 0)
    return first


def big_kv_model(t):
    """A 1-layer Llama whose keys and values take 32 KB a position (16 heads of 256): memory runs out fast."""
    d = t.tmp("batch_big_kv")
    os.makedirs(d, exist_ok=True)
    dim, heads, head_dim, hidden, vocab = 64, 16, 256, 64, 64
    cfg = {"model_type": "llama", "hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": 1,
           "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim, "vocab_size": vocab,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    rng = np.random.default_rng(3)
    p, q = "model.layers.0.", heads * head_dim
    tensors = {"model.embed_tokens.weight": rng.standard_normal((vocab, dim)) * 0.1, "model.norm.weight": np.ones(dim),
               p + "input_layernorm.weight": np.ones(dim), p + "post_attention_layernorm.weight": np.ones(dim)}
    for n, shape in (("self_attn.q_proj", (q, dim)), ("self_attn.k_proj", (q, dim)), ("self_attn.v_proj", (q, dim)),
                     ("self_attn.o_proj", (dim, q)), ("mlp.gate_proj", (hidden, dim)), ("mlp.up_proj", (hidden, dim)),
                     ("mlp.down_proj", (dim, hidden))):
        tensors[p + n + ".weight"] = rng.standard_normal(shape) * 0.1
    write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    return t.export(d, "batch_big_kv.bin")


def run(t):
    kjv = os.path.join(t.root, KJV)
    prompt = ["-p", KJV_PROMPT]

    # --samples: kjv-5m (sliding 64 and full layers), as separate runs, whatever --threads and --batch
    want = check_samples(t, "kjv-5m", kjv, prompt, n_samples=4, n=48,
                         variants=([], ["--threads", "1", "--batch", "5"], ["--threads", "2", "--batch", "1"]))
    # the whole sampler chain: each sample's repeat penalty sees its prompt and its own tokens, as a separate run's
    check_samples(t, "kjv-5m, repeat penalty + top-k + min-p", kjv,
                  prompt + ["--repeat-penalty", "1.3", "--repeat-last-n", "40", "--top-k", "40", "--min-p", "0.05"],
                  n_samples=3, n=40)
    r = t.run([kjv] + prompt + ["-n", 48, "-t", "1", "-s", 11, "--samples", 4])
    text = "".join(f"--- sample {i} (seed {11 + i})\n" + single(t, kjv, prompt, 11 + i, 48).stdout.decode()
                   for i in range(4))
    t.check("kjv-5m: --samples 4 prints each sample's text as a labelled block, as its separate run prints it",
            r.returncode == 0 and r.stdout.decode() == text, r.stdout.decode()[:300])
    kv = re.search(r"kv (\d+) bytes, 4 separate runs (\d+) bytes", stats(r))
    alone = [int(re.search(r"kv (\d+) bytes", stats(single(t, kjv, prompt, 11 + i, 48))).group(1)) for i in range(4)]
    t.check(f"kjv-5m: the 4 samples hold their {len(KJV_PROMPT.split())}-word prompt once: less KV than 4 separate runs, "
            f"which hold what the stats line says ({stats(r).split('| kv ')[-1]}; runs alone: {alone})",
            kv is not None and int(kv.group(1)) < int(kv.group(2)) == sum(alone))
    svg = t.tmp("batch_kv_map.svg")
    r = t.run([kjv] + prompt + ["-n", 20, "-t", "1", "-s", 11, "--samples", 3, "--kv-map", svg])
    ok = r.returncode == 0 and os.path.exists(svg)
    if ok:
        root = ET.parse(svg).getroot()
        texts = [e.text or "" for e in root.iter("{http://www.w3.org/2000/svg}text")]
        held = re.search(r"kv (\d+) bytes, 3 separate runs (\d+) bytes", stats(r))
        ok = (held is not None and f"KV cache held: {int(held.group(1)):,} bytes; 3 separate runs would hold "
              f"{int(held.group(2)):,} bytes" in texts and texts.count("sample 2") == 2
              and any(x.startswith("layer 0: sliding 64") for x in texts) and any(x.startswith("layer 2: full") for x in texts))
    t.check("kjv-5m: --kv-map draws the samples' block tables (a sliding and a full layer) with the bytes of the stats line",
            ok, stats(r))
    r = t.run([kjv] + prompt + ["-n", 0, "--samples", 3])
    t.check("kjv-5m: --samples with -n 0 only prefills, prints nothing", r.returncode == 0 and r.stdout == b"")

    # --samples on fixtures of each layer kind
    for name in SAMPLE_FIXTURES + SAMPLE_FAMILIES:
        model, ids = fixture_model(t, name)
        if model:
            check_samples(t, name, model, ["--tokens", ",".join(map(str, ids[:40]))], variants=([], ["--batch", "1"]))

    # --prompts: a shared system prompt, blank lines, a repeated prompt, a prompt shorter than a block
    system = KJV_PROMPT + " And God called the light Day,"
    lines = [system + " and the darkness", "", system + " and the evening", "In the beginning", "   ",
             system + " and the darkness", KJV_PROMPT, system + " and the morning were the first day."]
    line = check_prompts(t, "kjv-5m", kjv, lines, lambda p: ["-p", p], variants=(["--parallel", "3"], ["--parallel", "1"],
                         ["--parallel", "2", "--threads", "1", "--batch", "7"]))
    r = t.run([kjv, "--prompts", "-", "-n", 16, "-t", "1", "-s", 5], input=open(t.tmp("batch_kjv-5m_prompts.txt"), "rb").read())
    blocks = re.findall(r"^--- prompt (\d+), line (\d+) \(seed (\d+)\)$", r.stdout.decode(), re.M)
    t.check("kjv-5m: --prompts - (standard input) labels each block with its prompt number, line and seed, in file order",
            blocks == [("0", "1", "5"), ("1", "3", "6"), ("2", "4", "7"), ("3", "6", "8"), ("4", "7", "9"), ("5", "8", "10")],
            str(blocks))
    for name in PROMPT_FIXTURES + list(PROMPT_CHUNKED):
        model, ids = fixture_model(t, name)
        if not model:
            continue
        shared, tails = ids[:36], [ids[40:44], ids[50:57], ids[60:61]]
        id_lines = [",".join(map(str, shared + tail)) for tail in tails] + [",".join(map(str, ids[:20])), "",
                                                                          ",".join(map(str, shared + tails[0]))]
        check_prompts(t, name, model, id_lines, lambda p: ["--tokens", p], tol=PROMPT_CHUNKED.get(name))

    # hostile arguments and prompt files
    tiny = t.export(tiny_llama_dir(t.tmp("batch_tiny"), 1024, [os.path.join(t.data, "tokenizers", "bytelevel_gpt2_style",
                                                                             "tokenizer.json")]), "batch_tiny.bin")
    empty, blank, nul = t.tmp("batch_empty.txt"), t.tmp("batch_blank.txt"), t.tmp("batch_nul.txt")
    open(empty, "w").close()
    open(blank, "w").write("\n  \n\r\n\t\n")
    open(nul, "wb").write(b"fine\nbad\x00line\n")
    long_line = t.tmp("batch_long_line.txt")
    open(long_line, "w").write("hello\n" + "a " * 5000 + "\n")
    cases = [(["--samples", "0"], "between 1 and 1024"), (["--samples", "1025"], "between 1 and 1024"),
             (["--samples", "x"], "integer"), (["--parallel", "4"], "needs --prompts"),
             (["--prompts", empty, "--parallel", "0"], "between 1 and 1024"),
             (["--prompts", empty, "--parallel", "1025"], "between 1 and 1024"),
             (["--prompts", t.tmp("no_such_file.txt")], "cannot read"), (["--prompts", empty], "no prompts"),
             (["--prompts", blank], "no prompts"), (["--prompts", nul], "line 2 contains a NUL byte"),
             (["--prompts", long_line], "line 2 has"), (["--prompts", t.build], "cannot read"),
             (["--prompts", empty, "-p", "hi"], "drop -p"), (["--samples", "2", "--prompts", empty], "not both"),
             (["--samples", "2", "--ppl"], "drop --samples"), (["--kv-map", "x.svg"], "--samples N"),
             (["--samples", "2", "-p", "hi", "-n", "2", "--kv-map", t.tmp("no_such_dir/x.svg")], "cannot write --kv-map")]
    for args, words in cases:
        r = t.run([tiny] + args)
        t.check(f"hostile: {' '.join(os.path.basename(a) for a in args)} -> one error line mentioning '{words}'",
                clean_error(r, words), r.stderr.decode(errors="replace")[-200:])
    # a NaN weight (f32 tiny model): prefill and batched decode both stop with run.c's line naming the tensor
    blob = open(tiny, "rb").read()
    off = next(o for _, name, o, _ in Layout(blob).tensors if name == "layers.0.ffn.w_up")
    nan = t.tmp("batch_nan.bin")
    open(nan, "wb").write(put(blob, off + 4 * 7, 4, 0x7FC00000))
    nan_prompts = t.tmp("batch_nan_prompts.txt")
    open(nan_prompts, "w").write("hello\n")
    for args in (["--samples", "2", "-p", "hello", "-n", "3"], ["--prompts", nan_prompts, "-n", "3"]):
        r = t.run([nan] + args)
        t.check(f"hostile: a NaN weight with {args[0]}: one error line naming the tensor",
                clean_error(r, "not finite", "layers.0.ffn.w_up"), r.stderr.decode(errors="replace")[-200:])
    # a NaN in the embedding of the first token the samples generate (llama_gqa: its classifier is not the
    # embedding table): the prompt is fine, the decode step is not
    src = os.path.join(t.data, "fixtures", "llama_gqa")
    gqa, dim = t.export(src, "llama_gqa.bin"), json.load(open(os.path.join(src, "config.json")))["hidden_size"]
    first = int(t.run([gqa, "--tokens", "5,6", "-n", 1, "-t", 0, "--print-ids"]).stdout.split()[0])
    blob = open(gqa, "rb").read()
    off = next(o for _, name, o, _ in Layout(blob).tensors if name == "tok_embeddings")
    open(nan, "wb").write(put(blob, off + 4 * dim * first, 4, 0x7FC00000))
    r = t.run([nan, "--tokens", "5,6", "-n", 3, "-t", 0, "--samples", 2])
    t.check("hostile: a NaN met in a batched decode step: one error line naming its position and the tensor",
            clean_error(r, "the logits at position 2 are not finite", "tok_embeddings"), r.stderr.decode(errors="replace")[-200:])
    ids_model = big_kv_model(t)
    bad_ids = t.tmp("batch_bad_ids.txt")
    open(bad_ids, "w").write("1,2,3\n1,2,x\n")
    r = t.run([ids_model, "--prompts", bad_ids])
    t.check("hostile: a model without a tokenizer reads ids; a line that is not ids -> one error line naming it",
            clean_error(r, "line 2", "comma-separated ids"))

    # 10,000 lines: every tenth blank, the rest sharing a prefix of several blocks
    many = t.tmp("batch_10000.txt")
    head = "You are a careful assistant who answers in one word. Question number "
    with open(many, "w") as f:
        f.write("".join("\n" if i % 10 == 9 else f"{head}{i}?\n" for i in range(10000)))
    r = t.run([tiny, "--prompts", many, "-n", 2, "-t", "1", "-s", 1, "--parallel", 64, "--print-ids"], timeout=600)
    out = r.stdout.decode().splitlines()
    hits = re.search(r"prefix hits (\d+)", stats(r)) if r.returncode == 0 else None
    t.check(f"hostile: a prompt file of 10,000 lines (9,000 prompts, 1,000 blank) runs to the end, one line of ids "
            f"per prompt, each prompt after the first a prefix hit ({stats(r)})",
            r.returncode == 0 and len(out) == 9000 and hits is not None and int(hits.group(1)) == 8999)
    for i in (0, 4321, 8999):
        n = i + i // 9
        alone = single(t, tiny, ["-p", f"{head}{n}?"], 1 + i, 2, "--print-ids").stdout.decode().strip()
        t.check(f"hostile: 10,000 lines: prompt {i} (line {n + 1}) prints what its separate run prints",
                len(out) == 9000 and out[i] == alone, f"{out[i] if len(out) > i else None} vs {alone}")

    # memory exhaustion: 1024 samples of a model whose every position takes 32 KB, in 512 MB of address space
    if os.environ.get("ATTN_RUN"):
        t.skip("memory exhaustion", "sanitizer builds reserve more address space than the limit allows")
    else:
        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (1 << 29, 1 << 29))
        r = subprocess.run([t.run_bin, ids_model, "--tokens", "1,2,3", "--samples", "1024", "-n", "200", "--threads", "2"],
                           capture_output=True, timeout=120, preexec_fn=limit)
        t.check("hostile: memory exhaustion (1024 samples, 32 KB a position, 512 MB of address space) -> one error line",
                clean_error(r, "out of memory"), r.stderr.decode(errors="replace")[-300:])
