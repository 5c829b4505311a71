"""Where the GPU's time goes, per CUDA stream, in a torch.profiler Chrome trace: busy time, overlap and idle gaps.

    python recipes/stream_timeline.py TRACE.json [TRACE2.json ...] [--steps N] [--top 12]

Why: the two-stream optimizer step (`muon_recipes/optim/step_streams.py`) only pays off where the side stream's
passes over memory really run while the main stream's products run, and where they do not stretch the products
more than they save. A kernel table (`bench_optimizer.py --trace`) sums kernel times and cannot tell either; the
timeline can. For each trace this prints:

* the window (first kernel start to last kernel end), divided by `--steps` when the trace holds several steps;
* per stream: kernels (memsets and copies count as kernels, under their own names), busy time (the union of its
  kernels' intervals), and its kernels grouped by name, with the launch shape and the resources the profiler records (grid, block, registers per thread, shared memory):
  whether a second kernel can be resident on an SM beside them;
* the time two or more streams are busy at once (overlap), and the time no stream is (idle);
* the main stream's idle time split into gaps shorter and longer than 20 us (launch gaps against waits);
* per kernel name, the calls that ran alone against those that ran at least half beside another stream's
  work, and the mean duration of each: what the overlap costs the kernels it overlaps.

Given two or more traces, the per-name totals of the same kernels are set side by side, e.g. one stream
(`MUON_STEP_STREAMS=0`) against two (`auto`): how much longer the products run beside the passes.

The benchmarks record their traces with `record_steady`, which runs about a second of the same calls under the
profiler before the recorded ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

SHORT_GAP_US = 20.0
# What occupies a stream: kernels, and the memsets and copies a library may put between them (a split-K GEMM's
# zeroed workspace is a memset node in a graph). Left out, they would read as gaps between kernels.
GPU_WORK = ("kernel", "gpu_memset", "gpu_memcpy")
# Seconds of unrecorded calls before the recorded ones (`record_steady`).
STEADY_S = 1.0


def record_steady(fn, calls: int, call_s: float, cuda: bool, warm_s: float = STEADY_S):
    """torch.profiler over `calls` calls of `fn`, after enough unrecorded calls (at `call_s` seconds each, at
    least one) to fill `warm_s` seconds; returns the profiler, whose trace and tables hold the recorded calls only.

    Why: the profiler's start-up leaves the GPU idle for a moment, and calls right after an idle GPU run at its
    burst clock. A timed loop runs long enough to bring the board to its power limit, where the clock drops (one
    H100: 1,245-1,700 MHz instead of 1,980 through dense_1b's step, docs/benchmarks.md, "Clocks and power"). Three
    calls traced straight after the start-up read 37.8 ms of dense_1b's step where the timed median was
    39.8-40.4 ms (one H200); traced after a second of the same calls, they run at the timed loop's clock."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    warm = max(1, math.ceil(warm_s / max(call_s, 1e-6)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warm, active=calls, repeat=1)) as prof:
        for _ in range(warm + calls):
            fn()
            prof.step()
        if cuda:
            torch.cuda.synchronize()
    return prof


def kernels(trace: dict) -> list[dict]:
    """The trace's GPU work events (kernels, memsets, copies), each with ts and dur in us."""
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in GPU_WORK]


def stream_of(event: dict):
    """The CUDA stream of a GPU event: its args' "stream", else its thread id."""
    return event.get("args", {}).get("stream", event.get("tid"))


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def covered_at_least(intervals_per_stream: list[list[tuple[float, float]]], count: int) -> float:
    """Time during which at least `count` of the streams are busy (a sweep over their busy intervals)."""
    edges = []
    for intervals in intervals_per_stream:
        for start, end in merge(intervals):
            edges += [(start, 1), (end, -1)]
    edges.sort()
    total, busy, last = 0.0, 0, None
    for at, delta in edges:
        if last is not None and busy >= count:
            total += at - last
        busy += delta
        last = at
    return total


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def gaps(intervals: list[tuple[float, float]]) -> list[float]:
    spans = merge(intervals)
    return [b[0] - a[1] for a, b in zip(spans, spans[1:])]


def resources(event: dict) -> str:
    args = event.get("args", {})
    grid, block = args.get("grid"), args.get("block")
    shown = [f"grid {grid}" if grid else "", f"block {block}" if block else ""]
    if "registers per thread" in args:
        shown.append(f"{args['registers per thread']} regs")
    if "shared memory" in args:
        shown.append(f"{int(args['shared memory']) // 1024} KB smem")
    return ", ".join(s for s in shown if s)


