"""Bad input raises ``ValueError`` naming the argument, the value and what is allowed.

Every public attention entry point is held to the same messages, so the tables
below list, per kind of bad input, which entry points take that argument. The
base inputs have grouped-query heads (H=9, H_kv=3) so that per-head and
divisibility errors have something to get wrong.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import creative_sparse.attention as attention
from creative_sparse.attention import (
    BlockMap,
    block_sparse_attention,
    block_sparse_sage2_attn_cuda,
    predict_block_map,
    sparse_attention,
    spas_sage2_attn_meansim_cuda,
    spas_sage2_attn_meansim_topk_cuda,
    spas_sage_attn_meansim_cuda,
    spas_sage_attn_meansim_topk_cuda,
    use_backend,
)

B, H, H_KV, L, D = 1, 9, 3, 100, 16
NQ, NK = 1, 2  # ceil(100 / 128), ceil(100 / 64)
SEED_NAMES = (
    "block_sparse_sage2_attn_cuda",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage2_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim_cuda",
    "spas_sage_attn_meansim_topk_cuda",
)


def _dense_map() -> BlockMap:
    return BlockMap(torch.ones(1, 1, NQ, NK, dtype=torch.bool), 128, 64, L, L)


# Each takes (q, k, v, **kwargs); predict_block_map ignores v.
ENTRY_POINTS = {
    "sparse_attention": sparse_attention,
    "spas_sage2_attn_meansim_cuda": spas_sage2_attn_meansim_cuda,
    "spas_sage2_attn_meansim_topk_cuda": spas_sage2_attn_meansim_topk_cuda,
    "spas_sage_attn_meansim_cuda": spas_sage_attn_meansim_cuda,
    "spas_sage_attn_meansim_topk_cuda": spas_sage_attn_meansim_topk_cuda,
    "block_sparse_sage2_attn_cuda": block_sparse_sage2_attn_cuda,
    "block_sparse_attention":
        lambda q, k, v, **kw: block_sparse_attention(q, k, v, _dense_map(), **kw),
    "predict_block_map": lambda q, k, v, **kw: predict_block_map(q, k, **kw),
}
ALL = tuple(ENTRY_POINTS)
WITH_V = tuple(n for n in ALL if n != "predict_block_map")
WITH_LAYOUT = WITH_V  # predict_block_map takes HND only
WITH_SIM = ("sparse_attention", "spas_sage2_attn_meansim_cuda", "spas_sage2_attn_meansim_topk_cuda",
            "spas_sage_attn_meansim_cuda", "spas_sage_attn_meansim_topk_cuda", "predict_block_map")
WITH_CDF = ("sparse_attention", "spas_sage2_attn_meansim_cuda", "spas_sage_attn_meansim_cuda",
            "predict_block_map")
WITH_TOPK = ("sparse_attention", "spas_sage2_attn_meansim_topk_cuda",
             "spas_sage_attn_meansim_topk_cuda", "predict_block_map")
WITH_PV = ("sparse_attention",) + SEED_NAMES
WITH_ATTN_MASK = tuple(n for n in SEED_NAMES if n != "block_sparse_sage2_attn_cuda")
WITH_BACKEND = ("sparse_attention", "block_sparse_attention")


def qkv(b=B, h=H, h_kv=H_KV, lq=L, lk=L, d=D, dv=D, *, lv=None, bk=None, dk=None,
        dtype=torch.float32, seed=0):
    """Valid inputs by default; ``bk``/``dk``/``lv`` give k and v their own batch,
    k its own head_dim and v its own length."""
    g = torch.Generator().manual_seed(seed)
    bk = b if bk is None else bk
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(bk, h_kv, lk, d if dk is None else dk, generator=g).to(dtype)
    v = torch.randn(bk, h_kv, lk if lv is None else lv, dv, generator=g).to(dtype)
    return q, k, v


def cases(names, *rows):
    """Cross entry-point names with (id, kwargs, pattern) rows into pytest params."""
    return [pytest.param(name, kwargs, pattern, id=f"{name}-{row_id}")
            for row_id, kwargs, pattern in rows for name in names]


# --------------------------------------------------------------------------- shapes

def _q_3d():
    q, k, v = qkv()
    return q[0], k, v


def _k_3d():
    q, k, v = qkv()
    return q, k[0], v


def _v_3d():
    q, k, v = qkv()
    return q, k, v[0]


SHAPE_CASES = [
    # (id, make inputs, entry points, pattern)
    ("q_rank3", _q_3d, ALL, r"\bq\b.*4 dimensions.*\(9, 100, 16\)"),
    ("k_rank3", _k_3d, ALL, r"\bk\b.*4 dimensions.*\(3, 100, 16\)"),
    ("v_rank3", _v_3d, WITH_V, r"\bv\b.*4 dimensions.*\(3, 100, 16\)"),
    ("heads_9_over_2", lambda: qkv(h=9, h_kv=2), ALL, r"heads.*\b9\b.*multiple.*\b2\b"),
    ("head_dim_16_vs_8", lambda: qkv(dk=8), ALL, r"head_dim.*\b8\b.*\b16\b"),
    ("batch_1_vs_2", lambda: qkv(b=1, bk=2), ALL, r"batch.*\b1\b.*\b2\b"),
    ("kv_len_100_vs_90", lambda: qkv(lv=90), WITH_V, r"\bk and v\b.*\b100\b.*\b90\b"),
    ("q_int32", lambda: (lambda q, k, v: (q.to(torch.int32), k, v))(*qkv()), ALL,
     r"\bq\b.*floating.*int32"),
    ("k_int64", lambda: (lambda q, k, v: (q, k.to(torch.int64), v))(*qkv()), ALL,
     r"\bk\b.*floating.*int64"),
    ("v_bool", lambda: (lambda q, k, v: (q, k, v > 0))(*qkv()), WITH_V, r"\bv\b.*floating.*bool"),
    ("q_len_0", lambda: qkv(lq=0), ALL, r"\bq\b.*\(1, 9, 0, 16\).*at least 1"),
    ("kv_len_0", lambda: qkv(lk=0), ALL, r"\bk\b.*\(1, 3, 0, 16\).*at least 1"),
    ("q_meta", lambda: (lambda q, k, v: (q.to("meta"), k, v))(*qkv()), ALL,
     r"\bq\b is on the meta device.*\(1, 9, 100, 16\); allowed: a tensor with data"),
    ("all_meta", lambda: tuple(t.to("meta") for t in qkv()), ALL, r"\bq\b is on the meta device"),
    ("v_meta", lambda: (lambda q, k, v: (q, k, v.to("meta")))(*qkv()), WITH_V,
     r"\bv\b is on the meta device"),
    ("k_sparse", lambda: (lambda q, k, v: (q, k.to_sparse(), v))(*qkv()), ALL,
     r"\bk\b must be a dense \(strided\) tensor, got layout torch\.sparse_coo"),
]


@pytest.mark.parametrize("name, make, pattern", [
    pytest.param(name, make, pattern, id=f"{name}-{case_id}")
    for case_id, make, names, pattern in SHAPE_CASES for name in names
])
def test_bad_shapes_and_dtypes(name, make, pattern):
    q, k, v = make()
    with pytest.raises(ValueError, match=pattern):
        ENTRY_POINTS[name](q, k, v)


def test_nhd_heads_checked_after_the_layout_change():
    q = torch.randn(1, L, 9, D)
    kv = torch.randn(1, L, 2, D)
    with pytest.raises(ValueError, match=r"heads.*\b9\b.*multiple.*\b2\b"):
        sparse_attention(q, kv, kv, tensor_layout="NHD")


# ------------------------------------------------------------------ hyperparameters

NAN = float("nan")
UNIT = r"\(0(\.0)?, 1(\.0)?\]"
SIM = r"\[-1(\.0)?, 1(\.0)?\]"
PV = r"\(0(\.0)?, inf\]"

THRESHOLD_CASES = (
    cases(WITH_SIM,
          ("simthreshd1_1.5", {"simthreshd1": 1.5}, rf"simthreshd1 must be in {SIM}, got 1\.5"),
          ("simthreshd1_-2", {"simthreshd1": -2}, rf"simthreshd1 must be in {SIM}, got -2"),
          ("simthreshd1_nan", {"simthreshd1": NAN}, rf"simthreshd1 must be in {SIM}, got nan"),
          ("simthreshd1_bool", {"simthreshd1": True}, r"simthreshd1 must be a number.*True"),
          ("simthreshd1_len3", {"simthreshd1": torch.tensor([0.1, 0.2, 0.3])},
           r"simthreshd1.*\b9\b entries.*got 3"),
          ("simthreshd1_per_head_one_bad", {"simthreshd1": [0.5] * 8 + [1.25]},
           rf"simthreshd1 must be in {SIM}, got 1\.25"))
    + cases(WITH_CDF,
            ("cdfthreshd_0", {"cdfthreshd": 0}, rf"cdfthreshd must be in {UNIT}, got 0"),
            ("cdfthreshd_1.2", {"cdfthreshd": 1.2}, rf"cdfthreshd must be in {UNIT}, got 1\.2"),
            ("cdfthreshd_nan", {"cdfthreshd": NAN}, rf"cdfthreshd must be in {UNIT}, got nan"),
            ("cdfthreshd_len3", {"cdfthreshd": [0.9, 0.9, 0.9]}, r"cdfthreshd.*\b9\b entries.*got 3"))
    + cases(WITH_TOPK,
            ("topk_0", {"topk": 0}, rf"topk must be in {UNIT}, got 0"),
            ("topk_-0.5", {"topk": -0.5}, rf"topk must be in {UNIT}, got -0\.5"),
            ("topk_1.5", {"topk": 1.5}, rf"topk must be in {UNIT}, got 1\.5"),
            ("topk_nan", {"topk": NAN}, rf"topk must be in {UNIT}, got nan"),
            ("topk_len3", {"topk": torch.full((3,), 0.5)}, r"topk.*\b9\b entries.*got 3"))
    + cases(WITH_PV,
            ("pvthreshd_0", {"pvthreshd": 0}, rf"pvthreshd must be in {PV}, got 0"),
            ("pvthreshd_-1", {"pvthreshd": -1}, rf"pvthreshd must be in {PV}, got -1"),
            ("pvthreshd_nan", {"pvthreshd": NAN}, rf"pvthreshd must be in {PV}, got nan"),
            ("pvthreshd_len3", {"pvthreshd": [15, 15, 15]}, r"pvthreshd.*\b9\b entries.*got 3"))
    + cases(("sparse_attention", "predict_block_map"),
            ("cdfthreshd_and_topk", {"cdfthreshd": 0.9, "topk": 0.5},
             r"cdfthreshd or topk, not both.*cdfthreshd=0\.9.*topk=0\.5"))
)


@pytest.mark.parametrize("name, kwargs, pattern", THRESHOLD_CASES)
def test_bad_thresholds(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ENTRY_POINTS[name](*qkv(), **kwargs)


NUMPY_SCALARS = [
    pytest.param(lambda x: np.float32(x), id="np.float32"),
    pytest.param(lambda x: np.float64(x), id="np.float64"),
    pytest.param(lambda x: np.array(x), id="np.array_0d"),
    pytest.param(lambda x: torch.tensor(x), id="tensor_0d"),
]


@pytest.mark.parametrize("heads", [1, 9])
@pytest.mark.parametrize("wrap", NUMPY_SCALARS)
def test_zero_dimensional_thresholds_apply_to_every_head(wrap, heads):
    """A NumPy scalar, 0-d array or 0-d tensor is a scalar whatever the head count
    (np.float32 and 0-d arrays used to pass with one head and fail with more)."""
    q, k, v = qkv(h=heads, h_kv=1)
    plain = dict(cdfthreshd=0.5, simthreshd1=0.25, pvthreshd=15)
    expected = sparse_attention(q, k, v, **plain)
    out = sparse_attention(q, k, v, **{name: wrap(x) for name, x in plain.items()})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    topk = predict_block_map(q, k, topk=wrap(0.5))
    assert torch.equal(topk.keep, predict_block_map(q, k, topk=0.5).keep)
    with pytest.raises(ValueError, match=r"cdfthreshd must be in .*got 1\.5"):
        sparse_attention(q, k, v, cdfthreshd=wrap(1.5))


@pytest.mark.parametrize("scale", [np.float32(0.5), np.float64(0.5), np.int64(2)],
                         ids=["np.float32", "np.float64", "np.int64"])
def test_numpy_scalar_scale_is_a_number(scale):
    q, k, v = qkv()
    expected = sparse_attention(q, k, v, scale=float(scale))
    torch.testing.assert_close(sparse_attention(q, k, v, scale=scale), expected, rtol=0, atol=0)


# ------------------------------------------------------------------ other arguments

OPTION_CASES = (
    cases(ALL,
          ("scale_0", {"scale": 0}, r"scale must be a positive finite number.*got 0"),
          ("scale_-1", {"scale": -1}, r"scale must be a positive finite number.*got -1"),
          ("scale_inf", {"scale": math.inf}, r"scale must be a positive finite number.*got inf"),
          ("scale_nan", {"scale": NAN}, r"scale must be a positive finite number.*got nan"))
    + cases(WITH_LAYOUT,
            ("layout_BHLD", {"tensor_layout": "BHLD"}, r"tensor_layout must be 'HND'.*'NHD'.*got 'BHLD'"),
            ("layout_lowercase", {"tensor_layout": "hnd"}, r"tensor_layout must be 'HND'.*got 'hnd'"),
            ("output_dtype_int32", {"output_dtype": torch.int32},
             r"output_dtype must be a floating torch\.dtype.*got torch\.int32"),
            ("output_dtype_str", {"output_dtype": "float16"},
             r"output_dtype must be a floating torch\.dtype.*got 'float16'"))
    + cases(SEED_NAMES,
            ("dropout_0.1", {"dropout_p": 0.1}, r"dropout_p must be 0(\.0)? .*got 0\.1"))
    + cases(WITH_ATTN_MASK,
            ("attn_mask", {"attn_mask": torch.ones(1, 1, L, L, dtype=torch.bool)},
             r"attn_mask is not supported.*attn_mask=None"))
    + cases(WITH_BACKEND,
            ("backend_unknown", {"backend": "cudnn"},
             r"unknown attention backend 'cudnn'; allowed: cpu_kernel, triton, flex, torch, reference"))
    + cases(("sparse_attention", "predict_block_map"),
            ("block_q_0", {"block_q": 0}, r"block_q must be a positive int, got 0"),
            ("block_k_-64", {"block_k": -64}, r"block_k must be a positive int, got -64"),
            ("block_q_4097", {"block_q": 4097},
             r"block_q must be a positive int, got 4097; allowed: 1 to 4096"),
            ("block_k_8192", {"block_k": 8192},
             r"block_k must be a positive int, got 8192; allowed: 1 to 4096"))
    + cases(("predict_block_map",),  # sparse_attention: see test_inputs_that_crashed_...
            ("block_q_2**31", {"block_q": 2**31}, r"block_q .*got 2147483648; allowed: 1 to 4096"),
            ("block_k_2**62", {"block_k": 2**62}, r"block_k .*got 4611686018427387904; allowed"))
)


@pytest.mark.parametrize("name, kwargs, pattern", OPTION_CASES)
def test_bad_options(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ENTRY_POINTS[name](*qkv(), **kwargs)


def test_unknown_backend_from_use_backend():
    with pytest.raises(ValueError, match=r"use_backend: unknown attention backend 'cudnn'; allowed: "):
        with use_backend("cudnn"):
            pass


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("CREATIVE_SPARSE_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"CREATIVE_SPARSE_BACKEND: unknown attention backend "
                                         r"'cudnn'; allowed: cpu_kernel"):
        sparse_attention(*qkv())


# ------------------------------------------------------------------------- mask_id

@pytest.mark.parametrize("mask_id, pattern", [
    pytest.param(torch.ones(1, 1, 2, 2), r"mask_id must have shape \[B\|1, H\|1, 1, 2\].*"
                 r"got \(1, 1, 2, 2\)", id="blocks_2x2"),
    pytest.param(torch.ones(1, 2), r"mask_id must have shape .*got \(1, 2\)", id="rank2"),
    pytest.param(torch.ones(2, 1, 1, 2), r"mask_id must have shape .*got \(2, 1, 1, 2\)", id="batch2"),
    pytest.param(torch.ones(1, 4, 1, 2), r"mask_id must have shape .*got \(1, 4, 1, 2\)", id="heads4"),
    pytest.param(torch.full((1, 1, 1, 2), 2), r"mask_id must hold only 0 and 1.*got 2", id="value_2"),
    pytest.param(torch.tensor([[[[1, -1]]]]), r"mask_id must hold only 0 and 1.*got -1", id="value_-1"),
    pytest.param(torch.tensor([[[[1.0, 0.5]]]]), r"mask_id must hold only 0 and 1.*got 0\.5",
                 id="value_0.5"),
    pytest.param(torch.tensor([[[[1.0, NAN]]]]), r"mask_id must hold only 0 and 1.*got nan",
                 id="value_nan"),
    pytest.param([[[[1, 1]]]], r"mask_id must be a tensor or None, got list", id="list"),
])
def test_bad_mask_id(mask_id, pattern):
    with pytest.raises(ValueError, match=pattern):
        block_sparse_sage2_attn_cuda(*qkv(), mask_id=mask_id)


# ------------------------------------------------------------------------ BlockMap

@pytest.mark.parametrize("block_map, pattern", [
    pytest.param(lambda: BlockMap(torch.ones(1, 1, 1, 2, dtype=torch.bool), 128, 64, 100, 101),
                 r"block_map was made for q_len=100, k_len=101; the inputs have q_len=100, k_len=100",
                 id="k_len_101"),
    pytest.param(lambda: BlockMap(torch.ones(1, 1, 1, 2, dtype=torch.bool), 128, 64, 99, 100),
                 r"block_map was made for q_len=99, k_len=100; the inputs have q_len=100",
                 id="q_len_99"),
    pytest.param(lambda: BlockMap(torch.ones(1, 2, 1, 2, dtype=torch.bool), 128, 64, 100, 100),
                 r"block_map\.keep has batch/heads 1/2; allowed: 1 or 1 / 1 or 9", id="keep_heads_2"),
    pytest.param(lambda: BlockMap(torch.ones(3, 1, 1, 2, dtype=torch.bool), 128, 64, 100, 100),
                 r"block_map\.keep has batch/heads 3/1", id="keep_batch_3"),
    pytest.param(lambda: torch.ones(1, 1, 1, 2, dtype=torch.bool),
                 r"block_map must be a BlockMap.*Tensor", id="plain_tensor"),
])
def test_block_sparse_attention_rejects_a_mismatched_block_map(block_map, pattern):
    with pytest.raises(ValueError, match=pattern):
        block_sparse_attention(*qkv(), block_map())


ONES = torch.ones(1, 1, 1, 2, dtype=torch.bool)


@pytest.mark.parametrize("args, pattern", [
    pytest.param((torch.ones(1, 1, 2, 2, dtype=torch.bool), 128, 64, 100, 100),
                 r"keep must have shape \[B, H, 1, 2\] for q_len=100, k_len=100, blocks 128x64; "
                 r"got \(1, 1, 2, 2\)", id="keep_2x2"),
    pytest.param((torch.ones(1, 2, dtype=torch.bool), 128, 64, 100, 100),
                 r"keep must have shape \[B, H, 1, 2\].*got \(1, 2\)", id="keep_rank2"),
    pytest.param((ONES, 0, 64, 100, 100), r"block_q must be a positive int, got 0", id="block_q_0"),
    pytest.param((ONES, 128, 0, 100, 100), r"block_k must be a positive int, got 0", id="block_k_0"),
    pytest.param((ONES, 2**22, 64, 100, 100),
                 r"block_q must be a positive int, got 4194304; allowed: 1 to 4096",
                 id="block_q_2**22"),
    pytest.param((ONES, 128, 2**62, 100, 100), r"block_k .*got 4611686018427387904; allowed",
                 id="block_k_2**62"),
    pytest.param((ONES, 128.0, 64, 100, 100), r"block_q must be a positive int, got 128\.0",
                 id="block_q_float"),
    # keep fits block_q=1, so only the bool check can reject it
    pytest.param((torch.ones(1, 1, 100, 2, dtype=torch.bool), True, 64, 100, 100),
                 r"block_q must be a positive int, got True", id="block_q_bool"),
    pytest.param((ONES, 128, 64, 0, 100), r"q_len must be a positive int, got 0", id="q_len_0"),
    pytest.param((ONES, 128, 64, 100, -5), r"k_len must be a positive int, got -5", id="k_len_-5"),
    pytest.param(([[[[True, True]]]], 128, 64, 100, 100), r"keep must be a .*Tensor.*list",
                 id="keep_list"),
])
def test_block_map_constructor_validates(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        BlockMap(*args)


def _kv_lists(edit=None, *, block_q=128, causal=False):
    """``BlockMap`` arguments for L=100 with every block kept and listed, ``edit``
    applied to ``(keep, counts, indices)`` first."""
    nq = math.ceil(L / block_q)
    keep = torch.ones(1, 1, nq, NK, dtype=torch.bool)
    counts = torch.full((1, 1, nq), NK, dtype=torch.int32)
    indices = torch.arange(NK, dtype=torch.int32).expand(1, 1, nq, NK).clone()
    if edit is not None:
        edit(keep, counts, indices)
    return dict(keep=keep, block_q=block_q, block_k=64, q_len=L, k_len=L, causal=causal,
                kv_lists=(counts, indices))


def _set(which, index, value):
    def edit(keep, counts, indices):
        {"keep": keep, "counts": counts, "indices": indices}[which][index] = value
    return edit


@pytest.mark.parametrize("kwargs, pattern", [
    pytest.param(_kv_lists(_set("indices", (0, 0, 0, 0), 10**6)),
                 r"kv_lists indices must be in \[0, 1\].*got 1000000 at \[0, 0, 0, 0\]",
                 id="index_out_of_range"),
    pytest.param(_kv_lists(_set("indices", (0, 0, 0, 1), -1)),
                 r"kv_lists indices must be in \[0, 1\].*got -1 at \[0, 0, 0, 1\]",
                 id="index_negative"),
    pytest.param(_kv_lists(_set("counts", (0, 0, 0), 3)),
                 r"kv_lists counts must be in \[0, 2\].*got 3 at \[0, 0, 0\]", id="count_3"),
    pytest.param(_kv_lists(_set("counts", (0, 0, 0), -1)),
                 r"kv_lists counts must be in \[0, 2\].*got -1", id="count_negative"),
    pytest.param(_kv_lists(_set("indices", (0, 0, 0, 1), 0)),
                 r"row \[0, 0, 0\].*lists key block 0 2 times", id="duplicate"),
    pytest.param(_kv_lists(_set("keep", (0, 0, 0, 1), False)),
                 r"lists key block 1, which keep does not keep", id="lists_an_unkept_block"),
    pytest.param(_kv_lists(_set("counts", (0, 0, 0), 1)),
                 r"lists 1 blocks without key block 1, which keep keeps", id="misses_a_kept_block"),
    # query rows 0-15 see keys 0-15 only: key block 1 (keys 64-99) is causally removed
    pytest.param(_kv_lists(block_q=16, causal=True),
                 r"must not keep a block causal masking removes entirely; "
                 r"got one at \[0, 0, 0, 1\]",
                 id="causally_removed_block"),
    pytest.param(_kv_lists() | dict(kv_lists=(torch.full((1, 1, 1), 2), torch.zeros(1, 1, 1, 2))),
                 r"kv_lists counts must be int32 on keep's device \(cpu\), got torch\.int64",
                 id="int64_counts"),
    pytest.param(_kv_lists() | dict(kv_lists=(torch.full((1, 1, 1), 2, dtype=torch.int32),)),
                 r"kv_lists must be a pair of tensors.*got tuple", id="one_list"),
    pytest.param(_kv_lists() | dict(keep=torch.ones(1, 1, NQ, NK)),
                 r"with kv_lists, keep must be a bool tensor, got torch\.float32", id="float_keep"),
])
def test_block_map_rejects_bad_kv_lists(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        BlockMap(**kwargs)


def test_block_map_accepts_kv_lists_in_any_order():
    kwargs = _kv_lists(lambda keep, counts, indices: indices.copy_(indices.flip(-1)))
    out = block_sparse_attention(*qkv(), BlockMap(**kwargs), backend="torch")
    expected = block_sparse_attention(*qkv(), _dense_map(), backend="torch")
    torch.testing.assert_close(out, expected)


# Inputs that used to kill the process in the compiled kernel, each run in a child
# process: kv_lists with an index out of range (read out of bounds, exit 139), a
# block_q of 2**31 (per-thread buffers sized by the block: an exception inside
# OpenMP, abort) and a block_k of 2**62 (exit 139).
_CRASH_SCRIPT = """
import sys, torch
from creative_sparse.attention import BlockMap, block_sparse_attention, dispatch, sparse_attention
backend, case = sys.argv[1], sys.argv[2]
if backend not in dispatch.available_backends("cpu"):
    print("SKIP"); sys.exit(0)
