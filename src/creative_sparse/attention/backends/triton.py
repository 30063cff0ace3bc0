"""Triton backend: fused block-sparse attention with INT8 Q·Kᵀ and the PV threshold.

The GPU kernel (``triton_kernel.py``) walks the kept key blocks of each query
block with an online softmax. Q and K are quantized per block to INT8 (K
smoothed first), scores come from an ``int32`` dot product times the two block
scales, P·V runs in fp16/bf16 (or FP8 with ``pv_dtype="fp8"``) with fp32
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
from ..blockmap import BlockMap, per_head_param

__all__ = ["MAX_HEAD_DIM", "available", "block_sparse_attention", "interpreter_enabled",
           "quantize_per_block"]

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


@functools.lru_cache(maxsize=1)
def _kernel():
    """The kernel: interpreted when ``TRITON_INTERPRET=1``, else compiled and autotuned
    over a few warp/stage settings (once per shape class)."""
    import triton

    from . import triton_kernel

    if interpreter_enabled():
        return triton_kernel.block_sparse_fwd
    # (4, 2) and (4, 4) are for small head dims (D = 64 trailed SDPA most); a config
    # that does not fit the GPU's shared memory is skipped by the autotuner.
    settings = ((4, 3), (8, 3), (8, 2), (4, 2), (4, 4))
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in settings]
    return triton.autotune(configs, key=["HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N",
                                         "IS_CAUSAL", "PV_SKIP", "PV_FP8"])(
        triton_kernel.block_sparse_fwd)


def quantize_per_block(x: Tensor, block: int, *, dim_size: int | None = None,
                       multiplier: float = 1.0,
                       mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`creative_sparse.attention.quant.quantize_per_block` in one Triton pass."""
    from . import triton_kernel

    b, h, length, d = x.shape
    dim_size = dim_size or d
    n = math.ceil(length / block)
    out = torch.empty(b, h, n * block, dim_size, device=x.device, dtype=torch.int8)
    scale = torch.empty(b, h, n, device=x.device, dtype=torch.float32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    mean_arg = mean.contiguous() if mean is not None else scale    # unread without SMOOTH
    if out.numel():
        triton_kernel.quantize_blocks[(n, b * h)](
            x, mean_arg, out, scale, x.stride(0), x.stride(1), x.stride(2), h, length, d,
            float(multiplier), BLOCK=block, DIM=dim_size, SMOOTH=mean is not None)
    return out, scale


@functools.lru_cache(maxsize=64)
def _constant_limits(value: float, heads: int, device: torch.device) -> Tensor:
    return torch.full((heads,), value, device=device, dtype=torch.float32)


def _pv_limits(pvthreshd, heads: int, device: torch.device) -> Tensor:
    """fp32 ``[heads]`` on ``device``. Scalars are made there directly: a host-to-device
    copy per call would make every call wait for the GPU."""
    if pvthreshd is None or isinstance(pvthreshd, (int, float)):
        value = math.inf if pvthreshd is None else float(pvthreshd)
        if pvthreshd is not None:
            per_head_param(value, "pvthreshd", 1, 0.0, math.inf, low_open=True)
        return _constant_limits(value, heads, device)
    if isinstance(pvthreshd, Tensor) and pvthreshd.device == device:
        limits = pvthreshd.to(torch.float32).flatten()
        if limits.numel() == heads:
            return limits.contiguous()          # validated by the public entry points
    return per_head_param(pvthreshd, "pvthreshd", heads, 0.0, math.inf,
                          low_open=True).to(device).contiguous()


def _check_supported(q: Tensor, v: Tensor, block_map: BlockMap) -> None:
    for name, size in (("head_dim", q.shape[-1]), ("value head_dim", v.shape[-1])):
        if size > MAX_HEAD_DIM:
            raise ValueError(f"the Triton kernel supports {name} up to {MAX_HEAD_DIM}, got "
                             f"{size}; use backend='flex' or 'torch'")
    for name, size in (("block_q", block_map.block_q), ("block_k", block_map.block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"the Triton kernel needs {name} a power of two >= 16, got {size}")


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
    _check_supported(q, v, block_map)
    if not available(q.device):
        raise RuntimeError("the Triton backend needs Triton and a CUDA GPU of compute "
                           "capability >= 8.0 (or TRITON_INTERPRET=1 for CPU tensors)")
    b, h, lq, _ = q.shape
    h_kv = k.shape[1]
    inputs = quant.prepare(q, k, v, block_map.block_q, block_map.block_k, scale=scale,
                           pv_dtype=pv_dtype, quantize=quantize_per_block)
    counts, indices = block_map.kv_indices()
    limits = _pv_limits(pvthreshd, h, q.device)
    pv_skip = pvthreshd is not None
    out = torch.empty(b, h, lq, inputs.head_dim_v, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    v_scale = inputs.v_scale if inputs.v_scale is not None else limits  # unread placeholder
    nq, nk = block_map.num_q_blocks, block_map.num_k_blocks
    kernel = _kernel()
    grid = (nq, b * h)
    qi, ki, vi = inputs.q, inputs.k, inputs.v
    kernel[grid](
        qi, ki, vi, inputs.q_scale, inputs.k_scale, v_scale, out,
        counts.contiguous(), indices.contiguous(), limits,
        qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1), ki.stride(2),
        vi.stride(0), vi.stride(1), vi.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, h // h_kv, nq, nk, lq, k.shape[2], k.shape[2] - lq, inputs.head_dim_v,
        HEAD_DIM=qi.shape[-1], HEAD_DIM_V=vi.shape[-1], BLOCK_M=block_map.block_q,
        BLOCK_N=block_map.block_k, IS_CAUSAL=block_map.causal, PV_SKIP=pv_skip,
        PV_FP8=inputs.v_scale is not None, NK_POW2=max(16, 1 << (nk - 1).bit_length()))
    return out
