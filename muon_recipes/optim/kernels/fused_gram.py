"""The whole Gram-form Newton-Schulz loop of one small matrix in one program (`launch_fused_gram`).

Why: a bucket of many small experts (128 matrices of 256 x 1024) is 18 launches of products with reductions of
256 to 1024 over 128 x 128 tiles. Each launch is a few tiles per matrix, too short to fill a tile's operand
pipeline, and each waits for the one before: the loop ran at 2.9x the FLOP floor with every product on its best
kernel (docs/benchmarks.md). Here one program owns one matrix and runs every product of its loop in turn, a
barrier between two products instead of a launch. Its m x m matrices (R, Z, RZ and two Q) and the restarted X
live in a scratch buffer that stays in L2 while the program works on it; only X is read from, and the result
written to, memory proper. A bucket of at least one matrix per SM fills the GPU with one launch.

The arithmetic is `iterations._iterate_gram`'s (the recurrences and their sources are in `newton_schulz.py`):

    R = X X^T;  per step (a, b, c):  [restart: X <- Q X, R = X X^T, Q = I]
                                     Z = b R + c R R;  Q = Z + a I (first step of a segment) or Z Q + a Q;
                                     RZ = Z R + a R, R = Z RZ + a RZ (unless the next step restarts)
    result = Q X, rounded once into the output's dtype.

Every product accumulates in fp32 and rounds once into X's dtype, as the product kernels do. The m x m products
are of commuting symmetric matrices, so they are symmetric: only tiles on and above the diagonal are computed,
each stored in place and mirrored, and a tile on the diagonal is completed from its upper triangle so that the
result is exactly symmetric (`symmetric.py` does the same). `Q = Z + a I` is stored from Z's rounded value with
one more rounding, as the unfused loop's copy and diagonal add.

Shapes are compile-time constants (one binary per bucket shape; a step has a handful), which also keeps every
loop bound constant for the CPU interpreter. The barrier between products is `tl.debug_barrier()` (a block-wide
`bar.sync`, after which the block's earlier global stores are visible to all of its threads).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from muon_recipes.optim.dispatch import KERNEL_DTYPES, interpreting
from muon_recipes.optim.kernels.fast_launch import FastLaunch
from muon_recipes.optim.kernels.tile_ops import multiply_accumulate, round_to_output
from muon_recipes.optim.kernels.tuning import input_precision

# Largest m (the shorter side) the fused loop is offered for: its m x m work is one SM's; larger matrices have
# enough tiles per product to fill the GPU from separate launches.
FUSED_MAX_SIDE = 512
# The GPU's tile (T, BLOCK_N, BLOCK_K, warps, stages): T x T for the m x m products, T x BLOCK_N for Q X,
# reductions in steps of BLOCK_K.
TILE = (128, 128, 64, 8, 3)
# What recipes/bench_fused_gram.py times.
TILE_CANDIDATES = (TILE, (128, 128, 64, 8, 2), (128, 128, 128, 8, 2), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3))


@triton.jit
def _load(ptr, rows, cols, R: tl.constexpr, C: tl.constexpr, stride: tl.constexpr, EVEN: tl.constexpr):
    """The [rows, cols] tile of a row-major [R, C] matrix (row stride `stride`); masked unless EVEN (the tile
    lies inside the matrix by construction)."""
    at = ptr + rows[:, None] * stride + cols[None, :]
    if EVEN:
        return tl.load(at)
    else:
        return tl.load(at, mask=(rows[:, None] < R) & (cols[None, :] < C), other=0.0)


@triton.jit
def _symmetric_product(left, right, c, out, also, alpha, beta, shift, with_c, with_also,
                       M: tl.constexpr, K: tl.constexpr, T: tl.constexpr, BLOCK_K: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """out = alpha * left right^T (+ beta * c where `with_c`), symmetric [M, M]; left and right row-major [M, K]
    (right is left, or a symmetric matrix commuting with it). Where `with_also`, also = out + shift I from out's
    rounded value. (The flags are run-time values: one compiled body serves every product.)"""
    tiles: tl.constexpr = (M + T - 1) // T
    even_m: tl.constexpr = M % T == 0
    even_k: tl.constexpr = (M % T == 0) and (K % BLOCK_K == 0)
    for i in range(tiles):
        for j in range(i, tiles):
            rows = i * T + tl.arange(0, T)
            cols = j * T + tl.arange(0, T)
            acc = tl.zeros((T, T), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                a = _load(left, rows, ks, M, K, K, even_k)
                b = _load(right, cols, ks, M, K, K, even_k)
                acc = multiply_accumulate(acc, a, tl.trans(b), INPUT_PRECISION, INTERPRETED)
            if i == j:   # complete the diagonal tile from its upper triangle: an exactly symmetric result
                acc = tl.where(rows[:, None] <= cols[None, :], acc, tl.trans(acc))
            value = alpha * acc
            if with_c != 0:
                value += beta * _load(c, rows, cols, M, M, M, even_m).to(tl.float32)
            rounded = round_to_output(value, out, INTERPRETED)
            _store_mirrored(out, rows, cols, rounded, M, even_m)
            if with_also:
                shifted = rounded.to(tl.float32) + tl.where(rows[:, None] == cols[None, :], shift, 0.0)
                _store_mirrored(also, rows, cols, round_to_output(shifted, also, INTERPRETED), M, even_m)


@triton.jit
def _store_mirrored(ptr, rows, cols, value, M: tl.constexpr, EVEN: tl.constexpr):
    """A tile of a symmetric [M, M] matrix at (rows, cols) and its mirror at (cols, rows) (on the diagonal the
    same elements twice, with the same values)."""
    at = ptr + rows[:, None] * M + cols[None, :]
    mirror = ptr + cols[None, :] * M + rows[:, None]
    if EVEN:
        tl.store(at, value)
        tl.store(mirror, value)
    else:
        inside = (rows[:, None] < M) & (cols[None, :] < M)
        tl.store(at, value, mask=inside)
        tl.store(mirror, value, mask=inside)


@triton.jit
def _left_product(q, x, out, M: tl.constexpr, N: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """out = q x: q [M, M], x and out row-major [M, N]; rounded once into out's dtype."""
    row_tiles: tl.constexpr = (M + T - 1) // T
    col_tiles: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    even_q: tl.constexpr = (M % T == 0) and (M % BLOCK_K == 0)
    even_x: tl.constexpr = (M % BLOCK_K == 0) and (N % BLOCK_N == 0)
    even_out: tl.constexpr = (M % T == 0) and (N % BLOCK_N == 0)
    for tile in range(row_tiles * col_tiles):
        rows = (tile // col_tiles) * T + tl.arange(0, T)
        cols = (tile % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((T, BLOCK_N), dtype=tl.float32)
        for k in range(0, M, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            a = _load(q, rows, ks, M, M, M, even_q)
            b = _load(x, ks, cols, M, N, N, even_x)
            acc = multiply_accumulate(acc, a, b, INPUT_PRECISION, INTERPRETED)
        at = out + rows[:, None] * N + cols[None, :]
        if even_out:
            tl.store(at, round_to_output(acc, out, INTERPRETED))
        else:
            tl.store(at, round_to_output(acc, out, INTERPRETED), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _fused_gram_kernel(x_ptr, out_ptr, scratch_ptr, coefficients,
                       M: tl.constexpr, N: tl.constexpr, STEPS: tl.constexpr, RESTARTS: tl.constexpr,
                       T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """One matrix per program. `coefficients`: fp32 [STEPS, 3] (a, b, c); RESTARTS: bit t set = restart before
    step t; scratch per matrix: R, Z, RZ, Q, Q' ([M, M] each), then two restarted X ([M, N] each).

    The loops over steps and over the commuting products are run-time loops, so each product is compiled once
    (a few bodies instead of one per product of the unrolled loop: a shorter compile)."""
    matrix = tl.program_id(0).to(tl.int64)
    square: tl.constexpr = M * M
    x = x_ptr + matrix * (M * N)
    base = scratch_ptr + matrix * (5 * square + 2 * M * N)
    R = base
    Z = base + square
    RZ = base + 2 * square
    Q = base + 3 * square
    Q_next = base + 4 * square
    restarted = base + 5 * square
    current = x
    identity = 1   # Q = I at the start of a segment
    parity = 0     # which restarted-X buffer the next restart writes
    for step in range(STEPS):
        a = tl.load(coefficients + 3 * step)
        b = tl.load(coefficients + 3 * step + 1)
        c = tl.load(coefficients + 3 * step + 2)
        restart = (RESTARTS >> step) & 1
        if restart != 0:
            target = restarted + parity * (M * N)
            _left_product(Q, current, target, M, N, T, BLOCK_N, BLOCK_K, INPUT_PRECISION,
                          INTERPRETED)                                                   # X <- Q X
            tl.debug_barrier()
            current = target
            parity = 1 - parity
            identity = 1
        if (step == 0) | (restart != 0):
            _symmetric_product(current, current, R, R, R, 1.0, 0.0, 0.0, 0, 0, M, N, T, BLOCK_K,
                               INPUT_PRECISION, INTERPRETED)                             # R = X X^T
            tl.debug_barrier()
        _symmetric_product(R, R, R, Z, Q, c, b, a, 1, identity, M, M, T, BLOCK_K, INPUT_PRECISION,
                           INTERPRETED)              # Z = b R + c R R, and Q = Z + a I at a segment's start
        tl.debug_barrier()
        # Then the commuting products Z Y + a Y: Q = Z Q + a Q (after a segment's start), RZ = Z R + a R and
        # R = Z RZ + a RZ (unless the next step restarts or there is none), with a barrier after each.
        next_restarts = (RESTARTS >> (step + 1)) & 1
        last = tl.where((step < STEPS - 1) & (next_restarts == 0), 2, 0)
        for product in range(identity, last + 1):
            if product == 0:
                source = Q
                target = Q_next
            elif product == 1:
                source = R
                target = RZ
            else:
                source = RZ
                target = R
            _symmetric_product(Z, source, source, target, target, 1.0, a, 0.0, 1, 0, M, M, T, BLOCK_K,
                               INPUT_PRECISION, INTERPRETED)
            tl.debug_barrier()
        if identity == 0:
            Q, Q_next = Q_next, Q
        identity = 0
    _left_product(Q, current, out_ptr + matrix * (M * N), M, N, T, BLOCK_N, BLOCK_K, INPUT_PRECISION,
                  INTERPRETED)                                                               # Q X


_launch = FastLaunch(_fused_gram_kernel)


def fused_offered(X: torch.Tensor) -> bool:
    """Whether the fused loop can run on X [B, m, n] (m <= n): m at most `FUSED_MAX_SIDE`, a kernel dtype,
    contiguous."""
    return (X.ndim == 3 and X.shape[1] <= min(FUSED_MAX_SIDE, X.shape[2]) and X.dtype in KERNEL_DTYPES
            and X.is_contiguous() and X.shape[1] >= 1)


# (device, coefficients) -> the fp32 [steps, 3] table the kernel reads: made once, outside any CUDA graph capture
# (a host-to-device copy cannot be recorded), and kept at one address for the graphs that replay it.
_tables: dict[tuple, torch.Tensor] = {}


def _coefficient_table(coefficients: tuple, device: torch.device) -> torch.Tensor:
    key = (str(device), coefficients)
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = torch.tensor(coefficients, dtype=torch.float32, device=device)
    return table


def restart_mask(restarts: Sequence[int]) -> int:
    return sum(1 << int(t) for t in set(restarts))


def launch_fused_gram(X: torch.Tensor, coefficients: Sequence[tuple[float, float, float]],
                      restarts: Sequence[int], out: torch.Tensor, tile: tuple | None = None) -> torch.Tensor:
    """The Gram-form iterations of every matrix of X [B, m, n] (m <= n, normalized), one program each, into
    `out` [B, m, n] (any kernel dtype). `coefficients` (a, b, c) per step; `restarts` as in
    `iterations.gram_iterations_triton`. `tile` (T, BLOCK_N, BLOCK_K, warps, stages) replaces the GPU's
    fixed tile (`TILE`; recipes/bench_fused_gram.py times candidates)."""
    if not fused_offered(X) or out.shape != X.shape or not out.is_contiguous():
        raise ValueError(f"launch_fused_gram: X {X.dtype} {tuple(X.shape)} (contiguous, m <= n, m <= "
                         f"{FUSED_MAX_SIDE}) and out {tuple(out.shape)} (contiguous, same shape)")
    batch, m, n = X.shape
    steps = len(coefficients)
    if steps == 0 or batch == 0:
        out.copy_(X)
        return out
    table = _coefficient_table(tuple(tuple(map(float, abc)) for abc in coefficients), X.device)
    scratch = torch.empty((batch, 5 * m * m + 2 * m * n), dtype=X.dtype, device=X.device)
    if interpreting():
        tiles = {"T": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    else:
        side = max(16, triton.next_power_of_2(m))
        t, block_n, block_k, warps, stages = tile or TILE
        tiles = {"T": min(t, side), "BLOCK_N": block_n, "BLOCK_K": min(block_k, side), "num_warps": warps,
                 "num_stages": stages}
    _launch(lambda meta: (batch,), (X, out, scratch, table),
            {"M": m, "N": n, "STEPS": steps, "RESTARTS": restart_mask(restarts), **tiles,
             "INPUT_PRECISION": input_precision(X.dtype), "INTERPRETED": interpreting()})
    return out
