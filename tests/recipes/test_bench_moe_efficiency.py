"""`recipes/bench_moe_efficiency.sh` dry-run on the CPU at a tiny size: every stage runs, the table reads the runs'
own metrics (tokens/s and MFU medians, tokens per step, the MFU ratio and the targets), the profile is written, and
the expert-load statistics are still logged by the trainer."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from script_runs import background_script

ROOT = Path(__file__).resolve().parents[2]
TINY = ("device=cpu mesh=single train.compile=false model.n_layers=2 model.d_model=64 model.n_heads=2 "
        "model.n_kv_heads=1 model.ffn_dim=128 model.expert_ffn_dim=64 model.vocab_size=300 data.max_chars=100000 "
        "train.seq_len=32 train.global_batch_tokens=256 train.batch_size=4")


def medians(run_dir: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steady = [r for r in rows[1:] if "eval_loss" not in r]
    return statistics.median(r["tokens_per_s"] for r in steady), statistics.median(r["mfu"] for r in steady)


@background_script("bench_moe_efficiency")
def _command(tmp_path: Path):
    # A made-up peak gives the CPU runs an MFU, so the ratio and the targets are computed as on a GPU.
    env = dict(WORK=str(tmp_path / "work"), SMALL="moe_tiny", MEDIUM="moe_tiny", DENSE="dense_tiny",
               STEPS_SMALL="3", STEPS_MEDIUM="3", EXTRA=TINY, MUON_RECIPES_PEAK_TFLOPS="0.0001", BUDGET="500")
    return ["bash", "recipes/bench_moe_efficiency.sh", str(tmp_path / "out")], env, 900


def test_bench_moe_efficiency_runs_every_stage_and_tabulates(script_runs):
    """The script runs in the background from the first recipe test on (`script_runs`)."""
    run = script_runs["bench_moe_efficiency"]
    proc, work, out = run.result(), run.work / "work", run.work / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("tests", "small-adamw", "medium", "dense", "profile", "small-muon"):
        assert f"{stage}: exit 0 in " in proc.stdout, (stage, proc.stdout[-3000:])
    table = (out / "moe_efficiency.md").read_text().splitlines()
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:6]}
    for name in ("small-adamw", "small-muon", "medium", "dense"):
        tokens_per_s, mfu = medians(work / "runs" / name)
        assert cells[name][4] == f"{tokens_per_s:,.0f}" and cells[name][5] == f"{100 * mfu:.1f}%", cells[name]
        assert cells[name][2] == "256"
    assert cells["small-adamw"][6].startswith("met (>= 25%)")  # a CPU at a made-up peak of 0.1 TFLOP/s
    ratio = medians(work / "runs" / "medium")[1] / medians(work / "runs" / "dense")[1]
    assert f"at the same tokens per step: {100 * ratio:.1f}%, target " in "\n".join(table)
    assert "tokens per step: 256 and 256 (the same)" in "\n".join(table)
    profile = (out / "moe_profile.md").read_text()
    assert "| routing/top-k/softmax | " in profile and "| total | " in profile
    assert profile in proc.stdout
    # The trainer still logs the per-layer expert loads at its log steps.
    rows = [json.loads(line) for line in (work / "runs" / "small-adamw" / "metrics.jsonl").open()]
    assert all("expert_load_max_over_mean" in r and "expert_load/layer0" in r for r in rows)
    assert all(r["expert_load_max_over_mean"] >= 1.0 for r in rows)


def test_a_run_that_did_not_finish_is_a_row_of_dashes(tmp_path):
    proc = subprocess.run(["python", "recipes/moe_efficiency_table.py", "--small", str(tmp_path / "missing"),
                           "--medium", str(tmp_path / "m"), "--dense", str(tmp_path / "d")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| missing | — | — | — | — | — | — | not run or not finished |" in proc.stdout
    assert "target —" in proc.stdout
