"""The Creative-Sparse algorithm: diverge at high sparsity, refine the best drafts at low sparsity.

:func:`diverge_refine` is the whole algorithm, one function of its inputs (the model,
a prompt and the collaborators it is handed: the quality functional, the dial's
controller, the safety checker and gate); the strategy
:class:`~creative_sparse.generation.strategies.CreativeSparse` owns those
collaborators and calls it, and
:class:`~creative_sparse.generation.wrapper.CreativeSparseWrapper` is the seed's API
on top of that strategy. The stages:

1. **Reference**: the model's own greedy, dense continuation of the prompt ("what
   the model would say anyway"): novelty is measured against it. It is decoded
   as one extra row of the diverge batch (exact attention, greedy), so it costs a
   row rather than a pass of its own.
2. **Diverge**: ``num_candidates / keep_fraction`` short drafts (``draft_fraction``
   of the length budget) in one batch at the divergence level: temperature,
   nucleus, attention key budget, MoE experts and kernel thresholds all from the
   controller, and a different sub-network seed per draft. Banned phrases, grammar
   masks and the validators' prefix checks are enforced here already: a draft is
   part of the final text.
3. **Select** ``num_candidates`` drafts as a set, for Q and mutual diversity
   together (`QualityFunctional.select`), not the top drafts by their own Q.
4. **Refine**: continue each chosen draft to the length budget at the refinement
   level, under the constraints (banned phrases, required keywords, minimum
   length, validators: enforced while decoding, and counted as violations; a
   banned phrase anywhere in the final text, draft included, is a violation).
5. **Screen** (safety, a hard constraint): a content checker (``safety``, by
   default :class:`~creative_sparse.safety.ProfanityCheck`) reads every candidate,
   draft and the reference; a flagged candidate is cut before the flagged span and
   continued at the refine level with the flagged phrases banned, up to
   ``safety_repairs`` times, else dropped; a checker that fails withholds every
   candidate (:mod:`~creative_sparse.generation.safe_refine`). Each candidate's
   :class:`~creative_sparse.safety.SafetyReport` says what was flagged, where, and
   what was done.
6. **Rank** the finished candidates by Q given the prompt (novelty and diversity
   as far as on task, incoherence with degeneration and violations; a candidate
   with a violation after every one without) and return them best first.

The gate: text returned to the caller is generated at the refine level, and at the
diverge level too when no checker screens the drafts; a level above
``safety_gate`` (default 0.8, the top of the diverge range) there raises
:class:`~creative_sparse.safety.HighSparsityError` unless ``allow_high_sparsity``.

The refined drafts continue together in one batch from the diverge stage's
cache (KV reuse): neither the prompt nor the drafts are computed again. Drafts
that ended (end of sequence) before their budget are final as they are.

Example:
    >>> from creative_sparse.control import SparsityController
    >>> result = diverge_refine(model, tokenizer, "Write a haiku about rain.",
    ...                         quality=quality, controller=SparsityController(),
    ...                         levels=(0.7, 0.3), safety=None, max_length=60,
    ...                         num_candidates=4, seed=1)          # doctest: +SKIP
    >>> result.best.text, result.best.quality.q                    # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from ..control import SparsityController, cache_budget, check_level
from ..models.attention_knobs import AttentionKnobs
from ..quality import OutputQuality, QualityFunctional
from ..quality.metrics import check_text
from ..safety import DEFAULT_SAFETY_GATE, Flag, SafetyChecker, SafetyReport, check_gate
from .constraint_spec import build_constraints, eos_ids
from .constraints import BannedPhrases, ConstraintSet, ValidatorGuard
from .engine import GenerationStats, generate
from .grammar import GrammarMask
from .knobs import SamplingParams, dial_knobs
from .prompts import Prompt, prompt_ids, prompt_text
from .safe_refine import screen

__all__ = ["Candidate", "CreativeResult", "diverge_refine", "greedy_reference"]


@dataclass(frozen=True)
class Candidate:
    """One finished candidate: its text, the draft it grew from (flagged spans redacted)
    and its Q breakdown; ``safety``: what the checks found and did (None: no checker)."""

    text: str
    draft: str
    quality: OutputQuality
    safety: SafetyReport | None = None


@dataclass
class CreativeResult:
    """Every candidate (best first), the reference, the drafts and the cost of each stage
    (``diverge_stats`` covers the diverge batch, the reference row included; the
    ``refine_stats`` list holds the refine batch, then each safety repair).

    Safety (with a checker): ``drafts`` and ``reference`` have their flagged spans
    redacted; ``draft_flags`` holds each draft's flags; ``safety`` one report per
    refined draft, dropped and withheld ones included (candidates carry theirs);
    ``withheld`` says why no candidate was returned when the checker failed.
    ``candidates`` may hold fewer than ``num_candidates`` (dropped ones), or none.
    """

    candidates: list[Candidate]
    drafts: list[str]
    reference: str
    diverge_stats: GenerationStats
    refine_stats: list[GenerationStats] = field(default_factory=list)
    wall_time: float = 0.0
    safety: list[SafetyReport] = field(default_factory=list)
    draft_flags: list[list[Flag]] = field(default_factory=list)
    withheld: str | None = None

    @property
    def best(self) -> Candidate:
        if not self.candidates:
            why = self.withheld or "every candidate was dropped by the safety checks"
            raise ValueError(f"no candidate to return: {why}")
        return self.candidates[0]

    @property
    def flagged_drafts(self) -> int:
        """How many drafts the checker flagged."""
        return sum(bool(f) for f in self.draft_flags)

    @property
    def flagged_outputs(self) -> int:
        """How many refined candidates the checker flagged before any repair."""
        return sum(r.action in ("repaired", "dropped") or (r.action == "withheld"
                                                            and bool(r.flags))
                   for r in self.safety)

    @property
    def peak_cache_bytes(self) -> int:
        """The largest KV cache of any stage (the stages run one after another)."""
        return max([self.diverge_stats.peak_cache_bytes]
                   + [s.peak_cache_bytes for s in self.refine_stats])


def _without_first_row(result):
    """The drafts of a diverge batch whose row 0 is the reference (state kept aside)."""
    return replace(result, texts=result.texts[1:], token_ids=result.token_ids[1:],
                   finish_reasons=result.finish_reasons[1:], state=None)


def greedy_reference(model, tokenizer, prompt: Prompt, max_new_tokens: int) -> str:
    """The dense greedy answer to ``prompt`` (the novelty reference of sweeps and
    evaluations); a single space when the model answers nothing."""
    out = generate(model, tokenizer, prompt_ids(tokenizer, prompt),
                   max_new_tokens=max_new_tokens,
                   schedule=(SamplingParams(temperature=0), AttentionKnobs()))
    return out.texts[0] or " "


def diverge_refine(model, tokenizer, prompt: Prompt, *, quality: QualityFunctional,
                   controller: SparsityController, levels: tuple[float, float],
                   safety: SafetyChecker | None, safety_gate: float = DEFAULT_SAFETY_GATE,
                   allow_high_sparsity: bool = False, safety_repairs: int = 2,
                   safety_timeout: float | None = 10.0, draft_fraction: float = 0.4,
                   keep_fraction: float = 0.5, max_length: int = 200,
                   num_candidates: int = 5, sparsity_level: float | None = None,
                   constraints=None, seed: int | None = None,
                   num_drafts: int | None = None, reference: str | None = None,
                   logits_processor=None, progress=None,
                   stratify_drafts: bool = False) -> CreativeResult:
    """Diverge -> select -> refine -> screen -> rank (the module docstring); every
    candidate with its Q breakdown.

    The collaborators, checked by their owner
    (:class:`~creative_sparse.generation.strategies.CreativeSparse`), not here:
    ``quality`` selects the drafts and ranks the candidates; ``controller`` gives
    the knobs of a level (:func:`~creative_sparse.generation.knobs.dial_knobs`) and
    the token-pruning rate; ``levels``: ``(diverge, refine)``, checked floats in
    [0, 1], refine <= diverge; ``safety``: a resolved checker or None (no screen);
    ``safety_gate``, ``allow_high_sparsity``, ``safety_repairs``, ``safety_timeout``:
    the gate and the screen (see
    :class:`~creative_sparse.generation.wrapper.CreativeSparseWrapper`); ``draft_fraction``
    of ``max_length`` is spent on a draft, ``keep_fraction`` of the drafts is refined.

    The call (checked here): ``max_length`` new tokens per candidate, ``num_candidates``
    returned (fewer when the screen drops some); ``sparsity_level`` replaces the
    diverge level (refine = min(refine, diverge)); ``constraints``: a
    :func:`~creative_sparse.generation.constraint_spec.build_constraints` spec or a
    ``ConstraintSet``; ``seed`` (None: 0) gives draft ``i`` the sub-network seed
    ``seed * 1000 + i``. ``num_drafts`` (default ``ceil(num_candidates /
    keep_fraction)``, at least ``num_candidates``) sets how many drafts are made to
    choose from. ``reference`` gives the novelty reference text (the dense greedy
    answer) instead of decoding it as row 0 of the diverge batch. With
    ``num_drafts=num_candidates`` and a given reference, the call decodes exactly
    ``num_candidates * max_length`` tokens, as plain sampling does: the
    equal-compute setting of the evaluation.

    ``prompt``: a string or chat messages (a system prompt included; see
    :mod:`~creative_sparse.generation.prompts`); Q judges relevance against the
    user turns. ``logits_processor``: extra processors for both stages, after the
    constraints: one or a list, in transformers' convention or ours (see
    :mod:`~creative_sparse.generation.processors`). ``progress``: called as
    ``progress(1)`` after every decoding step of either stage; the steps of a call
    are at most ``max_length`` (``draft_len`` diverge steps + the rest refining).
    """
    start = time.perf_counter()
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1 (new tokens), got {max_length!r}")
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) \
            or num_candidates < 1:
        raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
    diverge, refine = levels
    if sparsity_level is not None:
        diverge = check_level(sparsity_level)
        refine = min(refine, diverge)
    # Returned text comes from the refine level, and from the diverge level when
    # no checker screens the drafts before they reach the caller.
    check_gate(refine, safety_gate, allow_high_sparsity,
               f"the refine level {refine:g}")
    if safety is None:
        check_gate(diverge, safety_gate, allow_high_sparsity,
                   f"the diverge level {diverge:g} without safety checks")
    seed = 0 if seed is None else int(seed)
    ids = prompt_ids(tokenizer, prompt)
    task = prompt_text(prompt)          # what Q judges relevance against
    draft_len = max(1, min(max_length, math.ceil(max_length * draft_fraction)))
    constraint_set = build_constraints(tokenizer, constraints, max_length - draft_len,
                                       eos_ids(tokenizer))
    tok = tokenizer
    # The caller gets num_candidates back; refining keep_fraction of the drafts
    # means drafting num_candidates / keep_fraction of them to choose from.
    if num_drafts is None:
        num_drafts = max(num_candidates,
                         math.ceil(num_candidates / keep_fraction - 1e-9))
    elif isinstance(num_drafts, bool) or not isinstance(num_drafts, int) \
            or num_drafts < num_candidates:
        raise ValueError(f"num_drafts must be an int >= num_candidates ({num_candidates}), "
                         f"got {num_drafts!r}")
    if reference is not None:
        reference = check_text(reference, "reference")

    # Row 0 is the reference (greedy, exact attention), decoded in the same batch
    # as the drafts (rows 1..N), so it costs a row, not a pass of its own (none
    # when the caller gives the reference). Required keywords and a minimum length are
    # about the whole answer and steer the refinement only.
    seeds = [seed * 1000 + i for i in range(num_drafts)]
    # Banned phrases, grammar masks and validator guards hold in the drafts too: a draft
    # opens the answer, and one that broke a validator's rule (prose where a tune must
    # open with "X:") is beyond any refinement's repair.
    # The guard's budget is the refinement's: in a draft it must not close the answer.
    whole = [p.without_closing() if isinstance(p, ValidatorGuard) else p
             for p in constraint_set.processors
             if isinstance(p, (BannedPhrases, GrammarMask, ValidatorGuard))]
    extra = [] if logits_processor is None else (
        list(logits_processor) if isinstance(logits_processor, (list, tuple))
        else [logits_processor])
    draft_hooks = ([ConstraintSet(whole)] if whole else []) + extra
    first = 0 if reference is not None else 1          # the first draft's batch row
    row_seeds = seeds if reference is not None else [seed * 1000 - 1] + seeds
    schedule = dial_knobs(controller, model, diverge, row_seeds)
    # Token pruning: the drafts' cache is bounded to (1 - rate) of its context
    # (long contexts only, see control.cache_budget), keeping the sinks and window
    # the diverge knobs protect; refine continues from it.
    cache_limit = cache_budget(
        controller.get_sparsity_params(diverge).token_pruning_rate,
        ids.shape[1] + draft_len,
        protected=schedule[1].sink_tokens + schedule[1].local_window)
    batch = generate(model, tok, ids, num_rows=num_drafts + first, max_new_tokens=draft_len,
                     schedule=schedule, seeds=row_seeds,
                     keep_state=True, reference_rows=[0] if first else [],
                     logit_processor=draft_hooks or None, progress=progress,
                     max_cache_tokens=cache_limit,
                     stratified_steps=draft_len if stratify_drafts else 0)
    reference_text = reference if reference is not None else batch.texts[0]
    drafts = _without_first_row(batch) if first else batch
    ref_texts = [reference_text or " "]
    validators = list(constraint_set.validators)
    # Drafts are chosen as a set: good and different from each other.
    chosen = quality.select([t or " " for t in drafts.texts], num_candidates,
                                 ref_texts, task, validators=validators)

    finals = {i: drafts.texts[i] for i in chosen}   # finished drafts stay as they are
    final_ids = {i: list(drafts.token_ids[i]) for i in chosen}
    # Drafts that used their whole budget continue from their cached keys and
    # values (KV reuse): the prompt and the draft are not computed again.
    members = [i for i in chosen if drafts.finish_reasons[i] == "length"
               and len(drafts.token_ids[i]) < max_length]
    refine_stats = []
    if members:
        member_seeds = [seeds[i] for i in members]
        result = generate(model, tok, batch.state.select([i + first for i in members]),
                          num_rows=len(members),
                          max_new_tokens=max_length - draft_len,
                          schedule=dial_knobs(controller, model, refine, member_seeds), seeds=member_seeds,
                          logit_processor=([constraint_set] if constraint_set.processors
                                           else []) + extra or None,
                          progress=progress)
        refine_stats.append(result.stats)
        for row, i in enumerate(members):
            final_ids[i] = drafts.token_ids[i] + result.token_ids[row]
            finals[i] = tok.decode(final_ids[i], skip_special_tokens=True)
    finals = [finals[i] for i in chosen]
    draft_texts, reports, draft_flags, withheld = list(drafts.texts), [None] * len(chosen), \
        [], None
    if safety is not None:
        screened = screen(safety, model=model, tokenizer=tok, prompt_ids=ids,
                          texts=finals, token_ids=[final_ids[i] for i in chosen],
                          drafts=drafts.texts, chosen=chosen, reference=reference_text,
                          max_length=max_length, knobs=lambda s: dial_knobs(controller, model, refine, s),
                          seeds=[seeds[i] for i in chosen],
                          processors=constraint_set.processors,
                          repairs=safety_repairs, timeout=safety_timeout)
        finals, reports = screened.texts, screened.reports
        draft_texts, reference_text = screened.drafts, screened.reference
        draft_flags, withheld = screened.draft_flags, screened.withheld
        refine_stats += screened.repair_stats
    kept = [k for k, text in enumerate(finals) if text is not None]
    breakdown = quality.breakdown([finals[k] or " " for k in kept], ref_texts, task,
                                       validators=validators) if kept else []
    candidates = [Candidate(finals[k], draft_texts[chosen[k]] if draft_texts else "", q,
                            reports[k])
                  for k, q in zip(kept, breakdown)]
    # A candidate that breaks a constraint ranks below every one that keeps them.
    candidates.sort(key=lambda c: (c.quality.violations > 0, -c.quality.q))
    return CreativeResult(candidates, draft_texts, reference_text, batch.stats,
                          refine_stats, time.perf_counter() - start,
                          [r for r in reports if r is not None], draft_flags, withheld)
