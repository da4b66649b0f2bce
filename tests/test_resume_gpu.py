"""On a GPU: a resumed run runs the kernels the saving run's autotuning chose (kernels/tuned_configs.py), so it is
bit-identical to the uninterrupted run whatever its own autotuning would have chosen.

    pytest -m gpu tests/test_resume_gpu.py

A new process times the autotuned kernels' candidates again, and candidates within noise of each other can change
places; some compute other bits. The test plants other choices before each resume (every kernel's choice moved
`shift` places along its candidates, for every shift, so that each candidate of each kernel the run used is planted
once), resumes, and asks for the uninterrupted run's losses and its weights and optimizer state at the end, bit
for bit: the checkpoint's choices must have replaced the planted ones. The control resumes with the same planted
choices and the checkpoint's left out; its assertion is that some shift changes the trained state, without which
this test could not tell installed choices from planted ones. The weights are the sensitive witness: on an H200
(session 26) no planted choice changed this model's losses, every digit of them (session 25's earlier version saw a
loss 2.4e-6 off at the third resumed iteration, with wy's 32-wide builds, since removed, among the candidates).

The second test trains the `small` preset at full size twice in one process: every kernel at its full grid, where a
race in compiled code shows (docs/KERNELS.md, "Miscompiles seen on the card").
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.training.checkpointing import checkpoint_file

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and Triton compiling, not interpreting)")]

# Two blocks of 2 heads of 64 (the `small` preset's head size), 256 tokens per sample.
MODEL = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "2", "--head-dim", "64"]


def flags(*extra: str) -> list[str]:
    return [*MODEL, "--mock-data", "--vocab-size", "512", "--seq-length", "256", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "6", "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--log-interval", "1", "--eval-interval", "1000", "--bf16", *extra]


def runnable(tuner) -> list:
    """The candidates the autotuner ran for its (one) key: one that needs more shared memory than the GPU has is
    timed inf (do_bench's quantiles, a list), and planting it would fail the launch."""
    timings = {str(config): t for config, t in (getattr(tuner, "configs_timings", None) or {}).items()}
    return [c for c in tuner.configs if all(map(math.isfinite, timings.get(str(c), [0.0])))]


def trained_state(root, iteration: int = 6) -> list[torch.Tensor]:
    """The weights and the optimizer's state of the checkpoint saved at `iteration`, flattened in a fixed order."""
    state = torch.load(checkpoint_file(root, iteration), weights_only=True)
    tensors = []

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk([state["model"], state["optimizer"]])
    return tensors


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def test_resumed_run_runs_the_saving_runs_kernels(tmp_path, monkeypatch):
    from triton.runtime.autotuner import Autotuner

    from megatron_gdn.kernels import chunk
    save = str(tmp_path / "checkpoints")
    full = pretrain_gdn.train(*parse_args(flags("--save", save, "--save-interval", "3")))["losses"]
    tuners = {name: t for name, t in vars(chunk).items() if isinstance(t, Autotuner) and t.cache}
    assert {"chunk_bwd_wy_kernel", "chunk_bwd_dqkw_kernel", "chunk_intra_kernel"} <= set(tuners)
    chosen = {name: dict(t.cache) for name, t in tuners.items()}
    saved = torch.load(checkpoint_file(save, 3), weights_only=True)["kernel_configs"]
    assert saved["device"] == torch.cuda.get_device_name()
    assert all(f"chunk.{name}" in saved["kernels"] for name in tuners)
    expected = {it: full[it] for it in (4, 5, 6)}
    expected_state = trained_state(save)

    ran = {name: runnable(tuner) for name, tuner in tuners.items()}

    def plant(shift: int) -> None:
        for name, tuner in tuners.items():
            for key, config in chosen[name].items():
                tuner.cache[key] = ran[name][(ran[name].index(config) + shift) % len(ran[name])]

    def resume(name: str) -> tuple[dict[int, float], list[torch.Tensor]]:
        root = str(tmp_path / name)
        losses = pretrain_gdn.train(*parse_args(flags("--load", save, "--ckpt-step", "3", "--save", root)))["losses"]
        return losses, trained_state(root)

    controls = {}
    try:
        for shift in range(1, max(len(candidates) for candidates in ran.values())):
            plant(shift)
            losses, state = resume(f"installed{shift}")
            assert losses == expected and same_bits(state, expected_state), shift
            assert {name: dict(t.cache) for name, t in tuners.items()} == chosen, shift
            plant(shift)
            with monkeypatch.context() as patch:
                patch.setattr(pretrain_gdn, "install_tuned_configs", lambda *args: "left out (the control)")
                losses, state = resume(f"planted{shift}")
            controls[shift] = losses != expected or not same_bits(state, expected_state)
    finally:
        for name, tuner in tuners.items():
            tuner.cache.update(chosen[name])
    assert any(controls.values()), (
        "every planted choice gave the uninterrupted run's losses, weights and optimizer state: this test cannot tell "
        f"the checkpoint's choices from planted ones on this GPU (shifts {sorted(controls)})")


def test_two_runs_of_the_small_preset_give_the_same_bits(tmp_path):
    """The `small` preset at full size (8 sequences of 4096 tokens, vocabulary 32000), two iterations, twice in one
    process with the same seed: the same losses, weights and optimizer state, bit for bit. The second run keeps the
    first's autotuned choices, so only a kernel whose bits change from run to run can separate them (wy's 32-wide
    builds did at full-size layers, never at the kernel tests' small shapes; tests/test_kernels_gpu.py checks the
    chunk kernels alone at such layers)."""
    def run(name: str) -> tuple[dict[int, float], list[torch.Tensor]]:
        root = str(tmp_path / name)
        losses = pretrain_gdn.train(*parse_args([
            "--model-size", "small", "--mock-data", "--vocab-size", "32000", "--seq-length", "4096",
            "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "2", "--lr", "1e-4",
            "--log-interval", "1", "--eval-interval", "1000", "--bf16", "--save", root]))["losses"]
        return losses, trained_state(root, 2)

    (losses, state), (again, state_again) = run("first"), run("second")
    assert len(losses) == 2 and losses == again
    assert same_bits(state, state_again)
