"""The data cache: one directory per prepared artifact (a fitted tokenizer, a tokenized corpus), named by its key.

Several processes may want the same artifact at once: the ranks of a run, the jobs of a sweep, two runs started
together. `prepare_once` lets the first build it while the others wait on an exclusive lock (`fcntl.flock`, which
the kernel releases when its holder dies, so a killed builder leaves no stale lock), then every process reads the
finished directory. A directory appears under its final name only when complete: it is built in a temporary
sibling and renamed into place (`os.rename` of a directory is atomic on POSIX), so a reader never sees half an
artifact; a build that dies leaves only a temporary directory, which the next build removes.

The root is `data.cache_dir`, else `$MUON_RECIPES_CACHE`, else `$XDG_CACHE_HOME/muon-recipes` (default
`~/.cache/muon-recipes`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from muon_recipes.config import ConfigError


def current_rank() -> int:
    """This process's rank: from the process group if one exists, else torchrun's RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def cache_root(cache_dir: str = "") -> Path:
    """Where prepared data lives (see the module docstring); created if missing."""
    if cache_dir:
        root = Path(os.path.expanduser(cache_dir))
    elif os.environ.get("MUON_RECIPES_CACHE"):
        root = Path(os.path.expanduser(os.environ["MUON_RECIPES_CACHE"]))
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "muon-recipes"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("data.cache_dir", cache_dir or str(root),
                          f"must be a writable directory ({e.strerror})") from None
    return root


@contextlib.contextmanager
def exclusive(lock_path: Path, waiting_message: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` for the block; rank 0 says once on stderr when another process holds
    it (the other ranks wait as quietly as the builder works)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if current_rank() == 0:
                print(waiting_message, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_once(directory: Path, is_valid: Callable[[Path], Optional[str]], build: Callable[[Path], None],
                 what: str) -> bool:
    """Make `directory` hold a valid artifact; return True if this call built it, False if it was there.

    `is_valid(directory)` returns None for a usable artifact, else why not (a missing, truncated or mismatched
    file); an invalid one is said on stderr, removed and rebuilt, never used. `build(tmp)` writes the artifact into
    an empty temporary directory, which then takes `directory`'s name.
    """
    if directory.is_dir() and is_valid(directory) is None:  # the common case: no lock needed
        return False
    with exclusive(directory.with_name(directory.name + ".lock"),
                   f"data: waiting for another process to prepare {what} ({directory})"):
        if directory.is_dir():
            problem = is_valid(directory)
            if problem is None:
                return False  # another process built it while this one waited
            print(f"data: cached {what} in {directory} is unusable ({problem}); rebuilding it", file=sys.stderr,
                  flush=True)
            shutil.rmtree(directory)
        for stale in directory.parent.glob(directory.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that died (the lock says none is running)
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}-{time.time_ns()}")
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            problem = is_valid(tmp)
            if problem is not None:
                raise RuntimeError(f"the {what} just built fails its own check: {problem}")
            os.rename(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True
