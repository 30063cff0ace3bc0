"""find_optimal_sparsity / sweep_sparsity: errors, the sweep procedure on synthetic
measurements (a stand-in for generation), the cache, the CLI, and one small real sweep."""

import json
import math
import time

import numpy as np
import pytest

from creative_sparse import autotune
from creative_sparse.autotune import (REFERENCE_COST, OptimumNotIdentifiedWarning,
                                      SweepFailedError, SweepResult, find_optimal_sparsity,
                                      plan_sweep, sweep_sparsity)
from creative_sparse.cli import main
from creative_sparse.config import QualityWeights
from creative_sparse.autotune.goldilocks import GoldilocksParams, maximize_q

# Q = 0.4 N + 0.3 D - 0.3 I has its maximum at s* = 0.4577 (brute force below).
CURVES = GoldilocksParams(0.2, 0.2, 0.8, 0.05, 0.2, 4.0, 0.0, 0.6, 3.0)


class FakeMeasurer:
    """Synthetic measurements: the curves above plus per-prompt noise (seeded)."""

    def __init__(self, curves=CURVES, noise=0.005, fail=lambda k, s: False):
        self.curves, self.noise, self.fail = curves, noise, fail
        self.calls = []

    def measure(self, index, prompt, s):
        self.calls.append((index, s))
        if self.fail(index, s):
            raise RuntimeError(f"generation exploded at s={s}")
        rng = np.random.default_rng(index * 7919 + int(s * 1e4))
        c = self.curves
        values = [float(f(s)) + rng.normal(0, self.noise) for f in (c.novelty, c.diversity,
                                                                     c.incoherence)]
        return (*values, 0.0), f"text at s={s}"


@pytest.fixture
def fake(monkeypatch):
    holder = {"measurer": FakeMeasurer()}

    def make(model_name, model, tokenizer, task, plan, weights, config, seed):
        holder["plan"] = plan
        return holder["measurer"]

    monkeypatch.setattr(autotune, "_make_measurer", make)
    return holder


def _sweep(tmp_path, **kwargs):
    args = dict(model_name="fake-model", task_type="poetry", compute_budget=0.5,
                cache_dir=tmp_path, progress=False, n_bootstrap=50)
    args.update(kwargs)
    return sweep_sparsity(**args)


def _truth(curves=CURVES, weights=QualityWeights()):
    grid = np.linspace(0, 1, 100_001)
    return float(grid[np.argmax(curves.q(grid, weights))])


# ---------------------------------------------------------------- bad input
def test_unknown_task_lists_the_known_ones(tmp_path, fake):
    with pytest.raises(ValueError, match="unknown task type 'sonnets'; known task types: "
                                         "ad_copy, code, creative_writing, music, poetry"):
        find_optimal_sparsity("fake-model", "sonnets", cache_dir=tmp_path)


@pytest.mark.parametrize("budget", [0, -1.0, math.nan, math.inf, True, "1"],
                         ids=["zero", "negative", "nan", "inf", "bool", "str"])
def test_budget_must_be_positive(tmp_path, fake, budget):
    with pytest.raises(ValueError, match="compute_budget must be a finite number > 0"):
        find_optimal_sparsity("fake-model", "poetry", budget, cache_dir=tmp_path)


def test_too_small_budget_states_the_minimum(tmp_path, fake):
    with pytest.raises(ValueError, match=r"too small: the minimum is 0\.0536 \(2 prompts x 2 "
                                         r"samples x 3 levels x 96 tokens"):
        find_optimal_sparsity("fake-model", "code", 0.05, cache_dir=tmp_path)
    assert "measurer" in fake and "plan" not in fake          # refused before any work
    _sweep(tmp_path, task_type="code", compute_budget=0.0536)   # the stated minimum works


@pytest.mark.parametrize("weights", [(0, 0, 0), {"alpha": 0, "beta": 0, "gamma": 0}],
                         ids=["tuple", "dict"])
def test_all_zero_weights_are_rejected(tmp_path, fake, weights):
    with pytest.raises(ValueError, match="alpha, beta and gamma are all 0"):
        find_optimal_sparsity("fake-model", "poetry", quality_weights=weights,
                              cache_dir=tmp_path)


def test_other_bad_arguments(tmp_path, fake):
    with pytest.raises(ValueError, match="split must be one of"):
        _sweep(tmp_path, split="test")
    with pytest.raises(ValueError, match="at least 3 distinct levels"):
        _sweep(tmp_path, levels=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="outside the allowed range"):
        _sweep(tmp_path, levels=[0.0, 0.5, 1.5])
    with pytest.raises(ValueError, match="without its tokenizer"):
        _sweep(tmp_path, model=object())
    with pytest.raises(ValueError, match="quality_weights must be"):
        _sweep(tmp_path, quality_weights="0.4,0.3,0.3")


