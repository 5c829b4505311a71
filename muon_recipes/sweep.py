"""Hydra multirun jobs as proper distributed runs, and the identity of a sweep on wandb.

`python train.py -m experiment=qkv_split seed=0,1,2` makes Hydra's basic launcher run the jobs one after the
other inside the sweeping process. A process group cannot grow in place, so a job that should use several
devices becomes its own torchrun world: `run_job` starts

    python -m torch.distributed.run --standalone --nproc_per_node=N train.py <the job's overrides>
        hydra.run.dir=<the job's dir>

and waits; the job dir then holds what a single torchrun run writes (`.hydra/`, `config.json`,
`metrics.jsonl`, the wandb run). N is `launcher.nproc_per_node` (`auto`: the visible GPUs; 1 on CPU, when the
job trains in place). Under SLURM through hydra-submitit-launcher (`hydra/launcher=slurm`) every task is
already one rank: `run_job` exports the torch.distributed variables from SLURM's and trains in place.

Each job of a sweep also gets a wandb identity, unless the config sets one: group = experiment + the sweep's
timestamp (two sweeps of one experiment never mix on the dashboard), name = experiment + the arm (the swept
overrides other than the seed) + seed, tags = the swept `key=value`s. The torchrun children receive it through
the environment, so their `config.json` and overrides are those of a single run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from muon_recipes.train.loggers import duration

SWEEP_IDENTITY_ENV = "MUON_RECIPES_SWEEP_IDENTITY"  # JSON {"group", "name", "tags"} for torchrun children
# Variables a world of one (plain `python train.py`) sets for itself; removed between in-process jobs so the next
# job decides afresh instead of mistaking itself for a torchrun rank.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Keys that say where or how a job is logged or launched, never which arm it is (also read by
# recipes/compare_runs.py, which groups finished runs into arms).
NOT_ARM_KEYS = ("seed", "run_dir", "device", "launcher.nproc_per_node", "logging.wandb.mode",
                "logging.wandb.group", "logging.wandb.name", "logging.wandb.tags")
# Hydra overrides of the sweep that must not reach a child run (it is a single run in the job's dir).
_SWEEP_ONLY_HYDRA = ("hydra.mode", "hydra.sweep", "hydra.run.dir", "hydra.launcher", "hydra.sweeper",
                     "hydra/launcher", "hydra/sweeper", "hydra.job.num", "hydra.job.id")
WANDB_TAG_MAX = 64  # wandb rejects longer tags


class SweepJobError(RuntimeError):
    """A job's torchrun world exited with an error; Hydra records the job as failed and goes on."""


# --------------------------------------------------------------------------------------------------------------
# Which job is this?
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SweepJob:
    num: int  # Hydra's job number, 0-based
    total: Optional[int]  # jobs in the sweep (None when the sweep cannot be re-read)
    overrides: list  # the job's task overrides, e.g. ["experiment=qkv_split", "optim.split.qkv=fused", "seed=0"]
    hydra_overrides: list  # the sweep's hydra overrides that also apply to a single run
    output_dir: str
    sweep_dir: str
    cwd: str  # the directory `python train.py -m` ran in
    swept: list = field(default_factory=list)  # keys with more than one value in the sweep

    def value(self, key: str) -> Optional[str]:
        for o in self.overrides:
            k, _, v = o.partition("=")
            if k.lstrip("+") == key:
                return v
        return None

    @property
    def arm(self) -> str:
        """The swept overrides other than the seed, e.g. `optim.split.qkv=fused`."""
        return ",".join(f"{k}={self.value(k)}" for k in self.swept if k not in NOT_ARM_KEYS)


