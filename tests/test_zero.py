"""DeepSpeed ZeRO 0-3 on CPU (gloo, spawned ranks): the same losses as one process, checkpoints that resume bit for
bit on the same layout and within fp32 noise on another data-parallel size, ZeRO checkpoints readable by every
checkpoint tool, and bad DeepSpeed input refused before any work.

ZeRO stage 0 is the built-in data-parallel path (training/engine.py says why); 1-3 run DeepSpeed's engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_tensor_parallel import _train_runs, assert_same_losses, load_tool, read_losses, rel_err, run_distributed

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.training.checkpointing import iteration_dir, read_tracker
from megatron_gdn.training.full_checkpoint import read_full_checkpoint
from megatron_gdn.training.zero_checkpoint import deepspeed_layout

# 4 q/k heads and 8 value heads, so that the same model splits over 2 tensor-parallel ranks.
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--head-dim", "16",
         "--num-v-heads", "8"]
TOLERANCE = 1e-5


def flags(*extra: str, iters: int = 6) -> list[str]:
    """Global batch 8 of micro batches of 2: 2 accumulation steps at DP=2, 4 at DP=1. Evaluation every 3
    iterations runs through the engine too."""
    return [*MODEL, "--mock-data", "--vocab-size", "500", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--log-interval", "3", "--eval-interval", "3", "--eval-iters", "1", *extra]


def train(argv: list[str]) -> dict[int, float]:
    return pretrain_gdn.train(*parse_args(argv))["losses"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One spawn of 2 ranks (DP=2) trains with ZeRO 0, 1, 2 and 3, each saving at iterations 3 and 6; one process
    trains the same with the built-in path and saves at 3. Losses in <name>.json, checkpoints in <name>/."""
    out = tmp_path_factory.mktemp("zero")
    # A --deepspeed-config with DeepSpeed's own tuning keys and an optimizer section (built by DeepSpeed from our
    # parameter groups; torch's AdamW, since FusedAdam would be compiled first on a CPU).
    ds_file = out / "ds.json"
    ds_file.write_text(json.dumps({
        "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 10000,
                              "allgather_bucket_size": 10000, "contiguous_gradients": True},
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}, "wall_clock_breakdown": False}))
    run_distributed(2, _train_runs, [
        *[(f"zero{stage}", flags("--zero-stage", str(stage), "--save", str(out / f"zero{stage}"),
                                 "--save-interval", "3")) for stage in (0, 1, 2, 3)],
        ("zero2_file", flags("--deepspeed-config", str(ds_file))),
        # context parallelism: DeepSpeed's data-parallel group is DP x CP (here CP = 2, DP = 1)
        ("cp2_zero2", flags("--context-parallel-size", "2", "--zero-stage", "2"))], str(out))
    losses = train(flags("--save", str(out / "single"), "--save-interval", "3"))
    (out / "single.json").write_text(json.dumps(losses))
    return out


def test_zero_stages_match_single_process(runs):
    reference = read_losses(runs / "single.json")
    assert reference[6] < reference[1]  # it learns
    for stage in (0, 1, 2, 3):
        assert_same_losses(read_losses(runs / f"zero{stage}.json"), reference, f"ZeRO-{stage}, 2 DP ranks")
    assert_same_losses(read_losses(runs / "zero2_file.json"), reference, "ZeRO-2 from a --deepspeed-config file")
    assert_same_losses(read_losses(runs / "cp2_zero2.json"), reference, "ZeRO-2 with context parallelism 2")
    # ZeRO 1-3 checkpoints are DeepSpeed's: one partition of the optimizer state per data-parallel rank.
    for stage in (1, 2, 3):
        layout = deepspeed_layout(iteration_dir(runs / f"zero{stage}", 3))
        assert layout["data_parallel_size"] == 2 and layout["stage_3"] == (stage == 3)
        assert read_tracker(runs / f"zero{stage}") == 6


