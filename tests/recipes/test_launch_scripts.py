"""launch/: the shell scripts parse, and the multi-node sbatch script sets up a working c10d rendezvous from the
SLURM environment (one node here: SLURM's variables are set as sbatch would, `scontrol` and `srun` are thin
stand-ins that print the node name and start the command, everything after them is the real torchrun + trainer)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["launch/torchrun_node.sh", "launch/slurm_multinode.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_is_executable(script):
    path = ROOT / script
    assert path.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.distributed
def test_slurm_multinode_rendezvous(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `scontrol show hostnames <list>` prints one host per line; `srun [options] cmd...` runs cmd on each node.
    _stub(bin_dir, "scontrol", 'echo "${SLURM_JOB_NODELIST}"\n')
    _stub(bin_dir, "srun", 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
               SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="1", RDZV_PORT=str(_free_port()),
               RUN_DIR=str(run_dir), PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    overrides = ["device=cpu", "model=gqa_tiny", "optim=adamw", "train.steps=2", "train.seq_len=32",
                 "train.batch_size=2", "train.log_every=1", "train.eval_every=0", "data.max_chars=50000",
                 "logging.wandb.mode=disabled"]
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm_multinode.sbatch"), *overrides], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rendezvous localhost:" in proc.stdout and "world 1" in proc.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / "config.json").is_file()
