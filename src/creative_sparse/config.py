"""Frozen, validated configuration: :class:`SparsityConfig` and :class:`QualityWeights`.

:class:`SparsityConfig` holds every constant of the control manifold M(s) (see
:mod:`creative_sparse.control` and DESIGN.md, "The dial: control manifold").
Its first nine fields are the seed's ``SparsityConfig``, in the seed's order and
with the seed's defaults, so seed code that builds one positionally or by keyword
still works; the formula constants that follow are keyword-only.

:class:`QualityWeights` holds alpha, beta, gamma of
``Q(s) = alpha * Novelty + beta * Diversity - gamma * Incoherence``.

Invalid values raise :class:`ValueError` at construction, naming the field, the
value and the allowed range:

    >>> SparsityConfig(p0=1.2)
    Traceback (most recent call last):
    ...
    ValueError: SparsityConfig.p0 = 1.2 is outside the allowed range (0, 1]
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Optional

__all__ = ["QualityWeights", "SparsityConfig", "as_quality_weights"]

_INF = math.inf


def _check_real(owner: str, name: str, value, lo: float = -_INF, hi: float = _INF,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real number inside the interval."""
    where = f"{owner}.{name} = {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where} is not a real number")
    if not math.isfinite(value):
        raise ValueError(f"{where} is not finite")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        left = "(" if lo_open or lo == -_INF else "["
        right = ")" if hi_open or hi == _INF else "]"
        lo_s = "-inf" if lo == -_INF else f"{lo:g}"
        hi_s = "inf" if hi == _INF else f"{hi:g}"
        raise ValueError(f"{where} is outside the allowed range {left}{lo_s}, {hi_s}{right}")


def _check_int(owner: str, name: str, value, lo: int = 1) -> None:
    """Raise ValueError unless ``value`` is an integer >= ``lo``."""
    where = f"{owner}.{name} = {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where} is not an integer")
    if value < lo:
        raise ValueError(f"{where} is outside the allowed range [{lo}, inf)")


def _check_choice(owner: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} = {value!r} is not one of {choices}")


