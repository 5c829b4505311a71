"""Muon under FSDP2 (and HSDP) on CPU processes with gloo equals Muon on one process.

One spawn per world size; each worker runs several scenarios against a single-process reference that it
computes itself (same initial weights, same gradients). Newton-Schulz runs in float32 where exactness is the
point. Every scenario that checks assembly also runs with the shards deliberately assembled in the wrong
order, which must change the result (so the comparison can fail).
"""

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

pytestmark = pytest.mark.distributed

STEPS = 3


def _cfg(split: bool, ns_dtype: str = "float32"):
    from muon_recipes.config import OptimConfig

    cfg = OptimConfig(ns_dtype=ns_dtype, backend="torch", weight_decay=0.05, lr=0.05)
    if not split:
        cfg.split.qkv, cfg.split.gate_up, cfg.split.experts = "fused", "fused", "fused"
    return cfg


def _reference(cfg, steps, backward: bool):
    """The single-process run: plain tensors, the same initial weights and gradients."""
    from muon_recipes.optim import build_optimizer
    from optim_toy_models import ToyModel, fill_grads

    torch.manual_seed(0)
    model = ToyModel()
    opt = build_optimizer(model, cfg)
    for step in range(steps):
        if backward:
            model(_tokens(step, ranks=None)).backward()
        else:
            fill_grads(model, step)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _tokens(step: int, ranks):
    """The global batch of a step, or (with `ranks` = (rank, world)) this rank's equal share of it."""
    from optim_toy_models import VOCAB

    tokens = torch.randint(0, VOCAB, (12, 5), generator=torch.Generator().manual_seed(step))
    if ranks is None:
        return tokens
    rank, world = ranks
    return tokens.chunk(world)[rank]


def _sharded(cfg, mesh, steps, backward: bool, **optim_options):
    """The same run with the model under fully_shard on `mesh`; returns the model and the optimizer."""
    model, opt = _build_sharded(cfg, mesh, **optim_options)
    _run_sharded(model, opt, mesh, range(steps), backward)
    return model, opt


def _build_sharded(cfg, mesh, seed: int = 0, **optim_options):
    from torch.distributed.fsdp import fully_shard

    from muon_recipes.optim import build_optimizer
    from optim_toy_models import ToyModel

    torch.manual_seed(seed)
    model = ToyModel()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, build_optimizer(model, cfg, **optim_options)


def _run_sharded(model, opt, mesh, steps, backward: bool):
    from torch.distributed.tensor import distribute_tensor

    from optim_toy_models import ToyModel, fill_grads

    holder = ToyModel()  # only a holder for full-size gradients
    for step in steps:
        if backward:
            # FSDP2 averages gradients over the shard group; every rank gets an equal share of the batch.
            model(_tokens(step, ranks=(mesh.get_local_rank(-1), mesh.size(-1)))).backward()
        else:
            fill_grads(holder, step)
            for p, full in zip(model.parameters(), holder.parameters()):
                p.grad = distribute_tensor(full.grad, mesh, p.placements)
        opt.step()
        opt.zero_grad()


