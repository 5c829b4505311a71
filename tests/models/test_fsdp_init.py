"""`init_weights` runs on FSDP2-sharded (DTensor) parameters after `to_empty`, on 2 CPU processes with gloo."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muon_recipes.config import ModelConfig
from muon_recipes.models import build_model

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16,
                  n_experts=4, top_k=2, expert_ffn_dim=24, n_shared_experts=1, first_dense_layers=1)


def _worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # An explicit CPU mesh: without one, fully_shard takes the accelerator's device type on GPU machines.
        mesh = init_device_mesh("cpu", (world,))
        with torch.device("meta"):
            model = build_model(CFG)
        for block in model.layers:
            block.activation_checkpointing = True
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.fill_(float("nan"))
        torch.manual_seed(0)
        model.init_weights()
        assert all(isinstance(p, DTensor) for p in model.parameters())
        for name, p in model.named_parameters():
            full = p.full_tensor()
            assert torch.isfinite(full).all(), name
            if p.ndim == 1:
                assert torch.equal(full, torch.ones_like(full)), name
        assert all(torch.isfinite(b).all() for b in model.buffers())
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
        out = model(tokens)
        (out.logits.pow(2).mean() + out.aux_loss).backward()
        assert all(torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())
        counts = model.expert_load_counts()
        for c in counts:
            dist.all_reduce(c)
        model.update_router_biases(counts)
        torch.save([m.router.expert_bias for m in model.moe_layers()], os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_init_forward_backward_and_bias_update_under_fully_shard():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        biases = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    for a, b in zip(*biases):  # the same all-reduced counts give the same bias on every rank
        assert torch.equal(a, b) and a.abs().sum() > 0
