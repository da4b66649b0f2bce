#!/usr/bin/env bash
# Data-parallel scaling with DeepSpeed ZeRO-1: tokens/s per GPU of a bench_train.py configuration (default 1.3b:
# 4 x 4096 tokens per GPU, no accumulation, so the global batch grows with the GPUs) at 1, 2 and 4 GPUs of one node,
# and the scaling efficiency = tokens/s/GPU at N GPUs / tokens/s/GPU at 1 GPU (docs/PERFORMANCE.md,
# "Data-parallel scaling"). Each point is one `torchrun benchmarks/bench_train.py --zero-stage 1` run: pretrain_gdn's
# training step, mean of the timed steps.
#
#   bash benchmarks/bench_dp_scaling.sh                         # 1, 2, 4 GPUs; results under runs/bench_dp_scaling
#   CONFIG=small GPUS="1 2 4 8" STEPS=20 bash benchmarks/bench_dp_scaling.sh
#
# On the lent machines: carry [".whl/zero"] (DeepSpeed; bench_zero.sh says how the wheels are built), kind
# nvidia-h100-x4.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/use_wheels.sh
use_wheels deepspeed .whl/zero || exit 1
# NVLink multicast stays off on shared machines (see the device notes); unbuffered output for the logs.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
OUT=${OUT:-runs/bench_dp_scaling}
CONFIG=${CONFIG:-1.3b}
GPUS=${GPUS:-"1 2 4"}
STEPS=${STEPS:-10}
mkdir -p "$OUT"
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU") | head -1 | tee "$OUT/gpu.txt"
for n in $GPUS; do
    timeout 300 torchrun --nproc-per-node "$n" benchmarks/bench_train.py --configs "$CONFIG" --zero-stage 1 --no-fla \
        --steps "$STEPS" --json "$OUT/dp$n.json" > "$OUT/dp$n.log" 2>&1
    echo "$n GPU(s): exit code $? (log: $OUT/dp$n.log)"
done
# shellcheck disable=SC2086
python3 - "$OUT" $GPUS <<'PYTHON'
"""The scaling table from the runs' JSON: efficiency against the first GPU count (1)."""
import json
import sys
from pathlib import Path

out, counts = Path(sys.argv[1]), [int(n) for n in sys.argv[2:]]
rows = {}
for n in counts:
    path = out / f"dp{n}.json"
    if path.exists():
        rows[n] = json.loads(path.read_text())["results"][0]
base = rows.get(counts[0])
base_tps = base["tokens_per_step"] / (base["step_ms"] / 1e3) if base and base["step_ms"] else None
print(f"GPU: {(out / 'gpu.txt').read_text().strip()}; {next(iter(rows.values()))['config'] if rows else ''}, "
      "ZeRO-1, one micro batch per GPU per step")
print("| GPUs | step (ms) | tokens/s/GPU | tokens/s (all GPUs) | scaling efficiency | peak memory (GiB) |")
print("|---|---|---|---|---|---|")
for n in counts:
    r = rows.get(n)
    if not r or not r["step_ms"]:
        print(f"| {n} | {r['status'] if r else 'failed'}: see {out}/dp{n}.log | | | | |")
        continue
    tps = r["tokens_per_step"] / (r["step_ms"] / 1e3)
    efficiency = f"{100 * tps / base_tps:.1f}%" if base_tps else ""
    memory = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else ""
    print(f"| {n} | {r['step_ms']:.1f} | {tps:,.0f} | {n * tps:,.0f} | {efficiency} | {memory} |")
PYTHON