def test_zero_checkpoints_consolidate_to_the_full_model(runs):
    """read_full_checkpoint (the reader of every checkpoint tool) sees a ZeRO checkpoint as the single-process one
    of the same iteration: fp32 weights and, with the training state, Adam moments within fp32 noise."""
    single = read_full_checkpoint(runs / "single", 3, with_training_state=True).training_state
    for stage in (1, 2, 3):
        full = read_full_checkpoint(runs / f"zero{stage}", 3)
        assert full.iteration == 3 and set(full.state) == set(single["model"]) and full.training_state is None
        for name, tensor in single["model"].items():
            assert full.state[name].dtype == torch.float32
            assert rel_err(full.state[name], tensor) < TOLERANCE, f"ZeRO-{stage} {name}"
        merged = read_full_checkpoint(runs / f"zero{stage}", 3, with_training_state=True).training_state
        assert merged["optimizer_param_names"] == single["optimizer_param_names"]
        for index, entry in single["optimizer"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                got = merged["optimizer"]["state"][index][key]
                assert rel_err(got, entry[key]) < 1e-4, f"ZeRO-{stage} {key} of parameter {index}"
            assert float(merged["optimizer"]["state"][index]["step"]) == float(entry["step"]) == 3


def test_zero_checkpoint_exports_to_hugging_face(runs, tmp_path):
    convert = load_tool("convert_checkpoint_to_hf")
    out = tmp_path / "hf"
    assert convert.main(["--load", str(runs / "zero3"), "--save", str(out), "--format", "fla", "--no-tokenizer",
                         "--dtype", "fp32"]) == 0
    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    full = read_full_checkpoint(runs / "zero3")  # the latest iteration, 6
    assert full.iteration == 6
    assert torch.equal(exported["model.embeddings.weight"], full.state["model.embeddings.weight"][:500])
    assert torch.equal(exported["lm_head.weight"], full.state["lm_head.weight"][:500])


def test_resume_same_layout_is_bit_identical(runs, tmp_path):
    """DeepSpeed's loader reads each rank's own partition back: the losses after the resume are those of the
    uninterrupted run, bit for bit (ZeRO-2 and ZeRO-3, 2 DP ranks)."""
    run_distributed(2, _train_runs, [
        (f"resumed{stage}", flags("--zero-stage", str(stage), "--load", str(runs / f"zero{stage}"), "--ckpt-step", "3"))
        for stage in (2, 3)], str(tmp_path))
    for stage in (2, 3):
        uninterrupted = read_losses(runs / f"zero{stage}.json")
        resumed = read_losses(tmp_path / f"resumed{stage}.json")
        assert sorted(resumed) == [4, 5, 6]
        assert all(resumed[it] == uninterrupted[it] for it in resumed), (stage, resumed, uninterrupted)


def test_resume_with_another_data_parallel_size(runs):
    """ZeRO checkpoints of 2 DP ranks resume in one process (consolidated, then re-partitioned): ZeRO-1, 2 and 3
    into DeepSpeed at DP=1, ZeRO-3 into the built-in path, and the built-in DP=2 checkpoint into ZeRO-2."""
    continued = {it: loss for it, loss in read_losses(runs / "single.json").items() if it > 3}
    cases = [("zero1", ["--zero-stage", "1"]), ("zero2", ["--zero-stage", "2"]), ("zero3", ["--zero-stage", "3"]),
             ("zero3", []), ("zero0", ["--zero-stage", "2"])]
    for checkpoint, extra in cases:
        losses = train(flags(*extra, "--load", str(runs / checkpoint), "--ckpt-step", "3"))
        assert_same_losses(losses, continued, f"{checkpoint} resumed at DP=1 with {extra or 'the built-in path'}")
        pretrain_gdn.shutdown_distributed()


def test_zero_with_tensor_parallel_matches_single_process(tmp_path, main_error):
    """TP=2 x DP=2 (4 ranks): DeepSpeed partitions over the data-parallel ranks only, TP-replicated gradients are
    summed over TP before it reduces them, and its gradient norm counts every weight once."""
    tp2 = ["--tensor-model-parallel-size", "2"]
    run_distributed(4, _train_runs, [
        ("tp2_zero1_sp", flags(*tp2, "--sequence-parallel", "--zero-stage", "1", iters=4)),
        ("tp2_zero2", flags(*tp2, "--zero-stage", "2", "--save", str(tmp_path / "tp2_zero2"), iters=4)),
        ("tp2_zero3", flags(*tp2, "--zero-stage", "3", iters=4)),
    ], str(tmp_path))
    reference = train(flags("--save", str(tmp_path / "single"), iters=4))
    for name in ("tp2_zero1_sp", "tp2_zero2", "tp2_zero3"):
        assert_same_losses(read_losses(tmp_path / f"{name}.json"), reference, name)
    # The TP=2 ZeRO checkpoint merges (TP shards, each consolidated from its DP partitions) into the full model.
    full, single = read_full_checkpoint(tmp_path / "tp2_zero2"), read_full_checkpoint(tmp_path / "single")
    assert full.tensor_parallel_size == 2
    for name, tensor in single.state.items():
        assert rel_err(full.state[name], tensor) < TOLERANCE, name
    # ... and loading it at another TP size without converting it is refused, naming the conversion tool.
    err = main_error(flags("--zero-stage", "2", "--load", str(tmp_path / "tp2_zero2")))
    assert "--tensor-model-parallel-size 2" in err and "tools/reshard_checkpoint.py" in err
    reshard = load_tool("reshard_checkpoint")
    assert reshard.main(["--load", str(tmp_path / "tp2_zero2"), "--save", str(tmp_path / "tp1"),
                         "--target-tensor-model-parallel-size", "1"]) == 0
    assert read_full_checkpoint(tmp_path / "tp1").tensor_parallel_size == 1


# ----------------------------------------------------------------------------------------------------
# Bad input: one line "error: ..." and exit code 2, before any training

@pytest.fixture
def main_error(capsys):
    """pretrain_gdn.main in this process: exit code 2, one line "error: ...", no iteration run."""
    def run(argv: list[str]) -> str:
        capsys.readouterr()  # forget what the test printed before
        assert pretrain_gdn.main(argv) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()[-1]
        assert err.startswith("error: ") and "Traceback" not in captured.err, captured.err
        assert " iteration " not in captured.out
        return err
    return run


@pytest.mark.parametrize("file_config, extra, message", [
    ({"zero_optimisation": {"stage": 2}}, ["--zero-stage", "2"],
     "keys DeepSpeed does not know: 'zero_optimisation' (did you mean 'zero_optimization'?)"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, [], "DeepSpeed rejects the configuration"),
    ({"train_micro_batch_size_per_gpu": 4}, ["--zero-stage", "1"],
     "train_micro_batch_size_per_gpu = 4 but --micro-batch-size is 2"),
    ({"zero_optimization": {"stage": 3}}, ["--zero-stage", "2"],
     "--zero-stage 2 contradicts zero_optimization.stage 3"),
    ({"zero_optimization": {"stage": 0}}, [], "ZeRO stage 0, which is the built-in data-parallel path"),
    ({"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}, [],
     "gradient_clipping = 0.5 but --clip-grad is 1.0"),
    ({"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}}, [], "fp16.enabled = True but --fp16 is False"),
    ({"zero_optimization": {"stage": 1}, "train_batch_size": 16}, [],
     "train_batch_size = 16 but --global-batch-size is 8"),
    ({"zero_optimization": {"stage": 1}, "scheduler": {"type": "WarmupLR"}}, [], "'scheduler' section"),
    ({"zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD"}}, [], "the optimizer must be AdamW"),
])
def test_bad_deepspeed_config_is_refused(tmp_path, main_error, file_config, extra, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(file_config))
    assert message in main_error(flags("--deepspeed-config", str(path), *extra, iters=1))


def test_bad_deepspeed_config_file_and_batch(tmp_path, monkeypatch, main_error):
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    assert "is not valid JSON" in main_error(flags("--deepspeed-config", str(path), iters=1))
    assert "no such file" in main_error(flags("--deepspeed-config", str(tmp_path / "missing.json"), iters=1))
    # A global batch that the data-parallel ranks cannot share: refused before joining the other ranks.
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "must be a multiple of --micro-batch-size x data-parallel size (2 x 3)" in main_error(
        flags("--zero-stage", "2", iters=1))


def test_load_zero_checkpoint_of_another_model_shape_is_refused(runs, main_error):
    argv = flags("--zero-stage", "2", "--load", str(runs / "zero2"))
    argv[argv.index("--hidden-size") + 1] = "96"
    err = main_error(argv)
    assert "another model shape" in err and "hidden_size: checkpoint 64 vs run 96" in err


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_example_deepspeed_configs_are_accepted(stage):
    """examples/ds_config_zero{1,2,3}.json merge with the flags and pass DeepSpeed's own validation."""
    from megatron_gdn.training.deepspeed_config import (build_deepspeed_config, merge_deepspeed_config,
                                                         read_deepspeed_config, resolve_zero_stage,
                                                         validate_with_deepspeed)

    path = Path(__file__).resolve().parents[1] / "examples" / f"ds_config_zero{stage}.json"
    _, cfg = parse_args(flags("--deepspeed-config", str(path)))
    file_config = read_deepspeed_config(cfg.deepspeed_config)
    assert resolve_zero_stage(cfg, file_config) == stage
    merged = merge_deepspeed_config(build_deepspeed_config(cfg, stage, 1, 1), file_config, cfg, 1)
    validate_with_deepspeed(merged, None)
    assert merged["zero_optimization"]["stage"] == stage and merged["train_micro_batch_size_per_gpu"] == 2
