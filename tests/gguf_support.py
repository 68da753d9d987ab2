"""Writing GGUF files for the tests with llama.cpp's own gguf-py (from $ATTN_SHARED/llamacpp/gguf-py, never
committed): the fixtures as convert_hf_to_gguf.py would convert them, quantized with gguf-py's quantizers."""
import math
import os
import sys
import types

import numpy as np

from harness import ROOT

sys.path.insert(0, ROOT)
from export import SafeTensors  # noqa: E402


def import_gguf(t, name):
    """llama.cpp's gguf package, or None after t.shared_file has reported the skip / failure. Its __init__
    imports sentencepiece and yaml for parts the tests do not use: stand-ins are put in where they are missing."""
    path = t.shared_file("llamacpp/gguf-py/gguf/__init__.py", name)
    if not path:
        return None
    for missing in ("sentencepiece", "yaml"):
        try:
            __import__(missing)
        except ImportError:
            stub = types.ModuleType(missing)
            stub.SentencePieceProcessor = None
            sys.modules[missing] = stub
    sys.path.insert(0, os.path.dirname(os.path.dirname(path)))
    import gguf
    return gguf


ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2", "gpt_bigcode": "starcoder"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up"}
GEMMA_LAYER = dict(LAYER, post_attention_layernorm="post_attention_norm", pre_feedforward_layernorm="ffn_norm",
                   post_feedforward_layernorm="post_ffw_norm")
