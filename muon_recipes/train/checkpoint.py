"""Distributed checkpoints a run resumes from exactly, made visible only when complete, loaded only if safe.

Layout of a run directory's checkpoints (one directory per saved step):

    <run_dir>/checkpoints/step-000100/
        .metadata, __<rank>_0.distcp   torch.distributed.checkpoint (DCP): model + optimizer, sharded, FQN-keyed
        extras.json                    step, token and skip counters, LR schedule, data position, wandb id, ...
        rank-00000.json ...            per rank: RNG states (and a stream loader's own position)
        config.json                    the resolved run config, for the compatibility check
        COMPLETE                       written last, by rank 0

Why this shape:

* Model and optimizer go through `get_state_dict` / `set_state_dict` (torch.distributed.checkpoint.state_dict):
  every tensor is keyed by its parameter's fully qualified name and stored as the shards the ranks hold.
  DCP reshards on load, so a run saved by N processes resumes on M (FSDP2 DTensors, Muon momentum and AdamW
  moments alike: they are DTensors sharded like their parameters).
* Atomic visibility. A save writes into `.tmp-step-000100`; when every rank has written its part (a barrier),
  rank 0 writes `COMPLETE` and renames the directory to `step-000100` (a rename is atomic on POSIX file
  systems). Only `step-*` directories holding `COMPLETE` are ever loaded, so a process killed in the middle of a
  save leaves a `.tmp-*` directory that is ignored, and deleted when the next run starts or saves. A save that
  fails (a full disk) fails on every rank alike: each step that can fail on one rank alone ends with an
  agreement, its partial directory is removed and the previous checkpoint stays the latest.
* Loading only what is safe: everything besides tensors is JSON; DCP's own pickled pieces are read with
  restrictions -- the `.metadata` file through an unpickler that admits only DCP's metadata classes, and the
  optimizer's non-tensor values (lr, betas, ...) with `torch.load(weights_only=True)`.
* Asynchronous saves (`checkpoint.async_save`) copy the state to CPU memory, write it from a background thread
  over a dedicated gloo process group (so the writer's collectives never interleave with training's), and are
  made visible when the next save starts or training ends.

`Checkpointer` writes and loads; `resolve_resume` decides which checkpoint `train.resume` means. Which values
make up the trainer's state is the trainer's business (`Trainer.checkpoint_extras`); this module stores them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from muon_recipes.config import ConfigError, first_line

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
EXTRAS = "extras.json"
CONFIG = "config.json"
METADATA = ".metadata"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
DISCARDED = "discarded"  # checkpoints of an abandoned trajectory (see `discard_newer`); never loaded or deleted
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used by this run. The message is one line: the path, the key, what differs."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# --------------------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------------------
def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, METADATA))


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints directly under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = complete_checkpoints(checkpoints_dir(run_dir))
    return found[-1][1] if found else None


def resolve_resume(resume: str, run_dir: Optional[str]) -> Optional[str]:
    """The checkpoint `train.resume` asks for, or None for a fresh start. Raises ConfigError (key train.resume).

    `auto`: the latest complete checkpoint of the run directory, if any. `never`: none, and the run directory
    must not hold checkpoints already (a new run would overwrite them step by step and rotate them out with
    `checkpoint.keep`). A path: that checkpoint; a run directory or its `checkpoints/` folder also work and mean
    their latest complete checkpoint. `run_dir` None: not known on this rank (only the path form is checked).
    """
    if resume == "auto":
        return latest_checkpoint(run_dir) if run_dir else None
    if resume == "never":
        if run_dir:
            found = complete_checkpoints(checkpoints_dir(run_dir))
            if found:
                raise ConfigError("train.resume", resume,
                                  f"{checkpoints_dir(run_dir)} already holds checkpoints up to step {found[-1][0]} "
                                  "that a fresh run would overwrite; use another run_dir, or train.resume=auto to "
                                  "continue them")
        return None
    path = os.path.abspath(os.path.expanduser(resume))
    if not os.path.isdir(path):
        raise ConfigError("train.resume", resume,
                          "no such checkpoint directory; use auto, never or the path of a checkpoint "
                          "(<run_dir>/checkpoints/step-NNNNNN) or of a run directory")
    if is_complete(path):
        return path
    for root in (checkpoints_dir(path), path):  # a run directory, or its checkpoints/ folder
        found = complete_checkpoints(root)
        if found:
            return found[-1][1]
    siblings = complete_checkpoints(os.path.dirname(path))
    hint = f"; complete ones next to it: {', '.join(os.path.basename(p) for _, p in siblings)}" if siblings else ""
    raise ConfigError("train.resume", resume,
                      f"is not a complete checkpoint (no {COMPLETE} marker or no {METADATA}: its save was "
                      f"interrupted or it is no checkpoint){hint}")


def read_json(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {os.path.dirname(path)}: {what} {os.path.basename(path)} "
                              "is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {os.path.dirname(path)}: {what} {os.path.basename(path)} is corrupt "
                              f"({type(e).__name__}: {e})") from None


# What `Trainer.load_checkpoint_extras` needs of extras.json, by JSON type (older keys are optional).
_EXTRAS_REQUIRED = {"step": int, "tokens_seen": int, "scheduler": dict, "loader": dict}


def read_extras(path: str) -> dict:
    extras = read_json(os.path.join(path, EXTRAS), "trainer state")
    if not isinstance(extras, dict):
        raise CheckpointError(f"checkpoint {path}: {EXTRAS} is not a JSON object; it is corrupt")
    for key, kind in _EXTRAS_REQUIRED.items():
        if not isinstance(extras.get(key), kind) or isinstance(extras.get(key), bool):
            what = "no" if key not in extras else f"a {type(extras[key]).__name__} as"
            raise CheckpointError(f"checkpoint {path}: {EXTRAS} holds {what} {key!r} (needs a JSON "
                                  f"{'integer' if kind is int else 'object'}); it is corrupt")
    return extras


def read_rank_extras(path: str, rank: int, saved_world_size: int) -> Optional[dict]:
    """This rank's RNG and loader state, or None when the checkpoint was saved by fewer ranks (this one then
    keeps its own seeded RNG). A rank the saving run had must find its file: resuming without it would silently
    draw other random numbers than the straight run."""
    rank_path = os.path.join(path, rank_file_name(rank))
    if rank >= saved_world_size and not os.path.exists(rank_path):
        return None
    state = read_json(rank_path, "rank state")
    if not isinstance(state, dict) or not isinstance(state.get("rng"), dict):
        raise CheckpointError(f"checkpoint {path}: {rank_file_name(rank)} holds no 'rng' object; it is corrupt")
    return state


# --------------------------------------------------------------------------------------------------------------
# Loading only what is safe
# --------------------------------------------------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` (a `Metadata` dataclass tree) and refuses every other class or function."""

    _MODULES = ("torch.distributed.checkpoint.metadata",)
    _NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem",
              "_StorageInfo"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
              ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if module in self._MODULES or (module, name) in self._NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path: str):
    """DCP's metadata of the checkpoint at `path`, unpickled with `_MetadataUnpickler`."""
    try:
        with open(os.path.join(path, METADATA), "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {METADATA} is missing") from None
    except Exception as e:  # truncated or foreign bytes raise many types
        raise CheckpointError(f"checkpoint {path}: {METADATA} is unreadable ({type(e).__name__}: "
                              f"{first_line(e, type(e).__name__)})") from None


