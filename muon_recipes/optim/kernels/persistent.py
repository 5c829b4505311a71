"""Persistent, TMA-fed versions of the two Newton-Schulz products, for blocks whose rows the tiles divide.

The pointer-based kernels (symmetric.py, update.py) launch one program per output tile. On one H200 they ran
the symmetric products at 410-430 TFLOP/s and the update at 560-575, against cuBLAS's 695 on a large product
(docs/benchmarks.md, "Per product"): every tile fills its operand pipeline from empty and drains it before its
epilogue, and with one 128 x 256 tile per SM (its pipeline takes most of the shared memory) nothing runs
during that epilogue, which for a symmetric tile is two full stores. Here:

* **persistent**: one program per SM (`NUM_PROGRAMS`) loops over output tiles, and the loop over tiles and the
  loop over the reduction are one software pipeline (`tl.range(flatten=True)`), so the next tile's operand
  loads are in flight while this tile's epilogue runs;
* **TMA**: operand tiles are loaded, and results stored, by the Hopper Tensor Memory Accelerator from a
  `TensorDescriptor` (one instruction per tile, no per-element address arithmetic in registers).

The arithmetic and the contract are those of the pointer kernels: fp32 accumulation, the `beta C` and `a X`
terms fused into the epilogue, one rounding per product, symmetric results stored exactly symmetric (a tile
above the diagonal is stored in place and mirrored; a square piece on it is completed from its upper
triangle). The batch [B, M, K] is read as the 2-D matrix [B M, K] that TMA addresses, so a tile must not
straddle two matrices: the rows M must be a multiple of the tile (`usable`). Columns need not be: TMA fills
loads past the last column with zeros and clips stores there. Only 16-bit dtypes; fp32 stays on the pointer
kernels.

The tile is not autotuned: each product takes the tile `tile_for` gives, the fastest of the candidates that the
per-product breakdown of `recipes/bench_newton_schulz.py` times (`PERSISTENT_TILES`) on one H200. Whether a
product runs here at all is decided per shape by timing, against the pointer kernel and cuBLAS (`iterations.Plan`,
implementation "persistent", from `dispatch.PERSISTENT_MIN_SIDE` rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muon_recipes.optim.dispatch import interpreting
from muon_recipes.optim.kernels.fast_launch import ceil_div
from muon_recipes.optim.kernels.tile_model import upper_triangle_tiles
from muon_recipes.optim.kernels.tile_ops import multiply_accumulate, round_to

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:   # Triton < 3.4: no host-side descriptors; `usable` says no
    TensorDescriptor = None

# The interpreter's tile and program count: small enough that the CPU tests' 32 x 32 matrices span several
# tiles and each program loops over several of them.
_INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}
_INTERPRETER_PROGRAMS = 3

# Per product, the tile used on a GPU: the fastest of five on every bucket of dense_1b and moe_small with at least
# 512 rows, in bf16 and float16 (one H200, `STAGES=persistent bash recipes/gpu_cuda_graph_checks.sh`,
# docs/benchmarks.md, "Persistent TMA-fed kernels"). The update with its a X term holds the tile of X read in its
# epilogue in shared memory too, so its 128 x 256 tile does not fit with three stages (278 KB of 227 KB); with
# a = 0 (the Gram form's Q X) it does, and is the fastest there.
SYMMETRIC_TILE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
UPDATE_TILE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
Q_X_TILE = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
GROUP_M = 8


@triton.jit
def _store_square(desc, piece, base, row0, col0, outside, SIDE: tl.constexpr):
    """Store a SIDE x SIDE piece of a symmetric output at (row0, col0) of the matrix whose first row is `base`,
    in place and mirrored. A piece on the diagonal is first completed from its upper triangle (so it is its own
    mirror, and the two stores write the same values); a piece below it is the mirror of one that another
    tile stores, so both of its stores go to row `outside`, past the end of the tensor, where TMA writes
    nothing. No branch: Triton 3.6 cannot pipeline the flattened tile loop across an epilogue that branches."""
    r = tl.arange(0, SIDE)
    piece = tl.where((col0 == row0) & (r[None, :] < r[:, None]), tl.trans(piece), piece)
    below = col0 < row0
    desc.store([tl.where(below, outside, base + row0), col0], piece)
    desc.store([tl.where(below, outside, base + col0), row0], tl.trans(piece))


@triton.jit
def _symmetric_persistent_kernel(
    x_desc, y_desc, c_desc, out_desc, table_ptr,
    M, K, TILES, TOTAL, alpha, beta,
    HAS_C: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """out = alpha x y^T + beta c on the upper-triangle tiles listed in `table_ptr` (TILES per matrix, each
    `pid_m << 16 | pid_n`), TOTAL = batch * TILES tiles over NUM_PROGRAMS programs; `out_desc` stores
    BLOCK_M x BLOCK_M squares (a wide tile is two of them)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    outside = (TOTAL // TILES) * M   # the first row past the batch
    for tile in tl.range(tl.program_id(0), TOTAL, NUM_PROGRAMS, flatten=True):
        batch = tile // TILES
        entry = tl.load(table_ptr + (tile - batch * TILES))
        row0 = (entry >> 16) * BLOCK_M
        col0 = (entry & 0xFFFF) * BLOCK_N
        base = batch * M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            left = x_desc.load([base + row0, k * BLOCK_K])
            right = y_desc.load([base + col0, k * BLOCK_K])
            acc = multiply_accumulate(acc, left, tl.trans(right), "tf32", INTERPRETED)
        result = acc * alpha
        if HAS_C:
            result += beta * c_desc.load([base + row0, col0]).to(tl.float32)
        result = round_to(result, out_desc.dtype, INTERPRETED)
        if BLOCK_M == BLOCK_N:
            _store_square(out_desc, result, base, row0, col0, outside, BLOCK_M)
        else:
            # A wide tile is two squares side by side (as in symmetric.py).
            left_half, right_half = tl.split(tl.permute(tl.reshape(result, (BLOCK_M, 2, BLOCK_M)), (0, 2, 1)))
            _store_square(out_desc, left_half, base, row0, col0, outside, BLOCK_M)
            _store_square(out_desc, right_half, base, row0, col0 + BLOCK_M, outside, BLOCK_M)


@triton.jit
def _update_persistent_kernel(
    b_desc, x_desc, own_desc, out_desc,
    M, TILES_M, TILES_N, TOTAL, alpha,
    ADD_X: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    """out = alpha x + b x for b [B, M, M], x [B, M, N] (TILES_M x TILES_N tiles per matrix, grouped so that
    consecutive tiles share row blocks of b in L2), TOTAL = B * TILES_M * TILES_N tiles over NUM_PROGRAMS."""
    tiles = TILES_M * TILES_N
    in_group = GROUP_M * TILES_N
    k_tiles = M // BLOCK_K
    for tile in tl.range(tl.program_id(0), TOTAL, NUM_PROGRAMS, flatten=True):
        batch = tile // tiles
        local = tile - batch * tiles
        first_m = (local // in_group) * GROUP_M
        size_m = min(TILES_M - first_m, GROUP_M)
        row0 = (first_m + (local % in_group) % size_m) * BLOCK_M
        col0 = ((local % in_group) // size_m) * BLOCK_N
        base = batch * M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            b_tile = b_desc.load([base + row0, k * BLOCK_K])
            x_tile = x_desc.load([base + k * BLOCK_K, col0])
            acc = multiply_accumulate(acc, b_tile, x_tile, "tf32", INTERPRETED)
        if ADD_X:   # (a = 0, the Gram form's Q X, reads no tile of x here)
            acc += alpha * own_desc.load([base + row0, col0]).to(tl.float32)
        out_desc.store([base + row0, col0], round_to(acc, out_desc.dtype, INTERPRETED))


def available() -> bool:
    """True where the persistent kernels can run: Triton with host-side tensor descriptors, and a GPU with TMA
    (compute capability 9.0 or later), or the CPU interpreter."""
    if TensorDescriptor is None:
        return False
    if interpreting():
        return True
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def tile_for(product: str, adds_x: bool = True, interpreted: bool | None = None) -> dict:
    """The tile (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of "symmetric" or "update" (with its a X
    term, or without: `adds_x`)."""
    if interpreting() if interpreted is None else interpreted:
        return dict(_INTERPRETER_TILE)
    if product == "symmetric":
        return dict(SYMMETRIC_TILE)
    return dict(UPDATE_TILE if adds_x else Q_X_TILE)


def usable(product: str, x: torch.Tensor, tile: dict | None = None) -> bool:
    """Whether `product` ("symmetric": x [B, M, K] -> [B, M, M]; "update": x [B, M, N] with b [B, M, M]) can
    run here on x with `tile`: a 16-bit dtype, rows that the tile divides (no tile straddles two matrices), and
    rows of 16-byte multiples (a TMA requirement)."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.ndim != 3 or not available():
        return False
    if not (x.is_cuda or interpreting()):
        return False
    tile = tile or tile_for(product)   # the two update tiles have the same BLOCK_M and BLOCK_K
    m, width = x.shape[1], x.shape[2]
    sides = (tile["BLOCK_M"], tile["BLOCK_N"]) if product == "symmetric" else (tile["BLOCK_M"], tile["BLOCK_K"])
    return all(m % side == 0 for side in sides) and (width * x.element_size()) % 16 == 0 and \
        (m * x.element_size()) % 16 == 0


_programs: dict = {}
_tables: dict = {}


def _program_count(device: torch.device) -> int:
    if interpreting():
        return _INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _programs:
        _programs[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _programs[index]


def _tile_table(m: int, block_m: int, block_n: int, device: torch.device) -> torch.Tensor:
    """`tile_model.upper_triangle_tiles` packed as int32 `pid_m << 16 | pid_n` on `device`, made once per (device, shape): a CUDA
    graph records the launch with this buffer, so it must outlive the capture (and is never freed)."""
    key = (device.type, device.index, m, block_m, block_n)
    table = _tables.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"persistent symmetric product of m={m}: its tile table must be made before a "
                               "CUDA graph capture (run the product once eagerly first)")
        packed = [(i << 16) | j for i, j in upper_triangle_tiles(m, block_m, block_n)]
        table = _tables[key] = torch.tensor(packed, dtype=torch.int32).to(device)
    return table


def _descriptor(t: torch.Tensor, block: list[int]) -> "TensorDescriptor":
    """A 2-D descriptor of the batch t [B, R, C] (contiguous) seen as [B R, C], loading `block` tiles."""
    rows, cols = t.shape[0] * t.shape[1], t.shape[2]
    return TensorDescriptor(t, [rows, cols], [cols, 1], block)


def launch_symmetric(x: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, beta: float = 0.0,
                     c: torch.Tensor | None = None, y: torch.Tensor | None = None,
                     tile: dict | None = None) -> torch.Tensor:
    """out = alpha x y^T (+ beta c), symmetric, on the persistent kernel: the contract of
    `symmetric.launch_symmetric_matmul` (contiguous x, y [B, M, K], symmetric c and out [B, M, M]); the caller
    checks `usable("symmetric", x, tile)`."""
    tile = tile or tile_for("symmetric")
    bm, bn, bk = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
    batch, m, k = x.shape
    y = x if y is None else y
    table = _tile_table(m, bm, bn, x.device)
    tiles = table.numel()
    total = batch * tiles
    programs = min(_program_count(x.device), total)
    _symmetric_persistent_kernel[(programs,)](
        _descriptor(x, [bm, bk]), _descriptor(y, [bn, bk]), _descriptor(c if c is not None else out, [bm, bn]),
        _descriptor(out, [bm, bm]), table,
        m, k, tiles, total, alpha, beta,
        HAS_C=c is not None, INTERPRETED=interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        NUM_PROGRAMS=programs, num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    return out


def launch_update(x: torch.Tensor, b: torch.Tensor, a: float, out: torch.Tensor,
                  tile: dict | None = None) -> torch.Tensor:
    """out = a x + b x on the persistent kernel: the contract of `update.launch_update` (contiguous x [B, M, N],
    b [B, M, M], out not aliasing x; out may be another 16-bit dtype); the caller checks
    `usable("update", x, tile)`."""
    tile = tile or tile_for("update", adds_x=a != 0.0)
    bm, bn, bk = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
    batch, m, n = x.shape
    tiles_m, tiles_n = m // bm, ceil_div(n, bn)
    total = batch * tiles_m * tiles_n
    programs = min(_program_count(x.device), total)
    _update_persistent_kernel[(programs,)](
        _descriptor(b, [bm, bk]), _descriptor(x, [bk, bn]), _descriptor(x, [bm, bn]), _descriptor(out, [bm, bn]),
        m, tiles_m, tiles_n, total, a,
        ADD_X=a != 0.0, INTERPRETED=interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
        NUM_PROGRAMS=programs, num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    return out
