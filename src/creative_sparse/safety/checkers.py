"""Content checkers: what a text says that it should not, and where.

A checker is any object with ``name`` and ``check(texts) -> list[list[Flag]]`` (one
list of :class:`Flag` per text, empty when the text is clean): the
:class:`SafetyChecker` protocol. Every flag carries a character span, so the
refine stage can cut the text before it and continue
(:mod:`creative_sparse.safety.repair`).

* :class:`WordListChecker`: the team's own words and regular expressions. Words
  match case-insensitively at word boundaries; patterns are validated when the
  checker is built (an empty word, a pattern that does not compile or that matches
  the empty string is a ``ValueError`` there, not a surprise later).
* :class:`ProfanityCheck`: the default. ``alt-profanity-check``, a maintained
  linear classifier whose model ships inside its PyPI package (no download, about
  1 ms per sentence on CPU). It scores a whole string, so the text is scored per
  sentence, a flagged sentence per clause and a flagged clause per word, and the
  narrowest flagged piece is the span. Needs the ``safety`` extra.
* :class:`TransformersClassifier`: a Hugging Face text-classification model (by
  name, or a ready ``pipeline``), for a team that has its own moderation model.
* :class:`CompositeChecker`: several checkers, their flags together.

Example:
    >>> checker = WordListChecker(["gloop"], patterns=[r"\\bzz+t\\b"])
    >>> [(f.start, f.end, f.text) for f in checker.check(["a gloop and a zzzt"])[0]]
    [(2, 7, 'gloop'), (14, 18, 'zzzt')]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

__all__ = ["CompositeChecker", "Flag", "ProfanityCheck", "SafetyChecker",
           "TransformersClassifier", "WordListChecker", "default_checker", "segments"]


@dataclass(frozen=True)
class Flag:
    """One flagged span of a text: ``text[start:end] == text`` (the matched text),
    ``category`` (e.g. ``"word_list"``, ``"profanity"`` or a classifier's label),
    ``score`` in [0, 1] (1.0 for a word-list match) and the ``checker``'s name."""

    start: int
    end: int
    category: str
    text: str
    score: float
    checker: str

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "category": self.category,
                "text": self.text, "score": self.score, "checker": self.checker}


@runtime_checkable
class SafetyChecker(Protocol):
    """What the wrapper, the evaluation runner and the sweeps call.

    ``check(texts)`` returns one list of :class:`Flag` per text, in order (empty:
    clean). It may raise or take long: callers run it through
    :func:`creative_sparse.safety.run_checks`, which turns both into a reason.
    """

    name: str

    def check(self, texts: Sequence[str]) -> list[list[Flag]]: ...


# Sentences end at . ! ? or a line break; clauses also at , ; : and dashes.
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_CLAUSE = re.compile(r"[^,;:\u2014\u2013]+")
_WORD = re.compile(r"[\w'*@$!-]+")


def segments(text: str, start: int = 0, end: int | None = None, *,
             pattern: re.Pattern = _SENTENCE) -> list[tuple[int, int]]:
    """``(start, end)`` spans of the non-blank pieces of ``text[start:end]`` (sentences by
    default; ``pattern`` splits otherwise), surrounding spaces trimmed.

    Example:
        >>> text = "One. Two, three!"
        >>> [text[a:b] for a, b in segments(text)]
        ['One.', 'Two, three!']
    """
    end = len(text) if end is None else end
    out = []
    for m in pattern.finditer(text, start, end):
        a, b = m.span()
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


