"""Token-level top-k attention: each query attends only its highest-scoring keys.

Each query keeps the ``keep_fraction`` of its visible keys with the highest
scores, always with ``sink_tokens`` first tokens and a ``local_window`` of recent
ones. With ``noise > 0`` and ``row_seeds``, Gumbel noise fixed per (seed, layer,
head, key) perturbs the selection, so each batch row explores its own attention
sub-network, reproducibly (:func:`subnetwork_noise`). Grouped-query attention is
computed without repeating K/V (the query heads that share a KV head are stacked
along the query axis), and a decode step without a mask takes a short path with a
scalar budget.

:func:`creative_sparse.attention.reference.token_topk_reference` is the plain
per-query version it is tested against. The transformers integration
(:mod:`creative_sparse.models.token_topk`) turns the dial's knobs into these
arguments and keeps the statistics.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["TokenTopkResult", "budget_for", "subnetwork_noise", "token_topk_attention"]


class TokenTopkResult(NamedTuple):
    """What :func:`token_topk_attention` returns.

    Attributes:
        out: ``[B, H, q, Dv]`` fp32 attention output.
        weights: ``[B, H, q, k]`` fp32 attention weights (zero on dropped keys).
        pairs_computed: (query, key) pairs kept, summed over batch and heads (an int
            or a 0-dim tensor, so no host sync is forced).
        pairs_dense: visible pairs, i.e. what dense attention would compute.
    """

    out: Tensor
    weights: Tensor
    pairs_computed: int | Tensor
    pairs_dense: int | Tensor


def budget_for(visible: int, keep_fraction: float, sink_tokens: int, local_window: int) -> int:
    """Keys one query keeps out of ``visible``: ``ceil(keep_fraction * visible)``, at
    least ``sink_tokens + local_window``, at most ``visible``.

    >>> budget_for(90, 0.4, 2, 6), budget_for(10, 0.1, 4, 32)
    (36, 10)
    """
    return min(visible, max(math.ceil(visible * keep_fraction), sink_tokens + local_window))


def _allowed_from_mask(attention_mask: Tensor | None, q_len: int, k_len: int,
                       device) -> Tensor:
    """Bool ``[B|1, 1, q, k]`` of allowed pairs: the model's mask, or bottom-right causal."""
    if attention_mask is None:
        rows = torch.arange(q_len, device=device).view(-1, 1) + (k_len - q_len)
        return (torch.arange(k_len, device=device).view(1, -1) <= rows).view(1, 1, q_len, k_len)
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    return attention_mask[..., :k_len] > torch.finfo(attention_mask.dtype).min / 2


_NOISE_CHUNK = 1024
_noise_cache: dict[tuple[int, int, int], Tensor] = {}


def subnetwork_noise(seed: int, layer: int, heads: int, k_len: int) -> Tensor:
    """Gumbel noise ``[heads, k_len]`` fixed per (seed, layer, head, key position).

    One draw per key, kept for the whole generation: each seed is one consistent
    sub-network (a fixed random preference over the keys), and a decode step costs
    a slice, not a fresh random draw. Drawn in chunks of 1024 positions.
    """
    chunks = []
    for c in range(math.ceil(k_len / _NOISE_CHUNK)):
        key = (int(seed), layer, heads * 1_000_003 + c)
        noise = _noise_cache.get(key)
        if noise is None:
            if len(_noise_cache) > 4096:       # bound the memory of long-running processes
                _noise_cache.clear()
            # A fixed arithmetic mix (not hash()), so a seed means the same noise everywhere.
            mix = ((int(seed) * 1_000_003 + layer) * 1_000_003 + heads) * 1_000_003 + c
            gen = torch.Generator().manual_seed(mix & 0x7FFF_FFFF_FFFF)
            u = torch.rand((heads, _NOISE_CHUNK), generator=gen).clamp_(1e-9, 1 - 1e-9)
            noise = _noise_cache[key] = -torch.log(-torch.log(u))
        chunks.append(noise)
    return torch.cat(chunks, dim=-1)[:, :k_len]


_stacked_noise: dict[tuple, Tensor] = {}


