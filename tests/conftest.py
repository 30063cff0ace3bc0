"""Shared fixtures.

`smollm2` loads the embedded default model once per test session, from the
creative_sparse cache (``$CREATIVE_SPARSE_CACHE`` or the user cache directory);
the first session on a machine converts the GGUF (tens of seconds).
"""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, float32 on CPU, eval mode.

    Shared by every test of the session: do not modify its weights or config
    (wrap changes in a context manager that restores them).
    """
    from creative_sparse.models import load_model

    return load_model()