class WordListChecker:
    """Flag ``words`` (case-insensitive, whole words; a phrase may hold spaces) and
    ``patterns`` (regular expressions, Python ``re`` syntax, case-insensitive).

    Raises ``ValueError`` at construction for a word that is empty or not a string, a
    pattern that does not compile (the message gives ``re``'s reason) or one that
    matches the empty string (it would flag every text), and when both lists are
    empty. :meth:`from_file` reads one word per line (``#`` starts a comment; a line
    ``re:<pattern>`` is a pattern).
    """

    def __init__(self, words: Iterable[str] = (), patterns: Iterable[str] = (), *,
                 category: str = "word_list", name: str = "word_list"):
        words, patterns = _strings(words, "words"), _strings(patterns, "patterns")
        if not words and not patterns:
            raise ValueError("WordListChecker needs at least one word or pattern; got none")
        compiled = []
        for i, word in enumerate(words):
            if not word.strip():
                raise ValueError(f"words[{i}] = {word!r} is empty; every word needs a "
                                 "non-space character")
            body = r"\s+".join(re.escape(w) for w in word.split())
            compiled.append(re.compile(rf"(?<!\w){body}(?!\w)", re.I))
        for i, pattern in enumerate(patterns):
            if not pattern:
                raise ValueError(f"patterns[{i}] is empty; a pattern must match something")
            try:
                regex = re.compile(pattern, re.I)
            except re.error as err:
                raise ValueError(f"patterns[{i}] = {pattern!r} is not a valid regular "
                                 f"expression: {err}") from None
            if regex.fullmatch(""):
                raise ValueError(f"patterns[{i}] = {pattern!r} matches the empty string, "
                                 "so it would flag every text; make it match at least "
                                 "one character")
            compiled.append(regex)
        self.words, self.patterns = words, patterns
        self._regexes = compiled
        self.category, self.name = category, name

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "WordListChecker":
        """A checker from a UTF-8 file: a word or phrase per line, ``re:<pattern>`` for
        a pattern, ``#`` comments and blank lines skipped."""
        words, patterns = [], []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            (patterns if line.startswith("re:") else words).append(
                line[3:] if line.startswith("re:") else line)
        return cls(words, patterns, **kwargs)

    def check(self, texts: Sequence[str]) -> list[list[Flag]]:
        out = []
        for text in texts:
            flags = [Flag(m.start(), m.end(), self.category, m.group(0), 1.0, self.name)
                     for regex in self._regexes for m in regex.finditer(text)
                     if m.end() > m.start()]
            out.append(sorted(flags, key=lambda f: (f.start, f.end)))
        return out


def _strings(values: Iterable[str], what: str) -> list[str]:
    if isinstance(values, str):
        raise ValueError(f"{what} must be a list of strings, got the single string "
                         f"{values!r}")
    values = list(values)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{what} must be strings, got {bad[0]!r} "
                         f"({type(bad[0]).__name__})")
    return values


class _SegmentScorer:
    """Shared by the classifiers: score sentences, then narrow a flagged one to its
    flagged clauses, and a flagged clause to its flagged words."""

    name = "classifier"
    threshold = 0.5

    def _scores(self, pieces: list[str]) -> list[tuple[float, str]]:
        """``(score, category)`` of each piece."""
        raise NotImplementedError

    def check(self, texts: Sequence[str]) -> list[list[Flag]]:
        out = []
        for text in texts:
            flags = []
            for level, pattern in ((0, _SENTENCE), (1, _CLAUSE), (2, _WORD)):
                spans = (segments(text, pattern=pattern) if level == 0 else
                         [s for f in flags for s in segments(text, f.start, f.end,
                                                             pattern=pattern)])
                if not spans:
                    break
                scores = self._scores([text[a:b] for a, b in spans])
                hits = [Flag(a, b, cat, text[a:b], float(p), self.name)
                        for (a, b), (p, cat) in zip(spans, scores) if p >= self.threshold]
                if level == 0:
                    flags = hits
                elif hits or level == 1:
                    # Keep a flagged sentence whose clauses are clean on their own
                    # (the offence is in the whole); a word only when it is flagged itself.
                    parents = flags
                    flags = [f for f in hits] + [p for p in parents if not any(
                        p.start <= h.start and h.end <= p.end for h in hits)]
                if not flags:
                    break
            out.append(sorted(flags, key=lambda f: (f.start, f.end)))
        return out


