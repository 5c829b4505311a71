"""Benchmark: the fused Gram loop (one program per matrix) against the same loop one launch per product.

    python recipes/bench_fused_gram.py --shapes 128x256x1024,189x512x768 --out outputs/bench_fused_gram.json

For each bucket shape (batch x m x n, m <= n; float16 in, bf16 out, 5 Keller steps with the Gram form's
restarts, as `newton_schulz(method="gram")` runs it) it times, with CUDA events, median of repeats:

* products: `iterations._iterate_gram` on the plan the optimizer would use for the shape, each product on its
  fastest kernel, launched from Python (eager) and replayed from a CUDA graph (what the captured optimizer
  step runs: no host time between products);
* fused: `fused_gram.launch_fused_gram` with each tile of `fused_gram.TILE_CANDIDATES` (one launch);

and the symmetric FLOP floor at the measured bf16 peak (`bench_newton_schulz.symmetric_flops`), the plan's
choice, and each result's relative error against the float64 iteration (`gram_iterations_torch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="128x256x1024,64x256x1024,189x512x768,32x512x2048,16x384x1024")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_fused_gram.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fused_gram: needs a CUDA GPU")

    from bench_newton_schulz import measure_peak_tflops, parse_shapes, symmetric_flops, time_ms
    from muon_recipes.optim.kernels import fused_gram, iterations
    from muon_recipes.optim.newton_schulz import coefficients, gram_iterations_torch, gram_restarts

    steps = 5
    coeffs = tuple(coefficients("keller", steps))
    restarts = gram_restarts(steps)
    peak = measure_peak_tflops()
    print(f"{torch.cuda.get_device_name()}: cuBLAS bf16 peak {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for batch, m, n in parse_shapes(args.shapes):
        X = torch.randn(batch, m, n, device="cuda", dtype=torch.float64)
        X = (X / X.norm(dim=(-2, -1), keepdim=True))
        exact = gram_iterations_torch(X, coeffs, restarts)
        X = X.to(torch.float16)

        def error(result):
            return ((result.double() - exact).norm() / exact.norm()).item()

        plan = iterations._plan_for(X, coeffs, "auto", restarts, torch.bfloat16)
        products = dataclasses.replace(plan, loop="products")
        loop = iterations._loop_on(coeffs, restarts, torch.bfloat16)(products)
        captured = iterations._CapturedNewtonSchulz(X, loop)
        row = {"shape": f"{batch}x{m}x{n}", "floor_ms": symmetric_flops(batch, m, n, steps) / (peak * 1e12) * 1e3,
               "plan": dataclasses.asdict(plan),
               "products_eager_ms": time_ms(lambda: loop(X))["median_ms"],
               "products_graph_ms": time_ms(lambda: captured(X))["median_ms"],
               "products_error": error(loop(X)), "fused": {}}
        out = torch.empty(X.shape, dtype=torch.bfloat16, device="cuda")
        for tile in fused_gram.TILE_CANDIDATES:
            label = "x".join(map(str, tile[:3])) + f"/w{tile[3]}/s{tile[4]}"
            try:
                run = lambda: fused_gram.launch_fused_gram(X, coeffs, restarts, out, tile=tile)  # noqa: E731
                row["fused"][label] = {"ms": time_ms(run)["median_ms"], "error": error(run())}
            except Exception as failure:   # noqa: BLE001 - report and go on with the other tiles
                row["fused"][label] = {"failed": f"{type(failure).__name__}: {str(failure)[:300]}"}
        rows.append(row)
        timed = {k: v["ms"] for k, v in row["fused"].items() if "ms" in v}
        best = min(timed, key=timed.get) if timed else None
        print(f"{row['shape']}: floor {row['floor_ms']:.3f} ms | products eager {row['products_eager_ms']:.3f}, "
              f"graph {row['products_graph_ms']:.3f} (error {row['products_error']:.2e}) | fused best "
              + (f"{timed[best]:.3f} ms [{best}] = {timed[best] / row['floor_ms']:.2f}x floor "
                 f"(error {row['fused'][best]['error']:.2e})" if best else "none")
              + f" | plan loop={plan.loop}", flush=True)
        for label, result in row["fused"].items():
            print(f"    {label}: {result}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "peak_tflops": peak, "rows": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
