"""Tokenization and packing: documents -> one token stream -> fixed windows of `seq_len + 1` tokens.

Packing (as in GPT-2/3 pretraining) wastes no compute on padding: every document's tokens are followed
by the EOS id, the documents are concatenated in order into one stream, and the stream is cut into
consecutive, non-overlapping windows of `seq_len + 1` tokens (a window `w` trains on inputs `w[:-1]`
and targets `w[1:]`). The tail shorter than one window is dropped. Attention is not masked at
document boundaries; EOS tells the model that a new document starts.

Map-style datasets are packed exactly as above, in memory (the flattened Arrow column is the stream).
Streams (hub) are packed on the fly in groups of `STREAM_GROUP_DOCS` documents; each group drops its own
tail, because a carry-over between groups would live outside the dataset's resumable state.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, IterableDataset, List, Value
from datasets.table import InMemoryTable

from muon_recipes.config import ConfigError

TOKENS = "input_ids"
STREAM_GROUP_DOCS = 1000


def _token_features(window: int = -1, dtype: str = "int32") -> Features:
    return Features({TOKENS: List(Value(dtype), length=window)})


def _encode_with_eos(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    eos = tokenizer.eos_id
    return [np.append(np.asarray(ids, dtype=np.int32), np.int32(eos)) for ids in tokenizer.encode_batch(texts)]


def tokenize_documents(docs: Dataset, tokenizer: Any, num_proc: int, desc: str) -> Dataset:
    """One row per document: its token ids followed by EOS. In memory, nothing written to a cache."""

    def encode(batch: dict) -> dict:
        return {TOKENS: _encode_with_eos(tokenizer, batch["text"])}

    # An explicit fingerprint spares datasets from hashing the tokenizer object (slow, and unhashable
    # for some backends); the result is kept in memory, so it names nothing on disk.
    fingerprint = hashlib.sha256(f"{docs._fingerprint}:{tokenizer.name}:{tokenizer.vocab_size}".encode()).hexdigest()
    workers = min(num_proc, len(docs))
    return docs.map(encode, batched=True, num_proc=workers if workers > 1 else None, remove_columns=docs.column_names,
                    features=_token_features(), keep_in_memory=True, new_fingerprint=fingerprint[:32], desc=desc)


def token_stream(tokenized: Dataset) -> np.ndarray:
    """All documents' tokens (each ending in EOS) concatenated in row order, as int32."""
    column = tokenized.with_format("arrow")[TOKENS]  # honours a selection/indices mapping
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


def pack_windows(stream: np.ndarray, window: int, description: str = "") -> Dataset:
    """Cut a token stream into consecutive windows of `window` tokens; column input_ids: [n, window] of the
    stream's integer type. A contiguous stream (a memory-mapped cache array included) is wrapped, not copied."""
    n = len(stream) // window
    flat = pa.array(np.ascontiguousarray(stream[: n * window]))
    windows = pa.FixedSizeListArray.from_arrays(flat, window)
    from datasets import DatasetInfo

    info = DatasetInfo(description=description, features=_token_features(window, str(flat.type)))
    return Dataset(InMemoryTable(pa.table({TOKENS: windows})), info=info)


def pack_documents(docs: Dataset, tokenizer: Any, window: int, num_proc: int, desc: str, description: str) -> Dataset:
    if len(docs) == 0:  # datasets' map of an empty selection has no columns at all
        return pack_windows(np.zeros(0, dtype=np.int32), window, description)
    return pack_windows(token_stream(tokenize_documents(docs, tokenizer, num_proc, desc)), window, description)


def pack_stream(stream: IterableDataset, tokenizer: Any, text_field: str, window: int,
                group_docs: int = STREAM_GROUP_DOCS) -> IterableDataset:
    """Lazily tokenize and pack a document stream into windows (each group of `group_docs` docs on its own)."""
    columns = stream.column_names
    if columns is None:  # features unknown until read: look at the first document
        columns = list(next(iter(stream.take(1))).keys())
    if text_field not in columns:
        raise ConfigError("data.text_field", text_field, f"not a field of the stream; its fields are: {', '.join(columns)}")

    def tokenize_and_pack(batch: dict) -> dict:
        texts = [t for t in batch[text_field] if t]
        if not texts:
            return {TOKENS: []}
        flat = np.concatenate(_encode_with_eos(tokenizer, texts))
        n = len(flat) // window
        return {TOKENS: flat[: n * window].reshape(n, window)}

    return stream.map(tokenize_and_pack, batched=True, batch_size=group_docs, remove_columns=columns,
                      features=_token_features(window))
