"""Property: sparse attention equals the fp32 oracle over its own predicted block map.

For random shapes, layouts, dtypes, selection rules and degenerate inputs,
``sparse_attention(..., return_sparsity=True)``

* never raises,
* returns the input layout, shape and dtype, finite,
* reports a sparsity in [0, 1] equal to that of :func:`predict_block_map`'s map,
* equals :func:`masked_attention` over that map's token mask, within
  ``1e-4 * max|v|`` in fp32 and ``1e-2 * max|v|`` in bf16 (both sides round
  an fp32 result to bf16 once, which can differ by one bf16 ulp, 2**-8 relative).

The default backend (the compiled CPU kernel) gets most examples; the pure
PyTorch backend, slower per call, gets a smaller run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from creative_sparse.attention import masked_attention, predict_block_map, sparse_attention

HEAD_DIMS = (8, 16, 24, 32, 64, 80)
INPUT_KINDS = ("normal", "equal_keys", "zeros", "huge", "tiny", "repeated_rows")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # times max|v|


@dataclass(frozen=True)
class Case:
    batch: int
    kv_heads: int
    group: int
    q_len: int
    k_len: int
    head_dim: int
    layout: str
    dtype: torch.dtype
    causal: bool
    selection: str       # "cdfthreshd" or "topk"
    threshold: float     # in (0, 1]
    simthreshd1: float   # in [-1, 1]
    attention_sink: bool
    smooth_k: bool
    kind: str
    seed: int


def lengths(max_len: int) -> st.SearchStrategy[int]:
    """1..max_len, with block edges (64 keys, 128 queries) drawn often."""
    edges = [n for n in (1, 2, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257)
             if n <= max_len]
    return st.one_of(st.sampled_from(edges), st.integers(1, max_len))


@st.composite
def cases(draw, max_len: int = 300) -> Case:
    return Case(
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.sampled_from((1, 2, 3))),
        group=draw(st.integers(1, 3)),
        q_len=draw(lengths(max_len)),
        k_len=draw(lengths(max_len)),
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        layout=draw(st.sampled_from(("HND", "NHD"))),
        dtype=draw(st.sampled_from((torch.float32, torch.bfloat16))),
        causal=draw(st.booleans()),
        selection=draw(st.sampled_from(("cdfthreshd", "topk"))),
        # float32-representable: thresholds are validated in fp32, and a positive
        # double that underflows there is a separate test below.
        threshold=draw(st.floats(0.0, 1.0, exclude_min=True, width=32)),
        simthreshd1=draw(st.floats(-1.0, 1.0)),
        attention_sink=draw(st.booleans()),
        smooth_k=draw(st.booleans()),
        kind=draw(st.sampled_from(INPUT_KINDS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in ``case.layout`` and ``case.dtype``, shaped by ``case.kind``."""
    g = torch.Generator().manual_seed(case.seed)
    heads = case.kv_heads * case.group
    q = torch.randn(case.batch, heads, case.q_len, case.head_dim, generator=g)
    k = torch.randn(case.batch, case.kv_heads, case.k_len, case.head_dim, generator=g)
    v = torch.randn(case.batch, case.kv_heads, case.k_len, case.head_dim, generator=g)
    if case.kind == "equal_keys":
        k = k[:, :, :1].expand_as(k).clone()
    elif case.kind == "zeros":
        q, k, v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    elif case.kind == "huge":
        # 1e3, not more: a score q.k/sqrt(D) grows as the square of the input scale,
        # ~1e6 here; inputs of 1e20 would give ~1e40 > 3.4e38, an fp32 score overflow
        # (inf - inf = NaN in the softmax) in every backend and in the oracle alike.
        q, k, v = q * 1e3, k * 1e3, v * 1e3
    elif case.kind == "tiny":
        q, k, v = q * 1e-20, k * 1e-20, v * 1e-20
    elif case.kind == "repeated_rows":
        # Exact copies of a few rows, anywhere (so across block boundaries); a
        # repeated key brings its value along.
        for group in ((q,), (k, v)):
            n = group[0].shape[2]
            src = torch.randint(0, n, (3,), generator=g)
            dst = torch.randint(0, n, (3,), generator=g)
            for x in group:
                x[:, :, dst] = x[:, :, src]
    q, k, v = (t.to(case.dtype) for t in (q, k, v))
    if case.layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def check_against_oracle(case: Case, backend: str | None) -> None:
    q, k, v = make_inputs(case)
    params = dict(simthreshd1=case.simthreshd1, attention_sink=case.attention_sink,
                  smooth_k=case.smooth_k, **{case.selection: case.threshold})

    out, sparsity = sparse_attention(q, k, v, is_causal=case.causal, tensor_layout=case.layout,
                                     return_sparsity=True, backend=backend, **params)

    assert out.shape == q.shape  # Dv == D here, so the output has q's shape in either layout
    assert out.dtype == case.dtype
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    assert isinstance(sparsity, float) and 0.0 <= sparsity <= 1.0

    # The oracle sees the same [B, H, L, D] views the library does.
    qh, kh, vh = (t.transpose(1, 2) if case.layout == "NHD" else t for t in (q, k, v))
    block_map = predict_block_map(qh, kh, causal=case.causal, **params)
    assert sparsity == block_map.sparsity()
    mask = block_map.to_token_mask()
    expected = masked_attention(qh, kh, vh, mask, causal=block_map.causal)
    got = out.transpose(1, 2) if case.layout == "NHD" else out
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.0,
                               atol=tolerance(qh, kh, vh, case.dtype))


