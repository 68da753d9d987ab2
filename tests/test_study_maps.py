"""--attn-map / --attn-dump: the PNG is valid (signature, chunk CRCs, IHDR, zlib stream, size) and shows the
masks (grey exactly where a key is hidden); the recorded weights of every row sum to 1 and are 0 outside
the mask - on kjv-5m as wired (the window's band), with every override, and on fixtures."""
import json
import os

import numpy as np

from study_support import ONE_THREAD, mask_matrix, read_png

KJV_LAYERS = [("sliding", 64, 0), ("sliding", 64, 0), ("causal", 0, 0), ("sliding", 64, 0), ("sliding", 64, 0),
              ("causal", 0, 0)]
GAP = 3          # pixels around and between panels (study.c)
MASKED = 1       # palette index of a hidden key


def dump(t, model, ids, n_heads, n_layers, *flags):
    png, raw = t.tmp("map.png"), t.tmp("map.bin")
    for f in (png, raw):
        if os.path.exists(f):
            os.unlink(f)
    r = t.run([model, "--tokens", ",".join(map(str, ids)), "-n", "0", "--attn-map", png, "--attn-dump", raw] + list(flags)
              + list(ONE_THREAD))
    if r.returncode != 0:
        return None, None, r.stderr.decode(errors="replace").strip()
    n = len(ids)
    weights = np.fromfile(raw, dtype="<f4")
    if weights.size != n_layers * n_heads * n * n:
        return None, None, f"dump has {weights.size} floats, want {n_layers}x{n_heads}x{n}x{n}"
    return png, weights.reshape(n_layers, n_heads, n, n), ""


def check_weights(t, label, weights, layers):
    """rows sum to 1, zero outside the mask, and the mask's keys really get weight"""
    n = weights.shape[-1]
    sums_ok = mask_ok = 1
    for w, (kind, span, sinks) in zip(weights, layers):
        mask = mask_matrix(kind, span, sinks, n)
        sums_ok &= bool(np.allclose(w.sum(axis=-1), 1.0, atol=1e-5))
        mask_ok &= bool((w[:, ~mask] == 0).all() and (w[:, mask] > 0).all())
    t.check(f"{label}: every recorded row of weights sums to 1", sums_ok)
    t.check(f"{label}: weights are 0 exactly where the mask hides a key, > 0 where it shows one", mask_ok)


def check_png(t, label, png, layers, n_heads, n):
    try:
        w, h, pixels, palette = read_png(png)
    except (AssertionError, OSError, Exception) as e:  # noqa: B014 - any parse failure is the finding
        t.check(f"{label}: PNG parses (signature, CRCs, IHDR, zlib)", False, str(e))
        return
    t.check(f"{label}: PNG parses (signature, chunk CRCs, IHDR, zlib stream) with a 256-colour palette",
            palette.shape == (256, 3))
    # one row of panels per layer; a single layer's heads in floor(sqrt(heads)) rows, drawn larger
    rows_per_layer = int(n_heads ** 0.5) if len(layers) == 1 else 1
    columns = -(-n_heads // rows_per_layer)
    cell = max(1, (384 if len(layers) == 1 else 128) // n)
    panel = n * cell
    n_rows = len(layers) * rows_per_layer
    t.check(f"{label}: PNG is {n_rows} rows x {columns} panels of {panel} px ({w}x{h})",
            w == 2 * GAP + columns * panel + (columns - 1) * GAP and h == 2 * GAP + n_rows * panel + (n_rows - 1) * GAP)
    ok = True
    for r, (kind, span, sinks) in enumerate(layers):
        hidden = ~mask_matrix(kind, span, sinks, n)
        for head in range(n_heads):
            y0 = GAP + (r * rows_per_layer + head // columns) * (panel + GAP)
            x0 = GAP + (head % columns) * (panel + GAP)
            cells = pixels[y0:y0 + panel:cell, x0:x0 + panel:cell]
            ok &= bool(((cells == MASKED) == hidden).all())
    t.check(f"{label}: PNG panels are grey exactly where the mask hides a key", ok)


def run(t):
    kjv = os.path.join(t.root, "models", "kjv-5m.bin")
    ids = json.load(open(os.path.join(t.data, "kjv-5m", "ref.json")))["input_ids"][:80]  # past the window of 64
    png, weights, err = dump(t, kjv, ids, 8, 6)
    t.check("kjv-5m --attn-map + --attn-dump over 80 tokens", png is not None, err)
    if png:
        check_weights(t, "kjv-5m as wired", weights, KJV_LAYERS)
        check_png(t, "kjv-5m as wired", png, KJV_LAYERS, 8, 80)

    flags = ("--window", "0=20,1=0", "--sinks", "3", "--sparse", "2=strided:7,3=fixed:9,4=fixed:16")
    layers = [("sliding", 20, 3), ("causal", 0, 0), ("strided", 7, 0), ("fixed", 9, 0), ("fixed", 16, 0),
              ("causal", 0, 0)]
    png, weights, err = dump(t, kjv, ids, 8, 6, *flags)
    t.check("kjv-5m with window, sinks, strided and fixed overrides: maps written", png is not None, err)
    if png:
        check_weights(t, "kjv-5m overrides", weights, layers)
        check_png(t, "kjv-5m overrides", png, layers, 8, 80)

    png, weights, err = dump(t, kjv, ids[:40], 8, 2, "--attn-map-layer", "3,2", *flags)
    t.check("--attn-map-layer 3,2: only those layers, in that order", png is not None, err)
    if png:
        check_weights(t, "--attn-map-layer 3,2", weights, [layers[3], layers[2]])
        check_png(t, "--attn-map-layer 3,2", png, [layers[3], layers[2]], 8, 40)
    png, weights, err = dump(t, kjv, ids[:40], 8, 1, "--attn-map-layer", "0", *flags)
    if t.check("--attn-map-layer 0: one layer, drawn larger", png is not None, err):
        check_png(t, "--attn-map-layer 0", png, [layers[0]], 8, 40)

    # fixtures: soft-capped Gemma 2 (alternating), MQA StarCoder (learned positions)
    for name, heads, fixture_layers in (("gemma2", 4, [("sliding", 16, 0), ("causal", 0, 0)] * 2),
                                        ("starcoder_mqa", None, None)):
        src = os.path.join(t.data, "fixtures", name)
        cfg = json.load(open(os.path.join(src, "config.json")))
        n_layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
        heads = heads or cfg.get("n_head")
        fixture_layers = fixture_layers or [("causal", 0, 0)] * n_layers
        ids = json.load(open(os.path.join(src, "ref.json")))["input_ids"]
        png, weights, err = dump(t, t.export(src, f"{name}.bin"), ids, heads, n_layers)
        if t.check(f"{name}: attention maps over {len(ids)} tokens", png is not None, err):
            check_weights(t, name, weights, fixture_layers)
            check_png(t, name, png, fixture_layers, heads, len(ids))
