#!/usr/bin/env bash
# Long-context pretraining of the 1.3B GDN model (2048 hidden, 21 layers, 6 heads x 256, expand_v 2; 1.39B
# parameters) on 256K-token sequences: context parallelism splits every sequence over 4 GPUs (64K tokens each) and
# full activation recomputation keeps one hidden-state tensor per block, on the 8 GPUs of one node.
#
#   bash examples/pretrain_gdn_longctx_cp.sh          # DATA=... TOKENIZER=... to point at your corpus
#
# Hardware: one node of 8 x 80 GB GPUs (H100/H200 class, NVLink). Layout: CP=4 x DP=2 (TP=1), ZeRO-1 over the
# DP x CP = 8 ranks. Batch: global batch 8 sequences of 262,144 tokens (4 accumulation steps per data-parallel
# rank): 2.1M tokens per step. Documents are packed and the recurrent state restarts at each one
# (--reset-state-at-eod); a document may span the CP ranks (docs/PARALLELISM.md, context parallelism).
#
# Why these choices:
# - A GDN layer's state is fixed-size, so context parallelism passes one small summary per layer between the ranks
#   (O(heads x K x (K + V)), independent of the length; --cp-comm-type state_passing), and the memory per GPU is that
#   of its 64K-token slice.
# - --recompute-granularity full keeps only each block's input for backward (tests/test_recompute.py); the extra
#   forward costs about 30% more FLOPs. --recompute-activations (selective) is faster where it fits.
# - The rest as in examples/pretrain_gdn_1.3b_8gpu.sh (ZeRO-1, no tensor parallelism).
# - PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: at these lengths the caching allocator's free blocks fragment
#   (one GPU, 1.3B at 256K without CP: out of memory with 18.6 GiB reserved but unused; with it, 69.3 GiB peak on an
#   80 GB H100; docs/PERFORMANCE.md).
# Expected: not measured (benchmarks/bench_train.py --configs 1.3b-64k times one 64K-token slice on one GPU without
# CP; docs/PERFORMANCE.md). The issue's reference, fla's own model on one H100 at 64K tokens with gradient
# checkpointing: 35.8K tokens/s in 21.4 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
DATA=${DATA:-data/corpus_text_document}
TOKENIZER=${TOKENIZER:-tok.model}
ARGS=(--model-size 1.3b --bf16 --zero-stage 1 --deepspeed-config examples/ds_config_zero1.json
      --context-parallel-size 4 --cp-comm-type state_passing --recompute-granularity full
      --seq-length 262144 --micro-batch-size 1 --global-batch-size 8 --reset-state-at-eod --train-iters 2000
      --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 100 --weight-decay 0.1 --clip-grad 1.0
      --adam-beta2 0.95
      --data-path "$DATA" --tokenizer-model "$TOKENIZER"
      --save ckpt/gdn-1.3b-256k --load ckpt/gdn-1.3b-256k --save-interval 100
      --eval-interval 200 --eval-iters 4 --log-interval 1 --tensorboard-dir runs/gdn-1.3b-256k)
torchrun --standalone --nproc-per-node 8 pretrain_gdn.py "${ARGS[@]}"
