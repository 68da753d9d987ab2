"""bench/llamacpp.py - attn.c and llama.cpp side by side on the same random weights (`make bench` with
LLAMA_BENCH=path/to/llama-bench; bench.py calls side_by_side()).

For each shape (stories110M's, Llama-3.2-1B's) a Hugging Face Llama checkpoint of seeded random weights is
written once (f32 safetensors, one tensor at a time), then exported twice per dtype: to an attn.c file by
export.py, and to a GGUF by llama.cpp's own gguf-py ($ATTN_SHARED/llamacpp/gguf-py, imported here at bench time,
never copied), which quantizes in Python as llama.cpp's converter does. So both engines run the same weights,
rounded the same way up to each format's own rule (q8_0 in both is max|w|/127 per group of 32).

Measured, alternating the two engines in every round (the order flips from round to round) so that a change in
the machine's load touches both alike; each ratio is taken within a round, and the median over rounds printed:
  - decode: tg N (llama-bench -p 0 -n N; ./run -n N from a one-token prompt, counting the N - 1 forward passes
    that follow the prompt's);
  - prefill of 512 tokens (llama-bench -p 512 -n 0; ./run --tokens <512 ids> -n 0);
  - long context, 110M shape: decode at positions 100 and 4,000 and prefill of a 4,000-token prompt
    (llama-batched-bench -npp 100,4000 -ntg 128 -npl 1, beside llama-bench, with and without -fa; ./run with
    a 100- or 4,000-token prompt and -n 128).
llama.cpp keeps its KV cache in f16 (its default), attn.c in f32 (its default), so the long-context table also
runs attn.c with --kv-type bf16 (as many bytes per position as llama.cpp's f16) and, alone, f32 weights with a
q8_0 cache.

Disk: the 1B shape takes about 20 GB under build/bench/llamacpp (the f32 source is deleted once every file has
been made); --shapes 110M keeps it to about 2 GB.
"""
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "build", "bench", "llamacpp")
RUN = os.path.join(ROOT, "run")
sys.path.insert(0, ROOT)
import export  # noqa: E402

# name: (dim, hidden, layers, heads, kv heads, vocab, rope theta)
SHAPES = {
    "110M": (768, 2048, 12, 12, 12, 32000, 10000.0),
    "1B": (2048, 8192, 16, 32, 8, 128256, 500000.0),
}
CONTEXT = 8192
# attn.c dtype: the GGUF type of the same weights
DTYPES = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# the weights


