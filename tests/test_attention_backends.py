"""Every attention backend against the fp32 oracle, and the public wrappers around them.

The oracle is :func:`creative_sparse.attention.reference.masked_attention` over
``block_map.to_token_mask()`` of the *same* :class:`BlockMap` the backend gets.

Tolerances (stated once, used everywhere):

* fp32: ``max|out - ref| <= 1e-4 * max(1, max|ref|)``. Every backend computes in
  fp32 and only the order of the sums differs, so the real error is ~1e-6.
* bf16: both sides compute in fp32 from the same bf16 inputs and round the result
  to bf16 once; two fp32 values a hair apart can round to neighbouring bf16
  values (one ulp, 2**-8 relative), so ``atol=1e-2, rtol=1e-2``.

Shapes are chosen to be hostile: lengths 1, 63, 127, 129, 1025 (not multiples
of the 128 x 64 blocks), ``q_len != k_len`` both ways (causal then aligns
bottom-right, and with ``q_len > k_len`` the first queries see no key at all),
grouped-query heads 9/3, head dims 32 to 256, and block maps that are predicted,
random, full, or have a query-block row with no kept block (whose rows must be
zeros, never NaN).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F

from creative_sparse.attention import (
    BlockMap,
    block_sparse_attention,
    block_sparse_sage2_attn_cuda,
    dense_attention,
    masked_attention,
    predict_block_map,
    sparse_attention,
    spas_sage2_attn_meansim_cuda,
    spas_sage2_attn_meansim_topk_cuda,
    spas_sage_attn_meansim_cuda,
    spas_sage_attn_meansim_topk_cuda,
    use_backend,
)
from creative_sparse.attention import dispatch
from creative_sparse.attention.blockmap import block_valid_map

FP32_TOL = 1e-4          # relative to max(1, max|ref|)
BF16_ATOL = BF16_RTOL = 1e-2
BLOCK_Q, BLOCK_K = 128, 64
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

# --------------------------------------------------------------------------- helpers


def _gen(case_id: str) -> torch.Generator:
    """A generator seeded from the case id: every case is reproducible on its own."""
    return torch.Generator().manual_seed(zlib.crc32(case_id.encode()))


def _qkv(gen, b, h, h_kv, lq, lk, d, dtype):
    q = torch.randn(b, h, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, h_kv, lk, d, generator=gen).to(dtype)
    v = torch.randn(b, h_kv, lk, d, generator=gen).to(dtype)
    return q, k, v


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """``out`` equals ``ref`` within the module's stated tolerance for ``ref.dtype``."""
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "output has NaN or inf"
    if ref.dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), ref.float(), atol=BF16_ATOL, rtol=BF16_RTOL)
    else:
        err = (out.float() - ref.float()).abs().max().item()
        bound = FP32_TOL * max(1.0, ref.float().abs().max().item())
        assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def make_block_map(kind, q, k, causal, scale, gen) -> tuple[BlockMap, int | None]:
    """A block map of the given kind for ``q``/``k``, and the index of its empty
    query-block row (``None`` unless ``kind == "emptyrow"``)."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    nq, nk = math.ceil(lq / BLOCK_Q), math.ceil(lk / BLOCK_K)
    if kind == "pred":
        return predict_block_map(q, k, topk=0.5, simthreshd1=-0.1, causal=causal,
                                 scale=scale), None
    if kind == "full":
        keep = torch.ones(b, h, nq, nk, dtype=torch.bool)
        return BlockMap(keep, BLOCK_Q, BLOCK_K, lq, lk, causal), None
    keep = torch.rand(b, h, nq, nk, generator=gen) < 0.4
    empty_row = None
    if kind == "emptyrow":
        empty_row = nq // 2
        keep[:, :, empty_row, :] = False
    else:
        assert kind == "rand"
    return BlockMap(keep, BLOCK_Q, BLOCK_K, lq, lk, causal), empty_row


def case_id(lq, lk, h, h_kv, d, dtype, causal, kind, b=1, scale=None):
    parts = [f"lq{lq}", f"lk{lk}", f"h{h}kv{h_kv}", f"d{d}", DTYPE_NAMES[dtype],
             "causal" if causal else "full", kind]
    if b != 1:
        parts.append(f"b{b}")
    if scale is not None:
        parts.append(f"s{scale}")
    return "-".join(parts)


def cases(*rows):
    return [pytest.param(*row, id=case_id(*row)) for row in rows]


F32, BF16 = torch.float32, torch.bfloat16

# (lq, lk, h, h_kv, d, dtype, causal, map kind, batch, scale). Covers every length,
# both GQA settings, every head dim, both dtypes, causal or not, and every map kind,
# without the cartesian product.
BACKEND_CASES = cases(
    (1, 1, 4, 4, 64, F32, False, "pred", 1, None),
    (1, 1, 9, 3, 32, BF16, True, "rand", 1, None),
    (63, 63, 9, 3, 80, F32, True, "pred", 2, None),
    (63, 63, 4, 4, 256, BF16, False, "rand", 1, None),
    (127, 127, 4, 4, 128, F32, True, "rand", 1, 0.3),
    (127, 127, 9, 3, 64, BF16, True, "pred", 1, None),
    (129, 129, 9, 3, 128, F32, False, "rand", 2, None),
    (129, 129, 4, 4, 32, BF16, True, "emptyrow", 1, None),
    (129, 129, 4, 4, 80, F32, True, "emptyrow", 1, None),
    (1025, 1025, 4, 4, 64, F32, True, "pred", 1, None),
    (1025, 1025, 9, 3, 32, BF16, False, "rand", 1, None),
    (1025, 1025, 4, 4, 128, F32, False, "emptyrow", 1, 0.05),
    (1025, 1025, 9, 3, 256, BF16, True, "emptyrow", 1, None),
    (1, 1025, 9, 3, 128, F32, True, "pred", 1, None),
    (1, 1025, 4, 4, 256, BF16, False, "rand", 1, None),
    (1, 1025, 4, 4, 32, F32, True, "emptyrow", 1, None),   # nq = 1: the whole map is empty
    (1025, 1, 4, 4, 64, F32, True, "rand", 1, None),       # causal: only the last query sees a key
    (1025, 1, 9, 3, 80, BF16, False, "pred", 1, None),
    (63, 129, 9, 3, 80, BF16, True, "rand", 1, None),
    (63, 129, 4, 4, 64, F32, False, "pred", 1, None),
    (63, 129, 9, 3, 256, F32, True, "full", 1, None),
    (129, 63, 9, 3, 32, F32, True, "pred", 1, None),
    (129, 63, 4, 4, 128, BF16, False, "rand", 2, None),
    (129, 63, 9, 3, 64, F32, True, "emptyrow", 1, None),
    (127, 1025, 9, 3, 256, F32, True, "rand", 1, None),
    (127, 1025, 4, 4, 80, BF16, True, "pred", 1, None),
    (127, 1025, 9, 3, 64, F32, False, "emptyrow", 1, None),
    (1025, 127, 4, 4, 32, F32, True, "pred", 1, 2.0),
    (1025, 127, 9, 3, 128, BF16, True, "rand", 1, None),
    (129, 1025, 4, 4, 64, F32, True, "full", 1, None),
    (1025, 129, 9, 3, 80, F32, False, "full", 1, None),
    (1025, 129, 4, 4, 128, BF16, True, "emptyrow", 2, None),
)

# FlexAttention compiles once per distinct shape (~3-5 s on CPU): a smaller covering
# set that still has a length not a multiple of 64, GQA, q_len != k_len both ways,
# causal, bf16, an empty query-block row and a predicted map (and one more case,
# with other block sizes, in test_backend_with_other_block_sizes).
FLEX_CASES = cases(
    (63, 63, 4, 4, 64, F32, True, "rand", 1, None),
    (129, 1025, 9, 3, 80, BF16, True, "pred", 1, None),
    (1, 1025, 9, 3, 128, F32, True, "pred", 1, None),
    (1025, 129, 4, 4, 32, F32, False, "rand", 1, None),
    (129, 63, 4, 4, 64, F32, True, "emptyrow", 1, None),
    (127, 127, 9, 3, 256, BF16, False, "rand", 2, None),
    (63, 129, 9, 3, 80, BF16, False, "emptyrow", 1, 0.3),
)


def _check_backend(backend, lq, lk, h, h_kv, d, dtype, causal, kind, b, scale):
    gen = _gen(case_id(lq, lk, h, h_kv, d, dtype, causal, kind, b, scale))
    q, k, v = _qkv(gen, b, h, h_kv, lq, lk, d, dtype)
    block_map, empty_row = make_block_map(kind, q, k, causal, scale, gen)
    assert block_map.keep.shape == (b, h, math.ceil(lq / BLOCK_Q), math.ceil(lk / BLOCK_K))
    ref = masked_attention(q, k, v, block_map.to_token_mask(), scale=scale)
    out = dispatch.run_backend(q, k, v, block_map, scale=scale, backend=backend)
    assert_matches(out, ref)
    if empty_row is not None:
        rows = out[:, :, empty_row * BLOCK_Q:(empty_row + 1) * BLOCK_Q]
        assert rows.numel() > 0 and (rows == 0).all(), "an empty query-block row must give zeros"
    if kind == "full":
        assert_matches(out, dense_attention(q, k, v, causal=causal, scale=scale))


# --------------------------------------------------------------------------- backends vs oracle


@pytest.mark.parametrize("lq, lk, h, h_kv, d, dtype, causal, kind, b, scale", BACKEND_CASES)
@pytest.mark.parametrize("backend", ["cpu_kernel", "torch", "reference"])
def test_backend_equals_masked_reference(backend, lq, lk, h, h_kv, d, dtype, causal, kind, b,
                                         scale):
    if backend not in dispatch.available_backends("cpu"):
        pytest.skip(f"{backend} cannot run here (no C++ compiler?)")
    _check_backend(backend, lq, lk, h, h_kv, d, dtype, causal, kind, b, scale)


@pytest.fixture
def flex_recompiles():
    """Each distinct shape recompiles FlexAttention; past torch's recompile limit
    (8) the backend silently computes the wrong thing (see
    test_flex_backend_stays_correct_past_the_recompile_limit). Raise the limit so
    that these tests check the compiled kernel whatever ran before them."""
    from torch._dynamo import config as dynamo_config
    with dynamo_config.patch(recompile_limit=64):
        yield


@pytest.mark.parametrize("lq, lk, h, h_kv, d, dtype, causal, kind, b, scale", FLEX_CASES)
def test_flex_backend_equals_masked_reference(lq, lk, h, h_kv, d, dtype, causal, kind, b, scale,
                                              flex_recompiles):
    if "flex" not in dispatch.available_backends("cpu"):
        pytest.skip("FlexAttention cannot be compiled here")
    _check_backend("flex", lq, lk, h, h_kv, d, dtype, causal, kind, b, scale)


# block_k = 640 is larger than the compiled kernel's 512-key chunk; 4096 (the most
# allowed) is longer than both sequences: one block each way.
BLOCK_SIZE_CASES = [
    pytest.param(backend, bq, bk, id=f"{backend}-b{bq}x{bk}")
    for backend in ("cpu_kernel", "torch")
    for bq, bk in ((16, 8), (64, 128), (100, 37), (128, 640), (4096, 4096))
] + [pytest.param("flex", 64, 128, id="flex-b64x128")]  # one more FlexAttention compile


@pytest.mark.parametrize("backend, bq, bk", BLOCK_SIZE_CASES)
def test_backend_with_other_block_sizes(backend, bq, bk, flex_recompiles):
    if backend not in dispatch.available_backends("cpu"):
        pytest.skip(f"{backend} cannot run here")
    lq, lk = 300, 1300
    gen = _gen(f"blocks-{bq}x{bk}")
    q, k, v = _qkv(gen, 1, 6, 2, lq, lk, 64, F32)
    keep = torch.rand(1, 6, math.ceil(lq / bq), math.ceil(lk / bk), generator=gen) < 0.5
    block_map = BlockMap(keep, bq, bk, lq, lk, causal=True)
    out = dispatch.run_backend(q, k, v, block_map, backend=backend)
    assert_matches(out, masked_attention(q, k, v, block_map.to_token_mask()))


# The flex backend compiles FlexAttention with dynamic=False, so every new shape
# recompiles; past torch._dynamo.config.recompile_limit (8 by default) torch runs
# flex_attention eagerly, and eager FlexAttention applies only mask_mod, which here
# encodes causality and length but not the kept blocks: the result is dense
# attention. The limit is lowered to 1 so that the second shape shows it in seconds;
# with the default, the ninth distinct shape in a process does the same.
_FLEX_RECOMPILE_SCRIPT = textwrap.dedent("""
    import math, sys, warnings, torch
    import torch._dynamo.config
    from creative_sparse.attention import dispatch, masked_attention
    from creative_sparse.attention.blockmap import BlockMap
    if "flex" not in dispatch.available_backends("cpu"):
        print("SKIP"); sys.exit(0)
    warnings.simplefilter("ignore")
    torch._dynamo.config.recompile_limit = 1
    g = torch.Generator().manual_seed(0)
    errors = []
    for lk in (200, 300, 400):
        q = torch.randn(1, 2, 256, 64, generator=g)
        k = torch.randn(1, 2, lk, 64, generator=g)
        v = torch.randn(1, 2, lk, 64, generator=g)
        keep = torch.rand(1, 2, 2, math.ceil(lk / 64), generator=g) < 0.5
        bm = BlockMap(keep, 128, 64, 256, lk, causal=True)
        out = dispatch.run_backend(q, k, v, bm, backend="flex")
        ref = masked_attention(q, k, v, bm.to_token_mask())
        errors.append((out - ref).abs().max().item())
    print(" ".join(f"{e:.3g}" for e in errors))
