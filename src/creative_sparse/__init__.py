"""Creative-Sparse: one dial, the sparsity level s in [0, 1], over generative models.

This release holds the sparse-attention core (the SpargeAttn algorithm on CPU
and GPU), the dial (control manifold), the knobs inside Hugging Face models,
the decoding engine, the quality functional, the Goldilocks model with
``find_optimal_sparsity``, and the diffusers integration
(``creative_sparse.models.diffusers``). Nothing is loaded or compiled at import time,
and each public name imports its own layer only when first used.

    >>> import torch
    >>> from creative_sparse import sparse_attention
    >>> q = k = v = torch.randn(1, 9, 512, 64)
    >>> out = sparse_attention(q, k, v, is_causal=True, topk=0.5)
"""

from ._lazy import lazy_attributes
from ._version import __version__

# Public names and the module that defines each. They load on first use (PEP 562), so
# ``import creative_sparse.attention`` (or ``spas_sage_attn``) loads only the attention
# stack, not generation, quality, autotune and scipy.
_EXPORTS = {
    **dict.fromkeys(("BlockMap", "block_sparse_attention", "block_sparse_sage2_attn_cuda",
                     "predict_block_map", "sparse_attention", "spas_sage2_attn_meansim_cuda",
                     "spas_sage2_attn_meansim_topk_cuda", "spas_sage_attn_meansim_cuda",
                     "spas_sage_attn_meansim_topk_cuda", "use_backend"), ".attention"),
    **dict.fromkeys(("QualityWeights", "SparsityConfig"), ".config"),
    **dict.fromkeys(("SparsityController", "SparsityParams"), ".control"),
    "CreativeSparseWrapper": ".generation",
    **dict.fromkeys(("Knobs", "dial"), ".generation.knobs"),
    **dict.fromkeys(("clear_sparsity", "set_sparsity", "sparsity", "sparsity_stats"),
                    ".models.transformers"),
    **dict.fromkeys(("QualityFunctional", "compute_quality_score"), ".quality"),
    **dict.fromkeys(("find_optimal_sparsity", "sweep_sparsity"), ".autotune"),
}


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

__all__ = [
    "BlockMap",
    "CreativeSparseWrapper",
    "Knobs",
    "QualityFunctional",
    "QualityWeights",
    "SparsityConfig",
    "SparsityController",
    "SparsityParams",
    "block_sparse_attention",
    "block_sparse_sage2_attn_cuda",
    "clear_sparsity",
    "compute_quality_score",
    "dial",
    "find_optimal_sparsity",
    "predict_block_map",
    "set_sparsity",
    "sparse_attention",
    "sparsity",
    "sparsity_stats",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage2_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim_cuda",
    "spas_sage_attn_meansim_topk_cuda",
    "sweep_sparsity",
    "use_backend",
]
