"""The user docs stay in step with the code."""

from pathlib import Path

from megatron_gdn.config import build_parser

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
