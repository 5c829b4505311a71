"""The Newton-Schulz plans kept on disk (`kernels/plan_store.py`) and the timing that chooses them
(`iterations.interleaved_medians`), on the CPU. Reading a plan back inside a real run is a GPU test
(`test_kernels_gpu.py::test_plans_are_kept_on_disk_and_read_back`)."""

from __future__ import annotations

import json
import threading

import pytest

from muon_recipes.optim.kernels import plan_store
from muon_recipes.optim.kernels.iterations import PRODUCTS, interleaved_medians

PLAN = {"gram": "cublas", "polynomial": "persistent", "update": "triton", "final": "triton", "commuting": "triton",
        "pieces": 2}
TIMES = {"gram": {"triton": 0.31, "cublas": 0.29}}


def _key(**changes) -> dict:
    key = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0",
           "sources": "0123456789abcdef", "problem": ["128", "256", "1024", "torch.float16", "tf32", "True",
                                                      "torch.bfloat16"], "timing": "launch"}
    return {**key, **changes}


@pytest.fixture
def store_in(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MUON_NS_PLAN_CACHE", raising=False)
    return tmp_path / "muon_ns_plans"


def test_a_stored_plan_is_read_back_under_its_own_key_only(store_in):
    assert plan_store.load(_key(), PRODUCTS) is None
    plan_store.store(_key(), PLAN, TIMES)
    read = plan_store.STATS.read
    assert plan_store.load(_key(), PRODUCTS) == PLAN
    assert plan_store.STATS.read == read + 1
    # What the plan depends on: the GPU, the versions, the kernels' sources, the problem, the timing.
    for changed in (_key(gpu="NVIDIA H200"), _key(triton="3.9.0"), _key(sources="fedcba9876543210"),
                    _key(problem=["128", "256", "1024", "torch.float16", "tf32", "False", "torch.bfloat16"]),
                    _key(timing="graph")):
        assert plan_store.load(changed, PRODUCTS) is None
    assert [p.name.endswith(".json") for p in store_in.iterdir()] == [True]
    assert json.loads(next(store_in.iterdir()).read_text())["times_ms"] == TIMES


@pytest.mark.parametrize("content", ["{not json", json.dumps({"key": _key(), "plan": {**PLAN, "gram": "cutlass"}}),
                                     json.dumps({"key": _key(), "plan": {"gram": "cublas"}}),
                                     json.dumps({"key": _key(), "plan": {k: v for k, v in PLAN.items()
                                                                         if k != "pieces"}}),
                                     json.dumps({"key": _key(), "plan": {**PLAN, "pieces": 0}}),
                                     json.dumps({"key": _key(), "plan": {**PLAN, "pieces": "2"}}),
                                     json.dumps({"key": _key(sources="other"), "plan": PLAN}), "[]"],
                         ids=["torn", "unknown implementation", "missing products", "no pieces", "zero pieces", "pieces not a count",
                              "another key", "not a record"])
def test_a_file_that_is_not_a_plan_of_its_key_is_timed_again_and_replaced(store_in, content):
    plan_store.store(_key(), PLAN, TIMES)
    path = next(store_in.iterdir())
    path.write_text(content)
    assert plan_store.load(_key(), PRODUCTS) is None
    plan_store.store(_key(), PLAN, TIMES)
    assert plan_store.load(_key(), PRODUCTS) == PLAN


def test_the_cache_off_reads_and_writes_nothing(store_in, monkeypatch):
    plan_store.store(_key(), PLAN, TIMES)
    monkeypatch.setenv("MUON_NS_PLAN_CACHE", "0")
    assert plan_store.load(_key(), PRODUCTS) is None
    plan_store.store(_key(timing="graph"), PLAN, TIMES)
    assert len(list(store_in.iterdir())) == 1
    monkeypatch.setenv("MUON_NS_PLAN_CACHE", "yes")
    with pytest.raises(ValueError, match=r"MUON_NS_PLAN_CACHE='yes': must be one of 1, 0"):
        plan_store.load(_key(), PRODUCTS)


def test_a_directory_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(blocked))
    monkeypatch.setattr(plan_store, "_write_failed", False)
    with pytest.warns(RuntimeWarning, match="each process times its own") as warned:
        plan_store.store(_key(), PLAN, TIMES)
        plan_store.store(_key(timing="graph"), PLAN, TIMES)
    assert len(warned) == 1
    assert plan_store.load(_key(), PRODUCTS) is None


def test_concurrent_writers_leave_one_whole_plan_and_no_temporary_file(store_in):
    """The ranks of a job time the same shapes at once and each stores its plan."""
    plans = [{**PLAN, "gram": implementation} for implementation in plan_store.IMPLEMENTATIONS]
    writers = [threading.Thread(target=lambda plan=plan: [plan_store.store(_key(), plan, TIMES) for _ in range(30)])
               for plan in plans * 3]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert plan_store.load(_key(), PRODUCTS) in plans
    assert [p.suffix for p in store_in.iterdir()] == [".json"]


def test_describe_says_how_many_plans_were_timed_and_read(store_in, monkeypatch):
    before = plan_store.PlanStats(timed=1, read=2)
    after = plan_store.PlanStats(timed=4, read=7)
    monkeypatch.setenv("MUON_NS_PLAN_TIMING", "graph")
    assert plan_store.describe(before, after) == (f"3 Newton-Schulz plans timed (MUON_NS_PLAN_TIMING=graph), "
                                                  f"5 read from {store_in}")
    monkeypatch.setenv("MUON_NS_PLAN_CACHE", "0")
    assert plan_store.describe(before, after).endswith(", none kept on disk (MUON_NS_PLAN_CACHE=0)")


class _DriftingClock:
    """Candidates timed on a GPU whose clock falls as the run goes on: each timing reads `cost + drift * t`, t the
    number of timings started before it. Records the order of starts and whether any was read before the last
    start (a wait for the GPU between two timings)."""

    def __init__(self, costs: dict[str, float], drift: float, rounds: int):
        self.costs, self.drift, self.total = costs, drift, rounds * len(costs)
        self.started: list[str] = []
        self.read_early = False

    def sampler(self, name: str):
        def sample():
            t = len(self.started)
            self.started.append(name)

            def read():
                self.read_early |= len(self.started) < self.total
                return self.costs[name] + self.drift * t
            return read
        return sample


def test_interleaved_timing_keeps_a_drift_from_choosing():
    """Two implementations 5% apart, on a clock that slows by 1% of a call per timing: timed one after the other
    (6 timings each) the slower one, timed first, would win by 1%; in turns the faster one wins by its own margin."""
    costs, rounds, drift = {"triton": 1.00, "cublas": 0.95}, 6, 0.01
    clock = _DriftingClock(costs, drift, rounds)
    medians = interleaved_medians({name: clock.sampler(name) for name in costs}, rounds=rounds)
    assert clock.started == ["triton", "cublas", "cublas", "triton"] * (rounds // 2)
    assert not clock.read_early
    assert min(medians, key=medians.get) == "cublas"
    assert medians["triton"] - medians["cublas"] == pytest.approx(costs["triton"] - costs["cublas"], abs=drift)
    one_after_the_other = {name: costs[name] + drift * (i * rounds + (rounds - 1) / 2) for i, name in enumerate(costs)}
    assert min(one_after_the_other, key=one_after_the_other.get) == "triton"   # what the turns prevent
