"""`find_optimal_sparsity` and `sweep_sparsity`: measure Q(s) on a task, fit the Goldilocks model, return s*.

Procedure (``docs/goldilocks.md`` has the details):

1. For every tuning prompt of the task, the dense greedy continuation is the
   novelty reference ("what the model would say anyway"), computed once.
2. At each level s of a coarse grid (evenly spaced over [0, 1], ends included),
   ``samples`` outputs per prompt are generated with every knob of the dial at s
   (the same seeds at every level, so levels differ by the dial, not by luck) and
   scored: novelty, diversity, incoherence (the task's validators count as
   violations), Q = alpha N + beta D - gamma I.
3. Golden-section steps refine the bracket around the best level.
4. The Goldilocks model is fitted (:mod:`creative_sparse.quality.goldilocks`);
   intervals come from a bootstrap over prompts. s* is the fitted model's
   argmax when the model identifies a unique interior optimum, else the measured
   optimum (interpolated) with a warning; a flat Q returns its argmax with a warning.

Budget: ``compute_budget`` is a fraction of the reference cost, 8 prompts x 6
samples x 7 levels x 64 tokens = 21,504 sampled tokens (about 7 minutes for
SmolLM2-135M on 2 CPU cores, greedy references and scoring included). Prompts,
samples and levels scale together (each by the cube root of the budget,
rounded, within the task's prompts); a task whose outputs are longer gets
proportionally fewer. The minimum is 2 prompts x 2 samples x 3 levels.

Results are cached as JSON under ``<cache root>/autotune/`` (``$CREATIVE_SPARSE_CACHE``
or the user cache directory), keyed by everything that changes them. The team's
own measurements for the embedded model (default budget, weights and dial, the
tuning and held-out splits of ``creative_writing`` and ``code``) ship in
``evaluation/measured/``: the same call answers from them on a fresh machine,
also under other library versions; ``cache="refresh"`` measures again.

Example:
    >>> from creative_sparse.autotune import find_optimal_sparsity
    >>> s = find_optimal_sparsity("smollm2-135m", "creative_writing")   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import tempfile
import time
import types
import typing
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import QualityWeights, SparsityConfig, as_quality_weights
from .evaluation.tasks import Task, load_task
from .quality import metrics
from .quality.goldilocks import (BootstrapResult, CorollaryBounds, GoldilocksFit, bootstrap_fit,
                                 fit_goldilocks, measured_optimum)

__all__ = ["OptimumNotIdentifiedWarning", "SweepFailedError", "SweepPlan", "SweepResult",
           "find_optimal_sparsity", "plan_sweep", "sweep_sparsity"]

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class Measurements:
    """Per-prompt means over the samples, ``[P][G]`` (NaN where the point failed), at
    ``levels`` (sorted); ``examples``: the first output of the first prompt per level."""

    levels: tuple[float, ...]
    novelty: tuple[tuple[float, ...], ...]
    diversity: tuple[tuple[float, ...], ...]
    incoherence: tuple[tuple[float, ...], ...]
    violations: tuple[tuple[float, ...], ...]
    examples: tuple[str, ...]
    errors: tuple[str, ...]

    def means(self, weights: QualityWeights) -> dict[str, np.ndarray]:
        """Means over prompts per level: novelty, diversity, incoherence, violations, q."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN level: stays NaN
            out = {k: np.nanmean(np.asarray(getattr(self, k), float), axis=0)
                   for k in ("novelty", "diversity", "incoherence", "violations")}
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
                                 int(ok[g])))
        return tuple(rows)

    def row(self, s: float) -> LevelRow | None:
        """The table row measured at level ``s`` (within 1e-6), or None."""
        return next((r for r in self.table if abs(r.s - s) < 1e-6), None)

    def format_table(self) -> str:
        """The table and the verdict as text."""
        from .evaluation.report import format_sweep
        return format_sweep(self)

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG: measured N, D, I, Q over s with intervals, the fit, s* and the
        bounds. Needs matplotlib (``pip install 'creative-sparse[plots]'``)."""
        from .evaluation.report import plot_sweep
        return plot_sweep(self, Path(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepResult":
        """Inverse of :meth:`to_dict`."""
        return _revive(cls, data)


def _revive(tp: Any, value: Any) -> Any:
    """Rebuild a (nested, frozen) dataclass value from its ``asdict`` form."""
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _revive(hints[f.name], value[f.name])
                     for f in dataclasses.fields(tp) if f.name in value})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _revive(inner[0], value) if len(inner) == 1 else value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_revive(args[0], v) for v in value)
        return tuple(_revive(a, v) for a, v in zip(args, value))
    if tp is float:
        return float(value)
    return value


# ---------------------------------------------------------------- measuring
class _Measurer:
    """Generates and scores one prompt at one level; owns the model and the references."""

    def __init__(self, model, tokenizer, task: Task, plan: SweepPlan, weights: QualityWeights,
                 sparsity_config: SparsityConfig | None, seed: int):
        from .generation.wrapper import CreativeSparseWrapper, build_constraints

        self.wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer,
                                             quality_weights=weights,
                                             sparsity_config=sparsity_config)
        checks = build_constraints(tokenizer, {"validators": list(task.validators)}, 1, [])
        self.wrapper.quality.validators = list(checks.validators)
        self.plan, self.seed = plan, seed
        self._ids: dict[str, Any] = {}
        self._references: dict[str, str] = {}

    def _prompt_ids(self, prompt: str):
        if prompt not in self._ids:
            self._ids[prompt] = self.wrapper.prompt_ids(prompt)
        return self._ids[prompt]

    def reference(self, prompt: str) -> str:
        """The dense greedy continuation (novelty reference), once per prompt."""
        from .generation import SamplingParams, generate
        from .models.transformers import AttentionKnobs

        if prompt not in self._references:
            out = generate(self.wrapper.model, self.wrapper.tokenizer, self._prompt_ids(prompt),
                           max_new_tokens=self.plan.max_new_tokens,
                           schedule=(SamplingParams(temperature=0), AttentionKnobs()))
            self._references[prompt] = out.texts[0] or " "
        return self._references[prompt]

    def measure(self, index: int, prompt: str, s: float) -> tuple[tuple[float, ...], str]:
        """``((novelty, diversity, incoherence, violations), first text)``: means over the
        samples of prompt ``index`` at level ``s`` (the same seeds at every level)."""
        from .generation import generate

        w, n = self.wrapper, self.plan.samples
        seeds = [self.seed * 1_000_003 + index * 1_000 + j for j in range(n)]
        out = generate(w.model, w.tokenizer, self._prompt_ids(prompt), num_rows=n,
                       max_new_tokens=self.plan.max_new_tokens, schedule=w.knobs(s, seeds),
                       seeds=seeds)
        texts = [t or " " for t in out.texts]
        scores = w.quality.breakdown(texts, reference_data=[self.reference(prompt)])
        means = tuple(float(np.mean([getattr(q, k) for q in scores]))
                      for k in ("novelty", "diversity", "incoherence", "violations"))
        return means, texts[0]


def _make_measurer(model_name, model, tokenizer, task, plan, weights, sparsity_config, seed):
    if model is None:
        from .models import load_model

        model, tokenizer = load_model(model_name)
    return _Measurer(model, tokenizer, task, plan, weights, sparsity_config, seed)


def _measure_sweep(measurer, prompts: Sequence[str], levels: Sequence[float], refine: int,
                   weights: QualityWeights, progress: bool, desc: str) -> Measurements:
    from tqdm import tqdm

    values: dict[float, list] = {}
    examples: dict[float, str] = {}
    errors: list[str] = []
    w = np.array([weights.alpha, weights.beta, -weights.gamma, 0.0])
    bar = tqdm(total=len(prompts) * (len(levels) + refine), desc=desc, unit="point",
               disable=not progress)

    def evaluate(s: float) -> float:
        row = []
        for k, prompt in enumerate(prompts):
            try:
                point, text = measurer.measure(k, prompt, s)
                examples.setdefault(s, text)
            except Exception as err:  # one failed point must not lose the sweep
                logger.warning("sweep point s=%.4f, prompt %d failed: %r", s, k, err)
                errors.append(f"s={s:.4f}, prompt {k}: {type(err).__name__}: {err}")
                point = (math.nan,) * 4
            row.append(point)
            bar.update(1)
        values[s] = row
        q = np.asarray(row, float) @ w
        return float(np.nanmean(q)) if np.isfinite(q).any() else -math.inf

    try:
        scores = {s: evaluate(s) for s in levels}
        if all(q == -math.inf for q in scores.values()):
            raise SweepFailedError(f"every point of the sweep failed ({len(levels)} levels x "
                                   f"{len(prompts)} prompts); first error: {errors[0]}")
        for _ in range(refine):  # golden-section steps into the larger side of the bracket
            grid = sorted(s for s, q in scores.items() if q > -math.inf)
            k = int(np.argmax([scores[s] for s in grid]))
            x = grid[k]
            lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
            u = round(x + _GOLDEN * (hi - x) if hi - x >= x - lo else x - _GOLDEN * (x - lo), 4)
            if u in scores or max(hi - x, x - lo) < 2e-3:
                break
            scores[u] = evaluate(u)
    finally:
        bar.close()
    order = sorted(values)
    cols = [[values[s][k] for s in order] for k in range(len(prompts))]
    per = [tuple(tuple(c[g][i] for g in range(len(order))) for c in cols) for i in range(4)]
    return Measurements(tuple(order), *per, tuple(examples.get(s, "") for s in order),
                        tuple(errors))


def _analyse(m: Measurements, weights: QualityWeights, seed: int, n_boot: int
             ) -> dict[str, Any]:
    """The fit, the bootstrap and the choice of s* (the analysis fields of `SweepResult`)."""
    means = m.means(weights)
    ok = np.isfinite(means["q"])
    s = np.asarray(m.levels)[ok]
    q = means["q"][ok]
    per = [np.asarray(getattr(m, k), float)[:, ok] for k in ("novelty", "diversity", "incoherence")]
    boot = bootstrap_fit(s, *per, weights, n_boot=n_boot, seed=seed,
                         refit=np.unique(s).size >= 3) if s.size else None
    half = [(hi - lo) / 2 for lo, hi in boot.q if math.isfinite(lo)] if boot else []
    noise = max(float(np.median(half)) if half else 0.0, 1e-3)
    fit = (fit_goldilocks(s, *(means[k][ok] for k in ("novelty", "diversity", "incoherence")),
                          weights, q_tolerance=noise) if np.unique(s).size >= 3 else None)
    s_meas = measured_optimum(s, q)
    notes = []
    spread = float(q.max() - q.min())
    gap_lo = boot.q_gap[0] if boot is not None else math.nan
    if spread <= 1e-3 or not gap_lo > 0:   # the best level is not told apart from the worst
        s_star, method = float(s[int(np.argmax(q))]), "argmax"
        notes.append(f"Q(s) is flat (spread {spread:.4f} over the levels; paired 95% interval "
                     f"of best minus worst starts at {gap_lo:.4f}): the optimum is not "
                     f"identified; returning the argmax s = {s_star:.3f}")
        ci = None
    elif fit is not None and fit.identified:
        s_star, method, ci = fit.s_star, "fit", boot.s_star_fit
    else:
        why = "; ".join(fit.issues) if fit is not None else "fewer than 3 levels measured"
        s_star, method, ci = s_meas, "measured", boot.s_star_measured
        notes.append(f"the Goldilocks model does not identify s* ({why}); returning the "
                     f"measured optimum s = {s_star:.3f}")
    return dict(fit=fit, bootstrap=boot, s_star=s_star, s_star_ci=ci, method=method,
                s_star_measured=s_meas, warnings=tuple(notes))


# ---------------------------------------------------------------- cache
def _model_identity(model_name: str, model) -> str:
    if model is not None:
        import torch

        digest = hashlib.sha256(model.config.to_json_string().encode())
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                flat = p.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
                digest.update(name.encode() + sample.tobytes())
        return f"object:{getattr(model, 'name_or_path', '')}:{digest.hexdigest()[:16]}"
    ident = f"name:{model_name.strip().lower()}"
    local = Path(model_name).expanduser()
    if local.exists():   # a local directory or file: its files' sizes and times
        files = sorted(local.iterdir()) if local.is_dir() else [local]
        ident += ":" + ",".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                for f in files if f.is_file())
    return ident


def _embedder_kind() -> str:
    from .quality import minilm_dir

    try:
        minilm_dir()
        return "minilm"
    except FileNotFoundError:
        return "hidden-state"


def _cache_file(cache_dir, task: str, split: str, key: Mapping[str, Any]) -> Path:
    from .models.cache import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / "autotune" / f"{task}-{split}-{digest}.json"


def _read_cache(path: Path, key: Mapping[str, Any]) -> SweepResult | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != json.loads(json.dumps(key)):
            return None
        return dataclasses.replace(SweepResult.from_dict(data["result"]), from_cache=True)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable autotune cache %s (%s)", path, err)
        return None


# Measurements that ship with the library (scripts/ship_autotune_results.py) are keyed
# without these fields: a result measured under another version still answers.
UNSTABLE_KEY_FIELDS = ("version", "transformers", "torch")
_SHIPPED = Path(__file__).parent / "evaluation" / "measured"


def _read_shipped(key: Mapping[str, Any]) -> SweepResult | None:
    """The shipped measurement for ``key`` (the embedded model's default sweeps), if any."""
    stable = {k: v for k, v in json.loads(json.dumps(key)).items()
              if k not in UNSTABLE_KEY_FIELDS}
    for path in sorted(_SHIPPED.glob("*.json")):
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
        except (ValueError, KeyError) as err:
            logger.warning("ignoring unreadable shipped autotune results %s (%s)", path, err)
            continue
        for entry in entries:
            if entry.get("key") == stable:
                return dataclasses.replace(SweepResult.from_dict(entry["result"]),
                                           from_cache=True)
    return None


def _write_cache(path: Path, key: Mapping[str, Any], result: SweepResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "result": result.to_dict()}, f)
        os.chmod(tmp, 0o644)    # mkstemp makes it private; the cache is as shareable as its folder
        os.replace(tmp, path)   # readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- public API
