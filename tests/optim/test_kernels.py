"""The Triton Newton-Schulz kernels on CPU: every kernel against float64 and torch, in Triton's interpreter.

`TRITON_INTERPRET=1` only takes effect if it is set before triton is imported, and it would change every
later Triton user of the same pytest process, so the kernels run in child processes (this file run as a
script; the (shape, dtype) cases split over children run at once, `interpreter_child.interpreter_shards`) that
print their measurements as JSON; the tests below read them. Sizes are small and odd (m=17 and
n=45 span two tiles and a ragged reduction with the interpreter's 16 x 16 x 16 tiles), batches 1 and 3,
fp32, bf16 and fp16 (the Gram form's dtype), plus an aligned case (32 x 48) that takes the unmasked path.

References: float64 of the same inputs (the exact answer), and torch in the same dtype (what the torch
backend computes). Every output buffer is poisoned with NaN first, so an element the kernel never writes
fails the test. (The GPU versions of these checks are in test_kernels_gpu.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interpreter_child import interpreter_shards, my_units, shard_count

KELLER = (3.4445, -4.7750, 2.0315)
# Two different triples, so a swapped or repeated coefficient would show (the second is the first step of
# the Polar Express schedule, Amsel et al. 2025).
TWO_STEPS = (KELLER, (8.28721201814563, -23.595886519098837, 17.300387312530933))
# Three steps with a restart before the second: the Gram form's identity start, its Q and R recurrences and
# a restart all run.
THREE_STEPS = TWO_STEPS + (KELLER,)
GRAM_RESTARTS = (1,)
SHAPES = ((1, 17, 45), (3, 17, 45), (2, 32, 48))
DTYPES = ("float32", "bfloat16", "float16")
KERNELS = ("gram", "polynomial", "update", "iterations", "divide", "transpose", "commuting", "gram_iterations",
           "momentum", "scaled_add", "wide_tiles")
# A tile twice as wide as tall (the interpreter's autotuned tile is square): its pieces on the diagonal are
# stored as whole squares, the one below it not at all (kernels/symmetric.py).
WIDE_TILE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
# The transpose copy serves the buckets, which are never float16.
CASES = [(d, k) for d in DTYPES for k in KERNELS if not (d == "float16" and k == "transpose")]
# Relative Frobenius error against float64: fp32 arithmetic lands near 1e-7; bf16 rounds inputs and outputs
# to 8 bits of mantissa (unit roundoff 2^-9 = 2e-3), fp16 to 11 (2^-12 = 2.4e-4).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1.5e-2, "float16": 2e-3}
# The Gram form squares the Gram matrix's round-off (its R recurrence) and here runs Polar Express's first
# step (a = 8.3), so in half precision it lands further from float64 than the standard loop; the same form
# in torch lands as far (the ratio check below), and newton_schulz runs it in float16 only.
GRAM_TOLERANCE = {"float32": 1e-5, "bfloat16": 0.25, "float16": 0.03}


# ---------------------------------------------------------------- the child process (runs the kernels)

def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value = value.double()
    if not torch.isfinite(value).all():
        return float("inf")
    return ((value - reference.double()).norm() / reference.double().norm()).item()


def _torch_iterations(X: torch.Tensor, coefficients) -> torch.Tensor:
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


def _exactly_symmetric(S: torch.Tensor) -> torch.Tensor:
    return torch.triu(S) + torch.triu(S, 1).mT


# One function per kernel: each gets the normalized input X of the case (its batch, shape and dtype) and a
# generator of its own, and returns its errors against float64 and torch plus the properties it must keep.

def _measure_gram(X, generator):
    from muon_recipes.optim.kernels import symmetric_gram

    batch, m, _ = X.shape
    out = torch.full((batch, m, m), float("nan"), dtype=X.dtype)
    symmetric_gram(X, out=out)
    return {"ours": _relative_error(out, X.double() @ X.double().mT),
            "torch": _relative_error(X @ X.mT, X.double() @ X.double().mT),
            "symmetric": bool(torch.equal(out, out.mT))}


def _measure_polynomial(X, generator):
    from muon_recipes.optim.kernels import symmetric_polynomial

    _, b, c = KELLER
    S = _exactly_symmetric((X.float() @ X.float().mT).to(X.dtype))
    out = torch.full(S.shape, float("nan"), dtype=X.dtype)
    symmetric_polynomial(S, b, c, out=out)
    exact = b * S.double() + c * S.double() @ S.double()
    return {"ours": _relative_error(out, exact), "torch": _relative_error(b * S + c * (S @ S), exact),
            "symmetric": bool(torch.equal(out, out.mT))}


def _measure_update(X, generator):
    from muon_recipes.optim.kernels import fused_update

    batch, m, _ = X.shape
    a = KELLER[0]
    B = _exactly_symmetric(torch.randn(batch, m, m, generator=generator) / m).to(X.dtype)
    out = torch.full(X.shape, float("nan"), dtype=X.dtype)
    fused_update(X, B, a, out=out)
    exact = a * X.double() + B.double() @ X.double()
    return {"ours": _relative_error(out, exact), "torch": _relative_error(a * X + B @ X, exact)}


def _measure_divide(X, generator):
    from muon_recipes.optim.kernels import divide_matrices

    raw = torch.randn(X.shape, generator=generator).to(X.dtype)
    divisors = torch.rand(X.shape[0], generator=generator) * 10 + 0.1
    out = torch.full(X.shape, float("nan"), dtype=X.dtype)
    divide_matrices(raw, divisors, out=out)
    exact = raw.double() / divisors.double().view(-1, 1, 1)
    return {"ours": _relative_error(out, exact),
            "torch": _relative_error((raw / divisors.view(-1, 1, 1)).to(X.dtype), exact),
            # torch's one-pass form (float32 math, one rounding), as newton_schulz falls back to
            "equals_torch": bool(torch.equal(out, torch.div(raw, divisors.view(-1, 1, 1), out=torch.empty_like(raw)))),
            "in_place_equal": _divide_in_place_equal(raw, divisors),
            "bounded_equal": _divide_bounded_equal(raw, divisors, out)}


def _divide_bounded_equal(raw, divisors, out) -> bool:
    """The division launched as three programs that loop over every matrix's blocks
    (`fast_launch.bounded_programs`, a pass on the side stream), equal to one program per block."""
    from muon_recipes.optim.kernels import divide_matrices
    from muon_recipes.optim.kernels.fast_launch import bounded_programs

    with bounded_programs(3):
        bounded = divide_matrices(raw, divisors, out=torch.full_like(out, float("nan")))
    return bool(torch.equal(bounded, out))


def _divide_in_place_equal(raw, divisors) -> bool:
    """`newton_schulz.normalize_`'s form: the quotient written over its input, as float16 over a bf16 batch (the
    Gram form's work dtype, the same element size), equal to the quotient written into a fresh buffer."""
    from muon_recipes.optim.kernels import divide_matrices

    work = torch.float16 if raw.dtype == torch.bfloat16 else raw.dtype
    fresh = divide_matrices(raw, divisors, out=torch.empty(raw.shape, dtype=work))
    in_place = raw.clone()
    divide_matrices(in_place, divisors, out=in_place.view(work))
    return bool(torch.equal(in_place.view(work), fresh))


