"""A real ablation sweep through `python train.py -m` (the trainer, data and optimizer, no stand-ins), then
compare_runs and the notebook on its output; and a sweep job run as its own torchrun world (gloo, 2 processes).

The module's multiruns do not depend on each other, and most run their jobs in one process: they are all started
at once, when the first test needs one of them (`multiruns`), each in its own sweep directory, and every test
waits for its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
import compare_runs as cr  # noqa: E402

TINY = ["model=gqa_tiny", "train.steps=6", "train.seq_len=32", "train.batch_size=4", "train.log_every=1",
        "train.eval_every=3", "train.eval_batches=1", "train.warmup_steps=2", "data.max_chars=100000",
        "logging.wandb.mode=disabled", "device=cpu"]


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def multirun(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def rows(run_dir: Path) -> list:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _multiruns(tmp_path_factory) -> dict[str, tuple]:
    """Each multirun of this module: name -> (sweep dir, overrides)."""
    def new(name: str) -> Path:
        return tmp_path_factory.mktemp(name) / "sweep"

    cases = {
        # experiment=qkv_split at CPU size: its default arms (optim.split.qkv=fused,split) x seeds 0,1 = 4 jobs.
        "sweep": (tmp_path_factory.mktemp("multirun") / "2025-01-31" / "12-00-00",
                  ["experiment=qkv_split", "seed=0,1", *TINY]),
        "torchrun_world": (new("torchrun_world"), [
            "launcher.nproc_per_node=2", "model.vocab_size=320,64", "experiment=qkv_split", "optim.split.qkv=split",
            "seed=0", "train.steps=3", "logging.wandb.mode=offline",
            *[o for o in TINY if not o.startswith(("train.steps", "logging"))]]),
        "bad_config": (new("bad_config"), ["launcher.nproc_per_node=2", "mesh=single", *TINY]),
        "diverged": (new("diverged"), ["optim=adamw", "optim.adamw.lr=1e30,0.003", "train.steps=3",
                                       *[o for o in TINY if not o.startswith("train.steps")]]),
    }
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        pass  # test_submitit_tasks_are_ranks skips
    else:
        cases["submitit"] = (new("submitit"), ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                                               "hydra.launcher.timeout_min=10", "train.steps=2",
                                               *[o for o in TINY if not o.startswith("train.steps")]])
    return cases


@pytest.fixture(scope="module")
def multiruns(tmp_path_factory):
    """Every multirun of the module, started at once: name -> (sweep dir, future of its completed process)."""
    cases = _multiruns(tmp_path_factory)
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        yield {name: (sweep_dir, pool.submit(multirun, sweep_dir, *overrides))
               for name, (sweep_dir, overrides) in cases.items()}


def finished(multiruns, name: str) -> tuple[Path, subprocess.CompletedProcess]:
    sweep_dir, future = multiruns[name]
    return sweep_dir, future.result()


@pytest.fixture(scope="module")
def sweep(multiruns):
    sweep_dir, proc = finished(multiruns, "sweep")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep_dir, proc.stdout


def test_every_job_is_a_complete_run_of_its_arm(sweep):
    sweep_dir, stdout = sweep
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    arms = []
    for job in jobs:
        assert (job / ".hydra" / "overrides.yaml").is_file() and (job / ".hydra" / "config.yaml").is_file()
        cfg = json.loads((job / "config.json").read_text())
        assert [r["step"] for r in rows(job)] == [1, 2, 3, 4, 5, 6]
        arms.append((cfg["optim"]["split"]["qkv"], cfg["seed"]))
        assert cfg["experiment"]["name"] == "qkv_split" and cfg["model"]["name"] == "gqa_tiny"
    assert arms == [("fused", 0), ("fused", 1), ("split", 0), ("split", 1)]
    # The swept rule reached the optimizer: the QKV group is whole in one arm, (q, k, v) blocks in the other.
    assert stdout.count("muon[qkv=fused]") == 2 and stdout.count("muon[qkv=split(128+64+64)]") == 2
    assert "[sweep] job 4/4 done" in stdout
    # Same seed, same data and init: the arms start from the same loss and then part ways.
    by = {arm: rows(job) for arm, job in zip(arms, jobs)}
    assert by[("fused", 0)][0]["loss"] == pytest.approx(by[("split", 0)][0]["loss"], rel=1e-6)
    assert by[("fused", 0)][-1]["loss"] != by[("split", 0)][-1]["loss"]


def test_sweep_wandb_identity(sweep):
    sweep_dir, _ = sweep
    identities = [json.loads((sweep_dir / n / "config.json").read_text())["logging"]["wandb"] for n in "0123"]
    assert {w["group"] for w in identities} == {"qkv_split-2025-01-31_12-00-00"}  # one group per sweep
    names = [w["name"] for w in identities]
    assert names == ["qkv_split-optim.split.qkv=fused-s0", "qkv_split-optim.split.qkv=fused-s1",
                     "qkv_split-optim.split.qkv=split-s0", "qkv_split-optim.split.qkv=split-s1"]
    assert identities[3]["tags"] == ["qkv_split", "optim.split.qkv=split", "seed=1"]


def _recompute(job: Path, last_k: int) -> dict:
    """The summary's definitions, recomputed from metrics.jsonl alone."""
    r = rows(job)
    steady = r[1:]
    no_eval = [x for x in steady if "eval_loss" not in x]
    return {"final loss": float(np.mean([x["loss"] for x in r[-last_k:]])),
            "final eval loss": [x["eval_loss"] for x in r if "eval_loss" in x][-1],
            "final eval bpb": [x["eval_bpb"] for x in r if "eval_bpb" in x][-1],
            "tokens/s": float(np.median([x["tokens_per_s"] for x in no_eval])),
            "step time (s)": float(np.median([x["step_time_s"] for x in no_eval]))}


