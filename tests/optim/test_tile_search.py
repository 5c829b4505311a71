"""The bounded tile search of the Newton-Schulz kernels, on CPU: which candidates a new problem key compiles and
times under each MUON_NS_AUTOTUNE mode, the cost model that ranks them, and the launches a loop records.

The candidates are checked against the pruning rules written out here (shared memory of the pipeline buffers,
square-or-wide tiles for the symmetric kernel, small tiles for true fp32), the cost model's live-tile count
against a walk of the symmetric kernel's own program ordering and early return, and the recorded launches
against the products the two forms of Newton-Schulz are made of. What the GPU does with them (parallel
compilation, timing) is in test_kernels_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from muon_recipes.optim.kernels import tile_model, tuning  # noqa: E402
from muon_recipes.optim.kernels.iterations import triton_launches  # noqa: E402
from muon_recipes.optim.kernels.tuning import (BOUNDED_CANDIDATES, matmul_configs, prune_configs,  # noqa: E402
                                               ranked_configs, search_candidates, tile_label, tile_search_mode)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
HOPPER_SHARED_MEMORY = 227 * 1024


def symmetric(batch, m, k, dtype, has_c=False, precision="tf32"):
    return ({"M": m, "K": k, "BATCH": batch, "x_ptr": dtype},
            {"HAS_C": has_c, "INPUT_PRECISION": precision})


def update(batch, m, n, dtype, add_x=True, precision="tf32"):
    return ({"M": m, "N": n, "K": m, "BATCH": batch, "x_ptr": torch.empty(0, dtype=dtype)},   # a tensor here
            {"ADD_X": add_x, "INPUT_PRECISION": precision})


# moe_small's products (its four buckets, both forms), dense_1b's MLP bucket, a big square matrix, odd sizes and
# true fp32 (the pruning's edge cases).
PRODUCTS = {
    "moe-std-gram": symmetric(16, 512, 512, BF16), "moe-std-update": update(16, 512, 512, BF16),
    "moe-kv-gram": symmetric(16, 256, 512, BF16), "moe-kv-poly": symmetric(16, 256, 256, BF16, True),
    "moe-gram-R": symmetric(189, 512, 768, FP16), "moe-gram-poly": symmetric(189, 512, 512, FP16, True),
    "moe-gram-QX": update(189, 512, 768, FP16, False), "moe-dense-R": symmetric(3, 512, 2048, FP16),
    "dense1b-update": update(48, 2048, 5632, BF16), "big-square": symmetric(1, 8192, 8192, BF16),
    "odd": symmetric(3, 17, 45, BF16, True), "fp32-ieee": update(4, 512, 512, FP32, True, "ieee"),
}


def shared_bytes(config, element_size):
    meta = config.kwargs
    return (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * element_size * config.num_stages


@pytest.fixture
def mode(monkeypatch):
    def set_mode(value):
        monkeypatch.setenv("MUON_NS_AUTOTUNE", value)
    return set_mode


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_each_mode_searches_a_subset_of_the_pruned_tiles_led_by_the_models_pick(name, mode):
    named, constexprs = PRODUCTS[name]
    configs = matmul_configs(interpreted=False)
    pruned = prune_configs(configs, named, **constexprs)
    element_size = named["x_ptr"].itemsize
    mode("full")
    assert search_candidates(configs, named, **constexprs) == pruned
    mode("heuristic")
    pick = search_candidates(configs, named, **constexprs)
    assert pick == ranked_configs(configs, named, **constexprs)[:1]
    mode("bounded")
    bounded = search_candidates(configs, named, **constexprs)
    assert bounded[0] == pick[0]
    assert len(bounded) == min(BOUNDED_CANDIDATES, len(pruned)) and len(set(map(tile_label, bounded))) == len(bounded)
    assert all(c in pruned for c in bounded)
    for config in bounded:
        meta = config.kwargs
        assert shared_bytes(config, element_size) <= HOPPER_SHARED_MEMORY, tile_label(config)
        if "N" not in named:   # symmetric products: square or wide tiles only
            assert meta["BLOCK_M"] <= meta["BLOCK_N"], tile_label(config)
        if constexprs["INPUT_PRECISION"] == "ieee":
            assert meta["BLOCK_M"] * meta["BLOCK_N"] <= 64 * 64 and meta["BLOCK_K"] <= 32, tile_label(config)
    # Different output tile shapes come before a second pipeline variant of one shape.
    shapes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in bounded]
    distinct = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in pruned}
    assert len(set(shapes)) == min(len(bounded), len(distinct))


def test_the_bound_cuts_moe_small_candidates_to_a_third():
    """Summed over moe_small's products, the bounded search compiles at most BOUNDED_CANDIDATES per key where the
    full search compiled every pruned tile (10-11 each)."""
    configs = matmul_configs(interpreted=False)
    names = [n for n in PRODUCTS if n.startswith("moe-")]
    full = sum(len(prune_configs(configs, *PRODUCTS[n][:1], **PRODUCTS[n][1])) for n in names)
    assert full >= 9 * len(names)
    assert BOUNDED_CANDIDATES * len(names) <= full / 3


def test_a_bad_mode_is_one_line_naming_the_variable_value_and_choices(mode):
    mode("fast")
    with pytest.raises(ValueError) as error:
        tile_search_mode()
    assert str(error.value) == "MUON_NS_AUTOTUNE='fast': must be one of bounded, full, heuristic"
    named, constexprs = PRODUCTS["moe-std-gram"]
    with pytest.raises(ValueError, match="MUON_NS_AUTOTUNE='fast'"):
        search_candidates(matmul_configs(interpreted=False), named, **constexprs)


def _programs_doing_work(m: int, block_m: int, block_n: int, group_m: int = 8) -> int:
    """Programs of the symmetric kernel that do not return at once: its grouped ordering of program ids and its
    test for a tile wholly below the diagonal, walked program by program."""
    num_pid_m, num_pid_n = -(-m // block_m), -(-m // block_n)
    working = 0
    for pid in range(num_pid_m * num_pid_n):
        num_pid_in_group = group_m * num_pid_n
        first_pid_m = pid // num_pid_in_group * group_m
        group_size_m = min(num_pid_m - first_pid_m, group_m)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
        pid_n = (pid % num_pid_in_group) // group_size_m
        working += not (pid_n + 1) * block_n <= pid_m * block_m
    return working


@pytest.mark.parametrize("m", [17, 256, 512, 768, 2048, 2112])
@pytest.mark.parametrize("block_m, block_n", [(64, 64), (64, 128), (128, 128), (128, 256)])
def test_live_tiles_match_the_kernels_early_return(m, block_m, block_n):
    product = tile_model.Product(batch=1, m=m, n=m, k=m, symmetric=True, element_size=2)
    assert tile_model.live_tiles(product, block_m, block_n) == _programs_doing_work(m, block_m, block_n)


def test_cost_model_prefers_big_tiles_on_big_products_and_filling_the_gpu_on_small_ones():
    """Two regimes the model exists for: on an 8192 x 8192 product the 128 x 256 tiles (measured the fastest there,
    docs/benchmarks.md) lead; on three 512 x 512 products (36 upper-triangle tiles of 128 x 128 fill a quarter of
    the 132 SMs) a smaller tile leads."""
    configs = matmul_configs(interpreted=False)
    big = ranked_configs(configs, *PRODUCTS["big-square"][:1], **PRODUCTS["big-square"][1])
    assert (big[0].kwargs["BLOCK_M"], big[0].kwargs["BLOCK_N"]) == (128, 256)
    named, constexprs = symmetric(3, 512, 512, FP16, True)
    small = ranked_configs(configs, named, **constexprs)
    assert small[0].kwargs["BLOCK_M"] * small[0].kwargs["BLOCK_N"] < 128 * 128


def test_resident_ctas_follow_shared_memory_registers_and_warps():
    # 128 x 256 x 64, 3 stages of bf16: 144 KB of operand buffers; 168 registers x 256 threads: one CTA per SM.
    assert tile_model.resident_ctas(128, 256, 64, 3, 8, 2) == 1
    # 64 x 64 x 32, 3 stages: 24 KB and 72 registers x 128 threads: registers allow 7, shared memory 9, warps 16.
    assert tile_model.resident_ctas(64, 64, 32, 3, 4, 2) == 7


def _launch_summary(launches):
    rows = []
    for kernel, _, args, constexprs in launches:
        named = dict(zip(kernel.arg_names, args))
        dtypes = tuple(str(a).replace("torch.", "") for a in args if isinstance(a, torch.dtype))
        sizes = (named["M"], named.get("N", named["K"]), named["BATCH"])
        flag = constexprs.get("HAS_C", constexprs.get("ADD_X"))
        rows.append((kernel.base_fn.__name__, sizes, dtypes, flag))
    return sorted(rows)


def test_recorded_launches_are_the_products_of_each_form():
    """A dry pass records one launch per kernel specialization and runs none: the standard form's X X^T, b A + c A A
    and a X + B X; the Gram form's R = X X^T, the m x m polynomials (b R + c R R and Z Q + a Q share one
    specialization), Q X at a restart and the last Q X written in bf16."""
    from muon_recipes.optim.newton_schulz import coefficients, gram_restarts

    coeffs = coefficients("keller", 5)
    X = torch.full((16, 256, 512), float("nan"), dtype=BF16)
    assert _launch_summary(triton_launches(X, coeffs)) == sorted([
        ("_symmetric_matmul_kernel", (256, 512, 16), ("bfloat16",) * 4, False),
        ("_symmetric_matmul_kernel", (256, 256, 16), ("bfloat16",) * 4, True),
        ("_update_kernel", (256, 512, 16), ("bfloat16",) * 3, True)])
    assert torch.isnan(X).all()   # nothing ran on it
    X = torch.empty((3, 512, 2048), dtype=FP16)
    assert _launch_summary(triton_launches(X, coeffs, gram_restarts(5), BF16)) == sorted([
        ("_symmetric_matmul_kernel", (512, 2048, 3), ("float16",) * 4, False),
        ("_symmetric_matmul_kernel", (512, 512, 3), ("float16",) * 4, True),
        ("_update_kernel", (512, 2048, 3), ("float16",) * 3, False),
        ("_update_kernel", (512, 2048, 3), ("float16", "float16", "bfloat16"), False)])


def test_a_search_is_counted_once_when_it_times_and_never_when_its_choice_is_read(mode):
    """The autotuner calls the prune hook for every new key and the benchmark only when the disk cache missed;
    a lone candidate (MUON_NS_AUTOTUNE=heuristic) runs once, untimed."""
    from muon_recipes.optim.kernels import tile_search

    mode("heuristic")
    search = tile_search._Search()
    named, constexprs = PRODUCTS["moe-gram-R"]
    before = tile_search.snapshot()
    search.prune(matmul_configs(interpreted=False), named, **constexprs)      # a key whose choice is on disk
    assert tile_search.snapshot().minus(before).searches == 0
    runs = []
    search.prune(matmul_configs(interpreted=False), named, **constexprs)      # a key searched here
    assert search.benchmark(lambda: runs.append(1), (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    spent = tile_search.snapshot().minus(before)
    assert (spent.searches, spent.timed, runs) == (1, 0, [1])


def test_the_first_step_line_says_what_was_searched_read_and_compiled(mode):
    from muon_recipes.optim.kernels.tile_search import Progress, SearchStats, describe

    mode("bounded")
    before = Progress(2, 10, SearchStats(searches=1, timed=3, search_seconds=0.5, precompiled=3, compile_seconds=1.0))
    after = Progress(15, 36, SearchStats(searches=12, timed=33, search_seconds=1.25, precompiled=17,
                                         compile_seconds=4.5))
    assert describe(before, after) == (
        "13 tile choices (MUON_NS_AUTOTUNE=bounded): 11 searched here (30 candidates timed, 0.8 s), 2 read from the "
        "disk cache in TRITON_CACHE_DIR or untimed; 26 kernel binaries compiled or loaded, 3.5 s compiling in "
        "parallel")
    assert describe(after, after) == "no new tile choices"
