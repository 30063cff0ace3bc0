"""`CreativeSparseWrapper`: diverge at high sparsity, refine the best drafts at low sparsity.

1. **Reference**: the model's own greedy, dense continuation of the prompt ("what
   the model would say anyway"): novelty is measured against it. It is decoded
   as one extra row of the diverge batch (exact attention, greedy), so it costs a
   row rather than a pass of its own.
2. **Diverge**: ``num_candidates / keep_fraction`` short drafts (``draft_fraction``
   of the length budget) in one batch at the divergence level: temperature,
   nucleus, attention key budget, MoE experts and kernel thresholds all from the
   controller, and a different sub-network seed per draft. Banned phrases are
   enforced here already: a draft is part of the final text.
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
   with a violation after every one without) and return the best, or all
   ``num_candidates``.

The gate: text returned to the caller is generated at the refine level, and at the
diverge level too when no checker screens the drafts; a level above
``safety_gate`` (default 0.8, the top of the diverge range) there raises
:class:`~creative_sparse.safety.HighSparsityError` unless ``allow_high_sparsity``.

The refined drafts continue together in one batch from the diverge stage's
cache (KV reuse): neither the prompt nor the drafts are computed again. Drafts
that ended (end of sequence) before their budget are final as they are.

Example:
    >>> wrapper = CreativeSparseWrapper()                          # doctest: +SKIP
    >>> wrapper.generate_creative("Write a haiku about rain.", max_length=60,
    ...                           num_candidates=4, seed=1)        # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..attention import sparse_attention
from ..config import QualityWeights, SparsityConfig, as_quality_weights
from ..control import SparsityController, cache_budget, check_level
from ..models.attention_knobs import AttentionKnobs
from ..quality import LikelihoodScorer, OutputQuality, QualityFunctional
from ..quality.metrics import check_text
from ..safety import (DEFAULT_SAFETY_GATE, Flag, SafetyReport, check_gate, check_gate_value,
                      resolve_checker)
from .constraint_spec import build_constraints
from .constraints import BannedPhrases, ConstraintSet
from .grammar import GrammarMask
from .engine import GenerationStats, generate
from .knobs import SamplingParams, dial_knobs
from .prompts import Prompt, prompt_ids, prompt_text
from .safe_refine import screen

__all__ = ["Candidate", "CreativeResult", "CreativeSparseWrapper", "build_constraints",
           "dial_knobs"]


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


class CreativeSparseWrapper:
    """Creative-Sparse generation over one model (see the module docstring).

    Args:
        model_name: anything :func:`creative_sparse.models.load_model` accepts.
        sparsity_schedule: ``(diverge, refine)`` levels in [0, 1], refine <= diverge.
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
    """

    def __init__(self, model_name: str = "smollm2-135m",
                 sparsity_schedule: Sequence[float] = (0.7, 0.3),
                 quality_weights: QualityWeights | Sequence[float] | None = None,
                 sparsity_config: SparsityConfig | None = None, *, model=None, tokenizer=None,
                 device: str = "cpu", draft_fraction: float = 0.4, keep_fraction: float = 0.5,
                 safety="default", safety_gate: float = DEFAULT_SAFETY_GATE,
                 allow_high_sparsity: bool = False, safety_repairs: int = 2,
                 safety_timeout: float | None = 10.0):
        if len(tuple(sparsity_schedule)) != 2:
            raise ValueError(f"sparsity_schedule must be (diverge, refine), got "
                             f"{sparsity_schedule!r}")
        diverge, refine = (check_level(s) for s in sparsity_schedule)
        if refine > diverge:
            raise ValueError(f"sparsity_schedule: refine ({refine}) must not exceed diverge "
                             f"({diverge})")
        for name, value in (("draft_fraction", draft_fraction), ("keep_fraction", keep_fraction)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        quality_weights = as_quality_weights(quality_weights)
        if isinstance(safety_repairs, bool) or not isinstance(safety_repairs, int) \
                or safety_repairs < 0:
            raise ValueError(f"safety_repairs must be an int >= 0, got {safety_repairs!r}")
        if safety_timeout is not None and (isinstance(safety_timeout, bool) or not isinstance(
                safety_timeout, (int, float)) or not safety_timeout > 0):
            raise ValueError(f"safety_timeout must be None or a number of seconds > 0, got "
                             f"{safety_timeout!r}")
        self.safety_gate = check_gate_value(safety_gate)
        self.allow_high_sparsity = bool(allow_high_sparsity)
        self.safety_repairs, self.safety_timeout = safety_repairs, safety_timeout
        self.safety = resolve_checker(safety)
        if model is None:
            from ..models import load_model
            model, tokenizer = load_model(model_name, device=device)
        self.model, self.tokenizer = model, tokenizer
        self.sparsity_schedule = (diverge, refine)
        self.controller = SparsityController(sparsity_config)
        self.quality = QualityFunctional(quality_weights, scorer=LikelihoodScorer(model, tokenizer))
        self.draft_fraction, self.keep_fraction = draft_fraction, keep_fraction

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
        out = generate(self.model, self.tokenizer, self.prompt_ids(prompt),
                       max_new_tokens=max_new_tokens,
                       schedule=(SamplingParams(temperature=0), AttentionKnobs()))
        return out.texts[0] or " "

    def knobs(self, s: float, seeds: Sequence[int] | None = None):
        """``(SamplingParams, AttentionKnobs)`` of the dial at level ``s``."""
        return dial_knobs(self.controller, self.model, s, seeds)

    def _eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

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
        start = time.perf_counter()
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1 (new tokens), got {max_length!r}")
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) \
                or num_candidates < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
        diverge, refine = self.sparsity_schedule
        if sparsity_level is not None:
            diverge = check_level(sparsity_level)
            refine = min(refine, diverge)
        # Returned text comes from the refine level, and from the diverge level when
        # no checker screens the drafts before they reach the caller.
        check_gate(refine, self.safety_gate, self.allow_high_sparsity,
                   f"the refine level {refine:g}")
        if self.safety is None:
            check_gate(diverge, self.safety_gate, self.allow_high_sparsity,
                       f"the diverge level {diverge:g} without safety checks")
        seed = 0 if seed is None else int(seed)
        ids = self.prompt_ids(prompt)
        task = prompt_text(prompt)          # what Q judges relevance against
        draft_len = max(1, min(max_length, math.ceil(max_length * self.draft_fraction)))
        constraint_set = build_constraints(self.tokenizer, constraints, max_length - draft_len,
                                           self._eos_ids())
        model, tok = self.model, self.tokenizer
        # The caller gets num_candidates back; refining keep_fraction of the drafts
        # means drafting num_candidates / keep_fraction of them to choose from.
        if num_drafts is None:
            num_drafts = max(num_candidates,
                             math.ceil(num_candidates / self.keep_fraction - 1e-9))
        elif isinstance(num_drafts, bool) or not isinstance(num_drafts, int) \
                or num_drafts < num_candidates:
            raise ValueError(f"num_drafts must be an int >= num_candidates ({num_candidates}), "
                             f"got {num_drafts!r}")
        if reference is not None:
            reference = check_text(reference, "reference")

        # Row 0 is the reference (greedy, exact attention), decoded in the same batch
        # as the drafts (rows 1..N), so it costs a row, not a pass of its own (none
        # when the caller gives the reference). The
        # drafts open the final texts, so banned phrases are kept out of them already;
        # the other constraints are about the whole answer and steer the refinement.
        seeds = [seed * 1000 + i for i in range(num_drafts)]
        # Banned phrases and grammar masks hold in the drafts too: a draft opens the answer.
        whole = [p for p in constraint_set.processors
                 if isinstance(p, (BannedPhrases, GrammarMask))]
        extra = [] if logits_processor is None else (
            list(logits_processor) if isinstance(logits_processor, (list, tuple))
            else [logits_processor])
        draft_hooks = ([ConstraintSet(whole)] if whole else []) + extra
        first = 0 if reference is not None else 1          # the first draft's batch row
        row_seeds = seeds if reference is not None else [seed * 1000 - 1] + seeds
        schedule = self.knobs(diverge, row_seeds)
        # Token pruning: the drafts' cache is bounded to (1 - rate) of its context
        # (long contexts only, see control.cache_budget), keeping the sinks and window
        # the diverge knobs protect; refine continues from it.
        cache_limit = cache_budget(
            self.controller.get_sparsity_params(diverge).token_pruning_rate,
            ids.shape[1] + draft_len,
            protected=schedule[1].sink_tokens + schedule[1].local_window)
        batch = generate(model, tok, ids, num_rows=num_drafts + first, max_new_tokens=draft_len,
                         schedule=schedule, seeds=row_seeds,
                         keep_state=True, reference_rows=[0] if first else [],
                         logit_processor=draft_hooks or None, progress=progress,
                         max_cache_tokens=cache_limit)
        reference_text = reference if reference is not None else batch.texts[0]
        drafts = _without_first_row(batch) if first else batch
        ref_texts = [reference_text or " "]
        validators = list(constraint_set.validators)
        # Drafts are chosen as a set: good and different from each other.
        chosen = self.quality.select([t or " " for t in drafts.texts], num_candidates,
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
                              schedule=self.knobs(refine, member_seeds), seeds=member_seeds,
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
        if self.safety is not None:
            screened = screen(self.safety, model=model, tokenizer=tok, prompt_ids=ids,
                              texts=finals, token_ids=[final_ids[i] for i in chosen],
                              drafts=drafts.texts, chosen=chosen, reference=reference_text,
                              max_length=max_length, knobs=lambda s: self.knobs(refine, s),
                              seeds=[seeds[i] for i in chosen],
                              processors=constraint_set.processors,
                              repairs=self.safety_repairs, timeout=self.safety_timeout)
            finals, reports = screened.texts, screened.reports
            draft_texts, reference_text = screened.drafts, screened.reference
            draft_flags, withheld = screened.draft_flags, screened.withheld
            refine_stats += screened.repair_stats
        kept = [k for k, text in enumerate(finals) if text is not None]
        breakdown = self.quality.breakdown([finals[k] or " " for k in kept], ref_texts, task,
                                           validators=validators) if kept else []
        candidates = [Candidate(finals[k], draft_texts[chosen[k]] if draft_texts else "", q,
                                reports[k])
                      for k, q in zip(kept, breakdown)]
        # A candidate that breaks a constraint ranks below every one that keeps them.
        candidates.sort(key=lambda c: (c.quality.violations > 0, -c.quality.q))
        return CreativeResult(candidates, draft_texts, reference_text, batch.stats,
                              refine_stats, time.perf_counter() - start,
                              [r for r in reports if r is not None], draft_flags, withheld)

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
