"""The persistent TMA-fed Newton-Schulz products (`kernels/persistent.py`) on CPU, in Triton's interpreter.

As in test_kernels.py, the kernels run in child processes with `TRITON_INTERPRET=1` (this file as a script; the
cases split over children run at once, `interpreter_child.interpreter_shards`), which print their measurements
as JSON. Each product is checked against float64 and against the pointer kernel
on the same inputs, which reduces in the same 16-wide blocks, so the two must agree bit for bit. Output
buffers are poisoned with NaN first, so an element left unwritten fails. The 16 x 16 tiles make 32- and
64-row matrices span several tiles, and 3 programs loop over several tiles each; a wide tile (16 x 32) runs
the split diagonal store; a reduction of 40 ends in a partial block (TMA fills it with zeros), and an update
of 40 columns ends in a partial tile (TMA clips its store). The GPU checks are in test_kernels_gpu.py.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from interpreter_child import interpreter_shards, my_units, shard_count

WIDE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}
POINTER_WIDE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
SHAPES = ((2, 32, 48), (3, 64, 40))
TOLERANCE = {"bfloat16": 1.5e-2, "float16": 2e-3}
KELLER = (3.4445, -4.7750, 2.0315)
# The child's units of work, one (dtype, shape) case each, ordered so that every-other-unit shards get one case of
# each shape (`interpreter_child.my_units`).
UNITS = [("bfloat16", SHAPES[0]), ("bfloat16", SHAPES[1]), ("float16", SHAPES[1]), ("float16", SHAPES[0])]


def _child() -> None:
    from muon_recipes.optim.kernels import persistent
    from muon_recipes.optim.kernels.iterations import Plan, _iterate, _iterate_gram
    from muon_recipes.optim.kernels.symmetric import launch_symmetric_matmul
    from muon_recipes.optim.kernels.update import launch_update

    def poisoned(shape, dtype):
        return torch.full(shape, float("nan"), dtype=dtype)

    def relative(value, reference):
        value = value.double()
        if not torch.isfinite(value).all():
            return float("inf")
        return ((value - reference).norm() / reference.norm()).item()

    results = []
    # Every case's input drawn in one stream, in the order of the cases, whichever child measures which case.
    torch.manual_seed(0)
    inputs = {(dtype_name, shape): (torch.randn(*shape) / shape[-1] ** 0.5).to(getattr(torch, dtype_name))
              for dtype_name in TOLERANCE for shape in SHAPES}
    for dtype_name, (batch, m, k) in my_units(UNITS, sys.argv):
        dtype = getattr(torch, dtype_name)
        X = inputs[dtype_name, (batch, m, k)]
        A = launch_symmetric_matmul(X, torch.empty(batch, m, m, dtype=dtype))
        Bm = launch_symmetric_matmul(A, torch.empty_like(A), alpha=-0.5, beta=1.5, c=A)
        x64, a64, b64 = X.double(), A.double(), Bm.double()
        cases = {   # name -> (persistent call, pointer call, float64 reference, output shape, dtype)
            "gram": (lambda out, t: persistent.launch_symmetric(X, out, tile=t),
                     lambda out, t: launch_symmetric_matmul(X, out, tile=t), x64 @ x64.mT, (batch, m, m), dtype),
            "polynomial": (lambda out, t: persistent.launch_symmetric(A, out, alpha=2.0, beta=-0.5, c=A, tile=t),
                           lambda out, t: launch_symmetric_matmul(A, out, alpha=2.0, beta=-0.5, c=A, tile=t),
                           2.0 * a64 @ a64 - 0.5 * a64, (batch, m, m), dtype),
            "commuting": (lambda out, t: persistent.launch_symmetric(Bm, out, alpha=1.0, beta=0.7, c=A, y=A,
                                                                     tile=t),
                          lambda out, t: launch_symmetric_matmul(Bm, out, alpha=1.0, beta=0.7, c=A, y=A, tile=t),
                          b64 @ a64 + 0.7 * a64, (batch, m, m), dtype),
            "update": (lambda out, t: persistent.launch_update(X, A, 1.5, out, tile=t),
                       lambda out, t: launch_update(X, A, 1.5, out), 1.5 * x64 + a64 @ x64, (batch, m, k), dtype),
            "q_x_bf16": (lambda out, t: persistent.launch_update(X, A, 0.0, out, tile=t),
                         lambda out, t: launch_update(X, A, 0.0, out), a64 @ x64, (batch, m, k), torch.bfloat16),
        }
        for name, (run, pointer, reference, shape, out_dtype) in cases.items():
            for tile_name, tile in (("square", None), ("wide", WIDE)):
                if tile is not None and (name.startswith(("update", "q_x")) or
                                         not persistent.usable("symmetric", X, tile)):
                    continue
                out, expected = poisoned(shape, out_dtype), poisoned(shape, out_dtype)
                run(out, tile)
                # The pointer kernel on the same tile (the interpreter's products are numpy's, whose
                # fp32 summation order depends on the tile's shape).
                pointer(expected, None if tile is None else POINTER_WIDE)
                results.append({"case": f"{name}-{tile_name}-{dtype_name}-{batch}x{m}x{k}", "dtype": dtype_name,
                                "error": relative(out, reference),
                                "equal_to_pointer": bool(torch.equal(out, expected)),
                                "symmetric": bool(torch.equal(out, out.mT)) if shape[-1] == m else True})
        # The whole loop with every product persistent equals the pointer kernels' loop (on a normalized X,
        # whose iterates stay bounded).
        coefficients = (KELLER, KELLER)
        X = X / X.float().norm(dim=(-2, -1), keepdim=True).to(dtype)
        every = Plan(*["persistent"] * 5)
        standard = _iterate(X, coefficients, every)
        gram = _iterate_gram(X, coefficients, every, (1,), torch.bfloat16)
        results.append({"case": f"iterations-{dtype_name}-{batch}x{m}x{k}", "dtype": dtype_name, "error": 0.0,
                        "equal_to_pointer": bool(torch.equal(standard, _iterate(X, coefficients, Plan()))
                                                 and torch.equal(gram, _iterate_gram(X, coefficients, Plan(),
                                                                                     (1,), torch.bfloat16))),
                        "symmetric": True})
    refusals = {
        "float32": persistent.usable("symmetric", torch.zeros(1, 32, 32)),
        "rows_not_divisible": persistent.usable("symmetric", torch.zeros(1, 24, 32, dtype=torch.bfloat16)),
        "wide_rows_not_divisible": persistent.usable("symmetric", torch.zeros(1, 48, 32, dtype=torch.bfloat16), WIDE),
        "rows_not_16_bytes": persistent.usable("update", torch.zeros(1, 16, 12, dtype=torch.bfloat16)),
        "accepted": persistent.usable("update", torch.zeros(1, 16, 40, dtype=torch.bfloat16)),
    }
    print(json.dumps({"results": results, "refusals": refusals}))


@pytest.fixture(scope="module")
def child_results():
    """The cases' results, split over children run at once (`interpreter_child`); each child's refusals too."""
    parts = interpreter_shards(__file__, shards=shard_count(len(UNITS)))
    assert all(part["refusals"] == parts[0]["refusals"] for part in parts)
    return {"results": [r for part in parts for r in part["results"]], "refusals": parts[0]["refusals"]}


def test_persistent_products_equal_the_pointer_kernels_and_float64(child_results):
    results = child_results["results"]
    # per dtype and shape: 5 products on the square tile, the 3 symmetric ones on the wide tile, the loops
    assert len(results) == len(TOLERANCE) * len(SHAPES) * (5 + 3 + 1)
    for r in results:
        assert r["equal_to_pointer"], r["case"]
        assert r["error"] < TOLERANCE[r["dtype"]], r
        assert r["symmetric"], r["case"]


def test_usable_refuses_what_tma_cannot_address(child_results):
    refusals = child_results["refusals"]
    assert refusals == {"float32": False, "rows_not_divisible": False, "wide_rows_not_divisible": False,
                        "rows_not_16_bytes": False, "accepted": True}


def test_live_tiles_are_the_tiles_touching_the_upper_triangle():
    from muon_recipes.optim.kernels.tile_model import upper_triangle_tiles

    for m, bm, bn in ((64, 16, 16), (64, 16, 32), (2048, 128, 128), (2048, 128, 256)):
        tiles = upper_triangle_tiles(m, bm, bn)
        covered = torch.zeros(m, m, dtype=torch.bool)
        for i, j in tiles:
            covered[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = True
        assert covered.triu().eq(torch.ones(m, m, dtype=torch.bool).triu()).all()   # every upper element
        for i, j in tiles:   # and no tile lies wholly below the diagonal
            assert (j + 1) * bn - 1 >= i * bm


if __name__ == "__main__":
    _child()


def test_a_persistent_kernel_that_fails_is_left_out_of_later_plans(monkeypatch):
    """A Triton that cannot build the persistent kernel (Triton 3.6 once rejected its first epilogue) must not
    stop the optimizer: the plan drops it with one warning and keeps timing the pointer kernels and cuBLAS."""
    from muon_recipes.optim.kernels import iterations, persistent

    monkeypatch.setattr(persistent, "usable", lambda product, x, tile=None: True)
    monkeypatch.setattr(iterations, "_persistent_error", None)
    large, small = torch.zeros(1, 1024, 2048, dtype=torch.bfloat16), torch.zeros(1, 512, 2048, dtype=torch.bfloat16)
    assert iterations.persistent_offered("symmetric", large)
    assert not iterations.persistent_offered("symmetric", small)   # under dispatch.PERSISTENT_MIN_SIDE
    with pytest.warns(RuntimeWarning, match="persistent kernel failed on the gram product of \\(1, 1024, 2048\\)"):
        iterations._persistent_failed("gram", large, RuntimeError("PassManager::run failed"))
    assert not iterations.persistent_offered("update", large)
