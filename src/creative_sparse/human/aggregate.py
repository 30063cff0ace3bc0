"""Human judgements -> per-task, per-method summaries: Bradley-Terry strengths with
bootstrap intervals, win rates and mean 1-5 ratings.

* A vote "left/right better" is a win for one method; a "tie" is half a win for each;
  "both bad" says nothing about which is better, so it is left out of the strengths
  and win rates and reported as a rate of its own.
* Bradley-Terry: P(i beats j) = sigmoid(theta_i - theta_j), fitted by maximum
  likelihood with fractional wins and a weak Gaussian prior (``prior`` / 2 *
  ||theta||^2) that keeps a method that won every vote finite. Strengths are
  reported centred (mean 0 over the task's methods), in log-odds.
* Win rate: (wins + ties / 2) / (decisive votes + ties) of the method, against any other.
* Intervals: percentile bootstrap over the task's votes (resampled with replacement;
  votes are treated as independent, raters and prompts are not clustered).

``choix`` was considered for the fit; it takes whole wins only, so ties would need
duplicated data, and the MLE with scipy (already a dependency) is a few lines.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

__all__ = ["MethodSummary", "bradley_terry", "format_markdown", "human_column", "summarise",
           "write_csv"]


@dataclass(frozen=True)
class MethodSummary:
    """One method on one task: votes counted, Bradley-Terry strength, win rate and the
    mean 1-5 rating, each with its bootstrap interval (``None`` where undefined)."""

    task: str
    method: str
    votes: int          # votes involving the method, "both bad" included
    wins: float         # ties count 1/2
    decided: int        # votes other than "both bad"
    both_bad: int
    strength: float
    strength_ci: tuple[float, float]
    win_rate: float | None
    win_rate_ci: tuple[float, float] | None
    rating: float | None
    rating_n: int
    rating_ci: tuple[float, float] | None


def bradley_terry(wins: np.ndarray, prior: float = 0.01) -> np.ndarray:
    """Bradley-Terry strengths from a win matrix, centred to mean 0.

    Args:
        wins: ``[M, M]``; ``wins[i, j]`` is how often i beat j (fractions allowed).
        prior: weight of the Gaussian prior on the strengths (> 0).

    Returns:
        ``[M]`` log-odds strengths: P(i beats j) = sigmoid(s_i - s_j).

        >>> s = bradley_terry(np.array([[0, 3.], [1, 0]]))
        >>> round(float(s[0] - s[1]), 2)   # log(3) = 1.10, shrunk a little by the prior
        1.09
    """
    wins = np.asarray(wins, dtype=float)
    if wins.ndim != 2 or wins.shape[0] != wins.shape[1] or (wins < 0).any():
        raise ValueError(f"wins must be a square non-negative matrix, got shape {wins.shape}")
    if not prior > 0:
        raise ValueError(f"prior must be > 0, got {prior!r}")
    n = wins + wins.T

    def loss(theta):
        d = theta[:, None] - theta[None, :]
        # -sum w_ij log sigmoid(d_ij); logaddexp(0, -d) = -log sigmoid(d)
        value = (wins * np.logaddexp(0.0, -d)).sum() + 0.5 * prior * theta @ theta
        p = 1.0 / (1.0 + np.exp(-d))
        grad = (n * p - wins).sum(axis=1)    # d/dtheta_i = sum_j n_ij p_ij - w_ij
        return value, grad + prior * theta

    theta = minimize(loss, np.zeros(len(wins)), jac=True, method="L-BFGS-B").x
    return theta - theta.mean()


class _TaskVotes:
    """One task's votes as arrays, so a bootstrap resample is a few numpy calls."""

    def __init__(self, votes: Sequence[Mapping], methods: list[str]):
        idx = {m: k for k, m in enumerate(methods)}
        self.m = len(methods)
        self.left = np.array([idx[v["left"]["method"]] for v in votes])
        self.right = np.array([idx[v["right"]["method"]] for v in votes])
        answer = np.array([v["answer"] for v in votes])
        tie = 0.5 * (answer == "tie")
        self.w_left = (answer == "left") + tie     # credit to the left method
        self.w_right = (answer == "right") + tie
        rated = [(k, idx[v[side]["method"]], v[side + "_rating"]) for k, v in enumerate(votes)
                 for side in ("left", "right") if v.get(side + "_rating") is not None]
        self.r_vote, self.r_method, self.r_value = (np.array(c, dtype=float).reshape(-1)
                                                    for c in zip(*rated)) if rated else \
            (np.zeros(0), np.zeros(0), np.zeros(0))
        self.r_vote = self.r_vote.astype(int)
        self.r_method = self.r_method.astype(int)

    def wins(self, weight: np.ndarray) -> np.ndarray:
        """``[M, M]`` wins with each vote counted ``weight[k]`` times."""
        w = np.zeros((self.m, self.m))
        np.add.at(w, (self.left, self.right), self.w_left * weight)
        np.add.at(w, (self.right, self.left), self.w_right * weight)
        return w

    def ratings(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean rating per method (NaN where none) and the number of ratings."""
        c = weight[self.r_vote]
        n = np.bincount(self.r_method, weights=c, minlength=self.m)
        total = np.bincount(self.r_method, weights=c * self.r_value, minlength=self.m)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, total / np.maximum(n, 1e-300), np.nan), n


def _win_rates(wins: np.ndarray) -> np.ndarray:
    played = (wins + wins.T).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(played > 0, wins.sum(axis=1) / np.maximum(played, 1e-300), np.nan)


def _interval(samples: np.ndarray, confidence: float):
    ok = samples[np.isfinite(samples)]
    if ok.size == 0:
        return None
    lo, hi = np.quantile(ok, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def summarise(votes: Iterable[Mapping], *, bootstrap: int = 1000, confidence: float = 0.95,
              seed: int = 0, prior: float = 0.01) -> list[MethodSummary]:
    """One :class:`MethodSummary` per (task, method) of the votes (export records,
    :func:`creative_sparse.human.store.read_judgements`), sorted by task then method.

    ``bootstrap`` resamples per task (>= 1); the same ``seed`` gives the same intervals.
    """
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 1:
        raise ValueError(f"bootstrap must be an int >= 1, got {bootstrap!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    by_task: dict[str, list[Mapping]] = defaultdict(list)
    for v in votes:
        by_task[v["task"]].append(v)
    if not by_task:
        raise ValueError("no judgements to summarise")
    out = []
    for task in sorted(by_task):
        tv = by_task[task]
        methods = sorted({v[s]["method"] for v in tv for s in ("left", "right")})
        arrays = _TaskVotes(tv, methods)
        ones = np.ones(len(tv))
        wins = arrays.wins(ones)
        strength = bradley_terry(wins, prior)
        rate = _win_rates(wins)
        rating, rating_n = arrays.ratings(ones)
        rng = np.random.default_rng([seed, len(task)] + list(task.encode()))
        boot_s = np.empty((bootstrap, len(methods)))
        boot_w = np.empty((bootstrap, len(methods)))
        boot_r = np.empty((bootstrap, len(methods)))
        for b in range(bootstrap):
            weight = np.bincount(rng.integers(0, len(tv), len(tv)), minlength=len(tv))
            w = arrays.wins(weight.astype(float))
            boot_s[b] = bradley_terry(w, prior)
            boot_w[b] = _win_rates(w)
            boot_r[b] = arrays.ratings(weight.astype(float))[0]
        for k, m in enumerate(methods):
            mine = [v for v in tv if m in (v["left"]["method"], v["right"]["method"])]
            bad = sum(v["answer"] == "both_bad" for v in mine)
            out.append(MethodSummary(
                task, m, len(mine), float(wins[k].sum()), len(mine) - bad, bad,
                float(strength[k]), _interval(boot_s[:, k], confidence),
                None if math.isnan(rate[k]) else float(rate[k]),
                None if math.isnan(rate[k]) else _interval(boot_w[:, k], confidence),
                float(rating[k]) if rating_n[k] else None, int(rating_n[k]),
                _interval(boot_r[:, k], confidence) if rating_n[k] else None))
    return out


def human_column(summaries: Sequence[MethodSummary]) -> dict[tuple[str, str], float]:
    """The evaluation report's ``human`` column: each (task, method)'s win rate."""
    return {(s.task, s.method): s.win_rate for s in summaries if s.win_rate is not None}


def _ci(x: float | None, ci, digits: int = 3) -> str:
    if x is None:
        return "—"
    text = f"{x:.{digits}f}"
    return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def format_markdown(summaries: Sequence[MethodSummary], *, confidence: float = 0.95,
                    title: str = "Human evaluation") -> str:
    """The human-evaluation table per task, as Markdown."""
    from ..evaluation.methods import METHODS

    lines = [f"# {title}", "",
             f"Pairwise votes of raters who saw two outputs of different methods for one "
             f"prompt (sides random, names hidden). Strength: Bradley-Terry log-odds, mean 0 "
             f"per task. Win rate: ties count 1/2, \"both bad\" left out. Rating: mean 1-5. "
             f"[{confidence:.0%} bootstrap interval over votes]."]
    for task in sorted({s.task for s in summaries}):
        lines += ["", f"## {task}", "",
                  "| method | votes | both bad | BT strength | win rate | rating (n) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for s in sorted((s for s in summaries if s.task == task), key=lambda s: -s.strength):
            name = METHODS[s.method].label if s.method in METHODS else s.method
            lines.append(f"| {name} | {s.votes} | {s.both_bad} | "
                         f"{_ci(s.strength, s.strength_ci)} | {_ci(s.win_rate, s.win_rate_ci)} "
                         f"| {_ci(s.rating, s.rating_ci, 2)} ({s.rating_n}) |")
    return "\n".join(lines)


def write_csv(summaries: Sequence[MethodSummary], path: str | Path) -> Path:
    """The summaries as CSV, one row per (task, method), intervals as lo/hi columns."""
    path = Path(path)
    cols = ["task", "method", "votes", "wins", "decided", "both_bad", "strength",
            "strength_lo", "strength_hi", "win_rate", "win_rate_lo", "win_rate_hi", "rating",
            "rating_lo", "rating_hi", "rating_n"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for s in summaries:
            def lohi(ci):
                return list(ci) if ci else ["", ""]
            w.writerow([s.task, s.method, s.votes, s.wins, s.decided, s.both_bad, s.strength,
                        *lohi(s.strength_ci), "" if s.win_rate is None else s.win_rate,
                        *lohi(s.win_rate_ci), "" if s.rating is None else s.rating,
                        *lohi(s.rating_ci), s.rating_n])
    return path
