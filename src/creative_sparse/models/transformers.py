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
at s = 0 gives the unpatched logits.

Importing this module registers the function (when transformers is installed),
so ``from_pretrained(..., attn_implementation="creative_sparse")`` works after
the import. Where the knobs come from, for each attention call, first found wins:

1. the :func:`sparsity` context of the calling thread (a ``ContextVar``);
2. the latest :func:`sparsity` context open on the model in any thread (a thread
   started inside the block, e.g. ``generate`` under a ``TextIteratorStreamer``,
   does not inherit the ``ContextVar``);
3. the dial the model carries, from :func:`set_sparsity` (every forward, every
   thread, until :func:`clear_sparsity`), or a dial saved in its config
   (``config.creative_sparse``, written by :func:`set_sparsity`, so it survives
   ``save_pretrained`` / ``from_pretrained``);
4. none: exact attention, with a warning once per model (the implementation was
   asked for, but no level was given).

:func:`sparsity` switches the model's attention implementation and MoE
routers and restores everything on exit, exception or not.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ..attention import block_sparse_attention
from ..attention.dispatch import predict
from .attention_knobs import AttentionKnobs, AttentionStats, dial_params
from .token_topk import token_topk

__all__ = ["ATTENTION_NAME", "AttentionKnobs", "AttentionStats", "as_knobs", "clear_sparsity",
           "creative_sparse_attention", "dial_params", "register", "set_knobs", "set_sparsity",
           "sparsity", "sparsity_stats"]

ATTENTION_NAME = "creative_sparse"
CONFIG_KEY = "creative_sparse"       # the carried dial in a model config (a plain dict)


@dataclass(eq=False)      # identity: two blocks with equal knobs are still two
class _Active:
    knobs: AttentionKnobs
    stats: AttentionStats
    track_key_mass: bool


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar(
    "creative_sparse_attention", default=None)


@dataclass
class _Dial:
    """What one model carries, kept per attention config (``module.config``, which the
    attention function receives through ``module``): the dial from :func:`set_sparsity`,
    the :func:`sparsity` blocks open on it (seen by threads that have none of their own),
    and what to restore. Nothing here refers to the model (the registry is global and
    must not keep models alive): the carried MoE routing lives on the model itself."""

    carried: _Active | None = None
    scoped: list[_Active] = field(default_factory=list)
    previous_impl: str | None = None
    warned: bool = False


_LOCK = threading.RLock()
_DIALS: dict[int, _Dial] = {}       # id(config) -> dial; entries leave with their config


def _dial_of(config, create: bool = False) -> _Dial | None:
    dial = _DIALS.get(id(config))
    if dial is None and create:
        with _LOCK:
            dial = _DIALS.get(id(config))
            if dial is None:
                dial = _DIALS[id(config)] = _Dial()
                weakref.finalize(config, _DIALS.pop, id(config), None)
    return dial


def _knobs_from_config(config) -> AttentionKnobs | None:
    spec = getattr(config, CONFIG_KEY, None)
    if spec is None:
        return None
    try:
        return as_knobs(spec)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.{CONFIG_KEY} = {spec!r} is not a valid dial: {err}") from None


def _lookup(module) -> _Active | None:
    """The knobs for one call (see the module docstring for the order)."""
    active = _ACTIVE.get()
    if active is not None:
        return active
    config = getattr(module, "config", None)
    if config is None:
        _warn_exact(module, _NO_CONFIG)         # no config: nothing can be carried
        return None
    dial = _dial_of(config)
    if dial is None or (dial.carried is None and not dial.scoped):
        knobs = _knobs_from_config(config)      # a dial saved with the model
        if knobs is not None:
            dial = _dial_of(config, create=True)
            with _LOCK:
                if dial.carried is None:
                    dial.carried = _Active(knobs, AttentionStats(), False)
                    if knobs.experts_per_token is not None or knobs.router_temperature != 1.0:
                        warnings.warn(
                            f"config.{CONFIG_KEY} sets MoE routing, which needs the model: "
                            "call set_sparsity(model, model.config.creative_sparse) to apply "
                            "it; until then only the attention part is applied", stacklevel=3)
    if dial is not None:
        latest = dial.scoped[-1:]       # a slice: another thread may close its block now
        if latest:
            return latest[0]
        carried = dial.carried
        if carried is not None:
            return carried
    _warn_exact(module, _dial_of(config, create=True))
    return None


_NO_CONFIG = _Dial()       # the warning state of attention layers without a config


