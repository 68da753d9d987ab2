"""Hostile inputs: a corpus of mutated model files, bad command lines, invalid UTF-8 prompts, and
generation at the end of the context.

Every run must end with status 0, or with status 1 and exactly one line on stderr that starts with
`error: ` -- never a signal, a hang, a sanitizer report or a traceback."""
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from harness import ids_of, tiny_llama_dir
from study_support import kv_bytes
from hostile_corpus import Layout, mutants, put, semantic_mutants

RUN_TIMEOUT = 10  # seconds per run of a mutant; a healthy one takes milliseconds


def clean_error(r):
    """Status 1 and one line `error: ...` on stderr."""
    lines = r.stderr.decode("utf-8", "replace").splitlines()
    return r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ")


def tiny_model(t, name, **cfg):
    """A 1-layer Llama with the GPT-2-style byte-level tokenizer (1024 tokens)."""
    tok = os.path.join(t.data, "tokenizers", "bytelevel_gpt2_style", "tokenizer.json")
    return t.export(tiny_llama_dir(t.tmp(name), 1024, [tok], **cfg), f"{name}.bin")


# ---------------------------------------------------------------------------------------------------------
# the corpus

# what some mutations must be told, the first prefix that matches (the rest need only fail cleanly)
EXPECTED = [("magic b'GGUF'", ["a GGUF file", "export.py"]), ("magic", ["bad magic"]), ("version", ["version"]),
            ("truncated at", ["header says", "too short"]),
            ("offset 18446744073709551552", ["extends past end of file"]),
            ("tokenizer byte piece b'<0x-1>'", ["not of the form <0xNN>"]),
            ("tokenizer step 0 regex b'(?<=a)'", ["lookbehind"]), ("tokenizer step 7 regex b'(a)\\\\1'", ["backreference"]),
            ("chat template: recursive macro", ["recurses more than"]), ("chat template: nested huge loops", ["more than"]),
            ("chat template: raise_exception", ["raised an error: refused"]), ("chat template not UTF-8", ["not UTF-8"]),
            ("chat variable 0 name not an identifier", ["not an identifier"])]


# run on every base, whatever fraction of its other mutants runs
ALWAYS = ("tokenizer flags ^", "tokenizer piece", "tokenizer step", "tokenizer n_steps", "header", "magic", "version",
          "config", "layer 0 mixer_kind", "layer 0 ffn_kind", "layer 0 mixer_size", "layer 0 ffn_size", "layer 0 record_size",
          "chat")


def run_mutant(t, path, data, args):
    with open(path, "wb") as f:
        f.write(data)
    start = time.time()
    try:
        r = t.run([path] + args, timeout=RUN_TIMEOUT)
    except Exception as e:  # subprocess.TimeoutExpired: the run hung
        return None, time.time() - start, str(e)
    finally:
        os.unlink(path)
    return r, time.time() - start, ""


