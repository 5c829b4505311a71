"""Running the tile searches of the Newton-Schulz kernels: candidates compiled at once, timed briefly, accounted.

Triton's autotuner compiles each candidate lazily inside its timing loop, one after another, and times each for
about 125 ms (its default benchmark). On a cold machine that made moe_small's first optimizer step 56 s on an
H200, almost all of it compilation. Here:

* `autotuned(key)` is `triton.autotune` over the matmul tiles with the bounded candidate list
  (`tuning.search_candidates`) and a shorter benchmark (`benchmark`: 2 ms warm-up, 10 ms of repeats, the
  median; still hundreds of runs of a kernel of tens of microseconds);
* `compile_candidates(launches)` compiles every candidate of every given launch before any is timed, on a
  thread pool through Triton's own `AsyncCompileMode` (the same `warmup` the autotuner would run, so the
  binaries land in the kernels' in-memory cache where the search then finds them). Compilation releases the
  GIL for nearly all of its time (the MLIR passes and the ptxas subprocess), so threads scale with the cores.
  Muon's first step calls it with the launches of every bucket at once (`orthogonalize.compile_ahead`, in a
  single process), and the Newton-Schulz loops with those of all products of a new shape (`iterations.py`, the
  only way under sharding), so whole steps or shapes compile in parallel, not only one search's candidates. When the
  choices are already on disk it costs a cache lookup per candidate (about a millisecond);
* `SearchStats` counts what the searches and compilations cost; `progress()` before and after the optimizer's
  first step and `describe` make the trainer's one log line of it.

`MUON_NS_PRECOMPILE=0` turns the parallel compilation off (each candidate is then compiled by the autotuner
as it reaches it).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import triton

from muon_recipes.optim.kernels.tuning import autotune_options, matmul_configs, search_candidates

# Each candidate is timed for this long after a short warm-up (ms): enough repeats for a stable median of
# kernels of tens of microseconds, a tenth of Triton's default.
_BENCH_WARMUP_MS = 2
_BENCH_REPEAT_MS = 10


@dataclass
class SearchStats:
    """What the tile searches of this process have cost so far (deltas between two `snapshot`s are one step's)."""

    searches: int = 0            # problem keys whose candidates were timed here (not read from the disk cache)
    timed: int = 0               # candidate timings
    search_seconds: float = 0.0  # wall time inside the searches' timings (compilations they did included)
    precompiled: int = 0         # launches whose candidates went through `compile_candidates`
    compile_seconds: float = 0.0  # wall time of those parallel compilations (cache hits included)

    def minus(self, earlier: "SearchStats") -> "SearchStats":
        return SearchStats(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})


STATS = SearchStats()
_recording: threading.local = threading.local()


def snapshot() -> SearchStats:
    return SearchStats(**{f.name: getattr(STATS, f.name) for f in fields(STATS)})


class _Search:
    """The hooks of one kernel's autotuner: which candidates (Triton's `early_config_prune`) and how a candidate
    is timed (`do_bench`). A search is counted once, on its first timing: a choice read from the disk cache
    times nothing."""

    def __init__(self):
        self.candidates = 0
        self.counted = True

    def prune(self, configs, named_args, **kwargs):
        chosen = search_candidates(configs, named_args, **kwargs)
        self.candidates, self.counted = len(chosen), False
        return chosen

    def benchmark(self, kernel_call, quantiles):
        start = time.perf_counter()
        if not self.counted:
            STATS.searches += 1
            self.counted = True
        if self.candidates == 1:   # nothing to compare (Triton < 3.7 still "times" a lone candidate)
            kernel_call()
            result = [0.0] * len(quantiles)
        else:
            from triton.testing import do_bench

            result = do_bench(kernel_call, warmup=_BENCH_WARMUP_MS, rep=_BENCH_REPEAT_MS, quantiles=quantiles)
            STATS.timed += 1
        STATS.search_seconds += time.perf_counter() - start
        return result