def _commuting_pair(X, generator):
    """Two commuting symmetric matrices (polynomials in one symmetric S), as in the Gram form, and Z Q + a Q."""
    batch, m, _ = X.shape
    a, b, c = KELLER
    S = _exactly_symmetric(torch.randn(batch, m, m, generator=generator, dtype=torch.float64) / m)
    Z = _exactly_symmetric(b * S + c * S @ S).to(X.dtype)
    Q = _exactly_symmetric(S + 2.0 * S @ S).to(X.dtype)
    return Z, Q, Z.double() @ Q.double() + a * Q.double()


def _measure_commuting(X, generator):
    from muon_recipes.optim.kernels import commuting_product

    a = KELLER[0]
    Z, Q, exact = _commuting_pair(X, generator)
    out = torch.full(Z.shape, float("nan"), dtype=X.dtype)
    commuting_product(Z, Q, a, out=out)
    return {"ours": _relative_error(out, exact), "torch": _relative_error(Z @ Q + a * Q, exact),
            "symmetric": bool(torch.equal(out, out.mT))}


def _measure_wide_tiles(X, generator):
    """The commuting product and the Gram matrix X X^T with a tile twice as wide as tall."""
    from muon_recipes.optim.kernels.symmetric import launch_symmetric_matmul

    a = KELLER[0]
    Z, Q, exact = _commuting_pair(X, generator)
    wide = torch.full(Z.shape, float("nan"), dtype=X.dtype)
    launch_symmetric_matmul(Z, wide, alpha=1.0, beta=a, c=Q, y=Q, tile=WIDE_TILE)
    wide_gram = torch.full(Z.shape, float("nan"), dtype=X.dtype)
    launch_symmetric_matmul(X, wide_gram, tile=WIDE_TILE)
    gram = X.double() @ X.double().mT
    return {"ours": max(_relative_error(wide, exact), _relative_error(wide_gram, gram)),
            "torch": max(_relative_error(Z @ Q + a * Q, exact), _relative_error(X @ X.mT, gram)),
            "symmetric": bool(torch.equal(wide, wide.mT) and torch.equal(wide_gram, wide_gram.mT))}


