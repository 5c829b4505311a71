"""Whether the Triton Newton-Schulz kernels can run here, and for which shapes they beat torch.

`prefer_triton` is what `newton_schulz(..., backend="auto")` asks. The rule is measured, not assumed: it
comes from `recipes/bench_newton_schulz.py` on an H100 (bf16, 5 iterations; docs/benchmarks.md holds the
table). Shapes outside the measured range fall back to torch, whose cuBLAS products are never far off.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:   # ImportError, or a broken install that fails while loading its backends
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when Triton imports and has somewhere to run: a CUDA device, or its CPU interpreter."""
    return _triton_imports() and (torch.cuda.is_available() or _interpreting())


def prefer_triton(X: torch.Tensor) -> bool:
    """True when the Triton kernels measured faster than torch for a batch X [B, m, n] (or [m, n]).

    Only on CUDA with Triton importable, for bf16 and fp32 matrices whose small side m is at least
    `MIN_SIDE` (below it every product is a few microseconds of GPU work and the launch count, the same
    for both backends, dominates).
    """
    if not isinstance(X, torch.Tensor) or not X.is_cuda or X.ndim not in (2, 3):
        return False
    if X.dtype not in (torch.bfloat16, torch.float32) or not _triton_imports():
        return False
    m = min(X.shape[-2], X.shape[-1])
    return m >= MIN_SIDE


# Smallest m (the Gram side) at which the kernels beat torch eager; set from the benchmark (see module doc).
MIN_SIDE = 256
