"""Sparse attention inside diffusers transformers (Flux, CogVideoX, Wan, HunyuanVideo),
on tiny randomly initialised models: exactness, patch/unpatch, tuning, files, errors."""

import inspect
import json

import pytest
import torch

pytest.importorskip("diffusers")

from creative_sparse.attention import dense_attention, sparse_attention  # noqa: E402
from creative_sparse.models.diffusers import (  # noqa: E402
    FAMILIES, LayerThresholds, SparseAttnProcessor, SparseParams, attention_layers,
    detect_family, is_patched, layer_stats, patch, patched, unpatch)
from creative_sparse.models.diffusers.tiny import tiny_inputs, tiny_transformer  # noqa: E402
from creative_sparse.autotune.thresholds import record, tune, tune_recording  # noqa: E402

SDPA = torch.nn.functional.scaled_dot_product_attention

# Odd sizes on purpose: partial query and key blocks, joint text+image sequences,
# HunyuanVideo with a batch of two whose first prompt is padded (key-padding mask).
SMALL = {
    "flux": dict(height=40, width=36),                         # 360 image + 16 text tokens
    "cogvideox": dict(frames=2, height=24, width=20),          # 240 video + 16 text
    "wan": dict(frames=3, height=20, width=22),                # 330 video
    "hunyuanvideo": dict(frames=2, height=20, width=18, batch=2, pad_text=5),  # 180 + 16
}
# Enough blocks for tuning to find sparsity: 600-800 tokens.
TUNE = {
    "flux": dict(height=48, width=56),                         # 672 + 16 tokens
    "cogvideox": dict(frames=3, height=32, width=32),          # 768 + 16
    "wan": dict(frames=3, height=32, width=32),                # 768
    "hunyuanvideo": dict(frames=2, height=32, width=40, batch=2, pad_text=3),  # 640 + 16
}


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_on_one_thread(one_thread):
    """Tiny models: one thread is as fast and does not suffer on a shared, busy machine."""

