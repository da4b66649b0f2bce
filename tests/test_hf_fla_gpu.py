"""GPU acceptance of the fla export: flash-linear-attention's own GatedDeltaNetForCausalLM loads it and gives our logits.

A model with perturbed norms and GVA (2 q/k heads, 4 value heads) is saved as a TP=2 checkpoint with a padded
vocabulary (1024 rows, 1000 real), exported with tools/convert_checkpoint_to_hf.py --format fla in fp32 and
bf16, and loaded through transformers' AutoModelForCausalLM after `import fla`. Its logits are compared with
ours on the GPU, for a chunked length (256) and a short one (32, the token-by-token path in eval):
  fp32 export in fp32      vs ours fp32: kernel rounding only
  bf16 export in bf16      vs ours fp32: must stay within a small multiple of our own bf16 noise (ours under
                                         bf16 autocast vs ours fp32)
Run with: pytest -s tests/test_hf_fla_gpu.py (needs CUDA and flash-linear-attention; skipped otherwise).
"""

from __future__ import annotations

import sys
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

    device = torch.device("cuda")
    ours = model.to(device).eval()
    theirs = {dtype: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32 if dtype == "fp32"
                                                          else torch.bfloat16).to(device).eval()
              for dtype, path in exports.items()}
    assert type(theirs["fp32"]).__module__.startswith("fla.")
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length in (256, 32):
        x = torch.randint(0, TRUE_VOCAB, (2, length), generator=generator).to(device)
        with torch.no_grad():
            ref = ours(x).logits[..., :TRUE_VOCAB].float()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ours_bf16 = ours(x).logits[..., :TRUE_VOCAB].float()
            fla_fp32 = theirs["fp32"](x).logits.float()
            fla_bf16 = theirs["bf16"](x).logits.float()
        noise = relative_error(ours_bf16, ref)
        err32, err16 = relative_error(fla_fp32, ref), relative_error(fla_bf16, ref)
        agree = (fla_bf16.argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append((length, err32, err16, noise, agree))
        assert fla_fp32.shape == ref.shape
        assert err32 < 5e-3, (length, err32)
        assert err16 < max(4 * noise, 2e-2), (length, err16, noise)
    print(f"\nfla {fla.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| T | fla fp32 export vs ours fp32 | fla bf16 export vs ours fp32 | ours bf16 autocast vs ours fp32 "
          "| argmax agreement (fla bf16 vs ours fp32) |")
    for length, err32, err16, noise, agree in rows:
        print(f"| {length} | {err32:.2e} | {err16:.2e} | {noise:.2e} | {agree:.4f} |")
