"""Continue a prompt with an exported Hugging Face model, using only transformers (what a user of the export sees).

    python tools/convert_checkpoint_to_hf.py --load checkpoints/quickstart --save hf/quickstart --format qwen3_next
    python tools/hf_generate.py --model hf/quickstart --prompt "def main(" --max-new-tokens 40

Loads the directory with AutoTokenizer and AutoModelForCausalLM (local files only, trust_remote_code off),
generates greedily and prints the prompt with its continuation. A qwen3_next export needs nothing beyond
transformers; an fla export needs flash-linear-attention installed (its import registers the model type).

Exit codes: 0 on success, 2 for bad input (a one-line "error: ..." on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="exported model directory (convert_checkpoint_to_hf.py --save)")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start from the BOS token)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(generate(args.model, args.prompt, args.max_new_tokens, args.device))
    except (ImportError, OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def generate(model_dir: str, prompt: str, max_new_tokens: int, device: str | None = None) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if json.loads(config_path.read_text()).get("model_type") == "gated_deltanet":
        try:
            import fla  # noqa: F401  (registers gated_deltanet with the Auto classes)
        except ImportError:
            raise ImportError("an fla-format export needs flash-linear-attention (pip install "
                              "flash-linear-attention); or export with --format qwen3_next for stock transformers"
                              ) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=False,
        dtype=torch.float32 if device == "cpu" else "auto").to(device).eval()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True)


if __name__ == "__main__":
    sys.exit(main())
