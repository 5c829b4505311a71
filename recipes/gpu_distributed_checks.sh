#!/usr/bin/env bash
# Distributed checks on one multi-GPU node: a short moe_small muon_split run on 2 GPUs beside 1 GPU (same global
# batch), the GPU tests of tests/optim, and the optimizer step benchmark (dense_1b and moe_small parameter sets)
# on 1, 2, 4, ... GPUs up to what the node has.
# Usage: bash recipes/gpu_distributed_checks.sh OUT_DIR
set -u
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L
ngpu=$(nvidia-smi -L | wc -l)
common="model=moe_small optim=muon_split logging.wandb.mode=disabled train.eval_every=0 train.log_every=5 \
  train.steps=30 train.seq_len=1024 train.warmup_steps=5"
CUDA_VISIBLE_DEVICES=0 timeout 300 python train.py $common train.batch_size=16 run_dir="$out/moe_1gpu" \
  > "$out/moe_1gpu.log" 2>&1 &
CUDA_VISIBLE_DEVICES=$((ngpu - 1)) timeout 300 python -m pytest -q -m gpu tests/optim > "$out/optim_gpu_tests.log" 2>&1
wait
timeout 300 python -m torch.distributed.run --standalone --nproc_per_node=2 train.py $common train.batch_size=8 \
  run_dir="$out/moe_2gpu" > "$out/moe_2gpu.log" 2>&1
tail -3 "$out/optim_gpu_tests.log"
grep -E "^step|rror" "$out/moe_1gpu.log" "$out/moe_2gpu.log"
for n in 1 2 4 8; do
  [ "$n" -le "$ngpu" ] || break
  timeout 280 python -m torch.distributed.run --standalone --nproc_per_node=$n recipes/bench_optimizer.py \
    --out "$out/bench_optimizer_${n}gpu.json" 2>&1 | grep -vE "^W[0-9]|OMP_NUM" | tail -30
done
