"""Faults in multi-rank runs on CPU (gloo): a signal on one rank saves everywhere; a rank killed in the middle of a
save leaves the previous checkpoint, from which the run resumes with the same losses; NaN losses are skipped,
counted, and stop the run when they repeat; a rank that dies or hangs makes the others exit with a clear error.

Ranks run the real entry point under torchrun (or as plain processes with the variables torchrun sets), through a
small wrapper that records each rank's process id and can install a crash into one rank first.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_launch import clean_env, free_port, parse_losses

import pretrain_gdn
from megatron_gdn.training.checkpointing import iteration_dir, read_tracker
from megatron_gdn.training.zero_checkpoint import deepspeed_layout

REPO = Path(__file__).resolve().parents[1]


def flags(*extra: str, iters: int = 9) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2", "--head-dim", "16",
            "--mock-data", "--vocab-size", "128", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1", *extra]


def wrapper(tmp_path: Path, crash_rank: int | None = None, crash: str = "") -> Path:
    """A script that writes pid_<rank>, runs `crash` in rank crash_rank, then pretrain_gdn.main."""
    path = tmp_path / "rank.py"
    crash_block = textwrap.indent(textwrap.dedent(crash).strip() or "pass", "    ")
    path.write_text(
        "import os, sys\n"
        "rank = int(os.environ.get('RANK', '0'))\n"
        f"with open(os.path.join({str(tmp_path)!r}, f'pid_{{rank}}'), 'w') as f:\n"
        "    f.write(str(os.getpid()))\n"
        f"if rank == {crash_rank!r}:\n{crash_block}\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import pretrain_gdn\n"
        "sys.exit(pretrain_gdn.main(sys.argv[1:]))\n")
    return path


def torchrun(script: Path, argv: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), str(script), *argv],
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def wait_for(proc: subprocess.Popen, text: str, seen: list[str]) -> None:
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed; stderr: {proc.stderr.read()[-3000:]}")


def test_signal_on_one_rank_saves_on_every_rank_and_exits_0(tmp_path):
    """SIGTERM to rank 1 alone (a scheduler's notice can reach any rank first): both ranks agree to stop after
    the iteration, DeepSpeed writes both partitions, the tracker points at them, every process exits 0."""
    save = tmp_path / "ckpt"
    proc = torchrun(wrapper(tmp_path), flags("--zero-stage", "2", "--save", str(save), iters=100000))
    seen: list[str] = []
    wait_for(proc, "iteration        2/", seen)
    os.kill(int((tmp_path / "pid_1").read_text()), signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    out = "".join(seen) + out
    assert proc.returncode == 0, err[-3000:]
    assert "rank 1 received signal SIGTERM" in out and "exiting at iteration" in out
    iteration = read_tracker(save)
    assert iteration is not None and iteration >= 2
    assert deepspeed_layout(iteration_dir(save, iteration))["data_parallel_size"] == 2


def test_rank_killed_during_save_leaves_previous_checkpoint(tmp_path):
    """Rank 1 dies by SIGKILL half-way through writing its ZeRO partition of iteration 6 (the second save). The
    tracker still names iteration 3, which resumes (same layout) with the losses the run had printed."""
    save = tmp_path / "ckpt"
    crash = """
        import signal, torch
        real_save, calls = torch.save, []
        def dying_save(obj, f, *args, **kwargs):
            if str(f).endswith("optim_states.pt"):  # this rank writes one file per checkpoint: its partition
                calls.append(f)
            if len(calls) == 2:
                with open(f, "wb") as half:
                    half.write(b"PK half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save
    """
    argv = flags("--zero-stage", "2", "--save", str(save), "--save-interval", "3")
    crashed = torchrun(wrapper(tmp_path, crash_rank=1, crash=crash), argv)
    out, err = crashed.communicate(timeout=300)
    assert crashed.returncode != 0
    assert "exitcode  : -9" in err, err[-3000:]
    assert read_tracker(save) == 3 and not iteration_dir(save, 6).exists()
    printed = parse_losses(out)
    assert set(printed) >= {4, 5, 6}

    resumed = torchrun(wrapper(tmp_path), argv + ["--load", str(save)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "loaded checkpoint from" in out and "at iteration 3" in out
    losses = parse_losses(out)
    assert sorted(losses) == list(range(4, 10))
    assert all(losses[it] == printed[it] for it in (4, 5, 6))
    assert read_tracker(save) == 9


def test_injected_nans_are_skipped_counted_and_stop_the_run_when_they_repeat(tmp_path):
    """ZeRO-1 on 2 ranks, rank 0's loss NaN at iterations 2, 4, 5, 6: iteration 2 is skipped and counted and
    training goes on (the weights stay finite); 4, 5, 6 in a row reach --max-skipped-steps 3 and stop every rank
    with exit code 3 and a clear message."""
    proc = torchrun(wrapper(tmp_path), flags("--zero-stage", "1", "--inject-nan-at", "2", "4", "5", "6",
                                             "--max-skipped-steps", "3", iters=20))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert err.count("exitcode  : 3") == 2 or "exitcode  : 3" in err, err[-3000:]
    assert "iteration 2: skipped the optimizer step: non-finite loss (nan)" in out
    assert re.search(r"iteration        2/.*number of skipped iterations:   1 \| number of nan iterations:   1", out)
    assert re.search(r"iteration        3/.*lm loss: \d\.\d+E\+00 .*number of skipped iterations:   1", out)
    assert "iteration 6: skipped the optimizer step: non-finite loss (nan) or gradient norm (inf), 3 in a row" in out
    assert "3 consecutive iterations (up to 6) had a non-finite loss or gradient" in err
    assert "--max-skipped-steps 3" in err


def test_builtin_path_counts_nans_in_tensorboard_and_stops(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert pretrain_gdn.main(flags("--inject-nan-at", "2", "--tensorboard-dir", str(tmp_path), iters=4)) == 0
    assert "iteration 2: skipped the optimizer step" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    nan = {e.step: e.value for e in events.Scalars("nan-iterations")}
    assert nan[2] == 1 and events.Scalars("skipped-iterations")[-1].value == 1
    assert pretrain_gdn.main(flags("--inject-nan-at", "2", "3", "--max-skipped-steps", "2", iters=4)) == 3
    assert "2 consecutive iterations (up to 3)" in capsys.readouterr().err


@pytest.mark.parametrize("fault", ["killed", "hangs"])
def test_lost_rank_makes_the_others_exit_with_an_error(tmp_path, fault):
    """Rank 1 is killed (SIGKILL) or stops answering (SIGSTOP) after iteration 3. Rank 0 exits with code 4 and
    a clear message: at once when the connection drops, within --distributed-timeout-minutes when it hangs."""
    env = {**clean_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    argv = [sys.executable, "pretrain_gdn.py", *flags("--zero-stage", "2", "--distributed-timeout-minutes", "0.1",
                                                       iters=100000)]
    ranks = [subprocess.Popen(argv, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(2)]
    try:
        wait_for(ranks[0], "iteration        3/", [])
        ranks[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        start = time.time()
        _, err = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 4, err[-3000:]
        assert "error: rank 0 lost contact with another rank, which died, was killed or hangs" in err
        assert time.time() - start < 60  # the timeout is 6 s; a hang would run into the communicate timeout
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.communicate()
