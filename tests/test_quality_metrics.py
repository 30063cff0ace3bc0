"""Fast tests of the quality metrics and QualityFunctional with a fake embedder and scorer."""

import math

import pytest
import torch

from creative_sparse.config import QualityWeights
from creative_sparse.quality import (
    DegenerationLimits,
    QualityFunctional,
    compression_diversity,
    distinct_n,
    diversity,
    incoherence,
    novelty,
    self_bleu,
    squash_nll,
)


class BagEmbedder:
    """Hashes words into a 64-d bag of words, unit-normalised; counts texts embedded."""

    def __init__(self):
        self.calls = 0

    def embed(self, texts):
        self.calls += len(texts)
        out = torch.zeros(len(texts), 64)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % 64] += 1.0
            out[i, 63] += 1e-3  # empty text: a valid direction
        return torch.nn.functional.normalize(out, dim=-1)


class LenScorer:
    """NLL = number of characters 'x' in the text + 2 (so a test controls it)."""

    def nll(self, texts):
        return torch.tensor([2.0 + t.count("x") if t else float("inf") for t in texts])


def qf(**kw):
    return QualityFunctional(kw.pop("weights", None), BagEmbedder(), LenScorer(), **kw)


def test_identical_outputs_have_zero_diversity():
    assert qf().compute_diversity(["a b c"] * 4) == [0.0] * 4
    e = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1).repeat(5, 1)
    assert diversity(e).abs().max() < 1e-6


@pytest.mark.parametrize("n", [0, 1], ids=["empty", "single"])
def test_diversity_of_tiny_sets_is_defined(n):
    assert qf().compute_diversity(["some text"] * n) == [0.0] * n


def test_distances_are_in_unit_interval_and_match_formula():
    a = torch.nn.functional.normalize(torch.randn(7, 5), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    ref = (torch.cdist(a, b) ** 2 / 4).min(dim=1).values
    torch.testing.assert_close(novelty(a, b), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(novelty(a[:1], -a[:1]), torch.ones(1), atol=1e-5, rtol=0)
    d = diversity(a)
    full = torch.cdist(a, a) ** 2 / 4
    torch.testing.assert_close(d, full.sum(1) / 6, atol=1e-5, rtol=0)
    assert ((d >= 0) & (d <= 1)).all()


def test_novelty_nearest_reference():
    f = qf()
    ref = ["the cat sat on the mat"]
    near, far = f.compute_novelty(["the cat sat on a mat", "quantum ledger volcano"], ref)
    assert near < far
    assert f.compute_novelty(ref, ref) == [pytest.approx(0.0, abs=1e-6)]


def test_missing_reference_zero_or_raise():
    assert qf().compute_novelty(["a", "b"]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="reference_data"):
        qf(on_missing_reference="raise").compute_novelty(["a"])
    with pytest.raises(ValueError, match="reference_data is empty"):
        qf().compute_novelty(["a"], [])
    assert qf(reference_data=["a"]).compute_novelty(["a"]) == [pytest.approx(0.0, abs=1e-6)]


def test_squash_and_incoherence():
    x = torch.tensor([0.0, 4.5, 7.5, 100.0, float("inf")])
    s = squash_nll(x)
    assert s[0] == 0 and s[1] == 0 and s[-1] == 1
    assert s[2] == pytest.approx(1 - math.exp(-1))
    assert (s.diff() >= 0).all()
    with pytest.raises(ValueError, match="NaN"):
        squash_nll(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="scale"):
        squash_nll(x, scale=0.0)
    i = incoherence(torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.0, 2.0, 50.0]),
                    violation_weight=0.1)
    torch.testing.assert_close(i, torch.tensor([0.0, 0.2, 1.0]))
    # the default lambda: one violation is full incoherence
    assert incoherence(torch.tensor([2.0]), torch.tensor([1.0])).item() == 1.0
    # noisy-OR of further penalties: 1 - (1 - 0.5)(1 - 0.5) = 0.75
    assert incoherence(torch.tensor([2.0]), others=[torch.tensor([0.5]), torch.tensor([0.5])]
                       ).item() == pytest.approx(0.75)


def test_validators_add_incoherence():
    f = qf(validators=[lambda t: "forbidden" in t, lambda t: t.count("!")],
           violation_weight=0.1, degeneration_limits=DegenerationLimits(min_words=0))
    b = f.breakdown(["calm words", "forbidden!!"])
    assert [x.violations for x in b] == [0.0, 3.0]
    assert 1 - b[1].incoherence == pytest.approx((1 - b[0].incoherence) * (1 - 0.3))
    strict = qf(validators=[lambda t: "forbidden" in t])   # lambda = 1 by default
    ok, bad = strict.breakdown(["calm words here", "forbidden words here"], ["x"])
    assert bad.incoherence == 1.0 and bad.q < ok.q
    with pytest.raises(ValueError, match="validator"):
        qf(validators=[lambda t: -1]).breakdown(["a"])