def corpus(t):
    tiny = tiny_model(t, "hostile_tiny")
    bases = [  # (model, fraction of its mutants to run, prompt arguments)
        (tiny, 1.0, ["-p", "Hello, world! 123"]),
        (t.export(os.path.join(t.data, "fixtures", "gpt2"), "gpt2.bin"), 0.12, ["--tokens", "1,2,3"]),
        (t.export(os.path.join(t.data, "fixtures", "qwen3_mixed"), "qwen3_mixed.bin"), 0.12, ["--tokens", "1,2,3"]),
        (t.export(os.path.join(t.data, "fixtures", "llama_mha_rope31"), "llama_mha_rope31.bin"), 0.12,
         ["--tokens", "1,2,3"]),
        # q8_0 weights: int8 groups with f16 scales, quantized activations; q4_0: 4-bit pairs of groups (the
        # matrices whose columns do not fill them fall back to q8_0 or f32)
        (t.export(os.path.join(t.data, "fixtures", "qwen3_mixed"), "qwen3_mixed-q8_0.bin", "--dtype", "q8_0"), 0.12,
         ["--tokens", "1,2,3"]),
        (os.path.join(t.root, "fuzz", "corpus", "model", "llama_q4_0.bin"), 0.2, ["--tokens", "1,2,3"]),
        # SentencePiece-style records (fuzz seeds): merged by score, and by rank with Metaspace; one prompt
        # is a single stretch, the other is cut by a user-defined token
        (os.path.join(t.root, "fuzz", "corpus", "model", "llama_sentencepiece_tokenizer_f32.bin"), 0.35,
         ["-p", "  the and th\xc3\xa9 \xe4\xb8\xad \xff x  "]),
        (os.path.join(t.root, "fuzz", "corpus", "model", "llama_metaspace_tokenizer_f32.bin"), 0.35,
         ["-p", "  the and th\xc3\xa9 <|user|> \xe4\xb8\xad \xff x  "]),
        # layer kinds (fuzz seeds): mixtures of experts (every router, grouped, biases, shared, q8_0 stacks),
        # learned sinks, chunked and NoPE layers, post-norms only, q/k norm over the whole projection
        (os.path.join(t.root, "fuzz", "corpus", "model", "gpt_oss_moe_sinks_f32.bin"), 0.35, ["--tokens", "1,2,3"]),
        (os.path.join(t.root, "fuzz", "corpus", "model", "llama4_chunked_moe_q8_0.bin"), 0.35, ["--tokens", "1,2,3,4,5,6"]),
        (os.path.join(t.root, "fuzz", "corpus", "model", "olmo_post_norms_bf16.bin"), 0.35, ["--tokens", "1,2,3"]),
        # a pre-tokenizer of regex Split steps (pretokenizer 5); the prompt has letters, digits, CJK, marks, spaces
        (os.path.join(t.root, "fuzz", "corpus", "model", "llama_split_steps_tokenizer_f32.bin"), 0.25,
         ["-p", "Hello World's 12345 x\n \xe4\xb8\xad\xe6\x96\x87 e\xcc\x81!! aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab  \xff"]),
        # latent attention (DeepSeek's MLA): with and without the low-rank query, DeepSeek's routers
        (os.path.join(t.root, "fuzz", "corpus", "model", "deepseek_latent_attention_f32.bin"), 0.35,
         ["--tokens", "1,2,3,4,5"]),
        # recurrent mixers (fuzz seeds): a state instead of a KV cache
        (os.path.join(t.root, "fuzz", "corpus", "model", "mamba_biases_f32.bin"), 0.2, ["--tokens", "1,2,3"]),
        (os.path.join(t.root, "fuzz", "corpus", "model", "granite_mamba2_hybrid_bf16.bin"), 0.2,
         ["--tokens", "1,2,3,4,5"]),
        (os.path.join(t.root, "fuzz", "corpus", "model", "qwen3_next_deltanet_hybrid_q8_0.bin"), 0.2,
         ["--tokens", "1,2,3,4,5"]),
        (os.path.join(t.root, "fuzz", "corpus", "model", "rwkv_layernorm_f16.bin"), 0.2, ["--tokens", "1,2,3"]),
        # a chat section (docs/CHAT.md): every mutant renders a conversation through its template
        (os.path.join(t.root, "fuzz", "corpus", "model", "llama_chat_template_bf16.bin"), 0.12,
         ["--chat", "--system", "Be brief.", "-p", "Hello, world!"]),
    ]
    jobs, must = [], {}  # must: label -> None (runs) or the words one of which its error holds (semantic cases)
    for b, (model, keep, prompt) in enumerate(bases):
        blob = open(model, "rb").read()
        name = os.path.basename(model)
        args = prompt + ["-n", "4", "-t", "0.9", "-s", "7", "--threads", "1"]
        for label, data in mutants(blob, np.random.default_rng(1000 + b), keep, ALWAYS):
            jobs.append((f"{name}: {label}", data, args))
        for label, data, words in semantic_mutants(blob):
            jobs.append((f"{name}: {label}", data, args))
            must[f"{name}: {label}"] = words
    os.makedirs(t.tmp("corpus"), exist_ok=True)
    workers = max(2, min(8, os.cpu_count() or 2))
    start = time.time()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda ij: run_mutant(t, t.tmp(f"corpus/m{ij[0]}.bin"), ij[1][1], ij[1][2]),
                                enumerate(jobs)))
    exit0 = exit1 = 0
    bad, unexpected = [], []
    slowest = 0.0
    for (label, _, _), (r, secs, why) in zip(jobs, results):
        slowest = max(slowest, secs)
        if r is None:
            bad.append(f"{label}: no exit within {RUN_TIMEOUT}s ({why})")
        elif label in must and (r.returncode == 0) != (must[label] is None):
            unexpected.append(f"{label}: status {r.returncode} ({r.stderr.decode('utf-8', 'replace').strip()[:200]})"
                              f", expected {'status 0' if must[label] is None else 'an error'}")
        elif r.returncode == 0:
            exit0 += 1
        elif clean_error(r):
            exit1 += 1
            msg = r.stderr.decode("utf-8", "replace")
            expected = [w for w in [next((w for prefix, w in EXPECTED if label.split(": ", 1)[1].startswith(prefix)), None),
                                    must.get(label)] if w]  # the first EXPECTED prefix that matches, and a semantic case's
            for want in expected:
                if not any(w in msg for w in want):
                    unexpected.append(f"{label}: {msg.strip()} (expected {' or '.join(want)})")
        else:
            sig = f"signal {-r.returncode}" if r.returncode < 0 else f"status {r.returncode}"
            tail = r.stderr.decode("utf-8", "replace").strip().splitlines()
            bad.append(f"{label}: {sig}: {tail[:3]}")
    summary = (f"{len(jobs)} mutants of {len(bases)} models: {exit0} exited 0, {exit1} exited 1 with one error line, "
               f"{len(bad)} otherwise; slowest {slowest:.2f}s; {time.time() - start:.0f}s in all")
    print(f"# corpus: {summary}")
    t.check(f"corpus: at least 1000 mutated model files", len(jobs) >= 1000, f"{len(jobs)}")
    t.check(f"corpus: {len(must)} semantic cases among them (aliased tensors, unclaimed bytes, non-finite rope tables "
            "and weights, windows over the whole context)", len(must) >= 7 * 10, f"{len(must)}")
    t.check("corpus: every mutant exits 0, or 1 with one line `error: ...` (no signal, no hang)", not bad,
            "; ".join(bad[:5]))
    t.check("corpus: the rejections name what is wrong", not unexpected, "; ".join(unexpected[:5]))
    t.check("corpus: mutants of the weights alone still run", exit0 > 0)


