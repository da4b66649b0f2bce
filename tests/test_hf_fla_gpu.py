"""GPU acceptance of the fla export: flash-linear-attention's GatedDeltaNetForCausalLM loads it and gives our logits.

A model with perturbed norms and GVA (2 q/k heads, 4 value heads) is saved as a TP=2 checkpoint with a padded
vocabulary (1024 rows, 1000 real), exported with tools/convert_checkpoint_to_hf.py --format fla in fp32 and
bf16, and loaded through transformers' AutoModelForCausalLM after `import fla`. Its logits are compared with
ours (fp32 on the CPU, the PyTorch reference path) on 2 sequences of 128 tokens (fla's chunked kernels):
  fp32 export in fp32      vs ours fp32: kernel rounding only (fla may use TF32)
  bf16 export in bf16      vs ours fp32: must stay within a small multiple of our own bf16 noise (our model
                                         under bf16 autocast on the GPU vs ours fp32)
One length only: every kernel configuration Triton autotunes on first use costs compile time.
Run with: pytest -s tests/test_hf_fla_gpu.py (needs CUDA and flash-linear-attention; skipped otherwise).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import convert_checkpoint_to_hf as export_tool  # noqa: E402
from megatron_gdn.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # noqa: E402
from megatron_gdn.training.full_checkpoint import FullCheckpoint, write_full_checkpoint  # noqa: E402

pytestmark = pytest.mark.gpu
TRUE_VOCAB = 1000


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_fla_export_loads_in_flash_linear_attention_with_our_logits(tmp_path):
    pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = GatedDeltaNetConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_heads=2, num_v_heads=4,
                                 head_dim=64, expand_v=2.0)
    model = GatedDeltaNetForCausalLM(config)
    with torch.no_grad():  # trained-looking norms, so that a wrong (1 + w) or a dropped weight shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    write_full_checkpoint(checkpoint, FullCheckpoint(iteration=1, model_config=config, state=model.state_dict(),
                                                     args={"vocab_size": TRUE_VOCAB}), tensor_parallel_size=2)
    exports = {}
    for dtype in ("fp32", "bf16"):
        exports[dtype] = tmp_path / f"fla_{dtype}"
        assert export_tool.main(["--load", str(checkpoint), "--save", str(exports[dtype]), "--format", "fla",
                                 "--dtype", dtype]) == 0

    import fla  # noqa: F401  (registers model_type gated_deltanet with the Auto classes)

    def report(text: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {text}", flush=True)

    t0 = time.time()
    x = torch.randint(0, TRUE_VOCAB, (2, 128), generator=torch.Generator().manual_seed(1))  # fla's chunked path
    with torch.no_grad():  # our reference: fp32 on the CPU (the PyTorch path, no kernel compilation)
        ref = model.eval()(x).logits[..., :TRUE_VOCAB].float()
    report("our fp32 logits (CPU)")
    device = torch.device("cuda")
    logits = {}
    for dtype in ("fp32", "bf16"):
        theirs = AutoModelForCausalLM.from_pretrained(
            str(exports[dtype]), dtype=torch.float32 if dtype == "fp32" else torch.bfloat16).to(device).eval()
        assert type(theirs).__module__.startswith("fla.")
        with torch.no_grad():
            logits[dtype] = theirs(x.to(device)).logits.float().cpu()
        report(f"fla {dtype} export: relative error vs ours {relative_error(logits[dtype], ref):.2e}")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # our own bf16 noise, on the GPU
        ours_bf16 = model.to(device)(x.to(device)).logits[..., :TRUE_VOCAB].float().cpu()
    report("our bf16 logits (GPU)")
    err32, err16 = relative_error(logits["fp32"], ref), relative_error(logits["bf16"], ref)
    noise = relative_error(ours_bf16, ref)
    agree = (logits["bf16"].argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"\nfla {fla.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}, T=128, batch 2")
    print("| fla fp32 export vs ours fp32 | fla bf16 export vs ours fp32 | ours bf16 autocast vs ours fp32 "
          "| argmax agreement (fla bf16 vs ours fp32) |")
    print(f"| {err32:.2e} | {err16:.2e} | {noise:.2e} | {agree:.4f} |")
    assert logits["fp32"].shape == ref.shape
    assert err32 < 5e-3, err32
    assert err16 < max(4 * noise, 2e-2), (err16, noise)
