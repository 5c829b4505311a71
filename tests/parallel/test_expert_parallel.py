"""Expert parallelism (mesh=ep) equals FSDP: same losses, same expert weights, resumable across ep and world sizes.

Three levels, each against an independent reference:

* the MoE layer on its own, in a spawned gloo world of 4 (ep=2 with two replicas, ep=4; the same processes as the
  trainer's runs on 4 ranks, after them, so the imports are paid once): outputs and expert
  gradients against the same layer run whole in one process on the global batch (the gradient of the mean of the
  ranks' losses), with both expert backends, balanced and with experts that receive no token at all; a planted
  fault (the replicas' gradient sum left out) must change the gradients;
* the optimizer: expert weights sharded over ep go through Muon's local rule (no bucket, no communication);
* the trainer through its real entry point: `mesh=ep` against `mesh=fsdp` on the same ranks (per-step losses, the
  weights and router biases after 5 steps) with muon_split and adamw (the latter with gradient accumulation and
  activation checkpointing) on 2 processes, ep=2 and ep=4 on 4; DCP resumes of an ep=2 checkpoint with ep=1 on
  the same 2 ranks and with ep=1 and ep=4 on 4, and of an fsdp one with ep=2.

Bad mesh values fail with one line and exit 2 before any process group (`test_bad_inputs.py`'s harness).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from gloo_world import THEN_ERROR, spawn_trainer_runs  # noqa: E402
from test_bad_inputs import assert_one_line, run_in_process  # noqa: E402

# Float tolerance of ep against fsdp: the expert weight gradients sum the same terms in another order.
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,world,fragments", [
    (["model=moe_tiny", "mesh=ep", "mesh.ep=3"], 3, ["mesh.ep=3", "must divide model.n_experts=4"]),
    (["model=moe_tiny", "mesh=ep", "mesh.ep=4"], 2, ["mesh.ep=4", "must divide the world size 2"]),
    (["model=dense_tiny", "mesh=ep", "mesh.ep=2"], 2, ["mesh.ep=2", "needs an MoE model", "model=dense_tiny"]),
    (["model=moe_tiny", "mesh=fsdp", "mesh.ep=2"], 2, ["mesh.ep=2", "needs mesh=ep"]),
])
def test_bad_ep_one_line_exit_2_before_any_process_group(tmp_path, monkeypatch, overrides, world, fragments):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", str(world))
    code, err = run_in_process([*overrides, f"run_dir={tmp_path / 'run'}"])
    assert_one_line(code, err, "error: invalid config: ", *fragments)
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# The layer and the optimizer in a spawned world of 4
# ----------------------------------------------------------------------------------------------------------------
TOKENS_PER_RANK = 24


def _moe_config():
    from muon_recipes.config import ModelConfig

    return ModelConfig(name="moe_layer", d_model=32, n_heads=2, n_kv_heads=2, ffn_dim=64, n_experts=4, top_k=2,
                       n_shared_experts=1, expert_ffn_dim=48)


def _layer_case(rank: int, world: int, mesh, backend: str, bias: list, replicas_summed: bool = True):
    """(outputs, local expert grads) of the layer under ep on this rank, and the single-process reference's."""
    import dataclasses

    from muon_recipes.models.moe import MoE
    from muon_recipes.parallel.expert_parallel import shard_experts

    torch.manual_seed(0)
    reference = MoE(_moe_config(), init_std=0.1, down_std=0.1)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.1)
    reference.router.expert_bias.copy_(torch.tensor(bias))
    reference.experts.backend = backend
    inputs = torch.randn(world * TOKENS_PER_RANK, 32, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(world * TOKENS_PER_RANK, 32, generator=torch.Generator().manual_seed(2))

    # The reference: the mean over ranks of each rank's mean loss, on one process.
    out_ref, _, _ = reference(inputs)
    per_rank = (out_ref * weights).sum(-1).view(world, TOKENS_PER_RANK).mean(-1)
    per_rank.mean().backward()

    layer = MoE(_moe_config(), init_std=0.1, down_std=0.1)
    layer.load_state_dict(reference.state_dict())
    layer.experts.backend = backend
    shard_experts(layer, mesh)
    if not replicas_summed:  # planted fault: each ep group keeps its own sum
        layer.experts.expert_parallel = dataclasses.replace(layer.experts.expert_parallel, replica_group=None)
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    out, _, counts = layer(inputs[mine])
    ((out * weights[mine]).sum(-1).mean()).backward()

    ep, ep_rank = mesh.size(1), mesh.get_local_rank(1)
    experts = slice(ep_rank * 4 // ep, (ep_rank + 1) * 4 // ep)
    got = {n: p.grad.to_local() for n, p in layer.experts.named_parameters()}
    want = {n: p.grad[experts] for n, p in reference.experts.named_parameters()}
    return out, out_ref[mine], got, want, counts


def _layer_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    from muon_recipes.parallel.expert_parallel import expert_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for ep in (2, 4):
            mesh = expert_mesh("cpu", world, ep)
            for backend in ("loop", "grouped_mm"):
                # Balanced routing, then experts 2 and 3 starved: under ep=2 rank 1 of every ep group receives no
                # row at all (its experts' gradients are zero), under ep=4 ranks 2 and 3 do.
                for bias in ([0.0, 0.0, 0.0, 0.0], [10.0, 10.0, -10.0, -10.0]):
                    what = f"ep={ep} backend={backend} bias={bias} rank={rank}"
                    out, out_ref, got, want, counts = _layer_case(rank, world, mesh, backend, bias)
                    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
                    for name in want:
                        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7,
                                                   msg=lambda m: f"{what}: grad {name}: {m}")
                    if bias[2] < 0:
                        assert counts[2:].sum() == 0 and counts.sum() == 2 * TOKENS_PER_RANK
                        if mesh.get_local_rank(1) * 4 // ep >= 2:
                            assert all(float(g.abs().max()) == 0 for g in got.values()), what
                        else:
                            assert all(float(g.abs().max()) > 0 for g in got.values()), what
            if ep == 2:  # two replicas of every expert: leaving out their sum must show
                _, _, got, want, _ = _layer_case(rank, world, mesh, "loop", [0.0] * 4, replicas_summed=False)
                worst = max(float((got[n] - want[n]).abs().max()) for n in want)
                assert worst > 1e-4, f"rank {rank}: a missing replica sum went unnoticed ({worst})"
        _check_optimizer_plan(world)
    finally:
        dist.destroy_process_group()


def _check_optimizer_plan(world: int) -> None:
    """The whole stack (FSDP2 + ep=2): expert weights are orthogonalized where they are, with no communication,
    through the optimizer's existing rule; the start-up line says so."""
    from muon_recipes.config import OptimConfig
    from muon_recipes.models import build_model
    from muon_recipes.optim import build_optimizer, describe_param_groups
    from muon_recipes.parallel.distributed import init_distributed

    cfg = _moe_config()
    cfg.n_layers, cfg.vocab_size, cfg.first_dense_layers = 2, 64, 1
    os.environ.update(RANK=str(torch.distributed.get_rank()), WORLD_SIZE=str(world))
    ctx = init_distributed("cpu", "ep", 1, world, ep=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    from muon_recipes.parallel.fsdp import parallelize

    parallelize(model, ctx.mesh, bf16=False, compile=False, activation_checkpointing=False,
                expert_mesh=ctx.expert_mesh)
    optimizer = build_optimizer(model, OptimConfig(ns_dtype="float32", backend="torch"))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(torch.distributed.get_rank()))
    model(tokens).logits.float().mean().backward()
    optimizer.step()
    plan = optimizer._dist_cache["plan"]
    names = {id(p): n for n, p in model.named_parameters()}
    items = [p for g in optimizer.param_groups if g["algorithm"] == "muon" for p in g["params"]]
    local = {names[id(items[i])] for i, block_plan in plan.local if block_plan is not None}
    gathered = {names[id(items[b.members[k]])] for b in plan.buckets for k in range(len(b.members))}
    experts = {n for n in names.values() if ".experts." in n}
    assert experts and experts <= local and not experts & gathered, (experts, local, gathered)
    assert "experts ep=2, Newton-Schulz local" in describe_param_groups(optimizer)


@pytest.mark.distributed
def test_layer_and_optimizer_under_expert_parallelism(runs):
    """Run in the world of 4 of the `runs` fixture, after its trainer jobs (`spawn_trainer_runs(then=...)`): a failed
    check ends that spawn, and the worker's traceback is reported here."""
    error = runs / "spawn-4" / THEN_ERROR
    assert not error.exists(), error.read_text()


# ----------------------------------------------------------------------------------------------------------------
# The trainer: ep against fsdp, and resumes across ep and world sizes
# ----------------------------------------------------------------------------------------------------------------
COMMON = ["device=cpu", "logging.wandb.mode=disabled", "logging.console=false", "logging.progress=false",
          "train.seq_len=64", "data.max_chars=200000", "train.log_every=1", "train.eval_every=0",
          "train.warmup_steps=2", "optim.ns_dtype=float32", "model=moe_tiny", "train.steps=5"]
CHECKPOINTS = ["train.checkpoint.every=2", "train.checkpoint.keep=3"]  # steps 2, 4 and 5
ACCUMULATE = ["train.batch_size=2", "train.grad_accum=2", "train.activation_checkpointing=true"]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _model_state(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, read whole in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint), str(out))
    return torch.load(out, weights_only=True)["model"]


