"""Tokenizers: a byte-level default that needs no files, or a local Hugging Face tokenizer by path.

The byte tokenizer makes the default run self-contained (no vocabulary to download, every string
encodes losslessly, the tiny models' 320-entry embedding covers it). A real run points `data.tokenizer`
at a local directory saved with `save_pretrained` (or holding a `tokenizer.json`); nothing is ever
downloaded here.

Every tokenizer follows one small protocol (`Tokenizer`): `vocab_size`, `eos_id`, `encode`, `decode`,
plus `encode_batch` (token id sequences, lists or int arrays: the fast path `Dataset.map(batched=True)` uses) and `name` (for logs/fingerprints).
Encoding never adds special tokens: packing inserts the EOS separator itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from muon_recipes.config import ConfigError, DataConfig

# Names an end-of-sequence token goes by in common tokenizers, tried when the directory's
# tokenizer_config.json does not name one.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


@runtime_checkable
class Tokenizer(Protocol):
    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> Sequence[Sequence[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and id 256 as end-of-sequence (document separator)."""

    name = "byte"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # numpy views of the bytes: 4x faster through Dataset.map than lists of Python ints.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: list[int]) -> str:
        # Special ids carry no bytes; a window may start or end inside a multi-byte character.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class HFTokenizer:
    """A local Hugging Face tokenizer: `transformers.AutoTokenizer` if installed, else `tokenizers.Tokenizer`."""

    def __init__(self, backend: Any, eos_id: int, vocab_size: int, name: str, fast_lib: bool):
        self._backend = backend
        self._eos_id = eos_id
        self._vocab_size = vocab_size
        self.name = name
        self._is_tokenizers_lib = fast_lib  # True: a raw `tokenizers.Tokenizer`

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._is_tokenizers_lib:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return self._backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """`data.tokenizer`: "byte" or a local Hugging Face tokenizer directory (or its tokenizer.json)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    return load_hf_tokenizer(str(cfg.tokenizer))


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The model's embedding must have a row for every id the tokenizer can produce."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError("model.vocab_size", model_vocab_size,
                          f"must be >= the tokenizer's vocab_size {tokenizer.vocab_size} ({tokenizer.name})")


def load_hf_tokenizer(path: str) -> HFTokenizer:
    valid = "must be 'byte' or a local Hugging Face tokenizer directory holding tokenizer.json (nothing is downloaded)"
    expanded = os.path.expanduser(path)
    directory = os.path.dirname(expanded) if os.path.isfile(expanded) else expanded
    if not path or not os.path.isdir(directory):
        raise ConfigError("data.tokenizer", path, valid)
    tokenizer_json = expanded if os.path.isfile(expanded) else os.path.join(directory, "tokenizer.json")

    if importlib.util.find_spec("transformers") is not None and os.path.isdir(expanded):
        from transformers import AutoTokenizer

        try:
            backend = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad directory
            raise ConfigError("data.tokenizer", path, f"{valid} ({type(e).__name__}: {_first_line(e)})") from None
        eos = backend.eos_token_id
        if eos is None:
            eos = _eos_from_vocab(backend.get_vocab())
        if eos is None:
            raise ConfigError("data.tokenizer", path, "has no end-of-sequence token: set eos_token in tokenizer_config.json")
        return HFTokenizer(backend, int(eos), len(backend), name=path, fast_lib=False)

    try:
        from tokenizers import Tokenizer as RawTokenizer
    except ImportError:
        raise ConfigError("data.tokenizer", path,
                          "needs the `tokenizers` (or `transformers`) package: pip install tokenizers") from None
    if not os.path.isfile(tokenizer_json):
        raise ConfigError("data.tokenizer", path, f"{valid}; no tokenizer.json in {directory}")
    try:
        backend = RawTokenizer.from_file(tokenizer_json)
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise ConfigError("data.tokenizer", path, f"tokenizer.json could not be read ({_first_line(e)})") from None
    eos = _eos_from_config(directory, backend)
    if eos is None:
        eos = _eos_from_vocab(backend.get_vocab(with_added_tokens=True))
    if eos is None:
        raise ConfigError("data.tokenizer", path,
                          "has no end-of-sequence token: name eos_token in tokenizer_config.json or add one of "
                          + ", ".join(_EOS_CANDIDATES))
    return HFTokenizer(backend, eos, backend.get_vocab_size(with_added_tokens=True), name=path, fast_lib=True)


def _eos_from_config(directory: str, backend: Any) -> int | None:
    """eos_token as named by tokenizer_config.json (a string, or a dict with "content")."""
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested beyond the parser
        raise ConfigError("data.tokenizer", directory, f"tokenizer_config.json is not valid JSON "
                                                       f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(config, dict):
        raise ConfigError("data.tokenizer", directory, f"tokenizer_config.json holds a {type(config).__name__}, "
                                                       "must be a JSON object")
    token = config.get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _eos_from_vocab(vocab: dict) -> int | None:
    for token in _EOS_CANDIDATES:
        if token in vocab:
            return int(vocab[token])
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
