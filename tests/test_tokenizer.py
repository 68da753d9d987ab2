"""Tokenizers: every reference encoding of every tokenizer folder, through export.py and ./run --encode, and
--decode of those ids printing what the tokenizer's own library prints (so the text itself wherever the
tokenizer is lossless).

Folders (each a tokenizer file and ref.json with {text, ids} per string, and {decoded} where we made it):
  tests/data/tokenizers: byte-level GPT-2 / Llama 3 styles (tokenizer.json), our KJV-trained SentencePiece
    models (tokenizer.model) and that vocabulary as tokenizer.json in its older and newer forms
    (tools/make_tokenizer_fixtures.py made them and their references);
  $ATTN_SHARED/tokenizers: the real Llama 2 vocabulary as tokenizer.model and as tokenizer.json;
  $ATTN_SHARED/llama2c/tokenizer.bin: llama2.c's export of it, behind a synthetic llama2.c checkpoint.
Then the pre-tokenizer regexes on edge cases, and one-line errors for tokenizer features attn.c lacks."""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np

from harness import ids_of, tiny_llama_dir

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import export  # noqa: E402  (the regexes and GPT-2's byte alphabet)

OURS = ["bytelevel_gpt2_style", "bytelevel_llama3_style", "sentencepiece_kjv", "sentencepiece_kjv_plain",
        "spacemark_legacy_json", "spacemark_metaspace_json", "spacemark_metaspace_first_json", "spacemark_gemma_json"]


def run(t):
    for folder in OURS:
        src = os.path.join(t.data, "tokenizers", folder)
        check_folder(t, folder, export_folder(t, folder, src), json.load(open(os.path.join(src, "ref.json"))))
    llama2_sentencepiece(t)
    llama2_tokenizer_json(t)
    llama2c_tokenizer_bin(t)
    pretokenizer_edges(t)
    split_pretokenizers(t)
    unsupported_features(t)


# -- exporting a tiny model around a tokenizer


def vocab_size_of(files):
    """The vocabulary a tokenizer file needs: the highest id of a tokenizer.json, the pieces of a .model."""
    for f in files:
        if f.endswith("tokenizer.json"):
            tok = json.load(open(f, encoding="utf-8"))
            return max(list(tok["model"]["vocab"].values()) + [a["id"] for a in tok["added_tokens"]]) + 1
        if f.endswith("tokenizer.model"):
            pieces, _, _ = export.sentencepiece_model(f)
            return len(pieces)
    raise ValueError(f"no tokenizer among {files}")


def export_folder(t, name, src, files=None):
    """A random-weight Llama with the folder's tokenizer files (a 32000-token one is a few MB), exported once."""
    files = files or [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.startswith("tokenizer")]
    model_dir = tiny_llama_dir(t.tmp(f"tok_{name}"), vocab_size_of(files), files)
    return t.export(model_dir, f"tok_{name}.bin")


def encode(t, model, text, bos=False):
    r = t.run([model, "--encode", text] + ([] if bos else ["--no-bos"]))
    return ids_of(r.stdout) if r.returncode == 0 else None


def decode(t, model, ids):
    r = t.run([model, "--decode", ",".join(map(str, ids))])
    out = r.stdout.decode("utf-8", "surrogateescape")
    return out[:-1] if r.returncode == 0 and out.endswith("\n") else None


def check_folder(t, name, model, ref, expected_decode=None):
    """Every reference string encodes to its ids; those ids decode to ref's `decoded` text, or to
    expected_decode(text), or else to the text itself."""
    strings = ref["strings"]
    encoded = decoded = round_trips = 0
    for s in strings:
        ids = encode(t, model, s["text"])
        if ids == s["ids"]:
            encoded += 1
        else:
            t.check(f"{name}: encode {s['text'][:40]!r}", False, f"got {ids and ids[:16]}, want {s['ids'][:16]}")
        text = decode(t, model, s["ids"])
        want = s.get("decoded", expected_decode(s["text"]) if expected_decode else s["text"])
        if text == want:
            decoded += 1
        else:
            t.check(f"{name}: decode {s['text'][:40]!r}", False, f"got {text!r}, want {want!r}")
        round_trips += text == s["text"]
    n = len(strings)
    t.check(f"{name}: {encoded}/{n} reference encodings exact", encoded == n)
    if "invalid_utf8" in ref:  # prompts that are not UTF-8 (argv holds any bytes)
        bad = ref["invalid_utf8"]
        good = sum(ids_of(subprocess.run([t.run_bin, model, "--encode", bytes.fromhex(b["hex"]), "--no-bos"],
                                  capture_output=True).stdout) == b["ids"] for b in bad)
        t.check(f"{name}: {good}/{len(bad)} prompts that are not UTF-8 encode as the library reads them", good == len(bad))
    t.check(f"{name}: {decoded}/{n} decode as the tokenizer's own library does ({round_trips}/{n} give the text back exactly)",
            decoded == n)
    return round_trips


