"""Apply FSDP2 (`fully_shard`) per transformer block and at the root, with optional compile and checkpointing.

Order follows the FSDP2 recipe (torchtitan): per-block activation checkpointing and `torch.compile` first, then
`fully_shard` on each block (one all-gather/reduce-scatter group per block, so communication overlaps the
neighbouring blocks' compute) and finally on the root (embeddings, final norm, head). Blocks are compiled in
place (`Module.compile`) and checkpointed through a flag, so parameter names never change: the optimizer's
parameter layouts and checkpoints stay keyed by the same names with or without these switches.

Under expert parallelism (`expert_mesh`), the routed experts are placed on their own mesh first
(`expert_parallel.shard_experts`) and every `fully_shard` is told to leave them alone (`ignored_params`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

try:  # torch >= 2.6 public path
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older releases
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard


def parallelize(model: nn.Module, mesh: Optional[DeviceMesh], *, bf16: bool, compile: bool,
                activation_checkpointing: bool, expert_mesh: Optional[DeviceMesh] = None) -> nn.Module:
    """Shard `model` in place over `mesh` (a 1-D FSDP or 2-D replicate x shard HSDP mesh); no-op mesh=None.

    `expert_mesh` (an `expert_parallel.expert_mesh` with ep > 1): routed experts spread over it instead."""
    for block in model.layers:
        block.activation_checkpointing = activation_checkpointing
        if compile:
            block.compile()
    if mesh is None:
        return model
    # bf16 compute and all-gathers, fp32 gradient reduction and fp32 sharded master weights.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    experts = None
    if expert_mesh is not None:
        from muon_recipes.parallel.expert_parallel import shard_experts

        experts = shard_experts(model, expert_mesh)
    n = len(model.layers)
    reshard = resharding_frees_memory(mesh)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed first in backward: they stay gathered in any case.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard and i < n - 1, **_ignoring(experts))
    fully_shard(model, mesh=mesh, mp_policy=mp, **_ignoring(experts))
    return model


def resharding_frees_memory(mesh: Optional[DeviceMesh]) -> bool:
    """Whether resharding gathered parameters (after forward, between micro-batches) frees memory: only where the
    shard group has several ranks. Over one shard (a single GPU, HSDP with shard 1) the shard is the whole
    parameter, so resharding frees only the bf16 compute copy (2 bytes per parameter beside the fp32 weight,
    gradient and optimizer state) at the price of casting every parameter again, with the hooks' host time."""
    return mesh is not None and mesh.size(mesh.ndim - 1) > 1


def _ignoring(params: Optional[set]) -> dict:
    """`fully_shard`'s `ignored_params` argument when there are parameters it must not manage (torch >= 2.7)."""
    return {"ignored_params": params} if params else {}
