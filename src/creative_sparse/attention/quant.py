"""INT8 quantization of Q and K per token, and a PyTorch emulation of the GPU kernel's numerics.

The Triton kernel (``backends/triton.py``) follows SageAttention's recipe:

1. **K smoothing**: subtract the mean key over the sequence, per (batch, KV
   head). Every score of a query row moves by the same constant, so softmax is
   unchanged, while the shared offset that dominates K's range no longer costs
   quantization levels.
2. **Per-token INT8**: each query and key row gets one scale ``amax / 127``;
   values are rounded to nearest. The softmax scale and ``log2(e)`` are folded
   into the Q scales, so the kernel's ``int32`` dot product times
   ``k_scale[j] * q_scale[i]`` is the score in log2 units. SageAttention's
   per-block scales (one per 128 query rows, one per 64 key rows) save one
   multiply per score, but on the tests' structured inputs (clustered queries,
   dense attention over 2085 keys, head dims 64-256) their relative L1 against
   fp32 is 0.019-0.021, and 0.021-0.024 at 4096 keys; per-token scales give
   0.014-0.018 and 0.016-0.021 (``tests/test_triton_kernel.py``).
3. **P·V in low precision**: P (fp32 inside the kernel) is cast to the dtype of
   V for the product (fp16 or bf16), accumulated in fp32. With ``pv_dtype="fp8"``,
   V is scaled per channel into float8_e4m3 and P is multiplied by 448 first.
4. **PV threshold**: the P·V product of a kept block is skipped when every row's
   block maximum is more than ``pvthreshd`` (log2 units) below its running
   maximum; the block still counts in the softmax denominator.

:func:`prepare` produces the kernel's inputs; :func:`emulate` computes the
kernel's result from them with the same order of operations, vectorised over
(batch, head, query block), so CPU tests can check the kernel's math tightly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .blockmap import BlockMap

__all__ = ["PV_DTYPES", "QuantizedInputs", "emulate", "prepare",
           "quantize_per_token", "smooth_k"]

LOG2E = 1.4426950408889634
FP8_MAX = 448.0  # largest finite float8_e4m3fn
PV_DTYPES = ("fp16", "bf16", "fp8")


def smooth_k(k: Tensor) -> Tensor:
    """``k`` minus its mean over the sequence, per batch and head (``[B, H, L, D]``)."""
    return k - k.mean(dim=-2, keepdim=True)


def _pad_to(x: Tensor, length: int, dim_size: int) -> Tensor:
    """Zero-pad ``[B, H, L, D]`` to ``[B, H, length, dim_size]``."""
    pad_l, pad_d = length - x.shape[-2], dim_size - x.shape[-1]
    if pad_l == 0 and pad_d == 0:
        return x
    return torch.nn.functional.pad(x, (0, pad_d, 0, pad_l))


def quantize_per_token(x: Tensor, block: int, *, dim_size: int | None = None,
                       multiplier: float = 1.0,
                       mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric INT8 quantization with one scale per row (token), padded to whole blocks.

    Args:
        x: ``[B, H, L, D]``, any float dtype (quantized from fp32).
        block: the row count is padded up to a multiple of this (the kernel's block).
        dim_size: pad the last dimension to this size with zeros (default ``D``).
        multiplier: folded into the returned scales (e.g. softmax scale * log2 e).
        mean: fp32 ``[B, H, D]`` subtracted from every row first (K smoothing).

    Returns:
        ``(x_int8, scale)``: ``int8 [B, H, ceil(L/block)*block, dim_size]`` and
        ``float32 [B, H, ceil(L/block)*block]`` with ``x ≈ x_int8 * scale / multiplier``
        row by row. Padding rows and all-zero rows are zero with scale 0.

    Example:
        >>> x = torch.randn(1, 1, 100, 16)
        >>> xi, s = quantize_per_token(x, 64)
        >>> xi.shape, s.shape
        (torch.Size([1, 1, 128, 16]), torch.Size([1, 1, 128]))
        >>> bool(((xi[..., :100, :].float() * s[..., :100, None] - x).abs()
        ...       <= s[..., :100, None] / 2 + 1e-6).all())
        True
    """
    b, h, length, d = x.shape
    x = x.float() if mean is None else x.float() - mean[..., None, :]
    padded = _pad_to(x, math.ceil(length / block) * block, dim_size or d)
    scale = padded.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    # floor(y + 0.5) rather than round-half-even: the Triton quantizer does the same.
    y = padded / safe[..., None]
    x_int8 = torch.floor(y + 0.5).clamp_(-127, 127).to(torch.int8)
    return x_int8, scale * multiplier


