"""The dial inside transformers models: attention knobs, statistics, MoE routing.

Tiny randomly initialised models (no downloads); the real SmolLM2 checks live
in test_smollm2_sparsity.py.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from creative_sparse.models.moe import find_routers, moe_routing  # noqa: E402
from creative_sparse.models.transformers import (  # noqa: E402
    ATTENTION_NAME, AttentionKnobs, sparsity)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (2, 520), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_dense_knobs_give_identical_logits(tiny_llama, prompt):
    ref = tiny_llama(prompt).logits
    with sparsity(tiny_llama, AttentionKnobs()) as stats:
        assert tiny_llama.config._attn_implementation == ATTENTION_NAME
        out = tiny_llama(prompt).logits
    assert torch.equal(out, ref)
    assert stats.attended_fraction == 1.0 and stats.calls == 2
    assert tiny_llama.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_sparse_prefill_reads_nothing_back_from_the_device(tiny_llama, prompt, monkeypatch):
    """The statistics stay on the device until read: an int() of a device tensor per
    layer is a host sync on a GPU (the CPU stops queueing kernels). Counted here as
    int()/item() calls made by the integration's own code."""
    import sys

    calls = []
    for name in ("__int__", "item"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "creative_sparse/models/" in caller:
                calls.append(caller)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    knobs = AttentionKnobs(keep_fraction=0.25, topk=0.25, simthreshd1=-0.1, sink_tokens=0)
    with sparsity(tiny_llama, knobs) as stats:
        tiny_llama(prompt)
        assert stats.sparse_calls == 2 and calls == []
        assert 0.0 < stats.block_sparsity < 1.0 and 0.0 < stats.attended_fraction < 0.8
    assert len(calls) == 3               # one read per count computed on the device


def test_statistics_add_ints_and_device_counts():
    from creative_sparse.models.transformers import AttentionStats

    stats = AttentionStats()
    stats.add(pairs_computed=5, pairs_dense=10)
    stats.add(pairs_computed=torch.tensor(7), blocks_kept=torch.tensor([3]),
              blocks_total=torch.tensor(4, dtype=torch.int32))
    stats.add(pairs_computed=torch.tensor(1))
    assert (stats.pairs_computed, stats.pairs_dense) == (13, 10)
    assert stats.attended_fraction == 1.3 and stats.block_sparsity == 0.25
    assert stats.pairs_computed == 13            # a second read adds nothing twice
    with pytest.raises(ValueError, match="unknown count 'pairs'; the counts are pairs_computed"):
        stats.add(pairs=1)
    assert AttentionStats().attended_fraction == 1.0 and AttentionStats().block_sparsity == 0.0


def test_dense_causal_pair_count_is_closed_form():
    from creative_sparse.attention.blockmap import block_pair_counts
    from creative_sparse.models.transformers import _causal_pairs

    for q_len, k_len in [(1, 1), (1, 90), (37, 37), (64, 300), (300, 130), (5, 2)]:
        q, k = torch.empty(2, 3, q_len, 1), torch.empty(2, 1, k_len, 1)
        counted = int(block_pair_counts(q_len, k_len, 64, 64, True).sum())
        assert _causal_pairs(q, k) == counted * 2 * 3


@torch.no_grad()
def test_sparse_prefill_through_the_gpu_kernel(tiny_llama, prompt, triton_kernel_calls):
    """On CUDA the prefill runs the Triton INT8 kernel (the default backend there); here
    the same path runs under Triton's interpreter: the same maps, logits within the
    kernel's quantization error."""
    from creative_sparse.attention.dispatch import use_backend

    knobs = AttentionKnobs(keep_fraction=0.25, topk=0.25, simthreshd1=-0.1, sink_tokens=0)
    runs = {}
    for backend in ("torch", "triton"):
        with use_backend(backend), sparsity(tiny_llama, knobs) as stats:
            runs[backend] = (tiny_llama(prompt).logits, stats.block_sparsity,
                             stats.attended_fraction)
    assert triton_kernel_calls == [(2, 6, 520, 16)] * 2     # one call per layer
    (exact, *exact_stats), (ours, *our_stats) = runs["torch"], runs["triton"]
    assert our_stats == exact_stats and 0.3 < our_stats[0] < 0.7
    rel = float((ours - exact).abs().sum() / exact.abs().sum())
    assert 0.0 < rel < 1e-3


@torch.no_grad()
def test_sparse_prefill_skips_blocks_and_changes_logits(tiny_llama, prompt):
    ref = tiny_llama(prompt).logits
    knobs = AttentionKnobs(keep_fraction=0.25, topk=0.25, simthreshd1=-0.1, sink_tokens=0)
    with sparsity(tiny_llama, knobs) as stats:
        out = tiny_llama(prompt).logits
    assert stats.sparse_calls == 2
    assert 0.0 < stats.block_sparsity < 1.0
    assert stats.attended_fraction < 0.8
    assert (out - ref).abs().max() > 1e-3
    assert torch.isfinite(out).all()


@torch.no_grad()
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8])
def test_token_topk_attends_the_knob_fraction(tiny_llama, keep):
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    knobs = AttentionKnobs(keep_fraction=keep, sink_tokens=0, local_window=0)
    with sparsity(tiny_llama, knobs) as stats:
        tiny_llama(ids)
    # Causal rows see 1..200 keys; each keeps ceil(keep * visible).
    expected = sum(min(v, -(-keep * v // 1)) for v in range(1, 201)) / sum(range(1, 201))
    assert stats.attended_fraction == pytest.approx(expected, rel=0.02)


@torch.no_grad()
def test_sinks_and_window_are_always_kept(tiny_llama):
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    knobs = AttentionKnobs(keep_fraction=0.01, sink_tokens=3, local_window=5)
    with sparsity(tiny_llama, knobs) as stats:
        tiny_llama(ids)
    # The budget never falls below sinks + window (or the visible keys).
    expected = sum(min(v, 8) for v in range(1, 101)) / sum(range(1, 101))
    assert stats.attended_fraction == pytest.approx(expected, rel=0.02)


@torch.no_grad()
def test_row_seeds_make_reproducible_different_subnetworks(tiny_llama):
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(4)).repeat(3, 1)

    def run(seeds):
        knobs = AttentionKnobs(keep_fraction=0.3, noise=2.0, row_seeds=seeds)
        with sparsity(tiny_llama, knobs):
            return tiny_llama(ids).logits

    a, b = run((1, 2, 1)), run((1, 2, 1))
    assert torch.equal(a, b)                        # same seeds: same result
    assert torch.equal(a[0], a[2])                  # the row depends on its own seed only
    assert (a[0] - a[1]).abs().max() > 1e-4         # different seeds: different sub-network
    with pytest.raises(ValueError, match="one seed per row"):
        run((1, 2))


@torch.no_grad()
def test_generate_under_knobs_and_restore_after_exception(tiny_llama, prompt):
    ids = prompt[:1, :50]
    knobs = AttentionKnobs(keep_fraction=0.5, sink_tokens=2, local_window=4)
    with sparsity(tiny_llama, knobs) as stats:
        out = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 56)
    assert stats.calls == 2 * 6 and stats.attended_fraction < 0.75
    with pytest.raises(RuntimeError, match="boom"):
        with sparsity(tiny_llama, AttentionKnobs(keep_fraction=0.5)):
            raise RuntimeError("boom")
    assert tiny_llama.config._attn_implementation == "sdpa"
    assert torch.equal(tiny_llama(prompt).logits, tiny_llama(prompt).logits)


@pytest.mark.parametrize("field,value,match", [
    ("keep_fraction", 0.0, r"keep_fraction must be in \(0, 1\]"),
    ("keep_fraction", 1.5, r"keep_fraction must be in \(0, 1\]"),
    ("sink_tokens", -1, "sink_tokens must be >= 0"),
    ("cdfthreshd", 0.0, r"cdfthreshd must be in \(0, 1\]"),
    ("noise", -0.5, "noise must be finite and >= 0"),
    ("experts_per_token", 0, "experts_per_token must be None or an int >= 1"),
    ("router_temperature", 0.0, "router_temperature must be finite and > 0"),
])
def test_bad_knobs_are_rejected(field, value, match):
    with pytest.raises(ValueError, match=match):
        AttentionKnobs(**{field: value})


def test_model_without_patchable_attention_is_rejected():
    with pytest.raises(ValueError, match="not a Hugging Face transformers model"):
        with sparsity(torch.nn.Linear(2, 2), AttentionKnobs()):
            pass


MOE_FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
}


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def tiny_moe(request):
    config_cls, model_cls = MOE_FAMILIES[request.param]
    torch.manual_seed(0)
    config = config_cls(vocab_size=128, hidden_size=32, intermediate_size=64,
                        moe_intermediate_size=32, shared_expert_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=8, num_experts=8, num_experts_per_tok=2)
    return model_cls(config).eval()


