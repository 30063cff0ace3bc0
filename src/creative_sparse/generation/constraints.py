"""Constraint-aware decoding (the refine stage) and validators.

Decoding-time constraints are logit processors for :func:`~creative_sparse.generation.engine.generate`
(``logit_processor=``), applied before temperature:

* :class:`BannedPhrases`: a phrase may never be completed. Every tokenization
  variant of the phrase (with and without a leading space, lower/capitalised)
  becomes a token sequence; when a row's last tokens equal a sequence's prefix,
  the token that would complete it is masked. Single-token words are masked
  outright.
* :class:`RequiredKeywords`: keywords that must appear. From the step where the
  remaining budget gets tight (``steer_from`` of the length budget), the first
  token of each missing keyword gets a logit bonus that grows to a forced choice
  in the last steps, so missing keywords are steered in before the budget ends.
* :class:`MinLength`: no end-of-sequence before ``min_tokens`` tokens.

Validators count violations in finished texts; the quality functional adds
``lambda * violations`` to incoherence:

* :func:`python_syntax`: 0 if ``ast.parse`` accepts the text (or its first
  fenced code block), else 1;
* :func:`abc_notation`: well-formedness of ABC music notation (headers X:, T:,
  K: present, K: last, a body of notes/bars, balanced brackets);
* :func:`regex_validator`: 0 if the whole text matches a pattern.

Why no grammar library: banned/required words are token-level and need the
tokenizer's variants, which a few lines handle exactly; the validators score
finished texts, where Python's own ``ast`` and ``re`` are the reference parsers.
ABC has no maintained lightweight parser on PyPI (music21 is large and slow to
import), so :func:`abc_notation` checks the structural rules of the ABC 2.1
standard that matter for "is this a tune" and nothing more.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["BannedPhrases", "ConstraintSet", "MinLength", "RequiredKeywords", "abc_notation",
           "python_syntax", "regex_validator"]

NEG_INF = float("-inf")


def _variants(phrase: str) -> set[str]:
    forms = {phrase, phrase.lower(), phrase[:1].upper() + phrase[1:]}
    return forms | {" " + f for f in forms}


def _token_sequences(tokenizer, phrase: str) -> list[tuple[int, ...]]:
    seqs = set()
    for form in _variants(phrase):
        ids = tuple(tokenizer.encode(form, add_special_tokens=False))
        if ids:
            seqs.add(ids)
    return sorted(seqs)


class BannedPhrases:
    """Never complete any of ``phrases`` (case variants and leading space included).

    Two layers: as a logit processor it masks the last token of every known
    tokenization of a phrase once the rest has been generated; and the decoding
    engine asks :meth:`rejects` about each sampled token before feeding it, so a
    phrase assembled from other pieces ("rob" + "ot") is caught at the text level:
    the token is taken back and the row samples again without it.

    Example:
        >>> ban = BannedPhrases(tokenizer, ["robot"])   # doctest: +SKIP
        >>> generate(..., logit_processor=ban)          # doctest: +SKIP
    """

    def __init__(self, tokenizer, phrases: Sequence[str]):
        if isinstance(phrases, str) or not all(isinstance(p, str) and p.strip()
                                               for p in phrases):
            raise ValueError(f"phrases must be a list of non-empty strings, got {phrases!r}")
        self.phrases = list(phrases)
        self.tokenizer = tokenizer
        self.sequences = [s for p in phrases for s in _token_sequences(tokenizer, p)]
        self._lower = [p.lower() for p in phrases]
        self._tail = max(len(seq) for seq in self.sequences) + 8 if self.sequences else 8

    def rejects(self, ids: list[int], token: int) -> bool:
        """Whether appending ``token`` to ``ids`` makes the text end in a banned phrase
        that starts a word (case-insensitive)."""
        tail = ids[-self._tail:]
        before = self.tokenizer.decode(tail, skip_special_tokens=True)
        after = self.tokenizer.decode(tail + [int(token)], skip_special_tokens=True).lower()
        if len(after) <= len(before):
            return False
        for phrase in self._lower:
            start = len(after) - len(phrase)
            if after.endswith(phrase) and (start == 0 or not after[start - 1].isalnum()) \
                    and start + len(phrase) > len(before):
                return True
        return False

    def __call__(self, step: int, generated: list[list[int]], logits: Tensor) -> Tensor:
        logits = logits.clone()
        for row, ids in enumerate(generated):
            for seq in self.sequences:
                prefix = seq[:-1]
                if not prefix or tuple(ids[-len(prefix):]) == prefix:
                    logits[row, seq[-1]] = NEG_INF
        return logits


class RequiredKeywords:
    """Steer missing ``keywords`` into each row before ``budget`` tokens are used.

    From step ``steer_from * budget`` on, the first token of every missing keyword
    (with a leading space) gets a bonus rising linearly to ``max_bonus``; in the
    last ``len(missing)`` steps the best missing keyword's token is forced.
    """

    def __init__(self, tokenizer, keywords: Sequence[str], budget: int, *,
                 steer_from: float = 0.5, max_bonus: float = 10.0):
        if isinstance(keywords, str) or not all(isinstance(k, str) and k.strip()
                                                for k in keywords):
            raise ValueError(f"keywords must be a list of non-empty strings, got {keywords!r}")
        if budget < 1 or not 0.0 <= steer_from <= 1.0:
            raise ValueError(f"budget must be >= 1 and steer_from in [0, 1], got {budget}, "
                             f"{steer_from}")
        self.tokenizer = tokenizer
        self.keywords = list(keywords)
        self.first_tokens = {k: tokenizer.encode(" " + k, add_special_tokens=False)[0]
                             for k in keywords}
        self.budget, self.steer_from, self.max_bonus = budget, steer_from, max_bonus

    def missing(self, ids: list[int]) -> list[str]:
        text = self.tokenizer.decode(ids, skip_special_tokens=True).lower()
        return [k for k in self.keywords if k.lower() not in text]

    def __call__(self, step: int, generated: list[list[int]], logits: Tensor) -> Tensor:
        start = int(self.steer_from * self.budget)
        if step < start:
            return logits
        logits = logits.clone()
        ramp = (step - start + 1) / max(1, self.budget - start)
        for row, ids in enumerate(generated):
            missing = self.missing(ids)
            if not missing:
                continue
            tokens = [self.first_tokens[k] for k in missing]
            if self.budget - step <= len(missing):
                best = max(tokens, key=lambda t: float(logits[row, t]))
                forced = torch.full_like(logits[row], NEG_INF)
                forced[best] = 0.0
                logits[row] = forced
            else:
                logits[row, tokens] += self.max_bonus * min(1.0, ramp)
        return logits


@dataclass
class MinLength:
    """No end-of-sequence token before ``min_tokens`` generated tokens."""

    eos_ids: Sequence[int]
    min_tokens: int

    def __call__(self, step: int, generated: list[list[int]], logits: Tensor) -> Tensor:
        if step >= self.min_tokens:
            return logits
        logits = logits.clone()
        logits[:, list(self.eos_ids)] = NEG_INF
        return logits


@dataclass
class ConstraintSet:
    """Several logit processors applied in order, plus validators for finished texts."""

    processors: list[Callable] = field(default_factory=list)
    validators: list[Callable[[str], int]] = field(default_factory=list)

    def __call__(self, step, generated, logits):
        for processor in self.processors:
            logits = processor(step, generated, logits)
        return logits

    def rejects(self, ids: list[int], token: int) -> bool:
        """Whether any processor with a ``rejects`` check refuses ``token`` after ``ids``."""
        return any(p.rejects(ids, token) for p in self.processors if hasattr(p, "rejects"))

    def violations(self, text: str) -> int:
        """Total violations of ``text`` over all validators."""
        return sum(int(v(text)) for v in self.validators)


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def python_syntax(text: str) -> int:
    """0 if the text (or its first fenced code block) parses as Python, else 1."""
    match = _FENCE.search(text)
    code = match.group(1) if match else text
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return 1
    return 0


_ABC_HEADER = re.compile(r"^([A-Za-z]):(.*)$")
_ABC_NOTE = re.compile(r"[A-Ga-gz]")
_ABC_PAIRS = {"[": "]", "(": ")", "{": "}"}


def abc_notation(text: str) -> int:
    """Number of ABC well-formedness violations (0 = a well-formed tune).

    Checks: an ``X:`` header first, a ``T:`` header, a ``K:`` header that ends the
    header block, at least one body line with notes, bar lines in the body, and
    balanced ``[]``, ``()``, ``{}`` in the body.
    """
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    violations = 0
    headers, body = [], []
    for i, line in enumerate(lines):
        match = _ABC_HEADER.match(line)
        if match and not body:
            headers.append(match.group(1))
            if match.group(1) == "K":
                body = lines[i + 1:]
                break
    if not headers or headers[0] != "X":
        violations += 1
    if "T" not in headers:
        violations += 1
    if "K" not in headers:
        violations += 1
    notes = [ln for ln in body if _ABC_NOTE.search(ln) and not _ABC_HEADER.match(ln)]
    if not notes:
        violations += 1
    elif not any("|" in ln for ln in notes):
        violations += 1
    stack = []
    for ch in "".join(notes):
        if ch in _ABC_PAIRS:
            stack.append(_ABC_PAIRS[ch])
        elif ch in _ABC_PAIRS.values():
            if not stack or stack.pop() != ch:
                violations += 1
                break
    violations += bool(stack)
    return violations


def regex_validator(pattern: str, flags: int = 0) -> Callable[[str], int]:
    """A validator: 0 if the whole (stripped) text matches ``pattern``, else 1."""
    try:
        compiled = re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None

    def validate(text: str) -> int:
        return 0 if compiled.fullmatch(text.strip()) else 1

    validate.__name__ = f"regex({pattern})"
    return validate
