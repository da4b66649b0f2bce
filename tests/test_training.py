"""Single-process pretraining: learning, exact resume, crash safety, signals, schedules and clear errors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_data_corpus import train_tiny_tokenizer
from test_gpt_dataset import write_dataset
from test_tensor_parallel import run_distributed

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.data.errors import DataError
from megatron_gdn.data.mock_dataset import MockGPTDataset
from megatron_gdn.data.sampler import MegatronPretrainingSampler, collate
from megatron_gdn.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from megatron_gdn.training.checkpointing import TRACKER, checkpoint_file, read_tracker
from megatron_gdn.training.engine import QueuedStep
from megatron_gdn.training.flops import forward_flops_per_token
from megatron_gdn.training.lr_schedule import LRSchedule
from megatron_gdn.training.optimizer import build_optimizer, is_no_weight_decay

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2", "--head-dim", "16"]
MOCK = ["--mock-data", "--vocab-size", "128", "--seq-length", "32"]


def flags(*extra: str, iters: int = 6, data: list[str] = MOCK) -> list[str]:
    return [*SMALL_MODEL, *data, "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "1000",
            "--eval-iters", "1", *extra]


def run_train(argv: list[str]) -> dict:
    return pretrain_gdn.train(*parse_args(argv))


def run_script(argv: list[str], prelude: str = "", **popen) -> subprocess.CompletedProcess:
    """Run pretrain_gdn.main in a fresh interpreter, after `prelude` (used to inject crashes)."""
    code = textwrap.dedent(prelude) + "\nimport sys, pretrain_gdn\nsys.exit(pretrain_gdn.main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600, **popen)


def parse_losses(stdout: str) -> dict[int, float]:
    pattern = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+) \|")
    return {int(m.group(1)): float(m.group(2)) for m in pattern.finditer(stdout)}


def test_tiny_model_overfits_a_small_batch():
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                         num_heads=2, head_dim=16))
    optimizer = build_optimizer(model, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    batch = torch.randint(0, 128, (4, 33))
    losses = []
    for _ in range(150):
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_mock_data_loss_falls_through_pretrain(capsys):
    result = run_train(flags("--lr", "1e-2", "--seq-length", "64", "--global-batch-size", "8", iters=40))
    first = result["losses"][1]
    last = sum(result["losses"][it] for it in range(36, 41)) / 5
    assert last < first - 0.5, (first, last)  # ln(128) = 4.85 is the loss of knowing nothing
    lines = [line for line in capsys.readouterr().out.splitlines() if "lm loss:" in line]
    assert len(lines) == 40
    assert re.search(r"\| lm loss: \d\.\d{6}E[+-]\d\d \|", lines[0])


def test_resume_is_bit_identical(tmp_path):
    full = run_train(flags("--save", str(tmp_path / "a"), "--save-interval", "3"))
    assert read_tracker(tmp_path / "a") == 6
    resumed = run_train(flags("--load", str(tmp_path / "a"), "--ckpt-step", "3"))
    assert resumed["iteration"] == 6
    assert set(resumed["losses"]) == {4, 5, 6}
    for it in (4, 5, 6):
        assert resumed["losses"][it] == full["losses"][it]  # bit for bit


@pytest.mark.parametrize("crash_point", ["writing the file", "before the tracker"])
def test_sigkill_during_save_resumes_from_previous_checkpoint(tmp_path, crash_point):
    """The process really dies by SIGKILL inside the second save; the first checkpoint stays loadable."""
    save = str(tmp_path / "ckpt")
    if crash_point == "writing the file":
        prelude = """
            import os, signal, torch
            real_save, calls = torch.save, []
            def dying_save(obj, f, *args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    f.write(b"PK half a checkpoint"); f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_save(obj, f, *args, **kwargs)
            torch.save = dying_save
        """
    else:
        prelude = """
            import os, signal
            real_replace = os.replace
            def dying_replace(src, dst):
                if str(dst).endswith("latest_checkpointed_iteration.txt") and "iter_0000006" in str(os.listdir(os.path.dirname(dst))):
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_replace(src, dst)
            os.replace = dying_replace
        """
    crashed = run_script(flags("--save", save, "--save-interval", "3", iters=9), prelude)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert read_tracker(save) == 3
    resumed = run_script(flags("--save", save, "--load", save, "--save-interval", "3", iters=9))
    assert resumed.returncode == 0, resumed.stderr
    assert "loaded checkpoint" in resumed.stdout and "at iteration 3" in resumed.stdout
    reference = parse_losses(run_script(flags(iters=9)).stdout)
    got = parse_losses(resumed.stdout)
    assert sorted(got) == list(range(4, 10))
    assert all(got[it] == reference[it] for it in got)
    assert read_tracker(save) == 9


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    save = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "pretrain_gdn.py", *flags("--save", str(save), iters=100000)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "iteration        2/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "received signal SIGTERM" in out and "exiting at iteration" in out
    iteration = read_tracker(save)
    assert iteration is not None and iteration >= 2
    assert checkpoint_file(save, iteration).exists()


def test_exit_interval_saves_then_exits(tmp_path):
    result = run_train(flags("--save", str(tmp_path), "--exit-interval", "2", iters=10))
    assert result["iteration"] == 2 and result["exit_reason"] == "exit-interval"
    assert read_tracker(tmp_path) == 2


def test_validation_and_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(flags("--eval-interval", "2", "--tensorboard-dir", str(tmp_path), iters=4))
    out = capsys.readouterr().out
    assert re.search(r"validation loss at iteration 2 \| lm loss value: \S+ \| lm loss PPL: \S+ \|", out)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm", "lm loss validation", "lm loss vs samples"} <= tags
    assert len(events.Scalars("lm loss")) == 4


def save_checkpoint_for(tmp_path: Path, *extra: str) -> Path:
    save = tmp_path / "ckpt"
    run_train(flags("--save", str(save), *extra, iters=2))
    return save


def main_error(argv: list[str], capsys) -> str:
    assert pretrain_gdn.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_error_inconsistent_model_shape(capsys):
    err = main_error(flags("--num-v-heads", "3"), capsys)
    assert "num_v_heads (3) must be a multiple of num_heads (2)" in err


@pytest.mark.parametrize("extra, message", [
    (["--global-batch-size", "5"], "multiple of --micro-batch-size"),
    (["--bf16"], "need a GPU"),
    (["--data-path", "x"], "exclude each other"),
])
def test_error_bad_flags(extra, message, capsys):
    if extra == ["--bf16"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert message in main_error(flags(*extra), capsys)


def test_error_missing_checkpoint(tmp_path, capsys):
    assert "no checkpoint in" in main_error(flags("--load", str(tmp_path), "--exit-on-missing-checkpoint"), capsys)
    (tmp_path / TRACKER).write_text("7")
    assert "is missing (iteration 7)" in main_error(flags("--load", str(tmp_path)), capsys)


def test_error_corrupt_checkpoint(tmp_path, capsys):
    save = save_checkpoint_for(tmp_path)
    path = checkpoint_file(save, 2)
    path.write_bytes(path.read_bytes()[:1000])
    assert "not a readable checkpoint" in main_error(flags("--load", str(save)), capsys)


def test_error_load_from_other_model_shape(tmp_path, capsys):
    save = save_checkpoint_for(tmp_path)
    argv = flags("--load", str(save))
    argv[argv.index("--hidden-size") + 1] = "96"
    err = main_error(argv, capsys)
    assert "another model shape" in err and "hidden_size: checkpoint 64 vs run 96" in err


# ----------------------------------------------------------------------------------------------------
# --data-path: token ids checked against the tokenizer, the index cache built once

@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))  # 600 pieces


def data_flags(prefix: Path, tokenizer_model: str) -> list[str]:
    """Two iterations on a .bin/.idx dataset; all documents in the train split."""
    return flags(iters=2, data=["--data-path", str(prefix), "--tokenizer-model", tokenizer_model,
                                "--seq-length", "16", "--split", "1,0,0"])


def test_data_past_the_tokenizer_vocabulary_is_refused(tmp_path, tokenizer_model, capsys):
    write_dataset(str(tmp_path / "wide"), count=100, seed=0)  # distinct ids up to 1864, past the 600 pieces
    err = main_error(data_flags(tmp_path / "wide", tokenizer_model), capsys)
    assert re.search(r"wide\.bin: token id \d+ in document \d+ .* outside the model's vocabulary of 600", err), err
    assert not (tmp_path / "cache").exists()  # refused before any index was built


def _build_datasets_in_rank(bad_argv: list[str], good_argv: list[str], out_dir: str) -> None:
    """pretrain_gdn.build_datasets in this rank on data past the vocabulary, then on good data; rank r writes
    the error it got, whether its train indices were loaded from the cache files, and a few samples."""
    try:
        pretrain_gdn.build_datasets(parse_args(bad_argv)[1])
        error = None
    except DataError as e:
        error = str(e)
    _, train, _ = pretrain_gdn.build_datasets(parse_args(good_argv)[1])
    seen = {"error": error, "loaded": isinstance(train.shuffle_index, np.memmap),
            "samples": [train[k]["tokens"].tolist() for k in range(4)]}
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(seen))


def test_two_ranks_share_rank_zero_vocabulary_check_and_index_cache(tmp_path, tokenizer_model):
    """2 gloo ranks: rank 0's vocabulary error reaches rank 1 (no rank waits for a failed one), and on good data
    rank 0 builds the index cache while rank 1 waits at the barrier and memory-maps the files rank 0 wrote."""
    write_dataset(str(tmp_path / "wide"), count=100, seed=0)
    good = tmp_path / "good" / "corpus"
    good.parent.mkdir()
    write_dataset(str(good), count=20, seed=1)  # ids up to 334: within the 600 pieces
    run_distributed(2, _build_datasets_in_rank, data_flags(tmp_path / "wide", tokenizer_model),
                    data_flags(good, tokenizer_model), str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert "wide.bin: token id" in rank0["error"] and rank1["error"] == rank0["error"]
    assert rank0["loaded"] is False and rank1["loaded"] is True  # built once, by rank 0
    assert rank1["samples"] == rank0["samples"]
    cache = tmp_path / "good" / "cache" / "GPTDataset_indices"
    assert len(list(cache.glob("*.npy"))) == 3  # the train split's document, sample and shuffle indices


class Payload:
    """An object whose unpickling would call a function: what a malicious checkpoint carries."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path, capsys):
    save = save_checkpoint_for(tmp_path)
    path = checkpoint_file(save, 2)
    state = torch.load(path, weights_only=True)
    state["args"]["extra"] = Payload()
    torch.save(state, path)
    err = main_error(flags("--load", str(save)), capsys)
    assert "refusing to load" in err
    assert "pwned" not in capsys.readouterr().out


def test_no_weight_decay_groups():
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1,
                                                         num_heads=2, head_dim=16))
    no_decay = {n for n, p in model.named_parameters() if is_no_weight_decay(n, p)}
    assert {"model.layers.0.attn.A_log", "model.layers.0.attn.dt_bias", "model.layers.0.attn.o_norm.weight",
            "model.layers.0.attn_norm.weight", "model.layers.0.mlp_norm.weight", "model.norm.weight"} == no_decay
    groups = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8).param_groups
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lr_schedules():
    cosine = LRSchedule(1.0, 0.1, warmup_iters=10, decay_iters=110, decay_style="cosine")
    assert cosine.lr(0) == pytest.approx(0.1) and cosine.lr(9) == pytest.approx(1.0)
    assert cosine.lr(10) == pytest.approx(1.0) and cosine.lr(60) == pytest.approx(0.55)
    assert cosine.lr(110) == pytest.approx(0.1) and cosine.lr(500) == pytest.approx(0.1)
    linear = LRSchedule(1.0, 0.0, 0, 100, "linear")
    assert linear.lr(25) == pytest.approx(0.75)
    assert LRSchedule(1.0, 0.0, 5, 100, "constant").lr(99) == 1.0
    wsd = LRSchedule(1.0, 0.0, 0, 100, "WSD", wsd_decay_iters=20, wsd_decay_style="linear")
    assert wsd.lr(79) == 1.0 and wsd.lr(90) == pytest.approx(0.5) and wsd.lr(100) == 0.0
    isqrt = LRSchedule(1.0, 0.0, 4, 100, "inverse-square-root")
    assert isqrt.lr(16) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup"):
        LRSchedule(1.0, 0.0, 200, 100, "cosine")


