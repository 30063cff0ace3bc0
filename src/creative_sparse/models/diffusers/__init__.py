"""Sparse attention inside diffusers' Flux, CogVideoX, Wan and HunyuanVideo transformers.

How it plugs in: every self-attention module of a supported transformer gets a
thin :class:`SparseAttnProcessor` that *delegates to the module's original
processor* and routes the one ``scaled_dot_product_attention`` call that
processor makes to :func:`creative_sparse.attention.sparse_attention`, with
that layer's per-head thresholds. No model code is copied: projections, QK
norms, RoPE and the joint text+image concatenation stay the library's own.

Why SDPA and not diffusers' attention-backend registry: the registry is keyed
by a closed ``Enum`` (diffusers even leaves a "sparge" entry commented out
because it needs per-model tuning), and CogVideoX's processor calls
``F.scaled_dot_product_attention`` directly, not through the dispatcher. The
one call all four families make is SDPA (through the dispatcher's default
``native`` backend). So while any model is patched,
``torch.nn.functional.scaled_dot_product_attention`` is replaced by a shim that
reads a ``ContextVar``: set (by a wrapper processor, for the duration of its
call) it runs sparse attention for that layer; unset (any other code, any other
thread) it calls the original function unchanged. The shim is removed when the
last patched model is unpatched. If a processor is configured for another
diffusers backend (flash, sage, context-parallel...), its call never reaches
SDPA and the wrapper raises instead of silently running dense.

Masks: ``None`` and boolean key-padding masks (``[B|1, 1, 1, Lk]``, as
HunyuanVideo passes for padded prompts; the masked keys are dropped per batch
element) run sparse; any other mask, ``dropout_p > 0`` or a layer whose heads
are all dense call the original SDPA, exactly.

Thresholds are per layer and per head (:class:`LayerThresholds`), held in a
:class:`SparseParams` that knows which model it was made for and is saved as a
small versioned JSON file (both in :mod:`.params`, re-exported here).
Tiny offline models are in :mod:`.tiny`. Tuning the thresholds is
:mod:`creative_sparse.autotune.thresholds` (all tuning lives in ``autotune``).

Example:
    >>> from creative_sparse.models.diffusers import SparseParams, patched
    >>> from creative_sparse.models.diffusers.tiny import tiny_inputs, tiny_transformer
    >>> model = tiny_transformer("flux")
    >>> params = SparseParams.uniform(model, cdfthreshd=0.9)
    >>> with patched(model, params):
    ...     out = model(**tiny_inputs(model)).sample
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
from typing import Iterator

import torch
from torch import Tensor

from ...attention import sparse_attention
from .params import (DENSE_PVTHRESHD, FAMILIES, FORMAT_VERSION, LayerThresholds,
                               SparseParams, _require_diffusers, _unwrap, attention_layers,
                               check_target, detect_family)

logger = logging.getLogger(__name__)

__all__ = [
    "DENSE_PVTHRESHD",
    "FAMILIES",
    "FORMAT_VERSION",
    "LayerThresholds",
    "SparseAttnProcessor",
    "SparseParams",
    "attention_layers",
    "check_target",
    "detect_family",
    "is_patched",
    "layer_stats",
    "patch",
    "patched",
    "unpatch",
]


# --------------------------------------------------------------------------- the SDPA route

_ACTIVE: contextvars.ContextVar["_LayerRuntime | None"] = contextvars.ContextVar(
    "creative_sparse_diffusers_layer", default=None)
_INSTALL_LOCK = threading.Lock()
_installed = {"count": 0, "original": None}


_SDPA_AT_IMPORT = torch.nn.functional.scaled_dot_product_attention


def _original_sdpa():
    return _installed["original"] or _SDPA_AT_IMPORT


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                "enable_gqa")


def _sdpa_shim(*args, **kwargs):
    runtime = _ACTIVE.get()
    original = _original_sdpa()   # also right for a reference kept after the shim was removed
    if runtime is None:
        return original(*args, **kwargs)
    bound = dict(zip(_SDPA_PARAMS, args))
    bound.update(kwargs)
    return runtime.attend(original, **bound)


def _install_shim() -> None:
    with _INSTALL_LOCK:
        if _installed["count"] == 0:
            _installed["original"] = torch.nn.functional.scaled_dot_product_attention
            torch.nn.functional.scaled_dot_product_attention = _sdpa_shim
        _installed["count"] += 1


def _remove_shim() -> None:
    with _INSTALL_LOCK:
        _installed["count"] -= 1
        if _installed["count"] == 0:
            if torch.nn.functional.scaled_dot_product_attention is _sdpa_shim:
                torch.nn.functional.scaled_dot_product_attention = _installed["original"]
            else:
                logger.warning("torch.nn.functional.scaled_dot_product_attention was replaced by "
                               "someone else while models were patched; leaving it alone")
            _installed["original"] = None


def _key_padding(mask: Tensor, q: Tensor, k: Tensor) -> Tensor | None:
    """Bool ``[B, Lk]`` if ``mask`` is a boolean key-padding mask, else ``None``."""
    b, lk = q.shape[0], k.shape[2]
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 \
            or mask.shape[3] != lk or mask.shape[0] not in (1, b):
        return None
    return mask[:, 0, 0].expand(b, lk)


class _LayerRuntime:
    """What one wrapped layer does with its SDPA call; owns the layer's statistics."""

    def __init__(self, name: str, heads: int, thresholds: LayerThresholds | None,
                 params: SparseParams | None, recorder=None):
        self.name = name
        self.heads = heads
        self.thresholds = thresholds
        self.params = params
        self.recorder = recorder           # callable(name, q, k, v, scale) in record mode
        self.all_dense = thresholds is None or all(thresholds.dense_heads)
        self._tensors: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self.sdpa_calls = 0
        self.sparse_calls = 0
        self.dense_calls = 0
        self.sparsity_sum = 0.0
        self._warned = False

    def _head_tensors(self, device) -> tuple[Tensor, Tensor, Tensor]:
        if device not in self._tensors:
            t = self.thresholds
            self._tensors[device] = tuple(torch.tensor(x, dtype=torch.float32, device=device)
                                          for x in (t.simthreshd1, t.cdfthreshd, t.pvthreshd))
        return self._tensors[device]

    def _fallback(self, original, reason: str, **sdpa) -> Tensor:
        if reason and not self._warned:
            logger.warning("%s: %s; this layer runs dense attention", self.name, reason)
            self._warned = True
        self.dense_calls += 1
        return original(**sdpa)

    def _sparse(self, q, k, v, is_causal, scale) -> Tensor:
        sim, cdf, pv = self._head_tensors(q.device)
        p = self.params
        out, sparsity = sparse_attention(q, k, v, is_causal=is_causal, scale=scale,
                                         simthreshd1=sim, cdfthreshd=cdf, pvthreshd=pv,
                                         attention_sink=p.attention_sink, block_q=p.block_q,
                                         block_k=p.block_k, return_sparsity=True,
                                         selection=p.selection)
        self.sparse_calls += 1
        self.sparsity_sum += sparsity
        return out

    def attend(self, original, query, key, value, attn_mask=None, dropout_p=0.0,
               is_causal=False, scale=None, enable_gqa=False) -> Tensor:
        self.sdpa_calls += 1
        sdpa = dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if query.dim() != 4 or key.dim() != 4:
            return self._fallback(original, f"unexpected q/k shapes {tuple(query.shape)}", **sdpa)
        padding = None if attn_mask is None else _key_padding(attn_mask, query, key)
        if self.recorder is not None:
            if attn_mask is None or padding is not None:
                self.recorder(self.name, query, key, value, scale, padding, bool(is_causal))
            elif not self._warned:
                logger.warning("%s: not recording a call with a %s mask of shape %s (only "
                               "key-padding masks run sparse)", self.name, attn_mask.dtype,
                               tuple(attn_mask.shape))
                self._warned = True
            self.dense_calls += 1
            return original(**sdpa)
        if self.all_dense:
            return self._fallback(original, "", **sdpa)
        if query.shape[1] != self.heads:
            raise ValueError(f"{self.name}: the attention call has {query.shape[1]} query heads, "
                             f"the thresholds {self.heads}")
        if dropout_p != 0.0:
            return self._fallback(original, f"dropout_p={dropout_p} (training)", **sdpa)
        if attn_mask is not None and padding is None:
            return self._fallback(original, f"attention mask of shape {tuple(attn_mask.shape)} "
                                  f"and dtype {attn_mask.dtype} is not a key-padding mask", **sdpa)
        if padding is None or bool(padding.all()):
            return self._sparse(query, key, value, is_causal, scale)
        outs = []
        for b in range(query.shape[0]):  # drop each batch element's padded keys
            keep = padding[b]
            outs.append(self._sparse(query[b:b + 1], key[b:b + 1, :, keep],
                                     value[b:b + 1, :, keep], is_causal, scale))
        return torch.cat(outs, dim=0)

    def stats(self) -> dict:
        return {"sdpa_calls": self.sdpa_calls, "sparse_calls": self.sparse_calls,
                "dense_calls": self.dense_calls,
                "sparsity": self.sparsity_sum / self.sparse_calls if self.sparse_calls else 0.0}


