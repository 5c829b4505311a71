"""The captured optimizer step on a GPU: a replayed CUDA graph equals the eager step (skipped without CUDA).

Three optimizers over copies of the same parameters, fed the same fresh gradient tensors each step while an lr
schedule moves lr every step:

* `cuda_graph="on"`: two eager warm-up steps, then one capture and replays;
* the same device-scalar step run eagerly every time (`CapturedStep(capture=False)`): the graph must equal it
  bit for bit (the same kernels on the same inputs; only the launching differs);
* the ordinary float step (`cuda_graph="off"`): equal within float32 rounding of the lr-derived numbers.

The parameter set has a fused QKV weight split into (q, k, v) blocks, a fused gate/up weight, 3-D expert
weights, a 2048 x 2048 matrix (large enough for the one-pass Triton update, which then reads its scalars from
memory), a small matrix on the torch Newton-Schulz path, AdamW groups with and without weight decay, and one
parameter that never gets a gradient. A second test does the same for a single-GPU FSDP2 model (DTensor
parameters on a mesh of one rank), the trainer's layout on one GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from muon_recipes.optim import Muon
from muon_recipes.optim.cuda_graph import WARMUP_STEPS, CapturedStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")]

STEPS = 8
SHAPES = {"qkv": (1024, 512), "gate_up": (2048, 512), "experts_up": (8, 256, 512), "experts_down": (8, 512, 256),
          "big": (2048, 2048), "small": (64, 96), "embed": (1000, 512), "head": (1000, 512), "norm": (512,),
          "unused": (32, 32)}
# Against the float step: lr, 1 - lr wd and -lr ratio rounded to float32 once instead of passed as doubles that
# the kernels round to float32, and AdamW's step size from a float32 lr. A few ulps of the weights per step.
RTOL, ATOL = 1e-5, 1e-6


def _schedule(step: int) -> float:
    return (step + 1) / 3 if step < 3 else 0.7 ** (step - 2)


def _groups(params: dict) -> list[dict]:
    return [dict(params=[params["qkv"]], split_sizes=(512, 256, 256)),
            dict(params=[params["gate_up"]], split_sizes=(1024, 1024)),
            dict(params=[params["experts_up"], params["experts_down"]], experts="per_expert"),
            dict(params=[params["big"], params["small"], params["unused"]], weight_decay=0.1),
            dict(params=[params["embed"], params["norm"]], algorithm="adamw", lr=3e-3, weight_decay=0.0),
            dict(params=[params["head"]], algorithm="adamw", lr=2e-3, weight_decay=0.1)]


def _params(device: str = "cuda") -> dict:
    gen = torch.Generator().manual_seed(0)
    return {k: nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for k, s in SHAPES.items()}


def _gradients(step: int, device: str = "cuda") -> dict:
    gen = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(s, generator=gen).to(device) for k, s in SHAPES.items() if k != "unused"}


def _run(params: dict, mode: str, wrap_grad=lambda p, g: g) -> tuple[dict, Muon]:
    """STEPS steps of `mode`: "graph", "device_eager" or "float"."""
    opt = Muon(_groups(params), lr=0.02, weight_decay=0.01, cuda_graph="on" if mode == "graph" else "off")
    schedule = LambdaLR(opt, _schedule)
    runner = CapturedStep(opt, capture=False) if mode == "device_eager" else None
    for step in range(STEPS):
        for k, g in _gradients(step).items():
            params[k].grad = wrap_grad(params[k], g)   # fresh tensors every step, as after zero_grad(set_to_none)
        if runner is not None:
            runner.step()
        else:
            opt.step()
        schedule.step()
    torch.cuda.synchronize()
    return params, opt


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _compare(a: tuple, b: tuple, exact: bool) -> None:
    (pa, oa), (pb, ob) = a, b
    pairs = [(f"param {k}", _local(pa[k].detach()), _local(pb[k].detach())) for k in pa]
    for (p, sa), (q, sb) in zip(oa.state.items(), ob.state.items()):
        pairs += [(f"state {key} of {tuple(p.shape)}", _local(sa[key]), _local(sb[key])) for key in sa]
    for name, x, y in pairs:
        if exact:
            assert torch.equal(x, y), f"{name}: max difference {(x.double() - y.double()).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=name)


def test_captured_step_equals_eager_step():
    graph = _run(_params(), "graph")
    device_eager = _run(_params(), "device_eager")
    float_step = _run(_params(), "float")
    runner = graph[1]._captured
    assert runner is not None and runner.graph is not None and runner.captures == 1, "the step was not captured"
    assert graph[1]._graph_blocked is None
    _compare(graph, float_step, exact=False)   # first: a failure of the exact check below still had this one
    _compare(graph, device_eager, exact=True)
    # The steps moved the weights (an optimizer that did nothing would match an untouched copy too), the one
    # without a gradient stayed, and the AdamW step counters count every step, warm-up, capture and replays.
    start = _params()
    assert not torch.allclose(graph[0]["big"], start["big"])
    assert torch.equal(graph[0]["unused"], start["unused"])
    assert float(graph[1].state[graph[0]["head"]]["step"]) == STEPS
    assert STEPS > WARMUP_STEPS + 2   # at least two replays after the capture


def test_captured_step_equals_eager_step_on_single_gpu_fsdp2():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if dist.is_initialized():
        pytest.skip("a process group exists already in this process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("shard",))

        def sharded_params() -> dict:
            holder = nn.Module()
            holder.weights = nn.ParameterDict(_params())
            fully_shard(holder, mesh=mesh)
            return dict(holder.weights.items())

        def as_dtensor(p, g):
            return DTensor.from_local(g, p.device_mesh, p.placements)

        graph = _run(sharded_params(), "graph", as_dtensor)
        device_eager = _run(sharded_params(), "device_eager", as_dtensor)
        assert all(isinstance(p, DTensor) for p in graph[0].values())
        assert graph[1]._captured is not None and graph[1]._captured.graph is not None
        _compare(graph, device_eager, exact=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode,main_priority", [("graph", "0"), ("device_eager", "0"), ("graph", "-1")])
def test_two_stream_step_equals_the_one_stream_step(monkeypatch, mode, main_priority):
    """The captured step runs its momentum, AdamW and weight updates on a side stream beside the Newton-Schulz
    products (`step_streams.py`, on by default there from the second device step): the same numbers as the
    one-stream order bit for bit, captured and run eagerly on the two streams (a missing wait would show as a
    race: a product reading a bucket before its momentum is written, an update reading a result too early).
    With a main-stream priority the graph is instantiated with its kernels' own priorities (`PrioritizedGraph`)."""
    from muon_recipes.optim import step_streams
    from muon_recipes.optim.cuda_graph import PrioritizedGraph

    monkeypatch.setenv("MUON_MAIN_STREAM_PRIORITY", main_priority)

    chosen = []
    choose = step_streams.for_step
    monkeypatch.setattr(step_streams, "for_step", lambda *args, **kw: chosen.append(choose(*args, **kw)) or chosen[-1])
    monkeypatch.setenv("MUON_STEP_STREAMS", "auto")
    two = _run(_params(), mode)
    assert any(isinstance(s, step_streams.TwoStreams) for s in chosen), "the two-stream schedule never ran"
    assert chosen[0] is None   # the first device step times the plans on one stream
    if mode == "graph":
        assert isinstance(two[1]._captured.graph, PrioritizedGraph) == (main_priority != "0")
    monkeypatch.setenv("MUON_STEP_STREAMS", "0")
    one = _run(_params(), mode)
    _compare(two, one, exact=True)
