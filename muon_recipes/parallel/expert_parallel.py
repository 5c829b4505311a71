"""Expert parallelism: the routed experts of every MoE layer spread whole over an `ep` sub-mesh of the ranks.

The mesh (`expert_mesh`) is 2-D, `(world/ep, ep)`, named `("ep_replicate", "ep")`, ranks laid out row-major:

* `ep` is the inner dimension, so an ep group is `ep` *consecutive* ranks -- on a GPU cluster the GPUs of one node
  (torchrun numbers a node's ranks consecutively). Dispatch and combine are two all-to-alls per MoE layer in the
  forward and two in the backward, on the critical path, carrying every routed token's activations: they belong
  on the fastest links (NVLink), not across the network.
* `ep_replicate` is the outer dimension: the `world/ep` ep groups hold the same experts, each on its own share of
  the batch. Their gradients meet once per micro-batch in an all-reduce (`moe._ExpertGradientMean`), the
  traffic of data parallelism, which tolerates the slower links.

Each expert weight `[E, out, in]` becomes a DTensor on this mesh with placements `(Replicate(), Shard(0))`:
whole experts on every rank (`E/ep` of them), never all-gathered. We deliberately do not FSDP-shard the experts
over `ep_replicate` as well (torchtitan's `dp_shard_mod_ep`): that would save `(world/ep - 1)/(world/ep)` of the
expert memory when `world > ep`, but cut every expert into row shards again, and Muon would have to assemble
them before Newton-Schulz. With whole local experts, Muon's existing rule applies -- a 3-D weight sharded on the
expert dim is orthogonalized where it is, per expert, with no communication (`optim/sharded.py`, step 1) --
and the momentum buffers are DTensors placed like their weights, so DCP reshards them across ep sizes and world
sizes like every other state. When `ep == world` (the usual single-node case) nothing is replicated at all.

Every other parameter (attention, dense MLPs, shared experts, routers, embeddings, norms) is FSDP2-sharded over
all ranks exactly as with `mesh=fsdp`: `parallel.fsdp.parallelize` passes the expert weights to `fully_shard` as
ignored parameters. With `ep == 1` the experts are FSDP-sharded too: `mesh=ep mesh.ep=1` is `mesh=fsdp`.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from muon_recipes.models.moe import ExpertParallel, GroupedExperts

MESH_DIMS = ("ep_replicate", "ep")


def expert_mesh(device_type: str, world_size: int, ep: int) -> DeviceMesh:
    """The `(world/ep, ep)` mesh the routed experts are placed on (inner dim: consecutive ranks, see above)."""
    if ep < 1 or world_size % ep:
        raise ValueError(f"expert_mesh: ep={ep} must divide the world size {world_size}")
    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=MESH_DIMS)


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Replace every routed expert weight of `model` by its `(Replicate(), Shard(0))` DTensor on `mesh` (an
    `expert_mesh`) and switch its MoE layer to all-to-all dispatch; returns the new parameters (for FSDP2 to
    leave alone). The model must be whole and identical on every rank (as `train/entry.py` builds it)."""
    ep, replicas = mesh.size(1), mesh.size(0)
    sharded: set[nn.Parameter] = set()
    for module in model.modules():
        if not isinstance(module, GroupedExperts):
            continue
        if module.n_experts % ep:
            raise ValueError(f"shard_experts: ep={ep} must divide n_experts={module.n_experts}")
        for name, param in list(module.named_parameters(recurse=False)):
            dtensor = distribute_tensor(param.detach(), mesh, [Replicate(), Shard(0)])
            new = nn.Parameter(dtensor, requires_grad=param.requires_grad)
            module.register_parameter(name, new)
            sharded.add(new)
        module.expert_parallel = ExpertParallel(
            group=mesh.get_group(1), size=ep, rank=mesh.get_local_rank(1),
            replica_group=mesh.get_group(0) if replicas > 1 else None,
            data_parallel_size=dist.get_world_size())
    return sharded

