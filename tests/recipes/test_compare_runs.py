"""compare_runs on run directories written here (the layout the trainer writes), and its statistics against
published reference values. The end-to-end test on a real sweep is in test_sweep_end_to_end.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
import compare_runs as cr  # noqa: E402


def write_run(run_dir: Path, overrides: list, config: dict, rows: list) -> None:
    """A run dir as train.py leaves it: .hydra/overrides.yaml, config.json, metrics.jsonl."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_rows(rng: np.random.Generator, steps: int, offset: float, with_optim_timers: bool = True) -> list:
    rows, wall = [], 0.0
    for step in range(1, steps + 1):
        step_time = 0.05 + 0.005 * rng.random()
        wall += step_time
        row = {"step": step, "loss": 5.5 * math.exp(-step / 10) + 2 + offset + 0.02 * rng.standard_normal(),
               "lr": 0.02, "tokens": 512 * step, "step_time_s": step_time, "tokens_per_s": 512 / step_time,
               "wall_time_s": wall, "grad_norm": 1.0, "forward_backward_s": 0.6 * step_time,
               "optim_time_s": 0.3 * step_time}
        if with_optim_timers:
            row.update(optim_ns_s=0.2 * step_time, optim_comm_s=0.05 * step_time, optim_other_s=0.05 * step_time)
        if step % 5 == 0:
            row["eval_loss"] = row["loss"] + 0.1
        rows.append(row)
    return rows


def config(qkv: str, seed: int, lr: float = 0.02) -> dict:
    return {"seed": seed, "model": {"name": "gqa_tiny"},
            "optim": {"name": "muon_split", "lr": lr, "split": {"qkv": qkv}}, "experiment": {"name": "qkv_split"}}


@pytest.fixture
def sweep(tmp_path):
    """2 arms x 3 seeds, job dirs 0..5 as Hydra numbers them; arm `split` is lower by 0.05."""
    rng = np.random.default_rng(0)
    num = 0
    for qkv, offset in (("fused", 0.0), ("split", -0.05)):
        for seed in range(3):
            overrides = [f"optim.split.qkv={qkv}", f"seed={seed}", "experiment=qkv_split", "device=cpu",
                         f"run_dir={tmp_path / str(num)}"]
            write_run(tmp_path / str(num), overrides, config(qkv, seed), fake_rows(rng, 20, offset))
            num += 1
    return tmp_path


def test_arms_are_the_differing_overrides_without_seed(sweep):
    c = cr.compare(sweep)
    assert c.keys == ["optim.split.qkv"]  # seed, run_dir (differs per run) and constant overrides are not arms
    assert c.arms == ["optim.split.qkv=fused", "optim.split.qkv=split"]
    assert c.baseline == "optim.split.qkv=fused"
    assert [r.path.name for r in c.runs] == [str(i) for i in range(6)]
    assert [sorted(r.seed for r in c.runs_of(a)) for a in c.arms] == [[0, 1, 2], [0, 1, 2]]


def test_launch_and_logging_overrides_are_not_arms(tmp_path):
    """Runs that differ only in how they were launched or logged (processes per job, wandb mode) are one arm;
    the swept optimizer setting still splits them."""
    rng = np.random.default_rng(1)
    for num, (qkv, procs, mode) in enumerate([("fused", 1, "offline"), ("fused", 2, "disabled"),
                                               ("split", 1, "offline"), ("split", 2, "disabled")]):
        overrides = [f"optim.split.qkv={qkv}", f"launcher.nproc_per_node={procs}", f"logging.wandb.mode={mode}",
                     "seed=0", f"run_dir={tmp_path / str(num)}"]
        write_run(tmp_path / str(num), overrides, config(qkv, 0), fake_rows(rng, 10, 0.0))
    c = cr.compare(tmp_path)
    assert c.keys == ["optim.split.qkv"]
    assert c.arms == ["optim.split.qkv=fused", "optim.split.qkv=split"]


