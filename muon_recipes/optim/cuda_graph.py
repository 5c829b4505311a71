"""The whole Muon+AdamW step as one CUDA graph: captured once, replayed every step (`Muon(cuda_graph=...)`).

Why: a Muon step is hundreds of small launches (momentum, bucket copies, Newton-Schulz products, the update
per block, AdamW), each a few microseconds of host work. On a model of many small matrices (moe_small: d_model
512, per layer q/k/v/o blocks and eight 768 x 512 experts) the host, not the GPU, sets the pace. A CUDA graph
replays the recorded launches with one call.

What a replay must still get right, and how:

* **Scheduled hyperparameters.** An lr schedule writes `group["lr"]` (a float) before every step; a graph
  would keep the value seen at capture. Every number the step derives from lr and weight decay is computed on
  the host exactly as the eager step computes it (`1 - lr * wd`, `-lr * ratio` per run of rows of a block, ...),
  written into one device buffer with one copy before each replay (`StepScalars`), and the captured kernels read
  them from there. `group["lr"]` itself stays a float, so state dicts and resumes are as before. Keys that
  change the *shape* of the work (momentum, betas, eps, Newton-Schulz settings, whether weight decay is zero,
  AdamW's weight decay which torch's fused kernel takes as a constant, the set of parameters with gradients)
  are part of a signature: when one changes, the step is warmed up and captured again (at most
  `MAX_CAPTURES` times; then it stays eager, said in one line).
* **Gradients.** The graph reads fixed addresses. The static buffers are the gradient tensors present when the
  step is (re)built: a gradient that is still the same tensor at a later step (`zero_grad(set_to_none=False)`
  and accumulation in place, or gradients that are simply kept) is read where it is, with no copy. A new tensor
  (after `zero_grad(set_to_none=True)`, or FSDP2's reduce-scatter output of each step) is copied into the
  buffer with one multi-tensor copy before the replay. So an old gradient tensor the caller dropped is kept and
  overwritten by later steps' gradients. Memory: the buffers are one more copy of the gradients where
  gradients are new tensors each step (none where they stay), and the step's temporaries (Newton-Schulz
  buckets) stay reserved in the graph's private pool between steps instead of returning to the caching
  allocator.
* **AdamW's step counter and bias correction** live on the device (torch's fused AdamW reads the step there; the
  multi-tensor form computes `1 - beta ** step` with tensor ops), so no `.item()` syncs the host.
* **Warm-up.** `WARMUP_STEPS` real steps run eagerly (on the device-scalar path) before the capture, so the
  Triton kernels are compiled and autotuned, the Newton-Schulz kernel plans timed, and the optimizer state
  exists before anything is recorded.

Where it applies: every parameter on one CUDA device, plain tensors or DTensors on a mesh of one rank (a
single-GPU FSDP2 run: the local shard is the whole tensor, the step needs no communication and is captured
whole), dense gradients. With several ranks the sharded step (`sharded.py`) interleaves its all-to-alls with
the Newton-Schulz buckets on a separate NCCL stream and waits on them from the host; that path stays eager
(`capture_blocker` says so): capturing it would need every rank to capture and replay the same collectives in
lockstep, and the multi-process CPU tests (gloo) could not check it.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import torch
from torch import Tensor

from muon_recipes.choices import CUDA_GRAPH_MODES

# Eager steps on the device-scalar path before the capture (compilation, autotuning, state creation).
WARMUP_STEPS = 2
# Captures per optimizer before it gives up and stays eager (each capture follows WARMUP_STEPS eager steps).
MAX_CAPTURES = 4

# Group keys whose value changes the recorded work, not just a number it reads.
_MUON_STRUCTURE = ("momentum", "nesterov", "ns_steps", "ns_schedule", "ns_method", "ns_dtype", "backend",
                   "split_sizes", "experts", "adjust_lr")
_ADAMW_STRUCTURE = ("betas", "eps", "weight_decay")


class CudaGraphUnavailable(RuntimeError):
    """`cuda_graph="on"` and the step cannot be captured here; the message says why."""


def say(line: str) -> None:
    """One line on stdout from the first rank only (every rank makes the same decision)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    print(line, flush=True)


def _mesh_size(t: Tensor) -> int:
    mesh = getattr(t, "device_mesh", None)
    return mesh.size() if mesh is not None else 1


def capture_blocker(optimizer) -> Optional[str]:
    """Why this optimizer's step cannot be captured as one CUDA graph here, or None when it can."""
    from muon_recipes.optim.muon import local

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params:
        return "the optimizer has no parameters"
    devices = {local(p).device for p in params}
    if len(devices) > 1:
        return f"parameters on {len(devices)} devices ({', '.join(sorted(map(str, devices)))})"
    device = devices.pop()
    if device.type != "cuda":
        return f"parameters are on {device.type} (CUDA graphs need CUDA tensors)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    ranks = max(_mesh_size(p) for p in params)
    if ranks > 1:
        return (f"parameters are sharded over {ranks} ranks: the sharded step's collectives run eagerly "
                "(docs/benchmarks.md, \"The captured step\")")
    if any(p.grad is not None and (p.grad.is_sparse or local(p.grad).layout != torch.strided) for p in params):
        return "sparse gradients"
    if any(p.grad is not None and local(p.grad).device != device for p in params):
        return "gradients on another device than their parameters"
    return None


