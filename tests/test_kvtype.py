"""--kv-type: the KV cache in bf16 or q8_0. Fixtures stay near their reference logits, kjv-5m's perplexity near
f32's, the stats line counts half / about a quarter of the bytes, the determinism contract (--batch, --threads)
holds for each type, many sequences sharing blocks (--samples) work, latent attention keeps f32, and a bad
value is refused."""
import json
import os

import numpy as np

from harness import ids_of, relative_error
from study_support import kv_bytes, parse_ppl

TYPES = ("bf16", "q8_0")
# max |delta| of the logits relative to max(1, max |ref|), measured (tests/test_kvtype.py prints them) on the
# fixtures below, with some headroom: bf16 keeps 8 bits of each element, q8_0 about 7 of its group's largest
FIXTURES = ("llama_gqa", "mistral_swa", "gemma2", "gemma3", "qwen3_mixed")
TOLERANCE = {"bf16": 2e-2, "q8_0": 3e-2}
# kjv-5m's perplexity over its 300 held-out tokens, relative to f32's
PPL_RATIO = {"bf16": 1.01, "q8_0": 1.01}


def run(t):
    errors = {k: {} for k in TYPES}
    for name in FIXTURES:
        src = os.path.join(t.data, "fixtures", name)
        model = t.export(src, f"{name}.bin")
        ref = json.load(open(os.path.join(src, "ref.json")))
        want = np.load(os.path.join(src, "ref_logits.npy"))
        for kv in TYPES:
            got = t.logits(model, ref["input_ids"], "--kv-type", kv)
            err = errors[kv][name] = relative_error(got, want)
            t.check(f"{name} --kv-type {kv}: logits at all {len(ref['input_ids'])} positions within {TOLERANCE[kv]} "
                    f"(max rel err {err:.1e})", got.shape == want.shape and err <= TOLERANCE[kv])
        # the contract per type: one token at a time or the whole prompt, one thread or two, the same bits
        ids = ref["input_ids"]
        for kv in ("f32",) + TYPES:
            base = t.logits(model, ids, "--kv-type", kv)
            one = t.logits(model, ids, "--kv-type", kv, "--batch", "1")
            two = t.logits(model, ids, "--kv-type", kv, "--threads", "2")
            single = t.logits(model, ids, "--kv-type", kv, "--threads", "1")
            t.check(f"{name} --kv-type {kv}: --batch 1 and the default, --threads 1 and 2 give the same bits",
                    np.array_equal(base, one) and np.array_equal(two, single) and np.array_equal(base, two))
    for kv in TYPES:
        print(f"# --kv-type {kv}: max relative logit error per fixture: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors[kv].items()))

    kjv = os.path.join(t.root, "models", "kjv-5m.bin")
    tokens = ",".join(map(str, json.load(open(os.path.join(t.data, "kjv-5m", "ref.json")))["input_ids"]))

    def ppl(kv, *extra):
        r = t.run([kjv, "--tokens", tokens, "--ppl", "--kv-type", kv] + list(extra))
        return parse_ppl(r.stdout)[0], kv_bytes(r.stderr)

    base, base_bytes = ppl("f32")
    for kv in TYPES:
        got, n_bytes = ppl(kv)
        t.check(f"kjv-5m --kv-type {kv}: perplexity {got} within {PPL_RATIO[kv]}x of f32's {base}",
                got is not None and base is not None and got <= base * PPL_RATIO[kv] and got >= base / PPL_RATIO[kv])
        want = base_bytes / 2 if kv == "bf16" else base_bytes * 36 / 128  # q8_0: 36 bytes per 32 elements
        t.check(f"kjv-5m --kv-type {kv}: the stats line counts {n_bytes} KV bytes, f32's {base_bytes} x "
                f"{want / base_bytes:.4f}", n_bytes is not None and base_bytes and abs(n_bytes - want) <= 0.01 * want)

    # --info counts the same bytes per token and names the type
    f32_info = t.run([kjv, "--info"]).stdout.decode()
    q8_info = t.run([kjv, "--info", "--kv-type", "q8_0"]).stdout.decode()
    t.check("kjv-5m --info --kv-type q8_0: names the type and counts fewer KV bytes",
            "KV cache: q8_0 (int8 in groups of 32" in q8_info and "q8_0 keys + values" in q8_info and q8_info != f32_info and
            "float32 keys + values" in f32_info)

    # many sequences sharing the prompt's blocks (copy-on-write) with a compact cache: the same samples as f32
    # would not be expected, but each must run, and greedy samples of one prompt must all agree
    r = t.run([kjv, "-p", "In the beginning", "-n", "24", "-t", "0", "--samples", "3", "--kv-type", "q8_0", "--print-ids"])
    lines = [line for line in r.stdout.decode().splitlines() if line.strip()]
    t.check("kjv-5m --samples 3 --kv-type q8_0 (forked, copy-on-write blocks): three identical greedy samples",
            r.returncode == 0 and len(lines) >= 3 and len(set(lines[-3:])) == 1, r.stderr.decode()[-200:])
    one = t.run([kjv, "-p", "In the beginning", "-n", "24", "-t", "0", "--kv-type", "q8_0", "--print-ids"])
    t.check("kjv-5m --kv-type q8_0: a sample of --samples 3 equals the one-sequence run",
            r.returncode == 0 and one.returncode == 0 and lines and ids_of(one.stdout) == ids_of(lines[-1]))

    # latent attention keeps f32 (one clear line in --info), and still runs
    mla = t.export(os.path.join(t.data, "fixtures", "deepseek_v2_grouped"), "deepseek_v2_grouped.bin")
    info = t.run([mla, "--info", "--kv-type", "bf16"]).stdout.decode()
    t.check("deepseek_v2 --kv-type bf16: --info says latent attention layers keep f32",
            "latent attention layers keep f32" in info)
    ids = json.load(open(os.path.join(t.data, "fixtures", "deepseek_v2_grouped", "ref.json")))["input_ids"]
    t.check("deepseek_v2 --kv-type q8_0: latent layers keep f32, the logits are f32's bits",
            np.array_equal(t.logits(mla, ids, "--kv-type", "q8_0"), t.logits(mla, ids)))

    for bad in ("f16", "Q8_0", "", "q8_0x"):
        r = t.run([kjv, "-p", "x", "-n", "1", "--kv-type", bad])
        err = r.stderr.decode().strip().splitlines()
        t.check(f"--kv-type {bad!r}: one error line, exit 1",
                r.returncode == 1 and len(err) == 1 and err[0].startswith("error:") and "--kv-type" in err[0], err)
