"""`run(cfg)`: from a composed Hydra config to a finished run.

Everything that can be checked without a process group is checked first (config values, mesh vs world size,
device, memory within reach, tokenizer vs vocabulary, the run directory and its lock, the checkpoint
`train.resume` names); a bad value ends every rank with one line and exit code 2 before NCCL/gloo or a GPU is
touched. Rank 0 holds the run directory's lock (`run_dir.RunDirLock`) from then until the run ends.

Start-up is a transaction (see docs/checkpoints.md): building the model, optimizer and data, loading the
checkpoint and starting the loggers run in steps that each end with an agreement between the ranks
(`failures.agree`), and only after the last one does rank 0 change the run directory (`_commit`). A start-up that
fails on any rank leaves config.json, metrics.jsonl and the checkpoints as they were, and the line printed names
the rank and the cause. A non-finite loss under `train.nonfinite=abort` ends the run with one line and exit code 3.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Optional

import torch

from muon_recipes.config import ConfigError, RunConfig, derive_batch, first_line, to_dataclass, validate
from muon_recipes.parallel.distributed import (broadcast_object, init_distributed, rank_from_env,
                                               resolve_device_type, shutdown_distributed, world_size_from_env)
from muon_recipes.train.checkpoint import CheckpointError
from muon_recipes.train.failures import (EXIT_BAD_INPUT, EXIT_NONFINITE, RunFailed, agree, describe, exit_agreed,
                                         exit_alone, exit_before_start)
from muon_recipes.train.memory_check import check_fits_in_memory
from muon_recipes.train.run_dir import RunDirLock, check_layout
from muon_recipes.train.trainer import NonFiniteError

__all__ = ["EXIT_BAD_INPUT", "EXIT_NONFINITE", "run"]


def _hydra_run_dir() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # not under Hydra (tests, notebooks)
        return os.path.join("outputs", time.strftime("%Y-%m-%d/%H-%M-%S"))


def _warn_about_elastic_restarts(rc: RunConfig) -> None:
    """Two ways a torchrun restart (`--max-restarts`) can fail to resume, said once on rank 0.

    * torchrun >= 2.5 shares its rendezvous store with the job and keeps it across restarts, so a restarted
      rank can read the address a dead rank published (pytorch/pytorch#135712): the restart then dies in
      `init_process_group` ("connection refused"). `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` in torchrun's
      environment gives every restart a fresh store.
    * Hydra's default run directory is a new timestamp per start: resume=auto of a restart sees nothing.
    """
    if rank_from_env() != 0 or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        print("warning: torchrun --max-restarts with a shared rendezvous store: a restart may reuse stale "
              "addresses and fail (pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for "
              "torchrun", file=sys.stderr, flush=True)
    if rc.run_dir:
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        fixed = any(str(o).startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)
    except Exception:  # not under Hydra
        return
    if not fixed:
        print("warning: torchrun --max-restarts without run_dir=...: each restart gets a new Hydra run directory "
              "(a timestamp), where train.resume=auto finds no checkpoint; pass run_dir=... or hydra.run.dir=...",
              file=sys.stderr, flush=True)


def _check_run_dir(path: str) -> None:
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError("run_dir", path, f"must be a writable directory ({e.strerror})") from None


def check_run_dir(rc: RunConfig, run_dir: Optional[str]) -> None:
    """The run directory is writable and `train.resume` names a usable checkpoint (ConfigError otherwise).

    `run_dir` None: this rank does not know it before the process group exists (Hydra's directory is rank 0's);
    then only a checkpoint path given in `train.resume` is checked.
    """
    from muon_recipes.train.checkpoint import read_extras, resolve_resume

    if run_dir is not None:
        _check_run_dir(run_dir)
        check_layout(run_dir)
    path = resolve_resume(rc.train.resume, run_dir)
    if path is not None:
        read_extras(path)  # readable trainer state; the model/optimizer fit is checked once they exist


def prepare(cfg: Any) -> tuple[RunConfig, str, int, int]:
    """Typed + validated config, device type and mesh sizes. Raises ConfigError; touches no process group."""
    rc = cfg if isinstance(cfg, RunConfig) else to_dataclass(cfg)
    replicate, shard = validate(rc, world_size_from_env())
    rc.train.batch_size, rc.train.grad_accum = derive_batch(rc.train, world_size_from_env())
    device_type = resolve_device_type(rc.device)
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", rc.device, "no CUDA device is visible; use device=cpu or device=auto")
    if device_type == "cuda" and int(os.environ.get("LOCAL_RANK", "0")) >= torch.cuda.device_count():
        raise ConfigError("device", rc.device, f"LOCAL_RANK {os.environ.get('LOCAL_RANK')} but only "
                          f"{torch.cuda.device_count()} CUDA devices are visible")
    if rc.optim.cuda_graph == "on" and device_type != "cuda":
        raise ConfigError("optim.cuda_graph", "on", f"CUDA graphs need a CUDA device, this run is on {device_type}; "
                          "use auto or off")
    check_fits_in_memory(rc, device_type, world_size_from_env())
    _check_wandb_login(rc)
    return rc, device_type, replicate, shard


def _check_wandb_login(rc: RunConfig) -> None:
    """`logging.wandb.mode=online` needs an API key (WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes);
    without one wandb would ask for it on a terminal no rank has, or fail after start-up."""
    w = rc.logging.wandb
    if not (w.enabled and w.mode == "online") or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError("logging.wandb.mode", w.mode, f"no wandb API key for {host} (WANDB_API_KEY or `wandb login`); "
                                                    "log in, or use logging.wandb.mode=offline")


def _resolved_config(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    if isinstance(cfg, RunConfig):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return OmegaConf.to_container(cfg, resolve=True)


def _run_name(rc: RunConfig) -> str:
    if rc.logging.wandb.name:
        return rc.logging.wandb.name
    parts = [rc.experiment.name] if rc.experiment.name else []
    return "-".join(parts + [rc.model.name, rc.optim.name, f"s{rc.seed}"])


def build_loggers(rc: RunConfig, run_dir: str, config_dict: dict, wandb_run_id: Optional[str] = None):
    from muon_recipes.train.loggers import ConsoleLogger, Loggers, WandbLogger

    loggers = []
    if rc.logging.console:
        loggers.append(ConsoleLogger())
    w = rc.logging.wandb
    if w.enabled and w.mode != "disabled":
        try:
            loggers.append(WandbLogger(run_dir=run_dir, mode=w.mode, project=w.project, entity=w.entity,
                                       group=w.group or rc.experiment.name, tags=w.tags, name=_run_name(rc),
                                       config=config_dict, resume_id=wandb_run_id))
        except Exception as e:  # noqa: BLE001 - wandb raises its own error types (usage, auth, network)
            raise ConfigError("logging.wandb.mode", w.mode,
                              f"wandb could not start its run ({type(e).__name__}: {first_line(e)}); check "
                              "logging.wandb.project/entity, or use logging.wandb.mode=disabled") from None
    return Loggers(loggers)


def run(cfg: Any) -> list[dict]:
    """Train one run; returns the logged metrics (rank 0 has them all, other ranks the same values)."""
    launch_time = time.perf_counter()
    lock = None
    try:
        rc, device_type, replicate, shard = prepare(cfg)
        from muon_recipes.data import build_tokenizer

        tokenizer = build_tokenizer(rc.data, rc.model.vocab_size)
        if tokenizer.vocab_size > rc.model.vocab_size:
            raise ConfigError("model.vocab_size", rc.model.vocab_size,
                              f"must be >= the tokenizer's vocabulary ({tokenizer.vocab_size}, data.tokenizer="
                              f"{rc.data.tokenizer})")
        run_dir = rc.run_dir or _hydra_run_dir()
        _warn_about_elastic_restarts(rc)
        if rank_from_env() == 0:  # the run directory is this run's before anything of it is read
            _check_run_dir(run_dir)
            lock = RunDirLock(run_dir)
            lock.acquire()
        check_run_dir(rc, run_dir if (rc.run_dir or rank_from_env() == 0) else None)
    except (ConfigError, CheckpointError) as e:
        if lock is not None:
            lock.release(undo=True)
        exit_before_start(str(e))
    config_dict = _resolved_config(cfg)
    ctx = init_distributed(device_type, rc.mesh.kind, replicate, shard, ep=rc.mesh.ep)
    try:
        return _train(rc, ctx, broadcast_object(run_dir), tokenizer, config_dict, launch_time)
    except RunFailed as e:  # start-up: every rank knows every rank's failure
        exit_agreed(e, ctx.rank)
    except (NonFiniteError, CheckpointError) as e:  # raised alike on every rank (all-reduced values, agreed saves)
        exit_agreed(RunFailed([describe(e, 0)]), ctx.rank)  # one failure, said as rank 0 says it
    except Exception as e:  # noqa: BLE001 - this rank alone, mid-training: say it here before the others notice
        exit_alone(e, ctx.rank)
    finally:
        shutdown_distributed()
        if lock is not None:
            lock.release()


def _train(rc: RunConfig, ctx, run_dir: str, tokenizer, config_dict: dict, launch_time: float) -> list[dict]:
    """Start-up as a transaction, then training. Each start-up step ends with an agreement between the ranks
    (`failures.agree`); only when building, loading and the loggers succeeded on every rank does rank 0 change
    the run directory (set newer checkpoints and metrics rows aside, write config.json, open metrics.jsonl)."""
    from muon_recipes.data import DistributedLoader
    from muon_recipes.optim.param_groups import describe_param_groups
    from muon_recipes.train.checkpoint import Checkpointer, resolve_resume
    from muon_recipes.train.trainer import Trainer

    model, optimizer, train_ds, eval_ds = agree(lambda: _build(rc, ctx, tokenizer), ctx.rank)
    loader = DistributedLoader(train_ds, batch_size=rc.train.batch_size, rank=ctx.dp_rank,
                               world_size=ctx.dp_world_size, seed=rc.seed)
    ck = rc.train.checkpoint
    checkpointer = Checkpointer(run_dir, ck.every, ck.keep, ck.async_save, ctx.device.type)
    trainer = Trainer(rc, ctx, run_dir, model, optimizer, tokenizer, loader, eval_ds, None, checkpointer=checkpointer,
                      config_dict=config_dict)

    resume_from = agree(lambda: resolve_resume(rc.train.resume, run_dir), ctx.rank)
    if resume_from is not None:
        def load() -> None:
            extras, rank_extras = checkpointer.load(resume_from, model, optimizer, config_dict)
            try:
                trainer.load_checkpoint_extras(extras, rank_extras, int(extras.get("world_size", ctx.world_size)))
            except ConfigError:
                raise
            except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a value of the wrong shape or type
                raise CheckpointError(f"checkpoint {resume_from}: its trainer state does not load "
                                      f"({type(e).__name__}: {first_line(e)}); it is corrupt") from None

        agree(load, ctx.rank)
    loggers = agree(lambda: build_loggers(rc, run_dir, config_dict, trainer.wandb_run_id) if ctx.is_main else None,
                    ctx.rank)
    try:
        committed = agree(lambda: _commit(rc, run_dir, trainer.step, config_dict, loggers) if ctx.is_main else None,
                          ctx.rank)
    except RunFailed:
        if loggers is not None:
            loggers.close()
        raise
    if ctx.is_main:
        moved_rows, discarded = committed
        trainer.wandb_run_id = _wandb_run_id(loggers)
        trainer.loggers = loggers
        n_params = sum(p.numel() for p in model.parameters())
        mesh = f"{rc.mesh.kind} {ctx.replicate}x{ctx.shard}" + (f", experts ep={ctx.ep}" if rc.mesh.kind == "ep" else "")
        print(f"run dir {run_dir} | world {ctx.world_size} ({mesh}) on "
              f"{ctx.device.type} | model {rc.model.name} {n_params / 1e6:.2f}M params | "
              f"{trainer.tokens_per_step} tokens/step | peak {trainer.peak_source}", flush=True)
        print(trainer.describe_budget(), flush=True)
        print(describe_param_groups(optimizer), flush=True)
        if resume_from is not None:
            print(f"resumed from {resume_from} at step {trainer.step} ({trainer.tokens_seen:,} tokens)"
                  + (f"; {moved_rows} metrics rows after it moved to metrics.discarded.jsonl" if moved_rows else "")
                  + (f"; newer checkpoints moved to {os.path.dirname(discarded[0])}" if discarded else ""),
                  flush=True)
            if trainer.done():
                print(f"nothing left to train: step {trainer.step} reaches train.steps={rc.train.steps}"
                      + (f" or train.tokens={rc.train.tokens}" if rc.train.tokens else ""), flush=True)
    trainer.start_time = time.perf_counter()
    trainer.launch_time = launch_time
    try:
        history = trainer.fit()
    except BaseException:
        if loggers is not None:
            with contextlib.suppress(Exception):  # a second error while closing must not hide the first
                loggers.close()
        raise
    if loggers is not None:
        loggers.close()
    return history


def _build(rc: RunConfig, ctx, tokenizer):
    """Model (sharded), optimizer and datasets: this rank's local part of start-up."""
    from muon_recipes.data import build_datasets

    model, optimizer = build_model_and_optimizer(rc, ctx)
    train_ds, eval_ds = _build_data(build_datasets, rc, tokenizer)
    return model, optimizer, train_ds, eval_ds


def build_model_and_optimizer(rc: RunConfig, ctx):
    """The model as a run trains it (built with the run's seed, sharded, compiled as configured) and its optimizer;
    also what `recipes/profile_step.py` profiles."""
    from muon_recipes.models import build_model
    from muon_recipes.optim.param_groups import build_optimizer
    from muon_recipes.parallel.fsdp import parallelize

    torch.manual_seed(rc.seed)
    # Build whole on the device with the run's seed on every rank, then shard: the initial weights are identical
    # for any world size (the 1- vs 2-process test relies on it), at the cost of one unsharded copy at start-up.
    with torch.device(ctx.device):
        model = build_model(rc.model)  # initializes its weights (Transformer.init_weights) from the seeded RNG
    bf16 = (rc.train.mixed_precision == "bf16" or (rc.train.mixed_precision == "auto" and ctx.device.type == "cuda"))
    parallelize(model, ctx.mesh, bf16=bf16, compile=rc.train.compile,
                activation_checkpointing=rc.train.activation_checkpointing, expert_mesh=ctx.expert_mesh)
    return model, build_optimizer(model, rc.optim)


def _commit(rc: RunConfig, run_dir: str, step: int, config_dict: dict, loggers) -> tuple[int, list[str]]:
    """The first change to the run directory (rank 0): the run continues from `step`, so what was logged or saved
    after it belongs to a trajectory that died (or was abandoned for an older checkpoint) and is moved aside, not
    deleted; then config.json and metrics.jsonl. Returns (metrics rows moved, checkpoints moved)."""
    from muon_recipes.train.checkpoint import checkpoints_dir, discard_newer, remove_leftovers, trim_metrics
    from muon_recipes.train.loggers import JsonlLogger

    remove_leftovers(checkpoints_dir(run_dir))  # what a killed run left half-written
    discarded = discard_newer(run_dir, step)
    moved_rows = trim_metrics(os.path.join(run_dir, "metrics.jsonl"), step)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=1)
    if rc.logging.jsonl:
        loggers.loggers.append(JsonlLogger(os.path.join(run_dir, "metrics.jsonl")))
    return moved_rows, discarded


def _build_data(build_datasets, rc: RunConfig, tokenizer):
    """The packed train/eval datasets; a file that cannot be read becomes a one-line error naming data.paths."""
    try:
        return build_datasets(rc.data, tokenizer, rc.train.seq_len, rc.seed)
    except ConfigError:
        raise
    # pyarrow's ArrowInvalid is a ValueError; RecursionError: a JSON line nested deeper than the parser goes
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        key, value = (("data.paths", list(rc.data.paths)) if rc.data.source == "files"
                      else ("data.source", rc.data.source))
        message = first_line(e)
        raise ConfigError(key, value, f"could not be read ({type(e).__name__}: {message})") from None


def _wandb_run_id(loggers) -> Optional[str]:
    """The id of the wandb run among `loggers`, if any (stored in checkpoints to resume the same wandb run)."""
    for logger in loggers.loggers:
        run = getattr(logger, "run", None)
        if run is not None:
            return run.id
    return None
