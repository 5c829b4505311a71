"""Benchmark: Newton-Schulz on the Triton kernels beside torch eager, torch.compile and the symmetric floor.

    python recipes/bench_newton_schulz.py --out outputs/bench_ns

For each shape (batch x m x n, m <= n; bf16; 5 iterations of Keller Jordan's quintic by default) it times:

* torch eager: the 3-line loop `A = X X^T; B = b A + c A A; X = a X + B X`,
* torch.compile of the same loop,
* ours: `ns_iterations_triton` (kernels="auto": each product on the Triton kernel or cuBLAS, whichever was
  faster for the shape), launched from Python and replayed from a CUDA graph; and with every product on the
  Triton kernels (kernels="triton"),
* ours, Gram form: `gram_iterations_triton` in float16 with its restarts (what `newton_schulz(method="gram")`
  runs on non-square blocks; square shapes are skipped, they keep the standard form), eager and from a graph,

with CUDA events around each whole Newton-Schulz, after warm-up (compilation and autotuning excluded),
reporting the median of several runs. The floor is the symmetric FLOP count, 3 m^2 n + m^3 per iteration
and matrix (X X^T and A A are symmetric, so half of each suffices; B X is a full 2 m^2 n), at the bf16
matmul peak measured in the same run with a large cuBLAS product; each row also gives its ratio to the sustained
floor, at the rate the same products keep after `SUSTAIN_S` seconds (the board at its power limit, as a loop
timed over many repeats is). A per-kernel breakdown gives each kernel's
time and rate, and cuBLAS on the same products.

Orthogonality: for every schedule, the singular-value band (min, max) of the result of ours, of ours in the
Gram form and of the torch loop with the same coefficients (singular values from the eigenvalues of the fp32 Gram matrix of up to
`--band-matrices` matrices per shape).

Writes `results.json` and `newton_schulz.png` to `--out` and prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KELLER = (3.4445, -4.7750, 2.0315)
# Amsel, Persson, Musco, Gower 2025, "The Polar Express", arXiv:2505.16932 (with their 1.01 safety factor
# applied to all but the last step); used only when muon_recipes.optim.newton_schulz does not provide it.
_POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
)
DEFAULT_SHAPES = "1x8192x8192,1x4096x14336,1x4096x4096,64x768x2048,128x256x1024,1x512x2048"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            batch, m, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not BATCHxMxN (e.g. 64x768x2048)") from None
        if m > n:
            raise SystemExit(f"--shapes: {item!r} has m > n; give the transposed shape (m <= n)")
        shapes.append((batch, m, n))
    return shapes


def schedule_coefficients(name: str, steps: int) -> list[tuple[float, float, float]]:
    """Coefficients from the project's schedules when available, else the two built in here."""
    try:
        from muon_recipes.optim.newton_schulz import coefficients
        return [tuple(c) for c in coefficients(name, steps)]
    except (ImportError, AttributeError):
        pass
    if name == "keller":
        return [KELLER] * steps
    if name == "polar_express":
        table = list(_POLAR_EXPRESS)
        scaled = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in table]
        return (scaled + [(1.875, -1.25, 0.375)] * steps)[:steps]
    raise SystemExit(f"--schedules: unknown schedule {name!r} (keller, polar_express)")


def torch_iterations(X: torch.Tensor, coefficients) -> torch.Tensor:
    """The reference loop, written out here so the benchmark depends on no other implementation."""
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


def torch_iterations_baddbmm(X: torch.Tensor, coefficients) -> torch.Tensor:
    """The same loop with each scale-and-add fused into its cuBLAS product: the stronger eager baseline."""
    for a, b, c in coefficients:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X


