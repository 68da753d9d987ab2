"""export.py on broken inputs: unsupported family, missing or mis-shaped tensors, unreadable or truncated
safetensors, configs that disagree with the weights or break the format, broken tokenizer.json and llama2.c
files. Each must end with status 1 and one `error: ...` line (no traceback), leave no output file and no
temporary file behind, and leave an existing output file as it was."""
import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import traceback

import numpy as np

from harness import ROOT, read_safetensors, tiny_llama_dir, write_safetensors

sys.path.insert(0, ROOT)
import export  # noqa: E402

VOCAB = 64


class Cases:
    def __init__(self, t):
        self.t = t
        self.base = tiny_llama_dir(t.tmp("export_errors/base"), VOCAB)
        self.list = []  # (label, src, expected words in the error)

    def variant(self, name, cfg=None, drop=(), config_text=None):
        """A copy of the base checkpoint with its config changed."""
        d = self.t.tmp(f"export_errors/{name}")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(self.base, d)
        c = json.load(open(os.path.join(d, "config.json")))
        c.update(cfg or {})
        for k in drop:
            c.pop(k, None)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(config_text if config_text is not None else json.dumps(c))
        return d

    def add(self, label, src, want):
        self.list.append((label, src, want))

    def config(self, label, want, **kw):
        self.add(label, self.variant(label.replace(" ", "_"), **kw), want)

    def weights(self, label, want, change):
        """change(tensors) edits the name -> array dict; the safetensors file is rewritten."""
        d = self.variant(label.replace(" ", "_"))
        path = os.path.join(d, "model.safetensors")
        tensors = read_safetensors(path)
        change(tensors)
        write_safetensors(path, tensors)
        self.add(label, d, want)

    def safetensors_bytes(self, label, want, change):
        """change(raw bytes) -> the bytes of model.safetensors."""
        d = self.variant(label.replace(" ", "_"))
        path = os.path.join(d, "model.safetensors")
        data = change(open(path, "rb").read())
        os.unlink(path)
        with open(path, "wb") as f:
            f.write(data)
        self.add(label, d, want)

    def tokenizer(self, label, want, tok):
        d = self.variant(label.replace(" ", "_"))
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            f.write(tok if isinstance(tok, str) else json.dumps(tok))
        self.add(label, d, want)

    def file(self, label, want, data):
        path = self.t.tmp(f"export_errors/{label.replace(' ', '_')}.bin")
        with open(path, "wb") as f:
            f.write(data)
        self.add(label, path, want)


def st_header(entries, data=b""):
    h = json.dumps(entries).encode()
    return struct.pack("<Q", len(h)) + h + data


