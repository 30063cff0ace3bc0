"""Constraint-aware decoding and validators.

Creative-Sparse (:mod:`~creative_sparse.generation.creative`) applies
:class:`BannedPhrases`, grammar masks and :class:`ValidatorGuard` to the drafts too
(they open the final texts); required keywords and a minimum length steer the refine
stage only.

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
* :class:`~creative_sparse.generation.grammar.GrammarMask`: a regex, a JSON schema
  or a context-free grammar as a token mask (llguidance): only tokens that keep
  the text inside the language can be sampled, so a finished row matches by
  construction. It runs first; softer steering after it can never revive a
  token it masked (a row left with nothing falls back to the mask alone).
* :class:`ValidatorGuard`: the validators of :mod:`~creative_sparse.generation.validators`
  that no grammar expresses (Python syntax, ABC notation, a user's own; a regex
  only when masks are switched off) enforced while decoding: a sampled token
  after which the text can no longer be valid is taken back and the row samples
  again (up to 8 times, then the best allowed of 1,024 candidates; a row with none
  allowed ends there, finish reason ``"refused"``, with a warning).

Validators also count violations in finished texts; the quality functional adds
``lambda * violations`` to incoherence (see :mod:`~creative_sparse.generation.validators`
for the rules and why ``codeop`` and the ``regex`` library do the parsing).

The other way, :func:`~creative_sparse.generation.processors.as_logits_processor`
turns a constraints spec into a ``transformers.LogitsProcessor`` for
``model.generate``, and the engine takes transformers' processors
(:mod:`~creative_sparse.generation.processors`).

Banned and required words are token-level and need the tokenizer's variants,
which a few lines handle exactly, so they use no grammar library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..quality.metrics import check_text
from .processors import TokenGuard, as_logits_processor
from .validators import abc_notation, python_syntax, regex_validator

__all__ = ["BannedPhrases", "ConstraintSet", "MinLength", "RequiredKeywords", "TokenGuard",
           "ValidatorGuard", "abc_notation", "as_logits_processor", "python_syntax",
           "regex_validator"]

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
        for i, phrase in enumerate(phrases):
            check_text(phrase, f"banned phrase {i}")
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
        for i, keyword in enumerate(keywords):
            check_text(keyword, f"required keyword {i}")
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
            # a token another constraint masked (-inf) is never forced back in
            tokens = [t for t in (self.first_tokens[k] for k in missing)
                      if torch.isfinite(logits[row, t])]
            if not tokens:
                continue
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
    """Several logit processors, plus validators for finished texts.

    Processors that guarantee a language (``guarantees = True``: grammar masks) run
    first; the others run after them in order. A row the later ones leave with no
    token at all (e.g. a minimum length masking the end of sequence while the
    grammar allows only that) gets the masks' logits back: the guarantee wins over
    the steering."""

    processors: list[Callable] = field(default_factory=list)
    validators: list[Callable[[str], int]] = field(default_factory=list)

    def __call__(self, step, generated, logits):
        hard = [p for p in self.processors if getattr(p, "guarantees", False)]
        for processor in hard:
            logits = processor(step, generated, logits)
        floor = logits
        for processor in self.processors:
            if processor not in hard:
                logits = processor(step, generated, logits)
        dead = torch.isneginf(logits).all(dim=-1)
        if hard and bool(dead.any()):
            logits = torch.where(dead[:, None], floor, logits)
        return logits

    def rejects(self, ids: list[int], token: int) -> bool:
        """Whether any processor with a ``rejects`` check refuses ``token`` after ``ids``."""
        return any(p.rejects(ids, token) for p in self.processors if hasattr(p, "rejects"))

    def violations(self, text: str) -> int:
        """Total violations of ``text`` over all validators."""
        return sum(int(v(text)) for v in self.validators)


class ValidatorGuard:
    """Enforce validators while decoding, through the engine's one-token backtracking.

    :meth:`rejects` refuses a token after which some validator's
    ``rejects_prefix(text)`` says no continuation can be valid, and an
    end-of-sequence token (``eos_ids``) while a validator still counts violations
    that more text could fix. A text that is already beyond repair (e.g. the draft
    a refine continues broke the rule) is left alone: refusing tokens cannot help it.
    With a length ``budget``, in its last ``closing_steps`` steps a row whose text
    a validator can end validly (``closing(text)``, e.g. the fence of a code block
    whose code parses) is steered to that ending instead of being cut mid-way.
    The text is the row's whole answer so far (the draft included when a refine
    continues one). Validators without ``rejects_prefix`` are only counted at the end.
    """

    def __init__(self, tokenizer, validators: Sequence[Callable[[str], int]],
                 eos_ids: Sequence[int] = (), budget: int | None = None,
                 closing_steps: int = 12):
        self.tokenizer = tokenizer
        self.validators = [v for v in validators if hasattr(v, "rejects_prefix")]
        self.eos_ids = {int(e) for e in eos_ids}
        self.budget, self.closing_steps = budget, closing_steps
        self._judged: tuple[tuple[int, ...], str, list[bool]] | None = None

    def without_closing(self) -> "ValidatorGuard":
        """The same guard with no length budget, so it never steers to an ending: for
        a stage that is not the last (Creative-Sparse's drafts, whose budget is not the
        answer's)."""
        return ValidatorGuard(self.tokenizer, self.validators, sorted(self.eos_ids), None,
                              self.closing_steps)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _before(self, ids: list[int]) -> tuple[str, list[bool]]:
        """The row's text and each validator's "beyond repair" verdict on it, kept for
        the next call: resampling asks about many tokens after the same ``ids``."""
        key = tuple(ids)
        if self._judged is None or self._judged[0] != key:
            text = self._text(ids)
            self._judged = (key, text, [v.rejects_prefix(text) for v in self.validators])
        return self._judged[1], self._judged[2]

    def rejects(self, ids: list[int], token: int) -> bool:
        """Whether ``token`` after the row's ``ids`` must be taken back (see the class doc)."""
        if not self.validators:
            return False
        if int(token) in self.eos_ids:
            text, dead = self._before(ids)
            return any(v(text) > 0 and not gone for v, gone in zip(self.validators, dead))
        after = self._text(list(ids) + [int(token)])
        failing = [i for i, v in enumerate(self.validators) if v.rejects_prefix(after)]
        return bool(failing) and not all(self._before(ids)[1][i] for i in failing)

    def __call__(self, step: int, generated: list[list[int]], logits: Tensor) -> Tensor:
        """Near the end of the budget, force the first token of a row's valid ending."""
        enders = [v.closing for v in self.validators if hasattr(v, "closing")]
        if self.budget is None or not enders or self.budget - step > self.closing_steps:
            return logits
        steered = logits
        for row, ids in enumerate(generated):
            text = self._text(ids)
            ending = next((e for e in (end(text) for end in enders) if e), None)
            if ending:
                first = self.tokenizer.encode(ending, add_special_tokens=False)[0]
                if not torch.isfinite(logits[row, first]):
                    continue          # another constraint masked it: do not force it back
                steered = logits.clone() if steered is logits else steered
                steered[row] = NEG_INF
                steered[row, first] = 0.0
        return steered