def tensor_shapes(shape):
    """The checkpoint's tensors in the order they are written: name -> shape (tied classifier)."""
    dim, hidden, layers, heads, kv_heads, vocab, _ = shape
    head_dim = dim // heads
    t = {"model.embed_tokens.weight": (vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (dim,)
        t[p + "self_attn.q_proj.weight"] = (heads * head_dim, dim)
        t[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, dim)
        t[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, dim)
        t[p + "self_attn.o_proj.weight"] = (dim, heads * head_dim)
        t[p + "post_attention_layernorm.weight"] = (dim,)
        t[p + "mlp.gate_proj.weight"] = (hidden, dim)
        t[p + "mlp.up_proj.weight"] = (hidden, dim)
        t[p + "mlp.down_proj.weight"] = (dim, hidden)
    t["model.norm.weight"] = (dim,)
    return t


def random_tensor(index, shape):
    """Seeded per tensor, so any one can be made without the others: norms near 1, matrices N(0, 0.02^2)."""
    rng = np.random.default_rng([20250220, index])
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype("<f4")
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= np.float32(0.02)
    return out


def write_checkpoint(directory, shape):
    """A Hugging Face Llama checkpoint (config.json, f32 model.safetensors), written one tensor at a time."""
    dim, hidden, layers, heads, kv_heads, vocab, theta = shape
    os.makedirs(directory, exist_ok=True)
    cfg = {"model_type": "llama", "hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
           "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-5, "rope_theta": theta,
           "tie_word_embeddings": True, "hidden_act": "silu"}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensor_shapes(shape), random_tensor)


def write_safetensors(path, tensors, make):
    """An f32 safetensors file of tensors {name: shape}, tensor i being make(i, shape), written one at a time."""
    header, offset = {}, 0
    for name, s in tensors.items():
        n = int(np.prod(s)) * 4
        header[name] = {"dtype": "F32", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for i, s in enumerate(tensors.values()):
            np.ascontiguousarray(make(i, s), dtype="<f4").tofile(f)
    os.replace(path + ".tmp", path)


def gguf_module():
    shared = os.environ.get("ATTN_SHARED", os.path.join(ROOT, "..", "shared"))
    path = os.path.join(shared, "llamacpp", "gguf-py")
    if not os.path.isdir(path):
        return None, f"no gguf-py at {path} (set ATTN_SHARED)"
    sys.path.insert(0, path)
    try:
        import sentencepiece  # noqa: F401  (gguf-py's vocabulary module imports it; writing needs none of it)
    except ImportError:
        sys.modules["sentencepiece"] = types.SimpleNamespace(SentencePieceProcessor=None)
    import gguf  # noqa: E402
    return gguf, None


def meta_rotary(w, heads):
    """llama.cpp's converter stores q and k with Meta's interleaved rotary pairs: the inverse of the
    permutation export.py undoes for llama2.c checkpoints."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf)
    return f"blk.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.weight"


def write_gguf(gguf, src, out, shape, type_name):
    """The checkpoint as a llama.cpp GGUF whose matrices are type_name (vectors f32), with a placeholder
    SentencePiece vocabulary of the right size (llama-bench feeds random ids)."""
    dim, hidden, layers, heads, kv_heads, vocab, theta = shape
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    st = export.SafeTensors(src)
    tmp = out + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"attn.c bench {os.path.basename(out)}")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(dim // heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type({"F32": 0, "BF16": 32, "Q8_0": 7, "Q4_0": 2}[type_name])
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = list(tensor_shapes(shape))

    def tensor(hf):
        arr = np.ascontiguousarray(st.get(hf))
        if ".q_proj." in hf:
            arr = meta_rotary(arr, heads)
        elif ".k_proj." in hf:
            arr = meta_rotary(arr, kv_heads)
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            return arr
        return gguf.quants.quantize(arr, qtype)

    for hf in names:
        s = st.shape(hf)
        if len(s) == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor_info(gguf_name(hf), s, np.dtype(np.float32), int(np.prod(s)) * 4)
        else:  # quantized: gguf-py takes the shape in bytes per row
            byte_shape = gguf.quants.quant_shape_to_byte_shape(s, qtype)
            w.add_tensor_info(gguf_name(hf), byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for hf in names:
        w.write_tensor_data(tensor(hf))
    w.close()
    os.replace(tmp, out)


def make_models(shape_name, dtypes, gguf):
    """{dtype: (attn.c file, gguf file)} for one shape, made once and kept (build/bench/llamacpp)."""
    shape = SHAPES[shape_name]
    src = os.path.join(WORK, f"src-{shape_name}")
    files = {d: (os.path.join(WORK, f"{shape_name}-{d}.bin"), os.path.join(WORK, f"{shape_name}-{d}.gguf"))
             for d in dtypes}
    exporter = os.path.getmtime(os.path.join(ROOT, "export.py"))
    for attn, _ in files.values():  # an attn.c file older than export.py may be in an older format
        if os.path.exists(attn) and os.path.getmtime(attn) < exporter:
            os.unlink(attn)
    missing = [d for d, (a, g) in files.items() if not (os.path.exists(a) and os.path.exists(g))]
    if not missing:
        return files
    if not os.path.exists(os.path.join(src, "model.safetensors")):
        log(f"bench: writing the random {shape_name} checkpoint")
        write_checkpoint(src, shape)
    for d in missing:
        attn, gg = files[d]
        if not os.path.exists(attn):
            log(f"bench: exporting {os.path.basename(attn)}")
            r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), src, attn, "--dtype", d],
                               stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"export.py --dtype {d} failed: {r.stderr.strip()[-300:]}")
        if not os.path.exists(gg):
            log(f"bench: writing {os.path.basename(gg)} with gguf-py")
            write_gguf(gguf, src, gg, shape, DTYPES[d])
    shutil.rmtree(src)  # every file is made: the f32 source is not needed again
    return files


def weight_bytes(path):
    """Bytes of weights one decode step reads from an attn.c file: every tensor, except the embedding table when
    a separate classifier exists (decode reads one row of it)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        sizes = {name: nbytes for _, name, _, _, _, nbytes in export.read_tensor_directory(data)}
    total = sum(sizes.values())
    return total - sizes["tok_embeddings"] if "output" in sizes else total


# ---------------------------------------------------------------------------------------------------------------
# running the two engines


def ids(n, vocab, seed):
    return ",".join(str(t) for t in np.random.default_rng(seed).integers(3, vocab, n))


def attn_stats(args, threads, profile=False):
    """./run's stats line: (prefill tok/s, decode tok/s over the forward passes after the prompt's, profile text)."""
    cmd = [RUN] + [str(a) for a in args] + ["--threads", str(threads)] + (["--profile"] if profile else [])
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    m = re.search(r"prefill \d+ tok ([\d.]+) tok/s \| decode (\d+) tok ([\d.]+) tok/s", r.stderr)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"./run {' '.join(cmd[1:3])} ... failed: {r.stderr.strip()[-300:]}")
    generated = int(m.group(2))
    # the first generated token comes from the prompt's logits: generated - 1 forward passes were timed
    decode = float(m.group(3)) * (generated - 1) / generated if generated > 1 else 0.0
    profile_text = r.stderr[r.stderr.find("profile:"):] if profile and "profile:" in r.stderr else ""
    return float(m.group(1)), decode, profile_text


def llama_bench(exe, model, threads, n_prompt, n_gen, flash=0):
    # -mmp 0: the weights read into memory first, as ./run faults its mapping in before it starts the clock
    cmd = [exe, "-m", model, "-t", str(threads), "-r", "1", "-p", str(n_prompt), "-n", str(n_gen), "-fa", str(flash),
           "-mmp", "0", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
    return float(json.loads(r.stdout)[0]["avg_ts"])


def llama_batched(exe, model, threads, prompts, n_gen, flash):
    """llama-batched-bench: {prompt length: (prefill tok/s, decode tok/s at that depth)}"""
    cmd = [exe, "-m", model, "-t", str(threads), "-c", str(max(prompts) + n_gen + 64), "-b", "2048", "-ub", "512",
           "-npp", ",".join(map(str, prompts)), "-ntg", str(n_gen), "-npl", "1", "--no-mmap"] + (["-fa"] if flash else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = {}
    for line in (r.stdout + r.stderr).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            out[int(cells[0])] = (float(cells[5]), float(cells[7]))
    if r.returncode != 0 or set(out) != set(prompts):
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
    return out


def side_by_side(llama_bench_exe, threads, runs, shapes, quick, bandwidth):
    """bandwidth(): the machine's read bandwidth now (bytes/s), measured before and after (the best is used)"""
    gguf, why = gguf_module()
    if gguf is None:
        print(f"\nllama.cpp side by side: skipped ({why})")
        return
    batched_exe = os.path.join(os.path.dirname(llama_bench_exe), "llama-batched-bench")
    have_batched = os.path.exists(batched_exe)
    dtypes = [d for d in DTYPES if d in export.DTYPES]
    os.makedirs(WORK, exist_ok=True)
    models = {name: make_models(name, dtypes, gguf) for name in shapes}

    # cases: key -> (attn.c arguments, which of its rates, llama.cpp call); decode lengths keep 1B f32 bearable
    cases = {}
    for name in shapes:
        vocab = SHAPES[name][5]
        n_gen = 16 if quick else (128 if name == "110M" else 32)
        for d, (attn, gg) in models[name].items():
            cases[name, d, "decode"] = ([attn, "--tokens", "1", "-n", n_gen + 1, "-t", "0"], 1,
                                        lambda gg=gg, n=n_gen: llama_bench(llama_bench_exe, gg, threads, 0, n))
            cases[name, d, "prefill 512"] = ([attn, "--tokens", ids(512, vocab, 1), "-n", 0], 0,
                                             lambda gg=gg: llama_bench(llama_bench_exe, gg, threads, 512, 0))
    long_cases = {}
    if "110M" in shapes:
        vocab = SHAPES["110M"][5]
        for d in ("f32", "q8_0"):
            attn, gg = models["110M"][d]
            long_cases[d] = {100: [attn, "--tokens", ids(100, vocab, 2), "-n", 129, "-t", "0"],
                             4000: [attn, "--tokens", ids(4000, vocab, 3), "-n", 129, "-t", "0"]}
        # the KV cache in bf16: as many bytes as llama.cpp's f16 cache (attn.c's default f32 reads twice as many);
        # and f32 weights with the cache in q8_0 (the goal: decode at 4,000 >= 0.75x its own rate at 100)
        for d, kv in (("f32", "bf16"), ("q8_0", "bf16"), ("f32", "q8_0")):
            long_cases[f"{d} + KV {kv}"] = {p: cmd + ["--kv-type", kv] for p, cmd in long_cases[d].items()}

    bandwidths = [bandwidth()]
    rates = {k: ([], []) for k in cases}
    long_rates = {(d, p): [] for d in long_cases for p in (100, 4000)}
    weights_of = lambda case: case.split(" + ")[0]  # noqa: E731 (llama.cpp runs the same weights, f16 KV)
    llama_long = {(d, fa): [] for d in long_cases if d in models.get("110M", {}) for fa in (0, 1)}
    profiles = {}
    for i in range(runs):
        for key, (cmd, field, llama) in cases.items():
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for who in order:
                if who == 0:
                    rates[key][0].append(attn_stats(cmd, threads)[field])
                else:
                    rates[key][1].append(llama())
        for d, cmds in long_cases.items():
            for p, cmd in cmds.items():
                pre, dec, _ = attn_stats(cmd, threads)
                long_rates[d, p].append((pre, dec))
            if have_batched and (d, 0) in llama_long:  # once per weights: its cache is f16 in every row
                for fa in (0, 1):
                    llama_long[d, fa].append(llama_batched(batched_exe, models["110M"][d][1], threads, [100, 4000], 128, fa))
        log(f"bench: llama.cpp side by side, round {i + 1} of {runs} done")
    for key, (cmd, field, _) in cases.items():
        profiles[key] = attn_stats(cmd, threads, profile=True)[2]
    bandwidths.append(bandwidth())
    best = max(bandwidths)

    med = lambda v: float(np.median(v))  # noqa: E731
    print(f"\n## attn.c vs llama.cpp (same random weights; {threads} threads; median of {runs} alternating rounds)\n")
    print(f"read bandwidth {best / 1e9:.1f} GB/s (best of before and after: "
          f"{' / '.join(f'{b / 1e9:.1f}' for b in bandwidths)}); decode roofline = bandwidth / bytes of weights\n")
    print("| shape | dtype | test | attn.c tok/s | llama.cpp tok/s | attn.c / llama.cpp | attn.c, llama.cpp % of roofline |")
    print("|---|---|---|---|---|---|---|")
    for (name, d, test), (a, l) in rates.items():
        ratio = med([x / y for x, y in zip(a, l)])
        roof = "-"
        if test == "decode":
            limit = best / weight_bytes(models[name][d][0])
            roof = f"{100 * med(a) / limit:.0f}%, {100 * med(l) / limit:.0f}% of {limit:.1f}"
        print(f"| {name} | {d} ({DTYPES[d]}) | {test} | {med(a):.1f} | {med(l):.1f} | {ratio:.2f}x | {roof} |")
    if long_cases:
        print("\nlong context, 110M shape (llama.cpp: llama-batched-bench, f16 KV cache, -fa 0 / -fa 1; attn.c: an f32 KV "
              "cache unless the row names another; + KV bf16 holds as many bytes as llama.cpp's f16):\n")
        print("| dtype | test | attn.c tok/s | llama.cpp | llama.cpp -fa | attn.c / llama.cpp | attn.c / llama.cpp -fa |")
        print("|---|---|---|---|---|---|---|")
        for d in long_cases:
            for test, p, field in (("decode at 100", 100, 1), ("decode at 4000", 4000, 1), ("prefill 4000", 4000, 0)):
                a = [r[field] for r in long_rates[d, p]]
                w = weights_of(d)
                if llama_long.get((w, 0)):
                    l0 = [r[p][field] for r in llama_long[w, 0]]
                    l1 = [r[p][field] for r in llama_long[w, 1]]
                    r0 = med([x / y for x, y in zip(a, l0)])
                    r1 = med([x / y for x, y in zip(a, l1)])
                    print(f"| {d} | {test} | {med(a):.1f} | {med(l0):.1f} | {med(l1):.1f} | {r0:.2f}x | {r1:.2f}x |")
                else:
                    print(f"| {d} | {test} | {med(a):.1f} | - | - | - | - |")
        print("\nattn.c's decode at 4000 against its own at 100 (median of the rounds' ratios): " + ", ".join(
            f"{d} {med([x[1] / y[1] for x, y in zip(long_rates[d, 4000], long_rates[d, 100])]):.2f}x" for d in long_cases))
        if not have_batched:
            print(f"\n(no {batched_exe}: build llama.cpp's llama-batched-bench for the llama.cpp columns)")
    print("\nwhere attn.c's time goes (./run --profile, one run of each case):\n")
    for key, text in profiles.items():
        print(f"{key[0]} {key[1]} {key[2]}:\n{text}")
