"""Launchers on CPU (gloo): mpiexec with ranks from MPI (mpi4py), torchrun across two rendezvous "nodes", the
deepspeed launcher with a hostfile, srun's environment; the start-up topology line; the same losses as one process.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.parallel import launch
from test_data_corpus import tool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
# Variables a launcher sets; the subprocesses start without them, as from a login shell.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "CROSS_RANK", *launch.MPI_VARIABLES, "SLURM_STEP_NUM_TASKS", "SLURM_PROCID")


def flags(*extra: str) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2", "--head-dim", "16",
            "--mock-data", "--vocab-size", "128", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "4", "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1", *extra]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_losses(stdout: str) -> dict[int, float]:
    pattern = r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+) \|"
    return {int(m[1]): float(m[2]) for m in re.finditer(pattern, stdout)}


@pytest.fixture(scope="module")
def reference() -> dict[int, float]:
    losses = pretrain_gdn.train(*parse_args(flags()))["losses"]
    return {it: float(f"{loss:.6E}") for it, loss in losses.items()}  # as the console prints them


def check_run(result: subprocess.CompletedProcess, launcher: str, reference: dict[int, float]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"topology: world 2 = tensor 1 x context 1 x data 2 (launcher: {launcher}" in result.stdout
    assert "data-parallel engine:" in result.stdout and "torch " in result.stdout
    losses = parse_losses(result.stdout)
    assert sorted(losses) == sorted(reference)
    for it, loss in reference.items():
        assert abs(losses[it] - loss) <= TOLERANCE * loss, (it, losses[it], loss)


def test_mpiexec_trains_with_world_size_two(reference):
    """`mpiexec -n 2 python pretrain_gdn.py ...`: no RANK/WORLD_SIZE in the environment; MPI tells them."""
    mpiexec = tool("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (the test extras install the mpich wheel, which provides it)")
    result = subprocess.run([mpiexec, "-n", "2", sys.executable, "pretrain_gdn.py", *flags("--zero-stage", "1")],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    check_run(result, "mpi", reference)
    assert "DeepSpeed" in result.stdout and "ZeRO stage 1" in result.stdout


def test_torchrun_rendezvous_across_two_nodes(reference):
    """Two torchrun invocations, one process each, meet at a c10d rendezvous endpoint: what each node of a
    multi-node job runs (`torchrun --nnodes 2 --rdzv-endpoint HOST:PORT ...`)."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test", "pretrain_gdn.py", *flags()]
    nodes = [subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    first = next(r for r in results if "topology:" in r.stdout)  # the node that got global rank 0 prints
    check_run(first, "torchrun", reference)


def test_deepspeed_launcher_with_hostfile(tmp_path, reference):
    """`deepspeed --hostfile ...` (here without ssh: each node runs it with its --node_rank); the launcher passes
    --local_rank, which pretrain_gdn.py takes from LOCAL_RANK instead."""
    deepspeed = tool("deepspeed")
    if deepspeed is None:
        pytest.skip("the deepspeed launcher is not installed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    command = [deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "pretrain_gdn.py", *flags("--zero-stage", "2")]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    check_run(result, "deepspeed", reference)


def test_srun_environment(monkeypatch):
    """An srun job step: ranks from SLURM_*, the first node of the step as MASTER_ADDR, a port from the job id."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(SLURM_STEP_NUM_TASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_STEP_NODELIST="gpu[007-010]",
               SLURM_JOB_ID="4242")
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # no scontrol: the bracket syntax is parsed
    assert launch.discover_launch_environment() == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu007" and env["MASTER_PORT"] == str(20000 + 4242)
    # The batch script itself (no srun: no SLURM_STEP_*) is one process, not the job's 8 tasks.
    batch = {"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[007-010]"}
    monkeypatch.setattr(os, "environ", batch)
    assert launch.discover_launch_environment() == "single" and "WORLD_SIZE" not in batch


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("gpu[003-005,010],cpu1", "gpu003"),
                                             ("a-b[12,3]", "a-b12"), ("n[1-2]", "n1")])
def test_first_slurm_host(monkeypatch, nodelist, first):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert launch.first_slurm_host(nodelist) == first


def test_launcher_arguments_and_names(monkeypatch):
    env = {}
    monkeypatch.setattr(os, "environ", env)
    assert launch.consume_launcher_arguments(["--lr", "1", "--local_rank=3", "--x"]) == ["--lr", "1", "--x"]
    assert env["LOCAL_RANK"] == "3"
    assert launch.consume_launcher_arguments(["--local-rank", "5", "--y"]) == ["--y"] and env["LOCAL_RANK"] == "3"
    assert launch.launcher_name() == "single"
    env.update(RANK="0", WORLD_SIZE="2")
    assert launch.launcher_name() == "environment"
    env["PMI_RANK"] = "0"
    assert launch.launcher_name() == "mpi"
    env["CROSS_RANK"] = "0"
    assert launch.launcher_name() == "deepspeed"
    env["TORCHELASTIC_RUN_ID"] = "x"
    assert launch.launcher_name() == "torchrun"