@dataclass(frozen=True)
class QuantizedInputs:
    """What the kernel reads: padded, quantized Q/K and V in the P·V dtype.

    ``q``: int8 ``[B, H, nq*block_q, Dp]``; ``q_scale``: ``[B, H, nq*block_q]``, one
    per row (softmax scale and log2 e folded in); ``k``: int8
    ``[B, H_kv, nk*block_k, Dp]``; ``k_scale``: ``[B, H_kv, nk*block_k]``; ``v``:
    ``[B, H_kv, nk*block_k, Dvp]`` in fp16, bf16 or float8_e4m3fn, or V itself (``[B, H_kv, Lk, Dv]``, not copied) when it
    already has the P·V dtype and a power-of-two head dim: the kernel masks the
    rows past the keys. ``v_scale``: fp32 ``[B, H_kv, Dvp]`` for fp8 (the output
    is multiplied by it), else None. ``head_dim_v`` is the unpadded Dv.
    """

    q: Tensor
    q_scale: Tensor
    k: Tensor
    k_scale: Tensor
    v: Tensor
    v_scale: Tensor | None
    head_dim_v: int


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _torch_pv_dtype(pv_dtype: str | None, v: Tensor) -> torch.dtype:
    if pv_dtype is None:
        if v.dtype in (torch.float16, torch.bfloat16):
            return v.dtype
        # fp32 inputs: fp16 keeps three more mantissa bits than bf16, if V fits its range.
        return torch.float16 if float(v.abs().max()) < 6.0e4 else torch.bfloat16
    if pv_dtype not in PV_DTYPES:
        raise ValueError(f"pv_dtype must be one of {', '.join(PV_DTYPES)} or None, got "
                         f"{pv_dtype!r}")
    return {"fp16": torch.float16, "bf16": torch.bfloat16,
            "fp8": torch.float8_e4m3fn}[pv_dtype]


def prepare(q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int, *,
            scale: float | None = None, pv_dtype: str | None = None,
            quantize=quantize_per_token) -> QuantizedInputs:
    """Smooth K, quantize Q and K per token, cast and pad V: the kernel's inputs.

    Shapes as in :func:`creative_sparse.attention.reference.masked_attention`.
    Head dims are zero-padded to a power of two (at least 16); sequence lengths
    to whole blocks. ``quantize`` has :func:`quantize_per_token`'s signature
    (the Triton backend passes its fused GPU version).
    """
    d, dv = q.shape[-1], v.shape[-1]
    dp, dvp = _pow2(d), _pow2(dv)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q_i8, q_scale = quantize(q, block_q, dim_size=dp, multiplier=scale * LOG2E)
    k_mean = k.mean(dim=-2, dtype=torch.float32)
    k_i8, k_scale = quantize(k, block_k, dim_size=dp, mean=k_mean)
    dtype = _torch_pv_dtype(pv_dtype, v)
    nk_rows = k_i8.shape[-2]
    v_scale = None
    if dtype == torch.float8_e4m3fn:
        vf = v.float()
        v_scale = (vf.abs().amax(dim=-2) / FP8_MAX).clamp_min(1e-12)
        v_pad = _pad_to(vf / v_scale[..., None, :], nk_rows, dvp).to(dtype)
        v_scale = torch.nn.functional.pad(v_scale, (0, dvp - dv), value=1.0).contiguous()
    elif (v.dtype == dtype and dv == dvp and v.stride(-1) == 1
          and v.stride(-2) * nk_rows < 2**31):   # the kernel's row offsets are 32-bit
        v_pad = v       # a copy of V per call is pure memory traffic on a GPU
    else:
        v_pad = _pad_to(v.to(dtype), nk_rows, dvp).contiguous()
    return QuantizedInputs(q_i8.contiguous(), q_scale.contiguous(), k_i8.contiguous(),
                           k_scale.contiguous(), v_pad, v_scale, dv)