""")


def test_flex_backend_stays_correct_past_the_recompile_limit():
    proc = subprocess.run([sys.executable, "-c", _FLEX_RECOMPILE_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = proc.stdout.strip().splitlines()[-1]
    if result == "SKIP":
        pytest.skip("FlexAttention cannot be compiled here")
    errors = [float(x) for x in result.split()]
    assert max(errors) <= FP32_TOL, (
        f"max abs error per call (lk = 200, 300, 400): {errors}; calls after the "
        f"recompile limit fall back to eager FlexAttention, which ignores the block lists")


@pytest.mark.parametrize("backend", ["cpu_kernel", "torch", "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_all_empty_map_gives_zeros(backend, causal):
    if backend not in dispatch.available_backends("cpu"):
        pytest.skip(f"{backend} cannot run here")
    q, k, v = _qkv(_gen("empty"), 1, 9, 3, 300, 200, 64, torch.float32)
    block_map = BlockMap(torch.zeros(1, 9, 3, 4, dtype=torch.bool), 128, 64, 300, 200, causal)
    out = dispatch.run_backend(q, k, v, block_map, backend=backend)
    assert out.shape == (1, 9, 300, 64)
    assert (out == 0).all()


# A map whose batch/heads are broadcast ([1, 1, nq, nk]) or whose lengths do not
# match the inputs must be broadcast correctly or rejected with a ValueError. It runs
# in a child process because the compiled kernel reads out of bounds and crashes.
_MISMATCH_SCRIPT = textwrap.dedent("""
    import sys, torch
    from creative_sparse.attention import dispatch, masked_attention
    from creative_sparse.attention.blockmap import BlockMap
    backend, kind = sys.argv[1], sys.argv[2]
    if backend not in dispatch.available_backends("cpu"):
        print("SKIP"); sys.exit(0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 256, 64, generator=g)
    k = torch.randn(2, 4, 256, 64, generator=g)
    v = torch.randn(2, 4, 256, 64, generator=g)
    if kind == "broadcast":
        keep = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)[None, None]
        bm = BlockMap(keep, 128, 64, 256, 256)
    else:  # made for k_len = 1025, used with k_len = 256
        bm = BlockMap(torch.ones(2, 4, 2, 17, dtype=torch.bool), 128, 64, 256, 1025)
    try:
        out = dispatch.run_backend(q, k, v, bm, backend=backend)
    except ValueError:
        print("REJECTED"); sys.exit(0)
    if kind == "broadcast":
        ref = masked_attention(q, k, v, bm.to_token_mask())
        ok = bool(torch.allclose(out, ref, atol=1e-4))
        print("BROADCAST_OK" if ok else "WRONG_RESULT")
    else:
        print("SILENTLY_ACCEPTED")
