"""The loggers: the console line, metrics.jsonl (appended across a resume, non-finite values as null), a real
offline wandb run, and the fan-out to all of them."""

import json
import math
import subprocess
import sys
from pathlib import Path

from muon_recipes.train.loggers import ConsoleLogger, JsonlLogger, Loggers

ROOT = Path(__file__).resolve().parents[2]


def test_console_line_formats_each_kind_of_metric(capsys):
    ConsoleLogger().log({"step": 10, "loss": 2.34567, "lr": 0.001, "tokens_per_s": 12345.6, "mfu": 0.526,
                         "step_time_s": 0.05, "optim_time_s": 2.5, "grad_norm": None, "not_shown": 1.0})
    assert capsys.readouterr().out == ("step 10 | loss 2.346 | lr 1.00e-03 | tokens_per_s 12,346 | mfu 52.6% | "
                                       "step_time_s 50.0ms | optim_time_s 2.50s\n")


def test_jsonl_appends_across_a_resume_and_writes_non_finite_as_null(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    first = JsonlLogger(path)
    first.log({"step": 1, "loss": 3.0})
    first.close()
    resumed = JsonlLogger(path)
    resumed.log({"step": 2, "loss": math.nan, "grad_norm": math.inf, "tag": "x"})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": None, "grad_norm": None, "tag": "x"}]


WANDB_CHILD = """
import sys
from muon_recipes.train.loggers import WandbLogger
kwargs = dict(run_dir=sys.argv[1], mode="offline", project="muon-recipes-test", entity="", group="sweep-group-7",
              tags=["t1"], name="arm-name-7", config={"optim": {"lr": 0.0271}})
logger = WandbLogger(**kwargs)
logger.log({"step": 1, "loss": 3.14159, "eval_loss": None})
logger.log({"step": 2, "loss": 2.71828})
assert logger.run.config["optim"] == {"lr": 0.0271}
logger.close()
resumed = WandbLogger(**kwargs, resume_id=logger.run.id)
print(logger.run.id, resumed.run.id)
resumed.close()
"""


def test_wandb_offline_run_records_identity_config_and_metrics_and_resumes_by_id(tmp_path):
    """A real offline run, in a child process: wandb writes its record file asynchronously and completes it when
    the process ends, as a training run does."""
    proc = subprocess.run([sys.executable, "-c", WANDB_CHILD, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, resumed = proc.stdout.split()
    assert resumed == first
    # The offline record that `wandb sync` uploads later: the identity, the config and both rows, no None.
    data = b"".join(f.read_bytes() for f in (tmp_path / "wandb").glob(f"offline-run-*-{first}/run-{first}.wandb"))
    for expected in (b"sweep-group-7", b"arm-name-7", b"0.0271", b"3.14159", b"2.71828"):
        assert expected in data, expected
    assert b"eval_loss" not in data


def test_loggers_fan_out_and_close_everything(tmp_path):
    a, b = JsonlLogger(str(tmp_path / "a.jsonl")), JsonlLogger(str(tmp_path / "b.jsonl"))
    loggers = Loggers([a, b])
    loggers.log({"step": 1})
    loggers.close()
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text() == '{"step": 1}\n'
    assert a._f.closed and b._f.closed
