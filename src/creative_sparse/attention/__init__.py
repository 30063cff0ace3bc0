"""Sparse attention: the SpargeAttn algorithm, portable (CPU and GPU), exact on kept blocks.

Public entry points:

* :func:`sparse_attention`: predict the important blocks from pooled queries
  and keys, then compute attention over those blocks only.
* :func:`block_sparse_attention`: attention over a given :class:`BlockMap`.
* The seed library's names, with its parameters: :func:`spas_sage2_attn_meansim_cuda`,
  :func:`spas_sage2_attn_meansim_topk_cuda`, :func:`spas_sage_attn_meansim_cuda`,
  :func:`spas_sage_attn_meansim_topk_cuda`, :func:`block_sparse_sage2_attn_cuda`.
  Despite the ``_cuda`` suffix they run on CPU tensors too. On CPU the
  computation is exact fp32; on CUDA with Triton the default backend quantizes
  Q and K to INT8 per token (K smoothed first, as in SageAttention) and skips
  negligible P·V products (``pvthreshd``). The output has the input dtype unless
  ``output_dtype`` says otherwise.

Shapes: ``q`` is ``[B, H, Lq, D]`` and ``k``/``v`` are ``[B, H_kv, Lk, D]`` /
``[B, H_kv, Lk, Dv]`` with ``H % H_kv == 0`` (``tensor_layout="HND"``), or
``[B, L, H, D]`` with ``tensor_layout="NHD"``. Any lengths and head dims.
Causal attention with ``Lq != Lk`` treats the queries as the *last* ``Lq``
positions (decode / chunked prefill).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .blockmap import SELECTIONS, BlockMap, HeadParam, per_head_param, predict_block_map
from .checks import check_block_size, check_output_dtype, check_qkv, check_scale, to_hnd
from .dispatch import (_fit_block_map, available_backends, predict, run_backend,
                       select_backend, use_backend)
from .reference import dense_attention, masked_attention

__all__ = [
    "BlockMap",
    "SELECTIONS",
    "available_backends",
    "block_sparse_attention",
    "block_sparse_sage2_attn_cuda",
    "dense_attention",
    "masked_attention",
    "predict_block_map",
    "select_backend",
    "seed_block_shape",
    "sparse_attention",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage2_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim_cuda",
    "spas_sage_attn_meansim_topk_cuda",
    "use_backend",
]

BLOCK_Q = 128
BLOCK_K = 64
HOPPER_BLOCKS = (64, 128)
"""(block_q, block_k) of the original on compute capability 9.x (its ``core.py``:
``get_block_map_meansim_fuse_quant(..., BLKQ=64, BLKK=128)`` when ``arch == "sm90"``)."""


def seed_block_shape(device: torch.device | str, block_q: int | None = None,
                     block_k: int | None = None) -> tuple[int, int]:
    """The block shape the seed's names use on ``device``, unless given: the original's
    choice per GPU architecture, 64 x 128 on Hopper (compute capability 9.x), else 128 x 64.

    Example:
        >>> seed_block_shape("cpu"), seed_block_shape("cpu", block_k=32)
        ((128, 64), (128, 32))
    """
    device = torch.device(device)
    default = (BLOCK_Q, BLOCK_K)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        default = HOPPER_BLOCKS
    return (default[0] if block_q is None else block_q,
            default[1] if block_k is None else block_k)


def _check_scalars(scale, output_dtype, attn_mask, dropout_p) -> None:
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported by sparse attention (the block map is the "
                         "mask); pass attn_mask=None and use is_causal or block_sparse_attention")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (inference only), got {dropout_p!r}")
    check_scale(scale)
    check_output_dtype(output_dtype)


def _finish(out: Tensor, block_map: BlockMap, tensor_layout: str, output_dtype,
            return_sparsity: bool):
    if tensor_layout == "NHD":
        out = out.transpose(1, 2)
    if output_dtype is not None:
        out = out.to(output_dtype)
    return (out, block_map.sparsity()) if return_sparsity else out


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_map: BlockMap, *,
                           scale: float | None = None, tensor_layout: str = "HND",
                           output_dtype: torch.dtype | None = None,
                           return_sparsity: bool = False, backend: str | None = None,
                           pvthreshd: HeadParam | None = None):
    """Attention over the kept blocks of ``block_map`` (exact, except the Triton
    backend's INT8 scores).

    Args:
        q, k, v: see the module docstring; ``block_map.keep`` must be
            ``[B|1, H|1, ceil(Lq/block_q), ceil(Lk/block_k)]``.
        scale: score multiplier, default ``1/sqrt(D)``.
        backend: force ``"cpu_kernel"``, ``"triton"``, ``"flex"``, ``"torch"`` or
            ``"reference"``.
        pvthreshd: log2 units, scalar or per head: lets the Triton kernel skip
            negligible P·V products (see :func:`sparse_attention`); None never skips.

    Returns:
        The output in ``q``'s layout and dtype (or ``output_dtype``); with
        ``return_sparsity``, ``(output, sparsity)``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> keep = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)[None, None]
        >>> out = block_sparse_attention(q, k, v, BlockMap(keep, 128, 64, 256, 256))
    """
    q, k, v = to_hnd(q, k, v, tensor_layout)
    check_qkv(q, k, v)
    _check_scalars(scale, output_dtype, None, 0.0)
    if not isinstance(block_map, BlockMap):
        raise ValueError(f"block_map must be a BlockMap, got {type(block_map).__name__}")
    block_map = _fit_block_map(block_map, q, k)
    if pvthreshd is not None:
        per_head_param(pvthreshd, "pvthreshd", q.shape[1], 0.0, math.inf, low_open=True)
    out = run_backend(q, k, v, block_map, scale=scale, backend=backend, out_dtype=output_dtype,
                      pvthreshd=pvthreshd)
    return _finish(out, block_map, tensor_layout, output_dtype, return_sparsity)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False,
                     scale: float | None = None, simthreshd1: HeadParam = 0.6,
                     cdfthreshd: HeadParam | None = None, topk: HeadParam | None = None,
                     pvthreshd: HeadParam = 15, smooth_k: bool = True,
                     attention_sink: bool = False, tensor_layout: str = "HND",
                     output_dtype: torch.dtype | None = None, return_sparsity: bool = False,
                     block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                     backend: str | None = None, predictor: str | None = None,
                     selection: str = "mass"):
    """SpargeAttn: predict the important blocks, then compute attention over them only.

    Args:
        q: ``[B, H, Lq, D]`` (or ``[B, Lq, H, D]`` with ``tensor_layout="NHD"``).
        k, v: ``[B, H_kv, Lk, D]`` / ``[B, H_kv, Lk, Dv]``, ``H % H_kv == 0``.
        is_causal: bottom-right causal masking (queries are the last positions).
        scale: score multiplier, default ``1/sqrt(D)``.
        simthreshd1: block self-similarity below which a block is always
            computed, in [-1, 1]; scalar or one value per query head.
        cdfthreshd: attention mass each query block keeps, in (0, 1]; default
            0.97 when ``topk`` is not given. 1.0 is dense.
        topk: instead of ``cdfthreshd``, the fraction of key blocks each query
            block keeps, in (0, 1]. 1.0 is dense.
        pvthreshd: > 0, in log2 units: the Triton GPU kernel skips P.V for a
            block whose weights are all below ``2**-pvthreshd`` of the running
            row maximum. The CPU backends compute every kept block exactly, so
            there it never changes the result.
        smooth_k: subtract the mean key before prediction (no effect on the output math).
        attention_sink: always keep the first key block.
        tensor_layout: ``"HND"`` or ``"NHD"``.
        output_dtype: dtype of the result; default the input dtype.
        return_sparsity: also return the fraction of (causal-aware) blocks skipped.
        block_q, block_k: block sizes (128 x 64 as in SpargeAttn).
        backend: force a backend (see :mod:`creative_sparse.attention.dispatch`).
        predictor: ``"auto"`` (default), ``"torch"`` or ``"triton"`` (the same block
            map from fused GPU launches); also set by ``CREATIVE_SPARSE_PREDICTOR``.
            ``"auto"`` is PyTorch's except on CUDA, where the first call on a device
            compares and times both and keeps the fused one if it agrees and is
            faster (:mod:`creative_sparse.attention.dispatch`).
        selection: ``"mass"`` (default here) or ``"sparge"`` (the original's rules,
            the default of the seed's names): how ``cdfthreshd``, ``topk`` and
            ``simthreshd1`` pick blocks (:mod:`creative_sparse.attention.blockmap`).

    Returns:
        The attention output, same layout as the inputs; with ``return_sparsity``,
        ``(output, sparsity)``.

    Example:
        >>> q = torch.randn(1, 9, 1000, 64); k = v = torch.randn(1, 3, 1000, 64)
        >>> out, s = sparse_attention(q, k, v, is_causal=True, topk=0.5, return_sparsity=True)
        >>> out.shape, 0 <= s < 1
        (torch.Size([1, 9, 1000, 64]), True)
    """
    q, k, v = to_hnd(q, k, v, tensor_layout)
    check_qkv(q, k, v)
    _check_scalars(scale, output_dtype, None, 0.0)
    per_head_param(pvthreshd, "pvthreshd", q.shape[1], 0.0, math.inf, low_open=True)
    block_map = predict(q, k, predictor=predictor, simthreshd1=simthreshd1,
                        cdfthreshd=cdfthreshd, topk=topk, causal=bool(is_causal),
                        attention_sink=attention_sink, smooth_k=smooth_k, scale=scale,
                        block_q=block_q, block_k=block_k, selection=selection)
    out = run_backend(q, k, v, block_map, scale=scale, backend=backend, out_dtype=output_dtype,
                      pvthreshd=pvthreshd)
    return _finish(out, block_map, tensor_layout, output_dtype, return_sparsity)


def spas_sage2_attn_meansim_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, smooth_k=True, simthreshd1=0.6, cdfthreshd=0.97,
                                 pvthreshd=15, attention_sink=False, tensor_layout="HND",
                                 output_dtype=None, return_sparsity=False, *,
                                 selection="sparge", block_q=None, block_k=None):
    """SpargeAttn with CDF selection (seed name; runs on CPU and GPU).

    The original's selection rules by default (``selection="sparge"``), so thresholds
    tuned on it carry over, and its block shape per GPU architecture (64 x 128 on
    Hopper, 128 x 64 elsewhere) unless ``block_q``/``block_k`` are given. See
    :func:`sparse_attention` for every argument. ``attn_mask`` must be None and
    ``dropout_p`` 0.0. Returns the output, or ``(output, sparsity)``.
    """
    _check_scalars(scale, output_dtype, attn_mask, dropout_p)
    block_q, block_k = seed_block_shape(q.device if isinstance(q, Tensor) else "cpu",
                                        block_q, block_k)
    return sparse_attention(q, k, v, is_causal=is_causal, scale=scale, simthreshd1=simthreshd1,
                            cdfthreshd=cdfthreshd, pvthreshd=pvthreshd, smooth_k=smooth_k,
                            attention_sink=attention_sink, tensor_layout=tensor_layout,
                            output_dtype=output_dtype, return_sparsity=return_sparsity,
                            selection=selection, block_q=block_q, block_k=block_k)


def spas_sage2_attn_meansim_topk_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                      scale=None, smooth_k=True, simthreshd1=-0.1,
                                      cdfthreshd=None, topk=0.5, pvthreshd=15,
                                      attention_sink=False, tensor_layout="HND",
                                      output_dtype=None, return_sparsity=False, *,
                                      selection="sparge", block_q=None, block_k=None):
    """SpargeAttn with top-k selection: each query block keeps the ``topk`` fraction
    of its key blocks (seed name; runs on CPU and GPU).

    As in the original, exactly one of ``cdfthreshd`` and ``topk`` is set: pass
    ``cdfthreshd=..., topk=None`` for CDF selection under this name. Rules and block
    shape as in :func:`spas_sage2_attn_meansim_cuda`; see :func:`sparse_attention`.
    """
    _check_scalars(scale, output_dtype, attn_mask, dropout_p)
    if (cdfthreshd is None) == (topk is None):
        raise ValueError("spas_sage2_attn_meansim_topk_cuda: set exactly one of cdfthreshd and "
                         f"topk (as the original), got cdfthreshd={cdfthreshd!r}, topk={topk!r}")
    block_q, block_k = seed_block_shape(q.device if isinstance(q, Tensor) else "cpu",
                                        block_q, block_k)
    return sparse_attention(q, k, v, is_causal=is_causal, scale=scale, simthreshd1=simthreshd1,
                            cdfthreshd=cdfthreshd, topk=topk, pvthreshd=pvthreshd,
                            smooth_k=smooth_k, attention_sink=attention_sink,
                            tensor_layout=tensor_layout, output_dtype=output_dtype,
                            return_sparsity=return_sparsity, selection=selection,
                            block_q=block_q, block_k=block_k)


def spas_sage_attn_meansim_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                scale=None, smooth_k=True, simthreshd1=0.6, cdfthreshd=0.97,
                                pvthreshd=15, attention_sink=False, tensor_layout="HND",
                                output_dtype=None, return_sparsity=False, **options):
    """The SageAttention-1 flavour of :func:`spas_sage2_attn_meansim_cuda`; without
    quantization the two compute the same thing here."""
    return spas_sage2_attn_meansim_cuda(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                        smooth_k, simthreshd1, cdfthreshd, pvthreshd,
                                        attention_sink, tensor_layout, output_dtype,
                                        return_sparsity, **options)


def spas_sage_attn_meansim_topk_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, smooth_k=True, simthreshd1=-0.1,
                                     cdfthreshd=None, topk=0.5, pvthreshd=15,
                                     attention_sink=False, tensor_layout="HND",
                                     output_dtype=None, return_sparsity=False, **options):
    """The SageAttention-1 flavour of :func:`spas_sage2_attn_meansim_topk_cuda`."""
    return spas_sage2_attn_meansim_topk_cuda(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                             smooth_k, simthreshd1, cdfthreshd, topk, pvthreshd,
                                             attention_sink, tensor_layout, output_dtype,
                                             return_sparsity, **options)


def block_sparse_sage2_attn_cuda(q, k, v, mask_id=None, dropout_p=0.0, scale=None,
                                 smooth_k=True, pvthreshd=50, attention_sink=False,
                                 tensor_layout="HND", output_dtype=None, return_sparsity=False,
                                 is_causal=False, *, block_q=None, block_k=None):
    """Attention over a caller-given block mask (seed name; runs on CPU and GPU).

    Args:
        mask_id: 0/1 (or bool) tensor ``[B|1, H|1, ceil(Lq/block_q), ceil(Lk/block_k)]``;
            1 = compute the block. ``None`` computes every block (dense).
        block_q, block_k: the mask's block shape; default the original's per GPU
            architecture (64 x 128 on Hopper, 128 x 64 elsewhere, see
            :func:`seed_block_shape`).
        smooth_k: accepted for compatibility; the mask is given, so it changes nothing.
        attention_sink: also compute the first key block of every query block.
        is_causal: extension of the seed API: bottom-right causal masking inside blocks.
        Other arguments as in :func:`sparse_attention`.

    Example:
        >>> q = k = v = torch.randn(1, 1, 256, 64)
        >>> mask = torch.tensor([[[[1, 1, 0, 0], [0, 0, 1, 1]]]])
        >>> out, s = block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask, return_sparsity=True)
        >>> s
        0.5
    """
    _check_scalars(scale, output_dtype, None, dropout_p)
    q, k, v = to_hnd(q, k, v, tensor_layout)
    check_qkv(q, k, v)
    per_head_param(pvthreshd, "pvthreshd", q.shape[1], 0.0, math.inf, low_open=True)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    block_q, block_k = seed_block_shape(q.device, block_q, block_k)
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    nq, nk = math.ceil(lq / block_q), math.ceil(lk / block_k)
    if mask_id is None:
        keep = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=q.device)
    else:
        if not isinstance(mask_id, Tensor):
            raise ValueError(f"mask_id must be a tensor or None, got {type(mask_id).__name__}")
        if (mask_id.dim() != 4 or mask_id.shape[0] not in (1, b) or mask_id.shape[1] not in (1, h)
                or tuple(mask_id.shape[2:]) != (nq, nk)):
            raise ValueError(f"mask_id must have shape [B|1, H|1, {nq}, {nk}] (blocks of "
                             f"{block_q} query x {block_k} key rows for Lq={lq}, Lk={lk}), got "
                             f"{tuple(mask_id.shape)}")
        if mask_id.is_floating_point() or mask_id.is_complex():
            bad = ~((mask_id == 0) | (mask_id == 1))
        else:
            bad = (mask_id < 0) | (mask_id > 1) if mask_id.dtype != torch.bool else None
        if bad is not None and bool(bad.any()):
            raise ValueError("mask_id must hold only 0 and 1 (1 = compute the block), got "
                             f"{mask_id[bad].flatten()[0].item()}")
        keep = mask_id.to(device=q.device, dtype=torch.bool)
    if attention_sink:
        keep = keep.clone()
        keep[..., 0] = True
    block_map = BlockMap(keep, block_q, block_k, lq, lk, bool(is_causal)).expand_batch_heads(b, h)
    out = run_backend(q, k, v, block_map, scale=scale, out_dtype=output_dtype,
                      pvthreshd=pvthreshd)
    return _finish(out, block_map, tensor_layout, output_dtype, return_sparsity)
