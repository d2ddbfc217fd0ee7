"""Checkpoints: a folder per step, a manifest written last.

A checkpoint is whole only when its manifest exists and every file it lists has the recorded size
and sha256; anything else is reported and skipped, never loaded. Files are written to a temporary
name and renamed, so a crash leaves no half-written file under a real name.
(Single-process form; sharded DCP save/resume and resharding arrive with the checkpoint issue.)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(root: str | Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    root = Path(root)
    path = root / f"step_{step:08d}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")
    files = {"state.pt": {"bytes": (path / "state.pt").stat().st_size, "sha256": _sha256(path / "state.pt")}}
    manifest = {"step": step, "files": files, **meta}
    (path / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=2))
    os.replace(path / (MANIFEST + ".tmp"), path / MANIFEST)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return path


def verify(path: str | Path) -> str | None:
    """None if the checkpoint at `path` is whole, else the reason it is not."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        return "no manifest (unfinished save)"
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        return f"unreadable manifest: {e}"
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != info["bytes"]:
            return f"{name} is {f.stat().st_size} bytes, manifest says {info['bytes']}"
        if _sha256(f) != info["sha256"]:
            return f"{name} checksum mismatch"
    return None


def latest_whole(root: str | Path, log=print) -> Path | None:
    for path in sorted((p for p in Path(root).glob("step_*") if p.is_dir()), reverse=True):
        why = verify(path)
        if why is None:
            return path
        log(f"checkpoint: skipping {path}: {why}")
    return None


def load(path: str | Path) -> dict:
    why = verify(path)
    if why is not None:
        raise ValueError(f"checkpoint {path} is not whole: {why}")
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
