"""Pure-PyTorch block-sparse backend: works on any device, no compiler needed.

It loops over query blocks; for each, it gathers the kept key blocks of every
(batch, head) into one padded batch and computes exact softmax attention over
them. Unkept blocks are never touched, so the cost scales with the kept
fraction, but the gather and the per-block Python loop make it slower than the
compiled kernel: it is the fallback where no compiler exists.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..blockmap import BlockMap
from ..reference import compute_dtype, softmax_attend

__all__ = ["block_sparse_attention"]


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_map: BlockMap, *,
                           scale: float | None = None) -> Tensor:
    """Attention over ``block_map``'s kept blocks; computed and returned in fp32, or in
    fp64 when an input is fp64 (:func:`~creative_sparse.attention.reference.compute_dtype`).

    Shapes as in :func:`creative_sparse.attention.reference.masked_attention`.
    """
    b, h, lq, d = q.shape
    h_kv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    # A key block longer than the sequence is the one block of all lk keys: pad to
    # that, not to block_k (4096 keys of padding for 129 keys was 30x the work).
    bq, bk = block_map.block_q, min(block_map.block_k, lk)
    nq, nk = block_map.num_q_blocks, block_map.num_k_blocks
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    pad = nk * bk - lk
    head_map = torch.arange(h, device=q.device) // (h // h_kv)
    # [B, H, nk, bk, D]: GQA heads resolved once, keys padded to whole blocks.
    dtype = compute_dtype(q, k, v)
    kb = F.pad(k.to(dtype), (0, 0, 0, pad)).index_select(1, head_map).view(b, h, nk, bk, d)
    vb = F.pad(v.to(dtype), (0, 0, 0, pad)).index_select(1, head_map).view(b, h, nk, bk, dv)
    counts, indices = block_map.kv_indices()
    out = torch.zeros(b, h, lq, dv, dtype=dtype, device=q.device)
    bi = torch.arange(b, device=q.device).view(b, 1, 1)
    hi = torch.arange(h, device=q.device).view(1, h, 1)
    offsets = torch.arange(bk, device=q.device)
    for qb in range(nq):
        width = int(counts[:, :, qb].max())
        if width == 0:
            continue
        ids = indices[:, :, qb, :width].long()                      # [B, H, w]
        keys = kb[bi, hi, ids].reshape(b, h, width * bk, d)
        vals = vb[bi, hi, ids].reshape(b, h, width * bk, dv)
        r0, r1 = qb * bq, min((qb + 1) * bq, lq)
        scores = torch.matmul(q[:, :, r0:r1].to(dtype), keys.transpose(-1, -2)) * scale
        key_pos = (ids.unsqueeze(-1) * bk + offsets).reshape(b, h, 1, width * bk)
        slot = torch.arange(width, device=q.device).repeat_interleave(bk)
        allowed = (slot.view(1, 1, 1, -1) < counts[:, :, qb].view(b, h, 1, 1)) & (key_pos < lk)
        if block_map.causal:
            q_pos = torch.arange(r0, r1, device=q.device).view(1, 1, -1, 1) + (lk - lq)
            allowed = allowed & (key_pos <= q_pos)
        out[:, :, r0:r1] = softmax_attend(scores, allowed, vals)
    return out
