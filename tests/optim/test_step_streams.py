"""The two-stream schedule of a single-process step (`step_streams.py`, `Muon._two_stream_step`) on CPU.

On a GPU the momentum, AdamW and the weight updates run on a side stream beside the Newton-Schulz products. Off
the GPU `MUON_STEP_STREAMS=1` runs the same schedule on one stream (every event is then a no-op), which is what
can be checked here: the reordered step -- momentum per bucket, Newton-Schulz per bucket smallest first, each
weight applied once its last bucket is done -- must give the one-stream step's weights and optimizer state bit for
bit, eager and on the device-scalar path, on a model with fused QKV and gate/up blocks, 3-D experts and AdamW
groups. (The bucket path's strided kernels under the schedule run in the interpreter: test_bucket_io.py. The
two real streams, captured, against the eager step: test_cuda_graph_gpu.py.)
"""

from __future__ import annotations

import pytest
import torch

from muon_recipes.choices import STEP_STREAMS_DEFAULT
from muon_recipes.config import ConfigError, OptimConfig, RunConfig, validate
from muon_recipes.optim import build_optimizer, orthogonalize, step_streams
from muon_recipes.optim.blocks import BlockPlan
from muon_recipes.optim.cuda_graph import CapturedStep
from muon_recipes.optim.orthogonalize import BucketLayout, NSSettings
from tests.optim.optim_toy_models import ToyModel, fill_grads

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def _run(monkeypatch, streams: str, device_scalars: bool, steps: int = 4):
    monkeypatch.setenv("MUON_STEP_STREAMS", streams)
    torch.manual_seed(0)
    model = ToyModel()
    cfg = OptimConfig(weight_decay=0.05, backend="torch", ns_dtype="float32")
    cfg.adamw.weight_decay = 0.1
    opt = build_optimizer(model, cfg, cuda_graph="off")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    runner = CapturedStep(opt, capture=False) if device_scalars else None
    for step in range(steps):
        fill_grads(model, step)
        if runner is not None:
            assert runner.step()
        else:
            opt.step()
        schedule.step()
    return model, opt


@pytest.mark.parametrize("device_scalars", [False, True], ids=["eager", "device_scalars"])
def test_the_schedule_gives_the_one_stream_step_bit_for_bit(monkeypatch, device_scalars):
    """With the largest bucket split in two (as dense_1b's is; the toy model's buckets are far below the size
    where that starts, so the threshold is lowered here)."""
    monkeypatch.setattr(orthogonalize, "SPLIT_MIN_ELEMENTS", 0)
    calls = []
    reordered = BucketLayout.run_bucket

    def counted(layout, key, fill=None):
        calls.append(layout.sizes[key] * key[0][0] * key[0][1])
        return reordered(layout, key, fill)

    monkeypatch.setattr(BucketLayout, "run_bucket", counted)
    model, opt = _run(monkeypatch, "1", device_scalars)
    # The first step kept the jobs' order of buckets (one stream: it times the plans); every later step ran them
    # smallest first (the schedule's order).
    per_step = len(calls) // 4
    steps = [calls[i:i + per_step] for i in range(0, len(calls), per_step)]
    assert per_step >= 3 and steps[0] != sorted(steps[0])
    assert all(later == sorted(steps[0]) for later in steps[1:])
    assert len(calls) == 4 * per_step   # every step, the first included, ran the split layout
    ref_model, ref_opt = _run(monkeypatch, "0", device_scalars)
    torch.manual_seed(0)
    initial = ToyModel()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, initial.get_parameter(name)), name   # every parameter was stepped
    for (p, state), (_, ref_state) in zip(opt.state.items(), ref_opt.state.items()):
        assert state.keys() == ref_state.keys()
        for key in state:
            assert torch.equal(state[key], ref_state[key]), key


