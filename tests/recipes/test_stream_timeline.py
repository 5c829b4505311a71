"""recipes/stream_timeline.py on a trace written here in torch.profiler's Chrome format, with intervals whose busy
time, overlap, idle time and gaps are worked out by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
import stream_timeline as st  # noqa: E402


def kernel(name: str, stream: int, start: float, end: float, **args) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": end - start, "pid": 0, "tid": stream,
            "args": {"stream": stream, **args}}


def write_trace(path: Path) -> Path:
    events = [
        kernel("product", 7, 0, 100, grid=[132, 1, 1], block=[256, 1, 1], **{"registers per thread": 168,
                                                                            "shared memory": 163840}),
        kernel("product", 7, 100, 200),
        kernel("update", 7, 210, 295),          # a 10 us gap after the products
        dict(kernel("Memset (Device)", 7, 295, 300), cat="gpu_memset"),   # GPU work too, not a gap
        kernel("momentum", 9, 50, 150),         # beside the products for 100 us
        kernel("momentum", 9, 400, 500),        # alone, after 100 us with nothing running
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 900, "pid": 1, "tid": 1},   # not a kernel
    ]
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_busy_overlap_idle_and_gaps_per_stream(tmp_path, capsys):
    trace = write_trace(tmp_path / "two.json")
    totals = st.summarize(trace, steps=1, top=5)
    out = capsys.readouterr().out
    # window 0-500 us; busy [0, 200], [210, 300] and [400, 500]; both streams at once [50, 150]; idle [200, 210]
    # and [300, 400]
    assert "window 0.500 ms per step; busy 0.390, two or more streams at once 0.100, idle 0.110 ms" in out
    assert "stream 7: 4 kernels per step, busy 0.290 ms per step; gaps between its kernels 0.010 ms short" in out
    assert "stream 9: 2 kernels per step, busy 0.200 ms per step; gaps between its kernels 0.000 ms short (< 20 us) " \
           "+ 0.250 ms long" in out
    assert "grid [132, 1, 1], block [256, 1, 1], 168 regs, 160 KB smem" in out
    # Alone or beside: both products are half overlapped by the first momentum; the second momentum runs alone.
    assert "| product | 0 | - | 2 | 0.100 |" in out
    assert "| momentum | 1 | 0.100 | 1 | 0.100 |" in out
    assert "| update | 1 |" not in out   # never beside another stream: not in that table
    assert totals == {7: {"product": 200.0, "update": 85.0, "Memset (Device)": 5.0}, 9: {"momentum": 200.0}}


def test_per_step_times_and_the_side_by_side_table(tmp_path, capsys):
    one = write_trace(tmp_path / "one.json")
    two = tmp_path / "two.json"
    events = json.loads(one.read_text())["traceEvents"]
    for e in events:
        if e.get("name") == "product":
            e["dur"] *= 1.5
    two.write_text(json.dumps({"traceEvents": events}))
    assert st.main([str(one), str(two), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "| product | 0.100 | 0.150 |" in out   # 200 us over two steps, then stretched by half
    assert "| all kernels | 0.245 | 0.295 |" in out


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert st.main([str(tmp_path / "missing.json")]) == 2
    assert "traces not found" in capsys.readouterr().err
    trace = write_trace(tmp_path / "t.json")
    assert st.main([str(trace), "--steps", "0"]) == 2
    assert "--steps=0: must be at least 1" in capsys.readouterr().err


def test_record_steady_records_only_the_calls_after_the_warm_ones(tmp_path):
    """A second of calls (here four of 0.25 s, by the estimate given) runs under the profiler first; the trace
    holds the three calls after them and nothing of the warm ones."""
    import torch

    calls = []

    def call():
        calls.append(len(calls))
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))

    prof = st.record_steady(call, calls=3, call_s=0.25, cuda=False)
    prof.export_chrome_trace(str(tmp_path / "steady.json"))
    events = json.loads((tmp_path / "steady.json").read_text())["traceEvents"]
    steps = sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))
    assert len(calls) == 7 and steps == ["ProfilerStep#4", "ProfilerStep#5", "ProfilerStep#6"], (len(calls), steps)
    assert sum(e.get("name") == "aten::mm" for e in events) == 3
