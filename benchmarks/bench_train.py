"""Training throughput end to end: tokens/s per GPU, MFU and peak memory of a training step, ours against
flash-linear-attention 0.6.0's GatedDeltaNetForCausalLM in a plain AdamW bf16 loop, on the same GPU in one process.

    python benchmarks/bench_train.py                                   # every configuration, ours and fla's
    python benchmarks/bench_train.py --configs small,1.3b --steps 20 --markdown bench.md
    python benchmarks/bench_train.py --configs 1.3b --no-ours          # fla's model alone
    python benchmarks/bench_train.py --configs 1.3b --no-fla --profile prof   # ours, and prof/1.3b.txt: time by kernel,
                                                                      # and each matrix product's shape and TFLOP/s
    python benchmarks/bench_train.py --configs small --no-fla --cuda-graph      # ours with --cuda-graph
    python benchmarks/bench_train.py --configs small --no-fla --cuda-graph --profile prof --profile-steps 3
                                                                      # 3 steps back to back: idle GPU between them
    python benchmarks/bench_train.py --configs small --cuda-graph --profile prof --profile-steps 3
                                                                      # and prof/small-fla.txt: fla's GPU busy time
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
        python benchmarks/bench_train.py --configs 1.3b-256k --max-memory-gib 80   # does it fit an 80 GB GPU?
    python benchmarks/bench_train.py --tiny                            # CPU smoke run (tests/test_bench_smoke.py)
    torchrun --nproc-per-node 4 benchmarks/bench_train.py --configs 1.3b --zero-stage 1 --no-fla   # data parallel

Ours runs the training path of pretrain_gdn.py itself (its setup_run, build_engine and train_step): the same model
construction, mixed precision (fp32 weights and AdamW under bf16 autocast), engine (the built-in one, or DeepSpeed
with --zero-stage), loss (pretrain_gdn.lm_loss) and step (gradient reduction, clipping, AdamW), on --mock-data;
with --cuda-graph, its micro batches are replayed as a CUDA graph (pretrain_gdn.py --cuda-graph; the eager warm-up
iterations and the capture fall in the untimed warm-up steps; configurations that recompute are skipped).
fla's model runs the loop its users write: bf16 weights, torch.optim.AdamW(fused=True), the loss from its forward
with labels, gradient checkpointing (its `gradient_checkpointing_enable()`) where the configuration recomputes.
Both see the same tokens.

Each run: warm-up steps (Triton compilation and autotuning), then --steps steps back to back, timed between a
torch.cuda.synchronize() before the first and one after the last; the table gives their mean. Neither side waits
for the GPU inside the window, as in a training run that reads the loss only for its log lines: ours reads each
iteration's results once the next is queued (what train() does between log lines), fla's loop keeps its loss on
the GPU and copies its batches from pinned memory. Memory is torch.cuda.max_memory_allocated over the
whole run (weights, optimizer state and the step), reset between runs. MFU is given twice: by our FLOPs model
(megatron_gdn/training/flops.py, docs/PERFORMANCE.md "FLOPs model and MFU") and by 6 x parameters per token (the
convention of the issue's fla numbers); both count model FLOPs, so recomputation lowers them. A run that runs out
of GPU memory is reported as OOM and the next one starts after its memory is freed. The last column is the GPU's
mean SM clock, power draw (power.draw.instant where nvidia-smi has it) and utilization over the timed steps
(nvidia-smi; the header gives its maximum clock and power limit): a GPU at its power limit lowers its clocks, so
step times from two machines compare only at like clocks, and one under 100% busy waited for the host, whose speed
then sets the step's.

Under torchrun every rank runs ours with its own micro batch (global batch = batch x ranks, no accumulation) and rank
0 prints tokens/s per GPU; fla's loop is single-GPU, so it runs only without torchrun.
benchmarks/bench_dp_scaling.sh runs this at 1, 2 and 4 GPUs and prints the scaling efficiency.

fla 0.6.0 refuses its gated backward on Hopper with Triton in [3.4, 3.7.1) (its issue #640); for timing only this
script lifts that guard, as benchmarks/bench_kernels.py does (see its docstring).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrain_gdn  # noqa: E402
from megatron_gdn.config import parse_args  # noqa: E402
from megatron_gdn.data.mock_dataset import MockGPTDataset  # noqa: E402
from megatron_gdn.models import GatedDeltaNetConfig  # noqa: E402
from megatron_gdn.parallel import destroy_model_parallel, get_rank, launched_world_size  # noqa: E402
from megatron_gdn.training.cuda_graph import WARMUP_ITERATIONS  # noqa: E402
from megatron_gdn.training.flops import peak_flops, training_flops_per_token  # noqa: E402

VOCAB_SIZE = 32000


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration: a model preset, the tokens of a step per GPU, and what each side recomputes."""

    preset: str
    seq_length: int
    batch: int
    recompute: str | None = None       # ours: --recompute-granularity (None: no recomputation)
    fla_checkpointing: bool = False    # fla: gradient_checkpointing_enable()
    with_fla: bool = True              # run fla's model too (the 256K check is ours only)
    vocab_size: int = VOCAB_SIZE
    shape: dict | None = None          # explicit shape instead of the preset (the tiny smoke configuration)


