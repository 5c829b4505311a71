"""The Triton Newton-Schulz kernels on a GPU, at real sizes: the interpreter checks of test_kernels.py again,
then the whole 5-step iteration against the torch loop and float64 by its singular-value band.

References: float64 of the same inputs, and the torch loop in the same dtype (`A = X X^T; B = b A + c A A;
X = a X + B X`, written here so the tests depend on no other implementation). Outputs are poisoned with NaN
first so an unwritten element fails. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

KELLER = (3.4445, -4.7750, 2.0315)
# (batch, m, n): aligned, odd (ragged tiles and reduction), and single large.
SHAPES = ((8, 512, 1536), (3, 300, 1000), (1, 2048, 4096))
# fp32 runs as true fp32 (torch's default "highest" matmul precision), bf16 with fp32 accumulation.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def _relative_error(value, reference) -> float:
    value = value.double()
    if not torch.isfinite(value).all():
        return float("inf")
    return ((value - reference.double()).norm() / reference.double().norm()).item()


def _torch_iterations(X, coefficients):
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


def _normalized(batch, m, n, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    X = torch.randn(batch, m, n, device="cuda", generator=generator)
    return (X / X.norm(dim=(-2, -1), keepdim=True)).to(dtype)


def _singular_band(X) -> tuple[float, float]:
    s = torch.linalg.svdvals(X.double())
    return s.min().item(), s.max().item()


@pytest.fixture(autouse=True)
def _true_fp32():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_float64_and_torch(shape, dtype):
    from muon_recipes.optim.kernels import fused_update, symmetric_gram, symmetric_polynomial

    batch, m, n = shape
    X = _normalized(batch, m, n, dtype)
    a, b, c = KELLER
    tolerance = TOLERANCE[dtype]

    A = torch.full((batch, m, m), float("nan"), dtype=dtype, device="cuda")
    symmetric_gram(X, out=A)
    exact = X.double() @ X.double().mT
    assert torch.equal(A, A.mT)
    assert _relative_error(A, exact) <= min(tolerance, 1.25 * _relative_error(X @ X.mT, exact) + 1e-6)

    S = A
    B = torch.full_like(S, float("nan"))
    symmetric_polynomial(S, b, c, out=B)
    exact = b * S.double() + c * S.double() @ S.double()
    assert torch.equal(B, B.mT)
    assert _relative_error(B, exact) <= min(tolerance, 1.25 * _relative_error(b * S + c * (S @ S), exact) + 1e-6)

    Y = torch.full_like(X, float("nan"))
    fused_update(X, B, a, out=Y)
    exact = a * X.double() + B.double() @ X.double()
    assert _relative_error(Y, exact) <= min(tolerance, 1.25 * _relative_error(a * X + B @ X, exact) + 1e-6)


@pytest.mark.parametrize("kernels", ["triton", "auto"])
def test_one_iteration_matches_float64(kernels):
    from muon_recipes.optim.kernels import ns_iterations_triton

    X = _normalized(3, 300, 1000, torch.bfloat16, seed=1)
    before = X.clone()
    ours = ns_iterations_triton(X, [KELLER], kernels=kernels)
    exact = _torch_iterations(X.double(), [KELLER])
    torch_error = _relative_error(_torch_iterations(X, [KELLER]), exact)
    assert _relative_error(ours, exact) <= 1.25 * torch_error + 1e-4
    assert torch.equal(X, before)


@pytest.mark.parametrize("shape", [(16, 256, 1024), (2, 1024, 3072), (1, 2048, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
def test_newton_schulz_band_matches_torch_and_float64(shape):
    """5 Keller steps in bf16: same singular-value band as the torch loop and as float64 arithmetic."""
    from muon_recipes.optim.kernels import ns_iterations_triton

    X = _normalized(*shape, torch.bfloat16, seed=2)
    coefficients = [KELLER] * 5
    ours = ns_iterations_triton(X, coefficients, kernels="triton")
    reference = _torch_iterations(X, coefficients)
    exact = _torch_iterations(X.double(), coefficients)
    ours_band, torch_band, exact_band = _singular_band(ours), _singular_band(reference), _singular_band(exact)
    for ours_edge, torch_edge, exact_edge in zip(ours_band, torch_band, exact_band):
        assert abs(ours_edge - exact_edge) <= max(0.02, 1.25 * abs(torch_edge - exact_edge)), \
            (ours_band, torch_band, exact_band)
    assert _relative_error(ours, exact) <= 1.25 * _relative_error(reference, exact) + 1e-3


@pytest.mark.parametrize("shape", [(64, 128, 512), (1, 512, 2048)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_graph_replay_equals_eager(shape):
    from muon_recipes.optim.kernels import clear_cuda_graphs, ns_iterations_triton

    coefficients = [KELLER] * 5
    first, second = _normalized(*shape, torch.bfloat16, seed=3), _normalized(*shape, torch.bfloat16, seed=4)
    run = dict(kernels="triton")   # the same kernels and tiles in both paths: equal bit for bit
    eager_first = ns_iterations_triton(first, coefficients, cuda_graph=False, **run)
    eager_second = ns_iterations_triton(second, coefficients, cuda_graph=False, **run)
    graph_first = ns_iterations_triton(first, coefficients, cuda_graph=True, **run)    # captures
    graph_second = ns_iterations_triton(second, coefficients, cuda_graph=True, **run)  # replays on new data
    assert torch.equal(graph_first, eager_first)
    assert torch.equal(graph_second, eager_second)
    assert graph_first.data_ptr() != graph_second.data_ptr()
    clear_cuda_graphs()


def test_fast_launch_matches_ordinary_launch():
    """The second launch of a specialization bypasses Triton's dispatch: same bits as the first, and right on
    new tensors of the same shape."""
    from muon_recipes.optim.kernels import symmetric_gram
    from muon_recipes.optim.kernels.symmetric import _launch_symmetric

    first, second = _normalized(5, 200, 760, torch.bfloat16, seed=5), _normalized(5, 200, 760, torch.bfloat16, seed=6)
    ordinary = symmetric_gram(first)                    # compiles, autotunes, remembers the launch
    assert _launch_symmetric.entries, "the fast path did not record the launch"
    assert torch.equal(symmetric_gram(first), ordinary)  # fast path, same input
    fast = symmetric_gram(second)                        # fast path, new buffers
    exact = second.double() @ second.double().mT
    assert _relative_error(fast, exact) <= 1.25 * _relative_error(second @ second.mT, exact) + 1e-6


@pytest.mark.parametrize("timing", ["launch", "graph"])
def test_auto_plan_runs_every_product_correctly(timing, monkeypatch):
    """kernels="auto" may put any product on cuBLAS, whichever way the plan timed them (MUON_NS_PLAN_TIMING);
    the standard and the Gram iterations must still match float64."""
    from muon_recipes.optim.kernels import gram_iterations_triton, ns_iterations_triton
    from muon_recipes.optim.kernels.iterations import _plans
    from muon_recipes.optim.newton_schulz import gram_iterations_torch

    monkeypatch.setenv("MUON_NS_PLAN_TIMING", timing)
    monkeypatch.setenv("MUON_NS_PLAN_CACHE", "0")   # timed here, not read from an earlier run
    _plans.clear()
    X = _normalized(64, 128, 512, torch.bfloat16, seed=7)
    ours = ns_iterations_triton(X, [KELLER] * 2, kernels="auto")
    assert any(key[1:4] == (64, 128, 512) for key in _plans)
    exact = _torch_iterations(X.double(), [KELLER] * 2)
    assert _relative_error(ours, exact) <= 1.25 * _relative_error(_torch_iterations(X, [KELLER] * 2), exact) + 1e-3
    gram = gram_iterations_triton(X.half(), [KELLER] * 3, (2,), kernels="auto")
    gram_exact = _torch_iterations(X.double(), [KELLER] * 3)
    torch_gram = gram_iterations_torch(X.half(), [KELLER] * 3, (2,))
    assert _relative_error(gram, gram_exact) <= 1.25 * _relative_error(torch_gram, gram_exact) + 1e-3


@pytest.mark.parametrize("pieces", ["1", "auto"])
def test_plans_are_kept_on_disk_and_read_back(pieces, tmp_path, monkeypatch):
    """A plan timed in one process is stored; the next process (here: the same one, its plans dropped) reads it
    instead of timing, runs the same products in the same pieces, and gets the same result bit for bit. With
    MUON_NS_PIECES=auto the plan times the loop in pieces too (64 matrices of 128 rows: 1, 2 or 4 pieces)."""
    from muon_recipes.optim.kernels import ns_iterations_triton, plan_store
    from muon_recipes.optim.kernels.iterations import _plans, piece_counts

    monkeypatch.setattr(plan_store, "directory", lambda: tmp_path)
    monkeypatch.setenv("MUON_NS_PLAN_CACHE", "1")
    monkeypatch.setenv("MUON_NS_PIECES", pieces)
    _plans.clear()
    X = _normalized(64, 128, 512, torch.bfloat16, seed=8)
    before = plan_store.snapshot()
    first = ns_iterations_triton(X, [KELLER] * 2, kernels="auto")
    assert (plan_store.STATS.timed, plan_store.STATS.read) == (before.timed + 1, before.read)
    assert len(list(tmp_path.glob("*.json"))) == 1
    timed = dict(_plans)
    _plans.clear()
    second = ns_iterations_triton(X, [KELLER] * 2, kernels="auto")
    assert (plan_store.STATS.timed, plan_store.STATS.read) == (before.timed + 1, before.read + 1)
    assert _plans == timed
    assert torch.equal(first, second)
    chosen = {plan.pieces for plan in timed.values()}
    assert chosen == {1} if pieces == "1" else chosen <= set(piece_counts(X))
    exact = _torch_iterations(X.double(), [KELLER] * 2)
    assert _relative_error(first, exact) <= 1.25 * _relative_error(_torch_iterations(X, [KELLER] * 2), exact) + 1e-3


@pytest.mark.parametrize("pieces", ["2", "4"])
def test_pieces_on_streams(pieces, monkeypatch):
    """A bucket cut into pieces, each on its own CUDA stream (MUON_NS_PIECES), matches float64 as the whole batch's
    loop does, and gives the same result bit for bit launched, through the graph runner, and captured inside a
    caller's graph as the optimizer's captured step runs it, over replays on changing inputs. A missing wait between
    the streams would show there as a race (a result read before a piece wrote it, a buffer reused while a piece
    still read it). (Not bit for bit against the whole batch: a piece's own tile search may pick another reduction
    tile; the interpreter tests hold the pieces to the whole batch bit for bit.)"""
    from muon_recipes.optim.kernels import clear_cuda_graphs, gram_iterations_triton, ns_iterations_triton
    from muon_recipes.optim.newton_schulz import gram_iterations_torch

    X = _normalized(37, 128, 512, torch.bfloat16, seed=21)   # 37: a ragged last piece
    exact = _torch_iterations(X.double(), [KELLER] * 3)
    runs = {"standard": (lambda x, **kw: ns_iterations_triton(x, [KELLER] * 3, kernels="triton", **kw),
                         _torch_iterations(X, [KELLER] * 3)),
            "gram": (lambda x, **kw: gram_iterations_triton(x.half(), [KELLER] * 3, (2,), kernels="triton",
                                                            out_dtype=torch.bfloat16, **kw),
                     gram_iterations_torch(X.half(), [KELLER] * 3, (2,)))}
    monkeypatch.setenv("MUON_NS_PIECES", pieces)
    for name, (run, torch_result) in runs.items():
        eager = run(X, cuda_graph=False)
        assert _relative_error(eager, exact) <= 1.25 * _relative_error(torch_result, exact) + 1e-3, name
        flipped = run(torch.flip(X, dims=(0,)), cuda_graph=False)
        assert torch.equal(run(X, cuda_graph=True), eager), name
        static = X.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(static, cuda_graph=False)
        for _ in range(3):
            static.copy_(torch.flip(X, dims=(0,)))
            graph.replay()
            assert torch.equal(captured, flipped), name
            static.copy_(X)
            graph.replay()
            assert torch.equal(captured, eager), name
    clear_cuda_graphs()


@pytest.mark.parametrize("shape", [(48, 2048, 5632), (3, 17, 45)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_divide_matrices_equals_torch(shape, dtype):
    """The normalization kernel gives torch's one-pass division bit for bit (one fp32 division, one rounding)."""
    from muon_recipes.optim.kernels import divide_matrices

    generator = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(shape, device="cuda", generator=generator).to(dtype)
    divisors = torch.rand(shape[0], device="cuda", generator=generator) * 300 + 1e-3
    expected = torch.div(x, divisors.view(-1, 1, 1), out=torch.empty_like(x))
    assert torch.equal(divide_matrices(x, divisors), expected)