def targeted_errors(t):
    """A few hand-made broken files and the exact words of their errors."""
    tiny = tiny_model(t, "hostile_tiny")
    blob = open(tiny, "rb").read()
    L = Layout(blob)
    rec, name, off, nbytes = next(x for x in L.tensors if x[1] == "layers.0.attn.wq")
    fields = dict(L.layers[0]["fields"])
    end = (len(blob) + 63) // 64 * 64
    cases = [
        ("tensor past the end of the file", put(blob, rec + 104, 8, end),
         f"tensor 'layers.0.attn.wq' extends past end of file (offset {end}, size {nbytes}, file {len(blob)})"),
        ("nbytes disagreeing with the shape", put(blob, rec + 112, 8, nbytes + 4),
         f"tensor 'layers.0.attn.wq' has {nbytes + 4} bytes, its shape and dtype need {nbytes}"),
        ("context_length of 16M positions", put(blob, L.config_off + 40, 4, (1 << 24) + 1),
         "config context_length is 16777217 (must be 1 .. 16777216)"),
        ("n_heads not divisible by n_kv_heads", put(blob, fields["mixer n_kv_heads"], 4, 3),
         "layer 0 n_kv_heads is 3 (must be 1 .. 2)"),
        ("NaN norm_eps", put(blob, L.config_off + 48, 4, 0x7FC00000), "config norm_eps nan is not in (0, 1)"),
        ("a mixer kind this build does not know", put(blob, fields["mixer_kind"], 4, 9),
         "layer 0: mixer kind 9 is not one this build knows (1 = attention, 2 = latent attention, 3 = mamba, 4 = mamba2, "
         "5 = gated_deltanet, 6 = rwkv); a newer attn.c may read it"),
        ("an FFN kind this build does not know", put(blob, fields["ffn_kind"], 4, 9),
         "layer 0: FFN kind 9 is not one this build knows (0 .. 4); a newer attn.c may read it"),
        ("an attention record of the wrong size", put(blob, fields["mixer_size"], 4, 60),
         "layer 0: attention record is 60 bytes, this build reads 56"),
        ("a version 1 file", put(blob, 4, 4, 1), "file format version 1, this build reads version 2 (re-export it with export.py)"),
        ("tokenizer merge outside the vocabulary", put(blob, L.tok["merges"], 4, 5000),
         "tokenizer merge 0 refers to token 5000 outside the vocabulary"),
        ("a tensor name with a newline and an escape",
         put(blob[:rec] + b"\x1b]0;x\n".ljust(80, b"\0") + blob[rec + 80:], rec + 80, 4, 7),
         "tensor '?]0;x?' has unknown dtype 7"),
    ]
    # SentencePiece-style: an empty "byte piece" (decoding it read the byte before the table), and ByteLevel's
    # prefix space in a record whose text is written with "▁" (encoding overflowed its stretch buffer)
    sp = open(os.path.join(t.root, "fuzz", "corpus", "model", "llama_sentencepiece_tokenizer_f32.bin"), "rb").read()
    S = Layout(sp)
    q, n = S.tok["pieces"][3]
    end = S.tok_off + S.tok_size
    emptied = put(sp[:q] + bytes(4) + sp[q + 4 + n:end] + bytes(n) + sp[end:], 56, 8, S.tok_size - n)
    flags = int.from_bytes(sp[S.tok["flags"]:S.tok["flags"] + 4], "little")
    cases += [
        ("an empty <0xNN> byte piece", emptied, "tokenizer byte piece 3 is not of the form <0xNN>"),
        ("ByteLevel's prefix space in a SentencePiece record", put(sp, S.tok["flags"], 4, flags | 16),
         "tokenizer adds ByteLevel's prefix space but is not byte-level"),
    ]
    # latent attention: ranks and widths that do not fit together
    mla = open(os.path.join(t.root, "fuzz", "corpus", "model", "deepseek_latent_attention_f32.bin"), "rb").read()
    M = Layout(mla)
    f0, f1 = dict(M.layers[0]["fields"]), dict(M.layers[1]["fields"])
    cases += [
        ("a low-rank query flag without a q_rank", put(mla, f0["mixer q_rank"], 4, 0),
         "layer 0: latent attention flags 0x10 do not match its q_rank 0"),
        ("a q_rank without the low-rank query flag", put(mla, f1["mixer q_rank"], 4, 8),
         "layer 1: latent attention flags 0x0 do not match its q_rank 8"),
        ("an odd rotary width", put(mla, f0["mixer rope_dim"], 4, 5), "layer 0: rope_dim 5 is odd"),
        ("a kv_rank the tensors do not have", put(mla, f0["mixer kv_rank"], 4, 9),
         "tensor 'layers.0.mla.wkv_a' should have shape [13, 16]"),
        ("a kv_rank past the limit", put(mla, f0["mixer kv_rank"], 4, 4097), "layer 0 kv_rank is 4097 (must be 1 .. 4096)"),
        ("no key dimensions without positions", put(mla, f0["mixer nope_dim"], 4, 0), "layer 0 nope_dim is 0 (must be 1 .. 1024)"),
        ("a latent attention record of the wrong size", put(mla, f0["mixer_size"], 4, 44),
         "layer 0: latent attention record is 44 bytes, this build reads 48"),
        ("a latent norm epsilon of 0", put(mla, f0["mixer norm_eps"], 4, 0),
         "layer 0: attn_scale 0.459619 / latent norm_eps 0 is not valid"),
    ]
    path = t.tmp("targeted.bin")
    for label, data, want in cases:
        with open(path, "wb") as f:
            f.write(data)
        r = t.run([path, "-p", "hi", "-n", "2"])
        got = r.stderr.decode("utf-8", "replace").strip()
        t.check(f"broken file, {label}: `error: FILE: {want}`", clean_error(r) and got == f"error: {path}: {want}",
                f"status {r.returncode}: {got[:200]}")
    with open(path, "wb") as f:
        f.write(blob[:L.config_off] + b"\x1b]0;owned\x07\nllama".ljust(32, b"\0") + blob[L.config_off + 32:])
    r = t.run([path, "--info"])
    t.check("--info of a file whose family holds control characters prints none of them",
            r.returncode == 0 and b"?]0;owned??llama" in r.stdout and not any(b in r.stdout for b in b"\x1b\x07"),
            r.stdout.decode("utf-8", "replace")[:200])
    r = t.run([t.tmp("no-such-model.bin"), "-p", "hi"])
    t.check("a missing model file is one error line", clean_error(r) and "cannot open" in r.stderr.decode())
    r = t.run([t.build, "-p", "hi"])
    t.check("a directory as the model is one error line", clean_error(r) and "not a regular file" in r.stderr.decode())
    open(path, "wb").close()
    r = t.run([path, "-p", "hi"])
    t.check("an empty model file is one error line", clean_error(r) and "too short" in r.stderr.decode())


