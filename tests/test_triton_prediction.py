"""The fused Triton block-map prediction against the PyTorch one (the reference).

Without a GPU it runs under Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest), where the two compute the same floats in the same order up to the
last ulp, so the maps must be equal block for block, and the kept-block lists
the fused prediction writes must equal ``BlockMap.kv_indices`` of the reference.
"""

from __future__ import annotations

import pytest
import torch

from creative_sparse.attention import BlockMap, dispatch, predict_block_map, sparse_attention

triton_backend = pytest.importorskip("creative_sparse.attention.backends.triton")
pytest.importorskip("triton")

CUDA = torch.cuda.is_available() and triton_backend.available(torch.device("cuda"))


@pytest.fixture
def interpret(monkeypatch):
    if not triton_backend.interpreter_enabled():
        pytest.skip("runs under Triton's interpreter (TRITON_INTERPRET=1 before triton is "
                    "imported); the GPU test below covers the compiled kernels")
    monkeypatch.delenv(dispatch.PREDICTOR_ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def make(lq, lk, h, h_kv, d, *, seed=0, device="cpu", dtype=torch.float32):
    """Queries clustered around a few directions and keys with a shared offset: the
    pooled scores are peaked, so CDF selection keeps few blocks (see test_triton_kernel)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, lq, d, generator=g)
    k = torch.randn(1, h_kv, lk, d, generator=g) + 2.0 * torch.randn(1, h_kv, 1, d, generator=g)
    centers = torch.randn(4, d, generator=g)
    q = 0.5 * q + 2.0 * centers[torch.randint(0, 4, (lq,), generator=g)]
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def assert_same_maps(fused: BlockMap, ref: BlockMap):
    assert fused.keep.shape == ref.keep.shape and fused.keep.dtype == torch.bool
    mismatch = int((fused.keep != ref.keep).sum())
    assert mismatch == 0, f"{mismatch} of {ref.keep.numel()} blocks differ"
    counts, indices = fused.kv_indices()
    want_counts, want_indices = ref.kv_indices()
    assert torch.equal(counts, want_counts)
    assert torch.equal(indices, want_indices)       # the padding too: backends may read it


def both(q, k, **params):
    return triton_backend.predict_block_map(q, k, **params), predict_block_map(q, k, **params)


CASES = [
    # lq, lk, h, h_kv, d, causal, params
    (300, 300, 4, 2, 64, True, dict(cdfthreshd=0.9, simthreshd1=-1.0)),
    (300, 300, 2, 2, 64, False, dict(cdfthreshd=0.5, simthreshd1=-1.0)),
    (640, 640, 4, 2, 64, True, dict(topk=0.3, simthreshd1=-1.0)),
    (129, 333, 2, 1, 40, True, dict(topk=0.7, simthreshd1=0.2)),        # decode-like, d padded
    (333, 129, 2, 2, 64, True, dict(cdfthreshd=0.6, simthreshd1=-1.0)),  # rows with no key
    (1, 700, 2, 1, 64, True, dict(cdfthreshd=0.3, simthreshd1=-1.0)),    # one query row
    (200, 200, 2, 2, 256, True, dict(cdfthreshd=0.6, simthreshd1=-1.0)),
    (300, 300, 4, 2, 64, True, dict(cdfthreshd=[0.3, 0.6, 0.9, 1.0], simthreshd1=0.1)),
    (300, 300, 2, 2, 64, False, dict(topk=[0.2, 0.9], simthreshd1=[-1.0, 0.3])),
    (300, 300, 2, 2, 64, True, dict(cdfthreshd=0.5, simthreshd1=-1.0, smooth_k=False)),
    (300, 300, 2, 1, 64, True, dict(cdfthreshd=0.5, simthreshd1=-1.0, attention_sink=True)),
    (300, 300, 2, 2, 64, False, dict(cdfthreshd=0.5, simthreshd1=-1.0, scale=3.0)),
    (300, 300, 2, 1, 64, True, dict(cdfthreshd=0.6, simthreshd1=-1.0, block_q=64, block_k=32)),
]


@pytest.mark.parametrize("selection", ["mass", "sparge"])
@pytest.mark.parametrize("lq, lk, h, h_kv, d, causal, params", CASES,
                         ids=[f"{c[0]}x{c[1]}-h{c[2]}/{c[3]}-d{c[4]}-"
                              f"{'causal' if c[5] else 'full'}-" + "-".join(c[6]) for c in CASES])
def test_fused_prediction_equals_the_reference(interpret, lq, lk, h, h_kv, d, causal, params,
                                               selection):
    q, k = make(lq, lk, h, h_kv, d, seed=lq + lk)
    fused, ref = both(q, k, causal=causal, selection=selection, **params)
    assert_same_maps(fused, ref)
    assert (fused.block_q, fused.block_k, fused.q_len, fused.k_len, fused.causal) == \
        (ref.block_q, ref.block_k, ref.q_len, ref.k_len, ref.causal)


def test_the_cases_select_for_real(interpret):
    """The comparison above must not be between two all-dense maps."""
    q, k = make(640, 640, 4, 2, 64, seed=1280)
    assert 0.3 < predict_block_map(q, k, topk=0.3, simthreshd1=-1.0, causal=True).sparsity()
    q, k = make(300, 300, 2, 2, 64, seed=600)
    assert 0.3 < predict_block_map(q, k, cdfthreshd=0.5, simthreshd1=-1.0).sparsity()


@pytest.mark.parametrize("params", [dict(cdfthreshd=0.5), dict(topk=0.3), dict(cdfthreshd=0.95)],
                         ids=["cdf0.5", "top0.3", "cdf0.95"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("selection", ["mass", "sparge"])
def test_exact_ties_are_taken_in_index_order(interpret, params, causal, selection):
    """Identical key blocks score exactly alike; a stable sort keeps the first ones."""
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 64, 64, generator=g).repeat(1, 1, 10, 1)
    q = torch.randn(1, 2, 640, 64, generator=g)
    fused, ref = both(q, k, simthreshd1=-1.0, causal=causal, selection=selection, **params)
    assert_same_maps(fused, ref)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy overflow in the interpreter
@pytest.mark.parametrize("name, scale", [("zeros", 0.0), ("huge", 1e20)])
def test_degenerate_inputs(interpret, name, scale):
    """All-zero inputs (every score tied, similarity 0) and scores that overflow."""
    q, k = make(300, 300, 2, 2, 64, seed=5)
    for params in (dict(cdfthreshd=0.5), dict(topk=0.4, causal=True)):
        for selection in ("mass", "sparge"):
            fused, ref = both(q * scale, k * scale, simthreshd1=-1.0, selection=selection,
                              **params)
            assert_same_maps(fused, ref)


def test_dissimilar_blocks_are_always_computed(interpret):
    """simthreshd1 = 1 marks every block as not compressible: the whole map is kept."""
    q, k = make(300, 300, 2, 1, 64)
    for selection in ("mass", "sparge"):
        fused, ref = both(q, k, simthreshd1=1.0, cdfthreshd=0.3, causal=True, selection=selection)
        assert_same_maps(fused, ref)
        assert fused.sparsity() == 0.0


def test_sparse_attention_with_the_fused_predictor(interpret, monkeypatch):
    q, k = make(300, 300, 4, 2, 64, seed=2)
    v = torch.randn(1, 2, 300, 64)
    params = dict(is_causal=True, cdfthreshd=0.5, simthreshd1=-1.0, backend="torch",
                  return_sparsity=True)
    want, want_s = sparse_attention(q, k, v, predictor="torch", **params)
    got, got_s = sparse_attention(q, k, v, predictor="triton", **params)
    assert got_s == want_s > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setenv(dispatch.PREDICTOR_ENV_VAR, "triton")
    assert dispatch.select_predictor("cpu") == "triton"
    env, _ = sparse_attention(q, k, v, **params)
    torch.testing.assert_close(env, want, rtol=0, atol=0)


def test_the_kernel_reads_the_lists_the_prediction_wrote(interpret):
    """The attention kernel walks kv_lists; its output equals the one from sorted lists."""
    from creative_sparse.attention import block_sparse_attention
    q, k = make(300, 300, 2, 2, 64, seed=3)
    v = torch.randn(1, 2, 300, 64)
    fused, ref = both(q, k, cdfthreshd=0.5, simthreshd1=-1.0, causal=True)
    assert fused.kv_lists is not None and ref.kv_lists is None
    got = block_sparse_attention(q, k, v, fused, backend="triton")
    want = block_sparse_attention(q, k, v, ref, backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_default_is_auto_which_means_torch_off_cuda(monkeypatch):
    monkeypatch.delenv(dispatch.PREDICTOR_ENV_VAR, raising=False)
    assert dispatch.select_predictor("cpu") == "torch"
    assert dispatch.select_predictor("cpu", "auto") == "torch"
    assert dispatch.select_predictor("meta") == "torch"


@pytest.fixture
def auto_on_cpu(interpret, monkeypatch):
    """``"auto"`` weighing the fused predictor on CPU tensors, as it does on CUDA (here the
    fused one runs under the interpreter), with no choice made yet."""
    monkeypatch.setattr(dispatch, "_auto_candidate", lambda device: True)
    monkeypatch.setattr(dispatch, "_choices", {})
    q, k = make(300, 300, 4, 2, 64, seed=4)
    return q, k, dict(cdfthreshd=0.5, simthreshd1=-1.0, causal=True)


def test_auto_keeps_torch_where_the_fused_predictor_is_slower(auto_on_cpu, caplog):
    q, k, params = auto_on_cpu
    assert dispatch.select_predictor("cpu") == "auto"
    with caplog.at_level("INFO", logger="creative_sparse.attention.dispatch"):
        got = dispatch.predict(q, k, **params)           # interpreted: far slower
    assert dispatch.predictor_choices() == {"cpu": "torch"}
    assert dispatch.select_predictor("cpu") == "torch"
    assert "'torch' (fused" in caplog.text and "differ on 0.000% of blocks" in caplog.text
    assert_same_maps(got, predict_block_map(q, k, **params))


def test_auto_chooses_the_fused_predictor_where_it_agrees_and_is_faster(auto_on_cpu,
                                                                      monkeypatch):
    q, k, params = auto_on_cpu
    times = iter([0.001, 0.004])                   # fused, then PyTorch
    monkeypatch.setattr(dispatch, "_seconds", lambda fn, device: next(times))
    first = dispatch.predict(q, k, **params)
    assert first.kv_lists is not None               # the fused map, lists and all
    assert dispatch.predictor_choices() == {"cpu": "triton"}
    calls = []
    fused = triton_backend.predict_block_map
    monkeypatch.setattr(triton_backend, "predict_block_map",
                        lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    assert_same_maps(dispatch.predict(q, k, **params), predict_block_map(q, k, **params))
    assert calls == [1]                             # no more comparing or timing


def test_auto_falls_back_to_torch_when_the_maps_disagree(auto_on_cpu, monkeypatch, caplog):
    q, k, params = auto_on_cpu
    fused = triton_backend.predict_block_map

    def flipped(*args, **kwargs):
        bm = fused(*args, **kwargs)
        return BlockMap(~bm.keep, bm.block_q, bm.block_k, bm.q_len, bm.k_len, bm.causal)
    monkeypatch.setattr(triton_backend, "predict_block_map", flipped)
    got = dispatch.predict(q, k, **params)
    assert dispatch.predictor_choices() == {"cpu": "torch"}
    assert "the fused map differs on" in caplog.text and "more than 0.3%" in caplog.text
    assert_same_maps(got, predict_block_map(q, k, **params))


def test_auto_falls_back_to_torch_when_the_fused_predictor_fails(auto_on_cpu, monkeypatch,
                                                                caplog):
    q, k, params = auto_on_cpu

    def broken(*args, **kwargs):
        raise RuntimeError("PTX compilation failed")
    monkeypatch.setattr(triton_backend, "predict_block_map", broken)
    got = dispatch.predict(q, k, **params)
    assert dispatch.predictor_choices() == {"cpu": "torch"}
    assert "the fused predictor failed: RuntimeError('PTX compilation failed')" in caplog.text
    assert_same_maps(got, predict_block_map(q, k, **params))


def test_auto_does_not_choose_on_a_configuration_the_fused_predictor_refuses(auto_on_cpu):
    q, k = make(64, 64, 1, 1, 300)                  # head dim 300: PyTorch only
    got = dispatch.predict(q, k, cdfthreshd=0.5)
    assert dispatch.predictor_choices() == {}      # the next call may still choose
    assert_same_maps(got, predict_block_map(q, k, cdfthreshd=0.5))


def test_predictor_errors(monkeypatch):
    monkeypatch.delenv(dispatch.PREDICTOR_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="unknown block-map predictor 'cuda'; allowed: auto, "
                                         "torch, triton"):
        dispatch.select_predictor("cpu", "cuda")
    monkeypatch.setenv(dispatch.PREDICTOR_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="CREATIVE_SPARSE_PREDICTOR: unknown block-map"):
        dispatch.select_predictor("cpu")
    monkeypatch.setattr(triton_backend, "available", lambda device: False)
    with pytest.raises(ValueError, match="'triton' predictor cannot run on device cpu"):
        dispatch.select_predictor("cpu", "triton")


def test_unsupported_shapes_are_rejected(interpret):
    q, k = make(64, 64, 1, 1, 300)
    with pytest.raises(ValueError, match="prediction supports head_dim up to 256, got 300"):
        triton_backend.predict_block_map(q, k)
    q, k = make(64, 64, 1, 1, 32)
    with pytest.raises(ValueError, match="block_k a power of two >= 16, got 48"):
        triton_backend.predict_block_map(q, k, block_k=48)
    with pytest.raises(ValueError, match="give cdfthreshd or topk, not both"):
        triton_backend.predict_block_map(q, k, cdfthreshd=0.5, topk=0.5)
    with pytest.raises(ValueError, match=r"cdfthreshd must be in \(0.0, 1.0\], got 1.5"):
        triton_backend.predict_block_map(q, k, cdfthreshd=1.5)


def test_block_map_checks_the_lists_it_is_given():
    keep = torch.ones(1, 2, 1, 3, dtype=torch.bool)
    counts = torch.full((1, 2, 1), 3, dtype=torch.int32)
    indices = torch.arange(3, dtype=torch.int32).expand(1, 2, 1, 3).contiguous()
    BlockMap(keep, 128, 64, 100, 150, kv_lists=(counts, indices))
    with pytest.raises(ValueError, match=r"indices \(1, 2, 1, 3\); got \(1, 2, 1\) and \(1, 2, 3\)"):
        BlockMap(keep, 128, 64, 100, 150,
                 kv_lists=(counts, torch.zeros(1, 2, 3, dtype=torch.int32)))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compute capability >= 8.0) and Triton")
@pytest.mark.parametrize("params", [dict(cdfthreshd=0.5), dict(topk=0.3)], ids=["cdf", "topk"])
def test_gpu_fused_prediction_matches_torch(params):
    """Compiled, GPU reductions and exp round differently from PyTorch's, so a block
    whose score sits at the threshold may flip: allow a few in a thousand. The block
    similarities here are 0.010-0.018 (K) and 0.21-0.24 (Q), so simthreshd1 = 0.005
    keeps them off the threshold, where one flip would turn a whole row or column
    (measured on CPU: these settings skip 50% and 65% of the blocks)."""
    q, k = make(4096 + 37, 4096 + 37, 16, 4, 128, device="cuda", dtype=torch.bfloat16)
    fused, ref = both(q, k, simthreshd1=0.005, causal=True, **params)
    differ = float((fused.keep != ref.keep).float().mean())
    assert differ < 3e-3, f"{differ:.4%} of the blocks differ"
    assert abs(fused.sparsity() - ref.sparsity()) < 0.01 and ref.sparsity() > 0.2
    counts, indices = fused.kv_indices()
    fused_lists = BlockMap(fused.keep, 128, 64, fused.q_len, fused.k_len, True).kv_indices()
    assert torch.equal(counts, fused_lists[0]) and torch.equal(indices, fused_lists[1])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compute capability >= 8.0) and Triton")
def test_gpu_auto_predictor_chooses_once(monkeypatch, capsys):
    """The default predictor on CUDA compares and times both on the first call, then
    sticks to its choice (printed: the GPU check's record of which one won)."""
    monkeypatch.delenv(dispatch.PREDICTOR_ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_choices", {})
    q, k = make(8192, 8192, 16, 4, 128, device="cuda", dtype=torch.bfloat16)
    device = str(q.device)
    assert dispatch.select_predictor(device) == "auto"
    first = dispatch.predict(q, k, simthreshd1=0.005, cdfthreshd=0.9, causal=True)
    choice = dispatch.predictor_choices()[device]
    assert choice in ("torch", "triton") and dispatch.select_predictor(device) == choice
    assert (first.kv_lists is not None) == (choice == "triton")
    with capsys.disabled():
        print(f"\nauto predictor on {torch.cuda.get_device_name()}: {choice}")


def test_the_gpu_benchmark_runs(interpret, tmp_path):
    """benchmarks/gpu_attention.py is run only where a GPU is lent: its CPU dry run
    under the interpreter keeps it from rotting in between."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_attention.py"
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--lengths", "256", "--dims", "32",
         "--sparsities", "0", "0.5", "--heads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["causal"], r["target"]) for r in rows] == \
        [(False, 0.0), (False, 0.5), (True, 0.0), (True, 0.5)]
    for row in rows:
        assert row["fused_predict_differ"] == 0.0
        assert row["target"] > 0 or row["rel_l1"] < 0.02
        assert row["e2e_ms"] > 0 and row["prep_ms"] > 0


def test_the_gpu_integration_check_runs(interpret, tmp_path):
    """benchmarks/gpu_integration.py (integrations and engine on CUDA) likewise: its CPU
    dry run passes every check, through the kernel under the interpreter."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("diffusers")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "integration.json"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_integration.py"), "--device", "cpu",
         "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results) == {"transformers", "engine", "speed", "diffusers"}
    assert all(r["ok"] for r in results.values())
    assert results["transformers"]["kernel_calls"] == 1 and results["transformers"]["same_maps"]
    assert results["engine"]["greedy_equals_hf"] and results["engine"]["reproducible"]
    assert all(results["diffusers"][f]["kernel_calls"] >= 2
               for f in ("flux", "cogvideox", "wan", "hunyuanvideo"))