def time_ms(fn, *, min_repeats: int = 5, max_repeats: int = 200, budget_s: float = 0.5, warmup: int = 3) -> dict:
    """Median (and spread) of CUDA-event timings of fn(), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    repeats = int(min(max_repeats, max(min_repeats, budget_s * 1e3 / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for begin, finish in events:
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize()
    times = sorted(b.elapsed_time(f) for b, f in events)
    return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1], "repeats": repeats}


def captured_ms(fn) -> dict:
    """`time_ms` of fn's kernels captured once in a CUDA graph and replayed: the loop as the captured optimizer step
    runs it, inside the step's graph on the step's own buffers. (`cuda_graph=True` is a runner for eager callers,
    which also copies X into its graph and the result out: 0.09 ms of the small-expert bucket's 0.7 ms on an
    H100, docs/benchmarks.md, "Clocks and power".)"""
    fn()   # plans, tiles and compilation outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay)


def host_launch_microseconds(fn, calls: int = 50) -> float:
    """Host time to issue one call (no synchronization inside): the Python + launch overhead per call."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def measure_peak_tflops(size: int = 8192, sustain_s: float = 0.0) -> float:
    """cuBLAS bf16 rate of size^3 products over about a second, after `sustain_s` seconds of the same products.

    Without `sustain_s` this is a burst at the clock the GPU starts from. A loop timed over many repeats runs
    long enough to bring the board to its power limit, where the SM clock drops (one H100: 680-710 W, the
    700 W cap, and 1,245-1,700 MHz instead of 1,980 through dense_1b's step and the 32 x 2048 x 2048 loop,
    docs/benchmarks.md, "Clocks and power"); the sustained rate is the floor such a loop can be held to."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    deadline = time.perf_counter() + sustain_s
    while time.perf_counter() < deadline:
        for _ in range(20):
            torch.mm(a, b)
        torch.cuda.synchronize()
    t = time_ms(lambda: torch.mm(a, b), min_repeats=20, budget_s=1.0, warmup=5)["median_ms"]
    return 2 * size**3 / (t * 1e-3) / 1e12


# Seconds of products before the sustained peak is timed: the board's power reading took about a second to
# climb to its limit on one H100 (nvidia-smi, 100 ms samples); five leave it there.
SUSTAIN_S = 5.0


def symmetric_flops(batch: int, m: int, n: int, steps: int) -> float:
    return steps * batch * (3 * m * m * n + m**3)


def singular_band(Y: torch.Tensor, max_matrices: int) -> tuple[float, float]:
    """(min, max) singular value over the first matrices of Y [B, m, n], m <= n, via the fp32 Gram matrix."""
    Y = Y[:max_matrices].float()
    gram = Y @ Y.mT
    eigenvalues = torch.linalg.eigvalsh(gram.double() if Y.shape[-2] <= 2048 else gram)
    s = eigenvalues.clamp_min(0).sqrt()
    return s.min().item(), s.max().item()


def kernel_breakdown(X: torch.Tensor, coefficients) -> dict:
    """Time of each kernel of one iteration and of the cuBLAS products it replaces (ms, TFLOP/s); the
    commuting product Z Q + a Q is the Gram form's m x m step (timed on A and B, whose shapes it has)."""
    from muon_recipes.optim.kernels import commuting_product, fused_update, symmetric_gram, symmetric_polynomial
    from muon_recipes.optim.kernels.update import launch_update_cublas

    a, b, c = coefficients[0]
    batch, m, n = X.shape
    A = symmetric_gram(X)
    B = symmetric_polynomial(A, b, c)
    out, C = torch.empty_like(X), torch.empty_like(A)
    gram_flops, poly_flops, update_flops = batch * m * m * n, batch * m**3, 2 * batch * m * m * n
    rows = {
        "gram_triton": (lambda: symmetric_gram(X, out=A), gram_flops),
        "gram_cublas": (lambda: torch.bmm(X, X.mT), gram_flops),
        "polynomial_triton": (lambda: symmetric_polynomial(A, b, c, out=B), poly_flops),
        "polynomial_cublas": (lambda: torch.baddbmm(A, A, A, beta=b, alpha=c), poly_flops),
        "update_triton": (lambda: fused_update(X, B, a, out=out), update_flops),
        "update_cublas": (lambda: launch_update_cublas(X, B, a, out), update_flops),
        "commuting_triton": (lambda: commuting_product(B, A, a, out=C), poly_flops),
        "commuting_cublas": (lambda: torch.baddbmm(A, B, A, beta=a, alpha=1.0, out=C), poly_flops),
    }
    from muon_recipes.optim.kernels.symmetric import _symmetric_matmul_kernel
    from muon_recipes.optim.kernels.tuning import tile_label
    from muon_recipes.optim.kernels.update import _update_kernel

    result = {}
    for name, (fn, flops) in rows.items():
        t = time_ms(fn, budget_s=0.2)["median_ms"]
        # Rates use the symmetric count for every row, so cuBLAS's full products show as the same work.
        result[name] = {"ms": t, "symmetric_tflops": flops / (t * 1e-3) / 1e12}
        if name.endswith("_triton"):   # the tile the autotuner chose for this product (its last call)
            kernel = _update_kernel if name.startswith("update") else _symmetric_matmul_kernel
            result[name]["tile"] = tile_label(kernel.best_config)
    result.update(persistent_breakdown(X, A, B, coefficients[0], gram_flops, poly_flops, update_flops))
    return result


