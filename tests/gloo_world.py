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


# Where `spawn_trainer_runs` writes the error of its `then` checks, under its `out`.
THEN_ERROR = "then-failed.txt"


def _run_trainer_jobs(rank: int, world: int, jobs: list, init_files: list, out: str, common: list,
                      then=None) -> None:
    """Worker: each job (name, overrides) through `muon_recipes.train.run` in its own process group; the exit codes
    (with stderr) of jobs that stopped are written to `codes-<rank>.json`. Then `then(rank, world, init_file)`,
    if given, with a rendezvous file of its own."""
    import contextlib
    import io
    import json

    import torch
    from hydra import compose, initialize_config_dir

    from muon_recipes.config import register_configs
    from muon_recipes.train.entry import run

    torch.set_num_threads(1)
    register_configs()
    codes = {}
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        for (name, overrides), init_file in zip(jobs, init_files):
            cfg = compose("config", overrides=common + overrides)
            stderr = io.StringIO()
            try:
                with joined_world(rank, world, init_file), contextlib.redirect_stderr(stderr):
                    run(cfg)
                codes[name] = [0, ""]
            except SystemExit as e:
                codes[name] = [e.code, stderr.getvalue()]
    Path(out, f"codes-{rank}.json").write_text(json.dumps(codes))
    if then is not None:
        then(rank, world, str(Path(out, "rendezvous", "then")))


def spawn_trainer_runs(world: int, jobs: list, out: Path, common: list, then=None) -> dict:
    """Run the trainer jobs (name, overrides; `common` overrides first) one after the other in one spawned gloo
    world of `world` processes; returns rank 0's {name: [exit code, stderr]}.

    `then(rank, world, init_file)`, a module-level function, runs in the same processes after the jobs (other
    checks that need a world of this size pay no imports of their own). If it fails, the spawn's error is written
    to `out / THEN_ERROR` for the caller to report, and the jobs' codes are returned all the same."""
    import json

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_files = rendezvous_files(out / "rendezvous", len(jobs))
    try:
        mp.spawn(_run_trainer_jobs, args=(world, jobs, init_files, str(out), common, then), nprocs=world, join=True)
    except ProcessException as error:
        if then is None or not (out / "codes-0.json").exists():   # the jobs themselves did not finish
            raise
        (out / THEN_ERROR).write_text(str(error))
    return json.loads((out / "codes-0.json").read_text())