def test_summary_numbers_and_welch_difference(sweep):
    c = cr.compare(sweep, last_k=3)
    per_arm = {}
    for arm in c.arms:
        finals = []
        for r in c.runs_of(arm):
            rows = [json.loads(x) for x in (r.path / "metrics.jsonl").read_text().splitlines()]
            finals.append(sum(row["loss"] for row in rows[-3:]) / 3)
        per_arm[arm] = finals
        s = c.stats[arm]["final loss"]
        assert s.n == 3
        assert s.mean == pytest.approx(sum(finals) / 3, rel=1e-12)
        assert s.std == pytest.approx(float(np.std(finals, ddof=1)), rel=1e-9)
    d = c.diffs["optim.split.qkv=split"]["final loss"]
    a, b = per_arm["optim.split.qkv=fused"], per_arm["optim.split.qkv=split"]
    assert d.diff == pytest.approx(np.mean(b) - np.mean(a), rel=1e-9)
    assert d.se == pytest.approx(math.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 3), rel=1e-9)
    assert -0.08 < d.diff < -0.02 and d.high < 0  # the planted 0.05 gap is found and is outside the noise


def test_student_t_matches_tables():
    # Two-sided 95% critical values of Student's t (any statistics table).
    for dof, expected in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (1e7, 1.960)):
        assert cr.student_t_ppf(0.975, dof) == pytest.approx(expected, abs=1e-3)
    assert cr.student_t_cdf(0.0, 3) == pytest.approx(0.5)
    assert cr.student_t_cdf(-2.0, 4) == pytest.approx(1 - cr.student_t_cdf(2.0, 4), abs=1e-12)


@pytest.mark.parametrize("a,b,t,dof,p", [
    # The two worked examples of Welch's t-test on Wikipedia ("Welch's t-test", Examples 1 and 2).
    ([27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4],
     [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4], -2.46, 25.0, 0.021),
    ([17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8],
     [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8, 20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5,
      21.5, 21.8], -1.57, 9.9, 0.149),
])
def test_welch_matches_worked_examples(a, b, t, dof, p):
    d = cr.welch(cr.describe(b), cr.describe(a))  # the examples report A1 - A2
    assert d.t == pytest.approx(t, abs=0.005)
    assert d.dof == pytest.approx(dof, abs=0.05)
    assert d.p == pytest.approx(p, abs=0.0005)
    assert d.low < d.diff < d.high and (d.high < 0) == (d.p < 0.05)


def test_one_run_per_arm_has_no_spread(tmp_path):
    rng = np.random.default_rng(1)
    write_run(tmp_path / "a", ["optim.lr=0.01"], config("split", 0, lr=0.01), fake_rows(rng, 8, 0.0))
    write_run(tmp_path / "b", [], config("split", 0, lr=0.02), fake_rows(rng, 8, 0.0))  # kept the default lr
    c = cr.compare(tmp_path)
    assert c.arms == ["optim.lr=0.01", "optim.lr=0.02"]  # the default is read back from the resolved config
    assert c.stats["optim.lr=0.01"]["final loss"].n == 1 and math.isnan(c.stats["optim.lr=0.01"]["final loss"].std)
    assert math.isnan(c.diffs["optim.lr=0.02"]["final loss"].se)
    assert "—" in cr.summary_markdown(c)