def build_cases(t):
    c = Cases(t)
    p = "model.layers.0."
    # the family and the config
    c.config("unsupported family", "model_type 'bert' is not supported", cfg={"model_type": "bert"})
    c.config("no model_type", "model_type 'None' is not supported", drop=("model_type",))
    c.config("config not JSON", "config.json: not valid JSON", config_text='{"model_type": ')
    c.config("config not an object", "config.json: not a JSON object", config_text="[1, 2]")
    c.config("hidden_size a string", "'hidden_size' is 'sixteen', expected an integer", cfg={"hidden_size": "sixteen"})
    c.config("zero heads", "'num_attention_heads' is 0", cfg={"num_attention_heads": 0})
    c.config("heads not divisible", "bad head counts: 2 query heads, 3 kv heads", cfg={"num_key_value_heads": 3})
    c.config("fractional layers", "'num_hidden_layers' is 1.5", cfg={"num_hidden_layers": 1.5})
    c.config("absurd layer count", "'num_hidden_layers' is 1000000000000", cfg={"num_hidden_layers": 10 ** 12})
    c.config("negative context", "'max_position_embeddings' is -5", cfg={"max_position_embeddings": -5})
    c.config("context past the format", "context_length is 100000000 (the format allows 1 .. 16777216)",
             cfg={"max_position_embeddings": 100000000})
    c.config("negative epsilon", "norm epsilon -1.0 is not in (0, 1)", cfg={"rms_norm_eps": -1})
    c.config("epsilon a string", "'rms_norm_eps' is 'x', expected a finite number", cfg={"rms_norm_eps": "x"})
    c.config("rope_theta a string", "'rope_theta' is 'fast'", cfg={"rope_theta": "fast"})
    c.config("unsupported rope scaling", "rope scaling type 'longrope' is not supported",
             cfg={"rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    c.config("incomplete rope scaling", "rope scaling {'rope_type': 'linear'} is incomplete",
             cfg={"rope_scaling": {"rope_type": "linear"}})
    c.config("sliding layer without a window", "layer 0 slides but sliding_window is not set",
             cfg={"layer_types": ["sliding_attention"]})
    c.config("layer_types of the wrong length", "layer_types has 2 entries for 1 layers",
             cfg={"layer_types": ["full_attention", "full_attention"]})
    c.config("unsupported activation", "activation 'relu' is not supported", cfg={"hidden_act": "relu"})
    c.config("more layers than tensors", "missing tensor 'model.layers.1.input_layernorm.weight'",
             cfg={"num_hidden_layers": 2})
    c.config("vocab_size disagreeing with the embeddings", "tensor 'model.embed_tokens.weight' has shape [64, 16], config implies [65, 16]",
             cfg={"vocab_size": VOCAB + 1})
    c.config("untied without lm_head", "missing tensor 'lm_head.weight'", cfg={"tie_word_embeddings": False})
    c.config("no config.json", "config.json: No such file or directory", config_text="")
    os.unlink(os.path.join(c.list[-1][1], "config.json"))

    # tensors
    c.weights("missing tensor", f"missing tensor '{p}self_attn.q_proj.weight'",
              lambda w: w.pop(p + "self_attn.q_proj.weight"))
    c.weights("mis-shaped projection", f"tensor '{p}self_attn.q_proj.weight' has shape [16, 8], config implies [16, 16]",
              lambda w: w.update({p + "self_attn.q_proj.weight": np.zeros((16, 8))}))
    c.weights("mis-shaped norm", "tensor 'model.norm.weight' has shape [15], config implies [16]",
              lambda w: w.update({"model.norm.weight": np.zeros(15)}))
    c.weights("no embeddings", "missing tensor 'model.embed_tokens.weight'",
              lambda w: w.pop("model.embed_tokens.weight"))

    # the safetensors file itself
    c.safetensors_bytes("truncated safetensors data", "lies past the end of the file", lambda b: b[:len(b) // 2])
    c.safetensors_bytes("truncated safetensors header", "safetensors header length", lambda b: b[:20])
    c.safetensors_bytes("safetensors shorter than its length field", "truncated safetensors file", lambda b: b[:5])
    c.safetensors_bytes("empty safetensors", "truncated safetensors file", lambda b: b"")
    c.safetensors_bytes("random bytes as safetensors", "does not fit the file",
                        lambda b: bytes(np.random.default_rng(3).integers(0, 256, 1000, dtype=np.uint8)))
    c.safetensors_bytes("safetensors header not JSON", "safetensors header is not valid JSON",
                        lambda b: struct.pack("<Q", 4) + b"\xff\xfe{}")
    c.safetensors_bytes("safetensors header a list", "safetensors header is not a JSON object",
                        lambda b: st_header([]))
    c.safetensors_bytes("safetensors offsets not numbers", "has a malformed header entry",
                        lambda b: st_header({"x": {"dtype": "F32", "shape": [2], "data_offsets": ["a", "b"]}}))
    c.safetensors_bytes("safetensors negative shape", "has a malformed header entry",
                        lambda b: st_header({"x": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, bytes(16)))
    c.safetensors_bytes("safetensors integer dtype", "has dtype I8; only F32, BF16, F16",
                        lambda b: st_header({"x": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)))
    d = c.variant("safetensors_is_a_directory")
    os.unlink(os.path.join(d, "model.safetensors"))
    os.mkdir(os.path.join(d, "model.safetensors"))
    c.add("unreadable safetensors (a directory)", d, "Is a directory")
    if os.geteuid() != 0:  # root reads anything
        d = c.variant("safetensors_no_permission")
        os.chmod(os.path.join(d, "model.safetensors"), 0)
        c.add("unreadable safetensors (no permission)", d, "Permission denied")
    d = c.variant("no_safetensors")
    os.unlink(os.path.join(d, "model.safetensors"))
    c.add("no safetensors at all", d, "no model.safetensors")
    d = c.variant("index_to_a_missing_shard")
    os.unlink(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"x": "model-00001-of-00002.safetensors"}}, f)
    c.add("index naming a missing shard", d, "model-00001-of-00002.safetensors: No such file or directory")

    # tokenizer.json
    bpe = {"type": "BPE", "vocab": {"a": 1, "b": 2, "ab": 3}, "merges": ["a b"]}
    pre = {"type": "ByteLevel"}
    c.tokenizer("tokenizer not JSON", "tokenizer.json: not valid JSON", "{")
    c.tokenizer("tokenizer a list", "tokenizer.json: not a JSON object", [])
    c.tokenizer("tokenizer id past the vocabulary", "token id 999 is outside the model's vocabulary",
                {"model": dict(bpe, vocab={"a": 999}), "pre_tokenizer": pre})
    c.tokenizer("tokenizer id a string", "model.vocab is not an object of token -> integer id",
                {"model": dict(bpe, vocab={"a": "1"}), "pre_tokenizer": pre})
    c.tokenizer("tokenizer malformed merge", "merge 'ab' is neither", {"model": dict(bpe, merges=["ab"]), "pre_tokenizer": pre})
    c.tokenizer("tokenizer merge of unknown tokens", "refers to a token not in the vocabulary",
                {"model": dict(bpe, merges=["a c"]), "pre_tokenizer": pre})
    c.tokenizer("tokenizer malformed added token", "added token {'id': 'x'} lacks",
                {"model": bpe, "pre_tokenizer": pre, "added_tokens": [{"id": "x"}]})
    c.tokenizer("tokenizer unsupported model", "model type 'WordPiece' is not supported",
                {"model": {"type": "WordPiece", "vocab": {}}})

    # llama2.c checkpoints and paths
    legacy = open(os.path.join(t.data, "llama2c", "llama_gqa_legacy.bin"), "rb").read()
    c.file("llama2c too short", "too short for a llama2.c header", b"\x01\x02")
    c.file("llama2c truncated", "truncated llama2.c checkpoint (1000 bytes", legacy[:1000])
    c.file("llama2c implausible header", "implausible llama2.c header", struct.pack("<7i", 64, 0, 1, 4, 4, 32, 16))
    c.file("llama2c odd head_dim", "3 rotary dimensions is odd", struct.pack("<7i", 6, 8, 1, 2, 2, 10, 4) + bytes(100000))
    c.add("source that does not exist", t.tmp("export_errors/nothing-here"), "no such file or directory")
    return c


def export_in_process(src, out, *options):
    """export.main([src, out, ...]) in this process (no numpy start-up per case): (status, stderr text)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = export.main([src, out] + list(options))
        except BaseException:  # a traceback is a failure of the case, shown in its detail
            traceback.print_exc(file=err)
            status = "exception"
    return status, err.getvalue()


def export_process(t, src, out):
    r = subprocess.run([t.python, os.path.join(t.root, "export.py"), src, out], capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stderr


def one_error_line(status, stderr, want):
    errors = [line for line in stderr.splitlines() if not line.startswith("export: ")]
    return status == 1 and len(errors) == 1 and errors[0].startswith("error: ") and want in errors[0]


def judge(t, i, status, stderr, run_args, counts, bad):
    """One export of a damaged input: exported, and ./run takes the file (run_args); or refused with one error
    line naming the problem, not the catch-all 'cannot export (...)'. Counted in counts, else added to bad."""
    errors = [line for line in stderr.splitlines() if not line.startswith("export: ")]
    if status == 0 and not errors:
        counts[0] += 1
        r = t.run(run_args + ["--threads", "1"])
        if r.returncode != 0:
            bad.append(f"#{i}: exported, but ./run says {r.stderr.decode('utf-8', 'replace').strip()[:200]!r}")
    elif status == 1 and len(errors) == 1 and errors[0].startswith("error: ") and "cannot export (" not in errors[0]:
        counts[1] += 1
    else:
        bad.append(f"#{i}: status {status}: {stderr.strip()[-200:]!r}")


def mutated_tokenizers(t):
    """--tokenizer with 200 damaged copies each of a tokenizer.model, two tokenizer.json and (from $ATTN_SHARED,
    when there) llama2.c's tokenizer.bin: cut short or with random bytes overwritten. Each export ends with
    status 0 and a file ./run loads, or status 1 and one error line that names the problem (not the
    catch-all 'cannot export (...)')."""
    rng = np.random.default_rng(11)
    sources = [("tokenizer.model", os.path.join(t.data, "tokenizers", "sentencepiece_kjv", "tokenizer.model"), 1024),
               ("tokenizer.json (Metaspace)", os.path.join(t.data, "tokenizers", "spacemark_metaspace_json",
                                                           "tokenizer.json"), 1024),
               ("tokenizer.json (byte-level)", os.path.join(t.data, "tokenizers", "bytelevel_gpt2_style",
                                                            "tokenizer.json"), 1024)]
    bin_path = os.path.join(t.shared, "llama2c", "tokenizer.bin")
    if os.path.exists(bin_path):
        sources.append(("llama2.c tokenizer.bin", bin_path, 32000))
    out = t.tmp("export_errors/tok_out.bin")
    for label, path, vocab in sources:
        base = tiny_llama_dir(t.tmp(f"export_errors/tok_base_{vocab}"), vocab)
        data = open(path, "rb").read()
        mutant = t.tmp("export_errors/mutant" + os.path.splitext(path)[1])
        bad, counts = [], [0, 0]
        for i in range(200):
            b = bytearray(data)
            if i % 3 == 0:
                b = b[:int(rng.integers(0, len(b)))]
            else:
                for _ in range(int(rng.integers(1, 9))):
                    b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
            with open(mutant, "wb") as f:
                f.write(b)
            status, stderr = export_in_process(base, out, "--tokenizer", mutant)
            judge(t, i, status, stderr, [out, "--encode", "Hello wörld \xff <s> 12"], counts, bad)
        t.check(f"export.py --tokenizer, 200 damaged copies of a {label}: {counts[0]} exported, {counts[1]} refused "
                "with one error line naming the problem", not bad, "; ".join(bad[:3]))


JSON_VALUES = [None, 0, -1, 1, 2 ** 40, 1.5, "", "x", "\u2581", [], [1], ["a", "b"], {}, {"type": "Sequence"}, True]


def json_paths(o, rng, path=()):
    """Paths to the values of a JSON document (at most 5 items of each list, 50 keys of each object)."""
    yield path
    if isinstance(o, dict):
        for k, v in list(o.items())[:50]:
            yield from json_paths(v, rng, path + (k,))
    elif isinstance(o, list):
        for i in rng.permutation(len(o))[:5]:
            yield from json_paths(o[int(i)], rng, path + (int(i),))


def mutated_json(t):
    """tokenizer.json and config.json with one or two values replaced by a value of another type or size
    (a number for an object, a string for a list, ...): 80 of each of six files. Each export ends with status 0
    and a file ./run loads, or status 1 and one error line naming the file (not the catch-all)."""
    rng = np.random.default_rng(13)
    base = tiny_llama_dir(t.tmp("export_errors/tok_base_1024"), 1024)
    files = [("tokenizer.json", os.path.join(t.data, "tokenizers", d, "tokenizer.json"))
             for d in ("spacemark_metaspace_json", "spacemark_gemma_json", "spacemark_legacy_json",
                       "bytelevel_gpt2_style", "bytelevel_llama3_style")]
    files.append(("config.json", os.path.join(base, "config.json")))
    out = t.tmp("export_errors/json_out.bin")
    for kind, path in files:
        doc = json.load(open(path))
        paths = [p for p in json_paths(doc, rng) if p]
        bad, counts = [], [0, 0]
        for i in range(80):
            d = json.loads(json.dumps(doc))
            for _ in range(int(rng.integers(1, 3))):
                p = paths[int(rng.integers(0, len(paths)))]
                o = d
                try:
                    for k in p[:-1]:
                        o = o[k]
                    o[p[-1]] = JSON_VALUES[int(rng.integers(0, len(JSON_VALUES)))]
                except (KeyError, IndexError, TypeError):
                    pass  # an earlier replacement removed the path
            if kind == "config.json":
                src = t.tmp("export_errors/json_config")
                shutil.rmtree(src, ignore_errors=True)
                shutil.copytree(base, src)
                with open(os.path.join(src, "config.json"), "w") as f:
                    json.dump(d, f)
                status, stderr = export_in_process(src, out)
            else:
                mutant = t.tmp("export_errors/mutant.json")
                with open(mutant, "w") as f:
                    json.dump(d, f)
                status, stderr = export_in_process(base, out, "--tokenizer", mutant)
            use = ["--tokens", "1,2", "-n", "1"] if kind == "config.json" else ["--encode", "Hello w\u00f6rld <s> 12  x"]
            judge(t, i, status, stderr, [out] + use, counts, bad)
        name = os.path.basename(os.path.dirname(path))
        t.check(f"export.py, 80 {kind} of {name} with values of the wrong type: {counts[0]} exported, {counts[1]} "
                "refused with one error line naming the file", not bad, "; ".join(bad[:3]))


def run(t):
    mutated_tokenizers(t)
    mutated_json(t)
    c = build_cases(t)
    out_dir = t.tmp("export_errors/out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    for i, (label, src, want) in enumerate(c.list):
        out = os.path.join(out_dir, f"new{i}.bin")
        existing = os.path.join(out_dir, f"existing{i}.bin")
        with open(existing, "wb") as f:
            f.write(b"an earlier export")
        # the first case and the first failure found while writing also run as a real process (exit status)
        real = i == 0 or label == "vocab_size disagreeing with the embeddings"
        ok, detail = True, ""
        for target in (out, existing):
            status, stderr = export_process(t, src, target) if real else export_in_process(src, target)
            ok = ok and one_error_line(status, stderr, want)
            detail = f"status {status}, stderr {stderr.strip()[-300:]!r}"
        left = sorted(f for f in os.listdir(out_dir) if f.startswith(f"new{i}.") or f.startswith(".export-"))
        untouched = open(existing, "rb").read() == b"an earlier export"
        t.check(f"export.py, {label}: status 1, one line `error: ...{want}...`, no file left, existing output kept",
                ok and not left and untouched, f"{detail}, left {left}, untouched {untouched}")

    # where the output cannot be written
    for label, out, want in (("output directory missing", os.path.join(out_dir, "no", "such", "dir", "m.bin"),
                              "No such file or directory"),
                             ("output is a directory", out_dir, "Is a directory")):
        status, stderr = export_in_process(c.base, out)
        left = [f for f in os.listdir(out_dir) if f.startswith(".export-")]
        t.check(f"export.py, {label}: status 1, one line `error: ...{want}...`, no temporary file left",
                one_error_line(status, stderr, want) and not left, f"status {status}: {stderr.strip()[-300:]!r}, left {left}")
    status, stderr = export_in_process(c.base, os.path.join(out_dir, "good.bin"))
    t.check("export.py: the unbroken base checkpoint exports (the cases above differ from it in one thing each)",
            status == 0 and os.path.exists(os.path.join(out_dir, "good.bin")), stderr[-300:])