def _warn_exact(module, dial: _Dial) -> None:
    """Warn once per model that it runs exact attention under our name, for want of a level."""
    if not dial.warned and getattr(module, "is_causal", True):
        dial.warned = True
        warnings.warn(
            f"{type(module).__name__} uses attn_implementation={ATTENTION_NAME!r} but the "
            "model carries no sparsity level: running exact attention. Give it one with "
            "creative_sparse.models.transformers.set_sparsity(model, s) (s in [0, 1]) or "
            "`with sparsity(model, s):`", stacklevel=4)


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
    active = _lookup(module)
    # Dense knobs mean exact SDPA, except for the short (decode) calls whose
    # attention mass is being recorded for cache pruning.
    exact = active is None or not getattr(module, "is_causal", True) or (
        active.knobs.dense and not (active.track_key_mass
                                    and query.shape[2] < active.knobs.min_prefill_len))
    if exact:
        if active is not None:
            pairs = _causal_pairs(query, key)
            active.stats.add(pairs_computed=pairs, pairs_dense=pairs)
            active.stats.count_call(sparse=False)
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                     **kwargs)
    knobs, stats = active.knobs, active.stats
    scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    stats.count_call(sparse=True)
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
    """Register the attention and mask functions under ``"creative_sparse"`` (idempotent;
    done when this module is imported, if transformers is installed)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION_NAME, creative_sparse_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


_KNOB_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionKnobs))


def as_knobs(dial: Any, model=None) -> AttentionKnobs:
    """:class:`AttentionKnobs` from any form of the dial.

    ``dial`` is a level ``s`` in [0, 1] (the dial's knobs for ``model``), a
    :class:`~creative_sparse.control.SparsityParams`, an :class:`AttentionKnobs`, an
    object with an ``attention`` attribute holding one (``creative_sparse.dial(s)``),
    or a dict of :class:`AttentionKnobs` fields (the form saved in a model config).

    Example:
        >>> as_knobs(0.0).dense, as_knobs({"keep_fraction": 0.5}).keep_fraction
        (True, 0.5)
    """
    if isinstance(dial, AttentionKnobs):
        return dial
    if isinstance(getattr(dial, "attention", None), AttentionKnobs):
        return dial.attention
    if isinstance(dial, numbers.Real) and not isinstance(dial, bool):
        from ..control import check_level
        return AttentionKnobs.from_params(dial_params(model, check_level(dial)))
    if isinstance(dial, Mapping):
        unknown = sorted(set(dial) - set(_KNOB_FIELDS))
        if unknown:
            raise ValueError(f"unknown attention knobs {unknown}; allowed: "
                             f"{', '.join(_KNOB_FIELDS)}")
        return AttentionKnobs(**dial)
    if all(hasattr(dial, name) for name in ("s", "keep_fraction", "simthreshd1", "cdfthreshd")):
        return AttentionKnobs.from_params(dial)       # a SparsityParams
    raise ValueError(f"the dial must be a level s in [0, 1], a SparsityParams, an "
                     f"AttentionKnobs, creative_sparse.dial(s) or a dict of knobs; got "
                     f"{type(dial).__name__} {dial!r}")


def _knobs_dict(knobs: AttentionKnobs) -> dict[str, Any]:
    # Row seeds and dense rows belong to one batch, not to the model.
    out = dataclasses.asdict(knobs)
    del out["row_seeds"], out["dense_rows"]
    return out


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "layer_idx")
            and any(name in dict(m.named_children()) for name in ("q_proj", "qkv_proj"))]


def _patchable(model):
    """The config ``model``'s attention layers share (where its dial is kept), or None
    when they have none in common; ``ValueError`` for a model we cannot patch."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face transformers model "
                         "(no config / set_attn_implementation)")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention layers that we can patch "
                         "(expected modules with q_proj, layer_idx and is_causal)")
    configs = {id(getattr(m, "config", None)): getattr(m, "config", None) for m in modules}
    shared = next(iter(configs.values())) if len(configs) == 1 else None
    return shared


def _carrier(model):
    """:func:`_patchable`, for the functions that need the shared config."""
    config = _patchable(model)
    if config is None:
        raise ValueError(f"{type(model).__name__}'s attention layers do not share one config "
                         "(module.config), where a carried dial is looked up; use "
                         "`with sparsity(model, ...)` around each call instead")
    return config


_ROUTING_ATTR = "_creative_sparse_routing"


def _set_routing(model, knobs: AttentionKnobs | None) -> None:
    """Apply ``knobs``' MoE routing to ``model`` until the next call (``None``: restore)."""
    from .moe import moe_routing

    routing = model.__dict__.pop(_ROUTING_ATTR, None)
    if routing is not None:
        routing.close()
    if knobs is not None and (knobs.experts_per_token is not None
                              or knobs.router_temperature != 1.0):
        routing = contextlib.ExitStack()
        routing.enter_context(moe_routing(model, knobs.experts_per_token,
                                          knobs.router_temperature))
        model.__dict__[_ROUTING_ATTR] = routing