def _measure_gram_iterations(X, generator):
    from muon_recipes.optim.kernels import gram_iterations_triton
    from muon_recipes.optim.newton_schulz import gram_iterations_torch

    before = X.clone()
    ours = gram_iterations_triton(X, THREE_STEPS, GRAM_RESTARTS, kernels="triton")
    exact = _torch_iterations(X.double(), THREE_STEPS)   # the standard form: equal in exact arithmetic
    # The last product rounded straight to bf16 (what newton_schulz asks for): the same numbers to within one
    # bf16 rounding (2^-9 relative per element).
    direct = gram_iterations_triton(X, THREE_STEPS, GRAM_RESTARTS, kernels="triton", out_dtype=torch.bfloat16)
    return {"ours": _relative_error(ours, exact),
            "torch": _relative_error(gram_iterations_torch(X, THREE_STEPS, GRAM_RESTARTS), exact),
            "input_untouched": bool(torch.equal(X, before)),
            "dtype_kept": ours.dtype == X.dtype and ours.shape == X.shape,
            "out_dtype_rounds_once": direct.dtype == torch.bfloat16 and _relative_error(direct, ours) <= 2.0 ** -9,
            "pieces_equal": _in_pieces_equal(lambda: gram_iterations_triton(X, THREE_STEPS, GRAM_RESTARTS,
                                                                            out_dtype=torch.bfloat16), direct)}


def _in_pieces_equal(run, whole: torch.Tensor) -> bool:
    """`run` with its batch cut into 2 and into 4 pieces (MUON_NS_PIECES; batches of 3 leave a ragged last piece)
    equals the loop on the whole batch bit for bit: each matrix takes the same products."""
    results = []
    for pieces in ("2", "4"):
        os.environ["MUON_NS_PIECES"] = pieces
        try:
            results.append(run())
        finally:
            del os.environ["MUON_NS_PIECES"]
    return all(r.dtype == whole.dtype and torch.equal(r, whole) for r in results)


def _measure_iterations(X, generator):
    from muon_recipes.optim.kernels import ns_iterations_triton

    before = X.clone()
    ours = ns_iterations_triton(X, TWO_STEPS, kernels="triton")
    exact = _torch_iterations(X.double(), TWO_STEPS)
    return {"ours": _relative_error(ours, exact), "torch": _relative_error(_torch_iterations(X, TWO_STEPS), exact),
            "input_untouched": bool(torch.equal(X, before)),
            "dtype_kept": ours.dtype == X.dtype and ours.shape == X.shape,
            "pieces_equal": _in_pieces_equal(lambda: ns_iterations_triton(X, TWO_STEPS), ours)}


