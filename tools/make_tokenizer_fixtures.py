#!/usr/bin/env python3
"""Make the SentencePiece-style tokenizer fixtures in tests/data/tokenizers and their reference encodings.

    python3 tools/make_tokenizer_fixtures.py CORPUS.txt TOKENIZERS_NODE_MODULE

Run by hand (the tests only read what it writes). It needs what the tests must not:
  - the sentencepiece Python package (Debian: python3-sentencepiece), which trains the models and gives
    the truth for tokenizer.model;
  - the Hugging Face tokenizers library (its Node.js binding, npm package `tokenizers`), which gives the
    truth for tokenizer.json;
  - a plain-text corpus: the King James Version, Genesis and Exodus (Debian: bible-kjv, `bible -f
    Gen1:1-Ex40:38`, verse numbers stripped here), which is in the public domain.

It writes:
  - sentencepiece_kjv/tokenizer.model: SentencePiece BPE with byte fallback, user-defined pieces, a control
    piece, remove_extra_whitespaces and two pieces retyped "unused" (merges that make them are undone);
  - sentencepiece_kjv_plain/tokenizer.model: no byte fallback (<unk>), no dummy prefix, spaces kept;
  - spacemark_*_json/tokenizer.json: the first model's vocabulary as tokenizer.json (BPE with byte_fallback,
    merges made the way transformers converts SentencePiece), in the older Prepend + Replace form and the
    newer Metaspace forms, with added tokens that strip whitespace;
  - pretokenizer_edges.json: how the GPT-2, Llama 3 and Qwen2 pre-tokenizer regexes split tricky strings.
Each folder's ref.json holds {text, ids, decoded} for every test string, from the library that owns the file.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "tokenizers")
sys.path.insert(0, ROOT)
import export  # noqa: E402  (the protobuf reader)

MARK = "\u2581"

EDGE_STRINGS = [
    "", " ", "  ", "\n", "\t", "a", " a", "  a", "a ", "a  ", "   leading and trailing   ", "two  spaces   three",
    "In the beginning God created the heaven and the earth.", "And the LORD said unto Moses,",
    "the LORDS of the LORD's house", "LORDLORD", " LORD ", "<s>In the beginning</s>", "<s> spaced </s>",
    "<ctrl>x<ctrl>", "<unk> and <0x41>", "<|user|>\n  Who art thou?\n<|assistant|>", "  <|user|>  hi",
    "hi <|user|>", "<|user|><|user|>", "tabs\tand\nnewlines\n\nand\r\ncrlf", "numbers 1234567 and 3.14159",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9", "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u65e5\u672c\u8a9e",
    "emoji \U0001f642\U0001f44d\U0001f3fd!", "\u2581already\u2581marked", " \u2581 ", "zero\u200bwidth",
    "e\u0301 combining", "\u00a0nbsp\u3000ideographic", "qqqqqqqqqqqqqqqqqqqqqqqq", "Zz\u00ff\u0100\x01\x7f",
    "unto unto unto", "thee thou thy", "'s 't don't", "!!!???...---", "x" * 40, " \u2581", "a \u2581 b",
    "a  b   c", "x\n\n\ny", "\u2581\u2581\u2581",
]

PRETOKENIZER_EDGES = [
    "'\u017fhello", "x'Sy", "'STOP", "I'LL", "'llama", "don'T", "O'Neil", "'s's", "''s", "' s", " 's", "\n's", "1's",
    "1234567", "12 345", "\u0663\u0663\u0663\u0663\u0663", "\u00b2\u00b3\u2074\u2075", "\u216b\u216b \u216b",
    "1a2b33c444d5555", "a\n\n\nb", "a \n \n b", "  \n", "\n  ", "a\r\n\r\nb", "\t\n", " \t x", "x  \t",
    "\u00a0\n", "x\n\u00a0y", "x \u2028 y", "a   b", "a   ", "   ", "a \u3000b", "\u3000\u3000x", "a\u0085b",
    "!!\n\n", " ?\r\n", "...\n x", " ...\n\n\n  x", "!\r\r\n\n", " \u0301abc", "\u200babc", "$abc", "\nabc",
    "1abc", "a\u0301b", " \u200b", "    return x", "\t\tdef f():\n\t\t\treturn 1\n", "x\n\n\n", "\U0001f600\U0001f600 \U0001f600",
    "\u01c5ungla", "\u03a9mega 42", "x'", "'", "a\u00a0\u00a0b", "a \u00a0b",
]


def corpus_lines(path):
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = re.sub(r"^\S+\s", "", line.strip())  # drop the "Ge1:1 " verse reference
            if line:
                lines.append(line)
    return lines


def node_run(module, script, payload):
    """Runs a Node.js script with the tokenizers module; payload goes in as JSON, the answer comes out as JSON."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(payload, f)
    code = f"const tk = require({json.dumps(module)}); const input = require({json.dumps(f.name)});\n" + script
    r = subprocess.run(["node", "-e", code], capture_output=True, text=True, check=True)
    os.unlink(f.name)
    return json.loads(r.stdout)


# -- SentencePiece models


