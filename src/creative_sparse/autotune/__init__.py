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
4. The Goldilocks model is fitted (:mod:`creative_sparse.autotune.goldilocks`);
   intervals come from a bootstrap over prompts. s* is the fitted model's
   argmax when the model identifies a unique interior optimum, else the measured
   optimum (interpolated) with a warning; a flat Q returns its argmax with a warning.

Budget: ``compute_budget`` is a fraction of the reference cost, 8 prompts x 6
samples x 7 levels x 64 tokens = 21,504 sampled tokens (about 3.5 minutes for
SmolLM2-135M on 2 CPU cores, greedy references and scoring included). Prompts,
samples and levels scale together (each by the cube root of the budget,
rounded, within the task's prompts); a task whose outputs are longer gets
proportionally fewer. The minimum is 2 prompts x 2 samples x 3 levels.

Results are cached as JSON under ``<cache root>/autotune/`` (``$CREATIVE_SPARSE_CACHE``
or the user cache directory), keyed by everything that changes them. The team's
own measurements for the embedded model (default budget, weights and dial, the
tuning and held-out splits of ``creative_writing`` and ``code``) ship in
``autotune/measured/``: the same call answers from them on a fresh machine,
also under other library versions; ``cache="refresh"`` measures again.

Example:
    >>> from creative_sparse.autotune import find_optimal_sparsity
    >>> s = find_optimal_sparsity("smollm2-135m", "creative_writing")   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import SparsityConfig, as_quality_weights
from ..tasks import load_task
from ..quality import metrics
from ..quality.degeneration import DegenerationLimits
from ..quality.functional import RELEVANCE_RANGE
from .cache import (UNSTABLE_KEY_FIELDS, _cache_file, _embedder_kind, _model_identity,
                    _read_cache, _read_shipped, _version, _write_cache)
from .measure import _Measurer  # noqa: F401  (tests drive one directly)
from .measure import _analyse, _make_measurer, _measure_sweep
from .results import (_CACHE_FORMAT, MIN_LEVELS, N_BOOTSTRAP, REFERENCE_COST, LevelRow,
                      Measurements, OptimumNotIdentifiedWarning, SweepFailedError, SweepPlan,
                      SweepResult, plan_sweep)

__all__ = ["LevelRow", "Measurements", "OptimumNotIdentifiedWarning", "REFERENCE_COST",
           "SweepFailedError", "SweepPlan", "SweepResult", "UNSTABLE_KEY_FIELDS",
           "find_optimal_sparsity", "plan_sweep", "sweep_sparsity"]

logger = logging.getLogger(__name__)


def sweep_sparsity(model_name: str = "smollm2-135m", task_type: str = "creative_writing",
                   compute_budget: float = 1.0, quality_weights=None, *, model=None,
                   tokenizer=None, split: str = "tune", levels: Sequence[float] | None = None,
                   seed: int = 0, max_new_tokens: int | None = None,
                   sparsity_config: SparsityConfig | None = None, n_bootstrap: int = N_BOOTSTRAP,
                   cache: bool | str = True, cache_dir: str | os.PathLike | None = None,
                   progress: bool = True, safety=None) -> SweepResult:
    """Measure Q(s) on a task's prompts, fit the Goldilocks model, find s*.

    Args:
        model_name: anything `load_model` accepts (ignored when ``model`` is given).
        task_type: a task of :func:`creative_sparse.evaluation.list_tasks`.
        compute_budget: fraction of the reference cost (module doc); 1.0 by default.
        quality_weights: `QualityWeights`, a dict or ``(alpha, beta, gamma)``.
        model, tokenizer: an already loaded pair.
        split: ``"tune"``, or ``"held_out"`` to report on prompts tuning never saw, or
            ``"evaluation"``: the evaluation protocol's held-back prompts (never tune on them).
        levels: measure exactly these levels (no refinement), e.g. a tuning sweep's
            levels plus its s* on the held-out split.
        seed: base seed of the samples; max_new_tokens: override the task's length.
        sparsity_config: constants of the dial (default ``SparsityConfig()``).
        n_bootstrap: bootstrap resamples over prompts for the intervals.
        cache: True reads and writes the on-disk cache (module doc), False neither,
            ``"refresh"`` measures again and replaces the cached entry.
        cache_dir: cache root (default ``$CREATIVE_SPARSE_CACHE`` or the user cache).
        progress: show a progress bar.
        safety: a content checker (``"default"`` or a
            :class:`~creative_sparse.safety.SafetyChecker`) whose flagged rate (share of
            samples flagged) is recorded per level, shown in the table and plotted over s.
            None (the default) records none; the cache key (and the shipped
            measurements) stay those of a sweep without it.

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
        from ..control import check_level

        levels = sorted({round(check_level(s), 4) for s in levels})
        if len(levels) < MIN_LEVELS:
            raise ValueError(f"levels: need at least {MIN_LEVELS} distinct levels, got {levels}")
    plan = plan_sweep(compute_budget, tokens, len(prompts),
                      fixed_levels=len(levels) if levels is not None else None)
    key = {"format": _CACHE_FORMAT, "version": metadata.version("creative-sparse"),
           "transformers": _version("transformers"), "torch": _version("torch"),
           "model": _model_identity(model_name, model), "task": task.name,
           # Task.fingerprint leaves the evaluation split out (so the keys of the
           # tune/held_out results already shipped stay the same); that split has its own
           "prompts": task.evaluation_fingerprint if split == "evaluation" else task.fingerprint,
           "split": split, "plan": asdict(plan), "levels": levels,
           "weights": asdict(weights), "seed": int(seed),
           "sparsity_config": asdict(sparsity_config or SparsityConfig()),
           "quality": _quality_identity(), "n_bootstrap": n_bootstrap}
    if safety is not None:
        from ..safety import resolve_checker

        checker = resolve_checker(safety)
        if checker is None:
            raise ImportError("sweep_sparsity(safety='default') needs alt-profanity-check: "
                              "pip install 'creative-sparse[safety]'")
        key["safety"] = checker.name
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
        if safety is not None:
            measurer.safety = checker
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


def _quality_identity() -> list:
    """Every constant of the default quality functional: a change measures again."""
    return ["prompt-aware", metrics.NLL_FLOOR, metrics.NLL_SCALE, metrics.NLL_LOW,
            metrics.NLL_LOW_SCALE, metrics.VIOLATION_WEIGHT, list(RELEVANCE_RANGE),
            asdict(DegenerationLimits()), _embedder_kind()]


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