def _measure_momentum(X, generator):
    """Muon's momentum on a float32 gradient and buffer, the update written in X's dtype (Nesterov), and the
    heavy-ball form whose update is the new buffer itself."""
    from muon_recipes.optim.kernels import momentum_update

    grad, buf = torch.randn(X.shape, generator=generator), torch.randn(X.shape, generator=generator)
    exact_buf = 0.95 * buf.double() + grad.double()
    exact = grad.double() + 0.95 * exact_buf
    ours_buf, out = buf.clone(), torch.full(X.shape, float("nan"), dtype=X.dtype)
    momentum_update(grad, ours_buf, 0.95, True, X.dtype, out=out)
    torch_buf = buf.clone().mul_(0.95).add_(grad)
    heavy_buf = buf.clone()
    heavy = momentum_update(grad, heavy_buf, 0.95, False, X.dtype)
    return {"ours": _relative_error(out, exact), "torch": _relative_error((grad + 0.95 * torch_buf).to(X.dtype), exact),
            "buffer_float32_exact": _relative_error(ours_buf, exact_buf) < 1e-6,
            "heavy_ball_is_buffer": bool(torch.equal(heavy, heavy_buf.to(X.dtype)))}


def _measure_scaled_add(X, generator):
    """The final weight update: a float32 weight, decayed, plus a scaled update in X's dtype."""
    from muon_recipes.optim.kernels import scaled_add_

    weight = torch.randn(X.shape, generator=generator)
    update = torch.randn(X.shape, generator=generator).to(X.dtype)
    exact = 0.999 * weight.double() - 0.02 * update.double()
    ours = scaled_add_(weight.clone(), update, alpha=-0.02, decay=0.999)
    # The captured step's form: alpha and decay read from float32 tensors, the same float32 values.
    from_memory = scaled_add_(weight.clone(), update, alpha=torch.tensor(-0.02), decay=torch.tensor(0.999))
    return {"ours": _relative_error(ours, exact),
            "torch": _relative_error(weight.clone().mul_(0.999).add_(update, alpha=-0.02), exact),
            "dtype_kept": ours.dtype == torch.float32, "scalars_from_memory_equal": torch.equal(from_memory, ours)}


def _measure_transpose(X, generator):
    """A tall block of a float32 update, copied transposed (and cast) into a row-major buffer, as into a bucket."""
    from muon_recipes.optim.dispatch import is_transposed_view
    from muon_recipes.optim.kernels.transpose import copy_transposed

    batch, m, n = X.shape
    source = torch.randn(batch, n, m, generator=generator).mT
    out = torch.full(X.shape, float("nan"), dtype=X.dtype)
    copy_transposed(out, source)
    reference = torch.empty(X.shape, dtype=X.dtype).copy_(source)
    return {"ours": _relative_error(out, source.double()), "torch": _relative_error(reference, source.double()),
            "equals_torch": bool(torch.equal(out, reference)),
            "layouts_as_expected": is_transposed_view(source) and not is_transposed_view(out)}


MEASURE = {"gram": _measure_gram, "polynomial": _measure_polynomial, "update": _measure_update,
           "iterations": _measure_iterations, "divide": _measure_divide, "transpose": _measure_transpose,
           "commuting": _measure_commuting, "gram_iterations": _measure_gram_iterations,
           "momentum": _measure_momentum, "scaled_add": _measure_scaled_add, "wide_tiles": _measure_wide_tiles}
assert tuple(MEASURE) == KERNELS


