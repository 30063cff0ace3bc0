"""The dial: the control manifold M(s) and :class:`SparsityController`.

Every knob is a pure function of the sparsity level ``s`` in [0, 1] (0 = the
dense model, 1 = the sparsest), clamped to its valid range. The keyword
defaults of each function equal the :class:`~creative_sparse.config.SparsityConfig`
defaults; :class:`SparsityController` only reads its config and bundles the
knobs into one frozen :class:`SparsityParams`.

Attention has two schedules. The seed's ``k_attn(s) = k0 + kappa_a * s * d *
sqrt(1 - s^2)`` (``schedule="seed"``, :func:`seed_k_attn`) is a number of keys per
query that adds nothing at s = 0 and at s = 1 and peaks at s = 1/sqrt(2) ~ 0.71:
not monotone in s. The default ``schedule="monotone"`` (:func:`keep_fraction`) is
the fraction of keys attended, 1.0 (dense) at s = 0 falling to ``k0_frac`` at s = 1.

    >>> params = SparsityController().get_sparsity_params(0.7, context_len=1000)
    >>> params.keep_fraction > 0.7, params.attention_keys
    (True, 729)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .config import SparsityConfig

__all__ = [
    "SparsityController", "SparsityParams", "attention_keys", "check_level",
    "cache_budget", "experts_per_token", "keep_fraction", "kernel_thresholds",
    "router_temperature", "seed_k_attn", "temperature", "token_pruning_rate", "top_p",
]


def check_level(s: Any) -> float:
    """Return ``s`` as a float, or raise ValueError unless it is a real number in [0, 1].

    Example:
        >>> check_level(0.25)
        0.25
        >>> check_level(1.1)
        Traceback (most recent call last):
        ...
        ValueError: sparsity level s = 1.1 is outside the allowed range [0, 1]
    """
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise ValueError(f"sparsity level s = {s!r} is not a real number in the range [0, 1]")
    s = float(s)
    if not 0.0 <= s <= 1.0:  # also rejects NaN
        raise ValueError(f"sparsity level s = {s!r} is outside the allowed range [0, 1]")
    return s


def _check_count(name: str, value: Any, lo: int = 1, hi: Optional[int] = None) -> int:
    bad_type = isinstance(value, bool) or not isinstance(value, numbers.Integral)
    if bad_type or value < lo or (hi is not None and value > hi):
        allowed = f"[{lo}, {hi}]" if hi is not None else f"[{lo}, inf)"
        raise ValueError(f"{name} = {value!r} is not an integer in the allowed range {allowed}")
    return int(value)


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even, which would make K(s) step unevenly.
    return math.floor(x + 0.5)


def temperature(s: float, *, T0: float = 0.8, kappa_T: float = 0.4,
                schedule: str = "exponential") -> float:
    """Sampling temperature ``T(s) = T0 * exp(kappa_T * s * (1 - s/2))``, in [T0, T0*e^(kappa_T/2)].

    Rises with s and flattens at s = 1. ``schedule="constant"`` returns ``T0``.

    Example:
        >>> temperature(0.0), round(temperature(1.0), 4)
        (0.8, 0.9771)
    """
    s = check_level(s)
    if schedule == "constant":
        return float(T0)
    return T0 * math.exp(kappa_T * s * (1.0 - s / 2.0))


def top_p(s: float, *, p0: float = 0.9, kappa_p: float = 0.1, sigma_p: float = 0.5,
          schedule: str = "sigmoidal") -> float:
    """Nucleus mass ``p(s) = p0 + kappa_p * s * tanh(s / sigma_p)``, clamped to (0, 1].

    ``schedule="constant"`` returns ``p0``.

    Example:
        >>> top_p(0.0), round(top_p(0.3), 4), round(top_p(1.0), 4)
        (0.9, 0.9161, 0.9964)
    """
    s = check_level(s)
    p = p0 if schedule == "constant" else p0 + kappa_p * s * math.tanh(s / sigma_p)
    return min(1.0, max(p, math.ulp(0.0)))


def experts_per_token(s: float, num_experts: int, *, K0: int = 1, kappa_K: float = 0.4,
                      tau_K: float = 0.3) -> int:
    """MoE experts per token ``K(s) = K0 + kappa_K * s * E * (1 - exp(-s / tau_K))``.

    Rounded half up and clamped to [1, E], where ``E = num_experts``. ``K0`` is
    usually the model's own experts per token (the seed used 1).

    Example:
        >>> [experts_per_token(s, 8, K0=2) for s in (0.0, 0.7, 1.0)], experts_per_token(1.0, 8)
        ([2, 4, 5], 4)
    """
    s = check_level(s)
    e = _check_count("num_experts", num_experts)
    k = K0 + kappa_K * s * e * (1.0 - math.exp(-s / tau_K))
    return min(e, max(1, _round_half_up(k)))


def router_temperature(s: float, *, kappa_router: float = 0.5) -> float:
    """MoE router softmax temperature ``exp(kappa_router * s)``: 1.0 at s = 0, rising with s.

    Example:
        >>> router_temperature(0.0), round(router_temperature(1.0), 4)
        (1.0, 1.6487)
    """
    return math.exp(kappa_router * check_level(s))


def keep_fraction(s: float, *, k0_frac: float = 0.05) -> float:
    """Monotone schedule, the fraction of keys attended: ``k0_frac + (1-k0_frac) * sqrt(1 - s^2)``.

    1.0 (dense) at s = 0, non-increasing, ``k0_frac`` at s = 1; the drop is steepest
    near s = 1. Also the kernel's top-k fraction.

    Example:
        >>> keep_fraction(0.0), round(keep_fraction(0.6), 2), keep_fraction(1.0)
        (1.0, 0.81, 0.05)
    """
    s = check_level(s)
    frac = k0_frac + (1.0 - k0_frac) * math.sqrt(max(0.0, 1.0 - s * s))
    return min(1.0, max(k0_frac, frac))


def seed_k_attn(s: float, *, head_dim: int = 64, k0: float = 1.0, kappa_a: float = 0.2) -> float:
    """The seed's keys per query ``k_attn(s) = k0 + kappa_a * s * d * sqrt(1 - s^2)``.

    Kept for fidelity (``attention_schedule="seed"``); it is ``k0`` at both s = 0
    and s = 1 and peaks at s = 1/sqrt(2) with ``k0 + kappa_a * d / 2``.

    Example:
        >>> seed_k_attn(0.0), seed_k_attn(1.0), round(seed_k_attn(2 ** -0.5), 6)
        (1.0, 1.0, 7.4)
    """
    s = check_level(s)
    d = _check_count("head_dim", head_dim)
    return k0 + kappa_a * s * d * math.sqrt(max(0.0, 1.0 - s * s))


def attention_keys(s: float, context_len: int, *, schedule: str = "monotone",
                   k0_frac: float = 0.05, head_dim: int = 64, k0: float = 1.0,
                   kappa_a: float = 0.2) -> int:
    """Keys each query attends to out of ``context_len``, in [1, context_len].

    ``schedule="monotone"``: ``ceil(keep_fraction(s) * context_len)``.
    ``schedule="seed"``: ``seed_k_attn(s)`` rounded half up.

    Example:
        >>> [attention_keys(s, 4096) for s in (0.0, 1.0)], attention_keys(.7, 4096, schedule="seed")
        ([4096, 205], 7)
    """
    n = _check_count("context_len", context_len)
    if schedule == "monotone":
        # The epsilon keeps float noise in frac * n from adding a key.
        keys = math.ceil(keep_fraction(s, k0_frac=k0_frac) * n - 1e-9)
    elif schedule == "seed":
        keys = _round_half_up(seed_k_attn(s, head_dim=head_dim, k0=k0, kappa_a=kappa_a))
    else:
        raise ValueError(f"schedule = {schedule!r} is not one of ('monotone', 'seed')")
    return min(n, max(1, keys))


def token_pruning_rate(s: float, *, rate: float = 0.4, power: float = 1.5,
                       cap: float = 0.5) -> float:
    """Fraction of cached tokens that may be evicted: ``min(cap, rate * s**power)``.

    0 at s = 0, non-decreasing, never above ``cap``.

    Example:
        >>> token_pruning_rate(0), round(token_pruning_rate(.7), 4), token_pruning_rate(1, rate=.9)
        (0.0, 0.2343, 0.5)
    """
    s = check_level(s)
    return min(cap, rate * s ** power)


def cache_budget(pruning_rate: float, context_tokens: int, *, prune_from: int = 512,
                 protected: int = 36) -> Optional[int]:
    """Most tokens a row's KV cache may hold under token pruning, or None (no bound).

    ``ceil((1 - pruning_rate) * context_tokens)``, at least ``protected + 1`` (the
    sinks and recent window that eviction always keeps, plus one). None when
    ``pruning_rate`` is 0 or the context is shorter than ``prune_from`` tokens: a
    short cache costs little memory, and the attention mass that decides what to
    evict is measured over too few queries to be trusted.

    Example:
        >>> cache_budget(0.0, 4000), cache_budget(0.3, 400), cache_budget(0.3, 1000)
        (None, None, 700)
    """
    if not 0.0 <= pruning_rate <= 1.0:
        raise ValueError(f"pruning_rate must be in [0, 1], got {pruning_rate!r}")
    n = _check_count("context_tokens", context_tokens)
    if pruning_rate == 0.0 or n < prune_from:
        return None
    return max(protected + 1, math.ceil((1.0 - pruning_rate) * n - 1e-9))


def kernel_thresholds(s: float, *, simthreshd1: float = 0.6, cdfthreshd: float = 0.97,
                      pvthreshd: int = 15, sim_slope: float = 0.3, cdf_slope: float = 0.2,
                      pv_slope: float = 0.4, pv_min: int = 5) -> tuple[float, float, int]:
    """SpargeAttn thresholds at level s: ``(simthreshd1(s), cdfthreshd(s), pvthreshd(s))``.

    ``simthreshd1 * (1 - sim_slope*s)``, ``cdfthreshd * (1 - cdf_slope*s)`` and
    ``max(min(pv_min, pvthreshd), int(pvthreshd * (1 - pv_slope*s)))``. All three fall
    with s, and each fall makes the kernel skip more. The pv floor never exceeds
    the s = 0 value, so s = 0 always returns the base thresholds.

    Example:
        >>> kernel_thresholds(0.0)
        (0.6, 0.97, 15)
        >>> tuple(round(x, 3) for x in kernel_thresholds(1.0))
        (0.42, 0.776, 9)
    """
    s = check_level(s)
    sim = simthreshd1 * (1.0 - sim_slope * s)
    cdf = min(1.0, cdfthreshd * (1.0 - cdf_slope * s))
    pv = max(min(pv_min, pvthreshd), int(pvthreshd * (1.0 - pv_slope * s)))
    return sim, cdf, pv


_SEED_KEYS = {
    "nucleus_threshold": "top_p",
    "expert_activation": "experts_per_token",
    "attention_scaling": "k_attn_seed",
}


@dataclass(frozen=True, repr=False)
class SparsityParams:
    """Every knob at one level ``s``, from :meth:`SparsityController.get_sparsity_params`.

    Fields: ``s``; ``temperature``; ``top_p``; ``experts_per_token`` and
    ``router_temperature`` (None unless the model is MoE); ``attention_schedule``;
    ``keep_fraction`` (fraction of keys attended; None for the seed schedule
    without ``context_len``); ``attention_keys`` (None without ``context_len``);
    ``k_attn_seed`` (the seed's k_attn, always reported); ``token_pruning_rate``
    (see :func:`cache_budget`); ``simthreshd1``, ``cdfthreshd``, ``pvthreshd``.

    Where each is applied: ``docs/architecture.md``, section 4. The seed config's
    ``kv_reuse_ratio`` has no output here: refine reuses the whole draft cache.

    ``params["temperature"]`` also works, with the seed's dict keys
    ``nucleus_threshold``, ``expert_activation`` and ``attention_scaling`` as aliases
    (``params["expert_activation"]`` of a dense model is the seed's K(s) for 8
    experts, as the seed reported it; the attribute stays None).

    Example:
        >>> p = SparsityController().get_sparsity_params(0.0)
        >>> p.temperature, p["nucleus_threshold"], p.keep_fraction, p.token_pruning_rate
        (0.8, 0.9, 1.0, 0.0)
    """

    s: float
    temperature: float
    top_p: float
    experts_per_token: Optional[int]
    router_temperature: Optional[float]
    attention_schedule: str
    keep_fraction: Optional[float]
    attention_keys: Optional[int]
    k_attn_seed: float
    token_pruning_rate: float
    simthreshd1: float
    cdfthreshd: float
    pvthreshd: int

    def as_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (a copy). Example: ``params.as_dict()["top_p"]``."""
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        try:
            value = getattr(self, _SEED_KEYS.get(key, key))
        except AttributeError:
            raise KeyError(key) from None
        if key == "expert_activation" and value is None:
            # Seed code formats this as an int for any model: the seed's K(s) with E = 8.
            value = experts_per_token(self.s, 8, K0=1)
        return value

    def __repr__(self) -> str:
        parts = []
        for name, value in asdict(self).items():
            if value is None:
                continue
            parts.append(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value!r}")
        return f"SparsityParams({', '.join(parts)})"


class SparsityController:
    """Maps the sparsity level s to every knob, with the constants of one :class:`SparsityConfig`.

    ``config=None`` uses ``SparsityConfig()``. The seed's per-knob methods
    (``get_temperature``, ``get_nucleus_threshold``, ``get_expert_activation``,
    ``get_attention_scaling``) are kept for seed code.

    Example:
        >>> ctl = SparsityController(SparsityConfig(kappa_T=1.0))
        >>> p = ctl.get_sparsity_params(0.7, num_experts=8, default_experts=2, context_len=512)
        >>> p.experts_per_token, p.attention_keys, p.pvthreshd
        (4, 373, 10)
    """

    def __init__(self, config: Optional[SparsityConfig] = None) -> None:
        if config is None:
            config = SparsityConfig()
        if not isinstance(config, SparsityConfig):
            raise ValueError(f"config = {config!r} is not a SparsityConfig")
        self.config = config

    def __repr__(self) -> str:
        return f"SparsityController({self.config!r})"

    def get_sparsity_params(self, s: float, *, num_experts: Optional[int] = None,
                            default_experts: Optional[int] = None,
                            context_len: Optional[int] = None,
                            head_dim: Optional[int] = None) -> SparsityParams:
        """Every knob at level ``s`` in [0, 1] as one frozen :class:`SparsityParams`.

        Args:
            s: sparsity level; 0 = dense model, 1 = sparsest.
            num_experts: E, the routed experts of an MoE model; None (not MoE)
                leaves ``experts_per_token`` and ``router_temperature`` None.
            default_experts: the model's own experts per token, in [1, E]; the K0
                of K(s) unless ``config.K0`` is set (else K0 = 1). Needs ``num_experts``.
            context_len: keys in the context; gives ``attention_keys`` (and the
                keep fraction of the seed schedule).
            head_dim: d of the seed's k_attn; None uses ``config.head_dim``.

        Example:
            >>> SparsityController().get_sparsity_params(1.0, context_len=100).attention_keys
            5
        """
        s = check_level(s)
        c = self.config
        k_experts = router_t = None
        if num_experts is not None:
            e = _check_count("num_experts", num_experts)
            if default_experts is not None:
                _check_count("default_experts", default_experts, 1, e)
            k0 = c.K0 if c.K0 is not None else (default_experts or 1)
            k_experts = experts_per_token(s, e, K0=k0, kappa_K=c.kappa_K, tau_K=c.tau_K)
            router_t = router_temperature(s, kappa_router=c.kappa_router)
        elif default_experts is not None:
            raise ValueError(f"default_experts = {default_experts!r} needs num_experts "
                             f"(the model's number of routed experts)")
        d = c.head_dim if head_dim is None else _check_count("head_dim", head_dim)
        keys = None
        if context_len is not None:
            keys = attention_keys(s, context_len, schedule=c.attention_schedule,
                                  k0_frac=c.k0_frac, head_dim=d, k0=c.k0, kappa_a=c.kappa_a)
        if c.attention_schedule == "monotone":
            frac: Optional[float] = keep_fraction(s, k0_frac=c.k0_frac)
        else:
            frac = None if keys is None else keys / context_len
        sim, cdf, pv = kernel_thresholds(
            s, simthreshd1=c.simthreshd1, cdfthreshd=c.cdfthreshd, pvthreshd=c.pvthreshd,
            sim_slope=c.sim_slope, cdf_slope=c.cdf_slope, pv_slope=c.pv_slope, pv_min=c.pv_min)
        return SparsityParams(
            s=s, temperature=self.get_temperature(s), top_p=self.get_nucleus_threshold(s),
            experts_per_token=k_experts, router_temperature=router_t,
            attention_schedule=c.attention_schedule, keep_fraction=frac, attention_keys=keys,
            k_attn_seed=self.get_attention_scaling(s, head_dim=d),
            token_pruning_rate=token_pruning_rate(
                s, rate=c.token_pruning_rate, power=c.token_pruning_power,
                cap=c.max_token_pruning_rate),
            simthreshd1=sim, cdfthreshd=cdf, pvthreshd=pv,
        )

    def get_temperature(self, sparsity: float) -> float:
        """Seed method: T(s). Example: ``SparsityController().get_temperature(0.0) == 1.0``."""
        c = self.config
        return temperature(sparsity, T0=c.T0, kappa_T=c.kappa_T, schedule=c.temperature_schedule)

    def get_nucleus_threshold(self, sparsity: float) -> float:
        """Seed method: p(s), clamped to (0, 1]. Example: ``ctl.get_nucleus_threshold(1) == 1``."""
        c = self.config
        return top_p(sparsity, p0=c.p0, kappa_p=c.kappa_p, sigma_p=c.sigma_p,
                     schedule=c.nucleus_adaptation)

    def get_expert_activation(self, sparsity: float, num_experts: int = 8) -> int:
        """Seed method: K(s), K0 = config.K0 or 1. Example: ``ctl.get_expert_activation(1) == 4``"""
        c = self.config
        return experts_per_token(sparsity, num_experts, K0=c.K0 or 1, kappa_K=c.kappa_K,
                                 tau_K=c.tau_K)

    def get_attention_scaling(self, sparsity: float, head_dim: Optional[int] = None) -> float:
        """Seed method: the seed's k_attn(s); ``head_dim=None`` uses ``config.head_dim`` (64).

        Example: ``SparsityController().get_attention_scaling(0.0) == 1.0``.
        """
        c = self.config
        d = c.head_dim if head_dim is None else head_dim
        return seed_k_attn(sparsity, head_dim=d, k0=c.k0, kappa_a=c.kappa_a)
