"""Launching an autotuned Triton kernel without its Python dispatch once its configuration is known.

Through `kernel[grid](...)` every launch walks the autotuner (key, cache lookup), the heuristics and the
JIT's argument binding and specialization: tens of microseconds of host time per launch, more than the GPU
needs for a Newton-Schulz product on a 512 x 2048 block (docs/benchmarks.md, "What moved the numbers").
The first launch of each specialization takes that path (compiling and autotuning as usual); `FastLaunch`
then keeps the compiled kernel, its grid and its constant arguments, and later launches call the compiled
kernel directly.

Inside `tile_search.recorded_launches()` a launch is recorded instead of run (a dry pass of a loop tells
`tile_search.compile_candidates` what to compile before any search starts).

The cache key holds everything the JIT specializes on: the exact integer arguments (sizes and strides), the
16-byte alignment, dtype and device of every tensor, and the constexpr arguments. The launch grid is not part
of what is compiled and is evaluated again at every launch: a caller's grid may depend on numbers that are no
argument of the kernel (the batch count of `transpose.copy_transposed` and `normalize.divide_matrices`), so
two launches with one key can need different grids. (A grid kept from the first launch of a key once ran the
transposed copy of a one-matrix block over the eight matrices of an expert weight with the same sizes and
strides: reads and writes seven matrices past both tensors.) Under the CPU interpreter, or with
`MUON_NS_FAST_LAUNCH=0`, every launch takes the ordinary path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import triton

from muon_recipes.optim.dispatch import interpreting
from muon_recipes.optim.kernels.tile_search import recording


def unwrap(kernel) -> tuple:
    """The JIT (or interpreted) function under a kernel's `triton.autotune` / `triton.heuristics` wrappers, and
    the heuristics' rules by argument name (each takes the named arguments, returns the value)."""
    rules: dict[str, Callable] = {}
    fn = kernel
    while isinstance(fn, (triton.runtime.Autotuner, triton.runtime.Heuristics)):
        if isinstance(fn, triton.runtime.Heuristics):
            rules.update(fn.values)
        fn = fn.fn
    return fn, rules


class FastLaunch:
    def __init__(self, kernel):
        self.kernel = kernel   # a @triton.jit kernel, possibly wrapped by @triton.autotune / @triton.heuristics
        fn, self.heuristics = unwrap(kernel)
        self.arg_names = list(fn.arg_names)   # the JIT (or interpreted) function's parameters, in order
        self.entries: dict[tuple, tuple] = {}
        self.enabled = not interpreting() and os.environ.get("MUON_NS_FAST_LAUNCH", "1") != "0"

    @staticmethod
    def _key(args: tuple, constexprs: dict) -> tuple:
        parts = []
        for value in args:
            if isinstance(value, torch.Tensor):
                parts.append((value.dtype, value.device.index, value.data_ptr() % 16 == 0))
            elif isinstance(value, int):
                parts.append(value)
            else:   # floats are never specialized on
                parts.append(type(value))
        return tuple(parts), tuple(constexprs.items())

    def __call__(self, grid: Callable[[dict], tuple], args: tuple, constexprs: dict) -> None:
        """Launch with the runtime `args` (positional, in the kernel's order) and the caller's constexprs; within
        `tile_search.recorded_launches()` record the launch instead."""
        launches = recording()
        if launches is not None:   # one entry per specialization: repeats compile nothing new
            launches.setdefault((id(self), self._key(args, constexprs)), (self.kernel, grid, args, constexprs))
            return
        if not self.enabled:
            self.kernel[grid](*args, **constexprs)
            return
        key = self._key(args, constexprs)
        entry = self.entries.get(key)
        if entry is not None:
            compiled, meta, tail, runners = entry
            launch_grid = _grid3(grid(meta))   # this call's grid: see the module doc
            runner = runners.get(launch_grid)
            if runner is None:
                runner = runners[launch_grid] = compiled[launch_grid]
            runner(*args, *tail)
            return
        compiled = self.kernel[grid](*args, **constexprs)
        self._remember(key, compiled, grid, args, constexprs)

    def _remember(self, key, compiled, grid, args, constexprs) -> None:
        if not hasattr(compiled, "function") or not hasattr(compiled, "__getitem__"):
            self.enabled = False   # a Triton without the compiled-kernel launch API: keep the ordinary path
            return
        named = dict(zip(self.arg_names, args))
        named.update(constexprs)
        best = getattr(self.kernel, "best_config", None)   # only an autotuned kernel has one
        if best is not None:
            named.update(best.kwargs)
        for name, rule in self.heuristics.items():
            named[name] = rule(named)
        tail = tuple(named[name] for name in self.arg_names[len(args):])
        launch_grid = _grid3(grid(named))
        # What a grid reads (the constexprs and the tuned configuration), without the tensors: an entry must not
        # keep the first launch's buffers alive. Every launch evaluates its own grid on it (`__call__`).
        meta = {name: value for name, value in named.items() if not isinstance(value, torch.Tensor)}
        self.entries[key] = (compiled, meta, tail, {launch_grid: compiled[launch_grid]})


# Programs per SM a pass over memory may launch (`bounded_programs`); None: one program per block.
_programs_per_sm: Optional[int] = None
_sm_counts: dict = {}


@contextmanager
def bounded_programs(per_sm: int):
    """Within: the passes over memory (`kernels/elementwise.py`, `kernels/normalize.py`) launch at most `per_sm`
    programs per SM, each looping over its share of the blocks (a grid-stride loop), instead of one program per
    block. Off the GPU the bound is `per_sm` programs in all.

    Why: beside a persistent product (one program per SM for the whole kernel) a pass with thousands of programs
    fills every SM it can, and when the product ends, the next product's programs find their SMs taken until the
    pass drains; a pass of a few programs per SM stays beside the products instead (`step_streams.py`)."""
    global _programs_per_sm
    if per_sm < 1:
        raise ValueError(f"bounded_programs: per_sm={per_sm}, expected at least 1")
    outer, _programs_per_sm = _programs_per_sm, per_sm
    try:
        yield
    finally:
        _programs_per_sm = outer


def programs(blocks: int, device: torch.device) -> int:
    """How many programs a pass of `blocks` blocks launches on `device` (see `bounded_programs`)."""
    if _programs_per_sm is None:
        return blocks
    if device.type != "cuda":
        return min(blocks, _programs_per_sm)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return min(blocks, _programs_per_sm * _sm_counts[index])


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for the launch grids, which run on the host at every launch. `triton.cdiv` does the same, but
    since Triton 3.5 it is a `ConstexprFunction` whose call costs microseconds in Python: a few per grid, several
    hundred grids per optimizer step."""
    return -(-a // b)


def _grid3(grid) -> tuple:
    """A launch grid of one to three dims as three ints."""
    grid = tuple(grid)
    return grid + (1,) * (3 - len(grid))