def summarize(path: Path, steps: int, top: int) -> dict:
    """Print one trace's timeline summary; return {stream: {name: total us}} for the side-by-side table."""
    events = kernels(json.loads(path.read_text()))
    if not events:
        print(f"{path}: no kernel events (was the trace taken with ProfilerActivity.CUDA?)")
        return {}
    per_stream: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        per_stream[stream_of(e)].append(e)
    intervals = {s: [(e["ts"], e["ts"] + e["dur"]) for e in es] for s, es in per_stream.items()}
    begin = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    window = end - begin
    busy_any = covered_at_least(list(intervals.values()), 1)
    overlap = covered_at_least(list(intervals.values()), 2)
    print(f"\n## {path.name}: {len(events)} kernels on {len(per_stream)} stream(s)")
    print(f"window {window / steps / 1e3:.3f} ms per step; busy {busy_any / steps / 1e3:.3f}, two or more streams "
          f"at once {overlap / steps / 1e3:.3f}, idle {(window - busy_any) / steps / 1e3:.3f} ms per step")
    alone_and_beside(events, intervals, steps, top)
    totals: dict = {}
    for stream, es in sorted(per_stream.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        busy = union_length(intervals[stream])
        stream_gaps = gaps(intervals[stream])
        short = sum(g for g in stream_gaps if g < SHORT_GAP_US)
        long = sum(g for g in stream_gaps if g >= SHORT_GAP_US)
        print(f"\nstream {stream}: {len(es) // steps} kernels per step, busy {busy / steps / 1e3:.3f} ms per step; "
              f"gaps between its kernels {short / steps / 1e3:.3f} ms short (< {SHORT_GAP_US:.0f} us) + "
              f"{long / steps / 1e3:.3f} ms long per step")
        by_name: dict[str, list[dict]] = defaultdict(list)
        for e in es:
            by_name[e["name"]].append(e)
        ranked = sorted(by_name.items(), key=lambda kv: -sum(e["dur"] for e in kv[1]))
        totals[stream] = {name: sum(e["dur"] for e in group) / steps for name, group in ranked}
        print("| ms per step | calls | kernel | launch |\n|---:|---:|---|---|")
        for name, group in ranked[:top]:
            print(f"| {sum(e['dur'] for e in group) / steps / 1e3:.3f} | {len(group) // steps} | {name[:80]} | "
                  f"{resources(group[0])} |")
    return totals


def alone_and_beside(events: list[dict], intervals: dict, steps: int, top: int) -> None:
    """Per kernel name: its calls that ran alone against those that another stream's work overlapped for at
    least half of their time, with the mean duration of each. A kernel that takes longer beside another stream
    shares its SMs or the memory with it (on one H100, a persistent product ran 2.5x longer while the side
    stream's passes ran beside it, docs/benchmarks.md). `intervals`: each stream's (start, end) intervals."""
    if len(intervals) < 2:
        return
    others = {stream: merge([iv for s, ivs in intervals.items() if s != stream for iv in ivs]) for stream in intervals}
    groups: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for e in events:
        start, end = e["ts"], e["ts"] + e["dur"]
        spans = others[stream_of(e)]
        shared = sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans if a < end and b > start)
        groups[e["name"]][1 if e["dur"] > 0 and shared >= 0.5 * e["dur"] else 0].append(e["dur"])
    mixed = [(name, alone, beside) for name, (alone, beside) in groups.items() if beside]
    if not mixed:
        return
    mixed.sort(key=lambda row: -sum(row[2]))
    mean = lambda values: f"{sum(values) / len(values) / 1e3:.3f}" if values else "-"  # noqa: E731
    print("\n| kernel | calls alone per step | mean ms alone | calls beside another stream per step | mean ms beside |"
          "\n|---|---:|---:|---:|---:|")
    for name, alone, beside in mixed[:top]:
        print(f"| {name[:70]} | {round(len(alone) / steps, 1):g} | {mean(alone)} | {round(len(beside) / steps, 1):g} | "
              f"{mean(beside)} |")


def side_by_side(names: list[str], all_totals: list[dict], top: int) -> None:
    """Per kernel name, summed over streams: ms per step in each trace."""
    merged = [defaultdict(float) for _ in all_totals]
    for m, totals in zip(merged, all_totals):
        for per_name in totals.values():
            for name, us in per_name.items():
                m[name] += us
    keys = sorted(set().union(*merged), key=lambda k: -max(m.get(k, 0.0) for m in merged))
    print("\n## the same kernels, ms per step\n")
    print("| kernel | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for key in keys[:top]:
        print(f"| {key[:70]} | " + " | ".join(f"{m.get(key, 0.0) / 1e3:.3f}" for m in merged) + " |")
    print("| all kernels | " + " | ".join(f"{sum(m.values()) / 1e3:.3f}" for m in merged) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=1, help="steps each trace holds (times are per step)")
    parser.add_argument("--top", type=int, default=12, help="kernel names listed per stream")
    args = parser.parse_args(argv)
    if args.steps < 1:
        print(f"--steps={args.steps}: must be at least 1", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.traces if not p.is_file()]
    if missing:
        print(f"traces not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    all_totals = [summarize(p, args.steps, args.top) for p in args.traces]
    if len(args.traces) > 1:
        side_by_side([p.stem for p in args.traces], all_totals, 2 * args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
