"""The fitted BPE, the token cache and bits per byte.

References: the documents themselves (round trip), a word that only held-out documents contain (the fitting never
saw it), a second process that prepares the same data at the same moment (one builds, both read the same bytes), a
cache damaged three ways (rebuilt, equal to the first build), and bits per byte worked out by hand.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from muon_recipes.config import DataConfig  # noqa: E402
from muon_recipes.data import ByteTokenizer, build_datasets, build_tokenizer, sources  # noqa: E402
from muon_recipes.data.token_cache import token_streams  # noqa: E402
from muon_recipes.data.tokenizer import token_byte_lengths  # noqa: E402
from muon_recipes.train.metrics import bits_per_byte  # noqa: E402

# A word no real text holds; the corpus below puts it in held-out documents only (or, for the control, in
# training documents only), often enough that a BPE fitted on those documents learns it as one token.
SECRET = "qzvxjqzvxj"


def _jsonl_corpus(directory: Path, secret_in: str) -> tuple[DataConfig, list[str]]:
    """A files corpus of 120 documents, 0.25 held out, `SECRET` repeated in the documents of split `secret_in`."""
    directory.mkdir(parents=True, exist_ok=True)
    base = ["the quick brown fox jumps over the lazy dog. ", "def forward(self, x):\n    return x * 2\n",
            "Ünïcödé text — with accents, 漢字 and emoji 🙂 mixed in. "]
    docs = [base[i % 3] * (3 + i % 5) + f"document {i}." for i in range(120)]
    train_ids, eval_ids = sources.split_keys([str(i) for i in range(len(docs))], 0.25)
    for i in (eval_ids if secret_in == "eval" else train_ids[: len(eval_ids)]):
        docs[i] += f" {SECRET}" * 50
    path = directory / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(name="files", source="files", paths=[str(path)], tokenizer="bpe", eval_fraction=0.25,
                     cache_dir=str(directory / "cache"))
    return cfg, docs


def _vocabulary(tokenizer) -> dict:
    return tokenizer.vocabulary()[0]


def test_bpe_round_trips_every_document_and_has_the_models_vocabulary(tmp_path):
    cfg, docs = _jsonl_corpus(tmp_path, secret_in="train")
    tokenizer = build_tokenizer(cfg, model_vocab_size=400)
    assert tokenizer.vocab_size == 400
    assert tokenizer.decode([tokenizer.eos_id]) == ""  # EOS is special: it stands for no text
    for doc in docs:
        ids = tokenizer.encode(doc)
        assert max(ids) < 400 and tokenizer.eos_id not in ids
        assert tokenizer.decode(ids) == doc
    # The standard-library corpus too (code, docstrings, every byte value the sources hold).
    table, _, _ = sources.load_embedded(max_chars=300_000)
    stdlib = build_tokenizer(DataConfig(tokenizer="bpe", max_chars=300_000, cache_dir=str(tmp_path / "c2")), 512)
    for text in table.column(sources.TEXT).to_pylist():
        assert stdlib.decode(stdlib.encode(text)) == text


def test_held_out_documents_never_reach_the_fitting(tmp_path):
    held_out, _ = _jsonl_corpus(tmp_path / "held-out", secret_in="eval")
    in_training, _ = _jsonl_corpus(tmp_path / "training", secret_in="train")
    learned = [any(SECRET in token.replace("Ġ", " ") for token in _vocabulary(build_tokenizer(cfg, 400)))
               for cfg in (held_out, in_training)]
    assert learned == [False, True]  # the control shows the fitting would have learned it


def test_bpe_and_tokens_come_from_the_cache_the_second_time(tmp_path, capfd):
    cfg, _ = _jsonl_corpus(tmp_path, secret_in="train")
    first = build_datasets(cfg, build_tokenizer(cfg, 400), seq_len=16, seed=0)
    out = capfd.readouterr().out
    assert "fitting a byte-level BPE" in out and "data: tokenizing" in out
    second = build_datasets(cfg, build_tokenizer(cfg, 400), seq_len=16, seed=0)
    out = capfd.readouterr().out
    assert "fitting a byte-level BPE" not in out and "data: tokenizing" not in out
    assert "from the cache (no fitting)" in out and "tokens from the cache (no tokenizing)" in out
    for a, b in zip(first, second):
        assert a.with_format("arrow")["input_ids"].equals(b.with_format("arrow")["input_ids"])
    # The cached stream is the corpus tokenized by hand: each training document's ids, then EOS.
    tokenizer = build_tokenizer(cfg, 400)
    table, keys, _ = sources.load_corpus(cfg)
    train_ids, _ = sources.split_keys(keys, cfg.eval_fraction)
    expected = np.concatenate([np.append(tokenizer.encode(table.column("text")[i].as_py()), tokenizer.eos_id)
                               for i in train_ids])
    np.testing.assert_array_equal(token_streams(cfg, tokenizer).train, expected)


def _prepare(cfg: DataConfig, out: str) -> None:
    tokenizer = build_tokenizer(cfg, 400)
    streams = token_streams(cfg, tokenizer)
    np.save(out, np.asarray(streams.train))


def test_two_processes_preparing_at_once_build_once_and_read_the_same(tmp_path, capfd):
    cfg, _ = _jsonl_corpus(tmp_path, secret_in="train")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_prepare, args=(cfg, str(tmp_path / f"rank{r}.npy"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    out = capfd.readouterr().out
    assert out.count("fitting a byte-level BPE") == 1 and out.count("data: tokenizing") == 1, out
    a, b = (np.load(tmp_path / f"rank{r}.npy") for r in range(2))
    assert len(a) > 0
    np.testing.assert_array_equal(a, b)
    assert not list(Path(cfg.cache_dir).rglob("*.tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "other-key"])
def test_a_damaged_cache_is_rebuilt_not_used(tmp_path, capfd, damage):
    cfg = DataConfig(max_chars=50_000, cache_dir=str(tmp_path / "cache"))
    tokenizer = ByteTokenizer()
    good = np.array(token_streams(cfg, tokenizer).train)
    directory = next(p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir())
    array = directory / "train.npy"
    if damage == "truncate":
        array.write_bytes(array.read_bytes()[:-1000])
    elif damage == "flip-a-byte":
        raw = bytearray(array.read_bytes())
        raw[-7] ^= 0x01
        array.write_bytes(bytes(raw))
    else:
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["key"]["corpus"] = "0" * 32
        (directory / "manifest.json").write_text(json.dumps(manifest))
    capfd.readouterr()
    again = token_streams(cfg, tokenizer)
    err = capfd.readouterr().err
    assert "unusable" in err and "rebuilding" in err
    np.testing.assert_array_equal(again.train, good)


def test_bits_per_byte_by_hand():
    # Targets "h", then "é" as its two UTF-8 bytes, then EOS: 4 tokens covering 3 bytes of text.
    # A uniform prediction over the 257 ids costs ln 257 nats per token, so
    # bpb = (4 * ln 257) nats / 3 bytes / ln 2 = (4/3) log2 257 bits per byte.
    tokenizer = ByteTokenizer()
    targets = np.array(tokenizer.encode("hé") + [tokenizer.eos_id])
    assert len(targets) == 4
    lengths = token_byte_lengths(tokenizer)
    text_bytes = int(lengths[targets].sum())
    assert text_bytes == 3
    assert bits_per_byte(math.log(257), len(targets), text_bytes) == pytest.approx(4 / 3 * math.log2(257))
    # Four tokens covering 8 bytes at 2 nats each: 4 * 2 / 8 / ln 2 = 1 / ln 2 bits per byte.
    assert bits_per_byte(2.0, 4, 8) == pytest.approx(1 / math.log(2))
    assert bits_per_byte(2.0, 4, 0) is None


def test_bpe_byte_lengths_sum_to_the_documents_bytes(tmp_path):
    cfg, docs = _jsonl_corpus(tmp_path, secret_in="train")
    tokenizer = build_tokenizer(cfg, 400)
    lengths = token_byte_lengths(tokenizer)
    assert lengths[tokenizer.eos_id] == 0
    for doc in docs[:20]:
        assert int(lengths[tokenizer.encode(doc)].sum()) == len(doc.encode("utf-8"))