CASES = {
    "small": Case("small", 4096, 8),
    "1.3b": Case("1.3b", 4096, 4),
    "1.3b-16k": Case("1.3b", 16384, 1, recompute="selective", fla_checkpointing=True),
    "1.3b-64k": Case("1.3b", 65536, 1, recompute="full", fla_checkpointing=True),
    "1.3b-256k": Case("1.3b", 262144, 1, recompute="full", with_fla=False),
}
# --tiny: a model of a few hundred thousand parameters that steps on a CPU in milliseconds.
TINY = Case("tiny", 64, 2, recompute="full", shape=dict(hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=16), vocab_size=512)
DEFAULT_CONFIGS = ",".join(CASES)


@dataclasses.dataclass
class Result:
    config: str
    implementation: str
    recompute: str
    tokens_per_step: int          # per GPU
    parameters: int = 0
    step_ms: float | None = None  # mean over the timed steps
    peak_gib: float | None = None
    status: str = "ok"            # or "OOM", or why the run was skipped
    sm_clock_mhz: float | None = None  # the GPU's mean SM clock, power draw and utilization over the timed steps
    power_w: float | None = None       # (GpuSampler)
    busy_pct: float | None = None

    def tokens_per_sec(self) -> float | None:
        return self.tokens_per_step / (self.step_ms / 1e3) if self.step_ms else None


