"""pretokenizers.py - pre-tokenizers as the Split steps the tokenizer record stores (docs/FORMAT.md, "Tokenizer").

The tokenizers library splits text into words before BPE with a pre-tokenizer: one, or a Sequence applied
one after another to every piece the previous one left. attn.c runs each as a regex Split step (regex.c):
    Split(pattern, behavior, invert)   the pattern (a Regex, or a String matched literally)
    ByteLevel(use_regex=True)          Split with GPT-2's regex, Isolated (and the byte alphabet)
    Digits(individual_digits)          Split(\\p{N}, Isolated) or Split(\\p{N}+, Isolated)
    Punctuation(behavior)              Split(one ASCII or Unicode punctuation character, behavior)
    WhitespaceSplit                    Split(\\s+, Removed)
    Whitespace                         Split(\\w+|[^\\w\\s]+, Removed, invert)
    CharDelimiterSplit(c)              Split(c, Removed)
GGUF files name their pre-tokenizer instead (`tokenizer.ggml.pre`); NAMED below gives each name the steps
of the tokenizer.json it was converted from.

regex_problem() checks that a pattern stays inside the subset regex.c compiles (the loader compiles it again
and refuses the file if it does not)."""
import json

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# GPT-4o / o200k (gpt-oss, Llama 4): words split before capitals, contractions kept with their word
O200K_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_V3_REGEX = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                     r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BAILING_REGEX = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
SEED_CODER_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
PUNCTUATION_CLASS = r"[\p{P}!-/:-@\[-`{-~]"  # Rust's is_ascii_punctuation() or is_punctuation()


def char_ranges(*ranges):
    """A class body from code-point ranges (written with escapes, so every character is exact)."""
    return "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)


# DeepSeek LLM's letters (the cased letters of Unicode, range by range), punctuation and CJK classes
DEEPSEEK_LETTERS = char_ranges(
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF), (0x1C4, 0x293),
    (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A),
    (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556), (0x10A0, 0x10C5),
    (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77),
    (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57),
    (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC),
    (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC),
    (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115),
    (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134),
    (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B),
    (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F),
    (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A),
    (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2),
    (0x118A0, 0x118DF), (0x1E900, 0x1E943))
DEEPSEEK_PUNCT = char_ranges((0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F), (0x3000, 0x3002))
DEEPSEEK_CJK = char_ranges((0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF))
BLOOM_REGEX = r" ?[^(\s|.,!?" + char_ranges((0x2026, 0x2026), (0x3002, 0x3002), (0xFF0C, 0xFF0C), (0x3001, 0x3001),
                                            (0x964, 0x964), (0x6D4, 0x6D4), (0x60C, 0x60C)) + r")]+"

# Split behaviors, as the record numbers them (tokenizer.h, SPLIT_*)
BEHAVIORS = {"Isolated": 0, "Removed": 1, "MergedWithPrevious": 2, "MergedWithNext": 3, "Contiguous": 4}
ISOLATED, REMOVED = 0, 1


def step(pattern, behavior=ISOLATED, invert=False):
    return (pattern, behavior, bool(invert))


DIGITS = step(r"\p{N}")
GPT2 = step(GPT2_REGEX)

