"""Creative-Sparse: one dial, the sparsity level s in [0, 1], over generative models.

This release holds the sparse-attention core (the SpargeAttn algorithm on CPU
and GPU). Nothing is loaded or compiled at import time.

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

__version__ = "0.1.0"

__all__ = [
    "BlockMap",
    "QualityWeights",
    "SparsityConfig",
    "SparsityController",
    "SparsityParams",
    "block_sparse_attention",
    "block_sparse_sage2_attn_cuda",
    "predict_block_map",
    "sparse_attention",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage2_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim_cuda",
    "spas_sage_attn_meansim_topk_cuda",
    "use_backend",
]
