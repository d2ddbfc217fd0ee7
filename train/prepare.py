"""Data preparation: text in, a megatron-core IndexedDataset out (PREFIX.bin, PREFIX.idx, PREFIX.json).

What goes in (`--input`, any number, read in the order given):
- a folder: every .py/.txt/.md/.rst file under it, sorted (site-packages and __pycache__ skipped), each
  file one document; files that are not UTF-8 are skipped and listed in PREFIX.json;
- such a file on its own: one document;
- .jsonl, .jsonl.gz, .jsonl.zst: one JSON object per line, the document in its `text_key` field
  (blank lines skipped); a bad line stops the run naming FILE:LINE;
- .parquet: the `text_key` column, read by row batches.

What comes out is what Megatron-LM's tools/preprocess_data.py writes, through the same class
(`IndexedDatasetBuilder`): PREFIX.bin holds the token ids, uint16 for vocabularies under 65,500 and int32
above (megatron's `DType.optimal_dtype`), one sequence per document, each ending with the tokenizer's
end-of-document id; PREFIX.idx holds the lengths and offsets. PREFIX.json adds what the sampler checks
before training (tokenizer and its fingerprint, vocab_size, eod, counts, sources). Files are written
under temporary names and renamed .bin, .json, then .idx: an .idx is the mark of a whole dataset, and
`describe` refuses anything less.

How it streams (memory stays flat whatever the input size): the main process reads the inputs in order
and cuts them into chunks of ~1 MB of text (jsonl lines go raw: the workers parse them) and puts them
on a queue of 2 x workers chunks. Each worker process tokenizes a chunk with `encode_batch` and writes
it as its own small IndexedDataset (PREFIX.parts/<chunk>); the main process appends the parts in chunk
order with `IndexedDatasetBuilder.add_index` and deletes them. The output is therefore byte-identical
for any number of workers; with workers=1 everything runs in this process.

Fill-in-the-Middle (TR §4.1, document level, before packing). With `fim_rate` r, each document is
chosen with probability r and cut at two character positions drawn uniformly (as Megatron-LM and
Bavarian et al. 2022 do) into prefix, middle, suffix, laid out PSM:
`<｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <eos>`. The draw is a hash of (seed,
document index), so it does not depend on workers or chunking.
"""
from __future__ import annotations

import gc
import gzip
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import sys
import sysconfig
import traceback
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from tqdm import tqdm

from .tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, FIM_TOKENS, Tokenizer, load_tokenizer


@contextmanager
def _quiet(logger: str):
    """`logger` at WARNING and warnings off for the block: megatron-core warns and logs at import that
    TransformerEngine and Apex are absent (irrelevant to its datasets) and logs 8 INFO lines per index
    it opens (one per merged part)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


with _quiet("megatron"):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


def default_corpus_dir() -> Path:
    """The running interpreter's standard library: real text on every machine with Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(TEXT_SUFFIXES)]
    if not files:
        raise ValueError(f"--input {root}: no {'/'.join(TEXT_SUFFIXES)} files under it (for .jsonl or "
                         ".parquet files, pass the files themselves: --input DIR/*.parquet)")
    return files


def input_files(inputs: Iterable[str | Path] | None) -> list[Path]:
    """The files `inputs` name, folders expanded, in order; None means the standard library."""
    out = []
    for given in inputs or [default_corpus_dir()]:
        path = Path(given).expanduser()
        if path.is_dir():
            out += text_files(path)
        elif not path.is_file():
            raise FileNotFoundError(f"--input {given}: no such file or folder")
        elif not path.name.lower().endswith((*TEXT_SUFFIXES, *JSONL_SUFFIXES, ".parquet")):
            raise ValueError(f"--input {given}: not a folder, {', '.join(JSONL_SUFFIXES)}, .parquet or "
                             f"{'/'.join(TEXT_SUFFIXES)} file")
        else:
            out.append(path)
    return out


@dataclass
class _Chunk:
    """Consecutive documents: texts, or raw lines of one jsonl file (`source`, from line `first_line`)."""

    index: int
    first_doc: int
    items: list
    source: str | None
    first_line: int


class _Chunker:
    def __init__(self, chunk_bytes: int):
        self.chunk_bytes, self.index, self.doc, self.items, self.size = chunk_bytes, 0, 0, [], 0
        self.source, self.first_line = None, 0

    def add(self, item, size: int, source: str | None = None, line: int = 0) -> Iterator[_Chunk]:
        """Append one document (a text, or a jsonl line of `source`); yield the chunks this completes."""
        if self.items and source != self.source:  # a chunk holds texts or one file's lines, not both
            yield self.cut()
        if not self.items:
            self.source, self.first_line = source, line
        self.items.append(item)
        self.size += size
        if self.size >= self.chunk_bytes:
            yield self.cut()

    def cut(self) -> _Chunk:
        chunk = _Chunk(self.index, self.doc, self.items, self.source, self.first_line)
        self.index, self.doc, self.items, self.size = self.index + 1, self.doc + len(self.items), [], 0
        return chunk