class _SafeReader(FileSystemReader):
    """FileSystemReader that vets `.metadata` with `_MetadataUnpickler` before DCP unpickles it itself."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        read_metadata(str(self.path))
        return super().read_metadata(*args, **kwargs)


# A param group's hyperparameter in DCP's flattened keys (`optim.param_groups.<i>.<key>`), not its parameters.
_GROUP_HYPERPARAMETER = re.compile(r"^optim\.param_groups\.\d+\.(?!params$|param_names$)[^.]+$")


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but non-tensor values are unpickled with `weights_only=True` (plain data only), and
    param-group hyperparameters newer than the checkpoint are not asked of it.

    The default planner calls `torch.load(..., weights_only=False)` on them; here they are parsed under
    `weights_only=True` first (which refuses arbitrary classes) and only the vetted value is handed on.

    A checkpoint written before a group key existed (e.g. `ns_method`) lacks it, and DCP's strict load would
    refuse the whole checkpoint. Hyperparameters are this run's anyway (`Checkpointer.load` restores them after
    loading), so such keys are left out of the load; a missing tensor or any other missing key still fails.
    """

    def create_local_plan(self):
        known = self.metadata.state_dict_metadata
        for key in [k for k in self.state_dict if k not in known and _GROUP_HYPERPARAMETER.match(k)]:
            del self.state_dict[key]
        return super().create_local_plan()

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        value.seek(0)
        safe = torch.load(value, weights_only=True)
        vetted = io.BytesIO()
        torch.save(safe, vetted)
        vetted.seek(0)
        super().load_bytes(read_item, vetted)



