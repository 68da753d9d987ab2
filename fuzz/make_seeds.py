#!/usr/bin/env python3
"""Writes the fuzz seed corpus fuzz/corpus/model/*.bin: tiny model files (random weights, a few KB each)
that together use every part of the format the loader checks -- RMSNorm and LayerNorm, gated and plain
MLPs, rotary and learned positions, sliding and full layers, GQA, q/k norm, biases, post-norms, soft-caps,
a precomputed RoPE table, f32 / f16 / bf16 / q8_0 matrices, tokenizer records of both kinds (byte-level BPE
with the GPT-2 and Llama 3 pre-tokenizers; SentencePiece-style with <0xNN> byte pieces, merged by score as
from a tokenizer.model and by rank with Metaspace as from a tokenizer.json), and a chat section. Small seeds keep
the fuzzer's mutations on the structure rather than on weight bytes.

    /usr/bin/python3 fuzz/make_seeds.py      (from the repository root; deterministic; also the chat templates
                                              fuzz/corpus/chat/*.jinja of fuzz_chat)
    /usr/bin/python3 fuzz/make_seeds.py --shared ../shared build/fuzz   (the real Llama 2 tokenizers, for
                                              fuzz_tokenizer; not committed: see shared/README.md)
"""
import os
import shutil
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export as E  # noqa: E402

OUT = os.path.join(ROOT, "fuzz", "corpus", "model")
rng = np.random.default_rng(7)


def tensors(m, qk_norm=False, qkv_bias=False, o_bias=False, post_norms=False):
    """Random weights for every tensor the config asks for, named and shaped as docs/FORMAT.md says."""
    r = lambda *shape: lambda: (rng.standard_normal(shape) * 0.3).astype(np.float32)  # noqa: E731
    one = lambda n: lambda: np.ones(n, np.float32)  # noqa: E731
    m.add("tok_embeddings", (m.vocab_size, m.dim), r(m.vocab_size, m.dim))
    if m.position_kind == E.POS_LEARNED:
        m.add("pos_embeddings", (m.context_length, m.dim), r(m.context_length, m.dim))
    for i, L in enumerate(m.layers):
        o, qd, kd = f"layers.{i}.", L.n_heads * L.head_dim, L.n_kv_heads * L.head_dim
        m.add(o + "attn_norm", (m.dim,), one(m.dim))
        if m.norm_kind == E.NORM_LAYER:
            m.add(o + "attn_norm_bias", (m.dim,), r(m.dim))
        for n, d in (("wq", qd), ("wk", kd), ("wv", kd)):
            m.add(o + n, (d, m.dim), r(d, m.dim))
        if L.flags & E.LAYER_QKV_BIAS:
            for n, d in (("bq", qd), ("bk", kd), ("bv", kd)):
                m.add(o + n, (d,), r(d))
        if L.flags & E.LAYER_QK_NORM:
            m.add(o + "q_norm", (L.head_dim,), one(L.head_dim))
            m.add(o + "k_norm", (L.head_dim,), one(L.head_dim))
        m.add(o + "wo", (m.dim, qd), r(m.dim, qd))
        if L.flags & E.LAYER_O_BIAS:
            m.add(o + "bo", (m.dim,), r(m.dim))
        if L.flags & E.LAYER_POST_ATTN_NORM:
            m.add(o + "attn_post_norm", (m.dim,), one(m.dim))
        m.add(o + "mlp_norm", (m.dim,), one(m.dim))
        if m.norm_kind == E.NORM_LAYER:
            m.add(o + "mlp_norm_bias", (m.dim,), r(m.dim))
        if m.mlp_kind == E.MLP_GATED:
            m.add(o + "w_gate", (m.hidden_dim, m.dim), r(m.hidden_dim, m.dim))
        m.add(o + "w_up", (m.hidden_dim, m.dim), r(m.hidden_dim, m.dim))
        m.add(o + "w_down", (m.dim, m.hidden_dim), r(m.dim, m.hidden_dim))
        if m.mlp_kind == E.MLP_PLAIN:
            m.add(o + "b_up", (m.hidden_dim,), r(m.hidden_dim))
            m.add(o + "b_down", (m.dim,), r(m.dim))
        if L.flags & E.LAYER_POST_MLP_NORM:
            m.add(o + "mlp_post_norm", (m.dim,), one(m.dim))
    m.add("final_norm", (m.dim,), one(m.dim))
    if m.norm_kind == E.NORM_LAYER:
        m.add("final_norm_bias", (m.dim,), r(m.dim))
    if not m.tied:
        m.add("output", (m.vocab_size, m.dim), r(m.vocab_size, m.dim))
    return m


