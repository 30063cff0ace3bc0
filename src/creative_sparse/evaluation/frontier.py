"""How far each setting lies from the dense samplers' frontier at its own NLL.

The report's verdict (:func:`~creative_sparse.evaluation.tables.frontier_verdicts`)
compares a setting only with baseline settings within 0.1 nats of its NLL, and asks
for intervals that do not overlap; with three temperatures per sampler there is often
no baseline that close, and two overlapping intervals can still hide a real paired
difference. This module gives the complementary reading:

* the **frontier** of a metric at NLL ``x`` is the best value any baseline sampler
  (``top_p``, ``min_p``) reaches there, each sampler's settings joined by straight lines
  in the (NLL, metric) plane (``numpy.interp`` between its two settings that bracket
  ``x``; no extrapolation: outside a sampler's NLL range it does not count);
* the **gap** of a setting is its mean minus that frontier, for novelty, diversity and
  relevance;
* its interval is a **paired** percentile bootstrap over prompts: each resample draws
  one set of prompts for every row of the task (the prompts all of them measured),
  recomputes every mean, the frontier and the gap.

A straight line between two settings lies *below* a concave frontier, so a positive
gap measured between far-apart baseline settings overstates the method's advantage;
the ``bracket`` (the NLLs of the nearest baseline settings on either side) says how far
apart they are, and the remedy is more baseline settings (``--setting``).

Example:
    >>> gaps = frontier_gaps(read_results("results.jsonl").records())    # doctest: +SKIP
    >>> [(g.method, g.setting, g.gaps["diversity"]) for g in gaps]        # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .tables import BASELINES, METHODS, Estimate, _fmt_estimate, _group, _row_rng, \
    per_prompt_values

__all__ = ["GAP_METRICS", "Gap", "format_gaps", "frontier_gaps", "write_gaps_csv"]

#: the metrics whose gap is measured (higher is better for each)
GAP_METRICS = ("novelty", "diversity", "relevance")
_USED = ("nll",) + GAP_METRICS


@dataclass(frozen=True)
class Gap:
    """One non-baseline setting against the frontier at its NLL.

    ``nll``: its mean NLL; ``bracket``: the NLLs of the nearest baseline settings below
    and above it (``None`` on a side with none); ``gaps``: metric -> :class:`Estimate`
    of its mean minus the frontier, or ``None`` where its NLL lies outside every
    sampler's range; ``prompts``: how many prompts (measured by every row) went in.
    """

    task: str
    method: str
    setting: float
    nll: float
    bracket: tuple[float | None, float | None]
    gaps: dict[str, Estimate | None]
    prompts: int

    @property
    def above(self) -> bool:
        """Above the frontier: novelty and diversity gaps with intervals wholly above 0,
        relevance's not wholly below."""
        g = self.gaps
        if any(g[m] is None or not math.isfinite(g[m].lo) for m in GAP_METRICS):
            return False
        return g["novelty"].lo > 0 and g["diversity"].lo > 0 and g["relevance"].hi >= 0


def _frontier(means: Mapping[tuple, np.ndarray], baselines: Mapping[str, list[tuple]],
              x: float) -> np.ndarray:
    """Per metric of :data:`GAP_METRICS`: the best baseline value at NLL ``x`` (NaN
    outside every sampler's range). ``means[key]`` is ``[nll, *GAP_METRICS]``."""
    best = np.full(len(GAP_METRICS), -np.inf)
    for keys in baselines.values():
        points = np.array([means[k] for k in keys if np.isfinite(means[k]).all()])
        if len(points) < 1:
            continue
        points = points[np.argsort(points[:, 0])]
        if not points[0, 0] <= x <= points[-1, 0]:
            continue
        for j in range(len(GAP_METRICS)):
            best[j] = max(best[j], np.interp(x, points[:, 0], points[:, j + 1]))
    return np.where(np.isfinite(best), best, np.nan)


