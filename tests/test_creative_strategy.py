"""Creative-Sparse as a strategy (generation/strategies.py, generation/creative.py) and the
wrapper as a facade over it (generation/wrapper.py)."""

import ast
from pathlib import Path

import pytest

from creative_sparse.generation.creative import CreativeResult
from creative_sparse.generation.strategies import CreativeSparse

GENERATION = Path(__file__).resolve().parents[1] / "src" / "creative_sparse" / "generation"
PROMPT = "Write a haiku about rain."


class _Checker:
    name = "none-flagged"

    def check(self, texts):
        return [[] for _ in texts]


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule=(0.5,)), r"must be \(diverge, refine\)"),
    (dict(schedule=(0.3, 0.7)), r"refine \(0.7\) must not exceed diverge \(0.3\)"),
    (dict(schedule=(1.2, 0.3)), "outside the allowed range"),
    (dict(draft_fraction=0.0), r"draft_fraction must be in \(0, 1\], got 0.0"),
    (dict(keep_fraction=1.5), r"keep_fraction must be in \(0, 1\], got 1.5"),
    (dict(safety_repairs=-1), "safety_repairs must be an int >= 0, got -1"),
    (dict(safety_timeout=0), "safety_timeout must be None or a number of seconds > 0"),
    (dict(safety_gate=2.0), r"safety_gate must be a level in \[0, 1\], got 2.0"),
    (dict(safety="strict"), "safety must be 'default', None or a SafetyChecker"),
    (dict(quality=object()), "quality must be None or a QualityFunctional"),
], ids=["short-schedule", "refine-above-diverge", "level-above-1", "draft-fraction-0",
        "keep-fraction-1.5", "negative-repairs", "zero-timeout", "gate-2", "unknown-safety",
        "quality-not-a-functional"])
def test_bad_creative_sparse_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CreativeSparse(**{"safety": None, **kwargs})


def test_creative_sparse_owns_its_checked_collaborators():
    checker = _Checker()
    cs = CreativeSparse([0.6, 0.2], safety=checker, safety_gate=1)
    assert cs.safety is checker and cs.safety_gate == 1.0 and isinstance(cs.safety_gate, float)
    assert cs.levels == (0.6, 0.2) and cs.name == "CreativeSparse(0.6, 0.2)"
    assert cs.controller.get_sparsity_params(0.6) == cs.controller.get_sparsity_params(0.6)
    assert CreativeSparse(safety=None).safety is None


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("module", ["strategies.py", "creative_strategy.py", "strategy_result.py",
                                    "creative.py", "constraint_spec.py", "knobs.py",
                                    "safe_refine.py", "engine.py"])
def test_the_strategy_layer_never_imports_the_wrapper(module):
    """The facade sits on top: wrapper -> strategies -> creative, never back."""
    found = {name for name in _imports(GENERATION / module) if name.endswith("wrapper")}
    assert not found, f"{module} imports {sorted(found)}"


@pytest.mark.slow
def test_the_wrapper_is_a_facade_over_one_strategy(smollm2):
    from creative_sparse.generation.wrapper import CreativeSparseWrapper

    model, tokenizer = smollm2
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer)
    strategy = wrapper.strategy
    # One quality functional (one embedder): the wrapper's is the strategy's.
    assert strategy.quality is wrapper.quality
    assert strategy.quality_functional(model, tokenizer) is wrapper.quality
    assert wrapper.controller is strategy.controller
    assert wrapper.sparsity_schedule == strategy.levels == (0.3, 0.3)   # the measured best

    via_wrapper = wrapper.generate_candidates(PROMPT, max_length=12, num_candidates=2, seed=3)
    via_strategy = strategy.candidates(model, tokenizer, PROMPT, max_length=12,
                                       num_candidates=2, seed=3)
    assert isinstance(via_strategy, CreativeResult)
    for result in (via_wrapper, via_strategy):
        assert len(result.candidates) == 2 and len(result.drafts) == 4
    assert [c.text for c in via_wrapper.candidates] == [c.text for c in via_strategy.candidates]
    assert [c.quality for c in via_wrapper.candidates] == \
        [c.quality for c in via_strategy.candidates]
    assert via_wrapper.drafts == via_strategy.drafts
    assert via_wrapper.reference == via_strategy.reference

    summary = CreativeSparse(quality=wrapper.quality).generate(
        model, tokenizer, PROMPT, num_candidates=2, max_new_tokens=12, seed=3)
    assert summary.texts == [c.text for c in via_strategy.candidates]
    parts = [via_strategy.diverge_stats] + via_strategy.refine_stats
    assert summary.stats.generated_tokens == sum(p.generated_tokens for p in parts)
    assert summary.stats.flops == sum(p.flops for p in parts)
    assert summary.safety["outputs"] == 2 and summary.safety["drafts"] == 4


@pytest.mark.slow
def test_wrapper_settings_replace_the_strategy_and_are_checked(smollm2):
    from creative_sparse.generation.wrapper import CreativeSparseWrapper
    from creative_sparse.quality import QualityFunctional

    model, tokenizer = smollm2
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer, safety=None)
    quality = wrapper.quality
    wrapper.safety_repairs = 0
    wrapper.sparsity_schedule = (0.6, 0.2)
    assert wrapper.strategy.safety_repairs == 0 and wrapper.strategy.levels == (0.6, 0.2)
    assert wrapper.strategy.quality is quality          # kept across replacements
    with pytest.raises(ValueError, match="safety_repairs must be an int >= 0"):
        wrapper.safety_repairs = -1
    with pytest.raises(ValueError, match="must not exceed diverge"):
        wrapper.sparsity_schedule = (0.2, 0.6)
    assert wrapper.safety_repairs == 0 and wrapper.sparsity_schedule == (0.6, 0.2)
    other = QualityFunctional(quality.weights)
    wrapper.quality = other
    assert wrapper.strategy.quality is other and wrapper.quality_functional is other
