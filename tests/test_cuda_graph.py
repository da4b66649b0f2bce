"""--cuda-graph without a GPU: the flag parses, what cannot be captured is refused at start-up with its reason, and
the built-in engine keeps the gradient tensors that a graph accumulates into (and, with one micro batch a step,
leaves those that the fused products overwrite unzeroed). The graph itself is tested on a GPU
(tests/test_cuda_graph_gpu.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.models.fused_projection import overwritten_by_product
from megatron_gdn.parallel import destroy_model_parallel
from megatron_gdn.training.cuda_graph import CudaGraphStep

FLAGS = ["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "2", "--head-dim", "16",
         "--mock-data", "--vocab-size", "128", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "2", "--log-interval", "1"]


def main_error(argv: list[str], capsys) -> str:
    assert pretrain_gdn.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_flag_parses():
    assert parse_args(FLAGS)[1].cuda_graph is False
    assert parse_args(FLAGS + ["--cuda-graph", "--bf16"])[1].cuda_graph is True
    assert parse_args(FLAGS + ["--cuda-graph", "--zero-stage", "0", "--bf16"])[1].cuda_graph  # the built-in engine


@pytest.mark.parametrize("extra, message", [
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2"),
    (["--context-parallel-size", "2"], "--context-parallel-size 2"),
    (["--zero-stage", "1"], "--zero-stage / --deepspeed-config"),
    (["--deepspeed-config", "ds.json"], "--zero-stage / --deepspeed-config"),
    (["--fp16"], "--fp16 (dynamic loss scaling"),
    ([], "fp32 training, without --bf16"),
    (["--reset-state-at-eod"], "--reset-state-at-eod (packed documents"),
    (["--recompute-activations"], "--recompute-activations / --recompute-granularity"),
    (["--recompute-granularity", "full"], "--recompute-activations / --recompute-granularity"),
])
def test_what_cannot_be_captured_is_refused(extra, message, capsys):
    err = main_error(FLAGS + ["--cuda-graph", *extra], capsys)
    assert err.startswith("error: --cuda-graph cannot be used with ") and message in err, err


def test_every_conflict_is_named_at_once(capsys):
    err = main_error(FLAGS + ["--cuda-graph", "--fp16", "--recompute-activations"], capsys)
    assert "--fp16" in err and "--recompute-activations" in err


def test_cpu_device_is_refused(capsys):
    err = main_error(FLAGS + ["--cuda-graph", "--bf16", "--device", "cpu"], capsys)
    assert "--cuda-graph captures CUDA graphs: it needs a GPU, and the device is cpu" in err
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CudaGraphStep(lambda batch: None, [], torch.device("cpu"), warmup_calls=2)


def test_engine_zeroes_the_same_gradient_tensors():
    """Under --cuda-graph the optimizer step zeroes the gradients in place (the graph's backward accumulates into
    those tensors); without it they are freed, as before."""
    for extra, keeps in (([], False), (["--cuda-graph", "--bf16"], True)):
        config, cfg = parse_args(FLAGS + extra)
        groups, _ = pretrain_gdn.setup_parallel(config, cfg, torch.device("cpu"))
        try:
            config = dataclasses.replace(config, vocab_size=128)
            engine, _ = pretrain_gdn.build_engine(config, cfg, groups, torch.device("cpu"), None)
            tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
            pretrain_gdn.forward_backward(engine, {"tokens": tokens}, cfg, torch.device("cpu"), groups)
            grads = [p.grad for p in engine.model.parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
            assert engine.step(torch.tensor(1.0, dtype=torch.float64)).read().applied
            after = [p.grad for p in engine.model.parameters()]
            if keeps:
                assert all(a is g and not a.any() for a, g in zip(after, grads))
            else:
                assert all(a is None for a in after)
        finally:
            destroy_model_parallel()


def test_one_micro_batch_a_step_overwrites_the_products_gradients():
    """With one micro batch a step under --cuda-graph, the fused products write their weights' gradients over the
    last step's, and the engine zeroes only the other gradients: three steps train bit for bit as the engine
    without the flag does (which frees every gradient and lets the products write new ones). The gradients the
    products overwrite are checked to be left as the last backward wrote them, the others zeroed."""
    flags = [*FLAGS[:FLAGS.index("--global-batch-size")], "--global-batch-size", "2", "--train-iters", "3",
             "--clip-grad", "0", "--log-interval", "1"]  # unclipped: the update leaves the gradients as written
    trained = {}
    for graphed in (False, True):
        # fp32, where the products on a CPU write the weights' gradients (from bf16 operands only on GPUs): the
        # flag itself is refused in fp32 (not tried under capture), so the engine is given it directly
        config, cfg = parse_args(flags)
        cfg.cuda_graph = graphed
        groups, _ = pretrain_gdn.setup_parallel(config, cfg, torch.device("cpu"))
        torch.manual_seed(cfg.seed)  # the same initial weights in both
        try:
            engine, _ = pretrain_gdn.build_engine(dataclasses.replace(config, vocab_size=128), cfg, groups,
                                                  torch.device("cpu"), None)
            generator = torch.Generator().manual_seed(0)
            for _ in range(3):
                tokens = torch.randint(0, 128, (2, 33), generator=generator)
                pretrain_gdn.forward_backward(engine, {"tokens": tokens}, cfg, torch.device("cpu"), groups)
                written = {name: p.grad.clone() for name, p in engine.model.named_parameters()}
                assert engine.step(torch.tensor(1.0, dtype=torch.float64)).read().applied
            params = dict(engine.model.named_parameters())
            trained[graphed] = {name: p.detach().clone() for name, p in params.items()}
            if graphed:
                overwritten = {name for name, p in params.items() if overwritten_by_product(p)}
                assert any("mlp" in name for name in overwritten) and any("attn" in name for name in overwritten)
                assert "model.embeddings.weight" not in overwritten  # not a product's weight
                for name, p in params.items():
                    expected = written[name] if name in overwritten else torch.zeros_like(p)
                    assert torch.equal(p.grad, expected), name
            else:
                assert all(p.grad is None for p in params.values())
        finally:
            destroy_model_parallel()
    assert trained[False].keys() == trained[True].keys()
    assert all(torch.equal(trained[False][name], trained[True][name]) for name in trained[False])