def _assert_close_losses(got: dict, want: dict, steps, what: str) -> None:
    assert sorted(got) == list(steps), (what, got)
    for s in steps:
        assert abs(got[s] - want[s]) <= RTOL * abs(want[s]), (what, s, got, want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep")
    two = [(name, [*args, f"run_dir={root / name}"]) for name, args in {
        "fsdp2-muon": ["optim=muon_split", "mesh=fsdp", "train.batch_size=4", *CHECKPOINTS],
        "ep2-muon": ["optim=muon_split", "mesh=ep", "mesh.ep=2", "train.batch_size=4", *CHECKPOINTS],
    }.items()]
    codes = spawn_trainer_runs(2, two, root / "spawn-2", COMMON)
    step2 = lambda name: f"train.resume={root / name / 'checkpoints' / 'step-000002'}"  # noqa: E731
    # A fresh world for the resume, so that nothing but the files on disk carries over from the straight run.
    two = [(name, [*args, f"run_dir={root / name}"]) for name, args in {
        "ep2-to-ep1-same-world": ["optim=muon_split", "mesh=ep", "mesh.ep=1", "train.batch_size=4", step2("ep2-muon")],
        # The same global batch in 2 micro-batches, recomputed in backward: the expert gradients of both
        # micro-batches add up, and the recomputed forward repeats its all-to-alls.
        "fsdp2-adamw": ["optim=adamw", "mesh=fsdp", *ACCUMULATE],
        "ep2-adamw": ["optim=adamw", "mesh=ep", "mesh.ep=2", *ACCUMULATE],
    }.items()]
    codes.update(spawn_trainer_runs(2, two, root / "spawn-2-resume", COMMON))
    four = [(name, [*args, f"run_dir={root / name}"]) for name, args in {
        "fsdp4-muon": ["optim=muon_split", "mesh=fsdp", "train.batch_size=2"],
        "ep2of4-muon": ["optim=muon_split", "mesh=ep", "mesh.ep=2", "train.batch_size=2"],
        "ep4-muon": ["optim=muon_split", "mesh=ep", "mesh.ep=4", "train.batch_size=2"],
        # DCP across ep sizes and world sizes: ep=2 on 2 ranks -> ep=1 and ep=4 on 4, fsdp on 2 -> ep=2 on 4.
        "ep2-to-ep1": ["optim=muon_split", "mesh=ep", "mesh.ep=1", "train.batch_size=2", step2("ep2-muon")],
        "ep2-to-ep4": ["optim=muon_split", "mesh=ep", "mesh.ep=4", "train.batch_size=2", step2("ep2-muon")],
        "fsdp-to-ep2": ["optim=muon_split", "mesh=ep", "mesh.ep=2", "train.batch_size=2", step2("fsdp2-muon")],
    }.items()]
    # The world of 4 also runs the layer and optimizer checks (after the trainer jobs, in the same processes).
    codes.update(spawn_trainer_runs(4, four, root / "spawn-4", COMMON, then=_layer_worker))
    bad = {k: v for k, v in codes.items() if v[0] != 0}
    assert not bad, bad
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("optim", ["muon_split", "adamw"])
def test_ep2_losses_equal_fsdp_on_two_ranks(runs, optim):
    fsdp, ep = _losses(runs / f"fsdp2-{optim.split('_')[0]}"), _losses(runs / f"ep2-{optim.split('_')[0]}")
    assert fsdp[5] < fsdp[1]
    _assert_close_losses(ep, fsdp, range(1, 6), optim)


@pytest.mark.distributed
def test_ep2_and_ep4_losses_equal_fsdp_on_four_ranks(runs):
    fsdp = _losses(runs / "fsdp4-muon")
    _assert_close_losses(fsdp, _losses(runs / "fsdp2-muon"), range(1, 6), "fsdp, 4 ranks against 2")
    for name in ("ep2of4-muon", "ep4-muon"):
        _assert_close_losses(_losses(runs / name), fsdp, range(1, 6), name)


@pytest.mark.distributed
def test_expert_weights_and_router_biases_after_5_steps_equal_fsdp(runs, tmp_path):
    fsdp = _model_state(runs / "fsdp2-muon" / "checkpoints" / "step-000005", tmp_path / "fsdp.pt")
    ep = _model_state(runs / "ep2-muon" / "checkpoints" / "step-000005", tmp_path / "ep.pt")
    start = _model_state(runs / "fsdp2-muon" / "checkpoints" / "step-000002", tmp_path / "start.pt")
    experts = [n for n in fsdp if ".experts." in n]
    biases = [n for n in fsdp if n.endswith("expert_bias")]
    assert experts and biases and sorted(ep) == sorted(fsdp)
    for name in experts:
        torch.testing.assert_close(ep[name], fsdp[name], rtol=RTOL, atol=1e-6, msg=lambda m: f"{name}: {m}")
        # The control: three Muon steps move every expert far more than the tolerance.
        assert float((fsdp[name] - start[name]).abs().max()) > 1e-3, name
    for name in biases:  # updated from the global token counts: equal, and moved
        assert torch.equal(ep[name], fsdp[name]) and float(fsdp[name].abs().max()) > 0, name
    for name in set(fsdp) - set(experts):
        torch.testing.assert_close(ep[name], fsdp[name], rtol=RTOL, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.distributed
def test_resume_ep2_with_ep1_continues_the_uninterrupted_run(runs):
    """Same 2 ranks, ep=2 checkpoint at step 2 resumed with ep=1 (= fsdp). The first resumed step runs the saved
    weights on the same batch, and a token's expert output does not depend on which rank computes it: its loss is
    the uninterrupted run's, bit for bit. Later steps follow updates whose expert gradients summed the same terms
    in another order, so they agree to float tolerance (in practice they were bit-identical here too)."""
    straight, resumed = _losses(runs / "ep2-muon"), _losses(runs / "ep2-to-ep1-same-world")
    assert resumed[3] == straight[3], (resumed, straight)
    _assert_close_losses(resumed, straight, range(3, 6), "ep=2 -> ep=1")


@pytest.mark.distributed
def test_resume_across_ep_and_world_sizes(runs):
    """An ep=2 checkpoint resumed with ep=1 (and ep=4) on 4 ranks continues the uninterrupted ep=2 run; an fsdp
    one resumed with ep=2 continues the fsdp run."""
    straight_ep, straight_fsdp = _losses(runs / "ep2-muon"), _losses(runs / "fsdp2-muon")
    for name, straight in (("ep2-to-ep1", straight_ep), ("ep2-to-ep4", straight_ep), ("fsdp-to-ep2", straight_fsdp)):
        resumed = _losses(runs / name)
        _assert_close_losses(resumed, straight, range(3, 6), name)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark recipe, at CPU size
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_bench_expert_parallel_on_cpu(tmp_path):
    import subprocess

    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "recipes/bench_expert_parallel.py", "--model", "moe_tiny", "--device", "cpu", "--ep", "1,2,4",
         "--batch-size", "2", "--seq-len", "64", "--steps", "2", "--warmup", "1", "--out", str(out)],
        cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["ep"]: r for r in json.loads(out.read_text())["results"]}
    assert "skipped" in results[4]  # 4 does not divide the world size 2
    for ep in (1, 2):
        r = results[ep]
        assert r["tokens_per_step"] == 2 * 2 * 64
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["step_ms"] / 1e3))
    assert results[1]["all_to_all_ms"] == 0 < results[2]["all_to_all_ms"] < results[2]["step_ms"]
    assert "| 2 |" in proc.stdout and "all-to-all ms/step" in proc.stdout
