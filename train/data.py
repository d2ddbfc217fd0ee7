"""Training data: megatron-core indexed datasets, sampled by megatron-core's GPTDataset, addressed by the
number of samples consumed.

Datasets. A dataset is a PREFIX: PREFIX.bin (token ids, documents back to back, each ending with the
tokenizer's end-of-document id) and PREFIX.idx (lengths and offsets), megatron-core's IndexedDataset as
`moeforge data prepare` (train/prepare.py) and Megatron-LM's tools/preprocess_data.py write it; ours add
PREFIX.json (tokenizer fingerprint, vocab_size, eod, counts). The default corpus is `data.dir/<tokenizer>`,
prepared from the standard library on first use (`ensure_data`, below); `data.blend` names any
others, with weights.

Samples (megatron-core's GPTDataset; packing as TR §4.1). `data.split` cuts each dataset's documents
into a train and a valid range. For each range three indices are built: the document index (its
documents, shuffled), the sample index (the shuffled documents concatenated, EOD between them, and cut
into windows of sequence_length + 1 tokens that overlap by one) and the shuffle index (a permutation of
the windows). No attention mask stops at document boundaries, as in the report. A window here is
seq_len + 1 + D tokens (inputs, next-token targets, D MTP targets: model/loss.py split_window), so
GPTDataset's sequence_length is seq_len + D. With a blend, BlendedDataset interleaves the datasets so that
after any n samples dataset i has given within one of w_i·n. The indices are built once (C++ helpers in the
megatron-core wheel) and saved as .npy files under `data.cache`, named by a hash of everything that
defines them; megatron-core's builder makes rank 0 build them while the others wait at a barrier, then
every rank memory-maps them. BlendedDataset asks torch.distributed for the rank unguarded, so a single
process builds inside a 1-rank gloo group (`_rank_group`).

Where a run is. Train sample i is `dataset[i]`, so the data position is one integer, the samples
consumed: global batch k of B_k sequences takes samples [c_k, c_k + B_k), c_k = B_0 + ... + B_{k-1}, and
data-parallel rank r its contiguous share [c_k + r·B_k/dp, c_k + (r+1)·B_k/dp). Checkpoints save c; a
resumed run, a run resumed at another dp and a run whose batch ramps (train/batches.py) all read each sample
index exactly once. The indices cover the samples of the whole run (train.steps steps); within one epoch
of the data the order does not depend on train.steps. Validation reads valid samples
[0, eval_batches · global_batch_size) at every evaluation.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .batches import rank_samples
from .config import DataConfig, split_shares
from .prepare import _quiet, default_corpus_dir, describe, documents, input_files, prepare
from .tokenizer import Tokenizer

with _quiet("megatron"):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

ENTROPY_TOKENS = 1 << 26  # the unigram entropy is counted over at most this many tokens of each dataset

def tokenizer_name(spec: str) -> str:
    """The file name a tokenizer's copy of the default corpus gets: `bytes`, a shipped name, a file's stem,
    or a folder's name (and a tokenizer.json's folder's)."""
    path = Path(spec)
    return path.parent.name if path.name == "tokenizer.json" else path.name.removesuffix(".json")


def default_prefix(d: DataConfig) -> str:
    return str(Path(d.dir) / tokenizer_name(d.tokenizer))


def blend_of(d: DataConfig) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights); weights None for one dataset (GPTDataset itself, no BlendedDataset around it)."""
    if d.blend is None:
        return [default_prefix(d)], None
    return [str(p) for _, p in d.blend], [float(w) for w, _ in d.blend] if len(d.blend) > 1 else None


@dataclass(frozen=True)
class Corpus:
    """The datasets a run reads, checked against the tokenizer: what sampling and the metrics need."""

    prefixes: list[str]
    weights: list[float] | None
    vocab_size: int
    eod: int
    metas: list[dict | None]  # each PREFIX.json (None for a Megatron-LM dataset)
    lengths: list[np.ndarray]  # each dataset's sequence (document) lengths

    @classmethod
    def open(cls, d: DataConfig, tok: Tokenizer) -> "Corpus":
        """Check every dataset is whole, fits the tokenizer, and has tokens in both split ranges."""
        prefixes, weights = blend_of(d)
        field = "data.dir" if d.blend is None else "data.blend"
        metas, lengths = [], []
        shares = split_shares(d.split)
        for prefix in prefixes:
            try:
                info = describe(prefix)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{field}: {e}") from None
            meta = info["meta"]
            if meta is not None and meta.get("tokenizer_sha256") != tok.fingerprint:
                raise ValueError(f"{field}: {prefix} was prepared with tokenizer {meta.get('tokenizer')!r}, "
                                 f"not data.tokenizer={tok.spec!r} (a different vocabulary)")
            if meta is not None and meta["eod"] != tok.eod:
                raise ValueError(f"{field}: {prefix} ends documents with id {meta['eod']}, "
                                 f"data.tokenizer's eod is {tok.eod}")
            with _quiet("megatron"):
                ds = IndexedDataset(prefix)
                seq = np.array(ds.sequence_lengths)  # a copy: the index's mmap closes with `ds`
            for name, (lo, hi) in zip(("train", "valid"), _split_ranges(shares, len(seq))):
                if seq[lo:hi].sum() == 0:
                    raise ValueError(f"data.split={d.split!r}: the {name} range of {prefix} (documents {lo}..{hi} of "
                                     f"{len(seq)}) holds no tokens; give it more documents or another split")
            metas.append(meta)
            lengths.append(seq)
        return cls(prefixes, weights, tok.vocab_size, tok.eod, metas, lengths)

    def shares(self) -> list[float]:
        w = self.weights or [1.0]
        return [x / sum(w) for x in w]

    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per token of the blend (each dataset's, weighted by its share of the tokens); None
        when a dataset's PREFIX.json does not record its bytes."""
        if any(m is None or "bytes" not in m for m in self.metas):
            return None
        return sum(s * m["bytes"] / m["tokens"] for s, m in zip(self.shares(), self.metas))

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the blend's token frequencies: the loss of a model that knows only them.
        Each dataset counts its first ENTROPY_TOKENS tokens."""
        p = np.zeros(self.vocab_size)
        for share, prefix in zip(self.shares(), self.prefixes):
            with _quiet("megatron"):
                dtype = IndexedDataset(prefix).index.dtype
            tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")[:ENTROPY_TOKENS]
            counts = np.bincount(tokens, minlength=self.vocab_size)[:self.vocab_size]
            p += share * counts / counts.sum()
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())


def _split_ranges(shares: list[float], n: int) -> list[tuple[int, int]]:
    """[(lo, hi)] document ranges of train and valid, rounded as megatron-core's builder rounds them."""
    total, edges = sum(shares), [0.0]
    for s in shares:
        edges.append(edges[-1] + s / total)
    return [(int(round(edges[i] * n)), int(round(edges[i + 1] * n))) for i in range(2)]