def frontier_gaps(records: Sequence[Mapping[str, Any]], *, confidence: float = 0.95,
                  bootstrap: int = 2000, seed: int = 0) -> list[Gap]:
    """One :class:`Gap` per non-baseline (task, method, setting) of a results file's
    records (the module doc says how). Tasks without baseline rows give none.

    Raises:
        ValueError: as :func:`~creative_sparse.evaluation.tables.aggregate` for bad
            records, or a bad ``confidence``/``bootstrap``.
    """
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 1:
        raise ValueError(f"bootstrap must be an int >= 1, got {bootstrap!r}")
    groups, _ = _group(records)
    alpha = (1 - confidence) / 2
    out = []
    for task in dict.fromkeys(k[0] for k in groups):
        keys = [k for k in groups if k[0] == task]
        baselines = {b: [k for k in keys if k[1] == b] for b in BASELINES}
        baselines = {b: ks for b, ks in baselines.items() if ks}
        others = [k for k in keys if k[1] not in BASELINES]
        if not baselines or not others:
            continue
        shared = sorted(set.intersection(*(set(groups[k]) for k in keys)))
        values = {k: per_prompt_values({p: groups[k][p] for p in shared}, _USED) for k in keys}
        full = {k: np.nanmean(v, axis=1) for k, v in values.items()}
        base_nlls = sorted(full[k][0] for ks in baselines.values() for k in ks)
        rng = _row_rng(seed, ("frontier", task))
        idx = rng.integers(0, len(shared), (bootstrap, len(shared))) if len(shared) > 1 \
            else None
        with np.errstate(invalid="ignore"):
            resampled = {k: np.nanmean(v[:, idx], axis=2).T for k, v in values.items()} \
                if idx is not None else {}
        for key in others:
            x = full[key][0]
            point = full[key][1:] - _frontier(full, baselines, x)
            if idx is not None:
                draws = np.array([resampled[key][b, 1:] - _frontier(
                    {k: r[b] for k, r in resampled.items()}, baselines, resampled[key][b, 0])
                    for b in range(bootstrap)])
            gaps: dict[str, Estimate | None] = {}
            for j, metric in enumerate(GAP_METRICS):
                if not math.isfinite(point[j]):
                    gaps[metric] = None
                    continue
                lo = hi = math.nan
                if idx is not None and np.isfinite(draws[:, j]).mean() >= 0.5:
                    lo, hi = np.nanquantile(draws[:, j], [alpha, 1 - alpha])
                gaps[metric] = Estimate(float(point[j]), float(lo), float(hi))
            below = [n for n in base_nlls if n <= x]
            above = [n for n in base_nlls if n >= x]
            out.append(Gap(task, key[1], key[2], float(x),
                           (below[-1] if below else None, above[0] if above else None),
                           gaps, len(shared)))
    return out


def _fmt_gap(e: Estimate | None) -> str:
    if e is None:
        return "—"
    text = _fmt_estimate(e, 3).replace(f"{e.mean:.3f}", f"{e.mean:+.3f}", 1)
    return f"**{text}**" if (e.lo > 0 or e.hi < 0) else text


def format_gaps(gaps: Sequence[Gap], task: str) -> list[str]:
    """Markdown lines for one task: the gap table and a one-line reading."""
    rows = [g for g in gaps if g.task == task]
    if not rows:
        return []
    lines = ["**Gap to the sampling frontier at matched NLL** (each setting minus the best "
             "top-p or min-p value at its NLL, each sampler's settings joined by straight "
             f"lines; paired bootstrap over the {rows[0].prompts} prompts every row measured; "
             "bold: the interval excludes 0; — : outside the samplers' NLL range). A "
             "straight line lies below a concave frontier, so a gap between far-apart "
             "baseline settings (see the bracket) overstates the advantage.", "",
             "| method | setting | NLL | baseline NLLs around it | Δnovelty | Δdiversity | "
             "Δrelevance |", "|---|---|---:|---|---:|---:|---:|"]
    for g in rows:
        bracket = " / ".join("—" if b is None else f"{b:.2f}" for b in g.bracket)
        knob = "T" if METHODS[g.method][1] == "temperature" else "s"
        lines.append(f"| {METHODS[g.method][0]} | {knob}={g.setting:g} | {g.nll:.2f} | "
                     f"{bracket} | " + " | ".join(_fmt_gap(g.gaps[m]) for m in GAP_METRICS)
                     + " |")
    above = [f"{METHODS[g.method][0]} {'T' if METHODS[g.method][1] == 'temperature' else 's'}"
             f"={g.setting:g}" for g in rows if g.above]
    lines += ["", "Above the frontier (novelty and diversity gaps above 0, relevance's not "
              "below): " + (", ".join(above) if above else "none") + ".", ""]
    return lines


def write_gaps_csv(gaps: Sequence[Gap], path: str | os.PathLike) -> Path:
    """One line per gap: task, method, setting, nll, bracket, each metric's mean, lo, hi."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "method", "setting", "nll", "bracket_below", "bracket_above",
                         "prompts"] + [f"{m}_gap{s}" for m in GAP_METRICS
                                       for s in ("", "_lo", "_hi")] + ["above"])
        for g in gaps:
            cells = [g.task, g.method, g.setting, g.nll, *g.bracket, g.prompts]
            for m in GAP_METRICS:
                e = g.gaps[m]
                cells += ["", "", ""] if e is None else [e.mean, e.lo, e.hi]
            writer.writerow(cells + [g.above])
    return path