def _gumbel(seeds: Sequence[int], layer: int, heads: int, k_len: int, device) -> Tensor:
    """Noise ``[B, heads, 1, k_len]`` for batch rows with ``seeds`` (see :func:`subnetwork_noise`).

    The stacked rows are kept per (seeds, layer), so a decode step slices them."""
    span = math.ceil(k_len / _NOISE_CHUNK) * _NOISE_CHUNK
    key = (tuple(int(s) for s in seeds), layer, heads, span, str(device))
    noise = _stacked_noise.get(key)
    if noise is None:
        if len(_stacked_noise) > 256:          # bound the memory of long-running processes
            _stacked_noise.clear()
        noise = _stacked_noise[key] = torch.stack(
            [subnetwork_noise(s, layer, heads, span) for s in seeds])[:, :, None].to(device)
    return noise[..., :k_len]


def _grouped_scores(query: Tensor, key: Tensor, scaling: float) -> Tensor:
    """fp32 scores ``[B, H, q, k]`` without repeating K: the ``group`` query heads that
    share a KV head are stacked along the query axis (``[B, H_kv, group * q, D]``)."""
    b, h, q_len, d = query.shape
    h_kv, k_len = key.shape[1], key.shape[2]
    scores = torch.matmul(query.float().reshape(b, h_kv, h // h_kv * q_len, d),
                          key.float().transpose(-1, -2)).mul_(scaling)
    return scores.view(b, h, q_len, k_len)


def _grouped_attend(probs: Tensor, value: Tensor) -> Tensor:
    """``probs [B, H, q, k] @ value [B, H_kv, k, Dv]`` -> ``[B, H, q, Dv]`` (fp32)."""
    b, h, q_len, k_len = probs.shape
    h_kv = value.shape[1]
    out = torch.matmul(probs.reshape(b, h_kv, h // h_kv * q_len, k_len), value.float())
    return out.view(b, h, q_len, -1)


def _with_noise(select: Tensor, noise: float, row_seeds, layer: int) -> Tensor:
    """Add the rows' sub-network noise to the selection scores (when asked)."""
    if noise <= 0 or row_seeds is None:
        return select
    b, h, _, k_len = select.shape
    if len(row_seeds) != b:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for a batch of {b} rows; "
                         "give one seed per row")
    return select + noise * _gumbel(row_seeds, layer, h, k_len, select.device)


def _dense_rows(dense_rows: Sequence[int], batch: int) -> tuple[int, ...]:
    dense_rows = tuple(int(r) for r in dense_rows)
    if dense_rows and (max(dense_rows) >= batch or min(dense_rows) < 0):
        raise ValueError(f"dense_rows {dense_rows} outside a batch of {batch} rows")
    return dense_rows


_forced_cache: dict[tuple, Tensor] = {}


def _decode_forced(k_len: int, sinks: int, window: int, device) -> Tensor:
    """Bool ``[k_len]``: the sink tokens and the recent window of a one-query step."""
    key = (k_len, sinks, window, str(device))
    forced = _forced_cache.get(key)
    if forced is None:
        if len(_forced_cache) > 4096:
            _forced_cache.clear()
        positions = torch.arange(k_len, device=device)
        forced = _forced_cache[key] = (positions < sinks) | (positions >= k_len - window)
    return forced


def _decode_topk(query, key, value, scale, keep_fraction, sinks, window, noise, row_seeds,
                 layer, dense_rows) -> TokenTopkResult:
    """:func:`token_topk_attention` for one query per row and no mask (a decode step):
    every key is visible, so the budget is one number and the kept count needs no counting."""
    b, h = query.shape[:2]
    k_len = key.shape[2]
    scores = _grouped_scores(query, key, scale)                         # [B, H, 1, k]
    budget = budget_for(k_len, keep_fraction, sinks, window)
    dense = _dense_rows(dense_rows, b)
    if budget < k_len:
        select = _with_noise(scores, noise, row_seeds, layer).masked_fill(
            _decode_forced(k_len, sinks, window, query.device), float("inf"))
        chosen = torch.topk(select, budget, dim=-1, sorted=False).indices
        keep = torch.zeros_like(select, dtype=torch.bool).scatter_(-1, chosen, True)
        if dense:
            keep[list(dense)] = True
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return TokenTopkResult(_grouped_attend(probs, value), probs,
                           h * (k_len * len(dense) + budget * (b - len(dense))), b * h * k_len)


def token_topk_attention(query: Tensor, key: Tensor, value: Tensor, *, keep_fraction: float,
                         sink_tokens: int = 4, local_window: int = 32,
                         attention_mask: Tensor | None = None, scale: float | None = None,
                         noise: float = 0.0, row_seeds: Sequence[int] | None = None,
                         layer: int = 0, dense_rows: Sequence[int] = ()) -> TokenTopkResult:
    """Token-level top-k attention.

    Each query keeps :func:`budget_for` of its visible keys: the sinks and the
    recent window first, then the highest (noisy) scores; softmax runs over the kept
    keys only.

    Args:
        query: ``[B, H, q, D]``; key ``[B, H_kv, k, D]``, value ``[B, H_kv, k, Dv]``,
            ``H % H_kv == 0``.
        keep_fraction: in (0, 1]: the fraction of visible keys each query keeps.
        sink_tokens, local_window: the first and the most recent keys every query keeps
            (the window counts back from the query's own position).
        attention_mask: bool (True = visible) or additive float mask broadcastable to
            ``[B, 1, q, k]``; ``None`` is bottom-right causal (query ``i`` sees keys
            ``j <= i + k - q``).
        scale: score scale, default ``1 / sqrt(D)``.
        noise, row_seeds, layer: with ``noise > 0`` and one seed per batch row, the
            selection scores get ``noise *`` :func:`subnetwork_noise` of that row's
            seed and ``layer``; the attention weights themselves are not perturbed.
        dense_rows: batch rows that keep every visible key (reference rows).

    Returns:
        :class:`TokenTopkResult`. A query with no visible key gets zero weights.

    Example:
        >>> q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
        >>> r = token_topk_attention(q, k, v, keep_fraction=0.25, sink_tokens=1, local_window=2)
        >>> r.out.shape, int(r.pairs_computed), int(r.pairs_dense)
        (torch.Size([1, 4, 5, 8]), 196, 760)
    """
    b, h, q_len, d = query.shape
    if key.dim() != 4 or value.dim() != 4 or key.shape[0] != b or key.shape[1] == 0 \
            or h % key.shape[1] or value.shape[:3] != key.shape[:3] or key.shape[3] != d:
        raise ValueError(f"token_topk_attention: shapes q {tuple(query.shape)}, k "
                         f"{tuple(key.shape)}, v {tuple(value.shape)}; expected q [B, H, q, D], "
                         "k [B, H_kv, k, D], v [B, H_kv, k, Dv] with H % H_kv == 0")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if sink_tokens < 0 or local_window < 0:
        raise ValueError(f"sink_tokens and local_window must be >= 0, got {sink_tokens}, "
                         f"{local_window}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k_len = key.shape[2]
    if attention_mask is None and q_len == 1:
        return _decode_topk(query, key, value, scale, keep_fraction, sink_tokens, local_window,
                            noise, row_seeds, layer, dense_rows)
    scores = _grouped_scores(query, key, scale)
    allowed = _allowed_from_mask(attention_mask, q_len, k_len, query.device)  # [B|1,1,q,k]
    allowed = allowed.expand(b, h, q_len, k_len)
    visible = allowed.sum(dim=-1, keepdim=True)                              # [B, H, q, 1]
    budget = torch.minimum(torch.clamp(torch.ceil(visible * keep_fraction),
                                       min=min(k_len, sink_tokens + local_window)),
                           visible)
    select = _with_noise(scores.masked_fill(~allowed, float("-inf")), noise, row_seeds, layer)
    # Sinks and the recent window always win the selection.
    positions = torch.arange(k_len, device=query.device)
    last = (torch.arange(q_len, device=query.device) + (k_len - q_len)).view(1, 1, -1, 1)
    forced = (positions < sink_tokens) | (positions > last - local_window)
    select = select.masked_fill(forced & allowed, float("inf"))
    most = int(budget.max())
    chosen = torch.topk(select, most, dim=-1, sorted=True).indices          # [B, H, q, most]
    within = torch.arange(most, device=query.device) < budget               # row budgets
    keep = torch.zeros_like(allowed).scatter_(-1, chosen, within) & allowed
    dense = _dense_rows(dense_rows, b)
    if dense:
        keep[list(dense)] = allowed[list(dense)]
    # A row with no kept key (fully masked) gets zero weights, not NaN.
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num_(0.0)
    return TokenTopkResult(_grouped_attend(weights, value), weights,
                           keep.sum(), visible.sum())                        # no host sync
