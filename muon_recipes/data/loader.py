"""The distributed, resumable loader: which packed windows each data-parallel rank trains on, step by step.

One global order, then shards. Epoch `e` visits the `N` windows in the permutation drawn from
`(seed, e)`; the epochs are laid end to end into one endless sequence of rows. The step with global
position `p` (rows consumed so far by all ranks together) takes the next `world_size * batch_size` rows of
that sequence, and rank `r` keeps rows `[p + r*B, p + (r+1)*B)`. So:

- the ranks' shards are disjoint within a step, and their union is exactly the batch one process
  with batch `world_size * B` would see: a 2-process run trains on the same data as a 1-process run;
- nothing is dropped at an epoch's end (a step may straddle two epochs), and a data set smaller
  than one global batch still works (a held-out split of a few windows);
- the position counts rows, not steps, so a resume with another world size continues with the next
  unseen rows of the same order.

The state (`epoch`, `position`) is two plain ints, loadable with `torch.load(weights_only=True)`.

Streams (`datasets.IterableDataset`, from data=hub) are read in source order and split with
`datasets.distributed.split_dataset_by_node`: each rank reads its own source shards when the stream has
at least `world_size` of them, otherwise every rank reads the whole stream and keeps every
`world_size`-th window. Their state is the stream's own `state_dict()`. They carry no global order, so a
run's data does depend on the world size; see `StreamingLoader`.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, IterableDataset

from muon_recipes.config import ConfigError

from .packing import TOKENS


def _check_layout(batch_size: int, rank: int, world_size: int) -> None:
    for key, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(key, value, f"must be an integer >= {low}")
    if rank >= world_size:
        raise ConfigError("rank", rank, f"must be < world_size={world_size}")


def window_matrix(dataset: Dataset) -> np.ndarray:
    """The input_ids column as one [rows, window] array, read straight from Arrow (no per-row Python, and no copy
    where Arrow holds the windows contiguously, as packed or memory-mapped streams are: the result may be
    read-only)."""
    column = dataset.with_format("arrow")[TOKENS]  # applies a selection/indices mapping if there is one
    column = column.combine_chunks() if column.num_chunks > 1 else column.chunk(0)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != lengths.max() or lengths.min() < 2):
        raise ConfigError("data", f"windows of {lengths.min()}..{lengths.max()} tokens",
                          "the loader needs packed windows of one length >= 2 (from build_datasets)")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), int(lengths[0]))


def _split(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = window.long()
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class DistributedLoader:
    """Endless `(inputs, targets)` LongTensors `[batch_size, seq_len]` for one data-parallel rank.

    Given a packed map-style `datasets.Dataset` (column input_ids, windows of seq_len + 1 tokens);
    given an `IterableDataset` it returns a `StreamingLoader`.
    """

    def __new__(cls, dataset: Any, *args: Any, **kwargs: Any) -> "DistributedLoader":
        if cls is DistributedLoader and isinstance(dataset, IterableDataset):
            return super().__new__(StreamingLoader)
        return super().__new__(cls)

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        _check_layout(batch_size, rank, world_size)
        if len(dataset) == 0:
            raise ConfigError("data", "0 windows", "the packed dataset is empty: give more text or a smaller train.seq_len")
        self.windows = window_matrix(dataset)  # numpy, possibly a read-only view of a memory-mapped cache
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch = 0
        self.position = 0  # rows of epoch `epoch` consumed by all ranks together
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_rows(self) -> int:
        return len(self.windows)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of row indices that epoch `epoch` visits (the same on every rank)."""
        if epoch not in self._orders:
            if self.shuffle:
                # SeedSequence mixes (seed, epoch) into independent streams: no overlap between epochs' orders.
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            self._orders = {e: o for e, o in self._orders.items() if e >= self.epoch}  # keep the live ones
            self._orders[epoch] = order
        return self._orders[epoch]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Row indices at offsets [start, stop) of the endless sequence, counted from the current epoch's start."""
        offsets = np.arange(start, stop)
        epochs, within = np.divmod(offsets, self.num_rows)
        picked = np.empty(len(offsets), dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            picked[mask] = self.order(self.epoch + int(e))[within[mask]]
        return picked

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.position + self.rank * self.batch_size
        batch = torch.from_numpy(self.windows[self.rows(start, start + self.batch_size)].astype(np.int64))
        advanced, self.position = divmod(self.position + self.world_size * self.batch_size, self.num_rows)
        self.epoch += advanced
        return _split(batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        rows = int(state.get("num_rows", self.num_rows))
        if rows != self.num_rows:
            raise ConfigError("data", f"loader state for {rows} windows",
                              f"this run's data packs into {self.num_rows} windows: the data, its caps or "
                              "train.seq_len changed since the checkpoint")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_rows:
            raise ConfigError("data", f"loader state epoch={epoch} position={position}",
                              f"needs epoch >= 0 and 0 <= position < {self.num_rows}")
        self.epoch, self.position = epoch, position
        self._orders = {}


class StreamingLoader(DistributedLoader):
    """Endless batches from a packed stream (`IterableDataset` of windows), this rank's split of it.

    Limitations (streams cannot be indexed): the data is read in source order (no shuffle, `shuffle`
    and `seed` are accepted for a uniform call and ignored); which windows a rank sees depends on the
    world size, so runs with different world sizes see different batches; an epoch restarts the
    stream. The state is the epoch and `datasets`' own stream state (plain nested dicts of ints and
    strings), from which `datasets` resumes after the last window taken.
    """

    def __init__(self, dataset: IterableDataset, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        from datasets.distributed import split_dataset_by_node

        _check_layout(batch_size, rank, world_size)
        # Whole source shards per rank when there are enough (each rank reads and tokenizes only its own);
        # otherwise every rank reads everything and keeps every world_size-th window.
        strategy = "shards" if dataset.num_shards >= world_size else "examples"
        self.stream = split_dataset_by_node(dataset, rank=rank, world_size=world_size, strategy=strategy)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self._iterator: Iterator[dict] | None = None

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def _next_window(self) -> torch.Tensor:
        for _ in range(2):  # at most one restart: a stream that is empty from its start is an error
            if self._iterator is None:
                self._iterator = iter(self.stream)
            try:
                return torch.as_tensor(next(self._iterator)[TOKENS])
            except StopIteration:
                # A new epoch restarts the stream: datasets applies a loaded state only to its own epoch.
                self.stream.set_epoch(self.stream.epoch + 1)
                self._iterator = None
        raise ConfigError("data", f"rank {self.rank} of {self.world_size}",
                          "the stream yields no window for this rank: give more data or a smaller train.seq_len")

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _split(torch.stack([self._next_window() for _ in range(self.batch_size)]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.set_epoch(int(state["epoch"]))
        self.stream.load_state_dict(state["stream"])
        self._iterator = None