def _measure_case(batch: int, m: int, n: int, dtype_name: str, seed: int) -> dict:
    """Every kernel's measurements (CASES) on one shape and dtype."""
    dtype = getattr(torch, dtype_name)
    X = torch.randn(batch, m, n, generator=torch.Generator().manual_seed(seed))
    X = (X / X.norm(dim=(-2, -1), keepdim=True)).to(dtype)
    return {kernel: MEASURE[kernel](X, torch.Generator().manual_seed(1000 * seed + i))
            for i, kernel in enumerate(KERNELS) if (dtype_name, kernel) in CASES}


# The child's units of work: one (shape, dtype) case each, its seed the shape's index whichever child runs it.
UNITS = [(seed, shape, dtype_name) for seed, shape in enumerate(SHAPES) for dtype_name in DTYPES]


def _interpreter_main() -> None:
    measurements = {}
    for seed, (batch, m, n), dtype_name in my_units(UNITS, sys.argv):
        measurements[f"{batch}x{m}x{n}-{dtype_name}"] = _measure_case(batch, m, n, dtype_name, seed)
    print(json.dumps(measurements))


# ---------------------------------------------------------------- the tests (parent process)

def _case_id(shape, dtype_name) -> str:
    return "{}x{}x{}-{}".format(*shape, dtype_name)


@pytest.fixture(scope="module")
def interpreter_results():
    """Every case's measurements, the cases split over children run at once (`interpreter_child`)."""
    merged = {}
    for part in interpreter_shards(__file__, "--interpreter-checks", shards=shard_count(len(UNITS)), timeout=300):
        merged.update(part)
    assert sorted(merged) == sorted(_case_id(shape, d) for _, shape, d in UNITS), "a case was measured by no child"
    return merged


