"""Creative-Sparse: one dial, the sparsity level s in [0, 1], over generative models.

This release holds the sparse-attention core (the SpargeAttn algorithm on CPU
and GPU), the dial (control manifold), the knobs inside Hugging Face models,
the decoding engine, the quality functional, the Goldilocks model with
``find_optimal_sparsity``, and the diffusers integration
(``creative_sparse.models.diffusers``). Nothing is loaded or compiled at import time.

    >>> import torch
    >>> from creative_sparse import sparse_attention
    >>> q = k = v = torch.randn(1, 9, 512, 64)
    >>> out = sparse_attention(q, k, v, is_causal=True, topk=0.5)
"""

from .attention import (
    BlockMap,
    block_sparse_attention,
    block_sparse_sage2_attn_cuda,
    predict_block_map,
    sparse_attention,
    spas_sage2_attn_meansim_cuda,
    spas_sage2_attn_meansim_topk_cuda,
    spas_sage_attn_meansim_cuda,
    spas_sage_attn_meansim_topk_cuda,
    use_backend,
)

from .config import QualityWeights, SparsityConfig
from .control import SparsityController, SparsityParams
from .generation import CreativeSparseWrapper
from .quality import QualityFunctional, compute_quality_score
from .autotune import find_optimal_sparsity, sweep_sparsity

__version__ = "0.1.0"

__all__ = [
    "BlockMap",
    "CreativeSparseWrapper",
    "QualityFunctional",
    "QualityWeights",
    "SparsityConfig",
    "SparsityController",
    "SparsityParams",
    "block_sparse_attention",
    "block_sparse_sage2_attn_cuda",
    "compute_quality_score",
    "find_optimal_sparsity",
    "predict_block_map",
    "sparse_attention",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage2_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim_cuda",
    "spas_sage_attn_meansim_topk_cuda",
    "sweep_sparsity",
    "use_backend",
]
