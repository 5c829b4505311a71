#!/usr/bin/env bash
# The per-expert MoE crash: moe_small with `optim.split.experts=per_expert` once died with "CUDA error: an illegal
# memory access" early in training (first job of its process, H200, backend=torch, no compile), fused experts never.
# Cause found by reading: FastLaunch kept the launch grid of a kernel's first launch per specialization, and the
# transposed bucket copy passes its batch count only through the grid, so the shared expert's one-matrix gate/up
# copies (same sizes and strides as the routed experts' [8, 768, 512] halves) ran over eight matrices: reads and
# writes seven matrices past both tensors. Fixed in kernels/fast_launch.py; this script checks the fix on a GPU.
#
# Usage: bash recipes/gpu_moe_per_expert_check.sh OUT_DIR      (under 4 minutes on one H200)
# Each configuration is the first job of a fresh process (the crash needed a fresh allocator), in this order:
#   blocking   per_expert, CUDA_LAUNCH_BLOCKING=1 (an error is raised by the op that faulted: its Python stack),
#              the eager optimizer step (optim.cuda_graph=off, the only step the crashing commit 3f23e12 had)
#   async      per_expert, launches asynchronous (as in the original crash), optim.cuda_graph at its default
#   tests      the GPU tests of the suspects: FastLaunch grids, the bucket copy and normalization past their
#              batch, empty expert groups of torch._grouped_mm at moe_small's sizes against the per-expert loop
#   memcheck   per_expert under `compute-sanitizer --tool memcheck`, MEMCHECK_STEPS steps, the caching allocator
#              off (where compute-sanitizer is installed)
#   nograph    per_expert, optim.cuda_graph=off, launches asynchronous
#   nofast     per_expert, MUON_NS_FAST_LAUNCH=0 (every Triton launch through Triton's own dispatch)
#   fused      optim.split.experts=fused (the control that never crashed)
#   bpe        per_expert on the site-packages corpus with its 32k BPE (the original data; ~1 min to prepare)
# Runs use data.scope=stdlib data.tokenizer=byte (nothing heavy to prepare). Stages that no longer fit in BUDGET
# seconds (default 230; BUDGET=600 runs them all) are skipped and said so. A run its time limit stops before
# STEPS without an error counts as no crash (its last logged step is printed). Last lines: the verdict, and for
# every configuration that crashed its log, the first CUDA error line, the Python stack of the failing op and,
# under memcheck, the first invalid access with its kernel name.
#   STAGES (default all of the above), STEPS (60), MEMCHECK_STEPS (2), BUDGET (230),
#   EXTRA: overrides added to every run (a CPU dry run: tests/recipes/test_gpu_moe_per_expert_check.py).
# The cause on the commit that crashed, from a worktree of it (the script runs `train.py` of the current directory):
#   git worktree add /tmp/at-3f23e12 3f23e12 && cd /tmp/at-3f23e12 &&
#   STAGES="blocking nofast memcheck" bash <this tree>/recipes/gpu_moe_per_expert_check.sh OUT
# blocking is expected to crash in copy_block -> copy_transposed (orthogonalize.py), nofast (the same run with
# every launch through Triton's dispatch) not to, and memcheck to name _transposed_copy_kernel.
set -u
out=${1:-gpu_out/moe_per_expert}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
work=${WORK:-outputs/moe_per_expert_check}
export MUON_RECIPES_CACHE=${MUON_RECIPES_CACHE:-$work/data-cache}
steps=${STEPS:-60}
memcheck_steps=${MEMCHECK_STEPS:-2}
budget=${BUDGET:-230}
extra=${EXTRA:-}
started=$(date +%s)
base="experiment=moe_per_expert seed=0 train.compile=false optim.backend=torch train.eval_every=0
      logging.wandb.mode=disabled logging.progress=false"
small_data="data.scope=stdlib data.tokenizer=byte"
# The eager optimizer step; a tree from before the CUDA-graph step (e.g. 3f23e12) has no such key and only that step.
graph_off=$(grep -qs "^cuda_graph:" conf/optim/muon_split.yaml && echo optim.cuda_graph=off)
crashed=()
passed=()
stopped=()
skipped=()
errors="illegal memory access|AcceleratorError|CUDA error|misaligned address|device-side assert"

left() { echo $(( budget - ($(date +%s) - started) )); }

# limit for a stage: its own limit, or what is left of the budget if less; 0 when under `need` seconds are left
limit_for() {  # own limit, seconds the stage needs at least
  local remaining=$(left)
  if [ "$remaining" -lt "$2" ]; then echo 0; elif [ "$remaining" -lt "$1" ]; then echo "$remaining"; else echo "$1"; fi
}

