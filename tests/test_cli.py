"""The command line of everyday use: the seed in the stats line (a clock seed reproduces the run), -f - and
--encode - read standard input, --echo prints the prompt first, token ids print comma-separated and are read
back with commas and/or spaces, the sampling flags (their semantics: tests/unit.c) are checked and take effect,
and export.py shows its progress only on a terminal."""
import os
import re
import subprocess

from harness import ids_of, with_terminal_stderr


def seed_of(stderr):
    m = re.search(rb"\| seed (\d+)\n", stderr)
    return int(m.group(1)) if m else None


def run(t):
    kjv = os.path.join(t.root, "models", "kjv-5m.bin")
    prompt = "And God said"
    sample = [kjv, "-p", prompt, "-n", "24", "-t", "1", "--threads", "1"]

    # the seed
    a = t.run(sample + ["-s", "42"])
    b = t.run(sample + ["-s", "42"])
    t.check("-s 42: the stats line says seed 42, and the same seed gives the same text",
            seed_of(a.stderr) == 42 and a.stdout == b.stdout and a.returncode == 0)
    clock = t.run(sample)
    seed = seed_of(clock.stderr)
    again = t.run(sample + ["-s", str(seed)]) if seed is not None else None
    t.check(f"without -s the stats line shows the clock seed it used ({seed}); -s with it gives the same text",
            again is not None and again.stdout == clock.stdout)

    # standard input
    by_p = t.run([kjv, "-p", prompt, "-n", "8", "-t", "0"])
    by_stdin = t.run([kjv, "-f", "-", "-n", "8", "-t", "0"], input=prompt.encode())
    t.check("-f - reads the prompt from standard input", by_stdin.returncode == 0 and by_stdin.stdout == by_p.stdout)
    enc = t.run([kjv, "--encode", prompt])
    t.check("--encode - reads the text from standard input",
            t.run([kjv, "--encode", "-"], input=prompt.encode()).stdout == enc.stdout)

    # ids: comma-separated out, commas and/or spaces in
    ids = ids_of(enc.stdout)
    t.check(f"--encode prints comma-separated ids ({enc.stdout.decode().strip()})",
            re.fullmatch(rb"\d+(,\d+)+\n", enc.stdout) is not None)
    gen = t.run([kjv, "--tokens", enc.stdout.decode().strip(), "-n", "6", "-t", "0", "--print-ids"])
    t.check("--print-ids prints comma-separated ids", re.fullmatch(rb"\d+(,\d+){5}\n", gen.stdout) is not None)
    spaced = t.run([kjv, "--tokens", " ".join(map(str, ids)), "-n", "6", "-t", "0", "--print-ids"])
    mixed = t.run([kjv, "--tokens", ", ".join(map(str, ids)) + " ", "-n", "6", "-t", "0", "--print-ids"])
    t.check("--tokens takes the ids --encode prints, space-separated ones and ', '", gen.stdout == spaced.stdout == mixed.stdout)
    text = t.run([kjv, "--decode", gen.stdout.decode().strip()])
    t.check("--decode takes what --print-ids prints", text.returncode == 0 and len(text.stdout.strip()) > 0)

    # --echo
    echo = t.run([kjv, "-p", prompt, "-n", "8", "-t", "0", "--echo"])
    t.check("--echo prints the prompt before the continuation (the BOS the tokenizer added is not text)",
            echo.stdout == (prompt.encode() + by_p.stdout))
    echo_ids = t.run([kjv, "-p", prompt, "-n", "6", "-t", "0", "--echo", "--print-ids"])
    t.check("--echo --print-ids: the prompt's ids (BOS included), then the generated ones, one list",
            ids_of(echo_ids.stdout) == ids + ids_of(gen.stdout))

    # sampling flags: greedy stays greedy whatever the filters; the penalty changes greedy text
    greedy = t.run([kjv, "-p", prompt, "-n", "24", "-t", "0"]).stdout
    filtered = t.run([kjv, "-p", prompt, "-n", "24", "-t", "0", "--top-k", "3", "--min-p", "0.2", "--top-p", "0.5"]).stdout
    penalized = t.run([kjv, "-p", prompt, "-n", "24", "-t", "0", "--repeat-penalty", "1.5"]).stdout
    t.check("-t 0: --top-k / --top-p / --min-p keep the most likely token, --repeat-penalty 1.5 changes the text",
            filtered == greedy and penalized != greedy)
    k1 = t.run(sample + ["-s", "3", "--top-k", "1"]).stdout
    t.check("--top-k 1 samples the greedy text at any temperature", k1 == greedy)
    for args, want in ((["--top-k", "-1"], "--top-k must be between 0"), (["--min-p", "1.5"], "--min-p must be between 0 and 1"),
                       (["--repeat-penalty", "0"], "--repeat-penalty must be positive"),
                       (["--repeat-last-n", "-2"], "--repeat-last-n must be between -1"),
                       (["--system", "x"], "--system is a message of --chat"), (["--stride", "4"], "set the windows of --ppl")):
        r = t.run([kjv, "-p", "x"] + args)
        err = r.stderr.decode(errors="replace")
        t.check(f"{' '.join(args)}: one error line ({want})", r.returncode == 1 and want in err and err.count("\n") == 1, err)

    # --profile: a table per phase whose time per token is the stats line's (loading and the KV cache set aside
    # before the prompt are not prefill time)
    prof = t.run([kjv, "-p", prompt, "-n", "16", "-t", "0", "--profile"])
    err = prof.stderr.decode(errors="replace")
    rates = re.search(r"prefill (\d+) tok ([\d.]+) tok/s \| decode (\d+) tok ([\d.]+) tok/s", err)
    phases = dict(re.findall(r"profile: (prefill|decode), \d+ \w+, \d+ threads: ([\d.]+) ms per", err))
    shares = re.findall(r"\n  \S.*? +[\d.]+ +([\d.]+)% +\d+%", err)
    close = lambda ms, rate: rates is not None and abs(float(ms) * float(rate) / 1e3 - 1) < 0.25
    t.check("--profile: prefill and decode tables, their ms per token within 25% of the stats line's rates, the "
            "shares of the sections adding up to 100% per phase",
            prof.returncode == 0 and set(phases) == {"prefill", "decode"} and close(phases["prefill"], rates.group(2))
            and close(phases["decode"], rates.group(4)) and abs(sum(map(float, shares)) - 200) < 1, err[-800:])

    # export.py: per-tensor progress only on a terminal
    src = os.path.join(t.data, "fixtures", "llama_gqa")
    out = t.tmp("progress.bin")
    cmd = [t.python, os.path.join(t.root, "export.py"), src, out]
    piped = subprocess.run(cmd, capture_output=True)
    status, _, err = with_terminal_stderr(cmd)
    t.check("export.py: no per-tensor lines when stderr is not a terminal; on a terminal one line rewritten per "
            "tensor, cleared at the end", piped.returncode == 0 and b"tensor 1 of" not in piped.stderr and status == 0
            and re.search(rb"\r\x1b\[2Kexport: tensor 1 of \d+ \(", err) is not None
            and b"\r\x1b[2Kexport: wrote" in err.replace(b"\r\x1b[2K\r\n", b"\r\x1b[2K"), err[-300:])
