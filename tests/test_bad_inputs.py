"""The catalogue of bad inputs: each gets one line naming the key or path, the value and what is valid, exit code
2 on every rank, and leaves what is already on disk as it was.

Three ways in, by where the failure happens:

* The command line, before Hydra composes (unknown group option, wrong type, unknown key, extra config dirs, a
  `hydra.run.dir` a live run holds): `python train.py` subprocesses (no torch import: about a second each).
* Checks before any process group (config values, memory out of reach, mesh vs world size, run directory and its
  lock and layout, the checkpoint `train.resume` names, the tokenizer): `muon_recipes.train.run` in this process,
  which exits via `SystemExit(2)` with the line on stderr -- exactly what `python train.py` does with it.
* Failures after start-up (data files, a checkpoint that does not fit the model or is corrupt, rank 1's state
  alone, a wandb run that cannot start): a 2-rank gloo world (`torch.multiprocessing.spawn`) runs them all; each
  rank records its own exit code, and rank 0 alone prints, naming rank 1 when the failure was rank 1's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gloo_world import joined_world, rendezvous_files

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["device=cpu", "logging.wandb.mode=disabled", "logging.console=false", "logging.progress=false",
          "train.seq_len=64", "train.batch_size=4", "data.max_chars=100000", "train.eval_every=0",
          "train.steps=2", "train.warmup_steps=1"]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _compose(overrides: list):
    from hydra import compose, initialize_config_dir

    from muon_recipes.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=COMMON + overrides)


def run_in_process(overrides: list) -> tuple[int, str]:
    """(exit code, stderr) of `muon_recipes.train.run` on the composed config; the environment is restored.

    A failure before the process group exists waits `failures.PEER_EXIT_GRACE_S` (5 s) before exiting when
    WORLD_SIZE > 1, so that torchrun's other ranks are not stopped before rank 0 has printed. A test here sets
    WORLD_SIZE for the config checks against the world size but runs no other rank: the wait is 0 in this process
    (the torchrun tests, e.g. tests/train/test_train.py::test_bad_mesh_fails_on_every_rank, keep the real one)."""
    from muon_recipes.train import failures
    from muon_recipes.train.entry import run

    cfg = _compose(overrides)
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    grace, failures.PEER_EXIT_GRACE_S = failures.PEER_EXIT_GRACE_S, 0.0
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            run(cfg)
        return 0, err.getvalue()
    except SystemExit as e:
        return int(e.code), err.getvalue()
    finally:
        failures.PEER_EXIT_GRACE_S = grace
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def error_lines(stderr: str) -> list[str]:
    """Error lines and traceback starts (stderr also carries the data pipeline's progress bars)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("error:") or "Traceback" in ln]


def assert_one_line(code: int, stderr: str, *fragments: str, exit_code: int = 2) -> None:
    lines = error_lines(stderr)
    assert code == exit_code and len(lines) == 1, (code, stderr)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def fingerprint(path: Path) -> dict:
    """Every file below `path` with its size and content hash; the lock file's description of its last holder is
    the one thing a refused run may rewrite (docs/checkpoints.md)."""
    return {str(p.relative_to(path)): (p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "run.lock"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A real 2-step run with checkpoints at steps 1 and 2 (muon_split, gqa_tiny), trained in this process."""
    run_dir = tmp_path_factory.mktemp("bad-inputs") / "base"
    code, err = run_in_process(["optim=muon_split", "train.checkpoint.every=1", f"run_dir={run_dir}"])
    assert code == 0, err
    assert (run_dir / "checkpoints" / "step-000001" / "COMPLETE").exists()
    assert (run_dir / "checkpoints" / "step-000002" / "COMPLETE").exists()
    return run_dir


def copy_run(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# 1. Hydra composition
# ----------------------------------------------------------------------------------------------------------------
HYDRA_CASES = [
    ("model=nonexistent", ["model='nonexistent'", "must be one of", "gqa_tiny", "moe_tiny"]),
    ("optim=sgd", ["optim='sgd'", "must be one of", "adamw", "muon_split"]),
    ("optim=adamw,sgd", ["optim='sgd'", "must be one of", "adamw", "muon_split"]),
    ("experiment=qkv", ["experiment='qkv'", "must be one of", "qkv_split", "moe_per_expert"]),
    ("train.steps=abc", ["train.steps=abc", "Value 'abc'", "could not be converted to Integer"]),
    ("train.checkpoint.async_save=maybe", ["train.checkpoint.async_save", "'maybe' is not a valid bool"]),
    ("train.stepz=3", ["train.stepz", "Key 'stepz' not in 'TrainConfig'"]),
    ("train.steps=.nan", ["train.steps=.nan", "could not be converted to Integer"]),
    ("optim.lr=.inf", ["optim.lr=.inf", "could not be converted to Float"]),
    ("seed=0,1,x", ["seed=0,1,x", "Value 'x'", "could not be converted to Integer"]),
]


def test_hydra_rejects_unknown_options_types_and_keys(tmp_path):
    """Unknown group options get one line before Hydra starts (`check_group_overrides`); wrong types and unknown
    keys fail at Hydra's composition, before the trainer runs. Each message names the option and what is valid."""
    procs = [(o, want, subprocess.Popen([sys.executable, "train.py", o, f"run_dir={tmp_path / 'never'}"], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for o, want in HYDRA_CASES]
    for override, want, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, (override, err)
        assert err.startswith("error: invalid config: "), err
        for fragment in want:
            assert fragment in err, (override, fragment, err)
    assert not (tmp_path / "never").exists()


def test_command_line_check_knows_extra_config_dirs_and_speaks_once(tmp_path):
    """Options of `--config-dir` and `hydra.searchpath` dirs are options (Hydra composes them); the line of a bad
    override is printed by rank 0 only, and a torchrun rank 1 exits 2 without a word."""
    extra = tmp_path / "extra"
    (extra / "model").mkdir(parents=True)
    shutil.copy(ROOT / "conf" / "model" / "gqa_tiny.yaml", extra / "model" / "mine.yaml")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    cases = {
        "config-dir": (["--config-dir", str(extra), "model=mine", "--cfg", "job"], {}),
        "searchpath": ([f"hydra.searchpath=[file://{extra}]", "model=mine", "--cfg", "job"], {}),
        "searchpath-unknown": ([f"hydra.searchpath=[file://{extra}]", "model=theirs"], {}),
        "rank-1": (["model=theirs"], {"RANK": "1", "WORLD_SIZE": "2"}),
    }
    procs = {name: subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env={**env, **extra_env},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, extra_env) in cases.items()}
    out = {name: (p.communicate(timeout=120), p.returncode) for name, p in procs.items()}
    for name in ("config-dir", "searchpath"):
        (stdout, stderr), code = out[name]
        assert code == 0 and "name: gqa_tiny" in stdout, (name, stderr)
    (_, stderr), code = out["searchpath-unknown"]
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "model='theirs'" in stderr and "mine" in stderr and f"{extra / 'model'}/" in stderr
    (stdout, stderr), code = out["rank-1"]
    assert code == 2 and stdout == "" and stderr == "", stderr


# ----------------------------------------------------------------------------------------------------------------
# 2. Before any process group: in this process
# ----------------------------------------------------------------------------------------------------------------
CONFIG_CASES = [
    (["optim.lr=-0.1"], 1, ["optim.lr=-0.1", "must be a finite number > 0"]),
    (["optim.momentum=1.0"], 1, ["optim.momentum=1.0", "[0, 1)"]),
    (["optim.adamw.betas=[0.9]"], 1, ["optim.adamw.betas=[0.9]", "two numbers in [0, 1)"]),
    (["optim.ns_schedule=cubic"], 1, ["optim.ns_schedule='cubic'", "keller, polar_express"]),
    (["optim.ns_method=qr"], 1, ["optim.ns_method='qr'", "gram, standard"]),
    (["optim.split.qkv=halves"], 1, ["optim.split.qkv='halves'", "split, fused"]),
    (["optim.cuda_graph=sometimes"], 1, ["optim.cuda_graph='sometimes'", "auto, on, off"]),
    (["optim.cuda_graph=on"], 2, ["optim.cuda_graph='on'", "captured on one process only", "this world has 2"]),
    (["optim.cuda_graph=on"], 1, ["optim.cuda_graph='on'", "CUDA graphs need device=cuda"]),
    (["train.steps=0"], 1, ["train.steps=0", "integer >= 1"]),
    (["train.tokens=-1"], 1, ["train.tokens=-1", "integer >= 0"]),
    (["train.batch_size=0"], 1, ["train.batch_size=0", "integer >= 1"]),
    (["train.checkpoint.every=-5"], 1, ["train.checkpoint.every=-5", "integer >= 0"]),
    (["train.checkpoint.keep=0"], 1, ["train.checkpoint.keep=0", "integer >= 1"]),
    (["train.nonfinite=ignore"], 1, ["train.nonfinite='ignore'", "abort, skip"]),
    (["train.max_skipped_steps=0"], 1, ["train.max_skipped_steps=0", "integer >= 1"]),
    (["train.seq_len=512"], 1, ["train.seq_len=512", "model.max_seq_len=256"]),
    (["train.lr_schedule=linear"], 1, ["train.lr_schedule='linear'", "cosine, wsd, constant"]),
    (["data.eval_fraction=1.5"], 1, ["data.eval_fraction=1.5", "[0, 1)"]),
    (["data=files", "data.paths=[]"], 1, ["data.paths=[]", "at least one file"]),
    (["data.scope=everything"], 1, ["data.scope='everything'", "stdlib, site-packages"]),
    (["data.tokenizer=bpe", "model.vocab_size=200"], 1, ["model.vocab_size=200", "at least 257"]),
    (["data=hub", "data.tokenizer=bpe"], 1, ["data.tokenizer='bpe'", "local corpus"]),
    (["data.tokenizer=bpe", "data.bpe_sample_chars=0"], 1, ["data.bpe_sample_chars=0", "integer >= 1"]),
    (["device=tpu"], 1, ["device='tpu'", "auto, cpu, cuda"]),
    (["model.n_heads=5"], 1, ["model.n_heads=5", "must divide model.d_model=128"]),
    (["model.n_kv_heads=3"], 1, ["model.n_kv_heads=3", "must divide model.n_heads=4"]),
    (["model.n_heads=128", "model.n_kv_heads=1"], 1, ["model.n_heads=128", "head_dim", "must be even"]),
    (["model=moe_tiny", "model.top_k=9"], 1, ["model.top_k=9", "model.n_experts=4"]),
    (["model.vocab_size=100"], 1, ["model.vocab_size=100", "tokenizer's vocabulary"]),
    (["mesh=hsdp", "mesh.replicate=3"], 2, ["mesh.replicate='3x0'", "world size 2"]),
    (["mesh=single"], 2, ["mesh.kind='single'", "world size is 2"]),
    (["train.global_batch_tokens=512", "train.batch_size=3"], 2,
     ["train.batch_size=3", "4 sequences per rank", "512 = 8 x 64 tokens over 2 ranks", "largest that does is 2"]),
    (["train.global_batch_tokens=640"], 4, ["train.global_batch_tokens=640", "10 sequences", "over 4 ranks"]),
    (["mesh=fsdp", "mesh.shard=3"], 2, ["mesh.shard=3", "0 or 2"]),
    (["mesh=fsdp", "mesh.replicate=2"], 2, ["mesh.replicate=2", "fsdp", "replicates nothing", "mesh=hsdp"]),
    (["seed=-1"], 1, ["seed=-1", "[0, 4294967295]"]),
    (["seed=1180591620717411303424"], 1, ["seed=1180591620717411303424", "[0, 4294967295]"]),
    (["optim.lr=1e300"], 1, ["optim.lr=1e+300", "must be <= 1e+30"]),
    (["optim.adamw.lr=1e31"], 1, ["optim.adamw.lr=1e+31", "must be <= 1e+30"]),
    (["experiment=qkv_split", "model=gqa_tiny", "model.fused_qkv=false", "optim.split.qkv=fused"], 1,
     ["optim.split.qkv='fused'", "model.fused_qkv=false has no fused QKV weight"]),
    (["model.vocab_size=2000000000"], 1, ["model.vocab_size=2000000000", "GiB per process", "would fit"]),
    (["model.max_seq_len=4000000000"], 1, ["model.max_seq_len=4000000000", "GiB per process", "would fit"]),
    (["train.batch_size=1000000"], 1, ["train.batch_size=1000000", "GiB per process", "would fit"]),
]


@pytest.mark.parametrize("overrides,world,fragments", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_bad_config_value(tmp_path, monkeypatch, overrides, world, fragments):
    monkeypatch.setenv("WORLD_SIZE", str(world))  # what torchrun sets: the mesh is checked against it
    code, err = run_in_process([*overrides, f"run_dir={tmp_path / 'run'}"])
    assert_one_line(code, err, "error: invalid config: ", *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variable, value, valid", [("MUON_NS_AUTOTUNE", "fast", "bounded, full, heuristic"),
                                                    ("MUON_NS_PLAN_TIMING", "replay", "launch, graph"),
                                                    ("MUON_NS_PLAN_CACHE", "yes", "1, 0"),
                                                    ("MUON_NS_PIECES", "3", "auto, 1, 2, 4")])
def test_bad_kernel_setting_in_the_environment(tmp_path, monkeypatch, variable, value, valid):
    """MUON_NS_AUTOTUNE, MUON_NS_PLAN_TIMING, MUON_NS_PLAN_CACHE and MUON_NS_PIECES are read by the kernels at their
    first search or plan, on the GPU, long after start-up: checked with the config, before anything starts."""
    monkeypatch.setenv(variable, value)
    code, err = run_in_process([f"run_dir={tmp_path / 'run'}"])
    assert_one_line(code, err, f"error: invalid config: {variable}='{value}': must be one of {valid}")
    assert not (tmp_path / "run").exists()


def test_split_sizes_that_do_not_sum_to_the_rows():
    """The optimizer used directly: a param group's split_sizes must tile the weight's rows."""
    import torch

    from muon_recipes.optim import Muon

    with pytest.raises(ValueError) as e:
        Muon([{"params": [torch.nn.Parameter(torch.zeros(384, 128))], "split_sizes": (128, 128), "name": "qkv"}])
    line = str(e.value)
    assert "\n" not in line and "param_groups[0] (qkv)" in line and "(384, 128)" in line
    assert "split_sizes=(128, 128)" in line and "sum to the 384 rows" in line


def _not_writable_dirs(tmp_path: Path) -> list[tuple[Path, str]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [(blocker / "run", "Not a directory"), (Path("/sys/muon-recipes-test-run"), "not permitted")]
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "run", "Permission denied"))
    return cases


def test_run_dir_not_writable(tmp_path):
    for run_dir, reason in _not_writable_dirs(tmp_path):
        code, err = run_in_process([f"run_dir={run_dir}"])
        assert_one_line(code, err, f"error: invalid config: run_dir='{run_dir}'", "must be a writable directory",
                        reason)


def test_resume_path_missing_or_incomplete(tmp_path, base_run):
    code, err = run_in_process([f"train.resume={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}"])
    assert_one_line(code, err, f"train.resume='{tmp_path / 'nowhere'}'", "no such checkpoint directory",
                    "auto, never")
    # A save that was interrupted: the directory exists but was never marked complete.
    partial = tmp_path / "ckpts" / ".tmp-step-000004"
    shutil.copytree(base_run / "checkpoints" / "step-000002", partial)
    (partial / "COMPLETE").unlink()
    code, err = run_in_process([f"train.resume={partial}", f"run_dir={tmp_path / 'run'}"])
    assert_one_line(code, err, f"train.resume='{partial}'", "is not a complete checkpoint")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_resume_never_refuses_to_overwrite_checkpoints(tmp_path, base_run):
    run_dir = copy_run(base_run, tmp_path / "run")
    before = fingerprint(run_dir)
    code, err = run_in_process(["train.resume=never", f"run_dir={run_dir}"])
    assert_one_line(code, err, "train.resume='never'", "already holds checkpoints up to step 2", "another run_dir")
    assert fingerprint(run_dir) == before


def test_corrupt_trainer_state_of_the_latest_checkpoint(tmp_path, base_run):
    run_dir = copy_run(base_run, tmp_path / "run")
    extras = run_dir / "checkpoints" / "step-000002" / "extras.json"
    extras.write_text(extras.read_text()[:40])
    before = fingerprint(run_dir)
    code, err = run_in_process(["optim=muon_split", f"run_dir={run_dir}"])  # resume=auto finds it
    assert_one_line(code, err, f"checkpoint {run_dir / 'checkpoints' / 'step-000002'}", "extras.json is corrupt",
                    "JSONDecodeError")
    assert fingerprint(run_dir) == before


def test_trainer_state_without_a_key_the_trainer_needs(tmp_path, base_run):
    run_dir = copy_run(base_run, tmp_path / "run")
    extras = run_dir / "checkpoints" / "step-000002" / "extras.json"
    extras.write_text(json.dumps({k: v for k, v in json.loads(extras.read_text()).items() if k != "scheduler"}))
    before = fingerprint(run_dir)
    code, err = run_in_process(["optim=muon_split", f"run_dir={run_dir}"])
    assert_one_line(code, err, "extras.json holds no 'scheduler'", "corrupt")
    assert fingerprint(run_dir) == before


@pytest.mark.parametrize("content, fragment", [("{not json", "tokenizer_config.json is not valid JSON"),
                                               ('["eos"]', "tokenizer_config.json holds a list")])
def test_tokenizer_config_that_is_not_a_json_object(tmp_path, content, fragment):
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path / "tok"
    directory.mkdir()
    vocab = {"<|endoftext|>": 0, **{chr(c): c - 96 for c in range(97, 123)}}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a")).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(content)
    code, err = run_in_process([f"data.tokenizer={directory}", f"run_dir={tmp_path / 'run'}"])
    assert_one_line(code, err, "data.tokenizer=", fragment)
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    code, err = run_in_process(["logging.wandb.mode=online", f"run_dir={tmp_path / 'run'}"])
    assert_one_line(code, err, "logging.wandb.mode='online'", "no wandb API key", "WANDB_API_KEY")
    assert not (tmp_path / "run").exists()


def _wrong_kinds(run_dir: Path) -> dict:
    """Run dirs (copies of a real one) with one entry of the wrong kind each."""
    made = {}
    d = copy_run(run_dir, run_dir.parent / "checkpoints-file")
    shutil.rmtree(d / "checkpoints")
    (d / "checkpoints").write_text("not a directory")
    made["checkpoints-file"] = (d, "checkpoints is not a directory")
    d = copy_run(run_dir, run_dir.parent / "checkpoints-dangling")
    shutil.rmtree(d / "checkpoints")
    (d / "checkpoints").symlink_to(d / "nowhere")
    made["checkpoints-dangling"] = (d, "checkpoints is a dangling symbolic link")
    d = copy_run(run_dir, run_dir.parent / "metrics-dir")
    (d / "metrics.jsonl").unlink()
    (d / "metrics.jsonl").mkdir()
    made["metrics-dir"] = (d, "metrics.jsonl is not a regular file")
    return made


def test_run_dir_entries_of_the_wrong_kind_are_refused_at_start(tmp_path, base_run):
    for name, (run_dir, fragment) in _wrong_kinds(copy_run(base_run, tmp_path / "base")).items():
        before = fingerprint(run_dir)
        code, err = run_in_process(["optim=muon_split", "train.steps=3", "train.checkpoint.every=1",
                                    f"run_dir={run_dir}"])
        assert_one_line(code, err, f"run_dir='{run_dir}'", fragment, "another run_dir")
        assert fingerprint(run_dir) == before, name


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run dir's lock, as a running run does; returns once it holds it."""
    code = ("import sys, time; from muon_recipes.train.run_dir import RunDirLock; "
            f"RunDirLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_run_per_run_dir_and_a_dead_holder_does_not_count(tmp_path, base_run):
    """A second run in a directory that a live run holds is refused with one line naming the holder and changes
    nothing; once that holder is SIGKILLed (no clean-up), the same run resumes. A metrics line that is not UTF-8
    (written by something else) is moved, byte for byte, to metrics.discarded.jsonl, not lost."""
    run_dir = copy_run(base_run, tmp_path / "run")
    foreign = b'{"step": 2, "loss": "\xff\xfe"}\n'
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(foreign)
    holder = _hold_lock(run_dir)
    try:
        before = fingerprint(run_dir)
        code, err = run_in_process(["optim=muon_split", "train.steps=3", f"run_dir={run_dir}"])
        assert_one_line(code, err, f"run_dir='{run_dir}'", f"is in use by pid {holder.pid}", "started",
                        "one run per run directory")
        # As Hydra's run dir: refused before Hydra writes its .hydra/ snapshot into it.
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        proc = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert_one_line(proc.returncode, proc.stderr, f"hydra.run.dir='{run_dir}'", f"pid {holder.pid}")
        assert fingerprint(run_dir) == before and not (run_dir / ".hydra").exists()
    finally:
        holder.kill()
        holder.wait()
    code, err = run_in_process(["optim=muon_split", "train.steps=3", f"run_dir={run_dir}"])
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run_dir / "metrics.discarded.jsonl").read_bytes() == foreign


# ----------------------------------------------------------------------------------------------------------------
# 3. After start-up: a 2-rank world, every rank's exit code
# ----------------------------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, jobs: list, init_files: list, out: str) -> None:
    """Each job: (name, overrides, prepare or None); rank 0 runs `prepare()` (which damages a run dir made by an
    earlier job of this world) before every rank starts the run."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    results = {}
    for (name, overrides, prepare), init_file in zip(jobs, init_files):
        with joined_world(rank, world, init_file):
            if prepare is not None:
                if rank == 0:
                    prepare[0](*prepare[1:])
                dist.barrier()
            results[name] = run_in_process(overrides)
    Path(out, f"rank-{rank}.json").write_text(json.dumps(results))


def _damage_rank_file(base: str, run_dir: str, how: str) -> None:
    """A copy of a 2-rank run whose latest checkpoint's rank-00001.json is garbage or gone; its fingerprint."""
    shutil.copytree(base, run_dir)
    rank_file = Path(run_dir, "checkpoints", "step-000002", "rank-00001.json")
    if how == "corrupt":
        rank_file.write_text('{"rng": {"cpu": [1, 2')
    else:
        rank_file.unlink()
    Path(run_dir + ".before.json").write_text(json.dumps(fingerprint(Path(run_dir))))


class _RunsShellCommand:
    """A pickle that would run a shell command when unpickled: what a tampered checkpoint could carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _corrupt_copies(base: Path, root: Path) -> dict:
    """Run dirs whose latest checkpoint is damaged in one way each (resume=auto finds them)."""
    ckpt = "checkpoints/step-000002"
    made = {}
    d = copy_run(base, root / "metadata-garbage")
    (d / ckpt / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    made["metadata-garbage"] = d
    d = copy_run(base, root / "metadata-evil")
    (d / ckpt / ".metadata").write_bytes(pickle.dumps(_RunsShellCommand(str(root / "PWNED"))))
    made["metadata-evil"] = d
    d = copy_run(base, root / "shard-truncated")
    shard = sorted((d / ckpt).glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    made["shard-truncated"] = d
    return made


@pytest.fixture(scope="module")
def after_startup(base_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("after-startup")
    parquet = root / "corrupt.parquet"
    parquet.write_bytes(b"PAR1 this is not a parquet file")
    jsonl = root / "broken.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": broken\n')
    deep = root / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    fifo = root / "pipe.txt"
    os.mkfifo(fifo)
    binary = root / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    ckpt = base_run / "checkpoints" / "step-000002"
    corrupt = _corrupt_copies(base_run, root)
    base_before = fingerprint(base_run)
    fresh = lambda name: f"run_dir={root / 'fresh' / name}"  # noqa: E731
    base2 = root / "base2"  # a 2-rank run: rank-00001.json exists in its checkpoints
    rollback = copy_run(base_run, root / "wandb-rollback")
    two_rank = [
        ("base2", ["optim=muon_split", "train.checkpoint.every=1", f"run_dir={base2}"], None),
        ("rank1-corrupt", ["optim=muon_split", f"run_dir={root / 'rank1-corrupt'}"],
         (_damage_rank_file, str(base2), str(root / "rank1-corrupt"), "corrupt")),
        ("rank1-missing", ["optim=muon_split", f"run_dir={root / 'rank1-missing'}"],
         (_damage_rank_file, str(base2), str(root / "rank1-missing"), "missing")),
        # Back to step 1 of a run that reached step 2, with a wandb run that cannot start: nothing may move.
        ("wandb-rollback", ["optim=muon_split", "train.steps=3", f"run_dir={rollback}", "logging.wandb.mode=offline",
                            "logging.wandb.project=a/b", f"train.resume={rollback / 'checkpoints' / 'step-000001'}"],
         None),
    ]
    rollback_before = fingerprint(rollback)
    jobs = [
        ("missing-file", ["data=files", f"data.paths=[{root / 'missing.txt'}]", fresh("missing-file")]),
        ("corrupt-parquet", ["data=files", f"data.paths=[{parquet}]", fresh("corrupt-parquet")]),
        ("broken-jsonl", ["data=files", f"data.paths=[{jsonl}]", fresh("broken-jsonl")]),
        ("deep-jsonl", ["data=files", f"data.paths=[{deep}]", fresh("deep-jsonl")]),
        ("fifo", ["data=files", f"data.paths=[{fifo}]", fresh("fifo")]),
        ("binary-txt", ["data=files", f"data.paths=[{binary}]", "data.eval_fraction=0", fresh("binary-txt")]),
        ("more-layers", ["optim=muon_split", "model.n_layers=3", f"train.resume={ckpt}", fresh("more-layers")]),
        ("wider", ["optim=muon_split", "model.d_model=192", "model.n_heads=6", "model.n_kv_heads=3",
                   f"train.resume={ckpt}", fresh("wider")]),
        ("other-optimizer", ["optim=adamw", f"train.resume={ckpt}", fresh("other-optimizer")]),
        ("other-data", ["optim=muon_split", "data.max_chars=60000", f"train.resume={ckpt}", fresh("other-data")]),
    ] + [(name, ["optim=muon_split", f"run_dir={d}"]) for name, d in corrupt.items()]
    jobs = [(name, overrides, None) for name, overrides in jobs] + two_rank
    before = {name: fingerprint(d) for name, d in corrupt.items()}
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, jobs, rendezvous_files(root / "rendezvous", len(jobs)), str(root)), nprocs=2, join=True)
    results = [json.loads((root / f"rank-{r}.json").read_text()) for r in range(2)]
    after = {name: fingerprint(d) for name, d in corrupt.items()}
    for name in ("rank1-corrupt", "rank1-missing"):
        corrupt[name] = root / name
        before[name] = json.loads((root / f"{name}.before.json").read_text())
        after[name] = json.loads(json.dumps(fingerprint(root / name)))  # the same types as the stored one
    corrupt["wandb-rollback"], before["wandb-rollback"], after["wandb-rollback"] = (
        rollback, rollback_before, fingerprint(rollback))
    assert results[0]["base2"][0] == 0, results[0]["base2"]
    return {"root": root, "results": results, "before": before, "after": after, "corrupt": corrupt,
            "base_unchanged": fingerprint(base_run) == base_before, "ckpt": ckpt}


AFTER_STARTUP_CASES = {
    "missing-file": lambda r: ["data.paths=", "missing.txt", "no such file"],
    "corrupt-parquet": lambda r: ["data.paths=", "corrupt.parquet", "could not be read", "ArrowInvalid"],
    "broken-jsonl": lambda r: ["data.paths=", "broken.jsonl", "line 2 is not valid JSON"],
    "deep-jsonl": lambda r: ["data.paths=", "deep.jsonl", "could not be read (RecursionError"],
    "fifo": lambda r: ["data.paths=", "pipe.txt", "is not a regular file"],
    "binary-txt": lambda r: ["data.paths=", "binary.txt", "is not UTF-8 text (byte 128: 0x80)"],
    "more-layers": lambda r: [f"checkpoint {r['ckpt']} does not fit this run", "model.layers.2.",
                              "is in this run but not in the checkpoint", "model.n_layers=2 in the checkpoint, 3 now"],
    "wider": lambda r: ["does not fit this run", "has shape [", "in the checkpoint", "model.d_model=128 in the "
                        "checkpoint, 192 now"],
    "other-optimizer": lambda r: ["does not fit this run", ".exp_avg is in this run but not in the checkpoint",
                                  "optim.name='muon_split' in the checkpoint, 'adamw' now"],
    "other-data": lambda r: ["invalid config: data=", "this run's data packs into", "changed since the checkpoint"],
    "metadata-garbage": lambda r: [".metadata is unreadable", "UnpicklingError"],
    "metadata-evil": lambda r: [".metadata is unreadable", "posix.system is not allowed in checkpoint metadata"],
    "shard-truncated": lambda r: ["could not be read (rank", "truncated or corrupt", "train.resume=<path>"],
    # A failure on rank 1 alone is printed, by rank 0, naming rank 1; rank 0 changed nothing before it knew.
    "rank1-corrupt": lambda r: ["error: rank 1: checkpoint", "rank-00001.json is corrupt"],
    "rank1-missing": lambda r: ["error: rank 1: checkpoint", "rank-00001.json is missing"],
    "wandb-rollback": lambda r: ["logging.wandb.mode='offline'", "wandb could not start its run",
                                 "Invalid project name 'a/b'"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(AFTER_STARTUP_CASES))
def test_failure_after_startup_exits_2_on_every_rank(after_startup, case):
    (code0, err0), (code1, err1) = after_startup["results"][0][case], after_startup["results"][1][case]
    assert code0 == 2 and code1 == 2, (code0, code1, err0, err1)
    assert error_lines(err1) == [], "rank 1 stays quiet (one line in torchrun's output)"
    assert_one_line(code0, err0, "error: ", *AFTER_STARTUP_CASES[case](after_startup))
    if case in after_startup["corrupt"]:  # resume=auto in the damaged run dir: nothing in it changed
        assert after_startup["after"][case] == after_startup["before"][case]
    else:
        assert not (after_startup["root"] / "fresh" / case / "metrics.jsonl").exists()
    assert after_startup["base_unchanged"]
    assert not (after_startup["root"] / "PWNED").exists(), "the tampered metadata ran its command"