report_failure() {  # name, log, exit status
  local name=$1 log=$2 status=$3
  echo "!! $name: CRASHED (exit $status); log $log"
  grep -m1 -nE "$errors" "$log" \
    | sed 's/^/   first error: /' | cut -c1-300
  # The Python stack of the failing op: the last traceback of the log (under CUDA_LAUNCH_BLOCKING=1 it ends at
  # the op that faulted; without it, at the first host sync after it).
  awk '/^Traceback/ {buf=""; on=1} on {buf = buf $0 "\n"} END {printf "%s", buf}' "$log" | tail -n 40 \
    | sed 's/^/   | /'
  # compute-sanitizer: the first invalid access, its kernel and where the access fell.
  grep -m1 -A6 -E "^========= Invalid" "$log" | sed 's/^/   memcheck: /' | cut -c1-300
}

run_config() {  # name, own limit (s), minimum (s), environment (VAR=value ...), -- , command...
  local name=$1 own=$2 need=$3; shift 3
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local limit=$(limit_for "$own" "$need")
  if [ "$limit" -eq 0 ]; then
    echo "== $name: skipped ($(left) s of the ${budget} s budget left)"
    skipped+=("$name")
    return
  fi
  local log="$out/$name.log" t0=$(date +%s)
  echo "== $name (limit $limit s): ${envs[*]:-} $*" | cut -c1-400
  env "${envs[@]}" timeout -k 10 "$limit" "$@" > "$log" 2>&1
  local status=$?
  echo "   exit $status in $(( $(date +%s) - t0 )) s"
  grep -E "^step [0-9]+ " "$log" | tail -n 1 | cut -c1-200 | sed 's/^/   last: /'
  if [ "$status" -eq 0 ]; then
    passed+=("$name")
  elif { [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; } \
       && ! grep -qE "$errors|^Traceback|^========= Invalid" "$log"; then
    echo "   stopped by its time limit without an error"
    stopped+=("$name")
  else
    crashed+=("$name")
    report_failure "$name" "$log" "$status"
  fi
}

train_args() {  # run name, steps, overrides...
  local name=$1 n=$2; shift 2
  echo python train.py $base train.steps="$n" "$@" $extra run_dir="$work/runs/$name"
}

rm -rf "$work/runs"
for stage in ${STAGES:-blocking async tests memcheck nograph nofast fused bpe}; do
  case $stage in
    blocking)
      run_config blocking 75 30 CUDA_LAUNCH_BLOCKING=1 -- \
        $(train_args blocking "$steps" optim.split.experts=per_expert $graph_off $small_data) ;;
    async)
      run_config async 60 30 CUDA_LAUNCH_BLOCKING=0 -- \
        $(train_args async "$steps" optim.split.experts=per_expert $small_data) ;;
    nograph)
      run_config nograph 60 30 CUDA_LAUNCH_BLOCKING=0 -- \
        $(train_args nograph "$steps" optim.split.experts=per_expert $graph_off $small_data) ;;
    nofast)
      run_config nofast 60 30 MUON_NS_FAST_LAUNCH=0 -- \
        $(train_args nofast "$steps" optim.split.experts=per_expert $small_data) ;;
    fused)
      run_config fused 60 30 CUDA_LAUNCH_BLOCKING=0 -- \
        $(train_args fused "$steps" optim.split.experts=fused $small_data) ;;
    tests)
      run_config tests 90 20 CUDA_LAUNCH_BLOCKING=0 -- bash -c "python -m pytest -q -x -p no:cacheprovider \
        tests/optim/test_fast_launch.py tests/optim/test_kernels_gpu.py \
        -k 'grid or first_launch or own_batch or own_matrices or stays_in_bounds' \
        && python -m pytest -q -x -p no:cacheprovider tests/models/test_moe.py -k empty_expert" ;;
    memcheck)
      if ! command -v compute-sanitizer > /dev/null; then
        echo "== memcheck: skipped (no compute-sanitizer on PATH)"
        skipped+=(memcheck)
        continue
      fi
      # Few steps: every kernel runs instrumented. The caching allocator is off so an access past a tensor falls
      # outside any allocation and is reported, instead of landing in a cached neighbour.
      run_config memcheck 120 60 PYTORCH_NO_CUDA_MEMORY_CACHING=1 -- \
        compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 3 \
        $(train_args memcheck "$memcheck_steps" optim.split.experts=per_expert $graph_off $small_data) ;;
    bpe)
      run_config bpe 120 100 CUDA_LAUNCH_BLOCKING=0 -- $(train_args bpe "$steps" optim.split.experts=per_expert) ;;
    *) echo "STAGES: unknown stage '$stage' (blocking async nograph nofast fused tests memcheck bpe)" >&2; exit 2 ;;
  esac
done

echo
echo "passed: ${passed[*]:-none} | stopped by the time limit without an error: ${stopped[*]:-none} |" \
  "crashed: ${crashed[*]:-none} | skipped: ${skipped[*]:-none} | $(( $(date +%s) - started )) s"
if [ ${#crashed[@]} -gt 0 ]; then
  for name in "${crashed[@]}"; do report_failure "$name" "$out/$name.log" 1 | head -n 1; done
  echo "VERDICT: CRASH in ${crashed[*]} (stacks above; logs in $out)"
  exit 1
fi
echo "VERDICT: no crash in ${passed[*]:-} ${stopped[*]:-}"