def test_compare_runs_on_the_sweep(sweep):
    sweep_dir, _ = sweep
    proc = subprocess.run([sys.executable, "recipes/compare_runs.py", str(sweep_dir), "--last-k", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in cr.PLOTS:
        png = sweep_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
    summary = json.loads((sweep_dir / "summary.json").read_text())
    table = (sweep_dir / "summary.md").read_text()
    assert summary["swept_keys"] == ["optim.split.qkv"]
    arm_jobs = {"optim.split.qkv=fused": ["0", "1"], "optim.split.qkv=split": ["2", "3"]}
    expected = {arm: [_recompute(sweep_dir / j, 3) for j in jobs] for arm, jobs in arm_jobs.items()}
    for arm, per_run in expected.items():
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {arm} |"))
        cells = re.findall(r"(-?[\d.]+) ± (-?[\d.]+)", line)
        for (mean_cell, std_cell), metric in zip(cells, cr.METRICS):
            values = [run[metric] for run in per_run]
            mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
            got = summary["arms"][arm][metric]
            assert got["n"] == 2
            assert got["mean"] == pytest.approx(mean, rel=1e-9) and got["std"] == pytest.approx(std, rel=1e-6)
            digits = cr.DIGITS[metric]  # the markdown shows the same numbers, rounded
            assert float(mean_cell) == pytest.approx(mean, abs=0.51 * 10 ** -digits)
            assert float(std_cell) == pytest.approx(std, abs=0.51 * 10 ** -digits)
    fused = [run["final loss"] for run in expected["optim.split.qkv=fused"]]
    split = [run["final loss"] for run in expected["optim.split.qkv=split"]]
    diff = summary["differences"]["optim.split.qkv=split"]["final loss"]
    assert diff["diff"] == pytest.approx(np.mean(split) - np.mean(fused), rel=1e-9)
    assert diff["se"] == pytest.approx(np.sqrt(np.var(fused, ddof=1) / 2 + np.var(split, ddof=1) / 2), rel=1e-6)
    assert "## Differences vs `optim.split.qkv=fused`" in table
    # Ranked by final eval bpb, lowest first, with the arms' means.
    ranked = sorted(expected, key=lambda arm: np.mean([run["final eval bpb"] for run in expected[arm]]))
    section = table.split("## Arms ranked by final eval bpb (lowest first)")[1].split("##")[0]
    assert re.findall(r"`([^`]+)`", section) == ranked


def test_notebook_runs_headless_on_the_sweep(sweep, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sweep_dir, _ = sweep
    monkeypatch.setenv("SWEEP_DIR", str(sweep_dir))
    monkeypatch.setenv("OUT_DIR", str(tmp_path))
    monkeypatch.setenv("LAST_K", "3")
    nb = nbformat.read(ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 6  # the five report figures and the any-column plot
    # The notebook computes what the script computes.
    ours = cr.summary_markdown(cr.compare(sweep_dir, last_k=3))
    assert (tmp_path / "summary.md").read_text() == ours


def test_sweep_job_as_torchrun_world(multiruns):
    """launcher.nproc_per_node=2: each job is a 2-process torchrun run in its job dir (wandb offline, as by
    default). Job 0 trains; job 1 fails in its children (a vocabulary smaller than the tokenizer's, which only the
    trainer checks), which fails the sweep after the other jobs ran, naming the job dir."""
    sweep_dir, proc = finished(multiruns, "torchrun_world")
    assert proc.returncode != 0
    assert "[sweep] job 1/2 done" in proc.stdout and "(torchrun, 2 processes)" in proc.stdout
    assert "[sweep] job 2/2 FAILED" in proc.stdout and "error: invalid config: model.vocab_size=64" in proc.stderr
    assert "sweep job 1 " in proc.stderr and str(sweep_dir / "1") in proc.stderr
    job = sweep_dir / "0"
    r = rows(job)
    assert [x["step"] for x in r] == [1, 2, 3]
    assert r[0]["tokens"] == 2 * 4 * 32  # world size 2 x batch_size 4 x seq_len 32
    overrides = (job / ".hydra" / "overrides.yaml").read_text()
    assert "launcher.nproc_per_node=2" in overrides and "hydra" not in overrides  # the job's overrides only
    cfg = json.loads((job / "config.json").read_text())
    assert cfg["logging"]["wandb"]["group"] == f"qkv_split-{sweep_dir.parent.name}_sweep"
    assert cfg["logging"]["wandb"]["name"] == "qkv_split-model.vocab_size=320-s0"  # identity handed to the children
    # ... and it reached wandb: the offline run (synced later with `wandb sync`) carries the group and the name.
    (record,) = (job / "wandb").glob("offline-run-*/run-*.wandb")
    assert f"qkv_split-{sweep_dir.parent.name}_sweep".encode() in record.read_bytes()
    assert b"qkv_split-model.vocab_size=320-s0" in record.read_bytes()


def test_bad_config_fails_before_any_process_starts(multiruns):
    sweep_dir, proc = finished(multiruns, "bad_config")
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "mesh.kind" in errors[0] and "world size is 2" in errors[0]
    assert not (sweep_dir / "0" / "metrics.jsonl").exists()


def test_diverged_job_fails_alone(multiruns):
    """In process, a run that ends itself (non-finite loss at an absurd lr: exit code 3) fails only its job; the
    next job still trains and the sweep exits non-zero naming the failed job."""
    sweep_dir, proc = finished(multiruns, "diverged")
    assert proc.returncode == 1
    assert "[sweep] job 1/2 FAILED" in proc.stdout and "[sweep] job 2/2 done" in proc.stdout
    assert "exited with code 3" in proc.stderr and str(sweep_dir / "0") in proc.stderr
    assert [x["step"] for x in rows(sweep_dir / "1")] == [1, 2, 3]


@pytest.mark.distributed
def test_submitit_tasks_are_ranks(multiruns):
    """hydra/launcher=submitit_local with 2 tasks: the path `hydra/launcher=slurm` takes on a cluster (one task per
    GPU, ranks exported from the submitit job environment), here with gloo on CPU."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir, proc = finished(multiruns, "submitit")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = rows(sweep_dir / "0")
    assert [x["step"] for x in r] == [1, 2] and r[0]["tokens"] == 2 * 4 * 32  # world size 2
