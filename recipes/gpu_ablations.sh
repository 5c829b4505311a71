#!/usr/bin/env bash
# Small-scale GPU ablation sweeps on one GPU, then compare_runs on each sweep; everything (metrics, PNGs, tables)
# is packed into OUT_DIR/ablations.tgz.
# Usage: bash recipes/gpu_ablations.sh OUT_DIR [STEPS]
# The experiments take their data from the model's recipe: the site-packages corpus with a 32k BPE (prepared once:
# `python recipes/prepare_data.py model=gqa_small`), under one epoch at their 600 x 8192 tokens; compare_runs
# ranks the arms by eval bits per byte.
#   SWEEPS picks the sweeps, default "qkv_split moe_per_expert muon_vs_adamw" (2 arms x SEEDS each, default 0,1,2). Follow-ups:
#   ns_method (Gram form vs standard Newton-Schulz, seeds 0,1), moe_per_expert_4seeds (seeds 0-3), adamw_lr (AdamW alone at the lrs of ADAMW_LRS, default 0.002,0.004, seed 0).
# The Newton-Schulz backend is torch here: the same math as the Triton kernels (tests compare them), without the
# per-process kernel autotuning that would dominate runs this short.
set -u
out=${1:-gpu_out}
steps=${2:-250}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common="train.steps=$steps train.eval_every=100 logging.wandb.mode=offline optim.backend=torch"
lrs=${ADAMW_LRS:-0.002,0.004}

run() {  # sweep dir name, time limit (s), overrides...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" python train.py -m "$@" $common hydra.sweep.dir=outputs/abl/$name > "$out/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - start )) s"
  python recipes/compare_runs.py outputs/abl/$name 2>&1 | tail -3
  head -30 outputs/abl/$name/summary.md 2>/dev/null
}

python recipes/prepare_data.py model=gqa_small 2>&1 | tail -1  # the corpus and BPE every job reads, once
for sweep in ${SWEEPS:-qkv_split moe_per_expert muon_vs_adamw}; do
  case $sweep in
    qkv_split|moe_per_expert|muon_vs_adamw|ns_method) run "$sweep" 270 experiment=$sweep seed=${SEEDS:-0,1,2} ;;
    moe_per_expert_4seeds) run "$sweep" 340 experiment=moe_per_expert seed=0,1,2,3 ;;
    adamw_lr) run "adamw_lr_${lrs//,/_}" 140 experiment=lr_sweep optim=adamw optim.lr=0.02 optim.adamw.lr=$lrs seed=0 ;;
    *) echo "SWEEPS: unknown sweep '$sweep' (qkv_split, moe_per_expert, muon_vs_adamw, moe_per_expert_4seeds, adamw_lr)" >&2
       exit 2 ;;
  esac
done
tar czf "$out/ablations.tgz" --exclude='wandb' --exclude='*.log' outputs/abl
