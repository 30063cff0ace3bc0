"""The evaluation report (evaluation/tables.py) on synthetic results records."""

import copy
import csv
import math
import sys
from dataclasses import fields

import numpy as np
import pytest

from creative_sparse.evaluation.tables import (METHODS, Estimate, Row, aggregate, csv_columns,
                                               format_markdown, frontier_verdicts,
                                               plot_frontiers, write_csv)

HEADER = {"type": "header", "format": "creative-sparse/evaluation-results", "format_version": 1,
          "library_version": "0.1.0", "model": "tiny", "split": "evaluation", "num_outputs": 2}


def output(q=0.1, novelty=0.3, incoherence=0.1, relevance=0.9, nll=2.0, rep3=0.01, **kw):
    return {"text": "x", "q": q, "novelty": novelty, "diversity": 0.4, "incoherence": incoherence,
            "relevance": relevance, "degeneration": 0.0, "nll": nll, "rep3": rep3,
            "violations": 0, "passed": None, "valid": None, **kw}


def unit(task, prompt, method, setting, seed=0, outputs=None, **kw):
    """A unit record; ``kw`` overrides set metrics (diversity, ...) and costs (flops, ...)."""
    sets = {"diversity": 0.4, "distinct": 2, "q_mean": 0.1, "pass_at_k": None,
            "pass_rate": None, "valid_rate": None}
    cost = {"flops": 1e12, "wall_time": 2.0, "peak_kv_bytes": 1000, "generated_tokens": 64,
            "prompt_tokens": 10, "attended_fraction": 1.0}
    for k, v in kw.items():
        (cost if k in cost else sets)[k] = v
    return {"type": "unit", "id": f"{task}/{prompt}/{method}/{setting}/{seed}", "task": task,
            "prompt_index": prompt, "method": method, "knob": METHODS[method][1],
            "setting": setting, "seed": seed,
            "outputs": outputs if outputs is not None else [output(), output()],
            "set": sets, "cost": cost}


def synthetic(tasks=("code", "poetry"), prompts=4, seeds=2, rng_seed=1):
    """Several tasks, every method at two or three settings, noisy metrics."""
    rng = np.random.default_rng(rng_seed)
    settings = {"top_p": (0.7, 1.0, 1.3), "min_p": (0.7, 1.0), "fixed": (0.2, 0.5),
                "progressive": (0.3,), "adaptive": (0.3,), "moe_only": (0.4,),
                "creative_sparse": (0.2, 0.4, 0.6)}
    records = [dict(HEADER)]
    for task in tasks:
        for p in range(prompts):
            records.append({"type": "reference", "task": task, "prompt_index": p, "text": "y"})
            for m, values in settings.items():
                for s in values:
                    for seed in range(seeds):
                        outs = [output(*rng.uniform(0, 1, 4), nll=float(rng.uniform(1, 3)),
                                       rep3=float(rng.uniform(0, 0.1))) for _ in range(2)]
                        extra = ({"pass_at_k": float(rng.integers(0, 2)),
                                  "pass_rate": float(rng.uniform()), "valid_rate": 1.0}
                                 if task == "code" else {})
                        records.append(unit(task, p, m, s, seed, outs,
                                            diversity=float(rng.uniform()),
                                            distinct=int(rng.integers(1, 3)),
                                            flops=float(rng.uniform(1, 2)) * 1e12,
                                            wall_time=float(rng.uniform(1, 4)),
                                            peak_kv_bytes=int(rng.integers(1000, 2000)),
                                            **extra))
    return records


def row(rows, task, method, setting):
    (r,) = [r for r in rows if (r.task, r.method, r.setting) == (task, method, setting)]
    return r


# ------------------------------------------------------------------------ aggregation


def hand_case():
    """Prompt means of q: 0, 1, 2 with 1, 2 and 3 seeds (unit-weighted mean would be 4/3)."""
    return [dict(HEADER),
            unit("poetry", 0, "top_p", 1.0, 0, [output(q=-1.0), output(q=1.0)], flops=1.0),
            unit("poetry", 1, "top_p", 1.0, 0, [output(q=0.5), output(q=1.5)], flops=2.0),
            unit("poetry", 1, "top_p", 1.0, 1, [output(q=1.0), output(q=1.0)], flops=4.0),
            *[unit("poetry", 2, "top_p", 1.0, s, [output(q=float(s + 1))], flops=6.0)
              for s in range(3)]]


