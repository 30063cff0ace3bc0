#!/usr/bin/env bash
# One prepared GPU check: the Triton kernels' tests on the GPU (attention and prediction),
# the integrations and the engine on CUDA (benchmarks/gpu_integration.py), the kernel
# benchmark against SDPA, and the static compile figures.
# Usage: benchmarks/gpu_check.sh OUTDIR [benchmark arguments...]
# Needs python3 with torch (CUDA) and triton; the package is taken from ./src.
# Wheels in ./.whl (diffusers and what it lacks there) are installed first when present.
# The default time limits add up to 540 s, under the device tool's 600 s per command;
# the benchmark writes its JSON after every row, so a run cut short keeps its rows.
set -u
out=${1:-gpu_out}; shift || true
mkdir -p "$out"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tee -a "$out/gpu.txt"
timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py \
    tests/test_triton_prediction.py -k "gpu" 2>&1 | tail -40 | tee "$out/tests.txt"
timeout "${INTEGRATION_TIMEOUT:-120}" python3 benchmarks/gpu_integration.py \
    --json "$out/integration.json" 2>&1 | grep -v "should be kept in float32" | tee "$out/integration.txt"
timeout "${BENCH_TIMEOUT:-275}" python3 benchmarks/gpu_attention.py --json "$out/bench.json" "$@" \
    2>&1 | tee "$out/bench.txt"
# Last, the static figures (registers, spills, pipelining) from this machine's Triton,
# to set beside the measured speed.
timeout "${COMPILE_TIMEOUT:-45}" env -u TRITON_INTERPRET python3 benchmarks/triton_compile.py \
    --quick 2>&1 | grep -v -i warn | tee "$out/compile.txt"
