"""Degeneration of one text, as pure functions of its characters and words.

Low per-token NLL does not mean good text: a language model assigns its highest
likelihood to repetition loops ("I'm not even going to try, I'm not even going to
try"), stuttering lists ("1. 1. - Does not talk. 2. 2. - Looks down.") and copies of
its own prompt. These functions see what the likelihood misses:

- `repeated_ngram_rate`: seq-rep-n (Welleck et al., 2019, "Neural text degeneration
  with unlikelihood training"): the share of a text's word n-grams that repeat an
  earlier n-gram of the same text. Fluent prose of 50-150 words scores 0-0.05 at
  n = 3; a loop scores 0.3-0.9.
- `compression_ratio`: raw-deflate bytes over UTF-8 bytes. Fluent English of a few
  hundred characters compresses to 0.55-0.75 of its size, loops to 0.15-0.4.
- `list_stutter`: list markers that repeat instead of counting ("1. 1.", "2. 2.").
- `echo_rate`: the share of a text's word trigrams that occur in the prompt.
- `brevity`: how far a text falls short of a minimum number of words.

`degeneration` combines them into one number in ``[0, 1]`` (0: none seen) by a
noisy-OR of ramps, each ramp 0 below the level fluent text reaches and 1 at the
level of a clear failure. The ramp ends were chosen on the tuning half of the
calibration suite (`creative_sparse.quality.calibration`); see ``docs/quality.md``.

Example:
    >>> round(repeated_ngram_rate("a b c a b c a b c", 3), 3)
    0.571
    >>> degeneration("The keeper climbed the stairs and lit the lamp before the storm.")
    0.0
    >>> degeneration("I am not going. " * 12) > 0.9
    True
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

from .metrics import _ngrams, words

__all__ = ["DegenerationLimits", "brevity", "compression_ratio", "degeneration",
           "echo_rate", "list_stutter", "ramp", "repeated_ngram_rate"]

_MARKER = re.compile(r"(?<![\w.])(\d{1,3})[.)]\s+(?:[-*]\s*)?\1[.)](?!\d)")


def ramp(x: float, lo: float, hi: float) -> float:
    """0 at or below ``lo``, 1 at or above ``hi``, linear between (``lo > hi`` ramps down).

    Example:
        >>> ramp(0.25, 0.0, 0.5), ramp(0.25, 0.5, 0.0)
        (0.5, 0.5)
    """
    if lo == hi:
        return float(x >= hi)
    t = (x - lo) / (hi - lo)
    return float(min(1.0, max(0.0, t)))


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    """seq-rep-n: ``1 - unique n-grams / n-grams`` over the text's words, in ``[0, 1)``.

    Words are lower-cased word and punctuation tokens (`metrics.words`). 0 for a
    text with fewer than ``n`` tokens.

    Example:
        >>> repeated_ngram_rate("the cat sat on the mat", 2)
        0.0
        >>> repeated_ngram_rate("go on go on go on", 2)
        0.6
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = _ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def compression_ratio(text: str) -> float:
    """Raw-deflate size over UTF-8 size, in ``(0, ~1.1]``; 1.0 for an empty text.

    Example:
        >>> compression_ratio("abc " * 50) < 0.2
        True
    """
    data = text.encode("utf-8", "surrogatepass")
    if not data:
        return 1.0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return len(c.compress(data) + c.flush()) / len(data)


def list_stutter(text: str) -> int:
    """How many list markers repeat instead of counting on (``"1. 1."``, ``"3) 3)"``).

    Example:
        >>> list_stutter("1. 1. - Does not talk. 2. 2. - Looks down.")
        2
        >>> list_stutter("1. Flour 2. Water 3. Salt")
        0
    """
    return len(_MARKER.findall(text))


def echo_rate(text: str, prompt: str | None) -> float:
    """Share of the text's word trigrams that occur in ``prompt``, in ``[0, 1]``.

    0 without a prompt or for a text of fewer than three tokens.

    Example:
        >>> echo_rate("write a poem about rain", "Write a poem about rain.")
        1.0
    """
    if not prompt:
        return 0.0
    grams = _ngrams(words(text), 3)
    if not grams:
        return 0.0
    seen = set(_ngrams(words(prompt), 3))
    return sum(g in seen for g in grams) / len(grams)


def brevity(text: str, min_words: int) -> float:
    """``max(0, 1 - words / min_words)``: 0 for a text of at least ``min_words`` words.

    Words here are runs of letters or digits (punctuation does not count).

    Example:
        >>> brevity("Three short words", 12)
        0.75
    """
    if min_words <= 0:
        return 0.0
    return max(0.0, 1.0 - len(re.findall(r"\w+", text)) / min_words)


@dataclass(frozen=True)
class DegenerationLimits:
    """Ramp ends of `degeneration` (each: no penalty at the first value, full at the second).

    Fields: ``rep3`` (seq-rep-3), ``compression`` (compression ratio, ramps down),
    ``echo`` (echo rate), ``stutter_weight`` (penalty per repeated list marker),
    ``min_words`` (`brevity`), ``min_chars_for_compression`` (shorter texts do not
    compress, so the ratio says nothing about them).
    """

    rep3: tuple[float, float] = (0.12, 0.40)
    compression: tuple[float, float] = (0.42, 0.25)
    echo: tuple[float, float] = (0.35, 0.80)
    stutter_weight: float = 0.5
    min_words: int = 10
    min_chars_for_compression: int = 200

    def __post_init__(self):
        for name in ("rep3", "compression", "echo"):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi:
                raise ValueError(f"DegenerationLimits.{name} = {(lo, hi)!r} must be two "
                                 "different finite numbers")
        if not (0 <= self.stutter_weight <= 1):
            raise ValueError(f"DegenerationLimits.stutter_weight = {self.stutter_weight!r} is "
                             "outside the allowed range [0, 1]")
        if self.min_words < 0 or self.min_chars_for_compression < 0:
            raise ValueError("DegenerationLimits: min_words and min_chars_for_compression must "
                             f"be >= 0, got {self.min_words}, {self.min_chars_for_compression}")


def degeneration(text: str, prompt: str | None = None,
                 limits: DegenerationLimits = DegenerationLimits()) -> float:
    """Degeneration of ``text`` in ``[0, 1]``: a noisy-OR ``1 - prod(1 - p_k)`` of

    repetition (seq-rep-3), compressibility (texts of at least
    ``limits.min_chars_for_compression`` characters), stuttering list markers,
    echoing the prompt (when given) and brevity. An empty or whitespace text is 1.

    Example:
        >>> degeneration("   ")
        1.0
    """
    if not text.strip():
        return 1.0
    parts = [ramp(repeated_ngram_rate(text, 3), *limits.rep3),
             min(1.0, limits.stutter_weight * list_stutter(text)),
             ramp(echo_rate(text, prompt), *limits.echo),
             brevity(text, limits.min_words)]
    if len(text) >= limits.min_chars_for_compression:
        parts.append(ramp(compression_ratio(text), *limits.compression))
    keep = 1.0
    for p in parts:
        keep *= 1.0 - p
    return 1.0 - keep
