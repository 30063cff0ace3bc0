"""Every on-disk format against every way a file can be damaged.

Formats: the model cache (its manifest, its weights, the verification stamp), the
autotune cache, and tuned diffusers threshold files. Each case ends in one of two
ways, never in a wrong result or a raw exception:

* caches heal: the damaged entry is rebuilt (or measured again) with a warning that
  names the file, and what comes back equals a fresh build;
* user files (threshold files) are refused with a ``ValueError`` that names the
  file, and are left exactly as they were.

All cases use tiny files (a 2-layer random Llama, a synthetic sweep, a one-layer
threshold file) and run in a few seconds together.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from creative_sparse import autotune
from creative_sparse.models import cached_model_dir, load_model, verify_cache
from creative_sparse.models import cache as cache_mod
from creative_sparse.models.diffusers.params import LayerThresholds, SparseParams

from test_autotune import FakeMeasurer  # noqa: E402  (tests/ is on the path)
from test_loading import Builder, logits, tiny_model_and_tokenizer  # noqa: E402


# ---------------------------------------------------------------- corruptions
def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_length(path: Path) -> None:
    path.write_bytes(b"")


def _binary(path: Path) -> None:
    size = max(path.stat().st_size, 64)
    path.write_bytes((bytes(range(256)) * (size // 256 + 1))[:size])   # not UTF-8, not JSON


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "stray.txt").write_text("a directory where the file belongs")


def _deeply_nested(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _edit(change):
    def corrupt(path: Path) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return corrupt


def _replace(value):
    return lambda path: path.write_text(json.dumps(value))


GENERIC = {
    "truncated": _truncated,
    "zero-length": _zero_length,
    "binary-garbage": _binary,
    "directory": _directory,
    "deeply-nested": _deeply_nested,
    "wrong-shape-list": _replace([1, 2, 3]),
    "wrong-shape-empty-object": _replace({}),
}

_ST = "model.safetensors"


def _files(d):
    return d["files"]


MANIFEST = {
    **GENERIC,
    "files-a-list": _edit(lambda d: d.update(files=list(d["files"]))),
    "size-wrong-type": _edit(lambda d: _files(d)[_ST].update(size=str(_files(d)[_ST]["size"]))),
    "size-negative": _edit(lambda d: _files(d)[_ST].update(size=-1)),
    "size-nan": _edit(lambda d: _files(d)[_ST].update(size=math.nan)),
    "sha256-wrong-type": _edit(lambda d: _files(d)[_ST].update(sha256=12345)),
    "format-a-bool": _edit(lambda d: d.update(format=True)),
    "name-outside-the-entry": _edit(
        lambda d: _files(d).update({"../x.safetensors": _files(d)[_ST]})),
}


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _header_wrong_shape(path: Path) -> None:
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8: 8 + n] = b'["' + b"x" * (n - 4) + b'"]'      # valid JSON (a list), same length
    path.write_bytes(bytes(data))


WEIGHTS = {
    "truncated": _truncated,
    "zero-length": _zero_length,
    "binary-garbage": _binary,
    "directory": _directory,
    "flipped-bytes": _flip_bytes,
    "header-wrong-shape": _header_wrong_shape,
}


def _result(change):
    return _edit(lambda d: change(d["result"]))


AUTOTUNE = {
    **GENERIC,
    "result-a-list": _result(lambda r: r.clear()),
    "s_star-wrong-type": _result(lambda r: r.update(s_star="0.4")),
    "s_star-out-of-range": _result(lambda r: r.update(s_star=7.5)),
    "s_star-nan": _result(lambda r: r.update(s_star=math.nan)),
    "ci-reversed": _result(lambda r: r.update(s_star_ci=[0.9, 0.1])),
    "plan-wrong-type": _result(lambda r: r["plan"].update(prompts=2.5)),
    "seed-a-bool": _result(lambda r: r.update(seed=False)),
}


def _layer(change):
    return _edit(lambda d: change(d["layers"]["blocks.0.attn1"]))


DIFFUSERS = {
    **GENERIC,
    "layers-a-list": _edit(lambda d: d.update(layers=[])),
    "sink-wrong-type": _edit(lambda d: d.update(attention_sink="false")),
    "block-out-of-range": _edit(lambda d: d.update(block_q=0)),
    "block-huge": _edit(lambda d: d.update(block_k=2**40)),
    "cdfthreshd-nan": _layer(lambda t: t.update(cdfthreshd=[math.nan, 0.9])),
    "cdfthreshd-out-of-range": _layer(lambda t: t.update(cdfthreshd=[1.5, 0.9])),
    "simthreshd1-wrong-type": _layer(lambda t: t.update(simthreshd1="0.6")),
    "target-out-of-range": _edit(lambda d: d.update(targets={"l1": 3.0, "pv_l1": None})),
}


# ---------------------------------------------------------------- the model cache
@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("CREATIVE_SPARSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _rebuilt(root, damage, name, caplog):
    """Damage file ``name`` of a fresh entry; the next request must rebuild it, say so
    naming the entry and the file, and load exactly the model a fresh build gives."""
    entry = cached_model_dir("tiny", Builder())
    damage(entry / name)
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="creative_sparse.models.cache"):
        assert cached_model_dir("tiny", build) == entry
    assert build.calls == 1
    assert "Corrupt model cache, rebuilding it" in caplog.text
    assert str(entry) in caplog.text and name in caplog.text
    verify_cache(entry, checksums=True)
    model, _ = load_model(str(entry))
    assert torch.equal(logits(model), logits(tiny_model_and_tokenizer()[0]))


@pytest.mark.parametrize("damage", MANIFEST.values(), ids=MANIFEST.keys())
def test_model_cache_manifest(root, damage, caplog):
    _rebuilt(root, damage, cache_mod.MANIFEST_NAME, caplog)


@pytest.mark.parametrize("damage", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_model_cache_weights(root, damage, caplog):
    _rebuilt(root, damage, _ST, caplog)


@pytest.mark.parametrize("damage", GENERIC.values(), ids=GENERIC.keys())
def test_model_cache_stamp(root, damage, monkeypatch):
    """A damaged verification stamp costs one more verification, not a rebuild."""
    entry = cached_model_dir("tiny", Builder())
    damage(entry / cache_mod.STAMP_NAME)
    hashed = []
    real = cache_mod._sha256
    monkeypatch.setattr(cache_mod, "_sha256", lambda p: hashed.append(p) or real(p))
    build = Builder()
    assert cached_model_dir("tiny", build) == entry and build.calls == 0
    assert any(p.name == _ST for p in hashed)


# ---------------------------------------------------------------- the autotune cache
@pytest.fixture
def fake_sweep(monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "_make_measurer", lambda *args: FakeMeasurer())
    args = dict(model_name="fake-model", task_type="poetry", compute_budget=0.3,
                cache_dir=tmp_path, progress=False, n_bootstrap=20)
    return lambda: autotune.sweep_sparsity(**args)


@pytest.mark.parametrize("damage", AUTOTUNE.values(), ids=AUTOTUNE.keys())
def test_autotune_cache(fake_sweep, tmp_path, damage, caplog):
    fresh = fake_sweep()
    (path,) = (tmp_path / "autotune").glob("poetry-tune-*.json")
    damage(path)
    with caplog.at_level(logging.WARNING, logger="creative_sparse.autotune"):
        again = fake_sweep()
    assert not again.from_cache and again.s_star == fresh.s_star and again.table == fresh.table
    assert f"autotune cache {path}" in caplog.text
    if path.is_dir():          # not ours to delete: the next call measures again
        assert "not cached" in caplog.text and not fake_sweep().from_cache
    else:                      # healed: the next call answers from the rewritten file
        assert fake_sweep().from_cache


# ---------------------------------------------------------------- tuned diffusers files
def _threshold_file(tmp_path) -> Path:
    params = SparseParams(family="wan", model_class="WanTransformer3DModel",
                          fingerprint="0123456789abcdef",
                          layers={"blocks.0.attn1": LayerThresholds.uniform(2)},
                          report={"blocks.0.attn1": {"sparsity": 0.4, "l1": 0.05}})
    path = params.save(tmp_path / "wan.json")
    assert SparseParams.load(path) == params
    return path


def _snapshot(path: Path):
    if path.is_dir():
        return {p.name: p.read_bytes() for p in path.iterdir()}
    return path.read_bytes()


@pytest.mark.parametrize("damage", DIFFUSERS.values(), ids=DIFFUSERS.keys())
def test_tuned_diffusers_file(tmp_path, damage):
    path = _threshold_file(tmp_path)
    damage(path)
    before = _snapshot(path)
    with pytest.raises(ValueError) as info:
        SparseParams.load(path)
    assert str(path) in str(info.value)
    assert _snapshot(path) == before                 # the user's file is never touched


def test_every_generic_corruption_is_in_every_json_matrix():
    for matrix in (MANIFEST, AUTOTUNE, DIFFUSERS):
        assert set(GENERIC) <= set(matrix)