def _describe_failure(e: BaseException) -> str:
    """One line for a DCP failure: DCP gathers every rank's exception into one CheckpointException."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, (exc, _) = sorted(failures.items(), key=lambda kv: kv[0])[0]
        return f"rank {rank}: {type(exc).__name__}: {first_line(exc, type(exc).__name__)}"
    return f"{type(e).__name__}: {first_line(e, type(e).__name__)}"


# --------------------------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------------------------
def _tensor_shapes(state: dict, prefix: str = "") -> dict[str, tuple]:
    """DCP's flattened key -> global shape of every tensor of a (nested dict) state dict."""
    out: dict[str, tuple] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_tensor_shapes(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = tuple(value.shape)  # a DTensor's shape is the global one
    return out


def _flat_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix[:-1]: cfg}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        out.update(_flat_config(v, f"{prefix}{k}."))
    return out


# Config keys that say where or how a run is logged or resumed, never what it computes.
_NOT_STATE_KEYS = ("run_dir", "train.resume", "logging.", "launcher.", "device", "experiment.")


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, this run's value) for every config leaf that differs, ignoring logging/run keys."""
    a, b = _flat_config(saved), _flat_config(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(_NOT_STATE_KEYS) or a.get(key) == b.get(key):
            continue
        diffs.append((key, a.get(key, "<absent>"), b.get(key, "<absent>")))
    return diffs


def _describe_config_hint(diffs: list, section: str) -> str:
    hits = [f"{k}={old!r} in the checkpoint, {new!r} now" for k, old, new in diffs if k.startswith(section)]
    return f" (config: {'; '.join(hits[:3])})" if hits else ""


def check_compatible(path: str, state: dict, groups: list[dict], saved_groups: list[dict],
                     diffs: list) -> None:
    """Raise CheckpointError naming the first key whose presence or shape differs, or the first param group
    whose algorithm or members differ, between the checkpoint at `path` and this run's `state`."""
    saved = {k: tuple(v.size) for k, v in read_metadata(path).state_dict_metadata.items() if hasattr(v, "size")}
    current = _tensor_shapes(state)
    for key in sorted(current):
        section = "model." if key.startswith("model.") else "optim."
        if key not in saved:
            n = len(set(current) ^ set(saved))
            raise CheckpointError(f"checkpoint {path} does not fit this run: {key} is in this run but not in the "
                                  f"checkpoint ({n} keys differ){_describe_config_hint(diffs, section)}")
        if saved[key] != current[key]:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {key} has shape {list(saved[key])} in "
                                  f"the checkpoint, {list(current[key])} in this run"
                                  f"{_describe_config_hint(diffs, section)}")
    extra = sorted(set(saved) - set(current))
    if extra:
        section = "model." if extra[0].startswith("model.") else "optim."
        raise CheckpointError(f"checkpoint {path} does not fit this run: {extra[0]} is in the checkpoint but not in "
                              f"this run ({len(extra)} keys differ){_describe_config_hint(diffs, section)}")
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"checkpoint {path} does not fit this run: the optimizer has {len(saved_groups)} param "
                              f"groups in the checkpoint ({', '.join(g['name'] for g in saved_groups)}), "
                              f"{len(groups)} in this run ({', '.join(g['name'] for g in groups)})"
                              f"{_describe_config_hint(diffs, 'optim.')}")
    for i, (old, new) in enumerate(zip(saved_groups, groups)):
        for field in ("algorithm", "params"):
            if old[field] != new[field]:
                if field == "algorithm":
                    what = f"algorithm {old[field]!r} in the checkpoint, {new[field]!r} in this run"
                else:
                    what = f"parameters differ (e.g. {sorted(set(old[field]) ^ set(new[field]))[:1]})"
                raise CheckpointError(f"checkpoint {path} does not fit this run: optimizer param_groups[{i}] "
                                      f"({new['name']}): {what}{_describe_config_hint(diffs, 'optim.')}")


