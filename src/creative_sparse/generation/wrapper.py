"""`CreativeSparseWrapper`: the seed's API for Creative-Sparse, a thin facade over the strategy.

The algorithm (reference, diverge, select, refine, screen, rank; the gate on the
levels) is :func:`~creative_sparse.generation.creative.diverge_refine`, owned by the
strategy :class:`~creative_sparse.generation.strategies.CreativeSparse`, one strategy
among the others. The wrapper keeps the seed's names and signatures on top of it: its
constructor checks the settings (through the strategy), loads the model, builds the
quality functional and one ``CreativeSparse`` that shares it; ``generate_candidates``,
``generate_creative``, ``knobs``, ``greedy_reference`` and ``prompt_ids`` delegate.
Its settings (``sparsity_schedule``, ``quality``, ``safety``, ``safety_gate``,
``allow_high_sparsity``, ``safety_repairs``, ``safety_timeout``, ``draft_fraction``,
``keep_fraction``) read from the strategy, and assigning one replaces the strategy
with the new value (checked as at construction).

The names that used to live here are re-exported, so old imports keep working:
:class:`Candidate`, :class:`CreativeResult` (from
:mod:`~creative_sparse.generation.creative`), :func:`build_constraints` (from
:mod:`~creative_sparse.generation.constraint_spec`), :func:`dial_knobs` (from
:mod:`~creative_sparse.generation.knobs`).

Example:
    >>> wrapper = CreativeSparseWrapper()                          # doctest: +SKIP
    >>> wrapper.generate_creative("Write a haiku about rain.", max_length=60,
    ...                           num_candidates=4, seed=1)        # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Sequence

import torch

from ..attention import sparse_attention
from ..config import QualityWeights, SparsityConfig
from ..control import SparsityController
from ..quality import QualityFunctional
from ..safety import DEFAULT_SAFETY_GATE
# Candidate, CreativeResult, build_constraints and dial_knobs lived here before the
# algorithm moved to the strategies layer: re-exported for old imports.
from .constraint_spec import build_constraints
from .creative import Candidate, CreativeResult, greedy_reference
from .creative_strategy import DEFAULT_SCHEDULE
from .knobs import dial_knobs
from .prompts import Prompt, prompt_ids
from .strategies import CreativeSparse

__all__ = ["Candidate", "CreativeResult", "CreativeSparseWrapper", "build_constraints",
           "dial_knobs"]


def _setting(name: str, doc: str) -> property:
    """A wrapper attribute that reads the strategy's field ``name``; assigning it
    replaces the strategy (checked again, the quality functional kept)."""
    def get(self):
        return getattr(self.strategy, name)

    def set_(self, value):
        self.strategy = replace(self.strategy, **{name: value})
    return property(get, set_, doc=doc)


class CreativeSparseWrapper:
    """Creative-Sparse generation over one model (see the module docstring).

    Args:
        model_name: anything :func:`creative_sparse.models.load_model` accepts.
        sparsity_schedule: ``(diverge, refine)`` levels in [0, 1], refine <= diverge;
            default ``(0.3, 0.3)``, the best measured setting (``DEFAULT_SCHEDULE``:
            higher diverge levels add diversity on poetry but cost relevance on
            creative writing; ``docs/evaluation.md``).
        quality_weights: alpha, beta, gamma of Q: a ``QualityWeights`` or an
            ``(alpha, beta, gamma)`` tuple as in the seed's quick start (default
            ``QualityWeights()``).
        sparsity_config: constants of the dial (default ``SparsityConfig()``).
        model, tokenizer: an already loaded pair instead of ``model_name``.
        draft_fraction: share of the length budget spent on a draft.
        keep_fraction: share of the drafts that is refined: ``num_candidates /
            keep_fraction`` drafts are made for ``num_candidates`` candidates.
        safety: the content checker of the screen stage: ``"default"``
            (:func:`~creative_sparse.safety.default_checker`, alt-profanity-check;
            without the ``safety`` extra, a warning and no checks), a
            :class:`~creative_sparse.safety.SafetyChecker`, or None (checks off).
        safety_gate: the highest level whose text is returned without opt-in (default
            0.8, the top of the diverge range).
        allow_high_sparsity: opt in to returned text above ``safety_gate``.
        safety_repairs: repairs per flagged candidate before it is dropped.
        safety_timeout: seconds per checker call (None: no limit); a checker that
            runs longer withholds the candidates.

    Attributes:
        strategy: the :class:`~creative_sparse.generation.strategies.CreativeSparse`
            every call delegates to; its ``quality`` is this wrapper's :attr:`quality`.
        model, tokenizer: the pair it generates with.
    """

    quality = _setting("quality", "The quality functional that selects and ranks.")
    safety = _setting("safety", "The resolved content checker (None: no screen).")
    safety_gate = _setting("safety_gate", "The highest level returned without opt-in.")
    allow_high_sparsity = _setting("allow_high_sparsity", "Opt-in above ``safety_gate``.")
    safety_repairs = _setting("safety_repairs", "Repairs per flagged candidate.")
    safety_timeout = _setting("safety_timeout", "Seconds per checker call (None: no limit).")
    draft_fraction = _setting("draft_fraction", "Share of the length budget for a draft.")
    keep_fraction = _setting("keep_fraction", "Share of the drafts that is refined.")

    def __init__(self, model_name: str = "smollm2-135m",
                 sparsity_schedule: Sequence[float] = DEFAULT_SCHEDULE,
                 quality_weights: QualityWeights | Sequence[float] | None = None,
                 sparsity_config: SparsityConfig | None = None, *, model=None, tokenizer=None,
                 device: str = "cpu", draft_fraction: float = 0.4, keep_fraction: float = 0.5,
                 safety="default", safety_gate: float = DEFAULT_SAFETY_GATE,
                 allow_high_sparsity: bool = False, safety_repairs: int = 2,
                 safety_timeout: float | None = 10.0):
        # The strategy checks every setting (same messages as before) before the model
        # loads; the quality functional needs the model, so it joins afterwards.
        strategy = CreativeSparse(
            sparsity_schedule, sparsity_config, safety=safety,
            allow_high_sparsity=allow_high_sparsity, safety_gate=safety_gate,
            quality_weights=quality_weights, draft_fraction=draft_fraction,
            keep_fraction=keep_fraction, safety_repairs=safety_repairs,
            safety_timeout=safety_timeout)
        if model is None:
            from ..models import load_model
            model, tokenizer = load_model(model_name, device=device)
        self.model, self.tokenizer = model, tokenizer
        self.strategy = replace(strategy, quality=strategy.quality_functional(model, tokenizer))

    @property
    def sparsity_schedule(self) -> tuple[float, float]:
        """``(diverge, refine)``, checked floats; assigning replaces the strategy."""
        return self.strategy.levels

    @sparsity_schedule.setter
    def sparsity_schedule(self, value: Sequence[float]) -> None:
        self.strategy = replace(self.strategy, schedule=value)

    @property
    def controller(self) -> SparsityController:
        """The dial's controller (the strategy's, from ``sparsity_config``)."""
        return self.strategy.controller

    @property
    def quality_functional(self) -> QualityFunctional:
        """The seed's name for :attr:`quality` (the functional that ranks candidates)."""
        return self.quality

    # ------------------------------------------------------------ helpers
    def prompt_ids(self, prompt: Prompt) -> torch.Tensor:
        """``[1, L]`` ids of a string or of chat messages (see
        :mod:`~creative_sparse.generation.prompts`): the chat template for chat models,
        the raw string otherwise.

        ``ValueError`` for an empty prompt, bad messages, or text that is not valid
        Unicode (a lone surrogate such as ``"\\ud800"``: refused, not replaced; see
        `check_text`)."""
        return prompt_ids(self.tokenizer, prompt)

    def greedy_reference(self, prompt: Prompt, max_new_tokens: int) -> str:
        """The dense greedy answer to ``prompt`` (the novelty reference of sweeps and
        evaluations); a single space when the model answers nothing."""
        return greedy_reference(self.model, self.tokenizer, prompt, max_new_tokens)

    def knobs(self, s: float, seeds: Sequence[int] | None = None):
        """``(SamplingParams, AttentionKnobs)`` of the dial at level ``s``."""
        return dial_knobs(self.controller, self.model, s, seeds)

    # ------------------------------------------------------------ the two stages
    def generate_candidates(self, prompt: Prompt, max_length: int = 200, num_candidates: int = 5,
                            sparsity_level: float | None = None, constraints=None,
                            seed: int | None = None, *, num_drafts: int | None = None,
                            reference: str | None = None, logits_processor=None,
                            progress=None) -> CreativeResult:
        """Diverge -> select -> refine -> rank; every candidate with its Q breakdown.

        ``num_drafts`` (default ``ceil(num_candidates / keep_fraction)``, at least
        ``num_candidates``) sets how many drafts are made to choose from. ``reference``
        gives the novelty reference text (the dense greedy answer) instead of decoding
        it as row 0 of the diverge batch. With ``num_drafts=num_candidates`` and a given
        reference, the method decodes exactly ``num_candidates * max_length`` tokens,
        as plain sampling does: the equal-compute setting of the evaluation.

        ``prompt``: a string or chat messages (a system prompt included; see
        :mod:`~creative_sparse.generation.prompts`); Q judges relevance against the
        user turns.

        ``logits_processor``: extra processors for both stages, after the constraints:
        one or a list, in transformers' convention (any ``LogitsProcessor``: repetition
        penalty, no-repeat-n-gram, typical or epsilon sampling, ...) or ours (see
        :mod:`~creative_sparse.generation.processors`). ``progress``: called as
        ``progress(1)`` after every decoding step of either stage; the steps of a call
        are at most ``max_length`` (``draft_len`` diverge steps + the rest refining).
        """
        return self.strategy.candidates(
            self.model, self.tokenizer, prompt, max_length=max_length,
            num_candidates=num_candidates, sparsity_level=sparsity_level,
            constraints=constraints, seed=seed, num_drafts=num_drafts, reference=reference,
            logits_processor=logits_processor, progress=progress)

    def generate_creative(self, prompt: Prompt, max_length: int = 200, num_candidates: int = 5,
                          return_best: bool = True, sparsity_level: float | None = None,
                          constraints=None, seed: int | None = None, *, logits_processor=None):
        """The seed API: the best text, or every candidate's text (best first).

        When the safety checks leave no candidate (all dropped, or withheld because the
        checker failed) the answer is ``""`` (or ``[]``) and a warning gives the reason;
        :meth:`generate_candidates` returns the reports."""
        result = self.generate_candidates(prompt, max_length, num_candidates, sparsity_level,
                                          constraints, seed, logits_processor=logits_processor)
        if not result.candidates:
            reason = result.withheld or "every candidate was flagged and could not be repaired"
            warnings.warn(f"no output returned: {reason}", RuntimeWarning, stacklevel=2)
            return "" if return_best else []
        if return_best:
            return result.best.text
        return [c.text for c in result.candidates]

    def apply_sparse_attention(self, q, k, v, sparsity: float, is_causal: bool = False):
        """Sparse attention with the kernel thresholds of the dial at level ``sparsity``."""
        params = self.controller.get_sparsity_params(sparsity)
        return sparse_attention(q, k, v, is_causal=is_causal, simthreshd1=params.simthreshd1,
                                cdfthreshd=params.cdfthreshd, pvthreshd=params.pvthreshd)