# ---------------------------------------------------------------- budget
def test_budget_scales_prompts_samples_and_levels():
    ref = plan_sweep(1.0, 64, 16)
    assert (ref.prompts, ref.samples, ref.levels, ref.cost) == (8, 6, 7, REFERENCE_COST)
    small, big = plan_sweep(0.25, 64, 16), plan_sweep(4.0, 64, 16)
    for a, b in ((small, ref), (ref, big)):
        assert a.prompts <= b.prompts and a.samples <= b.samples and a.levels <= b.levels
        assert a.cost < b.cost
    for budget in (0.06, 0.1, 0.3, 0.7, 1.0, 2.5):
        for tokens in (48, 64, 96):
            p = plan_sweep(budget, tokens, 16)
            assert p.cost <= budget * REFERENCE_COST + 1e-6
            assert p.prompts >= 2 and p.samples >= 2 and p.levels >= 3 and p.coarse >= 3
    assert plan_sweep(100.0, 64, 16).prompts == 16            # never more than the task has


# ---------------------------------------------------------------- the sweep
def test_sweep_finds_the_interior_optimum(tmp_path, fake):
    result = _sweep(tmp_path, compute_budget=1.0)
    plan = fake["plan"]
    assert isinstance(result, SweepResult) and result.method == "fit" and result.identified
    assert abs(result.s_star - _truth()) < 0.03
    lo, hi = result.s_star_ci
    assert lo <= result.s_star <= hi
    assert result.bounds.contains(result.s_star)
    levels = [row.s for row in result.table]
    assert len(levels) == plan.levels and levels == sorted(levels)
    coarse = list(np.round(np.linspace(0, 1, plan.coarse), 4))
    assert levels[0] == 0.0 and levels[-1] == 1.0 and set(coarse) <= set(levels)
    refined = sorted(set(levels) - set(coarse))
    assert refined and all(abs(s - _truth()) < 1 / (plan.coarse - 1) for s in refined)
    assert len(fake["measurer"].calls) == plan.prompts * plan.levels
    # the same prompts at every level (common random numbers live in the seeds)
    assert {k for k, _ in fake["measurer"].calls} == set(range(plan.prompts))
    row = result.table[0]
    assert row.novelty_ci[0] <= row.novelty <= row.novelty_ci[1] and row.prompts_ok == plan.prompts
    text = result.format_table()
    assert "s* = " in text and "Corollary 1:" in text and "dQ/ds changes sign 1 time" in text


def test_flat_curve_returns_its_argmax_and_warns(tmp_path, fake):
    fake["measurer"] = FakeMeasurer(GoldilocksParams(0.3, 0, 1, 0.2, 0, 1, 0.1, 0, 2), noise=0)
    with pytest.warns(OptimumNotIdentifiedWarning, match="optimum is not identified"):
        result = _sweep(tmp_path)
    assert result.method == "argmax" and result.s_star in [row.s for row in result.table]
    with pytest.warns(OptimumNotIdentifiedWarning):   # a cached answer warns again
        assert _sweep(tmp_path).from_cache


def test_monotone_curve_returns_the_measured_optimum_and_says_why(tmp_path, fake):
    rising = GoldilocksParams(0.1, 0.3, 0.8, 0.1, 0.1, 3.0, 0.0, 0.0, 2.0)   # no incoherence
    fake["measurer"] = FakeMeasurer(rising, noise=0)
    with pytest.warns(OptimumNotIdentifiedWarning, match="does not identify s"):
        result = _sweep(tmp_path)
    assert result.method == "measured" and result.s_star == 1.0


def test_failed_points_are_recorded_and_all_failing_is_an_error(tmp_path, fake):
    fake["measurer"] = FakeMeasurer(fail=lambda k, s: k == 0 and s == 0.0)
    result = _sweep(tmp_path)
    assert result.table[0].prompts_ok == fake["plan"].prompts - 1
    assert "generation exploded" in result.measurements.errors[0]
    fake["measurer"] = FakeMeasurer(fail=lambda k, s: True)
    with pytest.raises(SweepFailedError, match="every point of the sweep failed.*generation "
                                               "exploded at s=0.0"):
        _sweep(tmp_path, seed=1)


def test_fixed_levels_are_measured_as_given(tmp_path, fake):
    result = _sweep(tmp_path, split="held_out", levels=[0.0, 0.4577, 0.25, 1.0])
    assert [row.s for row in result.table] == [0.0, 0.25, 0.4577, 1.0]
    assert result.split == "held_out" and fake["plan"].prompts <= 8