def model_config(case: Case) -> GatedDeltaNetConfig:
    if case.shape:
        return GatedDeltaNetConfig(vocab_size=case.vocab_size, **case.shape)
    return GatedDeltaNetConfig.from_preset(case.preset, vocab_size=case.vocab_size)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuSampler:
    """The GPU's SM clock, power draw and utilization, sampled by `nvidia-smi -lms` in a process of its own while a
    block runs; means() gives their means over the samples (None without nvidia-smi, or on a CPU).

    Why: an H200 at its 700 W limit lowers its SM clocks. Through the timed steps of `1.3b` they averaged 1597 MHz of
    1980 at 692 W, of `small` 1740 MHz at 690 W (session 15): both steps are bound by power, and a machine whose chip
    draws less at a clock runs them faster. Two runs' step times compare only at like clocks. Utilization is
    nvidia-smi's utilization.gpu: the share of time some kernel ran (over its own sample period, 1/6 s to 1 s). Under
    100% the GPU waited for the host: a step that launches its kernels one by one from Python is then as fast as
    the host's CPU, and runs slower on a slower or busier host (fla's `small` step took 102.9 ms in session 18 and
    114.7 and 147.3 ms in session 20, at higher clocks; 66% busy in the last). Read it as a comparison, not an exact
    share: a sample near the window's edges may count time outside it. The power is power.draw.instant where
    nvidia-smi reports it: power.draw trails by about a second, so over a short window it read 540 W for a `small`
    step that drew about 700 (session 27)."""

    def __init__(self, command: list[str] | None):
        self.command, self.process, self.samples = command, None, []

    @staticmethod
    def query(device: torch.device, fields: str) -> list[str] | None:
        """nvidia-smi's query of these fields of this CUDA device (by UUID: CUDA_VISIBLE_DEVICES renumbers devices,
        nvidia-smi does not), or None where there is none."""
        if device.type != "cuda" or shutil.which("nvidia-smi") is None:
            return None
        uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", ""))
        if not uuid:
            return None
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        return ["nvidia-smi", f"--id={uuid}", f"--query-gpu={fields}", "--format=csv,noheader,nounits"]

    @staticmethod
    def read_numbers(query: list[str] | None) -> list[float] | None:
        """The numbers one run of this query prints ("1980, 700.00"), or None where it fails or prints others
        ("[N/A]": a field this GPU does not report)."""
        if query is None:
            return None
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
            return [float(x) for x in out.split(",")]
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    @staticmethod
    def command_for(device: torch.device, interval_ms: int = 100) -> list[str] | None:
        # power.draw is a trailing average over about a second on the lent H200s (driver 580): through the first
        # second of a `small` run it climbed from 160 to 650 W while power.draw.instant read 700-790 (session 27).
        instant = GpuSampler.read_numbers(GpuSampler.query(device, "power.draw.instant")) is not None
        query = GpuSampler.query(device, f"clocks.sm,{'power.draw.instant' if instant else 'power.draw'},"
                                         "utilization.gpu")
        return query + [f"-lms={interval_ms}"] if query else None

    @staticmethod
    def limits(device: torch.device) -> str | None:
        """'max SM clock 1980 MHz, power limit 700 W', or None where nvidia-smi cannot say."""
        numbers = GpuSampler.read_numbers(GpuSampler.query(device, "clocks.max.sm,power.limit"))
        if numbers is None or len(numbers) != 2:
            return None
        return f"max SM clock {numbers[0]:.0f} MHz, power limit {numbers[1]:.0f} W"

    def __enter__(self) -> GpuSampler:
        if self.command:
            try:
                self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                text=True)
            except OSError:
                self.process = None
        return self

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # one that ignores SIGTERM must not hang the benchmark
            self.process.kill()
            out, _ = self.process.communicate()
        for line in out.splitlines():  # "1605, 690.12, 100"; a sample it could not read says "[N/A]": skipped
            try:
                clock, power, busy = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((clock, power, busy))

    def means(self) -> tuple[float | None, float | None, float | None]:
        """The mean SM clock (MHz), power draw (W) and utilization (%) over the samples."""
        if not self.samples:
            return None, None, None
        return tuple(sum(column) / len(column) for column in zip(*self.samples))


def mean_step_ms(step: Callable[[], object], warmup: int, steps: int, device: torch.device, label: str = "",
                 sample: bool = True) -> tuple[float, tuple[float | None, float | None, float | None]]:
    """Run warm-up steps, each timed between synchronisations, then `steps` steps back to back with a
    synchronisation only before and after them, as a training loop runs them (neither side reads a result before the
    next step is queued); the mean step in ms, and the GPU's mean SM clock, power and utilization over those steps
    (GpuSampler; sample=False: not sampled, all None).
    Each warm-up step's time goes to stderr: the first ones compile and autotune Triton kernels, which at new shapes
    can take minutes (fla's model at the 1.3b shapes gave no result within 270 s on an H100), and a log cut short by
    a time limit then still says where the time went. Without a label nothing is printed (the other ranks)."""
    for i in range(warmup):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if label:
            print(f"{label}: warm-up step {i + 1}/{warmup} took {time.perf_counter() - start:.1f} s", file=sys.stderr,
                  flush=True)
    synchronize(device)
    with GpuSampler(GpuSampler.command_for(device) if sample else None) as sampler:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        elapsed = time.perf_counter() - start
    return 1e3 * elapsed / steps, sampler.means()


def training_flags(case: Case, args: argparse.Namespace, data_parallel_size: int) -> list[str]:
    """pretrain_gdn.py's flags for this case: mock data, --micro-batches micro batches per GPU per step (gradient
    accumulation; --profile-steps more for --profile), constant lr."""
    shape = (["--num-layers", str(case.shape["num_hidden_layers"]), "--hidden-size", str(case.shape["hidden_size"]),
              "--num-attention-heads", str(case.shape["num_heads"]), "--head-dim", str(case.shape["head_dim"])]
             if case.shape else ["--model-size", case.preset])
    flags = [*shape, "--mock-data", "--vocab-size", str(case.vocab_size), "--seq-length", str(case.seq_length),
             "--micro-batch-size", str(case.batch),
             "--global-batch-size", str(case.batch * data_parallel_size * args.micro_batches),
             "--train-iters", str(args.warmup + args.steps + args.profile_steps), "--lr", "1e-4",
             "--lr-decay-style", "constant"]
    if args.device == "cuda":
        flags.append("--bf16")
    else:
        flags += ["--device", "cpu"]
    if case.recompute:
        flags += ["--recompute-granularity", case.recompute]
    if args.cuda_graph:
        flags.append("--cuda-graph")
    if args.zero_stage is not None:
        flags += ["--zero-stage", str(args.zero_stage)]
    return flags


