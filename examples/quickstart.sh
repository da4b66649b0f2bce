#!/usr/bin/env bash
# The quickstart: from a fresh clone to a trained tiny Gated DeltaNet on the CPU, downloading nothing but
# Python packages. About 10 minutes on 2 cores, installation included.
#
#   1. install megatron_gdn into .venv
#   2. build a JSONL corpus from the Python standard library (source files and docstrings, 8 MB)
#   3. train a 4096-piece SentencePiece BPE tokenizer on it
#   4. tokenize it into Megatron's .bin/.idx format (2 worker processes)
#   5. pretrain the tiny model (6 layers, 256 wide) for 200 iterations of 8 x 256 tokens, evaluating on a
#      held-out 2% of the documents
#   6. continue a prompt with the trained model
#   7. export it to Hugging Face format (Qwen3-Next layout) and continue the prompt with stock transformers
#
# Re-running starts the training afresh. Outputs: data/quickstart/, checkpoints/quickstart/, runs/quickstart/,
# hf/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh

DATA=data/quickstart
CKPT=checkpoints/quickstart
mkdir -p "$DATA"
rm -rf "$CKPT" runs/quickstart

"$PYTHON" tools/build_demo_corpus.py --output "$DATA/corpus.jsonl" --max-mb 8
"$PYTHON" tools/train_tokenizer.py --input "$DATA/corpus.jsonl" --model-prefix "$DATA/tok" \
    --vocab-size 4096 --model-type bpe
"$PYTHON" tools/preprocess_data.py --input "$DATA/corpus.jsonl" --tokenizer-model "$DATA/tok.model" \
    --append-eod --workers 2 --output-prefix "$DATA/stdlib"

"$PYTHON" pretrain_gdn.py \
    --model-size tiny \
    --data-path "$DATA/stdlib_text_document" --tokenizer-model "$DATA/tok.model" --split 98,2,0 \
    --seq-length 256 --micro-batch-size 8 --global-batch-size 8 --train-iters 200 \
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 10 --weight-decay 0.1 --clip-grad 1.0 \
    --log-interval 1 --eval-interval 100 --eval-iters 4 \
    --save "$CKPT" --tensorboard-dir runs/quickstart

echo "--- a sample from the trained model (greedy):"
"$PYTHON" tools/generate_text.py --load "$CKPT" --tokenizer-model "$DATA/tok.model" \
    --prompt "def read_config(path):" --max-new-tokens 40

"$PYTHON" tools/convert_checkpoint_to_hf.py --load "$CKPT" --save hf/quickstart --format qwen3_next \
    --tokenizer-model "$DATA/tok.model" --overwrite
echo "--- the same model loaded by stock transformers (AutoModelForCausalLM), greedy:"
"$PYTHON" tools/hf_generate.py --model hf/quickstart --prompt "def read_config(path):" --max-new-tokens 40
