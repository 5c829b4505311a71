"""Benchmark: what choosing the Newton-Schulz kernels' tiles costs for a model's buckets, per MUON_NS_AUTOTUNE mode.

    python recipes/bench_tile_search.py --model moe_small --out outputs/tile_search/gpu.json     # one GPU
    python recipes/bench_tile_search.py --model moe_small --device cpu --compile parallel        # CPU: sm_90 builds

Buckets: the model's Muon blocks (`optim=muon_split`) grouped by shape up to transposition, one bucket per shape,
as the optimizer batches them on one GPU, in bf16; on a GPU each goes through `newton_schulz` as the optimizer
calls it (Triton kernels from TRITON_NS_MIN_SIDE, the Gram form in float16 on non-square blocks from
GRAM_MIN_SIDE_CUDA, cuBLAS where it measured faster).

GPU: one fresh process per case, each with its own empty Triton cache unless it is a warm case: `bounded` cold,
`bounded` warm (a second process on the first one's cache), `full` cold (every candidate, the search as it was
before it was bounded), `heuristic` cold (the cost model's pick, untimed) and `bounded` cold without the parallel
compilation (MUON_NS_PRECOMPILE=0). Each reports its first Newton-Schulz pass over all buckets as Muon's first step
makes it (every bucket's candidates compiled at once, then each bucket; seconds: what the first step pays for
tiles), the tile searches and compilations it ran, and the steady-state Newton-Schulz time of one optimizer step
(sum over buckets of the median of 20 calls, ms): whether the bounded search picked tiles as fast as the full one.
Every case has a time limit; the whole run stays under 3 minutes (each case gets at most 100 s, none starts after
130 s: those left out say so).

CPU (no GPU needed): for each mode, the launches the buckets make (recorded, not run: `iterations.triton_launches`),
the tile searches (problem keys) and the distinct candidate binaries they compile, and with `--compile` the
time to build those binaries for Hopper (sm_90, Triton's own ptxas) one after another (`serial`) or on a thread
pool (`parallel`), as the GPU's first step does before timing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("bounded", "full", "heuristic")
# (label, mode, cache: "new" or the label whose cache it reuses, extra environment)
GPU_CASES = (("bounded cold", "bounded", "new", {}),
             ("bounded warm", "bounded", "bounded cold", {}),
             ("full cold", "full", "new", {}),
             ("heuristic cold", "heuristic", "new", {}),
             ("bounded cold, serial compiles", "bounded", "new", {"MUON_NS_PRECOMPILE": "0"}))
CASE_LIMIT_S = 100
TOTAL_LIMIT_S = 150


def model_buckets(model_name: str, optim_name: str = "muon_split") -> list[tuple[int, int, int]]:
    """(count, m, n) with m <= n of every bucket the optimizer forms from the model's Muon blocks on one GPU."""
    from muon_recipes.config import load_option
    from muon_recipes.models import build_model
    from muon_recipes.optim.blocks import BlockPlan
    from muon_recipes.optim.param_groups import build_param_groups

    model_cfg = load_option(ROOT / "conf" / "model" / f"{model_name}.yaml", "model")
    optim_cfg = load_option(ROOT / "conf" / "optim" / f"{optim_name}.yaml", "optim")
    with torch.device("meta"):
        model = build_model(model_cfg)
    counts: dict[tuple[int, int], int] = {}
    for group in build_param_groups(model, optim_cfg):
        if group["algorithm"] != "muon":
            continue
        for _, p in group["params"]:
            for count, rows, cols in BlockPlan.build(p.shape, group["split_sizes"], group["experts"]).block_shapes():
                shape = (min(rows, cols), max(rows, cols))
                counts[shape] = counts.get(shape, 0) + count
    return [(count, m, n) for (m, n), count in counts.items()]


def bucket_path(m: int, n: int, on_cuda: bool) -> tuple[bool, bool]:
    """(Triton kernels?, Gram form?) for a bf16 bucket of m x n blocks, by the optimizer's dispatch rules."""
    from muon_recipes.optim import dispatch

    triton = min(m, n) >= dispatch.TRITON_NS_MIN_SIDE
    return triton, triton and dispatch.uses_gram_form("gram", m, n, on_cuda)


