"""Q with a prompt, degeneration, distinct answers and set selection, on fakes (fast)."""

import logging
import math

import pytest
import torch

from creative_sparse.config import QualityWeights
from creative_sparse.quality import (
    DegenerationLimits,
    QualityFunctional,
    brevity,
    compression_ratio,
    degeneration,
    distinct_answers,
    echo_rate,
    list_stutter,
    nll_band,
    repeated_ngram_rate,
    select_set,
)
from creative_sparse.quality import functional as functional_module
from creative_sparse.quality.calibration import CORRUPTIONS, calibration_pairs, load_calibration

FLUENT = ("Marta had pulled plates, portholes and a brass bell from the wreck, but never "
          "anything that answered back. The typewriter sat bolted to the captain's desk under "
          "a skin of silt, and when she brushed the keys one rose and struck the roller.")
LOOP = "She went down again. " + "I'm not even going to try, " * 12
STUTTER = ("They just showed up.\n\n1. 1. - Does not talk.\n\n2. 2. - Looks down.\n"
           "3. 3. - Does not interact.")


class TopicEmbedder:
    """Two topics: texts mentioning 'diver' point one way, 'bread' the other."""

    def embed(self, texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            t = t.lower()
            out[i, 0] = t.count("diver") + t.count("wreck")
            out[i, 1] = t.count("bread") + t.count("bakery")
            out[i, 2] = 0.05
        return torch.nn.functional.normalize(out, dim=-1)


class PromptScorer:
    """NLL 3.0 for every text; records the prompts it was given."""

    def __init__(self):
        self.prompts = []

    def nll(self, texts, prompts=None):
        self.prompts.append(prompts)
        return torch.tensor([3.0 if t.strip() else math.inf for t in texts])


def make_qf(**kw):
    return QualityFunctional(kw.pop("weights", None), TopicEmbedder(), PromptScorer(), **kw)


# ------------------------------------------------------------------ degeneration

@pytest.mark.parametrize("text,lo,hi", [
    (FLUENT, 0.0, 0.0),
    (LOOP, 0.95, 1.0),
    (STUTTER, 0.7, 1.0),
    ("Three short words", 0.5, 1.0),
    ("", 1.0, 1.0),
    ("   \n ", 1.0, 1.0),
], ids=["fluent", "loop", "stuttering-list", "truncated", "empty", "whitespace"])
def test_degeneration_levels(text, lo, hi):
    assert lo <= degeneration(text) <= hi


def test_degeneration_pieces():
    assert repeated_ngram_rate(FLUENT, 3) == 0.0 and repeated_ngram_rate(LOOP, 3) > 0.7
    assert compression_ratio(LOOP) < 0.3 < 0.5 < compression_ratio(FLUENT)
    assert list_stutter(STUTTER) == 3 and list_stutter("1. Flour\n2. Water\n3. Salt") == 0
    assert list_stutter("Version 1.1. was released") == 0
    prompt = "Write the opening of a story about a diver who finds a typewriter."
    assert echo_rate(prompt, prompt) == 1.0 and echo_rate(FLUENT, prompt) == 0.0
    assert echo_rate(FLUENT, None) == 0.0
    assert degeneration(prompt, prompt) > 0.9 > 0.1 > degeneration(FLUENT, prompt)
    assert brevity(FLUENT, 10) == 0.0 and brevity("one two", 10) == pytest.approx(0.8)
    assert degeneration("Short.", limits=DegenerationLimits(min_words=0)) == 0.0
    with pytest.raises(ValueError, match="rep3"):
        DegenerationLimits(rep3=(0.2, 0.2))
    with pytest.raises(ValueError, match="n must be"):
        repeated_ngram_rate(FLUENT, 0)


def test_nll_band_penalises_both_edges():
    band = nll_band(torch.tensor([0.02, 0.5, 3.0, 4.5, 8.0]))
    assert band[0] > 0.3 and band[1] == 0 and band[2] == 0 and band[3] == 0 and band[4] > 0.6
    assert nll_band(torch.tensor([0.0]), low=0.0).item() == 0.0     # lower edge off
    with pytest.raises(ValueError, match="low"):
        nll_band(torch.tensor([1.0]), floor=2.0, low=3.0)


# ------------------------------------------------------------------ Q with a prompt

def test_prompt_reaches_the_scorer_and_relevance_gates_novelty():
    qf = make_qf()
    prompt = "Write about a diver exploring a wreck."
    on, off = qf.breakdown(["The diver swam into the wreck at dawn, slow and careful.",
                            "The bakery sold warm bread to the whole street at dawn."],
                           ["A quiet harbour town."], prompt)
    assert qf.scorer.prompts[-1] == prompt
    assert on.relevance == 1.0 and off.relevance == 0.0
    assert off.novelty == 0.0 and off.diversity == 0.0 and off.incoherence == 1.0
    assert on.q > off.q
    w = qf.weights
    for b in (on, off):
        assert b.q == pytest.approx(w.alpha * b.novelty + w.beta * b.diversity
                                    - w.gamma * b.incoherence)


def test_without_prompt_relevance_is_one_and_logged_once(caplog):
    functional_module._log_once.cache_clear()
    qf = make_qf()
    with caplog.at_level(logging.WARNING, logger="creative_sparse.quality.functional"):
        a = qf.breakdown(["The bakery sold warm bread to the whole street at dawn."], ["x"])
        qf.breakdown(["The diver swam into the wreck at dawn, slow and careful."], ["x"])
    assert a[0].relevance == 1.0
    assert sum("no prompt" in r.getMessage() for r in caplog.records) == 1
    assert qf.scorer.prompts == [None, None]


def test_scorer_without_prompt_argument_still_works():
    class OldScorer:
        def nll(self, texts):
            return torch.full((len(texts),), 3.0)

    qf = QualityFunctional(None, TopicEmbedder(), OldScorer())
    out = qf.breakdown(["The diver swam into the wreck at dawn, slow and careful."], ["x"],
                       "Write about a diver.")
    assert out[0].nll == 3.0


@pytest.mark.parametrize("bad,match", [
    (3, "prompt must be a str"),
    (["a prompt"], "prompt must be a str"),
], ids=["int", "list"])
def test_bad_prompt_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        make_qf().breakdown(["some text here"], None, bad)


def test_hostile_outputs_give_numbers_not_nan():
    qf = make_qf()
    outs = ["", "   ", "x" * 20_000, "\u00e9\u00e8 " * 500, "The diver. " * 300]
    for b in qf.breakdown(outs, ["ref"], "Write about a diver."):
        for v in (b.q, b.novelty, b.diversity, b.incoherence, b.relevance, b.degeneration):
            assert math.isfinite(v)
        assert 0.0 <= b.incoherence <= 1.0
    assert qf.breakdown(["", "   "], ["ref"], "  ") == qf.breakdown(["", "   "], ["ref"])


def test_nll_cache_scores_each_text_once():
    qf = make_qf()
    qf.nll(["a b c", "d e f"], "p")
    qf.nll(["a b c", "g h i"], "p")
    qf.nll(["a b c"], "q")
    assert [p for p in qf.scorer.prompts] == ["p", "p", "q"]


# ------------------------------------------------------------------ sets

def test_distinct_answers_partitions_by_threshold():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]), dim=-1)
    assert distinct_answers(e, 0.9) == 2 and distinct_answers(e, 0.999) == 3
    assert distinct_answers(e, -1.0) == 1
    with pytest.raises(ValueError, match="threshold"):
        distinct_answers(e, 1.5)
    qf = make_qf()
    assert qf.distinct_answers([]) == 0
    assert qf.distinct_answers(["the diver", "a diver", "bread and bakery"]) == 2