@pytest.mark.parametrize("shape, source_dtype, target_dtype", [
    ((1, 2048, 5632), torch.float32, torch.bfloat16),   # a dense_1b gate block into its bucket
    ((8, 768, 2048), torch.bfloat16, torch.bfloat16),   # expert down blocks back from their bucket
    ((3, 17, 45), torch.float32, torch.float32),
], ids=str)
def test_copy_transposed_equals_torch(shape, source_dtype, target_dtype):
    """The tiled transpose-copy gives torch's copy_ bit for bit (same round-to-nearest-even cast)."""
    from muon_recipes.optim.kernels.transpose import copy_transposed

    batch, m, n = shape
    source = torch.randn(batch, n, m, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9))
    source = source.to(source_dtype).mT
    expected = torch.empty(shape, dtype=target_dtype, device="cuda").copy_(source)
    out = torch.full(shape, float("nan"), dtype=target_dtype, device="cuda")
    assert torch.equal(copy_transposed(out, source), expected)


# ---------------------------------------------------------------- the Gram form (float16, with restarts)

def _decaying(batch, m, n, power, seed):
    """U diag(i^-power) V^T per matrix, normalized, float64: a gradient-like spectrum."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(batch, m, m, device="cuda", dtype=torch.float64, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(batch, n, m, device="cuda", dtype=torch.float64, generator=generator))
    s = torch.arange(1, m + 1, device="cuda", dtype=torch.float64) ** -power
    X = (U * s.unsqueeze(-2)) @ V.mT
    return X / X.norm(dim=(-2, -1), keepdim=True)


@pytest.mark.parametrize("schedule", ["keller", "polar_express"])
@pytest.mark.parametrize("shape, power", [((4, 512, 2048), 2.0), ((4, 1024, 2816), 1.0), ((2, 2048, 5632), 1.0),
                                          ((2, 2048, 5632), 0.0)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"power{v}")
def test_gram_form_is_as_accurate_as_standard_bfloat16(shape, power, schedule):
    """What newton_schulz(method="gram") runs (float16, restarts) against the standard loop in bf16 (the
    other production path) and the Gram form in torch, all measured from the float64 standard iteration."""
    from muon_recipes.optim.kernels import gram_iterations_triton, ns_iterations_triton
    from muon_recipes.optim.newton_schulz import coefficients, gram_iterations_torch, gram_restarts

    X = _decaying(*shape, power, seed=8)
    coeffs, restarts = coefficients(schedule, 5), gram_restarts(5)
    exact = _torch_iterations(X, coeffs)
    gram = gram_iterations_triton(X.half(), coeffs, restarts)
    standard = ns_iterations_triton(X.bfloat16(), coeffs)
    torch_gram = gram_iterations_torch(X.half(), coeffs, restarts)
    errors = {name: _relative_error(value, exact) for name, value in
              (("gram", gram), ("standard_bf16", standard), ("torch_gram", torch_gram))}
    assert errors["gram"] <= errors["standard_bf16"], errors
    assert errors["gram"] <= 1.25 * errors["torch_gram"] + 1e-3, errors
    bands = [_singular_band(v) for v in (gram, standard, exact)]
    for gram_edge, standard_edge, exact_edge in zip(*bands):
        assert abs(gram_edge - exact_edge) <= max(0.02, 1.25 * abs(standard_edge - exact_edge)), bands


def test_newton_schulz_gram_path_on_gpu():
    """The whole call (bf16 in, normalization into float16, tall blocks transposed, bf16 out) against the
    exact polar factor's neighbourhood: the same distance from the float64 iteration as the standard form."""
    from muon_recipes.optim.newton_schulz import coefficients, newton_schulz

    G = _decaying(3, 768, 2048, 1.0, seed=9).mT.contiguous().float()   # tall, as gate/up blocks
    exact = _torch_iterations((G / G.norm(dim=(-2, -1), keepdim=True)).double().mT, coefficients("keller", 5)).mT
    gram = newton_schulz(G, dtype=torch.bfloat16, backend="triton", method="gram")
    standard = newton_schulz(G, dtype=torch.bfloat16, backend="triton", method="standard")
    assert gram.dtype == torch.bfloat16 and gram.shape == G.shape
    assert _relative_error(gram, exact) <= _relative_error(standard, exact), (
        _relative_error(gram, exact), _relative_error(standard, exact))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_commuting_product_matches_float64(dtype):
    from muon_recipes.optim.kernels import commuting_product

    generator = torch.Generator(device="cuda").manual_seed(10)
    S = torch.randn(6, 700, 700, device="cuda", dtype=torch.float64, generator=generator) / 700
    S = torch.triu(S) + torch.triu(S, 1).mT
    Z, Q = (-4.775 * S + 2.0315 * S @ S).to(dtype), (S + 2.0 * S @ S).to(dtype)
    out = torch.full_like(Z, float("nan"))
    commuting_product(Z, Q, 3.4445, out=out)
    exact = Z.double() @ Q.double() + 3.4445 * Q.double()
    assert torch.equal(out, out.mT)
    assert _relative_error(out, exact) <= 1.25 * _relative_error(Z @ Q + 3.4445 * Q, exact) + 1e-6


