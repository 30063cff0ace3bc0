"""Decoding strategies behind one interface, to compare them at equal cost.

Every strategy generates ``num_candidates`` continuations of one prompt with
:func:`~creative_sparse.generation.engine.generate` (same engine, same kernels)
and returns a :class:`StrategyResult`: the texts and what they cost (tokens,
FLOPs estimate, wall time, peak KV cache). The levels are levels of the dial
(:class:`~creative_sparse.control.SparsityController`):

* :class:`DenseTopP`: plain nucleus sampling, exact attention (the usual baseline).
* :class:`MinP`: min-p sampling, exact attention.
* :class:`Fixed`: every knob of the dial at one level ``s`` for the whole output.
* :class:`Progressive`: the level moves linearly from ``start`` to ``end`` over the
  output (explore early, settle late), in one pass and without selection.
* :class:`Adaptive`: the level follows the model's uncertainty, step by step: it
  rises above ``base`` while the next-token distributions are confident (mean
  entropy below ``target_entropy``, nats) and falls while they are not.
* :class:`MoEOnly`: only the MoE knobs of level ``s`` (more experts per token, router
  temperature); attention and sampling stay at the dense level. On a dense model
  it warns and decodes as :class:`Fixed` at ``s = 0`` whatever ``s``.
* :class:`CreativeSparse` (defined in
  :mod:`~creative_sparse.generation.creative_strategy`): diverge -> select -> refine -> screen -> rank
  (:func:`~creative_sparse.generation.creative.diverge_refine`, with the collaborators
  the strategy owns: quality functional, controller, safety checker and gate); it
  returns ``num_candidates`` refined candidates (chosen from ``num_candidates /
  keep_fraction`` drafts), and its cost includes the reference row and the scoring;
  :meth:`CreativeSparse.candidates` returns the full
  :class:`~creative_sparse.generation.creative.CreativeResult`.
  :class:`~creative_sparse.generation.wrapper.CreativeSparseWrapper`, the seed's API,
  is a facade over this strategy (this module never imports the wrapper).

Example:
    >>> from creative_sparse.generation.strategies import Fixed
    >>> result = Fixed(0.5).generate(model, tokenizer, "A haiku about rain.",
    ...                              num_candidates=4, max_new_tokens=40)  # doctest: +SKIP
    >>> result.texts, result.stats.wall_time                               # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..config import SparsityConfig
from ..control import SparsityController, check_level
from ..models.attention_knobs import AttentionKnobs
from ..models.moe import num_experts
from ..safety import DEFAULT_SAFETY_GATE, check_gate, check_gate_value
from .creative_strategy import CreativeSparse
from .engine import generate
from .knobs import SamplingParams, dial_knobs
from .prompts import prompt_ids
from .strategy_result import StrategyResult

__all__ = ["Adaptive", "CreativeSparse", "DenseTopP", "Fixed", "MinP", "MoEOnly",
           "Progressive", "StrategyResult"]


def _prompt_ids(tokenizer, prompt) -> torch.Tensor:
    """``[1, L]`` ids: a tensor as is; a string or chat messages through the chat template
    when there is one (:func:`~creative_sparse.generation.prompts.prompt_ids`)."""
    if isinstance(prompt, torch.Tensor):
        return prompt
    return prompt_ids(tokenizer, prompt)


def dense_model_message(name: str, sampling: SamplingParams) -> str:
    """Why MoE-Only does nothing on a dense model, and what it decodes as instead."""
    return (f"{name}: the model has no MoE layers, so no knob of MoE-Only applies; it "
            f"decodes as the dense level whatever the level (temperature "
            f"{sampling.temperature:g}, top-p {sampling.top_p:g}, exact attention). Use an "
            f"MoE model (e.g. Mixtral, Qwen-MoE) to measure it")


def _seeds(seed: int, n: int) -> list[int]:
    return [int(seed) * 1000 + i for i in range(n)]


@dataclass(frozen=True)
class _Strategy:
    """Shared driver: subclasses give the schedule (and may watch the logits).

    The gate: a strategy whose level (``top_level``) is above ``safety_gate``
    (default 0.8) raises :class:`~creative_sparse.safety.HighSparsityError` unless
    ``allow_high_sparsity=True``: its outputs go to the caller unchecked."""

    config: SparsityConfig | None = field(default=None, kw_only=True)
    safety_gate: float = field(default=DEFAULT_SAFETY_GATE, kw_only=True)
    allow_high_sparsity: bool = field(default=False, kw_only=True)

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def top_level(self) -> float | None:
        """The highest sparsity level the outputs are generated at (None: not the dial)."""
        return None

    def schedule(self, model, seeds: list[int], max_new_tokens: int):
        raise NotImplementedError

    def generate(self, model, tokenizer, prompt, *, num_candidates: int = 5,
                 max_new_tokens: int = 120, seed: int = 0,
                 logits_processor=None) -> StrategyResult:
        """``num_candidates`` continuations of ``prompt``: a string, chat messages
        (:mod:`~creative_sparse.generation.prompts`) or ids ``[1, L]``;
        ``logits_processor``: one or a list, transformers' convention or ours (see
        :mod:`~creative_sparse.generation.processors`), applied at every step."""
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) \
                or num_candidates < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
        if self.top_level is not None:
            check_gate(self.top_level, check_gate_value(self.safety_gate),
                       self.allow_high_sparsity, self.name)
        seeds = _seeds(seed, num_candidates)
        schedule, probe = self.schedule(model, seeds, max_new_tokens)
        extra = [] if logits_processor is None else (
            list(logits_processor) if isinstance(logits_processor, (list, tuple))
            else [logits_processor])
        hooks = ([probe] if probe is not None else []) + extra
        result = generate(model, tokenizer, _prompt_ids(tokenizer, prompt),
                          num_rows=num_candidates, max_new_tokens=max_new_tokens,
                          schedule=schedule, seeds=seeds, logit_processor=hooks or None)
        return StrategyResult(self.name, result.texts, result.stats)


@dataclass(frozen=True)
class DenseTopP(_Strategy):
    """Plain nucleus sampling with exact attention (the usual baseline)."""

    top_p: float = 0.9
    temperature: float = 1.0

    def schedule(self, model, seeds, max_new_tokens):
        return (SamplingParams(temperature=self.temperature, top_p=self.top_p),
                AttentionKnobs()), None


@dataclass(frozen=True)
class MinP(_Strategy):
    """Min-p sampling with exact attention."""

    min_p: float = 0.1
    temperature: float = 1.0

    def schedule(self, model, seeds, max_new_tokens):
        return (SamplingParams(temperature=self.temperature, min_p=self.min_p),
                AttentionKnobs()), None


@dataclass(frozen=True)
class Fixed(_Strategy):
    """Every knob of the dial at ``level`` for the whole output, one sub-network per row."""

    level: float = 0.5

    def __post_init__(self):
        check_level(self.level)

    @property
    def name(self) -> str:
        return f"Fixed({self.level:g})"

    @property
    def top_level(self) -> float:
        return self.level

    def schedule(self, model, seeds, max_new_tokens):
        return dial_knobs(SparsityController(self.config), model, self.level, seeds), None


@dataclass(frozen=True)
class Progressive(_Strategy):
    """The level moves linearly from ``start`` (first token) to ``end`` (last token)."""

    start: float = 0.7
    end: float = 0.3

    def __post_init__(self):
        check_level(self.start)
        check_level(self.end)

    @property
    def name(self) -> str:
        return f"Progressive({self.start:g}->{self.end:g})"

    @property
    def top_level(self) -> float:
        return max(self.start, self.end)

    def schedule(self, model, seeds, max_new_tokens):
        controller = SparsityController(self.config)
        last = max(1, max_new_tokens - 1)
        # The dial moves in 1% steps, so a schedule of 100s of steps is a handful of levels.
        cache: dict[float, tuple] = {}

        def at(step: int):
            s = round(self.start + (self.end - self.start) * min(step, last) / last, 2)
            if s not in cache:
                cache[s] = dial_knobs(controller, model, s, seeds)
            return cache[s]
        return at, None


class _EntropyProbe:
    """A logit processor that only watches: the mean entropy (nats) of the rows'
    next-token distributions at the last step."""

    def __init__(self):
        self.entropy: float | None = None

    def __call__(self, step, generated, logits):
        logp = torch.log_softmax(logits.float(), dim=-1)
        terms = torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp))
        self.entropy = float(-terms.sum(dim=-1).mean())
        return logits


@dataclass(frozen=True)
class Adaptive(_Strategy):
    """The level at each step is ``base + gain * (target_entropy - H)``, clipped to
    [0, 1], where ``H`` is the rows' mean next-token entropy (nats) at the last step:
    confident steps explore more, uncertain ones stay closer to dense. Without
    ``allow_high_sparsity`` the level is also capped at ``safety_gate``."""

    base: float = 0.5
    target_entropy: float = 2.0
    gain: float = 0.15

    def __post_init__(self):
        check_level(self.base)
        if not (math.isfinite(self.target_entropy) and self.target_entropy > 0
                and math.isfinite(self.gain) and self.gain >= 0):
            raise ValueError(f"Adaptive: target_entropy must be > 0 and gain >= 0, got "
                             f"{self.target_entropy!r}, {self.gain!r}")

    @property
    def top_level(self) -> float:
        return self.base

    def schedule(self, model, seeds, max_new_tokens):
        controller = SparsityController(self.config)
        probe = _EntropyProbe()
        cache: dict[float, tuple] = {}

        def at(step: int):
            error = 0.0 if probe.entropy is None else self.target_entropy - probe.entropy
            top = 1.0 if self.allow_high_sparsity else max(self.safety_gate, self.base)
            s = round(min(top, max(0.0, self.base + self.gain * error)), 2)
            if s not in cache:
                cache[s] = dial_knobs(controller, model, s, seeds)
            return cache[s]
        return at, probe


@dataclass(frozen=True)
class MoEOnly(_Strategy):
    """Only the MoE knobs of ``level`` (experts per token, router temperature); exact
    attention and the dense level's sampling. On a model without MoE layers no knob
    applies: it warns, and decodes as the dense level whatever ``level``."""

    level: float = 0.7

    def __post_init__(self):
        check_level(self.level)

    @property
    def name(self) -> str:
        return f"MoEOnly({self.level:g})"

    @property
    def top_level(self) -> float:
        return self.level

    def schedule(self, model, seeds, max_new_tokens):
        controller = SparsityController(self.config)
        dense_sampling, _ = dial_knobs(controller, model, 0.0)
        if num_experts(model) is None:
            warnings.warn(dense_model_message(self.name, dense_sampling), UserWarning,
                          stacklevel=3)
        _, knobs = dial_knobs(controller, model, self.level)
        return (dense_sampling, AttentionKnobs(experts_per_token=knobs.experts_per_token,
                                               router_temperature=knobs.router_temperature)), None
