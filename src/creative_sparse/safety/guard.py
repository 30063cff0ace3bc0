"""Running a checker safely, what a check decided, and the gate on high sparsity.

* :func:`run_checks`: call a checker with a deadline. A checker that raises, runs
  past ``timeout`` seconds or answers in the wrong shape does not crash generation:
  the outcome carries no flags and a ``reason``, and the caller withholds the texts.
  (A timed-out checker's thread cannot be killed in Python; it is left to finish in
  the background and its answer is ignored.)
* :class:`SafetyReport`: per returned (or dropped) candidate, what was flagged,
  where, and what was done: ``"passed"``, ``"repaired"``, ``"dropped"`` or
  ``"withheld"``.
* :func:`check_gate`: levels above :data:`DEFAULT_SAFETY_GATE` (0.8, the top of the
  diverge range 0.6–0.8 of the design) need ``allow_high_sparsity=True`` for
  outputs returned to the caller.
"""

from __future__ import annotations

import concurrent.futures as futures
from dataclasses import dataclass, field
from typing import Sequence

from .checkers import Flag, SafetyChecker

__all__ = ["DEFAULT_SAFETY_GATE", "CheckOutcome", "HighSparsityError", "SafetyReport",
           "check_gate", "check_gate_value", "redact", "run_checks"]

DEFAULT_SAFETY_GATE = 0.8


@dataclass(frozen=True)
class CheckOutcome:
    """Flags per text (``None`` when the check failed) and why it failed."""

    flags: list[list[Flag]] | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.flags is not None


def run_checks(checker: SafetyChecker, texts: Sequence[str],
               timeout: float | None = 10.0) -> CheckOutcome:
    """``checker.check(texts)`` with a deadline of ``timeout`` seconds (None: no limit).

    Never raises for the checker's sake: an exception, a timeout or an answer that is
    not one list of :class:`Flag` per text gives ``CheckOutcome(None, reason)``.
    """
    texts = list(texts)
    if not texts:
        return CheckOutcome([])
    pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="safety-check")
    try:
        future = pool.submit(checker.check, texts)
        try:
            flags = future.result(timeout=timeout)
        except futures.TimeoutError:
            return CheckOutcome(None, f"safety checker {getattr(checker, 'name', checker)!r} "
                                      f"timed out after {timeout:g} s")
        except Exception as err:  # a broken checker withholds, it does not crash generation
            return CheckOutcome(None, f"safety checker {getattr(checker, 'name', checker)!r} "
                                      f"raised {type(err).__name__}: {err}")
    finally:
        pool.shutdown(wait=False)
    if not isinstance(flags, (list, tuple)) or len(flags) != len(texts) or not all(
            isinstance(f, (list, tuple)) and all(isinstance(x, Flag) for x in f) for f in flags):
        return CheckOutcome(None, f"safety checker {getattr(checker, 'name', checker)!r} "
                                  f"answered {type(flags).__name__} {flags!r:.80}; expected "
                                  f"one list of Flag per text ({len(texts)})")
    return CheckOutcome([list(f) for f in flags])


@dataclass
class SafetyReport:
    """What the checks found in one candidate and what was done about it.

    ``action``: ``"passed"`` (clean), ``"repaired"`` (cut before a flagged span and
    continued with the flagged words banned; ``attempts`` repairs), ``"dropped"``
    (still flagged after the last repair, or nothing left to repair from) or
    ``"withheld"`` (the checker failed; ``reason`` says how). ``flags`` holds every
    flag found on the way (the spans index the text that was checked then), ``draft_flags``
    those of the draft the candidate grew from.
    """

    action: str
    flags: list[Flag] = field(default_factory=list)
    draft_flags: list[Flag] = field(default_factory=list)
    attempts: int = 0
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"action": self.action, "flags": [f.to_dict() for f in self.flags],
                "draft_flags": [f.to_dict() for f in self.draft_flags],
                "attempts": self.attempts, "reason": self.reason}


class HighSparsityError(ValueError):
    """A level above the safety gate was asked for without ``allow_high_sparsity``."""


def check_gate(level: float, gate: float, allow: bool, what: str) -> None:
    """``HighSparsityError`` when ``level > gate`` and not ``allow``; ``what`` names the
    setting in the message.

    Example:
        >>> check_gate(0.7, 0.8, False, "Fixed(0.7)")
        >>> check_gate(0.9, 0.8, False, "Fixed(0.9)")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        creative_sparse.safety.guard.HighSparsityError: Fixed(0.9) returns text generated ...
    """
    if level > gate and not allow:
        raise HighSparsityError(
            f"{what} returns text generated at sparsity {level:g}, above the safety gate "
            f"{gate:g} (higher sparsity can raise the rate of inappropriate content; see "
            f"README, 'Safety and limitations'); pass allow_high_sparsity=True "
            f"(CLI: --allow-high-sparsity) to opt in, or use a level <= {gate:g}")


def check_gate_value(gate: float) -> float:
    """``gate`` as a float in [0, 1], else ``ValueError``."""
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0.0 <= gate <= 1.0:
        raise ValueError(f"safety_gate must be a level in [0, 1], got {gate!r}")
    return float(gate)


def redact(text: str, flags: Sequence[Flag], mark: str = "[flagged]") -> str:
    """``text`` with every flagged span replaced by ``mark`` (overlapping spans merged).

    Example:
        >>> redact("a gloop b", [Flag(2, 7, "word_list", "gloop", 1.0, "w")])
        'a [flagged] b'
    """
    merged: list[list[int]] = []
    for a, b in sorted((f.start, f.end) for f in flags):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out, pos = [], 0
    for a, b in merged:
        out += [text[pos:a], mark]
        pos = b
    return "".join(out) + text[pos:]
