"""Copying a transposed view into a row-major tensor (with a dtype cast) in tiles, so reads and writes coalesce.

Newton-Schulz runs on wide matrices (m <= n), so every tall block (a gate or up half of a fused SwiGLU weight,
5632 x 2048 in dense_1b) is copied transposed into its bucket, and its result copied transposed back. torch's
`dst.copy_(src.mT)` walks the output in order and reads the input with a large stride, far below the memory's
bandwidth (docs/benchmarks.md, "Where a single-GPU step goes"). Here each program loads a
tile with the source's unit-stride axis contiguous and stores it with the destination's; Triton exchanges the
layout through shared memory between the two. The cast rounds to nearest even, as torch's copy does, so the
result is the same bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muon_recipes.optim.dispatch import TRANSPOSE_DTYPES, interpreting
from muon_recipes.optim.kernels.fast_launch import FastLaunch, ceil_div
from muon_recipes.optim.kernels.tile_ops import round_to_output, strided_address, strided_tile

_TILE = 64


@triton.jit
def _transposed_copy_kernel(src_ptr, dst_ptr, R, C,
                            src_stride_b, src_stride_r, src_stride_c,
                            dst_stride_b, dst_stride_r, dst_stride_c,
                            TILE: tl.constexpr, INTERPRETED: tl.constexpr):
    rows, cols, batch, inside = strided_tile(R, C, TILE)
    tile = tl.load(strided_address(src_ptr, batch, rows, cols, src_stride_b, src_stride_r, src_stride_c),
                   mask=inside, other=0.0)
    tl.store(strided_address(dst_ptr, batch, rows, cols, dst_stride_b, dst_stride_r, dst_stride_c),
             round_to_output(tile.to(tl.float32), dst_ptr, INTERPRETED), mask=inside)


_launch_transposed_copy = FastLaunch(_transposed_copy_kernel)


def copy_transposed(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for a column-major `src` (see `dispatch.is_transposed_view`) and a row-major `dst` of the
    same shape.

    Both bf16 or fp32 (any pair); `dst` must not overlap `src`.
    """
    if tuple(dst.shape) != tuple(src.shape) or src.ndim not in (2, 3):
        raise ValueError(f"copy_transposed: shapes {tuple(dst.shape)} and {tuple(src.shape)} must match, 2-D or 3-D")
    if dst.stride(-1) != 1:
        raise ValueError("copy_transposed: dst must have unit stride along its last dim")
    for name, t in (("src", src), ("dst", dst)):
        if t.dtype not in TRANSPOSE_DTYPES:
            raise ValueError(f"copy_transposed: {name}.dtype={t.dtype}: must be torch.bfloat16 or torch.float32")
    s3 = src if src.ndim == 3 else src.unsqueeze(0)
    d3 = dst if dst.ndim == 3 else dst.unsqueeze(0)
    batch, rows, cols = s3.shape
    if batch > 65535:
        raise ValueError(f"copy_transposed: {batch} matrices, at most 65535 per call (the launch grid's batch axis)")
    if s3.numel():
        grid = lambda meta: (ceil_div(rows, meta["TILE"]), ceil_div(cols, meta["TILE"]), batch)  # noqa: E731
        _launch_transposed_copy(grid, (s3, d3, rows, cols, *s3.stride(), *d3.stride()),
                                {"TILE": _TILE, "INTERPRETED": interpreting()})
    return dst
