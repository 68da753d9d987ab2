"""--ppl: the perplexity of the prompt equals the one computed from the reference logits (every fixture,
kjv-5m's held-out text), for ids, -p text and -f FILE alike; with overrides it changes the way it should,
and the KV cache stays as small as the chosen pattern allows however long the text. A text longer than the
context is scored in strided windows (--ctx, --stride), each token once: 50k tokens of kjv-5m equal the sum
over windowed --logits runs; on a terminal each window shows its progress."""
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from harness import ids_of, with_terminal_stderr
from study_support import ONE_THREAD, kjv_word_salad, kv_bytes, parse_ppl, reference_ppl
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

    windowed(t, kjv)
    progress_on_a_terminal(t, kjv)


def window_nll(t, kjv, ids, begin, end, score_from):
    """sum of -log p(ids[j]) for score_from <= j < end, from the logits of one --logits run over ids[begin:end]"""
    path = t.tmp(f"window-{begin}.bin")
    r = t.run([kjv, "--tokens", ",".join(map(str, ids[begin:end])), "-n", "0", "--logits", path, "--threads", "1"])
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    logits = np.fromfile(path, dtype="<f4").reshape(end - begin, -1).astype(np.float64)
    os.unlink(path)
    rows = logits[score_from - 1 - begin:end - 1 - begin]  # position j-1 scores token j
    m = rows.max(axis=1)
    log_z = np.log(np.exp(rows - m[:, None]).sum(axis=1)) + m
    return float((log_z - rows[np.arange(len(rows)), ids[score_from:end]]).sum())


def sanitized(t):
    """A sanitizer build (make asan) runs a hundred times slower: the long texts shrink for it."""
    return t.run_bin != os.path.join(t.root, "run")


def windowed(t, kjv):
    """--ppl over 50k tokens in windows of kjv-5m's context (1024) equals the sum over windowed --logits runs,
    each token but the first scored once, as in the transformers guide's strided perplexity (under a sanitizer
    build: 600 tokens in windows of 128)"""
    n_tokens, ctx, stride = (600, 128, 100) if sanitized(t) else (50000, 1024, 1000)
    path, ids = kjv_word_salad(t, kjv, n_tokens)
    n = len(ids)
    r = t.run([kjv, "-f", path, "--ppl", "--ctx", ctx, "--stride", stride], timeout=3600)
    got, scored = parse_ppl(r.stdout)
    windows = re.search(rb"\((\d+) windows of %d tokens, stride %d\)" % (ctx, stride), r.stdout)
    spans, begin, scored_to = [], 0, 1
    while True:
        end = min(begin + ctx, n)
        spans.append((begin, end, scored_to))
        scored_to = end
        if end == n:
            break
        begin += stride
    with ThreadPoolExecutor(2) as pool:
        nll = sum(pool.map(lambda s: window_nll(t, kjv, ids, *s), spans))
    want = math.exp(nll / (n - 1))
    t.check(f"kjv-5m: --ppl over {n} tokens in {len(spans)} windows of {ctx} (stride {stride}) is {got}, the sum over "
            f"{len(spans)} windowed --logits runs gives {want:.6f}", r.returncode == 0 and scored == n - 1 and windows
            and int(windows.group(1)) == len(spans) and abs(got - want) <= TOLERANCE * want, r.stderr.decode()[-300:])
    t.check("--ppl windows: nothing on standard error but the stats line when it is not a terminal",
            r.stderr.decode().count("\n") == 1 and r.stderr.startswith(b"stats:"))
    # one window holding the whole text is the single pass
    short = ids[:600]
    one = parse_ppl(t.run([kjv, "--tokens", ",".join(map(str, short)), "--ppl", "--ctx", 600]).stdout)
    plain = parse_ppl(t.run([kjv, "--tokens", ",".join(map(str, short)), "--ppl"]).stdout)
    t.check(f"--ppl --ctx 600 over 600 tokens is one window, the plain --ppl ({one})", one == plain and one[1] == 599)
    for args, want in ((["--ctx", "2000"], "longer than the model's context"),
                       (["--ctx", "512", "--stride", "512"], "must be less than --ctx"),
                       (["--ctx", "512", "--logits", t.tmp("x.bin")], "record one pass"),
                       (["--stride", "0"], "--stride must be between 1")):
        r = t.run([kjv, "-f", path, "--ppl"] + args)
        err = r.stderr.decode(errors="replace")
        t.check(f"--ppl {' '.join(args)}: one error line ({want})", r.returncode == 1 and want in err and err.count("\n") == 1, err)


def progress_on_a_terminal(t, kjv):
    """on a terminal, --ppl shows each window's progress on standard error, on one line rewritten in place"""
    n_tokens, ctx, stride = (400, "128", "100") if sanitized(t) else (3000, "1024", "900")
    path, ids = kjv_word_salad(t, kjv, n_tokens, seed=9)
    status, out, err = with_terminal_stderr([t.run_bin, kjv, "-f", path, "--ppl", "--ctx", ctx, "--stride", stride],
                                            timeout=3600)
    windows = re.findall(rb"\r\x1b\[2Kppl: window (\d+) of (\d+)", err)
    t.check(f"--ppl on a terminal: a progress line per window ({len(windows)}), rewritten with \\r, cleared at the end",
            status == 0 and [int(w[0]) for w in windows] == list(range(1, len(windows) + 1)) and len(windows) >= 3
            and all(int(w[1]) == len(windows) for w in windows) and parse_ppl(out)[0] is not None, err[-300:])