def tolerance(q, k, v, dtype) -> float:
    """``TOLERANCE[dtype] * max|v|``, plus the part of the error no fp32 computation avoids.

    Backend and oracle both compute the scores in fp32, in different summation
    orders, so each score may differ by about one ulp of the largest one, and a
    score error d moves a softmax average by up to about d * max|v|. For ordinary
    inputs (scores ~10) that adds ~1e-6 * max|v|. For "huge" ones (scores ~1e6,
    ulp 0.125) it dominates: keys a few units apart are weighed differently by any
    two correct fp32 computations (seen: 0.07 * max|v| apart, 0.12 of this bound).
    """
    score_bound = (torch.linalg.vector_norm(q.float(), dim=-1).max()
                   * torch.linalg.vector_norm(k.float(), dim=-1).max()
                   / math.sqrt(q.shape[-1])).item()
    rounding = torch.finfo(torch.float32).eps * score_bound
    return (TOLERANCE[dtype] + rounding) * v.abs().max().float().item()


# Hostile corners kept as explicit examples: decode (Lq=1), Lq > Lk under causal
# (rows with no visible key), lengths one past a block, single-key sequences.
CORNERS = [
    Case(1, 3, 3, 1, 300, 80, "NHD", torch.float32, True, "cdfthreshd", 0.97, 0.6, False, True,
         "normal", 0),
    Case(2, 1, 3, 300, 7, 24, "HND", torch.float32, True, "topk", 0.5, -0.1, False, True,
         "normal", 1),
    Case(1, 2, 2, 129, 65, 8, "HND", torch.bfloat16, False, "topk", 1e-6, 1.0, True, False,
         "repeated_rows", 2),
    Case(1, 1, 1, 1, 1, 16, "NHD", torch.float32, True, "cdfthreshd", 1e-6, -1.0, False, True,
         "huge", 3),
    Case(2, 3, 1, 257, 193, 64, "HND", torch.float32, False, "cdfthreshd", 0.5, 1.0, False, False,
         "zeros", 4),
]


def with_corners(test):
    for corner in CORNERS:
        test = example(case=corner)(test)
    return test


@with_corners
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_default_backend_matches_oracle_on_its_block_map(case):
    check_against_oracle(case, backend=None)


@with_corners
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_len=200))
def test_torch_backend_matches_oracle_on_its_block_map(case):
    check_against_oracle(case, backend="torch")


def test_tolerances_can_fail():
    """The comparison is not vacuous: dropping one kept block breaks it."""
    case = Case(1, 1, 1, 200, 200, 16, "HND", torch.float32, False, "cdfthreshd", 1.0, -1.0,
                False, True, "normal", 5)
    q, k, v = make_inputs(case)
    block_map = predict_block_map(q, k, cdfthreshd=1.0, simthreshd1=-1.0)
    assert block_map.sparsity() == 0.0
    mask = block_map.to_token_mask().clone()
    mask[..., :64] = False
    expected = masked_attention(q, k, v, mask)
    out = sparse_attention(q, k, v, cdfthreshd=1.0, simthreshd1=-1.0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, expected, rtol=0.0,
                                   atol=tolerance(q, k, v, torch.float32))
    assert math.isfinite(out.abs().max().item())


@pytest.mark.parametrize("selection", ["cdfthreshd", "topk"])
@pytest.mark.parametrize("value", [1e-300])
def test_tiny_positive_threshold_is_in_range(selection, value):
    """(0, 1] includes every positive double; the check must not round it to 0 first."""
    q = k = v = torch.randn(1, 1, 130, 16, generator=torch.Generator().manual_seed(6))
    out = sparse_attention(q, k, v, **{selection: value})
    assert torch.isfinite(out).all()
