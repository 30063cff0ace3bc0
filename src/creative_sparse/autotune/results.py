"""Sweep plans and results: how a budget is spent, what a sweep measured, and its verdict."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import QualityWeights
from .goldilocks import BootstrapResult, CorollaryBounds, GoldilocksFit

__all__ = ["LevelRow", "Measurements", "OptimumNotIdentifiedWarning", "SweepFailedError",
           "SweepPlan", "SweepResult", "plan_sweep"]

REFERENCE_PROMPTS, REFERENCE_SAMPLES, REFERENCE_LEVELS, REFERENCE_TOKENS = 8, 6, 7, 64
REFERENCE_PROMPTS, REFERENCE_SAMPLES, REFERENCE_LEVELS, REFERENCE_TOKENS = 8, 6, 7, 64
REFERENCE_COST = REFERENCE_PROMPTS * REFERENCE_SAMPLES * REFERENCE_LEVELS * REFERENCE_TOKENS
MIN_PROMPTS, MIN_SAMPLES, MIN_LEVELS = 2, 2, 3
MAX_SAMPLES, MAX_LEVELS = 16, 21
N_BOOTSTRAP = 200
_GOLDEN = (3 - math.sqrt(5)) / 2          # 0.382: golden-section step into the larger side
_CACHE_FORMAT = 1


class OptimumNotIdentifiedWarning(UserWarning):
    """The sweep did not identify a unique interior s*; the message says what was returned."""


class SweepFailedError(RuntimeError):
    """Every generation or scoring of the sweep failed; the message holds the first error."""


@dataclass(frozen=True)
class SweepPlan:
    """How a budget is spent: prompts x samples x levels (``coarse`` of them on the
    first grid, the rest golden-section steps) x ``max_new_tokens``."""

    prompts: int
    samples: int
    levels: int
    coarse: int
    max_new_tokens: int
    budget: float

    @property
    def cost(self) -> int:
        """Sampled tokens at most (greedy references and scoring come on top)."""
        return self.prompts * self.samples * self.levels * self.max_new_tokens


def plan_sweep(compute_budget: float, max_new_tokens: int, available_prompts: int, *,
               fixed_levels: int | None = None) -> SweepPlan:
    """Spend ``compute_budget`` (1.0 = ``REFERENCE_COST`` sampled tokens) on a sweep.

    Example:
        >>> plan_sweep(1.0, 64, 16)
        SweepPlan(prompts=8, samples=6, levels=7, coarse=5, max_new_tokens=64, budget=1.0)
        >>> plan_sweep(0.01, 64, 16)
        Traceback (most recent call last):
        ...
        ValueError: compute_budget = 0.01 is too small: the minimum is 0.0358 (2 prompts x 2 samples x 3 levels x 64 tokens = 768 of the reference 21504 sampled tokens)
    """
    if isinstance(compute_budget, bool) or not isinstance(compute_budget, numbers.Real) \
            or not math.isfinite(compute_budget) or compute_budget <= 0:
        raise ValueError(f"compute_budget must be a finite number > 0 (1.0 = the reference cost "
                         f"of {REFERENCE_COST} sampled tokens), got {compute_budget!r}")
    budget = float(compute_budget)
    units = budget * REFERENCE_COST / max_new_tokens          # prompt x sample x level cells
    g_min = fixed_levels or MIN_LEVELS
    p_min = min(MIN_PROMPTS, available_prompts)
    minimum = p_min * MIN_SAMPLES * g_min
    if units < minimum - 1e-9:
        raise ValueError(
            f"compute_budget = {budget:g} is too small: the minimum is "
            f"{math.ceil(minimum * max_new_tokens / REFERENCE_COST * 1e4) / 1e4:g} ({p_min} prompts "
            f"x {MIN_SAMPLES} samples x {g_min} levels x {max_new_tokens} tokens = "
            f"{minimum * max_new_tokens} of the reference {REFERENCE_COST} sampled tokens)")
    f = (units / (REFERENCE_PROMPTS * REFERENCE_SAMPLES * REFERENCE_LEVELS)) ** (1 / 3)
    g = fixed_levels or min(MAX_LEVELS, max(MIN_LEVELS, round(REFERENCE_LEVELS * f)))
    p = min(available_prompts, max(p_min, round(REFERENCE_PROMPTS * f)))
    n = min(MAX_SAMPLES, max(MIN_SAMPLES, math.floor(units / (p * g))))
    while p * n * g > units + 1e-9:  # the minimums overshot: give back what costs least to lose
        if n > MIN_SAMPLES:
            n -= 1
        elif g > g_min and g >= p:
            g -= 1
        else:
            p -= 1
    coarse = g if fixed_levels else max(MIN_LEVELS, g - g // 3)
    return SweepPlan(p, n, g, coarse, max_new_tokens, budget)



@dataclass(frozen=True)
class Measurements:
    """Per-prompt means over the samples, ``[P][G]`` (NaN where the point failed), at
    ``levels`` (sorted); ``examples``: the first output of the first prompt per level;
    ``flagged``: the share of samples a safety checker flagged, ``[P][G]``, or empty
    when the sweep ran without one (``sweep_sparsity(safety=...)``)."""

    levels: tuple[float, ...]
    novelty: tuple[tuple[float, ...], ...]
    diversity: tuple[tuple[float, ...], ...]
    incoherence: tuple[tuple[float, ...], ...]
    violations: tuple[tuple[float, ...], ...]
    examples: tuple[str, ...]
    errors: tuple[str, ...]
    flagged: tuple[tuple[float, ...], ...] = ()

    def means(self, weights: QualityWeights) -> dict[str, np.ndarray]:
        """Means over prompts per level: novelty, diversity, incoherence, violations, q."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN level: stays NaN
            out = {k: np.nanmean(np.asarray(getattr(self, k), float), axis=0)
                   for k in ("novelty", "diversity", "incoherence", "violations")}
            out["flagged"] = (np.nanmean(np.asarray(self.flagged, float), axis=0) if self.flagged
                              else np.full(len(self.levels), np.nan))
        w = weights
        out["q"] = w.alpha * out["novelty"] + w.beta * out["diversity"] - w.gamma * out["incoherence"]
        return out