# -- the real Llama 2 vocabulary, from $ATTN_SHARED (never copied into the repository)


def llama2_sentencepiece(t):
    path = t.shared_file("tokenizers/llama2_sentencepiece/tokenizer.model", "llama2_sentencepiece")
    if path:
        ref = json.load(open(os.path.join(os.path.dirname(path), "ref.json")))
        model = export_folder(t, "llama2_sentencepiece", None, [path])
        t.check("llama2_sentencepiece: decode(encode(text)) == text for every reference string",
                check_folder(t, "llama2_sentencepiece", model, ref) == len(ref["strings"]))


def llama2_tokenizer_json(t):
    path = t.shared_file("tokenizers/llama2_hf_json/tokenizer.json", "llama2_hf_json")
    if not path:
        return
    folder = os.path.dirname(path)
    ref = json.load(open(os.path.join(folder, "ref.json")))
    model = export_folder(t, "llama2_hf_json", None, [path, os.path.join(folder, "tokenizer_config.json")])
    # This file's Metaspace (prepend_scheme "always") adds no ▁ before a text that already starts with a space,
    # and its Strip decoder drops the first space of the output: the tokenizers library gives such a text back
    # without its first space (" leading space" and "leading space" are the same ids). Everything else round-trips.
    check_folder(t, "llama2_hf_json", model, ref, expected_decode=lambda text: text[1:] if text.startswith(" ") else text)
    with_bos = sum(encode(t, model, s["text"], bos=True) == s["ids_with_special"] for s in ref["strings"])
    t.check(f"llama2_hf_json: {with_bos}/{len(ref['strings'])} encodings with the post-processor's BOS exact",
            with_bos == len(ref["strings"]))


def write_llama2c_checkpoint(path, vocab, dim=16, hidden=32, n_layers=1, n_heads=2, seq_len=64):
    """A random-weight llama2.c legacy checkpoint: 7 int32 header, then the float32 arrays in llama2.c's order."""
    head = dim // n_heads
    sizes = [vocab * dim, n_layers * dim, n_layers * dim * dim, n_layers * dim * dim, n_layers * dim * dim,
             n_layers * dim * dim, n_layers * dim, n_layers * hidden * dim, n_layers * dim * hidden,
             n_layers * hidden * dim, dim, seq_len * head // 2, seq_len * head // 2]
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, n_layers, n_heads, n_heads, vocab, seq_len))
        for n in sizes:
            f.write((rng.standard_normal(n) * 0.1).astype("<f4").tobytes())
    return path


def llama2c_tokenizer_bin(t):
    tok = t.shared_file("llama2c/tokenizer.bin", "llama2.c tokenizer.bin")
    ref_path = t.shared_file("tokenizers/llama2_sentencepiece/ref.json", "llama2.c tokenizer.bin references")
    if not tok or not ref_path:
        return
    ckpt = write_llama2c_checkpoint(t.tmp("llama2c_32000.bin"), 32000)
    model = t.export(ckpt, "llama2c_32000_tok.bin", "--tokenizer", tok)
    ref = json.load(open(ref_path))  # llama2.c encodes as the sentencepiece library does
    t.check("llama2.c tokenizer.bin: decode(encode(text)) == text for every reference string",
            check_folder(t, "llama2.c tokenizer.bin", model, ref) == len(ref["strings"]))
    t.check("llama2.c tokenizer.bin: a prompt starts with BOS 1", encode(t, model, "Once upon a time", bos=True)[:1] == [1])
    r = t.run([model, "-p", "Once upon a time", "-n", "4", "-t", "0"])
    t.check("llama2.c tokenizer.bin: the legacy checkpoint generates from a text prompt", r.returncode == 0 and r.stdout,
            r.stderr.decode(errors="replace")[-200:])


# -- the pre-tokenizer regexes on edge cases


