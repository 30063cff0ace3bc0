"""Importing the attention functions loads the attention stack only (no generation,
quality, autotune, transformers or scipy); every public name still resolves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import creative_sparse
import spas_sage_attn

HEAVY = ("creative_sparse.generation", "creative_sparse.quality", "creative_sparse.autotune",
         "creative_sparse.models", "creative_sparse.evaluation", "scipy", "transformers")


@pytest.mark.parametrize("statement", [
    "from spas_sage_attn import spas_sage2_attn_meansim_cuda",
    "from creative_sparse.attention import sparse_attention",
    "import creative_sparse",
])
def test_the_attention_stack_imports_alone(statement):
    code = (f"import sys, json; {statement}; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    heavy = [m for m in loaded if m.startswith(HEAVY)]
    assert heavy == [], f"{statement} loaded {heavy[:5]}"


def test_every_public_name_resolves():
    for module in (creative_sparse, spas_sage_attn):
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)
            assert name in dir(module)
    assert creative_sparse.find_optimal_sparsity is spas_sage_attn.find_optimal_sparsity
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        creative_sparse.nope  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        spas_sage_attn.nope  # noqa: B018


@pytest.mark.parametrize("statement", [
    "import creative_sparse.generation",
    "from creative_sparse import CreativeSparseWrapper",
    "import creative_sparse.evaluation",
])
def test_generation_imports_without_transformers(statement):
    """transformers (seconds to import) loads with the first model or generate call, or
    with an explicit `import creative_sparse.models.transformers` (which registers the
    attention), not with the generation package."""
    code = (f"import sys, json; {statement}; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert not [m for m in loaded if m == "transformers" or m.startswith("transformers.")]
