"""Hostile inputs, round two (issue 18): what byte mutations cannot reach -- paths, special files, NaN
weights, resource bombs. One case per item of the issue, each made in a fresh temporary directory (a device
node only when the tests run as root), each run under a time limit and an address-space limit (none under
the sanitizers, whose shadow memory needs terabytes of address space), and each ending in exactly one
`error: ...` line with status 1, or in the correct result."""
import contextlib
import io
import json
import os
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

from harness import ROOT, ids_of, read_safetensors, tiny_llama_dir, write_safetensors
from hostile_corpus import CONFIG_FIELDS, Layout, put

sys.path.insert(0, ROOT)
import export as E  # noqa: E402

SANITIZED = bool(os.environ.get("ASAN_OPTIONS") or os.environ.get("UBSAN_OPTIONS"))
RUN_MEMORY = 1 << 30     # address space for ./run (the tiny models need a few MB)
EXPORT_MEMORY = 3 << 30  # for export.py (numpy and its thread buffers take a few hundred MB of address space)


def limits(memory):
    """preexec_fn: an address-space limit (not under sanitizers)."""
    def apply():
        if not SANITIZED:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return apply


def bounded(args, timeout, **kw):
    """subprocess.run with a time limit; a run that hits it comes back with status None and says so."""
    try:
        return subprocess.run(args, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, None, b"", f"no exit within {timeout}s".encode())


class Files:
    """The cases' files, in one temporary directory removed at the end."""

    def __init__(self, t):
        self.t = t
        self.dir = tempfile.mkdtemp(prefix="attn-hostile-")

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def run(self, args, timeout=20, memory=RUN_MEMORY, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        return bounded([self.t.run_bin] + [str(a) for a in args], timeout, stderr=subprocess.PIPE,
                       preexec_fn=limits(memory), **kw)

    def export(self, src, out, *options, timeout=60, memory=EXPORT_MEMORY):
        return bounded([self.t.python, os.path.join(ROOT, "export.py"), str(src), str(out)] + list(options), timeout,
                       capture_output=True, preexec_fn=limits(memory))

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def error_lines(r):
    """stderr's lines, less export.py's progress lines."""
    text = r.stderr.decode("utf-8", "replace") if isinstance(r.stderr, bytes) else r.stderr
    return [line for line in text.splitlines() if not line.startswith("export: ")]


def one_error(r, want):
    lines = error_lines(r)
    return r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0]


def check_error(t, label, r, want, secs=None):
    lines = error_lines(r)
    t.check(f"{label} -> one line `error: ...{want}...`, status 1" + (f" ({secs:.1f}s)" if secs is not None else ""),
            one_error(r, want), f"status {r.returncode}: {lines[-3:]}")


def timed(f, *args, **kw):
    start = time.time()
    r = f(*args, **kw)
    return r, time.time() - start


def tiny(F, name, tokenizer=True, **cfg):
    """A 1-layer Llama checkpoint directory (GPT-2-style byte-level tokenizer of 1024 tokens when asked)."""
    tok = [os.path.join(F.t.data, "tokenizers", "bytelevel_gpt2_style", "tokenizer.json")] if tokenizer else []
    return tiny_llama_dir(F.path(name), 1024, tok, **cfg)


def write_quietly(m, path, dtype):
    """export.write_model in this process, its progress lines kept off the test output."""
    with contextlib.redirect_stderr(io.StringIO()):
        E.write_model(m, path, E.DTYPES[dtype])


def exported(F, src, name, *options):
    out = F.path(name)
    r = F.export(src, out, *options)
    if r.returncode != 0:
        raise RuntimeError(f"export of {src} failed: {error_lines(r)[-1:]}")
    return out


def safetensors_bytes(header, data):
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(h)) + h + data


# ---------------------------------------------------------------------------------------------------------
# data loss and crashes (items 1-4)