class _TokenIds:
    """What GPTDataset reads of a tokenizer: the vocabulary size (token dtype), eod, and no pad id (so it
    never rewrites a token), plus the identifiers it hashes into the cache names."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod
        self.unique_identifiers = {"class": "moeforge", "vocab_size": vocab_size, "eod": eod}


@contextmanager
def _rank_group():
    """A 1-rank gloo group (in-memory store) for the build when this process is alone."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_datasets(corpus: Corpus, d: DataConfig, window: int, seed: int, n_train: int, n_valid: int,
                   log=print) -> tuple:
    """(train, valid) megatron-core datasets of at least n_train / n_valid windows of `window` tokens.
    Collective when torch.distributed is initialized (megatron-core's rank-0-first build and barriers)."""
    cache = d.cache or str(Path(corpus.prefixes[0]).parent / "cache")
    t0 = time.perf_counter()
    with _quiet("megatron"), _rank_group():
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=window - 1, blend=(corpus.prefixes, corpus.weights),
            split=",".join(f"{x:g}" for x in split_shares(d.split)), path_to_cache=cache,
            tokenizer=_TokenIds(corpus.vocab_size, corpus.eod), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n_train, n_valid, 0], lambda: True, config).build()
    log(f"data: {len(train):,} train / {len(valid):,} valid samples of {window} tokens from "
        + ", ".join(f"{p} ({s:.0%})" for p, s in zip(corpus.prefixes, corpus.shares()))
        + f"; indices in {cache} ready in {time.perf_counter() - t0:.2f}s")
    return train, valid


class SampleStream:
    """This dp rank's rows of one split: `rows(first, global_batch)` is [global_batch/dp, window] int64,
    samples `rank_samples(first, global_batch, dp_rank, dp_size)` of the dataset."""

    def __init__(self, dataset, window: int, dp_rank: int = 0, dp_size: int = 1, name: str = "train"):
        self.dataset, self.window, self.dp_rank, self.dp_size, self.name = dataset, window, dp_rank, dp_size, name

    def rows(self, first: int, global_batch: int) -> torch.Tensor:
        ids = rank_samples(first, global_batch, self.dp_rank, self.dp_size)
        if ids.stop > len(self.dataset):
            raise IndexError(f"data: {self.name} sample {ids.stop - 1} asked of {len(self.dataset)} built "
                             f"(the indices cover train.steps' samples)")
        return torch.stack([self.window_of(i) for i in ids])

    def window_of(self, i: int) -> torch.Tensor:
        s = self.dataset[i]  # tokens = window[:-1], labels = window[1:]
        return torch.cat([s["tokens"], s["labels"][-1:]])


def _hashed_order(given: str | None) -> list[Path]:
    """The files of data.input (None: the standard library) ordered by a hash of their path below it:
    a stable shuffle, the same on every machine."""
    base = Path(given) if given else default_corpus_dir()
    files = input_files([base])
    root = base if base.is_dir() else base.parent
    return sorted(files, key=lambda f: hashlib.sha1(str(f.relative_to(root)).encode()).hexdigest())


def ensure_data(d: DataConfig, seed: int, log=print) -> None:
    """The default corpus on first use (rank 0 calls it; the trainer's barrier holds the others):
    data.input (None: the standard library's sources) prepared with data.tokenizer into
    data.dir/<tokenizer>.{bin,idx,json} (train/prepare.py). With data.blend there is nothing to prepare.
    The files go in an order hashed from their paths: data.split cuts contiguous document ranges, which
    on sorted files would make xml/, xmlrpc/ and zoneinfo/ the stdlib's whole validation split."""
    if d.blend is not None:
        return
    prefix = default_prefix(d)
    if not Path(prefix + ".idx").is_file():
        log(f"data: {prefix} not prepared yet; tokenizing {d.input or 'the Python standard library'} "
            f"with {d.tokenizer}")
        prepare(_hashed_order(d.input), d.tokenizer, prefix, workers=min(8, os.cpu_count() or 1),
                fim_rate=d.fim_rate, seed=seed, progress=False, log=log)
    meta_path = Path(prefix + ".json")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if "bytes" not in meta:  # the UTF-8 bytes of the documents, for losses in nats per byte
        meta["bytes"] = sum(len(text.encode()) for text in documents(_hashed_order(d.input), meta["text_key"]))
        tmp = meta_path.with_name(meta_path.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, meta_path)
