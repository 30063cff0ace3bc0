"""Dense and masked attention in plain PyTorch, computed in fp32 (fp64 for fp64 inputs): the oracle.

Everything else in :mod:`creative_sparse.attention` is tested against these
functions. They favour being obviously right over being fast, but process the
query rows in chunks so that they stay usable as a baseline at long lengths.

Conventions (shared by every backend):

* Tensors are ``[B, H, L, D]``. ``k``/``v`` may have fewer heads than ``q``
  (grouped-query attention, ``H % H_kv == 0``); query head ``h`` reads KV head
  ``h // (H // H_kv)``.
* ``causal=True`` with ``q_len != k_len`` treats the queries as the *last*
  ``q_len`` positions of the key sequence (bottom-right alignment, as in
  FlashAttention and in decoding): query ``i`` sees keys ``j <= i + k_len - q_len``.
  Note that ``torch.nn.functional.scaled_dot_product_attention`` aligns top-left
  instead; the two agree when ``q_len == k_len``.
* A query row that is allowed no key at all (possible with a block mask, or with
  ``causal`` and ``q_len > k_len``) returns zeros, never NaN.
* The computation is fp32, or fp64 when any input is fp64 (:func:`compute_dtype`),
  so fp64 inputs keep fp64's range (scores up to ~1.8e308, not fp32's 3.4e38).
  The result has the dtype of ``q`` unless ``output_dtype`` says otherwise; the
  ``"reference"`` backend asks for the compute dtype, so the one rounding to the
  caller's dtype happens last, as in every backend.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["dense_attention", "masked_attention", "causal_token_mask", "compute_dtype",
           "expand_kv_heads", "softmax_attend", "token_topk_keep", "token_topk_reference"]

# Query rows per chunk: bounds the fp32 score matrix to chunk x k_len per head.
_ROW_CHUNK = 1024


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 when any of ``tensors`` is fp64, else fp32: the dtype attention is computed in.

    Example:
        >>> compute_dtype(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1))
        torch.float32
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def expand_kv_heads(x: Tensor, num_heads: int) -> Tensor:
    """Repeat KV heads ``[B, H_kv, L, D]`` to ``[B, num_heads, L, D]`` (GQA)."""
    h_kv = x.shape[1]
    if h_kv == num_heads:
        return x
    return x.repeat_interleave(num_heads // h_kv, dim=1)


def causal_token_mask(q_len: int, k_len: int, device=None) -> Tensor:
    """Bool ``[q_len, k_len]``: True where query ``i`` may see key ``j`` (bottom-right causal)."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (k_len - q_len)
    cols = torch.arange(k_len, device=device).unsqueeze(0)
    return cols <= rows


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *,
                     causal: bool = False, scale: float | None = None,
                     output_dtype: torch.dtype | None = None) -> Tensor:
    """Attention restricted to the True entries of a token mask, in fp32 (fp64 if an
    input is fp64).

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, H_kv, Lk, D]``.
        v: ``[B, H_kv, Lk, Dv]``.
        mask: bool, broadcastable to ``[B, H, Lq, Lk]``; True = attend. ``None``
            means every key.
        causal: also apply the bottom-right causal mask.
        scale: score multiplier; default ``1 / sqrt(D)``.
        output_dtype: dtype of the result; default ``q.dtype``.

    Returns:
        ``[B, H, Lq, Dv]`` in ``output_dtype``; rows with no allowed key are zero.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dtype = compute_dtype(q, k, v)
    kf = expand_kv_heads(k, h).to(dtype)
    vf = expand_kv_heads(v, h).to(dtype)
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=dtype, device=q.device)
    full_causal = causal_token_mask(lq, lk, q.device) if causal else None
    if mask is not None:
        mask = mask.expand(b, h, lq, lk)
    for start in range(0, lq, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, lq)
        scores = torch.matmul(q[:, :, start:stop].to(dtype), kf.transpose(-1, -2)) * scale
        allowed = torch.ones_like(scores, dtype=torch.bool)
        if mask is not None:
            allowed = allowed & mask[:, :, start:stop]
        if full_causal is not None:
            allowed = allowed & full_causal[start:stop]
        out[:, :, start:stop] = softmax_attend(scores, allowed, vf)
    return out.to(output_dtype or q.dtype)


def softmax_attend(scores: Tensor, allowed: Tensor, values: Tensor, *,
                   return_weights: bool = False):
    """``softmax(scores over allowed keys) @ values``; rows with no allowed key give zeros.

    Args:
        scores: fp32 or fp64 ``[..., Lq, Lk]`` (already scaled).
        allowed: bool, broadcastable to ``scores``.
        values: ``[..., Lk, Dv]`` in the dtype of ``scores``.
        return_weights: also return the attention probabilities ``[..., Lq, Lk]``
            (zero rows where nothing is allowed).
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # A row with nothing allowed has max -inf; pin it to 0 so exp gives 0, not NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    inv = torch.where(denom > 0, 1.0 / denom.clamp_min(torch.finfo(denom.dtype).tiny),
                      torch.zeros_like(denom))
    out = torch.matmul(weights, values) * inv
    return (out, weights * inv) if return_weights else out


