"""The user docs and the example recipes stay in step with the code."""

import os
import subprocess
from pathlib import Path

import pytest

import pretrain_gdn
from megatron_gdn.config import build_parser, parse_args
from megatron_gdn.training.deepspeed_config import read_deepspeed_config, resolve_zero_stage

REPO = Path(__file__).resolve().parents[1]


def test_training_doc_lists_every_flag():
    doc = (REPO / "docs" / "TRAINING.md").read_text()
    flags = [a.option_strings[0] for a in build_parser()._actions if a.option_strings[0] != "-h"]
    missing = [f for f in flags if f"`{f}`" not in doc]
    assert not missing, f"docs/TRAINING.md does not document {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "bash tests/run.sh" in readme and "bash examples/quickstart.sh" in readme
    assert "bash tests/run.sh" in (REPO / ".ci" / "run").read_text()


# The launch recipes of examples/ and the world size each launches. Every one is run with fake launchers on PATH
# (torchrun, srun, python3 record their command line and exit), and the pretrain_gdn.py flags it would have started
# go through pretrain_gdn's parser and layout checks: a renamed flag or a batch that no longer splits fails here.
LAUNCH_RECIPES = {
    "pretrain_gdn_small_1gpu.sh": ([], 1),
    "pretrain_gdn_1.3b_8gpu.sh": ([], 8),
    "pretrain_gdn_longctx_cp.sh": ([], 8),
    "pretrain_gdn_1.3b_multinode.slurm": ([], 32),
    "pretrain_zero.slurm": ([], 16),
    "multinode.sh": (["torchrun", "0", "node001"], 16),
}
FAKE_LAUNCHER = '#!/bin/sh\nprintf "%s\\n" "$(basename "$0")" "$@" >> "$RECORD"\n'
SLURM_ENV = {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "node[001-004]", "SLURM_NNODES": "4",
             "SLURM_JOB_ID": "1"}


@pytest.mark.parametrize("recipe", sorted(LAUNCH_RECIPES))
def test_example_recipes_pass_the_flag_checks(recipe, tmp_path):
    arguments, world_size = LAUNCH_RECIPES[recipe]
    bin_dir, record = tmp_path / "bin", tmp_path / "command"
    bin_dir.mkdir()
    for name in ("torchrun", "srun", "python3"):
        (bin_dir / name).write_text(FAKE_LAUNCHER)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node001\n")  # `scontrol show hostnames`: the first node
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    env = {**os.environ, **SLURM_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)}
    run = subprocess.run(["bash", str(REPO / "examples" / recipe), *arguments], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    command = record.read_text().splitlines()
    flags = command[command.index("pretrain_gdn.py") + 1:]
    model_config, cfg = parse_args(flags)
    pretrain_gdn.check_parallel_layout(model_config, cfg, world_size)
    if cfg.deepspeed_config:  # a config file of the repository, consistent with the flags
        stage = resolve_zero_stage(cfg, read_deepspeed_config(str(REPO / cfg.deepspeed_config)))
        assert stage == cfg.zero_stage