def pretokenizer_edges(t):
    """How the GPT-2, Llama 3 and Qwen2 regexes split tricky strings, as the tokenizers library splits them
    (pretokenizer_edges.json). A byte-level vocabulary holding each expected pre-token whole, with
    ignore_merges, turns every pre-token into one id, so the ids show where the engine split."""
    data = json.load(open(os.path.join(t.data, "tokenizers", "pretokenizer_edges.json"), encoding="utf-8"))
    show = export.bytes_to_unicode()
    spell = lambda text: "".join(show[b] for b in text.encode("utf-8"))  # noqa: E731
    regexes = {"gpt2": None, "llama3": export.LLAMA3_REGEX, "qwen2": export.QWEN2_REGEX}
    for name, cases in data["regexes"].items():
        vocab = {show[b]: b for b in range(256)}
        for case in cases:
            for p in case["pretokens"]:
                vocab.setdefault(spell(p), len(vocab))
        if regexes[name] is None:
            pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        else:
            pre = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regexes[name]}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        tok = {"added_tokens": [], "normalizer": None, "pre_tokenizer": pre, "post_processor": None, "decoder": None,
               "model": {"type": "BPE", "vocab": vocab, "merges": [], "ignore_merges": True, "byte_fallback": False}}
        os.makedirs(t.tmp(f"pretok_{name}"), exist_ok=True)
        path = os.path.join(t.tmp(f"pretok_{name}"), "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(tok, f, ensure_ascii=False)
        model = export_folder(t, f"pretok_{name}", None, [path])
        good = 0
        for case in cases:
            ids, want = encode(t, model, case["text"]), [vocab[spell(p)] for p in case["pretokens"]]
            good += ids == want
            if ids != want:
                t.check(f"{name} pre-tokenizer: {case['text']!r}", False, f"want {case['pretokens']}")
        t.check(f"{name} pre-tokenizer: {good}/{len(cases)} edge cases split as the tokenizers library splits them",
                good == len(cases))


# -- tokenizer.json Split pre-tokenizers, checked against the tokenizers library's own ids


def split_pretokenizers(t):
    """DeepSeek Coder's pre_tokenizer block (four regex Splits, Digits, ByteLevel without its regex), written as its
    tokenizer.json has it, around the vocabulary llama.cpp ships for it: the texts of llama.cpp's tests encode to
    the tokenizers library's ids (tests/test_gguf_vocab.py runs the same vocabularies through their GGUF names)."""
    import gguf_reader
    import pretokenizers as P
    cjk = "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ((0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF)))
    isolated = lambda regex: {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}  # noqa: E731
    blocks = {
        "deepseek-coder": [isolated("[\r\n]"), isolated("\\s?\\p{L}+"), isolated("\\s?\\p{P}+"), isolated(f"[{cjk}]+"),
                           {"type": "Digits", "individual_digits": True},
                           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}],
    }
    for name, block in blocks.items():
        path = t.shared_file(f"llamacpp/vocab/ggml-vocab-{name}.gguf", f"tokenizer.json Split pre-tokenizer ({name})")
        if not path:
            continue
        tok, eos = gguf_reader.read_vocabulary(path)
        tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": block}
        steps, _, _ = P.split_steps(tok["pre_tokenizer"])
        d = t.tmp(f"split_{name}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tok, f, ensure_ascii=False)
        model = export_folder(t, f"split_{name}", None, [os.path.join(d, "tokenizer.json")])
        texts = open(path + ".inp", encoding="utf-8").read().split("\n__ggml_vocab_test__\n")[:-1]
        wants = [[int(x) for x in line.split()] for line in open(path + ".out", encoding="utf-8").read().split("\n")]
        good = sum(encode(t, model, text) == want for text, want in zip(texts, wants))
        t.check(f"tokenizer.json pre_tokenizer of {name} ({len(steps)} Split steps): {good}/{len(texts)} texts encode "
                f"as the tokenizers library", good == len(texts) > 0)


# -- what is not supported says so, in one line


def export_error(t, name, src, *extra):
    r = subprocess.run([t.python, os.path.join(t.root, "export.py"), src, t.tmp(f"{name}.bin")] + list(extra),
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    return r.returncode, lines[-1] if lines else ""


def variant_dir(t, name, base_json, change):
    """A tiny model directory whose tokenizer.json is base_json with change(tok) applied."""
    tok = json.load(open(base_json, encoding="utf-8"))
    change(tok)
    d = t.tmp(f"bad_{name}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    return tiny_llama_dir(d, vocab_size_of([path]), [])


def with_protobuf_field(model_path, out_path, field, inner):
    """A copy of a tokenizer.model with one more spec message appended (protobuf merges it into the first)."""
    with open(model_path, "rb") as f:
        data = f.read()
    with open(out_path, "wb") as f:
        f.write(data + bytes([field << 3 | 2, len(inner)]) + inner)
    return out_path


def unsupported_features(t):
    base = os.path.join(t.data, "tokenizers", "spacemark_legacy_json", "tokenizer.json")

    def set_key(*path_value):
        def change(tok):
            *path, value = path_value
            node = tok
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
        return change

    cases = {
        "unigram model": (set_key("model", "type", "Unigram"), "model type 'Unigram' is not supported"),
        "NFKC normalizer": (set_key("normalizer", {"type": "NFKC"}), "normalizer NFKC"),
        "Metaspace with another mark": (set_key("pre_tokenizer", {"type": "Metaspace", "replacement": "_", "prepend_scheme": "always"}),
                                        "pre-tokenizer"),
        "single_word added token": (lambda tok: tok["added_tokens"][-1].update(single_word=True), "single_word"),
        "BPE dropout": (set_key("model", "dropout", 0.1), "dropout"),
        "an unknown decoder": (set_key("decoder", {"type": "WordPiece", "prefix": "##"}), "decoder"),
    }
    bytelevel = os.path.join(t.data, "tokenizers", "bytelevel_gpt2_style", "tokenizer.json")
    split = lambda regex: {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}  # noqa: E731
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    bytelevel_cases = {
        "a lookbehind in a Split regex": ([split("(?<=a)b"), level], "lookbehind"),
        "a class intersection in a Split regex": ([split("[\\p{L}&&[^a]]"), level], "intersection"),
        "a Split behavior the library lacks": ([dict(split("a"), behavior="Sideways"), level], "Sideways"),
        "the UnicodeScripts pre-tokenizer": ([{"type": "UnicodeScripts"}, level], "UnicodeScripts"),
        "ByteLevel's prefix space after a Split": ([split("a"), dict(level, add_prefix_space=True)], "add_prefix_space"),
    }
    for name, (steps, words) in bytelevel_cases.items():
        cases[name] = ((lambda steps: lambda tok: tok.update(pre_tokenizer={"type": "Sequence", "pretokenizers": steps}))(steps),
                       words, bytelevel)
    for name, (change, words, *source) in cases.items():
        key = "".join(c if c.isalnum() else "_" for c in name)
        rc, line = export_error(t, key, variant_dir(t, key, source[0] if source else base, change))
        t.check(f"export names an unsupported tokenizer.json feature: {name}",
                rc == 1 and line.startswith("error: ") and words in line, line)

    model = os.path.join(t.data, "tokenizers", "sentencepiece_kjv", "tokenizer.model")
    for name, field, inner, words in (("unigram", 2, b"\x18\x01", "unigram models are not supported"),
                                      ("charsmap", 3, b"\x12\x02xx", "precompiled character map")):
        d = tiny_llama_dir(t.tmp(f"bad_spm_{name}"), 600, [])
        with_protobuf_field(model, os.path.join(d, "tokenizer.model"), field, inner)
        rc, line = export_error(t, f"bad_spm_{name}", d)
        t.check(f"export names an unsupported tokenizer.model feature: {name}",
                rc == 1 and line.startswith("error: ") and words in line, line)

    # a tokenizer.json attn.c cannot follow, beside a tokenizer.model: the exporter says so and uses the model
    d = variant_dir(t, "fallback", base, set_key("normalizer", {"type": "NFKC"}))
    shutil.copy(model, os.path.join(d, "tokenizer.model"))
    r = subprocess.run([t.python, os.path.join(t.root, "export.py"), d, t.tmp("fallback.bin")], capture_output=True,
                       text=True, timeout=120)
    t.check("export falls back to tokenizer.model when tokenizer.json is unsupported, and says why",
            r.returncode == 0 and "normalizer NFKC" in r.stderr and "using tokenizer.model instead" in r.stderr,
            r.stderr.strip().splitlines()[-1:])

    ckpt = write_llama2c_checkpoint(t.tmp("llama2c_600.bin"), 600)
    rc, line = export_error(t, "llama2c_wrong_vocab", ckpt, "--tokenizer", model.replace(".model", ".json"))
    t.check("export --tokenizer with a missing file fails in one line", rc == 1 and line.startswith("error: "), line)
    truncated = t.tmp("truncated_tokenizer.bin")
    with open(truncated, "wb") as f:
        f.write(struct.pack("<if", 10, 0.0) + struct.pack("<i", 5) + b"ab")
    rc, line = export_error(t, "llama2c_truncated", ckpt, "--tokenizer", truncated)
    t.check("export --tokenizer with a truncated tokenizer.bin fails in one line",
            rc == 1 and line.startswith("error: ") and "token 0" in line, line)
