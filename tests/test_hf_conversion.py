"""Hugging Face export and import (tools/convert_checkpoint_to_hf.py, tools/convert_hf_to_checkpoint.py).

A tiny model is trained for a few iterations (mock data; GVA: 2 q/k heads, 4 value heads), its checkpoint is
split into TP=2 shards with parallel/sharding.py's rule and recorded as trained with a SentencePiece
tokenizer of 500 pieces (the model's 512 rows are that vocabulary padded to a multiple of 128 x TP). Then:
fla -> our from_pretrained (identical logits), qwen3_next -> stock transformers (same logits, same greedy
generation), HF -> checkpoint -> HF (bit-identical), and the bad-input and security cases.
Tests that need transformers (an optional test dependency) skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import convert_checkpoint_to_hf as export_tool  # noqa: E402
import convert_hf_to_checkpoint as import_tool  # noqa: E402
import pretrain_gdn  # noqa: E402
from megatron_gdn.config import parse_args  # noqa: E402
from megatron_gdn.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # noqa: E402
from megatron_gdn.models.hf_conversion import ConversionError, load_hf_weights  # noqa: E402
from megatron_gdn.training.checkpointing import load_checkpoint  # noqa: E402
from megatron_gdn.training.full_checkpoint import (FullCheckpoint, read_full_checkpoint,  # noqa: E402
                                                   write_full_checkpoint)
from test_data_corpus import train_tiny_tokenizer  # noqa: E402
from test_tensor_parallel import _train_runs, run_distributed  # noqa: E402

TRUE_VOCAB, PADDED_VOCAB = 500, 512  # 512: a multiple of 128 x TP for TP = 1, 2
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2", "--head-dim", "16",
         "--num-v-heads", "4"]


def train_flags(save: Path, iters: int = 3, *extra: str) -> list[str]:
    return [*MODEL, "--mock-data", "--vocab-size", str(PADDED_VOCAB), "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", str(iters), "--lr", "3e-3", "--log-interval", "100",
            "--eval-interval", "1000", "--eval-iters", "1", "--save", str(save), *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint trained at TP=2 (two gloo processes) and recorded as a run on a SentencePiece tokenizer,
    the same run at TP=1, and the tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = Path(train_tiny_tokenizer(root, vocab_size=TRUE_VOCAB))
    tp2, single = root / "ckpt_tp2", root / "ckpt_tp1"
    run_distributed(2, _train_runs, [("tp2", train_flags(tp2, 3, "--tensor-model-parallel-size", "2"))], str(root))
    pretrain_gdn.train(*parse_args(train_flags(single)))
    # Record the runs as pretrain_gdn.py records one on real data: the tokenizer, no mock --vocab-size.
    for path in (*tp2.glob("iter_*/mp_rank_*/model_optim_rng.pt"), *single.glob("iter_*/mp_rank_*/*.pt")):
        state = torch.load(path, weights_only=True)
        state["args"].update(vocab_size=None, mock_data=False, tokenizer_model=str(tokenizer))
        torch.save(state, path)
    return {"root": root, "tokenizer": tokenizer, "single": single, "tp2": tp2}


def our_model(checkpoint: Path) -> GatedDeltaNetForCausalLM:
    """Our model with a checkpoint's weights (its TP shards merged), padded vocabulary and all."""
    full = read_full_checkpoint(checkpoint)
    model = GatedDeltaNetForCausalLM(full.model_config)
    model.load_state_dict(full.state)
    return model.eval()


def export(work: dict, fmt: str, name: str, *extra: str, load: Path | None = None) -> Path:
    out = work["root"] / name
    argv = ["--load", str(load or work["tp2"]), "--save", str(out), "--format", fmt, "--dtype", "fp32", *extra]
    assert export_tool.main(argv) == 0
    return out


def batch(vocab: int = TRUE_VOCAB, rows: int = 3, length: int = 80) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(7))


