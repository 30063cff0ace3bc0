"""The report over an evaluation results file: per-task tables, CSV, frontier plots.

The runner (:mod:`creative_sparse.evaluation.runner`) appends one JSON record per line
(format ``creative-sparse/evaluation-results``, version 1): a header, the dense greedy
``reference`` answers (not used here) and one ``unit`` per (task, prompt, method,
setting, seed) holding its outputs' metrics, set metrics and costs. This module works on
the parsed records:

* :func:`aggregate` -> one :class:`Row` per (task, method, setting);
* :func:`format_markdown` -> a table per task and a one-line frontier verdict;
* :func:`write_csv` -> the same rows, every field, one line each;
* :func:`plot_frontiers` -> per task, diversity and novelty against NLL;
* :func:`runtime_summary` -> the units' own time, in all and per task.

:mod:`creative_sparse.evaluation.frontier` adds each setting's gap to the samplers'
frontier at its own NLL, with paired intervals.

**Means and intervals are over prompts.** A unit's value is the mean over its outputs
(``q``, ``novelty``, ``incoherence``, ``relevance``, ``nll``, ``rep3``) or its set value
(``diversity``, ``distinct``, ``pass_at_k``, ``pass_rate``, ``valid_rate``, ``flagged``)
or its cost (``flops``, ``wall_time``, ``peak_kv_bytes``). A prompt's value is the mean
of its units (over seeds); the row's value is the mean over prompts, each prompt counted
once however many seeds or outputs it has. The interval is a percentile cluster
bootstrap: resample the prompts with replacement ``bootstrap`` times and take the
``(1 - confidence) / 2`` quantiles of the resampled means. It is deterministic given
``seed`` (each row draws from its own generator, seeded by ``seed`` and the row's key,
so adding a task does not move another task's intervals); with one prompt it is
``(nan, nan)``. A null or NaN value means "not measured" and is skipped at every level;
a metric measured nowhere in a row is ``None`` (``pass_at_k`` outside the code task).

**Relative costs** put each task's Dense top-p at 100: ``flops_rel = 100 * flops /
flops_ref`` (likewise ``wall_rel``, ``kv_rel``), where the reference is that task's
``top_p`` row whose temperature is closest to 1.0 (the lower one on a tie). The
**deltas** (``q_delta`` ...) are the row's mean minus the reference row's mean. A task
without ``top_p`` units has ``None`` there.

Example:
    >>> aggregate([{"type": "reference", "task": "poetry", "prompt_index": 0, "text": "x"}])
    Traceback (most recent call last):
    ValueError: no unit records (1 record(s) read)
"""

from __future__ import annotations

import csv
import math
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .methods import METHODS as _METHODS

__all__ = ["METHODS", "Estimate", "Row", "aggregate", "csv_columns", "format_markdown",
           "frontier_verdicts", "plot_frontiers", "runtime_summary", "write_csv"]

FORMAT = "creative-sparse/evaluation-results"
FORMAT_VERSION = 1
#: method id -> (display name, knob); the report's row order.
#: method id -> (display name, knob), from the runner's one table of methods
METHODS: dict[str, tuple[str, str]] = {m.id: (m.label, m.knob) for m in _METHODS.values()}
BASELINES = ("top_p", "min_p")
REFERENCE_TEMPERATURE = 1.0
#: the frontier verdict compares settings whose mean NLL differ by at most this (nats/token)
NLL_MATCH = 0.1

_OUTPUT_METRICS = ("q", "novelty", "incoherence", "relevance", "nll", "rep3")
_SET_METRICS = ("diversity", "distinct", "pass_at_k", "pass_rate", "valid_rate")
_COSTS = ("flops", "wall_time", "peak_kv_bytes")
_METRICS = _OUTPUT_METRICS + _SET_METRICS + ("flagged",) + _COSTS
_UNIT_FIELDS = ("id", "task", "prompt_index", "method", "knob", "setting", "outputs", "set",
                "cost")
