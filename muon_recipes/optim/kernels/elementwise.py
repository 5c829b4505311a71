"""Muon's two elementwise passes, each one pass over memory: the momentum and applying the update.

Momentum, writing the update straight in the Newton-Schulz dtype:

    B <- momentum * B + G;   U = G + momentum * B  (Nesterov)   or   U = B

As three multi-tensor torch ops (`B *= mu`, `B += G`, `U = G + mu B`) this reads and writes float32 seven
times per element and leaves U in float32, which the bucket copy then reads again to cast it (the largest
memory pass of a dense_1b step: docs/benchmarks.md, "Where a single-GPU step goes"). Here one program per
stretch of a tensor reads G and B once, writes B and writes U already rounded to the bucket's dtype (bf16):
14 bytes per element instead of 32, and the bucket copy reads 2 bytes instead of 4.

B is updated in float32 arithmetic and rounded once to its own dtype; U is computed from the unrounded B.
For float32 buffers that is torch's arithmetic up to the contraction of `mu * B + G` into one fused
multiply-add (one rounding instead of two).

Applying the orthogonalized update O (bf16) to a float32 weight W with decoupled weight decay:

    W <- (1 - lr * wd) W - lr * ratio * O

torch's `W.add_(O, alpha=...)` with W float32 and O bf16 is a mixed-dtype add, which runs on torch's
unrolled, unvectorized elementwise kernel (docs/benchmarks.md, "The Gram form of Newton-Schulz and a
one-pass momentum"), plus a separate `mul_` pass when wd > 0. `scaled_add_` reads W and O once and writes W
once, vectorized. `decay` and `alpha` may also be 0-d float32 tensors on the weight's device, read by the kernel
from memory: the form a captured CUDA graph replays with a new lr each step (`muon_recipes.optim.cuda_graph`).

Both passes also exist for strided views (`momentum_into`, and `scaled_add_` on non-contiguous operands): the
momentum of one row block writes U straight into its Newton-Schulz bucket (transposed, for a tall block), and the
update of one block is applied from its bucket, so no copy moves U into a bucket or a result out of one
(`muon_recipes.optim.orthogonalize.BucketLayout`). Those launch one program per TILE x TILE tile with 64-bit
offsets (`tile_ops.strided_tile`, shared with the transposed copy); Triton coalesces each load and store along the axis its pointer has unit stride on and exchanges the
layout through shared memory where the two differ (as `kernels/transpose.py`). The arithmetic is the same
expression as the one-pass kernels', so both forms give the same numbers bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muon_recipes.optim.dispatch import (KERNEL_DTYPES, interpreting, momentum_applies, scaled_add_applies,
                                         strided_applies)
from muon_recipes.optim.kernels.fast_launch import FastLaunch, ceil_div, programs
from muon_recipes.optim.kernels.tile_ops import (block_of_round, pass_rounds, round_to_output, strided_address,
                                                 tile_at)

_BLOCK = 4096
# Tile side of the strided forms (as the transposed copy's).
_TILE = 64


@triton.jit
def _momentum_kernel(grad_ptr, buf_ptr, out_ptr, numel, rounds, momentum,
                     NESTEROV: tl.constexpr, BLOCK: tl.constexpr, ROUNDS: tl.constexpr, INTERPRETED: tl.constexpr):
    for round in range(0, pass_rounds(rounds, ROUNDS, INTERPRETED)):   # see `_pass_launch`
        offsets = block_of_round(round).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        buf = tl.load(buf_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        buf = buf * momentum + grad
        tl.store(buf_ptr + offsets, round_to_output(buf, buf_ptr, INTERPRETED), mask=inside)
        if NESTEROV:
            update = grad + momentum * buf
        else:
            update = buf
        tl.store(out_ptr + offsets, round_to_output(update, out_ptr, INTERPRETED), mask=inside)


_launch_momentum = FastLaunch(_momentum_kernel)


def momentum_update(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool,
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Update `buf` in place (B <- momentum B + G) and return U (Nesterov: G + momentum B, else B) in `dtype`."""
    if not momentum_applies(grad, buf):
        raise ValueError(f"momentum_update: grad {grad.dtype} {tuple(grad.shape)} on {grad.device} and buf "
                         f"{buf.dtype} {tuple(buf.shape)} on {buf.device} must be contiguous float tensors of "
                         "one shape on one CUDA device")
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"dtype={dtype}: must be one of {', '.join(map(str, KERNEL_DTYPES))}")
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device) if out is None else out
    numel = grad.numel()
    if numel:
        grid, rounds, constants = _pass_launch(ceil_div(numel, _BLOCK), grad.device)
        _launch_momentum(grid, (grad, buf, out, numel, rounds, float(momentum)),
                         {"NESTEROV": bool(nesterov), "BLOCK": _BLOCK, "INTERPRETED": interpreting(), **constants})
    return out