@torch.no_grad()
def test_moe_experts_per_token_changes_and_restores(tiny_moe):
    routers = find_routers(tiny_moe)
    assert len(routers) == 2
    used = []
    hook = routers[0].register_forward_hook(
        lambda _m, _a, out: used.append(out[2].unique(dim=0).shape[-1]))  # indices [tokens, k]
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(5))
    try:
        base = tiny_moe(ids).logits
        with sparsity(tiny_moe, AttentionKnobs(experts_per_token=6)):
            more = tiny_moe(ids).logits
        again = tiny_moe(ids).logits
    finally:
        hook.remove()
    assert used == [2, 6, 2]
    assert (more - base).abs().max() > 1e-6
    assert torch.equal(again, base)


@torch.no_grad()
def test_router_temperature_changes_routing_weights_only_inside(tiny_moe):
    router = find_routers(tiny_moe)[0]
    x = torch.randn(10, router.hidden_dim)
    _, weights, _ = router(x)
    with moe_routing(tiny_moe, None, temperature=4.0):
        _, hot, _ = router(x)
    _, after, _ = router(x)
    assert not torch.allclose(weights, hot)
    assert torch.equal(weights, after)


def test_moe_errors(tiny_moe, tiny_llama):
    with pytest.raises(ValueError, match=r"experts_per_token must be in \[1, 8\]"):
        with moe_routing(tiny_moe, 9):
            pass
    with pytest.raises(ValueError, match="dense model"):
        with moe_routing(tiny_llama, 2):
            pass


