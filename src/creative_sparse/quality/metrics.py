"""Quality metrics as pure functions of texts, embeddings or likelihoods.

Every per-output term is in ``[0, 1]``; no function returns NaN.

Embedding distances assume unit-normalised rows (see `creative_sparse.quality.embedding`):
for ``|a| = |b| = 1``, ``||a - b||^2 = 2 - 2 cos(a, b)`` lies in ``[0, 4]``, so every
distance below is ``||a - b||^2 / 4 = (1 - cos(a, b)) / 2``, in ``[0, 1]``
(0: same direction, 0.5: orthogonal, 1: opposite). With sentence embedders
cosines are rarely negative, so in practice values sit in ``[0, 0.5]``.

Terms:

- `novelty`:      ``N_i = min_{y in R} ||e(x_i) - e(y)||^2 / 4`` (nearest reference item).
- `diversity`:    ``D_i = mean_{j != i} ||e(x_i) - e(x_j)||^2 / 4``; ``D_i = 0`` when the
  set has a single output (nothing to differ from).
- `squash_nll`:   ``I_lm = 1 - exp(-max(0, nll - floor) / scale)``, with ``floor = 4.5``
  and ``scale = 3.0`` nats by default (team-written fluent answers under SmolLM2-135M,
  given their prompt, score 3.5-4.9 nats/token -> 0-0.13; shuffled words 6.4-8.1 -> 0.4-0.7).
- `nll_band`:     `squash_nll` plus the mirror penalty below ``low = 0.25`` nats (a
  text the model finds almost certain: copies, loops).
- `incoherence`:  ``I_i = 1 - (1 - band_i)(1 - min(1, lambda v_i)) prod_k (1 - o_k)`` with
  ``v_i`` the number of validator violations (`count_violations`), ``lambda = 1``, and
  further penalties ``o_k`` (degeneration, irrelevance).

Set-level lexical diversity (`distinct_n`, `self_bleu`, `compression_diversity`) is
computed on texts truncated to a common word window (the shortest text of the set
by default), because all three reward shorter texts by construction otherwise
(longer texts repeat more n-grams, share more with the others, compress better).

Example:
    >>> import torch
    >>> e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    >>> novelty(e, e[:1]).tolist()
    [0.0, 0.5]
    >>> diversity(e).tolist()
    [0.5, 0.5]
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "DISTINCT_THRESHOLD",
    "NLL_FLOOR",
    "NLL_LOW",
    "NLL_LOW_SCALE",
    "NLL_SCALE",
    "VIOLATION_WEIGHT",
    "Validator",
    "check_text",
    "check_texts",
    "compression_diversity",
    "count_violations",
    "distinct_n",
    "diversity",
    "incoherence",
    "nll_band",
    "novelty",
    "pairwise_distance",
    "self_bleu",
    "squash_nll",
    "words",
]

NLL_FLOOR = 4.5
"""Upper edge of the likelihood band (nats/token, under SmolLM2-135M, given the prompt):
no disfluency penalty below it. Team-written fluent answers score 3.5-4.9 given their
prompt, their shuffled words 6.4-8.1 (code: 0.9-2.4 and 4.0-5.8); clichés score 2.2-2.9,
so an edge much lower than the human level ranks clichés above original writing."""
NLL_SCALE = 3.0
"""Nats/token over the floor at which incoherence reaches ``1 - 1/e`` (~0.63)."""
DISTINCT_THRESHOLD = 0.66
"""Cosine (MiniLM) at or above which two outputs count as the same answer in
`distinct_answers`; chosen on the tuning half of team-written paraphrase pairs."""
NLL_LOW = 0.25
"""Nats/token below which a text is suspiciously predictable (loops, copies): see `nll_band`.
Low on purpose: the embedded model's own correct code scores 0.28-0.52 given its prompt
(an edge at 1.0 made every such answer half incoherent); echoes and loops, which score
0.1-0.6, are caught by `degeneration` instead."""
NLL_LOW_SCALE = 0.5
"""Nats/token under ``NLL_LOW`` at which that penalty reaches ``1 - 1/e``."""
VIOLATION_WEIGHT = 1.0
"""lambda: incoherence per validator violation, as a share (clipped at 1): one violation
makes a text fully incoherent, so it ranks below a valid text of equal novelty."""

Validator = Callable[[str], "int | float | bool"]
"""A constraint check: ``text -> number of violations`` (a bool counts as 0 or 1)."""

_WORD = re.compile(r"\w+|[^\w\s]")


def check_text(text: object, name: str = "text") -> str:
    """Validate one string: a ``str`` that is valid Unicode (encodable as UTF-8).

    A lone surrogate (``"\\ud800"``: half of a UTF-16 pair, or a byte that
    ``errors="surrogateescape"`` could not decode) cannot be tokenized; the
    tokenizers library would raise a ``TypeError`` that does not say why. It is
    refused, not replaced: silently changing a user's text would change the answer.

    Example:
        >>> check_text("caf\u00e9")
        'café'
        >>> check_text("a\\ud800b", "prompt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: prompt is not valid Unicode: it holds a lone surrogate U+D800 at index 1 ...
    """
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a str, got {type(text).__name__}: {text!r:.60}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{name} is not valid Unicode: it holds a lone surrogate "
                f"U+{ord(text[err.start]):04X} at index {err.start} (half of a UTF-16 pair, or "
                "an undecodable byte); decode the source as UTF-8 or drop the character, e.g. "
                "text.encode('utf-8', 'replace').decode()") from None
    return text


def check_texts(texts: object, name: str = "outputs") -> list[str]:
    """Validate a list of strings and return it as a list.

    Raises ``ValueError`` naming the argument for a bare string, a non-sequence or an
    item that fails `check_text`. An empty list is allowed (callers decide what it means).

    Example:
        >>> check_texts(("a", "b"))
        ['a', 'b']
    """
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ValueError(
            f"{name} must be a list of strings, got {type(texts).__name__}: {texts!r:.60}")
    for i, t in enumerate(texts):
        check_text(t, f"{name}[{i}]")
    return list(texts)


def _check_embeddings(e: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(e, torch.Tensor) or e.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [N, d], got {getattr(e, 'shape', type(e))}")
    return e.float()


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(1 - cos) / 2`` between rows of unit vectors ``a [N, d]`` and ``b [M, d]``: ``[N, M]``.

    Equal to ``||a_i - b_j||^2 / 4`` for unit rows, clamped to ``[0, 1]`` against
    rounding.

    Example:
        >>> pairwise_distance(torch.eye(2), torch.eye(2)).tolist()
        [[0.0, 0.5], [0.5, 0.0]]
    """
    a = _check_embeddings(a, "a")
    b = _check_embeddings(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding widths differ: {a.shape[1]} vs {b.shape[1]}")
    return ((1.0 - a @ b.T) * 0.5).clamp_(0.0, 1.0)


def novelty(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Distance of each output to its nearest reference item: ``[N]`` in ``[0, 1]``.

    ``N_i = min_j ||o_i - r_j||^2 / 4`` for unit rows ``outputs [N, d]``,
    ``reference [M, d]`` with ``M >= 1``.

    Example:
        >>> novelty(torch.eye(2), torch.eye(2)[:1]).tolist()
        [0.0, 0.5]
    """
    if reference.dim() != 2 or reference.shape[0] == 0:
        raise ValueError(
            f"the reference set is empty (shape {tuple(reference.shape)}); novelty needs at "
            "least one reference item")
    if outputs.shape[0] == 0:
        return torch.zeros(0)
    return pairwise_distance(outputs, reference).min(dim=1).values


def diversity(outputs: torch.Tensor) -> torch.Tensor:
    """Mean distance of each output to the other outputs: ``[N]`` in ``[0, 1]``.

    ``D_i = sum_{j != i} ||o_i - o_j||^2 / 4 / (N - 1)``; for ``N = 1`` it is ``0``
    (a single output differs from nothing), for ``N = 0`` an empty tensor.

    Example:
        >>> diversity(torch.eye(3)).tolist()
        [0.5, 0.5, 0.5]
    """
    n = outputs.shape[0]
    if n < 2:
        return torch.zeros(n)
    d = pairwise_distance(outputs, outputs)
    d.fill_diagonal_(0.0)
    return d.sum(dim=1) / (n - 1)


def squash_nll(nll: torch.Tensor, floor: float = NLL_FLOOR, scale: float = NLL_SCALE) -> torch.Tensor:
    """Map mean per-token NLL (nats) to ``[0, 1]``: ``1 - exp(-max(0, nll - floor) / scale)``.

    Monotone; ``+inf`` (a text with no tokens) maps to 1. NaN is rejected.

    Example:
        >>> squash_nll(torch.tensor([2.0, 7.5, float("inf")])).tolist()
        [0.0, 0.6321205496788025, 1.0]
    """
    if scale <= 0 or not math.isfinite(scale) or not math.isfinite(floor):
        raise ValueError(f"need a finite floor and scale > 0, got floor={floor}, scale={scale}")
    nll = torch.as_tensor(nll, dtype=torch.float32)
    if torch.isnan(nll).any():
        raise ValueError(f"nll contains NaN: {nll.tolist()}")
    return 1.0 - torch.exp(-(nll - floor).clamp(min=0.0) / scale)


def nll_band(nll: torch.Tensor, floor: float = NLL_FLOOR, scale: float = NLL_SCALE,
             low: float = NLL_LOW, low_scale: float = NLL_LOW_SCALE) -> torch.Tensor:
    """Likelihood band: incoherence from NLL (nats/token) outside ``[low, floor]``, in ``[0, 1]``.

    Above the band, `squash_nll` (disfluency); below it, the mirror image
    ``1 - exp(-max(0, low - nll) / low_scale)``: text far *more* predictable than
    fluent writing is repetition or copying. ``low = 0`` switches the lower edge off.

    Example:
        >>> [round(x, 3) for x in nll_band(torch.tensor([0.05, 2.0, 7.5])).tolist()]
        [0.33, 0.0, 0.632]
    """
    if low_scale <= 0 or not math.isfinite(low_scale) or not math.isfinite(low) or low > floor:
        raise ValueError(f"need a finite low <= floor and low_scale > 0, got low={low}, "
                         f"floor={floor}, low_scale={low_scale}")
    high = squash_nll(nll, floor, scale)
    nll = torch.as_tensor(nll, dtype=torch.float32)
    below = 1.0 - torch.exp(-(low - nll).clamp(min=0.0) / low_scale)
    return (high + below).clamp(0.0, 1.0)


def count_violations(texts: Sequence[str], validators: Sequence[Validator]) -> torch.Tensor:
    """Total violations per text over all validators: ``[N]`` float, ``>= 0``.

    Each validator maps a text to a count (``True`` counts as 1). Negative or
    non-finite counts raise ``ValueError``.

    Example:
        >>> count_violations(["ok", "x" * 90], [lambda t: len(t) > 80]).tolist()
        [0.0, 1.0]
    """
    out = torch.zeros(len(texts))
    for v in validators:
        for i, t in enumerate(texts):
            c = float(v(t))
            if not math.isfinite(c) or c < 0:
                raise ValueError(
                    f"validator {getattr(v, '__name__', v)!r} returned {c} for text {i}; "
                    "allowed: a bool or a finite count >= 0")
            out[i] += c
    return out


def incoherence(nll: torch.Tensor, violations: torch.Tensor | None = None, *,
                floor: float = NLL_FLOOR, scale: float = NLL_SCALE,
                violation_weight: float = VIOLATION_WEIGHT, low: float = 0.0,
                low_scale: float = NLL_LOW_SCALE,
                others: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``I = 1 - (1 - band) (1 - min(1, lambda v)) prod_k (1 - o_k)``: ``[N]`` in ``[0, 1]``.

    ``band`` is `nll_band` (with the default ``low = 0``, only the upper edge, i.e.
    `squash_nll`); ``v`` the validator violations; ``others`` further per-text
    penalties in ``[0, 1]`` (degeneration, irrelevance). A noisy-OR: each piece of
    evidence can push I to 1 on its own, and none can make it negative.

    Example:
        >>> incoherence(torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.3])).tolist()
        [0.0, 0.30000001192092896]
    """
    if violation_weight < 0 or not math.isfinite(violation_weight):
        raise ValueError(f"violation_weight must be finite and >= 0, got {violation_weight}")
    keep = 1.0 - nll_band(nll, floor, scale, low, low_scale)
    if violations is not None:
        v = torch.as_tensor(violations, dtype=torch.float32)
        keep = keep * (1.0 - (violation_weight * v).clamp(0.0, 1.0))
    for o in others:
        keep = keep * (1.0 - torch.as_tensor(o, dtype=torch.float32).clamp(0.0, 1.0))
    return (1.0 - keep).clamp(0.0, 1.0)


# ---------------------------------------------------------------- lexical, set level

def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens. Example: ``words("Hi, you") == ['hi', ',', 'you']``."""
    return _WORD.findall(text.lower())


def _windowed(texts: Sequence[str], window: int | None) -> list[list[str]]:
    toks = [words(t) for t in check_texts(texts, "texts")]
    if window is None:
        window = min((len(t) for t in toks), default=0)
    elif window < 1:
        raise ValueError(f"window must be >= 1 words or None, got {window}")
    return [t[:window] for t in toks]


def _ngrams(toks: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def distinct_n(texts: Sequence[str], n: int = 2, window: int | None = None) -> float:
    """Distinct-n of a set: unique n-grams / total n-grams over all texts, in ``[0, 1]``.

    Texts are first truncated to ``window`` words (default: the shortest text's
    length), since distinct-n falls with length by construction. 0 when there are no
    n-grams (all texts shorter than ``n`` words). N identical texts score ``1/N``.

    Example:
        >>> distinct_n(["a b c", "a b d"], n=2)
        0.75
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [g for t in _windowed(texts, window) for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _bleu(hyp: list[str], refs: list[list[str]], max_n: int) -> float:
    if not hyp:
        return 0.0
    logp = 0.0
    for n in range(1, max_n + 1):
        h = Counter(_ngrams(hyp, n))
        total = sum(h.values())
        best: Counter = Counter()
        for r in refs:
            best |= Counter(_ngrams(r, n))
        match = sum(min(c, best[g]) for g, c in h.items())
        # add-one smoothing (Lin & Och 2004) keeps short texts from scoring exactly 0
        logp += math.log((match + 1) / (total + 1)) / max_n
    ref_len = min((len(r) for r in refs), key=lambda x: (abs(x - len(hyp)), x))
    bp = 1.0 if len(hyp) >= ref_len else math.exp(1 - ref_len / len(hyp))
    return bp * math.exp(logp)


def self_bleu(texts: Sequence[str], max_n: int = 4, window: int | None = None) -> float:
    """Mean BLEU-``max_n`` of each text against all others, in ``[0, 1]`` (lower = more diverse).

    Smoothed (add-one on every order), texts truncated to a common ``window`` as in
    `distinct_n`. Defined as 0 for fewer than two texts. ``1 - self_bleu`` is a
    diversity.

    Example:
        >>> self_bleu(["the cat sat", "the cat sat"])
        1.0
    """
    toks = _windowed(texts, window)
    if len(toks) < 2:
        return 0.0
    scores = [_bleu(t, toks[:i] + toks[i + 1:], max_n) for i, t in enumerate(toks)]
    return min(1.0, sum(scores) / len(scores))


def _zlen(data: bytes) -> int:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: no header to bias short texts
    return len(c.compress(data) + c.flush())


def compression_diversity(texts: Sequence[str], window: int | None = None) -> float:
    """How little the set compresses jointly compared with separately, in ``[0, 1]``.

    ``r = Z(concat) / sum_i Z(t_i)`` (``Z`` = raw-deflate size), rescaled from
    ``[1/N, 1]`` to ``[0, 1]``: ``(r - 1/N) / (1 - 1/N)``, clipped. N identical texts
    score ~0; texts sharing nothing ~1. 0 for fewer than two non-empty texts.

    Example:
        >>> compression_diversity(["same text here"] * 4) < 0.1
        True
    """
    toks = [t for t in _windowed(texts, window) if t]
    if len(toks) < 2:
        return 0.0
    parts = [" ".join(t).encode() for t in toks]
    r = _zlen(b"\n".join(parts)) / sum(_zlen(p) for p in parts)
    n = len(parts)
    return float(min(1.0, max(0.0, (r - 1 / n) / (1 - 1 / n))))