def test_means_and_interval_match_a_hand_computation():
    (r,) = aggregate(hand_case(), confidence=0.8)
    assert (r.task, r.method, r.knob, r.setting) == ("poetry", "top_p", "temperature", 1.0)
    assert (r.prompts, r.units, r.outputs, r.confidence) == (3, 6, 9, 0.8)
    assert r.q.mean == pytest.approx(1.0)           # (0 + 1 + 2) / 3, each prompt once
    assert r.flops.mean == pytest.approx((1 + 3 + 6) / 3)
    # Resampling 3 prompt means {0, 1, 2}: the resampled sum has counts 1,3,6,7,6,3,1 of 27,
    # so its 10% quantile is 1 and its 90% quantile is 5 (CDF 4/27 > 0.1, 23/27 < 0.9).
    assert (r.q.lo, r.q.hi) == (pytest.approx(1 / 3), pytest.approx(5 / 3))
    assert (r.novelty.mean, r.relevance.mean, r.distinct.mean) == (
        pytest.approx(0.3), pytest.approx(0.9), pytest.approx(2.0))
    assert r.pass_at_k is None and r.valid_rate is None and r.flagged is None


def test_one_prompt_gives_a_nan_interval():
    (r,) = aggregate([unit("poetry", 0, "top_p", 1.0, s) for s in range(3)])
    assert r.prompts == 1 and r.q.mean == pytest.approx(0.1)
    assert math.isnan(r.q.lo) and math.isnan(r.q.hi)


def test_bootstrap_is_deterministic_per_seed_and_per_row():
    records = synthetic()
    a, b = aggregate(records, bootstrap=300, seed=3), aggregate(records, bootstrap=300, seed=3)
    assert a == b
    c = aggregate(records, bootstrap=300, seed=4)
    assert [r.q.mean for r in a] == [r.q.mean for r in c]
    assert [(r.q.lo, r.q.hi) for r in a] != [(r.q.lo, r.q.hi) for r in c]
    # another task in the file leaves this task's intervals where they were
    alone = aggregate([x for x in records if x.get("task", "poetry") == "poetry"],
                      bootstrap=300, seed=3)
    assert alone == [r for r in a if r.task == "poetry"]