def test_buckets_run_smallest_first():
    ns = NSSettings(5, "keller", torch.float32, "torch", 1e-7)
    plans = [BlockPlan.build((96, 16), (48, 48), "per_expert"),   # two tall 48 x 16 halves: bucket 16 x 48, 2
             BlockPlan.build((8, 16), None, "per_expert"),         # bucket 8 x 16, 1
             BlockPlan.build((3, 16, 16), None, "per_expert")]     # bucket 16 x 16, 3
    layout = BucketLayout([(plan, ns, torch.device("cpu")) for plan in plans])
    assert [key[0] for key in layout.order()] == [(8, 16), (16, 16), (16, 48)]
    assert [key[0] for key in layout.members] == [(16, 48), (8, 16), (16, 16)]
    assert layout.bucket_of(0, 0)[0] == (16, 48) and layout.jobs_in(layout.order()[2]) == [0]


def test_the_largest_bucket_splits_at_block_boundaries(monkeypatch):
    ns = NSSettings(5, "keller", torch.float32, "torch", 1e-7)
    plans = [BlockPlan.build((5, 16, 16), None, "per_expert"),    # 5 matrices of 16 x 16 at once
             BlockPlan.build((32, 16), (16, 16), "per_expert"),    # two 16 x 16 blocks: one run of two slots
             BlockPlan.build((8, 16), None, "per_expert"),
             BlockPlan.build((16, 16), None, "per_expert")]
    jobs = [(plan, ns, torch.device("cpu")) for plan in plans]
    whole = BucketLayout(jobs)
    assert sorted(whole.sizes.values()) == [1, 8]   # 16 x 16: 5 + 2 + 1 matrices; 8 x 16: 1
    monkeypatch.setattr(orthogonalize, "SPLIT_MIN_ELEMENTS", 8 * 16 * 16)
    split = BucketLayout(jobs, parts=2)
    square = sorted((key[3], count) for key, count in split.sizes.items() if key[0] == (16, 16))
    # Split where a block starts at or past the middle (matrix 4 of 8): the 5 experts stay together in part 0.
    assert square == [(0, 5), (1, 3)] and split.slots[1][0].key[3] == 1
    assert split.runs(1) == [(0, 2)]   # the two blocks still one run, both in part 1, consecutive there
    assert (split.slots[1][0].start, split.slots[1][1].start, split.slots[3][0].start) == (0, 1, 2)
    assert [key[3] for key in split.order()] == [0, 1, 0]   # 8 x 16 (1), then part 1 (3), part 0 (5)
    monkeypatch.setattr(orthogonalize, "SPLIT_MIN_ELEMENTS", 8 * 16 * 16 + 1)
    assert BucketLayout(jobs, parts=2).sizes == whole.sizes   # below the threshold: not split


