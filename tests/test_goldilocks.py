"""The Goldilocks model: recovery of s* from synthetic curves, Corollary-1 bounds,
Theorem 1's sign check, and what the fit says when the assumptions fail."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creative_sparse.config import QualityWeights
from creative_sparse.autotune.goldilocks import (GoldilocksParams, bootstrap_fit, corollary_bounds,
                                                fit_goldilocks, fit_params, maximize_q,
                                                measured_optimum, sign_changes)

LEVELS = np.linspace(0, 1, 11)


@st.composite
def goldilocks_curves(draw):
    """Curves satisfying A1 and A2 (a's > 0, 0 < mu < nu, nu > 1) whose Q has its
    stationary point at a drawn s* in [0.15, 0.85]: a2 is solved from dQ/ds(s*) = 0."""
    w = QualityWeights(draw(st.floats(0.1, 1.0)), draw(st.floats(0.0, 1.0)),
                       draw(st.floats(0.1, 1.0)))
    a1 = draw(st.floats(0.02, 0.5))
    mu = draw(st.floats(0.3, 2.0))
    nu = draw(st.floats(max(mu + 0.5, 1.2), 6.0))
    a3, kappa = draw(st.floats(0.0, 0.4)), draw(st.floats(0.5, 15.0))
    target = draw(st.floats(0.15, 0.85))
    n0, d0, i0 = (draw(st.floats(0.0, 0.3)) for _ in range(3))
    a2 = ((w.alpha * a1 * mu * target ** (mu - 1) + w.beta * a3 * kappa * math.exp(-kappa * target))
          / (w.gamma * nu * target ** (nu - 1)))
    return GoldilocksParams(n0, a1, mu, d0, a3, kappa, i0, a2, nu), w


def _measure(params, w, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [f(LEVELS) + rng.normal(0.0, noise, LEVELS.size) if noise else f(LEVELS)
            for f in (params.novelty, params.diversity, params.incoherence)]


def _true_optimum(params, w):
    """Brute force on a fine grid: independent of the code under test."""
    grid = np.linspace(0, 1, 200_001)
    return float(grid[np.argmax(params.q(grid, w))])


@settings(max_examples=150, deadline=None)
@given(goldilocks_curves())
def test_fit_recovers_s_star_and_it_lies_inside_the_bounds(case):
    params, w = case
    truth = _true_optimum(params, w)
    fit = fit_goldilocks(LEVELS, *_measure(params, w), w)
    assert abs(fit.s_star - truth) <= 0.02
    assert fit.identified, fit.issues
    assert fit.interior and fit.sign_changes == 1
    assert fit.bounds.contains(fit.s_star)
    true_bounds, reasons = corollary_bounds(params, w)
    assert not reasons and true_bounds.contains(truth, tol=1e-4)
    if true_bounds.seed_upper_holds:       # the seed's bound, where the code says it applies
        assert truth <= true_bounds.upper_seed + 1e-4


@settings(max_examples=100, deadline=None)
@given(goldilocks_curves(), st.integers(0, 2**16))
def test_fit_recovers_s_star_from_noisy_curves(case, seed):
    """Noise at a tenth of how much Q drops 0.1 away from s*: still within 0.02."""
    params, w = case
    truth = _true_optimum(params, w)
    q_star = params.q(truth, w)
    drop = q_star - max(params.q(max(0.0, truth - 0.1), w), params.q(min(1.0, truth + 0.1), w))
    fit = fit_goldilocks(LEVELS, *_measure(params, w, noise=0.1 * drop, seed=seed), w)
    assert abs(fit.s_star - truth) <= 0.02


@settings(max_examples=100, deadline=None)
@given(goldilocks_curves())
def test_the_seeds_upper_bound_is_flagged_when_it_fails(case):
    params, w = case
    bounds, _ = corollary_bounds(params, w)
    truth = _true_optimum(params, w)
    if bounds.upper_seed is not None and truth > bounds.upper_seed + 1e-4:
        assert not bounds.seed_upper_holds
        assert any("seed" in n for n in bounds.notes)


def test_seed_upper_bound_fails_without_diversity_and_says_so():
    # a3 = 0: the seed's bound is (0)^(...) = 0 although s* is interior.
    params = GoldilocksParams(0.0, 0.3, 0.7, 0.1, 0.0, 1.0, 0.0, 0.5, 3.0)
    bounds, _ = corollary_bounds(params, QualityWeights())
    s_star, _ = maximize_q(params, QualityWeights())
    assert 0.1 < s_star < 0.9 and bounds.upper_seed == 0.0
    assert not bounds.seed_upper_holds and bounds.contains(s_star)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.05, 0.5), st.floats(1.2, 4.0), st.floats(0.2, 0.9), st.floats(0.05, 0.5))
def test_incoherence_slower_than_novelty_is_reported(a1, mu, frac, a2):
    """mu >= nu violates A1: no bounds, and the fit says why instead of a bare number."""
    nu = frac * mu
    params = GoldilocksParams(0.1, a1, mu, 0.2, 0.1, 3.0, 0.0, a2, nu)
    w = QualityWeights()
    fit = fit_goldilocks(LEVELS, *_measure(params, w), w)
    assert not fit.identified
    assert fit.params.mu >= fit.params.nu and fit.bounds is None
    assert any("incoherence does not outgrow novelty" in issue for issue in fit.issues)


@pytest.mark.parametrize("curves,expect", [
    # incoherence flat: Q keeps rising, the argmax is s = 1
    (lambda s: (0.1 + 0.2 * s ** 0.7, 0.2 + 0.1 * (1 - np.exp(-3 * s)), 0.05 + 0 * s),
     "no interior maximum"),
    # Q has two bumps (novelty oscillates): not the model's family
    (lambda s: (0.3 + 0.15 * np.sin(4 * np.pi * s), 0.2 + 0 * s, 0.3 * s ** 2), None),
    # novelty falls with s: the model's novelty cannot fit it
    (lambda s: (0.4 - 0.3 * s, 0.2 + 0.1 * (1 - np.exp(-3 * s)), 0.2 * s ** 2),
     "novelty does not rise"),
], ids=["monotone-Q", "two-bumps", "falling-novelty"])
def test_curves_that_violate_the_model_are_flagged(curves, expect):
    fit = fit_goldilocks(LEVELS, *curves(LEVELS), QualityWeights())
    assert not fit.identified and fit.issues
    if expect:
        assert any(expect in issue for issue in fit.issues), fit.issues


def test_known_parameters_are_recovered():
    truth = GoldilocksParams(0.2, 0.15, 0.6, 0.1, 0.2, 5.0, 0.02, 0.4, 2.5)
    got = fit_params(LEVELS, truth.novelty(LEVELS), truth.diversity(LEVELS),
                     truth.incoherence(LEVELS))
    for name in ("n0", "a1", "mu", "d0", "a3", "kappa", "i0", "a2", "nu"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=1e-3, abs=1e-5), name


def test_bounds_match_the_formulas():
    p = GoldilocksParams(0, 0.2, 0.8, 0, 0.2, 4.0, 0, 0.6, 3.0)
    w = QualityWeights(0.4, 0.3, 0.3)
    b, reasons = corollary_bounds(p, w)
    lower = (0.4 * 0.2 * 0.8 / (0.3 * 0.6 * 3.0)) ** (1 / (3.0 - 0.8))
    seed_upper = (0.3 * 0.2 * 4.0 / (0.3 * 0.6 * 3.0)) ** (1 / 2.0)
    upper = ((0.4 * 0.2 * 0.8 * lower ** (0.8 - 1) + 0.3 * 0.2 * 4.0) / (0.3 * 0.6 * 3.0)) ** 0.5
    assert not reasons
    assert (b.lower, b.upper_seed, b.upper) == pytest.approx((lower, seed_upper, upper))


def test_nu_at_most_one_gives_no_upper_bound():
    p = GoldilocksParams(0, 0.2, 0.3, 0, 0.1, 2.0, 0, 0.5, 0.9)
    b, reasons = corollary_bounds(p, QualityWeights())
    assert not reasons and b.upper == 1.0 and b.upper_seed is None
    assert any("nu" in n for n in b.notes)


def test_sign_changes():
    assert sign_changes([1, 0.5, -0.1, -2]) == 1
    assert sign_changes([1, -1, 1, -1]) == 3
    assert sign_changes([1e-12, -1e-12, 1], tol=1e-9) == 0


@pytest.mark.parametrize("s,q,expect", [
    ([0, 0.5, 1], [0.0, 1.0, 0.0], 0.5),
    ([0, 0.2, 0.6, 1], [1 - (x - 0.3) ** 2 for x in (0, 0.2, 0.6, 1)], 0.3),   # unequal spacing
    ([0, 0.5, 1], [3.0, 2.0, 1.0], 0.0),                                        # end level
    ([1, 0, 0.5], [0.0, 0.0, 1.0], 0.5),                                        # unsorted input
], ids=["symmetric", "unequal-spacing", "end", "unsorted"])
def test_measured_optimum(s, q, expect):
    assert measured_optimum(s, q) == pytest.approx(expect)


def test_bootstrap_is_seeded_and_brackets_the_truth():
    params = GoldilocksParams(0.2, 0.15, 0.6, 0.1, 0.2, 5.0, 0.02, 0.4, 2.5)
    w = QualityWeights()
    rng = np.random.default_rng(3)
    s = np.linspace(0, 1, 7)
    per = [f(s) + rng.normal(0, 0.01, (12, s.size))
           for f in (params.novelty, params.diversity, params.incoherence)]
    a = bootstrap_fit(s, *per, w, n_boot=100, seed=1)
    b = bootstrap_fit(s, *per, w, n_boot=100, seed=1)
    assert a == b
    truth = _true_optimum(params, w)
    lo, hi = a.s_star_fit
    assert lo <= hi and lo - 0.05 <= truth <= hi + 0.05
    for g, (qlo, qhi) in enumerate(a.q):
        assert qlo <= qhi
    # identical prompts: every interval collapses to the point
    same = [np.tile(f(s), (5, 1)) for f in (params.novelty, params.diversity, params.incoherence)]
    c = bootstrap_fit(s, *same, w, n_boot=20, seed=0)
    assert all(lo == pytest.approx(hi) for lo, hi in c.novelty)


@pytest.mark.parametrize("kwargs,match", [
    (dict(s=[0, 1], novelty=[0, 1], diversity=[0, 1], incoherence=[0, 1]), "at least 3 levels"),
    (dict(s=[0, 0, 1]), "at least 3 distinct"),
    (dict(s=[0, 0.5, 2]), r"levels must lie in \[0, 1\]"),
    (dict(novelty=[0.1, math.nan, 0.2]), "finite"),
    (dict(novelty=[0.1, 0.2]), "novelty has 2 values for 3 levels"),
], ids=["two-levels", "repeated", "out-of-range", "nan", "shape"])
def test_bad_input(kwargs, match):
    args = dict(s=[0, 0.5, 1], novelty=[0.1, 0.2, 0.3], diversity=[0.1, 0.2, 0.3],
                incoherence=[0.0, 0.1, 0.5])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit_goldilocks(**args)
