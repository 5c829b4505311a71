"""The fused Gram-form loop (`kernels/fused_gram.py`) on CPU, in Triton's interpreter.

As in test_kernels.py, the kernel runs in one child process with `TRITON_INTERPRET=1` (this file as a script),
which prints its measurements as JSON. The fused loop must be the product-by-product loop bit for bit: the
reference here writes out the Gram recurrences of `newton_schulz.gram_iterations_torch` one product at a time on
the pointer kernels (the same 16-wide reduction blocks and roundings as the fused program's), with
`Q = Z + a I` added in float32 and rounded once (as a GPU's half-precision add of a scalar does). It must also be
as close to the float64 iteration as that loop. The cases cover tiles that divide the matrix and tiles that do
not (24 x 40), one restart and two (the two restarted-X buffers in turn), per-step coefficients (Polar
Express), a square matrix, and a bf16 result; the output is poisoned with NaN, so an element left unwritten
fails. The GPU checks are in test_kernels_gpu.py (`-k fused`).
"""

from __future__ import annotations

import pytest
import torch
from interpreter_child import interpreter_results

# (batch, m, n), steps, restarts, schedule, result dtype
CASES = (((2, 32, 64), 5, (3,), "keller", "float16"),
         ((2, 24, 40), 7, (3, 6), "polar_express", "bfloat16"),
         ((1, 32, 32), 4, (2,), "keller", "float16"),
         ((3, 16, 48), 2, (), "keller", "bfloat16"))


def _products(X, coeffs, restarts, out_dtype):
    """The Gram recurrences, one product per launch on the pointer kernels."""
    from muon_recipes.optim.kernels.symmetric import launch_symmetric_matmul
    from muon_recipes.optim.kernels.update import launch_update

    R = launch_symmetric_matmul(X, torch.empty(X.shape[0], X.shape[1], X.shape[1], dtype=X.dtype))
    Q = None   # the identity
    last = len(coeffs) - 1
    for step, (a, b, c) in enumerate(coeffs):
        if step in restarts:
            X = launch_update(X, Q, 0.0, torch.empty_like(X))                       # X <- Q X
            R = launch_symmetric_matmul(X, torch.empty_like(R))
            Q = None
        Z = launch_symmetric_matmul(R, torch.empty_like(R), alpha=c, beta=b, c=R)   # b R + c R R
        if Q is None:
            shift = torch.tensor(a, dtype=torch.float32) * torch.eye(Z.shape[-1])
            Q = (Z.float() + shift).to(Z.dtype)
        else:
            Q = launch_symmetric_matmul(Z, torch.empty_like(Q), alpha=1.0, beta=a, c=Q, y=Q)
        if step < last and step + 1 not in restarts:
            RZ = launch_symmetric_matmul(Z, torch.empty_like(R), alpha=1.0, beta=a, c=R, y=R)
            R = launch_symmetric_matmul(Z, torch.empty_like(R), alpha=1.0, beta=a, c=RZ, y=RZ)
    return launch_update(X, Q, 0.0, torch.empty(X.shape, dtype=out_dtype))