q = k = v = torch.randn(1, 1, 300, 16)
try:
    if case == "kv_lists_out_of_range":
        counts = torch.full((1, 1, 3), 5, dtype=torch.int32)
        indices = torch.arange(5, dtype=torch.int32).expand(1, 1, 3, 5).clone()
        indices[..., 0] = 10**6
        bm = BlockMap(torch.ones(1, 1, 3, 5, dtype=torch.bool), 128, 64, 300, 300,
                      kv_lists=(counts, indices))
        block_sparse_attention(q, k, v, bm, backend=backend)
    elif case == "block_q_2**31":
        sparse_attention(q, k, v, block_q=2**31, backend=backend)
    else:
        assert case == "block_k_2**62"
        sparse_attention(q, k, v, block_k=2**62, backend=backend)
except ValueError:
    print("REJECTED"); sys.exit(0)
print("ACCEPTED")
"""


@pytest.mark.parametrize("case", ["kv_lists_out_of_range", "block_q_2**31", "block_k_2**62"])
@pytest.mark.parametrize("backend", ["cpu_kernel", "torch"])
def test_inputs_that_crashed_the_process_are_rejected(backend, case):
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, backend, case],
                          capture_output=True, text=True, timeout=300)
    result = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if result == "SKIP":
        pytest.skip(f"{backend} cannot run here")
    assert (proc.returncode, result) == (0, "REJECTED"), (proc.returncode, proc.stderr[-600:])


# -------------------------------------------------------------- no input mutation

def _snapshot(*tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("name, layout", [
    pytest.param(name, layout, id=f"{name}-{layout}")
    for name in ALL for layout in ("HND", "NHD") if name in WITH_LAYOUT or layout == "HND"
])
def test_inputs_are_unchanged_by_good_and_failing_calls(name, layout):
    q, k, v = qkv(lq=200, lk=150)
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    extra = {} if name == "predict_block_map" else {"tensor_layout": layout}
    call = ENTRY_POINTS[name]
    if name == "block_sparse_attention":
        keep = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)[None, None]
        keep_before = keep.clone()

        def call(q, k, v, **kw):
            return block_sparse_attention(q, k, v, BlockMap(keep, 128, 64, 200, 150), **kw)
    if name == "block_sparse_sage2_attn_cuda":
        keep = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)[None, None]
        keep_before = keep.clone()
        extra["mask_id"] = keep
        extra["attention_sink"] = True  # the one path that edits a mask
    before = _snapshot(q, k, v)

    call(q, k, v, **extra)
    for t, b in zip((q, k, v), before):
        assert torch.equal(t, b)
    # A bad argument every entry point rejects today, so this test stays about mutation.
    bad = {"topk": 0} if name == "predict_block_map" else {"scale": -1.0}
    with pytest.raises(ValueError):
        call(q, k, v, **bad, **extra)
    for t, b in zip((q, k, v), before):
        assert torch.equal(t, b)
    if name in ("block_sparse_attention", "block_sparse_sage2_attn_cuda"):
        assert torch.equal(keep, keep_before)


# ----------------------------------------------------------------- import surface

def test_seed_import_path_exposes_the_seed_names():
    import creative_sparse
    import spas_sage_attn
    from spas_sage_attn import (  # noqa: F401
        block_sparse_sage2_attn_cuda as a,
        spas_sage2_attn_meansim_cuda as b,
        spas_sage2_attn_meansim_topk_cuda as c,
        spas_sage_attn_meansim_cuda as d,
        spas_sage_attn_meansim_topk_cuda as e,
    )
    from spas_sage_attn.creative_sparse import SparsityController  # noqa: F401

    seed_library = {"CreativeSparseWrapper", "QualityFunctional", "QualityWeights",
                    "SparsityConfig", "SparsityController", "compute_quality_score",
                    "find_optimal_sparsity"}
    assert sorted(spas_sage_attn.__all__) == sorted(set(SEED_NAMES) | seed_library)
    for name in SEED_NAMES:
        assert getattr(spas_sage_attn, name) is getattr(attention, name)
    for name in seed_library:  # re-exports only: the very same objects
        assert getattr(spas_sage_attn, name) is getattr(creative_sparse, name)


def test_import_does_no_work():
    code = (
        "import creative_sparse, spas_sage_attn\n"
        "from creative_sparse.attention.backends import cpu_kernel\n"
        "assert cpu_kernel._load.cache_info().currsize == 0, 'C++ kernel built at import'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)