def test_rows_are_sorted_by_task_method_setting():
    rows = aggregate(synthetic(), bootstrap=50)
    order = list(METHODS)
    keys = [(r.task, order.index(r.method), r.setting) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == 2 * 13


def test_relative_costs_put_dense_at_100():
    rows = aggregate(synthetic(), bootstrap=50)
    for task in ("code", "poetry"):
        ref = row(rows, task, "top_p", 1.0)
        assert ref.is_reference
        assert (ref.flops_rel, ref.wall_rel, ref.kv_rel) == (100.0, 100.0, 100.0)
        assert sum(r.is_reference for r in rows if r.task == task) == 1
        other = row(rows, task, "creative_sparse", 0.4)
        assert other.flops_rel == pytest.approx(100 * other.flops.mean / ref.flops.mean)
        assert other.kv_rel == pytest.approx(100 * other.peak_kv_bytes.mean
                                             / ref.peak_kv_bytes.mean)


def test_reference_is_the_top_p_setting_closest_to_temperature_one_lower_on_a_tie():
    rows = aggregate([unit("poetry", 0, "top_p", 1.5, flops=3.0),
                      unit("poetry", 0, "top_p", 0.5, flops=2.0),
                      unit("poetry", 0, "fixed", 0.5, flops=1.0)])
    assert [r.is_reference for r in rows] == [True, False, False]
    assert [r.flops_rel for r in rows] == [100.0, 150.0, 50.0]


def test_deltas_against_dense():
    rows = aggregate(synthetic(), bootstrap=50)
    ref = row(rows, "poetry", "top_p", 1.0)
    assert (ref.q_delta, ref.novelty_delta, ref.nll_delta) == (0.0, 0.0, 0.0)
    r = row(rows, "poetry", "fixed", 0.5)
    for name in ("q", "novelty", "diversity", "incoherence", "nll"):
        assert getattr(r, name + "_delta") == pytest.approx(
            getattr(r, name).mean - getattr(ref, name).mean)


def test_a_task_without_top_p_has_no_relative_costs_or_deltas():
    rows = aggregate([unit("music", p, m, 0.3) for p in range(2) for m in ("fixed", "adaptive")])
    assert not any(r.is_reference for r in rows)
    assert all(r.flops_rel is r.kv_rel is r.wall_rel is r.q_delta is r.nll_delta is None
               for r in rows)


def test_code_only_metrics_are_none_elsewhere_and_nulls_are_skipped():
    rows = aggregate(synthetic(), bootstrap=50)
    for r in rows:
        measured = r.task == "code"
        assert (r.pass_at_k is not None, r.pass_rate is not None, r.valid_rate is not None) \
            == (measured,) * 3
    # pass_at_k known for one prompt of two: the mean is that prompt's, no interval
    recs = [unit("code", 0, "top_p", 1.0, 0, pass_at_k=1.0),
            unit("code", 0, "top_p", 1.0, 1, pass_at_k=None),
            unit("code", 1, "top_p", 1.0, 0, pass_at_k=None)]
    (r,) = aggregate(recs)
    assert r.pass_at_k.mean == 1.0 and math.isnan(r.pass_at_k.hi) and r.prompts == 2


def test_null_and_nan_output_metrics_count_as_not_measured():
    recs = [unit("poetry", 0, "top_p", 1.0, 0, [output(nll=None), output(nll=2.0)]),
            unit("poetry", 1, "top_p", 1.0, 0, [output(nll=float("nan")), output(nll=4.0)])]
    (r,) = aggregate(recs)
    assert r.nll.mean == pytest.approx(3.0)


def test_mixed_num_outputs_are_reported_as_is():
    recs = [unit("poetry", 0, "fixed", 0.3, 0, [output(q=0.0)]),
            unit("poetry", 0, "fixed", 0.3, 1, [output(q=1.0)] * 3)]
    (r,) = aggregate(recs)
    assert (r.units, r.outputs, r.q.mean) == (2, 4, pytest.approx(0.5))


def test_flagged_is_aggregated_when_present():
    (r,) = aggregate([unit("poetry", p, "fixed", 0.3, flagged=p) for p in range(3)])
    assert r.flagged.mean == pytest.approx(1.0)
    assert "| flagged |" in format_markdown([r])


def test_human_preference_only_from_judgements():
    records = synthetic(tasks=("poetry",))
    assert all(r.human is None for r in aggregate(records, bootstrap=20))
    rows = aggregate(records, bootstrap=20, human={("poetry", "creative_sparse"): 0.62})
    assert [r.human for r in rows if r.method == "creative_sparse"] == [0.62] * 3
    assert all(r.human is None for r in rows if r.method != "creative_sparse")
    with pytest.raises(ValueError, match="no rows.*'music'"):
        aggregate(records, human={("music", "fixed"): 0.5})


# --------------------------------------------------------------------------- reports


def dominating_case(relevance=0.9, nll=2.05):
    """Creative-Sparse at s=0.4: clearly more diverse and novel than top-p at equal NLL."""
    recs = []
    for p in range(5):
        jitter = 0.01 * p
        recs.append(unit("poetry", p, "top_p", 1.0, 0,
                         [output(novelty=0.2 + jitter, nll=2.0)], diversity=0.3 + jitter))
        recs.append(unit("poetry", p, "top_p", 1.5, 0,
                         [output(novelty=0.5 + jitter, nll=3.0)], diversity=0.6 + jitter))
        recs.append(unit("poetry", p, "creative_sparse", 0.4, 0,
                         [output(novelty=0.4 + jitter, nll=nll, relevance=relevance)],
                         diversity=0.5 + jitter))
        recs.append(unit("poetry", p, "fixed", 0.4, 0, [output(novelty=0.2 + jitter, nll=2.0)],
                         diversity=0.3 + jitter))
    return recs


def test_frontier_verdict():
    rows = aggregate(dominating_case(), bootstrap=200)
    verdict = frontier_verdicts(rows)["poetry"]
    assert verdict.startswith("Creative-Sparse dominates at s=0.4 vs 1 baseline setting(s)")
    assert "Fixed Sparse: no setting dominates" in verdict
    lower_relevance = aggregate(dominating_case(relevance=0.5), bootstrap=200)
    assert frontier_verdicts(lower_relevance)["poetry"].startswith("no method dominates")
    far = aggregate(dominating_case(nll=2.5), bootstrap=200)
    assert "Creative-Sparse: no baseline within 0.1 nats" in frontier_verdicts(far)["poetry"]
    one_prompt = aggregate([x for x in dominating_case() if x["prompt_index"] == 0])
    assert frontier_verdicts(one_prompt)["poetry"].startswith("no method dominates")
    no_base = aggregate([x for x in dominating_case() if x["method"] != "top_p"])
    assert frontier_verdicts(no_base)["poetry"] == (
        "no method dominates (nothing to compare: no top-p or min-p rows)")


def test_markdown_has_a_table_per_task_and_the_verdicts():
    rows = aggregate(synthetic(), bootstrap=50)
    text = format_markdown(rows, title="Held-out evaluation")
    assert text.startswith("# Held-out evaluation")
    assert text.index("## code") < text.index("## poetry")
    code, poetry = text.split("## poetry")
    assert "| pass@k | pass rate | valid rate |" in code and "pass@k" not in poetry
    assert "| method | setting | prompts | Q | novelty | diversity | distinct | incoherence " \
           "| relevance | NLL | rep-3 |" in poetry
    assert "| FLOPs | latency | KV | ΔQ | Δnovelty | Δdiversity | human |" in poetry
    r = row(rows, "poetry", "creative_sparse", 0.6)
    assert (f"| Creative-Sparse | s=0.6 | 4 | {r.q.mean:.3f} [{r.q.lo:.3f}, {r.q.hi:.3f}] |"
            in poetry)
    assert "| Dense top-p | T=1 (ref) | 4 |" in poetry and "| 100.0 | 100.0 | 100.0 |" in poetry
    assert poetry.count("**Frontier verdict:**") == 1
    assert frontier_verdicts(rows)["poetry"] in poetry
    body = [line for line in poetry.splitlines() if line.startswith("| ")][1:]
    assert len(body) == 13 and all(line.endswith("| — |") for line in body)   # no human


def test_markdown_shows_human_judgements():
    rows = aggregate(synthetic(tasks=("poetry",)), bootstrap=20,
                     human={("poetry", "fixed"): 0.25})
    lines = format_markdown(rows).splitlines()
    assert sum(line.endswith("| 0.250 |") for line in lines) == 2


def test_csv_round_trips(tmp_path):
    rows = aggregate(synthetic(), bootstrap=50, human={("code", "top_p"): 0.5})
    path = write_csv(rows, tmp_path / "sub" / "results.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        lines = list(reader)
    assert reader.fieldnames == csv_columns()
    assert {"q", "q_lo", "q_hi", "flops_rel", "q_delta", "human", "method_name"} <= set(
        reader.fieldnames)
    assert len(lines) == len(rows)
    for r, line in zip(rows, lines):
        assert (line["task"], line["method"], float(line["setting"])) == (r.task, r.method,
                                                                          r.setting)
        assert line["method_name"] == r.method_name and int(line["prompts"]) == r.prompts
        assert line["is_reference"] == ("true" if r.is_reference else "false")
        for f in fields(Row):
            v = getattr(r, f.name)
            if isinstance(v, Estimate):
                got = tuple(float(line[f.name + s]) for s in ("", "_lo", "_hi"))
                assert got == (v.mean, v.lo, v.hi)         # full precision
            elif v is None:
                assert line[f.name] == "" and line.get(f.name + "_lo", "") == ""
            elif isinstance(v, float):
                assert float(line[f.name]) == v


def test_plot_frontiers_writes_one_png_per_task(tmp_path):
    pytest.importorskip("matplotlib")
    rows = aggregate(synthetic(), bootstrap=20)
    rows += aggregate([unit("music", 0, "fixed", 0.3)])    # NaN intervals plot too
    paths = plot_frontiers(rows, tmp_path / "plots")
    assert [p.name for p in paths] == ["frontier_code.png", "frontier_poetry.png",
                                       "frontier_music.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_plot_frontiers_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` fail
    rows = aggregate([unit("poetry", 0, "fixed", 0.3)])
    with pytest.raises(ImportError, match=r"pip install 'creative-sparse\[plots\]'"):
        plot_frontiers(rows, tmp_path)


# ---------------------------------------------------------------------------- errors


def broken(change):
    recs = [dict(HEADER), unit("poetry", 0, "top_p", 1.0), unit("poetry", 1, "fixed", 0.3)]
    recs = copy.deepcopy(recs)
    change(recs)
    return recs


ID = "'poetry/1/fixed/0.3/0'"
CASES = {
    "unknown type": (lambda r: r[2].update(type="units"), r"records\[2\].*type = 'units'"),
    "no type": (lambda r: r[2].pop("type"), rf"records\[2\] \(unit {ID}\).*'type' is missing"),
    "no setting": (lambda r: r[2].pop("setting"), rf"records\[2\] \(unit {ID}\).*'setting'"),
    "no outputs": (lambda r: r[2].pop("outputs"), rf"{ID}.*'outputs' is missing"),
    "empty outputs": (lambda r: r[2].update(outputs=[]), rf"{ID}.*non-empty list"),
    "output without q": (lambda r: r[2]["outputs"][1].pop("q"),
                         rf"{ID}\): outputs\[1\]: field 'q' is missing"),
    "string metric": (lambda r: r[2]["outputs"][0].update(nll="2.0"),
                      rf"{ID}\): outputs\[0\].nll = '2.0', expected a number"),
    "bool metric": (lambda r: r[2]["set"].update(diversity=True), r"set.diversity = True"),
    "set without pass_at_k": (lambda r: r[2]["set"].pop("pass_at_k"),
                              rf"{ID}\): set: field 'pass_at_k' is missing"),
    "cost without flops": (lambda r: r[2]["cost"].pop("flops"), r"cost: field 'flops'"),
    "null setting": (lambda r: r[2].update(setting=None), r"setting = None"),
    "unknown method": (lambda r: r[2].update(method="beam"), r"method = 'beam'.*'top_p'"),
    "wrong knob": (lambda r: r[2].update(knob="temperature"), r"knob = 'temperature'.*'level'"),
    "float prompt": (lambda r: r[2].update(prompt_index=1.0), r"prompt_index = 1.0"),
    "not an object": (lambda r: r.append([1, 2]), r"records\[3\] = \[1, 2\]"),
    "duplicate id": (lambda r: r.append(dict(r[2])), rf"records\[3\] \(unit {ID}\).*records\[2\]"),
    "late header": (lambda r: r.append(dict(HEADER)), r"records\[3\].*header must be the first"),
    "format version": (lambda r: r[0].update(format_version=2), r"format_version = 2"),
    "reference without text": (lambda r: r.insert(1, {"type": "reference", "task": "poetry",
                                                      "prompt_index": 0}),
                               r"records\[1\]: field 'text' is missing"),
}


@pytest.mark.parametrize("change, message", CASES.values(), ids=CASES.keys())
def test_bad_records_name_the_record_and_field(change, message):
    with pytest.raises(ValueError, match=message):
        aggregate(broken(change))


@pytest.mark.parametrize("records", [[], [dict(HEADER)]], ids=["empty", "header only"])
def test_no_unit_records(records):
    with pytest.raises(ValueError, match="no unit records"):
        aggregate(records)


@pytest.mark.parametrize("kw, message", [({"confidence": 1.0}, "confidence"),
                                         ({"confidence": 0}, "confidence"),
                                         ({"bootstrap": 0}, "bootstrap"),
                                         ({"bootstrap": 10.0}, "bootstrap"),
                                         ({"human": {("poetry", "top_p"): "high"}}, "human")])
def test_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        aggregate([unit("poetry", 0, "top_p", 1.0)], **kw)


def test_markdown_needs_rows():
    with pytest.raises(ValueError, match="no rows"):
        format_markdown([])


def test_the_runtime_line_sums_unit_time_per_task():
    from creative_sparse.evaluation.tables import runtime_summary

    units = [{"task": "poetry", "cost": {"unit_seconds": 90.0}},
             {"task": "code", "cost": {"unit_seconds": 30.0}},
             {"task": "poetry", "cost": {"unit_seconds": 30.0}},
             {"task": "code", "cost": {}}]                      # an old unit: not counted
    assert runtime_summary(units) == ("Runtime: 2.5 min of unit time (3 units; poetry 2.0 min; "
                                      "code 0.5 min).")
    assert runtime_summary([]) == "Runtime: not recorded."
