"""Newton-Schulz orthogonalization: the approximate polar factor U V^T of a batch of matrices.

Muon replaces a matrix update G = U S V^T by (approximately) U V^T. Computing it with an SVD is slow on GPUs;
an odd matrix polynomial iterated a few times, X <- a X + b (X X^T) X + c (X X^T)^2 X, pushes every singular
value of a Frobenius-normalized X towards 1 using nothing but matrix multiplications, and runs fine in bf16.

Two coefficient schedules:

* `keller`: the quintic (3.4445, -4.7750, 2.0315) repeated every step (Keller Jordan, "Muon: An optimizer for
  hidden layers in neural networks", 2024). Chosen to maximize the slope at zero; singular values land in
  roughly [0.7, 1.2] rather than exactly 1, which does not hurt training.
* `polar_express`: a different, minimax-optimal quintic per step (Amsel, Persson, Musco, Gower 2025,
  "The Polar Express: Optimal Matrix Sign Methods and Their Application to the Muon Algorithm",
  arXiv:2505.16932, Implementation 1). Converges to singular values near 1 in the same number of steps.

Two forms of the same iteration (`method`):

* `standard`: the loop above on X, three products per step (`ns_iterations_torch`).
* `gram`: the Gram form (Zhang, Amsel, Chen, Dao 2026, "Gram Newton-Schulz: A Fast, Hardware-Aware
  Newton-Schulz Algorithm for Muon", github.com/Dao-AILab/gram-newton-schulz). Every iterate is
  X_t = Q_t X_0 with Q_t a polynomial in R_0 = X_0 X_0^T, so the loop runs on m x m matrices only:
      Z = b R + c R^2;   Q <- Z Q + a Q;   R <- Z (Z R + a R) + a (Z R + a R)      (all symmetric, commuting)
  and X_0 is touched twice (R_0 = X_0 X_0^T at the start, Q X_0 at the end). Per m x n block that is
  (14 + 6 n/m) m^3 FLOPs for 5 steps against (5 + 15 n/m) m^3 (symmetric counts, one restart),
  a third less for the 2048 x 5632 MLP blocks of `dense_1b`; square blocks gain nothing and keep the
  standard form. In half precision the recurrences for R drift (round-off gives R spurious negative
  eigenvalues that the polynomials amplify), so X is re-formed as Q X and R recomputed every few steps
  (`gram_restarts`: once in 5 steps, as in the source), and the work runs in float16 rather than
  bfloat16: three more mantissa bits at the same speed, and a normalized X and its Gram matrices lie well
  inside float16's range. tests/optim/test_gram_newton_schulz.py holds it to the float64 standard
  iteration; in float16 its singular-value band matches the standard form's in bfloat16, or is tighter.

Layout: each matrix with more rows than columns is transposed first so the Gram matrix X X^T is the small
side (m <= n); the decision is per matrix shape. The per-step loop is `ns_iterations_torch`; a Triton
implementation with the same contract lives in `muon_recipes.optim.kernels`; `backend` and
`muon_recipes.optim.dispatch` choose between them.
"""

from __future__ import annotations

import math

import torch

from typing import Sequence, Union

from muon_recipes.choices import METHODS, SCHEDULES
from muon_recipes.optim import dispatch

# The defaults of `newton_schulz()`, which `Muon` shares: Keller Jordan's 5 quintic steps, in bf16, with his eps
# added to the Frobenius norm before dividing; the Gram form where it applies (see `dispatch.uses_gram_form`).
NS_STEPS = 5
NS_SCHEDULE = "keller"
NS_METHOD = "gram"
NS_DTYPE = torch.bfloat16
NS_EPS = 1e-7

# A schedule is a name from SCHEDULES or the coefficients themselves: one (a, b, c) per iteration.
Schedule = Union[str, Sequence[Sequence[float]]]