def check_mode(mode: str) -> str:
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graph={mode!r}: must be one of {', '.join(CUDA_GRAPH_MODES)}")
    return mode


class StepScalars:
    """Every number of the step that follows from a group's lr and weight decay, as 0-d device tensors.

    `slot(group_index, name)` gives the tensor the step reads (the same object every step, so a graph records
    its address); `fill(groups)` computes all values on the host with the eager step's own float expressions and
    writes them with one host-to-device copy. Names: "lr", "neg_lr" (-lr), "decay" (1 - lr * wd), and
    ("alpha", ratio) for -lr * ratio, the update's scale on a run of rows whose lr ratio is `ratio`.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[tuple[int, object]] = []
        self.index: dict[tuple[int, object], int] = {}
        self.values: Optional[Tensor] = None

    def declare(self, group_index: int, name: object) -> None:
        """Reserve a slot (before the first `fill`)."""
        key = (group_index, name)
        if key not in self.index:
            self.index[key] = len(self.names)
            self.names.append(key)

    def slot(self, group_index: int, name: object) -> Tensor:
        return self.values[self.index[(group_index, name)]]

    @staticmethod
    def value(group: dict, name: object) -> float:
        lr, wd = group["lr"], group["weight_decay"]
        if name == "lr":
            return lr
        if name == "neg_lr":
            return -lr
        if name == "decay":
            return 1 - lr * wd
        return -lr * name[1]   # ("alpha", ratio), as the eager `alpha=-lr * ratio`

    def fill(self, groups: list[dict]) -> None:
        host = [self.value(groups[g], name) for g, name in self.names]
        if self.values is None:
            self.values = torch.zeros(len(host), dtype=torch.float32, device=self.device)
        if self.device.type == "cuda":
            # A fresh pinned buffer each step: the caching host allocator does not hand it out again before the
            # asynchronous copy has read it, and the copy needs no host sync.
            staged = torch.tensor(host, dtype=torch.float32, pin_memory=True)
            self.values.copy_(staged, non_blocking=True)
        else:
            self.values.copy_(torch.tensor(host, dtype=torch.float32))


def _static_buffer(grad: Tensor) -> Tensor:
    """The buffer a captured step reads a parameter's gradient from: the gradient tensor itself where it is dense
    and contiguous (no copy while the caller keeps it), else a new tensor like it (as before gradients were
    adopted)."""
    if grad.layout == torch.strided and grad.is_contiguous():
        return grad
    return torch.empty_like(grad)


class CapturedStep:
    """Runs an optimizer's step on device scalars and static gradient buffers; with `capture`, as a CUDA graph.

    The optimizer provides `_step_on_device(scalars, grads)` (the step, reading every lr-derived number from
    `scalars` and every gradient from `grads`, a dict param -> local gradient) and `_declare_scalars(scalars)`.
    Without `capture` every step runs that path eagerly: the same arithmetic as the captured step, which is how
    it is tested without a GPU.
    """

    def __init__(self, optimizer, capture: bool = True, warmup_steps: int = WARMUP_STEPS,
                 log: Callable[[str], None] = say, strict: bool = False):
        self.optimizer = optimizer
        self.capture = capture
        self.strict = strict   # cuda_graph="on": raise where "auto" falls back to the eager step
        self.warmup_steps = warmup_steps
        self.log = log
        self.signature: Optional[tuple] = None
        self.graph = None
        self.captures = 0
        self.warmups_left = warmup_steps
        self.scalars: Optional[StepScalars] = None
        self.grads: dict[Tensor, Tensor] = {}
        self.gave_up: Optional[str] = None   # why the step stays eager from now on

    # ------------------------------------------------------------------------------------------------------
    def current_signature(self) -> tuple:
        parts = []
        for group in self.optimizer.param_groups:
            keys = _ADAMW_STRUCTURE if group["algorithm"] == "adamw" else _MUON_STRUCTURE
            parts.append((group["algorithm"], group["weight_decay"] != 0, tuple(group[k] for k in keys),
                          tuple((id(p), p.grad is not None) for p in group["params"])))
        return tuple(parts)

    def reset(self) -> None:
        """Forget the graph and the buffers (a loaded state dict replaced the tensors it recorded)."""
        self.signature, self.graph, self.scalars, self.grads = None, None, None, {}

    def _rebuild(self, signature: tuple) -> None:
        from muon_recipes.optim.muon import local

        self.graph = None
        self.signature = signature
        self.warmups_left = self.warmup_steps
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = local(params[0]).device if params else torch.device("cpu")
        self.grads = {p: _static_buffer(local(p.grad)) for p in params}
        self.scalars = StepScalars(device)
        self.optimizer._declare_scalars(self.scalars)

    def _load_gradients(self) -> None:
        from muon_recipes.optim.muon import local

        dst, src = [], []
        for p, buffer in self.grads.items():
            grad = local(p.grad)
            if grad.data_ptr() != buffer.data_ptr():
                dst.append(buffer)
                src.append(grad)
        if dst:
            torch._foreach_copy_(dst, src)

    # ------------------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One step; False when the step must run eagerly instead (the caller runs it), said once."""
        if self.gave_up is not None:
            return False
        signature = self.current_signature()
        if signature != self.signature:
            if self.captures >= MAX_CAPTURES:
                return self._give_up(f"the step changed shape after {self.captures} captures (which parameters "
                                     "have gradients, or a structural hyperparameter)")
            try:
                self._rebuild(signature)
            except torch.cuda.OutOfMemoryError:
                return self._give_up("no memory for the static gradient buffers (one copy of the gradients)")
        self._load_gradients()
        self.scalars.fill(self.optimizer.param_groups)
        if not self.capture or self.warmups_left > 0:
            self.warmups_left -= 1
            self.optimizer._step_on_device(self.scalars, self.grads)
            return True
        if self.graph is None and not self._capture():
            return False
        self.graph.replay()
        return True

    def _give_up(self, reason: str) -> bool:
        if self.strict:
            raise CudaGraphUnavailable(f"cuda_graph='on': {reason}")
        self.gave_up = reason
        self.log(f"optimizer: CUDA graph off: {reason}; the step runs eagerly")
        self.reset()
        return False

    def _capture(self) -> bool:
        """Record the step (nothing runs yet: the replay that follows is this step). False when recording failed
        (the parameters are untouched then, so the eager step can take over). Where the streams' priorities are
        set (`step_streams.keeps_priorities`), the step is recorded on a stream of the main priority and the graph
        instantiated with the priorities each kernel was recorded with (`PrioritizedGraph`)."""
        from muon_recipes.optim import step_streams

        start = time.perf_counter()
        prioritized = step_streams.keeps_priorities()
        graph = torch.cuda.CUDAGraph(keep_graph=True) if prioritized else torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(priority=step_streams.main_priority()) if prioritized else None
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self.optimizer._step_on_device(self.scalars, self.grads)
            if prioritized:
                graph = PrioritizedGraph(graph)
        except Exception as error:
            message = str(error).strip().splitlines()
            return self._give_up(f"capturing the step failed: {type(error).__name__}"
                                 + (f": {message[0]}" if message else ""))
        self.graph = graph
        self.captures += 1
        self.log(f"optimizer: step captured as one CUDA graph in {time.perf_counter() - start:.2f} s "
                 f"(capture {self.captures}, {len(self.grads)} parameters)")
        return True


