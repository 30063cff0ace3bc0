"""The vectorised tuner's pieces against the reference: block partials, the PV-skip
emulation, per-head decisions (sparse where it can be, dense where it cannot)."""

import math

import pytest
import torch

from creative_sparse.attention import BlockMap, block_sparse_attention, dense_attention
from creative_sparse.autotune.thresholds import (QKVSample, _pv_gap, _rows, block_partials,
                                                     combine_blocks, measure_layer, tune_layer)


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_on_one_thread(one_thread):
    """Tiny models: one thread is as fast and does not suffer on a shared, busy machine."""

@pytest.mark.parametrize("lq, lk, d", [(300, 200, 24), (128, 64, 16), (129, 65, 8)],
                         ids=["partial-blocks", "exact-blocks", "one-row-over"])
def test_combined_partials_equal_block_sparse_attention(lq, lk, d):
    torch.manual_seed(0)
    b, h = 2, 3
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d + 2)
    nq, nk = math.ceil(lq / 128), math.ceil(lk / 64)
    keep = torch.rand(b, h, nq, nk) < 0.5
    keep[..., 0] = True
    m, l, o = block_partials(q, k, v, None, 64, row_chunk=100)
    out = combine_blocks(m, l, o, _rows(keep, 128, lq))
    ref = block_sparse_attention(q, k, v, BlockMap(keep, 128, 64, lq, lk), backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dense = combine_blocks(m, l, o, torch.ones_like(m, dtype=torch.bool))
    torch.testing.assert_close(dense, dense_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_pv_skip_rule():
    # one query block, three key blocks with scores 10, 0, 10 for every row
    q = torch.zeros(1, 1, 128, 4)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 192, 4)
    k[:, :, :64, 0], k[:, :, 128:, 0] = 10.0, 10.0
    v = torch.randn(1, 1, 192, 4)
    m, l, o = block_partials(q, k, v, 1.0, 64)
    keep = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    gap = _pv_gap(m, _rows(keep, 128, 128), 128)        # natural-log units
    torch.testing.assert_close(gap, torch.tensor([[[[0.0, -10.0, 0.0]]]]))
    for tau, skipped in ((5.0, [False, True, False]), (20.0, [False, False, False])):
        skip = gap < -tau * math.log(2)               # 10 nats = 14.4 in log2 units
        assert skip.flatten().tolist() == skipped
    skip = gap < -5.0 * math.log(2)
    out = combine_blocks(m, l, o, _rows(keep, 128, 128), _rows(skip, 128, 128))
    # expected: block 1's weights stay in the denominator but not in the numerator
    p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    expected = (p * (torch.arange(192) // 64 != 1)) @ v
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # a block kept after a lower one is never skipped (the running max includes it)
    keep2 = torch.tensor([False, True, True]).view(1, 1, 1, 3)
    gap2 = _pv_gap(m, _rows(keep2, 128, 128), 128)
    assert gap2[..., 0].item() == math.inf and gap2[..., 1].item() == 0.0


def _local_head(length, d, width, gen):
    """A head whose queries attend to a window of ~width neighbours (smooth keys)."""
    base = torch.randn(length // width + 2, d, generator=gen)
    x = torch.nn.functional.interpolate(base.T[None], size=length, mode="linear")[0].T
    x = x / x.norm(dim=-1, keepdim=True) * 6.0
    return x, x.clone()


def test_per_head_decisions_and_measured_error():
    gen = torch.Generator().manual_seed(0)
    length, d = 640, 32
    q0, k0 = _local_head(length, d, 64, gen)
    q1 = torch.randn(length, d, generator=gen) * 0.05       # near-uniform attention: not sparse
    k1 = torch.randn(length, d, generator=gen) * 0.05
    q = torch.stack([q0, q1])[None]
    k = torch.stack([k0, k1])[None]
    v = torch.randn(1, 2, length, d, generator=gen)
    samples = [QKVSample(q, k, v, None, length)]
    thresholds, report = tune_layer(samples, l1=0.05, pv_l1=0.06)
    assert thresholds.cdfthreshd[0] < 1.0 and report["head_sparsity"][0] > 0.4
    assert thresholds.dense_heads == (False, True)
    assert report["head_sparsity"][1] == 0.0 and report["dense_heads"] == 1
    assert report["head_l1"][0] < 0.05
    measured = measure_layer(samples, thresholds)
    assert measured["l1"] < 0.05 and measured["sparsity"] > 0.2
    # a tighter target keeps more blocks
    tight, tight_report = tune_layer(samples, l1=0.01, pv_l1=0.011, min_sparsity=0.0)
    assert tight_report["head_sparsity"][0] < report["head_sparsity"][0]
    assert measure_layer(samples, tight)["l1"] < 0.01


def test_head_chunks_give_the_same_answer():
    gen = torch.Generator().manual_seed(1)
    heads = [_local_head(512, 16, w, gen) for w in (32, 64, 128)]
    q = torch.stack([h[0] for h in heads])[None]
    k = torch.stack([h[1] for h in heads])[None]
    v = torch.randn(1, 3, 512, 16, generator=gen)
    samples = [QKVSample(q, k, v, None, 512)]
    whole, _ = tune_layer(samples, l1=0.05, pv_l1=0.06)
    split, _ = tune_layer(samples, l1=0.05, pv_l1=0.06, heads_per_chunk=1)
    assert whole == split


def test_grouped_kv_heads_are_supported():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 300, 16, generator=gen)
    kv = torch.randn(1, 2, 300, 16, generator=gen)
    thresholds, report = tune_layer([QKVSample(q, kv, kv, None, 300)], l1=0.05, pv_l1=0.06)
    assert thresholds.heads == 4 and len(report["head_l1"]) == 4