@dataclass(frozen=True)
class SparsityConfig:
    """Constants of the control manifold M(s); one frozen, validated object.

    Seed fields (positional, seed order and defaults):

    - ``attention_sparsity`` (0.6, [0, 1]): the default operating level s for
      callers that do not choose one (the seed's operating point).
    - ``token_pruning_rate`` (0.4, [0, 1]): fraction of cached tokens evicted at
      s = 1, before the ``max_token_pruning_rate`` cap: the drafts' KV cache is
      bounded to ``1 - rate`` of its context (:func:`creative_sparse.control.cache_budget`;
      contexts of 512 tokens or more).
    - ``moe_expert_entropy`` (0.8, [0, 1]): accepted for the seed's positional
      signature; no formula reads it (MoE routing is set by ``experts_per_token``
      and ``router_temperature``). A value other than the default warns.
    - ``kv_reuse_ratio`` (0.3, [0, 1]): accepted for the seed's positional
      signature; no effect: refine always reuses the whole draft cache (prompt and
      draft), since recomputing part of it would cost a prefill and keep the same
      text. A value other than the default warns.
    - ``temperature_schedule`` ("exponential" | "constant"): T(s) as the seed's
      formula, or T0 at every s (an ablation).
    - ``nucleus_adaptation`` ("sigmoidal" | "constant"): p(s) likewise.
    - ``simthreshd1`` (0.6, [-1, 1]), ``cdfthreshd`` (0.97, (0, 1]),
      ``pvthreshd`` (15, integer >= 1): SpargeAttn kernel thresholds at s = 0.

    Formula constants (keyword-only):

    - Temperature ``T0 * exp(kappa_T * s * (1 - s/2))``: ``T0`` (0.8, > 0),
      ``kappa_T`` (0.4, [0, 10]).
    - Nucleus ``p0 + kappa_p * s * tanh(s / sigma_p)``: ``p0`` (0.9, (0, 1]),
      ``kappa_p`` (0.1, >= 0), ``sigma_p`` (0.5, > 0).
      These sampling defaults keep a 135M-parameter instruct model coherent over
      the whole dial (T from 0.8 to 0.98, p from 0.9 to 0.98); with T0 = 1,
      kappa_T = 0.5, kappa_p = 0.3 SmolLM2's diverge drafts were mostly gibberish
      (mean incoherence 0.6 against 0.03).
    - Experts ``K0 + kappa_K * s * E * (1 - exp(-s / tau_K))``: ``K0`` (None:
      the model's default experts per token, else 1; integer >= 1),
      ``kappa_K`` (0.4, >= 0), ``tau_K`` (0.3, > 0).
    - Router temperature ``exp(kappa_router * s)``: ``kappa_router`` (0.5, [0, 10]).
    - Attention: ``attention_schedule`` ("monotone" | "seed"); monotone keep
      fraction ``k0_frac + (1 - k0_frac) * sqrt(1 - s^2)`` with ``k0_frac``
      (0.05, (0, 1]); seed keys per query ``k0 + kappa_a * s * d * sqrt(1 - s^2)``
      with ``k0`` (1.0, >= 0), ``kappa_a`` (0.2, >= 0) and ``head_dim`` (d, 64,
      integer >= 1) used when the caller gives none.
    - Pruning ``min(max_token_pruning_rate, token_pruning_rate * s**token_pruning_power)``:
      ``token_pruning_power`` (1.5, > 0), ``max_token_pruning_rate`` (0.5, [0, 1)).
    - ``kv_reuse_power`` (1.0, > 0): no effect (see ``kv_reuse_ratio``); warns when set.
    - Kernel thresholds ``simthreshd1 * (1 - sim_slope * s)``,
      ``cdfthreshd * (1 - cdf_slope * s)``,
      ``max(min(pv_min, pvthreshd), int(pvthreshd * (1 - pv_slope * s)))``:
      ``sim_slope`` (0.3, [0, 1]), ``cdf_slope`` (0.2, [0, 1)), ``pv_slope``
      (0.4, [0, 1]), ``pv_min`` (5, integer >= 1).

    Example:
        >>> cfg = SparsityConfig()                       # the seed's way
        >>> cfg.simthreshd1, cfg.T0, cfg.attention_schedule
        (0.6, 0.8, 'monotone')
        >>> SparsityConfig(0.7, 0.3, kappa_T=0.8).kappa_T
        0.8
    """

    # --- the seed's fields, in the seed's order ---
    attention_sparsity: float = 0.6
    token_pruning_rate: float = 0.4
    moe_expert_entropy: float = 0.8
    kv_reuse_ratio: float = 0.3
    temperature_schedule: str = "exponential"
    nucleus_adaptation: str = "sigmoidal"
    simthreshd1: float = 0.6
    cdfthreshd: float = 0.97
    pvthreshd: int = 15
    _: KW_ONLY
    # --- formula constants ---
    T0: float = 0.8
    kappa_T: float = 0.4
    p0: float = 0.9
    kappa_p: float = 0.1
    sigma_p: float = 0.5
    K0: Optional[int] = None
    kappa_K: float = 0.4
    tau_K: float = 0.3
    kappa_router: float = 0.5
    attention_schedule: str = "monotone"
    k0_frac: float = 0.05
    k0: float = 1.0
    kappa_a: float = 0.2
    head_dim: int = 64
    token_pruning_power: float = 1.5
    max_token_pruning_rate: float = 0.5
    kv_reuse_power: float = 1.0
    sim_slope: float = 0.3
    cdf_slope: float = 0.2
    pv_slope: float = 0.4
    pv_min: int = 5

    @classmethod
    def seed_constants(cls, **overrides) -> "SparsityConfig":
        """The seed implementation's hard-coded sampling constants (T0 = 1,
        kappa_T = 0.5, kappa_p = 0.3), for reproducing its numbers.

        Example:
            >>> SparsityConfig.seed_constants().T0
            1.0
        """
        values = dict(T0=1.0, kappa_T=0.5, kappa_p=0.3)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        o = "SparsityConfig"
        _check_real(o, "attention_sparsity", self.attention_sparsity, 0.0, 1.0)
        _check_real(o, "token_pruning_rate", self.token_pruning_rate, 0.0, 1.0)
        _check_real(o, "moe_expert_entropy", self.moe_expert_entropy, 0.0, 1.0)
        _check_real(o, "kv_reuse_ratio", self.kv_reuse_ratio, 0.0, 1.0)
        _check_choice(o, "temperature_schedule", self.temperature_schedule,
                      ("exponential", "constant"))
        _check_choice(o, "nucleus_adaptation", self.nucleus_adaptation, ("sigmoidal", "constant"))
        _check_real(o, "simthreshd1", self.simthreshd1, -1.0, 1.0)
        _check_real(o, "cdfthreshd", self.cdfthreshd, 0.0, 1.0, lo_open=True)
        _check_int(o, "pvthreshd", self.pvthreshd, 1)
        _check_real(o, "T0", self.T0, 0.0, lo_open=True)
        _check_real(o, "kappa_T", self.kappa_T, 0.0, 10.0)
        _check_real(o, "p0", self.p0, 0.0, 1.0, lo_open=True)
        _check_real(o, "kappa_p", self.kappa_p, 0.0)
        _check_real(o, "sigma_p", self.sigma_p, 0.0, lo_open=True)
        if self.K0 is not None:
            _check_int(o, "K0", self.K0, 1)
        _check_real(o, "kappa_K", self.kappa_K, 0.0)
        _check_real(o, "tau_K", self.tau_K, 0.0, lo_open=True)
        _check_real(o, "kappa_router", self.kappa_router, 0.0, 10.0)
        _check_choice(o, "attention_schedule", self.attention_schedule, ("monotone", "seed"))
        _check_real(o, "k0_frac", self.k0_frac, 0.0, 1.0, lo_open=True)
        _check_real(o, "k0", self.k0, 0.0)
        _check_real(o, "kappa_a", self.kappa_a, 0.0)
        _check_int(o, "head_dim", self.head_dim, 1)
        _check_real(o, "token_pruning_power", self.token_pruning_power, 0.0, lo_open=True)
        _check_real(o, "max_token_pruning_rate", self.max_token_pruning_rate, 0.0, 1.0,
                    hi_open=True)
        _check_real(o, "kv_reuse_power", self.kv_reuse_power, 0.0, lo_open=True)
        _check_real(o, "sim_slope", self.sim_slope, 0.0, 1.0)
        _check_real(o, "cdf_slope", self.cdf_slope, 0.0, 1.0, hi_open=True)
        _check_real(o, "pv_slope", self.pv_slope, 0.0, 1.0)
        _check_int(o, "pv_min", self.pv_min, 1)
        for name, default, why in _WITHOUT_EFFECT:
            if getattr(self, name) != default:
                warnings.warn(f"SparsityConfig.{name} has no effect: {why}", UserWarning,
                              stacklevel=3)


