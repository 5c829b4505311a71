"""Benchmark: the whole optimizer step on a model's real parameter set, ours beside torch's optimizers.

    python recipes/bench_optimizer.py --out outputs/bench_optimizer/1gpu.json                  # 1 GPU
    torchrun --standalone --nproc_per_node=4 recipes/bench_optimizer.py --out outputs/bench_optimizer/4gpu.json
    python recipes/bench_optimizer.py --model dense_tiny --device cpu --out /tmp/bench.json   # CPU check

For each model (`--model`, names of conf/model/*.yaml; default dense_1b and moe_small) it builds the model's
parameters (meta device, then sharded with FSDP2 when the world has several ranks, then materialized: the
same layout as training), gives every parameter a random gradient, and times `optimizer.step()` for:

* `muon`: ours with the `--optim` config (default muon_split: per-block Newton-Schulz, AdamW for the rest),
  Newton-Schulz backend `auto` (the Triton kernels where they win) and the config's `ns_method` (default
  gram: the Gram form on non-square blocks); `muon_standard`: the same with `ns_method=standard`;
  `muon_torch`: the config with the torch backend; with `--breakdown`, ours again with `profile=True` for the NS / communication / other split;
* `muon_graph`: ours as `muon`, the whole step captured as one CUDA graph (`optim.cuda_graph=on`: gradients
  copied into static buffers, lr read from device scalars, then one replay); at least
  `cuda_graph.WARMUP_STEPS + 2` untimed steps first, so the capture is never timed. Not applicable on a CPU or
  with several ranks (the sharded step's collectives stay eager); the note says why;
* `adamw_foreach`, `adamw_fused`: torch.optim.AdamW over every parameter (the cost floor of any optimizer);
* `torch_muon`: torch.optim.Muon (torch >= 2.9) on the 2-D hidden matrices + AdamW (foreach) on the rest;
  not applicable when the model has 3-D expert weights, which torch.optim.Muon rejects.

Timing: `--warmup` untimed steps (compilation, autotuning, plan building), then `--steps` steps each
bracketed by CUDA events (wall clock on CPU) after a device synchronize; the table shows the median and the
10th/90th percentiles, the maximum over ranks (the step is as slow as its slowest rank). Beside them: the host's
time in `step()` (median), and on a GPU the same number of steps launched back to back with no synchronize
between them, per step: the GPU's time per step once the host's launches overlap the previous step, as they do
in training (a synchronized step starts with the GPU idle, waiting for the first launch). Prints a markdown
table and writes everything to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIMIZERS = ("muon", "muon_graph", "muon_standard", "muon_torch", "adamw_foreach", "adamw_fused", "torch_muon")
# What each row is, for the table.
LABELS = {"muon": "ours", "muon_graph": "ours, CUDA graph", "muon_standard": "ours, ns_method=standard",
          "muon_torch": "ours, torch Newton-Schulz", "adamw_foreach": "torch AdamW foreach",
          "adamw_fused": "torch AdamW fused", "torch_muon": "torch.optim.Muon + AdamW"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dense_1b,moe_small", help="comma-separated conf/model names")
    p.add_argument("--optim", default="muon_split", help="conf/optim name for ours (default muon_split)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"subset of {','.join(OPTIMIZERS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--mesh", default="auto", choices=("auto", "single", "fsdp", "hsdp"),
                   help="auto: single on one rank, fsdp on several")
    p.add_argument("--replicate", type=int, default=2, help="hsdp: replicas (shard = world / replicate)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the extra profiled pass of ours (NS / comm / other)")
    p.add_argument("--trace", action="store_true",
                   help="also profile 3 steps of ours (eager, and captured as MODEL_graph) with torch.profiler, after a "
                        "second of unrecorded steps: "
                        "kernel table (printed, and beside --out as .txt) and a Chrome trace (.json) per model, "
                        "rank 0 (recipes/stream_timeline.py reads the trace per stream)")
    p.add_argument("--before-step", default="none", choices=("none", "flush", "matmul"),
                   help="GPU work before each timed step, untimed (see before_step_load)")
    p.add_argument("--out", required=True, help="path of the JSON file to write")
    args = p.parse_args(argv)
    unknown = set(args.optimizers.split(",")) - set(OPTIMIZERS)
    if unknown:
        p.error(f"--optimizers: unknown {sorted(unknown)}; valid: {', '.join(OPTIMIZERS)}")
    models = sorted(f.stem for f in (ROOT / "conf" / "model").glob("*.yaml"))
    for name in args.model.split(","):
        if name not in models:
            p.error(f"--model: {name!r} is not in conf/model ({', '.join(models)})")
    if not (ROOT / "conf" / "optim" / f"{args.optim}.yaml").exists():
        p.error(f"--optim: {args.optim!r} is not in conf/optim")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def load_config(group: str, name: str):
    from muon_recipes.config import load_option

    return load_option(ROOT / "conf" / group / f"{name}.yaml", group)


# --------------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------------
def setup(args):
    from muon_recipes.parallel.distributed import init_distributed, resolve_device_type

    device_type = resolve_device_type(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh_kind = args.mesh if args.mesh != "auto" else ("single" if world == 1 else "fsdp")
    replicate = args.replicate if mesh_kind == "hsdp" else 1
    if mesh_kind == "hsdp" and world % replicate:
        raise SystemExit(f"--replicate={replicate} must divide the world size {world}")
    return init_distributed(device_type, mesh_kind, replicate, world // replicate), mesh_kind


def build_model(name: str, ctx):
    """The model's parameters, sharded like training, with random gradients."""
    from muon_recipes.models import build_model as build
    from muon_recipes.parallel.fsdp import parallelize

    cfg = load_config("model", name)
    with torch.device("meta"):
        model = build(cfg)
    parallelize(model, ctx.mesh, bf16=False, compile=False, activation_checkpointing=False)
    model.to_empty(device=ctx.device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
            p.grad = torch.randn_like(p) * 1e-3
    return model


def make_optimizer(kind: str, model, optim_cfg):
    """(step function, optimizer or None, reason it cannot run or None)."""
    from muon_recipes.optim import build_optimizer
    from muon_recipes.optim.param_groups import build_param_groups

    adamw = optim_cfg.adamw
    params = list(model.parameters())
    common = dict(lr=adamw.lr, betas=tuple(adamw.betas), eps=adamw.eps, weight_decay=adamw.weight_decay)
    if kind in ("muon", "muon_graph", "muon_standard", "muon_torch"):
        import dataclasses

        cfg = optim_cfg
        if kind == "muon_torch":
            cfg = dataclasses.replace(optim_cfg, backend="torch")
        if kind == "muon_standard":
            cfg = dataclasses.replace(optim_cfg, ns_method="standard")
        opt = build_optimizer(model, cfg, cuda_graph="on" if kind == "muon_graph" else "off")
        if kind == "muon_graph":
            from muon_recipes.optim.cuda_graph import capture_blocker

            reason = capture_blocker(opt)
            if reason is not None:
                return None, None, f"not captured: {reason}"
        return opt.step, opt, None
    if kind == "adamw_foreach":
        opt = torch.optim.AdamW(params, foreach=True, **common)
        return opt.step, opt, None
    if kind == "adamw_fused":
        opt = torch.optim.AdamW(params, fused=True, **common)
        return opt.step, opt, None
    if kind == "torch_muon":
        if not hasattr(torch.optim, "Muon"):
            return None, None, f"torch {torch.__version__} has no torch.optim.Muon"
        groups = build_param_groups(model, optim_cfg)
        matrices = [p for g in groups if g["algorithm"] == "muon" for _, p in g["params"]]
        if any(p.ndim != 2 for p in matrices):
            return None, None, "3-D expert weights (torch.optim.Muon takes 2-D only)"
        rest = [p for g in groups if g["algorithm"] == "adamw" for _, p in g["params"]]
        muon = torch.optim.Muon(matrices, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                                nesterov=optim_cfg.nesterov, weight_decay=optim_cfg.weight_decay)
        rest_opt = torch.optim.AdamW(rest, foreach=True, **common)

        def step():
            muon.step()
            rest_opt.step()

        return step, muon, None
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------
def before_step_load(kind: str, device):
    """What runs on the GPU before each timed step, to reproduce the state a training step leaves it in:
    "none"; "flush" (one write of 512 MB, which evicts the 50 MB L2 as the forward and backward do);
    "matmul" (bf16 products of 8192 x 8192 for about 60 ms: the tensor cores at full power just before the
    step, as after a backward). The trainer's optimizer step ran 21% above this benchmark's (issue 15);
    comparing the three says whether the GPU's state explains it."""
    if kind == "none" or device.type != "cuda":
        return lambda: None
    if kind == "flush":
        buffer = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
        return lambda: buffer.fill_(1)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)

    def products():
        for _ in range(40):   # about 1.5 ms each on an H200
            torch.mm(a, a, out=out)
    return products


