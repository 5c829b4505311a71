"""Where a training step's time goes: the kernels of a `torch.profiler` trace, grouped into categories, and the
step's host-device synchronizations.

On a GPU the items are the device kernels (and memory copies) with their device time; on a CPU they are the
operators with their self CPU time (a parent's time is not counted again in its children), so in both cases the
items add up to the busy time of the device that did the work, and the categories add up to that total.

An item's category is decided first by the trainer phase that launched it (`PHASES`: the `record_function` ranges
of `Trainer.train_step` and the optimizer's own `Optimizer.step#...` range), then by its name (`RULES`, first
match wins), which covers eager ATen kernels, cuBLAS/CUTLASS GEMMs, flash attention, NCCL and the fused Triton
kernels that inductor names after the operations they contain (`triton_poi_fused_index_select_mul_sum_3`).
A fused kernel lands in the category of the first rule its name matches, so read the top-kernel table next to the
category table.

Host syncs (GPU only): the CUDA runtime calls that block the host until the device is done
(`cudaStreamSynchronize`, `cudaDeviceSynchronize`, `cudaEventSynchronize`) and the device-to-host copies that
precede most of them (`.item()`, `.tolist()`, `float(tensor)`, a boolean mask's size).

Where the device waits for the host (GPU only): the share of the profiled wall time in which no kernel ran (the
union of the kernels' intervals against the span of the trace), and the host time of each CUDA runtime call
(`cudaLaunchKernel`, `cudaMemcpyAsync`, `cudaStreamSynchronize`, ...). A copy from pageable host memory or a sync
shows up there as milliseconds in one call, where a launch costs microseconds: the calls say what the idle
device was waiting for.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

CATEGORIES = ("matmul/grouped_mm", "attention", "routing/top-k/softmax", "permutation/index/scatter/gather/sort",
              "elementwise/norm", "optimizer", "communication", "other")

# Trainer phases (record_function names, matched as prefixes) whose work is attributed to a category whatever the
# kernel: the optimizer's update (its own GEMMs of Newton-Schulz included) and the router bias update.
PHASES = (("Optimizer.step", "optimizer"), ("Optimizer.zero_grad", "optimizer"), ("trainer.grad_norm", "optimizer"),
          ("trainer.optimizer_step", "optimizer"), ("trainer.after_optimizer", "optimizer"),
          ("trainer.router_bias_update", "routing/top-k/softmax"))

# (category, pattern) on the lower-cased kernel or operator name; first match wins. The cross-entropy's
# log-softmax is elementwise work of the loss, not routing, hence its rule before the routing one.
RULES = (
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|c10d|gloo|broadcast"),
    ("attention", r"flash|fmha|sdpa|scaled_dot_product|attention|attn"),
    ("matmul/grouped_mm", r"grouped_mm|gemm|cutlass|nvjet|xmma|cublas|triton_tem_|"
                          r"aten::(mm|addmm|bmm|baddbmm|addbmm|matmul|linear|_grouped_mm)$"),
    ("elementwise/norm", r"log_?softmax|nll_loss|cross_entropy"),
    ("routing/top-k/softmax", r"topk|sigmoid|softmax|router"),
    ("permutation/index/scatter/gather/sort", r"sort|radix|index|scatter|gather|cumsum|searchsorted|histc|"
                                              r"bincount|repeat_interleave|take|permuterows|dispatchrows"),
    ("elementwise/norm", r"elementwise|triton_(poi|red|per)_|reduce|norm|rsqrt|mul|add|sub|div|silu|copy|"
                         r"fill|zero|cat|pow|mean|sum|exp|where|clone|foreach|embedding|neg|sqrt|clamp|ones|"
                         r"unrolled|vectorized|to_copy|_to"),
)
_COMPILED_RULES = [(category, re.compile(pattern)) for category, pattern in RULES]

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def categorize(name: str, phase: Optional[str] = None) -> str:
    """The category of a kernel or operator `name` launched inside trainer phase `phase` (a `PHASES` category)."""
    lowered = name.lower()
    if phase is not None and not _COMPILED_RULES[0][1].search(lowered):  # communication stays communication
        return phase
    for category, pattern in _COMPILED_RULES:
        if pattern.search(lowered):
            return category
    return "other"


@dataclass
class KernelRow:
    name: str
    category: str
    calls: float  # per step
    total_us: float  # per step


@dataclass
class StepProfile:
    """What one or more profiled steps spent, per category and per kernel (times per step, microseconds)."""

    device: str  # "cuda" (device kernel time) or "cpu" (operator self time)
    steps: int
    total_us: float
    categories: dict = field(default_factory=dict)  # category -> us per step, every CATEGORIES key
    kernels: list = field(default_factory=list)  # KernelRow per distinct (name, trainer phase), largest first
    host_syncs: Optional[int] = None  # blocking runtime calls per step (GPU); None on CPU
    device_to_host_copies: Optional[int] = None
    span_us: Optional[float] = None  # GPU: wall time per step from the first to the last event of the trace
    idle_us: Optional[float] = None  # GPU: time per step in that span with no kernel running
    runtime_calls: list = field(default_factory=list)  # GPU: RuntimeRow per CUDA runtime call, most host time first

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RuntimeRow:
    name: str
    calls: float  # per step
    host_us: float  # host time per step inside the call
    longest_us: float  # the longest single call


def _is_runtime_call(name: str) -> bool:
    """A CUDA runtime or driver API call as the profiler names it (`cudaLaunchKernel`, `cuLaunchKernelEx`), not a
    library operator (`cudnn...`, `cublas...`)."""
    return re.match(r"cu(da)?[A-Z]", name) is not None


def covered_time(intervals: list) -> float:
    """The length of the union of `intervals` [(start, end), ...]: overlapping kernels (streams) count once."""
    covered, start, reach = 0.0, None, None
    for begin, end in sorted(intervals):
        if reach is None or begin > reach:
            covered += 0.0 if reach is None else reach - start
            start, reach = begin, end
        else:
            reach = max(reach, end)
    return covered + (0.0 if reach is None else reach - start)


def _phase(event) -> Optional[str]:
    """The PHASES category of the innermost trainer range around `event` (a CPU FunctionEvent), if any."""
    while event is not None:
        for prefix, category in PHASES:
            if event.name.startswith(prefix):
                return category
        event = event.cpu_parent
    return None


def summarize(events: Iterable, device: str, steps: int = 1) -> StepProfile:
    """A `StepProfile` of `events` (`torch.profiler.profile(...).events()`) covering `steps` training steps."""
    from torch.autograd import DeviceType

    events = list(events)
    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    totals: dict = defaultdict(float)
    calls: dict = defaultdict(int)
    category_of: dict = {}
    if device == "cuda":
        launchers = {e.id: e for e in cpu_events if getattr(e, "linked_correlation_id", 0) == 0}
        for e in events:
            # Device-side copies of record_function ranges (gpu_user_annotation) span kernels counted on their own.
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            key = (e.name, _phase(launchers.get(getattr(e, "linked_correlation_id", 0))))
            category_of.setdefault(key, categorize(*key))
            totals[key] += e.time_range.end - e.time_range.start
            calls[key] += 1
        syncs = sum(1 for e in cpu_events if e.name in SYNC_CALLS)
        copies = sum(1 for e in events if e.device_type == DeviceType.CUDA and "DtoH" in e.name
                     and not getattr(e, "is_user_annotation", False))
        kernels = [(e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        span = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) if events else 0.0
        idle = span - covered_time(kernels)
        runtime: dict = defaultdict(lambda: [0, 0.0, 0.0])
        for e in cpu_events:
            if _is_runtime_call(e.name):
                row, length = runtime[e.name], e.time_range.end - e.time_range.start
                row[0] += 1
                row[1] += length
                row[2] = max(row[2], length)
        runtime_rows = sorted((RuntimeRow(name, n / steps, us / steps, longest)
                               for name, (n, us, longest) in runtime.items()), key=lambda r: -r.host_us)
    else:
        for e in cpu_events:
            if e.is_async or e.name.startswith("ProfilerStep"):
                continue
            key = (e.name, _phase(e))
            category_of.setdefault(key, categorize(*key))
            totals[key] += e.self_cpu_time_total
            calls[key] += 1
        syncs = copies = span = idle = None
        runtime_rows = []
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    rows = []
    for key, total in totals.items():
        category = category_of[key]
        by_category[category] += total / steps
        rows.append(KernelRow(name=key[0], category=category, calls=calls[key] / steps, total_us=total / steps))
    rows.sort(key=lambda r: -r.total_us)
    return StepProfile(device=device, steps=steps, total_us=sum(by_category.values()), categories=by_category,
                       kernels=rows, host_syncs=None if syncs is None else syncs // max(steps, 1),
                       device_to_host_copies=None if copies is None else copies // max(steps, 1),
                       span_us=None if span is None else span / steps, idle_us=None if idle is None else idle / steps,
                       runtime_calls=runtime_rows)


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def format_markdown(profile: StepProfile, top: int = 25, step_wall_s: Optional[float] = None) -> str:
    """The category table, then the `top` kernels, as markdown. With the step's wall time, the device's busy share
    of it (kernel time over wall time: the rest is the device waiting for the host)."""
    if profile.device == "cuda":
        busy = (f" of a {step_wall_s * 1000:.2f} ms step (GPU busy {100 * profile.total_us / 1e6 / step_wall_s:.0f}%)"
                if step_wall_s else "")
        lines = [f"GPU kernel time per step: {_ms(profile.total_us)} ms{busy}", ""]
    else:  # the main and the autograd thread: their self times can add up to more than the wall time
        lines = [f"CPU operator self time per step: {_ms(profile.total_us)} ms (all threads)", ""]
    if profile.host_syncs is not None:
        lines += [f"host syncs per step: {profile.host_syncs} blocking runtime calls "
                  f"({', '.join(SYNC_CALLS)}), {profile.device_to_host_copies} device-to-host copies", ""]
    if profile.idle_us is not None and profile.span_us:
        lines += [f"under the profiler: {_ms(profile.span_us)} ms per step from the first to the last event, the GPU "
                  f"idle {_ms(profile.idle_us)} ms of it ({100 * profile.idle_us / profile.span_us:.0f}%)", ""]
    if profile.runtime_calls:
        lines += ["| CUDA runtime call | calls/step | host ms/step | longest call (ms) |", "|---|---:|---:|---:|"]
        for row in profile.runtime_calls[:8]:
            lines.append(f"| `{row.name}` | {row.calls:g} | {_ms(row.host_us)} | {_ms(row.longest_us)} |")
        lines.append("")
    lines += ["| category | ms/step | % of step |", "|---|---:|---:|"]
    for category in CATEGORIES:
        us = profile.categories[category]
        share = 100 * us / profile.total_us if profile.total_us else 0.0
        lines.append(f"| {category} | {_ms(us)} | {share:.1f}% |")
    lines.append(f"| total | {_ms(profile.total_us)} | 100.0% |")
    lines += ["", f"| top {top} kernels | category | calls/step | ms/step | % |", "|---|---|---:|---:|---:|"]
    for row in profile.kernels[:top]:
        name = row.name if len(row.name) <= 90 else row.name[:87] + "..."
        share = 100 * row.total_us / profile.total_us if profile.total_us else 0.0
        lines.append(f"| `{name.replace('|', '/')}` | {row.category} | {row.calls:g} | {_ms(row.total_us)} | "
                     f"{share:.1f}% |")
    return "\n".join(lines)
