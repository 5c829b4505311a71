"""Tokenizers: the byte tokenizer round-trips any text; a local Hugging Face tokenizer loads by path."""

import pytest

from muon_recipes.config import ConfigError, DataConfig
from muon_recipes.data import ByteTokenizer, build_tokenizer, check_vocab_fits

TEXTS = ["plain ASCII", "naïve café — “quotes”", "日本語のテキスト", "emoji 🧪🚀 and \t tabs\nnewlines", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
    tok = build_tokenizer(DataConfig(tokenizer="byte"))
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # independent reference: the UTF-8 bytes themselves
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text  # the separator carries no text
    assert [list(x) for x in tok.encode_batch([text, "x"])] == [ids, [ord("x")]]


def test_byte_tokenizer_ids_fit_the_tiny_models():
    tok = ByteTokenizer()
    assert tok.eos_id == 256 and tok.vocab_size == 257
    check_vocab_fits(tok, 320)
    with pytest.raises(ConfigError, match=r"model.vocab_size=256: must be >= the tokenizer's vocab_size 257"):
        check_vocab_fits(tok, 256)


def test_missing_tokenizer_path_is_one_line(tmp_path):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(ConfigError) as err:
        build_tokenizer(DataConfig(tokenizer=missing))
    message = str(err.value)
    assert "\n" not in message
    assert "data.tokenizer" in message and missing in message and "'byte'" in message


def test_directory_without_tokenizer_json_is_one_line(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(ConfigError) as err:
        build_tokenizer(DataConfig(tokenizer=str(tmp_path)))
    assert "\n" not in str(err.value) and "data.tokenizer" in str(err.value)


@pytest.mark.parametrize("with_config", [False, True])
def test_local_hf_tokenizer_loads_by_path(tmp_path, train_tiny_bpe, with_config):
    raw = train_tiny_bpe(tmp_path / "tok", with_config)
    tok = build_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok")))
    text = "the lazy fox returns x — naïve"
    ids = tok.encode(text)
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert len(ids) < len(text.encode())  # merges were learned and are used
    assert tok.decode(ids) == text
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    # tokenizer_config.json's eos_token wins; without it the conventional name is found.
    assert tok.eos_id == raw.token_to_id("<pad>" if with_config else "<|endoftext|>")
