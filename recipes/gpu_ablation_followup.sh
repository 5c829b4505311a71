#!/usr/bin/env bash
# Follow-up to gpu_ablations.sh on one GPU: moe_per_expert with 4 seeds (its 2-seed interval included zero), and
# two more AdamW learning rates for the muon_vs_adamw baseline (its 1e-3 was not tuned); then compare_runs on
# each sweep, everything packed into OUT_DIR/ablation_followup.tgz.
# Usage: bash recipes/gpu_ablation_followup.sh OUT_DIR [STEPS]
#   SWEEPS="moe adamw" (default: both), ADAMW_LRS=0.002,0.004 (default) choose what runs.
set -u
out=${1:-gpu_out}
steps=${2:-250}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common="train.steps=$steps train.eval_every=100 logging.wandb.mode=offline optim.backend=torch"
run() {  # name, timeout, overrides...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" python train.py -m "$@" $common hydra.sweep.dir=outputs/abl/$name > "$out/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - start )) s"
  python recipes/compare_runs.py outputs/abl/$name 2>&1 | tail -2
  head -30 outputs/abl/$name/summary.md 2>/dev/null
}
sweeps=${SWEEPS:-moe adamw}
lrs=${ADAMW_LRS:-0.002,0.004}
[[ $sweeps == *moe* ]] && run moe_per_expert_4seeds 340 experiment=moe_per_expert seed=0,1,2,3
[[ $sweeps == *adamw* ]] && run adamw_lr_${lrs//,/_} 140 experiment=lr_sweep optim=adamw optim.lr=0.02 optim.adamw.lr=$lrs seed=0
tar czf "$out/ablation_followup.tgz" --exclude='wandb' --exclude='*.log' outputs/abl
