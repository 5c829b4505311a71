"""Muon on FSDP2-sharded parameters: assemble full matrices, spread Newton-Schulz over ranks, send shards back.

Under FSDP2 every rank holds a row shard (DTensor, `Shard(0)`, chunked like `torch.chunk`: the last ranks
short or empty) of every parameter and gradient. Newton-Schulz needs whole matrices, and its cost is cubic,
so it must neither run on shards nor be repeated on every rank. Per step:

1. Parameters whose shards hold whole blocks -- an expert weight `[E, out, in]` sharded on the expert dim in
   `per_expert` mode, or a fused weight whose shard boundaries fall on its block boundaries -- are
   orthogonalized where they are, with no communication.
2. Every other matrix gets an *owner*: one rank of the mesh, chosen so the Newton-Schulz work (estimated in
   multiply-adds, local work included) is balanced (longest-processing-time-first greedy).
3. Parameters are packed into buckets (same shapes together, `bucket_mb` of full matrices each). Per bucket,
   one all-to-all over the shard group gives each owner the shards of its matrices (it receives about one
   copy of its share, the minimum); the owner concatenates them, splits the full matrix into its blocks
   (split after assembly, so any `split_sizes` work with any world size), orthogonalizes all its blocks of
   equal shape in one batched call, and a second all-to-all returns each rank its rows.
4. The buckets form a pipeline: all gathers are issued at once (asynchronous collectives; on GPUs NCCL
   runs on its own stream), bucket k is orthogonalized as soon as its gather lands, its scatter is issued
   right after, and the AdamW groups and the local work run while the first messages are in flight.

HSDP (mesh `(replicate, shard)`): gradients are already identical on the replicas. With `replica_spread`
the owners are drawn from the whole mesh (each replica gathers only its owners' matrices within its shard
group) and the second all-to-all sends results to every rank of every replica, so each rank does 1/(R*S)
of the work and replicas receive the same bytes; without it each replica orthogonalizes the same matrices
within its shard group. "auto" spreads when there are at least as many matrices as mesh ranks. Local work
(step 1) is done by every replica on its own copy.

Communication runs in the Newton-Schulz dtype (bf16 by default: half the bytes of float32; the iteration
rounds to it anyway). The single-process path rounds to the same dtype before normalizing, so sharded and
single-process runs compute the same numbers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from muon_recipes.choices import REPLICA_SPREAD
from muon_recipes.optim.blocks import BlockPlan
from muon_recipes.optim.orthogonalize import orthogonalize



# --------------------------------------------------------------------------------------------------------------
# Where each rank's shard sits
# --------------------------------------------------------------------------------------------------------------
def chunk_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """(start, length) of each of `parts` chunks of `size`, as torch.chunk / DTensor / FSDP2 cut them."""
    chunk = -(-size // parts) if parts else 0
    starts = [min(i * chunk, size) for i in range(parts)]
    return [(s, min(chunk, size - s)) for s in starts]


def local_slice(full: Tensor, like: DTensor) -> Tensor:
    """The part of `full` (global shape of `like`, or broadcastable rows) this rank holds under `like`'s placements.

    Dims of size 1 in `full` broadcast and are not sliced (e.g. per-row scales `[rows, 1]` under Shard(1)).
    """
    mesh, coord = like.device_mesh, like.device_mesh.get_coordinate()
    out = full
    for mesh_dim, placement in enumerate(like.placements):
        if not isinstance(placement, Shard) or (out.shape[placement.dim] == 1 and like.shape[placement.dim] != 1):
            continue
        start, length = chunk_bounds(out.shape[placement.dim], mesh.size(mesh_dim))[coord[mesh_dim]]
        out = out.narrow(placement.dim, start, length)
    return out


@dataclass(frozen=True)
class ShardLayout:
    """A DTensor parameter sharded along tensor dim `dim` over mesh dim `mesh_dim`, replicated over the others."""

    shape: tuple[int, ...]
    dim: int
    mesh_dim: int
    bounds: tuple[tuple[int, int], ...]  # (start, length) per shard index

    @classmethod
    def of(cls, p: DTensor) -> Optional["ShardLayout"]:
        shards = [(i, pl.dim) for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
        if any(isinstance(pl, Partial) for pl in p.placements) or any(
                not isinstance(pl, (Shard, Replicate)) for pl in p.placements):
            raise NotImplementedError(f"Muon: parameter of shape {tuple(p.shape)} has placements {p.placements}; "
                                      "supported are Shard(d) on one mesh dim and Replicate() on the others")
        if not shards:
            return None
        if len(shards) > 1:
            raise NotImplementedError(f"Muon: parameter of shape {tuple(p.shape)} is sharded over several mesh "
                                      f"dims {p.placements}; supported is one Shard(d) (FSDP2, HSDP)")
        mesh_dim, dim = shards[0]
        dim = dim % p.ndim
        return cls(tuple(p.shape), dim, mesh_dim, tuple(chunk_bounds(p.shape[dim], p.device_mesh.size(mesh_dim))))

    def shard_shape(self, t: int) -> tuple[int, ...]:
        shape = list(self.shape)
        shape[self.dim] = self.bounds[t][1]
        return tuple(shape)

    def numel(self, t: int) -> int:
        n = 1
        for s in self.shard_shape(t):
            n *= s
        return n

    def local_plan(self, plan: BlockPlan, t: int) -> Optional[BlockPlan]:
        """The plan of shard t on its own when *every* shard holds whole blocks; None when assembly is needed."""
        ndim = len(self.shape)
        if self.dim == 0 and ndim == 3 and not plan.fuse_experts:  # whole experts, each its own matrices
            return BlockPlan(self.shard_shape(t), plan.row_blocks, False)
        if self.dim != ndim - 2:
            return None
        edges = set(itertools.accumulate(plan.row_blocks, initial=0))
        if any(start not in edges for start, _ in self.bounds):
            return None
        start, length = self.bounds[t]
        inside = []
        for lo, size in zip(itertools.accumulate(plan.row_blocks, initial=0), plan.row_blocks):
            if start <= lo and lo + size <= start + length:
                inside.append(size)
        return BlockPlan(self.shard_shape(t), tuple(inside), plan.fuse_experts)


def assemble_shards(shards: Sequence[Tensor], dim: int) -> Tensor:
    """The full matrix from its shards in shard order (a function of its own so tests can break it on purpose)."""
    return torch.cat(list(shards), dim=dim)


# --------------------------------------------------------------------------------------------------------------
# Who talks to whom
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Topology:
    """Process groups and rank maps of one (mesh, shard mesh dim): R replicas x S shards.

    grid[j][t] is the global rank of replica j, shard t. The shard group of replica j is grid[j]; the mesh
    group holds all R*S ranks (the same group as the shard group when R == 1).
    """

    S: int
    R: int
    grid: list[list[int]]
    replica: int  # my j
    shard: int  # my t
    shard_group: dist.ProcessGroup
    shard_group_rank: list[int]  # shard index t -> group rank in my shard group
    mesh_group: Optional[dist.ProcessGroup] = None
    mesh_group_rank: list[list[int]] = field(default_factory=list)  # [j][t] -> group rank in mesh group

    @classmethod
    def build(cls, mesh, mesh_dim: int, cache: dict) -> "Topology":
        S = mesh.size(mesh_dim)
        grid_t = mesh.mesh.movedim(mesh_dim, -1).reshape(-1, S)
        grid = grid_t.tolist()
        me = dist.get_rank()
        (j, t), = [(j, t) for j, row in enumerate(grid) for t, r in enumerate(row) if r == me]
        shard_group = mesh.get_group(mesh_dim)
        topo = cls(S, len(grid), grid, j, t, shard_group,
                   [dist.get_group_rank(shard_group, r) for r in grid[j]])
        if topo.R == 1:
            topo.mesh_group, topo.mesh_group_rank = shard_group, [topo.shard_group_rank]
        else:
            ranks = sorted(r for row in grid for r in row)
            if len(ranks) == dist.get_world_size():
                group = dist.group.WORLD
            else:  # a mesh over part of the world: one group for it, made once by its members
                key = ("mesh_group", tuple(ranks))
                if key not in cache:
                    cache[key] = dist.new_group(ranks, use_local_synchronization=True)
                group = cache[key]
            topo.mesh_group = group
            topo.mesh_group_rank = [[dist.get_group_rank(group, r) for r in row] for row in grid]
        return topo


# --------------------------------------------------------------------------------------------------------------
# The step plan: who orthogonalizes what, in which bucket, with which message sizes (cached between steps)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Bucket:
    """Matrices that travel together. `owners[k]` is an owner id in [0, P): t when not spread, j*S + t when spread."""

    topo: Topology
    spread: bool
    dtype: torch.dtype
    members: list[int]  # item indices
    owners: list[int]
    send1: list[int] = field(default_factory=list)  # members I send in the gather, packed in this order
    send1_splits: list[int] = field(default_factory=list)  # per shard-group rank
    recv1_splits: list[int] = field(default_factory=list)
    recv1_pieces: list[tuple[int, int]] = field(default_factory=list)  # (member k, shard t) in buffer order
    mine: list[int] = field(default_factory=list)  # members I own, bucket order
    send2_pieces: list[tuple[int, int]] = field(default_factory=list)  # (member k, shard t) in buffer order
    send2_splits: list[int] = field(default_factory=list)  # per group rank of the scatter group
    recv2_members: list[int] = field(default_factory=list)  # members whose shard I receive, buffer order
    recv2_splits: list[int] = field(default_factory=list)

    @property
    def scatter_group(self) -> dist.ProcessGroup:
        return self.topo.mesh_group if self.spread else self.topo.shard_group

    def owner_coords(self, o: int) -> tuple[int, int]:
        return divmod(o, self.topo.S) if self.spread else (self.topo.replica, o)

    def my_owner_id(self) -> int:
        return self.topo.replica * self.topo.S + self.topo.shard if self.spread else self.topo.shard


@dataclass
class StepPlan:
    layouts: list[Optional[ShardLayout]]  # per item; None for plain tensors
    local: list[tuple[int, Optional[BlockPlan]]]  # (item index, plan of its local tensor; None = empty shard)
    buckets: list[Bucket]


def _group_rank_order(ranks_by_index: list[int]) -> list[int]:
    """Indices sorted by their group rank (all_to_all splits are in group-rank order)."""
    return sorted(range(len(ranks_by_index)), key=lambda i: ranks_by_index[i])


def build_step_plan(items, cache: dict, bucket_mb: float, replica_spread) -> StepPlan:
    layouts: list[Optional[ShardLayout]] = [
        ShardLayout.of(it.param) if isinstance(it.param, DTensor) else None for it in items]
    local: list[tuple[int, Optional[BlockPlan]]] = []
    domains: dict[tuple, list[int]] = {}
    topos: dict[tuple, Topology] = {}
    local_cost: dict[tuple, list[float]] = {}
    for i, (item, layout) in enumerate(zip(items, layouts)):
        if layout is None:  # plain or replicated: the whole matrix is here
            local.append((i, item.plan))
            continue
        mesh = item.param.device_mesh
        key = (mesh, layout.mesh_dim)
        if key not in topos:
            topo_key = ("topology",) + key
            if topo_key not in cache:
                cache[topo_key] = Topology.build(mesh, layout.mesh_dim, cache)
            topos[key] = cache[topo_key]
            local_cost[key] = [0.0] * topos[key].S
        topo = topos[key]
        plans = [layout.local_plan(item.plan, t) for t in range(topo.S)]
        if plans[0] is not None:
            for t, plan in enumerate(plans):
                local_cost[key][t] += _ns_cost(item, plan) if layout.numel(t) else 0.0
            local.append((i, plans[topo.shard] if layout.numel(topo.shard) else None))
        else:
            domains.setdefault(key, []).append(i)

    buckets: list[Bucket] = []
    for key, members in domains.items():
        topo = topos[key]
        spread = topo.R > 1 and (len(members) >= topo.R * topo.S if replica_spread == "auto" else bool(replica_spread))
        P = topo.R * topo.S if spread else topo.S
        loads = [local_cost[key][o % topo.S] for o in range(P)]
        for bucket in _bucket_members(items, members, P, bucket_mb * 2**20):
            buckets.append(_make_bucket(items, layouts, topo, spread, bucket, loads))
    return StepPlan(layouts, local, buckets)


def _ns_cost(item, plan) -> float:
    """Newton-Schulz work of `plan`'s blocks with the item's settings, in the form `newton_schulz` will use."""
    return plan.cost(item.ns.steps, item.ns.method, item.param.device.type == "cuda")


def _bucket_members(items, members: list[int], owners: int, cap: float) -> list[list[int]]:
    """Buckets of matrices: equal block shapes together, in multiples of the owner count when they fill one.

    The collectives synchronize the ranks once per bucket, so each bucket should be balanced on its own:
    k * owners matrices of one shape (k as large as `cap` bytes allow) give every owner k of them. What is
    left of each shape is packed into mixed buckets up to `cap`, balanced by the greedy assignment.
    """
    kinds: dict[tuple, list[int]] = {}
    for i in members:
        kinds.setdefault((items[i].ns, tuple(items[i].plan.block_shapes())), []).append(i)
    buckets, rest = [], []
    for kind in kinds.values():
        nbytes = items[kind[0]].param.numel() * items[kind[0]].ns.dtype.itemsize
        per_bucket = owners * max(1, int(cap // (owners * nbytes)))
        whole = len(kind) // per_bucket * per_bucket
        buckets += [kind[n:n + per_bucket] for n in range(0, whole, per_bucket)]
        rest += kind[whole:]
    current, size = [], 0.0
    for i in rest:
        nbytes = items[i].param.numel() * items[i].ns.dtype.itemsize
        if current and (size + nbytes > cap or items[i].ns.dtype != items[current[0]].ns.dtype):
            buckets.append(current)
            current, size = [], 0.0
        current.append(i)
        size += nbytes
    return buckets + ([current] if current else [])


def _make_bucket(items, layouts, topo: Topology, spread: bool, members: list[int], loads: list[float]) -> Bucket:
    # Longest processing time first onto the least loaded owner (ties: lowest id), identical on every rank.
    owners = [0] * len(members)
    costs = [_ns_cost(items[i], items[i].plan) for i in members]
    for k in sorted(range(len(members)), key=lambda k: -costs[k]):
        o = min(range(len(loads)), key=lambda o: (loads[o], o))
        owners[k] = o
        loads[o] += costs[k]
    b = Bucket(topo, spread, items[members[0]].ns.dtype, members, owners)
    me, S = b.my_owner_id(), topo.S
    lay = [layouts[i] for i in members]
    # Gather, within my shard group: to shard t, my rows of every matrix owned by (my replica, t).
    for t in _group_rank_order(topo.shard_group_rank):
        ks = [k for k, o in enumerate(owners) if b.owner_coords(o) == (topo.replica, t)]
        b.send1 += ks
        b.send1_splits.append(sum(lay[k].numel(topo.shard) for k in ks))
    b.mine = [k for k, o in enumerate(owners) if o == me]
    for t in _group_rank_order(topo.shard_group_rank):
        b.recv1_pieces += [(k, t) for k in b.mine]
        b.recv1_splits.append(sum(lay[k].numel(t) for k in b.mine))
    # Scatter: to every rank of the scatter group, its rows of every matrix I own.
    if spread:
        ranks = {(j, t): topo.mesh_group_rank[j][t] for j in range(topo.R) for t in range(S)}
    else:
        ranks = {(topo.replica, t): topo.shard_group_rank[t] for t in range(S)}
    dests = sorted(ranks, key=ranks.get)
    for j, t in dests:
        b.send2_pieces += [(k, t) for k in b.mine]
        b.send2_splits.append(sum(lay[k].numel(t) for k in b.mine))
    for coords in dests:  # sources, in the same group-rank order
        ks = [k for k, o in enumerate(owners) if b.owner_coords(o) == coords]
        b.recv2_members += ks
        b.recv2_splits.append(sum(lay[k].numel(topo.shard) for k in ks))
    return b


# --------------------------------------------------------------------------------------------------------------
# Running a step
# --------------------------------------------------------------------------------------------------------------
def _pack(tensors: list[Tensor], dtype: torch.dtype, device) -> Tensor:
    """One flat message of `tensors` in `dtype` (the cast is fused into the copy)."""
    sizes = [t.numel() for t in tensors]
    buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
    if tensors:
        torch._foreach_copy_([v.view(t.shape) for v, t in zip(buffer.split(sizes), tensors)], tensors)
    return buffer


def _gather(b: Bucket, items, layouts, device):
    send = _pack([items[b.members[k]].update for k in b.send1], b.dtype, device)
    recv = torch.empty(sum(b.recv1_splits), dtype=b.dtype, device=device)
    work = dist.all_to_all_single(recv, send, b.recv1_splits, b.send1_splits, group=b.topo.shard_group,
                                  async_op=True)
    return work, recv


def _assemble(b: Bucket, recv: Tensor, layouts) -> list[Tensor]:
    """Full matrices of the members I own (bucket order) from the gather's receive buffer."""
    sizes = [layouts[b.members[k]].numel(t) for k, t in b.recv1_pieces]
    pieces: dict[int, dict[int, Tensor]] = {k: {} for k in b.mine}
    for (k, t), flat in zip(b.recv1_pieces, torch.split(recv, sizes)):
        pieces[k][t] = flat.view(layouts[b.members[k]].shard_shape(t))
    return [assemble_shards([pieces[k][t] for t in range(b.topo.S)], layouts[b.members[k]].dim) for k in b.mine]