def train(corpus, prefix, **options):
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=600,
                                   character_coverage=1.0, num_threads=2, normalization_rule_name="identity", **options)
    return prefix + ".model"


def write_varint(x):
    out = bytearray()
    while True:
        b = x & 0x7F
        x >>= 7
        out.append(b | (0x80 if x else 0))
        if not x:
            return bytes(out)


def retype_pieces(path, pieces_to_retype, new_type):
    """Rewrites a tokenizer.model with some pieces given another type (protobuf field 3 of a piece)."""
    data = open(path, "rb").read()
    out = bytearray()
    for field, value in export.protobuf_fields(data, path):
        if field == 1:
            p = dict(export.protobuf_fields(value, path))
            if p[1].decode() in pieces_to_retype:
                p[3] = new_type
            value = b"".join([b"\x0a" + write_varint(len(p[1])) + p[1], b"\x15" + p.get(2, b"\0\0\0\0"),
                              b"\x18" + write_varint(p.get(3, 1))])
        out += write_varint(field << 3 | 2) + write_varint(len(value)) + value
    open(path, "wb").write(bytes(out))


def sentencepiece_refs(model, strings):
    sp = spm.SentencePieceProcessor(model_file=model)
    return [{"text": s, "ids": sp.encode(s), "decoded": sp.decode(sp.encode(s))} for s in strings]


INVALID_UTF8 = [b"a\xffb", b"\xe2\x82", b"x\xc3", b"\x80\x80 in the beginning \xf5", b"\xed\xa0\x80 surrogate"]


def invalid_utf8_refs(model):
    """Prompts that are not UTF-8: the sentencepiece library reads each bad byte as U+FFFD."""
    sp = spm.SentencePieceProcessor(model_file=model)
    return [{"hex": b.hex(), "ids": sp.encode(b)} for b in INVALID_UTF8]


# -- tokenizer.json forms of a SentencePiece vocabulary


