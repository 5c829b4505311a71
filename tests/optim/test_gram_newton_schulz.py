"""The Gram form of Newton-Schulz against the standard iteration and the exact polar factor.

Three claims, each with an independent reference:
* it is the same iteration: in float64 it equals the standard loop to round-off, for every schedule and
  step count (the restarts included);
* it is stable where it runs: in float16 with its restarts, on matrices with a gradient-like decaying
  spectrum, it lands at least as close to the float64 iteration as the standard loop in bfloat16 does (the
  production default before it), and without the restarts it does not (so the restarts are what holds it);
* `newton_schulz(method="gram")` gives the polar factor of tall and wide matrices, leaves square ones to the
  standard form, and `Muon` passes `ns_method` through.
"""

from __future__ import annotations

import pytest
import torch

from muon_recipes.optim import Muon
from muon_recipes.optim.newton_schulz import (coefficients, gram_iterations_torch, gram_restarts, newton_schulz,
                                              ns_iterations_torch)


def _normalized(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=(-2, -1), keepdim=True)


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())


def _decaying_spectrum(m: int, n: int, power: float, seed: int) -> torch.Tensor:
    """U diag(i^-power) V^T: a gradient-like matrix with a few large and many small singular values."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    s = torch.arange(1, m + 1, dtype=torch.float64) ** -power
    return _normalized(((U * s) @ V.mT).unsqueeze(0))


@pytest.mark.parametrize("schedule", ["keller", "polar_express"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_equals_standard_iteration_in_float64(schedule, steps):
    X = _normalized(torch.randn(3, 24, 61, generator=torch.Generator().manual_seed(steps), dtype=torch.float64))
    coeffs = coefficients(schedule, steps)
    standard = ns_iterations_torch(X, coeffs)
    for restarts in (gram_restarts(steps), ()):
        gram = gram_iterations_torch(X, coeffs, restarts)
        assert torch.allclose(gram, standard, rtol=0, atol=1e-12), (restarts, (gram - standard).abs().max())


def test_restart_schedule():
    assert gram_restarts(5) == (3,)   # one restart in five steps, as in Zhang et al. 2026 (there before the third)
    assert gram_restarts(3) == ()
    assert gram_restarts(8) == (3, 6)
    assert all(1 <= t < steps for steps in range(1, 12) for t in gram_restarts(steps))


@pytest.mark.parametrize("schedule", ["keller", "polar_express"])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_float16_with_restarts_is_as_accurate_as_standard_bfloat16(schedule, power):
    X = _decaying_spectrum(128, 352, power, seed=int(power))
    coeffs = coefficients(schedule, 5)
    exact = ns_iterations_torch(X, coeffs)
    standard_bf16 = _relative_error(ns_iterations_torch(X.to(torch.bfloat16), coeffs), exact)
    gram_fp16 = _relative_error(gram_iterations_torch(X.to(torch.float16), coeffs, gram_restarts(5)), exact)
    assert gram_fp16 <= standard_bf16, (gram_fp16, standard_bf16)
    # Without its restarts the same float16 arithmetic drifts (or overflows to NaN): the restarts are what
    # makes it safe.
    unrestarted = _relative_error(gram_iterations_torch(X.to(torch.float16), coeffs, ()), exact)
    assert not unrestarted <= 2 * gram_fp16, (unrestarted, gram_fp16)


@pytest.mark.parametrize("shape", [(24, 72), (72, 24), (3, 20, 50)])
@pytest.mark.parametrize("schedule", ["keller", "polar_express"])
def test_newton_schulz_gram_matches_standard_and_polar_factor(shape, schedule):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    gram = newton_schulz(G, schedule=schedule, dtype=torch.float32, backend="torch", method="gram")
    standard = newton_schulz(G, schedule=schedule, dtype=torch.float32, backend="torch", method="standard")
    assert gram.shape == G.shape and gram.dtype == torch.float32
    assert _relative_error(gram, standard) < 1e-4
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    cosine = float((gram.double() * (U @ Vh)).sum() / (gram.double().norm() * (U @ Vh).norm()))
    assert cosine > 0.98


def test_square_matrices_keep_the_standard_form():
    G = torch.randn(2, 40, 40, generator=torch.Generator().manual_seed(4))
    gram = newton_schulz(G, dtype=torch.bfloat16, backend="torch", method="gram")
    standard = newton_schulz(G, dtype=torch.bfloat16, backend="torch", method="standard")
    assert torch.equal(gram, standard)


def test_bad_method_is_named():
    with pytest.raises(ValueError, match="method='qr': must be one of gram, standard"):
        newton_schulz(torch.randn(4, 8), method="qr")
    with pytest.raises(ValueError, match="ns_method"):
        Muon([torch.nn.Parameter(torch.randn(4, 8))], ns_method="qr")


def test_muon_step_follows_ns_method():
    """One Muon step with each method equals W - lr * ratio * NS(G) with that method (momentum 0)."""
    G = torch.randn(48, 20, generator=torch.Generator().manual_seed(5))
    for method in ("gram", "standard"):
        W = torch.nn.Parameter(torch.zeros(48, 20))
        W.grad = G.clone()
        Muon([W], lr=0.1, momentum=0.0, nesterov=False, ns_dtype="float32", backend="torch",
             ns_method=method).step()
        expected = -0.1 * (48 / 20) ** 0.5 * newton_schulz(G, dtype=torch.float32, backend="torch", method=method)
        assert torch.allclose(W.detach(), expected, atol=1e-6), method


def test_state_dict_from_before_ns_method_loads():
    """A state dict saved before `ns_method` existed loads and steps, with the constructor's value for it."""
    W = torch.nn.Parameter(torch.randn(8, 16, generator=torch.Generator().manual_seed(6)))
    W.grad = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    saved = Muon([W], ns_dtype="float32", backend="torch")
    saved.step()
    state = saved.state_dict()
    for group in state["param_groups"]:
        del group["ns_method"]
    loaded = Muon([W], ns_dtype="float32", backend="torch", ns_method="standard")
    loaded.load_state_dict(state)
    assert loaded.param_groups[0]["ns_method"] == "standard"
    assert torch.equal(loaded.state[W]["momentum_buffer"], saved.state[W]["momentum_buffer"])
    loaded.step()


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("steps", [2, 5, 8])
def test_block_cost_counts_the_products_that_run(method, steps):
    """`BlockPlan.cost` (which balances Newton-Schulz work across ranks) equals the multiply-adds torch's FLOP
    counter sees in the loop that runs, for a wide, a tall and a square block."""
    from torch.utils.flop_counter import FlopCounterMode

    from muon_recipes.optim.blocks import BlockPlan

    coeffs = coefficients("keller", steps)
    for rows, cols in ((24, 60), (60, 24), (32, 32)):
        m, n = min(rows, cols), max(rows, cols)
        X = _normalized(torch.randn(1, m, n, generator=torch.Generator().manual_seed(8)))
        with FlopCounterMode(display=False) as counter:
            if method == "gram" and rows != cols:
                gram_iterations_torch(X, coeffs, gram_restarts(steps))
            else:
                ns_iterations_torch(X, coeffs)
        plan = BlockPlan.build((rows, cols))
        assert plan.cost(steps, method) == counter.get_total_flops() / 2, (rows, cols)
    # On a GPU, blocks under 512 rows keep the standard form, and the cost says so.
    assert BlockPlan.build((24, 60)).cost(5, "gram", on_cuda=True) == BlockPlan.build((24, 60)).cost(5)
