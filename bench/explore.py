#!/usr/bin/env python3
"""bench/explore.py - `make bench`, second part: the --explore page of a 1,024-token run of kjv-5m (the 300
held-out tokens of tests/data/kjv-5m/ref.json and 724 sampled after them): its size, the threshold below which
weights were left out, how long ./run takes to write it (against the same run with no page), and how long the
page takes to open in headless chromium (navigation start to ready, the page's own data-open-ms; the median of
several opens). Timings on a shared machine are noisy. Never a pass/fail test.

    python3 bench/explore.py [--runs N]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from explore_support import PageDom, browse, find_browser, kjv_1024_ids  # noqa: E402


def seconds(args):
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    run, kjv = os.path.join(ROOT, "run"), os.path.join(ROOT, "models", "kjv-5m.bin")
    page = os.path.join(ROOT, "build", "bench", "explore-1k.html")
    os.makedirs(os.path.dirname(page), exist_ok=True)
    ids = kjv_1024_ids(run, kjv, json.load(open(os.path.join(ROOT, "tests", "data", "kjv-5m", "ref.json")))["input_ids"])
    base = [run, kjv, "--tokens", ",".join(map(str, ids)), "-n", "0", "--threads", "1"]
    plain = statistics.median(seconds(base) for _ in range(args.runs))
    written = statistics.median(seconds(base + ["--explore", page]) for _ in range(args.runs))
    threshold = re.search(r'"threshold":([0-9.e+-]+)', open(page).read()).group(1)
    print(f"explore: {len(ids)} tokens of kjv-5m: page {os.path.getsize(page) / 1e6:.1f} MB, weights below {threshold} "
          f"left out; ./run {written:.2f} s with the page, {plain:.2f} s without (one thread)")
    browser = find_browser()
    if not browser:
        print("explore: no chromium: page opening not measured")
        return
    opens = []
    for _ in range(args.runs):
        rc, out = browse(browser, page, "layer=5&head=0&token=1000", "--dump-dom")
        state = PageDom(out).state
        if rc == 0 and state.get("data-ready") == "1":
            opens.append(int(state["data-open-ms"]))
    print(f"explore: the page is ready {statistics.median(opens) if opens else float('nan'):.0f} ms after navigation starts "
          f"in headless {os.path.basename(browser)} (median of {len(opens)}; build of the views alone: "
          f"{state.get('data-build-ms')} ms in the last)")


if __name__ == "__main__":
    main()
