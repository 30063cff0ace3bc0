"""The gap to the sampling frontier at matched NLL (evaluation/frontier.py)."""

import csv

import numpy as np
import pytest

from creative_sparse.evaluation.frontier import (Gap, format_gaps, frontier_gaps,
                                                 write_gaps_csv)
from test_evaluation_tables import HEADER, output, synthetic, unit

# top-p's settings at NLL 1, 2, 3 with diversity 0.1, 0.2, 0.3; min-p's at NLL 1.5, 2.5
# with diversity 0.12, 0.28 (above top-p between its own settings)
BASE = {("top_p", 0.7): (1.0, 0.1), ("top_p", 1.0): (2.0, 0.2), ("top_p", 1.3): (3.0, 0.3),
        ("min_p", 0.7): (1.5, 0.12), ("min_p", 1.5): (2.5, 0.28)}


def records(cs_points, prompts=6, noise=0.0, seed=0):
    """Every prompt measures each baseline at its point plus noise, and Creative-Sparse at
    ``cs_points`` (setting -> (nll, diversity, relevance))."""
    rng = np.random.default_rng(seed)
    out = [dict(HEADER)]
    for p in range(prompts):
        def add(method, setting, nll, div, rel):
            jitter = rng.normal(0, noise, 3) if noise else np.zeros(3)
            o = output(nll=nll + jitter[0], novelty=div + jitter[1], relevance=rel + jitter[2])
            out.append(unit("poetry", p, method, setting, 0, [o, o], diversity=div + jitter[1]))
        for (method, setting), (nll, div) in BASE.items():
            add(method, setting, nll, div, 0.9)
        for setting, (nll, div, rel) in cs_points.items():
            add("creative_sparse", setting, nll, div, rel)
    return out


def test_the_gap_is_the_distance_to_the_best_interpolated_sampler():
    gaps = frontier_gaps(records({0.3: (1.25, 0.2, 0.95), 0.6: (2.25, 0.2, 0.8),
                                  0.9: (3.5, 0.5, 0.9)}))
    by = {g.setting: g for g in gaps}
    # at 1.25: top-p 0.125, min-p out of range (from 1.5) -> frontier 0.125
    assert by[0.3].gaps["diversity"].mean == pytest.approx(0.2 - 0.125)
    assert by[0.3].gaps["novelty"].mean == pytest.approx(0.2 - 0.125)
    assert by[0.3].gaps["relevance"].mean == pytest.approx(0.05)
    assert by[0.3].bracket == (1.0, 1.5)
    # at 2.25: top-p 0.225, min-p 0.12 + 0.75 * 0.16 = 0.24 -> the better one, min-p
    assert by[0.6].gaps["diversity"].mean == pytest.approx(0.2 - 0.24)
    assert by[0.6].gaps["relevance"].mean == pytest.approx(-0.1)
    # beyond every sampler's range: no gap, never extrapolated
    assert by[0.9].gaps == {"novelty": None, "diversity": None, "relevance": None}
    assert by[0.9].bracket == (3.0, None) and not by[0.9].above
    # identical prompts: the paired interval collapses on the point
    assert by[0.3].gaps["diversity"].lo == pytest.approx(by[0.3].gaps["diversity"].hi)
    assert by[0.3].above and not by[0.6].above


def test_noise_widens_the_paired_interval_around_the_gap():
    gaps = frontier_gaps(records({0.6: (2.0, 0.3, 0.9)}, prompts=12, noise=0.03), seed=3)
    (g,) = gaps
    d = g.gaps["diversity"]
    assert d.lo < d.mean < d.hi and d.hi - d.lo < 0.1
    assert 0.05 < d.mean < 0.15 and d.lo > 0          # frontier 0.2 at NLL 2: gap 0.1
    assert g.prompts == 12
    again = frontier_gaps(records({0.6: (2.0, 0.3, 0.9)}, prompts=12, noise=0.03), seed=3)
    assert again == gaps                              # deterministic given the seed


def test_only_prompts_every_row_measured_are_compared():
    recs = records({0.6: (2.0, 0.3, 0.9)}, prompts=5)
    recs = [r for r in recs if not (r.get("method") == "min_p" and r.get("prompt_index") == 4)]
    (g,) = frontier_gaps(recs)
    assert g.prompts == 4


def test_the_report_section_and_csv(tmp_path):
    gaps = frontier_gaps(records({0.3: (1.25, 0.2, 0.95), 0.9: (3.5, 0.5, 0.9)}))
    text = "\n".join(format_gaps(gaps, "poetry"))
    assert "| Creative-Sparse | s=0.3 | 1.25 | 1.00 / 1.50 | **+0.075" in text
    assert "| Creative-Sparse | s=0.9 | 3.50 | 3.00 / — | — | — | — |" in text
    assert "Above the frontier (novelty and diversity gaps above 0, relevance's not below): " \
           "Creative-Sparse s=0.3." in text
    assert format_gaps(gaps, "code") == []
    path = write_gaps_csv(gaps, tmp_path / "gaps.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["setting"] for r in rows] == ["0.3", "0.9"]
    assert float(rows[0]["diversity_gap"]) == pytest.approx(0.075)
    assert rows[1]["diversity_gap"] == "" and rows[0]["above"] == "True"


def test_every_method_of_a_full_file_gets_a_gap_and_bad_arguments_are_refused():
    gaps = frontier_gaps(synthetic())
    methods = {(g.task, g.method) for g in gaps}
    assert ("poetry", "fixed") in methods and ("code", "creative_sparse") in methods
    assert not any(g.method in ("top_p", "min_p") for g in gaps)
    assert all(isinstance(g, Gap) for g in gaps)
    with pytest.raises(ValueError, match="bootstrap must be an int >= 1"):
        frontier_gaps(synthetic(), bootstrap=0)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        frontier_gaps(synthetic(), confidence=1.0)
    with pytest.raises(ValueError, match="no unit records"):
        frontier_gaps([dict(HEADER)])
