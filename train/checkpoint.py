"""Checkpoints that survive failures: torch.distributed.checkpoint (DCP), written asynchronously, made
whole by a manifest written last, loadable under any (pp, dp, ep) layout.

Layout on disk, one folder per step:

    checkpoints/step_00001200/
        __0_0.distcp ... __{rank}_0.distcp   tensor data (DCP, one file per writing rank)
        .metadata                           DCP's index: every key, its shape, dtype and where it lives
        manifest.json                       written last: files + sizes + sha256, step, layout, config, code

Logical keys (every key names the same thing under every layout):

    model.<fqn>                          model.state_dict(): `layers.7.attn.wq_a.weight`, global layer
                                         ids and global expert ids (`layers.3.ffn.experts.5.w1.weight`),
                                         the MoE balance bias `...ffn.gate.bias` (a persistent buffer)
    optim.exp_avg.<fqn>[a:b]             AdamW moments of elements [a, b) of the flattened parameter:
    optim.exp_avg_sq.<fqn>[a:b]          the ZeRO-1 shard a rank owns, under a name no other rank uses
    optim.master.<fqn>[a:b]              FP32 master weights where the parameter itself is not FP32
    ema.<fqn>                            FP32 EMA of the parameter model.<fqn> (train.ema_decay > 0,
                                         train/ema.py), written by the ranks that write model.<fqn>
    optim.step, train.step, train.tokens_seen, train.consumed_samples    int64 scalars
    rng.cpu.rank00003, rng.cuda.rank00003        each rank's torch RNG state

DCP treats a plain tensor saved under one key by several ranks as replicated and keeps one copy, so
every key is either truly replicated (dense weights over dp, experts over edp) or written by a single
rank (optimizer pieces, RNG). Replicated model tensors are spread over their replicas (dense over dp,
experts over edp) so each rank stages and writes only its share. Loading asks DCP for this rank's
own model keys (whatever the saving layout was), and for every saved optimizer piece that overlaps
the ranges this rank owns now; ShardedAdamW.load_state_dict assembles them. The data position is
`train.consumed_samples`: every dp rank's share of the next batch follows from it at any dp
(train/batches.py). The LR schedule is a pure function of the step, the samples consumed and the
`train` config (in the manifest).

Whole or not. A checkpoint is whole only when manifest.json exists, parses, and every file it lists
has the recorded size and sha256. Resume walks the folders newest first, reports and skips any that
is not whole, and loads the first whole one; nothing without a manifest is ever opened. Tensors are
read with torch.load(weights_only=True) (DCP's reader), the DCP index with an unpickler that accepts
only DCP's metadata classes, torch dtypes and sizes, and no non-tensor value is ever loaded.

Asynchronous save. `Checkpointer.save` copies this rank's share to CPU buffers (reused between saves)
and returns; a thread runs dcp.save, checksums, the manifest and pruning, on a process group of its
own (gloo), so its collectives never interleave with training's. At most one save is in flight: the
next one (and the final or preemption save, which block) first waits for it.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import threading
import time
import warnings
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

from moeforge.model.transformer import is_expert_param

FORMAT = "moeforge-dcp/1"
MANIFEST = "manifest.json"
PREFIX = "step_"
PIECE_RE = re.compile(r"^optim\.(exp_avg|exp_avg_sq|master)\.(.+)\[(\d+):(\d+)\]$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    m = re.fullmatch(PREFIX + r"(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Every step_* folder under root, oldest first (whole or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


# ---------------------------------------------------------------------------------------------------
# whole or not


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def verify(path: str | Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """None if the checkpoint at `path` is whole, else why not. `share=(i, n)` checksums only every
    n-th file from the i-th (the ranks of a job split the reading; the manifest checks run on all)."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        return "no manifest (unfinished or interrupted save)"
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable manifest: {type(e).__name__}: {e}"
    if manifest.get("format") != FORMAT:
        return f"format {manifest.get('format')!r}, expected {FORMAT!r}"
    if step_of(path) is not None and manifest.get("step") != step_of(path):
        return f"manifest step {manifest.get('step')} does not match the folder name"
    if ".metadata" not in files:
        return "manifest lists no DCP .metadata"
    names = sorted(files)
    for name in names[share[0]::share[1]]:
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != files[name]["bytes"]:
            return f"{name} is {f.stat().st_size} bytes, manifest says {files[name]['bytes']} (truncated?)"
        if _sha256(f) != files[name]["sha256"]:
            return f"{name} checksum mismatch (corrupted)"
    return None