""")


@pytest.mark.parametrize("kind", ["broadcast", "lengths"])
@pytest.mark.parametrize("backend", ["cpu_kernel", "torch"])
def test_run_backend_with_a_mismatched_block_map_is_safe(backend, kind):
    proc = subprocess.run([sys.executable, "-c", _MISMATCH_SCRIPT, backend, kind],
                          capture_output=True, text=True, timeout=120)
    result = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if result == "SKIP":
        pytest.skip(f"{backend} cannot run here")
    allowed = {"REJECTED", "BROADCAST_OK"} if kind == "broadcast" else {"REJECTED"}
    assert proc.returncode == 0 and result in allowed, (
        f"run_backend(backend={backend!r}) with a {kind} block map: exit code "
        f"{proc.returncode}, result {result!r}; stderr tail: {proc.stderr[-400:]!r}")


# The compiled kernel called directly, past BlockMap's checks: it must size its
# buffers by the sequence, not the block, reject lists out of range, and turn an
# allocation failure into an exception. Before, these aborted the process (an
# exception escaping OpenMP), read out of bounds (exit 139), or took 18.8 GB for
# block_q = 2**22 on 300 tokens. A child process under an 8 GiB address-space limit
# keeps a runaway allocation from touching the machine.
_KERNEL_LIMITS_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    from creative_sparse.attention import masked_attention
    from creative_sparse.attention.backends import cpu_kernel
    ext = cpu_kernel._load()
    if ext is None:
        print("SKIP"); sys.exit(0)
    case = sys.argv[1]

    def lists(b, h, nq, nk):
        return (torch.full((b, h, nq), nk, dtype=torch.int32),
                torch.arange(nk, dtype=torch.int32).expand(b, h, nq, nk).contiguous())

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
    if case == "huge_blocks":
        # fp64 reference: PyTorch's fp32 path here varied between runs by up to 6e-5
        # (seen in 3 of 30), while the kernel's output does not vary
        ref = masked_attention(q.double(), k.double(), v.double(), None, causal=True).float()
        for bq, bk in ((2**22, 64), (128, 2**62), (2**31, 2**31), (2**62, 2**62)):
            nq, nk = 299 // bq + 1, 299 // bk + 1
            out = ext.block_sparse_forward(q, k, v, *lists(1, 2, nq, nk), bq, bk, 0.25, True)
            assert (out - ref).abs().max().item() < 1e-5, (bq, bk)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        assert peak_mib < 2048, f"peak RSS {peak_mib} MiB"
    elif case == "list_out_of_range":
        counts, indices = lists(1, 2, 3, 5)
        indices[0, 1, 2, 0] = 99
        try:
            ext.block_sparse_forward(q, k, v, counts, indices, 128, 64, 0.25, True)
            raise SystemExit("accepted")
        except RuntimeError as exc:
            assert "(0, 1, 2)" in str(exc), str(exc)
    else:
        assert case == "allocation_fails"  # 100000 x 100000 fp32 scores per thread: 40 GB
        n = 100_000
        q = k = v = torch.zeros(1, 1, n, 1)
        try:
            ext.block_sparse_forward(q, k, v, *lists(1, 1, 1, 1), n, n, 1.0, False)
            raise SystemExit("allocated 40 GB under an 8 GiB limit?")
        except (MemoryError, RuntimeError):
            pass
    print("OK")
""")


