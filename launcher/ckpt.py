"""`moeforge ckpt inspect|export|import`: look into checkpoints, and move weights to and from the
Hugging Face DeepSeek-V3 layout (train/hf_export.py). Single process; no process group.

    moeforge ckpt inspect outputs/tiny/checkpoints            # every step_*: step, layout, size, whole or why not
    moeforge ckpt export outputs/tiny/checkpoints --hf hf_out  # newest whole checkpoint -> config.json + safetensors
    moeforge ckpt export outputs/tiny/checkpoints --hf hf_ema --ema   # its EMA weights (train.ema_decay > 0)
    moeforge ckpt import hf_out --out imported/checkpoints     # -> imported/checkpoints/step_00000000 (weights only)
    moeforge train checkpoint.resume=imported/checkpoints/step_00000000 ...   # continue from it
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(path: Path) -> dict:
    """What `inspect` prints for one step_* folder (never raises on a damaged checkpoint)."""
    from moeforge.train import checkpoint as ckpt

    why = ckpt.verify(path)
    info = {"path": str(path), "step": ckpt.step_of(path), "whole": why is None, "why_not": why}
    try:
        m = ckpt.read_manifest(path)
    except (OSError, ValueError):
        m = {}
    files = m.get("files") or {}
    info.update(tokens_seen=m.get("tokens_seen"), layout=m.get("layout"), contents=m.get("contents"),
                created=m.get("created"), bytes=m.get("bytes", sum(f.get("bytes", 0) for f in files.values())),
                files=len(files), save_seconds=m.get("save_seconds"),
                model=((m.get("config") or {}).get("model") or {}).get("name"), code=m.get("code"))
    if why is None:
        index = ckpt.saved_tensors(path)
        model = {k: v for k, v in index.items() if k.startswith("model.")}
        info["model_tensors"] = len(model)
        info["model_params"] = sum(int(_numel(shape)) for k, (shape, _) in model.items() if not k.endswith("gate.bias"))
        info["optimizer_pieces"] = sum(1 for k in index if k.startswith("optim.exp_avg."))
        info["ema_tensors"] = sum(1 for k in index if k.startswith("ema."))  # train.ema_decay > 0
    return info


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _inspect(args) -> int:
    from moeforge.train import checkpoint as ckpt

    root = Path(args.path)
    paths = [root] if ckpt.step_of(root) is not None or (root / ckpt.MANIFEST).is_file() else \
        ckpt.list_checkpoints(root)
    if not paths:
        print(f"ckpt inspect: no step_* checkpoints under {root}", file=sys.stderr)
        return 1
    infos = [describe(p) for p in paths]
    if args.json:
        print(json.dumps(infos, indent=1))
        return 0
    for i in infos:
        state = "whole" if i["whole"] else f"NOT WHOLE ({i['why_not']})"
        print(f"{i['path']}: step {i['step']}, {state}")
        if i.get("layout"):
            lay = i["layout"]
            print(f"  layout      world={lay.get('world_size')} pp={lay.get('pp')} dp={lay.get('dp')} "
                  f"ep={lay.get('ep')} edp={lay.get('edp')}")
        if i.get("files"):
            print(f"  size        {_human(i['bytes'])} in {i['files']} files"
                  + (f", saved in {i['save_seconds']:.2f}s" if i.get("save_seconds") is not None else ""))
        if i.get("tokens_seen") is not None:
            print(f"  tokens seen {i['tokens_seen']:,}   created {i.get('created')}   contents {i.get('contents')}")
        if "model_params" in i:
            print(f"  model       {i.get('model')!r}: {i['model_params']:,} parameters in {i['model_tensors']} "
                  f"tensors; {i['optimizer_pieces']} optimizer pieces"
                  + (f"; EMA of {i['ema_tensors']} parameters" if i.get("ema_tensors") else ""))
        if i.get("code"):
            c = i["code"]
            print(f"  code        moeforge {c.get('moeforge')} git {str(c.get('git_commit'))[:12]} "
                  f"source {str(c.get('source_sha256'))[:12]}")
    return 0 if all(i["whole"] for i in infos) or len(infos) > 1 else 2


def _export(args) -> int:
    from moeforge.train.hf_export import export_hf

    export_hf(args.path, args.hf, dtype=args.dtype, shard_bytes=int(args.shard_gib * (1 << 30)), ema=args.ema)
    return 0


def _import(args) -> int:
    from moeforge.train.hf_export import import_hf

    import_hf(args.hf_dir, args.out, step=args.step, name=args.name, dtype=args.dtype)
    return 0


def add_ckpt_parser(subparsers) -> argparse.ArgumentParser:
    """Register `ckpt inspect|export|import` on an argparse subparsers object."""
    c = subparsers.add_parser("ckpt", help="inspect checkpoints; export/import the Hugging Face DeepSeek-V3 layout")
    sub = c.add_subparsers(dest="ckpt_command", required=True)
    i = sub.add_parser("inspect", help="step, layout, size and whole-or-not of a checkpoint or of every one under a root")
    i.add_argument("path", help="a step_* folder or a checkpoints root")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(fn=_inspect)
    e = sub.add_parser("export", help="write config.json + safetensors in the Hugging Face DeepSeek-V3 naming")
    e.add_argument("path", help="a step_* folder, or a checkpoints root (its newest whole checkpoint)")
    e.add_argument("--hf", required=True, help="output folder")
    e.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="weights dtype (the MoE correction bias stays float32); auto: as trained")
    e.add_argument("--shard-gib", type=float, default=5.0, help="largest safetensors file (default 5 GiB)")
    e.add_argument("--ema", action="store_true",
                   help="export the EMA of the parameters (saved when train.ema_decay > 0) instead of the live weights")
    e.set_defaults(fn=_export)
    m = sub.add_parser("import", help="read a Hugging Face DeepSeek-V3 folder into a weights-only checkpoint")
    m.add_argument("hf_dir")
    m.add_argument("--out", required=True, help="an empty checkpoints root; step_<STEP> is written in it")
    m.add_argument("--step", type=int, default=0)
    m.add_argument("--name", default=None, help="model name recorded in the checkpoint (default: from config.json)")
    m.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="parameter dtype")
    m.set_defaults(fn=_import)
    return c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeforge.launcher.ckpt")
    add_ckpt_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["ckpt", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
