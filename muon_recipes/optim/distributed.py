"""Muon on FSDP2-sharded parameters (DTensor): assemble full matrices, orthogonalize, keep the local shard.

First version: every sharded update is all-gathered on every rank (`full_tensor`), orthogonalized there and
sliced back to the local shard. Correct for any placement of Shard/Replicate; the all-to-all version that
spreads the work replaces it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from muon_recipes.optim.orthogonalize import orthogonalize


def local_slice(full: Tensor, like: DTensor) -> Tensor:
    """The part of `full` (global shape of `like`, or broadcastable rows) this rank holds under `like`'s placements.

    Dims of size 1 in `full` broadcast and are not sliced (e.g. per-row scales `[rows, 1]` under Shard(1)).
    Chunking follows torch.chunk, as DTensor and FSDP2 do: ceil(size / n) per rank, the last ranks short or empty.
    """
    mesh = like.device_mesh
    coord = mesh.get_coordinate()
    out = full
    for mesh_dim, placement in enumerate(like.placements):
        if not isinstance(placement, Shard):
            continue
        dim = placement.dim
        if out.shape[dim] == 1 and like.shape[dim] != 1:
            continue
        n, size = mesh.size(mesh_dim), out.shape[dim]
        chunk = -(-size // n)
        start = min(coord[mesh_dim] * chunk, size)
        out = out.narrow(dim, start, min(chunk, size - start))
    return out


def orthogonalize_sharded(items, timer, bucket_mb: float = 256.0, replica_spread="auto") -> list[Tensor]:
    """Orthogonalized local shards of the updates of DTensor parameters (see module docstring)."""
    start = timer.now()
    fulls = [DTensor.from_local(item.update, item.param.device_mesh, item.param.placements,
                                shape=item.param.shape, stride=item.param.stride()).full_tensor()
             for item in items]
    start = timer.add("comm", start)
    outs = orthogonalize([(full, item.plan, item.ns) for full, item in zip(fulls, items)])
    timer.add("ns", start)
    return [local_slice(out, item.param) for out, item in zip(outs, items)]
