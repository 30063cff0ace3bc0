"""Triton backend: fused block-sparse attention with INT8 Q·Kᵀ and the PV threshold.

The GPU kernel (``triton_kernel.py``) walks the kept key blocks of each query
block with an online softmax. Q and K are quantized per token to INT8 (K
smoothed first), scores come from an ``int32`` dot product times the query's and
the key's scales, P·V runs in fp16/bf16 (or FP8 with ``pv_dtype="fp8"``) with fp32
accumulation, and the P·V product of a block far below the running maximum is
skipped (``pvthreshd``). Causal masking is applied inside diagonal blocks; GQA,
any length and head dims up to 256 (padded to a power of two) are supported.
:mod:`creative_sparse.attention.quant` documents the numerics and emulates them.

The same source runs on CPU tensors under Triton's interpreter: far too slow
for real work, but it lets the tests check the kernel without a GPU. Triton
reads ``TRITON_INTERPRET=1`` when it is first imported, so set it in the
environment before the process starts (the test suite's conftest does). Needs ``pip install creative-sparse[triton]``
(Triton ships with PyTorch's CUDA builds).
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from .. import quant
from ..blockmap import (BlockMap, HeadParam, check_scalar, constant_per_head,
                        per_head_param, prediction_args)

__all__ = ["MAX_HEAD_DIM", "available", "block_sparse_attention", "interpreter_enabled",
           "kv_lists", "predict_block_map", "quantize_per_token"]

MAX_HEAD_DIM = 256


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: CPU tensors may then use this backend."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: CUDA with compute capability >= 8.0
    (INT8 tensor cores), or CPU under the interpreter; Triton must be installed."""
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and interpreter_enabled()


AUTOTUNE_SETTINGS = ((4, 3), (8, 3), (8, 2), (4, 2), (4, 4), (8, 1))
"""(warps, stages) the attention kernel is autotuned over. (4, 2) and (4, 4) are for
small head dims (D = 64 trailed SDPA most); (8, 1) is the unpipelined loop the PV
threshold used to get (it spills least on sm_80 at D = 128). A config that does not
fit the GPU's shared memory is skipped by the autotuner."""


def _autotuned(settings):
    """The attention kernel autotuned over ``settings`` (once per shape class); the
    config's stage count also reaches the kernel as its loop's ``STAGES``."""
    import triton

    from . import triton_kernel

    configs = [triton.Config({"STAGES": s}, num_warps=w, num_stages=s) for w, s in settings]
    return triton.autotune(configs, key=["HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N",
                                         "IS_CAUSAL", "PV_SKIP", "PV_FP8", "ROWS"])(
        triton_kernel.block_sparse_fwd)


@functools.lru_cache(maxsize=1)
def _kernel():
    """The kernel: interpreted when ``TRITON_INTERPRET=1``, else compiled and autotuned."""
    if interpreter_enabled():
        from . import triton_kernel
        return triton_kernel.block_sparse_fwd
    return _autotuned(AUTOTUNE_SETTINGS)


def program_rows(block_q: int, head_dim: int) -> int:
    """Query rows per attention program: the whole block, or 64 of its rows from head
    dim 256, where a 128-row block spills 600-900 bytes of registers per thread and a
    64-row part with 8 warps 0-184 bytes on sm_90 (``benchmarks/triton_compile.py``)."""
    return min(block_q, 64) if head_dim >= 256 else block_q


