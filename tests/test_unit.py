"""The C unit tests (tests/unit.c): KV cache paging and rolling, head mapping, attention, tokenizer."""
import subprocess


def run(t):
    r = subprocess.run([t.unit_bin], capture_output=True, text=True, timeout=300, cwd=t.root)
    lines = r.stdout.splitlines()
    for line in lines:
        if line.startswith("ok "):
            t.check(line[3:], True)
        elif line.startswith("FAIL "):
            t.check(line[5:], False)
    t.check("unit tests exit cleanly", r.returncode == 0 and any(l.startswith("ok ") for l in lines),
            r.stderr.strip()[-300:])