# ------------------------------------------------------------------------------------------------------------------
# CPU: count and compile the candidates
# ------------------------------------------------------------------------------------------------------------------
def cpu_report(buckets, modes, compile_how: str) -> dict:
    import triton

    from muon_recipes.optim.kernels.ahead_of_time import specialized_source
    from muon_recipes.optim.kernels.fast_launch import unwrap
    from muon_recipes.optim.kernels.iterations import triton_launches
    from muon_recipes.optim.kernels.tuning import search_candidates, tile_label
    from muon_recipes.optim.newton_schulz import coefficients, gram_restarts

    coeffs = coefficients("keller", 5)
    launches = []
    for count, m, n in buckets:
        on_triton, gram = bucket_path(m, n, on_cuda=True)
        if not on_triton:
            continue
        X = torch.empty((count, m, n), dtype=torch.float16 if gram else torch.bfloat16)
        launches += (triton_launches(X, coeffs, gram_restarts(5), torch.bfloat16) if gram
                     else triton_launches(X, coeffs))
    report = {}
    for mode in modes:
        os.environ["MUON_NS_AUTOTUNE"] = mode
        keys, binaries = set(), {}
        for kernel, _, args, constexprs in launches:
            named = dict(zip(kernel.arg_names, args))
            key = (kernel.base_fn.__name__, *[{**named, **constexprs}[k] for k in kernel.keys],
                   *[str(a) for a in args if isinstance(a, torch.dtype)])
            keys.add(key)
            for config in search_candidates(kernel.configs, named, **constexprs):
                fn = unwrap(kernel)[0]
                spec = (kernel.base_fn.__name__, tuple(str(a) if isinstance(a, torch.dtype) else
                                                       (a == 1, a % 16 == 0) if isinstance(a, int)
                                                       and not fn.params[i].do_not_specialize else 0
                                                       for i, a in enumerate(args)),
                        tuple(sorted(constexprs.items())), tile_label(config))
                binaries.setdefault(spec, (kernel, named, {**constexprs, **config.kwargs}, config))
        row = {"searches": len(keys), "binaries": len(binaries), "launches": len(launches)}
        if compile_how != "none":
            target = triton.backends.compiler.GPUTarget("cuda", 90, 32)

            def build(item):
                kernel, named, constexprs, config = item
                source = specialized_source(kernel, named, constexprs)
                triton.compile(source, target=target, options={"num_warps": config.num_warps,
                                                               "num_stages": config.num_stages})

            with tempfile.TemporaryDirectory() as cache:   # a cold Triton cache for each mode
                os.environ["TRITON_CACHE_DIR"] = cache
                start = time.perf_counter()
                if compile_how == "serial":
                    for item in binaries.values():
                        build(item)
                else:
                    with ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0)))) as pool:
                        list(pool.map(build, binaries.values()))
                row[f"compile_{compile_how}_s"] = time.perf_counter() - start
        report[mode] = row
        print(f"{mode}: {row}", flush=True)
    return report


# ------------------------------------------------------------------------------------------------------------------
# GPU: one process per case
# ------------------------------------------------------------------------------------------------------------------
def worker(buckets, repeats: int = 20) -> dict:
    """Run in a fresh process: the first pass over every bucket (cold or warm) as Muon's first step makes it (every
    bucket's candidates compiled at once, then each bucket's Newton-Schulz), then the steady state."""
    from muon_recipes.optim.blocks import BlockPlan
    from muon_recipes.optim.kernels import tile_search
    from muon_recipes.optim.newton_schulz import NS_EPS, newton_schulz
    from muon_recipes.optim.orthogonalize import NSSettings, compile_ahead

    torch.manual_seed(0)
    inputs = [torch.randn(count, m, n, device="cuda", dtype=torch.bfloat16) for count, m, n in buckets]
    torch.cuda.synchronize()
    before = tile_search.progress()
    start = time.perf_counter()
    ns = NSSettings(5, "keller", torch.bfloat16, "auto", NS_EPS, "gram")
    compile_ahead([(BlockPlan.build(X.shape), ns, X.device) for X in inputs])
    first = [time.perf_counter() - start]   # the ahead-of-time compilation counts with the first bucket
    for X in inputs:
        start = time.perf_counter()
        newton_schulz(X, steps=5, schedule="keller", dtype=torch.bfloat16, backend="auto", method="gram")
        torch.cuda.synchronize()
        first.append(time.perf_counter() - start)
    first = [first[0] + first[1]] + first[2:]
    after = tile_search.progress()
    steady = []
    for X in inputs:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for begin, end in events:
            begin.record()
            newton_schulz(X, steps=5, schedule="keller", dtype=torch.bfloat16, backend="auto", method="gram")
            end.record()
        torch.cuda.synchronize()
        steady.append(statistics.median(b.elapsed_time(e) for b, e in events))
    spent = after.stats.minus(before.stats)
    return {"first_pass_s": sum(first), "first_pass_per_bucket_s": first, "steady_ms": sum(steady),
            "steady_per_bucket_ms": steady, "choices": after.choices - before.choices,
            "binaries": None if after.binaries is None else after.binaries - (before.binaries or 0),
            "searches": spent.searches, "timed": spent.timed, "search_s": spent.search_seconds,
            "compile_s": spent.compile_seconds, "line": tile_search.describe(before, after)}


