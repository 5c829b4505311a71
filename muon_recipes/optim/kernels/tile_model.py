"""A cost estimate of one tile configuration for one matmul of the Newton-Schulz kernels, to rank candidates.

Timing a candidate tile on the GPU is cheap; compiling it is not (about half a second each on a GPU host, most
of a cold first optimizer step before the search was bounded). So the candidates are ranked first by this
estimate and only the best few are compiled and timed (`tuning.search_candidates`). The estimate only has to
put the fastest tile near the top, not predict times: the timing decides among the few.

It is the classic tile model of GPU matmul libraries (the shape of Triton's former `matmul_perf_model` and of
CUTLASS's tile heuristics), written for Hopper:

* **Tile efficiency.** A tile's main loop brings (BM + BN) x BK operand elements per BM x BN x BK
  multiply-adds, so its arithmetic intensity is 2 BM BN / ((BM + BN) e) FLOP per byte (e: element size). An SM
  whose share of L2 bandwidth cannot feed its tensor cores at that intensity runs below peak:
  rate = peak x min(1, intensity / balance), with `_BALANCE` FLOP/byte the point where one SM's share of
  L2 bandwidth (about 7.5 TB/s over 132 SMs) keeps its tensor cores (about 7.5 TFLOP/s in bf16) busy.
  Fewer than 4 warps cannot issue Hopper's warpgroup MMA (per-warp MMA instead, about half the rate).
* **Waves.** The tiles (only the live ones of a symmetric product: tiles wholly below the diagonal return at
  once) are spread over the 132 SMs; the busiest SM runs ceil(tiles / 132) of them. Wave quantization is what
  makes a big tile lose on the small, batched matrices of mixture-of-experts layers.
* **Epilogue and occupancy.** Each tile also writes its output (twice for the mirrored symmetric tiles, plus a
  read of C) and fills its pipeline; with two or more CTAs resident per SM (limited by shared memory,
  registers and warps) that overhead overlaps another CTA's main loop.

Times come out in nanoseconds of an idealized H100/H200; only their order is used.
"""

from __future__ import annotations

from dataclasses import dataclass

# Hopper (H100 / H200 SXM): SMs, per-SM resources, and per-SM shares of peak rates.
_SMS = 132
_SHARED_MEMORY_PER_SM = 228 * 1024
_REGISTERS_PER_SM = 64 * 1024
_MAX_WARPS_PER_SM = 64
_PEAK_FLOP_PER_NS = 7500.0   # dense bf16 / fp16 tensor-core FLOP per ns per SM (989 TFLOP/s / 132)
_BALANCE = 130.0             # FLOP per operand byte at which one SM's share of L2 bandwidth keeps up
_STORE_BYTES_PER_NS = 30.0   # one SM's share of write bandwidth (about 4 TB/s / 132)
_PIPELINE_FILL_NS = 500.0    # first loads of a tile before its first MMA


@dataclass(frozen=True)
class Product:
    """One launch's matmul: `batch` products of an M x K by K x N matrix (N = M for the symmetric kernel, whose
    output is symmetric and computed on its upper-triangle tiles only), `element_size` bytes per operand."""

    batch: int
    m: int
    n: int
    k: int
    symmetric: bool
    element_size: int
    reads_c: bool = False


def upper_triangle_tiles(m: int, block_m: int, block_n: int) -> list[tuple[int, int]]:
    """The (pid_m, pid_n) of the tiles of an m x m symmetric output that touch its upper triangle, row by row:
    those not wholly below the diagonal (last column >= first row). The pointer kernel returns at once from
    the others (symmetric.py); the persistent kernel visits only these (persistent.py)."""
    rows, cols = -(-m // block_m), -(-m // block_n)
    return [(i, j) for i in range(rows) for j in range(cols) if (j + 1) * block_n > i * block_m]


def live_tiles(product: Product, block_m: int, block_n: int) -> int:
    """Tiles of one matrix that do work: all of them, or for a symmetric product `upper_triangle_tiles`."""
    if product.symmetric:
        return len(upper_triangle_tiles(product.m, block_m, block_n))
    return -(-product.m // block_m) * -(-product.n // block_n)


def resident_ctas(block_m: int, block_n: int, block_k: int, stages: int, warps: int, element_size: int) -> int:
    """CTAs of this tile that fit on one SM at once: shared memory for the pipeline's operand buffers, registers
    for the fp32 accumulator (plus about 40 per thread of addresses and indices), and warps."""
    shared = (block_m + block_n) * block_k * element_size * stages
    registers_per_thread = min(255, block_m * block_n // (warps * 32) + 40)
    return max(1, min(_SHARED_MEMORY_PER_SM // max(shared, 1),
                      _REGISTERS_PER_SM // (registers_per_thread * warps * 32),
                      _MAX_WARPS_PER_SM // warps))


def estimated_ns(product: Product, block_m: int, block_n: int, block_k: int, stages: int, warps: int) -> float:
    """Estimated time of the whole launch with this tile (ns; only the ranking is meaningful)."""
    e = product.element_size
    intensity = 2.0 * block_m * block_n / ((block_m + block_n) * e)
    rate = _PEAK_FLOP_PER_NS * min(1.0, intensity / _BALANCE) * (1.0 if warps >= 4 else 0.5)
    main_loop = 2.0 * block_m * block_n * product.k / rate
    stored = block_m * block_n * e * (2 if product.symmetric else 1) + (block_m * block_n * e if product.reads_c
                                                                         else 0)
    overhead = _PIPELINE_FILL_NS + stored / _STORE_BYTES_PER_NS
    ctas = resident_ctas(block_m, block_n, block_k, stages, warps, e)
    per_tile = max(main_loop, (main_loop + overhead) / ctas) if ctas > 1 else main_loop + overhead
    tiles = product.batch * live_tiles(product, block_m, block_n)
    return -(-tiles // _SMS) * per_tile