# Keller Jordan's Muon (github.com/KellerJordan/Muon, muon.py): one quintic for every step.
KELLER_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Amsel et al. 2025, arXiv:2505.16932, Implementation 1 (also github.com/NoahAmsel/PolarExpress): the
# optimal degree-5 polynomials for the lower singular-value bound l = 1e-3, one per iteration; after the
# eighth they are numerically constant, so later steps repeat the last one.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# The paper's safety factor for bf16 round-off (same source): every polynomial but the last is rescaled as
# p(x / 1.01), i.e. (a / 1.01, b / 1.01^3, c / 1.01^5), and the input is normalized by 1.01 * ||X||_F.
POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

# How much to divide the Frobenius norm by on top of itself before iterating, per schedule.
_NORM_SAFETY = {"keller": 1.0, "polar_express": POLAR_EXPRESS_SAFETY}

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16,
           "float64": torch.float64}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """`torch.bfloat16` or its name `"bfloat16"` -> `torch.bfloat16` (configs and state dicts carry names)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"ns_dtype={dtype!r}: must be one of {', '.join(_DTYPES)} or a torch.dtype")


def check_schedule(schedule: Schedule, key: str = "ns_schedule") -> Union[str, tuple[tuple[float, float, float], ...]]:
    """`schedule` as a name from SCHEDULES, or its coefficients as a tuple of (a, b, c) float triples (hashable,
    so blocks with equal settings still share one batched call); a one-line error naming `key` otherwise."""
    if isinstance(schedule, str):
        if schedule in SCHEDULES:
            return schedule
    else:
        try:
            triples = tuple((float(a), float(b), float(c)) for a, b, c in schedule)
        except (TypeError, ValueError):
            triples = ()
        if triples and all(math.isfinite(x) for triple in triples for x in triple):
            return triples
    raise ValueError(f"{key}={schedule!r}: must be one of {', '.join(SCHEDULES)} (or a non-empty sequence of "
                     "finite (a, b, c) coefficient triples)")


def coefficients(schedule: Schedule, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` iterations of `schedule` (a name, or the triples themselves: a table
    shorter than `steps` repeats its last triple, as Polar Express does after its eighth)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an integer >= 1")
    schedule = check_schedule(schedule, "schedule")
    if schedule == "keller":
        return [KELLER_COEFFICIENTS] * steps
    table = list(POLAR_EXPRESS_COEFFICIENTS) if schedule == "polar_express" else list(schedule)
    return table[:steps] + [table[-1]] * max(0, steps - len(table))


def ns_iterations_torch(X: torch.Tensor, coefficients: list[tuple[float, float, float]]) -> torch.Tensor:
    """Iterate X <- a X + (b A + c A^2) X with A = X X^T on a normalized batch X: [B, m, n], m <= n.

    `baddbmm` fuses each scale-and-add into its matmul: 3 batched matmuls per step, all of [m, m] or [m, n].
    """
    for a, b, c in coefficients:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X


def gram_restarts(steps: int) -> tuple[int, ...]:
    """Iteration indices before which the Gram form re-forms X and R: 3, 6, 9, ... (segments of three steps).

    Zhang et al. 2026 restart 5 steps once, before the third. Restarting before the fourth costs the same
    (one restart either way) and, measured in float16 against the float64 iteration on decaying spectra
    (512 x 1408, Keller and Polar Express schedules), keeps the singular-value band within 0.002 of the exact
    one where the earlier restart let its top edge drift by 0.013: the round-off of the Q and R recurrences
    grows with the steps since the last restart, and the last segment is what reaches the output.
    """
    return tuple(range(3, steps, 3))


def gram_iterations_torch(X: torch.Tensor, coefficients: list[tuple[float, float, float]],
                          restarts: tuple[int, ...]) -> torch.Tensor:
    """The Gram form of `ns_iterations_torch` on a normalized batch X: [B, m, n], m <= n (see the module doc).

    Equal to the standard loop in exact arithmetic: X_t = Q_t X_0 and R_t = X_t X_t^T, with Q, R and every Z
    polynomials in R_0, so they commute and `Z Q` is the `Q Z` of the source.
    """
    R = torch.bmm(X, X.mT)
    Q = None   # the identity
    last = len(coefficients) - 1
    for step, (a, b, c) in enumerate(coefficients):
        if step in restarts:
            X = torch.bmm(Q, X)
            R = torch.bmm(X, X.mT)
            Q = None
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)
        if Q is None:
            Q = Z + a * torch.eye(Z.shape[-1], dtype=Z.dtype, device=Z.device)
        else:
            Q = torch.baddbmm(Q, Z, Q, beta=a)
        if step < last and step + 1 not in restarts:
            RZ = torch.baddbmm(R, Z, R, beta=a)
            R = torch.baddbmm(RZ, Z, RZ, beta=a)
    return torch.bmm(Q, X)


def _route(X: torch.Tensor, backend: str, method: str) -> tuple[bool, bool, torch.dtype]:
    """For a batch X [B, rows, cols] already in the Newton-Schulz dtype: (Triton kernels?, Gram form?, the dtype
    the iterations work in: float16 for the Gram form of a 16-bit dtype, see the module doc)."""
    rows, cols = X.shape[-2:]
    gram = dispatch.uses_gram_form(method, rows, cols, X.is_cuda)
    half = X.dtype in (torch.bfloat16, torch.float16)
    return dispatch.newton_schulz_on_triton(X, backend), gram, torch.float16 if gram and half else X.dtype


def triton_launches(count: int, rows: int, cols: int, steps: int = NS_STEPS, schedule: Schedule = NS_SCHEDULE,
                    dtype: torch.dtype | str = NS_DTYPE, backend: str = "auto", method: str = NS_METHOD,
                    device: torch.device | str = "cuda") -> list[tuple]:
    """The Triton kernel launches (kernel, grid, args, constexprs; one per specialization) that `newton_schulz`
    makes of `count` rows x cols matrices on `device`, recorded without running: none where it runs on torch.
    What `kernels.tile_search.compile_candidates` compiles ahead of a step (`orthogonalize.compile_ahead`).
    The buffers it records with are allocated on `device` for the moment of the call, as the real call's are."""
    dtype = resolve_dtype(dtype)
    m, n = min(rows, cols), max(rows, cols)
    triton, gram, work = _route(torch.empty((1, m, n), dtype=dtype, device=device), backend, method)
    if not triton or count * m * n == 0:
        return []
    from muon_recipes.optim.kernels.iterations import triton_launches as iteration_launches

    X = torch.empty((count, m, n), dtype=work, device=device)
    coeffs = coefficients(schedule, steps)
    if gram:
        return iteration_launches(X, coeffs, gram_restarts(steps), out_dtype=dtype)
    return iteration_launches(X, coeffs)


