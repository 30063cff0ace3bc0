"""The README's "Using it from transformers" snippets run as written (real model, slow)."""

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

README = Path(__file__).parents[1] / "README.md"


def _snippets(heading: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_snippets():
    snippets = _snippets("Using it from transformers")
    assert len(snippets) == 2
    assert "TextIteratorStreamer" in snippets[0] and "attn_implementation" in snippets[1]


@pytest.mark.slow
def test_using_it_from_transformers_runs(smollm2, monkeypatch, tmp_path):
    import creative_sparse.models
    from creative_sparse.models.transformers import clear_sparsity

    model, _ = smollm2
    monkeypatch.setattr(creative_sparse.models, "load_model", lambda *a, **k: smollm2)
    monkeypatch.chdir(tmp_path)                      # save_pretrained writes here
    namespace: dict = {}
    try:
        for snippet in _snippets("Using it from transformers"):
            exec(compile(snippet, str(README), "exec"), namespace)
    finally:
        clear_sparsity(model)
    assert namespace["text"].strip()
    assert 0.0 < namespace["stats"].attended_fraction < 1.0          # streamed, sparse
    assert namespace["scoped"].attended_fraction > namespace["stats"].attended_fraction
    loaded = creative_sparse.sparsity_stats(namespace["loaded"])
    assert loaded is not None and 0.0 < loaded.attended_fraction < 1.0
    assert model.config._attn_implementation != "creative_sparse"
