"""Tokenizers: the byte tokenizer's ids, trained BPEs loaded as a file or a folder, where the special
tokens come from, the errors for what cannot be loaded, the vocab check, and the shipped BPE."""
import json
import shutil

import pytest
import tokenizers

from moeforge.train.tokenizer import (BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, PAD, check_vocab,
                                      default_tokenizer_path, load_tokenizer, padded_vocab_size, train_tokenizer)

TEXTS = ["def add(a, b):\n    return a + b\n", "Héllo wörld, ünïcode → ✓\n",
         "for i in range(10):\n    print(i)\n"] * 20


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    return train_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok") / "tok.json").path


def test_bytes_is_the_byte_files_tokenizer():
    """ids 0..255 are the UTF-8 bytes and 256 ends a document: the ids of moeforge's first token files."""
    tok = load_tokenizer("bytes")
    s = "print('héllo')\n"
    assert tok.encode(s) == list(s.encode("utf-8")) and tok.decode(tok.encode(s)) == s
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad, tok.token_id("<eot>")) == (257, 256, None, None, 256)
    assert tok.encode_batch([s, ""]) == [list(s.encode()), []] and tok.token_id(FIM_BEGIN) is None


def test_trained_bpe_loads_as_a_file_and_as_a_folder(bpe_file, tmp_path):
    """A bare tokenizer.json names its specials by their spelling (DeepSeek's, ids 0..5); a folder's
    tokenizer_config.json overrides them, `null` meaning none, as DeepSeek-V3's does for its pad."""
    tok = load_tokenizer(str(bpe_file))
    assert tok.vocab_size == 300 and (tok.bos, tok.eod, tok.pad) == (0, 1, 2)
    assert [tok.token_id(t) for t in (FIM_HOLE, FIM_BEGIN, FIM_END)] == [3, 4, 5]
    for s in TEXTS[:3]:
        assert tok.decode(tok.encode(s)) == s and max(tok.encode(s)) < 300
    assert tok.encode_batch(TEXTS[:2]) == [tok.encode(TEXTS[0]), tok.encode(TEXTS[1])]
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0])  # it merged something
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(bpe_file, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"__type": "AddedToken", "content": BOS}, "eos_token": EOS, "pad_token": None}))
    tok2 = load_tokenizer(str(folder))
    assert (tok2.bos, tok2.eod, tok2.pad) == (0, 1, None) and tok2.fingerprint == tok.fingerprint
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="eos_token '</s>' is not in the vocabulary"):
        load_tokenizer(str(folder))


def test_special_token_text_in_a_document_stays_text(bpe_file):
    """A document spelling the end-of-document token gets its characters' tokens, not the id."""
    tok = load_tokenizer(str(bpe_file))
    ids = tok.encode(f"a{EOS}b")
    assert tok.eod not in ids and tok.decode(ids) == f"a{EOS}b"


def test_what_cannot_be_loaded_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer='deepseek-ai/DeepSeek-V3'.*hub name.*downloads"):
        load_tokenizer("deepseek-ai/DeepSeek-V3")
    with pytest.raises(FileNotFoundError, match="no such file or folder. A tokenizer is `bytes`") as e:
        load_tokenizer(str(tmp_path / "missing.json"))
    assert "hub" not in str(e.value) and "stdlib-bpe-4096" in str(e.value)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a `tokenizers` file"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_a_tokenizer_without_an_end_of_document_token_is_refused(tmp_path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.train_from_iterator(TEXTS, tokenizers.trainers.BpeTrainer(vocab_size=280, special_tokens=[PAD]))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no end-of-document token"):
        load_tokenizer(str(tmp_path))


def test_vocab_check_and_padding():
    assert [padded_vocab_size(n) for n in (257, 4096, 4097, 129280)] == [384, 4096, 4224, 129280]
    tok = load_tokenizer("bytes")
    check_vocab(tok, 257)
    check_vocab(4096, 4096)
    with pytest.raises(ValueError, match=r"model.vocab_size=256 is smaller than the tokenizer's 257 ids .*=384"):
        check_vocab(tok, 256)
    with pytest.raises(ValueError, match="model.vocab_size=257 .* 4096 ids"):
        check_vocab(4096, 257)


def test_train_tokenizer_refuses_a_vocab_below_the_bytes(tmp_path):
    with pytest.raises(ValueError, match="--vocab-size 100: .* at least 262"):
        train_tokenizer(TEXTS, 100, tmp_path / "t.json")


def test_the_shipped_bpe():
    """conf/tokenizer/stdlib-bpe-4096.json: loadable by name and by path, DeepSeek's specials at 0..5."""
    path = default_tokenizer_path()
    assert path.is_file() and path.name == "stdlib-bpe-4096.json"
    tok = load_tokenizer("stdlib-bpe-4096")
    assert tok.fingerprint == load_tokenizer(str(path)).fingerprint
    assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (4096, 0, 1, 2)
    assert [tok.token_id(t) for t in (FIM_HOLE, FIM_BEGIN, FIM_END)] == [3, 4, 5]
    code = "import os\n\n\ndef main(argv=None):\n    return os.path.join('a', 'b')  # é\n"
    ids = tok.encode(code)
    assert tok.decode(ids) == code and len(ids) < len(code) / 2
