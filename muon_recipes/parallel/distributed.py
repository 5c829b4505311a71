"""Process-group start-up and the device mesh a run shards over.

Every run, one process included, gets a process group: `python train.py` (no torchrun) starts a world of one
over a local TCP store, so FSDP2 and DTensor code paths are the same everywhere. The backend follows the device:
NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Optional[DeviceMesh]  # None for mesh=single
    replicate: int
    shard: int
    expert_mesh: Optional[DeviceMesh] = None  # mesh=ep with ep > 1: (world/ep, ep), see expert_parallel.py
    ep: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Every rank is a data-parallel rank under FSDP, HSDP and EP (each reads its own share of the batch; no
        tensor/pipeline parallelism here)."""
        return self.rank

    @property
    def dp_world_size(self) -> int:
        return self.world_size


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def resolve_device_type(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def init_distributed(device_type: str, mesh_kind: str, replicate: int, shard: int,
                     timeout_s: float = 1800.0, ep: int = 1) -> DistributedContext:
    """Start the process group (env:// under torchrun, a local store otherwise) and build the mesh(es).

    mesh_kind "ep": the dense mesh of mesh=fsdp, and for ep > 1 the experts' `(world/ep, ep)` mesh."""
    # Plain `python train.py` (no rendezvous address: not under torchrun): a world of one, its rendezvous an
    # in-process store. No port is picked, so nothing else on the machine can take it between the pick and the
    # bind (EADDRINUSE under load).
    store = dist.HashStore() if "MASTER_ADDR" not in os.environ and world_size_from_env() == 1 else None
    if store is not None:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    rank, world_size = rank_from_env(), world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if store is not None:
            kwargs.update(store=store, rank=0, world_size=1)
        if device_type == "cuda":
            kwargs["device_id"] = device  # eager NCCL init, one communicator per device
        dist.init_process_group(**kwargs)
    if mesh_kind == "single":
        mesh = None
    elif mesh_kind in ("fsdp", "ep"):
        mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    else:
        mesh = init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
    experts = None
    if mesh_kind == "ep" and ep > 1:
        from muon_recipes.parallel.expert_parallel import expert_mesh

        experts = expert_mesh(device_type, world_size, ep)
    return DistributedContext(rank, world_size, local_rank, device, mesh, replicate, shard, experts,
                              ep if mesh_kind == "ep" else 1)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks (in place on a copy); identity for a world of one."""
    out = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    out = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (used for the run directory at start-up)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
