#!/usr/bin/env python3
"""Writes the fuzz seed corpus fuzz/corpus/model/*.bin: tiny model files (random weights, a few KB each)
that together use every part of the format the loader checks -- RMSNorm and LayerNorm, gated and plain
MLPs, mixtures of experts (every router kind, grouped routing, biases, shared experts, stacked 3-D expert
tensors in f32 and q8_0), latent attention (with and without a low-rank query), rotary and learned positions,
NoPE, sliding, chunked and full layers, GQA, every
kind of q/k norm, learned sinks, attention temperature, biases, pre- and post-norms, soft-caps,
precomputed RoPE tables (one with YaRN's attention factor), recurrent mixers (Mamba, Mamba-2 and Gated DeltaNet beside attention, RWKV with its channel-mix FFN), f32 / f16 / bf16 / q8_0 / q4_0 matrices, and tokenizer records of both kinds (byte-level BPE
with the GPT-2 and Llama 3 pre-tokenizers and with a sequence of regex Split steps; SentencePiece-style with <0xNN> byte pieces, merged by score as
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


def tensors(m):
    """Random weights for every tensor the tensor table (tensors.def) asks of m: norm weights 1, the rest
    N(0, 0.3^2)."""
    for name, (shape, _) in E.expected_tensors(m).items():
        norm = name.endswith("norm") or name.endswith("norm_full")
        m.add(name, shape, (lambda s=shape: np.ones(s, np.float32)) if norm else
              (lambda s=shape: (rng.standard_normal(s) * 0.3).astype(np.float32)))
    return m


def bytelevel_tokenizer(folder, vocab):
    src = os.path.join(ROOT, "tests", "data", "tokenizers", folder)
    return E.hf_tokenizer(src, {}, vocab)


def split_steps_tokenizer(vocab):
    """A byte-level record whose pre-tokenizer is a sequence of regex Split steps (pretokenizer 5): every
    behavior, an inverted step, and the constructs regex.c compiles (classes, \\p{..}, scripts, (?i:...),
    lookahead, possessive and atomic repeats, counted repeats), then ByteLevel's own regex."""
    src = os.path.join(ROOT, "tests", "data", "tokenizers", "bytelevel_gpt2_style", "tokenizer.json")
    tok = E.load_json(src)
    split = lambda regex, behavior="Isolated", invert=False: {  # noqa: E731
        "type": "Split", "pattern": {"Regex": regex}, "behavior": behavior, "invert": invert}
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        split(r"[\r\n]"), split(r"(?i:'s|'t)|\p{Lu}[\p{Ll}\p{M}]*+|(?>\p{N}{1,3})", "MergedWithPrevious"),
        split(r"\s+(?=\S)", "MergedWithNext"), split(r"[\p{P}\p{S}]", "Contiguous"), split(r"\p{Han}+", "Removed"),
        split(r"x", "Isolated", True), {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    return E.tokenizer_from_json(src, tok, {}, vocab, [os.path.dirname(src)])


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


def attn(heads, kv, head_dim, **kw):
    return E.Attention(heads, kv, head_dim, **kw)


def seeds():
    A, D, L = E.Attention, E.Dense, E.Layer
    # Llama-style: RMSNorm, SwiGLU, RoPE, GQA, one sliding and one full layer, byte-level tokenizer (GPT-2 rule)
    m = E.Model("llama", 8, 1024, 64, tied=True)
    m.layers = [L(A(2, 1, 4, window=4), D(16)), L(A(2, 1, 4), D(16))]
    m.tokenizer = bytelevel_tokenizer("bytelevel_gpt2_style", 1024)
    yield "llama_gpt2_tokenizer_bf16", tensors(m), "bf16"
    # the same with the Llama 3 pre-tokenizer, f16, untied classifier
    m = E.Model("llama", 8, 1024, 64, tied=False)
    m.layers = [L(A(2, 2, 4), D(16)), L(A(2, 1, 4, window=8), D(16))]
    m.tokenizer = bytelevel_tokenizer("bytelevel_llama3_style", 1024)
    yield "llama_llama3_tokenizer_f16", tensors(m), "f16"
    # SentencePiece-style tokenizers with byte fallback (both libraries' ways); every layer slides
    for style, name in ((False, "llama_sentencepiece_tokenizer_f32"), (True, "llama_metaspace_tokenizer_f32")):
        tok, vocab = sentencepiece_tokenizer(style)
        m = E.Model("llama", 8, vocab, 32, tied=True)
        m.layers = [L(A(2, 1, 4, window=4), D(16)), L(A(2, 2, 4, window=4), D(16))]
        m.tokenizer = tok
        yield name, tensors(m), "f32"
    # GPT-2 style: LayerNorm with bias, learned positions, plain GELU MLP, q/k/v and output biases
    m = E.Model("gpt2", 8, 32, 16, norm_kind=E.NORM_LAYER, position_kind=E.POS_LEARNED, tied=True)
    m.layers = [L(A(2, 2, 4, rope_dim=0, flags=E.ATTN_QKV_BIAS | E.ATTN_O_BIAS),
                  D(32, E.ACT_GELU_TANH, gated=False, flags=E.FFN_BIAS)) for _ in range(2)]
    yield "gpt2_learned_positions_f32", tensors(m), "f32"
    # Qwen3 style: q/k norm, q width != dim, partial rotary, qkv bias, sliding + full
    m = E.Model("qwen3", 8, 32, 64, tied=True)
    m.layers = [L(A(4, 2, 4, window=4, rope_dim=2, flags=E.ATTN_QK_NORM | E.ATTN_QKV_BIAS), D(16)),
                L(A(4, 1, 4, flags=E.ATTN_QK_NORM), D(16))]
    yield "qwen3_qk_norm_bf16", tensors(m), "bf16"
    # Gemma 2/3 style: post-norms, soft-caps, embedding scale, exact GELU, a precomputed RoPE table
    m = E.Model("gemma2", 8, 32, 64, embed_scale=8 ** 0.5, final_softcap=30.0, tied=True)
    sandwich = E.LAYER_MIXER_NORM | E.LAYER_FFN_NORM | E.LAYER_MIXER_POST_NORM | E.LAYER_FFN_POST_NORM
    table = m.rope_table_for(1.0 / (10000.0 ** (np.arange(0, 4, 2) / 4)) / 8.0)
    m.layers = [L(A(2, 1, 4, window=4, attn_softcap=50.0), D(16, E.ACT_GELU), sandwich),
                L(A(2, 1, 4, rope_table=table, attn_softcap=50.0), D(16, E.ACT_GELU), sandwich)]
    yield "gemma_softcaps_rope_table_f32", tensors(m), "f32"
    # q8_0: matrices of 32 or 64 columns hold int8 groups with f16 scales; ffn.w_down (48 columns) stays f32
    m = E.Model("llama", 32, 32, 64, tied=False)
    m.layers = [L(A(4, 2, 8, window=4), D(48)), L(A(4, 1, 8), D(48))]
    yield "llama_q8_0", tensors(m), "q8_0"
    # gpt-oss style: learned sinks, biases, a YaRN table with its attention factor, a mixture of experts with
    # router and expert biases, top-k softmax routing and the clamped SwiGLU
    m = E.Model("gpt_oss", 8, 32, 64, tied=False)
    inv, factor = E.rope_inv_freq(150000.0, 4, {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 16,
                                                "truncate": False}, 64)
    table = m.rope_table_for(inv)
    moe = lambda: E.MoE(4, 2, 8, E.ACT_SWIGLU_CLAMPED, E.ROUTER_TOPK_SOFTMAX, act_alpha=1.702, act_limit=7.0,  # noqa: E731
                        flags=E.MOE_ROUTER_BIAS | E.MOE_EXPERT_BIAS)
    bias = E.ATTN_QKV_BIAS | E.ATTN_O_BIAS | E.ATTN_SINKS
    m.layers = [L(A(2, 1, 4, window=4, rope_table=table, rope_attn_factor=factor, flags=bias), moe()),
                L(A(2, 1, 4, rope_table=table, rope_attn_factor=factor, flags=bias), moe())]
    yield "gpt_oss_moe_sinks_f32", tensors(m), "f32"
    # Llama 4 / DeepSeek style, q8_0 (experts stacked, every matrix 32 wide): a chunked layer with weightless
    # q/k norm, a NoPE layer with attention temperature, sigmoid routing that scales the experts' input,
    # grouped top-k with a selection bias, a gated shared expert, and a dense layer in between
    m = E.Model("llama4_text", 32, 32, 64, tied=True)
    moe = E.MoE(4, 2, 32, E.ACT_SILU, E.ROUTER_SIGMOID, n_groups=2, topk_groups=1, shared_hidden=32, routed_scale=2.5,
                flags=E.MOE_SCALE_INPUT | E.MOE_SCORE_BIAS | E.MOE_GROUP_TOP2 | E.MOE_SHARED_GATE | E.MOE_NORM_TOPK)
    m.layers = [L(A(2, 1, 16, chunk=4, flags=E.ATTN_QK_NORM_PLAIN), moe),
                L(A(2, 1, 16, rope_dim=0, temperature_floor=4.0, temperature_scale=0.1), D(32)),
                L(A(2, 2, 16, chunk=4, flags=E.ATTN_QK_NORM_PLAIN), moe)]
    yield "llama4_chunked_moe_q8_0", tensors(m), "q8_0"
    # OLMo 3 / EXAONE 4 style: norms after the blocks only, q/k norm over the whole projection
    m = E.Model("olmo3", 8, 32, 64, tied=False)
    post = E.LAYER_MIXER_POST_NORM | E.LAYER_FFN_POST_NORM
    m.layers = [L(A(2, 1, 4, window=4, flags=E.ATTN_QK_NORM_FULL), D(16), post), L(A(2, 1, 4, rope_dim=0), D(16), post)]
    yield "olmo_post_norms_bf16", tensors(m), "bf16"
    # the whole-file checks (docs/FORMAT.md, "What the loader checks"): more than 16 eos ids, special tokens that
    # share prefixes and suffixes (the matcher's automaton) with lstrip / rstrip, a window that covers the
    # context (full attention), a scaled rope table, q8_0 groups of weights near 4e-6 (the smallest scales)
    m = E.Model("llama", 32, 300, 16, tied=True)
    table = m.rope_table_for(1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8)) / 4.0)
    m.layers = [L(A(4, 2, 8, window=16, rope_table=table), D(32)), L(A(4, 4, 8, window=8), D(32))]
    m.tokenizer = specials_tokenizer(300)
    tensors(m)
    tiny = lambda: (rng.uniform(-4e-6, 4e-6, (32, 32))).astype(np.float32)  # noqa: E731
    m.tensors = [(n, s, tiny if n == "layers.0.attn.wq" else f) for n, s, f in m.tensors]
    yield "llama_specials_many_eos_q8_0", m, "q8_0"
    # a pre-tokenizer of regex Split steps (pretokenizer 5)
    m = E.Model("llama", 8, 1024, 256, tied=True)
    m.layers = [L(A(2, 1, 4), D(16))]
    m.tokenizer = split_steps_tokenizer(1024)
    yield "llama_split_steps_tokenizer_f32", tensors(m), "f32"

    # DeepSeek style: latent attention with and without the low-rank query pair, a YaRN table with its attention
    # factor, a dense layer, then V3's experts (sigmoid, selection bias, groups of two-expert sums, shared) and
    # V2's (softmax, best-expert groups)
    m = E.Model("deepseek_v3", 16, 32, 64, tied=False)
    inv, factor = E.rope_inv_freq(10000.0, 4, {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                                               "original_max_position_embeddings": 16}, 64)
    table = m.rope_table_for(inv)
    mla = lambda q_rank: E.LatentAttention(2, q_rank, 8, 4, 4, 6, rope_table=table, rope_attn_factor=factor,  # noqa: E731
                                           softmax_mscale=1.3)
    m.layers = [L(mla(8), D(16)),
                L(mla(0), E.MoE(4, 2, 8, E.ACT_SILU, E.ROUTER_SIGMOID, n_groups=2, topk_groups=1, shared_hidden=8,
                                routed_scale=2.5, flags=E.MOE_SCORE_BIAS | E.MOE_GROUP_TOP2 | E.MOE_NORM_TOPK)),
                L(mla(8), E.MoE(4, 2, 8, E.ACT_SILU, E.ROUTER_SOFTMAX, n_groups=2, topk_groups=1, shared_hidden=16))]
    yield "deepseek_latent_attention_f32", tensors(m), "f32"
    # recurrent layers (a state of fixed size instead of a KV cache): Mamba with convolution and projection
    # biases, no FFN, no positions
    m = E.Model("mamba", 16, 32, 64, tied=True)
    m.layers = [L(E.Mamba(32, 4, 4, 2, flags=E.SSM_CONV_BIAS | E.SSM_PROJ_BIAS), None, E.LAYER_MIXER_NORM)
                for _ in range(2)]
    yield "mamba_biases_f32", tensors(m), "f32"
    # Granite-4.0-H style, bf16: Mamba-2 layers (2 groups, dt limits) around a NoPE attention layer, a mixture of
    # experts with a shared expert, the embedding / residual / logit multipliers
    m = E.Model("granitemoehybrid", 16, 32, 64, embed_scale=12.0, residual_scale=0.22, logit_scale=0.25, tied=False)
    moe = E.MoE(4, 2, 16, E.ACT_SILU, E.ROUTER_TOPK_SOFTMAX, shared_hidden=32)
    m.layers = [L(E.Mamba2(4, 8, 2, 4, 4, 3, 0.001, 100.0, flags=E.SSM_CONV_BIAS), moe),
                L(A(4, 2, 4, rope_dim=0, attn_scale=0.0625), moe),
                L(E.Mamba2(4, 8, 1, 4, 2, 8, flags=E.SSM_PROJ_BIAS), D(16))]
    yield "granite_mamba2_hybrid_bf16", tensors(m), "bf16"
    # Qwen3-Next style, q8_0 (every matrix 32 wide): Gated DeltaNet layers (2 key / 4 value heads, a convolution
    # bias) around a gated attention layer with q/k norm and partial rope, MoE with a gated shared expert
    m = E.Model("qwen3_next", 32, 32, 64, tied=False)
    moe = E.MoE(4, 2, 32, E.ACT_SILU, E.ROUTER_SOFTMAX, shared_hidden=32, flags=E.MOE_NORM_TOPK | E.MOE_SHARED_GATE)
    m.layers = [L(E.DeltaNet(2, 4, 8, 8, 4, 3, flags=E.SSM_CONV_BIAS), D(32)),
                L(A(2, 1, 16, rope_dim=4, flags=E.ATTN_QK_NORM | E.ATTN_OUTPUT_GATE), moe),
                L(E.DeltaNet(1, 2, 16, 8, 2, 64), moe)]
    yield "qwen3_next_deltanet_hybrid_q8_0", tensors(m), "q8_0"
    # RWKV-4 style, f16: LayerNorm with biases, time mixing and the channel-mix FFN
    m = E.Model("rwkv", 16, 32, 64, norm_kind=E.NORM_LAYER, tied=False)
    m.layers = [L(E.Rwkv(16), E.RwkvChannelMix(32)), L(E.Rwkv(8), E.RwkvChannelMix(16))]
    yield "rwkv_layernorm_f16", tensors(m), "f16"
    # a chat template (docs/CHAT.md) and the special-token strings it reads, over the GPT-2-style tokenizer
    m = E.Model("llama", 8, 1024, 64, tied=True)
    m.layers = [L(A(2, 1, 4), D(16))]
    m.tokenizer = bytelevel_tokenizer("bytelevel_gpt2_style", 1024)
    m.chat = E.pack_chat_section(CHAT_TEMPLATE, [("bos_token", "<|endoftext|>"), ("eos_token", "<|endoftext|>")])
    yield "llama_chat_template_bf16", tensors(m), "bf16"
    # q4_0: matrices of 64 columns hold 4-bit pairs of groups; ffn.w_down (96 columns) falls back to q8_0
    m = E.Model("llama", 64, 32, 64, tied=False)
    m.layers = [L(A(4, 2, 16, window=4), D(96)), L(A(4, 1, 16), D(96))]
    yield "llama_q4_0", tensors(m), "q4_0"


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


