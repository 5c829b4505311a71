"""The captured optimizer step without a GPU: everything but the capture itself.

`CapturedStep(capture=False)` runs the path a CUDA graph records -- lr and weight decay read from device
scalars filled before each step, gradients copied into static buffers, AdamW's bias correction computed from
the step counters with tensor ops -- eagerly. It must equal the ordinary float step while an lr schedule moves
lr every step (a stale scalar would show at the second step), on a model with fused QKV split blocks, gate/up
halves, 3-D expert weights and AdamW groups with and without weight decay. Then the auto/on/off decision and
its messages, the config key, and the state dict (lr stays a float). The capture itself is checked on a GPU
(test_cuda_graph_gpu.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from muon_recipes.config import ConfigError, OptimConfig, RunConfig, validate, validate_optim
from muon_recipes.optim import build_optimizer
from muon_recipes.optim.cuda_graph import CapturedStep, CudaGraphUnavailable, capture_blocker
from tests.optim.optim_toy_models import ToyModel, fill_grads

# The device-scalar path rounds lr-derived numbers once to float32 (the float path passes Python doubles to
# kernels that round them to float32 too) and computes AdamW's step size as -lr * (1 / (1 - beta1^t)) in float32
# instead of in double: parameters agree to a few float32 ulps after several steps.
RTOL, ATOL = 2e-6, 1e-7
# The runner steps the optimizer without its patched `step`, which LambdaLR counts.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def _schedule(step: int) -> float:
    return (step + 1) / 3 if step < 3 else 0.5 ** (step - 2)   # warmup, then halving: a new lr every step


def _model_and_optimizer(**options):
    torch.manual_seed(0)
    model = ToyModel()
    cfg = OptimConfig(weight_decay=0.05, backend="torch", ns_dtype="float32")
    cfg.adamw.weight_decay = 0.1
    opt = build_optimizer(model, cfg, **options)
    return model, opt, LambdaLR(opt, _schedule)


def _states_close(opt_a, opt_b, rtol=RTOL, atol=ATOL):
    for (pa, sa), (pb, sb) in zip(opt_a.state.items(), opt_b.state.items()):
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key].cpu(), sb[key].cpu(), rtol=rtol, atol=atol, msg=key)


def test_device_scalar_step_equals_float_step_under_a_schedule():
    model, opt, schedule = _model_and_optimizer(cuda_graph="off")
    ref_model, ref_opt, ref_schedule = _model_and_optimizer(cuda_graph="off")
    runner = CapturedStep(opt, capture=False)
    groups = {g["algorithm"] for g in opt.param_groups}
    assert groups == {"muon", "adamw"} and any(p.ndim == 3 for g in opt.param_groups for p in g["params"])
    lrs = []
    for step in range(6):
        fill_grads(model, step)
        fill_grads(ref_model, step)
        assert runner.step()
        ref_opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        schedule.step()
        ref_schedule.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL)
    assert len(set(lrs)) == 6   # the schedule moved lr at every step
    _states_close(opt, ref_opt)
    # The static buffers (the first step's gradient tensors) hold the last step's gradients, copied: every step
    # gave new gradient tensors.
    assert all(torch.equal(runner.grads[p], p.grad) and runner.grads[p] is not p.grad for p in runner.grads)


def test_gradients_that_stay_the_same_tensors_are_read_in_place():
    """Gradients refilled in place (`zero_grad(set_to_none=False)` and accumulation) are the static buffers
    themselves: the step reads them where they are, and still follows their new values every step."""
    model, opt, schedule = _model_and_optimizer(cuda_graph="off")
    ref_model, ref_opt, ref_schedule = _model_and_optimizer(cuda_graph="off")
    runner = CapturedStep(opt, capture=False)
    fill_grads(model, 0)
    kept = {p: p.grad for p in model.parameters()}
    for step in range(4):
        fill_grads(ref_model, step)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.grad.copy_(q.grad)   # new values, same tensors
        assert runner.step()
        ref_opt.step()
        schedule.step()
        ref_schedule.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL)
    assert all(runner.grads[p] is kept[p] is p.grad for p in runner.grads)


def test_device_scalar_step_follows_the_lr_it_is_given():
    """A step with a stale lr (the scalars not refilled) lands elsewhere: the comparison above has teeth."""
    model, opt, schedule = _model_and_optimizer(cuda_graph="off")
    ref_model, ref_opt, _ = _model_and_optimizer(cuda_graph="off")
    runner = CapturedStep(opt, capture=False)
    fill_grads(model, 0)
    runner.step()
    runner.scalars.fill = lambda groups: None   # keep the first step's values
    schedule.step()
    fill_grads(model, 1)
    runner.step()
    for step in range(2):
        fill_grads(ref_model, step)
        ref_opt.step()
        for g, h in zip(ref_opt.param_groups, opt.param_groups):
            g["lr"] = h["lr"]
    muon = next(p for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"])
    ref = next(p for g in ref_opt.param_groups if g["algorithm"] == "muon" for p in g["params"])
    assert not torch.allclose(muon, ref, rtol=RTOL, atol=ATOL)


def test_a_changed_group_or_loaded_state_rebuilds_the_buffers():
    model, opt, _ = _model_and_optimizer(cuda_graph="off")
    ref_model, ref_opt, _ = _model_and_optimizer(cuda_graph="off")
    runner = CapturedStep(opt, capture=False, warmup_steps=1)
    for step in range(2):
        fill_grads(model, step)
        fill_grads(ref_model, step)
        runner.step()
        ref_opt.step()
    first = runner.signature
    # A parameter without a gradient this step changes the signature: new buffers, the same numbers.
    model.embed.grad = ref_model.embed.grad = None
    fill_grads(model, 2)
    fill_grads(ref_model, 2)
    model.embed.grad = ref_model.embed.grad = None
    runner.step()
    ref_opt.step()
    assert runner.signature != first and model.embed not in runner.grads
    # A loaded state dict drops what the runner holds (a graph would point at the replaced tensors).
    opt._captured = runner
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    assert runner.signature is None and runner.grads == {}
    fill_grads(model, 3)
    fill_grads(ref_model, 3)
    runner.step()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL)


def test_state_dict_keeps_lr_a_float_and_adds_no_key():
    model, opt, schedule = _model_and_optimizer(cuda_graph="off")
    _, plain, _ = _model_and_optimizer(cuda_graph="off")
    runner = CapturedStep(opt, capture=False)
    for step in range(3):
        fill_grads(model, step)
        runner.step()
        schedule.step()
    saved = opt.state_dict()
    assert all(type(g["lr"]) is float and type(g["weight_decay"]) is float for g in saved["param_groups"])
    assert [sorted(g) for g in saved["param_groups"]] == [sorted(g) for g in plain.state_dict()["param_groups"]]


# --------------------------------------------------------------------------------------------------------------
# auto | on | off
# --------------------------------------------------------------------------------------------------------------
def test_auto_on_cpu_says_why_once_and_runs_the_eager_step(capsys):
    model, opt, _ = _model_and_optimizer(cuda_graph="auto")
    ref_model, ref_opt, _ = _model_and_optimizer(cuda_graph="off")
    for step in range(3):
        fill_grads(model, step)
        fill_grads(ref_model, step)
        opt.step()
        ref_opt.step()
    lines = [line for line in capsys.readouterr().out.splitlines() if "CUDA graph" in line]
    assert lines == ["optimizer: CUDA graph off: parameters are on cpu (CUDA graphs need CUDA tensors); "
                     "the step runs eagerly"]
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)   # the very same eager step


def test_on_where_capture_is_impossible_raises_a_clear_error():
    model, opt, _ = _model_and_optimizer(cuda_graph="on")
    fill_grads(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CudaGraphUnavailable, match=r"cuda_graph='on': the optimizer step cannot be captured: "
                                                   r"parameters are on cpu"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # nothing moved


def test_blocker_messages():
    model, opt, _ = _model_and_optimizer(cuda_graph="off")
    assert "parameters are on cpu" in capture_blocker(opt)
    empty = build_optimizer(torch.nn.Linear(2, 2, bias=False), OptimConfig(algorithm="adamw"))
    empty.param_groups[0]["params"] = []
    assert capture_blocker(empty) == "the optimizer has no parameters"


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match=r"cuda_graph='sometimes': must be one of auto, on, off"):
        _model_and_optimizer(cuda_graph="sometimes")


def test_config_key_is_validated():
    cfg = OptimConfig(cuda_graph="yes")
    with pytest.raises(ConfigError, match=r"optim.cuda_graph='yes': must be one of auto, on, off"):
        validate_optim(cfg)
    assert OptimConfig().cuda_graph == "auto"
    for yaml_boolean, mode in ((True, "on"), ("False", "off")):   # a bare on/off in a YAML file
        cfg = OptimConfig(cuda_graph=yaml_boolean)
        validate_optim(cfg)
        assert cfg.cuda_graph == mode
    run = RunConfig(optim=OptimConfig(cuda_graph="on"))
    with pytest.raises(ConfigError, match=r"optim.cuda_graph='on': the step is captured on one process only"):
        validate(run, world_size=2)
    run.device = "cpu"
    with pytest.raises(ConfigError, match=r"optim.cuda_graph='on': CUDA graphs need device=cuda"):
        validate(run, world_size=1)


def test_single_rank_fsdp2_parameters_take_the_local_path():
    """A single-GPU run shards with FSDP2 over one rank: DTensor parameters whose local shard is the whole tensor.
    Their step (float and device-scalar) needs no communication and equals the plain-tensor step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if dist.is_initialized():
        pytest.skip("a process group exists already in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def sharded(**options):
            model, opt, schedule = _model_and_optimizer(**options)
            fully_shard(model, mesh=mesh)
            # fully_shard replaced the parameters: a new optimizer over the DTensors, same groups and keys.
            cfg = OptimConfig(weight_decay=0.05, backend="torch", ns_dtype="float32")
            cfg.adamw.weight_decay = 0.1
            opt = build_optimizer(model, cfg, **options)
            return model, opt, LambdaLR(opt, _schedule)

        def dtensor_grads(model, step):
            fill_grads(model, step)
            for p in model.parameters():
                p.grad = DTensor.from_local(p.grad, p.device_mesh, p.placements)

        plain_model, plain_opt, plain_schedule = _model_and_optimizer(cuda_graph="off")
        float_model, float_opt, float_schedule = sharded(cuda_graph="off")
        device_model, device_opt, device_schedule = sharded(cuda_graph="off")
        assert capture_blocker(device_opt).startswith("parameters are on cpu")   # not the sharding
        runner = CapturedStep(device_opt, capture=False)
        for step in range(4):
            fill_grads(plain_model, step)
            dtensor_grads(float_model, step)
            dtensor_grads(device_model, step)
            plain_opt.step()
            float_opt.step()
            runner.step()
            for schedule in (plain_schedule, float_schedule, device_schedule):
                schedule.step()
        for p, q, r in zip(plain_model.parameters(), float_model.parameters(), device_model.parameters()):
            assert isinstance(q, DTensor)
            assert torch.equal(p.detach(), q.to_local().detach())
            torch.testing.assert_close(r.to_local().detach(), p.detach(), rtol=RTOL, atol=ATOL)
    finally:
        dist.destroy_process_group()


def test_a_step_that_keeps_changing_shape_gives_up_once():
    """After MAX_CAPTURES captures a new signature ends the captured path: one line under auto, an error under on,
    and the optimizer's next steps are its eager ones."""
    from muon_recipes.optim.cuda_graph import MAX_CAPTURES

    model, opt, _ = _model_and_optimizer(cuda_graph="off")
    lines = []
    runner = CapturedStep(opt, capture=False, log=lines.append)
    fill_grads(model, 0)
    assert runner.step()
    runner.captures = MAX_CAPTURES
    model.embed.grad = None   # a new signature
    assert runner.step() is False and runner.gave_up is not None
    assert lines == [f"optimizer: CUDA graph off: the step changed shape after {MAX_CAPTURES} captures (which "
                     "parameters have gradients, or a structural hyperparameter); the step runs eagerly"]
    assert runner.step() is False and len(lines) == 1   # said once
    strict = CapturedStep(opt, capture=False, strict=True)
    fill_grads(model, 1)
    strict.step()
    strict.captures = MAX_CAPTURES
    model.embed.grad = None
    with pytest.raises(CudaGraphUnavailable, match=r"cuda_graph='on': the step changed shape"):
        strict.step()


def test_bench_optimizer_row_says_why_it_is_not_captured(tmp_path):
    """The benchmark's `muon_graph` row on a CPU: not applicable, with the reason, beside the eager row."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "recipes/bench_optimizer.py", "--model", "dense_tiny", "--device", "cpu",
                           "--optimizers", "muon,muon_graph", "--steps", "1", "--warmup", "0", "--no-breakdown",
                           "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["optimizer"]: r for r in json.loads(out.read_text())["models"][0]["results"]}
    assert "median_ms" in rows["muon"] and rows["muon"]["captured"] is False
    assert rows["muon_graph"]["skipped"] == "not captured: parameters are on cpu (CUDA graphs need CUDA tensors)"
    assert "| muon_graph (ours, CUDA graph) |" in proc.stdout