def dense_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                    scale: float | None = None, output_dtype: torch.dtype | None = None
                    ) -> Tensor:
    """Exact softmax attention in fp32 (fp64 if an input is fp64); see
    :func:`masked_attention` for shapes and arguments.

    Example:
        >>> q = torch.randn(1, 9, 63, 64); kv = torch.randn(1, 3, 63, 64)
        >>> dense_attention(q, kv, kv, causal=True).shape
        torch.Size([1, 9, 63, 64])
    """
    return masked_attention(q, k, v, None, causal=causal, scale=scale,
                            output_dtype=output_dtype)


def token_topk_keep(query: Tensor, key: Tensor, *, keep_fraction: float, sink_tokens: int = 4,
                    local_window: int = 32, attention_mask: Tensor | None = None,
                    scale: float | None = None, noise: float = 0.0,
                    row_seeds: Sequence[int] | None = None, layer: int = 0,
                    dense_rows: Sequence[int] = ()) -> Tensor:
    """Bool ``[B, H, q, k]``: the keys each query keeps under token top-k, one query at a time.

    The obvious reading of :func:`creative_sparse.attention.token_topk.token_topk_attention`
    (same arguments): among the visible keys, the sinks (``j < sink_tokens``) and the
    recent window (``j > i + k - q - local_window``) first, then the highest selection
    scores (``q·k * scale``, in fp32, plus ``noise *`` the row seed's sub-network
    noise), :func:`~creative_sparse.attention.token_topk.budget_for` keys in all; a
    dense row keeps every visible key.
    """
    from .token_topk import budget_for, subnetwork_noise

    b, h, q_len, d = query.shape
    k_len = key.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = expand_kv_heads(key.float(), h)
    if attention_mask is None:
        allowed = causal_token_mask(q_len, k_len).expand(b, h, q_len, k_len)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :k_len].expand(b, h, q_len, k_len)
    else:
        floor = torch.finfo(attention_mask.dtype).min / 2
        allowed = (attention_mask[..., :k_len] > floor).expand(b, h, q_len, k_len)
    keep = torch.zeros(b, h, q_len, k_len, dtype=torch.bool)
    for row in range(b):
        extra = (noise * subnetwork_noise(row_seeds[row], layer, h, k_len)
                 if noise > 0 and row_seeds is not None else torch.zeros(h, k_len))
        for head in range(h):
            for i in range(q_len):
                visible = [j for j in range(k_len) if allowed[row, head, i, j]]
                if row in dense_rows:
                    keep[row, head, i, visible] = True
                    continue
                position = i + k_len - q_len
                forced = [j for j in visible
                          if j < sink_tokens or j > position - local_window]
                select = (keys[row, head] @ query[row, head, i].float()) * scale + extra[head]
                others = sorted((j for j in visible if j not in forced),
                                key=lambda j: -float(select[j]))
                budget = budget_for(len(visible), keep_fraction, sink_tokens, local_window)
                keep[row, head, i, forced + others[: max(0, budget - len(forced))]] = True
    return keep


def token_topk_reference(query: Tensor, key: Tensor, value: Tensor, **kwargs) -> Tensor:
    """Token top-k attention in fp64 over the keys of :func:`token_topk_keep` (same
    keyword arguments); ``[B, H, q, Dv]``, zeros for a query with no visible key."""
    keep = token_topk_keep(query, key, **kwargs)
    return masked_attention(query.double(), key.double(), value.double(), keep,
                            scale=kwargs.get("scale"))