def _forwarded(name: str) -> property:
    """An attribute read from and written to the wrapped processor (``self.inner``)."""
    return property(lambda self: getattr(self.inner, name, None),
                    lambda self, value: setattr(self.inner, name, value))


class SparseAttnProcessor:
    """A diffusers attention processor that delegates to ``inner`` and routes the
    attention call ``inner`` makes to sparse attention (see the module docstring).

    ``inner`` is kept unchanged and is what :func:`unpatch` puts back.
    """

    def __init__(self, inner, runtime: _LayerRuntime):
        self.inner = inner
        self.runtime = runtime

        # diffusers' attention modules filter call kwargs by
        # inspect.signature(processor.__call__); an instance-level __call__ that
        # wraps the inner one gives them the inner processor's signature.
        def call(attn, *args, **kwargs):
            return self._forward(attn, *args, **kwargs)
        functools.update_wrapper(call, inner.__call__)
        self.__dict__["__call__"] = call

    def __call__(self, attn, *args, **kwargs):
        return self._forward(attn, *args, **kwargs)

    def _forward(self, attn, *args, **kwargs):
        before = self.runtime.sdpa_calls
        token = _ACTIVE.set(self.runtime)
        try:
            out = self.inner(attn, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)
        if self.runtime.sdpa_calls == before:
            backend = getattr(self.inner, "_attention_backend", None)
            raise RuntimeError(
                f"{self.runtime.name}: the attention call never reached "
                f"torch.nn.functional.scaled_dot_product_attention (processor "
                f"{type(self.inner).__name__}, backend {backend!r}, parallel config "
                f"{getattr(self.inner, '_parallel_config', None)!r}); sparse attention needs "
                f"diffusers' default 'native' attention backend without context parallelism")
        return out

    # diffusers sets these on processors (set_attention_backend, context parallel).
    _attention_backend = _forwarded("_attention_backend")
    _parallel_config = _forwarded("_parallel_config")

    def __repr__(self) -> str:
        return f"SparseAttnProcessor({self.runtime.name}, inner={type(self.inner).__name__})"


