"""Chat (docs/CHAT.md): the chat template comes from the checkpoint at export, is stored in the model file, and
chat.c's Jinja interpreter renders it.

- Renders equal llama.cpp's expected strings for every template of its test-chat-template.cpp (with llama.cpp's
  convention of a leading BOS and a trailing EOS left to the tokenizer; where llama.cpp's own engine differs
  from jinja2, the render equals jinja2's), and equal jinja2's renders, in transformers' environment, of the
  real templates in $ATTN_SHARED/llamacpp/templates for several conversations.
- export.py finds the template where transformers does (chat_template.jinja, tokenizer_config.json, a list
  with a default, --chat-template FILE) and stores the special-token strings it reads.
- --chat: one-shot and interactive; the text fed each turn, with the replies, is exactly the render of the
  conversation; the KV cache is kept between turns (only the new text is fed, and a reply equals the one a
  full recompute gives); generation stops at the template's end-of-turn token; empty lines, the end of the
  input and a full context end cleanly. Control tokens written by a template (<s>) become their ids.
- Hostile templates end in one error line, fast."""
import argparse
import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

from harness import ROOT, ids_of, tiny_llama_dir, write_safetensors
from hostile_corpus import HOSTILE_TEMPLATES

sys.path.insert(0, ROOT)
import export as E  # noqa: E402

CONVERSATION = [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Who are you"},
                {"role": "assistant", "content": "   I am an assistant   "}, {"role": "user", "content": "Another question"}]
CONVERSATIONS = [
    CONVERSATION,
    CONVERSATION[1:],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "  spaced\n\n"},
     {"role": "assistant", "content": "\n ok \n"}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "caf\u00e9 \u2581 \U0001F600 'q' \"d\" \\ {{ x }} {% if %}"},
     {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nAnswer"}, {"role": "user", "content": "next"}],
]
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a small model.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
EPOCH = "1722000000"  # SOURCE_DATE_EPOCH: what strftime_now() sees, here and in jinja2


# ---------------------------------------------------------------------------------------------------------
# models with a chat section


