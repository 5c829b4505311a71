"""Which implementation runs each part of a Muon step: a Triton kernel or torch, the Gram or the standard form.

Every such decision, and every threshold behind it, lives here: the code that does the work asks one of the
questions below instead of probing for kernels itself, so a reader finds in one file why a step took the
path it took. The thresholds are measurements; docs/benchmarks.md holds each one with its device, command
and date, and a new measurement changes the number here and the line there together.

This module imports Triton only when a question needs it, and every answer is False (torch) where Triton is
missing or has nowhere to run, so it loads on any machine. Within the Triton Newton-Schulz path the kernels
also time, once per shape, whether each product runs faster as a Triton kernel or as cuBLAS
(`kernels/iterations.py`, `kernels="auto"`): a measurement on the running device, not a threshold.
"""

from __future__ import annotations

import functools
import os
import types
from typing import Optional, Sequence

import torch

from muon_recipes.choices import BACKENDS

# Element types the kernels read and write (float16 is the Gram form's; the buckets are bf16 or fp32).
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Element types of the tiled transposed copy (the buckets' dtypes).
TRANSPOSE_DTYPES = (torch.bfloat16, torch.float32)
# Newton-Schulz on the Triton kernels under `backend="auto"`: bf16 batches whose small side m is at least this.
# The kernels measured faster than or level with every torch form from m = 256 up (docs/benchmarks.md).
TRITON_NS_MIN_SIDE = 256
# The Gram form on a GPU: blocks whose small side is at least this. Below it its extra small launches cost more
# than the FLOPs it saves (docs/benchmarks.md, "Gram Newton-Schulz"); on a CPU it always applies.
GRAM_MIN_SIDE_CUDA = 512
# The one-pass weight update (`kernels/elementwise.py`) on the path with copies (a sharded step, or MUON_BUCKET_IO=0):
# 2-D weights of at least this many elements. Smaller matrices and 3-D expert weights stay on torch's add there
# (docs/benchmarks.md, "The weight update"). A single-process step applies every weight's update from its buckets
# with the strided form of the same kernel (`bucket_io_on_triton`).
SCALED_ADD_MIN_NUMEL = 1 << 22
# The persistent TMA-fed Newton-Schulz kernels (`kernels/persistent.py`) are timed against the pointer kernels and
# cuBLAS for a shape's plan only from this many rows of its matrices. They were faster from 512 rows up, but each
# shape that offers them compiles them (not ahead, in parallel, as the pointer kernels' tiles are): with 512,
# moe_small's cold first optimizer step took 10.9 s against 6.5 s (docs/benchmarks.md, thresholds table).
PERSISTENT_MIN_SIDE = 1024
# A bucket of matrices with fewer rows than PERSISTENT_MIN_SIDE may run in pieces of at least this many matrices, each
# on its own CUDA stream (`iterations.piece_counts`): its products are too short to fill the GPU on their own.
PIECE_MIN_BATCH = 8


@functools.lru_cache(maxsize=None)
def triton_imports() -> bool:
    """Whether Triton imports here (cached: importing it is slow and its answer does not change)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:   # ImportError, or a broken install that fails while loading its backends
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET must be set before it is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when Triton imports and has somewhere to run: a CUDA device, or its CPU interpreter."""
    return triton_imports() and (torch.cuda.is_available() or interpreting())


def kernels() -> Optional[types.ModuleType]:
    """The kernels package (`muon_recipes.optim.kernels`) once Triton imports, else None."""
    if not triton_imports():
        return None
    try:
        from muon_recipes.optim import kernels as module
    except ImportError:
        return None
    return module


# ----------------------------------------------------------------------------------------------------------------
# Newton-Schulz
# ----------------------------------------------------------------------------------------------------------------
def prefer_triton(X: torch.Tensor) -> bool:
    """Whether the Triton kernels measured faster than torch for a batch X [B, m, n] (or [m, n]): a bf16 CUDA
    tensor whose small side is at least TRITON_NS_MIN_SIDE, with Triton importable. fp32 was not benchmarked."""
    if not isinstance(X, torch.Tensor) or not X.is_cuda or X.ndim not in (2, 3):
        return False
    if X.dtype != torch.bfloat16 or not triton_imports():
        return False
    return min(X.shape[-2], X.shape[-1]) >= TRITON_NS_MIN_SIDE


def newton_schulz_on_triton(X: torch.Tensor, backend: str) -> bool:
    """Whether `newton_schulz(..., backend=backend)` runs this batch on the Triton kernels; an error when the
    backend asks for them and they are missing, or names no backend."""
    if backend == "torch":
        return False
    if backend == "triton":
        if kernels() is None:
            raise RuntimeError("backend='triton': the Triton Newton-Schulz kernels are not available (Triton "
                               "missing or failing to import); use backend='torch' or 'auto'")
        return True
    if backend == "auto":
        return prefer_triton(X) and kernels() is not None
    raise ValueError(f"backend={backend!r}: must be one of {', '.join(BACKENDS)}")


def divide_on_triton(X: torch.Tensor) -> bool:
    """Whether the normalization X / divisor of a batch already bound for the Triton iterations runs as the
    one-pass kernel (`kernels/normalize.py`): contiguous, in a kernel dtype."""
    return X.is_contiguous() and X.dtype in KERNEL_DTYPES


def uses_gram_form(method: str, rows: int, cols: int, on_cuda: bool) -> bool:
    """Whether `newton_schulz(method=method)` runs a rows x cols matrix in the Gram form: non-square, and on a
    GPU at least GRAM_MIN_SIDE_CUDA on its small side (square blocks gain nothing from it)."""
    return method == "gram" and rows != cols and (not on_cuda or min(rows, cols) >= GRAM_MIN_SIDE_CUDA)


# ----------------------------------------------------------------------------------------------------------------
# Memory-bound passes of the step
# ----------------------------------------------------------------------------------------------------------------
def momentum_applies(grad: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether the one-pass momentum kernel takes this pair: same shape and device, contiguous, kernel dtypes,
    on a GPU (or in the interpreter). The kernel's own argument check."""
    return (grad.shape == buf.shape and grad.device == buf.device and grad.is_contiguous()
            and buf.is_contiguous() and grad.dtype in KERNEL_DTYPES and buf.dtype in KERNEL_DTYPES
            and (grad.is_cuda or interpreting()))


def momentum_on_triton(grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor]) -> bool:
    """Whether Muon's momentum runs as the one-pass kernel (`kernels/elementwise.py`) for every pair of a
    group: CUDA tensors, every pair taken by the kernel. Otherwise torch's multi-tensor ops run."""
    return (bool(grads) and grads[0].is_cuda and kernels() is not None
            and all(momentum_applies(g, b) for g, b in zip(grads, bufs)))


def scaled_add_applies(w: torch.Tensor, o: torch.Tensor) -> bool:
    """Whether the one-pass weight update kernel takes this pair (the conditions of `momentum_applies`)."""
    return momentum_applies(o, w)


def scaled_add_on_triton(w: torch.Tensor, o: torch.Tensor) -> bool:
    """Whether W <- decay W + alpha O runs as the one-pass kernel: a 2-D CUDA weight of at least
    SCALED_ADD_MIN_NUMEL elements and an update of its shape, both taken by the kernel."""
    return (w.ndim == 2 and o.shape == w.shape and w.numel() >= SCALED_ADD_MIN_NUMEL and w.is_cuda
            and kernels() is not None and scaled_add_applies(w, o))


def strided_applies(*tensors: torch.Tensor) -> bool:
    """Whether the strided forms of the momentum and the weight update (`kernels/elementwise.py`) take these
    views: 2-D or 3-D, one shape, one device, kernel dtypes, on a GPU (or in the interpreter). Any strides."""
    first = tensors[0]
    return (first.ndim in (2, 3) and (first.is_cuda or interpreting())
            and all(t.shape == first.shape and t.device == first.device and t.dtype in KERNEL_DTYPES
                    for t in tensors))


def bucket_io_mode() -> str:
    """`MUON_BUCKET_IO`: "auto" (unset: the captured step only), "1" (every single-process step) or "0" (none);
    read at each step, so one process can time each."""
    value = os.environ.get("MUON_BUCKET_IO", "auto")
    return value if value in ("0", "1") else "auto"


def bucket_io_on_triton(weight: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, captured: bool) -> bool:
    """Whether a Muon weight of a single-process step moves through its Newton-Schulz buckets without copies: the
    momentum writes each row block's U straight into its bucket, and the update is applied from there
    (`orthogonalize.BucketLayout`, `kernels/elementwise.py`'s strided forms). Any weight, gradient and buffer of one
    shape the strided kernels take, on a GPU or in the interpreter.

    By default only in the step a CUDA graph records (`captured`: lr read from device scalars). There it took
    1.4 ms of GPU time off dense_1b's step and moe_small's captured step from 4.64 to 4.29 ms. An eager step
    pays host time for every block's views and launch instead, and dense_1b's eager step ran 1-3 ms slower with
    it (one H200, docs/benchmarks.md, "Momentum straight into the buckets")."""
    mode = bucket_io_mode()
    if mode == "0" or (mode == "auto" and not captured):
        return False
    return kernels() is not None and strided_applies(weight, grad, buf)


def is_transposed_view(t: torch.Tensor) -> bool:
    """True for a 2-D or 3-D tensor laid out column-major in its last two dims (e.g. `x.mT` of a row-major x)."""
    return t.ndim in (2, 3) and t.stride(-2) == 1 and t.stride(-1) != 1 and t.shape[-2] > 1


def copy_transposed_applies(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether the tiled transposed copy takes this pair: a column-major GPU `src`, a `dst` with unit stride
    along its last dim, both bf16 or fp32. The kernel's own argument check."""
    return (src.is_cuda and is_transposed_view(src) and dst.stride(-1) == 1
            and src.dtype in TRANSPOSE_DTYPES and dst.dtype in TRANSPOSE_DTYPES)


def copy_transposed_on_triton(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether `dst.copy_(src)` runs as the tiled transposed copy (`kernels/transpose.py`), which reads and
    writes coalesced where torch's copy reads a transposed source with a large stride."""
    return src.is_cuda and kernels() is not None and copy_transposed_applies(dst, src)


def fused_adamw(t: torch.Tensor) -> bool:
    """Whether the AdamW groups run torch's fused AdamW kernel (one pass over memory instead of the ~8 of the
    multi-tensor ops): CUDA floating-point tensors, torch >= 2.2."""
    return (t.is_cuda and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and hasattr(torch, "_fused_adamw_"))