# --------------------------------------------------------------------------- patch / unpatch

_PATCHED_ATTR = "_creative_sparse_originals"


def is_patched(model) -> bool:
    """Whether ``model`` currently has sparse-attention processors installed."""
    return hasattr(_unwrap(model), _PATCHED_ATTR)


def _wrap(model, make_runtime) -> None:
    model = _unwrap(model)
    if is_patched(model):
        raise ValueError(f"{type(model).__name__} is already patched with sparse attention; "
                         "call unpatch(model) first")
    layers = attention_layers(model)
    for name, mod in layers.items():
        backend = getattr(mod.processor, "_attention_backend", None)
        if backend is not None and str(getattr(backend, "value", backend)) != "native":
            raise ValueError(f"{name}: processor uses diffusers attention backend {backend!r}; "
                             "sparse attention replaces the 'native' (SDPA) backend only")
    originals = {name: mod.processor for name, mod in layers.items()}
    _install_shim()
    try:
        for name, mod in layers.items():
            mod.set_processor(SparseAttnProcessor(mod.processor, make_runtime(name, mod)))
    except BaseException:
        for name, processor in originals.items():
            layers[name].set_processor(processor)
        _remove_shim()
        raise
    setattr(model, _PATCHED_ATTR, originals)


def patch(model, params: SparseParams):
    """Route ``model``'s self-attention through sparse attention with ``params``' thresholds.

    Args:
        model: a diffusers ``FluxTransformer2DModel``, ``CogVideoXTransformer3DModel``,
            ``WanTransformer3DModel`` or ``HunyuanVideoTransformer3DModel``
            (``pipe.transformer``).
        params: :class:`SparseParams` made for this model (``SparseParams.uniform``,
            :func:`creative_sparse.autotune.thresholds.tune`, or ``SparseParams.load``).

    Returns:
        ``model`` (patched in place). ``ValueError`` for an unsupported model, parameters
        made for another model, or a model that is already patched.
    """
    _require_diffusers()
    if not isinstance(params, SparseParams):
        raise ValueError(f"params must be SparseParams, got {type(params).__name__}")
    params.check_model(model)
    _wrap(model, lambda name, mod: _LayerRuntime(name, mod.heads, params.layers[name], params))
    return model


def unpatch(model):
    """Put back the exact processor objects :func:`patch` replaced; returns ``model``."""
    inner = _unwrap(model)
    originals = getattr(inner, _PATCHED_ATTR, None)
    if originals is None:
        raise ValueError(f"{type(inner).__name__} is not patched with sparse attention")
    modules = dict(inner.named_modules())
    for name, processor in originals.items():
        modules[name].set_processor(processor)
    delattr(inner, _PATCHED_ATTR)
    _remove_shim()
    return model


@contextlib.contextmanager
def patched(model, params: SparseParams) -> Iterator:
    """``with patched(model, params): ...`` patches on entry and unpatches on exit
    (exception or not); yields ``model``."""
    patch(model, params)
    try:
        yield model
    finally:
        unpatch(model)


def layer_stats(model) -> dict[str, dict]:
    """Per patched layer: SDPA calls seen, sparse/dense calls and the mean sparsity
    (fraction of attention blocks skipped) since patching."""
    return {name: mod.processor.runtime.stats()
            for name, mod in attention_layers(model).items()
            if isinstance(mod.processor, SparseAttnProcessor)}
