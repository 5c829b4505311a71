"""Per-block orthogonalization of whole parameter updates: the batched Newton-Schulz call.

Muon is defined on matrices, so a fused update is orthogonalized per *block* (`blocks.BlockPlan` says how a
full update splits into blocks and which lr ratio each row gets). `orthogonalize` takes the full updates of
many parameters, stacks every block of the same shape (across parameters too) into one batch and runs one
`newton_schulz` call per shape.

Both the single-process path and the sharded path (`sharded.py`, which first assembles full matrices)
go through `orthogonalize`, so they compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from muon_recipes.optim import dispatch
from muon_recipes.optim.blocks import BlockPlan, copy_block
from muon_recipes.optim.newton_schulz import newton_schulz, triton_launches

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


def bucket_shapes(jobs: Sequence[tuple[BlockPlan, NSSettings, torch.device]]) -> dict[tuple, int]:
    """{((m, n), device, settings): matrices} of the batches `orthogonalize` forms from these blocks (m <= n)."""
    shapes: dict[tuple, int] = {}
    for plan, ns, device in jobs:
        for count, rows, cols in plan.block_shapes():
            key = ((min(rows, cols), max(rows, cols)), torch.device(device), ns)
            shapes[key] = shapes.get(key, 0) + count
    return shapes


def compile_ahead(jobs: Sequence[tuple[BlockPlan, NSSettings, torch.device]]) -> None:
    """Compile the Triton tile candidates of every batch these blocks make, all at once, before any is timed.

    On a machine that has never tuned the kernels, the first step otherwise compiles one shape's candidates
    after another (each shape compiles its own at once: `kernels/iterations.py`); compiling every shape's
    together fills the host's cores once. Each batch's launches are recorded with buffers of its size on its
    device, one batch at a time, so the memory this needs is that of the largest batch's Newton-Schulz, as in
    the step itself. Nothing to do off the GPU, without Triton, or with MUON_NS_PRECOMPILE=0."""
    if dispatch.kernels() is None:
        return
    from muon_recipes.optim.kernels import tile_search

    if not tile_search.precompile_enabled():
        return
    launches = []
    for ((m, n), device, ns), count in bucket_shapes(jobs).items():
        if device.type == "cuda":
            launches += triton_launches(count, m, n, ns.steps, ns.schedule, ns.dtype, ns.backend, ns.method, device)
    tile_search.compile_candidates(launches)