def _chunks(files: list[Path], text_key: str, chunk_bytes: int, skipped: list[str], advance) -> Iterator[_Chunk]:
    """The documents of `files` in order, cut into chunks; `advance(n)` reports n more input bytes read."""
    chunker = _Chunker(chunk_bytes)
    for path in files:
        name, size = path.name.lower(), path.stat().st_size
        if name.endswith(TEXT_SUFFIXES):
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(str(path))
            else:
                yield from chunker.add(text, len(text))
            advance(size)
        elif name.endswith(".parquet"):
            yield from _parquet(path, text_key, chunker, advance)
        else:
            with open(path, "rb") as raw:
                lines = (gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else
                         io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
                         if name.endswith(".zst") else raw)
                done = 0
                for n, line in enumerate(lines, 1):
                    for chunk in chunker.add(line, len(line), str(path), n):
                        advance(raw.tell() - done)
                        done = raw.tell()
                        yield chunk
                advance(size - done)
    if chunker.items:
        yield chunker.cut()


def _parquet(path: Path, text_key: str, chunker: _Chunker, advance) -> Iterator[_Chunk]:
    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_key!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                         "name the text column with --text-key")
    rows, total, size = 0, max(pf.metadata.num_rows, 1), path.stat().st_size
    for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
        col = batch.column(0)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise ValueError(f"{path}: column {text_key!r} holds {col.type}, not text")
        if col.null_count:
            raise ValueError(f"{path}: row {rows + col.is_null().to_pylist().index(True)}: {text_key!r} is null")
        for text in col.to_pylist():
            yield from chunker.add(text, len(text))
        advance(size * (rows + len(col)) // total - size * rows // total)
        rows += len(col)


def _texts(chunk: _Chunk, text_key: str) -> list[tuple[int, str]]:
    """(document index, text) of every document in `chunk`: jsonl lines parsed, errors naming FILE:LINE."""
    if chunk.source is None:
        return list(enumerate(chunk.items, chunk.first_doc))
    out = []
    for i, line in enumerate(chunk.items):
        if line.isspace():
            continue
        where = f"{chunk.source}:{chunk.first_line + i}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not a JSON line ({e})") from None
        if not isinstance(record, dict) or text_key not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: no {text_key!r} key (has: {keys}); name the text field with --text-key")
        if not isinstance(record[text_key], str):
            raise ValueError(f"{where}: {text_key!r} is {type(record[text_key]).__name__}, not a string")
        out.append((chunk.first_doc + i, record[text_key]))
    return out


def documents(inputs: Iterable[str | Path] | None, text_key: str = "text",
              skipped: list[str] | None = None) -> Iterator[str]:
    """Every document's text, in order, read as `prepare` reads them (e.g. to train a tokenizer); the
    files skipped as not UTF-8 are appended to `skipped`."""
    skipped = [] if skipped is None else skipped
    for chunk in _chunks(input_files(inputs), text_key, 1 << 20, skipped, lambda n: None):
        yield from (text for _, text in _texts(chunk, text_key))


def fim_split(text: str, seed: int, doc: int, rate: float) -> tuple[str, str, str] | None:
    """(prefix, suffix, middle) of document `doc` if the (seed, doc) hash picks it for FIM, else None."""
    h = hashlib.blake2b(f"{seed}/{doc}".encode(), digest_size=24).digest()
    if int.from_bytes(h[:8], "little") >= rate * 2**64:
        return None
    n = len(text) + 1
    i, j = sorted((int.from_bytes(h[8:16], "little") % n, int.from_bytes(h[16:], "little") % n))
    return text[:i], text[j:], text[i:j]


def _write_chunk(chunk: _Chunk, tok: Tokenizer, text_key: str, fim_rate: float, seed: int,
                 builder: IndexedDatasetBuilder) -> np.ndarray:
    """Tokenize `chunk` into `builder`, one sequence per document; [documents, tokens, fim documents, chars]."""
    fim_ids = [tok.token_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END)]
    plan, pieces, chars = [], [], 0
    for doc, text in _texts(chunk, text_key):
        split = fim_split(text, seed, doc, fim_rate) if fim_rate else None
        plan.append(split is not None)
        pieces += split or [text]
        chars += len(text)
    ids = iter(tok.encode_batch(pieces))
    tokens = 0
    for fim in plan:
        if fim:
            begin, hole, end = fim_ids
            prefix, suffix, middle = next(ids), next(ids), next(ids)
            seq = [begin, *prefix, hole, *suffix, end, *middle, tok.eod]
        else:
            seq = next(ids)
            seq.append(tok.eod)
        builder.add_document(np.array(seq, dtype=builder.dtype), [len(seq)])
        tokens += len(seq)
    return np.array([len(plan), tokens, sum(plan), chars], dtype=np.int64)