def _row_chunk(block: int, dim: int) -> int:
    """Rows a kernel holds at once: 4096 values, 32 per thread of 4 warps."""
    return min(block, max(16, 4096 // dim))


def quantize_per_token(x: Tensor, block: int, *, dim_size: int | None = None,
                       multiplier: float = 1.0,
                       mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`creative_sparse.attention.quant.quantize_per_token` in one Triton launch."""
    from . import triton_kernel

    b, h, length, d = x.shape
    dim_size = dim_size or d
    n = math.ceil(length / block)
    out = torch.empty(b, h, n * block, dim_size, device=x.device, dtype=torch.int8)
    scale = torch.empty(b, h, n * block, device=x.device, dtype=torch.float32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    mean_arg = mean.contiguous() if mean is not None else scale    # unread without SMOOTH
    if out.numel():
        triton_kernel.quantize_rows[(n, b * h)](
            x, mean_arg, out, scale, x.stride(0), x.stride(1), x.stride(2), h, length, d,
            float(multiplier), BLOCK=block, DIM=dim_size, SMOOTH=mean is not None,
            CHUNK=_row_chunk(block, dim_size))
    return out, scale


def _pv_limits(pvthreshd, heads: int, device: torch.device) -> Tensor:
    """fp32 ``[heads]`` on ``device``. Scalars are made there directly: a host-to-device
    copy per call would make every call wait for the GPU."""
    if pvthreshd is None or isinstance(pvthreshd, (int, float)):
        value = math.inf if pvthreshd is None else float(pvthreshd)
        if pvthreshd is not None:
            check_scalar(value, "pvthreshd", 0.0, math.inf, low_open=True)
        return constant_per_head(value, heads, device)
    if isinstance(pvthreshd, Tensor) and pvthreshd.device == device:
        limits = pvthreshd.to(torch.float32).flatten()
        if limits.numel() == heads:
            return limits.contiguous()          # validated by the public entry points
    return per_head_param(pvthreshd, "pvthreshd", heads, 0.0, math.inf,
                          low_open=True).to(device).contiguous()


def _check_supported(head_dims: dict[str, int], blocks: dict[str, int], what: str,
                     instead: str) -> None:
    for name, size in head_dims.items():
        if size > MAX_HEAD_DIM:
            raise ValueError(f"the Triton {what} supports {name} up to {MAX_HEAD_DIM}, got "
                             f"{size}; use {instead}")
    for name, size in blocks.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"the Triton {what} needs {name} a power of two >= 16, got {size}")


def _require_available(device: torch.device) -> None:
    if not available(device):
        raise RuntimeError("the Triton backend needs Triton and a CUDA GPU of compute "
                           "capability >= 8.0 (or TRITON_INTERPRET=1 for CPU tensors)")


def kv_lists(block_map: BlockMap) -> tuple[Tensor, Tensor]:
    """``block_map.kv_indices()`` in one Triton launch (a sum and a stable argsort make
    several), unless the map already carries its lists. Contiguous int32."""
    if block_map.kv_lists is not None:
        return block_map.kv_lists
    from . import triton_kernel

    keep = block_map.keep
    b, h, nq, nk = keep.shape
    counts = torch.empty(b, h, nq, device=keep.device, dtype=torch.int32)
    indices = torch.empty(b, h, nq, nk, device=keep.device, dtype=torch.int32)
    if counts.numel():
        if keep.stride(-1) != 1:
            keep = keep.contiguous()
        triton_kernel.list_blocks[(nq, b * h)](
            keep.view(torch.int8), counts, indices, keep.stride(0), keep.stride(1),
            keep.stride(2), h, nq, nk, NK_POW2=max(16, 1 << (nk - 1).bit_length()))
    return counts, indices


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_map: BlockMap, *,
                           scale: float | None = None, pvthreshd=None,
                           pv_dtype: str | None = None) -> Tensor:
    """Quantized block-sparse attention over the kept blocks of ``block_map``.

    Args:
        q, k, v: ``[B, H, Lq, D]`` / ``[B, H_kv, Lk, D]`` / ``[B, H_kv, Lk, Dv]``.
        block_map: batch and heads already expanded to ``[B, H, nq, nk]``.
        scale: score multiplier, default ``1/sqrt(D)``.
        pvthreshd: log2 units, scalar or one per head; None never skips P·V.
        pv_dtype: ``"fp16"``, ``"bf16"``, ``"fp8"`` (GPUs with FP8, i.e.
            compute capability >= 8.9) or None (V's dtype; fp16 for fp32 input).

    Returns:
        ``[B, H, Lq, Dv]`` in ``q``'s dtype (fp32 stays fp32).
    """
    _check_supported({"head_dim": q.shape[-1], "value head_dim": v.shape[-1]},
                     {"block_q": block_map.block_q, "block_k": block_map.block_k},
                     "kernel", "backend='flex' or 'torch'")
    _require_available(q.device)
    b, h, lq, _ = q.shape
    h_kv = k.shape[1]
    inputs = quant.prepare(q, k, v, block_map.block_q, block_map.block_k, scale=scale,
                           pv_dtype=pv_dtype, quantize=quantize_per_token)
    counts, indices = kv_lists(block_map)
    limits = _pv_limits(pvthreshd, h, q.device)
    pv_skip = pvthreshd is not None
    out = torch.empty(b, h, lq, inputs.head_dim_v, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    v_scale = inputs.v_scale if inputs.v_scale is not None else limits  # unread placeholder
    nq, nk = block_map.num_q_blocks, block_map.num_k_blocks
    kernel = _kernel()
    qi, ki, vi = inputs.q, inputs.k, inputs.v
    rows = program_rows(block_map.block_q, max(qi.shape[-1], vi.shape[-1]))
    grid = (nq * (block_map.block_q // rows), b * h)
    kernel[grid](
        qi, ki, vi, inputs.q_scale, inputs.k_scale, v_scale, out,
        counts, indices, limits,
        qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1), ki.stride(2),
        vi.stride(0), vi.stride(1), vi.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, h // h_kv, nq, nk, lq, k.shape[2], k.shape[2] - lq, inputs.head_dim_v,
        HEAD_DIM=qi.shape[-1], HEAD_DIM_V=vi.shape[-1], BLOCK_M=block_map.block_q,
        BLOCK_N=block_map.block_k, IS_CAUSAL=block_map.causal, PV_SKIP=pv_skip,
        PV_FP8=inputs.v_scale is not None, NK_POW2=max(16, 1 << (nk - 1).bit_length()),
        ROWS=rows)
    return out


def _pool(x: Tensor, block: int, mean: Tensor | None) -> tuple[Tensor, Tensor]:
    """``blockmap.pooled_blocks`` (of ``x - mean`` when given): pooled ``[B, H, n, D]``
    and similarity ``[B, H, n]``, fp32, in one launch."""
    b, h, length, d = x.shape
    n = math.ceil(length / block)
    pooled = torch.empty(b, h, n, d, device=x.device, dtype=torch.float32)
    similarity = torch.empty(b, h, n, device=x.device, dtype=torch.float32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    dim = max(16, 1 << (d - 1).bit_length())
    from . import triton_kernel
    triton_kernel.pool_blocks[(n, b * h)](
        x, mean if mean is not None else similarity, pooled, similarity,
        x.stride(0), x.stride(1), x.stride(2), h, length, d,
        BLOCK=block, CHUNK=_row_chunk(block, dim), DIM=dim, SMOOTH=mean is not None)
    return pooled, similarity


def predict_block_map(q: Tensor, k: Tensor, *, simthreshd1: HeadParam = 0.6,
                      cdfthreshd: HeadParam | None = None, topk: HeadParam | None = None,
                      causal: bool = False, attention_sink: bool = False,
                      smooth_k: bool = True, scale: float | None = None,
                      block_q: int = 128, block_k: int = 64,
                      selection: str = "mass") -> BlockMap:
    """:func:`creative_sparse.attention.predict_block_map` in five GPU launches.

    The same arguments and the same map (up to float rounding at a threshold):
    one Triton pass pools Q, one pools the smoothed K, one batched matrix product
    scores the pooled blocks (GQA without repeating K), and one Triton pass per
    query block does the softmax, the CDF or top-k selection without sorting, and
    the always-computed blocks. That pass also writes the kept-block lists, so
    the attention kernel needs no sort either (``BlockMap.kv_lists``). With K's mean,
    that is five launches; the PyTorch prediction makes 69 (a sort among them).

    Needs head_dim up to 256 and block sizes that are powers of two >= 16.
    """
    scale, sim_t, thr = prediction_args(q, k, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd,
                                        topk=topk, scale=scale, block_q=block_q,
                                        block_k=block_k, selection=selection)
    _check_supported({"head_dim": q.shape[-1]}, {"block_q": block_q, "block_k": block_k},
                     "prediction", "predictor='torch'")
    _require_available(q.device)
    from . import triton_kernel

    b, h, lq, d = q.shape
    h_kv, lk = k.shape[1], k.shape[2]
    nq, nk = math.ceil(lq / block_q), math.ceil(lk / block_k)
    pooled_q, sim_q = _pool(q, block_q, None)
    mean = k.mean(dim=2, dtype=torch.float32).contiguous() if smooth_k else None
    pooled_k, sim_k = _pool(k, block_k, mean)
    group = h // h_kv
    logits = torch.matmul(pooled_q.view(b, h_kv, group * nq, d),
                          pooled_k.transpose(-1, -2)).view(b, h, nq, nk)
    keep = torch.empty(b, h, nq, nk, device=q.device, dtype=torch.int8)
    counts = torch.empty(b, h, nq, device=q.device, dtype=torch.int32)
    indices = torch.empty(b, h, nq, nk, device=q.device, dtype=torch.int32)
    triton_kernel.select_blocks[(nq, b * h)](
        logits, sim_q, sim_k, sim_t.contiguous(), thr.contiguous(), keep, counts, indices,
        h, group, nq, nk, lq, lk, scale, BLOCK_Q=block_q, BLOCK_K=block_k,
        NK_POW2=max(16, 1 << (nk - 1).bit_length()), CAUSAL=bool(causal),
        TOPK=topk is not None, SINK=bool(attention_sink), SPARGE=selection == "sparge")
    return BlockMap(keep.view(torch.bool), block_q, block_k, lq, lk, bool(causal),
                    kv_lists=(counts, indices), check_lists=False)
