"""A gloo world for runs of the trainer inside `torch.multiprocessing.spawn` workers, rendezvoused through a file.

Several trainer runs share one spawned world (the imports are paid once). Each run needs its own process group;
its rendezvous goes through a file rather than a TCP port, because ports picked ahead of time for a sequence of
runs can be taken by another socket (gloo's own connections bind ephemeral ports) before their run starts, and the
run then fails with EADDRINUSE. The trainer's `init_distributed` finds the group already started and uses it; its
shutdown (or, for a run that stopped before starting it, this context) destroys it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def rendezvous_files(root: Path, n: int) -> list[str]:
    """n fresh rendezvous file paths under root, one per run (a FileStore must not reuse a file)."""
    root.mkdir(parents=True, exist_ok=True)
    return [str(root / f"rendezvous-{i}") for i in range(n)]


@contextlib.contextmanager
def joined_world(rank: int, world: int, init_file: str):
    """The process group the trainer would start for (rank, world), with the launcher's environment set."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