def _worker(tok, text_key, fim_rate, seed, dtype, parts: Path, tasks, results):
    """Write each chunk from `tasks` as the IndexedDataset parts/<index>; report (index, counts, error);
    stop at the first error."""
    while (chunk := tasks.get()) is not None:
        try:
            part = str(parts / f"{chunk.index:08d}")
            builder = IndexedDatasetBuilder(part + ".bin", dtype=dtype)
            counts = _write_chunk(chunk, tok, text_key, fim_rate, seed, builder)
            builder.finalize(part + ".idx")
            results.put((chunk.index, counts, None))
        except Exception as e:
            error = (str(e), True) if isinstance(e, ValueError) else (traceback.format_exc(), False)
            results.put((chunk.index, None, error))
            return


class _Workers:
    """`n` processes that write the chunks they are given as parts/<index>; `run` feeds them and appends
    the parts to a builder in chunk order. Started before any thread of ours (the progress bar's)."""

    def __init__(self, n: int, parts: Path, args: tuple):
        # fork: the workers inherit the loaded tokenizer and megatron-core (~5 s to import again). The
        # tokenizers library's own threads are off in them (one process per core), set before the fork.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.parts, self.tasks, self.results = parts, ctx.Queue(maxsize=2 * n), ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(*args, parts, self.tasks, self.results), daemon=True)
                      for _ in range(n)]
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            for p in self.procs:
                p.start()
        finally:
            if before is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
        self.pending, self.merged, self.finished = {}, 0, False

    def run(self, chunks: Iterator[_Chunk], builder: IndexedDatasetBuilder, counted) -> None:
        sent = 0
        for chunk in chunks:
            self._put(chunk, builder, counted)
            sent += 1
        for _ in self.procs:
            self._put(None, builder, counted)
        while self.merged < sent:
            self._collect(0.1, builder, counted)
        self.finished = True

    def close(self):
        """Wait for the workers to exit; kill them if `run` did not finish (an error, an interrupt)."""
        for p in self.procs:
            if not self.finished:
                p.kill()
            p.join()
        self.tasks.cancel_join_thread()

    def _put(self, item, builder, counted):
        while True:
            try:
                return self.tasks.put(item, timeout=0.1)
            except queue.Full:
                self._collect(0, builder, counted)

    def _collect(self, wait: float, builder, counted):
        """Take the finished chunks (waiting up to `wait` s for the first); append those now in order."""
        try:
            while True:
                index, counts, error = self.results.get(timeout=wait)
                if error is not None:  # (message, whether a ValueError: bad input rather than a bug)
                    raise ValueError(error[0]) if error[1] else RuntimeError(f"prepare worker:\n{error[0]}")
                self.pending[index] = counts
                wait = 0
        except queue.Empty:
            dead = [p.exitcode for p in self.procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"prepare: a worker died (exit code {dead[0]}; out of memory?)") from None
        while self.merged in self.pending:
            part = str(self.parts / f"{self.merged:08d}")
            builder.add_index(part)
            os.remove(part + ".bin")
            os.remove(part + ".idx")
            counted(self.pending.pop(self.merged))
            self.merged += 1


@contextmanager
def _megatron_quiet():
    """Quiet megatron-core's indexes, and make `add_index`'s full gc.collect() per part cheap (~0.2 s
    each with torch and megatron-core loaded): freezing the objects alive now leaves it only new ones."""
    gc.freeze()
    try:
        with _quiet("megatron.core.datasets.indexed_dataset"):
            yield
    finally:
        gc.unfreeze()


