"""Compiled CPU backend: per-tile GEMMs under OpenMP over the kept blocks only.

The C++ source (``csrc/block_sparse_cpu.cpp``) is built on first use with
``torch.utils.cpp_extension`` (needs a C++ compiler and ninja) and cached by
torch under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
Where it cannot be built, :func:`available` is False and dispatch falls back
to the pure-PyTorch backend. The build is tuned for the host CPU, so the cache
name includes a fingerprint of the CPU's instruction-set flags.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor

from ..blockmap import BlockMap

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"


def _cpu_fingerprint() -> str:
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    digest = hashlib.sha1(flags.encode())
    digest.update(_SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:10]


_STALE_LOCK_SECONDS = 600


def _build_directory(name: str) -> Path:
    """torch's extension build directory for ``name``, freed of a stale lock.

    torch serialises builds with a ``lock`` file and waits forever while it
    exists; a build that was killed leaves it behind. A lock older than any
    real build (10 minutes) is removed.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
            logger.warning("removing a stale build lock %s", lock)
            lock.unlink()
    except FileNotFoundError:
        pass
    return path


@functools.lru_cache(maxsize=1)
def _load():
    """Build (once per machine and source version) and import the extension; None on failure."""
    if os.environ.get("CREATIVE_SPARSE_NO_COMPILE"):
        return None
    try:
        from torch.utils.cpp_extension import load
        flags = ["-O3", "-fopenmp"]
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-march=native")
        name = f"creative_sparse_cpu_{_cpu_fingerprint()}"
        build_dir = _build_directory(name)
        logger.info("preparing the compiled CPU attention kernel (the first time on a machine "
                    "it is built, about 20 s)")
        return load(name=name, sources=[str(_SOURCE)], build_directory=str(build_dir),
                    extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, unsupported platform...
        logger.warning("compiled CPU attention kernel unavailable (%s); using the PyTorch "
                       "backend", exc)
        return None


def available() -> bool:
    """True when the compiled kernel is (or can be) built on this machine."""
    return _load() is not None


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_map: BlockMap, *,
                           scale: float | None = None) -> Tensor:
    """Block-sparse attention over ``block_map``'s kept blocks; computed and returned in fp32.

    Shapes as in :func:`creative_sparse.attention.reference.masked_attention`.
    """
    ext = _load()
    if ext is None:
        raise RuntimeError("the compiled CPU attention kernel could not be built; see the log, "
                           "or use backend='torch'")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    counts, indices = block_map.kv_indices()
    out = ext.block_sparse_forward(
        q.float().contiguous(), k.float().contiguous(), v.float().contiguous(),
        counts.contiguous(), indices.contiguous(), block_map.block_q, block_map.block_k,
        scale, block_map.causal)
    return out
