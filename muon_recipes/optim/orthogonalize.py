"""Per-block orthogonalization of whole parameter updates: the batched Newton-Schulz call.

Muon is defined on matrices, so a fused update is orthogonalized per *block* (`blocks.BlockPlan` says how a
full update splits into blocks and which lr ratio each row gets). `orthogonalize` takes the full updates of
many parameters, stacks every block of the same shape (across parameters too) into one batch and runs one
`newton_schulz` call per shape.

Both the single-process path and the sharded path (`sharded.py`, which first assembles full matrices)
go through `orthogonalize`, so they compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from muon_recipes.optim import dispatch
from muon_recipes.optim.blocks import BlockPlan, copy_block
from muon_recipes.optim.newton_schulz import newton_schulz, normalize_, triton_launches


# `BucketLayout(parts=...)` splits the largest bucket only from this many elements (dense_1b's MLP bucket has
# 553M, moe_small's experts 74M): there its weight update, the pass the two-stream step cannot overlap, takes about
# 1.3 ms on an H200 (10 bytes per element), while each part still fills the GPU for many waves of tiles.
SPLIT_MIN_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class NSSettings:
    """Everything besides the shape that must agree for two blocks to share one `newton_schulz` call."""

    steps: int
    schedule: str
    dtype: torch.dtype
    backend: str
    eps: float
    method: str = "standard"   # standard | gram (newton_schulz.METHODS)


@dataclass(frozen=True)
class Slot:
    """Where one row block of a job sits: `count` matrices from index `start` of the batch `key`, stored
    transposed when the block is tall (Newton-Schulz runs on wide matrices, m <= n)."""

    key: tuple
    start: int
    count: int
    tall: bool


class BucketLayout:
    """The batches of one step's Newton-Schulz calls, and where every row block of every job sits in them.

    Blocks of equal shape up to transposition (NS(G^T) = NS(G)^T), device and settings share one batch: e.g. the
    k and v blocks of every layer's fused QKV, or every gate, up (transposed) and down matrix of a dense MLP. The
    layout follows from the jobs' shapes alone, before any update exists, so a block's update can be written
    straight into its slot (`slot_views`) and its result applied from there (`slot_views(results=True)`): no copy
    into a bucket and none out of it. Jobs whose updates already exist are copied in (`run(fill=...)`), each block once,
    cast and transposed in the same pass (tiles on a GPU, `copy_block`).

    A bucket's key is ((m, n), device, settings, part). `parts` > 1 splits the largest bucket, where it has at least
    `SPLIT_MIN_ELEMENTS`, into that many batches at block boundaries (part 0, 1, ...; every other bucket is part 0):
    the two-stream step (`step_streams.py`) then applies the first part's updates while the last part iterates,
    instead of after all of it.
    """

    def __init__(self, jobs: Sequence[tuple[BlockPlan, NSSettings, torch.device]], parts: int = 1):
        # Every non-empty block with the bucket it joins, whole (before any split): (job, block, key, count, tall).
        blocks = [(j, b, ((min(rows, cols), max(rows, cols)), torch.device(device), ns), count, rows > cols)
                  for j, (plan, ns, device) in enumerate(jobs)
                  for b, (count, rows, cols) in enumerate(plan.block_shapes()) if count * rows * cols]
        totals: dict[tuple, int] = {}
        for _, _, whole, count, _ in blocks:
            totals[whole] = totals.get(whole, 0) + count
        largest = max(totals, key=lambda k: _elements(k, totals[k]), default=None)
        if largest is not None and _elements(largest, totals[largest]) < SPLIT_MIN_ELEMENTS:
            largest = None
        placed: dict[tuple, int] = {}
        self.sizes: dict[tuple, int] = {}
        self.members: dict[tuple, list[tuple[int, int]]] = {}
        # None for an empty block: nothing to orthogonalize.
        self.slots: list[list[Optional[Slot]]] = [[None] * len(plan.block_shapes()) for plan, _, _ in jobs]
        for j, b, whole, count, tall in blocks:
            position = placed.get(whole, 0)
            placed[whole] = position + count
            key = whole + ((position * parts) // totals[whole] if whole == largest else 0,)
            start = self.sizes.get(key, 0)
            self.sizes[key] = start + count
            self.members.setdefault(key, []).append((j, b))
            self.slots[j][b] = Slot(key, start, count, tall)
        self.plans = [plan for plan, _, _ in jobs]
        self.batches: dict[tuple, torch.Tensor] = {}
        self.prepared: set[tuple] = set()   # buckets filled and normalized (`prepare`)
        self.results: dict[tuple, torch.Tensor] = {}
        self._runs: dict[int, list[tuple[int, int]]] = {}

    def batch(self, key: tuple) -> torch.Tensor:
        """The input batch of bucket `key`, allocated at first use ([matrices, m, n] in the settings' dtype)."""
        if key not in self.batches:
            (m, n), device, ns, _ = key
            self.batches[key] = torch.empty((self.sizes[key], m, n), dtype=ns.dtype, device=device)
        return self.batches[key]

    def _view(self, batch: torch.Tensor, j: int, b: int) -> torch.Tensor:
        slot = self.slots[j][b]
        matrices = batch[slot.start:slot.start + slot.count]
        piece = matrices.mT if slot.tall else matrices
        plan = self.plans[j]
        return piece.view(plan.experts, plan.row_blocks[b], plan.shape[-1])

    def runs(self, j: int) -> list[tuple[int, int]]:
        """Job j's non-empty blocks as runs [first, stop) that one strided launch can cover: consecutive row blocks
        of a 2-D weight with one row count and consecutive slots of one bucket (the k and v blocks of a fused QKV,
        the gate and up halves of a fused gate/up). Every other block is a run of its own."""
        if j not in self._runs:
            self._runs[j] = self._find_runs(j)
        return self._runs[j]

    def _find_runs(self, j: int) -> list[tuple[int, int]]:
        plan, runs = self.plans[j], []
        for b, slot in enumerate(self.slots[j]):
            if slot is None:
                continue
            if runs and plan.experts == 1 and runs[-1][1] == b:
                first = self.slots[j][runs[-1][0]]
                last = self.slots[j][b - 1]
                if (slot.key == first.key and slot.start == last.start + last.count
                        and plan.row_blocks[b] == plan.row_blocks[runs[-1][0]]):
                    runs[-1] = (runs[-1][0], b + 1)
                    continue
            runs.append((b, b + 1))
        return runs

    def source_views(self, j: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Per run of `runs(j)`, the view of a tensor of job j's full shape that it covers: [experts, rows, cols]
        for one block (`BlockPlan.row_views`), [blocks, rows, cols] for a run of several."""
        plan, views = self.plans[j], []
        blocks = plan.row_views(tensor)
        for first, stop in self.runs(j):
            if stop - first == 1:
                views.append(blocks[first])
            else:
                rows, start = plan.row_blocks[first], sum(plan.row_blocks[:first])
                views.append(tensor[start:start + (stop - first) * rows].unflatten(0, (stop - first, rows)))
        return views

    def slot_views(self, j: int, results: bool = False) -> list[torch.Tensor]:
        """Per run of `runs(j)`, its slots in the input batches (to write the updates into) or, with `results`,
        in the orthogonalized results (after `run`), shaped and strided as `source_views` (transposed views for
        tall blocks)."""
        views = []
        for first, stop in self.runs(j):
            slot = self.slots[j][first]
            batch = self.results[slot.key] if results else self.batch(slot.key)
            if stop - first == 1:
                views.append(self._view(batch, j, first))
            else:
                matrices = batch[slot.start:slot.start + (stop - first)]
                views.append(matrices.mT if slot.tall else matrices)
        return views

    def run(self, fill: Optional[dict[int, torch.Tensor]] = None) -> None:
        """One `newton_schulz` call per bucket (`run_bucket`), in the order the jobs first name them."""
        for key in self.members:
            self.run_bucket(key, fill)

    def prepare(self, key: tuple, fill: Optional[dict[int, torch.Tensor]] = None) -> None:
        """The passes over memory before bucket `key`'s iterations: `fill` maps a job to its finished update,
        copied into the bucket; every other job's blocks in it must have been written through `slot_views`. Then
        each matrix is normalized in place (`newton_schulz.normalize_`)."""
        fill = fill or {}
        batch = self.batch(key)
        for j, b in self.members[key]:
            if j in fill:
                slot = self.slots[j][b]
                piece = self.plans[j].matrices(fill[j])[b]
                copy_block(batch[slot.start:slot.start + slot.count], piece.mT if slot.tall else piece)
        ns = key[2]
        normalize_(batch, ns.schedule, ns.eps, ns.backend, ns.method)
        self.prepared.add(key)

    def run_bucket(self, key: tuple, fill: Optional[dict[int, torch.Tensor]] = None) -> None:
        """The Newton-Schulz iterations of bucket `key`, after `prepare(key, fill)` unless that ran already. The
        input batch is released once the call returns (a large step then holds one input batch beside the
        results, not all of them)."""
        if key not in self.prepared:
            self.prepare(key, fill)
        ns = key[2]
        self.results[key] = newton_schulz(self.batches.pop(key), steps=ns.steps, schedule=ns.schedule,
                                          dtype=ns.dtype, backend=ns.backend, eps=ns.eps, method=ns.method,
                                          normalized=True)

    def order(self) -> list[tuple]:
        """The buckets, fewest elements first: the order the two-stream step runs them in (`step_streams.py`).
        The first bucket's momentum and the last one's update are the passes that nothing overlaps, so the
        smallest bucket goes first; the last, the largest, leaves its update exposed."""
        return sorted(self.members, key=lambda key: _elements(key, self.sizes[key]))

    def bucket_of(self, j: int, run: int) -> tuple:
        """The bucket that run `run` of `runs(j)` sits in (every block of a run shares one)."""
        return self.slots[j][self.runs(j)[run][0]].key

    def jobs_in(self, key: tuple) -> list[int]:
        """The jobs with a block in bucket `key`, each once, in job order."""
        return sorted({j for j, _ in self.members[key]})

    def output(self, j: int, update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Job j's orthogonalized update in its full shape and `dtype` (after `run`): a view of the result where
        the job is one row-major block, else a fresh tensor the blocks are copied back into."""
        plan = self.plans[j]
        pieces = []
        for b, (slot, piece) in enumerate(zip(self.slots[j], plan.matrices(update))):
            if slot is None:
                pieces.append(piece.to(dtype))
                continue
            matrices = self.results[slot.key][slot.start:slot.start + slot.count]
            pieces.append(matrices.mT if slot.tall else matrices)
        if len(pieces) == 1 and not plan.fuse_experts and pieces[0].stride(-1) == 1:
            # A row-major view is as good as a copy for the update that follows; a transposed one (a tall block)
            # is copied back row-major, which keeps the final update's reads coalesced.
            return pieces[0].reshape(update.shape) if update.ndim == 3 else pieces[0][0]
        return plan.assemble(pieces, torch.empty(update.shape, dtype=dtype, device=update.device))


def _elements(key: tuple, matrices: int) -> int:
    """Elements of `matrices` matrices of bucket `key`'s shape."""
    (m, n) = key[0]
    return matrices * m * n


def orthogonalize(jobs: Sequence[tuple[torch.Tensor, BlockPlan, NSSettings]]) -> list[torch.Tensor]:
    """Orthogonalize the blocks of many full updates; returns one tensor per job (its shape, `settings.dtype`).

    Every block of equal shape goes through one batched call (`BucketLayout`). Memory traffic matters as much as
    the products here (on a 0.85B-parameter model every pass over the updates costs about as much as a
    Newton-Schulz product of a small bucket): each block is copied once into its bucket, and a job made of one
    row-major block gets a view of the result instead of a copy. A single-process step skips even those copies
    where it can (`Muon`, `dispatch.bucket_io_on_triton`).
    """
    layout = BucketLayout([(plan, ns, update.device) for update, plan, ns in jobs])
    layout.run(fill={j: update for j, (update, _, _) in enumerate(jobs)})
    return [layout.output(j, update, ns.dtype) for j, (update, _, ns) in enumerate(jobs)]


def bucket_shapes(jobs: Sequence[tuple[BlockPlan, NSSettings, torch.device]], parts: int = 1) -> dict[tuple, int]:
    """{((m, n), device, settings, part): matrices} of the batches `BucketLayout(jobs, parts)` forms (m <= n)."""
    return dict(BucketLayout(jobs, parts).sizes)


def compile_ahead(jobs: Sequence[tuple[BlockPlan, NSSettings, torch.device]], parts: int = 1) -> None:
    """Compile the Triton tile candidates of every batch these blocks make, all at once, before any is timed.

    On a machine that has never tuned the kernels, the first step otherwise compiles one shape's candidates
    after another (each shape compiles its own at once: `kernels/iterations.py`); compiling every shape's
    together fills the host's cores once. Each batch's launches are recorded with buffers of its size on its
    device, one batch at a time, so the memory this needs is that of the largest batch's Newton-Schulz, as in
    the step itself. Nothing to do off the GPU, without Triton, or with MUON_NS_PRECOMPILE=0."""
    if dispatch.kernels() is None:
        return
    from muon_recipes.optim.kernels import tile_search

    if not tile_search.precompile_enabled():
        return
    launches = []
    for ((m, n), device, ns, _), count in bucket_shapes(jobs, parts).items():
        if device.type == "cuda":
            launches += triton_launches(count, m, n, ns.steps, ns.schedule, ns.dtype, ns.backend, ns.method, device)
    tile_search.compile_candidates(launches)
