"""Pieces shared by the kernels' inner loops and epilogues, with the CPU interpreter's quirks handled.

The kernels are tested on CPU under `TRITON_INTERPRET=1`. The interpreter differs from the GPU in three
places that matter here, each handled under the compile-time flag `INTERPRETED` (False on the GPU, where the
branches vanish at compile time):

* it multiplies bf16 tiles as their raw 16-bit integers: upcast to fp32 first (exact, and a tensor-core
  bf16 product is exact in fp32 too, so the result is the same);
* it truncates fp32 -> bf16 instead of rounding to nearest even: round on the bits;
* some versions (3.6 with numpy 2) cannot loop up to a run-time bound: the trip count comes in as a
  constant (`k_tiles`, from a heuristic that is 0 on the GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

from muon_recipes.optim.dispatch import interpreting


@triton.jit
def multiply_accumulate(acc, left, right, INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + left @ right, accumulated in fp32 (true fp32 when INPUT_PRECISION is "ieee", else TF32/bf16)."""
    if INTERPRETED:
        left = left.to(tl.float32)
        right = right.to(tl.float32)
    if INPUT_PRECISION == "ieee":
        acc = tl.dot(left, right, acc, input_precision="ieee")
    else:
        acc = tl.dot(left, right, acc)
    return acc


@triton.jit
def round_to_output(value, out_ptr, INTERPRETED: tl.constexpr):
    """Round an fp32 tile to the element type of `out_ptr`, to nearest even as the GPU's cast does."""
    return round_to(value, out_ptr.dtype.element_ty, INTERPRETED)


@triton.jit
def round_to(value, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """Round an fp32 tile to `dtype` (a pointer's or a tensor descriptor's element type), to nearest even."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(dtype)


@triton.jit
def strided_tile(R, C, TILE: tl.constexpr):
    """This program's TILE x TILE tile of a batch of [R, C] views (grid: row tiles, column tiles, matrices): its
    row and column indices and matrix index in 64-bit (a view of 2^31 elements or more stays addressable) and the
    mask of the elements inside the matrix."""
    rows = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    cols = tl.program_id(1).to(tl.int64) * TILE + tl.arange(0, TILE)
    batch = tl.program_id(2).to(tl.int64)
    return rows, cols, batch, (rows[:, None] < R) & (cols[None, :] < C)


@triton.jit
def pass_rounds(rounds, ROUNDS: tl.constexpr, INTERPRETED: tl.constexpr):
    """Trip count of a pass's loop over its blocks (`fast_launch.bounded_programs`): `rounds` at run time; under
    the interpreter, whose loops take Python numbers only, the same number as a constexpr (as `reduction_tiles`)."""
    if INTERPRETED:
        return ROUNDS
    else:
        return rounds


@triton.jit
def block_of_round(round):
    """The block this program takes in loop round `round`: its own first, then every `num_programs`-th after."""
    return tl.program_id(0) + round * tl.num_programs(0)


@triton.jit
def tile_at(tile, B, R, C, TILE: tl.constexpr):
    """Tile number `tile` of a batch of B [R, C] views (row tiles fastest, then column tiles, then matrices: the
    order of `strided_tile`'s three-dimensional grid): its row and column indices and matrix index in 64-bit, and
    the mask of the elements inside the matrix (none past the last matrix). For a pass that loops over tiles."""
    tile = tile.to(tl.int64)
    row_tiles = tl.cdiv(R, TILE)
    col_tiles = tl.cdiv(C, TILE)
    rows = (tile % row_tiles) * TILE + tl.arange(0, TILE)
    cols = ((tile // row_tiles) % col_tiles) * TILE + tl.arange(0, TILE)
    batch = tile // (row_tiles * col_tiles)
    return rows, cols, batch, (rows[:, None] < tl.where(batch < B, R, 0)) & (cols[None, :] < C)


@triton.jit
def strided_address(ptr, batch, rows, cols, stride_b, stride_r, stride_c):
    """Pointers to the elements (batch, rows, cols) of a view with these strides, as a [rows, cols] tile."""
    return ptr + batch * stride_b + rows[:, None] * stride_r + cols[None, :] * stride_c


@triton.jit
def reduction_tiles(K, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, INTERPRETED: tl.constexpr):
    """Trip count of the loop over the reduction dimension."""
    if INTERPRETED:
        return K_TILES
    else:
        return tl.cdiv(K, BLOCK_K)


def k_tiles_heuristic(args) -> int:
    """K_TILES for the interpreter; a constant 0 on the GPU so it never causes a recompilation."""
    return triton.cdiv(args["K"], args["BLOCK_K"]) if interpreting() else 0
