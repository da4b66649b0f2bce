#!/usr/bin/env bash
# The single-GPU tests (marked gpu) on a CUDA machine whose Python already has the project's dependencies: four
# pytest processes side by side, since compiling and autotuning the Triton kernels keeps the CPU busier than the
# GPU. Each writes its log under $OUT (default gpu-test-logs/) and stops after LIMIT seconds (default 600), so a run
# cut by time still leaves the log of what passed; a line per process says how it ended.
#
#   bash tests/run_gpu.sh [LIMIT]
#
# The context-parallel GPU tests need 2 or 4 GPUs: pytest -m gpu tests/test_context_parallel.py (docs/PARALLELISM.md).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-test-logs}
limit=${1:-600}
mkdir -p "$out"

run() {
    local name=$1
    shift
    timeout "$limit" python -m pytest -m gpu -q -p no:cacheprovider "$@" > "$out/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status$([ $status -eq 124 ] && echo " (cut at $limit s)") - $(tail -n 1 "$out/$name.log")"
    return $status
}

run kernels_autotuned tests/test_kernels_gpu.py -k every_autotuned &
run kernels tests/test_kernels_gpu.py -k "not every_autotuned" &
run fused_ops tests/test_fused_ops.py tests/test_cuda_graph_gpu.py &
# -s: its progress lines (fla compiling and autotuning its kernels for two dtypes takes minutes) reach the log
run hf_fla -s tests/test_hf_fla_gpu.py &
failed=0
for job in $(jobs -p); do
    wait "$job" || failed=1
done
exit $failed
