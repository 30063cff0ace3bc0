"""The seed library's import path. Re-exports only; the code lives in :mod:`creative_sparse`.

The attention functions load eagerly (the attention stack only); the seed's
generation, quality and autotune names load on first use.

    >>> from spas_sage_attn import spas_sage2_attn_meansim_cuda
    >>> from spas_sage_attn import CreativeSparseWrapper, SparsityConfig, QualityWeights
    >>> from spas_sage_attn import find_optimal_sparsity
    >>> from spas_sage_attn.autotune import find_optimal_sparsity
"""


from creative_sparse._lazy import lazy_attributes
from creative_sparse.attention import (
    block_sparse_sage2_attn_cuda,
    spas_sage2_attn_meansim_cuda,
    spas_sage2_attn_meansim_topk_cuda,
    spas_sage_attn_meansim_cuda,
    spas_sage_attn_meansim_topk_cuda,
)

_LAZY = {
    **dict.fromkeys(("CreativeSparseWrapper", "QualityFunctional", "QualityWeights",
                     "SparsityConfig", "SparsityController", "compute_quality_score"),
                    ".creative_sparse"),
    "find_optimal_sparsity": ".autotune",
}

__all__ = [
    "CreativeSparseWrapper",
    "QualityFunctional",
    "QualityWeights",
    "SparsityConfig",
    "SparsityController",
    "block_sparse_sage2_attn_cuda",
    "compute_quality_score",
    "find_optimal_sparsity",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage2_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim_cuda",
    "spas_sage_attn_meansim_topk_cuda",
]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