def test_where_the_schedule_applies(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("MUON_STEP_STREAMS", raising=False)
    assert step_streams.mode() == STEP_STREAMS_DEFAULT == "auto"
    monkeypatch.setenv("MUON_STEP_STREAMS", "auto")
    # "auto": only the captured step on a GPU, after the step that timed the plans; never off the GPU.
    assert step_streams.for_step(cpu, captured=True, plans_timed=True) is None
    assert step_streams.for_step(cuda, captured=True, plans_timed=False) is None
    assert step_streams.for_step(cuda, captured=False, plans_timed=True) is None
    monkeypatch.setenv("MUON_STEP_STREAMS", "1")
    assert type(step_streams.for_step(cpu, captured=False, plans_timed=True)) is step_streams.InlineStreams
    assert step_streams.for_step(cpu, captured=True, plans_timed=False) is None   # the first step: one stream
    monkeypatch.setenv("MUON_STEP_STREAMS", "0")
    assert step_streams.for_step(cpu, captured=True, plans_timed=True) is None
    monkeypatch.setenv("MUON_STEP_STREAMS", "yes")
    with pytest.raises(ValueError, match=r"MUON_STEP_STREAMS='yes': must be one of auto, 0, 1"):
        step_streams.mode()
    for bad in ("1", "high"):
        monkeypatch.setenv("MUON_SIDE_STREAM_PRIORITY", bad)
        with pytest.raises(ValueError, match=rf"MUON_SIDE_STREAM_PRIORITY='{bad}': expected 0 or a negative"):
            step_streams.side_priority()
    monkeypatch.setenv("MUON_SIDE_STREAM_PRIORITY", "-1")
    assert step_streams.side_priority() == -1
    assert step_streams.keeps_priorities()
    monkeypatch.setenv("MUON_SIDE_STREAM_PRIORITY", "0")
    assert not step_streams.keeps_priorities()
    monkeypatch.setenv("MUON_MAIN_STREAM_PRIORITY", "-2")
    assert step_streams.main_priority() == -2 and step_streams.keeps_priorities()
    assert step_streams.side_programs_per_sm() == 0
    monkeypatch.setenv("MUON_SIDE_PROGRAMS_PER_SM", "2")
    assert step_streams.side_programs_per_sm() == 2
    monkeypatch.setenv("MUON_SIDE_PROGRAMS_PER_SM", "two")
    with pytest.raises(ValueError, match=r"MUON_SIDE_PROGRAMS_PER_SM='two': expected 0 or a positive integer"):
        step_streams.side_programs_per_sm()
    monkeypatch.setenv("MUON_MAIN_STREAM_PRIORITY", "1")
    with pytest.raises(ValueError, match=r"MUON_MAIN_STREAM_PRIORITY='1': expected 0 or a negative"):
        step_streams.main_priority()


@pytest.mark.parametrize("variable, value, message", [
    ("MUON_STEP_STREAMS", "yes", "must be one of auto, 0, 1"),
    ("MUON_SIDE_STREAM_PRIORITY", "2", "must be 0 or a negative integer"),
    ("MUON_SIDE_STREAM_PRIORITY", "high", "must be 0 or a negative integer"),
    ("MUON_MAIN_STREAM_PRIORITY", "-x", "must be 0 or a negative integer"),
    ("MUON_SIDE_PROGRAMS_PER_SM", "-1", "must be 0 \\(one program per block\\) or a positive integer"),
    ("MUON_NS_PLAN_TIMING", "cuda_graph", "must be one of launch, graph")])
def test_a_runs_bad_stream_setting_is_refused_before_it_starts(monkeypatch, variable, value, message):
    """A run's config validation (before any process group or GPU) checks both variables, as it checks
    MUON_NS_AUTOTUNE: one line naming the variable, the value and what is valid."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=rf"invalid config: {variable}='{value}': {message}"):
        validate(RunConfig(), world_size=1)
    monkeypatch.delenv(variable)
    validate(RunConfig(), world_size=1)


def test_the_first_device_step_of_each_build_stays_on_one_stream(monkeypatch):
    """The first step, and the first after the captured step is (re)built, times the Newton-Schulz plans of its
    shapes: it must not get the two streams; the steps after it may."""
    asked = []
    choose = step_streams.for_step

    def recorded(device, captured, plans_timed):
        asked.append((captured, plans_timed))
        return choose(device, captured, plans_timed)

    monkeypatch.setattr(step_streams, "for_step", recorded)
    torch.manual_seed(0)
    model = ToyModel()
    opt = build_optimizer(model, OptimConfig(backend="torch", ns_dtype="float32"), cuda_graph="off")
    runner = CapturedStep(opt, capture=False)
    for step in range(3):
        fill_grads(model, step)
        runner.step()
    opt.param_groups[0]["momentum"] = 0.9   # a structural key: the step is rebuilt
    for step in range(2):
        fill_grads(model, step)
        runner.step()
    opt.step()   # an eager step: no device scalars
    assert asked == [(True, False), (True, True), (True, True), (True, False), (True, True), (False, True)]
