"""Mixture-of-experts feed-forward layer: token-choice top-k routing, dropless, grouped experts.

Routing follows DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437, section 2.1.2):

* affinities `s_{t,i} = sigmoid(u_t . e_i)` for every token `t` and routed expert `i`;
* auxiliary-loss-free load balancing (eq. 16): a per-expert bias `b_i` is added to the affinities **for the
  top-k selection only**; the gate values use the raw affinities, normalized over the selected experts
  (`g = s / sum_topk s`; with `top_k == 1` the gate is the raw affinity, since normalizing would make it the
  constant 1 and cut the router off from the loss gradient);
* after each step the trainer all-reduces the observed per-expert load and calls `update_bias`:
  `b_i += rate * sign(mean(load) - load_i)`, which raises under-loaded experts and lowers over-loaded ones.

An optional Switch-style balance loss (Fedus et al. 2021, arXiv:2101.03961, eq. 4, in the form of DeepSeek-V3
eqs. 17-20) is `coef * E * sum_i f_i * P_i` with `f_i` the share of the batch's `N*k` assignments that went to
expert `i` and `P_i` the mean over tokens of the affinities normalized over all experts; it equals `coef` when the
load is uniform.

Dropless: every token is processed by exactly its `top_k` experts (no capacity factor, no token dropping).
Tokens are sorted by expert so each expert sees one contiguous slice; the experts run either through
`torch._grouped_mm` (one kernel for all experts; CUDA, bf16) or through an exact loop over the experts. Expert
weights are 3-D parameters `[n_experts, out, in]` so that the optimizer sees `n_experts` matrices per tensor.

The step does no host synchronization and has no data-dependent shape (torchtitan's MoE, MegaBlocks' dropless
layout): one stable sort orders the `N*k` assignments by expert, the per-expert counts are the run lengths of the
sorted ids (a binary search), the `grouped_mm` group ends are the counts' cumulative sum on the device, and the
permutation to expert order and back is a row gather whose backward is again a gather through the inverse
permutation (no atomics, deterministic). The combine is the gate-weighted sum over the `k` slots of each token.
Everything from the router to the combine therefore compiles as one graph per block
(`torch.compile(fullgraph=True)`, tested). The routed and the shared experts read the same input and do not depend
on each other.

Shared experts (DeepSeekMoE, arXiv:2401.06066) process every token; `n_shared_experts` of them of width
`expert_ffn_dim` are one SwiGLU MLP of width `n_shared_experts * expert_ffn_dim`, which is the same function.

Expert parallelism (GShard, Lepikhin et al. 2020, arXiv:2006.16668, section 2.2; the dropless form of MegaBlocks,
Gale et al. 2022, arXiv:2211.15841): with `GroupedExperts.expert_parallel` set (by
`muon_recipes.parallel.expert_parallel.shard_experts`), rank `r` of an ep group of `P` ranks holds experts
`[r*E/P, (r+1)*E/P)` whole, as the local shard of a DTensor sharded on the expert dim. A forward then

1. exchanges the per-expert counts (an all-to-all of `E` integers), so every rank knows how many rows it sends
   to and receives from every peer (variable splits; one host sync per layer for the split sizes);
2. dispatches the expert-sorted rows with `all_to_all_single` (they arrive ordered by source, then expert),
   reorders them by expert and runs the local experts through the same grouped path as without parallelism;
3. undoes the reordering and combines: a second all-to-all sends every result back to its token's rank, where the
   gate-weighted sum over the `top_k` slots is computed as without parallelism.

Routing, the gates, the balance loss and the load counts stay on the token's rank, so they are computed exactly
as without parallelism. Gradients: the backward of each all-to-all is the all-to-all with the splits swapped, so a
local expert's gradient sums the contributions of the ep group's tokens; `_ExpertGradientMean` then sums it over
the expert's replicas (the other ep groups) and divides by the data-parallel size -- the mean over the whole
batch, exactly FSDP2's reduction (sum over ranks, then divide by their number) of the same gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from muon_recipes.config import ModelConfig
from muon_recipes.models.layers import FeedForward
from muon_recipes.optim.blocks import ParamLayout

# Rows per expert group handed to `torch._grouped_mm` are padded to a multiple of `GroupedExperts.group_align`.
# 1 (no padding): the bf16 kernel takes group boundaries at any row since torch 2.8 (pytorch/pytorch#155466
# checks alignment only on the static dimensions; torchtitan dropped its bf16 token-group padding for this
# reason, pytorch/ao#3924); rows of `dim` bf16 values with `dim % 8 == 0` start on 16-byte boundaries anyway.
# fp8/mxfp8 grouped GEMMs need 16 or 32: a larger value pads every group through index arithmetic on the device.
GROUP_ALIGN = 1

EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")


def grouped_mm_supported(x: torch.Tensor, dim: int, hidden: int) -> bool:
    """Whether `torch._grouped_mm` can run the experts for activations `x` of width `dim`, hidden width `hidden`.

    The CUDA kernel takes bf16 operands whose strides are multiples of 16 bytes (so `dim` and `hidden` multiples
    of 8 elements) and is built for compute capability 9.0 (Hopper) and newer in the torch versions we support.
    """
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if dim % 8 or hidden % 8:
        return False
    return _hopper_or_newer(x.device)


@torch.compiler.assume_constant_result
def _hopper_or_newer(device: torch.device) -> bool:
    """Compute capability >= 9.0. Marked constant: inside a compiled block, dynamo calls it once while tracing
    instead of tracing `torch.cuda.get_device_capability`, which is not among the functions it folds into a
    constant (torch 2.13's `constant_fold_functions`)."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


class Router(nn.Module):
    """Token-choice top-k router with a selection-only bias (DeepSeek-V3 auxiliary-loss-free balancing)."""

    def __init__(self, dim: int, n_experts: int, top_k: int, init_std: float):
        super().__init__()
        self.n_experts, self.top_k, self.init_std = n_experts, top_k, init_std
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        # Persistent: it is training state that a checkpoint must restore. Never touched by the gradient.
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x `[N, dim]` -> (affinities `[N, E]`, chosen experts `[N, k]`, gate values `[N, k]`), fp32 or wider."""
        logits = F.linear(x, self.weight)
        scores = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))  # >= fp32
        _, experts = torch.topk(scores.detach() + self.expert_bias, self.top_k, dim=-1)
        gates = scores.gather(-1, experts)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return scores, experts, gates

    def param_layouts(self) -> dict[str, ParamLayout]:
        return {"weight": ParamLayout(role="router")}

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        self.expert_bias.zero_()


@dataclass
class ExpertParallel:
    """Where this rank's routed experts live and how their gradients are reduced (see the module docstring)."""

    group: dist.ProcessGroup  # the ep group: the ranks one layer's experts are spread over
    size: int  # ranks in the ep group (P)
    rank: int  # this rank's index in it: it holds experts [rank*E/P, (rank+1)*E/P)
    replica_group: Optional[dist.ProcessGroup]  # the ranks holding the same experts; None when there is one copy
    data_parallel_size: int  # ranks whose batches make up one step's batch (the world size)
    # With `profile` set, the seconds this layer spends in its all-to-alls (counts, dispatch, combine; forward and
    # backward) add up in `all_to_all_s`; the device is synchronized around each, so use it to measure, not to train.
    profile: bool = False
    all_to_all_s: float = 0.0


def _all_to_all(out: torch.Tensor, rows: torch.Tensor, recv_splits: Optional[list[int]],
                send_splits: Optional[list[int]], ep: ExpertParallel) -> None:
    """`all_to_all_single` over the ep group, timed when `ep.profile` is set."""
    if not ep.profile:
        dist.all_to_all_single(out, rows, recv_splits, send_splits, group=ep.group)
        return
    if rows.is_cuda:
        torch.cuda.synchronize(rows.device)
    start = time.perf_counter()
    dist.all_to_all_single(out, rows, recv_splits, send_splits, group=ep.group)
    if rows.is_cuda:
        torch.cuda.synchronize(rows.device)
    ep.all_to_all_s += time.perf_counter() - start


class _ExpertGradientMean(torch.autograd.Function):
    """Identity forward on a local expert weight; backward: its gradient summed over the replicas of these experts
    and divided by the data-parallel size (FSDP2 on fp32 gradients: a sum over ranks, then one division by their
    number, its `ReduceOp.AVG`). Runs once per backward of a forward (per micro-batch)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
        ctx.ep = ep
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        if ctx.ep.replica_group is not None:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.ep.replica_group)
        return grad.div_(ctx.ep.data_parallel_size), None


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` of rows with variable splits; its backward sends the gradients back (splits swapped)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                ep: ExpertParallel) -> torch.Tensor:
        ctx.recv_splits, ctx.send_splits, ctx.ep = recv_splits, send_splits, ep
        out = rows.new_empty(sum(recv_splits), *rows.shape[1:])
        _all_to_all(out, rows.contiguous(), recv_splits, send_splits, ep)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.send_splits, ctx.recv_splits, ctx.ep), None, None, None


class GroupedExperts(nn.Module):
    """`n_experts` SwiGLU MLPs stored as 3-D weights: gate/up `[E, 2*hidden, dim]` (or `[E, hidden, dim]` each),
    down `[E, dim, hidden]`.

    `forward` takes tokens already sorted by expert (`counts[e]` consecutive rows for expert `e`); under expert
    parallelism the weights are DTensors sharded on the expert dim and `forward` runs this rank's experts only
    (`counts` has one entry per local expert).
    `backend`: `auto` (grouped GEMM when `grouped_mm_supported`, else the loop), `grouped_mm` (force it; also
    works on CPU where torch implements it) or `loop` (one GEMM per expert; exact, but the per-expert split needs
    the counts on the host, i.e. one device sync per layer).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, fused: bool, init_std: float, down_std: float):
        super().__init__()
        self.n_experts, self.dim, self.hidden, self.fused = n_experts, dim, hidden, fused
        self.init_std, self.down_std = init_std, down_std
        self.backend = "auto"
        self.group_align = GROUP_ALIGN  # rows per grouped_mm group are padded to a multiple of this
        self.expert_parallel: Optional[ExpertParallel] = None
        if fused:
            self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        else:
            self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
            self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def param_layouts(self) -> dict[str, ParamLayout]:
        per_expert = ParamLayout(role="matrix", experts=self.n_experts)
        if self.fused:
            gate_up = ParamLayout(role="matrix", fuse_kind="gate_up", row_blocks=(self.hidden, self.hidden),
                                  experts=self.n_experts)
            return {"gate_up_proj": gate_up, "down_proj": per_expert}
        return {"gate_proj": per_expert, "up_proj": per_expert, "down_proj": per_expert}

    def init_weights(self) -> None:
        for name, param in self.named_parameters(recurse=False):
            std = self.down_std if name == "down_proj" else self.init_std
            nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x `[M, dim]` sorted by expert (`counts[e]` rows of expert `e`, int64 on x's device) -> `[M, dim]`."""
        if self.backend not in EXPERT_BACKENDS:
            raise ValueError(f"GroupedExperts.backend={self.backend!r}: must be one of {', '.join(EXPERT_BACKENDS)}")
        use_grouped = self.backend == "grouped_mm" or (
            self.backend == "auto" and grouped_mm_supported(x, self.dim, self.hidden))
        if use_grouped:
            return self._forward_grouped_mm(x, counts)
        return self._forward_loop(x, counts)

    def _weight(self, name: str) -> torch.Tensor:
        """The weight the forward multiplies by: the parameter, or under expert parallelism its local experts."""
        weight = getattr(self, name)
        if self.expert_parallel is None:
            return weight
        return _ExpertGradientMean.apply(weight.to_local(), self.expert_parallel)

    def _swiglu(self, x: torch.Tensor, project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The expert MLP `down(silu(gate x) * up x)` with `project(x, W3d)` applying each row's expert."""
        if self.fused:
            gate, up = project(x, self._weight("gate_up_proj")).chunk(2, dim=-1)
        else:
            gate, up = project(x, self._weight("gate_proj")), project(x, self._weight("up_proj"))
        return project(F.silu(gate) * up, self._weight("down_proj"))

    def _forward_loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Experts without rows run too (empty GEMMs): every weight and the input stay in the autograd graph, so
        # the backward is the same sequence of operations on every rank -- under expert parallelism, a rank
        # whose experts got no token still joins the collectives of the backward (with zero gradients).
        def project(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.cat([F.linear(rows, w[e].to(a.dtype)) for e, rows in enumerate(a.split(sizes))])

        sizes = counts.tolist()
        return self._swiglu(x, project)

    def _forward_grouped_mm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Group g ends at row offs[g] = counts[0] + ... + counts[g], computed on the device: no host sync.
        ends = counts.cumsum(0)
        if self.group_align == 1:
            rows, offs = x, ends
        else:
            rows, offs, dest = self._pad_groups(x, counts, ends)
        offs = offs.to(torch.int32)

        def project(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            # w is [E, out, in]; grouped_mm wants [E, in, out]: the transposed view is column-major, as required.
            return torch._grouped_mm(a, w.to(a.dtype).transpose(-2, -1), offs=offs)

        out = self._swiglu(rows, project)
        return out if self.group_align == 1 else out[dest]

    def _pad_groups(self, x: torch.Tensor, counts: torch.Tensor,
                    ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(buffer, group ends, dest): the sorted rows copied to `buffer[dest]`, every expert group starting at a
        multiple of `group_align`. The buffer has the static size `M + E*(align-1)` rounded up, so no host sync and
        fixed shapes under compile; the slack after the last group is given to the last expert (its last end is
        the buffer's size): zero rows, computed and discarded, never uninitialized rows whose NaNs could leak into
        the backward."""
        align, n_rows = self.group_align, x.shape[0]
        capacity = _round_up(n_rows + counts.numel() * (align - 1), align)  # local experts under EP
        padded = (counts + align - 1) // align * align
        padded_end = padded.cumsum(0)
        row = torch.arange(n_rows, device=x.device)
        expert_of_row = torch.searchsorted(ends, row, right=True)  # rows are sorted by expert
        dest = row + (padded_end - padded - (ends - counts))[expert_of_row]
        buffer = torch.index_copy(x.new_zeros(capacity, self.dim), 0, dest, x)
        offs = torch.cat([padded_end[:-1], padded_end.new_full((1,), capacity)])
        return buffer, offs, dest


class _DispatchRows(torch.autograd.Function):
    """`x[order // k]`: token rows copied into expert order, one row per (token, slot) assignment.

    The backward sums each token's `k` row gradients, read through the inverse permutation (`inverse[j]` is the
    sorted position of assignment `j = token * k + slot`): a gather and a sum over `k`, instead of the scatter-add
    with atomics that autograd would derive from the indexing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).unflatten(0, (-1, ctx.k)).sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """`rows[index]` for a permutation `index` whose inverse is `inverse`: the backward is `grad[inverse]`, a
    gather, not autograd's zero-fill plus scatter-add."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class MoE(nn.Module):
    """Routed experts (+ optional shared experts) replacing the dense MLP of a transformer block.

    `forward(x)` returns `(output, aux_loss, counts)`: the per-expert number of token assignments of this call is
    returned rather than accumulated here, because under activation checkpointing the forward runs twice; the
    owning block records it once with `record_load`.
    """

    def __init__(self, cfg: ModelConfig, init_std: float, down_std: float):
        super().__init__()
        hidden = cfg.expert_ffn_dim or cfg.ffn_dim
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.bias_update_rate = cfg.router_bias_update_rate
        self.aux_loss_coef = cfg.aux_loss_coef
        self.router = Router(cfg.d_model, cfg.n_experts, cfg.top_k, init_std)
        self.experts = GroupedExperts(cfg.n_experts, cfg.d_model, hidden, cfg.fused_gate_up, init_std, down_std)
        self.shared_expert: Optional[FeedForward] = None
        if cfg.n_shared_experts:
            self.shared_expert = FeedForward(cfg.d_model, cfg.n_shared_experts * hidden, cfg.fused_gate_up,
                                             init_std, down_std)
        # Assignments per expert since the last bias update (float32 so all-reduce and means are direct).
        self.register_buffer("load_counts", torch.zeros(cfg.n_experts, dtype=torch.float32), persistent=False)

    def init_weights(self) -> None:
        self.load_counts.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if torch.is_autocast_enabled(x.device.type):
            # The residual stream stays fp32 under autocast (fp32 weights, no FSDP mixed precision); the expert
            # GEMMs are not autocast ops, so cast once here: they run in bf16 like every autocast matmul, through
            # the grouped kernel rather than the per-expert loop.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        n_tokens, k = x.shape[0], self.top_k
        scores, experts, gates = self.router(x)

        flat_experts = experts.reshape(-1)  # assignment j = token j // k, slot j % k
        sorted_experts, order = torch.sort(flat_experts, stable=True)  # order: sorted position -> assignment
        # counts[e]: the length of expert e's run in the sorted ids, from a binary search for the run ends; a
        # bincount without a host sync and without the atomics of a scatter-add onto E counters.
        ends = torch.searchsorted(sorted_experts, torch.arange(self.n_experts, device=x.device), right=True)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        x_sorted = _DispatchRows.apply(x, order, inverse, k)
        if self.experts.expert_parallel is None:
            y_sorted = self.experts(x_sorted, counts)
        else:
            y_sorted = self._expert_parallel_forward(x_sorted, counts, self.experts.expert_parallel)

        # Back to (token, slot) order, weight each slot by its gate, sum the k slots (one fused kernel compiled).
        y = _PermuteRows.apply(y_sorted, inverse, order).view(n_tokens, k, -1)
        out = (y * gates.unsqueeze(-1).to(y.dtype)).sum(dim=1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)

        aux_loss = scores.new_zeros(())
        if self.aux_loss_coef > 0:
            load_share = counts.to(scores.dtype) / (n_tokens * k)  # f_i, sums to 1
            mean_affinity = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)  # P_i, sums to 1
            aux_loss = self.aux_loss_coef * self.n_experts * (load_share * mean_affinity).sum()
        return out.view(shape), aux_loss, counts

    def _expert_parallel_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor,
                                 ep: ExpertParallel) -> torch.Tensor:
        """The routed experts' outputs for rows `x_sorted` (sorted by expert, `counts[e]` for expert `e`), computed
        by the ranks that hold the experts: counts exchange, dispatch, local experts, combine (module docstring)."""
        local_experts = self.n_experts // ep.size
        # Counts first: peer r receives counts[r*E/P:(r+1)*E/P], the rows this rank will send to each of its experts.
        received_counts = torch.empty_like(counts)
        _all_to_all(received_counts, counts, None, None, ep)
        received_counts = received_counts.view(ep.size, local_experts)  # [source rank, local expert]
        send_splits, recv_splits = torch.stack([counts.view(ep.size, local_experts).sum(1),
                                                received_counts.sum(1)]).tolist()  # the one host sync
        received = _AllToAll.apply(x_sorted, recv_splits, send_splits, ep)
        # Received rows are ordered (source, expert); the grouped experts want them ordered by expert.
        row_expert = torch.repeat_interleave(torch.arange(local_experts, device=counts.device).repeat(ep.size),
                                             received_counts.reshape(-1), output_size=sum(recv_splits))
        by_expert = torch.argsort(row_expert, stable=True)
        positions = torch.arange(by_expert.numel(), device=x_sorted.device)
        back = torch.empty_like(by_expert).scatter_(0, by_expert, positions)  # the inverse permutation
        y = self.experts(_PermuteRows.apply(received, by_expert, back), received_counts.sum(0))
        y = _PermuteRows.apply(y, back, by_expert)  # back to (source, expert) order
        return _AllToAll.apply(y, send_splits, recv_splits, ep)

    @torch.no_grad()
    def record_load(self, counts: torch.Tensor) -> None:
        """Add one forward's per-expert assignment counts to the accumulator."""
        self.load_counts.add_(counts.to(self.load_counts.dtype))

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """DeepSeek-V3 eq. 16 from (data-parallel all-reduced) counts, then reset the accumulator."""
        if counts.shape != (self.n_experts,):
            raise ValueError(f"update_bias: counts has shape {tuple(counts.shape)}, expected ({self.n_experts},)")
        bias = self.router.expert_bias
        counts = counts.to(device=bias.device, dtype=bias.dtype)
        bias.add_(self.bias_update_rate * torch.sign(counts.mean() - counts))
        self.load_counts.zero_()
