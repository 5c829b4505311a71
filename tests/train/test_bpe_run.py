"""`torchrun --nproc_per_node=2 train.py model=gqa_tiny data.tokenizer=bpe`, twice: the first run fits the BPE and
tokenizes the corpus once for both ranks; the second does neither (its log says so) and repeats the first's losses
exactly. Both log bits per byte next to every loss."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(run_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), "model=gqa_tiny", "data.tokenizer=bpe", "data.max_chars=300000",
               "device=cpu", "logging.wandb.mode=disabled", "train.steps=4", "train.warmup_steps=1",
               "train.seq_len=64", "train.batch_size=4", "train.log_every=1", "train.eval_every=2",
               "train.eval_batches=2", f"run_dir={run_dir}"]
    env = dict(os.environ, MUON_RECIPES_CACHE=str(cache), OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_second_bpe_run_reuses_the_cache_and_repeats_the_losses(tmp_path):
    first = _torchrun(tmp_path / "first", tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert log.count("fitting a byte-level BPE of 320 entries") == 1
    assert log.count("data: tokenizing") == 1

    second = _torchrun(tmp_path / "second", tmp_path / "cache")
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "fitting a byte-level BPE" not in log and "data: tokenizing" not in log
    assert "from the cache (no fitting)" in log and "tokens from the cache (no tokenizing)" in log

    rows, again = _metrics(tmp_path / "first"), _metrics(tmp_path / "second")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in again]
    assert [r.get("eval_bpb") for r in rows] == [r.get("eval_bpb") for r in again]
    for row in rows:  # a fitted BPE's tokens hold more than one byte each on average: fewer bits per byte than per token
        assert 0 < row["bpb"] < row["loss"] / math.log(2)
    assert [r["step"] for r in rows if "eval_bpb" in r] == [2, 4]
