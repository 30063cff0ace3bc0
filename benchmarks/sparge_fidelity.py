"""Agreement of our block maps with the original SpargeAttn's rules, per setting.

Runs the oracle in ``tests/sparge_oracle.py`` (written from thu-ml/SpargeAttn's
published prediction code) beside ``predict_block_map`` and prints a Markdown table:
the share of causally valid blocks on which two maps agree.

* ``sparge/fp32``: our ``selection="sparge"`` against the oracle with the shared
  defect fixes, in fp32 (the rules alone).
* ``sparge/fp16``: the same against the oracle in the original's fp16 arithmetic.
* ``only fp16``: blocks on which we differ from the fp16 oracle although its fp32
  run agrees with us (differences *not* explained by precision; must be 0).
* ``mass/fp16``: our default rules (``selection="mass"``) against the fp16 oracle.
* ``sparge/published``: ours against the original exactly as published (no fixes).

Usage: ``python benchmarks/sparge_fidelity.py`` (about 30 s on 2 cores).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sparge_oracle import make_inputs, original_block_map  # noqa: E402

from creative_sparse.attention import predict_block_map  # noqa: E402
from creative_sparse.attention.blockmap import block_valid_map  # noqa: E402

SHAPES = [(1024, 1024, 2, 2), (1000, 1000, 4, 2), (300, 300, 2, 1), (256, 1000, 2, 2)]
PARAMS = [dict(cdfthreshd=0.5, simthreshd1=-1.0), dict(cdfthreshd=0.9, simthreshd1=0.3),
          dict(cdfthreshd=0.98, simthreshd1=0.6), dict(topk=0.3, simthreshd1=-0.1),
          dict(topk=0.6, simthreshd1=0.5)]


def main() -> None:
    start = time.perf_counter()
    print("| inputs | Lq x Lk, H/H_kv | causal | thresholds | sparsity | sparge/fp32 | "
          "sparge/fp16 | only fp16 | mass/fp16 | sparge/published |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals = {"fp32": [0, 0], "fp16": [0, 0], "mass": [0, 0], "raw": [0, 0], "unexplained": 0}
    for kind in ("random", "correlated"):
        for lq, lk, h, h_kv in SHAPES:
            q, k = make_inputs(kind, lq, lk, h, h_kv, seed=lq + lk + h + h_kv)
            for causal in (False, True):
                valid = block_valid_map(lq, lk, 128, 64, causal)
                for params in PARAMS:
                    ours = predict_block_map(q, k, causal=causal, selection="sparge",
                                             **params).keep
                    mass = predict_block_map(q, k, causal=causal, **params).keep
                    o32 = original_block_map(q, k, causal=causal, **params)
                    o16 = original_block_map(q, k, causal=causal, half=True, **params)
                    raw = original_block_map(q, k, causal=causal, half=True, fixes=False,
                                             **params)
                    v = valid.expand_as(ours)
                    n = int(v.sum())
                    row = {}
                    for name, other, mine in (("fp32", o32, ours), ("fp16", o16, ours),
                                              ("mass", o16, mass), ("raw", raw, ours)):
                        same = int(((mine == other) & v).sum())
                        totals[name][0] += same
                        totals[name][1] += n
                        row[name] = same / n
                    unexplained = int(((ours != o16) & (o32 == o16) & v).sum())
                    totals["unexplained"] += unexplained
                    thr = ", ".join(f"{k_}={v_}" for k_, v_ in params.items())
                    sparsity = 1 - float(ours[v].float().mean())
                    print(f"| {kind} | {lq}x{lk}, {h}/{h_kv} | {causal} | {thr} | "
                          f"{sparsity:.2f} | {row['fp32']:.2%} | {row['fp16']:.2%} | "
                          f"{unexplained} | {row['mass']:.2%} | {row['raw']:.2%} |")
    print()
    for name, label in (("fp32", "sparge vs fp32 oracle"), ("fp16", "sparge vs fp16 oracle"),
                        ("mass", "mass vs fp16 oracle"), ("raw", "sparge vs published original")):
        same, n = totals[name]
        print(f"{label}: {same}/{n} blocks = {same / n:.3%}")
    print(f"blocks differing from the fp16 oracle where its fp32 run agrees with us: "
          f"{totals['unexplained']}")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