def autotuned(key: list):
    """`triton.autotune` over the matmul tiles (`tuning.matmul_configs`) with the bounded, briefly timed search."""
    search = _Search()
    return triton.autotune(configs=matmul_configs(), key=key, prune_configs_by={"early_config_prune": search.prune},
                           do_bench=search.benchmark, **autotune_options())


@contextlib.contextmanager
def recorded_launches():
    """Within the block, `FastLaunch` launches of this thread are recorded instead of run, one per kernel and
    specialization: yields the dict they go into, whose values are (kernel, grid, args, constexprs). Used for a
    dry pass over a loop to learn what it will launch."""
    previous = getattr(_recording, "launches", None)
    _recording.launches = {}
    try:
        yield _recording.launches
    finally:
        _recording.launches = previous


def recording() -> dict | None:
    """The dict launches are recorded into (see `recorded_launches`), or None when launches run."""
    return getattr(_recording, "launches", None)


def precompile_enabled() -> bool:
    return os.environ.get("MUON_NS_PRECOMPILE", "1") != "0"


def _workers() -> int:
    try:
        return max(1, min(32, len(os.sched_getaffinity(0))))
    except AttributeError:   # not Linux
        return max(1, min(32, os.cpu_count() or 1))


def compile_candidates(launches) -> None:
    """Compile the search candidates of every launch (kernel, grid, args, constexprs) at once, on threads.

    Each autotuned kernel's `warmup` compiles exactly what its search will time (the same candidates, the same
    argument specialization), so the search then finds every binary compiled. A failure here only costs the
    time: the autotuner compiles (and reports) anything still missing as it did before."""
    launches = list(launches)
    if not launches:
        return
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(_workers(), thread_name_prefix="tile-compile") as pool:
            with triton.AsyncCompileMode(pool, ignore_errors=True):
                for kernel, grid, args, constexprs in launches:
                    kernel.warmup(*args, grid=grid, **constexprs)
    except Exception:   # noqa: BLE001 - an optimization only; the ordinary path compiles what is missing
        pass
    STATS.precompiled += len(launches)
    STATS.compile_seconds += time.perf_counter() - start


def compiled_binaries() -> int | None:
    """Kernel binaries the autotuned matmul kernels hold in this process (compiled here or loaded from Triton's
    cache), or None where this Triton keeps them elsewhere."""
    from muon_recipes.optim.kernels.fast_launch import unwrap
    from muon_recipes.optim.kernels.tuning import autotuned_kernels

    try:
        total = 0
        for kernel in autotuned_kernels():
            fn, _ = unwrap(kernel)
            total += sum(len(caches[0]) for caches in fn.device_caches.values())
        return total
    except (AttributeError, TypeError, IndexError):
        return None


@dataclass
class Progress:
    """Where this process's tile choosing stands: choices held, binaries held, what the searches cost."""

    choices: int
    binaries: int | None
    stats: SearchStats


def progress() -> Progress:
    from muon_recipes.optim.kernels.tuning import tuned_problem_count

    return Progress(tuned_problem_count(), compiled_binaries(), snapshot())


def describe(before: Progress, after: Progress) -> str:
    """What choosing tiles cost between two `progress()` calls, in one line, e.g. "13 tile choices
    (MUON_NS_AUTOTUNE=bounded): 11 searched here (31 candidates timed, 1.2 s), 2 read from the disk cache or
    untimed; 33 kernel binaries compiled or loaded, 4.1 s compiling in parallel"."""
    from muon_recipes.optim.kernels.tuning import tile_search_mode

    spent = after.stats.minus(before.stats)
    choices = after.choices - before.choices
    if choices == 0 and spent.precompiled == 0:
        return "no new tile choices"
    text = (f"{choices} tile choices (MUON_NS_AUTOTUNE={tile_search_mode()}): {spent.searches} searched here "
            f"({spent.timed} candidates timed, {spent.search_seconds:.1f} s), {choices - spent.searches} read from "
            f"the disk cache in TRITON_CACHE_DIR or untimed")
    if after.binaries is not None and before.binaries is not None:
        text += f"; {after.binaries - before.binaries} kernel binaries compiled or loaded"
    return text + f", {spent.compile_seconds:.1f} s compiling in parallel"
