"""Safety as a hard constraint of refine: check, repair or drop, and report.

:func:`screen` takes the finished candidates of the refine stage (text and token
ids each) and runs the checker over them, the drafts and the reference in one call:

* a clean candidate is ``"passed"``;
* a flagged one is cut before its first flagged span (at the last token boundary
  that ends before it) and generated again from there at the refine level, with
  every phrase flagged so far banned
  (:class:`~creative_sparse.generation.constraints.BannedPhrases`: token-level rejection, as for the user's banned phrases) and the caller's
  constraints; checked again; up to ``repairs`` times, then ``"dropped"``;
* when the checker fails (raises, times out, answers nonsense) every candidate is
  ``"withheld"`` with the reason: nothing unchecked is returned.

Drafts and the reference are returned with their flagged spans redacted, so the
result object never carries a flagged phrase outside its
:class:`~creative_sparse.safety.SafetyReport`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..safety import CheckOutcome, Flag, SafetyChecker, SafetyReport, redact, run_checks
from .constraints import BannedPhrases, ConstraintSet
from .engine import GenerationStats, generate

logger = logging.getLogger(__name__)

__all__ = ["Screened", "screen"]


@dataclass
class Screened:
    """What :func:`screen` decided: per candidate (in input order) its text (``None``
    when dropped or withheld) and report; the drafts and reference redacted; the
    flags of each draft; the cost of the repairs; ``withheld``: why nothing was
    returned (``None`` when the checks ran)."""

    texts: list[str | None]
    reports: list[SafetyReport]
    drafts: list[str]
    draft_flags: list[list[Flag]]
    reference: str
    repair_stats: list[GenerationStats] = field(default_factory=list)
    withheld: str | None = None


def _prefix_tokens(tokenizer, ids: list[int], cut: int) -> int:
    """The most tokens of ``ids`` whose text ends at or before character ``cut``."""
    lo, hi = 0, len(ids)
    while lo < hi:   # decoded length grows with the tokens: bisect on it
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) <= cut:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _banned_terms(flags: Sequence[Flag]) -> list[str]:
    return list(dict.fromkeys(f.text.strip() for f in flags if f.text.strip()))


def screen(checker: SafetyChecker, *, model, tokenizer, prompt_ids: torch.Tensor,
           texts: Sequence[str], token_ids: Sequence[list[int]], drafts: Sequence[str],
           chosen: Sequence[int], reference: str, max_length: int,
           knobs: Callable[[list[int]], tuple], seeds: Sequence[int],
           processors: Sequence = (), repairs: int = 2, timeout: float | None = 10.0
           ) -> Screened:
    """Check, repair or drop the candidates ``texts`` (see the module doc).

    Args:
        texts, token_ids: each candidate's text and its generated ids (draft + refine).
        drafts: every draft of the diverge batch; ``chosen[k]`` is candidate k's draft.
        prompt_ids: ``[1, L]`` the prompt a repair continues after.
        knobs: ``seeds -> (SamplingParams, AttentionKnobs)`` of the refine level.
        seeds: one per candidate (a repair uses ``seed + attempt``).
        processors: the caller's decoding constraints (kept during a repair).
        repairs: attempts per candidate before it is dropped (>= 0).
        timeout: seconds per checker call (None: no limit).
    """
    n = len(texts)
    outcome = run_checks(checker, list(texts) + list(drafts) + [reference], timeout)
    if not outcome.ok:
        logger.warning("safety: every candidate withheld: %s", outcome.reason)
        reports = [SafetyReport("withheld", reason=outcome.reason) for _ in range(n)]
        return Screened([None] * n, reports, [], [], "", withheld=outcome.reason)
    flags = outcome.flags
    final_flags, draft_flags, ref_flags = flags[:n], flags[n:-1], flags[-1]
    out_texts: list[str | None] = []
    reports, stats = [], []
    for k in range(n):
        report = SafetyReport("passed", flags=list(final_flags[k]),
                              draft_flags=list(draft_flags[chosen[k]]))
        text, ids, found = texts[k], list(token_ids[k]), final_flags[k]
        banned: list[str] = []
        while found:
            if report.attempts >= repairs:
                report.action, report.reason = "dropped", (
                    f"still flagged after {report.attempts} repair(s)" if report.attempts
                    else "flagged, and repairs are off")
                text = None
                break
            report.attempts += 1
            report.action = "repairing"
            keep = _prefix_tokens(tokenizer, ids, min(f.start for f in found))
            banned = list(dict.fromkeys(banned + _banned_terms(found)))
            constraints = ConstraintSet(list(processors) + [BannedPhrases(tokenizer, banned)])
            context = torch.cat([prompt_ids, torch.tensor([ids[:keep]], dtype=prompt_ids.dtype)],
                                dim=1) if keep else prompt_ids
            seed = [int(seeds[k]) + 7919 * report.attempts]
            result = generate(model, tokenizer, context, max_new_tokens=max_length - keep,
                              schedule=knobs(seed), seeds=seed, logit_processor=constraints)
            stats.append(result.stats)
            ids = ids[:keep] + result.token_ids[0]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            again: CheckOutcome = run_checks(checker, [text], timeout)
            if not again.ok:
                report.action, report.reason, text = "withheld", again.reason, None
                break
            found = again.flags[0]
            report.flags.extend(found)
        if report.action == "repairing":
            report.action = "repaired"
        out_texts.append(text)
        reports.append(report)
    return Screened(out_texts, reports, [redact(d, f) for d, f in zip(drafts, draft_flags)],
                    [list(f) for f in draft_flags], redact(reference, ref_flags), stats)