def chatml_checkpoint(t, name, zero_final_norm=False, tokenizer_config=None, **cfg):
    """A 1-layer Llama whose GPT-2-style tokenizer has <|im_end|> at id 0 (no EOS) and <|im_start|> at 1024;
    zero_final_norm makes every logit 0, so greedy decoding always picks id 0, <|im_end|>."""
    d = tiny_llama_dir(t.tmp(name), 1025, **cfg)
    if os.path.exists(os.path.join(d, "chat_template.jinja")):  # left by an earlier run
        os.unlink(os.path.join(d, "chat_template.jinja"))
    tok = json.load(open(os.path.join(t.data, "tokenizers", "bytelevel_gpt2_style", "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    vocab["<|im_end|>"] = vocab.pop("<|endoftext|>")
    tok["added_tokens"] = [dict(tok["added_tokens"][0], content="<|im_end|>"),
                           dict(tok["added_tokens"][0], id=1024, content="<|im_start|>")]
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config if tokenizer_config is not None else {"chat_template": CHATML}, f)
    if zero_final_norm:
        st = E.SafeTensors(d)
        tensors = {n: st.get(n) for n in st.names()}
        tensors["model.norm.weight"] = np.zeros_like(tensors["model.norm.weight"])
        write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    return d


class Models:
    """Model files that differ only in their chat section, written in this process from one converted checkpoint."""

    def __init__(self, t, src):
        self.t = t
        args = argparse.Namespace(tokenizer=None, no_tokenizer=False, chat_template=None)
        with contextlib.redirect_stderr(io.StringIO()):
            self.model = E.convert_hf(src, args)
        self.n = 0

    def with_template(self, template, variables):
        m = copy.copy(self.model)
        m.tensors = list(self.model.tensors)
        m.chat = E.pack_chat_section(template, list(variables.items()))
        self.n += 1
        path = self.t.tmp(f"chat-template-{self.n}.bin")
        with contextlib.redirect_stderr(io.StringIO()):
            E.write_model(m, path, E.DTYPES["f32"])
        return path


def render(t, model, messages):
    path = t.tmp("messages.json")
    with open(path, "w") as f:
        json.dump(messages, f)
    r = t.run([model, "--render-chat", path])
    return r.stdout.decode("utf-8", "replace") if r.returncode == 0 else "ERROR " + r.stderr.decode(errors="replace")


# ---------------------------------------------------------------------------------------------------------
# the reference: jinja2 in transformers' environment, and llama.cpp's polyfill for templates without a system


def jinja_env():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    class Generation(jinja2.ext.Extension):  # transformers' {% generation %} marks; renders the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.fromtimestamp(int(EPOCH)).strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def jinja_render(env, template, messages, variables):
    def raw(msgs):
        return env.from_string(template).render(messages=msgs, tools=None, documents=None, add_generation_prompt=True,
                                                **variables)
    try:
        probe = raw([{"role": "system", "content": "<System Needle>"}, {"role": "user", "content": "Hey"}])
        supports_system = "<System Needle>" in probe
    except Exception:
        supports_system = False
    if not supports_system and any(m["role"] == "system" for m in messages):
        folded, pending = [], ""
        for m in messages:
            if m["role"] == "system":
                pending = pending + "\n" + m["content"] if pending else m["content"]
                continue
            if pending and m["role"] == "user":
                m = dict(m, content=pending + ("\n" + m["content"] if m["content"] else ""))
                pending = ""
            elif pending:
                folded.append({"role": "user", "content": pending})
                pending = ""
            folded.append(m)
        messages = folded + ([{"role": "user", "content": pending}] if pending else [])
    try:
        return raw(messages)
    except Exception as e:
        return f"ERROR {type(e).__name__}: {e}"


def cpp_string(src, i):
    """The C++ string literal (u8"", adjacent literals joined) at src[i:]: (value, end)."""
    out = []
    while True:
        m = re.compile(r'\s*(u8)?"').match(src, i)
        if not m:
            return "".join(out), i
        i = m.end()
        while src[i] != '"':
            if src[i] == "\\":
                out.append({"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "r": "\r"}[src[i + 1]])
                i += 2
            else:
                out.append(src[i])
                i += 1
        i += 1


def llama_cpp_cases(path):
    """The test cases of llama.cpp's test-chat-template.cpp: name, template, expected strings, bos/eos, jinja."""
    src = open(path, encoding="utf-8").read()
    start = src.index("std::vector<TestCase> test_cases {")
    cases = []
    starts = [start + m.start() for m in re.finditer(r"/\* \.name= \*/", src[start:])]
    for k, a in enumerate(starts):
        b = starts[k + 1] if k + 1 < len(starts) else src.index("};", a)
        case = {"name": cpp_string(src, a + len("/* .name= */"))[0], "bos_token": "", "eos_token": ""}
        for key in ("template_str", "expected_output", "expected_output_jinja", "bos_token", "eos_token"):
            j = src.find(f"/* .{key}= */", a, b)
            if j >= 0:
                case[key] = cpp_string(src, j + len(f"/* .{key}= */"))[0]
        j = src.find("/* .supported_with_jinja= */", a, b)
        case["jinja"] = j < 0 or "false" not in src[j:j + 40]
        cases.append(case)
    return cases


# ---------------------------------------------------------------------------------------------------------


def llama_cpp_expectations(t, models, env):
    path = t.shared_file("llamacpp/test-chat-template.cpp", "chat: llama.cpp's test-chat-template.cpp expectations")
    if not path:
        return
    cases = [c for c in llama_cpp_cases(path) if c["jinja"]]
    exact, by_jinja, bad = [], [], []
    for c in cases:
        variables = {"bos_token": c["bos_token"], "eos_token": c["eos_token"]}
        got = render(t, models.with_template(c["template_str"], variables), CONVERSATION)
        want = c.get("expected_output_jinja") or c["expected_output"]
        trimmed = got
        if c["bos_token"] and trimmed.startswith(c["bos_token"]):  # llama.cpp leaves BOS and EOS to its tokenizer
            trimmed = trimmed[len(c["bos_token"]):]
        if c["eos_token"] and trimmed.endswith(c["eos_token"]):
            trimmed = trimmed[:-len(c["eos_token"])]
        if trimmed == want:
            exact.append(c["name"])
        elif env is not None and got == jinja_render(env, c["template_str"], CONVERSATION, variables):
            by_jinja.append(c["name"].split(" ")[0])
        else:
            bad.append(f"{c['name']}: got {got!r}, want {want!r}")
    t.check(f"chat: {len(exact)} of {len(cases)} templates of llama.cpp's test-chat-template.cpp render its expected "
            f"prompt; {len(by_jinja)} render what jinja2 renders where llama.cpp's engine differs ({', '.join(by_jinja)})",
            not bad and len(exact) >= len(cases) - 3, "; ".join(bad[:3]))


def real_templates(t, models, env):
    folder = t.shared_file("llamacpp/templates", "chat: the real templates of llamacpp/templates")
    if not folder:
        return
    if env is None:
        t.skip("chat: the real templates against jinja2", "python3-jinja2 is not installed (apt-get install python3-jinja2)")
        return
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    families = {"Qwen": "ChatML (Qwen2.5)", "Llama-3": "Llama 3.x", "Mistral": "[INST] (Mistral)",
                "gemma": "Gemma", "Phi-3": "Phi-3", "DeepSeek": "DeepSeek", "deepseek": "DeepSeek"}
    seen, bad, renders = set(), [], 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jinja"):
            continue
        template = open(os.path.join(folder, name), encoding="utf-8").read()
        variables = {"bos_token": "<|begin_of_text|>" if "Llama-3" in name else "<s>",
                     "eos_token": "<|eot_id|>" if "Llama-3" in name else "</s>"}
        model = models.with_template(template, variables)
        for k, conversation in enumerate(CONVERSATIONS):
            want = jinja_render(env, template, conversation, variables)
            got = render(t, model, conversation)
            renders += 1
            if want.startswith("ERROR") and got.startswith("ERROR"):
                continue
            if got != want:
                bad.append(f"{name} conversation {k}: got {got[:160]!r}, jinja2 {want[:160]!r}")
            else:
                seen.update(f for key, f in families.items() if key in name)
    t.check(f"chat: {renders} renders of the real templates ({len(os.listdir(folder)) - 1} files) equal jinja2's in "
            f"transformers' environment; families: {', '.join(sorted(seen))}", not bad and len(seen) == 6, "; ".join(bad[:3]))


def export_sources(t):
    """Where export.py finds the template, what it stores, and its one-line errors."""
    src = chatml_checkpoint(t, "chat-export", tokenizer_config={
        "chat_template": [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": CHATML}],
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    out = t.export(src, "chat-export.bin")
    msgs = [{"role": "user", "content": "Hi"}]
    t.check("export: tokenizer_config.json's list of templates gives the 'default' one",
            render(t, out, msgs) == "<|im_start|>system\nYou are a small model.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                    "<|im_start|>assistant\n")
    with open(os.path.join(src, "chat_template.jinja"), "w") as f:
        f.write("{{ bos_token }}|{{ eos_token }}|{% for m in messages %}{{ m.content }}{% endfor %}\n")
    out = t.export(src, "chat-export-jinja.bin")
    t.check("export: chat_template.jinja wins over tokenizer_config.json; bos_token / eos_token strings are stored "
            "(a {content: ...} entry too); the template's final newline is dropped as jinja2 drops it",
            render(t, out, msgs) == "<|im_start|>|<|im_end|>|Hi")
    own = t.tmp("own-template.jinja")
    with open(own, "w") as f:
        f.write("{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}")
    out = t.export(src, "chat-export-own.bin", "--chat-template", own)
    t.check("export --chat-template FILE stores the given template", render(t, out, msgs) == "[user] Hi ")
    plain = t.export(os.path.join(t.data, "fixtures", "llama_gqa"), "llama_gqa.bin")
    r = t.run([plain, "--chat", "-p", "hi"])
    err = r.stderr.decode(errors="replace")
    t.check("--chat on a model without a chat template: one error line saying how to get one",
            r.returncode == 1 and "has no chat template" in err and "--chat-template" in err and err.count("\n") == 1, err)
    for label, cfg, want in (("a number", {"chat_template": 7}, "chat_template is not a string"),
                             ("a list without 'default'", {"chat_template": [{"name": "rag", "template": "x"}]},
                              "no 'default' template")):
        bad = chatml_checkpoint(t, "chat-export-bad", tokenizer_config=cfg)
        out = t.tmp("chat-export-bad.bin")
        p = subprocess.run([t.python, os.path.join(t.root, "export.py"), bad, out], capture_output=True, text=True)
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        t.check(f"export: a chat_template that is {label} ends in one error line, no output file",
                p.returncode == 1 and last.startswith("error: ") and want in last and not os.path.exists(out), last)


def conversation(t):
    model = t.export(chatml_checkpoint(t, "chat-run"), "chat-run.bin")
    # one-shot
    r = t.run([model, "-p", "Hello", "--chat", "--system", "Be brief.", "--echo", "-t", "0", "-n", "4"])
    want = render(t, model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    t.check("--chat -p TEXT --system S: --echo shows the rendered prompt, the reply follows",
            r.returncode == 0 and r.stdout.decode(errors="replace").startswith(want), r.stderr.decode()[-200:])
    # interactive: the text fed each turn and the replies are the conversation the template renders
    r = t.run([model, "--chat", "--echo", "--print-ids", "-t", "0", "-n", "6", "--threads", "1"],
              input=b"hello there\n\n   \nsecond turn\nthird\\\nline")
    lines = r.stdout.decode().split("\n")
    fed = [ids_of(x) for x in lines[0:6:2]]
    replies = [ids_of(x) for x in lines[1:6:2]]
    ok = r.returncode == 0 and len(lines) == 7 and lines[6] == ""
    t.check("--chat reads one message per line: empty and blank lines ask nothing, a trailing \\ continues a line, "
            "the end of the input ends the chat (status 0)", ok and len(fed) == 3, repr(r.stdout[-200:]))
    if not ok:
        return

    def decode(ids):
        return t.run([model, "--decode", ",".join(map(str, ids))]).stdout.decode()[:-1] if ids else ""

    messages, text, mismatch = [], "", None
    for k, user in enumerate(["hello there", "second turn", "third\nline"]):
        messages.append({"role": "user", "content": user})
        text += decode(fed[k])
        rendered = render(t, model, messages)
        if text != rendered and mismatch is None:
            mismatch = f"turn {k + 1}: {text!r} vs {rendered!r}"
        reply = decode(replies[k])
        text += reply
        messages.append({"role": "assistant", "content": reply})
    t.check("--chat: what each turn feeds, after the replies before it, is exactly the render of the conversation "
            "so far", mismatch is None, mismatch)
    prefill = int(re.search(rb"prefill (\d+) tok", r.stderr).group(1))
    t.check(f"--chat keeps the KV cache between turns: {prefill} tokens prefilled in all, the new text of each turn",
            prefill == sum(map(len, fed)))
    history = fed[0] + replies[0] + fed[1] + replies[1] + fed[2]
    one = t.run([model, "--tokens", ",".join(map(str, history)), "-t", "0", "-n", "6", "--print-ids", "--threads", "1"])
    again = ids_of(one.stdout)
    n = len(replies[2])
    t.check("--chat: the third reply through the kept cache equals a full recompute of the same ids",
            again[:n] == replies[2] and (n == 6 or again[n] == 0), f"{replies[2]} vs {again}")

    # the end of a turn
    stopper = t.export(chatml_checkpoint(t, "chat-stop", zero_final_norm=True), "chat-stop.bin")
    r = t.run([stopper, "--chat", "-p", "Hi", "-t", "0", "--print-ids"])
    plain = t.run([stopper, "-p", "Hi", "-t", "0", "-n", "3", "--print-ids"])
    t.check("--chat stops at the template's end-of-turn token (<|im_end|>, not an EOS of this tokenizer); plain "
            "generation does not", r.returncode == 0 and r.stdout == b"\n" and ids_of(plain.stdout) == [0, 0, 0],
            f"{r.stdout!r} / {plain.stdout!r}")

    # a full context, before a turn and during a reply
    short = t.export(chatml_checkpoint(t, "chat-short", max_position_embeddings=48), "chat-short.bin")
    r = t.run([short, "--chat", "-t", "0", "-n", "4"], input=b"hi\n" + b"a long message " * 10 + b"\nmore\n")
    err = r.stderr.decode()
    t.check("--chat: a turn that would not fit ends the chat with one line, status 0",
            r.returncode == 0 and "chat: the model's context (48 tokens) is full" in err and err.count("\n") == 2, err)
    r = t.run([short, "--chat", "-t", "0"], input=b"hi\n")
    err = r.stderr.decode()
    t.check("--chat: a reply that reaches the end of the context ends the chat with one line, status 0",
            r.returncode == 0 and "is full" in err and err.count("\n") == 2, err)

    # control tokens a template writes
    sp = os.path.join(t.data, "tokenizers", "sentencepiece_kjv", "tokenizer.model")
    d = tiny_llama_dir(t.tmp("chat-sp"), 4000, [sp])
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>",
                   "chat_template": "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token + '[INST] ' + "
                                    "m.content + ' [/INST]' }}{% else %}{{ ' ' + m.content + eos_token }}{% endif %}"
                                    "{% endfor %}"}, f)
    model = t.export(d, "chat-sp.bin")
    r = t.run([model, "--chat", "--echo", "--print-ids", "-n", "0"], input=b"Hi\n")
    fed = ids_of(r.stdout.split(b"\n")[0])
    plain = ids_of(t.run([model, "--encode", "[INST] Hi [/INST]", "--no-bos"]).stdout)
    t.check("chat prompts: <s> written by the template is the BOS id (a control piece the sentencepiece library "
            "never matches in text), the rest encoded as a prompt", r.returncode == 0 and fed == [1] + plain,
            f"{fed} vs [1] + {plain}")


def errors(t, models):
    model = models.with_template(CHATML, {})
    msgs = t.tmp("bad-messages.json")
    for label, text, want in (("not JSON", b"[{'role': 'user'}]", "messages JSON"),
                              ("not a list", b'{"role": "user", "content": "x"}', "expected a list"),
                              ("a message that is not an object", b'["hi"]', "message 0 is not an object")):
        with open(msgs, "wb") as f:
            f.write(text)
        r = t.run([model, "--render-chat", msgs])
        err = r.stderr.decode(errors="replace")
        t.check(f"--render-chat of {label}: one error line", r.returncode == 1 and want in err and err.count("\n") == 1, err)
    r = t.run([model, "--render-chat", t.tmp("no-such.json")])
    t.check("--render-chat of a missing file: one error line", r.returncode == 1 and b"cannot read" in r.stderr)
    hostile = HOSTILE_TEMPLATES + [("deep if nesting", b"{% if 1 %}" * 300 + b"x" + b"{% endif %}" * 300),
                                   ("an unknown filter named", b"{{ messages | shuffle }}")]
    slow, bad = 0.0, []
    for label, template in hostile:
        path = models.with_template(template.decode(), {})
        start = time.time()
        r = t.run([path, "--chat", "-p", "hi", "-n", "1"], timeout=60)
        slow = max(slow, time.time() - start)
        err = r.stderr.decode(errors="replace")
        if not (r.returncode == 1 and err.startswith("error: chat template") and err.count("\n") == 1):
            bad.append(f"{label}: status {r.returncode}, {err.strip()[:120]}")
    t.check(f"chat: {len(hostile)} hostile templates (recursion, endless loops, memory and output bombs, deep nesting, "
            f"bad syntax) each end in one `error: chat template ...` line, the slowest in {slow:.2f}s", not bad,
            "; ".join(bad[:3]))
    path = models.with_template("{{ messages | shuffle }}", {})
    err = t.run([path, "--render-chat", msgs]).stderr.decode()
    t.check("chat: a construct outside the subset is named, with its line",
            "line 1: the filter 'shuffle' is not in attn.c's Jinja subset" in err, err)


def run(t):
    env = jinja_env()
    models = Models(t, chatml_checkpoint(t, "chat-base"))
    llama_cpp_expectations(t, models, env)
    real_templates(t, models, env)
    export_sources(t)
    conversation(t)
    errors(t, models)
