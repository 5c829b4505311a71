"""`parallel/`: the process group and mesh a run starts with, the collectives the trainer averages with, and
`parallelize` (FSDP2 per block and at the root), on a world of one and on 2 gloo CPU processes. The sharded
model is checked against the same model unsharded."""

import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from muon_recipes.parallel.distributed import (all_reduce_mean, all_reduce_sum, broadcast_object, init_distributed,
                                               resolve_device_type, shutdown_distributed)
from muon_recipes.parallel.fsdp import parallelize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gloo_world import joined_world, rendezvous_files  # noqa: E402


class Stack(nn.Module):
    """What `parallelize` expects of a model: its blocks in `.layers`, each with an activation_checkpointing flag."""

    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


def test_device_type_auto_follows_the_machine():
    assert resolve_device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device_type("cpu") == "cpu"


def test_plain_python_starts_a_world_of_one(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    ctx = init_distributed("cpu", "fsdp", replicate=1, shard=0)
    try:
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (0, 1, 0, True)
        assert dist.get_backend() == "gloo" and ctx.device == torch.device("cpu")
        assert ctx.mesh.mesh_dim_names == ("shard",) and ctx.mesh.size() == 1
        value = torch.tensor([1.5, -2.0])
        mean = all_reduce_mean(value)
        assert torch.equal(mean, value) and mean.data_ptr() != value.data_ptr()
        assert torch.equal(all_reduce_sum(value), value)
        assert broadcast_object({"run_dir": "x"}) == {"run_dir": "x"}
    finally:
        shutdown_distributed()
    assert not dist.is_initialized()


def _worker(rank: int, world: int, init_file: str) -> None:
    from torch.distributed.tensor import DTensor, Shard

    with joined_world(rank, world, init_file):
        ctx = init_distributed("cpu", "fsdp", replicate=1, shard=0)   # joins the group already started
        assert (ctx.rank, ctx.world_size) == (rank, world) and ctx.mesh.size() == world
        hsdp = init_distributed("cpu", "hsdp", replicate=world, shard=1).mesh
        assert hsdp.mesh_dim_names == ("replicate", "shard") and tuple(hsdp.shape) == (world, 1)

        value = torch.tensor([float(rank), 10.0 * rank + 1])
        expected_sum = torch.tensor([sum(range(world)), 10.0 * sum(range(world)) + world])
        assert torch.equal(all_reduce_sum(value), expected_sum)
        assert torch.allclose(all_reduce_mean(value), expected_sum / world)
        assert torch.equal(value, torch.tensor([float(rank), 10.0 * rank + 1]))   # the input is left alone
        assert broadcast_object(f"dir-of-rank-{rank}") == "dir-of-rank-0"

        torch.manual_seed(0)
        model = Stack()
        reference = Stack()
        reference.load_state_dict(model.state_dict())
        parallelize(model, ctx.mesh, bf16=False, compile=False, activation_checkpointing=True)
        assert all(layer.activation_checkpointing for layer in model.layers)
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
            torch.testing.assert_close(p.full_tensor(), reference.get_parameter(name), rtol=0, atol=0)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
        torch.testing.assert_close(model(x), reference(x), rtol=1e-6, atol=1e-6)
        model(x).square().sum().backward()
        reference(x).square().sum().backward()
        # FSDP2 averages gradients over ranks: the reference's gradient of this rank's batch, averaged.
        for name, p in model.named_parameters():
            local = reference.get_parameter(name).grad
            mean = all_reduce_mean(local)
            torch.testing.assert_close(p.grad.full_tensor(), mean, rtol=1e-5, atol=1e-6)
        dist.barrier()


@pytest.mark.distributed
def test_two_gloo_processes_mesh_collectives_and_parallelize():
    with tempfile.TemporaryDirectory() as tmp:
        (init_file,) = rendezvous_files(Path(tmp), 1)
        mp.spawn(_worker, args=(2, init_file), nprocs=2, join=True)


def test_parallelize_without_a_mesh_only_sets_the_block_switches():
    model = Stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parallelize(model, None, bf16=True, compile=False, activation_checkpointing=True) is model
    assert all(layer.activation_checkpointing for layer in model.layers)
    assert all(torch.equal(before[k], v) and type(v) is torch.Tensor for k, v in model.state_dict().items())
