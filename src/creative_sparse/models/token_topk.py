"""The decode-time path of the ``"creative_sparse"`` attention: the dial's knobs to the
token top-k op (:func:`creative_sparse.attention.token_topk.token_topk_attention`).

This module is glue only: it reads :class:`~creative_sparse.models.transformers.AttentionKnobs`
(keep fraction, sinks, window, per-row noise and seeds, dense reference rows), calls the op
with the layer's index as the sub-network layer, adds the computed and dense pair counts
to the live statistics and, for H2O cache pruning, the attention mass each key received.
"""

from __future__ import annotations

from torch import Tensor

from ..attention.token_topk import token_topk_attention

__all__ = ["token_topk"]


def _record_key_mass(active, module, probs: Tensor) -> None:
    """H2O bookkeeping: add the attention mass each key received (over heads and queries)."""
    if not (active.track_key_mass and getattr(module, "layer_idx", None) is not None):
        return
    mass = probs.sum(dim=(1, 2))                                        # [B, k_len]
    prev = active.stats.key_mass.get(module.layer_idx)
    if prev is not None and prev.shape[-1] <= mass.shape[-1]:
        mass[:, : prev.shape[-1]] += prev
    active.stats.key_mass[module.layer_idx] = mass


def token_topk(module, query, key, value, attention_mask, scaling, active) -> Tensor:
    """Token top-k attention of one transformers attention ``module``; ``[B, H, q, Dv]`` fp32.

    ``active`` carries ``knobs`` (:class:`AttentionKnobs`), ``stats``
    (:class:`AttentionStats`, updated) and ``track_key_mass``.
    """
    knobs = active.knobs
    result = token_topk_attention(
        query, key, value, keep_fraction=knobs.keep_fraction, sink_tokens=knobs.sink_tokens,
        local_window=knobs.local_window, attention_mask=attention_mask, scale=scaling,
        noise=knobs.noise, row_seeds=knobs.row_seeds,
        layer=int(getattr(module, "layer_idx", 0) or 0), dense_rows=knobs.dense_rows)
    active.stats.add(pairs_computed=result.pairs_computed, pairs_dense=result.pairs_dense)
    _record_key_mass(active, module, result.weights)
    return result.out
