"""The training benchmark stays runnable: benchmarks/bench_train.py's CPU smoke mode (--tiny) runs pretrain_gdn's
training path end to end, without fla, and writes its table and JSON (the GPU runs use the same code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_tiny_runs_end_to_end(tmp_path):
    markdown, results = tmp_path / "bench.md", tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--tiny", "--steps", "2", "--warmup", "1",
                          "--markdown", str(markdown), "--json", str(results), "--profile", str(tmp_path / "prof"),
                          "--profile-steps", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    table = markdown.read_text()
    assert "torch " in table and "fla's model not run" in table
    assert "| tiny | 128 | ours | full |" in table  # 2 x 64 tokens, with full recomputation
    (row,) = json.loads(results.read_text())["results"]
    assert row["status"] == "ok" and row["step_ms"] > 0 and row["parameters"] > 0
    profile = (tmp_path / "prof" / "tiny.txt").read_text()
    assert "Self CPU" in profile and "aten::" in profile  # the profiler's table of the --profile-steps steps
    (optimizer_row,) = [line for line in profile.splitlines() if "Optimizer.step#" in line]
    assert optimizer_row.split()[-1] == "2"  # two steps back to back: two optimizer steps (its "# of Calls")
    assert "aten::mm [128, 64] x [64, 512]" in profile  # the products by shape: the lm head's, 2 x 64 tokens
    assert "autotuned kernels (kernel, key: configuration chosen):" in profile


def test_bench_train_accumulates_micro_batches(tmp_path):
    """--micro-batches N: a step is N micro batches of the configuration's batch (its tokens count N times)."""
    markdown = tmp_path / "bench.md"
    run = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--tiny", "--steps", "2", "--warmup", "1",
                          "--micro-batches", "3", "--markdown", str(markdown)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    table = markdown.read_text()
    assert "3 micro batches per step" in table and "| tiny | 384 | ours | full |" in table  # 3 x 2 x 64 tokens
    sys.path.insert(0, str(REPO / "benchmarks"))
    import argparse

    from bench_train import TINY, training_flags

    from megatron_gdn.config import parse_args
    args = argparse.Namespace(micro_batches=3, warmup=1, steps=2, device="cpu", cuda_graph=False, zero_stage=None,
                              profile_steps=1)
    _, cfg = parse_args(training_flags(TINY, args, data_parallel_size=2))
    assert cfg.global_batch_size == 3 * 2 * cfg.micro_batch_size  # ours' step: 3 micro batches on each of 2 ranks


def test_bench_fused_ops_tiny_runs_every_op(tmp_path):
    """benchmarks/bench_fused_ops.py's CPU smoke mode times every fused op and its PyTorch reference, forward and
    forward+backward, through Triton's interpreter, and writes the table."""
    markdown = tmp_path / "fused.md"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "benchmarks/bench_fused_ops.py", "--tiny", "--markdown", str(markdown)],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| tiny |")]
    ops = ["rms_norm + residual", "swiglu", "short conv + SiLU (W=4)", "short conv + SiLU + L2 norm (q, K=16)",
           "gated RMSNorm", "lm head + cross entropy"]
    assert [(r.split(" | ")[1], r.split(" | ")[3]) for r in rows] == [(op, p) for op in ops for p in ("fwd", "fwd+bwd")]


def test_bench_adamw_tiny_times_both_optimizers(tmp_path):
    """benchmarks/bench_adamw.py's CPU smoke mode runs our kernel (Triton's interpreter) and torch's fused AdamW on
    every parameter of the tiny model, built on the meta device and allocated by the script, and writes the table."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_adamw import TINY
    from megatron_gdn.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    parameters = sum(p.numel() for p in GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**TINY)).parameters())
    markdown = tmp_path / "adamw.md"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "benchmarks/bench_adamw.py", "--tiny", "--blocks", "1024",
                          "--markdown", str(markdown)], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    rows = [line.split(" | ") for line in markdown.read_text().splitlines() if line.startswith("| tiny |")]
    assert [(r[1], r[2]) for r in rows] == [(f"{parameters:,}", "ours, BLOCK 1024"), (f"{parameters:,}", "torch fused")]
    assert all(float(r[3]) > 0 for r in rows)


def test_bench_configs_times_the_list_its_capped_copies_and_extras():
    """benchmarks/bench_configs.py forces each candidate of an autotuned chunk kernel in turn (Triton's interpreter
    here, whose times mean nothing): the kernel's list, the list under a register cap, an extra configuration; one
    the kernel cannot take (an unknown tile name) is reported as failed and the others still run (--isolate)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "benchmarks/bench_configs.py", "chunk_bwd_wy_kernel", "--shape", "tiny",
                          "--caps", "168", "--extra", "BK=32 BV=32 warps=4 stages=2", "--extra", "BOGUS=3",
                          "--rounds", "1", "--isolate"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("  ")]
    timed = [r for r in rows if "failed" not in r and " nan " not in r]
    listed = sum("(in the list)" in r for r in timed)  # the interpreter's list holds the first candidate only
    assert listed == 1 and len(timed) == 2 * listed + 1, run.stdout
    assert sum("maxnreg: 168" in r for r in timed) == listed
    assert any("BK: 32, BV: 32" in r for r in timed)
    assert any("BOGUS: 3" in r and "failed" in r for r in rows), run.stdout