def run_ours(case: Case, args: argparse.Namespace, result: Result) -> Result:
    """pretrain_gdn's training step, as train() runs it (minus logging, evaluation and checkpoints)."""
    if args.cuda_graph and case.recompute:
        result.status = "skipped: --cuda-graph refuses recomputation"
        return result
    config, cfg = parse_args(training_flags(case, args, launched_world_size()))
    groups, device, ds_config = pretrain_gdn.setup_run(config, cfg)
    torch.manual_seed(cfg.seed)
    _, train_data, _ = pretrain_gdn.build_datasets(cfg)
    config = dataclasses.replace(config, vocab_size=case.vocab_size)  # 32000 needs no padding (a multiple of 128)
    engine, result.parameters = pretrain_gdn.build_engine(config, cfg, groups, device, ds_config)
    engine.set_lr(cfg.lr)
    engine.model.train()
    data = pretrain_gdn.batches(train_data, 0, cfg.micro_batch_size, groups.data_parallel_rank,
                                groups.data_parallel_size)
    graph = pretrain_gdn.build_cuda_graph(engine, cfg, device, groups)  # None without --cuda-graph
    unread = []

    def step() -> None:  # as train() does between log lines: an iteration is read once the next one is queued
        unread.append(pretrain_gdn.train_step(engine, data, cfg, device, groups, graph=graph))
        if len(unread) == 2:
            unread.pop(0).read()

    label = f"{result.config} ours" if get_rank() == 0 else ""
    result.step_ms, (result.sm_clock_mhz, result.power_w, result.busy_pct) = mean_step_ms(
        step, args.warmup, args.steps, device, label, sample=not args.no_sampling)
    if args.profile and get_rank() == 0:
        write_profile(step, args.profile_steps, device, Path(args.profile) / f"{result.config}.txt")
    return result


def write_profile(step: Callable[[], object], steps: int, device: torch.device, path: Path, ours: bool = True) -> None:
    """torch.profiler's table of `steps` more steps, run back to back as the timed ones are, by kernel (or CPU op),
    sorted by self time: where a step's time goes; on a GPU preceded by the timeline's summary (gpu_timeline): how
    much of the time the GPU sat idle, and where (with several steps, also between them, as in the timed loop); then
    the matrix products by shape (matmul_table) and, for ours, the configuration the autotuner chose for each of our
    Triton kernels (autotuned_configs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((gpu_timeline(kernels) if kernels else "") +
                    prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90) + "\n\n" +
                    matmul_table(prof.key_averages(group_by_input_shape=True), device) + "\n" +
                    (autotuned_configs() if ours else ""))


def autotuned_configs() -> str:
    """Each of our autotuned Triton kernels and the configuration Triton's autotuner chose for each key (shapes and
    dtypes) it met in this process: a kernel that is slower inside the step than alone may have been given another
    configuration there (autotuning times the candidates inside the step, beside whatever else the GPU does)."""
    from triton.runtime.autotuner import Autotuner

    lines = []
    for name, module in sorted(sys.modules.items()):
        if name.startswith("megatron_gdn.kernels.") and module is not None:
            for attr, obj in sorted(vars(module).items()):
                if isinstance(obj, Autotuner):
                    lines += [f"  {attr} {key}: {config}" for key, config in obj.cache.items()]
    return "autotuned kernels (kernel, key: configuration chosen):\n" + "\n".join(lines or ["  none tuned"]) + "\n"


# The ops whose calls are the matrix products (F.linear, torch.matmul and the fused projections end in them);
# their operands, by position in the op's inputs: (first, second).
MATMUL_OPERANDS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::bmm": (0, 1), "aten::baddbmm": (1, 2)}


def matmul_flops(op: str, shapes: list[list[int]]) -> int:
    """2 x M x N x K (x batch) of one call of a matrix-product op, from its inputs' shapes."""
    i, j = MATMUL_OPERANDS[op]
    a, b = shapes[i], shapes[j]
    return 2 * math.prod(a) * b[-1]  # a: [(batch,) M, K], b: [(batch,) K, N]