def time_steps(step, device, warmup: int, steps: int, before=lambda: None) -> tuple[list[float], list[float]]:
    """(seconds per step, host seconds per step). Each step after a device synchronize, bracketed by CUDA events
    on GPUs (wall clock on CPU); `before` runs before each timed step, outside the timing (`before_step_load`).
    The host seconds are the time `step()` takes to return: on a GPU, the launches (and a graph's), which the
    GPU waits for here because it starts idle, but which a training loop hides behind the backward."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    times, host = [], []
    for _ in range(steps):
        before()
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            host.append(times[-1])
    return times, host


def time_back_to_back(step, device, steps: int) -> float | None:
    """Seconds per step of `steps` steps launched one after another with no synchronize between them (GPU only):
    the host launches the next step while the GPU runs this one, as in training, so this is the GPU's time per
    step without the launch latency a synchronized step starts with."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def worst_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def trace_steps(step, model_name: str, ctx, args, step_ms: float, steps: int = 3) -> None:
    """Which kernels a step spends its time in: torch.profiler over `steps` steps after a second of steps
    (`stream_timeline.record_steady`, `step_ms` each: the same on every rank, so all run the same steps); rank 0
    writes the table."""
    from stream_timeline import record_steady

    prof = record_steady(step, steps, step_ms / 1e3, cuda=ctx.device.type == "cuda")
    if not ctx.is_main:
        return
    sort_by = "self_cuda_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=90)
    base = Path(args.out).with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{base}_trace_{model_name}.txt").write_text(f"{steps} steps of ours, {model_name}\n{table}\n")
    prof.export_chrome_trace(f"{base}_trace_{model_name}.json")
    print(f"{model_name}: {steps} steps of ours under torch.profiler\n{table}", flush=True)


