"""--attn-map / --attn-dump: the PNG is valid (signature, chunk CRCs, IHDR, zlib stream, size) and shows the
masks (grey exactly where a key is hidden); the recorded weights of every row sum to 1 and are 0 outside
the mask - on kjv-5m as wired (the window's band), with every override, and on fixtures."""
import json
import os

import numpy as np

import struct
import zlib

from study_support import ONE_THREAD, kjv_word_salad, mask_matrix, png_chunks, png_panels, read_png

KJV_LAYERS = [("sliding", 64, 0), ("sliding", 64, 0), ("causal", 0, 0), ("sliding", 64, 0), ("sliding", 64, 0),
              ("causal", 0, 0)]
MASKED = 1       # palette indices (study.c): a hidden key, text
TEXT = 2
TITLE = 10       # the line above each row of panels
MAX_LABELLED = 64  # prompts up to this long get their tokens written along the axes


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


def check_png(t, label, png, layers, n_heads, n, weights=None, layer_ids=None):
    try:
        w, h, pixels, palette = read_png(png)
        panels, cell = png_panels(png)
    except (AssertionError, OSError, Exception) as e:  # noqa: B014 - any parse failure is the finding
        t.check(f"{label}: PNG parses (signature, CRCs, IHDR, zlib)", False, str(e))
        return
    t.check(f"{label}: PNG parses (signature, chunk CRCs, IHDR, zlib stream) with a 256-colour palette",
            palette.shape == (256, 3))
    layer_ids = layer_ids or list(range(len(layers)))
    want_cell = max(1, (384 if len(layers) == 1 else 128) // n, 8 if n <= MAX_LABELLED else 1)
    t.check(f"{label}: the layout names {len(layers)} x {n_heads} panels of {n} cells of {want_cell} px, inside the "
            f"{w}x{h} image", cell == want_cell and sorted(panels) == [(L, hd) for L in sorted(layer_ids) for hd in range(n_heads)]
            and all(x + n * cell <= w and y + n * cell <= h for x, y in panels.values()))
    mask_ok = color_ok = title_ok = labels_ok = True
    for r, (kind, span, sinks) in enumerate(layers):
        hidden = ~mask_matrix(kind, span, sinks, n)
        for head in range(n_heads):
            x0, y0 = panels[(layer_ids[r], head)]
            cells = pixels[y0:y0 + n * cell:cell, x0:x0 + n * cell:cell]
            mask_ok &= bool(((cells == MASKED) == hidden).all())
            if weights is not None:  # colour = 3 + round(252 * (log10(w) + 4) / 4), w at least 1e-4
                wts = np.maximum(weights[r, head], 1e-4).astype(np.float64)
                want = 3 + np.rint(252 * (np.log10(wts) + 4) / 4)
                color_ok &= bool((np.abs(cells[~hidden].astype(int) - want[~hidden]) <= 1).all())
            title_ok &= bool((pixels[y0 - TITLE:y0, x0:x0 + n * cell] == TEXT).any())
            if n <= MAX_LABELLED and x0 == min(x for x, y in panels.values() if y == y0):  # queries left of a row
                rows = [(pixels[y0 + i * cell:y0 + (i + 1) * cell, :x0] == TEXT).any() for i in range(n)]
                labels_ok &= sum(rows) >= 0.9 * n
    t.check(f"{label}: PNG panels are grey exactly where the mask hides a key", mask_ok)
    if weights is not None:
        t.check(f"{label}: every visible cell has the colour of its weight on the log scale", color_ok)
    t.check(f"{label}: a title (layer and head) above every panel", title_ok)
    if n <= MAX_LABELLED:
        top = min(y for x, y in panels.values())
        keys = (pixels[:top - TITLE, min(x for x, y in panels.values()):] == TEXT).any(axis=0).sum()
        t.check(f"{label}: {n} tokens: each row has its token written on the left, the columns theirs above",
                labels_ok and keys >= n * 3)
    right = max(x for x, y in panels.values()) + n * cell
    bar = [x for x in range(right, w) if pixels[:, x].max() == 255 and (pixels[:, x] == 3).any()]
    column = pixels[:, bar[0]] if bar else np.zeros(1, dtype=np.uint8)
    scale = column[(column >= 3)]
    t.check(f"{label}: a colour bar from 1 (top) to 1e-4 (bottom) right of the panels, labelled",
            bool(bar) and bool((np.diff(scale.astype(int)) <= 0).all()) and scale[0] == 255 and scale[-1] == 3
            and (pixels[:, bar[0] + 12:] == TEXT).any())


def big_map(t, kjv):
    """A 1,000-token map of every layer and head: compressed (the uncompressed map is 49 MB) and readable."""
    ids = kjv_word_salad(t, kjv, 1000)[1][:1000]
    png = t.tmp("map-1000.png")
    r = t.run([kjv, "--tokens", ",".join(map(str, ids)), "-n", "0", "--attn-map", png])
    if not t.check("kjv-5m: --attn-map of 1,000 tokens, 6 layers x 8 heads", r.returncode == 0,
                   r.stderr.decode(errors="replace")[-300:]):
        return
    size = os.path.getsize(png)
    chunks = png_chunks(png)
    w, h = struct.unpack(">II", next(b for k, b in chunks if k == b"IHDR")[:8])
    raw = zlib.decompressobj().decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    t.check(f"kjv-5m 1,000-token map: {w}x{h} pixels in {size / 1e6:.1f} MB, at most a quarter of the "
            f"{h * (w + 1) / 1e6:.0f} MB it holds, and python's zlib inflates it to exactly that",
            size * 4 <= h * (w + 1) and len(raw) == h * (w + 1), f"{size} bytes")


def run(t):
    kjv = os.path.join(t.root, "models", "kjv-5m.bin")
    ids = json.load(open(os.path.join(t.data, "kjv-5m", "ref.json")))["input_ids"][:80]  # past the window of 64
    png, weights, err = dump(t, kjv, ids, 8, 6)
    t.check("kjv-5m --attn-map + --attn-dump over 80 tokens", png is not None, err)
    if png:
        check_weights(t, "kjv-5m as wired", weights, KJV_LAYERS)
        check_png(t, "kjv-5m as wired", png, KJV_LAYERS, 8, 80, weights)

    flags = ("--window", "0=20,1=0", "--sinks", "3", "--sparse", "2=strided:7,3=fixed:9,4=fixed:16")
    layers = [("sliding", 20, 3), ("causal", 0, 0), ("strided", 7, 0), ("fixed", 9, 0), ("fixed", 16, 0),
              ("causal", 0, 0)]
    png, weights, err = dump(t, kjv, ids, 8, 6, *flags)
    t.check("kjv-5m with window, sinks, strided and fixed overrides: maps written", png is not None, err)
    if png:
        check_weights(t, "kjv-5m overrides", weights, layers)
        check_png(t, "kjv-5m overrides", png, layers, 8, 80, weights)

    png, weights, err = dump(t, kjv, ids[:40], 8, 2, "--attn-map-layer", "3,2", *flags)
    t.check("--attn-map-layer 3,2: only those layers, in that order", png is not None, err)
    if png:
        check_weights(t, "--attn-map-layer 3,2", weights, [layers[3], layers[2]])
        check_png(t, "--attn-map-layer 3,2", png, [layers[3], layers[2]], 8, 40, weights, [3, 2])
    png, weights, err = dump(t, kjv, ids[:40], 8, 1, "--attn-map-layer", "0", *flags)
    if t.check("--attn-map-layer 0: one layer, drawn larger", png is not None, err):
        check_png(t, "--attn-map-layer 0", png, [layers[0]], 8, 40, weights, [0])

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
            check_png(t, name, png, fixture_layers, heads, len(ids), weights)

    big_map(t, kjv)