def matmul_table(averages, device: torch.device) -> str:
    """The step's matrix products grouped by op and operand shapes, slowest in total first: calls, time (the GPU's
    for the op's kernels; the CPU's on a CPU) and the rate it reached. A product well below the others' rate is a
    shape cuBLAS runs badly (eager steps only: a CUDA graph's replay launches kernels without ops)."""
    rows = []
    for avg in averages:
        if avg.key in MATMUL_OPERANDS:
            ms = (avg.device_time_total if device.type == "cuda" else avg.cpu_time_total) / 1e3
            rows.append((ms, avg.key, avg.input_shapes, avg.count, matmul_flops(avg.key, avg.input_shapes) * avg.count))
    if not rows:
        return "no matrix products (a CUDA graph's replay records none)\n"
    total_ms, total_flops = sum(r[0] for r in rows), sum(r[4] for r in rows)
    lines = [f"matrix products: {sum(r[3] for r in rows)} calls, {total_ms:.2f} ms, "
             f"{total_flops / max(total_ms, 1e-9) / 1e9:.1f} TFLOP/s; by op and operand shapes (ms, calls, TFLOP/s):"]
    for ms, op, shapes, count, flops in sorted(rows, key=lambda r: -r[0]):
        operands = " x ".join(str(shapes[i]) for i in MATMUL_OPERANDS[op])
        lines.append(f"  {ms:9.3f}  {count:4d}  {flops / max(ms, 1e-9) / 1e9:7.1f}  {op} {operands}")
    return "\n".join(lines) + "\n"


def gpu_timeline(kernels: list[tuple[float, float, str]], largest: int = 15) -> str:
    """From (start, end, name) of a step's GPU kernels, in microseconds: the span from the first start to the last
    end, the time some kernel ran (the union of the intervals), the idle rest, and the largest gaps between kernels
    with the kernels on either side. The step time minus the sum of kernel times is idle GPU: waits on the host
    (synchronisations, launches slower than the kernels they launch) and the gaps between back-to-back kernels."""
    kernels = sorted(kernels)
    busy, gaps, end = 0.0, [], kernels[0][0]
    for i, (k_start, k_end, _) in enumerate(kernels):
        if k_start > end and i:
            gaps.append((k_start - end, kernels[i - 1][2], kernels[i][2]))
        busy += max(0.0, k_end - max(k_start, end))
        end = max(end, k_end)
    span = end - kernels[0][0]
    small = [g for g in gaps if g[0] < 10]
    lines = [f"GPU timeline of the step: {len(kernels)} kernels over {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, "
             f"idle {(span - busy) / 1e3:.2f} ms in {len(gaps)} gaps ({len(small)} under 10 us: "
             f"{sum(g[0] for g in small) / 1e3:.2f} ms)",
             "largest gaps (us, the kernel before -> the kernel after):"]
    lines += [f"  {g:9.1f}  {before[:60]} -> {after[:60]}" for g, before, after in sorted(gaps, reverse=True)[:largest]]
    return "\n".join(lines) + "\n\n"


