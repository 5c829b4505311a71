"""Corpus sources: the embedded standard library corpus, local files, the held-out split, one-line errors."""

import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muon_recipes.config import ConfigError, DataConfig
from muon_recipes.data import build_datasets, build_tokenizer
from muon_recipes.data import sources


def test_embedded_corpus_is_deterministic_and_real_text():
    first, keys, description = sources.load_embedded(0)
    again, keys_again, _ = sources.load_embedded(0)
    assert keys == keys_again == sorted(keys)
    assert first.equals(again)
    text = "".join(first.column("text").to_pylist())
    assert len(text) > 1_000_000
    printable = sum(c in string.printable for c in text)
    assert printable / len(text) > 0.97
    assert text.count(" the ") > 5_000  # English prose, not only code
    assert "PSF License" in description
    assert not any(k.startswith("_sysconfigdata") or "/test/" in f"/{k}" or "/tests/" in f"/{k}" for k in keys)
    assert "argparse.py" in keys


def test_embedded_cap_is_exact_and_deterministic():
    table, keys, _ = sources.load_embedded(200_000)
    again, _, _ = sources.load_embedded(200_000)
    assert table.equals(again)
    assert sum(len(t) for t in table.column("text").to_pylist()) == 200_000
    assert len(keys) > 3  # a spread of files, not one big one
    full_table, full_keys, _ = sources.load_embedded(0)
    full = dict(zip(full_keys, full_table.column("text").to_pylist()))
    texts = table.column("text").to_pylist()
    # Every kept file but possibly one (the one cut to fit) is whole.
    assert sum(full[k] != t for k, t in zip(keys, texts)) <= 1
    assert all(full[k].startswith(t) for k, t in zip(keys, texts))


def test_embedded_datasets_do_not_depend_on_seed_and_hold_out_documents():
    cfg = DataConfig(max_chars=300_000, eval_fraction=0.1)
    tok = build_tokenizer(cfg)
    train_a, eval_a = build_datasets(cfg, tok, seq_len=64, seed=0, rank=1)
    train_b, eval_b = build_datasets(cfg, tok, seq_len=64, seed=7, rank=1)
    assert train_a["input_ids"] == train_b["input_ids"] and eval_a["input_ids"] == eval_b["input_ids"]
    assert len(train_a) > 10 * len(eval_a) > 0
    assert len(train_a[0]["input_ids"]) == 65


def test_split_keys_is_disjoint_exact_and_order_free():
    keys = [f"doc{i}" for i in range(101)]
    train, held_out = sources.split_keys(keys, 0.05)
    assert len(held_out) == 6  # ceil(0.05 * 101)
    assert sorted(train + held_out) == list(range(101)) and not set(train) & set(held_out)
    shuffled = keys[50:] + keys[:50]
    _, held_out_shuffled = sources.split_keys(shuffled, 0.05)
    assert {shuffled[i] for i in held_out_shuffled} == {keys[i] for i in held_out}
    assert sources.split_keys(keys, 0.0) == (list(range(101)), [])
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        sources.split_keys(["only"], 0.02)


@pytest.fixture
def corpus_files(tmp_path):
    (tmp_path / "a.txt").write_text("A plain text document, naïve.\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in
                                                enumerate(["jsonl one", "jsonl two", ""])) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "json array item"}, {"text": None}]))
    pq.write_table(pa.table({"text": ["parquet row 1", "parquet row 2"], "x": [1, 2]}), tmp_path / "d.parquet")
    return tmp_path


def test_files_source_reads_every_type_in_order(corpus_files):
    paths = [str(corpus_files / "a.txt"), str(corpus_files / "b.jsonl"), str(corpus_files / "*.json"),
             str(corpus_files / "d.parquet")]
    table, keys, description = sources.load_files(paths, "text", 0)
    assert table.column("text").to_pylist() == ["A plain text document, naïve.\n", "jsonl one", "jsonl two",
                                                 "json array item", "parquet row 1", "parquet row 2"]
    assert keys == [str(i) for i in range(6)] and "4 files" in description
    capped, _, _ = sources.load_files(paths, "text", 35)
    assert "".join(capped.column("text").to_pylist()) == "A plain text document, naïve.\njsonl"
    by_directory, _, _ = sources.load_files([str(corpus_files)], "text", 0)
    assert sorted(by_directory.column("text").to_pylist()) == sorted(table.column("text").to_pylist())


