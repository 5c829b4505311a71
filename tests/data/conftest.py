"""Shared helpers of the data tests."""

import json

import pytest


def _train_tiny_bpe(directory, with_config: bool):
    """A real BPE tokenizer trained on a few strings, saved as a Hugging Face tokenizer directory."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers, decoders

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20 + ["def forward(self, x): return x"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if with_config:
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    return tok


@pytest.fixture
def train_tiny_bpe():
    """Train and save a tiny BPE tokenizer (skips the test when `tokenizers` is not installed)."""
    return _train_tiny_bpe
