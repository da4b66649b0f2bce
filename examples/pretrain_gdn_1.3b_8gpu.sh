#!/usr/bin/env bash
# Pretrain the 1.3B GDN model (fla's default shape: 2048 hidden, 21 layers, 6 heads x 256, expand_v 2; 1.39B
# parameters with a 32000-piece vocabulary) on the 8 GPUs of one node, 4096-token sequences.
#
#   bash examples/pretrain_gdn_1.3b_8gpu.sh           # DATA=... TOKENIZER=... to point at your corpus
#
# Hardware: one node of 8 x 80 GB GPUs (H100/H200 class, NVLink). Data: tools/preprocess_data.py (docs/DATA.md).
# Batch: micro batch 4 x 4096 tokens per GPU, global batch 512 (8 data-parallel ranks x 16 accumulation steps):
# 2.1M tokens per step.
#
# Why data parallelism with ZeRO-1 and no tensor parallelism:
# - The model's state fits one GPU. Under DeepSpeed's bf16 every rank holds the bf16 weights (2.8 GB) and its
#   gradient buffers, and ZeRO-1 splits the fp32 master weights and AdamW moments (12 bytes per parameter, 16.6 GB)
#   over the 8 ranks (2.1 GB each): most of the 80 GB is left for the activations of 4 x 4096 tokens (an estimate;
#   the measured peak is what bench_train.py reports).
# - Tensor parallelism would cut each 2048-wide matrix product into 8 small ones and add 4 collectives per block
#   per micro batch; at this size that costs more than it saves (docs/PERFORMANCE.md: TP=2 made the small model
#   only 1.09x faster on twice the GPUs). Keep it for models whose weights or activations do not fit one GPU.
# - ZeRO-1 (optimizer state partitioned) cost 2% over plain data parallelism, ZeRO-2 27% and ZeRO-3 2.8x in the
#   2-GPU measurements of docs/PERFORMANCE.md; ZeRO-1 saves most of the memory (the fp32 state) for the least time.
# Expected: not measured yet (benchmarks/bench_train.py --configs 1.3b for one GPU, benchmarks/bench_dp_scaling.sh
# for the scaling; docs/PERFORMANCE.md). The issue's reference, fla's own model in a plain loop on one H100 at
# 4 x 4096 tokens: 46.6K tokens/s and 35.7 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/corpus_text_document}
TOKENIZER=${TOKENIZER:-tok.model}
ARGS=(--model-size 1.3b --bf16 --zero-stage 1 --deepspeed-config examples/ds_config_zero1.json
      --seq-length 4096 --micro-batch-size 4 --global-batch-size 512 --train-iters 50000
      --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 1000 --weight-decay 0.1 --clip-grad 1.0
      --adam-beta2 0.95
      --data-path "$DATA" --tokenizer-model "$TOKENIZER"
      --save ckpt/gdn-1.3b --load ckpt/gdn-1.3b --save-interval 1000
      --eval-interval 1000 --eval-iters 20 --log-interval 10 --tensorboard-dir runs/gdn-1.3b)
torchrun --standalone --nproc-per-node 8 pretrain_gdn.py "${ARGS[@]}"