def _child() -> None:
    import json

    from muon_recipes.optim.kernels import iterations
    from muon_recipes.optim.kernels.fused_gram import launch_fused_gram
    from muon_recipes.optim.newton_schulz import coefficients, gram_iterations_torch

    def relative(value, reference):
        value = value.double()
        if not torch.isfinite(value).all():
            return float("inf")
        return ((value - reference).norm() / reference.norm()).item()

    torch.manual_seed(0)
    results = []
    for shape, steps, restarts, schedule, out_name in CASES:
        out_dtype = getattr(torch, out_name)
        X = torch.randn(shape, dtype=torch.float64)
        X = (X / X.norm(dim=(-2, -1), keepdim=True)).half()
        coeffs = coefficients(schedule, steps)
        fused = launch_fused_gram(X, coeffs, restarts, torch.full(shape, float("nan"), dtype=out_dtype))
        through_plan = iterations._iterate_gram(X, tuple(coeffs), iterations.FUSED, restarts, out_dtype)
        reference = _products(X, coeffs, restarts, out_dtype)
        exact = gram_iterations_torch(X.double(), coeffs, restarts)
        # How many launches of each product the loop on the pointer kernels makes, against the plan's count.
        counted = dict.fromkeys(("gram", "polynomial", "update", "final"), 0)
        tables = {"gram": iterations._GRAM, "polynomial": iterations._POLYNOMIAL, "update": iterations._UPDATE,
                  "final": iterations._FINAL}
        commuting = iterations._COMMUTING["triton"]
        originals = {name: table["triton"] for name, table in tables.items()}

        def counting(name, fn):
            def run(*args):
                counted[name] += 1
                return fn(*args)
            return run

        for name, table in tables.items():
            table["triton"] = counting(name, originals[name])
        iterations._COMMUTING["triton"] = counting("polynomial", commuting)
        try:
            iterations._iterate_gram(X, tuple(coeffs), iterations.ALL_TRITON, restarts, out_dtype)
        finally:
            for name, table in tables.items():
                table["triton"] = originals[name]
            iterations._COMMUTING["triton"] = commuting
        results.append({"case": f"{shape} {steps} steps, restarts {restarts}, {schedule}, {out_name}",
                        "equal": bool(torch.equal(fused, reference)),
                        "equal_through_plan": bool(torch.equal(through_plan, reference)),
                        "error": relative(fused, exact), "reference_error": relative(reference, exact),
                        "counted": counted,
                        "counts": iterations.gram_product_counts(steps, restarts)})
    print(json.dumps(results))


@pytest.fixture(scope="module")
def results():
    return interpreter_results(__file__)


def test_fused_loop_is_the_product_loop_bit_for_bit(results):
    for case in results:
        assert case["equal"] and case["equal_through_plan"], case


def test_fused_loop_is_as_close_to_float64_as_the_products(results):
    for case in results:
        assert case["error"] <= 1.0001 * case["reference_error"] + 1e-12 and case["error"] < 2e-2, case


def test_the_plan_counts_the_products_the_loop_launches(results):
    for case in results:
        assert case["counted"] == case["counts"], case


def test_bad_shapes_are_refused_before_any_launch():
    from muon_recipes.optim.kernels.fused_gram import launch_fused_gram

    tall = torch.zeros(2, 64, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"m <= n"):
        launch_fused_gram(tall, [(1.0, 0.0, 0.0)], (), torch.empty_like(tall))
    wide = torch.zeros(1, 32, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"same shape"):
        launch_fused_gram(wide, [(1.0, 0.0, 0.0)], (), torch.empty(1, 32, 32, dtype=torch.float16))


def test_where_the_plan_offers_the_fused_loop(monkeypatch):
    """Offered for the Gram form of matrices whose short side is at most FUSED_MAX_SIDE; never with
    MUON_NS_FUSED=0; and after a failure to build it, in no later plan of the process (one warning)."""
    from muon_recipes.optim.kernels import iterations
    from muon_recipes.optim.kernels.fused_gram import FUSED_MAX_SIDE

    monkeypatch.setattr(iterations, "_fused_error", None)
    monkeypatch.delenv("MUON_NS_FUSED", raising=False)
    small, large = (torch.zeros(2, side, 2 * side, dtype=torch.float16) for side in (FUSED_MAX_SIDE, 2 * FUSED_MAX_SIDE))
    assert iterations.fused_gram_offered(small) and not iterations.fused_gram_offered(large)
    assert not iterations.fused_gram_offered(small.mT)   # m > n: the caller transposes first
    monkeypatch.setenv("MUON_NS_FUSED", "0")
    assert not iterations.fused_gram_offered(small)
    monkeypatch.delenv("MUON_NS_FUSED")
    with pytest.warns(RuntimeWarning, match="fused Gram loop failed on \\(2, 512, 1024\\)"):
        iterations._fused_failed(small, RuntimeError("out of resources"))
    assert not iterations.fused_gram_offered(small)


if __name__ == "__main__":
    _child()