def generate_merges(vocab, scores):
    """transformers' SentencePiece conversion: every split of every piece into two pieces, best score first."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[a, b] for a, b, _ in merges]


def added(content, i, special=True, lstrip=False, rstrip=False):
    return {"id": i, "content": content, "single_word": False, "lstrip": lstrip, "rstrip": rstrip, "normalized": False,
            "special": special}


def tokenizer_json(model, normalizer, pre_tokenizer, decoder, user_strip):
    sp = spm.SentencePieceProcessor(model_file=model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    lstrip, rstrip = user_strip
    added_tokens = [added("<unk>", 0), added("<s>", 1), added("</s>", 2)]
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if piece == "<|user|>" or piece == "<|assistant|>":
            added_tokens.append(added(piece, i, lstrip=lstrip, rstrip=rstrip))
        elif piece == "LORD":
            added_tokens.append(added(piece, i, special=False))
        elif piece == "<ctrl>":
            added_tokens.append(added(piece, i))
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                    {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": generate_merges(vocab, scores)},
    }


LEGACY_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": MARK}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}

JSON_FORMS = {
    # the older hub form (Llama 2 / Mistral as first converted): a ▁ before every stretch of text
    "spacemark_legacy_json": dict(
        normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": MARK},
                                                        {"type": "Replace", "pattern": {"String": " "}, "content": MARK}]},
        pre_tokenizer=None, decoder=LEGACY_DECODER, user_strip=(False, True)),
    # transformers 5's Llama conversion: Metaspace, prepend_scheme always, one word per stretch
    "spacemark_metaspace_json": dict(
        normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": MARK, "prepend_scheme": "always", "split": False},
        decoder=LEGACY_DECODER, user_strip=(True, True)),
    # Gemma: spaces replaced, no dummy prefix, a Split at spaces that no longer exist, no Strip decoder
    "spacemark_gemma_json": dict(
        normalizer={"type": "Replace", "pattern": {"String": " "}, "content": MARK},
        pre_tokenizer={"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        decoder={"type": "Sequence", "decoders": LEGACY_DECODER["decoders"][:3]}, user_strip=(False, False)),
    # Metaspace "first" (only at the start of the text), split into words at every ▁, Metaspace decoder step
    "spacemark_metaspace_first_json": dict(
        normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": MARK, "prepend_scheme": "first", "split": True},
        decoder={"type": "Sequence", "decoders": [{"type": "Metaspace", "replacement": MARK, "prepend_scheme": "first",
                                                   "split": True}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
        user_strip=(True, False)),
}

JSON_REFS = """
(async () => {
  const tok = tk.Tokenizer.fromFile(input.file);
  const out = [];
  for (const s of input.strings) {
    const ids = Array.from((await tok.encode(s, null, { addSpecialTokens: false })).getIds());
    out.push({ text: s, ids, decoded: await tok.decode(ids, false) });
  }
  console.log(JSON.stringify(out));
})();
"""

PRETOKENIZE = """
const out = {};
for (const [name, file] of Object.entries(input.files)) {
  const pre = tk.Tokenizer.fromFile(file).getPreTokenizer();
  out[name] = input.strings.map(s => {
    const chars = [...s];
    // offsets count characters of the original text (the pieces themselves show bytes GPT-2's way)
    return { text: s, pretokens: pre.preTokenizeString(s).map(([_, [a, b]]) => chars.slice(a, b).join('')) };
  });
}
console.log(JSON.stringify(out));
"""


def write_folder(name, files, refs, note, versions, **extra):
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    for fname, data in files.items():
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(os.path.join(folder, fname), mode) as f:
            f.write(data)
    with open(os.path.join(folder, "ref.json"), "w") as f:
        json.dump(dict({"strings": refs, "note": note, "versions": versions}, **extra), f, ensure_ascii=False, indent=0)
    print(f"{name}: {len(refs)} reference strings")


def main():
    corpus_path, module = sys.argv[1], os.path.abspath(sys.argv[2])
    lines = corpus_lines(corpus_path)
    tokenizers_version = json.load(open(os.path.join(module, "package.json")))["version"]
    work = tempfile.mkdtemp()
    os.chdir(work)  # the models record the training file names: keep them free of the temporary folder's name
    train_text = "train.txt"
    with open(train_text, "w") as f:
        f.write("\n".join(lines[:-40]))  # the last 40 verses are held out as test strings
    strings = EDGE_STRINGS + lines[-40:-20]
    versions = {"sentencepiece": spm.__version__, "tokenizers (node)": tokenizers_version}

    # user-defined pieces are matched in the written text: "▁▁" catches a space after the dummy prefix
    model = train(train_text, "kjv", byte_fallback=True,
                  user_defined_symbols=["<|user|>", "<|assistant|>", "LORD", MARK + MARK, "\n\n"],
                  control_symbols=["<ctrl>"])
    sp = spm.SentencePieceProcessor(model_file=model)
    # two pieces that merges make often become "unused": SentencePiece undoes merges that make them
    unused = [p for p in ("\u2581the", "ord") if sp.piece_to_id(p) != sp.unk_id()]
    plain_vocab_model = os.path.join(work, "kjv_json_base.model")
    open(plain_vocab_model, "wb").write(open(model, "rb").read())
    retype_pieces(model, unused, 5)
    write_folder("sentencepiece_kjv", {"tokenizer.model": open(model, "rb").read()}, sentencepiece_refs(model, strings),
                 f"SentencePiece BPE trained on KJV Genesis-Exodus (600 pieces, byte fallback, user-defined <|user|> "
                 f"<|assistant|> LORD ▁▁ and two newlines, control <ctrl>, remove_extra_whitespaces), pieces {unused} "
                 f"retyped UNUSED; "
                 f"ids and decoded text from the sentencepiece library", versions, invalid_utf8=invalid_utf8_refs(model))

    plain = train(train_text, "kjv_plain", byte_fallback=False, add_dummy_prefix=False,
                  remove_extra_whitespaces=False, user_defined_symbols=[MARK + MARK, "\n\n"])
    write_folder("sentencepiece_kjv_plain", {"tokenizer.model": open(plain, "rb").read()}, sentencepiece_refs(plain, strings),
                 "SentencePiece BPE trained on KJV Genesis-Exodus (600 pieces, user-defined ▁▁ and two newlines) without byte fallback (unknown characters "
                 "are <unk>), without the dummy prefix, spaces kept; ids and decoded text from the sentencepiece library",
                 versions, invalid_utf8=invalid_utf8_refs(plain))

    for name, form in JSON_FORMS.items():
        tok = tokenizer_json(plain_vocab_model, form["normalizer"], form["pre_tokenizer"], form["decoder"], form["user_strip"])
        path = os.path.join(work, name + ".json")
        with open(path, "w") as f:
            json.dump(tok, f, ensure_ascii=False)
        refs = node_run(module, JSON_REFS, {"file": path, "strings": strings})
        write_folder(name, {"tokenizer.json": json.dumps(tok, ensure_ascii=False)}, refs,
                     f"the sentencepiece_kjv vocabulary as tokenizer.json ({json.dumps(form['normalizer'], ensure_ascii=False)}, "
                     f"{json.dumps(form['pre_tokenizer'], ensure_ascii=False)}); ids and decoded text from the tokenizers library",
                     versions)

    bytelevel = {"gpt2": os.path.join(OUT, "bytelevel_gpt2_style", "tokenizer.json"),
                 "llama3": os.path.join(OUT, "bytelevel_llama3_style", "tokenizer.json")}
    qwen2 = json.load(open(bytelevel["llama3"]))
    qwen2["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = export.QWEN2_REGEX
    bytelevel["qwen2"] = os.path.join(work, "qwen2.json")
    json.dump(qwen2, open(bytelevel["qwen2"], "w"))
    splits = node_run(module, PRETOKENIZE, {"files": bytelevel, "strings": PRETOKENIZER_EDGES})
    with open(os.path.join(OUT, "pretokenizer_edges.json"), "w") as f:
        json.dump({"note": "pre-tokens of the GPT-2, Llama 3 and Qwen2 Split regexes, from the tokenizers library",
                   "versions": versions, "regexes": splits}, f, ensure_ascii=False, indent=0)
    print("pretokenizer_edges.json written")


if __name__ == "__main__":
    main()
