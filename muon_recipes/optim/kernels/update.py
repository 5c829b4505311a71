"""The last product of a Newton-Schulz iteration, X' = a X + B X, with the a X term fused into the epilogue.

B is [m, m], X is [m, n]: a plain (non-symmetric) product of 2 m^2 n FLOPs, half the iteration's work. The
kernel reads the tile of X it overwrites in the epilogue (one extra read of X instead of a separate
scale-and-add pass over it) and rounds once; with a = 0 (the Gram form's Q X) it is compiled without that
read. X' must not alias X: every output tile reads a whole column
block of X.

cuBLAS is also at its best on this plain product and fuses the same epilogue (`baddbmm` with beta = a), so
`ns_iterations_triton(kernels="auto")` times both once per shape and keeps the faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muon_recipes.optim.dispatch import interpreting
from muon_recipes.optim.kernels.fast_launch import FastLaunch, ceil_div
from muon_recipes.optim.kernels.symmetric import check_batched, output_buffer
from muon_recipes.optim.kernels.tile_ops import (k_tiles_heuristic, multiply_accumulate, reduction_tiles,
                                                 round_to_output)
from muon_recipes.optim.kernels.tile_search import autotuned
from muon_recipes.optim.kernels.tuning import input_precision


@autotuned(key=["M", "N", "BATCH", "INPUT_PRECISION"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                    "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0, "K_TILES": k_tiles_heuristic})
@triton.jit(do_not_specialize=["BATCH"])   # the grid's batch axis only: no binary per batch size
def _update_kernel(
    b_ptr, x_ptr, out_ptr,
    M, N, K, BATCH,          # out and x: [BATCH, M, N]; b: [BATCH, M, M]; K == M (the reduction over rows of x)
    stride_bb, stride_bm,
    stride_xb, stride_xm,
    stride_ob, stride_om,
    alpha,
    ADD_X: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, K_TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_in = rows % M   # wrapped rows are computed, never stored
    x_batch = x_ptr + batch * stride_xb
    b_ptrs = b_ptr + batch * stride_bb + rows_in[:, None] * stride_bm + offs_k[None, :]   # B[rows, k]  [BM, BK]
    x_ptrs = x_batch + offs_k[:, None] * stride_xm + cols[None, :]                        # X[k, cols]  [BK, BN]
    col_ok = cols[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, reduction_tiles(K, BLOCK_K, K_TILES, INTERPRETED)):
        if EVEN_K:
            b_tile = tl.load(b_ptrs)
            if EVEN_N:
                x_tile = tl.load(x_ptrs)
            else:
                x_tile = tl.load(x_ptrs, mask=col_ok, other=0.0)
        else:
            k_left = K - k * BLOCK_K
            b_tile = tl.load(b_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            x_tile = tl.load(x_ptrs, mask=(offs_k[:, None] < k_left) & col_ok, other=0.0)
        acc = multiply_accumulate(acc, b_tile, x_tile, INPUT_PRECISION, INTERPRETED)
        b_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * stride_xm

    in_bounds = (rows[:, None] < M) & col_ok
    if ADD_X:
        x_own = tl.load(x_batch + rows[:, None] * stride_xm + cols[None, :], mask=in_bounds, other=0.0)
        result = acc + alpha * x_own.to(tl.float32)
    else:   # Q X of the Gram form (a = 0): the tile of X is not read at all
        result = acc
    tl.store(out_ptr + batch * stride_ob + rows[:, None] * stride_om + cols[None, :],
             round_to_output(result, out_ptr, INTERPRETED), mask=in_bounds)


_launch_update = FastLaunch(_update_kernel)


def launch_update(x: torch.Tensor, b: torch.Tensor, a: float, out: torch.Tensor) -> torch.Tensor:
    """out = a * x + b @ x for contiguous x [B, M, N], b [B, M, M]; out must not alias x; no checks."""
    batch, m, n = x.shape

    _launch_update(
        lambda meta: (ceil_div(m, meta["BLOCK_M"]) * ceil_div(n, meta["BLOCK_N"]), batch, 1),
        (b, x, out, m, n, m, batch,
         b.stride(0), b.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1), a),
        {"ADD_X": a != 0.0, "INPUT_PRECISION": input_precision(x.dtype), "INTERPRETED": interpreting()})
    return out


def launch_update_cublas(x: torch.Tensor, b: torch.Tensor, a: float, out: torch.Tensor) -> torch.Tensor:
    """The same product through cuBLAS (`baddbmm` fuses beta * x into the GEMM)."""
    return torch.baddbmm(x, b, x, beta=a, alpha=1.0, out=out)


def fused_update(x: torch.Tensor, b: torch.Tensor, a: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """X' = a x + b x for a batch x [B, m, n] and b [B, m, m] (the Triton kernel; `out` must not alias x)."""
    check_batched("x", x)
    check_batched("b", b)
    batch, m, n = x.shape
    if tuple(b.shape) != (batch, m, m) or b.dtype != x.dtype:
        raise ValueError(f"b: expected a {x.dtype} tensor of shape {(batch, m, m)} for x of shape "
                         f"{tuple(x.shape)}, got {b.dtype} {tuple(b.shape)}")
    out = output_buffer("out", out, x, (batch, m, n))
    if out.data_ptr() == x.data_ptr():
        raise ValueError("out: must not alias x (each output tile reads a whole column block of x)")
    return launch_update(x, b, float(a), out)