def test_the_evaluation_split_is_cached_by_its_own_prompts(tmp_path, fake, monkeypatch):
    """Task.fingerprint leaves the evaluation split out, so its cache key must not rely on it."""
    import dataclasses

    from creative_sparse.evaluation import load_task

    levels = dict(split="evaluation", levels=[0.0, 0.5, 1.0])
    task = load_task("poetry")
    assert not _sweep(tmp_path, **levels).from_cache
    assert _sweep(tmp_path, **levels).from_cache
    edited = dataclasses.replace(task, evaluation=task.evaluation[:-1] + ("A new poem.",))
    monkeypatch.setattr(autotune, "load_task", lambda name: edited)
    assert edited.fingerprint == task.fingerprint
    assert not _sweep(tmp_path, **levels).from_cache


def test_quality_weights_move_the_optimum(tmp_path, fake):
    heavy = QualityWeights(0.4, 0.3, 0.9)
    s_default = find_optimal_sparsity("fake-model", "poetry", 1.0, cache_dir=tmp_path,
                                      progress=False)
    s_heavy = find_optimal_sparsity("fake-model", "poetry", 1.0, heavy, cache_dir=tmp_path,
                                    progress=False)
    assert s_heavy < s_default
    assert abs(s_heavy - maximize_q(CURVES, heavy)[0]) < 0.03


# ---------------------------------------------------------------- cache
def test_second_call_answers_from_the_cache(tmp_path, fake):
    first = _sweep(tmp_path)
    calls = len(fake["measurer"].calls)
    start = time.perf_counter()
    again = _sweep(tmp_path)
    assert time.perf_counter() - start < 1.0
    assert again.from_cache and not first.from_cache
    assert len(fake["measurer"].calls) == calls                 # nothing measured again
    assert again.s_star == first.s_star and again.table == first.table and again.fit == first.fit
    for change in (dict(seed=3), dict(compute_budget=0.6), dict(quality_weights=(0.5, 0.3, 0.2)),
                   dict(max_new_tokens=32), dict(model_name="other-model")):
        assert not _sweep(tmp_path, **change).from_cache, change
    assert not _sweep(tmp_path, cache=False).from_cache
    calls = len(fake["measurer"].calls)
    assert not _sweep(tmp_path, cache="refresh").from_cache       # measured again...
    assert len(fake["measurer"].calls) > calls
    assert _sweep(tmp_path).from_cache                            # ...and written back
    with pytest.raises(ValueError, match="cache must be True, False or 'refresh'"):
        _sweep(tmp_path, cache="yes")


def test_a_damaged_cache_file_is_measured_again(tmp_path, fake):
    _sweep(tmp_path)
    (path,) = (tmp_path / "autotune").glob("poetry-tune-*.json")
    path.write_text("{not json")
    assert not _sweep(tmp_path).from_cache
    assert _sweep(tmp_path).from_cache


def _edit_cached(tmp_path, edit):
    (path,) = (tmp_path / "autotune").glob("poetry-tune-*.json")
    data = json.loads(path.read_text())
    edit(data["result"])
    path.write_text(json.dumps(data))
    return path


CACHED_DAMAGE = {
    "s_star-out-of-range": (lambda r: r.update(s_star=7.5), "result.s_star = 7.5"),
    "s_star-nan": (lambda r: r.update(s_star=math.nan), "result.s_star = nan"),
    "s_star-string": (lambda r: r.update(s_star="0.4"), "result.s_star = '0.4', expected a number"),
    "method-unknown": (lambda r: r.update(method="guess"), "result.method = 'guess'"),
    "plan-not-an-object": (lambda r: r.update(plan=[8, 6]), "result.plan = [8, 6]"),
    "seed-bool": (lambda r: r.update(seed=True), "result.seed = True"),
    "ragged-measurements": (lambda r: r["measurements"]["novelty"][0].pop(),
                            "result.measurements.novelty must be"),
}


@pytest.mark.parametrize("damage,reason", CACHED_DAMAGE.values(), ids=CACHED_DAMAGE.keys())
def test_a_cached_result_of_the_wrong_shape_or_range_is_measured_again(tmp_path, fake, caplog,
                                                                        damage, reason):
    """Issue 21: valid JSON with s* = 7.5 or NaN was returned as is."""
    first = _sweep(tmp_path)
    path = _edit_cached(tmp_path, damage)
    with caplog.at_level("WARNING", logger="creative_sparse.autotune"):
        again = _sweep(tmp_path)
    assert not again.from_cache and again.s_star == first.s_star
    assert str(path) in caplog.text and reason in caplog.text
    assert _sweep(tmp_path).from_cache                          # healed: written back


def test_a_directory_in_place_of_the_cache_file_costs_only_the_cache(tmp_path, fake, caplog):
    _sweep(tmp_path)
    (path,) = (tmp_path / "autotune").glob("poetry-tune-*.json")
    path.unlink()
    path.mkdir()
    with caplog.at_level("WARNING", logger="creative_sparse.autotune"):
        result = _sweep(tmp_path)
    assert not result.from_cache and path.is_dir()
    assert "is a directory" in caplog.text and "not cached" in caplog.text
    assert caplog.text.count(str(path)) >= 2                    # read and write both name it