@pytest.mark.parametrize("case", ["huge_blocks", "list_out_of_range", "allocation_fails"])
def test_compiled_kernel_never_kills_the_process(case):
    proc = subprocess.run([sys.executable, "-c", _KERNEL_LIMITS_SCRIPT, case],
                          capture_output=True, text=True, timeout=300)
    result = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if result == "SKIP":
        pytest.skip("the compiled kernel cannot be built here")
    assert (proc.returncode, result) == (0, "OK"), (proc.returncode, proc.stderr[-800:])


# --------------------------------------------------------------------------- dense limits


DENSE_CASES = [
    pytest.param(256, 256, 4, 4, 64, True, id="lq256-lk256-h4kv4-d64-causal"),
    pytest.param(300, 300, 9, 3, 80, False, id="lq300-lk300-h9kv3-d80-full"),
    pytest.param(129, 129, 9, 3, 32, True, id="lq129-lk129-h9kv3-d32-causal"),
    pytest.param(129, 1025, 4, 2, 64, True, id="lq129-lk1025-h4kv2-d64-causal"),
    pytest.param(1025, 129, 4, 4, 128, False, id="lq1025-lk129-h4kv4-d128-full"),
]


@pytest.mark.parametrize("selection", ["cdfthreshd", "topk"])
@pytest.mark.parametrize("lq, lk, h, h_kv, d, causal", DENSE_CASES)
def test_full_threshold_is_dense(lq, lk, h, h_kv, d, causal, selection):
    q, k, v = _qkv(_gen(f"dense-{lq}-{lk}-{h}-{d}"), 1, h, h_kv, lq, lk, d, torch.float32)
    # simthreshd1=-0.1 forces nothing dense, so density comes from the threshold alone.
    out, sparsity = sparse_attention(q, k, v, is_causal=causal, simthreshd1=-0.1,
                                     return_sparsity=True, **{selection: 1.0})
    assert sparsity == 0.0
    assert_matches(out, dense_attention(q, k, v, causal=causal))
    if lq == lk:
        group = h // h_kv
        sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                              v.repeat_interleave(group, dim=1), is_causal=causal)
        assert_matches(out, sdpa)


