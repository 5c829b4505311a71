"""The momentum written straight into the Newton-Schulz buckets, and the update applied from them, on CPU.

`Muon`'s single-process step moves a weight through its buckets without copies where
`dispatch.bucket_io_on_triton` says so (by default the captured step; `MUON_BUCKET_IO=1` every step): the strided momentum kernel writes each row block's update into its slot
(transposed for a tall block) and the strided weight update reads each block's result from its slot
(`kernels/elementwise.py`, `orthogonalize.BucketLayout`). Triton's interpreter runs those kernels on CPU
tensors, so here, as in test_kernels.py, one child process with `TRITON_INTERPRET=1` (this file as a script)
runs them and prints JSON:

* each strided kernel against the one-pass contiguous kernel on contiguous copies of the same data, bit for
  bit, on a transposed destination, a row block of a 3-D tensor and a fused-experts view, and against float64;
  and both kernels launched as two programs that loop over the blocks (`fast_launch.bounded_programs`) against
  one program per block, bit for bit;
* the toy model's three reference settings (`step_reference.SETTINGS`: split and fused QKV and gate/up, per-expert
  and fused experts, Nesterov on and off, weight decay, bf16 and fp32 buckets) stepped through the bucket path,
  against the same steps with the path off (`MUON_BUCKET_IO=0`: momentum by torch, copies into and out of the
  buckets) and against the stored reference run, within `test_step_reference`'s bound. The two paths differ
  only in where the weight decay is rounded (one fused pass against `mul_` then `add_`);
* the captured step's path without the capture (device scalars) through the buckets, equal to the float step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from interpreter_child import interpreter_results

HERE = Path(__file__).resolve().parent
# The update's bound of test_step_reference: a few ulps of the update in its Newton-Schulz dtype over the steps.
UPDATE_ULPS = {"bfloat16": 2e-3, "float32": 1e-4}


def _kernel_cases() -> list[dict]:
    from muon_recipes.optim.kernels import momentum_into, momentum_update, scaled_add_
    from muon_recipes.optim.kernels.fast_launch import bounded_programs

    generator = torch.Generator().manual_seed(0)
    results = []
    # (label, full shape of the weight, a function taking the weight-shaped tensor to the strided view, the
    # destination as a function of that view's shape)
    cases = {
        "transposed_out": ((3, 45, 17), lambda t: t, lambda shape: torch.empty(shape[0], shape[2], shape[1]).mT),
        "row_block_of_3d": ((3, 30, 17), lambda t: t[:, 12:30], lambda shape: torch.empty(shape)),
        "row_block_transposed": ((3, 30, 9), lambda t: t[:, 12:30],
                                 lambda shape: torch.empty(shape[0], shape[2], shape[1]).mT),
        "fused_experts_transposed": ((3, 20, 9), lambda t: t,
                                     lambda shape: torch.empty(1, shape[2], shape[0] * shape[1]).mT.view(shape)),
        "two_d_contiguous": ((70, 33), lambda t: t, lambda shape: torch.empty(shape)),
        # a run of two tall row blocks of one 2-D weight (a fused gate/up's halves) in consecutive slots
        "tall_run_of_two_blocks": ((60, 9), lambda t: t.unflatten(0, (2, 30)),
                                   lambda shape: torch.empty(shape[0], shape[2], shape[1]).mT),
    }
    for label, (shape, view, destination) in cases.items():
        for dtype in (torch.bfloat16, torch.float32):
            for nesterov in (True, False):
                grad_full, buf_full = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
                grad, buf = view(grad_full), view(buf_full.clone())
                out = destination(tuple(grad.shape)).to(dtype) if dtype != torch.float32 else destination(tuple(grad.shape))
                if out.dtype != dtype:
                    out = out.to(dtype)
                out.fill_(float("nan"))
                expected_buf = buf.contiguous().clone()
                expected = momentum_update(grad.contiguous(), expected_buf, 0.9, nesterov, dtype)
                exact_buf = 0.9 * buf.double() + grad.double()
                exact = grad.double() + 0.9 * exact_buf if nesterov else exact_buf
                momentum_into(grad, buf, out, 0.9, nesterov)
                # The weight update from the same (strided) result, decayed; scalars as numbers and in memory.
                weight_full = torch.randn(shape, generator=generator)
                weight = view(weight_full)
                expected_weight = scaled_add_(weight.contiguous().clone(), out.contiguous(), alpha=-0.02, decay=0.99)
                from_memory = view(weight_full.clone())
                scaled_add_(from_memory, out, alpha=torch.tensor(-0.02), decay=torch.tensor(0.99))
                exact_weight = 0.99 * weight.double() - 0.02 * out.double()
                # The same passes as two programs in all, each looping over every other block (grid-stride).
                bounded_out, bounded_buf = out.clone().fill_(float("nan")), view(buf_full.clone())
                bounded_weight = view(weight_full.clone())
                with bounded_programs(2):
                    momentum_into(grad, bounded_buf, bounded_out, 0.9, nesterov)
                    scaled_add_(bounded_weight, out, alpha=-0.02, decay=0.99)
                scaled_add_(weight, out, alpha=-0.02, decay=0.99)
                results.append({
                    "case": f"{label}/{dtype}/nesterov={nesterov}",
                    "strided": not (grad.is_contiguous() and out.is_contiguous()),
                    "update_equal": bool(torch.equal(out, expected)),
                    "buffer_equal": bool(torch.equal(buf, expected_buf)),
                    "weight_equal": bool(torch.equal(weight, expected_weight)),
                    "from_memory_equal": bool(torch.equal(from_memory, weight)),
                    "bounded_equal": bool(torch.equal(bounded_out, out) and torch.equal(bounded_buf, buf)
                                          and torch.equal(bounded_weight, weight)),
                    "update_error": ((out.double() - exact).norm() / exact.norm()).item(),
                    "weight_error": ((weight.double() - exact_weight).norm() / exact_weight.norm()).item(),
                    "dtype": str(dtype).removeprefix("torch."),
                })
    return results


def _step_runs() -> dict:
    sys.path.insert(0, str(HERE))
    from step_reference import REFERENCE, SETTINGS, reference_run

    from muon_recipes.optim import kernels

    calls = {"contiguous": 0, "strided": 0}
    plain = kernels.momentum_into

    def counted(grad, buf, out, momentum, nesterov):
        contiguous = grad.is_contiguous() and out.is_contiguous()
        calls["contiguous" if contiguous else "strided"] += 1
        return plain(grad, buf, out, momentum, nesterov)

    kernels.momentum_into = counted
    os.environ["MUON_BUCKET_IO"] = "1"
    through_buckets = reference_run()
    os.environ["MUON_BUCKET_IO"] = "0"
    calls_with_path_off = dict(calls)
    copies = reference_run()
    kernels.momentum_into = plain
    stored = torch.load(REFERENCE)["params"]
    dtypes = {name: SETTINGS[name.split("/")[0]]["muon"]["ns_dtype"] for name in through_buckets}
    return {
        "calls": calls_with_path_off,
        "calls_after_off": {k: calls[k] - calls_with_path_off[k] for k in calls},
        "params": sorted(through_buckets),
        "stored_params": sorted(stored),
        "against_copies": {n: (through_buckets[n] - copies[n]).abs().max().item() for n in through_buckets},
        "against_stored": {n: (through_buckets[n] - stored[n]).abs().max().item() for n in through_buckets},
        "moved": {n: (through_buckets[n] - stored[n]).abs().max().item() < 1.0 for n in through_buckets},
        "dtypes": dtypes,
    }


def _tall_fused_runs() -> dict:
    """A fused gate/up whose halves are tall (48 x 16 each: one run of two transposed slots) and a GQA fused QKV
    (q 16 x 16 square, k and v 8 x 16: one run of two), with weight decay, through the buckets and with copies;
    then through the buckets on the two-stream schedule (`MUON_STEP_STREAMS=1`, one stream here), which must
    equal the first bit for bit."""
    from muon_recipes.optim import Muon, kernels

    launches = []
    plain = kernels.momentum_into
    kernels.momentum_into = lambda grad, *rest: launches.append(tuple(grad.shape)) or plain(grad, *rest)
    weights = {}
    for io, streams in (("1", "0"), ("0", "0"), ("1", "1")):
        os.environ["MUON_BUCKET_IO"], os.environ["MUON_STEP_STREAMS"] = io, streams
        if streams == "1":
            launches_before_streams = len(launches)
        torch.manual_seed(0)
        gate_up, qkv = torch.nn.Parameter(torch.randn(96, 16)), torch.nn.Parameter(torch.randn(32, 16))
        opt = Muon([dict(params=[gate_up], split_sizes=(48, 48)), dict(params=[qkv], split_sizes=(16, 8, 8))],
                   lr=0.02, weight_decay=0.1, ns_dtype="bfloat16", backend="torch")
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            gate_up.grad = torch.randn(96, 16, generator=generator)
            qkv.grad = torch.randn(32, 16, generator=generator)
            opt.step()
        weights[io + streams] = (gate_up.detach().clone(), qkv.detach().clone())
    kernels.momentum_into = plain
    os.environ["MUON_STEP_STREAMS"] = "0"
    return {"difference": max((a - b).abs().max().item() for a, b in zip(weights["10"], weights["00"])),
            "launches": sorted(set(launches)), "launch_count": launches_before_streams,
            "streams_launch_count": len(launches) - launches_before_streams,
            "streams_equal": all(torch.equal(a, b) for a, b in zip(weights["11"], weights["10"]))}


def _device_scalar_runs() -> dict:
    """The captured step's path without the capture (`CapturedStep(capture=False)`: lr and weight decay read from
    device scalars) through the buckets, against the float step through the buckets, under an lr schedule that
    moves lr every step: the Muon weights must be equal bit for bit (the scalars are the same float32 values)."""
    sys.path.insert(0, str(HERE))
    from optim_toy_models import ToyModel, fill_grads
    from step_reference import SETTINGS, param_groups

    from muon_recipes.optim import Muon
    from muon_recipes.optim.cuda_graph import CapturedStep

    os.environ["MUON_BUCKET_IO"] = "1"
    setting = SETTINGS["split_keller_gram_bf16"]
    models, optimizers, schedules = [], [], []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(ToyModel())
        optimizers.append(Muon(param_groups(models[-1], **setting)))
        schedules.append(torch.optim.lr_scheduler.LambdaLR(optimizers[-1], lambda step: 1.0 / (1 + step)))
    runner = CapturedStep(optimizers[0], capture=False)
    for step in range(3):
        for model in models:
            fill_grads(model, step)
        assert runner.step()
        optimizers[1].step()
        for schedule in schedules:
            schedule.step()
    muon = [id(p) for g in optimizers[0].param_groups if g["algorithm"] == "muon" for p in g["params"]]
    pairs = [(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()) if id(p) in muon]
    return {"muon_weights": len(pairs), "equal": all(torch.equal(p, q) for p, q in pairs)}


def _modes() -> dict:
    """`dispatch.bucket_io_on_triton` under each MUON_BUCKET_IO value, for an eager and a captured step."""
    from muon_recipes.optim import dispatch

    t = torch.zeros(4, 8)
    answers = {}
    for value in ("auto", "1", "0"):
        os.environ["MUON_BUCKET_IO"] = value
        answers[value] = [dispatch.bucket_io_on_triton(t, t, t, captured) for captured in (False, True)]
    return answers


def _child() -> None:
    print(json.dumps({"kernels": _kernel_cases(), "steps": _step_runs(), "tall_fused": _tall_fused_runs(),
                      "device_scalars": _device_scalar_runs(), "modes": _modes()}))


@pytest.fixture(scope="module")
def child_results():
    return interpreter_results(__file__)


def test_strided_kernels_equal_the_one_pass_kernels_and_float64(child_results):
    results = child_results["kernels"]
    assert len(results) == 6 * 2 * 2 and sum(r["strided"] for r in results) == 5 * 2 * 2
    tolerance = {"bfloat16": 1e-2, "float32": 1e-6}
    for r in results:
        for flag in ("update_equal", "buffer_equal", "weight_equal", "from_memory_equal", "bounded_equal"):
            assert r[flag], f"{r['case']}: {flag} is False"
        assert r["update_error"] < tolerance[r["dtype"]], r
        assert r["weight_error"] < 1e-6, r


def test_step_through_the_buckets_equals_the_step_with_copies(child_results):
    steps = child_results["steps"]
    # Every Muon weight of the toy model went through the buckets, tall blocks (gate/up halves) transposed;
    # with the path off, none did.
    assert steps["calls"]["contiguous"] > 0 and steps["calls"]["strided"] > 0, steps["calls"]
    assert steps["calls_after_off"] == {"contiguous": 0, "strided": 0}
    assert steps["params"] == steps["stored_params"]
    for name, difference in steps["against_copies"].items():
        bound = UPDATE_ULPS[steps["dtypes"][name]]
        assert difference <= bound, f"{name}: {difference:.3g} from the step with copies (bound {bound})"
        assert steps["against_stored"][name] <= bound, f"{name}: {steps['against_stored'][name]:.3g} from the reference"


def test_tall_halves_and_kv_blocks_run_as_one_launch_each_and_equal_the_step_with_copies(child_results):
    runs = child_results["tall_fused"]
    assert runs["difference"] <= UPDATE_ULPS["bfloat16"], runs
    # per step: the gate/up halves as one [2, 48, 16] launch, q alone, k and v as one [2, 8, 16] launch
    assert runs["launches"] == [[1, 16, 16], [2, 8, 16], [2, 48, 16]] and runs["launch_count"] == 9, runs
    # The two-stream schedule (on the one stream of a CPU): the same launches, the same weights bit for bit.
    assert runs["streams_launch_count"] == 9 and runs["streams_equal"], runs


def test_device_scalar_step_through_the_buckets_equals_the_float_step(child_results):
    runs = child_results["device_scalars"]
    assert runs["muon_weights"] > 0 and runs["equal"], runs


def test_by_default_only_the_captured_step_goes_through_the_buckets(child_results):
    # [eager, captured] per MUON_BUCKET_IO value ("auto" is the default: an eager step pays host time per block)
    assert child_results["modes"] == {"auto": [False, True], "1": [True, True], "0": [False, False]}


if __name__ == "__main__":
    _child()
