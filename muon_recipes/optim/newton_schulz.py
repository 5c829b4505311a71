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

Layout: each matrix with more rows than columns is transposed first so the Gram matrix X X^T is the small
side (m <= n); the decision is per matrix shape. The per-step loop is `ns_iterations_torch`; a Triton
implementation with the same contract lives in `muon_recipes.optim.kernels` and is chosen by `backend`.
"""

from __future__ import annotations

import torch

SCHEDULES = ("keller", "polar_express")
BACKENDS = ("auto", "torch", "triton")

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


def coefficients(schedule: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` iterations of `schedule`."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an integer >= 1")
    if schedule == "keller":
        return [KELLER_COEFFICIENTS] * steps
    if schedule == "polar_express":
        table = list(POLAR_EXPRESS_COEFFICIENTS)
        return table[:steps] + [table[-1]] * max(0, steps - len(table))
    raise ValueError(f"schedule={schedule!r}: must be one of {', '.join(SCHEDULES)}")


def ns_iterations_torch(X: torch.Tensor, coefficients: list[tuple[float, float, float]]) -> torch.Tensor:
    """Iterate X <- a X + (b A + c A^2) X with A = X X^T on a normalized batch X: [B, m, n], m <= n.

    `baddbmm` fuses each scale-and-add into its matmul: 3 batched matmuls per step, all of [m, m] or [m, n].
    """
    for a, b, c in coefficients:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X


def triton_kernels():
    """The Triton kernels module, or None when it (or Triton) is not available."""
    try:
        from muon_recipes.optim import kernels
    except ImportError:
        return None
    return kernels


def _use_triton(X: torch.Tensor, backend: str) -> bool:
    """Whether `backend` runs this batch on the Triton kernels (an error when it asks for them and they are
    missing)."""
    if backend == "torch":
        return False
    kernels = triton_kernels()
    if backend == "triton":
        if getattr(kernels, "ns_iterations_triton", None) is None:
            raise RuntimeError("backend='triton': muon_recipes.optim.kernels.ns_iterations_triton is not "
                               "available (Triton missing or kernels not built); use backend='torch' or 'auto'")
        return True
    if backend == "auto":
        prefer = getattr(kernels, "prefer_triton", None)
        return prefer is not None and prefer(X)
    raise ValueError(f"backend={backend!r}: must be one of {', '.join(BACKENDS)}")


def newton_schulz(G: torch.Tensor, steps: int = 5, schedule: str = "keller",
                  dtype: torch.dtype | str = torch.bfloat16, backend: str = "auto",
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximate polar factor of every matrix in `G` ([..., rows, cols]); same shape, in `dtype`.

    Each matrix is cast to `dtype`, divided by (safety * ||X||_F + eps) so its spectral norm is <= 1 (the
    Frobenius norm bounds it; the norm itself is accumulated in float32), transposed when rows > cols,
    iterated, and transposed back.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz: G must have at least 2 dims [..., rows, cols], got shape {tuple(G.shape)}")
    dtype = resolve_dtype(dtype)
    coeffs = coefficients(schedule, steps)
    lead, (rows, cols) = G.shape[:-2], G.shape[-2:]
    X = G.reshape(-1, rows, cols).to(dtype)
    if X.numel() == 0:
        return X.reshape(G.shape)
    triton = _use_triton(X, backend)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    divisor = norm * _NORM_SAFETY[schedule] + eps
    # One pass: the division runs in float32 and rounds once into a fresh `dtype` buffer (a plain `X / norm`
    # would write a float32 copy first and convert it in a second pass). G itself is never written.
    if triton and X.is_contiguous() and dtype in (torch.bfloat16, torch.float32):
        X = triton_kernels().divide_matrices(X, divisor)   # the same numbers, vectorized (kernels/normalize.py)
    else:
        X = torch.div(X, divisor, out=torch.empty_like(X))
    transpose = rows > cols
    if transpose:
        X = X.mT
    # CPUs without bf16 matrix units emulate bf16 products (about 10x slower than float32 on the AVX2 test
    # machines), so on CPU the iterations run in float32 on the same dtype-rounded input.
    compute = torch.float32 if X.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype
    X = X.to(compute).contiguous()
    X = (triton_kernels().ns_iterations_triton(X, coeffs) if triton else ns_iterations_torch(X, coeffs)).to(dtype)
    if transpose:
        X = X.mT
    return X.reshape(*lead, rows, cols)