@pytest.mark.parametrize("m", [1024, 700], ids=["even", "ragged"])
def test_every_symmetric_tile_matches_float64(m):
    """Every tile the autotuner may pick for the symmetric kernel, forced one at a time, so each epilogue path
    (square and wide tiles on the diagonal, masked edges) runs on the GPU whatever the autotuner prefers."""
    from muon_recipes.optim.kernels.symmetric import launch_symmetric_matmul
    from muon_recipes.optim.kernels.tuning import matmul_configs, prune_configs

    generator = torch.Generator(device="cuda").manual_seed(11)
    S = torch.randn(4, m, m, device="cuda", dtype=torch.float64, generator=generator) / m
    S = torch.triu(S) + torch.triu(S, 1).mT
    Z, Q = (-4.775 * S + 2.0315 * S @ S).half(), (S + 2.0 * S @ S).half()
    exact = Z.double() @ Q.double() + 3.4445 * Q.double()
    tiles = prune_configs(matmul_configs(), {"M": m, "K": m, "x_ptr": Z}, INPUT_PRECISION="tf32")
    assert any(c.kwargs["BLOCK_N"] == 2 * c.kwargs["BLOCK_M"] for c in tiles)   # wide tiles are among them
    for config in tiles:
        out = torch.full_like(Z, float("nan"))
        launch_symmetric_matmul(Z, out, alpha=1.0, beta=3.4445, c=Q, y=Q,
                                tile={**config.kwargs, "num_warps": config.num_warps,
                                      "num_stages": config.num_stages})
        assert torch.equal(out, out.mT), config
        assert _relative_error(out, exact) <= 1.25 * _relative_error(Z @ Q + 3.4445 * Q, exact) + 1e-6, config


