"""The methods of the evaluation protocol: each one's knob, default settings and display name.

One table for the runner (what to run) and the report (how to label and check it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = ["METHODS", "Method"]


@dataclass(frozen=True)
class Method:
    """A method of the comparison: its knob and the default settings swept."""

    id: str
    knob: str
    settings: tuple[float, ...]
    label: str


METHODS: Mapping[str, Method] = {m.id: m for m in (
    Method("top_p", "temperature", (0.7, 1.0, 1.3), "Dense top-p"),
    Method("min_p", "temperature", (0.7, 1.0, 1.5), "Min-p"),
    Method("fixed", "level", (0.3, 0.6, 0.9), "Fixed Sparse"),
    Method("progressive", "level", (0.3, 0.6, 0.9), "Progressive"),
    Method("adaptive", "level", (0.3, 0.6, 0.9), "Adaptive"),
    Method("moe_only", "level", (0.3, 0.6, 0.9), "MoE-Only"),
    Method("creative_sparse", "level", (0.3, 0.6, 0.9), "Creative-Sparse"),
)}
