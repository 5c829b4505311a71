"""Training moe_tiny through the real trainer: muon_split lowers the held-out loss faster than adamw.

Both arms use their configs' tuned defaults, the same data, seed, step budget and schedule. Slow (two short
CPU trainings, a minute or two), so it runs only when selected: `pytest -m slow tests/optim`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["model=moe_tiny", "mesh=single", "device=cpu", "seed=0", "logging.wandb.mode=disabled",
        "data.max_chars=300000", "train.seq_len=64", "train.batch_size=16", "train.steps=80",
        "train.warmup_steps=10", "train.log_every=10", "train.eval_every=80", "train.eval_batches=8"]


def final_eval_loss(run_dir: Path, optim: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "train.py", *ARGS, f"optim={optim}", f"run_dir={run_dir}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r][-1]


@pytest.mark.slow
def test_muon_split_beats_adamw_on_moe_tiny(tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: select with -m slow")
    muon = final_eval_loss(tmp_path / "muon_split", "muon_split")
    adamw = final_eval_loss(tmp_path / "adamw", "adamw")
    print(f"moe_tiny, 80 steps: eval loss muon_split {muon:.4f}, adamw {adamw:.4f}")
    assert muon < adamw - 0.05, (muon, adamw)