def test_gram_cuda_graph_replay_equals_eager():
    from muon_recipes.optim.kernels import clear_cuda_graphs, gram_iterations_triton

    coefficients, restarts = [KELLER] * 5, (3,)
    first, second = _normalized(8, 512, 2048, torch.float16, seed=11), _normalized(8, 512, 2048, torch.float16, seed=12)
    run = dict(kernels="triton")
    eager = [gram_iterations_triton(x, coefficients, restarts, cuda_graph=False, **run) for x in (first, second)]
    graph = [gram_iterations_triton(x, coefficients, restarts, cuda_graph=True, **run) for x in (first, second)]
    assert torch.equal(graph[0], eager[0]) and torch.equal(graph[1], eager[1])
    clear_cuda_graphs()


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_update_matches_torch(nesterov):
    """Muon's one-pass momentum against torch's three multi-tensor ops, at the size of a gate block; the
    second call takes FastLaunch's direct path."""
    from muon_recipes.optim.kernels import momentum_update

    generator = torch.Generator(device="cuda").manual_seed(13)
    for call in range(2):
        grad = torch.randn(5632, 2048, device="cuda", generator=generator)
        buf = torch.randn(5632, 2048, device="cuda", generator=generator)
        reference_buf = buf.clone().mul_(0.95).add_(grad)
        reference = (torch.add(grad, reference_buf, alpha=0.95) if nesterov else reference_buf).bfloat16()
        previous = buf.clone()
        bound = 2.0 ** -22 * (0.95 * buf.abs() + grad.abs())   # a few float32 roundings of the inputs' size
        update = momentum_update(grad, buf, 0.95, nesterov, torch.bfloat16)
        # float32 buffers: at most the difference of one fused multiply-add against two rounded operations
        assert bool(((buf - reference_buf).abs() <= bound).all()), (call, (buf - reference_buf).abs().max())
        # the bf16 update: equal but for ties of that last float32 bit
        mismatch = (update != reference).float().mean().item()
        assert update.dtype == torch.bfloat16 and mismatch < 1e-3, (call, mismatch)
        # and as close to the float64 update as torch's
        exact_buf = 0.95 * previous.double() + grad.double()
        exact = grad.double() + 0.95 * exact_buf if nesterov else exact_buf
        assert _relative_error(update, exact) <= 1.01 * _relative_error(reference, exact), call