def _full(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _assert_same(got, want, rtol, atol, what):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {name}: {m}")


def _assert_differs(got, want, names, what):
    worst = max(float((got[n] - want[n]).abs().max()) for n in names)
    assert worst > 1e-3, f"{what}: wrong assembly went unnoticed (max difference {worst})"


def _init(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _fsdp_worker(rank, world, init_file):
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    from muon_recipes.optim import sharded

    _init(rank, world, init_file)
    mesh = init_device_mesh("cpu", (world,))
    try:
        # Split policy with one matrix per bucket (a long pipeline of gathers and scatters), then the fused
        # policy with default buckets (3-D experts assembled across ranks).
        for split, bucket_mb in ((True, 1e-4), (False, 256.0)):
            cfg = _cfg(split)
            model, opt = _sharded(cfg, mesh, STEPS, backward=False, bucket_mb=bucket_mb)
            _assert_same(_full(model), _reference(cfg, STEPS, backward=False), 1e-5, 1e-6,
                         f"fsdp world={world} split={split}")
            timings = opt.last_step_timings
            assert timings["comm"] > 0 and timings["ns"] > 0 and timings["total"] >= timings["ns"]

        # bf16 Newton-Schulz (the default): shards travel in bf16; equal to bf16 tolerance.
        cfg = _cfg(split=True, ns_dtype="bfloat16")
        model, _ = _sharded(cfg, mesh, STEPS, backward=False)
        _assert_same(_full(model), _reference(cfg, STEPS, backward=False), 1e-2, 1e-3, "bf16")

        # Real forward/backward: FSDP2's reduce-scatter produces the gradient shards.
        cfg = _cfg(split=True)
        model, _ = _sharded(cfg, mesh, 2, backward=True)
        _assert_same(_full(model), _reference(cfg, 2, backward=True), 1e-4, 1e-5, "backward")

        # DCP state dicts of the sharded optimizer: a fresh model + optimizer that loads them continues identically.
        cfg = _cfg(split=True)
        model, opt = _sharded(cfg, mesh, 2, backward=False)
        osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
        msd = copy.deepcopy(get_model_state_dict(model))
        fresh, fresh_opt = _build_sharded(cfg, mesh, seed=1)
        set_model_state_dict(fresh, msd)
        set_optimizer_state_dict(fresh, fresh_opt, osd)
        _run_sharded(model, opt, mesh, range(2, 4), backward=False)
        _run_sharded(fresh, fresh_opt, mesh, range(2, 4), backward=False)
        _assert_same(_full(fresh), _full(model), 0, 0, "dcp round trip")

        # Planted fault: shards assembled in reverse order must change the assembled matrices' updates.
        real = sharded.assemble_shards
        sharded.assemble_shards = lambda shards, dim: real(list(shards)[::-1], dim)
        try:
            cfg = _cfg(split=False)
            model, _ = _sharded(cfg, mesh, STEPS, backward=False)
            _assert_differs(_full(model), _reference(cfg, STEPS, backward=False),
                            ["blocks.0.wo", "blocks.1.down", "blocks.0.tiny", "blocks.0.qkv",
                             "blocks.1.experts_gate_up"], f"fsdp world={world}")
        finally:
            sharded.assemble_shards = real
    finally:
        dist.destroy_process_group()


def _hsdp_worker(rank, world, init_file):
    from torch.distributed.device_mesh import init_device_mesh

    from muon_recipes.optim import sharded

    _init(rank, world, init_file)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    try:
        cfg = _cfg(split=True)
        want = _reference(cfg, STEPS, backward=False)
        for spread in (True, False):
            model, _ = _sharded(cfg, mesh, STEPS, backward=False, replica_spread=spread)
            # Replicas must hold bit-identical shards.
            replica_group = mesh.get_group("replicate")
            for name, p in model.named_parameters():
                local = p.to_local().detach().contiguous()
                copies = [torch.empty_like(local) for _ in range(2)]
                dist.all_gather(copies, local, group=replica_group)
                assert torch.equal(copies[0], copies[1]), f"hsdp spread={spread}: replicas differ on {name}"
            _assert_same(_full(model), want, 1e-5, 1e-6, f"hsdp spread={spread}")

        real = sharded.assemble_shards
        sharded.assemble_shards = lambda shards, dim: real(list(shards)[::-1], dim)
        try:
            model, _ = _sharded(cfg, mesh, STEPS, backward=False, replica_spread=True)
            _assert_differs(_full(model), want, ["blocks.0.wo", "blocks.1.down"], "hsdp")
        finally:
            sharded.assemble_shards = real
    finally:
        dist.destroy_process_group()


def _spawn(worker, world, tmp_path):
    mp.spawn(worker, args=(world, str(tmp_path / "init")), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_equals_single_process(world, tmp_path):
    _spawn(_fsdp_worker, world, tmp_path)


def test_hsdp_2x2_replicas_identical_and_equal_single_process(tmp_path):
    _spawn(_hsdp_worker, 4, tmp_path)
