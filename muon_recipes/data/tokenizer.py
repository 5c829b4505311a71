"""Tokenizers: a byte-level default that needs no files, a BPE fitted to the corpus, or a local Hugging Face
tokenizer by path.

The byte tokenizer makes the default run self-contained (no vocabulary to download, every string
encodes losslessly, the tiny models' 320-entry embedding covers it). `data.tokenizer=bpe` fits a byte-level BPE
of `model.vocab_size` entries to the training documents, once per corpus (`bpe.py`). A run can also point
`data.tokenizer` at a local directory saved with `save_pretrained` (or holding a `tokenizer.json`); nothing is ever
downloaded here.

Every tokenizer follows one small protocol (`Tokenizer`): `vocab_size`, `eos_id`, `encode`, `decode`,
plus `encode_batch` (token id sequences, lists or int arrays: the fast path `Dataset.map(batched=True)` uses),
`name` (for logs) and `fingerprint` (a digest of what decides its ids: the token cache's key).
Encoding never adds special tokens: packing inserts the EOS separator itself.

`token_byte_lengths` gives the UTF-8 bytes of text each id stands for, from which the trainer reports bits per
byte, a loss that compares across tokenizers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from muon_recipes.config import ConfigError, DataConfig, first_line

# Names an end-of-sequence token goes by in common tokenizers, tried when the directory's
# tokenizer_config.json does not name one.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    fingerprint: str

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
    fingerprint = "byte-257"
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

    def __init__(self, backend: Any, eos_id: int, vocab_size: int, name: str, fast_lib: bool, fingerprint: str = ""):
        self._backend = backend
        self._eos_id = eos_id
        self._vocab_size = vocab_size
        self.name = name
        self.fingerprint = fingerprint or name
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
            # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody here reads: ~2x faster.
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self._backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def vocabulary(self) -> tuple[dict, set, str]:
        """(token string -> id, ids of special tokens, the decoder's type name)."""
        raw = self._backend if self._is_tokenizers_lib else getattr(self._backend, "backend_tokenizer", None)
        if raw is not None:
            special = {i for i, t in raw.get_added_tokens_decoder().items() if t.special}
            return raw.get_vocab(with_added_tokens=True), special, type(raw.decoder).__name__ if raw.decoder else ""
        return self._backend.get_vocab(), set(self._backend.all_special_ids), ""

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def build_tokenizer(cfg: DataConfig, model_vocab_size: int | None = None) -> Tokenizer:
    """`data.tokenizer`: "byte", "bpe" (fitted to the corpus with `model_vocab_size` entries, or taken from the
    cache) or a local Hugging Face tokenizer directory (or its tokenizer.json)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        from .bpe import fitted_bpe

        if model_vocab_size is None:
            raise ConfigError("data.tokenizer", "bpe", "needs the model's vocab_size to fit a vocabulary of that size")
        directory = fitted_bpe(cfg, model_vocab_size)
        # Read with `tokenizers` itself, which wrote it: importing transformers would cost seconds at every start.
        tokenizer = load_hf_tokenizer(str(directory), use_transformers=False)
        tokenizer.name = f"bpe-{model_vocab_size}"
        return tokenizer
    return load_hf_tokenizer(str(cfg.tokenizer))


# The byte-level BPE's printable stand-ins for the 256 byte values (GPT-2's bytes_to_unicode): each character of
# such a vocabulary entry is one byte of text.
_BYTE_LEVEL_DECODERS = {"ByteLevel"}
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """int64 [vocab_size]: how many UTF-8 bytes of text each id stands for; 0 for EOS and other special tokens.

    Exact for the byte tokenizer, for byte-level BPEs (GPT-2 style: one character of the entry per byte) and for
    SentencePiece-style vocabularies (U+2581 for a space, `<0xNN>` byte fallbacks); for others the UTF-8 length of
    the entry as written. The bytes of a run of targets is then the sum over its ids, and bits per byte follows
    from its loss (`train.metrics.bits_per_byte`).
    """
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    if isinstance(tokenizer, ByteTokenizer):
        lengths[:256] = 1
        return lengths
    vocab, special, decoder = tokenizer.vocabulary()
    byte_level = decoder in _BYTE_LEVEL_DECODERS
    for token, i in vocab.items():
        if i in special or not 0 <= i < len(lengths):
            continue
        if byte_level:
            lengths[i] = len(token)
        elif _BYTE_FALLBACK.fullmatch(token):
            lengths[i] = 1
        else:
            lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The model's embedding must have a row for every id the tokenizer can produce."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError("model.vocab_size", model_vocab_size,
                          f"must be >= the tokenizer's vocab_size {tokenizer.vocab_size} ({tokenizer.name})")


def load_hf_tokenizer(path: str, use_transformers: bool = True) -> HFTokenizer:
    """A local tokenizer directory (or its tokenizer.json): through `transformers.AutoTokenizer` when installed and
    `use_transformers`, which honours every file of a saved tokenizer, else through `tokenizers` (tokenizer.json)."""
    valid = "must be 'byte' or a local Hugging Face tokenizer directory holding tokenizer.json (nothing is downloaded)"
    expanded = os.path.expanduser(path)
    directory = os.path.dirname(expanded) if os.path.isfile(expanded) else expanded
    if not path or not os.path.isdir(directory):
        raise ConfigError("data.tokenizer", path, valid)
    tokenizer_json = expanded if os.path.isfile(expanded) else os.path.join(directory, "tokenizer.json")

    if use_transformers and importlib.util.find_spec("transformers") is not None and os.path.isdir(expanded):
        from transformers import AutoTokenizer

        try:
            backend = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad directory
            raise ConfigError("data.tokenizer", path,
                              f"{valid} ({type(e).__name__}: {first_line(e, type(e).__name__)})") from None
        eos = backend.eos_token_id
        if eos is None:
            eos = _eos_from_vocab(backend.get_vocab())
        if eos is None:
            raise ConfigError("data.tokenizer", path, "has no end-of-sequence token: set eos_token in tokenizer_config.json")
        return HFTokenizer(backend, int(eos), len(backend), name=path, fast_lib=False,
                           fingerprint=_directory_digest(directory))

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
        raise ConfigError("data.tokenizer", path,
                          f"tokenizer.json could not be read ({first_line(e, type(e).__name__)})") from None
    eos = _eos_from_config(directory, backend)
    if eos is None:
        eos = _eos_from_vocab(backend.get_vocab(with_added_tokens=True))
    if eos is None:
        raise ConfigError("data.tokenizer", path,
                          "has no end-of-sequence token: name eos_token in tokenizer_config.json or add one of "
                          + ", ".join(_EOS_CANDIDATES))
    return HFTokenizer(backend, eos, backend.get_vocab_size(with_added_tokens=True), name=path, fast_lib=True,
                       fingerprint=_directory_digest(directory))


# Model weights that may share a directory with the tokenizer (left out of its fingerprint).
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx"})


def _directory_digest(directory: str) -> str:
    """A digest of the files directly in a tokenizer directory (names and contents: what decides its ids). Weights
    that share a model's directory with its tokenizer are left out: they are large and decide no id."""
    digest = hashlib.blake2b(digest_size=16)
    files = (p for p in Path(directory).iterdir() if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES)
    for path in sorted(files):
        digest.update(path.name.encode() + b"\x1f" + path.read_bytes() + b"\x1e")
    return digest.hexdigest()


def _eos_from_config(directory: str, backend: Any) -> int | None:
    """eos_token as named by tokenizer_config.json (a string, or a dict with "content")."""
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested beyond the parser
        raise ConfigError("data.tokenizer", directory, "tokenizer_config.json is not valid JSON "
                          f"({type(e).__name__}: {first_line(e, type(e).__name__)})") from None
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

