"""Prefill once for N rows, H2O pruning with correct positions, bounded caches."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from creative_sparse.models.kv_cache import (cache_kwargs, cache_length, prefill,  # noqa: E402
                                              prune_cache)
from creative_sparse.models.transformers import AttentionKnobs, sparsity  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def greedy(model, prompt, steps, rows=2, max_tokens=None, window=8):
    """Greedy decoding over the cache; prunes to ``max_tokens`` after each step."""
    knobs = AttentionKnobs(keep_fraction=1.0, sink_tokens=2, local_window=window)
    with sparsity(model, knobs, track_key_mass=True) as stats:
        cache, logits, pos = prefill(model, prompt, rows)
        tokens, lengths, all_logits = [], [], []
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            out = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache),
                        **pos.model_kwargs(1, rows))
            pos.advance(1)
            logits = out.logits[:, -1]
            all_logits.append(logits)
            if max_tokens is not None:
                prune_cache(cache, stats.key_mass, pos, max_tokens=max_tokens, sink_tokens=2,
                            local_window=window)
            lengths.append(cache_length(cache))
    return torch.cat(tokens, 1), torch.stack(all_logits, 1), lengths, pos


@torch.no_grad()
def test_prefill_once_repeats_the_prompt_cache(model, prompt):
    cache, logits, pos = prefill(model, prompt, 3)
    ref = model(prompt).logits[:, -1]
    assert logits.shape == (3, 97) and torch.allclose(logits, ref.expand(3, -1), atol=1e-6)
    assert cache.layers[0].keys.shape[0] == 3 and cache_length(cache) == 30
    assert (pos.next_position, pos.cache_len) == (30, 30)


def test_pruning_rate_zero_reproduces_the_unpruned_output(model, prompt):
    plain_tokens, plain_logits, _, _ = greedy(model, prompt, 20)
    tokens, logits, lengths, _ = greedy(model, prompt, 20, max_tokens=10_000)
    assert torch.equal(tokens, plain_tokens) and torch.equal(logits, plain_logits)
    assert lengths[-1] == 50
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                         min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens[0], ref[0, 30:])


def test_pruned_cache_stays_bounded_during_long_generation(model, prompt):
    tokens, logits, lengths, pos = greedy(model, prompt, 120, max_tokens=40)
    assert max(lengths) <= 40 and lengths[-1] == 40
    assert pos.next_position == 150 and pos.cache_len == 40
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_eviction_equals_masking_the_evicted_tokens(model, prompt):
    """Pruned cache + explicit positions == the full cache with the evicted tokens masked
    for the new query (its past keys unchanged)."""
    cache, logits, pos = prefill(model, prompt, 1)
    nxt = logits.argmax(-1, keepdim=True)
    model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache), **pos.model_kwargs(1, 1))
    pos.advance(1)
    # One attention-mass vector for every layer, so that all layers evict the same tokens.
    mass = torch.rand(1, 31, generator=torch.Generator().manual_seed(2))
    key_mass = {i: mass.clone() for i in range(len(cache.layers))}
    before = cache.layers[0].keys.clone()
    full_cache = copy.deepcopy(cache)
    prune_cache(cache, key_mass, pos, max_tokens=20, sink_tokens=2, local_window=4)
    kept = [int((before[0, 0] == row).all(-1).nonzero()[0]) for row in cache.layers[0].keys[0, 0]]
    middle = mass[0, 2:27]
    assert sorted(kept[2:-4]) == sorted((middle.topk(14).indices + 2).tolist())
    probe = torch.tensor([[5]])
    pruned = model(input_ids=probe, use_cache=True, **cache_kwargs(model, cache),
                   **pos.model_kwargs(1, 1)).logits[0, -1]
    mask = torch.zeros(1, 32, dtype=torch.long)
    mask[0, kept] = 1
    mask[0, -1] = 1
    masked = model(input_ids=probe, **cache_kwargs(model, full_cache), attention_mask=mask,
                   position_ids=torch.tensor([[31]])).logits[0, -1]
    assert len(kept) == 20 and kept[:2] == [0, 1] and kept[-4:] == [27, 28, 29, 30]
    assert torch.allclose(pruned, masked, atol=1e-4), (pruned - masked).abs().max()


def test_prune_errors(model, prompt):
    cache, _, pos = prefill(model, prompt, 1)
    with pytest.raises(ValueError, match="must exceed sink_tokens"):
        prune_cache(cache, {}, pos, max_tokens=6, sink_tokens=2, local_window=4)
    with pytest.raises(ValueError, match=r"shape \[R, L\]"):
        prefill(model, prompt[:, :0], 1)
    with pytest.raises(ValueError, match="num_rows must be an int >= 1"):
        prefill(model, prompt, 0)
    with pytest.raises(ValueError, match="multiple of the 2 prompt"):
        prefill(model, prompt.repeat(2, 1), 3)


@torch.no_grad()
def test_prefill_several_prompts(model, prompt):
    two = torch.cat([prompt, prompt.flip(1)])
    cache, logits, _ = prefill(model, two, 4)
    ref = model(two).logits[:, -1]
    assert torch.allclose(logits, ref.repeat_interleave(2, 0), atol=1e-5)
    assert cache.layers[0].keys.shape[0] == 4
