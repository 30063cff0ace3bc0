"""Sampling functions: each filter against a hand-computed answer."""

import math

import pytest
import torch

from creative_sparse.generation.knobs import (SamplingParams, min_p_filter, sample, top_k_filter,
                                              top_p_filter)

NEG = float("-inf")


def kept(logits):
    return (logits != NEG).nonzero()[:, -1].tolist()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.5)) == [0]          # 0.5 alone reaches 0.5
    assert kept(top_p_filter(logits, 0.7)) == [0, 1]
    assert kept(top_p_filter(logits, 0.96)) == [0, 1, 2, 3]
    assert kept(top_p_filter(logits, 1e-9)) == [0]         # the top token always survives


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    assert kept(min_p_filter(probs.log(), 0.2)) == [0, 1]  # 0.12 is the cut
    assert kept(min_p_filter(probs.log(), 0.0)) == [0, 1, 2, 3]


def test_greedy_and_per_row_reproducibility():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    params = SamplingParams(temperature=1.3, top_p=0.9, top_k=20, min_p=0.01)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    a, b = sample(logits, params, gens()), sample(logits, params, gens())
    assert torch.equal(a, b)
    # Row 0 depends only on its own generator: same draw when sampled alone.
    alone = sample(logits[:1], params, [torch.Generator().manual_seed(1)])
    assert alone.item() == a[0].item()


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), NEG]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, SamplingParams(), [gen]) for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 1).float().mean().item() - 0.75) < 0.03


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature must be finite and >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be an int >= 0"),
    (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_all_masked_row_is_an_error():
    logits = torch.tensor([[NEG, NEG], [0.0, 1.0]])
    with pytest.raises(ValueError, match="every token masked"):
        sample(logits, SamplingParams())


def _top_p_by_full_sort(logits, p):
    """The textbook nucleus: sort the whole vocabulary."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= p
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), NEG)


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0, 12.0])     # flat to peaked
@pytest.mark.parametrize("p", [0.1, 0.9, 0.999])
def test_top_p_matches_a_full_sort(scale, p):
    """The top-k-bounded search widens until the nucleus fits, even for flat
    distributions whose nucleus is most of the vocabulary."""
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(3)) * scale
    kept = top_p_filter(logits, p) > NEG
    expected = _top_p_by_full_sort(logits, p) > NEG
    # Float32 sums of 4096 and of 5000 sorted terms may round differently, so a token
    # whose more probable tokens' mass is within rounding of p may go either way.
    # Nothing else may differ.
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.zeros_like(probs).scatter(-1, order, torch.cumsum(sorted_probs, -1) - sorted_probs)
    differ = kept != expected
    assert bool(((before - p).abs()[differ] < 1e-5).all()), "a token far from the boundary differs"
    assert int(differ.sum(-1).max()) <= 1
    assert torch.equal(top_p_filter(logits, p)[kept], logits[kept])


def test_inverse_cdf_draw_never_picks_a_masked_token():
    # Zero-probability tokens at the start, between and at the end of the vocabulary.
    logits = torch.tensor([[NEG, 0.0, NEG, NEG, 1.0, NEG]])
    gen = torch.Generator().manual_seed(1)
    draws = torch.cat([sample(logits, SamplingParams(), [gen]) for _ in range(3000)])
    assert set(draws.tolist()) == {1, 4}
    assert abs((draws == 4).float().mean().item() - math.e / (1 + math.e)) < 0.03


def test_arithmetic_sampling_draws_each_row_exactly_and_the_set_evenly():
    from creative_sparse.generation.knobs import sample_coded, stratified_codes

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 30) * 2, dim=-1)
    g = torch.Generator().manual_seed(0)
    trials, n = 3000, 4
    first = torch.zeros(n, 30)
    second = torch.zeros(30)
    for _ in range(trials):
        tokens, codes, bits = sample_coded(probs.repeat(n, 1), stratified_codes(n, g))
        first[torch.arange(n), tokens] += 1
        # the rescaled code is uniform again: the next draw is exact too
        second[sample_coded(probs, codes[:1])[0]] += 1
        assert torch.allclose(bits, -torch.log2(probs[0, tokens].double()))
        # evenly spread: each token opens floor(n p) or ceil(n p) of the n rows
        counts = torch.bincount(tokens, minlength=30).double()
        assert bool(((counts >= (n * probs[0]).floor()) & (counts <= (n * probs[0]).ceil()
                                                          )).all())
    sd = (probs[0] * (1 - probs[0]) / trials).sqrt()
    assert ((first / trials - probs).abs() < 5 * sd + 1e-3).all()   # every row alone
    assert ((second / trials - probs[0]).abs() < 5 * sd + 1e-3).all()


def test_arithmetic_sampling_never_picks_a_masked_token():
    from creative_sparse.generation.knobs import sample_coded, stratified_codes

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64).repeat(5, 1)
    codes = torch.tensor([0.0, 0.5 - 1e-17, 0.5, 0.999999, 1.0 - 2.0 ** -53],
                         dtype=torch.float64)
    tokens, next_codes, _ = sample_coded(probs, codes)
    assert set(tokens.tolist()) <= {1, 3}
    assert bool(((next_codes >= 0) & (next_codes < 1)).all())
    with pytest.raises(ValueError, match="need probs"):
        sample_coded(probs, codes[:2])
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        stratified_codes(0)
