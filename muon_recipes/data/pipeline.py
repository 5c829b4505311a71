"""From a `DataConfig` to the packed train and held-out datasets the trainer iterates.

embedded / files: documents -> held-out split by document -> `Dataset.map` tokenization -> packing,
all in memory. Nothing is written to a cache: every rank builds the same datasets on its own (the
default corpus takes a second or two), so there is no file two ranks could race on and no stale cache
to invalidate. hub: the stream is opened lazily; its first `eval_docs` documents are read into memory as
the held-out set and filtered out of the training stream, which is tokenized and packed on the fly.

Only rank 0 shows `datasets`' progress bars.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np
from datasets import Dataset, IterableDataset
from datasets.table import InMemoryTable
from datasets.utils import logging as datasets_logging

from muon_recipes.config import ConfigError, DataConfig

from . import sources
from .packing import pack_documents, pack_stream, pack_windows


def build_datasets(cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int,
                   rank: int | None = None) -> tuple[Dataset | IterableDataset, Dataset]:
    """(train, eval) of packed windows of `seq_len + 1` tokens (column input_ids).

    embedded/files: both are in-memory `Dataset`s. hub: train is a streaming `IterableDataset`, eval an
    in-memory `Dataset`. The held-out split depends on document keys, not on `seed`, so the runs of a seed
    sweep evaluate on the same documents; the loader shuffles with the seed. `rank` (default: the
    process's rank) decides who shows progress bars. eval may hold zero windows (eval_fraction=0).
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError("train.seq_len", seq_len, "must be an integer >= 1")
    window = seq_len + 1
    with progress_bars(enabled=(current_rank() if rank is None else rank) == 0):
        if cfg.source == "hub":
            return _build_stream(cfg, tokenizer, window)
        if cfg.source == "embedded":
            table, keys, description = sources.load_embedded(cfg.max_chars)
        elif cfg.source == "files":
            table, keys, description = sources.load_files(list(cfg.paths), cfg.text_field, cfg.max_chars)
        else:
            raise ConfigError("data.source", cfg.source, "must be one of embedded, files, hub")
        docs = Dataset(InMemoryTable(table))
        train_ids, eval_ids = sources.split_keys(keys, cfg.eval_fraction)
        pack = dict(tokenizer=tokenizer, window=window, num_proc=cfg.num_proc)
        train = pack_documents(docs.select(train_ids, keep_in_memory=True), desc="Tokenizing train documents",
                               description=f"{description}; train: {len(train_ids)} documents", **pack)
        held_out = pack_documents(docs.select(eval_ids, keep_in_memory=True), desc="Tokenizing eval documents",
                                  description=f"{description}; eval: {len(eval_ids)} documents", **pack)
    if len(train) == 0:
        raise ConfigError("train.seq_len", seq_len,
                          f"the training documents pack into no window of {window} tokens: give more text "
                          "(data.max_chars, data.paths) or a smaller train.seq_len")
    return train, held_out


def _build_stream(cfg: DataConfig, tokenizer: Any, window: int) -> tuple[IterableDataset, Dataset]:
    stream = sources.open_hub_stream(cfg.hub_name, cfg.hub_config, cfg.hub_split)
    held_out_texts = [row.get(cfg.text_field) for row in stream.take(cfg.eval_docs)] if cfg.eval_docs else []
    if held_out_texts and all(t is None for t in held_out_texts):
        raise ConfigError("data.text_field", cfg.text_field, f"not a field of {cfg.hub_name}")
    if any(t is not None and not isinstance(t, str) for t in held_out_texts):
        raise ConfigError("data.text_field", cfg.text_field, f"is not a text field of {cfg.hub_name}")
    held_out_texts = [t for t in held_out_texts if t]
    # The held-out documents are dropped from the training stream by content, which stays right however
    # the stream is later split across ranks (a positional skip would be divided among source shards).
    held_out_hashes = {sources.stable_hash("doc", t) for t in held_out_texts}
    if held_out_hashes:
        field = cfg.text_field
        stream = stream.filter(lambda row: sources.stable_hash("doc", row.get(field) or "") not in held_out_hashes)
    train = pack_stream(stream, tokenizer, cfg.text_field, window)
    held_out_docs = Dataset.from_dict({sources.TEXT: held_out_texts})
    description = f"hub: {cfg.hub_name} ({cfg.hub_config or 'default'}, {cfg.hub_split})"
    if held_out_texts:
        held_out = pack_documents(held_out_docs, tokenizer=tokenizer, window=window, num_proc=1,
                                  desc="Tokenizing eval documents",
                                  description=f"{description}; eval: first {len(held_out_texts)} documents")
    else:
        held_out = pack_windows(np.zeros(0, dtype=np.int32), window, f"{description}; no eval documents")
    return train, held_out


def current_rank() -> int:
    """This process's rank: from the process group if one exists, else torchrun's RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Silence `datasets`' progress bars inside the block when not `enabled` (ranks other than 0)."""
    was_enabled = datasets_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets_logging.enable_progress_bar()