def gpu_report(args, buckets) -> dict:
    started = time.perf_counter()
    caches: dict[str, str] = {}
    rows = {}
    root = tempfile.mkdtemp(prefix="tile-search-")
    for label, mode, cache, extra in GPU_CASES:
        left = TOTAL_LIMIT_S - (time.perf_counter() - started)
        if left < 20:
            rows[label] = {"skipped": f"no time left of the {TOTAL_LIMIT_S} s budget"}
            print(f"{label}: skipped (time budget)", flush=True)
            continue
        caches[label] = caches[cache] if cache != "new" else tempfile.mkdtemp(dir=root)
        env = dict(os.environ, MUON_NS_AUTOTUNE=mode, TRITON_CACHE_DIR=caches[label], **extra)
        command = [sys.executable, __file__, "--worker", "--model", args.model]
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=min(CASE_LIMIT_S, left), cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            rows[label] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}"}
        except subprocess.TimeoutExpired:
            rows[label] = {"error": f"timed out after {min(CASE_LIMIT_S, left):.0f} s"}
        r = rows[label]
        print(f"{label}: " + (f"first pass {r['first_pass_s']:.2f} s, Newton-Schulz {r['steady_ms']:.3f} ms per step; "
                              f"{r['line']}" if "first_pass_s" in r else r["error"]), flush=True)
    return rows


def markdown(rows: dict) -> str:
    lines = ["| case | first pass (s) | tile choices | searched | candidates timed | timing (s) | "
             "parallel compiling (s) | binaries | Newton-Schulz per step (ms) |", "|---|" + "---:|" * 8]
    for label, r in rows.items():
        if "first_pass_s" not in r:
            lines.append(f"| {label} | {r.get('error') or r.get('skipped')} |" + " |" * 7)
            continue
        lines.append(f"| {label} | {r['first_pass_s']:.2f} | {r['choices']} | {r['searches']} | {r['timed']} | "
                     f"{r['search_s']:.2f} | {r['compile_s']:.2f} | {r['binaries']} | {r['steady_ms']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moe_small", help="a conf/model name (default moe_small)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--modes", default=",".join(MODES), help="CPU: the MUON_NS_AUTOTUNE modes to count")
    parser.add_argument("--compile", default="none", choices=("none", "serial", "parallel"),
                        help="CPU: also build the candidates for sm_90 and time it")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (ROOT / "conf" / "model" / f"{args.model}.yaml").exists():
        parser.error(f"--model: {args.model!r} is not in conf/model")
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: {args.modes!r}: each must be one of {', '.join(MODES)}")
    buckets = model_buckets(args.model)
    if args.worker:
        print(json.dumps(worker(buckets)), flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (--device cpu counts and compiles for sm_90 here)")
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    paths = {(True, True): "gram", (True, False): "standard", (False, False): "torch"}
    print(f"{args.model} buckets (count x m x n, path): " + ", ".join(
        f"{c}x{m}x{n} ({paths[bucket_path(m, n, True)]})" for c, m, n in buckets), flush=True)
    if on_gpu:
        rows = gpu_report(args, buckets)
        table = markdown(rows)
        report = {"device": torch.cuda.get_device_name(), "rows": rows}
    else:
        report = {"device": "cpu", "rows": cpu_report(buckets, modes, args.compile)}
        table = "\n".join(["| mode | tile searches | candidate binaries | " + (f"compile {args.compile} (s) |"
                                                                             if args.compile != "none" else ""),
                           "|---|---:|---:|" + ("---:|" if args.compile != "none" else "")]
                          + [f"| {mode} | {r['searches']} | {r['binaries']} | " +
                             (f"{r[f'compile_{args.compile}_s']:.1f} |" if args.compile != "none" else "")
                             for mode, r in report["rows"].items()])
    import triton

    report.update(model=args.model, buckets=buckets, torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(["python"] + sys.argv))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(table, flush=True)


if __name__ == "__main__":
    main()
