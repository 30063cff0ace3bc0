"""Which pair a rater judges next: pure functions, no database.

A *pair* is two methods on one prompt of one task, unordered:
``"poetry/3/creative_sparse|top_p"`` (:func:`pair_key`). The concrete outputs shown
(which setting, seed and output of each method) are drawn when the pair is served.

:func:`choose_pair` spreads judgements evenly: among the pairs the rater has not seen,
it takes those judged (or being judged) least often, then those whose method pair
within the task is least covered, then those whose prompt is least covered, and
draws one of the remaining at random. A rater never sees the same pair twice.
"""

from __future__ import annotations

import random
from collections import Counter
from itertools import combinations
from typing import Iterable, Mapping

__all__ = ["all_pairs", "choose_pair", "pair_key", "split_pair_key"]


def pair_key(task: str, prompt_index: int, method_a: str, method_b: str) -> str:
    """The key of an unordered pair: ``pair_key("poetry", 3, "top_p", "fixed")`` is
    ``"poetry/3/fixed|top_p"``.

        >>> pair_key("poetry", 3, "top_p", "fixed")
        'poetry/3/fixed|top_p'
    """
    if method_a == method_b:
        raise ValueError(f"a pair needs two different methods, got {method_a!r} twice")
    a, b = sorted((method_a, method_b))
    return f"{task}/{prompt_index}/{a}|{b}"


def split_pair_key(key: str) -> tuple[str, int, str, str]:
    """``"poetry/3/fixed|top_p"`` -> ``("poetry", 3, "fixed", "top_p")``."""
    task, prompt, methods = key.rsplit("/", 2)
    a, b = methods.split("|")
    return task, int(prompt), a, b


def all_pairs(methods_by_prompt: Mapping[tuple[str, int], Iterable[str]]) -> list[str]:
    """Every pair key: each two different methods of each ``(task, prompt_index)``."""
    return sorted(pair_key(task, prompt, a, b)
                  for (task, prompt), methods in methods_by_prompt.items()
                  for a, b in combinations(sorted(set(methods)), 2))


def choose_pair(pairs: Iterable[str], counts: Mapping[str, int], seen: set[str],
                rng: random.Random) -> str | None:
    """The next pair for a rater, or ``None`` when the rater has seen every pair.

    Args:
        pairs: every pair key (:func:`all_pairs`).
        counts: how often each pair was judged or is being judged, by all raters.
        seen: the pairs this rater was already served.
        rng: draws among equally covered pairs.
    """
    pairs = list(pairs)
    by_methods: Counter = Counter()
    by_prompt: Counter = Counter()
    for key in pairs:
        task, prompt, a, b = split_pair_key(key)
        n = counts.get(key, 0)
        by_methods[(task, a, b)] += n
        by_prompt[(task, prompt)] += n

    def cover(key: str) -> tuple[int, int, int]:
        task, prompt, a, b = split_pair_key(key)
        return counts.get(key, 0), by_methods[(task, a, b)], by_prompt[(task, prompt)]

    open_pairs = [k for k in pairs if k not in seen]
    if not open_pairs:
        return None
    least = min(cover(k) for k in open_pairs)
    return rng.choice(sorted(k for k in open_pairs if cover(k) == least))
