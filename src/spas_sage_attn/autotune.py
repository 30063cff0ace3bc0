"""The seed's ``spas_sage_attn.autotune`` path. Re-exports only; the code lives in
:mod:`creative_sparse.autotune`.

    >>> from spas_sage_attn.autotune import find_optimal_sparsity, sweep_sparsity
"""

from creative_sparse.autotune import find_optimal_sparsity, sweep_sparsity

__all__ = ["find_optimal_sparsity", "sweep_sparsity"]
