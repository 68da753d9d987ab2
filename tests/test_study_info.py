"""--info: the wiring table of kjv-5m and of fixtures, overrides marked, and KV-cache sizes that are what the
cache really holds (the 1k prediction equals the stats after 1024 tokens); bad override syntax is one error
line."""
import json
import math
import os
import re

from study_support import ONE_THREAD, kv_bytes

KJV_KINDS = ["sliding 64", "sliding 64", "full", "sliding 64", "sliding 64", "full"]


def info(t, model, *flags):
    r = t.run([model, "--info"] + list(flags))
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def layer_rows(text):
    """{layer: (kind, q, kv, group, head_dim, rope, rest)} from the table"""
    rows = {}
    for m in re.finditer(r"^\s+(\d+)  (.+?)\s+(\d+)\s+(\d+)  (\d+ \(\S+\))\s+(\d+)\s+(\S+)  (.*)$", text, re.M):
        rows[int(m.group(1))] = (m.group(2).strip(), int(m.group(3)), int(m.group(4)), m.group(5), int(m.group(6)),
                                 m.group(7), m.group(8))
    return rows


def cache_totals(text):
    """{tokens: (as wired, plain MHA full)} in bytes"""
    out = {}
    for m in re.finditer(r"^\s*(\d+)k\s+([\d,]+) B \(.*?\)\s+([\d,]+) B", text, re.M):
        out[int(m.group(1)) * 1024] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
    return out


def expected_layer_bytes(kind, span, sinks, kv_dim, n, block=16):
    """The cache layout of kvcache.h, re-derived: which slots n positions occupy, rounded up to blocks
    (a rolling buffer's last block cut to its capacity)."""
    cap = span + sinks if kind == "sliding" else None
    if kind == "sliding":
        slots = min(n, cap)
    elif kind == "fixed":
        slots = n if n < span else span - 1 + n // span
    else:
        slots = n
    rows = sum(min(block, cap - block * b) if cap else block for b in range(math.ceil(slots / block)))
    return rows * kv_dim * 4 * 2


