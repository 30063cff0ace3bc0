"""SpargeAttn block prediction: the vectorised :func:`predict_block_map` against a slow,
obvious loop written from the definition, plus properties of the prediction.

The definition (blockmap.py's module docstring), per batch ``b`` and query head ``h``
(reading KV head ``h // (H / H_kv)``):

1. With ``smooth_k``, subtract the mean key over the sequence.
2. Split queries into blocks of ``block_q`` rows and keys into blocks of ``block_k``
   rows (the last block may be partial). Each block has a pooled row (the mean of
   its rows) and a self-similarity: the mean cosine similarity over all ordered
   pairs of its rows, self-pairs included, where a zero row is a zero vector.
3. A query (key) block whose similarity is below ``simthreshd1[h]`` is not
   compressible: its whole row (column) of the map is kept.
4. A key block is causally valid for a query block when some query of the block
   may see some key of the block (bottom-right causal). Over the valid,
   compressible key blocks of each query block:
   ``p = softmax(pooled_q . pooled_k * scale + log(rows in the key block))``.
5. CDF selection: walk the blocks by decreasing ``p``; keep a block while the mass
   of the blocks before it is ``< cdfthreshd``; always keep the first one;
   ``cdfthreshd >= 1`` keeps them all. Top-k selection: keep the
   ``ceil(topk * valid blocks in the row)`` most probable (at least one).
6. ``attention_sink`` keeps key block 0; with causal masking every key block that holds
   the own position (``i + Lk - Lq``) of some query row ``i`` of the block is kept;
   finally only causally valid blocks remain.

The loop version computes in float64, the library in float32. Inputs are random
and continuous (ties and threshold-straddling values have probability ~0), and
every case has a fixed seed, so "exactly equal" is a deterministic check.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from creative_sparse.attention import BlockMap, predict_block_map, sparse_attention
from creative_sparse.attention.blockmap import block_valid_map, pooled_blocks
from creative_sparse.attention.reference import dense_attention

# --------------------------------------------------------------------------- slow oracle


def _per_head(value, heads: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * heads
    values = [float(x) for x in torch.as_tensor(value, dtype=torch.float32).flatten()]
    assert len(values) == heads
    return values


def _blocks(length: int, block: int) -> list[range]:
    return [range(start, min(start + block, length)) for start in range(0, length, block)]


def slow_block_stats(rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean row and mean pairwise cosine similarity (self-pairs included) of ``rows``
    ``[n, D]`` (float64). A zero row is a zero vector: its cosine with anything is 0."""
    n = rows.shape[0]
    units = []
    for row in rows:
        norm = float(row.norm())
        units.append(row / norm if norm > 0 else torch.zeros_like(row))
    units = torch.stack(units)
    cosines = units @ units.T                      # [n, n]: every ordered pair
    return rows.sum(dim=0) / n, float(cosines.sum()) / (n * n)


def slow_predict(q, k, *, simthreshd1=0.6, cdfthreshd=None, topk=None, causal=False,
                 attention_sink=False, smooth_k=True, scale=None, block_q=128, block_k=64):
    """The SpargeAttn block map by the definition above, in plain loops; bool ``[B, H, nq, nk]``."""
    if cdfthreshd is None and topk is None:
        cdfthreshd = 0.97
    b_size, heads, lq, d = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    sim_t = _per_head(simthreshd1, heads)
    thr = _per_head(cdfthreshd if topk is None else topk, heads)
    q64, k64 = q.double(), k.double()
    if smooth_k:
        k64 = k64 - k64.mean(dim=2, keepdim=True)
    q_blocks, k_blocks = _blocks(lq, block_q), _blocks(lk, block_k)
    offset = lk - lq

    def causally_valid(qb: range, kb: range) -> bool:
        # some query i of qb may see some key j of kb: j <= i + offset
        return not causal or kb[0] <= qb[-1] + offset

    keep = torch.zeros(b_size, heads, len(q_blocks), len(k_blocks), dtype=torch.bool)
    for b in range(b_size):
        for h in range(heads):
            kv = h // group
            q_stats = [slow_block_stats(q64[b, h, blk.start:blk.stop]) for blk in q_blocks]
            k_stats = [slow_block_stats(k64[b, kv, blk.start:blk.stop]) for blk in k_blocks]
            q_dense = [sim < sim_t[h] for _, sim in q_stats]
            k_dense = [sim < sim_t[h] for _, sim in k_stats]
            for i, qb in enumerate(q_blocks):
                valid = [j for j, kb in enumerate(k_blocks) if causally_valid(qb, kb)]
                candidates = [j for j in valid if not k_dense[j]]
                logit = {j: float(q_stats[i][0] @ k_stats[j][0]) * scale
                         + math.log(len(k_blocks[j])) for j in candidates}
                chosen = set()
                if candidates:
                    top = max(logit.values())
                    z = sum(math.exp(x - top) for x in logit.values())
                    p = {j: math.exp(x - top) / z for j, x in logit.items()}
                    ranked = sorted(candidates, key=lambda j: -p[j])   # stable: ties by index
                    if topk is None:
                        mass = 0.0
                        for rank, j in enumerate(ranked):
                            if rank > 0 and thr[h] < 1.0 and mass >= thr[h]:
                                break
                            chosen.add(j)
                            mass += p[j]
                    else:
                        # topk is a decimal fraction: 0.3 * 10 blocks is 3 blocks, not 4
                        budget = max(1, math.ceil(round(thr[h] * len(valid), 6)))
                        chosen = set(ranked[:budget])
                own = range(qb[0] + offset, qb[-1] + offset + 1)   # rows' own positions
                for j in valid:
                    diagonal = causal and any(p in own for p in k_blocks[j])
                    keep[b, h, i, j] = (q_dense[i] or k_dense[j] or j in chosen
                                        or (attention_sink and j == 0) or diagonal)
    return keep


