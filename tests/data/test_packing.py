"""Packing: the windows are exactly the documents' tokens, each followed by EOS, concatenated and cut."""

import json

import numpy as np
import pytest

from muon_recipes.config import DataConfig
from muon_recipes.data import build_datasets, build_tokenizer

DOCS = ["first document", "", "zweites Dokument — ü", "短い", "x" * 57, "the last one\n"]


def _naive_windows(docs, encode, eos, window):
    """Independent reference: a plain Python loop over documents and tokens."""
    stream = []
    for doc in docs:
        if doc:  # empty documents are dropped by the files source
            stream.extend(encode(doc))
            stream.append(eos)
    return [stream[i:i + window] for i in range(0, len(stream) - window + 1, window)]


def _write_jsonl(tmp_path, docs):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("seq_len", [1, 7, 16])
@pytest.mark.parametrize("num_proc", [1, 2])
def test_windows_are_the_eos_separated_concatenation(tmp_path, seq_len, num_proc):
    cfg = DataConfig(name="files", source="files", paths=[_write_jsonl(tmp_path, DOCS)], eval_fraction=0.0,
                     num_proc=num_proc)
    tok = build_tokenizer(cfg)
    train, held_out = build_datasets(cfg, tok, seq_len=seq_len, seed=0, rank=1)
    expected = _naive_windows(DOCS, lambda d: list(d.encode("utf-8")), 256, seq_len + 1)
    assert train["input_ids"] == expected
    assert len(held_out) == 0


def test_packing_with_a_local_hf_tokenizer(tmp_path, train_tiny_bpe):
    raw = train_tiny_bpe(tmp_path / "tok", with_config=False)
    docs = ["the quick brown fox", "def forward(self, x): return x", "lazy dog " * 9]
    cfg = DataConfig(name="files", source="files", paths=[_write_jsonl(tmp_path, docs)], eval_fraction=0.0,
                     tokenizer=str(tmp_path / "tok"))
    tok = build_tokenizer(cfg)
    train, _ = build_datasets(cfg, tok, seq_len=5, seed=0, rank=1)
    eos = raw.token_to_id("<|endoftext|>")
    expected = _naive_windows(docs, lambda d: raw.encode(d, add_special_tokens=False).ids, eos, 6)
    assert train["input_ids"] == expected and len(expected) > 3


def test_train_and_eval_windows_come_from_disjoint_documents(tmp_path):
    docs = [f"<{i:03d}>" + "body " * (i % 5) for i in range(60)]
    cfg = DataConfig(name="files", source="files", paths=[_write_jsonl(tmp_path, docs)], eval_fraction=0.1)
    tok = build_tokenizer(cfg)
    train, held_out = build_datasets(cfg, tok, seq_len=1, seed=0, rank=1)  # windows of 2: nearly all of the text
    train_text = tok.decode([t for w in train["input_ids"] for t in w])
    eval_text = tok.decode([t for w in held_out["input_ids"] for t in w])
    train_tags = {d[:5] for d in docs if d[:5] in train_text}
    eval_tags = {d[:5] for d in docs if d[:5] in eval_text}
    assert len(eval_tags) == 6 and not train_tags & eval_tags
    assert len(train_tags) == 54
    assert np.all(np.diff([int(t[1:4]) for t in sorted(eval_tags)]) > 0)
