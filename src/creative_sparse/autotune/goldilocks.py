"""The Goldilocks model of Q(s): fitted curves, s*, the Corollary-1 bounds, Theorem 1's check.

Each measured curve over the sparsity level s in [0, 1] is fitted by bounded
non-linear least squares to one family (``docs/goldilocks.md`` has the derivations):

    Novelty      N(s) = n0 + a1 * s**mu                   a1 >= 0, mu > 0
    Incoherence  I(s) = i0 + a2 * s**nu                   a2 >= 0, nu > 0
    Diversity    D(s) = d0 + a3 * (1 - exp(-kappa * s))   a3 >= 0, kappa > 0  (saturating)
    Q(s)         = alpha * N(s) + beta * D(s) - gamma * I(s)

The constants n0, d0, i0 are the levels at s = 0 (sampling at the dial's base
temperature already strays from the greedy reference); they drop out of dQ/ds,
so s* and the bounds are exactly those of the seed's model without them.

With A1: ``alpha, gamma > 0``, ``a1, a2 > 0``, ``0 < mu < nu`` (and D nondecreasing,
which the family guarantees), every maximiser of Q on [0, 1] satisfies

    s* >= L = (alpha a1 mu / (gamma a2 nu)) ** (1 / (nu - mu))       (the seed's lower bound)

because dQ/ds >= s**(mu-1) * (alpha a1 mu - gamma a2 nu s**(nu-mu)) > 0 below L. If
also A2: ``nu > 1``, then D' <= a3 kappa gives

    s* <= U = min(1, ((alpha a1 mu M + beta a3 kappa) / (gamma a2 nu)) ** (1 / (nu - 1)))

with ``M = max(1, L**(mu - 1))``, the largest value of s**(mu-1) on [L, 1]. The
seed's upper bound ``U_seed = min(1, (beta a3 kappa / (gamma a2 nu)) ** (1/(nu-1)))``
drops the novelty term: it is exact when ``alpha a1 = 0`` and otherwise holds only
when dQ/ds <= 0 at U_seed, which :class:`CorollaryBounds` reports
(``seed_upper_holds``) instead of assuming. Theorem 1: if dQ/ds changes sign exactly
once, from + to -, the interior maximiser is unique (:func:`sign_changes`).

Example:
    >>> import numpy as np
    >>> s = np.linspace(0, 1, 11)
    >>> fit = fit_goldilocks(s, 0.2 * s**0.8, 0.05 + 0.2 * (1 - np.exp(-4 * s)), 0.6 * s**3)
    >>> round(fit.s_star, 3), fit.identified, fit.bounds.contains(fit.s_star)
    (0.458, True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import least_squares, minimize_scalar, nnls

from ..config import QualityWeights

__all__ = [
    "BootstrapResult",
    "CorollaryBounds",
    "GoldilocksFit",
    "GoldilocksParams",
    "bootstrap_fit",
    "corollary_bounds",
    "fit_goldilocks",
    "fit_params",
    "maximize_q",
    "measured_optimum",
    "sign_changes",
]

# Bounds of the non-linear parameters (exponents, saturation rate) and amplitudes.
EXPONENT_RANGE = (0.05, 12.0)
KAPPA_RANGE = (0.05, 60.0)
AMPLITUDE_MAX = 50.0
_GRID = 2001                    # dense grid for argmax and sign changes of the fitted Q
_RISE_MIN = 1e-4                # a curve rising less than this over [0, 1] is flat


def _power(s: np.ndarray, p: float) -> np.ndarray:
    return np.power(s, p)


def _saturating(s: np.ndarray, k: float) -> np.ndarray:
    return -np.expm1(-k * s)


@dataclass(frozen=True)
class GoldilocksParams:
    """Fitted constants of the three curves (see the module docstring)."""

    n0: float
    a1: float
    mu: float
    d0: float
    a3: float
    kappa: float
    i0: float
    a2: float
    nu: float

    def novelty(self, s) -> np.ndarray:
        """N(s) = n0 + a1 s^mu."""
        return self.n0 + self.a1 * _power(np.asarray(s, float), self.mu)

    def diversity(self, s) -> np.ndarray:
        """D(s) = d0 + a3 (1 - exp(-kappa s))."""
        return self.d0 + self.a3 * _saturating(np.asarray(s, float), self.kappa)

    def incoherence(self, s) -> np.ndarray:
        """I(s) = i0 + a2 s^nu."""
        return self.i0 + self.a2 * _power(np.asarray(s, float), self.nu)

    def q(self, s, weights: QualityWeights) -> np.ndarray:
        """Q(s) = alpha N + beta D - gamma I."""
        w = weights
        return w.alpha * self.novelty(s) + w.beta * self.diversity(s) - w.gamma * self.incoherence(s)

    def dq(self, s, weights: QualityWeights) -> np.ndarray:
        """dQ/ds (s > 0): alpha a1 mu s^(mu-1) + beta a3 kappa e^(-kappa s) - gamma a2 nu s^(nu-1)."""
        s, w = np.asarray(s, float), weights
        return (w.alpha * self.a1 * self.mu * _power(s, self.mu - 1)
                + w.beta * self.a3 * self.kappa * np.exp(-self.kappa * s)
                - w.gamma * self.a2 * self.nu * _power(s, self.nu - 1))


@dataclass(frozen=True)
class CorollaryBounds:
    """Corollary 1: ``lower <= s* <= upper`` (rigorous under A1, A2; see module doc).

    ``upper_seed`` is the seed's upper bound (None when nu <= 1, where its exponent
    has the wrong sign); ``seed_upper_holds`` says whether dQ/ds <= 0 there, the
    condition under which it bounds s* when dQ/ds changes sign once. ``notes`` say
    which assumption limited a bound.
    """

    lower: float
    upper: float
    upper_seed: float | None
    seed_upper_holds: bool
    notes: tuple[str, ...] = ()

    def contains(self, s: float, tol: float = 1e-6) -> bool:
        """Whether ``lower - tol <= s <= upper + tol``."""
        return self.lower - tol <= s <= self.upper + tol


@dataclass(frozen=True)
class GoldilocksFit:
    """The fitted model and what follows from it.

    ``s_star``/``q_star``: argmax of the fitted Q on [0, 1] and its value;
    ``interior``: s* is neither end of [0, 1]; ``sign_changes``: how often the fitted
    dQ/ds changes sign on (0, 1]; ``bounds``: Corollary 1 (None when A1 fails);
    ``rmse``: root-mean-square residual of N, D, I and Q; ``issues``: every reason
    the model does not identify a unique interior optimum (empty = it does).
    """

    params: GoldilocksParams
    weights: QualityWeights
    s_star: float
    q_star: float
    interior: bool
    sign_changes: int
    bounds: CorollaryBounds | None
    rmse: tuple[float, float, float, float]
    issues: tuple[str, ...]

    @property
    def identified(self) -> bool:
        """True when every assumption holds and Q has a unique interior maximum."""
        return not self.issues


# ---------------------------------------------------------------- curve fitting
def _fit_curve(s: np.ndarray, y: np.ndarray, basis, p_range: tuple[float, float]
               ) -> tuple[float, float, float]:
    """Least squares ``y ~ c + a * basis(s, p)`` with ``c, a >= 0`` and p in ``p_range``.

    The starting point comes from variable projection (for fixed p the model is
    linear: non-negative least squares; the profile cost is minimised over a
    log-spaced grid of p, then by bounded scalar search); a bounded non-linear
    least-squares pass over (c, a, p) polishes it.
    """
    def linear(p: float) -> tuple[np.ndarray, float]:
        A = np.column_stack([np.ones_like(s), basis(s, p)])
        x, r = nnls(A, y)
        return x, r * r

    grid = np.geomspace(*p_range, 40)
    costs = [linear(p)[1] for p in grid]
    i = int(np.argmin(costs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(lambda p: linear(p)[1], bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6})
    p = float(res.x) if res.fun <= costs[i] else float(grid[i])
    (c, a), cost = linear(p)
    if a <= 0.0:  # a flat curve: the exponent is unidentified, keep the grid's pick
        return float(c), 0.0, p

    def resid(x: np.ndarray) -> np.ndarray:
        return x[0] + x[1] * basis(s, x[2]) - y

    x0 = np.clip([c, a, p], [0.0, 0.0, p_range[0]], [AMPLITUDE_MAX, AMPLITUDE_MAX, p_range[1]])
    polished = least_squares(resid, x0, bounds=([0.0, 0.0, p_range[0]],
                                                [AMPLITUDE_MAX, AMPLITUDE_MAX, p_range[1]]),
                             x_scale="jac", xtol=1e-12, ftol=1e-12)
    if 2 * polished.cost <= cost:
        c, a, p = polished.x
    return float(c), float(a), float(p)


def _check_curves(s, *curves) -> tuple[np.ndarray, ...]:
    s = np.asarray(s, dtype=float).ravel()
    out = [s]
    for name, y in zip(("novelty", "diversity", "incoherence"), curves):
        y = np.asarray(y, dtype=float).ravel()
        if y.shape != s.shape:
            raise ValueError(f"{name} has {y.size} values for {s.size} levels")
        out.append(y)
    if s.size < 3:
        raise ValueError(f"need at least 3 levels to fit the Goldilocks model, got {s.size}")
    if not np.all(np.isfinite(np.stack(out))):
        raise ValueError("levels and curves must be finite (drop failed levels first)")
    if s.min() < 0 or s.max() > 1:
        raise ValueError(f"levels must lie in [0, 1], got [{s.min():g}, {s.max():g}]")
    if np.unique(s).size < 3:
        raise ValueError(f"need at least 3 distinct levels, got {np.unique(s).size}")
    return tuple(out)


def fit_params(s: Sequence[float], novelty: Sequence[float], diversity: Sequence[float],
               incoherence: Sequence[float]) -> GoldilocksParams:
    """Fit the three curves (means over prompts at each level ``s``); no analysis.

    Example:
        >>> import numpy as np
        >>> s = np.linspace(0, 1, 6)
        >>> p = fit_params(s, 0.1 + 0.2 * s**0.5, 0.2 * (1 - np.exp(-3 * s)), 0.5 * s**2)
        >>> round(p.mu, 3), round(p.kappa, 3), round(p.nu, 3)
        (0.5, 3.0, 2.0)
    """
    s, n, d, i = _check_curves(s, novelty, diversity, incoherence)
    n0, a1, mu = _fit_curve(s, n, _power, EXPONENT_RANGE)
    d0, a3, kappa = _fit_curve(s, d, _saturating, KAPPA_RANGE)
    i0, a2, nu = _fit_curve(s, i, _power, EXPONENT_RANGE)
    return GoldilocksParams(n0, a1, mu, d0, a3, kappa, i0, a2, nu)


# ---------------------------------------------------------------- analysis
def maximize_q(params: GoldilocksParams, weights: QualityWeights) -> tuple[float, float]:
    """``(s*, Q(s*))``: the argmax of the fitted Q on [0, 1] (dense grid, then a bounded
    scalar search in the best grid cell)."""
    grid = np.linspace(0.0, 1.0, _GRID)
    q = params.q(grid, weights)
    i = int(np.argmax(q))
    best_s, best_q = float(grid[i]), float(q[i])
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, _GRID - 1)]
    res = minimize_scalar(lambda x: -float(params.q(x, weights)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-9})
    if -res.fun > best_q:
        best_s, best_q = float(res.x), float(-res.fun)
    return best_s, best_q


def sign_changes(values: Sequence[float], tol: float = 0.0) -> int:
    """How often ``values`` change sign, ignoring entries with ``|v| <= tol``.

    Example:
        >>> sign_changes([3, 1, 0, -1, -2]), sign_changes([1, -1, 1]), sign_changes([0, 0])
        (1, 2, 0)
    """
    v = np.asarray(values, dtype=float)
    signs = np.sign(v[np.abs(v) > tol])
    return int(np.count_nonzero(np.diff(signs)))


def _dq_on_grid(params: GoldilocksParams, weights: QualityWeights) -> np.ndarray:
    grid = np.linspace(1.0 / (_GRID - 1), 1.0, _GRID - 1)   # s = 0 excluded: s^(mu-1) blows up
    return params.dq(grid, weights)


def corollary_bounds(params: GoldilocksParams, weights: QualityWeights
                     ) -> tuple[CorollaryBounds | None, tuple[str, ...]]:
    """Corollary-1 bounds on s*, or ``(None, reasons)`` when assumption A1 fails.

    See the module docstring for A1, A2 and the formulas.

    Example:
        >>> p = GoldilocksParams(0, 0.2, 0.8, 0, 0.2, 4.0, 0, 0.6, 3.0)
        >>> b, why = corollary_bounds(p, QualityWeights())
        >>> round(b.lower, 3), round(b.upper, 3), round(b.upper_seed, 3), b.seed_upper_holds
        (0.379, 0.767, 0.667, True)
    """
    w, p = weights, params
    reasons = []
    if w.gamma <= 0 or p.a2 <= 0:
        reasons.append("gamma * a2 = 0: nothing penalises sparsity, Q never turns down")
    if p.mu >= p.nu:
        reasons.append(f"mu = {p.mu:.3g} >= nu = {p.nu:.3g}: incoherence does not outgrow "
                       "novelty, so the lower bound's exponent 1/(nu - mu) is not positive")
    if reasons:
        return None, tuple(reasons)
    notes = []
    novelty_slope = w.alpha * p.a1 * p.mu
    penalty = w.gamma * p.a2 * p.nu
    lower = 0.0 if novelty_slope == 0 else (novelty_slope / penalty) ** (1.0 / (p.nu - p.mu))
    if lower >= 1.0:
        notes.append(f"L = {lower:.3g} >= 1: Q rises on all of [0, 1], no interior optimum")
    lower = min(lower, 1.0)
    if p.nu <= 1.0:
        notes.append(f"nu = {p.nu:.3g} <= 1 (A2 fails): no upper bound below 1")
        return CorollaryBounds(lower, 1.0, None, False, tuple(notes)), ()
    m = 1.0 if (p.mu >= 1.0 or novelty_slope == 0) else lower ** (p.mu - 1.0)
    diversity_slope = w.beta * p.a3 * p.kappa
    upper = min(1.0, ((novelty_slope * m + diversity_slope) / penalty) ** (1.0 / (p.nu - 1.0)))
    upper_seed = min(1.0, (diversity_slope / penalty) ** (1.0 / (p.nu - 1.0)))
    holds = upper_seed >= 1.0 or (upper_seed > 0 and float(p.dq(upper_seed, w)) <= 0.0)
    if not holds:
        notes.append(f"dQ/ds > 0 at the seed's U = {upper_seed:.3g}: the novelty term it drops "
                     "matters here, so s* may exceed it")
    return CorollaryBounds(lower, max(upper, lower), upper_seed, bool(holds), tuple(notes)), ()


def fit_goldilocks(s: Sequence[float], novelty: Sequence[float], diversity: Sequence[float],
                   incoherence: Sequence[float], weights: QualityWeights | None = None, *,
                   q_tolerance: float | None = None) -> GoldilocksFit:
    """Fit the Goldilocks model to measured curves and analyse it.

    Args:
        s: levels ``[G]`` in [0, 1] (at least 3 distinct).
        novelty, diversity, incoherence: the measured means ``[G]`` at each level.
        weights: alpha, beta, gamma (default ``QualityWeights()``).
        q_tolerance: the largest RMS misfit of Q that counts as a fit (the noise of
            the measured Q); default a tenth of the measured Q's range.

    Returns:
        A :class:`GoldilocksFit`; ``fit.issues`` says why (if) it identifies no
        unique interior optimum: assumption A1 fails, a curve does not rise, Q has
        no interior maximum, dQ/ds changes sign other than once, or the model does
        not describe the measurements.
    """
    weights = weights if weights is not None else QualityWeights()
    s, n, d, i = _check_curves(s, novelty, diversity, incoherence)
    params = fit_params(s, n, d, i)
    w = weights
    q_meas = w.alpha * n + w.beta * d - w.gamma * i
    res = [float(np.sqrt(np.mean((f - y) ** 2))) for f, y in
           ((params.novelty(s), n), (params.diversity(s), d), (params.incoherence(s), i),
            (params.q(s, w), q_meas))]
    issues = []
    for name, weight, rise in (("novelty", w.alpha, params.a1),
                               ("incoherence", w.gamma, params.a2)):
        if weight > 0 and rise < _RISE_MIN:
            issues.append(f"{name} does not rise with s (fitted rise {rise:.2g})")
    bounds, reasons = corollary_bounds(params, w)
    issues.extend(reasons)
    s_star, q_star = maximize_q(params, w)
    q_grid = params.q(np.linspace(0, 1, _GRID), w)
    margin = 1e-9 * max(1.0, float(np.abs(q_grid).max()))
    interior = (1e-3 < s_star < 1 - 1e-3
                and q_star > max(q_grid[0], q_grid[-1]) + margin)
    if not interior:
        issues.append(f"the fitted Q has no interior maximum (argmax at s = {s_star:.3g})")
    dq = _dq_on_grid(params, w)
    changes = sign_changes(dq, tol=1e-9 * max(1.0, float(np.abs(dq).max())))
    first = dq[np.abs(dq) > 1e-9 * max(1.0, float(np.abs(dq).max()))]
    if changes != 1 or (first.size and first[0] < 0):
        issues.append(f"dQ/ds changes sign {changes} time(s) on (0, 1]; Theorem 1 needs exactly "
                      "one change, from + to -")
    tol = q_tolerance if q_tolerance is not None else 0.1 * float(np.ptp(q_meas))
    if res[3] > max(tol, 1e-9):
        issues.append(f"the model does not describe the measured Q (RMS misfit {res[3]:.3g} > "
                      f"tolerance {tol:.3g})")
    if bounds is not None and interior and not bounds.contains(s_star, 1e-4):
        issues.append(f"s* = {s_star:.3g} lies outside the Corollary-1 bounds "
                      f"[{bounds.lower:.3g}, {bounds.upper:.3g}]")
    return GoldilocksFit(params, w, s_star, q_star, bool(interior), changes, bounds,
                         tuple(res), tuple(issues))


def measured_optimum(s: Sequence[float], q: Sequence[float]) -> float:
    """s* from the measurements: the best level, refined by the vertex of the parabola
    through it and its two neighbours (kept between them); an end level is returned as is.

    Example:
        >>> round(measured_optimum([0, 0.25, 0.5, 0.75, 1], [0.1, 0.3, 0.35, 0.2, 0.0]), 4)
        0.4375
    """
    s = np.asarray(s, dtype=float)
    q = np.asarray(q, dtype=float)
    order = np.argsort(s)
    s, q = s[order], q[order]
    k = int(np.nanargmax(q))
    if k == 0 or k == len(s) - 1:
        return float(s[k])
    x0, x1, x2 = s[k - 1: k + 2]
    y0, y1, y2 = q[k - 1: k + 2]
    # Lagrange parabola through three unequally spaced points: its vertex.
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    if not a < 0:
        return float(s[k])
    return float(np.clip(-b / (2 * a), x0, x2))


# ---------------------------------------------------------------- bootstrap over prompts
@dataclass(frozen=True)
class BootstrapResult:
    """Percentile intervals from resampling prompts with replacement.

    ``s_star_fit`` and ``s_star_measured``: intervals of the two s* estimates
    (``s_star_fit`` is None when no resample could be fitted); ``novelty``,
    ``diversity``, ``incoherence``, ``q``: one ``(lo, hi)`` per level; ``q_gap``: the
    interval of Q at the best measured level minus Q at the worst, on the same
    resampled prompts (paired; its lower end <= 0 means the levels are not told
    apart); ``unidentified``: resamples that could not be fitted or whose fitted Q
    peaks at an end of [0, 1].
    """

    level: float
    n_boot: int
    s_star_fit: tuple[float, float] | None
    s_star_measured: tuple[float, float]
    novelty: tuple[tuple[float, float], ...]
    diversity: tuple[tuple[float, float], ...]
    incoherence: tuple[tuple[float, float], ...]
    q: tuple[tuple[float, float], ...]
    q_gap: tuple[float, float]
    unidentified: int


def bootstrap_fit(s: Sequence[float], novelty, diversity, incoherence,
                  weights: QualityWeights | None = None, *, n_boot: int = 200,
                  level: float = 0.95, seed: int = 0, refit: bool = True) -> BootstrapResult:
    """Bootstrap over prompts: intervals of the per-level means and of s*.

    Args:
        s: levels ``[G]``.
        novelty, diversity, incoherence: per-prompt means ``[P, G]`` (NaN where a
            measurement failed).
        n_boot: resamples; level: interval coverage; seed: the generator's seed (any
            int; taken modulo 2**64).
        refit: also refit the model on each resample (for ``s_star_fit``).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    weights = weights if weights is not None else QualityWeights()
    s = np.asarray(s, dtype=float)
    curves = np.stack([np.asarray(c, dtype=float) for c in (novelty, diversity, incoherence)])
    if curves.ndim != 3 or curves.shape[2] != s.size:
        raise ValueError(f"per-prompt curves must have shape [P, {s.size}], got "
                         f"{curves.shape[1:]}")
    w = weights
    coef = np.array([w.alpha, w.beta, -w.gamma])
    rng = np.random.default_rng(int(seed) % 2**64)   # numpy refuses negative seeds
    n_prompts = curves.shape[1]
    means = np.empty((n_boot, 4, s.size))
    stars_fit, stars_meas, bad = [], [], 0
    for b in range(n_boot):
        idx = rng.integers(0, n_prompts, n_prompts)
        with np.errstate(invalid="ignore"):
            m = np.nanmean(curves[:, idx, :], axis=1) if n_prompts else curves[:, 0]
        q = np.tensordot(coef, m, axes=1)
        means[b, :3], means[b, 3] = m, q
        ok = np.isfinite(q)
        if ok.sum() < 1:
            bad += 1
            continue
        stars_meas.append(measured_optimum(s[ok], q[ok]))
        if refit:
            if np.unique(s[ok]).size < 3:
                bad += 1
                continue
            params = fit_params(s[ok], *m[:, ok])
            star = maximize_q(params, w)[0]
            stars_fit.append(star)
            bad += not 1e-3 < star < 1 - 1e-3
    alpha = (1 - level) / 2

    def interval(x) -> tuple[float, float]:
        lo, hi = np.nanquantile(x, [alpha, 1 - alpha])
        return float(lo), float(hi)

    with np.errstate(invalid="ignore"):
        per_level = [tuple(interval(means[:, k, g]) if np.isfinite(means[:, k, g]).any()
                           else (math.nan, math.nan) for g in range(s.size)) for k in range(4)]
        full = np.tensordot(coef, np.nanmean(curves, axis=1), axes=1)
    nan2 = (math.nan, math.nan)
    if np.isfinite(full).sum() >= 2:
        gap = interval(means[:, 3, np.nanargmax(full)] - means[:, 3, np.nanargmin(full)])
    else:
        gap = nan2
    return BootstrapResult(level, n_boot, interval(stars_fit) if stars_fit else None,
                           interval(stars_meas) if stars_meas else nan2,
                           *per_level, q_gap=gap, unidentified=bad)
