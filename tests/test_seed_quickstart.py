"""The seed README's quick start, verbatim except for the model name (gpt2-large is not
on this machine; the embedded SmolLM2-135M-Instruct is)."""

import warnings

import pytest

pytestmark = pytest.mark.slow

QUICK_START = '''
from spas_sage_attn import CreativeSparseWrapper
from spas_sage_attn.autotune import find_optimal_sparsity

# Initialize Creative-Sparse wrapper
wrapper = CreativeSparseWrapper(
    model_name="smollm2-135m",
    sparsity_schedule=(0.7, 0.3),  # (divergence, refinement)
    quality_weights=(0.4, 0.3, 0.3)  # (α, β, γ)
)

# Find optimal sparsity for your task
optimal_sparsity = find_optimal_sparsity(
    model_name="smollm2-135m",
    task_type="creative_writing",
    compute_budget=1.0
)

# Generate with optimal sparsity
output = wrapper.generate_creative(
    prompt="Write a creative story about a robot learning to paint",
    max_length=200,
    sparsity_level=optimal_sparsity
)
'''


def test_seed_quick_start_runs_verbatim(smollm2, tmp_path, monkeypatch):
    # An empty user cache: find_optimal_sparsity must answer from the measurements that
    # ship with the library, not from anything this machine measured before.
    from creative_sparse import autotune

    user_cache = autotune._cache_file
    monkeypatch.setattr(autotune, "_cache_file",
                        lambda _root, task, split, key: user_cache(tmp_path, task, split, key))
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "s* not identified" is expected here
        exec(QUICK_START, namespace)
        shipped = autotune.sweep_sparsity("smollm2-135m", "creative_writing", 1.0, progress=False)
    assert shipped.from_cache, "the default sweep of the embedded model must ship measured"
    assert namespace["optimal_sparsity"] == pytest.approx(shipped.s_star)
    assert 0.0 <= namespace["optimal_sparsity"] <= 1.0
    output = namespace["output"]
    assert isinstance(output, str) and len(output.split()) >= 10
    assert not list(tmp_path.glob("autotune/*.json")), "answering must not measure again"
