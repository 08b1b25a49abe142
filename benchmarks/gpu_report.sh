#!/usr/bin/env bash
# The GPU figures of the benchmarks and the core test files on the GPU, in one command that fits a
# 10-minute slot on one H100/H200: the steps' limits add up to 570 s, and a step stopped at its
# limit costs only its own remaining rows.  Run from the repository root with eft_prob importable (pip install -e . or PYTHONPATH):
#
#     benchmarks/gpu_report.sh [OUT_DIR]        # default OUT_DIR: gpu_report
#
# Every step writes OUT_DIR/<step>.log (and the tests a JUnit XML); the console shows each step's
# exit status (124: stopped at its limit) and the end of its log.  The tests run with JAX's default
# device being the GPU (JAX_PLATFORMS=cuda,cpu overrides the suite's CPU default) and `-v`, so that
# every test's result is in the log as soon as it finishes, even if the step is stopped.
set -uo pipefail
out=${1:-gpu_report}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
start=$(date +%s)

step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s, at $(($(date +%s) - start)) s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "rc $?"
    grep -v "batch [0-9]*/" "$out/$name.log" | tail -n 25
}

python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# trained O(1/n) moments, 8 + 992 = 1000 inputs (compilation included), depth 3 and 10
step trained_d3 60 python3 benchmarks/bench_trained.py --marginals 992 --no-baseline
step trained_d10 70 python3 benchmarks/bench_trained.py --marginals 992 --depth 10 --no-baseline
# prior statistics and posterior marginals, 100 + 900 inputs, depth 10
step vertex 80 python3 benchmarks/bench_vertex.py --many-only
# ensemble training vs the per-network loop (9 of its 12 rows took 150 s on an H200)
step train 170 python3 benchmarks/bench_train.py --gpu-report --json "$out/train.json"
# core test files on the GPU
step tests 190 env JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false \
    python3 -m pytest -p no:benchmark -p no:cacheprovider -n 8 -v -rf --junitxml="$out/tests.xml" \
    tests/test_ensemble.py tests/theory/test_training_nlo.py tests/test_mc_kernels.py \
    tests/test_distributions.py tests/theory/test_kernels.py tests/test_trained_distribution.py
echo "total $(($(date +%s) - start)) s"