_DELTAS = ("q", "novelty", "diversity", "incoherence", "nll")


@dataclass(frozen=True)
class Estimate:
    """A mean over prompts and its bootstrap interval ``[lo, hi]`` (NaN with one prompt).

        >>> str(Estimate(0.412, 0.38, 0.445)), str(Estimate(0.5, math.nan, math.nan))
        ('0.412 [0.380, 0.445]', '0.500')
    """

    mean: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return _fmt_estimate(self, 3)


@dataclass(frozen=True)
class Row:
    """One (task, method, setting) of an evaluation: counts, metric estimates, costs.

    ``setting`` is a temperature (``knob == "temperature"``: top_p, min_p) or a sparsity
    level in [0, 1] (``knob == "level"``). ``prompts``/``units``/``outputs`` count what
    went in (``outputs`` may differ from ``units * num_outputs``); ``confidence`` is the
    intervals' coverage. Metrics are
    :class:`Estimate` or ``None`` where never measured; ``nll`` is in nats/token under the
    dense model, ``flops`` per unit, ``wall_time`` in seconds per unit, ``peak_kv_bytes``
    in bytes. ``*_rel`` are percentages of the task's Dense reference row
    (``is_reference``), ``*_delta`` differences of means against it; ``human`` is the
    preference judgement passed to :func:`aggregate`, never computed here.
    """

    task: str
    method: str
    setting: float
    knob: str
    prompts: int
    units: int
    outputs: int
    confidence: float
    is_reference: bool
    q: Estimate | None
    novelty: Estimate | None
    incoherence: Estimate | None
    relevance: Estimate | None
    nll: Estimate | None
    rep3: Estimate | None
    diversity: Estimate | None
    distinct: Estimate | None
    pass_at_k: Estimate | None
    pass_rate: Estimate | None
    valid_rate: Estimate | None
    flagged: Estimate | None
    flops: Estimate | None
    wall_time: Estimate | None
    peak_kv_bytes: Estimate | None
    flops_rel: float | None = None
    wall_rel: float | None = None
    kv_rel: float | None = None
    q_delta: float | None = None
    novelty_delta: float | None = None
    diversity_delta: float | None = None
    incoherence_delta: float | None = None
    nll_delta: float | None = None
    human: float | None = None

    @property
    def method_name(self) -> str:
        """The display name, e.g. ``"Dense top-p"``."""
        return METHODS[self.method][0]


# --------------------------------------------------------------------------- reading


def _where(i: int, rec: Mapping[str, Any]) -> str:
    rid = rec.get("id")
    return f"records[{i}]" + (f" (unit {rid!r})" if isinstance(rid, str) else "")


def _number(value: Any, where: str, *, nullable: bool = True) -> float:
    """A JSON number as float; None -> NaN ("not measured")."""
    if value is None and nullable:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} = {value!r}, expected a number"
                         + (" or null" if nullable else ""))
    return float(value)


