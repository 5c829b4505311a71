#!/usr/bin/env bash
# Small-scale GPU ablations on one GPU, a few runs at a time, then compare_runs on each sweep; everything (metrics,
# PNGs, tables) is packed into OUT_DIR/ablations.tgz.
# Usage: bash recipes/gpu_ablations.sh OUT_DIR [STEPS]
# The experiments take their data from the model's recipe: the site-packages corpus with a 32k BPE (prepared once
# here, `python recipes/prepare_data.py model=gqa_small`), well under one epoch at STEPS x 8192 tokens; compare_runs
# ranks the arms by eval bits per byte.
#   SWEEPS picks the sweeps, default "qkv_split moe_per_expert muon_vs_adamw" (2 arms x SEEDS, default 0,1,2).
#   muon_vs_adamw tunes first: each arm gets the best lr of a short sweep (seed 0) before its seeds run. The AdamW
#   arm sweeps optim.adamw.lr over ADAMW_ARM_LRS; the Muon arm sweeps its matrix lr (MUON_LRS) x the lr of its AdamW
#   half (embeddings, head, norms; MUON_ADAMW_LRS).
#   Follow-ups: ns_method (Gram form vs standard Newton-Schulz, seeds 0,1), moe_per_expert_4seeds (seeds 0-3),
#   adamw_lr (AdamW alone at the lrs of ADAMW_LRS, default 0.002,0.004, seed 0). EXTRA: overrides for every job
#   (a CPU try: EXTRA="model=gqa_tiny device=cpu train.batch_size=4 train.eval_every=2" SEEDS=0 ... OUT 4).
# Every run (one arm, one seed) is its own job, PARALLEL of them (default 4) at a time on the one GPU: a model of
# this size at 8192 tokens a step leaves most of an H200 idle. The losses do not depend on it; the tokens/s and step
# times in the tables do: measure speed with recipes/gpu_recipes_check.sh. A run that already finished (its
# metrics reached STEPS) is not run again, so after a time-out the same command continues where it stopped; an
# unfinished run is started over. compare_runs leaves out runs that stopped early.
# The Newton-Schulz backend is torch and compile is off: the same math as the Triton kernels (tests compare them),
# without per-process kernel autotuning and compilation that would dominate runs this short.
set -u
out=${1:-gpu_out}
steps=${2:-250}
seeds=${SEEDS:-0,1,2}
parallel=${PARALLEL:-4}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
common="train.steps=$steps train.eval_every=100 train.compile=false logging.wandb.mode=${ABL_WANDB:-offline} optim.backend=torch ${EXTRA:-}"
root=${ABL_ROOT:-outputs/abl}   # where the runs are written: <root>/<sweep>/<arm>_s<seed>/0
groups=()

finished() {  # run dir: whether its metrics reached the last step
  python - "$1/metrics.jsonl" "$steps" <<'EOF' 2>/dev/null
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
sys.exit(0 if rows and rows[-1].get("step", 0) >= int(sys.argv[2]) else 1)
EOF
}

job() {  # sweep, arm label, overrides...: one run, started when fewer than PARALLEL are running
  local sweep=$1 arm=$2; shift 2
  local dir=$root/$sweep/$arm
  if finished "$dir/0"; then echo "[ablations] $sweep/$arm: finished earlier, kept"; return; fi
  rm -rf "$dir"
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n; done
  mkdir -p "$out/$sweep"
  python train.py -m "$@" $common hydra.sweep.dir="$dir" > "$out/$sweep/$arm.log" 2>&1 &
}

arms() {  # sweep, key, values, seeds, overrides...: every value of key x every seed (run dirs <prefix><value>_s<seed>)
  local sweep=$1 key=$2 values=$3 list=$4; shift 4
  [[ " ${groups[*]} " == *" $sweep "* ]] || groups+=("$sweep")
  for seed in ${list//,/ }; do
    for value in ${values//,/ }; do job "$sweep" "${prefix:-}${value}_s$seed" "$@" "$key=$value" seed="$seed"; done
  done
}

label() {  # optimizer, overrides...: a directory name, "muon_split_lr-0.02_adamw.lr-0.001"
  local name=$1; shift
  for o in "$@"; do o=${o#optim.}; name+="_${o//=/-}"; done
  echo "$name"
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
    qkv_split) arms qkv_split optim.split.qkv fused,split "$seeds" experiment=qkv_split ;;
    moe_per_expert) arms moe_per_expert optim.split.experts fused,per_expert "$seeds" experiment=moe_per_expert ;;
    ns_method) arms ns_method optim.ns_method gram,standard 0,1 experiment=ns_method ;;
    moe_per_expert_4seeds) arms moe_per_expert_4seeds optim.split.experts fused,per_expert 0,1,2,3 experiment=moe_per_expert ;;
    adamw_lr) arms adamw_lr optim.adamw.lr "${ADAMW_LRS:-0.002,0.004}" 0 experiment=lr_sweep optim=adamw optim.lr=0.02 ;;
    muon_vs_adamw)
      arms muon_vs_adamw_tuning/adamw optim.adamw.lr "${ADAMW_ARM_LRS:-0.000125,0.00025,0.0005,0.001,0.002,0.004}" 0 \
        experiment=muon_vs_adamw optim=adamw
      lrs=${MUON_LRS:-0.01,0.02,0.04}
      for lr in ${lrs//,/ }; do
        prefix="lr-${lr}_adamw.lr-" arms muon_vs_adamw_tuning/muon_split optim.adamw.lr \
          "${MUON_ADAMW_LRS:-0.0003,0.001,0.003}" 0 experiment=muon_vs_adamw optim=muon_split optim.lr="$lr"
      done ;;
    *) echo "SWEEPS: unknown sweep '$sweep' (qkv_split, moe_per_expert, muon_vs_adamw, ns_method, moe_per_expert_4seeds, adamw_lr)" >&2
       exit 2 ;;
  esac
done
wait
echo "[ablations] runs done in $(( $(date +%s) - t0 )) s"

if [[ " $sweeps " == *" muon_vs_adamw "* ]]; then  # the comparison at each arm's tuned lrs
  adamw=$(best "$root/muon_vs_adamw_tuning/adamw" "optim.adamw.lr=0.001")
  muon=$(best "$root/muon_vs_adamw_tuning/muon_split" "optim.lr=0.02 optim.adamw.lr=0.001")
  echo "[ablations] muon_vs_adamw at the tuned lrs: adamw arm: $adamw; muon_split arm: $muon" | tee "$out/tuned_lrs.txt"
  t0=$(date +%s)
  groups+=(muon_vs_adamw)
  for seed in ${seeds//,/ }; do
    job muon_vs_adamw "$(label adamw $adamw)_s$seed" experiment=muon_vs_adamw optim=adamw $adamw seed="$seed"
    job muon_vs_adamw "$(label muon_split $muon)_s$seed" experiment=muon_vs_adamw optim=muon_split $muon seed="$seed"
  done
  wait
  echo "[ablations] muon_vs_adamw done in $(( $(date +%s) - t0 )) s"
fi

for group in "${groups[@]}"; do
  echo "== $group"
  python recipes/compare_runs.py "$root/$group" 2>&1 | sed '/^## Runs/,$d' | grep -v '^$'
done
tar czf "$out/ablations.tgz" --exclude='wandb' --exclude='*.log' "$root"
