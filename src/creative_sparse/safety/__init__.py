"""Safety: content checkers, running them with a deadline, and the gate on high sparsity.

Higher sparsity makes a model's output less predictable, and with it the risk of
inappropriate content. This package holds what the library does about it:

* checkers (:mod:`~creative_sparse.safety.checkers`): the :class:`SafetyChecker`
  protocol, :class:`WordListChecker` (words and regexes), :class:`ProfanityCheck`
  (the default, offline; the ``safety`` extra), :class:`TransformersClassifier`
  (a team's own moderation model) and :class:`CompositeChecker`;
* :func:`run_checks` (a checker that raises or times out withholds the output
  instead of crashing generation) and :class:`SafetyReport`;
* the gate: levels above ``safety_gate`` (default :data:`DEFAULT_SAFETY_GATE`, 0.8)
  need ``allow_high_sparsity=True`` for outputs returned to the caller
  (:func:`check_gate`).

The Creative-Sparse wrapper treats the checks as a hard constraint of refine
(flagged candidates are repaired or dropped; see
:mod:`creative_sparse.generation.safe_refine`); the evaluation runner and
``sweep_sparsity`` record the flagged rate. Nothing is imported or loaded at
import time; the profanity model loads when a :class:`ProfanityCheck` is built.
"""

from .checkers import (CompositeChecker, Flag, ProfanityCheck, SafetyChecker,
                       TransformersClassifier, WordListChecker, default_checker, segments)
from .guard import (DEFAULT_SAFETY_GATE, CheckOutcome, HighSparsityError, SafetyReport,
                    check_gate, check_gate_value, redact, run_checks)

__all__ = ["DEFAULT_SAFETY_GATE", "CheckOutcome", "CompositeChecker", "Flag",
           "HighSparsityError", "ProfanityCheck", "SafetyChecker", "SafetyReport",
           "TransformersClassifier", "WordListChecker", "check_gate", "check_gate_value",
           "default_checker", "redact", "resolve_checker", "run_checks", "segments"]


def resolve_checker(safety) -> "SafetyChecker | None":
    """The checker a ``safety=`` argument names: ``"default"`` (:func:`default_checker`;
    without the ``safety`` extra a warning and no checker), ``None`` (checks off) or a
    :class:`SafetyChecker`. Anything else is a ``ValueError``."""
    import warnings

    if safety is None:
        return None
    if isinstance(safety, str):
        if safety != "default":
            raise ValueError(f"safety must be 'default', None or a SafetyChecker, got "
                             f"{safety!r}")
        try:
            return default_checker()
        except ImportError as err:
            warnings.warn(f"no content checks: {err}. Generation runs without safety checks, "
                          "and levels above the safety gate need allow_high_sparsity=True "
                          "for drafts too", RuntimeWarning, stacklevel=3)
            return None
    if not isinstance(safety, SafetyChecker):
        raise ValueError(f"safety must be 'default', None or a SafetyChecker (an object with "
                         f"name and check(texts)), got {type(safety).__name__}")
    return safety
