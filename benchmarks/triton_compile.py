"""Compile every Triton kernel for NVIDIA GPUs on a machine without one.

Triton's interpreter (what the CPU tests use) runs the kernels' Python source and
accepts code the GPU compiler rejects, and Triton changes what it accepts between
releases. This script compiles each kernel, in the configurations the library
launches, down to a cubin for each target (Ampere sm_80, Ada sm_89, Hopper
sm_90) with the ``ptxas`` that ships in the Triton wheel. It needs no GPU. For each
kernel it prints the registers per thread and the bytes spilled to the stack per
thread (read back with the wheel's ``cuobjdump``), and whether the loads are
pipelined (asynchronous ``cp.async`` copies in the PTX). These are static figures:
a spill or a synchronous load in the inner loop usually costs speed, but only a GPU
run measures speed.

Usage::

    python benchmarks/triton_compile.py            # every kernel, every target
    python benchmarks/triton_compile.py --quick    # fewer configurations (the CI test)

Exits 1 when a kernel fails to compile. Must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TARGETS = {"sm_80": 80, "sm_89": 89, "sm_90": 90}


def _signature(fn, types: dict[str, str], constants: dict[str, object]) -> dict[str, str]:
    """Triton signature of ``fn``: constexpr parameters from ``constants``, the others
    from ``types`` by name (pointers ``*fp32``..., scalars ``i32``/``fp32``)."""
    signature = {}
    for param in fn.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in types:
            signature[param.name] = types[param.name]
        elif param.name.startswith("stride_") or param.name in _INT_ARGS:
            signature[param.name] = "i32"
        else:
            raise KeyError(f"{fn.__name__}: no type given for argument {param.name!r}")
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constants]
    if missing:
        raise KeyError(f"{fn.__name__}: no value for constexpr {missing}")
    return signature


_INT_ARGS = {"num_heads", "group", "num_q_blocks", "num_k_blocks", "q_len", "k_len",
             "causal_offset", "head_dim_v", "length", "dim"}   # and every stride_*


def _cases(quick: bool):
    """(label, kernel, pointer/scalar types, constexprs, num_warps, num_stages, targets)."""
    from creative_sparse.attention.backends import triton_kernel as tk
    from creative_sparse.attention.backends.triton import _row_chunk, program_rows

    attention = {"Q": "*i8", "K": "*i8", "V": "*bf16", "QScale": "*fp32", "KScale": "*fp32",
                 "VScale": "*fp32", "Out": "*bf16", "Counts": "*i32", "Indices": "*i32",
                 "PVLimit": "*fp32"}
    dims = (128,) if quick else (64, 128, 256)   # quick: the D that spilled once
    warps = ((8, 3),) if quick else ((4, 3), (8, 3), (8, 2))
    for d in dims:
        for causal, pv_skip in ((True, True), (False, False)):
            for w, s in warps:
                consts = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=128, BLOCK_N=64,
                              IS_CAUSAL=causal, PV_SKIP=pv_skip, PV_FP8=False, NK_POW2=512,
                              STAGES=s, ROWS=program_rows(128, d))
                label = (f"attention D={d} rows={program_rows(128, d)} "
                         f"{'causal' if causal else 'full'} "
                         f"pv_skip={pv_skip} warps={w} stages={s}")
                yield label, tk.block_sparse_fwd, attention, consts, w, s, ("sm_80", "sm_90")
    fp8 = dict(attention, V="*fp8e4nv")
    consts = dict(HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_M=128, BLOCK_N=64, IS_CAUSAL=True,
                  PV_SKIP=True, PV_FP8=True, NK_POW2=512, STAGES=3, ROWS=128)
    yield "attention fp8 P.V D=128", tk.block_sparse_fwd, fp8, consts, 8, 3, ("sm_89", "sm_90")
    quantize = {"X": "*bf16", "Mean": "*fp32", "Out": "*i8", "Scale": "*fp32",
                "multiplier": "fp32"}
    for d in dims:
        yield (f"quantizer D={d}", tk.quantize_rows, quantize,
               dict(BLOCK=128, DIM=d, SMOOTH=True, CHUNK=_row_chunk(128, d)), 4, 3,
               ("sm_80", "sm_90"))
    pool = {"X": "*bf16", "Mean": "*fp32", "Pooled": "*fp32", "Sim": "*fp32"}
    for d in dims:
        yield (f"prediction pooling D={d}", tk.pool_blocks, pool,
               dict(BLOCK=64, CHUNK=_row_chunk(64, d), DIM=d, SMOOTH=True), 4, 3,
               ("sm_80", "sm_90"))
    lists = {"Keep": "*i8", "Counts": "*i32", "Indices": "*i32"}
    for nk in (16, 2048):
        yield (f"block lists {nk} key blocks", tk.list_blocks, lists, dict(NK_POW2=nk), 4, 3,
               ("sm_80", "sm_90"))
    select = {"Logits": "*fp32", "SimQ": "*fp32", "SimK": "*fp32", "SimT": "*fp32",
              "Thr": "*fp32", "Keep": "*i8", "Counts": "*i32", "Indices": "*i32",
              "scale": "fp32"}
    for nk, topk, sparge in ((16, False, False), (512, True, False), (2048, False, False),
                             (512, True, True), (2048, False, True)):
        rules = "the original's rules" if sparge else "ours"
        yield (f"prediction selection {nk} key blocks {'top-k' if topk else 'CDF'}, {rules}",
               tk.select_blocks, select,
               dict(BLOCK_Q=128, BLOCK_K=64, NK_POW2=nk, CAUSAL=True, TOPK=topk, SINK=True,
                    SPARGE=sparge),
               4, 3, ("sm_80", "sm_90"))


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the one kernel in ``cubin``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(row for row in text.splitlines() if "REG:" in row)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return int(fields["REG"]), int(fields["STACK"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    print(f"# Triton {triton.__version__}: registers / stack bytes per thread; 'async': "
          "loads pipelined with cp.async")
    failures = count = 0
    rows = []
    for label, fn, types, consts, warps, stages, targets in _cases(args.quick):
        cells = []
        for name in targets:
            start = time.perf_counter()
            try:
                source = ASTSource(fn=fn, signature=_signature(fn, types, consts),
                                   constexprs=consts)
                kernel = triton.compile(source, target=GPUTarget("cuda", TARGETS[name], 32),
                                        options=dict(num_warps=warps, num_stages=stages))
                regs, stack = _resources(kernel.asm["cubin"])
                pipelined = "cp.async" in kernel.asm["ptx"]
                rows.append(dict(kernel=label, target=name, registers=regs, stack=stack,
                                 pipelined=pipelined))
                cells.append(f"{name} {regs:3d} / {stack:4d}{' async' if pipelined else ''}"
                             f" ({time.perf_counter() - start:.1f} s)")
                count += 1
            except Exception as exc:  # report every failure, then fail the run
                failures += 1
                cells.append(f"{name} FAILED: {str(exc).strip().splitlines()[-1][:200]}")
        print(f"{label:<58} " + "  ".join(cells), flush=True)
    print(f"compiled {count} kernels, {failures} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
