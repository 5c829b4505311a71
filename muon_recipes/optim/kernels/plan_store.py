"""The Newton-Schulz plans kept on disk, so that every process on a machine runs a shape on the same products.

A plan (`iterations.Plan`: which of the Triton kernel, its persistent form and cuBLAS runs each product of a
shape, and in how many pieces the batch runs) is timed on the shape's first call. Timed anew in every process, two
processes can choose differently where two implementations time within each other's noise, and a step's time then
depends on the process: on one H100, one of two processes of dense_1b put 7.7 ms of its step on the pointer kernel
where the other chose the persistent one (docs/benchmarks.md, "Clocks and power under the captured step"). Two arms
of an ablation, two ranks, or a run and its resume would differ the same way. Kept on disk, the first process's plan
is every later process's, and their first steps skip the timing.

The plans live beside Triton's tile choices (`tuning.autotune_options`): `$TRITON_CACHE_DIR/muon_ns_plans/`
(`~/.triton/cache` by default), one JSON file per key, written under a temporary name and renamed into place, so
concurrent writers (the ranks of one job) cannot leave a torn file. The key holds what a plan depends on: the GPU's
name and compute capability, the torch, CUDA and Triton versions, a hash of the kernels' sources, the shape,
dtypes and fp32 precision, the form (standard or Gram), and how the plan was timed (`MUON_NS_PLAN_TIMING`). A file
that cannot be read back as a plan of this key is timed again and overwritten.

`MUON_NS_PLAN_CACHE=0` times every plan in each process and writes nothing (`=1`, the default, keeps them).
To time the plans of a machine again, delete the directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from muon_recipes.choices import PLAN_CACHE_DEFAULT, PLAN_CACHE_ENV, PLAN_CACHES, PLAN_TIMING_ENV, env_choice

IMPLEMENTATIONS = ("triton", "persistent", "cublas")


@dataclass
class PlanStats:
    """Plans this process has timed, and read from the disk (`iterations._plan_for`)."""

    timed: int = 0
    read: int = 0


STATS = PlanStats()
_write_failed = False   # said once per process (`store`)


def enabled() -> bool:
    return env_choice(PLAN_CACHE_ENV, PLAN_CACHE_DEFAULT, PLAN_CACHES) == "1"


def directory() -> Path:
    root = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return Path(root) / "muon_ns_plans"


@functools.lru_cache(maxsize=1)
def _sources_hash() -> str:
    """A hash of every kernel module's source: a plan timed on other kernels is not this code's."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def key_for(x: torch.Tensor, problem: tuple, timing: str) -> dict:
    """The key of a plan for `problem` (the in-process key: shape, dtypes, precision, form) on x's GPU."""
    import triton

    properties = torch.cuda.get_device_properties(x.device)
    return {"gpu": properties.name, "capability": f"{properties.major}.{properties.minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "sources": _sources_hash(), "problem": [str(part) for part in problem], "timing": timing}


def _path(key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return directory() / f"{name}.json"


def load(key: dict, products: tuple[str, ...]) -> dict | None:
    """The stored plan of `key` as {product: implementation, "pieces": count}, or None: none stored, the cache off, or
    a file that is not a plan of this key (torn by hand, another version's) and will be timed again."""
    if not enabled():
        return None
    try:
        record = json.loads(_path(key).read_text())
        plan = record["plan"]
        if record["key"] != key or set(plan) != {*products, "pieces"} or not all(
                plan[p] in IMPLEMENTATIONS for p in products) or type(plan["pieces"]) is not int or plan["pieces"] < 1:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    STATS.read += 1
    return dict(plan)


def store(key: dict, plan: dict, times_ms: dict[str, dict[str, float]]) -> None:
    """A plan timed in this process: counted in `STATS.timed` (as `load` counts the plans it reads) and kept for the
    next process, with the times it was chosen on. A directory that cannot be written costs the next process a
    timing, not this run: a warning, once."""
    global _write_failed
    STATS.timed += 1
    if not enabled():
        return
    path, temporary = _path(key), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.stem, suffix=".tmp",
                                         delete=False) as f:
            temporary = f.name
            json.dump({"key": key, "plan": plan, "times_ms": times_ms}, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        if not _write_failed:
            _write_failed = True
            warnings.warn(f"Newton-Schulz plans are not kept on disk ({PLAN_CACHE_ENV}): cannot write {path.parent} "
                          f"({error}); each process times its own", RuntimeWarning, stacklevel=2)
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def snapshot() -> PlanStats:
    return PlanStats(STATS.timed, STATS.read)


def describe(before: PlanStats, after: PlanStats) -> str:
    """What choosing plans cost between two `snapshot`s, e.g. "3 Newton-Schulz plans timed
    (MUON_NS_PLAN_TIMING=launch), 2 read from /home/me/.triton/cache/muon_ns_plans"."""
    from muon_recipes.optim.kernels.iterations import plan_timing

    text = f"{after.timed - before.timed} Newton-Schulz plans timed ({PLAN_TIMING_ENV}={plan_timing()})"
    if not enabled():
        return text + f", none kept on disk ({PLAN_CACHE_ENV}=0)"
    return text + f", {after.read - before.read} read from {directory()}"
