"""The optimizer step alone: TritonAdamW (training/optimizer.py, its kernel kernels/adamw.py) against torch's fused
AdamW on a preset's parameters, side by side in one process, and how far each is from memory speed.

    python benchmarks/bench_adamw.py [--configs small,1.3b] [--markdown FILE]
    python benchmarks/bench_adamw.py --configs 1.3b --blocks 2048,1024,512     # our kernel at other program sizes
    TRITON_INTERPRET=1 python benchmarks/bench_adamw.py --tiny                  # CPU smoke run (test_bench_smoke.py)

The parameters are the preset's (the default vocabulary, 32000) in fp32, with random gradients; each step is the
built-in engine's: a clip divisor as grad_scale and a found_inf of 0, the optimizer in two groups (decayed, not).
With --copies (the default) every 2-D weight has a bf16 compute copy, which our kernel writes as it updates the
weight, as it does for the built-in engine's fused-product weights; torch's step writes none (the engine then casts
them in the next forward: not counted here). Time: the GPU time of a step, the summed durations of its kernels under
torch.profiler (bench_fused_ops.measure), after an untimed step that compiles the kernel and creates the state.
Floor: what a step cannot avoid moving, 16 bytes read and 12 written a parameter (weight, gradient, two moments) and
2 written a copied one, at the card's device-to-device copy bandwidth. torch's step also writes the divided gradient
back (4 bytes a parameter more, read by nothing: kernels/adamw.py).

--blocks times our kernel at other program sizes (kernels/adamw.BLOCK): session 28 chose 1024 so, on an H200
(9.92 against 11.60 ms for 2048 at `1.3b`, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_gdn.kernels import adamw  # noqa: E402
from megatron_gdn.models import MODEL_PRESETS, GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # noqa: E402
from megatron_gdn.models.fused_projection import COMPUTE_COPY  # noqa: E402
from megatron_gdn.training.optimizer import TritonAdamW, parameter_groups  # noqa: E402

from bench_fused_ops import TINY, copy_bandwidth, measure  # noqa: E402  (this folder)

HYPER = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)


def preset_parameters(config: GatedDeltaNetConfig, device: str, copies: bool) -> torch.nn.Module:
    """The model's parameters on the device (fp32, random weights and gradients; the model is built on the meta
    device first, so only the parameters are ever allocated), each 2-D weight with a bf16 copy when asked."""
    with torch.device("meta"):
        model = GatedDeltaNetForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(0)
    made: dict[int, torch.nn.Parameter] = {}  # a tied weight stays one parameter
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in made:
                weight = torch.nn.Parameter(0.02 * torch.randn(p.shape, device=device, generator=generator))
                weight.grad = 1e-3 * torch.randn(p.shape, device=device, generator=generator)
                if copies and weight.dim() == 2:
                    setattr(weight, COMPUTE_COPY, torch.empty(p.shape, dtype=torch.bfloat16, device=device))
                made[id(p)] = weight
            setattr(module, name, made[id(p)])
    return model


def optimizer_step(optimizer: torch.optim.Optimizer, device: str):
    """A step as the built-in engine takes it: the clip divisor as grad_scale, found_inf 0 (the update applied)."""
    grad_scale, found_inf = torch.tensor(1.25, device=device), torch.zeros((), device=device)

    def step():
        optimizer.grad_scale, optimizer.found_inf = grad_scale, found_inf
        optimizer.step()
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,1.3b", help="comma-separated model presets")
    parser.add_argument("--blocks", default=str(adamw.BLOCK), help="comma-separated program sizes for our kernel "
                        f"(kernels/adamw.BLOCK, {adamw.BLOCK} by default)")
    parser.add_argument("--copies", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 compute copies of the 2-D weights, written by our kernel (default: on)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model, Triton's interpreter "
                                                          "(set TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    blocks = [int(b) for b in args.blocks.split(",")]
    default_block = adamw.BLOCK
    for name in ([] if args.tiny else args.configs.split(",")):
        if name not in MODEL_PRESETS:
            parser.error(f"unknown preset {name!r}; choose from {', '.join(MODEL_PRESETS)}")
    if any(b < 16 or b & (b - 1) for b in blocks):
        parser.error("--blocks: powers of two from 16")
    bandwidth = copy_bandwidth(device) if cuda else 0.0
    versions = f"torch {torch.__version__}; triton {triton.__version__}"
    header = (f"GPU: {torch.cuda.get_device_name()}; {versions}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; GPU time "
              f"of a step (kernels' summed durations, torch.profiler)" if cuda
              else f"CPU smoke run (Triton interpreter); {versions}")
    header += f"; bf16 copies of the 2-D weights: {'yes' if args.copies else 'no'}"
    print(header, flush=True)
    configs = {"tiny": GatedDeltaNetConfig(**TINY)} if args.tiny else {
        name: GatedDeltaNetConfig(**MODEL_PRESETS[name])
        for name in args.configs.split(",")}

    lines = [header, "", "| config | parameters | optimizer | ms a step | floor (ms) | / floor |",
             "|---|---|---|---|---|---|"]
    for name, config in configs.items():
        model = preset_parameters(config, device, args.copies)
        params = list(model.parameters())
        numel = sum(p.numel() for p in params)
        copied = sum(p.numel() for p in params if getattr(p, COMPUTE_COPY, None) is not None)
        floor = (28 * numel + 2 * copied) / bandwidth * 1e3 if bandwidth else None
        runs = [(f"ours, BLOCK {b}", b) for b in blocks] + [("torch fused", None)]
        for label, block in runs:
            if block is None:
                optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), fused=True, **HYPER)
            else:
                adamw.BLOCK = block  # read by group_tables and adamw_step; restored below
                optimizer = TritonAdamW(parameter_groups(model, 0.1), use_triton=True, **HYPER)
            try:
                ms = measure(optimizer_step(optimizer, device), cuda)
            finally:
                adamw.BLOCK = default_block
            del optimizer  # its moments: the next optimizer makes its own
            ratio = f"{ms / floor:.2f}" if floor else ""
            lines.append(f"| {name} | {numel:,} | {label} | {ms:.3f} | "
                         f"{'' if floor is None else f'{floor:.3f}'} | {ratio} |")
            print(lines[-1], flush=True)
        del model, params
        if cuda:
            torch.cuda.empty_cache()
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