def test_scaled_add_matches_float64():
    """W <- decay W + alpha O for a float32 weight and a bf16 update, at the size of a gate block."""
    from muon_recipes.optim.kernels import scaled_add_

    generator = torch.Generator(device="cuda").manual_seed(14)
    for _ in range(2):   # the second call takes FastLaunch's direct path
        weight = torch.randn(5632, 2048, device="cuda", generator=generator)
        update = torch.randn(5632, 2048, device="cuda", generator=generator).bfloat16()
        exact = 0.999 * weight.double() - 0.02 * update.double()
        reference = weight.clone().mul_(0.999).add_(update, alpha=-0.02)
        ours = scaled_add_(weight, update, alpha=-0.02, decay=0.999)
        assert ours.data_ptr() == weight.data_ptr()
        assert _relative_error(ours, exact) <= 1.01 * _relative_error(reference, exact) + 1e-9


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_and_update_through_a_transposed_slot_equal_the_one_pass_kernels(nesterov):
    """The strided forms at the size of a gate block (5632 x 2048, tall): the momentum written transposed into a
    bf16 bucket slot equals the one-pass momentum followed by the tiled transposed copy, and the weight update
    read back transposed equals the one-pass update from a row-major copy, bit for bit; twice, so the second
    call takes FastLaunch's direct path."""
    from muon_recipes.optim.kernels import copy_transposed, momentum_into, momentum_update, scaled_add_

    generator = torch.Generator(device="cuda").manual_seed(15)
    for _ in range(2):
        grad = torch.randn(5632, 2048, device="cuda", generator=generator)
        buf = torch.randn(5632, 2048, device="cuda", generator=generator)
        weight = torch.randn(5632, 2048, device="cuda", generator=generator)
        slot = torch.full((2048, 5632), float("nan"), dtype=torch.bfloat16, device="cuda")
        expected_buf = buf.clone()
        expected = momentum_update(grad, expected_buf, 0.95, nesterov, torch.bfloat16)
        momentum_into(grad, buf, slot.mT, 0.95, nesterov)
        assert torch.equal(buf, expected_buf) and torch.equal(slot.mT, expected)
        row_major = copy_transposed(torch.empty(5632, 2048, dtype=torch.bfloat16, device="cuda"), slot.mT)
        expected_weight = scaled_add_(weight.clone(), row_major, alpha=-0.02, decay=0.999)
        assert torch.equal(scaled_add_(weight, slot.mT, alpha=-0.02, decay=0.999), expected_weight)


