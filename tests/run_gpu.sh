#!/usr/bin/env bash
# The single-GPU tests (marked gpu) on a CUDA machine whose Python already has the project's dependencies: twelve
# pytest processes side by side, since compiling and autotuning the Triton kernels keeps the CPU busier than the
# GPU. Each writes its log under $OUT (default gpu-test-logs/) and stops after LIMIT seconds (default 600), so a run
# cut by time still leaves the log of what passed; a line per process says how it ended. The kernel tests are split
# by kernel and by case, every test in exactly one process: on an H200 with 16 cores and an empty Triton cache,
# nine processes like these (hf_fla apart, which took 5.2 minutes in another such run) took at most 5.3 minutes
# (session 14), where the slowest of the four processes of an earlier version took 8.
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

kernels=tests/test_kernels_gpu.py
# the bf16 budget cases, half of the shapes each (the three forward paths)
first_half="dense or gva or below or K256 or not_powers"
run autotuned_intra $kernels -k "every_autotuned and intra" &
# the forward scan's configurations run on three forward paths: budget and bits apart (each was cut at 320 s with
# both in one process beside two others, session 30)
run autotuned_scan_fwd_budget $kernels -k "every_autotuned and scan_fwd and within_budget" &
run autotuned_scan_fwd_bits $kernels -k "every_autotuned and scan_fwd and same_bits" &
run autotuned_scan_bwd $kernels -k "every_autotuned and scan_bwd" &
run autotuned_o_dqkw $kernels -k "every_autotuned and (chunk_o or dqkw)" &
run autotuned_wy $kernels -k "every_autotuned and wy" &
run bf16_cases_1 $kernels -k "bf16_within_budget and ($first_half)" &
run bf16_cases_2 $kernels -k "bf16_within_budget and not ($first_half)" &
run kernels_rest $kernels -k "not every_autotuned and not bf16_within_budget" &
run fused_ops tests/test_fused_ops.py tests/test_cuda_graph_gpu.py tests/test_model.py &
run resume tests/test_resume_gpu.py &
# -s: its progress lines (fla compiling and autotuning its kernels for two dtypes takes minutes) reach the log
run hf_fla -s tests/test_hf_fla_gpu.py &
failed=0
for job in $(jobs -p); do
    wait "$job" || failed=1
done
exit $failed