def tool_error(tool, argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------------------------------
# fla format and our from_pretrained

def test_tp2_shards_merge_to_the_single_process_model(work):
    merged, single = read_full_checkpoint(work["tp2"]), read_full_checkpoint(work["single"])
    assert merged.tensor_parallel_size == 2 and merged.iteration == 3
    assert merged.state.keys() == single.state.keys()
    # TP=2 training equals TP=1 up to fp32 rounding, which Adam's normalised steps (lr 3e-3) turn into
    # differences of ~1e-5 in weights of size ~0.02.
    for name, ref in single.state.items():
        assert torch.allclose(merged.state[name], ref, rtol=1e-3, atol=2e-4), name


def test_fla_export_loads_in_from_pretrained_with_identical_logits(work):
    out = export(work, "fla", "fla")
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                "tokenizer_config.json", "special_tokens_map.json"}
    if importlib.util.find_spec("transformers"):  # the export checks the tokenizer and saves tokenizer.json
        expected.add("tokenizer.json")
    assert expected <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gated_deltanet" and config["architectures"] == ["GatedDeltaNetForCausalLM"]
    shape = (config["vocab_size"], config["num_heads"], config["num_v_heads"], config["head_dim"])
    assert shape == (TRUE_VOCAB, 2, 4, 16)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    weights = load_hf_weights(out)
    assert weights["model.embeddings.weight"].shape == (TRUE_VOCAB, 64)  # padding rows removed
    assert weights["model.layers.0.attn.q_conv1d.weight"].shape == (32, 1, 4)
    ours = our_model(work["tp2"])
    loaded = GatedDeltaNetForCausalLM.from_pretrained(str(out)).eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ours(x).logits[..., :TRUE_VOCAB])
        assert torch.equal(loaded(x[:, :20]).logits, ours(x[:, :20]).logits[..., :TRUE_VOCAB])


def test_save_pretrained_shards_above_the_size_limit(work, tmp_path):
    model = GatedDeltaNetForCausalLM.from_pretrained(str(export(work, "fla", "fla_for_shards")))
    model.save_pretrained(str(tmp_path), max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / f).stat().st_size < 200_000 for f in files)
    again = GatedDeltaNetForCausalLM.from_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    (tmp_path / files[1]).unlink()
    with pytest.raises(ConversionError, match=f"shard {files[1]} listed in model.safetensors.index.json is missing"):
        GatedDeltaNetForCausalLM.from_pretrained(str(tmp_path))


def test_export_refuses_what_the_format_cannot_express(tmp_path, capsys):
    for flag, fmt, message in (("--no-gate", "qwen3_next", "use_gate=False"),
                               ("--allow-neg-eigval", "qwen3_next", "allow_neg_eigval")):
        save = tmp_path / flag
        pretrain_gdn.train(*parse_args(train_flags(save, 1, flag)))
        out = tmp_path / (flag + "_hf")
        err = tool_error(export_tool, ["--load", str(save), "--save", str(out), "--format", fmt], capsys)
        assert message in err and not out.exists()
        assert not list(tmp_path.glob(".*partial*"))


# ----------------------------------------------------------------------------------------------------
# qwen3_next format in stock transformers

@pytest.fixture(scope="module")
def qwen(work):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional test "
                                       "dependency: pip install 'transformers>=5.17,<6')")
    out = export(work, "qwen3_next", "qwen3_next")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3NextForCausalLM"
    return out, model, transformers


def test_qwen3_next_export_gives_our_logits_in_transformers(work, qwen):
    out, hf_model, _ = qwen
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["linear_attention"] * 2 and config["mlp_only_layers"] == [0, 1]
    weights = load_hf_weights(out)
    assert weights["model.layers.0.linear_attn.in_proj_qkvz.weight"].shape == (2 * 32 + 2 * 128, 64)
    assert weights["model.layers.0.linear_attn.in_proj_ba.weight"].shape == (8, 64)
    assert weights["model.layers.0.linear_attn.conv1d.weight"].shape == (32 + 32 + 128, 1, 4)
    assert weights["model.norm.weight"].abs().max() > 0  # trained norms: stored as w - 1
    ours = our_model(work["tp2"])
    for length in (80, 24):  # our chunked path, and the token-by-token path for short inputs
        x = batch(length=length)
        with torch.no_grad():
            expected = ours(x).logits[..., :TRUE_VOCAB]
            got = hf_model(x).logits
        relative = ((got - expected).abs().max() / expected.abs().max()).item()
        assert relative < 1e-4, (length, relative)


