"""The MoE efficiency table of `recipes/bench_moe_efficiency.sh`: trainer runs' tokens/s and active MFU against the
issue's targets, from the runs' own metrics.jsonl and config.json.

    python recipes/moe_efficiency_table.py --small RUN_DIR [RUN_DIR ...] --medium RUN_DIR --dense RUN_DIR

Per run, tokens/s and MFU are `recipe_runs_table.row`'s medians over the logged steps after the first (MFU counts
the active parameters: `models/flops.py`); tokens per step from the run's own counters. Targets: the small MoE
at >= 25% MFU, the medium MoE at >= 60% of the MFU of the dense model with as many active parameters at the same
tokens per step (`conf/model/dense_medium.yaml`). A run that did not finish is a row of dashes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe_runs_table import row as run_row  # noqa: E402

SMALL_TARGET_MFU = 0.25
MEDIUM_TARGET_RATIO = 0.60


def run_summary(run_dir: Path) -> Optional[dict]:
    """tokens/s, MFU, tokens/step, model, optim of a finished run; None when it has no logged step after the first."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists() or not (run_dir / "config.json").exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if len(rows) < 2:
        return None
    summary = run_row(run_dir)
    summary["tokens_per_step"] = rows[-1]["tokens"] // rows[-1]["step"]
    from muon_recipes.config import to_dataclass
    from muon_recipes.models.flops import param_counts

    config = json.loads((run_dir / "config.json").read_text())
    summary["active_params"] = param_counts(to_dataclass({"model": config["model"]}).model).active
    return summary


def _mfu(value: Optional[float]) -> str:
    return f"{100 * value:.1f}%" if value is not None else "—"


def _verdict(value: Optional[float], target: float) -> str:
    if value is None:
        return "—"
    return f"{'met' if value >= target else 'missed'} (>= {100 * target:.0f}%)"


def table(small: list, medium: Optional[Path], dense: Optional[Path]) -> str:
    lines = ["| run | model | optim | tokens/step | active params | tokens/s | MFU (active) | target |",
             "|---|---|---|---:|---:|---:|---:|---|"]

    def line(label: str, run_dir: Optional[Path], target: str = "") -> Optional[dict]:
        r = run_summary(run_dir) if run_dir is not None else None
        if r is None:
            lines.append(f"| {label} | — | — | — | — | — | — | not run or not finished |")
            return None
        lines.append(f"| {label} | {r['model']} | {r['optim']} | {r['tokens_per_step']:,} | "
                     f"{r['active_params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {_mfu(r['mfu'])} | {target} |")
        return r

    for run_dir in small:
        r = run_summary(run_dir)
        line(run_dir.name, run_dir, _verdict(r["mfu"], SMALL_TARGET_MFU) if r else "")
    moe = line(medium.name if medium else "medium MoE", medium)
    base = line(dense.name if dense else "dense", dense)
    ratio = None
    if moe and base and moe["mfu"] and base["mfu"]:
        ratio = moe["mfu"] / base["mfu"]
    lines += ["", f"MFU of {moe['model'] if moe else 'the MoE'} / MFU of {base['model'] if base else 'the dense model'}"
                  f" at the same tokens per step: {_mfu(ratio)}, target {_verdict(ratio, MEDIUM_TARGET_RATIO)}"]
    if moe and base:
        same = "the same" if moe["tokens_per_step"] == base["tokens_per_step"] else "DIFFERENT"
        lines.append(f"tokens per step: {moe['tokens_per_step']:,} and {base['tokens_per_step']:,} ({same}); active "
                     f"parameters {moe['active_params'] / 1e6:.1f}M and {base['active_params'] / 1e6:.1f}M")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", nargs="*", default=[], help="small-MoE trainer run directories (25%% MFU target)")
    ap.add_argument("--medium", default=None, help="the medium MoE's run directory")
    ap.add_argument("--dense", default=None, help="the dense run with as many active parameters, same tokens/step")
    args = ap.parse_args(argv)
    print(table([Path(d) for d in args.small], Path(args.medium) if args.medium else None,
                Path(args.dense) if args.dense else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
