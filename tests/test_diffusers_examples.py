"""The four diffusers example scripts run offline with --tiny: tune, save, load, generate."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"flux": "flux_example.py", "cogvideox": "cogvideo_example.py",
           "wan": "wan_example.py", "hunyuanvideo": "hunyuan_example.py"}


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_on_one_thread(one_thread):
    """Tiny models: one thread is as fast and does not suffer on a shared, busy machine."""

@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("_diffusers_examples_common",
                                                  ROOT / "evaluate" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_script_calls_the_shared_driver_with_its_family():
    for family, script in SCRIPTS.items():
        text = (ROOT / "evaluate" / script).read_text()
        assert f'main("{family}")' in text and "from _common import main" in text


@pytest.mark.parametrize("family", list(SCRIPTS))
def test_tiny_tune_then_generate_sparse(common, family, tmp_path):
    thresholds = tmp_path / "thresholds.pt"
    base = ["--tiny", "--model_out_path", str(thresholds), "--out_path", str(tmp_path / "out"),
            "--prompt", "a red fox", "--num_inference_steps", "2", "--device", "cpu",
            "--height", "384" if family == "flux" else "192",
            "--width", "384" if family == "flux" else "192"]
    summary = common.main(family, base + ["--tune", "--tune_steps", "2", "--l1", "0.06",
                                          "--pv_l1", "0.065"])
    assert summary["tuned_max_l1"] < 0.06 and thresholds.exists()
    state = torch.load(thresholds, weights_only=True)   # the original SpargeAttn's format
    assert all(".inner_attention." in key and value.dim() == 1 for key, value in state.items())
    # a second run loads the saved file into a fresh tiny model and generates sparse
    summary = common.main(family, base + ["--use_spas_sage_attn"])
    assert summary["sparse"] and 0.0 <= summary["attention_sparsity"] < 1.0
    assert all(Path(p).exists() for p in summary["outputs"])


def test_a_real_run_needs_a_local_checkpoint(common, tmp_path):
    with pytest.raises(SystemExit, match="--model_path"):
        common.main("flux", [])
    with pytest.raises(SystemExit, match="not a directory"):
        common.main("wan", ["--model_path", str(tmp_path / "missing")])
