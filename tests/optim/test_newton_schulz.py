"""Newton-Schulz against the exact polar factor U V^T from a float64 SVD."""

import pytest
import torch

from muon_recipes.optim.newton_schulz import coefficients, newton_schulz, normalize_, ns_iterations_torch


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a * b).sum() / (a.norm() * b.norm()))


# Singular values after 5 steps on well-conditioned Gaussian matrices: Keller's quintic overshoots by
# design (roughly 0.7-1.15), Polar Express lands in roughly 0.87-1.13.
BANDS = {"keller": (0.6, 1.25), "polar_express": (0.8, 1.2)}
MIN_COSINE = {"keller": 0.98, "polar_express": 0.99}


@pytest.mark.parametrize("schedule", ["keller", "polar_express"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(24, 72), (72, 24), (40, 56)])
def test_matches_svd_polar_factor(schedule, dtype, shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    O = newton_schulz(G, steps=5, schedule=schedule, dtype=dtype, backend="torch")
    assert O.shape == G.shape and O.dtype == dtype
    assert cosine(O, polar_factor(G)) > MIN_COSINE[schedule]
    singular = torch.linalg.svdvals(O.double())
    low, high = BANDS[schedule]
    assert low < singular.min() and singular.max() < high, (singular.min(), singular.max())


def test_polar_express_converges_on_ill_conditioned_matrix():
    # Condition number 1e3 is the design range of the published coefficients (l = 1e-3): 8 float32 steps
    # reach the polar factor almost exactly, while Keller's schedule still leaves small singular values behind.
    gen = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen))
    G = U @ torch.diag(torch.logspace(0, -3, 48)) @ V.T
    O = newton_schulz(G, steps=8, schedule="polar_express", dtype=torch.float32, backend="torch")
    singular = torch.linalg.svdvals(O.double())
    assert 0.99 < singular.min() and singular.max() < 1.01
    assert torch.allclose(O.double(), U.double() @ V.double().T, atol=2e-3)
    keller = newton_schulz(G, steps=5, schedule="keller", dtype=torch.float32, backend="torch")
    assert torch.linalg.svdvals(keller.double()).min() < 0.5


def test_batched_equals_looped_and_mixed_orientation():
    G = torch.randn(3, 2, 20, 36, generator=torch.Generator().manual_seed(2))
    batched = newton_schulz(G, dtype=torch.float32, backend="torch")
    assert batched.shape == G.shape
    for i in range(3):
        for j in range(2):
            looped = newton_schulz(G[i, j], dtype=torch.float32, backend="torch")
            torch.testing.assert_close(batched[i, j], looped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["keller", "polar_express"])
def test_transposed_input_gives_transposed_output(schedule):
    G = torch.randn(50, 18, generator=torch.Generator().manual_seed(3))
    tall = newton_schulz(G, schedule=schedule, dtype=torch.float32, backend="torch")
    wide = newton_schulz(G.T, schedule=schedule, dtype=torch.float32, backend="torch")
    torch.testing.assert_close(tall, wide.T, rtol=0, atol=0)
    # For a tall matrix the columns come out orthonormal (O^T O ~ I, the small side).
    gram = tall.double().T @ tall.double()
    assert torch.linalg.eigvalsh(gram).min() > 0.4


def test_scale_invariance_and_zero_matrix():
    G = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    a = newton_schulz(G, dtype=torch.float32, backend="torch")
    b = newton_schulz(1e3 * G, dtype=torch.float32, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    zero = newton_schulz(torch.zeros(8, 12), dtype=torch.float32, backend="torch")
    assert torch.equal(zero, torch.zeros(8, 12))


def test_iterations_follow_the_polynomial():
    # One step of the loop is X -> a X + b (X X^T) X + c (X X^T)^2 X, checked in float64 on its own.
    X = torch.randn(2, 6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) / 10
    (a, b, c), = coefficients("polar_express", 1)
    A = X @ X.mT
    expected = a * X + b * A @ X + c * A @ A @ X
    torch.testing.assert_close(ns_iterations_torch(X, [(a, b, c)]), expected)


def test_coefficient_schedules():
    assert coefficients("keller", 3) == [(3.4445, -4.7750, 2.0315)] * 3
    pe = coefficients("polar_express", 10)
    assert len(pe) == 10 and pe[8] == pe[9] == pe[7]  # the converged polynomial repeats
    assert len(set(pe[:7])) == 7  # one polynomial per early iteration
    with pytest.raises(ValueError, match="schedule='cubic'"):
        coefficients("cubic", 5)
    with pytest.raises(ValueError, match="steps=0"):
        coefficients("keller", 0)




@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalized_in_place_then_iterated_equals_the_whole_call(method, dtype):
    """`normalize_` (a bucket's normalization as a pass of its own, in place: float16 over a bf16 batch for the
    Gram form) and then `newton_schulz(normalized=True)` compute `newton_schulz`'s numbers bit for bit."""
    G = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = newton_schulz(G, dtype=dtype, method=method, backend="torch")
    batch = G.clone()
    normalize_(batch, backend="torch", method=method)
    assert not torch.equal(batch, G)   # divided in place
    assert torch.equal(newton_schulz(batch, dtype=dtype, method=method, backend="torch", normalized=True), expected)
    with pytest.raises(ValueError, match="normalized=True.*must be in dtype"):
        newton_schulz(batch.float() if dtype != torch.float32 else batch.double(), dtype=dtype, normalized=True)
