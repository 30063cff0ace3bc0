"""Set-level choices over embeddings: how many distinct answers, which k to keep.

Example:
    >>> import torch
    >>> distinct_answers(torch.eye(3)[[0, 0, 1]], 0.9)
    2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .metrics import _check_embeddings

__all__ = ["distinct_answers", "select_set"]


def distinct_answers(outputs: torch.Tensor, threshold: float = 0.0) -> int:
    """Number of classes of "the same answer" among unit rows ``outputs [N, d]``.

    Greedy partition, as NoveltyBench's distinct-k: each output joins the first
    class whose first member has cosine >= ``threshold`` with it, else opens a new
    class. ``threshold`` defaults to `DISTINCT_THRESHOLD` in `QualityFunctional`.

    Example:
        >>> distinct_answers(torch.eye(3)[[0, 0, 1]], 0.9)
        2
    """
    outputs = _check_embeddings(outputs, "outputs")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine in [-1, 1], got {threshold}")
    heads: list[int] = []
    sims = outputs @ outputs.T
    for i in range(outputs.shape[0]):
        if not any(sims[i, h] >= threshold for h in heads):
            heads.append(i)
    return len(heads)


def select_set(own: Sequence[float], diversity_weight: float, distance: torch.Tensor,
               relevance: Sequence[float], valid: Sequence[bool], k: int) -> list[int]:
    """Greedy choice of ``k`` items for quality and mutual diversity together.

    Item ``i``'s gain is ``own[i] + diversity_weight * relevance[i] * d_i``, where
    ``d_i`` is its mean ``distance`` to the items already chosen (for the first
    choice, to all the others): the Q of the chosen set, grown one item at a time,
    in the spirit of maximal marginal relevance. Valid items come before any invalid
    one. Returns indices in the order chosen.

    Example:
        >>> d = torch.tensor([[0.0, 0.01, 0.4], [0.01, 0.0, 0.4], [0.4, 0.4, 0.0]])
        >>> select_set([0.4, 0.39, 0.3], 0.3, d, [1, 1, 1], [True] * 3, 2)
        [0, 2]
    """
    n = len(own)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    chosen: list[int] = []
    while len(chosen) < k:
        best, best_key = -1, None
        for i in range(n):
            if i in chosen:
                continue
            others = chosen if chosen else [j for j in range(n) if j != i]
            spread = float(distance[i, others].mean()) if others else 0.0
            key = (bool(valid[i]), own[i] + diversity_weight * relevance[i] * spread)
            if best_key is None or key > best_key:
                best, best_key = i, key
        chosen.append(best)
    return chosen
