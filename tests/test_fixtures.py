"""End to end: every fixture family exported with export.py matches the Hugging Face reference logits at
every position, fed one token at a time through the KV cache, and its greedy continuation; the same from a
config rewritten in the transformers 4 dialect; the llama2.c legacy checkpoint likewise."""
import copy
import json
import os
import sys

import numpy as np

from harness import fixture_dir, ids_of, relative_error, write_safetensors, ROOT

sys.path.insert(0, ROOT)
from export import SafeTensors  # noqa: E402

FIXTURES = ["llama_gqa", "llama_mqa", "llama_mha_rope31", "mistral_swa", "qwen2_mixed", "qwen3_mixed",
            "gemma2", "gemma3", "gpt2", "phi3", "starcoder_mqa"]
TOLERANCE = 1e-4       # max |delta| relative to max(1, max |ref|)
MARGIN_FLOOR = 1e-3    # greedy ids are compared up to the first step whose top1-top2 margin is below this


def compare_fixture(t, label, model, ref_dir):
    ref = json.load(open(os.path.join(ref_dir, "ref.json")))
    want = np.load(os.path.join(ref_dir, "ref_logits.npy"))
    got = t.logits(model, ref["input_ids"], "--batch", "1")
    err = relative_error(got, want)
    t.check(f"{label}: logits at all {len(ref['input_ids'])} positions, token by token (max rel err {err:.1e})",
            got.shape == want.shape and err <= TOLERANCE)
    r = t.run([model, "--tokens", ",".join(map(str, ref["prompt_ids"])), "-n", len(ref["greedy_ids"]), "-t", "0",
               "--print-ids"])
    ids = ids_of(r.stdout)
    n = next((i for i, m in enumerate(ref["greedy_top1_top2_margin"]) if m < MARGIN_FLOOR), len(ref["greedy_ids"]))
    t.check(f"{label}: greedy ids ({n} steps compared)", r.returncode == 0 and ids[:n] == ref["greedy_ids"][:n],
            f"got {ids[:n]}, want {ref['greedy_ids'][:n]}")
    return err


def transformers4_config(cfg):
    """The same config as transformers 4 wrote it: rope_theta / rope_scaling instead of rope_parameters,
    Gemma 3's rope_local_base_freq, and the older sliding-window rules instead of layer_types where those
    can express the pattern (Qwen2's use_sliding_window + max_window_layers, Gemma 2's even layers,
    Gemma 3's sliding_window_pattern)."""
    c = copy.deepcopy(cfg)
    params = c.pop("rope_parameters", None) or {}
    if "full_attention" in params:  # Gemma 3: one entry per layer type
        c["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        params = params["full_attention"]
    c["rope_theta"] = params.get("rope_theta", 10000.0)
    if params.get("rope_type", "default") != "default":
        c["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    if "partial_rotary_factor" in params:
        c["partial_rotary_factor"] = params["partial_rotary_factor"]
    if c["model_type"] in ("qwen2", "gemma2", "gemma3_text"):
        c.pop("layer_types", None)
    if c["model_type"] == "gemma3_text":
        c["sliding_window_pattern"] = c.pop("_sliding_window_pattern", 6)
    c["transformers_version"] = "4.46.0"
    return c


def run(t):
    errors = {}
    for name in FIXTURES:
        src = os.path.join(t.data, "fixtures", name)
        model = t.export(src, f"{name}.bin")
        errors[name] = compare_fixture(t, name, model, src)

        # the transformers 4 dialect must give the very same model file
        cfg = json.load(open(os.path.join(src, "config.json")))
        d = fixture_dir(t, name, f"{name}_t4", transformers4_config(cfg))
        model4 = t.export(d, f"{name}_t4.bin")
        same = open(model, "rb").read() == open(model4, "rb").read()
        t.check(f"{name}: transformers-4 dialect config exports the identical model file", same)

    # a stale _sliding_window_pattern must not override layer_types (Gemma 3)
    src = os.path.join(t.data, "fixtures", "gemma3")
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["_sliding_window_pattern"] = 2
    model = t.export(fixture_dir(t, "gemma3", "gemma3_stale_pattern", cfg), "gemma3_stale_pattern.bin")
    t.check("gemma3: layer_types wins over a stale _sliding_window_pattern",
            open(model, "rb").read() == open(t.export(src, "gemma3.bin"), "rb").read())

    # Gemma 3 multimodal checkpoints keep the text model under a language_model prefix, its config in
    # text_config; the exporter must take out exactly the text model (vision tensors ignored)
    for style, prefix in (("t4", "language_model.model."), ("t5", "model.language_model.")):
        d = t.tmp(f"gemma3_multimodal_{style}")
        os.makedirs(d, exist_ok=True)
        text_cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}
        text_cfg.pop("_sliding_window_pattern")
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                       "text_config": text_cfg, "vision_config": {"model_type": "siglip_vision_model"}}, f)
        st = SafeTensors(src)
        tensors = {n.replace("model.", prefix, 1): st.get(n) for n in st.names()}
        tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3), np.float32)
        write_safetensors(os.path.join(d, "model.safetensors"), tensors)
        model = t.export(d, f"gemma3_multimodal_{style}.bin")
        t.check(f"gemma3: multimodal checkpoint ({prefix}*, text_config) exports the text model exactly",
                open(model, "rb").read() == open(t.export(src, "gemma3.bin"), "rb").read())

    # llama2.c legacy checkpoint of the llama_gqa fixture (Meta q/k order, untied classifier)
    legacy = t.export(os.path.join(t.data, "llama2c", "llama_gqa_legacy.bin"), "llama_gqa_legacy.bin")
    compare_fixture(t, "llama2.c legacy llama_gqa", legacy, os.path.join(t.data, "fixtures", "llama_gqa"))
    print("# max relative logit error per fixture: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
