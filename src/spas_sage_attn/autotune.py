"""The seed's ``spas_sage_attn.autotune`` path. Re-exports only; the code lives in
:mod:`creative_sparse.autotune` (the Goldilocks search) and
:mod:`creative_sparse.autotune.sparge_module` (the original SpargeAttn's
``SparseAttentionMeansim`` module and its state-dict functions).

    >>> from spas_sage_attn.autotune import find_optimal_sparsity, sweep_sparsity
    >>> from spas_sage_attn.autotune import (SparseAttentionMeansim,
    ...     extract_sparse_attention_state_dict, load_sparse_attention_state_dict)
"""

from creative_sparse.autotune import find_optimal_sparsity, sweep_sparsity
from creative_sparse.autotune.sparge_module import (
    SparseAttentionMeansim,
    extract_sparse_attention_state_dict,
    load_sparse_attention_state_dict,
)

__all__ = ["SparseAttentionMeansim", "extract_sparse_attention_state_dict",
           "find_optimal_sparsity", "load_sparse_attention_state_dict", "sweep_sparsity"]
