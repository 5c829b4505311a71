"""A single-process Muon step on two CUDA streams: the passes over memory beside the Newton-Schulz products.

Why: the Newton-Schulz products are compute-bound; the momentum, the normalization before the iterations, the
weight update and AdamW are bound by memory bandwidth. On one stream each waits for the other. On dense_1b (one
H200, docs/benchmarks.md, "Where dense_1b's 43.9 ms goes") the products took 32 ms of the step and those passes
about 6.6 ms. A product
leaves each SM room for another kernel's threads (one persistent program per SM, no more than half the register
file), and its operands come mostly from L2, so a bandwidth-bound pass can run beside it. Measured (docs/benchmarks.md,
"The two streams on a timeline"): on dense_1b the passes do run beside the products for 8 ms of a 40 ms step, but the
kernels then take 5 ms longer in all, so the step gains 0.5-1 ms; moe_small gains 0.1-0.3 ms.

Settings (all checked with a run's config): `MUON_SIDE_PROGRAMS_PER_SM=k` launches the side stream's passes as k
programs per SM, each looping over its blocks (`fast_launch.bounded_programs`), so that no pass fills an SM a product
is waiting for; `MUON_SIDE_STREAM_PRIORITY` and `MUON_MAIN_STREAM_PRIORITY` set the two streams' priorities, which a
captured step keeps (`cuda_graph.PrioritizedGraph`). Neither changed dense_1b's step measurably; both are off by
default.

The schedule (`Muon._two_stream_step`), with the buckets in `BucketLayout.order()`:

    side stream:  momentum and normalization of bucket 0, of bucket 1, ..., AdamW,
                  [bucket 0 done] update of bucket 0's weights, [bucket 1 done] update of bucket 1's, ...
    main stream:  [bucket 0 normalized] iterations of bucket 0, [bucket 1 normalized] iterations of bucket 1, ...
                  then it waits for the side stream.

Every pass reads and writes the same tensors as on one stream, in an order the events keep, so the step computes
the same numbers bit for bit; only the overlap changes. Inside a CUDA graph capture the two streams become two
branches of the graph (the side stream forks from the capturing stream and joins it before the capture ends).

The largest bucket (dense_1b's MLP matrices) runs as two batches (`parts_of_largest`): the update of the first
overlaps the iterations of the second, and only the second half's update is left at the end of the step.

Where (`mode()`, `MUON_STEP_STREAMS`): "auto" in the captured step on a GPU (its warm-up steps and the capture),
"1" in every single-process step, "0" in none. The default is `choices.STEP_STREAMS_DEFAULT` ("auto"). Either way
the first step, and the first after the captured step is rebuilt, stays on one stream: it times the Newton-Schulz
plans of new shapes (`kernels/iterations.py`), and a pass running beside the timed products would skew them. Off
the GPU "1" runs the same schedule on the one stream there is (`InlineStreams`): how the CPU tests check its order.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Hashable, Optional

import torch

from muon_recipes.choices import (MAIN_STREAM_PRIORITY_ENV, SIDE_STREAM_PRIORITY_ENV, STEP_STREAMS,
                                  SIDE_PROGRAMS_ENV, STEP_STREAMS_DEFAULT, STEP_STREAMS_ENV, env_choice,
                                  is_stream_priority)


def mode() -> str:
    """MUON_STEP_STREAMS: auto (the captured step on a GPU), 1 (every single-process step), 0 (none); unset,
    `STEP_STREAMS_DEFAULT`. (A run's config validation checks it before anything starts; this is the check of a
    direct `Muon` user.)"""
    return env_choice(STEP_STREAMS_ENV, STEP_STREAMS_DEFAULT, STEP_STREAMS)


class InlineStreams:
    """The two-stream schedule's interface on one stream: every pass runs where it is issued, so the events and
    waits are nothing (the order of issue already keeps every dependency)."""

    def fork(self) -> None:
        pass

    def side(self):
        return nullcontext()

    def record(self, name: Hashable) -> None:
        pass

    def wait(self, name: Hashable) -> None:
        pass

    def join(self) -> None:
        pass


def stream_priority(name: str) -> int:
    """A stream priority from the environment variable `name` (`choices.STREAM_PRIORITY_ENVS`): 0 (the default
    streams' own, the lowest) or negative (higher: the block scheduler gives that stream's kernels the SMs that free
    up first)."""
    value = os.environ.get(name, "0")
    if not is_stream_priority(value):
        raise ValueError(f"{name}={value!r}: expected 0 or a negative integer")
    return int(value)


def side_priority() -> int:
    """MUON_SIDE_STREAM_PRIORITY: the side stream's CUDA priority."""
    return stream_priority(SIDE_STREAM_PRIORITY_ENV)