def bytelevel_tokenizer(folder, vocab):
    src = os.path.join(ROOT, "tests", "data", "tokenizers", folder)
    return E.hf_tokenizer(src, {}, vocab)


def sentencepiece_tokenizer(library_style):
    """A SentencePiece-style record: <unk>, control <s> </s>, 256 <0xNN> byte pieces, a few "▁word" pieces,
    an unused piece and a user-defined one. library_style False: as from a tokenizer.model (merges by the
    score of the joined piece, whole text written with "▁" first); True: as from a tokenizer.json (ranked
    merges, Metaspace split, each stretch between added tokens written on its own, leading space stripped)."""
    words = ["▁", "▁t", "▁th", "▁the", "h", "e", "t", "he", "▁a", "a", "n", "an", "▁an", "d", "nd", "▁and", "é",
             "▁é"]
    rec = E.TokenizerRecord(E.TOK_SENTENCEPIECE_BPE, 3 + 256 + len(words) + 2, "make_seeds")
    rec.set_piece(0, b"<unk>", E.PIECE_UNKNOWN)
    rec.set_piece(1, b"<s>", E.PIECE_CONTROL)
    rec.set_piece(2, b"</s>", E.PIECE_CONTROL)
    for b in range(256):
        rec.set_piece(3 + b, b"<0x%02X>" % b, E.PIECE_BYTE)
    for i, w in enumerate(words):
        rec.set_piece(259 + i, w.encode(), E.PIECE_NORMAL, score=-float(i))
    rec.set_piece(259 + len(words), "▁thé".encode(), E.PIECE_UNUSED, score=5.0)
    rec.set_piece(260 + len(words), b"<|user|>", E.PIECE_USER | E.PIECE_LSTRIP | E.PIECE_RSTRIP)
    rec.bos, rec.unk, rec.eos = 1, 0, [2]
    rec.flags = E.TOKF_ADD_BOS | E.TOKF_DUMMY_PREFIX | E.TOKF_BYTE_FALLBACK
    if library_style:
        rec.pretokenizer = E.PRE_METASPACE
        rec.flags |= E.TOKF_NORMALIZE_EACH_STRETCH | E.TOKF_PREFIX_UNLESS_SPACE | E.TOKF_STRIP_LEADING_SPACE
        ids = {w: 259 + i for i, w in enumerate(words)}
        for a, b in (("▁", "t"), ("h", "e"), ("▁t", "h"), ("▁th", "e"), ("▁", "a"), ("a", "n"), ("n", "d"),
                     ("▁a", "nd"), ("▁", "é")):
            rec.merges.append((ids[a], ids[b]))
    else:
        rec.flags |= E.TOKF_SCORE_MERGES | E.TOKF_REMOVE_EXTRA_SPACES
    return rec.pack(), len(rec.pieces)


