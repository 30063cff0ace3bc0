"""GPU: the Triton kernel against dense SDPA (FlashAttention) and FlexAttention, same run.

For each sequence length N, head dim D, causal flag and target sparsity, the
script builds one block map (top-k selection with the requested keep fraction),
checks the Triton output against FlexAttention on the same map (exact bf16
computation) before timing, then times:

* ``sdpa``: ``F.scaled_dot_product_attention`` (dense; FlashAttention on NVIDIA),
* ``flex``: compiled FlexAttention with the same block mask (our ``BlockMask``),
* ``ours``: our Triton kernel including its per-call INT8 quantization and block
  lists, with the PV threshold at the seed default (``pvthreshd=15``); ``nopv``
  the same without the PV threshold; ``prep`` the per-call work before the kernel;
  ``e2e`` the whole ``sparse_attention`` call a user makes (prediction of the same
  top-k map with the default predictor, ``"auto"``, which picks the fused one on its
  first call if it agrees and is faster, or PyTorch's with ``--no-fused-predict``;
  then the kernel);
  ``fp8`` the kernel with P·V in FP8 e4m3 (GPUs of compute capability >= 8.9), with
  its own relative L1 against the same check.

TFLOP/s count the effective work, ``4 * D * (query, key) pairs computed`` (the
kept blocks, causal-aware; dense causal counts the lower triangle), so a
sparse kernel is not credited for work it skips. Speedup is against SDPA.
Prediction time is reported as a share of SDPA's time: ``pred %`` for the
PyTorch ``predict_block_map`` making the row's top-k map; ``tcdf %`` and
``fcdf %`` for the PyTorch and the fused Triton prediction with the seed's CDF
selection (``cdfthreshd=0.97``; ``simthreshd1=-1``, because these random inputs'
blocks are all dissimilar and the seed's 0.6 would keep every block), and
``fdiff``, the fraction of blocks on which those two maps differ.

Usage::

    python benchmarks/gpu_attention.py                     # N 8k/16k/32k, D 64/128
    python benchmarks/gpu_attention.py --lengths 8192 --dims 64 --sparsities 0 0.75
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F


def bench(fn, device="cuda") -> float:
    """Median milliseconds of ``fn()``: CUDA events via triton.testing.do_bench; on CPU
    (``--dry-run``) the median of three wall-clock runs."""
    if device == "cpu":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return sorted(times)[1]
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def rel_l1(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-30))


def make_inputs(n, d, heads, dtype, seed=0, device="cuda"):
    """Random Q/K/V with a shared key offset and clustered queries (see the tests)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, heads, n, d, device=device, generator=g)
    k = torch.randn(1, heads, n, d, device=device, generator=g)
    v = torch.randn(1, heads, n, d, device=device, generator=g)
    k = k + 2.0 * torch.randn(1, heads, 1, d, device=device, generator=g)
    centers = torch.randn(8, d, device=device, generator=g)
    q = 0.5 * q + centers[torch.randint(0, 8, (n,), device=device, generator=g)]
    return q.to(dtype), k.to(dtype), v.to(dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    parser.add_argument("--heads", type=int, default=0,
                        help="query heads (default: 2048 / D, i.e. 32 at D=64, 16 at D=128)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--no-fp8", action="store_true",
                        help="skip the FP8 P·V variant (run only where compute capability >= 8.9)")
    parser.add_argument("--no-fused-predict", action="store_true",
                        help="skip the fused Triton prediction")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--dry-run", action="store_true",
                        help="check that the script runs, on CPU under TRITON_INTERPRET=1 "
                             "(use tiny --lengths; the times mean nothing)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        from creative_sparse.attention.backends.triton import interpreter_enabled
        if not interpreter_enabled():
            print("--dry-run needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 1
        args.no_flex = args.no_fp8 = True
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (--dry-run checks the script on CPU)",
              file=sys.stderr)
        return 1
    timed = lambda fn: bench(fn, device)  # noqa: E731

    from torch import _dynamo
    _dynamo.config.cache_size_limit = 64   # one compile per (N, D, causal) for flex
    from creative_sparse.attention import predict_block_map, quant, sparse_attention
    from creative_sparse.attention.backends import triton as triton_backend
    from creative_sparse.attention.dispatch import _fit_block_map, run_backend

    args.no_fp8 = args.no_fp8 or torch.cuda.get_device_capability() < (8, 9)
    dtype = torch.float32 if args.dry_run else torch.bfloat16   # the interpreter lacks bf16

    def prepare(q, k, v, bm):
        """The per-call work before the attention kernel: quantization and block lists."""
        quant.prepare(q, k, v, bm.block_q, bm.block_k, quantize=triton_backend.quantize_per_token)
        triton_backend.kv_lists(bm)

    def predict_both(q, k, causal, sdpa_ms):
        """CDF prediction time, PyTorch and fused (% of SDPA), and the fraction of blocks
        on which their maps differ; NaN for the fused one when skipped or failed."""
        params = dict(cdfthreshd=0.97, simthreshd1=-1.0, causal=causal)
        torch_pct = 100 * timed(lambda: predict_block_map(q, k, **params)) / sdpa_ms
        if args.no_fused_predict:
            return torch_pct, math.nan, math.nan
        try:
            ref = predict_block_map(q, k, **params)
            fused = triton_backend.predict_block_map(q, k, **params)
            differ = float((fused.keep != ref.keep).float().mean())
            fused_ms = timed(lambda: triton_backend.predict_block_map(q, k, **params))
            return torch_pct, 100 * fused_ms / sdpa_ms, differ
        except Exception as exc:  # report it and go on without the fused prediction
            print(f"!! fused prediction failed, skipping it from now on: {exc!r}"[:400],
                  flush=True)
            args.no_fused_predict = True
            return torch_pct, math.nan, math.nan

    name = "CPU dry run (times mean nothing)" if args.dry_run else torch.cuda.get_device_name()
    print(f"# {name}  torch {torch.__version__}", flush=True)
    header = (f"{'N':>6} {'D':>4} {'H':>3} {'causal':>6} {'target':>6} {'skipped':>7} "
              f"{'sdpa ms':>8} {'flex ms':>8} {'ours ms':>8} {'nopv ms':>8} {'prep ms':>7} "
              f"{'sdpa TF':>7} {'flex TF':>7} {'ours TF':>7} {'x sdpa':>6} {'x flex':>6} "
              f"{'pred %':>6} {'tcdf %':>6} {'fcdf %':>6} {'fdiff':>6} {'relL1':>7} {'fp8 ms':>7} "
              f"{'fp8 L1':>7} {'e2e ms':>7} {'e2e x':>6}")
    print(header, flush=True)
    rows = []
    for n in args.lengths:
        for d in args.dims:
            heads = args.heads or max(1, 2048 // d)
            q, k, v = make_inputs(n, d, heads, dtype, device=device)
            for causal in (False, True):
                sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                dense_pairs = heads * (n * (n + 1) // 2 if causal else n * n)
                tcdf_pct, fcdf_pct, fdiff = predict_both(q, k, causal, sdpa)
                for target in args.sparsities:
                    keep = 1.0 - target
                    predict = lambda: predict_block_map(q, k, topk=keep, simthreshd1=-1.0,
                                                        causal=causal)
                    bm = predict()
                    pred_ms = timed(predict)
                    pairs = bm.pairs_computed()
                    run = lambda pv: run_backend(q, k, v, bm, backend="triton", pvthreshd=pv)
                    ours = run(15.0)
                    check, flex_ms = None, math.nan
                    if not args.no_flex:
                        try:
                            check = run_backend(q, k, v, bm, backend="flex")
                            flex_ms = timed(lambda: run_backend(q, k, v, bm, backend="flex"))
                        except Exception as exc:  # report it and go on without flex
                            print(f"!! flex failed, skipping it from now on: {exc!r}"[:400],
                                  flush=True)
                            args.no_flex = True
                    if check is None and target == 0:
                        check = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    err = rel_l1(ours, check) if check is not None else math.nan
                    if not err < 0.02 and check is not None:
                        print(f"!! accuracy check failed: relative L1 {err:.4f}", flush=True)
                    ours_ms = timed(lambda: run(15.0))
                    nopv_ms = timed(lambda: run(None))
                    prep_ms = timed(lambda: prepare(q, k, v, bm))
                    e2e_ms = timed(lambda: sparse_attention(
                        q, k, v, is_causal=causal, topk=keep, simthreshd1=-1.0, pvthreshd=15.0,
                        backend="triton",     # the default predictor ("auto") chooses once
                        predictor="torch" if args.no_fused_predict else None))
                    fp8_ms = fp8_err = math.nan
                    if not args.no_fp8:
                        try:
                            full = _fit_block_map(bm, q, k)
                            fp8 = lambda: triton_backend.block_sparse_attention(  # noqa: E731
                                q, k, v, full, pvthreshd=15.0, pv_dtype="fp8")
                            fp8_err = rel_l1(fp8(), check) if check is not None else math.nan
                            fp8_ms = timed(fp8)
                        except Exception as exc:  # report it and go on without fp8
                            print(f"!! fp8 failed, skipping it from now on: {exc!r}"[:400],
                                  flush=True)
                            args.no_fp8 = True
                    tf = lambda p, ms: 4 * d * p / (ms * 1e-3) / 1e12
                    row = dict(n=n, d=d, heads=heads, causal=causal, target=target,
                               skipped=bm.sparsity(), sdpa_ms=sdpa, flex_ms=flex_ms,
                               ours_ms=ours_ms, nopv_ms=nopv_ms, prep_ms=prep_ms,
                               sdpa_tflops=tf(dense_pairs, sdpa), flex_tflops=tf(pairs, flex_ms),
                               ours_tflops=tf(pairs, ours_ms), speedup=sdpa / ours_ms,
                               vs_flex=flex_ms / ours_ms, predict_pct=100 * pred_ms / sdpa,
                               cdf_predict_pct=tcdf_pct, fused_cdf_predict_pct=fcdf_pct,
                               fused_predict_differ=fdiff,
                               rel_l1=err, fp8_ms=fp8_ms, fp8_rel_l1=fp8_err,
                               e2e_ms=e2e_ms, e2e_speedup=sdpa / e2e_ms)
                    rows.append(row)
                    if args.json:   # after every row: a run cut short keeps what it measured
                        with open(args.json, "w") as f:
                            json.dump(rows, f, indent=1)
                    print(f"{n:>6} {d:>4} {heads:>3} {str(causal):>6} {target:>6.2f} "
                          f"{row['skipped']:>7.3f} {sdpa:>8.3f} {flex_ms:>8.3f} {ours_ms:>8.3f} "
                          f"{nopv_ms:>8.3f} {prep_ms:>7.3f} {row['sdpa_tflops']:>7.1f} "
                          f"{row['flex_tflops']:>7.1f} "
                          f"{row['ours_tflops']:>7.1f} {row['speedup']:>6.2f} "
                          f"{row['vs_flex']:>6.2f} {row['predict_pct']:>6.1f} "
                          f"{tcdf_pct:>6.1f} {fcdf_pct:>6.1f} {fdiff:>6.4f} {err:>7.4f} "
                          f"{fp8_ms:>7.3f} {fp8_err:>7.4f} {e2e_ms:>7.3f} "
                          f"{row['e2e_speedup']:>6.2f}",
                          flush=True)
            q = k = v = None   # free the GPU memory before the next size
            if device == "cuda":
                torch.cuda.empty_cache()
    for key, config in getattr(triton_backend._kernel(), "cache", {}).items():
        print(f"# autotune chose {config} for {key}", flush=True)
    from creative_sparse.attention.dispatch import predictor_choices
    print(f"# the default ('auto') block-map predictor chose {predictor_choices()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
