"""`QualityFunctional` and `compute_quality_score`: Q = alpha N + beta D - gamma I per output.

All three terms are per output and in ``[0, 1]`` (formulas in `metrics`), so
``Q_i = alpha * N_i + beta * D_i - gamma * I_i`` lies in ``[-gamma, alpha + beta]``.

Reference set for novelty: the caller passes ``reference_data`` (per call, or once
at construction), typically the same model's low-temperature outputs for the same
prompt ("what the model would say anyway"). Without any reference, novelty cannot
be measured; ``on_missing_reference="zero"`` (default) scores it 0 for every output
and logs a warning, so Q reduces to ``beta D - gamma I``; ``"raise"`` raises
``ValueError``. Novelty relative to the other outputs is deliberately *not* used:
that is diversity.

Subclasses may override `compute_novelty`, `compute_diversity` and
`compute_coherence` (seed API); each may return one value per output or a single
number, which then applies to every output.

Example:
    >>> qf = QualityFunctional()                               # loads nothing yet
    >>> qf.scores(["A tale.", "A poem."], reference_data=["A story."])  # doctest: +SKIP
    [0.07..., 0.08...]
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import QualityWeights
from . import metrics
from .embedding import Embedder, HiddenStateEmbedder, MiniLMEmbedder, embed_unique
from .scoring import LikelihoodScorer

__all__ = ["OutputQuality", "QualityFunctional", "compute_quality_score"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputQuality:
    """Breakdown of Q for one output: every term in [0, 1]; ``violations`` is a count.

    ``q = alpha * novelty + beta * diversity - gamma * incoherence``.
    """

    novelty: float
    diversity: float
    incoherence: float
    violations: float
    q: float


@functools.lru_cache(maxsize=1)
def _default_scorer() -> LikelihoodScorer:
    return LikelihoodScorer()


@functools.lru_cache(maxsize=1)
def _default_embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


class QualityFunctional:
    """Per-output quality ``Q = alpha N + beta D - gamma I`` of a set of generated texts.

    Args:
        weights: `QualityWeights` (alpha, beta, gamma); default ``QualityWeights()``.
        embedder: an `Embedder`; default all-MiniLM-L6-v2 (shared, lazy), or the
            scorer's LM hidden states when MiniLM is not installed.
        scorer: a `LikelihoodScorer`, or a ``(model, tokenizer)`` pair; default the
            embedded SmolLM2 (shared, lazy).
        validators: callables ``text -> violations`` (bool or count) added to incoherence.
        violation_weight: lambda, incoherence per violation (default 0.1).
        nll_floor, nll_scale: the NLL squashing constants (nats; see `metrics.squash_nll`).
        reference_data: default reference set for novelty.
        on_missing_reference: ``"zero"`` or ``"raise"`` (see module doc).

    Example:
        >>> qf = QualityFunctional(QualityWeights(0.5, 0.3, 0.2))
        >>> qf.weights.alpha
        0.5
    """

    def __init__(self, weights: QualityWeights | None = None, embedder: Embedder | None = None,
                 scorer: LikelihoodScorer | tuple[Any, Any] | None = None, *,
                 validators: Sequence[metrics.Validator] = (),
                 violation_weight: float = metrics.VIOLATION_WEIGHT,
                 nll_floor: float = metrics.NLL_FLOOR, nll_scale: float = metrics.NLL_SCALE,
                 reference_data: Sequence[str] | None = None,
                 on_missing_reference: str = "zero") -> None:
        if weights is None:
            weights = QualityWeights()
        if not isinstance(weights, QualityWeights):
            raise ValueError(f"weights must be a QualityWeights, got {type(weights).__name__}")
        if on_missing_reference not in ("zero", "raise"):
            raise ValueError(
                f"on_missing_reference must be 'zero' or 'raise', got {on_missing_reference!r}")
        if isinstance(scorer, tuple):
            scorer = LikelihoodScorer(*scorer)
        metrics.squash_nll(torch.zeros(1), nll_floor, nll_scale)  # validates the constants
        metrics.incoherence(torch.zeros(1), violation_weight=violation_weight)
        self.weights = weights
        self._embedder = embedder
        self._scorer = scorer
        self.validators = list(validators)
        self.violation_weight = violation_weight
        self.nll_floor, self.nll_scale = nll_floor, nll_scale
        self.reference_data = (None if reference_data is None
                               else self._check_reference(reference_data))
        self.on_missing_reference = on_missing_reference
        self._cache: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------ components
    @property
    def scorer(self) -> LikelihoodScorer:
        """The likelihood scorer (the shared default SmolLM2 scorer unless one was given)."""
        if self._scorer is None:
            self._scorer = _default_scorer()
        return self._scorer

    @property
    def embedder(self) -> Embedder:
        """The embedder (MiniLM unless given; LM hidden states when MiniLM is missing)."""
        if self._embedder is None:
            try:
                from .embedding import minilm_dir

                minilm_dir()
                self._embedder = _default_embedder()
            except FileNotFoundError as e:
                logger.warning("%s Falling back to the language model's hidden states.", e)
                self._embedder = HiddenStateEmbedder(*self.scorer.load())
        return self._embedder

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings ``[N, d]``; within one `breakdown` call each text is embedded once."""
        return embed_unique(self.embedder, texts, self._cache if self._cache is not None else {})

    @contextlib.contextmanager
    def _one_pass(self) -> Iterator[None]:
        outer = self._cache is None
        if outer:
            self._cache = {}
        try:
            yield
        finally:
            if outer:
                self._cache = None

    @staticmethod
    def _check_reference(reference: Sequence[str]) -> list[str]:
        ref = metrics.check_texts(reference, "reference_data")
        if not ref:
            raise ValueError("reference_data is empty; pass None (no reference) or at least one text")
        return ref

    # ------------------------------------------------------------ terms (overridable)
    def compute_novelty(self, outputs: Sequence[str],
                        reference_data: Sequence[str] | None = None) -> list[float]:
        """Per-output novelty ``min_y ||e(x) - e(y)||^2 / 4`` over the reference set, in [0, 1]."""
        outputs = metrics.check_texts(outputs)
        ref = (self._check_reference(reference_data) if reference_data is not None
               else self.reference_data)
        if ref is None:
            if self.on_missing_reference == "raise":
                raise ValueError(
                    "novelty needs reference_data (e.g. the model's own low-temperature outputs "
                    "for the same prompt); none was given here or at construction")
            logger.warning("no reference_data: novelty is 0 for every output")
            return [0.0] * len(outputs)
        if not outputs:
            return []
        with self._one_pass():
            e = self.embed(outputs + ref)
        return metrics.novelty(e[: len(outputs)], e[len(outputs):]).tolist()

    def compute_diversity(self, outputs: Sequence[str]) -> list[float]:
        """Per-output mean distance to the other outputs, in [0, 1]; 0 for a single output."""
        outputs = metrics.check_texts(outputs)
        if len(outputs) < 2:
            return [0.0] * len(outputs)
        return metrics.diversity(self.embed(outputs)).tolist()

    def compute_violations(self, outputs: Sequence[str]) -> list[float]:
        """Per-output number of validator violations (0 without validators)."""
        return metrics.count_violations(metrics.check_texts(outputs), self.validators).tolist()

    def compute_coherence(self, outputs: Sequence[str]) -> list[float]:
        """Per-output coherence ``1 - I`` in [0, 1] (I: squashed NLL + lambda * violations)."""
        outputs = metrics.check_texts(outputs)
        if not outputs:
            return []
        inc = metrics.incoherence(
            self.scorer.nll(outputs), metrics.count_violations(outputs, self.validators),
            floor=self.nll_floor, scale=self.nll_scale, violation_weight=self.violation_weight)
        return (1.0 - inc).tolist()

    # ------------------------------------------------------------ aggregates
    def breakdown(self, outputs: Sequence[str],
                  reference_data: Sequence[str] | None = None) -> list[OutputQuality]:
        """One `OutputQuality` per output (empty list for no outputs)."""
        outputs = metrics.check_texts(outputs)
        if not outputs:
            return []
        n = len(outputs)
        with self._one_pass():
            ref = reference_data if reference_data is not None else self.reference_data
            if ref is not None and type(self).compute_novelty is QualityFunctional.compute_novelty:
                self.embed(outputs + self._check_reference(ref))  # one embedding batch for all
            nov = _per_output(self.compute_novelty(outputs, reference_data), n, "compute_novelty")
            div = _per_output(self.compute_diversity(outputs), n, "compute_diversity")
            coh = _per_output(self.compute_coherence(outputs), n, "compute_coherence")
        viol = self.compute_violations(outputs)
        w = self.weights
        return [OutputQuality(a, b, 1.0 - c, v, w.alpha * a + w.beta * b - w.gamma * (1.0 - c))
                for a, b, c, v in zip(nov, div, coh, viol)]

    def scores(self, outputs: Sequence[str],
               reference_data: Sequence[str] | None = None) -> list[float]:
        """Per-output Q, in ``[-gamma, alpha + beta]`` (empty list for no outputs)."""
        return [b.q for b in self.breakdown(outputs, reference_data)]

    def compute_quality_score(self, outputs: Sequence[str],
                              reference_data: Sequence[str] | None = None) -> float:
        """Seed API: the mean per-output Q of the set (0.0 for no outputs)."""
        s = self.scores(outputs, reference_data)
        return sum(s) / len(s) if s else 0.0

    def set_diversity(self, outputs: Sequence[str], window: int | None = None) -> dict[str, float]:
        """Set-level lexical diversity: ``distinct_1..4``, ``self_bleu``, ``compression``.

        All on texts truncated to a common word ``window`` (default: the shortest).
        """
        outputs = metrics.check_texts(outputs)
        out = {f"distinct_{n}": metrics.distinct_n(outputs, n, window) for n in range(1, 5)}
        out["self_bleu"] = metrics.self_bleu(outputs, window=window)
        out["compression"] = metrics.compression_diversity(outputs, window)
        return out


def _per_output(values: Any, n: int, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if values is None:
        raise ValueError(f"{name} returned None; expected a number or {n} numbers")
    if not isinstance(values, (list, tuple)):
        values = [float(values)] * n
    if len(values) != n:
        raise ValueError(f"{name} returned {len(values)} values for {n} outputs")
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} returned non-finite values: {values}")
    return values


def compute_quality_score(outputs: Sequence[str], novelty_weight: float = 0.4,
                          diversity_weight: float = 0.3, coherence_weight: float = 0.3,
                          reference_data: Sequence[str] | None = None) -> list[float]:
    """Seed API: per-output ``Q = nw * N + dw * D - cw * I`` with the default components.

    Terms are computed over the whole set (diversity is relative to the other outputs).
    Weights must be finite, >= 0, not all 0 (`QualityWeights` raises otherwise).

    Example:
        >>> compute_quality_score(["One.", "Two."], reference_data=["Zero."])  # doctest: +SKIP
        [0.0..., 0.0...]
    """
    weights = QualityWeights(novelty_weight, diversity_weight, coherence_weight)
    return QualityFunctional(weights).scores(outputs, reference_data)
