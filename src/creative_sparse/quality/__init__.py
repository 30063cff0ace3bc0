"""Quality functional Q = alpha Novelty + beta Diversity - gamma Incoherence, per output.

Q sees the prompt when given one (relevance, the NLL given the prompt, prompt
echoes), punishes degeneration (`degeneration`), and is validated on a shipped
calibration suite (`calibration`). Importing this package loads nothing: the
embedder and the language model are loaded on first use. See ``docs/quality.md``.

Example:
    >>> from creative_sparse.quality import QualityFunctional, compute_quality_score
    >>> qf = QualityFunctional()
"""

from .degeneration import (
    DegenerationLimits,
    brevity,
    compression_ratio,
    degeneration,
    echo_rate,
    list_stutter,
    repeated_ngram_rate,
)
from .embedding import Embedder, HiddenStateEmbedder, MiniLMEmbedder, embed_unique, minilm_dir
from .functional import RELEVANCE_RANGE, OutputQuality, QualityFunctional, compute_quality_score
from .metrics import (
    DISTINCT_THRESHOLD,
    NLL_FLOOR,
    NLL_LOW,
    NLL_LOW_SCALE,
    NLL_SCALE,
    VIOLATION_WEIGHT,
    compression_diversity,
    count_violations,
    distinct_n,
    diversity,
    incoherence,
    nll_band,
    novelty,
    pairwise_distance,
    self_bleu,
    squash_nll,
)
from .scoring import LikelihoodScorer
from .sets import distinct_answers, select_set

__all__ = [
    "DISTINCT_THRESHOLD",
    "NLL_FLOOR",
    "NLL_LOW",
    "NLL_LOW_SCALE",
    "NLL_SCALE",
    "RELEVANCE_RANGE",
    "VIOLATION_WEIGHT",
    "DegenerationLimits",
    "Embedder",
    "HiddenStateEmbedder",
    "LikelihoodScorer",
    "MiniLMEmbedder",
    "OutputQuality",
    "QualityFunctional",
    "brevity",
    "compression_diversity",
    "compression_ratio",
    "compute_quality_score",
    "count_violations",
    "degeneration",
    "distinct_answers",
    "distinct_n",
    "diversity",
    "echo_rate",
    "embed_unique",
    "incoherence",
    "list_stutter",
    "minilm_dir",
    "nll_band",
    "novelty",
    "pairwise_distance",
    "repeated_ngram_rate",
    "select_set",
    "self_bleu",
    "squash_nll",
]
