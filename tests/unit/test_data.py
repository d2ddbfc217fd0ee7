"""Byte tokenizer, prepare, and the deterministic, resumable, dp-sliceable sampler."""
import json

import numpy as np
import pytest
import torch

from moeforge.model.loss import split_window
from moeforge.train.data import EOT, TokenSampler, decode, encode, prepare


@pytest.fixture()
def corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i}  # é\n" * 20)
    (src / "binary.py").write_bytes(b"\xff\xfe not utf-8")
    out = tmp_path / "tok"
    meta = prepare(src, out, val_fraction=0.2, log=lambda *a: None)
    return src, out, meta


def test_roundtrip_and_vocab():
    s = "print('héllo')\n"
    assert decode(encode(s)) == s and max(encode(s)) < 256 and EOT == 256


def test_prepare_writes_splits_and_meta(corpus):
    src, out, meta = corpus
    assert json.loads((out / "meta.json").read_text()) == meta
    train = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(out / "val.bin", dtype=meta["dtype"])
    assert meta["dtype"] == "uint16" and train.size == meta["train_tokens"] and val.size > 0
    total = sum(len(p.read_bytes()) + 1 for p in src.glob("m*.py"))  # +1 <eot> per document
    assert train.size + val.size == total  # the non-UTF-8 file is skipped
    counts = np.bincount(np.concatenate([train, val]), minlength=257)
    p = counts[counts > 0] / counts.sum()
    assert meta["unigram_entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()))


def test_prepare_rejects_empty_input(tmp_path):
    with pytest.raises(ValueError, match="data.input"):
        prepare(tmp_path, tmp_path / "out", log=lambda *a: None)


def test_sampler_is_deterministic_and_dp_slices_the_global_batch(corpus):
    _, out, _ = corpus
    full = TokenSampler(str(out), "train", window=33, global_batch=8, seed=5)
    again = TokenSampler(str(out), "train", window=33, global_batch=8, seed=5)
    assert torch.equal(full.batch(3), again.batch(3)) and not torch.equal(full.batch(3), full.batch(4))
    parts = [TokenSampler(str(out), "train", window=33, global_batch=8, seed=5, dp_rank=r, dp_size=4).batch(3)
             for r in range(4)]
    assert torch.equal(torch.cat(parts), full.batch(3))


def test_split_window_offsets():
    rows = torch.arange(10).view(1, 10)  # T = 10 - 1 - 2 = 7
    inputs, targets, mtp_in, mtp_tg = split_window(rows, n_mtp=2)
    assert inputs.tolist() == [[0, 1, 2, 3, 4, 5, 6]] and targets.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert mtp_in[0].tolist() == [[1, 2, 3, 4, 5, 6, 7]] and mtp_tg[0].tolist() == [[2, 3, 4, 5, 6, 7, 8]]
    assert mtp_in[1].tolist() == [[2, 3, 4, 5, 6, 7, 8]] and mtp_tg[1].tolist() == [[3, 4, 5, 6, 7, 8, 9]]
