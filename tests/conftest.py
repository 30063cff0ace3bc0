"""Shared fixtures.

`smollm2` loads the embedded default model once per test session, from the
creative_sparse cache (``$CREATIVE_SPARSE_CACHE`` or the user cache directory);
the first session on a machine converts the GGUF (tens of seconds).

Without a GPU the session runs with ``TRITON_INTERPRET=1`` (see below).

`make test` runs the suite on two pytest-xdist workers (``-n 2 --dist loadfile``: a
module's tests stay on one worker and share its fixtures; the longest modules go first,
see `pytest_collection_modifyitems`); each worker gets an equal share of the cores as
torch threads, so two workers never oversubscribe them.
"""

import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter. Triton reads the
# switch when it is first imported, so it must be set before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker would otherwise start as many torch threads as there
# are cores; on two cores two workers of two threads each spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

LONGEST_MODULES = (
    "test_quality_calibration.py", "test_attention_backends.py",
    "test_generation_constraints.py", "test_triton_compile.py", "test_autotune.py",
    "test_generation_wrapper.py", "test_evaluation_runner.py", "test_loading.py",
    "test_seed_quickstart.py", "test_triton_prediction.py",
)
"""The modules that take longest (measured with ``--durations``), longest first."""


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, hand out the longest modules first so that the workers finish
    together instead of one running a long module alone at the end; the rest keep their
    order. A single process runs the tests in the usual order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    first = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, float32 on CPU, eval mode.

    Shared by every test of the session: do not modify its weights or config
    (wrap changes in a context manager that restores them).
    """
    from creative_sparse.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_kernel_calls(monkeypatch):
    """The Triton attention kernel (the CUDA default), spied on: a list that gets the
    query shape of every call. Skips where the kernel cannot run (on CPU it runs
    under the interpreter, which the block above switches on)."""
    triton_backend = pytest.importorskip("creative_sparse.attention.backends.triton")
    if not triton_backend.available(torch.device("cpu")):
        pytest.skip("needs Triton and TRITON_INTERPRET=1 (set above when there is no GPU)")
    calls = []
    kernel = triton_backend.block_sparse_attention

    def spy(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return kernel(q, *args, **kwargs)
    monkeypatch.setattr(triton_backend, "block_sparse_attention", spy)
    return calls
