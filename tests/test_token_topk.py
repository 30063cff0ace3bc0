"""Token top-k attention (attention/token_topk.py) against its plain per-query reference."""

from __future__ import annotations

import math

import pytest
import torch

from creative_sparse.attention.reference import token_topk_keep, token_topk_reference
from creative_sparse.attention.token_topk import (budget_for, subnetwork_noise,
                                                  token_topk_attention)

# (batch, heads, kv heads, queries, keys, head dim): odd sizes, GQA, decode, chunked prefill.
SHAPES = {
    "square-63-d60": (1, 4, 4, 63, 63, 60),
    "gqa-3to1-odd": (2, 6, 2, 17, 17, 8),
    "decode-1x90": (3, 6, 2, 1, 90, 16),
    "chunk-5x500": (1, 3, 1, 5, 500, 16),
    "mqa-33": (2, 4, 1, 33, 33, 12),
}


def _inputs(shape, seed=0):
    b, h, h_kv, q_len, k_len, d = shape
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, q_len, d, generator=gen), torch.randn(b, h_kv, k_len, d, generator=gen),
            torch.randn(b, h_kv, k_len, d + 3, generator=gen))     # Dv != D on purpose


def _check(q, k, v, **kwargs):
    got = token_topk_attention(q, k, v, **kwargs)
    keep = token_topk_keep(q, k, **kwargs)
    # Same keys: the op's weights are positive exactly on the reference's kept keys.
    assert torch.equal(got.weights > 0, keep), "kept keys differ from the reference"
    assert int(got.pairs_computed) == int(keep.sum())
    want = token_topk_reference(q, k, v, **kwargs)
    torch.testing.assert_close(got.out.double(), want, rtol=1e-5, atol=1e-5)
    return got, keep


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("keep_fraction", [0.1, 0.5, 1.0])
def test_matches_the_reference_causal(shape, keep_fraction):
    q, k, v = _inputs(shape)
    got, keep = _check(q, k, v, keep_fraction=keep_fraction, sink_tokens=2, local_window=5,
                       scale=0.3)
    b, h, _, q_len, k_len, _ = shape
    visible = sum(min(k_len, i + 1 + k_len - q_len) for i in range(q_len)) * b * h
    assert int(got.pairs_dense) == visible
    if keep_fraction == 1.0:
        assert int(keep.sum()) == visible


@pytest.mark.parametrize("shape", [SHAPES["gqa-3to1-odd"], SHAPES["decode-1x90"]],
                         ids=["gqa", "decode"])
def test_matches_the_reference_with_noise_and_dense_rows(shape):
    q, k, v = _inputs(shape, seed=3)
    b = shape[0]
    seeds = [11 * r + 5 for r in range(b)]
    noisy, _ = _check(q, k, v, keep_fraction=0.3, sink_tokens=1, local_window=3,
                      noise=1.5, row_seeds=seeds, layer=2, dense_rows=(b - 1,))
    quiet = token_topk_attention(q, k, v, keep_fraction=0.3, sink_tokens=1, local_window=3)
    # The noise changes which keys are kept (else the test would not exercise it).
    assert not torch.equal(noisy.weights[:-1] > 0, quiet.weights[:-1] > 0)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_matches_the_reference_with_a_padding_mask(kind):
    """Left padding (as in batched prompts): row 0's first 7 keys are masked."""
    q, k, v = _inputs((2, 4, 2, 20, 20, 8), seed=4)
    allowed = torch.ones(20, 20).tril().bool().expand(2, 1, 20, 20).clone()
    allowed[0, :, :, :7] = False
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)
    got, _ = _check(q, k, v, keep_fraction=0.4, sink_tokens=2, local_window=3,
                    attention_mask=mask)
    # Row 0's first 7 queries see no key at all: zero output, not NaN.
    assert torch.isfinite(got.out).all() and got.out[0, :, :7].abs().max() == 0


def test_decode_fast_path_equals_the_general_path():
    q, k, v = _inputs(SHAPES["decode-1x90"], seed=5)
    kwargs = dict(keep_fraction=0.4, sink_tokens=2, local_window=6, noise=1.0,
                  row_seeds=(7, 8, 9), dense_rows=(1,))
    fast = token_topk_attention(q, k, v, **kwargs)
    general = token_topk_attention(q, k, v, attention_mask=torch.ones(3, 1, 1, 90, dtype=torch.bool),
                                   **kwargs)
    torch.testing.assert_close(fast.out, general.out)
    assert int(fast.pairs_computed) == int(general.pairs_computed) == 6 * (2 * 36 + 90)


def test_budget_and_noise_are_what_they_say():
    assert budget_for(90, 0.4, 2, 6) == 36 == math.ceil(0.4 * 90)
    assert budget_for(20, 0.1, 4, 8) == 12            # the sinks + window floor
    assert budget_for(5, 0.1, 4, 8) == 5              # never more than visible
    a = subnetwork_noise(3, 1, 4, 1500)
    assert a.shape == (4, 1500) and torch.equal(a, subnetwork_noise(3, 1, 4, 1500))
    assert torch.equal(a[:, :100], subnetwork_noise(3, 1, 4, 100))   # a prefix, not a redraw
    assert not torch.equal(a, subnetwork_noise(4, 1, 4, 1500))


@pytest.mark.parametrize("bad, match", [
    (dict(keep_fraction=0.0), "keep_fraction must be in"),
    (dict(keep_fraction=1.5), "keep_fraction must be in"),
    (dict(keep_fraction=0.5, sink_tokens=-1), "must be >= 0"),
    (dict(keep_fraction=0.5, noise=1.0, row_seeds=(1,)), "one seed per row"),
    (dict(keep_fraction=0.5, dense_rows=(5,)), "outside a batch"),
])
def test_bad_arguments_are_clear_errors(bad, match):
    q, k, v = _inputs((2, 4, 2, 6, 6, 8))
    with pytest.raises(ValueError, match=match):
        token_topk_attention(q, k, v, **bad)


def test_bad_shapes_are_clear_errors():
    q, k, v = _inputs((1, 4, 2, 6, 6, 8))
    with pytest.raises(ValueError, match="H % H_kv == 0"):
        token_topk_attention(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8), keep_fraction=0.5)
    with pytest.raises(ValueError, match="expected q"):
        token_topk_attention(q, k[..., :4], v, keep_fraction=0.5)
