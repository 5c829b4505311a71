#!/usr/bin/env bash
# One training command run from two source trees, alternately, on one GPU: whether a change moved tokens/s by more
# than the spread between repeats of the same tree (step times of one moe_small run range over +-15%).
# Usage: bash recipes/ab_throughput.sh BASE_TREE OUT_DIR [train.py overrides...]
#   BASE_TREE  a checkout of the baseline: `git worktree add /tmp/base <commit>`, or on a machine without the
#              repository's history `git archive <commit> | tar -x -C DIR` made beforehand; the candidate is the
#              current directory. Both read the same data cache (MUON_RECIPES_CACHE) and kernel caches.
#   ROUNDS (default 2): base, candidate, base, candidate, ...; STEPS (30) steps each; LIMIT (120) seconds per run.
#   PROFILE=1: after the runs, recipes/profile_step.py of each tree with the same overrides (the base tree runs
#              the candidate's profiler, so both report where the GPU waits for the host) -> OUT_DIR/profile_*.md
# Default overrides: model=moe_small optim=adamw, standard-library text through the byte tokenizer (the recipe's
# model and batch, nothing to prepare), no evaluation. The table is recipes/recipe_runs_table.py's, one row per run
# (medians over the logged steps after the first), then the median over each tree's runs.
set -u
base=$(cd "${1:?usage: ab_throughput.sh BASE_TREE OUT_DIR [overrides...]}" && pwd)
out=${2:?usage: ab_throughput.sh BASE_TREE OUT_DIR [overrides...]}
shift 2
overrides=("$@")
[ ${#overrides[@]} -eq 0 ] && overrides=(model=moe_small optim=adamw)
here=$(pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
export MUON_RECIPES_CACHE=${MUON_RECIPES_CACHE:-$here/outputs/ab_throughput/data-cache}
common=(data.scope=stdlib data.tokenizer=byte train.eval_every=0 train.log_every=5 logging.wandb.mode=disabled
        logging.progress=false)
runs=()
for round in $(seq 1 "${ROUNDS:-2}"); do
  for side in base candidate; do
    tree=$here
    [ "$side" = base ] && tree=$base
    run=$out/runs/$side-$round
    rm -rf "$run"
    start=$(date +%s)
    (cd "$tree" && timeout -k 5 "${LIMIT:-120}" python train.py "${common[@]}" train.steps="${STEPS:-30}" \
      "${overrides[@]}" run_dir="$run" > "$out/$side-$round.log" 2>&1)
    echo "$side round $round: exit $? in $(( $(date +%s) - start )) s"
    runs+=("$run")
  done
done
python recipes/recipe_runs_table.py "${runs[@]}" | cut -d'|' -f1-6 | sed 's/ *$//' | tee "$out/table.md"
python - "$out/table.md" <<'PY' | tee -a "$out/table.md"
import statistics, sys
rows = [line.split("|") for line in open(sys.argv[1]) if line.startswith("| base-") or line.startswith("| candidate-")]
by_side = {}
for cells in rows:
    by_side.setdefault(cells[1].strip().split("-")[0], []).append(float(cells[4].replace(",", "")))
if len(by_side) == 2:
    base, cand = statistics.median(by_side["base"]), statistics.median(by_side["candidate"])
    print(f"\nmedian tokens/s: base {base:,.0f} ({len(by_side['base'])} runs), candidate {cand:,.0f} "
          f"({len(by_side['candidate'])} runs): {100 * (cand / base - 1):+.1f}%")
PY
if [ "${PROFILE:-0}" = 1 ]; then
  for side in base candidate; do
    tree=$here
    if [ "$side" = base ]; then  # the candidate's profiler (and its report) on the base tree's trainer
      tree=$out/base-with-profiler
      rm -rf "$tree" && cp -r "$base" "$tree"
      cp "$here/recipes/profile_step.py" "$tree/recipes/" && cp "$here/muon_recipes/train/profiling.py" "$tree/muon_recipes/train/"
    fi
    (cd "$tree" && timeout -k 5 "${LIMIT:-120}" python recipes/profile_step.py "${common[@]}" "${overrides[@]}" \
      --warmup 3 --steps 5 --markdown "$out/profile_$side.md" > "$out/profile_$side.log" 2>&1)
    echo "profile $side: exit $?"
    grep -E "ms/step, |GPU idle|GPU kernel time" "$out/profile_$side.md" 2>/dev/null | cut -c1-250
    grep -A5 "CUDA runtime call" "$out/profile_$side.md" 2>/dev/null
  done
  rm -rf "$out/base-with-profiler"
fi
