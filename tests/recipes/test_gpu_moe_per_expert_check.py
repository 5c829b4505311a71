"""`recipes/gpu_moe_per_expert_check.sh` in its CPU form: the per-expert and fused runs of a cut-down moe_small
(two layers, one of them MoE) each in a fresh process, the CPU halves of the tests it runs, and its verdict; then
a run that dies with a CUDA error (a stand-in `python`): the script names the configuration and prints the
error and the Python stack."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from script_runs import background_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "recipes/gpu_moe_per_expert_check.sh"
TINY = ("device=cpu mesh=single model.n_layers=2 model.d_model=64 model.n_heads=2 model.n_kv_heads=1 "
        "model.ffn_dim=128 model.expert_ffn_dim=64 model.vocab_size=300 data.max_chars=100000 train.seq_len=32 "
        "train.batch_size=4 train.log_every=1")


def run(tmp_path: Path, stages: str, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, WORK=str(tmp_path / "work"), STAGES=stages, STEPS="3", EXTRA=TINY, **env)
    return subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=600)


@background_script("gpu_moe_per_expert_check")
def _command(tmp_path: Path):
    environment = dict(WORK=str(tmp_path / "work"), STAGES="blocking nograph fused tests", STEPS="3", EXTRA=TINY)
    return ["bash", SCRIPT, str(tmp_path / "out")], environment, 600


def test_the_check_runs_each_configuration_in_its_own_process_and_gives_a_verdict(script_runs):
    """The script runs in the background from the first recipe test on (`script_runs`)."""
    started = script_runs["gpu_moe_per_expert_check"]
    proc, tmp_path = started.result(), started.work
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for name in ("blocking", "nograph", "fused"):
        log = (tmp_path / "out" / f"{name}.log").read_text()
        assert "step 3 " in log, log[-2000:]
    assert "optim.split.experts=per_expert" in proc.stdout and "optim.cuda_graph=off" in proc.stdout
    assert "VERDICT: no crash in blocking nograph fused tests" in proc.stdout
    tests_log = (tmp_path / "out" / "tests.log").read_text()
    assert " passed" in tests_log and "failed" not in tests_log, tests_log[-2000:]


def test_a_crash_is_reported_with_its_configuration_error_and_stack(tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(
        "#!/usr/bin/env bash\n"
        "echo 'step 1 | loss 10.4'\n"
        "echo 'Traceback (most recent call last):' >&2\n"
        "echo '  File \"muon_recipes/optim/blocks.py\", line 207, in copy_block' >&2\n"
        "echo 'torch.AcceleratorError: CUDA error: an illegal memory access was encountered' >&2\n"
        "exit 1\n")
    (shim / "python").chmod(0o755)
    proc = run(tmp_path, "blocking", PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "!! blocking: CRASHED (exit 1)" in proc.stdout
    assert "first error: " in proc.stdout and "illegal memory access" in proc.stdout
    assert "   | " + '  File "muon_recipes/optim/blocks.py", line 207, in copy_block' in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("VERDICT: CRASH in blocking")