def test_q_formula_and_ranges():
    f = qf(weights=QualityWeights(0.5, 0.3, 0.2))
    outs = ["alpha beta", "gamma delta x", "alpha beta xxxx", ""]
    for b in f.breakdown(outs, reference_data=["alpha"]):
        for v in (b.novelty, b.diversity, b.incoherence):
            assert 0.0 <= v <= 1.0 and not math.isnan(v)
        assert b.q == pytest.approx(0.5 * b.novelty + 0.3 * b.diversity - 0.2 * b.incoherence)
    assert f.breakdown([""])[0].incoherence == 1.0  # an empty text is not rewarded


@pytest.mark.parametrize("term", ["alpha", "beta", "gamma"])
def test_q_moves_with_each_weight(term):
    outs = ["alpha beta x", "gamma delta xxxx", "epsilon"]
    ref = ["alpha"]
    base = dict(alpha=0.3, beta=0.3, gamma=0.3)
    lo = qf(weights=QualityWeights(**base)).breakdown(outs, ref)
    hi = qf(weights=QualityWeights(**{**base, term: 0.9})).breakdown(outs, ref)
    for a, b in zip(lo, hi):
        term_value = {"alpha": a.novelty, "beta": a.diversity, "gamma": -a.incoherence}[term]
        assert b.q - a.q == pytest.approx(0.6 * term_value, abs=1e-6)
        assert (b.q - a.q) * math.copysign(1, term_value or 1) >= 0


def test_embeddings_cached_within_one_call():
    emb = BagEmbedder()
    f = QualityFunctional(None, emb, LenScorer())
    f.breakdown(["a b", "c d", "a b"], reference_data=["a b", "e"])
    assert emb.calls == 3  # "a b", "c d", "e": each distinct text once


@pytest.mark.parametrize("bad,match", [
    ("just a string", "list of strings"),
    (["ok", 3], r"outputs\[1\] must be a str"),
    (None, "list of strings"),
], ids=["bare-str", "non-str-item", "none"])
def test_bad_outputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        qf().breakdown(bad)


def test_empty_outputs_and_bad_weights():
    assert qf().scores([]) == [] and qf().compute_quality_score([]) == 0.0
    with pytest.raises(ValueError, match="all 0"):
        QualityWeights(0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        QualityWeights(-0.1, 0.3, 0.3)
    with pytest.raises(ValueError, match="QualityWeights"):
        QualityFunctional({"alpha": 1})


def test_seed_style_subclass_returning_floats():
    class CustomQuality(QualityFunctional):
        def __init__(self, custom_weights):
            super().__init__(custom_weights, BagEmbedder(), LenScorer())

        def compute_novelty(self, outputs, reference_data=None):
            return 0.5

        def compute_diversity(self, outputs):
            return 0.25

        def compute_coherence(self, outputs):
            return 1.0

    q = CustomQuality(QualityWeights())
    assert q.compute_quality_score(["a", "b"]) == pytest.approx(0.4 * 0.5 + 0.3 * 0.25)
    assert q.scores(["a", "b"]) == [pytest.approx(0.275)] * 2

    class Broken(CustomQuality):
        def compute_diversity(self, outputs):
            return float("nan")

    with pytest.raises(ValueError, match="non-finite"):
        Broken(QualityWeights()).scores(["a"])


# ------------------------------------------------------------------ lexical, set level
PARA = ("the river bends past the mill where children fish for silver trout each summer "
        "while their parents argue about the price of grain and the weather and the war "
        "that nobody in the valley has seen but everybody fears will come with the autumn rains")


def test_lexical_identical_vs_distinct():
    same = [PARA] * 4
    other = [PARA, "a quiet robot paints lighthouses at dawn for no one in particular today",
             "seven green bottles wobble on a wall beneath the patient moon of july",
             "my grandmother kept bees and a ledger of every storm since nineteen fifty"]
    assert distinct_n(same, 2) == pytest.approx(distinct_n([PARA], 2) / 4)
    assert distinct_n(other, 2) > 0.9
    assert self_bleu(same) == pytest.approx(1.0) and self_bleu(other) < 0.2
    assert compression_diversity(same) < 0.1 < 0.6 < compression_diversity(other)
    assert distinct_n(["a"], 2) == 0.0 and self_bleu(["a"]) == 0.0 and compression_diversity([]) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(same, 0)


def test_lexical_metrics_not_length_biased():
    """Without the common window, a set of longer texts would look less diverse."""
    w = PARA.split()
    texts = [" ".join(w[i::3]) for i in range(3)]  # three different word streams
    long_ = [t + " " + PARA + " " + PARA for t in texts]  # same starts, a long repetitive tail
    for metric in (lambda s: distinct_n(s, 2), self_bleu, compression_diversity):
        assert metric(texts) == pytest.approx(metric(long_[:1] + texts[1:]), abs=0.02)
    # the raw (windowless) variant would be biased: check our window is what fixes it
    mixed = long_[:1] + texts[1:]
    assert distinct_n(mixed, 2, window=10_000) < distinct_n(texts, 2) - 0.1