_TILE_SEARCH_SCRIPT = r"""
import json, torch
from muon_recipes.optim.kernels import tile_search
from muon_recipes.optim.kernels.iterations import ns_iterations_triton, triton_launches
X = torch.randn(8, 512, 1536, device="cuda")
X = (X / X.norm(dim=(-2, -1), keepdim=True)).to(torch.bfloat16)
coefficients = [(3.4445, -4.7750, 2.0315)] * 5
start = tile_search.progress()
tile_search.compile_candidates(triton_launches(X, coefficients))
compiled = tile_search.progress()
Y = ns_iterations_triton(X, coefficients, kernels="triton")
torch.cuda.synchronize()
searched = tile_search.progress()
def loop(Z):
    for a, b, c in coefficients:
        A = Z @ Z.mT
        Z = a * Z + (b * A + c * (A @ A)) @ Z
    return Z
exact = loop(X.double())
error = ((Y.double() - exact).norm() / exact.norm()).item()
torch_error = ((loop(X).double() - exact).norm() / exact.norm()).item()
print(json.dumps({"precompiled_binaries": compiled.binaries - start.binaries,
                  "search_binaries": searched.binaries - compiled.binaries,
                  "searches": searched.stats.searches, "timed": searched.stats.timed,
                  "choices": searched.choices - start.choices, "error": error, "torch_error": torch_error,
                  "line": tile_search.describe(start, searched)}))
"""