# tokenizer.ggml.pre -> (steps, ignore_merges, add_bos when the file does not say): the pre-tokenizer of the
# tokenizer.json each name stands for (llama.cpp's llama-vocab.cpp names them; convert_hf_to_gguf_update.py
# lists the models)
_LLAMA3 = ([step(LLAMA3_REGEX)], True, True)
_QWEN2 = ([step(QWEN2_REGEX)], False, False)
_GPT2 = ([GPT2], False, False)
_STARCODER = ([DIGITS, GPT2], False, False)
_O200K = ([step(O200K_REGEX)], False, False)
NAMED = {
    **{n: _LLAMA3 for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")},
    **{n: ([step(LLAMA3_REGEX)], False, False) for n in ("dbrx", "smaug-bpe", "chatglm-bpe", "glm4")},
    **{n: _QWEN2 for n in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan", "grok-2")},
    **{n: _GPT2 for n in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4", "gigachat", "mellum", "jina-es",
                          "jina-de", "jina-v2-es", "jina-v2-de", "a.x-4.0", "granite-docling", "default")},
    **{n: _STARCODER for n in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b")},
    **{n: _O200K for n in ("gpt-4o", "llama4", "minimax-m2", "kanana2")},
    "tekken": ([step(TEKKEN_REGEX)], True, True),
    "falcon": ([step(PUNCTUATION_CLASS + "+"), GPT2, step("[0-9][0-9][0-9]")], False, False),
    "deepseek-llm": ([step(r"[\r\n]"), step(r"\s?[" + DEEPSEEK_LETTERS + "]+"), step(r"\s?[" + DEEPSEEK_PUNCT + "]+"),
                      step(r"\s+$"), step("[" + DEEPSEEK_CJK + "]+"), step(r"\p{N}+")], False, False),
    "deepseek-coder": ([step(r"[\r\n]"), step(r"\s?\p{L}+"), step(r"\s?\p{P}+"), step("[" + DEEPSEEK_CJK + "]+"),
                        DIGITS], False, False),
    "deepseek-v3": ([step(r"\p{N}{1,3}"), step("[" + char_ranges((0x4E00, 0x9FA5), (0x3040, 0x309F), (0x30A0, 0x30FF)) + "]+"),
                     step(DEEPSEEK_V3_REGEX)], False, False),
    "poro-chat": ([step(BLOOM_REGEX)], False, False),
    "bloom": ([step(BLOOM_REGEX)], False, False),
    "gpt3-finnish": ([step(BLOOM_REGEX)], False, False),
    "viking": ([step(BLOOM_REGEX), DIGITS], False, False),
    "superbpe": ([step(r"\p{N}+"), step(r"(?=(\d{3})+(?!\d))")], False, False),
    "bailingmoe": ([step(BAILING_REGEX)], False, False),
    "bailingmoe2": ([step(BAILING_REGEX)], False, False),
    "seed-coder": ([step(SEED_CODER_REGEX)], False, False),
}


class PretokenizerError(Exception):
    """A pre-tokenizer attn.c cannot run (the message names it)."""


def escape_literal(text):
    """A Split String pattern as a regex that matches exactly that text."""
    return "".join("\\" + c if c in "\\^$.|?*+()[]{}-/" else c for c in text)


def steps_of_block(block):
    """The flattened steps of a tokenizer.json pre_tokenizer (Sequence or single), as dicts."""
    if block is None:
        return []
    if not isinstance(block, dict):
        raise PretokenizerError(f"pre_tokenizer {block!r} is not an object")
    if block.get("type") == "Sequence":
        out = []
        for b in block.get("pretokenizers") or []:
            out += steps_of_block(b)
        return out
    return [block]


def split_steps(block):
    """(Split steps, ByteLevel add_prefix_space, whether a ByteLevel step is there) of a byte-level tokenizer.json's
    pre_tokenizer, or PretokenizerError naming what attn.c cannot run."""
    steps, prefix_space, bytelevel = [], False, False
    for s in steps_of_block(block):
        t = s.get("type")
        if t == "ByteLevel":
            bytelevel = True
            if s.get("add_prefix_space", False):
                if steps:  # the tokenizers library would put a space before every piece left so far
                    raise PretokenizerError("pre-tokenizer ByteLevel with add_prefix_space after another step is not supported")
                prefix_space = True
            if s.get("use_regex", True):
                steps.append(GPT2)
        elif t == "Split":
            pattern = s.get("pattern") or {}
            if isinstance(pattern.get("Regex"), str):
                regex = pattern["Regex"]
            elif isinstance(pattern.get("String"), str) and pattern["String"]:
                regex = escape_literal(pattern["String"])
            else:
                raise PretokenizerError(f"pre-tokenizer Split with pattern {json.dumps(pattern)} is not supported")
            behavior = s.get("behavior", "Isolated")
            if behavior not in BEHAVIORS:
                raise PretokenizerError(f"pre-tokenizer Split behavior {behavior!r} is not supported")
            steps.append(step(regex, BEHAVIORS[behavior], s.get("invert", False)))
        elif t == "Digits":
            steps.append(DIGITS if s.get("individual_digits", False) else step(r"\p{N}+"))
        elif t == "Punctuation":
            behavior = s.get("behavior", "Isolated")
            if behavior not in BEHAVIORS:
                raise PretokenizerError(f"pre-tokenizer Punctuation behavior {behavior!r} is not supported")
            steps.append(step(PUNCTUATION_CLASS, BEHAVIORS[behavior]))
        elif t == "WhitespaceSplit":
            steps.append(step(r"\s+", REMOVED))
        elif t == "Whitespace":
            steps.append(step(r"\w+|[^\w\s]+", REMOVED, True))
        elif t == "CharDelimiterSplit" and isinstance(s.get("delimiter"), str) and len(s["delimiter"]) == 1:
            steps.append(step(escape_literal(s["delimiter"]), REMOVED))
        else:
            raise PretokenizerError(f"pre-tokenizer {json.dumps(s, ensure_ascii=False)[:120]} is not supported with byte-level BPE")
    for pattern, _, _ in steps:
        problem = regex_problem(pattern)
        if problem:
            raise PretokenizerError(f"pre-tokenizer regex {pattern[:80]!r}: {problem}")
    return steps, prefix_space, bytelevel


# ----------------------------------------------------------------------------
# the regex subset regex.c compiles (its header lists it); the parser below walks the same grammar


PROPERTY_NAMES = {n.lower() for n in (
    "L Letter LC L& Cased_Letter Lu Uppercase_Letter Ll Lowercase_Letter Lt Titlecase_Letter Lm Modifier_Letter Lo "
    "Other_Letter M Mark Combining_Mark Mn Nonspacing_Mark Mc Spacing_Mark Me Enclosing_Mark N Number Nd "
    "Decimal_Number Nl Letter_Number No Other_Number P Punctuation Pc Connector_Punctuation Pd Dash_Punctuation Ps "
    "Open_Punctuation Pe Close_Punctuation Pi Initial_Punctuation Pf Final_Punctuation Po Other_Punctuation S Symbol "
    "Sm Math_Symbol Sc Currency_Symbol Sk Modifier_Symbol So Other_Symbol Z Separator Zs Space_Separator Zl "
    "Line_Separator Zp Paragraph_Separator C Other Cc Control Cf Format Cs Surrogate Co Private_Use Cn Unassigned "
    "White_Space Space Han Hiragana Katakana Hangul Latin Greek Cyrillic Arabic Hebrew Thai Devanagari").split()}
CHAR_ESCAPES = {"t": 9, "n": 10, "r": 13, "f": 12, "v": 11, "a": 7, "e": 27, "0": 0}
CLASS_ESCAPES = set("sSdDwWhHpP")
ANCHOR_ESCAPES = set("AzZbB")


class _Refused(Exception):
    pass


class _Checker:
    def __init__(self, p):
        self.p, self.i, self.depth = p, 0, 0

    def fail(self, what):
        raise _Refused(f"{what} at offset {len(self.p[:self.i].encode())}")

    def peek(self, k=0):
        return self.p[self.i + k] if self.i + k < len(self.p) else None

    def alternation(self):
        self.sequence()
        while self.peek() == "|":
            self.i += 1
            self.sequence()

    def sequence(self):
        while self.peek() not in (None, "|", ")"):
            kind = self.atom()
            if kind != "flags":
                self.quantifier(kind)

    def interval(self):
        """Length of a valid {n}, {n,}, {n,m}, {,m} at i, or 0 (then '{' is a literal)."""
        j, n = self.i + 1, len(self.p)
        lo = j
        while j < n and self.p[j].isdigit():
            j += 1
        has_lo = j > lo
        has_hi = False
        if j < n and self.p[j] == ",":
            j += 1
            hi = j
            while j < n and self.p[j].isdigit():
                j += 1
            has_hi = j > hi
            if not (has_lo or has_hi):
                return 0
            if has_lo and has_hi and int(self.p[hi:j]) < int(self.p[lo:hi - 1]):
                self.fail("a repeat {n,m} has m < n")
        elif not has_lo:
            return 0
        if j >= n or self.p[j] != "}":
            return 0
        if any(int(x) > 100000 for x in self.p[self.i + 1:j].split(",") if x):
            self.fail("repeat count too large")
        return j + 1 - self.i

    def quantifier(self, kind):
        c = self.peek()
        if c in ("?", "*", "+"):
            self.i += 1
            interval = False
        elif c == "{" and self.interval():
            self.i += self.interval()
            interval = True
        else:
            return
        if kind == "anchor":
            self.fail("an anchor cannot be repeated")
        if self.peek() == "?" or (self.peek() == "+" and not interval):
            self.i += 1
        if self.peek() in ("?", "*", "+") or (self.peek() == "{" and self.interval()):
            self.fail("nested quantifiers are not supported")

    def atom(self):
        c = self.peek()
        if c == "(":
            self.i += 1
            return self.group()
        if c == "[":
            self.i += 1
            self.klass()
            return "char"
        if c in ("^", "$"):
            self.i += 1
            return "anchor"
        if c in ("*", "+", "?"):
            self.fail("a quantifier follows nothing")
        if c == "\\":
            self.i += 1
            e = self.peek()
            if e in ANCHOR_ESCAPES:
                self.i += 1
                return "anchor"
            self.escape(in_class=False)
            return "char"
        self.i += 1
        return "char"

    def group(self):
        if self.peek() == "?":
            self.i += 1
            c = self.peek()
            if c in (":", "=", "!", ">"):
                self.i += 1
            elif c in ("i", "-"):
                self.i += 1
                if c == "-":
                    if self.peek() != "i":
                        self.fail("only the i flag is supported in (?...)")
                    self.i += 1
                if self.peek() == ")":
                    self.i += 1
                    return "flags"
                if self.peek() != ":":
                    self.fail("only the i flag is supported in (?...)")
                self.i += 1
            elif c == "<":
                self.fail("lookbehind is not supported" if self.peek(1) in ("=", "!") else "named groups are not supported")
            else:
                self.fail("only the i flag is supported in (?...)" if c and c.isascii() and c.isalpha()
                          else "unsupported group (?...)")
        self.depth += 1
        if self.depth > 64:
            self.fail("groups nested too deeply")
        self.alternation()
        self.depth -= 1
        if self.peek() != ")":
            self.fail("missing )")
        self.i += 1
        return "group"

    def escape(self, in_class):
        """An escape after the backslash: "class", or the code point of a character escape or escaped symbol."""
        e = self.peek()
        if e is None:
            self.fail("the pattern ends with a backslash")
        self.i += 1
        if e in ("p", "P"):
            if self.peek() != "{":
                self.fail("\\p must be followed by {Name}")
            end = self.p.find("}", self.i)
            if end < 0:
                self.fail("unterminated \\p{...}")
            name = self.p[self.i + 1:end].lstrip("^")
            if name.lower() not in PROPERTY_NAMES:
                self.fail("unknown property name in \\p{...}")
            self.i = end + 1
            return "class"
        if e in CLASS_ESCAPES:
            return "class"
        if e in CHAR_ESCAPES:
            return CHAR_ESCAPES[e]
        if e == "b" and in_class:
            return 8
        hexdigits = "0123456789abcdefABCDEF"
        if e == "x":
            if self.peek() == "{":
                end = self.p.find("}", self.i)
                digits = self.p[self.i + 1:end] if end > 0 else ""
                if not (1 <= len(digits) <= 8 and all(d in hexdigits for d in digits)) or int(digits, 16) > 0x10FFFF:
                    self.fail("bad hexadecimal escape")
                self.i = end + 1
                return int(digits, 16)
            start = self.i
            while self.i - start < 2 and self.peek() and self.peek() in hexdigits:
                self.i += 1
            if self.i == start:
                self.fail("bad hexadecimal escape")
            return int(self.p[start:self.i], 16)
        if e == "u":
            digits = self.p[self.i:self.i + 4]
            if len(digits) != 4 or not all(d in hexdigits for d in digits):
                self.fail("bad hexadecimal escape")
            self.i += 4
            return int(digits, 16)
        if e.isdigit():
            self.i -= 1
            self.fail("backreferences are not supported")
        if e.isascii() and e.isalpha():
            self.i -= 1
            self.fail("unsupported escape")
        return ord(e)

    def klass(self):
        if self.peek() == "^":
            self.i += 1
        first = True
        while True:
            c = self.peek()
            if c is None:
                self.fail("unterminated character class")
            if c == "]" and not first:
                self.i += 1
                return
            first = False
            if c == "[":
                self.fail("nested character classes are not supported")
            if c == "&" and self.peek(1) == "&":
                self.fail("class intersections (&&) are not supported")
            if c == "\\":
                self.i += 1
                lo = self.escape(in_class=True)
                if lo == "class":
                    continue
            else:
                self.i += 1
                lo = ord(c)
            if self.peek() == "-" and self.peek(1) not in (None, "]"):
                self.i += 1
                if self.peek() == "\\":
                    self.i += 1
                    if self.peek() in CLASS_ESCAPES:
                        self.fail("a range cannot end in a class escape")
                    hi = self.escape(in_class=True)
                elif self.peek() == "[":
                    self.fail("nested character classes are not supported")
                else:
                    hi = ord(self.peek())
                    self.i += 1
                if hi < lo:
                    self.fail("a character range runs backwards")


def regex_problem(pattern):
    """None if regex.c compiles pattern, else the reason it refuses it (as regex.c words it)."""
    if len(pattern.encode("utf-8", "surrogatepass")) > 65536:
        return "the pattern is too long"
    c = _Checker(pattern)
    try:
        c.alternation()
        if c.peek() is not None:
            c.fail("unmatched )")
    except _Refused as e:
        return f"regex: {e}"
    return None