# Tiles of the persistent kernels timed by the breakdown, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); a tile
# that does not fit the shape or the shared memory is reported and skipped.
PERSISTENT_TILES = {
    "symmetric": ((128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 2),
                  (128, 128, 128, 8, 2)),
    "update": ((128, 256, 64, 8, 3), (128, 256, 64, 8, 2), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
               (128, 128, 128, 8, 3)),
}


def persistent_breakdown(X, A, B, coefficient, gram_flops, poly_flops, update_flops) -> dict:
    """Each product on the persistent TMA kernels (`kernels/persistent.py`) with each of `PERSISTENT_TILES`:
    its time, its rate, and its largest difference from the pointer kernel's result on the same inputs (zero
    where both tiles reduce in the same blocks; otherwise about one rounding of the output)."""
    from muon_recipes.optim.kernels import persistent
    from muon_recipes.optim.kernels.symmetric import launch_symmetric_matmul
    from muon_recipes.optim.kernels.update import launch_update

    if not persistent.available():
        return {}
    a, b, c = coefficient
    C = torch.empty_like(A)
    products = {   # name -> (kind, operand deciding usability, persistent call, pointer call, flops)
        "gram": ("symmetric", X, lambda t, out: persistent.launch_symmetric(X, out, tile=t),
                 lambda out: launch_symmetric_matmul(X, out), gram_flops, A),
        "polynomial": ("symmetric", A, lambda t, out: persistent.launch_symmetric(A, out, alpha=c, beta=b, c=A, tile=t),
                       lambda out: launch_symmetric_matmul(A, out, alpha=c, beta=b, c=A), poly_flops, C),
        "commuting": ("symmetric", A, lambda t, out: persistent.launch_symmetric(B, out, alpha=1.0, beta=a, c=A, y=A,
                                                                                 tile=t),
                      lambda out: launch_symmetric_matmul(B, out, alpha=1.0, beta=a, c=A, y=A), poly_flops, C),
        "update": ("update", X, lambda t, out: persistent.launch_update(X, B, a, out, tile=t),
                   lambda out: launch_update(X, B, a, out), update_flops, torch.empty_like(X)),
        "q_x": ("update", X, lambda t, out: persistent.launch_update(X, B, 0.0, out, tile=t),
                lambda out: launch_update(X, B, 0.0, out), update_flops, torch.empty_like(X)),
    }
    result = {}
    for name, (kind, operand, run, pointer, flops, out) in products.items():
        reference = torch.empty_like(out)
        pointer(reference)
        for bm, bn, bk, warps, stages in PERSISTENT_TILES[kind]:
            tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
            label = f"{name}_persistent[{bm}x{bn}x{bk}-s{stages}-w{warps}]"
            if not persistent.usable(kind, operand, tile):
                continue
            try:
                out.fill_(float("nan"))
                run(tile, out)
                torch.cuda.synchronize()
                difference = (out.float() - reference.float()).abs().max().item()
                t = time_ms(lambda: run(tile, out), budget_s=0.2)["median_ms"]
            except Exception as error:   # noqa: BLE001 - e.g. out of shared memory: report, go on
                result[label] = {"error": f"{type(error).__name__}: {error}"[:200]}
                continue
            result[label] = {"ms": t, "symmetric_tflops": flops / (t * 1e-3) / 1e12, "max_diff": difference}
    return result


def trace_calls(path: Path, fn, call_ms: float, calls: int = 3) -> None:
    """`calls` calls of `fn` (already warm, `call_ms` each) under torch.profiler after a second of the same calls
    (`stream_timeline.record_steady`), as a Chrome trace at `path`: the loop's kernels one by one and the gaps
    between them (what the sum of its products, timed alone, leaves out)."""
    from stream_timeline import record_steady

    torch.cuda.synchronize()
    record_steady(fn, calls, call_ms / 1e3, cuda=True).export_chrome_trace(str(path))


