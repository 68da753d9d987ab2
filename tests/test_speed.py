"""The fast paths must not change the numbers.

- Batched prefill: logits from any --batch equal --batch 1 (token by token) on every fixture and on kjv-5m,
  for batch sizes that do and do not divide the prompt, and larger than the sliding window (16). The matmul
  kernels sum every output in the same order whatever the chunk (matmul.c), so the logits are bit-identical;
  the check allows BATCH_TOLERANCE.
- Threads: --threads 1, 2, 3 give bit-identical logits.
- Other builds of the kernels: AVX2 (on a CPU that has it) and the portable C kernels built for this CPU
  (KERNELS=portable, fused multiply-add available) give the default build's bits; the fully portable build
  (PORTABLE=1, plain x86-64 without FMA) rounds a*b+c twice, so it is held to PORTABLE_TOLERANCE on f32/bf16
  weights, and to Q8_PORTABLE_BOUND on q8_0 / q4_0 weights (a last-bit difference in an activation can round it to
  the neighbouring int8 value). make BLAS=1 (cblas_sgemm for f32 prefill) is held to BATCH_TOLERANCE (and
  Q8_PORTABLE_BOUND for q8_0 models, whose f32 matrices BLAS computes).
- q8_0 and q4_0 (export.py --dtype): perplexity over the 300 held-out KJV tokens and logits near the f32
  export's, fixtures' logits near the reference (QUANTIZED); --batch bit-identical to --batch 1; matrices whose
  columns do not fill their groups fall back (q4_0 -> q8_0 -> f32); the loader rejects a tensor with such
  columns, or without its scales. Where the CPU has AMX, prefill on the tiles (the default) and on the AVX-512
  kernels (ATTN_NO_AMX=1) give the same bits; where it has AVX-512 and no AMX, matrices packed at load (the
  default) and the file's layout (ATTN_NO_PACK=1) give the same logits and --samples ids. --bf16-prefill (AMX-BF16, activations rounded to bf16) is held
  to BF16_PREFILL_F32 / BF16_PREFILL_BF16 of token by token, and does not touch chunks under 16 tokens.
Errors are max |delta| relative to max(1, max |ref|) (harness.relative_error)."""
import json
import os
import platform
import struct
import subprocess

import numpy as np

from harness import relative_error
from study_support import export, reference_ppl
from test_fixtures import FIXTURES
from test_latent_attention import OUR_FIXTURES as LATENT_FIXTURES

BATCHES = [2, 3, 7, 16, 17, 33, 64, 80, 128]   # 80 is the fixtures' whole prompt; 3, 7, 17, 33 do not divide it
BATCH_TOLERANCE = 1e-5
PORTABLE_TOLERANCE = 1e-5
Q8_PORTABLE_BOUND = 3e-2
# dtype: (bound on |ppl / ppl(f32) - 1| on kjv-5m, on its logits' error against f32, on the fixtures' against the
# reference). Measured, q8_0: -0.04%, 2.0e-2, 2.1e-2 .. 4.2e-2; q4_0: +0.11%, 1.2e-1, 0.23 .. 0.45 (the fixtures'
# random weights use the 16 levels less well than trained ones)
QUANTIZED = {"q8_0": (0.01, 5e-2, 5e-2), "q4_0": (0.02, 0.2, 0.6)}
# --bf16-prefill against --batch 1; measured: 5.6e-3 .. 1.2e-2 (fixtures, f32 weights), 2.0e-3 (kjv-5m, bf16)
BF16_PREFILL_F32 = 2e-2
BF16_PREFILL_BF16 = 5e-3


