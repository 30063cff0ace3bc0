"""Measuring a sweep: generate and score at each level, refine by golden-section steps, fit."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from ..config import QualityWeights, SparsityConfig
from ..tasks import Task
from .goldilocks import bootstrap_fit, fit_goldilocks, measured_optimum
from .results import _GOLDEN, Measurements, SweepFailedError, SweepPlan

logger = logging.getLogger("creative_sparse.autotune")


class _Measurer:
    """Generates and scores one prompt at one level; owns the model and the references."""

    def __init__(self, model, tokenizer, task: Task, plan: SweepPlan, weights: QualityWeights,
                 sparsity_config: SparsityConfig | None, seed: int):
        from ..generation.wrapper import CreativeSparseWrapper, build_constraints

        self.wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer,
                                             quality_weights=weights,
                                             sparsity_config=sparsity_config)
        checks = build_constraints(tokenizer, {"validators": list(task.validators)}, 1, [])
        self.validators = list(checks.validators)
        self.plan, self.seed = plan, seed
        self.safety = None     # a SafetyChecker: measure() also gives the flagged rate
        self._ids: dict[str, Any] = {}
        self._references: dict[str, str] = {}

    def _prompt_ids(self, prompt: str):
        if prompt not in self._ids:
            self._ids[prompt] = self.wrapper.prompt_ids(prompt)
        return self._ids[prompt]

    def reference(self, prompt: str) -> str:
        """The dense greedy continuation (novelty reference), once per prompt."""
        if prompt not in self._references:
            self._references[prompt] = self.wrapper.greedy_reference(prompt,
                                                                     self.plan.max_new_tokens)
        return self._references[prompt]

    def measure(self, index: int, prompt: str, s: float) -> tuple[tuple[float, ...], str]:
        """``((novelty, diversity, incoherence, violations, flagged), first text)``: means
        over the samples of prompt ``index`` at level ``s`` (the same seeds at every
        level); ``flagged`` is the share of samples :attr:`safety` flags (NaN without a
        checker; a checker that fails makes the point fail)."""
        from ..generation import generate

        w, n = self.wrapper, self.plan.samples
        seeds = [self.seed * 1_000_003 + index * 1_000 + j for j in range(n)]
        out = generate(w.model, w.tokenizer, self._prompt_ids(prompt), num_rows=n,
                       max_new_tokens=self.plan.max_new_tokens, schedule=w.knobs(s, seeds),
                       seeds=seeds)
        texts = [t or " " for t in out.texts]
        scores = w.quality.breakdown(texts, [self.reference(prompt)], prompt,
                                     validators=self.validators)
        means = tuple(float(np.mean([getattr(q, k) for q in scores]))
                      for k in ("novelty", "diversity", "incoherence", "violations"))
        flagged = math.nan
        if self.safety is not None:
            from ..safety import run_checks

            outcome = run_checks(self.safety, texts)
            if not outcome.ok:
                raise RuntimeError(outcome.reason)
            flagged = sum(bool(f) for f in outcome.flags) / len(texts)
        return (*means, flagged), texts[0]


def _make_measurer(model_name, model, tokenizer, task, plan, weights, sparsity_config, seed):
    if model is None:
        from ..models import load_model

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
                point = tuple(point) + (math.nan,) * (5 - len(point))   # no flagged rate
                examples.setdefault(s, text)
            except Exception as err:  # one failed point must not lose the sweep
                logger.warning("sweep point s=%.4f, prompt %d failed: %r", s, k, err)
                errors.append(f"s={s:.4f}, prompt {k}: {type(err).__name__}: {err}")
                point = (math.nan,) * 5
            row.append(point)
            bar.update(1)
        values[s] = row
        q = np.asarray(row, float)[:, :4] @ w[:4]   # the flagged rate is not part of Q
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
    per = [tuple(tuple(c[g][i] for g in range(len(order))) for c in cols) for i in range(5)]
    flagged = per[4] if any(not math.isnan(v) for row in per[4] for v in row) else ()
    return Measurements(tuple(order), *per[:4], tuple(examples.get(s, "") for s in order),
                        tuple(errors), flagged)


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

