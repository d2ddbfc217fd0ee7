"""Token data: `prepare` turns a folder of text into memory-mapped token files; `TokenSampler` serves
deterministic, resumable batches from them.

Tokenizer: plain bytes (ids 0..255) plus one <eot> id (256) between documents. It needs no training
and no download, every corpus is representable, and the tiny model learns it in minutes; the price
is ~3-4x more tokens per text than a BPE. Files are uint16 when the vocab fits, uint32 otherwise.

Default corpus: the running interpreter's standard library `.py` sources — real text present on
every machine with Python.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


EOT = 256
VOCAB_SIZE = 257


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def default_corpus_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _corpus_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith((".py", ".txt", ".md", ".rst"))]
    if not files:
        raise ValueError(f"data.input={str(root)!r}: no .py/.txt/.md/.rst files found")
    return files


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def prepare(input_dir: str | Path | None, output_dir: str | Path, val_fraction: float = 0.01,
            max_bytes: int | None = None, log=print) -> dict:
    """Tokenize every text file under input_dir into output_dir/{train,val}.bin + meta.json.

    Documents go to validation by a hash of their relative path (stable across machines and file
    order). meta.json is written last, so a folder without it is an unfinished prepare.
    """
    root = Path(input_dir) if input_dir else default_corpus_dir()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(VOCAB_SIZE)
    splits = {"train": [], "val": []}
    n_bytes = 0
    counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
    for path in _corpus_files(root):
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if max_bytes is not None and n_bytes + len(data) > max_bytes:
            break
        n_bytes += len(data)
        rel = str(path.relative_to(root))
        bucket = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        arr = np.frombuffer(data, dtype=np.uint8).astype(dtype)
        split = "val" if bucket < val_fraction else "train"
        splits[split].append(arr)
        splits[split].append(np.array([EOT], dtype=dtype))
        counts += np.bincount(arr, minlength=VOCAB_SIZE)
        counts[EOT] += 1
    meta = {"tokenizer": "bytes", "vocab_size": VOCAB_SIZE, "dtype": np.dtype(dtype).name, "source": str(root)}
    for split, parts in splits.items():
        if not parts:
            raise ValueError(f"data: the {split} split is empty (data.val_fraction={val_fraction}, source {root})")
        tokens = np.concatenate(parts)
        tmp = out / f"{split}.bin.tmp"
        tokens.tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
        meta[f"{split}_tokens"] = int(tokens.size)
    p = counts[counts > 0] / counts.sum()
    meta["unigram_entropy_nats"] = float(-(p * np.log(p)).sum())
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(out / "meta.json.tmp", out / "meta.json")
    log(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens from {root} -> {out} "
        f"(unigram entropy {meta['unigram_entropy_nats']:.3f} nats/token)")
    return meta


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"data.dir={str(data_dir)!r} has no meta.json: run `moeforge data prepare`")
    return json.loads(path.read_text())


@dataclass
class TokenSampler:
    """Random windows of seq_len+1+D tokens (inputs, next-token targets, D MTP targets).

    Batch `step` is a pure function of (seed, split, step): a generator seeded from them draws the
    offsets of the whole *global* batch, and data-parallel rank r takes rows [r*n, (r+1)*n). So the
    same config on 1 or N ranks sees the same tokens, and resuming needs only the step number.
    """

    data_dir: str
    split: str
    window: int
    global_batch: int
    seed: int
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self):
        meta = load_meta(self.data_dir)
        self.tokens = np.memmap(Path(self.data_dir) / f"{self.split}.bin", dtype=meta["dtype"], mode="r")
        if self.tokens.size <= self.window:
            raise ValueError(f"data: {self.split} split has {self.tokens.size} tokens, fewer than a window of {self.window}")
        if self.global_batch % self.dp_size:
            raise ValueError(f"global batch {self.global_batch} not divisible by dp={self.dp_size}")

    def batch(self, step: int) -> torch.Tensor:
        """[global_batch/dp, window] int64 rows of this rank for `step`."""
        salt = 0 if self.split == "train" else 1
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 2 + salt)
        offsets = torch.randint(0, self.tokens.size - self.window, (self.global_batch,), generator=g)
        n = self.global_batch // self.dp_size
        rows = [torch.from_numpy(self.tokens[o: o + self.window].astype(np.int64))
                for o in offsets[self.dp_rank * n:(self.dp_rank + 1) * n].tolist()]
        return torch.stack(rows)


def unigram_entropy(meta: dict) -> float:
    return meta.get("unigram_entropy_nats", math.nan)