def build(t, name, *make_args):
    """./run built another way (make build/NAME/run ARGS), or None after reporting why not."""
    exe = os.path.join(t.root, "build", name, "run")
    r = subprocess.run(["make", "-s", f"build/{name}/run"] + list(make_args), cwd=t.root, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        t.check(f"make build/{name}/run {' '.join(make_args)} builds", False, (r.stderr or r.stdout).strip()[-300:])
        return None
    return exe


def logits_with(t, exe, model, ids, *extra, env=None):
    """t.logits() through another build of ./run (with these environment variables set)."""
    saved, t.run_bin = t.run_bin, exe
    saved_env = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return t.logits(model, ids, *extra)
    finally:
        t.run_bin = saved
        for k, v in saved_env.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def openblas_missing(t):
    """Why make BLAS=1 cannot build here, or None: cblas.h alone is not enough (Debian's libblas-dev has the
    header without OpenBLAS), so a program calling cblas_sgemm is compiled and linked as the Makefile would."""
    probe = t.tmp("blas_probe.c")
    with open(probe, "w") as f:
        f.write("#include <cblas.h>\nint main(void) { float a = 1, b = 1, c = 0;\n"
                "cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 1, 1, 1, 1.0f, &a, 1, &b, 1, 0.0f, &c, 1);\n"
                "return c != 1.0f; }\n")
    r = subprocess.run(["sh", "-c", f"cc $(pkg-config --cflags openblas 2>/dev/null) {probe} -o {t.tmp('blas_probe')} "
                        "$(pkg-config --libs openblas 2>/dev/null || echo -lopenblas)"], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
    first = next((line for line in lines if "cblas.h" in line or "cannot find" in line or "undefined reference" in line),
                 lines[0] if lines else f"exit status {r.returncode}")
    if "cblas.h" in first:
        return "no cblas.h (Debian: apt-get install libopenblas-dev)"
    return f"cblas.h is here but OpenBLAS cannot be linked ({first.strip()}; Debian: apt-get install libopenblas-dev)"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def compiler_defines(*flags):
    r = subprocess.run(["cc"] + list(flags) + ["-dM", "-E", "-"], input="", capture_output=True, text=True)
    return r.stdout


def tensor_records(path):
    """name -> (record offset, dtype, shape, nbytes) from a model file's tensor directory."""
    with open(path, "rb") as f:
        return {name: (rec, dtype, shape, nbytes)
                for rec, name, dtype, shape, _, nbytes in export.read_tensor_directory(f.read())}


def patched(t, src, name, edits):
    """A copy of model file src with (offset, struct format, value) edits applied."""
    data = bytearray(open(src, "rb").read())
    for offset, fmt, value in edits:
        struct.pack_into(fmt, data, offset, value)
    path = t.tmp(name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def check_batches(t, label, model, ids, batches, batch1):
    """--batch b against --batch 1 for each b; keeps the --batch 1 logits in batch1[model]."""
    ref = batch1[model] = t.logits(model, ids, "--batch", "1")
    errs = {b: relative_error(t.logits(model, ids, "--batch", b), ref) for b in batches}
    worst = max(errs.values())
    t.check(f"{label}: --batch {','.join(map(str, batches))} equal --batch 1 "
            f"({'bit-identical' if worst == 0 else f'max rel err {worst:.1e}'})", worst <= BATCH_TOLERANCE,
            f"errors {errs}")


def check_quantized(t, dtype, ppl_bound, logit_bound, fixture_bound, kjv_src, kjv_f32, kjv_ids, fixture_models, batch1):
    """kjv-5m's perplexity and logits in dtype against f32, --batch against --batch 1, and every fixture's logits
    against the reference; returns {label: (model path, ids)}."""
    out = {}
    if kjv_src:
        model = t.export(os.path.dirname(kjv_src), f"kjv-5m-{dtype}.bin", "--bf16-rope", "--dtype", dtype)
        f32, q = t.logits(kjv_f32, kjv_ids), t.logits(model, kjv_ids)
        p32, pq = reference_ppl(f32, kjv_ids), reference_ppl(q, kjv_ids)
        t.check(f"{dtype}: kjv-5m perplexity {pq:.4f} vs f32 {p32:.4f} ({100 * (pq / p32 - 1):+.2f}%, bound "
                f"{100 * ppl_bound:.0f}%)", abs(pq / p32 - 1) <= ppl_bound)
        err = relative_error(q, f32)
        t.check(f"{dtype}: kjv-5m logits within {logit_bound} of f32 (max rel err {err:.1e})", err <= logit_bound)
        check_batches(t, f"kjv-5m {dtype}", model, kjv_ids, [7, 64, 300], batch1)
        out["kjv-5m"] = (model, kjv_ids)
    worst = 0.0
    for name in FIXTURES:
        src = os.path.join(t.data, "fixtures", name)
        out[name] = (t.export(src, f"{name}-{dtype}.bin", "--dtype", dtype), fixture_models[name][1])
        worst = max(worst, relative_error(t.logits(out[name][0], out[name][1]), np.load(os.path.join(src, "ref_logits.npy"))))
    t.check(f"{dtype}: every fixture's logits within {fixture_bound} of the reference (worst {worst:.1e})",
            worst <= fixture_bound)
    return out


def run(t):
    fixture_models, batch1 = {}, {}  # batch1: model path -> its --batch 1 logits
    for name in FIXTURES:
        src = os.path.join(t.data, "fixtures", name)
        ref = json.load(open(os.path.join(src, "ref.json")))
        fixture_models[name] = (t.export(src, f"{name}.bin"), ref["input_ids"])
        check_batches(t, name, *fixture_models[name], BATCHES, batch1)
    for name, options in LATENT_FIXTURES.items():  # latent attention: mla.c's own products, the same contract
        src = os.path.join(t.data, "fixtures", name)
        fixture_models[name] = (t.export(src, f"{name}.bin", *options), json.load(open(os.path.join(src, "ref.json")))["input_ids"])
        check_batches(t, name, *fixture_models[name], BATCHES, batch1)

    kjv = os.path.join(t.root, "models", "kjv-5m.bin")
    kjv_ids = json.load(open(os.path.join(t.data, "kjv-5m", "ref.json")))["input_ids"]
    check_batches(t, "kjv-5m", kjv, kjv_ids, [5, 64, 300], batch1)
    # token by token, so that the threads share thousands of small jobs (matmuls, attention) back to back
    ref = t.logits(kjv, kjv_ids, "--batch", "1", "--threads", "1")
    same = all(np.array_equal(t.logits(kjv, kjv_ids, "--batch", "1", "--threads", n), ref) for n in (2, 3, 2))
    t.check("kjv-5m: --threads 1, 2, 3 give bit-identical logits (--batch 1; at most one thread per core)", same)

    # q8_0 and q4_0 against f32 on the KJV held-out tokens (perplexity, logits), and on the fixtures
    src = t.shared_file("models/kjv-5m/model.safetensors", "q8_0, q4_0: kjv-5m perplexity near f32's")
    kjv_f32 = t.export(os.path.dirname(src), "kjv-5m-f32.bin", "--bf16-rope", "--dtype", "f32") if src else None
    quantized = {}  # dtype -> {model label: (path, ids)}
    for dtype, (ppl_bound, logit_bound, fixture_bound) in QUANTIZED.items():
        quantized[dtype] = check_quantized(t, dtype, ppl_bound, logit_bound, fixture_bound, src, kjv_f32, kjv_ids,
                                           fixture_models, batch1)
    records = tensor_records(quantized["q8_0"]["llama_gqa"][0])
    t.check("q8_0: matrices with 64 columns are q8_0, w_down's 176 columns stay f32, vectors f32",
            records["layers.0.attn.wq"][1] == 3 and records["layers.0.ffn.w_down"][1] == 0 and records["layers.0.mixer_norm"][1] == 0
            and records["layers.0.attn.wq"][3] == 64 * 64 + 64 * 2 * 2)
    q4_records = tensor_records(quantized["q4_0"]["qwen3_mixed"][0])
    t.check("q4_0: matrices with 64 columns are q4_0 (half a byte a weight, then the scales), 32 more columns "
            "make q8_0, vectors f32",
            q4_records["layers.0.attn.wq"][1] == 4 and q4_records["layers.0.attn.wq"][3] == 128 * 64 // 2 + 128 * 2 * 2
            and all(rec[1] in (0, 3, 4) for rec in q4_records.values()))

    # the loader checks q8_0 and q4_0 shapes and sizes
    for dtype, code, cols, multiple in (("q8_0", 3, 176, 32), ("q4_0", 4, 176, 64)):
        rec, _, _, nbytes = records["layers.0.ffn.w_down"]
        bad = patched(t, quantized["q8_0"]["llama_gqa"][0], f"{dtype}_cols.bin", [(rec + 80, "<I", code)])
        r = t.run([bad, "--tokens", "1,2", "-n", "0"])
        err = r.stderr.decode(errors="replace")
        t.check(f"{dtype}: the loader rejects a {dtype} tensor whose {cols} columns are not a multiple of {multiple}",
                r.returncode == 1 and err.startswith("error: ") and f"multiple of {multiple}" in err and err.count("\n") == 1, err)
    rec, _, _, nbytes = records["layers.0.attn.wq"]
    bad = patched(t, quantized["q8_0"]["llama_gqa"][0], "q8_size.bin", [(rec + 112, "<Q", 64 * 64)])
    r = t.run([bad, "--tokens", "1,2", "-n", "0"])
    err = r.stderr.decode(errors="replace")
    t.check("q8_0: the loader rejects a q8_0 tensor without its scales (nbytes rows*cols)",
            r.returncode == 1 and "bytes, its shape and dtype need" in err, err)
    rec, _, _, nbytes = q4_records["layers.0.attn.wq"]
    bad = patched(t, quantized["q4_0"]["qwen3_mixed"][0], "q4_size.bin", [(rec + 112, "<Q", 128 * 64 // 2)])
    r = t.run([bad, "--tokens", "1,2", "-n", "0"])
    err = r.stderr.decode(errors="replace")
    t.check("q4_0: the loader rejects a q4_0 tensor without its scales (nbytes rows*cols/2)",
            r.returncode == 1 and "bytes, its shape and dtype need" in err, err)

    # prefill on the AMX tiles (where the CPU has them) against the AVX-512 kernels
    amx = "amx_int8" in cpu_flags() and t.run_bin == os.path.join(t.root, "run")
    if amx:
        worst = 0.0
        for dtype, models_of in quantized.items():
            for label, (model, ids) in models_of.items():
                if label in ("kjv-5m", "llama_gqa", "gemma3"):
                    worst = max(worst, relative_error(logits_with(t, t.run_bin, model, ids, env={"ATTN_NO_AMX": "1"}),
                                                      t.logits(model, ids)))
        t.check(f"q8_0, q4_0: prefill on AMX tiles gives the AVX-512 kernels' logits "
                f"({'bit-identical' if worst == 0 else f'max rel err {worst:.1e}'})", worst == 0.0)
    else:
        t.skip("AMX prefill against AVX-512", "no amx_int8 in /proc/cpuinfo (or not the default build)")

    # q8_0 / q4_0 matrices packed at load (AVX-512 without AMX; kjv-5m's rows of 256 and 768 columns qualify, the
    # tiny fixtures' do not) against the layout of the file, prompt and --samples steps
    packs = "avx512f" in cpu_flags() and "amx_int8" not in cpu_flags()
    if "kjv-5m" in quantized["q8_0"]:
        worst, same_samples = 0.0, True
        for dtype, models_of in quantized.items():
            model, ids = models_of["kjv-5m"]
            worst = max(worst, relative_error(logits_with(t, t.run_bin, model, ids, env={"ATTN_NO_PACK": "1"}),
                                              t.logits(model, ids)))
            args = [model, "--tokens", ",".join(map(str, ids)), "-n", "12", "-s", "3", "--samples", "3", "--print-ids"]
            packed = t.run(args).stdout
            saved = os.environ.get("ATTN_NO_PACK")
            os.environ["ATTN_NO_PACK"] = "1"
            try:
                same_samples &= packed == t.run(args).stdout and packed.count(b"\n") == 3
            finally:
                if saved is None:
                    del os.environ["ATTN_NO_PACK"]
                else:
                    os.environ["ATTN_NO_PACK"] = saved
        t.check(f"q8_0, q4_0 kjv-5m: weights packed at load ({'this CPU packs' if packs else 'this CPU keeps the file layout'}) "
                f"give the file layout's logits ({'bit-identical' if worst == 0 else f'max rel err {worst:.1e}'}) and "
                f"--samples 3 ids (ATTN_NO_PACK=1)", worst == 0.0 and same_samples)
    else:
        t.skip("weights packed at load against the file layout", "no kjv-5m")

    # --bf16-prefill: f32 / bf16 prompts on AMX-BF16 tiles, activations rounded to bf16 (not decode's bits)
    if "amx_bf16" in cpu_flags():
        # the dense fixtures: in a mixture of experts (the latent ones), bf16 activations can flip a router's near
        # tie and choose other experts (measured 3e-2 .. 2e-1 there)
        worst = max(relative_error(t.logits(m, ids, "--bf16-prefill"), batch1[m])
                    for name, (m, ids) in fixture_models.items() if name in FIXTURES)
        kjv_err = relative_error(t.logits(kjv, kjv_ids, "--bf16-prefill"), batch1[kjv])
        t.check(f"--bf16-prefill: fixtures (f32 weights, rounded to bf16) within {BF16_PREFILL_F32} of token by token "
                f"(max rel err {worst:.1e}), kjv-5m (bf16 weights) within {BF16_PREFILL_BF16} ({kjv_err:.1e})",
                worst <= BF16_PREFILL_F32 and kjv_err <= BF16_PREFILL_BF16)
    else:
        t.skip("--bf16-prefill", "no amx_bf16 in /proc/cpuinfo: the flag changes nothing here")
    same = np.array_equal(t.logits(kjv, kjv_ids, "--batch", "7", "--bf16-prefill"), batch1[kjv])
    t.check("--bf16-prefill: chunks of fewer than 16 tokens stay on the exact kernels (--batch 7: bit-identical)", same)

    # other builds of the kernels
    models = [(n, m, ids) for n, (m, ids) in fixture_models.items()] + [("kjv-5m", kjv, kjv_ids)]
    q8_models = [(f"{n} {dtype}", model, ids) for dtype, models_of in quantized.items() for n, (model, ids) in models_of.items()
                 if n in ("llama_gqa", "gemma3", "kjv-5m")]

    default = {m: batch1[m] if m in batch1 else t.logits(m, ids, "--batch", "1") for _, m, ids in models + q8_models}

    def compare(label, exe, tolerance, q8_tolerance, extra=()):
        worst = max(relative_error(logits_with(t, exe, m, ids, *extra), default[m]) for _, m, ids in models)
        worst8 = max(relative_error(logits_with(t, exe, m, ids, *extra), default[m]) for _, m, ids in q8_models)
        t.check(f"{label}: logits of the fixtures and kjv-5m within {tolerance:g} of the default build "
                f"({'bit-identical' if worst == 0 else f'max rel err {worst:.1e}'}), q8_0 / q4_0 models within {q8_tolerance:g} "
                f"({'bit-identical' if worst8 == 0 else f'{worst8:.1e}'})", worst <= tolerance and worst8 <= q8_tolerance)

    def compare_kv_types(label, exe):
        """--kv-type bf16 / q8_0: AVX-512 converts the rows in registers, the others convert them first: same bits"""
        worst = max(relative_error(logits_with(t, exe, m, ids, "--kv-type", kv), t.logits(m, ids, "--kv-type", kv))
                    for name, m, ids in models if name in ("llama_gqa", "gemma3", "kjv-5m") for kv in ("bf16", "q8_0"))
        t.check(f"{label}: --kv-type bf16 and q8_0 give the default build's logits "
                f"({'bit-identical' if worst == 0 else f'max rel err {worst:.1e}'})", worst == 0.0)

    exe = build(t, "portable", "PORTABLE=1")
    if exe:
        compare("make PORTABLE=1", exe, PORTABLE_TOLERANCE, Q8_PORTABLE_BOUND)
    native = compiler_defines("-march=native")
    if t.run_bin != os.path.join(t.root, "run"):  # make asan: the binary under test is not the default build
        t.skip("portable kernels with FMA, AVX2 kernels", f"bit-identity is with the default build, not {t.run_bin}")
    elif "__FMA__" in native or "__aarch64__" in native:
        exe = build(t, "portable-kernels", "KERNELS=portable")
        if exe:
            compare("make KERNELS=portable (C kernels, fused multiply-add)", exe, 0.0, 0.0)
            compare_kv_types("make KERNELS=portable", exe)
    else:
        t.skip("portable kernels with FMA", "the compiler's native target has no fused multiply-add")
    if t.run_bin != os.path.join(t.root, "run"):
        pass
    elif platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= cpu_flags() and "__AVX512F__" in native:
        exe = build(t, "avx2", "ARCH=-march=haswell")
        if exe:
            compare("AVX2 kernels (ARCH=-march=haswell)", exe, 0.0, 0.0)
            compare_kv_types("AVX2 kernels", exe)
    else:
        t.skip("AVX2 kernels", "needs an x86-64 CPU with AVX-512 (the default build) and AVX2")
    why_not = openblas_missing(t)
    if why_not:
        t.skip("make BLAS=1", why_not)
    else:
        exe = build(t, "blas", "BLAS=1")
        if exe:
            compare("make BLAS=1 (cblas_sgemm for f32 prefill, --batch 64)", exe, BATCH_TOLERANCE, Q8_PORTABLE_BOUND,
                    ("--batch", "64"))
