"""Tests for the tokenizer interface and SentencePiece training."""

import logging
import pickle

import numpy as np
import pytest

from jaxtune.data.builtin import quickstart
from jaxtune.data.tokenizers import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece

TEXTS = [
    "What is the opposite of hot?",
    "cold",
    "Sort these digits: 3 1 2",
    "1 2 3",
    "Here is a word: lamp. Output it in uppercase.",
    "LAMP",
    "Two  spaces, a\nnewline and a trailing space ",
    "Unseen characters: Zürich ✓ {braces}",
]


@pytest.fixture(scope="module")
def corpus():
    return list(quickstart.tokenizer_corpus(seed=0))  # exactly what the quickstart trains on


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("tok") / "qs", vocab_size=512)


def test_implements_protocol_with_fixed_special_ids(tok):
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 512
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.id_to_piece(3) == "<unk>"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.pad_id not in ids and tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == text


def test_round_trip_quickstart_texts(tok, corpus):
    for text in corpus[::97]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["", " ", "   ", "\n"])
def test_empty_and_whitespace_decode_cleanly(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([]) == ""


def test_decode_skips_special_and_out_of_range_ids(tok):
    ids = tok.encode("Sort these digits: 3 1 2")
    noisy = [tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id, tok.vocab_size + 5]
    assert tok.decode(noisy) == "Sort these digits: 3 1 2"
    assert tok.decode(np.array(noisy, dtype=np.int32)) == "Sort these digits: 3 1 2"


def test_split_digits(tok):
    ids = tok.encode("1234")
    assert [tok.id_to_piece(i).lstrip("▁") for i in ids if tok.id_to_piece(i) != "▁"] == list("1234")


def test_training_is_deterministic_and_writes_model(corpus, tok, tmp_path):
    again = train_sentencepiece(corpus, tmp_path / "sub" / "again", vocab_size=512)
    assert (tmp_path / "sub" / "again.model").is_file()
    for text in corpus[:500:7] + TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert again.__getstate__()["model_proto"] == tok.__getstate__()["model_proto"]


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    for text in TEXTS:
        assert clone.encode(text) == tok.encode(text)
    assert (clone.vocab_size, clone.pad_id, clone.eos_id, clone.bos_id) == (512, 0, 1, 2)


def test_load_tokenizer_dispatches_on_file_type(corpus, tmp_path):
    train_sentencepiece(corpus[:5000], tmp_path / "small", vocab_size=400)
    loaded = load_tokenizer(tmp_path / "small.model")
    assert isinstance(loaded, SentencePieceTokenizer) and loaded.vocab_size == 400
    assert loaded.decode(loaded.encode(TEXTS[0])) == TEXTS[0]


def test_load_tokenizer_rejects_unsupported_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"vocab\.txt.*SentencePiece.*\.model"):
        load_tokenizer(path)


def test_load_tokenizer_errors_on_missing_or_corrupt_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        load_tokenizer(bad)


def test_too_large_vocab_falls_back_to_corpus_maximum(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="jaxtune.data.tokenizers")
    tok = train_sentencepiece(["a b c", "abc cab"] * 10, tmp_path / "tiny", vocab_size=5000)
    assert 259 < tok.vocab_size < 5000  # 4 specials + 256 byte pieces + what the corpus supports
    assert "supports at most" in caplog.text
    assert tok.decode(tok.encode("cab abc")) == "cab abc"
