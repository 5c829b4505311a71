"""The table of recipe runs: throughput, MFU, the optimizer's share of a step, time to the first step, and the
recipe's projected wall time, from the runs' own metrics.jsonl and config.json.

    python recipes/recipe_runs_table.py outputs/recipes/*/        # one row per run directory

Per run: tokens/s and MFU are medians over the logged steps after the first (which pays for compilation and
kernel tuning); the optimizer's share is the median of optim_time_s / step_time_s over those steps (logged steps
synchronize the GPU around the optimizer, so the split is real); time to first step is the run's
`time_to_first_step_s` (process start to the end of step 1: data, model, compile, kernel tuning). The projected
wall time is the recipe's whole budget (conf/recipe/<model>.yaml: steps x global batch) at the measured
tokens/s on one GPU, and on 8 GPUs assuming linear scaling (an upper bound on the speed-up, not a measurement).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe_budget_tokens(model: str, config: dict) -> int:
    """The budget of the model's recipe file (a run may have been cut short with train.steps/tokens)."""
    from omegaconf import OmegaConf

    path = ROOT / "conf" / "recipe" / f"{model}.yaml"
    if not path.exists():
        return config["train"]["steps"] * config["train"]["global_batch_tokens"]
    recipe = OmegaConf.load(path).train
    return int(recipe.steps) * int(recipe.global_batch_tokens)


def row(run_dir: Path) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in rows[1:] if "eval_loss" not in r] or rows
    median = lambda key: statistics.median(r[key] for r in steady if r.get(key) is not None)  # noqa: E731
    tokens_per_s = median("tokens_per_s")
    budget = recipe_budget_tokens(config["model"]["name"], config)
    return {"run": run_dir.name, "model": config["model"]["name"], "optim": config["optim"]["name"],
            "tokens_per_s": tokens_per_s,
            "mfu": median("mfu") if any("mfu" in r for r in steady) else None,
            "optimizer_share": statistics.median(r["optim_time_s"] / r["step_time_s"] for r in steady),
            "time_to_first_step_s": rows[0].get("time_to_first_step_s"),
            "budget_tokens": budget, "wall_1gpu_s": budget / tokens_per_s, "wall_8gpu_s": budget / tokens_per_s / 8}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def main(argv=None) -> int:
    dirs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    runs = [row(d) for d in dirs if (d / "metrics.jsonl").exists() and (d / "config.json").exists()]
    if not runs:
        print("error: no run directory with metrics.jsonl and config.json given", file=sys.stderr)
        return 2
    print("| run | model | optim | tokens/s | MFU | optimizer share | time to first step | recipe budget | "
          "projected, 1 GPU | 8 GPUs (linear) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
        first = f"{r['time_to_first_step_s']:.1f} s" if r["time_to_first_step_s"] is not None else "—"
        print(f"| {r['run']} | {r['model']} | {r['optim']} | {r['tokens_per_s']:,.0f} | {mfu} | "
              f"{100 * r['optimizer_share']:.1f}% | {first} | {r['budget_tokens'] / 1e6:.1f}M | "
              f"{_minutes(r['wall_1gpu_s'])} | {_minutes(r['wall_8gpu_s'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
