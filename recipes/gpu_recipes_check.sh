#!/usr/bin/env bash
# The recipes at GPU scale on one GPU, and the data they train on.
# Usage: bash recipes/gpu_recipes_check.sh OUT_DIR
#   STAGES   default "data coldwarm recipes literal":
#     data      prepare the recipes' corpus (site-packages) and 32k BPE: sizes, cold then warm preparation time
#     coldwarm  moe_small + muon_split with empty Triton and inductor caches (cold), then again (warm): the first
#               optimizer step's seconds against the targets (cold < 10 s, warm < 3 s), its kernel-tile line (tile
#               choices, searches, compilations, seconds), time to the first step and the optimizer's ms per later
#               step (coldwarm.md)
#     tiles     recipes/bench_tile_search.py on moe_small's buckets: each MUON_NS_AUTOTUNE mode cold (and bounded
#               warm), first-pass seconds and steady Newton-Schulz ms per step, bounded against full (tile_search.md)
#     recipes   each model of MODELS with each optimizer of OPTIMS for STEPS steps of its recipe; then the table
#               (tokens/s, MFU, optimizer share, time to first step, projected wall time: recipe_runs_table.py)
#     literal   `python train.py model=moe_small optim=muon_split` until its fifth evaluation (eval_bpb each time)
#   MODELS (default "dense_small gqa_small moe_small moe_medium dense_1b"), OPTIMS ("adamw muon_split"), STEPS (20),
#   EXTRA: overrides added to every run (a CPU dry run: see tests/recipes/test_gpu_recipes_check.py).
set -u
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
work=${WORK:-outputs/recipes_check}
export MUON_RECIPES_CACHE=${MUON_RECIPES_CACHE:-$work/data-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$work/triton-cache} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$work/inductor-cache}
steps=${STEPS:-20}
extra=${EXTRA:-}
common="logging.wandb.mode=disabled logging.progress=false"

train() {  # run name, time limit (s), overrides...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" python train.py $common "$@" $extra run_dir="$work/runs/$name" > "$out/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - start )) s"
  grep -E "^(recipe|optimizer:|data:)|^step (1|$steps) |rror" "$out/$name.log" | cut -c1-400
}

for stage in ${STAGES:-data coldwarm recipes literal}; do
  case $stage in
    data)
      for pass in cold warm; do
        echo "== data, $pass"
        python recipes/prepare_data.py model=moe_small $extra --json "$out/data_$pass.json" 2>&1 | grep -v "Tokenizing"
      done ;;
    coldwarm)
      rm -rf "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
      # Triton prints each tile search it runs (kernel, problem key, seconds): where a cold first step goes. Every
      # step is logged (train.log_every=1), so each one's optimizer time is measured.
      TRITON_PRINT_AUTOTUNING=1 train moe_small-muon_split-cold 300 model=moe_small optim=muon_split \
        train.steps=$steps train.log_every=1
      train moe_small-muon_split-warm 300 model=moe_small optim=muon_split train.steps=$steps train.log_every=1
      python - "$work/runs" "$out" <<'PY' | tee "$out/coldwarm.md"
import json, os, statistics, sys
runs, out = sys.argv[1], sys.argv[2]
targets = {"cold": 10.0, "warm": 3.0}   # issue 14: seconds of moe_small's first optimizer step on one H200
print("| start | optimizer first step (s) | target | time to first step (s) | optimizer per step, steps 2+ (ms, median) |")
print("|---|---:|---:|---:|---:|")
for start in ("cold", "warm"):
    path = os.path.join(runs, f"moe_small-muon_split-{start}", "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    rows = [r for r in rows if "optim_time_s" in r]
    if not rows:
        print(f"| {start} | no metrics ({path}) | | | |")
        continue
    first, later = rows[0], [r["optim_time_s"] for r in rows[1:]]
    verdict = "met" if first["optim_time_s"] < targets[start] else "MISSED"
    steady = f"{1e3 * statistics.median(later):.1f}" if later else "-"
    ttfs = first.get("time_to_first_step_s")
    print(f"| {start} | {first['optim_time_s']:.2f} | < {targets[start]:.0f} s: {verdict} | "
          f"{'-' if ttfs is None else f'{ttfs:.1f}'} | {steady} |")
for start in ("cold", "warm"):   # the optimizer's own line: tile choices, searches, compilations and their seconds
    log = os.path.join(out, f"moe_small-muon_split-{start}.log")
    lines = [l.strip() for l in open(log)] if os.path.exists(log) else []
    print(f"{start}: " + next((l for l in lines if l.startswith("optimizer: first step")), "no 'optimizer: first step' line"))
PY
      ;;
    tiles)
      # moe_small's buckets alone, one fresh process per MUON_NS_AUTOTUNE mode: first-pass seconds, searches and
      # compilations, and the steady Newton-Schulz time per step (bounded against the full search). < 3 minutes.
      timeout 175 python recipes/bench_tile_search.py --model moe_small --out "$out/tile_search.json" \
        | tee "$out/tile_search.md" ;;
    recipes)
      runs=()
      for model in ${MODELS:-dense_small gqa_small moe_small moe_medium dense_1b}; do
        for optim in ${OPTIMS:-adamw muon_split}; do
          [ -d "$work/runs/$model-$optim-warm" ] && { runs+=("$work/runs/$model-$optim-warm"); continue; }
          train "$model-$optim" 300 model=$model optim=$optim train.steps=$steps
          runs+=("$work/runs/$model-$optim")
        done
      done
      python recipes/recipe_runs_table.py "${runs[@]}" | tee "$out/recipes_table.md" ;;
    literal)
      # The recipe as is, stopped by its token count after the fifth evaluation (eval_every 50: step 250), so
      # its schedule is the full recipe's.
      train moe_small-literal 420 model=moe_small optim=muon_split train.tokens=$((250 * 131072))
      python - "$work/runs/moe_small-literal/metrics.jsonl" <<'PY' | tee "$out/literal_evals.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
evals = [(r["step"], r["eval_loss"], r.get("eval_bpb")) for r in rows if "eval_loss" in r]
print("| step | eval loss | eval bpb |\n|---:|---:|---:|")
for step, loss, bpb in evals:
    print(f"| {step} | {loss:.4f} | {bpb:.4f} |")
bpbs = [b for _, _, b in evals[:5]]
print("eval bpb falls at every one of the first five evaluations:", all(b < a for a, b in zip(bpbs, bpbs[1:])))
PY
      ;;
    *) echo "STAGES: unknown stage '$stage' (data, coldwarm, tiles, recipes, literal)" >&2; exit 2 ;;
  esac
done
