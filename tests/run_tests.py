#!/usr/bin/env python3
"""The test runner behind `make test`: runs every tests/test_*.py module and ends with `N passed, N failed`.

Each module defines run(t) and reports through the Tester t (t.check / t.skip). Data that is ours lives in
tests/data; files from other projects are read from $ATTN_SHARED (default ../shared): when the variable is
set explicitly a missing file fails the test, otherwise the test says it was skipped.

    python3 tests/run_tests.py [-k SUBSTRING] [-v]
"""
import argparse
import importlib.util
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Tester  # noqa: E402


def load_module(path):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", help="run only test modules whose name contains this")
    ap.add_argument("-v", action="store_true", help="print details of passing checks too")
    args = ap.parse_args()
    t = Tester(args.v)
    if not os.path.exists(t.run_bin):
        print("error: ./run is not built (run `make`)")
        return 1
    here = os.path.dirname(os.path.abspath(__file__))
    modules = sorted(f for f in os.listdir(here) if f.startswith("test_") and f.endswith(".py"))
    start = time.time()
    for f in modules:
        if args.k and args.k not in f:
            continue
        print(f"# {f}")
        t0 = time.time()
        try:
            load_module(os.path.join(here, f)).run(t)
        except Exception:
            t.check(f"{f} ran to the end", False, traceback.format_exc().strip().splitlines()[-1])
            if args.v:
                traceback.print_exc()
        print(f"# {f}: {time.time() - t0:.1f}s")
    print(f"# {t.skipped} skipped, {time.time() - start:.0f}s in all")
    print(f"{t.passed} passed, {t.failed} failed")
    return 1 if t.failed else 0


if __name__ == "__main__":
    sys.exit(main())