class ProfanityCheck(_SegmentScorer):
    """The default checker: ``alt-profanity-check`` (offensive or profane language),
    scored per sentence, narrowed to clause and word (see the module doc).

    Args:
        threshold: a piece is flagged when its probability is >= this, in (0, 1).

    Raises ``ImportError`` naming the extra when ``alt-profanity-check`` is missing
    (``pip install 'creative-sparse[safety]'``).
    """

    def __init__(self, threshold: float = 0.5, *, name: str = "profanity"):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
        try:
            from profanity_check import predict_prob
        except ImportError as err:
            raise ImportError("ProfanityCheck needs alt-profanity-check: pip install "
                              "'creative-sparse[safety]'") from err
        self._predict = predict_prob
        self.threshold, self.name = float(threshold), name

    def _scores(self, pieces):
        return [(float(p), "profanity") for p in self._predict(pieces)]


class TransformersClassifier(_SegmentScorer):
    """A Hugging Face text-classification model behind the checker protocol.

    Args:
        model: a model name or path for ``transformers.pipeline("text-classification")``
            (loaded as the hub's cache has it; nothing here turns downloads on), or a
            ready pipeline (any callable ``list[str] -> list[list[{"label", "score"}]]``).
        flag_labels: the labels that mean "offensive" (case-insensitive), e.g.
            ``("toxic", "offensive")``; the other labels never flag.
        threshold: a piece is flagged when a flag label's score is >= this, in (0, 1).

    Example:
        >>> checker = TransformersClassifier("unitary/toxic-bert",
        ...                                  flag_labels=["toxic"])   # doctest: +SKIP
    """

    def __init__(self, model, flag_labels: Sequence[str], threshold: float = 0.5, *,
                 name: str | None = None, device: str = "cpu"):
        labels = _strings(flag_labels, "flag_labels")
        if not labels or not all(label.strip() for label in labels):
            raise ValueError(f"flag_labels must name at least one non-empty label, got "
                             f"{flag_labels!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
        if isinstance(model, str):
            from transformers import pipeline

            self.pipeline = pipeline("text-classification", model=model, device=device)
            self.name = name or f"hf:{model}"
        elif callable(model):
            self.pipeline, self.name = model, name or "hf"
        else:
            raise ValueError(f"model must be a model name or a text-classification pipeline, "
                             f"got {type(model).__name__}")
        self.flag_labels = {label.lower() for label in labels}
        self.threshold = float(threshold)

    def _scores(self, pieces):
        results = self.pipeline(list(pieces), top_k=None, truncation=True)
        out = []
        for result in results:
            result = [result] if isinstance(result, dict) else result
            hits = [(float(r["score"]), str(r["label"])) for r in result
                    if str(r["label"]).lower() in self.flag_labels]
            out.append(max(hits) if hits else (0.0, "none"))
        return out


class CompositeChecker:
    """Several checkers as one: each text's flags from all of them, sorted by start."""

    def __init__(self, checkers: Sequence[SafetyChecker], *, name: str | None = None):
        checkers = list(checkers)
        if not checkers:
            raise ValueError("CompositeChecker needs at least one checker")
        bad = [c for c in checkers if not isinstance(c, SafetyChecker)]
        if bad:
            raise ValueError(f"not a safety checker (needs name and check(texts)): {bad[0]!r}")
        self.checkers = checkers
        self.name = name or "+".join(c.name for c in checkers)

    def check(self, texts: Sequence[str]) -> list[list[Flag]]:
        merged: list[list[Flag]] = [[] for _ in texts]
        for checker in self.checkers:
            for flags, more in zip(merged, checker.check(texts)):
                flags.extend(more)
        return [sorted(f, key=lambda x: (x.start, x.end)) for f in merged]


def default_checker(words: Iterable[str] = (), patterns: Iterable[str] = ()) -> SafetyChecker:
    """:class:`ProfanityCheck`, plus a :class:`WordListChecker` of ``words`` and
    ``patterns`` when given. ``ImportError`` (naming the ``safety`` extra) without
    alt-profanity-check."""
    words, patterns = list(words), list(patterns)
    base = ProfanityCheck()
    if not words and not patterns:
        return base
    return CompositeChecker([base, WordListChecker(words, patterns)])