def test_select_set_prefers_a_different_good_answer_over_a_near_copy():
    d = torch.tensor([[0.0, 0.01, 0.4], [0.01, 0.0, 0.4], [0.4, 0.4, 0.0]])
    assert select_set([0.4, 0.39, 0.3], 0.3, d, [1, 1, 1], [True] * 3, 2) == [0, 2]
    # by individual score alone the near-copy would be second
    assert select_set([0.4, 0.39, 0.3], 0.0, d, [1, 1, 1], [True] * 3, 2) == [0, 1]
    # an invalid item comes after every valid one, however good
    assert select_set([0.9, 0.1, 0.1], 0.3, d, [1, 1, 1], [False, True, True], 3)[-1] == 0
    with pytest.raises(ValueError, match="k must be"):
        select_set([0.1], 0.3, d[:1, :1], [1], [True], 2)


def test_qf_select_returns_k_distinct_indices():
    qf = make_qf(weights=QualityWeights(0.4, 0.3, 0.3))
    outs = ["The diver swam into the wreck.", "The diver swam into the old wreck.",
            "A diver found the wreck and bread.", "Bread, bread, bakery."]
    chosen = qf.select(outs, 3, ["ref"], "Write about a diver and a wreck.")
    assert len(chosen) == len(set(chosen)) == 3


# ------------------------------------------------------------------ calibration data

def test_calibration_suite_is_complete_and_split():
    suite = load_calibration()
    domains = {d: [i for i in suite.items if i.domain == d]
               for d in ("creative_writing", "poetry", "ad_copy", "code")}
    assert all(len(v) >= 10 for v in domains.values())
    assert len({i.prompt for i in suite.items}) == len(suite.items)
    assert all(i.reference.strip() for i in suite.items)
    held = calibration_pairs(suite, "held_out")
    tune = calibration_pairs(suite, "tune")
    assert {p.item.id for p in held}.isdisjoint({p.item.id for p in tune})
    assert {p.kind for p in held} == set(CORRUPTIONS)
    for p in held + tune:
        assert p.corrupted.strip() and p.corrupted != p.item.text


def test_code_items_run_and_broken_code_does_not_parse():
    import ast

    for item in load_calibration().items:
        if item.domain != "code":
            continue
        scope: dict = {}
        exec(compile(item.text + "\n" + item.tests, item.id, "exec"), scope)  # noqa: S102
    for pair in calibration_pairs(kinds=("broken_code",)):
        with pytest.raises(SyntaxError):
            ast.parse(pair.corrupted)
