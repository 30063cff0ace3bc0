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
  header, a body of notes with bar lines, balanced brackets). Prefix: the text
  must start with ``X:``, header lines are ``<letter>:``, ``K:`` comes after
  ``T:``, a finished body line has notes and a bar line, brackets close in order.
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
import), so the ABC rules here are the structural ones of the standard that
matter for "is this a tune", and nothing more.
"""

from __future__ import annotations

import ast
import codeop
import re
import warnings

import regex

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

_ABC_HEADER = re.compile(r"^([A-Za-z]):(.*)$")
_ABC_NOTE = re.compile(r"[A-Ga-gz]")
_ABC_PAIRS = {"[": "]", "(": ")", "{": "}"}


def _abc_parts(lines: list[str]) -> tuple[list[str], list[str], bool]:
    """``(header letters, body lines, whether K: was reached)``; the header block
    ends at the first non-header line or at ``K:``."""
    headers = []
    for i, line in enumerate(lines):
        match = _ABC_HEADER.match(line)
        if not match:
            return headers, lines[i:], False
        headers.append(match.group(1))
        if match.group(1) == "K":
            return headers, lines[i + 1:], True
    return headers, [], False


def _unbalanced(text: str) -> tuple[bool, bool]:
    """``(a bracket closed out of order, brackets left open)``."""
    stack = []
    for ch in text:
        if ch in _ABC_PAIRS:
            stack.append(_ABC_PAIRS[ch])
        elif ch in _ABC_PAIRS.values() and (not stack or stack.pop() != ch):
            return True, bool(stack)
    return False, bool(stack)


class _AbcNotation:
    __name__ = "abc_notation"

    def __call__(self, text: str) -> int:
        """Number of ABC well-formedness violations (0 = a well-formed tune).

        Checks: an ``X:`` header first, a ``T:`` header, a ``K:`` header that ends
        the header block, at least one body line with notes, bar lines in the
        body, and balanced ``[]``, ``()``, ``{}`` in the body.
        """
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        headers, body = [], []
        for i, line in enumerate(lines):      # prose lines before the header are skipped
            match = _ABC_HEADER.match(line)
            if match:
                headers.append(match.group(1))
                if match.group(1) == "K":
                    body = lines[i + 1:]
                    break
        violations = (not headers or headers[0] != "X") + ("T" not in headers) \
            + ("K" not in headers)
        notes = [ln for ln in body if _ABC_NOTE.search(ln) and not _ABC_HEADER.match(ln)]
        if not notes or not any("|" in ln for ln in notes):
            violations += 1
        misordered, left_open = _unbalanced("".join(notes))
        return violations + misordered + left_open

    def rejects_prefix(self, text: str) -> bool:
        """True when no continuation of ``text`` can be a well-formed tune."""
        stripped = text.lstrip()
        if stripped[:2] != "X:"[: len(stripped[:2])]:
            return True                                   # must open with X:
        lines = stripped.split("\n")
        finished, current = [ln.strip() for ln in lines[:-1]], lines[-1].strip()
        finished = [ln for ln in finished if ln]
        headers, body, keyed = _abc_parts(finished)
        if not keyed:
            if len(headers) < len(finished):
                return True                               # a non-header line before K:
            if current[:1] and not current[0].isalpha() or current[1:2] not in ("", ":"):
                return True                               # the header line being written
            return current.startswith("K") and "T" not in headers     # K: before T:
        if "T" not in headers:
            return True                                   # K: came before T:
        for line in body:
            if not _ABC_HEADER.match(line) and (not _ABC_NOTE.search(line) or "|" not in line):
                return True                               # a finished body line: notes, bars
        return _unbalanced("".join(ln for ln in body if not _ABC_HEADER.match(ln))
                           + current)[0]


abc_notation = _AbcNotation()


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