def _scatter(b: Bucket, results: dict[int, Tensor], layouts, device):
    chunks = []
    for k, t in b.send2_pieces:
        layout = layouts[b.members[k]]
        start, length = layout.bounds[t]
        chunks.append(results[k].narrow(layout.dim, start, length))
    send = _pack(chunks, b.dtype, device)
    recv = torch.empty(sum(b.recv2_splits), dtype=b.dtype, device=device)
    work = dist.all_to_all_single(recv, send, b.recv2_splits, b.send2_splits, group=b.scatter_group,
                                  async_op=True)
    return work, recv


def orthogonalize_sharded(items, timer, cache: dict, bucket_mb: float = 256.0, replica_spread="auto",
                          overlap: Optional[Callable[[], None]] = None) -> list[Tensor]:
    """Orthogonalized local update of every item (plain or DTensor parameters), see the module docstring.

    `cache` (owned by the optimizer) keeps process-group maps and the step plan between steps. `overlap` is
    independent work (the AdamW groups) run while the first messages are in flight.
    """
    if replica_spread not in REPLICA_SPREAD:
        raise ValueError(f"replica_spread={replica_spread!r}: must be one of {REPLICA_SPREAD}")
    key = (bucket_mb, replica_spread, tuple((id(it.param), it.plan, it.ns) for it in items))
    if cache.get("plan_key") != key:
        cache["plan_key"], cache["plan"] = key, build_step_plan(items, cache, bucket_mb, replica_spread)
    plan: StepPlan = cache["plan"]
    layouts, device = plan.layouts, items[0].update.device
    outputs: list[Optional[Tensor]] = [None] * len(items)

    # Every gather goes out at once: their inputs are ready, and on GPUs they queue on the communication
    # stream and run while the compute stream orthogonalizes (bucket k waits only for gather k).
    start = timer.now()
    gathers = [_gather(b, items, layouts, device) for b in plan.buckets]
    start = timer.add("comm", start)
    if overlap is not None:
        overlap()
        start = timer.now()

    jobs = [(i, p) for i, p in plan.local if p is not None]
    for (i, _), out in zip(jobs, orthogonalize([(items[i].update, p, items[i].ns) for i, p in jobs])):
        outputs[i] = out
    for i, p in plan.local:
        if p is None:  # an empty shard
            outputs[i] = torch.empty_like(items[i].update, dtype=items[i].ns.dtype)
    start = timer.add("ns", start)

    scatters = []
    for b, (work, recv) in zip(plan.buckets, gathers):
        work.wait()
        start = timer.add("comm", start)
        fulls = _assemble(b, recv, layouts)
        owned = orthogonalize([(full, items[b.members[k]].plan, items[b.members[k]].ns)
                               for k, full in zip(b.mine, fulls)])
        start = timer.add("ns", start)
        scatters.append(_scatter(b, dict(zip(b.mine, owned)), layouts, device))
        start = timer.add("comm", start)

    for b, (work, recv) in zip(plan.buckets, scatters):
        work.wait()
        sizes = [layouts[b.members[k]].numel(b.topo.shard) for k in b.recv2_members]
        for k, flat in zip(b.recv2_members, torch.split(recv, sizes)):
            i = b.members[k]
            outputs[i] = flat.view(layouts[i].shard_shape(b.topo.shard))
    timer.add("comm", start)
    return outputs  # type: ignore[return-value]
