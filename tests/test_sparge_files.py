"""The original SpargeAttn's tuned files and its SparseAttentionMeansim module.

The fixture ``tests/fixtures/spargeattn_CogVideoX-2b_0.06_0.07.pt`` is the
original's own tuned parameters for CogVideoX-2b (30 layers x 30 heads); a tiny
random CogVideoX transformer of that shape stands in for the model.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from creative_sparse.attention import predict_block_map, spas_sage2_attn_meansim_cuda
from creative_sparse.models.diffusers import layer_stats, patched
from creative_sparse.models.diffusers.params import SparseParams
from creative_sparse.models.diffusers.tiny import tiny_inputs, tiny_transformer
from creative_sparse.autotune.thresholds import tune
from creative_sparse.models.diffusers.sparge_files import (FIELDS, params_from_sparge, params_to_sparge,
                                                 read_state_dict)
from spas_sage_attn.autotune import (SparseAttentionMeansim, extract_sparse_attention_state_dict,
                                     load_sparse_attention_state_dict)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "spargeattn_CogVideoX-2b_0.06_0.07.pt"


@pytest.fixture(scope="module")
def cogvideo():
    """A CogVideoX-2b-shaped transformer: 30 layers of 30 heads (tiny widths)."""
    return tiny_transformer("cogvideox", heads=30, layers=30, head_dim=16)


@pytest.fixture(scope="module")
def original():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def test_the_originals_file_loads_with_every_threshold_on_its_layer_and_head(cogvideo, original):
    params = SparseParams.load(FIXTURE, cogvideo)
    assert params.selection == "sparge" and params.attention_sink
    assert len(params.layers) == 30 and all(t.heads == 30 for t in params.layers.values())
    for layer in range(30):
        t = params.layers[f"transformer_blocks.{layer}.attn1"]
        prefix = f"transformer_blocks.{layer}.attn1.inner_attention."
        sparse = original[prefix + "is_sparse"]
        cdf = torch.where(sparse, original[prefix + "cdfthreshd"], torch.ones(30))
        assert torch.equal(torch.tensor(t.cdfthreshd, dtype=torch.float32), cdf)
        assert torch.equal(torch.tensor(t.simthreshd1, dtype=torch.float32),
                           original[prefix + "simthreshd1"])
        assert torch.equal(torch.tensor(t.pvthreshd, dtype=torch.float32),
                           original[prefix + "pvthreshd"])
    # heads 1 and 10 (a substring of each other's names) keep their own values
    assert params.layers["transformer_blocks.1.attn1"] != params.layers["transformer_blocks.10.attn1"]


def test_export_round_trip_reproduces_the_original_file(cogvideo, original, tmp_path):
    params = SparseParams.load(FIXTURE, cogvideo)
    path = params.save(tmp_path / "exported.pt")
    exported = read_state_dict(path)
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert torch.equal(exported[key], value), key
    again = SparseParams.load(path, cogvideo)
    assert again.layers == params.layers


def test_the_loaded_thresholds_run_sparse_in_the_model(cogvideo):
    params = SparseParams.load(FIXTURE, cogvideo)
    x = tiny_inputs(cogvideo, height=32, width=32)
    with patched(cogvideo, params):
        cogvideo(**x)
        stats = layer_stats(cogvideo)
    assert all(s["sparse_calls"] == 1 and s["dense_calls"] == 0 for s in stats.values())


def _write(tmp_path, data, name="bad.pt") -> Path:
    path = tmp_path / name
    torch.save(data, path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("transformer_blocks.3.attn1.inner_attention.pvthreshd"),
     r"missing 'transformer_blocks\.3\.attn1\.inner_attention\.pvthreshd'"),
    (lambda sd: sd.__setitem__("transformer_blocks.30.attn1.inner_attention.cdfthreshd",
                               torch.ones(30)),
     r"'transformer_blocks\.30\.attn1\.inner_attention\.cdfthreshd' belongs to no attention"),
    (lambda sd: sd.__setitem__("transformer_blocks.7.attn1.inner_attention.cdfthreshd",
                               torch.ones(24)),
     r"transformer_blocks\.7\.attn1\.inner_attention\.cdfthreshd' has shape \(24,\); .* 30 heads"),
    (lambda sd: sd["transformer_blocks.2.attn1.inner_attention.simthreshd1"].__setitem__(
        4, float("nan")), r"simthreshd1' head 4 is nan; thresholds must be finite"),
    (lambda sd: sd["transformer_blocks.2.attn1.inner_attention.cdfthreshd"].__setitem__(
        5, 1.5), r"cdfthreshd' head 5 is 1\.5; allowed \(0\.0, 1\.0\]"),
    (lambda sd: sd.__setitem__("transformer_blocks.0.attn1.inner_attention.is_sparse",
                               torch.ones(30)), r"is_sparse' must be a bool tensor"),
])
def test_a_mismatch_is_named(cogvideo, original, tmp_path, change, message):
    sd = {k: v.clone() for k, v in original.items()}
    change(sd)
    with pytest.raises(ValueError, match=message) as err:
        SparseParams.load(_write(tmp_path, sd), cogvideo)
    assert "bad.pt" in str(err.value)


def test_a_model_of_another_shape_is_refused(original, tmp_path):
    small = tiny_transformer("cogvideox", heads=2, layers=2)
    with pytest.raises(ValueError, match=r"transformer_blocks\.10\.attn1.* belongs to no.*140 such"):
        SparseParams.load(FIXTURE, small)


class _Payload:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("executed",))


def test_unsafe_and_broken_files_are_refused_without_running_code(cogvideo, tmp_path, capsys):
    unsafe = tmp_path / "unsafe.pt"
    with open(unsafe, "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a torch file" * 10)
    for path in (unsafe, garbage):
        with pytest.raises(ValueError, match=path.name):
            SparseParams.load(path, cogvideo)
    assert "executed" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="a mapping of names to tensors"):
        SparseParams.load(_write(tmp_path, [torch.ones(3)], "list.pt"), cogvideo)
    with pytest.raises(ValueError, match="pass the model"):
        SparseParams.load(_write(tmp_path, {}, "empty.pt"))


def test_tune_for_the_original_rules_then_export_and_reload(tmp_path):
    model = tiny_transformer("cogvideox")
    x = tiny_inputs(model, height=32, width=32)
    params = tune(model, lambda: model(**x), l1=0.05, progress=False, selection="sparge")
    assert params.selection == "sparge"
    path = params.save(tmp_path / "cog.pt")
    state = read_state_dict(path)
    assert {k.rsplit(".", 1)[1] for k in state} == set(FIELDS)
    again = SparseParams.load(path, model)
    assert again.layers == params.layers and again.selection == "sparge"
    json_path = params.save(tmp_path / "cog.json")
    assert SparseParams.load(json_path, model).selection == "sparge"


def test_exporting_mass_thresholds_warns(caplog):
    params = SparseParams.uniform(tiny_transformer("cogvideox"), cdfthreshd=0.9)
    with caplog.at_level("WARNING"):
        params_to_sparge(params)
    assert "'mass' selection rules" in caplog.text


def test_older_json_files_mean_the_mass_rules(tmp_path):
    model = tiny_transformer("wan")
    data = SparseParams.uniform(model).to_json()
    del data["selection"]
    assert SparseParams.from_json(data).selection == "mass"


# --------------------------------------------------------------------------- the module

def _with_modules(model):
    for block in model.transformer_blocks:
        block.attn1.inner_attention = SparseAttentionMeansim()
    return model


def test_module_state_dict_round_trip_through_the_originals_file(original):
    model = _with_modules(tiny_transformer("cogvideox", heads=30, layers=30, head_dim=16))
    load_sparse_attention_state_dict(model, original)
    module = model.transformer_blocks[10].attn1.inner_attention
    assert torch.equal(module.cdfthreshd,
                       original["transformer_blocks.10.attn1.inner_attention.cdfthreshd"])
    assert module.is_sparse.dtype == torch.bool and module.cdfthreshd.dtype == torch.float32
    assert not module.cdfthreshd.requires_grad
    extracted = extract_sparse_attention_state_dict(model)
    assert set(extracted) == set(original)
    assert all(torch.equal(extracted[k], v) for k, v in original.items())
    # they are ordinary parameters: the model's own state_dict carries them too
    assert "transformer_blocks.29.attn1.inner_attention.pvthreshd" in model.state_dict()


def test_module_forward_is_the_seed_kernel_with_the_originals_inference_settings(original):
    module = SparseAttentionMeansim()
    model = torch.nn.Module()
    model.inner_attention = module
    prefix = "transformer_blocks.0.attn1.inner_attention."
    load_sparse_attention_state_dict(model, {f"inner_attention.{f}": original[prefix + f]
                                             for f in FIELDS})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 30, 600, 32, generator=g) for _ in range(3))
    out, sparsity = module(q, k, v, return_sparsity=True)
    cdf = torch.where(module.is_sparse, module.cdfthreshd, torch.ones(30))
    want, want_sparsity = spas_sage2_attn_meansim_cuda(
        q, k, v, simthreshd1=module.simthreshd1, cdfthreshd=cdf, pvthreshd=module.pvthreshd,
        attention_sink=True, return_sparsity=True)
    assert torch.equal(out, want) and sparsity == want_sparsity
    ref = predict_block_map(q, k, simthreshd1=module.simthreshd1, cdfthreshd=cdf,
                            attention_sink=True, selection="sparge")
    assert sparsity == pytest.approx(ref.sparsity(), abs=1e-12)


def test_module_tunes_then_runs_sparse():
    module = SparseAttentionMeansim(l1=0.05, pv_l1=0.06)
    g = torch.Generator().manual_seed(1)
    steps = torch.randn(1, 2, 768, 32, generator=g) * 0.3
    q = k = steps.cumsum(2) / 8
    v = torch.randn(1, 2, 768, 32, generator=g)
    dense = module(q, k, v, tune_mode=True)
    assert torch.allclose(dense, torch.nn.functional.scaled_dot_product_attention(q, k, v),
                          atol=1e-5)
    out, sparsity = module(q, k, v, return_sparsity=True)
    assert sparsity > 0.0
    err = float((out - dense).abs().sum() / dense.abs().sum())
    assert err < 0.05


def test_module_errors():
    module = SparseAttentionMeansim()
    q = torch.randn(1, 2, 128, 32)
    with pytest.raises(ValueError, match="tuned first"):
        module(q, q, q)
    with pytest.raises(ValueError, match="mask must be None"):
        module(q, q, q, mask=torch.ones(128, 128, dtype=torch.bool))
    with pytest.raises(ValueError, match="pv_l1 .* must be greater than l1"):
        SparseAttentionMeansim(l1=0.1, pv_l1=0.05)
    with pytest.raises(ValueError, match="sim_rule"):
        SparseAttentionMeansim(sim_rule="l2")
    with pytest.raises(ValueError, match="tuning supports sim_rule='l1' only"):
        SparseAttentionMeansim(sim_rule="cosine")(q, q, q, tune_mode=True)
    holder = torch.nn.Module()
    holder.inner = SparseAttentionMeansim()
    with pytest.raises(ValueError, match=r"'inner\.cdfthreshd' must be a 1-d tensor"):
        load_sparse_attention_state_dict(holder, {"inner.cdfthreshd": torch.ones(2, 2)})
    with pytest.raises(ValueError, match=r"inner\.is_sparse is missing"):
        load_sparse_attention_state_dict(holder, {"inner.cdfthreshd": torch.ones(2)})
    with pytest.raises(ValueError, match=r"'other\.cdfthreshd' belongs to no"):
        load_sparse_attention_state_dict(holder, {"other.cdfthreshd": torch.ones(2)})
    assert holder.inner.cdfthreshd is None          # nothing was loaded by a failed call


@pytest.mark.parametrize("damage", ["truncated", "empty", "directory", "flipped"])
def test_a_damaged_pt_file_is_an_error_naming_it(cogvideo, tmp_path, damage):
    """The corruption matrix for the original's format: never a wrong result."""
    path = tmp_path / "damaged.pt"
    data = FIXTURE.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "directory":
        path.mkdir()
    else:                      # bytes flipped inside the zip: its CRC catches them
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64])
                         + data[middle + 64:])
    try:
        params = SparseParams.load(path, cogvideo)
    except ValueError as err:
        assert "damaged.pt" in str(err)
    else:                      # a flip that torch cannot notice must leave the values intact
        assert params.layers == SparseParams.load(FIXTURE, cogvideo).layers
