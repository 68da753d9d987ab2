"""regex.c against another engine: every pre-tokenizer regex export.py knows (pretokenizers.NAMED and the
tokenizer.json forms) and patterns that exercise each construct, matched over random texts mixing ASCII,
letters of many scripts, digits, marks, spaces, punctuation and emoji. The leftmost-first matches regex.c
finds (tests/unit --regex-matches) must be those of Python's `regex` module (Debian: python3-regex), which
follows the same Perl/Oniguruma rules. Empty matches are left out of the comparison: the two libraries'
iterators treat them differently (regex.c follows the tokenizers library's Oniguruma iterator; tests/unit.c
checks that). And the exporter's check (pretokenizers.regex_problem) refuses exactly what regex.c refuses."""
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretokenizers as P  # noqa: E402

EXTRA = [r"(?:ab|a)*c", r"(a|ab)(c|bcd)(d*)", r"x{2,4}?y", r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+",
         r"(?>a+)b|a+", r"\p{Han}+|\p{Hiragana}+|\p{Katakana}+", r"(?i)hello|world", r"[^a-c\d]+", r"\bfoo\b",
         r"^\s+|\s+$", r"[\x{4E00}-\x{9FA5}]+", r"\u00e9+|\x41", r"(?i:[a-z]+)", r"[\p{Lu}\p{Lt}][\p{Ll}]*", r"\P{L}+",
         r"[\P{N}\d]+", r"\p{^L}+", r"a{,2}b", r".+", r"(?:\s?\p{P}+){2,}", P.PUNCTUATION_CLASS + "+"]
ALPHABET = list("aAbBcCxyzHhellowWORLDfo  \t\n\r'sStTdDmMlLvVeErR0123456789.,!?-/$+<=>^~|`()[]{}") + \
    ["ſ", "é", "É", "ß", "Ω", "ω", "中", "文", "ひ", "カ", "한", "Ⅳ", "½", "٣", "\u00a0", "\u3000", "\u2028", "—", "“", "”",
     "…", "😀", "\u0301", "ǅ", "ʰ", "\u212a", "！", "。", "ж", "Ж", "ก", "א"]
GOOD = [r"a|b", r"[\]a]", r"a{", r"x{1,}", r"\x{10FFFF}", r"(?-i:a)", r"[a-]", r"\p{Lu}"]
BAD = [r"(?<=a)b", r"(?<n>a)", r"(a)\1", r"[a[b]]", r"[a&&b]", r"\p{Klingon}", r"(?m)a", r"(?x)a", r"a)", r"(a", r"[a",
       r"a**", r"a{2}{3}", r"\X", r"\R", r"\k<a>", r"x{3,2}", r"^*", r"[z-a]", r"\x{110000}", "a\\", r"*a"]


def all_patterns():
    named = {regex for steps, _, _ in P.NAMED.values() for regex, _, _ in steps}
    return sorted(named | {P.GPT2_REGEX, P.LLAMA3_REGEX, P.QWEN2_REGEX, P.O200K_REGEX, P.TEKKEN_REGEX}) + EXTRA


def for_python(pattern):
    """The pattern in the regex module's syntax: it has no \\x{HHHH}, so those become the characters."""
    import re
    return re.sub(r"\\x\{([0-9A-Fa-f]+)\}", lambda m: re.escape(chr(int(m.group(1), 16))), pattern)


def run_tool(t, lines):
    r = subprocess.run([t.unit_bin, "--regex-matches"], input="".join(lines).encode(), capture_output=True, timeout=300)
    return r.stdout.decode().split("\n")


def run(t):
    try:
        import regex
    except ImportError:
        t.check("Python's regex module is installed (Debian: python3-regex), the reference engine", False)
        return
    rng = random.Random(11)
    cases = []
    for pattern in all_patterns():
        for _ in range(120):
            cases.append((pattern, "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))))
    out = run_tool(t, [p.encode().hex() + " " + s.encode().hex() + "\n" for p, s in cases])
    agree, first_bad = 0, None
    for (pattern, text), line in zip(cases, out):
        char = {len(text[:i].encode()): i for i in range(len(text) + 1)}  # byte offset -> character offset
        got = None if line.startswith("ERR") else \
            [(char[int(x.split(",")[0])], char[int(x.split(",")[1])]) for x in line.split()]
        got = got and [m for m in got if m[0] != m[1]]
        want = [m.span() for m in regex.compile(for_python(pattern), regex.MULTILINE).finditer(text) if m.start() != m.end()]
        if got == want or (got == [] and want == []):
            agree += 1
        elif first_bad is None:
            first_bad = f"{pattern[:60]!r} on {text!r}: regex.c {line[:80]!r}, regex module {want}"
    t.check(f"regex.c finds the matches Python's regex module finds: {agree}/{len(cases)} (pattern, text) pairs, "
            f"{len(all_patterns())} patterns", agree == len(cases), first_bad or "")

    out = run_tool(t, [p.encode("utf-8", "surrogateescape").hex() + " \n" for p in GOOD + BAD])
    for pattern, line in zip(GOOD + BAD, out):
        c_refuses, py_problem = line.startswith("ERR"), P.regex_problem(pattern)
        t.check(f"regex {pattern!r}: regex.c {'refuses' if c_refuses else 'compiles'} it and so does export.py's check",
                c_refuses == bool(py_problem) == (pattern in BAD), f"{line} / {py_problem}")
