"""Every knob of the dial, with its effect shown on the real model (SmolLM2-135M).

One test per row of the knob table in ``docs/architecture.md`` section 4. Each
turns the dial (``SparsityController.get_sparsity_params`` through
``generation.wrapper.dial_knobs``, or ``AttentionKnobs.from_params``) and measures
what the knob should change. MoE knobs are shown on a tiny random Qwen2-MoE in
``tests/test_transformers_integration.py`` (``test_moe_experts_per_token_changes_and_restores``,
``test_router_temperature_changes_routing_weights_only_inside``) and through the dial
in ``test_engine_decodes_moe_models_with_the_dial``; SmolLM2 has no experts.
"""

from __future__ import annotations

import math

import pytest
import torch

from creative_sparse.config import SparsityConfig
from creative_sparse.control import SparsityController
from creative_sparse.generation import generate
from creative_sparse.generation.knobs import SamplingParams, sample, top_p_filter
from creative_sparse.generation.wrapper import CreativeSparseWrapper, dial_knobs
from creative_sparse.models import transformers as integration
from creative_sparse.models.transformers import AttentionKnobs, sparsity

pytestmark = pytest.mark.slow

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    _, tok = smollm2
    return tok(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def next_logits(smollm2, prompt_ids):
    model, _ = smollm2
    with torch.no_grad():
        return model(prompt_ids).logits[:, -1].float()


def _draws(logits, params, n=3000):
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    return sample(logits.expand(n, -1), params, gens)


def test_temperature_spreads_the_samples(smollm2, next_logits):
    """T(s) rises with s: more distinct next tokens from the same logits."""
    ctl = SparsityController()
    low, high = (dial_knobs(ctl, smollm2[0], s)[0] for s in (0.0, 1.0))
    assert high.temperature > low.temperature
    distinct = [len(set(_draws(next_logits, replace_top_p(p)).tolist())) for p in (low, high)]
    assert distinct[1] > distinct[0], distinct


def replace_top_p(params: SamplingParams) -> SamplingParams:
    """The same temperature without nucleus filtering, to isolate temperature."""
    return SamplingParams(temperature=params.temperature, top_p=1.0)


def test_top_p_cuts_the_tail(smollm2, next_logits):
    """p(0) = 0.9 never samples outside its nucleus; the wider p(1) (~0.996) does."""
    ctl = SparsityController()
    dense, sparse = (dial_knobs(ctl, smollm2[0], s)[0] for s in (0.0, 1.0))
    assert dense.top_p < sparse.top_p
    nucleus = torch.isfinite(top_p_filter(next_logits / dense.temperature, dense.top_p))[0]
    inside = nucleus[_draws(next_logits, dense)].all()
    outside = (~nucleus[_draws(next_logits, SamplingParams(temperature=dense.temperature,
                                                           top_p=sparse.top_p))]).sum()
    assert inside and int(outside) > 0


@torch.no_grad()
def test_keep_fraction_sets_the_attended_fraction(smollm2, prompt_ids):
    """Decoding under the dial attends fewer keys as s rises (a 160-token context: below
    sink + window = 36 keys every key is kept whatever the level)."""
    model, tok = smollm2
    ctl = SparsityController()
    fractions = []
    for s in (0.0, 0.5, 0.9):
        result = generate(model, tok, prompt_ids.repeat(1, 10), num_rows=2, max_new_tokens=6,
                          schedule=dial_knobs(ctl, model, s, seeds=[1, 2]), seeds=[1, 2])
        fractions.append(result.stats.attended_fraction)
    assert fractions[0] == 1.0 and fractions[0] > fractions[1] > fractions[2], fractions


@torch.no_grad()
def test_noise_gives_each_row_its_own_subnetwork(smollm2, prompt_ids):
    """Greedy decoding, same prompt: rows differ only by their sub-network seed, so
    they differ with the dial's noise (noise = s) and are identical without it."""
    model, tok = smollm2
    params = SparsityController().get_sparsity_params(0.9)
    greedy = SamplingParams(temperature=0)
    texts = {}
    for noise in (True, False):
        knobs = AttentionKnobs.from_params(params, row_seeds=(11, 12),
                                           **({} if noise else {"noise": 0.0}))
        result = generate(model, tok, prompt_ids.repeat(1, 10), num_rows=2, max_new_tokens=12,
                          schedule=(greedy, knobs), seeds=[11, 12])
        texts[noise] = result.texts
    assert texts[False][0] == texts[False][1]
    assert texts[True][0] != texts[True][1]


@torch.no_grad()
def test_prefill_thresholds_skip_more_blocks_as_s_rises(smollm2, prompt_ids):
    """simthreshd1(s) and cdfthreshd(s) fall with s: a long prefill keeps fewer blocks."""
    model, _ = smollm2
    long_ids = prompt_ids.repeat(1, 40)[:, :600]
    ctl = SparsityController()
    kept = []
    for s in (0.3, 0.9):
        knobs = AttentionKnobs.from_params(ctl.get_sparsity_params(s))
        with sparsity(model, knobs) as stats:
            model(long_ids)
        assert stats.sparse_calls == 30
        kept.append(1.0 - stats.block_sparsity)
    assert kept[1] < kept[0], kept


@torch.no_grad()
def test_pvthreshd_reaches_the_prefill_kernel(smollm2, prompt_ids, monkeypatch):
    """pvthreshd(s) is handed to the block-sparse kernel of every prefill call. Only the
    Triton GPU kernel skips P·V with it (tested in tests/test_triton_backend.py); the
    CPU backends are exact, so on CPU the knob's effect is that it arrives."""
    model, _ = smollm2
    seen = []
    real = integration.block_sparse_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("pvthreshd"))
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "block_sparse_attention", spy)
    params = SparsityController().get_sparsity_params(0.8)
    with sparsity(model, AttentionKnobs.from_params(params)):
        model(prompt_ids.repeat(1, 20)[:, :300])
    assert len(seen) == 30 and set(seen) == {params.pvthreshd} and params.pvthreshd < 15


def test_token_pruning_bounds_the_drafts_cache(smollm2):
    """token_pruning_rate(s) evicts the least-attended tokens of a long context from the
    drafts' cache: fewer cached tokens than with the rate set to 0, same everything else."""
    model, tok = smollm2
    long_prompt = " ".join([PROMPT] * 34)                     # ~600 tokens
    peaks, evicted = {}, {}
    for rate in (0.4, 0.0):
        wrapper = CreativeSparseWrapper(model=model, tokenizer=tok, sparsity_schedule=(0.9, 0.3),
                                        sparsity_config=SparsityConfig(token_pruning_rate=rate))
        result = wrapper.generate_candidates(long_prompt, max_length=4, num_candidates=1, seed=3)
        peaks[rate] = result.diverge_stats.peak_cache_bytes
        evicted[rate] = result.diverge_stats.evicted_tokens
    expected = math.floor(SparsityController().get_sparsity_params(0.9).token_pruning_rate * 600)
    assert evicted[0.0] == 0 and evicted[0.4] >= 0.8 * expected
    assert peaks[0.4] < peaks[0.0]