def test_qwen3_next_greedy_generation_matches_ours(work, qwen):
    out, hf_model, _ = qwen
    ours = GatedDeltaNetForCausalLM.from_pretrained(str(out)).eval()  # the same weights, the same vocabulary
    prompts = batch(rows=3, length=12)
    expected = ours.generate(prompts, max_new_tokens=20, eos_token_id=2)
    got = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20, do_sample=False)
    assert got.shape[1] <= expected.shape[1] == 32
    assert torch.equal(got[:, :12], prompts)
    for row_got, row_expected in zip(got[:, 12:], expected[:, 12:]):
        # transformers stops (and pads with pad_token_id) after eos; ours pads with eos.
        stop = (row_expected == 2).nonzero()
        n = int(stop[0]) + 1 if len(stop) else 20
        assert torch.equal(row_got[:n], row_expected[:n])


@pytest.mark.parametrize("variant", [dict(tie_word_embeddings=True), dict(use_short_conv=False),
                                     dict(num_v_heads=2, expand_v=1.5, conv_size=3)])
def test_qwen3_next_variants_match_transformers(qwen, tmp_path, variant):
    """Tied embeddings (no lm_head tensor), no short convolutions (an identity conv1d), other head shapes."""
    from megatron_gdn.models.hf_conversion import write_hf_model

    _, _, transformers = qwen
    torch.manual_seed(0)
    config = GatedDeltaNetConfig(**{**dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                           num_v_heads=4, head_dim=8), **variant})
    model = GatedDeltaNetForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    write_hf_model(tmp_path, config, model.state_dict(), "qwen3_next")
    assert ("lm_head.weight" in load_hf_weights(tmp_path)) != config.tie_word_embeddings
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    x = torch.randint(0, 96, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = model(x).logits, hf_model(x).logits
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_exported_tokenizer_loads_in_transformers_like_sentencepiece(work, qwen):
    out, _, transformers = qwen
    import sentencepiece as spm

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(work["tokenizer"]))
    text = "def main(argv):\n    return 0  # Größe 🚀\n"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert hf_tok.decode(sp.encode(text)) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 3)


