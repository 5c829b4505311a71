#!/usr/bin/env bash
# dense_1b throughput: the hand-written baseline loop beside the trainer (mesh=single and FSDP2), AdamW, and the
# trainer with optim=muon_split (the optimizer's share of a real step).
# Usage: bash recipes/gpu_throughput_check.sh OUT_DIR
set -u
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common="model=dense_1b train.seq_len=2048 train.batch_size=8 train.compile=true logging.wandb.mode=disabled \
  train.eval_every=0 train.log_every=10 train.steps=30"
timeout 150 python recipes/bench_train_baseline.py --model dense_1b --seq-len 2048 --batch-size 8 --steps 20 2>&1 | tail -1
for run in "mesh=single optim=adamw" "mesh=fsdp optim=adamw" "mesh=fsdp optim=muon_split"; do
  echo "== $run"
  timeout 170 python train.py $common $run run_dir="$out/run" 2>&1 | grep -E "^step (20|30)|rror"
  rm -rf "$out/run"
done