def test_flops_model_matches_hand_count():
    cfg = GatedDeltaNetConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16,
                              expand_v=2, intermediate_size=128)
    # q, k: 64->32; v, g: 64->64; a, b: 64->2; o: 64->64 (multiply-adds x 2)
    projections = 2 * (64 * 32 * 2 + 64 * 64 * 2 + 64 * 2 * 2 + 64 * 64)
    conv = 2 * 4 * (32 + 32 + 64)
    # per value head (K=16, V=32, chunk 64): KK^T and QK^T rows, T k, T v, attention x v_new, 3 K x V products
    delta_rule = 2 * (2 * 64 * 16 * 2 + 2 * 64 * 16 + 2 * 64 * 32 * 2 + 3 * 2 * 16 * 32)
    mlp = 2 * 3 * 64 * 128
    expected = 2 * (projections + conv + delta_rule + mlp) + 2 * 64 * 1000
    assert forward_flops_per_token(cfg) == expected


def test_mock_data_is_deterministic_and_splits_differ():
    a = MockGPTDataset(10, 64, 100, seed=5)
    b = MockGPTDataset(10, 64, 100, seed=5)
    assert torch.equal(a[3]["tokens"], b[3]["tokens"]) and a[3]["tokens"].shape == (65,)
    assert not torch.equal(a[3]["tokens"], a[4]["tokens"])
    assert not torch.equal(a[3]["tokens"], MockGPTDataset(10, 64, 100, seed=5, split=1)[3]["tokens"])
    assert int(a[0]["tokens"].max()) < 100