def test_result_round_trips_through_json(tmp_path, fake):
    result = _sweep(tmp_path)
    back = SweepResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result


def test_plot_writes_a_png(tmp_path, fake):
    path = _sweep(tmp_path).plot(tmp_path / "plots" / "q.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_seed_import_path():
    from spas_sage_attn.autotune import find_optimal_sparsity as seed_find, sweep_sparsity as sw
    assert seed_find is find_optimal_sparsity and sw is sweep_sparsity


# ---------------------------------------------------------------- CLI
def test_cli_tune_prints_the_table_and_writes_the_plot(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setenv("CREATIVE_SPARSE_CACHE", str(tmp_path))
    plot = tmp_path / "cw.png"
    assert main(["tune", "--task", "creative_writing", "--budget", "0.3", "--plot", str(plot),
                 "--held-out"]) == 0
    out = capsys.readouterr().out
    assert "creative_writing (tune split" in out and "creative_writing (held_out split" in out
    assert "held-out: Q at the tuned s* = " in out
    assert plot.is_file() and (tmp_path / "cw_held_out.png").is_file()
    assert main(["tune", "--task", "creative_writing", "--budget", "0.3", "--plot", str(plot),
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0 <= data["s_star"] <= 1 and data["tune"]["from_cache"] is True


@pytest.mark.parametrize("argv,match", [
    (["tune", "--task", "limericks"], "invalid choice: 'limericks'"),
    (["tune", "--task", "poetry", "--budget", "0"], "compute_budget must be a finite number > 0"),
    (["tune", "--task", "poetry", "--budget", "0.001"], "the minimum is"),
], ids=["task", "zero-budget", "tiny-budget"])
def test_cli_tune_rejects_bad_arguments(fake, argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_cli_tune_takes_any_seed_torch_takes(tmp_path, fake, monkeypatch, capsys):
    """Issue 21: --seed -1 failed in the bootstrap (numpy refuses negative seeds), after
    the whole sweep had run; seeds beyond 2**64 / 1000 overflowed the derived ones."""
    monkeypatch.setenv("CREATIVE_SPARSE_CACHE", str(tmp_path))
    for seed in ("-1", str(2**64 - 1)):
        assert main(["tune", "--task", "poetry", "--budget", "0.3", "--seed", seed,
                     "--plot", str(tmp_path / "q.png"), "--json"]) == 0
        assert 0 <= json.loads(capsys.readouterr().out)["s_star"] <= 1


def test_cli_tune_plot_that_fails_after_the_sweep_is_one_line(tmp_path, fake, monkeypatch,
                                                              capsys):
    monkeypatch.setenv("CREATIVE_SPARSE_CACHE", str(tmp_path))

    def disk_full(self, path):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(SweepResult, "plot", disk_full)
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--task", "poetry", "--budget", "0.3", "--plot", str(tmp_path / "q.png")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"creative-sparse: error: [Errno 28] No space left on device: "
                                    f"'{tmp_path / 'q.png'}'")


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::creative_sparse.autotune.OptimumNotIdentifiedWarning")
def test_real_sweep_at_a_tiny_budget(smollm2, tmp_path):
    model, tokenizer = smollm2
    args = dict(model=model, tokenizer=tokenizer, max_new_tokens=8, compute_budget=0.005,
                cache_dir=tmp_path, progress=False, n_bootstrap=20)
    result = sweep_sparsity("smollm2-135m", "creative_writing", **args)
    assert (result.plan.prompts, result.plan.samples, result.plan.levels) == (2, 2, 3)
    assert [row.s for row in result.table] == [0.0, 0.5, 1.0]
    for row in result.table:
        assert row.prompts_ok == 2
        for term in (row.novelty, row.diversity, row.incoherence):
            assert 0.0 <= term <= 1.0
    assert 0.0 <= result.s_star <= 1.0 and result.measurements.examples[0]
    start = time.perf_counter()
    assert sweep_sparsity("smollm2-135m", "creative_writing", **args).from_cache
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_code_task_counts_python_violations(smollm2):
    from creative_sparse.evaluation import load_task
    model, tokenizer = smollm2
    plan = plan_sweep(1.0, 96, 16)
    measurer = autotune._Measurer(model, tokenizer, load_task("code"), plan, QualityWeights(),
                                  None, 0)
    # the measurer hands the task's validators to every breakdown it makes
    parts = measurer.wrapper.quality.breakdown(["def f(:", "def f():\n    pass"], ["x"],
                                               "Write a function f.",
                                               validators=measurer.validators)
    assert [p.violations for p in parts] == [1.0, 0.0] and parts[0].incoherence == 1.0