def _field(obj: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in obj:
        raise ValueError(f"{where}: field {name!r} is missing")
    return obj[name]


def _unit_values(i: int, rec: Mapping[str, Any]) -> tuple[tuple, int, int, dict[str, float]]:
    """Check one unit record; ((task, method, setting), prompt, outputs, metric -> value)."""
    where = _where(i, rec)
    for name in _UNIT_FIELDS:
        _field(rec, name, where)
    for name in ("id", "task"):
        if not isinstance(rec[name], str) or not rec[name]:
            raise ValueError(f"{where}: {name} = {rec[name]!r}, expected a non-empty string")
    method = rec["method"]
    if method not in METHODS:
        raise ValueError(f"{where}: method = {method!r}, expected one of {list(METHODS)}")
    if rec["knob"] != METHODS[method][1]:
        raise ValueError(f"{where}: knob = {rec['knob']!r}, but {method} is swept over "
                         f"{METHODS[method][1]!r}")
    prompt = rec["prompt_index"]
    if isinstance(prompt, bool) or not isinstance(prompt, int):
        raise ValueError(f"{where}: prompt_index = {prompt!r}, expected an int")
    setting = _number(rec["setting"], f"{where}: setting", nullable=False)
    if not math.isfinite(setting):
        raise ValueError(f"{where}: setting = {setting!r}, expected a finite number")
    outputs, sets, cost = rec["outputs"], rec["set"], rec["cost"]
    if not isinstance(outputs, list) or not outputs:
        raise ValueError(f"{where}: outputs = {outputs!r:.60}, expected a non-empty list")
    for name, obj in (("set", sets), ("cost", cost)):
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: {name} = {obj!r:.60}, expected an object")
    values = {}
    per_output = defaultdict(list)
    for k, out in enumerate(outputs):
        if not isinstance(out, Mapping):
            raise ValueError(f"{where}: outputs[{k}] = {out!r:.60}, expected an object")
        for name in _OUTPUT_METRICS:
            per_output[name].append(_number(_field(out, name, f"{where}: outputs[{k}]"),
                                            f"{where}: outputs[{k}].{name}"))
    for name in _OUTPUT_METRICS:
        values[name] = _nanmean(per_output[name])
    for name in _SET_METRICS:
        values[name] = _number(_field(sets, name, f"{where}: set"), f"{where}: set.{name}")
    values["flagged"] = _number(sets.get("flagged"), f"{where}: set.flagged")
    for name in _COSTS:
        values[name] = _number(_field(cost, name, f"{where}: cost"), f"{where}: cost.{name}")
    return (rec["task"], method, setting), prompt, len(outputs), values


def _check_other(i: int, rec: Mapping[str, Any]) -> None:
    where = _where(i, rec)
    if rec["type"] == "header":
        if i != 0:
            raise ValueError(f"{where}: a header must be the first record, and only one")
        if _field(rec, "format", where) != FORMAT:
            raise ValueError(f"{where}: format = {rec['format']!r}, expected {FORMAT!r}")
        if _field(rec, "format_version", where) != FORMAT_VERSION:
            raise ValueError(f"{where}: format_version = {rec['format_version']!r}; this "
                             f"library reads version {FORMAT_VERSION}")
    elif rec["type"] == "reference":
        for name in ("task", "prompt_index", "text"):
            _field(rec, name, where)
    else:
        raise ValueError(f"{where}: type = {rec['type']!r}, expected 'header', 'reference' "
                         f"or 'unit'")


# ------------------------------------------------------------------------- aggregation


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def _estimates(per_prompt: np.ndarray, confidence: float, bootstrap: int,
               rng: np.random.Generator) -> list[Estimate | None]:
    """Per metric (rows of ``per_prompt`` [M, P], NaN = not measured): mean and interval."""
    n_prompts = per_prompt.shape[1]
    idx = rng.integers(0, n_prompts, (bootstrap, n_prompts))   # shared: paired resamples
    alpha = (1 - confidence) / 2
    result = []
    for v in per_prompt:
        measured = ~np.isnan(v)
        if not measured.any():
            result.append(None)
            continue
        mean = float(v[measured].mean())
        if measured.sum() < 2:
            result.append(Estimate(mean, math.nan, math.nan))
            continue
        with np.errstate(invalid="ignore"):   # resamples of only unmeasured prompts -> NaN
            sums = np.where(measured, v, 0.0)[idx].sum(axis=1)
            means = sums / measured[idx].sum(axis=1)
        lo, hi = np.nanquantile(means, [alpha, 1 - alpha])
        result.append(Estimate(mean, float(lo), float(hi)))
    return result


def _row_rng(seed: int, key: tuple) -> np.random.Generator:
    tag = zlib.crc32(repr(key).encode())
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, tag]))


def _reference_rows(rows: list[Row]) -> dict[str, Row]:
    refs: dict[str, Row] = {}
    for r in rows:
        if r.method == "top_p":
            best = refs.get(r.task)
            if best is None or ((abs(r.setting - REFERENCE_TEMPERATURE), r.setting)
                                < (abs(best.setting - REFERENCE_TEMPERATURE), best.setting)):
                refs[r.task] = r
    return refs