# ---------------------------------------------------------------------------------------------------------
# the command line


def cli_errors(t):
    model = tiny_model(t, "hostile_tiny")
    short = tiny_model(t, "hostile_ctx32", max_position_embeddings=32)
    nul_file = t.tmp("prompt-with-nul.txt")
    with open(nul_file, "wb") as f:
        f.write(b"In the\0 beginning")
    cases = [
        ("no model", [], "no model file given"),
        ("unknown option", [model, "--bogus"], "unknown option '--bogus'"),
        ("unknown short option", [model, "-x", "1"], "unknown option '-x'"),
        ("two model files", [model, model], "unexpected argument"),
        ("-n without a value", [model, "-n"], "-n needs a value"),
        ("-p without a value", [model, "-p"], "-p needs a value"),
        ("--tokens without a value", [model, "--tokens"], "--tokens needs a value"),
        ("-n not a number", [model, "-n", "ten"], "-n expects an integer"),
        ("-n with trailing junk", [model, "-n", "10x"], "-n expects an integer"),
        ("-n empty", [model, "-n", ""], "-n expects an integer"),
        ("-n negative", [model, "-n", "-1"], "-n must be between 0 and"),
        ("-n absurd", [model, "-n", "99999999999"], "-n must be between 0 and"),
        ("-n past long", [model, "-n", "99999999999999999999999"], "-n expects an integer"),
        ("-t not a number", [model, "-t", "hot"], "-t expects a number"),
        ("-t negative", [model, "-t", "-0.5"], "-t must be between 0 and 100"),
        ("-t absurd", [model, "-t", "1e9"], "-t must be between 0 and 100"),
        ("-t tiny", [model, "-t", "1e-30"], "-t must be 0 (greedy) or at least 0.001"),
        ("-t NaN", [model, "-t", "nan"], "-t expects a number"),
        ("-t infinite", [model, "-t", "inf"], "-t expects a number"),
        ("--top-p above 1", [model, "--top-p", "1.5"], "--top-p must be between 0 and 1"),
        ("--top-p negative", [model, "--top-p", "-0.1"], "--top-p must be between 0 and 1"),
        ("--top-p zero", [model, "--top-p", "0"], "--top-p must be in (0, 1]"),
        ("--top-p not a number", [model, "--top-p", "most"], "--top-p expects a number"),
        ("-s negative", [model, "-s", "-3"], "-s must be between 0 and"),
        ("--threads zero", [model, "--threads", "0"], "--threads must be between 1 and 1024"),
        ("--threads absurd", [model, "--threads", "100000"], "--threads must be between 1 and 1024"),
        ("--threads not a number", [model, "--threads", "all"], "--threads expects an integer"),
        ("--batch zero", [model, "--batch", "0"], "--batch must be between 1 and 4096"),
        ("--batch absurd", [model, "--batch", "1000000"], "--batch must be between 1 and 4096"),
        ("-p and --tokens together", [model, "-p", "x", "--tokens", "1"], "give the prompt as one of"),
        ("-f of a missing file", [model, "-f", t.tmp("no-such-prompt.txt")], "cannot read -f file"),
        ("-f of a directory", [model, "-f", t.build], "cannot read -f file"),
        ("-f of a file with a NUL byte", [model, "-f", nul_file], "contains a NUL byte"),
        ("--window not a number", [model, "--window", "wide"], "--window: 'wide' is not a window size"),
        ("--window past the limit", [model, "--window", "99999999999"], "is not a window size"),
        ("--window of a layer the model lacks", [model, "--window", "7=16"], "'7' is not a layer"),
        ("--sparse not a pattern", [model, "--sparse", "diagonal:4"], "is not a pattern"),
        ("--sinks negative", [model, "--sinks", "-1"], "--sinks must be between 0 and"),
        ("--attn unknown kernel", [model, "--attn", "magic", "-p", "x"], "'magic' is not a kernel"),
        ("--attn-map-layer without a map", [model, "--attn-map-layer", "0"], "needs --attn-map"),
        ("--ppl of one token", [model, "--ppl", "--tokens", "5"], "--ppl needs a prompt of at least 2 tokens"),
        ("--tokens id = vocabulary size", [model, "--tokens", "5,1024"], "id 1024 is outside the vocabulary (0 .. 1023)"),
        ("--tokens negative id", [model, "--tokens", "-1"], "id -1 is outside the vocabulary"),
        ("--tokens huge id", [model, "--tokens", "99999999999999999999"], "--tokens expects token ids separated by commas or spaces"),
        ("--tokens not numbers", [model, "--tokens", "1,two,3"], "--tokens expects token ids separated by commas or spaces"),
        ("--tokens empty item", [model, "--tokens", "1,,3"], "an empty item between two commas"),
        ("--tokens trailing comma", [model, "--tokens", "1,2,"], "trailing comma"),
        ("--tokens empty", [model, "--tokens", ""], "no ids given"),
        ("--decode id outside the vocabulary", [model, "--decode", "3,1024"], "--decode: id 1024 is outside the vocabulary"),
        ("--decode not numbers", [model, "--decode", "x"], "--decode expects token ids separated by commas or spaces"),
        ("--tokens glued sign", [model, "--tokens", "1-2"], "--tokens expects token ids separated by commas or spaces"),
        ("prompt longer than the context (text)", [short, "-p", "word " * 40], "but the model's context is 32"),
        ("prompt longer than the context (ids)", [short, "--tokens", ",".join(["7"] * 33)],
         "the prompt has 33 tokens but the model's context is 32"),
        ("unwritable --logits path", [model, "-p", "hi", "--logits", "/nonexistent-dir/x.bin"],
         "cannot write --logits file '/nonexistent-dir/x.bin'"),
        ("--logits into a directory", [model, "-p", "hi", "--logits", t.build], "cannot write --logits file"),
        ("an option name with a newline", [model, "--a\nb"], "unknown option '--a?b'"),
    ]
    for label, args, want in cases:
        r = t.run(args, timeout=60)
        err = r.stderr.decode("utf-8", "replace")
        t.check(f"command line: {label} -> one line `error: ...{want}...`, status 1",
                clean_error(r) and want in err, f"status {r.returncode}: {err.strip()[:200]}")
    r = t.run([model, "--help"])
    t.check("command line: --help prints the usage and exits 0", r.returncode == 0 and b"usage:" in r.stdout)
    for label, args in (("-n 0", ["-n", "0"]), ("--top-p 1", ["--top-p", "1"]), ("-t 0.001", ["-t", "0.001"]),
                        ("--threads 1 --batch 1", ["--threads", "1", "--batch", "1"]), ("-s 0", ["-s", "0"])):
        r = t.run([model, "-p", "hello", "-n", "3"] + args + (["--threads", "1"] if "--threads" not in args else []))
        t.check(f"command line: the edge value {label} is accepted", r.returncode == 0, r.stderr.decode()[-200:])