@pytest.mark.parametrize("mode", ["bounded", "heuristic", "full"])
def test_tile_candidates_compile_ahead_and_the_search_only_times(mode, tmp_path):
    """In a fresh process with an empty Triton cache: compiling a loop's launches ahead builds every candidate
    binary, so the searches that follow compile nothing more; each search times at most the mode's candidates
    (none for `heuristic`), and the tiles chosen compute the iteration as accurately as the torch loop in bf16,
against float64."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from muon_recipes.optim.kernels.tuning import BOUNDED_CANDIDATES

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, MUON_NS_AUTOTUNE=mode, TRITON_CACHE_DIR=str(tmp_path / "triton"),
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _TILE_SEARCH_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["choices"] == 3, result              # X X^T, b A + c A A and a X + B X: three problem keys
    assert result["precompiled_binaries"] >= 3 and result["search_binaries"] == 0, result
    per_key = {"bounded": BOUNDED_CANDIDATES, "heuristic": 0, "full": 11}[mode]
    assert result["timed"] <= 3 * per_key, result
    if mode != "heuristic":
        assert result["searches"] == 3 and result["timed"] >= 3, result
    assert result["error"] <= 1.25 * result["torch_error"] + 1e-3, result


_COMPILE_AHEAD_SCRIPT = r"""
import json, torch
from torch import nn
from muon_recipes.optim import Muon
from muon_recipes.optim.blocks import BlockPlan
from muon_recipes.optim.kernels import tile_search
from muon_recipes.optim.orthogonalize import NSSettings, compile_ahead
torch.manual_seed(0)
experts = nn.Parameter(torch.randn(9, 768, 512, device="cuda"))     # 9 tall blocks: a Gram-form bucket (float16)
qkv = nn.Parameter(torch.randn(1024, 512, device="cuda"))           # q 512 x 512, k and v 256 x 512
plain = nn.Parameter(torch.randn(512, 512, device="cuda"))          # joins q's bucket
opt = Muon([dict(params=[qkv], split_sizes=(512, 256, 256)), dict(params=[plain, experts])], lr=0.02)
for p in (experts, qkv, plain):
    p.grad = torch.randn_like(p)
ns = NSSettings(5, "keller", torch.bfloat16, "auto", 1e-7, "gram")
jobs = [(BlockPlan.build(qkv.shape, (512, 256, 256)), ns, qkv.device), (BlockPlan.build(plain.shape), ns, qkv.device),
        (BlockPlan.build(experts.shape), ns, qkv.device)]
start = tile_search.progress()
compile_ahead(jobs)
ahead = tile_search.progress()
opt.step()
torch.cuda.synchronize()
stepped = tile_search.progress()
print(json.dumps({"ahead": ahead.binaries - start.binaries, "in_step": stepped.binaries - ahead.binaries,
                  "choices": stepped.choices - start.choices, "searches": stepped.stats.searches,
                  "finite": all(bool(torch.isfinite(p).all()) for p in (experts, qkv, plain)),
                  "line": tile_search.describe(start, stepped)}))
"""


def test_the_first_step_compiles_every_buckets_candidates_ahead(tmp_path):
    """The ahead-of-time compilation of a whole step covers it: with an empty Triton cache, the step that follows
    (its per-shape dry passes, its cuBLAS-or-Triton plans and its tile searches) builds no further binary."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, MUON_NS_AUTOTUNE="bounded", TRITON_CACHE_DIR=str(tmp_path / "triton"),
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_AHEAD_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Buckets: 2 x 512 x 512 and 2 x 256 x 512 (standard form: 2 + 3 problem keys), 9 x 512 x 768 (Gram form: 3,
    # and a fourth, the last Q X written in bf16, which the plan now times on Triton whichever product wins).
    assert result["choices"] == result["searches"] and result["choices"] == 9, result
    assert result["ahead"] >= 10 and result["in_step"] == 0 and result["finite"], result


def test_transposed_copy_of_one_matrix_after_eight_with_the_same_strides_stays_in_bounds():
    """moe_small with per-expert Muon: the routed experts' gate halves ([8, 768, 512] of [8, 1536, 512]) and the
    shared expert's ([768, 512] of [1536, 512]) are copied transposed into one bucket with one kernel
    specialization; the second copy must run over its one matrix only (FastLaunch evaluates each call's grid).
    The bucket is followed by guard matrices that must stay NaN."""
    from muon_recipes.optim.kernels import copy_transposed

    generator = torch.Generator(device="cuda").manual_seed(11)
    routed = torch.randn(8, 1536, 512, device="cuda", generator=generator).bfloat16()
    shared = torch.randn(1536, 512, device="cuda", generator=generator).bfloat16()
    bucket = torch.full((8 + 1 + 8, 512, 768), float("nan"), device="cuda", dtype=torch.bfloat16)
    gate, shared_gate = routed[:, :768].mT, shared.unsqueeze(0)[:, :768].mT   # as `orthogonalize` cuts them
    assert gate.stride() == shared_gate.stride()
    for _ in range(2):   # the second round takes FastLaunch's direct path for both copies
        copy_transposed(bucket[:8], gate)
        copy_transposed(bucket[8:9], shared_gate)
        torch.cuda.synchronize()
        assert torch.equal(bucket[:8], routed[:, :768].mT)
        assert torch.equal(bucket[8], shared[:768].mT)
        assert bucket[9:].isnan().all(), "the one-matrix copy wrote past its destination"


def test_normalization_of_a_smaller_batch_after_a_larger_one_stays_in_bounds():
    """Two batches with equal matrix sizes (one kernel specialization): the second launch covers its own batch."""
    from muon_recipes.optim.kernels import divide_matrices

    generator = torch.Generator(device="cuda").manual_seed(12)
    large = torch.randn(6, 64, 96, device="cuda", generator=generator)
    small = torch.randn(1, 96, 64, device="cuda", generator=generator)
    for _ in range(2):
        divide_matrices(large, torch.full((6,), 2.0, device="cuda"))
        out = torch.full((3, 96, 64), float("nan"), device="cuda")
        divide_matrices(small, torch.full((1,), 2.0, device="cuda"), out=out[:1])
        torch.cuda.synchronize()
        assert torch.equal(out[0], small[0] / 2)
        assert out[1:].isnan().all(), "the one-matrix division wrote past its output"


# Three of the persistent kernels' tiles that the benchmark times (recipes/bench_newton_schulz.py, PERSISTENT_TILES),
# square, wide and one warpgroup: each must compute the right thing wherever it fits, not only the tiles
# `persistent.tile_for` picks today.
PERSISTENT_TILES = ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
                    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
                    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3})