def set_sparsity(model, dial: Any) -> AttentionStats:
    """Give ``model`` a dial it carries: every forward, in every thread, until cleared.

    ``dial``: anything :func:`as_knobs` takes (a level ``s`` in [0, 1], a
    ``SparsityParams``, ``AttentionKnobs``, ``creative_sparse.dial(s)``, a dict), or
    ``None`` to clear it (:func:`clear_sparsity`). Switches the model to the
    ``"creative_sparse"`` attention implementation, sets its MoE routers, and writes
    the knobs into ``model.config.creative_sparse`` (a dict; ``save_pretrained`` keeps
    it). A :func:`sparsity` block overrides the carried dial while it is open.
    Calling it again replaces the dial (and starts new statistics).

    Returns the model's :class:`AttentionStats`, counting every call made with the
    carried dial from now on (also :func:`sparsity_stats`).

    Example:
        >>> stats = set_sparsity(model, 0.8)                              # doctest: +SKIP
        >>> model.generate(ids, max_new_tokens=20)                       # doctest: +SKIP
        >>> stats.attended_fraction                                      # doctest: +SKIP
    """
    if dial is None:
        clear_sparsity(model)
        return AttentionStats()
    config = _carrier(model)
    knobs = as_knobs(dial, model)
    register()
    with _LOCK:
        state = _dial_of(config, create=True)
        _set_routing(model, knobs)
        state.carried = _Active(knobs, AttentionStats(), False)
        setattr(config, CONFIG_KEY, _knobs_dict(knobs))
        if model.config._attn_implementation != ATTENTION_NAME:
            state.previous_impl = model.config._attn_implementation
            model.set_attn_implementation(ATTENTION_NAME)
        return state.carried.stats


def clear_sparsity(model) -> None:
    """Remove the dial ``model`` carries (:func:`set_sparsity`): routers, the config entry
    and the attention implementation are restored (to ``"sdpa"`` when the model was
    loaded with ``attn_implementation="creative_sparse"``). Nothing to clear is fine."""
    config = _carrier(model)
    with _LOCK:
        state = _dial_of(config)
        if state is not None:
            state.carried = None
        _set_routing(model, None)
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
        if not (state and state.scoped) and model.config._attn_implementation == ATTENTION_NAME:
            previous = state.previous_impl if state is not None else None
            model.set_attn_implementation(previous if previous not in (None, ATTENTION_NAME)
                                          else "sdpa")
        if state is not None:
            state.previous_impl = None


def sparsity_stats(model) -> AttentionStats | None:
    """The :class:`AttentionStats` of the dial ``model`` carries (every thread's calls
    since :func:`set_sparsity`), or None when it carries none."""
    state = _dial_of(_carrier(model))
    return state.carried.stats if state is not None and state.carried is not None else None


@contextlib.contextmanager
def sparsity(model, knobs: Any, *, track_key_mass: bool = False) -> Iterator[AttentionStats]:
    """Apply ``knobs`` to ``model`` inside a ``with`` block; yields live :class:`AttentionStats`.

    ``knobs``: anything :func:`as_knobs` takes (a level ``s``, a ``SparsityParams``,
    an :class:`AttentionKnobs`, ...). Switches the model to the ``"creative_sparse"``
    attention implementation, sets the MoE routers (when ``knobs.experts_per_token``
    is set or the router temperature is not 1), and restores the model exactly on
    exit, including after an exception. Overrides the dial the model carries
    (:func:`set_sparsity`) while open; threads started inside the block without a
    block of their own use it too.

    Example:
        >>> with sparsity(model, AttentionKnobs(keep_fraction=0.5)) as stats:  # doctest: +SKIP
        ...     model(input_ids)
        >>> stats.attended_fraction  # doctest: +SKIP
    """
    config = _patchable(model)      # None: layers without one shared config (no carried dial)
    knobs = as_knobs(knobs, model)
    from .moe import moe_routing
    register()
    previous = model.config._attn_implementation
    stats = AttentionStats()
    active = _Active(knobs, stats, track_key_mass)
    if config is not None and _dial_of(config) is None \
            and getattr(config, CONFIG_KEY, None) is not None:
        set_sparsity(model, _knobs_from_config(config))       # a dial saved with the model
    state = _dial_of(config, create=True) if config is not None else _Dial()
    token = _ACTIVE.set(active)
    try:
        _set_routing(model, None)       # one routing at a time: the block's
        with _LOCK:
            state.scoped.append(active)
        model.set_attn_implementation(ATTENTION_NAME)
        with moe_routing(model, knobs.experts_per_token, knobs.router_temperature):
            yield stats
    finally:
        _ACTIVE.reset(token)
        with _LOCK:
            state.scoped[:] = [a for a in state.scoped if a is not active]
        model.set_attn_implementation(previous)
        if state.carried is not None and not state.scoped:
            _set_routing(model, state.carried.knobs)


try:    # registered on import, so `from_pretrained(attn_implementation=...)` knows the name
    register()
except ImportError:     # transformers is the optional [hf] extra (or one without the
    pass                # interfaces); using a model says so then
