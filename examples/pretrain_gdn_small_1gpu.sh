#!/usr/bin/env bash
# Pretrain the small GDN model (GPT-2-small size: 768 hidden, 12 layers, 12 heads x 64, expand_v 2; 163M parameters
# with a 32000-piece vocabulary) on one GPU, 4096-token sequences.
#
#   bash examples/pretrain_gdn_small_1gpu.sh          # DATA=... TOKENIZER=... to point at your corpus
#
# Hardware: one 80 GB GPU (H100/H200 class). Data: a corpus preprocessed with tools/preprocess_data.py (docs/DATA.md).
# Batch: micro batch 8 x 4096 tokens, global batch 64 (8 accumulation steps): 262K tokens per step.
# --cuda-graph: at this size the eager step is bound by the host launching kernels, and replaying each micro batch
# as one CUDA graph takes that away (docs/TRAINING.md, "CUDA graphs"; evaluation stays eager).
# Expected, on one H100: about 313K tokens/s. That is bench_train.py --configs small --cuda-graph, with one micro
# batch per step (104.7 ms, 22.2 GiB peak; docs/PERFORMANCE.md). Here 8 accumulation steps share one optimizer step.
# Resubmit the same command to continue: --save and --load are the same directory.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/corpus_text_document}
TOKENIZER=${TOKENIZER:-tok.model}
ARGS=(--model-size small --bf16 --cuda-graph
      --seq-length 4096 --micro-batch-size 8 --global-batch-size 64 --train-iters 20000
      --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 500 --weight-decay 0.1 --clip-grad 1.0
      --adam-beta2 0.95
      --data-path "$DATA" --tokenizer-model "$TOKENIZER"
      --save ckpt/gdn-small --load ckpt/gdn-small --save-interval 1000
      --eval-interval 1000 --eval-iters 20 --log-interval 10 --tensorboard-dir runs/gdn-small)
python3 pretrain_gdn.py "${ARGS[@]}"
