"""The dial on the real embedded model (SmolLM2-135M-Instruct)."""

import pytest
import torch

from creative_sparse.control import SparsityController
from creative_sparse.models.transformers import AttentionKnobs, sparsity

pytestmark = pytest.mark.slow

TEXT = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps "
        "as his father had taught him, and at the top he wound the great clockwork that "
        "turned the lens. Ships far out at sea saw the beam sweep across the water. ") * 6


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tokenizer = smollm2
    return tokenizer(TEXT, return_tensors="pt").input_ids


@torch.no_grad()
def test_s0_gives_the_unpatched_logits(smollm2, ids):
    model, _ = smollm2
    ref = model(ids).logits
    knobs = AttentionKnobs.from_params(SparsityController().get_sparsity_params(0.0))
    with sparsity(model, knobs) as stats:
        out = model(ids).logits
    diff = (out - ref).abs().max().item()
    print(f"SmolLM2 s=0 patched vs unpatched: max abs logit difference {diff:.3g}")
    assert diff == 0.0
    assert stats.calls == 30 and stats.attended_fraction == 1.0


@torch.no_grad()
@pytest.mark.parametrize("s", [0.5, 0.9])
def test_s_above_0_attends_the_knob_fraction_and_changes_logits(smollm2, ids, s):
    model, _ = smollm2
    ref = model(ids).logits
    params = SparsityController().get_sparsity_params(s)
    # Short prompt: every call takes the token-level path; no sinks/window so that
    # the attended fraction is the knob's alone.
    knobs = AttentionKnobs.from_params(params, sink_tokens=0, local_window=0,
                                       min_prefill_len=10_000)
    with sparsity(model, knobs) as stats:
        out = model(ids).logits
    n = ids.shape[1]
    kf = params.keep_fraction
    expected = sum(min(v, -(-kf * v // 1)) for v in range(1, n + 1)) / sum(range(1, n + 1))
    diff = (out - ref).abs().max().item()
    print(f"SmolLM2 s={s}: keep_fraction {kf:.3f}, attended {stats.attended_fraction:.3f} "
          f"(expected {expected:.3f}), max abs logit difference {diff:.3g}")
    assert stats.attended_fraction == pytest.approx(expected, rel=0.01)
    assert diff > 1e-3
    # Still a language model: the top next-token agrees with dense on most positions.
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > (0.5 if s < 0.8 else 0.2)


@torch.no_grad()
def test_block_sparse_prefill_on_the_real_model(smollm2, ids):
    model, _ = smollm2
    long_ids = ids.repeat(1, 3)[:, :600]
    ref = model(long_ids).logits
    knobs = AttentionKnobs(keep_fraction=0.5, topk=0.5, simthreshd1=-0.1, min_prefill_len=256)
    with sparsity(model, knobs) as stats:
        out = model(long_ids).logits
    print(f"SmolLM2 prefill topk=0.5: blocks skipped {stats.block_sparsity:.3f}, "
          f"keys attended {stats.attended_fraction:.3f}")
    assert stats.sparse_calls == 30 and 0.2 < stats.block_sparsity < 0.6
    assert torch.isfinite(out).all()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.5
