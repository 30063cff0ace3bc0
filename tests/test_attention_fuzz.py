"""Fuzzing the public attention functions: Hypothesis over the fuzz cases, and the runner.

The cases (``scripts/fuzz_attention_cases.py``) cover every public attention
function on every CPU backend (the GPU backends, Triton and FlexAttention, have
their own tests). A valid call must match dense softmax attention over its block
map computed in float64, within the backend's compute precision plus one rounding
to the output dtype; a call with one bad argument must raise ``ValueError`` or
``TypeError``. The runner (``scripts/fuzz_attention.py``) does the same in worker
processes, so that a crash is reported instead of ending the run; a short run of
it is part of this suite, the long one is a documented command (README, "Fuzzing").
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creative_sparse.attention import dispatch

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "scripts" / "fuzz_attention.py"


def _load_cases():
    spec = importlib.util.spec_from_file_location("fuzz_attention_cases",
                                                  ROOT / "scripts" / "fuzz_attention_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = _load_cases()


def _require(backend: str) -> None:
    if backend not in dispatch.available_backends("cpu"):
        pytest.skip(f"{backend} cannot run here (no C++ compiler?)")


class HypothesisPick:
    """The fuzz cases' source of choices, as Hypothesis draws (so failures shrink)."""

    def __init__(self, data):
        self.data = data

    def choice(self, options):
        return self.data.draw(st.sampled_from(options))

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def real(self, low: float, high: float) -> float:
        return self.data.draw(st.floats(low, high, allow_nan=False, allow_infinity=False))

    def chance(self, p: float) -> bool:
        return self.data.draw(st.integers(0, 99)) < round(100 * p)


FUZZ_SETTINGS = settings(max_examples=4, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


@pytest.mark.parametrize("backend", fuzz.CPU_BACKENDS)
@pytest.mark.parametrize("fn", fuzz.FUNCTIONS)
@FUZZ_SETTINGS
@given(data=st.data())
def test_valid_calls_match_the_fp64_oracle(fn, backend, data):
    _require(backend)
    case = fuzz.draw_case(HypothesisPick(data), fn=fn, backend=backend, valid=True)
    outcome, detail = fuzz.run_case(case)
    assert outcome == "ok", f"{outcome}: {detail}\ncase: {json.dumps(case)}"


@pytest.mark.parametrize("backend", fuzz.CPU_BACKENDS)
@pytest.mark.parametrize("fn", fuzz.FUNCTIONS)
@FUZZ_SETTINGS
@given(data=st.data())
def test_bad_calls_raise_value_or_type_error(fn, backend, data):
    _require(backend)
    case = fuzz.draw_case(HypothesisPick(data), fn=fn, backend=backend, valid=False)
    outcome, detail = fuzz.run_case(case)
    assert outcome == "rejected", f"{outcome}: {detail}\ncase: {json.dumps(case)}"


def _valid_case(fn: str, **fields) -> dict:
    case = fuzz.draw_case(fuzz.RandomPick(random.Random(0)), fn=fn, backend="torch",
                          valid=True)
    case.update(batch=1, heads=2, kv_heads=1, q_len=200, k_len=200, head_dim=16, v_dim=16,
                dtype="float32", dtype_kv="float32", layout="HND", kind="normal",
                noncontiguous=False, requires_grad=False, causal=False,
                params={"return_sparsity": False})
    case.update(fields)
    return case


def test_the_oracle_check_can_fail():
    """Not vacuous: one dropped key block, or a map that breaks an invariant, is caught."""
    case = _valid_case("block_sparse_attention",
                       map={"block_q": 64, "block_k": 64, "density": 1.0, "lists": None,
                            "broadcast_batch": False, "broadcast_heads": False})
    call = fuzz.build_call(case)
    out = fuzz.execute(call)
    assert fuzz.check(case, call, out) is None
    call.block_map.keep[..., 0, 1] = False      # the oracle now skips a block the call computed
    assert "oracle" in fuzz.check(case, call, out)

    case = _valid_case("predict_block_map", causal=True)
    case["params"] = {}
    call = fuzz.build_call(case)
    bm = fuzz.execute(call)
    keep = bm.keep.clone()
    keep[..., 0, 1] = False     # query rows 0-127 hold their own keys 64-127: diagonal
    broken = type(bm)(keep, bm.block_q, bm.block_k, bm.q_len, bm.k_len, bm.causal)
    assert "diagonal" in fuzz.check(case, call, broken)


def _run(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(RUNNER), "--out", str(tmp_path / "failures"),
                           "--summary-json", str(summary), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert summary.exists(), proc.stderr[-2000:]
    return proc, json.loads(summary.read_text())


def test_short_fuzz_run(tmp_path):
    """300 calls over every function and CPU backend: no death, no wrong exception,
    no mismatch (the long run is ``--calls 10000``; README, "Fuzzing")."""
    proc, s = _run(tmp_path, "--calls", "300", "--seed", "21", "--batch", "300",
                   "--time-limit", "120")
    failures = {k: s[k] for k in ("process_deaths", "non_value_type_errors_on_bad_input",
                                  "oracle_mismatches_on_valid_input", "valid_input_raised",
                                  "bad_input_accepted", "harness_errors")}
    assert set(failures.values()) == {0} and proc.returncode == 0, (failures, proc.stdout[-3000:])
    assert s["calls"] == 300 and s["ok"] > 100 and s["rejected"] > 50
    assert set(s["calls_per_function_and_backend"]) == set(fuzz.FUNCTIONS)


def test_runner_survives_a_crash_and_reports_its_reproducer(tmp_path):
    proc, s = _run(tmp_path, "--calls", "4", "--batch", "4", "--inject-crash", "1")
    assert proc.returncode == 1
    assert s["process_deaths"] == 1 and s["calls"] == 4 and s["ok"] + s["rejected"] == 3
    (failure,) = s["failures"]
    reproducer = json.loads(Path(failure["file"]).read_text())
    assert failure["outcome"] == "died" and "-11" in failure["detail"]
    assert [c["id"] for c in reproducer["cases"]] == [1]
    assert f"--replay {failure['file']}" in proc.stdout
