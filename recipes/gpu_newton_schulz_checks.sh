#!/usr/bin/env bash
# Newton-Schulz on one GPU: the kernel and Muon GPU tests, the optimizer step of the dense_1b and moe_small
# parameter sets with the Gram form (default) and the standard form, the per-shape Newton-Schulz benchmark, and
# the Gram-vs-standard training ablation. Everything lands in OUT_DIR.
# Usage: bash recipes/gpu_newton_schulz_checks.sh OUT_DIR
#   STAGES picks the stages, default "tests optimizer shapes"; "buckets" times each product of the dense_1b
#   buckets; "ablation" runs SWEEPS=ns_method of
#   recipes/gpu_ablations.sh; "trace" profiles the dense_1b step (kernel table beside the JSON).
set -u
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
for stage in ${STAGES:-tests optimizer shapes}; do
  start=$(date +%s)
  case $stage in
    tests)
      # The Gram-form tests first (-k), so a short time limit still reaches them; then the rest.
      timeout 240 python -m pytest -q -m gpu -k "gram or commuting" --tb=short tests/optim/test_kernels_gpu.py \
        > "$out/gpu_tests_gram.log" 2>&1
      timeout 300 python -m pytest -q -m gpu -k "not gram and not commuting" --tb=short \
        tests/optim/test_kernels_gpu.py tests/optim/test_muon_gpu.py > "$out/gpu_tests.log" 2>&1
      grep -hE "passed|failed|Error|assert" "$out/gpu_tests_gram.log" "$out/gpu_tests.log" | tail -20 ;;
    newtests)   # only the Gram-form, every-tile, momentum, weight-update and Muon GPU tests
      timeout 300 python -m pytest -q -m gpu -k "gram or commuting or symmetric_tile or momentum or scaled_add or muon" --tb=short \
        tests/optim/test_kernels_gpu.py tests/optim/test_muon_gpu.py > "$out/gpu_tests_new.log" 2>&1
      grep -hE "passed|failed|Error|assert" "$out/gpu_tests_new.log" | tail -20 ;;
    optimizer)
      timeout 300 python recipes/bench_optimizer.py --model dense_1b,moe_small \
        --optimizers muon,muon_standard,adamw_fused --steps 10 --warmup 3 --out "$out/bench_optimizer.json" \
        2>&1 | tail -12 ;;
    trace)
      timeout 200 python recipes/bench_optimizer.py --model dense_1b --optimizers muon --steps 5 --warmup 3 \
        --trace --out "$out/trace.json" 2>&1 | tail -8 ;;
    buckets)   # the dense_1b buckets with the per-kernel breakdown (bf16 standard products, fp16 Gram products)
      timeout 200 python recipes/bench_newton_schulz.py --no-compile --out "$out/bench_ns_buckets" \
        --shapes 48x2048x5632,32x2048x2048,32x512x2048 --schedules keller 2>&1 | grep -E "breakdown|floor" ;;
    shapes)
      timeout 300 python recipes/bench_newton_schulz.py --no-compile --no-breakdown --out "$out/bench_ns" \
        --shapes 48x2048x5632,32x2048x2048,32x512x2048,1x4096x14336,1x4096x4096,64x768x2048,128x256x1024,1x512x2048 \
        2>&1 | tail -14 ;;
    ablation)
      SWEEPS=ns_method bash recipes/gpu_ablations.sh "$out" 2>&1 | tail -20 ;;
  esac
  echo "== $stage: $(( $(date +%s) - start )) s"
done