def _relative(row: Row, ref: Row | None) -> dict[str, float | None]:
    def mean(r: Row | None, name: str) -> float | None:
        e = None if r is None else getattr(r, name)
        return None if e is None else e.mean

    out: dict[str, float | None] = {}
    for name, rel in (("flops", "flops_rel"), ("wall_time", "wall_rel"),
                      ("peak_kv_bytes", "kv_rel")):
        m, m_ref = mean(row, name), mean(ref, name)
        ok = m is not None and m_ref is not None and math.isfinite(m_ref) and m_ref != 0
        out[rel] = 100.0 * (m / m_ref) if ok else None   # the reference: exactly 100
    for name in _DELTAS:
        m, m_ref = mean(row, name), mean(ref, name)
        out[name + "_delta"] = m - m_ref if m is not None and m_ref is not None else None
    return out


def _group(records: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    """Checked unit values: ``(task, method, setting) -> prompt -> [unit values]`` in
    report order, and ``(task, method, setting) -> [units, outputs]``."""
    groups: dict[tuple, dict[int, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"records[{i}] = {rec!r:.60}, expected an object")
        kind = _field(rec, "type", _where(i, rec))
        if kind != "unit":
            _check_other(i, rec)
            continue
        key, prompt, n_out, values = _unit_values(i, rec)
        if rec["id"] in seen:
            raise ValueError(f"{_where(i, rec)}: the same id as records[{seen[rec['id']]}] "
                             f"(a unit counted twice?)")
        seen[rec["id"]] = i
        groups[key][prompt].append(values)
        counts[key][0] += 1
        counts[key][1] += n_out
    if not groups:
        raise ValueError(f"no unit records ({len(records)} record(s) read)")
    order = {m: k for k, m in enumerate(METHODS)}
    keys = sorted(groups, key=lambda k: (k[0], order[k[1]], k[2]))
    return {k: groups[k] for k in keys}, counts


def per_prompt_values(prompts: Mapping[int, list[dict[str, float]]],
                      metrics: Sequence[str] = _METRICS) -> np.ndarray:
    """``[metrics, prompts]``: each prompt's mean over its units (seeds), prompts in
    index order; NaN where not measured."""
    return np.array([[_nanmean([u[name] for u in prompts[p]]) for p in sorted(prompts)]
                     for name in metrics])


def aggregate(records: Sequence[Mapping[str, Any]], *, confidence: float = 0.95,
              bootstrap: int = 2000, seed: int = 0,
              human: Mapping[tuple[str, str], float] | None = None) -> list[Row]:
    """One :class:`Row` per (task, method, setting) of a results file's parsed records.

    Args:
        records: the file's records in order (the header, if present, first).
        confidence: coverage of the intervals, in (0, 1).
        bootstrap: prompt resamples per row (>= 1).
        seed: the bootstrap's seed (any int); the same seed gives the same intervals.
        human: optional human preference per ``(task, method id)``, copied into every
            setting of that method; without it ``Row.human`` is ``None``.

    Returns:
        Rows sorted by task, then method in :data:`METHODS` order, then setting. How
        means, intervals, relative costs and deltas are computed: the module doc.

    Raises:
        ValueError: a record of unknown type, a missing or malformed field (the message
            names ``records[i]``, the unit id and the field), a duplicated unit id, no
            unit records, a bad argument, or a ``human`` key matching no row.
    """
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 1:
        raise ValueError(f"bootstrap must be an int >= 1, got {bootstrap!r}")
    groups, counts = _group(records)
    rows = []
    for key, prompts in groups.items():
        task, method, setting = key
        est = _estimates(per_prompt_values(prompts), confidence, bootstrap, _row_rng(seed, key))
        rows.append(Row(task, method, setting, METHODS[method][1], len(prompts), *counts[key],
                        confidence, False, **dict(zip(_METRICS, est))))
    refs = _reference_rows(rows)
    human = dict(human or {})
    unknown = sorted(set(human) - {(r.task, r.method) for r in rows}, key=repr)
    if unknown:
        raise ValueError(f"human judgements for (task, method) with no rows: {unknown}")
    out = []
    for r in rows:
        ref = refs.get(r.task)
        h = human.get((r.task, r.method))
        out.append(replace(r, is_reference=r is ref, human=None if h is None else
                            _number(h, f"human[{(r.task, r.method)!r}]", nullable=False),
                            **_relative(r, ref)))
    return out


# ---------------------------------------------------------------------------- reports


def _fmt_estimate(e: Estimate | None, digits: int) -> str:
    if e is None:
        return "—"
    if not (math.isfinite(e.lo) and math.isfinite(e.hi)):
        return f"{e.mean:.{digits}f}"
    return f"{e.mean:.{digits}f} [{e.lo:.{digits}f}, {e.hi:.{digits}f}]"


def _fmt_setting(r: Row) -> str:
    return ("T" if r.knob == "temperature" else "s") + f"={r.setting:g}"


def _by_task(rows: Sequence[Row]) -> dict[str, list[Row]]:
    tasks: dict[str, list[Row]] = {}
    for r in rows:
        tasks.setdefault(r.task, []).append(r)
    return tasks


def _dominates(r: Row, b: Row) -> bool:
    """Higher diversity and novelty than ``b`` with disjoint intervals; relevance not
    significantly lower (NaN intervals never dominate)."""
    return (r.diversity.lo > b.diversity.hi and r.novelty.lo > b.novelty.hi
            and r.relevance.hi >= b.relevance.lo)


def frontier_verdicts(rows: Sequence[Row]) -> dict[str, str]:
    """Per task, one plain sentence: does some method beat the dense samplers' frontier?

    A setting of a method *dominates* when, against every ``top_p`` and ``min_p``
    setting whose mean NLL is within :data:`NLL_MATCH` (0.1 nats/token) of its own, its
    diversity and novelty intervals lie wholly above the baseline's and its relevance
    interval does not lie wholly below. A setting with no baseline that close is not
    judged (nothing to compare at equal fluency).
    """
    verdicts = {}
    for task, task_rows in _by_task(rows).items():
        usable = [r for r in task_rows if None not in (r.nll, r.diversity, r.novelty,
                                                       r.relevance)]
        base = [b for b in usable if b.method in BASELINES]
        methods = [m for m in METHODS if m not in BASELINES
                   and any(r.method == m for r in task_rows)]
        if not base or not methods:
            verdicts[task] = ("no method dominates (nothing to compare: "
                              + ("no top-p or min-p rows)" if not base else "only baselines)"))
            continue
        wins, notes = [], []
        for m in methods:
            judged, won = 0, []
            for r in (r for r in usable if r.method == m):
                near = [b for b in base if abs(b.nll.mean - r.nll.mean) <= NLL_MATCH]
                judged += bool(near)
                if near and all(_dominates(r, b) for b in near):
                    won.append(f"{_fmt_setting(r)} vs {len(near)} baseline setting(s)")
            name = METHODS[m][0]
            if won:
                wins.append(f"{name} dominates at {', '.join(won)}")
            elif judged:
                notes.append(f"{name}: no setting dominates")
            else:
                notes.append(f"{name}: no baseline within {NLL_MATCH:g} nats of its NLL")
        head = "; ".join(wins) if wins else "no method dominates"
        verdicts[task] = head + (f" ({'; '.join(notes)})" if notes else "")
    return verdicts


_COLUMNS = (  # header, Row field, formatter; optional columns only when some row has them
    ("Q", "q", 3), ("novelty", "novelty", 3), ("diversity", "diversity", 3),
    ("distinct", "distinct", 2), ("incoherence", "incoherence", 3),
    ("relevance", "relevance", 3), ("NLL", "nll", 3), ("rep-3", "rep3", 3))
_OPTIONAL = (("pass@k", "pass_at_k", 3), ("pass rate", "pass_rate", 3),
             ("valid rate", "valid_rate", 3), ("flagged", "flagged", 2))
_RELATIVE = (("FLOPs", "flops_rel"), ("latency", "wall_rel"), ("KV", "kv_rel"))
_DELTA_COLUMNS = (("ΔQ", "q_delta"), ("Δnovelty", "novelty_delta"),
                  ("Δdiversity", "diversity_delta"))


def runtime_summary(units: Iterable[Mapping[str, Any]]) -> str:
    """One line: the units' own time (``cost.unit_seconds``: generation and scoring,
    not model loading) in all and per task, e.g. ``"Runtime: 84.0 min of unit time
    (540 units; creative_writing 84.0 min)"``; wall time of the run may differ (units
    run in parallel under ``torchrun``, or beside other jobs)."""
    per_task: dict[str, float] = {}
    count = 0
    for unit in units:
        seconds = unit.get("cost", {}).get("unit_seconds")
        if isinstance(seconds, (int, float)) and math.isfinite(seconds):
            per_task[unit["task"]] = per_task.get(unit["task"], 0.0) + seconds
            count += 1
    if not count:
        return "Runtime: not recorded."
    tasks = "; ".join(f"{task} {seconds / 60:.1f} min" for task, seconds in per_task.items())
    return (f"Runtime: {sum(per_task.values()) / 60:.1f} min of unit time ({count} units; "
            f"{tasks}).")


def format_markdown(rows: Sequence[Row], *, title: str = "Evaluation results",
                    notes: Sequence[str] = (),
                    sections: Mapping[str, Sequence[str]] | None = None) -> str:
    """The report as Markdown: per task, a table of its (method, setting) rows and the
    frontier verdict (:func:`frontier_verdicts`).

    Cells show ``mean [lo, hi]`` (the interval only with two or more prompts); FLOPs,
    latency and KV are percentages of the task's Dense top-p reference (marked
    ``(ref)``); Δ columns are differences of means against it; "—" is "not measured"
    or "no judgement". Columns for pass@k, pass rate, valid rate and flagged appear only
    in tasks that have them. ``notes``: paragraphs under the title (the runtime, say);
    ``sections``: more Markdown lines per task, after its verdict (the frontier gaps of
    :mod:`~creative_sparse.evaluation.frontier`, say).
    """
    if not rows:
        raise ValueError("no rows to report")
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [note, ""]
    for task, task_rows in _by_task(rows).items():
        ref = next((r for r in task_rows if r.is_reference), None)
        optional = [c for c in _OPTIONAL if any(getattr(r, c[1]) is not None for r in task_rows)]
        cols = _COLUMNS + tuple(optional)
        header = (["method", "setting", "prompts"] + [c[0] for c in cols]
                  + [c[0] for c in _RELATIVE] + [c[0] for c in _DELTA_COLUMNS] + ["human"])
        lines += [f"## {task}", "",
                  f"Cells: mean over prompts [{100 * task_rows[0].confidence:g}% bootstrap "
                  f"interval over prompts]. NLL in nats/token under the dense model. "
                  + (f"FLOPs, latency, KV: Dense top-p {_fmt_setting(ref)} = 100; Δ: minus "
                     f"its mean." if ref else "No Dense top-p rows: no relative costs or Δ."),
                  "", "| " + " | ".join(header) + " |",
                  "|" + "|".join("---" if k < 2 else "---:" for k in range(len(header))) + "|"]
        for r in task_rows:
            cells = [r.method_name, _fmt_setting(r) + (" (ref)" if r.is_reference else ""),
                     str(r.prompts)]
            cells += [_fmt_estimate(getattr(r, f), d) for _, f, d in cols]
            cells += ["—" if getattr(r, f) is None else f"{getattr(r, f):.1f}"
                      for _, f in _RELATIVE]
            cells += ["—" if getattr(r, f) is None else f"{getattr(r, f):+.3f}"
                      for _, f in _DELTA_COLUMNS]
            cells.append("—" if r.human is None else f"{r.human:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"**Frontier verdict:** {frontier_verdicts(task_rows)[task]}.", ""]
        lines += list((sections or {}).get(task, ()))
    return "\n".join(lines)


def csv_columns() -> list[str]:
    """The CSV's header: every :class:`Row` field in order, each metric as ``name``,
    ``name_lo``, ``name_hi``, and ``method_name`` after ``method``."""
    cols = []
    for f in fields(Row):
        cols += [f.name, f"{f.name}_lo", f"{f.name}_hi"] if f.name in _METRICS else [f.name]
        if f.name == "method":
            cols.append("method_name")
    return cols


def write_csv(rows: Sequence[Row], path: str | os.PathLike) -> Path:
    """Write the rows as CSV (columns: :func:`csv_columns`), one line per row.

    Empty cell: ``None`` (not measured, no reference, no judgement); ``nan``: an
    interval from one prompt; booleans as ``true``/``false``; floats in full precision.
    Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=csv_columns())
        writer.writeheader()
        for r in rows:
            line: dict[str, Any] = {"method_name": r.method_name}
            for f in fields(Row):
                v = getattr(r, f.name)
                if f.name in _METRICS:
                    for suffix, x in zip(("", "_lo", "_hi"),
                                         (None, None, None) if v is None else (v.mean, v.lo, v.hi)):
                        line[f.name + suffix] = "" if x is None else repr(x)
                elif isinstance(v, bool):
                    line[f.name] = "true" if v else "false"
                else:
                    line[f.name] = "" if v is None else v if isinstance(v, str) else repr(v)
            writer.writerow(line)
    return path


def plot_frontiers(rows: Sequence[Row], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per task (``frontier_<task>.png`` in ``out_dir``): diversity vs NLL and
    novelty vs NLL, a line per method through its settings, interval error bars, each
    point labelled with its setting. Needs matplotlib (``creative-sparse[plots]``).
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: "
                          "pip install 'creative-sparse[plots]'") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def err(es: list[Estimate]) -> np.ndarray:   # [2, n] distances; 0 where no interval
        e = np.array([[x.mean - x.lo, x.hi - x.mean] for x in es]).T
        return np.nan_to_num(e, nan=0.0)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, task_rows in _by_task(rows).items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        for k, m in enumerate(METHODS):
            pts = sorted((r for r in task_rows if r.method == m and r.nll is not None),
                         key=lambda r: r.setting)
            for ax, name in zip(axes, ("diversity", "novelty")):
                pts_m = [r for r in pts if getattr(r, name) is not None]
                if not pts_m:
                    continue
                x = [r.nll for r in pts_m]
                y = [getattr(r, name) for r in pts_m]
                ax.errorbar([e.mean for e in x], [e.mean for e in y], xerr=err(x), yerr=err(y),
                            color=f"C{k}", marker="o", ms=4, capsize=2, lw=1.2, elinewidth=0.7,
                            ls="--" if m in BASELINES else "-", label=METHODS[m][0])
                for r, xe, ye in zip(pts_m, x, y):
                    ax.annotate(_fmt_setting(r), (xe.mean, ye.mean), textcoords="offset points",
                                xytext=(3, 3), fontsize=6, color=f"C{k}", alpha=0.6)
        for ax, name in zip(axes, ("diversity", "novelty")):
            ax.set_xlabel("NLL under the dense model (nats/token)")
            ax.set_ylabel(f"{name} (mean over prompts)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8, loc="best")
        fig.suptitle(f"{task}: creativity vs fluency (bars: "
                     f"{100 * task_rows[0].confidence:g}% bootstrap over prompts)")
        fig.tight_layout()
        path = out_dir / f"frontier_{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