@triton.jit
def _momentum_strided_kernel(grad_ptr, buf_ptr, out_ptr, B, R, C,
                             grad_stride_b, grad_stride_r, grad_stride_c,
                             buf_stride_b, buf_stride_r, buf_stride_c,
                             out_stride_b, out_stride_r, out_stride_c, rounds, momentum,
                             NESTEROV: tl.constexpr, TILE: tl.constexpr, ROUNDS: tl.constexpr,
                             INTERPRETED: tl.constexpr):
    for round in range(0, pass_rounds(rounds, ROUNDS, INTERPRETED)):
        rows, cols, batch, inside = tile_at(block_of_round(round), B, R, C, TILE)
        grad_at = strided_address(grad_ptr, batch, rows, cols, grad_stride_b, grad_stride_r, grad_stride_c)
        buf_at = strided_address(buf_ptr, batch, rows, cols, buf_stride_b, buf_stride_r, buf_stride_c)
        grad = tl.load(grad_at, mask=inside, other=0.0).to(tl.float32)
        buf = tl.load(buf_at, mask=inside, other=0.0).to(tl.float32)
        buf = buf * momentum + grad
        tl.store(buf_at, round_to_output(buf, buf_ptr, INTERPRETED), mask=inside)
        if NESTEROV:
            update = grad + momentum * buf
        else:
            update = buf
        out_at = strided_address(out_ptr, batch, rows, cols, out_stride_b, out_stride_r, out_stride_c)
        tl.store(out_at, round_to_output(update, out_ptr, INTERPRETED), mask=inside)


_launch_momentum_strided = FastLaunch(_momentum_strided_kernel)


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    return t if t.ndim == 3 else t.unsqueeze(0)


def _pass_launch(blocks: int, device: torch.device) -> tuple:
    """Grid, loop rounds and ROUNDS of a pass of `blocks` blocks: one program per block, or fewer within
    `fast_launch.bounded_programs`, each program then taking every `programs`-th block from its own in `rounds`
    rounds (`tile_ops.pass_rounds`)."""
    count = programs(blocks, device)
    rounds = ceil_div(blocks, count) if count else 0
    return (lambda meta: (count,)), rounds, {"ROUNDS": rounds if interpreting() else 1}


def _tiles(batch: torch.Tensor) -> int:
    """TILE x TILE tiles of a [B, R, C] view (the strided forms' blocks, `tile_ops.tile_at`)."""
    count, rows, cols = batch.shape
    return count * ceil_div(rows, _TILE) * ceil_div(cols, _TILE)


def momentum_into(grad: torch.Tensor, buf: torch.Tensor, out: torch.Tensor, momentum: float,
                  nesterov: bool) -> torch.Tensor:
    """`momentum_update` into `out`, for 2-D or 3-D views of any strides: B <- momentum B + G in `buf` (in place),
    and U (Nesterov: G + momentum B, else B) rounded once into `out` (a bucket's slot, possibly transposed).

    Contiguous operands take the one-pass kernel; others the tiled strided one. `out` must not overlap the others.
    """
    if not strided_applies(grad, buf, out):
        raise ValueError(f"momentum_into: grad {grad.dtype} {tuple(grad.shape)}, buf {buf.dtype} {tuple(buf.shape)} "
                         f"and out {out.dtype} {tuple(out.shape)} must be 2-D or 3-D float tensors of one shape on "
                         "one CUDA device")
    if grad.is_contiguous() and buf.is_contiguous() and out.is_contiguous():
        return momentum_update(grad, buf, momentum, nesterov, out.dtype, out=out)
    g3, b3, o3 = _as_batch(grad), _as_batch(buf), _as_batch(out)
    if g3.numel():
        grid, rounds, constants = _pass_launch(_tiles(g3), grad.device)
        _launch_momentum_strided(grid, (g3, b3, o3, *g3.shape, *g3.stride(), *b3.stride(), *o3.stride(), rounds,
                                        float(momentum)),
                                 {"NESTEROV": bool(nesterov), "TILE": _TILE, "INTERPRETED": interpreting(),
                                  **constants})
    return out


