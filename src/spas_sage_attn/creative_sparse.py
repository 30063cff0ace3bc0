"""The seed's ``spas_sage_attn.creative_sparse`` module path. Re-exports only."""

from creative_sparse.config import QualityWeights, SparsityConfig
from creative_sparse.control import SparsityController
from creative_sparse.generation.wrapper import CreativeSparseWrapper
from creative_sparse.quality import QualityFunctional, compute_quality_score

__all__ = ["CreativeSparseWrapper", "QualityFunctional", "QualityWeights", "SparsityConfig",
           "SparsityController", "compute_quality_score"]