def load_fla_model():
    """fla's model class and config, or the reason they do not import (fla.models needs transformers)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.models import GatedDeltaNetConfig as FlaConfig
        from fla.models import GatedDeltaNetForCausalLM as FlaModel
    except Exception as e:  # noqa: BLE001 - any import failure means "no fla here"
        return None, f"fla not importable ({type(e).__name__}: {e})"
    chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only: see the module docstring
    return (FlaConfig, FlaModel), None


def run_fla(case: Case, args: argparse.Namespace, result: Result, fla) -> Result:
    """fla's model in a plain bf16 AdamW loop, on the same tokens as ours."""
    FlaConfig, FlaModel = fla
    ours = model_config(case)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = FlaConfig(hidden_size=ours.hidden_size, num_hidden_layers=ours.num_hidden_layers,
                       num_heads=ours.num_heads, head_dim=ours.head_dim, expand_v=ours.expand_v,
                       intermediate_size=ours.intermediate_size, vocab_size=case.vocab_size, use_cache=False)
    model = FlaModel(config).to(device=device, dtype=torch.bfloat16)
    result.parameters = sum(p.numel() for p in model.parameters())
    if case.fla_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    # The samples of ours' --mock-data (pretrain_gdn's default --seed 1234): a pure function of seed and index.
    steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
    data = pretrain_gdn.batches(MockGPTDataset(case.batch * steps * args.micro_batches, case.seq_length,
                                               case.vocab_size, seed=1234), 0, case.batch)

    def step() -> torch.Tensor:  # nothing in it waits for the GPU
        for _ in range(args.micro_batches):  # gradient accumulation, as ours: each micro batch's mean loss / N
            inputs = next(data)["tokens"][:, :-1].pin_memory().to(device, non_blocking=True)
            loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss  # labels shift inside
            (loss / args.micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    result.step_ms, (result.sm_clock_mhz, result.power_w, result.busy_pct) = mean_step_ms(
        step, args.warmup, args.steps, device, f"{result.config} fla", sample=not args.no_sampling)
    if args.profile:  # its GPU timeline's busy time per step: its step without waiting for its host
        write_profile(step, args.profile_steps, device, Path(args.profile) / f"{result.config}-fla.txt", ours=False)
    return result


def measured(run: Callable[..., Result], case: Case, args: argparse.Namespace, result: Result, *extra) -> Result:
    """run(case, args, result, *extra) with its peak memory, or result marked OOM; either way the run's memory is
    freed afterwards."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result = run(case, args, result, *extra)
    except torch.cuda.OutOfMemoryError as error:
        result.status = "OOM"
        # what was asked for, and how much was allocated and reserved: fragmentation or a real lack of memory
        print(f"{result.config} {result.implementation}: {' '.join(str(error).split())[:700]}", file=sys.stderr)
    # The failed run's frames (and its tensors) are gone once the except block is left.
    if device.type == "cuda":
        result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    destroy_model_parallel()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def versions(device: torch.device, fla_note: str | None) -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"GPU: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "device: CPU",
             f"torch {torch.__version__}"]
    limits = GpuSampler.limits(device)
    if limits:
        parts.insert(1, limits)
    for package in ("triton", "flash-linear-attention", "deepspeed"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} not installed")
    if fla_note:
        parts.append(fla_note)
    return "; ".join(parts)


def table(results: list[Result], cases: dict[str, Case], header: str, peak: float | None) -> str:
    """The markdown table: one row per run, MFU by both counts, ours' speed-up over fla's model."""
    lines = [header, "",
             "| config | tokens/step/GPU | model | recompute | parameters | step (ms) | tokens/s/GPU | "
             "MFU (FLOPs model) | MFU (6N) | peak memory (GiB) | speed-up vs fla | SM clock, power, GPU busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tps = r.tokens_per_sec()
        flops = training_flops_per_token(model_config(cases[r.config]))
        fla = next((f for f in results if f.config == r.config and f.implementation == "fla" and f.step_ms), None)
        speedup = f"{tps / fla.tokens_per_sec():.2f}x" if r.implementation == "ours" and tps and fla else ""
        mfu = (f"{100 * tps * flops / peak:.1f}% | {100 * tps * 6 * r.parameters / peak:.1f}%"
               if tps and peak else " | ")
        memory = f"{r.peak_gib:.1f}" if r.peak_gib is not None else ""
        measured_cells = (f"{r.step_ms:.1f} | {tps:,.0f} | {mfu}" if tps else f"{r.status} | | | ")
        clock = (f"{r.sm_clock_mhz:.0f} MHz, {r.power_w:.0f} W, {r.busy_pct:.0f}%" if r.sm_clock_mhz is not None
                 else "")
        lines.append(f"| {r.config} | {r.tokens_per_step:,} | {r.implementation} | {r.recompute} | "
                     f"{r.parameters / 1e6:,.1f}M | {measured_cells} | {memory} | {speedup} | {clock} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from: {DEFAULT_CONFIGS}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (their mean is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton compilation, autotuning)")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro batches per step and GPU (gradient accumulation, as the example recipes run): "
                             "a step is this many forward and backward passes of the configuration's batch, then "
                             "one optimizer step")
    parser.add_argument("--no-fla", action="store_true", help="time ours only")
    parser.add_argument("--no-ours", action="store_true", help="time fla's model only (a run of its own: at the "
                        "1.3b shapes it did not finish in the minutes left after ours)")
    parser.add_argument("--max-memory-gib", type=float, help="cap this process's GPU memory (torch's caching "
                        "allocator) at this many GiB, e.g. 80 to check on a larger GPU what fits an 80 GB one: a run "
                        "over it is reported as OOM")
    parser.add_argument("--profile", help="write torch.profiler's per-kernel table of --profile-steps more steps of "
                        "ours to PROFILE/<config>.txt, and of fla's model to PROFILE/<config>-fla.txt")
    parser.add_argument("--profile-steps", type=int, default=1, help="steps in the profile, back to back as the "
                        "timed steps run: with more than one its GPU timeline also shows the idle time between steps")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                        help="ours through DeepSpeed ZeRO (as pretrain_gdn.py --zero-stage)")
    parser.add_argument("--cuda-graph", action="store_true", help="ours replays each micro batch's forward and "
                        "backward as a CUDA graph (as pretrain_gdn.py --cuda-graph; GPU, built-in engine)")
    parser.add_argument("--no-sampling", action="store_true", help="no nvidia-smi beside the timed steps (the last "
                        "column stays empty): to check that its queries, ten a second, do not slow the step (at 1.3b "
                        "they did not: 282.0 against 281.3 ms in one process, session 28)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", help="also write the results to this file (benchmarks/bench_dp_scaling.sh reads it)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model, a few steps, no fla")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if args.micro_batches < 1:
        parser.error("--micro-batches must be at least 1")
    if args.profile_steps < 1:
        parser.error("--profile-steps must be at least 1")
    if args.no_ours and args.no_fla:
        parser.error("--no-ours and --no-fla leave nothing to time")
    if args.device == "cpu" and not args.tiny:
        parser.error("no GPU: the benchmark configurations need one (use --tiny for the CPU smoke run)")
    if args.cuda_graph and (args.device == "cpu" or args.zero_stage):
        parser.error("--cuda-graph needs a GPU and the built-in engine (no --tiny, no --zero-stage 1-3)")
    if args.cuda_graph and args.warmup < WARMUP_ITERATIONS + 1:
        parser.error(f"--cuda-graph needs --warmup >= {WARMUP_ITERATIONS + 1}: {WARMUP_ITERATIONS} eager iterations, "
                     f"then the one that captures the graph")
    cases = {"tiny": TINY} if args.tiny else {}
    for name in ([] if args.tiny else args.configs.split(",")):
        if name not in CASES:
            parser.error(f"unknown configuration {name!r}; choose from {DEFAULT_CONFIGS}")
        cases[name] = CASES[name]

    world_size = launched_world_size()  # torchrun's WORLD_SIZE; 1 when run directly
    if args.max_memory_gib and world_size > 1:
        parser.error("--max-memory-gib is for single-GPU runs (run without torchrun)")
    if args.max_memory_gib and args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory_gib * 2**30 / total), 0)
    if args.tiny or args.no_fla or world_size > 1:
        fla, fla_note = None, "fla's model not run (--tiny, --no-fla or several ranks)"
    else:
        fla, fla_note = load_fla_model()
    results = []
    for name, case in cases.items():
        tokens = case.seq_length * case.batch * args.micro_batches
        if not args.no_ours:
            results.append(measured(run_ours, case, args, Result(name, "ours", case.recompute or "none", tokens)))
            if get_rank() == 0:
                print(results[-1], flush=True)
        if fla and case.with_fla:
            recompute = "gradient checkpointing" if case.fla_checkpointing else "none"
            results.append(measured(run_fla, case, args, Result(name, "fla", recompute, tokens), fla))
            print(results[-1], flush=True)

    if get_rank() == 0:
        device = torch.device(args.device)
        peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        header = versions(device, fla_note) + f"; ours on {world_size} rank(s), ZeRO stage {args.zero_stage or 0}"
        if args.cuda_graph:
            header += "; ours with --cuda-graph"
        if args.micro_batches > 1:
            header += f"; {args.micro_batches} micro batches per step (gradient accumulation)"
        if args.max_memory_gib and device.type == "cuda":
            header += f"; GPU memory capped at {args.max_memory_gib:g} GiB"
        text = table(results, cases, header, peak)
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps({"world_size": world_size, "zero_stage": args.zero_stage,
                                                   "results": [dataclasses.asdict(r) for r in results]}, indent=1))
    pretrain_gdn.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
