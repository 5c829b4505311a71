#!/usr/bin/env bash
# Small-scale GPU runs of three ablations on one GPU (2 arms x 2 seeds each), then compare_runs on each sweep;
# everything (metrics, PNGs, tables) is packed into OUT_DIR/ablations.tgz.
# Usage: bash recipes/gpu_ablations.sh OUT_DIR [STEPS]
# The Newton-Schulz backend is torch here: the same math as the Triton kernels (tests compare them), without the
# per-process kernel autotuning that would dominate runs this short.
set -u
out=${1:-gpu_out}
steps=${2:-250}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common="seed=0,1 train.steps=$steps train.eval_every=100 logging.wandb.mode=offline optim.backend=torch"
for exp in qkv_split moe_per_expert muon_vs_adamw; do
  start=$(date +%s)
  timeout 180 python train.py -m experiment=$exp $common hydra.sweep.dir=outputs/abl/$exp > "$out/$exp.log" 2>&1
  echo "$exp: exit $? in $(( $(date +%s) - start )) s"
  python recipes/compare_runs.py outputs/abl/$exp 2>&1 | tail -3
  cat outputs/abl/$exp/summary.md 2>/dev/null | head -30
done
tar czf "$out/ablations.tgz" --exclude='wandb' --exclude='*.log' outputs/abl
