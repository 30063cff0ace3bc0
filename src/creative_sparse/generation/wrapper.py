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
5. **Rank** the finished candidates by Q given the prompt (novelty and diversity
   as far as on task, incoherence with degeneration and violations; a candidate
   with a violation after every one without) and return the best, or all
   ``num_candidates``.

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
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from ..attention import sparse_attention
from ..config import QualityWeights, SparsityConfig, as_quality_weights
from ..control import SparsityController, check_level
from ..models.transformers import AttentionKnobs, dial_params
from ..quality import LikelihoodScorer, OutputQuality, QualityFunctional
from .constraints import (BannedPhrases, ConstraintSet, MinLength, RequiredKeywords,
                          ValidatorGuard, abc_notation, python_syntax, regex_validator)
from .validators import banned_phrases
from .engine import GenerationStats, generate
from .knobs import Knobs, SamplingParams
from .prompts import Prompt, prompt_ids, prompt_text

__all__ = ["Candidate", "CreativeResult", "CreativeSparseWrapper", "build_constraints",
           "dial_knobs"]


@dataclass(frozen=True)
class Candidate:
    """One finished candidate: its text, the draft it grew from and its Q breakdown."""

    text: str
    draft: str
    quality: OutputQuality


@dataclass
class CreativeResult:
    """Every candidate (best first), the reference, the drafts and the cost of each stage
    (``diverge_stats`` covers the diverge batch, the reference row included)."""

    candidates: list[Candidate]
    drafts: list[str]
    reference: str
    diverge_stats: GenerationStats
    refine_stats: list[GenerationStats] = field(default_factory=list)
    wall_time: float = 0.0

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    @property
    def peak_cache_bytes(self) -> int:
        """The largest KV cache of any stage (the stages run one after another)."""
        return max([self.diverge_stats.peak_cache_bytes]
                   + [s.peak_cache_bytes for s in self.refine_stats])


_VALIDATORS = {"python": python_syntax, "abc": abc_notation}


def build_constraints(tokenizer, spec: Mapping[str, Any] | ConstraintSet | None, budget: int,
                      eos_ids: Sequence[int]) -> ConstraintSet:
    """A :class:`ConstraintSet` from a dict spec (or pass one through).

    Keys: ``banned`` (phrases), ``required`` (keywords), ``min_tokens`` (int),
    ``validators`` (``"python"``, ``"abc"``, ``"regex:<pattern>"`` or callables):
    counted as violations in the finished texts, and enforced while decoding
    when they can judge a prefix (ours can; see :class:`ValidatorGuard`).
    Banned phrases are both: masked while decoding (:class:`BannedPhrases`) and
    counted in the finished texts (:func:`~creative_sparse.generation.validators.banned_phrases`).
    """
    if spec is None:
        return ConstraintSet()
    if isinstance(spec, ConstraintSet):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"constraints must be a dict or a ConstraintSet, got "
                         f"{type(spec).__name__}")
    unknown = set(spec) - {"banned", "required", "min_tokens", "validators"}
    if unknown:
        raise ValueError(f"unknown constraint types {sorted(unknown)}; allowed: banned, "
                         "required, min_tokens, validators")
    processors, validators = [], []
    if spec.get("banned"):
        processors.append(BannedPhrases(tokenizer, spec["banned"]))
        validators.append(banned_phrases(spec["banned"]))
    if spec.get("required"):
        processors.append(RequiredKeywords(tokenizer, spec["required"], budget))
    if spec.get("min_tokens"):
        processors.append(MinLength(list(eos_ids), int(spec["min_tokens"])))
    for item in spec.get("validators", ()):
        if callable(item):
            validators.append(item)
        elif isinstance(item, str) and item.startswith("regex:"):
            validators.append(regex_validator(item[len("regex:"):]))
        elif item in _VALIDATORS:
            validators.append(_VALIDATORS[item])
        else:
            raise ValueError(f"unknown validator {item!r}; allowed: 'python', 'abc', "
                             "'regex:<pattern>' or a callable text -> violations")
    if any(hasattr(v, "rejects_prefix") for v in validators):
        processors.append(ValidatorGuard(tokenizer, validators, eos_ids, budget))  # enforced
    return ConstraintSet(processors, validators)


