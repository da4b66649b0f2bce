"""Continue a prompt with a trained checkpoint: a quick look at what a model has learned.

    python tools/generate_text.py --load checkpoints/quickstart --tokenizer-model data/quickstart/tok.model \
        --prompt "def main(" --max-new-tokens 60

Greedy by default; --temperature/--top-k/--top-p with --sample draw tokens instead. Reads checkpoints of any
tensor-parallel size, with weights_only=True (never runs code from the file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gdn.data.tokenizer import SentencePieceTokenizer  # noqa: E402
from megatron_gdn.models import GatedDeltaNetForCausalLM  # noqa: E402
from megatron_gdn.training.full_checkpoint import read_full_checkpoint  # noqa: E402


def load_model(load: str, iteration: int | None = None) -> GatedDeltaNetForCausalLM:
    """The full model of a checkpoint of any tensor-parallel size, on the CPU."""
    checkpoint = read_full_checkpoint(load, iteration)
    model = GatedDeltaNetForCausalLM(checkpoint.model_config)
    model.load_state_dict(checkpoint.state)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (pretrain_gdn.py --save)")
    parser.add_argument("--iteration", type=int, default=None, help="iteration to load (default: the latest)")
    parser.add_argument("--tokenizer-model", required=True, help="the SentencePiece model of the training data")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start from the BOS token)")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        tokenizer = SentencePieceTokenizer(args.tokenizer_model)
        model = load_model(args.load, args.iteration)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tokenizer.tokenize(args.prompt) if args.prompt else [tokenizer.bos]
    out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=tokenizer.eod, generator=torch.Generator().manual_seed(args.seed))
    # Ids of the vocabulary padding are never trained on; drop them rather than fail to decode.
    print(tokenizer.detokenize([i for i in out[0].tolist() if i < tokenizer.vocab_size]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
