"""The only place that chooses an attention backend.

Backends (each computes exactly the kept blocks of a :class:`BlockMap`):

* ``"cpu_kernel"``: compiled C++ (OpenMP + BLAS tiles), CPU only; the CPU default.
* ``"triton"``: fused Triton kernel with INT8 Q·Kᵀ and the PV threshold; the
  CUDA default where Triton is installed (compute capability >= 8.0). On CPU
  tensors it runs only under Triton's interpreter (``TRITON_INTERPRET=1``), for tests.
* ``"flex"``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built
  from the kept-block lists (compiled with ``torch.compile``); the CUDA fallback.
* ``"torch"``: pure PyTorch, any device; the fallback.
* ``"reference"``: the fp32 oracle over the token mask (slow, for tests).

Precedence: the ``backend=`` argument, then :func:`use_backend`, then the
``CREATIVE_SPARSE_BACKEND`` environment variable, then the automatic choice.
A forced backend that cannot run is an error, never a silent switch.

Precision: ``"torch"`` and ``"reference"`` compute in fp64 when an input is fp64
(else fp32), and the automatic choice takes ``"torch"`` for fp64 inputs, so fp64
keeps its range (fp32 scores overflow past 3.4e38 to NaN). ``"cpu_kernel"``,
``"flex"`` and ``"triton"`` compute in fp32 (``"triton"`` with INT8 scores);
forced on fp64 inputs they warn, once per call site, and round to fp32. Every
backend returns its compute dtype, rounded to the caller's dtype once, last. The
block-map prediction pools in fp32 whatever the input dtype.

The block-map prediction is chosen here too (:func:`predict`): ``"torch"``
(:func:`~creative_sparse.attention.predict_block_map`, any device) or
``"triton"`` (the same map from five fused GPU launches instead of about seventy,
which also hands the kernel its block lists), or ``"auto"``, the default.
Precedence: the ``predictor=`` argument, then the ``CREATIVE_SPARSE_PREDICTOR``
environment variable, then ``"auto"``.

``"auto"`` is ``"torch"`` except on a CUDA device where Triton runs. There the
first prediction on each device is made both ways: the fused predictor is chosen
for that device from then on if its map agrees with the PyTorch one (at most
0.3% of blocks may flip, from float rounding at a threshold) and it is faster on
those very inputs; otherwise ``"torch"`` is, with a warning when the maps
disagree or the fused predictor fails. The choice is logged
(``creative_sparse.attention.dispatch``) and :func:`predictor_choices` lists it.
A call the fused predictor does not take (head dim over 256, block sizes that are
not powers of two) uses PyTorch's and leaves the choice to a later call.
The fused predictor equals the PyTorch one under Triton's interpreter (tests),
but its compiled form had not run on a GPU when this check was written: the
check is what makes it safe as a default.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor

from .blockmap import BlockMap, predict_block_map
from .reference import compute_dtype

__all__ = ["BACKENDS", "ENV_VAR", "FP64_BACKENDS", "PREDICTORS", "PREDICTOR_ENV_VAR",
           "available_backends", "predict", "predictor_choices", "select_backend",
           "select_predictor", "run_backend", "use_backend"]

logger = logging.getLogger(__name__)

BACKENDS = ("cpu_kernel", "triton", "flex", "torch", "reference")
FP64_BACKENDS = ("torch", "reference")
"""Backends that compute fp64 inputs in fp64; the others compute in fp32."""
ENV_VAR = "CREATIVE_SPARSE_BACKEND"
PREDICTORS = ("auto", "torch", "triton")
MAX_MAP_DIFFERENCE = 0.003
"""Fraction of blocks on which the fused map may differ from the PyTorch one in the
``"auto"`` check (float rounding at a threshold flips a few; a bug flips many)."""
PREDICTOR_ENV_VAR = "CREATIVE_SPARSE_PREDICTOR"
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("creative_sparse_backend",
                                                                     default=None)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown attention backend {name!r}; allowed: "
                         f"{', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (thread- and task-local).

    Example:
        >>> with use_backend("torch"):
        ...     pass  # every sparse attention call in here uses the PyTorch backend
    """
    token = _forced.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def _is_available(name: str, device: torch.device) -> bool:
    if name == "cpu_kernel":
        if device.type != "cpu":
            return False
        from .backends import cpu_kernel
        return cpu_kernel.available()
    if name == "flex":
        from .backends import flex
        return flex.available(device)
    if name == "triton":
        from .backends import triton
        return triton.available(device)
    return True


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` here (building the CPU kernel if needed)."""
    device = torch.device(device)
    return [name for name in BACKENDS if _is_available(name, device)]


def select_backend(device: torch.device | str, requested: str | None = None, *,
                   dtype: torch.dtype | None = None) -> str:
    """Name of the backend to use on ``device`` (see the module docstring for precedence).

    ``dtype`` is the compute dtype of the inputs: for ``torch.float64`` the
    automatic choice is ``"torch"``, which keeps fp64 (a forced backend stays forced).
    """
    device = torch.device(device)
    name, source = requested, "backend"
    if name is None:
        name, source = _forced.get(), "use_backend"
    if name is None:
        name, source = os.environ.get(ENV_VAR) or None, ENV_VAR
    if name is not None:
        _check_name(name, source)
        if not _is_available(name, device):
            raise ValueError(f"{source}: attention backend {name!r} cannot run on device "
                             f"{device} here; available: {', '.join(available_backends(device))}")
        return name
    if dtype == torch.float64:
        return "torch"
    preference = ("triton", "flex", "torch") if device.type == "cuda" else ("cpu_kernel", "torch")
    for name in preference:
        if _is_available(name, device):
            return name
    return "torch"


def _implementation(name: str) -> Callable[..., Tensor]:
    if name == "cpu_kernel":
        from .backends.cpu_kernel import block_sparse_attention
    elif name == "triton":
        from .backends.triton import block_sparse_attention
    elif name == "flex":
        from .backends.flex import block_sparse_attention
    elif name == "torch":
        from .backends.torch_cpu import block_sparse_attention
    else:
        def block_sparse_attention(q, k, v, block_map, *, scale=None):
            from .reference import compute_dtype, masked_attention
            return masked_attention(q, k, v, block_map.to_token_mask(),
                                    causal=block_map.causal, scale=scale,
                                    output_dtype=compute_dtype(q, k, v))
    return block_sparse_attention


def _fit_block_map(block_map: BlockMap, q: Tensor, k: Tensor) -> BlockMap:
    """``block_map`` checked against ``[B, H, Lq, D]`` / ``[B, H_kv, Lk, D]``, batch/heads broadcast."""
    b, h, lq = q.shape[:3]
    if (block_map.q_len, block_map.k_len) != (lq, k.shape[2]):
        raise ValueError(f"block_map was made for q_len={block_map.q_len}, k_len="
                         f"{block_map.k_len}; the inputs have q_len={lq}, k_len={k.shape[2]}")
    bb, bh = block_map.keep.shape[:2]
    if bb not in (1, b) or bh not in (1, h):
        raise ValueError(f"block_map.keep has batch/heads {bb}/{bh}; allowed: 1 or {b} / "
                         f"1 or {h}")
    return block_map if (bb, bh) == (b, h) else block_map.expand_batch_heads(b, h)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _outside_stacklevel() -> int:
    """``stacklevel`` for a warning raised in this package that names the caller's
    line: the first frame outside ``creative_sparse.attention``."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def run_backend(q: Tensor, k: Tensor, v: Tensor, block_map: BlockMap, *,
                scale: float | None = None, backend: str | None = None,
                out_dtype: torch.dtype | None = None, pvthreshd=None) -> Tensor:
    """Compute attention over ``block_map`` with the selected backend.

    ``q``/``k``/``v`` are ``[B, H, Lq, D]`` / ``[B, H_kv, Lk, D]`` / ``[B, H_kv, Lk, Dv]``;
    ``block_map.keep`` may have batch or heads of 1 (broadcast). Returns
    ``[B, H, Lq, Dv]`` in ``out_dtype`` (default ``q.dtype``), cast once from the
    backend's compute dtype. ``pvthreshd`` (log2 units, scalar or per head) reaches
    the backends that skip P·V (``"triton"``); the others compute kept blocks exactly.
    """
    block_map = _fit_block_map(block_map, q, k)
    dtype = compute_dtype(q, k, v)
    name = select_backend(q.device, backend, dtype=dtype)
    if dtype == torch.float64 and name not in FP64_BACKENDS:
        warnings.warn(f"attention backend {name!r} computes fp64 inputs in fp32 (scores past "
                      f"3.4e38 overflow); backends that keep fp64: {', '.join(FP64_BACKENDS)}",
                      stacklevel=_outside_stacklevel())
    extra = {"pvthreshd": pvthreshd} if name == "triton" else {}
    out = _implementation(name)(q, k, v, block_map, scale=scale, **extra)
    return out.to(out_dtype or q.dtype)


def select_predictor(device: torch.device | str, requested: str | None = None) -> str:
    """Name of the block-map predictor to use on ``device`` (see the module docstring):
    ``"torch"``, ``"triton"``, or ``"auto"`` while the first prediction on a CUDA
    device has yet to choose between them."""
    name, source = requested, "predictor"
    if name is None:
        name, source = os.environ.get(PREDICTOR_ENV_VAR) or "auto", PREDICTOR_ENV_VAR
    if name not in PREDICTORS:
        raise ValueError(f"{source}: unknown block-map predictor {name!r}; allowed: "
                         f"{', '.join(PREDICTORS)}")
    device = torch.device(device)
    if name == "triton" and not _is_available("triton", device):
        raise ValueError(f"{source}: the 'triton' predictor cannot run on device {device} "
                         "here (it needs Triton and a CUDA GPU of compute capability >= 8.0); "
                         "use 'torch'")
    if name == "auto":
        if not _auto_candidate(device):
            return "torch"
        return _choices.get(str(device), "auto")
    return name


_choices: dict[str, str] = {}


def predictor_choices() -> dict[str, str]:
    """The predictor ``"auto"`` chose per device so far, e.g. ``{"cuda:0": "triton"}``."""
    return dict(_choices)


def _auto_candidate(device: torch.device) -> bool:
    """Devices where ``"auto"`` weighs the fused predictor: CUDA with Triton."""
    return device.type == "cuda" and _is_available("triton", device)


def _seconds(fn, device: torch.device, repeats: int = 3) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs, the device's queue drained."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _choose(device: torch.device, name: str, why: str, *, warn: bool = False) -> None:
    _choices[str(device)] = name
    (logger.warning if warn else logger.info)(
        "block-map predictor on %s: %r (%s)", device, name, why)


def _predict_auto(q: Tensor, k: Tensor, params: dict) -> BlockMap:
    """The first prediction on a device where ``"auto"`` has not chosen yet: both ways,
    compared and timed on these inputs; returns the chosen predictor's map."""
    from .backends import triton as fused_backend

    device = q.device
    reference = predict_block_map(q, k, **params)
    try:
        fused = fused_backend.predict_block_map(q, k, **params)
    except ValueError:
        return reference        # a configuration it does not take (head dim, block sizes)
    except Exception as exc:  # compile or launch failure: never stop the user's call
        _choose(device, "torch", f"the fused predictor failed: {exc!r}"[:300], warn=True)
        return reference
    differ = float((fused.keep != reference.keep).float().mean())
    if differ > MAX_MAP_DIFFERENCE:
        _choose(device, "torch", f"the fused map differs on {differ:.2%} of blocks, more "
                f"than {MAX_MAP_DIFFERENCE:.1%}", warn=True)
        return reference
    fused_s = _seconds(lambda: fused_backend.predict_block_map(q, k, **params), device)
    torch_s = _seconds(lambda: predict_block_map(q, k, **params), device)
    name = "triton" if fused_s < torch_s else "torch"
    _choose(device, name, f"fused {1e3 * fused_s:.3f} ms, PyTorch {1e3 * torch_s:.3f} ms; maps "
            f"differ on {differ:.3%} of blocks")
    return fused if name == "triton" else reference


def predict(q: Tensor, k: Tensor, *, predictor: str | None = None, **params) -> BlockMap:
    """Predict the block map with the selected predictor; ``params`` are those of
    :func:`~creative_sparse.attention.predict_block_map`."""
    name = select_predictor(q.device, predictor)
    if name == "auto":
        return _predict_auto(q, k, params)
    if name == "triton":
        from .backends.triton import predict_block_map as fused
        return fused(q, k, **params)
    return predict_block_map(q, k, **params)