# A ChatML-style template that uses much of the Jinja subset chat.c runs: a namespace, loops with loop.*, a
# macro, filters, tests, slices, string methods, whitespace control, a raise_exception branch
CHAT_TEMPLATE = """{%- set ns = namespace(system='', turns=0) -%}
{%- macro turn(role, text) -%}
<|endoftext|>{{ role }}
{{ text | trim }}<|endoftext|>
{% endmacro -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0].content -%}{%- set rest = messages[1:] -%}
{%- else -%}{%- set rest = messages -%}{%- endif -%}
{{- bos_token -}}
{%- if ns.system %}{{ turn('system', ns.system) }}{% endif -%}
{%- for m in rest if m.content is string -%}
    {%- if m.role not in ['user', 'assistant'] -%}{{ raise_exception('unknown role ' ~ m.role) }}{%- endif -%}
    {%- set ns.turns = ns.turns + 1 -%}
    {%- set text = m.content.split('</think>')[-1].lstrip('\\n') if m.role == 'assistant' else m.content -%}
    {{- turn(m.role, text) -}}
    {%- if loop.last and add_generation_prompt %}<|endoftext|>assistant ({{ ns.turns }} turns, {{ rest | selectattr('role', 'equalto', 'user') | list | length }} asked)
{% endif -%}
{%- endfor -%}
{{- '' if messages | length > 0 else eos_token -}}
{#- {{ messages | tojson(indent=2) }} -#}"""


def seeds():
    # Llama-style: RMSNorm, SwiGLU, RoPE, GQA, one sliding and one full layer, byte-level tokenizer (GPT-2 rule)
    m = E.Model("llama", 8, 16, 1024, 64, tied=True)
    m.layers = [E.Layer(2, 1, 4, window=4), E.Layer(2, 1, 4)]
    m.tokenizer = bytelevel_tokenizer("bytelevel_gpt2_style", 1024)
    yield "llama_gpt2_tokenizer_bf16", tensors(m), "bf16"
    # the same with the Llama 3 pre-tokenizer, f16, untied classifier
    m = E.Model("llama", 8, 16, 1024, 64, tied=False)
    m.layers = [E.Layer(2, 2, 4), E.Layer(2, 1, 4, window=8)]
    m.tokenizer = bytelevel_tokenizer("bytelevel_llama3_style", 1024)
    yield "llama_llama3_tokenizer_f16", tensors(m), "f16"
    # SentencePiece-style tokenizers with byte fallback (both libraries' ways); every layer slides
    for style, name in ((False, "llama_sentencepiece_tokenizer_f32"), (True, "llama_metaspace_tokenizer_f32")):
        tok, vocab = sentencepiece_tokenizer(style)
        m = E.Model("llama", 8, 16, vocab, 32, tied=True)
        m.layers = [E.Layer(2, 1, 4, window=4), E.Layer(2, 2, 4, window=4)]
        m.tokenizer = tok
        yield name, tensors(m), "f32"
    # GPT-2 style: LayerNorm with bias, learned positions, plain GELU MLP, q/k/v and output biases
    m = E.Model("gpt2", 8, 32, 32, 16, norm_kind=E.NORM_LAYER, mlp_kind=E.MLP_PLAIN, activation=E.ACT_GELU_TANH,
                position_kind=E.POS_LEARNED, tied=True)
    m.layers = [E.Layer(2, 2, 4, rope_dim=0, flags=E.LAYER_QKV_BIAS | E.LAYER_O_BIAS) for _ in range(2)]
    yield "gpt2_learned_positions_f32", tensors(m), "f32"
    # Qwen3 style: q/k norm, q width != dim, partial rotary, qkv bias, sliding + full
    m = E.Model("qwen3", 8, 16, 32, 64, tied=True)
    m.layers = [E.Layer(4, 2, 4, window=4, rope_dim=2, flags=E.LAYER_QK_NORM | E.LAYER_QKV_BIAS),
                E.Layer(4, 1, 4, flags=E.LAYER_QK_NORM)]
    yield "qwen3_qk_norm_bf16", tensors(m), "bf16"
    # Gemma 2/3 style: post-norms, soft-caps, embedding scale, exact GELU, a precomputed RoPE table
    m = E.Model("gemma2", 8, 16, 32, 64, activation=E.ACT_GELU, embed_scale=8 ** 0.5, final_softcap=30.0, tied=True)
    post = E.LAYER_POST_ATTN_NORM | E.LAYER_POST_MLP_NORM
    table = m.rope_table_for(1.0 / (10000.0 ** (np.arange(0, 4, 2) / 4)) / 8.0)
    m.layers = [E.Layer(2, 1, 4, window=4, attn_softcap=50.0, flags=post),
                E.Layer(2, 1, 4, rope_table=table, attn_softcap=50.0, flags=post)]
    yield "gemma_softcaps_rope_table_f32", tensors(m), "f32"
    # q8_0: matrices of 32 or 64 columns hold int8 groups with f16 scales; w_down (48 columns) stays f32
    m = E.Model("llama", 32, 48, 32, 64, tied=False)
    m.layers = [E.Layer(4, 2, 8, window=4), E.Layer(4, 1, 8)]
    yield "llama_q8_0", tensors(m), "q8_0"
    # a chat template (docs/CHAT.md) and the special-token strings it reads, over the GPT-2-style tokenizer
    m = E.Model("llama", 8, 16, 1024, 64, tied=True)
    m.layers = [E.Layer(2, 1, 4)]
    m.tokenizer = bytelevel_tokenizer("bytelevel_gpt2_style", 1024)
    m.chat = E.pack_chat_section(CHAT_TEMPLATE, [("bos_token", "<|endoftext|>"), ("eos_token", "<|endoftext|>")])
    yield "llama_chat_template_bf16", tensors(m), "bf16"