# --------------------------------------------------------------------------- inputs


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def structured(gen, b, h, length, d, block, spread=2.5):
    """Rows of each block share a random direction with a random strength in
    [0, spread): block similarities range over (0, 0.85) and pooled scores spread
    out, so every branch of the prediction is exercised."""
    n = math.ceil(length / block)
    centre = torch.randn(b, h, n, 1, d, generator=gen)
    strength = torch.rand(b, h, n, 1, 1, generator=gen) * spread
    x = torch.randn(b, h, n, block, d, generator=gen) + strength * centre
    return x.reshape(b, h, n * block, d)[:, :, :length].contiguous()


def make_qk(name, b, h, h_kv, lq, lk, d, block_q, block_k):
    gen = _gen(name)
    return (structured(gen, b, h, lq, d, block_q), structured(gen, b, h_kv, lk, d, block_k))


# --------------------------------------------------------------------------- exact equality


def _case(lq, lk, h=4, h_kv=2, d=32, bq=16, bk=8, b=1, **params):
    parts = [f"lq{lq}", f"lk{lk}", f"h{h}kv{h_kv}", f"d{d}", f"b{bq}x{bk}"]
    if b != 1:
        parts.append(f"batch{b}")
    parts.append("causal" if params.get("causal") else "full")
    for key in ("cdfthreshd", "topk", "simthreshd1"):
        if key in params:
            value = params[key]
            label = {"cdfthreshd": "cdf", "topk": "topk", "simthreshd1": "sim"}[key]
            parts.append(f"{label}{value}" if isinstance(value, (int, float)) else
                         f"{label}-perhead")
    if params.get("attention_sink"):
        parts.append("sink")
    if params.get("smooth_k") is False:
        parts.append("nosmooth")
    if "scale" in params:
        parts.append(f"scale{params['scale']}")
    shape = dict(lq=lq, lk=lk, h=h, h_kv=h_kv, d=d, bq=bq, bk=bk, b=b)
    return pytest.param(shape, params, id="-".join(parts))