def bench_one(kind: str, model, optim_cfg, ctx, args, model_name: str = "") -> dict:
    try:
        step, opt, reason = make_optimizer(kind, model, optim_cfg)
    except Exception as e:  # e.g. fused AdamW on a device or DTensor layout it does not support
        step, opt, reason = None, None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if step is None:
        return {"optimizer": kind, "skipped": reason}
    warmup = args.warmup
    if kind == "muon_graph":
        from muon_recipes.optim.cuda_graph import WARMUP_STEPS

        warmup = max(warmup, WARMUP_STEPS + 2)   # eager warm-up steps, the capture, one replay: none of it timed
    try:
        times, host = time_steps(step, ctx.device, warmup, args.steps, before_step_load(args.before_step, ctx.device))
        back_to_back = time_back_to_back(step, ctx.device, args.steps) if args.before_step == "none" else None
    except Exception as e:
        return {"optimizer": kind, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    stats = {"median_ms": 1e3 * statistics.median(times), "p10_ms": 1e3 * percentile(times, 0.1),
             "p90_ms": 1e3 * percentile(times, 0.9), "host_ms": 1e3 * statistics.median(host)}
    if back_to_back is not None:
        stats["back_to_back_ms"] = 1e3 * back_to_back
    stats = worst_over_ranks(stats, ctx.device)
    row = {"optimizer": kind, **stats}
    if kind.startswith("muon"):
        from muon_recipes.optim import describe_param_groups

        row["groups"] = describe_param_groups(opt)
        row["bucket_mb"], row["backend"] = opt.bucket_mb, opt.param_groups[0].get("backend")
        row["ns_method"] = opt.param_groups[0].get("ns_method")
        captured = getattr(opt, "_captured", None)
        row["captured"] = captured is not None and captured.graph is not None
        if kind == "muon_graph" and not row["captured"]:   # never report an eager step under the graph's name
            return {"optimizer": kind, "skipped": f"the step was not captured ({opt._graph_blocked})"}
        from muon_recipes.optim.dispatch import triton_available

        if ctx.device.type == "cuda" and triton_available():   # the products each bucket shape of the process ran on
            from muon_recipes.optim.kernels import plan_store
            from muon_recipes.optim.kernels.iterations import plans_held

            row["plans"], row["plan_counts"] = plans_held(), vars(plan_store.snapshot())
    if kind.startswith("muon") and args.breakdown and hasattr(opt, "last_step_timings"):
        opt.profile = True
        parts: dict[str, list[float]] = {}
        for _ in range(args.steps):
            step()
            for k, v in opt.last_step_timings.items():
                parts.setdefault(k, []).append(v)
        opt.profile = False
        row["profiled_ms"] = worst_over_ranks({k: 1e3 * statistics.median(v) for k, v in parts.items()}, ctx.device)
    if kind in ("muon", "muon_graph") and args.trace:   # the captured step's trace: its kernels per stream
        trace_steps(step, model_name if kind == "muon" else f"{model_name}_graph", ctx, args, row["median_ms"])
    del opt
    return row


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = [f"device: {report['device']} x {report['world_size']} ({report['mesh']}), torch {report['torch']}, "
             f"{report['date']}", "",
             "| model | optimizer | median ms | p10 | p90 | host ms | back-to-back ms | NS ms | comm ms | other ms "
             "| note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    label = lambda kind: f"{kind} ({LABELS[kind]})"  # noqa: E731
    for model in report["models"]:
        for r in model["results"]:
            if "skipped" in r:
                lines.append(f"| {model['model']} | {label(r['optimizer'])} | | | | | | | | | n/a: {r['skipped']} |")
                continue
            prof = r.get("profiled_ms", {})
            cells = [f"{prof[k]:.2f}" if k in prof else "" for k in ("ns", "comm", "other")]
            note = f"profiled total {prof['total']:.2f} ms" if "total" in prof else ""
            back_to_back = f"{r['back_to_back_ms']:.2f}" if "back_to_back_ms" in r else ""
            lines.append(f"| {model['model']} | {label(r['optimizer'])} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | "
                         f"{r['p90_ms']:.2f} | {r['host_ms']:.2f} | {back_to_back} | {' | '.join(cells)} | {note} |")
    return "\n".join(lines)


def write_report(report: dict, table: str, out: str) -> None:
    """Print the markdown table and write it with every number to `out` (JSON). Rank 0 only."""
    print(table, flush=True)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "table": table}, indent=1))
    print(f"wrote {path}", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    ctx, mesh_kind = setup(args)
    optim_cfg = load_config("optim", args.optim)
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": device_name, "world_size": ctx.world_size, "mesh": mesh_kind, "torch": torch.__version__,
              "optim_config": args.optim, "steps": args.steps, "warmup": args.warmup,
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "models": []}
    try:
        for name in args.model.split(","):
            model = build_model(name, ctx)
            counts = {"total": sum(p.numel() for p in model.parameters())}
            results = [bench_one(kind, model, optim_cfg, ctx, args, name) for kind in args.optimizers.split(",")]
            report["models"].append({"model": name, "params": counts, "results": results})
            del model
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        if ctx.is_main:
            write_report(report, markdown(report), args.out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