def test_breakdown_without_optimizer_timers(tmp_path):
    """AdamW runs log no Newton-Schulz/communication timers: those parts are NaN, the rest still adds up."""
    rng = np.random.default_rng(2)
    write_run(tmp_path / "0", ["optim=adamw"], config("split", 0), fake_rows(rng, 6, 0.0, with_optim_timers=False))
    write_run(tmp_path / "1", ["optim=muon_split"], config("split", 0), fake_rows(rng, 6, 0.0))
    c = cr.compare(tmp_path)
    adamw = cr.step_time_breakdown(c.runs_of("optim=adamw")[0])
    assert math.isnan(adamw["Newton-Schulz"]) and math.isnan(adamw["optimizer communication"])
    muon = cr.step_time_breakdown(c.runs_of("optim=muon_split")[0])
    total = cr.step_time_s(c.runs_of("optim=muon_split")[0])
    assert sum(muon.values()) == pytest.approx(total, rel=0.05)
    written = cr.write_report(c, tmp_path / "report")
    assert all(p.stat().st_size > 0 for p in written)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "compare_runs.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_into_out_dir(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = _cli(str(sweep), "--out", str(out), "--baseline", "optim.split.qkv=split")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(list(cr.PLOTS) + ["summary.md", "summary.json"])
    assert not (sweep / "summary.md").exists()
    assert json.loads((out / "summary.json").read_text())["baseline"] == "optim.split.qkv=split"


def test_cli_clear_error_without_runs(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "metrics.jsonl").write_text("")  # a job that died before logging anything
    (tmp_path / "job" / "config.json").write_text("{}")
    for target in (tmp_path, tmp_path / "missing"):
        proc = _cli(str(target))
        assert proc.returncode == 2
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and str(target) in errors[0], proc.stderr
    proc = _cli(str(tmp_path), "--last-k", "0")
    assert proc.returncode == 2 and "last_k" in proc.stderr


def test_best_overrides_pick_the_lowest_eval_bpb_arm(tmp_path):
    """A 2 x 2 lr grid, one seed each: the arm with the lowest final eval bpb comes back as command-line overrides,
    whatever its position; a key the best run left at its default is not printed."""
    rng = np.random.default_rng(3)
    bpb = {("0.01", "0.001"): 1.30, ("0.02", "0.001"): 1.21, ("0.01", None): 1.25, ("0.02", None): 1.40}
    for num, ((lr, adamw_lr), value) in enumerate(bpb.items()):
        overrides = [f"optim.lr={lr}", "seed=0"] + ([f"optim.adamw.lr={adamw_lr}"] if adamw_lr else [])
        rows = fake_rows(rng, 10, 0.0)
        for row in rows:
            if "eval_loss" in row:
                row["eval_bpb"] = value + 0.5 / row["step"]  # falling, ends at `value` + 0.05
        write_run(tmp_path / str(num), overrides, config("split", 0, lr=float(lr)), rows)
    assert cr.best_overrides(cr.compare(tmp_path)) == ["optim.lr=0.02", "optim.adamw.lr=0.001"]
    proc = _cli(str(tmp_path), "--best-overrides")
    assert proc.returncode == 0 and proc.stdout.strip() == "optim.lr=0.02 optim.adamw.lr=0.001", proc.stderr
    assert not (tmp_path / "summary.md").exists()
    bpb_best_default = cr.compare(tmp_path, rank_by="final loss")  # all losses alike: any arm, but only its keys
    assert all(o.split("=")[0] in ("optim.lr", "optim.adamw.lr") for o in cr.best_overrides(bpb_best_default))
    (tmp_path / "0" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    for num in (1, 2, 3):
        (tmp_path / str(num) / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    proc = _cli(str(tmp_path), "--best-overrides")
    assert proc.returncode == 2 and "final eval bpb" in proc.stderr


def test_runs_that_stopped_early_are_left_out(tmp_path, capsys):
    """A run killed at step 6 of 10 would report its step-5 evaluation as final: it is skipped, with a note."""
    rng = np.random.default_rng(4)
    for num, (lr, steps) in enumerate((("0.01", 10), ("0.02", 10), ("0.02", 6))):
        cfg = config("split", num, lr=float(lr)) | {"train": {"steps": 10}}
        write_run(tmp_path / str(num), [f"optim.lr={lr}", f"seed={num}"], cfg, fake_rows(rng, steps, 0.0))
    c = cr.compare(tmp_path)
    assert [r.path.name for r in c.runs] == ["0", "1"]
    assert "stopped at step 6 of 10" in capsys.readouterr().err
