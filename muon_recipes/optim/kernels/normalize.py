"""Dividing every matrix of a batch by its own scalar, in one vectorized pass: the Newton-Schulz normalization.

Before iterating, each matrix X_i of a bucket is divided by (safety * ||X_i||_F + eps). In torch that is
`X / d` with `d` of shape [B, 1, 1] in float32: a broadcast, mixed-dtype elementwise op that takes torch's
generic (non-vectorized) kernel, a fraction of the memory's bandwidth (docs/benchmarks.md, "Where a
single-GPU step goes"). Here each program reads one contiguous
stretch of one matrix and its divisor once, divides in fp32 with correct rounding (`div_rn`, as torch's
true division) and rounds once to the output dtype, so the result equals torch's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muon_recipes.optim.dispatch import KERNEL_DTYPES, interpreting
from muon_recipes.optim.kernels.fast_launch import FastLaunch, ceil_div, programs
from muon_recipes.optim.kernels.tile_ops import block_of_round, pass_rounds, round_to_output

# Elements per program: 16 KB of bf16, enough in flight per SM to saturate HBM with 4 warps.
_BLOCK = 8192


@triton.jit
def _divide_kernel(x_ptr, d_ptr, out_ptr, matrices, per_matrix, rounds, BLOCK: tl.constexpr, ROUNDS: tl.constexpr,
                   INTERPRETED: tl.constexpr):
    chunks = tl.cdiv(per_matrix, BLOCK)
    # Block b is chunk b % chunks of matrix b // chunks; a program takes its own block, and within
    # `fast_launch.bounded_programs` every `num_programs`-th after it.
    for round in range(0, pass_rounds(rounds, ROUNDS, INTERPRETED)):
        block = block_of_round(round).to(tl.int64)
        matrix = block // chunks
        offsets = (block % chunks) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < tl.where(matrix < matrices, per_matrix, 0)   # none in a block past the last matrix
        base = matrix * per_matrix
        x = tl.load(x_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32)
        divisor = tl.load(d_ptr + tl.minimum(matrix, matrices - 1))
        # div_rn takes two tensors of one shape: broadcast the matrix's divisor over the block first.
        quotient = tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * divisor)
        tl.store(out_ptr + base + offsets, round_to_output(quotient, out_ptr, INTERPRETED), mask=inside)


_launch_divide = FastLaunch(_divide_kernel)


def divide_matrices(x: torch.Tensor, divisors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = x[i] / divisors[i] for x [B, m, n] (contiguous, bf16, fp16 or fp32), divisors float32 with B
    elements, rounded once into `out` (x's dtype by default; the Gram form of Newton-Schulz asks for float16).

    Equals `torch.div(x, divisors.view(B, 1, 1), out=out)` exactly; `out` may be `x` itself (in place).
    """
    if x.ndim != 3 or not x.is_contiguous() or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x: expected a contiguous bf16, fp16 or fp32 batch [B, m, n], got {x.dtype} "
                         f"{tuple(x.shape)} (contiguous={x.is_contiguous()})")
    batch = x.shape[0]
    divisors = divisors.reshape(-1)
    if divisors.numel() != batch or divisors.dtype != torch.float32 or divisors.device != x.device:
        raise ValueError(f"divisors: expected {batch} float32 values on {x.device}, got {divisors.numel()} "
                         f"{divisors.dtype} on {divisors.device}")
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape or not out.is_contiguous() or out.dtype not in KERNEL_DTYPES:
        raise ValueError(f"out: expected a contiguous bf16, fp16 or fp32 tensor of shape {tuple(x.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    per_matrix = x.shape[1] * x.shape[2]
    if x.numel():
        blocks = batch * ceil_div(per_matrix, _BLOCK)
        count = programs(blocks, x.device)
        rounds = ceil_div(blocks, count)
        _launch_divide(lambda meta: (count,), (x, divisors.contiguous(), out, batch, per_matrix, rounds),
                       {"BLOCK": _BLOCK, "ROUNDS": rounds if interpreting() else 1, "INTERPRETED": interpreting()})
    return out
