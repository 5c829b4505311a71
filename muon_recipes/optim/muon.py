"""`Muon`: one `torch.optim.Optimizer` holding Muon groups (hidden matrices) and AdamW groups (everything else).

Muon (Keller Jordan 2024, "Muon: An optimizer for hidden layers in neural networks") updates a matrix W by
the orthogonalized momentum:

    B <- momentum * B + G                         (heavy-ball buffer, as in torch.optim.Muon)
    U  = G + momentum * B  (Nesterov)   or   B
    O  = NewtonSchulz(U)  per block                (approximately the polar factor of each block)
    W <- (1 - lr * weight_decay) * W - lr * ratio(block) * O

with decoupled weight decay (Loshchilov & Hutter 2019) and `ratio` from `adjust_lr` (see `blocks.adjust_lr_ratio`).
Embeddings, the output head, norms, biases and routers are not hidden matrices; they get AdamW in the same
optimizer, so LR schedulers, `state_dict()` and DCP checkpoints see one object. Each param group says its
`algorithm`; any key of a group overrides the constructor's default.

A step has three phases, each over all groups at once so blocks of equal shape share one batched call:
(1) momentum on the local gradients, (2) orthogonalize -- parameters sharded by FSDP2 are assembled across
their shard group first (`sharded.py`), every other one is done in place -- and (3) scale and apply. In a
captured step on one process, (1) writes each block's momentum update straight into its Newton-Schulz bucket
and (3) reads each block's result from there (`Muon._local_step`): no update tensor of its own, no copy.
The AdamW groups run during (2), while the sharded path's messages are in flight. `last_step_timings`
reports the seconds spent in Newton-Schulz, in communication and in the rest.

With `cuda_graph` ("auto" or "on") the whole step is captured once as a CUDA graph and replayed
(`cuda_graph.py`): the same three phases, reading lr and weight decay from device scalars and the gradients
from static buffers, so an lr schedule still applies and nothing syncs the host.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from muon_recipes.choices import ADJUST_LR, ALGORITHMS, BACKENDS, EXPERT_MODES, METHODS, NS_DTYPES, REPLICA_SPREAD
from muon_recipes.optim import dispatch, step_streams
from muon_recipes.optim.cuda_graph import CapturedStep, CudaGraphUnavailable, StepScalars, capture_blocker, check_mode, say
from muon_recipes.optim.blocks import BlockPlan
from muon_recipes.optim.newton_schulz import (NS_DTYPE, NS_EPS, NS_METHOD, NS_SCHEDULE, NS_STEPS, check_schedule,
                                              resolve_dtype)
from muon_recipes.optim.orthogonalize import BucketLayout, NSSettings, compile_ahead

ADAMW_LR = 3e-3  # an AdamW group's lr when it sets none (the `optim.adamw.lr` default of conf/)
BUCKET_MB = 256.0  # sharded parameters: target size of one communication bucket (full matrices, MB)


def is_dtensor(t: Tensor) -> bool:
    """Whether `t` is a DTensor, without importing torch.distributed.tensor (seconds) when nobody else has:
    a process that never imported it cannot hold DTensors."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor this rank stores: a DTensor's local shard, a plain tensor itself.

    Elementwise work (momentum, AdamW, weight decay, the final update) runs on local shards: it needs no
    communication and skips DTensor dispatch overhead. In-place ops on the local shard update the DTensor.
    Without autograd (the optimizer's step) the shard is read directly: `to_local()` is an autograd function
    whose call costs about twenty times as much, and a step reads hundreds of shards.
    """
    if not is_dtensor(t):
        return t
    if not torch.is_grad_enabled():
        shard = getattr(t, "_local_tensor", None)
        if shard is not None:
            return shard
    return t.to_local()


def _dtype_name(dtype: Any) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


@dataclass
class MatrixUpdate:
    """One Muon parameter's work for this step: the local update after momentum and how to cut it."""

    param: Tensor
    group: dict
    grad: Tensor  # local gradient (or its static copy in a captured step)
    buf: Tensor  # local momentum buffer
    plan: BlockPlan  # of the full (global) shape
    ns: NSSettings
    group_index: int = 0  # the group's position in param_groups (its slots in `StepScalars`)
    # The local momentum update, param dtype or ns dtype; None where the momentum wrote it straight into the
    # Newton-Schulz buckets (`Muon._local_step`).
    update: Optional[Tensor] = None


class _StepTimer:
    """Wall-clock seconds per phase; with `profile` it synchronizes CUDA so GPU work is attributed."""

    def __init__(self, profile: bool, device: Optional[torch.device]):
        self.sync = profile and device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.seconds = {"ns": 0.0, "comm": 0.0}
        self.start = self._now()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, key: str, since: float) -> float:
        now = self._now()
        self.seconds[key] += now - since
        return now

    def now(self) -> float:
        return self._now()

    def finish(self) -> dict[str, float]:
        total = self._now() - self.start
        return {**self.seconds, "other": max(0.0, total - sum(self.seconds.values())), "total": total}


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices and AdamW for the rest, chosen per param group by `algorithm`.

    Every argument is the default of the group key of the same name; a param group's own key overrides it.

    Muon groups (`algorithm="muon"`, the default): lr, momentum, nesterov, weight_decay, adjust_lr
    (spectral_norm | rms_norm | none), ns_steps, ns_schedule (keller | polar_express, or a sequence of
    (a, b, c) coefficients, one triple per iteration, the last repeated for further steps), ns_method (gram |
    standard: the Gram form of the same iteration on non-square blocks, or the classic loop), ns_dtype,
    backend (auto | torch | triton), split_sizes (row blocks of every weight in the group, or None), experts
    (per_expert | fused, for 3-D [E, out, in]). The Newton-Schulz defaults are those of `newton_schulz()`.

    AdamW groups (`algorithm="adamw"`): lr, betas, eps, weight_decay -- exactly `torch.optim.AdamW` (decoupled
    decay, bias correction). A group that sets no lr or weight_decay takes `adamw_lr` (3e-3, the `optim.adamw.lr`
    of conf/) or `adamw_weight_decay` (0: which AdamW parameters to decay is the caller's choice, per group),
    never Muon's lr or weight decay (an lr of 0.02 is about ten times a usual AdamW lr).

    Parameters may be plain tensors or FSDP2 DTensors; the mesh comes from the parameters. For sharded ones,
    `bucket_mb` is the target size (full matrices, MB) of one communication bucket and `replica_spread`
    (auto | True | False) whether HSDP replicas share the Newton-Schulz work ("auto": when every rank of the
    mesh still gets a matrix). `profile` synchronizes CUDA between the phases of a step so `last_step_timings`
    attributes GPU time to Newton-Schulz, communication and the rest (the trainer turns it on for logging
    steps only, since it loses the overlap); without it the timings are host-side.

    `cuda_graph` (auto | on | off): run the whole step as one captured CUDA graph (`cuda_graph.py`) after
    `cuda_graph.WARMUP_STEPS` eager steps. "auto" does so where it can (every parameter on one CUDA device, no
    sharding over several ranks) and otherwise says in one line why not and stays eager; "on" raises
    `CudaGraphUnavailable` at the first step where it cannot. A captured step reports only `total` in
    `last_step_timings`.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, adjust_lr: str = "spectral_norm", ns_steps: int = NS_STEPS,
                 ns_schedule: str | Sequence[Sequence[float]] = NS_SCHEDULE, ns_method: str = NS_METHOD,
                 ns_dtype: torch.dtype | str = NS_DTYPE, backend: str = "auto",
                 split_sizes: Optional[Sequence[int]] = None, experts: str = "per_expert",
                 adamw_lr: float = ADAMW_LR, adamw_weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 bucket_mb: float = BUCKET_MB, replica_spread: str | bool = "auto", profile: bool = False,
                 cuda_graph: str = "off"):
        defaults = dict(algorithm="muon", lr=lr, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, adjust_lr=adjust_lr, ns_steps=ns_steps,
                        ns_schedule=ns_schedule, ns_method=ns_method, ns_dtype=ns_dtype, backend=backend,
                        betas=tuple(betas), eps=eps, split_sizes=split_sizes, experts=experts)
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb={bucket_mb!r}: must be > 0")
        if replica_spread not in REPLICA_SPREAD:
            raise ValueError(f"replica_spread={replica_spread!r}: must be one of "
                             + ", ".join(map(str, REPLICA_SPREAD)))
        # What an AdamW group lacks is filled from these, not from the Muon defaults (see the class doc).
        self.adamw_defaults = dict(lr=adamw_lr, weight_decay=adamw_weight_decay)
        self.profile = profile
        self.last_step_timings: dict[str, float] = {}
        self.bucket_mb = float(bucket_mb)
        self.replica_spread = replica_spread
        self.cuda_graph = check_mode(cuda_graph)
        self._captured: Optional[CapturedStep] = None
        self._graph_blocked: Optional[str] = None  # why the step stays eager under cuda_graph="auto"
        self._plans: dict[Tensor, tuple] = {}
        self._dist_cache: dict = {}  # process-group maps and the sharded step plan, reused between steps
        self._compiled_ahead = False  # the first step compiles every bucket's kernels at once (`_compile_ahead`)
        self._local_steps = 0  # single-process steps, since the captured step was last (re)built if it was
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------------------------
    # Groups
    # ----------------------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("algorithm", self.defaults["algorithm"]) == "adamw":
            param_group = {**self.adamw_defaults, **param_group}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group, len(self.param_groups) - 1)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A state dict saved before a group key existed (e.g. ns_method) gets the constructor's default for it,
        # as a torch optimizer does for a newly added argument, instead of a KeyError at the next step.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_dist_cache", {})
        self.__dict__.setdefault("profile", False)
        self.__dict__.setdefault("last_step_timings", {})
        self.__dict__.setdefault("bucket_mb", BUCKET_MB)
        self.__dict__.setdefault("adamw_defaults", dict(lr=ADAMW_LR, weight_decay=0.0))
        self.__dict__.setdefault("replica_spread", "auto")
        self.__dict__.setdefault("cuda_graph", "off")
        self.__dict__.setdefault("_captured", None)
        self.__dict__.setdefault("_graph_blocked", None)
        self.__dict__.setdefault("_compiled_ahead", False)
        self.__dict__.setdefault("_local_steps", 0)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # The loaded state lives in new tensors; a captured graph would go on updating the old ones.
        if self._captured is not None:
            self._captured.reset()

    # ----------------------------------------------------------------------------------------------------------
    # Step
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        device = next((p.device for g in self.param_groups for p in g["params"]), None)
        timer = _StepTimer(self.profile, device)
        if self._graph_applies() and self._run_captured():
            self.last_step_timings = {"total": timer.finish()["total"]}
            return loss
        self._step(timer, None, None)
        self.last_step_timings = timer.finish()
        return loss

    def _step(self, timer: _StepTimer, scalars: Optional[StepScalars], grads: Optional[dict]) -> None:
        """The three phases. With `scalars` every lr-derived number is read from device tensors and every gradient
        from `grads` (param -> local gradient): the form a CUDA graph can record (`cuda_graph.py`)."""
        items = [item for index, group in enumerate(self.param_groups) if group["algorithm"] == "muon"
                 for item in self._matrix_items(group, index, grads)]
        if items and not self._compiled_ahead:
            self._compile_ahead(items, captured=scalars is not None)
        adamw = lambda: self._adamw_groups(scalars, grads)  # noqa: E731
        if not items:
            adamw()
        elif any(is_dtensor(item.param) and item.param.device_mesh.size() > 1 for item in items):
            # Sharded parameters: the momentum on local shards, then `sharded.py` assembles full matrices.
            # (A DTensor on a mesh of one rank, a single-GPU FSDP2 run, holds the whole tensor: the local path.)
            from muon_recipes.optim.sharded import orthogonalize_sharded
            self._momentum(items)
            orthos = orthogonalize_sharded(items, timer, self._dist_cache, bucket_mb=self.bucket_mb,
                                           replica_spread=self.replica_spread, overlap=adamw)
            for item, ortho in zip(items, orthos):
                self._apply(item, ortho, scalars)
        else:
            self._local_step(items, timer, scalars, adamw)

    def _local_step(self, items: list[MatrixUpdate], timer: _StepTimer, scalars: Optional[StepScalars],
                    adamw) -> None:
        """Phases (1)-(3) for whole matrices on this process, through one `BucketLayout`.

        Where `dispatch.bucket_io_on_triton` says so, a weight never has a momentum update of its own: the
        momentum writes each row block's U into its slot of the bucket (transposed for a tall block), and the
        update is applied block by block from the result's slot, each with its block's lr ratio. The other
        weights' updates are made whole and copied in (`orthogonalize`'s path)."""
        device = local(items[0].param).device
        layout = BucketLayout([(item.plan, item.ns, local(item.param).device) for item in items],
                              step_streams.parts_of_largest(device, captured=scalars is not None))
        direct = [self._plan(item.param, item.group)[2] is not None
                  and dispatch.bucket_io_on_triton(local(item.param), item.grad, item.buf, scalars is not None)
                  for item in items]
        streams = step_streams.for_step(device, captured=scalars is not None, plans_timed=self._local_steps > 0)
        self._local_steps += 1
        if streams is not None and layout.members:
            self._two_stream_step(items, layout, direct, scalars, adamw, streams)
            return
        for j, item in enumerate(items):
            if direct[j]:
                self._momentum_into(item, layout, j)
        self._momentum([item for item, d in zip(items, direct) if not d])
        adamw()
        start = timer.now()
        layout.run(fill={j: item.update for j, item in enumerate(items) if not direct[j]})
        timer.add("ns", start)
        for j, item in enumerate(items):
            if direct[j]:
                self._apply_blocks(item, layout, j, scalars)
            else:
                self._apply(item, layout.output(j, item.update, item.ns.dtype), scalars)

    def _two_stream_step(self, items: list[MatrixUpdate], layout: BucketLayout, direct: list[bool],
                         scalars: Optional[StepScalars], adamw, streams: step_streams.InlineStreams) -> None:
        """`_local_step` with the passes over memory beside the Newton-Schulz products (`step_streams.py`): per
        bucket in `layout.order()`, the momentum of its blocks and its normalization (`BucketLayout.prepare`) on
        the side stream; its iterations on the main stream once that is done; its weights' updates on the side
        stream once the iterations are done. AdamW runs on the side stream between the momentum and the updates.
        A weight outside the bucket path (`direct` False) makes its whole momentum update first and is applied once
        its last bucket is done. Every pass touches what it touches on one stream, so the numbers are the same bit
        for bit."""
        order = layout.order()
        for key in order:
            layout.batch(key)   # allocated on the main stream, which reads and then frees them
        last = {j: max(order.index(slot.key) for slot in layout.slots[j] if slot is not None)
                for j in range(len(items)) if not direct[j] and any(layout.slots[j])}
        streams.fork()
        with streams.side():
            self._momentum([item for item, d in zip(items, direct) if not d])
            fill = {j: item.update for j, item in enumerate(items) if not direct[j]}
            for key in order:
                for j in layout.jobs_in(key):
                    if direct[j]:
                        self._momentum_into(items[j], layout, j, key)
                layout.prepare(key, fill)
                streams.record(("prepared", key))
            adamw()
        for key in order:
            streams.wait(("prepared", key))
            layout.run_bucket(key)
            streams.record(("orthogonalized", key))
        with streams.side():
            for n, key in enumerate(order):
                streams.wait(("orthogonalized", key))
                for j in layout.jobs_in(key):
                    if direct[j]:
                        self._apply_blocks(items[j], layout, j, scalars, key)
                    elif last.get(j) == n:
                        self._apply(items[j], layout.output(j, items[j].update, items[j].ns.dtype), scalars)
            for j, item in enumerate(items):
                if not direct[j] and j not in last:   # no block to orthogonalize (an empty weight)
                    self._apply(item, layout.output(j, item.update, item.ns.dtype), scalars)
        streams.join()

    @staticmethod
    def _momentum_into(item: MatrixUpdate, layout: BucketLayout, j: int, bucket: Optional[tuple] = None) -> None:
        """Phase (1) of a weight on the bucket path: B <- momentum B + G, and each row block's update U written
        into its slot (`kernels.momentum_into`, one launch per run of `layout.runs(j)`); only the runs in
        `bucket` when one is given."""
        into = dispatch.kernels().momentum_into
        mu, nesterov = item.group["momentum"], item.group["nesterov"]
        views = zip(layout.source_views(j, item.grad), layout.source_views(j, item.buf), layout.slot_views(j))
        for run, (grad, buf, out) in enumerate(views):
            if bucket is None or layout.bucket_of(j, run) == bucket:
                into(grad, buf, out, mu, nesterov)

    # CUDA graph -----------------------------------------------------------------------------------------------
    def _graph_applies(self) -> bool:
        """Whether this step goes through the captured path; decided at the first step, said once when not."""
        if self.cuda_graph == "off" or self._graph_blocked is not None:
            return False
        if self._captured is None:
            reason = capture_blocker(self)
            if reason is not None:
                if self.cuda_graph == "on":
                    raise CudaGraphUnavailable(f"cuda_graph='on': the optimizer step cannot be captured: {reason} "
                                               "(use cuda_graph='auto' or 'off')")
                self._graph_blocked = reason
                say(f"optimizer: CUDA graph off: {reason}; the step runs eagerly")
                return False
            self._captured = CapturedStep(self, strict=self.cuda_graph == "on")
        return True

    def _run_captured(self) -> bool:
        """The step through `CapturedStep`; False when it declined (then the caller runs the eager step)."""
        ran = self._captured.step()
        if not ran:
            self._graph_blocked = self._captured.gave_up
        return ran

    @torch.no_grad()
    def _step_on_device(self, scalars: StepScalars, grads: dict) -> None:
        """One step on device scalars and the gradients in `grads` (what `CapturedStep` runs and captures)."""
        self._step(_StepTimer(False, None), scalars, grads)

    def _declare_scalars(self, scalars: StepScalars) -> None:
        """Reserve every device scalar the step reads: per group lr, -lr and 1 - lr * wd, and -lr * ratio for each
        lr ratio of its Muon blocks. (Called when the captured step is (re)built: the next step may be the first
        of new shapes, which times their Newton-Schulz plans on one stream, `step_streams.for_step`.)"""
        self._local_steps = 0
        for index, group in enumerate(self.param_groups):
            for name in ("lr", "neg_lr", "decay"):
                scalars.declare(index, name)
            if group["algorithm"] != "muon":
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                _, _, segments = self._plan(p, group)
                for _, _, ratio in segments or ():
                    scalars.declare(index, ("alpha", ratio))

    def _compile_ahead(self, items: list[MatrixUpdate], captured: bool) -> None:
        """Before the first orthogonalization of a single process: the Newton-Schulz kernels of every bucket of the
        step compiled at once (`orthogonalize.compile_ahead`), so a machine's first-ever tile searches only time.
        Under sharding each rank orthogonalizes a part, found only inside the step: there each shape compiles its
        own candidates at once as it comes (`kernels/iterations.py`)."""
        self._compiled_ahead = True
        if any(is_dtensor(item.param) and item.param.device_mesh.size() > 1 for item in items):
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return   # a step captured in a CUDA graph: nothing may allocate or compile here
        device = local(items[0].param).device
        try:
            compile_ahead([(item.plan, item.ns, local(item.param).device) for item in items],
                          step_streams.parts_of_largest(device, captured))
        except Exception:   # noqa: BLE001 - an optimization only: the step compiles what it needs as it goes
            pass

    # (1) momentum ---------------------------------------------------------------------------------------------
    def _matrix_items(self, group: dict, index: int, static_grads: Optional[dict]) -> list[MatrixUpdate]:
        """The group's weights that have a gradient, with their local gradient and momentum buffer (created at
        the first step), block plan and Newton-Schulz settings; no momentum computed yet."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return []
        # check_schedule: coefficients that came back from a state dict as lists become hashable tuples again.
        ns = NSSettings(group["ns_steps"], check_schedule(group["ns_schedule"]), resolve_dtype(group["ns_dtype"]),
                        group["backend"], NS_EPS, group["ns_method"])
        items = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            grad = static_grads[p] if static_grads is not None else local(p.grad)
            items.append(MatrixUpdate(p, group, grad, local(state["momentum_buffer"]), self._plan(p, group)[0], ns,
                                      index))
        return items

    @staticmethod
    def _momentum(items: list[MatrixUpdate]) -> None:
        """B <- momentum B + G and the update U (Nesterov: G + momentum B) of every item, into `item.update`;
        one multi-tensor pass per group, or the one-pass kernel per tensor where it applies."""
        by_group: dict[int, list[MatrixUpdate]] = {}
        for item in items:
            by_group.setdefault(item.group_index, []).append(item)
        for members in by_group.values():
            group, ns_dtype = members[0].group, members[0].ns.dtype
            grads, bufs = [item.grad for item in members], [item.buf for item in members]
            mu, nesterov = group["momentum"], group["nesterov"]
            if dispatch.momentum_on_triton(grads, bufs):
                # One pass per tensor, the update already in the Newton-Schulz dtype (kernels/elementwise.py).
                fused = dispatch.kernels().momentum_update
                updates = [fused(g, b, mu, nesterov, ns_dtype) for g, b in zip(grads, bufs)]
            else:
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)
                updates = torch._foreach_add(grads, bufs, alpha=mu) if nesterov else bufs
            for item, update in zip(members, updates):
                item.update = update

    def _plan(self, p: Tensor, group: dict) -> tuple[BlockPlan, Tensor, Optional[list]]:
        """The block plan of `p`, the lr ratio of each of its local rows, and those ratios as row segments.

        Cached per parameter (groups may change keys). The segments are `(start, stop, ratio)` runs along
        dim -2 shared by every leading index (always so for FSDP2's row or expert shards); None when the
        local rows do not have that form, and then the per-row ratios are applied as a tensor.
        """
        key = (tuple(group["split_sizes"] or ()), group["experts"], group["adjust_lr"])
        cached = self._plans.get(p)
        if cached is None or cached[0] != key:
            plan = BlockPlan.build(p.shape, group["split_sizes"], group["experts"])
            scale = plan.row_scale(group["adjust_lr"])
            if is_dtensor(p):
                from muon_recipes.optim.sharded import local_slice
                scale = local_slice(scale, p)
            cached = (key, plan, scale.to(local(p).device), _row_segments(scale))
            self._plans[p] = cached
        return cached[1], cached[2], cached[3]

    # (3) scale and apply --------------------------------------------------------------------------------------
    def _apply(self, item: MatrixUpdate, ortho: Tensor, scalars: Optional[StepScalars] = None) -> None:
        group, p = item.group, local(item.param)
        lr, wd = group["lr"], group["weight_decay"]
        _, scale, segments = self._plan(item.param, group)
        if scalars is not None:
            self._apply_on_device(p, ortho, item.group_index, wd, scale, segments, scalars)
            return
        if segments is not None and len(segments) == 1 and dispatch.scaled_add_on_triton(p, ortho):
            # Decay and update in one vectorized pass (kernels/elementwise.py).
            dispatch.kernels().scaled_add_(p, ortho, alpha=-lr * segments[0][2], decay=1 - lr * wd)
            return
        if wd:
            p.mul_(1 - lr * wd)
        if segments is None:
            p.addcmul_(ortho, scale, value=-lr)
            return
        # A scalar ratio per run of rows: a plain vectorized add, no per-row tensor read or broadcast.
        for start, stop, ratio in segments:
            if start == 0 and stop == p.shape[-2]:
                p.add_(ortho, alpha=-lr * ratio)
            else:
                p[..., start:stop, :].add_(ortho[..., start:stop, :], alpha=-lr * ratio)

    @staticmethod
    def _apply_on_device(p: Tensor, ortho: Tensor, index: int, wd: float, scale: Tensor, segments,
                         scalars: StepScalars) -> None:
        """`_apply` with lr-derived numbers read from device scalars: `decay` = 1 - lr wd, `alpha` = -lr ratio (the
        same float32 values the eager step passes as arguments)."""
        decay = scalars.slot(index, "decay")
        if segments is not None and len(segments) == 1 and dispatch.scaled_add_on_triton(p, ortho):
            dispatch.kernels().scaled_add_(p, ortho, alpha=scalars.slot(index, ("alpha", segments[0][2])),
                                           decay=decay)
            return
        if wd:
            p.mul_(decay)
        if segments is None:
            p.addcmul_(ortho, scale * scalars.slot(index, "neg_lr"))
            return
        for start, stop, ratio in segments:
            alpha = scalars.slot(index, ("alpha", ratio))
            if start == 0 and stop == p.shape[-2]:
                p.addcmul_(ortho, alpha)   # p + ortho * (-lr ratio) in float32, as add_ with alpha
            else:
                p[..., start:stop, :].addcmul_(ortho[..., start:stop, :], alpha)

    def _apply_blocks(self, item: MatrixUpdate, layout: BucketLayout, j: int,
                      scalars: Optional[StepScalars] = None, bucket: Optional[tuple] = None) -> None:
        """`_apply` of an item whose result stayed in its buckets: W_b <- (1 - lr wd) W_b - lr ratio_b O_b per run of
        row blocks (`BucketLayout.runs`: blocks of one shape, so one ratio), read from the result's slots
        (transposed for tall blocks) by the strided one-pass kernel; only the runs in `bucket` when one is given.
        The numbers are `_apply`'s: `decay` and `alpha` are the same float expressions or device scalars."""
        group, plan = item.group, item.plan
        _, _, segments = self._plan(item.param, group)
        scaled_add_ = dispatch.kernels().scaled_add_
        weights, results = layout.source_views(j, local(item.param)), layout.slot_views(j, results=True)
        for run, ((first, _), weight, result) in enumerate(zip(layout.runs(j), weights, results)):
            if bucket is not None and layout.bucket_of(j, run) != bucket:
                continue
            row = sum(plan.row_blocks[:first])
            ratio = next(r for start, stop, r in segments if start <= row < stop)
            if scalars is None:
                scaled_add_(weight, result, alpha=-group["lr"] * ratio, decay=1 - group["lr"] * group["weight_decay"])
            else:
                scaled_add_(weight, result, alpha=scalars.slot(item.group_index, ("alpha", ratio)),
                            decay=scalars.slot(item.group_index, "decay"))

    # AdamW ----------------------------------------------------------------------------------------------------
    def _adamw_groups(self, scalars: Optional[StepScalars] = None, static_grads: Optional[dict] = None) -> None:
        for index, group in enumerate(self.param_groups):
            if group["algorithm"] == "adamw":
                self._adamw(group, index, scalars, static_grads)

    def _adamw(self, group: dict, index: int = 0, scalars: Optional[StepScalars] = None,
               static_grads: Optional[dict] = None) -> None:
        """torch.optim.AdamW's multi-tensor update (decoupled weight decay, bias correction), on local shards.

        With `scalars`, lr comes from a device scalar and the bias corrections are computed on the device from the
        step counters (no `.item()`), as torch's capturable AdamW does."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        by_kind: dict[tuple, list[list[Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            lp = local(p)
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if (dispatch.fused_adamw(lp) or scalars is not None) and state["step"].device != lp.device:
                state["step"] = state["step"].to(lp.device)  # the fused kernel reads the step on the device
            grad = static_grads[p] if static_grads is not None else local(p.grad)
            lists = by_kind.setdefault((lp.device, lp.dtype), [[], [], [], [], []])
            for lst, t in zip(lists, (lp, grad, local(state["exp_avg"]), local(state["exp_avg_sq"]),
                                      state["step"])):
                lst.append(t)
        for params, grads, exp_avgs, exp_avg_sqs, steps in by_kind.values():
            if dispatch.fused_adamw(params[0]):
                # One pass over the memory instead of the ~8 of the multi-tensor ops below (same math: decoupled
                # decay, bias correction); `dispatch.fused_adamw` says when.
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                                    lr=lr if scalars is None else scalars.slot(index, "lr"),
                                    beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, maximize=False)
                continue
            if scalars is not None:
                _adamw_on_device(params, grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2, wd, eps,
                                 scalars.slot(index, "neg_lr"), scalars.slot(index, "decay"))
                continue
            torch._foreach_add_(steps, 1)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            step_values = [s.item() for s in steps]
            step_sizes = [-(lr / (1 - beta1 ** s)) for s in step_values]
            bias_correction2_sqrt = [(1 - beta2 ** s) ** 0.5 for s in step_values]
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, bias_correction2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def _adamw_on_device(params, grads, exp_avgs, exp_avg_sqs, steps, beta1: float, beta2: float, wd: float,
                     eps: float, neg_lr: Tensor, decay: Tensor) -> None:
    """AdamW's multi-tensor update with lr and the bias corrections as device tensors (capturable, no host sync):

        p <- decay p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    the same formula as the float form in `Muon._adamw`, rounded differently in the last bits (the step size is
    a float32 tensor product instead of a Python double)."""
    torch._foreach_add_(steps, 1)
    if wd:
        torch._foreach_mul_(params, decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    bias_correction1 = torch._foreach_pow(beta1, steps)   # beta1^t, then 1 - beta1^t
    torch._foreach_neg_(bias_correction1)
    torch._foreach_add_(bias_correction1, 1)
    step_sizes = torch._foreach_reciprocal(bias_correction1)
    torch._foreach_mul_(step_sizes, neg_lr)                # -lr / (1 - beta1^t)
    bias_correction2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias_correction2_sqrt)
    torch._foreach_add_(bias_correction2_sqrt, 1)
    torch._foreach_sqrt_(bias_correction2_sqrt)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(updates, step_sizes)
    torch._foreach_add_(params, updates)


def _row_segments(scale: Tensor) -> Optional[list[tuple[int, int, float]]]:
    """`(start, stop, ratio)` runs of equal ratio along dim -2 of a per-row scale `[..., rows, 1]`, or None
    when the rows differ between leading indices (then no common segments exist)."""
    rows = scale.shape[-2]
    if scale.numel() == 0:
        return []
    per_lead = scale.reshape(-1, rows)
    if not bool((per_lead == per_lead[:1]).all()):
        return None
    values = per_lead[0].tolist()
    segments, start = [], 0
    for r in range(1, rows + 1):
        if r == rows or values[r] != values[start]:
            segments.append((start, r, values[start]))
            start = r
    return segments


def _validate_group(group: dict, index: int) -> None:
    """One-line errors naming the group, the key, the value and what is valid; normalizes dtype and tuples."""
    where = f"param_groups[{index}]" + (f" ({group['name']})" if group.get("name") else "")

    def bad(key: str, valid: str) -> ValueError:
        return ValueError(f"{where}: {key}={group[key]!r}: {valid}")

    if group["algorithm"] not in ALGORITHMS:
        raise bad("algorithm", "must be one of " + ", ".join(ALGORITHMS))
    if not group["lr"] >= 0:
        raise bad("lr", "must be >= 0")
    if not group["weight_decay"] >= 0:
        raise bad("weight_decay", "must be >= 0")
    try:
        name = _dtype_name(group["ns_dtype"])
    except ValueError:
        name = None
    if name not in NS_DTYPES:
        raise bad("ns_dtype", "must be one of " + ", ".join(NS_DTYPES) + " (a torch.dtype or its name)")
    group["ns_dtype"] = name
    if group["algorithm"] == "adamw":
        betas = tuple(group["betas"])
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        group["betas"] = betas
        if not group["eps"] > 0:
            raise bad("eps", "must be > 0")
        return
    if not 0 <= group["momentum"] < 1:
        raise bad("momentum", "must be in [0, 1)")
    if group["adjust_lr"] not in ADJUST_LR:
        raise bad("adjust_lr", "must be one of " + ", ".join(ADJUST_LR))
    try:
        group["ns_schedule"] = check_schedule(group["ns_schedule"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if group["ns_method"] not in METHODS:
        raise bad("ns_method", "must be one of " + ", ".join(METHODS))
    if not isinstance(group["ns_steps"], int) or group["ns_steps"] < 1:
        raise bad("ns_steps", "must be an integer >= 1")
    if group["backend"] not in BACKENDS:
        raise bad("backend", "must be one of " + ", ".join(BACKENDS))
    if group["experts"] not in EXPERT_MODES:
        raise bad("experts", "must be one of " + ", ".join(EXPERT_MODES))
    if group["split_sizes"] is not None:
        group["split_sizes"] = tuple(int(s) for s in group["split_sizes"])
    for i, p in enumerate(group["params"]):
        try:
            BlockPlan.build(p.shape, group["split_sizes"], group["experts"])
        except ValueError as e:
            raise ValueError(f"{where}: params[{i}] of shape {tuple(p.shape)}: {e}") from None