def group_summary(optimizer_state: dict) -> list[dict]:
    """Name, algorithm and parameter FQNs of each param group of a `get_state_dict` optimizer state."""
    return [{"name": str(g.get("name", i)), "algorithm": str(g.get("algorithm", "")), "params": list(g["params"])}
            for i, g in enumerate(optimizer_state["param_groups"])]


# --------------------------------------------------------------------------------------------------------------
# Writing and loading
# --------------------------------------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _cpu_snapshot(value: Any) -> Any:
    """A copy of a state dict in CPU memory that later training steps cannot change (for async saves on CPU,
    where moving a tensor "to the CPU" would not copy it). DTensors keep their mesh and placements."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, dict):
        return {k: _cpu_snapshot(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu_snapshot(v) for v in value]
    if isinstance(value, DTensor):
        local = value.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                                  shape=value.shape, stride=value.stride())
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


_NEARLY_FULL_BYTES = 1 << 20  # below this much free space, a failed write is put down to a full disk


def _free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path if os.path.isdir(path) else os.path.dirname(path))
        return st.f_bavail * st.f_frsize
    except OSError:
        return 1 << 62


def _is_no_space(e: BaseException) -> bool:
    """Whether ENOSPC is anywhere in `e`: its causes, or the per-rank failures DCP gathers into one exception."""
    seen = set()
    stack = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        stack += [err.__cause__, err.__context__]
        for value in (getattr(err, "failures", None) or {}).values():
            stack.append(value[0] if isinstance(value, tuple) else value)
    return False


class Checkpointer:
    """Saves every `every` steps into `<run_dir>/checkpoints`, keeps the last `keep`, loads with checks.

    Every rank calls every method (they are collective). `rank`/`world_size` are the default group's.
    """

    def __init__(self, run_dir: str, every: int, keep: int, async_save: bool, device_type: str = "cpu"):
        self.root = checkpoints_dir(run_dir)
        self.every, self.keep, self.async_save = every, keep, async_save
        self.device_type = device_type
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        # A gloo group of its own: DCP plans over it (a CPU backend, as async saves require) and a background
        # writer's collectives never interleave with the training loop's on the default group.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending: Optional[tuple[int, str, Any]] = None  # (step, tmp dir, future) of an async save
        self.last_saved_step: Optional[int] = None

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _all_true(self, flag: bool) -> bool:
        if self.group is None:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def due(self, step: int, final: bool) -> bool:
        if self.every <= 0 or step == self.last_saved_step:
            return False
        return step % self.every == 0 or final

    # ---- saving ----------------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, extras: dict, rank_extras: dict, config: dict) -> None:
        """Write checkpoint `step` (collective). Synchronous saves are visible when this returns; an asynchronous
        one when the next save starts or `finish` is called."""
        self.finish()
        tmp = os.path.join(self.root, TMP_PREFIX + step_dir_name(step))

        def prepare_directory() -> None:
            os.makedirs(self.root, exist_ok=True)
            remove_leftovers(self.root)
            os.makedirs(tmp)

        # Every step that can fail on one rank alone (a full disk, a vanished directory) ends with an agreement,
        # so all ranks stop together with that rank's reason instead of waiting in the next collective.
        self._agree_or_abandon(step, tmp, prepare_directory if self.rank == 0 else None)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}

        def write_json_parts() -> None:
            if self.rank == 0:
                saved = dict(extras, format_version=FORMAT_VERSION, world_size=self.world_size,
                             param_groups=group_summary(optim_state), torch_version=torch.__version__,
                             saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
                _write_json(os.path.join(tmp, EXTRAS), saved)
                _write_json(os.path.join(tmp, CONFIG), config)
            _write_json(os.path.join(tmp, rank_file_name(self.rank)), rank_extras)

        self._agree_or_abandon(step, tmp, write_json_parts)
        writer = FileSystemWriter(tmp, sync_files=True, single_file_per_rank=True)
        if self.async_save:
            if self.device_type == "cpu":  # a GPU state is copied to CPU memory by DCP's own staging
                state = _cpu_snapshot(state)
            future = dcp.async_save(state, storage_writer=writer, process_group=self.group)
            self._pending = (step, tmp, future)
        else:
            try:  # DCP gathers every rank's write failure and raises it on every rank
                dcp.save(state, storage_writer=writer, process_group=self.group)
            except (Exception, CheckpointException) as e:
                self._abandon(step, tmp, _describe_failure(e), _is_no_space(e))
            self._pending = (step, tmp, None)
            self.finish()
        self.last_saved_step = step

    def _agree_or_abandon(self, step: int, tmp: str, part, errors: tuple = (OSError,)) -> None:
        """Run this rank's `part` of a save (None: nothing to do here); if it raised one of `errors` on any rank,
        abandon the save on every rank with the first failing rank's reason (collective)."""
        failure = None
        if part is not None:
            try:
                part()
            except errors as e:
                failure = (self.rank, _describe_failure(e), _is_no_space(e))
        gathered = [failure]
        if self.group is not None:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, failure, group=self.group)
        failures = [f for f in gathered if f is not None]
        if failures:
            rank, reason, no_space = failures[0]
            if not reason.startswith("rank "):  # DCP's gathered failures name their rank already
                reason = f"rank {rank}: {reason}"
            self._abandon(step, tmp, reason, no_space)

    def _abandon(self, step: int, tmp: str, reason: str, no_space: bool) -> None:
        """Remove the partial save (rank 0; it is never loaded, and a full disk wants its space back) and raise
        CheckpointError on every rank (collective). The previous checkpoint is untouched. `no_space`: the failure
        said ENOSPC; torch's writers often hide it ("unexpected pos ..."), so the free space is looked at too."""
        # Measured before the partial save is removed: the write that failed is what filled the disk.
        no_space = no_space or _free_bytes(self.root) < _NEARLY_FULL_BYTES
        no_space = not self._all_true(not no_space)  # any rank's view: the message is the same on every rank
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = complete_checkpoints(self.root)
        kept = f"the latest complete checkpoint, {latest[-1][1]}, is intact" if latest else "no earlier checkpoint"
        hint = (f"; no space left on the file system of {self.root}: free some and resume with train.resume=auto"
                if no_space else "")
        raise CheckpointError(f"checkpoint step {step} could not be written ({reason}); {kept}{hint}")

    def finish(self) -> None:
        """Await the pending save (if any) on every rank, then make it visible: marker, rename, rotation."""
        if self._pending is None:
            return
        step, tmp, future = self._pending
        self._pending = None
        # An asynchronous writer that failed stops the run as a synchronous save does: training on without
        # checkpoints would put ever more steps at risk. The agreement is also the barrier: every rank has written.
        wait = (lambda: getattr(future, "upload_completion", future).result()) if future is not None else None
        self._agree_or_abandon(step, tmp, wait, errors=(Exception, CheckpointException))
        self._agree_or_abandon(step, tmp, (lambda: self._publish(step, tmp)) if self.rank == 0 else None)
        self._barrier()  # visible to every rank when this returns

    def _publish(self, step: int, tmp: str) -> None:
        """Mark the save complete and make it visible under its final name (rank 0), then rotate old ones out."""
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            json.dump({"step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        final = os.path.join(self.root, step_dir_name(step))
        trash = os.path.join(self.root, TRASH_PREFIX + step_dir_name(step))
        replaced = os.path.exists(final)  # same step saved before on an abandoned trajectory
        if replaced:
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        if replaced:
            shutil.rmtree(trash, ignore_errors=True)
        self._rotate()

    def _rotate(self) -> None:
        for _, path in complete_checkpoints(self.root)[:-self.keep]:
            trash = os.path.join(self.root, TRASH_PREFIX + os.path.basename(path))
            os.rename(path, trash)  # first out of sight (atomic), then gone
            shutil.rmtree(trash, ignore_errors=True)

    # ---- loading ---------------------------------------------------------------------------------------------
    def load(self, path: str, model, optimizer, config: dict) -> tuple[dict, Optional[dict]]:
        """Load model and optimizer from the checkpoint at `path` (collective) after checking that it fits;
        return (extras, this rank's extras or None when the checkpoint had fewer ranks).

        The optimizer's hyperparameters are this run's (the config that runs is the config you passed); only its
        state -- momentum buffers, AdamW moments and step counts -- comes from the checkpoint.
        """
        extras = read_extras(path)
        saved_config = read_json(os.path.join(path, CONFIG), "config")
        diffs = config_differences(saved_config, config)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        check_compatible(path, state, group_summary(optim_state), extras.get("param_groups", []), diffs)
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            dcp.load(state, storage_reader=_SafeReader(path), planner=_WeightsOnlyLoadPlanner(),
                     process_group=self.group)
        except (Exception, CheckpointException) as e:  # truncated shard, unsafe pickle, ...
            raise CheckpointError(f"checkpoint {path} could not be read ({_describe_failure(e)}): its .distcp "
                                  "files are truncated or corrupt; resume from an older one with "
                                  "train.resume=<path>") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for group, h in zip(optimizer.param_groups, hyper):
            group.update(h)
        saved_world = extras.get("world_size", self.world_size)
        rank_extras = read_rank_extras(path, self.rank, saved_world if isinstance(saved_world, int) else 0)
        if self.rank == 0:
            if saved_world != self.world_size:
                print(f"resume: world size {self.world_size} in this run, {saved_world} in the checkpoint "
                      "(DCP reshards model and optimizer state)", flush=True)
            for key, old, new in diffs:
                print(f"resume: {key} is {new!r} in this run, {old!r} in the checkpoint", flush=True)
        return extras, rank_extras


# --------------------------------------------------------------------------------------------------------------
# The run directory after a resume
# --------------------------------------------------------------------------------------------------------------
def remove_leftovers(root: str) -> None:
    """Partial saves of killed processes and half-deleted old checkpoints under the checkpoints folder `root`
    (rank 0, holding the run directory's lock: at the start of a run and before each save)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def discard_newer(run_dir: str, step: int) -> list[str]:
    """Move complete checkpoints of `run_dir` newer than `step` (an abandoned trajectory: the run resumed from an
    older one) to `checkpoints/discarded/`, where they are never loaded nor rotated out. Rank 0 only."""
    root = checkpoints_dir(run_dir)
    moved = []
    for s, path in complete_checkpoints(root):
        if s > step:
            target = os.path.join(root, DISCARDED, os.path.basename(path))
            while os.path.exists(target):
                target += "+"
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(path, target)
            moved.append(target)
    return moved


def trim_metrics(path: str, step: int) -> int:
    """Keep the rows of `metrics.jsonl` up to `step`, move later ones (logged after the checkpoint the run resumes
    from, by a process that then died) to `metrics.discarded.jsonl`. Returns how many moved. Rank 0 only.

    The file is rewritten through a temporary file and a rename, so a crash here loses no row.
    """
    tmp = path + ".tmp"
    if os.path.exists(tmp):  # the rewrite of a run killed in the middle of it; `path` is still whole
        os.remove(tmp)
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 (or not JSON) is moved as it is, not lost
        lines = f.read().splitlines()
    keep, drop = [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            row_step = json.loads(line.decode("utf-8")).get("step", 0)
        except (ValueError, AttributeError, RecursionError):  # a torn last line of a killed process, foreign bytes
            row_step = step + 1
        (keep if isinstance(row_step, int) and row_step <= step else drop).append(line)
    if not drop:
        return 0
    base = path[:-len(".jsonl")] if path.endswith(".jsonl") else path
    with open(base + ".discarded.jsonl", "ab") as f:
        f.write(b"".join(line + b"\n" for line in drop))
        f.flush()
        os.fsync(f.fileno())
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(drop)
