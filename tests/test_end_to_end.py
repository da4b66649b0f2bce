"""The quickstart's pipeline in miniature: demo corpus -> tokenizer -> .bin/.idx -> pretrain -> resume -> generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_corpus_to_trained_model_to_text(tmp_path):
    corpus, tok, prefix, ckpt = tmp_path / "corpus.jsonl", tmp_path / "tok", tmp_path / "demo", tmp_path / "ckpt"
    run("tools/build_demo_corpus.py", "--output", str(corpus), "--max-mb", "0.4")
    run("tools/train_tokenizer.py", "--input", str(corpus), "--model-prefix", str(tok), "--vocab-size", "400")
    run("tools/preprocess_data.py", "--input", str(corpus), "--tokenizer-model", f"{tok}.model", "--append-eod",
        "--workers", "2", "--output-prefix", str(prefix))
    train = ["pretrain_gdn.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2",
             "--head-dim", "16", "--data-path", f"{prefix}_text_document", "--tokenizer-model", f"{tok}.model",
             "--split", "90,10,0", "--seq-length", "64", "--micro-batch-size", "4", "--lr", "3e-3",
             "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1", "--save", str(ckpt),
             "--load", str(ckpt), "--reset-state-at-eod"]
    first = run(*train, "--train-iters", "4")
    assert "iteration        4/       4" in first and "validation loss at iteration 4" in first
    resumed = run(*train, "--train-iters", "6")  # same directory: continues from iteration 4
    assert "loaded checkpoint" in resumed and "iteration        5/       6" in resumed
    text = run("tools/generate_text.py", "--load", str(ckpt), "--tokenizer-model", f"{tok}.model",
               "--prompt", "def ", "--max-new-tokens", "10")
    assert text.startswith("def")
