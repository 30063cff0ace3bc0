"""Faster linear layers on CPU, through oneDNN.

On the x86 CPUs we measured, PyTorch's default CPU ``F.linear`` (an MKL GEMM)
is 2-6x slower than oneDNN's linear primitive on the shapes of a small
language model, most of all for the few-row products of decode steps
(SmolLM2-135M's output layer, 49152 x 576 in fp32, 6 rows, 2 cores: 14.2 ms
against 3.9 ms; 512 rows: 171 ms against 87 ms). :func:`fast_linears` routes
the model's linear layers through ``torch.ops.mkldnn._linear_pointwise`` (the
primitive PyTorch's own compiler uses for CPU linears; it reads the ordinary
weight tensor, nothing is copied) while a ``with`` block is active, and
restores the modules on exit. Same product, summation order aside
(differences ~1e-6 relative).

Only plain ``torch.nn.Linear`` modules with fp32 CPU weights and no hooks are
routed (quantized, offloaded or hooked layers own their forward); inputs that
need gradients, or of another dtype, take the usual path. Where oneDNN is not
built in, its result disagrees with ``F.linear`` on a probe, or it is slower on
a decode-shaped product timed once per process, nothing is routed;
``CREATIVE_SPARSE_FAST_LINEAR=1`` / ``0`` forces the choice.

Example:
    >>> layer = torch.nn.Linear(8, 4)
    >>> x = torch.randn(3, 8)
    >>> with fast_linears(layer):
    ...     y = layer(x)
    >>> bool(torch.allclose(y, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5))
    True
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["fast_linears", "onednn_linear_available"]

logger = logging.getLogger(__name__)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """True when oneDNN's linear runs here and agrees with ``F.linear`` on a probe."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 40, generator=gen)
        w, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
        with torch.no_grad():
            got = _onednn_linear(x, w, b)
        return got.shape == (2, 3, 24) and bool(
            torch.allclose(got, torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _best_of(fn, repeats: int = 5) -> float:
    fn()                                                    # warm-up (first-call setup)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@functools.lru_cache(maxsize=1)
def _routing_pays() -> bool:
    """Whether to route: ``$CREATIVE_SPARSE_FAST_LINEAR`` = 1 / 0 decides; otherwise
    oneDNN must work here and be no slower than ``F.linear`` on a decode-shaped
    product (4 rows x a 4096 x 1024 weight, timed once per process, ~20 ms)."""
    forced = os.environ.get("CREATIVE_SPARSE_FAST_LINEAR", "").strip()
    if forced in ("0", "1"):
        return forced == "1" and onednn_linear_available()
    if not onednn_linear_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 1024, generator=gen), torch.randn(4096, 1024, generator=gen)
    with torch.no_grad():
        ours = _best_of(lambda: _onednn_linear(x, w, None))
        theirs = _best_of(lambda: torch.nn.functional.linear(x, w))
    logger.debug("oneDNN linear %.3f ms, F.linear %.3f ms", ours * 1e3, theirs * 1e3)
    return ours <= 1.1 * theirs


def _forward(module: torch.nn.Linear, x: Tensor) -> Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu" or (
            torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)):
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return _onednn_linear(x, module.weight, module.bias)


def _eligible(module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32 and "forward" not in vars(module)
            and not module._forward_hooks and not module._forward_pre_hooks)


@contextlib.contextmanager
def fast_linears(model: torch.nn.Module) -> Iterator[int]:
    """Route ``model``'s CPU fp32 linear layers through oneDNN inside the block; yields
    how many layers were routed (0 where oneDNN is unavailable or not faster here)."""
    routed = [m for m in model.modules() if _eligible(m)] if _routing_pays() else []
    for module in routed:
        module.forward = _forward.__get__(module)
    try:
        yield len(routed)
    finally:
        for module in routed:
            vars(module).pop("forward", None)
