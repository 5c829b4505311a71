"""Autotuning search spaces for the Newton-Schulz kernels, how much of them is searched, and the choices shared
by all of them.

Triton's autotuner times candidate tile shapes on the first call for a key (here: the matrix sizes, the
batch size, the dtypes and the fp32 matmul precision) and caches the winner for the life of the process (and on
disk, `autotune_options`), so each bucket shape of an optimizer pays the search once. The candidates are the
tile shapes that run Hopper's warpgroup MMA well for bf16 (128 x 256 and 128 x 128 tiles, 8 warps, 3-4
pipeline stages) plus smaller ones for the small, batched matrices of mixture-of-experts layers, where occupancy
matters more than per-tile efficiency. Candidates that cannot fit in shared memory or that are much larger than
the matrix are pruned before any compilation.

Compiling a candidate costs far more than timing it (about half a second against a few milliseconds), and a
first search over every candidate of every key made moe_small's first optimizer step take 56 s on an H200.
So the search is bounded, as in kernel libraries that ship a tile heuristic: the candidates left after pruning
are ranked by a cost model (`tile_model.py`) and only the best few are compiled (in parallel,
`tile_search.py`) and timed. `MUON_NS_AUTOTUNE` chooses how much is searched (`tile_search_mode`).

Under `TRITON_INTERPRET=1` (the CPU test path) there is a single small config, so odd sizes still span
several tiles and the masked edges get exercised, and nothing is timed.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

from muon_recipes.choices import TILE_SEARCH_DEFAULT, TILE_SEARCH_ENV, TILE_SEARCHES, env_choice
from muon_recipes.optim.dispatch import interpreting
from muon_recipes.optim.kernels.tile_model import Product, estimated_ns

# Shared memory per SM on Hopper is 228 KB (227 usable per block); leave room for the epilogue's
# layout conversion.
_SHARED_MEMORY_BUDGET = 200 * 1024
# Candidates compiled and timed per problem key under MUON_NS_AUTOTUNE=bounded. They compile in
# parallel, so the budget costs little wall time beyond one compilation; three leave room for the cost model's
# misses among tiles it ranks close together.
BOUNDED_CANDIDATES = 3


def autotune_options() -> dict:
    """Keyword arguments for `triton.autotune` shared by the matmul kernels.

    The tile search of one new block shape takes seconds, and without a cache every process of every run and
    sweep job pays it again. Triton >= 3.4 keeps each result on disk (`cache_results`, in TRITON_CACHE_DIR,
    default ~/.triton/cache), keyed by the Triton version, the GPU, the kernel source, the tuning key and the
    candidate configs, so every later process on the machine (every rank, every job of a sweep) reads the choice
    instead of timing every candidate again. Triton writes each file under a temporary name and renames it into
    place, so concurrent writers cannot leave a torn file. On by default; MUON_NS_AUTOTUNE_CACHE=0 turns it off
    (each process then searches anew).
    """
    if os.environ.get("MUON_NS_AUTOTUNE_CACHE", "1") == "0":
        return {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


def input_precision(dtype: torch.dtype) -> str:
    """The `tl.dot` precision that matches what torch does for a matmul of `dtype` inputs.

    bf16 inputs always accumulate in fp32 on tensor cores. For fp32 inputs torch follows
    `torch.get_float32_matmul_precision()`: "highest" (the default) is true fp32, anything else allows TF32.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _config(block_m: int, block_n: int, block_k: int, stages: int, warps: int, group_m: int = 8):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps)


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
_GPU_TILES = (
    (128, 256, 64, 3, 8),
    (128, 256, 64, 4, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 128, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 64, 3, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 5, 2),
    (64, 64, 32, 3, 4),
)

_INTERPRETER_TILES = ((16, 16, 16, 1, 1),)


def tile_label(config) -> str:
    """A tile configuration as BLOCK_M x BLOCK_N x BLOCK_K, pipeline stages and warps: "128x256x64-s3-w8"."""
    meta = config.kwargs
    return f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}-s{config.num_stages}-w{config.num_warps}"


def matmul_configs(interpreted: bool | None = None) -> list:
    """The matmul kernels' tile configurations: the GPU's, or the interpreter's single one (default: whichever
    runs here)."""
    interpreted = interpreting() if interpreted is None else interpreted
    tiles = _INTERPRETER_TILES if interpreted else _GPU_TILES
    return [_config(bm, bn, bk, stages, warps, group_m=2 if interpreted else 8)
            for bm, bn, bk, stages, warps in tiles]


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def element_size_of(pointer) -> int:
    """Bytes per element of a pointer argument: a tensor, or the torch.dtype that stands for one in a recorded
    launch (`iterations.triton_launches`) and in Triton's `warmup`."""
    return pointer.itemsize if isinstance(pointer, torch.dtype) else pointer.element_size()


def prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem or too big for shared memory; always keep at least one.

    True fp32 products (`INPUT_PRECISION="ieee"`) run on the FMA units, not the tensor cores: large tiles
    spill their accumulators to local memory there, so only 64 x 64 x 32 tiles are kept.

    The symmetric products (no `N`: their output is M x M) take square and wide tiles only. A tall tile there
    does the work of a wide one with the operands' roles swapped, and wide and square tiles store the pieces
    that cross the diagonal as whole squares; split that way, the tall 256 x 128 tile spilled on Hopper
    (tests/optim/test_kernels_sm90.py).

    `M`, `N`, `K` are the output rows, output columns (absent for the square symmetric products) and
    reduction length of the kernel's product; `x_ptr` carries the element type (a tensor or a torch.dtype).
    """
    m, k = named_args["M"], named_args["K"]
    symmetric = "N" not in named_args
    n = named_args.get("N", m)
    element_size = element_size_of(named_args["x_ptr"])
    ieee = kwargs.get("INPUT_PRECISION") == "ieee"
    kept = []
    for config in configs:
        meta = config.kwargs
        if ieee and (meta["BLOCK_M"] * meta["BLOCK_N"] > 64 * 64 or meta["BLOCK_K"] > 32):
            continue
        if symmetric and meta["BLOCK_M"] > meta["BLOCK_N"]:
            continue
        shared = (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * element_size * config.num_stages
        if shared > _SHARED_MEMORY_BUDGET:
            continue
        if meta["BLOCK_M"] > max(64, _next_power_of_two(m)) or meta["BLOCK_N"] > max(64, _next_power_of_two(n)):
            continue
        if meta["BLOCK_K"] > max(32, _next_power_of_two(k)):
            continue
        kept.append(config)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def tile_search_mode() -> str:
    """How much of the pruned candidates a new problem key searches, from MUON_NS_AUTOTUNE:

    * `bounded` (default): the `BOUNDED_CANDIDATES` best by the cost model are compiled and timed. On one H200
      its tiles ran moe_small's buckets as fast as the full search's (4.8-5.6 ms against 5.7 ms of Newton-Schulz
      per step) with 24 compilations instead of 69 and a cold first pass of 6.7 s instead of 11.6 s
      (`STAGES=tiles bash recipes/gpu_recipes_check.sh OUT`, docs/benchmarks.md);
    * `full`: every candidate left after pruning (69 compilations for moe_small, all at once ahead of the timing
      in a single process);
    * `heuristic`: the cost model's first choice only, nothing timed (the fastest start, no measurement).

    `config.validate` checks the same variable before a run starts; this check serves the optimizer used alone.
    """
    return env_choice(TILE_SEARCH_ENV, TILE_SEARCH_DEFAULT, TILE_SEARCHES)


def problem_of(named_args: dict, **kwargs) -> Product:
    """The matmul of one launch of the symmetric or the update kernel, from its arguments (see
    `prune_configs` for their names)."""
    m, k = named_args["M"], named_args["K"]
    symmetric = "N" not in named_args
    return Product(batch=named_args["BATCH"], m=m, n=m if symmetric else named_args["N"], k=k,
                   symmetric=symmetric, element_size=element_size_of(named_args["x_ptr"]),
                   reads_c=bool(kwargs.get("HAS_C", kwargs.get("ADD_X", False))))


def ranked_configs(configs, named_args, **kwargs) -> list:
    """The configurations left by `prune_configs`, fastest first by the cost model (ties keep their order)."""
    product = problem_of(named_args, **kwargs)
    kept = prune_configs(configs, named_args, **kwargs)
    return sorted(kept, key=lambda c: estimated_ns(product, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                   c.kwargs["BLOCK_K"], c.num_stages, c.num_warps))


def search_candidates(configs, named_args, **kwargs) -> list:
    """The candidates a new problem key compiles and times under `tile_search_mode()`: all that pruning keeps
    (`full`), the cost model's first choice (`heuristic`), or `BOUNDED_CANDIDATES` of them (`bounded`).

    The bounded set is the first choice and then the best of each other output tile shape (BM x BN), in the
    model's order, before any second variant (stages, warps, BK) of a shape already in: the model is least sure
    about the trade between big efficient tiles and enough tiles to fill the GPU, and the timing settles that
    better with different shapes than with near-copies of one. Pipeline variants fill what is left."""
    mode = tile_search_mode()
    if mode == "full":
        return prune_configs(configs, named_args, **kwargs)
    ranked = ranked_configs(configs, named_args, **kwargs)
    if mode == "heuristic":
        return ranked[:1]
    shapes, first, rest = set(), [], []
    for config in ranked:
        shape = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
        (rest if shape in shapes else first).append(config)
        shapes.add(shape)
    return (first + rest)[:BOUNDED_CANDIDATES]


def autotuned_kernels() -> list:
    """The Newton-Schulz kernels under `triton.autotune`; each keeps its chosen tile per problem key in `.cache`."""
    from triton.runtime.autotuner import Autotuner

    from muon_recipes.optim.kernels import symmetric, update

    return [obj for module in (symmetric, update) for obj in vars(module).values() if isinstance(obj, Autotuner)]


def tuned_problem_count() -> int:
    """How many (kernel, problem key) tile choices this process holds: timed here, or read from the disk cache."""
    return sum(len(kernel.cache) for kernel in autotuned_kernels())