def emulate(inputs: QuantizedInputs, block_map: BlockMap, *,
            pvthreshd: Tensor | None = None) -> Tensor:
    """The kernel's result computed in PyTorch with the kernel's numerics.

    Args:
        inputs: from :func:`prepare`.
        block_map: the map the kernel runs over (batch and heads expanded).
        pvthreshd: fp32 ``[H]`` in log2 units, or None (never skip P·V).

    Returns:
        fp32 ``[B, H, Lq, Dv]``. Rows with no kept key are zero.
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    b, h, _, _ = q.shape
    h_kv = k.shape[1]
    bq, bk = block_map.block_q, block_map.block_k
    nq, nk = block_map.num_q_blocks, block_map.num_k_blocks
    group = h // h_kv
    qf = q.float().view(b, h, nq, bq, -1)
    kf = k.float().repeat_interleave(group, dim=1).view(b, h, nk, bk, -1)
    vf = _pad_to(v.float(), nk * bk, v.shape[-1]).repeat_interleave(group, dim=1)
    vf = vf.reshape(b, h, nk, bk, -1)
    q_scale = inputs.q_scale.view(b, h, nq, bq)
    k_scale = inputs.k_scale.repeat_interleave(group, dim=1).view(b, h, nk, bk)
    counts, indices = block_map.kv_indices()
    counts, indices = counts.to(q.device), indices.to(q.device).long()
    rows = (torch.arange(nq, device=q.device)[:, None] * bq
            + torch.arange(bq, device=q.device))                       # [nq, bq]
    offset = block_map.k_len - block_map.q_len
    limit = torch.full((b, h, nq), -math.inf, device=q.device)
    if pvthreshd is not None:
        limit = -pvthreshd.float().to(q.device).view(1, h, 1).expand(b, h, nq)
    fp8 = v.dtype == torch.float8_e4m3fn
    pv_dtype = v.dtype

    m = torch.full((b, h, nq, bq), -math.inf, device=q.device)
    l = torch.zeros((b, h, nq, bq), device=q.device)
    acc = torch.zeros((b, h, nq, bq, vf.shape[-1]), device=q.device)
    for j in range(int(counts.max()) if counts.numel() else 0):
        active = j < counts                                              # [b, h, nq]
        kb = indices[..., j]                                            # [b, h, nq]
        k_blk = torch.gather(kf, 2, kb[..., None, None].expand(-1, -1, -1, bk, kf.shape[-1]))
        v_blk = torch.gather(vf, 2, kb[..., None, None].expand(-1, -1, -1, bk, vf.shape[-1]))
        s = qf @ k_blk.transpose(-1, -2)                               # exact integer sums
        ks = torch.gather(k_scale, 2, kb[..., None].expand(-1, -1, -1, bk))   # [b,h,nq,bk]
        s = s * ks[..., None, :] * q_scale[..., None]     # the kernel's order: K's scale first
        cols = kb[..., None, None] * bk + torch.arange(bk, device=q.device)  # [b,h,nq,1,bk]
        allowed = cols < block_map.k_len
        if block_map.causal:
            allowed = allowed & (cols <= rows[..., None] + offset)
        s = s.masked_fill(~allowed, -math.inf)
        m_blk = s.amax(dim=-1)
        m_new = torch.maximum(m, m_blk)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - m_safe[..., None])
        alpha = torch.exp2(m - m_safe)
        do_pv = active & ((m_blk - m_safe).amax(dim=-1) >= limit)
        p_low = (p * FP8_MAX).to(pv_dtype).float() if fp8 else p.to(pv_dtype).float()
        pv = p_low @ v_blk
        a = active[..., None]
        l = torch.where(a, l * alpha + p.sum(dim=-1), l)
        acc = torch.where(a[..., None], acc * alpha[..., None], acc)
        acc = acc + torch.where(do_pv[..., None, None], pv, torch.zeros_like(pv))
        m = torch.where(a, m_new, m)
    out = acc / torch.where(l == 0, torch.ones_like(l), l)[..., None]
    if fp8:
        out = out / FP8_MAX * inputs.v_scale.repeat_interleave(group, dim=1)[:, :, None, None]
    out = out.view(b, h, nq * bq, -1)
    return out[:, :, : block_map.q_len, : inputs.head_dim_v]