@triton.jit
def _scaled_add_kernel(w_ptr, o_ptr, numel, rounds, decay, alpha, BLOCK: tl.constexpr, ROUNDS: tl.constexpr,
                       INTERPRETED: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    if SCALARS_IN_MEMORY:   # decay and alpha are pointers to float32 scalars
        decay_value = tl.load(decay)
        alpha_value = tl.load(alpha)
    else:
        decay_value = decay
        alpha_value = alpha
    for round in range(0, pass_rounds(rounds, ROUNDS, INTERPRETED)):
        offsets = block_of_round(round).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        w = tl.load(w_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(w_ptr + offsets, round_to_output(w * decay_value + alpha_value * o, w_ptr, INTERPRETED),
                 mask=inside)


_launch_scaled_add = FastLaunch(_scaled_add_kernel)


@triton.jit
def _scaled_add_strided_kernel(w_ptr, o_ptr, B, R, C, w_stride_b, w_stride_r, w_stride_c,
                               o_stride_b, o_stride_r, o_stride_c, rounds, decay, alpha,
                               TILE: tl.constexpr, ROUNDS: tl.constexpr, INTERPRETED: tl.constexpr,
                               SCALARS_IN_MEMORY: tl.constexpr):
    if SCALARS_IN_MEMORY:
        decay_value = tl.load(decay)
        alpha_value = tl.load(alpha)
    else:
        decay_value = decay
        alpha_value = alpha
    for round in range(0, pass_rounds(rounds, ROUNDS, INTERPRETED)):
        rows, cols, batch, inside = tile_at(block_of_round(round), B, R, C, TILE)
        w_at = strided_address(w_ptr, batch, rows, cols, w_stride_b, w_stride_r, w_stride_c)
        o_at = strided_address(o_ptr, batch, rows, cols, o_stride_b, o_stride_r, o_stride_c)
        w = tl.load(w_at, mask=inside, other=0.0).to(tl.float32)
        o = tl.load(o_at, mask=inside, other=0.0).to(tl.float32)
        tl.store(w_at, round_to_output(w * decay_value + alpha_value * o, w_ptr, INTERPRETED), mask=inside)


_launch_scaled_add_strided = FastLaunch(_scaled_add_strided_kernel)


def scaled_add_(w: torch.Tensor, o: torch.Tensor, alpha: float | torch.Tensor,
                decay: float | torch.Tensor = 1.0) -> torch.Tensor:
    """w <- decay * w + alpha * o in place, in float32 arithmetic, one rounding to w's dtype. `alpha` and `decay`
    are both numbers or both 0-d float32 tensors on w's device (read when the kernel runs).

    Contiguous operands of one shape take the one-pass kernel; 2-D or 3-D views of other strides (a block of a
    fused weight, its result read transposed from a bucket) the tiled strided one, with the same arithmetic."""
    in_memory = isinstance(alpha, torch.Tensor)
    if in_memory != isinstance(decay, torch.Tensor):
        raise ValueError("scaled_add_: alpha and decay must both be numbers or both be tensors")
    if in_memory and not all(t.numel() == 1 and t.dtype == torch.float32 and t.device == w.device
                             for t in (alpha, decay)):
        raise ValueError(f"scaled_add_: tensor alpha and decay must be single float32 values on {w.device}")
    scalars = (decay, alpha) if in_memory else (float(decay), float(alpha))
    constants = {"INTERPRETED": interpreting(), "SCALARS_IN_MEMORY": in_memory}
    if scaled_add_applies(w, o):
        numel = w.numel()
        if numel:
            grid, rounds, loop = _pass_launch(ceil_div(numel, _BLOCK), w.device)
            _launch_scaled_add(grid, (w, o, numel, rounds, *scalars), {"BLOCK": _BLOCK, **constants, **loop})
        return w
    if not strided_applies(w, o):
        raise ValueError(f"scaled_add_: w {w.dtype} {tuple(w.shape)} on {w.device} and o {o.dtype} "
                         f"{tuple(o.shape)} on {o.device} must be float tensors of one shape on one CUDA device "
                         "(contiguous, or 2-D or 3-D views)")
    w3, o3 = _as_batch(w), _as_batch(o)
    if w3.numel():
        grid, rounds, loop = _pass_launch(_tiles(w3), w.device)
        _launch_scaled_add_strided(grid, (w3, o3, *w3.shape, *w3.stride(), *o3.stride(), rounds, *scalars),
                                   {"TILE": _TILE, **constants, **loop})
    return w
