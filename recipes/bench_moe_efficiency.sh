#!/usr/bin/env bash
# The MoE layer's efficiency on one GPU, against the targets of issue 19, in one bounded command.
# Usage: bash recipes/bench_moe_efficiency.sh OUT_DIR
#
# Stages, in order of importance, each a separate process under `timeout`; the whole script stops starting stages
# when BUDGET seconds (default 280) are spent, and a stage that did not finish is a row of dashes in the table:
#   tests        the MoE GPU tests (bf16 grouped GEMM against the per-expert loop and float64, no host sync in a
#                training step of the layer, fp32 weights under autocast; the compiled loss against float64)
#   small-adamw  the trainer, SMALL (moe_small) at its recipe (compile, bf16, 32 x 1024 micro-batch), AdamW
#   medium       the trainer, MEDIUM (moe_medium) at its recipe, AdamW
#   dense        the trainer, DENSE (dense_medium: as many active parameters, the same recipe), AdamW
#   profile      recipes/profile_step.py on SMALL, AdamW: the kernel table of one training step -> OUT/moe_profile.md
#   small-muon   the trainer, SMALL at its recipe with muon_split (its first step tunes the Newton-Schulz tiles:
#                up to a minute on a machine that never ran them, hence last)
#   table        recipes/moe_efficiency_table.py -> OUT/moe_efficiency.md (tokens/s, active MFU, targets)
# AdamW keeps the optimizer out of the MoE-vs-dense comparison. Every run reads the standard library through the
# byte tokenizer (data.scope=stdlib data.tokenizer=byte: no BPE fitting; the models keep their 32k vocabulary, so
# the work per token is the recipe's). Knobs: SMALL, MEDIUM, DENSE (model names), STEPS_SMALL (30), STEPS_MEDIUM (8),
# BUDGET, WORK (run directories and the data cache, default outputs/moe_efficiency), EXTRA (overrides added to every run:
# the CPU dry run in tests/recipes/test_bench_moe_efficiency.py).
set -u
out=${1:-moe_efficiency_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
work=${WORK:-outputs/moe_efficiency}
export MUON_RECIPES_CACHE=${MUON_RECIPES_CACHE:-$work/data-cache}
small=${SMALL:-moe_small} medium=${MEDIUM:-moe_medium} dense=${DENSE:-dense_medium}
steps_small=${STEPS_SMALL:-30} steps_medium=${STEPS_MEDIUM:-8}
extra=${EXTRA:-}
deadline=$(( $(date +%s) + ${BUDGET:-280} ))
common="logging.wandb.mode=disabled logging.progress=false data.scope=stdlib data.tokenizer=byte train.eval_every=0"

stage() {  # name, most seconds, command...: runs it with what is left of the budget, at most the given seconds
  local name=$1 most=$2; shift 2
  local limit=$(( deadline - $(date +%s) ))
  [ "$limit" -gt "$most" ] && limit=$most
  if [ "$limit" -lt 10 ]; then
    echo "$name: not run (budget of ${BUDGET:-280} s spent)"
    return
  fi
  local start=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code in $(( $(date +%s) - start )) s (limit $limit s)$([ $code -eq 124 ] && echo ', timed out')"
  grep -E "^(recipe|optimizer:)|passed|failed|skipped|rror" "$out/$name.log" | grep -v "^ " | cut -c1-300 | tail -5
}

train() {  # stage name, most seconds, overrides...
  local name=$1 most=$2; shift 2
  rm -rf "$work/runs/$name"
  stage "$name" "$most" python train.py $common "$@" $extra run_dir="$work/runs/$name"
}

python -c "import torch, time; print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
  '| torch', torch.__version__, '| date', time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))" | tee "$out/device.txt"
stage tests 90 python -m pytest -q -m gpu tests/models/test_moe.py tests/train/test_loss.py -p no:cacheprovider
train small-adamw 90 model=$small optim=adamw train.steps=$steps_small train.log_every=5
train medium 100 model=$medium optim=adamw train.steps=$steps_medium train.log_every=2
train dense 80 model=$dense optim=adamw train.steps=$steps_medium train.log_every=2
stage profile 75 python recipes/profile_step.py model=$small optim=adamw $common $extra --warmup 3 --steps 5 \
  --markdown "$out/moe_profile.md" --json "$out/moe_profile.json"
train small-muon 110 model=$small optim=muon_split train.steps=$steps_small train.log_every=5

echo
python recipes/moe_efficiency_table.py --small "$work/runs/small-adamw" "$work/runs/small-muon" \
  --medium "$work/runs/medium" --dense "$work/runs/dense" | tee "$out/moe_efficiency.md"
echo
if [ -f "$out/moe_profile.md" ]; then cat "$out/moe_profile.md"; else echo "profile: not finished (see $out/profile.log)"; fi