def specials_tokenizer(vocab):
    """A byte-level record with 40 eos ids and special / user-defined tokens nested in one another."""
    rec = E.TokenizerRecord(E.TOK_BYTELEVEL_BPE, vocab, "make_seeds")
    for b in range(256):
        rec.set_piece(b, bytes([b]), E.PIECE_NORMAL)
    specials = [b"<|a|>", b"<|ab|>", b"<|abc|>", b"<|b|>", b"|>", b"<|", b"<|im_start|>", b"<|im_end|>", b"<s>", b"</s>",
                b"<s><s>", b"[INST]", b"[/INST]", b"<|a|><|b|>", b"\n\n", b"  "]
    for i, s in enumerate(specials):
        kind = E.PIECE_SPECIAL if i % 3 else E.PIECE_USER
        rec.set_piece(256 + i, s, kind | (E.PIECE_LSTRIP if i % 4 == 1 else 0) | (E.PIECE_RSTRIP if i % 5 == 2 else 0))
    rec.pretokenizer = E.PRE_GPT2
    rec.eos = list(range(256, 296))
    return rec.pack()


def shared_tokenizer_models(shared, out_dir):
    """Tiny models carrying the real Llama 2 tokenizers from $ATTN_SHARED (32000 pieces; they come from
    another project, so they are written under build/ for fuzz_tokenizer and never committed)."""
    for rel, name in (("tokenizers/llama2_sentencepiece/tokenizer.model", "tok_llama2_sentencepiece.bin"),
                      ("tokenizers/llama2_hf_json/tokenizer.json", "tok_llama2_hf_json.bin")):
        path = os.path.join(shared, rel)
        if not os.path.exists(path):
            print(f"make_seeds: {path} not found: skipped", file=sys.stderr)
            continue
        m = E.Model("llama", 8, 32000, 64, tied=True)
        m.layers = [E.Layer(E.Attention(2, 2, 4), E.Dense(16))]
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
