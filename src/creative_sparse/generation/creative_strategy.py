"""Creative-Sparse as a decoding strategy: the owner of the algorithm's collaborators.

:class:`CreativeSparse` holds what
:func:`~creative_sparse.generation.creative.diverge_refine` is handed (the dial's
controller, the resolved safety checker and gate, one quality functional per model)
and returns the same :class:`~creative_sparse.generation.strategy_result.StrategyResult`
as the other strategies of :mod:`~creative_sparse.generation.strategies`, which
re-exports it. :class:`~creative_sparse.generation.wrapper.CreativeSparseWrapper`, the
seed's API, is a facade over it (this module never imports the wrapper).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from ..config import QualityWeights, SparsityConfig, as_quality_weights
from ..control import SparsityController, check_level
from ..quality import LikelihoodScorer, QualityFunctional
from ..safety import DEFAULT_SAFETY_GATE, check_gate_value, resolve_checker
from .creative import CreativeResult, diverge_refine
from .strategy_result import StrategyResult

__all__ = ["CreativeSparse", "DEFAULT_SCHEDULE"]

#: ``(diverge, refine)`` when none is given: the best measured setting. On the held-back
#: prompts of creative writing, poetry and ad copy (20 each, 3 seeds, equal FLOPs) no
#: level beat tuned top-p/min-p; diverge 0.3 sat on their frontier on all three tasks with
#: the best mean Q and never less relevant to the prompt, while 0.6 and 0.9 added
#: diversity on poetry but were 0.06-0.08 less relevant on creative writing
#: (docs/evaluation.md). Until 2026-12 the default was (0.7, 0.3), never measured better.
DEFAULT_SCHEDULE = (0.3, 0.3)


@dataclass(frozen=True)
class CreativeSparse:
    """Diverge -> select -> refine -> screen -> rank
    (:func:`~creative_sparse.generation.creative.diverge_refine`), a strategy like the
    others: :meth:`generate` returns a :class:`StrategyResult`, :meth:`candidates` the
    full :class:`~creative_sparse.generation.creative.CreativeResult`.

    The strategy owns the algorithm's collaborators: the dial's
    :class:`~creative_sparse.control.SparsityController` (from ``config``), the
    resolved safety checker and the gate settings, and one
    :class:`~creative_sparse.quality.QualityFunctional` per model (built on first use:
    it loads an embedder), unless ``quality`` gives the one to use for every model.

    Args:
        schedule: ``(diverge, refine)`` levels in [0, 1], refine <= diverge (default
            :data:`DEFAULT_SCHEDULE`, ``(0.3, 0.3)``).
        config: constants of the dial (default ``SparsityConfig()``).
        safety: ``"default"`` (:func:`~creative_sparse.safety.default_checker`; without
            the ``safety`` extra, a warning and no checks), a
            :class:`~creative_sparse.safety.SafetyChecker`, or None (checks off);
            resolved at construction, so the field holds the checker (or None).
        allow_high_sparsity: opt in to returned text above ``safety_gate``.
        safety_gate: the highest level whose text is returned without opt-in (0.8).
        quality_weights: alpha, beta, gamma of the Q built per model (a
            ``QualityWeights`` or a tuple; default ``QualityWeights()``).
        quality: the functional for every model instead of one built per model.
        draft_fraction: share of the length budget spent on a draft (0.4).
        keep_fraction: share of the drafts that is refined (0.5).
        stratify_drafts: draw the drafts as one stratified set (arithmetic sampling:
            each draft alone the same draw, together spread over the distribution).
        safety_repairs: repairs per flagged candidate before it is dropped (2).
        safety_timeout: seconds per checker call (None: no limit; default 10).

    Example:
        >>> cs = CreativeSparse((0.7, 0.3), safety=None)
        >>> cs.generate(model, tokenizer, "A haiku about rain.", num_candidates=2,
        ...             max_new_tokens=40).texts                       # doctest: +SKIP
    """

    schedule: tuple[float, float] = DEFAULT_SCHEDULE
    config: SparsityConfig | None = None
    safety: object = "default"
    allow_high_sparsity: bool = False
    safety_gate: float = DEFAULT_SAFETY_GATE
    quality_weights: QualityWeights | tuple[float, float, float] | None = None
    quality: QualityFunctional | None = field(default=None, compare=False, repr=False)
    draft_fraction: float = 0.4
    keep_fraction: float = 0.5
    stratify_drafts: bool = False
    safety_repairs: int = 2
    safety_timeout: float | None = 10.0
    controller: SparsityController = field(init=False, compare=False, repr=False)
    _levels: tuple[float, float] = field(init=False, compare=False, repr=False)
    _qualities: dict = field(init=False, default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        schedule = self.schedule
        if len(tuple(schedule)) != 2:
            raise ValueError(f"sparsity_schedule must be (diverge, refine), got {schedule!r}")
        diverge, refine = (check_level(s) for s in schedule)
        if refine > diverge:
            raise ValueError(f"sparsity_schedule: refine ({refine}) must not exceed diverge "
                             f"({diverge})")
        for name in ("draft_fraction", "keep_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        as_quality_weights(self.quality_weights)
        if self.quality is not None and not all(
                callable(getattr(self.quality, m, None)) for m in ("select", "breakdown")):
            raise ValueError(f"quality must be None or a QualityFunctional (an object with "
                             f"select and breakdown), got {type(self.quality).__name__}")
        repairs, timeout = self.safety_repairs, self.safety_timeout
        if isinstance(repairs, bool) or not isinstance(repairs, int) or repairs < 0:
            raise ValueError(f"safety_repairs must be an int >= 0, got {repairs!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"safety_timeout must be None or a number of seconds > 0, got "
                             f"{timeout!r}")
        # Frozen: the checked values and the derived collaborators are set once, here.
        object.__setattr__(self, "safety_gate", check_gate_value(self.safety_gate))
        object.__setattr__(self, "safety", resolve_checker(self.safety))
        object.__setattr__(self, "allow_high_sparsity", bool(self.allow_high_sparsity))
        object.__setattr__(self, "controller", SparsityController(self.config))
        object.__setattr__(self, "_levels", (diverge, refine))

    @property
    def name(self) -> str:
        return f"CreativeSparse{tuple(self.schedule)}"

    @property
    def levels(self) -> tuple[float, float]:
        """``(diverge, refine)`` as checked floats."""
        return self._levels

    def quality_functional(self, model, tokenizer) -> QualityFunctional:
        """The functional that selects and ranks for ``model``: ``quality`` when given,
        else one built on first use per model (it loads an embedder) with
        ``quality_weights`` and the model's own likelihood scorer."""
        if self.quality is not None:
            return self.quality
        if id(model) not in self._qualities:
            self._qualities[id(model)] = QualityFunctional(
                as_quality_weights(self.quality_weights),
                scorer=LikelihoodScorer(model, tokenizer))
        return self._qualities[id(model)]

    def candidates(self, model, tokenizer, prompt, *, max_length: int = 200,
                   num_candidates: int = 5, sparsity_level: float | None = None,
                   constraints=None, seed: int | None = None, num_drafts: int | None = None,
                   reference: str | None = None, logits_processor=None,
                   progress=None) -> CreativeResult:
        """Every candidate with its Q breakdown, the drafts, the reference, the stats and
        the safety reports: :func:`~creative_sparse.generation.creative.diverge_refine`
        with this strategy's collaborators (its doc: the arguments)."""
        return diverge_refine(
            model, tokenizer, prompt, quality=self.quality_functional(model, tokenizer),
            controller=self.controller, levels=self.levels, safety=self.safety,
            safety_gate=self.safety_gate, allow_high_sparsity=self.allow_high_sparsity,
            safety_repairs=self.safety_repairs, safety_timeout=self.safety_timeout,
            draft_fraction=self.draft_fraction, keep_fraction=self.keep_fraction,
            max_length=max_length, num_candidates=num_candidates,
            sparsity_level=sparsity_level, constraints=constraints, seed=seed,
            num_drafts=num_drafts, reference=reference, logits_processor=logits_processor,
            progress=progress, stratify_drafts=self.stratify_drafts)

    def generate(self, model, tokenizer, prompt, *, num_candidates: int = 5,
                 max_new_tokens: int = 120, seed: int = 0,
                 sparsity_level: float | None = None, num_drafts: int | None = None,
                 reference: str | None = None, logits_processor=None,
                 constraints=None) -> StrategyResult:
        """As :meth:`candidates`, as a :class:`StrategyResult`: the candidates' texts
        (best first), the summed cost of both stages and the screen's counts.
        ``prompt``: a string, chat messages or ids ``[1, L]`` (decoded);
        ``sparsity_level`` replaces the diverge level of ``schedule`` (refine =
        min(refine, diverge)); ``num_drafts`` and ``reference`` are passed on
        (equal-compute runs); ``logits_processor`` applies in both stages;
        ``constraints``: a ``build_constraints`` spec or ``ConstraintSet``
        (:meth:`candidates`)."""
        if isinstance(prompt, torch.Tensor):
            prompt = tokenizer.decode(prompt[0], skip_special_tokens=True)
        start = time.perf_counter()
        result = self.candidates(model, tokenizer, prompt, max_length=max_new_tokens,
                                 num_candidates=num_candidates, seed=seed,
                                 sparsity_level=sparsity_level, num_drafts=num_drafts,
                                 reference=reference, logits_processor=logits_processor,
                                 constraints=constraints)
        parts = [result.diverge_stats] + list(result.refine_stats)
        stats = replace(parts[0], generated_tokens=sum(p.generated_tokens for p in parts),
                        steps=sum(p.steps for p in parts),
                        pairs_attended=sum(p.pairs_attended for p in parts),
                        flops=sum(p.flops for p in parts),
                        wall_time=time.perf_counter() - start,
                        peak_cache_bytes=result.peak_cache_bytes,
                        evicted_tokens=sum(p.evicted_tokens for p in parts))
        safety = None
        if self.safety is not None:
            actions = [r.action for r in result.safety]
            safety = {"checker": self.safety.name, "drafts": len(result.draft_flags),
                      "flagged_drafts": result.flagged_drafts, "outputs": len(actions),
                      "flagged_outputs": result.flagged_outputs,
                      "repaired": actions.count("repaired"), "dropped": actions.count("dropped"),
                      "withheld_outputs": actions.count("withheld"),
                      "withheld": result.withheld}
        return StrategyResult(self.name, [c.text for c in result.candidates], stats, safety)
