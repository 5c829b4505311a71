"""The token cache: a corpus tokenized once, stored as memory-mapped arrays that every later run opens instantly.

Tokenizing hundreds of millions of characters takes minutes; every rank of every run of a sweep needs the same
tokens. So the first process to need them tokenizes the corpus (the training and held-out documents, each split
one stream of token ids with an EOS after every document) and writes each stream as a `.npy` array; the others wait
(`cache.prepare_once`), then every process memory-maps the arrays (`np.load(mmap_mode="r")`): the pages are shared
through the OS page cache, so eight ranks on a node hold one copy.

A directory `<cache>/tokens/<source>-<tokenizer>-<key>` holds `train.npy`, `eval.npy` and `manifest.json`. The key
covers the corpus fingerprint (its files, sizes and modification times, `data.max_chars`, `data.eval_fraction`),
the tokenizer's fingerprint (the content of its files) and this format's version; the manifest repeats the key and
records each array's length, size and BLAKE2b digest. A directory whose manifest names another key, or whose array
is truncated or altered, is said on stderr, removed and rebuilt: never used. Token ids are stored as uint16 when the
vocabulary fits (as nanoGPT does), else int32.

Packing into windows happens at load time (a reshape of the mapped stream, no copy), so one cache serves every
`train.seq_len`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.compute as pc

from muon_recipes.config import DataConfig

from . import sources
from .cache import cache_root, current_rank, prepare_once
from .packing import token_stream, tokenize_documents

CACHE_FORMAT = 1
SPLITS = ("train", "eval")


@dataclass
class TokenStreams:
    """The tokenized splits of a corpus: read-only memory-mapped int arrays, and what they came from."""

    train: np.ndarray
    eval: np.ndarray
    manifest: dict

    @property
    def description(self) -> str:
        return self.manifest["description"]

    def documents(self, split: str) -> int:
        return int(self.manifest["splits"][split]["documents"])


def cache_key(cfg: DataConfig, tokenizer: Any) -> dict:
    """What the cached tokens depend on, as plain JSON data (stored in the manifest and hashed into the name)."""
    return {"format": CACHE_FORMAT, "corpus": sources.corpus_fingerprint(cfg), "tokenizer": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}


def cache_directory(cfg: DataConfig, key: dict, tokenizer: Any) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    what = cfg.scope if cfg.source == "embedded" else cfg.source
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(tokenizer.name)).name or "tokenizer")[:40]
    return cache_root(cfg.cache_dir) / "tokens" / f"{what}-{label}-{digest}"


def token_streams(cfg: DataConfig, tokenizer: Any) -> TokenStreams:
    """The corpus of `cfg` tokenized by `tokenizer`: from the cache, or tokenized now and cached."""
    key = cache_key(cfg, tokenizer)
    directory = cache_directory(cfg, key, tokenizer)
    built = prepare_once(directory, lambda d: check(d, key), lambda tmp: _build(cfg, tokenizer, key, tmp),
                         "the tokenized corpus")
    streams = load(directory)
    if not built and current_rank() == 0:
        print(f"data: tokens from the cache (no tokenizing): {directory} | train {len(streams.train):,} tokens, "
              f"eval {len(streams.eval):,}", flush=True)
    return streams


def load(directory: Path) -> TokenStreams:
    """Map a checked cache directory's arrays (read-only)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    arrays = {split: np.load(directory / f"{split}.npy", mmap_mode="r") for split in SPLITS}
    return TokenStreams(arrays["train"], arrays["eval"], manifest)


def check(directory: Path, key: dict) -> Optional[str]:
    """None if `directory` holds the tokens for `key`, intact; else what is wrong with it."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"manifest.json unreadable ({type(e).__name__})"
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return "its manifest names another corpus or tokenizer"
    for split in SPLITS:
        entry = manifest.get("splits", {}).get(split, {})
        path = directory / f"{split}.npy"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path.name} is missing"
        if size != entry.get("file_bytes"):
            return f"{path.name} holds {size} bytes, its manifest says {entry.get('file_bytes')}"
        if _digest(path) != entry.get("blake2b"):
            return f"{path.name} does not match its manifest's digest"
    return None


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _build(cfg: DataConfig, tokenizer: Any, key: dict, out: Path) -> None:
    from datasets import Dataset
    from datasets.table import InMemoryTable

    start = time.perf_counter()
    table, keys, description = sources.load_corpus(cfg)
    docs = Dataset(InMemoryTable(table))
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    split_ids = dict(zip(SPLITS, sources.split_keys(keys, cfg.eval_fraction)))
    print(f"data: tokenizing {description} with {tokenizer.name} into {out.parent}", flush=True)
    splits = {}
    for split, ids in split_ids.items():
        selected = docs.select(ids, keep_in_memory=True)
        if len(selected):
            stream = token_stream(tokenize_documents(selected, tokenizer, cfg.num_proc,
                                                     desc=f"Tokenizing {split} documents"))
        else:
            stream = np.zeros(0, dtype=np.int32)
        path = out / f"{split}.npy"
        np.save(path, stream.astype(dtype, copy=False))
        text_bytes = pc.sum(pc.binary_length(selected.with_format("arrow")[sources.TEXT])).as_py() or 0
        splits[split] = {"documents": len(ids), "tokens": int(len(stream)), "text_bytes": int(text_bytes),
                         "file_bytes": path.stat().st_size, "blake2b": _digest(path)}
    manifest = {"key": key, "description": description, "tokenizer": str(tokenizer.name),
                "dtype": np.dtype(dtype).name, "splits": splits,
                "seconds": round(time.perf_counter() - start, 2)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    train, held_out = splits["train"], splits["eval"]
    print(f"data: tokenized in {manifest['seconds']} s: train {train['documents']} documents, {train['tokens']:,} "
          f"tokens ({train['text_bytes'] / max(train['tokens'], 1):.2f} bytes/token); eval {held_out['documents']} "
          f"documents, {held_out['tokens']:,} tokens", flush=True)
