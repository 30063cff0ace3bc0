"""`QualityFunctional` and `compute_quality_score`: Q = alpha N + beta D - gamma I per output.

All three terms are per output and in ``[0, 1]`` (formulas in `metrics`), so
``Q_i = alpha * N_i + beta * D_i - gamma * I_i`` lies in ``[-gamma, alpha + beta]``.

With the prompt (``breakdown(outputs, reference_data, prompt=...)``), Q judges
answers to *that* prompt:

- relevance ``r_i`` in [0, 1]: how closely the output's embedding follows the
  prompt's (a ramp of their cosine, `relevance_range`); novelty and diversity
  count only as far as the output is on task (``N_i = r_i * N_raw``,
  ``D_i = r_i * D_raw``), and ``1 - r_i`` is evidence of incoherence;
- the NLL is the output's NLL *given the prompt's generation context*;
- echoing the prompt counts as degeneration.

Incoherence is a noisy-OR of the likelihood band (`metrics.nll_band`: too
unlikely, or far too likely as loops are), degeneration
(`creative_sparse.quality.degeneration`), irrelevance and validator violations
(one violation is full incoherence). Without a prompt, relevance is 1 and the NLL
is the text's alone (logged once).

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
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import QualityWeights
from . import metrics, sets
from .degeneration import DegenerationLimits, degeneration, ramp
from .embedding import Embedder, HiddenStateEmbedder, MiniLMEmbedder, embed_unique
from .scoring import LikelihoodScorer

__all__ = ["OutputQuality", "QualityFunctional", "compute_quality_score"]

logger = logging.getLogger(__name__)


RELEVANCE_RANGE = (0.10, 0.40)
"""Cosine between the prompt's and the output's MiniLM embeddings at which relevance is
0 and 1 (a ramp between): see ``docs/quality.md`` for how it was chosen."""

MAX_CACHE = 20_000


@dataclass(frozen=True)
class OutputQuality:
    """Breakdown of Q for one output: every term in [0, 1]; ``violations`` is a count.

    ``q = alpha * novelty + beta * diversity - gamma * incoherence``, where novelty and
    diversity are already multiplied by ``relevance`` (1 without a prompt).
    ``degeneration`` is the part of incoherence that `degeneration` found, ``nll`` the
    mean NLL (nats/token) the likelihood band saw (``inf`` for an empty text, NaN when
    a subclass computed coherence itself).
    """

    novelty: float
    diversity: float
    incoherence: float
    violations: float
    q: float
    relevance: float = 1.0
    degeneration: float = 0.0
    nll: float = math.nan


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.warning(message)


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
        violation_weight: lambda, incoherence per violation (default 1.0: one
            violation is full incoherence).
        nll_floor, nll_scale: the upper edge of the likelihood band (nats; see
            `metrics.nll_band`); nll_low, nll_low_scale: its lower edge (0 turns it off).
        relevance_range: cosine(prompt, output) at which relevance is 0 and 1.
        degeneration_limits: ramp ends of `degeneration.degeneration`.
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
                 nll_low: float = metrics.NLL_LOW, nll_low_scale: float = metrics.NLL_LOW_SCALE,
                 relevance_range: tuple[float, float] = RELEVANCE_RANGE,
                 degeneration_limits: DegenerationLimits = DegenerationLimits(),
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
        lo, hi = relevance_range
        if not (math.isfinite(lo) and math.isfinite(hi) and -1 <= lo < hi <= 1):
            raise ValueError(f"relevance_range must be two cosines -1 <= lo < hi <= 1, got "
                             f"{relevance_range!r}")
        if not isinstance(degeneration_limits, DegenerationLimits):
            raise ValueError("degeneration_limits must be a DegenerationLimits, got "
                             f"{type(degeneration_limits).__name__}")
        metrics.nll_band(torch.zeros(1), nll_floor, nll_scale, nll_low, nll_low_scale)  # checks
        metrics.incoherence(torch.zeros(1), violation_weight=violation_weight)
        self.weights = weights
        self._embedder = embedder
        self._scorer = scorer
        self.validators = list(validators)
        self.violation_weight = violation_weight
        self.nll_floor, self.nll_scale = nll_floor, nll_scale
        self.nll_low, self.nll_low_scale = nll_low, nll_low_scale
        self.relevance_range = (float(lo), float(hi))
        self.degeneration_limits = degeneration_limits
        self.reference_data = (None if reference_data is None
                               else self._check_reference(reference_data))
        self.on_missing_reference = on_missing_reference
        self._cache: dict[str, torch.Tensor] | None = None
        self._nll_cache: dict[tuple[str | None, str], float] = {}

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

    def nll(self, outputs: Sequence[str], prompt: str | None = None) -> torch.Tensor:
        """Mean NLL (nats/token) of each output, given ``prompt`` when one is passed.

        Remembered per (prompt, text) for the life of this object (at most
        ``MAX_CACHE`` entries), so texts scored again (a draft that became a
        final candidate) cost nothing.
        """
        outputs = metrics.check_texts(outputs)
        if prompt is not None and not _takes_second_argument(self.scorer.nll):
            _log_once(f"quality: {type(self.scorer).__name__}.nll takes no prompt; the NLL is "
                      "the text's alone")
            prompt = None
        cache = self._nll_cache
        missing = list(dict.fromkeys(t for t in outputs if (prompt, t) not in cache))
        if missing:
            values = self.scorer.nll(missing, prompt) if prompt is not None \
                else self.scorer.nll(missing)
            values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
            if values.numel() != len(missing):
                raise ValueError(f"the scorer returned {values.numel()} NLLs for "
                                 f"{len(missing)} texts")
            found = dict(zip(missing, values.tolist()))
            if len(cache) + len(missing) > MAX_CACHE:
                cache.clear()
            cache.update(((prompt, t), v) for t, v in found.items())
        else:
            found = {}
        return torch.tensor([found[t] if t in found else cache[(prompt, t)] for t in outputs])

    def clear_cache(self) -> None:
        """Forget the remembered NLLs (e.g. to time scoring, or after changing the scorer)."""
        self._nll_cache.clear()

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

    @staticmethod
    def _check_prompt(prompt: object) -> str | None:
        if prompt is None:
            _log_once("quality: no prompt given: relevance is not measured (1 for every "
                      "output), the NLL is the text's alone and prompt echoes go unseen; "
                      "pass prompt= to judge answers to it")
            return None
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str or None, got {type(prompt).__name__}: "
                             f"{prompt!r:.60}")
        metrics.check_text(prompt, "prompt")
        return prompt if prompt.strip() else None

    # ------------------------------------------------------------ terms (overridable)
    def compute_novelty(self, outputs: Sequence[str],
                        reference_data: Sequence[str] | None = None) -> list[float]:
        """Per-output novelty ``min_y ||e(x) - e(y)||^2 / 4`` over the reference set, in [0, 1]
        (before the relevance gate of `breakdown`)."""
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

    def compute_relevance(self, outputs: Sequence[str], prompt: str | None = None) -> list[float]:
        """Per-output relevance to ``prompt`` in [0, 1]: a ramp of the cosine between their
        embeddings over `relevance_range`; 1 for every output without a prompt."""
        outputs = metrics.check_texts(outputs)
        if prompt is None or not outputs:
            return [1.0] * len(outputs)
        with self._one_pass():
            e = self.embed([prompt] + outputs)
        cos = (e[1:] @ e[0]).tolist()
        return [ramp(c, *self.relevance_range) for c in cos]

    def compute_degeneration(self, outputs: Sequence[str],
                             prompt: str | None = None) -> list[float]:
        """Per-output degeneration in [0, 1] (repetition, loops, stuttering lists, prompt
        echo, brevity: `creative_sparse.quality.degeneration`)."""
        return [degeneration(t, prompt, self.degeneration_limits)
                for t in metrics.check_texts(outputs)]

    def compute_violations(self, outputs: Sequence[str]) -> list[float]:
        """Per-output number of validator violations (0 without validators)."""
        return metrics.count_violations(metrics.check_texts(outputs), self.validators).tolist()

    def compute_coherence(self, outputs: Sequence[str], prompt: str | None = None) -> list[float]:
        """Per-output coherence ``1 - I`` in [0, 1]: I is the noisy-OR of the likelihood
        band (NLL given ``prompt`` when there is one), degeneration, irrelevance and
        ``lambda * violations`` (module doc)."""
        return [1.0 - i for i in self._incoherence(metrics.check_texts(outputs), prompt)[0]]

    def _incoherence(self, outputs: list[str], prompt: str | None
                     ) -> tuple[list[float], list[float], list[float], list[float]]:
        """``(incoherence, degeneration, relevance, nll)`` per output."""
        if not outputs:
            return [], [], [], []
        nll = self.nll(outputs, prompt)
        deg = self.compute_degeneration(outputs, prompt)
        rel = self.compute_relevance(outputs, prompt)
        inc = metrics.incoherence(
            nll, metrics.count_violations(outputs, self.validators),
            floor=self.nll_floor, scale=self.nll_scale, violation_weight=self.violation_weight,
            low=self.nll_low, low_scale=self.nll_low_scale,
            others=(torch.tensor(deg), 1.0 - torch.tensor(rel)))
        return inc.tolist(), deg, rel, nll.tolist()

    # ------------------------------------------------------------ aggregates
    def breakdown(self, outputs: Sequence[str], reference_data: Sequence[str] | None = None,
                  prompt: str | None = None, *, validators: Sequence[metrics.Validator] | None
                  = None) -> list[OutputQuality]:
        """One `OutputQuality` per output (empty list for no outputs).

        ``prompt`` is what the outputs answer (module doc: what changes without it);
        ``validators`` replace this functional's own for this call (e.g. a task's).
        """
        outputs = metrics.check_texts(outputs)
        prompt = self._check_prompt(prompt)
        if not outputs:
            return []
        if validators is not None:
            saved, self.validators = self.validators, list(validators)
            try:
                return self.breakdown(outputs, reference_data, prompt)
            finally:
                self.validators = saved
        n = len(outputs)
        deg, rel, nll = [0.0] * n, [1.0] * n, [math.nan] * n
        with self._one_pass():
            ref = reference_data if reference_data is not None else self.reference_data
            if ref is not None and type(self).compute_novelty is QualityFunctional.compute_novelty:
                extra = [prompt] if prompt is not None else []
                self.embed(outputs + self._check_reference(ref) + extra)  # one batch for all
            nov = _per_output(self.compute_novelty(outputs, reference_data), n, "compute_novelty")
            div = _per_output(self.compute_diversity(outputs), n, "compute_diversity")
            if type(self).compute_coherence is QualityFunctional.compute_coherence:
                inc, deg, rel, nll = self._incoherence(outputs, prompt)
            else:  # a subclass's coherence (the seed's signature takes no prompt)
                coh = _call_with_prompt(self.compute_coherence, outputs, prompt)
                inc = [1.0 - c for c in _per_output(coh, n, "compute_coherence")]
                rel = _per_output(self.compute_relevance(outputs, prompt), n,
                                  "compute_relevance")
        viol = self.compute_violations(outputs)
        w = self.weights
        out = []
        for a, b, i, v, r, d, x in zip(nov, div, inc, viol, rel, deg, nll):
            a, b = a * r, b * r
            out.append(OutputQuality(a, b, i, v, w.alpha * a + w.beta * b - w.gamma * i,
                                     r, d, x))
        return out

    def scores(self, outputs: Sequence[str], reference_data: Sequence[str] | None = None,
               prompt: str | None = None) -> list[float]:
        """Per-output Q, in ``[-gamma, alpha + beta]`` (empty list for no outputs)."""
        return [b.q for b in self.breakdown(outputs, reference_data, prompt)]

    def compute_quality_score(self, outputs: Sequence[str],
                              reference_data: Sequence[str] | None = None,
                              prompt: str | None = None) -> float:
        """Seed API: the mean per-output Q of the set (0.0 for no outputs)."""
        s = self.scores(outputs, reference_data, prompt)
        return sum(s) / len(s) if s else 0.0

    def select(self, outputs: Sequence[str], k: int,
               reference_data: Sequence[str] | None = None, prompt: str | None = None, *,
               validators: Sequence[metrics.Validator] | None = None) -> list[int]:
        """Indices of ``k`` outputs chosen for Q and mutual diversity together
        (`sets.select_set`): valid outputs first, then the greedy gain
        ``alpha N_i - gamma I_i + beta r_i * mean distance to those already chosen``.
        Not the top-k by individual Q, which picks near-copies of one good answer."""
        outputs = metrics.check_texts(outputs)
        with self._one_pass():
            parts = self.breakdown(outputs, reference_data, prompt, validators=validators)
            e = self.embed(outputs)
        w = self.weights
        own = [w.alpha * b.novelty - w.gamma * b.incoherence for b in parts]
        return sets.select_set(own, w.beta, metrics.pairwise_distance(e, e),
                                  [b.relevance for b in parts],
                                  [b.violations == 0 for b in parts], k)

    def distinct_answers(self, outputs: Sequence[str],
                         threshold: float | None = None) -> int:
        """How many different answers the set holds (NoveltyBench's distinct-k): outputs
        whose embeddings' cosine reaches ``threshold`` (default `DISTINCT_THRESHOLD`,
        calibrated on paraphrase pairs) are one answer. 0 for no outputs."""
        outputs = metrics.check_texts(outputs)
        if not outputs:
            return 0
        with self._one_pass():
            e = self.embed(outputs)
        return sets.distinct_answers(
            e, metrics.DISTINCT_THRESHOLD if threshold is None else threshold)

    def set_diversity(self, outputs: Sequence[str], window: int | None = None) -> dict[str, float]:
        """Set-level lexical diversity: ``distinct_1..4``, ``self_bleu``, ``compression``.

        All on texts truncated to a common word ``window`` (default: the shortest).
        """
        outputs = metrics.check_texts(outputs)
        out = {f"distinct_{n}": metrics.distinct_n(outputs, n, window) for n in range(1, 5)}
        out["self_bleu"] = metrics.self_bleu(outputs, window=window)
        out["compression"] = metrics.compression_diversity(outputs, window)
        return out


def _params(method) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return None


def _takes_second_argument(method) -> bool:
    params = _params(method)
    return params is None or len(params) >= 2 or any(
        p.kind is p.VAR_POSITIONAL for p in params)


def _call_with_prompt(method, outputs, prompt):
    """Call a term method with ``prompt=`` only where its signature takes it (seed overrides
    take ``(outputs)`` alone)."""
    params = _params(method)
    takes = params is not None and any(p.name == "prompt" for p in params)
    return method(outputs, prompt=prompt) if takes else method(outputs)


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
                          reference_data: Sequence[str] | None = None,
                          prompt: str | None = None) -> list[float]:
    """Seed API: per-output ``Q = nw * N + dw * D - cw * I`` with the default components.

    Terms are computed over the whole set (diversity is relative to the other outputs).
    Weights must be finite, >= 0, not all 0 (`QualityWeights` raises otherwise).

    Example:
        >>> compute_quality_score(["One.", "Two."], reference_data=["Zero."])  # doctest: +SKIP
        [0.0..., 0.0...]
    """
    weights = QualityWeights(novelty_weight, diversity_weight, coherence_weight)
    return QualityFunctional(weights).scores(outputs, reference_data, prompt)