def test_knobs_from_the_dial():
    from creative_sparse.control import SparsityController
    controller = SparsityController()
    dense = AttentionKnobs.from_params(controller.get_sparsity_params(0.0), row_seeds=(1, 2))
    assert dense.dense and dense.noise == 0.0
    params = controller.get_sparsity_params(0.8, num_experts=8, default_experts=2)
    knobs = AttentionKnobs.from_params(params, row_seeds=(1, 2), noise_per_level=0.5)
    assert knobs.keep_fraction == pytest.approx(params.keep_fraction) and not knobs.dense
    assert knobs.noise == pytest.approx(0.4) and knobs.row_seeds == (1, 2)
    assert knobs.experts_per_token == params.experts_per_token > 2
    assert knobs.cdfthreshd == pytest.approx(params.cdfthreshd)


@torch.no_grad()
@pytest.mark.parametrize("noise", [0.0, 1.5])
def test_decode_fast_path_matches_the_masked_path(noise):
    """One query with no mask (the decode fast path) attends exactly the keys the
    general path picks when given an explicit all-visible mask, dense rows included."""
    from creative_sparse.models.token_topk import token_topk as _token_topk
    from creative_sparse.models.transformers import AttentionStats, _Active

    class Layer:
        layer_idx = 1

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 6, 1, 16, generator=gen), torch.randn(3, 2, 90, 16, generator=gen),
               torch.randn(3, 2, 90, 16, generator=gen))
    knobs = AttentionKnobs(keep_fraction=0.4, sink_tokens=2, local_window=6, noise=noise,
                           row_seeds=(7, 8, 9), dense_rows=(1,))
    fast, general = _Active(knobs, AttentionStats(), False), _Active(knobs, AttentionStats(), False)
    out_fast = _token_topk(Layer, q, k, v, None, 0.25, fast)
    mask = torch.ones(3, 1, 1, 90, dtype=torch.bool)
    out_general = _token_topk(Layer, q, k, v, mask, 0.25, general)
    torch.testing.assert_close(out_fast, out_general)
    assert fast.stats.pairs_computed == general.stats.pairs_computed
    assert fast.stats.pairs_dense == general.stats.pairs_dense == 3 * 6 * 90
    # Two sparse rows keep ceil(0.4 * 90) = 36 keys per head, the dense row all 90.
    assert fast.stats.pairs_computed == 6 * (2 * 36 + 90)


def test_engine_decodes_moe_models_with_the_dial(tiny_moe):
    """The decoding engine (oneDNN linears, token top-k decode, more experts) runs MoE
    families end to end, reproducibly, and restores the routers."""
    from creative_sparse.generation.engine import generate
    from creative_sparse.generation.knobs import SamplingParams
    from creative_sparse.models.moe import find_routers

    class Tokenizer:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(6))
    knobs = AttentionKnobs(keep_fraction=0.5, noise=1.0, experts_per_token=4)
    schedule = (SamplingParams(temperature=1.2), knobs)
    runs = [generate(tiny_moe, Tokenizer(), ids, num_rows=3, max_new_tokens=12,
                     schedule=schedule, seeds=[1, 2, 3]) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids
    assert all(len(t) == 12 for t in runs[0].token_ids)
    assert runs[0].stats.attended_fraction < 1.0
    assert find_routers(tiny_moe)[0].top_k == 2