def run(t):
    kjv = os.path.join(t.root, "models", "kjv-5m.bin")
    rc, out, err = info(t, kjv)
    rows = layer_rows(out)
    t.check("kjv-5m --info: exits 0 with one row per layer", rc == 0 and sorted(rows) == list(range(6)), err or out)
    t.check("kjv-5m --info: model-wide facts (family, 5,574,272 parameters, vocab 4096, bf16, file size)",
            "qwen3" in out and "5,574,272 parameters" in out and "vocab 4096" in out and "bf16 weights" in out
            and "file 10.7 MiB" in out, out.splitlines()[0] if out else "")
    t.check("kjv-5m --info: layers 0, 1, 3, 4 slide 64, layers 2 and 5 are full",
            [rows.get(l, ("?",))[0] for l in range(6)] == KJV_KINDS)
    t.check("kjv-5m --info: 8 query / 2 kv heads, group 4 (GQA-2), head_dim 32, rope base 10000, q/k-norm, 512 B/token",
            all(r[1:6] == (8, 2, "4 (GQA-2)", 32, "10000") and "q/k-norm" in r[6] and "512 B" in r[6] for r in rows.values()))
    totals = cache_totals(out)
    want = {n: (sum(expected_layer_bytes("sliding" if k != "full" else "full", 64, 0, 64, n) for k in KJV_KINDS),
                6 * expected_layer_bytes("full", 0, 0, 8 * 32, n)) for n in (1024, 8192, 32768, 131072)}
    t.check("kjv-5m --info: cache at 1k/8k/32k/128k as wired and as MHA with full attention everywhere",
            totals == want, f"got {totals}, want {want}")

    # overrides are shown, marked, with what the file says
    mixed = ("--window", "all=16,1=0", "--sinks", "4", "--sparse", "2=fixed:16,5=strided:8")
    rc, out, _ = info(t, kjv, *mixed)
    rows = layer_rows(out)
    t.check("kjv-5m --info with overrides: each layer's new kind, marked *",
            [rows.get(l, ("?",))[0] for l in range(6)] == ["sliding 16 + 4 sinks *", "full *", "fixed 16 *"]
            + ["sliding 16 + 4 sinks *"] * 2 + ["strided 8 *"] and "layer 2 is full" in out and "layer 1 slides 64" in out,
            out)
    want_1k = 3 * expected_layer_bytes("sliding", 16, 4, 64, 1024) + expected_layer_bytes("fixed", 16, 0, 64, 1024) \
        + 2 * expected_layer_bytes("full", 0, 0, 64, 1024)
    t.check("kjv-5m --info with overrides: 1k cache = 3 rolling (4 + 16) + fixed summaries + 2 paged (full, strided)",
            cache_totals(out).get(1024, (None,))[0] == want_1k)

    # the prediction is the cache itself: after 1024 tokens the stats line shows the 1k figure (every layout)
    ids = json.load(open(os.path.join(t.data, "kjv-5m", "ref.json")))["input_ids"]
    r = t.run([kjv, "--tokens", ",".join(map(str, (ids * 4)[:1024])), "-n", "0", *ONE_THREAD] + list(mixed))
    held = kv_bytes(r.stderr)
    t.check(f"kjv-5m with overrides: --info's 1k cache size is what 1024 tokens really hold ({held} bytes)",
            held is not None and cache_totals(out).get(1024, (None,))[0] == held)
    rows = layer_rows(info(t, kjv, "--sparse", "2=chunked:16")[1])
    t.check("kjv-5m --info --sparse 2=chunked:16: layer 2 is chunked, keeps its chunk",
            rows.get(2, ("?",))[0] == "chunked 16 *" and "its chunk of 16" in rows[2][6])
    r = t.run([kjv, "--tokens", ",".join(map(str, ids[:100])), "-n", "0", "--sparse", "all=chunked:16", *ONE_THREAD])
    t.check("kjv-5m --sparse all=chunked:16: every layer keeps a rolling buffer of its chunk (16 positions)",
            kv_bytes(r.stderr) == 6 * 16 * 64 * 4 * 2, r.stderr.decode()[-200:])
    rc, out, _ = info(t, kjv, "--attn", "flash")
    t.check("--info names the kernel", "attention kernel: flash" in out)

    # fixtures: soft-caps, learned positions, MQA
    rows = layer_rows(info(t, t.export(os.path.join(t.data, "fixtures", "gemma2"), "gemma2.bin"))[1])
    t.check("gemma2 --info: alternating sliding 16 / full, soft-cap 50, post-norms",
            [rows[l][0] for l in range(4)] == ["sliding 16", "full"] * 2 and all("soft-cap 50" in r[6] and "post-norms" in r[6] for r in rows.values()))
    rows = layer_rows(info(t, t.export(os.path.join(t.data, "fixtures", "starcoder_mqa"), "starcoder_mqa.bin"))[1])
    t.check("starcoder_mqa --info: MQA, learned positions (no rope base)",
            rows and all(r[2] == 1 and "(MQA)" in r[3] and r[5] == "-" for r in rows.values()))

    # bad overrides: one error line, exit 1
    gqa = t.export(os.path.join(t.data, "fixtures", "llama_gqa"), "llama_gqa.bin")
    for flags in (("--window", "7=16"), ("--window", "all=x"), ("--window", "1="), ("--sparse", "fixed:0"),
                  ("--sparse", "dilated:4"), ("--sparse", "1=strided"), ("--sinks", "4"), ("--attn", "fast"),
                  ("--attn", "flash", "--attn-map", t.tmp("x.png")), ("--attn-map-layer", "1")):
        r = t.run([gqa, "--info"] + list(flags))
        e = r.stderr.decode(errors="replace")
        t.check(f"{' '.join(flags)}: one error line, exit 1", r.returncode == 1 and e.startswith("error: ")
                and e.count("\n") == 1, e.strip())

    # docs/ATTENTION.md shows this very output, and its picture stays small
    doc = open(os.path.join(t.root, "docs", "ATTENTION.md")).read()
    shown = re.search(r"\$ ./run models/kjv-5m.bin --info\n(.*?)```", doc, re.S)
    t.check("docs/ATTENTION.md shows kjv-5m's --info output as it is today",
            shown is not None and shown.group(1) == info(t, kjv)[1])
    picture = os.path.join(t.root, "docs", "attention-map-kjv-5m.png")
    t.check("docs/attention-map-kjv-5m.png is there and under 300 KB",
            os.path.exists(picture) and os.path.getsize(picture) < 300_000)