PREDICTION_CASES = [
    _case(1, 1, h=2, h_kv=1, causal=True, cdfthreshd=0.9),
    _case(1, 300, causal=True, topk=0.2),                            # decode: one query
    _case(1, 63, h=2, h_kv=2, cdfthreshd=0.6, simthreshd1=[0.1, 0.6]),
    _case(63, 63, causal=True, cdfthreshd=0.8, simthreshd1=[-0.1, 0.3, 0.5, 0.8]),
    _case(63, 300, h=6, h_kv=2, causal=True, topk=0.5),
    _case(63, 1, causal=False, topk=0.5),
    _case(129, 129, h=4, h_kv=4, cdfthreshd=0.5, smooth_k=False),
    _case(129, 129, causal=True, cdfthreshd=1.0, simthreshd1=-0.1),
    _case(129, 300, cdfthreshd=[0.2, 0.5, 0.8, 0.95], simthreshd1=0.4),
    _case(300, 63, causal=True, cdfthreshd=0.5),                     # Lq > Lk: empty rows
    _case(300, 129, causal=True, topk=torch.tensor([0.1, 0.25, 0.5, 1.0]), simthreshd1=-0.1),
    _case(300, 300, h=4, h_kv=4, d=64, causal=True, topk=0.3, attention_sink=True),
    _case(300, 300, b=2, causal=True, cdfthreshd=0.3, attention_sink=True, smooth_k=False,
          simthreshd1=-0.1),
    _case(300, 300, bq=128, bk=64, b=2, causal=True, cdfthreshd=0.9,
          simthreshd1=[0.2, 0.4, 0.6, 0.8]),
    _case(300, 300, bq=128, bk=64, topk=0.5, attention_sink=True, smooth_k=False),
    _case(65, 129, bq=64, bk=64, cdfthreshd=0.7, scale=0.05, simthreshd1=0.1),
    _case(129, 65, h=3, h_kv=1, bq=32, bk=16, causal=True, topk=[0.1, 0.6, 0.9],
          simthreshd1=[0.5, -0.1, 0.2], attention_sink=True),
    _case(300, 300, h=2, h_kv=1, d=16, bq=16, bk=8, causal=True, cdfthreshd=0.97),  # defaults
]


@pytest.mark.parametrize("shape, params", PREDICTION_CASES)
def test_predict_block_map_equals_slow_loop(shape, params):
    q, k = make_qk(str(shape) + str(params), shape["b"], shape["h"], shape["h_kv"],
                   shape["lq"], shape["lk"], shape["d"], shape["bq"], shape["bk"])
    block_map = predict_block_map(q, k, block_q=shape["bq"], block_k=shape["bk"], **params)
    expected = slow_predict(q, k, block_q=shape["bq"], block_k=shape["bk"], **params)
    assert block_map.keep.shape == expected.shape
    assert (block_map.q_len, block_map.k_len) == (shape["lq"], shape["lk"])
    assert block_map.causal == bool(params.get("causal", False))
    mismatch = (block_map.keep != expected).nonzero().tolist()
    assert not mismatch, f"{len(mismatch)} blocks differ, first [b, h, i, j]: {mismatch[:5]}"


def test_prediction_cases_are_not_trivial():
    """The exact-equality cases must exercise both selection and forced-dense
    blocks: some maps partly sparse, some blocks forced dense by similarity."""
    partly_sparse = forced_dense = 0
    for case in PREDICTION_CASES:
        shape, params = case.values
        q, k = make_qk(str(shape) + str(params), shape["b"], shape["h"], shape["h_kv"],
                       shape["lq"], shape["lk"], shape["d"], shape["bq"], shape["bk"])
        bm = predict_block_map(q, k, block_q=shape["bq"], block_k=shape["bk"], **params)
        partly_sparse += 0.0 < bm.sparsity() < 1.0
        _, sim_q, _ = pooled_blocks(q, shape["bq"])
        forced_dense += bool((sim_q < torch.as_tensor(params.get("simthreshd1", 0.6))
                              .view(1, -1, 1)).any())
    assert partly_sparse >= len(PREDICTION_CASES) // 2
    assert forced_dense >= 3


# --------------------------------------------------------------------------- properties


PROPERTY_SHAPES = [
    pytest.param(300, 300, True, id="lq300-lk300-causal"),
    pytest.param(63, 300, True, id="lq63-lk300-causal"),
    pytest.param(300, 63, True, id="lq300-lk63-causal"),
    pytest.param(129, 200, False, id="lq129-lk200-full"),
    pytest.param(1, 129, True, id="lq1-lk129-causal"),
]


def _qk(lq, lk, h=4, h_kv=2, d=32, b=2, bq=16, bk=8, name="prop"):
    return make_qk(f"{name}-{lq}-{lk}", b, h, h_kv, lq, lk, d, bq, bk)


@pytest.mark.parametrize("selection", [dict(cdfthreshd=0.01), dict(topk=0.01),
                                       dict(cdfthreshd=0.5)], ids=["cdf0.01", "topk0.01", "cdf0.5"])