# Fields kept for the seed's signature (and the autotune cache keys) that no formula reads.
_WITHOUT_EFFECT = (
    ("moe_expert_entropy", 0.8, "MoE routing follows experts_per_token and router_temperature"),
    ("kv_reuse_ratio", 0.3, "refine always reuses the whole draft cache"),
    ("kv_reuse_power", 1.0, "refine always reuses the whole draft cache"),
)


@dataclass(frozen=True)
class QualityWeights:
    """Weights of ``Q(s) = alpha * Novelty + beta * Diversity - gamma * Incoherence``.

    Field names and defaults are the seed's: ``alpha`` (novelty, 0.4), ``beta``
    (diversity, 0.3), ``gamma`` (incoherence, subtracted, 0.3). Each is a finite
    number >= 0 and at least one is > 0. The read-only aliases ``novelty``,
    ``diversity`` and ``incoherence`` name what each weight multiplies.

    Example:
        >>> w = QualityWeights(alpha=0.5, beta=0.3, gamma=0.2)
        >>> w.novelty, w.incoherence
        (0.5, 0.2)
        >>> QualityWeights(0.0, 0.0, 0.0)
        Traceback (most recent call last):
        ...
        ValueError: QualityWeights: alpha, beta and gamma are all 0; at least one must be > 0
    """

    alpha: float = 0.4
    beta: float = 0.3
    gamma: float = 0.3

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            _check_real("QualityWeights", name, getattr(self, name), 0.0)
        if self.alpha == 0 and self.beta == 0 and self.gamma == 0:
            raise ValueError(
                "QualityWeights: alpha, beta and gamma are all 0; at least one must be > 0")

    @property
    def novelty(self) -> float:
        """Alias of ``alpha``, the novelty weight. Example: ``QualityWeights().novelty == 0.4``."""
        return self.alpha

    @property
    def diversity(self) -> float:
        """Alias of ``beta``, the diversity weight. Example: ``QualityWeights().diversity``."""
        return self.beta

    @property
    def incoherence(self) -> float:
        """Alias of ``gamma``: the weight subtracted for incoherence.

        Example: ``QualityWeights().incoherence == 0.3``.
        """
        return self.gamma


def as_quality_weights(value) -> QualityWeights:
    """``QualityWeights`` from any form the seed's API accepts.

    None (the defaults), a ``QualityWeights``, a dict of ``alpha``/``beta``/``gamma``
    or an ``(alpha, beta, gamma)`` tuple or list.

    Example:
        >>> as_quality_weights((0.5, 0.2, 0.3)).beta
        0.2
    """
    if value is None:
        return QualityWeights()
    if isinstance(value, QualityWeights):
        return value
    if isinstance(value, Mapping):
        return QualityWeights(**value)
    if isinstance(value, (tuple, list)) and len(value) == 3:
        return QualityWeights(*value)
    raise ValueError(f"quality_weights must be a QualityWeights, a dict of alpha/beta/gamma or "
                     f"an (alpha, beta, gamma) tuple, got {value!r}")
