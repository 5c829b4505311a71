"""End-to-end trainer tests through the real entry point (`train.py` under python / torchrun, gloo on CPU).

Runs that do not depend on each other (a 1-process reference and the 2-process run compared with it, two seeds)
are started at the same time (`at_once`): each is still its own process with its own run directory, and a
single-process run leaves a core idle on a small runner while it waits for its imports and steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

COMMON = ["device=cpu", "logging.wandb.mode=disabled", "train.log_every=1", "train.eval_every=0",
          "data.max_chars=300000", "train.seq_len=64", "train.warmup_steps=2"]


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def train(run_dir: Path, *overrides: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "train.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py"]
    cmd += [*COMMON, f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def at_once(*runs):
    """Call every zero-argument function in `runs` at the same time (each starts its own processes); their results
    in order. An error of one is raised after all have finished."""
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = [pool.submit(run) for run in runs]
        return [f.result() for f in futures]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


@pytest.mark.distributed
@pytest.mark.parametrize("optim", ["adamw", "muon_split"])
def test_two_process_fsdp_equals_one_process(tmp_path, optim):
    """Same global batch, same init: the 2-rank sharded run reproduces the 1-rank loss curve."""
    args = ["model=moe_tiny", f"optim={optim}", "train.steps=8", "optim.ns_dtype=float32"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    at_once(lambda: train(one, *args, "train.batch_size=8", nproc=1),
            lambda: train(two, *args, "train.batch_size=4", nproc=2))
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 8
    assert a[-1] < a[0]
    for x, y in zip(a, b):
        assert abs(x - y) < 2e-4 * max(1.0, abs(x)), (a, b)


@pytest.mark.distributed
def test_different_batch_changes_curve(tmp_path):
    """The equality test above can fail: a different data order gives a different curve."""
    args = ["model=dense_tiny", "optim=adamw", "train.steps=3", "train.batch_size=8"]
    at_once(lambda: train(tmp_path / "a", *args, "seed=0"), lambda: train(tmp_path / "b", *args, "seed=1"))
    assert losses(tmp_path / "a")[-1] != losses(tmp_path / "b")[-1]


BAD_CONFIGS = [
    ("optim.lr=-0.1", "optim.lr"),
    ("model.n_kv_heads=3", "model.n_kv_heads"),
    ("train.seq_len=100000", "train.seq_len"),
    ("mesh=hsdp", "mesh"),
    ("device=tpu", "device"),
]


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory):
    """Each bad value's `python train.py` process (its own run dir), all started at once: {override: (run dir,
    completed process)}."""
    def run(override):
        run_dir = tmp_path_factory.mktemp("bad") / "bad"
        extra = ["mesh.replicate=3"] if override == "mesh=hsdp" else []
        return run_dir, train(run_dir, override, *extra, check=False)

    return dict(zip([o for o, _ in BAD_CONFIGS], at_once(*[lambda o=o: run(o) for o, _ in BAD_CONFIGS])))


@pytest.mark.parametrize("override,key", BAD_CONFIGS)
def test_bad_config_one_line_exit_2(bad_config_runs, override, key):
    run_dir, proc = bad_config_runs[override]
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid config: " + key), proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.distributed
def test_bad_mesh_fails_on_every_rank(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         *COMMON, f"run_dir={tmp_path}", "mesh=hsdp", "mesh.replicate=3"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    """Under torchrun: the first line is the cause, printed once (by rank 0); every rank exits 2 (none dies by the
    SIGTERM torchrun sends once the first has exited), and torchrun's failure summary repeats the cause for each."""
    assert proc.returncode == 1  # torchrun's own code for a failed job
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: invalid config: mesh.replicate='3x0'"), proc.stderr
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[0]], proc.stderr
    assert proc.stderr.count("exitcode  : 2") == 2 and "SIGTERM" not in proc.stderr.split("ChildFailedError")[1]
    assert proc.stderr.count(f"traceback : {lines[0]}") == 2, proc.stderr


def test_periodic_eval_and_empty_held_out_split(tmp_path):
    """eval_loss is logged at every eval_every-th step and the last; with no held-out data (eval_fraction=0)
    the run says so once and trains to the end instead of failing at its first evaluation."""
    evaluated, empty = tmp_path / "eval", tmp_path / "no_eval"
    _, proc = at_once(
        lambda: train(evaluated, "model=dense_tiny", "train.steps=5", "train.eval_every=2", "train.eval_batches=1"),
        lambda: train(empty, "model=dense_tiny", "train.steps=3", "train.eval_every=2", "data.eval_fraction=0"))
    rows = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 5]

    rows = [json.loads(line) for line in (empty / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and not any("eval_loss" in r for r in rows)
    assert "no evaluation" in proc.stdout


@pytest.mark.distributed
def test_global_batch_gives_the_same_steps_on_one_and_two_ranks(tmp_path):
    """train.global_batch_tokens fixes the optimization whatever the world size: 512 tokens = 8 sequences of 64 are
    2 micro-batches of 4 accumulated on one rank, or one micro-batch of 4 on each of two ranks. The start-up line
    says which."""
    args = ["model=moe_tiny", "optim=adamw", "train.steps=6", "train.global_batch_tokens=512", "train.batch_size=4"]
    one, two = at_once(lambda: train(tmp_path / "one", *args, nproc=1), lambda: train(tmp_path / "two", *args, nproc=2))
    assert "512 tokens/step = 8 x 64 = 1 rank x micro-batch 4 x 2 accumulation steps" in one.stdout
    assert "512 tokens/step = 8 x 64 = 2 ranks x micro-batch 4 x 1 accumulation step " in two.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6 and a[-1] < a[0]
    for x, y in zip(a, b):
        assert abs(x - y) < 2e-4 * max(1.0, abs(x)), (a, b)