@dataclass(frozen=True)
class LevelRow:
    """One level of the table: means over prompts with bootstrap intervals ``(lo, hi)``."""

    s: float
    novelty: float
    novelty_ci: tuple[float, float]
    diversity: float
    diversity_ci: tuple[float, float]
    incoherence: float
    incoherence_ci: tuple[float, float]
    q: float
    q_ci: tuple[float, float]
    violations: float
    prompts_ok: int
    flagged: float | None = None   # share of samples flagged; None: no checker in the sweep


@dataclass(frozen=True)
class SweepResult:
    """A sweep of Q(s) on one task split, the Goldilocks fit and the chosen s*.

    ``s_star`` is the fitted argmax when ``method == "fit"``, else the measured
    optimum (``"measured"``) or the best level (``"argmax"``, flat Q); ``s_star_ci``
    its bootstrap interval; ``warnings`` say why s* is not identified, if so.
    """

    task: str
    split: str
    model: str
    plan: SweepPlan
    weights: QualityWeights
    seed: int
    measurements: Measurements
    fit: GoldilocksFit | None
    bootstrap: BootstrapResult | None
    s_star: float
    s_star_ci: tuple[float, float] | None
    method: str
    s_star_measured: float
    warnings: tuple[str, ...]
    runtime_s: float
    from_cache: bool = False

    @property
    def identified(self) -> bool:
        """Whether the fit identified a unique interior s*."""
        return self.method == "fit"

    @property
    def bounds(self) -> CorollaryBounds | None:
        """Corollary-1 bounds of the fit (None without a fit or when A1 fails)."""
        return self.fit.bounds if self.fit is not None else None

    @property
    def table(self) -> tuple[LevelRow, ...]:
        """One :class:`LevelRow` per measured level, in order of s."""
        m = self.measurements
        means = m.means(self.weights)
        ok = np.isfinite(np.asarray(m.novelty, float)).sum(axis=0)
        b = self.bootstrap
        nan2 = (math.nan, math.nan)
        rows = []
        for g, s in enumerate(m.levels):
            ci = {k: getattr(b, k)[g] if b is not None else nan2
                  for k in ("novelty", "diversity", "incoherence", "q")}
            rows.append(LevelRow(s, float(means["novelty"][g]), ci["novelty"],
                                 float(means["diversity"][g]), ci["diversity"],
                                 float(means["incoherence"][g]), ci["incoherence"],
                                 float(means["q"][g]), ci["q"], float(means["violations"][g]),
                                 int(ok[g]),
                                 float(means["flagged"][g]) if m.flagged else None))
        return tuple(rows)

    def row(self, s: float) -> LevelRow | None:
        """The table row measured at level ``s`` (within 1e-6), or None."""
        return next((r for r in self.table if abs(r.s - s) < 1e-6), None)

    def format_table(self) -> str:
        """The table and the verdict as text."""
        from .report import format_sweep
        return format_sweep(self)

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG: measured N, D, I, Q over s with intervals, the fit, s* and the
        bounds. Needs matplotlib (``pip install 'creative-sparse[plots]'``)."""
        from .report import plot_sweep
        return plot_sweep(self, Path(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepResult":
        """Inverse of :meth:`to_dict`, type- and range-checked: ``ValueError`` naming
        the field, its value and what is allowed (a cache file may be damaged)."""
        result = _revive(cls, data, "result")
        _check_result(result)
        return result


_METHODS = ("fit", "measured", "argmax")


def _revive(tp: Any, value: Any, where: str) -> Any:
    """Rebuild a (nested, frozen) dataclass value from its ``asdict`` form, checking
    every value against its annotation (bools are only bools, ints not bools, a
    fixed-length tuple has its length). ``where`` names the field in errors."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} = {_short(value)}, expected an object ({tp.__name__})")
        hints = typing.get_type_hints(tp)
        fields = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                fields[f.name] = _revive(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}.{f.name} is missing")
        try:
            return tp(**fields)
        except (TypeError, ValueError) as err:   # the dataclass's own checks
            raise ValueError(f"{where}: {err}") from None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _revive(inner[0], value, where) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} = {_short(value)}, expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_revive(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where} = {_short(value)}, expected a list of {len(args)}")
        return tuple(_revive(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where} = {_short(value)}, expected a number")
        return float(value)
    if tp in (int, bool, str):
        if type(value) is not tp:
            raise ValueError(f"{where} = {_short(value)}, expected a JSON "
                             f"{ {int: 'integer', bool: 'boolean', str: 'string'}[tp]}")
        return value
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_result(r: SweepResult) -> None:
    """The ranges a consumer of a :class:`SweepResult` relies on (``ValueError``)."""
    def unit(name: str, value: float) -> None:
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"result.{name} = {value!r}, expected a finite number in [0, 1]")

    unit("s_star", r.s_star)
    unit("s_star_measured", r.s_star_measured)
    if r.s_star_ci is not None:
        unit("s_star_ci[0]", r.s_star_ci[0])
        unit("s_star_ci[1]", r.s_star_ci[1])
        if r.s_star_ci[0] > r.s_star_ci[1]:
            raise ValueError(f"result.s_star_ci = {r.s_star_ci}, expected lo <= hi")
    if r.method not in _METHODS:
        raise ValueError(f"result.method = {r.method!r}, expected one of {', '.join(_METHODS)}")
    if not (math.isfinite(r.runtime_s) and r.runtime_s >= 0):
        raise ValueError(f"result.runtime_s = {r.runtime_s!r}, expected a finite number >= 0")
    plan = r.plan
    for name in ("prompts", "samples", "levels", "coarse", "max_new_tokens"):
        if getattr(plan, name) < 1:
            raise ValueError(f"result.plan.{name} = {getattr(plan, name)!r}, expected >= 1")
    if not (math.isfinite(plan.budget) and plan.budget > 0):
        raise ValueError(f"result.plan.budget = {plan.budget!r}, expected a finite number > 0")
    m = r.measurements
    if not m.levels:
        raise ValueError("result.measurements.levels is empty")
    for i, s in enumerate(m.levels):
        unit(f"measurements.levels[{i}]", s)
    for name, low in (("novelty", -math.inf), ("diversity", -math.inf),
                      ("incoherence", -math.inf), ("violations", 0.0)):
        rows = getattr(m, name)
        if not rows or any(len(row) != len(m.levels) for row in rows):
            raise ValueError(f"result.measurements.{name} must be [prompts][{len(m.levels)} "
                             f"levels], got {[len(row) for row in rows]} levels per prompt")
        allowed = "a finite number" + ("" if low == -math.inf else f" >= {low:g}")
        for i, row in enumerate(rows):
            for g, v in enumerate(row):   # NaN marks a failed point
                if not math.isnan(v) and not (math.isfinite(v) and v >= low):
                    raise ValueError(f"result.measurements.{name}[{i}][{g}] = {v!r}, expected "
                                     f"NaN (a failed point) or {allowed}")
    if m.flagged and (len(m.flagged) != len(m.novelty) or any(
            len(row) != len(m.levels) for row in m.flagged) or any(
            not math.isnan(v) and not 0.0 <= v <= 1.0 for row in m.flagged for v in row)):
        raise ValueError("result.measurements.flagged must be empty or [prompts][levels] of "
                         "rates in [0, 1] (NaN for a failed point)")
    if r.fit is not None:
        unit("fit.s_star", r.fit.s_star)