@pytest.fixture(scope="module")
def models():
    return {family: tiny_transformer(family) for family in FAMILIES}


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _rel_l1(a, b):
    return float((a - b).abs().sum() / b.abs().sum())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_every_block_equals_unpatched(models, family):
    model = models[family]
    inputs = tiny_inputs(model, **SMALL[family])
    originals = dict(model.attn_processors)
    ref = _forward(model, inputs)
    # simthreshd1 = 1: every block counts as non-compressible, so the sparse code
    # path (prediction, per-batch key-padding split, block kernel) keeps them all.
    params = SparseParams.uniform(model, simthreshd1=1.0, cdfthreshd=0.3)
    with patched(model, params):
        assert torch.nn.functional.scaled_dot_product_attention is not SDPA
        out = _forward(model, inputs)
        stats = layer_stats(model)
    assert set(stats) == set(attention_layers(model))
    for s in stats.values():
        assert s["sparse_calls"] >= 1 and s["dense_calls"] == 0 and s["sparsity"] == 0.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    # unpatch restores the very same processor objects and the original SDPA
    assert all(model.attn_processors[name] is proc for name, proc in originals.items())
    assert torch.nn.functional.scaled_dot_product_attention is SDPA
    assert not is_patched(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_runs_through_the_gpu_kernel(models, family, triton_kernel_calls):
    """On CUDA the patched processors reach the Triton INT8 kernel (the default backend
    there); under Triton's interpreter the same path gives the same maps and an output
    within the kernel's quantization error: joint text+image sequences, odd sizes, and
    HunyuanVideo's padded prompt (the per-batch key-padding split) included."""
    from creative_sparse.attention.dispatch import use_backend

    model = models[family]
    inputs = tiny_inputs(model, **SMALL[family])
    params = SparseParams.uniform(model, simthreshd1=0.0, cdfthreshd=0.5)
    runs = {}
    for backend in ("torch", "triton"):
        with use_backend(backend), patched(model, params):
            out = _forward(model, inputs)
            runs[backend] = (out, {name: s["sparsity"] for name, s in layer_stats(model).items()})
    assert len(triton_kernel_calls) >= len(attention_layers(model))
    (exact, exact_sparsity), (ours, our_sparsity) = runs["torch"], runs["triton"]
    assert our_sparsity == exact_sparsity and 0.3 < min(exact_sparsity.values())
    assert 0.0 < _rel_l1(ours, exact) < 0.005


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tuned_layers_meet_the_target(models, family):
    model = models[family]
    runs = [tiny_inputs(model, **TUNE[family], seed=i, timestep=t)
            for i, t in enumerate((800.0, 200.0))]
    recording = record(model, lambda: [_forward(model, x) for x in runs], max_samples=2)
    params = tune_recording(model, recording, l1=0.05, pv_l1=0.06, progress=False)
    assert set(params.report) == set(attention_layers(model))
    for name, rep in params.report.items():
        assert rep["l1"] < 0.05, (name, rep)
        assert 0.0 <= rep["sparsity"] < 1.0 and len(rep["head_sparsity"]) == 2
        # independent check: the real sparse attention vs the fp32 oracle on every sample
        t = params.layers[name]
        for s in recording[name]:
            out = sparse_attention(s.q, s.k, s.v, simthreshd1=list(t.simthreshd1),
                                   cdfthreshd=list(t.cdfthreshd), pvthreshd=list(t.pvthreshd))
            assert _rel_l1(out, dense_attention(s.q, s.k, s.v)) < 0.05
    assert params.mean_sparsity() > 0.05, params.report   # the structured models are sparse
    # the tuned model runs sparse and stays close to dense
    x = tiny_inputs(model, **TUNE[family], seed=7, timestep=500.0)     # held out
    ref = _forward(model, x)
    with patched(model, params):
        out = _forward(model, x)
        seen = [s["sparsity"] for s in layer_stats(model).values()]
    assert max(seen) > 0.0
    assert _rel_l1(out, ref) < 0.1


def test_tune_end_to_end_and_file_round_trip(models, tmp_path):
    model = models["flux"]
    x = tiny_inputs(model, height=48, width=48)
    params = tune(model, lambda: _forward(model, x), l1=0.05, pv_l1=0.07, progress=False)
    assert (params.l1, params.pv_l1) == (0.05, 0.07)
    path = params.save(tmp_path / "flux.json")
    data = json.loads(path.read_text())
    assert data["family"] == "flux" and data["format_version"] == 1
    assert data["targets"] == {"l1": 0.05, "pv_l1": 0.07}
    assert set(data["layers"]) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    loaded = SparseParams.load(path, model)
    assert loaded.layers == params.layers and loaded.fingerprint == params.fingerprint
    assert loaded.report["transformer_blocks.0.attn"]["l1"] == \
        params.report["transformer_blocks.0.attn"]["l1"]


def test_tuning_a_few_layers_per_pass_gives_the_same_thresholds(models):
    model = models["wan"]
    x = tiny_inputs(model, frames=2, height=32, width=32)
    calls = []

    def run():
        calls.append(1)
        _forward(model, x)

    whole = tune(model, run, l1=0.05, progress=False)
    assert len(calls) == 1
    per_layer = tune(model, run, l1=0.05, layers_per_pass=1, progress=False)
    assert len(calls) == 1 + 2                      # one run per layer
    assert per_layer.layers == whole.layers
    with pytest.raises(ValueError, match="layers_per_pass"):
        tune(model, run, layers_per_pass=0)


def _edited(tmp_path, params, **changes):
    data = params.to_json()
    data.update(changes)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def test_file_for_another_model_or_version_is_rejected(models, tmp_path):
    flux = models["flux"]
    params = SparseParams.uniform(flux)
    path = params.save(tmp_path / "flux.json")
    with pytest.raises(ValueError, match="are for flux .*not for wan"):
        SparseParams.load(path, models["wan"])
    with pytest.raises(ValueError, match="are for flux"):
        patch(models["hunyuanvideo"], params)
    bigger = tiny_transformer("flux", heads=3)
    with pytest.raises(ValueError, match="different FluxTransformer2DModel configuration"):
        SparseParams.load(path, bigger)
    with pytest.raises(ValueError, match="tuned with creative-sparse 9.1.0"):
        SparseParams.load(_edited(tmp_path, params, library_version="9.1.0"))
    with pytest.raises(ValueError, match="format version 2"):
        SparseParams.load(_edited(tmp_path, params, format_version=2))
    with pytest.raises(ValueError, match="not a creative-sparse"):
        SparseParams.load(_edited(tmp_path, params, format="something-else"))
    layers = dict(params.to_json()["layers"])
    layers.pop("transformer_blocks.0.attn")
    with pytest.raises(ValueError, match="disagree on the layers"):
        SparseParams.load(_edited(tmp_path, params, layers=layers), flux)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SparseParams.load(tmp_path / "bad.json")


def _hand_made_params():
    return SparseParams(family="wan", model_class="WanTransformer3DModel",
                        fingerprint="0123456789abcdef",
                        layers={"blocks.0.attn1": LayerThresholds.uniform(2)})


def _layer(data, **changes):
    data["layers"]["blocks.0.attn1"].update(changes)


BAD_FIELDS = {
    "sink-string": (lambda d: d.update(attention_sink="false"), "attention_sink = 'false'",
                    "true or false"),
    "sink-int": (lambda d: d.update(attention_sink=1), "attention_sink = 1", "true or false"),
    "block-float": (lambda d: d.update(block_q=7.5), "block_q = 7.5", "an integer in [1, 4096]"),
    "block-zero": (lambda d: d.update(block_k=0), "block_k = 0", "an integer in [1, 4096]"),
    "block-huge": (lambda d: d.update(block_k=10**9), "block_k = 1000000000", "[1, 4096]"),
    "block-bool": (lambda d: d.update(block_q=True), "block_q = True", "an integer"),
    "l1-nan": (lambda d: d["targets"].update(l1=float("nan")), "targets.l1 = nan", "(0, 1)"),
    "cdf-out-of-range": (lambda d: _layer(d, cdfthreshd=[0.9, 1.5]),
                         "layers['blocks.0.attn1'].cdfthreshd[1] = 1.5", "in (0, 1]"),
    "cdf-string": (lambda d: _layer(d, cdfthreshd=["0.9", 0.9]),
                   "cdfthreshd[0] = '0.9'", "a finite number in (0, 1]"),
    "sim-bool": (lambda d: _layer(d, simthreshd1=[True, 0.5]), "simthreshd1[0] = True",
                 "[-1, 1]"),
    "pv-nan": (lambda d: _layer(d, pvthreshd=[float("nan"), 15]), "pvthreshd[0] = nan",
               "(0, inf)"),
    "heads-disagree": (lambda d: _layer(d, pvthreshd=[15.0]), "pvthreshd = [15.0]",
                       "one number per head (2, as in cdfthreshd)"),
    "layer-a-list": (lambda d: d["layers"].update({"blocks.0.attn1": [0.6, 0.97, 15]}),
                     "layers['blocks.0.attn1'] = [0.6, 0.97, 15]", "exactly cdfthreshd"),
    "layers-a-list": (lambda d: d.update(layers=[]), "layers = []", "a JSON object"),
    "no-layers": (lambda d: d.update(layers={}), "layers = {}", "not empty"),
    "family-number": (lambda d: d.update(family=3), "family = 3", "one of flux, cogvideox"),
    "report-a-number": (lambda d: d.update(report={"blocks.0.attn1": 0.5}),
                        "report['blocks.0.attn1'] = 0.5", "an object"),
    "missing-field": (lambda d: d.pop("block_q"), "field block_q is missing", ""),
}


@pytest.mark.parametrize("damage,shown,allowed", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_threshold_file_fields_are_type_and_range_checked(tmp_path, damage, shown, allowed):
    """Issue 21: "attention_sink": "false" loaded as True, wrong shapes raised
    AttributeError/TypeError; now a ValueError names the file, the field, the
    value and what is allowed, and the user's file is left as it was."""
    data = _hand_made_params().to_json()
    damage(data)
    path = tmp_path / "user.json"
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    with pytest.raises(ValueError) as info:
        SparseParams.load(path)
    message = str(info.value)
    assert message.startswith(str(path)) and shown in message and allowed in message
    assert path.read_bytes() == before


@pytest.mark.parametrize("content,shown", [
    (b"\x89PNG\r\n\x1a\n\x00\xff", "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"", "not valid JSON"),
], ids=["binary", "deeply-nested", "empty"])
def test_a_threshold_file_that_is_not_json_names_the_file(tmp_path, content, shown):
    path = tmp_path / "user.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=shown) as info:
        SparseParams.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="is a directory"):
        SparseParams.load(tmp_path)


def test_a_failed_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    import os

    from creative_sparse import jsonfile
    params = _hand_made_params()
    path = params.save(tmp_path / "t.json")
    before = path.read_bytes()

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(jsonfile.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        params.save(path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    monkeypatch.setattr(jsonfile.os, "replace", os.replace)
    assert SparseParams.load(path) == params


def test_unsupported_family_lists_the_supported_ones():
    import diffusers
    unet = diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1,
                                 norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    for model in (unet, torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="supports flux .*cogvideox.*wan.*hunyuanvideo"):
            detect_family(model)
        with pytest.raises(ValueError, match="unsupported model"):
            tune(model, lambda: None)
    with pytest.raises(ValueError, match="unknown family"):
        tiny_transformer("sd3")


@pytest.mark.parametrize("kwargs, message", [
    (dict(l1=0.0), "l1 must be .* in \\(0, 1\\)"),
    (dict(l1=1.0), "l1 must be"),
    (dict(l1=-0.1), "l1 must be"),
    (dict(l1=0.05, pv_l1=1.5), "pv_l1 must be"),
    (dict(l1=0.05, pv_l1=0.0), "pv_l1 must be"),
    (dict(l1=0.06, pv_l1=0.05), "must be >= l1"),
], ids=["l1=0", "l1=1", "l1<0", "pv_l1>1", "pv_l1=0", "pv_l1<l1"])
def test_targets_outside_the_unit_interval(models, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tune(models["wan"], lambda: None, **kwargs)
    assert not is_patched(models["wan"])


def test_threshold_validation():
    with pytest.raises(ValueError, match="one value per head"):
        LayerThresholds((0.5, 0.5), (0.9,), (15.0, 15.0))
    with pytest.raises(ValueError, match="cdfthreshd must be in"):
        LayerThresholds.uniform(2, cdfthreshd=1.5)
    with pytest.raises(ValueError, match="pvthreshd must be in"):
        LayerThresholds.uniform(2, pvthreshd=0.0)
    with pytest.raises(ValueError, match="unsupported family"):
        SparseParams("sd3", "X", "0", {"a": LayerThresholds.uniform(1)})


def test_patch_twice_unpatch_twice_and_nesting(models):
    flux, wan = models["flux"], models["wan"]
    with pytest.raises(ValueError, match="not patched"):
        unpatch(flux)
    patch(flux, SparseParams.uniform(flux))
    try:
        with pytest.raises(ValueError, match="already patched"):
            patch(flux, SparseParams.uniform(flux))
        with patched(wan, SparseParams.uniform(wan)):
            pass
        # the shim stays while flux is patched, and outside a patched layer it is SDPA
        assert torch.nn.functional.scaled_dot_product_attention is not SDPA
        q = torch.randn(1, 2, 70, 16)
        torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, q, q),
                                   SDPA(q, q, q), rtol=0, atol=0)
    finally:
        unpatch(flux)
    assert torch.nn.functional.scaled_dot_product_attention is SDPA


def test_wrapper_keeps_the_processor_signature_and_backend(models):
    model = models["flux"]
    layer = attention_layers(model)["transformer_blocks.0.attn"]
    inner = layer.processor
    with patched(model, SparseParams.uniform(model)):
        wrapper = layer.processor
        assert isinstance(wrapper, SparseAttnProcessor) and wrapper.inner is inner
        # diffusers filters kwargs by this signature: it must be the inner processor's
        assert inspect.signature(wrapper.__call__) == inspect.signature(inner.__call__)
        assert wrapper._attention_backend is None
    inner._attention_backend = "flash"
    try:
        with pytest.raises(ValueError, match="backend 'flash'"):
            patch(model, SparseParams.uniform(model))
    finally:
        inner._attention_backend = None
    assert not is_patched(model)


def test_a_call_that_bypasses_sdpa_is_an_error(models):
    model = models["wan"]

    class NoSDPA:
        def __call__(self, attn, hidden_states, **kwargs):
            return hidden_states

    layer = attention_layers(model)["blocks.0.attn1"]
    original = layer.processor
    with patched(model, SparseParams.uniform(model)):
        runtime = layer.processor.runtime
        bypass = SparseAttnProcessor(NoSDPA(), runtime)
        with pytest.raises(RuntimeError, match="never reached"):
            bypass(layer, torch.zeros(1, 4, 32))
    assert layer.processor is original


def test_all_dense_heads_call_sdpa_exactly(models):
    model = models["cogvideox"]
    inputs = tiny_inputs(model, **SMALL["cogvideox"])
    ref = _forward(model, inputs)
    with patched(model, SparseParams.uniform(model, cdfthreshd=1.0)):
        out = _forward(model, inputs)
        stats = layer_stats(model)
    assert torch.equal(out, ref)
    assert all(s["dense_calls"] == 1 and s["sparse_calls"] == 0 for s in stats.values())


def test_recorder_keeps_evenly_spaced_samples(models):
    model = models["wan"]
    x = tiny_inputs(model, frames=1, height=16, width=16)
    recording = record(model, lambda: [_forward(model, x) for _ in range(10)], max_samples=3,
                       max_query_blocks=None)
    assert set(recording) == {"blocks.0.attn1", "blocks.1.attn1"}
    assert all(1 <= len(s) <= 3 for s in recording.values())
    assert not is_patched(model)
    big = tiny_inputs(model, frames=4, height=32, width=32)       # 1024 tokens, 8 query blocks
    rec = record(model, lambda: _forward(model, big), max_query_blocks=3)
    sample = rec["blocks.0.attn1"][0]
    assert sample.q.shape[2] == 3 * 128 and sample.k.shape[2] == 1024 and sample.q_len == 1024