def prepare(inputs: Iterable[str | Path] | None, tokenizer: str | Tokenizer, output_prefix: str | Path,
            workers: int = 1, text_key: str = "text", fim_rate: float = 0.0, seed: int = 0,
            chunk_bytes: int = 1 << 20, progress: bool = True, log=print) -> dict:
    """Tokenize `inputs` (None: the standard library) into OUTPUT_PREFIX.{bin,idx,json}; return the json.

    `chunk_bytes` is the unit of work and of ordering (documents are never split).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if workers < 1:
        raise ValueError(f"--workers {workers}: at least 1")
    if not 0 <= fim_rate <= 1:
        raise ValueError(f"--fim-rate {fim_rate}: a probability in [0, 1]")
    missing = [t for t in FIM_TOKENS if tok.token_id(t) is None] if fim_rate else []
    if missing:
        raise ValueError(f"--fim-rate {fim_rate} needs the tokenizer's FIM tokens; {tok.spec} lacks "
                         f"{', '.join(missing)} (`moeforge data train-tokenizer` adds them)")
    files = input_files(inputs)
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = {ext: f"{prefix}.{ext}.tmp" for ext in ("bin", "idx", "json")}
    parts = Path(prefix + ".parts")
    dtype = DType.optimal_dtype(tok.vocab_size)
    skipped, totals = [], np.zeros(4, dtype=np.int64)
    pool, bar = None, None
    try:
        with _megatron_quiet():
            builder = IndexedDatasetBuilder(tmp["bin"], dtype=dtype)
            if workers > 1:
                shutil.rmtree(parts, ignore_errors=True)
                parts.mkdir()
                pool = _Workers(workers, parts, (tok, text_key, fim_rate, seed, dtype))
            bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="prepare",
                       file=sys.stderr, disable=not progress)

            def counted(counts):
                totals[:] += counts
                bar.set_postfix(docs=f"{totals[0]:,}", tokens=f"{totals[1]:,}", refresh=False)

            chunks = _chunks(files, text_key, chunk_bytes, skipped, bar.update)
            if pool is None:
                for chunk in chunks:
                    counted(_write_chunk(chunk, tok, text_key, fim_rate, seed, builder))
            else:
                pool.run(chunks, builder, counted)
            builder.finalize(tmp["idx"])
        n_docs, n_tokens, n_fim, n_chars = map(int, totals)
        if not n_docs:
            raise ValueError(f"--input {' '.join(map(str, inputs or [default_corpus_dir()]))}: no documents")
        meta = {"format": "megatron-core IndexedDataset", "tokenizer": tok.spec, "tokenizer_sha256": tok.fingerprint,
                "vocab_size": tok.vocab_size, "eod": tok.eod, "dtype": np.dtype(dtype).name,
                "documents": n_docs, "tokens": n_tokens, "characters": n_chars, "text_key": text_key,
                "fim_rate": fim_rate, "fim_documents": n_fim, "seed": seed,
                "sources": [{"path": str(f), "bytes": f.stat().st_size} for f in files], "skipped": skipped}
        Path(tmp["json"]).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        Path(prefix + ".idx").unlink(missing_ok=True)  # an old .idx must not pair with the new .bin
        for ext in ("bin", "json", "idx"):
            os.replace(tmp[ext], f"{prefix}.{ext}")
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
        shutil.rmtree(parts, ignore_errors=True)
        for path in tmp.values():
            Path(path).unlink(missing_ok=True)
    log(f"prepare: {n_docs:,} documents, {n_tokens:,} tokens ({n_chars / n_tokens:.2f} characters/token, "
        f"{tok.spec}, {meta['dtype']}) -> {prefix}.bin/.idx/.json"
        + (f"; skipped {len(skipped)} files that are not UTF-8" if skipped else ""))
    return meta


def describe(prefix: str | Path) -> dict:
    """Check that PREFIX is a whole IndexedDataset (ours or Megatron-LM's) and summarize it: dtype,
    documents, sequences, tokens, and PREFIX.json's metadata where there is one (else None)."""
    prefix = str(prefix)
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    if not idx.is_file():
        left = [p.name for p in (bin_, Path(prefix + ".bin.tmp"), Path(prefix + ".parts")) if p.exists()]
        raise FileNotFoundError(f"{idx} not found" + (f" ({', '.join(left)} exist: an unfinished `moeforge data "
                                                     "prepare`; run it again)" if left else ""))
    if not bin_.is_file():
        raise FileNotFoundError(f"{bin_} not found (its index {idx} exists)")
    with open(idx, "rb") as f:
        if f.read(9) != b"MMIDIDX\x00\x00":
            raise ValueError(f"{idx} is not a megatron-core IndexedDataset index")
    with _megatron_quiet():
        ds = IndexedDataset(prefix)
        lengths, dtype, docs = ds.sequence_lengths, ds.index.dtype, len(ds.document_indices) - 1
    tokens = int(lengths.sum(dtype=np.int64))
    if bin_.stat().st_size != tokens * np.dtype(dtype).itemsize:
        raise ValueError(f"{bin_} holds {bin_.stat().st_size:,} bytes but {idx} describes {tokens:,} "
                         f"{np.dtype(dtype).name} tokens: truncated, or from another prepare")
    meta_path = Path(prefix + ".json")
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    if meta is not None and (meta["tokens"], meta["documents"]) != (tokens, docs):
        raise ValueError(f"{meta_path} describes {meta['documents']:,} documents / {meta['tokens']:,} tokens, "
                         f"{idx} {docs:,} / {tokens:,}: from different runs")
    return {"prefix": prefix, "dtype": np.dtype(dtype).name, "documents": docs, "sequences": len(lengths),
            "tokens": tokens, "meta": meta}
