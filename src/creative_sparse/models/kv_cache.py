"""KV cache for many drafts: prefill once, repeat per row, prune low-attention tokens.

* :func:`prefill` runs the prompt once and repeats the cache for ``num_rows``
  drafts (``DynamicCache.batch_repeat_interleave``): the prompt's keys and
  values are computed once, not N times. Several prompts of one length can be
  prefilled together (``[R, L]``).
* :func:`prune_cache` evicts the cached tokens that received the least
  attention (accumulated attention mass, H2O style, recorded by
  :func:`creative_sparse.models.transformers.sparsity` with
  ``track_key_mass=True``), always keeping ``sink_tokens`` first tokens and a
  ``local_window`` of recent ones. Keys are stored with their rotary position
  already applied, so evicting from the middle is safe, but later tokens must
  be fed with explicit positions: :class:`CachePositions` tracks, per row, the
  true position of the next token and the cache length.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CachePositions", "cache_bytes", "cache_kwargs", "cache_length", "prefill",
           "prune_cache", "returned_cache"]


@dataclass
class CachePositions:
    """Where the next token goes: its true position (for RoPE) and its cache slot.

    ``next_position`` counts every token seen (pruned or not); ``cache_len`` is
    the number of cached tokens (the cache index of the next token).
    """

    next_position: int
    cache_len: int

    def model_kwargs(self, num_new: int, batch: int, device=None) -> dict:
        """``position_ids`` and ``cache_position`` for a forward over ``num_new`` tokens."""
        positions = torch.arange(self.next_position, self.next_position + num_new, device=device)
        return {"position_ids": positions.unsqueeze(0).expand(batch, -1),
                "cache_position": torch.arange(self.cache_len, self.cache_len + num_new,
                                               device=device)}

    def advance(self, num_new: int) -> None:
        self.next_position += num_new
        self.cache_len += num_new


@functools.lru_cache(maxsize=64)
def _cache_keyword(model_type: type) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model.forward``: transformers 5.x names the KV cache
    ``cache`` (``past_key_values`` is deprecated there), earlier versions
    ``past_key_values``."""
    return {_cache_keyword(type(model)): cache}


def returned_cache(output):
    """The KV cache a forward or ``generate`` output carries (``cache`` in transformers 5.x,
    ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_bytes(cache) -> int:
    """Memory held by the cached keys and values, in bytes (all layers and rows)."""
    return sum(layer.keys.numel() * layer.keys.element_size()
               + layer.values.numel() * layer.values.element_size() for layer in cache.layers)


def cache_length(cache) -> int:
    """Number of cached tokens (same for every layer and row)."""
    return cache.get_seq_length()


@torch.no_grad()
def prefill(model, input_ids: Tensor, num_rows: int = 1):
    """Run ``R`` prompts ``[R, L]`` once and return ``(cache, last_logits, positions)``
    for ``num_rows`` rows (a multiple of ``R``: each prompt is repeated
    ``num_rows // R`` times, consecutively).

    ``last_logits`` is ``[num_rows, vocab]`` (the next-token logits, repeated);
    the cache holds the prompts for every row. Prompts of one call share a length
    (no padding).

    Example:
        >>> cache, logits, pos = prefill(model, tokenizer("Hi", return_tensors="pt").input_ids, 4)  # doctest: +SKIP
    """
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"prefill expects non-empty prompts of shape [R, L], got "
                         f"{tuple(input_ids.shape)}")
    if not isinstance(num_rows, int) or num_rows < 1 or num_rows % input_ids.shape[0]:
        raise ValueError(f"num_rows must be an int >= 1 and a multiple of the "
                         f"{input_ids.shape[0]} prompt(s), got {num_rows!r}")
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, use_cache=True, **cache_kwargs(model, cache))
    cache = returned_cache(out)
    repeats = num_rows // input_ids.shape[0]
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
    length = input_ids.shape[1]
    logits = out.logits[:, -1].repeat_interleave(repeats, dim=0)
    return cache, logits, CachePositions(next_position=length, cache_len=length)


@torch.no_grad()
def prune_cache(cache, key_mass: dict[int, Tensor], positions: CachePositions, *,
                max_tokens: int, sink_tokens: int = 4, local_window: int = 32) -> int:
    """Evict the lowest-attention tokens so that at most ``max_tokens`` stay cached.

    Args:
        cache: a ``DynamicCache`` (rows ``[B, H_kv, T, D]`` per layer).
        key_mass: per layer index, ``[B, T']`` accumulated attention each cached
            token received (``T' <= T``; tokens not yet scored count as recent).
            Pruned in place along with the cache.
        positions: updated (``cache_len``) in place.
        max_tokens: cache budget; must exceed ``sink_tokens + local_window``.
        sink_tokens, local_window: always kept.

    Returns:
        The number of tokens evicted per row (0 when within budget).
    """
    if sink_tokens < 0 or local_window < 0:
        raise ValueError(f"sink_tokens and local_window must be >= 0, got {sink_tokens}, "
                         f"{local_window}")
    if max_tokens <= sink_tokens + local_window:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed sink_tokens + local_window "
                         f"({sink_tokens} + {local_window})")
    total = cache_length(cache)
    if total <= max_tokens:
        return 0
    for idx, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        b = keys.shape[0]
        mass = torch.zeros(b, total, dtype=torch.float32, device=keys.device)
        seen = key_mass.get(idx)
        if seen is not None:
            mass[:, : seen.shape[-1]] = seen[:, :total].float()
        protected = torch.zeros(total, dtype=torch.bool, device=keys.device)
        protected[:sink_tokens] = True
        protected[max(total - local_window, 0):] = True
        if seen is not None:  # tokens that no query has scored yet are recent: keep them
            protected[seen.shape[-1]:] = True
        score = mass.masked_fill(protected, float("inf"))
        keep = torch.topk(score, max_tokens, dim=-1).indices.sort(dim=-1).values  # [B, max]
        gather = keep.view(b, 1, -1, 1)
        layer.keys = keys.gather(2, gather.expand(-1, keys.shape[1], -1, keys.shape[-1]))
        layer.values = values.gather(2, gather.expand(-1, values.shape[1], -1,
                                                      values.shape[-1]))
        if seen is not None:
            key_mass[idx] = mass.gather(1, keep)
    positions.cache_len = max_tokens
    return total - max_tokens
