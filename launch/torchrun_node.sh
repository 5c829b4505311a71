#!/usr/bin/env bash
# One node, every visible GPU, one training run:
#   launch/torchrun_node.sh model=moe_small optim=muon_split train.steps=5000
#   NPROC_PER_NODE=4 launch/torchrun_node.sh experiment=qkv_split optim.split.qkv=split seed=1
# NPROC_PER_NODE: processes to start (default: the visible CUDA devices, or 1 without CUDA).
# For a sweep on one node use Hydra's multirun instead; it starts one torchrun world like this per job:
#   python train.py -m experiment=qkv_split            (launcher.nproc_per_node=auto|N)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NPROC=${NPROC_PER_NODE:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Elastic restarts (--max-restarts) need a private store per world (pytorch/pytorch#135712; docs/checkpoints.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py "$@"
