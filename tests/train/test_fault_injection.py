"""Fault injection: ranks SIGKILLed at random points, each kill followed by `train.resume=auto`, add up to the
straight run -- one metrics row per step, the same losses bit for bit, no temporary directory left behind.

One chain of real 2-rank torchrun jobs in one run directory: job 1 starts the run, a random rank of it is
SIGKILLed at a random point, job 2 (the same command, `train.resume=auto`) resumes, and is itself the next
victim; after the last kill, a final job runs to the end. The kill points, drawn from a seeded generator:

* mid-step: after the job logged a new step, within the next few steps (forward, backward, optimizer, logging);
* mid-save: the moment a `.tmp-step-*` directory of this job appears (DCP writing the shards, rank files,
  marker, rename);
* mid-resume: at a random time after the ranks exist, before or during start-up (imports, data, model,
  checkpoint load, setting newer rows and checkpoints aside).

After every kill, what is on disk must be a prefix of the straight run: metrics rows with increasing steps and the
straight run's losses (a torn last line allowed), complete checkpoints only under `step-*`. Every job that got as
far as logging must have removed the temporary directories of the jobs before it. The straight run (its own run
directory) runs alongside the first jobs of the chain; the rows each kill left are kept and compared with it once
it has finished. The seed is printed; set FAULT_INJECTION_SEED to replay a failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from torchrun_jobs import finish, losses, rank_pids, start, torchrun, wait_for  # noqa: E402

pytestmark = pytest.mark.distributed

# Jobs killed before the final one; every kind of kill point comes first (in a random order), then random ones.
# FAULT_INJECTION_KILLS=20 for a longer chain.
KILLS = int(os.environ.get("FAULT_INJECTION_KILLS", 6))
STEPS = 14
CONFIG = ["model=dense_tiny", "optim=muon_split", "device=cpu", "logging.wandb.mode=disabled",
          "logging.progress=false", "train.seq_len=64", "train.batch_size=2", "data.max_chars=60000",
          "train.log_every=1", "train.eval_every=0", "train.warmup_steps=2", "optim.ns_dtype=float32",
          f"train.steps={STEPS}", "train.checkpoint.every=2", "train.checkpoint.keep=2"]
KINDS = ("mid-step", "mid-save", "mid-resume")


def _leftovers(run_dir: Path, older_than: float = float("inf")) -> list[str]:
    """Temporary directories and files of saves and metrics rewrites, modified before `older_than`."""
    found = []
    ckpts = run_dir / "checkpoints"
    candidates = [p for p in ckpts.iterdir() if p.name.startswith((".tmp-", ".trash-"))] if ckpts.is_dir() else []
    candidates += [p for p in run_dir.glob("*.tmp")]
    for path in candidates:
        try:
            if path.stat().st_mtime < older_than:
                found.append(path.name)
        except FileNotFoundError:  # removed meanwhile
            pass
    return found


def _logged_steps(run_dir: Path) -> list[int]:
    """Steps of metrics.jsonl's rows; a torn last line (a job killed while writing it) is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines()
    steps = []
    for i, line in enumerate(lines):
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            assert i == len(lines) - 1, f"line {i + 1} of {len(lines)} of metrics.jsonl is torn"
    return steps


def _new_tmp_dir(run_dir: Path, since: float):
    ckpts = run_dir / "checkpoints"
    try:
        return [n for n in os.listdir(ckpts) if n.startswith(".tmp-step-") and (ckpts / n).stat().st_mtime >= since]
    except FileNotFoundError:
        return None