def test_sampler_resumes_and_splits_data_parallel_ranks():
    full = list(MegatronPretrainingSampler(20, 0, 2))
    assert full[0] == [0, 1] and len(full) == 10
    assert list(MegatronPretrainingSampler(20, 6, 2)) == full[3:]
    ranks = [list(MegatronPretrainingSampler(20, 4, 2, rank, 2)) for rank in range(2)]
    assert ranks[0][0] == [4, 5] and ranks[1][0] == [6, 7] and len(ranks[0]) == 4


def test_collate_packs_document_offsets():
    samples = [{"tokens": torch.arange(9), "cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32)},
               {"tokens": torch.arange(9), "cu_seqlens": torch.tensor([0, 8], dtype=torch.int32)}]
    batch = collate(samples)
    assert batch["tokens"].shape == (2, 9)
    assert batch["cu_seqlens"].tolist() == [0, 3, 8, 16]


def test_reset_state_at_eod_training_matches_per_document_loss():
    """The packed loss with cu_seqlens equals the token-weighted mean of each document run alone."""
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                         num_heads=2, head_dim=16))
    tokens = torch.randint(0, 50, (2, 11))
    batch = {"tokens": tokens, "cu_seqlens": torch.tensor([0, 4, 10, 13, 20], dtype=torch.int32)}
    loss = pretrain_gdn.lm_loss(model, batch, torch.device("cpu"), None)
    flat_in, flat_out = tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)
    total = 0.0
    for a, b in [(0, 4), (4, 10), (10, 13), (13, 20)]:
        logits = model(flat_in[None, a:b]).logits[0]
        total += torch.nn.functional.cross_entropy(logits, flat_out[a:b], reduction="sum").item()
    assert math.isclose(loss.item(), total / 20, rel_tol=1e-5)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_builtin_step_skips_a_non_finite_update_on_the_device(poison):
    """The built-in engine decides the skip on the device (the fused AdamW's found_inf): a NaN loss or a NaN gradient
    leaves the weights, AdamW's moments and its step count as they were, and the next finite step updates the
    weights exactly as a fresh torch AdamW (the unfused one) does from the same clipped gradient."""
    import copy

    from megatron_gdn.parallel import destroy_model_parallel
    from megatron_gdn.training.optimizer import parameter_groups

    config, cfg = parse_args(["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "2",
                              "--head-dim", "16", "--mock-data", "--vocab-size", "128", "--seq-length", "32",
                              "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
                              "--lr", "1e-3", "--clip-grad", "1.0", "--weight-decay", "0.1"])
    groups, _ = pretrain_gdn.setup_parallel(config, cfg, torch.device("cpu"))
    try:
        engine, _ = pretrain_gdn.build_engine(config, cfg, groups, torch.device("cpu"), None)
        engine.set_lr(1e-3)
        params = list(engine.model.parameters())
        reference = copy.deepcopy(engine.model)
        initial = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        params[0].grad.view(-1)[0] = math.nan if poison == "gradient" else 0.0
        step = engine.step(torch.tensor(math.nan if poison == "loss" else 2.5, dtype=torch.float64)).read()
        assert not step.applied and step.loss_is_finite == (poison != "loss")
        assert math.isfinite(step.grad_norm) == (poison != "gradient")
        assert all(torch.equal(p, r) for p, r in zip(params, reference.parameters()))
        for state in engine.optimizer.state.values():
            assert state["step"].item() == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()

        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, r, g in zip(params, reference.parameters(), grads):
            p.grad, r.grad = g.clone(), g.clone()
        step = engine.step(torch.tensor(2.5, dtype=torch.float64)).read()
        assert step.applied and step.loss == 2.5
        norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
        assert step.grad_norm == pytest.approx(norm.item(), rel=1e-6) and step.grad_norm > 1.0  # it did clip
        oracle = torch.optim.AdamW(parameter_groups(reference, 0.1), lr=1e-3, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   eps=cfg.adam_eps, foreach=False)
        oracle.step()
        for p, r in zip(params, reference.parameters()):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
        assert not any(torch.equal(p, w) for p, w in zip(params, initial))  # every weight moved
    finally:
        destroy_model_parallel()


