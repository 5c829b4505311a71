"""Whether the Triton Newton-Schulz kernels can run here, and for which shapes they beat torch.

`prefer_triton` is what `newton_schulz(..., backend="auto")` asks. The rule is measured, not assumed: it
comes from `recipes/bench_newton_schulz.py` on an H100 (bf16, 5 iterations, 2026-11-22; docs/benchmarks.md
holds the table). There `ns_iterations_triton` (kernels="auto") was faster than or level with the torch loop,
its baddbmm form and torch.compile for every measured shape, m from 256 (128 x 256 x 1024: 0.71 ms against
0.99 ms at best) to 8192 (17.8 ms against 25.1 ms). Shapes outside that range (m < 256) and fp32 (not
benchmarked) stay on torch.
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

    Only on CUDA with Triton importable, for bf16 matrices whose small side m is at least `MIN_SIDE`.
    """
    if not isinstance(X, torch.Tensor) or not X.is_cuda or X.ndim not in (2, 3):
        return False
    if X.dtype != torch.bfloat16 or not _triton_imports():
        return False
    m = min(X.shape[-2], X.shape[-1])
    return m >= MIN_SIDE


# Smallest m (the Gram side) measured faster than torch; set from the benchmark (see the module doc).
MIN_SIDE = 256
