"""Process groups, device meshes, FSDP2 application (`fsdp.py`) and expert parallelism (`expert_parallel.py`, imported
where it is used: it pulls in DTensor and the MoE layer)."""

from muon_recipes.parallel.distributed import DistributedContext, init_distributed, shutdown_distributed
from muon_recipes.parallel.fsdp import parallelize

__all__ = ["DistributedContext", "init_distributed", "shutdown_distributed", "parallelize"]
