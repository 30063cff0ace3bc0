"""The knobs of the ``"creative_sparse"`` attention at one level, and the work it did.

:class:`AttentionKnobs` (frozen, validated) is what the attention function applies;
:class:`AttentionStats` counts what it computed. Both are re-exported by
:mod:`creative_sparse.models.transformers`, which applies them.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["AttentionKnobs", "AttentionStats", "dial_params"]


@dataclass(frozen=True)
class AttentionKnobs:
    """Attention knobs at one sparsity level (see :mod:`creative_sparse.control`).

    Attributes:
        keep_fraction: fraction of visible keys each query attends to, in (0, 1];
            1.0 is exact dense attention everywhere.
        sink_tokens: first tokens always kept (attention sinks), >= 0.
        local_window: most recent tokens always kept, >= 0.
        simthreshd1, cdfthreshd, topk: SpargeAttn prefill thresholds
            (``topk`` overrides ``cdfthreshd`` when set).
        pvthreshd: the prefill kernel may skip a P·V product whose weights are all
            below ``2**-pvthreshd`` of the running maximum (log2 units, > 0); honoured
            by the Triton GPU kernel, exact elsewhere. ``None`` never skips.
        min_prefill_len: queries per call from which the block-sparse path is used.
        noise: Gumbel-noise scale on the key selection scores, >= 0 (0 = none).
        row_seeds: one int seed per batch row for the noise; ``None`` = no noise.
        dense_rows: batch rows whose decode attention stays exact (a reference
            row generated beside sparse drafts); the prompt prefill, which all
            rows share, and the MoE routing follow the knobs as usual.
        experts_per_token: MoE experts per token, or ``None`` to leave routers alone.
        router_temperature: MoE router softmax temperature, > 0.

    Example:
        >>> AttentionKnobs(keep_fraction=0.5, noise=0.3, row_seeds=(1, 2, 3)).keep_fraction
        0.5
    """

    keep_fraction: float = 1.0
    sink_tokens: int = 4
    local_window: int = 32
    simthreshd1: float = 0.6
    cdfthreshd: float = 0.97
    topk: float | None = None
    pvthreshd: float | None = None
    min_prefill_len: int = 256
    noise: float = 0.0
    row_seeds: tuple[int, ...] | None = None
    dense_rows: tuple[int, ...] = ()
    experts_per_token: int | None = None
    router_temperature: float = 1.0

    def __post_init__(self):
        def check(name, ok, allowed):
            if not ok:
                raise ValueError(f"AttentionKnobs.{name} must be {allowed}, got "
                                 f"{getattr(self, name)!r}")
        check("keep_fraction", 0.0 < self.keep_fraction <= 1.0, "in (0, 1]")
        check("sink_tokens", isinstance(self.sink_tokens, int) and self.sink_tokens >= 0, ">= 0")
        check("local_window", isinstance(self.local_window, int) and self.local_window >= 0,
              ">= 0")
        check("simthreshd1", -1.0 <= self.simthreshd1 <= 1.0, "in [-1, 1]")
        check("cdfthreshd", 0.0 < self.cdfthreshd <= 1.0, "in (0, 1]")
        check("topk", self.topk is None or 0.0 < self.topk <= 1.0, "None or in (0, 1]")
        check("pvthreshd", self.pvthreshd is None or (self.pvthreshd > 0
                                                      and not math.isnan(self.pvthreshd)),
              "None or > 0")
        check("min_prefill_len", isinstance(self.min_prefill_len, int)
              and self.min_prefill_len >= 1, "an int >= 1")
        check("noise", self.noise >= 0.0 and math.isfinite(self.noise), "finite and >= 0")
        check("experts_per_token", self.experts_per_token is None
              or (isinstance(self.experts_per_token, int) and self.experts_per_token >= 1),
              "None or an int >= 1")
        check("router_temperature", self.router_temperature > 0
              and math.isfinite(self.router_temperature), "finite and > 0")
        if self.row_seeds is not None:
            object.__setattr__(self, "row_seeds", tuple(int(x) for x in self.row_seeds))
        object.__setattr__(self, "dense_rows", tuple(int(x) for x in self.dense_rows))
        check("dense_rows", all(r >= 0 for r in self.dense_rows), "batch indices >= 0")

    @classmethod
    def from_params(cls, params, *, row_seeds: Sequence[int] | None = None,
                    noise_per_level: float = 1.0, **overrides) -> "AttentionKnobs":
        """Knobs from the dial: a :class:`creative_sparse.control.SparsityParams` at level s.

        The key budget is ``params.keep_fraction`` (dense at s = 0); prefill uses
        ``params.simthreshd1``/``cdfthreshd``/``pvthreshd``; sub-network noise is
        ``noise_per_level * s`` when ``row_seeds`` are given. ``overrides`` set
        any other field.

        Example:
            >>> from creative_sparse.control import SparsityController
            >>> p = SparsityController().get_sparsity_params(0.0)
            >>> AttentionKnobs.from_params(p).dense
            True
        """
        fields = dict(
            keep_fraction=params.keep_fraction if params.keep_fraction is not None else 1.0,
            simthreshd1=params.simthreshd1, cdfthreshd=params.cdfthreshd,
            pvthreshd=params.pvthreshd,
            noise=noise_per_level * params.s if row_seeds is not None else 0.0,
            row_seeds=tuple(row_seeds) if row_seeds is not None else None,
            experts_per_token=params.experts_per_token,
            router_temperature=params.router_temperature or 1.0)
        fields.update(overrides)
        return cls(**fields)

    @property
    def dense(self) -> bool:
        """True when attention is exact (nothing is skipped)."""
        return self.keep_fraction >= 1.0


_COUNTS = ("pairs_computed", "pairs_dense", "blocks_kept", "blocks_total")


def _count(name: str, doc: str) -> property:
    """A read-only int attribute of :class:`AttentionStats` (device counts read here)."""
    return property(lambda stats: stats._read(name), doc=doc)


@dataclass
class AttentionStats:
    """Work done by the patched attention since the context was entered.

    ``pairs_*`` count (query, key) score pairs summed over layers, batch and
    heads; ``attended_fraction`` is computed / dense-equivalent.

    Counts computed on a GPU are added there and read back only when a count is
    read: an ``int()`` per layer would make the CPU wait for the GPU at every
    layer, where it should be queueing the next kernels. Safe to share between
    threads (a model's carried statistics count every thread's calls).
    """

    calls: int = 0
    sparse_calls: int = 0
    # H2O: attention mass received by each cached key, per layer, summed over
    # heads and queries of the token-level path ([B, k_len] per layer index).
    key_mass: dict[int, Tensor] = field(default_factory=dict)
    _totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0),
                                    repr=False)
    _pending: dict[tuple[str, torch.device], Tensor] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_call(self, sparse: bool) -> None:
        """Count one attention call (``sparse``: one that skipped work)."""
        with self._lock:
            self.calls += 1
            self.sparse_calls += bool(sparse)

    def add(self, **counts: int | Tensor) -> None:
        """Add to the named counts (``pairs_computed=...``, ...): ints, or integer
        tensors of one element, which stay on their device until a count is read."""
        with self._lock:
            self._add(counts)

    def _add(self, counts: Mapping[str, int | Tensor]) -> None:
        for name, amount in counts.items():
            if name not in self._totals:
                raise ValueError(f"unknown count {name!r}; the counts are {', '.join(_COUNTS)}")
            if isinstance(amount, Tensor):
                key = (name, amount.device)
                amount = amount.reshape(()).to(torch.int64)
                pending = self._pending.get(key)
                self._pending[key] = amount if pending is None else pending + amount
            else:
                self._totals[name] += int(amount)

    def _read(self, name: str) -> int:
        with self._lock:
            for key in [key for key in self._pending if key[0] == name]:
                self._totals[name] += int(self._pending.pop(key))
            return self._totals[name]

    pairs_computed = _count("pairs_computed", "(query, key) pairs the attention computed.")
    pairs_dense = _count("pairs_dense", "(query, key) pairs dense causal attention would "
                                        "have computed.")
    blocks_kept = _count("blocks_kept", "Blocks the block-sparse prefill computed (over "
                                        "batch and heads).")
    blocks_total = _count("blocks_total", "Blocks dense causal prefill would have computed "
                                          "(over batch and heads).")

    @property
    def attended_fraction(self) -> float:
        dense = self.pairs_dense
        return self.pairs_computed / dense if dense else 1.0

    @property
    def block_sparsity(self) -> float:
        total = self.blocks_total
        return 1.0 - self.blocks_kept / total if total else 0.0


def dial_params(model, s: float, controller=None):
    """Every knob of the dial at level ``s`` for ``model``: a
    :class:`~creative_sparse.control.SparsityParams` whose MoE knobs follow the model's
    routers (E and its own experts per token; none for a dense model or ``model=None``).

    ``controller`` is a :class:`~creative_sparse.control.SparsityController` (default one).
    """
    from ..control import SparsityController
    from .moe import find_routers

    controller = SparsityController() if controller is None else controller
    routers = find_routers(model) if model is not None else []
    experts = (routers[0].num_experts, routers[0].top_k) if routers else (None, None)
    return controller.get_sparsity_params(s, num_experts=experts[0], default_experts=experts[1])