# --------------------------------------------------------------------------- sparsity


def _structured(gen, b, h, length, d, block):
    """Rows of each block share a random direction of random strength: block
    similarities and pooled scores spread out, so prediction is not trivial."""
    n = math.ceil(length / block)
    centre = torch.randn(b, h, n, 1, d, generator=gen)
    strength = torch.rand(b, h, n, 1, 1, generator=gen) * 2.5
    x = torch.randn(b, h, n, block, d, generator=gen) + strength * centre
    return x.reshape(b, h, n * block, d)[:, :, :length].contiguous()


def _structured_qkv(name, b=1, h=4, h_kv=2, lq=700, lk=900, d=64):
    gen = _gen(name)
    q = _structured(gen, b, h, lq, d, BLOCK_Q)
    k = _structured(gen, b, h_kv, lk, d, BLOCK_K)
    v = torch.randn(b, h_kv, lk, d, generator=gen)
    return q, k, v


SPARSITY_CASES = [
    pytest.param(sparse_attention, dict(cdfthreshd=0.5, simthreshd1=-0.1, is_causal=True),
                 id="sparse_attention-cdf0.5-causal"),
    pytest.param(sparse_attention, dict(topk=0.3, simthreshd1=-0.1), id="sparse_attention-topk0.3"),
    pytest.param(sparse_attention, dict(topk=[0.2, 0.4, 0.6, 0.8], simthreshd1=[-0.1, 0.5, -0.1, 0.3],
                                        is_causal=True, attention_sink=True, smooth_k=False),
                 id="sparse_attention-perhead-sink-nosmooth"),
    pytest.param(spas_sage2_attn_meansim_cuda, dict(cdfthreshd=0.6, simthreshd1=-0.1,
                                                    is_causal=True),
                 id="spas_sage2_attn_meansim_cuda-cdf0.6"),
    pytest.param(spas_sage_attn_meansim_cuda, dict(cdfthreshd=0.6, simthreshd1=0.3),
                 id="spas_sage_attn_meansim_cuda-cdf0.6-sim0.3"),
    pytest.param(spas_sage2_attn_meansim_topk_cuda, dict(is_causal=True),
                 id="spas_sage2_attn_meansim_topk_cuda-defaults"),
    pytest.param(spas_sage_attn_meansim_topk_cuda, dict(topk=0.25, attention_sink=True),
                 id="spas_sage_attn_meansim_topk_cuda-topk0.25-sink"),
]

# The seed names' defaults that differ from predict_block_map's.
_WRAPPER_DEFAULTS = {
    spas_sage2_attn_meansim_topk_cuda: dict(simthreshd1=-0.1, topk=0.5),
    spas_sage_attn_meansim_topk_cuda: dict(simthreshd1=-0.1, topk=0.5),
}


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("fn, kwargs", SPARSITY_CASES)
def test_reported_sparsity_is_that_of_the_predicted_map(fn, kwargs, layout):
    q, k, v = _structured_qkv(f"sparsity-{fn.__name__}")
    params = {**_WRAPPER_DEFAULTS.get(fn, {}), **kwargs}
    if fn is not sparse_attention:
        params["selection"] = "sparge"  # the seed's names follow the original's rules
    causal = params.pop("is_causal", False)
    expected_map = predict_block_map(q, k, causal=causal, **params)
    args = (q, k, v) if layout == "HND" else tuple(t.transpose(1, 2) for t in (q, k, v))
    out, sparsity = fn(*args, tensor_layout=layout, return_sparsity=True, **kwargs)
    assert 0.0 < expected_map.sparsity() < 1.0, "inputs should give a non-trivial map"
    assert sparsity == pytest.approx(expected_map.sparsity(), abs=1e-12)
    if layout == "NHD":
        out = out.transpose(1, 2)
    assert_matches(out, masked_attention(q, k, v, expected_map.to_token_mask()))


