#!/usr/bin/env bash
# The same ZeRO-2 run started by each supported launcher (docs/DISTRIBUTED.md). Pick one:
#
#   bash examples/multinode.sh torchrun  NODE_RANK MASTER_HOST   # on every node: torchrun with a rendezvous
#   bash examples/multinode.sh deepspeed                          # once: the deepspeed launcher + examples/hostfile
#   bash examples/multinode.sh mpirun                             # once: Open MPI's mpirun
#   bash examples/multinode.sh mpiexec                            # once: MPICH / Intel MPI's mpiexec (hydra)
#   sbatch examples/pretrain_zero.slurm                           # Slurm (srun)
#
# Nodes and GPUs below: 2 x 8. Every launcher runs pretrain_gdn.py once per GPU; the ranks come from the
# launcher's environment (torchrun, deepspeed) or from MPI through mpi4py (mpirun, mpiexec).
set -euo pipefail
SELF="$(realpath "$0")"
cd "$(dirname "$SELF")/.."
NODES=2
GPUS_PER_NODE=8
HOSTS=(node001 node002)
ARGS=(--model-size small --bf16 --zero-stage 2 --deepspeed-config examples/ds_config_zero2.json
      --seq-length 4096 --micro-batch-size 8 --global-batch-size 256 --train-iters 20000
      --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 500 --weight-decay 0.1
      --data-path data/corpus_text_document --tokenizer-model tok.model
      --save ckpt/small-zero2 --load ckpt/small-zero2 --save-interval 1000 --log-interval 10)

case "${1:-}" in
    torchrun)  # run on each node with its rank (0 .. NODES-1) and the first node's address
        torchrun --nnodes "$NODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$2" \
            --rdzv-backend c10d --rdzv-endpoint "$3:29500" --rdzv-id gdn-small-zero2 \
            pretrain_gdn.py "${ARGS[@]}"
        ;;
    deepspeed)  # reaches the other nodes over passwordless ssh (pdsh); see examples/hostfile for the no-ssh way
        deepspeed --hostfile examples/hostfile --master_addr "${HOSTS[0]}" --master_port 29500 \
            pretrain_gdn.py "${ARGS[@]}"
        ;;
    mpirun)  # Open MPI: one process per GPU, environment forwarded, no CPU binding (the data loader needs cores)
        mpirun -np $((NODES * GPUS_PER_NODE)) -H "${HOSTS[0]}:$GPUS_PER_NODE,${HOSTS[1]}:$GPUS_PER_NODE" \
            --bind-to none -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH \
            python pretrain_gdn.py "${ARGS[@]}"
        ;;
    mpiexec)  # MPICH or Intel MPI (hydra)
        mpiexec -n $((NODES * GPUS_PER_NODE)) -ppn "$GPUS_PER_NODE" -hosts "${HOSTS[0]},${HOSTS[1]}" \
            python pretrain_gdn.py "${ARGS[@]}"
        ;;
    *)
        sed -n '2,12p' "$SELF"
        exit 2
        ;;
esac
