"""Checkpoints resume exactly, survive a rank killed mid-save, and bring an elastic torchrun job back.

The reference for a resumed run is the same run trained straight through: per-step losses must be equal bit
for bit (same world size) or within the 1- vs 2-process tolerance of tests/train/test_train.py (another world
size). Runs go through the real entry point (`muon_recipes.train.run` on a Hydra-composed config, gloo on CPU):
several runs share one `torch.multiprocessing.spawn` world to pay the imports once, and the straight and the
resumed runs of a case live in different spawns, so nothing but the files on disk carries over. The fault tests
run `torchrun` itself and kill a real rank with SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from gloo_world import spawn_trainer_runs  # noqa: E402
from torchrun_jobs import env, finish, kill_rank, losses, rank_pids, rows, start, torchrun, wait_for  # noqa: E402
COMMON = ["device=cpu", "logging.wandb.mode=disabled", "logging.console=false", "logging.progress=false",
          "train.seq_len=64", "data.max_chars=200000", "train.log_every=1", "train.eval_every=0",
          "train.warmup_steps=5", "optim.ns_dtype=float32"]
STRAIGHT = ["train.steps=20", "train.checkpoint.every=10", "train.checkpoint.keep=2"]
CASES = {
    "adamw-dense": ["optim=adamw", "model=dense_tiny"],
    "muon_split-dense": ["optim=muon_split", "model=dense_tiny", "train.eval_every=5", "train.eval_batches=2"],
    "adamw-moe": ["optim=adamw", "model=moe_tiny"],
    "muon_split-moe": ["optim=muon_split", "model=moe_tiny", "train.checkpoint.async_save=true"],
}


# ----------------------------------------------------------------------------------------------------------------
# In-process runs in a spawned gloo world
# ----------------------------------------------------------------------------------------------------------------
def spawn_runs(world: int, jobs: list[tuple[str, list]], out: Path) -> dict:
    return spawn_trainer_runs(world, jobs, out, COMMON)


def error_lines(stderr: str) -> list[str]:
    """The trainer's error lines (stderr also carries the data pipeline's progress bars)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("error:") or "Traceback" in ln]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Straight 20-step runs (checkpoints at 10 and 20) on 2 ranks; resumes from step 10 on 2 ranks (auto, in a copy
    of the run dir whose step-20 checkpoint is removed, as if the run had died after step 10) and on other world
    sizes; a resume with another data seed as the control that the comparison can fail."""
    root = tmp_path_factory.mktemp("resume")
    straight = [(c, [*o, *STRAIGHT, "train.batch_size=4", f"run_dir={root / c / 'straight'}"])
                for c, o in CASES.items()]
    codes = spawn_runs(2, straight, root / "spawn-straight")
    for case in CASES:
        src, dst = root / case / "straight", root / case / "auto"
        shutil.copytree(src, dst)
        shutil.rmtree(dst / "checkpoints" / "step-000020")
    shutil.copytree(root / "adamw-dense" / "straight", root / "adamw-dense" / "rollback")
    adamw, moe = CASES["adamw-dense"], CASES["muon_split-moe"]
    one_proc = [
        ("2to1", [*adamw, *STRAIGHT, "train.batch_size=8", f"run_dir={root / 'adamw-dense' / 'one'}",
                  f"train.resume={root / 'adamw-dense' / 'straight' / 'checkpoints' / 'step-000010'}"]),
        ("straight1", [*moe, *STRAIGHT, "train.batch_size=8", f"run_dir={root / 'muon_split-moe' / 'one-straight'}"]),
    ]
    codes.update(spawn_runs(1, one_proc, root / "spawn-one"))
    two_proc = [(c, [*o, *STRAIGHT, "train.batch_size=4", f"run_dir={root / c / 'auto'}"]) for c, o in CASES.items()]
    two_proc += [
        ("1to2", [*moe, *STRAIGHT, "train.batch_size=4", f"run_dir={root / 'muon_split-moe' / 'two'}",
                  f"train.resume={root / 'muon_split-moe' / 'one-straight'}"]),  # a run dir: its latest checkpoint
        ("seed1", [*adamw, *STRAIGHT, "train.batch_size=4", "seed=1", f"run_dir={root / 'adamw-dense' / 'seed1'}",
                   f"train.resume={root / 'adamw-dense' / 'straight' / 'checkpoints' / 'step-000010'}"]),
        # Back to an older checkpoint of the same run dir (after a loss spike, say): step 20 is set aside.
        ("rollback", [*adamw, *STRAIGHT, "train.batch_size=4", f"run_dir={root / 'adamw-dense' / 'rollback'}",
                      f"train.resume={root / 'adamw-dense' / 'rollback' / 'checkpoints' / 'step-000010'}"]),
    ]
    # The 1-process straight run ended at step 20; resume its step-10 checkpoint (the run dir form takes the
    # latest, so remove step 20 first).
    shutil.rmtree(root / "muon_split-moe" / "one-straight" / "checkpoints" / "step-000020")
    codes.update(spawn_runs(2, two_proc, root / "spawn-resume"))
    bad = {k: v for k, v in codes.items() if v[0] != 0}
    assert not bad, bad
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_resume_repeats_the_straight_run_exactly(resumed, case):
    straight, auto = resumed / case / "straight", resumed / case / "auto"
    a, b = losses(straight), losses(auto)
    assert sorted(a) == list(range(1, 21))
    assert [r["step"] for r in rows(auto)] == list(range(1, 21)), "appended after the resumed step, no duplicates"
    assert [r["step"] for r in rows(auto, "metrics.discarded.jsonl")] == list(range(11, 21))
    assert a[20] < a[1]
    assert [b[s] for s in range(11, 21)] == [a[s] for s in range(11, 21)]
    evals = [(r["step"], r["eval_loss"]) for r in rows(straight) if "eval_loss" in r]
    assert evals == [(r["step"], r["eval_loss"]) for r in rows(auto) if "eval_loss" in r]
    assert sorted(os.listdir(auto / "checkpoints")) == ["step-000010", "step-000020"]


def test_another_data_order_changes_the_resumed_losses(resumed):
    """The control: same checkpoint, another data seed -- the comparison above would catch a wrong data position."""
    a, b = losses(resumed / "adamw-dense" / "straight"), losses(resumed / "adamw-dense" / "seed1")
    assert sorted(b) == list(range(11, 21))
    assert all(a[s] != b[s] for s in range(11, 21))


def test_rollback_to_an_older_checkpoint_sets_the_newer_one_aside(resumed):
    run_dir = resumed / "adamw-dense" / "rollback"
    assert [r["step"] for r in rows(run_dir)] == list(range(1, 21))
    assert losses(run_dir) == losses(resumed / "adamw-dense" / "straight")
    set_aside = run_dir / "checkpoints" / "discarded" / "step-000020"
    assert (set_aside / "COMPLETE").exists(), "the abandoned trajectory's checkpoint is kept, out of the way"
    assert sorted(n for n in os.listdir(run_dir / "checkpoints") if n.startswith("step-")) == [
        "step-000010", "step-000020"]


def test_non_tensor_values_load_as_plain_data_only(tmp_path):
    """The optimizer's non-tensor values go through `torch.load(weights_only=True)`: a pickled callable is refused
    (DCP's default planner would unpickle and run it). The resume tests above load the real values through it."""
    import io
    import pickle

    import torch

    from muon_recipes.train.checkpoint import _WeightsOnlyLoadPlanner

    marker = tmp_path / "ran"

    class RunsShellCommand:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = io.BytesIO()
    torch.save({"lr": 0.02, "hook": RunsShellCommand()}, evil)  # how DCP stores a non-tensor value
    with pytest.raises(pickle.UnpicklingError):
        _WeightsOnlyLoadPlanner().load_bytes(None, evil)
    assert not marker.exists()
    evil.seek(0)
    torch.load(evil, weights_only=False)  # the control: DCP's default way of reading it runs the command
    assert marker.exists()


def test_checkpoint_older_than_a_group_key_loads(tmp_path):
    """A checkpoint written before a param-group key existed (here `ns_method`) loads: the key keeps this run's
    value, the state (momentum buffer) comes from the checkpoint. DCP's default planner refuses it, and a
    missing tensor is still refused by ours."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException   # a BaseException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from muon_recipes.optim import Muon
    from muon_recipes.train.checkpoint import _WeightsOnlyLoadPlanner

    def make():
        model = torch.nn.Linear(16, 8, bias=False)
        return model, Muon(model.parameters(), ns_dtype="float32", backend="torch", ns_method="gram")

    model, optimizer = make()
    model.weight.grad = torch.randn(8, 16)
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    for group in optim_state["param_groups"]:
        group.pop("ns_method")   # as saved before the key existed
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path / "old"))
    dcp.save({"optim": optim_state}, checkpoint_id=str(tmp_path / "no_model"))

    def template():
        fresh_model, fresh_optimizer = make()
        model_state, optim_state = get_state_dict(fresh_model, fresh_optimizer)
        return fresh_model, fresh_optimizer, {"model": model_state, "optim": optim_state}

    _, _, state = template()
    with pytest.raises(CheckpointException, match="Missing key.*ns_method"):
        dcp.load(state, checkpoint_id=str(tmp_path / "old"), planner=DefaultLoadPlanner())
    _, _, state = template()
    with pytest.raises(CheckpointException, match="Missing key.*model.weight"):
        dcp.load(state, checkpoint_id=str(tmp_path / "no_model"), planner=_WeightsOnlyLoadPlanner())

    fresh_model, fresh_optimizer, state = template()
    dcp.load(state, checkpoint_id=str(tmp_path / "old"), planner=_WeightsOnlyLoadPlanner())
    set_state_dict(fresh_model, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert fresh_optimizer.param_groups[0]["ns_method"] == "gram"
    assert torch.equal(fresh_model.weight, model.weight)
    assert torch.equal(fresh_optimizer.state[fresh_model.weight]["momentum_buffer"],
                       optimizer.state[model.weight]["momentum_buffer"])


def _close(a: dict, b: dict, steps) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) < 2e-4 * max(1.0, abs(a[s])), (s, a[s], b[s])


def test_resume_on_one_process_from_two(resumed):
    """AdamW state saved by 2 FSDP ranks, resharded by DCP onto 1 (with twice the per-rank batch)."""
    _close(losses(resumed / "adamw-dense" / "straight"), losses(resumed / "adamw-dense" / "one"), range(11, 21))


def test_resume_on_two_processes_from_one(resumed):
    """Muon momentum (and AdamW moments) of a MoE model saved by 1 rank, resharded onto 2."""
    ref, two = losses(resumed / "muon_split-moe" / "one-straight"), losses(resumed / "muon_split-moe" / "two")
    assert sorted(two) == list(range(11, 21))
    _close(ref, two, range(11, 21))


# ----------------------------------------------------------------------------------------------------------------
# Faults: real torchrun jobs, a real SIGKILL
# ----------------------------------------------------------------------------------------------------------------
def _torchrun(*args: str, restarts: int = 0) -> list[str]:
    return torchrun(*COMMON, *args, restarts=restarts)


# A model wide enough that writing a checkpoint takes a while (~50 MB of state): the kill lands inside the save.
WIDE = ["model=dense_tiny", "model.d_model=256", "model.ffn_dim=1024", "model.n_layers=4", "optim=adamw",
        "train.batch_size=2"]


def test_rank_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    cmd = _torchrun(*WIDE, f"run_dir={run_dir}", "train.steps=40", "train.checkpoint.every=2",
                    "logging.wandb.mode=offline")
    log = tmp_path / "torchrun.log"
    proc = start(cmd, log)
    try:
        def second_save_started():  # step-000002 is complete and the save of step 4 is being written
            if not (ckpts / "step-000002" / "COMPLETE").exists():
                return None
            tmp = [n for n in os.listdir(ckpts) if n.startswith(".tmp-step-")]
            return tmp[0] if tmp else None

        ranks = wait_for(lambda: (lambda found: found if len(found) == 2 else None)(rank_pids(proc.pid)), proc,
                          timeout=60, poll=0.05)
        assert ranks, "torchrun started no workers:\n" + log.read_text()[-3000:]
        tmp_name = wait_for(second_save_started, proc, timeout=120)
        assert tmp_name, "the run ended before its second save:\n" + log.read_text()[-3000:]
        os.kill(ranks[1], signal.SIGKILL)  # pids looked up beforehand: the kill follows the directory at once
    finally:
        output = finish(proc, log, timeout=120)
    assert proc.returncode != 0, output[-2000:]
    saved_step = int(tmp_name.rsplit("-", 1)[1])
    complete = sorted(n for n in os.listdir(ckpts) if (ckpts / n / "COMPLETE").exists())
    assert f"step-{saved_step:06d}" not in complete, "the kill landed after the save completed"
    assert tmp_name in os.listdir(ckpts), "the interrupted save stays an ignored .tmp directory"
    previous = complete[-1]
    previous_step = int(previous.split("-")[1])
    killed = losses(run_dir)
    first_wandb = [p.name for p in (run_dir / "wandb").glob("offline-run-*")]

    # The same command again (resume=auto): it continues from the previous checkpoint, not the partial one.
    proc = subprocess.run(_torchrun(*WIDE, f"run_dir={run_dir}", f"train.steps={saved_step + 2}",
                                    "train.checkpoint.every=2", "logging.wandb.mode=offline"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"resumed from {ckpts / previous} at step {previous_step}" in proc.stdout
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, saved_step + 3))
    overlap = [s for s in killed if s > previous_step]
    assert overlap, "the killed run logged steps after its last complete checkpoint"
    assert [resumed[s] for s in overlap] == [killed[s] for s in overlap]
    assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp-")], "the next save removed the partial one"
    # wandb: the resumed process logs into the same run (same id, a second offline directory of it).
    second_wandb = [p.name for p in (run_dir / "wandb").glob("offline-run-*") if p.name not in first_wandb]
    assert len(first_wandb) == 1 and len(second_wandb) == 1
    assert first_wandb[0].rsplit("-", 1)[1] == second_wandb[0].rsplit("-", 1)[1]


def test_elastic_restart_continues_from_the_latest_checkpoint(tmp_path):
    """torchrun --max-restarts=1, Hydra's own run dir (hydra.run.dir): rank 1 is SIGKILLed once after step 6 is
    logged; torchrun restarts both ranks, which resume from step 4 with no manual step and finish the run.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torchrun's shared rendezvous store keeps the dead rank's address
    across the restart (pytorch/pytorch#135712); without it the restart fails about one time in two here."""
    run_dir = tmp_path / "hydra-run"
    cmd = _torchrun("model=dense_tiny", "optim=muon_split", "train.batch_size=4", f"hydra.run.dir={run_dir}",
                    "train.steps=12", "train.checkpoint.every=4", restarts=1)
    log = tmp_path / "torchrun.log"
    proc = start(cmd, log, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    try:
        logged = wait_for(lambda: 6 in losses(run_dir) if (run_dir / "metrics.jsonl").exists() else None,
                           proc, timeout=120, poll=0.01)
        assert logged, "step 6 was never logged:\n" + log.read_text()[-3000:]
        first_attempt = rank_pids(proc.pid)
        kill_rank(proc, 1)
    finally:
        output = finish(proc, log, timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "warning:" not in output, "fixed run dir and a fresh rendezvous store per restart: nothing to warn about"
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000004'} at step 4" in output
    final = losses(run_dir)
    assert [r["step"] for r in rows(run_dir)] == list(range(1, 13))
    died = losses(run_dir, "metrics.discarded.jsonl")  # what the first attempt logged after step 4
    assert 5 in died and 6 in died
    assert all(final[s] == died[s] for s in died)
    assert (run_dir / ".hydra" / "config.yaml").exists() and len(first_attempt) == 2
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-000008", "step-000012"]


# ----------------------------------------------------------------------------------------------------------------
# Non-finite loss: a real divergence, not a planted value
# ----------------------------------------------------------------------------------------------------------------
def test_nonfinite_loss_aborts_without_checkpointing_that_state(tmp_path):
    """lr = 1e30: step 1 is finite, its update blows the weights up, step 2's loss is NaN."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", *COMMON, "model=dense_tiny", "optim=adamw", "train.batch_size=4",
                           "optim.lr=1e30", "optim.adamw.lr=1e30", "train.warmup_steps=0", "train.steps=10",
                           "train.checkpoint.every=1", f"run_dir={run_dir}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: non-finite step 2: loss=nan"), proc.stderr
    assert "train.nonfinite=abort" in lines[0] and "Traceback" not in proc.stderr
    assert sorted(losses(run_dir)) == [1]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-000001"]


def test_nonfinite_policies_skip_and_parameter_check(tmp_path):
    """`skip` drops the diverged steps, counts them and aborts after max_skipped_steps in a row; a huge weight decay
    makes the weights themselves infinite after a finite step -- the save of that state is refused."""
    common = ["model=dense_tiny", "optim=adamw", "train.batch_size=4", "train.warmup_steps=0", "train.steps=10",
              "train.checkpoint.every=1"]
    jobs = [("skip", [*common, "optim.lr=1e30", "optim.adamw.lr=1e30", "train.nonfinite=skip",
                      "train.max_skipped_steps=3", f"run_dir={tmp_path / 'skip'}"]),
            # decoupled decay multiplies the weights by 1 - lr * weight_decay = -1e40: infinite, the loss still finite
            ("params", [*common, "optim.adamw.lr=1e30", "optim.adamw.weight_decay=1e10",
                        f"run_dir={tmp_path / 'params'}"])]
    codes = spawn_runs(1, jobs, tmp_path / "spawn")
    code, err = codes["skip"]
    assert code == 3 and len(error_lines(err)) == 1, err
    assert "non-finite loss/gradients in 3 steps in a row (train.max_skipped_steps=3); last at step 2" in err
    assert sorted(losses(tmp_path / "skip")) == [1]
    code, err = codes["params"]
    assert code == 3 and error_lines(err)[0].startswith("error: non-finite parameters after step 1"), err
    assert sorted(losses(tmp_path / "params")) == [1]
    assert not (tmp_path / "params" / "checkpoints").exists() or not [
        n for n in os.listdir(tmp_path / "params" / "checkpoints") if n.startswith("step-")]


# ----------------------------------------------------------------------------------------------------------------
# A full disk: a real small tmpfs
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 7 MB tmpfs: room for one checkpoint of gqa_tiny (~4.3 MB with Muon's momentum), not for two."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, small_tmpfs):
    """The save of step 4 runs out of space on the 2-rank run's file system: every rank exits 2, rank 0 says so in
    one line that names the full disk and the intact checkpoint, and the partial save is removed. Moved to a
    larger disk, the run resumes from step 2 and ends with one metrics row per step."""
    run_dir = small_tmpfs / "run"
    overrides = ["model=gqa_tiny", "optim=muon_split", "train.batch_size=4", "train.steps=6",
                 "train.checkpoint.every=2"]
    codes = spawn_runs(2, [("full", [*overrides, f"run_dir={run_dir}"])], tmp_path / "spawn-full")
    code, err = codes["full"]
    rank1 = json.loads((tmp_path / "spawn-full" / "codes-1.json").read_text())["full"]
    assert code == 2 and rank1[0] == 2, (codes, rank1)
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint step 4 could not be written"), err
    assert "no space left on the file system" in lines[0] and "step-000002, is intact" in lines[0], lines[0]
    assert error_lines(rank1[1]) == []
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-000002"]
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    codes = spawn_runs(2, [("resumed", [*overrides, f"run_dir={moved}"])], tmp_path / "spawn-resumed")
    assert codes["resumed"][0] == 0, codes
    assert [r["step"] for r in rows(moved)] == [1, 2, 3, 4, 5, 6]


def test_a_rank_failing_alone_mid_training_says_so_first(tmp_path, small_tmpfs):
    """Rank 0 alone cannot write metrics.jsonl after a few steps (its file system fills up) while rank 1 waits in
    the next collective: rank 0's line names the file and the cause, and rank 1 only reports the lost connection,
    without a traceback."""
    run_dir = small_tmpfs / "run"
    run_dir.mkdir()
    page = os.statvfs(small_tmpfs).f_frsize
    free = os.statvfs(small_tmpfs).f_bavail * page
    (small_tmpfs / "filler").write_bytes(b"\0" * (free - 3 * page))  # run.lock, config.json, one page of rows
    overrides = ["model=gqa_tiny", "optim=adamw", "train.batch_size=2", "train.steps=60", f"run_dir={run_dir}"]
    spawn_runs(2, [("alone", overrides)], tmp_path / "spawn")
    (code0, err0), (code1, err1) = [json.loads((tmp_path / "spawn" / f"codes-{r}.json").read_text())["alone"]
                                    for r in range(2)]
    assert code0 == 2 and error_lines(err0) == [
        f"error: OSError: [Errno 28] No space left on device (writing {run_dir / 'metrics.jsonl'})"], err0
    assert code1 == 1 and len(error_lines(err1)) == 1, err1
    assert error_lines(err1)[0].startswith("error: rank 1: lost the connection to another rank"), err1
    assert 0 < len((run_dir / "metrics.jsonl").read_bytes().splitlines()) < 60


def test_truncated_shard_under_torchrun_every_rank_exits_2(tmp_path):
    """A resume from a checkpoint whose shard is truncated, twice under torchrun: each time the first line is
    the cause, printed once, both ranks exit 2 (none dies by torchrun's SIGTERM or aborts in C++ teardown), and
    torchrun's summary repeats the cause."""
    run_dir = tmp_path / "run"
    args = ["model=gqa_tiny", "optim=muon_split", "train.batch_size=4", f"run_dir={run_dir}"]
    made = subprocess.run(_torchrun(*args, "train.steps=2", "train.checkpoint.every=2"), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    shard = run_dir / "checkpoints" / "step-000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    for attempt in range(2):
        proc = subprocess.run(_torchrun(*args, "train.steps=4"), cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=300)
        failure = f"attempt {attempt}:\n{proc.stderr[-3000:]}"
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 1 and len(lines) == 1, failure
        assert "step-000002 could not be read" in lines[0] and "truncated or corrupt" in lines[0], failure
        assert "terminate called" not in proc.stderr and proc.stderr.count("exitcode  : 2") == 2, failure
        assert proc.stderr.count(f"traceback : {lines[0]}") == 2, failure