def _one_line_error(call, key, value):
    with pytest.raises(ConfigError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and key in message and str(value) in message, message
    return message


def test_files_errors_are_one_line(corpus_files):
    missing = str(corpus_files / "missing.jsonl")
    _one_line_error(lambda: sources.load_files([missing], "text", 0), "data.paths", missing)
    _one_line_error(lambda: sources.load_files([str(corpus_files / "*.csv")], "text", 0), "data.paths", "*.csv")
    (corpus_files / "e.csv").write_text("a,b\n")
    _one_line_error(lambda: sources.load_files([str(corpus_files / "e.csv")], "text", 0), "data.paths", "e.csv")
    msg = _one_line_error(lambda: sources.load_files([str(corpus_files / "b.jsonl")], "body", 0), "data.text_field", "body")
    assert "text, n" in msg  # what is there instead
    msg = _one_line_error(lambda: sources.load_files([str(corpus_files / "d.parquet")], "body", 0), "data.text_field", "body")
    assert "text, x" in msg
    _one_line_error(lambda: sources.load_files([str(corpus_files / "d.parquet")], "x", 0), "data.text_field", "x")
    (corpus_files / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    _one_line_error(lambda: sources.load_files([str(corpus_files / "bad.jsonl")], "text", 0), "data.paths", "line 2")
    # ... and through build_datasets, as the trainer calls it.
    cfg = DataConfig(name="files", source="files", paths=[missing])
    _one_line_error(lambda: build_datasets(cfg, build_tokenizer(cfg), 16, 0, rank=1), "data.paths", missing)


def test_progress_bars_only_on_rank_zero(capfd, tmp_path):
    from datasets.utils.logging import is_progress_bar_enabled

    tok = build_tokenizer(DataConfig())
    # A fresh token cache for each call, so both tokenize.
    build_datasets(DataConfig(max_chars=20_000, cache_dir=str(tmp_path / "a")), tok, seq_len=32, seed=0, rank=1)
    assert "Tokenizing" not in capfd.readouterr().err
    assert is_progress_bar_enabled()  # restored for whoever else uses datasets in this process
    build_datasets(DataConfig(max_chars=20_000, cache_dir=str(tmp_path / "b")), tok, seq_len=32, seed=0, rank=0)
    assert "Tokenizing train documents" in capfd.readouterr().err


@pytest.fixture
def local_hub_dataset(tmp_path):
    """A dataset directory that `datasets.load_dataset(path, streaming=True)` reads like a hub repository."""
    for shard in range(3):
        lines = [json.dumps({"text": f"<{shard}-{i:02d}> " + "word " * (i % 4), "id": i}) for i in range(20)]
        (tmp_path / f"part{shard}.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path)


def test_hub_source_streams_and_holds_out_the_first_documents(local_hub_dataset):
    from datasets import IterableDataset

    cfg = DataConfig(name="hub", source="hub", hub_name=local_hub_dataset, eval_docs=3)
    tok = build_tokenizer(cfg)
    train, held_out = build_datasets(cfg, tok, seq_len=15, seed=0, rank=1)
    assert isinstance(train, IterableDataset) and len(held_out) > 0
    eval_text = tok.decode([t for w in held_out["input_ids"] for t in w])
    train_windows = [row["input_ids"] for row in train]
    assert {len(w) for w in train_windows} == {16}
    train_text = tok.decode([t for w in train_windows for t in w])
    every_tag = [f"<{s}-{i:02d}>" for s in range(3) for i in range(20)]
    assert [t for t in every_tag if t in eval_text] == every_tag[:3]
    in_train = [t for t in every_tag if t in train_text]
    assert not set(in_train) & set(every_tag[:3])
    assert len(in_train) >= 56  # all 57 others but at most the one cut off at the stream's end


def test_hub_errors_are_one_line(local_hub_dataset):
    cfg = DataConfig(name="hub", source="hub", hub_name=local_hub_dataset, hub_split="validation")
    _one_line_error(lambda: build_datasets(cfg, build_tokenizer(cfg), 15, 0, rank=1), "data.hub_name", local_hub_dataset)
    cfg = DataConfig(name="hub", source="hub", hub_name=local_hub_dataset, text_field="body")
    _one_line_error(lambda: build_datasets(cfg, build_tokenizer(cfg), 15, 0, rank=1), "data.text_field", "body")
