"""Tokenizers: text to the ids the model trains on, behind one small interface (`Tokenizer`).

`load_tokenizer(spec)` takes one of:
- `bytes`: the UTF-8 bytes are the ids 0..255 and 256 ends a document (vocab 257). No file, no
  training, every text representable; ~3.3x the tokens of the shipped BPE on Python source. The ids
  are those of moeforge's first token files.
- the name of a tokenizer shipped in conf/tokenizer/ (`stdlib-bpe-4096`, see `default_tokenizer_path`);
- a Hugging Face `tokenizers` file (`tokenizer.json`) or a folder holding one (e.g. DeepSeek-V3's
  tokenizer files, downloaded beforehand: nothing is fetched here, so a hub name is an error that says
  how to fetch it).

Special tokens. The end-of-document id (`eod`, appended to every document when preparing data), `bos`
and `pad` come from the tokenizer's own files: a folder's tokenizer_config.json, then its
special_tokens_map.json (`"eos_token": "..."` or `{"content": "..."}`, `null` meaning none). A bare
tokenizer.json has no such file; there they are its added tokens with a known spelling, DeepSeek's
first (`<｜end▁of▁sentence｜>`, with the fullwidth bar U+FF5C and U+2581), then GPT-2/Llama's. The three
Fill-in-the-Middle tokens are DeepSeek-V3's (`FIM_BEGIN`, `FIM_HOLE`, `FIM_END`; ids 128801, 128800,
128802 in its vocabulary).

Document text is encoded as text: a document that spells `<｜end▁of▁sentence｜>` gets those characters'
tokens, never the special id, so no corpus can forge a document boundary or a FIM marker.

`train_tokenizer` trains a byte-level BPE (the GPT-2 pre-tokenizer regex over UTF-8 bytes, so every
text is representable, as in DeepSeek-V3) with DeepSeek's special tokens at ids 0..5.

The model's vocab may be larger than the tokenizer's (padded to a multiple of 128 for the GEMM shapes,
`padded_vocab_size`) but never smaller: `check_vocab`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
FIM_TOKENS = (FIM_BEGIN, FIM_HOLE, FIM_END)
SPECIAL_TOKENS = (BOS, EOS, PAD, FIM_HOLE, FIM_BEGIN, FIM_END)  # trained BPEs: ids 0..5, DeepSeek's order

# Spellings that name a bare tokenizer.json's specials, most preferred first.
_KNOWN = {
    "eos_token": (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"),
    "bos_token": (BOS, "<|begin_of_text|>", "<s>", "<bos>"),
    "pad_token": (PAD, "<pad>", "<|pad|>", "[PAD]"),
}
SHIPPED = "stdlib-bpe-4096"


class Tokenizer(ABC):
    """What data preparation and sampling need of a tokenizer: ids, the specials, a fingerprint.

    `spec` is what was asked for, `path` the file or folder it names (None for `bytes`), `fingerprint`
    the sha256 of the vocabulary and merges (the same tokenizer gives the same one from a file or a folder).
    """

    spec: str
    path: Path | None
    vocab_size: int
    eod: int
    bos: int | None
    pad: int | None
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def token_id(self, token: str) -> int | None:
        """The id of a special token spelled `token`, or None if the tokenizer has none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes plus `<eot>` (256) ending each document."""

    def __init__(self):
        self.spec, self.path, self.vocab_size, self.eod, self.bos, self.pad = "bytes", None, 257, 256, None, None
        self.fingerprint = hashlib.sha256(b"bytes").hexdigest()

    def encode_batch(self, texts):
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_id(self, token):
        return self.eod if token == "<eot>" else None


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with its specials; see the module docstring for where they come from."""

    def __init__(self, spec: str, path: Path):
        folder = path.is_dir()
        file = path / "tokenizer.json" if folder else path
        if not file.is_file():
            raise FileNotFoundError(f"data.tokenizer={spec!r}: {path} has no tokenizer.json (the Hugging Face "
                                    "`tokenizers` format; transformers' save_pretrained writes one)")
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust parser's message names only the JSON position
            raise ValueError(f"data.tokenizer={spec!r}: {file} is not a `tokenizers` file: {e}") from e
        self.tok.encode_special_tokens = True  # text is text: see the module docstring
        self.spec, self.path = spec, path
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        self.fingerprint = hashlib.sha256(self.tok.to_str().encode()).hexdigest()
        named = _configured_specials(path) if folder else {}
        added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        ids = {}
        for key, spellings in _KNOWN.items():
            name = named[key] if key in named else next((s for s in spellings if s in added), None)
            ids[key] = None if name is None else self.tok.token_to_id(name)
            if name is not None and ids[key] is None:
                raise ValueError(f"data.tokenizer={spec!r}: {key} {name!r} is not in the vocabulary of {file}")
        if ids["eos_token"] is None:
            raise ValueError(f"data.tokenizer={spec!r}: no end-of-document token (an eos_token in "
                             f"tokenizer_config.json, or an added token spelled one of {_KNOWN['eos_token']})")
        self.eod, self.bos, self.pad = ids["eos_token"], ids["bos_token"], ids["pad_token"]

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token):
        return self.tok.token_to_id(token)


