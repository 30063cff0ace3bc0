"""What every decoding strategy returns (:mod:`~creative_sparse.generation.strategies`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import GenerationStats

__all__ = ["StrategyResult"]


@dataclass
class StrategyResult:
    """The candidates of one strategy on one prompt, and their cost; ``safety``: what
    the content checks of
    :class:`~creative_sparse.generation.creative_strategy.CreativeSparse` counted
    (``drafts``, ``flagged_drafts``, ``outputs`` refined, ``flagged_outputs`` before
    repair, ``repaired``, ``dropped``, ``withheld``: the reason or None), None
    elsewhere."""

    name: str
    texts: list[str]
    stats: GenerationStats = field(default_factory=GenerationStats)
    safety: dict | None = None
