"""The autotuned kernels' choices (kernels/tuned_configs.py): read, saved in a checkpoint, restored on resume,
refused for another GPU or Triton, agreed between ranks. On a GPU, tests/test_resume_gpu.py resumes a real run
with other choices planted first and gets the saving run's losses bit for bit.

Here the autotuners are toys over a kernel that never runs: what is under test is the bookkeeping of their
`cache` (key -> chosen configuration), which Triton's Autotuner fills at a kernel's first call on a GPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.distributed as dist
import triton
import triton.language as tl
from test_tensor_parallel import run_distributed
from test_training import flags, run_train

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.kernels import tuned_configs as tc
from megatron_gdn.training.checkpointing import checkpoint_file

CPU = torch.device("cpu")
KEY = (12, 64, "torch.bfloat16")
OTHER_KEY = (1, 8, "torch.float32")


@triton.jit
def toy_kernel(x, N: tl.constexpr, B: tl.constexpr):
    tl.store(x + tl.arange(0, B), tl.zeros([B], dtype=tl.float32))


def toy_autotuner():
    candidates = [triton.Config({"B": 16}, num_warps=4), triton.Config({"B": 32}, num_warps=4),
                  triton.Config({"B": 32}, num_warps=2, num_stages=3)]
    return triton.autotune(configs=candidates, key=["N"])(toy_kernel)


def test_every_autotuned_kernel_of_the_imported_modules_is_found():
    import megatron_gdn.kernels.chunk  # noqa: F401  (what a model's first forward imports)
    import megatron_gdn.kernels.recurrent  # noqa: F401
    names = set(tc.autotuners())
    assert {"chunk.chunk_intra_kernel", "chunk.chunk_scan_fwd_kernel", "chunk.chunk_o_kernel",
            "chunk.chunk_scan_bwd_kernel", "chunk.chunk_bwd_dqkw_kernel", "chunk.chunk_bwd_dqkw_wide_kernel",
            "chunk.chunk_bwd_wy_kernel", "recurrent.fused_recurrent_fwd_kernel"} <= names


def test_choices_survive_a_checkpoint_file_and_install_into_fresh_autotuners(tmp_path):
    tuned, fresh = toy_autotuner(), toy_autotuner()
    tuned.cache[KEY] = tuned.configs[2]
    tuned.cache[OTHER_KEY] = tuned.configs[1]
    torch.save({"kernel_configs": tc.tuned_configs(CPU, {"toy.kernel": tuned})}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)["kernel_configs"]  # as checkpoints are read
    assert saved["device"] == "cpu" and saved["triton"] == triton.__version__
    line = tc.install_tuned_configs(saved, CPU, {"toy.kernel": fresh})
    assert fresh.cache == {KEY: fresh.configs[2], OTHER_KEY: fresh.configs[1]}
    assert "2 installed" in line


@pytest.mark.parametrize("field, value", [("device", "NVIDIA H100 80GB HBM3"), ("triton", "3.0.0")])
def test_choices_of_another_gpu_or_triton_version_are_not_installed(field, value):
    tuned, fresh = toy_autotuner(), toy_autotuner()
    tuned.cache[KEY] = tuned.configs[2]
    saved = {**tc.tuned_configs(CPU, {"toy.kernel": tuned}), field: value}
    line = tc.install_tuned_configs(saved, CPU, {"toy.kernel": fresh})
    assert fresh.cache == {}
    assert value in line and "tuned again" in line and "not bit-identical" in line


def test_a_configuration_this_code_no_longer_offers_is_tuned_again():
    tuned, fresh = toy_autotuner(), toy_autotuner()
    tuned.cache[KEY] = tuned.configs[2]
    tuned.cache[OTHER_KEY] = triton.Config({"B": 128}, num_warps=8)  # a candidate of older code
    line = tc.install_tuned_configs(tc.tuned_configs(CPU, {"toy.kernel": tuned}), CPU, {"toy.kernel": fresh})
    assert fresh.cache == {KEY: fresh.configs[2]}
    assert "1 installed" in line and "1 not among this code's candidates" in line and "B: 128" in line


def test_a_checkpoint_without_choices_installs_nothing():
    fresh = toy_autotuner()
    assert tc.install_tuned_configs(None, CPU, {"toy.kernel": fresh}) == "kernel configurations: none in the checkpoint"
    assert fresh.cache == {}


def _agree_case() -> None:
    rank = dist.get_rank()
    tuner = toy_autotuner()
    tuner.cache[KEY] = tuner.configs[rank]  # each rank chose another configuration
    if rank == 1:
        tuner.cache[OTHER_KEY] = tuner.configs[2]  # a key rank 0 has not tuned
    tc.agree_on_tuned_configs(CPU, dist.group.WORLD, {"toy.kernel": tuner})
    expected = {KEY: tuner.configs[0]}
    if rank == 1:
        expected[OTHER_KEY] = tuner.configs[2]
    assert tuner.cache == expected, (rank, tuner.cache)


def test_ranks_take_rank_0s_choices():
    run_distributed(2, _agree_case)


def _data_parallel_training_case() -> None:
    """Each rank's planted kernel chose its own configuration before training, and another at the first
    evaluation (as a forward without gradients tunes kernels of its own): afterwards both ranks run rank 0's."""
    rank = dist.get_rank()
    module = types.ModuleType("megatron_gdn.kernels.toy_for_test")
    module.toy_kernel = tuner = toy_autotuner()
    sys.modules[module.__name__] = module
    tuner.cache[KEY] = tuner.configs[rank]
    evaluate, at_evaluation = pretrain_gdn.evaluate, []

    def evaluate_and_tune(*args, **kwargs):
        at_evaluation.append(tuner.cache[KEY])
        tuner.cache.setdefault(OTHER_KEY, tuner.configs[2 - rank])
        return evaluate(*args, **kwargs)

    pretrain_gdn.evaluate = evaluate_and_tune
    pretrain_gdn.train(*parse_args(flags("--eval-interval", "2", "--eval-iters", "1", iters=3)))
    assert at_evaluation == [tuner.configs[0]], ("not agreed after the first iteration", rank)
    assert tuner.cache == {KEY: tuner.configs[0], OTHER_KEY: tuner.configs[2]}, (rank, tuner.cache)


def test_data_parallel_ranks_run_rank_0s_choices_after_the_first_iteration_and_evaluation():
    run_distributed(2, _data_parallel_training_case)


@pytest.fixture
def planted_kernel_module(monkeypatch):
    """A kernel module as the model's first forward would leave it: imported, its autotuner's choice made."""
    module = types.ModuleType("megatron_gdn.kernels.toy_for_test")
    module.toy_kernel = toy_autotuner()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_training_saves_the_choices_and_a_resumed_run_installs_them(tmp_path, planted_kernel_module, capsys):
    tuner = planted_kernel_module.toy_kernel
    tuner.cache[KEY] = tuner.configs[2]
    run_train(flags("--save", str(tmp_path), "--save-interval", "3"))
    saved = torch.load(checkpoint_file(tmp_path, 3), weights_only=True)["kernel_configs"]
    assert saved["kernels"] == {"toy_for_test.toy_kernel": [(KEY, str(tuner.configs[2]))]}
    tuner.cache.clear()  # a new process has chosen nothing yet
    capsys.readouterr()
    resumed = run_train(flags("--load", str(tmp_path), "--ckpt-step", "3"))
    assert resumed["iteration"] == 6
    assert tuner.cache == {KEY: tuner.configs[2]}
    assert "kernel configurations: 1 installed from the checkpoint" in capsys.readouterr().out
