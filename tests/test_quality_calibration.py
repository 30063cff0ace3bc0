"""Q validated on the shipped calibration suite and on the demo, with the real SmolLM2 and MiniLM.

The bounds are the issue's: with the default weights Q ranks the team-written
original first in at least 97% of (original, corruption) pairs overall and 90% of
every corruption type. They are checked on the held-out half, the half no constant
was chosen on and the one the pass rates are reported on (measured: 149/150, 23/24 at
worst; all 300 pairs: 99.7%; docs/quality.md); scoring all of them would double the
suite's longest test for no pair the bounds are about.
"""

import pytest

from creative_sparse.cli import DEMO_PROMPTS
from creative_sparse.quality import LikelihoodScorer, MiniLMEmbedder, QualityFunctional
from creative_sparse.quality.calibration import (CORRUPTIONS, novelty_preference,
                                                 paraphrase_accuracy, run_calibration)
from creative_sparse.quality.degeneration import repeated_ngram_rate

pytestmark = pytest.mark.slow

DEMO_TRIGRAM_BOUND = 0.10
"""Largest repeated-trigram rate (seq-rep-3) allowed for a demo winner; fluent prose of
this length scores 0-0.05, the loop the old Q picked scored 0.35."""


@pytest.fixture(scope="module")
def qf(smollm2):
    return QualityFunctional(None, MiniLMEmbedder(), LikelihoodScorer(*smollm2))


def test_q_ranks_originals_above_corruptions(qf):
    report = run_calibration(qf, "held_out")
    print("\n" + report.table())
    assert report.overall >= 0.97, report.table()
    assert set(report.by_kind) == set(CORRUPTIONS)
    for kind in report.by_kind:
        assert report.rate(kind) >= 0.90, (kind, report.failures)
    assert sum(t for _, t in report.by_kind.values()) == 150


def test_surprise_is_not_punished_more_than_measured(qf):
    """Measured 6 of 16 (the old Q: 2 of 16); guard against sliding back to clichés."""
    wins, total = novelty_preference(qf, "all")
    assert total == 16 and wins >= 5, (wins, total)


def test_distinct_answers_threshold_on_held_out_paraphrases(qf):
    assert paraphrase_accuracy(qf, split="held_out") >= 0.85


def test_demo_winners_do_not_loop(smollm2):
    from creative_sparse.generation import CreativeSparseWrapper

    model, tokenizer = smollm2
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer)
    for prompt in DEMO_PROMPTS:
        result = wrapper.generate_candidates(prompt, max_length=100, num_candidates=5, seed=0)
        assert len(result.candidates) == 5
        rate = repeated_ngram_rate(result.best.text, 3)
        assert rate <= DEMO_TRIGRAM_BOUND, (prompt, rate, result.best.text)