def _rank(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_whole(path: Path, group=None) -> str | None:
    """Collective form of verify: the ranks of `group` split the checksumming and agree on the verdict."""
    rank, world = _rank(group)
    why = verify(path, (rank, world))
    if group is not None:
        everyone = [None] * world
        dist.all_gather_object(everyone, why, group=group)
        why = next((w for w in everyone if w is not None), None)
    return why


def latest_whole(root: str | Path, log: Callable[[str], None] = print, group=None) -> Path | None:
    """The newest whole checkpoint under root; each newer one that is not whole is reported and skipped.
    Collective when `group` is given (rank 0's listing is used, so every rank picks the same one)."""
    paths = list_checkpoints(root)
    if group is not None:
        box = [paths]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        paths = box[0]
    for path in reversed(paths):
        why = check_whole(path, group)
        if why is None:
            return path
        log(f"checkpoint: skipping {path}: {why}")
    return None


# ---------------------------------------------------------------------------------------------------
# reading DCP without trusting pickle


_META_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle; accept only the classes such an index is made of."""

    def find_class(self, module, name):
        if module in _META_MODULES or (module == "torch" and name == "Size") \
                or (module == "torch.serialization" and name == "_get_layout") \
                or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")) \
                or (module == "collections" and name == "OrderedDict") \
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}: refusing to load it")


def _reader(path: Path):
    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def saved_tensors(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)} of every tensor in the checkpoint at `path` (reads only the DCP index)."""
    md = _reader(Path(path)).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _dcp_load(state: dict[str, torch.Tensor], path: Path, group=None) -> None:
    """Fill `state`'s tensors in place from the checkpoint (collective over `group` when given)."""
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"only tensors are loaded from checkpoints, got non-tensors for {bad[:5]}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, storage_reader=_reader(path), process_group=group, no_dist=group is None)


def read_tensors(path: str | Path, keys: list[str] | None = None, verify_first: bool = True) -> dict[str, torch.Tensor]:
    """Single process: the full tensors under `keys` (default: all) of a whole checkpoint."""
    path = Path(path)
    if verify_first:
        why = verify(path)
        if why is not None:
            raise ValueError(f"checkpoint {path} is not whole: {why}")
    index = saved_tensors(path)
    keys = list(index) if keys is None else list(keys)
    missing = [k for k in keys if k not in index]
    if missing:
        raise KeyError(f"checkpoint {path} has no {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    state = {k: torch.empty(index[k][0], dtype=index[k][1]) for k in keys}
    _dcp_load(state, path)
    return state


def load(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a whole checkpoint, single process (tools and tests); ValueError if not whole."""
    return read_tensors(path)


# ---------------------------------------------------------------------------------------------------
# saving


@lru_cache(maxsize=1)
def code_version() -> dict:
    """moeforge's version, the git commit (read from .git, no subprocess) and a hash of its sources."""
    root = Path(__file__).resolve().parents[1]
    out = {"moeforge": None, "git_commit": None, "source_sha256": None}
    try:
        out["moeforge"] = version("moeforge")
    except Exception:  # noqa: BLE001 - not installed: leave None
        pass
    try:
        git = root / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref:"):
            ref = head.split(":", 1)[1].strip()
            if (git / ref).is_file():
                head = (git / ref).read_text().strip()
            else:
                packed = (git / "packed-refs").read_text().splitlines()
                head = next((line.split()[0] for line in packed if line.endswith(" " + ref)), None)
        out["git_commit"] = head
    except (OSError, IndexError):
        pass
    h = hashlib.sha256()
    for pkg in ("launcher", "parallel", "model", "fp8", "comm", "dualpipe", "train", "conf"):
        for f in sorted((root / pkg).rglob("*.py")) + sorted((root / pkg).rglob("*.yaml")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    out["source_sha256"] = h.hexdigest()
    return out


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _json_safe(x.tolist())
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


class Checkpointer:
    """Writes checkpoints under `root` (collective over `group`; None: one process). At most one save
    is in flight; `save(..., block=False)` returns as soon as this rank's share is copied to CPU."""

    def __init__(self, root: str | Path, keep: int, group=None, async_save: bool = True,
                 log: Callable[[str], None] = print):
        self.root, self.keep, self.group, self.async_save, self.log = Path(root), keep, group, async_save, log
        self.rank, self.world = _rank(group)
        self._buffers: dict[str, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_path: Path | None = None
        self.last_seconds: float = 0.0  # wall time of the last completed save (staging to manifest)

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is whole; re-raise its failure here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint save failed in the background: {type(err).__name__}: {err}") from err
        return self.last_path

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _stage(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CPU copies of `state` in buffers reused across saves (pinned when the source is on a GPU)."""
        staged, cuda = {}, False
        for k, v in state.items():
            v = v.detach()
            buf = self._buffers.get(k)
            if buf is None or buf.shape != v.shape or buf.dtype != v.dtype:
                pin = v.is_cuda
                buf = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=pin)
                self._buffers[k] = buf
            buf.copy_(v, non_blocking=v.is_cuda)
            cuda |= v.is_cuda
            staged[k] = buf
        for k in set(self._buffers) - set(state):
            del self._buffers[k]
        if cuda:
            torch.cuda.synchronize()
        return staged

    def save(self, step: int, state: dict[str, torch.Tensor], manifest: dict, block: bool = False) -> Path:
        """Save this rank's `state` (logical keys) as step `step`; `manifest` holds the job-level fields."""
        self.wait()
        t0 = time.perf_counter()
        staged = self._stage(state)
        path = step_dir(self.root, step)
        if self.async_save and not block:
            self._thread = threading.Thread(target=self._write_guarded, args=(step, path, staged, manifest, t0),
                                            name=f"moeforge-ckpt-{step}", daemon=True)
            self._thread.start()
        else:
            self._write(step, path, staged, manifest, t0)
        return path

    def _write_guarded(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by wait()
            self._error = e

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _write(self, step: int, path: Path, staged: dict, manifest: dict, t0: float) -> None:
        if self.rank == 0:
            if path.exists():  # debris of an interrupted save, or an abandoned timeline's step
                shutil.rmtree(path)
            path.mkdir(parents=True)
        self._barrier()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(staged, storage_writer=FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True),
                     process_group=self.group, no_dist=self.group is None)
        # every rank's data and DCP's .metadata are written (dcp.save ends with the coordinator's
        # finish); checksum them, the ranks splitting the files, and gather the sums on rank 0
        names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
        sums = {n: {"bytes": (path / n).stat().st_size, "sha256": _sha256(path / n)}
                for n in names[self.rank::self.world]}
        if self.group is not None:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, sums, group=self.group)
            sums = {k: v for part in everyone for k, v in part.items()}
        if self.rank == 0:
            seconds = time.perf_counter() - t0
            body = {"format": FORMAT, "step": step, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                    **_json_safe(manifest), "save_seconds": round(seconds, 3),
                    "bytes": sum(v["bytes"] for v in sums.values()), "files": sums}
            tmp = path / (MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                f.write(json.dumps(body, indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path / MANIFEST)
            _fsync_dir(path)
            self._prune(step)
        self._barrier()  # returning from a blocking save means: whole, on every rank
        self.last_path, self.last_seconds = path, time.perf_counter() - t0

    def _prune(self, step: int) -> None:
        """Keep the newest `keep` whole checkpoints up to `step`; drop debris older than it and any newer
        folder (left by a timeline that was abandoned when the job resumed from an older step)."""
        whole = 0
        for p in reversed(list_checkpoints(self.root)):
            s = step_of(p)
            if s > step:
                self.log(f"checkpoint: removing {p}: newer than the step just saved ({step}), from an abandoned run")
            elif (p / MANIFEST).is_file() and whole < self.keep:
                whole += 1
                continue
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(root: str | Path, step: int, state: dict[str, torch.Tensor], manifest: dict | None = None,
         keep: int = 2, group=None) -> Path:
    """Blocking save of one rank's `state` (tools and tests); the Trainer keeps a Checkpointer instead."""
    return Checkpointer(root, keep, group, async_save=False).save(step, state, manifest or {}, block=True)


# ---------------------------------------------------------------------------------------------------
# the trainer's state under logical keys


def _share(keys: list[str], index: int, size: int) -> set[str]:
    """Every size-th key from index-th (keys sorted): which replicated tensors this replica writes."""
    return set(sorted(keys)[index::size])


def model_state(model: torch.nn.Module, dense_share=(0, 1), expert_share=(0, 1),
                is_expert: Callable[[str], bool] = is_expert_param) -> dict[str, torch.Tensor]:
    """This rank's share of `model.<fqn>` keys: dense tensors split over dp, routed experts over edp."""
    sd = model.state_dict()
    dense = [k for k in sd if not is_expert(k)]
    mine = _share(dense, *dense_share) | _share([k for k in sd if is_expert(k)], *expert_share)
    return {f"model.{k}": v for k, v in sd.items() if k in mine}


def optimizer_state(optimizer) -> dict[str, torch.Tensor]:
    """ShardedAdamW's pieces of this rank under rank-free logical keys, plus master weights where the
    parameter is not FP32 (its FP32 value lives only in the optimizer's flat buffer)."""
    sd = optimizer.state_dict()
    out = {"optim.step": torch.tensor(sd["step"], dtype=torch.int64)}
    for name, e in sd["state"].items():
        a, b = e["start"], e["end"]
        for kind in ("exp_avg", "exp_avg_sq", "master"):
            if kind in e:
                out[f"optim.{kind}.{name}[{a}:{b}]"] = e[kind]
    return out


def ema_state(ema: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ema.<fqn>` keys of the EMA tensors (fqn -> FP32) whose parameter this rank writes in `state`
    (model_state's share): the EMA is spread over the replicas exactly as the model is."""
    return {f"ema.{n}": t for n, t in ema.items() if f"model.{n}" in state}


def rng_state(rank: int) -> dict[str, torch.Tensor]:
    out = {f"rng.cpu.rank{rank:05d}": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"rng.cuda.rank{rank:05d}"] = torch.cuda.get_rng_state()
    return out


def load_trainer_state(path: Path, model: torch.nn.Module, optimizer, rank: int, world: int, group=None,
                       log: Callable[[str], None] = print, ema: dict[str, torch.Tensor] | None = None) -> dict:
    """Collective: load model, optimizer and this rank's RNG from the whole checkpoint at `path`, whatever
    layout saved it; `ema` (fqn -> FP32 tensor, filled in place) when the run keeps an EMA. Returns
    {"step", "tokens_seen", "consumed_samples" (None if not saved), "manifest", "ema" (loaded or not)}."""
    manifest = read_manifest(path)
    index = saved_tensors(path)
    want: dict[str, torch.Tensor] = {}
    model_sd = model.state_dict()
    missing, wrong = [], []
    for k, v in model_sd.items():
        key = f"model.{k}"
        if key not in index:
            missing.append(k)
        elif index[key][0] != tuple(v.shape):
            wrong.append(f"{k}: saved {index[key][0]}, model {tuple(v.shape)}")
        else:
            want[key] = v  # loaded in place: parameters are views of the optimizer's flat buffer
    if missing or wrong:
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), shape mismatch {wrong[:5]}; "
                         f"saved with model {manifest.get('config', {}).get('model', {}).get('name')!r}")
    for key in ("train.step", "train.tokens_seen", "train.consumed_samples"):
        if key in index:
            want[key] = torch.zeros((), dtype=torch.int64)
    saved_ema = [k for k in index if k.startswith("ema.")]
    if ema is not None and saved_ema:  # all of this rank's EMA or none of it (then: from the parameters)
        missing = [n for n in ema if f"ema.{n}" not in index]
        wrong = [f"{n}: saved {index[f'ema.{n}'][0]}, here {tuple(t.shape)}" for n, t in ema.items()
                 if f"ema.{n}" in index and index[f"ema.{n}"][0] != tuple(t.shape)]
        if missing or wrong:
            raise ValueError(f"checkpoint {path}: its EMA does not fit this model: missing {missing[:5]} "
                             f"({len(missing)}), shape mismatch {wrong[:5]}")
        want.update({f"ema.{n}": t for n, t in ema.items()})  # filled in place (FP32 host tensors)
    elif ema is None and saved_ema:
        log(f"checkpoint: {path} holds an EMA of the parameters; train.ema_decay=0, so it is not loaded")
    has_optim = "optim.step" in index
    pieces: list[tuple[str, str, int, int]] = []  # (kind, name, a, b) of saved pieces this rank needs
    if has_optim:
        want["optim.step"] = torch.zeros((), dtype=torch.int64)
        mine = optimizer.shard_layout()
        for key, (shape, dtype) in index.items():
            m = PIECE_RE.match(key)
            if not m or m.group(2) not in mine:
                continue
            a, b = int(m.group(3)), int(m.group(4))
            _, lo, hi = mine[m.group(2)]
            if a < hi and lo < b:
                pieces.append((m.group(1), m.group(2), a, b))
                want[key] = torch.empty(shape, dtype=dtype)
    saved_world = manifest.get("layout", {}).get("world_size")
    rng_keys = [k for k in rng_state(rank) if k in index] if saved_world == world else []
    for k in rng_keys:
        want[k] = torch.empty(index[k][0], dtype=index[k][1])
    _dcp_load(want, path, group)  # in place: the model's tensors are filled where they live
    if has_optim:
        _load_optimizer(optimizer, want, pieces)
    else:
        optimizer.refresh_master()
        log(f"checkpoint: {path} holds no optimizer state (weights only): AdamW moments start at zero")
    for k in rng_keys:
        if k.startswith("rng.cpu."):
            torch.set_rng_state(want[k])
        elif torch.cuda.is_available():
            torch.cuda.set_rng_state(want[k])
    if saved_world != world:
        log(f"checkpoint: RNG states not restored (saved by {saved_world} ranks, now {world}); training draws "
            f"no random numbers from them (data and init use their own seeded generators)")
    consumed = want.get("train.consumed_samples")
    return {"step": int(want.get("train.step", 0)), "tokens_seen": int(want.get("train.tokens_seen", 0)),
            "consumed_samples": None if consumed is None else int(consumed), "manifest": manifest,
            "ema": ema is not None and bool(saved_ema)}


def _load_optimizer(optimizer, want: dict, pieces: list[tuple[str, str, int, int]]) -> None:
    shapes = {name: shape for name, (shape, _, _) in optimizer.shard_layout().items()}
    step = int(want["optim.step"])
    moment = str(optimizer.moment_dtype).removeprefix("torch.")
    sds: list[dict] = []  # one name at most once per state_dict, as ShardedAdamW.load_state_dict expects
    slot: dict[str, int] = {}
    for kind, name, a, b in sorted(pieces):
        if kind != "exp_avg":
            continue
        i = slot.get(name, 0)
        slot[name] = i + 1
        while len(sds) <= i:
            sds.append({"step": step, "moment_dtype": moment, "state": {}})
        e = sds[i]["state"][name] = {"shape": shapes[name], "start": a, "end": b}
        for k in ("exp_avg", "exp_avg_sq", "master"):
            if f"optim.{k}.{name}[{a}:{b}]" in want:
                e[k] = want[f"optim.{k}.{name}[{a}:{b}]"]
    optimizer.load_state_dict(sds or [{"step": step, "moment_dtype": moment, "state": {}}])


def trim_metrics(path: str | Path, step: int) -> None:
    """Keep the records of steps <= `step` in a metrics.jsonl (a resumed run rewrites the later ones);
    step 0: remove the file (a fresh run)."""
    path = Path(path)
    if not path.exists():
        return
    if step <= 0:
        path.unlink()
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