# ---------------------------------------------------------------------------------------------------------
# prompts that are not valid UTF-8


def invalid_utf8(t):
    model = tiny_model(t, "hostile_tiny")
    kjv = os.path.join(t.root, "models", "kjv-5m.bin")
    texts = [b"\xff\xfe\xfd", b"abc\xc3", b"\xc3(\xa0\xa1", b"\xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80 too big",
             b"\xc0\xaf overlong", b"caf\xc3\xa9 \xe2\x82", b"\x80" * 50, b"\x01\x02\x1b[31m"]
    for m, label in ((model, "tiny GPT-2-style"), (kjv, "kjv-5m")):
        good = True
        for text in texts:
            r = t.run([m, "-p", text, "-n", "4", "-t", "0.8", "-s", "1", "--threads", "1"])
            enc = t.run([m, "--encode", text, "--no-bos"])
            ids = ids_of(enc.stdout)
            # byte fallback: every byte becomes (part of) a token, nothing is dropped or rejected
            if r.returncode != 0 or enc.returncode != 0 or not ids:
                good = False
                t.check(f"{label}: invalid UTF-8 prompt {text!r} runs (byte fallback)", False,
                        f"status {r.returncode}/{enc.returncode}: {r.stderr.decode('utf-8', 'replace')[-200:]}")
        t.check(f"{label}: {len(texts)} invalid UTF-8 prompts are encoded byte by byte and generate", good)
    # the bytes come back: decode the ids of invalid UTF-8 through the piece table of the model file
    blob = open(model, "rb").read()
    L = Layout(blob)
    pieces = [blob[q + 4:q + 4 + n] for q, n in L.tok["pieces"]]
    for text in texts:
        enc = t.run([model, "--encode", text, "--no-bos"])
        ids = ids_of(enc.stdout)
        back = b"".join(pieces[i] for i in ids)
        if back != text:
            t.check(f"invalid UTF-8 {text!r} round-trips through the byte-level pieces", False, f"{ids} -> {back!r}")
            return
    t.check("invalid UTF-8 prompts round-trip exactly through their token pieces", True)


