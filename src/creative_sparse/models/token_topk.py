"""Token-level top-k attention: the decode-time path of the ``"creative_sparse"`` attention.

Each query keeps the ``keep_fraction`` of its visible keys with the highest
scores, always with ``sink_tokens`` first tokens and a ``local_window`` of recent
ones. With ``noise > 0`` and ``row_seeds``, Gumbel noise fixed per (seed, layer,
head, key) perturbs the selection, so each batch row explores its own attention
sub-network, reproducibly. Grouped-query attention is computed without repeating
K/V (the query heads that share a KV head are stacked along the query axis), and
a decode step without a mask takes a short path with a scalar budget.

Called by :func:`creative_sparse.models.transformers.creative_sparse_attention`;
``active`` is its context (knobs, statistics, whether to record key mass).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["token_topk"]


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


def _key_noise(seed: int, layer: int, heads: int, k_len: int) -> Tensor:
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
    """Noise ``[B, heads, 1, k_len]`` for batch rows with ``seeds`` (see :func:`_key_noise`).

    The stacked rows are kept per (seeds, layer), so a decode step slices them."""
    span = math.ceil(k_len / _NOISE_CHUNK) * _NOISE_CHUNK
    key = (tuple(int(s) for s in seeds), layer, heads, span, str(device))
    noise = _stacked_noise.get(key)
    if noise is None:
        if len(_stacked_noise) > 256:          # bound the memory of long-running processes
            _stacked_noise.clear()
        noise = _stacked_noise[key] = torch.stack(
            [_key_noise(s, layer, heads, span) for s in seeds])[:, :, None].to(device)
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


def _with_noise(select: Tensor, knobs, module) -> Tensor:
    """Add the rows' sub-network noise to the selection scores (when the knobs ask)."""
    if knobs.noise <= 0 or knobs.row_seeds is None:
        return select
    b, h, _, k_len = select.shape
    if len(knobs.row_seeds) != b:
        raise ValueError(f"AttentionKnobs.row_seeds has {len(knobs.row_seeds)} seeds for a "
                         f"batch of {b} rows; give one seed per row")
    layer = int(getattr(module, "layer_idx", 0) or 0)
    return select + knobs.noise * _gumbel(knobs.row_seeds, layer, h, k_len, select.device)


def _dense_rows(knobs, batch: int) -> tuple[int, ...]:
    if knobs.dense_rows and max(knobs.dense_rows) >= batch:
        raise ValueError(f"AttentionKnobs.dense_rows {knobs.dense_rows} outside a batch of "
                         f"{batch} rows")
    return knobs.dense_rows


def _record_key_mass(active, module, probs: Tensor) -> None:
    """H2O bookkeeping: add the attention mass each key received (over heads and queries)."""
    if not (active.track_key_mass and getattr(module, "layer_idx", None) is not None):
        return
    mass = probs.sum(dim=(1, 2))                                        # [B, k_len]
    prev = active.stats.key_mass.get(module.layer_idx)
    if prev is not None and prev.shape[-1] <= mass.shape[-1]:
        mass[:, : prev.shape[-1]] += prev
    active.stats.key_mass[module.layer_idx] = mass


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


def _decode_topk(module, query, key, value, scaling, active) -> Tensor:
    """:func:`_token_topk` for one query per row and no mask (a decode step): every key
    is visible, so the budget is one number and the kept count needs no counting."""
    knobs, stats = active.knobs, active.stats
    b, h = query.shape[:2]
    k_len = key.shape[2]
    scores = _grouped_scores(query, key, scaling)                       # [B, H, 1, k]
    budget = min(k_len, max(math.ceil(k_len * knobs.keep_fraction),
                            knobs.sink_tokens + knobs.local_window))
    dense = _dense_rows(knobs, b)
    if budget < k_len:
        select = _with_noise(scores, knobs, module).masked_fill(
            _decode_forced(k_len, knobs.sink_tokens, knobs.local_window, query.device),
            float("inf"))
        chosen = torch.topk(select, budget, dim=-1, sorted=False).indices
        keep = torch.zeros_like(select, dtype=torch.bool).scatter_(-1, chosen, True)
        if dense:
            keep[list(dense)] = True
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    stats.add(pairs_computed=h * (k_len * len(dense) + budget * (b - len(dense))),
              pairs_dense=b * h * k_len)
    _record_key_mass(active, module, probs)
    return _grouped_attend(probs, value)


def token_topk(module, query, key, value, attention_mask, scaling, active) -> Tensor:
    """Token-level top-k attention; returns ``[B, H, q, Dv]`` in fp32.

    Each query keeps the ``keep_fraction`` of its visible keys with the highest
    (noisy) scores, the sinks and the recent window always among them.
    ``active`` carries ``knobs`` (:class:`AttentionKnobs`), ``stats``
    (:class:`AttentionStats`, updated) and ``track_key_mass``.
    """
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    if attention_mask is None and q_len == 1:
        return _decode_topk(module, query, key, value, scaling, active)
    knobs, stats = active.knobs, active.stats
    scores = _grouped_scores(query, key, scaling)
    allowed = _allowed_from_mask(attention_mask, q_len, k_len, query.device)  # [B|1,1,q,k]
    allowed = allowed.expand(b, h, q_len, k_len)
    visible = allowed.sum(dim=-1, keepdim=True)                              # [B, H, q, 1]
    budget = torch.minimum(torch.clamp(torch.ceil(visible * knobs.keep_fraction),
                                       min=min(k_len, knobs.sink_tokens + knobs.local_window)),
                           visible)
    select = _with_noise(scores.masked_fill(~allowed, float("-inf")), knobs, module)
    # Sinks and the recent window always win the selection.
    positions = torch.arange(k_len, device=query.device)
    last = (torch.arange(q_len, device=query.device) + (k_len - q_len)).view(1, 1, -1, 1)
    forced = (positions < knobs.sink_tokens) | (positions > last - knobs.local_window)
    select = select.masked_fill(forced & allowed, float("inf"))
    most = int(budget.max())
    chosen = torch.topk(select, most, dim=-1, sorted=True).indices          # [B, H, q, most]
    within = torch.arange(most, device=query.device) < budget               # row budgets
    keep = torch.zeros_like(allowed).scatter_(-1, chosen, within) & allowed
    dense = _dense_rows(knobs, b)
    if dense:
        keep[list(dense)] = allowed[list(dense)]
    # A row with no kept key (fully masked) gets zero weights, not NaN.
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num_(0.0)
    stats.add(pairs_computed=keep.sum(), pairs_dense=visible.sum())   # no host sync
    _record_key_mass(active, module, weights)
    return _grouped_attend(weights, value)