def _divisors(X: torch.Tensor, schedule: Schedule, eps: float) -> torch.Tensor:
    """Each matrix's divisor (safety * ||X_i||_F + eps), float32 [B, 1, 1], the norm accumulated in float32."""
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    return norm * (_NORM_SAFETY[schedule] if isinstance(schedule, str) else 1.0) + eps


def _divide(X: torch.Tensor, divisors: torch.Tensor, out: torch.Tensor, triton: bool) -> torch.Tensor:
    """out = X / divisors in one pass: the division in float32, rounded once into out's dtype (a plain `X / d`
    would write a float32 copy first and convert it in a second pass). `out` may share X's memory."""
    if triton and dispatch.divide_on_triton(X):
        return dispatch.kernels().divide_matrices(X, divisors, out=out)   # the same numbers, vectorized
    if out.data_ptr() == X.data_ptr():
        return out.copy_(torch.div(X, divisors))
    return torch.div(X, divisors, out=out)


def normalize_(X: torch.Tensor, schedule: Schedule = NS_SCHEDULE, eps: float = NS_EPS, backend: str = "auto",
               method: str = NS_METHOD) -> None:
    """Divide every matrix of the batch X [B, rows, cols] (contiguous, already in the Newton-Schulz dtype) by
    (safety * ||X_i||_F + eps) in place, stored as the dtype the iterations work in: float16 over a bfloat16
    batch for the Gram form (the same element size, so the quotient takes the place of X). X is then ready for
    `newton_schulz(X, ..., normalized=True)` with the same settings.

    Why: a bucket's normalization is a pass over memory of its own (read the norm, read and write the batch); as
    a separate call it can run beside another bucket's products (`step_streams.py`), and in place it needs no
    second batch. The numbers are `newton_schulz`'s own normalization, bit for bit."""
    if X.ndim != 3 or not X.is_contiguous():
        raise ValueError(f"normalize_: X must be a contiguous batch [B, rows, cols], got shape {tuple(X.shape)}")
    triton, _, work = _route(X, backend, method)
    _divide(X, _divisors(X, schedule, eps), X.view(work), triton)


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS, schedule: Schedule = NS_SCHEDULE,
                  dtype: torch.dtype | str = NS_DTYPE, backend: str = "auto",
                  eps: float = NS_EPS, method: str = NS_METHOD, normalized: bool = False) -> torch.Tensor:
    """Approximate polar factor of every matrix in `G` ([..., rows, cols]); same shape, in `dtype`.

    Each matrix is cast to `dtype`, divided by (safety * ||X||_F + eps) so its spectral norm is <= 1 (the
    Frobenius norm bounds it; the norm itself is accumulated in float32), transposed when rows > cols,
    iterated, and transposed back. `method="gram"` iterates in the Gram form on non-square matrices (in
    float16 when `dtype` is a 16-bit type; see the module doc) and in the standard form on square ones and,
    on a GPU, on those whose small side is under `dispatch.GRAM_MIN_SIDE_CUDA`. `schedule` is a name from
    SCHEDULES or the coefficients themselves (see `coefficients`); given coefficients are applied to
    X / (||X||_F + eps), with no safety factor (fold one into them, as Polar Express does, if they need it).
    G is never written, unless `normalized`: then G is a batch that `normalize_` divided in place with the same
    settings (in `dtype`, holding the quotient in the dtype the iterations work in), and the iterations read it
    as it is.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz: G must have at least 2 dims [..., rows, cols], got shape {tuple(G.shape)}")
    dtype = resolve_dtype(dtype)
    coeffs = coefficients(schedule, steps)
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")
    if normalized and G.dtype != dtype:
        raise ValueError(f"newton_schulz(normalized=True): G must be in dtype={dtype} (as `normalize_` left it), "
                         f"got {G.dtype}")
    lead, (rows, cols) = G.shape[:-2], G.shape[-2:]
    X = G.reshape(-1, rows, cols).to(dtype)
    if X.numel() == 0:
        return X.reshape(G.shape)
    triton, gram, work = _route(X, backend, method)
    kernels = dispatch.kernels() if triton else None
    half = dtype in (torch.bfloat16, torch.float16)
    if normalized:
        X = X.view(work)
    else:
        X = _divide(X, _divisors(X, schedule, eps), torch.empty(X.shape, dtype=work, device=X.device), triton)
    transpose = rows > cols
    if transpose:
        X = X.mT
    # CPUs without bf16 matrix units emulate bf16 products (about 10x slower than float32 on the AVX2 test
    # machines), so on CPU the iterations run in float32 on the same dtype-rounded input.
    compute = torch.float32 if X.device.type == "cpu" and half else work
    X = X.to(compute).contiguous()
    if gram:
        restarts = gram_restarts(steps)
        X = (kernels.gram_iterations_triton(X, coeffs, restarts, out_dtype=dtype) if triton
             else gram_iterations_torch(X, coeffs, restarts))
    else:
        X = kernels.ns_iterations_triton(X, coeffs) if triton else ns_iterations_torch(X, coeffs)
    X = X.to(dtype)
    if transpose:
        X = X.mT
    return X.reshape(*lead, rows, cols)