@pytest.mark.parametrize("m,n", [(1024, 1536), (512, 1000)], ids=["even", "ragged-columns"])
def test_persistent_products_match_float64(m, n):
    """The persistent TMA kernels' symmetric product (with C and a second operand: Z Q + a Q) and update (with
    and without a X, the latter written in bf16 from float16) against float64, no worse than torch in the same
    dtype; the symmetric output exactly symmetric; every element written."""
    from muon_recipes.optim.kernels import persistent

    if not persistent.available():
        pytest.skip("needs a GPU with TMA (sm90+) and Triton with tensor descriptors")
    generator = torch.Generator(device="cuda").manual_seed(12)
    S = torch.randn(4, m, m, device="cuda", dtype=torch.float64, generator=generator) / m
    S = torch.triu(S) + torch.triu(S, 1).mT
    Z, Q = (-4.775 * S + 2.0315 * S @ S).half(), (S + 2.0 * S @ S).half()
    X = _normalized(4, m, n, torch.float16, seed=13)
    symmetric_exact = Z.double() @ Q.double() + 3.4445 * Q.double()
    update_exact = 3.4445 * X.double() + Z.double() @ X.double()
    checked = 0
    for tile in PERSISTENT_TILES:
        if persistent.usable("symmetric", Z, tile):
            out = torch.full_like(Z, float("nan"))
            persistent.launch_symmetric(Z, out, alpha=1.0, beta=3.4445, c=Q, y=Q, tile=tile)
            assert torch.equal(out, out.mT), tile
            assert _relative_error(out, symmetric_exact) <= \
                1.25 * _relative_error(Z @ Q + 3.4445 * Q, symmetric_exact) + 1e-6, tile
            checked += 1
        if persistent.usable("update", X, tile):
            out = torch.full_like(X, float("nan"))
            persistent.launch_update(X, Z, 3.4445, out, tile=tile)
            assert _relative_error(out, update_exact) <= \
                1.25 * _relative_error(3.4445 * X + Z @ X, update_exact) + 1e-6, tile
            q_x = torch.full(X.shape, float("nan"), device="cuda", dtype=torch.bfloat16)
            persistent.launch_update(X, Z, 0.0, q_x, tile=tile)
            exact = Z.double() @ X.double()
            assert _relative_error(q_x, exact) <= 1.25 * _relative_error((Z @ X).bfloat16(), exact) + 1e-6, tile
            checked += 1
    assert checked >= 4


def test_persistent_plan_replays_from_a_cuda_graph():
    """The loop with every product on the persistent kernels, captured and replayed, equals its eager run."""
    from muon_recipes.optim.kernels import persistent
    from muon_recipes.optim.kernels.iterations import Plan, _iterate

    if not persistent.available():
        pytest.skip("needs a GPU with TMA (sm90+) and Triton with tensor descriptors")
    every = Plan(*["persistent"] * 5)
    X = _normalized(4, 1024, 2048, torch.bfloat16, seed=14)
    eager = _iterate(X, (KELLER,) * 3, every)
    static = X.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _iterate(static, (KELLER,) * 3, every)
    graph.replay()
    assert torch.equal(captured, eager)
    assert _relative_error(eager, _torch_iterations(X.double(), (KELLER,) * 3)) < 3e-2
