"""FlexAttention backend: a ``BlockMask`` built straight from the kept-block lists.

``torch.nn.attention.flex_attention`` skips every block absent from the mask.
Blocks that need no element mask (fully inside the causal region and inside
the sequence) go in the "full" lists so they pay nothing for the mask
function; diagonal and partial blocks go in the partial lists with a mask_mod
that applies bottom-right causality and the true lengths. Inputs are padded
to whole blocks first, because KV lengths that are not a multiple of the
block size have had accuracy bugs upstream.

FlexAttention must be compiled to be fast (Triton on CUDA, C++ on CPU); the
compiled function is built once per process. On CPU the compiled kernel is
correct but slower than the ``cpu_kernel`` backend, so it is never chosen
there automatically.
"""

from __future__ import annotations

import functools
import math
import shutil

import torch
import torch.nn.functional as F
from torch import Tensor

from ..blockmap import BlockMap, block_full_map, shared_map

__all__ = ["available", "block_sparse_attention", "build_block_mask"]


@functools.lru_cache(maxsize=None)
def available(device: torch.device) -> bool:
    """True when FlexAttention can be compiled for ``device`` here."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available()
    if device.type == "cpu":
        return shutil.which("c++") is not None or shutil.which("g++") is not None
    return False


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # Static shapes: inductor's CPU flex template has failed to compile symbolic
    # shapes with a mask_mod that indexes a tensor. Past dynamo's recompile
    # limit torch runs FlexAttention eagerly, which stays correct because the
    # kept blocks are part of mask_mod (only slower).
    return torch.compile(flex_attention, dynamic=False)


def build_block_mask(block_map: BlockMap):
    """The ``BlockMask`` equal to ``block_map`` (padded lengths, bottom-right causal)."""
    from torch.nn.attention.flex_attention import BlockMask

    bq, bk = block_map.block_q, block_map.block_k
    lq, lk = block_map.q_len, block_map.k_len
    keep = block_map.keep
    device = keep.device
    full = shared_map(block_full_map, lq, lk, bq, bk, block_map.causal, device)
    # A block is "full" only if it has no padded rows or columns either.
    full = full.clone()
    if lk % bk:
        full[:, -1] = False
    if lq % bq:
        full[-1, :] = False
    keep_full = keep & full
    keep_partial = keep & ~full

    def lists(mask: Tensor) -> tuple[Tensor, Tensor]:
        counts = mask.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts.contiguous(), order.contiguous()

    offset = lk - lq
    causal = block_map.causal

    def mask_mod(b, h, q_idx, kv_idx):
        # The kept blocks are part of the mask itself: eager (uncompiled)
        # FlexAttention, which torch falls back to past its recompile limit,
        # applies mask_mod only and ignores the block lists.
        inside = keep[b, h, q_idx // bq, kv_idx // bk] & (kv_idx < lk) & (q_idx < lq)
        if causal:
            inside = inside & (kv_idx <= q_idx + offset)
        return inside

    partial_counts, partial_idx = lists(keep_partial)
    full_counts, full_idx = lists(keep_full)
    return BlockMask.from_kv_blocks(partial_counts, partial_idx, full_counts, full_idx,
                                    BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                    seq_lengths=(keep.shape[-2] * bq, keep.shape[-1] * bk))


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_map: BlockMap, *,
                           scale: float | None = None) -> Tensor:
    """Attention over ``block_map``'s kept blocks with compiled FlexAttention.

    Shapes as in :func:`creative_sparse.attention.reference.masked_attention`;
    fp32 compute on CPU, the input dtype (fp32 accumulation) on CUDA; returned
    in the compute dtype.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nq, nk = block_map.num_q_blocks, block_map.num_k_blocks
    work_dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    qp = F.pad(q.to(work_dtype), (0, 0, 0, nq * block_map.block_q - lq))
    kp = F.pad(k.to(work_dtype), (0, 0, 0, nk * block_map.block_k - lk))
    vp = F.pad(v.to(work_dtype), (0, 0, 0, nk * block_map.block_k - lk))
    mask = build_block_mask(block_map)
    # On CUDA the kernel's own tile must divide our blocks (its default key tile
    # can be 128, larger than our 64-row key blocks).
    options = {"BLOCK_N": min(64, block_map.block_k)} if q.device.type == "cuda" else None
    out = _compiled_flex()(qp, kp, vp, block_mask=mask, scale=scale,
                           enable_gqa=k.shape[1] != h, kernel_options=options)
    out = out[:, :, :lq]
    # Rows with no allowed key: FlexAttention leaves them at zero already; make it explicit.
    counts = block_map.keep.sum(dim=-1)
    if bool((counts == 0).any()):
        empty = (counts == 0).repeat_interleave(block_map.block_q, dim=-1)[..., :lq]
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out
