"""Symmetric products of Newton-Schulz: A = X X^T and B = b A + c A A, upper-triangle tiles only.

Both are products of a matrix with its own transpose (A is symmetric, so A A = A A^T), so their results are
symmetric: one kernel, `out = alpha * X Y^T + beta * C` with Y = X, computes only the output tiles that touch
the upper triangle (col >= row) and mirrors them, which halves the work of these two of the three matmuls of
an iteration (4 m^2 n + 2 m^3 FLOPs become 3 m^2 n + m^3 per iteration, the count the benchmark's floor uses).

The same kernel with Y != X serves the Gram form of Newton-Schulz (`iterations.py`), whose m x m matrices are
all polynomials in one symmetric Gram matrix: two of them commute and are symmetric, so their product
Z Q = Z Q^T is symmetric too and again needs only its upper triangle (`commuting_product`).

Each element is written exactly once from one computed value: a tile above the diagonal is stored in place
and mirrored; a square piece on the diagonal is completed in registers from its upper triangle and that
triangle's transpose and stored once (tiles are square or twice as wide as tall, so a wide tile crossing the
diagonal is two such pieces, one of them on it). The output is exactly symmetric (A A^T in the next product
then equals A A bit for bit, whatever the accumulation order), and every store is a full-width vector store;
masking each triangle per element instead compiles to 2-byte stores. The `b A` term of B is fused into the
epilogue: the tile of C is read once, in fp32, and the result rounded to the output dtype once (the torch
reference rounds A A first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muon_recipes.optim.dispatch import KERNEL_DTYPES, interpreting
from muon_recipes.optim.kernels.fast_launch import FastLaunch, ceil_div
from muon_recipes.optim.kernels.tile_ops import (k_tiles_heuristic, multiply_accumulate, reduction_tiles,
                                                 round_to_output)
from muon_recipes.optim.kernels.tile_search import autotuned
from muon_recipes.optim.kernels.tuning import input_precision


@autotuned(key=["M", "K", "BATCH", "INPUT_PRECISION"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                    "EVEN_M": lambda args: args["M"] % args["BLOCK_M"] == 0 and args["M"] % args["BLOCK_N"] == 0,
                    "K_TILES": k_tiles_heuristic})
@triton.jit(do_not_specialize=["BATCH"])   # the grid's batch axis only: no binary per batch size
def _symmetric_matmul_kernel(
    x_ptr, y_ptr, c_ptr, out_ptr,
    M, K, BATCH,
    stride_xb, stride_xm,   # x: [BATCH, M, K], unit stride along K
    stride_yb, stride_ym,   # y: [BATCH, M, K], unit stride along K (y is x for X X^T)
    stride_cb, stride_cm,   # c: [BATCH, M, M], unit stride along the last dim
    stride_ob, stride_om,   # out: [BATCH, M, M], unit stride along the last dim
    alpha, beta,
    HAS_C: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_M: tl.constexpr, K_TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # Grouped ("super-tile") ordering: consecutive programs share row blocks of X in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(M, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    # A tile strictly below the diagonal (its last column < its first row) is the mirror of one above it.
    if (pid_n + 1) * BLOCK_N <= pid_m * BLOCK_M:
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if EVEN_M:   # every tile lies inside the matrix: no bounds arithmetic, no masks
        rows_in = rows
        cols_in = cols
    else:
        # Rows past M wrap around instead of being masked: their values are computed but never stored, and the
        # loads stay unmasked along M.
        rows_in = rows % M
        cols_in = cols % M
    x_batch = x_ptr + batch * stride_xb
    left_ptrs = x_batch + rows_in[:, None] * stride_xm + offs_k[None, :]     # X[rows, k]      [BM, BK]
    right_ptrs = y_ptr + batch * stride_yb + cols_in[None, :] * stride_ym + offs_k[:, None]   # Y[cols, k]^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, reduction_tiles(K, BLOCK_K, K_TILES, INTERPRETED)):
        if EVEN_K:
            left = tl.load(left_ptrs)
            right = tl.load(right_ptrs)
        else:
            k_left = K - k * BLOCK_K
            left = tl.load(left_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            right = tl.load(right_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = multiply_accumulate(acc, left, right, INPUT_PRECISION, INTERPRETED)
        left_ptrs += BLOCK_K
        right_ptrs += BLOCK_K

    result = acc * alpha
    # The epilogue is where the registers run out: the fp32 accumulator, the tile of C and the two store
    # layouts are live at once. With bounds masks on top, 128 x 256 tiles spilled to local memory on Hopper
    # (tests/optim/test_kernels_sm90.py reads the machine code); matrices that the tiles divide evenly (every
    # real block shape) carry no masks at all, the tiles on the diagonal included.
    if EVEN_M:
        in_bounds = None
    else:
        in_bounds = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_C:
        c_ptrs = c_ptr + batch * stride_cb + rows[:, None] * stride_cm + cols[None, :]
        if EVEN_M:
            c_tile = tl.load(c_ptrs)
        else:
            c_tile = tl.load(c_ptrs, mask=in_bounds, other=0.0)
        result += beta * c_tile.to(tl.float32)
    result = round_to_output(result, out_ptr, INTERPRETED)

    out_batch = out_ptr + batch * stride_ob
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    if col0 >= row0 + BLOCK_M:
        # Entirely above the diagonal (most tiles): only the matrix edge masks the stores, so they stay
        # vectorized (a per-element triangle mask would split them into 2-byte stores).
        tl.store(out_batch + rows[:, None] * stride_om + cols[None, :], result, mask=in_bounds)
        tl.store(out_batch + cols[None, :] * stride_om + rows[:, None], result, mask=in_bounds)
    elif BLOCK_M == BLOCK_N:
        _store_upper_square(out_batch, stride_om, result, row0, col0, M, BLOCK_M, EVEN_M)
    else:
        # A wide tile crossing the diagonal is two squares side by side; each is above, on or below it.
        # (Tall tiles are not offered to this kernel: `tuning.prune_configs`.)
        tl.static_assert(BLOCK_N == 2 * BLOCK_M, "symmetric tiles are square or twice as wide as tall")
        left, right = tl.split(tl.permute(tl.reshape(result, (BLOCK_M, 2, BLOCK_M)), (0, 2, 1)))
        _store_upper_square(out_batch, stride_om, left, row0, col0, M, BLOCK_M, EVEN_M)
        _store_upper_square(out_batch, stride_om, right, row0, col0 + BLOCK_M, M, BLOCK_M, EVEN_M)


@triton.jit
def _store_upper_square(out_batch, stride_om, piece, row0, col0, M, SIDE: tl.constexpr, EVEN_M: tl.constexpr):
    """Store a SIDE x SIDE piece of the output whose corner (row0, col0) lies on a multiple of SIDE: above the
    diagonal it goes in place and mirrored; on the diagonal it is its own mirror, so its upper triangle and
    the transpose of that triangle make the whole symmetric piece, stored at once (masking each triangle
    instead would split both stores into 2-byte stores, on 1 tile in 8 or more); below it is the mirror of
    a piece stored by another tile, and nothing is written."""
    rows = row0 + tl.arange(0, SIDE)
    cols = col0 + tl.arange(0, SIDE)
    if EVEN_M:
        in_bounds = None
    else:
        in_bounds = (rows[:, None] < M) & (cols[None, :] < M)
    direct_ptrs = out_batch + rows[:, None] * stride_om + cols[None, :]
    if col0 > row0:
        tl.store(direct_ptrs, piece, mask=in_bounds)
        tl.store(out_batch + cols[None, :] * stride_om + rows[:, None], piece, mask=in_bounds)
    elif col0 == row0:
        tl.store(direct_ptrs, tl.where(cols[None, :] >= rows[:, None], piece, tl.trans(piece)), mask=in_bounds)


_launch_symmetric = FastLaunch(_symmetric_matmul_kernel)


def launch_symmetric_matmul(x: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, beta: float = 0.0,
                            c: torch.Tensor | None = None, y: torch.Tensor | None = None,
                            tile: dict | None = None) -> torch.Tensor:
    """out = alpha * x y^T (+ beta * c) for contiguous x, y [B, M, K] (y defaults to x) whose product is
    symmetric, symmetric c and out [B, M, M]; only the upper triangle is computed; no checks.

    `tile` ({"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}, square or twice as wide as tall, optionally
    "num_warps" and "num_stages") fixes the tile instead of autotuning it, so tests can reach every epilogue
    path whatever the autotuner would pick."""
    batch, m, k = x.shape
    has_c = c is not None
    c_arg = c if has_c else out
    y = x if y is None else y
    grid = lambda meta: (ceil_div(m, meta["BLOCK_M"]) * ceil_div(m, meta["BLOCK_N"]), batch, 1)  # noqa: E731
    args = (x, y, c_arg, out, m, k, batch, x.stride(0), x.stride(1), y.stride(0), y.stride(1), c_arg.stride(0),
            c_arg.stride(1), out.stride(0), out.stride(1), alpha, beta)
    constexprs = {"HAS_C": has_c, "INPUT_PRECISION": input_precision(x.dtype), "INTERPRETED": interpreting()}
    if tile is None:
        _launch_symmetric(grid, args, constexprs)
    else:
        _symmetric_matmul_kernel.fn[grid](*args, **constexprs, **tile)   # under the autotuner: the heuristics
    return out


def check_batched(name: str, t: torch.Tensor) -> None:
    """A batch argument of the matmul kernels (here and update.py): 3-D, a kernel dtype, contiguous."""
    if t.ndim != 3:
        raise ValueError(f"{name}: expected a batch of matrices [B, m, n], got shape {tuple(t.shape)}")
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}.dtype={t.dtype}: must be torch.bfloat16, torch.float16 or torch.float32")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous() first)")


def output_buffer(name: str, out: torch.Tensor | None, like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """`out` checked to be a contiguous `shape` tensor of `like`'s dtype, or a new one when None."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {like.dtype} tensor of shape {shape}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    return out


def symmetric_gram(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A = x x^T for every matrix of the batch x [B, m, n] (computes the upper triangle, mirrors the rest)."""
    check_batched("x", x)
    batch, m, _ = x.shape
    out = output_buffer("out", out, x, (batch, m, m))
    return launch_symmetric_matmul(x, out)


def symmetric_polynomial(a: torch.Tensor, b: float, c: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """B = b a + c a a for a batch of symmetric matrices a [B, m, m] (upper-triangle tiles, mirrored).

    `a` must be symmetric (as `symmetric_gram` returns it): the kernel computes a a^T.
    """
    check_batched("a", a)
    batch, m, m2 = a.shape
    if m != m2:
        raise ValueError(f"a: expected square symmetric matrices [B, m, m], got shape {tuple(a.shape)}")
    out = output_buffer("out", out, a, (batch, m, m))
    return launch_symmetric_matmul(a, out, alpha=float(c), beta=float(b), c=a)


def commuting_product(z: torch.Tensor, q: torch.Tensor, a: float = 0.0, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """out = z q + a q for batches of symmetric matrices z, q [B, m, m] that commute (polynomials in one
    symmetric matrix, as in the Gram form of Newton-Schulz): z q = z q^T is then symmetric, so only the
    upper-triangle tiles are computed and mirrored. The result is exactly symmetric even where rounding left
    z q slightly asymmetric; it is the upper triangle of z q + a q."""
    check_batched("z", z)
    check_batched("q", q)
    batch, m, m2 = z.shape
    if m != m2 or tuple(q.shape) != (batch, m, m) or q.dtype != z.dtype:
        raise ValueError(f"z, q: expected square matrices of one shape and dtype, got z {z.dtype} "
                         f"{tuple(z.shape)} and q {q.dtype} {tuple(q.shape)}")
    out = output_buffer("out", out, z, (batch, m, m))
    if out.data_ptr() in (z.data_ptr(), q.data_ptr()):
        raise ValueError("out: must not alias z or q (each output tile reads whole rows of both)")
    return launch_symmetric_matmul(z, out, alpha=1.0, beta=float(a), c=q, y=q)