def outputs_are_not_inputs(t, F, model):
    """1: --logits / --attn-map / --attn-dump naming the model (directly, through a symbolic link, through a
    hard link), the -f file or the --tokens file is refused before anything is written."""
    before = open(model, "rb").read()
    link, hard = F.path("model-link.bin"), F.path("model-hard.bin")
    os.symlink(model, link)
    os.link(model, hard)
    prompt, ids = F.path("prompt.txt"), F.path("ids.txt")
    open(prompt, "w").write("Hello")
    open(ids, "w").write("1 2 3\n")
    for opt in ("--logits", "--attn-map", "--attn-dump"):
        for label, path in (("the model", model), ("a symbolic link to the model", link),
                            ("a hard link to the model", hard)):
            r = F.run([model, "-p", "hi", "-n", "2", opt, path])
            check_error(t, f"1: {opt} {label}", r, "an output may not overwrite an input")
    r = F.run([model, "-f", prompt, "-n", "2", "--logits", prompt])
    check_error(t, "1: --logits the -f file", r, "is the -f file")
    r = F.run([model, "--tokens", "@" + ids, "-n", "2", "--attn-dump", ids])
    check_error(t, "1: --attn-dump the --tokens @file", r, "is the --tokens file")
    r = F.run([model, "-p", "hi", "-n", "2", "--attn-map", F.path("same.bin"), "--attn-dump", F.path(".", "same.bin")])
    check_error(t, "1: --attn-map and --attn-dump the same new file", r, "are the same file")
    t.check("1: the model file is unchanged after all of these", open(model, "rb").read() == before)


