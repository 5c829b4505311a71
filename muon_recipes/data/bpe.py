"""`data.tokenizer=bpe`: a byte-level BPE fitted to the run's own training documents, cached by corpus and size.

A model whose embedding has `model.vocab_size` rows should see that many token ids; the byte tokenizer leaves
all but 257 of them untrained. So the tokenizer is fitted here, offline, with the `tokenizers` library: GPT-2's
byte-level BPE (Radford et al. 2019: the 256 byte values as the base alphabet, so every string encodes with no
unknown token; GPT-2's pre-tokenization regex; merges learned by frequency, Sennrich et al. 2016) with exactly
`model.vocab_size` entries, the end-of-sequence token `<|endoftext|>` included.

Fitted on the training split only: the held-out documents never reach the merges, so an evaluation loss is not
flattered by a vocabulary that saw the evaluation text. For speed it is fitted on a sample of the training
documents, taken whole in a fixed pseudo-random order (a hash of each document's key) up to
`data.bpe_sample_chars` characters (default 50 M; the whole split when it is smaller).

The result is a standard Hugging Face tokenizer directory (`tokenizer.json` + `tokenizer_config.json` naming the
EOS token), so any tool can load it. It is cached under `<cache>/tokenizers/bpe-<vocab>-<key>`; the key covers
the corpus fingerprint (its files, sizes and modification times, the caps and the held-out fraction), the
vocabulary size and the sample size. The first process to need it fits it; the ranks of the run and the other jobs
of a sweep wait for it and reuse it (`cache.prepare_once`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from muon_recipes.config import DataConfig, check_bpe_vocab_size, first_line

from . import sources
from .cache import cache_root, current_rank, prepare_once

EOS_TOKEN = "<|endoftext|>"
CACHE_FORMAT = 1


def bpe_directory(cfg: DataConfig, vocab_size: int) -> Path:
    """Where the BPE fitted for this corpus, held-out split and vocabulary size lives (or will)."""
    key = json.dumps({"format": CACHE_FORMAT, "corpus": sources.corpus_fingerprint(cfg), "vocab_size": vocab_size,
                      "sample_chars": cfg.bpe_sample_chars})
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return cache_root(cfg.cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{digest}"


def fitted_bpe(cfg: DataConfig, vocab_size: int) -> Path:
    """The directory of the BPE for this corpus and `vocab_size`, fitted now unless it is cached."""
    check_bpe_vocab_size(vocab_size)
    directory = bpe_directory(cfg, vocab_size)
    fitted = prepare_once(directory, _check, lambda tmp: _fit(cfg, vocab_size, tmp), "the BPE tokenizer")
    if fitted or current_rank() == 0:
        print(f"data: BPE tokenizer of {vocab_size} entries {'saved to' if fitted else 'from the cache (no fitting)'} "
              f"{directory}", flush=True)
    return directory


def _check(directory: Path) -> str | None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (directory / name).is_file():
            return f"{name} is missing"
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        return f"tokenizer.json does not load ({first_line(e, type(e).__name__)})"
    return None


def training_sample(cfg: DataConfig) -> tuple[list[str], int, int]:
    """(texts, documents in the training split, characters in it): whole training documents in a fixed hash order
    up to `data.bpe_sample_chars` characters. Held-out documents are never among them."""
    table, keys, _ = sources.load_corpus(cfg)
    train_ids, _ = sources.split_keys(keys, cfg.eval_fraction)
    texts = table.column(sources.TEXT)
    sample, total, split_chars = [], 0, 0
    for i in sorted(train_ids, key=lambda i: sources.stable_hash("bpe-sample", keys[i])):
        text = texts[i].as_py()
        split_chars += len(text)
        if total < cfg.bpe_sample_chars:
            sample.append(text)
            total += len(text)
    return sample, len(train_ids), split_chars


def _fit(cfg: DataConfig, vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    start = time.perf_counter()
    texts, n_docs, split_chars = training_sample(cfg)
    chars = sum(map(len, texts))
    print(f"data: fitting a byte-level BPE of {vocab_size} entries on {len(texts)} of {n_docs} training documents "
          f"({chars:,} of {split_chars:,} characters)", flush=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TOKEN, "model_max_length": 1 << 30}))
    print(f"data: BPE fitted in {time.perf_counter() - start:.1f} s", flush=True)
