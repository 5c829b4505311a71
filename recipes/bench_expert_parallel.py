"""Benchmark: training throughput and all-to-all time per step of an MoE model, for each expert-parallel size.

    torchrun --standalone --nproc_per_node=8 recipes/bench_expert_parallel.py --out outputs/bench_ep/8gpu.json
    torchrun --standalone --nproc_per_node=2 recipes/bench_expert_parallel.py --model moe_tiny --device cpu \
        --ep 1,2 --batch-size 2 --seq-len 64 --steps 2 --warmup 1 --out /tmp/bench_ep.json           # CPU check

For every `--ep` size that divides the world size and the model's `n_experts` (others are listed as skipped), it
builds the model as `train.py` does (seeded, whole, then sharded: `mesh=fsdp` for ep=1, `mesh=ep mesh.ep=N`
otherwise; bf16 mixed precision on GPUs), and times full training steps on random tokens: forward, cross-entropy,
backward, `optimizer.step()` (`--optim`, default muon_split) and the router-bias update from global counts.

* **tokens/s**: global tokens per step (`world x batch_size x seq_len`) over the median step time, the step
  as slow as its slowest rank (maximum over ranks);
* **all-to-all ms/step**: a second pass of `--steps` steps with `ExpertParallel.profile` on, which synchronizes
  the device around every all-to-all of every MoE layer (counts, dispatch and combine, forward and backward) and
  adds up their seconds; median over steps, maximum over ranks. That pass is slower (the synchronization removes
  overlap), so its step time is not the throughput's. ep=1 has no all-to-all.

Prints a markdown table and writes it with every number to `--out` (JSON). A line for docs/benchmarks.md needs the
device, the command and the date, all in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))

from bench_optimizer import load_config, worst_over_ranks, write_report  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="moe_small", help="a conf/model name with n_experts > 0")
    p.add_argument("--optim", default="muon_split", help="a conf/optim name")
    p.add_argument("--ep", default="1,2,4,8", help="comma-separated expert-parallel sizes")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--out", required=True, help="path of the JSON file to write")
    args = p.parse_args(argv)
    models = sorted(f.stem for f in (ROOT / "conf" / "model").glob("*.yaml"))
    if args.model not in models:
        p.error(f"--model: {args.model!r} is not in conf/model ({', '.join(models)})")
    if not load_config("model", args.model).n_experts:
        p.error(f"--model: {args.model!r} has no experts (model.n_experts=0); expert parallelism needs an MoE model")
    if not (ROOT / "conf" / "optim" / f"{args.optim}.yaml").exists():
        p.error(f"--optim: {args.optim!r} is not in conf/optim")
    try:
        args.ep = [int(x) for x in args.ep.split(",")]
    except ValueError:
        p.error(f"--ep: {args.ep!r} must be comma-separated integers >= 1")
    if any(ep < 1 for ep in args.ep):
        p.error(f"--ep: {args.ep} must be integers >= 1")
    if min(args.steps, args.batch_size, args.seq_len) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size and --seq-len must be >= 1 and --warmup >= 0")
    return args


def build(model_cfg, optim_cfg, ctx, ep: int):
    """Model and optimizer as the trainer builds them under mesh=fsdp (ep=1) or mesh=ep (ep > 1)."""
    from muon_recipes.models import build_model
    from muon_recipes.optim import build_optimizer
    from muon_recipes.parallel.expert_parallel import expert_mesh
    from muon_recipes.parallel.fsdp import parallelize

    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = build_model(model_cfg)
    experts = expert_mesh(ctx.device.type, ctx.world_size, ep) if ep > 1 else None
    parallelize(model, ctx.mesh, bf16=ctx.device.type == "cuda", compile=False, activation_checkpointing=False,
                expert_mesh=experts)
    return model, build_optimizer(model, optim_cfg)


def expert_parallel_layers(model) -> list:
    return [m.experts.expert_parallel for m in model.moe_layers() if m.experts.expert_parallel is not None]


def train_step(model, optimizer, tokens: torch.Tensor) -> None:
    from muon_recipes.parallel.distributed import all_reduce_sum

    out = model(tokens[:, :-1])
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_router_biases(list(all_reduce_sum(torch.stack(model.expert_load_counts())).unbind(0)))


def time_steps(model, optimizer, batches: list, device) -> list[float]:
    times = []
    for tokens in batches:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def bench_ep(ep: int, model_cfg, optim_cfg, ctx, args) -> dict:
    if ctx.world_size % ep or model_cfg.n_experts % ep:
        return {"ep": ep, "skipped": f"ep={ep} must divide the world size {ctx.world_size} and "
                                     f"n_experts={model_cfg.n_experts}"}
    model, optimizer = build(model_cfg, optim_cfg, ctx, ep)
    generator = torch.Generator().manual_seed(1 + ctx.rank)
    batches = [torch.randint(0, model_cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
               .to(ctx.device) for _ in range(args.warmup + 2 * args.steps)]
    time_steps(model, optimizer, batches[:args.warmup], ctx.device)
    step_s = statistics.median(time_steps(model, optimizer, batches[args.warmup:args.warmup + args.steps],
                                          ctx.device))
    layers = expert_parallel_layers(model)
    per_step = []
    for tokens in batches[args.warmup + args.steps:]:
        for layer in layers:
            layer.profile, layer.all_to_all_s = True, 0.0
        train_step(model, optimizer, tokens)
        per_step.append(sum(layer.all_to_all_s for layer in layers))
    worst = worst_over_ranks({"step_s": step_s, "all_to_all_s": statistics.median(per_step)}, ctx.device)
    tokens_per_step = ctx.world_size * args.batch_size * args.seq_len
    del model, optimizer
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ep": ep, "tokens_per_s": tokens_per_step / worst["step_s"], "step_ms": 1e3 * worst["step_s"],
            "all_to_all_ms": 1e3 * worst["all_to_all_s"], "tokens_per_step": tokens_per_step}


def markdown(report: dict) -> str:
    lines = [f"device: {report['device']} x {report['world_size']}, torch {report['torch']}, model "
             f"{report['model']}, {report['optim']}, {report['date']}", "",
             "| ep | tokens/s | step ms | all-to-all ms/step | note |", "|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"| {r['ep']} | | | | n/a: {r['skipped']} |")
        else:
            lines.append(f"| {r['ep']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['all_to_all_ms']:.2f} | |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from muon_recipes.parallel.distributed import init_distributed, resolve_device_type, shutdown_distributed

    args = parse_args(argv)
    device_type = resolve_device_type(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = init_distributed(device_type, "fsdp", 1, world)
    model_cfg, optim_cfg = load_config("model", args.model), load_config("optim", args.optim)
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": device_name, "world_size": ctx.world_size, "torch": torch.__version__, "model": args.model,
              "optim": args.optim, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
              "warmup": args.warmup, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    try:
        report["results"] = [bench_ep(ep, model_cfg, optim_cfg, ctx, args) for ep in args.ep]
    finally:
        shutdown_distributed()
    if ctx.is_main:
        write_report(report, markdown(report), args.out)
    return report


if __name__ == "__main__":
    main()