def test_loop_reads_an_iteration_once_the_next_is_queued(monkeypatch, capsys):
    """Between log lines the loop reads an iteration's results (a host sync) only after it has queued the next
    iteration, so that the device's queue never runs dry; at a log line (and at the end) it reads at once. Losses,
    skipped steps and their messages are those of a loop that reads every iteration at once (--log-interval 1)."""
    events, numbers = [], {}
    queue, read = pretrain_gdn.train_step, QueuedStep.read
    kept = []  # the iterations stay alive: a freed one's id could be reused by a later one and renumber it

    def recorded_train_step(*args, **kwargs):
        queued = queue(*args, **kwargs)
        kept.append(queued)
        numbers[id(queued)] = len(numbers) + 1
        events.append(f"queue {numbers[id(queued)]}")
        return queued

    def recorded_read(self):
        events.append(f"read {numbers[id(self)]}")
        return read(self)

    monkeypatch.setattr(pretrain_gdn, "train_step", recorded_train_step)
    monkeypatch.setattr(QueuedStep, "read", recorded_read)
    lagged = run_train(flags("--log-interval", "3", "--inject-nan-at", "2", iters=7))
    lagged_out = capsys.readouterr().out
    assert events == ["queue 1", "queue 2", "read 1", "queue 3", "read 2", "read 3",  # log line at 3
                      "queue 4", "queue 5", "read 4", "queue 6", "read 5", "read 6",  # log line at 6
                      "queue 7", "read 7"]                                            # the end
    monkeypatch.undo()
    eager = run_train(flags("--inject-nan-at", "2", iters=7))
    eager_out = capsys.readouterr().out
    assert math.isnan(lagged["losses"].pop(2)) and math.isnan(eager["losses"].pop(2))  # the injected NaN
    assert lagged["losses"] == eager["losses"] and len(lagged["losses"]) == 6
    skipped = " iteration 2: skipped the optimizer step: non-finite loss (nan) or gradient norm"
    assert lagged_out.count(skipped) == 1 and eager_out.count(skipped) == 1
