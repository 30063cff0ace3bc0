"""Input validation shared by the public attention functions.

Every check raises ``ValueError`` naming the argument, the offending value and
what is allowed.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["MAX_BLOCK_SIZE", "check_block_size", "check_kv_lists_layout", "check_kv_lists_values",
           "check_qk", "check_qkv", "check_scale", "to_hnd"]

MAX_BLOCK_SIZE = 4096
"""Largest ``block_q`` / ``block_k`` accepted anywhere (32 times SpargeAttn's 128 x 64).

A block is the unit the prediction pools and keeps; past a few thousand rows one
block is most of a typical sequence and the map says little. The bound keeps each
backend's per-block buffers (up to ``block_q`` x ``block_k`` scores per thread) to
tens of MiB whatever a caller or a tuned-parameters file asks for.
"""


def _check_tensor(name: str, t, layout: str = "HND") -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without data), shape "
                         f"{tuple(t.shape)}; allowed: a tensor with data (cpu, cuda, ...)")
    if t.layout != torch.strided or t.is_nested:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}"
                         f"{' (nested)' if t.is_nested else ''}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions ({layout}), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def to_hnd(q: Tensor, k: Tensor, v: Tensor, tensor_layout: str) -> tuple[Tensor, Tensor, Tensor]:
    """Validate ``tensor_layout`` and the ranks/dtypes; return ``[B, H, L, D]`` views."""
    if tensor_layout not in ("HND", "NHD"):
        raise ValueError(f"tensor_layout must be 'HND' ([B, H, L, D]) or 'NHD' ([B, L, H, D]), "
                         f"got {tensor_layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, tensor_layout)
    if tensor_layout == "NHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q, k, v


def check_qk(q: Tensor, k: Tensor) -> None:
    """``q`` ``[B, H, Lq, D]`` and ``k`` ``[B, H_kv, Lk, D]``: ranks, dtypes, batch, heads, D, sizes."""
    _check_tensor("q", q)
    _check_tensor("k", k)
    b, h, lq, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}")
    if k.shape[-1] != d:
        raise ValueError(f"head_dim of k ({k.shape[-1]}) must equal head_dim of q ({d})")
    if min(b, h, lq, d) < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}; every dimension must be at least 1")
    if min(k.shape) < 1:
        raise ValueError(f"empty input: k {tuple(k.shape)}; every dimension must be at least 1")
    if h % k.shape[1] != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads "
                         f"({k.shape[1]}) for grouped-query attention")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """:func:`check_qk` plus ``v`` ``[B, H_kv, Lk, Dv]``."""
    check_qk(q, k)
    _check_tensor("v", v)
    if v.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same heads and length, got k "
                         f"[H_kv={k.shape[1]}, L={k.shape[2]}], v [H_kv={v.shape[1]}, "
                         f"L={v.shape[2]}]")
    if v.shape[-1] < 1:
        raise ValueError(f"empty input: v {tuple(v.shape)}; every dimension must be at least 1")
    if v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_scale(scale) -> None:
    """``scale`` is None or a positive finite real number (NumPy scalars included)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def check_block_size(name: str, value) -> None:
    """Raise ``ValueError`` unless ``value`` is an int in ``[1, MAX_BLOCK_SIZE]``.

    The one check for a block size wherever it enters (:func:`predict_block_map`,
    :class:`BlockMap`, tuned-parameter files). ``name`` is the argument as the
    caller knows it, e.g. ``"block_q"`` or ``"SparseParams.block_k"``.

    Example:
        >>> check_block_size("block_q", 128)
        >>> check_block_size("block_q", 2**40)
        Traceback (most recent call last):
        ValueError: block_q must be a positive int, got 1099511627776; allowed: 1 to 4096
    """
    if (isinstance(value, bool) or not isinstance(value, int) or value < 1
            or value > MAX_BLOCK_SIZE):
        raise ValueError(f"{name} must be a positive int, got {value!r}; allowed: 1 to "
                         f"{MAX_BLOCK_SIZE}")


def check_kv_lists_layout(keep: Tensor, kv_lists) -> None:
    """``kv_lists`` of a :class:`~creative_sparse.attention.BlockMap` is a pair of int32
    tensors ``counts [B, H, nq]``, ``indices [B, H, nq, nk]`` on ``keep``'s device, and
    ``keep`` is bool. Reads no tensor data."""
    if not (isinstance(kv_lists, (tuple, list)) and len(kv_lists) == 2
            and all(isinstance(t, Tensor) for t in kv_lists)):
        raise ValueError(f"BlockMap: kv_lists must be a pair of tensors (counts, indices) "
                         f"or None, got {type(kv_lists).__name__}")
    counts, indices = kv_lists
    if keep.dtype != torch.bool:
        raise ValueError(f"BlockMap: with kv_lists, keep must be a bool tensor, got {keep.dtype}")
    for name, t in (("counts", counts), ("indices", indices)):
        if t.dtype != torch.int32 or t.device != keep.device:
            raise ValueError(f"BlockMap: kv_lists {name} must be int32 on keep's device "
                             f"({keep.device}), got {t.dtype} on {t.device}")
    if tuple(counts.shape) != tuple(keep.shape[:-1]) or indices.shape != keep.shape:
        raise ValueError(f"BlockMap: kv_lists must be counts {tuple(keep.shape[:-1])} "
                         f"and indices {tuple(keep.shape)}; got {tuple(counts.shape)} "
                         f"and {tuple(indices.shape)}")


def check_kv_lists_values(keep: Tensor, counts: Tensor, indices: Tensor,
                          valid: Tensor | None) -> None:
    """The lists name exactly the kept blocks: each row's first ``counts`` indices are
    its kept key blocks, each once; every index, padding included, is in ``[0, nk)``.
    ``valid`` (bool ``[nq, nk]``, under causal masking) holds the blocks ``keep`` may
    keep. Vectorised: a range reduction, one scatter, a compare; the positions of a
    failure are looked up only to name them."""
    nk = keep.shape[-1]

    def first(bad: Tensor) -> list[int]:
        return [int(i) for i in bad.nonzero()[0]]

    for name, t, high in (("counts", counts, nk), ("indices", indices, nk - 1)):
        if t.numel() == 0:
            continue
        low_high = torch.stack(torch.aminmax(t)).tolist()  # one read, one host copy
        if low_high[0] < 0 or low_high[1] > high:
            at = first((t < 0) | (t > high))
            what = "key blocks per row" if name == "counts" else "key blocks, padding included"
            raise ValueError(f"BlockMap: kv_lists {name} must be in [0, {high}] ({what}), "
                             f"got {int(t[tuple(at)])} at {at}")
    listed = torch.arange(nk, device=keep.device) < counts.unsqueeze(-1)
    # How often each key block is listed: 1 where keep is True, 0 elsewhere.
    hits = torch.zeros(keep.shape, dtype=torch.int32, device=keep.device)
    hits.scatter_add_(-1, indices.long(), listed.to(torch.int32))
    if not torch.equal(hits, keep.to(torch.int32)):
        at = first(hits != keep)
        row, block, n = at[:-1], at[-1], int(hits[tuple(at)])
        if n > 1:
            why = f"lists key block {block} {n} times; each kept block must appear once"
        elif n == 1:
            why = f"lists key block {block}, which keep does not keep"
        else:
            why = (f"lists {int(counts[tuple(row)])} blocks without key block {block}, "
                   f"which keep keeps")
        raise ValueError(f"BlockMap: kv_lists must list exactly the kept blocks; row {row} "
                         f"(batch, head, query block) {why}")
    if valid is not None:
        bad = keep & ~valid
        if bool(bad.any()):
            raise ValueError(f"BlockMap: with kv_lists, keep must not keep a block causal "
                             f"masking removes entirely; got one at {first(bad)} (allowed: "
                             f"the True entries of valid())")


def check_output_dtype(output_dtype) -> None:
    if output_dtype is not None and not (isinstance(output_dtype, torch.dtype)
                                         and output_dtype.is_floating_point):
        raise ValueError(f"output_dtype must be a floating torch.dtype or None, got "
                         f"{output_dtype!r}")
