"""How this process was launched: the rank environment torch.distributed needs, whatever the launcher.

    torchrun, the deepspeed launcher    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are already set
    srun (Slurm job step)               SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_NODELIST
    mpirun / mpiexec                    ranks from MPI itself, through mpi4py (MPICH, Open MPI, Intel MPI, ...)
    python pretrain_gdn.py              one process

`discover_launch_environment()` runs first in pretrain_gdn.main(), before the flags are validated, so every
layout check sees the real world size. (Megatron-DeepSpeed read RANK/WORLD_SIZE before its MPI discovery and
so validated a bare `mpirun` job as a world of one.) `describe_topology()` is the start-up summary rank 0 prints.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess

import torch
import torch.distributed as dist

from .state import ParallelGroups

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Variables that MPI launchers put in the environment of every rank (MPICH/Intel MPI's hydra, Open MPI, PMIx,
# MVAPICH); their presence without RANK/WORLD_SIZE means "ask MPI".
MPI_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def consume_launcher_arguments(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the deepspeed launcher appends to the script's arguments (LOCAL_RANK, which
    it also sets, is what the run uses)."""
    kept, skip_next = [], False
    for i, a in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        name, _, value = a.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not value and i + 1 < len(argv):
                value, skip_next = argv[i + 1], True
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        kept.append(a)
    return kept


def discover_launch_environment() -> str:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the launcher (nothing to do under
    torchrun or the deepspeed launcher); returns launcher_name()."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:
            _from_slurm()
        elif any(v in os.environ for v in MPI_VARIABLES):
            _from_mpi()
    if "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
    return launcher_name()


def launcher_name() -> str:
    """Which launcher started this process, from the variables it leaves: "torchrun", "deepspeed", "slurm",
    "mpi", "environment" (another one that set RANK/WORLD_SIZE) or "single" (no launcher)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env:  # set by deepspeed's launch.py
        return "deepspeed"
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return "slurm"
    if any(v in env for v in MPI_VARIABLES):
        return "mpi"
    return "environment" if "WORLD_SIZE" in env else "single"


def _from_slurm() -> None:
    """An srun job step: every rank reads the same variables, so no communication is needed. (`SLURM_STEP_*`
    exist only inside srun, not in the batch script itself, which must not take itself for N ranks.)"""
    env = os.environ
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise ValueError("srun set no SLURM_STEP_NODELIST: export MASTER_ADDR (the first node's address)")
        env["MASTER_ADDR"] = first_slurm_host(nodes)
    # A port every rank derives alike from the job id, clear of the default 29500 other jobs may hold.
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as "gpu[003-005,010],cpu1" -> "gpu003" (`scontrol show
    hostnames` when it is installed, else the common bracket syntax parsed here)."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}: export MASTER_ADDR")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _from_mpi() -> None:
    """mpirun/mpiexec: rank and size from MPI_COMM_WORLD, the local rank from the ranks sharing this node's
    memory, MASTER_ADDR from rank 0 (127.0.0.1 when every rank is on one node), MASTER_PORT a port free on rank 0.
    MASTER_ADDR / MASTER_PORT set in the environment win."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"launched by an MPI launcher (found {[v for v in MPI_VARIABLES if v in os.environ]}) "
                         f"but mpi4py cannot be imported ({e}): pip install mpi4py, or launch with torchrun") from None
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    single_node = world.allreduce(node.Get_size()) == world.Get_size() ** 2
    address = port = None
    if world.Get_rank() == 0:
        address = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_node else socket.getfqdn())
        port = os.environ.get("MASTER_PORT") or str(_free_port())
    address, port = world.bcast((address, port), root=0)
    os.environ.update(RANK=str(world.Get_rank()), WORLD_SIZE=str(world.Get_size()), LOCAL_RANK=str(node.Get_rank()),
                      MASTER_ADDR=address, MASTER_PORT=port)
    node.Free()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def describe_topology(groups: ParallelGroups, device: torch.device, zero_stage: int) -> str:
    """The start-up summary: world and its split, data-parallel engine, devices per node, software versions.
    Collective (it gathers every rank's host name): call it on every rank, print it on rank 0."""
    world = groups.tensor_model_parallel_size * groups.context_parallel_size * groups.data_parallel_size
    hosts = [socket.gethostname()] * world
    if dist.is_initialized() and world > 1:
        dist.all_gather_object(hosts, socket.gethostname())
    nodes = list(dict.fromkeys(hosts))
    if device.type == "cuda":
        devices = f"{world} x {torch.cuda.get_device_name(device)}"
    else:
        devices = f"{world} CPU processes ({os.cpu_count()} cores on rank 0's node)"
    if zero_stage:
        import deepspeed

        engine = f"DeepSpeed {deepspeed.__version__} ZeRO stage {zero_stage}"
    else:
        engine = "built-in (gradients all-reduced, optimizer replicated: ZeRO stage 0)"
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else "none"
        versions += f", CUDA {torch.version.cuda}, NCCL {nccl}"
    backend = dist.get_backend() if dist.is_initialized() else "none"
    lines = [
        f"topology: world {world} = tensor {groups.tensor_model_parallel_size} x context "
        f"{groups.context_parallel_size} x data {groups.data_parallel_size} (launcher: {launcher_name()}, "
        f"backend: {backend})",
        f"          {len(nodes)} node(s): {', '.join(nodes[:8])}{' ...' if len(nodes) > 8 else ''}; devices: {devices}",
        f"          data-parallel engine: {engine}",
        f"          {versions}",
    ]
    return "\n".join(lines)