def test_hf_generate_tool_prints_a_sample(work, qwen, capsys):
    import hf_generate

    out, _, _ = qwen
    assert hf_generate.main(["--model", str(out), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("def ")


# ----------------------------------------------------------------------------------------------------
# HF -> checkpoint -> HF

@pytest.mark.parametrize("fmt", ["fla", "qwen3_next"])
def test_hf_to_checkpoint_to_hf_is_lossless(work, fmt):
    first = export(work, fmt, f"{fmt}_first")
    ckpt = work["root"] / f"{fmt}_imported"
    assert import_tool.main(["--load", str(first), "--save", str(ckpt), "--tensor-model-parallel-size", "2"]) == 0
    state = load_checkpoint(ckpt, tensor_parallel_rank=1, tensor_parallel_size=2)
    assert state["model_config"]["vocab_size"] == PADDED_VOCAB and state["iteration"] == 0  # 500 padded to 256
    assert state["model"]["model.layers.0.attn.v_proj.weight"].shape == (64, 64)  # 2 of 4 value heads x 32
    second = export(work, fmt, f"{fmt}_second", "--tokenizer-model", str(ckpt / "tokenizer.model"), load=ckpt)
    a, b = load_hf_weights(first), load_hf_weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((first / name).read_text()) == json.loads((second / name).read_text())


def test_imported_checkpoint_continues_pretraining(work, capsys):
    ckpt = work["root"] / "import_tp1"
    assert import_tool.main(["--load", str(export(work, "fla", "fla_for_training")), "--save", str(ckpt)]) == 0
    result = pretrain_gdn.train(*parse_args(
        train_flags(work["root"] / "continued", 1, "--load", str(ckpt), "--finetune")))
    assert result["iteration"] == 1 and "loaded checkpoint" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Bad input and security

def test_export_bad_input_is_one_clear_line_and_writes_nothing(work, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--save", str(out), "--format", "fla"]
    assert "not a megatron_gdn checkpoint" in tool_error(export_tool, ["--load", str(tmp_path), *base], capsys)
    assert "is not a directory" in tool_error(export_tool, ["--load", str(tmp_path / "nope"), *base], capsys)
    assert "no iteration 7" in tool_error(export_tool, ["--load", str(work["tp2"]), "--iteration", "7", *base], capsys)
    err = tool_error(export_tool, ["--load", str(work["tp2"]), "--save", str(out), "--format", "gguf"], capsys)
    assert "--format 'gguf' is not supported" in err
    err = tool_error(export_tool, ["--load", str(work["tp2"]), *base, "--dtype", "fp16"], capsys)
    assert "--dtype 'fp16' is not supported" in err
    err = tool_error(export_tool, ["--load", str(work["tp2"]), *base, "--tokenizer-model", str(tmp_path / "x")], capsys)
    assert "not found" in err
    assert "overlaps the input" in tool_error(
        export_tool, ["--load", str(work["tp2"]), "--save", str(work["tp2"] / "hf"), "--format", "fla"], capsys)
    assert not out.exists() and not list(tmp_path.glob(".*"))
    # A missing TP shard.
    broken = tmp_path / "broken"
    broken.mkdir()
    write_full_checkpoint(broken, read_full_checkpoint(work["tp2"]), tensor_parallel_size=2)
    for f in (broken / "iter_0000003" / "mp_rank_01").iterdir():
        f.unlink()
    assert "model_optim_rng.pt is missing" in tool_error(export_tool, ["--load", str(broken), *base], capsys)
    (broken / "iter_0000003" / "mp_rank_01").rmdir()
    (broken / "iter_0000003" / "mp_rank_02").mkdir()
    assert "a shard is missing" in tool_error(export_tool, ["--load", str(broken), *base], capsys)
    # An existing non-empty output directory stays untouched without --overwrite, and is replaced with it.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "pass --overwrite" in tool_error(export_tool, ["--load", str(work["tp2"]), *base], capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert export_tool.main(["--load", str(work["tp2"]), *base, "--overwrite", "--no-tokenizer"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists() and not (out / "tokenizer.model").exists()
    assert not list(tmp_path.glob(".*"))


def test_import_bad_input_and_pickle_refusal(work, tmp_path, capsys):
    fla = export(work, "fla", "fla_for_import_errors")
    out = tmp_path / "ckpt"
    assert "no config.json" in tool_error(import_tool, ["--load", str(tmp_path), "--save", str(out)], capsys)
    odd = tmp_path / "llama"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "model_type 'llama' is not supported" in tool_error(import_tool, ["--load", str(odd), "--save", str(out)],
                                                               capsys)
    # Pickle-based weights: refused unless --allow-pickle (and then still read with weights_only=True).
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (pickled / name).write_bytes((fla / name).read_bytes())
    torch.save(load_hf_weights(fla), pickled / "pytorch_model.bin")
    err = tool_error(import_tool, ["--load", str(pickled), "--save", str(out)], capsys)
    assert "pickle" in err and "--allow-pickle" in err and not out.exists()
    assert import_tool.main(["--load", str(pickled), "--save", str(out), "--allow-pickle"]) == 0
    # Hybrid / MoE qwen3_next models are refused.
    config = json.loads((fla / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "attn": {"layers": [1], "num_heads": 2}}))
    assert "softmax-attention" in tool_error(import_tool, ["--load", str(odd), "--save", str(out), "--overwrite"],
                                             capsys)


def test_import_never_runs_code_from_the_directory(work, tmp_path):
    """A directory asking for remote code (auto_map + a modeling file) is read as data: the file never runs."""
    fla = export(work, "fla", "fla_with_code")
    marker = tmp_path / "ran"
    (fla / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (fla / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((fla / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model", "AutoConfig": "modeling_evil.Config"}
    (fla / "config.json").write_text(json.dumps(config))
    assert import_tool.main(["--load", str(fla), "--save", str(tmp_path / "ckpt")]) == 0
    GatedDeltaNetForCausalLM.from_pretrained(str(fla))
    assert not marker.exists()


def test_write_full_checkpoint_uses_the_sharding_rule(work, tmp_path):
    full = read_full_checkpoint(work["tp2"])
    write_full_checkpoint(tmp_path, FullCheckpoint(0, full.model_config, full.state), tensor_parallel_size=2)
    rank0 = load_checkpoint(tmp_path, tensor_parallel_rank=0)["model"]
    o_proj = "model.layers.1.attn.o_proj.weight"
    assert torch.equal(rank0[o_proj], full.state[o_proj][:, :64])  # row-parallel: the first 2 of 4 value heads
    assert torch.equal(rank0["model.layers.1.attn.o_norm.weight"], full.state["model.layers.1.attn.o_norm.weight"])


def test_hf_export_doc_lists_every_flag():
    import hf_generate

    doc = (REPO / "docs" / "HF_EXPORT.md").read_text()
    parsers = [export_tool.build_parser(), import_tool.build_parser(), hf_generate.build_parser()]
    flags = [a.option_strings[0] for p in parsers for a in p._actions if a.option_strings[0] != "-h"]
    missing = [f for f in flags if f"`{f}`" not in doc]
    assert not missing, f"docs/HF_EXPORT.md does not document {missing}"


def test_tp2_zero2_checkpoint_exports_to_both_formats(tmp_path):
    """Issue 8's path from a ZeRO-2 run: TP=2 x DP=2 (4 gloo ranks) -> consolidated -> fla and qwen3_next."""
    zero, single = tmp_path / "zero2", tmp_path / "single"
    flags = ["--global-batch-size", "4", "--lr", "1e-3"]
    run_distributed(4, _train_runs, [("zero2", train_flags(zero, 3, *flags, "--tensor-model-parallel-size", "2",
                                                           "--zero-stage", "2"))], str(tmp_path))
    pretrain_gdn.train(*parse_args(train_flags(single, 3, *flags)))
    assert any(zero.rglob("*zero_pp_rank_*")), "expected DeepSpeed's ZeRO partition files"
    merged, reference = read_full_checkpoint(zero), read_full_checkpoint(single)
    assert merged.iteration == 3 and merged.state.keys() == reference.state.keys()
    for name, ref in reference.state.items():  # the same training as one process, up to fp32 rounding
        assert torch.allclose(merged.state[name], ref, rtol=1e-3, atol=2e-4), name
    ours = our_model(zero)
    fla_dir = tmp_path / "fla"
    assert export_tool.main(["--load", str(zero), "--save", str(fla_dir), "--format", "fla", "--dtype", "fp32",
                             "--no-tokenizer"]) == 0
    x = batch(vocab=PADDED_VOCAB)
    with torch.no_grad():
        assert torch.equal(GatedDeltaNetForCausalLM.from_pretrained(str(fla_dir)).eval()(x).logits, ours(x).logits)
    transformers = pytest.importorskip("transformers")
    qwen_dir = tmp_path / "qwen3_next"
    assert export_tool.main(["--load", str(zero), "--save", str(qwen_dir), "--format", "qwen3_next", "--dtype",
                             "fp32", "--no-tokenizer"]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(qwen_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = ours(x).logits, hf_model(x).logits
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4
