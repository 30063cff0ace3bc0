"""Sparsity inside Hugging Face transformers models, through ``AttentionInterface``.

One attention function, registered under the name ``"creative_sparse"`` (with
the SDPA mask function registered under the same name in
``AttentionMaskInterface``, or the causal mask would silently disappear),
applies the active :class:`AttentionKnobs`:

* **prefill** (``q_len >= min_prefill_len``, no padding mask): SpargeAttn
  block-sparse attention from :mod:`creative_sparse.attention`;
* **decode and short chunks**: token-level top-k over the keys, with a budget of
  ``keep_fraction`` of the visible keys, always keeping ``sink_tokens`` first
  tokens and a ``local_window`` of recent ones (:mod:`.token_topk`);
* **sub-network diversity**: with ``noise > 0`` and ``row_seeds``, Gumbel noise
  (scaled by ``noise``) perturbs which keys each batch row keeps, reproducibly
  per seed, so parallel drafts explore different sub-networks;
* **statistics** for compute accounting (:class:`AttentionStats`).

With ``keep_fraction == 1`` the function is exactly SDPA, so a patched model
at s = 0 gives the unpatched logits. The knobs travel in a ``ContextVar`` set
by :func:`sparsity`, which also switches the model's attention implementation
and MoE routers and restores everything on exit, exception or not.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..attention import block_sparse_attention
from ..attention.dispatch import predict
from .token_topk import token_topk

__all__ = ["ATTENTION_NAME", "AttentionKnobs", "AttentionStats", "register", "set_knobs",
           "sparsity", "creative_sparse_attention"]

ATTENTION_NAME = "creative_sparse"


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
    layer, where it should be queueing the next kernels.
    """

    calls: int = 0
    sparse_calls: int = 0
    # H2O: attention mass received by each cached key, per layer, summed over
    # heads and queries of the token-level path ([B, k_len] per layer index).
    key_mass: dict[int, Tensor] = field(default_factory=dict)
    _totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0),
                                    repr=False)
    _pending: dict[tuple[str, torch.device], Tensor] = field(default_factory=dict, repr=False)

    def add(self, **counts: int | Tensor) -> None:
        """Add to the named counts (``pairs_computed=...``, ...): ints, or integer
        tensors of one element, which stay on their device until a count is read."""
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


@dataclass
class _Active:
    knobs: AttentionKnobs
    stats: AttentionStats
    track_key_mass: bool


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar(
    "creative_sparse_attention", default=None)


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def _causal_pairs(query: Tensor, key: Tensor) -> int:
    """(query, key) pairs dense causal attention computes, over batch and heads.

    The queries are the last ``q_len`` positions, so they see ``k_len - q_len + 1``
    up to ``k_len`` keys (none below 1): a difference of triangular numbers.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    unseen = max(k_len - q_len, 0)
    pairs = (k_len * (k_len + 1) - unseen * (unseen + 1)) // 2
    return pairs * query.shape[0] * query.shape[1]


def creative_sparse_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None,
                              **kwargs) -> tuple[Tensor, None]:
    """The function registered with ``AttentionInterface`` (same signature as SDPA's).

    ``query`` is ``[B, H, q, D]``, ``key``/``value`` ``[B, H_kv, k, D]`` (KV heads
    not repeated); returns ``([B, q, H, Dv], None)``.
    """
    active = _ACTIVE.get()
    # Dense knobs mean exact SDPA, except for the short (decode) calls whose
    # attention mass is being recorded for cache pruning.
    exact = active is None or not getattr(module, "is_causal", True) or (
        active.knobs.dense and not (active.track_key_mass
                                    and query.shape[2] < active.knobs.min_prefill_len))
    if exact:
        if active is not None:
            pairs = _causal_pairs(query, key)
            active.stats.add(pairs_computed=pairs, pairs_dense=pairs)
            active.stats.calls += 1
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                     **kwargs)
    knobs, stats = active.knobs, active.stats
    scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    stats.calls += 1
    stats.sparse_calls += 1
    q_len = query.shape[2]
    if q_len >= knobs.min_prefill_len and attention_mask is None:
        topk = knobs.topk
        block_map = predict(
            query, key, simthreshd1=knobs.simthreshd1,
            cdfthreshd=None if topk is not None else knobs.cdfthreshd, topk=topk, causal=True,
            attention_sink=knobs.sink_tokens > 0, scale=scaling)
        out = block_sparse_attention(query, key, value, block_map, scale=scaling,
                                     pvthreshd=knobs.pvthreshd)
        stats.add(pairs_computed=block_map.pair_count(), pairs_dense=_causal_pairs(query, key),
                  blocks_kept=block_map.keep.sum(),
                  blocks_total=block_map.valid().sum() * (query.shape[0] * query.shape[1]))
    else:
        out = token_topk(module, query, key, value, attention_mask, scaling, active)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def set_knobs(knobs: AttentionKnobs) -> None:
    """Replace the knobs of the active :func:`sparsity` context (e.g. per decoding step).

    Statistics keep accumulating. The MoE routing stays as set when the context
    was entered (routers are patched once). Raises ``RuntimeError`` outside a context.
    """
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError("set_knobs() needs an active `with sparsity(model, knobs):` block")
    if not isinstance(knobs, AttentionKnobs):
        raise ValueError(f"knobs must be an AttentionKnobs, got {type(knobs).__name__}")
    active.knobs = knobs


def register() -> None:
    """Register the attention and mask functions under ``"creative_sparse"`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION_NAME, creative_sparse_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "layer_idx")
            and any(name in dict(m.named_children()) for name in ("q_proj", "qkv_proj"))]


@contextlib.contextmanager
def sparsity(model, knobs: AttentionKnobs, *, track_key_mass: bool = False
             ) -> Iterator[AttentionStats]:
    """Apply ``knobs`` to ``model`` inside a ``with`` block; yields live :class:`AttentionStats`.

    Switches the model to the ``"creative_sparse"`` attention implementation,
    sets the MoE routers (when ``knobs.experts_per_token`` is set or the router
    temperature is not 1), and restores the model exactly on exit, including
    after an exception.

    Example:
        >>> with sparsity(model, AttentionKnobs(keep_fraction=0.5)) as stats:  # doctest: +SKIP
        ...     model(input_ids)
        >>> stats.attended_fraction  # doctest: +SKIP
    """
    if not isinstance(knobs, AttentionKnobs):
        raise ValueError(f"knobs must be an AttentionKnobs, got {type(knobs).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face transformers model "
                         "(no config / set_attn_implementation)")
    if not _attention_modules(model):
        raise ValueError(f"{type(model).__name__} has no attention layers that we can patch "
                         "(expected modules with q_proj, layer_idx and is_causal)")
    from .moe import moe_routing
    register()
    previous = config._attn_implementation
    stats = AttentionStats()
    token = _ACTIVE.set(_Active(knobs, stats, track_key_mass))
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        with moe_routing(model, knobs.experts_per_token, knobs.router_temperature):
            yield stats
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)
