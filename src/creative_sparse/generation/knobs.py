"""Sampling as small pure functions of logits.

The order, applied by :func:`sample` to ``[N, vocab]`` logits:

1. logit masks from constraints (banned tokens at ``-inf``), applied by the caller;
2. temperature: ``logits / T`` (``T == 0`` means greedy: the argmax, nothing else);
3. top-k: keep the ``k`` largest (``k == 0`` disables);
4. top-p (nucleus): keep the smallest set of most probable tokens whose mass
   reaches ``p`` (``p == 1`` disables);
5. min-p: drop tokens whose probability is below ``min_p`` times the top one
   (``min_p == 0`` disables);
6. draw one token per row from the renormalised distribution (inverse CDF of one
   uniform number per row), each row with its own ``torch.Generator``
   (reproducible per row, whatever the other rows do).

:func:`sample_coded` draws step 6 from given numbers instead (arithmetic sampling:
a set of rows whose numbers are spread evenly over [0, 1) covers the distribution
instead of repeating its mode, while each row alone is still an exact draw).

The most probable token always survives every filter, so a row never ends up
with an empty distribution (unless every logit was ``-inf`` to begin with,
which :func:`sample` reports as an error).

:func:`dial` bundles the dial's knobs at one level into :class:`Knobs` (sampling
and attention, MoE included), which exports its sampling part to a transformers
``GenerationConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..models.attention_knobs import AttentionKnobs, dial_params

__all__ = ["Knobs", "SamplingParams", "apply_temperature", "dial", "dial_knobs", "min_p_filter",
           "sample", "sample_coded", "sampling_probs", "stratified_codes", "top_k_filter",
           "top_p_filter"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs for one step; validated.

    Example:
        >>> SamplingParams(temperature=0.8, top_p=0.95).top_k
        0
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got "
                             f"{self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables), got {self.top_k!r}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")


@dataclass(frozen=True)
class Knobs:
    """Every knob of the dial at one level ``s``: sampling, and attention with the MoE
    routing (:class:`~creative_sparse.models.transformers.AttentionKnobs`).

    ``set_sparsity(model, knobs)`` applies the attention part to a transformers model;
    :meth:`generation_config` exports the sampling part.
    """

    s: float
    sampling: SamplingParams
    attention: AttentionKnobs

    @classmethod
    def from_params(cls, params, seeds: Sequence[int] | None = None) -> "Knobs":
        """From a :class:`~creative_sparse.control.SparsityParams` (the dial at one level);
        ``seeds`` give each batch row its attention sub-network."""
        return cls(params.s, SamplingParams(temperature=params.temperature, top_p=params.top_p),
                   AttentionKnobs.from_params(params, row_seeds=seeds))

    def generation_config(self, **overrides: Any):
        """The sampling knobs as a ``transformers.GenerationConfig`` for ``model.generate``.

        Every sampling field is set explicitly (``top_k=0``, ``min_p=0.0`` included), so
        the model's own generation defaults (transformers fills unset fields from them,
        e.g. ``top_k=50``) do not change the distribution. Temperature 0 is greedy
        (``do_sample=False``). ``overrides`` are further ``GenerationConfig`` fields
        (``max_new_tokens=...``).

        Example:
            >>> dial(0.5).generation_config(max_new_tokens=40).top_k     # doctest: +SKIP
            0
        """
        from transformers import GenerationConfig

        p = self.sampling
        fields: dict[str, Any] = dict(do_sample=p.temperature > 0, top_p=p.top_p, top_k=p.top_k,
                                      min_p=p.min_p)
        fields["temperature"] = p.temperature if p.temperature > 0 else 1.0
        fields.update(overrides)
        return GenerationConfig(**fields)


def dial(s: float, model=None, *, config=None, seeds: Sequence[int] | None = None) -> Knobs:
    """:class:`Knobs` of the dial at level ``s`` in [0, 1].

    Args:
        s: the sparsity level (0 = the dense model's knobs).
        model: a transformers model whose MoE routers set the expert knobs (E and its
            own experts per token); ``None``: no MoE knobs.
        config: a :class:`~creative_sparse.config.SparsityConfig` (default one).
        seeds: one attention sub-network seed per batch row (noise ``s``), or ``None``.

    Example:
        >>> knobs = dial(0.7)
        >>> knobs.sampling.temperature > dial(0.0).sampling.temperature
        True
        >>> knobs.attention.keep_fraction < 1.0
        True
    """
    from ..control import SparsityController, check_level

    return Knobs.from_params(dial_params(model, check_level(s), SparsityController(config)),
                             seeds)


def dial_knobs(controller, model, s: float,
               seeds: Sequence[int] | None = None) -> tuple[SamplingParams, AttentionKnobs]:
    """``(SamplingParams, AttentionKnobs)`` of every knob of the dial at level ``s`` for
    ``model`` (its MoE routers, if any, set the expert knobs); ``seeds`` give each
    row its attention sub-network. ``controller``: a
    :class:`~creative_sparse.control.SparsityController` (unlike :func:`dial`, which
    builds one from a config and checks ``s``)."""
    knobs = Knobs.from_params(dial_params(model, s, controller), seeds)
    return knobs.sampling, knobs.attention


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` (``temperature > 0``)."""
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set all but the ``k`` largest logits of each row to ``-inf`` (``k <= 0``: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most probable tokens whose probability mass reaches ``p``.

    The nucleus is found among the ``k`` most probable tokens, ``k`` = 64, 512, ...
    until their mass reaches ``p`` in every row, instead of sorting the whole
    vocabulary (a full sort of 49152 logits costs ~2 ms per row on a CPU).
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    vocab = logits.shape[-1]
    k = min(64, vocab)
    while True:
        top, order = torch.topk(probs, k, dim=-1)                 # most probable first
        before = torch.cumsum(top, dim=-1) - top                  # mass of the more probable
        if k == vocab or bool((before[..., -1] + top[..., -1] >= p).all()):
            break
        k = min(vocab, k * 8)
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most probable one's."""
    if min_p <= 0.0:
        return logits
    # p_i / p_max = exp(l_i - l_max): compare in log space.
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


def sampling_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution :func:`sample` draws from (steps 2-5; ``temperature > 0``):
    float32 ``[N, vocab]``, each row summing to 1."""
    _check_logits(logits)
    if params.temperature == 0:
        raise ValueError("temperature 0 is greedy: there is no distribution to draw from")
    logits = apply_temperature(logits.float(), params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return torch.softmax(logits, dim=-1)


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, vocab], got shape {tuple(logits.shape)}")
    if bool((logits == float("-inf")).all(dim=-1).any()):
        raise ValueError("a row has every token masked (all logits are -inf): the constraints "
                         "leave nothing to sample")


def sample(logits: Tensor, params: SamplingParams,
           generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """One token per row of ``[N, vocab]`` logits; returns int64 ``[N]``.

    ``generators`` (one per row) make each row reproducible on its own.

    Example:
        >>> logits = torch.tensor([[0.0, 3.0, 1.0]])
        >>> sample(logits, SamplingParams(temperature=0)).tolist()
        [1]
    """
    _check_logits(logits)
    if generators is not None and len(generators) != logits.shape[0]:
        raise ValueError(f"need one generator per row: {logits.shape[0]} rows, "
                         f"{len(generators)} generators")
    if params.temperature == 0:
        return logits.float().argmax(dim=-1)
    return _draw(sampling_probs(logits, params), generators)


def stratified_codes(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` numbers ``(i / n + U) mod 1`` for one uniform ``U``: float64 ``[n]``, evenly
    spread over [0, 1) and each one alone uniform (the codes of arithmetic sampling)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    offset = torch.rand(1, generator=generator, dtype=torch.float64)
    return torch.remainder(torch.arange(n, dtype=torch.float64) / n + offset, 1.0)


def sample_coded(probs: Tensor, codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step of arithmetic sampling (Vilnis et al., ICML 2023): each row's token is
    the one whose interval of the CDF (vocabulary order) holds the row's code, and the
    code is rescaled to its place inside that interval, uniform again for the next step.

    Args:
        probs: ``[N, vocab]`` distributions (:func:`sampling_probs`).
        codes: float64 ``[N]`` in [0, 1) (:func:`stratified_codes`, then this
            function's own output).

    Returns:
        ``(tokens int64 [N], next codes float64 [N], bits float64 [N])``: ``bits`` is
        ``-log2`` of each chosen token's probability, the precision the code spent
        (a float64 code holds about 52 bits; past that it is rounding noise).

    Example:
        >>> probs = torch.tensor([[0.5, 0.25, 0.25]]).repeat(4, 1)
        >>> tokens, _, _ = sample_coded(probs, torch.tensor([0.1, 0.35, 0.6, 0.85],
        ...                                                 dtype=torch.float64))
        >>> tokens.tolist()
        [0, 0, 1, 2]
    """
    if probs.dim() != 2 or codes.shape != probs.shape[:1]:
        raise ValueError(f"need probs [N, vocab] and codes [N], got {tuple(probs.shape)} and "
                         f"{tuple(codes.shape)}")
    p = probs.double()
    cdf = torch.cumsum(p, dim=-1)
    target = codes.to(cdf.device).view(-1, 1) * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=p.shape[-1] - 1)
    picked = p.gather(-1, index)
    # rounding can land on a zero-probability token at an interval's edge: step back
    # to the last token with mass at or below it
    if bool((picked <= 0).any()):
        nonzero = torch.where(p > 0, torch.arange(p.shape[-1], device=p.device), -1)
        last = torch.cummax(nonzero, dim=-1).values.gather(-1, index)
        index = torch.where(picked > 0, index, last.clamp(min=0))
        picked = p.gather(-1, index)
    low = cdf.gather(-1, index) - picked
    code = ((target - low) / picked).clamp_(0.0, 1.0 - 2.0 ** -53)
    return index.squeeze(-1), code.squeeze(-1).cpu(), -torch.log2(picked).squeeze(-1).cpu()


def _draw(probs: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
    """One index per row of ``probs`` by inverse CDF: one uniform number per row (from
    the row's generator), so the cost is a cumulative sum, not a random draw per token."""
    if generators is None:
        u = torch.rand(probs.shape[0], 1)
    else:
        u = torch.cat([torch.rand(1, generator=g) for g in generators]).view(-1, 1)
    cdf = torch.cumsum(probs, dim=-1)
    # First token whose cumulative mass exceeds u * total: never a zero-probability one.
    index = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True)
    index = index.clamp_(max=probs.shape[-1] - 1).squeeze(-1)
    picked = probs.gather(-1, index.view(-1, 1)).squeeze(-1)
    return torch.where(picked > 0, index, probs.argmax(dim=-1))
