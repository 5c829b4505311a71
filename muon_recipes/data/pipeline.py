"""From a `DataConfig` to the packed train and held-out datasets the trainer iterates.

embedded / files: documents -> held-out split by document -> `Dataset.map` tokenization, done once per corpus and
tokenizer and kept in the token cache (`token_cache.py`); every run then maps the cached streams and packs them
into windows without copying. hub: the stream is opened lazily; its first `eval_docs` documents are read into
memory as the held-out set and filtered out of the training stream, which is tokenized and packed on the fly.

Only rank 0 shows `datasets`' progress bars.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
from datasets import Dataset, IterableDataset
from datasets.utils import logging as datasets_logging

from muon_recipes.config import ConfigError, DataConfig

from . import sources
from .cache import current_rank
from .packing import pack_documents, pack_stream, pack_windows
from .token_cache import token_streams


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
        if cfg.source not in ("embedded", "files"):
            raise ConfigError("data.source", cfg.source, "must be one of embedded, files, hub")
        streams = token_streams(cfg, tokenizer)
        train, held_out = (pack_windows(getattr(streams, split), window,
                                        f"{streams.description}; {split}: {streams.documents(split)} documents")
                           for split in ("train", "eval"))
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