def current_job() -> Optional[SweepJob]:
    """The running Hydra multirun job, or None (a single run, a torchrun child, or not under Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = str(hc.sweep.dir)
    swept, total = sweep_axes(Path(sweep_dir) / "multirun.yaml")
    overrides = [str(o) for o in hc.overrides.task]
    if swept is None:  # no multirun.yaml (another sweeper): every job override may be an axis
        swept = [o.partition("=")[0].lstrip("+") for o in overrides]
    hydra_overrides = [str(o) for o in hc.overrides.hydra if not str(o).startswith(_SWEEP_ONLY_HYDRA)]
    return SweepJob(num=int(hc.job.num), total=total, overrides=overrides, hydra_overrides=hydra_overrides,
                    output_dir=str(hc.runtime.output_dir), sweep_dir=sweep_dir, cwd=str(hc.runtime.cwd),
                    swept=swept)


def sweep_axes(multirun_yaml: Path) -> tuple[Optional[list], Optional[int]]:
    """(swept keys, number of jobs) of a sweep, from the `multirun.yaml` Hydra's basic sweeper saves.

    The axes are the sweeper's `hydra.sweeper.params` (an experiment's default axes) with the command line's
    overrides on top, as `BasicSweeper.sweep` combines them: a key given on the command line replaces the same
    key of the params.
    """
    if not multirun_yaml.is_file():
        return None, None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(multirun_yaml)
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(cfg, "hydra.overrides.task") or [])
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # a sweep syntax this parser cannot read without the config loader (glob choices)
        return None, None
    counts: dict = {}
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        counts[key] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    total = 1
    for n in counts.values():
        total *= n
    return [k for k, n in counts.items() if n > 1], total


# --------------------------------------------------------------------------------------------------------------
# wandb identity of a sweep's job
# --------------------------------------------------------------------------------------------------------------
def sweep_stamp(sweep_dir: str) -> str:
    """`outputs/multirun/2025-01-31/12-00-00` -> `2025-01-31_12-00-00`: the last two parts of the sweep dir."""
    parts = Path(sweep_dir).parts
    return "_".join(parts[-2:]) if len(parts) >= 2 else (parts[-1] if parts else "sweep")


def identity(job: SweepJob, experiment: str, model: str, optim: str) -> dict:
    seed = job.value("seed")
    arm = job.arm or f"{model}-{optim}"
    name = "-".join(p for p in (experiment, arm, f"s{seed}" if seed is not None else "") if p)
    tags = [f"{k}={job.value(k)}"[:WANDB_TAG_MAX] for k in job.swept]
    return {"group": f"{experiment or 'sweep'}-{sweep_stamp(job.sweep_dir)}", "name": name,
            "tags": ([experiment] if experiment else []) + tags}


def apply_identity(cfg: Any, ident: dict) -> None:
    """Fill `logging.wandb.{group,name}` where empty and add the tags, in place on the composed config."""
    w = cfg.logging.wandb
    if not w.group:
        w.group = ident["group"]
    if not w.name:
        w.name = ident["name"]
    w.tags = list(w.tags) + [t for t in ident["tags"] if t not in w.tags]


# --------------------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------------------
def resolve_nproc(nproc_per_node: Any, device: str) -> int:
    """`auto`: one process per visible CUDA device (1 on CPU); an integer as given."""
    if nproc_per_node != "auto":
        return int(nproc_per_node)
    if device == "cpu":
        return 1
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def _script_path(cwd: str) -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or sys.argv[0]
    return path if os.path.isabs(path) else os.path.join(cwd, path)


def torchrun_command(job: SweepJob, nproc: int, script: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
            *job.overrides, *job.hydra_overrides, f"hydra.run.dir={job.output_dir}"]


def _export_slurm_ranks() -> None:
    """Under hydra-submitit-launcher each SLURM task is one rank: set RANK, WORLD_SIZE, MASTER_ADDR, ... ."""
    from submitit.helpers import TorchDistributedEnvironment

    # The trainer picks its GPU by LOCAL_RANK, so every task keeps seeing all of the node's GPUs.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class _Progress:
    """One line per job start and end on the sweeping process: `[sweep] job 3/8 ...`, with an estimate of what
    is left (mean job time so far x jobs left). A line per job, not a bar: the jobs print their own steps."""

    def __init__(self) -> None:
        self.durations: list = []

    def start(self, job: SweepJob, how: str) -> float:
        where = os.path.relpath(job.output_dir, job.cwd) if job.output_dir.startswith(job.cwd) else job.output_dir
        what = " ".join(x for x in (job.arm, f"seed={job.value('seed')}" if job.value("seed") else "") if x)
        print(f"[sweep] job {self._of(job)} started: {what or 'no swept keys'} -> {where} ({how})", flush=True)
        return time.perf_counter()

    def end(self, job: SweepJob, started: float, ok: bool) -> None:
        took = time.perf_counter() - started
        self.durations.append(took)
        left = ""
        if job.total:
            remaining = job.total - (job.num + 1)
            if remaining > 0:
                left = f", ~{duration(remaining * sum(self.durations) / len(self.durations))} left"
        print(f"[sweep] job {self._of(job)} {'done' if ok else 'FAILED'} in {duration(took)}{left}", flush=True)

    @staticmethod
    def _of(job: SweepJob) -> str:
        return f"{job.num + 1}/{job.total}" if job.total else f"{job.num + 1}"


_PROGRESS = _Progress()


def _validate_before_spawn(cfg: Any, nproc: int) -> None:
    """Bad configs fail in the sweeping process, before N processes start, with the trainer's one-line error."""
    from muon_recipes.config import ConfigError, to_dataclass, validate

    try:
        validate(to_dataclass(cfg), nproc)
    except ConfigError as e:
        from muon_recipes.train.entry import EXIT_BAD_INPUT

        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def run_job(cfg: Any, train: Callable[[Any], Any]) -> Any:
    """What `train.py` does with a composed config: train in place, or, for a multirun job on several devices,
    as a torchrun world of its own (see the module docstring)."""
    job = current_job()
    if job is None:  # a single run, or a torchrun child of a sweep job: take the sweep's wandb identity if any
        if os.environ.get(SWEEP_IDENTITY_ENV):
            apply_identity(cfg, json.loads(os.environ[SWEEP_IDENTITY_ENV]))
        return train(cfg)

    ident = identity(job, str(cfg.experiment.name or ""), str(cfg.model.name), str(cfg.optim.name))
    apply_identity(cfg, ident)
    if os.environ.get("SUBMITIT_EXECUTOR") and "RANK" not in os.environ:
        _export_slurm_ranks()
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    nproc = 1 if "RANK" in os.environ else resolve_nproc(cfg.launcher.nproc_per_node, str(cfg.device))

    if nproc == 1:  # in place: this process is the job's only rank, or one rank of a world set up outside
        started = _PROGRESS.start(job, "in process") if is_rank0 else 0.0
        saved = {k: os.environ.get(k) for k in _DIST_ENV}
        ok = False
        try:
            result = train(cfg)
            ok = True
            return result
        except SystemExit as e:
            # The trainer ends a run with sys.exit: 2 for a bad config (stop the sweep, as the torchrun path does
            # before spawning), other codes for a run that failed (e.g. 3, non-finite loss at a too-high lr): only
            # this job failed; Hydra records it and goes on with the next, as for a torchrun job.
            if e.code in (0, None):
                ok = True
                return None
            from muon_recipes.train.entry import EXIT_BAD_INPUT

            if e.code == EXIT_BAD_INPUT:
                raise
            raise SweepJobError(f"sweep job {job.num} ({' '.join(job.overrides)}) failed: the run exited with "
                                f"code {e.code}; its output is in {job.output_dir}") from None
        finally:
            for k, v in saved.items():  # undo the world of one that the trainer set up for itself
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if is_rank0:
                _PROGRESS.end(job, started, ok)

    _validate_before_spawn(cfg, nproc)
    cmd = torchrun_command(job, nproc, _script_path(job.cwd))
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    # torchrun >= 2.5 shares its rendezvous store with the workers, which breaks their process group after
    # an elastic restart (pytorch/pytorch#135712, see docs/checkpoints.md); a private store per world avoids it.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    env[SWEEP_IDENTITY_ENV] = json.dumps({"group": cfg.logging.wandb.group, "name": cfg.logging.wandb.name,
                                          "tags": list(cfg.logging.wandb.tags)})
    started = _PROGRESS.start(job, f"torchrun, {nproc} processes")
    rc = subprocess.run(cmd, cwd=job.cwd, env=env).returncode
    _PROGRESS.end(job, started, rc == 0)
    if rc != 0:
        raise SweepJobError(f"sweep job {job.num} ({' '.join(job.overrides)}) failed: torchrun exited with {rc}; "
                            f"its output is in {job.output_dir}")
    return None
