"""Decoding strategies (generation/strategies.py) on a tiny random Llama; Creative-Sparse
on the real model."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _tiny import DigitTokenizer, tiny_llama96  # noqa: E402

from creative_sparse.control import SparsityController  # noqa: E402
from creative_sparse.generation.strategies import (Adaptive, CreativeSparse, DenseTopP,  # noqa: E402
                                                   Fixed, MinP, MoEOnly, Progressive)
from creative_sparse.generation.wrapper import dial_knobs  # noqa: E402


Tokenizer = DigitTokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama96()


PROMPT = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(1))
STRATEGIES = [DenseTopP(), MinP(), Fixed(0.6), Progressive(0.8, 0.2), Adaptive(), MoEOnly(0.7)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
@pytest.mark.filterwarnings("ignore:MoEOnly.*no MoE layers:UserWarning")   # tiny is dense
def test_every_strategy_gives_n_reproducible_candidates_and_their_cost(tiny, strategy):
    run = lambda seed: strategy.generate(tiny, Tokenizer(), PROMPT, num_candidates=3,  # noqa: E731
                                         max_new_tokens=10, seed=seed)
    a, b, c = run(0), run(0), run(1)
    assert len(a.texts) == 3 and a.texts == b.texts and a.texts != c.texts
    assert 0 < a.stats.generated_tokens <= 30 and a.stats.flops > 0 and a.stats.wall_time > 0


def test_the_dial_at_zero_is_dense_sampling(tiny):
    params = SparsityController().get_sparsity_params(0.0)
    dense = DenseTopP(top_p=params.top_p, temperature=params.temperature)
    fixed = Fixed(0.0).generate(tiny, Tokenizer(), PROMPT, num_candidates=2, max_new_tokens=8)
    plain = dense.generate(tiny, Tokenizer(), PROMPT, num_candidates=2, max_new_tokens=8)
    assert fixed.texts == plain.texts and fixed.stats.attended_fraction == 1.0
    # On a dense model the MoE-only strategy has nothing to turn: it is the dial at 0.
    with pytest.warns(UserWarning, match="no MoE layers, so no knob of MoE-Only applies"):
        moe = MoEOnly(0.9, allow_high_sparsity=True).generate(tiny, Tokenizer(), PROMPT,
                                                              num_candidates=2,
                                                              max_new_tokens=8)
    assert moe.texts == plain.texts


def test_higher_levels_attend_fewer_keys(tiny):
    low, high = (Fixed(s, allow_high_sparsity=True).generate(
        tiny, Tokenizer(), PROMPT, num_candidates=2, max_new_tokens=8) for s in (0.2, 0.9))
    assert high.stats.attended_fraction < low.stats.attended_fraction <= 1.0


def test_progressive_moves_from_start_to_end(tiny):
    schedule, _ = Progressive(0.8, 0.2).schedule(tiny, [1, 2], max_new_tokens=11)
    controller = SparsityController()
    assert schedule(0) == dial_knobs(controller, tiny, 0.8, [1, 2])
    assert schedule(5) == dial_knobs(controller, tiny, 0.5, [1, 2])
    assert schedule(10) == schedule(50) == dial_knobs(controller, tiny, 0.2, [1, 2])


def test_adaptive_follows_the_models_uncertainty(tiny):
    schedule, probe = Adaptive(base=0.5, target_entropy=2.0, gain=0.2).schedule(
        tiny, [1], max_new_tokens=10)
    controller = SparsityController()
    assert schedule(0) == dial_knobs(controller, tiny, 0.5, [1])        # nothing seen yet
    probe(0, [[]], torch.tensor([[0.0, 0.0, 0.0, 0.0]]))                # entropy ln 4 = 1.39
    assert probe.entropy == pytest.approx(1.3863, abs=1e-4)
    assert schedule(1) == dial_knobs(controller, tiny, 0.62, [1])      # confident: explore
    probe(1, [[]], torch.zeros(1, 400))                                 # ln 400 = 5.99
    assert schedule(2) == dial_knobs(controller, tiny, 0.0, [1])       # uncertain: dense


def test_moe_only_turns_only_the_expert_knobs():
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, num_local_experts=8,
                                        num_experts_per_tok=2)
    moe = transformers.MixtralForCausalLM(config).eval()
    (sampling, knobs), _ = MoEOnly(0.8).schedule(moe, [1], max_new_tokens=4)
    assert knobs.dense and knobs.experts_per_token > 2
    assert sampling == dial_knobs(SparsityController(), moe, 0.0)[0]


@pytest.mark.parametrize("make,match", [
    (lambda: Fixed(1.5), "outside the allowed range"),
    (lambda: Progressive(0.5, -0.1), "outside the allowed range"),
    (lambda: Adaptive(gain=-1.0), "gain >= 0"),
])
def test_bad_strategy_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_candidate_count(tiny):
    with pytest.raises(ValueError, match="num_candidates must be an int >= 1"):
        DenseTopP().generate(tiny, Tokenizer(), PROMPT, num_candidates=0)


@pytest.mark.slow
def test_creative_sparse_strategy_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    result = CreativeSparse().generate(model, tokenizer, "Write a haiku about rain.",
                                       num_candidates=3, max_new_tokens=20, seed=1)
    assert len(result.texts) == 3                      # num_candidates, chosen from 6 drafts
    assert result.stats.wall_time > 0 and result.stats.peak_cache_bytes > 0
    assert result.stats.generated_tokens > 20

