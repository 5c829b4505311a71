"""The Newton-Schulz loop on the Triton kernels, with an optional CUDA graph per (shape, dtype, schedule).

One iteration (Keller Jordan's Muon; the polynomial X <- a X + b (X X^T) X + c (X X^T)^2 X) is three launches:

    A  = X X^T              symmetric: upper-triangle tiles, mirrored        (symmetric.py)
    B  = b A + c A A        symmetric again, b A fused into the epilogue      (symmetric.py)
    X' = a X + B X          a X fused into the epilogue (Triton or cuBLAS)    (update.py)

Buffers are allocated once per call and X ping-pongs between two of them, so the caller's tensor is never
written. Small matrices are bound by launch latency (15 launches for 5 iterations, each a few microseconds
of GPU work): `cuda_graph=True` captures the whole loop once per (device, shape, dtype, coefficients,
precision) and replays it, which leaves one graph launch, one copy in and one copy out per call.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from muon_recipes.optim.kernels.symmetric import launch_symmetric_matmul
from muon_recipes.optim.kernels.tuning import input_precision, interpreting
from muon_recipes.optim.kernels.update import launch_update, launch_update_cublas

UPDATE_BACKENDS = ("auto", "triton", "cublas")

# (device, batch, m, n, dtype, precision) -> "triton" | "cublas", measured once per process.
_update_choice: dict[tuple, str] = {}
# (device, shape, dtype, coefficients, update, precision) -> captured loop
_graphs: dict[tuple, "_CapturedNewtonSchulz"] = {}


def _check_input(X: torch.Tensor) -> None:
    if not isinstance(X, torch.Tensor) or X.ndim != 3:
        shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"X: expected a batch of matrices [B, m, n], got {shape}")
    batch, m, n = X.shape
    if m > n:
        raise ValueError(f"X.shape={tuple(X.shape)}: needs m <= n (transpose tall matrices before the call)")
    if X.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"X.dtype={X.dtype}: must be torch.bfloat16 or torch.float32")
    if not X.is_contiguous():
        raise ValueError("X: must be contiguous (call .contiguous() first)")
    if batch > 65535:
        raise ValueError(f"X.shape[0]={batch}: at most 65535 matrices per call (the launch grid's batch axis)")
    if not X.is_cuda and not interpreting():
        raise ValueError(f"X.device={X.device}: the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")


def _check_coefficients(coefficients: Sequence) -> tuple[tuple[float, float, float], ...]:
    try:
        coeffs = tuple((float(a), float(b), float(c)) for a, b, c in coefficients)
    except (TypeError, ValueError):
        raise ValueError(f"coefficients={coefficients!r}: must be a sequence of (a, b, c) number triples, "
                         "one per iteration") from None
    return coeffs


def _resolve_update(X: torch.Tensor, A: torch.Tensor, update: str, a: float) -> str:
    """Which backend runs X' = a X + B X for this shape: the caller's choice or the one measured faster."""
    if update not in UPDATE_BACKENDS:
        raise ValueError(f"update={update!r}: must be one of {', '.join(UPDATE_BACKENDS)}")
    if update != "auto":
        return update
    if not X.is_cuda:
        return "triton"
    key = (X.device.index, *X.shape, X.dtype, input_precision(X.dtype))
    choice = _update_choice.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return "triton"   # cannot time inside a capture; the graph runner measures before capturing
        choice = _update_choice[key] = _measure_update(X, A, a)
    return choice


def _measure_update(X: torch.Tensor, B: torch.Tensor, a: float, repeats: int = 5) -> str:
    out = torch.empty_like(X)
    times = {}
    for name, launch in (("triton", launch_update), ("cublas", launch_update_cublas)):
        launch(X, B, a, out)   # compiles and autotunes on the first call
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            launch(X, B, a, out)
            end.record()
        torch.cuda.synchronize()
        times[name] = sorted(s.elapsed_time(e) for s, e in events)[repeats // 2]
    return min(times, key=times.get)


def _iterate(X: torch.Tensor, coeffs: tuple[tuple[float, float, float], ...], update: str) -> torch.Tensor:
    batch, m, n = X.shape
    A = torch.empty((batch, m, m), dtype=X.dtype, device=X.device)
    B = torch.empty_like(A)
    # The Gram matrix must exist before the update backend can be timed on a realistic B.
    launch_symmetric_matmul(X, A)
    backend = _resolve_update(X, A, update, coeffs[0][0])
    launch_update_fn = launch_update if backend == "triton" else launch_update_cublas
    buffers = [torch.empty_like(X), torch.empty_like(X) if len(coeffs) > 1 else None]
    current = X
    for step, (a, b, c) in enumerate(coeffs):
        if step > 0:
            launch_symmetric_matmul(current, A)
        launch_symmetric_matmul(A, B, alpha=c, beta=b, c=A)
        target = buffers[step % 2]
        launch_update_fn(current, B, a, target)
        current = target
    return current


class _CapturedNewtonSchulz:
    """The whole loop for one (shape, dtype, coefficients), captured in a CUDA graph and replayed."""

    def __init__(self, X: torch.Tensor, coeffs, update: str):
        self.input = X.clone()
        # Compile, autotune and choose the update backend outside the capture (none of it can be captured).
        side = torch.cuda.Stream(device=X.device)
        side.wait_stream(torch.cuda.current_stream(X.device))
        with torch.cuda.stream(side):
            _iterate(self.input, coeffs, update)
        torch.cuda.current_stream(X.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = _iterate(self.input, coeffs, update)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        self.input.copy_(X)
        self.graph.replay()
        return self.output.clone()   # the next replay overwrites self.output


def clear_cuda_graphs() -> None:
    """Drop every captured graph (and the memory its buffers hold)."""
    _graphs.clear()


def ns_iterations_triton(X: torch.Tensor, coefficients: Sequence, *, cuda_graph: bool | None = None,
                         update: str = "auto") -> torch.Tensor:
    """Newton-Schulz iterations on a normalized batch X [B, m, n] (m <= n, contiguous, bf16 or fp32).

    Per (a, b, c) of `coefficients`: A = X X^T; B = b A + c A A; X = a X + B X, the same arithmetic as the
    torch loop, with fp32 accumulation and one rounding per product. Returns a new tensor; X is not written.

    cuda_graph: capture the loop per (shape, dtype, coefficients) and replay it (pays off for small,
        launch-bound matrices; costs the graph's buffers for the life of the process). None reads the
        environment variable MUON_NS_CUDA_GRAPH ("1" to enable), default off.
    update: backend of the X' = a X + B X product: "triton" (fused kernel), "cublas" (baddbmm) or "auto"
        (time both once per shape and keep the faster).
    """
    coeffs = _check_coefficients(coefficients)
    _check_input(X)
    if update not in UPDATE_BACKENDS:
        raise ValueError(f"update={update!r}: must be one of {', '.join(UPDATE_BACKENDS)}")
    if not coeffs:
        return X.clone()
    if cuda_graph is None:
        cuda_graph = os.environ.get("MUON_NS_CUDA_GRAPH", "0") == "1"
    if cuda_graph and X.is_cuda and not torch.cuda.is_current_stream_capturing():
        key = (X.device.index, tuple(X.shape), X.dtype, coeffs, update, input_precision(X.dtype))
        runner = _graphs.get(key)
        if runner is None:
            runner = _graphs[key] = _CapturedNewtonSchulz(X, coeffs, update)
        return runner(X)
    return _iterate(X, coeffs, update)