def sweep_sparsity(model_name: str = "smollm2-135m", task_type: str = "creative_writing",
                   compute_budget: float = 1.0, quality_weights=None, *, model=None,
                   tokenizer=None, split: str = "tune", levels: Sequence[float] | None = None,
                   seed: int = 0, max_new_tokens: int | None = None,
                   sparsity_config: SparsityConfig | None = None, n_bootstrap: int = N_BOOTSTRAP,
                   cache: bool | str = True, cache_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> SweepResult:
    """Measure Q(s) on a task's prompts, fit the Goldilocks model, find s*.

    Args:
        model_name: anything `load_model` accepts (ignored when ``model`` is given).
        task_type: a task of :func:`creative_sparse.evaluation.list_tasks`.
        compute_budget: fraction of the reference cost (module doc); 1.0 by default.
        quality_weights: `QualityWeights`, a dict or ``(alpha, beta, gamma)``.
        model, tokenizer: an already loaded pair.
        split: ``"tune"``, or ``"held_out"`` to report on prompts tuning never saw.
        levels: measure exactly these levels (no refinement), e.g. a tuning sweep's
            levels plus its s* on the held-out split.
        seed: base seed of the samples; max_new_tokens: override the task's length.
        sparsity_config: constants of the dial (default ``SparsityConfig()``).
        n_bootstrap: bootstrap resamples over prompts for the intervals.
        cache: True reads and writes the on-disk cache (module doc), False neither,
            ``"refresh"`` measures again and replaces the cached entry.
        cache_dir: cache root (default ``$CREATIVE_SPARSE_CACHE`` or the user cache).
        progress: show a progress bar.

    Returns:
        A :class:`SweepResult` (``.table``, ``.fit``, ``.bounds``, ``.s_star``, ``.plot(path)``).

    Raises:
        ValueError: unknown task (lists the known ones), bad split, levels, weights
            (all zero included), budget <= 0 or below the minimum (says the minimum).
        SweepFailedError: every point failed.
    """
    task = load_task(task_type)
    weights = as_quality_weights(quality_weights)
    prompts = task.prompts(split)
    if model is not None and tokenizer is None:
        raise ValueError("model was given without its tokenizer")
    tokens = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {tokens!r}")
    if levels is not None:
        from .control import check_level

        levels = sorted({round(check_level(s), 4) for s in levels})
        if len(levels) < MIN_LEVELS:
            raise ValueError(f"levels: need at least {MIN_LEVELS} distinct levels, got {levels}")
    plan = plan_sweep(compute_budget, tokens, len(prompts),
                      fixed_levels=len(levels) if levels is not None else None)
    key = {"format": _CACHE_FORMAT, "version": metadata.version("creative-sparse"),
           "transformers": _version("transformers"), "torch": _version("torch"),
           "model": _model_identity(model_name, model), "task": task.name,
           "prompts": task.fingerprint, "split": split, "plan": asdict(plan), "levels": levels,
           "weights": asdict(weights), "seed": int(seed),
           "sparsity_config": asdict(sparsity_config or SparsityConfig()),
           "quality": [metrics.NLL_FLOOR, metrics.NLL_SCALE, metrics.VIOLATION_WEIGHT,
                       _embedder_kind()], "n_bootstrap": n_bootstrap}
    path = _cache_file(cache_dir, task.name, split, key)
    if cache not in (True, False, "refresh"):
        raise ValueError(f"cache must be True, False or 'refresh', got {cache!r}")
    result = _read_cache(path, key) if cache is True else None
    if result is None and cache is True:
        result = _read_shipped(key)
        if result is not None:
            logger.info("autotune: %s (%s) answered from the measurements shipped with the "
                        "library (cache='refresh' measures again)", task.name, split)
    if result is not None:
        logger.info("autotune: %s (%s) answered from the cache %s", task.name, split, path)
    else:
        logger.info("autotune: %s (%s), %d prompts x %d samples x %d levels x %d tokens "
                    "(budget %g)", task.name, split, plan.prompts, plan.samples, plan.levels,
                    plan.max_new_tokens, plan.budget)
        start = time.perf_counter()
        measurer = _make_measurer(model_name, model, tokenizer, task, plan, weights,
                                  sparsity_config, int(seed))
        grid = levels if levels is not None else [round(float(x), 4) for x in
                                                  np.linspace(0, 1, plan.coarse)]
        m = _measure_sweep(measurer, prompts[: plan.prompts], grid, plan.levels - len(grid),
                           weights, progress, f"tune {task.name}")
        name = Path(getattr(model, "name_or_path", "") or model_name).name
        result = SweepResult(task.name, split, name, plan, weights, int(seed), m,
                             **_analyse(m, weights, int(seed), n_bootstrap),
                             runtime_s=time.perf_counter() - start)
        if cache:
            _write_cache(path, key, result)
    for note in result.warnings:
        warnings.warn(note, OptimumNotIdentifiedWarning, stacklevel=2)
    return result


def find_optimal_sparsity(model_name: str = "smollm2-135m", task_type: str = "creative_writing",
                          compute_budget: float = 1.0, quality_weights=None, **kwargs) -> float:
    """The sparsity level s* in [0, 1] that maximises Q on ``task_type`` for this model.

    Same arguments as :func:`sweep_sparsity` (keyword-only ones through ``kwargs``);
    a second call with the same arguments answers from the on-disk cache.

    Example:
        >>> s = find_optimal_sparsity("smollm2-135m", task_type="poetry")   # doctest: +SKIP
        >>> wrapper = CreativeSparseWrapper(sparsity_schedule=(s, min(s, 0.3)))  # doctest: +SKIP
    """
    return sweep_sparsity(model_name, task_type, compute_budget, quality_weights,
                          **kwargs).s_star


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