def test_gpu_timeline_counts_overlaps_once_and_finds_the_gaps():
    """bench_train --profile's GPU timeline: busy time is the union of the kernels' intervals (overlapping kernels
    counted once), idle time the rest of the span, gaps listed largest first with the kernels around them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import gpu_timeline
    summary = gpu_timeline([(100, 110, "last"), (0, 10, "a"), (12, 20, "b"), (15, 30, "c")])
    assert "4 kernels over 0.11 ms, busy 0.04 ms, idle 0.07 ms in 2 gaps (1 under 10 us: 0.00 ms)" in summary
    gaps = summary.splitlines()[2:4]
    assert gaps[0].split() == ["70.0", "c", "->", "last"] and gaps[1].split() == ["2.0", "a", "->", "b"]


def test_matmul_table_counts_flops_by_operand_shapes():
    """bench_train --profile's matrix products: 2 M N K per call from the operands' shapes (addmm's are its second
    and third inputs, bmm's carry a batch), the rate over the op's GPU time, other ops left out."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from types import SimpleNamespace

    import torch
    from bench_train import matmul_flops, matmul_table
    assert matmul_flops("aten::mm", [[64, 32], [32, 48]]) == 2 * 64 * 32 * 48
    assert matmul_flops("aten::addmm", [[3, 5], [3, 4], [4, 5], [], []]) == 2 * 3 * 4 * 5
    assert matmul_flops("aten::bmm", [[2, 3, 4], [2, 4, 5]]) == 2 * 2 * 3 * 4 * 5
    ops = [SimpleNamespace(key="aten::mm", input_shapes=[[1000, 2000], [2000, 3000]], count=2,
                           device_time_total=1000.0, cpu_time_total=5.0),  # us: 24 GFLOP in 1 ms
           SimpleNamespace(key="aten::addmm", input_shapes=[[10, 30], [10, 20], [20, 30], [], []], count=1,
                           device_time_total=3000.0, cpu_time_total=5.0),
           SimpleNamespace(key="aten::add", input_shapes=[[10], [10]], count=9, device_time_total=9e6,
                           cpu_time_total=1)]
    lines = matmul_table(ops, torch.device("cuda")).splitlines()
    assert lines[0].startswith("matrix products: 3 calls, 4.00 ms, 6.0 TFLOP/s")  # (24e9 + 12e3) FLOP in 4 ms
    assert lines[1].split() == ["3.000", "1", "0.0", "aten::addmm", "[10,", "20]", "x", "[20,", "30]"]
    assert lines[2].split() == ["1.000", "2", "24.0", "aten::mm", "[1000,", "2000]", "x", "[2000,", "3000]"]
    assert len(lines) == 3


def test_autotuned_configs_lists_each_key_of_our_kernels(monkeypatch):
    """bench_train --profile's last section: every autotuner in megatron_gdn.kernels' modules, with the configuration
    it chose for each key; autotuners elsewhere are left out."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import types

    import triton
    from bench_train import autotuned_configs

    def kernel(x, N):
        """Never launched: the test reads only its autotuner's cache."""

    def tuned():
        return triton.autotune(configs=[triton.Config({"B": 16}, num_warps=4), triton.Config({"B": 32}, num_warps=8)],
                               key=["N"])(triton.jit(kernel))
    ours, other = types.ModuleType("megatron_gdn.kernels.probe"), types.ModuleType("elsewhere.probe")
    ours.probe_kernel, other.other_kernel = tuned(), tuned()
    monkeypatch.setitem(sys.modules, ours.__name__, ours)
    monkeypatch.setitem(sys.modules, other.__name__, other)
    assert "none tuned" in autotuned_configs()  # nothing tuned yet: no key met
    chosen = ours.probe_kernel.configs[1]
    ours.probe_kernel.cache[(4096, "torch.bfloat16")] = chosen
    other.other_kernel.cache[(1, "torch.float32")] = chosen
    lines = autotuned_configs().splitlines()
    assert lines[1:] == [f"  probe_kernel (4096, 'torch.bfloat16'): {chosen}"]
    assert "B: 32, num_warps: 8" in lines[1]


def test_gpu_sampler_averages_nvidia_smi_samples():
    """bench_train's clock, power and utilization column: the means of the samples its query printed while the block
    ran, lines it cannot read skipped; no command (a CPU, no nvidia-smi) or one that fails gives no numbers, not an
    error."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import GpuSampler
    printer = [sys.executable, "-c", "print('1500, 600.5, 100'); print('[N/A], 650, 90'); print('1700, 700.5, 80')"]
    with GpuSampler(printer) as sampler:
        sampler.process.wait()  # nvidia-smi prints until stopped; this one stops by itself
    assert sampler.means() == (1600.0, 650.5, 90.0)
    for command in (None, [sys.executable, "-c", "import sys; sys.exit(3)"], ["no-such-nvidia-smi-here"]):
        with GpuSampler(command) as sampler:
            if sampler.process:
                sampler.process.wait()
        assert sampler.means() == (None, None, None)
    import torch
    assert GpuSampler.command_for(torch.device("cpu")) is None and GpuSampler.limits(torch.device("cpu")) is None


def test_gpu_sampler_reads_a_query_only_where_it_prints_numbers():
    """The check that picks power.draw.instant (and reads the header's limits): numbers where the query prints them,
    None where the field is not reported ([N/A]), the query fails or nvidia-smi is missing."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import GpuSampler

    def printing(text: str) -> list[str]:
        return [sys.executable, "-c", f"print({text!r})"]

    assert GpuSampler.read_numbers(printing("1980, 700.00")) == [1980.0, 700.0]
    assert GpuSampler.read_numbers(printing("612.35")) == [612.35]
    for query in (printing("[N/A]"), [sys.executable, "-c", "import sys; sys.exit(6)"], ["no-such-nvidia-smi"], None):
        assert GpuSampler.read_numbers(query) is None


def test_mean_step_samples_the_gpu_only_when_asked(monkeypatch):
    """--no-sampling: the timed steps run without nvidia-smi beside them (its clock, power and utilization None);
    otherwise the sampler's means come back with the step time."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_train
    import torch
    printer = ["sh", "-c", "echo '1500, 600.5, 100'"]  # prints within the timed steps' 0.6 s
    monkeypatch.setattr(bench_train.GpuSampler, "command_for", staticmethod(lambda device: printer))
    steps = []

    def step() -> None:
        steps.append(1)
        time.sleep(0.2)

    for sample, expected in ((True, (1500.0, 600.5, 100.0)), (False, (None, None, None))):
        ms, means = bench_train.mean_step_ms(step, 1, 3, torch.device("cpu"), sample=sample)
        assert ms >= 200 and means == expected
    assert len(steps) == 8  # 1 warm-up and 3 timed steps, twice


def test_programs_per_sm_matches_nsight_compute():
    """kernel_resources.programs_per_sm against the block limits Nsight Compute read on an H200 (session 29, Triton
    3.6: registers a thread, warps, shared bytes a block -> the smallest of its register, shared-memory and warp
    limits): the chunk kernels at the 1.3b layer, the short convolution, the norms, the partial sums and a torch
    elementwise kernel (held by its 16 warp slots, not its registers)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from kernel_resources import programs_per_sm
    read = {"reverse scan": (255, 8, 197380, 1), "states scan": (210, 4, 107012, 2), "dqkw": (216, 8, 139264, 1),
            "wy": (254, 4, 57344, 2), "o": (96, 4, 49152, 4), "intra": (255, 2, 32768, 4),
            "dqk_intra": (54, 8, 49152, 4), "conv bwd": (239, 1, 8704, 8), "conv bwd v": (228, 1, 8704, 8),
            "conv fwd": (96, 1, 4608, 20), "gated norm bwd": (157, 4, 53312, 3), "gated norm fwd": (168, 4, 2048, 3),
            "sum_partials": (40, 8, 512, 6), "elementwise add": (34, 4, 0, 12), "fill": (16, 4, 0, 16)}
    assert {name: programs_per_sm(*r[:3]) for name, r in read.items()} == {name: r[3] for name, r in read.items()}