def model_changed_under_the_run(t, F):
    """2: the model truncated while ./run generates: one line, status 1, no bare SIGBUS. The run writes ids to a
    pipe nobody reads, so it waits at a known point with tokens still to generate."""
    model = exported(F, tiny(F, "bus_src", tokenizer=False, max_position_embeddings=1 << 16), "bus.bin")
    p = subprocess.Popen([t.run_bin, model, "--tokens", "1,2,3", "-n", "60000", "--print-ids", "-t", "1", "-s", "1",
                          "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limits(RUN_MEMORY))
    time.sleep(0.5)
    os.truncate(model, 0)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    lines = err.decode("utf-8", "replace").splitlines()
    t.check("2: the model cut short under the run -> one line `error: ...changed while in use...`, status 1",
            p.returncode == 1 and len(lines) == 1 and "the model file changed while in use" in lines[0],
            f"status {p.returncode}: {lines[-3:]}")


def export_outputs(t, F, src):
    """3, 4 and the late errors: export refuses an output that exists and is not a regular file (a device node,
    as root; a FIFO), that is one of its inputs, or that lies in a missing (or read-only) directory."""
    fifo = F.path("out.fifo")
    os.mkfifo(fifo)
    r, secs = timed(F.export, src, fifo)
    check_error(t, "3: export to an existing FIFO", r, "exists and is not a regular file", secs)
    t.check("3: ... and the FIFO is still a FIFO", stat.S_ISFIFO(os.lstat(fifo).st_mode))
    if os.geteuid() == 0:
        dev = F.path("null-device")
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        r = F.export(src, dev)
        check_error(t, "3: export to a character device node (as root)", r, "exists and is not a regular file")
        t.check("3: ... and the device node is still a character device", stat.S_ISCHR(os.lstat(dev).st_mode))
    else:
        t.skip("3: export to a device node", "needs root to make one")
    shard = os.path.join(src, "model.safetensors")
    before = open(shard, "rb").read()
    r = F.export(src, shard)
    check_error(t, "4: export DIR DIR/model.safetensors", r, "replace its own input")
    hard = F.path("config-hard.json")
    os.link(os.path.join(src, "config.json"), hard)
    r = F.export(src, hard)
    check_error(t, "4: export to a hard link of DIR/config.json", r, "one of the files this export reads")
    r = F.export(src, F.path("no", "such", "dir", "m.bin"))
    check_error(t, "export into a missing directory names the user's path", r, F.path("no", "such", "dir", "m.bin"))
    if os.geteuid() != 0:
        ro = F.path("read-only")
        os.mkdir(ro, 0o555)
        r = F.export(src, os.path.join(ro, "m.bin"))
        check_error(t, "export into a read-only directory", r, "cannot create a file in")
    else:
        t.skip("export into a read-only directory", "root writes into any directory of a writable file system")
    t.check("4: the inputs are unchanged", open(shard, "rb").read() == before and
            open(os.path.join(src, "config.json"), "rb").read() == open(hard, "rb").read())
    leftovers = [f for f in os.listdir(F.dir) if f.startswith(".export-")]
    t.check("export leaves no temporary file behind", not leftovers, str(leftovers))


# ---------------------------------------------------------------------------------------------------------
# hangs and resource bombs (items 5-12)


def many_specials(t, F):
    """5: special-token matching does not grow with the number of special tokens: 2^18 specials, a 64 KB
    prompt made of their first bytes, encoded within seconds (the loop over every special at every byte took
    ~0.2 ms per byte here, 13 s), with the same ids as the longest-first rule gives."""
    n_special = 1 << 18
    vocab = 256 + n_special
    rec = E.TokenizerRecord(E.TOK_BYTELEVEL_BPE, vocab, "test")
    for b in range(256):
        rec.set_piece(b, bytes([b]), E.PIECE_NORMAL)
    for i in range(n_special):
        rec.set_piece(256 + i, b"<|s%d|>" % i, E.PIECE_SPECIAL)
    rec.set_piece(256 + 7, b"<|s7|>", E.PIECE_SPECIAL | E.PIECE_RSTRIP)  # whitespace after it is swallowed
    rec.pretokenizer = E.PRE_NONE
    m = E.Model("llama", 8, vocab, 1024, tied=True)
    m.layers = [E.Layer(E.Attention(1, 1, 8), E.Dense(8))]
    m.tokenizer = rec.pack()
    zeros(m)
    path = F.path("specials.bin")
    write_quietly(m, path, "bf16")
    text = "<|s1|><|s12|>x<|s7|>  <|s123|<|s262143|><|s262144|>"
    r = F.run([path, "--encode", text, "--no-bos"])
    want = [257, 268, ord("x"), 263] + list(b"<|s123|") + [256 + 262143] + list(b"<|s262144|>")
    got = ids_of(r.stdout)
    t.check("5: specials are matched longest first, rstrip swallows the spaces after one", got == want,
            f"{got} != {want}")
    prompt = ("<|s1|> <|s2 <|x <|s99999|>" * 3000)[:65536]
    r, secs = timed(F.run, [path, "--encode", prompt, "--no-bos"], timeout=60)
    n = len(ids_of(r.stdout))
    t.check(f"5: a 64 KB prompt against 2^18 specials encodes in {secs:.1f}s (bound 20 s)",
            r.returncode == 0 and n > 0 and secs < 20, f"status {r.returncode}, {n} ids")


def zeros(m):
    """Every tensor the tensor table asks of m, all zeros (for files whose weights do not matter)."""
    for name, (shape, _) in E.expected_tensors(m).items():
        m.add(name, shape, lambda s=shape: np.zeros(s, np.float32))


def eos_lists(t, F):
    """6, 15: a list of 100,000 eos ids exports in linear time and is kept whole; ./run stops at an eos id past
    the 16th of its list (the old record kept only 16)."""
    src = tiny_llama_dir(F.path("eos_src"), 131072, [os.path.join(t.data, "tokenizers", "bytelevel_gpt2_style",
                                                                     "tokenizer.json")])
    json.dump({"eos_token_id": list(range(1024, 101024))}, open(os.path.join(src, "generation_config.json"), "w"))
    r, secs = timed(F.export, src, F.path("eos.bin"), timeout=120)
    ok = r.returncode == 0
    n_eos = None
    if ok:
        blob = open(F.path("eos.bin"), "rb").read()
        n_eos = len(Layout(blob).tok["eos"])
    t.check(f"6: 100,000 eos ids export in {secs:.1f}s (bound 30 s) and all are kept", ok and secs < 30 and
            n_eos == 100000, f"status {r.returncode}, n_eos {n_eos}: {error_lines(r)[-1:]}")

    src = tiny(F, "eos_small")
    model = exported(F, src, "eos_small.bin")
    r = F.run([model, "-p", "hello", "-n", "1", "-t", "0", "--print-ids"])
    first = ids_of(r.stdout)[0]
    ids = [i for i in range(900, 1024) if i != first][:20] + [first]
    json.dump({"eos_token_id": ids}, open(os.path.join(src, "generation_config.json"), "w"))
    model = exported(F, src, "eos_21.bin")
    r = F.run([model, "-p", "hello", "-n", "5", "-t", "0", "--print-ids"])
    t.check("15: generation stops at the 21st eos id of the list", r.returncode == 0 and ids_of(r.stdout) == [],
            f"printed {r.stdout[:80]!r} (the first greedy id is {first})")


def special_files(t, F, model, src):
    """7, and the /dev/zero half of 10-12: a FIFO, /dev/stdin on a pipe or /dev/zero as an input is refused
    at once (it would block forever or be read until memory runs out)."""
    fifo = F.path("input.fifo")
    os.mkfifo(fifo)
    cases = [("the model a FIFO", [fifo, "-p", "hi"], "not a regular file"),
             ("the model /dev/stdin on a pipe", ["/dev/stdin", "-p", "hi"], "not a regular file"),
             ("-f a FIFO", [model, "-f", fifo], "not a regular file"),
             ("-f /dev/zero", [model, "-f", "/dev/zero"], "not a regular file"),
             ("--tokens @FIFO", [model, "--tokens", "@" + fifo], "not a regular file")]
    for label, args, want in cases:
        r, secs = timed(F.run, args, timeout=20, stdin=subprocess.PIPE)
        check_error(t, f"7: ./run, {label}", r, want, secs)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        d = F.path(f"fifo_{name}")
        shutil.copytree(src, d)
        os.unlink(os.path.join(d, name))
        os.mkfifo(os.path.join(d, name))
        r, secs = timed(F.export, d, F.path("fifo.bin"), timeout=60)
        check_error(t, f"7: export, {name} a FIFO", r, "not a regular file", secs)
        os.unlink(os.path.join(d, name))
        os.symlink("/dev/zero", os.path.join(d, name))
        r, secs = timed(F.export, d, F.path("zero.bin"), timeout=60)
        check_error(t, f"10-12: export, {name} a symbolic link to /dev/zero", r, "not a regular file", secs)
    r, secs = timed(F.export, src, F.path("tok.bin"), "--tokenizer", fifo)
    check_error(t, "7: export --tokenizer a FIFO", r, "not a regular file", secs)
    r, secs = timed(F.export, fifo, F.path("src.bin"))
    check_error(t, "7: export of a FIFO as the checkpoint", r, "not a regular file", secs)


def aliasing_and_memory(t, F):
    """8: tensors that share bytes are refused; a config whose KV cache and scratch would not fit in the
    machine is refused in one line before anything is allocated, and a short run of it works."""
    m = E.Model("llama", 1, 4, 1 << 24, tied=True)
    m.layers = [E.Layer(E.Attention(1024, 1024, 1024, rope_dim=0), E.Dense(1))]
    zeros(m)
    big = F.path("heads.bin")
    write_quietly(m, big, "bf16")
    r, secs = timed(F.run, [big, "--tokens", "1,2", "-n", "16000000"], memory=2 << 30)
    check_error(t, "8: 1024 heads x 1024 head_dim, -n 16M", r, "of memory (KV cache", secs)
    r = F.run([big, "--tokens", "1,2", "-n", "2", "--print-ids", "--threads", "1"], memory=2 << 30)
    t.check("8: the same model runs 2 tokens within 2 GiB of address space", r.returncode == 0,
            error_lines(r)[-1:])
    blob = open(big, "rb").read()
    L = Layout(blob)
    rec = {name: (r_, off) for r_, name, off, _ in L.tensors}
    aliased = put(blob, rec["layers.0.attn.wk"][0] + 104, 8, rec["layers.0.attn.wq"][1])
    path = F.path("aliased.bin")
    open(path, "wb").write(aliased)
    r = F.run([path, "--tokens", "1,2", "-n", "2"])
    check_error(t, "8: wk pointing at wq's bytes", r, "share bytes")


def sparse_tail(t, F, model):
    """9: a header that declares 2 GB more than its tensors (a sparse tail) is refused, without reading it."""
    blob = open(model, "rb").read()
    path = F.path("sparse.bin")
    extra = 2 << 30
    with open(path, "wb") as f:
        f.write(put(put(blob, 8, 8, len(blob) + extra), 88, 8, Layout(blob).data_size + extra))
        f.truncate(len(blob) + extra)
    r, secs = timed(F.run, [path, "-p", "hi", "-n", "2"], memory=4 << 30)  # the mapping counts, not what is read
    check_error(t, "9: a 2 GB sparse tail", r, "belong to no tensor", secs)


def export_bombs(t, F, src):
    """10-12: sizes past the format's limits are refused before anything is built; a safetensors header past
    16 MiB is refused before it is read; a header of 100,000 tiny tensors stays within time and memory."""
    d = F.path("layers_bomb")
    shutil.copytree(src, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump(dict(cfg, num_hidden_layers=10 ** 7), open(os.path.join(d, "config.json"), "w"))
    r, secs = timed(F.export, d, F.path("bomb.bin"), timeout=30)
    check_error(t, "10: num_hidden_layers 1e7", r, "'num_hidden_layers' is 10000000", secs)
    d = F.path("metadata_bomb")
    shutil.copytree(src, d)
    st = os.path.join(d, "model.safetensors")
    with open(st, "wb") as f:
        f.write(struct.pack("<Q", 100 << 20) + b'{"__metadata__": {"a": "')
        f.truncate(8 + (100 << 20) + 64)
    r, secs = timed(F.export, d, F.path("bomb.bin"), timeout=30)
    check_error(t, "11: a 100 MB safetensors header", r, "16 MiB limit", secs)
    d = F.path("tensor_bomb")
    shutil.copytree(src, d)
    st = os.path.join(d, "model.safetensors")
    tensors = read_safetensors(st)
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr.tobytes())
    for i in range(100000):
        header[f"t{i}"] = {"dtype": "F32", "shape": [], "data_offsets": [offset, offset + 4]}
        offset += 4
    open(st, "wb").write(safetensors_bytes(header, b"".join(blobs) + bytes(400000)))
    r, secs = timed(F.export, d, F.path("tensor_bomb.bin"), timeout=60, memory=2 << 30)
    t.check(f"12: 100,000 tiny tensors besides the model's: exported in {secs:.1f}s (bound 30 s) within 2 GiB",
            r.returncode == 0 and secs < 30, error_lines(r)[-1:])


# ---------------------------------------------------------------------------------------------------------
# silent wrong output (items 13-19)


def nonfinite_weights(t, F, src, model):
    """13: export refuses NaN / infinite weights and values past the bf16 range; ./run stops with one line
    naming the position (and the tensor) when logits stop being finite -- generation, --ppl and --logits."""
    for label, value, options, want in (("a NaN weight", np.nan, [], "NaN or infinite"),
                                        ("an infinite weight", np.inf, [], "NaN or infinite"),
                                        ("3.4e38 as bf16", 3.4e38, ["--dtype", "bf16"], "exceeds the bf16 range")):
        d = F.path(f"weights_{label.replace(' ', '_')}")
        shutil.copytree(src, d)
        path = os.path.join(d, "model.safetensors")
        w = {k: np.array(v) for k, v in read_safetensors(path).items()}
        w["model.layers.0.mlp.up_proj.weight"][3, 5] = value
        write_safetensors(path, w)
        r = F.export(d, F.path("nan.bin"), *options)
        check_error(t, f"13: export of {label}", r, want)
    blob = open(model, "rb").read()
    L = Layout(blob)
    off = next(o for _, name, o, _ in L.tensors if name == "layers.0.ffn.w_up")
    nan = F.path("nan-weight.bin")
    open(nan, "wb").write(put(blob, off + 4 * 7, 4, 0x7FC00000) if read_dtype(blob, "layers.0.ffn.w_up") == 0 else
                          put(blob, off + 2 * 7, 2, 0x7FC0))
    for label, args, pos in (("generation", ["--tokens", "5,6", "-n", "3"], 1), ("--ppl", ["--tokens", "5,6", "--ppl"], 0),
                             ("--logits", ["--tokens", "5,6", "-n", "0", "--logits", F.path("l.bin")], 0)):
        r = F.run([nan] + args)
        check_error(t, f"13: a NaN in layers.0.ffn.w_up, {label}: the position and the tensor are named", r,
                    f"the logits at position {pos} are not finite: tensor 'layers.0.ffn.w_up' of the model holds a NaN")
    big = F.path("huge-weight.bin")
    d = F.path("huge_src")
    shutil.copytree(src, d)
    path = os.path.join(d, "model.safetensors")
    w = {k: np.array(v) for k, v in read_safetensors(path).items()}
    w["model.layers.0.mlp.down_proj.weight"][:] = 1e30
    write_safetensors(path, w)
    F.export(d, big)
    for label, args in (("generation", ["-p", "hello", "-n", "3"]), ("--ppl", ["-p", "hello there", "--ppl"])):
        r = F.run([big] + args)
        check_error(t, f"13: weights of 1e30 (finite), {label}: the activations overflow", r, "overflow float32")


def read_dtype(blob, name):
    return next(dt for _, n, dt, _, _, _ in E.read_tensor_directory(blob) if n == name)


def rope_parameters(t, F):
    """14: rope scaling factor 0 / NaN and rope_theta <= 0 are refused by export; a NaN in a file's rope table
    is refused by the loader."""
    base = os.path.join(F.t.data, "fixtures", "llama_mha_rope31")
    cfg = json.load(open(os.path.join(base, "config.json")))
    params = cfg["rope_parameters"]
    for label, change in (("factor 0", {"factor": 0}), ("factor NaN", {"factor": float("nan")}),
                          ("rope_theta 0", {"rope_theta": 0.0}), ("rope_theta -1", {"rope_theta": -1.0})):
        d = F.path(f"rope_{label.replace(' ', '_')}")
        os.makedirs(d)
        for f in os.listdir(base):
            if f != "config.json":
                os.symlink(os.path.join(base, f), os.path.join(d, f))
        json.dump(dict(cfg, rope_parameters=dict(params, **change)), open(os.path.join(d, "config.json"), "w"))
        r = F.export(d, F.path("rope.bin"))
        check_error(t, f"14: export with rope {label}", r, "not finite and positive")
    model = exported(F, base, "rope31.bin")
    blob = open(model, "rb").read()
    off = next(o for _, name, o, _ in Layout(blob).tensors if name == "rope_inv_freq.0")
    for label, bits in (("NaN", 0x7FC00000), ("0", 0), ("-1", 0xBF800000)):
        path = F.path("rope-table.bin")
        open(path, "wb").write(put(blob, off + 4, 4, bits))
        r = F.run([path, "--tokens", "1,2", "-n", "1"])
        check_error(t, f"14: the loader, {label} in a rope table", r, "inverse frequencies must be finite and positive")


def duplicates(t, F, src):
    """16: the same tensor in two shards, overlapping data_offsets and duplicate JSON keys are refused."""
    st = read_safetensors(os.path.join(src, "model.safetensors"))
    d = F.path("two_shards")
    os.makedirs(d)
    shutil.copy(os.path.join(src, "config.json"), d)
    names = sorted(st)
    half = len(names) // 2
    write_safetensors(os.path.join(d, "a.safetensors"), {n: st[n] for n in names[:half + 1]})
    write_safetensors(os.path.join(d, "b.safetensors"), {n: st[n] for n in names[half:]})
    json.dump({"weight_map": {**{n: "a.safetensors" for n in names[:half]}, **{n: "b.safetensors" for n in names[half:]}}},
              open(os.path.join(d, "model.safetensors.index.json"), "w"))
    r = F.export(d, F.path("dup.bin"))
    check_error(t, "16: a tensor in two shards", r, f"tensor '{names[half]}' is in both")
    d = F.path("overlap")
    shutil.copytree(src, d)
    path = os.path.join(d, "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + n])
    a, b = sorted(header, key=lambda k: header[k]["data_offsets"][0])[:2]
    if header[a]["shape"] == header[b]["shape"]:
        header[b]["data_offsets"] = header[a]["data_offsets"]
    else:
        size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
        header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]
    open(path, "wb").write(safetensors_bytes(header, raw[8 + n:]))
    r = F.export(d, F.path("overlap.bin"))
    check_error(t, "16: overlapping data_offsets", r, "share bytes")
    d = F.path("dup_key_header")
    shutil.copytree(src, d)
    path = os.path.join(d, "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", raw)
    text = raw[8:8 + n].rstrip()
    first = json.loads(text)
    name = next(iter(first))
    text = text[:-1] + b', "' + name.encode() + b'": ' + json.dumps(first[name]).encode() + b"}"
    open(path, "wb").write(safetensors_bytes(text.ljust((len(text) + 7) // 8 * 8), raw[8 + n:]))
    r = F.export(d, F.path("dupkey.bin"))
    check_error(t, "16: a safetensors header naming a tensor twice", r, "appears twice")
    d = F.path("dup_key_config")
    shutil.copytree(src, d)
    text = open(os.path.join(d, "config.json")).read().rstrip()
    open(os.path.join(d, "config.json"), "w").write(text[:-1] + ', "num_hidden_layers": 2}')
    r = F.export(d, F.path("dupkey.bin"))
    check_error(t, "16: config.json naming a key twice", r, "'num_hidden_layers' appears twice")


def output_errors(t, F, model):
    """17: a failed write to standard output (/dev/full, or closed with >&-) ends in one line and status 1, for
    generation, --encode, --info, --ppl and --decode."""
    modes = [("generation", ["-p", "hello", "-n", "3"]), ("--encode", ["--encode", "hello"]), ("--info", ["--info"]),
             ("--ppl", ["-p", "hello there", "--ppl"]), ("--decode", ["--decode", "72,101"])]
    for label, args in modes:
        with open("/dev/full", "w") as full:
            r = F.run([model] + args, stdout=full)
        check_error(t, f"17: {label} > /dev/full", r, "cannot write to standard output")
        r = bounded([t.run_bin, model] + args, 20, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    preexec_fn=lambda: os.close(1))
        check_error(t, f"17: {label} >&-", r, "standard output is closed")
    logits = F.path("closed-stdout-logits.bin")
    r = bounded([t.run_bin, model, "-p", "hello", "-n", "0", "--logits", logits], 20, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    size = os.path.getsize(logits) if os.path.exists(logits) else -1
    t.check("17: -n 0 --logits with stdout closed runs, and nothing lands in the logits file but logits",
            r.returncode == 0 and size > 0 and size % (4 * 1024) == 0, f"status {r.returncode}, {size} bytes")


def windows(t, F, model):
    """18: a sliding window that covers the whole context is full attention: the context check applies."""
    d = tiny(F, "window_src", model_type="mistral", sliding_window=64, max_position_embeddings=64)
    out = exported(F, d, "window64.bin")
    r = F.run([out, "--info"])
    t.check("18: export writes a window of 64 over a context of 64 as full attention",
            r.returncode == 0 and b"sliding" not in r.stdout.lower(), r.stdout.decode()[-400:])
    r = F.run([out, "--tokens", ",".join(["5"] * 70), "-n", "1"])
    check_error(t, "18: ... and a prompt past the context is refused", r, "but the model's context is 64")
    blob = open(model, "rb").read()
    L = Layout(blob)
    ctx = struct.unpack_from("<I", blob, L.config_off + 32 + 4 * CONFIG_FIELDS.index("context_length"))[0]
    path = F.path("window-file.bin")
    open(path, "wb").write(put(blob, dict(L.layers[0]["fields"])["mixer window"], 4, ctx + 5))
    r = F.run([path, "--tokens", ",".join(["5"] * (ctx + 1)), "-n", "1"], timeout=60)
    check_error(t, "18: the loader treats a file's window >= the context as full attention", r,
                f"but the model's context is {ctx}")


def q8_tiny_groups(t, F):
    """19: a q8_0 group whose largest weight is ~4e-6 keeps a nonzero scale: its weights survive the export
    (the scale max|w| / 127 rounded to the nearest f16 was 0)."""
    m = E.Model("llama", 32, 32, 64, tied=True)
    m.layers = [E.Layer(E.Attention(2, 2, 16), E.Dense(32))]
    zeros(m)
    tiny_w = np.random.default_rng(7).uniform(-4e-6, 4e-6, (32, 32)).astype(np.float32)
    m.tensors = [(n, s, (lambda: tiny_w) if n == "layers.0.ffn.w_up" else p) for n, s, p in m.tensors]
    path = F.path("q8.bin")
    write_quietly(m, path, "q8_0")
    blob = open(path, "rb").read()
    _, _, dtype, _, off, nbytes = next(x for x in E.read_tensor_directory(blob) if x[1] == "layers.0.ffn.w_up")
    q = np.frombuffer(blob, np.int8, 32 * 32, off).reshape(32, 1, 32).astype(np.float32)
    scale = np.frombuffer(blob, "<f2", 32, off + 32 * 32).astype(np.float32).reshape(32, 1, 1)
    back = (q * scale).reshape(32, 32)
    err = np.abs(back - tiny_w).max()
    t.check("19: q8_0 of weights below 4e-6: every scale nonzero, each weight within 2^-25 of its value",
            dtype == E.DTYPES["q8_0"] and (scale > 0).all() and err <= 2.0 ** -25 * 1.001 and np.abs(q).max() <= 127,
            f"max error {err:.3g}, scales {scale.ravel()[:4]}")
    r = F.run([path, "--tokens", "1,2,3", "-n", "2", "--print-ids"])
    t.check("19: ... and the file runs", r.returncode == 0, error_lines(r)[-1:])


# ---------------------------------------------------------------------------------------------------------
# leak (item 20) and the command line


def shard_paths(t, F, src):
    """20: weight_map entries outside the model directory ("..", absolute, a symbolic link out) are refused,
    and no error prints the bytes of a file that is not a safetensors file."""
    secret = F.path("secret.txt")
    open(secret, "w").write("root:x:0:0:root:/root:/bin/bash\n" * 4)
    st = read_safetensors(os.path.join(src, "model.safetensors"))
    for label, name in (("'..' in the path", "../secret.txt"), ("an absolute path", secret),
                        ("a symbolic link out of the directory", "link.safetensors")):
        d = F.path(f"shards_{label.split()[1]}")
        os.makedirs(d)
        shutil.copy(os.path.join(src, "config.json"), d)
        os.symlink(secret, os.path.join(d, "link.safetensors"))
        json.dump({"weight_map": {n: name for n in st}}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
        r = F.export(d, F.path("leak.bin"))
        check_error(t, f"20: weight_map with {label}", r, "lies outside the model directory")
    d = F.path("not_safetensors")
    shutil.copytree(src, d)
    shutil.copy(secret, os.path.join(d, "model.safetensors"))
    r = F.export(d, F.path("leak.bin"))
    leaked = str(struct.unpack("<Q", b"root:x:0")[0])
    t.check("20: a text file as model.safetensors: one error line that shows none of its bytes",
            one_error(r, "not a safetensors file") and leaked not in r.stderr.decode() and "root" not in r.stderr.decode(),
            error_lines(r)[-1:])
    r = F.export(secret, F.path("leak.bin"))
    t.check("20: a text file as a llama2.c checkpoint: one error line that shows none of its bytes",
            one_error(r, "implausible llama2.c header") and "root" not in r.stderr.decode()
            and not any(str(x) in r.stderr.decode() for x in struct.unpack("<7i", open(secret, "rb").read(28))),
            error_lines(r)[-1:])


def run_outputs_first(t, F, model):
    """The late errors: bad --logits / --attn-map / --attn-dump paths and an --attn-map too large for a PNG
    are refused before the run, naming the user's path; --tokens @FILE takes ids from a file."""
    for opt in ("--logits", "--attn-map", "--attn-dump"):
        for label, path, want in (("in a missing directory", F.path("missing", "x.bin"), "No such file or directory"),
                                  ("a directory", F.dir, "Is a directory"),
                                  ("under a regular file", os.path.join(model, "x.bin"), "Not a directory")):
            r, secs = timed(F.run, [model, "-p", "hi", "-n", "2", opt, path])
            check_error(t, f"{opt} {label}", r, f"cannot write {opt} file '{path}': {want}", secs)
    ctx8k = exported(F, tiny(F, "ctx8k", max_position_embeddings=8192), "ctx8k.bin")
    r, secs = timed(F.run, [ctx8k, "--tokens", ",".join(["7"] * 6000), "-n", "0", "--attn-map", F.path("big.png")],
                    memory=2 << 30, timeout=60)
    check_error(t, "--attn-map of 6000 positions: refused before the run as too large a picture", r,
                "would make a picture of", secs)
    ids = F.path("ids.txt")
    open(ids, "w").write("15, 11\n 99 0\n")
    a = F.run([model, "--tokens", "@" + ids, "-n", "4", "-t", "0", "--print-ids"])
    b = F.run([model, "--tokens", "15,11,99,0", "-n", "4", "-t", "0", "--print-ids"])
    t.check("--tokens @FILE (ids separated by commas, spaces, newlines) == --tokens LIST",
            a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip(), f"{a.stdout!r} vs {b.stdout!r}")
    r = F.run([model, "--tokens", "@" + F.path("no-such-ids.txt")])
    check_error(t, "--tokens @FILE of a missing file", r, "cannot read --tokens file")
    a = F.run([model, "-f", "-", "-n", "4", "-t", "0", "--print-ids"], input=b"In the beginning")
    b = F.run([model, "-p", "In the beginning", "-n", "4", "-t", "0", "--print-ids"])
    t.check("-f - reads the prompt from standard input (a pipe: only a literal '-' may be one)",
            a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip(), f"{a.stdout!r} vs {b.stdout!r}")


def run(t):
    F = Files(t)
    try:
        src = tiny(F, "base")
        model = exported(F, src, "base.bin")
        outputs_are_not_inputs(t, F, model)
        model_changed_under_the_run(t, F)
        export_outputs(t, F, src)
        many_specials(t, F)
        eos_lists(t, F)
        special_files(t, F, model, src)
        aliasing_and_memory(t, F)
        sparse_tail(t, F, model)
        export_bombs(t, F, src)
        nonfinite_weights(t, F, src, model)
        rope_parameters(t, F)
        duplicates(t, F, src)
        output_errors(t, F, model)
        windows(t, F, model)
        q8_tiny_groups(t, F)
        shard_paths(t, F, src)
        run_outputs_first(t, F, model)
    finally:
        F.close()
