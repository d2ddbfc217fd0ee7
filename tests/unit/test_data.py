"""Sampling through megatron-core (GPTDataset, BlendedDataset) from indexed datasets written by megatron-core's
own IndexedDatasetBuilder (what Megatron-LM's preprocess_data.py writes), and the checks before it."""
import json
import shutil

import numpy as np
import pytest
import torch

from moeforge.model.loss import split_window
from moeforge.train.config import DataConfig
from moeforge.train.data import Corpus, SampleStream, build_datasets
from moeforge.train.prepare import IndexedDatasetBuilder  # megatron-core's, imported quietly there
from moeforge.train.tokenizer import ByteTokenizer

TOK = ByteTokenizer()  # vocab 257, eod 256
WINDOW = 17  # seq_len 15 + 1 + one MTP target


def write_dataset(prefix, docs):
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for d in docs:
        b.add_document(np.array([*d, TOK.eod], dtype=np.uint16), [len(d) + 1])
    b.finalize(f"{prefix}.idx")
    return str(prefix)


def random_docs(n, lo, hi, seed):
    """n documents of 3..60 tokens drawn from [lo, hi): two datasets with disjoint ranges tell their samples apart."""
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, rng.integers(3, 60)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    return (write_dataset(root / "a", random_docs(300, 0, 100, 0)),
            write_dataset(root / "b", random_docs(300, 100, 200, 1)))


def streams(blend, n_train, n_valid=32, dp_rank=0, dp_size=1, split="90,10,0", seed=0):
    d = DataConfig(blend=blend, split=split)
    train, valid = build_datasets(Corpus.open(d, TOK), d, WINDOW, seed, n_train, n_valid, log=lambda *a: None)
    return SampleStream(train, WINDOW, dp_rank, dp_size), SampleStream(valid, WINDOW, dp_rank, dp_size, "valid")


def test_samples_are_windows_of_the_concatenated_shuffled_documents(two):
    """Packing as TR §4.1: the split's documents, shuffled, concatenated with their EOD and cut into windows
    of seq_len + 1 + D tokens overlapping by one; the shuffle index orders the windows."""
    train, _ = streams([[1, two[0]]], 64)
    ds = train.dataset
    docs = [np.asarray(ds.dataset.get(int(i))) for i in ds.document_index]
    stream = np.concatenate(docs)
    for i in range(64):
        j = int(ds.shuffle_index[i])
        assert train.window_of(i).tolist() == stream[j * (WINDOW - 1): j * (WINDOW - 1) + WINDOW].tolist()
    rows = train.rows(0, 8)
    assert rows.shape == (8, WINDOW) and rows.dtype == torch.int64
    inputs, targets, mtp_in, mtp_tg = split_window(rows, n_mtp=1)
    assert inputs.shape == (8, WINDOW - 2) and torch.equal(targets[:, :-1], inputs[:, 1:])


def test_blend_shares_match_the_weights(two):
    """data.blend at 0.3 / 0.7: BlendedDataset's share of each source over the first n samples is within one
    sample of w·n; the rows' token ranges show where each came from."""
    train, valid = streams([[0.3, two[0]], [0.7, two[1]]], 2000)
    from_a = (train.rows(0, 2000)[:, 0] < 100).float().mean().item()
    assert abs(from_a - 0.3) < 0.02, from_a
    assert abs(np.mean(np.asarray(train.dataset.dataset_index[:2000]) == 0) - 0.3) <= 1 / 2000
    assert len(valid.dataset) >= 32


def test_data_parallel_ranks_read_contiguous_shares_of_the_same_global_batch(two):
    """The same global batch at dp 1, 2 and 4: rank r reads samples [c + r·B/dp, c + (r+1)·B/dp)."""
    blend = [[0.3, two[0]], [0.7, two[1]]]
    whole = streams(blend, 64)[0].rows(24, 16)
    for dp in (2, 4):
        parts = [streams(blend, 64, dp_rank=r, dp_size=dp)[0].rows(24, 16) for r in range(dp)]
        assert torch.equal(torch.cat(parts), whole)


def test_same_seed_same_samples_and_order_independent_of_the_run_length(two):
    """Within one epoch the sample order does not depend on how many samples the run asked for."""
    blend = [[1, two[0]]]
    assert torch.equal(streams(blend, 40)[0].rows(0, 40), streams(blend, 200)[0].rows(0, 40))
    assert not torch.equal(streams(blend, 40)[0].rows(0, 40), streams(blend, 40, seed=1)[0].rows(0, 40))


def test_reading_past_the_built_samples_is_an_error(two):
    train, _ = streams([[0.5, two[0]], [0.5, two[1]]], 100)
    with pytest.raises(IndexError, match="train sample"):
        train.rows(len(train.dataset), 4)


def test_bad_data_names_the_field(two, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.blend: .*missing.idx not found"):
        Corpus.open(DataConfig(blend=[[1, str(tmp_path / "missing")]]), TOK)
    shutil.copy(two[0] + ".idx", tmp_path / "lone.idx")  # an .idx without its .bin
    with pytest.raises(FileNotFoundError, match=r"data.blend: .*lone.bin not found"):
        Corpus.open(DataConfig(blend=[[1, str(tmp_path / "lone")]]), TOK)
    small = write_dataset(tmp_path / "small", random_docs(5, 0, 100, 2))
    with pytest.raises(ValueError, match=r"data.split='99,1,0': the valid range of .*small"):  # megatron would loop
        Corpus.open(DataConfig(blend=[[1, small]], split="99,1,0"), TOK)
    tokens = int(np.fromfile(small + ".bin", dtype=np.uint16).size)
    (tmp_path / "small.json").write_text(json.dumps({"tokenizer": "other", "tokenizer_sha256": "0" * 64, "eod": 1,
                                                     "vocab_size": 4096, "tokens": tokens, "documents": 5}))
    with pytest.raises(ValueError, match=r"prepared with tokenizer 'other', not data.tokenizer='bytes'"):
        Corpus.open(DataConfig(blend=[[1, small]], split="1,1"), TOK)


def test_corpus_statistics(two, tmp_path):
    c = Corpus.open(DataConfig(blend=[[0.5, two[0]], [0.5, two[1]]], split="90,10,0"), TOK)
    assert 0 < c.unigram_entropy() <= np.log(201) + 1e-9
    assert c.bytes_per_token() is None  # Megatron-LM's datasets carry no PREFIX.json


def test_a_model_vocab_smaller_than_the_tokenizer_fails_before_start():
    from moeforge.launcher.config import load_job_config
    from moeforge.train.build import check_layout

    with pytest.raises(ValueError, match=r"model.vocab_size=257 is smaller than the tokenizer's 4096 ids"):
        check_layout(load_job_config(["model.vocab_size=257"]), 1, 1)
    check_layout(load_job_config(["model.vocab_size=257", "data.tokenizer=bytes"]), 1, 1)