class PrioritizedGraph:
    """A captured `torch.cuda.CUDAGraph(keep_graph=True)` instantiated with
    CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY: each kernel runs at the priority of the stream it was recorded on, instead of all at the priority of the stream
    the graph is replayed on (CUDA Driver API, cuGraphInstantiateWithFlags). torch instantiates without that flag,
    so stream priorities set for a captured two-stream step (`step_streams.keeps_priorities`) would do nothing.

    The torch graph is kept: it owns the recorded graph and the memory pool its kernels address."""

    # CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH (as torch's own instantiation) | ..._USE_NODE_PRIORITY
    FLAGS = 1 | 8

    def __init__(self, graph: "torch.cuda.CUDAGraph"):
        import ctypes

        self.graph = graph
        self._driver = ctypes.CDLL("libcuda.so.1")
        self._ctypes = ctypes
        handle = ctypes.c_void_p()
        self._check(self._driver.cuGraphInstantiateWithFlags(
            ctypes.byref(handle), ctypes.c_void_p(graph.raw_cuda_graph()), ctypes.c_ulonglong(self.FLAGS)),
            "cuGraphInstantiateWithFlags")
        self.exec = handle

    @staticmethod
    def _check(status: int, call: str) -> None:
        if status != 0:
            raise RuntimeError(f"{call} returned CUDA driver error {status}")

    def replay(self) -> None:
        stream = self._ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(self._driver.cuGraphLaunch(self.exec, stream), "cuGraphLaunch")

    def __del__(self) -> None:
        exec_handle, self.exec = getattr(self, "exec", None), None
        if exec_handle is not None and exec_handle.value:
            try:
                self._driver.cuGraphExecDestroy(exec_handle)
            except Exception:
                pass   # interpreter shutdown