def test_hand_computed_causal_sparsity():
    # 256 x 256 causal, 128 x 64 blocks: query block 0 (rows 0..127) reaches key
    # blocks 0, 1 (keys 0..127); query block 1 reaches all four. 6 of 8 are valid.
    keep_all = torch.ones(2, 3, 2, 4, dtype=torch.bool)
    bm = BlockMap(keep_all, 128, 64, 256, 256, causal=True)
    expected_valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(bm.valid(), expected_valid)
    assert torch.equal(bm.keep, expected_valid.expand(2, 3, 2, 4))  # invalid blocks cleared
    assert bm.sparsity() == 0.0

    keep = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)  # (0,2),(0,3) invalid
    bm = BlockMap(keep[None, None], 128, 64, 256, 256, causal=True)
    assert int(bm.keep.sum()) == 3
    assert bm.sparsity() == pytest.approx(1 - 3 / 6)

    # Per batch and head: 2 x 3 maps, kept counts 0..5 out of 6 valid each.
    keep = torch.zeros(2, 3, 2, 4, dtype=torch.bool)
    valid_positions = expected_valid.nonzero().tolist()
    for i in range(6):
        for r, c in valid_positions[:i]:
            keep[i // 3, i % 3, r, c] = True
    bm = BlockMap(keep, 128, 64, 256, 256, causal=True)
    assert bm.sparsity() == pytest.approx(1 - sum(range(6)) / 36)

    out, s = block_sparse_sage2_attn_cuda(*_qkv(_gen("hand"), 1, 1, 1, 256, 256, 64, F32),
                                          mask_id=torch.tensor([[[[1, 1, 0, 0], [0, 0, 1, 1]]]]),
                                          is_causal=True, return_sparsity=True)
    assert s == pytest.approx(1 - 4 / 6)


def test_noncausal_sparsity_counts_every_block():
    keep = torch.tensor([[[[1, 1, 0, 0], [0, 0, 1, 1]]]], dtype=torch.bool)
    bm = BlockMap(keep, 128, 64, 256, 256)
    assert bm.valid().all() and bm.sparsity() == 0.5
    empty = BlockMap(torch.zeros(1, 1, 2, 4, dtype=torch.bool), 128, 64, 256, 256)
    assert empty.sparsity() == 1.0


# --------------------------------------------------------------------------- BlockMap


def _slow_token_mask(keep, bq, bk, lq, lk, causal):
    keep_list = keep.tolist()
    b, h = keep.shape[:2]
    mask = torch.zeros(b, h, lq, lk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            rows = []
            for i in range(lq):
                rows.append([bool(keep_list[bi][hi][i // bq][j // bk])
                             and (not causal or j <= i + lk - lq) for j in range(lk)])
            mask[bi, hi] = torch.tensor(rows, dtype=torch.bool)
    return mask


MAP_SHAPES = [
    pytest.param(63, 129, 16, 8, True, id="lq63-lk129-b16x8-causal"),
    pytest.param(129, 63, 16, 8, True, id="lq129-lk63-b16x8-causal"),
    pytest.param(300, 300, 128, 64, True, id="lq300-lk300-b128x64-causal"),
    pytest.param(1, 300, 16, 8, True, id="lq1-lk300-b16x8-causal"),
    pytest.param(300, 1, 16, 8, False, id="lq300-lk1-b16x8-full"),
    pytest.param(129, 129, 128, 64, False, id="lq129-lk129-b128x64-full"),
    pytest.param(100, 37, 7, 5, True, id="lq100-lk37-b7x5-causal"),
]


def _random_map(lq, lk, bq, bk, causal, seed):
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    keep = torch.rand(2, 3, nq, nk, generator=torch.Generator().manual_seed(seed)) < 0.5
    return keep, BlockMap(keep, bq, bk, lq, lk, causal)


@pytest.mark.parametrize("lq, lk, bq, bk, causal", MAP_SHAPES)
def test_to_token_mask_equals_slow_loop(lq, lk, bq, bk, causal):
    keep, bm = _random_map(lq, lk, bq, bk, causal, seed=lq * 1000 + lk)
    expected = _slow_token_mask(keep, bq, bk, lq, lk, causal)
    assert expected.any() and not expected.all()
    assert torch.equal(bm.to_token_mask(), expected)


@pytest.mark.parametrize("lq, lk, bq, bk, causal", MAP_SHAPES)
def test_valid_blocks_are_those_holding_an_allowed_pair(lq, lk, bq, bk, causal):
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    bm = BlockMap(torch.ones(1, 1, nq, nk, dtype=torch.bool), bq, bk, lq, lk, causal)
    allowed = _slow_token_mask(torch.ones(1, 1, nq, nk, dtype=torch.bool), bq, bk, lq, lk,
                               causal)[0, 0]
    expected = torch.tensor([[bool(allowed[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any())
                              for j in range(nk)] for i in range(nq)])
    assert torch.equal(bm.valid(), expected)
    assert torch.equal(block_valid_map(lq, lk, bq, bk, causal), expected)
    assert torch.equal(bm.keep[0, 0], expected)


@pytest.mark.parametrize("lq, lk, bq, bk, causal", MAP_SHAPES)
def test_kv_indices_list_the_kept_blocks_in_order(lq, lk, bq, bk, causal):
    _, bm = _random_map(lq, lk, bq, bk, causal, seed=lq + lk)
    counts, indices = bm.kv_indices()
    b, h, nq, nk = bm.keep.shape
    assert counts.dtype == indices.dtype == torch.int32
    assert counts.shape == (b, h, nq) and indices.shape == (b, h, nq, nk)
    keep = bm.keep.tolist()
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                kept = [j for j in range(nk) if keep[bi][hi][i][j]]
                n = int(counts[bi, hi, i])
                assert n == len(kept)
                assert indices[bi, hi, i, :n].tolist() == kept
                # the padding is a permutation of the rest: every block appears once
                assert sorted(indices[bi, hi, i].tolist()) == list(range(nk))


# --------------------------------------------------------------------------- backend selection


@pytest.fixture
def no_env_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def test_automatic_cpu_backend_is_the_compiled_kernel(no_env_backend):
    expected = "cpu_kernel" if "cpu_kernel" in dispatch.available_backends("cpu") else "torch"
    assert dispatch.select_backend("cpu") == expected


def test_automatic_choice_falls_back_to_torch_without_the_kernel(no_env_backend, monkeypatch):
    from creative_sparse.attention.backends import cpu_kernel
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    assert dispatch.select_backend("cpu") == "torch"
    with pytest.raises(ValueError, match="cpu_kernel.*cannot run"):
        dispatch.select_backend("cpu", "cpu_kernel")


@pytest.mark.parametrize("name", ["torch", "reference", "cpu_kernel"])
def test_use_backend_forces_the_backend(no_env_backend, name):
    if name not in dispatch.available_backends("cpu"):
        pytest.skip(f"{name} cannot run here")
    default = dispatch.select_backend("cpu")
    with use_backend(name):
        assert dispatch.select_backend("cpu") == name
        with use_backend("reference"):          # innermost wins
            assert dispatch.select_backend("cpu") == "reference"
        assert dispatch.select_backend("cpu") == name
    assert dispatch.select_backend("cpu") == default


@pytest.mark.parametrize("name", ["torch", "reference"])
def test_environment_variable_forces_the_backend(monkeypatch, name):
    monkeypatch.setenv(dispatch.ENV_VAR, name)
    assert dispatch.select_backend("cpu") == name


def test_backend_precedence(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select_backend("cpu") == "reference"
    with use_backend("torch"):                               # use_backend beats the env var
        assert dispatch.select_backend("cpu") == "torch"
        assert dispatch.select_backend("cpu", "reference") == "reference"  # argument beats both


def test_forced_backend_is_the_one_that_runs(monkeypatch, no_env_backend):
    calls = []

    def fake(q, k, v, block_map, *, scale=None):
        calls.append("torch")
        return torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)

    import creative_sparse.attention.backends.torch_cpu as torch_cpu
    monkeypatch.setattr(torch_cpu, "block_sparse_attention", fake)
    q, k, v = _qkv(_gen("forced"), 1, 2, 2, 100, 100, 32, F32)
    with use_backend("torch"):
        sparse_attention(q, k, v, topk=0.5)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    block_sparse_sage2_attn_cuda(q, k, v)
    assert calls == ["torch", "torch"]


def test_unknown_backend_is_a_value_error_naming_the_allowed(monkeypatch, no_env_backend):
    allowed = ("cpu_kernel", "flex", "torch", "reference")
    for call in (lambda: use_backend("cuda_magic").__enter__(),
                 lambda: dispatch.select_backend("cpu", "cuda_magic")):
        with pytest.raises(ValueError, match="cuda_magic") as info:
            call()
        assert all(name in str(info.value) for name in allowed)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda_magic")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR) as info:
        dispatch.select_backend("cpu")
    assert all(name in str(info.value) for name in allowed)


# --------------------------------------------------------------------------- layout and dtype


LAYOUT_FNS = [
    pytest.param(lambda q, k, v, **kw: sparse_attention(q, k, v, topk=0.5, simthreshd1=-0.1,
                                                        is_causal=True, **kw),
                 id="sparse_attention"),
    pytest.param(lambda q, k, v, **kw: spas_sage2_attn_meansim_cuda(q, k, v, cdfthreshd=0.6,
                                                                    simthreshd1=-0.1, **kw),
                 id="spas_sage2_attn_meansim_cuda"),
    pytest.param(lambda q, k, v, **kw: block_sparse_sage2_attn_cuda(
        q, k, v, mask_id=torch.tensor([[[[1, 0, 1, 0, 1], [0, 1, 0, 1, 1], [1, 1, 0, 0, 1]]]]),
        **kw), id="block_sparse_sage2_attn_cuda"),
    pytest.param(lambda q, k, v, **kw: block_sparse_attention(
        q, k, v, BlockMap(torch.tensor([[[[1, 0, 1, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 0, 0]]]]),
                          128, 64, 300, 300, causal=True), **kw), id="block_sparse_attention"),
]


@pytest.mark.parametrize("fn", LAYOUT_FNS)
def test_nhd_layout_is_the_transposed_hnd_result(fn):
    q, k, v = _structured_qkv("layout", b=2, h=6, h_kv=3, lq=300, lk=300, d=32)
    out_hnd, s_hnd = fn(q, k, v, return_sparsity=True)
    nhd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    out_nhd, s_nhd = fn(*nhd, tensor_layout="NHD", return_sparsity=True)
    assert out_nhd.shape == (2, 300, 6, 32)
    assert s_nhd == s_hnd
    torch.testing.assert_close(out_nhd.transpose(1, 2), out_hnd, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fn", LAYOUT_FNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_output_dtype(fn, dtype):
    q, k, v = (t.to(dtype) for t in _structured_qkv("dtype", h=2, h_kv=1, lq=300, lk=300, d=32))
    out = fn(q, k, v)
    assert out.dtype == dtype and torch.isfinite(out).all()
    for wanted in (torch.float32, torch.bfloat16):
        forced = fn(q, k, v, output_dtype=wanted)
        assert forced.dtype == wanted
        # The same result, rounded to the requested dtype (within one bf16 rounding).
        torch.testing.assert_close(forced.float(), out.float(), atol=1e-2, rtol=1e-2)


def _fp64_oracle(q, k, v, mask, scale=None):
    """Softmax attention over the True entries of ``mask`` in fp64, written out."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: zeros
    return weights @ v


FP64_CALLS = [
    pytest.param(lambda q, k, v, bm, **kw: sparse_attention(q, k, v, topk=0.5, is_causal=True,
                                                            **kw), id="sparse_attention"),
    pytest.param(lambda q, k, v, bm, **kw: block_sparse_attention(q, k, v, bm, **kw),
                 id="block_sparse_attention"),
]


@pytest.mark.parametrize("backend", [None, "torch", "reference"],
                         ids=["auto", "torch", "reference"])
@pytest.mark.parametrize("call", FP64_CALLS)
def test_fp64_inputs_are_computed_in_fp64(call, backend):
    """Inputs of 1e25 give scores of ~1e50: past fp32's 3.4e38 (NaN or zeros when
    computed in fp32), well inside fp64's range."""
    q, k, v = (t.double() * 1e25 for t in _qkv(_gen("fp64"), 1, 4, 2, 200, 300, 32, F32))
    bm = predict_block_map(q, k, topk=0.5, causal=True)
    out = call(q, k, v, bm, backend=backend)
    assert out.dtype == torch.float64
    expected = _fp64_oracle(q, k, v, bm.to_token_mask())
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9 * v.abs().max().item())


def test_fp32_backend_warns_on_fp64_inputs():
    if "cpu_kernel" not in dispatch.available_backends("cpu"):
        pytest.skip("cpu_kernel cannot run here")
    q, k, v = (t.double() for t in _qkv(_gen("fp64-warn"), 1, 2, 2, 100, 100, 16, F32))
    with pytest.warns(UserWarning, match=r"'cpu_kernel' computes fp64 inputs in fp32.*torch, "
                                         r"reference") as record:
        sparse_attention(q, k, v, backend="cpu_kernel")
    assert record[0].filename == __file__  # points at the caller, not the library


def test_reference_backend_rounds_once_to_output_dtype():
    """The oracle used to round to the input dtype (bf16) before output_dtype (fp32):
    less precise than the backends it checks."""
    q, k, v = _qkv(_gen("reference-rounding"), 1, 4, 2, 300, 300, 64, BF16)
    bm = predict_block_map(q, k, topk=0.5)
    expected = masked_attention(q.float(), k.float(), v.float(), bm.to_token_mask())
    for backend in ("reference", "torch", "cpu_kernel"):
        if backend not in dispatch.available_backends("cpu"):
            continue
        out = block_sparse_attention(q, k, v, bm, backend=backend, output_dtype=torch.float32)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5, msg=backend)


# --------------------------------------------------------------------------- seed mask API


def _mask_ref(q, k, v, mask_id, causal=False):
    b, h, lq, _ = q.shape
    bm = BlockMap(mask_id.bool(), 128, 64, lq, k.shape[2], causal).expand_batch_heads(b, h)
    return masked_attention(q, k, v, bm.to_token_mask()), bm


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_shape", ["1x1", "BxH"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_block_sparse_sage2_with_mask_equals_masked_reference(mask_shape, causal, dtype):
    b, h, h_kv, lq, lk = 2, 4, 2, 200, 300
    gen = _gen(f"mask-{mask_shape}-{causal}-{dtype}")
    q, k, v = _qkv(gen, b, h, h_kv, lq, lk, 64, dtype)
    shape = (1, 1, 2, 5) if mask_shape == "1x1" else (b, h, 2, 5)
    mask_id = (torch.rand(shape, generator=gen) < 0.5).to(torch.int32)
    mask_id[..., 1, :] = 0                              # one empty query-block row
    ref, bm = _mask_ref(q, k, v, mask_id, causal)
    out, sparsity = block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask_id, is_causal=causal,
                                                 return_sparsity=True)
    assert_matches(out, ref)
    assert (out[:, :, 128:] == 0).all()
    assert sparsity == pytest.approx(bm.sparsity())
    if not causal:
        assert sparsity == pytest.approx(1 - mask_id.float().mean().item())


def test_block_sparse_sage2_attention_sink_adds_the_first_key_block():
    q, k, v = _qkv(_gen("sink"), 1, 2, 2, 256, 256, 64, F32)
    mask_id = torch.tensor([[[[0, 0, 1, 0], [0, 0, 0, 1]]]])
    out = block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask_id, attention_sink=True)
    ref, _ = _mask_ref(q, k, v, torch.tensor([[[[1, 0, 1, 0], [1, 0, 0, 1]]]]))
    assert_matches(out, ref)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lq, lk", [(200, 300), (256, 256), (1, 1025)], ids=lambda x: str(x))
def test_block_sparse_sage2_without_mask_is_dense(lq, lk, causal):
    q, k, v = _qkv(_gen(f"nomask-{lq}-{lk}"), 1, 9, 3, lq, lk, 80, F32)
    out, sparsity = block_sparse_sage2_attn_cuda(q, k, v, is_causal=causal, return_sparsity=True)
    assert sparsity == 0.0
    assert_matches(out, dense_attention(q, k, v, causal=causal))
