"""Per-block orthogonalization of whole parameter updates: the block plan and the batched Newton-Schulz call.

A hidden weight often stores several logical matrices: a fused QKV weight (row blocks q, k, v), a fused
gate/up weight (two halves), an expert weight `[E, out, in]` (E matrices), or both at once. Muon is defined
on matrices, so the update is orthogonalized per *block*, and the transpose rule and `adjust_lr` use the
block's shape, never the fused tensor's. `BlockPlan` says how a full update splits into blocks and which lr
ratio each row gets; `orthogonalize` takes the full updates of many parameters, stacks every block of the
same shape (across parameters too) into one batch and runs one `newton_schulz` call per shape.

Both the single-process path and the sharded path (`sharded.py`, which first assembles full matrices)
go through `orthogonalize`, so they compute the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from muon_recipes.optim.newton_schulz import gram_restarts, newton_schulz, triton_kernels, uses_gram_form

ADJUST_LR = ("spectral_norm", "rms_norm", "none")
EXPERT_MODES = ("per_expert", "fused")


def adjust_lr_ratio(adjust_lr: str, rows: int, cols: int) -> float:
    """Factor on the lr of a `rows x cols` block so updates of different shapes have comparable size.

    spectral_norm: sqrt(max(1, rows/cols)) (Keller Jordan's Muon; keeps the update's spectral norm
    proportional to sqrt(fan_out/fan_in)). rms_norm: 0.2 * sqrt(max(rows, cols)), which gives the update
    the RMS of a typical AdamW update so AdamW's lr and weight decay carry over (Liu et al. 2025, "Muon is
    Scalable for LLM Training" (Moonlight), sec. 2.2). none: 1.
    """
    if adjust_lr == "spectral_norm":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "rms_norm":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr == "none":
        return 1.0
    raise ValueError(f"adjust_lr={adjust_lr!r}: must be one of {', '.join(ADJUST_LR)}")


@dataclass(frozen=True)
class BlockPlan:
    """How an update of `shape` (`[rows, cols]` or `[E, rows, cols]`) splits into the matrices Muon sees.

    row_blocks: sizes of the row blocks along dim -2 (one block = the whole matrix when not split).
    fuse_experts: for 3-D weights, orthogonalize the `[E*rows, cols]` concatenation of the experts (block i
      is then the concatenation over experts of each expert's block i) instead of E separate matrices.
    """

    shape: tuple[int, ...]
    row_blocks: tuple[int, ...]
    fuse_experts: bool = False

    @classmethod
    def build(cls, shape: Sequence[int], split_sizes: Optional[Sequence[int]] = None,
              experts: Optional[str] = "per_expert") -> "BlockPlan":
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"Muon orthogonalizes 2-D [out, in] or 3-D [experts, out, in] weights, got shape {shape}")
        experts = experts or "per_expert"
        if experts not in EXPERT_MODES:
            raise ValueError(f"experts={experts!r}: must be one of {', '.join(EXPERT_MODES)}")
        rows = shape[-2]
        blocks = tuple(int(s) for s in split_sizes) if split_sizes else (rows,)
        if sum(blocks) != rows or any(s <= 0 for s in blocks):
            raise ValueError(f"split_sizes={tuple(blocks)}: must be positive and sum to the {rows} rows "
                             f"of shape {shape}")
        return cls(shape, blocks, fuse_experts=len(shape) == 3 and experts == "fused")

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    def block_shapes(self) -> list[tuple[int, int, int]]:
        """(count, rows, cols) of the batch each row block contributes."""
        e, cols = self.experts, self.shape[-1]
        if self.fuse_experts:
            return [(1, e * s, cols) for s in self.row_blocks]
        return [(e, s, cols) for s in self.row_blocks]

    def matrices(self, update: torch.Tensor) -> list[torch.Tensor]:
        """The blocks of a full update, one `[count, rows, cols]` tensor per row block."""
        u3 = update if update.ndim == 3 else update.unsqueeze(0)
        pieces = torch.split(u3, list(self.row_blocks), dim=-2)
        if self.fuse_experts:
            return [p.reshape(1, -1, p.shape[-1]) for p in pieces]
        return list(pieces)

    def assemble(self, pieces: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Write orthogonalized blocks (as returned by `matrices`, same order) back into `out` (full shape)."""
        o3 = out if out.ndim == 3 else out.unsqueeze(0)
        for dst, src in zip(torch.split(o3, list(self.row_blocks), dim=-2), pieces):
            copy_block(dst, src.reshape(dst.shape))
        return out

    def row_scale(self, adjust_lr: str, device=None) -> torch.Tensor:
        """The lr ratio of every row, shaped `shape[:-1] + (1,)` to broadcast against the update (float32)."""
        ratios = [adjust_lr_ratio(adjust_lr, rows, cols) for _, rows, cols in self.block_shapes()]
        per_row = torch.repeat_interleave(torch.tensor(ratios, dtype=torch.float32),
                                          torch.tensor(self.row_blocks))
        return per_row.expand(*self.shape[:-1]).unsqueeze(-1).contiguous().to(device)

    def cost(self, steps: int, method: str = "standard", on_cuda: bool = False) -> float:
        """Multiply-adds of Newton-Schulz on all blocks (m <= n after transposing), to balance work across ranks.

        Standard form: per step 2 m^2 n + m^3. Gram form (where `newton_schulz` runs it) with r restarts:
        (2 + 2 r) m^2 n for the products that read X (R at the start and each restart, Q X at each restart and
        the end) and (4 steps - 3 r - 3) m^3 for the m x m products.
        """
        total = 0.0
        restarts = len(gram_restarts(steps))
        for count, rows, cols in self.block_shapes():
            m, n = min(rows, cols), max(rows, cols)
            if uses_gram_form(method, rows, cols, on_cuda):
                total += count * ((2 + 2 * restarts) * m * m * n + (4 * steps - 3 * restarts - 3) * m ** 3)
            else:
                total += count * steps * (2 * m * m * n + m ** 3)
        return total


def copy_block(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)`; a transposed `src` on a GPU goes through the tiled Triton copy (kernels/transpose.py),
    which reads and writes coalesced where torch's elementwise copy reads with a large stride."""
    kernels = triton_kernels() if src.is_cuda else None   # the package holds no kernels without Triton
    if getattr(kernels, "copy_transposed_applies", None) is not None and kernels.copy_transposed_applies(dst, src):
        kernels.copy_transposed(dst, src)
    else:
        dst.copy_(src)


@dataclass(frozen=True)
class NSSettings:
    """Everything besides the shape that must agree for two blocks to share one `newton_schulz` call."""

    steps: int
    schedule: str
    dtype: torch.dtype
    backend: str
    eps: float
    method: str = "standard"   # standard | gram (newton_schulz.METHODS)


def orthogonalize(jobs: Sequence[tuple[torch.Tensor, BlockPlan, NSSettings]]) -> list[torch.Tensor]:
    """Orthogonalize the blocks of many full updates; returns one tensor per job (its shape, `settings.dtype`).

    Blocks of equal shape up to transposition (NS(G^T) = NS(G)^T), device and settings are concatenated into
    one batch: e.g. the k and v blocks of every layer's fused QKV, or every gate, up (transposed) and down
    matrix of a dense MLP, go through a single batched call.

    Memory traffic matters as much as the products here (on a 0.85B-parameter model every pass over the
    updates costs about as much as a Newton-Schulz product of a small bucket): each block is copied once,
    cast and transposed in the same pass, into its bucket's batch (transposes in tiles on a GPU, `copy_block`),
    and a job made of one row-major block gets a view of the result instead of a copy.
    """
    buckets: dict[tuple, list[tuple[int, int, bool, torch.Tensor]]] = {}
    plans_pieces = []
    for j, (update, plan, ns) in enumerate(jobs):
        pieces = plan.matrices(update)
        plans_pieces.append([None] * len(pieces))
        for b, piece in enumerate(pieces):
            if piece.numel() == 0:
                plans_pieces[j][b] = piece.to(ns.dtype)
                continue
            tall = piece.shape[-2] > piece.shape[-1]
            wide = piece.mT if tall else piece
            buckets.setdefault((tuple(wide.shape[-2:]), piece.device, ns), []).append((j, b, tall, wide))
    for ((m, n), device, ns), members in buckets.items():
        counts = [wide.shape[0] for *_, wide in members]
        batch = torch.empty((sum(counts), m, n), dtype=ns.dtype, device=device)
        for dst, (*_, wide) in zip(torch.split(batch, counts), members):
            copy_block(dst, wide)
        result = newton_schulz(batch, steps=ns.steps, schedule=ns.schedule, dtype=ns.dtype,
                               backend=ns.backend, eps=ns.eps, method=ns.method)
        for (j, b, tall, _), out in zip(members, torch.split(result, counts)):
            plans_pieces[j][b] = out.mT if tall else out
    outputs = []
    for (update, plan, ns), pieces in zip(jobs, plans_pieces):
        if len(pieces) == 1 and not plan.fuse_experts and pieces[0].stride(-1) == 1:
            # A row-major view is as good as a copy for the update that follows; a transposed one (a tall block)
            # is copied back row-major, which keeps the final update's reads coalesced.
            outputs.append(pieces[0].reshape(update.shape) if update.ndim == 3 else pieces[0][0])
        else:
            outputs.append(plan.assemble(pieces, torch.empty(update.shape, dtype=ns.dtype, device=update.device)))
    return outputs