def _kill_at_random_point(kind: str, rng: random.Random, proc, run_dir: Path, started: float) -> str:
    """Wait for the kind's moment, SIGKILL a random rank; says what happened (for the failure message)."""
    victim = rng.randrange(2)
    ranks = wait_for(lambda: (lambda found: found if len(found) == 2 else None)(rank_pids(proc.pid)), proc,
                     timeout=120, poll=0.02)
    if ranks is None:
        return "the job ended before its ranks were seen"
    if kind == "mid-resume":
        time.sleep(rng.uniform(0.0, 4.0))
    elif kind == "mid-step":
        before = len(_logged_steps(run_dir))
        if not wait_for(lambda: len(_logged_steps(run_dir)) > before, proc, timeout=120, poll=0.005):
            return "the job ended before it logged a step"
        assert not _leftovers(run_dir, older_than=started), "a resumed job logged with leftovers still there"
        time.sleep(rng.uniform(0.0, 0.6))
    else:
        if not wait_for(lambda: _new_tmp_dir(run_dir, started), proc, timeout=120):
            return "the job ended before it saved"
    if proc.poll() is not None:
        return "the job had ended"
    try:
        os.kill(ranks[victim], signal.SIGKILL)
    except ProcessLookupError:
        return f"rank {victim} was gone already"
    return f"killed rank {victim}"


def test_random_kills_then_resume_add_up_to_the_straight_run(tmp_path):
    seed = int(os.environ.get("FAULT_INJECTION_SEED", time.time_ns() % 2**31))
    print(f"fault injection seed: {seed} (FAULT_INJECTION_SEED={seed} replays it)")
    rng = random.Random(seed)

    # The straight run (in its own directory, sharing nothing with the chain but the data cache) runs while the
    # chain of killed jobs starts: the chain leaves part of a small runner's cores idle (start-up, kill waits,
    # teardown). What each kill left on disk is kept and compared with the straight run once it has finished.
    straight_dir = tmp_path / "straight"
    straight_log = tmp_path / "straight.log"
    straight_proc = start(torchrun(*CONFIG, f"run_dir={straight_dir}"), straight_log)
    straight: dict = {}
    unchecked: list[tuple[str, bytes]] = []   # (failure context, metrics.jsonl) of kills not yet compared

    def compare_with_straight(wait: bool) -> None:
        if not straight and (wait or straight_proc.poll() is not None):
            output = finish(straight_proc, straight_log, timeout=300)
            assert straight_proc.returncode == 0, output[-3000:]
            straight.update(losses(straight_dir))
            assert sorted(straight) == list(range(1, STEPS + 1))
        while straight and unchecked:
            context, metrics = unchecked.pop(0)
            assert _prefix_of(metrics, straight), context

    run_dir = tmp_path / "run"
    history = []
    kinds = rng.sample(KINDS, len(KINDS)) + [rng.choice(KINDS) for _ in range(max(0, KILLS - len(KINDS)))]
    try:
        for i, kind in enumerate(kinds):
            log = tmp_path / f"job-{i}.log"
            started = time.time() - 1  # file times have coarse resolution on some file systems
            proc = start(torchrun(*CONFIG, f"run_dir={run_dir}"), log)
            try:
                what = _kill_at_random_point(kind, rng, proc, run_dir, started)
            finally:
                output = finish(proc, log, timeout=300)
            history.append(f"job {i}: {kind}: {what}, exit {proc.returncode}")
            context = f"seed {seed}; " + "; ".join(history) + "\n" + output[-3000:]
            steps = _logged_steps(run_dir)
            assert steps == sorted(set(steps)), context
            unchecked.append((context, _metrics(run_dir)))
            compare_with_straight(wait=False)
            complete = [p for p in (run_dir / "checkpoints").glob("step-*")]
            assert all((p / "COMPLETE").exists() for p in complete), context
        compare_with_straight(wait=True)
    finally:
        finish(straight_proc, straight_log, timeout=300)

    print("\n".join(history))
    log = tmp_path / "final.log"
    proc = start(torchrun(*CONFIG, f"run_dir={run_dir}"), log)
    output = finish(proc, log, timeout=300)
    context = f"seed {seed}; " + "; ".join(history) + "\n" + output[-3000:]
    assert proc.returncode == 0, context
    assert _logged_steps(run_dir) == list(range(1, STEPS + 1)), context
    assert losses(run_dir) == straight, context
    assert not _leftovers(run_dir), context


def _metrics(run_dir: Path) -> bytes:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes() if path.exists() else b""


def _prefix_of(metrics: bytes, straight: dict) -> bool:
    """Every whole row of `metrics` (metrics.jsonl's bytes) has the straight run's loss for its step."""
    for line in metrics.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the torn last line (checked by _logged_steps)
        if row["loss"] != straight[row["step"]]:
            return False
    return True
