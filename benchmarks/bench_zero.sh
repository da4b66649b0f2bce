#!/usr/bin/env bash
# ZeRO stages 0-3 of the small preset on the GPUs of one node: step time, peak memory per GPU, and each stage's
# loss curve against ZeRO-0's. Prints a table (docs/PERFORMANCE.md, "DeepSpeed ZeRO") and writes the logs.
#
#   bash benchmarks/bench_zero.sh                  # 2 GPUs, logs under runs/bench_zero
#   NPROC=8 OUT=/tmp/zero bash benchmarks/bench_zero.sh
#
# On the lent GPU machines (no package index there), carry DeepSpeed and the pydantic it needs as wheels: build
# them here once (deepspeed has no wheel on PyPI; pip builds a pure-Python one from its source):
#   mkdir -p .whl/zero && python3 -m pip wheel --no-deps --no-build-isolation -w .whl/zero deepspeed==0.19.8
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl/zero pydantic==2.13.4 pydantic_core==2.46.4 \
#       annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0
# and run it with carry [".whl/zero"] and the command `bash benchmarks/bench_zero.sh` (kind nvidia-h100-x2; about
# 4 minutes). The script installs the wheels into /tmp/site when deepspeed is not importable.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench_zero}
NPROC=${NPROC:-2}
ITERS=${ITERS:-30}
mkdir -p "$OUT"
source benchmarks/use_wheels.sh
use_wheels deepspeed .whl/zero || exit 1
# NVLink multicast stays off on shared machines (see the device notes); unbuffered output for the logs.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
# Micro batch 8 x 2048 tokens per GPU, no accumulation (the setting of the tensor-parallel table).
MODEL=${MODEL:-"--model-size small --bf16"}
ARGS="$MODEL --mock-data --vocab-size 32000 --seq-length 2048 --micro-batch-size 8 --global-batch-size $((8 * NPROC))
      --train-iters $ITERS --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 10 --log-interval 1 --eval-interval 100000
      --eval-iters 1"
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU") | head -1 | tee "$OUT/gpu.txt"
for stage in 0 1 2 3; do
    # shellcheck disable=SC2086
    timeout 240 torchrun --nproc-per-node "$NPROC" pretrain_gdn.py $ARGS --zero-stage $stage > "$OUT/zero$stage.log" 2>&1
    echo "ZeRO-$stage: exit code $?"
done
python3 - "$OUT" "$ITERS" <<'EOF'
"""Table of the four runs: step time (mean of iterations 11..N), peak memory, loss difference from ZeRO-0."""
import re
import sys
from pathlib import Path

out, iters = Path(sys.argv[1]), int(sys.argv[2])
line = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+) \|.*?"
                  r"lm loss: ([0-9.E+-]+) \|.*?tokens/s/GPU: ([0-9.]+)")
memory = re.compile(r"\(after (\d+) iterations\) memory \(MB\) \| allocated: ([0-9.]+) \| max allocated: ([0-9.]+) \| "
                    r"reserved: ([0-9.]+) \| max reserved: ([0-9.]+)")
runs = {}
for stage in range(4):
    text = (out / f"zero{stage}.log").read_text()
    rows = {int(m[1]): (float(m[2]), float(m[3]), float(m[4])) for m in line.finditer(text)}
    peaks = [m for m in memory.finditer(text) if int(m[1]) == iters]
    topology = next((l for l in text.splitlines() if l.startswith("topology:")), "")
    engine = next((l.strip() for l in text.splitlines() if "data-parallel engine" in l), "")
    versions = next((l.strip() for l in text.splitlines() if l.strip().startswith("torch ")), "")
    runs[stage] = rows, peaks[0] if peaks else None, topology, engine, versions
print(f"GPU: {(out / 'gpu.txt').read_text().strip()}; {runs[0][4]}")
print(runs[0][2])
print("| ZeRO stage | step time (ms) | tokens/s/GPU | max allocated (GiB) | max reserved (GiB) | "
      "loss at last iteration | max rel. loss diff vs ZeRO-0 |")
print("|---|---|---|---|---|---|---|")
base = runs[0][0]
for stage, (rows, peak, _, engine, _) in runs.items():
    if not rows:
        print(f"| {stage} | failed: see {out}/zero{stage}.log | | | | | |")
        continue
    steady = [i for i in rows if i > 10]  # iteration 1 compiles the Triton kernels
    step = sum(rows[i][0] for i in steady) / len(steady)
    throughput = sum(rows[i][2] for i in steady) / len(steady)
    diffs = [abs(rows[i][1] - base[i][1]) / abs(base[i][1]) for i in rows if i in base]
    last = max(rows)
    gib = 2.0**10
    mem = (f"{float(peak[3]) / gib:.2f} | {float(peak[5]) / gib:.2f}" if peak else "n/a | n/a")
    print(f"| {stage} | {step:.1f} | {throughput:,.0f} | {mem} | {rows[last][1]:.4f} | {max(diffs):.2e} |")
print("\nloss per iteration (every 5th):")
print("| iteration | " + " | ".join(f"ZeRO-{s}" for s in runs) + " |")
print("|---|" + "---|" * len(runs))
for i in sorted(base):
    if i == 1 or i % 5 == 0:
        print(f"| {i} | " + " | ".join(f"{runs[s][0][i][1]:.6f}" if i in runs[s][0] else "" for s in runs) + " |")
EOF
