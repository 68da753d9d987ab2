"""GGUF vocabularies: llama.cpp's test vocabularies ($ATTN_SHARED/llamacpp/vocab/ggml-vocab-*.gguf, real tokenizers
of each family: byte-level BPE with their named pre-tokenizers, SentencePiece BPE with scores) are exported
into a tiny model with `export.py MODEL OUT --tokenizer ggml-vocab-NAME.gguf`, and every text of the .inp file
must encode (./run --encode, no BOS) to exactly the ids in the .out file, which the tokenizers library gave.
Vocabularies whose algorithm attn.c does not implement are refused in one line that names it."""
import os
import subprocess

from gguf_support import import_gguf
from harness import tiny_llama_dir

WITH_VECTORS = ["gpt-2", "mpt", "starcoder", "refact", "falcon", "deepseek-coder", "deepseek-llm", "llama-spm", "phi-3"]
WITHOUT_VECTORS = ["gpt-neox"]  # exported (no tokenizer.ggml.pre: GPT-2's regex), encodes a text; no ids to compare
SEPARATOR = "\n__ggml_vocab_test__\n"


def run(t):
    for name in WITH_VECTORS + WITHOUT_VECTORS:
        path = t.shared_file(f"llamacpp/vocab/ggml-vocab-{name}.gguf", f"GGUF vocabulary {name}")
        if path:
            vocabulary(t, name, path, name in WITH_VECTORS)
    refused(t)


def n_tokens(path):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gguf_reader
    return len(gguf_reader.GGUFFile(path).meta["tokenizer.ggml.tokens"])


def encode(t, model, text):
    r = t.run([model, "--encode", text, "--no-bos"])
    return [int(x) for x in r.stdout.replace(b",", b" ").split()] if r.returncode == 0 else None


def vocabulary(t, name, path, has_vectors):
    model = t.export(tiny_llama_dir(t.tmp(f"gguf_vocab_{name}"), n_tokens(path)), f"gguf_vocab_{name}.bin",
                     "--tokenizer", path)
    if not has_vectors:
        ids = encode(t, model, "Hello world, 123!")
        t.check(f"GGUF vocabulary {name}: exports and encodes a text", bool(ids), f"{ids}")
        return
    texts = open(path + ".inp", encoding="utf-8").read().split(SEPARATOR)[:-1]
    wants = [[int(x) for x in line.split()] for line in open(path + ".out", encoding="utf-8").read().split("\n")]
    good = 0
    for text, want in zip(texts, wants):
        got = encode(t, model, text)
        good += got == want
        if got != want:
            t.check(f"GGUF vocabulary {name}: encode {text[:40]!r}", False, f"got {got and got[:16]}, want {want[:16]}")
    t.check(f"GGUF vocabulary {name}: {good}/{len(texts)} of llama.cpp's test texts encode exactly as the tokenizers "
            f"library", good == len(texts) > 0 and len(wants) >= len(texts))


def refused(t):
    """A WordPiece (bert) and a Unigram (t5) vocabulary, and an unknown pre-tokenizer, each end the export in one line."""
    gguf = import_gguf(t, "GGUF vocabularies attn.c refuses")
    if gguf is None:
        return
    cases = {"bert": ("bert", None, "WordPiece"), "t5": ("t5", None, "Unigram"), "unknown_pre": ("gpt2", "klingon", "klingon")}
    for case, (model, pre, words) in cases.items():
        path = t.tmp(f"vocab_{case}.gguf")
        w = gguf.GGUFWriter(path, "llama")
        w.add_string("tokenizer.ggml.model", model)
        if pre:
            w.add_string("tokenizer.ggml.pre", pre)
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "ab"])
        w.add_array("tokenizer.ggml.token_type", [1, 1, 1])
        w.add_array("tokenizer.ggml.scores", [0.0, 0.0, 0.0])
        w.add_array("tokenizer.ggml.merges", ["a b"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        d = tiny_llama_dir(t.tmp(f"gguf_vocab_refused_{case}"), 3)
        r = subprocess.run([t.python, os.path.join(t.root, "export.py"), d, t.tmp(f"refused_{case}.bin"), "--tokenizer", path],
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        t.check(f"GGUF vocabulary refused in one line: tokenizer.ggml.model {model}" + (f", pre {pre}" if pre else ""),
                r.returncode == 1 and lines and lines[-1].startswith("error: ") and words in lines[-1] and
                not os.path.exists(t.tmp(f"refused_{case}.bin")), lines[-1:] if lines else r.returncode)