def _configured_specials(folder: Path) -> dict[str, str | None]:
    """bos/eos/pad token names set by a folder's tokenizer_config.json or special_tokens_map.json."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = folder / name
        if path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
            for key in _KNOWN:
                if key in cfg:
                    value = cfg[key]
                    out[key] = value["content"] if isinstance(value, dict) else value
    return out


def default_tokenizer_path() -> Path:
    """The shipped byte-level BPE (vocab 4,096, trained on the Python standard library's sources)."""
    return Path(str(files("moeforge.conf") / "tokenizer" / f"{SHIPPED}.json"))


def shipped_tokenizers() -> dict[str, Path]:
    folder = files("moeforge.conf") / "tokenizer"
    return {p.name.removesuffix(".json"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def load_tokenizer(spec: str) -> Tokenizer:
    """`bytes`, a shipped name, or a local tokenizer.json / tokenizer folder (see the module docstring)."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.exists():
        return HFTokenizer(spec, path)
    shipped = shipped_tokenizers()
    if spec in shipped:
        return HFTokenizer(spec, shipped[spec])
    hub = "" if spec.count("/") != 1 or spec.startswith((".", "/", "~")) or spec.endswith(".json") else (
        f"; it looks like a Hugging Face hub name, and moeforge downloads nothing: fetch the files first "
        f"(`hf download {spec} tokenizer.json tokenizer_config.json --local-dir tokenizers/{spec}`) and "
        f"pass the folder")
    raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file or folder{hub}. A tokenizer is `bytes`, "
                            f"a shipped name ({', '.join(sorted(shipped))}), a tokenizer.json or a folder with one")


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    """The smallest multiple of `multiple` >= n: a model vocab the embedding and head GEMMs like."""
    return math.ceil(n / multiple) * multiple


def check_vocab(tokenizer: Tokenizer | int, model_vocab_size: int) -> None:
    """Raise unless every id of `tokenizer` (or a tokenizer vocab size) has a row in the model's embedding."""
    n = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size
    if model_vocab_size < n:
        what = "" if isinstance(tokenizer, int) else f" ({tokenizer.spec})"
        raise ValueError(f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's {n} ids{what}: "
                         f"set model.vocab_size={padded_vocab_size(n)} (a multiple of 128) or more")


def train_tokenizer(texts: Iterable[str], vocab_size: int, output: str | Path, min_frequency: int = 2,
                    progress: bool = False) -> HFTokenizer:
    """Train a byte-level BPE of `vocab_size` ids (SPECIAL_TOKENS first) on `texts`; write it to `output`
    (a tokenizer.json, written under a temporary name and renamed) and return it loaded."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} ids (256 bytes and {len(SPECIAL_TOKENS)} special tokens)")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tok.save(str(tmp), pretty=False)
    os.replace(tmp, output)
    return HFTokenizer(str(output), output)
