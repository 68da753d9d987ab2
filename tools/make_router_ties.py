#!/usr/bin/env python3
"""Writes tests/data/router_ties.txt: score rows full of ties (and a few NaNs) with the experts torch.topk
chooses for them on a CPU, so tests/unit.c can check that moe.c routes ties exactly as transformers does.

    /usr/bin/python3 tools/make_router_ties.py      (needs Debian's python3-torch; not run by the tests)

Each case is one line: `n k v_0 .. v_{n-1} | i_0 .. i_{k-1}` (the chosen ids in torch's order)."""
import os
import random

import torch

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "router_ties.txt")


def main():
    rng = random.Random(1)
    lines = [f"# torch {torch.__version__}, torch.topk(largest=True) on a CPU; written by tools/make_router_ties.py"]
    for _ in range(400):
        n = rng.choice([2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 384, 512])
        k = rng.randint(1, min(n, 16))
        levels = rng.choice([1, 2, 3, 8])
        values = [float(rng.randint(0, levels - 1)) / 2 for _ in range(n)]
        if rng.random() < 0.1:
            values[rng.randrange(n)] = float("nan")
        ids = torch.topk(torch.tensor([values]), k, dim=-1).indices[0].tolist()
        lines.append(f"{n} {k} " + " ".join("nan" if v != v else repr(v) for v in values) + " | " + " ".join(map(str, ids)))
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
