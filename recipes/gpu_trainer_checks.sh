#!/usr/bin/env bash
# GPU checks of the models and the trainer on one GPU: the GPU-only tests of tests/models, short gqa_small and
# moe_small runs (tokens/s, MFU), and dense_1b through the trainer beside the hand-written baseline loop.
# Usage: bash recipes/gpu_trainer_checks.sh OUT_DIR
set -u
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
common="logging.wandb.mode=disabled train.eval_every=0 train.log_every=10"
python -m pytest -q tests/models -m gpu 2>&1 | tail -5 | tee "$out/models_gpu_tests.log"
for m in gqa_small moe_small; do
  timeout 240 python train.py model=$m optim=adamw train.steps=40 train.seq_len=1024 train.batch_size=16 \
    $common run_dir="$out/train_$m" 2>&1 | grep -E "^step|^run dir|param groups|rror" | tee "$out/train_$m.log"
done
timeout 200 python recipes/bench_train_baseline.py --model dense_1b --seq-len 2048 --batch-size 8 --steps 20 \
  2>&1 | tail -2 | tee "$out/baseline_dense_1b.log"
for mesh in single fsdp; do
  timeout 240 python train.py model=dense_1b mesh=$mesh optim=adamw train.steps=30 train.seq_len=2048 \
    train.batch_size=8 train.compile=true $common run_dir="$out/train_dense_1b_$mesh" 2>&1 \
    | grep -E "^step|^run dir|rror" | tee "$out/train_dense_1b_$mesh.log"
done
