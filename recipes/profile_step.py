"""Profile training steps of a run's model as the trainer runs them, and print where the step's time goes.

    python recipes/profile_step.py model=moe_small optim=muon_split data.scope=stdlib --markdown docs/moe_profile.md
    python recipes/profile_step.py model=moe_tiny device=cpu train.compile=false          # seconds on a CPU

Takes the same overrides as train.py. The model, its sharding, compile and optimizer are built by the trainer's
own code (`train.entry.build_model_and_optimizer`), and each step is `Trainer.train_step`: forward and backward of
every micro-batch, gradient clipping, the optimizer step and the router bias update. The batches are random token
ids of the run's shape (throughput does not depend on the text; no data preparation).

After `--warmup` steps (compilation, kernel tuning), `--steps` steps are timed without the profiler (tokens/s
and MFU as the trainer computes them), one more step runs under `torch.cuda.set_sync_debug_mode("warn")` (GPU: the
source lines that make the host wait for the device), and `--profile-steps` steps run under `torch.profiler`. The
output: a header, the category table and the top kernels (`muon_recipes.train.profiling`), as markdown on stdout
and in `--markdown`, and as JSON in `--json`. A bad override ends with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout, like the other recipes


class RandomBatches:
    """(inputs, targets) of `batch x seq_len` random token ids on the CPU, as the trainer's loader yields them."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int):
        import torch

        self.shape, self.vocab_size = (batch_size, seq_len + 1), vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        tokens = torch.randint(0, self.vocab_size, self.shape, generator=self.generator)
        return tokens[:, :-1], tokens[:, 1:]


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_locations(trainer) -> list[tuple[str, int]]:
    """(source line, count) of the host-device synchronizations of one training step on a GPU, from
    `torch.cuda.set_sync_debug_mode("warn")`; empty on CPU."""
    import torch

    if trainer.ctx.device.type != "cuda":
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(profile=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _synchronize(trainer.ctx.device)
    places = Counter(f"{_source(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower())
    return places.most_common()


def _source(filename: str) -> str:
    """A warning's file as a reader finds it: relative to the repository, or from the installed package's name
    (`torch/cuda/__init__.py`) for a file under site-packages."""
    _, installed, inside = filename.rpartition("site-packages" + os.sep)
    return inside if installed else os.path.relpath(filename, ROOT)


def profile(overrides: list, warmup: int, steps: int, profile_steps: int) -> tuple[dict, object]:
    """Build the run of `overrides`, time and profile its steps; returns (report, StepProfile)."""
    import torch

    from muon_recipes.config import compose
    from muon_recipes.parallel.distributed import init_distributed, shutdown_distributed
    from muon_recipes.train.entry import build_model_and_optimizer, prepare
    from muon_recipes.train.profiling import summarize
    from muon_recipes.train.trainer import Trainer

    rc, device_type, replicate, shard = prepare(compose(overrides, ROOT / "conf"))
    rc.train.eval_every = 0  # no held-out data here
    ctx = init_distributed(device_type, rc.mesh.kind, replicate, shard, ep=rc.mesh.ep)
    try:
        model, optimizer = build_model_and_optimizer(rc, ctx)
        batches = RandomBatches(rc.model.vocab_size, rc.train.batch_size, rc.train.seq_len, rc.seed)
        # No run directory: nothing is logged or saved (no loggers, no checkpointer).
        trainer = Trainer(rc, ctx, tempfile.gettempdir(), model, optimizer, None, batches, None, None)
        start = time.perf_counter()
        for _ in range(warmup):
            trainer.train_step(profile=False)
        _synchronize(ctx.device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(profile=False)
        _synchronize(ctx.device)
        step_s = (time.perf_counter() - start) / max(steps, 1)
        tokens_per_s = trainer.tokens_per_step / step_s
        syncs_at = sync_locations(trainer)

        activities = [torch.profiler.ProfilerActivity.CPU]
        if ctx.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(profile_steps):
                trainer.train_step(profile=False)
            _synchronize(ctx.device)
        step_profile = summarize(prof.events(), ctx.device.type, steps=profile_steps)
        from muon_recipes.models.flops import param_counts

        counts = param_counts(rc.model)
        report = {
            "model": rc.model.name, "optim": rc.optim.name, "device": (torch.cuda.get_device_name(ctx.device)
                                                                       if ctx.device.type == "cuda" else "cpu"),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "overrides": list(overrides), "mesh": rc.mesh.kind, "compile": rc.train.compile,
            "tokens_per_step": trainer.tokens_per_step, "batch_size": rc.train.batch_size,
            "grad_accum": rc.train.grad_accum, "seq_len": rc.train.seq_len,
            "params_total": counts.total, "params_active": counts.active,
            "warmup_steps": warmup, "warmup_s": warmup_s, "timed_steps": steps, "step_s": step_s,
            "tokens_per_s": tokens_per_s,
            "mfu": (trainer.flops_per_token * tokens_per_s / trainer.peak_flops) if trainer.peak_flops else None,
            "sync_locations": syncs_at, "profile": step_profile.to_dict(),
        }
        return report, step_profile
    finally:
        shutdown_distributed()


def header(report: dict) -> str:
    mfu = f"{100 * report['mfu']:.1f}%" if report["mfu"] is not None else "— (CPU)"
    lines = [f"## {report['model']} + {report['optim']}: one training step on {report['device']}", "",
             f"`python recipes/profile_step.py {' '.join(report['overrides'])}` (torch {report['torch']}, "
             f"{report['date']}, mesh {report['mesh']}, compile {report['compile']})", "",
             f"{report['tokens_per_step']:,} tokens/step ({report['grad_accum']} x {report['batch_size']} x "
             f"{report['seq_len']}), {report['params_total'] / 1e6:.1f}M parameters, "
             f"{report['params_active'] / 1e6:.1f}M active; timed over {report['timed_steps']} steps after {report['warmup_steps']} warm-up steps: "
             f"{report['step_s'] * 1000:.1f} ms/step, {report['tokens_per_s']:,.0f} tokens/s, MFU {mfu}", ""]
    if report["device"] != "cpu":
        places = report["sync_locations"]
        lines += ["host syncs reported by `torch.cuda.set_sync_debug_mode(\"warn\")` in one step: "
                  + (", ".join(f"`{where}` x{n}" for where, n in places) if places else "none"), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=moe_small optim=muon_split")
    ap.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation, kernel tuning)")
    ap.add_argument("--steps", type=int, default=5, help="steps timed without the profiler")
    ap.add_argument("--profile-steps", type=int, default=1, help="steps under torch.profiler")
    ap.add_argument("--top", type=int, default=25, help="kernels in the second table")
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    for flag in ("warmup", "steps", "profile_steps", "top"):
        low = 0 if flag == "warmup" else 1
        if getattr(args, flag) < low:
            print(f"error: --{flag.replace('_', '-')}={getattr(args, flag)}: must be an integer >= {low}",
                  file=sys.stderr)
            return 2
    from muon_recipes.config import ConfigError, check_command_line

    error = check_command_line(args.overrides, str(ROOT / "conf"))
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        report, step_profile = profile(args.overrides, args.warmup, args.steps, args.profile_steps)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from muon_recipes.train.profiling import format_markdown

    text = header(report) + "\n" + format_markdown(step_profile, top=args.top, step_wall_s=report["step_s"]) + "\n"
    print(text, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