# ---------------------------------------------------------------------------------------------------------
# the end of the context


def context_end(t):
    short = tiny_model(t, "hostile_ctx32", max_position_embeddings=32)
    r = t.run([short, "--tokens", "1,2,3,4,5", "-n", "100", "-t", "1", "-s", "3", "--print-ids", "--threads", "1"])
    ids = ids_of(r.stdout)
    err = r.stderr.decode()
    # positions 0..31 are fed; the token sampled from position 31 is printed and never fed back
    t.check("full attention, context 32: generation stops at the end of the context with a note, status 0",
            r.returncode == 0 and "stopped at the end of the model's context (32 tokens)" in err and len(ids) == 32 - 5 + 1,
            f"status {r.returncode}, {len(ids)} tokens, {err.strip()[:200]}")
    r = t.run([short, "-p", "w " * 15, "-n", "100", "-t", "1", "-s", "3", "--threads", "1"])
    t.check("full attention, context 32: a text prompt also stops with the note",
            r.returncode == 0 and "stopped at the end of the model's context" in r.stderr.decode())

    # Mistral fixture: every layer slides (window 16), context 512: it may run past 512, in constant memory
    swa = t.export(os.path.join(t.data, "fixtures", "mistral_swa"), "mistral_swa.bin")
    blob = open(swa, "rb").read()
    cfg_ctx = struct.unpack_from("<I", blob, Layout(blob).config_off + 44)[0]
    args = [swa, "--tokens", "1,2,3", "-t", "1", "-s", "5", "--print-ids", "--threads", "1"]
    r_short = t.run(args + ["-n", "100"])
    r_long = t.run(args + ["-n", str(cfg_ctx + 200)], timeout=300)
    n_long = len(ids_of(r_long.stdout))
    t.check(f"sliding on every layer: generates {cfg_ctx + 200} tokens past the context of {cfg_ctx} (status 0, no note)",
            r_long.returncode == 0 and n_long == cfg_ctx + 200 and b"stopped" not in r_long.stderr,
            f"status {r_long.returncode}, {n_long} tokens: {r_long.stderr.decode()[-200:]}")
    t.check("sliding on every layer: KV bytes after 100 tokens == after 700 (rolling buffers never grow)",
            (kv_bytes(r_short.stderr) or -1) > 0 and kv_bytes(r_short.stderr) == kv_bytes(r_long.stderr),
            f"{kv_bytes(r_short.stderr)} vs {kv_bytes(r_long.stderr)}")
    # a long prompt too: the rolling model takes more than its context as a prompt
    r = t.run([swa, "--tokens", ",".join(str(1 + i % 200) for i in range(cfg_ctx + 40)), "-n", "2", "--print-ids",
               "--threads", "1"],
              timeout=300)
    t.check(f"sliding on every layer: a prompt of {cfg_ctx + 40} tokens (past the context) runs", r.returncode == 0,
            r.stderr.decode()[-200:])


def run(t):
    corpus(t)
    targeted_errors(t)
    cli_errors(t)
    invalid_utf8(t)
    context_end(t)