@pytest.mark.parametrize("lq, lk, causal", PROPERTY_SHAPES)
def test_every_row_with_a_valid_block_keeps_one(lq, lk, causal, selection):
    q, k = _qk(lq, lk)
    bm = predict_block_map(q, k, causal=causal, simthreshd1=-0.1, block_q=16, block_k=8,
                           **selection)
    valid = block_valid_map(lq, lk, 16, 8, causal)
    kept = bm.keep.sum(dim=-1)
    has_valid = valid.any(dim=-1).expand_as(kept)
    assert (kept[has_valid] >= 1).all()
    assert (kept[~has_valid] == 0).all()
    assert not (bm.keep & ~valid).any()
    assert bm.sparsity() > 0.0


@pytest.mark.parametrize("selection", ["cdfthreshd", "topk"])
@pytest.mark.parametrize("lq, lk, causal", PROPERTY_SHAPES)
def test_threshold_one_keeps_every_valid_block(lq, lk, causal, selection):
    q, k = _qk(lq, lk)
    bm = predict_block_map(q, k, causal=causal, simthreshd1=-0.1, block_q=16, block_k=8,
                           **{selection: 1.0})
    assert torch.equal(bm.keep, block_valid_map(lq, lk, 16, 8, causal).expand_as(bm.keep))
    assert bm.sparsity() == 0.0


@pytest.mark.parametrize("selection, values", [
    ("cdfthreshd", [0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.97, 0.999, 1.0]),
    ("topk", [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]),
])
@pytest.mark.parametrize("lq, lk, causal", PROPERTY_SHAPES)
def test_lower_threshold_keeps_a_subset(lq, lk, causal, selection, values):
    q, k = _qk(lq, lk)
    maps = [predict_block_map(q, k, causal=causal, simthreshd1=0.3, block_q=16, block_k=8,
                              **{selection: t}).keep for t in values]
    counts = [int(m.sum()) for m in maps]
    for lower, higher in zip(maps, maps[1:]):
        assert not (lower & ~higher).any(), f"{selection}: a lower value kept more; {counts}"
    assert counts == sorted(counts)
    if lq > 1:
        assert counts[0] < counts[-1], f"the threshold should matter here: {counts}"


def test_per_head_thresholds_act_per_head():
    q, k = _qk(300, 300, h=4, h_kv=2, b=1)
    per_head = predict_block_map(q, k, causal=True, cdfthreshd=[0.1, 0.5, 0.9, 1.0],
                                 simthreshd1=[-0.1, 0.3, 0.5, 0.7], block_q=16, block_k=8)
    for h, (cdf, sim) in enumerate([(0.1, -0.1), (0.5, 0.3), (0.9, 0.5), (1.0, 0.7)]):
        scalar = predict_block_map(q, k, causal=True, cdfthreshd=cdf, simthreshd1=sim,
                                   block_q=16, block_k=8)
        assert torch.equal(per_head.keep[:, h], scalar.keep[:, h]), f"head {h}"


@pytest.mark.parametrize("lq, lk", [(256, 256), (129, 300), (129, 129)],
                         ids=["lq256-lk256", "lq129-lk300", "lq129-lk129"])
def test_simthreshd1_one_makes_random_data_dense(lq, lk):
    # Unstructured random rows: a block of n rows has similarity ~1/n, far below 1, so
    # every block is non-compressible and the whole valid map is kept. Only a
    # single-row block (the last of 129 rows) has similarity ~1 and may escape; it
    # is still kept unless both its query row and its key column escape.
    gen = _gen(f"dense-{lq}-{lk}")
    q = torch.randn(1, 4, lq, 64, generator=gen)
    k = torch.randn(1, 2, lk, 64, generator=gen)
    bm = predict_block_map(q, k, causal=True, simthreshd1=1.0, cdfthreshd=0.1)
    valid = bm.valid().expand_as(bm.keep)
    if lk % 64 != 1:
        assert torch.equal(bm.keep, valid)
    else:
        assert torch.equal(bm.keep[..., :-1, :], valid[..., :-1, :])
        assert torch.equal(bm.keep[..., :, :-1], valid[..., :, :-1])
        assert bm.sparsity() <= 1 / int(bm.valid().sum())


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(simthreshd1=1.01), r"simthreshd1 must be in \[-1.0, 1.0\]"),
    (dict(simthreshd1=-1.5), r"simthreshd1 must be in \[-1.0, 1.0\]"),
    (dict(simthreshd1=[0.5, 1.5]), r"simthreshd1 must be in \[-1.0, 1.0\], got 1.5"),
    (dict(cdfthreshd=0.0), r"cdfthreshd must be in \(0.0, 1.0\]"),
    (dict(cdfthreshd=1.2), r"cdfthreshd must be in \(0.0, 1.0\]"),
    (dict(topk=0.0), r"topk must be in \(0.0, 1.0\]"),
    (dict(topk=[0.5, 0.5, 0.5]), r"topk: a per-head value needs 2 entries"),
    (dict(topk=0.5, cdfthreshd=0.5), r"cdfthreshd or topk, not both"),
], ids=["sim1.01", "sim-1.5", "sim-perhead-1.5", "cdf0", "cdf1.2", "topk0", "topk-3heads",
        "both"])
