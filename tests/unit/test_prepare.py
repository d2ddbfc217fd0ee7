"""Data preparation: every input kind read back through megatron-core's own IndexedDataset, the same
output for any number of workers, errors that name FILE:LINE, nothing half-written taken for whole, a
Megatron-LM-written dataset accepted, and document-level FIM at its rate and in PSM form."""
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from moeforge.launcher.cli import main
from moeforge.train.prepare import describe, fim_split, prepare
from moeforge.train.tokenizer import EOS, FIM_BEGIN, FIM_END, FIM_HOLE, ByteTokenizer, train_tokenizer

DOCS = [f"def f{i}(x):\n    return x * {i}  # é{'✓' * (i % 3)}\n" * (1 + i % 4) for i in range(40)] + ["", "ünï"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_tokenizer(DOCS, 300, tmp_path_factory.mktemp("tok") / "tok.json")


def quiet(**kw):
    return dict(progress=False, log=lambda *a: None, **kw)


def read(prefix) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    assert len(ds.document_indices) - 1 == len(ds)  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def expected(tok, texts):
    return [tok.encode(t) + [tok.eod] for t in texts]


def write_jsonl(path: Path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_a_text_folder(bpe, tmp_path):
    """Each file is a document, in sorted path order; files that are not UTF-8 are skipped and listed."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, text in enumerate(DOCS):
        (src / ("sub" if i % 2 else "") / f"m{i:02d}.py").write_text(text, encoding="utf-8")
    (src / "latin1.txt").write_bytes(b"caf\xe9")
    (src / "ignored.json").write_text("{}")
    files = sorted(p for p in src.rglob("*.py"))
    files = [p for p in files if p.parent == src] + [p for p in files if p.parent != src]  # a folder's files first
    meta = prepare([src], bpe, tmp_path / "out" / "docs", **quiet())
    assert read(tmp_path / "out" / "docs") == expected(bpe, [p.read_text(encoding="utf-8") for p in files])
    assert meta["skipped"] == [str(src / "latin1.txt")] and meta["documents"] == len(DOCS)
    assert meta["dtype"] == "uint16" and (meta["vocab_size"], meta["eod"]) == (300, 1)
    assert json.loads((tmp_path / "out" / "docs.json").read_text()) == meta
    assert describe(tmp_path / "out" / "docs")["tokens"] == meta["tokens"] == sum(map(len, read(tmp_path / "out/docs")))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_record_files(bpe, tmp_path, kind):
    """jsonl (plain, gzip, zstandard; blank lines skipped) and parquet give the documents in order."""
    path = tmp_path / f"docs.{kind}"
    records = [{"id": i, "content": t} for i, t in enumerate(DOCS)]
    if kind == "parquet":
        pq.write_table(pa.table({"content": DOCS, "id": list(range(len(DOCS)))}), path, row_group_size=7)
    elif kind == "jsonl.zst":
        with zstandard.ZstdCompressor().stream_writer(open(path, "wb")) as f:
            f.write("".join(json.dumps(r) + "\n" + ("\n" if i == 3 else "") for i, r in enumerate(records)).encode())
    else:
        write_jsonl(path, records, gzip.open if kind.endswith("gz") else open)
    prepare([path, path], bpe, tmp_path / "out", text_key="content", **quiet())
    assert read(tmp_path / "out") == expected(bpe, DOCS * 2)


def test_workers_give_the_same_bytes(bpe, tmp_path):
    """Chunks are cut the same way and merged in order, so 2 workers write what 1 does (FIM included)."""
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"text": t * (1 + i % 5)} for i, t in enumerate(DOCS * 5)])
    outs = [tmp_path / f"w{n}" / "out" for n in (1, 2)]
    for n, out in zip((1, 2), outs):
        prepare([path, tmp_path / "docs.jsonl"], bpe, out, workers=n, fim_rate=0.3, chunk_bytes=500, **quiet())
    for ext in (".bin", ".idx"):
        assert Path(f"{outs[0]}{ext}").read_bytes() == Path(f"{outs[1]}{ext}").read_bytes()
    assert sorted(p.name for p in outs[1].parent.iterdir()) == ["out.bin", "out.idx", "out.json"]  # no parts left


@pytest.mark.parametrize("workers", [1, 2])
def test_a_malformed_line_is_named_and_nothing_is_left(bpe, tmp_path, workers):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not a JSON line"):
        prepare([path], bpe, tmp_path / "out" / "x", workers=workers, **quiet())
    assert list((tmp_path / "out").iterdir()) == []


def test_a_missing_text_field_is_named(bpe, tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"text": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match=rf"{path}:2: no 'text' key \(has: content\); .*--text-key"):
        prepare([path], bpe, tmp_path / "out", **quiet())
    write_jsonl(path, [{"text": None}])
    with pytest.raises(ValueError, match=rf"{path}:1: 'text' is NoneType, not a string"):
        prepare([path], bpe, tmp_path / "out", **quiet())
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d.parquet: no column 'text' \(columns: content\)"):
        prepare([tmp_path / "d.parquet"], bpe, tmp_path / "out", **quiet())
    with pytest.raises(FileNotFoundError, match="--input .*nope: no such file"):
        prepare([tmp_path / "nope"], bpe, tmp_path / "out", **quiet())


def test_a_half_written_dataset_is_never_whole(tmp_path):
    """.idx is renamed into place last; describe refuses an .idx alone, a .bin alone, leftovers of a
    killed run, and a .bin that does not match its index; a new run replaces the leftovers."""
    src = tmp_path / "a.txt"
    src.write_text("hello world")
    prefix = tmp_path / "out"
    prepare([src], "bytes", prefix, **quiet())
    assert describe(prefix)["tokens"] == 12
    bin_ = prefix.with_suffix(".bin")
    data = bin_.read_bytes()
    bin_.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{bin_} not found \(its index .*out.idx exists\)"):
        describe(prefix)
    bin_.write_bytes(data[:-2])
    with pytest.raises(ValueError, match="holds 22 bytes but .* describes 12 uint16 tokens"):
        describe(prefix)
    prefix.with_suffix(".idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"out.idx not found \(out.bin exist: an unfinished"):
        describe(prefix)
    bin_.rename(tmp_path / "out.bin.tmp")
    with pytest.raises(FileNotFoundError, match=r"out.idx not found \(out.bin.tmp exist"):
        describe(prefix)
    prepare([src], "bytes", prefix, **quiet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out.bin", "out.idx", "out.json"]
    assert describe(prefix)["tokens"] == 12


def test_a_megatron_lm_dataset_is_accepted(tmp_path):
    """What Megatron-LM's tools/preprocess_data.py writes (IndexedDatasetBuilder, int32, one sequence per
    document, no PREFIX.json) passes describe, as does `moeforge data info`."""
    prefix = str(tmp_path / "megatron_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in ([5, 6, 7, 0], [8, 0], [100_000, 0]):
        builder.add_document(np.array(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    assert describe(prefix) == {"prefix": prefix, "dtype": "int32", "documents": 3, "sequences": 3, "tokens": 8,
                                "meta": None}
    assert main(["data", "info", prefix]) == 0


def test_a_large_vocab_writes_int32(tmp_path):
    tok = ByteTokenizer()
    tok.vocab_size = 100_000  # ids above 65,500 need int32 (megatron's DType.optimal_dtype)
    (tmp_path / "a.txt").write_text("abc")
    assert prepare([tmp_path / "a.txt"], tok, tmp_path / "out", **quiet())["dtype"] == "int32"
    assert read(tmp_path / "out") == [[97, 98, 99, 256]]


def test_fim_split_is_a_permutation_drawn_from_seed_and_index():
    text = "0123456789abcdef"
    prefix, suffix, middle = fim_split(text, 0, 7, rate=1.0)
    assert prefix + middle + suffix == text and fim_split(text, 0, 7, 1.0) == (prefix, suffix, middle)
    assert fim_split(text, 0, 7, rate=0.0) is None
    assert len({fim_split(text, 0, i, 1.0) for i in range(50)}) > 10


def test_fim_rate_and_psm_layout(bpe, tmp_path):
    """10k documents at rate 0.1: within 1%; each FIM document is <begin> prefix <hole> suffix <end>
    middle <eos>, and prefix + middle + suffix is the document."""
    texts = [f"doc {i}: x = {i * 7 % 13}\n" for i in range(10_000)]
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"text": t} for t in texts])
    meta = prepare([path], bpe, tmp_path / "out", fim_rate=0.1, seed=3, **quiet())
    begin, hole, end = (bpe.token_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END))
    docs = read(tmp_path / "out")
    fim = [i for i, d in enumerate(docs) if d[0] == begin]
    assert abs(len(fim) / len(texts) - 0.1) < 0.01 and meta["fim_documents"] == len(fim)
    for i in fim[:300]:
        text = bpe.decode(docs[i])
        assert text.startswith(FIM_BEGIN) and text.endswith(EOS) and docs[i].count(bpe.eod) == 1
        prefix, rest = text[len(FIM_BEGIN):-len(EOS)].split(FIM_HOLE)
        suffix, middle = rest.split(FIM_END)
        assert prefix + middle + suffix == texts[i]
    plain = [i for i in range(len(texts)) if docs[i][0] != begin][:100]
    assert [docs[i] for i in plain] == expected(bpe, [texts[i] for i in plain])


def test_fim_needs_the_fim_tokens(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(ValueError, match="--fim-rate 0.5 needs the tokenizer's FIM tokens; bytes lacks"):
        prepare([tmp_path / "a.txt"], "bytes", tmp_path / "out", fim_rate=0.5, **quiet())


def test_the_data_commands(tmp_path, capsys):
    """train-tokenizer, prepare, info from the command line; a bad line ends in one message, exit 2."""
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(DOCS):
        (src / f"m{i:02d}.py").write_text(text, encoding="utf-8")
    assert main(["data", "train-tokenizer", "--input", str(src), "--vocab-size", "280",
                 "--output", str(tmp_path / "tok.json")]) == 0
    assert main(["data", "prepare", "--input", str(src), "--tokenizer", str(tmp_path / "tok.json"),
                 "--output", str(tmp_path / "out"), "--workers", "2", "--fim-rate", "0.5"]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"documents: {len(DOCS)}" in out and "vocab_size: 280" in out and "fim_rate: 0.5" in out
    (tmp_path / "bad.jsonl").write_text("[1]\n")
    assert main(["data", "prepare", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", "bytes",
                 "--output", str(tmp_path / "bad")]) == 2
    assert f"moeforge: {tmp_path / 'bad.jsonl'}:1: no 'text' key (has: list)" in capsys.readouterr().err
