"""`recipes/ab_throughput.sh` dry-run on the CPU: both trees train, one row per run from the runs' own metrics, the
median line compares the two sides, and the base tree's profile runs with the candidate's profiler."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=moe_tiny", "optim=adamw", "device=cpu", "train.compile=false", "train.seq_len=32", "train.batch_size=4",
        "train.global_batch_tokens=256", "data.max_chars=100000"]


def test_ab_throughput_tabulates_both_trees(tmp_path):
    env = dict(os.environ, ROUNDS="1", STEPS="2", PROFILE="1", LIMIT="300",
               MUON_RECIPES_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", "recipes/ab_throughput.sh", str(ROOT), str(tmp_path / "out"), *TINY], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
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