@pytest.mark.parametrize("dtype_name, kernel", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64_and_torch(interpreter_results, shape, dtype_name, kernel):
    result = interpreter_results[_case_id(shape, dtype_name)][kernel]
    tolerance = (GRAM_TOLERANCE if kernel == "gram_iterations" else TOLERANCE)[dtype_name]
    assert result["ours"] <= tolerance, f"{kernel}: relative error {result['ours']:.3g} > {tolerance}"
    # No accuracy traded away: at most a little worse than torch in the same dtype (one rounding per
    # product instead of one per operation usually makes it better).
    assert result["ours"] <= 1.25 * result["torch"] + 1e-6, result
    for flag in ("symmetric", "input_untouched", "dtype_kept", "equals_torch", "layouts_as_expected",
                 "buffer_float32_exact", "heavy_ball_is_buffer", "out_dtype_rounds_once",
                 "scalars_from_memory_equal", "in_place_equal", "bounded_equal", "pieces_equal"):
        if flag in result:
            assert result[flag], f"{kernel}: {flag} is False"


# ---------------------------------------------------------------- argument checks (no kernel launch)

def _kernels():
    pytest.importorskip("triton")
    from muon_recipes.optim import kernels
    return kernels


@pytest.mark.parametrize("make_input, message", [
    (lambda: torch.zeros(4, 8), "expected a batch of matrices"),
    (lambda: torch.zeros(1, 9, 8), "needs m <= n"),
    (lambda: torch.zeros(1, 4, 8, dtype=torch.float64), "X.dtype=torch.float64: must be one of"),
    (lambda: torch.zeros(1, 8, 4).mT, "must be contiguous"),
])
def test_bad_input_is_named(make_input, message):
    kernels = _kernels()
    with pytest.raises(ValueError, match=message):
        kernels.ns_iterations_triton(make_input(), [KELLER])


def test_bad_coefficients_are_named():
    kernels = _kernels()
    with pytest.raises(ValueError, match="coefficients=.*triples"):
        kernels.ns_iterations_triton(torch.zeros(1, 4, 8, device="cuda" if torch.cuda.is_available() else "cpu"),
                                     [(1.0, 2.0)])


def test_cpu_tensor_without_interpreter_is_refused():
    kernels = _kernels()
    from muon_recipes.optim.dispatch import interpreting
    if interpreting():
        pytest.skip("TRITON_INTERPRET is set for this process: CPU tensors are valid here")
    with pytest.raises(ValueError, match="X.device=cpu"):
        kernels.ns_iterations_triton(torch.zeros(1, 4, 8), [KELLER])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA side of the rule needs a GPU")
def test_prefer_triton_on_cuda_from_the_measured_side():
    from muon_recipes.optim.dispatch import prefer_triton, triton_available
    if triton_available():
        assert prefer_triton(torch.zeros(8, 1024, 4096, device="cuda", dtype=torch.bfloat16)) is True
        assert prefer_triton(torch.zeros(8, 64, 128, device="cuda", dtype=torch.bfloat16)) is False


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    _interpreter_main()


def test_autotuning_disk_cache_is_on_by_default(monkeypatch):
    """Unset, Triton (>= 3.4) is asked to keep the tile choices on disk; MUON_NS_AUTOTUNE_CACHE=0 asks for nothing.
    A fresh process builds both autotuned kernels with the cache on (Triton itself never caches under its
    interpreter)."""
    pytest.importorskip("triton")
    import inspect

    import triton

    from muon_recipes.optim.kernels.tuning import autotune_options

    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    monkeypatch.setenv("MUON_NS_AUTOTUNE_CACHE", "0")
    assert autotune_options() == {}
    monkeypatch.delenv("MUON_NS_AUTOTUNE_CACHE", raising=False)
    assert autotune_options() == ({"cache_results": True} if supported else {})
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "MUON_NS_AUTOTUNE_CACHE"}
    env.update(TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    probe = ("from muon_recipes.optim.kernels.symmetric import _symmetric_matmul_kernel as s; "
             "from muon_recipes.optim.kernels.update import _update_kernel as u; "
             "print(bool(s.cache_results), bool(u.cache_results))")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ([str(supported)] * 2)


def test_plan_timing_setting(monkeypatch):
    """MUON_NS_PLAN_TIMING picks how plans time their products; a bad value is a one-line error naming it."""
    from muon_recipes.optim.kernels.iterations import plan_timing

    monkeypatch.delenv("MUON_NS_PLAN_TIMING", raising=False)
    assert plan_timing() == "graph"
    monkeypatch.setenv("MUON_NS_PLAN_TIMING", "launch")
    assert plan_timing() == "launch"
    monkeypatch.setenv("MUON_NS_PLAN_TIMING", "replay")
    with pytest.raises(ValueError, match=r"MUON_NS_PLAN_TIMING='replay': must be one of launch, graph"):
        plan_timing()


def test_pieces_setting_and_the_counts_a_plan_times(monkeypatch):
    """MUON_NS_PIECES: "auto" leaves the count to the plan, a number sets it, anything else is a one-line error.
    The plan times pieces only for buckets of matrices under the persistent kernel's rows, in pieces of at least
    PIECE_MIN_BATCH matrices."""
    from muon_recipes.optim.dispatch import PERSISTENT_MIN_SIDE, PIECE_MIN_BATCH
    from muon_recipes.optim.kernels.iterations import piece_counts, pieces_setting

    monkeypatch.delenv("MUON_NS_PIECES", raising=False)
    assert pieces_setting() is None   # "auto", the default
    monkeypatch.setenv("MUON_NS_PIECES", "2")
    assert pieces_setting() == 2
    monkeypatch.setenv("MUON_NS_PIECES", "3")
    with pytest.raises(ValueError, match=r"MUON_NS_PIECES='3': must be one of auto, 1, 2, 4"):
        pieces_setting()

    def batch(b, m):
        return torch.empty(b, m, 2 * m, device="meta")
    small = PERSISTENT_MIN_SIDE // 4
    assert piece_counts(batch(4 * PIECE_MIN_BATCH, small)) == (1, 2, 4)
    assert piece_counts(batch(4 * PIECE_MIN_BATCH - 1, small)) == (1, 2)
    assert piece_counts(batch(2 * PIECE_MIN_BATCH - 1, small)) == (1,)
    assert piece_counts(batch(64, PERSISTENT_MIN_SIDE)) == (1,)
