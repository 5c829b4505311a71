"""`recipes/ab_throughput.sh` dry-run on the CPU: both trees train, one row per run from the runs' own metrics, the
median line compares the two sides, and the base tree's profile runs with the candidate's profiler."""

from __future__ import annotations

import json
from pathlib import Path

from script_runs import background_script

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=moe_tiny", "optim=adamw", "device=cpu", "train.compile=false", "train.seq_len=32", "train.batch_size=4",
        "train.global_batch_tokens=256", "data.max_chars=100000"]


@background_script("ab_throughput")
def _command(tmp_path: Path):
    env = dict(ROUNDS="1", STEPS="2", PROFILE="1", LIMIT="300", MUON_RECIPES_CACHE=str(tmp_path / "cache"))
    return ["bash", "recipes/ab_throughput.sh", str(ROOT), str(tmp_path / "out"), *TINY], env, 900


def test_ab_throughput_tabulates_both_trees(script_runs):
    """The script runs in the background from the first recipe test on (`script_runs`)."""
    run = script_runs["ab_throughput"]
    proc, tmp_path = run.result(), run.work
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "out" / "table.md").read_text()
    for side in ("base", "candidate"):
        metrics = [json.loads(line) for line in
                   (tmp_path / "out" / "runs" / f"{side}-1" / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 2
        row = next(line for line in table.splitlines() if line.startswith(f"| {side}-1 |"))
        assert "| moe_tiny | adamw |" in row
        assert (tmp_path / "out" / f"profile_{side}.md").read_text().startswith("## moe_tiny + adamw")
    assert "median tokens/s: base " in table and "(1 runs), candidate " in table