def dial_knobs(controller: SparsityController, model, s: float,
               seeds: Sequence[int] | None = None) -> tuple[SamplingParams, AttentionKnobs]:
    """``(SamplingParams, AttentionKnobs)`` of every knob of the dial at level ``s`` for
    ``model`` (its MoE routers, if any, set the expert knobs); ``seeds`` give each
    row its attention sub-network."""
    knobs = Knobs.from_params(dial_params(model, s, controller), seeds)
    return knobs.sampling, knobs.attention


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
    """

    def __init__(self, model_name: str = "smollm2-135m",
                 sparsity_schedule: Sequence[float] = (0.7, 0.3),
                 quality_weights: QualityWeights | Sequence[float] | None = None,
                 sparsity_config: SparsityConfig | None = None, *, model=None, tokenizer=None,
                 device: str = "cpu", draft_fraction: float = 0.4, keep_fraction: float = 0.5):
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
                            seed: int | None = None) -> CreativeResult:
        """Diverge -> select -> refine -> rank; every candidate with its Q breakdown.

        ``prompt``: a string or chat messages (a system prompt included; see
        :mod:`~creative_sparse.generation.prompts`); Q judges relevance against the
        user turns."""
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
        seed = 0 if seed is None else int(seed)
        ids = self.prompt_ids(prompt)
        task = prompt_text(prompt)          # what Q judges relevance against
        draft_len = max(1, min(max_length, math.ceil(max_length * self.draft_fraction)))
        constraint_set = build_constraints(self.tokenizer, constraints, max_length - draft_len,
                                           self._eos_ids())
        model, tok = self.model, self.tokenizer
        # The caller gets num_candidates back; refining keep_fraction of the drafts
        # means drafting num_candidates / keep_fraction of them to choose from.
        num_drafts = max(num_candidates, math.ceil(num_candidates / self.keep_fraction - 1e-9))

        # Row 0 is the reference (greedy, exact attention), decoded in the same batch
        # as the drafts (rows 1..N), so it costs a row, not a pass of its own. The
        # drafts open the final texts, so banned phrases are kept out of them already;
        # the other constraints are about the whole answer and steer the refinement.
        seeds = [seed * 1000 + i for i in range(num_drafts)]
        banned = [p for p in constraint_set.processors if isinstance(p, BannedPhrases)]
        batch = generate(model, tok, ids, num_rows=num_drafts + 1, max_new_tokens=draft_len,
                         schedule=self.knobs(diverge, [seed * 1000 - 1] + seeds),
                         seeds=[seed * 1000 - 1] + seeds, keep_state=True, reference_rows=[0],
                         logit_processor=ConstraintSet(banned) if banned else None)
        reference_text = batch.texts[0]
        drafts = _without_first_row(batch)
        ref_texts = [reference_text or " "]
        validators = list(constraint_set.validators)
        # Drafts are chosen as a set: good and different from each other.
        chosen = self.quality.select([t or " " for t in drafts.texts], num_candidates,
                                     ref_texts, task, validators=validators)

        finals = {i: drafts.texts[i] for i in chosen}   # finished drafts stay as they are
        # Drafts that used their whole budget continue from their cached keys and
        # values (KV reuse): the prompt and the draft are not computed again.
        members = [i for i in chosen if drafts.finish_reasons[i] == "length"
                   and len(drafts.token_ids[i]) < max_length]
        refine_stats = []
        if members:
            member_seeds = [seeds[i] for i in members]
            result = generate(model, tok, batch.state.select([i + 1 for i in members]),
                              num_rows=len(members),
                              max_new_tokens=max_length - draft_len,
                              schedule=self.knobs(refine, member_seeds), seeds=member_seeds,
                              logit_processor=constraint_set if constraint_set.processors
                              else None)
            refine_stats.append(result.stats)
            for row, i in enumerate(members):
                finals[i] = tok.decode(drafts.token_ids[i] + result.token_ids[row],
                                       skip_special_tokens=True)
        finals = [finals[i] for i in chosen]

        breakdown = self.quality.breakdown([t or " " for t in finals], ref_texts, task,
                                           validators=validators)
        candidates = [Candidate(text, drafts.texts[i], q)
                      for text, i, q in zip(finals, chosen, breakdown)]
        # A candidate that breaks a constraint ranks below every one that keeps them.
        candidates.sort(key=lambda c: (c.quality.violations > 0, -c.quality.q))
        return CreativeResult(candidates, drafts.texts, reference_text, batch.stats,
                              refine_stats, time.perf_counter() - start)

    def generate_creative(self, prompt: Prompt, max_length: int = 200, num_candidates: int = 5,
                          return_best: bool = True, sparsity_level: float | None = None,
                          constraints=None, seed: int | None = None):
        """The seed API: the best text, or every candidate's text (best first)."""
        result = self.generate_candidates(prompt, max_length, num_candidates, sparsity_level,
                                          constraints, seed)
        if return_best:
            return result.best.text
        return [c.text for c in result.candidates]

    def apply_sparse_attention(self, q, k, v, sparsity: float, is_causal: bool = False):
        """Sparse attention with the kernel thresholds of the dial at level ``sparsity``."""
        params = self.controller.get_sparsity_params(sparsity)
        return sparse_attention(q, k, v, is_causal=is_causal, simthreshd1=params.simthreshd1,
                                cdfthreshd=params.cdfthreshd, pvthreshd=params.pvthreshd)
