"""Validators: violations of a finished text, and prefixes that can no longer be valid.

A validator is called on a finished text and returns its number of violations
(the quality functional adds ``lambda * violations`` to incoherence). Each of
ours can also tell, during decoding, that a *prefix* has already failed
(:meth:`rejects_prefix`): the refine stage then takes the token back and samples
again (:class:`~creative_sparse.generation.constraints.ValidatorGuard`), so
violations are prevented instead of only counted.

* :data:`python_syntax`: 0 if the text (or its first fenced code block) parses
  as Python. Prefix: inside a fenced block, each finished line must leave the
  code complete or incomplete, never invalid (CPython's own incremental check,
  :func:`codeop.compile_command`), and the block may close only on complete code.
  Text outside fences is free. Near the end of the length budget, an open block
  whose code parses is closed (:meth:`closing`) instead of being cut mid-code.
* :data:`abc_notation`: ABC 2.1 structure (``X:`` first, ``T:``, ``K:`` ending the
  header, a body of music code with notes and bar lines, balanced brackets; see
  :mod:`~creative_sparse.generation.abc_tunes`). Prefix: the text must start with
  ``X:``, header lines are ``<letter>:``, ``K:`` comes after ``T:``, body lines are
  music code (no prose), a finished one has notes and a bar line, brackets close in
  order. Near the end of the budget a tune is closed with its open brackets' closers
  and a bar line (:meth:`closing`).
* :func:`banned_phrases`: how often any of the phrases occurs as a word or words
  (case-insensitive) anywhere in the text; the decoding side is
  :class:`~creative_sparse.generation.constraints.BannedPhrases`.
* :func:`regex_validator`: 0 if the whole (stripped) text matches. Prefix: the
  `regex <https://pypi.org/project/regex/>`_ library's partial matching says
  whether some continuation can still match, so the regex is enforced token by
  token without writing a matcher of our own.

Why these libraries: Python's ``ast``/``codeop`` are the reference parser and
its incremental mode; ``regex`` is the well-kept engine with partial matches.
ABC has no maintained lightweight parser on PyPI (music21 is large and slow to
import), so :mod:`~creative_sparse.generation.abc_tunes` checks the structural rules
of the standard that matter for "is this a tune", and nothing more.
"""

from __future__ import annotations

import ast
import codeop
import re
import warnings

import regex

from .abc_tunes import abc_notation

__all__ = ["abc_notation", "banned_phrases", "python_syntax", "regex_validator"]

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


class _PythonSyntax:
    __name__ = "python_syntax"

    def __call__(self, text: str) -> int:
        """0 if the text (or its first fenced code block) parses as Python, else 1."""
        match = _FENCE.search(text)
        return 0 if _parses(match.group(1) if match else text) else 1

    def rejects_prefix(self, text: str) -> bool:
        """True when the first fenced block already holds a line that no continuation
        can make valid, or closed on unfinished code."""
        start = text.find("```")
        body_at = text.find("\n", start) + 1 if start >= 0 else 0
        if start < 0 or body_at == 0:
            return False                       # no code block yet, or still on its fence line
        code = text[body_at:]
        end = code.find("```")
        if end >= 0:
            return not _parses(code[:end])
        finished = code[: code.rfind("\n") + 1]
        return bool(finished.strip()) and _compile_status(finished) == "invalid"

    def closing(self, text: str) -> str | None:
        """What would end the text validly right now: the closing fence of an open
        code block whose code parses as it stands, else ``None``."""
        start = text.find("```")
        body_at = text.find("\n", start) + 1 if start >= 0 else 0
        if start < 0 or body_at == 0 or "```" in text[body_at:]:
            return None
        code = text[body_at:]
        if not code.strip() or not _parses(code):
            return None
        return ("" if code.endswith("\n") else "\n") + "```"


def _parses(code: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _compile_status(code: str) -> str:
    """``"complete"``, ``"incomplete"`` (a valid start) or ``"invalid"``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            done = codeop.compile_command(code, "<generated>", "exec")
    except (SyntaxError, ValueError, OverflowError):
        return "invalid"
    return "complete" if done is not None else "incomplete"


python_syntax = _PythonSyntax()

class _RegexValidator:
    def __init__(self, pattern: str, flags: int = 0):
        try:
            self.full = re.compile(pattern, flags)
            self.partial = regex.compile(pattern, flags)
        except (re.error, regex.error) as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        self.__name__ = f"regex({pattern})"

    def __call__(self, text: str) -> int:
        """0 if the whole (stripped) text matches the pattern, else 1."""
        return 0 if self.full.fullmatch(text.strip()) else 1

    def rejects_prefix(self, text: str) -> bool:
        """True when no continuation of ``text`` can match the pattern."""
        return self.partial.fullmatch(text.strip(), partial=True) is None


def regex_validator(pattern: str, flags: int = 0) -> _RegexValidator:
    """A validator: 0 if the whole (stripped) text matches ``pattern``, else 1.

    Example:
        >>> yes_no = regex_validator(r"(yes|no)[.!]?")
        >>> yes_no("yes!"), yes_no("maybe"), yes_no.rejects_prefix("ye"), yes_no.rejects_prefix("ma")
        (0, 1, False, True)
    """
    return _RegexValidator(pattern, flags)


class _BannedPhrases:
    def __init__(self, phrases):
        if isinstance(phrases, str) or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise ValueError(f"phrases must be a list of non-empty strings, got {phrases!r}")
        # A phrase counts where it is a whole word (or words): not inside another word.
        # "[^\\W_]" is a letter or digit, the same test as BannedPhrases.rejects (isalnum).
        parts = [("(?<![^\\W_])" if p.strip()[0].isalnum() else "") + re.escape(p.strip())
                 + ("(?![^\\W_])" if p.strip()[-1].isalnum() else "") for p in phrases]
        self.pattern = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        self.phrases = list(phrases)
        self.__name__ = f"banned_phrases({', '.join(map(repr, self.phrases))})"

    def __call__(self, text: str) -> int:
        """Occurrences of the banned phrases in ``text`` (whole words, any case)."""
        return len(self.pattern.findall(text)) if self.pattern is not None else 0


def banned_phrases(phrases) -> _BannedPhrases:
    """A validator: the number of times any of ``phrases`` occurs in the text, as a
    whole word or words and in any case ("Robot" counts for "robot", "robots" and
    "carrobot" do not).

    Counted over the whole finished text, wherever a phrase came from: the decoding
    constraint keeps phrases out of the drafts and the refinement, this counts what
    got through anyway (e.g. a draft passed in from elsewhere).

    Example:
        >>> count = banned_phrases(["robot", "paint brush"])
        >>> count("The Robot held a paint brush. A robot's paint brushes; robots.")
        3
    """
    return _BannedPhrases(phrases)
