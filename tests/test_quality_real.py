"""Quality functional with the real SmolLM2 (session fixture) and the real MiniLM embedder."""

import random

import pytest
import torch

from creative_sparse.config import QualityWeights
from creative_sparse.quality import LikelihoodScorer, MiniLMEmbedder, QualityFunctional

pytestmark = pytest.mark.slow

PARA = ("The old lighthouse keeper climbed the spiral stairs every evening, carrying a lantern "
        "and a thermos of tea. From the top he could see the whole bay: the fishing boats returning "
        "with their catch, the gulls circling above the harbour, and the dark line of the mainland "
        "far to the east. He had kept the light burning for forty years, through storms that tore "
        "the shutters from the windows and winters so cold that the sea froze along the shore. "
        "Nobody had asked him to stay, but he could not imagine leaving. The light was a promise, "
        "he told his granddaughter, that someone was still watching, that the people out there in "
        "the dark were not alone. She listened and nodded, and one night she climbed the stairs "
        "with him and learned how to trim the wick and polish the great glass lens until it shone.")


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def qf(smollm2, embedder):
    return QualityFunctional(None, embedder, LikelihoodScorer(*smollm2))


def shuffled(text, seed=0):
    w = text.split()
    random.Random(seed).shuffle(w)
    return " ".join(w)


def test_embeddings_unit_norm_and_batch_invariant(embedder):
    texts = ["a cat", "", PARA, "a dog barks at night"]
    e = embedder.embed(texts)
    assert e.shape == (4, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(embedder.embed(texts[2:3])[0], e[2], atol=1e-5, rtol=0)


def test_paraphrase_less_novel_than_unrelated(qf):
    ref = ["The cat sat on the mat and purred in the afternoon sun."]
    para, unrelated = qf.compute_novelty(
        ["In the afternoon sunshine, the cat lay purring on the mat.",
         "Quarterly bond yields rose after the central bank's announcement."], ref)
    assert para < 0.15 < 0.35 < unrelated


def test_identical_outputs_zero_diversity(qf):
    assert max(qf.compute_diversity([PARA] * 3)) < 1e-5


def test_gibberish_far_less_coherent(qf):
    fluent, gib = qf.compute_coherence([PARA, shuffled(PARA)])
    assert fluent > 0.9 and gib < 0.6, (fluent, gib)


def test_length_bias_band(qf, smollm2):
    """Fluent prefixes of 20..150 tokens: incoherence within a 0.2 band, all < 0.4."""
    tok = smollm2[1]
    ids = tok(PARA, add_special_tokens=False).input_ids
    texts = [tok.decode(ids[:n]) for n in (20, 40, 80, 150)]
    inc = [1 - c for c in qf.compute_coherence(texts)]
    assert max(inc) - min(inc) <= 0.2 and max(inc) < 0.4, inc
    gib = [1 - c for c in qf.compute_coherence([shuffled(t) for t in texts])]
    assert min(gib) > max(inc) + 0.3, (inc, gib)


def test_nll_batching_matches_one_by_one(smollm2):
    scorer = LikelihoodScorer(*smollm2, batch_size=3)
    texts = ["Hello there.", PARA, shuffled(PARA), "A short one", ""]
    together = scorer.nll(texts)
    alone = torch.cat([scorer.nll([t]) for t in texts])
    assert torch.isinf(together[-1]) and torch.isinf(alone[-1])
    torch.testing.assert_close(together[:-1], alone[:-1], atol=2e-3, rtol=1e-3)


def test_q_moves_with_weights(smollm2, embedder):
    outs = [PARA, shuffled(PARA), "Rain fell on the quiet village all night."]
    ref = ["The lighthouse keeper climbed the stairs each evening."]
    scorer = LikelihoodScorer(*smollm2)
    base = QualityFunctional(QualityWeights(0.3, 0.3, 0.3), embedder, scorer).breakdown(outs, ref)
    for term, key in (("alpha", "novelty"), ("beta", "diversity"), ("gamma", "incoherence")):
        w = {**dict(alpha=0.3, beta=0.3, gamma=0.3), term: 0.8}
        new = QualityFunctional(QualityWeights(**w), embedder, scorer).breakdown(outs, ref)
        for a, b in zip(base, new):
            sign = -1 if key == "incoherence" else 1
            assert b.q - a.q == pytest.approx(sign * 0.5 * getattr(a, key), abs=1e-5)
    # coherent text beats its shuffle whenever incoherence matters most
    heavy = QualityFunctional(QualityWeights(0.1, 0.1, 0.8), embedder, scorer).scores(outs, ref)
    assert heavy[0] > heavy[1]
