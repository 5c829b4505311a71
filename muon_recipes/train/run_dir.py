"""The run directory belongs to one run at a time, and its layout is checked before a run starts.

Two runs writing one run directory interleave their metrics rows, rotate each other's checkpoints away and rename
each other's temporary save directories. `RunDirLock` makes the directory one run's for that run's whole life:
rank 0 takes an exclusive `flock` on `<run_dir>/run.lock` before reading anything of it and keeps the file open
until the run ends. The kernel releases the lock when its process dies, however it dies, so a lock left by a
killed run is never stale: the file stays, and the next run takes the lock and overwrites the holder's
description in it. (On NFS, Linux maps `flock` onto the server's byte-range locks, NFSv4 included.)

`check_layout` refuses a run directory whose entries have the wrong kind (a `checkpoints` that is a file or a
dangling symlink, a `metrics.jsonl` that is a directory, ...) before start-up rather than at the first save.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from muon_recipes.config import ConfigError

LOCK_FILE = "run.lock"

# Entries a run writes in its directory, by kind: what is there already must have that kind.
_FILES = ("metrics.jsonl", "metrics.discarded.jsonl", "config.json", LOCK_FILE)
_DIRECTORIES = ("checkpoints", os.path.join("checkpoints", "discarded"), "wandb")


def check_layout(run_dir: str) -> None:
    """ConfigError (key run_dir) for the first entry of `run_dir` that exists with the wrong kind."""
    for name in _FILES + _DIRECTORIES:
        path = os.path.join(run_dir, name)
        if not os.path.lexists(path):
            continue
        want_dir = name in _DIRECTORIES
        if os.path.islink(path) and not os.path.exists(path):
            problem = "is a dangling symbolic link"
        elif want_dir and not os.path.isdir(path):
            problem = "is not a directory"
        elif not want_dir and not os.path.isfile(path):
            problem = "is not a regular file"
        else:
            continue
        raise ConfigError("run_dir", run_dir, f"{path} {problem}; move it away or use another run_dir")


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return (f"pid {holder['pid']} on {holder['host']} (started {holder['started']}: "
                f"{holder['command']})")
    except (ValueError, KeyError, TypeError):
        return "another process (its description in the lock file is unreadable)"


def holder_of(run_dir: str) -> Optional[str]:
    """Who holds `run_dir` now (as `RunDirLock` describes it), or None; takes and gives back the lock to see.

    For the entry point, before Hydra writes its `.hydra/` snapshot into a `hydra.run.dir` that a live run holds."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file (or none readable): nothing to say before the run itself tries
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        return _describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    finally:
        os.close(fd)  # releases the probe's lock, if it got it


def _in_use(run_dir: str, holder: str, key: str = "run_dir") -> ConfigError:
    return ConfigError(key, run_dir, f"is in use by {holder}; one run per run directory: wait for it to end "
                                     f"or use another {key}")


def hydra_run_dir_in_use(argv: list) -> Optional[str]:
    """The one-line error for a `hydra.run.dir=DIR` on the command line that a live run holds, or None. Rank 0 of a
    single run only (other ranks and multirun jobs let Hydra write nothing there)."""
    if int(os.environ.get("RANK", "0")) != 0 or any(a in ("-m", "--multirun") for a in argv):
        return None
    values = [str(a).split("=", 1)[1] for a in argv if str(a).lstrip("+").startswith("hydra.run.dir=")]
    if not values or "${" in values[-1]:
        return None
    run_dir = os.path.abspath(os.path.expanduser(values[-1].strip("'\"")))
    holder = holder_of(run_dir)
    return str(_in_use(run_dir, holder, "hydra.run.dir")) if holder else None


class RunDirLock:
    """An exclusive lock on a run directory, held from `acquire` until `release` or the holder's death."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: Optional[int] = None
        self._created = False  # whether acquire made the file (a run refused at start-up then removes it)

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the run that holds it. Never waits. Where the file system
        has no locks, warn and go on without one."""
        existed = os.path.lexists(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError("run_dir", self.run_dir, f"its lock file {self.path} cannot be opened "
                                                       f"({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A file system without locks (some FUSE mounts): the run goes on, unprotected, and says so.
                print(f"warning: run_dir {self.run_dir} cannot be locked ({e.strerror}): nothing stops a second run "
                      "from writing into it meanwhile", file=sys.stderr, flush=True)
                return
            raise _in_use(self.run_dir, _describe_holder(holder)) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        self._created = not existed

    def release(self, undo: bool = False) -> None:
        """Give the lock up. The file stays (removing it could let a run that opened it meanwhile lock a file no
        one else sees), unless `undo`: a run refused at start-up removes the file it created, so a directory it
        found empty stays empty."""
        if self._fd is None:
            return
        if undo and self._created:
            os.unlink(self.path)  # while still holding the lock: no other run holds this file
        os.close(self._fd)  # closing the last descriptor of the open file releases the flock
        self._fd = None