def plot(rows: list[dict], device: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("torch_eager", "torch eager"), ("torch_baddbmm", "torch eager (baddbmm)"),
               ("torch_compile", "torch.compile"), ("ours", "ours"),
               ("ours_graph", "ours + CUDA graph")]
    labels = [r["shape"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(columns)
    for i, (key, label) in enumerate(columns):
        values = [r[key]["median_ms"] / r["floor_ms"] if r.get(key) else float("nan") for r in rows]
        ax.bar([x + (i - (len(columns) - 1) / 2) * width for x in range(len(rows))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=1, label="floor (symmetric FLOPs at measured peak)")
    ax.axhline(1.25, color="gray", linewidth=1, linestyle="--", label="1.25x floor")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("time / floor (log)")
    ax.set_title(f"Newton-Schulz, 5 iterations, bf16 ({device})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_newton_schulz"))
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BATCHxMxN, m <= n")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--schedules", default="keller,polar_express",
                        help="schedules whose singular-value band is reported (the first one is timed)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves compile time)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-kernel breakdown")
    parser.add_argument("--band-matrices", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", action="store_true",
                        help="also profile 3 graph replays of ours (and of the Gram form) per shape, after a second of "
                             "unrecorded ones, on the timed "
                             "plan and on the Triton kernels only: Chrome traces in --out, for "
                             "recipes/stream_timeline.py --steps 3")
    parser.add_argument("--pieces", default="",
                        help="comma-separated counts of pieces: each loop also timed in a captured step with its batch "
                             "cut into that many pieces, each on its own CUDA stream (MUON_NS_PIECES=N)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_newton_schulz: needs a CUDA device")
    if args.steps < 1:
        raise SystemExit(f"--steps={args.steps}: must be >= 1")

    from muon_recipes.optim.dispatch import prefer_triton
    from muon_recipes.optim.kernels import clear_cuda_graphs, gram_iterations_triton, ns_iterations_triton
    from muon_recipes.optim.newton_schulz import gram_restarts
    from muon_recipes.optim.kernels.iterations import plans_held
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.cuda.get_device_name()
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    timed_coefficients = schedule_coefficients(schedules[0], args.steps)
    peak = measure_peak_tflops()
    sustained = measure_peak_tflops(sustain_s=SUSTAIN_S)
    print(f"{device}: cuBLAS bf16 peak {peak:.0f} TFLOP/s (8192^3 torch.mm, median), {sustained:.0f} after "
          f"{SUSTAIN_S:.0f} s of the same products (the power-limited rate)", flush=True)
    compiled = None if args.no_compile else torch.compile(torch_iterations, dynamic=False)

    rows = []
    for batch, m, n in parse_shapes(args.shapes):
        label = f"{batch}x{m}x{n}"
        t0 = time.time()
        X = torch.randn(batch, m, n, device="cuda")
        X = (X / X.norm(dim=(-2, -1), keepdim=True)).to(torch.bfloat16)
        floor = symmetric_flops(batch, m, n, args.steps) / (peak * 1e12) * 1e3
        row = {"shape": label, "batch": batch, "m": m, "n": n, "floor_ms": floor,
               "sustained_floor_ms": floor * peak / sustained,
               "prefer_triton": prefer_triton(X)}
        row["torch_eager"] = time_ms(lambda: torch_iterations(X, timed_coefficients))
        row["torch_baddbmm"] = time_ms(lambda: torch_iterations_baddbmm(X, timed_coefficients))
        if compiled is not None:
            try:
                compiled(X, timed_coefficients)   # compile outside the timing
                row["torch_compile"] = time_ms(lambda: compiled(X, timed_coefficients))
            except Exception as error:   # report and go on: the other columns still mean something
                row["torch_compile_error"] = f"{type(error).__name__}: {error}"[:500]
                print(f"{label}: torch.compile failed: {row['torch_compile_error']}", flush=True)
        row["ours"] = time_ms(lambda: ns_iterations_triton(X, timed_coefficients, cuda_graph=False))
        row["ours_graph"] = time_ms(lambda: ns_iterations_triton(X, timed_coefficients, cuda_graph=True))
        row["ours_all_triton"] = time_ms(lambda: ns_iterations_triton(X, timed_coefficients, kernels="triton"))
        # The graph replays every product's kernel back to back, without the host: a plan timed product by product
        # (each launched alone) need not be the fastest loop there.
        row["ours_graph_all_triton"] = time_ms(lambda: ns_iterations_triton(X, timed_coefficients, cuda_graph=True,
                                                                            kernels="triton"))
        row["ours_in_step"] = captured_ms(lambda: ns_iterations_triton(X, timed_coefficients, cuda_graph=False))
        restarts = gram_restarts(args.steps)
        X_half = X.to(torch.float16) if m < n else None
        if X_half is not None:
            row["ours_gram"] = time_ms(lambda: gram_iterations_triton(X_half, timed_coefficients, restarts,
                                                                      cuda_graph=False))
            row["ours_gram_graph"] = time_ms(lambda: gram_iterations_triton(X_half, timed_coefficients, restarts,
                                                                            cuda_graph=True))
            row["ours_gram_graph_all_triton"] = time_ms(lambda: gram_iterations_triton(
                X_half, timed_coefficients, restarts, cuda_graph=True, kernels="triton"))
            row["ours_gram_in_step"] = captured_ms(lambda: gram_iterations_triton(
                X_half, timed_coefficients, restarts, cuda_graph=False, out_dtype=torch.bfloat16))
        for pieces in (p.strip() for p in args.pieces.split(",") if p.strip()):
            setting = os.environ.get("MUON_NS_PIECES")   # the caller's, for the other columns
            os.environ["MUON_NS_PIECES"] = pieces
            try:
                row[f"ours_in_step_pieces{pieces}"] = captured_ms(
                    lambda: ns_iterations_triton(X, timed_coefficients, cuda_graph=False))
                if X_half is not None:
                    row[f"ours_gram_in_step_pieces{pieces}"] = captured_ms(lambda: gram_iterations_triton(
                        X_half, timed_coefficients, restarts, cuda_graph=False, out_dtype=torch.bfloat16))
            finally:
                if setting is None:
                    del os.environ["MUON_NS_PIECES"]
                else:
                    os.environ["MUON_NS_PIECES"] = setting
            print(f"{label} in {pieces} pieces, in a captured step: standard "
                  f"{row[f'ours_in_step_pieces{pieces}']['median_ms']:.3f} ms (plan "
                  f"{row['ours_in_step']['median_ms']:.3f})" + (
                      f", Gram {row[f'ours_gram_in_step_pieces{pieces}']['median_ms']:.3f} ms (plan "
                      f"{row['ours_gram_in_step']['median_ms']:.3f})" if X_half is not None else ""), flush=True)
        if args.trace:
            for kernels in ("auto", "triton"):
                trace_calls(args.out / f"trace_{label}_{kernels}.json", lambda: ns_iterations_triton(
                    X, timed_coefficients, cuda_graph=True, kernels=kernels), row["ours_graph"]["median_ms"])
                if X_half is not None:
                    trace_calls(args.out / f"trace_{label}_gram_{kernels}.json", lambda: gram_iterations_triton(
                        X_half, timed_coefficients, restarts, cuda_graph=True, kernels=kernels),
                        row["ours_gram_graph"]["median_ms"])
        row["launch_us"] = host_launch_microseconds(lambda: ns_iterations_triton(X, timed_coefficients))
        row["plan"] = [{k: v for k, v in plan.items() if k not in ("shape", "dtype", "form")}
                       for plan in plans_held() if plan["shape"] == [batch, m, n]]
        if not args.no_breakdown:
            row["breakdown"] = kernel_breakdown(X, timed_coefficients)
            if X_half is not None:
                row["breakdown_float16"] = kernel_breakdown(X_half, timed_coefficients)
        row["band"] = {}
        for name in schedules:
            coefficients = schedule_coefficients(name, args.steps)
            row["band"][name] = {
                "ours": singular_band(ns_iterations_triton(X, coefficients), args.band_matrices),
                "torch": singular_band(torch_iterations(X, coefficients), args.band_matrices),
            }
            if X_half is not None:
                row["band"][name]["ours_gram"] = singular_band(
                    gram_iterations_triton(X_half, coefficients, restarts), args.band_matrices)
        best = min(row["ours"]["median_ms"], row["ours_graph"]["median_ms"])
        gram_best = (min(row["ours_gram"]["median_ms"], row["ours_gram_graph"]["median_ms"])
                     if "ours_gram" in row else None)
        in_step = min(row[k]["median_ms"] for k in ("ours_in_step", "ours_gram_in_step") if k in row)
        print(f"{label}: floor {floor:.3f} ms | eager {row['torch_eager']['median_ms']:.3f} | baddbmm "
              f"{row['torch_baddbmm']['median_ms']:.3f} | compile "
              f"{row.get('torch_compile', {}).get('median_ms', float('nan')):.3f} | ours {row['ours']['median_ms']:.3f}"
              f" | graph {row['ours_graph']['median_ms']:.3f} | all-triton {row['ours_all_triton']['median_ms']:.3f}"
              f" | graph all-triton {row['ours_graph_all_triton']['median_ms']:.3f}"
              f" | gram graph all-triton {row.get('ours_gram_graph_all_triton', {}).get('median_ms', float('nan')):.3f}"
              f" | {best / floor:.2f}x floor ({best / row['sustained_floor_ms']:.2f}x sustained) | gram "
              f"{'-' if gram_best is None else f'{gram_best:.3f} ({gram_best / floor:.2f}x floor)'}"
              f" | in a captured step {in_step:.3f} ({in_step / floor:.2f}x floor)"
              f" | host {row['launch_us']:.0f} us/call | plan {row['plan']} | "
              f"{time.time() - t0:.0f}s",
              flush=True)
        for key in ("breakdown", "breakdown_float16"):
            if key in row:
                print(f"   {key}: " + "  ".join(
                    f"{k} {v['error']}" if "error" in v else
                    f"{k} {v['ms']:.3f}ms/{v['symmetric_tflops']:.0f}TF"
                    + (f" [{v['tile']}]" if "tile" in v else "")
                    + (f" diff {v['max_diff']:.2g}" if "max_diff" in v else "")
                    for k, v in row[key].items()), flush=True)
        rows.append(row)
        result = {
            "device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "peak_bf16_tflops": peak,
            "sustained_peak_bf16_tflops": sustained, "sustain_s": SUSTAIN_S, "steps": args.steps,
            "timed_schedule": schedules[0], "coefficients": timed_coefficients,
            "command": " ".join(["python"] + sys.argv), "rows": rows,
        }
        (args.out / "results.json").write_text(json.dumps(result, indent=1))   # after every shape
        X = X_half = None   # (freed before the next shape)
        clear_cuda_graphs()
        torch.cuda.empty_cache()

    plot(rows, device, args.out / "newton_schulz.png")

    print(f"\n{device}, bf16, {args.steps} iterations ({schedules[0]}), peak {peak:.0f} TFLOP/s; times in ms (median)")
    header = ("| shape | floor | torch eager | torch baddbmm | torch.compile | ours | ours + graph | ours all-Triton "
              "| best / floor | ours Gram | ours Gram + graph | Gram best / floor |")
    band_header = " | ".join(f"band {s} (ours / ours Gram / torch)" for s in schedules)
    print(header[:-1] + "| " + band_header + " |")
    print("|" + "---|" * (12 + len(schedules)))

    def band_text(band):
        return "-" if band is None else "[{:.3f}, {:.3f}]".format(*band)

    for r in rows:
        best = min(r["ours"]["median_ms"], r["ours_graph"]["median_ms"])
        compile_ms = f"{r['torch_compile']['median_ms']:.3f}" if "torch_compile" in r else "-"
        if "ours_gram" in r:
            gram_best = min(r["ours_gram"]["median_ms"], r["ours_gram_graph"]["median_ms"])
            gram = (f"{r['ours_gram']['median_ms']:.3f} | {r['ours_gram_graph']['median_ms']:.3f} | "
                    f"{gram_best / r['floor_ms']:.2f}x")
        else:
            gram = "- | - | -"
        bands = " | ".join(" / ".join(band_text(r["band"][s].get(k)) for k in ("ours", "ours_gram", "torch"))
                           for s in schedules)
        print(f"| {r['shape']} | {r['floor_ms']:.3f} | {r['torch_eager']['median_ms']:.3f} | "
              f"{r['torch_baddbmm']['median_ms']:.3f} | {compile_ms} | "
              f"{r['ours']['median_ms']:.3f} | {r['ours_graph']['median_ms']:.3f} | "
              f"{r['ours_all_triton']['median_ms']:.3f} | {best / r['floor_ms']:.2f}x | {gram} | "
              f"{bands} |")


if __name__ == "__main__":
    main()
