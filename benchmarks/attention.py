"""Sparse attention against dense SDPA, in the same run.

For each sequence length, causal flag and forced keep fraction (top-k
selection), this script:

1. predicts the block map (timed: the prediction overhead),
2. checks the sparse output against the fp32 reference on a sample of query
   rows (relative L1 error and cosine similarity) before timing anything,
3. times the sparse attention (kernel only) and
   ``torch.nn.functional.scaled_dot_product_attention`` with the same causal
   flag, after a warm-up run that excludes compilation,
4. prints speedup, the fraction of the ideal speedup ``1 / (1 - sparsity)``
   and the prediction time as a percentage of the dense time.

Usage::

    python benchmarks/attention.py                       # the issue's table (B=1, H=9, D=64)
    python benchmarks/attention.py --lengths 8192 --backends cpu_kernel torch flex
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from creative_sparse.attention import predict_block_map
from creative_sparse.attention.dispatch import run_backend
from creative_sparse.attention.reference import masked_attention


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sampled_reference(q, k, v, block_map, rows):
    """fp32 reference for the query rows ``rows`` only (the full token mask would not fit)."""
    keep = block_map.keep[:, :, rows // block_map.block_q]            # [B, H, r, nk]
    mask = keep.repeat_interleave(block_map.block_k, dim=-1)[..., : block_map.k_len]
    if block_map.causal:
        key_pos = torch.arange(block_map.k_len)
        mask = mask & (key_pos.view(1, 1, 1, -1)
                       <= (rows + block_map.k_len - block_map.q_len).view(1, 1, -1, 1))
    return masked_attention(q[:, :, rows], k, v, mask)


def accuracy(out, ref):
    out, ref = out.double().flatten(), ref.double().flatten()
    rel_l1 = ((out - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30)).item()
    cos = F.cosine_similarity(out, ref, dim=0).item()
    return rel_l1, cos


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25, 0.1],
                        help="forced keep fractions (top-k)")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--backends", nargs="+", default=["cpu_kernel"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    causal_flags = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, B=1, "
          f"H={args.heads}, D={args.head_dim}, blocks 128x64, top-k selection")
    print("| N | causal | backend | keep | sparsity | dense ms | sparse ms | speedup "
          "| of ideal | predict % of dense | rel L1 | cos |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for n in args.lengths:
        q = torch.randn(1, args.heads, n, args.head_dim)
        k = torch.randn(1, args.heads, n, args.head_dim)
        v = torch.randn(1, args.heads, n, args.head_dim)
        rows = torch.cat([torch.arange(0, 128), torch.arange(n - 256, n)]).unique()
        for causal in causal_flags:
            t_dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                            args.repeats)
            for keep in args.keep:
                predict = lambda: predict_block_map(q, k, topk=keep, simthreshd1=-0.1,
                                                    causal=causal)
                t_pred = timed(predict, args.repeats)
                block_map = predict()
                sparsity = block_map.sparsity()
                ref = sampled_reference(q, k, v, block_map, rows)
                for backend in args.backends:
                    out = run_backend(q, k, v, block_map, backend=backend)
                    rel_l1, cos = accuracy(out[:, :, rows], ref)
                    if not (rel_l1 < 1e-4 and cos > 0.9999):
                        failed = True
                        print(f"ACCURACY FAILURE {backend}: rel L1 {rel_l1:.2e}, cos {cos:.6f}",
                              file=sys.stderr)
                    t_sparse = timed(lambda: run_backend(q, k, v, block_map, backend=backend),
                                     args.repeats)
                    speedup = t_dense / t_sparse
                    print(f"| {n} | {causal} | {backend} | {keep} | {sparsity:.3f} "
                          f"| {t_dense * 1e3:.0f} | {t_sparse * 1e3:.0f} | {speedup:.2f} "
                          f"| {speedup * (1 - sparsity):.2f} | {100 * t_pred / t_dense:.1f} "
                          f"| {rel_l1:.1e} | {cos:.6f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