GPT2_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def permute(w, n_head):
    """convert_hf_to_gguf's LlamaModel.permute: rotate-half rows into interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(params, head_dim):
    """The rope_freqs tensor convert_hf_to_gguf writes for rope_type llama3."""
    base, factor = params["rope_theta"], params["factor"]
    low, high, old = params["low_freq_factor"], params["high_freq_factor"], params["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def gguf_tensors(cfg, st):
    """(GGUF name, float32 array in GGUF layout) for every tensor of a fixture, as convert_hf_to_gguf writes them."""
    family = cfg["model_type"]
    arch = ARCH[family]
    out = []
    if arch in ("gpt2", "starcoder"):
        for name in st.names():
            w = st.get(name)
            parts = name.split(".")
            if parts[:2] == ["transformer", "wte"]:
                out.append(("token_embd.weight", w))
                out.append(("output.weight", w))  # GPT-2 conversions store the tied classifier too
            elif parts[:2] == ["transformer", "wpe"]:
                out.append(("position_embd.weight", w))
            elif parts[:2] == ["transformer", "ln_f"]:
                out.append((f"output_norm.{parts[-1]}", w))
            elif parts[1] == "h":
                sub = ".".join(parts[3:-1])
                if arch == "gpt2" and parts[-1] == "weight" and w.ndim == 2:
                    w = w.T  # Conv1D [in, out] -> [out, in]
                out.append((f"blk.{parts[2]}.{GPT2_LAYER[sub]}.{parts[-1]}", np.ascontiguousarray(w)))
        return out
    gemma = arch in ("gemma2", "gemma3")
    names = GEMMA_LAYER if gemma else LAYER
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    for name in st.names():
        w = st.get(name)
        if gemma and name.endswith("norm.weight"):
            w = w + 1  # convert_hf_to_gguf stores Gemma's (1 + w)
        if name == "model.embed_tokens.weight":
            out.append(("token_embd.weight", w))
        elif name == "model.norm.weight":
            out.append(("output_norm.weight", w))
        elif name == "lm_head.weight":
            out.append(("output.weight", w))
        else:
            parts = name.split(".")
            sub = ".".join(parts[3:-1])
            if arch == "llama" and sub == "self_attn.q_proj":
                w = permute(w, n_head)
            elif arch == "llama" and sub == "self_attn.k_proj":
                w = permute(w, n_kv)
            out.append((f"blk.{parts[2]}.{names[sub]}.{parts[-1]}", np.ascontiguousarray(w)))
    params = cfg.get("rope_parameters") or {}
    if params.get("rope_type") == "llama3":
        out.append(("rope_freqs.weight", llama3_rope_factors(params, cfg["head_dim"])))
    return out


def add_metadata(w, gguf, cfg):
    """The hyperparameters convert_hf_to_gguf writes, plus the sliding-window layout where the family needs it."""
    arch = ARCH[cfg["model_type"]]
    a = arch
    if arch in ("gpt2", "starcoder"):
        w.add_uint32(f"{a}.context_length", cfg["n_positions"])
        w.add_uint32(f"{a}.embedding_length", cfg["n_embd"])
        w.add_uint32(f"{a}.block_count", cfg["n_layer"])
        w.add_uint32(f"{a}.feed_forward_length", cfg.get("n_inner") or 4 * cfg["n_embd"])
        w.add_uint32(f"{a}.attention.head_count", cfg["n_head"])
        w.add_uint32(f"{a}.attention.head_count_kv", 1 if cfg.get("multi_query") else cfg["n_head"])
        w.add_float32(f"{a}.attention.layer_norm_epsilon", cfg["layer_norm_epsilon"])
        return
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # Gemma 3: the global layers' theta is rope.freq_base
        params = params["full_attention"]
    w.add_uint32(f"{a}.context_length", cfg["max_position_embeddings"])
    w.add_uint32(f"{a}.embedding_length", cfg["hidden_size"])
    w.add_uint32(f"{a}.block_count", cfg["num_hidden_layers"])
    w.add_uint32(f"{a}.feed_forward_length", cfg["intermediate_size"])
    w.add_uint32(f"{a}.attention.head_count", cfg["num_attention_heads"])
    w.add_uint32(f"{a}.attention.head_count_kv", cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    w.add_float32(f"{a}.rope.freq_base", params.get("rope_theta", 10000.0))
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_uint32(f"{a}.attention.key_length", head_dim)
    w.add_uint32(f"{a}.attention.value_length", head_dim)
    w.add_uint32(f"{a}.rope.dimension_count", int(head_dim * params.get("partial_rotary_factor", 1.0)))
    if arch in ("gemma2", "gemma3"):
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if cfg.get(key):
                w.add_float32(f"{a}.{key}", cfg[key])
    types_ = cfg.get("layer_types")
    if cfg.get("sliding_window") and (types_ is None or "sliding_attention" in types_):
        w.add_uint32(f"{a}.attention.sliding_window", cfg["sliding_window"])
        default = {"gemma2": 2, "gemma3": 6}.get(arch, 1)
        implied = ["sliding_attention" if default <= 1 or i % default < default - 1 else "full_attention"
                   for i in range(cfg["num_hidden_layers"])]
        if types_ is not None and types_ != implied:  # a per-layer pattern llama.cpp's family default would not give
            w.add_array(f"{a}.attention.sliding_window_pattern", [t == "sliding_attention" for t in types_])


def write_fixture_gguf(gguf, src_dir, path, qtype=None, dequantized=False):
    """The fixture in src_dir as a GGUF file: matrices in qtype (gguf-py's quantizer) where their rows are whole
    blocks, F32 otherwise and for vectors, as llama.cpp's quantizer falls back. dequantized: the same values,
    stored as F32 after gguf-py's own dequantizer (the reference for export.py's)."""
    import json
    cfg = json.load(open(os.path.join(src_dir, "config.json")))
    st = SafeTensors(src_dir)
    w = gguf.GGUFWriter(path, ARCH[cfg["model_type"]])
    add_metadata(w, gguf, cfg)
    for name, arr in gguf_tensors(cfg, st):
        add_tensor(w, gguf, name, arr, qtype, dequantized)
    finish(w)


def add_tensor(w, gguf, name, arr, qtype, dequantized=False):
    arr = np.asarray(arr, dtype=np.float32)
    block = gguf.GGML_QUANT_SIZES[qtype][0] if qtype is not None else 1
    if qtype is None or arr.ndim != 2 or arr.shape[1] % block:
        w.add_tensor(name, arr)
    elif dequantized:
        w.add_tensor(name, gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype))
    else:
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