def test_invalid_thresholds_raise(kwargs, pattern):
    q = torch.randn(1, 2, 100, 32)
    k = torch.randn(1, 1, 100, 32)
    with pytest.raises(ValueError, match=pattern):
        predict_block_map(q, k, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.5, 2])
def test_scalar_and_per_head_checks_agree(value):
    """Scalars are range-checked in plain Python, sequences as tensors: same verdict,
    same message."""
    from creative_sparse.attention.blockmap import per_head_param

    with pytest.raises(ValueError) as scalar:
        per_head_param(value, "cdfthreshd", 2, 0.0, 1.0, low_open=True)
    with pytest.raises(ValueError) as sequence:
        per_head_param([0.5, value], "cdfthreshd", 2, 0.0, 1.0, low_open=True)
    assert str(scalar.value) == str(sequence.value)
    assert str(scalar.value).startswith("cdfthreshd must be in (0.0, 1.0], got ")


def test_scalar_thresholds_cost_no_tensor_operation_per_call():
    """A model calls the prediction once per layer: checking scalar thresholds with
    tensor operations cost about ten of them per call (host time on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from creative_sparse.attention.blockmap import prediction_args

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    q, k = torch.randn(1, 2, 100, 32), torch.randn(1, 1, 100, 32)
    args = dict(simthreshd1=0.6, cdfthreshd=None, topk=0.5, scale=None, block_q=128,
                block_k=64)
    first = prediction_args(q, k, **args)
    with Count():
        again = prediction_args(q, k, **args)
    assert Count.ops == 0
    assert all(torch.equal(a, b) for a, b in zip(first[1:], again[1:]))
    assert again[2].tolist() == [0.5, 0.5]


def _check_valid_map(bm: BlockMap, lq, lk, bq, bk, causal):
    valid = block_valid_map(lq, lk, bq, bk, causal)
    assert bm.keep.dtype == torch.bool
    assert not (bm.keep & ~valid).any()
    kept = bm.keep.sum(dim=-1)
    assert (kept[valid.any(dim=-1).expand_as(kept)] >= 1).all()


DEGENERATE = [
    pytest.param("equal_keys", id="equal-keys"),
    pytest.param("zero_queries", id="zero-queries"),
    pytest.param("both", id="equal-keys-zero-queries"),
    pytest.param("zero_keys", id="zero-keys"),
]


@pytest.mark.parametrize("smooth_k", [True, False], ids=["smooth", "nosmooth"])
@pytest.mark.parametrize("selection", [dict(cdfthreshd=0.5), dict(topk=0.3)],
                         ids=["cdf0.5", "topk0.3"])
@pytest.mark.parametrize("kind", DEGENERATE)
def test_degenerate_inputs_give_a_valid_map_and_finite_output(kind, selection, smooth_k):
    lq, lk = 300, 200
    gen = _gen(kind)
    q = torch.randn(1, 4, lq, 32, generator=gen)
    k = torch.randn(1, 2, lk, 32, generator=gen)
    v = torch.randn(1, 2, lk, 32, generator=gen)
    if kind in ("equal_keys", "both"):
        k = torch.randn(1, 2, 1, 32, generator=gen).expand(1, 2, lk, 32).contiguous()
    if kind in ("zero_queries", "both"):
        q = torch.zeros_like(q)
    if kind == "zero_keys":
        k = torch.zeros_like(k)
    for causal in (False, True):
        for sim in (-0.1, 0.6):
            bm = predict_block_map(q, k, causal=causal, simthreshd1=sim, smooth_k=smooth_k,
                                   block_q=16, block_k=8, **selection)
            _check_valid_map(bm, lq, lk, 16, 8, causal)
            _, sparsity = sparse_attention(q, k, v, is_causal=causal, simthreshd1=sim,
                                           smooth_k=smooth_k, block_q=16, block_k=8,
                                           return_sparsity=True, **selection)
            assert sparsity == pytest.approx(bm.sparsity())
    # All-zero queries have similarity 0 < 0.6: every query row is forced dense,
    # so the output is exactly dense attention.
    if kind in ("zero_queries", "both"):
        for causal in (False, True):
            out, sparsity = sparse_attention(q, k, v, is_causal=causal, simthreshd1=0.6,
                                             smooth_k=smooth_k, return_sparsity=True, **selection)
            assert sparsity == 0.0 and torch.isfinite(out).all()
            torch.testing.assert_close(out, dense_attention(q, k, v, causal=causal),
                                       atol=1e-5, rtol=1e-5)


def test_huge_inputs_do_not_give_nan():
    gen = _gen("huge")
    q = torch.randn(1, 2, 300, 32, generator=gen) * 1e18
    k = torch.randn(1, 2, 300, 32, generator=gen) * 1e18
    for selection in (dict(cdfthreshd=0.5), dict(topk=0.3)):
        bm = predict_block_map(q, k, causal=True, simthreshd1=-0.1, block_q=16, block_k=8,
                               **selection)
        _check_valid_map(bm, 300, 300, 16, 8, True)


# --------------------------------------------------------------------------- pooling


def _slow_pool(x, block):
    pooled, sims, rows = [], [], []
    for blk in _blocks(x.shape[0], block):
        mean, sim = slow_block_stats(x[blk.start:blk.stop].double())
        pooled.append(mean)
        sims.append(sim)
        rows.append(len(blk))
    return torch.stack(pooled), torch.tensor(sims, dtype=torch.float64), rows


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("length", [1, 63, 65, 129, 300])
@pytest.mark.parametrize("zero_tail", [False, True], ids=["random", "zero-last-row"])
def test_pooled_blocks_partial_last_block(length, block, zero_tail):
    gen = _gen(f"pool-{length}-{block}")
    x = torch.randn(2, 3, length, 48, generator=gen)
    if zero_tail:
        x[:, :, -1] = 0.0              # a zero row in the (partial) last block
    pooled, sim, rows = pooled_blocks(x, block)
    n = math.ceil(length / block)
    assert pooled.shape == (2, 3, n, 48) and sim.shape == (2, 3, n) and rows.shape == (n,)
    assert torch.isfinite(pooled).all() and torch.isfinite(sim).all()
    assert ((sim >= -1e-6) & (sim <= 1 + 1e-5)).all()
    for b in range(2):
        for h in range(3):
            exp_pooled, exp_sim, exp_rows = _slow_pool(x[b, h], block)
            assert rows.tolist() == exp_rows
            torch.testing.assert_close(pooled[b, h].double(), exp_pooled, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(sim[b, h].double(), exp_sim, atol=1e-6, rtol=1e-5)
    if length == 1:
        assert sim.flatten().tolist() == pytest.approx([0.0 if zero_tail else 1.0] * 6, abs=1e-6)


def test_pooled_blocks_zero_rows_count_as_dissimilar():
    x = torch.zeros(1, 1, 4, 8)
    x[0, 0, 0, 0] = 3.0
    x[0, 0, 1, 0] = 5.0            # two parallel rows and two zero rows: 4 of 16 pairs are 1
    _, sim, _ = pooled_blocks(x, 4)
    assert sim.item() == pytest.approx(4 / 16)
    _, sim, _ = pooled_blocks(torch.zeros(1, 1, 65, 8), 64)
    assert sim.tolist() == [[[0.0, 0.0]]]


@pytest.mark.parametrize("lq, lk, bq, bk", [(256, 256, 128, 64), (200, 331, 128, 64),
                                            (63, 64, 16, 8), (129, 100, 32, 16), (1, 65, 128, 64)],
                         ids=lambda x: str(x))
def test_causal_rows_with_a_visible_key_always_attend_to_one(lq, lk, bq, bk):
    # Sparsest settings: one block per row unless something forces more.
    gen = torch.Generator().manual_seed(lq * 1000 + lk)
    for _ in range(20):
        q = torch.randn(1, 2, lq, 16, generator=gen)
        k = torch.randn(1, 2, lk, 16, generator=gen)
        bm = predict_block_map(q, k, topk=1e-6, simthreshd1=-1.0, causal=True,
                               block_q=bq, block_k=bk)
        mask = bm.to_token_mask()
        visible = torch.arange(lq).view(-1, 1) + (lk - lq) >= 0
        assert torch.equal(mask.any(-1), visible.view(1, 1, -1).expand(1, 2, -1))
