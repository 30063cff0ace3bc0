"""Quality functional Q = alpha Novelty + beta Diversity - gamma Incoherence, per output.

Importing this package loads nothing: the embedder and the language model are
loaded on first use. See ``docs/quality.md``.

Example:
    >>> from creative_sparse.quality import QualityFunctional, compute_quality_score
    >>> qf = QualityFunctional()
"""

from .embedding import Embedder, HiddenStateEmbedder, MiniLMEmbedder, embed_unique, minilm_dir
from .functional import OutputQuality, QualityFunctional, compute_quality_score
from .metrics import (
    NLL_FLOOR,
    NLL_SCALE,
    VIOLATION_WEIGHT,
    compression_diversity,
    count_violations,
    distinct_n,
    diversity,
    incoherence,
    novelty,
    pairwise_distance,
    self_bleu,
    squash_nll,
)
from .scoring import LikelihoodScorer

__all__ = [
    "NLL_FLOOR",
    "NLL_SCALE",
    "VIOLATION_WEIGHT",
    "Embedder",
    "HiddenStateEmbedder",
    "LikelihoodScorer",
    "MiniLMEmbedder",
    "OutputQuality",
    "QualityFunctional",
    "compression_diversity",
    "compute_quality_score",
    "count_violations",
    "distinct_n",
    "diversity",
    "embed_unique",
    "incoherence",
    "minilm_dir",
    "novelty",
    "pairwise_distance",
    "self_bleu",
    "squash_nll",
]
