"""--ppl: the perplexity of the prompt equals the one computed from the reference logits (every fixture,
kjv-5m's held-out text), for ids, -p text and -f FILE alike; with overrides it changes the way it should,
and the KV cache stays as small as the chosen pattern allows however long the text."""
import json
import os

import numpy as np

from harness import ids_of
from study_support import ONE_THREAD, kv_bytes, parse_ppl, reference_ppl
from test_fixtures import FIXTURES

TOLERANCE = 1e-4  # relative


def run(t):
    for name in FIXTURES:
        src = os.path.join(t.data, "fixtures", name)
        ids = json.load(open(os.path.join(src, "ref.json")))["input_ids"]
        want = reference_ppl(np.load(os.path.join(src, "ref_logits.npy")), ids)
        r = t.run([t.export(src, f"{name}.bin"), "--tokens", ",".join(map(str, ids)), "--ppl", *ONE_THREAD])
        got, n = parse_ppl(r.stdout)
        t.check(f"{name}: --ppl {got} over {n} tokens equals the reference logits' {want:.6f}",
                r.returncode == 0 and n == len(ids) - 1 and abs(got - want) <= TOLERANCE * want)

    kjv = os.path.join(t.root, "models", "kjv-5m.bin")
    ids = json.load(open(os.path.join(t.data, "kjv-5m", "ref.json")))["input_ids"]
    tokens = ",".join(map(str, ids))
    logits_path = t.shared_file("models/kjv-5m/ref_logits.npy", "kjv-5m: --ppl of the held-out text")
    plain = parse_ppl(t.run([kjv, "--tokens", tokens, "--ppl", *ONE_THREAD]).stdout)[0]
    if logits_path:
        want = reference_ppl(np.load(logits_path), ids)
        t.check(f"kjv-5m: --ppl of the 300 held-out tokens {plain} equals the reference logits' {want:.6f}",
                plain is not None and abs(plain - want) <= TOLERANCE * want)

    # overrides: narrower windows cost quality, sinks win some of it back, the flash kernel changes nothing
    def ppl(*flags):
        r = t.run([kjv, "--tokens", tokens, "--ppl", *ONE_THREAD] + list(flags))
        return parse_ppl(r.stdout)[0], kv_bytes(r.stderr)

    w16, w16_bytes = ppl("--window", "all=16")
    sinks, sinks_bytes = ppl("--window", "all=16", "--sinks", "4")
    flash, _ = ppl("--window", "all=16", "--sinks", "4", "--attn", "flash")
    t.check(f"kjv-5m: perplexity as wired {plain} < with sinks {sinks} < --window all=16 {w16}",
            plain is not None and w16 is not None and sinks is not None and plain < sinks < w16)
    t.check("kjv-5m: --attn flash gives the same perplexity", flash is not None and abs(flash - sinks) <= 1e-5 * sinks)
    row = 2 * 2 * 32 * 4  # keys + values, 2 kv heads of 32 floats
    t.check(f"kjv-5m --window all=16: the cache holds 16 positions per layer after 300 ({w16_bytes} bytes)",
            w16_bytes == 6 * 16 * row)
    t.check(f"kjv-5m --window all=16 --sinks 4: the cache holds 4 sinks + 16 per layer ({sinks_bytes} bytes)",
            sinks_bytes == 6 * 20 * row)

    # text prompts: -p and -f give the perplexity of the ids they encode to
    text = "And God said, Let there be light: and there was light. And God saw the light, that it was good."
    path = t.tmp("prompt.txt")
    with open(path, "w") as f:
        f.write(text)
    enc = ids_of(t.run([kjv, "--encode", text]).stdout)
    by_ids = parse_ppl(t.run([kjv, "--tokens", ",".join(map(str, enc)), "--ppl", *ONE_THREAD]).stdout)
    by_p = parse_ppl(t.run([kjv, "-p", text, "--ppl", *ONE_THREAD]).stdout)
    by_f = parse_ppl(t.run([kjv, "-f", path, "--ppl", *ONE_THREAD]).stdout)
    t.check(f"kjv-5m: -p TEXT, -f FILE and --tokens of its ids give one perplexity ({by_p})",
            by_p[0] is not None and by_p == by_f == by_ids and by_p[1] == len(enc) - 1)

    for args, what in ((["--tokens", "5", "--ppl"], "a one-token prompt"),
                       (["-f", t.tmp("no-such-file.txt"), "--ppl"], "a missing -f file"),
                       (["-p", "x", "-f", path], "both -p and -f")):
        r = t.run([kjv] + args)
        err = r.stderr.decode(errors="replace")
        t.check(f"--ppl / -f: {what} is one error line, exit 1", r.returncode == 1 and err.startswith("error: ")
                and err.count("\n") == 1, err.strip())
