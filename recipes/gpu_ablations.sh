#!/usr/bin/env bash
# Small-scale GPU ablations on one GPU, several sweeps at once, then compare_runs on each; everything (metrics,
# PNGs, tables) is packed into OUT_DIR/ablations.tgz.
# Usage: bash recipes/gpu_ablations.sh OUT_DIR [STEPS]
# The experiments take their data from the model's recipe: the site-packages corpus with a 32k BPE (prepared once
# here, `python recipes/prepare_data.py model=gqa_small`), well under one epoch at STEPS x 8192 tokens; compare_runs
# ranks the arms by eval bits per byte.
#   SWEEPS picks the sweeps, default "qkv_split moe_per_expert muon_vs_adamw" (2 arms x SEEDS, default 0,1,2).
#   muon_vs_adamw tunes first: each arm gets the best lr of a short sweep (seed 0) before its seeds run. The AdamW
#   arm sweeps optim.adamw.lr over ADAMW_ARM_LRS; the Muon arm sweeps its matrix lr (MUON_LRS) x the lr of its AdamW
#   half (embeddings, head, norms; MUON_ADAMW_LRS). A space separates sweeps that run at once, a comma the lrs of one.
#   Follow-ups: ns_method (Gram form vs standard Newton-Schulz, seeds 0,1), moe_per_expert_4seeds (seeds 0-3),
#   adamw_lr (AdamW alone at the lrs of ADAMW_LRS, default 0.002,0.004, seed 0). EXTRA: overrides for every job
#   (a CPU try: EXTRA="model=gqa_tiny device=cpu train.batch_size=4 train.eval_every=2" SEEDS=0 ... OUT 4).
# Concurrency: a model of this size at 8192 tokens a step leaves most of an H200 idle, so every seed of every sweep
# is its own process and they share the GPU (a phase's wall time is about that of its longest sweep). The losses do
# not depend on it; the tokens/s and step times in the tables do: measure speed with recipes/gpu_recipes_check.sh.
# The Newton-Schulz backend is torch and compile is off: the same math as the Triton kernels (tests compare them),
# without per-process kernel autotuning and compilation that would dominate runs this short.
set -u
out=${1:-gpu_out}
steps=${2:-250}
seeds=${SEEDS:-0,1,2}
limit=${PHASE_LIMIT_S:-330}   # seconds a phase's sweeps may take before they are stopped
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common="train.steps=$steps train.eval_every=100 train.compile=false logging.wandb.mode=${ABL_WANDB:-offline} optim.backend=torch ${EXTRA:-}"
root=${ABL_ROOT:-outputs/abl}   # where the sweeps write their runs
groups=()

start() {  # sweep path under outputs/abl, overrides...: a sweep in the background, its log in OUT_DIR
  local name=$1; shift
  mkdir -p "$out/$(dirname "$name")"
  timeout "$limit" python train.py -m "$@" $common hydra.sweep.dir=$root/$name > "$out/$name.log" 2>&1 &
}

per_seed() {  # group, seeds, overrides...: one sweep per seed (both arms), all at once
  local group=$1 list=$2; shift 2
  groups+=("$group")
  for seed in ${list//,/ }; do start "$group/s$seed" "$@" seed="$seed"; done
}

phase_done() {  # wait for the phase's sweeps
  local t0=$1
  wait
  echo "phase done in $(( $(date +%s) - t0 )) s"
}

best() {  # tuning sweep dir, fallback overrides: the best arm's overrides by eval bpb
  local picked
  picked=$(python recipes/compare_runs.py "$1" --best-overrides 2>>"$out/tuning.err") && [ -n "$picked" ] \
    && echo "$picked" || echo "$2"
}

python recipes/prepare_data.py model=gqa_small 2>&1 | tail -1  # the corpus and BPE every job reads, once
sweeps=${SWEEPS:-qkv_split moe_per_expert muon_vs_adamw}
t0=$(date +%s)
for sweep in $sweeps; do
  case $sweep in
    qkv_split|moe_per_expert) per_seed "$sweep" "$seeds" experiment=$sweep ;;
    ns_method) per_seed "$sweep" 0,1 experiment=$sweep ;;
    moe_per_expert_4seeds) per_seed "$sweep" 0,1,2,3 experiment=moe_per_expert ;;
    adamw_lr) groups+=("adamw_lr")
              start adamw_lr/lrs experiment=lr_sweep optim=adamw optim.lr=0.02 optim.adamw.lr=${ADAMW_LRS:-0.002,0.004} seed=0 ;;
    muon_vs_adamw)
      groups+=(muon_vs_adamw_tuning/adamw muon_vs_adamw_tuning/muon_split)
      for lrs in ${ADAMW_ARM_LRS:-0.000125,0.00025 0.0005,0.001 0.002,0.004}; do
        start "muon_vs_adamw_tuning/adamw/${lrs//,/_}" experiment=muon_vs_adamw optim=adamw optim.adamw.lr="$lrs" seed=0
      done
      for lr in ${MUON_LRS:-0.01 0.02 0.04}; do
        start "muon_vs_adamw_tuning/muon_split/$lr" experiment=muon_vs_adamw optim=muon_split optim.lr="$lr" \
          optim.adamw.lr="${MUON_ADAMW_LRS:-0.0003,0.001,0.003}" seed=0
      done ;;
    *) echo "SWEEPS: unknown sweep '$sweep' (qkv_split, moe_per_expert, muon_vs_adamw, ns_method, moe_per_expert_4seeds, adamw_lr)" >&2
       exit 2 ;;
  esac
done
phase_done "$t0"

if [[ " $sweeps " == *" muon_vs_adamw "* ]]; then  # the comparison at each arm's tuned lrs
  adamw=$(best $root/muon_vs_adamw_tuning/adamw "optim.adamw.lr=0.001")
  muon=$(best $root/muon_vs_adamw_tuning/muon_split "optim.lr=0.02 optim.adamw.lr=0.001")
  echo "muon_vs_adamw at the tuned lrs: adamw arm: $adamw; muon_split arm: $muon" | tee "$out/tuned_lrs.txt"
  t0=$(date +%s)
  per_seed muon_vs_adamw/adamw "$seeds" experiment=muon_vs_adamw optim=adamw $adamw
  per_seed muon_vs_adamw/muon_split "$seeds" experiment=muon_vs_adamw optim=muon_split $muon
  groups+=(muon_vs_adamw)
  phase_done "$t0"
fi

for group in "${groups[@]}"; do
  case $group in muon_vs_adamw/*) continue ;; esac   # compared as a whole
  echo "== $group"
  python recipes/compare_runs.py "$root/$group" 2>&1 | sed '/^## Runs/,$d' | grep -v '^$'
done
tar czf "$out/ablations.tgz" --exclude='wandb' --exclude='*.log' $root
