"""Process groups, device meshes and FSDP2 application."""

from muon_recipes.parallel.distributed import DistributedContext, init_distributed, shutdown_distributed
from muon_recipes.parallel.fsdp import parallelize

__all__ = ["DistributedContext", "init_distributed", "shutdown_distributed", "parallelize"]