# seeds of fuzz_chat: templates in the shapes the families use (written for attn.c)
CHAT_SEEDS = {
    "nested": CHAT_TEMPLATE,
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "inst": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
            "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
            "{% for m in rest %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('roles must alternate') }}{% endif %}{% if m['role'] == 'user' %}"
            "{{ '[INST] ' + (first if loop.first else '') + m['content'].strip() + ' [/INST]' }}"
            "{% else %}{{ ' ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}",
    "headers": "{{- bos_token }}{%- set date = strftime_now('%d %b %Y') if strftime_now is defined else '1 Jan 2025' %}\n"
               "{%- for m in messages %}\n    {{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' }}\n"
               "    {%- if loop.first and m.role == 'system' %}{{ 'Today: ' ~ date ~ '\\n' }}{% endif %}\n"
               "    {{- m.content | trim + '<|eot_id|>' }}\n{%- endfor %}\n"
               "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n",
}


def write_chat_seeds(out):
    os.makedirs(out, exist_ok=True)
    for name, template in CHAT_SEEDS.items():
        with open(os.path.join(out, name + ".jinja"), "w") as f:
            f.write(template)


def shared_tokenizer_models(shared, out_dir):
    """Tiny models carrying the real Llama 2 tokenizers from $ATTN_SHARED (32000 pieces; they come from
    another project, so they are written under build/ for fuzz_tokenizer and never committed)."""
    for rel, name in (("tokenizers/llama2_sentencepiece/tokenizer.model", "tok_llama2_sentencepiece.bin"),
                      ("tokenizers/llama2_hf_json/tokenizer.json", "tok_llama2_hf_json.bin")):
        path = os.path.join(shared, rel)
        if not os.path.exists(path):
            print(f"make_seeds: {path} not found: skipped", file=sys.stderr)
            continue
        m = E.Model("llama", 8, 16, 32000, 64, tied=True)
        m.layers = [E.Layer(2, 2, 4)]
        m.tokenizer = E.read_tokenizer(path, 32000)
        E.write_model(tensors(m), os.path.join(out_dir, name), E.DTYPES["bf16"])


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--shared":  # make_seeds.py --shared SHARED_DIR OUT_DIR
        os.makedirs(sys.argv[3], exist_ok=True)
        shared_tokenizer_models(sys.argv[2], sys.argv[3])
        templates = os.path.join(sys.argv[2], "llamacpp", "templates")  # real templates, for fuzz_chat
        if os.path.isdir(templates):
            os.makedirs(os.path.join(sys.argv[3], "corpus", "chat"), exist_ok=True)
            for name in os.listdir(templates):
                shutil.copy(os.path.join(templates, name), os.path.join(sys.argv[3], "corpus", "chat", name))
        return 0
    os.makedirs(OUT, exist_ok=True)
    for name, m, dtype in seeds():
        path = os.path.join(OUT, name + ".bin")
        E.write_model(m, path, E.DTYPES[dtype])
    write_chat_seeds(os.path.join(ROOT, "fuzz", "corpus", "chat"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
