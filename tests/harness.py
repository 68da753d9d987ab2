"""Shared helpers for the test modules (tests/test_*.py): the Tester, synthetic checkpoints, comparisons."""
import json
import os
import pty
import shutil
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


class Tester:
    def __init__(self, verbose=False):
        self.passed = self.failed = self.skipped = 0
        self.verbose = verbose
        self.root = ROOT
        self.data = DATA
        self.python = sys.executable
        # make asan points these at sanitizer builds; by default the tests use what `make` built
        self.run_bin = os.path.abspath(os.environ.get("ATTN_RUN") or os.path.join(ROOT, "run"))
        self.unit_bin = os.path.abspath(os.environ.get("ATTN_UNIT") or os.path.join(ROOT, "tests", "unit"))
        self.build = os.path.join(ROOT, "build", "test")
        os.makedirs(self.build, exist_ok=True)
        explicit = os.environ.get("ATTN_SHARED")
        self.shared_explicit = bool(explicit)
        self.shared = os.path.abspath(explicit or os.path.join(ROOT, "..", "shared"))
        self._exported = {}

    # -- reporting
    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"ok    {name}" + (f"  ({detail})" if detail and self.verbose else ""))
        else:
            self.failed += 1
            print(f"FAIL  {name}" + (f": {detail}" if detail else ""))
        sys.stdout.flush()
        return ok

    def skip(self, name, why):
        self.skipped += 1
        print(f"skip  {name}: {why}")

    # -- files
    def shared_file(self, rel, name):
        """Path of a file under $ATTN_SHARED, or None after reporting skip (variable unset) / failure (set)."""
        path = os.path.join(self.shared, rel)
        if os.path.exists(path):
            return path
        if self.shared_explicit:
            self.check(name, False, f"{path} is missing (ATTN_SHARED={os.environ['ATTN_SHARED']})")
        else:
            self.skip(name, f"{path} not found; set ATTN_SHARED to the shared data folder to run it")
        return None

    def tmp(self, name):
        return os.path.join(self.build, name)

    # -- running things
    def run(self, args, timeout=300, input=None):
        """Runs ./run with args; returns CompletedProcess (stdout/stderr as text, bytes-safe)."""
        return subprocess.run([self.run_bin] + [a if isinstance(a, bytes) else str(a) for a in args], capture_output=True, timeout=timeout,
                              input=input)

    def export(self, src, out_name, *extra):
        """Exports src once per (src, options) with export.py; returns the output path or raises."""
        key = (src, out_name) + extra
        if key in self._exported:
            return self._exported[key]
        out = self.tmp(out_name)
        r = subprocess.run([self.python, os.path.join(ROOT, "export.py"), src, out] + list(extra),
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"export.py {src} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        self._exported[key] = out
        return out

    def logits(self, model, ids, *extra):
        """Logits at every position of ids, fed through ./run --logits."""
        path = self.tmp("logits.bin")
        r = self.run([model, "--tokens", ",".join(map(str, ids)), "-n", "0", "--logits", path] + list(extra))
        if r.returncode != 0:
            raise RuntimeError(f"./run failed: {r.stderr.decode(errors='replace').strip()}")
        return np.fromfile(path, dtype="<f4").reshape(len(ids), -1)


def with_terminal_stderr(cmd, timeout=300):
    """Runs cmd with its standard error on a terminal (a pseudo-terminal read here): (status, stdout, stderr)."""
    main, tty = pty.openpty()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=tty)
    os.close(tty)
    err = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the other end closed: the program has ended
            break
        if not chunk:
            break
        err += chunk
    out = p.communicate(timeout=timeout)[0]
    os.close(main)
    return p.returncode, out, err


def ids_of(output):
    """Token ids as ./run --encode / --print-ids print them (comma-separated; bytes or text)."""
    text = output.decode() if isinstance(output, bytes) else output
    return [int(x) for x in text.replace(",", " ").split()]


def relative_error(got, ref):
    """max |got - ref| relative to the logit scale max(1, max |ref|)."""
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def write_safetensors(path, tensors):
    """A safetensors file of float32 tensors, and uint8 ones as U8 (MXFP4 blocks), for synthetic test models."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        u8 = np.asarray(arr).dtype == np.uint8
        data = np.ascontiguousarray(arr, dtype="u1" if u8 else "<f4").tobytes()
        header[name] = {"dtype": "U8" if u8 else "F32", "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    """name -> float32 array of a (small) safetensors file written by write_safetensors."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + n])
    return {k: np.frombuffer(raw, "<f4", int(np.prod(v["shape"])), 8 + n + v["data_offsets"][0]).reshape(v["shape"])
            for k, v in header.items()}


def fixture_dir(t, fixture, name, cfg):
    """A checkpoint directory with the files of tests/data/fixtures/FIXTURE (linked) and config.json = cfg."""
    src = os.path.join(t.data, "fixtures", fixture)
    d = t.tmp(name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(src):
        link = os.path.join(d, f)
        if f != "config.json" and not os.path.lexists(link):
            os.symlink(os.path.join(src, f), link)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return d


def tiny_llama_dir(path, vocab, tokenizer_files=(), seed=0, **cfg_extra):
    """A random-weight 1-layer Llama checkpoint of the given vocabulary, with tokenizer files copied in."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    dim, hidden, heads = 16, 32, 2
    cfg = {"model_type": "llama", "hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": 1,
           "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
    cfg.update(cfg_extra)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, dim)) * 0.1, "model.norm.weight": np.ones(dim)}
    p = "model.layers.0."
    for n, shape in (("self_attn.q_proj", (dim, dim)), ("self_attn.k_proj", (dim, dim)), ("self_attn.v_proj", (dim, dim)),
                     ("self_attn.o_proj", (dim, dim)), ("mlp.gate_proj", (hidden, dim)), ("mlp.up_proj", (hidden, dim)),
                     ("mlp.down_proj", (dim, hidden))):
        t[p + n + ".weight"] = rng.standard_normal(shape) * 0.1
    t[p + "input_layernorm.weight"] = np.ones(dim)
    t[p + "post_attention_layernorm.weight"] = np.ones(dim)
    write_safetensors(os.path.join(path, "model.safetensors"), t)
    for f in tokenizer_files:
        shutil.copy(f, os.path.join(path, os.path.basename(f)))
    return path