def main_priority() -> int:
    """MUON_MAIN_STREAM_PRIORITY: the priority of the stream the step is captured on (the main stream of its
    schedule), for a captured step that keeps its streams' priorities (`keeps_priorities`)."""
    return stream_priority(MAIN_STREAM_PRIORITY_ENV)


def side_programs_per_sm() -> int:
    """MUON_SIDE_PROGRAMS_PER_SM: at most this many programs per SM for each pass over memory on the side stream
    (`fast_launch.bounded_programs`); 0 (the default): one program per block."""
    value = os.environ.get(SIDE_PROGRAMS_ENV, "0")
    if not value.isdigit():
        raise ValueError(f"{SIDE_PROGRAMS_ENV}={value!r}: expected 0 or a positive integer")
    return int(value)


def keeps_priorities() -> bool:
    """Whether the captured step keeps the priorities of the streams it was recorded on (either one set).

    Why: a CUDA graph runs every kernel at the priority of the stream it is replayed on, unless it is instantiated
    with the per-node priorities its capture recorded (`cuda_graph.PrioritizedGraph`)."""
    return side_priority() != 0 or main_priority() != 0


class TwoStreams(InlineStreams):
    """The main stream (the one current when the step starts) and a side stream made once per device and
    priority; named events between them. `fork` before the first pass on the side stream, `join` after the
    last."""

    _side_streams: dict = {}

    def __init__(self, device: torch.device):
        self.main = torch.cuda.current_stream(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, side_priority())
        if key not in self._side_streams:
            self._side_streams[key] = torch.cuda.Stream(device=index, priority=key[1])
        self.side_stream = self._side_streams[key]
        self.events: dict = {}

    def fork(self) -> None:
        self.side_stream.wait_stream(self.main)

    @contextmanager
    def side(self):
        per_sm = side_programs_per_sm()
        with torch.cuda.stream(self.side_stream):
            if per_sm == 0:
                yield
            else:
                from muon_recipes.optim.kernels.fast_launch import bounded_programs

                with bounded_programs(per_sm):
                    yield

    def record(self, name: Hashable) -> None:
        """An event on the current stream, after everything issued to it so far."""
        self.events[name] = event = torch.cuda.Event()
        event.record()

    def wait(self, name: Hashable) -> None:
        """The current stream waits for event `name` (recorded earlier on the other stream)."""
        torch.cuda.current_stream().wait_event(self.events[name])

    def join(self) -> None:
        self.main.wait_stream(self.side_stream)


def applies(device: torch.device, captured: bool) -> bool:
    """Whether a single-process step on `device` runs the two-stream schedule once its plans are timed (`mode()`;
    off the GPU only with "1", on one stream). `captured`: lr read from device scalars (the step a CUDA graph
    records and its warm-up steps)."""
    chosen = mode()
    if chosen == "auto":
        return captured and device.type == "cuda"
    return chosen == "1"


def for_step(device: torch.device, captured: bool, plans_timed: bool) -> Optional[InlineStreams]:
    """The streams a single-process step on `device` runs its schedule on, or None for the one-stream order
    (`Muon._local_step`): where `applies`, once `plans_timed` (a step of these shapes has run before, so their
    Newton-Schulz plans are timed)."""
    if not (plans_timed and applies(device, captured)):
        return None
    return TwoStreams(device) if device.type == "cuda" else InlineStreams()


def parts_of_largest(device: torch.device, captured: bool) -> int:
    """How many batches the step's largest bucket is split into (`BucketLayout(parts=...)`): 2 where the
    two-stream schedule `applies`, from the first step on, so that the first step, on one stream, times the plans
    of the shapes the later ones run; else 1."""
    return 2 if applies(device, captured) else 1
