"""Helpers for the --explore page (tests/test_explore.py, bench/explore.py): a headless chromium that opens a
page with a selection in its URL fragment, a reader of what the page shows, a PNG reader for its screenshots,
and a 1,024-token run of kjv-5m."""
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from html.parser import HTMLParser

import numpy as np

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_browser():
    for name in (os.environ.get("ATTN_BROWSER"), "chromium", "chromium-browser", "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    return None


def browse(browser, page, fragment, *mode):
    """Opens page#fragment in a fresh headless profile; returns (exit status, stdout)."""
    with tempfile.TemporaryDirectory(prefix="attn-chromium-") as profile:
        r = subprocess.run([browser] + BROWSER_FLAGS + [f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
                           + list(mode) + ["file://" + os.path.abspath(page) + "#" + fragment],
                           capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout


class PageDom(HTMLParser):
    """What the page shows, from its data- attributes: the state, the bars of both rows, the tokens, the
    overridden layers, the cache rows and the error box."""

    def __init__(self, text):
        super().__init__()
        self.state, self.bars, self.tokens, self.overrides, self.cache = {}, {"a": {}, "b": {}}, {}, [], {}
        self.errors, self._in_errors = "", False
        self.html = text
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if a.get("id") == "state":
            self.state = a
        elif "bar" in cls and "data-state" in a:
            self.bars[a["data-row"][-1]][int(a["data-key"])] = (a["data-state"], float(a["data-w"]))
        elif "tok" in cls and "data-state" in a:
            self.tokens[int(a["data-pos"])] = (a["data-state"], float(a["data-w"]))
        elif tag == "li" and "data-layer" in a:
            self.overrides.append(int(a["data-layer"]))
        elif "cache-layer" in cls and "data-held" in a:
            held = {int(x) for x in a["data-held"].split(",") if x}
            self.cache[int(a["data-layer"])] = (held, int(a["data-bytes"]), int(a["data-mha-bytes"]))
        elif a.get("id") == "js-errors":
            self._in_errors = True

    def handle_endtag(self, tag):
        self._in_errors = False

    def handle_data(self, data):
        if self._in_errors:
            self.errors += data


def open_page(t, browser, label, page, fragment, *mode):
    rc, out = browse(browser, page, fragment, "--dump-dom", *mode)
    dom = PageDom(out)
    ok = t.check(f"{label}: the page opens in {os.path.basename(browser)} with no JavaScript error",
                 rc == 0 and dom.state.get("data-ready") == "1" and not dom.errors.strip(),
                 f"exit {rc}, ready {dom.state.get('data-ready')}, errors {dom.errors.strip()[:300]!r}")
    return dom if ok else None


def read_rgb_png(path):
    """An 8-bit RGB or RGBA PNG (as chromium writes its screenshots) as an array [h][w][channels], every filter
    type undone."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"PNG depth {depth} colour type {colour}"
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), w * bpp + 1
    assert len(raw) == h * stride, "PNG data size"
    prev, rows = bytearray(w * bpp), []
    for y in range(h):
        f, cur = raw[y * stride], bytearray(raw[y * stride + 1:(y + 1) * stride])
        if f == 1:    # Sub: a running sum per channel
            cur = bytearray((np.cumsum(np.frombuffer(bytes(cur), np.uint8).reshape(w, bpp), axis=0, dtype=np.int64) & 255)
                            .astype(np.uint8).tobytes())
        elif f == 2:  # Up
            cur = bytearray(((np.frombuffer(bytes(cur), np.uint8).astype(np.int32) + np.frombuffer(bytes(prev), np.uint8)) & 255)
                            .astype(np.uint8).tobytes())
        elif f in (3, 4):  # Average, Paeth: each byte needs the one before it
            for x in range(w * bpp):
                a = cur[x - bpp] if x >= bpp else 0
                b, c = prev[x], prev[x - bpp] if x >= bpp else 0
                if f == 3:
                    cur[x] = (cur[x] + (a + b) // 2) & 255
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[x] = (cur[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(cur))
        prev = cur
    out = np.frombuffer(b"".join(rows), np.uint8).reshape(h, w, bpp)
    return out[:, :, :3]



def kjv_1024_ids(run_bin, kjv, ref_ids):
    """kjv-5m's 300 held-out tokens and 724 sampled after them (temperature 0.8, seed 1), repeated where an EOS
    cut the sampling short: 1,024 ids to feed back with --tokens."""
    r = subprocess.run([run_bin, kjv, "--tokens", ",".join(map(str, ref_ids)), "-n", "724", "-t", "0.8", "-s", "1",
                        "--print-ids", "--threads", "1"], capture_output=True, timeout=300)
    ids = list(ref_ids) + [int(x) for x in r.stdout.replace(b",", b" ").split()]
    return (ids * 4)[:1024]
